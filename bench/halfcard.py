"""A half-resolution card over the shipped model files, for tests and speed rows only.

write_half_grid_card(folder) copies the shipped default card's artifacts into folder, writes a card that
declares input_grid: {downsample: 2} (the 256² model then sees 512² scene windows averaged 2x2) and stamps
the copies' metadata with it (flight.modelmeta.stamp_card: same weights, same golden outputs). The model
was never trained or validated at that grid: what it measures is the flight path's speed, not accuracy."""
from __future__ import annotations

import shutil
from pathlib import Path

NOT_VALIDATED = ("the shipped full-resolution model under a card declaring input_grid.downsample 2: "
                 "speed of the flight path only, NOT a model validated at half resolution")


def write_half_grid_card(folder: Path, downsample=2, stamp: bool = True) -> Path:
    """-> the card path; downsample None writes no input_grid (stamp=False: the copies keep their metadata)."""
    import yaml

    from flight.model import default_card

    folder = Path(folder)
    src = default_card()
    raw = yaml.safe_load(src.read_text())
    for a in raw["artifacts"].values():
        shutil.copy(src.parent / a["file"], folder / a["file"])
    raw.pop("default", None)
    if downsample is not None:
        raw["input_grid"] = {"downsample": downsample}
    out = folder / "half-grid.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    if stamp:
        from flight.modelmeta import stamp_card

        stamp_card(out)
    return out
