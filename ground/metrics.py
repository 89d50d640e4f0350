"""Mask metrics and a tiled predictor shared by evaluate, export checks and bench."""
from __future__ import annotations

import numpy as np

CLOUD = 1


def cloud_metrics(pred: np.ndarray, label: np.ndarray) -> dict:
    """Cloud-vs-rest metrics over labelled pixels (label != 255): IoU, F1, balanced accuracy and the
    cloud-fraction error (predicted minus reference)."""
    valid = label != 255
    p = pred[valid] == CLOUD
    g = label[valid] == CLOUD
    tp = float(np.sum(p & g)); fp = float(np.sum(p & ~g)); fn = float(np.sum(~p & g)); tn = float(np.sum(~p & ~g))
    iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    tpr = tp / (tp + fn) if tp + fn else 1.0
    tnr = tn / (tn + fp) if tn + fp else 1.0
    return {"cloud_iou": iou, "f1": f1, "balanced_accuracy": 0.5 * (tpr + tnr),
            "cloud_fraction": float(p.mean()) if p.size else 0.0,
            "cloud_fraction_ref": float(g.mean()) if g.size else 0.0,
            "cloud_fraction_error": float(p.mean() - g.mean()) if p.size else 0.0}


def predict_tiled(logits_fn, img: np.ndarray, tile: int = 256, overlap: int = 32) -> np.ndarray:
    """Argmax mask of a whole (H, W, C) reflectance image with a fixed-tile model `logits_fn`
    ((1, tile, tile, C) float32 NHWC -> (tile, tile, K) scores); tiles overlap and each keeps its
    centre; edges are reflect-padded. Small images are padded up to one tile."""
    h, w, _ = img.shape
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    H, W = img.shape[:2]
    out = np.zeros((H, W), np.uint8)
    step = tile - overlap
    ys = list(range(0, max(H - tile, 0) + 1, step)); xs = list(range(0, max(W - tile, 0) + 1, step))
    if ys[-1] != H - tile: ys.append(H - tile)
    if xs[-1] != W - tile: xs.append(W - tile)
    half = overlap // 2
    for y in ys:
        for x in xs:
            scores = logits_fn(np.ascontiguousarray(img[None, y:y + tile, x:x + tile], dtype=np.float32))
            m = np.argmax(scores, axis=-1).astype(np.uint8)
            y0 = 0 if y == 0 else half; x0 = 0 if x == 0 else half
            out[y + y0:y + tile, x + x0:x + tile] = m[y0:, x0:]
    return out[:h, :w]


def model_fn(path, threads: int = 2):
    """NHWC float32 (1, T, T, C) reflectance -> (T, T, K) scores for an fp32/INT8 ONNX or INT8 TFLite
    student (argmax-equivalent scores: raw int8 codes for TFLite)."""
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path), num_threads=threads)
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        si, zi = i["quantization"]

        def fn(x):
            it.set_tensor(i["index"], np.clip(np.rint(x / si) + zi, -128, 127).astype(np.int8))
            it.invoke()
            return it.get_tensor(o["index"])[0]

        return fn
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x.transpose(0, 3, 1, 2)})[0][0].transpose(1, 2, 0)
