"""Where a development checkout keeps things, defined once for hil, ground, bench and the tests.

SHARED_REAL is the shared real-scene store beside the checkout (../shared/data/real), read in place and
never copied into the repository. flight/ does not know it: the flight CLI takes a directory."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


def real_scene_paths(root: str | Path = SHARED_REAL) -> list[Path]:
    """Every scene file of the shared store (one folder per source), sorted; [] when it is absent."""
    root = Path(root)
    return sorted(root.glob("*/*.npz")) if root.is_dir() else []
