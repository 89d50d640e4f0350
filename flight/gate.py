"""CloudGate: fixed-memory tile scheduler, cloud fraction, anytime early exit, decisions, decision log.

One scene reads top-down in CloudGate._process: check the inputs -> scan the tiles (infer, count, feed
flight.estimate, stop early or at the deadline) -> estimate -> decide (flight.policy, pure) -> build the
Decision; _process_guarded then writes it to the log sink. Outside dependencies enter through the ports
of flight.ports (clock, backend factory, log sink), given at construction.

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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .bands import canonical_band
from .backends import Backend, open_backend, planar_view
from .bist import BistResult, compare_reference, run_tiles
from .config import GateConfig, config_from_dict, load_config
from .decisionlog import DecisionLog
from .errors import (AllInvalidSceneError, ArgumentError, BandMismatchError, CloudGateError, ConcurrentUseError,
                     ConfigError, ImplausibleRadiometryError, ModelError, ModelIntegrityError, SceneDtypeError,
                     SceneFileError, SceneShapeError, ValidMaskError)
from .estimate import FractionEstimator
from .evidence import BrightSurfaceProbe, review_discard
from .logschema import DECISION_FIELDS, MAX_ID_CHARS, degraded_text, event, model_event
from .model import GATE_CLASSES, ModelCard
from .modelsource import CardSource, PackageSource, SlotSource, Source, open_loaded
from .errors import ModelReloadError, OutOfMemoryError
from .logschema import MAX_CLEAR_RUNS, clear_tiles_record
from .policy import ACTIONS, Action, PolicyDecision, TargetHistory, TileCounts, decide, policy_band
from .ports import BackendFactory, Clock, LogSink, SystemClock

__all__ = ["ACTIONS", "Action", "CloudGate", "Decision"]
CLEAR, CLOUD, SHADOW, INVALID = 0, 1, 2, 255
_SUPPORTED_KINDS = "biuf"
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21   # Linux >= 5.4: reclaim now, contents kept (dirty shared pages written back, private copies kept)
_F32_MAX = np.float32(np.finfo(np.float32).max)
# Radiometry plausibility: reflectance (after radiometry) outside this range on more than this share of
# the valid pixels means the caller's radiometry is wrong (DN passed as reflectance, a x10000 scale, ...).
# Top-of-atmosphere reflectance of bright cloud/snow stays well below 2; -0.5 allows offset DN rules.
PLAUSIBLE_REFLECTANCE = (-0.5, 2.5)
IMPLAUSIBLE_SHARE = 0.5
_PRIORITY_RANGE = (-2**31, 2**31 - 1)
_MAX_BAND_NAME = 64
PACKAGE_SUFFIX = ".cgpkg"
SLOTS = ("a", "b")
_RETRY_EVERY = 10                 # scenes between recovery attempts while no verified model runs
_MODEL_FAULTS = ("internal", "model_corrupt")   # fault codes a model (not a scene) is blamed for
try:
    _libc = ctypes.CDLL(None)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _libc = None


@dataclass
class Decision:
    """What the gate decided for one scene, and why. Written to the decision log as one record
    (flight.logschema.FIELDS is the schema; docs/decision-log.md renders it).

    action           "downlink" | "discard" | "reacquire" | "fault"
    rule             which rule decided: "threshold" | "hysteresis" | "min_valid_fraction" | "early_exit" |
                     "deadline" | "fault"
    reason           one sentence: the comparison that decided, with the values and thresholds
    thresholds       policy thresholds in force (fractions 0..1; the target's hysteresis applied); {} on fault
    cloud_fraction   cloud pixels / valid pixels of the visited tiles (0..1)
    valid_fraction   valid pixels / scene pixels of the visited tiles (0..1)
    shadow_fraction  cloud-shadow pixels / valid pixels of the visited tiles (0..1)
    tiles_processed  tiles inferred; tiles_total: tiles in the scene; grid: (rows, cols) of tiles
    confidence_bound (low, high) bound on the scene cloud fraction (0..1); (cf, cf) after a full scan
    clear_tiles      [(row, col, cloud fraction)] in tile-core units (core_pixels scene pixels per step) of the
                     clear tiles to downlink when partial (the log record stores them as row runs, at most
                     flight.logschema.MAX_CLEAR_RUNS; clear_tiles_omitted counts the tiles beyond those)
    partial          only clear_tiles are to be downlinked (or kept, when reacquiring)
    early_exit       the scan stopped early on the confidence bound
    latency_s        seconds inside process() (monotonic clock); infer_s: of which inside the runtime
    tile_pixels      pixels of one model input window (tile²); core_pixels: side of a tile core in pixels
    model_name, model_sha256, backend, policy_version: what decided (card name, artifact sha256, runtime)
    package_sha256, model_slot: the signed package and A/B slot the model came from ("" when unsigned)
    degraded         events [{code, severity, text}] (flight.logschema.EVENT_CODES); [] when none
    fault, fault_code  why the frame faulted (text, flight.errors code); None otherwise
    scene_id, target_id, priority: the caller's arguments (as logged)
    hysteresis       the reason text when the target's previous action changed the action, else None
    scene_bytes      in-memory size of the scene array passed (every band, its dtype), 0 when unknown
    downlink_bytes   share of scene_bytes to downlink (clear-tile area share when partial; 0 unless downlink)
    log_seq          sequence number of the log record; None without a log or when the write failed
    """
    action: Action
    cloud_fraction: float
    valid_fraction: float
    rule: str = "threshold"
    reason: str = ""
    thresholds: dict = field(default_factory=dict)
    shadow_fraction: float = 0.0
    tiles_processed: int = 0
    tiles_total: int = 0
    confidence_bound: tuple[float, float] = (0.0, 1.0)
    clear_tiles: list = field(default_factory=list)
    clear_tiles_omitted: int = 0
    partial: bool = False
    early_exit: bool = False
    latency_s: float = 0.0
    infer_s: float = 0.0
    tile_pixels: int = 0
    core_pixels: int = 0
    model_name: str = ""
    model_sha256: str = ""
    package_sha256: str = ""
    model_slot: str = ""
    backend: str = ""
    policy_version: str = ""
    degraded: list = field(default_factory=list)
    fault: str | None = None
    fault_code: str | None = None
    scene_id: str = ""
    target_id: str | None = None
    priority: int = 0
    hysteresis: str | None = None
    grid: tuple[int, int] = (0, 0)
    scene_bytes: int = 0
    downlink_bytes: int = 0
    log_seq: int | None = None

    def to_record(self) -> dict:
        """The log record: exactly flight.logschema.DECISION_FIELDS, JSON types only."""
        rec = {k: getattr(self, k) for k in DECISION_FIELDS}
        rec["confidence_bound"] = list(self.confidence_bound)
        rec["grid"] = list(self.grid)
        rec["clear_tiles"], rec["clear_tiles_omitted"] = clear_tiles_record(self.clear_tiles)
        rec["degraded"] = [dict(e) for e in self.degraded]
        rec["thresholds"] = dict(self.thresholds)
        return rec

    @property
    def degraded_text(self) -> str:
        """The degraded events as one line ("code: text; ..."), for consoles."""
        return degraded_text(self.degraded)


class _InputMap(NamedTuple):
    """Radiometry and the model's input quantization folded into one affine map per value:
    model_input = value * scale + offset (then clipped to the backend's input range)."""
    scale: np.float32
    offset: np.float32
    fill: np.float32             # what an invalid pixel (reflectance 0) becomes
    one: np.float32              # reflectance 1.0 in model-input units (the presence flag when set)
    plausible_lo: np.float32     # PLAUSIBLE_REFLECTANCE in model-input units
    plausible_hi: np.float32
    radiometry: tuple[float, float]   # the caller's (scale, offset), for messages


# what the runtimes say when an allocation fails (onnxruntime: "Failed to allocate memory for requested
# buffer", C++ std::bad_alloc, LiteRT's XNNPack delegate: "failed to reshape runtime" when its workspace
# cannot be allocated): a lack of memory, typed as such, not an internal error or a corrupt model
_ALLOC_FAILURE_TEXT = ("failed to allocate memory", "bad_alloc", "out of memory", "failed to reshape runtime")


def _transient_load_failure(e: BaseException) -> str | None:
    """'out_of_memory' / 'model_reload_failed' when loading failed for a reason that says nothing about the
    model's bytes (they verified before the runtime opened them): no memory, or the runtime refusing them
    (LiteRT under memory pressure refuses with an empty message). None: the model itself is at fault."""
    if isinstance(e, MemoryError) or _is_allocation_failure(e):
        return "out_of_memory"
    if isinstance(e, ModelIntegrityError) and str(e).startswith(("LiteRT refused", "onnxruntime refused")):
        return "model_reload_failed"
    return None


def _is_allocation_failure(e: BaseException) -> bool:
    try:
        text = str(e).lower()
    except Exception:
        return False
    return any(t in text for t in _ALLOC_FAILURE_TEXT)


_LOG_FAILED_OOM = event("log_write_failed", "decision log write failed: out of memory")


class _SceneMap(NamedTuple):
    """The mmap behind a scene (CloudGate._scene_map): the file must hold need bytes while it is read."""
    mm: mmap.mmap
    need: int
    name: str
    mode: str | None             # np.memmap mode (page release advice); None for a raw mmap


class _Scan:
    """Counts of one scene's tile scan (reset per scene; no arrays)."""
    __slots__ = ("cloud_px", "valid_px", "shadow_px", "area_px", "oor_px", "infer_s", "early", "deadline", "bound")

    def __init__(self):
        self.cloud_px = self.valid_px = self.shadow_px = self.area_px = self.oor_px = 0
        self.infer_s = 0.0
        self.early = self.deadline = False
        self.bound = (0.0, 1.0)


class _HwcPlan:
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


class _NoModel:
    """Stands in for the runtime while no verified model runs: every frame faults model_corrupt."""

    name = "none"
    n_bands = 0
    input_affine = (1.0, 0.0)
    input_range = (0.0, 0.0)

    def __init__(self, tile: int):
        self.tile = tile
        self.planes = np.zeros((0, tile, tile), np.float32)

    def infer(self, planes, mask_out) -> None:
        raise ModelIntegrityError("no verified model runs")


def _mark_no_decision(mask_out) -> None:
    """A faulted frame's mask says 'no decision' (255) everywhere, never stale or half-written classes."""
    if isinstance(mask_out, np.ndarray) and mask_out.dtype == np.uint8 and mask_out.flags.writeable:
        mask_out.fill(255)


class CloudGate:
    """On-board cloud gate. See README 'flight', docs/sdd.md and docs/decision-log.md for the contract.

    Ports (flight.ports), all optional: clock (deadlines, latency, log timestamps), backend_factory
    (opens the inference runtime on the verified model bytes), log_sink (where decisions are written;
    default a DecisionLog on config.log.path, none without a path)."""

    def __init__(self, config: GateConfig | None = None, *, clock: Clock | None = None,
                 backend_factory: BackendFactory | None = None, log_sink: LogSink | None = None):
        cfg = config or GateConfig()
        self.config = cfg
        self._clock = clock or SystemClock()
        self._open_backend = backend_factory or open_backend
        t = cfg.tile
        self._tile = t
        self._step = t - cfg.overlap
        self._half = cfg.overlap // 2
        n = cfg.max_tiles
        # checked before anything is allocated (a huge max_tiles must not raise MemoryError first)
        # + the backend's input planes; t*t*16: the HWC loader's two per-pixel bool buffers (<= 8 bytes each)
        self._fixed_bytes = t * t * (4 + 1) + n * (3 * 8 + 1) + t * t * 3 * 4 + t * t * 16
        if self._fixed_bytes > cfg.memory_budget_mib * 2**20:
            raise ConfigError("memory_budget_mib", f"gate buffers need {self._fixed_bytes / 2**20:.1f} MiB for "
                                                   f"tile={t}, max_tiles={n}; raise the budget or lower tile/max_tiles")
        self.log_failures = 0
        self.faults = 0
        # the model (flight.modelsource, flight.slots): what runs, where it came from, its self-test
        self.model_events: deque = deque(maxlen=64)     # recent model events (also written to the log)
        self.log: LogSink | None = None
        self._pending: list[dict] = []                  # model events from before the log is open
        self._key: bytes | None = None
        self.store = None
        self._loaded = self._source = self._prev_source = None
        self._references: dict = {}                     # (artifact sha256, kind) -> self-test outputs at first load
        self.card = None
        self._model_ok = False
        self._unavailable = ""
        self._unavailable_code = "model_corrupt"        # or out_of_memory / model_reload_failed: transient
        self._scenes = self._since_bist = self._since_retry = 0
        self._bist_due = False
        self._probation = None                          # [scenes left, model faults, previous source, why]
        self._pointer_sig = None
        self.self_tests = self.self_test_failures = self.recoveries = self.rollbacks = 0
        self._busy = threading.Lock()                    # one caller at a time (one gate per thread)
        self._load_initial()
        # --- every buffer of the steady state, allocated once ---
        self._valid = np.zeros((t, t), bool)
        self._nonzero = np.zeros((t, t), bool)
        self._tmp = np.zeros((t, t), bool)
        self._oor = np.zeros((t, t), bool)               # reflectance outside PLAUSIBLE_REFLECTANCE
        self._mask = np.zeros((t, t), np.uint8)
        self._t_cloud = np.zeros(n, np.int64)            # per tile core: valid cloud pixels,
        self._t_valid = np.zeros(n, np.int64)            # valid pixels,
        self._t_area = np.zeros(n, np.int64)             # scene pixels,
        self._t_done = np.zeros(n, bool)                 # visited
        self._map: _SceneMap | None = None               # the mmap behind the scene being processed
        self._map_addr = 0                               # its start address (page release stays inside it)
        self._history = TargetHistory(cfg.policy.max_targets)
        ee = cfg.early_exit
        self._est = FractionEstimator(ee.method, ee.confidence, ee.sd_floor)
        self._probe = BrightSurfaceProbe()   # the discard guard's fixed sample buffers (flight.evidence)
        if log_sink is None and cfg.log.path:
            log_sink = DecisionLog(cfg.log.path, cfg.log.fsync, cfg.log.max_bytes, cfg.log.keep, clock=self._clock)
        self.log = log_sink
        for rec in self._pending:
            self._write_event(rec)
        self._pending = []

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(cls, model: str | Path | None = None, *, clock: Clock | None = None,
                   backend_factory: BackendFactory | None = None, log_sink: LogSink | None = None,
                   **overrides) -> "CloudGate":
        """The shipped default model (no argument), or a .tflite/.onnx/card path; overrides are config keys
        (e.g. backend="litert", log={"path": "d.jsonl"}); clock/backend_factory/log_sink are the ports."""
        data = dict(overrides)
        data["model"] = str(model) if model is not None else None
        return cls(config_from_dict(data), clock=clock, backend_factory=backend_factory, log_sink=log_sink)

    @classmethod
    def from_config(cls, path: str | Path, **ports) -> "CloudGate":
        """A gate from a YAML config (flight/gate.example.yaml shows every key); ports as for __init__."""
        return cls(load_config(path), **ports)

    def close(self) -> None:
        if self.log:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the model: load, self-test, swap, recover
    def _key_bytes(self) -> bytes:
        if self._key is None:
            from .package import load_key

            self._key = load_key(self.config.update.key)
        return self._key

    def _source_for(self, model) -> Source:
        """A source for a model path: a signed package (.cgpkg, the mission key), else an unsigned card or
        artifact (refused when update.require_signed is set)."""
        u = self.config.update
        if model is not None and str(model).endswith(PACKAGE_SUFFIX):
            return PackageSource(model, self._key_bytes(), int(u.max_package_mib * 2**20))
        if u.require_signed:
            raise ModelIntegrityError(f"update.require_signed is set and {model or 'the default model card'} is not a "
                                      "signed package (.cgpkg); pack it with python -m flight model pack")
        return CardSource(None if model is None else str(model))

    def _load_initial(self) -> None:
        cfg, u = self.config, self.config.update
        if not u.store:
            src = self._source_for(cfg.model)
            lm = self._load(src)            # raises: without a store there is nothing else to fall back to
            self._install(lm)
            if src.signed:
                self._event("model_loaded", f"{src.label} verified; self-test {lm.bist.detail}", lm,
                            duration=lm.load_s)
            return
        from .slots import ModelStore

        self.store = ModelStore(u.store, self._key_bytes(), int(u.max_package_mib * 2**20), threads=cfg.threads)
        self.store.ensure()
        self._pointer_sig = self._stat_pointer()
        slots = self.store.resolve_active()
        if slots:
            sources = [SlotSource(self.store, s) for s in slots]
        elif u.require_signed:
            self._set_unavailable(f"model store {u.store} holds no package and update.require_signed forbids the "
                                  "unsigned default model")
            return
        else:
            sources = [CardSource(None)]                # an empty store: the shipped (factory) model
        errors = []
        for i, src in enumerate(sources):
            try:
                lm = self._load(src)
            except ModelError as e:
                errors.append(f"{src.label}: {e}")
                self._event("model_switch_refused", f"{src.label} does not verify at start: {e}")
                continue
            self._install(lm)
            self._event("model_loaded", f"{src.label} verified at start; self-test {lm.bist.detail}", lm,
                        duration=lm.load_s)
            if i > 0 and isinstance(src, SlotSource):   # the pointer's slot failed: run and persist the other
                self.rollbacks += 1
                why = f"automatic rollback at start: {errors[0]}"
                self._event("model_rollback", why[:2000], lm)
                self._persist_pointer(src.slot, lm, why)
            return
        self._set_unavailable("; ".join(errors))

    def _load(self, src: Source):
        """open_loaded + the memory budget + (reload) the same outputs as at this artifact's first load."""
        cfg = self.config
        lm = open_loaded(src, cfg.backend, self._open_backend, cfg.threads, self._tile)
        for code, text in lm.notes:                      # issue 17 hook: model-metadata notes (flight.modelmeta)
            self._event(code, text, lm)
        need = self._fixed_bytes + lm.backend.planes.nbytes
        if need > cfg.memory_budget_mib * 2**20:
            raise ModelError(f"{src.label} needs {need / 2**20:.1f} MiB of gate buffers (input {lm.backend.planes.shape}) "
                             f"over memory_budget_mib={cfg.memory_budget_mib}")
        ref = self._references.get((lm.sha256, lm.kind))
        if ref is not None and ref != lm.reference:
            raise ModelIntegrityError(f"{src.label} verified, but its self-test outputs differ from those at its first "
                                      "load on this board: the runtime no longer computes what it did")
        return lm

    def _install(self, lm) -> None:
        """Make lm the running model (between scenes; the gate's buffers do not depend on the model)."""
        self._loaded, self._source = lm, lm.source
        self.card = lm.card
        self.bands = tuple(lm.card.bands)
        self.optional_bands = tuple(lm.card.optional_bands)
        self.backend = lm.backend
        self._planes = lm.backend.planes                 # the backend owns the input buffer
        self._planes_chw = planar_view(lm.backend)       # the same buffer as (C, T, T), for the band loops
        self._hwc = _HwcPlan(self._tile, lm.card.input_channels, getattr(lm.backend, "layout", "chw"))
        self.buffer_bytes = self._fixed_bytes + self._planes.nbytes
        if len(self._references) >= 8:
            self._references.pop(next(iter(self._references)))
        self._references.setdefault((lm.sha256, lm.kind), lm.reference)
        self._model_ok = True
        self._since_bist = self._since_retry = 0
        self._bist_due = False

    def _drop_backend(self) -> None:
        """Release the running runtime (a failed one; keeps the card so faults say which model failed)."""
        self.backend = _NoModel(self._tile)
        self._planes = self.backend.planes
        self._planes_chw, self._hwc = self._planes, _HwcPlan(self._tile, 0, "chw")
        self._model_ok = False

    def _set_unavailable(self, why: str) -> None:
        if getattr(self, "card", None) is None:
            self.card = ModelCard(name="none", bands=(), classes=GATE_CLASSES, tile=self._tile, artifacts={},
                                  path=Path(self.config.update.store or "."), raw={})
            self.bands = self.optional_bands = ()
            self.buffer_bytes = self._fixed_bytes
        self._drop_backend()
        self._unavailable = why
        self._unavailable_code = "model_corrupt"
        self._event("model_unavailable", f"no verified model: {why}"[:4000], None)

    def _stat_pointer(self):
        try:
            st = os.stat(self.store.pointer_path)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _persist_pointer(self, slot: str, lm, why: str) -> None:
        try:
            self.store.point_to(slot, lm.package_sha256, why)
        except Exception as e:                           # keep running the verified model; say so
            self._event("model_rollback", f"slot {slot} runs, but the active pointer could not be written: {e}"[:2000], lm)
        self._pointer_sig = self._stat_pointer()

    def _event(self, code: str, text: str, lm=None, duration: float = 0.0) -> None:
        """A model event: into self.model_events and the decision log (flight.logschema.model_event)."""
        lm = lm if lm is not None else self._loaded
        rec = model_event(code, text, model_name=lm.card.name if lm else "", model_sha256=lm.sha256 if lm else "",
                          package_sha256=lm.package_sha256 if lm else "", model_slot=lm.slot if lm else "",
                          backend=lm.kind if lm else "", duration_s=duration)
        self.model_events.append(rec)
        if self.log is None:
            if len(self._pending) < 64:
                self._pending.append(rec)
        else:
            self._write_event(rec)

    def _write_event(self, rec: dict) -> None:
        if self.log is None:
            return
        try:
            self.log.append(rec)
        except Exception:                                # a full disk must not stop the gate
            self.log_failures += 1

    def _recover(self, why: str) -> bool:
        """The recovery chain: reload the running model's source (re-read, verified, self-tested); else the
        other slot of the store (automatic rollback, persisted); else no model (every frame faults
        model_corrupt; retried every _RETRY_EVERY scenes). True when a verified model runs again."""
        self.recoveries += 1
        order, errors = [], []
        if self._source is not None:
            order.append(("model_reload", self._source))
        if self.store is not None:
            cur = getattr(self._source, "slot", None)
            for s in self.store.resolve_active() + list(SLOTS):
                if s != cur and all(getattr(o, "slot", None) != s for _, o in order):
                    order.append(("model_rollback", SlotSource(self.store, s)))
        self._drop_backend()                             # the failed runtime goes first (budget, and it is bad)
        transient = []                                   # failures that say nothing about the model's bytes
        for code, src in order:
            try:
                lm = self._load(src)
            except Exception as e:                       # ModelError, or a runtime failing while opening
                errors.append(f"{src.label}: {e}")
                transient.append(_transient_load_failure(e))
                continue
            self._install(lm)
            self._event(code, f"{why}; {src.label} reloaded, verified, self-test {lm.bist.detail}"[:4000], lm,
                        duration=lm.load_s)
            if code == "model_rollback":
                self.rollbacks += 1
                self._persist_pointer(src.slot, lm, f"automatic rollback: {why}")
            return True
        self._set_unavailable(f"{why}; " + "; ".join(errors) if errors else why)
        if transient and all(transient):                 # memory pressure / a runtime refusing verified bytes:
            self._unavailable_code = ("out_of_memory" if "out_of_memory" in transient else "model_reload_failed")
            self._since_retry = _RETRY_EVERY - 1         # retried on the very next frame, not model_corrupt
        return False

    def scrub(self) -> str | None:
        """Memory scrub of the runtime's own model buffer: LiteRT's interpreter reads its constant tensors
        from the very buffer it was built from, so that buffer (not a copy) is re-hashed against the
        verified sha256; onnxruntime exposes none (the known-answer self-test covers it). On a mismatch
        the recovery chain reloads a verified model. Returns a note when something was repaired; raises
        ModelIntegrityError when no verified model could be loaded (every frame then faults model_corrupt)."""
        if not self._model_ok:
            raise ModelIntegrityError(f"no verified model runs: {getattr(self, '_unavailable', '')}")
        buf = getattr(self.backend, "model_buffer", None)
        if buf is None or hashlib.sha256(buf).hexdigest() == self._loaded.sha256:
            return None
        why = "the runtime's model buffer failed its sha256 scrub (an upset in RAM)"
        if self._recover(why):
            return f"{why}; reloaded from the verified {self._source.label}"
        raise ModelIntegrityError(f"{why}, and no verified model could be loaded: {self._unavailable}")

    def _self_test(self) -> BistResult:
        lm = self._loaded
        self.self_tests += 1
        self._since_bist, self._bist_due = 0, False
        if not self._model_ok or lm is None:
            return BistResult(False, f"no verified model runs: {getattr(self, '_unavailable', '')}")
        t0 = self._clock.perf_counter()
        try:
            results = run_tiles(self.backend, lm.golden_tiles())
            ok, detail = compare_reference(results, lm.reference)
        except Exception as e:                           # a runtime that fails on its golden tiles failed
            results, ok, detail = [], False, f"the runtime failed on the golden tiles: {type(e).__name__}: {e}"[:2000]
        res = BistResult(ok, detail, results, self._clock.perf_counter() - t0, ok)
        if ok:
            self._event("bist_pass", detail, duration=res.seconds)
            return res
        self.self_test_failures += 1
        self._event("bist_fail", detail, duration=res.seconds)
        if self._probation is not None:
            self._probation[1] += 1
        self._recover(f"known-answer self-test failed: {detail}")
        return res

    def self_test(self) -> BistResult:
        """Run the known-answer self-test now on the running interpreter (the gate also runs it every
        update.bist_every scenes, after a runtime error and at every load). A failure runs the recovery
        chain (reload verified, then the other slot); the result says what differed."""
        with self._exclusive():
            return self._self_test()

    def _maintain(self) -> list[dict]:
        """Between scenes (before this one): follow an activation, retry recovery, scrub, self-test.
        Returns degraded events for this frame. Never raises."""
        notes, u = [], self.config.update
        try:
            if self.store is not None and u.watch_active:
                self._follow_pointer()
            if not self._model_ok:
                self._since_retry += 1
                if self._since_retry >= _RETRY_EVERY:
                    self._since_retry = 0
                    if self._recover(f"retrying after: {getattr(self, '_unavailable', '')}"[:1000]):
                        notes.append(event("model_bist_recovered", "a verified model loads again"))
                return notes
            se = self.config.scrub_every
            if se and self._scenes % se == 0:
                try:
                    note = self.scrub()
                except ModelIntegrityError:
                    return notes
                if note:
                    notes.append(event("model_scrub_repaired", note))
            self._since_bist += 1
            if self._model_ok and (self._bist_due or (u.bist_every and self._since_bist >= u.bist_every)):
                res = self._self_test()
                if not res.passed and self._model_ok:
                    notes.append(event("model_bist_recovered", f"self-test failed ({res.detail[:300]}); "
                                                               f"{self._source.label} reloaded and self-tested"))
        except Exception as e:                           # maintenance must never take the loop down
            self._bist_due = True
            self._event("bist_fail", f"model maintenance failed: {type(e).__name__}: {e}"[:2000])
        return notes

    def _follow_pointer(self) -> None:
        """An activation made outside the gate (python -m flight model activate): load the new active slot
        verified and self-tested, then switch; if it does not verify, keep the running model."""
        sig = self._stat_pointer()
        if sig == self._pointer_sig:
            return
        self._pointer_sig = sig
        p = self.store.read_pointer()
        lm = self._loaded
        if p is None or (lm is not None and self._model_ok and lm.slot == p.slot
                         and lm.package_sha256 == p.package_sha256):
            return
        try:
            self._switch_to(SlotSource(self.store, p.slot), f"active pointer -> slot {p.slot} (generation {p.generation})")
        except Exception:                                # logged (model_switch_refused); the running model stays
            return

    def _switch_to(self, src: Source, why: str, probation: bool = True):
        prev = self._loaded if self._model_ok else None
        try:
            lm = self._load(src)                         # the running model stays until this one verified
        except Exception as e:
            self._event("model_switch_refused", f"{why}: {src.label} refused: {e}"[:4000])
            raise
        self._install(lm)
        if prev is not None:
            self._prev_source = prev.source
        self._event("model_switch", f"{why}: {lm.card.name} verified, self-test {lm.bist.detail}"[:4000], lm,
                    duration=lm.load_s)
        self._probation = ([self.config.update.rollback_window, 0, prev.source, why]
                           if probation and prev is not None else None)
        return lm

    def _after_decision(self, d: "Decision") -> None:
        """Probation after a switch: too many model faults in the window -> automatic rollback."""
        p = self._probation
        if p is None:
            return
        p[0] -= 1
        if d.fault_code in _MODEL_FAULTS or any(e.get("code") == "deadline" for e in d.degraded):
            p[1] += 1
        u = self.config.update
        if p[1] > u.rollback_fault_rate * u.rollback_window:
            self._probation = None
            why = (f"automatic rollback: {p[1]} model-attributable faults in the first {u.rollback_window - p[0]} "
                   f"scenes after {p[3]} (limit {u.rollback_fault_rate:.0%} of {u.rollback_window})")
            try:
                lm = self._switch_to(p[2], why, probation=False)
            except Exception:
                return
            self.rollbacks += 1
            self._event("model_rollback", why, lm)
            if self.store is not None and lm.slot:
                self._persist_pointer(lm.slot, lm, why)
        elif p[0] <= 0:
            self._probation = None

    # ------------------------------------------------------------------ model update API (between scenes)
    def _exclusive(self):
        gate = self

        class _Guard:
            def __enter__(self_):
                if not gate._busy.acquire(blocking=False):
                    raise ConcurrentUseError("a model operation was requested while process() runs; call it between "
                                             "scenes from the thread that gates")

            def __exit__(self_, *exc):
                gate._busy.release()

        return _Guard()

    def swap_model(self, model: str | Path | None = None, *, slot: str | None = None) -> dict:
        """Swap the running model between scenes, without a restart: model = a package (.cgpkg), a card or
        an artifact (unsigned; refused with update.require_signed), or slot = a store slot (the store's
        active pointer then follows). The new model is verified, checked against its card and self-tested
        before it replaces the running one, within memory_budget_mib; on any failure the running model
        stays (ModelError). The previous model is kept as the rollback target, and the next
        update.rollback_window scenes are watched (automatic rollback on model-attributable faults)."""
        with self._exclusive():
            if slot is not None:
                if self.store is None:
                    raise ModelError("swap_model(slot=...) needs a model store (config update.store)")
                if slot not in SLOTS:
                    raise ModelError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
                src = SlotSource(self.store, slot)
            else:
                src = self._source_for(model)
            lm = self._switch_to(src, f"swap_model({src.label})")
            if self.store is not None and lm.slot:
                self._persist_pointer(lm.slot, lm, "swap_model")
            return self.model_status()

    def install(self, package: str | Path, activate: bool = False) -> dict:
        """Install an uploaded package into the store's standby slot (verified and self-tested there);
        activate=True then switches to it (store pointer and the running model)."""
        if self.store is None:
            raise ModelError("install needs a model store (config update.store)")
        with self._exclusive():
            try:
                out = self.store.install(package)
            except ModelError as e:
                self._event("model_install_refused", f"{package}: {e}"[:4000])
                raise
            self._event("model_install", f"{out['name']} installed in slot {out['slot']}: {out['bist']}"[:4000],
                        duration=out["seconds"])
        if activate:
            out["activated"] = self.activate(out["slot"])
        return out

    def activate(self, slot: str | None = None) -> dict:
        """Switch the store's active pointer to slot (default: the standby one), then run it."""
        if self.store is None:
            raise ModelError("activate needs a model store (config update.store)")
        with self._exclusive():
            res = self.store.activate(slot)
            self._pointer_sig = self._stat_pointer()
            if self._loaded is None or self._loaded.package_sha256 != res["package_sha256"] or not self._model_ok:
                self._switch_to(SlotSource(self.store, res["slot"]), f"activate slot {res['slot']}")
            return self.model_status()

    def rollback(self) -> dict:
        """Manual rollback: the store's other slot (verified and self-tested first), or without a store the
        model that ran before the last swap."""
        with self._exclusive():
            if self.store is not None:
                res = self.store.rollback()
                self._pointer_sig = self._stat_pointer()
                lm = self._switch_to(SlotSource(self.store, res["slot"]), "manual rollback", probation=False)
            else:
                prev = self._prev_source
                if prev is None:
                    raise ModelError("nothing to roll back to: no model ran before this one")
                lm = self._switch_to(prev, "manual rollback", probation=False)
            self.rollbacks += 1
            self._event("model_rollback", f"manual rollback to {lm.source.label}", lm)
            return self.model_status()

    def model_status(self) -> dict:
        lm = self._loaded
        return {"running": bool(self._model_ok), "model_name": self.card.name if lm else "",
                "model_sha256": lm.sha256 if lm else "", "package_sha256": lm.package_sha256 if lm else "",
                "slot": lm.slot if lm else "", "source": lm.source.label if lm else "", "backend": self.backend.name,
                "signed": bool(lm and lm.source.signed), "self_tests": self.self_tests,
                "self_test_failures": self.self_test_failures, "recoveries": self.recoveries,
                "rollbacks": self.rollbacks, "unavailable": None if self._model_ok else getattr(self, "_unavailable", ""),
                "buffer_bytes": self.buffer_bytes}

    # ------------------------------------------------------------------ public API
    def process(self, scene, band_names, scene_id: str = "", mask_out: np.ndarray | None = None,
                valid_mask: np.ndarray | None = None, priority: int = 0, target_id: str | None = None,
                radiometry: tuple[float, float] | None = None, strict: bool | None = None) -> Decision:
        """Gate one scene; returns a Decision (see its docstring for every field and unit) and writes it
        to the log sink.

        scene       numpy array or memmap (H, W, C): float reflectance (0..1 nominal) or integer DN (then a
                    radiometry is required). Memmaps are read tile by tile (RSS stays flat).
        band_names  sequence of C strings naming the last axis: canonical names (blue, green, red, nir),
                    generic aliases (SWIR1), suffixed names (B08_nir), or Sentinel-2 ids (B02..B12). Bare
                    Landsat ids (B2..B5) mean different bands on different sensors: set the config key
                    sensor (e.g. CloudGate.from_model(sensor="landsat8")). A single string ("B2B3B4B5")
                    is an ArgumentError, never split into letters.
        scene_id    str (<= 256 chars), recorded in the log.
        mask_out    optional caller-owned uint8 (H, W), written in full: 0 clear, 1 cloud, 2 shadow,
                    255 no data / no decision. Asking for it disables early exit (every tile is inferred);
                    when the deadline stops the scan, the cores of the tiles not visited are 255.
        valid_mask  optional bool (or 0/1 integer) (H, W); False marks pixels to ignore (swath edge, ...).
                    NaN/Inf and all-bands-zero pixels are invalid anyway.
        priority    int; >= policy.reacquire_priority: re-acquire instead of discarding.
        target_id   str (<= 256 chars) naming the ground target; hysteresis (the target's previous action
                    widening its band) applies only when a target_id is given.
        radiometry  (scale, offset) with reflectance = value * scale + offset, scale > 0; default: the
                    config's radiometry_scale / radiometry_offset.
        strict      True: raise the typed error (flight.errors) instead of returning a fault decision;
                    default: config.strict. In payload mode (False) it never raises for anything the
                    scene, the arguments or the runtime do.

        One gate per thread: a second thread entering process() while it runs gets ConcurrentUseError
        (raised even in payload mode; it is a programming error, not a scene fault)."""
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError("CloudGate.process() entered from a second thread while it is running; "
                                     "use one gate per thread (each with its own decision log path)")
        try:
            return self._process_guarded(scene, band_names, scene_id, mask_out, valid_mask, priority, target_id,
                                         radiometry, strict)
        finally:
            self._map = None                             # hold no reference to the caller's mapping
            self._busy.release()

    def _process_guarded(self, scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry,
                         strict) -> Decision:
        strict = self.config.strict if strict is None else strict
        self._scenes += 1
        notes = self._maintain()                          # between scenes: not counted in this scene's latency
        t0 = self._clock.monotonic()
        try:
            self._check_args(scene_id, priority, target_id)
            if not self._model_ok:
                if self._unavailable_code == "out_of_memory":
                    raise OutOfMemoryError(f"out of memory reloading the verified model (retried on the next frame): "
                                           f"{self._unavailable}"[:2000])
                if self._unavailable_code == "model_reload_failed":
                    raise ModelReloadError(f"the runtime refused to reopen the verified model (retried on the next "
                                           f"frame): {self._unavailable}"[:2000])
                raise ModelIntegrityError(f"no verified model runs (every frame faults until one verifies): "
                                          f"{self._unavailable}"[:2000])
            d = self._process(scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry, t0)
        except CloudGateError as e:
            if strict:
                raise
            # a verified model the runtime cannot open for lack of memory (scrub reload under pressure) is
            # out_of_memory, not model_corrupt: the next frame retries the reload
            code = OutOfMemoryError.code if isinstance(e, ModelError) and _is_allocation_failure(e) else e.code
            d = self._fault(scene, scene_id, target_id, priority, code, str(e), t0)
        except MemoryError as e:                          # at the memory limit: a typed fault, the loop lives on
            if strict:
                raise OutOfMemoryError(f"out of memory while gating this frame: {e}") from e
            d = self._fault(scene, scene_id, target_id, priority, OutOfMemoryError.code,
                            f"out of memory while gating this frame (MemoryError: {e})"[:2000], t0)
        except Exception as e:
            # anything unexpected on one frame (runtime, numpy, a caller's object) must not kill the loop;
            # KeyboardInterrupt / SystemExit still propagate
            self._bist_due = True                         # a runtime error: self-test before the next scene
            if strict:
                raise
            code = OutOfMemoryError.code if _is_allocation_failure(e) else "internal"
            d = self._fault(scene, scene_id, target_id, priority, code, f"{type(e).__name__}: {e}"[:2000], t0)
        if d.action == "fault":
            _mark_no_decision(mask_out)
        d.degraded.extend(notes)
        self._record(d)
        self._after_decision(d)
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

    # ------------------------------------------------------------------ one scene, top-down
    def _process(self, scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry, t0) -> Decision:
        cfg = self.config
        # 1. gate: the inputs
        h, w, src_idx = self._check(scene, band_names, mask_out, valid_mask)
        self._hwc.prepare(src_idx)                       # whole-window loading when the bands allow it
        imap = self._input_map(scene, radiometry)
        step = self._step
        ny, nx = -(-h // step), -(-w // step)
        n_tiles = ny * nx
        if n_tiles > cfg.max_tiles:
            raise SceneShapeError(f"scene {h}x{w} needs {n_tiles} tiles > max_tiles={cfg.max_tiles}; "
                                  "raise max_tiles in the gate config")
        previous = self._history.previous(target_id)
        # 2. scan the tiles (infer, count, estimate; stop early or at the deadline)
        scan = self._scan(scene, h, w, nx, n_tiles, src_idx, imap, mask_out, valid_mask, previous, t0)
        n = self._est.n
        full = n == n_tiles
        self._check_scan(scan, scene_id, imap, full)
        # 3. estimate
        cf = scan.cloud_px / scan.valid_px if scan.valid_px else 0.0
        vf = scan.valid_px / scan.area_px if scan.area_px else 0.0
        bound = (cf, cf) if full else scan.bound if scan.early else self._est.bounds()[:2]
        # 4. policy (pure)
        tiles = TileCounts(self._t_cloud, self._t_valid, self._t_done, n_tiles, nx)
        pd = decide(cf, vf, priority, previous, tiles, cfg.policy)
        pd, events = self._discard_guard(pd, scene, src_idx, imap, valid_mask)
        self._history.record(target_id, pd.action)
        rule, reason = pd.rule, pd.reason
        if scan.deadline:
            events.append(event("deadline", f"deadline {cfg.deadline_s}s reached after {n}/{n_tiles} tiles"))
            rule, reason = ("deadline" if rule == "threshold" else rule), f"on {n}/{n_tiles} tiles (deadline): {reason}"
        elif scan.early and rule == "threshold":
            rule, reason = "early_exit", f"bound [{bound[0]:.3f}, {bound[1]:.3f}] after {n}/{n_tiles} tiles: {reason}"
        if pd.rule == "min_valid_fraction":
            events.append(event("low_valid_fraction", pd.reason.split(";")[0]))
        elif pd.band == "mid" and not full:
            events.append(event("partial_list_incomplete", "partial-downlink list covers visited tiles only"))
        omitted = clear_tiles_record(pd.clear_tiles)[1] if len(pd.clear_tiles) > MAX_CLEAR_RUNS else 0
        if omitted:
            events.append(event("clear_tiles_truncated", f"{omitted} of {len(pd.clear_tiles)} clear tiles lie beyond "
                                                         f"the first {MAX_CLEAR_RUNS} row runs: not in the log record"))
        # 5. the decision (logged by the caller)
        scene_bytes = int(scene.nbytes)
        return Decision(
            action=pd.action, rule=rule, reason=reason, thresholds=pd.thresholds, cloud_fraction=float(cf),
            valid_fraction=float(vf), shadow_fraction=scan.shadow_px / scan.valid_px if scan.valid_px else 0.0,
            tiles_processed=n, tiles_total=n_tiles, confidence_bound=(float(bound[0]), float(bound[1])),
            clear_tiles=pd.clear_tiles, clear_tiles_omitted=omitted, partial=pd.partial, early_exit=scan.early,
            latency_s=self._clock.monotonic() - t0, model_name=self.card.name,
            model_sha256=self._loaded.sha256, backend=self.backend.name, policy_version=cfg.policy.version,
            package_sha256=self._loaded.package_sha256, model_slot=self._loaded.slot,
            degraded=events, scene_id=str(scene_id), target_id=target_id, priority=int(priority), grid=(ny, nx),
            scene_bytes=scene_bytes, downlink_bytes=self._downlink_bytes(pd, scene_bytes, nx, h * w),
            infer_s=scan.infer_s, tile_pixels=self._tile * self._tile, core_pixels=step,
            hysteresis=reason if rule == "hysteresis" else None)

    def _discard_guard(self, pd, scene, src_idx, imap, valid_mask):
        """Never discard what the model cannot tell apart (flight.evidence): a frame the policy would drop
        whose bright pixels look like snow/ice is downlinked instead. -> (decision, events)"""
        p = self.config.policy
        bands = self.card.bands
        if pd.action not in ("discard", "reacquire") or p.discard_guard_green_blue <= 0 or \
                "blue" not in bands or "green" not in bands:
            return pd, []
        b, g = src_idx[bands.index("blue")], src_idx[bands.index("green")]
        share, gb, sat = self._probe.measure(scene, b, g, *imap.radiometry, valid_mask)
        override, why = review_discard(pd.action, pd.rule, share, gb, p.discard_guard_green_blue,
                                       p.discard_guard_min_bright, sat)
        if not override:
            return pd, []
        pd = PolicyDecision("downlink", False, [], pd.band, "ambiguous_surface", f"{why} (policy: {pd.reason})",
                            pd.thresholds)
        return pd, [event("ambiguous_bright_surface", why)]

    def _input_map(self, scene, radiometry) -> _InputMap:
        cfg = self.config
        rad = radiometry if radiometry is not None else (cfg.radiometry_scale, cfg.radiometry_offset)
        if isinstance(rad, (str, bytes)) or any(isinstance(v, (str, bytes)) for v in (rad if isinstance(rad, (tuple, list)) else ())):
            raise SceneDtypeError(f"radiometry must be a (scale, offset) pair of numbers, got {rad!r}")
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
        self._map = self._scene_map(scene)
        self._check_backing_file(self._map)
        # the mapping's own address range: page release never advises memory outside it
        self._map_addr = np.frombuffer(self._map.mm, np.uint8).ctypes.data if self._map is not None else 0
        # model_input = (value * scale + offset) * in_gain + in_offset, clipped to the backend's input range
        in_gain, in_offset = self.backend.input_affine
        q_lo, q_hi = (PLAUSIBLE_REFLECTANCE[0] * in_gain + in_offset), (PLAUSIBLE_REFLECTANCE[1] * in_gain + in_offset)
        return _InputMap(np.float32(scale * in_gain), np.float32(offset * in_gain + in_offset), np.float32(in_offset),
                         np.float32(in_gain + in_offset), np.float32(min(q_lo, q_hi)), np.float32(max(q_lo, q_hi)), (scale, offset))

    def _scan(self, scene, h, w, nx, n_tiles, src_idx, imap, mask_out, valid_mask, previous, t0) -> _Scan:
        """Visit the tiles in a spread order until all are done, the estimate is certain enough (early
        exit: both ends of the confidence bound in one policy band, valid share certainly enough), or the
        deadline passes. Per-tile counts land in self._t_*; scene totals in the returned _Scan."""
        cfg, est, step = self.config, self._est, self._step
        est.reset(n_tiles, step * step, h * w)
        self._t_done[:n_tiles] = False
        scan = _Scan()
        early_ok = cfg.early_exit.enabled and mask_out is None
        stride = _golden_step(n_tiles)
        deadline = t0 + cfg.deadline_s
        for k in range(n_tiles):                          # bounded by the tile count
            idx = (k * stride) % n_tiles
            self._visit_tile(scene, idx, nx, h, w, src_idx, imap, mask_out, valid_mask, scan)
            est.add(int(self._t_cloud[idx]), int(self._t_valid[idx]))
            if est.n < n_tiles and early_ok and est.n >= cfg.early_exit.min_tiles:
                c_lo, c_hi, valid_lo = est.bounds()
                scan.bound = (c_lo, c_hi)
                band = policy_band(c_lo, cfg.policy, previous)
                if band == policy_band(c_hi, cfg.policy, previous) != "mid" and valid_lo >= cfg.policy.min_valid_fraction:
                    scan.early = True
                    break
            if self._clock.monotonic() > deadline and est.n < n_tiles:
                scan.deadline = True
                break
        if mask_out is not None and est.n < n_tiles:      # deadline: no decision where no tile was visited
            for idx in range(n_tiles):                    # bounded by the tile count
                if not self._t_done[idx]:
                    ty, tx = divmod(idx, nx)
                    mask_out[ty * step:min(ty * step + step, h), tx * step:min(tx * step + step, w)] = INVALID
        return scan

    def _visit_tile(self, scene, idx, nx, h, w, src_idx, imap, mask_out, valid_mask, scan: _Scan) -> None:
        """Load, infer and count tile idx: its core's counts go to self._t_*[idx] and into scan."""
        step, half, t = self._step, self._half, self._tile
        ty, tx = divmod(idx, nx)
        cy0, cx0 = ty * step, tx * step
        cy1, cx1 = min(cy0 + step, h), min(cx0 + step, w)
        wy0 = min(max(cy0 - half, 0), max(h - t, 0))
        wx0 = min(max(cx0 - half, 0), max(w - t, 0))
        if self._map is not None:
            self._check_backing_file(self._map)          # the file may shrink mid-scan (one fstat per tile)
        self._load_tile(scene, wy0, wx0, h, w, src_idx, imap, valid_mask)
        ti = self._clock.perf_counter()
        self.backend.infer(self._planes, self._mask)
        scan.infer_s += self._clock.perf_counter() - ti
        ry0, ry1, rx0, rx1 = cy0 - wy0, cy1 - wy0, cx0 - wx0, cx1 - wx0
        m, v, hit = self._mask[ry0:ry1, rx0:rx1], self._valid[ry0:ry1, rx0:rx1], self._tmp[ry0:ry1, rx0:rx1]
        nv = int(np.count_nonzero(v))
        np.logical_and(self._oor[ry0:ry1, rx0:rx1], v, out=hit)
        scan.oor_px += int(np.count_nonzero(hit))
        np.equal(m, CLOUD, out=hit)
        np.logical_and(hit, v, out=hit)
        nc = int(np.count_nonzero(hit))
        np.equal(m, SHADOW, out=hit)
        np.logical_and(hit, v, out=hit)
        scan.shadow_px += int(np.count_nonzero(hit))
        if mask_out is not None:
            dst = mask_out[cy0:cy1, cx0:cx1]
            np.copyto(dst, m)
            np.logical_not(v, out=hit)
            np.copyto(dst, INVALID, where=hit)
        self._release_pages(scene, wy0, min(wy0 + t, h))
        area = (cy1 - cy0) * (cx1 - cx0)
        self._t_cloud[idx], self._t_valid[idx], self._t_area[idx], self._t_done[idx] = nc, nv, area, True
        scan.cloud_px += nc
        scan.valid_px += nv
        scan.area_px += area

    @staticmethod
    def _check_scan(scan: _Scan, scene_id, imap: _InputMap, full: bool) -> None:
        """Scenes that must not be decided on: nothing valid anywhere, or not reflectance at all."""
        if scan.valid_px == 0 and full:
            raise AllInvalidSceneError(f"scene {scene_id!r}: every pixel is no-data, NaN/Inf or masked invalid")
        if scan.oor_px > IMPLAUSIBLE_SHARE * scan.valid_px:
            rs, ro = imap.radiometry
            raise ImplausibleRadiometryError(
                f"{scan.oor_px / scan.valid_px:.0%} of the valid pixels have a reflectance outside "
                f"{PLAUSIBLE_REFLECTANCE} after radiometry (scale={rs:g}, offset={ro:g}): the scene is not "
                "reflectance; pass the sensor's radiometry=(scale, offset) (reflectance = value * scale + offset) "
                "or fix the config's radiometry_scale/radiometry_offset")

    def _downlink_bytes(self, pd, scene_bytes: int, nx: int, scene_area: int) -> int:
        if pd.action != "downlink":
            return 0
        if not pd.partial:
            return scene_bytes
        clear_area = sum(int(self._t_area[r * nx + c]) for r, c, _ in pd.clear_tiles)
        return int(round(scene_bytes * (clear_area / scene_area)))

    # ------------------------------------------------------------------ faults and the log
    def _fault(self, scene, scene_id, target_id, priority, code, reason, t0) -> Decision:
        """A fault decision; arguments that failed validation are recorded in a loggable form."""
        self.faults += 1
        scene_id = scene_id[:MAX_ID_CHARS] if isinstance(scene_id, str) else ""
        target_id = target_id[:MAX_ID_CHARS] if isinstance(target_id, str) else None
        ok_priority = (isinstance(priority, (int, np.integer)) and not isinstance(priority, (bool, np.bool_))
                       and _PRIORITY_RANGE[0] <= priority <= _PRIORITY_RANGE[1])
        try:
            scene_bytes = int(scene.nbytes) if isinstance(scene, np.ndarray) else 0
        except Exception:                                 # a caller's odd ndarray subclass
            scene_bytes = 0
        return Decision(action="fault", rule="fault", reason=f"fault {code}: {reason}"[:2000], cloud_fraction=0.0,
                        valid_fraction=0.0, fault=reason, fault_code=code, scene_id=scene_id, target_id=target_id,
                        priority=int(priority) if ok_priority else 0, scene_bytes=scene_bytes,
                        latency_s=self._clock.monotonic() - t0, model_name=self.card.name,
                        model_sha256=self._loaded.sha256 if self._loaded else "", backend=self.backend.name,
                        package_sha256=self._loaded.package_sha256 if self._loaded else "",
                        model_slot=self._loaded.slot if self._loaded else "",
                        policy_version=self.config.policy.version, tile_pixels=self._tile * self._tile,
                        core_pixels=self._step)

    def _record(self, d: Decision) -> None:
        if self.log is None:
            return
        try:
            d.log_seq = self.log.append(d.to_record())
        except Exception as e:  # disk full, short write, refused record, ...: keep gating, count it, say so
            self.log_failures += 1
            try:
                d.degraded.append(event("log_write_failed", f"decision log write failed: {e}"))
            except MemoryError:                          # at the memory limit: the prebuilt event
                d.degraded.append(_LOG_FAILED_OOM)

    # ------------------------------------------------------------------ input checks and tile loading
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
        if isinstance(band_names, (set, frozenset, dict)):  # no defined order: band i would be a hash accident
            raise ArgumentError(f"band_names must be an ordered sequence (list or tuple) in the scene's band order, "
                                f"got a {type(band_names).__name__}")
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
                canon.append(canonical_band(n, self.config.sensor))
            except ValueError:
                canon.append(n.lower())
        missing = [b for b in self.bands if b not in canon and b not in self.optional_bands]
        if missing:
            raise BandMismatchError(missing, canon)
        # optional bands (SWIR) count only when all are there; -1 = absent (plane 0, presence flag 0)
        present = all(b in canon for b in self.optional_bands)
        src_idx = [canon.index(b) if (present or b not in self.optional_bands) else -1 for b in self.bands]
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
        if self.optional_bands:
            src_idx.append(-2 if present else -1)     # the presence flag channel: -2 = 1.0, -1 = 0.0
        return h, w, src_idx

    @staticmethod
    def _scene_map(scene: np.ndarray) -> "_SceneMap | None":
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
            return _SceneMap(mm, start + length, str(getattr(memmap_obj, "filename", None) or "memmap"),
                             getattr(memmap_obj, "mode", None))
        return _SceneMap(mm, length, "mmap", None)       # raw mmap: its offset is unknown, so at least its length

    @staticmethod
    def _check_backing_file(sm: "_SceneMap | None") -> None:
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

    def _release_pages(self, scene: np.ndarray, y0: int, y1: int) -> None:
        """Drop rows y0..y1 of a memmap scene from our resident set, so RSS stays flat whatever the scene
        size. Read-only maps: MADV_DONTNEED (the page cache keeps the data). Writable (r+, w+) and
        copy-on-write (c) maps: MADV_PAGEOUT, which reclaims without discarding anything -- DONTNEED on a
        copy-on-write map would throw away the caller's in-memory changes to the scene. Released after
        every tile (tiles are visited in a spread order, so waiting for a row band to complete would keep
        nearly the whole scene resident); the cost is that later tiles of the band fault their pages back
        in, from the page cache for r maps, from the file for r+/c maps (PAGEOUT evicts). The range is the
        rows' real extent (any strides, negative ones too) clamped to the mapping itself: advice outside
        it would hit whatever memory lies next to the map."""
        sm = self._map
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
        map_lo, map_len = self._map_addr, len(sm.mm)
        map_hi = map_lo + -(-map_len // page) * page
        a0 = max(scene.ctypes.data + lo, map_lo)
        a1 = min(scene.ctypes.data + hi, map_hi)
        a0 -= a0 % page                                  # whole pages inside the mapping (map_lo is aligned)
        a1 -= a1 % page if a1 < map_hi else 0
        if a1 > a0:
            _libc.madvise(ctypes.c_void_p(a0), ctypes.c_size_t(a1 - a0), advice)  # a hint: failure changes nothing

    def _load_tile(self, scene, wy0, wx0, h, w, src_idx, imap: _InputMap, valid_mask) -> tuple[int, int]:
        """Fill self._planes (in the backend's input units and layout) and self._valid from the scene window
        at (wy0, wx0); returns its (rows, cols)."""
        if self._hwc.ready:
            return self._load_tile_hwc(scene, wy0, wx0, h, w, imap, valid_mask)
        return self._load_tile_planar(scene, wy0, wx0, h, w, src_idx, imap, valid_mask)

    def _load_tile_hwc(self, scene, wy0, wx0, h, w, imap: _InputMap, valid_mask) -> tuple[int, int]:
        """The same values as _load_tile_planar, computed in whole-window passes on a pixel-interleaved
        (T, T, C) buffer (LiteRT's NHWC input: no transposed copy per tile). Needs the scene's bands for the
        first k model channels to be consecutive scene channels (the usual case); the per-pixel "every band"
        / "any band" tests read the k booleans of a pixel as one uint{8k} word instead of k strided passes."""
        hw = self._hwc
        t, k, s0 = self._tile, hw.k, hw.s0
        rh, rw = min(t, h - wy0), min(t, w - wx0)
        x = self._planes[:rh, :rw, :k]
        scale, offset, fill = imap.scale, imap.offset, imap.fill
        vsub, nz, tsub = self._valid[:rh, :rw], self._nonzero[:rh, :rw], self._tmp[:rh, :rw]
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
        oor = self._oor[:rh, :rw]                        # any band outside the plausible reflectance range
        np.less(x, imap.plausible_lo, out=b_any[..., :k])
        np.not_equal(w_any, 0, out=oor)
        np.greater(x, imap.plausible_hi, out=b_any[..., :k])
        np.not_equal(w_any, 0, out=tsub)
        np.logical_or(oor, tsub, out=oor)
        if not vsub.all():                               # NaN/Inf/no-data never reach the model
            np.logical_not(vsub, out=tsub)
            np.copyto(x, fill, where=tsub[..., None])
        lo, hi = self.backend.input_range
        np.clip(x, lo, hi, out=x)                        # saturated or absurd values stay in range
        for ci, v in hw.constants:                       # absent optional bands (0) / presence flag (1)
            self._planes[..., ci].fill(imap.one if v else imap.fill)
        if rh < t or rw < t:
            self._pad(rh, rw)
        return rh, rw

    def _load_tile_planar(self, scene, wy0, wx0, h, w, src_idx, imap: _InputMap, valid_mask) -> tuple[int, int]:
        """Band by band into the (C, T, T) view of the input buffer (ONNX Runtime's NCHW input; any band order)."""
        t = self._tile
        rh, rw = min(t, h - wy0), min(t, w - wx0)
        planes = self._planes_chw
        scale, offset, fill, p_lo, p_hi = imap.scale, imap.offset, imap.fill, imap.plausible_lo, imap.plausible_hi
        vsub, nz, tsub = self._valid[:rh, :rw], self._nonzero[:rh, :rw], self._tmp[:rh, :rw]
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
        lo, hi = self.backend.input_range
        oor = self._oor[:rh, :rw]                        # any band outside the plausible reflectance range
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
        t = self._tile
        r = self._planes_chw
        for y in range(rh, t):                           # bounded: < tile iterations
            k = y - rh + 1
            r[:, y, :rw] = r[:, max(rh - 1 - k, 0) if rh > 1 else 0, :rw]
        for x in range(rw, t):
            k = x - rw + 1
            r[:, :, x] = r[:, :, max(rw - 1 - k, 0) if rw > 1 else 0]
        self._valid[rh:, :] = False
        self._valid[:, rw:] = False

