"""python -m ground {pool,distill,export,evaluate,make-models,ablate,split,cv} ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ExperimentConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "real_kd.yaml"


def record_if_shipped(out: dict) -> dict:
    """After an export into models/: the committed CV table names the artifacts that ship."""
    if out.get("ships_with_cv_table"):
        from .cv.report import record_shipped

        record_shipped(Path(out["card"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ground", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pool", help="build (or reuse) the cached real-view pool with both teachers' outputs")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    d = sub.add_parser("distill", help="train the KD student (+ mining rounds) and the no-KD baseline from one YAML")
    d.add_argument("--config", required=True)
    d.add_argument("--out", default=None, help="run directory root (default: runs/)")
    e = sub.add_parser("export", help="ONNX fp32 + INT8 ONNX + INT8 TFLite + model card from a trained student")
    e.add_argument("--student", required=True, help="runs/<exp>/kd*/student.pt")
    e.add_argument("--baseline", default=None, help="runs/<exp>/baseline/student.pt (exported and carded beside it)")
    e.add_argument("--config", required=True)
    e.add_argument("--out", default="models")
    e.add_argument("--default", action="store_true", help="mark this model as the flight default")
    v = sub.add_parser("evaluate", help="score a carded model through CloudGate on the real split (+ teachers, threshold, synthetic apart)")
    v.add_argument("--model", required=True, help="model card YAML (models/<name>.yaml)")
    v.add_argument("--out", default=None, help="write evaluation.md/.yaml + masks PNG here")
    m = sub.add_parser("make-models", help="regenerate models/ from scratch: pool + distill + mining + export + evaluate")
    m.add_argument("--config", default=str(DEFAULT_CONFIG))
    m.add_argument("--out", default="models")
    a = sub.add_parser("ablate", help="KD-method ablation / capacity check through the gate (ground/ablation.py)")
    a.add_argument("--config", default=str(Path(__file__).parent / "configs" / "ablation.yaml"))
    a.add_argument("--only", default=None, help="comma-separated arms (or capacity specs with --capacity)")
    a.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    a.add_argument("--capacity", action="store_true", help="run the capacity specs instead of the KD arms")
    a.add_argument("--report", default=None, help="aggregate finished runs into REPORT.md/.json/_pareto.png")
    s = sub.add_parser("split", help="print the committed split of the real labelled scenes (--draw re-draws it)")
    s.add_argument("--draw", action="store_true")
    from .cv import add_parser as add_cv_parser

    add_cv_parser(sub)
    from .judge import add_parser as add_judge_parser

    b = sub.add_parser("bench-train", help="training throughput: v6's loop and the current one side by side (ground/trainbench.py)")
    b.add_argument("--config", default=str(Path(__file__).parent / "configs" / "judge_base.yaml"))
    b.add_argument("--rounds", type=int, default=4)
    b.add_argument("--steps", type=int, default=15, help="batch-32-equivalent steps per loop per round")
    b.add_argument("--out", default="docs/results/train_throughput", help="output path without suffix")
    b.add_argument("--threads", default="auto", help="torch threads of the current loop: auto (from the load) or N")
    b.add_argument("--fold", type=int, default=None, help="also time one judge fold end to end against v6's CV fold")

    add_judge_parser(sub)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "cv":
            from .cv import main as cv_main

            return cv_main(args)
        if args.cmd == "bench-train":
            from .trainbench import bench_train

            threads = args.threads if args.threads == "auto" else int(args.threads)
            r = bench_train(args.config, rounds=args.rounds, steps_per_round=args.steps, threads=threads, out=Path(args.out))
            if args.fold is not None:
                import json

                from .trainbench import bench_fold

                f = bench_fold(args.config, args.fold)
                r["fold"] = f
                Path(args.out).with_suffix(".json").write_text(json.dumps(r, indent=1))
                with Path(args.out).with_suffix(".md").open("a") as fh:
                    fh.write(f"\nOne CV fold end to end (fold {f['fold']}, same pool): v6's `cv run_one` (worktree of "
                             f"{f.get('rev', 'LEGACY_REV')}, batch 8, 1 200 steps, {f['legacy']['scenes']} labelled files scored) "
                             f"{f['legacy']['wall']:.0f} s (training {f['legacy']['train_seconds']:.0f} s); the judge's "
                             f"`run_one` (batch 32, the same training pixels, {f['current']['scenes']} files scored against "
                             f"labels and the teacher) {f['current']['seconds']:.0f} s (training {f['current']['train_seconds']:.0f} s): "
                             f"**{f['speedup']}×**.\n")
            print(Path(args.out).with_suffix(".md").read_text())
            return 0 if r["speedup"] > 0 else 1
        if args.cmd == "judge":
            from .judge import main as judge_main

            return judge_main(args)
        if args.cmd == "pool":
            from .distill import build_transfer_set, load_config

            ts = build_transfer_set(load_config(args.config))
            print(f"pool {ts['key']}: {len(ts['X'])} views; teacher time {ts['meta']['teacher_seconds']} s when built")
        elif args.cmd == "distill":
            from .distill import load_config, run_experiment

            print(run_experiment(load_config(args.config), Path(args.out) if args.out else None))
        elif args.cmd == "export":
            from .export import export_all

            print(record_if_shipped(export_all(args.student, args.config, Path(args.out), baseline=args.baseline,
                                               default=args.default)))
        elif args.cmd == "evaluate":
            from .evaluate import evaluate_cli

            evaluate_cli(args.model, args.out)
        elif args.cmd == "make-models":
            from .distill import load_config, run_experiment
            from .export import export_all

            cfg = load_config(args.config)
            res = run_experiment(cfg)
            print(record_if_shipped(export_all(res["kd"], args.config, Path(args.out), baseline=res.get("baseline"),
                                               default=True, training={"mining": res.get("mining", [])})))
        elif args.cmd == "ablate":
            from .ablation import load_ablation, report, run_names, run_one

            ab, base = load_ablation(args.config)
            if args.report:
                from flight.model import default_card, load_card

                card = load_card(default_card()).raw   # the teacher's row on the same scenes, as the card scored it
                teacher = card.get("metrics", {}).get("real_evaluation_part", {}).get("teacher_4b")
                try:
                    print(report(ab, Path(args.report), teacher))
                except FileNotFoundError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                return 0
            only = set(args.only.split(",")) if args.only else None
            seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
            for arm, spec, seed in run_names(ab, args.capacity):
                key = spec if args.capacity else arm
                if (only and key not in only) or (seeds is not None and seed not in seeds):
                    continue
                r = run_one(ab, base, arm, spec, seed)
                print(f"{arm} {spec or ''} s{seed}: eval {r['evaluation']}  probe {r['probe_disagreement']}")
        elif args.cmd == "split":
            import yaml

            from .split import SPLIT_FILE, draw_split, load_split

            if args.draw:
                from flight.scenefile import load_npz
                from hil.paths import real_scene_paths

                print(yaml.safe_dump(draw_split([p.stem for p in real_scene_paths() if load_npz(p).labelled])))
            else:
                print(f"{SPLIT_FILE}:\n" + yaml.safe_dump(load_split(), sort_keys=False))
    except KeyboardInterrupt:
        return 130
    except ExperimentConfigError as e:
        print(f"error: experiment config: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        from flight.errors import ConfigError as GateConfigError

        kind = "gate config (flight.CloudGate)" if isinstance(e, GateConfigError) else type(e).__name__
        print(f"error: {kind}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
