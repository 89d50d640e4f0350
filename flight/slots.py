"""A/B model store on disk: two slots and an atomically switched active pointer.

    STORE/slots/a/package.cgpkg     a signed package (flight.package)
    STORE/slots/a/activated         {"slot", "package_sha256", "generation", "model_version", "utc", "check"}:
                                    the package this slot held when it was last activated
    STORE/slots/b/...
    STORE/active                    {"slot", "package_sha256", "generation", "previous", "utc", "check"}
    STORE/version_hwm               the highest model_version ever activated, in two CRC-checked slots
                                    (anti-rollback; survives a torn write like the decision log's seq)
    STORE/lock                      flock: one installer / switcher at a time
    STORE/journal.jsonl             install / switch / rollback / self-test events (decision-log format,
                                    flight.logschema event records)

install(package): under the lock, verify the upload (signature first) and its version against the
high-water mark (anti-rollback; --allow-downgrade is explicit and journalled), choose the target slot from
what verifies *now* (both slots re-opened: the slot a gate would run, or else the one package that still
verifies, is never the target), check there is room for it plus a margin for the logs, write it beside
the target slot (package.cgpkg.new, fsync), verify it there (signature, card <-> model, known-answer
self-test on every backend it has golden results for and this board can run), and only then rename it
over the target slot. A refused package, a full disk (StoreFullError) or an I/O error (StoreIOError)
leaves both slots as they were and no temporary file behind (a kill -9 leaves one, removed by the next
operation under the lock). install(activate=True) activates in the same critical section.

activate(slot): verify + self-test the slot again, raise the version high-water mark, switch the pointer
(write active.tmp, fsync, rename over active, fsync the directory), then record the slot as activated
(slots/S/activated). A kill -9 or power loss at any point leaves the previous pointer or the new one, and
a switch killed before its pointer was renamed never counts as an activation.

What a gate may run (resolve_active, and modelsource.SlotSource refuses anything else): the pointer's slot
while it holds the package the pointer names, and a slot holding the package it was last activated with.
A package installed but never activated (staged) never runs: a missing or damaged pointer falls back to
the slot with the highest *activated* generation.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError, ModelIntegrityError, ModelMissingError
from .atomicwrite import commit_rename, write_atomic, write_synced
from .package import DEFAULT_MAX_PACKAGE_BYTES, FLIGHT_ARTIFACTS, Package, open_package, package_version, parse_package

SLOTS = ("a", "b")
PACKAGE_NAME = "package.cgpkg"
NEW_SUFFIX = ".new"                  # an upload being verified beside its target slot
MAX_POINTER_BYTES = 4096
DEFAULT_RESERVE_BYTES = 512 << 10    # free space an install leaves for the decision log and the journal
_VTAG = b"cloudgate-model-version "
_VSLOT = len(_VTAG) + 20 + 1 + 8 + 1


class StoreBusyError(ModelError):
    code = "store_busy"


class StoreFullError(ModelError):
    """No room on the store's file system for the package plus the log margin (or ENOSPC while writing)."""
    code = "store_full"


class StoreIOError(ModelError):
    """The store's file system failed a write or a sync (EIO, EROFS...): nothing was changed."""
    code = "store_io_error"


class StoreUnusableError(ModelError):
    """The store directory cannot be created or used (read-only, not a directory, no permission)."""
    code = "store_unusable"


class ShadowHeldError(ModelError):
    """Activation held back: the slot's shadow run (flight.shadow) does not meet the store's bar."""
    code = "model_shadow_held"


class DowngradeError(ModelIntegrityError):
    """The package's model_version is older than the highest version this store has activated."""
    code = "model_downgrade"


def _other(slot: str | None) -> str:
    return "b" if slot == "a" else "a"


@dataclass
class Pointer:
    slot: str
    package_sha256: str
    generation: int
    previous: str | None
    utc: str = ""

    def to_bytes(self) -> bytes:
        body = {"slot": self.slot, "package_sha256": self.package_sha256, "generation": self.generation,
                "previous": self.previous, "utc": self.utc}
        check = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return (json.dumps(dict(body, check=check), sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Pointer":
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        check = obj.pop("check", None)
        if hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest() != check:
            raise ValueError("check digest mismatch")
        if obj.get("slot") not in SLOTS or obj.get("previous") not in (*SLOTS, None):
            raise ValueError("bad slot name")
        if not isinstance(obj.get("generation"), int) or not isinstance(obj.get("package_sha256"), str):
            raise ValueError("bad fields")
        return cls(obj["slot"], obj["package_sha256"], obj["generation"], obj["previous"], obj.get("utc", ""))


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """The A/B store. key: the mission key (bytes). backends: the kinds to self-test at install and
    activation (default: every kind the package has golden results for whose runtime is installed)."""

    def __init__(self, root: str | Path, key: bytes, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
                 backends: tuple[str, ...] | None = None, threads: int = 1, lock_timeout_s: float = 10.0,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES, shadow_frames: int = 0,
                 shadow_min_agreement: float = 0.0):
        """root: the store directory. max_bytes: largest package read. lock_timeout_s: seconds to wait for
        the store lock. reserve_bytes: free bytes an install must leave on the store's file system (the
        decision log and the journal may share it). shadow_frames, shadow_min_agreement: activating a package
        that never ran needs a shadow run (flight.shadow) of at least shadow_frames frames with an action
        agreement of at least shadow_min_agreement (0: no shadow run needed)."""
        self.root = Path(root)
        self.shadow_frames, self.shadow_min_agreement = int(shadow_frames), float(shadow_min_agreement)
        self.key, self.max_bytes, self.backends, self.threads = key, max_bytes, backends, threads
        self.lock_timeout_s = lock_timeout_s
        self.reserve_bytes = reserve_bytes
        self._lock_fh = None

    # ------------------------------------------------------------ layout
    def package_path(self, slot: str) -> Path:
        return self.root / "slots" / slot / PACKAGE_NAME

    @property
    def pointer_path(self) -> Path:
        return self.root / "active"

    def marker_path(self, slot: str) -> Path:
        return self.root / "slots" / slot / "activated"

    @property
    def hwm_path(self) -> Path:
        return self.root / "version_hwm"

    def ensure(self) -> None:
        """Create the slot directories. StoreUnusableError (typed, says what to fix) when it cannot."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreUnusableError(f"model store {self.root} is not a directory; give update.store / --store a "
                                     "directory")
        try:
            for s in SLOTS:
                (self.root / "slots" / s).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnusableError(f"model store {self.root} cannot be set up ({e.strerror or e}): give a writable "
                                     "directory (a read-only store must already hold its slots)") from None

    def _clean_tmp(self) -> None:
        """Remove what a killed install or switch left behind (under the lock: no one is writing them)."""
        for f in [self.root / "active.tmp"] + [d / n for d in (self.root / "slots" / s for s in SLOTS)
                                               for n in (PACKAGE_NAME + ".tmp", PACKAGE_NAME + NEW_SUFFIX,
                                                         "activated.tmp")]:
            try:
                f.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass                                      # a read-only store: nothing to clean, nothing written

    # ------------------------------------------------------------ lock and journal
    def __enter__(self):
        self.ensure()
        try:
            fh = open(self.root / "lock", "ab")
        except OSError as e:
            raise StoreUnusableError(f"model store {self.root}: cannot open its lock file ({e.strerror or e}); the "
                                     "store must be writable to install or switch") from None
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.close()
                    raise StoreBusyError(f"model store {self.root} is locked by another installer (waited "
                                         f"{self.lock_timeout_s:.0f} s); retry when it has finished") from None
                time.sleep(0.05)
        self._lock_fh = fh
        self._clean_tmp()
        return self

    def __exit__(self, *exc):
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def journal(self, code: str, text: str, **fields) -> None:
        """Append a model event to STORE/journal.jsonl (never raises: the operation's result stands)."""
        from .decisionlog import DecisionLog
        from .logschema import model_event

        try:
            with DecisionLog(self.root / "journal.jsonl", fsync="every", max_bytes=1 << 20, keep=3) as log:
                log.append(model_event(code, text, **fields))
        except Exception:                                 # a full disk must not undo an install
            pass

    # ------------------------------------------------------------ pointer
    def read_pointer(self) -> Pointer | None:
        """The active pointer, or None when there is none or it is damaged."""
        try:
            from .model import read_regular_file

            return Pointer.from_bytes(read_regular_file(self.pointer_path, MAX_POINTER_BYTES, "active pointer"))
        except (ModelError, ValueError, TypeError, KeyError):
            return None

    def _write_pointer(self, p: Pointer, progress=None) -> None:
        tmp = self.pointer_path.with_name("active.tmp")
        step = progress or (lambda phase: None)
        step("pointer_write")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = p.to_bytes()
                os.write(fd, data[: len(data) // 2])
                step("pointer_partial")
                os.write(fd, data[len(data) // 2:])
                step("pointer_fsync")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            _unlink(tmp)                                  # ENOSPC / EIO: the old pointer stands, no temp file
            raise
        step("pointer_rename")
        os.replace(tmp, self.pointer_path)
        step("pointer_fsync_dir")
        _fsync_dir(self.root)
        step("pointer_done")

    # ------------------------------------------------------------ verification
    def verify_slot(self, slot: str, backends: tuple[str, ...] | None = None) -> tuple[Package, dict]:
        """Open the slot's package (signature, card, members) and self-test it on each backend. Returns
        (package, {kind: BistResult}); ModelError when anything fails."""
        return self.verify_file(self.package_path(slot), backends, label=f"slot {slot}")

    def verify_file(self, path: Path, backends: tuple[str, ...] | None = None, label: str | None = None):
        from .backends import open_backend, quiet_factory
        from .modelsource import PackageSource, _litert_available, open_loaded

        pkg = open_package(path, self.key, self.max_bytes)
        # every artifact the package carries is checked against its card and self-tested where this board
        # has its runtime (a card that does not fit one artifact is a bad package, whatever backend runs)
        kinds = [k for k in pkg.golden["expected"] if k == "onnxruntime" or _litert_available()]
        missing = [k for k in (backends or self.backends or ()) if k not in kinds]
        if missing or not kinds:
            raise ModelIntegrityError(f"{label or path}: cannot be self-tested on {', '.join(missing) or 'any backend'} "
                                      f"here (golden results for {sorted(pkg.golden['expected'])}, runtimes here: "
                                      f"{'litert, ' if _litert_available() else ''}onnxruntime)")
        carried = {FLIGHT_ARTIFACTS[k] for k in pkg.artifacts}
        untested = sorted(carried - set(pkg.golden["expected"]))
        if untested:
            raise ModelIntegrityError(f"{label or path}: carries artifacts for {untested} without golden results")
        results = {}
        src = PackageSource(path, self.key, self.max_bytes)
        for kind in kinds:
            lm = open_loaded(src, kind, quiet_factory(open_backend), self.threads, pkg.card.tile)
            results[kind] = lm.bist
            del lm
        return pkg, results

    # ------------------------------------------------------------ activation records and the version high-water mark
    def read_marker(self, slot: str) -> dict | None:
        """What slot S held when it was last activated ({package_sha256, generation, model_version}), or None
        (never activated, or the record is damaged)."""
        try:
            from .model import read_regular_file

            obj = json.loads(read_regular_file(self.marker_path(slot), MAX_POINTER_BYTES, "activation record"))
            check = obj.pop("check", None)
            if hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest() != check:
                return None
            if (obj.get("slot") != slot or not isinstance(obj.get("package_sha256"), str)
                    or not isinstance(obj.get("generation"), int) or not isinstance(obj.get("model_version"), int)):
                return None
            return obj
        except (ModelError, ValueError, TypeError, AttributeError):
            return None

    def _write_marker(self, slot: str, package_sha256: str, generation: int, model_version: int) -> None:
        body = {"slot": slot, "package_sha256": package_sha256, "generation": generation,
                "model_version": model_version, "utc": _utc()}
        check = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        write_atomic(self.marker_path(slot), (json.dumps(dict(body, check=check), sort_keys=True) + "\n").encode())

    def activated(self, slot: str, package_sha256: str) -> bool:
        """True when slot holds package_sha256 as activated: the valid pointer names it, or the slot's
        activation record does. A staged package (installed, never activated) is not."""
        p = self.read_pointer()
        if p is not None and p.slot == slot and p.package_sha256 == package_sha256:
            return True
        m = self.read_marker(slot)
        return m is not None and m.get("package_sha256") == package_sha256

    def _hwm_slots(self) -> list[int]:
        """The two high-water slots' values (-1 for a missing or damaged slot)."""
        out = [-1, -1]
        try:
            raw = self.hwm_path.read_bytes()[: 2 * _VSLOT]
        except OSError:
            return out
        for k in (0, 1):
            rec = raw[k * _VSLOT:(k + 1) * _VSLOT]
            if len(rec) == _VSLOT and rec.startswith(_VTAG) and rec.endswith(b"\n"):
                body, _, crc = rec[:-1].rpartition(b" ")
                try:
                    if int(crc, 16) == zlib.crc32(body):
                        out[k] = int(body[len(_VTAG):])
                except ValueError:
                    pass
        return out

    def version_hwm(self) -> int:
        """The highest model_version this store has activated: the larger valid high-water slot, and never
        less than an activation record's version (so it survives a torn write or a lost file)."""
        marks = [m["model_version"] for m in (self.read_marker(s) for s in SLOTS) if m]
        return max([0, *self._hwm_slots(), *marks])

    def _raise_hwm(self, version: int) -> None:
        """Record version as activated: written into the high-water slot holding the smaller (or a damaged)
        value, fsync'd, so a torn write loses at most the newer of the two."""
        vals = self._hwm_slots()
        if version <= max(vals):
            return
        k = 0 if vals[0] <= vals[1] else 1
        body = _VTAG + b"%020d" % version
        fd = os.open(self.hwm_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, body + b" %08x\n" % zlib.crc32(body), k * _VSLOT)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _next_generation(self, cur: Pointer | None) -> int:
        marks = [m["generation"] for m in (self.read_marker(s) for s in SLOTS) if m]
        return max([0, cur.generation if cur else 0, *marks]) + 1

    # ------------------------------------------------------------ operations
    def active_slot(self) -> str | None:
        p = self.read_pointer()
        return p.slot if p else None

    def standby_slot(self) -> str:
        """The slot an install writes now (see install_target)."""
        return self.install_target()[0]

    def install_target(self) -> tuple[str, str | None]:
        """(target slot, protected slot). Chosen from what verifies now: both slots are re-opened (signature,
        members, card); the protected slot is the first slot a gate would run that verifies, else the one
        package that still verifies (the newest if both do); the target is the other slot, so the last
        model that verifies is never overwritten."""
        ok = {}
        for s in SLOTS:
            try:
                ok[s] = open_package(self.package_path(s), self.key, self.max_bytes).sha256
            except ModelError:
                pass
        keep = next((s for s in self.runnable() if s in ok), None)
        if keep is None and ok:
            keep = max(ok, key=lambda s: self.package_path(s).stat().st_mtime_ns)
        if keep is None:
            p = self.read_pointer()
            return _other(p.slot if p else "b"), None
        return _other(keep), keep

    def free_bytes(self) -> int:
        """Free bytes for an unprivileged writer on the store's file system."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _check_room(self, need: int) -> None:
        """StoreFullError unless the file system has room for need bytes (besides the target slot's current
        package, kept until the rename) plus reserve_bytes for the logs."""
        free = self.free_bytes()
        if free < need + self.reserve_bytes:
            raise StoreFullError(f"model store {self.root}: {free} bytes free, an install needs {need} for the package "
                                 f"plus {self.reserve_bytes} kept for the decision log and journal; free space (or "
                                 f"lower the reserve) and retry: nothing was written")

    def _io_error(self, e: OSError, what: str) -> ModelError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return StoreFullError(f"model store {self.root}: out of space while {what} ({e.strerror}); nothing "
                                  "changed, the partial file was removed")
        return StoreIOError(f"model store {self.root}: {what} failed ({e.strerror or e}); nothing changed, the "
                            "partial file was removed")

    def install(self, upload: str | Path, progress=None, activate: bool = False,
                allow_downgrade: bool = False) -> dict:
        """Verify an uploaded package and write it into the target slot (install_target), self-tested there
        before it replaces anything. activate=True: activate it inside the same critical section (no other
        install or switch can land in between). allow_downgrade: accept a model_version older than the
        store's high-water mark (journalled as model_downgrade_allowed). Returns {slot, package_sha256, name,
        model_version, bist: {kind: detail}, seconds[, activated]}. Raises ModelError (refused),
        DowngradeError, StoreFullError, StoreIOError, StoreBusyError; both slots are then as they were."""
        t0 = time.perf_counter()
        step = progress or (lambda phase: None)
        with self:
            step("verify_upload")
            try:
                data = _read_bounded(upload, self.max_bytes)
                pkg = parse_package(data, self.key, Path(upload))       # signature before touching the disk
            except ModelError as e:
                self.journal("model_install_refused", str(e)[:1000], package_sha256=_sha_file(upload))
                raise
            version, hwm = package_version(pkg), self.version_hwm()
            if version < hwm:
                msg = (f"{pkg.name} has model_version {version}, older than version {hwm} this store has activated "
                       f"(a replayed or stale package)")
                if not allow_downgrade:
                    self.journal("model_install_refused", f"{msg}; refused (--allow-downgrade installs it on "
                                 "purpose)", package_sha256=pkg.sha256, model_name=pkg.name)
                    raise DowngradeError(f"{msg}: refused; an operator who means it passes --allow-downgrade")
                self.journal("model_downgrade_allowed", f"{msg}; installed because the operator allowed the "
                             "downgrade", package_sha256=pkg.sha256, model_name=pkg.name)
            slot, keep = self.install_target()
            dest = self.package_path(slot)
            tmp = dest.with_name(PACKAGE_NAME + NEW_SUFFIX)
            try:
                self._check_room(len(data))
            except StoreFullError as e:
                self.journal("model_install_no_space", str(e)[:1000], package_sha256=pkg.sha256, model_slot=slot)
                raise
            step("write_slot")
            try:
                write_synced(tmp, data, progress)
            except OSError as e:
                err = self._io_error(e, f"writing slot {slot}")
                self.journal("model_install_no_space" if isinstance(err, StoreFullError) else "model_install_refused",
                             str(err)[:1000], package_sha256=pkg.sha256, model_slot=slot)
                raise err from None
            step("verify_slot")
            try:
                pkg, results = self.verify_file(tmp, label=f"slot {slot} (new package)")
            except ModelError as e:
                _unlink(tmp)
                self.journal("model_install_refused", f"slot {slot}: {e}"[:1000], package_sha256=pkg.sha256,
                             model_slot=slot, model_name=pkg.name)
                raise
            except BaseException:
                _unlink(tmp)
                raise
            try:
                commit_rename(tmp, dest, progress)
            except OSError as e:
                _unlink(tmp)
                raise self._io_error(e, f"renaming into slot {slot}") from None
            step("installed")
            out = {"slot": slot, "package_sha256": pkg.sha256, "name": pkg.name, "size": pkg.size,
                   "model_version": version, "kept": keep,
                   "bist": {k: r.detail for k, r in results.items()},
                   "bist_s": {k: round(r.seconds, 4) for k, r in results.items()},
                   "seconds": round(time.perf_counter() - t0, 4)}
            self.journal("model_install", f"{pkg.name} (model_version {version}) installed in slot {slot} "
                         f"({pkg.size} bytes), self-test passed on {', '.join(results)}", package_sha256=pkg.sha256,
                         model_slot=slot, model_name=pkg.name, duration_s=out["seconds"])
            if activate:
                out["activated"] = self._activate_locked(slot, progress, "activate", allow_downgrade)
            return out

    def activate(self, slot: str | None = None, progress=None, reason: str = "activate",
                 allow_downgrade: bool = False) -> dict:
        """Verify + self-test slot (default: the slot the pointer does not name), then record it as activated
        and switch the active pointer to it. A package older than the version high-water mark is refused
        unless this slot held it activated before (a rollback) or allow_downgrade."""
        with self:
            return self._activate_locked(slot, progress, reason, allow_downgrade)

    def _activate_locked(self, slot, progress, reason: str, allow_downgrade: bool) -> dict:
        step = progress or (lambda phase: None)
        cur = self.read_pointer()
        slot = slot or _other(cur.slot if cur else "b")
        if slot not in SLOTS:
            raise ModelError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        if not self.package_path(slot).exists():
            raise ModelMissingError(f"slot {slot} of {self.root} holds no package; install one first")
        step("verify_slot")
        try:
            pkg, results = self.verify_slot(slot)
        except ModelError as e:
            self.journal("model_switch_refused", f"slot {slot}: {e}"[:1000], model_slot=slot)
            raise
        version, hwm = package_version(pkg), self.version_hwm()
        if version < hwm and not self.activated(slot, pkg.sha256):
            msg = f"slot {slot} holds {pkg.name} model_version {version}, older than activated version {hwm}"
            if not allow_downgrade:
                self.journal("model_switch_refused", f"{msg}; refused", model_slot=slot, package_sha256=pkg.sha256)
                raise DowngradeError(f"{msg}: refused; an operator who means it passes --allow-downgrade")
            self.journal("model_downgrade_allowed", f"{msg}; activated because the operator allowed the downgrade",
                         model_slot=slot, package_sha256=pkg.sha256, model_name=pkg.name)
        if self.shadow_frames and self.runnable() and not self.activated(slot, pkg.sha256):   # (a first model
            # has nothing to run beside: no shadow run)
            from .shadowrecord import read_shadow, shadow_verdict

            why = shadow_verdict(read_shadow(self, slot), pkg.sha256, self.shadow_frames, self.shadow_min_agreement)
            if why:
                self.journal("model_shadow_held", f"slot {slot} ({pkg.name}) not activated: {why}"[:1000],
                             model_slot=slot, package_sha256=pkg.sha256, model_name=pkg.name)
                raise ShadowHeldError(f"slot {slot} ({pkg.name}) held back by shadow mode: {why}")
        if cur and cur.slot == slot and cur.package_sha256 == pkg.sha256:
            if self.read_marker(slot) is None:
                self._write_marker(slot, pkg.sha256, cur.generation, version)
            return {"slot": slot, "package_sha256": pkg.sha256, "name": pkg.name, "changed": False,
                    "model_version": version}
        p = Pointer(slot, pkg.sha256, self._next_generation(cur),
                    cur.slot if cur and cur.slot != slot else (cur.previous if cur else None), _utc())
        try:                                              # the mark first: a kill after it refuses older uploads
            self._raise_hwm(version)                      # a little early, never one too many
        except OSError as e:
            raise self._io_error(e, f"recording model_version {version}") from None
        try:
            self._write_pointer(p, progress)
        except OSError as e:
            raise self._io_error(e, f"switching to slot {slot}") from None
        try:                                              # after the pointer: a switch killed before it never
            self._write_marker(slot, pkg.sha256, p.generation, version)     # counts as an activation
        except OSError as e:                              # the valid pointer still says it; logged
            self.journal("model_switch", f"slot {slot}: activation record not written ({e}); the pointer names it")
        code = "model_rollback" if reason != "activate" else "model_switch"
        self.journal(code, f"active slot -> {slot} ({pkg.name} model_version {version}, generation {p.generation}; "
                     f"{reason})", package_sha256=pkg.sha256, model_slot=slot, model_name=pkg.name)
        return {"slot": slot, "package_sha256": pkg.sha256, "name": pkg.name, "changed": True,
                "generation": p.generation, "model_version": version,
                "bist": {k: r.detail for k, r in results.items()}}

    def point_to(self, slot: str, package_sha256: str, reason: str, lock_timeout_s: float = 2.0) -> None:
        """Switch the pointer to a slot its caller has just verified and self-tested (the gate's automatic
        rollback), provided the slot still holds that package."""
        saved, self.lock_timeout_s = self.lock_timeout_s, lock_timeout_s
        try:
            with self:
                have = _sha_file(self.package_path(slot))
                if have != package_sha256:
                    raise ModelIntegrityError(f"slot {slot} no longer holds package {package_sha256[:12]} (now "
                                              f"{have[:12] or 'nothing'}); pointer left as it is")
                cur = self.read_pointer()
                if cur and cur.slot == slot and cur.package_sha256 == package_sha256:
                    return
                p = Pointer(slot, package_sha256, self._next_generation(cur),
                            cur.slot if cur and cur.slot != slot else (cur.previous if cur else None), _utc())
                m = self.read_marker(slot)
                version = m["model_version"] if m and m["package_sha256"] == package_sha256 else 0
                self._write_pointer(p)
                self._write_marker(slot, package_sha256, p.generation, version)
                self.journal("model_rollback", f"active slot -> {slot} (generation {p.generation}): {reason}"[:2000],
                             package_sha256=package_sha256, model_slot=slot)
        finally:
            self.lock_timeout_s = saved

    def rollback(self, progress=None, reason: str = "manual rollback") -> dict:
        """Switch back to the other slot (the previous model), verified and self-tested first."""
        cur = self.read_pointer()
        if cur is None:
            raise ModelMissingError(f"model store {self.root} has no active pointer: nothing to roll back from")
        return self.activate(_other(cur.slot), progress, reason=reason)

    def resolve_active(self) -> list[str]:
        """Slots for a gate to try, best first: the valid pointer's slot (modelsource.SlotSource then refuses
        it unless it still holds the package the pointer names), then runnable()."""
        p = self.read_pointer()
        run = self.runnable()
        return [p.slot] + run if p is not None and p.slot not in run else run

    def runnable(self) -> list[str]:
        """Slots holding a package a gate may run, best first: the pointer's slot while it holds the package
        the pointer names, then any slot holding the package it was last activated with, highest generation
        first. Without a valid pointer that is the highest *activated* generation; a staged package (installed,
        never activated) never appears."""
        p = self.read_pointer()
        have = {s: _sha_file(self.package_path(s)) for s in SLOTS}
        out = [p.slot] if p is not None and have[p.slot] == p.package_sha256 else []
        marks = {s: self.read_marker(s) for s in SLOTS if s not in out}
        rest = [s for s, m in marks.items() if m and have[s] and m["package_sha256"] == have[s]]
        return out + sorted(rest, key=lambda s: -marks[s]["generation"])

    def status(self, verify: bool = False) -> dict:
        p = self.read_pointer()
        runnable = self.runnable()
        out = {"store": str(self.root), "active": p.slot if p else None,
               "generation": p.generation if p else None, "previous": p.previous if p else None,
               "pointer": "ok" if p else ("damaged" if self.pointer_path.exists() else "none"),
               "version_hwm": self.version_hwm(), "runs": runnable[0] if runnable else None, "slots": {}}
        for s in SLOTS:
            f = self.package_path(s)
            info = {"present": f.is_file()}
            if f.is_file():
                info["bytes"] = f.stat().st_size
                try:
                    pkg = open_package(f, self.key, self.max_bytes)
                    info.update(name=pkg.name, package_sha256=pkg.sha256, signature="ok",
                                artifacts=sorted(pkg.artifacts), created_utc=pkg.header.get("created_utc"),
                                model_version=package_version(pkg), activated=self.activated(s, pkg.sha256))
                    if verify:
                        _, res = self.verify_slot(s)
                        info["bist"] = {k: r.detail for k, r in res.items()}
                except ModelError as e:
                    info.update(signature="FAILED", error=str(e)[:300])
            out["slots"][s] = info
        return out


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_bounded(path, max_bytes) -> bytes:
    from .model import read_regular_file

    return read_regular_file(Path(path), max_bytes, "model package")


def _sha_file(path) -> str:
    try:
        return hashlib.sha256(_read_bounded(path, DEFAULT_MAX_PACKAGE_BYTES * 4)).hexdigest()
    except ModelError:
        return ""


__all__ = ["DowngradeError", "ShadowHeldError", "FLIGHT_ARTIFACTS", "ModelStore", "Pointer", "SLOTS", "StoreBusyError", "StoreFullError",
           "StoreIOError", "StoreUnusableError"]
