"""Real labelled scenes through the gate that flies (skipped cleanly when ../shared/data/real is absent).

The acceptance test scores the shipped default (INT8 LiteRT, `CloudGate.process(mask_out=...)`) on the
evaluation part of the committed split (ground/data/split.yaml) against the 4-band ukis-csmask teacher
on the same arrays, through the one scorer ground/, bench and the card use (ground.evaluate)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL
from flight.scenefile import read_npz_scene

SCENES = sorted(REAL.glob("*/*.npz")) if REAL.is_dir() else []
pytestmark = pytest.mark.skipif(not SCENES, reason="../shared/data/real is absent on this machine")


def _run(gate, sc, mask=None):
    return gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], target_id=sc["scene_id"],
                        valid_mask=sc["valid_mask"], radiometry=sc["radiometry"], mask_out=mask)


@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.stem)
def test_backends_agree_and_scene_expectations(gate_litert, gate_ort, path):
    sc = read_npz_scene(path)
    d1, d2 = _run(gate_litert, sc), _run(gate_ort, sc)
    assert d1.action == d2.action, (d1.cloud_fraction, d2.cloud_fraction)
    assert abs(d1.cloud_fraction - d2.cloud_fraction) <= 0.01, (d1.cloud_fraction, d2.cloud_fraction)
    if "nir" not in sc["band_names"]:
        assert d1.action == "fault" and "nir" in d1.fault
        return
    if sc["tag"] == "clear":
        assert d1.action == "downlink"
    elif sc["tag"] == "overcast":
        assert d1.action in ("discard", "reacquire")


@pytest.fixture(scope="module")
def evaluation_scores():
    pytest.importorskip("ukis_csmask", reason="the teacher reference needs the dev extra (pip install -e '.[dev]')")
    from ground.evaluate import BANDS4, GateContender, MaskContender, score_real, teacher_mask
    from ground.split import load_split

    present = {p.stem for p in SCENES}
    missing = [s for s in load_split()["evaluation"] if s not in present]
    if missing:
        pytest.skip(f"evaluation scenes absent: {missing}")
    from flight.model import default_card, load_card

    card = load_card(default_card())
    base = card.raw.get("baseline_card")
    gates = {"student": GateContender(None, "litert")}
    if base:  # the no-KD baseline carded beside the shipped student (same views, steps; labels only)
        base_card = load_card(card.path.parent / base)
        gates["baseline_nokd"] = GateContender(card.path.parent / base_card.artifacts["tflite_int8"]["file"], "litert")
    try:
        res = score_real({**gates, "teacher_4b": MaskContender(teacher_mask, BANDS4)}, parts=("evaluation",))
    finally:
        for g in gates.values():
            g.close()
    return res["evaluation"]


def test_evaluation_part_scores_every_scene(evaluation_scores):
    from ground.split import load_split

    assert set(evaluation_scores["scenes"]) == set(load_split()["evaluation"])
    for sid, row in evaluation_scores["scenes"].items():
        assert {"student", "teacher_4b"} <= set(row), sid


SHIPPED_FAILS = ("shipped v5 real-view KD student on the evaluation part (12 scenes), measured 2026-11-23 and again "
                 "2026-12-01: action agreement 0.833 vs teacher_4b 0.750 (met), mean |CF err| 0.114 vs 0.097 + 0.02 "
                 "(met), pooled cloud IoU 0.708 < 0.95 x 0.763 = 0.725 (not met), 1 of 4 clear scenes discarded (not "
                 "met: l8biome_SnowIce_00, clear snow called 100 % cloud), KD vs the carded no-KD baseline 0.917 / "
                 "0.103 (not met: the baseline is better)")


def acceptance_failures(scores: dict) -> list[str]:
    """Every acceptance criterion (issue 8) that the scored student misses, each with its numbers."""
    summ = scores["summary"]
    s, t, b = summ["student"], summ["teacher_4b"], summ.get("baseline_nokd")
    out = []
    if s["clear_scenes_discarded"]:
        out.append(f"{s['clear_scenes_discarded']} of {s['clear_scenes']} clear scenes discarded")
    if s["action_agreement"] < t["action_agreement"]:
        out.append(f"action agreement {s['action_agreement']} < teacher {t['action_agreement']}")
    if s["mean_abs_cf_error"] > t["mean_abs_cf_error"] + 0.02:
        out.append(f"mean |CF err| {s['mean_abs_cf_error']} > teacher {t['mean_abs_cf_error']} + 0.02")
    if s["pooled_cloud_iou"] < 0.95 * t["pooled_cloud_iou"]:
        out.append(f"pooled IoU {s['pooled_cloud_iou']} < 0.95 x teacher {t['pooled_cloud_iou']}")
    if b is None:
        out.append("no carded no-KD baseline to compare the KD student with")
    elif not (s["action_agreement"] >= b["action_agreement"] and s["mean_abs_cf_error"] < b["mean_abs_cf_error"]):
        out.append(f"KD student (action {s['action_agreement']}, |CF err| {s['mean_abs_cf_error']}) does not beat the "
                   f"no-KD baseline (action {b['action_agreement']}, |CF err| {b['mean_abs_cf_error']})")
    return out


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=SHIPPED_FAILS)
def test_shipped_student_meets_real_scene_acceptance(evaluation_scores):
    failures = acceptance_failures(evaluation_scores)
    assert not failures, "; ".join(failures)


def test_acceptance_criteria_each_detected():
    """Every criterion of the acceptance test can fail on its own (so the xfail above is not hiding a check
    that never runs), and a student that meets them all passes."""
    good = {"clear_scenes_discarded": 0, "clear_scenes": 4, "action_agreement": 0.9, "mean_abs_cf_error": 0.05,
            "pooled_cloud_iou": 0.9}
    teacher = {"action_agreement": 0.75, "mean_abs_cf_error": 0.097, "pooled_cloud_iou": 0.763}
    base = {"action_agreement": 0.8, "mean_abs_cf_error": 0.1}

    def fails(**change):
        return acceptance_failures({"summary": {"student": {**good, **change}, "teacher_4b": teacher,
                                                "baseline_nokd": base}})

    assert fails() == []
    for change, word in (({"clear_scenes_discarded": 1}, "clear"), ({"action_agreement": 0.7}, "action agreement"),
                         ({"mean_abs_cf_error": 0.12}, "CF err"), ({"pooled_cloud_iou": 0.7}, "IoU"),
                         ({"action_agreement": 0.79}, "no-KD"), ({"mean_abs_cf_error": 0.1}, "no-KD")):
        got = fails(**change)
        assert any(word in f for f in got), (change, got)
    assert "no carded no-KD baseline" in acceptance_failures(
        {"summary": {"student": good, "teacher_4b": teacher}})[0]


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
