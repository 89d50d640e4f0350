"""Append-only JSON Lines decision log with a CRC32 per record.

Line format: {"crc32": <int>, "record": {...}} where crc32 = zlib.crc32 of the record serialised with
sorted keys and compact separators. The writer terminates a torn last line left by a crash before it
appends (so a torn record never swallows the next one), resumes the sequence number from the last
intact record, optionally fsyncs, and rotates by size (FILE -> FILE.1 -> ... FILE.<keep>). The reader
reports and skips torn, corrupt or schema-violating lines instead of failing.

One writer per log: the writer holds an exclusive flock on FILE.lock; a second writer (another process,
or another DecisionLog in this one) gets DecisionLogBusyError. A record is acknowledged (its seq
returned) only once the whole line is written (and fsynced, per policy); a write that fails part-way is
truncated back to the last whole record before anything else is appended. A log file deleted or replaced
under the writer is detected (inode check before each append) and recreated; the first record in the new
file carries "log_recreated": true.

The high-water seq (the last acknowledged seq) is also kept in FILE.lock, in two CRC-checked slots written
alternately (a torn slot leaves the other one), before the seq is returned: a restart resumes after
max(last intact record of FILE / FILE.1, high-water mark), so seq never goes back even when FILE vanished
(or was cut) while no writer ran. Delete FILE.lock with the log to start numbering again.

The writer's file I/O goes through an io port (flight.ports.LogIO: write(fd, data) -> int, fsync(fd));
the default is the os module's. HIL plugs in one that dies at a chosen point inside append.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .config import FsyncMode
from .errors import DecisionLogBusyError, DecisionLogError
from .logschema import MAX_ID_CHARS, SCHEMA_VERSION, upgrade, validate_record  # noqa: F401 (MAX_ID_CHARS re-exported)
from .ports import Clock, LogIO, SystemClock

MAX_RECORD_BYTES = 256 << 10     # a longer line is refused by the writer and skipped by the reader
_CHUNK = 65536
_HWM_TAG = b"cloudgate-log-seq "
_HWM_SLOT = len(_HWM_TAG) + 20 + 1 + 8 + 1        # b"cloudgate-log-seq %020d %08x\n"


class OsLogIO:
    """The default io port of DecisionLog: the os module's write and fsync (looked up per call)."""

    def write(self, fd: int, data) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)


def _hwm_slot(seq: int) -> bytes:
    body = _HWM_TAG + b"%020d" % seq
    return body + b" %08x\n" % zlib.crc32(body)


def _read_hwm(fd: int) -> int:
    """The high-water seq kept in the lock file (the larger valid slot), -1 if none. Never raises."""
    best = -1
    for k in (0, 1):
        try:
            raw = os.pread(fd, _HWM_SLOT, k * _HWM_SLOT)
        except OSError:
            continue
        if len(raw) != _HWM_SLOT or not raw.startswith(_HWM_TAG) or not raw.endswith(b"\n"):
            continue
        body, _, crc = raw[:-1].rpartition(b" ")
        try:
            if int(crc, 16) == zlib.crc32(body):
                best = max(best, int(body[len(_HWM_TAG):]))
        except ValueError:
            continue
    return best


def _canonical(record) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_record(record) -> bytes:
    body = _canonical(record)
    return b'{"crc32":%d,"record":%s}\n' % (zlib.crc32(body), body)


@dataclass
class LogProblem:
    file: str
    line: int
    reason: str


@dataclass
class LogReadResult:
    records: list[dict] = field(default_factory=list)
    problems: list[LogProblem] = field(default_factory=list)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for an intact, schema-valid line; (None, reason) otherwise. Never raises."""
    if not raw.endswith(b"\n"):
        return None, "torn record (no line end: writer stopped mid-record)"
    if len(raw) > MAX_RECORD_BYTES + 64:
        return None, f"line of {len(raw)} bytes exceeds the record limit {MAX_RECORD_BYTES}"
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    except ValueError:                                   # includes UnicodeDecodeError and NaN/Infinity
        return None, "not valid JSON"
    if not isinstance(obj, dict) or "crc32" not in obj or "record" not in obj:
        return None, "missing crc32/record"
    crc = obj["crc32"]
    if not isinstance(crc, int) or isinstance(crc, bool):
        return None, "crc32 is not an integer"
    try:
        body = _canonical(obj["record"])
    except (ValueError, TypeError, RecursionError):
        return None, "record cannot be serialised canonically"
    if zlib.crc32(body) != crc:
        return None, "CRC32 mismatch (corrupt record)"
    problem = validate_record(obj["record"])
    if problem:
        return None, f"schema: {problem}"
    return obj["record"], None


def read_log(path: str | Path, include_rotated: bool = True) -> LogReadResult:
    """All intact records, oldest first (rotated files FILE.N … FILE.1 before FILE), upgraded to the
    current schema (flight.logschema.upgrade). A missing FILE yields no records; the caller decides
    whether that is an error."""
    path = Path(path)
    files = []
    if include_rotated:
        rotated = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
        files += sorted(rotated, key=lambda p: -int(p.suffix[1:]))
    files.append(path)
    out = LogReadResult()
    for f in files:
        try:
            fh = open(f, "rb")
        except FileNotFoundError:
            continue
        except OSError as e:
            out.problems.append(LogProblem(str(f), 0, f"cannot open: {e}"))
            continue
        with fh:
            for i, raw in enumerate(fh, 1):
                if raw.strip() == b"":
                    continue
                rec, problem = _parse_line(raw)
                if problem:
                    out.problems.append(LogProblem(str(f), i, problem))
                else:
                    out.records.append(upgrade(rec))
    return out


def _newline_before(fh, pos: int) -> int:
    """Offset of the last b"\n" strictly before pos, or -1."""
    while pos > 0:
        n = min(_CHUNK, pos)
        fh.seek(pos - n)
        k = fh.read(n).rfind(b"\n")
        if k >= 0:
            return pos - n + k
        pos -= n
    return -1


def _last_seq(path: Path) -> int:
    """seq of the last intact record of FILE (or FILE.1 when FILE has none); -1 if none. Walks lines
    backwards from the end, so neither a large last record nor a corrupt tail hides the seq."""
    for f in (path, path.with_name(path.name + ".1")):
        try:
            fh = open(f, "rb")
        except OSError:
            continue
        with fh:
            end = fh.seek(0, os.SEEK_END)
            nl = _newline_before(fh, end)                 # bytes after it (if any) are a torn tail
            while nl >= 0:
                prev = _newline_before(fh, nl)
                if nl - prev <= MAX_RECORD_BYTES + 64:
                    fh.seek(prev + 1)
                    rec, _ = _parse_line(fh.read(nl - prev))
                    if rec is not None:
                        return rec["seq"]
                nl = prev
    return -1


class DecisionLog:
    """Writer. fsync: "every" (after each record), "never", or an int N (every N records). clock: where
    utc and mono_ns come from (flight.ports.Clock; the host's clocks by default)."""

    def __init__(self, path: str | Path, fsync: FsyncMode = "every", max_bytes: int = 16 << 20, keep: int = 5,
                 clock: Clock | None = None, io: LogIO | None = None):
        self.path = Path(path)
        self.clock = clock or SystemClock()
        self._io = io or OsLogIO()
        self.fsync = fsync
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self._since_sync = 0
        self._seq = 0
        self._fh = None
        self._lock = None
        self._dirty = False            # a failed write may have left a partial record after self._size
        self._recreated = False
        self._user_closed = False
        self.recreations = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            self._seq = max(_last_seq(self.path), _read_hwm(self._lock.fileno())) + 1
            self._open()
            self._terminate_torn_tail()
        except DecisionLogError:
            raise
        except OSError as e:
            self.close()
            raise DecisionLogError(f"cannot open decision log {self.path}: {e}; check the directory exists and is writable") from e

    def _take_lock(self) -> None:
        name = self._lock_path = self.path.with_name(self.path.name + ".lock")
        lock = os.fdopen(os.open(name, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)  # not O_APPEND: pwrite slots
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DecisionLogBusyError(
                f"decision log {self.path} is held by another writer (lock {name}); one writer per "
                "log: close the other gate/DecisionLog or give this one its own log path") from None
        replaced = self._lock is not None
        if self._lock is not None and not self._lock.closed:
            self._lock.close()
        self._lock = lock
        st = os.fstat(lock.fileno())
        self._lock_ino = (st.st_dev, st.st_ino)
        if replaced and self._seq > 0:                  # a new lock file: carry the high-water mark over
            self._write_hwm(self._seq - 1, sync=True)

    def _write_hwm(self, seq: int, sync: bool) -> None:
        """Record seq as acknowledged in the lock file (slot seq % 2), before it is returned."""
        fd = self._lock.fileno()
        os.pwrite(fd, _hwm_slot(seq), (seq % 2) * _HWM_SLOT)
        if sync:
            os.fdatasync(fd)

    def _ensure_lock(self) -> None:
        """The lock file deleted or replaced under us would admit a second writer: take it again (or stop)."""
        try:
            st = os.stat(self._lock_path)
            same = (st.st_dev, st.st_ino) == self._lock_ino
        except FileNotFoundError:
            same = False
        if not same:
            self._take_lock()

    def _open(self) -> None:
        self._fh = open(self.path, "ab", buffering=0)
        st = os.fstat(self._fh.fileno())
        self._ino = (st.st_dev, st.st_ino)
        self._size = st.st_size

    def _terminate_torn_tail(self) -> None:
        if self._size:
            with open(self.path, "rb") as r:
                r.seek(self._size - 1)
                if r.read(1) != b"\n":
                    self._write_all(b"\n")
                    self._size += 1

    def _write_all(self, data: bytes) -> None:
        fd, view, done = self._fh.fileno(), memoryview(data), 0
        while done < len(data):                          # bounded: each pass writes >= 1 byte or raises
            n = self._io.write(fd, view[done:])
            if not n:
                raise OSError(f"write() wrote nothing after {done}/{len(data)} bytes")
            done += n

    def _repair(self) -> None:
        """Truncate a partial record left by a failed write back to the last whole record."""
        if self._dirty:
            os.ftruncate(self._fh.fileno(), self._size)
            self._dirty = False

    def _ensure_file(self) -> None:
        """Reopen (recreate) the log if its file was deleted or replaced under us, reopen after a failed
        reopen, and follow a file truncated under us back to its last whole record."""
        if self._fh is None or self._fh.closed:       # an earlier reopen/rotation failed: try again
            self._open()
            self._terminate_torn_tail()
            return
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._ino
        except FileNotFoundError:
            same = False
        if not same:
            self._dirty = False
            old, self._fh = self._fh, None
            old.close()
            self._open()
            self._terminate_torn_tail()
            self._recreated = True
            self.recreations += 1
            return
        real = os.fstat(self._fh.fileno()).st_size
        if real < self._size:                          # truncated under us: cut to its last whole record
            with open(self.path, "rb") as r:
                keep = _newline_before(r, real) + 1
            os.ftruncate(self._fh.fileno(), keep)
            self._size = keep
            self._dirty = False

    def _rotate(self) -> None:
        old, self._fh = self._fh, None                 # a failed rename/open is retried by _ensure_file
        old.close()
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._open()

    def append(self, record: dict) -> int:
        """Write one record (the schema fields are added here); returns its sequence number once the
        whole line is written. Raises DecisionLogError (and consumes no seq) when it is not."""
        if self._user_closed:
            raise DecisionLogError(f"decision log {self.path} is closed")
        seq = self._seq
        wall = self.clock.wall()
        full = {"schema": SCHEMA_VERSION, "seq": seq,
                "utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1e3) % 1000:03d}Z",
                "mono_ns": self.clock.monotonic_ns(), **record}
        problem = validate_record(full)
        if problem:
            raise DecisionLogError(f"record refused by the decision log: {problem}")
        try:
            line = encode_record(full)
        except (TypeError, ValueError, RecursionError) as e:
            raise DecisionLogError(f"record refused by the decision log: not serialisable ({e})") from None
        if len(line) > MAX_RECORD_BYTES:
            raise DecisionLogError(f"record refused by the decision log: {len(line)} bytes is too large "
                                   f"(max {MAX_RECORD_BYTES})")
        try:
            self._ensure_lock()
            self._ensure_file()
            self._repair()
            if self._recreated:
                full["log_recreated"] = True
                line = encode_record(full)
            if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._dirty = True
            self._write_all(line)       # whole line or an exception; a crash leaves at most one torn line
            sync = self.fsync == "every" or (isinstance(self.fsync, int) and self._since_sync + 1 >= self.fsync)
            if sync:
                self._io.fsync(self._fh.fileno())
                self._since_sync = -1
            self._write_hwm(seq, sync)  # the ack point: from here on seq is never handed out again
        except (OSError, MemoryError) as e:
            try:
                if self._fh is not None and not self._fh.closed:
                    self._repair()      # drop the partial record now; retried before the next append
            except OSError:
                pass
            raise DecisionLogError(f"decision log write failed, record seq {seq} not written: {e}") from e
        self._dirty = False
        self._recreated = False
        self._size += len(line)
        self._since_sync += 1
        self._seq += 1
        return seq

    def close(self) -> None:
        self._user_closed = True
        try:
            if self._fh is not None and not self._fh.closed:
                try:
                    if self.fsync != "never":
                        self._io.fsync(self._fh.fileno())
                finally:
                    self._fh.close()
        finally:
            if self._lock is not None and not self._lock.closed:
                self._lock.close()          # releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
