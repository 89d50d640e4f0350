"""The fixed split of the real labelled scenes, by scene: what ground/ may train or calibrate on, and
what only scores (never used to train, calibrate or choose anything).

The split was drawn once, before any model was scored on it, by `python -m ground split --draw`
(seed SPLIT_SEED): within each stratum (each L8 Biome biome; the six non-Biome labelled scenes as one
stratum), one scene in three (rounded up) goes to evaluation, picked by the seeded RNG. The drawn lists
are committed in ground/data/split.yaml and every consumer reads that file, so a change of rule shows
as a diff. Scenes with the same L8 Biome biome *and* scene index come from one acquisition and would
be drawn together; none of the 25 shared patches share one.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import yaml

SPLIT_FILE = Path(__file__).resolve().parent / "data" / "split.yaml"
SPLIT_SEED = 20261123


def _stratum(stem: str) -> str:
    m = re.match(r"l8biome_([A-Za-z]+)_(\d+)_", stem)
    return f"l8biome/{m.group(1)}" if m else "other"


def _group(stem: str) -> str:
    m = re.match(r"l8biome_([A-Za-z]+)_(\d+)_", stem)
    return f"{m.group(1)}_{m.group(2)}" if m else stem


def draw_split(labelled_stems: list[str], seed: int = SPLIT_SEED) -> dict:
    """Deterministic stratified draw by acquisition group; returns {'evaluation': [...], 'training': [...]}."""
    rng = np.random.default_rng(seed)
    strata: dict[str, dict[str, list[str]]] = {}
    for s in sorted(labelled_stems):
        strata.setdefault(_stratum(s), {}).setdefault(_group(s), []).append(s)
    evaluation, training = [], []
    for name in sorted(strata):
        groups = sorted(strata[name])
        k = math.ceil(len(groups) / 3)
        chosen = set(rng.choice(len(groups), size=k, replace=False).tolist())
        for i, g in enumerate(groups):
            (evaluation if i in chosen else training).extend(strata[name][g])
    return {"evaluation": sorted(evaluation), "training": sorted(training)}


def load_split(path: Path = SPLIT_FILE) -> dict:
    d = yaml.safe_load(path.read_text())
    if set(d.get("evaluation", [])) & set(d.get("training", [])):
        raise ValueError(f"{path}: a scene is in both parts of the split")
    return d


def evaluation_scenes() -> set[str]:
    return set(load_split()["evaluation"])


def training_scenes() -> set[str]:
    return set(load_split()["training"])
