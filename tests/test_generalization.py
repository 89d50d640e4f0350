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
