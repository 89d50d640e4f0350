"""Issue 24 (hot path): `workers: auto` is the shipped default and stays bit-identical to one worker; every
worker's interpreter is self-tested at load and at every swap, and one that does not reproduce the others is
refused; the half-resolution decision path a model card may declare (input_grid.downsample: 2)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL, synthetic_scene
from flight import CloudGate, ModelError, ModelIntegrityError, config_from_dict
from flight.config import GateConfig

BANDS = ("blue", "green", "red", "nir")
SAME = ("action", "rule", "reason", "thresholds", "cloud_fraction", "valid_fraction", "shadow_fraction",
        "tiles_processed", "tiles_total", "confidence_bound", "clear_tiles", "partial", "early_exit", "degraded",
        "fault_code", "downlink_bytes", "grid", "model_sha256")
# real scenes sampled by name (whatever else ../shared holds), each several tiles: S2 and L8, odd sizes, 13 bands
REAL_SAMPLE = ("ukis_sentinel2", "oncloudn_demo_chip1", "sattd_LC80200392015216LGN00_subset",
               "s2cloudless_testinput_betsiboka")


def _same(d1, d2, fields=SAME) -> None:
    for k in fields:
        assert getattr(d1, k) == getattr(d2, k), (k, getattr(d1, k), getattr(d2, k))


def _real_sample() -> list:
    return [p for name in REAL_SAMPLE for p in sorted(REAL.glob(f"*/{name}.npz"))] if REAL.is_dir() else []


# ------------------------------------------------------------------------------------------ workers: auto
def test_auto_is_the_shipped_default_and_resolves_to_the_usable_cores(monkeypatch):
    import flight.scan as scan

    assert GateConfig().workers == "auto" and config_from_dict({}).workers == "auto"
    monkeypatch.setattr(scan, "usable_cores", lambda: 3)          # a 3-core board (the HIL pins its affinity)
    g = CloudGate.from_model(backend="litert")
    try:
        assert g.workers == 3 and len(g.custody.instances) == 3
        assert len({id(b) for b in g.custody.instances}) == 3
    finally:
        g.close()


def test_usable_cores_follow_the_cpu_affinity(monkeypatch):
    import os

    import flight.scan as scan

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5})
    assert scan.usable_cores() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(9)))
    cfg = config_from_dict({})
    fit = int((cfg.memory_budget_mib * 2**20 - cfg.max_tiles * scan.TileScanner.PER_TILE_BYTES) // scan.worker_bytes(256))
    assert scan.resolve_workers(cfg) == min(9, fit) and fit < 9        # 9 cores, capped by the memory budget
    assert scan.resolve_workers(config_from_dict({"workers": 1})) == 1


@pytest.fixture(scope="module")
def auto_and_one():
    import flight.scan as scan

    real = scan.usable_cores
    if real() < 2:                                       # on a 1-core host 'auto' would be one worker: force two
        scan.usable_cores = lambda: 2
    try:
        many = CloudGate.from_model(backend="litert")    # workers: auto (the default)
    finally:
        scan.usable_cores = real
    one = CloudGate.from_model(backend="litert", workers=1)
    assert many.workers >= 2 and one.workers == 1
    yield one, many
    one.close()
    many.close()


@pytest.mark.skipif(not _real_sample(), reason="../shared/data/real (the sampled real scenes) is absent")
def test_auto_workers_bit_identical_to_one_worker_on_real_scenes(auto_and_one):
    from flight.scenefile import read_npz_scene

    one, many = auto_and_one
    classes = set()
    for path in _real_sample():
        sc = read_npz_scene(path)
        h, w = sc["bands"].shape[:2]
        m1, mn = np.empty((h, w), np.uint8), np.empty((h, w), np.uint8)
        kw = dict(valid_mask=sc["valid_mask"], radiometry=sc["radiometry"], scene_id=sc["scene_id"])
        _same(one.process(sc["bands"], sc["band_names"], mask_out=m1, **kw),
              many.process(sc["bands"], sc["band_names"], mask_out=mn, **kw))
        assert np.array_equal(m1, mn), path.name
        classes |= set(np.unique(m1).tolist())
        _same(one.process(sc["bands"], sc["band_names"], **kw), many.process(sc["bands"], sc["band_names"], **kw))
    assert {0, 1} <= classes                             # clear and cloud pixels: masks that could differ


class _UpsetNthInstance:
    """Backend-factory port: opens the real runtime; the instance opened as number `nth` (0-based, counted
    once armed) gets an upset in the weights it executes, after one warm-up inference (as an upset in orbit
    lands in a running interpreter): LiteRT's interpreter reads its constants from its own copy of the
    verified bytes (one bit flipped there, hil.faults.flip_bit_in_bytes); onnxruntime's initializers
    (hil.faults.flip_runtime_weights). That one flips the same offset in every copy of the initializer it
    finds, the running sessions' too; only_this_instance=True instead changes one logit of this instance's
    raw output, as an upset in weights only it executes would."""

    def __init__(self, nth: int, only_this_instance: bool = False):
        from hil.faults import FaultBackendFactory

        self.inner, self.nth, self.count, self.armed, self.upset = FaultBackendFactory(), nth, 0, False, []
        self.only_this_instance = only_this_instance

    def __call__(self, *a):
        from hil.faults import flip_bit_in_bytes, flip_runtime_weights

        b = self.inner(*a)
        if self.armed:
            if self.count == self.nth:
                b.infer(b.planes, np.empty((b.tile, b.tile), np.uint8))
                if b.name == "litert":
                    flip_bit_in_bytes(b.model_buffer, np.random.default_rng(11))
                elif self.only_this_instance:
                    ort, real = b._inner, b._inner.infer

                    def upset(planes, mask_out):
                        real(planes, mask_out)
                        ort._out[0, 1, 0, 0] += 1.0

                    ort.infer = upset
                else:
                    assert flip_runtime_weights(b, 4, np.random.default_rng(11)), "no weights reachable to upset"
                self.upset.append(b)
            self.count += 1
        return b


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_one_corrupted_worker_interpreter_is_refused_at_load(backend):
    """Instance 1 of 2, built from the same verified bytes, computes differently (an upset in its weights):
    its self-test against instance 0 refuses it, a typed error names it, and no gate decides with it."""
    ports = _UpsetNthInstance(1)
    ports.armed = True
    with pytest.raises(ModelIntegrityError, match="runtime instance 1"):
        CloudGate.from_model(backend=backend, backend_factory=ports, workers=2, threads=2)
    assert len(ports.upset) == 1


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_one_corrupted_worker_interpreter_is_refused_at_swap(backend):
    """A swap whose second interpreter does not reproduce the first is refused as a whole (event
    model_switch_refused naming the instance); the running instances keep deciding, bit-identically."""
    ports = _UpsetNthInstance(1, only_this_instance=True)
    g = CloudGate.from_model(backend=backend, backend_factory=ports, workers=2, threads=2)
    scene = synthetic_scene(4, 700, "partly")[0]
    m0, m1 = np.empty((700, 700), np.uint8), np.empty((700, 700), np.uint8)
    d0 = g.process(scene, BANDS, mask_out=m0)
    running = list(g.custody.instances)
    ports.armed = True
    with pytest.raises(ModelError, match="runtime instance 1"):
        g.swap_model(None)
    assert g.custody.instances == running and not set(map(id, ports.upset)) & set(map(id, g.custody.instances))
    refused = [e for e in g.model_events if e["event"] == "model_switch_refused"]
    assert refused and "runtime instance 1" in refused[-1]["text"]
    d1 = g.process(scene, BANDS, mask_out=m1)
    assert [w.backend for w in g._scanner.workers] == running
    _same(d0, d1)
    assert np.array_equal(m0, m1)
    g.close()
