"""Canonical band names and the sensor-specific aliases that map onto them.

Shared by flight (input contract) and ground (scene I/O). Canonical names follow the
STAC eo extension common names: coastal, blue, green, red, rededge1..3, nir, nir08, nir09,
cirrus, swir16, swir22.
"""
from __future__ import annotations

CANONICAL_BANDS: tuple[str, ...] = (
    "coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3",
    "nir", "nir08", "nir09", "cirrus", "swir16", "swir22", "tirs1", "tirs2",
)

# Sensor band ids -> canonical name. Keys are lower case.
_SENTINEL2 = {
    "b01": "coastal", "b02": "blue", "b03": "green", "b04": "red", "b05": "rededge1",
    "b06": "rededge2", "b07": "rededge3", "b08": "nir", "b8a": "nir08", "b09": "nir09",
    "b10": "cirrus", "b11": "swir16", "b12": "swir22",
}
_LANDSAT8 = {  # OLI/TIRS, Landsat 8 and 9
    "b1": "coastal", "b2": "blue", "b3": "green", "b4": "red", "b5": "nir",
    "b6": "swir16", "b7": "swir22", "b9": "cirrus", "b10": "tirs1", "b11": "tirs2",
}
_LANDSAT_TM = {  # Landsat 4/5 TM and 7 ETM+
    "b1": "blue", "b2": "green", "b3": "red", "b4": "nir", "b5": "swir16", "b7": "swir22",
}
SENSOR_ALIASES: dict[str, dict[str, str]] = {
    "sentinel2": _SENTINEL2, "landsat8": _LANDSAT8, "landsat9": _LANDSAT8,
    "landsat5": _LANDSAT_TM, "landsat7": _LANDSAT_TM, "landsat4": _LANDSAT_TM,
}
_GENERIC = {"swir1": "swir16", "swir2": "swir22", "nir1": "nir", "vnir": "nir"}


def sensor_table_key(sensor: str) -> str:
    """'Landsat-8' / 'landsat_8' -> 'landsat8' (the SENSOR_ALIASES key)."""
    return sensor.lower().replace("-", "").replace("_", "")


def canonical_band(name: str, sensor: str | None = None) -> str:
    """Map a band name to its canonical name.

    Accepts canonical names ("nir"), generic aliases ("SWIR1"), names with a descriptive
    suffix as the shared data uses them ("B08_nir", "B5_swir16": the suffix wins), and bare
    sensor band ids ("B08") when `sensor` says which table to use. Sentinel-2 ids with a
    leading zero ("B02") are unambiguous and need no sensor.
    """
    key = name.strip().lower()
    if key in CANONICAL_BANDS:
        return key
    if key in _GENERIC:
        return _GENERIC[key]
    if "_" in key:
        suffix = key.split("_", 1)[1]
        if suffix in CANONICAL_BANDS or suffix in _GENERIC:
            return canonical_band(suffix)
        key = key.split("_", 1)[0]
    if sensor is not None:
        table = SENSOR_ALIASES.get(sensor_table_key(sensor))
        if table is None:
            raise ValueError(f"unknown sensor {sensor!r}; known: {sorted(SENSOR_ALIASES)}")
        if key in table:
            return table[key]
    if key in _SENTINEL2 and (len(key) == 3 or key == "b8a"):
        return _SENTINEL2[key]
    raise ValueError(
        f"band name {name!r} is not a canonical band ({', '.join(CANONICAL_BANDS)}) "
        "and no sensor table resolves it; pass canonical names or sensor=..."
    )


def canonical_bands(names, sensor: str | None = None) -> tuple[str, ...]:
    return tuple(canonical_band(str(n), sensor) for n in names)
