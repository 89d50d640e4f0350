"""One judge run: an arm, a fold, a seed. Train on the fold's training places only, export INT8, score every
held-out file through the flying path (INT8 QDQ ONNX -> flight.CloudGate, full pass with mask_out), against
the human label where one exists and against the 4-band teacher everywhere (fidelity needs no label).

Per held-out file the row holds:
  fidelity  student vs teacher: policy band agreement (the scene action the function implies), |CF_s - CF_t|,
            cloud pixel agreement over valid pixels, and the same over `crops` random windows of the file
            (side 128 px or the file's short side): many more, smaller decisions per acquisition
  gate      the gate's action on the student (discard guard included) and its rule
  label     where labelled: ground.evaluate.scene_row (band vs label band, |CF err|, IoU parts)
  bright    the teacher reference's bright_clear flag and median VNIR (ground/judge/references.py)
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from hil.paths import REPO

from ..distill import build_transfer_set, load_student, train
from .folds import SceneFile
from .references import REFS, teacher_mask_of, valid_of

RUNS = REPO / "runs" / "judge"
CROP = 128


def merge(base: dict, over: dict) -> dict:
    """Deep merge of an arm's overrides into the base experiment config (lists replace, dicts merge)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def arm_config(judge: dict, base: dict, arm: str, stage: str, seed: int, fold: int) -> dict:
    a = judge["arms"][arm]
    st = judge["stages"][stage]
    cfg = merge(base, {k: v for k, v in a.items() if k != "losses"})
    cfg["losses"] = copy.deepcopy(a["losses"])
    cfg["seed"] = int(seed)
    cfg["experiment"] = f"judge_{stage}_{arm}_f{fold}_s{seed}"
    cfg["train"] = {**cfg["train"], "steps": int(st["steps"])}
    return cfg


def fold_views(ts: dict, train_files: set[str]) -> np.ndarray:
    """Pool views that train in a fold: every source scene of the view is one of the fold's training files."""
    names = ts["meta"]["sources"]
    ok_src = np.array([n in train_files for n in names] + [True])   # index -1 (no second source) is fine
    src = np.asarray(ts["src"], np.int64)
    return np.flatnonzero(ok_src[src].all(1))


def view_stats(ts: dict, teacher: str) -> dict[str, np.ndarray]:
    """Per pool view, on an 8-px grid: the teacher's cloud share and the median VNIR brightness (cached
    beside the pool). Bright clear views: cloud share <= 0.10 and median VNIR >= 0.25."""
    path = Path(ts["meta"].get("dir", "")) / f"view_stats_{teacher}.npz" if ts["meta"].get("dir") else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    n = len(ts["src"])
    cloud, bright = np.empty(n, np.float32), np.empty(n, np.float32)
    P = ts["t_probs"][teacher]
    for i in range(n):
        p = np.asarray(P[i, :, ::8, ::8])
        cloud[i] = float((p.argmax(0) == 1).mean())
        bright[i] = float(np.median(np.asarray(ts["X"][i, ::8, ::8, :4], np.float32).mean(-1)))
    out = {"teacher_cloud": cloud, "median_vnir": bright}
    if path is not None:
        np.savez(path, **out)
    return out


def crop_windows(stem: str, shape: tuple[int, int], n: int) -> list[tuple[int, int, int]]:
    """n windows (y, x, side) of one file, seeded by its name: the same windows for every contender."""
    h, w = shape
    side = min(CROP, h, w)
    rng = np.random.default_rng(int(hashlib.sha256(stem.encode()).hexdigest()[:8], 16))
    return [(int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side) for _ in range(n)]


def fidelity_row(mask_s: np.ndarray, mask_t: np.ndarray, valid: np.ndarray, stem: str, crops: int) -> dict:
    """Student vs teacher on one file: whole scene and `crops` windows."""
    from flight.config import PolicyConfig
    from flight.policy import policy_band

    from ..evaluate import CLOUD

    pol = PolicyConfig()
    cs, ct = (mask_s == CLOUD) & valid, (mask_t == CLOUD) & valid
    nv = max(1, int(np.count_nonzero(valid)))
    cf_s, cf_t = np.count_nonzero(cs) / nv, np.count_nonzero(ct) / nv
    band_agree, cf_diff = [], []
    for y, x, side in crop_windows(stem, mask_s.shape, crops):
        v = valid[y:y + side, x:x + side]
        nvc = int(np.count_nonzero(v))
        if nvc < 0.5 * side * side:
            continue
        a = np.count_nonzero(cs[y:y + side, x:x + side]) / nvc
        b = np.count_nonzero(ct[y:y + side, x:x + side]) / nvc
        band_agree.append(policy_band(a, pol) == policy_band(b, pol))
        cf_diff.append(abs(a - b))
    return {"cf_student": round(cf_s, 4), "cf_teacher": round(cf_t, 4), "abs_cf_diff": round(abs(cf_s - cf_t), 4),
            "band_agree": policy_band(cf_s, pol) == policy_band(cf_t, pol),
            "pixel_agreement": round(float(np.count_nonzero((cs == ct) & valid) / nv), 4),
            "crops": len(band_agree), "crop_band_agreement": round(float(np.mean(band_agree)), 4) if band_agree else None,
            "crop_abs_cf_diff": round(float(np.mean(cf_diff)), 4) if cf_diff else None}


def score_files(card: Path, files: list[SceneFile], refs: dict[str, dict], crops: int, refs_dir: Path = REFS) -> dict:
    """Each file through CloudGate (INT8 ONNX Runtime, one thread, early exit off, full pass with mask_out)."""
    from flight import CloudGate
    from flight.scenefile import load_npz

    from ..evaluate import scene_row

    gate = CloudGate.from_model(str(card), backend="onnxruntime", threads=1, early_exit={"enabled": False})
    rows = {}
    try:
        for f in files:
            fs = load_npz(f.path).frame()
            mask = np.empty(fs["bands"].shape[:2], np.uint8)
            d = gate.process(fs["bands"], fs["band_names"], scene_id=fs["scene_id"], target_id=fs["scene_id"],
                             valid_mask=fs["valid_mask"], radiometry=fs["radiometry"], mask_out=mask)
            if d.action == "fault":
                rows[f.stem] = {"fault": d.fault}
                continue
            ref = refs[f.stem]
            row = {"site_id": f.site_id, "acquisition_id": f.acquisition_id, "action": d.action, "rule": d.rule,
                   "cloud_fraction": round(float(d.cloud_fraction), 4), "bright_clear": ref["bright_clear"],
                   "median_vnir": ref["median_vnir"], "teacher_action": ref["teacher_action"],
                   "fidelity": fidelity_row(mask, teacher_mask_of(f.stem, refs_dir), valid_of(fs), f.stem, crops)}
            if fs["label"] is not None:
                row["label"] = scene_row(mask, float(d.cloud_fraction), d.action, fs["label"])
            rows[f.stem] = row
    finally:
        gate.close()
    return rows


def run_dir(stage: str, arm: str, fold: int, seed: int) -> Path:
    return RUNS / stage / arm / f"f{fold}_s{seed}"


def run_one(judge: dict, base: dict, stage: str, arm: str, fold: int, seed: int, folds: list[list[str]],
            files: dict[str, SceneFile], refs: dict[str, dict], log=print, ts: dict | None = None) -> dict:
    """Train, export and score one (stage, arm, fold, seed); resumable (training checkpoints) and idempotent
    (result.json)."""
    from ..cv.runs import calibration_tiles, export_onnx_int8

    d = run_dir(stage, arm, fold, seed)
    res_path = d / "result.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    cfg = arm_config(judge, base, arm, stage, seed, fold)
    ts = ts if ts is not None else build_transfer_set(cfg, log=log)
    train_files = {s for k, f in enumerate(folds) if k != fold for s in f}
    train_idx = fold_views(ts, train_files)
    if cfg["data"].get("bright_view_share", 0.0):
        st = view_stats(ts, cfg["teachers"][0]["name"])
        ts = {**ts, "bright": (st["teacher_cloud"] <= 0.10) & (st["median_vnir"] >= 0.25)}
    t0 = time.time()
    pt = train(cfg, ts, d / "train", cfg["losses"], cfg["experiment"], log, train_idx=train_idx)
    train_s = time.time() - t0
    spec, model = load_student(pt)
    t1 = time.time()
    calib = calibration_tiles(ts, spec, train_idx)
    if spec.input_downsample != 1:   # calibrate on what the model sees in flight: the 2x2-averaged grid
        f = spec.input_downsample
        n, h, w, c = calib.shape
        calib = np.ascontiguousarray(calib.reshape(n, h // f, f, w // f, f, c).mean((2, 4)))
    card = export_onnx_int8(spec, model, d / "model", f"judge-{arm}-f{fold}-s{seed}", calib)
    if spec.input_downsample != 1:
        from .grid import declare_input_grid

        declare_input_grid(card, spec.input_downsample)
    export_s = time.time() - t1
    held = [files[s] for s in folds[fold] if s in files and s in refs]
    t2 = time.time()
    rows = score_files(card, held, refs, int(judge.get("crops_per_file", 16)))
    res = {"stage": stage, "arm": arm, "fold": fold, "seed": seed, "steps": int(cfg["train"]["steps"]),
           "batch": int(cfg["train"]["batch"]), "crop": cfg["train"].get("crop"), "train_views": int(len(train_idx)),
           "pool": ts["key"], "seconds": {"train": round(train_s, 1), "export": round(export_s, 1),
                                          "score": round(time.time() - t2, 1)},
           "config": {k: cfg[k] for k in ("student", "train", "data", "losses")}, "files": rows}
    res_path.write_text(json.dumps(res, indent=1))
    return res
