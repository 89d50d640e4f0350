"""Decision policy, early exit and deadline, on synthetic scenes with exact labels."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import brightness_backend, synthetic_scene
from flight import CloudGate, PolicyConfig
from flight.policy import TargetHistory, TileCounts, decide, policy_band

BANDS = ("blue", "green", "red", "nir")


@pytest.fixture(scope="module")
def bench_scenes():
    """Synthetic benchmark set: clearly clear and clearly overcast 1920² scenes (64 tiles each)."""
    return {f"{kind}{i}": synthetic_scene(100 + i, 1920, kind) for kind in ("clear", "overcast") for i in range(3)}


@pytest.fixture(scope="module")
def gates():
    # the brightness oracle behind the backend port: these tests check the gate's early exit and
    # policy mechanics, not the shipped model's reading of procedural scenes
    return (CloudGate.from_model(early_exit={"enabled": True}, backend_factory=brightness_backend),
            CloudGate.from_model(early_exit={"enabled": False}, backend_factory=brightness_backend))


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


POLICY = PolicyConfig(downlink_max_cloud=0.3, discard_min_cloud=0.7, reacquire_priority=2, reacquire_min_cloud=0.5,
                      hysteresis=0.05, min_valid_fraction=0.05, tile_clear_max=0.1)
# 4 tiles on a 2x2 grid: tile 0 clear (0.02), the others overcast (0.9): a mid-band scene has one clear tile
MIXED = TileCounts(cloud=np.array([2, 90, 90, 90]), valid=np.array([100] * 4), visited=np.ones(4, bool), n_tiles=4,
                   cols=2)
ALL_CLOUDY = TileCounts.uniform(0.9, n_tiles=4, cols=2)


def _act(cf, vf=1.0, priority=0, prev=None, tiles=MIXED):
    d = decide(cf, vf, priority, prev, tiles, POLICY)
    return d.action, d.partial


def test_thresholds_and_priority():
    assert _act(0.1) == ("downlink", False)
    assert decide(0.1, 1.0, 0, None, MIXED, POLICY).rule == "threshold"
    assert _act(0.3) == ("downlink", False)                    # at the edge: downlink
    assert _act(0.7) == ("discard", False)                     # at the edge: discard (70 % rule)
    assert _act(0.8) == ("discard", False)
    assert _act(0.8, priority=2) == ("reacquire", False)
    assert _act(0.33) == ("downlink", True)                     # mid band with a clear tile -> partial downlink
    assert _act(0.33, tiles=ALL_CLOUDY) == ("discard", False)   # mid band, no clear tile -> discard
    d = decide(0.33, 1.0, 0, None, MIXED, POLICY)
    assert d.clear_tiles == [(0, 0, 0.02)] and d.band == "mid"
    assert d.thresholds["downlink_max_cloud"] == 0.3 and d.thresholds["discard_min_cloud"] == 0.7


def test_min_valid_fraction_decides_before_the_cloud_fraction():
    d = decide(0.1, 0.01, 0, None, MIXED, POLICY)
    assert (d.action, d.rule) == ("discard", "min_valid_fraction") and "min_valid_fraction" in d.reason
    assert decide(0.1, 0.01, 2, None, MIXED, POLICY).action == "reacquire"
    assert _act(0.1, vf=0.05) == ("downlink", False)            # at the limit: judged


def test_reacquire_min_cloud():
    """Between the thresholds, a high-priority target is re-acquired only from reacquire_min_cloud up."""
    assert _act(0.49, priority=2) == ("downlink", True)
    assert _act(0.50, priority=2) == ("reacquire", True)        # keeps the clear tiles it has
    assert _act(0.50, priority=2, tiles=ALL_CLOUDY) == ("reacquire", False)
    assert _act(0.50, priority=1) == ("downlink", True)         # below reacquire_priority: never re-acquired
    assert _act(0.69, priority=1, tiles=ALL_CLOUDY) == ("discard", False)


def test_hysteresis_widens_the_previous_band_and_says_so():
    assert policy_band(0.33, POLICY, "downlink") == "low" and policy_band(0.33, POLICY, None) == "mid"
    assert policy_band(0.67, POLICY, "discard") == "high" and policy_band(0.67, POLICY, None) == "mid"
    assert policy_band(0.36, POLICY, "downlink") == "mid"       # only by `hysteresis`
    d = decide(0.33, 1.0, 0, "downlink", ALL_CLOUDY, POLICY)
    assert (d.action, d.rule) == ("downlink", "hysteresis") and "previous action downlink" in d.reason
    assert d.thresholds["downlink_max_cloud"] == pytest.approx(0.35)
    assert decide(0.67, 1.0, 0, "discard", MIXED, POLICY).action == "discard"
    assert decide(0.1, 1.0, 0, "downlink", MIXED, POLICY).rule == "threshold"   # same action without history


def test_hysteresis_after_reacquire():
    """A re-acquired target keeps being re-acquired down to discard_min_cloud - hysteresis."""
    assert _act(0.67, priority=2) == ("reacquire", True)        # mid band, >= reacquire_min_cloud
    d = decide(0.67, 1.0, 2, "reacquire", MIXED, POLICY)
    assert (d.action, d.partial, d.rule) == ("reacquire", False, "hysteresis")   # high band: whole frame again
    assert decide(0.67, 1.0, 0, "reacquire", MIXED, POLICY).action == "discard"
    assert _act(0.64, priority=2, prev="reacquire") == ("reacquire", True)      # back in the mid band


def test_target_history_is_bounded_and_per_target():
    h = TargetHistory(2)
    h.record(None, "discard")
    assert not h and h.previous(None) is None
    h.record("a", "downlink"); h.record("b", "discard"); h.record("a", "discard"); h.record("c", "downlink")
    assert len(h) == 2 and h.previous("b") is None                # least recently seen forgotten
    assert (h.previous("a"), h.previous("c")) == ("discard", "downlink")


def test_gate_uses_the_public_policy_with_target_history():
    g = CloudGate.from_model(early_exit={"enabled": False}, policy={"hysteresis": 0.19})
    refl, _ = synthetic_scene(8, 480, "overcast")
    first = g.process(refl, BANDS, target_id="T")
    want = decide(first.cloud_fraction, first.valid_fraction, 0, None, TileCounts.uniform(1.0), g.config.policy)
    assert first.action == want.action and first.thresholds == want.thresholds


def test_partial_downlink_lists_clear_tiles():
    g = CloudGate.from_model(early_exit={"enabled": False}, backend_factory=brightness_backend)
    refl_clear, _ = synthetic_scene(7, 480, "clear")
    refl_cloud, _ = synthetic_scene(8, 480, "overcast")
    scene = np.concatenate([refl_clear, refl_cloud], axis=1)   # left half clear, right half overcast
    d = g.process(scene, BANDS)
    assert d.action == "downlink" and d.partial
    cols = {c for _, c, _ in d.clear_tiles}
    assert d.grid == (2, 4) and d.core_pixels == 240      # 480 x 960 in 240-pixel cores
    assert cols and max(cols) <= 1                        # clear tiles sit in the left half (cols 0, 1)
    assert 0 < d.downlink_bytes < d.scene_bytes


def test_deadline_returns_degraded_best_effort():
    g = CloudGate.from_model(early_exit={"enabled": False}, deadline_s=1e-6)
    refl, _ = synthetic_scene(9, 960, "clear")
    d = g.process(refl, BANDS)
    assert [e["code"] for e in d.degraded][:1] == ["deadline"] and d.degraded[0]["severity"] == "warning"
    assert d.rule in ("deadline", "min_valid_fraction") and "deadline" in d.reason
    assert d.tiles_processed < d.tiles_total
    want = decide(d.cloud_fraction, d.valid_fraction, 0, None, TileCounts.uniform(d.cloud_fraction), g.config.policy)
    assert d.action == want.action != "fault"             # the policy's action on the visited tiles
