"""The pixel-interleaved (HWC) tile loader and the band-planar reference loader give the same model input,
so LiteRT's masks and decisions are identical whichever loads the tile (issue 11: one pass into the
runtime's own layout), on every real scene and on awkward synthetic inputs (NaN, no-data, offsets, band
orders that force the planar fallback, scene edges)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL
from flight import CloudGate
from flight.backends import LiteRTBackend
from flight.scenefile import read_npz_scene

SCENES = sorted(REAL.glob("*/*.npz")) if REAL.is_dir() else []


def _gate(layout):
    def factory(path, model_bytes, kind, threads, tile, n_bands):
        return LiteRTBackend(path, model_bytes, threads, tile, layout=layout)

    return CloudGate.from_model(backend="litert", backend_factory=factory, early_exit={"enabled": False})


@pytest.fixture(scope="module")
def gates():
    g = {lay: _gate(lay) for lay in ("hwc", "chw")}
    yield g
    for x in g.values():
        x.close()


def _both(gates, scene, names, hwc=None, **kw):
    """hwc: whether the HWC gate must have taken its whole-window loader (None: either)."""
    out = {}
    for lay, g in gates.items():
        m = np.full(scene.shape[:2], 7, np.uint8)
        d = g.process(scene, names, mask_out=m, **kw)
        out[lay] = (d, m)
    if hwc is not None:
        assert gates["hwc"]._hwc.ready is hwc, "HWC loader not taken" if hwc else "HWC loader taken"
    assert not gates["chw"]._hwc.ready
    (d1, m1), (d2, m2) = out["hwc"], out["chw"]
    assert (d1.action, d1.fault_code, d1.cloud_fraction, d1.valid_fraction, d1.shadow_fraction) == \
           (d2.action, d2.fault_code, d2.cloud_fraction, d2.valid_fraction, d2.shadow_fraction)
    assert np.array_equal(m1, m2)
    return d1


@pytest.mark.skipif(not SCENES, reason="../shared/data/real is absent on this machine")
@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.stem)
def test_real_scenes_identical(gates, path):
    sc = read_npz_scene(path)
    _both(gates, sc["bands"], sc["band_names"], valid_mask=sc["valid_mask"], radiometry=sc["radiometry"])


def test_awkward_inputs_identical(gates):
    rng = np.random.default_rng(3)
    b4 = ["blue", "green", "red", "nir"]
    for h, w in ((300, 517), (256, 256), (1, 700), (257, 3)):
        x = rng.uniform(0, 1.2, (h, w, 4)).astype(np.float32)
        x[rng.random((h, w)) < 0.05] = np.nan
        x[rng.random((h, w)) < 0.05] = 0.0
        x[rng.random((h, w)) < 0.01, 2] = np.inf
        _both(gates, x, b4, hwc=True)
        _both(gates, x, b4, hwc=True, valid_mask=rng.random((h, w)) < 0.9)
        _both(gates, x[..., ::-1].copy(), b4[::-1], hwc=False)              # planar fallback: reversed order
        dn = (np.nan_to_num(x, posinf=0.0) * 10000).astype(np.uint16)
        _both(gates, dn, b4, hwc=True, radiometry=(2e-5, -0.1))            # offset DN rule
        six = np.concatenate([rng.uniform(0, 1, (h, w, 1)).astype(np.float32), x,
                              rng.uniform(0, 1, (h, w, 1)).astype(np.float32)], -1)
        _both(gates, six, ["coastal"] + b4 + ["swir16"], hwc=True)         # consecutive bands inside more
        _both(gates, np.ascontiguousarray(x[::2, ::3]), b4, hwc=True)
        _both(gates, x[::2, ::3], b4, hwc=True)                             # a strided view


def test_int8_argmax_equals_the_reference_argmax_on_every_int8_triple():
    """The LiteRT path's argmax (by the maximum, flight.backends._ArgmaxInt8) gives the class np.argmax gives
    (first maximum: ties go to the lower class) on all 2^24 int8 score triples; a (T, T, 3) strided view as
    the runtime's output is."""
    from flight.backends import _Argmax3, _ArgmaxInt8

    codes = np.arange(-128, 128, dtype=np.int16).astype(np.int8)
    out = np.empty((256, 256, 3), np.int8)
    out[..., 0], out[..., 1] = codes[:, None], codes[None, :]
    fast, ref = _ArgmaxInt8(256), _Argmax3(256)
    m_fast, m_ref = np.empty((256, 256), np.uint8), np.empty((256, 256), np.uint8)
    for s2 in codes:                                     # 256 planes of 65 536 (s0, s1) pairs
        out[..., 2] = s2
        fast(out[..., 0], out[..., 1], out[..., 2], m_fast)
        ref(out[..., 0], out[..., 1], out[..., 2], m_ref)
        expect = np.argmax(out, axis=-1).astype(np.uint8)
        assert np.array_equal(m_fast, expect) and np.array_equal(m_ref, expect), f"s2={s2}"
