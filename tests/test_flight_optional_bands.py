"""Optional bands (card `optional_bands`, e.g. SWIR): the gate feeds them when the scene has all of them,
else zero planes and a presence flag of 0; required bands still fault when missing; a card whose band
count does not match the runtime's input is refused (FLT-04b)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from flight import CloudGate
from flight.errors import BandMismatchError, ModelIntegrityError
from flight.model import default_card, load_card

SIX = ["blue", "green", "red", "nir", "swir16", "swir22"]


class CapturingBackend:
    """Backend port stub: records the input planes of the last tile, calls everything clear."""

    name = "capture-test"

    def __init__(self, tile, n_bands, affine=(1.0, 0.0), rng=(-1.0, 4.0), layout="chw"):
        self.tile, self.n_bands, self.layout = tile, n_bands, layout
        self.input_affine, self.input_range = affine, rng
        self.planes = np.zeros((n_bands, tile, tile) if layout == "chw" else (tile, tile, n_bands), np.float32)
        self.seen = np.zeros((n_bands, tile, tile), np.float32)      # always (C, T, T) for the checks

    def infer(self, planes, mask_out):
        np.copyto(self.seen, planes if self.layout == "chw" else planes.transpose(2, 0, 1))
        mask_out.fill(0)


def _card_with(tmp_path, **changes):
    src = load_card(default_card())
    raw = dict(src.raw, **changes)
    for a in raw["artifacts"].values():
        shutil.copy(src.path.parent / a["file"], tmp_path / a["file"])
    # these tests drive the gate's card handling with a capturing backend: the copied ONNX model must not carry
    # the shipped card's own description (flight.modelmeta would refuse the edited card before the checks here)
    from conftest import drop_onnx_description

    raw = drop_onnx_description(raw, tmp_path)
    p = tmp_path / "opt.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _gate(card, affine=(1.0, 0.0), rng=(-1.0, 4.0), layout="chw"):
    made = {}

    def factory(path, model_bytes, kind, threads, tile, n_bands):
        made["b"] = CapturingBackend(tile, n_bands, affine, rng, layout)
        return made["b"]

    # one worker: the test reads the one capturing backend it made (workers: auto would make one per core)
    return CloudGate.from_model(card, backend="onnxruntime", backend_factory=factory, workers=1,
                                early_exit={"enabled": False}), made


@pytest.mark.parametrize("layout", ["chw", "hwc"])
@pytest.mark.parametrize("affine,rng", [((1.0, 0.0), (-1.0, 4.0)), ((1 / 0.00627, -128.0), (-128.0, 127.0))])
def test_optional_bands_fed_when_present_zero_and_flag_off_when_absent(tmp_path, affine, rng, layout):
    card = _card_with(tmp_path, bands=SIX, optional_bands=["swir16", "swir22"])
    gate, made = _gate(card, affine, rng, layout)
    try:
        b = made["b"]
        assert b.n_bands == 7 and gate.optional_bands == ("swir16", "swir22")
        scene = np.empty((64, 64, 6), np.float32)
        scene[...] = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)
        gain, off = affine
        d = gate.process(scene, SIX)
        assert d.action != "fault", d.fault
        got = b.seen[:, :64, :64].reshape(7, -1)
        want = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0]) * gain + off
        np.testing.assert_allclose(got.mean(1), want, rtol=1e-5, atol=1e-3)
        # the scene's band order does not matter, names do
        d = gate.process(scene[..., ::-1].copy(), SIX[::-1])
        np.testing.assert_allclose(b.seen[:, :64, :64].reshape(7, -1).mean(1), want, rtol=1e-5, atol=1e-3)
        # VNIR only: SWIR planes are reflectance 0 and the flag is 0, on every pixel of the tile
        b.seen.fill(-7.0)
        d = gate.process(scene[..., :4].copy(), SIX[:4])
        assert d.action != "fault", d.fault
        np.testing.assert_allclose(b.seen[:4, :64, :64].reshape(4, -1).mean(1), want[:4], rtol=1e-5, atol=1e-3)
        assert np.all(b.seen[4:] == np.float32(off))
        # one SWIR band alone is not enough: both are treated as absent (and the frame is still gated)
        b.seen.fill(-7.0)
        d = gate.process(scene[..., :5].copy(), SIX[:5])
        assert d.action != "fault", d.fault
        np.testing.assert_allclose(b.seen[:4, :64, :64].reshape(4, -1).mean(1), want[:4], rtol=1e-5, atol=1e-3)
        assert np.all(b.seen[4:] == np.float32(off))
        # a required band is still required
        d = gate.process(scene[..., 1:].copy(), SIX[1:])
        assert d.action == "fault" and d.fault_code == BandMismatchError.code and "blue" in d.fault
    finally:
        gate.close()


def test_card_band_count_must_match_runtime_input(tmp_path):
    """A 3-band card on the shipped model (or a 6-band card without the presence flag) is refused for
    both runtimes, naming the channel counts."""
    n = load_card(default_card()).input_channels
    card = _card_with(tmp_path, bands=["blue", "green", "red"] if n != 3 else SIX, optional_bands=[])
    for backend in ("litert", "onnxruntime"):
        # refused by the model file's own description (LiteRT artifact, stamped) or by the runtime's input (ONNX)
        with pytest.raises(ModelIntegrityError, match="input channels|input_channels: card 3 but the model file says 4"):
            CloudGate.from_model(card, backend=backend)


@pytest.mark.parametrize("opt", [["cirrus"], ["blue", "green", "red", "nir"], "swir16"])
def test_bad_optional_bands_in_card_refused(tmp_path, opt):
    card = _card_with(tmp_path, bands=["blue", "green", "red", "nir"], optional_bands=opt)
    with pytest.raises(ModelIntegrityError):
        CloudGate.from_model(card, backend="onnxruntime")
