"""What the model card says about a model's inputs and outputs, carried in the model file's own metadata.

A card is a separate file: on the unsigned checkout path an edited card (two bands swapped, a band cut,
another quantization) would otherwise silently change which band feeds which input. So the exporter
(ground/export.py) writes the card's description of the model into the artifact itself, and every load
(unsigned card, signed package, store slot: flight.modelsource.open_loaded), pack and install compares it
with the card:

    key "cloudgate.card"   canonical JSON of card_description(card, artifact key): the artifact key the card
                           lists the file under (onnx_int8 / onnx_fp32 / tflite_int8), bands in order,
                           optional_bands, the input channels, classes, tile, input_scaling and output
                           (quantization scale and zero point, layout), units, metadata version
    ONNX                   ModelProto.metadata_props (a StringStringEntryProto)
    TFLite                 Model.metadata (name -> a buffer holding the JSON), as TFLite metadata is stored

Reading needs no onnx / flatbuffers package (a few lines of protobuf and flatbuffer walking, bounded,
over bytes already verified against the card's sha256). Writing (stamp_*) is ground-side.

An artifact without the key (exported before this) loads with a warning event model_metadata_missing
(its card cannot be checked against it); with update.require_signed only signed packages run, whose
signature binds card and artifact. An artifact whose metadata disagrees with its card is refused, signed
or not (ModelIntegrityError naming the field).
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import ModelIntegrityError

META_KEY = "cloudgate.card"
META_VERSION = 1
_ONNX_METADATA_FIELD = 14            # ModelProto.metadata_props
_TFLITE_BUFFERS, _TFLITE_METADATA = 4, 6   # Model table field indices (tflite schema)


def card_description(card, artifact_key: str) -> dict:
    """The card fields the model file must agree with (flight.model.ModelCard), and the artifact key the card
    lists the file under (onnx_int8, onnx_fp32, tflite_int8: an fp32 model is not the INT8 one)."""
    raw = card.raw
    desc = {"meta_version": META_VERSION, "artifact": artifact_key, "bands": list(card.bands), "optional_bands": list(card.optional_bands),
            "input_channels": card.input_channels, "classes": list(card.classes), "tile": card.tile,
            "input_scaling": raw.get("input_scaling"), "output": raw.get("output"), "units": raw.get("units")}
    if getattr(card, "downsample", 1) != 1:          # only when set: full-resolution artifacts stamped before
        desc["input_grid"] = {"downsample": card.downsample}   # input_grid existed keep matching their cards
    return desc


FULL_GRID = {"downsample": 1}                        # what a description without input_grid means


def encode_description(card, artifact_key: str) -> bytes:
    return json.dumps(card_description(card, artifact_key), sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- ONNX (protobuf) reading and writing
def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        if c < 0x80:
            return out, i
        shift += 7


def _fields(b: bytes):
    """(field number, wire type, value start, end, record start) of each top-level protobuf field."""
    i = 0
    while i < len(b):
        rec = i
        tag, i = _varint(b, i)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            _, j = _varint(b, i)
        elif wire == 1:
            j = i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            j = i + n
        elif wire == 5:
            j = i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if j > len(b):
            raise ValueError("field runs past the end")
        yield num, wire, i, j, rec
        i = j


def _onnx_entries(data: bytes) -> dict[str, str]:
    out = {}
    for num, wire, s, e, _ in _fields(data):
        if num == _ONNX_METADATA_FIELD and wire == 2:
            sub = data[s:e]
            kv = {n: sub[a:z].decode("utf-8", "replace") for n, w, a, z, _ in _fields(sub) if w == 2}
            out[kv.get(1, "")] = kv.get(2, "")
    return out


def _len_field(num: int, payload: bytes) -> bytes:
    out, n = bytearray([(num << 3) | 2]), len(payload)
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + payload


def stamp_onnx(data: bytes, value: bytes) -> bytes:
    """data with metadata_props[META_KEY] = value (an older entry of that key removed). Every other byte of
    the model (graph, initializers) is kept as it is: the entry is appended, as protobuf allows."""
    keep = []
    for num, wire, s, e, rec in _fields(data):
        if num == _ONNX_METADATA_FIELD and wire == 2 and _onnx_entries(data[rec:e]).keys() == {META_KEY}:
            continue
        keep.append(data[rec:e])
    entry = _len_field(1, META_KEY.encode()) + _len_field(2, value)
    return b"".join(keep) + _len_field(_ONNX_METADATA_FIELD, entry)


# ---------------------------------------------------------------- TFLite (flatbuffer) reading and writing
def _u32(b: bytes, i: int) -> int:
    if i < 0 or i + 4 > len(b):
        raise ValueError("offset out of range")
    return struct.unpack_from("<I", b, i)[0]


def _table_field(b: bytes, table: int, index: int) -> int | None:
    """Absolute position of field index's value in the table at table, or None when absent."""
    vt = table - struct.unpack_from("<i", b, table)[0]
    vt_len = struct.unpack_from("<H", b, vt)[0]
    if 4 + 2 * index + 2 > vt_len:
        return None
    off = struct.unpack_from("<H", b, vt + 4 + 2 * index)[0]
    return table + off if off else None


def _deref(b: bytes, pos: int) -> int:
    return pos + _u32(b, pos)


def _vector(b: bytes, pos: int) -> tuple[int, int]:
    """(first element position, length) of the vector referenced at pos."""
    v = _deref(b, pos)
    return v + 4, _u32(b, v)


def _tflite_entries(data: bytes) -> dict[str, bytes]:
    root = _u32(data, 0)
    mpos = _table_field(data, root, _TFLITE_METADATA)
    bpos = _table_field(data, root, _TFLITE_BUFFERS)
    if mpos is None or bpos is None:
        return {}
    first, n = _vector(data, mpos)
    bfirst, bn = _vector(data, bpos)
    out = {}
    for k in range(min(n, 1024)):
        t = _deref(data, first + 4 * k)
        npos, ipos = _table_field(data, t, 0), _table_field(data, t, 1)
        if npos is None or ipos is None:
            continue
        s, ln = _vector(data, npos)
        name = data[s:s + ln].decode("utf-8", "replace")
        idx = _u32(data, ipos)
        if idx >= bn:
            continue
        buf = _deref(data, bfirst + 4 * idx)
        dpos = _table_field(data, buf, 0)
        if dpos is not None:
            ds, dn = _vector(data, dpos)
            out[name] = bytes(data[ds:ds + dn])
        else:                                         # large models: data after the flatbuffer (offset, size)
            opos, spos = _table_field(data, buf, 1), _table_field(data, buf, 2)
            if opos is not None and spos is not None:
                o, z = struct.unpack_from("<Q", data, opos)[0], struct.unpack_from("<Q", data, spos)[0]
                out[name] = bytes(data[o:o + z])
    return out


def stamp_tflite(data: bytes, value: bytes) -> bytes:
    """data with a Model.metadata entry META_KEY -> a buffer holding value (an older one replaced). Ground
    side: uses the TFLite schema's object API (ai_edge_litert or tensorflow); tensors, operators and weight
    buffers are carried over unchanged (check_stamped verifies the outputs are bit-identical)."""
    import numpy as np
    import flatbuffers

    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:                               # pragma: no cover - ground machines have one of them
        from tensorflow.lite.python import schema_py_generated as schema
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    buf = schema.BufferT()
    buf.data = np.frombuffer(value, dtype=np.uint8)
    entries = [m for m in (model.metadata or []) if m.name not in (META_KEY.encode(), META_KEY)]
    old = [m.buffer for m in (model.metadata or []) if m.name in (META_KEY.encode(), META_KEY)]
    if old:
        model.buffers[old[0]] = buf
        idx = old[0]
    else:
        model.buffers.append(buf)
        idx = len(model.buffers) - 1
    meta = schema.MetadataT()
    meta.name, meta.buffer = META_KEY, idx
    model.metadata = entries + [meta]
    b = flatbuffers.Builder(len(data) + 4096)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


# ---------------------------------------------------------------- the check at load / pack / install
def read_description(data: bytes, kind: str) -> dict | None:
    """The card description the model file carries (kind: litert | onnxruntime), None when it carries none.
    ModelIntegrityError when the file's metadata is present but unreadable."""
    try:
        entries = _tflite_entries(data) if kind == "litert" else _onnx_entries(data)
    except (ValueError, struct.error, IndexError) as e:
        raise ModelIntegrityError(f"the model file's metadata cannot be read ({e}); re-export the model") from None
    raw = entries.get(META_KEY)
    if raw is None:
        return None
    try:
        desc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelIntegrityError(f"the model file's {META_KEY} metadata is not JSON; re-export the model") from None
    if not isinstance(desc, dict):
        raise ModelIntegrityError(f"the model file's {META_KEY} metadata is not a mapping; re-export the model")
    return desc


FLIGHT_KEYS = {"litert": "tflite_int8", "onnxruntime": "onnx_int8"}   # what a flight backend runs


def check_description(card, data: bytes, kind: str, artifact: str, artifact_key: str | None = None) -> str:
    """Compare the card with what the model file says about itself; artifact_key: the card entry the file
    is loaded as (default: the flight artifact of backend kind, so an fp32 model loaded in place of the INT8
    one is refused). Returns "ok" or "missing" (no metadata: the caller decides, see the module docstring);
    ModelIntegrityError naming every field that disagrees."""
    desc = read_description(data, kind)
    if desc is None:
        return "missing"
    want = card_description(card, artifact_key or FLIGHT_KEYS[kind])
    bad = [k for k in want if k not in ("meta_version", "input_grid") and desc.get(k) != want[k]]
    if desc.get("input_grid", FULL_GRID) != want.get("input_grid", FULL_GRID):   # either side may leave it out
        bad.append("input_grid")
    if bad:
        detail = "; ".join(f"{k}: card {want.get(k, FULL_GRID)!r:.120} but the model file says "
                           f"{desc.get(k, FULL_GRID if k == 'input_grid' else None)!r:.120}" for k in bad)
        raise ModelIntegrityError(f"model card {Path(str(card.path)).name} does not describe {artifact} (from the "
                                  f"model file's own metadata): {detail}; refusing to load")
    return "ok"


MISSING_TEXT = ("carries no CloudGate metadata (exported before it): its card cannot be checked against it; "
                "python -m flight model stamp CARD adds it")


# ---------------------------------------------------------------- stamping existing artifacts (ground side)
STAMPABLE = {"onnx_int8": "onnxruntime", "onnx_fp32": "onnxruntime", "tflite_int8": "litert"}


def stamp_bytes(card, data: bytes, kind: str, artifact_key: str) -> bytes:
    value = encode_description(card, artifact_key)
    return stamp_tflite(data, value) if kind == "litert" else stamp_onnx(data, value)


def stamp_card(card_path: str | Path, dry_run: bool = False) -> dict[str, tuple[str, str]]:
    """Stamp every artifact a card lists (ONNX and TFLite) with the card's description, check the stamped
    model computes bit-identical outputs on the golden tiles where the runtime is installed (weights
    unchanged), write each artifact atomically and update the card's sha256 / bytes entries (the card's
    text is otherwise kept line for line). Returns {artifact key: (old sha256, new sha256)}."""
    from .model import load_card, read_verified
    from .atomicwrite import write_atomic

    card_path = Path(card_path)
    card = load_card(card_path)
    text = card_path.read_text()
    out = {}
    for key, entry in card.artifacts.items():
        if key not in STAMPABLE:
            continue
        f = card_path.parent / entry["file"]
        old = read_verified(f, entry["sha256"], card_path)
        new = stamp_bytes(card, old, STAMPABLE[key], key)
        if check_description(card, new, STAMPABLE[key], f.name, key) != "ok":
            raise ModelIntegrityError(f"{f.name}: stamping did not take")
        _same_outputs(card, old, new, STAMPABLE[key], f)
        new_sha, old_sha = hashlib.sha256(new).hexdigest(), entry["sha256"]
        out[key] = (old_sha, new_sha)
        if dry_run or new_sha == old_sha:
            continue
        write_atomic(f, new)
        text = text.replace(old_sha, new_sha)
        if entry.get("bytes") is not None:
            text = text.replace(f"bytes: {entry['bytes']}\n", f"bytes: {len(new)}\n", 1) if text.count(
                f"bytes: {entry['bytes']}\n") == 1 else text
    if not dry_run:
        write_atomic(card_path, text.encode())
        fresh = load_card(card_path)
        for key, (_, new_sha) in out.items():
            if fresh.artifacts[key]["sha256"] != new_sha:
                raise ModelIntegrityError(f"{card_path}: sha256 of {key} not updated; fix the card by hand")
    return out


def _same_outputs(card, old: bytes, new: bytes, kind: str, path: Path) -> None:
    """The stamped model must compute exactly what the original does (golden tiles; skipped for a runtime
    not installed here, and for fp32 models no flight backend runs)."""
    from .backends import open_backend, quiet_factory
    from .bist import run_tiles
    from .errors import ModelError
    from .golden import iter_golden_tiles

    if path.name.endswith(".fp32.onnx"):
        return
    outs = []
    for data in (old, new):
        try:
            b = quiet_factory(open_backend)(path, data, kind, 1, card.tile, card.input_channels)
        except ModelError as e:
            if "no TFLite runtime" in str(e):
                return
            raise
        outs.append([r.output_sha256 for r in run_tiles(b, iter_golden_tiles(card.bands, card.optional_bands,
                                                                             card.tile))])
        del b
    if outs[0] != outs[1]:
        raise ModelIntegrityError(f"{path.name}: the stamped model's outputs differ from the original's; not written")


__all__ = ["META_KEY", "card_description", "check_description", "read_description", "stamp_card", "stamp_onnx",
           "stamp_tflite"]
