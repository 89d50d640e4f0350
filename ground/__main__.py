"""python -m ground {distill,export,evaluate,make-models} ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ground", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distill", help="train the KD student and the no-KD baseline from one YAML experiment")
    d.add_argument("--config", required=True)
    d.add_argument("--out", default=None, help="run directory root (default: runs/)")
    e = sub.add_parser("export", help="ONNX fp32 + INT8 ONNX + INT8 TFLite + model card from a trained student")
    e.add_argument("--student", required=True, help="runs/<exp>/kd/student.pt")
    e.add_argument("--baseline", default=None, help="runs/<exp>/baseline/student.pt (scored in the card)")
    e.add_argument("--config", required=True)
    e.add_argument("--out", default="models")
    e.add_argument("--default", action="store_true", help="mark this model as the flight default")
    v = sub.add_parser("evaluate", help="per-scene table: teacher, KD student, baseline, fp32 and INT8")
    v.add_argument("--model", required=True, help="model card YAML (models/<name>.yaml)")
    v.add_argument("--scenes", default=None, help="directory of .npz scenes (default ../shared/data/real)")
    v.add_argument("--out", default=None, help="write masks PNG + table here")
    m = sub.add_parser("make-models", help="regenerate models/ from scratch: distill + export + evaluate")
    m.add_argument("--config", default=str(Path(__file__).parent / "configs" / "kd_multi_teacher.yaml"))
    m.add_argument("--out", default="models")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "distill":
            from .distill import load_config, run_experiment

            print(run_experiment(load_config(a.config), Path(a.out) if a.out else None))
        elif a.cmd == "export":
            from .export import export_all

            print(export_all(a.student, a.config, Path(a.out), baseline=a.baseline, default=a.default))
        elif a.cmd == "evaluate":
            from .evaluate import evaluate_cli

            evaluate_cli(a.model, a.scenes, a.out)
        elif a.cmd == "make-models":
            from .distill import load_config, run_experiment
            from .export import export_all

            cfg = load_config(a.config)
            res = run_experiment(cfg)
            print(export_all(res["kd"], a.config, Path(a.out), baseline=res.get("baseline"), default=True))
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
