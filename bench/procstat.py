"""Memory of the running process, as the bench's child processes report it."""
from __future__ import annotations


def proc_status_mib(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    across exec, so a child would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{field} not in /proc/self/status")
