"""Per-scene evaluation: teacher, KD student, no-KD baseline, fp32 and INT8, on real scenes (per scene)
and on a held-out synthetic set (aggregated separately; never mixed with real numbers)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import yaml

from .metrics import cloud_metrics, predict_tiled
from .sceneio import SHARED_REAL, load_npz, real_scene_paths
from .synth import SYNTH_BANDS, make_set

SYNTH_EVAL_SEED, SYNTH_EVAL_N = 99, 48


def teacher_mask(refl: np.ndarray, bands, threads: int = 2) -> np.ndarray:
    """ukis-csmask as its users run it: the CSmask wrapper (own tiling, 20 % overlap, blending); it
    picks its 6-band model when SWIR is among `bands`."""
    from ukis_csmask.mask import CSmask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs = CSmask(np.ascontiguousarray(refl, dtype=np.float32), band_order=list(bands),
                    intra_op_num_threads=threads, inter_op_num_threads=1)
    return cs.csm[..., 0]


def evaluate_models(contenders: dict, bands, scenes_dir: Path | None = None, with_teacher: bool = True,
                    keep_masks: bool = False) -> dict:
    """contenders: name -> NHWC logits fn on (1,256,256,len(bands)) float32 reflectance."""
    bands = tuple(bands)
    real = {}
    masks = {}
    for p in real_scene_paths(scenes_dir or SHARED_REAL):
        sc = load_npz(p)
        if not all(b in sc.band_names for b in bands):
            real[sc.scene_id] = {"skipped": f"lacks band(s) {[b for b in bands if b not in sc.band_names]}"}
            continue
        img = sc.reflectance(bands)
        row = {"labelled": sc.labelled, "tag": sc.tag, "shape": list(img.shape[:2])}
        preds = {n: predict_tiled(fn, img) for n, fn in contenders.items()}
        if with_teacher:
            preds["teacher_ukis_4b"] = teacher_mask(img, bands)
        for n, m in preds.items():
            if sc.labelled:
                row[n] = {k: round(v, 4) for k, v in cloud_metrics(m, sc.mask).items()}
            else:
                row[n] = {"cloud_fraction": round(float((m == 1).mean()), 4)}
                if "teacher_ukis_4b" in preds and n != "teacher_ukis_4b":
                    row[n]["agreement_with_teacher"] = round(float((m == preds["teacher_ukis_4b"]).mean()), 4)
        if "kd_int8_onnx" in preds and "kd_int8_tflite" in preds:
            row["int8_onnx_vs_tflite_pixel_agreement"] = round(float((preds["kd_int8_onnx"] == preds["kd_int8_tflite"]).mean()), 5)
        real[sc.scene_id] = row
        if keep_masks:
            masks[sc.scene_id] = (img, sc.mask if sc.labelled else None, preds)
    X, Y, _ = make_set(SYNTH_EVAL_N, seed=SYNTH_EVAL_SEED)
    idx = [SYNTH_BANDS.index(b) for b in bands]
    synth = {}
    for n, fn in contenders.items():
        ms = [cloud_metrics(np.argmax(fn(np.ascontiguousarray(X[i:i + 1, ..., idx])), -1), Y[i]) for i in range(len(X))]
        synth[n] = {"cloud_iou_pooled": round(_pooled_iou([np.argmax(fn(np.ascontiguousarray(X[i:i + 1, ..., idx])), -1) for i in range(len(X))], Y), 4),
                    "mean_abs_cloud_fraction_error": round(float(np.mean([abs(m["cloud_fraction_error"]) for m in ms])), 4)}
    out = {"real": real, "synthetic": {"set": f"make_set(n={SYNTH_EVAL_N}, seed={SYNTH_EVAL_SEED}), 256² tiles", **synth},
           "notes": "real = per real scene from ../shared/data/real; synthetic = procedural held-out set. The ukis "
                    "tiles may have been seen by the ukis-csmask teachers (leakage for teacher-derived numbers)."}
    return (out, masks) if keep_masks else out


def _pooled_iou(preds, Y) -> float:
    inter = sum(float(np.sum((p == 1) & (y == 1))) for p, y in zip(preds, Y))
    union = sum(float(np.sum((p == 1) | (y == 1))) for p, y in zip(preds, Y))
    return inter / union if union else 1.0


def labelled_cells(m: dict) -> str:
    """The IoU | F1 | balanced-accuracy cells of a labelled scene's row (shared with bench/)."""
    return f"{m['cloud_iou']:.3f} | {m['f1']:.3f} | {m['balanced_accuracy']:.3f}"


def synthetic_table(synthetic: dict) -> list[str]:
    """Markdown rows for the synthetic held-out set, header included (shared with bench/)."""
    return ["| contender | pooled cloud IoU | mean abs CF error |", "|---|---|---|"] + [
        f"| {n} | {m['cloud_iou_pooled']:.3f} | {m['mean_abs_cloud_fraction_error']:.3f} |"
        for n, m in synthetic.items() if isinstance(m, dict)]


def format_table(metrics: dict) -> str:
    lines = ["| scene | contender | cloud IoU | F1 | bal. acc | CF | CF ref | CF err |", "|---|---|---|---|---|---|---|---|"]
    for sid, row in metrics["real"].items():
        if "skipped" in row:
            lines.append(f"| {sid} | — | skipped: {row['skipped']} | | | | | |")
            continue
        for n, m in row.items():
            if not isinstance(m, dict):
                continue
            if "cloud_iou" in m:
                lines.append(f"| {sid} | {n} | {labelled_cells(m)} | "
                             f"{m['cloud_fraction']:.3f} | {m['cloud_fraction_ref']:.3f} | {m['cloud_fraction_error']:+.3f} |")
            else:
                agree = m.get("agreement_with_teacher")
                lines.append(f"| {sid} ({row.get('tag') or 'unlabelled'}) | {n} | — | — | "
                             f"{'agree w/ teacher ' + format(agree, '.3f') if agree is not None else '—'} | {m['cloud_fraction']:.3f} | — | — |")
    lines += ["", f"Synthetic held-out set ({metrics['synthetic']['set']}):", "", *synthetic_table(metrics["synthetic"])]
    return "\n".join(lines)


def save_mask_png(masks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(masks)
    cols = 2 + max(len(p) for _, _, p in masks.values())
    fig, ax = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r, (sid, (img, label, preds)) in enumerate(masks.items()):
        ax[r, 0].imshow(np.clip(img[..., [2, 1, 0]] * 3, 0, 1)); ax[r, 0].set_title(sid[:18], fontsize=7)
        if label is not None:
            ax[r, 1].imshow(label, vmin=0, vmax=2, interpolation="nearest"); ax[r, 1].set_title("label", fontsize=7)
        for c, (n, m) in enumerate(preds.items()):
            ax[r, 2 + c].imshow(m, vmin=0, vmax=2, interpolation="nearest"); ax[r, 2 + c].set_title(n, fontsize=7)
        for a in ax[r]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate_cli(card_path: str, scenes: str | None, out: str | None) -> None:
    from .metrics import model_fn

    card_path = Path(card_path)
    card = yaml.safe_load(card_path.read_text())
    d = card_path.parent
    a = card["artifacts"]
    contenders = {"kd_fp32": model_fn(d / a["onnx_fp32"]["file"]), "kd_int8_onnx": model_fn(d / a["onnx_int8"]["file"]),
                  "kd_int8_tflite": model_fn(d / a["tflite_int8"]["file"])}
    if "baseline_onnx_fp32" in a:
        contenders["baseline_nokd_fp32"] = model_fn(d / a["baseline_onnx_fp32"]["file"])
    metrics, masks = evaluate_models(contenders, card["bands"], Path(scenes) if scenes else None, keep_masks=True)
    print(format_table(metrics))
    if out:
        o = Path(out); o.mkdir(parents=True, exist_ok=True)
        (o / "evaluation.md").write_text(format_table(metrics) + "\n")
        (o / "evaluation.yaml").write_text(yaml.safe_dump(metrics, sort_keys=False))
        save_mask_png(masks, o / "masks.png")
        print(f"wrote {o}/evaluation.md, evaluation.yaml, masks.png")
