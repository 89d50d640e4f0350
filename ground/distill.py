"""Distillation runner: one declarative YAML per experiment (teachers, student, loss terms, data,
schedule, seed); trains the KD student and, beside it, the no-KD baseline (same student, data and
steps, labels only). Resumable from checkpoints; runs unchanged under torchrun (DDP, gloo on CPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from . import losses as L
from .errors import ExperimentConfigError as ConfigError  # the experiment-config error (flight.errors.ConfigError is the gate's)
from .student import StudentSpec, build_student
from hil.synth import SYNTH_BANDS
from .teachers import load_teacher

REPO = Path(__file__).resolve().parents[1]
TRAIN_CODE = ("ground/distill.py", "ground/losses.py", "ground/student.py")
_REQUIRED = ("experiment", "seed", "student", "teachers", "pool", "data", "train", "losses")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read experiment config: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping with keys {_REQUIRED}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}")
    teachers = [t["name"] for t in cfg["teachers"]]
    try:
        StudentSpec.from_dict(cfg["student"])
        L.validate_terms(cfg["losses"], teachers)
        L.validate_terms(cfg.get("baseline", {}).get("losses", [{"type": "ce_labels"}]), teachers)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    for k in ("steps", "batch", "lr"):
        if k not in cfg["train"]:
            raise ConfigError(f"{path}: train.{k} is required")
    bias = cfg.get("calibration", {}).get("cloud_logit_bias", 0.0)
    if bias != "auto" and not isinstance(bias, (int, float)):
        raise ConfigError(f"{path}: calibration.cloud_logit_bias must be 'auto' or a number, got {bias!r}")
    cfg["_path"] = str(path)
    return cfg


# ----------------------------------------------------------------------------------- transfer set
class LazyTeacher:
    """A teacher whose ONNX session is built only when a view must be labelled: a cached pool needs just
    its key, and building the 19.5 M-parameter session costs seconds per run."""

    def __init__(self, kind: str, level: str):
        self.kind, self.level, self._teacher = kind, level, None

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.level}"

    def __getattr__(self, name):   # bands, run, ...: the real teacher, loaded once
        if name.startswith("_"):
            raise AttributeError(name)
        if self._teacher is None:
            self._teacher = load_teacher(self.kind, self.level)
            if self._teacher.key != self.key:
                raise RuntimeError(f"teacher key {self._teacher.key!r} != {self.key!r}: the pool cache would mix teachers")
        return getattr(self._teacher, name)


def build_transfer_set(cfg: dict, log=print) -> dict:
    """The cached real-view pool (ground/transfer.py) with its index ranges: train / candidates / probe."""
    from .transfer import build_pool

    teachers = [LazyTeacher(t["kind"], t.get("level", "l1c")) for t in cfg["teachers"]]
    pool = build_pool(cfg["pool"], teachers, log=log)
    d = cfg["data"]
    sup = build_pool({**cfg["pool"], **cfg["supplement"]}, teachers, log=log) if cfg.get("supplement") else None
    n_train, n_cand, n_probe = int(d["train_views"]), int(d.get("candidate_views", 0)), int(d.get("probe_views", 0))
    if n_train + n_cand + n_probe > len(pool["X"]):
        raise ConfigError(f"data: train_views + candidate_views + probe_views = {n_train + n_cand + n_probe} "
                          f"> pool.views = {len(pool['X'])}")
    keys = {t["name"]: t["kind"] + "_" + t.get("level", "l1c") for t in cfg["teachers"]}
    ts = {"X": pool["X"], "Y": pool["Y"], "swir": pool["swir"], "src": pool.get("src"), "key": pool["key"], "meta": pool["meta"],
          "train": np.arange(n_train), "candidates": np.arange(n_train, n_train + n_cand),
          "probe": np.arange(n_train + n_cand, n_train + n_cand + n_probe),
          "t_probs": {n: pool["t_probs"][k] for n, k in keys.items()},
          "t_feats": {n: pool["t_feats"][k] for n, k in keys.items()}}
    if sup is not None:  # appended after the pool; every supplement view is a training view
        n = len(pool["X"])
        ts["X"], ts["Y"] = np.concatenate([pool["X"], sup["X"]]), np.concatenate([pool["Y"], sup["Y"]])
        ts["swir"] = np.concatenate([pool["swir"], sup["swir"]])
        for part in ("t_probs", "t_feats"):
            ts[part] = {nm: np.concatenate([ts[part][nm], sup[part][k]]) for nm, k in keys.items()}
        ts["train"] = np.concatenate([ts["train"], np.arange(n, n + len(sup["X"]))])
        ts["key"] = f"{pool['key']}+{sup['key']}"
        ts["meta"] = {**pool["meta"], "supplement": {k: v for k, v in sup["meta"].items() if k != "kinds"}}
    ts["labelled"] = np.array([(ts["Y"][i] != L.IGNORE).any() for i in range(len(ts["X"]))])
    return ts


# ----------------------------------------------------------------------------------- model wrapper
class KDModel(nn.Module):
    """Student plus the 1x1 SSLKD adapters (dropped at export)."""

    def __init__(self, spec: StudentSpec, teachers: list[str]):
        super().__init__()
        self.student = build_student(spec)
        self.feature_pool = max(1, 8 // spec.stem_stride)  # student grid -> the teacher feature grid (1/8)
        self.adapters = nn.ModuleDict({t: nn.Conv2d(spec.widths[0], spec.feature_channels, 1) for t in teachers})

    def forward(self, x):
        logits, feat = self.student.forward_with_features(x)
        pooled = nn.functional.avg_pool2d(feat, self.feature_pool)
        return logits, feat, {t: a(pooled) for t, a in self.adapters.items()}

    def native_logits(self, feat):
        """The head's logits at the student's own 1/stem_stride grid (before the fixed upsampling)."""
        return self.student.head(feat)


def kd_view(batch: dict, stride: int) -> dict:
    """The batch as the KD terms see it: at the student's native grid. Teacher probabilities are
    averaged over each stride x stride cell, labels sampled at cell centres. Distilling where the
    student decides (its upsampling is fixed) costs 1/stride² of full-resolution KD."""
    c = stride // 2
    return {"labels": batch["labels"][:, c::stride, c::stride],
            "t_probs": {t: nn.functional.avg_pool2d(p, stride) for t, p in batch["t_probs"].items()},
            "t_feats": batch["t_feats"]}


def _crop_window(rng, crop: int | None, full: int) -> tuple[int, int, int]:
    """(y0, x0, side) of one random crop on the 8-px grid (teacher features live at 1/8); the whole view
    when crop is None or not smaller than the view."""
    if not crop or crop >= full:
        return 0, 0, full
    y0, x0 = (int(rng.integers(0, (full - crop) // 8 + 1)) * 8 for _ in range(2))
    return y0, x0, crop


def _geometry(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """rot90 by k and an optional horizontal flip of a (..., H, W) array (a view, no copy)."""
    a = np.rot90(a, k, axes=(-2, -1))
    return a[..., ::-1] if flip else a


def needed_teacher_arrays(terms: list[dict]) -> tuple[bool, bool]:
    """(probabilities, features): which cached teacher outputs the loss terms read. A labels-only run
    reads neither, a probability-KD run no features: batch assembly skips what no term uses."""
    types = {t["type"] for t in terms}
    return bool(types - {"ce_labels"} - {"sslkd_feature"}), "sslkd_feature" in types


def _batch(ts: dict, idx, spec: StudentSpec, rng, augment=True, optional_dropout: float = 0.0,
           crop: int | None = None, needs: tuple[bool, bool] = (True, True), downsample: int = 1) -> dict:
    """Views idx as one training batch in model-input order, built crop-first: the crop window and the
    flip/rot90 are drawn per view, then only the window is read from the (memory-mapped, float16) pool and
    turned straight into one preallocated batch buffer per array (float conversion once per batch, in torch,
    where the model's bands are the pool's first channels; per view otherwise);
    teacher arrays that no loss term reads (`needs` = (probabilities, features), see needed_teacher_arrays)
    are not read at all. The same window and turn apply to the view, its labels and its cached teacher
    outputs, so the teacher labels exactly the view the student sees. x comes out channels_last (NHWC
    storage): the layout the convolutions run fastest in on CPU.

    A view whose source has the optional bands (SWIR) loses them with probability optional_dropout
    (planes 0, presence flag 0), so one student learns both the with-SWIR and the VNIR-only input.
    downsample 2: the view, its teacher probabilities and (by majority of each 2x2 cell, unlabelled if
    none) its labels are averaged to the half-resolution grid a half-resolution decision model runs at."""
    need_probs, need_feats = needs
    idx = list(idx)
    n, full = len(idx), ts["X"].shape[1]
    windows = [_crop_window(rng, crop, full) for _ in idx]
    side = windows[0][2]
    turns = [(int(rng.integers(4)), bool(rng.integers(2))) if augment else (0, False) for _ in idx]
    direct = not spec.optional_bands and [SYNTH_BANDS.index(b) for b in spec.bands] == list(range(len(spec.bands)))
    xb = np.empty((n, side, side, spec.in_channels), np.float16 if direct else np.float32)
    yb = np.empty((n, side, side), np.uint8)
    pb = {t: np.empty((n, 3, side, side), np.uint8) for t in ts["t_probs"]} if need_probs else {}
    fb = {t: np.empty((n, 64, side // 8, side // 8), np.float16) for t in ts["t_feats"]} if need_feats else {}
    for j, (i, (y0, x0, _), (k, flip)) in enumerate(zip(idx, windows, turns)):
        win = ts["X"][i, y0:y0 + side, x0:x0 + side]
        if direct:   # the model's bands are the pool's first channels: no conversion per view
            xb[j] = _geometry(win[..., :spec.in_channels].transpose(2, 0, 1), k, flip).transpose(1, 2, 0)
        else:
            present = bool(ts["swir"][i]) and not (optional_dropout > 0 and rng is not None
                                                   and rng.random() < optional_dropout)
            x = spec.model_input(np.asarray(win, np.float32), SYNTH_BANDS, present)
            xb[j] = _geometry(x.transpose(2, 0, 1), k, flip).transpose(1, 2, 0)
        yb[j] = _geometry(ts["Y"][i, y0:y0 + side, x0:x0 + side], k, flip)
        for t in pb:
            pb[t][j] = _geometry(ts["t_probs"][t][i, :, y0:y0 + side, x0:x0 + side], k, flip)
        for t in fb:
            fb[t][j] = _geometry(ts["t_feats"][t][i, :, y0 // 8:(y0 + side) // 8, x0 // 8:(x0 + side) // 8], k, flip)
    x = torch.from_numpy(xb).permute(0, 3, 1, 2).float()          # NHWC storage = channels_last
    labels = torch.from_numpy(yb).long()
    t_probs = {t: torch.from_numpy(v).float().mul_(1.0 / 255.0) for t, v in pb.items()}
    t_feats = {t: torch.from_numpy(v).float() for t, v in fb.items()}
    if downsample > 1:
        x = nn.functional.avg_pool2d(x, downsample)
        t_probs = {t: nn.functional.avg_pool2d(p, downsample) for t, p in t_probs.items()}
        labels = _majority_labels(labels, downsample, len(spec.classes))
    return {"x": x.contiguous(memory_format=torch.channels_last), "labels": labels, "t_probs": t_probs, "t_feats": t_feats}


TIE_ORDER = (1, 2, 0)   # class codes clear 0, cloud 1, shadow 2: a tied cell goes to cloud, then shadow, then clear


def _majority_labels(labels: torch.Tensor, f: int, n_classes: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, H/f, W/f): the most frequent labelled class of each f x f cell, ties broken in
    TIE_ORDER (cloud first: a half-resolution label never leans clear), L.IGNORE where no pixel of the cell is
    labelled."""
    order = [c for c in TIE_ORDER if c < n_classes] + [c for c in range(n_classes) if c not in TIE_ORDER]
    counts = nn.functional.avg_pool2d(torch.stack([(labels == c).float() for c in order], 1), f) * (f * f)
    out = torch.tensor(order, dtype=torch.long)[counts.argmax(1)]   # argmax takes the first of equal counts
    return torch.where(counts.sum(1) > 0, out, torch.full_like(out, L.IGNORE))


def _fingerprint(cfg: dict, terms: list[dict], data_key: str, train_idx, init: str | None) -> str:
    """What determines a run's weights: the config (but its path, calibration and mining), the loss
    terms, the view pool's key (which covers the view code), the views trained on, the starting weights
    and the training code itself (TRAIN_CODE)."""
    body = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("losses", "baseline", "calibration", "mining")}
    from .transfer import code_digest

    idx_digest = hashlib.sha256(np.asarray(train_idx, np.int64).tobytes()).hexdigest()[:16]
    code = code_digest(*TRAIN_CODE)   # a code change (loss, sampler, student) never reuses an old student.pt
    return hashlib.sha256(json.dumps([body, terms, data_key, idx_digest, init, code], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sample(cfg: dict, ts: dict, train_idx: np.ndarray, step: int, batch: int,
            hard: np.ndarray | None = None) -> np.ndarray:
    """Batch indices as a function of (seed, step) (and the current hard views): identical on resume and
    across ranks. Shares of every batch: human-labelled views (data.labelled_batch_share), views ts["bright"]
    marks (data.bright_view_share: bright clear surfaces, the rare views a gate must never discard), the
    current hard views (data.hard_view_share: where student and teacher disagree most, see hard_views); the
    rest is drawn from all training views."""
    rng = np.random.default_rng([cfg["seed"], step])
    d = cfg["data"]
    lab = train_idx[ts["labelled"][train_idx]]
    n_lab = int(round(batch * d.get("labelled_batch_share", 0.5))) if len(lab) else 0
    parts = [rng.choice(lab, n_lab, replace=n_lab > len(lab))]
    left = batch - n_lab
    for key, pool in (("bright_view_share", train_idx[ts["bright"][train_idx]] if "bright" in ts else train_idx[:0]),
                      ("hard_view_share", train_idx[:0] if hard is None else np.asarray(hard, np.int64))):
        n = min(left, int(round(batch * float(d.get(key, 0.0))))) if len(pool) else 0
        parts.append(rng.choice(pool, n, replace=n > len(pool)))
        left -= n
    parts.append(rng.choice(train_idx, left, replace=left > len(train_idx)))
    return np.concatenate(parts).astype(np.int64)


def hard_views(model: nn.Module, cfg: dict, ts: dict, train_idx: np.ndarray, step: int) -> np.ndarray:
    """Hard-view mining, re-drawn each round (issue 27 probe b): data.hard_view_candidates random training views
    (seeded by the step), scored by student-teacher disagreement on the whole view (`disagreement`); the top
    data.hard_view_keep share of them. The teacher's label is the cached one of that exact view."""
    d = cfg["data"]
    rng = np.random.default_rng([cfg["seed"], step, 31])
    cand = rng.choice(train_idx, min(len(train_idx), int(d.get("hard_view_candidates", 256))), replace=False)
    was = model.training
    dis = disagreement(model, cfg, ts, cand)
    model.train(was)
    keep = max(1, int(round(len(cand) * float(d.get("hard_view_keep", 0.25)))))
    return np.sort(cand[np.argsort(-dis, kind="stable")[:keep]])


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not every platform has affinity
        return os.cpu_count() or 1


def training_threads(setting="auto", load: float | None = None, cores: int | None = None) -> int:
    """torch threads for a training run. An int is taken as is; "auto" decides from the load: every
    usable core when the machine is idle, one thread when anything else keeps a core busy (measured:
    two threads on a shared 2-core machine made steps 3-15x slower, never faster)."""
    if setting != "auto":
        if not isinstance(setting, int) or setting < 1:
            raise ConfigError(f"train.threads={setting!r}: give a positive integer or 'auto'")
        return setting
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and load is None and cores is None:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))   # the caller's explicit choice wins over the load
    cores = usable_cores() if cores is None else cores
    load = os.getloadavg()[0] if load is None else load
    idle = cores - load
    return max(1, cores) if idle >= cores - 0.5 else 1


def input_downsample(cfg: dict) -> int:
    """The input grid a student trains and decides at: 1 = full resolution, 2 = 2x2-averaged (the
    half-resolution decision path); `student.input_downsample` in the experiment config."""
    return int(cfg["student"].get("input_downsample", 1))


def optional_dropout(cfg: dict) -> float:
    """Share of SWIR-carrying training views shown without their optional bands (data.optional_band_dropout)."""
    return float(cfg["data"].get("optional_band_dropout", 0.0))


@torch.no_grad()
def precise_bn(model: nn.Module, cfg: dict, ts: dict, train_idx: np.ndarray, spec: StudentSpec, n_batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics as a plain average over n_batches transfer
    batches with the final weights (bright scenes are fragile under the EMA of the last few hundred
    steps; the exported graphs fold exactly these statistics)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or n_batches <= 0:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for b in range(n_batches):
        idx = _sample({**cfg, "seed": cfg["seed"] + 7919}, ts, train_idx, b, cfg["train"]["batch"])
        model(_batch(ts, idx, spec, np.random.default_rng([cfg["seed"], b, 7919]),
                     optional_dropout=optional_dropout(cfg), needs=(False, False),
                     downsample=input_downsample(cfg))["x"])
    for m in bns:
        m.momentum = 0.1
    model.eval()


def train_step(model: "KDModel", net: nn.Module, opt, sched, batch: dict, terms: list[dict], spec: StudentSpec):
    """One optimizer step on one batch -> (total loss tensor, per-term values, term statistics). Labels are
    scored at full resolution, teacher terms at the student's native grid (kd_view)."""
    model.train()
    logits, feat, adapted = net(batch["x"])
    out = {"logits": logits, "feat": feat, "adapted": adapted}
    out_kd = {"logits": model.native_logits(feat), "feat": feat, "adapted": adapted}
    batch_kd = kd_view(batch, spec.stem_stride)
    total = 0.0
    parts, stats = {}, {}
    for term in terms:
        full = term["type"] == "ce_labels"
        v = L.LOSS_TERMS[term["type"]](out if full else out_kd, batch if full else batch_kd, term, stats)
        parts[L.term_name(term)] = float(v.detach())
        total = total + term.get("weight", 1.0) * v
    total = total + 0.0 * sum(p.sum() for p in adapted.values())  # keep DDP's graph complete
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    sched.step()
    return total, parts, stats


def train(cfg: dict, ts: dict, run_dir: Path, terms: list[dict], label: str, log=print,
          train_idx: np.ndarray | None = None, steps: int | None = None, lr: float | None = None,
          init: str | Path | None = None) -> Path:
    """Train one student with the given loss terms on ts[train_idx]; resumable; returns the path of the
    final weights. `init` starts from another run's weights (mining rounds)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    spec = StudentSpec.from_dict(cfg["student"])
    if spec.input_downsample > 1 and any(t["type"] == "sslkd_feature" for t in terms):
        raise ConfigError("student.input_downsample > 1 with an sslkd_feature term: the cached teacher features are "
                          "on the full-resolution grid; drop the feature term or train at input_downsample 1")
    tr = cfg["train"]
    steps = int(steps or tr["steps"])
    lr = float(lr or tr["lr"])
    train_idx = np.asarray(ts["train"] if train_idx is None else train_idx)
    seed_everything(cfg["seed"])
    teachers = [t["name"] for t in cfg["teachers"]]
    model = KDModel(spec, teachers)
    if init is not None:
        model.student.load_state_dict(torch.load(init, weights_only=False)["state_dict"])
    model = model.to(memory_format=torch.channels_last)   # NHWC convolutions: ~1.3x per step on CPU
    needs = needed_teacher_arrays(terms)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=tr.get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=min(0.3, max(0.1, 2.5 / steps)))
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    final = run_dir / "student.pt"
    init_fp = torch.load(init, weights_only=False).get("fingerprint") if init is not None else None
    fingerprint = _fingerprint({**cfg, "train": {**tr, "steps": steps, "lr": lr}}, terms, ts.get("key", ""), train_idx, init_fp)
    if final.exists() and torch.load(final, weights_only=False).get("fingerprint") == fingerprint:
        log(f"[{label}] {final} is up to date with this config; reusing it")
        return final
    step, state = 0, {}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{ckpt} was written by a different experiment config; delete {run_dir} "
                              "or pass another --out to start fresh")
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        step = state["step"]
        log(f"[{label}] resuming from step {step} ({ckpt})")
    threads = 1 if world > 1 else training_threads(tr.get("threads", "auto"))   # DDP: one thread per rank
    if world == 1 and state.get("threads") is not None:
        threads = state["threads"]   # a resumed run keeps its thread count: the same arithmetic throughout
    torch.set_num_threads(threads)
    log(f"[{label}] {threads} torch thread(s) (train.threads={tr.get('threads', 'auto')}, "
        f"load average {os.getloadavg()[0]:.1f} on {usable_cores()} core(s))")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    mining_share = float(cfg["data"].get("hard_view_share", 0.0))
    mining_every = int(cfg["data"].get("hard_view_every", 100))
    hard = state.get("hard_views")   # a resumed run keeps the hard views it was training on
    per_rank = tr["batch"] // world

    def save():
        if rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "spec": spec.to_dict(), "fingerprint": fingerprint, "threads": threads,
                        "hard_views": hard}, tmp)
            tmp.replace(ckpt)

    interrupted = {"flag": False}

    def on_term(*_):
        interrupted["flag"] = True

    old = signal.signal(signal.SIGTERM, on_term) if rank == 0 else None
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=step, desc=label, disable=rank != 0, dynamic_ncols=True, mininterval=5)
    history = []
    t0 = time.time()
    try:
        while step < steps:
            if mining_share and (hard is None or step % mining_every == 0):
                hard = hard_views(model.student, cfg, ts, train_idx, step)
            idx = _sample(cfg, ts, train_idx, step, tr["batch"], hard)[rank * per_rank:(rank + 1) * per_rank]
            batch = _batch(ts, idx, spec, np.random.default_rng([cfg["seed"], step, rank]),
                           optional_dropout=optional_dropout(cfg), crop=tr.get("crop"), needs=needs,
                           downsample=input_downsample(cfg))
            total, parts, stats = train_step(model, net, opt, sched, batch, terms, spec)
            step += 1
            bar.update(1)
            if step % 50 == 0:
                history.append({"step": step, "loss": float(total.detach()), **parts, **stats})
            if step % tr.get("ckpt_every", 200) == 0 or interrupted["flag"]:
                save()
            if interrupted["flag"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        save()
        bar.close()
        log(f"[{label}] interrupted at step {step}; checkpoint saved, rerun the same command to resume")
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    bar.close()
    save()
    precise_bn(model.student, cfg, ts, train_idx, spec, int(tr.get("precise_bn_batches", 0)))
    if world > 1:  # DDP invariant: every rank ends with the same weights
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
            (run_dir / "ddp_consistency.json").write_text(json.dumps({"world_size": world, "max_abs_param_diff": diff}))
    if rank == 0:
        torch.save({"spec": spec.to_dict(), "state_dict": model.student.state_dict(), "steps": step,
                    "loss_terms": terms, "seconds": time.time() - t0, "fingerprint": fingerprint,
                    "train_views": len(train_idx), "pool": ts.get("key", "")}, final)
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    if world > 1:
        dist.barrier()  # the other ranks read final (mining rounds) only once rank 0 has written it
    return final


def load_student(path: str | Path):
    state = torch.load(path, weights_only=False)
    spec = StudentSpec.from_dict(state["spec"])
    model = build_student(spec)
    model.load_state_dict(state["state_dict"])
    return spec, model.eval()


@torch.no_grad()
def disagreement(model, cfg: dict, ts: dict, idx: np.ndarray, batch: int = 16) -> np.ndarray:
    """Per view: share of pixels where the student's cloud call differs from the teachers' confidence-
    weighted cloud call (the target every KD term distils)."""
    spec = model.spec
    names = [t["name"] for t in cfg["teachers"]]
    out = np.empty(len(idx), np.float64)
    model.eval()
    for s in range(0, len(idx), batch):
        ii = idx[s:s + batch]
        b = _batch(ts, ii, spec, None, augment=False, needs=(True, False), downsample=input_downsample(cfg))
        target, _ = L.confidence_weighted_target(b, names)
        pred = model(b["x"]).argmax(1) == 1
        out[s:s + len(ii)] = (pred != (target.argmax(1) == 1)).float().mean((1, 2)).numpy()
    return out


def run_experiment(cfg: dict, out_root: Path | None = None, log=print) -> dict:
    """KD student (base run + hard-example mining rounds) and, beside it, the no-KD baseline with the
    same total steps on the same views."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
    out_root = out_root or REPO / "runs"
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()  # rank 0 fills the teacher cache first; the others then read it
    ts = build_transfer_set(cfg, log=log)
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()
    exp = cfg["experiment"]
    root = out_root / exp
    kd = train(cfg, ts, root / "kd", cfg["losses"], f"{exp}:kd", log)
    mining = cfg.get("mining", {})
    rounds = int(mining.get("rounds", 0)) if len(ts["candidates"]) else 0
    train_idx = ts["train"]
    report = []
    if rounds and len(ts["probe"]):
        report.append({"round": 0, "train_views": int(len(train_idx)),
                       "probe_disagreement": float(disagreement(load_student(kd)[1], cfg, ts, ts["probe"]).mean())})
    for r in range(1, rounds + 1):
        spec_model = load_student(kd)[1]
        pool = np.setdiff1d(ts["candidates"], train_idx)
        dis = disagreement(spec_model, cfg, ts, pool)
        worst = pool[np.argsort(-dis, kind="stable")[:int(mining.get("add_views", 300))]]
        train_idx = np.concatenate([train_idx, np.sort(worst)])
        kd = train(cfg, ts, root / f"kd_round{r}", cfg["losses"], f"{exp}:kd_round{r}", log, train_idx=train_idx,
                   steps=int(mining.get("steps", 1000)), lr=cfg["train"]["lr"] * float(mining.get("lr_scale", 0.5)), init=kd)
        entry = {"round": r, "train_views": int(len(train_idx)), "added": int(len(worst)),
                 "added_mean_disagreement": float(np.sort(dis)[::-1][:len(worst)].mean()),
                 "candidate_mean_disagreement": float(dis.mean())}
        if len(ts["probe"]):
            entry["probe_disagreement"] = float(disagreement(load_student(kd)[1], cfg, ts, ts["probe"]).mean())
        report.append(entry)
        log(f"[{exp}] mining round {r}: {entry}")
    if report and (not dist.is_initialized() or dist.get_rank() == 0):
        (root / "mining.json").write_text(json.dumps(report, indent=1))
    results = {"kd": str(kd), "mining": report}
    if not cfg.get("skip_baseline", False):
        base_terms = cfg.get("baseline", {}).get("losses", [{"type": "ce_labels", "weight": 1.0}])
        total = int(cfg["train"]["steps"]) + rounds * int(mining.get("steps", 1000))
        results["baseline"] = str(train(cfg, ts, root / "baseline", base_terms, f"{exp}:baseline", log, steps=total))
    if dist.is_initialized():
        dist.barrier()
    return results
