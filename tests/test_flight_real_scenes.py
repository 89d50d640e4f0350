"""Real labelled scenes through the gate that flies (skipped cleanly when ../shared/data/real is absent).

The acceptance (issue 18) is judged on the committed cross-validation table (docs/results/cv.json, made by
`python -m ground cv run` / `report`: every shared labelled scene scored by a model that never saw its
acquisition, INT8 through `CloudGate.process(mask_out=...)`, beside the 4-band ukis-csmask teacher on the
same arrays); CI checks that table against the acceptance and that it names the shipped artifacts. The
shipped default trained on every shared labelled scene, so its own run here is an in-sample regression
guard, through the one scorer ground/, bench and the card use (ground.evaluate)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import REAL
from flight.scenefile import read_npz_scene

SCENES = sorted(REAL.glob("*/*.npz")) if REAL.is_dir() else []
pytestmark = pytest.mark.skipif(not SCENES, reason="../shared/data/real is absent on this machine")


def _run(gate, sc, mask=None):
    return gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], target_id=sc["scene_id"],
                        valid_mask=sc["valid_mask"], radiometry=sc["radiometry"], mask_out=mask)


# issue 18: the v6 no-KD student reads these two small overcast unlabelled S2 scenes (visual tag only) as
# 0.21 / 0.10 cloud and downlinks them (bandwidth, not data lost); hil/streams/real.yaml marks them known_miss too
KNOWN_MISSES = {"eolearn_refscene_0", "eolearn_refscene_1"}


@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.stem)
def test_backends_agree_and_scene_expectations(gate_litert, gate_ort, path):
    sc = read_npz_scene(path)
    d1, d2 = _run(gate_litert, sc), _run(gate_ort, sc)
    assert d1.action == d2.action, (d1.cloud_fraction, d2.cloud_fraction)
    assert abs(d1.cloud_fraction - d2.cloud_fraction) <= 0.01, (d1.cloud_fraction, d2.cloud_fraction)
    if "nir" not in sc["band_names"]:
        assert d1.action == "fault" and "nir" in d1.fault
        return
    if path.stem in KNOWN_MISSES:   # strict: fails once it comes out right (then remove it here and in the stream)
        assert sc["tag"] == "overcast" and d1.action == "downlink", (path.stem, d1.cloud_fraction)
    elif sc["tag"] == "clear":
        assert d1.action == "downlink"
    elif sc["tag"] == "overcast":
        assert d1.action in ("discard", "reacquire")


CV_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "cv.json"


def _cv():
    import json

    if not CV_JSON.exists():
        pytest.fail(f"{CV_JSON} is missing: run python -m ground cv run and python -m ground cv report")
    return json.loads(CV_JSON.read_text())


def test_cv_table_names_the_shipped_artifacts():
    """The committed CV table (docs/results/cv.json) names the arm and the sha256 of every artifact of the
    shipped default, and those are the files in models/ that the card names."""
    import hashlib

    from flight.model import default_card, load_card

    cvr = _cv()
    card = load_card(default_card())
    shipped = cvr.get("shipped")
    assert shipped, "docs/results/cv.json names no shipped model (ground.cv.record_shipped runs at export)"
    assert shipped["card"] == card.path.name and shipped["arm"] == card.raw["cv_selection"]["arm"]
    for key, a in card.artifacts.items():
        data = (card.path.parent / a["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a["sha256"] == shipped["artifacts"][key], key
    pytest.importorskip("torch", reason="ground.cv (the CV folds and criteria) needs torch: the [ground] extra")
    from ground.cv import load_folds

    trained = set(card.raw["data"]["trained_or_calibrated_on"]["labelled_scenes"])
    assert trained == {s for f in load_folds() for s in f}, "the shipped default trains on every shared labelled scene"


CV_FAILS = ("shipped v6 (CV winner: no-KD, labels only) in the committed CV table (docs/results/cv.md, 2026-12-03; 5 folds "
            "by acquisition, 31 scenes, 2 seeds, INT8 through the gate): action agreement 0.806 vs teacher_4b 0.806 (met), "
            "mean |CF err| 0.096 vs 0.087 + 0.02 (met), 0 clear scenes discarded in any fold (met, by the discard guard: the "
            "student still calls the clear ice sheet 100 % cloud), pooled cloud IoU 0.734 < 0.95 x 0.803 = 0.763 (not met); "
            "KD (Hinton KL) loses to no-KD (-0.048 action, +0.011 |CF err|), so no-KD ships")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=CV_FAILS)
def test_shipped_model_meets_the_cv_acceptance():
    pytest.importorskip("torch", reason="ground.cv (the CV folds and criteria) needs torch: the [ground] extra")
    from ground.cv import acceptance_failures

    cvr = _cv()
    failures = acceptance_failures(cvr, cvr["shipped"]["arm"])
    assert not failures, "; ".join(failures)


def test_cv_acceptance_criteria_each_detected():
    """Every criterion of the CV acceptance can fail on its own, and an arm that meets them all passes."""
    pytest.importorskip("torch", reason="ground.cv (the CV folds and criteria) needs torch: the [ground] extra")
    from ground.cv import acceptance_failures

    def m(v):
        return {"mean": v, "std": 0.0}

    cov = {"seeds": 2, "faults": 0, "missing": 0}
    good = {"action_agreement": m(0.9), "mean_abs_cf_error": m(0.05), "pooled_cloud_iou": m(0.9),
            "clear_discarded_scenes": [], "coverage": cov}
    teacher = {"action_agreement": m(0.85), "mean_abs_cf_error": m(0.06), "pooled_cloud_iou": m(0.85)}
    other = {"action_agreement": m(0.8), "mean_abs_cf_error": m(0.1), "pooled_cloud_iou": m(0.8),
             "clear_discarded_scenes": []}

    def fails(**change):
        return acceptance_failures({"arms": {"kd": {**good, **change}, "no_kd": other}, "references": {"teacher_4b": teacher}}, "kd")

    assert fails() == []
    for change, word in (({"clear_discarded_scenes": ["x"]}, "clear"), ({"action_agreement": m(0.8)}, "action agreement"),
                         ({"mean_abs_cf_error": m(0.09)}, "CF err"), ({"pooled_cloud_iou": m(0.8)}, "IoU"),
                         ({"action_agreement": m(0.79)}, "winner"), ({"coverage": {**cov, "seeds": 1}}, "coverage"),
                         ({"coverage": {**cov, "faults": 1}}, "coverage"), ({"coverage": {**cov, "missing": 2}}, "coverage")):
        got = fails(**change)
        assert any(word in f for f in got), (change, got)


def test_in_sample_regression_guard(gate_litert, real_dir):
    """The shipped default on every shared labelled scene (all of which trained it) through the gate: no clear
    scene discarded, no overcast scene downlinked, and action agreement / |CF err| no worse than the card
    recorded at export (a regression guard, not evidence of generalisation: that is the CV table)."""
    from ground.evaluate import GateContender, score_real

    from flight.model import default_card, load_card

    card = load_card(default_card())
    ref = card.raw["metrics"]["real_in_sample"]["student_int8_tflite"]
    g = GateContender(None, "litert", threads=1)
    try:
        res = score_real({"student": g}, parts=("all",))
    finally:
        g.close()
    s = res["all"]["summary"]["student"]
    assert s["clear_scenes_discarded"] == 0, res["all"]["scenes"]
    assert s["overcast_scenes_downlinked"] <= ref["overcast_scenes_downlinked"]
    assert s["action_agreement"] >= ref["action_agreement"] - 1e-9
    assert s["mean_abs_cf_error"] <= ref["mean_abs_cf_error"] + 0.005


def test_acceptance_metrics_are_computed_from_the_masks():
    """The scorer itself: a perfect mask scores perfectly, an all-cloud mask on a clear label is a
    discarded clear scene and a wrong action."""
    from ground.evaluate import scene_row, summarise

    label = np.zeros((64, 64), np.uint8)
    label[:, :8] = 1                                              # 12.5 % cloud -> downlink
    perfect = summarise({"a": scene_row(label.copy(), 0.125, "downlink", label)})
    assert perfect["action_agreement"] == 1.0 and perfect["mean_abs_cf_error"] == 0 and perfect["pooled_cloud_iou"] == 1.0
    clear = np.zeros((64, 64), np.uint8)
    bad = summarise({"b": scene_row(np.ones((64, 64), np.uint8), 1.0, "discard", clear)})
    assert bad["action_agreement"] == 0.0 and bad["clear_scenes_discarded"] == 1 and bad["pooled_cloud_iou"] == 0.0


@pytest.mark.slow  # the CLI over every real scene
def test_flight_cli_runs_real_stream(real_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    log = tmp_path / "d.jsonl"
    out = subprocess.run([sys.executable, "-m", "flight", "run", str(real_dir), "--log", str(log)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "fault" in out and "downlink" in out
    from flight import read_log

    from flight.logschema import is_model_event

    res = read_log(log)
    assert not res.problems
    # one decision per scene file, whatever the folder holds; model events (e.g. a periodic self-test
    # once enough scenes have passed) are records of their own and are not decisions
    decisions = [r for r in res.records if not is_model_event(r)]
    scenes_now = sorted(p for p in real_dir.glob("*/*.npz"))
    assert len(decisions) == len(scenes_now)
    assert sorted(r["scene_id"] for r in decisions) == sorted(str(read_npz_scene(p)["scene_id"]) for p in scenes_now)


def test_discard_guard_default_is_the_cv_operating_point():
    """policy.discard_guard_green_blue ships at the value the pre-declared rule (ground.cv.choose_guard) picks on
    every scene for the shipped arm (the lowest over its seeds)."""
    from flight.config import PolicyConfig

    cvr = _cv()
    chosen = cvr["guard"][cvr["shipped"]["arm"]]["all_scenes"]
    assert PolicyConfig().discard_guard_green_blue == pytest.approx(min(chosen.values()))
