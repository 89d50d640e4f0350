"""Issue 12 item 7: a non-editable install ships the default model; from_model() works from a clean venv.

Offline: the wheel is built with --no-build-isolation --no-index from a copy of the sources, the venv
borrows numpy/pyyaml/runtimes from this interpreter's site-packages through a .pth line (which does
not run that directory's own .pth files, so an editable install there cannot leak in)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from conftest import ROOT

_PROBE = """
import json, numpy as np, flight
from flight import CloudGate
from flight.model import MODELS_DIR
g = CloudGate.from_model()
d = g.process(np.full((64, 64, 4), 0.1, np.float32), ("blue", "green", "red", "nir"))
print(json.dumps({"file": flight.__file__, "models": str(MODELS_DIR), "card": g.card.name, "action": d.action,
                  "sha": g.card.sha256_of_loaded}))
"""


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r


def test_wheel_in_clean_venv_runs_the_bundled_default_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / f, src / f)
    for d in ("flight", "models"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("cloudgate-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: where this interpreter has cloudgate installed (not editable), pip would see it through
    # the borrowed path and skip installing the wheel
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDGATE_MODELS", "PYTHONPATH")}
    out = json.loads(_run([str(py), "-c", _PROBE], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(venv)) and out["models"].startswith(str(venv))   # not this checkout
    card = next(p for p in (ROOT / "models").glob("*.yaml") if (yaml.safe_load(p.read_text()) or {}).get("default"))
    assert out["card"] == yaml.safe_load(card.read_text())["name"] and len(out["sha"]) == 64
    assert out["action"] in ("downlink", "discard")
    # issue 25 item 7: the README's embedding snippet runs verbatim after the install, from an empty folder
    from test_flight_contract import _python_block

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    snippet = _python_block("README.md", "## Embedding the gate in Python")
    printed = _run([str(py), "-c", snippet], cwd=elsewhere, env=env).stdout
    assert printed.startswith("downlink threshold 0.39") and list(elsewhere.iterdir()) == [], printed
    # CLOUDGATE_MODELS still wins over the bundled model
    alt = tmp_path / "alt"
    shutil.copytree(ROOT / "models", alt)
    out = json.loads(_run([str(py), "-c", _PROBE], cwd=tmp_path, env=dict(env, CLOUDGATE_MODELS=str(alt)))
                     .stdout.strip().splitlines()[-1])
    assert out["models"] == str(alt)
