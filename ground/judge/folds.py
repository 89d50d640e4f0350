"""Folds of the generalization judge: every shared real acquisition, labelled or not, held out by place.

A fold holds whole places (`site_id` of the data README: every acquisition of one place, every tile of one
acquisition), so a student is always scored on places it never saw. Places are dealt to K folds round-robin
from a seeded shuffle within three strata, so that each fold holds its share of the places that matter most:
  bright_clear  a place with a scene the 4-band teacher reads <= 10 % cloud at median VNIR reflectance >= 0.25
                (clear snow, ice, salt, desert, bright water: the scenes a gate must never discard)
  labelled      a place with a human-labelled scene (label metrics need them in every fold)
  other         the rest
The committed fold file (ground/data/judge_folds.yaml) is what every run reads; `python -m ground judge folds
--draw` writes it from the teacher references (ground/judge/references.py). Scenes added to ../shared later
are not in any fold until the file is re-drawn: the study stays comparable while the store grows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from hil.paths import REPO, SHARED_REAL, real_scene_paths

FOLDS_FILE = REPO / "ground" / "data" / "judge_folds.yaml"
FOLDS_SEED = 20261207
N_FOLDS = 5
VNIR = ("blue", "green", "red", "nir")


@dataclass(frozen=True)
class SceneFile:
    """One scene file of the shared store with the keys folds are built from."""
    stem: str
    path: Path
    acquisition_id: str
    site_id: str
    labelled: bool
    has_vnir: bool


def scene_files(root: Path = SHARED_REAL) -> list[SceneFile]:
    """Every scene file under root with its acquisition and site keys (read from the file, never from its
    name). Files without a site_id fall back to their acquisition_id, then to their own name."""
    from flight.scenefile import load_npz

    out = []
    for p in real_scene_paths(root):
        with np.load(p, allow_pickle=False) as z:
            acq = str(z["acquisition_id"]) if "acquisition_id" in z.files else p.stem
            site = str(z["site_id"]) if "site_id" in z.files else acq
        sc = load_npz(p)
        out.append(SceneFile(p.stem, p, acq, site, sc.labelled, all(b in sc.band_names for b in VNIR)))
    return out


def stratum(site_files: list[SceneFile], refs: dict[str, dict]) -> str:
    if any(refs.get(f.stem, {}).get("bright_clear") for f in site_files):
        return "bright_clear"
    return "labelled" if any(f.labelled for f in site_files) else "other"


def draw_folds(files: list[SceneFile], refs: dict[str, dict], k: int = N_FOLDS, seed: int = FOLDS_SEED) -> dict:
    """Deterministic K-fold assignment of places -> the fold file's content. Only files the 4-band student
    can read (blue, green, red, nir) take part."""
    if k < 2:
        raise ValueError(f"k={k}: a judge needs at least 2 folds")
    sites: dict[str, list[SceneFile]] = {}
    for f in sorted(files, key=lambda f: f.stem):
        if f.has_vnir:
            sites.setdefault(f.site_id, []).append(f)
    strata: dict[str, list[str]] = {}
    for s, fs in sorted(sites.items()):
        strata.setdefault(stratum(fs, refs), []).append(s)
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    start = 0
    for name in ("bright_clear", "labelled", "other"):
        group = strata.get(name, [])
        for j, gi in enumerate(rng.permutation(len(group))):
            folds[(start + j) % k].append(group[gi])
        start = (start + len(group)) % k   # the next stratum continues where this one stopped: balanced sizes
    return {"rule": f"python -m ground judge folds --draw: places (site_id) of every shared real file with blue, green, "
                    f"red and nir, stratified bright_clear / labelled / other, {k} folds, seeded round-robin",
            "seed": seed,
            "strata": {n: len(v) for n, v in strata.items()},
            "folds": [{"sites": sorted(f), "files": sorted(x.stem for s in f for x in sites[s])} for f in folds]}


def load_folds(path: Path = FOLDS_FILE, files: list[SceneFile] | None = None) -> list[list[str]]:
    """The committed folds as lists of file stems. Checks: no file in two folds, no place split across
    folds (against the store's current keys when `files` is given)."""
    d = yaml.safe_load(Path(path).read_text())
    folds = [list(f["files"]) for f in d["folds"]]
    seen = [s for f in folds for s in f]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{path}: a file is in two folds; re-draw with `python -m ground judge folds --draw`")
    if files is not None:
        site_of = {f.stem: f.site_id for f in files}
        for i, f in enumerate(folds):
            others = {site_of.get(s) for j, o in enumerate(folds) if j != i for s in o}
            split = sorted({site_of.get(s) for s in f} & others - {None})
            if split:
                raise ValueError(f"{path}: place(s) {split} straddle folds; re-draw with `python -m ground judge folds --draw`")
    return folds
