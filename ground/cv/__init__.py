"""Cross-validation by acquisition over every shared labelled scene: the judge of every ground choice.

    python -m ground cv folds [--draw]                      # the committed fold file (ground/data/cv_folds.yaml)
    python -m ground cv run [--only ARM[,ARM]] [--folds 0,1] [--seeds 0,1]   # train + score, resumable per run
    python -m ground cv references                          # teachers and the threshold on every labelled scene
    python -m ground cv report --out docs/results/cv        # tables with paired bootstrap intervals

Folds (`draw_folds`): every labelled scene of ../shared/data/real in exactly one of K folds, grouped by
acquisition (L8 Biome patches of one biome+scene index together; the three On Cloud N demo chips as one
group, since their acquisitions are undocumented) and stratified by source/biome (each stratum's groups are
dealt round-robin over the folds from a seeded shuffle). A run (arm, fold, seed) trains on every pool view
whose source scenes are all outside the fold (unlabelled scenes and the synthetic snow supplement always
train), exports the INT8 QDQ ONNX (calibrated on the run's own training views only) and scores the fold's
scenes through `CloudGate.process(mask_out=...)`: every scene is scored exactly once per seed, by a
model that never saw its acquisition. Student-teacher disagreement is measured on the pool views made from
the held-out scenes (never trained in that run). Teachers and the threshold have no training, so they are
scored once per scene on the same arrays (`references`).

Every arm gets the same pool, views, steps, batch, schedule and seeds (`ground/configs/cv.yaml`).

Rooms: folds.py (folds and config), runs.py (train, export, score one fold; references), guard.py (the discard
guard's operating point), report.py (the table, the acceptance, the shipped model's record).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from .folds import CV_CONFIG, FOLDS_FILE, FOLDS_SEED, N_FOLDS, acquisition, draw_folds, labelled_stems, load_cv, load_folds, stratum  # noqa: F401
from .guard import GUARD_GRID, action_at, apply_guard_by_fold, choose_guard, dropped_before_guard, guard_curve  # noqa: F401
from .report import STATS, acceptance_failures, bootstrap, collect, record_shipped, report, scene_metrics, winner  # noqa: F401
from .runs import (RUNS, calibration_tiles, export_onnx_int8, fold_views, label_conflicts, probe_stats,  # noqa: F401
                   references, run_dir, run_one, score_fold, scene_frames)


def main(args) -> int:
    if args.cv_cmd == "folds":
        if args.draw:
            print(yaml.safe_dump(draw_folds(labelled_stems()), sort_keys=False))
        else:
            print(yaml.safe_dump({"folds": load_folds()}, sort_keys=False))
        return 0
    cv, base = load_cv(args.config)
    folds = load_folds()
    if args.cv_cmd == "references":
        references()
        return 0
    if args.cv_cmd == "conflicts":
        print(label_conflicts(base, Path(args.out).with_name("label_conflicts.md")))
        return 0
    if args.cv_cmd == "report":
        report(cv, Path(args.out), folds)
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    only = set(args.only.split(",")) if args.only else None
    fsel = {int(x) for x in args.folds.split(",")} if args.folds else None
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else cv["seeds"]
    for seed in seeds:
        for fold in range(len(folds)):
            for arm in cv["arms"]:
                if (only and arm not in only) or (fsel is not None and fold not in fsel):
                    continue
                r = run_one(cv, base, arm, fold, seed, folds)
                agree = np.mean([row["band"] == row["label_band"] for row in r["scenes"].values() if "fault" not in row])
                print(f"cv {arm} fold {fold} seed {seed}: action agreement {agree:.3f} on {len(r['scenes'])} scenes, "
                      f"held-out view disagreement {r['held_out_view_disagreement']}", flush=True)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("cv", help="cross-validation by acquisition over every shared labelled scene (ground/cv/)")
    c.add_argument("cv_cmd", choices=("folds", "run", "references", "report", "conflicts"))
    c.add_argument("--config", default=str(CV_CONFIG))
    c.add_argument("--draw", action="store_true", help="folds: re-draw the folds from the scenes present")
    c.add_argument("--only", default=None, help="run: comma-separated arms")
    c.add_argument("--folds", default=None, help="run: comma-separated fold indices")
    c.add_argument("--seeds", default=None, help="run: comma-separated seeds (default: the config's)")
    c.add_argument("--out", default="docs/results/cv", help="report: output path without suffix")


