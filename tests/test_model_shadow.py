"""Issue 17 shadow mode: a newly installed model runs beside the active one on the next N frames, its
disagreement is logged, and activation can require shadow_frames >= N and action agreement >= x."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flight import CloudGate, read_log
from flight.model import default_card, load_card
from flight.package import load_key, pack, write_key


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("shadow")
    write_key(d / "key")
    key = load_key(d / "key")
    return {"key": key, "keyfile": d / "key", "v5": d / "v5.cgpkg", "v6": d / "v6.cgpkg",
            "pkg5": pack(default_card(), key, d / "v5.cgpkg", model_version=5),
            "pkg6": pack(default_card(), key, d / "v6.cgpkg", model_version=6)}


def _store(tmp_path, kit, **kw):
    from flight.slots import ModelStore

    return ModelStore(tmp_path / "store", kit["key"], **kw)


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_staged_model_runs_in_shadow_and_activation_waits_for_it(tmp_path, kit, backend):
    from flight.shadow import ShadowMonitor, read_shadow
    from flight.slots import ShadowHeldError

    st = _store(tmp_path, kit)
    st.install(kit["v5"], activate=True)
    staged = st.install(kit["v6"])["slot"]
    gated = _store(tmp_path, kit, shadow_frames=3, shadow_min_agreement=0.9)
    with pytest.raises(ShadowHeldError, match="no shadow run"):
        gated.activate(staged)
    card = load_card(default_card())
    rng = np.random.default_rng(0)
    with CloudGate.from_model(backend=backend, update={"store": str(st.root), "key": str(kit["keyfile"])}) as g:
        mon = ShadowMonitor(st, kit["keyfile"], 3, gate_options={"backend": backend})
        seen = []
        for i in range(5):
            scene = rng.uniform(0.02, 0.6, (300, 300, len(card.bands))).astype(np.float32)
            mask = np.empty((300, 300), np.uint8)
            d = g.process(scene, tuple(card.bands), mask_out=mask)
            assert d.package_sha256 == kit["pkg5"].sha256              # the active model decides
            seen.append(mon.observe(scene, tuple(card.bands), d, active_mask=mask))
        mon.close()
    assert [s is not None for s in seen] == [True, True, True, False, False]      # N frames, then done
    rec = read_shadow(st, staged)
    assert rec["frames"] == 3 and rec["action_agreement"] == 1.0 and rec["pixel_agreement"] == 1.0
    assert rec["package_sha256"] == kit["pkg6"].sha256
    events = [r["event"] for r in read_log(st.root / "journal.jsonl").records]
    assert events.count("model_shadow") == 5 and "model_shadow_held" in events    # start, 3 frames, done
    assert gated.activate(staged)["changed"]


def test_a_candidate_that_disagrees_is_held_back(tmp_path, kit):
    from flight.slots import ShadowHeldError

    st = _store(tmp_path, kit, shadow_frames=10, shadow_min_agreement=0.9)
    st.install(kit["v5"], activate=True)
    staged = st.install(kit["v6"])["slot"]
    (st.root / "slots" / staged / "shadow.json").write_text(json.dumps(
        {"package_sha256": kit["pkg6"].sha256, "frames": 12, "action_agreement": 0.5, "mean_abs_cf_diff": 0.2}))
    with pytest.raises(ShadowHeldError, match="agreement 0.500"):
        st.activate(staged)
    (st.root / "slots" / staged / "shadow.json").write_text(json.dumps(
        {"package_sha256": kit["pkg6"].sha256, "frames": 4, "action_agreement": 1.0}))
    with pytest.raises(ShadowHeldError, match="4 of 10"):
        st.activate(staged)
    assert st.read_pointer().package_sha256 == kit["pkg5"].sha256


def test_rollback_to_a_model_that_ran_before_needs_no_shadow_run(tmp_path, kit):
    from flight.slots import ModelStore

    st = _store(tmp_path, kit)
    st.install(kit["v5"], activate=True)
    st.install(kit["v6"], activate=True)
    held = ModelStore(st.root, kit["key"], shadow_frames=10, shadow_min_agreement=0.9)
    assert held.rollback()["slot"] == "a"


# ---------------------------------------------------------------- the bar as gate config (update.shadow_frames / _min_agreement)
def test_shadow_bar_config_keys_default_to_no_bar_and_are_accepted():
    from flight import GateConfig, config_from_dict

    assert (GateConfig().update.shadow_frames, GateConfig().update.shadow_min_agreement) == (0, 0.0)
    u = config_from_dict({"update": {"shadow_frames": 3, "shadow_min_agreement": 1}}).update
    assert (u.shadow_frames, u.shadow_min_agreement) == (3, 1.0)


@pytest.mark.parametrize("update,key,says", [
    ({"shadow_frames": -1}, "update.shadow_frames", "0..1000000"),
    ({"shadow_frames": 2.5}, "update.shadow_frames", "expected int"),
    ({"shadow_frames": True}, "update.shadow_frames", "expected int"),
    ({"shadow_frames": 3, "shadow_min_agreement": 1.5}, "update.shadow_min_agreement", "[0, 1]"),
    ({"shadow_frames": 3, "shadow_min_agreement": -0.1}, "update.shadow_min_agreement", "[0, 1]"),
    ({"shadow_frames": 3, "shadow_min_agreement": float("nan")}, "update.shadow_min_agreement", "[0, 1]"),
    ({"shadow_frames": 3, "shadow_min_agreement": "high"}, "update.shadow_min_agreement", "expected float"),
    ({"shadow_min_agreement": 0.9}, "update.shadow_min_agreement", "update.shadow_frames >= 1"),
])
def test_bad_shadow_bar_config_names_the_key_and_the_range(update, key, says):
    from flight import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"update": update})
    assert e.value.key == key and key in str(e.value) and says in str(e.value)
    assert "unknown key" not in str(e.value)


def _gated(tmp_path, kit, frames=2, agreement=0.9, **kw):
    """A gate on tmp_path/store whose config asks for a shadow run before an activation."""
    return CloudGate.from_model(backend="onnxruntime", update={
        "store": str(tmp_path / "store"), "key": str(kit["keyfile"]), "shadow_frames": frames,
        "shadow_min_agreement": agreement}, **kw)


def test_gate_config_shadow_bar_holds_an_in_process_activation_until_a_shadow_run(tmp_path, kit):
    from flight.shadow import ShadowMonitor
    from flight.slots import ShadowHeldError

    st = _store(tmp_path, kit)
    st.install(kit["v5"], activate=True)
    staged = st.install(kit["v6"])["slot"]
    card = load_card(default_card())
    bands = tuple(card.bands)
    rng = np.random.default_rng(1)
    with _gated(tmp_path, kit, log={"path": str(tmp_path / "decisions.jsonl")}) as g:
        with pytest.raises(ShadowHeldError, match="no shadow run") as e:
            g.activate()
        assert e.value.code == "model_shadow_held"
        assert g.model_status()["package_sha256"] == kit["pkg5"].sha256 == st.read_pointer().package_sha256
        mon = ShadowMonitor(g.store, kit["keyfile"], 2, gate_options={"backend": "onnxruntime"})
        for _ in range(2):
            scene = rng.uniform(0.02, 0.6, (300, 300, len(bands))).astype(np.float32)
            mon.observe(scene, bands, g.process(scene, bands))
        mon.close()
        res = g.activate()
        assert res["slot"] == staged and res["package_sha256"] == kit["pkg6"].sha256
        assert g.process(scene, bands).package_sha256 == kit["pkg6"].sha256
    assert st.read_pointer().package_sha256 == kit["pkg6"].sha256
    journal = [r["event"] for r in read_log(st.root / "journal.jsonl").records]
    assert journal.count("model_shadow_held") == 1 and journal[-1] == "model_switch"
    logged = [r.get("event") for r in read_log(tmp_path / "decisions.jsonl").records]
    assert logged.count("model_shadow_held") == 1                 # the gate's own log says it too


def test_gate_install_and_activate_in_one_step_is_held_by_the_shadow_bar_like_the_cli(tmp_path, kit):
    """The CLI's install --activate --shadow-frames N installs the package (staged) and holds the activation
    (exit 1, model_shadow_held); CloudGate.install(pkg, activate=True) with update.shadow_frames does the same."""
    from flight.slots import ShadowHeldError

    st = _store(tmp_path, kit)
    st.install(kit["v5"], activate=True)
    with _gated(tmp_path, kit) as g:
        with pytest.raises(ShadowHeldError, match="no shadow run"):
            g.install(kit["v6"], activate=True)
        assert g.model_status()["package_sha256"] == kit["pkg5"].sha256
    assert st.read_pointer().package_sha256 == kit["pkg5"].sha256
    staged = [s for s, i in st.status()["slots"].items() if i.get("package_sha256") == kit["pkg6"].sha256]
    assert len(staged) == 1 and not st.activated(staged[0], kit["pkg6"].sha256)    # installed, staged
    journal = [r["event"] for r in read_log(st.root / "journal.jsonl").records]
    assert journal[-2:] == ["model_install", "model_shadow_held"]
    with _gated(tmp_path, kit, frames=0, agreement=0.0) as g:      # no bar: install and activate in one step
        out = g.install(kit["v6"], activate=True)
        assert out["activated"]["package_sha256"] == kit["pkg6"].sha256 == g.model_status()["package_sha256"]


def test_cli_shadow_bar_arguments_are_checked_and_a_held_install_says_it_is_staged(tmp_path, kit):
    """The model CLI refuses a shadow bar it cannot apply (exit 2 with a message: out-of-range agreement or
    frames, an agreement without frames) and, when install --activate is held by the bar, says that the
    package was installed and is staged (exit 1), and the store still runs the model it ran before."""
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flight", "model", *map(str, args)], capture_output=True, text=True)

    store = tmp_path / "store"
    base = ("--store", store, "--key", kit["keyfile"])
    assert cli("install", kit["v5"], *base, "--activate").returncode == 0
    for bad in (("--shadow-frames", "3", "--min-agreement", "1.5"), ("--shadow-frames", "3", "--min-agreement", "nan"),
                ("--shadow-frames", "-1"), ("--min-agreement", "0.9")):
        r = cli("install", kit["v6"], *base, "--activate", *bad)
        assert r.returncode == 2 and ("min-agreement" in r.stderr or "shadow-frames" in r.stderr), (bad, r.stderr)
    r = cli("install", kit["v6"], *base, "--activate", "--shadow-frames", "3", "--min-agreement", "0.9")
    assert r.returncode == 1 and "installed, not activated" in r.stderr and "staged" in r.stderr, r.stderr
    status = _store(tmp_path, kit).status()
    assert status["slots"][status["active"]]["package_sha256"] == kit["pkg5"].sha256     # still the old model
    staged = "a" if status["active"] == "b" else "b"
    assert status["slots"][staged]["package_sha256"] == kit["pkg6"].sha256 and not status["slots"][staged]["activated"]
