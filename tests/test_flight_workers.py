"""Issue 16 step 2: tiles on every core. N tile workers, each with its own interpreter built from the same
verified bytes, give masks and decisions bit-identical to one worker; each interpreter is self-tested and
scrubbed; swaps and recoveries replace every instance or none; the steady state stays allocation-free (tests/test_flight_steady_state.py, workers 1 and 2)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL, synthetic_scene
from flight import CloudGate, ConfigError, config_from_dict
from flight.scenefile import read_npz_scene

BANDS = ("blue", "green", "red", "nir")
SAME = ("action", "rule", "reason", "thresholds", "cloud_fraction", "valid_fraction", "shadow_fraction",
        "tiles_processed", "tiles_total", "confidence_bound", "clear_tiles", "partial", "early_exit", "degraded",
        "fault_code", "downlink_bytes", "grid", "model_sha256")


def _same(d1, d2) -> None:
    for k in SAME:
        assert getattr(d1, k) == getattr(d2, k), (k, getattr(d1, k), getattr(d2, k))


@pytest.fixture(scope="module", params=["litert", "onnxruntime"])
def gates(request):
    one = CloudGate.from_model(backend=request.param, workers=1)
    many = CloudGate.from_model(backend=request.param, workers=3, threads=3)
    yield one, many
    one.close()
    many.close()


def test_workers_config():
    assert config_from_dict({"workers": "auto"}).workers == "auto"
    for bad in (0, 65, "all", 1.5, True):
        with pytest.raises(ConfigError, match="workers"):
            config_from_dict({"workers": bad})


def test_auto_workers_follow_the_cores_and_the_memory_budget(monkeypatch):
    import flight.scan as scan

    monkeypatch.setattr(scan, "usable_cores", lambda: 6)
    assert scan.resolve_workers(config_from_dict({"workers": "auto", "threads": 8})) == 6
    assert scan.resolve_workers(config_from_dict({"workers": "auto", "threads": 4})) == 4   # threads in all
    cfg = config_from_dict({"workers": "auto", "memory_budget_mib": 10.0, "threads": 8})   # room for only a few
    n = scan.resolve_workers(cfg)
    assert 1 <= n < 6 and cfg.max_tiles * scan.TileScanner.PER_TILE_BYTES + n * scan.worker_bytes(256) <= 10 * 2**20


def test_every_worker_runs_its_own_instance_from_the_same_verified_bytes(gates):
    one, many = gates
    inst = many.custody.instances
    assert len(inst) == 3 and len({id(b) for b in inst}) == 3
    assert [w.backend for w in many._scanner.workers] == [None] * 3 or True    # bound at the first scene
    many.process(np.full((300, 300, 4), 0.2, np.float32), BANDS)
    assert [w.backend for w in many._scanner.workers] == inst
    assert many.buffer_bytes > one.buffer_bytes
    if inst[0].name == "litert":                         # each interpreter reads its own copy of the verified bytes
        assert len({id(b.model_buffer) for b in inst}) == 3
        assert len({bytes(b.model_buffer) for b in inst}) == 1


@pytest.mark.parametrize("kind,size,seed", [("clear", 700, 1), ("partly", 900, 2), ("overcast", 640, 3),
                                            ("broken", 1024, 4), ("partly", 257, 5), ("clear", 100, 6)])
def test_synthetic_masks_and_decisions_bit_identical_1_vs_n_workers(gates, kind, size, seed):
    one, many = gates
    refl, _ = synthetic_scene(seed, size, kind)
    valid = np.ones(refl.shape[:2], bool)
    valid[: size // 7] = False
    m1, mn = np.empty(refl.shape[:2], np.uint8), np.empty(refl.shape[:2], np.uint8)
    _same(one.process(refl, BANDS, mask_out=m1, valid_mask=valid), many.process(refl, BANDS, mask_out=mn, valid_mask=valid))
    assert np.array_equal(m1, mn)
    for target in (None, "t1"):                          # early exit (no mask_out), hysteresis
        _same(one.process(refl, BANDS, target_id=target), many.process(refl, BANDS, target_id=target))


@pytest.mark.skipif(not (REAL.is_dir() and any(REAL.glob("*/*.npz"))), reason="../shared/data/real is absent")
def test_real_scenes_masks_and_decisions_bit_identical_1_vs_n_workers(gates):
    one, many = gates
    for path in sorted(REAL.glob("*/*.npz")):            # every scene there, however many
        sc = read_npz_scene(path)
        h, w = sc["bands"].shape[:2]
        masks = np.empty((h, w), np.uint8), np.empty((h, w), np.uint8)
        kw = dict(valid_mask=sc["valid_mask"], radiometry=sc["radiometry"], scene_id=sc["scene_id"])
        d1 = one.process(sc["bands"], sc["band_names"], mask_out=masks[0], **kw)
        dn = many.process(sc["bands"], sc["band_names"], mask_out=masks[1], **kw)
        _same(d1, dn)
        assert np.array_equal(*masks), path.name
        _same(one.process(sc["bands"], sc["band_names"], **kw), many.process(sc["bands"], sc["band_names"], **kw))


def test_deadline_still_stops_the_scan_with_workers():
    from conftest import brightness_backend

    class Clock:
        def __init__(self):
            self.t = 0.0

        def monotonic(self):
            self.t += 0.01                               # every look at the clock costs 10 ms
            return self.t

        monotonic_ns = lambda self: int(self.t * 1e9)   # noqa: E731
        perf_counter = monotonic
        wall = monotonic

    refl, _ = synthetic_scene(7, 2048, "partly")
    for workers in (1, 2, 4):
        g = CloudGate.from_model(backend_factory=brightness_backend, clock=Clock(), deadline_s=0.05, workers=workers)
        mask = np.empty(refl.shape[:2], np.uint8)
        d = g.process(refl, BANDS, mask_out=mask)
        g.close()
        assert d.rule == "deadline" or any(e["code"] == "deadline" for e in d.degraded)
        assert d.tiles_processed < d.tiles_total
        assert (mask == 255).sum() >= (d.tiles_total - d.tiles_processed) * 200 ** 2


def _weights_upset_gate(backend, workers, i, seed, **cfg):
    from hil.faults import FaultBackendFactory, flip_runtime_weights

    class Recording(FaultBackendFactory):
        def __call__(self, *a):
            b = super().__call__(*a)
            self.all = getattr(self, "all", []) + [b]
            return b

    ports = Recording()
    g = CloudGate.from_model(backend=backend, backend_factory=ports, workers=workers, threads=workers, **cfg)
    assert g.custody.instances == ports.all[-workers:]
    return g, ports, flip_runtime_weights(ports.all[i], 4, np.random.default_rng(seed))


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
@pytest.mark.parametrize("i", [0, 1])
def test_weight_upset_in_any_one_interpreter_is_caught_and_every_instance_replaced(backend, i):
    """An upset in the weights interpreter i executes (hil.faults.flip_runtime_weights: LiteRT's own copy of the
    verified bytes, which its scrub re-hashes; onnxruntime's initializers, which the self-test catches, run on
    every instance) is caught before the next scene, and the recovery replaces every instance."""
    g, ports, flipped = _weights_upset_gate(backend, 2, i, 10 + i, update={"bist_every": 1})
    assert flipped
    old = list(g.custody.instances)
    scene = synthetic_scene(2, 256, "clear")[0]
    d = g.process(scene, BANDS)
    expected = "model_scrub_repaired" if backend == "litert" else "model_bist_recovered"
    assert d.action != "fault" and [e["code"] for e in d.degraded] == [expected], d.degraded
    if backend == "litert":                              # the failure names the instance that was hit
        assert f"instance {i} of 2" in d.degraded[0]["text"]
    new = g.custody.instances
    assert g.recoveries == 1 and len(new) == 2 and not {id(b) for b in new} & {id(b) for b in old}
    assert not g.process(scene, BANDS).degraded


@pytest.mark.parametrize("i", [0, 1, 2])
def test_self_test_runs_on_every_interpreter(i):
    """An instance whose outputs change (as an upset in weights only it executes would) fails the self-test,
    which names it; the recovery replaces every instance."""
    g = CloudGate.from_model(backend="onnxruntime", workers=3, threads=3, update={"bist_every": 1})
    b = g.custody.instances[i]
    real = b.infer

    def upset(planes, mask_out):
        real(planes, mask_out)
        b._out[0, 1, 0, 0] += 1.0                        # one logit of the raw output differs

    b.infer = upset
    d = g.process(synthetic_scene(2, 256, "clear")[0], BANDS)
    assert [e["code"] for e in d.degraded] == ["model_bist_recovered"]
    assert any(f"instance {i} of 3" in e["text"] for e in g.model_events if e["event"] == "bist_fail")
    assert g.recoveries == 1 and b not in g.custody.instances


@pytest.mark.parametrize("i", [0, 1, 2])
def test_litert_scrub_checks_every_interpreter_buffer(i):
    from hil.faults import flip_bit_in_bytes

    g = CloudGate.from_model(backend="litert", workers=3, threads=3)
    flip_bit_in_bytes(g.custody.instances[i].model_buffer, np.random.default_rng(i))
    d = g.process(synthetic_scene(2, 256, "clear")[0], BANDS)
    assert [e["code"] for e in d.degraded] == ["model_scrub_repaired"] and f"instance {i} of 3" in d.degraded[0]["text"]
    assert g.recoveries == 1 and g.model_status()["running"]


def test_swap_replaces_every_instance_or_none(tmp_path):
    g = CloudGate.from_model(backend="onnxruntime", workers=2, threads=2)
    old = list(g.custody.instances)
    with pytest.raises(Exception):
        g.swap_model(tmp_path / "missing.onnx")         # refused: every running instance stays
    assert g.custody.instances == old
    g.swap_model(None)                                   # the default card again: all new instances
    assert len(g.custody.instances) == 2 and not {id(b) for b in g.custody.instances} & {id(b) for b in old}
    g.rollback()
    assert len(g.custody.instances) == 2
    scene = synthetic_scene(3, 300, "partly")[0]
    m = np.empty((300, 300), np.uint8)
    assert g.process(scene, BANDS, mask_out=m).action != "fault"
