from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"


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
    """A labelled synthetic 4-band scene built by tiling 256² generator scenes (ground.synth)."""
    from ground.synth import make_scene

    reps = -(-size // 256)
    refl = np.zeros((reps * 256, reps * 256, 4), np.float32)
    mask = np.zeros((reps * 256, reps * 256), np.uint8)
    for i in range(reps):
        for j in range(reps):
            s = make_scene(seed * 1000 + i * reps + j, 256, kind=kind)
            refl[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = s.reflectance[..., :4]
            mask[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = s.mask
    return refl[:size, :size], mask[:size, :size]
