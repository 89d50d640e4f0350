"""Scene I/O: the shared .npz schema and GeoTIFF, mapped to canonical bands and TOA reflectance."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flight.bands import canonical_bands
from flight.scenefile import radiometry_from_units, sensor_key

SHARED_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@dataclass
class Scene:
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
    meta: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.mask is not None and bool((self.mask != 255).any())

    def reflectance(self, bands: tuple[str, ...] | None = None) -> np.ndarray:
        """float32 TOA reflectance, (H, W, len(bands)); raises KeyError naming a missing band."""
        names = bands or self.band_names
        missing = [b for b in names if b not in self.band_names]
        if missing:
            raise KeyError(f"scene {self.scene_id} lacks band(s) {missing}; it has {list(self.band_names)}")
        idx = [self.band_names.index(b) for b in names]
        out = self.bands[..., idx].astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if self.nodata is not None:
            out[self.nodata] = 0.0
        return out


def _str(z, key, default=""):
    return str(z[key]) if key in z.files else default


def load_npz(path: str | Path) -> Scene:
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if "bands" not in z.files or "band_names" not in z.files:
            raise ValueError(f"{path}: not a scene .npz (needs keys 'bands' and 'band_names'; see the data README)")
        bands = z["bands"]
        sensor = _str(z, "sensor")
        names = canonical_bands([str(b) for b in z["band_names"]], sensor=sensor_key(sensor))
        units = _str(z, "units")
        scale, offset = radiometry_from_units(units, bands.dtype)
        mask = z["mask"] if "mask" in z.files else None
        nodata = z["nodata"].astype(bool) if "nodata" in z.files else None
        tag = _str(z, "scene_visual") or None
        if tag:
            tag = "overcast" if "overcast" in tag else ("clear" if "clear" in tag else tag)
        return Scene(scene_id=path.stem, bands=bands, band_names=names, scale=scale, offset=offset, mask=mask,
                     nodata=nodata, tag=tag, sensor=sensor, path=str(path),
                     meta={"units": units, "label_type": _str(z, "label_type"), "source": _str(z, "source")})


def load_geotiff(path: str | Path, band_names, scale: float = 1.0, offset: float = 0.0,
                 sensor: str | None = None) -> Scene:
    import tifffile

    arr = tifffile.imread(str(path))
    names = canonical_bands(band_names, sensor)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[0] == len(names) and arr.shape[-1] != len(names):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.shape[-1] != len(names):
        raise ValueError(f"{path}: {arr.shape[-1]} bands in file but {len(names)} band names given")
    return Scene(scene_id=Path(path).stem, bands=arr, band_names=names, scale=scale, offset=offset,
                 sensor=sensor or "", path=str(path))


def load_scene(path: str | Path, **kw) -> Scene:
    p = Path(path)
    if p.suffix == ".npz":
        return load_npz(p)
    if p.suffix.lower() in (".tif", ".tiff"):
        return load_geotiff(p, **kw)
    raise ValueError(f"{p}: unsupported scene format (use .npz or GeoTIFF)")


def real_scene_paths(root: str | Path = SHARED_REAL) -> list[Path]:
    root = Path(root)
    return sorted(root.glob("*/*.npz")) if root.is_dir() else []
