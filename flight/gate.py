"""CloudGate: fixed-memory tile scheduler, cloud fraction, anytime early exit, decisions, decision log.

Steady state (per tile) allocates nothing but short-lived view objects: every buffer is created in
__init__ from the config. Tiles partition the scene into cores of (tile - overlap)² pixels; each tile
window adds overlap/2 context on every side (reflect-padded at scene edges) and only its core is
counted and written, so results do not depend on visiting order and no scene-sized buffer exists.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bands import canonical_band
from .backends import Backend, open_backend
from .config import GateConfig, config_from_dict, load_config
from .decisionlog import MAX_ID_CHARS, DecisionLog
from .errors import (AllInvalidSceneError, ArgumentError, BandMismatchError, CloudGateError, ConcurrentUseError,
                     ConfigError, ImplausibleRadiometryError, SceneDtypeError, SceneFileError, SceneShapeError,
                     ValidMaskError)
from .model import read_verified, resolve_model
from .policy import policy_band

ACTIONS = ("downlink", "discard", "reacquire", "fault")
CLEAR, CLOUD, SHADOW, INVALID = 0, 1, 2, 255
_KAPPA = 7.0 / 3.0 + 3.0 / math.sqrt(2.0)  # Bardenet & Maillard (2015) empirical Bernstein-Serfling
_SUPPORTED_KINDS = "biuf"
_MADV_DONTNEED = 4
_F32_MAX = np.float32(np.finfo(np.float32).max)
# Radiometry plausibility: reflectance (after radiometry) outside this range on more than this share of
# the valid pixels means the caller's radiometry is wrong (DN passed as reflectance, a x10000 scale, ...).
# Top-of-atmosphere reflectance of bright cloud/snow stays well below 2; -0.5 allows offset DN rules.
PLAUSIBLE_REFLECTANCE = (-0.5, 2.5)
IMPLAUSIBLE_SHARE = 0.5
_PRIORITY_RANGE = (-2**31, 2**31 - 1)
_MAX_BAND_NAME = 64
try:
    _libc = ctypes.CDLL(None)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _libc = None


@dataclass
class Decision:
    action: str
    cloud_fraction: float
    valid_fraction: float
    shadow_fraction: float = 0.0
    tiles_processed: int = 0
    tiles_total: int = 0
    confidence_bound: tuple[float, float] = (0.0, 1.0)
    clear_tiles: list = field(default_factory=list)   # [(row, col, cloud_fraction)] for partial downlink
    partial: bool = False
    early_exit: bool = False
    latency_s: float = 0.0
    infer_s: float = 0.0                                # of which inside the runtime (for HIL latency models)
    tile_pixels: int = 0
    model_name: str = ""
    model_sha256: str = ""
    backend: str = ""
    policy_version: str = ""
    degraded: str | None = None
    fault: str | None = None
    fault_code: str | None = None
    scene_id: str = ""
    target_id: str | None = None
    priority: int = 0
    hysteresis: str | None = None                       # set when the target's previous action changed this one
    grid: tuple[int, int] = (0, 0)
    scene_bytes: int = 0
    downlink_bytes: int = 0
    log_seq: int | None = None

    def to_record(self) -> dict:
        d = asdict(self)
        d.pop("log_seq")
        d["confidence_bound"] = list(self.confidence_bound)
        d["grid"] = list(self.grid)
        d["clear_tiles"] = [list(t) for t in self.clear_tiles]
        return d


def _golden_step(n: int) -> int:
    """A step coprime with n near n/φ: k -> (k * step) % n visits every tile once, spread evenly."""
    if n <= 2:
        return 1
    g = max(1, int(round(n / 1.6180339887)))
    for d in range(n):  # bounded: some step in [1, n) is coprime with n
        for c in (g + d, g - d):
            if 1 <= c < n and math.gcd(c, n) == 1:
                return c
    return 1


class CloudGate:
    """On-board cloud gate. See README 'flight' and docs/sdd.md for the contract."""

    def __init__(self, config: GateConfig | None = None):
        cfg = config or GateConfig()
        self.config = cfg
        self.card, self._model_path, self._model_bytes = resolve_model(cfg.model, cfg.backend)
        self.bands = tuple(self.card.bands)
        self.backend: Backend = open_backend(self._model_path, self._model_bytes, cfg.backend, cfg.threads, cfg.tile,
                                             len(self.bands))
        self._model_ok = True
        self._scenes = 0
        t = cfg.tile
        self._tile = t
        self._step = t - cfg.overlap
        self._half = cfg.overlap // 2
        # --- every buffer of the steady state, allocated once ---
        # band-planar (C, T, T), owned by the backend (ORT binds it as its input: no copy per tile);
        # every per-band pass runs over contiguous memory
        self._planes = self.backend.planes
        n = cfg.max_tiles
        # checked before anything is allocated (a huge max_tiles must not raise MemoryError first)
        buf_bytes = self._planes.nbytes + t * t * (4 + 1) + n * (4 * 8 + 1) + t * t * 3 * 4  # + backend output
        if buf_bytes > cfg.memory_budget_mib * 2**20:
            raise ConfigError("memory_budget_mib", f"gate buffers need {buf_bytes / 2**20:.1f} MiB for tile={t}, "
                                                   f"max_tiles={n}; raise the budget or lower tile/max_tiles")
        self._valid = np.zeros((t, t), bool)
        self._nonzero = np.zeros((t, t), bool)
        self._tmp = np.zeros((t, t), bool)
        self._oor = np.zeros((t, t), bool)               # reflectance outside PLAUSIBLE_REFLECTANCE
        self._mask = np.zeros((t, t), np.uint8)
        self._t_cloud = np.zeros(n, np.int64)
        self._t_valid = np.zeros(n, np.int64)
        self._t_shadow = np.zeros(n, np.int64)
        self._t_area = np.zeros(n, np.int64)
        self._t_done = np.zeros(n, bool)
        self.buffer_bytes = buf_bytes
        self._busy = threading.Lock()                    # one caller at a time (one gate per thread)
        self._history: OrderedDict[str, str] = OrderedDict()
        from statistics import NormalDist

        self._z = NormalDist().inv_cdf(1.0 - (1.0 - cfg.early_exit.confidence) / 4.0)  # two bounds share delta
        self.log = (DecisionLog(cfg.log.path, cfg.log.fsync, cfg.log.max_bytes, cfg.log.keep)
                    if cfg.log.path else None)
        self.log_failures = 0
        self.faults = 0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(cls, model: str | Path | None = None, **overrides) -> "CloudGate":
        """The shipped default student (no argument), or a .tflite/.onnx/card path; overrides are config keys."""
        data = dict(overrides)
        data["model"] = str(model) if model is not None else None
        return cls(config_from_dict(data))

    @classmethod
    def from_config(cls, path: str | Path) -> "CloudGate":
        return cls(load_config(path))

    def close(self) -> None:
        if self.log:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def scrub(self) -> str | None:
        """Memory scrub of the loaded model image: re-hash it against the card; on a mismatch (an upset
        in RAM) reload from the verified file. Returns a note when something was repaired; raises
        ModelIntegrityError when the file is corrupt too (the gate then refuses to run)."""
        expected = self.card.sha256_of_loaded
        if self._model_ok and hashlib.sha256(self._model_bytes).hexdigest() == expected:
            return None
        self._model_ok = False
        entry = next(a for a in self.card.artifacts.values() if a.get("file") == self._model_path.name)
        data = read_verified(self._model_path, entry["sha256"], self.card.path)
        self.backend = open_backend(self._model_path, data, self.config.backend, self.config.threads,
                                    self.config.tile, len(self.bands))
        self._planes = self.backend.planes               # the new backend owns a new input buffer
        self._model_bytes, self._model_ok = data, True
        return "model image failed its scrub (sha256); reloaded from the verified file"

    # ------------------------------------------------------------------ public API
    def process(self, scene, band_names, scene_id: str = "", mask_out: np.ndarray | None = None,
                valid_mask: np.ndarray | None = None, priority: int = 0, target_id: str | None = None,
                radiometry: tuple[float, float] | None = None, strict: bool | None = None) -> Decision:
        """Gate one scene. scene: (H, W, C) array or memmap; band_names: C names (canonical or sensor).
        Returns a Decision (action "fault" with the reason on bad input unless strict); in payload mode
        (strict False) it never raises for anything the scene, the arguments or the runtime do.

        scene_id: str (<= 256 chars). target_id: str (<= 256 chars) naming the ground target; hysteresis
        (the target's previous action widening its band) applies only when a target_id is given: without
        one, no history is shared between scenes. priority: int. valid_mask: bool (or 0/1 integer) (H, W).
        Integer scenes need a radiometry (scale > 0, offset), per call or in the config.

        mask_out: caller-owned uint8 (H, W): 0 clear, 1 cloud, 2 shadow, 255 no data. When the deadline
        stops the tile loop, the cores of the tiles not visited are written 255 (no decision) as well.

        One gate per thread: a second thread entering process() while it runs gets ConcurrentUseError
        (raised even in payload mode; it is a programming error, not a scene fault)."""
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError("CloudGate.process() entered from a second thread while it is running; "
                                     "use one gate per thread (each with its own decision log path)")
        try:
            return self._process_guarded(scene, band_names, scene_id, mask_out, valid_mask, priority, target_id,
                                         radiometry, strict)
        finally:
            self._busy.release()

    def _process_guarded(self, scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry,
                         strict) -> Decision:
        t0 = time.monotonic()
        strict = self.config.strict if strict is None else strict
        self._scenes += 1
        note = None
        try:
            self._check_args(scene_id, priority, target_id)
            if self.config.scrub_every and (self._scenes % self.config.scrub_every == 0 or not self._model_ok):
                note = self.scrub()
            d = self._process(scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry, t0)
        except CloudGateError as e:
            if strict:
                raise
            d = self._fault(scene_id, target_id, priority, e.code, str(e), t0)
        except Exception as e:
            # anything unexpected on one frame (runtime, numpy, a caller's object) must not kill the loop;
            # KeyboardInterrupt / SystemExit still propagate
            if strict:
                raise
            d = self._fault(scene_id, target_id, priority, "internal", f"{type(e).__name__}: {e}"[:2000], t0)
        if note:
            d.degraded = f"{d.degraded}; {note}" if d.degraded else note
        self._record(d)
        return d

    @staticmethod
    def _check_args(scene_id, priority, target_id) -> None:
        if not isinstance(scene_id, str):
            raise ArgumentError(f"scene_id must be a str, got {type(scene_id).__name__}")
        if len(scene_id) > MAX_ID_CHARS:
            raise ArgumentError(f"scene_id is {len(scene_id)} characters long; at most {MAX_ID_CHARS}")
        if target_id is not None:
            if not isinstance(target_id, str):
                raise ArgumentError(f"target_id must be a str or None, got {type(target_id).__name__}")
            if len(target_id) > MAX_ID_CHARS:
                raise ArgumentError(f"target_id is {len(target_id)} characters long; at most {MAX_ID_CHARS}")
        if not isinstance(priority, (int, np.integer)) or isinstance(priority, (bool, np.bool_)):
            raise ArgumentError(f"priority must be an int, got {type(priority).__name__} {priority!r:.40}")
        if not _PRIORITY_RANGE[0] <= priority <= _PRIORITY_RANGE[1]:
            raise ArgumentError(f"priority {priority} is outside {_PRIORITY_RANGE}")

    # ------------------------------------------------------------------ internals
    def _fault(self, scene_id, target_id, priority, code, reason, t0) -> Decision:
        """A fault decision; arguments that failed validation are recorded in a loggable form."""
        self.faults += 1
        scene_id = scene_id[:MAX_ID_CHARS] if isinstance(scene_id, str) else ""
        target_id = target_id[:MAX_ID_CHARS] if isinstance(target_id, str) else None
        ok_priority = (isinstance(priority, (int, np.integer)) and not isinstance(priority, (bool, np.bool_))
                       and _PRIORITY_RANGE[0] <= priority <= _PRIORITY_RANGE[1])
        return Decision(action="fault", cloud_fraction=0.0, valid_fraction=0.0, fault=reason, fault_code=code,
                        scene_id=scene_id, target_id=target_id, priority=int(priority) if ok_priority else 0,
                        latency_s=time.monotonic() - t0, model_name=self.card.name, model_sha256=self.card.sha256_of_loaded,
                        backend=self.backend.name, policy_version=self.config.policy.version)

    def _record(self, d: Decision) -> None:
        if self.log is None:
            return
        try:
            d.log_seq = self.log.append(d.to_record())
        except Exception as e:  # disk full, short write, refused record, ...: keep gating, count it, say so
            self.log_failures += 1
            d.degraded = ((d.degraded + "; ") if d.degraded else "") + f"decision log write failed: {e}"

    def _check(self, scene, band_names, mask_out, valid_mask):
        if not isinstance(scene, np.ndarray):
            raise SceneShapeError(f"scene must be a numpy array or memmap (H, W, C), got {type(scene).__name__}")
        if scene.ndim != 3:
            raise SceneShapeError(f"scene must be (H, W, C), got shape {scene.shape}; add a band axis with scene[..., None]")
        h, w, c = scene.shape
        if h < 1 or w < 1 or c < 1:
            raise SceneShapeError(f"scene has an empty axis: shape {scene.shape}")
        if scene.dtype.kind not in _SUPPORTED_KINDS or scene.dtype.itemsize > 8:
            raise SceneDtypeError(f"scene dtype {scene.dtype} unsupported; use float (reflectance) or integer DN")
        if isinstance(band_names, (str, bytes)):
            raise ArgumentError("band_names must be a sequence of band names, not a single string")
        try:
            names = list(band_names) if band_names is not None else []
        except Exception as e:
            raise ArgumentError(f"band_names could not be iterated: {type(e).__name__}: {e}"[:500]) from None
        if len(names) != c:
            raise SceneShapeError(f"band_names has {len(names)} names but the scene has {c} bands (last axis)")
        canon = []
        for n in names:
            if not isinstance(n, str) or len(n) > _MAX_BAND_NAME:
                raise ArgumentError(f"band_names must be strings of <= {_MAX_BAND_NAME} characters, got "
                                    f"{type(n).__name__} {n!r:.40}")
            try:
                canon.append(canonical_band(n))
            except ValueError:
                canon.append(n.lower())
        missing = [b for b in self.bands if b not in canon]
        if missing:
            raise BandMismatchError(missing, canon)
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
        return h, w, [canon.index(b) for b in self.bands]

    @staticmethod
    def _check_backing_file(scene: np.ndarray) -> None:
        """A memmap whose file shrank under the mapping would SIGBUS on the first page past the new end:
        check the file still covers the mapping before reading the scene."""
        if not isinstance(scene, np.memmap):
            return
        base = scene
        while base is not None and getattr(base, "_mmap", None) is None:
            base = base.base if isinstance(base.base, np.ndarray) else None
        mm = getattr(base, "_mmap", None)
        name = getattr(scene, "filename", None)
        if mm is None or not name:
            return
        try:
            size = os.stat(name).st_size
            start = int(getattr(base, "offset", 0))
            start -= start % mmap.ALLOCATIONGRANULARITY
            need = start + len(mm)
        except (OSError, ValueError) as e:
            raise SceneFileError(f"the file backing the memmap scene ({name}) cannot be checked: {e}") from None
        if size < need:
            raise SceneFileError(f"the file backing the memmap scene ({name}) shrank to {size} bytes under a "
                                 f"{need}-byte mapping; reading it would kill the process (SIGBUS). Re-open the scene")

    def _bound(self, n: int, N: int, s_x: float, ss_x: float) -> float:
        """Half-width of a (1 - delta/2) finite-population bound on the mean of n of N values in [0,1]."""
        if n >= N:
            return 0.0
        ee = self.config.early_exit
        delta = (1.0 - ee.confidence) / 2.0
        mean = s_x / n
        var = max(ss_x / n - mean * mean, 0.0)
        if ee.method == "normal":
            sd = max(math.sqrt(var * n / max(n - 1, 1)), ee.sd_floor)
            return self._z * sd / math.sqrt(n) * math.sqrt(1.0 - n / N)
        rho = (1.0 - (n - 1) / N) if n <= N / 2 else (1.0 - n / N) * (1.0 + 1.0 / n)
        lg = math.log(5.0 / delta)
        return math.sqrt(var) * math.sqrt(2.0 * rho * lg / n) + _KAPPA * lg / n

    def _band(self, f: float, prev: str | None) -> str:
        return policy_band(f, self.config.policy, prev)

    def _release_pages(self, scene: np.ndarray, y0: int, y1: int) -> None:
        """Drop already-read rows of a read-only memmap from our resident set (the page cache keeps them),
        so RSS stays flat whatever the scene size."""
        if _libc is None or not isinstance(scene, np.memmap) or getattr(scene, "mode", "") not in ("r", "readonly"):
            return
        row = scene.strides[0]
        if row <= 0:
            return
        start = scene.ctypes.data + y0 * row
        page = mmap.PAGESIZE
        a0 = start - start % page
        a1 = scene.ctypes.data + y1 * row
        a1 -= a1 % page
        if a1 > a0:
            _libc.madvise(ctypes.c_void_p(a0), ctypes.c_size_t(a1 - a0), _MADV_DONTNEED)

    def _load_tile(self, scene, wy0, wx0, h, w, src_idx, scale, offset, fill, valid_mask, p_lo, p_hi) -> tuple[int, int]:
        """Fill self._planes (in the backend's input units) and self._valid from the scene window at
        (wy0, wx0); returns its (rows, cols)."""
        t = self._tile
        rh, rw = min(t, h - wy0), min(t, w - wx0)
        planes = self._planes
        vsub, nz, tsub = self._valid[:rh, :rw], self._nonzero[:rh, :rw], self._tmp[:rh, :rw]
        vsub.fill(True)
        nz.fill(False)
        floating = scene.dtype.kind == "f"               # integer DN are always finite
        for ci, si in enumerate(src_idx):                # bounded by the model's band count
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
        sub = planes[:, :rh, :rw]
        if offset:
            np.add(sub, offset, out=sub)
        oor = self._oor[:rh, :rw]                        # any band outside the plausible reflectance range
        oor.fill(False)
        for ci in range(len(src_idx)):
            p = planes[ci, :rh, :rw]
            np.less(p, p_lo, out=tsub)
            np.logical_or(oor, tsub, out=oor)
            np.greater(p, p_hi, out=tsub)
            np.logical_or(oor, tsub, out=oor)
        if not vsub.all():                               # NaN/Inf/no-data never reach the model
            np.logical_not(vsub, out=tsub)
            for ci in range(len(src_idx)):
                np.copyto(planes[ci, :rh, :rw], fill, where=tsub)
        lo, hi = self.backend.input_range
        np.clip(sub, lo, hi, out=sub)                    # saturated or absurd values stay in range
        if rh < t or rw < t:
            self._pad(rh, rw)
        return rh, rw

    def _pad(self, rh: int, rw: int) -> None:
        """Reflect the valid region into the rest of the tile buffer (edge replication if too thin)."""
        t, r = self._tile, self._planes
        for y in range(rh, t):                           # bounded: < tile iterations
            k = y - rh + 1
            r[:, y, :rw] = r[:, max(rh - 1 - k, 0) if rh > 1 else 0, :rw]
        for x in range(rw, t):
            k = x - rw + 1
            r[:, :, x] = r[:, :, max(rw - 1 - k, 0) if rw > 1 else 0]
        self._valid[rh:, :] = False
        self._valid[:, rw:] = False

    def _process(self, scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry, t0) -> Decision:
        cfg = self.config
        h, w, src_idx = self._check(scene, band_names, mask_out, valid_mask)
        rad = radiometry if radiometry is not None else (cfg.radiometry_scale, cfg.radiometry_offset)
        try:
            scale, offset = (float(v) for v in rad)
        except (TypeError, ValueError):
            raise SceneDtypeError(f"radiometry must be a (scale, offset) pair of numbers, got {rad!r}") from None
        if not (math.isfinite(scale) and math.isfinite(offset)) or scale <= 0:
            raise SceneDtypeError(f"radiometry (scale={scale}, offset={offset}) must be finite with scale > 0 "
                                  "(reflectance = value * scale + offset)")
        if scene.dtype.kind in "iu" and radiometry is None and cfg.radiometry_scale == 1.0 and cfg.radiometry_offset == 0.0:
            raise ImplausibleRadiometryError(
                f"integer scene ({scene.dtype}) without a radiometry scale would be read as reflectance; pass "
                "radiometry=(scale, offset) with reflectance = DN * scale + offset (e.g. (1e-4, 0.0) for Sentinel-2 "
                "L1C, (2e-5, -0.1) for Landsat-8) or set radiometry_scale/radiometry_offset in the gate config")
        self._check_backing_file(scene)
        rad_scale, rad_offset = scale, offset
        # fold radiometry and the model's input quantization into one affine map per value:
        # model_input = ((value * scale + offset) * a + b), clipped to the backend's input range
        a, b = self.backend.input_affine
        scale, offset = np.float32(scale * a), np.float32(offset * a + b)
        fill = np.float32(b)                             # what an invalid pixel (reflectance 0) becomes
        q_lo, q_hi = (PLAUSIBLE_REFLECTANCE[0] * a + b), (PLAUSIBLE_REFLECTANCE[1] * a + b)
        p_lo, p_hi = np.float32(min(q_lo, q_hi)), np.float32(max(q_lo, q_hi))
        step, half, t = self._step, self._half, self._tile
        ny, nx = -(-h // step), -(-w // step)
        n_tiles = ny * nx
        if n_tiles > cfg.max_tiles:
            raise SceneShapeError(f"scene {h}x{w} needs {n_tiles} tiles > max_tiles={cfg.max_tiles}; "
                                  "raise max_tiles in the gate config")
        key = target_id                                  # hysteresis only for a named target
        prev = self._history.get(key) if key is not None else None
        ee = cfg.early_exit.enabled and mask_out is None
        g = _golden_step(n_tiles)
        core_full = step * step
        tc, tv, ts, ta, td = self._t_cloud, self._t_valid, self._t_shadow, self._t_area, self._t_done
        td[:n_tiles] = False
        s_c = s_v = ss_c = ss_v = 0.0
        cloud_px = valid_px = shadow_px = area_px = oor_px = 0
        total_area = h * w
        n = 0
        infer_s = 0.0
        bound = (0.0, 1.0)
        degraded = None
        early = False
        deadline = t0 + cfg.deadline_s
        for k in range(n_tiles):                          # bounded by the tile count
            idx = (k * g) % n_tiles
            ty, tx = divmod(idx, nx)
            cy0, cx0 = ty * step, tx * step
            cy1, cx1 = min(cy0 + step, h), min(cx0 + step, w)
            wy0 = min(max(cy0 - half, 0), max(h - t, 0))
            wx0 = min(max(cx0 - half, 0), max(w - t, 0))
            self._load_tile(scene, wy0, wx0, h, w, src_idx, scale, offset, fill, valid_mask, p_lo, p_hi)
            ti = time.perf_counter()
            self.backend.infer(self._planes, self._mask)
            infer_s += time.perf_counter() - ti
            ry0, ry1, rx0, rx1 = cy0 - wy0, cy1 - wy0, cx0 - wx0, cx1 - wx0
            m, v, b = self._mask[ry0:ry1, rx0:rx1], self._valid[ry0:ry1, rx0:rx1], self._tmp[ry0:ry1, rx0:rx1]
            nv = int(np.count_nonzero(v))
            np.logical_and(self._oor[ry0:ry1, rx0:rx1], v, out=b)
            oor_px += int(np.count_nonzero(b))
            np.equal(m, CLOUD, out=b)
            np.logical_and(b, v, out=b)
            nc = int(np.count_nonzero(b))
            np.equal(m, SHADOW, out=b)
            np.logical_and(b, v, out=b)
            ns = int(np.count_nonzero(b))
            if mask_out is not None:
                dst = mask_out[cy0:cy1, cx0:cx1]
                np.copyto(dst, m)
                np.logical_not(v, out=b)
                np.copyto(dst, INVALID, where=b)
            self._release_pages(scene, wy0, min(wy0 + t, h))
            tc[idx], tv[idx], ts[idx], ta[idx], td[idx] = nc, nv, ns, (cy1 - cy0) * (cx1 - cx0), True
            cloud_px += nc; valid_px += nv; shadow_px += ns; area_px += int(ta[idx])
            xc, xv = nc / core_full, nv / core_full
            s_c += xc; ss_c += xc * xc; s_v += xv; ss_v += xv * xv
            n += 1
            if n < n_tiles and ee and n >= cfg.early_exit.min_tiles:
                bound = self._fraction_bound(n, n_tiles, s_c, ss_c, s_v, ss_v)
                lo_b, hi_b = self._band(bound[0], prev), self._band(bound[1], prev)
                vlo = self._valid_lower(n, n_tiles, s_v, ss_v, total_area, core_full)
                if lo_b == hi_b != "mid" and vlo >= cfg.policy.min_valid_fraction:
                    early = True
                    break
            if time.monotonic() > deadline and n < n_tiles:
                degraded = f"deadline {cfg.deadline_s}s reached after {n}/{n_tiles} tiles"
                break
        if mask_out is not None and n < n_tiles:          # deadline: no decision where no tile was visited
            for idx in range(n_tiles):                    # bounded by the tile count
                if not td[idx]:
                    ty, tx = divmod(idx, nx)
                    mask_out[ty * step:min(ty * step + step, h), tx * step:min(tx * step + step, w)] = INVALID
        if valid_px == 0:
            if n == n_tiles:
                raise AllInvalidSceneError(f"scene {scene_id!r}: every pixel is no-data, NaN/Inf or masked invalid")
        if oor_px > IMPLAUSIBLE_SHARE * valid_px:
            raise ImplausibleRadiometryError(
                f"{oor_px / valid_px:.0%} of the valid pixels have a reflectance outside {PLAUSIBLE_REFLECTANCE} after "
                f"radiometry (scale={rad_scale:g}, offset={rad_offset:g}): the scene is not reflectance; pass the "
                "sensor's radiometry=(scale, offset) (reflectance = value * scale + offset) or fix the config's "
                "radiometry_scale/radiometry_offset")
        full = n == n_tiles
        cf = cloud_px / valid_px if valid_px else 0.0
        vf = valid_px / area_px if area_px else 0.0
        if full:
            bound = (cf, cf)
        elif not early:
            bound = self._fraction_bound(n, n_tiles, s_c, ss_c, s_v, ss_v)
        action, partial, clear, why = self._decide(cf, vf, priority, prev, n_tiles, nx, full)
        if why:
            degraded = f"{degraded}; {why}" if degraded else why
        hysteresis = None
        if prev is not None and self._band(cf, prev) != self._band(cf, None):
            alone = self._decide(cf, vf, priority, None, n_tiles, nx, full)
            if (alone[0], alone[1]) != (action, partial):
                hysteresis = (f"hysteresis: target's previous action {prev} changed {alone[0]}"
                              f"{' (partial)' if alone[1] else ''} to {action}{' (partial)' if partial else ''}"
                              f" at cloud fraction {cf:.3f}")
        if key is not None:
            if len(self._history) >= cfg.policy.max_targets and key not in self._history:
                self._history.popitem(last=False)
            self._history[key] = action
            self._history.move_to_end(key)
        scene_bytes = int(scene.nbytes)
        if action == "downlink":
            down = int(round(scene_bytes * (sum(int(ta[r * nx + c]) for r, c, _ in clear) / total_area))) if partial else scene_bytes
        else:
            down = 0
        return Decision(
            action=action, cloud_fraction=float(cf), valid_fraction=float(vf), shadow_fraction=shadow_px / valid_px if valid_px else 0.0,
            tiles_processed=n, tiles_total=n_tiles, confidence_bound=(float(bound[0]), float(bound[1])),
            clear_tiles=clear, partial=partial, early_exit=early, latency_s=time.monotonic() - t0,
            model_name=self.card.name, model_sha256=self.card.sha256_of_loaded, backend=self.backend.name,
            policy_version=cfg.policy.version, degraded=degraded, scene_id=str(scene_id), target_id=target_id,
            priority=int(priority), grid=(ny, nx), scene_bytes=scene_bytes, downlink_bytes=down, infer_s=infer_s,
            tile_pixels=t * t, hysteresis=hysteresis)

    def _fraction_bound(self, n, N, s_c, ss_c, s_v, ss_v) -> tuple[float, float]:
        ec, ev = self._bound(n, N, s_c, ss_c), self._bound(n, N, s_v, ss_v)
        # cloud fraction = mean cloud per tile / mean valid per tile (both in core-area units)
        mc, mv = s_c / n, s_v / n
        v_lo, v_hi = max(mv - ev, 1e-12), min(mv + ev, 1.0)
        c_lo, c_hi = max(mc - ec, 0.0), min(mc + ec, v_hi)
        return min(c_lo / v_hi, 1.0), min(c_hi / v_lo, 1.0)

    def _valid_lower(self, n, N, s_v, ss_v, total_area, core_full) -> float:
        ev = self._bound(n, N, s_v, ss_v)
        return max(s_v / n - ev, 0.0) * N * core_full / total_area

    def _decide(self, cf, vf, priority, prev, n_tiles, nx, full):
        p = self.config.policy
        high_priority = priority >= p.reacquire_priority
        if vf < p.min_valid_fraction:
            return ("reacquire" if high_priority else "discard"), False, [], \
                f"valid fraction {vf:.3f} < min_valid_fraction {p.min_valid_fraction}"
        band = self._band(cf, prev)
        if band == "low":
            return "downlink", False, [], None
        if band == "high":
            return ("reacquire" if high_priority else "discard"), False, [], None
        # between the thresholds: prune cloudy tiles, downlink the clear ones
        clear = []
        for idx in range(n_tiles):                        # bounded by the tile count
            if self._t_done[idx] and self._t_valid[idx] > 0 and self._t_cloud[idx] <= p.tile_clear_max * self._t_valid[idx]:
                clear.append((idx // nx, idx % nx, round(float(self._t_cloud[idx] / self._t_valid[idx]), 4)))
        why = None if full else "partial-downlink list covers visited tiles only"
        if high_priority and cf >= p.reacquire_min_cloud:
            return "reacquire", bool(clear), clear, why
        if not clear:
            return "discard", False, [], why
        return "downlink", True, clear, why
