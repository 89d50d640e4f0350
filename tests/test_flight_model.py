"""Model resolution and integrity: a corrupted or uncarded model is refused, never run."""
from __future__ import annotations

import shutil

import pytest

from flight import CloudGate, ModelIntegrityError, ModelMissingError
from flight.model import MODELS_DIR, default_card, load_card


@pytest.fixture()
def model_copy(tmp_path):
    card = load_card(default_card())
    shutil.copy(card.path, tmp_path / card.path.name)
    for a in card.artifacts.values():
        shutil.copy(MODELS_DIR / a["file"], tmp_path / a["file"])
    return tmp_path, card


def test_default_model_loads_and_card_matches(gate_litert, gate_ort):
    """The sha256 the gate reports is the hash of the artifact file it loaded, as listed in the card."""
    import hashlib

    for g, key in ((gate_litert, "tflite_int8"), (gate_ort, "onnx_int8")):
        entry = g.card.artifacts[key]
        artifact = g.card.path.parent / entry["file"]
        assert hashlib.sha256(artifact.read_bytes()).hexdigest() == entry["sha256"] == g.card.sha256_of_loaded
        assert g.card.path == default_card() and g.card.name
        assert g.bands == tuple(g.card.raw["bands"]) == ("blue", "green", "red", "nir")


@pytest.mark.parametrize("key", ["tflite_int8", "onnx_int8"])
@pytest.mark.parametrize("offset", [0, 1000, -3])
def test_bit_flipped_model_is_refused(model_copy, key, offset):
    d, card = model_copy
    f = d / card.artifacts[key]["file"]
    data = bytearray(f.read_bytes())
    data[offset] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        CloudGate.from_model(f)


def test_uncarded_model_is_refused(model_copy):
    d, card = model_copy
    (d / card.path.name).unlink()
    with pytest.raises(ModelMissingError, match="card"):
        CloudGate.from_model(d / card.artifacts["tflite_int8"]["file"])


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelMissingError):
        CloudGate.from_model(tmp_path / "nope.tflite")


def test_card_path_selects_backend(model_copy):
    d, card = model_copy
    g = CloudGate.from_model(d / card.path.name, backend="onnxruntime")
    assert g.backend.name == "onnxruntime"
