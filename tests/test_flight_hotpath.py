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
    g = CloudGate.from_model(backend="litert", threads=4)
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
    assert scan.resolve_workers(config_from_dict({})) == 2            # the default threads: 2 in all
    assert scan.resolve_workers(config_from_dict({"threads": 1})) == 1
    cfg = config_from_dict({"threads": 64})
    fit = int((cfg.memory_budget_mib * 2**20 - cfg.max_tiles * scan.TileScanner.PER_TILE_BYTES) // scan.worker_bytes(256))
    assert scan.resolve_workers(cfg) == min(9, fit) and fit < 9        # 9 cores, capped by the memory budget
    assert scan.resolve_workers(config_from_dict({"workers": 1})) == 1


@pytest.fixture(scope="module")
def auto_and_one():
    import flight.scan as scan

    real = scan.usable_cores
    if real() < 2:                                       # on a 1-core host 'auto' would be one worker: force two
        scan.usable_cores = lambda: 2                    # (the default threads: 2 allows two)
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


# ------------------------------------------------------------------------------------------ half resolution
def half_card(tmp_path, downsample=2, stamp=True):
    """The shipped model files under a copy of their card that declares input_grid: {downsample: ...}
    (bench.halfcard): the 256² model then sees 512² scene windows averaged 2x2. Not a model validated at
    that grid: this exercises the flight path only (the ground side cards a half-resolution student)."""
    from bench.halfcard import write_half_grid_card

    return write_half_grid_card(tmp_path, downsample, stamp)


def mean2x2_reference(x: np.ndarray) -> np.ndarray:
    """The 2x2 block means in plain numpy on the whole scene: edge-pad odd sizes, then the gate's summation
    order ((2i,2j) + (2i+1,2j) + (2i,2j+1) + (2i+1,2j+1)) * 0.25 in float32."""
    h, w = x.shape[:2]
    pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x, pad, mode="edge")
    out = p[0::2, 0::2].astype(np.float32)
    out += p[1::2, 0::2]
    out += p[0::2, 1::2]
    out += p[1::2, 1::2]
    out *= np.float32(0.25)
    return out


def all2x2_reference(v: np.ndarray) -> np.ndarray:
    h, w = v.shape
    p = np.pad(v.astype(bool), [(0, h % 2), (0, w % 2)], mode="edge")
    return p[0::2, 0::2] & p[1::2, 0::2] & p[0::2, 1::2] & p[1::2, 1::2]


def test_card_input_grid_is_validated(tmp_path):
    from flight.model import load_card

    assert load_card(half_card(tmp_path, None)).downsample == 1          # no input_grid: today's behaviour
    assert load_card(half_card(tmp_path, 1)).downsample == 1
    assert load_card(half_card(tmp_path, 2)).downsample == 2
    for bad in (3, 0, "2", True, 2.0, {"downsample": 2, "method": "mean"}, {"factor": 2}, [2]):
        with pytest.raises(ModelIntegrityError, match=r"input_grid.*write input_grid: \{downsample: 2\}"):
            load_card(_card_with_grid(tmp_path, bad))


def _card_with_grid(tmp_path, grid):
    import yaml

    p = half_card(tmp_path, None, stamp=False)
    raw = yaml.safe_load(p.read_text())
    raw["input_grid"] = grid if isinstance(grid, (dict, list)) else {"downsample": grid}
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_card_grid_must_match_the_model_files_own_metadata(tmp_path, backend):
    """An edited card cannot silently move a model to another grid: the exporter stamps input_grid into the
    model file (flight.modelmeta), and a card that says otherwise is refused, in both directions."""
    import yaml

    full = tmp_path / "full"
    full.mkdir()
    p = half_card(full, None)                            # stamped at full resolution (no input_grid)
    raw = yaml.safe_load(p.read_text())
    raw["input_grid"] = {"downsample": 2}
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ModelIntegrityError, match="input_grid"):
        CloudGate.from_model(p, backend=backend, workers=1)
    half = tmp_path / "half"
    half.mkdir()
    p = half_card(half)                                  # stamped with downsample 2
    raw = yaml.safe_load(p.read_text())
    del raw["input_grid"]
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ModelIntegrityError, match="input_grid"):
        CloudGate.from_model(p, backend=backend, workers=1)


# scene_bytes differ (the reference is 4x smaller), and so does model_sha256: the half card's copies of the
# shipped files are stamped with its input_grid (same weights: stamp_card checks the golden outputs)
HALF_SAME = tuple(k for k in SAME if k not in ("downlink_bytes", "model_sha256"))


def _half_vs_reference(half_gate, full_gate, bands, names, valid=None, radiometry=None):
    h, w = bands.shape[:2]
    ref = np.ascontiguousarray(mean2x2_reference(bands))
    # a block holding a no-data fill pixel (every band exactly 0) is invalid on the half grid, as that pixel is
    # at full resolution: the reference marks those blocks in its valid mask
    filled = ~np.any(np.asarray(bands) != 0, axis=2)
    ref_valid = all2x2_reference(~filled if valid is None else (valid & ~filled))
    kw = {} if radiometry is None else {"radiometry": radiometry}
    m_half, m_ref = np.empty((h, w), np.uint8), np.empty(ref.shape[:2], np.uint8)
    dh = half_gate.process(bands, names, mask_out=m_half, valid_mask=valid, **kw)
    dr = full_gate.process(ref, names, mask_out=m_ref, valid_mask=ref_valid, **kw)
    assert dh.action != "fault", dh.reason
    _same(dh, dr, HALF_SAME)
    assert dh.core_pixels == 2 * dr.core_pixels and dh.tile_pixels == dr.tile_pixels
    assert np.array_equal(m_half, np.repeat(np.repeat(m_ref, 2, 0), 2, 1)[:h, :w])   # nearest upsampling
    _same(half_gate.process(bands, names, valid_mask=valid, **kw),                  # decision only (early exit)
          full_gate.process(ref, names, valid_mask=ref_valid, **kw), HALF_SAME)
    return m_ref


@pytest.fixture(scope="module")
def half_gates(tmp_path_factory):
    card = half_card(tmp_path_factory.mktemp("half"))
    gates = {"half1": CloudGate.from_model(card, backend="litert", workers=1),
             "half2": CloudGate.from_model(card, backend="litert", workers=2, threads=2),
             "full": CloudGate.from_model(backend="litert", workers=1)}
    assert gates["half1"].card.downsample == 2 and gates["full"].card.downsample == 1
    yield gates
    for g in gates.values():
        g.close()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind,h,w,seed", [("partly", 1201, 999, 1), ("overcast", 700, 513, 2), ("clear", 90, 61, 3)])
def test_half_grid_decision_equals_the_model_on_a_numpy_averaged_scene(half_gates, workers, kind, h, w, seed):
    """Odd sizes, NaN, no-data zeros and a valid_mask: the half-resolution decision and mask are those of
    workers=1 at full resolution on the scene 2x2-averaged in numpy first."""
    refl, _ = synthetic_scene(seed, max(h, w), kind)
    refl = np.ascontiguousarray(refl[:h, :w])
    refl[5:9, 7:11] = np.nan
    refl[h // 2:h // 2 + 3] = 0.0
    valid = np.ones((h, w), bool)
    valid[: h // 5, : w // 3] = False
    _half_vs_reference(half_gates[f"half{workers}"], half_gates["full"], refl, BANDS, valid)
    # integer DN (radiometry) and a scene with the model's bands in another order (the per-band path)
    dn = (np.nan_to_num(refl) * 10000).astype(np.uint16)
    _half_vs_reference(half_gates[f"half{workers}"], half_gates["full"], dn, BANDS, valid, radiometry=(1e-4, 0.0))
    rev = np.ascontiguousarray(refl[..., ::-1])
    _half_vs_reference(half_gates[f"half{workers}"], half_gates["full"], rev, BANDS[::-1])


@pytest.mark.skipif(not _real_sample(), reason="../shared/data/real (the sampled real scenes) is absent")
def test_half_grid_on_real_scenes(half_gates):
    from flight.scenefile import read_npz_scene

    classes = set()
    for path in _real_sample():
        sc = read_npz_scene(path)
        for g in ("half1", "half2"):
            m = _half_vs_reference(half_gates[g], half_gates["full"], sc["bands"], sc["band_names"],
                                   sc["valid_mask"], sc["radiometry"])
            classes |= set(np.unique(m).tolist())
    assert {0, 1} <= classes


def test_half_grid_discard_guard_reads_the_half_grid(half_gates):
    """A frame the policy drops goes through the discard guard on the half grid: same verdict as on the
    numpy-averaged scene (bright snow-like pixels: green/blue low)."""
    h, w = 601, 333
    rng = np.random.default_rng(5)
    snow = np.empty((h, w, 4), np.float32)
    snow[..., 0] = rng.uniform(0.7, 0.9, (h, w))          # bright blue
    snow[..., 1] = snow[..., 0] * 0.85                     # green/blue 0.85: snow-like
    snow[..., 2] = snow[..., 0] * 0.8
    snow[..., 3] = snow[..., 0] * 0.75
    valid = np.ones((h, w), bool)
    valid[::7, ::3] = False                                # the probe reads the half grid's all-valid flags
    snow[valid == 0, 1] = snow[valid == 0, 0] * 1.2        # cloud-like where invalid: must not be sampled
    ref, ref_valid = np.ascontiguousarray(mean2x2_reference(snow)), all2x2_reference(valid)
    for g in ("half1", "half2"):
        dh = half_gates[g].process(snow, BANDS, valid_mask=valid)
        dr = half_gates["full"].process(ref, BANDS, valid_mask=ref_valid)
        _same(dh, dr, HALF_SAME)
        assert dh.rule == "ambiguous_surface", dh.reason    # the guard ran (and kept the frame)


def test_half_grid_deadline_marks_unvisited_blocks_in_full_resolution(tmp_path):
    class Clock:
        def __init__(self):
            self.t = 0.0

        def monotonic(self):
            self.t += 0.01
            return self.t

        monotonic_ns = lambda self: int(self.t * 1e9)   # noqa: E731
        perf_counter = monotonic
        wall = monotonic

    card = half_card(tmp_path)
    refl = np.ascontiguousarray(synthetic_scene(7, 4001, "partly")[0][:4001, :3999])
    g = CloudGate.from_model(card, backend="litert", clock=Clock(), deadline_s=0.05, workers=1)
    mask = np.zeros(refl.shape[:2], np.uint8)
    d = g.process(refl, BANDS, mask_out=mask)
    g.close()
    assert d.tiles_processed < d.tiles_total and d.core_pixels == 480
    unvisited = d.tiles_total - d.tiles_processed
    assert (mask == 255).sum() >= unvisited * 400 ** 2    # unvisited cores, in scene pixels (480² minus edges)
    assert (mask != 255).sum() >= d.tiles_processed * 400 ** 2


def test_half_grid_on_onnxruntime_band_planar_loader(tmp_path):
    """onnxruntime loads band by band (CHW): the same half-grid equality, with 2 workers."""
    card = half_card(tmp_path)
    half = CloudGate.from_model(card, backend="onnxruntime", workers=2, threads=2)
    full = CloudGate.from_model(backend="onnxruntime", workers=1)
    refl = np.ascontiguousarray(synthetic_scene(3, 777, "partly")[0][:777, :645])
    refl[3:7, 3:9] = np.nan
    valid = np.ones(refl.shape[:2], bool)
    valid[:100, :50] = False
    _half_vs_reference(half, full, refl, BANDS, valid)
    half.close()
    full.close()
