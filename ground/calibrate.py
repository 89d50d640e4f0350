"""Post-training calibration of the student's cloud decision: one additive bias on the cloud logit.

Adding a constant b to the cloud logit of the 1x1 head is exact after the bilinear upsampling (the
weights sum to one), costs nothing at run time, and goes into every exported artifact.

b is chosen on the probe views of the real-view pool: real views (training-part sources only, never
the evaluation part) that no student ever trained on, against the teachers' confidence-weighted
consensus -- the target distillation aims at. Scene level first (mean |cloud-fraction error| per view),
pooled cloud IoU to break ties, smallest |b| last. The labelled training-part scenes are scored at
every b as a check and recorded in the card; they do not pick b, because the student was fit on them
(their residual is not an estimate of its bias on unseen scenes).
"""
from __future__ import annotations

import numpy as np

CLOUD = 1  # class code of cloud in every student and teacher output

BIAS_GRID = tuple(round(float(b), 2) for b in np.arange(-1.5, 1.51, 0.25))
INVALID = 255


def training_part_scenes(spec) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(scene id, model input (H,W,spec.in_channels), label)] of the labelled training-part scenes that
    have the spec's required bands (optional bands used where the scene has them all)."""
    from flight.scenefile import load_npz
    from hil.paths import real_scene_paths
    from .split import training_scenes

    names = training_scenes()
    out = []
    for p in real_scene_paths():
        if p.stem in names:
            sc = load_npz(p)
            have = [b for b in spec.bands if b in sc.band_names]
            if sc.labelled and all(b in have for b in spec.bands if b not in spec.optional_bands):
                x = np.nan_to_num(sc.reflectance(tuple(have)))
                out.append((p.stem, spec.model_input(x, have, True), sc.mask))
    return out


def _scene_logits(logits_fn, img: np.ndarray, tile: int = 256) -> np.ndarray:
    """(H,W,3) logits of a whole scene from non-overlapping tiles (edges mirror-padded)."""
    h, w = img.shape[:2]
    H, W = -(-h // tile) * tile, -(-w // tile) * tile
    pad = np.pad(img, ((0, H - h), (0, W - w), (0, 0)), mode="symmetric")
    out = np.empty((H, W, 3), np.float32)
    for y in range(0, H, tile):
        for x in range(0, W, tile):
            out[y:y + tile, x:x + tile] = logits_fn(np.ascontiguousarray(pad[None, y:y + tile, x:x + tile]))[0]
    return out[:h, :w]


def choose_cloud_bias(logits_fn, scenes, grid=BIAS_GRID, check=None) -> dict:
    """logits_fn: (1,T,T,C) float32 -> (1,T,T,3) logits; scenes: [(id, image, reference mask)] that pick b;
    check: the same for pools scored at every b but not used to pick it. Returns the bias and its tables."""
    rows = _table(logits_fn, scenes, grid)
    best = min(rows, key=lambda r: (r["mean_abs_cf_error"], -r["pooled_cloud_iou"], abs(r["bias"])))
    out = {"cloud_logit_bias": best["bias"],
           "criterion": "min mean |CF error| (then max pooled IoU, then min |b|) on the pool that picks b",
           "picked_on": {"scenes": len(scenes), "table": rows}}
    if check:
        out["checked_on"] = {"scenes": [sid for sid, _, _ in check], "table": _table(logits_fn, check, grid)}
    return out


def _table(logits_fn, scenes, grid) -> list[dict]:
    """Per bias: the same scene-level scores ground.evaluate gives the gate's masks."""
    from .evaluate import scene_row, summarise

    logits = [(sid, _scene_logits(logits_fn, img), lab) for sid, img, lab in scenes]
    rows = []
    for b in grid:
        scored = {}
        for sid, lg, lab in logits:
            adj = lg.copy()
            adj[..., CLOUD] += b
            mask = adj.argmax(-1).astype(np.uint8)
            cf = float((mask[lab != INVALID] == CLOUD).mean())
            scored[sid] = scene_row(mask, cf, "", lab)
        s = summarise(scored)
        rows.append({"bias": b, "mean_abs_cf_error": s["mean_abs_cf_error"], "pooled_cloud_iou": s["pooled_cloud_iou"]})
    return rows


def probe_views(ts: dict, teachers: list[str], spec) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(id, model input (T,T,spec.in_channels), teachers' consensus mask)] of the pool's probe views."""
    import torch

    from . import losses as L
    from hil.synth import SYNTH_BANDS

    out = []
    for i in ts["probe"]:
        batch = {"t_probs": {t: torch.from_numpy(ts["t_probs"][t][i][None].astype(np.float32) / 255.0) for t in teachers}}
        target, _ = L.confidence_weighted_target(batch, teachers)
        out.append((f"probe_{int(i)}", spec.model_input(np.asarray(ts["X"][i], np.float32), SYNTH_BANDS, ts["swir"][i]),
                    target.argmax(1)[0].numpy().astype(np.uint8)))
    return out


def apply_cloud_bias(model, bias: float) -> None:
    """Fold the bias into the torch student's head (exported artifacts inherit it)."""
    import torch

    with torch.no_grad():
        model.head.bias[CLOUD] += float(bias)
