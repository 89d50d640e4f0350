"""Issue 12 items 3, 5, 6: one decision-log schema (writer, readers, docs agree), records that say why,
a planner's summary that lists frames by action and reason, tools that exit non-zero on bad input."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

from conftest import ROOT, synthetic_scene
from flight import CloudGate, Decision, read_log
from flight.logschema import DECISION_FIELDS, EVENT_CODES, FIELDS, LOG_FIELDS, SCHEMA_VERSION, render_markdown, \
    validate_record
from flight.logsummary import BYTES_MEANING, summarize

BANDS = ("blue", "green", "red", "nir")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A log with a clear, an overcast, a faulted (bands missing) and a deadline-stopped frame."""
    p = tmp_path_factory.mktemp("log") / "d.jsonl"
    clear, _ = synthetic_scene(1, 480, "clear")
    cloudy, _ = synthetic_scene(2, 480, "overcast")
    ds = []
    with CloudGate.from_model(backend="litert", log={"path": str(p), "fsync": "never"}) as g:
        ds.append(g.process(clear, BANDS, scene_id="clear-1"))
        ds.append(g.process(cloudy, BANDS, scene_id="cloudy-2"))
        ds.append(g.process(cloudy[..., :3], BANDS[:3], scene_id="short-3"))
    with CloudGate.from_model(backend="litert", deadline_s=1e-6, early_exit={"enabled": False},
                              log={"path": str(p), "fsync": "never"}) as g:
        ds.append(g.process(clear, BANDS, scene_id="late-4"))
    return p, ds


def test_docs_match_the_schema_table():
    assert (ROOT / "docs/decision-log.md").read_text() == render_markdown(), \
        "regenerate: python -m flight log schema > docs/decision-log.md"
    for f in FIELDS:
        assert f.unit and f.meaning, f.name


def test_writer_and_reader_agree_with_the_table(logged):
    path, ds = logged
    assert {f.name for f in dataclasses.fields(Decision)} - {"log_seq"} == set(DECISION_FIELDS)
    recs = [r for r in read_log(path).records if r.get("kind") != "model_event"]    # decisions only
    assert len(recs) == 4 and not read_log(path).problems
    for d, r in zip(ds, recs):
        assert set(r) == set(DECISION_FIELDS) | (set(LOG_FIELDS) - {"log_recreated"})
        assert validate_record(r) is None and r["schema"] == SCHEMA_VERSION
        assert r == json.loads(json.dumps(dict(d.to_record(), **{k: r[k] for k in LOG_FIELDS if k in r})))
        for e in r["degraded"]:
            assert e["code"] in EVENT_CODES and e["severity"] == EVENT_CODES[e["code"]].severity


def test_records_say_why(logged):
    _, (clear, cloudy, short, late) = logged
    assert clear.action == "downlink" and clear.rule in ("threshold", "early_exit")
    assert "downlink_max_cloud" in clear.reason and clear.thresholds["downlink_max_cloud"] == 0.3
    assert cloudy.action == "discard" and "discard_min_cloud" in cloudy.reason
    assert (short.action, short.rule, short.thresholds) == ("fault", "fault", {})
    assert short.fault_code == "missing_band" and short.scene_bytes == 480 * 480 * 3 * 4
    assert late.rule == "deadline" and late.degraded[0]["code"] == "deadline"
    assert clear.core_pixels == 240 and clear.tile_pixels == 256 * 256


def test_schema1_log_is_read_back_upgraded(tmp_path):
    p = tmp_path / "old.jsonl"
    rec = {"schema": 1, "seq": 0, "action": "downlink", "degraded": "deadline 10s reached; partial list", "fault": None}
    body = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    p.write_bytes(b'{"crc32":%d,"record":%s}\n' % (zlib.crc32(body), body))
    (r,) = read_log(p).records
    assert [e["code"] for e in r["degraded"]] == ["legacy", "legacy"] and r["degraded"][0]["text"] == "deadline 10s reached"
    assert "1 intact records" in summarize(p)


def test_summary_lists_frames_by_action_and_reason(logged, tmp_path):
    path, ds = logged
    text = summarize(path)
    assert BYTES_MEANING in text and "1 faulted frame(s)" in text
    assert "actions: downlink=2, discard=1, reacquire=0, fault=1" in text
    discards = summarize(path, action="discard", limit=0)
    assert "frames (action=discard): 1" in discards and "cloudy-2" in discards and "discard_min_cloud" in discards
    assert "clear-1" not in discards.split("frames (")[1]
    faults = summarize(path, reason="missing_band")
    assert "short-3" in faults.split("frames (")[1] and "late-4" not in faults.split("frames (")[1]
    assert "late-4" in summarize(path, reason="deadline").split("frames (")[1]


def test_summary_writes_the_timeline_png(logged, tmp_path):
    pytest.importorskip("matplotlib", reason="the timeline PNG needs matplotlib (the [hil] extra)")
    path, _ = logged
    png = tmp_path / "t.png"
    assert "timeline written" in summarize(path, png=str(png)) and png.stat().st_size > 5000


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flight", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_tools_exit_nonzero_on_missing_or_empty_input(tmp_path, logged):
    r = _cli("log", "summary", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli("run", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no .npz" in r.stderr
    r = _cli("run", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert _cli("run", str(tmp_path / "bad.npz")).returncode == 1
    r = _cli("log", "summary", str(logged[0]), "--action", "discard")
    assert r.returncode == 0 and "cloudy-2" in r.stdout


def test_run_on_missing_input_creates_no_log(tmp_path):
    """Issue 25 item 7: `run` on a missing input exited 2 but left an empty decision log and its lock file
    (and their directory) behind; nothing is created before the input is known to exist."""
    log = tmp_path / "out" / "decisions.jsonl"
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "nothing-here.npz", tmp_path / "empty"):
        r = _cli("run", str(missing), "--log", str(log))
        assert r.returncode == 2 and "no scene files" in r.stderr, r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], list(tmp_path.rglob("*"))


def test_example_config_loads_with_every_key_and_default_values():
    """Issue 12 item 8: the shipped example is a valid config that spells out every key at its default."""
    import yaml

    from flight import GateConfig, load_config

    path = ROOT / "flight/gate.example.yaml"
    cfg = load_config(path)
    assert cfg == GateConfig()
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {f.name for f in dataclasses.fields(GateConfig)}
    for section in ("policy", "early_exit", "log"):
        assert set(raw[section]) == {f.name for f in dataclasses.fields(getattr(cfg, section))}
    with CloudGate.from_config(path) as g:
        assert g.process(np.full((64, 64, 4), 0.1, np.float32), BANDS).action != "fault"


def test_bare_landsat_band_ids_need_the_sensor_key_and_a_string_is_refused():
    from flight import ArgumentError, ConfigError, config_from_dict

    scene = np.full((64, 64, 4), 0.1, np.float32)
    with CloudGate.from_model(backend="litert", sensor="landsat8") as g:
        assert g.process(scene, ("B2", "B3", "B4", "B5")).action != "fault"
    with CloudGate.from_model(backend="litert") as g:
        d = g.process(scene, ("B2", "B3", "B4", "B5"))
        assert d.fault_code == "missing_band" and "sensor" in d.fault
        d = g.process(scene, "B2B3")
        assert d.fault_code == "bad_argument" and "single string" in d.fault
        with pytest.raises(ArgumentError):
            g.process(scene, "bgrn", strict=True)
    with pytest.raises(ConfigError, match="sensor"):
        config_from_dict({"sensor": "landsat99"})


def _runs_to_tiles(runs):
    return {(r, c) for r, c0, c1, _ in runs for c in range(c0, c1 + 1)}


def test_clear_tiles_are_logged_as_bounded_row_runs(tmp_path):
    """Outside review of issue 9: a partial downlink with many clear tiles (large max_tiles) made a record
    over the 256 KiB limit, refused by the log (log_write_failed). Schema 3 logs row runs, at most
    MAX_CLEAR_RUNS of them, and counts what did not fit."""
    from flight import DecisionLog
    from flight.decisionlog import MAX_RECORD_BYTES, encode_record
    from flight.logschema import MAX_CLEAR_RUNS

    stripes = [(r, c, 0.01 * (c % 3)) for r in range(0, 400, 2) for c in range(200)]        # 40 000 clear tiles
    d = Decision(action="downlink", cloud_fraction=0.5, valid_fraction=1.0, partial=True, clear_tiles=stripes)
    rec = d.to_record()
    assert len(rec["clear_tiles"]) == 200 and rec["clear_tiles_omitted"] == 0
    assert rec["clear_tiles"][0] == [0, 0, 199, 0.02]
    assert _runs_to_tiles(rec["clear_tiles"]) == {(r, c) for r, c, _ in stripes}
    with DecisionLog(tmp_path / "d.jsonl") as log:
        assert log.append(rec) == 0                                        # was: refused, > 256 KiB
    back = read_log(tmp_path / "d.jsonl").records[0]
    assert _runs_to_tiles(back["clear_tiles"]) == {(r, c) for r, c, _ in stripes}

    checker = [(r, c, 0.0) for r in range(300) for c in range(300) if (r + c) % 2 == 0]     # runs of one tile
    rec = Decision(action="downlink", cloud_fraction=0.5, valid_fraction=1.0, partial=True,
                   clear_tiles=checker).to_record()
    assert len(rec["clear_tiles"]) == MAX_CLEAR_RUNS and rec["clear_tiles_omitted"] == len(checker) - MAX_CLEAR_RUNS
    assert len(encode_record(dict(rec, seq=0, schema=SCHEMA_VERSION))) < MAX_RECORD_BYTES // 2


def test_gate_partial_downlink_with_more_runs_than_a_record_holds(tmp_path):
    """End to end: a checkerboard of clear/cloudy tiles over 8 320 tiles (4 160 clear runs > MAX_CLEAR_RUNS):
    the decision keeps every clear tile, the record the first runs, an event says so, and it is logged."""
    from conftest import brightness_backend
    from flight.logschema import MAX_CLEAR_RUNS

    rows, cols, t = 64, 130, 32
    cell = np.where((np.add.outer(np.arange(rows), np.arange(cols)) % 2 == 0), 25, 150).astype(np.uint8)
    scene = np.repeat(np.repeat(cell, t, axis=0), t, axis=1)[..., None].repeat(4, axis=2)   # 2048 x 4160 x 4
    g = CloudGate.from_model(backend_factory=brightness_backend, tile=t, overlap=0, max_tiles=rows * cols,
                             early_exit={"enabled": False}, log={"path": str(tmp_path / "d.jsonl"), "fsync": "never"},
                             deadline_s=600.0)   # 8 320 tiles overran the 10 s default on a loaded host (rule: deadline)
    d = g.process(scene, BANDS, radiometry=(1 / 255, 0.0))
    g.close()
    assert d.action == "downlink" and d.partial and len(d.clear_tiles) == rows * cols // 2
    assert d.log_seq is not None and "clear_tiles_truncated" in [e["code"] for e in d.degraded]
    rec = next(r for r in read_log(tmp_path / "d.jsonl").records if r["seq"] == d.log_seq)   # (model events too)
    assert len(rec["clear_tiles"]) == MAX_CLEAR_RUNS
    assert rec["clear_tiles_omitted"] == d.clear_tiles_omitted == rows * cols // 2 - MAX_CLEAR_RUNS
    assert _runs_to_tiles(rec["clear_tiles"]) < {(r, c) for r, c, _ in d.clear_tiles}


def test_older_per_tile_clear_lists_read_back_as_runs(tmp_path):
    from flight.decisionlog import encode_record

    old = {"schema": 2, "seq": 0, "action": "downlink", "partial": True, "degraded": [],
           "clear_tiles": [[0, 1, 0.05], [0, 2, 0.01], [3, 0, 0.0]]}
    (tmp_path / "d.jsonl").write_bytes(encode_record(old))
    rec = read_log(tmp_path / "d.jsonl").records[0]
    assert rec["clear_tiles"] == [[0, 1, 2, 0.05], [3, 0, 0, 0.0]] and rec["clear_tiles_omitted"] == 0
    assert validate_record(dict(old, clear_tiles=[[1, "x", 2]])) is not None


def test_every_fault_code_the_gate_can_write_is_documented():
    """Issue 19 item 3: the fault codes (implausible_radiometry for a scene scaled twice among them) are a table in
    docs/decision-log.md, generated from flight.logschema.FAULT_CODES."""
    import flight.errors as fe
    from flight.logschema import FAULT_CODES

    scene_codes = {c.code for c in vars(fe).values() if isinstance(c, type) and issubclass(c, fe.SceneError)
                   and c is not fe.SceneError}
    assert scene_codes | {"model_corrupt", "model_reload_failed", "out_of_memory", "internal"} <= set(FAULT_CODES)
    assert "darker than 0.01" in FAULT_CODES["implausible_radiometry"] and "scalar" in FAULT_CODES["bad_argument"]
