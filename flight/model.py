"""Model cards and model resolution: the gate refuses a model whose sha256 differs from its card."""
from __future__ import annotations

import hashlib
import math
import os
import stat
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
    downsample: int = 1                    # card input_grid.downsample: the grid the model was trained and
                                           # validated at (2: 2x2-averaged reflectance; flight.scan)

    @property
    def input_channels(self) -> int:
        """Model input channels: the bands, plus the presence flag of the optional bands when there are any."""
        return len(self.bands) + (1 if self.optional_bands else 0)


MAX_CARD_BYTES = 1 << 20          # a model card is a few KiB of YAML
MAX_ARTIFACT_BYTES = 64 << 20     # CloudScout flew a <= 5 MB model; anything near this bound is not a model
INPUT_GRID_DOWNSAMPLE = (1, 2)    # card input_grid.downsample the gate can run: full resolution, 2x2 averaged
GATE_CLASSES = ("clear", "cloud", "shadow")   # the gate's mask codes 0, 1, 2 (flight.gate CLEAR/CLOUD/SHADOW)
_HEX = set("0123456789abcdef")


def read_regular_file(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most max_bytes, read once. A device, FIFO, socket or directory
    (also behind a symlink: /dev/urandom, /dev/zero) is refused without reading from it (opened with
    O_NONBLOCK, checked with fstat), and so is a file larger than max_bytes or one that grows while read.
    Raises ModelMissingError (absent) or ModelIntegrityError (anything else)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ModelMissingError(f"{what} {path} not found") from None
    except OSError as e:
        raise ModelIntegrityError(f"{what} {path} cannot be opened: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                    else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            raise ModelIntegrityError(f"{what} {path} is {kind}{' (through a symlink)' if path.is_symlink() else ''}; "
                                      "only regular files are read")
        if st.st_size > max_bytes:
            raise ModelIntegrityError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes}-byte bound")
        chunks, total = [], 0
        while True:                                  # bounded: stops at max_bytes + 1
            b = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > max_bytes:
                raise ModelIntegrityError(f"{what} {path} grew past the {max_bytes}-byte bound while being read")
        return b"".join(chunks)
    except OSError as e:
        raise ModelIntegrityError(f"{what} {path} cannot be read: {e}") from None
    finally:
        os.close(fd)


def _card_error(path, field: str, problem: str) -> ModelIntegrityError:
    return ModelIntegrityError(f"model card {path}: field '{field}' {problem}; regenerate it with python -m ground export")


def _check_artifacts(arts, path) -> dict:
    """artifacts: {key: {file: plain file name, sha256: 64 lower-case hex, bytes: optional int}}."""
    if not isinstance(arts, dict) or not arts:
        raise _card_error(path, "artifacts", f"must be a non-empty mapping of artifact entries, got {type(arts).__name__}")
    for key, a in arts.items():
        where = f"artifacts.{key}"
        if not isinstance(a, dict):
            raise _card_error(path, where, f"must be a mapping with file and sha256, got {type(a).__name__} {a!r:.60}")
        f, sha = a.get("file"), a.get("sha256")
        if not isinstance(f, str) or not f or f in (".", "..") or "/" in f or "\\" in f or "\0" in f:
            raise _card_error(path, where + ".file", f"must be a plain file name beside the card, got {f!r:.80}")
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
            raise _card_error(path, where + ".sha256", f"must be 64 lower-case hex digits, got {sha!r:.80}")
        n = a.get("bytes")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_ARTIFACT_BYTES):
            raise _card_error(path, where + ".bytes", f"must be a byte count in 1..{MAX_ARTIFACT_BYTES}, got {n!r:.40}")
    return arts


def _input_grid(raw: dict, path) -> int:
    """input_grid (optional): {downsample: 1 | 2}, the grid the model was trained and validated at; absent: 1."""
    grid = raw.get("input_grid")
    if grid is None:
        return 1
    fix = ("write input_grid: {downsample: 2} for a model trained and validated on 2x2-averaged reflectance, "
           "{downsample: 1} (or no input_grid) for full resolution")
    if not isinstance(grid, dict) or set(grid) != {"downsample"}:
        raise ModelIntegrityError(f"model card {path}: field 'input_grid' must be a mapping with exactly the key "
                                  f"downsample, got {grid!r:.80}; {fix}")
    d = grid["downsample"]
    if not isinstance(d, int) or isinstance(d, bool) or d not in INPUT_GRID_DOWNSAMPLE:
        raise ModelIntegrityError(f"model card {path}: field 'input_grid.downsample' must be 1 or 2 (the gate "
                                  f"averages 2x2 blocks or none), got {d!r:.40}; {fix}")
    return d


def card_from_text(text: bytes | str, path: Path) -> ModelCard:
    """A ModelCard from card YAML (a file's or a package member's); every field checked, errors name it."""
    import yaml  # init-time only

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ModelIntegrityError(f"model card {path} is not valid YAML ({e}); regenerate it with python -m ground export") from e
    if not isinstance(raw, dict):
        raise ModelIntegrityError(f"model card {path} is not a mapping; regenerate it with python -m ground export")
    for key in ("name", "bands", "output", "tile", "artifacts"):
        if key not in raw:
            raise _card_error(path, key, "is missing")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise _card_error(path, "name", "must be a non-empty string")
    out = raw["output"]
    if not isinstance(out, dict) or not isinstance(out.get("classes"), list):
        raise _card_error(path, "output.classes", "must be a list of class names")
    tile = raw["tile"]
    if not isinstance(tile, int) or isinstance(tile, bool) or not 16 <= tile <= 4096:
        raise _card_error(path, "tile", f"must be an integer tile size, got {tile!r:.40}")
    bands, optional = raw["bands"], raw.get("optional_bands") or []
    if not isinstance(bands, list) or not isinstance(optional, list):
        raise _card_error(path, "bands", "and optional_bands must be lists of band names")
    card = ModelCard(name=raw["name"], bands=tuple(bands), classes=tuple(out["classes"]), tile=tile,
                     artifacts=_check_artifacts(raw["artifacts"], path), path=path, raw=raw,
                     optional_bands=tuple(optional), downsample=_input_grid(raw, path))
    if not card.bands or not all(isinstance(b, str) for b in card.bands + card.optional_bands + card.classes):
        raise ModelIntegrityError(f"model card {path}: bands, optional_bands and output.classes must be lists of names")
    if len(set(card.bands)) != len(card.bands):
        raise _card_error(path, "bands", f"lists a band twice: {list(card.bands)}")
    mv = raw.get("model_version")
    if mv is not None and (not isinstance(mv, int) or isinstance(mv, bool) or not 0 < mv < 2**63):
        raise _card_error(path, "model_version", f"must be a positive integer (the package's monotonic version), "
                                                 f"got {mv!r:.40}")
    stray = [b for b in card.optional_bands if b not in card.bands]
    if stray or len(card.optional_bands) >= len(card.bands):
        raise ModelIntegrityError(f"model card {path}: optional_bands {list(card.optional_bands)} must be a proper "
                                  f"subset of bands {list(card.bands)}")
    return card


def load_card(path: Path) -> ModelCard:
    return card_from_text(read_regular_file(Path(path), MAX_CARD_BYTES, "model card"), Path(path))


def _card_number(card: ModelCard, dotted: str):
    cur = card.raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise _card_error(card.path, dotted, "is missing (needed to check the model against its card)")
        cur = cur[part]
    if not isinstance(cur, (int, float)) or isinstance(cur, bool):
        raise _card_error(card.path, dotted, f"must be a number, got {cur!r:.40}")
    return cur


def check_consistency(card: ModelCard, backend, artifact: str) -> None:
    """The card must describe the model the runtime loaded: input channels = the card's bands (+ the
    presence flag of optional bands), output classes = the card's classes (the gate's clear/cloud/shadow
    codes), the full-integer model's quantization = the card's input_scaling / output scales, its fixed
    tile = the card's tile. Any mismatch -> ModelIntegrityError naming the card field. Checks only what
    the backend exposes (test backends on the gate's port expose little)."""
    def bad(field: str, card_value, model_value) -> ModelIntegrityError:
        return ModelIntegrityError(f"model card {card.path.name} field '{field}' = {card_value} but {artifact} has "
                                   f"{model_value}: the card does not belong to this model, refusing to load")

    if card.classes != GATE_CLASSES:
        raise bad("output.classes", list(card.classes), f"the gate's mask codes {list(GATE_CLASSES)} (0, 1, 2)")
    codes = card.raw["output"].get("codes")
    if codes is not None and codes != {c: i for i, c in enumerate(GATE_CLASSES)}:
        raise bad("output.codes", codes, "codes clear 0, cloud 1, shadow 2")
    n = getattr(backend, "n_bands", None)
    if n is not None and int(n) != card.input_channels:
        extra = " + presence flag" if card.optional_bands else ""
        raise bad("bands", f"{list(card.bands)}{extra} ({card.input_channels} input channels)", f"{n} input channels")
    k = getattr(backend, "n_classes", None)
    if k is not None and int(k) != len(card.classes):
        raise bad("output.classes", f"{list(card.classes)} ({len(card.classes)} classes)", f"{k} output channels")
    native = getattr(backend, "native_tile", None)
    if native is not None and int(native) != card.tile:
        raise bad("tile", card.tile, f"a fixed {native}x{native} input")
    for field, quant in (("input_scaling.tflite", getattr(backend, "input_quant", None)),
                         ("output.tflite", getattr(backend, "output_quant", None))):
        if quant is None:
            continue
        scale, zero = float(_card_number(card, field + ".scale")), int(_card_number(card, field + ".zero_point"))
        if not math.isclose(scale, quant[0], rel_tol=1e-6) or zero != quant[1]:
            raise bad(field, f"scale {scale:.9g}, zero_point {zero}", f"scale {quant[0]:.9g}, zero_point {quant[1]}")


def _runtime_available(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def default_card(models_dir: Path = MODELS_DIR) -> Path:
    if not models_dir.is_dir():
        raise ModelMissingError(f"no models directory at {models_dir}; set CLOUDGATE_MODELS or pass a model path")
    import yaml

    for p in sorted(models_dir.glob("*.yaml")):
        try:
            raw = yaml.safe_load(read_regular_file(p, MAX_CARD_BYTES, "model card"))
        except (yaml.YAMLError, ModelError):
            continue
        if isinstance(raw, dict) and raw.get("default"):
            return p
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
    """The artifact's bytes, read once (a bounded regular file), after checking them against the card's sha256."""
    try:
        data = read_regular_file(artifact, MAX_ARTIFACT_BYTES, "model file")
    except ModelMissingError:
        raise ModelMissingError(f"model file {artifact} (listed in {card_path.name}) not found") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ModelIntegrityError(f"{artifact} sha256 {digest[:16]}… does not match its model card "
                                  f"({expected_sha256[:16]}…): corrupt or altered model, refusing to load")
    return data


DEFAULT_MODEL = "default"      # the model name that means the shipped default (as for python -m flight model pack)


def resolve_model(model: str | None, backend: str) -> tuple[ModelCard, Path, bytes]:
    """-> (card, artifact path, verified artifact bytes). Picks the INT8 artifact matching the backend."""
    if model is None or str(model) == DEFAULT_MODEL:
        card_path = default_card()
        artifact = None
    else:
        p = Path(model)
        if not p.exists() and not p.is_symlink():
            where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise ModelMissingError(f"model {p} not found{where}; pass an existing model card (.yaml), .tflite or "
                                    f".onnx file, or no model (or '{DEFAULT_MODEL}') for the shipped default model")
        if p.suffix in (".yaml", ".yml"):
            card_path, artifact = p, None
        elif p.suffix in (".tflite", ".onnx"):
            card_path, artifact = _card_for_artifact(p), p
        else:
            raise ModelError(f"model {p}: use a .tflite, .onnx or model card .yaml (or '{DEFAULT_MODEL}')")
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
