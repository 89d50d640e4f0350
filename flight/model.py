"""Model cards and model resolution: the gate refuses a model whose sha256 differs from its card."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError, ModelIntegrityError, ModelMissingError

_BUNDLED = Path(__file__).resolve().parent / "_models"        # written by setup.py into built packages
_CHECKOUT = Path(__file__).resolve().parents[1] / "models"    # a source checkout (editable install, tests)


def resolve_models_dir() -> Path:
    """Where the default model is looked up: $CLOUDGATE_MODELS, else the model shipped inside the installed
    package (flight/_models, present in wheels and non-editable installs), else the checkout's models/."""
    env = os.environ.get("CLOUDGATE_MODELS")
    if env:
        return Path(env)
    return _BUNDLED if _BUNDLED.is_dir() else _CHECKOUT


MODELS_DIR = resolve_models_dir()


@dataclass
class ModelCard:
    name: str
    bands: tuple[str, ...]
    classes: tuple[str, ...]
    tile: int
    artifacts: dict
    path: Path
    raw: dict
    sha256_of_loaded: str = ""
    optional_bands: tuple[str, ...] = ()   # used when the scene has all of them; else 0 and the flag 0

    @property
    def input_channels(self) -> int:
        """Model input channels: the bands, plus the presence flag of the optional bands when there are any."""
        return len(self.bands) + (1 if self.optional_bands else 0)


def load_card(path: Path) -> ModelCard:
    import yaml  # init-time only

    if not path.exists():
        raise ModelMissingError(f"model card {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
        card = ModelCard(name=raw["name"], bands=tuple(raw["bands"]), classes=tuple(raw["output"]["classes"]),
                         tile=int(raw["tile"]), artifacts=raw["artifacts"], path=path, raw=raw,
                         optional_bands=tuple(raw.get("optional_bands") or ()))
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ModelIntegrityError(f"model card {path} is unreadable or incomplete ({e}); regenerate it with "
                                  "python -m ground export") from e
    if not card.bands or not all(isinstance(b, str) for b in card.bands + card.optional_bands):
        raise ModelIntegrityError(f"model card {path}: bands and optional_bands must be lists of band names")
    stray = [b for b in card.optional_bands if b not in card.bands]
    if stray or len(card.optional_bands) >= len(card.bands):
        raise ModelIntegrityError(f"model card {path}: optional_bands {list(card.optional_bands)} must be a proper "
                                  f"subset of bands {list(card.bands)}")
    return card


def _runtime_available(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def default_card(models_dir: Path = MODELS_DIR) -> Path:
    if not models_dir.is_dir():
        raise ModelMissingError(f"no models directory at {models_dir}; set CLOUDGATE_MODELS or pass a model path")
    import yaml

    for p in sorted(models_dir.glob("*.yaml")):
        try:
            if (yaml.safe_load(p.read_text()) or {}).get("default"):
                return p
        except yaml.YAMLError:
            continue
    raise ModelMissingError(f"no model card marked 'default: true' in {models_dir}")


def _card_for_artifact(model: Path) -> Path:
    for p in sorted(model.parent.glob("*.yaml")):
        try:
            card = load_card(p)
        except ModelError:
            continue
        if any(a.get("file") == model.name for a in card.artifacts.values()):
            return p
    raise ModelMissingError(f"no model card beside {model} lists it; the gate only runs carded models "
                            "(python -m ground export writes the card)")


def read_verified(artifact: Path, expected_sha256: str, card_path: Path) -> bytes:
    """The artifact's bytes, read once, after checking them against the card's sha256."""
    if not artifact.exists():
        raise ModelMissingError(f"model file {artifact} (listed in {card_path.name}) not found")
    data = artifact.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ModelIntegrityError(f"{artifact} sha256 {digest[:16]}… does not match its model card "
                                  f"({expected_sha256[:16]}…): corrupt or altered model, refusing to load")
    return data


def resolve_model(model: str | None, backend: str) -> tuple[ModelCard, Path, bytes]:
    """-> (card, artifact path, verified artifact bytes). Picks the INT8 artifact matching the backend."""
    if model is None:
        card_path = default_card()
        artifact = None
    else:
        p = Path(model)
        if not p.exists():
            raise ModelMissingError(f"model {p} not found")
        if p.suffix in (".yaml", ".yml"):
            card_path, artifact = p, None
        elif p.suffix in (".tflite", ".onnx"):
            card_path, artifact = _card_for_artifact(p), p
        else:
            raise ModelError(f"model {p}: use a .tflite, .onnx or model card .yaml")
    card = load_card(card_path)
    if artifact is None:
        want = backend
        if want == "auto":
            want = "litert" if (_runtime_available("ai_edge_litert") or _runtime_available("tflite_runtime")) else "onnxruntime"
        key = "tflite_int8" if want == "litert" else "onnx_int8"
        if key not in card.artifacts:
            raise ModelMissingError(f"model card {card_path} has no {key} artifact")
        artifact = card_path.parent / card.artifacts[key]["file"]
    entry = next((a for a in card.artifacts.values() if a.get("file") == artifact.name), None)
    if entry is None:
        raise ModelIntegrityError(f"{artifact.name} is not listed in model card {card_path}")
    data = read_verified(artifact, entry["sha256"], card_path)
    card.sha256_of_loaded = entry["sha256"]
    return card, artifact, data
