"""Minimal scene-file reader for the flight CLI and HIL (the shared .npz schema); numpy only."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .bands import canonical_bands

# Landsat-8 L1 standard reflectance rescaling without sun-elevation correction; used for DN scenes
# that do not publish their own rule.
L8_DN_SCALE, L8_DN_OFFSET = 2e-5, -0.1
_DN_RULE = re.compile(r"DN\s*\*\s*([0-9.eE+-]+)\s*([+-])\s*([0-9.eE+-]+)")


def radiometry_from_units(units: str, dtype: np.dtype) -> tuple[float, float]:
    """(scale, offset) with reflectance = value * scale + offset, from the .npz 'units' text."""
    if not np.issubdtype(dtype, np.integer):
        return 1.0, 0.0
    m = _DN_RULE.search(units or "")
    if m:
        return float(m.group(1)), float(m.group(3)) * (-1.0 if m.group(2) == "-" else 1.0)
    return L8_DN_SCALE, L8_DN_OFFSET


def sensor_key(sensor: str) -> str:
    return "sentinel2" if "Sentinel-2" in sensor else ("landsat5" if "Landsat-5" in sensor else "landsat8")


def read_npz_scene(path: str | Path) -> dict:
    """-> dict(bands, band_names (canonical), radiometry, scene_id, valid_mask or None, tag, label or None)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if "bands" not in z.files or "band_names" not in z.files:
            raise ValueError(f"{path}: not a scene file (needs 'bands' and 'band_names')")
        bands = z["bands"]
        sensor = str(z["sensor"]) if "sensor" in z.files else ""
        names = canonical_bands([str(b) for b in z["band_names"]], sensor=sensor_key(sensor))
        units = str(z["units"]) if "units" in z.files else ""
        nodata = z["nodata"].astype(bool) if "nodata" in z.files else None
        label = z["mask"] if "mask" in z.files else None
        tag = str(z["scene_visual"]) if "scene_visual" in z.files else None
    if tag:
        tag = "overcast" if "overcast" in tag else ("clear" if "clear" in tag else tag)
    return {"bands": bands, "band_names": names, "radiometry": radiometry_from_units(units, bands.dtype),
            "scene_id": path.stem, "valid_mask": None if nodata is None else ~nodata, "tag": tag,
            "label": None if label is None or not (label != 255).any() else label}
