"""Signed model packages: one file holding the model card, the flight artifacts, golden self-test tiles
and their expected results, authenticated with the mission key (HMAC-SHA256, stdlib).

Layout (all of it covered by the tag):

    MAGIC (8 bytes: b"CGPKG\\x00\\x01\\n")
    header length H (4 bytes, big endian, <= MAX_HEADER_BYTES)
    header (H bytes, canonical JSON: members, artifacts, golden metadata and expected results, key id)
    payload (the members, back to back: card.yaml, the artifacts, golden/0..n)
    tag (32 bytes): HMAC-SHA256(mission key, MAGIC .. payload)

Verification on board (open_package) reads the file once (bounded regular file), checks the tag
(hmac.compare_digest) before parsing anything inside it, then the header, every member's sha256, the
card, and that the card lists exactly the artifacts the package carries with their sha256. The tag
covers the card: bands, scaling, classes or artifacts cannot be edited without the key. The card <-> model
check (flight.model.check_consistency) and the known-answer self-test (flight.bist) run once the runtime
has the model (flight.modelsource.open_loaded, the store's install and the gate's swaps).

Why HMAC-SHA256 and not Ed25519 (docs/sdd.md FLT-25): the stdlib has it (no native crypto dependency on
board; the venv has no Ed25519 implementation and a home-made one would be unvetted flight code), it is
what CCSDS SDLS uses for telecommand authentication (symmetric keys, managed by the mission's key
management), and verification costs one SHA-256 pass over < 2 MB. The price is that the board holds
the signing key: a board whose key leaked can forge packages for boards sharing that key, so keys
are per spacecraft and rotated through the mission's key management (the key id in the header says
which key a package was made with).

Packing (pack) is ground-side but needs no torch: the exported artifacts, this module, and the runtimes
to compute the golden results (python -m flight model pack).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomicwrite import commit_rename, write_atomic, write_synced  # noqa: F401  (the first two moved here from this module: old import paths kept)
from .errors import ModelError, ModelIntegrityError, ModelMissingError
from .model import MAX_ARTIFACT_BYTES, ModelCard, card_from_text, read_regular_file

MAGIC = b"CGPKG\x00\x01\n"
FORMAT = 1
TAG_BYTES = 32
MAX_HEADER_BYTES = 256 << 10
DEFAULT_MAX_PACKAGE_BYTES = 8 << 20
FLIGHT_ARTIFACTS = {"tflite_int8": "litert", "onnx_int8": "onnxruntime"}   # artifact key -> backend kind
BACKEND_ARTIFACT = {v: k for k, v in FLIGHT_ARTIFACTS.items()}
MIN_KEY_BYTES = 32
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[0-9]{1,3})?$")


class PackageKeyError(ModelError):
    """The mission key is missing or unusable (not a model problem: fix the key file)."""
    code = "bad_key"


# ---------------------------------------------------------------- keys
KEY_FORMAT = ("one line of hex digits (an even number, at least 64: 32 bytes or more), an optional trailing "
              "newline, nothing else; python -m flight model keygen FILE writes one")
MIN_DISTINCT_KEY_BYTES = 16       # 32 random bytes hold ~30 distinct values; fewer than 16 is a pattern, not a key


def parse_key(raw: bytes, where: str = "mission key") -> bytes:
    """The key bytes from a key file's content, in the one key format (KEY_FORMAT). PackageKeyError names
    what is wrong: empty or whitespace only, not hex, an odd number of digits, fewer than MIN_KEY_BYTES
    bytes, or too few distinct byte values to be random (all zeros, a repeated pattern)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PackageKeyError(f"{where} is not ASCII hex (a raw binary key is not read); the key format: "
                              f"{KEY_FORMAT}") from None
    body = text[:-1] if text.endswith("\n") else text
    body = body[:-1] if body.endswith("\r") else body
    if not body.strip():
        raise PackageKeyError(f"{where} is empty or whitespace only; the key format: {KEY_FORMAT}")
    if not re.fullmatch(r"[0-9a-fA-F]+", body):
        bad = next((c for c in body if c not in "0123456789abcdefABCDEF"), "?")
        raise PackageKeyError(f"{where} holds {bad!r}, which is not a hex digit; the key format: {KEY_FORMAT}")
    if len(body) % 2:
        raise PackageKeyError(f"{where} holds an odd number ({len(body)}) of hex digits; the key format: {KEY_FORMAT}")
    key = bytes.fromhex(body)
    if len(key) < MIN_KEY_BYTES:
        raise PackageKeyError(f"{where} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed ({KEY_FORMAT})")
    if len(set(key)) < MIN_DISTINCT_KEY_BYTES:
        raise PackageKeyError(f"{where} is not random: {len(set(key))} distinct byte values in {len(key)} bytes (at "
                              f"least {MIN_DISTINCT_KEY_BYTES}); make a key with python -m flight model keygen FILE")
    return key


def load_key(path: str | Path | None = None) -> bytes:
    """The mission key from a key file in the one key format (KEY_FORMAT). path None: $CLOUDGATE_MISSION_KEY
    (a path). PackageKeyError when missing or unusable."""
    if path is None:
        path = os.environ.get("CLOUDGATE_MISSION_KEY")
        if not path:
            raise PackageKeyError("no mission key: pass --key FILE, set update.key in the gate config or "
                                  "$CLOUDGATE_MISSION_KEY (make one with python -m flight model keygen FILE)")
    try:
        raw = read_regular_file(Path(path), 4096, "mission key")
    except ModelError as e:
        raise PackageKeyError(str(e)) from None
    return parse_key(raw, f"mission key {path}")


def key_id(key: bytes) -> str:
    """A public identifier of a key (not the key): which key a package was signed with."""
    return hashlib.sha256(b"cloudgate mission key id\0" + key).hexdigest()[:16]


def write_key(path: str | Path) -> str:
    """A new random 256-bit mission key, hex, mode 0600 (refuses to overwrite). Returns its key id."""
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key_id(key)


# ---------------------------------------------------------------- the package
@dataclass
class Package:
    """A verified package, held in memory (the gate and the store never read a member from disk twice)."""
    path: Path
    sha256: str                              # of the whole file: what the store and the decision log name
    size: int
    header: dict
    card: ModelCard
    artifacts: dict[str, tuple[str, bytes]]  # artifact key -> (file name, bytes)
    golden_blobs: list[bytes] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def golden(self) -> dict:
        return self.header["golden"]

    def golden_tiles(self):
        """(kind, uint16 DN) golden tiles, decoded one at a time; each checked against its input sha256."""
        import numpy as np

        from .golden import decode_tile

        shape = tuple(self.golden["shape"])
        for meta, blob in zip(self.golden["tiles"], self.golden_blobs):
            try:
                dn = decode_tile(blob, shape)
            except ValueError as e:
                raise ModelIntegrityError(f"package {self.path.name}: golden tile {meta['kind']}: {e}") from None
            if hashlib.sha256(np.ascontiguousarray(dn).tobytes()).hexdigest() != meta["input_sha256"]:
                raise ModelIntegrityError(f"package {self.path.name}: golden tile {meta['kind']} does not match its "
                                          "input sha256")
            yield meta["kind"], dn

    def expected(self, backend_kind: str) -> dict | None:
        return self.golden["expected"].get(backend_kind)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def assemble(card_bytes: bytes, artifacts: dict[str, tuple[str, bytes]], golden_meta: dict,
             golden_blobs: list[bytes], key: bytes, created_utc: str | None = None) -> bytes:
    """The package bytes. Low level: no check that the card fits the artifacts (pack does that; the HIL
    uses this to make signed but inconsistent packages that the board must refuse)."""
    members, payload, off = [], [], 0

    def add(name: str, data: bytes):
        nonlocal off
        members.append({"name": name, "offset": off, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        payload.append(data)
        off += len(data)

    add("card.yaml", card_bytes)
    for k in sorted(artifacts):
        add(artifacts[k][0], artifacts[k][1])
    for i, blob in enumerate(golden_blobs):
        add(f"golden/{i}", blob)
    header = {"format": FORMAT, "created_utc": created_utc or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "key_id": key_id(key), "card": "card.yaml", "members": members,
              "artifacts": {k: v[0] for k, v in artifacts.items()}, "golden": golden_meta}
    hb = _canonical(header)
    if len(hb) > MAX_HEADER_BYTES:
        raise ModelError(f"package header is {len(hb)} bytes (max {MAX_HEADER_BYTES})")
    body = MAGIC + struct.pack(">I", len(hb)) + hb + b"".join(payload)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def _diagnose(data: bytes, key: bytes) -> str:
    """Why a tag did not verify, from the unauthenticated header (for the message only; nothing in it is
    trusted): truncated upload, another key, or altered/corrupted bytes."""
    try:
        (hlen,) = struct.unpack(">I", data[8:12])
        if hlen <= MAX_HEADER_BYTES and len(data) < 12 + hlen + TAG_BYTES:
            return f"truncated: {len(data)} bytes, less than its {hlen}-byte header (an incomplete upload)"
        header = json.loads(data[12:12 + hlen])
        want = 12 + hlen + sum(int(m["size"]) for m in header["members"]) + TAG_BYTES
        if len(data) < want:
            return f"truncated: {len(data)} of {want} bytes (an incomplete upload)"
        if len(data) > want:
            return f"{len(data) - want} trailing bytes after the package"
        if header.get("key_id") != key_id(key):
            return (f"signed with another key (package key id {str(header.get('key_id'))[:16]}, this board's key id "
                    f"{key_id(key)})")
    except Exception:                                     # the header itself is damaged
        return "the header is damaged (corrupted or altered)"
    return "altered or corrupted after signing"


def parse_package(data: bytes, key: bytes, path: Path) -> Package:
    """Verify and parse package bytes. ModelIntegrityError names what failed; never another exception."""
    name = path.name
    if len(data) < len(MAGIC) + 4 + TAG_BYTES or data[:len(MAGIC)] != MAGIC:
        raise ModelIntegrityError(f"package {name} is not a CloudGate model package (bad magic or too short: "
                                  f"{len(data)} bytes)")
    body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
        raise ModelIntegrityError(f"package {name}: signature (HMAC-SHA256) does not verify: {_diagnose(data, key)}; "
                                  "refusing it")
    try:
        return _parse_authenticated(body, key, path, data)
    except ModelIntegrityError:
        raise
    except Exception as e:                               # a signed but malformed package (a ground bug)
        raise ModelIntegrityError(f"package {name} is signed but malformed: {type(e).__name__}: {e}"[:500]) from None


def _need(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ModelIntegrityError(f"package {name}: {problem}")


def _parse_authenticated(body: bytes, key: bytes, path: Path, data: bytes) -> Package:
    name = path.name
    (hlen,) = struct.unpack(">I", body[8:12])
    _need(hlen <= MAX_HEADER_BYTES and 12 + hlen <= len(body), name, f"header length {hlen} out of bounds")
    header = json.loads(body[12:12 + hlen])
    _need(isinstance(header, dict) and header.get("format") == FORMAT, name,
          f"unknown package format {header.get('format') if isinstance(header, dict) else header!r:.40} (this "
          f"board reads format {FORMAT})")
    payload = body[12 + hlen:]
    members = header.get("members")
    _need(isinstance(members, list) and members, name, "no members")
    blobs, off = {}, 0
    for m in members:
        _need(isinstance(m, dict) and isinstance(m.get("name"), str) and _MEMBER_NAME.match(m["name"]) is not None,
              name, f"bad member entry {m!r:.80}")
        size, moff = m.get("size"), m.get("offset")
        _need(isinstance(size, int) and isinstance(moff, int) and moff == off and 0 <= size <= MAX_ARTIFACT_BYTES,
              name, f"member {m['name']}: offset/size out of sequence")
        chunk = payload[off:off + size]
        _need(len(chunk) == size, name, f"member {m['name']} runs past the payload")
        _need(hashlib.sha256(chunk).hexdigest() == m.get("sha256"), name, f"member {m['name']} sha256 mismatch")
        _need(m["name"] not in blobs, name, f"member {m['name']} listed twice")
        blobs[m["name"]] = chunk
        off += size
    _need(off == len(payload), name, f"{len(payload) - off} payload bytes belong to no member")
    card_name = header.get("card")
    _need(card_name in blobs, name, "no card member")
    card = card_from_text(blobs[card_name], path / card_name)
    arts = header.get("artifacts")
    _need(isinstance(arts, dict) and arts, name, "no artifacts")
    artifacts = {}
    for k, fname in arts.items():
        _need(k in FLIGHT_ARTIFACTS, name, f"artifact key {k!r:.40} is not a flight artifact {sorted(FLIGHT_ARTIFACTS)}")
        _need(fname in blobs, name, f"artifact {k} names member {fname!r:.60}, which it does not carry")
        entry = card.artifacts.get(k)
        _need(entry is not None, name, f"carries artifact {k} but its card does not list it")
        _need(entry["file"] == fname, name, f"card lists {k} as {entry['file']}, the package carries {fname}")
        _need(entry["sha256"] == hashlib.sha256(blobs[fname]).hexdigest(), name,
              f"artifact {fname} does not match the sha256 its card lists")
        artifacts[k] = (fname, blobs[fname])
    golden = header.get("golden")
    _need(isinstance(golden, dict), name, "no golden self-test section")
    shape = golden.get("shape")
    _need(shape == [card.input_channels, card.tile, card.tile], name,
          f"golden tiles of shape {shape} do not fit the card ({card.input_channels} input channels, tile {card.tile})")
    tiles, expected, tol = golden.get("tiles"), golden.get("expected"), golden.get("tolerance")
    _need(isinstance(tiles, list) and tiles, name, "no golden tiles")
    _need(isinstance(tol, dict) and isinstance(tol.get("fraction"), (int, float))
          and isinstance(tol.get("block_pixels"), int), name, "golden tolerance missing")
    golden_blobs = []
    for i, t in enumerate(tiles):
        _need(isinstance(t, dict) and isinstance(t.get("kind"), str) and isinstance(t.get("input_sha256"), str),
              name, f"golden tile {i} entry malformed")
        _need(f"golden/{i}" in blobs, name, f"golden tile {i} missing")
        golden_blobs.append(blobs[f"golden/{i}"])
    _need(isinstance(expected, dict) and expected, name, "no expected golden results")
    for kind, exp in expected.items():
        _need(kind in BACKEND_ARTIFACT and BACKEND_ARTIFACT[kind] in artifacts, name,
              f"expected results for backend {kind!r:.40} whose artifact it does not carry")
        _need(isinstance(exp, dict) and isinstance(exp.get("tiles"), list) and len(exp["tiles"]) == len(tiles), name,
              f"expected results for {kind} do not cover the {len(tiles)} golden tiles")
        for e in exp["tiles"]:
            _need(isinstance(e, dict) and isinstance(e.get("output_sha256"), str) and isinstance(e.get("blocks"), str)
                  and isinstance(e.get("fractions"), list) and len(e["fractions"]) == 3, name,
                  f"expected result entry for {kind} malformed")
    card.sha256_of_loaded = ""
    return Package(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data), header=header, card=card,
                   artifacts=artifacts, golden_blobs=golden_blobs)


def open_package(path: str | Path, key: bytes, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> Package:
    """Read (a bounded regular file, once) and verify a package file."""
    path = Path(path)
    try:
        data = read_regular_file(path, max_bytes, "model package")
    except ModelMissingError:
        raise
    return parse_package(data, key, path)


# ---------------------------------------------------------------- packing (ground side, no torch)
def golden_expected(backend, tiles) -> dict:
    from .bist import run_tiles

    return {"tiles": [r.to_json() for r in run_tiles(backend, tiles)]}


def runtime_version(kind: str) -> str:
    try:
        if kind == "litert":
            import ai_edge_litert

            return f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}"
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        return "unavailable"


def pack(card_path: str | Path, key: bytes, out: str | Path, *, backends: tuple[str, ...] | None = None,
         threads: int = 1, seed: int = 20260101, tolerance: dict | None = None,
         model_version: int | None = None) -> Package:
    """Pack the card's flight artifacts with golden tiles and their expected results on every backend
    (default: each flight artifact the card lists whose runtime is installed), sign it with key, write it
    atomically to out. Refuses a card that does not fit its artifacts (flight.model.check_consistency).

    model_version: the package's monotonic version (the store refuses an upload older than the highest
    version it has activated: anti-rollback), written into the packaged (signed) card as model_version.
    Default: the card's own model_version, else the packing time in UTC seconds (a later pack is newer)."""
    import numpy as np

    from .backends import open_backend, quiet_factory
    from .bist import DEFAULT_TOLERANCE
    from .golden import GOLDEN_KINDS, encode_tile, golden_tiles
    from .model import check_consistency, load_card, read_verified
    from .modelmeta import check_description

    card_path = Path(card_path)
    card = load_card(card_path)
    card_bytes = stamp_version(read_regular_file(card_path, 1 << 20, "model card"), card, model_version)
    artifacts = {}
    for k in FLIGHT_ARTIFACTS:
        if k in card.artifacts:
            f = card_path.parent / card.artifacts[k]["file"]
            artifacts[k] = (f.name, read_verified(f, card.artifacts[k]["sha256"], card_path))
    if not artifacts:
        raise ModelMissingError(f"model card {card_path} lists no flight artifact ({', '.join(FLIGHT_ARTIFACTS)})")
    tiles = golden_tiles(card.bands, card.optional_bands, card.tile, seed)
    kinds = backends or tuple(FLIGHT_ARTIFACTS[k] for k in artifacts)
    expected = {}
    for kind in kinds:
        k = BACKEND_ARTIFACT[kind]
        if k not in artifacts:
            raise ModelMissingError(f"model card {card_path} has no {k} artifact for backend {kind}")
        fname, data = artifacts[k]
        try:
            b = quiet_factory(open_backend)(card_path.parent / fname, data, kind, threads, card.tile,
                                            card.input_channels)
        except ModelError as e:
            if backends is None and "no TFLite runtime" in str(e):
                continue                                  # the runtime is not installed here: no expectation
            raise
        check_consistency(card, b, fname)
        check_description(card, data, kind, fname)        # metadata, when the artifact carries it, must agree
        expected[kind] = dict(golden_expected(b, tiles), runtime=runtime_version(kind), artifact=k)
        del b
    if not expected:
        raise ModelError("no runtime available to compute the golden results (install ai-edge-litert or onnxruntime)")
    meta = {"dn_scale": 1e-4, "seed": seed, "generator": "flight.golden", "shape": [card.input_channels, card.tile, card.tile],
            "tiles": [{"kind": kind, "input_sha256": hashlib.sha256(np.ascontiguousarray(dn).tobytes()).hexdigest()}
                      for kind, dn in tiles],
            "tolerance": dict(tolerance or DEFAULT_TOLERANCE), "expected": expected}
    assert [k for k, _ in tiles] == list(GOLDEN_KINDS)
    data = assemble(card_bytes, artifacts, meta, [encode_tile(dn) for _, dn in tiles], key)
    write_atomic(Path(out), data)
    return parse_package(data, key, Path(out))


def package_version(pkg: Package) -> int:
    """The monotonic model version its signed card carries (0 for a package made before versions)."""
    return int(pkg.card.raw.get("model_version") or 0)


def stamp_version(card_bytes: bytes, card: ModelCard, model_version: int | None) -> bytes:
    """The card bytes with model_version set (appended when the card has none; the card's own if no
    version is given; the packing time in UTC seconds if neither)."""
    have = card.raw.get("model_version")
    if model_version is None:
        model_version = have if have is not None else int(time.time())
    if not isinstance(model_version, int) or isinstance(model_version, bool) or not 0 < model_version < 2**63:
        raise ModelError(f"model_version must be a positive integer, got {model_version!r:.40}")
    if have is not None:
        if have != model_version:
            raise ModelError(f"model card {card.path} says model_version {have}, asked to pack {model_version}: "
                             "edit the card or drop --model-version")
        return card_bytes
    return card_bytes.rstrip(b"\n") + b"\nmodel_version: %d\n" % model_version
