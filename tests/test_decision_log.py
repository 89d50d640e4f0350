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
    assert all(r["schema"] == 1 and r["utc"].endswith("Z") for r in res.records)


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
    assert [r["seq"] for r in res.records] == list(range(11))


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
    out = summarize(p, str(tmp_path / "t.png"))
    assert "downlink=2, discard=1, reacquire=1, fault=1" in out
    assert "60.0 %" in out and (tmp_path / "t.png").stat().st_size > 1000
