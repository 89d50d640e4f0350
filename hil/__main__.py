"""python -m hil run --board BOARD --stream STREAM --out DIR [--faults SPEC] [--frames N] [--realtime]
   python -m hil update --board B [--board B2] [--backend litert|onnxruntime ...] --updates N --out DIR
   python -m hil boards
   python -m hil arm-setup | arm-check"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_decisions(out: Path, limit: int = 60) -> None:
    from flight.logsummary import action_text, safe_text

    from .report import frame_check, frame_why

    frames = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines() if x.strip()]
    frames = [f for f in frames if "action" in f]
    # "check": the action against the stream's label (KNOWN MISS = a tracked model miss); "rule" and "why":
    # what decided the action; "injected" = fault classes the harness injected into the frame; "gate fault"
    # = the gate's fault_code for a frame it refused (full text in decisions.jsonl / report.md)
    print(f"{'frame':>5} {'scene':42s} {'action':16s} {'expected':9s} {'check':11s} {'cloud':>6} {'tiles':>7} "
          f"{'host ms':>8} {'rule':18s} {'gate fault':22s} {'injected':20s} why")
    for f in frames[:limit]:
        print(f"{f['frame']:5d} {safe_text(f.get('scene_id') or Path(f['source']).stem):42.42s} {action_text(f):16s} "
              f"{f.get('expected') or '':9s} {frame_check(f) or '-':11s} {f.get('cloud_fraction', 0):6.3f} "
              f"{f.get('tiles', 0):>3}/{f.get('tiles_total', 0):<3} {1e3 * f.get('latency_s', 0):8.1f} "
              f"{f.get('rule') or '-':18s} {f.get('fault_code') or '-':22s} {','.join(f.get('faults', [])) or '-':20s} "
              f"{frame_why(f, 110)}")
    if len(frames) > limit:
        print(f"... {len(frames) - limit} more in {out}/report.md")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["update"]:                       # the in-orbit update campaign (hil/update.py)
        from .update import main as update_main

        return update_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m hil")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="replay a stream on an emulated board; exit 1 on a violated requirement")
    r.add_argument("--board", required=True, help="board name (hil/boards) or profile path; 'all' for every board")
    r.add_argument("--stream", required=True, help="stream manifest .yaml or directory of .npz")
    r.add_argument("--out", required=True)
    r.add_argument("--faults", default=None, help="fault rates, e.g. 'all:0.1' or 'nan_burst:0.2,hard_kill:0.01'")
    r.add_argument("--frames", type=int, default=None, help="frames to replay (cycles the stream)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--realtime", action="store_true", help="pace frames at the board's frame period")
    r.add_argument("--backend", default="litert", choices=["litert", "onnxruntime"])
    r.add_argument("--quiet", action="store_true", help="only the summary: no progress, no line per decision")
    sub.add_parser("update", add_help=False,
                   help="in-orbit model update campaign (signed packages, A/B store, kills mid-update); "
                        "python -m hil update --help for its options")
    sub.add_parser("boards", help="list board profiles")
    a_set = sub.add_parser("arm-setup", help="build the aarch64 QEMU root (cached outside the repo)")
    a_set.add_argument("--root", default=None)
    a_chk = sub.add_parser("arm-check", help="run the gate on real scenes under qemu-aarch64 and compare with x86")
    a_chk.add_argument("--root", default=None)
    a_chk.add_argument("--scenes", type=int, default=3)
    a = ap.parse_args(argv)
    if a.cmd == "boards":
        from .boards import all_boards, load_board

        for b in all_boards():
            x = load_board(b)
            print(f"{x.name:18s} budget {x.gate_budget_mib:5.0f} MiB  {x.effective_gmacs:7.1f} GMAC/s eff.  "
                  f"deadline {x.deadline_s}s  {x.active_w} W")
        return 0
    if a.cmd in ("arm-setup", "arm-check"):
        from . import arm

        return arm.setup(a.root) if a.cmd == "arm-setup" else arm.check(a.root, a.scenes)
    from .boards import ProfileError, all_boards
    from .runner import run_board
    from .streams import StreamError

    boards = all_boards() if a.board == "all" else [a.board]
    ok = True
    reports = []
    for b in boards:
        out = Path(a.out) / b if len(boards) > 1 else Path(a.out)
        try:
            rep = run_board(b, a.stream, out, a.faults, a.seed, a.frames, a.realtime, a.backend, progress=not a.quiet)
        except (ProfileError, StreamError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not a.quiet:
            _print_decisions(out)
        print(f"{rep['board']}: {'PASS' if rep['passed'] else 'FAIL'}  frames {rep['frames_processed']}  actions {rep['actions']}  "
              f"faults {rep['faults_injected']}  host p95 {1e3 * (rep['host_measured_latency_s']['p95'] or 0):.1f} ms  "
              f"emulated p95 {1e3 * (rep['emulated_board_latency_s']['p95'] or 0):.1f} ms  -> {out}/report.md")
        for q in rep["requirements"]:
            if not q["passed"]:
                print(f"  FAILED: {q['requirement']}: {q['detail']}")
        ok &= rep["passed"]
        reports.append((rep, out))
    if len(reports) > 1:
        from .report import combined_table

        table = combined_table(reports)
        (Path(a.out) / "report.md").write_text(table + "\n")
        print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
