"""Pretrained teachers from the installed ukis-csmask wheel (Apache-2.0), loaded in place, never copied.

T1 = 4-band (blue, green, red, nir) L1C U-Net; T2 = 6-band (+ swir16, swir22) L1C U-Net, which sees
SWIR that a VNIR-only imager lacks (privileged-information distillation). Each takes (N, C, 256, 256)
float32 reflectance normalised with the JSON statistics beside it and returns clear/cloud/shadow
logits. We also expose the decoder's 1/4-resolution feature map (64 channels) for feature distillation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

FEATURE_NODE = "/model/decoder/blocks.2/conv2/conv2.2/Relu_output_0"  # (N, 64, H/4, W/4)
TEACHER_TILE = 256


def _package_dir() -> Path:
    try:
        return Path(resources.files("ukis_csmask"))
    except ModuleNotFoundError as e:  # pragma: no cover - message matters
        raise RuntimeError("teachers need the dev-only dependency ukis-csmask==1.0.0: pip install -e '.[ground]'") from e


@dataclass
class Teacher:
    name: str
    bands: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    session: object
    model_path: Path
    version: str

    @property
    def key(self) -> str:
        """Cache key of this teacher's outputs, e.g. '4b_l1c'."""
        return self.name.split("/")[-1]

    def run(self, reflectance: np.ndarray, features: bool = False):
        """reflectance (N, 256, 256, C) in self.bands order -> logits (N, 3, 256, 256)[, features]."""
        x = ((reflectance - self.mean) / self.std).astype(np.float32).transpose(0, 3, 1, 2)
        outs = ["output", FEATURE_NODE] if features else ["output"]
        res = self.session.run(outs, {"input": np.ascontiguousarray(x)})
        logits = res[0].astype(np.float32)
        return (logits, res[1].astype(np.float32)) if features else logits


def load_teacher(kind: str = "4b", level: str = "l1c", threads: int = 2) -> Teacher:
    import onnx
    import onnxruntime as ort

    d = _package_dir()
    model_path = d / f"model_{kind}_{level}.onnx"
    meta = json.loads((d / f"model_{kind}_{level}.json").read_text())
    stats = meta["data"]["dataset_statistics"]
    model = onnx.load(str(model_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(FEATURE_NODE, onnx.TensorProto.FLOAT16, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Teacher(
        name=f"ukis-csmask/{kind}_{level}", bands=tuple(stats["band_names"]),
        mean=np.array(stats["img"][0], np.float32), std=np.array(stats["img"][1], np.float32),
        session=sess, model_path=model_path, version=meta["model"]["version"],
    )


def run_teachers_cached(X6: np.ndarray, cache: Path, teachers: list[Teacher], batch: int = 4, progress=None):
    """Teacher soft outputs for a transfer set (N, 256, 256, 6 SYNTH_BANDS order), cached on disk.

    Stores per teacher: probabilities (N, 3, 256, 256) float16 and the decoder feature avg-pooled to
    1/8 resolution (N, 64, 32, 32) float16. The cache key is the caller's file name.
    """
    from hil.synth import SYNTH_BANDS

    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    out = {}
    for t in teachers:
        idx = [SYNTH_BANDS.index(b) for b in t.bands]
        n = len(X6)
        probs = np.empty((n, 3, TEACHER_TILE, TEACHER_TILE), np.float16)
        feats = np.empty((n, 64, TEACHER_TILE // 8, TEACHER_TILE // 8), np.float16)
        for s in range(0, n, batch):
            logits, f = t.run(X6[s:s + batch][..., idx], features=True)
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs[s:s + batch] = e / e.sum(1, keepdims=True)
            b, c, h, w = f.shape
            feats[s:s + batch] = f.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))
            if progress:
                progress(min(batch, n - s))
        key = t.name.split("/")[-1]
        out[f"{key}_probs"], out[f"{key}_feats"] = probs, feats
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Per-process temp name: DDP ranks may compute the same cache concurrently; the rename is atomic.
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out
