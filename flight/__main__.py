"""python -m flight run SCENE... [--model M] [--config C] [--log FILE]
   python -m flight log summary FILE [--action A] [--reason R] [--limit N] [--png OUT.png]
   python -m flight log schema            (docs/decision-log.md, from flight.logschema)

Exit status: 0 done; 1 some input could not be read; 2 nothing to do (missing/unreadable file, empty or
missing directory, bad config or model)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .policy import ACTIONS, RULES


def _run(a) -> int:
    from . import CloudGate, CloudGateError, config_from_dict, load_config
    from .scenefile import read_npz_scene

    try:
        if a.config:
            cfg = load_config(a.config)
        else:
            cfg = config_from_dict({})
        from dataclasses import replace

        if a.model:
            cfg = replace(cfg, model=a.model)
        if a.backend:
            cfg = replace(cfg, backend=a.backend)
        if a.log:
            cfg = replace(cfg, log=replace(cfg.log, path=a.log))
        gate = CloudGate(cfg)
    except CloudGateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# model {gate.card.name} ({gate.backend.name}, sha256 {gate.card.sha256_of_loaded[:12]}) "
          f"policy {cfg.policy.version}", flush=True)
    paths = []
    for s in a.scenes:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("**/*.npz"))
            if not found:
                print(f"error: directory {p} holds no .npz scene files", file=sys.stderr)
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            print(f"error: scene {p} not found", file=sys.stderr)
    if not paths:
        gate.close()
        print("error: no scene files to gate", file=sys.stderr)
        return 2
    unreadable = 0
    with gate:
        for p in paths:
            try:
                sc = read_npz_scene(p)
            except (OSError, ValueError, KeyError) as e:
                print(f"{p.stem:40s} unreadable: {e}", flush=True)
                unreadable += 1
                continue
            d = gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], valid_mask=sc["valid_mask"],
                             radiometry=sc["radiometry"], priority=a.priority)
            extra = f" fault={d.fault}" if d.fault else ""
            extra += f" degraded={d.degraded_text}" if d.degraded else ""
            extra += f" rule={d.rule}"
            extra += f" partial={len(d.clear_tiles)} clear tiles" if d.partial else ""
            print(f"{d.scene_id:40s} {d.action:9s} cloud={d.cloud_fraction:.3f} valid={d.valid_fraction:.3f} "
                  f"tiles={d.tiles_processed}/{d.tiles_total} bound=[{d.confidence_bound[0]:.2f},{d.confidence_bound[1]:.2f}] "
                  f"{d.latency_s * 1e3:.0f}ms{extra}", flush=True)
    if unreadable:
        print(f"error: {unreadable} of {len(paths)} scene file(s) unreadable", file=sys.stderr)
    return 1 if unreadable else 0


def _summary(a) -> int:
    from .logsummary import summarize

    p = Path(a.file)
    if not p.is_file():
        print(f"error: decision log {p} not found (or not a file)", file=sys.stderr)
        return 2
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        print(f"error: decision log {p} is unreadable: {e}", file=sys.stderr)
        return 2
    print(summarize(p, a.png, a.action, a.reason, a.limit))
    return 0


def _schema(a) -> int:
    from .logschema import render_markdown

    print(render_markdown(), end="")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flight")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="gate scene files (.npz) and print one line per decision")
    r.add_argument("scenes", nargs="+", help=".npz scene files or directories")
    r.add_argument("--model", help=".tflite / .onnx / model card (default: shipped default)")
    r.add_argument("--backend", choices=["auto", "litert", "onnxruntime"])
    r.add_argument("--config", help="gate YAML")
    r.add_argument("--log", help="decision log (JSON Lines)")
    r.add_argument("--priority", type=int, default=0)
    lg = sub.add_parser("log", help="decision log tools")
    lsub = lg.add_subparsers(dest="logcmd", required=True)
    s = lsub.add_parser("summary", help="counts per action and rule, data volume, latency, then one line per "
                                         "frame with the rule and reason that decided it")
    s.add_argument("file")
    s.add_argument("--action", choices=ACTIONS, help="list only frames with this action")
    s.add_argument("--reason", help="list only frames decided by this rule (" + ", ".join(RULES) + "), with this "
                                    "fault code, or whose reason contains this text")
    s.add_argument("--limit", type=int, default=50, help="frames listed (0 = all; default 50)")
    s.add_argument("--png", help="write a timeline PNG here (UTC axis, threshold lines, legend)")
    lsub.add_parser("schema", help="print the decision-log schema (docs/decision-log.md)")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        return _run(a)
    return _summary(a) if a.logcmd == "summary" else _schema(a)


if __name__ == "__main__":
    sys.exit(main())
