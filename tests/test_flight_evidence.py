"""The discard guard (flight/evidence.py): never discard what the model cannot tell apart from cloud."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import REAL
from flight.evidence import SAMPLE, BrightSurfaceProbe, review_discard


def _scene(blue: float, green_over_blue: float, h=300, w=200, dtype=np.float32):
    s = np.empty((h, w, 4), dtype)
    s[..., 0] = blue
    s[..., 1] = blue * green_over_blue
    s[..., 2] = blue * green_over_blue * 0.98
    s[..., 3] = blue * 0.95
    return s


def test_probe_measures_bright_share_ratio_and_saturation():
    probe = BrightSurfaceProbe()
    s = _scene(0.6, 0.86)
    s[:150, :, :] = 0.05                              # the top half dark: half of the sample is bright
    share, gb, sat = probe.measure(s, 0, 1, 1.0, 0.0)
    assert share == pytest.approx(0.5, abs=0.03) and gb == pytest.approx(0.86, abs=1e-3)
    assert sat == 0.0                                 # a perfectly flat block shows no ceiling
    ceiling = _scene(0.6, 0.86)
    ceiling[::2, :, :2] = np.minimum(ceiling[::2, :, :2], 0.5)   # half the pixels below the detector's ceiling
    assert probe.measure(ceiling, 0, 1, 1.0, 0.0)[2] == pytest.approx(0.5, abs=0.05)
    rng = np.random.default_rng(0)
    s2 = _scene(0.6, 0.97) * rng.uniform(0.9, 1.1, (300, 200, 1)).astype(np.float32)
    share, gb, sat = probe.measure(s2, 0, 1, 1.0, 0.0)
    assert share == 1.0 and gb == pytest.approx(0.97, abs=1e-3) and sat < 0.05
    # DN with radiometry: reflectance = DN * scale + offset
    dn = np.rint((_scene(0.6, 0.86) + 0.1) / 2e-5).astype(np.uint16)
    share, gb, _ = probe.measure(dn, 0, 1, 2e-5, -0.1)
    assert share == 1.0 and gb == pytest.approx(0.86, abs=2e-3)
    # the caller's valid mask, bool or 0/1 integers as the gate accepts it: invalid pixels never count
    valid = np.zeros(dn.shape[:2], bool)
    share, gb, _ = probe.measure(dn, 0, 1, 2e-5, -0.1, valid)
    assert share == 0.0 and math.isnan(gb)
    half = np.zeros(dn.shape[:2], np.uint8)
    half[:150] = 1
    dark_bottom = _scene(0.6, 0.86)
    dark_bottom[150:] = 0.05
    assert probe.measure(dark_bottom, 0, 1, 1.0, 0.0, half)[0] == pytest.approx(1.0)
    assert probe.measure(dark_bottom, 0, 1, 1.0, 0.0, half.astype(bool))[0] == pytest.approx(1.0)
    # non-finite pixels are not valid (without a caller's mask either): they never dilute the bright share
    partly_nan = _scene(0.6, 0.86)
    partly_nan[:150, :, 1] = np.nan
    assert probe.measure(partly_nan, 0, 1, 1.0, 0.0)[0] == pytest.approx(1.0)
    nan = _scene(0.6, 0.86)
    nan[...] = np.nan
    assert probe.measure(nan, 0, 1, 1.0, 0.0)[0] == 0.0


def test_probe_sample_is_bounded_whatever_the_scene_size():
    import tracemalloc

    probe = BrightSurfaceProbe()
    big = np.broadcast_to(np.float32(0.5), (10980, 10980, 4))   # no memory behind it; the probe reads 64x64 of it
    probe.measure(big, 0, 1, 1.0, 0.0)
    tracemalloc.start()
    share, gb, _ = probe.measure(big, 0, 1, 1.0, 0.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert share == 1.0 and gb == pytest.approx(1.0)
    assert peak < 8 * SAMPLE * SAMPLE * 4    # temporaries bounded by the 64x64 sample, not by the scene


@pytest.mark.parametrize("action,rule,share,gb,sat,expect", [
    ("discard", "threshold", 1.0, 0.85, 0.0, True),       # snow/ice-like: keep the frame
    ("reacquire", "threshold", 1.0, 0.85, 0.0, True),
    ("discard", "hysteresis", 0.5, 0.88, 0.0, True),
    ("discard", "threshold", 1.0, 0.95, 0.0, False),      # cloud-deck-like: discard stands
    ("discard", "threshold", 0.05, 0.80, 0.0, False),     # too few bright pixels to judge
    ("discard", "threshold", 1.0, float("nan"), 0.0, False),
    ("discard", "threshold", 0.6, 1.10, 0.7, True),       # saturated: the ratio is unreadable
    ("discard", "min_valid_fraction", 1.0, 0.85, 0.0, False),   # not a cloud call: nothing to doubt
    ("downlink", "threshold", 1.0, 0.85, 0.0, False),
])
def test_review_discard_rule(action, rule, share, gb, sat, expect):
    override, why = review_discard(action, rule, share, gb, 0.89, 0.10, sat)
    assert override is expect and (bool(why) is expect)
    assert review_discard(action, rule, share, gb, 0.0, 0.10, sat)[0] is False   # 0 disables the guard


def _real(rel):
    p = REAL / rel
    if not p.exists():
        pytest.skip(f"{rel} not in ../shared/data/real")
    from flight.scenefile import read_npz_scene

    return read_npz_scene(p)


def _process(gate, sc):
    return gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"][:200], target_id="t",
                        valid_mask=sc["valid_mask"], radiometry=sc["radiometry"])


def _bright(gb, h=512, w=512, seed=0):
    rng = np.random.default_rng(seed)
    return (_scene(0.6, gb, h, w) * rng.uniform(0.95, 1.05, (h, w, 1))).astype(np.float32)


def test_gate_downlinks_a_snow_like_frame_the_model_calls_cloud():
    """A model that calls every bright pixel cloud (the test backend): a snow/ice-like frame is downlinked with
    rule ambiguous_surface and a coded event; a cloud-deck-like frame is still discarded; with the guard off
    the snow-like frame is discarded: what the guard prevents."""
    from conftest import brightness_backend
    from flight import CloudGate

    for early in (False, True):
        gate = CloudGate.from_model(backend_factory=brightness_backend, early_exit={"enabled": early, "min_tiles": 2})
        off = CloudGate.from_model(backend_factory=brightness_backend, policy={"discard_guard_green_blue": 0.0},
                                   early_exit={"enabled": early, "min_tiles": 2})
        try:
            bands = ("blue", "green", "red", "nir")
            d = gate.process(_bright(0.855), bands, scene_id="ice")
            assert d.cloud_fraction == 1.0 and d.action == "downlink" and d.rule == "ambiguous_surface", (d.rule, d.reason)
            assert [e["code"] for e in d.degraded] == ["ambiguous_bright_surface"] and "green/blue" in d.reason
            deck = gate.process(_bright(0.95), bands, scene_id="deck")
            assert deck.action == "discard" and deck.rule in ("threshold", "early_exit"), deck.reason
            assert off.process(_bright(0.855), bands, scene_id="ice").action == "discard"
            hi = gate.process(_bright(0.855), bands, scene_id="ice", priority=3)      # re-acquisition drops it too
            assert hi.action == "downlink" and hi.rule == "ambiguous_surface"
        finally:
            gate.close()
            off.close()


def test_real_cloud_decks_are_still_discarded_and_the_clear_ice_sheet_kept(gate_litert):
    """The shipped student through the gate: the clear ice sheet is downlinked (by the model or the guard),
    the overcast decks (bright, green/blue >= 0.9) are discarded."""
    ice = _process(gate_litert, _real("l8biome_lkpeng_patches/l8biome_SnowIce_00_1415.npz"))
    assert ice.action == "downlink", (ice.rule, ice.reason)
    for deck in ("l8biome_Barren_10_0206", "l8biome_Urban_01_0609", "l8biome_SnowIce_11_1123"):
        d = _process(gate_litert, _real(f"l8biome_lkpeng_patches/{deck}.npz"))
        assert d.action == "discard" and d.rule in ("threshold", "early_exit"), (deck, d.rule, d.reason)
