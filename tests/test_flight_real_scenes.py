"""Acceptance on the real scenes in ../shared/data/real (skipped cleanly when absent)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL
from flight.scenefile import read_npz_scene

SCENES = sorted(REAL.glob("*/*.npz")) if REAL.is_dir() else []
pytestmark = pytest.mark.skipif(not SCENES, reason="../shared/data/real is absent on this machine")


def _run(gate, sc, mask=None):
    return gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], valid_mask=sc["valid_mask"],
                        radiometry=sc["radiometry"], mask_out=mask)


@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.stem)
def test_backends_agree_and_scene_expectations(gate_litert, gate_ort, path):
    sc = read_npz_scene(path)
    d1, d2 = _run(gate_litert, sc), _run(gate_ort, sc)
    assert d1.action == d2.action, (d1.cloud_fraction, d2.cloud_fraction)
    if "nir" not in sc["band_names"]:
        assert d1.action == "fault" and "nir" in d1.fault
        return
    if sc["tag"] == "clear":
        assert d1.action == "downlink"
    elif sc["tag"] == "overcast":
        assert d1.action in ("discard", "reacquire")
    if sc["label"] is not None:
        mask = np.empty(sc["label"].shape, np.uint8)
        d = _run(gate_litert, sc, mask)
        lab = sc["label"] != 255
        ref = float((sc["label"][lab] == 1).mean())
        assert abs(d.cloud_fraction - ref) <= 0.05, (d.cloud_fraction, ref)


def test_flight_cli_runs_real_stream(real_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    log = tmp_path / "d.jsonl"
    out = subprocess.run([sys.executable, "-m", "flight", "run", str(real_dir), "--log", str(log)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "fault" in out and "downlink" in out
    from flight import read_log

    res = read_log(log)
    assert len(res.records) == len(SCENES) and not res.problems
