"""Cross-validation runs: train on a fold's training views, export INT8, score the held-out labelled scenes
through CloudGate; the teachers' and the threshold's reference rows; teacher-vs-label conflicts."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import yaml

from hil.paths import REPO

from ..distill import build_transfer_set, disagreement, load_student, train
from .folds import labelled_stems

RUNS = REPO / "runs" / "cv"


def run_dir(arm: str, fold: int, seed: int) -> Path:
    return RUNS / arm / f"f{fold}_s{seed}"


def fold_views(ts: dict, held_out: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(training views, held-out views) of a fold: a pool view trains only if none of its source scenes is
    held out; the held-out views are the pool views made (in part) from held-out scenes."""
    names = ts["meta"]["sources"]
    src = ts["src"]
    if src is None:
        raise ValueError("the view pool records no sources (pool generator views-1): rebuild it with pool.sources: all")
    bad = np.array([i for i, n in enumerate(names) if n in held_out], np.int64)
    n_pool = len(src)
    touches = np.isin(src, bad).any(1) if len(bad) else np.zeros(n_pool, bool)
    pool_train = np.flatnonzero(~touches)
    extra = np.asarray(ts["train"])[np.asarray(ts["train"]) >= n_pool]   # the synthetic supplement
    return np.concatenate([pool_train, extra]), np.flatnonzero(touches)


def calibration_tiles(ts: dict, spec, idx: np.ndarray, n: int = 128) -> np.ndarray:
    from hil.synth import SYNTH_BANDS

    pick = idx[np.linspace(0, len(idx) - 1, n).astype(int)]
    return np.ascontiguousarray(np.stack([spec.model_input(np.asarray(ts["X"][i], np.float32), SYNTH_BANDS, ts["swir"][i])
                                          for i in pick]))


def export_onnx_int8(spec, model, out_dir: Path, name: str, calib: np.ndarray) -> Path:
    """fp32 ONNX -> INT8 QDQ ONNX (the same quantizer as the shipped export) and a minimal card the gate
    loads; returns the card path."""
    from ..export import export_onnx_fp32, quantize_onnx, sha256

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out_dir / f"{name}.fp32.onnx", out_dir / f"{name}.int8.onnx"
    export_onnx_fp32(model, spec, fp32)
    quantize_onnx(fp32, int8, calib)
    card = {"card_version": 1, "name": name, "default": False, "role": "cross-validation run (not a flight model)",
            "bands": list(spec.bands), "output": {"classes": list(spec.classes)}, "tile": 256,
            "artifacts": {k: {"file": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}
                          for k, p in (("onnx_fp32", fp32), ("onnx_int8", int8))}}
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def scene_frames(stems: set[str]):
    from flight.scenefile import load_npz
    from hil.paths import real_scene_paths

    for p in real_scene_paths():
        if p.stem in stems:
            yield p.stem, load_npz(p)


def score_fold(card: Path, stems: set[str]) -> dict:
    """Each held-out scene through the gate (INT8 ONNX Runtime, full pass with mask_out): the scorer's row
    plus the gate's rule and degraded codes."""
    from flight import CloudGate

    from ..evaluate import scene_row

    gate = CloudGate.from_model(str(card), backend="onnxruntime", threads=1, early_exit={"enabled": False})
    rows = {}
    try:
        for stem, scene in scene_frames(stems):
            fs = scene.frame()
            mask = np.empty(fs["bands"].shape[:2], np.uint8)
            d = gate.process(fs["bands"], fs["band_names"], scene_id=fs["scene_id"], target_id=fs["scene_id"],
                             valid_mask=fs["valid_mask"], radiometry=fs["radiometry"], mask_out=mask)
            if d.action == "fault":
                rows[stem] = {"fault": d.fault}
                continue
            row = scene_row(mask, float(d.cloud_fraction), d.action, fs["label"])
            row["rule"] = d.rule
            row["degraded"] = [e["code"] for e in d.degraded]
            row["probe"] = probe_stats(fs)
            rows[stem] = row
    finally:
        gate.close()
    return rows


def probe_stats(fs: dict) -> list[float] | None:
    """The discard guard's measurement of a frame (flight.evidence): [bright share, green/blue, saturated]."""
    from flight.evidence import BrightSurfaceProbe

    names = list(fs["band_names"])
    if not {"blue", "green"} <= set(names):
        return None
    return [float(v) for v in BrightSurfaceProbe().measure(fs["bands"], names.index("blue"), names.index("green"),
                                                          *fs["radiometry"], fs["valid_mask"])]



def run_one(cv: dict, base: dict, arm: str, fold: int, seed: int, folds: list[list[str]], log=print,
            ts: dict | None = None) -> dict:
    d = run_dir(arm, fold, seed)
    res_path = d / "result.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    held = set(folds[fold])
    cfg = copy.deepcopy(base)
    cfg["seed"] = int(seed)
    cfg["experiment"] = f"cv_{arm}_f{fold}_s{seed}"
    cfg["train"] = {**cfg["train"], "steps": int(cv["steps"])}
    cfg["losses"] = cv["arms"][arm]
    ts = ts if ts is not None else build_transfer_set(cfg, log=log)
    train_idx, held_idx = fold_views(ts, held)
    t0 = time.time()
    pt = train(cfg, ts, d / "train", cfg["losses"], cfg["experiment"], log, train_idx=train_idx)
    train_s = time.time() - t0
    spec, model = load_student(pt)
    dis = disagreement(model, cfg, ts, held_idx) if len(held_idx) and ts["t_probs"] else np.array([])
    card = export_onnx_int8(spec, model, d / "model", f"cv-{arm}-f{fold}-s{seed}",
                            calibration_tiles(ts, spec, train_idx))
    rows = score_fold(card, held)
    res = {"arm": arm, "fold": fold, "seed": seed, "steps": int(cv["steps"]), "train_views": int(len(train_idx)),
           "held_out_views": int(len(held_idx)), "pool": ts["key"], "train_seconds": round(train_s, 1),
           "held_out_view_disagreement": float(dis.mean()) if len(dis) else None,
           "loss_terms": cv["arms"][arm], "scenes": rows}
    res_path.write_text(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------- references
def references(out: Path = RUNS / "references.json", log=print) -> dict:
    """Teachers (CSmask, as their users run them) and the Fmask-style threshold on every labelled scene:
    no training, so no folds; the same arrays as the students."""
    from ..evaluate import gate_policy_action, reference_contenders, scene_row

    if out.exists():
        return json.loads(out.read_text())
    contenders = reference_contenders(True)
    rows: dict[str, dict] = {}
    for stem, scene in scene_frames(set(labelled_stems())):
        log(f"references: {stem}")
        fs = scene.frame()
        valid = fs["valid_mask"] if fs["valid_mask"] is not None else np.ones(fs["bands"].shape[:2], bool)
        for name, c in contenders.items():
            r = c(fs, scene)
            if r is not None:
                mask, cf, _ = r   # the policy's action before the guard; the guard is applied per fold (action_at)
                row = scene_row(mask, cf, gate_policy_action(mask, valid, cf), fs["label"])
                rows.setdefault(name, {})[stem] = {**row, "rule": "threshold", "probe": probe_stats(fs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows



def label_conflicts(cfg: dict, out: Path, max_views: int = 60) -> str:
    """Where the teacher and the human labels disagree, per labelled scene of the pool: views made from it
    (labelled / without labels: mixup, synthetic composites), and the share of labelled pixels (clear or
    cloud) whose label the teacher's argmax contradicts, at most `max_views` labelled views per scene."""
    ts = build_transfer_set(cfg)
    names, src, Y = ts["meta"]["sources"], ts["src"], ts["Y"]
    teacher = cfg["teachers"][0]["name"]
    P = ts["t_probs"][teacher]
    rows = []
    for si, n in enumerate(names):
        idx = np.flatnonzero((src == si).any(1))
        lab = [i for i in idx if (np.asarray(Y[i]) != 255).any()]
        if not lab:
            continue
        conflict = cloud_on_clear = total = 0
        for i in lab[:max_views]:
            y, t = np.asarray(Y[i]), np.asarray(P[i]).argmax(0)
            m = (y != 255) & (y != 2) & (t != 2)
            conflict += np.count_nonzero((t != y) & m)
            cloud_on_clear += np.count_nonzero((t == 1) & (y == 0) & m)
            total += np.count_nonzero(m)
        rows.append((n, len(idx), len(lab), len(idx) - len(lab), conflict / max(total, 1), cloud_on_clear / max(total, 1)))
    rows.sort(key=lambda r: -r[4])
    lines = [f"# Teacher ({teacher}) vs human labels on the pool views (`python -m ground cv conflicts`)", "",
             "| scene | views | with labels | without labels | teacher contradicts the label | teacher says cloud on labelled clear |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {a} | {b} | {c} | {d:.3f} | {e:.3f} |" for n, a, b, c, d, e in rows]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


