"""Property tests (hypothesis): any shape, dtype, NaN/Inf and valid mask -> never a crash, sane outputs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_check import assert_policy_consistent

BANDS = ("blue", "green", "red", "nir")
DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64]


@st.composite
def scenes(draw):
    h = draw(st.integers(1, 300))
    w = draw(st.integers(1, 300))
    dt = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        scene = rng.integers(max(info.min, -1000), min(info.max, 60000) + 1, (h, w, 4)).astype(dt)
    else:
        scene = rng.uniform(-0.1, 1.5, (h, w, 4)).astype(dt)
        n_bad = draw(st.integers(0, 20))
        for _ in range(n_bad):
            scene[rng.integers(h), rng.integers(w), rng.integers(4)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if draw(st.booleans()):
            scene[: h // 2] = np.nan
    valid = None
    if draw(st.booleans()):
        valid = rng.random((h, w)) > draw(st.floats(0, 1))
    return scene, valid


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes(), st.booleans())
def test_never_crashes_and_outputs_are_sane(gate_litert, sv, want_mask):
    scene, valid = sv
    h, w, _ = scene.shape
    mask = np.full((h, w), 77, np.uint8) if want_mask else None
    radiometry = (2e-5, -0.1) if scene.dtype.kind in "iu" else None
    d = gate_litert.process(scene, BANDS, scene_id="prop", mask_out=mask, valid_mask=valid, radiometry=radiometry)
    assert 0.0 <= d.cloud_fraction <= 1.0 and 0.0 <= d.valid_fraction <= 1.0
    lo, hi = d.confidence_bound
    assert 0.0 <= lo <= hi <= 1.0
    if d.action == "fault":
        assert d.fault_code in ("all_invalid", "implausible_radiometry") and d.rule == "fault", d.fault
        if d.fault_code == "implausible_radiometry":       # only a scene that is dark (e.g. uint8 DN at 2e-5 - 0.1)
            scale, offset = radiometry or (1.0, 0.0)
            refl = scene.astype(np.float64) * scale + offset
            ok = np.isfinite(refl).all(axis=2) & (scene != 0).any(axis=2) & (True if valid is None else valid)
            assert ok.any() and (refl[ok] >= 0.01).any(axis=1).mean() <= 0.25, d.fault
        return
    assert_policy_consistent(d, gate_litert.config.policy)   # the action the policy gives these numbers
    if want_mask:
        codes = set(np.unique(mask))
        assert codes <= {0, 1, 2, 255}
        if valid is not None:
            assert (mask[~valid] == 255).all()
        if scene.dtype.kind == "f":
            assert (mask[~np.isfinite(scene).all(axis=2)] == 255).all()
        v = mask != 255
        assert d.valid_fraction == pytest.approx(v.mean())
        assert d.cloud_fraction == pytest.approx((mask == 1).sum() / max(v.sum(), 1))


@pytest.mark.parametrize("shape", [(20, 1), (7, 5), (300, 3)])
def test_narrow_float_scene_validity_is_exact_and_repeatable(gate_litert, shape):
    """Regression: numpy 2.4's isfinite into a strided view left stale validity from the previous tile."""
    rng = np.random.default_rng(0)
    scene = rng.uniform(-0.1, 1.5, shape + (4,)).astype(np.float16)
    scene[shape[0] // 2, 0] = [np.nan, np.inf, np.nan, 0.1]
    expected_valid = np.isfinite(scene.astype(np.float32)).all(axis=2).mean()
    masks = []
    for _ in range(3):
        mask = np.full(shape, 77, np.uint8)
        d = gate_litert.process(scene, BANDS, mask_out=mask)
        assert d.valid_fraction == pytest.approx(expected_valid)
        assert mask[shape[0] // 2, 0] == 255
        masks.append(mask)
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
