"""Training throughput, side by side in one run (issue 23 item 2): `python -m ground bench-train`.

Two loops over the same cached pool, the same loss terms and the same train_step, timed in turn:
  legacy   the batch assembly of v6 (ground/distill.py before the crop-first rewrite, kept here verbatim as the
           reference): whole 256² views read, converted and turned before cropping, every teacher array read
           whether a loss term uses it or not; batch 8 of 128² crops, one torch thread, NCHW
  current  ground.distill._batch (crop first, only the arrays the terms read), the recipe's batch (32 of 128² crops:
           4x the pixels per step), train.threads (auto: from the load), channels_last
Reported: training pixels per second (model-input pixels through forward + backward) and the ratio. Every
loop warms up first; the two alternate in rounds so a change in the machine's load hits both.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.stages import host_cpu
from hil.synth import SYNTH_BANDS

from . import distill as D


def legacy_batch(ts: dict, idx, spec, rng, crop: int | None = None) -> dict:
    """v6's batch assembly, verbatim in behaviour (ground/distill.py at 13754f4)."""
    xs, ys, tps, tfs = [], [], {t: [] for t in ts["t_probs"]}, {t: [] for t in ts["t_feats"]}
    for i in idx:
        x = spec.model_input(np.asarray(ts["X"][i], np.float32), SYNTH_BANDS, bool(ts["swir"][i]))
        arrs = [x.transpose(2, 0, 1), ts["Y"][i]]
        arrs += [ts["t_probs"][t][i].astype(np.float32) / 255.0 for t in tps]
        arrs += [ts["t_feats"][t][i].astype(np.float32) for t in tfs]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        arrs = [np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1))[..., ::-1] if flip else np.rot90(a, k, axes=(-2, -1)))
                for a in arrs]
        full = arrs[0].shape[-1]
        if crop and crop < full:
            y0, x0 = (int(rng.integers(0, (full - crop) // 8 + 1)) * 8 for _ in range(2))
            arrs = [np.ascontiguousarray(a[..., y0 // (full // a.shape[-1]):(y0 + crop) // (full // a.shape[-1]),
                                           x0 // (full // a.shape[-1]):(x0 + crop) // (full // a.shape[-1])]) for a in arrs]
        xs.append(arrs[0]), ys.append(arrs[1])
        for j, t in enumerate(tps):
            tps[t].append(arrs[2 + j])
        for j, t in enumerate(tfs):
            tfs[t].append(arrs[2 + len(tps) + j])
    return {"x": torch.from_numpy(np.stack(xs)), "labels": torch.from_numpy(np.stack(ys)).long(),
            "t_probs": {t: torch.from_numpy(np.stack(v)) for t, v in tps.items()},
            "t_feats": {t: torch.from_numpy(np.stack(v)) for t, v in tfs.items()}}


class Loop:
    """One training configuration: model, optimizer and a batch builder; `run(n)` times n steps."""

    def __init__(self, name: str, cfg: dict, ts: dict, batch: int, crop: int, threads: int, channels_last: bool,
                 legacy: bool):
        self.name, self.cfg, self.ts, self.batch, self.crop = name, cfg, ts, batch, crop
        self.threads, self.legacy = threads, legacy
        self.spec = D.StudentSpec.from_dict(cfg["student"])
        torch.manual_seed(0)
        self.model = D.KDModel(self.spec, [t["name"] for t in cfg["teachers"]])
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda _: 1.0)
        self.needs = D.needed_teacher_arrays(cfg["losses"])
        self.step, self.seconds, self.pixels, self.batch_seconds, self.timed_steps = 0, 0.0, 0, 0.0, 0

    def run(self, n: int, record: bool = True) -> None:
        torch.set_num_threads(self.threads)
        idx_all = np.asarray(self.ts["train"])
        for _ in range(n):
            rng = np.random.default_rng([0, self.step])
            idx = rng.choice(idx_all, self.batch)
            t0 = time.perf_counter()
            if self.legacy:
                b = legacy_batch(self.ts, idx, self.spec, rng, self.crop)
            else:
                b = D._batch(self.ts, idx, self.spec, rng, crop=self.crop, needs=self.needs)
            t1 = time.perf_counter()
            D.train_step(self.model, self.model, self.opt, self.sched, b, self.cfg["losses"], self.spec)
            t2 = time.perf_counter()
            self.step += 1
            if record:
                self.timed_steps += 1
                self.seconds += t2 - t0
                self.batch_seconds += t1 - t0
                self.pixels += int(b["x"].shape[0] * b["x"].shape[2] * b["x"].shape[3])

    def result(self) -> dict:
        return {"loop": self.name, "batch": self.batch, "crop": self.crop, "threads": self.threads,
                "steps": self.step, "seconds": round(self.seconds, 2),
                "mpx_per_s": round(self.pixels / max(self.seconds, 1e-9) / 1e6, 3),
                "ms_per_step": round(1000 * self.seconds / max(1, self.timed_steps), 1),
                "batch_assembly_share": round(self.batch_seconds / max(self.seconds, 1e-9), 3)}


def bench_train(config: str | Path, rounds: int = 4, steps_per_round: int = 15, threads: int | str = "auto",
                out: Path | None = None, log=print) -> dict:
    """Legacy and current loops alternating for `rounds` rounds on the config's (cached) pool."""
    cfg = D.load_config(config)
    ts = D.build_transfer_set(cfg, log=log)
    crop = int(cfg["train"].get("crop") or 128)
    n_threads = D.training_threads(threads)
    load0 = os.getloadavg()[0]
    legacy = Loop("legacy (v6 loop)", cfg, ts, batch=8, crop=crop, threads=1, channels_last=False, legacy=True)
    # the current batch assembly at v6's batch and threads: separates the rewrite's effect from the larger batch
    current8 = Loop("current assembly, v6's batch 8", cfg, ts, batch=8, crop=crop, threads=1, channels_last=True,
                    legacy=False)
    current = Loop("current", cfg, ts, batch=int(cfg["train"]["batch"]), crop=crop, threads=n_threads,
                   channels_last=True, legacy=False)
    for loop in (legacy, current8, current):
        loop.run(3, record=False)       # warm-up: allocator, page cache of the pool
    for r in range(rounds):
        legacy.run(steps_per_round * 4)   # the same pixels per round: batch 8 takes 4x the steps of batch 32
        current8.run(steps_per_round * 4)
        current.run(max(1, steps_per_round * 4 * 8 // int(cfg["train"]["batch"])))
        log(f"round {r + 1}/{rounds}: legacy {legacy.result()['mpx_per_s']} Mpx/s, current at batch 8 "
            f"{current8.result()['mpx_per_s']}, current {current.result()['mpx_per_s']} Mpx/s")
    res = {"config": str(config), "pool": ts["key"], "loss_terms": [t.get("name", t["type"]) for t in cfg["losses"]],
           "cpu": host_cpu(), "cores": D.usable_cores(), "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "loops": [legacy.result(), current8.result(), current.result()]}
    res["speedup"] = round(res["loops"][2]["mpx_per_s"] / res["loops"][0]["mpx_per_s"], 2)
    res["speedup_same_batch"] = round(res["loops"][1]["mpx_per_s"] / res["loops"][0]["mpx_per_s"], 2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        lines = [f"# Training throughput, side by side (`python -m ground bench-train --config {config}`)", "",
                 f"Host: {res['cpu']}, {res['cores']} usable cores, load average {res['load_average'][0]} at start, "
                 f"{res['load_average'][1]} at end. Pool `{res['pool']}`, loss terms {res['loss_terms']}; {rounds} alternating "
                 "rounds with the same training pixels per round.", "",
                 "| loop | batch × crop | torch threads | Mpx/s (model-input pixels, forward + backward) | ms per step | batch assembly share |",
                 "|---|---|---|---|---|---|"]
        for lp in res["loops"]:
            lines.append(f"| {lp['loop']} | {lp['batch']} × {lp['crop']}² | {lp['threads']} | {lp['mpx_per_s']} | "
                         f"{lp['ms_per_step']} | {lp['batch_assembly_share']} |")
        lines += ["", f"Speed-up of the training loop: **{res['speedup']}×** (of which the crop-first assembly and "
                  f"channels_last at v6's batch 8 and one thread: {res['speedup_same_batch']}×; the rest is the batch of "
                  f"{cfg['train']['batch']} and the thread count, which `train.threads: auto` picks from the load)."]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return res


LEGACY_REV = "13754f4"   # main before the crop-first loop and the judge (session 7's starting point)
_LEGACY_FOLD = r'''
import json, sys, time
sys.path.insert(0, {tree!r})
import ground.cv as cv   # v6 (LEGACY_REV) had ground/cv.py: the same import works for both
from ground.distill import load_config
base = load_config({config!r})
base["train"].update(batch=8, precise_bn_batches=100)   # v6's recipe: batch 8 of 128-px crops
cvc = {{"steps": {steps}, "arms": {{"hinton_kl": base["losses"]}}}}
t0 = time.time()
r = cv.run_one(cvc, base, "hinton_kl", 0, 9, [{held!r}], log=lambda *a: None)
print(json.dumps({{"seconds": time.time() - t0, "train_seconds": r["train_seconds"], "scenes": len(r["scenes"])}}))
'''


def bench_fold(config: str | Path, fold: int = 0, legacy_steps: int = 1200, log=print) -> dict:
    """One CV fold end to end, v6's pipeline (run from a worktree of LEGACY_REV: its `cv run_one` with batch 8,
    today's steps) against the judge's (`judge run_one`, batch 32, the same training pixels), on the same pool
    and the same held-out fold. The legacy fold holds out (and scores) only the fold's labelled files: it cannot
    score others, and so it also trains on the unlabelled files of the fold's places; the judge's scores every
    held-out file against the teacher as well: it does more. Both walls include starting Python and torch."""
    import subprocess
    import sys
    import tempfile

    from .judge import load_judge
    from .judge.folds import load_folds, scene_files
    from .judge.references import references
    from .judge import runs as U

    files = scene_files()
    folds = load_folds(files=files)
    refs = references(files)
    lab = {f.stem for f in files if f.labelled}
    held_lab = [s for s in folds[fold] if s in lab]
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "legacy"
        (Path(tmp) / "shared").symlink_to(repo.parent / "shared")   # v6 reads ../shared beside its checkout
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), LEGACY_REV], check=True,
                       capture_output=True)
        try:
            code = _LEGACY_FOLD.format(tree=str(tree), config=str(Path(config).resolve()), steps=legacy_steps, held=held_lab)
            t0 = time.time()
            p = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(tree)})
            if p.returncode:
                raise RuntimeError(f"legacy fold failed: {p.stderr[-2000:]}")
            legacy = {**json.loads(p.stdout.strip().splitlines()[-1]), "wall": time.time() - t0}
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        judge, base = load_judge()
        judge = {**judge, "stages": {"bench": {"steps": legacy_steps * 8 // int(base["train"]["batch"]), "seeds": [9]}}}
        old_runs = U.RUNS
        U.RUNS = Path(tmp) / "judge"
        try:
            t0 = time.time()
            r = U.run_one(judge, base, "bench", "hinton_kl", fold, 9, folds, {f.stem: f for f in files}, refs, log=log)
            current = {"seconds": time.time() - t0, "train_seconds": r["seconds"]["train"], "scenes": len(r["files"])}
        finally:
            U.RUNS = old_runs
    return {"fold": fold, "rev": LEGACY_REV, "legacy": legacy, "current": current,
            "speedup": round(legacy["wall"] / current["seconds"], 2)}
