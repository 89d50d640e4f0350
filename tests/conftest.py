from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hil.paths import SHARED_REAL as REAL  # noqa: E402  (this checkout's hil, after the path insert)


def real_scene(rel: str) -> Path:
    p = REAL / rel
    if not p.exists():
        pytest.skip(f"real scene {rel} not present (../shared/data/real is absent on this machine)")
    return p


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not REAL.is_dir():
        pytest.skip("../shared/data/real is absent on this machine")
    return REAL


@pytest.fixture(scope="session")
def gate_litert():
    from flight import CloudGate

    g = CloudGate.from_model(backend="litert")
    yield g
    g.close()


@pytest.fixture(scope="session")
def gate_ort():
    from flight import CloudGate

    g = CloudGate.from_model(backend="onnxruntime")
    yield g
    g.close()


def synthetic_scene(seed: int, size: int, kind: str):
    """A labelled synthetic 4-band scene (hil.streams.generate_scene: tiled hil.synth scenes)."""
    from hil.streams import generate_scene

    s = generate_scene(kind, seed, size)
    return s["bands"], s["label"]


class BrightnessBackend:
    """A test backend for the gate's backend port: cloud where blue + green + red > 0.9 reflectance
    (synthetic scenes' clouds are bright, their land dark), allocation-free. Policy, early-exit and
    hysteresis tests use it so they test the gate's mechanics on an oracle whose output is known,
    not the shipped model's accuracy on procedural scenes (which tests/test_flight_real_scenes.py and
    the card score on real ones)."""

    name = "brightness-test"

    def __init__(self, tile: int, n_bands: int):
        import numpy as np

        self.tile, self.n_bands = tile, n_bands
        self.input_affine, self.input_range = (1.0, 0.0), (-1.0, 4.0)
        self.planes = np.zeros((n_bands, tile, tile), np.float32)
        self._sum = np.empty((tile, tile), np.float32)
        self._cloud = np.empty((tile, tile), bool)

    def infer(self, planes, mask_out) -> None:
        import numpy as np

        np.add(planes[0], planes[1], out=self._sum)
        np.add(self._sum, planes[2], out=self._sum)
        np.greater(self._sum, 0.9, out=self._cloud)
        np.copyto(mask_out, self._cloud, casting="unsafe")


def brightness_backend(path, model_bytes, kind, threads, tile, n_bands):
    return BrightnessBackend(tile, n_bands)


def drop_onnx_description(raw: dict, folder) -> dict:
    """The card `raw` (a dict) with its INT8 ONNX artifact, already copied into `folder`, stripped of the
    model file's own description (flight.modelmeta) and re-hashed: an unstamped model, as exported before."""
    import hashlib

    onnx = pytest.importorskip("onnx", reason="editing an ONNX model's metadata needs onnx (the [ground] extra)")

    a = raw["artifacts"]["onnx_int8"]
    path = Path(folder) / a["file"]
    m = onnx.load(str(path))
    del m.metadata_props[:]
    onnx.save(m, str(path))
    data = path.read_bytes()
    return {**raw, "artifacts": {**raw["artifacts"], "onnx_int8": {**a, "sha256": hashlib.sha256(data).hexdigest(),
                                                                   "bytes": len(data)}}}
