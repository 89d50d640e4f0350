"""python -m flight run SCENE... [--model M] [--config C] [--log FILE]
   python -m flight log summary FILE [--png OUT.png]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
        paths += sorted(p.glob("**/*.npz")) if p.is_dir() else [p]
    with gate:
        for p in paths:
            try:
                sc = read_npz_scene(p)
            except (OSError, ValueError) as e:
                print(f"{p.stem:40s} unreadable: {e}", flush=True)
                continue
            d = gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], valid_mask=sc["valid_mask"],
                             radiometry=sc["radiometry"], priority=a.priority)
            extra = f" fault={d.fault}" if d.fault else ""
            extra += f" degraded={d.degraded}" if d.degraded else ""
            extra += f" partial={len(d.clear_tiles)} clear tiles" if d.partial else ""
            print(f"{d.scene_id:40s} {d.action:9s} cloud={d.cloud_fraction:.3f} valid={d.valid_fraction:.3f} "
                  f"tiles={d.tiles_processed}/{d.tiles_total} bound=[{d.confidence_bound[0]:.2f},{d.confidence_bound[1]:.2f}] "
                  f"{d.latency_s * 1e3:.0f}ms{extra}", flush=True)
    return 0


def _summary(a) -> int:
    from .logsummary import summarize

    print(summarize(a.file, a.png))
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
    s = lsub.add_parser("summary", help="counts per action, data volume saved, latency percentiles")
    s.add_argument("file")
    s.add_argument("--png", help="write a timeline PNG here")
    a = ap.parse_args(argv)
    return _run(a) if a.cmd == "run" else _summary(a)


if __name__ == "__main__":
    sys.exit(main())
