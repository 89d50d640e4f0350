"""Issue 17 (in-orbit model update, second pass) and the `flight model` CLI items of issue 19: the last
model that verifies is never lost, full disks and I/O errors are their own outcome, no replays, one key
format, a staged package never runs, install --activate is one critical section, CLI exit codes and
help, log tools survive any str, and the model file carries its card's description (checked at load).

Every package is made here from the current models/ (nothing names a band count or a hash)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from flight import CloudGate, ModelIntegrityError, read_log
from flight.model import MODELS_DIR, default_card, load_card
from flight.package import PackageKeyError, assemble, load_key, pack, write_key

PY = sys.executable


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkg17")
    write_key(d / "key")
    key = load_key(d / "key")
    out = {"dir": d, "key": key, "keyfile": d / "key"}
    for v in (3, 5, 6):
        out[f"v{v}"] = d / f"v{v}.cgpkg"
        out[f"pkg{v}"] = pack(default_card(), key, out[f"v{v}"], model_version=v)
    return out


def _store(tmp_path, key, **kw):
    from flight.slots import ModelStore

    return ModelStore(tmp_path / "store", key, **kw)


def _card_mismatch_package(kit, path):
    """Signed with the right key, but its card lists one band fewer than the model takes: refused at the
    self-test stage of the install (after it has been written)."""
    pkg = kit["pkg5"]
    raw = dict(pkg.card.raw, bands=list(pkg.card.bands[:-1]), optional_bands=[])
    path.write_bytes(assemble(yaml.safe_dump(raw, sort_keys=False).encode(), pkg.artifacts,
                              dict(pkg.golden, shape=[len(raw["bands"]), pkg.card.tile, pkg.card.tile]),
                              pkg.golden_blobs, kit["key"]))
    return path


def _rot(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 3] ^= 0x10
    path.write_bytes(bytes(b))


def _scene(card, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.02, 0.4, (300, 300, len(card.bands))).astype(np.float32), tuple(card.bands)


def _gate(store, kit, **kw):
    return CloudGate.from_model(update={"store": str(store.root), "key": str(kit["keyfile"])}, **kw)


def _killed(st, kit, phase: str, call: str) -> None:
    """Run st.<call>, progress=hook) in a child process that SIGKILLs itself at phase."""
    code = (f"import os, signal\nfrom flight.package import load_key\nfrom flight.slots import ModelStore\n"
            f"st = ModelStore({str(st.root)!r}, load_key({str(kit['keyfile'])!r}))\n"
            f"def hook(p):\n    if p == {phase!r}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"st.{call}, progress=hook)\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == -signal.SIGKILL, r.stderr[-1000:]


def _leftovers(store):
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.name.endswith((".tmp", ".new")))


# ---------------------------------------------------------------- item 1: a refused install never removes the last good model
@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_refused_install_keeps_the_only_model_that_still_verifies(tmp_path, kit, backend):
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)                 # slot a
    st.install(kit["v5"], activate=True)                 # slot b, active; a is the previous model
    assert st.read_pointer().slot == "b"
    _rot(st.package_path("b"))                           # the active slot rots while no gate restarts
    before = {s: st.package_path(s).read_bytes() for s in "ab"}
    with pytest.raises(ModelIntegrityError):
        st.install(_card_mismatch_package(kit, tmp_path / "bad.cgpkg"))
    assert {s: st.package_path(s).read_bytes() for s in "ab"} == before      # both slots as they were
    assert st.verify_slot("a")[0].sha256 == kit["pkg3"].sha256                # the good model is still there
    assert _leftovers(st) == []
    card = load_card(default_card())
    with _gate(st, kit, backend=backend) as g:
        d = g.process(*_scene(card))
        assert d.action != "fault" and d.model_slot == "a"


def test_install_target_is_chosen_from_what_verifies_now(tmp_path, kit):
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    st.install(kit["v5"], activate=True)                 # b active, a previous: the target is a
    assert st.install_target() == ("a", "b")
    _rot(st.package_path("b"))                           # b rots: a is the one to keep, b the target
    assert st.install_target() == ("b", "a")
    out = st.install(kit["v5"])                          # a good package goes where the rotten one was
    assert out["slot"] == "b" and st.verify_slot("a")[0].sha256 == kit["pkg3"].sha256


# ---------------------------------------------------------------- item 2: full disk, I/O errors, kills: no temp files, own outcome
def test_store_refuses_an_install_without_room_for_it_and_the_log_margin(tmp_path, kit, monkeypatch):
    from flight.slots import ModelStore, StoreFullError

    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    before = st.package_path("a").read_bytes()
    monkeypatch.setattr(ModelStore, "free_bytes", lambda self: kit["v5"].stat().st_size + st.reserve_bytes - 1)
    with pytest.raises(StoreFullError, match="free"):
        st.install(kit["v5"])
    assert not st.package_path("b").exists() and st.package_path("a").read_bytes() == before
    assert _leftovers(st) == []
    events = [r["event"] for r in read_log(st.root / "journal.jsonl").records]
    assert events[-1] == "model_install_no_space"


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_errors_remove_the_partial_file_and_change_nothing(tmp_path, kit, monkeypatch, err):
    import flight.package as fp
    from flight.slots import StoreFullError, StoreIOError

    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    st.install(kit["v5"], activate=True)
    before = {s: st.package_path(s).read_bytes() for s in "ab"}
    real, calls = os.write, []

    def failing(fd, data):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(fp.os, "write", failing)
    with pytest.raises(StoreFullError if err == errno.ENOSPC else StoreIOError):
        st.install(kit["v5"])
    monkeypatch.setattr(fp.os, "write", real)
    assert {s: st.package_path(s).read_bytes() for s in "ab"} == before and _leftovers(st) == []
    assert st.read_pointer().slot == "b"


def test_a_killed_install_leaves_a_temp_file_that_the_next_operation_removes(tmp_path, kit):
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    _killed(st, kit, "fsync_tmp", f"install({str(kit['v5'])!r}")
    assert _leftovers(st)                                 # the kill left the partial upload behind...
    st.activate("a")
    assert _leftovers(st) == []                           # ...and the next operation under the lock removed it


def test_cli_out_of_space_is_exit_4_with_a_message(tmp_path, kit):
    store = tmp_path / "store"
    code = ("import sys\nfrom flight.slots import ModelStore\nModelStore.free_bytes = lambda self: 1000\n"
            "from flight.__main__ import main\n"
            f"sys.exit(main(['model', 'install', {str(kit['v5'])!r}, '--store', {str(store)!r}, '--key', "
            f"{str(kit['keyfile'])!r}]))\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and "no space" in r.stderr and "bytes free" in r.stderr, (r.returncode, r.stderr)


# ---------------------------------------------------------------- item 3: anti-rollback
def test_replayed_older_package_is_refused_and_a_downgrade_needs_the_flag(tmp_path, kit):
    from flight.slots import DowngradeError

    st = _store(tmp_path, kit["key"])
    st.install(kit["v5"], activate=True)
    assert st.version_hwm() == 5
    with pytest.raises(DowngradeError, match="older"):
        st.install(kit["v3"])
    assert st.read_pointer().slot == "a" and not st.package_path("b").exists()
    out = st.install(kit["v3"], activate=True, allow_downgrade=True)
    assert out["activated"]["model_version"] == 3 and st.version_hwm() == 5      # the mark never goes back
    journal = [r["event"] for r in read_log(st.root / "journal.jsonl").records]
    assert "model_install_refused" in journal and journal.count("model_downgrade_allowed") >= 1


def test_rollback_to_a_previously_activated_older_version_is_allowed(tmp_path, kit):
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    st.install(kit["v5"], activate=True)
    assert st.rollback()["slot"] == "a"                  # v3 ran here before: a rollback, not a replay


def test_version_high_water_mark_survives_a_torn_slot_and_a_lost_file(tmp_path, kit):
    from flight.slots import DowngradeError

    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    st.install(kit["v5"], activate=True)
    raw = bytearray(st.hwm_path.read_bytes())
    vals = st._hwm_slots()
    k = vals.index(5)
    raw[k * 54 + 30] ^= 0x01                             # tear the newer slot (CRC no longer matches)
    st.hwm_path.write_bytes(bytes(raw))
    assert st.version_hwm() == 5                         # the activation record still says 5
    st.hwm_path.unlink()
    assert st.version_hwm() == 5
    with pytest.raises(DowngradeError):
        st.install(kit["v3"])


# ---------------------------------------------------------------- item 4: keys
@pytest.mark.parametrize("content,why", [(b" " * 64, "whitespace"), (b"\n" * 40, "whitespace"),
                                         (b"a" * 63 + b"\n", "odd"), (b"00" * 32 + b"\n", "not random"),
                                         (b"ab" * 31 + b"\n", "at least 32"), (b"zz" * 32, "not a hex digit"),
                                         (bytes(range(200, 240)), "ASCII")])
def test_unusable_key_files_are_refused(tmp_path, content, why):
    p = tmp_path / "k"
    p.write_bytes(content)
    with pytest.raises(PackageKeyError, match=why):
        load_key(p)


def test_keygen_writes_the_documented_format_and_the_cli_refuses_a_bad_key(tmp_path):
    p = tmp_path / "k"
    write_key(p)
    text = p.read_text()
    assert len(text) == 65 and text.endswith("\n") and len(load_key(p)) == 32
    (tmp_path / "blank").write_bytes(b" " * 64)
    r = subprocess.run([PY, "-m", "flight", "model", "pack", "default", "--key", str(tmp_path / "blank"), "--out",
                        str(tmp_path / "x.cgpkg")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "whitespace" in r.stderr and not (tmp_path / "x.cgpkg").exists()


# ---------------------------------------------------------------- item 5: a staged package never runs
@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_damaged_pointer_falls_back_to_the_highest_activated_generation_not_a_staged_one(tmp_path, kit, backend):
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)                 # a: activated
    st.install(kit["v5"])                                # b: staged (newer file), never activated
    st.pointer_path.write_text("{damaged")
    assert st.runnable() == ["a"]
    with _gate(st, kit, backend=backend) as g:
        assert g.model_status()["slot"] == "a"
        d = g.process(*_scene(load_card(default_card())))
        assert d.package_sha256 == kit["pkg3"].sha256


@pytest.mark.parametrize("phase", ["verify_slot", "pointer_write", "pointer_fsync", "pointer_rename"])
def test_a_switch_killed_before_its_pointer_landed_is_not_an_activation(tmp_path, kit, phase):
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    st.install(kit["v5"])
    _killed(st, kit, phase, "activate('b'")
    st.pointer_path.write_text("{damaged")
    assert st.runnable() == ["a"]


def test_a_staged_package_in_the_pointer_slot_does_not_run(tmp_path, kit):
    """The active slot rotted and an install replaced it (item 1): the pointer still names that slot, but
    what it holds now was never activated; the gate runs the previous activated model."""
    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    st.install(kit["v5"], activate=True)                 # b active
    _rot(st.package_path("b"))
    st.install(kit["v6"])                                # into b (the only slot that does not verify)
    assert st.read_pointer().slot == "b" and st.runnable() == ["a"]
    with _gate(st, kit) as g:
        assert g.model_status()["slot"] == "a"


# ---------------------------------------------------------------- item 6: install --activate is one critical section
def test_install_and_activate_hold_the_lock_throughout(tmp_path, kit):
    from flight.slots import ModelStore, StoreBusyError

    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    seen = []

    def between(phase):
        if phase == "installed":                          # the window between install and switch
            other = ModelStore(st.root, kit["key"], lock_timeout_s=0.2)
            try:
                other.install(kit["v5"])
                seen.append("landed")
            except StoreBusyError:
                seen.append("busy")

    out = st.install(kit["v5"], activate=True, progress=between)
    assert seen == ["busy"] and out["activated"]["slot"] == out["slot"] == "b"
    assert st.read_pointer().package_sha256 == kit["pkg5"].sha256


def test_gate_install_with_activate_is_one_critical_section_too(tmp_path, kit, monkeypatch):
    """In-process CloudGate.install(pkg, activate=True) takes the store's lock once (store.install(activate=
    True), as the CLI's install --activate): an install landing right after the gate's store call cannot get
    its package activated."""
    from flight.slots import ModelStore

    st = _store(tmp_path, kit["key"])
    st.install(kit["v3"], activate=True)
    g = _gate(st, kit, backend="onnxruntime")
    entered, seen = [], []
    enter = ModelStore.__enter__

    def counting_enter(self):
        if self is g.store:
            entered.append(1)
        return enter(self)

    install = g.store.install

    def install_then_intrude(*a, **kw):
        out = install(*a, **kw)                           # the gate's store call is over: its lock released
        ModelStore(st.root, kit["key"], lock_timeout_s=0.2).install(kit["v6"])
        seen.append("landed")
        return out

    monkeypatch.setattr(ModelStore, "__enter__", counting_enter)
    monkeypatch.setattr(g.store, "install", install_then_intrude)
    with g:
        out = g.install(kit["v5"], activate=True)
        assert seen == ["landed"] and len(entered) == 1
        assert out["activated"]["package_sha256"] == kit["pkg5"].sha256 == g.model_status()["package_sha256"]
    assert st.read_pointer().package_sha256 == kit["pkg5"].sha256


# ---------------------------------------------------------------- item 7 and issue 19 items 4, 5, 9: CLI
def _cli(*args):
    return subprocess.run([PY, "-m", "flight", "model", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_status_exit_codes_for_missing_store_regular_file_and_staged_install(tmp_path, kit):
    r = _cli("status", "--store", tmp_path / "no" / "such", "--key", kit["keyfile"])
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "file").write_text("x")
    r = _cli("status", "--store", tmp_path / "file", "--key", kit["keyfile"])
    assert r.returncode == 2 and "not a directory" in r.stderr
    st = _store(tmp_path, kit["key"])
    st.install(kit["v5"])
    r = _cli("status", "--store", st.root, "--key", kit["keyfile"])
    assert r.returncode == 0 and "not activated" in r.stderr and "staged" in r.stdout
    _rot(st.package_path("a"))
    r = _cli("status", "--store", st.root, "--key", kit["keyfile"])
    assert r.returncode == 1 and "do not verify" in r.stderr


def test_pack_default_by_name_and_help_and_no_delegate_notice(tmp_path, kit):
    r = _cli("pack", "default", "--key", kit["keyfile"], "--out", tmp_path / "d.cgpkg", "--model-version", 7)
    assert r.returncode == 0 and "model_version 7" in r.stdout, r.stderr
    r = _cli("verify", tmp_path / "d.cgpkg", "--key", kit["keyfile"], "--backend", "litert")
    assert r.returncode == 0 and "XNNPACK" not in r.stderr, r.stderr
    pack_help, install_help = _cli("pack", "--help").stdout, _cli("install", "--help").stdout
    assert "--lock-timeout" not in pack_help and "--lock-timeout" in install_help
    assert "[--store" not in install_help and "--store STORE" in install_help
    assert "package file to write" in pack_help and "shipped default" in pack_help


def test_log_summary_survives_a_lone_surrogate_scene_id(tmp_path):
    card = load_card(default_card())
    log = tmp_path / "d.jsonl"
    with CloudGate.from_model(backend="onnxruntime", log={"path": str(log)}) as g:
        g.process(*_scene(card), scene_id="\ud800")
    r = subprocess.run([PY, "-m", "flight", "log", "summary", str(log)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "\\ud800" in r.stdout, r.stderr[-1000:]


def test_empty_read_only_store_is_a_typed_error(tmp_path, kit, monkeypatch):
    from pathlib import Path

    from flight.slots import StoreUnusableError

    ro = tmp_path / "ro"
    ro.mkdir()
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(StoreUnusableError, match="writable"):
        CloudGate.from_model(update={"store": str(ro), "key": str(kit["keyfile"])})


# ---------------------------------------------------------------- item 8: the model file carries its card's description
@pytest.fixture(scope="module")
def stamped(tmp_path_factory):
    """A copy of the default model's card and artifacts, stamped (flight.modelmeta.stamp_card)."""
    from flight.modelmeta import stamp_card

    d = tmp_path_factory.mktemp("stamped")
    card = load_card(default_card())
    for a in card.artifacts.values():
        shutil.copy(MODELS_DIR / a["file"], d / a["file"])
    shutil.copy(card.path, d / card.path.name)
    stamp_card(d / card.path.name)
    return d / card.path.name


def _edited(stamped, tmp_path, edit):
    raw = yaml.safe_load(stamped.read_text())
    edit(raw)
    for f in stamped.parent.iterdir():
        if f.suffix in (".onnx", ".tflite"):
            shutil.copy(f, tmp_path / f.name)
    p = tmp_path / stamped.name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _swap(raw):
    raw["bands"][0], raw["bands"][-1] = raw["bands"][-1], raw["bands"][0]


def _fp32(raw):
    raw["artifacts"]["onnx_int8"] = dict(raw["artifacts"]["onnx_fp32"])


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_stamped_model_loads_and_gates_the_same(stamped, backend):
    card = load_card(stamped)
    scene, bands = _scene(card)
    with CloudGate.from_model(str(stamped), backend=backend) as g, CloudGate.from_model(backend=backend) as ref:
        a, b = g.process(scene, bands), ref.process(scene, bands)
        assert a.cloud_fraction == b.cloud_fraction and a.action == b.action
        assert g.custody.loaded.metadata == "ok" and not any(e["event"] == "model_metadata_missing" for e in g.model_events)


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_an_edited_card_that_swaps_two_bands_is_refused(stamped, tmp_path, backend):
    with pytest.raises(ModelIntegrityError, match="bands"):
        CloudGate.from_model(str(_edited(stamped, tmp_path, _swap)), backend=backend)


def test_the_fp32_model_in_place_of_the_int8_one_is_refused(stamped, tmp_path):
    with pytest.raises(ModelIntegrityError, match="artifact"):
        CloudGate.from_model(str(_edited(stamped, tmp_path, _fp32)), backend="onnxruntime")


def test_pack_and_install_refuse_a_card_that_disagrees_with_the_model(stamped, tmp_path, kit):
    p = _edited(stamped, tmp_path, _swap)
    with pytest.raises(ModelIntegrityError, match="bands"):
        pack(p, kit["key"], tmp_path / "x.cgpkg")
    good = pack(stamped, kit["key"], tmp_path / "good.cgpkg", model_version=9)
    raw = dict(good.card.raw)
    _swap(raw)
    f = tmp_path / "signed_swap.cgpkg"
    f.write_bytes(assemble(yaml.safe_dump(raw, sort_keys=False).encode(), good.artifacts, good.golden,
                           good.golden_blobs, kit["key"]))
    st = _store(tmp_path, kit["key"])
    with pytest.raises(ModelIntegrityError, match="bands"):
        st.install(f)


def test_an_artifact_without_metadata_loads_with_a_warning_event(tmp_path):
    from flight.modelmeta import read_description

    import shutil

    import yaml

    from conftest import drop_onnx_description

    card = load_card(default_card())
    raw = dict(card.raw)
    for a in raw["artifacts"].values():                  # a copy of the shipped model, its ONNX unstamped
        shutil.copy(card.path.parent / a["file"], tmp_path / a["file"])
    raw = drop_onnx_description(raw, tmp_path)
    assert read_description((tmp_path / raw["artifacts"]["onnx_int8"]["file"]).read_bytes(), "onnxruntime") is None
    p = tmp_path / card.path.name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    with CloudGate.from_model(str(p), backend="onnxruntime") as g:
        assert g.custody.loaded.metadata == "missing"
        assert [e["event"] for e in g.model_events] == ["model_metadata_missing"]


def test_stamp_cli_keeps_outputs_and_updates_the_card(stamped, tmp_path):
    for f in stamped.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    card = tmp_path / stamped.name
    r = subprocess.run([PY, "-m", "flight", "model", "stamp", str(card)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert card.read_text() == stamped.read_text()        # idempotent: a stamped model is stamped once
    raw = yaml.safe_load(card.read_text())
    assert all(v["bytes"] == (tmp_path / v["file"]).stat().st_size for v in raw["artifacts"].values())
