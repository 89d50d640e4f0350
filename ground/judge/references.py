"""The 4-band teacher on every shared scene file, once: the reference every held-out student is compared to.

Per file (cached under runs/judge/references/): the teacher's whole-scene mask (ukis-csmask as its users run
it, ground.evaluate.teacher_mask, on blue/green/red/nir only), its cloud fraction over valid pixels, the gate
policy's action on that mask (no discard guard: the guard is the gate's, not the teacher's), the scene's median
VNIR reflectance, whether it is a *bright clear* scene (teacher <= 10 % cloud and median VNIR >= 0.25: clear
snow, ice, salt, desert, bright water), and, where a human label exists, the teacher's label metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hil.paths import REPO

from .folds import VNIR, SceneFile

REFS = REPO / "runs" / "judge" / "references"
BRIGHT_CLEAR_MAX_CF = 0.10
BRIGHT_MIN_MEDIAN_VNIR = 0.25
REFERENCE_VERSION = 1


def valid_of(fs: dict) -> np.ndarray:
    return fs["valid_mask"] if fs["valid_mask"] is not None else np.ones(fs["bands"].shape[:2], bool)


def median_vnir(refl4: np.ndarray, valid: np.ndarray) -> float:
    """Median over valid pixels of the per-pixel mean of blue, green, red and nir reflectance."""
    v = refl4[valid]
    return float(np.median(v.mean(1))) if len(v) else 0.0


def reference(f: SceneFile, out_dir: Path = REFS) -> dict:
    """The teacher's row for one file (computed once, then read from out_dir)."""
    from flight.config import PolicyConfig
    from flight.policy import policy_band
    from flight.scenefile import load_npz

    from ..evaluate import CLOUD, gate_policy_action, scene_row, teacher_mask

    row_path, mask_path = out_dir / f"{f.stem}.json", out_dir / f"{f.stem}.mask.npz"
    if row_path.exists() and mask_path.exists():
        row = json.loads(row_path.read_text())
        if row.get("version") == REFERENCE_VERSION:
            return row
    sc = load_npz(f.path)
    fs = sc.frame()
    valid = valid_of(fs)
    refl = sc.reflectance(VNIR)
    mask = teacher_mask(refl, VNIR)
    cf = float(np.count_nonzero((mask == CLOUD) & valid) / max(1, np.count_nonzero(valid)))
    med = median_vnir(refl, valid)
    row = {"version": REFERENCE_VERSION, "stem": f.stem, "site_id": f.site_id, "acquisition_id": f.acquisition_id,
           "shape": list(mask.shape), "teacher_cf": round(cf, 4), "teacher_band": policy_band(cf, PolicyConfig()),
           "teacher_action": gate_policy_action(mask, valid, cf), "median_vnir": round(med, 4),
           "bright_clear": bool(cf <= BRIGHT_CLEAR_MAX_CF and med >= BRIGHT_MIN_MEDIAN_VNIR),
           "labelled": f.labelled}
    if f.labelled:
        row["label"] = scene_row(mask, cf, row["teacher_action"], fs["label"])
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(mask_path, mask=mask.astype(np.uint8))
    row_path.write_text(json.dumps(row, indent=1))
    return row


def references(files: list[SceneFile], out_dir: Path = REFS, log=print) -> dict[str, dict]:
    """Teacher rows for every file with the four VNIR bands."""
    rows = {}
    for f in files:
        if f.has_vnir:
            if not (out_dir / f"{f.stem}.json").exists():
                log(f"teacher reference: {f.stem}")
            rows[f.stem] = reference(f, out_dir)
    return rows


def teacher_mask_of(stem: str, out_dir: Path = REFS) -> np.ndarray:
    with np.load(out_dir / f"{stem}.mask.npz") as z:
        return z["mask"]


def probes(files: list[SceneFile], out_dir: Path = REFS) -> dict[str, list[float] | None]:
    """The discard guard's measurement of every file ([bright share, green/blue, saturated share], the gate's
    BrightSurfaceProbe): a property of the scene, not of a model, so the guard can be re-fitted per fold on
    scored rows after the runs (ground/judge/report.py). Cached in out_dir/probes.json."""
    from flight.scenefile import load_npz

    from ..cv.runs import probe_stats

    path = out_dir / "probes.json"
    have = json.loads(path.read_text()) if path.exists() else {}
    todo = [f for f in files if f.has_vnir and f.stem not in have]
    for f in todo:
        have[f.stem] = probe_stats(load_npz(f.path).frame())
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(have))
    return have
