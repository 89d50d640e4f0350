"""bench --quick: one smoke run writes the JSON, Markdown and PNGs with every contender measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_writes_outputs(real_dir, tmp_path):
    pytest.importorskip("ukis_csmask", reason="bench compares against the ukis-csmask teacher ([bench] extra)")
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    js = list(tmp_path.glob("*-quick.json"))
    assert len(js) == 1
    res = json.loads(js[0].read_text())
    gate = "cloudgate (LiteRT INT8, end to end)"
    assert {"teacher_ukis", "threshold", gate, "cloudgate (ORT INT8, end to end)",
            "student invoke only (LiteRT INT8)"} <= set(res["cost"])
    assert all("mpx_per_s" in v["2t"] for v in res["cost"].values())
    # a 111x-fewer-MACs student that is not even 5x faster end to end is a regression in the gate
    assert res["ratios_vs_teacher_2t"][gate] > 5
    ev = res["accuracy_real"]["evaluation"]
    from ground.split import load_split
    assert set(ev["scenes"]) == set(load_split()["evaluation"])
    assert {"student_int8_tflite", "teacher_4b", "threshold"} <= set(ev["summary"])
    assert res["early_exit"]["all_actions_match"]
    assert "growth_mib" in res["memmap"]["full_pass"]
    for suffix in (".md", "_pareto.png", "_masks.png"):
        assert (tmp_path / (js[0].stem + suffix)).stat().st_size > 500
