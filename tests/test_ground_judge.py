"""The generalization judge (ground/judge/) and the crop-first training batch (ground/distill.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from ground import distill as D  # noqa: E402
from ground.judge.folds import SceneFile, draw_folds, load_folds  # noqa: E402
from ground.judge.report import select  # noqa: E402
from ground.judge.runs import fidelity_row, fold_views, merge  # noqa: E402
from ground.student import StudentSpec, build_student  # noqa: E402


def _files(n_sites=12, per_site=2, labelled_every=3):
    out = []
    for s in range(n_sites):
        for a in range(per_site):
            out.append(SceneFile(f"s{s}_a{a}", Path(f"/x/s{s}_a{a}.npz"), f"acq{s}_{a}", f"site{s}",
                                 s % labelled_every == 0, True))
    return out


def test_draw_folds_holds_out_whole_places_and_spreads_bright_clear_ones():
    files = _files()
    refs = {f.stem: {"bright_clear": f.site_id in ("site1", "site2", "site4", "site5", "site7")} for f in files}
    d = draw_folds(files, refs, k=5, seed=3)
    folds = [set(f["files"]) for f in d["folds"]]
    assert sorted(s for f in folds for s in f) == sorted(f.stem for f in files)     # each file exactly once
    site_of = {f.stem: f.site_id for f in files}
    for i, f in enumerate(folds):                                                  # no place in two folds
        assert not {site_of[s] for s in f} & {site_of[s] for j, o in enumerate(folds) if j != i for s in o}
    bright_per_fold = [sum(refs[s]["bright_clear"] for s in f) // 2 for f in folds]  # 2 files per site
    assert bright_per_fold == [1, 1, 1, 1, 1]                                       # 5 bright places over 5 folds
    assert draw_folds(files, refs, k=5, seed=3) == d                                # deterministic


def test_load_folds_refuses_a_place_split_across_folds(tmp_path):
    files = _files(4, 2)
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump({"folds": [{"files": ["s0_a0", "s1_a0", "s1_a1"]}, {"files": ["s0_a1", "s2_a0"]}]}))
    with pytest.raises(ValueError, match="straddle"):
        load_folds(p, files)
    p.write_text(yaml.safe_dump({"folds": [{"files": ["s0_a0", "s0_a0"]}]}))
    with pytest.raises(ValueError, match="two folds"):
        load_folds(p)


def test_fold_views_train_only_on_views_whose_every_source_trains():
    ts = {"meta": {"sources": ["a", "b", "c"]}, "src": np.array([[0, -1], [1, -1], [0, 2], [2, 1], [1, 0]], np.int16)}
    assert fold_views(ts, {"a", "b"}).tolist() == [0, 1, 4]
    assert fold_views(ts, {"c"}).tolist() == []


def test_fidelity_row_counts_scene_crop_and_pixel_agreement():
    valid = np.ones((256, 256), bool)
    t = np.zeros((256, 256), np.uint8)
    s = t.copy()
    s[:, :64] = 1                                  # the student calls a quarter of the scene cloud
    r = fidelity_row(s, t, valid, "scene", crops=8)
    assert r["cf_student"] == 0.25 and r["cf_teacher"] == 0.0 and r["abs_cf_diff"] == 0.25
    assert r["pixel_agreement"] == 0.75 and r["crops"] == 8
    assert 0.0 <= r["crop_band_agreement"] <= 1.0
    same = fidelity_row(t, t, valid, "scene", crops=8)
    assert same["band_agree"] and same["pixel_agreement"] == 1.0 and same["crop_band_agreement"] == 1.0


def test_selection_rule_excludes_clear_discards_then_prefers_fidelity_within_one_se():
    def arm(label, fid, discards=()):
        return {"label_action_agreement": {"mean": label}, "label_action_se": 0.05, "clear_discards": list(discards),
                "fid_band_agreement": {"mean": fid}, "fid_crop_band_agreement": {"mean": fid}, "fid_abs_cf_diff": {"mean": 0.1}}
    arms = {"labels_best": arm(0.90, 0.80), "fid_best": arm(0.87, 0.95), "unsafe": arm(0.95, 0.99, ["snow"]),
            "far": arm(0.70, 0.99)}
    # "unsafe" discards a clear scene: out, and it does not set the bar; "far" is more than one SE below the best
    assert select({k: arms[k] for k in ("labels_best", "fid_best", "far")}) == "fid_best"
    assert select(arms) == "fid_best"
    assert select({"unsafe": arms["unsafe"]}) is None
    nan = {**arms["fid_best"], "fid_abs_cf_diff": {"mean": float("nan")}, "label_action_agreement": {"mean": float("nan"), "sd": 0.0}}
    from ground.judge.report import generalization_failures
    assert generalization_failures({"folds": [[]] * 5, "teacher": {"label_action_agreement": 0.9},
                                    "arms": {"n": {**nan, "seeds": [0, 1, 2], "fid_pixel_agreement": {"mean": 0.99},
                                                   "bright_clear_over_15pct": []}}}, "n")


def test_arm_overrides_merge_into_the_base_recipe():
    base = {"train": {"steps": 5, "crop": 128, "batch": 32}, "losses": [1]}
    assert merge(base, {"train": {"crop": 256}}) == {"train": {"steps": 5, "crop": 256, "batch": 32}, "losses": [1]}
    assert base["train"]["crop"] == 128


def _pool(n=6, size=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, size, size, 6)).astype(np.float16)
    # teacher "probabilities" that are a pure function of the view's pixels: alignment is checkable after any turn
    P = np.stack([np.rint(255 * X[..., c].astype(np.float32)).astype(np.uint8) for c in range(3)], 1)
    F = rng.random((n, 64, size // 8, size // 8)).astype(np.float16)
    Y = (X[..., 0] > 0.5).astype(np.uint8)
    return {"X": X, "Y": Y, "swir": np.zeros(n, bool), "t_probs": {"t": P}, "t_feats": {"t": F}}


def test_crop_first_batch_keeps_view_labels_and_teacher_aligned_and_skips_unused_arrays():
    ts = _pool()
    spec = StudentSpec()
    b = D._batch(ts, [0, 3, 5], spec, np.random.default_rng(1), crop=32)
    assert b["x"].shape == (3, 4, 32, 32) and b["x"].is_contiguous(memory_format=torch.channels_last)
    x = b["x"].numpy()
    # blue is channel 0 of the view; labels and teacher channel 0 were made from it: same window, same turn
    assert np.array_equal(b["labels"].numpy(), (x[:, 0] > 0.5).astype(np.int64))
    assert np.allclose(b["t_probs"]["t"][:, 0].numpy(), np.rint(255 * x[:, 0]) / 255, atol=1e-6)
    assert b["t_feats"]["t"].shape == (3, 64, 4, 4)
    lean = D._batch(ts, [0, 3, 5], spec, np.random.default_rng(1), crop=32, needs=(False, False))
    assert lean["t_probs"] == {} and lean["t_feats"] == {}
    assert torch.equal(lean["x"], b["x"])                   # the same draws whatever is skipped
    assert D.needed_teacher_arrays([{"type": "ce_labels"}]) == (False, False)
    assert D.needed_teacher_arrays([{"type": "kl_soft"}]) == (True, False)
    assert D.needed_teacher_arrays([{"type": "sslkd_feature"}, {"type": "ce_labels"}]) == (False, True)


def test_half_resolution_batch_averages_views_and_teacher_and_takes_majority_labels():
    ts = _pool()
    b = D._batch(ts, [1], StudentSpec(), None, augment=False, downsample=2)
    x = np.asarray(ts["X"][1], np.float32)[..., :4].transpose(2, 0, 1)
    assert np.allclose(b["x"][0].numpy(), x.reshape(4, 32, 2, 32, 2).mean((2, 4)), atol=1e-6)
    lab = torch.tensor([[[0, 1, 255, 255], [1, 1, 255, 255]]])
    assert D._majority_labels(lab, 2, 3).tolist() == [[[1, 255]]]
    tie = torch.tensor([[[0, 1], [255, 255]], [[1, 2], [255, 255]], [[0, 2], [255, 255]]])
    assert D._majority_labels(tie, 2, 3).tolist() == [[[1]], [[1]], [[2]]]   # ties: cloud, then shadow: never lean clear


def test_training_threads_follow_the_load():
    assert D.training_threads("auto", load=0.1, cores=2) == 2
    assert D.training_threads("auto", load=1.2, cores=2) == 1
    assert D.training_threads(3) == 3
    with pytest.raises(D.ConfigError, match="positive integer"):
        D.training_threads(0)


def test_chromaticity_student_sees_band_ratios():
    spec = StudentSpec(chromaticity=True)
    m = build_student(spec).eval()
    x = torch.rand(1, 4, 64, 64)
    assert m(x).shape == (1, 3, 64, 64)
    assert spec.parameters() == StudentSpec().parameters() + spec.stem_stride ** 2 * 4 * spec.widths[0]
    with pytest.raises(ValueError, match="input_downsample"):
        StudentSpec.from_dict({"input_downsample": 3})


def _scene(path: Path, seed: int, site: str, labelled: bool, bright: bool = False):
    from hil.synth import make_scene

    sc = make_scene(seed, size=96, kind="snow" if bright else None) if bright else make_scene(seed, size=96)
    np.savez(path, bands=sc.reflectance[..., :4].astype(np.float32),
             band_names=np.array(["B2_blue", "B3_green", "B4_red", "B5_nir"]), units="TOA reflectance float32",
             sensor="Landsat-8 OLI", acquisition_id=f"{site}_acq{seed}", site_id=site,
             **({"mask": sc.mask} if labelled else {}))


@pytest.mark.slow
def test_judge_smoke_run_trains_exports_and_scores_held_out_places(tmp_path, monkeypatch):
    """The whole judge path on tiny scenes: references by the real teacher, folds by place, a pool built from
    the training places only, two training steps, INT8 export, every held-out file scored through CloudGate
    against the teacher (and the label where there is one), and the report with its bright-clear table."""
    pytest.importorskip("ukis_csmask")
    from ground.distill import build_transfer_set, load_config
    from ground.judge import folds as F, references as R, report as P, runs as U

    real = tmp_path / "real" / "src"
    real.mkdir(parents=True)
    for i, (site, lab) in enumerate([("p1", True), ("p1", False), ("p2", True), ("p3", False)]):
        _scene(real / f"f{i}.npz", i + 1, site, lab)
    files = F.scene_files(tmp_path / "real")
    assert {f.site_id for f in files} == {"p1", "p2", "p3"} and sum(f.labelled for f in files) == 2
    refs = R.references(files, tmp_path / "refs", log=lambda *_: None)
    assert set(refs) == {f.stem for f in files} and all(0 <= r["teacher_cf"] <= 1 for r in refs.values())
    folds = [d["files"] for d in F.draw_folds(files, refs, k=2, seed=0)["folds"]]
    monkeypatch.setattr(U, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(P, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(U, "teacher_mask_of", lambda stem, d=None: R.teacher_mask_of(stem, tmp_path / "refs"))
    base = load_config(Path(__file__).resolve().parents[1] / "ground/configs/judge_base.yaml")
    base["pool"].update(views=8, real_root=str(tmp_path / "real"), tile=256)
    base["data"].update(train_views=8)
    base["train"].update(batch=2, crop=64, precise_bn_batches=1, threads=1)
    judge = {"base_config": "-", "crops_per_file": 4, "selection": "rule", "stages": {"smoke": {"steps": 2, "seeds": [0]}},
             "arms": {"hinton_kl": {"losses": base["losses"]}}}
    monkeypatch.setenv("CLOUDGATE_CACHE", str(tmp_path / "cache"))
    import ground.transfer as T
    monkeypatch.setattr(T, "CACHE", tmp_path / "cache")
    ts = build_transfer_set(U.arm_config(judge, base, "hinton_kl", "smoke", 0, 0), log=lambda *_: None)
    by_stem = {f.stem: f for f in files}
    for k in range(2):
        r = U.run_one(judge, base, "smoke", "hinton_kl", k, 0, folds, by_stem, refs, log=lambda *_: None, ts=ts)
        assert set(r["files"]) == set(folds[k])
        held_sources = {i for i, n in enumerate(ts["meta"]["sources"]) if n in folds[k]}
        trained = U.fold_views(ts, {s for j, f in enumerate(folds) if j != k for s in f})
        assert not np.isin(np.asarray(ts["src"])[trained], list(held_sources)).any()   # no view of a held-out place
        for stem, row in r["files"].items():
            assert "fault" not in row, row
            assert 0 <= row["fidelity"]["pixel_agreement"] <= 1 and row["fidelity"]["crops"] >= 1
            assert ("label" in row) == by_stem[stem].labelled
    res = P.report(judge, "smoke", refs, folds, tmp_path / "out" / "judge_smoke", probes=R.probes(files, tmp_path / "refs"))
    assert "hinton_kl" in res["guard"] and "fitted" in res["guard"]["hinton_kl"]
    assert "hinton_kl" in res["arms"] and res["arms"]["hinton_kl"]["seeds"] == [0]
    assert (tmp_path / "out" / "judge_smoke.md").read_text().count("| fold |") == 1


def test_sampler_shares_labelled_bright_and_hard_views_and_repeats_per_step():
    ts = {"labelled": np.array([True] * 10 + [False] * 90), "bright": np.array([False] * 90 + [True] * 10)}
    cfg = {"seed": 4, "data": {"labelled_batch_share": 0.25, "bright_view_share": 0.25, "hard_view_share": 0.25}}
    idx = np.arange(100)
    hard = np.array([50, 51])
    b = D._sample(cfg, ts, idx, 7, 32, hard)
    assert len(b) == 32 and (b[:8] < 10).all() and (b[8:16] >= 90).all() and set(b[16:24]) <= {50, 51}
    assert np.array_equal(b, D._sample(cfg, ts, idx, 7, 32, hard))     # a function of (seed, step, hard views)
    plain = D._sample({"seed": 4, "data": {"labelled_batch_share": 0.25}}, ts, idx, 7, 32)
    assert len(plain) == 32 and (plain[:8] < 10).all()


def test_hard_views_are_where_student_and_teacher_disagree():
    ts = _pool(n=8, size=64)
    ts["t_probs"]["t"][:] = 0
    ts["t_probs"]["t"][:4, 1] = 255          # the teacher calls views 0-3 all cloud, 4-7 all clear
    ts["t_probs"]["t"][4:, 0] = 255
    model = build_student(StudentSpec()).eval()
    with torch.no_grad():                    # a student that calls everything clear
        model.head.bias[:] = torch.tensor([10.0, -10.0, -10.0])
    cfg = {"seed": 0, "teachers": [{"name": "t"}], "student": {},
           "data": {"hard_view_candidates": 8, "hard_view_keep": 0.5}}
    assert D.hard_views(model, cfg, ts, np.arange(8), 0).tolist() == [0, 1, 2, 3]


def test_generalization_acceptance_detects_each_criterion():
    from ground.judge.report import generalization_failures

    def m(v, sd=0.0):
        return {"mean": v, "sd": sd}
    good = {"seeds": [0, 1, 2], "fid_band_agreement": m(0.96), "fid_pixel_agreement": m(0.97), "fid_abs_cf_diff": m(0.03),
            "label_action_agreement": m(0.95, 0.01), "clear_discards": [], "bright_clear_over_15pct": []}
    res = {"folds": [[]] * 5, "teacher": {"label_action_agreement": 0.93}, "arms": {"a": good}}
    assert generalization_failures(res, "a") == []
    for change, word in (({"seeds": [0]}, "coverage"), ({"fid_band_agreement": m(0.9)}, "scene band"),
                         ({"fid_pixel_agreement": m(0.9)}, "pixel"), ({"fid_abs_cf_diff": m(0.08)}, "CF_s"),
                         ({"label_action_agreement": m(0.9)}, "label action"),
                         ({"label_action_agreement": m(0.95, 0.05)}, "seed sd"),
                         ({"clear_discards": ["snow"]}, "discarded"), ({"bright_clear_over_15pct": ["ice"]}, "15 %")):
        got = generalization_failures({**res, "arms": {"a": {**good, **change}}}, "a")
        assert len(got) == 1 and word in got[0], (change, got)
    assert "no complete arm" in generalization_failures(res, "b")[0]
