"""Decision log: CRC per record, torn/corrupt lines skipped, kill -9 mid-stream loses no complete record."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flight import DecisionLog, read_log
from flight.decisionlog import encode_record
from flight.logschema import SCHEMA_VERSION


def _write(path, n, **kw):
    with DecisionLog(path, **kw) as log:
        for i in range(n):
            log.append({"action": "downlink", "i": i, "cloud_fraction": i / 100})


def test_roundtrip_and_sequence_resumes(tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, 5)
    _write(p, 3)
    res = read_log(p)
    assert not res.problems
    assert [r["seq"] for r in res.records] == list(range(8))
    assert all(r["schema"] == SCHEMA_VERSION and r["utc"].endswith("Z") for r in res.records)


def test_truncated_mid_record_is_reported_and_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, 10)
    data = p.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1) + 25   # mid-way into the last record
    p.write_bytes(data[:cut])
    res = read_log(p)
    assert len(res.records) == 9 and len(res.problems) == 1 and "torn" in res.problems[0].reason
    _write(p, 2)                                      # the writer terminates the torn line first
    res = read_log(p)
    assert [r["i"] for r in res.records] == list(range(9)) + [0, 1]
    # seq 9 was acknowledged before the file was cut: it is never handed out again (high-water mark)
    assert [r["seq"] for r in res.records] == list(range(9)) + [10, 11]


def test_corrupt_byte_fails_crc_only_for_that_record(tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, 6)
    lines = p.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"downlink"', b'"downlinK"')
    p.write_bytes(b"\n".join(lines))
    res = read_log(p)
    assert len(res.records) == 5 and "CRC32" in res.problems[0].reason and res.problems[0].line == 3


def test_garbage_line_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, 2)
    with open(p, "ab") as f:
        f.write(b"\x00\xff not json\n")
        f.write(encode_record({"seq": 99, "action": "discard"}))
    res = read_log(p)
    assert len(res.records) == 3 and len(res.problems) == 1


def test_rotation_keeps_every_record(tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, 300, max_bytes=4096, keep=50, fsync="never")
    assert (tmp_path / "d.jsonl.1").exists()
    res = read_log(p)
    assert [r["i"] for r in res.records] == list(range(300)) and not res.problems


_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from flight import DecisionLog
log = DecisionLog({path!r}, fsync={fsync!r})
i = 0
while True:
    log.append({{"action": "discard", "i": i, "pad": "x" * (i % 500)}})
    i += 1
    if i == 50:
        print("ready", flush=True)
"""


@pytest.mark.parametrize("fsync", ["every", "never"])
def test_kill_9_writer_mid_stream_loses_no_complete_record(tmp_path, fsync):
    from conftest import ROOT

    p = tmp_path / "d.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), path=str(p), fsync=fsync)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = read_log(p)
    n = len(res.records)
    assert n >= 50
    assert [r["i"] for r in res.records] == list(range(n))     # every complete record, in order
    assert len(res.problems) <= 1                              # at most the one torn tail line
    # a restarted writer continues the sequence without swallowing anything
    _write(p, 1)
    res2 = read_log(p)
    assert len(res2.records) == n + 1 and res2.records[-1]["seq"] == n


def test_log_summary_cli(tmp_path):
    from flight.logsummary import summarize

    p = tmp_path / "d.jsonl"
    with DecisionLog(p) as log:
        for i, a in enumerate(["downlink", "discard", "reacquire", "fault", "downlink"]):
            log.append({"action": a, "latency_s": 0.01 * (i + 1), "scene_bytes": 1000, "downlink_bytes": 1000 if a == "downlink" else 0,
                        "cloud_fraction": 0.1 * i})
    out = summarize(p)
    assert "downlink=2, discard=1, reacquire=1, fault=1" in out
    assert "50.0 % of gated" in out                                                    # faulted bytes not saved
    pytest.importorskip("matplotlib", reason="the timeline PNG needs matplotlib (the [hil] extra)")
    assert "timeline written" in summarize(p, str(tmp_path / "t.png")) and (tmp_path / "t.png").stat().st_size > 1000


# ---------------------------------------------------------------- issue 9: robustness at the edges

_SHORT_WRITES = """
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
from flight import CloudGate
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
gate = CloudGate.from_model(log={{"path": {path!r}}}, early_exit={{"enabled": False}})
scene = np.full((64, 64, 4), 0.1, np.float32)
out = []
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))
for i in range(40):
    d = gate.process(scene, ("blue", "green", "red", "nir"), scene_id="s%d" % i)
    out.append([d.log_seq, d.degraded])
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
for i in range(5):
    d = gate.process(scene, ("blue", "green", "red", "nir"), scene_id="t%d" % i)
    out.append([d.log_seq, d.degraded])
gate.close()
print(json.dumps(out))
"""


def test_short_writes_never_ack_a_torn_record(tmp_path):
    """Issue 9 item 1: RLIMIT_FSIZE makes write() short; an acked seq must be whole on disk."""
    import json as _json

    from conftest import ROOT

    p = tmp_path / "d.jsonl"
    r = subprocess.run([sys.executable, "-c", _SHORT_WRITES.format(root=str(ROOT), path=str(p))],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = _json.loads(r.stdout.strip().splitlines()[-1])
    acked = [s for s, _ in out if s is not None]
    failed = [deg for s, deg in out if s is None]
    assert failed and all([e["code"] for e in deg] == ["log_write_failed"] for deg in failed)
    res = read_log(p)
    assert res.problems == []                       # the torn tail was repaired, nothing glued
    logged = [r["seq"] for r in res.records if r.get("kind") != "model_event"]   # decisions (a model event is
    assert sorted(acked) == logged                  # every acked seq on disk, nothing else     # a record too)
    assert len(set(logged)) == len(logged) and all(out[-k][0] is not None for k in range(1, 6))


def test_short_write_repairs_tail_before_next_append(tmp_path, monkeypatch):
    """A write that stops mid-record (ENOSPC after a partial write) is truncated back, not glued onto."""
    import flight.decisionlog as dl
    from flight import DecisionLogError

    p = tmp_path / "d.jsonl"
    log = DecisionLog(p, fsync="never")
    log.append({"action": "downlink"})
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:17])             # short write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dl.os, "write", flaky)
    with pytest.raises(DecisionLogError, match="write failed"):
        log.append({"action": "discard"})
    monkeypatch.setattr(dl.os, "write", real_write)
    assert log.append({"action": "reacquire"}) == 1             # the failed record consumed no seq
    log.close()
    res = read_log(p)
    assert res.problems == [] and [(r["seq"], r["action"]) for r in res.records] == [(0, "downlink"), (1, "reacquire")]


def test_second_writer_is_refused_with_a_typed_error(tmp_path):
    """Issue 9 item 2: one writer per log (lock file); a second writer, in-process or not, is refused."""
    from flight import DecisionLogError
    from flight.errors import DecisionLogBusyError

    p = tmp_path / "d.jsonl"
    first = DecisionLog(p)
    with pytest.raises(DecisionLogBusyError, match="one writer") as e:
        DecisionLog(p)
    assert isinstance(e.value, DecisionLogError) and e.value.code == "log_busy"
    from conftest import ROOT

    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flight import DecisionLog; DecisionLog({str(p)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "DecisionLogBusyError" in r.stderr
    first.close()
    DecisionLog(p).close()                                      # released on close


def test_log_file_vanishing_is_detected_and_recreated(tmp_path):
    """Issue 9 item 2: a log deleted (or replaced) under a running writer is recreated, not written into the void."""
    p = tmp_path / "d.jsonl"
    log = DecisionLog(p, fsync="never")
    log.append({"action": "downlink"})
    p.unlink()
    log.append({"action": "discard"})
    log.append({"action": "reacquire"})
    res = read_log(p)
    assert [r["seq"] for r in res.records] == [1, 2] and res.records[0]["log_recreated"] is True
    p.rename(tmp_path / "moved.jsonl")                          # replaced by another inode
    p.write_bytes(b"")
    log.append({"action": "fault"})
    log.close()
    assert [r["seq"] for r in read_log(p).records] == [3]


@pytest.mark.parametrize("line,reason", [
    (b'{"crc32":0,"record":NaN}\n', "JSON"),
    (b'{"crc32":0,"record":' + b"[" * 100000 + b"]" * 100000 + b"}\n", "nested"),
    (encode_record([1, 2, 3]), "object"),
    (encode_record(7), "object"),
    (encode_record({"action": "discard"}), "seq"),
    (encode_record({"seq": "7"}), "seq"),
    (encode_record({"seq": 3, "scene_bytes": "lots"}), "scene_bytes"),
    (b'{"crc32":"x","record":{"seq":1}}\n', "crc32"),
    (encode_record({"seq": 3, "schema": 0, "degraded": [{"code": "x", "severity": "warning", "text": ""}]}), "schema"),
    (encode_record({"seq": 3, "schema": 99}), "schema"),
    (encode_record({"seq": 3, "scene_bytes": 10 ** 400}), "range"),
])
def test_reader_and_startup_never_raise_on_file_content(tmp_path, line, reason):
    """Issue 9 item 3: NaN, deep nesting, non-object or seq-less records: reported and skipped everywhere."""
    from flight.logsummary import summarize

    p = tmp_path / "d.jsonl"
    _write(p, 3)
    with open(p, "ab") as f:
        f.write(line)
    res = read_log(p)
    assert len(res.records) == 3 and len(res.problems) == 1 and reason in res.problems[0].reason
    assert "3 intact records, 1 skipped" in summarize(p)
    with DecisionLog(p) as log:                                 # start-up: seq resumes from the last good record
        assert log.append({"action": "downlink"}) == 3


def test_last_seq_found_behind_a_large_last_record(tmp_path):
    """Issue 9 item 4: a large last record must not make seq restart at 0."""
    p = tmp_path / "d.jsonl"
    _write(p, 4)
    with DecisionLog(p) as log:
        log.append({"action": "downlink", "clear_tiles": [[i, i, 0.01] for i in range(8000)]})   # > 64 KiB
    assert p.stat().st_size > 100_000
    with DecisionLog(p) as log:
        assert log.append({"action": "downlink"}) == 5


def test_log_bounds_field_sizes(tmp_path):
    """Issue 9 item 4: the log refuses ids longer than MAX_ID_CHARS and records above MAX_RECORD_BYTES."""
    from flight import DecisionLogError
    from flight.decisionlog import MAX_ID_CHARS, MAX_RECORD_BYTES

    p = tmp_path / "d.jsonl"
    with DecisionLog(p) as log:
        with pytest.raises(DecisionLogError, match="scene_id"):
            log.append({"scene_id": "x" * (MAX_ID_CHARS + 1)})
        with pytest.raises(DecisionLogError, match="too large"):
            log.append({"blob": "x" * MAX_RECORD_BYTES})
        assert log.append({"scene_id": "x" * MAX_ID_CHARS}) == 0
    assert [r["seq"] for r in read_log(p).records] == [0]


def test_log_truncated_under_the_writer_loses_no_acknowledged_record(tmp_path):
    """Outside review: a file cut under a running writer glued the next acked record onto the torn line."""
    p = tmp_path / "d.jsonl"
    log = DecisionLog(p, fsync="never")
    for i in range(3):
        log.append({"action": "downlink"})
    os.truncate(p, p.stat().st_size - 20)                       # the last record is now torn
    acked = [log.append({"action": "discard"}), log.append({"action": "discard"})]
    res = read_log(p)
    assert [r["seq"] for r in res.records][-2:] == acked and not res.problems
    os.truncate(p, 0)                                            # cut to nothing
    acked = [log.append({"action": "reacquire"})]
    log.close()
    res = read_log(p)
    assert [r["seq"] for r in res.records] == acked and not res.problems and b"\0" not in p.read_bytes()


def test_removing_the_lock_file_does_not_admit_a_second_writer(tmp_path):
    from flight import DecisionLogError

    p = tmp_path / "d.jsonl"
    log = DecisionLog(p, fsync="never")
    log.append({"action": "downlink"})
    (tmp_path / "d.jsonl.lock").unlink()
    log.append({"action": "downlink"})                           # the writer takes its lock again
    with pytest.raises(DecisionLogError):
        DecisionLog(p, fsync="never")
    log.close()
    assert [r["seq"] for r in read_log(p).records] == [0, 1]


def test_a_failed_recreate_is_retried_not_fatal(tmp_path):
    from flight import DecisionLogError

    p = tmp_path / "d.jsonl"
    log = DecisionLog(p, fsync="never")
    log.append({"action": "downlink"})
    p.unlink()
    p.mkdir()                                                    # the path is briefly not a file
    with pytest.raises(DecisionLogError):
        log.append({"action": "discard"})
    p.rmdir()
    seq = log.append({"action": "discard"})                      # the writer recovers
    log.close()
    assert [r["seq"] for r in read_log(p).records] == [seq]


def test_seq_never_goes_back_when_the_log_vanished_before_a_restart(tmp_path):
    """Outside review of issue 9: FILE deleted (or cut) while no writer ran made the next writer restart at
    seq 0 (or at FILE.1's end), duplicating acknowledged seqs. The high-water mark in FILE.lock prevents it."""
    p = tmp_path / "d.jsonl"
    _write(p, 5)
    p.unlink()                                                   # gone while no writer ran
    _write(p, 2)
    assert [r["seq"] for r in read_log(p).records] == [5, 6]
    _write(p, 30, max_bytes=2000, keep=3)                        # rotated: FILE.1 .. FILE.3
    p.unlink()
    with DecisionLog(p, max_bytes=2000, keep=3) as log:          # FILE.1's end is not the high-water mark
        assert log.append({"action": "discard"}) == 37
    os.truncate(p, 0)                                            # cut while no writer ran
    with DecisionLog(p) as log:
        assert log.append({"action": "discard"}) == 38


def test_torn_high_water_slot_falls_back_to_the_other(tmp_path):
    """The mark is two alternating CRC-checked slots: a torn or corrupt slot leaves the previous one."""
    from flight.decisionlog import _HWM_SLOT

    p, lock = tmp_path / "d.jsonl", tmp_path / "d.jsonl.lock"
    _write(p, 8)                                                 # last acked seq 7 (slot 1), 6 in slot 0
    raw = bytearray(lock.read_bytes())
    assert len(raw) == 2 * _HWM_SLOT
    raw[_HWM_SLOT + 25] ^= 0x10                                  # slot 1 corrupt
    lock.write_bytes(bytes(raw))
    p.unlink()
    with DecisionLog(p) as log:
        assert log.append({"action": "downlink"}) == 7           # from slot 0 (6): no acked seq reused
    lock.write_bytes(b"garbage")                                 # both slots unreadable: FILE's own end
    with DecisionLog(p) as log:
        assert log.append({"action": "downlink"}) == 8


# ---------------------------------------------------------------- issue 19: log summary for a mission planner


def _summary_cli(path, *args):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "flight", "log", "summary", str(path), *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))


@pytest.mark.parametrize("content", [b"", os.urandom(3000).replace(b"\n", b"")[:1500] + b"\n" + os.urandom(64),
                                     b"\n\n\n", b'{"not": "a record"}\n'])
def test_log_summary_without_one_readable_record_is_an_error(tmp_path, content):
    """Issue 19 item 5: random bytes and an empty file exit non-zero with a message; no '-..-' summary."""
    from flight.logsummary import NoReadableRecordError, summarize

    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    r = _summary_cli(p)
    assert r.returncode == 2 and "no readable record" in r.stderr and not r.stdout.strip(), (r.returncode, r.stderr)
    with pytest.raises(NoReadableRecordError, match="no readable record"):
        summarize(p)
    _write(p, 2)                                     # one intact record after the junk: a summary, exit 0
    r = _summary_cli(p)
    assert r.returncode == 0 and "2 intact records" in r.stdout, r.stderr


def test_log_summary_survives_any_id_the_gate_accepts(tmp_path):
    """Issue 19 item 5: a lone surrogate, control characters and line breaks in a scene id (all accepted by
    the gate) are printed escaped, one line per frame; the CLI exits 0."""
    import numpy as np

    from flight import CloudGate

    p = tmp_path / "d.jsonl"
    ids = ["\ud800", "a\nb\x1b[31mred", "caf\u00e9-\U0001f600"]
    gate = CloudGate.from_model(log={"path": str(p)})
    with gate:
        for sid in ids:
            d = gate.process(np.full((64, 64, 4), 0.1, np.float32), ("blue", "green", "red", "nir"), scene_id=sid)
            assert d.action != "fault" and d.log_seq is not None
    r = _summary_cli(p, "--limit", "0")
    assert r.returncode == 0, r.stderr
    frames = [x for x in r.stdout.splitlines() if "cloud=" in x]
    assert len(frames) == 3 and "\\ud800" in frames[0] and "a\\nb\\x1b[31mred" in frames[1]
    assert "caf\u00e9-\U0001f600" in frames[2] and "\x1b" not in r.stdout


def test_log_summary_volume_ids_and_partial_marks(tmp_path):
    """Issue 19 item 6: gating savings apart from faulted bytes, each line naming its total; scene ids
    printed whole (past 32 characters); partial downlinks marked in the per-frame lines."""
    from flight.logsummary import summarize

    p = tmp_path / "d.jsonl"
    long_id = "S2B_MSIL1C_20231105T103149_N0509_R108_T32TMT_20231105T123611_tile_0042"
    with DecisionLog(p) as log:
        for a, scene, down, partial in [("downlink", 100, 100, False), ("downlink", 100, 40, True),
                                        ("discard", 100, 0, False), ("fault", 300, 0, False)]:
            log.append({"action": a, "scene_id": long_id + a + str(partial), "scene_bytes": scene * 2**20,
                        "downlink_bytes": down * 2**20, "partial": partial, "cloud_fraction": 0.5})
    out = summarize(p)
    vol = out[out.index("data volume"):out.index("sequence:")]
    assert "acquired (all frames with a size): 600.0 MiB in 4 frames" in vol
    assert "gated (of acquired): 300.0 MiB in 3 frames -> 140.0 MiB to downlink, 160.0 MiB saved by gating" in vol
    assert "discard 100.0 MiB, partial-downlink pruning 60.0 MiB" in vol
    assert "faulted (of acquired): 300.0 MiB in 1 faulted frame(s), not gated" in vol
    assert "460.0 MiB saved" not in vol                  # the old total counted faulted bytes as saved
    rows = [x for x in out.splitlines() if long_id in x]
    assert len(rows) == 4 and all(long_id + a in x for x, a in zip(rows, ["downlink", "downlink", "discard", "fault"]))
    assert ["PARTIAL" in x for x in rows] == [False, True, False, False]
