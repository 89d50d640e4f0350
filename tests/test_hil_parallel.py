"""Issue 24 item 5: faults in the parallel path. One worker's interpreter starts computing differently in the
middle of a run (an upset only it executes): the next known-answer self-test names it, every instance is
replaced, and no decision is made with it afterwards. A model swap or an activation arriving while a scene
is being scanned never splits that scene between two models: a swap from another thread is refused
(ConcurrentUseError), an activation in the store is followed between scenes."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import synthetic_scene
from flight import CloudGate, ConcurrentUseError

BANDS = ("blue", "green", "red", "nir")


def _perturb_output(backend) -> None:
    """From now on one raw output value of this instance differs after every inference (as an upset in weights
    only this interpreter executes would make it): LiteRT's output tensor right after invoke(), onnxruntime's
    bound logits."""
    inner = getattr(backend, "_inner", backend)
    if inner.name == "litert":
        it, real = inner.it, inner.it.invoke

        def invoke():
            real()
            out = it.tensor(inner._out_idx)()
            out[0, 0, 0, 1] = np.int8(127) if out[0, 0, 0, 1] != 127 else np.int8(-128)
            del out

        it.invoke = invoke
    else:
        real = inner.infer

        def infer(planes, mask_out):
            real(planes, mask_out)
            inner._out[0, 1, 0, 0] += 1.0

        inner.infer = infer


class _Recorder:
    """Wraps every running instance's infer() to record which instance ran (per scene)."""

    def __init__(self):
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.hook = None

    def attach(self, gate) -> None:
        for b in gate.custody.instances:
            if getattr(b, "_recorded", False):
                continue
            real = b.infer

            def infer(planes, mask_out, _b=b, _real=real):
                with self.lock:
                    self.calls.append(id(_b))
                if self.hook is not None:
                    self.hook(_b)
                _real(planes, mask_out)

            b.infer, b._recorded = infer, True


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_worker_failing_its_self_test_mid_run_is_replaced_before_it_decides(backend):
    scene = synthetic_scene(11, 900, "partly")[0]
    ref = CloudGate.from_model(backend=backend, workers=1)
    g = CloudGate.from_model(backend=backend, workers=2, threads=2, update={"bist_every": 1}, scrub_every=0)
    m_ref, m = np.empty((900, 900), np.uint8), np.empty((900, 900), np.uint8)
    d_ref = ref.process(scene, BANDS, mask_out=m_ref)
    assert g.process(scene, BANDS).action == d_ref.action                   # a healthy run first
    victim = g.custody.instances[1]
    _perturb_output(victim)                                                 # worker 1 goes bad between scenes
    d = g.process(scene, BANDS, mask_out=m)
    assert [e["code"] for e in d.degraded] == ["model_bist_recovered"], d.degraded
    fails = [e for e in g.model_events if e["event"] == "bist_fail"]
    assert fails and "runtime instance 1 of 2" in fails[-1]["text"]
    assert victim not in g.custody.instances and len(g.custody.instances) == 2
    assert [w.backend for w in g._scanner.workers] == g.custody.instances  # the scan ran the new instances
    assert d.action == d_ref.action and d.cloud_fraction == d_ref.cloud_fraction and np.array_equal(m, m_ref)
    g.close()
    ref.close()


def test_swap_requested_mid_scan_is_refused_and_the_scene_is_decided_by_one_model(tmp_path):
    """swap_model from another thread while a scene is being scanned (here: from inside a worker thread's
    tile) gets ConcurrentUseError; every tile of that scene ran on the instances that started it. Between
    scenes the same swap goes through, and the next scene runs on the new instances only."""
    from hil.update import differing_card

    other = differing_card(tmp_path / "other")
    g = CloudGate.from_model(backend="litert", workers=2, threads=2)
    rec = _Recorder()
    rec.attach(g)
    old_ids, old_sha = {id(b) for b in g.custody.instances}, g.model_status()["model_sha256"]
    refused = []

    def hook(b):
        if not refused and b is g.custody.instances[1]:
            try:
                g.swap_model(other)
                refused.append(None)
            except ConcurrentUseError as e:
                refused.append(e)

    rec.hook = hook
    scene = synthetic_scene(12, 1100, "broken")[0]
    d = g.process(scene, BANDS)
    rec.hook = None
    assert len(refused) == 1 and isinstance(refused[0], ConcurrentUseError)
    assert set(rec.calls) == old_ids and d.model_sha256 == old_sha and d.action != "fault"
    g.swap_model(other)                                                     # between scenes: allowed
    rec.calls.clear()
    rec.attach(g)
    new_ids = {id(b) for b in g.custody.instances}
    d2 = g.process(scene, BANDS)
    assert not new_ids & old_ids and set(rec.calls) == new_ids and d2.model_sha256 != old_sha
    g.close()


def test_activation_mid_scan_is_followed_between_scenes(tmp_path):
    """A package activated in the store (as `python -m flight model activate` does) while a scene is being
    scanned: that scene is decided by the slot it started with on every tile; the next one by the new slot."""
    from flight.model import default_card
    from flight.package import load_key, pack, write_key
    from flight.slots import ModelStore
    from hil.update import differing_card

    write_key(tmp_path / "key")
    key = load_key(tmp_path / "key")
    pack(default_card(), key, tmp_path / "m1.cgpkg", model_version=2)
    pack(differing_card(tmp_path / "other"), key, tmp_path / "m2.cgpkg", model_version=2)
    st = ModelStore(tmp_path / "store", key)
    st.activate(st.install(tmp_path / "m1.cgpkg")["slot"])
    staged = st.install(tmp_path / "m2.cgpkg")["slot"]
    g = CloudGate.from_model(backend="litert", workers=2, threads=2,
                             update={"store": str(st.root), "key": str(tmp_path / "key")})
    scene = synthetic_scene(13, 1100, "partly")[0]
    assert g.process(scene, BANDS).model_slot != staged
    rec = _Recorder()
    rec.attach(g)
    old_ids, activated = {id(b) for b in g.custody.instances}, []

    def hook(b):
        if not activated:
            activated.append(ModelStore(st.root, key).activate(staged))       # another process's view of the store

    rec.hook = hook
    d = g.process(scene, BANDS)
    rec.hook = None
    assert activated and d.model_slot != staged and set(rec.calls) == old_ids
    rec.calls.clear()
    d2 = g.process(scene, BANDS)                         # follows the pointer between scenes, then scans
    rec.attach(g)
    assert d2.model_slot == staged and not {id(b) for b in g.custody.instances} & old_ids
    rec.calls.clear()
    d3 = g.process(scene, BANDS)
    assert d3.model_slot == staged and set(rec.calls) == {id(b) for b in g.custody.instances}
    g.close()
