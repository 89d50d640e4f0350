"""Crash-safe file writes: a crash leaves the old file or the new one, never a mix.

Its own module because the package format (flight.package), the A/B store (flight.slots), model stamping
(flight.modelmeta) and shadow records (flight.shadow) all write this way, and none of them should import
another just for it (that made import circles). `progress(phase)` is called at each step so tests and the
HIL kill points can stop a write at a chosen phase.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_synced(tmp: Path, data: bytes, progress=None) -> None:
    """Write data to tmp (created or truncated) and fsync it. On any OSError (ENOSPC, EIO...) tmp is removed
    before the error propagates: a failed write leaves no file behind."""
    step = progress or (lambda phase: None)
    step("write_tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view, done = memoryview(data), 0
            while done < len(data):
                done += os.write(fd, view[done:done + (1 << 16)])
                if done < len(data):
                    step("write_tmp_partial")
            step("fsync_tmp")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def commit_rename(tmp: Path, path: Path, progress=None) -> None:
    """Rename tmp over path and fsync the directory (the crash-safe second half of write_atomic)."""
    step = progress or (lambda phase: None)
    step("rename")
    os.replace(tmp, path)
    step("fsync_dir")
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    step("written")


def write_atomic(path: Path, data: bytes, progress=None) -> None:
    """Write data to path so that a crash leaves the old file or the new one: write a temporary file in
    the same directory, fsync it, rename it over path, fsync the directory. A failed write removes the
    temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data, progress)
    commit_rename(tmp, path, progress)
