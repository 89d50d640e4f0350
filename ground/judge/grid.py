"""The input grid a carded model decides at (issue 24's half-resolution decision path): the card says it,
the gate honours it, and the judge scores the model exactly as it will fly."""
from __future__ import annotations

from pathlib import Path

import yaml


def declare_input_grid(card: Path, downsample: int) -> None:
    """Record in a model card that its model was trained and validated on `downsample`x`downsample`-averaged
    reflectance (1 = the sensor's grid)."""
    if downsample not in (1, 2):
        raise ValueError(f"input grid downsample={downsample!r}: the gate supports 1 or 2")
    d = yaml.safe_load(Path(card).read_text())
    d["input_grid"] = {"downsample": int(downsample)}
    Path(card).write_text(yaml.safe_dump(d, sort_keys=False))
