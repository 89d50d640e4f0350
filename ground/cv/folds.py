"""Folds of the cross-validation by acquisition over the shared labelled scenes, and its config."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml

from hil.paths import REPO

from ..distill import load_config

FOLDS_FILE = REPO / "ground" / "data" / "cv_folds.yaml"
CV_CONFIG = REPO / "ground" / "configs" / "cv.yaml"
FOLDS_SEED = 20261203
N_FOLDS = 5


def acquisition(stem: str) -> str:
    """The acquisition a labelled scene comes from (scenes of one acquisition always share a fold)."""
    m = re.match(r"l8biome_([A-Za-z]+)_(\d+)_", stem)
    if m:
        return f"l8biome_{m.group(1)}_{m.group(2)}"
    if stem.startswith("oncloudn_"):
        return "oncloudn_demo"   # acquisitions of the demo chips are not documented: one group
    return stem


def stratum(stem: str) -> str:
    m = re.match(r"l8biome_([A-Za-z]+)_", stem)
    return f"l8biome/{m.group(1)}" if m else "other"


def draw_folds(stems: list[str], k: int = N_FOLDS, seed: int = FOLDS_SEED) -> dict:
    """Deterministic grouped, stratified K-fold assignment -> {"folds": [[stems], ...], ...}."""
    rng = np.random.default_rng(seed)
    strata: dict[str, dict[str, list[str]]] = {}
    for s in sorted(stems):
        strata.setdefault(stratum(s), {}).setdefault(acquisition(s), []).append(s)
    folds: list[list[str]] = [[] for _ in range(k)]
    start = 0
    for name in sorted(strata):
        groups = sorted(strata[name])
        order = rng.permutation(len(groups))
        for j, gi in enumerate(order):
            folds[(start + j) % k].extend(strata[name][groups[gi]])
        start = (start + len(groups)) % k   # the next stratum continues where this one stopped: balanced sizes
    return {"rule": f"python -m ground cv folds --draw: grouped by acquisition, stratified by source/biome, "
                    f"{k} folds, seeded round-robin", "seed": seed, "folds": [sorted(f) for f in folds]}


def load_folds(path: Path = FOLDS_FILE) -> list[list[str]]:
    d = yaml.safe_load(Path(path).read_text())
    folds = d["folds"]
    seen = [s for f in folds for s in f]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{path}: a scene is in two folds")
    for f in folds:   # one acquisition never straddles folds
        for g in {acquisition(s) for s in f}:
            if any(acquisition(s) == g for o in folds if o is not f for s in o):
                raise ValueError(f"{path}: acquisition {g} is split across folds")
    return folds


def labelled_stems() -> list[str]:
    from flight.scenefile import load_npz
    from hil.paths import real_scene_paths

    return [p.stem for p in real_scene_paths() if load_npz(p).labelled]


# ----------------------------------------------------------------------------------- config
def load_cv(path: str | Path = CV_CONFIG) -> tuple[dict, dict]:
    path = Path(path)
    cv = yaml.safe_load(path.read_text())
    base = load_config(path.parent / cv["base_config"])
    return cv, base


