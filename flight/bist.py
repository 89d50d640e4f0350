"""Known-answer built-in self-test (BIST) of the running model: golden tiles through the real interpreter.

The gate's weights live where the runtime put them (LiteRT: XNNPACK's packed copies and the flatbuffer
the interpreter was built from; onnxruntime: its own pre-packed initializers). Hashing any other copy
says nothing about them. The BIST feeds golden tiles (flight.golden; stored in the signed package)
through the backend the gate gates with, exactly as scenes go through it (backend.planes ->
backend.infer), and compares what comes out:

* against the package's golden results computed on the ground (at install and at start): the mask
  class fractions and per-block class counts within the package's tolerance, or the raw output digest
  bit-exact (checks the model and this board's runtime compute what the ground computed);
* against its own reference, taken right after a verified load (every N scenes and after a runtime
  error): the raw output tensor's sha256 bit-exact per tile -- any upset in the weights the runtime
  executes that changes any output value on any golden tile is caught.

Per tile: output_sha256 (raw output tensor; the mask when the backend has no raw output), mask_sha256,
class fractions (clear, cloud, shadow) and class counts per block of (tile/8)^2 pixels.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

import numpy as np

from .backends import planar_view
from .errors import ModelIntegrityError
from .golden import DN_SCALE

BLOCKS = 8                                   # blocks per tile side for the per-block class counts
DEFAULT_TOLERANCE = {"fraction": 0.002, "block_pixels": 12}   # ground vs board (cross-platform rounding)


@dataclass
class TileResult:
    kind: str
    output_sha256: str
    mask_sha256: str
    fractions: tuple[float, float, float]
    blocks: np.ndarray                       # uint16 (2, BLOCKS, BLOCKS): cloud and shadow pixel counts

    def to_json(self) -> dict:
        return {"kind": self.kind, "output_sha256": self.output_sha256, "mask_sha256": self.mask_sha256,
                "fractions": [round(float(f), 6) for f in self.fractions],
                "blocks": base64.b64encode(self.blocks.astype("<u2").tobytes()).decode()}


@dataclass
class BistResult:
    passed: bool
    detail: str
    tiles: list[TileResult] = field(default_factory=list)
    seconds: float = 0.0
    exact: bool = False                      # every tile bit-exact with the reference it was compared to


def load_tile(dn: np.ndarray, backend) -> None:
    """Golden DN (C, T, T) -> backend.planes in model-input units, as the gate loads a scene tile with
    radiometry (DN_SCALE, 0): value * (scale * gain) + offset, clipped to the backend's input range."""
    planes = planar_view(backend)                        # the same values whatever the buffer's layout
    if planes.shape != dn.shape:
        raise ModelIntegrityError(f"golden tiles are {tuple(dn.shape)} (channels, tile, tile) but the runtime "
                                  f"takes {tuple(planes.shape)}: the tiles were made for another model or tile size")
    gain, offset = backend.input_affine
    lo, hi = backend.input_range
    np.multiply(dn, np.float32(DN_SCALE * gain), out=planes, dtype=np.float32, casting="unsafe")
    if offset:
        np.add(planes, np.float32(offset), out=planes)
    np.clip(planes, lo, hi, out=planes)


def run_tiles(backend, tiles) -> list[TileResult]:
    """Infer every (kind, DN) golden tile on backend; tiles may be an iterable (decoded lazily)."""
    t = backend.tile
    mask = np.empty((t, t), np.uint8)
    hit = np.empty((t, t), bool)
    b = t // BLOCKS
    out = []
    digest = getattr(backend, "output_digest", None)
    for kind, dn in tiles:
        load_tile(dn, backend)
        backend.infer(backend.planes, mask)
        counts = []
        blocks = np.zeros((2, BLOCKS, BLOCKS), np.uint16)
        for k, cls in enumerate((1, 2)):
            np.equal(mask, cls, out=hit)
            counts.append(int(np.count_nonzero(hit)))
            blocks[k] = hit[:b * BLOCKS, :b * BLOCKS].reshape(BLOCKS, b, BLOCKS, b).sum(axis=(1, 3))
        n = t * t
        fr = ((n - counts[0] - counts[1]) / n, counts[0] / n, counts[1] / n)
        msha = hashlib.sha256(mask.tobytes()).hexdigest()
        out.append(TileResult(kind, digest() if digest else msha, msha, fr, blocks))
    return out


def _blocks(entry: dict) -> np.ndarray:
    raw = base64.b64decode(entry["blocks"], validate=True)
    a = np.frombuffer(raw, "<u2")
    if a.size != 2 * BLOCKS * BLOCKS:
        raise ValueError("block counts of the wrong size")
    return a.reshape(2, BLOCKS, BLOCKS).astype(np.int64)


def compare_golden(results: list[TileResult], expected: list[dict], tolerance: dict) -> tuple[bool, bool, str]:
    """Against the package's golden results -> (passed, bit-exact, detail). A tile passes bit-exact (raw
    output digest equal) or within tolerance (every class fraction within tolerance['fraction'] and
    every block count within tolerance['block_pixels'])."""
    if len(results) != len(expected):
        return False, False, f"{len(results)} golden tiles run, the package expects {len(expected)}"
    ftol, btol = float(tolerance["fraction"]), int(tolerance["block_pixels"])
    exact, worst = True, []
    for i, (r, e) in enumerate(zip(results, expected)):
        if r.output_sha256 == e["output_sha256"]:
            continue
        exact = False
        df = max(abs(a - float(b)) for a, b in zip(r.fractions, e["fractions"]))
        db = int(np.abs(r.blocks.astype(np.int64) - _blocks(e)).max())
        if df > ftol or db > btol:
            return False, False, (f"golden tile {i} ({r.kind}): class fractions {_fmt(r.fractions)} vs expected "
                                  f"{_fmt(e['fractions'])} (max diff {df:.4f}, tolerance {ftol}); worst block "
                                  f"differs by {db} px (tolerance {btol})")
        worst.append(f"{r.kind} {df:.4f}/{db}px")
    return True, exact, ("bit-exact on every golden tile" if exact else
                         "within tolerance (not bit-exact: " + ", ".join(worst) + ")")


def compare_reference(results: list[TileResult], reference: list[str]) -> tuple[bool, str]:
    """Against the raw output digests taken after the last verified load: bit-exact per tile."""
    if len(results) != len(reference):
        return False, f"{len(results)} tiles run, reference has {len(reference)}"
    bad = [f"{i} ({r.kind})" for i, (r, ref) in enumerate(zip(results, reference)) if r.output_sha256 != ref]
    if bad:
        return False, (f"output of golden tile(s) {', '.join(bad)} differs from the reference taken at load: the "
                       "weights the runtime executes changed")
    return True, f"{len(results)} golden tiles bit-exact with the reference taken at load"


def _fmt(fr) -> str:
    return "(" + ", ".join(f"{float(f):.4f}" for f in fr) + ")"
