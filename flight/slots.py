"""A/B model store on disk: two slots and an atomically switched active pointer.

    STORE/slots/a/package.cgpkg     a signed package (flight.package)
    STORE/slots/b/package.cgpkg
    STORE/active                    {"slot", "package_sha256", "generation", "previous", "utc", "check"}
    STORE/lock                      flock: one installer / switcher at a time
    STORE/journal.jsonl             install / switch / rollback / self-test events (decision-log format,
                                    flight.logschema event records)

install(package): verify the upload (signature first), write it into the standby slot (never the active
one) with write + fsync + rename + fsync(dir), read it back from the slot and verify it again there:
signature, card <-> model consistency and the known-answer self-test on every backend it carries
golden results for and this board can run. activate(slot): verify + self-test the slot again, then
switch the pointer the same way (write active.tmp, fsync, rename over active, fsync the directory). A
kill -9 or power loss at any point leaves the previous pointer or the new one, and a pointer is only
ever written to a slot that verified a moment before: the active model is always a verified one.
A missing or damaged pointer (the "check" field is its own sha256) falls back to the slot that
verifies with the highest generation.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError, ModelIntegrityError, ModelMissingError
from .package import DEFAULT_MAX_PACKAGE_BYTES, FLIGHT_ARTIFACTS, Package, open_package, write_atomic

SLOTS = ("a", "b")
PACKAGE_NAME = "package.cgpkg"
MAX_POINTER_BYTES = 4096


class StoreBusyError(ModelError):
    code = "store_busy"


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
                 backends: tuple[str, ...] | None = None, threads: int = 1, lock_timeout_s: float = 10.0):
        self.root = Path(root)
        self.key, self.max_bytes, self.backends, self.threads = key, max_bytes, backends, threads
        self.lock_timeout_s = lock_timeout_s
        self._lock_fh = None

    # ------------------------------------------------------------ layout
    def package_path(self, slot: str) -> Path:
        return self.root / "slots" / slot / PACKAGE_NAME

    @property
    def pointer_path(self) -> Path:
        return self.root / "active"

    def ensure(self) -> None:
        for s in SLOTS:
            (self.root / "slots" / s).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ lock and journal
    def __enter__(self):
        self.ensure()
        fh = open(self.root / "lock", "ab")
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
        from .backends import open_backend
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
            lm = open_loaded(src, kind, open_backend, self.threads, pkg.card.tile)
            results[kind] = lm.bist
            del lm
        return pkg, results

    # ------------------------------------------------------------ operations
    def active_slot(self) -> str | None:
        p = self.read_pointer()
        return p.slot if p else None

    def standby_slot(self) -> str:
        """The slot install writes: never the active one (nor, without a valid pointer, the slot a gate
        would fall back to)."""
        order = self.resolve_active()
        a = order[0] if order else None
        return "b" if a == "a" else "a"

    def install(self, upload: str | Path, progress=None) -> dict:
        """Verify an uploaded package and write it into the standby slot (self-tested there). Does not
        switch. Returns {slot, package_sha256, name, bist: {kind: detail}, seconds}."""
        t0 = time.perf_counter()
        step = progress or (lambda phase: None)
        with self:
            step("verify_upload")
            try:
                pkg = open_package(upload, self.key, self.max_bytes)   # signature before touching the disk
            except ModelError as e:
                self.journal("model_install_refused", str(e)[:1000], package_sha256=_sha_file(upload))
                raise
            slot = self.standby_slot()
            dest = self.package_path(slot)
            data = _read_bounded(upload, self.max_bytes)
            if hashlib.sha256(data).hexdigest() != pkg.sha256:
                raise ModelIntegrityError(f"upload {upload} changed while it was being installed; retry")
            step("write_slot")
            dest.unlink(missing_ok=True)                  # the standby slot no longer holds a usable model
            write_atomic(dest, data, progress)
            step("verify_slot")
            try:
                pkg, results = self.verify_slot(slot)
            except ModelError as e:
                dest.unlink(missing_ok=True)
                self.journal("model_install_refused", f"slot {slot}: {e}"[:1000], package_sha256=pkg.sha256,
                             model_slot=slot, model_name=pkg.name)
                raise
            step("installed")
            out = {"slot": slot, "package_sha256": pkg.sha256, "name": pkg.name, "size": pkg.size,
                   "bist": {k: r.detail for k, r in results.items()},
                   "bist_s": {k: round(r.seconds, 4) for k, r in results.items()},
                   "seconds": round(time.perf_counter() - t0, 4)}
            self.journal("model_install", f"{pkg.name} installed in slot {slot} ({pkg.size} bytes), self-test "
                         f"passed on {', '.join(results)}", package_sha256=pkg.sha256, model_slot=slot,
                         model_name=pkg.name, duration_s=out["seconds"])
            return out

    def activate(self, slot: str | None = None, progress=None, reason: str = "activate") -> dict:
        """Verify + self-test slot (default: the standby slot), then switch the active pointer to it."""
        step = progress or (lambda phase: None)
        with self:
            cur = self.read_pointer()
            slot = slot or ("b" if cur and cur.slot == "a" else "a")
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
            if cur and cur.slot == slot and cur.package_sha256 == pkg.sha256:
                return {"slot": slot, "package_sha256": pkg.sha256, "name": pkg.name, "changed": False}
            p = Pointer(slot, pkg.sha256, (cur.generation + 1) if cur else 1,
                        cur.slot if cur and cur.slot != slot else (cur.previous if cur else None), _utc())
            self._write_pointer(p, progress)
            code = "model_rollback" if reason != "activate" else "model_switch"
            self.journal(code, f"active slot -> {slot} ({pkg.name}, generation {p.generation}; {reason})",
                         package_sha256=pkg.sha256, model_slot=slot, model_name=pkg.name)
            return {"slot": slot, "package_sha256": pkg.sha256, "name": pkg.name, "changed": True,
                    "generation": p.generation, "bist": {k: r.detail for k, r in results.items()}}

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
                p = Pointer(slot, package_sha256, (cur.generation + 1) if cur else 1,
                            cur.slot if cur and cur.slot != slot else (cur.previous if cur else None), _utc())
                self._write_pointer(p)
                self.journal("model_rollback", f"active slot -> {slot} (generation {p.generation}): {reason}"[:2000],
                             package_sha256=package_sha256, model_slot=slot)
        finally:
            self.lock_timeout_s = saved

    def rollback(self, progress=None, reason: str = "manual rollback") -> dict:
        """Switch back to the other slot (the previous model), verified and self-tested first."""
        cur = self.read_pointer()
        if cur is None:
            raise ModelMissingError(f"model store {self.root} has no active pointer: nothing to roll back from")
        other = "b" if cur.slot == "a" else "a"
        return self.activate(other, progress, reason=reason)

    def resolve_active(self) -> list[str]:
        """Slots to try, best first: the pointer's slot, then the other one; without a (valid) pointer,
        the slots holding a package, most recently written first."""
        p = self.read_pointer()
        if p is not None:
            return [p.slot, "b" if p.slot == "a" else "a"]
        have = [s for s in SLOTS if self.package_path(s).is_file()]
        return sorted(have, key=lambda s: -self.package_path(s).stat().st_mtime_ns)

    def status(self, verify: bool = False) -> dict:
        p = self.read_pointer()
        out = {"store": str(self.root), "active": p.slot if p else None,
               "generation": p.generation if p else None, "previous": p.previous if p else None,
               "pointer": "ok" if p else ("damaged" if self.pointer_path.exists() else "none"), "slots": {}}
        for s in SLOTS:
            f = self.package_path(s)
            info = {"present": f.is_file()}
            if f.is_file():
                info["bytes"] = f.stat().st_size
                try:
                    pkg = open_package(f, self.key, self.max_bytes)
                    info.update(name=pkg.name, package_sha256=pkg.sha256, signature="ok",
                                artifacts=sorted(pkg.artifacts), created_utc=pkg.header.get("created_utc"))
                    if verify:
                        _, res = self.verify_slot(s)
                        info["bist"] = {k: r.detail for k, r in res.items()}
                except ModelError as e:
                    info.update(signature="FAILED", error=str(e)[:300])
            out["slots"][s] = info
        return out


def _read_bounded(path, max_bytes) -> bytes:
    from .model import read_regular_file

    return read_regular_file(Path(path), max_bytes, "model package")


def _sha_file(path) -> str:
    try:
        return hashlib.sha256(_read_bounded(path, DEFAULT_MAX_PACKAGE_BYTES * 4)).hexdigest()
    except ModelError:
        return ""


__all__ = ["FLIGHT_ARTIFACTS", "ModelStore", "Pointer", "SLOTS", "StoreBusyError"]
