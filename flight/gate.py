"""CloudGate: the top-down flow of one scene, in fixed memory, with a decision log.

One scene reads top-down in CloudGate._process: check the inputs (flight.sceneinput) -> scan the tiles
(flight.scan: infer, count, feed flight.estimate, stop early or at the deadline) -> estimate -> decide
(flight.policy, pure) -> build the Decision (flight.decision); _process_guarded then writes it to the log
sink. The model's lifecycle (load, verify, self-test, scrub, recover, swap, rollback, the A/B pointer)
is flight.custody.ModelCustody's: the gate calls it between scenes and scans on its runtime instances.
Outside dependencies enter through the ports of flight.ports (clock, backend factory, log sink), given
at construction.

Steady state (per tile) allocates nothing but short-lived view objects: every buffer is created in
__init__ from the config, so no scene-sized buffer exists.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .bist import BistResult
from .config import GateConfig, config_from_dict, load_config
from .custody import ModelCustody, is_allocation_failure
from .decision import Decision
from .decisionlog import DecisionLog
from .errors import (AllInvalidSceneError, ArgumentError, CloudGateError, ConcurrentUseError, ConfigError,
                     ImplausibleRadiometryError, ModelError, OutOfMemoryError, SceneShapeError)
from .logschema import MAX_CLEAR_RUNS, MAX_ID_CHARS, clear_tiles_record, event
from .evidence import BrightSurfaceProbe, guard_decision
from .policy import ACTIONS, Action, TargetHistory, TileCounts, decide
from .ports import BackendFactory, Clock, LogSink, SystemClock
from .scan import HalfScene, HalfValid, ScanCounts, TileScanner, resolve_workers
from .sceneinput import (DARK_REFLECTANCE, DARK_SHARE, DARK_STRIDE, IMPLAUSIBLE_SHARE, PLAUSIBLE_REFLECTANCE, InputMap,
                         check_scene, input_map)

__all__ = ["ACTIONS", "Action", "CloudGate", "Decision"]
_PRIORITY_RANGE = (-2**31, 2**31 - 1)
_LOG_FAILED_OOM = event("log_write_failed", "decision log write failed: out of memory")


def _mark_no_decision(mask_out) -> None:
    """A faulted frame's mask says 'no decision' (255) everywhere, never stale or half-written classes."""
    if isinstance(mask_out, np.ndarray) and mask_out.dtype == np.uint8 and mask_out.flags.writeable:
        mask_out.fill(255)


def _custody_attr(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.custody, name), doc=doc)


class CloudGate:
    """On-board cloud gate. See README 'flight', docs/sdd.md and docs/decision-log.md for the contract.

    Ports (flight.ports), all optional: clock (deadlines, latency, log timestamps), backend_factory
    (opens the inference runtime on the verified model bytes), log_sink (where decisions are written;
    default a DecisionLog on config.log.path, none without a path)."""

    card = _custody_attr("card", "the running model's card (flight.model.ModelCard)")
    backend = _custody_attr("backend", "the running runtime (instance 0)")
    bands = _custody_attr("bands", "the model's bands (canonical names)")
    optional_bands = _custody_attr("optional_bands", "bands the model uses when all are present")
    buffer_bytes = _custody_attr("buffer_bytes", "gate buffers + every runtime instance's input buffer (bytes)")
    model_events = _custody_attr("model_events", "recent model events (also in the decision log)")
    store = _custody_attr("store", "the A/B model store (flight.slots.ModelStore), or None")
    self_tests = _custody_attr("self_tests", "self-tests run")
    self_test_failures = _custody_attr("self_test_failures", "self-tests failed")
    recoveries = _custody_attr("recoveries", "recovery chains run")
    rollbacks = _custody_attr("rollbacks", "rollbacks (automatic and manual)")

    def __init__(self, config: GateConfig | None = None, *, clock: Clock | None = None,
                 backend_factory: BackendFactory | None = None, log_sink: LogSink | None = None):
        from .backends import open_backend

        cfg = config or GateConfig()
        self._config = cfg
        self._clock = clock or SystemClock()
        t, n = cfg.tile, cfg.max_tiles
        self.workers = workers = resolve_workers(cfg)   # tile workers, one runtime instance each
        # checked before anything is allocated (a huge max_tiles must not raise MemoryError first): per tile
        # statistics + per worker its tile buffers (t*t*5: four bool masks and the class mask; t*t*16: the
        # HWC loader's two per-pixel bool buffers of <= 8 bytes; t*t*12 the runtime's argmax scratch); the
        # custody adds every instance's input buffer when it loads a model
        self._fixed_bytes = n * TileScanner.PER_TILE_BYTES + workers * t * t * (5 + 12 + 16)
        if self._fixed_bytes > cfg.memory_budget_mib * 2**20:
            raise ConfigError("memory_budget_mib", f"gate buffers need {self._fixed_bytes / 2**20:.1f} MiB for "
                                                   f"tile={t}, max_tiles={n}, workers={workers}; raise the budget or "
                                                   "lower tile/max_tiles/workers")
        self.log_failures = 0
        self.faults = 0
        self.log: LogSink | None = None
        self._pending: list[dict] = []                  # model events from before the log is open
        self._busy = threading.Lock()                    # one caller at a time (one gate per thread)
        self.custody = ModelCustody(cfg, self._clock, backend_factory or open_backend, self._fixed_bytes,
                                    self._emit, instances=workers)
        self.custody.start()
        # --- every buffer of the steady state, allocated once ---
        self._scanner = TileScanner(cfg, self._clock, workers)
        self._history = TargetHistory(cfg.policy.max_targets)
        self._probe = BrightSurfaceProbe()   # the discard guard's fixed sample buffers (flight.evidence)
        if log_sink is None and cfg.log.path:
            log_sink = DecisionLog(cfg.log.path, cfg.log.fsync, cfg.log.max_bytes, cfg.log.keep, clock=self._clock)
        self.log = log_sink
        for rec in self._pending:
            self._write_event(rec)
        self._pending = []

    @property
    def config(self) -> GateConfig:
        return self._config

    @config.setter
    def config(self, cfg: GateConfig) -> None:
        self._config = self.custody.config = cfg

    @property
    def _hwc(self):
        """Worker 0's HWC loading plan (whether the whole-window loader applies to the last scene)."""
        return self._scanner.workers[0].loader.hwc

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
        """Close the decision log and stop the worker threads (workers > 1)."""
        self._scanner.close()
        if self.log:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the model (flight.custody), between scenes
    def _emit(self, rec: dict) -> None:
        """ModelCustody's emit port: a model event into the decision log (held until the log is open)."""
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

    def scrub(self) -> str | None:
        """Memory scrub of every runtime instance's own model buffer (ModelCustody.scrub): a mismatch with the
        verified sha256 runs the recovery chain. Returns a note when something was repaired; raises
        ModelIntegrityError when no verified model could be loaded (every frame then faults model_corrupt)."""
        return self.custody.scrub()

    def self_test(self) -> BistResult:
        """Run the known-answer self-test now on every runtime instance (the gate also runs it every
        update.bist_every scenes, after a runtime error and at every load). A failure runs the recovery
        chain (reload verified, then the other slot); the result says what differed."""
        with self._exclusive():
            return self.custody.self_test()

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
        on every runtime instance before it replaces the running ones, within memory_budget_mib; on any
        failure the running model stays (ModelError). The previous model is kept as the rollback target,
        and the next update.rollback_window scenes are watched (automatic rollback on model faults)."""
        with self._exclusive():
            return self.custody.swap_model(model, slot=slot)

    def install(self, package: str | Path, activate: bool = False) -> dict:
        """Install an uploaded package into the store's standby slot (verified and self-tested there);
        activate=True then switches to it (store pointer and the running model) in the same critical section
        of the store, as the CLI's install --activate. With update.shadow_frames the activation of a package
        that never ran is held back (ShadowHeldError; the package stays installed, staged)."""
        if self.store is None:
            raise ModelError("install needs a model store (config update.store)")
        with self._exclusive():
            return self.custody.install(package, activate=activate)

    def activate(self, slot: str | None = None) -> dict:
        """Switch the store's active pointer to slot (default: the standby one), then run it. With
        update.shadow_frames a package without a sufficient shadow run is held back (ShadowHeldError)."""
        if self.store is None:
            raise ModelError("activate needs a model store (config update.store)")
        with self._exclusive():
            return self.custody.activate(slot)

    def rollback(self) -> dict:
        """Manual rollback: the store's other slot (verified and self-tested first), or without a store the
        model that ran before the last swap."""
        with self._exclusive():
            return self.custody.rollback()

    def model_status(self) -> dict:
        """What runs (model, sha256, package, slot, source, backend), the self-test and recovery counters,
        why no model runs (unavailable) and buffer_bytes."""
        return self.custody.status()

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
            self._scanner.input.close()                  # hold no reference to the caller's mapping
            self._busy.release()

    def _process_guarded(self, scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry,
                         strict) -> Decision:
        strict = self.config.strict if strict is None else strict
        notes = self.custody.between_scenes()            # between scenes: not counted in this scene's latency
        t0 = self._clock.monotonic()
        try:
            self._check_args(scene_id, priority, target_id)
            self.custody.require_running()
            d = self._process(scene, band_names, scene_id, mask_out, valid_mask, priority, target_id, radiometry, t0)
        except CloudGateError as e:
            if strict:
                raise
            # a verified model the runtime cannot open for lack of memory (scrub reload under pressure) is
            # out_of_memory, not model_corrupt: the next frame retries the reload
            code = OutOfMemoryError.code if isinstance(e, ModelError) and is_allocation_failure(e) else e.code
            d = self._fault(scene, scene_id, target_id, priority, code, str(e), t0)
        except MemoryError as e:                          # at the memory limit: a typed fault, the loop lives on
            if strict:
                raise OutOfMemoryError(f"out of memory while gating this frame: {e}") from e
            d = self._fault(scene, scene_id, target_id, priority, OutOfMemoryError.code,
                            f"out of memory while gating this frame (MemoryError: {e})"[:2000], t0)
        except Exception as e:
            # anything unexpected on one frame (runtime, numpy, a caller's object) must not kill the loop;
            # KeyboardInterrupt / SystemExit still propagate
            self.custody.runtime_error()                  # a runtime error: self-test before the next scene
            if strict:
                raise
            code = OutOfMemoryError.code if is_allocation_failure(e) else "internal"
            d = self._fault(scene, scene_id, target_id, priority, code, f"{type(e).__name__}: {e}"[:2000], t0)
        if d.action == "fault":
            _mark_no_decision(mask_out)
        d.degraded.extend(notes)
        self._record(d)
        self.custody.after_decision(d.fault_code, d.degraded)
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
        cfg, sc = self.config, self._scanner
        # 1. gate: the inputs
        fh, fw, src_idx = check_scene(scene, band_names, mask_out, valid_mask, self.bands, self.optional_bands,
                                      cfg.sensor)
        sc.bind(self.custody)                            # the workers run the custody's runtime instances
        load_idx = sc.prepare(src_idx)                   # whole-window loading when the bands allow it
        imap = input_map(scene, radiometry, (cfg.radiometry_scale, cfg.radiometry_offset), self.backend)
        sc.input.open(scene)                             # the mmap behind the scene, if any (checked)
        step, ds = sc.step, sc.downsample
        h, w = -(-fh // ds), -(-fw // ds)                # the grid the model decides on (card input_grid)
        ny, nx = -(-h // step), -(-w // step)
        n_tiles = ny * nx
        if n_tiles > cfg.max_tiles:
            raise SceneShapeError(f"scene {h}x{w} needs {n_tiles} tiles > max_tiles={cfg.max_tiles}; "
                                  "raise max_tiles in the gate config")
        previous = self._history.previous(target_id)
        # 2. scan the tiles (infer, count, estimate; stop early or at the deadline)
        scan = sc.scan(scene, h, w, nx, n_tiles, load_idx, imap, mask_out, valid_mask, previous, t0)
        n = sc.est.n
        full = n == n_tiles
        self._check_scan(scan, scene_id, imap, full)
        # 3. estimate
        cf = scan.cloud_px / scan.valid_px if scan.valid_px else 0.0
        vf = scan.valid_px / scan.area_px if scan.area_px else 0.0
        bound = (cf, cf) if full else scan.bound if scan.early else sc.est.bounds()[:2]
        # 4. policy (pure)
        tiles = TileCounts(sc.t_cloud, sc.t_valid, sc.t_done, n_tiles, nx)
        pd = decide(cf, vf, priority, previous, tiles, cfg.policy)
        pd, events = self._discard_guard(pd, scene, src_idx, imap, valid_mask, (h, w))
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
            latency_s=self._clock.monotonic() - t0, policy_version=cfg.policy.version, **self.custody.identity(),
            degraded=events, scene_id=str(scene_id), target_id=target_id, priority=int(priority), grid=(ny, nx),
            scene_bytes=scene_bytes, downlink_bytes=self._downlink_bytes(pd, scene_bytes, nx, h * w),
            infer_s=scan.infer_s, tile_pixels=sc.tile * sc.tile, core_pixels=step * ds,
            hysteresis=reason if rule == "hysteresis" else None)

    def _discard_guard(self, pd, scene, src_idx, imap, valid_mask, grid_hw):
        """Never discard what the model cannot tell apart (flight.evidence.guard_decision), judged on the grid
        the model decided on (grid_hw: the half grid's size with a half-resolution card). -> (decision, events)"""
        if pd.action not in ("discard", "reacquire"):
            return pd, []
        bands, inp = self.bands, self._scanner.input
        blue, green = (src_idx[bands.index(b)] if b in bands else None for b in ("blue", "green"))
        inp.check_file()                          # a memmap's file may have shrunk since the scan
        release = inp.release_pages
        if self._scanner.downsample == 2:
            full, (h2, w2) = scene, grid_hw
            scene = HalfScene(full, h2, w2)
            valid_mask = None if valid_mask is None else HalfValid(valid_mask, h2, w2)
            release = lambda _s, y0, y1: inp.release_pages(full, 2 * y0, min(2 * y1, full.shape[0]))  # noqa: E731
        return guard_decision(pd, self._probe, scene, blue, green, imap.radiometry, valid_mask, self.config.policy,
                              release=release)

    @staticmethod
    def _check_scan(scan: ScanCounts, scene_id, imap: InputMap, full: bool) -> None:
        """Scenes that must not be decided on: nothing valid anywhere, or not reflectance at all: most valid
        pixels outside PLAUSIBLE_REFLECTANCE, or (flight.sceneinput.DARK_*) nearly every sampled valid pixel
        darker than DARK_REFLECTANCE in every band, which no sunlit scene is (a scene scaled twice, e.g. 0..1
        reflectance with radiometry=(1e-4, 0); a night or dead-detector frame). Both fault
        implausible_radiometry (severity error): a decision on such a scene would be confidently wrong."""
        if scan.valid_px == 0 and full:
            raise AllInvalidSceneError(f"scene {scene_id!r}: every pixel is no-data, NaN/Inf or masked invalid")
        if scan.oor_px > IMPLAUSIBLE_SHARE * scan.valid_px:
            rs, ro = imap.radiometry
            raise ImplausibleRadiometryError(
                f"{scan.oor_px / scan.valid_px:.0%} of the valid pixels have a reflectance outside "
                f"{PLAUSIBLE_REFLECTANCE} after radiometry (scale={rs:g}, offset={ro:g}): the scene is not "
                "reflectance; pass the sensor's radiometry=(scale, offset) (reflectance = value * scale + offset) "
                "or fix the config's radiometry_scale/radiometry_offset")
        if scan.sample_px and scan.bright_px <= DARK_SHARE * scan.sample_px:
            rs, ro = imap.radiometry
            raise ImplausibleRadiometryError(
                f"{scan.sample_px - scan.bright_px} of {scan.sample_px} sampled valid pixels (every {DARK_STRIDE}th "
                f"in both axes) are darker than reflectance {DARK_REFLECTANCE} in every band after radiometry "
                f"(scale={rs:g}, offset={ro:g}): no sunlit scene is that dark. Float reflectance passed with a DN "
                "scale (e.g. radiometry=(1e-4, 0) on 0..1 data) is scaled twice: pass radiometry=(1, 0) for "
                "reflectance, the sensor's (scale, offset) for DN")

    def _downlink_bytes(self, pd, scene_bytes: int, nx: int, scene_area: int) -> int:
        if pd.action != "downlink":
            return 0
        if not pd.partial:
            return scene_bytes
        clear_area = sum(int(self._scanner.t_area[r * nx + c]) for r, c, _ in pd.clear_tiles)
        return int(round(scene_bytes * (clear_area / scene_area)))   # areas on the grid the model decided on

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
                        latency_s=self._clock.monotonic() - t0, **self.custody.identity(),
                        policy_version=self.config.policy.version, tile_pixels=self.config.tile ** 2,
                        core_pixels=self._scanner.step * self._scanner.downsample)

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
