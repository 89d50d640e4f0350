from __future__ import annotations

import sys
from pathlib import Path

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
    """A labelled synthetic 4-band scene (hil.streams.generate_scene: tiled ground.synth scenes)."""
    from hil.streams import generate_scene

    s = generate_scene(kind, seed, size)
    return s["bands"], s["label"]
