"""The generalization judge (issues 23 and 27): cross-validation by place over every shared real acquisition.

    python -m ground judge references                  # the 4-band teacher on every shared file, once (cached)
    python -m ground judge folds [--draw]              # the committed folds (ground/data/judge_folds.yaml)
    python -m ground judge run --stage screening [--only ARM,ARM] [--folds 0,1] [--seeds 0,1]
    python -m ground judge report --stage screening --out docs/results/judge_screening

Rooms: folds.py (which places a run may train on), references.py (the teacher's reading of every file),
runs.py (train, export INT8, score held-out files through CloudGate), report.py (the table and the selection
rule). Configuration: ground/configs/judge.yaml (arms, stage budgets, the selection rule) over its base recipe.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from hil.paths import REPO

JUDGE_CONFIG = REPO / "ground" / "configs" / "judge.yaml"


def load_judge(path: str | Path = JUDGE_CONFIG) -> tuple[dict, dict]:
    from ..distill import load_config
    from ..errors import ExperimentConfigError

    path = Path(path)
    judge = yaml.safe_load(path.read_text())
    for k in ("base_config", "stages", "arms", "selection"):
        if k not in judge:
            raise ExperimentConfigError(f"{path}: missing key {k!r}")
    base = load_config(path.parent / judge["base_config"])
    return judge, base


def add_parser(sub) -> None:
    j = sub.add_parser("judge", help="generalization judge: CV by place over every shared acquisition (ground/judge/)")
    j.add_argument("judge_cmd", choices=("references", "folds", "run", "report"))
    j.add_argument("--config", default=str(JUDGE_CONFIG))
    j.add_argument("--draw", action="store_true", help="folds: re-draw from the files present and the teacher references")
    j.add_argument("--stage", default="screening", help="run/report: a stage of the config (screening, patient)")
    j.add_argument("--only", default=None, help="run: comma-separated arms (default: every arm of the config)")
    j.add_argument("--folds", default=None, help="run: comma-separated fold indices")
    j.add_argument("--seeds", default=None, help="run: comma-separated seeds (default: the stage's)")
    j.add_argument("--out", default=None, help="report: output path without suffix (default docs/results/judge_STAGE)")


def main(args) -> int:
    from .folds import FOLDS_FILE, draw_folds, load_folds, scene_files
    from .references import references

    files = scene_files()
    if not files:
        print("no shared scenes under ../shared/data/real: the judge needs them")
        return 2
    if args.judge_cmd == "references":
        refs = references(files)
        print(f"{len(refs)} teacher references; {sum(r['bright_clear'] for r in refs.values())} bright clear files")
        return 0
    if args.judge_cmd == "folds":
        if args.draw:
            FOLDS_FILE.write_text(yaml.safe_dump(draw_folds(files, references(files)), sort_keys=False))
        print(FOLDS_FILE.read_text())
        return 0
    judge, base = load_judge(args.config)
    if args.stage not in judge["stages"]:
        print(f"--stage {args.stage!r}: choose one of {sorted(judge['stages'])}")
        return 2
    folds = load_folds(files=files)
    refs = references(files)
    if args.judge_cmd == "report":
        from .references import probes
        from .report import report

        out = Path(args.out or REPO / "docs" / "results" / f"judge_{args.stage}")
        res = report(judge, args.stage, refs, folds, out, probes=probes(files))
        print(out.with_suffix(".md").read_text())
        return 0 if res["arms"] else 2
    from ..distill import build_transfer_set
    from .runs import arm_config, run_one

    arms = args.only.split(",") if args.only else list(judge["arms"])
    unknown = [a for a in arms if a not in judge["arms"]]
    if unknown:
        print(f"--only: unknown arm(s) {unknown}; the config has {list(judge['arms'])}")
        return 2
    fsel = [int(x) for x in args.folds.split(",")] if args.folds else list(range(len(folds)))
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else judge["stages"][args.stage]["seeds"]
    by_stem = {f.stem: f for f in files}
    ts = build_transfer_set(arm_config(judge, base, arms[0], args.stage, seeds[0], fsel[0]))   # one pool for every arm
    failed = 0
    for seed in seeds:
        for arm in arms:
            for fold in fsel:
                try:
                    r = run_one(judge, base, args.stage, arm, fold, seed, folds, by_stem, refs, ts=ts)
                except Exception as e:   # one failed run must not stop the study; it stays missing in the report
                    failed += 1
                    print(f"judge {args.stage} {arm} fold {fold} seed {seed}: FAILED: {type(e).__name__}: {e}", flush=True)
                    continue
                fid = [row["fidelity"]["band_agree"] for row in r["files"].values() if "fault" not in row]
                print(f"judge {args.stage} {arm} fold {fold} seed {seed}: fidelity band agreement "
                      f"{sum(fid) / max(1, len(fid)):.3f} on {len(r['files'])} files, train {r['seconds']['train']} s", flush=True)
    return 1 if failed else 0
