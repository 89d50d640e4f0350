"""Model custody: everything that keeps a verified model running, as one component (F Prime style).

ModelCustody owns the model's whole lifecycle: its sources (flight.modelsource: card, signed package,
A/B store slot), verification and card<->runtime consistency at every load, the N runtime instances
built from the same verified bytes (one per tile worker), the known-answer self-test (BIST) and the
model-buffer scrub of EACH instance, the recovery chain (reload verified -> other slot -> no model),
following the store's A/B active pointer, swap / install / activate / rollback with probation, and the
model events (flight.logschema.model_event) it emits through its emit port.

Ports and interface (what CloudGate calls):
    ModelCustody(config, clock, backend_factory, fixed_bytes, emit, instances=N)
    start()                      load the initial model (raises only without a store to fall back to)
    between_scenes() -> events   before each scene: follow the pointer, retry, scrub, self-test
    require_running()            the typed error every frame faults with while no verified model runs
    runtime_error()              a runtime failed on a frame: self-test before the next scene
    after_decision(code, events) probation after a switch (automatic rollback)
    instances, backend, card, bands, optional_bands, generation (bumped whenever instances change)
    scrub(), self_test(), swap_model(), install(), activate(), rollback(), status()
A failure of any one instance takes the model out of service exactly as a single one did: the recovery
chain replaces every instance or none.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from pathlib import Path

import numpy as np

from .bist import BistResult, compare_reference, run_tiles
from .errors import ModelError, ModelIntegrityError, ModelReloadError, OutOfMemoryError
from .logschema import event, model_event
from .model import GATE_CLASSES, ModelCard
from .modelsource import CardSource, PackageSource, SlotSource, Source, open_loaded

PACKAGE_SUFFIX = ".cgpkg"
SLOTS = ("a", "b")
_RETRY_EVERY = 10                 # scenes between recovery attempts while no verified model runs
_MODEL_FAULTS = ("internal", "model_corrupt")   # fault codes a model (not a scene) is blamed for

# what the runtimes say when an allocation fails (onnxruntime: "Failed to allocate memory for requested
# buffer", C++ std::bad_alloc, LiteRT's XNNPack delegate: "failed to reshape runtime" when its workspace
# cannot be allocated): a lack of memory, typed as such, not an internal error or a corrupt model
_ALLOC_FAILURE_TEXT = ("failed to allocate memory", "bad_alloc", "out of memory", "failed to reshape runtime")


def _transient_load_failure(e: BaseException) -> str | None:
    """'out_of_memory' / 'model_reload_failed' when loading failed for a reason that says nothing about the
    model's bytes (they verified before the runtime opened them): no memory, or the runtime refusing them
    (LiteRT under memory pressure refuses with an empty message). None: the model itself is at fault."""
    if isinstance(e, MemoryError) or is_allocation_failure(e):
        return "out_of_memory"
    if isinstance(e, ModelIntegrityError) and str(e).startswith(("LiteRT refused", "onnxruntime refused")):
        return "model_reload_failed"
    return None


def is_allocation_failure(e: BaseException) -> bool:
    try:
        text = str(e).lower()
    except Exception:
        return False
    return any(t in text for t in _ALLOC_FAILURE_TEXT)


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



class _Switching:
    """ModelCustody's model switches: the A/B store's active pointer (followed, persisted), probation after a
    switch (automatic rollback), and the update commands (between scenes; CloudGate serializes them with
    process()): swap, install, activate, rollback. Each verifies, checks and self-tests the new model on
    every runtime instance before any instance is replaced; on failure every running instance stays."""

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


    def _follow_pointer(self) -> None:
        """An activation made outside the gate (python -m flight model activate): load the new active slot
        verified and self-tested, then switch; if it does not verify, keep the running model."""
        sig = self._stat_pointer()
        if sig == self._pointer_sig:
            return
        self._pointer_sig = sig
        p = self.store.read_pointer()
        lm = self.loaded
        if p is None or (lm is not None and self.ok and lm.slot == p.slot
                         and lm.package_sha256 == p.package_sha256):
            return
        try:
            self._switch_to(SlotSource(self.store, p.slot), f"active pointer -> slot {p.slot} (generation {p.generation})")
        except Exception:                                # logged (model_switch_refused); the running model stays
            return

    def _switch_to(self, src: Source, why: str, probation: bool = True):
        prev = self.loaded if self.ok else None
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

    def after_decision(self, fault_code: str | None, degraded: list) -> None:
        """Probation after a switch (fault_code, degraded: the decision's): too many model faults in the
        window -> automatic rollback."""
        p = self._probation
        if p is None:
            return
        p[0] -= 1
        if fault_code in _MODEL_FAULTS or any(e.get("code") == "deadline" for e in degraded):
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

    def swap_model(self, model: str | Path | None = None, *, slot: str | None = None) -> dict:
        """Swap the running model between scenes, without a restart: model = a package (.cgpkg), a card or
        an artifact (unsigned; refused with update.require_signed), or slot = a store slot (the store's
        active pointer then follows). The new model is verified, checked against its card and self-tested
        before it replaces the running one, within memory_budget_mib; on any failure the running model
        stays (ModelError). The previous model is kept as the rollback target, and the next
        update.rollback_window scenes are watched (automatic rollback on model-attributable faults)."""
        if slot is not None:
            if self.store is None:
                raise ModelError("swap_model(slot=...) needs a model store (config update.store)")
            if slot not in SLOTS:
                raise ModelError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
            src = SlotSource(self.store, slot)
        else:
            src = self.source_for(model)
        lm = self._switch_to(src, f"swap_model({src.label})")
        if self.store is not None and lm.slot:
            self._persist_pointer(lm.slot, lm, "swap_model")
        return self.status()

    def install(self, package: str | Path, activate: bool = False) -> dict:
        """Install an uploaded package into the store's standby slot (verified and self-tested there).
        activate=True: the store activates it in the same critical section (ModelStore.install(activate=True),
        as the CLI's install --activate), then it runs; out["activated"] is then status(). A store with a
        shadow bar (update.shadow_frames) holds that activation back (ShadowHeldError, model_shadow_held)
        and the package stays installed, staged, as with the CLI."""
        from .slots import ShadowHeldError

        if self.store is None:
            raise ModelError("install needs a model store (config update.store)")
        try:
            out = self.store.install(package, activate=activate)
        except ShadowHeldError as e:
            self._event("model_shadow_held", f"{package} installed, not activated: {e}"[:4000])
            raise
        except ModelError as e:
            self._event("model_install_refused", f"{package}: {e}"[:4000])
            raise
        self._event("model_install", f"{out['name']} installed in slot {out['slot']}: {out['bist']}"[:4000],
                    duration=out["seconds"])
        if activate:
            out["activated"] = self._run_activated(out["activated"])
        return out

    def activate(self, slot: str | None = None) -> dict:
        """Switch the store's active pointer to slot (default: the standby one), then run it. A store with a
        shadow bar (update.shadow_frames) refuses a package without a sufficient shadow run (ShadowHeldError)."""
        from .slots import ShadowHeldError

        if self.store is None:
            raise ModelError("activate needs a model store (config update.store)")
        try:
            res = self.store.activate(slot)
        except ShadowHeldError as e:
            self._event("model_shadow_held", str(e)[:4000])
            raise
        return self._run_activated(res)

    def _run_activated(self, res: dict) -> dict:
        """The store has just activated res["slot"]: run it (verified, self-tested) unless it already runs."""
        self._pointer_sig = self._stat_pointer()
        if self.loaded is None or self.loaded.package_sha256 != res["package_sha256"] or not self.ok:
            self._switch_to(SlotSource(self.store, res["slot"]), f"activate slot {res['slot']}")
        return self.status()

    def rollback(self) -> dict:
        """Manual rollback: the store's other slot (verified and self-tested first), or without a store the
        model that ran before the last swap."""
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
        return self.status()


class ModelCustody(_Switching):
    """Keeps a verified model running on N runtime instances (see the module docstring for the interface).

    config          the gate's GateConfig (read live: model, backend, threads, tile, update.*, scrub_every,
                    memory_budget_mib)
    clock           flight.ports.Clock (self-test durations)
    backend_factory flight.ports.BackendFactory; called once per instance on the same verified bytes
    fixed_bytes     the gate's own buffers (bytes), counted with every instance's input buffer against
                    memory_budget_mib
    emit            emit(record): where model events go (the gate's decision log)
    instances       how many runtime instances to run (one per tile worker), each with threads // instances
                    runtime threads (at least 1)"""

    def __init__(self, config, clock, backend_factory, fixed_bytes: int, emit, instances: int = 1):
        self.config = config
        self._clock = clock
        self._open_backend = backend_factory
        self._emit = emit
        self.tile = config.tile
        self.fixed_bytes = fixed_bytes
        self.n_instances = max(1, int(instances))
        self.model_events: deque = deque(maxlen=64)     # recent model events (also emitted to the log)
        self._key: bytes | None = None
        self.store = None
        self.loaded = self.source = self._prev_source = None
        self._references: dict = {}                     # (artifact sha256, kind) -> self-test outputs at first load
        self.card = None
        self.ok = False
        self.unavailable = ""
        self.unavailable_code = "model_corrupt"         # or out_of_memory / model_reload_failed: transient
        self._scenes = self._since_bist = self._since_retry = 0
        self._bist_due = False
        self._probation = None                          # [scenes left, model faults, previous source, why]
        self._pointer_sig = None
        self.self_tests = self.self_test_failures = self.recoveries = self.rollbacks = 0
        self.instances: list = []
        self.generation = 0                             # bumped whenever the running instances change

    @property
    def instance_threads(self) -> int:
        return max(1, self.config.threads // self.n_instances)

    def _instance_bytes(self, backend, card) -> int:
        """Gate buffers that come with one runtime instance: its input buffer, and with a half-resolution card
        (input_grid.downsample 2) the worker's HalfGrid (tile² x channels float32 means + a bool valid mask)."""
        t = self.tile   # means (float32 x channels) + valid + its temp, and the (2t)² nonzero flag + its temp
        half = t * t * (4 * max(1, card.input_channels) + 2) + 8 * t * t if card.downsample == 2 else 0
        return backend.planes.nbytes + half

    # ------------------------------------------------------------------ load, install, events
    def _key_bytes(self) -> bytes:
        if self._key is None:
            from .package import load_key

            self._key = load_key(self.config.update.key)
        return self._key

    def source_for(self, model) -> Source:
        """A source for a model path: a signed package (.cgpkg, the mission key), else an unsigned card or
        artifact (refused when update.require_signed is set)."""
        u = self.config.update
        if model is not None and str(model).endswith(PACKAGE_SUFFIX):
            return PackageSource(model, self._key_bytes(), int(u.max_package_mib * 2**20))
        if u.require_signed:
            raise ModelIntegrityError(f"update.require_signed is set and {model or 'the default model card'} is not a "
                                      "signed package (.cgpkg); pack it with python -m flight model pack")
        return CardSource(None if model is None else str(model))

    def start(self) -> None:
        """Load the initial model: the configured one, or the store's active slot (then the other slot,
        then, unless update.require_signed, the shipped default for an empty store)."""
        cfg, u = self.config, self.config.update
        if not u.store:
            src = self.source_for(cfg.model)
            lm = self._load(src)            # raises: without a store there is nothing else to fall back to
            self._install(lm)
            if src.signed:
                self._event("model_loaded", f"{src.label} verified; self-test {lm.bist.detail}", lm,
                            duration=lm.load_s)
            return
        from .slots import ModelStore

        self.store = ModelStore(u.store, self._key_bytes(), int(u.max_package_mib * 2**20), threads=cfg.threads,
                                shadow_frames=u.shadow_frames, shadow_min_agreement=u.shadow_min_agreement)
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
        """open_loaded + the memory budget + (reload) the same outputs as at this artifact's first load,
        then the other instances from the same verified bytes, each self-tested bit-exact against the
        first one's reference. lm.instances: every instance (lm.backend first)."""
        cfg = self.config
        opened = []

        def factory(path, data, kind, threads, tile, n_bands):
            opened.append((path, data, kind, threads, tile, n_bands))
            return self._open_backend(path, data, kind, threads, tile, n_bands)

        lm = open_loaded(src, cfg.backend, factory, self.instance_threads, self.tile)
        for code, text in lm.notes:                      # model-metadata notes (flight.modelmeta)
            self._event(code, text, lm)
        need = self.fixed_bytes + self.n_instances * self._instance_bytes(lm.backend, lm.card)
        if need > cfg.memory_budget_mib * 2**20:
            raise ModelError(f"{src.label} needs {need / 2**20:.1f} MiB of gate buffers (input {lm.backend.planes.shape}"
                             f"{f' x {self.n_instances} instances' if self.n_instances > 1 else ''}) "
                             f"over memory_budget_mib={cfg.memory_budget_mib}")
        ref = self._references.get((lm.sha256, lm.kind))
        if ref is not None and ref != lm.reference:
            raise ModelIntegrityError(f"{src.label} verified, but its self-test outputs differ from those at its first "
                                      "load on this board: the runtime no longer computes what it did")
        lm.instances = [lm.backend]
        path, data, kind, threads, tile, n_bands = opened[-1]
        for i in range(1, self.n_instances):            # bounded by the worker count
            b = self._open_backend(path, bytes(memoryview(data)), kind, threads, tile, n_bands)  # its own copy
            buf = getattr(b, "model_buffer", None)       # LiteRT reads its constants from it: verified like the file
            if buf is not None and hashlib.sha256(buf).hexdigest() != lm.sha256:
                raise ModelIntegrityError(f"{src.label}: runtime instance {i}'s own copy of the verified bytes "
                                          "fails its sha256 (an upset in RAM); refusing every instance")
            ok, detail = compare_reference(run_tiles(b, lm.golden_tiles()), lm.reference)
            if not ok:
                raise ModelIntegrityError(f"{src.label}: runtime instance {i} built from the same verified bytes "
                                          f"does not reproduce instance 0: {detail}")
            lm.instances.append(b)
        return lm

    def _install(self, lm) -> None:
        """Make lm the running model (between scenes; the gate's buffers do not depend on the model)."""
        self.loaded, self.source = lm, lm.source
        self.card = lm.card
        self.bands = tuple(lm.card.bands)
        self.optional_bands = tuple(lm.card.optional_bands)
        self.instances = list(lm.instances)
        self.backend = lm.backend
        self.buffer_bytes = self.fixed_bytes + sum(self._instance_bytes(b, lm.card) for b in self.instances)
        if len(self._references) >= 8:
            self._references.pop(next(iter(self._references)))
        self._references.setdefault((lm.sha256, lm.kind), lm.reference)
        self.ok = True
        self.generation += 1
        self._since_bist = self._since_retry = 0
        self._bist_due = False

    def _drop_backend(self) -> None:
        """Release the running instances (failed ones; keeps the card so faults say which model failed)."""
        self.backend = _NoModel(self.tile)
        self.instances = []
        self.generation += 1
        self.ok = False

    def _set_unavailable(self, why: str) -> None:
        if self.card is None:
            self.card = ModelCard(name="none", bands=(), classes=GATE_CLASSES, tile=self.tile, artifacts={},
                                  path=Path(self.config.update.store or "."), raw={})
            self.bands = self.optional_bands = ()
            self.buffer_bytes = self.fixed_bytes
        self._drop_backend()
        self.unavailable = why
        self.unavailable_code = "model_corrupt"
        self._event("model_unavailable", f"no verified model: {why}"[:4000], None)

    def _event(self, code: str, text: str, lm=None, duration: float = 0.0) -> None:
        """A model event: into self.model_events and out through the emit port (flight.logschema.model_event)."""
        lm = lm if lm is not None else self.loaded
        rec = model_event(code, text, model_name=lm.card.name if lm else "", model_sha256=lm.sha256 if lm else "",
                          package_sha256=lm.package_sha256 if lm else "", model_slot=lm.slot if lm else "",
                          backend=lm.kind if lm else "", duration_s=duration)
        self.model_events.append(rec)
        self._emit(rec)

    # ------------------------------------------------------------------ recovery, scrub, self-test
    def _recover(self, why: str) -> bool:
        """The recovery chain: reload the running model's source (re-read, verified, self-tested); else the
        other slot of the store (automatic rollback, persisted); else no model (every frame faults
        model_corrupt; retried every _RETRY_EVERY scenes). True when a verified model runs again."""
        self.recoveries += 1
        order, errors = [], []
        if self.source is not None:
            order.append(("model_reload", self.source))
        if self.store is not None:
            cur = getattr(self.source, "slot", None)
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
            self.unavailable_code = ("out_of_memory" if "out_of_memory" in transient else "model_reload_failed")
            self._since_retry = _RETRY_EVERY - 1         # retried on the very next frame, not model_corrupt
        return False

    def scrub(self) -> str | None:
        """Memory scrub of the runtime's own model buffer: LiteRT's interpreter reads its constant tensors
        from the very buffer it was built from, so that buffer (not a copy) is re-hashed against the
        verified sha256; onnxruntime exposes none (the known-answer self-test covers it). On a mismatch
        the recovery chain reloads a verified model. Returns a note when something was repaired; raises
        ModelIntegrityError when no verified model could be loaded (every frame then faults model_corrupt).
        Every runtime instance's buffer is scrubbed; one failing replaces them all."""
        if not self.ok:
            raise ModelIntegrityError(f"no verified model runs: {self.unavailable}")
        n = len(self.instances)
        for i, b in enumerate(self.instances):          # every instance: bounded by the worker count
            buf = getattr(b, "model_buffer", None)
            if buf is not None and hashlib.sha256(buf).hexdigest() != self.loaded.sha256:
                break
        else:
            return None
        why = "the runtime's model buffer failed its sha256 scrub (an upset in RAM)"
        if n > 1:
            why += f" in runtime instance {i} of {n}"
        if self._recover(why):
            return f"{why}; reloaded from the verified {self.source.label}"
        raise ModelIntegrityError(f"{why}, and no verified model could be loaded: {self.unavailable}")

    def self_test(self) -> BistResult:
        """The known-answer self-test now, on every runtime instance (bit-exact against the reference taken
        at load). A failure of any instance runs the recovery chain; the result says what differed."""
        lm = self.loaded
        self.self_tests += 1
        self._since_bist, self._bist_due = 0, False
        if not self.ok or lm is None:
            return BistResult(False, f"no verified model runs: {self.unavailable}")
        t0 = self._clock.perf_counter()
        results, ok, detail, n = [], True, "", len(self.instances)
        try:
            for i, b in enumerate(self.instances):       # every instance: bounded by the worker count
                res_i = run_tiles(b, lm.golden_tiles())
                ok, detail = compare_reference(res_i, lm.reference)
                results = results or res_i
                if not ok:
                    detail = f"runtime instance {i} of {n}: {detail}" if n > 1 else detail
                    break
            if ok and n > 1:
                detail = f"{detail}, on each of the {n} runtime instances"
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

    # ------------------------------------------------------------------ the gate's per-scene interface
    def between_scenes(self) -> list[dict]:
        """Between scenes (before this one): follow an activation, retry recovery, scrub, self-test.
        Returns degraded events for this frame. Never raises."""
        self._scenes += 1
        notes, u = [], self.config.update
        try:
            if self.store is not None and u.watch_active:
                self._follow_pointer()
            if not self.ok:
                self._since_retry += 1
                if self._since_retry >= _RETRY_EVERY:
                    self._since_retry = 0
                    if self._recover(f"retrying after: {self.unavailable}"[:1000]):
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
            if self.ok and (self._bist_due or (u.bist_every and self._since_bist >= u.bist_every)):
                res = self.self_test()
                if not res.passed and self.ok:
                    notes.append(event("model_bist_recovered", f"self-test failed ({res.detail[:300]}); "
                                                               f"{self.source.label} reloaded and self-tested"))
        except Exception as e:                           # maintenance must never take the loop down
            self._bist_due = True
            self._event("bist_fail", f"model maintenance failed: {type(e).__name__}: {e}"[:2000])
        return notes

    def require_running(self) -> None:
        """Raise the typed error a frame faults with while no verified model runs (nothing when one does)."""
        if self.ok:
            return
        if self.unavailable_code == "out_of_memory":
            raise OutOfMemoryError(f"out of memory reloading the verified model (retried on the next frame): "
                                   f"{self.unavailable}"[:2000])
        if self.unavailable_code == "model_reload_failed":
            raise ModelReloadError(f"the runtime refused to reopen the verified model (retried on the next "
                                   f"frame): {self.unavailable}"[:2000])
        raise ModelIntegrityError(f"no verified model runs (every frame faults until one verifies): "
                                  f"{self.unavailable}"[:2000])

    def runtime_error(self) -> None:
        """A runtime failed on a frame: self-test before the next scene."""
        self._bist_due = True

    def identity(self) -> dict:
        """What decides: the Decision / log fields model_name, model_sha256, backend, package_sha256, model_slot."""
        lm = self.loaded
        return {"model_name": self.card.name, "model_sha256": lm.sha256 if lm else "", "backend": self.backend.name,
                "package_sha256": lm.package_sha256 if lm else "", "model_slot": lm.slot if lm else ""}

    def status(self) -> dict:
        """CloudGate.model_status(): what runs, where from, its self-test and recovery counters."""
        lm = self.loaded
        return {"running": bool(self.ok), "model_name": self.card.name if lm else "",
                "model_sha256": lm.sha256 if lm else "", "package_sha256": lm.package_sha256 if lm else "",
                "slot": lm.slot if lm else "", "source": lm.source.label if lm else "", "backend": self.backend.name,
                "signed": bool(lm and lm.source.signed), "self_tests": self.self_tests,
                "self_test_failures": self.self_test_failures, "recoveries": self.recoveries,
                "rollbacks": self.rollbacks, "unavailable": None if self.ok else self.unavailable,
                "buffer_bytes": self.buffer_bytes}

