"""Generalization acceptance (issues 23 and 27) on the committed judge table (docs/results/judge_screening.json,
made by `python -m ground judge run --stage screening` and `python -m ground judge report --stage screening`:
5 folds by place over every shared acquisition, each held-out file scored INT8 through CloudGate against the
4-band teacher and, where labelled, the human label). The shipped v6 model's recipe is the `no_kd` arm
(labels only); the recipe the judge's pre-declared rule selects is checked too. While neither meets the
acceptance, these tests are strict xfails carrying the measured numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

JUDGE_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "judge_screening.json"


def _judge() -> dict:
    if not JUDGE_JSON.exists():
        pytest.fail(f"{JUDGE_JSON} is missing: run python -m ground judge run / report --stage screening")
    return json.loads(JUDGE_JSON.read_text())


def _failures(arm: str) -> list[str]:
    from ground.judge.report import generalization_failures

    return generalization_failures(_judge(), arm)


def test_committed_judge_table_covers_every_fold_and_names_its_selection():
    res = _judge()
    assert len(res["folds"]) >= 5
    for name, arm in res["arms"].items():
        assert arm["seeds"], name
        assert all(s["faults"] == 0 for s in arm["per_seed"].values()), name
    assert res["selected"] is None or res["selected"] in res["arms"]


NO_KD_FAILS = ("v6's recipe (no_kd, labels only) under the judge (docs/results/judge_screening.md, 2026-12-07; 5 folds by "
               "place, 140 files, 1 000 steps, seed 0 only): fidelity scene band agreement 0.864 < 0.95, pixel agreement "
               "0.908 < 0.95, |CF_s - CF_t| 0.088 > 0.05; label action agreement 0.806 = teacher 0.806 (met); the four "
               "clear snow files (BigEarthNet snow patch, 3 Everest tiles) read 0.62-0.82 cloud (kept only by the discard "
               "guard); 1 seed (needs 3)")
SELECTED_FAILS = ("fm_bright_share (the judge's pick: function matching + a quarter of every batch from bright clear views), "
                  "seed 0: fidelity 0.914 / pixels 0.937 / |CF| 0.055 (not met), labels 0.839 >= teacher 0.806 (met), "
                  "BigEarthNet snow 0.17 > 0.15; seed 1 (folds 0-1 only) reads Everest 0.43-0.56 and the snow patch 0.71: "
                  "the bright-surface fix is not yet stable across seeds; 1 complete seed (needs 3)")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NO_KD_FAILS)
def test_shipped_recipe_meets_the_generalization_acceptance():
    failures = _failures("no_kd")
    assert not failures, "; ".join(failures)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=SELECTED_FAILS)
def test_selected_recipe_meets_the_generalization_acceptance():
    res = _judge()
    assert res["selected"], "the judge selected no arm"
    failures = _failures(res["selected"])
    assert not failures, "; ".join(failures)
