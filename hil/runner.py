"""Parent side of a HIL run: plans faults, runs the gate in a child process under the board's limits,
watches it (deadline watchdog, hard kills, restarts), then scores the run against its requirements."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .boards import Board, load_board
from .faults import parse_rates, plan
from .paths import REPO
from .streams import load_stream, missing_real_scenes


class _Tail:
    """frames.jsonl read incrementally (a 10 000-frame soak must not re-parse the file every poll)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.frames, self.markers, self._part = path, 0, [], [], b""

    def poll(self) -> int:
        """Parse what was appended since the last poll; returns the number of new frame records."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        lines = (self._part + data).split(b"\n")
        self._part = lines.pop()
        n = 0
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue                      # a line torn by a kill
            if "marker" in r:
                self.markers.append(r)
            else:
                self.frames.append(r)
                n += 1
        return n


def run_board(board: Board | str, stream: str, out: Path, faults: str | None = None, seed: int = 0,
              frames: int | None = None, realtime: bool = False, backend: str = "litert", model: str | None = None,
              progress: bool = True, watchdog_factor: float = 20.0) -> dict:
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be a positive count (got {frames!r}); omit it to replay the stream once")
    board = load_board(board) if isinstance(board, str) else board
    name, items = load_stream(stream)
    missing = missing_real_scenes(items)
    if missing:
        raise FileNotFoundError(f"stream {name}: real scene(s) not found: {missing[:3]} (is ../shared/data/real present?)")
    n = len(items) if frames is None else frames
    rates = parse_rates(faults)
    schedule = plan(n, rates, seed)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("frames.jsonl", "decisions.jsonl"):
        (out / f).unlink(missing_ok=True)
    for f in out.glob("decisions.jsonl.*"):
        f.unlink()
    for f in out.glob("vanished/*.jsonl"):
        f.unlink()
    from flight.model import default_card, load_card

    card = load_card(Path(model) if model and model.endswith(".yaml") else default_card())
    max_frame_mib = 0.0
    for it in items:
        if it.path:
            max_frame_mib = max(max_frame_mib, Path(it.path).stat().st_size / 2**20)
        else:
            max_frame_mib = max(max_frame_mib, int(it.generate.get("size", 512)) ** 2 * 16 / 2**20)
    job = {"out": str(out), "threads": min(board.threads, os.cpu_count() or 1), "backend": backend, "model": model,
           "deadline_s": board.deadline_s, "budget_mib": board.gate_budget_mib,
           "frame_headroom_mib": 64 + 6 * max_frame_mib,  # frame buffers belong to the payload, not the gate
           "items": [asdict(it) for it in items], "plan": schedule, "seed": seed, "period_s": board.period_s,
           "realtime": realtime, "macs_per_pixel": float(card.raw["macs_per_pixel"]),
           # seu_weights: self-test before every frame, so an upset is caught before it gates a frame
           "bist_every": 1 if rates.get("seu_weights") else 50}
    (out / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # a fixed glibc mmap threshold: frame-sized buffers (the payload's scene copies) go back to the OS when
    # freed, so RSS between frames shows what the loop keeps, not the allocator's sliding threshold
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    events = {"hard_kills": 0, "restarts": 0, "watchdog_kills": 0, "child_crashes": 0, "kill_sites": {}}
    start = 0
    watchdog_s = max(board.deadline_s * watchdog_factor, 60.0)
    t_run = time.monotonic()
    tail = _Tail(out / "frames.jsonl")
    while start < n:
        with open(out / "child.stderr", "a") as err:           # the child holds its own descriptor
            proc = subprocess.Popen([sys.executable, "-m", "hil.child", "--job", str(out / "job.json"), "--start",
                                     str(start)], cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=err)
        last_progress = time.monotonic()
        watchdog_at = None
        while proc.poll() is None:
            time.sleep(0.05)
            if tail.poll():
                last_progress = time.monotonic()
                if progress:
                    done = len(tail.frames)
                    if sys.stderr.isatty() or done % max(1, n // 10) == 0:
                        print(f"\r[{board.name}] {name}: frame {done}/{n}", end="" if sys.stderr.isatty() else "\n",
                              file=sys.stderr, flush=True)
            if time.monotonic() - last_progress > watchdog_s:
                proc.kill()
                proc.wait()
                events["watchdog_kills"] += 1
                tail.poll()
                watchdog_at = max([r["frame"] for r in tail.frames], default=start - 1) + 1
                break
        tail.poll()
        last = max([r["frame"] for r in tail.frames if r["frame"] >= start], default=start - 1)
        # a hard kill is the child's own SIGKILL at an armed kill point (hil.killpoints), announced by a marker
        kill = next((m for m in reversed(tail.markers) if m.get("marker") == "hard_kill" and m.get("pid") == proc.pid),
                    None)
        if watchdog_at is not None:
            start = max(watchdog_at, last + 1)
            events["restarts"] += 1
        elif kill is not None and proc.returncode == -signal.SIGKILL:
            events["hard_kills"] += 1
            events["kill_sites"][kill["site"]] = events["kill_sites"].get(kill["site"], 0) + 1
            events["restarts"] += 1
            start = max(kill["frame"], last) + 1      # the killed frame is lost (its record may be logged, unacked)
        elif proc.returncode != 0:
            events["child_crashes"] += 1
            events["restarts"] += 1
            start = last + 2                  # skip the frame that killed it
        else:
            start = n
    if progress:
        print(file=sys.stderr)
    from .report import build_report

    return build_report(board, name, out, n, events, rates, seed, time.monotonic() - t_run, backend)
