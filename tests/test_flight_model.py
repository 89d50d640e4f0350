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


def test_missing_model_message_stands_alone(tmp_path):
    """Issue 25 item 7: from_model("models/nope.yaml") said only "not found". The message names the folder a
    relative path was looked up in and what to pass instead, with no chained cause repeating it."""
    import subprocess
    import sys

    code = "from flight import CloudGate\nCloudGate.from_model('models/nope.yaml')\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("flight.errors.ModelMissingError: model models/nope.yaml not found")
    assert str(tmp_path) in last and "pass an existing model card (.yaml), .tflite or .onnx file" in last
    assert "'default'" in last and "During handling" not in r.stderr and "direct cause" not in r.stderr


def test_default_names_the_shipped_model(gate_ort):
    """'default' (as for python -m flight model pack) is the shipped default, as no model is."""
    g = CloudGate.from_model("default", backend="onnxruntime")
    assert g.card.path == default_card() and g.card.sha256_of_loaded == gate_ort.card.sha256_of_loaded
    g.close()


def test_card_path_selects_backend(model_copy):
    d, card = model_copy
    g = CloudGate.from_model(d / card.path.name, backend="onnxruntime")
    assert g.backend.name == "onnxruntime"
