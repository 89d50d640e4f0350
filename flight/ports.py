"""The gate's ports (F Prime style: every dependency on the outside world enters through one, at
construction). Defaults are the real thing; HIL and tests plug their own in.

    CloudGate(config, clock=SystemClock(), backend_factory=open_backend, log_sink=None)

clock            Clock: monotonic() for deadlines and latency, perf_counter() for the runtime share,
                 monotonic_ns() and wall() (UTC seconds) for the decision log's timestamps.
backend_factory  BackendFactory: (model path, verified model bytes, backend kind, threads, tile, n_bands)
                 -> Backend; called at start-up and again when a scrub reloads the model.
log_sink         LogSink: append(record) -> seq, close(); default: a DecisionLog on config.log.path
                 (with the gate's clock), or none when no path is configured.

DecisionLog has one port of its own, io (LogIO: write(fd, data) -> bytes written, fsync(fd)); default
flight.decisionlog.OsLogIO (os.write, os.fsync). HIL's hil.killpoints.KillLogIO dies inside append with it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

from .backends import Backend


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def monotonic_ns(self) -> int: ...

    def perf_counter(self) -> float: ...

    def wall(self) -> float:
        """UTC seconds since the epoch (may jump)."""


class SystemClock:
    """The host's clocks."""

    monotonic = staticmethod(time.monotonic)
    monotonic_ns = staticmethod(time.monotonic_ns)
    perf_counter = staticmethod(time.perf_counter)
    wall = staticmethod(time.time)


class LogSink(Protocol):
    def append(self, record: dict) -> int:
        """Write one record; return its sequence number, or raise (the gate counts it and says so)."""

    def close(self) -> None: ...


BackendFactory = Callable[[Path, bytes, str, int, int, int], Backend]


class LogIO(Protocol):
    def write(self, fd: int, data) -> int:
        """os.write semantics: may write fewer bytes than given, or raise OSError."""

    def fsync(self, fd: int) -> None: ...
