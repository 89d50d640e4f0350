"""Issue 9: process() never raises in payload mode; every bad argument is a typed, logged fault."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import brightness_backend, synthetic_scene
from flight import CloudGate, ConfigError, config_from_dict, read_log

BANDS = ("blue", "green", "red", "nir")


@pytest.fixture(scope="module")
def logged_gate(tmp_path_factory):
    p = tmp_path_factory.mktemp("log") / "d.jsonl"
    g = CloudGate.from_model(backend="litert", log={"path": str(p), "fsync": "never"})
    yield g, p
    g.close()


class _RaisingNames:
    def __iter__(self):
        raise KeyError("band table")


@pytest.mark.parametrize("kw,word", [
    (dict(priority=float("inf")), "priority"),
    (dict(priority=float("nan")), "priority"),
    (dict(priority="2"), "priority"),
    (dict(priority=10**30), "priority"),
    (dict(target_id=np.int64(7)), "target_id"),
    (dict(target_id=b"T1"), "target_id"),
    (dict(target_id=float("nan")), "target_id"),
    (dict(scene_id=b"S1"), "scene_id"),
    (dict(band_names=_RaisingNames()), "band_names"),
    (dict(band_names=(1, 2, 3, 4)), "band_names"),
])
def test_bad_arguments_are_typed_logged_faults(logged_gate, kw, word):
    """Issue 9 item 5: validated up front into a typed fault; the fault decision is logged."""
    from flight.errors import ArgumentError

    gate, path = logged_gate
    args = dict(band_names=BANDS, scene_id="s")
    args.update(kw)
    scene = np.full((40, 40, 4), 0.1, np.float32)
    d = gate.process(scene, **args)
    assert d.action == "fault" and d.fault_code == ArgumentError.code and word in d.fault
    assert d.log_seq is not None and read_log(path).records[-1]["seq"] == d.log_seq
    with pytest.raises(ArgumentError, match=word):
        gate.process(scene, **args, strict=True)


def test_unexpected_exception_in_the_loop_is_a_logged_fault(logged_gate, monkeypatch):
    """Issue 9 item 5: anything non-fatal raised inside the tile loop is caught at the loop boundary."""
    gate, path = logged_gate

    def boom(planes, mask):
        raise KeyError("runtime table")

    monkeypatch.setattr(gate.backend, "infer", boom)
    d = gate.process(np.full((40, 40, 4), 0.1, np.float32), BANDS, scene_id="k")
    assert d.action == "fault" and d.fault_code == "internal" and "KeyError" in d.fault and d.log_seq is not None


@pytest.mark.parametrize("mask", [
    np.full((64, 64), 2, np.uint8),
    np.where(np.eye(64, dtype=bool), np.nan, 1.0),
    np.full((64, 64), "x"),
    np.ones((64, 64), np.float32),
])
def test_valid_mask_must_be_bool_or_0_1(gate_litert, mask):
    """Issue 9 item 6."""
    from flight.errors import ValidMaskError

    scene = np.full((64, 64, 4), 0.1, np.float32)
    d = gate_litert.process(scene, BANDS, valid_mask=mask)
    assert d.action == "fault" and d.fault_code == ValidMaskError.code and "valid_mask" in d.fault
    with pytest.raises(ValidMaskError):
        gate_litert.process(scene, BANDS, valid_mask=mask, strict=True)


def test_valid_mask_0_1_integers_equal_bool(gate_litert):
    rng = np.random.default_rng(4)
    scene = rng.uniform(0, 0.4, (64, 64, 4)).astype(np.float32)
    vb = rng.random((64, 64)) > 0.3
    m1, m2 = np.empty((64, 64), np.uint8), np.empty((64, 64), np.uint8)
    d1 = gate_litert.process(scene, BANDS, valid_mask=vb, mask_out=m1)
    d2 = gate_litert.process(scene, BANDS, valid_mask=vb.astype(np.uint8), mask_out=m2)
    assert d1.action != "fault" and (m1 == m2).all() and d1.valid_fraction == d2.valid_fraction


def test_integer_scene_without_radiometry_is_implausible(gate_litert):
    """Issue 9 item 7: uint16 DN without a radiometry scale used to be gated as saturated reflectance."""
    from flight.errors import ImplausibleRadiometryError

    dn = np.random.default_rng(5).integers(5000, 12000, (256, 256, 4)).astype(np.uint16)
    d = gate_litert.process(dn, BANDS)
    assert d.action == "fault" and d.fault_code == "implausible_radiometry" and "radiometry" in d.fault
    with pytest.raises(ImplausibleRadiometryError):
        gate_litert.process(dn, BANDS, strict=True)
    assert gate_litert.process(dn, BANDS, radiometry=(2e-5, -0.1)).action != "fault"


def test_float_scene_far_outside_reflectance_is_implausible(gate_litert):
    """Issue 9 item 7: DN stored as float (or reflectance x 10000) on most valid pixels."""
    refl, _ = synthetic_scene(3, 256, "clear")
    d = gate_litert.process(refl * 10000.0, BANDS)
    assert d.action == "fault" and d.fault_code == "implausible_radiometry"
    ok = refl.copy()
    ok[:60] = 1.5                                  # saturated region: bright but physical
    assert gate_litert.process(ok, BANDS).action != "fault"


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_reflectance_scaled_twice_is_implausible_not_a_confident_decision(backend, request):
    """Issue 19 item 3: 0..1 reflectance passed with radiometry=(1e-4, 0) (reflectance ~1e-4 everywhere) used to
    be downlinked at cloud 0.000 by early exit with nothing in degraded; no sunlit scene is that dark."""
    from flight.errors import ImplausibleRadiometryError

    gate = request.getfixturevalue(f"gate_{'ort' if backend == 'onnxruntime' else 'litert'}")
    refl, _ = synthetic_scene(4, 512, "partly")
    assert gate.process(refl, BANDS).action != "fault"
    d = gate.process(refl, BANDS, radiometry=(1e-4, 0.0), scene_id="twice")
    assert d.action == "fault" and d.fault_code == "implausible_radiometry" and "darker" in d.fault, d.reason
    with pytest.raises(ImplausibleRadiometryError, match="scaled twice"):
        gate.process(refl, BANDS, radiometry=(1e-4, 0.0), strict=True)
    dn = np.round(refl * 10000).astype(np.uint16)   # the same scene as DN: its own scale is right, twice is not
    assert gate.process(dn, BANDS, radiometry=(1e-4, 0.0)).action != "fault"
    assert gate.process(dn, BANDS, radiometry=(1e-8, 0.0)).fault_code == "implausible_radiometry"
    dark = refl.copy()                                  # a dark scene with a bright part above the 1 % share
    dark *= 1e-4
    dark[:40] = refl[:40]
    assert gate.process(dark, BANDS).action != "fault"


@pytest.mark.parametrize("rad", [1e-4, 1, np.float32(1e-4), (1e-4,), (1e-4, 0.0, 1.0), "1e-4", ("x", 1), {"scale": 1e-4}])
def test_radiometry_that_is_not_a_pair_is_a_bad_argument(gate_litert, rad):
    """Issue 19 item 10: radiometry=1e-4 (a scalar) faulted bad_scene_dtype; the argument is wrong, not the scene."""
    d = gate_litert.process(np.full((20, 20, 4), 0.2, np.float32), BANDS, radiometry=rad)
    assert d.action == "fault" and d.fault_code == "bad_argument" and "radiometry" in d.fault, d.fault


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_upset_frame_gates_without_runtime_warnings(backend, request):
    """Issue 19 item 10: an upset frame (flipped exponent bits -> values near float32 max) made the loader's
    scaling overflow with a RuntimeWarning (an error under -W error: the frame faulted 'internal')."""
    import warnings

    from hil.faults import apply_frame_faults
    from hil.streams import generate_scene

    gate = request.getfixturevalue(f"gate_{'ort' if backend == 'onnxruntime' else 'litert'}")
    scene = generate_scene("partly", 5, 256)
    faulty = apply_frame_faults(scene, ["seu_frame"], np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = gate.process(faulty["bands"], faulty["band_names"], valid_mask=faulty["valid_mask"], strict=True)
    assert d.action != "fault"


def test_negative_radiometry_scale_is_refused(gate_litert):
    """Issue 9 item 7: a negative scale turned bright DN into cf 0 (downlink)."""
    dn = np.full((64, 64, 4), 30000, np.uint16)
    d = gate_litert.process(dn, BANDS, radiometry=(-2e-5, 1.0))
    assert d.action == "fault" and "radiometry" in d.fault
    for bad in (-1e-4, float("inf")):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"radiometry_scale": bad})
        assert e.value.key == "radiometry_scale"


def _composite(clear_w: int, cloud_w: int) -> np.ndarray:
    a, _ = synthetic_scene(7, 480, "clear")
    b, _ = synthetic_scene(8, 480, "overcast")
    return np.ascontiguousarray(np.concatenate([a[:, :clear_w], b[:, :cloud_w]], axis=1))


def test_hysteresis_only_with_target_id_and_recorded(tmp_path):
    """Issue 9 item 10: without target_id no history is shared between scenes; with one, the log says
    when hysteresis changed the action."""
    policy = {"hysteresis": 0.19}
    clear, _ = synthetic_scene(7, 480, "clear")
    mid = None
    probe = CloudGate.from_model(early_exit={"enabled": False}, policy=policy, backend_factory=brightness_backend)
    for cw in range(120, 400, 20):                 # a frame with cf in (0.30, 0.49]: mid band without history
        s = _composite(480, cw)
        d = probe.process(s, BANDS)
        if 0.32 < d.cloud_fraction < 0.47 and d.action != "downlink" or (0.32 < d.cloud_fraction < 0.47 and d.partial):
            mid, fresh = s, d
            break
    assert mid is not None
    gate = CloudGate.from_model(early_exit={"enabled": False}, policy=policy, log={"path": str(tmp_path / "d.jsonl")},
                                backend_factory=brightness_backend)
    assert gate.process(clear, BANDS).action == "downlink"
    d = gate.process(mid, BANDS)                     # no target_id: same as a fresh gate
    assert (d.action, d.partial, d.hysteresis) == (fresh.action, fresh.partial, None) and not gate._history
    assert gate.process(clear, BANDS, target_id="T1").action == "downlink"
    d = gate.process(mid, BANDS, target_id="T1")     # named target: the previous downlink widens its band
    assert d.action == "downlink" and not d.partial and d.hysteresis and "downlink" in d.hysteresis
    assert read_log(tmp_path / "d.jsonl").records[-1]["hysteresis"] == d.hysteresis
    gate.close()


def test_deadline_with_mask_out_marks_unvisited_tiles_255():
    """Issue 9 item 11: the caller's mask must not keep stale values where no tile was visited."""
    g = CloudGate.from_model(early_exit={"enabled": False}, deadline_s=1e-6)
    refl, _ = synthetic_scene(9, 960, "clear")
    mask = np.full(refl.shape[:2], 77, np.uint8)
    d = g.process(refl, BANDS, mask_out=mask)
    assert d.tiles_processed < d.tiles_total and [e["code"] for e in d.degraded] == ["deadline"]
    assert set(np.unique(mask)) <= {0, 1, 2, 255}
    assert (mask == 255).mean() >= 1 - d.tiles_processed / d.tiles_total - 1e-9


def test_concurrent_entry_from_two_threads_is_refused():
    """Issue 9 item 12: one gate per thread; a second thread entering process() gets a clear error."""
    from flight.errors import ConcurrentUseError

    gate = CloudGate.from_model(backend="litert")
    inside, release = threading.Event(), threading.Event()
    real = gate.backend.infer
    calls = {"n": 0}

    def slow(planes, mask):
        calls["n"] += 1
        if calls["n"] == 1:
            inside.set()
            release.wait(30)
        real(planes, mask)

    gate.backend.infer = slow
    scene = np.full((64, 64, 4), 0.1, np.float32)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("d", gate.process(scene, BANDS)))
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ConcurrentUseError, match="one gate per thread"):
            gate.process(scene, BANDS)
    finally:
        release.set()
        t.join(30)
    assert out["d"].action != "fault"
    assert gate.process(scene, BANDS).action != "fault"          # sequential use from another thread is fine


@pytest.mark.parametrize("text,key", [
    ("tile:\n", "tile"),
    ("model: 5\n", "model"),
    ("log:\n  path: 5\n", "log.path"),
    ("policy:\n  version: 3\n", "policy.version"),
    ("max_tiles: 10000000000\n", "max_tiles"),
    ("radiometry_scale: .inf\n", "radiometry_scale"),
    ("radiometry_offset: .nan\n", "radiometry_offset"),
    ("log:\n  keep: 1000000000\n", "log.keep"),
])
def test_config_errors_name_the_key(tmp_path, text, key):
    """Issue 9 item 13."""
    p = tmp_path / "gate.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        CloudGate.from_config(p)
    assert e.value.key == key and key in str(e.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    p = tmp_path / "gate.yaml"
    p.write_bytes(b"tile: 256\n# \xff\xfe caf\xe9\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        CloudGate.from_config(p)


def test_target_id_length_is_bounded(gate_litert):
    """Issue 9 item 14: long ids must not be kept in the hysteresis history."""
    from flight.decisionlog import MAX_ID_CHARS

    before = len(gate_litert._history)
    d = gate_litert.process(np.full((40, 40, 4), 0.1, np.float32), BANDS, target_id="t" * (MAX_ID_CHARS + 1))
    assert d.action == "fault" and d.fault_code == "bad_argument" and "target_id" in d.fault
    assert len(gate_litert._history) == before
    d = gate_litert.process(np.full((40, 40, 4), 0.1, np.float32), BANDS, scene_id="s" * 10**6)
    assert d.action == "fault" and "scene_id" in d.fault and len(d.scene_id) <= MAX_ID_CHARS


_SHRINK = """
import os, sys
sys.path.insert(0, {root!r})
import numpy as np
from flight import CloudGate
p = {path!r}
mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.uint16, shape=(600, 600, 4))
mm[:] = 9000
mm.flush(); del mm
scene = np.load(p, mmap_mode="r")
gate = CloudGate.from_model(early_exit={{"enabled": False}})
print(gate.process(scene, ("blue", "green", "red", "nir"), radiometry=(2e-5, -0.1)).action, flush=True)
os.truncate(p, os.path.getsize(p) // 3)           # the file shrinks under the live mapping
d = gate.process(scene, ("blue", "green", "red", "nir"), radiometry=(2e-5, -0.1))
print(d.action, d.fault_code, flush=True)
d = gate.process(scene[:100], ("blue", "green", "red", "nir"), radiometry=(2e-5, -0.1))
print(d.action, d.fault_code, flush=True)
print(gate.process(np.full((64, 64, 4), 0.1, np.float32), ("blue", "green", "red", "nir")).action)
"""


def test_memmap_file_shrunk_under_the_mapping_is_a_fault_not_sigbus(tmp_path):
    """Issue 9 item 8: a truncated memmap killed the process (SIGBUS, exit 135); now a fault, loop continues."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", _SHRINK.format(root=str(ROOT), path=str(tmp_path / "s.npy"))],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.returncode, r.stderr[-1500:])
    lines = r.stdout.split("\n")
    assert lines[0] != "fault"
    assert lines[1] == "fault scene_file_truncated" and lines[2] == "fault scene_file_truncated"
    assert lines[3] != "fault"


_SHRINK_MID_SCAN = """
import os, sys
sys.path.insert(0, {root!r})
import numpy as np
from flight import CloudGate
from flight.backends import open_backend
p = {path!r}
BANDS = ("blue", "green", "red", "nir")
mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.uint16, shape=(1200, 1200, 4))
mm[:] = 9000
mm.flush(); del mm
calls = {{"n": 0, "cut_at": None}}

class CuttingBackend:                       # through the backend-factory port: the file shrinks mid-scan
    def __init__(self, inner):
        self._inner = inner
    def __getattr__(self, name):
        return getattr(self._inner, name)
    def infer(self, planes, mask_out):
        calls["n"] += 1
        if calls["n"] == calls["cut_at"]:
            os.truncate(p, 4096)
        self._inner.infer(planes, mask_out)

gate = CloudGate.from_model(early_exit={{"enabled": False}}, backend="litert",
                            backend_factory=lambda *a: CuttingBackend(open_backend(*a)))
scene = np.load(p, mmap_mode="r")
d = gate.process(scene, BANDS, radiometry=(2e-5, -0.1))
print(d.action, d.tiles_total, flush=True)
calls["n"], calls["cut_at"] = 0, 2
d = gate.process(scene, BANDS, radiometry=(2e-5, -0.1))
print(d.action, d.fault_code, calls["n"], flush=True)
os.unlink(p)
np.lib.format.open_memmap(p, mode="w+", dtype=np.uint16, shape=(1200, 1200, 4))[:] = 9000
plain = np.asarray(np.load(p, mmap_mode="r"))                # a plain ndarray whose base is the memmap
calls["cut_at"] = None
os.truncate(p, 4096)
d = gate.process(plain, BANDS, radiometry=(2e-5, -0.1))
print(d.action, d.fault_code, flush=True)
print(gate.process(np.full((64, 64, 4), 0.1, np.float32), BANDS).action, flush=True)
"""


def test_memmap_file_shrinking_mid_scan_or_behind_asarray_is_a_fault_not_sigbus(tmp_path):
    """Outside review of issue 9: the backing file was checked once per scene, so a shrink during the tile
    scan still SIGBUSed, and np.asarray(memmap) was not checked at all. Now checked before every tile."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", _SHRINK_MID_SCAN.format(root=str(ROOT), path=str(tmp_path / "s.npy"))],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-1500:])
    lines = r.stdout.split("\n")
    first, total = lines[0].split()
    assert first != "fault" and int(total) >= 9
    action, code, inferred = lines[1].split()
    assert (action, code, inferred) == ("fault", "scene_file_truncated", "2")   # cut after tile 2, faulted at tile 3
    assert lines[2] == "fault scene_file_truncated"
    assert lines[3] != "fault"


def test_unordered_band_names_are_refused_not_hash_ordered():
    """A set has no order: accepting it made the action depend on PYTHONHASHSEED (outside review)."""
    g = CloudGate.from_model(backend="onnxruntime")
    scene = np.full((64, 64, 4), 0.1, np.float32)
    d = g.process(scene, {"blue", "green", "red", "nir"})
    assert d.action == "fault" and d.fault_code == "bad_argument" and "ordered" in d.fault


def test_faulted_frame_mask_is_no_decision_everywhere():
    g = CloudGate.from_model(backend="onnxruntime")
    scene = np.full((64, 64, 4), 0.1, np.float32)
    for kwargs in ({"priority": 1.5}, {"radiometry": ("1", "0")}, {"radiometry": "12"}):
        mask = np.full((64, 64), 7, np.uint8)
        d = g.process(scene, ("blue", "green", "red", "nir"), mask_out=mask, **kwargs)
        assert d.action == "fault", kwargs
        assert (mask == 255).all(), kwargs
    mask = np.full((64, 64), 7, np.uint8)                     # implausible radiometry: no class pixels left behind
    d = g.process(scene * 10000, ("blue", "green", "red", "nir"), mask_out=mask)
    assert d.action == "fault" and (mask == 255).all()


class _AllocFailingBackend:
    """A runtime that cannot allocate (MemoryError) on chosen calls, through the backend-factory port."""

    def __init__(self, inner, fail_on):
        self._inner, self._fail_on, self.calls = inner, fail_on, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def infer(self, planes, mask_out):
        self.calls += 1
        if self.calls in self._fail_on:
            raise MemoryError("std::bad_alloc")
        self._inner.infer(planes, mask_out)


def test_out_of_memory_is_a_typed_fault_and_the_loop_lives_on(tmp_path):
    """Issue 9 item 16: a frame that runs out of memory faulted as 'internal' (and under the HIL's memory
    pressure nothing ever checked it). Now a typed out_of_memory fault, logged; strict mode raises it."""
    from conftest import brightness_backend
    from flight import OutOfMemoryError

    holder = {}

    def factory(*a):
        holder["b"] = _AllocFailingBackend(brightness_backend(*a), fail_on=set())
        return holder["b"]

    g = CloudGate.from_model(backend_factory=factory, early_exit={"enabled": False}, workers=1,   # one instance, armed below
                             log={"path": str(tmp_path / "d.jsonl"), "fsync": "never"})
    holder["b"].calls, holder["b"]._fail_on = 0, {2, 5}     # armed after the load's self-test ran its tiles
    scene = np.full((64, 64, 4), 0.1, np.float32)
    ds = [g.process(scene, BANDS) for _ in range(4)]
    assert [d.fault_code for d in ds] == [None, "out_of_memory", None, None]
    assert "out of memory" in ds[1].fault and ds[1].log_seq is not None
    with pytest.raises(OutOfMemoryError) as e:
        g.process(scene, BANDS, strict=True)
    assert isinstance(e.value, MemoryError) and e.value.code == "out_of_memory"
    g.close()
    codes = [r["fault_code"] for r in read_log(tmp_path / "d.jsonl").records if r.get("kind") != "model_event"]
    assert codes == [None, "out_of_memory", None, None]


_AT_THE_LIMIT = """
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
from flight import CloudGate
from hil.streams import generate_scene
def vms():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
g = CloudGate.from_model(backend={backend!r}, threads=1, log={{"path": {log!r}, "fsync": "every"}})
scenes = [generate_scene(k, 3, s) for k, s in (("partly", 384), ("clear", 256), ("overcast", 320))]
out = []
for i in range(12):
    if i == 3:                                       # a warm runtime has its arenas: steady state from here
        d = g.process(scenes[0]["bands"], scenes[0]["band_names"])
        out.append(["unlimited", d.action, d.log_seq, d.fault])
    sc = scenes[i % 3]
    lim = vms() + (i % 3) * 65536                    # 0, 64 KiB, 128 KiB of address space left
    resource.setrlimit(resource.RLIMIT_AS, (lim, resource.RLIM_INFINITY))
    try:
        d = g.process(sc["bands"], sc["band_names"], scene_id="s%d" % i)
        out.append([d.action, d.fault_code, d.log_seq, d.fault])
    except BaseException as e:
        out.append(["raised", type(e).__name__, None, None])
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_gate_at_its_address_space_limit_answers_every_frame(tmp_path, backend):
    """Real pressure (RLIMIT_AS at the current size, 0-128 KiB left). A cold onnxruntime session cannot
    allocate its arena ("Failed to allocate memory": was an 'internal' fault): out_of_memory faults, logged,
    and the gate recovers once memory is back. Warm, the steady state allocates no address space: every
    frame is decided. process() never raises."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = _AT_THE_LIMIT.format(root=str(ROOT), backend=backend, log=str(tmp_path / "d.jsonl"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    unlimited = out.pop(3)
    assert unlimited[1] != "fault" and unlimited[2] is not None, unlimited
    assert all(a != "raised" and (a != "fault" or c == "out_of_memory") for a, c, _, _ in out), out
    assert all(a != "fault" for a, _, _, _ in out[3:]), out[3:]
    logged = sorted([s for _, _, s, _ in out if s is not None] + [unlimited[2]])
    assert [x["seq"] for x in read_log(tmp_path / "d.jsonl").records if x.get("kind") != "model_event"] == logged


_RELOAD_UNDER_PRESSURE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
from flight import CloudGate
from hil.faults import FaultBackendFactory, flip_runtime_weights
from hil.streams import generate_scene
def vms():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
bf = FaultBackendFactory()
g = CloudGate.from_model(backend="litert", backend_factory=bf, threads=1)
sc = generate_scene("partly", 3, 384)
g.process(sc["bands"], sc["band_names"])
out = []
for k in range(32):                                   # 0 .. 2 MiB of address space left, in 64 KiB steps
    flip_runtime_weights(bf.backend, 1, np.random.default_rng(k))   # an upset in the executed weights: reload
    resource.setrlimit(resource.RLIMIT_AS, (vms() + k * 65536, resource.RLIM_INFINITY))
    d = g.process(sc["bands"], sc["band_names"])
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    d2 = g.process(sc["bands"], sc["band_names"])
    out.append([d.action, d.fault_code, [e["code"] for e in d.degraded], d2.action, [e["code"] for e in d2.degraded]])
print(json.dumps(out))
"""


def test_model_reload_without_memory_is_out_of_memory_not_model_corrupt():
    """HIL soak finding (seu_weights + memory_pressure): the scrub's reload of a verified model, refused by
    LiteRT for lack of memory (XNNPack 'failed to reshape runtime'), faulted 'model_corrupt'. It is an
    out_of_memory fault; the next frame reloads and gates."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", _RELOAD_UNDER_PRESSURE.format(root=str(ROOT))], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for action, code, events, next_action, next_events in out:
        if action == "fault":
            assert code == "out_of_memory" and next_action != "fault" and \
                {"model_scrub_repaired", "model_bist_recovered"} & set(next_events), out   # reloaded next frame
        else:
            assert "model_scrub_repaired" in events, out
    assert any(a == "fault" for a, *_ in out), "no reload ran out of memory: the sweep did not reach the limit"


def test_refused_reload_of_a_verified_model_is_not_model_corrupt(tmp_path):
    """HIL soak finding: under memory pressure LiteRT refused to reopen the verified model with an empty
    message ('LiteRT refused ...: '), and the frame faulted model_corrupt although the file was fine. It is
    model_reload_failed (ModelReloadError, transient); the next frame reloads and gates."""
    from conftest import brightness_backend
    from flight import ModelIntegrityError, ModelReloadError

    calls = {"n": 0}

    def factory(*a):
        calls["n"] += 1
        if calls["n"] == 2:                              # the scrub's first reload
            raise ModelIntegrityError("LiteRT refused cloudgate-s4.int8.tflite: ")
        return brightness_backend(*a)

    g = CloudGate.from_model(backend_factory=factory, log={"path": str(tmp_path / "d.jsonl"), "fsync": "never"},
                             update={"bist_every": 1}, workers=1)   # a self-test before every frame; one instance
    scene = np.full((64, 64, 4), 0.1, np.float32)
    assert g.process(scene, BANDS).action != "fault"
    g.backend.infer = _always_cloud(g.backend)              # the running runtime goes wrong: the next self-test
    d1, d2 = g.process(scene, BANDS), g.process(scene, BANDS)   # fails and the recovery reload is refused
    assert (d1.action, d1.fault_code) == ("fault", "model_reload_failed") and "retried" in d1.fault, d1.fault
    assert d2.action != "fault" and [e["code"] for e in d2.degraded] == ["model_bist_recovered"], d2
    calls["n"] = 1
    g.backend.infer = _always_cloud(g.backend)
    with pytest.raises(ModelReloadError):
        g.process(scene, BANDS, strict=True)
    g.close()


def _always_cloud(backend):
    def infer(planes, mask_out):
        mask_out.fill(1)
    return infer
