"""Decision policy, early exit and deadline, on synthetic scenes with exact labels."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_scene
from flight import CloudGate

BANDS = ("blue", "green", "red", "nir")


@pytest.fixture(scope="module")
def bench_scenes():
    """Synthetic benchmark set: clearly clear and clearly overcast 1920² scenes (64 tiles each)."""
    return {f"{kind}{i}": synthetic_scene(100 + i, 1920, kind) for kind in ("clear", "overcast") for i in range(3)}


@pytest.fixture(scope="module")
def gates():
    return (CloudGate.from_model(early_exit={"enabled": True}), CloudGate.from_model(early_exit={"enabled": False}))


def test_early_exit_same_action_and_3x_fewer_tiles(bench_scenes, gates):
    early, full = gates
    for name, (refl, _) in bench_scenes.items():
        de = early.process(refl, BANDS, scene_id=name)
        df = full.process(refl, BANDS, scene_id=name)
        assert de.action == df.action, name
        assert df.tiles_processed == df.tiles_total == 64
        assert de.early_exit and de.tiles_processed * 3 <= de.tiles_total, (name, de.tiles_processed)
        lo, hi = de.confidence_bound
        assert lo <= df.cloud_fraction <= hi, (name, de.confidence_bound, df.cloud_fraction)


def test_mask_request_forces_full_pass(bench_scenes, gates):
    refl, _ = bench_scenes["clear0"]
    mask = np.empty(refl.shape[:2], np.uint8)
    d = gates[0].process(refl, BANDS, mask_out=mask)
    assert d.tiles_processed == d.tiles_total and not d.early_exit


def _gate_with_fixed_fraction(**policy):
    return CloudGate.from_model(early_exit={"enabled": False}, policy=policy)


def _decide(gate, cf, vf=1.0, priority=0, prev=None, full=True):
    return gate._decide(cf, vf, priority, prev, 0, 1, full)[0]


def test_thresholds_priority_and_hysteresis():
    g = _gate_with_fixed_fraction(downlink_max_cloud=0.3, discard_min_cloud=0.7, reacquire_priority=2, hysteresis=0.05)
    assert _decide(g, 0.1) == "downlink"
    assert _decide(g, 0.8) == "discard"
    assert _decide(g, 0.8, priority=2) == "reacquire"
    assert _decide(g, 0.33) == "discard"                 # mid band with no clear tile visited -> discard
    assert g._band(0.33, "downlink") == "low"            # hysteresis keeps the previous downlink
    assert g._band(0.33, None) == "mid"
    assert g._band(0.67, "discard") == "high" and g._band(0.67, None) == "mid"
    assert _decide(g, 0.5, vf=0.01) == "discard"         # too little valid data


def test_partial_downlink_lists_clear_tiles():
    g = CloudGate.from_model(early_exit={"enabled": False})
    refl_clear, _ = synthetic_scene(7, 480, "clear")
    refl_cloud, _ = synthetic_scene(8, 480, "overcast")
    scene = np.concatenate([refl_clear, refl_cloud], axis=1)   # left half clear, right half overcast
    d = g.process(scene, BANDS)
    assert d.action == "downlink" and d.partial
    cols = {c for _, c, _ in d.clear_tiles}
    assert cols and max(cols) < 2 + 1                     # clear tiles sit in the left half
    assert 0 < d.downlink_bytes < d.scene_bytes


def test_deadline_returns_degraded_best_effort():
    g = CloudGate.from_model(early_exit={"enabled": False}, deadline_s=1e-6)
    refl, _ = synthetic_scene(9, 960, "clear")
    d = g.process(refl, BANDS)
    assert d.degraded and "deadline" in d.degraded
    assert d.tiles_processed < d.tiles_total and d.action in ("downlink", "discard", "reacquire")
