"""Hard kills that land where a kill hurts (issue 9 item 15): inside the tile loop and inside
DecisionLog.append. Before, the harness sent SIGKILL a fixed 60 ms after a marker, which always landed
while the child was still preparing the frame, so no kill ever hit a log write.

For a hard_kill frame the child arms one KillPoint site (drawn from the seeded plan's rng):

  tile_loop            the k-th backend inference of the frame (k in 1..4), through the backend-factory port
  append_mid_line      inside DecisionLog.append, part-way through writing the record line (io port)
  append_before_fsync  the whole line written, before its fsync
  append_after_fsync   fsynced, before the high-water mark and the ack (the record is on disk, never acked)

When the armed site is not reached in the frame (it faulted before its first tile, its log write failed
first, or the frame was dropped) the kill lands right after process() returns (after_process) or before
it (before_process). The point writes a marker line to frames.jsonl ({"marker": "hard_kill", "site", "frame",
"pid"}, pre-encoded, so it works under memory pressure) and SIGKILLs its own process: exactly what an
external SIGKILL arriving at that instruction does. hil.runner counts the kills by site and restarts.
"""
from __future__ import annotations

import json
import os
import signal
import time

from flight.decisionlog import OsLogIO

KILL_SITES = ("tile_loop", "append_mid_line", "append_before_fsync", "append_after_fsync")
FALLBACK_SITES = ("after_process", "before_process")


class KillPoint:
    """One armed kill site per hard_kill frame; every hook is a no-op while disarmed."""

    def __init__(self, marker_fd: int):
        self._fd = marker_fd
        self.site: str | None = None
        self._markers: dict[str, bytes] = {}
        self._infers = 0
        self.infer_at = 1
        self.cut = 0.5                       # share of the line written before append_mid_line fires

    def arm(self, frame: int, site: str, rng) -> None:
        if site not in KILL_SITES + FALLBACK_SITES:
            raise ValueError(f"unknown kill site {site!r}")
        self.site, self._infers = site, 0
        self.infer_at = int(rng.integers(1, 5))
        self.cut = float(rng.uniform(0.02, 0.98))
        pid = os.getpid()
        self._markers = {s: (json.dumps({"frame": frame, "marker": "hard_kill", "site": s, "pid": pid}) + "\n").encode()
                         for s in KILL_SITES + FALLBACK_SITES}

    def disarm(self) -> None:
        self.site = None

    def fire(self, site: str) -> None:
        """Write the marker and die by SIGKILL (never returns)."""
        os.write(self._fd, self._markers[site])
        os.kill(os.getpid(), signal.SIGKILL)
        while True:                          # pragma: no cover - SIGKILL is not deliverable late
            time.sleep(1)

    # --- hooks
    def on_infer(self) -> None:
        if self.site == "tile_loop":
            self._infers += 1
            if self._infers >= self.infer_at:
                self.fire("tile_loop")


class KillLogIO(OsLogIO):
    """DecisionLog's io port (flight.ports.LogIO) with the append kill sites of a KillPoint."""

    def __init__(self, kp: KillPoint):
        self.kp = kp

    def write(self, fd: int, data) -> int:
        if self.kp.site == "append_mid_line" and len(data) > 1:     # a record line (not the 1-byte tail fix)
            k = max(1, min(len(data) - 1, int(len(data) * self.kp.cut)))
            try:
                os.write(fd, data[:k])
            finally:
                self.kp.fire("append_mid_line")
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.kp.site == "append_before_fsync":
            self.kp.fire("append_before_fsync")
        os.fsync(fd)
        if self.kp.site == "append_after_fsync":
            self.kp.fire("append_after_fsync")
