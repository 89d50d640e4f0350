"""Append-only JSON Lines decision log with a CRC32 per record.

Line format: {"crc32": <int>, "record": {...}} where crc32 = zlib.crc32 of the record serialised with
sorted keys and compact separators. The writer terminates a torn last line left by a crash before it
appends (so a torn record never swallows the next one), resumes the sequence number from the last
intact record, optionally fsyncs, and rotates by size (FILE -> FILE.1 -> ... FILE.<keep>). The reader
reports and skips torn or corrupt lines instead of failing.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DecisionLogError

SCHEMA_VERSION = 1


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_record(record: dict) -> bytes:
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


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    if not raw.endswith(b"\n"):
        return None, "torn record (no line end: writer stopped mid-record)"
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(obj, dict) or "crc32" not in obj or "record" not in obj:
        return None, "missing crc32/record"
    if zlib.crc32(_canonical(obj["record"])) != obj["crc32"]:
        return None, "CRC32 mismatch (corrupt record)"
    return obj["record"], None


def read_log(path: str | Path, include_rotated: bool = True) -> LogReadResult:
    """All intact records, oldest first (rotated files FILE.N … FILE.1 before FILE)."""
    path = Path(path)
    files = []
    if include_rotated:
        rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        files += [p for p in rotated if p.suffix[1:].isdigit()]
    files.append(path)
    out = LogReadResult()
    for f in files:
        if not f.exists():
            continue
        with open(f, "rb") as fh:
            for i, raw in enumerate(fh, 1):
                if raw.strip() == b"":
                    continue
                rec, problem = _parse_line(raw)
                if problem:
                    out.problems.append(LogProblem(str(f), i, problem))
                else:
                    out.records.append(rec)
    return out


def _last_seq(path: Path) -> int:
    for f in (path, path.with_name(path.name + ".1")):
        if not f.exists() or f.stat().st_size == 0:
            continue
        with open(f, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 65536))
            tail = fh.read().split(b"\n")
        for raw in reversed(tail):
            rec, problem = _parse_line(raw + b"\n")
            if rec is not None and isinstance(rec.get("seq"), int):
                return rec["seq"]
    return -1


class DecisionLog:
    """Writer. fsync: "every" (after each record), "never", or an int N (every N records)."""

    def __init__(self, path: str | Path, fsync="every", max_bytes: int = 16 << 20, keep: int = 5):
        self.path = Path(path)
        self.fsync = fsync
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self._since_sync = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._seq = _last_seq(self.path) + 1
            self._fh = open(self.path, "ab", buffering=0)
            self._terminate_torn_tail()
        except OSError as e:
            raise DecisionLogError(f"cannot open decision log {self.path}: {e}; check the directory exists and is writable") from e

    def _terminate_torn_tail(self) -> None:
        size = self._fh.seek(0, os.SEEK_END)
        if size:
            with open(self.path, "rb") as r:
                r.seek(size - 1)
                if r.read(1) != b"\n":
                    self._fh.write(b"\n")

    @property
    def next_seq(self) -> int:
        return self._seq

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._fh = open(self.path, "ab", buffering=0)

    def append(self, record: dict) -> int:
        """Write one record (the schema fields are added here); returns its sequence number."""
        seq = self._seq
        full = {"schema": SCHEMA_VERSION, "seq": seq,
                "utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e3) % 1000:03d}Z",
                "mono_ns": time.monotonic_ns(), **record}
        line = encode_record(full)
        if self.max_bytes and self._fh.tell() and self._fh.tell() + len(line) > self.max_bytes:
            self._rotate()
        self._fh.write(line)  # one write() of the whole line: a crash leaves at most one torn line
        self._since_sync += 1
        if self.fsync == "every" or (isinstance(self.fsync, int) and self._since_sync >= self.fsync):
            os.fsync(self._fh.fileno())
            self._since_sync = 0
        self._seq += 1
        return seq

    def close(self) -> None:
        if not self._fh.closed:
            if self.fsync != "never":
                os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
