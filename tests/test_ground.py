"""Ground: student spec and cost, Keras twin parity, KD loss terms, configs, resumable training and DDP
(2 processes end with identical weights). The synthetic generator (hil.synth) is tested torch-free in
tests/test_synth.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="ground tests need the [ground] extra (torch==2.13.0)")

from ground import losses as L  # noqa: E402
from ground.student import TEACHER_MACS_PER_PIXEL, TEACHER_PARAMS, StudentSpec, build_student  # noqa: E402
from hil.synth import make_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFG = ROOT / "ground/configs/real_kd.yaml"


def test_default_student_budget():
    spec = StudentSpec.from_dict(yaml.safe_load(DEFAULT_CFG.read_text())["student"])
    model = build_student(spec)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert spec.parameters() <= 65_000 and n <= 65_000 + 2 * sum(spec.widths)   # BN adds gamma/beta
    assert TEACHER_PARAMS / spec.parameters() >= 300
    assert spec.macs_per_pixel() <= 0.01 * TEACHER_MACS_PER_PIXEL
    for h, w in ((256, 256), (128, 192)):
        assert model(torch.zeros(1, spec.in_channels, h, w)).shape == (1, 3, h, w)


def test_spec_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        StudentSpec.from_dict({"widthz": [8, 16]})


def test_keras_twin_parity():
    pytest.importorskip("tensorflow", reason="TFLite export path needs tensorflow-cpu")
    from ground.student import build_keras

    spec = StudentSpec()
    torch.manual_seed(0)
    model = build_student(spec)
    with torch.no_grad():                               # non-trivial BN statistics to fold
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
    model.eval()
    keras = build_keras(spec, model, 64)
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 4)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    got = keras(x, training=False).numpy()
    assert np.abs(ref - got).max() < 1e-4


def _batch(labels, t1, t2):
    b, _, h, w = t1.shape
    return {"labels": labels, "t_probs": {"a": t1, "b": t2},
            "t_feats": {"a": torch.ones(b, 64, h // 8, w // 8), "b": torch.ones(b, 64, h // 8, w // 8)}}


def _probs(cls, conf, shape=(2, 3, 16, 16)):
    p = torch.full(shape, (1 - conf) / 2)
    p[:, cls] = conf
    return p


def test_kl_soft_is_zero_at_the_teacher_and_positive_elsewhere():
    t = _probs(1, 0.9)
    b = _batch(torch.full((2, 16, 16), 255), t, t)
    assert float(L.kl_soft({"logits": torch.log(t)}, b, {"teacher": "a"})) == pytest.approx(0, abs=1e-5)
    assert float(L.kl_soft({"logits": torch.zeros_like(t)}, b, {"teacher": "a"})) > 0.1


def test_confidence_weighting_trusts_the_confident_teacher():
    confident, unsure = _probs(1, 0.98), _probs(0, 0.34)
    b = _batch(torch.full((2, 16, 16), 255), confident, unsure)
    target, w = L.confidence_weighted_target(b, ["a", "b"])
    assert float(w[0].mean()) > 0.9 and float(target[:, 1].mean()) > 0.85
    b2 = _batch(torch.full((2, 16, 16), 255), unsure, confident)      # order must not matter
    assert torch.allclose(L.confidence_weighted_target(b2, ["a", "b"])[0], target, atol=1e-6)


def test_dkd_rejects_teachers_that_contradict_labels():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[1] = 255                                     # sample 1 unlabelled
    wrong = _probs(1, 0.95)                             # says cloud where the label says clear
    b = _batch(labels, wrong, wrong)
    logits = torch.zeros(2, 3, 16, 16, requires_grad=True)
    stats = {}
    loss = L.dkd({"logits": logits}, b, {"teachers": ["a", "b"], "min_label_agreement": 0.7}, stats)
    assert stats["dkd_kept"] == 0.5                     # sample 0 rejected, sample 1 kept
    loss.backward()
    assert float(logits.grad[0].abs().sum()) == 0 and float(logits.grad[1].abs().sum()) > 0


def test_dkd_foreground_background_decoupling():
    # one cloudy pixel among 256: decoupled averaging gives it as much weight as the background
    labels = torch.zeros(1, 16, 16, dtype=torch.long); labels[0, 0, 0] = 1
    t = _probs(0, 0.9, (1, 3, 16, 16)); t[0, :, 0, 0] = torch.tensor([0.05, 0.9, 0.05])
    logits = torch.log(t.clone()); logits[0, :, 0, 0] = torch.tensor([0.0, -5.0, -5.0])   # misses the cloud
    b = _batch(labels, t, t)
    loss = L.dkd({"logits": logits}, b, {"teachers": ["a", "b"], "fg_weight": 1.0, "bg_weight": 0.5, "outlier_mad": None})
    plain = L._kl_map(logits, t, 1.0).mean()
    assert float(loss) > 50 * float(plain)


def test_pseudo_labels_need_agreement_and_confidence():
    a, b_ = _probs(1, 0.95), _probs(1, 0.95)
    b_[:, :, :8] = _probs(2, 0.95)[:, :, :8]            # teachers disagree on the top half
    b = _batch(torch.full((2, 16, 16), 255), a, b_)
    logits = torch.zeros(2, 3, 16, 16)
    stats = {}
    L.sslkd_pseudo({"logits": logits}, b, {"teachers": ["a", "b"], "threshold": 0.8}, stats)
    assert stats["pseudo_px"] == pytest.approx(0.5)


def test_loss_terms_report_statistics_to_the_sink_not_the_batch():
    """Issue 12 item 11: diagnostics go to the stats dict the caller passes; the batch is not written
    (but for the per-batch target memo), and without a sink nothing is recorded."""
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[1] = 255
    wrong = _probs(1, 0.95)
    logits = {"logits": torch.zeros(2, 3, 16, 16)}
    cfg = {"teachers": ["a", "b"], "teacher": "a", "reject_label_conflicts": True, "threshold": 0.8}
    for name, term in L.LOSS_TERMS.items():
        b = _batch(labels, wrong, wrong)
        keys = set(b)
        stats = {}
        out = {**logits, "adapted": {"a": torch.ones(2, 64, 2, 2), "b": torch.ones(2, 64, 2, 2)}}
        term(out, b, cfg, stats)
        assert set(b) - {"_cache"} == keys, name
        term(out, _batch(labels, wrong, wrong), cfg)               # no sink: fine, nothing recorded
        if name in ("kl_soft", "confidence_weighted_kl", "dkd", "sslkd_probability"):
            assert stats["label_conflict_px"] == pytest.approx(0.5), name   # sample 0 contradicts its label
    stats = {}
    L.dkd(logits, _batch(labels, wrong, wrong), {"teachers": ["a", "b"]}, stats)
    assert set(stats) == {"dkd_kept"}


def test_feature_alignment_is_zero_when_aligned():
    b = _batch(torch.zeros(1, 16, 16, dtype=torch.long), _probs(0, 0.9, (1, 3, 16, 16)), _probs(0, 0.9, (1, 3, 16, 16)))
    out = {"adapted": {"a": torch.ones(1, 64, 2, 2) * 3, "b": -torch.ones(1, 64, 2, 2)}}
    assert float(L.sslkd_feature(out, b, {"teachers": ["a"]})) == pytest.approx(0, abs=1e-6)
    assert float(L.sslkd_feature(out, b, {"teachers": ["b"]})) == pytest.approx(2.0)


def test_loss_term_validation():
    with pytest.raises(ValueError, match="losses\\[0\\].type"):
        L.validate_terms([{"type": "magic"}], ["a"])
    with pytest.raises(ValueError, match="teacher 'z'"):
        L.validate_terms([{"type": "kl_soft", "teacher": "z"}], ["a"])


def test_experiment_config_errors_name_the_key(tmp_path):
    import flight
    from ground.distill import load_config
    from ground.errors import ExperimentConfigError as ConfigError

    import ground.distill
    assert ground.distill.ConfigError is ConfigError and issubclass(ConfigError, ValueError)
    assert not issubclass(ConfigError, flight.ConfigError) and not issubclass(flight.ConfigError, ConfigError)

    cfg = yaml.safe_load(DEFAULT_CFG.read_text())
    del cfg["train"]["lr"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p)
    cfg = yaml.safe_load(DEFAULT_CFG.read_text())
    cfg["losses"][1]["teachers"] = ["t1_vnir", "ghost"]
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="ghost"):
        load_config(p)
    cfg = yaml.safe_load(DEFAULT_CFG.read_text())
    cfg["calibration"]["cloud_logit_bias"] = "big"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="calibration.cloud_logit_bias"):
        load_config(p)


def test_ground_cli_names_which_config_was_bad(tmp_path, capsys, monkeypatch):
    """Issue 12 item 11: an experiment config error and a gate config error are reported apart."""
    import flight
    import ground.evaluate
    from ground.__main__ import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\n")
    assert main(["pool", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: experiment config: ") and "missing key(s)" in err

    def gate_refuses(*_):
        raise flight.ConfigError("policy.hysteresis", "must be in [0, 0.2)")

    monkeypatch.setattr(ground.evaluate, "evaluate_cli", gate_refuses)
    assert main(["evaluate", "--model", "models/x.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: gate config (flight.CloudGate): config key 'policy.hysteresis'")


def test_cloud_bias_is_exact_in_the_head_and_chosen_on_scene_cf_error():
    from ground.calibrate import apply_cloud_bias, choose_cloud_bias

    spec = StudentSpec.from_dict(yaml.safe_load(DEFAULT_CFG.read_text())["student"])
    torch.manual_seed(0)
    model = build_student(spec).eval()
    x = torch.rand(1, spec.in_channels, 64, 64)
    with torch.no_grad():
        before = model(x)
        apply_cloud_bias(model, 1.25)
        after = model(x)
    shift = (after - before)[0]
    assert torch.allclose(shift[1], torch.full_like(shift[1], 1.25), atol=1e-5)   # cloud logit only
    assert torch.allclose(shift[0], torch.zeros_like(shift[0]), atol=1e-6)
    # A fake model whose cloud logit sits 0.6 below clear on the true cloud: +0.75 recovers the fraction.
    label = np.zeros((256, 256), np.uint8)
    label[:, :100] = 1
    img = np.zeros((256, 256, 4), np.float32)
    img[..., 0] = label

    def fake(xb):
        lg = np.zeros(xb.shape[:3] + (3,), np.float32)
        lg[..., 0] = 1.0
        lg[..., 1] = np.where(xb[..., 0] > 0, 0.4, -5.0)
        return lg

    r = choose_cloud_bias(fake, [("s", img, label)])
    assert r["cloud_logit_bias"] == 0.75
    assert next(row for row in r["picked_on"]["table"] if row["bias"] == 0.0)["mean_abs_cf_error"] == pytest.approx(100 / 256, abs=1e-3)


def test_kd_terms_do_not_distil_teacher_mistakes_where_labels_exist():
    labels = torch.full((1, 4, 4), L.IGNORE, dtype=torch.long)
    labels[0, :2] = 0                                      # human says clear on the top half
    tp = torch.zeros(1, 3, 4, 4)
    tp[:, 1] = 1.0                                         # teacher says cloud everywhere
    batch = {"labels": labels, "t_probs": {"t": tp}}
    w = L.label_trust(batch, tp, {"reject_label_conflicts": True})
    assert w[0, :2].sum() == 0 and w[0, 2:].min() == 1
    assert L.label_trust(batch, tp, {}).min() == 1          # off unless asked for
    out = {"logits": torch.zeros(1, 3, 4, 4)}
    assert L.kl_soft(out, batch, {"teacher": "t", "reject_label_conflicts": True}) < L.kl_soft(out, batch, {"teacher": "t"})


def _write_scene(path: Path, seed: int, labelled: bool):
    sc = make_scene(seed, size=160)
    np.savez(path, bands=sc.reflectance, band_names=np.array(["B2_blue", "B3_green", "B4_red", "B5_nir", "B6_swir16", "B7_swir22"]),
             units="TOA reflectance float32", sensor="Landsat-8 OLI",
             **({"mask": sc.mask} if labelled else {}))


def _tiny_config(tmp_path, steps, name="tiny"):
    cfg = yaml.safe_load(DEFAULT_CFG.read_text())
    cfg["experiment"] = name
    real = tmp_path / "real"
    (real / "a").mkdir(parents=True, exist_ok=True)
    _write_scene(real / "a" / "tiny_labelled.npz", 1, True)
    _write_scene(real / "a" / "tiny_unlabelled.npz", 2, False)
    cfg["pool"].update(views=8, real_root=str(real))   # teachers take 256² tiles
    cfg["data"].update(train_views=4, candidate_views=2, probe_views=2)
    cfg["train"].update(steps=steps, batch=2, ckpt_every=2, precise_bn_batches=2)
    cfg["mining"].update(rounds=1, add_views=1, steps=2)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_view_pool_is_deterministic_and_keeps_labels_aligned(tmp_path):
    from ground.transfer import Source, make_view

    real = tmp_path / "r"
    real.mkdir()
    _write_scene(real / "l.npz", 3, True)
    src = [Source(real / "l.npz")]
    cfg = {"tile": 64, "synthetic_share": 0.0, "p_mixup": 0.0, "p_cutmix": 0.0, "p_gain": 0.0, "p_haze": 0.0,
           "p_noise": 0.0, "p_saturation": 0.0, "labelled_view_share": 1.0}
    a = make_view(np.random.default_rng([0, 5]), src, [0], cfg)
    b = make_view(np.random.default_rng([0, 5]), src, [0], cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # without radiometric change, cloud pixels of the view are brighter than clear ones, as in the scene
    x, y = a[0], a[1]
    if (y == 1).any() and (y == 0).any():
        assert x[y == 1, :3].mean() > x[y == 0, :3].mean()


def _env(tmp_path):
    return dict(os.environ, CLOUDGATE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _weights(pt):
    return torch.load(pt, weights_only=False)["state_dict"]


@pytest.mark.slow  # two trainings, one killed and resumed
def test_distill_resumes_after_kill_with_identical_result(tmp_path):
    env = _env(tmp_path)
    full = _tiny_config(tmp_path, 10, "full")
    subprocess.run([sys.executable, "-m", "ground", "distill", "--config", str(full), "--out", str(tmp_path / "r1")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    cfg = _tiny_config(tmp_path, 10, "full")
    proc = subprocess.Popen([sys.executable, "-m", "ground", "distill", "--config", str(cfg), "--out", str(tmp_path / "r2")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "r2/full/kd/checkpoint.pt"
    t0 = time.time()
    while not ckpt.exists() and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "r2/full/kd/student.pt").exists()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 10
    out = subprocess.run([sys.executable, "-m", "ground", "distill", "--config", str(cfg), "--out", str(tmp_path / "r2")],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "resuming from step" in out.stdout + out.stderr
    for run in ("kd", "kd_round1", "baseline"):
        a, b = _weights(tmp_path / f"r1/full/{run}/student.pt"), _weights(tmp_path / f"r2/full/{run}/student.pt")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), run


@pytest.mark.slow  # a two-process DDP training
def test_ddp_two_processes_identical_weights(tmp_path):
    env = _env(tmp_path)
    cfg = _tiny_config(tmp_path, 4, "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        "-m", "ground", "distill", "--config", str(cfg), "--out", str(tmp_path / "runs")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # torchrun's summary hides the failing rank's traceback: show the whole log on failure.
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    for run in ("kd", "kd_round1", "baseline"):
        rep = json.loads((tmp_path / f"runs/ddp/{run}/ddp_consistency.json").read_text())
        assert rep["world_size"] == 2 and rep["max_abs_param_diff"] == 0.0
        assert (tmp_path / f"runs/ddp/{run}/student.pt").exists()


def test_ablate_report_without_runs_refuses_and_keeps_the_report(tmp_path, monkeypatch, capsys):
    """Issue 19: on a fresh clone (runs/ is not committed) `python -m ground ablate --report docs/results/ablation`
    exited 0 and overwrote the committed report with an empty table. No finished run: exit 2, nothing written."""
    import ground.ablation as ablation
    from ground.__main__ import main

    monkeypatch.setattr(ablation, "RUNS", tmp_path / "runs" / "ablation")
    out = tmp_path / "results" / "ablation"
    out.parent.mkdir()
    out.with_suffix(".md").write_text("the committed report\n")
    with pytest.raises(FileNotFoundError, match="no finished ablation run"):
        ablation.report({"steps": 1, "base_config": "x"}, out)
    assert main(["ablate", "--report", str(out)]) == 2
    assert "no finished ablation run" in capsys.readouterr().err
    assert out.with_suffix(".md").read_text() == "the committed report\n"
    assert not out.with_suffix(".json").exists() and not (tmp_path / "results" / "ablation_pareto.png").exists()
