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
from .sceneio import SHARED_REAL, load_npz, real_scene_paths
from .student import StudentSpec, build_student
from .synth import SYNTH_BANDS, make_set
from .teachers import TEACHER_TILE, load_teacher, run_teachers_cached

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CLOUDGATE_CACHE", Path.home() / ".cache" / "cloudgate"))
_REQUIRED = ("experiment", "seed", "student", "teachers", "data", "train", "losses")


class ConfigError(ValueError):
    pass


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
def _real_tiles(paths, tile: int, stride: int) -> np.ndarray:
    tiles = []
    for p in paths:
        sc = load_npz(p)
        if not all(b in sc.band_names for b in SYNTH_BANDS):
            continue
        img = sc.reflectance(SYNTH_BANDS)
        h, w = img.shape[:2]
        if h < tile or w < tile:
            img = np.pad(img, ((0, max(0, tile - h)), (0, max(0, tile - w)), (0, 0)), mode="symmetric")
            h, w = img.shape[:2]
        ys = list(range(0, h - tile + 1, stride)) or [0]
        xs = list(range(0, w - tile + 1, stride)) or [0]
        if ys[-1] != h - tile:
            ys.append(h - tile)
        if xs[-1] != w - tile:
            xs.append(w - tile)
        tiles += [img[y:y + tile, x:x + tile] for y in ys for x in xs]
    return np.stack(tiles).astype(np.float32) if tiles else np.zeros((0, tile, tile, 6), np.float32)


def _radiometric_variants(tiles: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k extra copies of each real tile with a scene gain (0.8-1.2, sun elevation / calibration),
    per-band gains (+-5 %, sensor differences) and, on some, 8-bit sensor saturation; the teachers
    label every variant, so the student sees real texture under varied radiometry with matching targets."""
    if k <= 0 or len(tiles) == 0:
        return tiles
    from .synth import SATURATION_P, saturation_levels

    rng = np.random.default_rng([seed, 4242])
    out = [tiles]
    for _ in range(k):
        g = rng.uniform(0.8, 1.2, (len(tiles), 1, 1, 1)) * rng.uniform(0.95, 1.05, (len(tiles), 1, 1, tiles.shape[-1]))
        v = (tiles * g).astype(np.float32)
        for i in range(len(v)):                    # 8-bit sensor saturation, as in the synthetic scenes
            if rng.random() < SATURATION_P:
                np.minimum(v[i], saturation_levels(rng), out=v[i])
        out.append(v)
    return np.concatenate(out)


def _clear_backgrounds(paths) -> list[np.ndarray]:
    out = []
    for p in paths:
        sc = load_npz(p)
        if sc.tag == "clear" and all(b in sc.band_names for b in SYNTH_BANDS):
            out.append(sc.reflectance(SYNTH_BANDS))
    return out


def build_transfer_set(cfg: dict, log=print) -> dict:
    """Synthetic labelled tiles + real unlabelled tiles, with cached teacher outputs."""
    d = cfg["data"]
    tile = d.get("tile", TEACHER_TILE)
    real_root = Path(d.get("real_root", SHARED_REAL))
    paths = real_scene_paths(real_root)
    exclude = set(d.get("exclude_scenes", []))
    unl = [p for p in paths if p.stem not in exclude and (not load_npz(p).labelled or d.get("use_labelled_imagery", False))]
    X_syn, Y_syn, kinds = make_set(d["synthetic_tiles"], seed=d.get("seed", 0), size=tile,
                                   backgrounds=_clear_backgrounds(paths), real_background_share=d.get("real_background_share", 0.25))
    unl = [p for p in unl if all(b in load_npz(p).band_names for b in SYNTH_BANDS)]
    X_real = _real_tiles(unl, tile, d.get("real_stride", tile // 2))
    X_real = _radiometric_variants(X_real, d.get("real_augment", 0), d.get("seed", 0))
    X = np.concatenate([X_syn, X_real])
    Y = np.concatenate([Y_syn, np.full((len(X_real), tile, tile), L.IGNORE, np.uint8)])
    log(f"transfer set: {len(X_syn)} synthetic labelled + {len(X_real)} real unlabelled tiles (with radiometric variants) "
        f"({', '.join(p.stem for p in unl)})")
    key = hashlib.sha256(X.tobytes()[:: 997]).hexdigest()[:16] + f"_{len(X)}"
    teachers = [load_teacher(t["kind"], t.get("level", "l1c")) for t in cfg["teachers"]]
    from tqdm import tqdm

    with tqdm(total=len(X) * len(teachers), desc="teacher outputs", unit="tile", disable=len(X) < 8) as bar:
        cached = run_teachers_cached(X, CACHE / f"teachers_{key}.npz", teachers, progress=bar.update)
    tnames = {t["name"]: t["kind"] + "_" + t.get("level", "l1c") for t in cfg["teachers"]}
    return {"X": X, "Y": Y, "kinds": kinds + ["real"] * len(X_real), "n_syn": len(X_syn), "key": key,
            "t_probs": {n: cached[f"{k}_probs"] for n, k in tnames.items()},
            "t_feats": {n: cached[f"{k}_feats"] for n, k in tnames.items()}}


# ----------------------------------------------------------------------------------- model wrapper
class KDModel(nn.Module):
    """Student plus the 1x1 SSLKD adapters (dropped at export)."""

    def __init__(self, spec: StudentSpec, teachers: list[str]):
        super().__init__()
        self.student = build_student(spec)
        self.adapters = nn.ModuleDict({t: nn.Conv2d(spec.widths[0], spec.feature_channels, 1) for t in teachers})

    def forward(self, x):
        logits, feat = self.student.forward_with_features(x)
        pooled = nn.functional.avg_pool2d(feat, 2)
        return logits, feat, {t: a(pooled) for t, a in self.adapters.items()}


def _augment(rng: np.random.Generator, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Same random flip / rot90 on every (…, H, W) array of one sample."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


def _batch(ts: dict, idx, band_idx, rng, augment=True) -> dict:
    xs, ys, tps, tfs = [], [], {t: [] for t in ts["t_probs"]}, {t: [] for t in ts["t_feats"]}
    for i in idx:
        arrs = [ts["X"][i].transpose(2, 0, 1)[band_idx], ts["Y"][i]]
        arrs += [ts["t_probs"][t][i].astype(np.float32) for t in tps] + [ts["t_feats"][t][i].astype(np.float32) for t in tfs]
        if augment:
            arrs = _augment(rng, arrs)
        xs.append(arrs[0]), ys.append(arrs[1])
        for j, t in enumerate(tps):
            tps[t].append(arrs[2 + j])
        for j, t in enumerate(tfs):
            tfs[t].append(arrs[2 + len(tps) + j])
    labels = torch.from_numpy(np.stack(ys)).long()
    return {"x": torch.from_numpy(np.stack(xs)), "labels": labels,
            "t_probs": {t: torch.from_numpy(np.stack(v)) for t, v in tps.items()},
            "t_feats": {t: torch.from_numpy(np.stack(v)) for t, v in tfs.items()}}


def _fingerprint(cfg: dict, terms: list[dict], data_key: str) -> str:
    """What determines a run's weights: the config (but its path), the loss terms and the transfer
    set's content hash (so a generator change invalidates old runs). Export-time calibration is not
    training, so it stays out."""
    body = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("losses", "baseline", "calibration")}
    return hashlib.sha256(json.dumps([body, terms, data_key], sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: dict, ts: dict, run_dir: Path, terms: list[dict], label: str, log=print) -> Path:
    """Train one student with the given loss terms; resumable; returns the path of the final weights."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    spec = StudentSpec.from_dict(cfg["student"])
    tr = cfg["train"]
    seed_everything(cfg["seed"])
    teachers = [t["name"] for t in cfg["teachers"]]
    model = KDModel(spec, teachers)
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], weight_decay=tr.get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tr["lr"], total_steps=tr["steps"],
                                                pct_start=min(0.3, max(0.1, 2.5 / tr["steps"])))
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    final = run_dir / "student.pt"
    fingerprint = _fingerprint(cfg, terms, ts.get("key", ""))
    if final.exists() and torch.load(final, weights_only=False).get("fingerprint") == fingerprint:
        log(f"[{label}] {final} is up to date with this config; reusing it")
        return final
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{ckpt} was written by a different experiment config; delete {run_dir} "
                              "or pass another --out to start fresh")
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        step = state["step"]
        log(f"[{label}] resuming from step {step} ({ckpt})")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    band_idx = [SYNTH_BANDS.index(b) for b in spec.bands]
    n = len(ts["X"])
    use_real = any(t["type"] != "ce_labels" for t in terms)
    syn_pool, real_pool = np.arange(ts["n_syn"]), np.arange(ts["n_syn"], n)
    # Real unlabelled tiles are few; give them a fixed share of every KD batch.
    n_real = int(round(tr["batch"] * cfg["data"].get("real_batch_share", 0.25))) if use_real and len(real_pool) else 0
    per_rank = tr["batch"] // world

    def save():
        if rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "spec": spec.to_dict(), "fingerprint": fingerprint}, tmp)
            tmp.replace(ckpt)

    interrupted = {"flag": False}

    def on_term(*_):
        interrupted["flag"] = True

    old = signal.signal(signal.SIGTERM, on_term) if rank == 0 else None
    from tqdm import tqdm

    bar = tqdm(total=tr["steps"], initial=step, desc=label, disable=rank != 0, dynamic_ncols=True)
    history = []
    t0 = time.time()
    try:
        while step < tr["steps"]:
            # The sampler is a function of (seed, step): identical on resume and across ranks, each
            # rank taking its own slice (the role DistributedSampler plays for map-style datasets).
            rng = np.random.default_rng([cfg["seed"], step])
            idx = np.concatenate([rng.choice(syn_pool, tr["batch"] - n_real, replace=False),
                                  rng.choice(real_pool, n_real, replace=n_real > len(real_pool))])
            idx = idx[rank * per_rank:(rank + 1) * per_rank]
            batch = _batch(ts, idx, band_idx, np.random.default_rng([cfg["seed"], step, rank]))
            logits, feat, adapted = net(batch["x"])
            out = {"logits": logits, "feat": feat, "adapted": adapted}
            total = 0.0
            parts = {}
            for term in terms:
                v = L.LOSS_TERMS[term["type"]](out, batch, term)
                parts[term["type"]] = float(v.detach())
                total = total + term.get("weight", 1.0) * v
            total = total + 0.0 * sum(p.sum() for p in adapted.values())  # keep DDP's graph complete
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(total):.4f}")
            if step % 50 == 0:
                history.append({"step": step, "loss": float(total), **parts, **batch.get("_stats", {})})
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
    if world > 1:  # DDP invariant: every rank ends with the same weights
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
            (run_dir / "ddp_consistency.json").write_text(json.dumps({"world_size": world, "max_abs_param_diff": diff}))
    if rank == 0:
        torch.save({"spec": spec.to_dict(), "state_dict": model.student.state_dict(), "steps": step,
                    "loss_terms": terms, "seconds": time.time() - t0, "fingerprint": fingerprint}, final)
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    return final


def load_student(path: str | Path):
    state = torch.load(path, weights_only=False)
    spec = StudentSpec.from_dict(state["spec"])
    model = build_student(spec)
    model.load_state_dict(state["state_dict"])
    return spec, model.eval()


def run_experiment(cfg: dict, out_root: Path | None = None, log=print) -> dict:
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
    kd = train(cfg, ts, out_root / exp / "kd", cfg["losses"], f"{exp}:kd", log)
    results = {"kd": str(kd)}
    if not cfg.get("skip_baseline", False):
        base_terms = cfg.get("baseline", {}).get("losses", [{"type": "ce_labels", "weight": 1.0}])
        results["baseline"] = str(train(cfg, ts, out_root / exp / "baseline", base_terms, f"{exp}:baseline", log))
    if dist.is_initialized():
        dist.barrier()
    return results
