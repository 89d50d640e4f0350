"""Scene input: everything between the caller's array and the model's input buffer.

check_scene       the scene, band names, mask_out and valid_mask checks (typed errors naming the fix)
input_map         radiometry and the model's input quantization folded into one affine map per value
SceneInput        the mmap behind the scene being processed: file-shrink checks and page release
TileLoader        one worker's tile buffers and the two loaders (pixel-interleaved HWC, band-planar CHW)
                  that fill a backend's input buffer from one scene window, allocation-free

Nothing here knows about the model's lifecycle (flight.custody) or the policy (flight.policy).
"""
from __future__ import annotations

import ctypes
import math
import mmap
from typing import NamedTuple

import numpy as np

from .bands import canonical_band
from .backends import planar_view
from .errors import (ArgumentError, BandMismatchError, ImplausibleRadiometryError, SceneDtypeError, SceneFileError,
                     SceneShapeError, ValidMaskError)

SUPPORTED_KINDS = "iuf"        # signed / unsigned integer DN, float reflectance (bool is a mask, not a scene)


def unsupported_dtype_message(dtype: np.dtype) -> str:
    """What to pass instead of a scene of this dtype (the reason depends on what the caller likely holds)."""
    want = ("pass integer DN (uint8/uint16/int16/...) with radiometry=(scale, offset), or float16/32/64 "
            "reflectance")
    if dtype.kind == "b":
        why = "a bool array is a mask, not radiance (as a scene every pixel would be 0 or 1); pass the valid " \
              "pixels as valid_mask= and the bands as the scene"
    elif dtype.kind == "c":
        why = "complex values are not radiance; pass np.abs(x) or x.real if the data is real-valued"
    elif dtype.kind in "OUSV":
        why = "the array holds objects, text or records, not numbers; convert it with np.asarray(x, np.float32)"
    elif dtype.kind in "mM":
        why = "dates and time spans are not radiance"
    else:                                      # float128 / longdouble: wider than any runtime input
        why = f"{dtype.itemsize * 8}-bit values are wider than the gate reads; cast with x.astype(np.float32)"
    return f"scene dtype {dtype} unsupported: {why}; {want}"
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21   # Linux >= 5.4: reclaim now, contents kept (dirty shared pages written back, private copies kept)
_F32_MAX = np.float32(np.finfo(np.float32).max)
# Radiometry plausibility: reflectance (after radiometry) outside this range on more than this share of
# the valid pixels means the caller's radiometry is wrong (DN passed as reflectance, a x10000 scale, ...).
# Top-of-atmosphere reflectance of bright cloud/snow stays well below 2; -0.5 allows offset DN rules.
PLAUSIBLE_REFLECTANCE = (-0.5, 2.5)
IMPLAUSIBLE_SHARE = 0.5
# Implausibly dark: a daylight optical payload never sees a scene whose valid pixels are nearly all darker than
# DARK_REFLECTANCE in every band (sunlit TOA reflectance of water, vegetation, soil, snow or cloud stays above
# ~0.02 in blue/green/red thanks to Rayleigh path radiance alone). Such a scene was scaled twice (0..1
# reflectance passed with radiometry=(1e-4, 0)), or is a night / lens-cap / dead-detector frame: no decision.
# Judged on every DARK_STRIDE-th pixel of every tile in both axes (a bounded sample, no allocation): the scene
# faults implausible_radiometry when at most DARK_SHARE of the sampled valid pixels have any band at or above
# DARK_REFLECTANCE (the 99th percentile of the per-pixel brightest band is below 0.01).
DARK_REFLECTANCE = 0.01
DARK_SHARE = 0.01
DARK_STRIDE = 8
MAX_BAND_NAME = 64
try:
    _libc = ctypes.CDLL(None)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _libc = None

class InputMap(NamedTuple):
    """Radiometry and the model's input quantization folded into one affine map per value:
    model_input = value * scale + offset (then clipped to the backend's input range)."""
    scale: np.float32
    offset: np.float32
    fill: np.float32             # what an invalid pixel (reflectance 0) becomes
    one: np.float32              # reflectance 1.0 in model-input units (the presence flag when set)
    plausible_lo: np.float32     # PLAUSIBLE_REFLECTANCE in model-input units
    plausible_hi: np.float32
    dark: np.float32             # DARK_REFLECTANCE in model-input units
    radiometry: tuple[float, float]   # the caller's (scale, offset), for messages


# what the runtimes say when an allocation fails (onnxruntime: "Failed to allocate memory for requested
# buffer", C++ std::bad_alloc, LiteRT's XNNPack delegate: "failed to reshape runtime" when its workspace


class SceneMap(NamedTuple):
    """The mmap behind a scene (scene_map): the file must hold need bytes while it is read."""
    mm: mmap.mmap
    need: int
    name: str
    mode: str | None             # np.memmap mode (page release advice); None for a raw mmap


class HwcPlan:
    """Per-scene plan for loading tiles into a pixel-interleaved (T, T, C) input buffer in whole-window
    passes: applies when the first k model channels come from k consecutive scene channels and the rest
    are constants (absent optional bands, presence flag). Its boolean buffers hold kp >= k bytes per pixel
    (kp a power of two <= 8) so that "every band" / "any band" of a pixel is one uint{8 kp} comparison;
    the kp - k pad bytes are preset (True for "every", False for "any"). Buffers allocated once."""

    def __init__(self, tile: int, channels: int, layout: str):
        self.ready = False
        self.k = self.s0 = 0
        self.constants: list[tuple[int, bool]] = []
        self.usable = layout == "hwc" and channels <= 8
        if not self.usable:
            return
        kp = next(p for p in (1, 2, 4, 8) if p >= channels)
        word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[kp]
        self.kp = kp
        self.all_bits = np.ones((tile, tile, kp), bool)
        self.any_bits = np.zeros((tile, tile, kp), bool)
        self.all_words = self.all_bits.view(word)        # (T, T, 1)
        self.any_words = self.any_bits.view(word)
        self.all_set = word(int.from_bytes(b"\x01" * kp, "little"))
        self._k_padded = kp

    def prepare(self, src_idx: list[int]) -> None:
        """src_idx: per model channel the scene channel, or -1 (absent: 0) / -2 (presence flag: 1)."""
        self.ready = False
        if not self.usable:
            return
        k = next((i for i, si in enumerate(src_idx) if si < 0), len(src_idx))
        if k == 0 or any(si >= 0 for si in src_idx[k:]) or src_idx[:k] != list(range(src_idx[0], src_idx[0] + k)):
            return
        if k != self._k_padded:                          # pads: bytes k..kp of every pixel
            self.all_bits[..., k:] = True
            self.any_bits[..., k:] = False
            self._k_padded = k
        self.k, self.s0 = k, src_idx[0]
        self.constants = [(ci, si == -2) for ci, si in enumerate(src_idx) if si < 0]
        self.ready = True


def check_scene(scene, band_names, mask_out, valid_mask, bands, optional_bands, sensor):
    """Check one scene's arguments against the model's bands (canonical names) and optional bands
    (sensor: the config's sensor, for bare Landsat band ids). Returns (h, w, src_idx): per model
    channel the scene channel, -1 (absent optional band: 0) or -2 (presence flag: 1)."""
    if not isinstance(scene, np.ndarray):
        raise SceneShapeError(f"scene must be a numpy array or memmap (H, W, C), got {type(scene).__name__}")
    if scene.ndim != 3:
        raise SceneShapeError(f"scene must be (H, W, C), got shape {scene.shape}; add a band axis with scene[..., None]")
    h, w, c = scene.shape
    if h < 1 or w < 1 or c < 1:
        raise SceneShapeError(f"scene has an empty axis: shape {scene.shape}")
    if scene.dtype.kind not in SUPPORTED_KINDS or scene.dtype.itemsize > 8:
        raise SceneDtypeError(unsupported_dtype_message(scene.dtype))
    if isinstance(band_names, (str, bytes)):
        raise ArgumentError("band_names must be a sequence of band names, not a single string")
    if isinstance(band_names, (set, frozenset, dict)):  # no defined order: band i would be a hash accident
        raise ArgumentError(f"band_names must be an ordered sequence (list or tuple) in the scene's band order, "
                            f"got a {type(band_names).__name__}")
    try:
        names = list(band_names) if band_names is not None else []
    except Exception as e:
        raise ArgumentError(f"band_names could not be iterated: {type(e).__name__}: {e}"[:500]) from None
    if len(names) != c:
        hint = ""
        if h == len(names) != c:                   # (C, H, W): the bands are on the first axis
            hint = ("; the scene looks channels-first; pass (H, W, C), e.g. np.moveaxis(x, 0, -1) "
                    f"(shape {scene.shape} -> {(scene.shape[1], scene.shape[2], scene.shape[0])})")
        raise SceneShapeError(f"band_names has {len(names)} names but the scene has {c} bands (last axis){hint}")
    canon = []
    for n in names:
        if not isinstance(n, str) or len(n) > MAX_BAND_NAME:
            raise ArgumentError(f"band_names must be strings of <= {MAX_BAND_NAME} characters, got "
                                f"{type(n).__name__} {n!r:.40}")
        try:
            canon.append(canonical_band(n, sensor))
        except ValueError:
            canon.append(n.lower())
    missing = [b for b in bands if b not in canon and b not in optional_bands]
    if missing:
        raise BandMismatchError(missing, canon)
    # optional bands (SWIR) count only when all are there; -1 = absent (plane 0, presence flag 0)
    present = all(b in canon for b in optional_bands)
    src_idx = [canon.index(b) if (present or b not in optional_bands) else -1 for b in bands]
    if mask_out is not None:
        if not isinstance(mask_out, np.ndarray) or mask_out.shape != (h, w) or mask_out.dtype != np.uint8:
            raise SceneShapeError(f"mask_out must be a uint8 array of shape {(h, w)}, got "
                                  f"{getattr(mask_out, 'dtype', type(mask_out).__name__)} {getattr(mask_out, 'shape', '')}")
        if not mask_out.flags.writeable:
            raise SceneShapeError("mask_out must be writeable")
    if valid_mask is not None:
        if not isinstance(valid_mask, np.ndarray) or valid_mask.shape != (h, w):
            raise SceneShapeError(f"valid_mask must have shape {(h, w)}, got {getattr(valid_mask, 'shape', None)}")
        kind = valid_mask.dtype.kind
        if kind in "iu":                             # 0/1 integers: two scalar reductions, no copy
            if valid_mask.size and (valid_mask.min() < 0 or valid_mask.max() > 1):
                raise ValidMaskError(f"valid_mask of dtype {valid_mask.dtype} holds values other than 0 and 1 "
                                     f"(range {valid_mask.min()}..{valid_mask.max()}); pass a bool mask")
        elif kind != "b":
            raise ValidMaskError(f"valid_mask must be bool (or 0/1 integers), got dtype {valid_mask.dtype}")
    if optional_bands:
        src_idx.append(-2 if present else -1)     # the presence flag channel: -2 = 1.0, -1 = 0.0
    return h, w, src_idx


def input_map(scene, radiometry, default: tuple[float, float], backend) -> InputMap:
    """The affine map model_input = value * scale + offset for this scene: radiometry (scale, offset) with
    reflectance = value * scale + offset (None: default, the config's pair), folded with the backend's
    input_affine (its input quantization). Typed errors for a radiometry that cannot be right."""
    rad = radiometry if radiometry is not None else default
    # the argument's structure (a pair of real numbers) is the caller's mistake: bad_argument
    if (not isinstance(rad, (tuple, list, np.ndarray)) or np.ndim(rad) != 1 or len(rad) != 2
            or any(isinstance(v, (str, bytes, bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
                   for v in rad)):
        raise ArgumentError(f"radiometry must be a (scale, offset) pair of numbers with reflectance = value * scale "
                            f"+ offset, e.g. (1e-4, 0.0); got {type(rad).__name__} {rad!r:.80}")
    scale, offset = float(rad[0]), float(rad[1])
    if not (math.isfinite(scale) and math.isfinite(offset)) or scale <= 0:
        raise SceneDtypeError(f"radiometry (scale={scale}, offset={offset}) must be finite with scale > 0 "
                              "(reflectance = value * scale + offset)")
    if scene.dtype.kind in "iu" and radiometry is None and tuple(default) == (1.0, 0.0):
        raise ImplausibleRadiometryError(
            f"integer scene ({scene.dtype}) without a radiometry scale would be read as reflectance; pass "
            "radiometry=(scale, offset) with reflectance = DN * scale + offset (e.g. (1e-4, 0.0) for Sentinel-2 "
            "L1C, (2e-5, -0.1) for Landsat-8) or set radiometry_scale/radiometry_offset in the gate config")
    # model_input = (value * scale + offset) * in_gain + in_offset, clipped to the backend's input range
    in_gain, in_offset = backend.input_affine
    q_lo, q_hi = (PLAUSIBLE_REFLECTANCE[0] * in_gain + in_offset), (PLAUSIBLE_REFLECTANCE[1] * in_gain + in_offset)
    return InputMap(np.float32(scale * in_gain), np.float32(offset * in_gain + in_offset), np.float32(in_offset),
                    np.float32(in_gain + in_offset), np.float32(min(q_lo, q_hi)), np.float32(max(q_lo, q_hi)),
                    np.float32(DARK_REFLECTANCE * in_gain + in_offset), (scale, offset))


def scene_map(scene: np.ndarray) -> "SceneMap | None":
    """The mmap behind a scene, whatever wraps it: an np.memmap or a slice of one, np.asarray(memmap)
    (a plain ndarray whose base is the memmap), np.frombuffer(mmap) (base: a memoryview of it)."""
    obj, memmap_obj, mm = scene, None, None
    for _ in range(64):                              # bounded walk down the base chain
        if isinstance(obj, mmap.mmap):
            mm = obj
            break
        if isinstance(obj, np.memmap) and isinstance(getattr(obj, "_mmap", None), mmap.mmap):
            memmap_obj, mm = obj, obj._mmap
            break
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if obj is None:
            break
    if mm is None:
        return None
    try:
        length = len(mm)
    except ValueError:                               # closed mmap
        raise SceneFileError("the mmap backing the scene is closed") from None
    if memmap_obj is not None:
        start = int(getattr(memmap_obj, "offset", 0) or 0)
        start -= start % mmap.ALLOCATIONGRANULARITY
        return SceneMap(mm, start + length, str(getattr(memmap_obj, "filename", None) or "memmap"),
                         getattr(memmap_obj, "mode", None))
    return SceneMap(mm, length, "mmap", None)       # raw mmap: its offset is unknown, so at least its length


def check_backing_file(sm: "SceneMap | None") -> None:
    """A mapping whose file shrank would SIGBUS on the first page past the new end: check (fstat on the
    mapping's own descriptor, so a renamed or replaced path does not fool it) that the file still covers
    the mapping. Called before each scene and again before each tile touches new pages; what is left is
    a shrink landing inside the one tile read after the check (see docs/sdd.md FLT-10)."""
    if sm is None:
        return
    try:
        size = sm.mm.size()
    except (OSError, ValueError) as e:
        raise SceneFileError(f"the file backing the memmap scene ({sm.name}) cannot be checked: {e}") from None
    if size < sm.need:
        raise SceneFileError(f"the file backing the memmap scene ({sm.name}) shrank to {size} bytes under a "
                             f"{sm.need}-byte mapping; reading it would kill the process (SIGBUS). Re-open the scene")


class SceneInput:
    """The mmap behind the scene being processed (None for an in-memory scene), held only while
    CloudGate.process runs: the backing-file checks and the page release after each tile."""

    def __init__(self):
        self.map: SceneMap | None = None
        self.map_addr = 0                                # its start address (page release stays inside it)

    def open(self, scene: np.ndarray) -> None:
        """Find the scene's mapping and check that its file still covers it (SceneFileError if not)."""
        self.map = scene_map(scene)
        check_backing_file(self.map)
        # the mapping's own address range: page release never advises memory outside it
        self.map_addr = np.frombuffer(self.map.mm, np.uint8).ctypes.data if self.map is not None else 0

    def close(self) -> None:
        self.map = None                                  # hold no reference to the caller's mapping

    def check_file(self) -> None:
        """Before a tile touches new pages: the file may shrink mid-scan (one fstat)."""
        if self.map is not None:
            check_backing_file(self.map)

    def release_pages(self, scene: np.ndarray, y0: int, y1: int) -> None:
        """Drop rows y0..y1 of a memmap scene from our resident set, so RSS stays flat whatever the scene
        size. Read-only maps: MADV_DONTNEED (the page cache keeps the data). Writable (r+, w+) and
        copy-on-write (c) maps: MADV_PAGEOUT, which reclaims without discarding anything -- DONTNEED on a
        copy-on-write map would throw away the caller's in-memory changes to the scene. Released after
        every tile (tiles are visited in a spread order, so waiting for a row band to complete would keep
        nearly the whole scene resident); the cost is that later tiles of the band fault their pages back
        in, from the page cache for r maps, from the file for r+/c maps (PAGEOUT evicts). The range is the
        rows' real extent (any strides, negative ones too) clamped to the mapping itself: advice outside
        it would hit whatever memory lies next to the map."""
        sm = self.map
        if _libc is None or sm is None or sm.mode is None or y1 <= y0 or scene.size == 0:
            return
        mode = sm.mode
        advice = _MADV_DONTNEED if mode in ("r", "readonly") else _MADV_PAGEOUT if mode in ("r+", "w+", "c") else None
        if advice is None:
            return
        s0, s1, s2 = scene.strides
        _, w, c = scene.shape
        lo = min(y0 * s0, (y1 - 1) * s0) + min(0, (w - 1) * s1) + min(0, (c - 1) * s2)
        hi = max(y0 * s0, (y1 - 1) * s0) + max(0, (w - 1) * s1) + max(0, (c - 1) * s2) + scene.itemsize
        page = mmap.PAGESIZE
        map_lo, map_len = self.map_addr, len(sm.mm)
        map_hi = map_lo + -(-map_len // page) * page
        a0 = max(scene.ctypes.data + lo, map_lo)
        a1 = min(scene.ctypes.data + hi, map_hi)
        a0 -= a0 % page                                  # whole pages inside the mapping (map_lo is aligned)
        a1 -= a1 % page if a1 < map_hi else 0
        if a1 > a0:
            _libc.madvise(ctypes.c_void_p(a0), ctypes.c_size_t(a1 - a0), advice)  # a hint: failure changes nothing


class TileLoader:
    """One worker's tile buffers (allocated once, tile² each) and the loaders that fill its backend's
    input buffer (backend.planes, in model-input units and the backend's layout) and the valid / out of
    plausible range masks from one scene window. bind() attaches the buffers to a backend between scenes."""

    def __init__(self, tile: int):
        t = self.tile = tile
        self.valid = np.zeros((t, t), bool)
        self.nonzero = np.zeros((t, t), bool)
        self.tmp = np.zeros((t, t), bool)
        self.oor = np.zeros((t, t), bool)                # reflectance outside PLAUSIBLE_REFLECTANCE
        ts = -(-t // DARK_STRIDE)
        self.bright = np.zeros((ts, ts), bool)           # the dark-scene sample (every DARK_STRIDE-th pixel)
        self.bright_tmp = np.zeros((ts, ts), bool)
        self.bind(None, 0)

    def bind(self, backend, channels: int) -> None:
        """Load into backend.planes (the backend owns the input buffer); None: no model runs."""
        if backend is None:
            self.planes = self.planes_chw = np.zeros((0, self.tile, self.tile), np.float32)
            self.hwc, self.input_range = HwcPlan(self.tile, 0, "chw"), (0.0, 0.0)
            return
        self.planes = backend.planes
        self.planes_chw = planar_view(backend)           # the same buffer as (C, T, T), for the band loops
        self.hwc = HwcPlan(self.tile, channels, getattr(backend, "layout", "chw"))
        self.input_range = backend.input_range

    def prepare(self, src_idx: list[int]) -> None:
        """Per scene: whole-window (HWC) loading when the scene's bands allow it."""
        self.hwc.prepare(src_idx)

    def count_bright(self, src_idx: list[int], imap: InputMap) -> tuple[int, int]:
        """After load(): (valid sampled pixels, of which with any of the scene's bands at or above
        DARK_REFLECTANCE) on every DARK_STRIDE-th pixel of the window in both axes (the padding is invalid)."""
        s, bright, tmp = DARK_STRIDE, self.bright, self.bright_tmp
        bright.fill(False)
        for ci, si in enumerate(src_idx):                # the scene's own bands (not absent ones / the flag)
            if si >= 0:
                np.greater_equal(self.planes_chw[ci, ::s, ::s], imap.dark, out=tmp)
                np.logical_or(bright, tmp, out=bright)
        v = self.valid[::s, ::s]
        np.logical_and(bright, v, out=bright)
        return int(np.count_nonzero(v)), int(np.count_nonzero(bright))

    def load(self, scene, wy0, wx0, h, w, src_idx, imap: InputMap, valid_mask) -> tuple[int, int]:
        """Fill self.planes (in the backend's input units and layout) and self.valid from the scene window
        at (wy0, wx0); returns its (rows, cols)."""
        if self.hwc.ready:
            return self._load_tile_hwc(scene, wy0, wx0, h, w, imap, valid_mask)
        return self._load_tile_planar(scene, wy0, wx0, h, w, src_idx, imap, valid_mask)

    def _load_tile_hwc(self, scene, wy0, wx0, h, w, imap: InputMap, valid_mask) -> tuple[int, int]:
        """The same values as _load_tile_planar, computed in whole-window passes on a pixel-interleaved
        (T, T, C) buffer (LiteRT's NHWC input: no transposed copy per tile). Needs the scene's bands for the
        first k model channels to be consecutive scene channels (the usual case); the per-pixel "every band"
        / "any band" tests read the k booleans of a pixel as one uint{8k} word instead of k strided passes."""
        hw = self.hwc
        t, k, s0 = self.tile, hw.k, hw.s0
        rh, rw = min(t, h - wy0), min(t, w - wx0)
        x = self.planes[:rh, :rw, :k]
        scale, offset, fill = imap.scale, imap.offset, imap.fill
        vsub, nz, tsub = self.valid[:rh, :rw], self.nonzero[:rh, :rw], self.tmp[:rh, :rw]
        b_all, b_any = hw.all_bits[:rh, :rw], hw.any_bits[:rh, :rw]      # (rh, rw, kp) bool, pads preset
        w_all, w_any = hw.all_words[:rh, :rw, 0], hw.any_words[:rh, :rw, 0]
        np.multiply(scene[wy0:wy0 + rh, wx0:wx0 + rw, s0:s0 + k], scale, out=x, dtype=np.float32, casting="unsafe")
        if scene.dtype.kind == "f":                      # every band finite: NaN fails both comparisons
            np.less_equal(x, _F32_MAX, out=b_all[..., :k])
            np.equal(w_all, hw.all_set, out=vsub)
            np.greater_equal(x, -_F32_MAX, out=b_all[..., :k])
            np.equal(w_all, hw.all_set, out=tsub)
            np.logical_and(vsub, tsub, out=vsub)
        else:
            vsub.fill(True)
        np.not_equal(x, 0.0, out=b_any[..., :k])
        np.not_equal(w_any, 0, out=nz)                   # all bands exactly zero = no-data fill
        np.logical_and(vsub, nz, out=vsub)
        if valid_mask is not None:
            np.logical_and(vsub, valid_mask[wy0:wy0 + rh, wx0:wx0 + rw], out=vsub)
        if offset:
            np.add(x, offset, out=x)
        oor = self.oor[:rh, :rw]                        # any band outside the plausible reflectance range
        np.less(x, imap.plausible_lo, out=b_any[..., :k])
        np.not_equal(w_any, 0, out=oor)
        np.greater(x, imap.plausible_hi, out=b_any[..., :k])
        np.not_equal(w_any, 0, out=tsub)
        np.logical_or(oor, tsub, out=oor)
        if not vsub.all():                               # NaN/Inf/no-data never reach the model
            np.logical_not(vsub, out=tsub)
            np.copyto(x, fill, where=tsub[..., None])
        lo, hi = self.input_range
        np.clip(x, lo, hi, out=x)                        # saturated or absurd values stay in range
        for ci, v in hw.constants:                       # absent optional bands (0) / presence flag (1)
            self.planes[..., ci].fill(imap.one if v else imap.fill)
        if rh < t or rw < t:
            self._pad(rh, rw)
        return rh, rw

    def _load_tile_planar(self, scene, wy0, wx0, h, w, src_idx, imap: InputMap, valid_mask) -> tuple[int, int]:
        """Band by band into the (C, T, T) view of the input buffer (ONNX Runtime's NCHW input; any band order)."""
        t = self.tile
        rh, rw = min(t, h - wy0), min(t, w - wx0)
        planes = self.planes_chw
        scale, offset, fill, p_lo, p_hi = imap.scale, imap.offset, imap.fill, imap.plausible_lo, imap.plausible_hi
        vsub, nz, tsub = self.valid[:rh, :rw], self.nonzero[:rh, :rw], self.tmp[:rh, :rw]
        vsub.fill(True)
        nz.fill(False)
        floating = scene.dtype.kind == "f"               # integer DN are always finite
        for ci, si in enumerate(src_idx):                # bounded by the model's band count
            if si < 0:                                   # absent optional band (0) or presence flag (1)
                planes[ci].fill(imap.one if si == -2 else imap.fill)
                continue
            p = planes[ci, :rh, :rw]
            np.multiply(scene[wy0:wy0 + rh, wx0:wx0 + rw, si], scale, out=p, dtype=np.float32, casting="unsafe")
            if floating:                                 # every band finite: NaN fails both comparisons
                # (not np.isfinite: numpy 2.4's SIMD isfinite/isnan mis-write a strided `out` view)
                np.less_equal(p, _F32_MAX, out=tsub)
                np.logical_and(vsub, tsub, out=vsub)
                np.greater_equal(p, -_F32_MAX, out=tsub)
                np.logical_and(vsub, tsub, out=vsub)
            np.not_equal(p, 0.0, out=tsub)
            np.logical_or(nz, tsub, out=nz)             # all bands exactly zero = no-data fill
        np.logical_and(vsub, nz, out=vsub)
        if valid_mask is not None:
            np.logical_and(vsub, valid_mask[wy0:wy0 + rh, wx0:wx0 + rw], out=vsub)
        lo, hi = self.input_range
        oor = self.oor[:rh, :rw]                        # any band outside the plausible reflectance range
        oor.fill(False)
        invalid = not vsub.all()
        if invalid:                                      # NaN/Inf/no-data never reach the model
            np.logical_not(vsub, out=nz)                 # (nz is free again: it now marks invalid pixels)
        for ci, si in enumerate(src_idx):
            if si < 0:
                continue
            p = planes[ci, :rh, :rw]
            if offset:
                np.add(p, offset, out=p)
            np.less(p, p_lo, out=tsub)                   # out of range is judged before the fill
            np.logical_or(oor, tsub, out=oor)
            np.greater(p, p_hi, out=tsub)
            np.logical_or(oor, tsub, out=oor)
            if invalid:
                np.copyto(p, fill, where=nz)
            np.clip(p, lo, hi, out=p)                    # saturated or absurd values stay in range
        if rh < t or rw < t:
            self._pad(rh, rw)
        return rh, rw

    def _pad(self, rh: int, rw: int) -> None:
        """Reflect the valid region into the rest of the tile buffer (edge replication if too thin)."""
        t = self.tile
        r = self.planes_chw
        for y in range(rh, t):                           # bounded: < tile iterations
            k = y - rh + 1
            r[:, y, :rw] = r[:, max(rh - 1 - k, 0) if rh > 1 else 0, :rw]
        for x in range(rw, t):
            k = x - rw + 1
            r[:, :, x] = r[:, :, max(rw - 1 - k, 0) if rw > 1 else 0]
        self.valid[rh:, :] = False
        self.valid[:, rw:] = False

