"""Issue 10: in-orbit model update. Signed packages, card <-> model consistency for both runtimes, hardened
artifact reading, a known-answer self-test on the running interpreter, A/B slots with an atomic pointer,
swap / rollback without restart, coded model events in the log, the `python -m flight model` CLI.

Every package is built here, in tmp_path, from the current models/ artifacts (the shipped model may be
replaced; nothing below names a band count or a hash)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from flight import CloudGate, ModelError, ModelIntegrityError, read_log
from flight.model import MODELS_DIR, default_card, load_card
from flight.package import MAGIC, assemble, load_key, open_package, pack, write_key
from flight.slots import ModelStore

PY = sys.executable


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A mission key, a package of the default model and one of a second model (both made here)."""
    d = tmp_path_factory.mktemp("pkg")
    write_key(d / "key")
    key = load_key(d / "key")
    p1 = pack(default_card(), key, d / "m1.cgpkg", model_version=2)
    from hil.update import differing_card

    p2 = pack(differing_card(d / "cloud-biased"), key, d / "m2.cgpkg", model_version=2)
    return {"dir": d, "key": key, "keyfile": d / "key", "p1": d / "m1.cgpkg", "p2": d / "m2.cgpkg",
            "pkg1": p1, "pkg2": p2}


def _scene(seed=0):
    card = load_card(default_card())
    rng = np.random.default_rng(seed)
    return rng.uniform(0.02, 0.4, (300, 300, len(card.bands))).astype(np.float32), tuple(card.bands)


def _store(tmp_path, kit, activate=True) -> ModelStore:
    st = ModelStore(tmp_path / "store", kit["key"])
    out = st.install(kit["p1"])
    if activate:
        st.activate(out["slot"])
    return st


def _gate(store_dir, kit, **kw):
    up = dict({"store": str(store_dir), "key": str(kit["keyfile"])}, **kw.pop("update", {}))
    return CloudGate.from_model(update=up, **kw)


# ---------------------------------------------------------------- finding 1: the card is protected by the signature
def test_package_round_trip_and_every_decision_names_it(tmp_path, kit):
    pkg = open_package(kit["p1"], kit["key"])
    card = load_card(default_card())
    assert pkg.card.bands == card.bands and dict(pkg.card.raw, model_version=None) == dict(card.raw, model_version=None)
    assert pkg.card.raw["model_version"] > 0                  # pack signs a monotonic version into the card
    assert {k: v[0] for k, v in pkg.artifacts.items()} == {k: card.artifacts[k]["file"] for k in pkg.artifacts}
    assert pkg.size < 5 * 2**20 and set(pkg.golden["expected"]) == {"litert", "onnxruntime"}
    scene, bands = _scene()
    for be in ("litert", "onnxruntime"):
        with CloudGate.from_model(kit["p1"], backend=be, update={"key": str(kit["keyfile"])},
                                  log={"path": str(tmp_path / f"{be}.jsonl")}) as g:
            d = g.process(scene, bands)
            assert d.package_sha256 == pkg.sha256 and d.model_sha256 == card.artifacts[
                "tflite_int8" if be == "litert" else "onnx_int8"]["sha256"]
        recs = read_log(tmp_path / f"{be}.jsonl").records
        assert [r.get("event") for r in recs if r.get("kind") == "model_event"] == ["model_loaded"]
        assert recs[-1]["package_sha256"] == pkg.sha256


def _tamper(data: bytes, fn) -> bytes:
    """An attacker without the key: edit a member, fix the header's sha256 and sizes, keep the tag."""
    (hlen,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12:12 + hlen])
    payload = data[12 + hlen:-32]
    members = {m["name"]: payload[m["offset"]:m["offset"] + m["size"]] for m in header["members"]}
    fn(members, header)
    out, off = [], 0
    for m in header["members"]:
        b = members[m["name"]]
        m.update(offset=off, size=len(b), sha256=hashlib.sha256(b).hexdigest())
        out.append(b)
        off += len(b)
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(hb)) + hb + b"".join(out) + data[-32:]


def _swap_bands(members, header):
    raw = yaml.safe_load(members["card.yaml"])
    raw["bands"][2], raw["bands"][-1] = raw["bands"][-1], raw["bands"][2]     # red <-> nir
    members["card.yaml"] = yaml.safe_dump(raw, sort_keys=False).encode()


def _fp32_for_int8(members, header):
    """The fp32 baseline in place of the INT8 ONNX model, its sha256 written into the card."""
    card = load_card(default_card())
    fp32 = (MODELS_DIR / card.artifacts["onnx_fp32"]["file"]).read_bytes() if "onnx_fp32" in card.artifacts else b"x"
    raw = yaml.safe_load(members["card.yaml"])
    name = raw["artifacts"]["onnx_int8"]["file"]
    members[name] = fp32
    raw["artifacts"]["onnx_int8"]["sha256"] = hashlib.sha256(fp32).hexdigest()
    members["card.yaml"] = yaml.safe_dump(raw, sort_keys=False).encode()


@pytest.mark.parametrize("attack", ["swap_bands", "fp32_for_int8", "bit_flip", "truncated", "wrong_key"])
def test_altered_truncated_or_foreign_packages_are_refused(tmp_path, kit, attack):
    data = kit["p1"].read_bytes()
    key = kit["key"]
    if attack == "swap_bands":
        data = _tamper(data, _swap_bands)
    elif attack == "fp32_for_int8":
        data = _tamper(data, _fp32_for_int8)
    elif attack == "bit_flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x04
        data = bytes(b)
    elif attack == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        key = os.urandom(32)
    f = tmp_path / "up.cgpkg"
    f.write_bytes(data)
    with pytest.raises(ModelIntegrityError, match="signature") as e:
        open_package(f, key)
    if attack == "truncated":
        assert "truncated" in str(e.value)
    if attack == "wrong_key":
        assert "another key" in str(e.value)
    st = _store(tmp_path, kit)
    before = st.read_pointer()
    with pytest.raises(ModelIntegrityError):
        ModelStore(st.root, key).install(f)
    assert st.read_pointer() == before                       # nothing active changed
    assert st.verify_slot(before.slot)


def test_require_signed_refuses_the_unsigned_card_path(tmp_path, kit):
    """The unsigned card path trusts its card (a card edited red<->nir or carrying the fp32 model's sha256
    loads there); a flight configuration sets update.require_signed and only packages run."""
    with pytest.raises(ModelIntegrityError, match="require_signed"):
        CloudGate.from_model(update={"require_signed": True})
    with CloudGate.from_model(kit["p1"], update={"require_signed": True, "key": str(kit["keyfile"])}) as g:
        assert g.model_status()["signed"]


# ---------------------------------------------------------------- finding 1b: card <-> model consistency, both runtimes
def _card_copy(tmp_path, **edit):
    card = load_card(default_card())
    raw = yaml.safe_load(card.path.read_text())
    for dotted, v in edit.items():
        cur = raw
        parts = dotted.split("__")
        for p in parts[:-1]:
            cur = cur[p]
        cur[parts[-1]] = v
    for a in card.artifacts.values():
        shutil.copy(MODELS_DIR / a["file"], tmp_path / a["file"])
    p = tmp_path / card.path.name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p, card


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_card_with_fewer_bands_than_the_model_is_refused(tmp_path, backend):
    card = load_card(default_card())
    p, _ = _card_copy(tmp_path, bands=list(card.bands[:-1]), optional_bands=[])
    with pytest.raises(ModelIntegrityError, match="bands"):
        CloudGate.from_model(p, backend=backend)


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_card_classes_must_match_the_model_output(tmp_path, backend):
    p, _ = _card_copy(tmp_path, output__classes=["clear", "cloud"])
    # refused by the model file's own description (stamped artifacts) or by the card <-> runtime check
    with pytest.raises(ModelIntegrityError, match="output.classes|does not describe .*classes: card"):
        CloudGate.from_model(p, backend=backend)


@pytest.mark.parametrize("field", ["input_scaling__tflite__scale", "input_scaling__tflite__zero_point",
                                   "output__tflite__scale"])
def test_card_quantization_must_match_the_tflite_model(tmp_path, field):
    card = load_card(default_card())
    cur = card.raw
    for part in field.split("__"):
        cur = cur[part]
    p, _ = _card_copy(tmp_path, **{field: cur * 1.5 if isinstance(cur, float) else cur + 3})
    with pytest.raises(ModelIntegrityError, match=field.replace("__", ".").rsplit(".", 1)[0] + "|does not describe"):
        CloudGate.from_model(p, backend="litert")


def test_signed_but_inconsistent_package_is_refused_at_install(tmp_path, kit):
    """Signed with the right key, but its card lists one band fewer than the model takes."""
    pkg = kit["pkg1"]
    raw = dict(pkg.card.raw, bands=list(pkg.card.bands[:-1]), optional_bands=[])
    data = assemble(yaml.safe_dump(raw, sort_keys=False).encode(), pkg.artifacts,
                    dict(pkg.golden, shape=[len(raw["bands"]), pkg.card.tile, pkg.card.tile]), pkg.golden_blobs,
                    kit["key"])
    f = tmp_path / "mismatch.cgpkg"
    f.write_bytes(data)
    st = _store(tmp_path, kit)
    with pytest.raises(ModelIntegrityError, match="bands|golden tiles"):
        st.install(f)
    assert st.status()["active"] == "a" and not st.package_path("b").exists()


# ---------------------------------------------------------------- finding 3: artifacts are bounded regular files
def _run_probe(code: str, timeout: float = 60):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    def limits():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    return subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limits)


@pytest.mark.parametrize("kind", ["urandom", "fifo", "directory"])
def test_device_fifo_or_directory_artifact_is_refused_without_reading(tmp_path, kind):
    p, card = _card_copy(tmp_path)
    art = tmp_path / card.artifacts["tflite_int8"]["file"]
    art.unlink()
    if kind == "urandom":
        art.symlink_to("/dev/urandom")
    elif kind == "fifo":
        os.mkfifo(art)
    else:
        art.mkdir()
    code = (f"from flight import CloudGate, ModelIntegrityError\n"
            f"try:\n    CloudGate.from_model({str(p)!r}, backend='litert')\nexcept ModelIntegrityError as e:\n"
            f"    print('REFUSED', e)\n")
    r = _run_probe(code, timeout=60)
    assert "REFUSED" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert {"urandom": "character device", "fifo": "FIFO", "directory": "directory"}[kind] in r.stdout


@pytest.mark.parametrize("entry,field", [("a string", "artifacts.tflite_int8"),
                                         ({"file": "x.tflite"}, "artifacts.tflite_int8.sha256"),
                                         ({"file": "../../etc/passwd", "sha256": "0" * 64}, "artifacts.tflite_int8.file"),
                                         ({"file": "x.tflite", "sha256": 5}, "artifacts.tflite_int8.sha256")])
def test_malformed_artifact_entries_are_model_errors(tmp_path, entry, field):
    p, _ = _card_copy(tmp_path, artifacts__tflite_int8=entry)
    with pytest.raises(ModelIntegrityError, match=field.replace(".", r"\.")):
        CloudGate.from_model(p, backend="litert")


# ---------------------------------------------------------------- BIST: install, start, every N scenes, after errors
def test_package_whose_golden_results_do_not_match_is_refused(tmp_path, kit):
    """Signed, consistent, but its expected results are another model's: the self-test refuses it."""
    p1, p2 = kit["pkg1"], kit["pkg2"]
    if p1.artifacts == p2.artifacts:
        pytest.skip("models/ holds a single model")
    golden = json.loads(json.dumps(p1.golden))
    golden["expected"] = json.loads(json.dumps(p2.golden["expected"]))
    f = tmp_path / "bist.cgpkg"
    f.write_bytes(assemble(p1.card.path.read_bytes() if p1.card.path.exists() else
                           yaml.safe_dump(p1.card.raw, sort_keys=False).encode(), p1.artifacts, golden,
                           p1.golden_blobs, kit["key"]))
    st = _store(tmp_path, kit)
    with pytest.raises(ModelIntegrityError, match="self-test"):
        st.install(f)


def test_bist_every_n_scenes_runs_on_the_real_interpreter(kit):
    scene, bands = _scene()
    with CloudGate.from_model(kit["p1"], backend="onnxruntime", update={"key": str(kit["keyfile"]),
                                                                        "bist_every": 3}) as g:
        for _ in range(7):
            g.process(scene, bands)
        assert g.self_tests == 2 and g.self_test_failures == 0
        assert [e["event"] for e in g.model_events].count("bist_pass") == 2


def test_runtime_error_triggers_a_self_test_before_the_next_scene(kit):
    from hil.faults import FaultBackendFactory

    ports = FaultBackendFactory()
    with CloudGate.from_model(backend="litert", backend_factory=ports, update={"bist_every": 0}) as g:
        scene, bands = _scene()
        real = ports.backend._inner.infer
        ports.backend._inner.infer = lambda *a: (_ for _ in ()).throw(RuntimeError("runtime fell over"))
        d = g.process(scene, bands)
        assert d.fault_code == "internal"
        ports.backend._inner.infer = real
        d = g.process(scene, bands)
        assert g.self_tests == 1 and d.action != "fault"


def _upset(ports, seed=0):
    """Bit flips in the weights onnxruntime executes (hil.faults: its own initializers)."""
    from hil.faults import flip_runtime_weights

    assert flip_runtime_weights(ports.backend, 4, np.random.default_rng(seed))


def test_bist_failure_chain_reload_then_other_slot_then_model_corrupt_with_the_loop_alive(tmp_path, kit):
    from hil.faults import FaultBackendFactory

    st = _store(tmp_path, kit)
    st.install(kit["p2"])                                       # slot b: the other model, activated once
    st.activate("b")                                            # (a staged package is never rolled back to)
    st.activate("a")
    ports = FaultBackendFactory()
    log = tmp_path / "d.jsonl"
    g = _gate(st.root, kit, backend="onnxruntime", backend_factory=ports, update={"bist_every": 1},
              log={"path": str(log)})
    scene, bands = _scene()
    assert g.model_status()["slot"] == "a"
    # 1. an upset in the running weights: the self-test fails, the same slot reloads verified
    _upset(ports)
    d = g.process(scene, bands)
    assert [e["code"] for e in d.degraded] == ["model_bist_recovered"] and g.model_status()["slot"] == "a"
    # 2. upset again and slot a's file corrupt on disk: reload fails, slot b takes over (persisted)
    pa = st.package_path("a")                   # (bytes objects holding model copies would be hit by the
    bad = bytearray(pa.read_bytes()); bad[len(bad) // 3] ^= 1; pa.write_bytes(bytes(bad))   # upsets: files only)
    del bad
    _upset(ports)
    d = g.process(scene, bands)
    assert d.action != "fault" and g.model_status()["slot"] == "b" and st.read_pointer().slot == "b"
    assert d.model_slot == "b" and d.package_sha256 == kit["pkg2"].sha256
    # 3. both slots bad: every scene faults model_corrupt, the loop stays alive
    pb = st.package_path("b")
    shutil.copy(pb, tmp_path / "good_b")
    bad = bytearray(pb.read_bytes()); bad[len(bad) // 3] ^= 1; pb.write_bytes(bytes(bad))
    del bad
    _upset(ports)
    ds = [g.process(scene, bands) for _ in range(12)]
    assert all(x.action == "fault" and x.fault_code == "model_corrupt" for x in ds)
    # 4. a good package back in slot b: recovery is retried and a verified model runs again
    shutil.copy(tmp_path / "good_b", pb)
    ds = [g.process(scene, bands) for _ in range(12)]
    assert ds[-1].action != "fault" and g.model_status()["running"]
    g.close()
    events = [r["event"] for r in read_log(log).records if r.get("kind") == "model_event"]
    for code in ("model_loaded", "bist_fail", "model_reload", "model_rollback", "model_unavailable"):
        assert code in events, (code, events)
    assert not read_log(log).problems


# ---------------------------------------------------------------- A/B slots, atomic pointer, kill -9 anywhere
INSTALL_PHASES = ["verify_upload", "write_slot", "write_tmp", "write_tmp_partial", "fsync_tmp", "rename",
                  "fsync_dir", "written", "verify_slot", "installed"]
SWITCH_PHASES = ["verify_slot", "pointer_write", "pointer_partial", "pointer_fsync", "pointer_rename",
                 "pointer_fsync_dir", "pointer_done"]


@pytest.mark.parametrize("op,phase", [("install", p) for p in INSTALL_PHASES] + [("activate", p) for p in SWITCH_PHASES])
def test_kill_9_at_any_point_leaves_the_old_or_new_model_active_and_verified(tmp_path, kit, op, phase):
    st = _store(tmp_path, kit)
    if op == "activate":
        st.install(kit["p2"])
    before = st.read_pointer()
    code = (f"import os, signal\nfrom flight.package import load_key\nfrom flight.slots import ModelStore\n"
            f"st = ModelStore({str(st.root)!r}, load_key({str(kit['keyfile'])!r}))\n"
            f"def hook(p):\n    if p == {phase!r}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            + (f"st.install({str(kit['p2'])!r}, progress=hook)\n" if op == "install" else
               "st.activate('b', progress=hook)\n") + "print('NOT KILLED')\n")
    r = _run_probe(code)
    assert r.returncode == -signal.SIGKILL, (r.stdout, r.stderr[-1500:])
    after = ModelStore(st.root, kit["key"]).read_pointer()
    assert after is not None
    if op == "install":
        assert after == before                               # install never switches
    else:
        assert after.slot in ("a", "b")
        assert (after == before) if SWITCH_PHASES.index(phase) < SWITCH_PHASES.index("pointer_fsync_dir") else \
            after.slot == "b"
    pkg, res = st.verify_slot(after.slot)
    assert pkg.sha256 == after.package_sha256 and all(r_.passed for r_ in res.values())
    with _gate(st.root, kit) as g:                           # and a gate starts on it
        assert g.model_status()["slot"] == after.slot and g.model_status()["running"]


def test_damaged_pointer_falls_back_to_a_verified_slot(tmp_path, kit):
    st = _store(tmp_path, kit)
    st.pointer_path.write_text('{"slot": "a", "generation": 99}')      # no valid check digest
    with _gate(st.root, kit) as g:
        assert g.model_status()["running"] and g.model_status()["slot"] == "a"


# ---------------------------------------------------------------- swap without restart, rollback manual and automatic
def test_swap_model_between_scenes_and_manual_rollback(kit):
    scene, bands = _scene()
    with CloudGate.from_model(kit["p1"], update={"key": str(kit["keyfile"])}) as g:
        before = g.buffer_bytes
        d1 = g.process(scene, bands)
        g.swap_model(kit["p2"])
        d2 = g.process(scene, bands)
        assert d2.package_sha256 == kit["pkg2"].sha256 != d1.package_sha256
        assert 0 < before and g.buffer_bytes <= g.config.memory_budget_mib * 2**20
        bad = kit["dir"] / "bad.cgpkg"
        bad.write_bytes(kit["p1"].read_bytes()[:-1] + b"\0")
        with pytest.raises(ModelIntegrityError):
            g.swap_model(bad)
        assert g.process(scene, bands).package_sha256 == kit["pkg2"].sha256      # the running model stays
        g.rollback()
        assert g.process(scene, bands).package_sha256 == kit["pkg1"].sha256
        codes = [e["event"] for e in g.model_events]
        assert "model_switch" in codes and "model_switch_refused" in codes and "model_rollback" in codes


def test_swap_refused_over_the_memory_budget(kit):
    with CloudGate.from_model(kit["p1"], update={"key": str(kit["keyfile"])}, tile=256, workers=1) as g:
        budget = g.buffer_bytes / 2**20
    with CloudGate.from_model(kit["p1"], update={"key": str(kit["keyfile"])}, memory_budget_mib=budget, workers=1) as g:
        from dataclasses import replace

        g.config = replace(g.config, memory_budget_mib=budget * 0.99)     # the next model would not fit
        with pytest.raises(ModelError, match="memory_budget_mib"):
            g.swap_model(kit["p2"])
        assert g.model_status()["running"]


def test_automatic_rollback_when_the_new_model_faults_too_often(tmp_path, kit):
    """The new model is slow on this board (every frame hits the deadline): rolled back within the window."""
    if kit["pkg1"].artifacts == kit["pkg2"].artifacts:
        pytest.skip("models/ holds a single model")
    from hil.faults import FaultBackendFactory

    slow_sha = kit["pkg2"].card.artifacts["tflite_int8"]["sha256"]

    class SlowNewModel(FaultBackendFactory):
        def __call__(self, path, model_bytes, kind, threads, tile, n_bands):
            b = super().__call__(path, model_bytes, kind, threads, tile, n_bands)
            b._slow = hashlib.sha256(model_bytes).hexdigest() == slow_sha
            return b

    ports = SlowNewModel()
    st = _store(tmp_path, kit)
    st.install(kit["p2"])
    g = _gate(st.root, kit, backend="litert", backend_factory=ports, deadline_s=0.05,
              early_exit={"enabled": False}, update={"rollback_window": 10, "rollback_fault_rate": 0.3})
    scene = np.random.default_rng(0).uniform(0.02, 0.4, (700, 700, len(g.bands))).astype(np.float32)
    g.activate("b")
    assert g.model_status()["slot"] == "b"
    for _ in range(6):
        ports.stall_s = 0.06 if ports.backend._slow else 0.0
        g.process(scene, tuple(g.bands))
    assert g.model_status()["slot"] == "a" and st.read_pointer().slot == "a"
    assert any(e["event"] == "model_rollback" and "automatic" in e["text"] for e in g.model_events)
    g.close()


def test_gate_follows_an_activation_made_by_the_cli(tmp_path, kit):
    st = _store(tmp_path, kit)
    st.install(kit["p2"])
    scene, bands = _scene()
    with _gate(st.root, kit) as g:
        assert g.process(scene, bands).model_slot == "a"
        r = subprocess.run([PY, "-m", "flight", "model", "activate", "b", "--store", str(st.root), "--key",
                            str(kit["keyfile"])], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        d = g.process(scene, bands)
        assert d.model_slot == "b" and d.package_sha256 == kit["pkg2"].sha256
    journal = [r["event"] for r in read_log(st.root / "journal.jsonl").records]
    assert journal[:2] == ["model_install", "model_switch"] and "model_switch" in journal[2:]


# ---------------------------------------------------------------- CLI
def _cli(*args, env=None):
    return subprocess.run([PY, "-m", "flight", "model", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_model_cli_commands_and_exit_codes(tmp_path, kit):
    k = kit["keyfile"]
    store = tmp_path / "store"
    assert _cli("keygen", k).returncode == 2                                  # never overwrites a key
    r = _cli("pack", default_card(), "--key", k, "--out", tmp_path / "p.cgpkg", "--model-version", 2)
    assert r.returncode == 0 and "golden results for" in r.stdout
    assert _cli("verify", tmp_path / "p.cgpkg", "--key", k).returncode == 0
    assert _cli("verify", tmp_path / "nope.cgpkg", "--key", k).returncode == 2
    assert _cli("verify", tmp_path / "p.cgpkg").returncode == 2 or os.environ.get("CLOUDGATE_MISSION_KEY")
    other = tmp_path / "other.key"
    write_key(other)
    r = _cli("verify", tmp_path / "p.cgpkg", "--key", other)
    assert r.returncode == 1 and "another key" in r.stderr
    (tmp_path / "t.cgpkg").write_bytes((tmp_path / "p.cgpkg").read_bytes()[:5000])
    r = _cli("install", tmp_path / "t.cgpkg", "--store", store, "--key", k)
    assert r.returncode == 1 and "truncated" in r.stderr
    assert _cli("install", tmp_path / "p.cgpkg", "--key", k).returncode == 2       # no --store
    r = _cli("install", tmp_path / "p.cgpkg", "--store", store, "--key", k, "--activate")
    assert r.returncode == 0 and "slot a" in r.stdout
    assert _cli("install", kit["p2"], "--store", store, "--key", k).returncode == 0
    assert _cli("activate", "--store", store, "--key", k).returncode == 0
    st = json.loads(_cli("status", "--store", store, "--key", k, "--json").stdout)
    assert st["active"] == "b" and st["slots"]["a"]["signature"] == "ok"
    assert _cli("rollback", "--store", store, "--key", k).returncode == 0
    assert json.loads(_cli("status", "--store", store, "--key", k, "--json").stdout)["active"] == "a"
    # the store is busy while another installer holds its lock
    import fcntl
    with open(store / "lock", "ab") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        r = _cli("activate", "--store", store, "--key", k, "--lock-timeout", "0.3")
        assert r.returncode == 3 and "locked" in r.stderr


# ---------------------------------------------------------------- generic over the card (optional bands)
def test_golden_tiles_follow_the_card_including_optional_bands():
    from flight.golden import GOLDEN_KINDS, golden_tiles

    six = ["blue", "green", "red", "nir", "swir16", "swir22"]
    tiles = golden_tiles(six, ["swir16", "swir22"], 64)
    assert [k for k, _ in tiles] == list(GOLDEN_KINDS)
    for kind, dn in tiles:
        assert dn.shape == (7, 64, 64) and dn.dtype == np.uint16
        assert set(np.unique(dn[6])) <= {0, 10000}                  # the presence flag: 0 or reflectance 1.0
        if not dn[6].any():
            assert not dn[4:6].any()                                # absent optional bands are zero planes
    assert any(dn[6].max() == 10000 for _, dn in tiles) and any(dn[6].max() == 0 for _, dn in tiles)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(tiles, golden_tiles(six, ["swir16", "swir22"], 64)))


def test_golden_tile_generator_is_pinned():
    """The generator's output is part of every package's test vectors: its bytes must not drift."""
    from flight.golden import golden_tiles

    h = hashlib.sha256(b"".join(dn.tobytes() for _, dn in golden_tiles(["blue", "green", "red", "nir"], (), 64)))
    assert h.hexdigest()[:16] == GOLDEN_PIN, h.hexdigest()[:16]


GOLDEN_PIN = "99af404e07551b94"
