"""Cross-validation by acquisition (ground/cv.py): folds, per-fold views, the guard's operating point."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="ground/ needs the dev extra")

from ground import cv  # noqa: E402


def test_committed_folds_group_acquisitions_and_cover_each_scene_once():
    folds = cv.load_folds()
    stems = [s for f in folds for s in f]
    assert len(stems) == len(set(stems)) and len(folds) >= 5
    for f in folds:
        for s in f:
            assert all(cv.acquisition(s) != cv.acquisition(o) for g in folds if g is not f for o in g)


def test_committed_folds_cover_every_shared_labelled_scene(real_dir):
    have = set(cv.labelled_stems())
    folded = {s for f in cv.load_folds() for s in f}
    missing = sorted(have - folded)
    assert not missing, f"labelled scenes outside every fold: {missing}; re-draw with python -m ground cv folds --draw"


def test_draw_folds_groups_and_balances():
    stems = [f"l8biome_Snow_{i:02d}_{j}" for i in range(4) for j in range(2)] + [f"oncloudn_demo_chip{i}" for i in range(3)] \
        + [f"l8biome_Water_{i:02d}_0" for i in range(6)] + ["ukis_a", "ukis_b"]
    d = cv.draw_folds(stems, k=5, seed=1)
    folds = d["folds"]
    assert sorted(s for f in folds for s in f) == sorted(stems)
    for f in folds:   # both patches of one acquisition, and all the demo chips, in one fold
        for s in f:
            assert all(cv.acquisition(o) != cv.acquisition(s) for g in folds if g is not f for o in g)
    assert max(map(len, folds)) - min(map(len, folds)) <= 4
    assert cv.draw_folds(stems, k=5, seed=1) == d


def test_fold_views_never_train_on_a_held_out_scene():
    ts = {"meta": {"sources": ["a", "b", "c"]}, "src": np.array([[0, -1], [1, -1], [2, 0], [2, -1], [-1, -1]]),
          "train": np.arange(7)}   # views 5, 6: the supplement (no real source)
    tr, held = cv.fold_views(ts, {"a"})
    assert tr.tolist() == [1, 3, 4, 5, 6] and held.tolist() == [0, 2]
    with pytest.raises(ValueError, match="rebuild"):
        cv.fold_views({**ts, "src": None}, {"a"})


def _row(label_cf, action, rule, gb, share=1.0, sat=0.0):
    return {"cloud_fraction_ref": label_cf, "action": action, "rule": rule, "probe": [share, gb, sat]}


def test_action_at_and_choose_guard():
    ice = _row(0.0, "downlink", "ambiguous_surface", 0.855)      # the guard fired at the gate's threshold
    deck = _row(1.0, "discard", "threshold", 0.908)
    deck2 = _row(1.0, "discard", "threshold", 0.93)
    assert cv.action_at(ice, 0.80) == "discard" and cv.action_at(ice, 0.86) == "downlink"
    assert cv.action_at(deck, 0.90) == "discard" and cv.action_at(deck, 0.91) == "downlink"
    # the largest threshold keeping no rightly dropped deck: just below the lowest deck's ratio
    assert cv.choose_guard({"i": ice, "d": deck, "d2": deck2}) == 0.90
    assert cv.choose_guard({"i": ice, "d2": deck2}) == 0.92
    saturated = _row(1.0, "discard", "threshold", 1.1, sat=0.9)    # kept at every threshold: cannot inform it
    assert cv.choose_guard({"i": ice, "d": deck, "s": saturated}) == 0.90
    assert cv.action_at(_row(1.0, "discard", "min_valid_fraction", 0.85), 0.95) == "discard"   # not a cloud call
    rows = {"i": dict(ice), "d": dict(deck), "d2": dict(deck2)}
    chosen = cv.apply_guard_by_fold(rows, [["i"], ["d"], ["d2"]])
    assert chosen == {0: 0.90, 1: 0.92, 2: 0.90}
    assert rows["i"]["action"] == "downlink" and rows["d"]["action"] == "downlink"   # held out: the cost shows
    assert rows["d2"]["action"] == "discard"


def test_kd_on_labelled_false_never_distils_a_labelled_pixel():
    """With kd_on_labelled: false the teacher terms have zero weight (and zero gradient) on every labelled
    pixel: a teacher that calls a labelled clear ice sheet cloud cannot overrule the label there."""
    import torch

    from ground import losses as L

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.full((2, 8, 8), L.IGNORE, dtype=torch.long)
    labels[:, :4] = 0                                      # top half labelled clear
    teacher = torch.zeros(2, 3, 8, 8)
    teacher[:, 1] = 1.0                                    # the teacher says cloud everywhere
    feats = torch.randn(2, 4, 1, 1)
    batch = {"labels": labels, "t_probs": {"t": teacher}, "t_feats": {"t": feats}}
    out = {"logits": logits, "adapted": {"t": torch.randn(2, 4, 1, 1, requires_grad=True)}}
    for term in ({"type": "kl_soft", "teacher": "t"}, {"type": "confidence_weighted_kl", "teachers": ["t"]},
                 {"type": "dkd", "teachers": ["t"], "min_label_agreement": 0.0}, {"type": "sslkd_probability", "teachers": ["t"]}):
        logits.grad = None
        L.LOSS_TERMS[term["type"]](out, batch, {**term, "kd_on_labelled": False}).backward()
        g = logits.grad.abs().sum(1)
        assert float(g[:, :4].max()) == 0.0 and float(g[:, 4:].max()) > 0, term["type"]
        logits.grad = None
        L.LOSS_TERMS[term["type"]](out, batch, {**term}).backward()   # the default still distils there
        assert float(logits.grad.abs().sum(1)[:, :4].max()) > 0, term["type"]
    # the feature term: a cell holding any labelled pixel is not aligned to the teacher's features
    out["adapted"]["t"].grad = None
    L.sslkd_feature(out, batch, {"teachers": ["t"], "kd_on_labelled": False}).backward()
    assert float(out["adapted"]["t"].grad.abs().max()) == 0.0


def test_run_fingerprint_keys_on_the_training_code(monkeypatch):
    """A trained student.pt is reused only when the code that trains (not just the config) is unchanged."""
    from ground import distill, transfer

    cfg = {"experiment": "x", "seed": 0, "train": {"steps": 1}}
    a = distill._fingerprint(cfg, [], "pool", np.arange(3), None)
    monkeypatch.setattr(transfer, "code_digest", lambda *m: "changed-code")
    assert distill._fingerprint(cfg, [], "pool", np.arange(3), None) != a
    assert transfer.pool_key.__doc__ and "code" in transfer.pool_key.__doc__
