"""The shared .npz scene schema and its one reader (numpy only): the flight CLI, HIL, bench and ground
all read scene files through `load_npz`.

Schema (keys of one .npz):
  bands         (H, W, C) float reflectance, or integer DN with `units` stating the rescaling rule
  band_names    (C,) strings, mapped to canonical names (flight.bands) with the `sensor` hint
  sensor        optional text ("Sentinel-2", "Landsat-5", else Landsat-8)
  units         optional text; "DN * a + b" (or "- b") for integer bands; DN without one gets the
                Landsat-8 L1 rule (L8_DN_SCALE, L8_DN_OFFSET)
  mask          optional (H, W) uint8 label: 0 clear, 1 cloud, 2 shadow, 255 no label
  nodata        optional (H, W), nonzero = no data
  scene_visual  optional scene-level visual tag (mapped to "clear" / "overcast" when it says so)
  label_type, source   optional provenance text
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bands import canonical_bands

# Landsat-8 L1 standard reflectance rescaling without sun-elevation correction; used for DN scenes
# that do not publish their own rule.
L8_DN_SCALE, L8_DN_OFFSET = 2e-5, -0.1
_DN_RULE = re.compile(r"DN\s*\*\s*([0-9.eE+-]+)\s*([+-])\s*([0-9.eE+-]+)")
NO_LABEL = 255


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


@dataclass
class Scene:
    """One scene file's contents, as stored (no copy of the bands, no reflectance conversion)."""

    scene_id: str
    bands: np.ndarray                    # (H, W, C) as stored (float reflectance or integer DN)
    band_names: tuple[str, ...]          # canonical
    scale: float = 1.0                   # reflectance = bands * scale + offset
    offset: float = 0.0
    mask: np.ndarray | None = None       # (H, W) uint8, 0 clear, 1 cloud, 2 shadow, 255 no label
    nodata: np.ndarray | None = None     # (H, W) bool, True = no data
    tag: str | None = None               # scene-level visual tag ("clear"/"overcast") when known
    sensor: str = ""
    path: str = ""
    meta: dict = field(default_factory=dict)   # units, label_type, source

    @property
    def labelled(self) -> bool:
        return self.mask is not None and bool((self.mask != NO_LABEL).any())

    @property
    def radiometry(self) -> tuple[float, float]:
        return self.scale, self.offset

    def reflectance(self, bands: tuple[str, ...] | None = None) -> np.ndarray:
        """float32 TOA reflectance, (H, W, len(bands)), no-data pixels 0; raises KeyError naming a
        missing band."""
        names = bands or self.band_names
        missing = [b for b in names if b not in self.band_names]
        if missing:
            raise KeyError(f"scene {self.scene_id} lacks band(s) {missing}; it has {list(self.band_names)}")
        idx = [self.band_names.index(b) for b in names]
        out = self.bands[..., idx].astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if self.nodata is not None:
            out[self.nodata] = 0.0
        return out

    def frame(self) -> dict:
        """The scene as one gate input (the frame dict of the flight CLI and HIL streams):
        dict(bands, band_names, radiometry, scene_id, valid_mask or None, tag, label or None)."""
        return {"bands": self.bands, "band_names": self.band_names, "radiometry": self.radiometry,
                "scene_id": self.scene_id, "valid_mask": None if self.nodata is None else ~self.nodata,
                "tag": self.tag, "label": self.mask if self.labelled else None}


def _text(z, key: str) -> str:
    return str(z[key]) if key in z.files else ""


def load_npz(path: str | Path) -> Scene:
    """Read one scene file of the shared schema (ValueError when it is not one)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if "bands" not in z.files or "band_names" not in z.files:
            raise ValueError(f"{path}: not a scene file (needs keys 'bands' and 'band_names'; see the data README)")
        bands = z["bands"]
        sensor = _text(z, "sensor")
        names = canonical_bands([str(b) for b in z["band_names"]], sensor=sensor_key(sensor))
        units = _text(z, "units")
        scale, offset = radiometry_from_units(units, bands.dtype)
        mask = z["mask"] if "mask" in z.files else None
        nodata = z["nodata"].astype(bool) if "nodata" in z.files else None
        tag = _text(z, "scene_visual") or None
        meta = {"units": units, "label_type": _text(z, "label_type"), "source": _text(z, "source")}
    if tag:
        tag = "overcast" if "overcast" in tag else ("clear" if "clear" in tag else tag)
    return Scene(scene_id=path.stem, bands=bands, band_names=names, scale=scale, offset=offset, mask=mask,
                 nodata=nodata, tag=tag, sensor=sensor, path=str(path), meta=meta)


def read_npz_scene(path: str | Path) -> dict:
    """load_npz(path).frame(): dict(bands, band_names (canonical), radiometry, scene_id, valid_mask or
    None, tag, label or None)."""
    return load_npz(path).frame()
