"""Golden self-test tiles: deterministic, real-looking scenes in integer DN (reflectance = DN * 1e-4).

The packer (flight.package) generates them once on the ground and stores them in the signed package;
the board reads the stored tiles (it never regenerates them from a seed: its self-test must not depend
on this generator's code). Without a package (an unsigned card, the checkout default), the gate
generates them here at start-up as its in-orbit reference.

Everything is integer arithmetic on numpy uint64/int64 (a splitmix64 hash, integer bilinear value
noise), so the same seed gives the same bytes on every platform and numpy version. Tiles follow the
card's input order: its bands (spectra by canonical band name, a grey default for unknown names) and,
when the card has optional bands, the presence-flag channel (DN 10000 = 1.0 when the optional bands are
present; the optional planes and the flag are 0 on the tiles that exercise their absence).

Kinds (GOLDEN_KINDS): clear land mosaic, overcast, partly cloudy with shadows, snow and water under
thin cloud, per-pixel pseudo-random noise (16 levels), and structured patterns (ramps, stripes,
checkerboard, saturation at reflectance 2.0, no-data zeros).
"""
from __future__ import annotations

import zlib

import numpy as np

DN_SCALE = 1e-4                  # reflectance = DN * DN_SCALE
GOLDEN_KINDS: tuple[str, ...] = ("clear", "overcast", "partly", "snow_water", "noise", "pattern")
_ABSENT_OPTIONAL = {"snow_water", "pattern"}   # tiles on which optional bands are absent (flag 0)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_STEP = 16

# TOA reflectance x 10000 per surface, by canonical band (flight.bands.CANONICAL_BANDS)
_BANDS = ("coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "nir09",
          "cirrus", "swir16", "swir22", "tirs1", "tirs2")
_SPECTRA = {  # surface: DN per band in _BANDS order
    "vegetation": (1200, 900, 800, 500, 1000, 2200, 2800, 3200, 3300, 3000, 100, 1800, 900, 3000, 3000),
    "soil":       (1500, 1400, 1600, 2000, 2200, 2400, 2600, 2800, 2900, 2700, 100, 3300, 2800, 3200, 3200),
    "water":      (1200, 900, 600, 300, 250, 200, 200, 150, 150, 100, 20, 100, 50, 2800, 2800),
    "cloud":      (5500, 5500, 5500, 5500, 5600, 5600, 5600, 5700, 5600, 5000, 1500, 4000, 2800, 2200, 2200),
    "snow":       (7500, 7800, 7800, 7700, 7600, 7400, 7200, 7000, 6800, 6200, 200, 1000, 600, 2400, 2400),
}


def _spectrum(surface: str, band: str) -> int:
    row = _SPECTRA[surface]
    return row[_BANDS.index(band)] if band in _BANDS else int(sum(row[1:4]) // 3)


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrap-around arithmetic is exact and platform independent)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def _uniform16(seed: int, stream: int, shape) -> np.ndarray:
    """Hash values 0..65535 (int64) for every index of shape, per (seed, stream)."""
    n = int(np.prod(shape))
    idx = np.arange(n, dtype=np.uint64) + np.uint64((seed * 1_000_003 + stream * 7919) & 0xFFFFFFFF) * np.uint64(1 << 32)
    return (_hash(idx) >> np.uint64(48)).astype(np.int64).reshape(shape)


def _value_noise(seed: int, stream: int, t: int, cells: int) -> np.ndarray:
    """Smooth noise 0..65535 (int64, t x t): a (cells+1)^2 hash grid, integer bilinear interpolation."""
    g = _uniform16(seed, stream, (cells + 1, cells + 1))
    pos = np.arange(t, dtype=np.int64) * cells
    i0, f = pos // t, pos % t                       # cell index and position in it (0..t-1)
    i1 = i0 + 1
    fy, fx = f[:, None], f[None, :]
    v00, v01 = g[i0][:, i0], g[i0][:, i1]
    v10, v11 = g[i1][:, i0], g[i1][:, i1]
    top = v00 * (t - fx) + v01 * fx
    bot = v10 * (t - fx) + v11 * fx
    return (top * (t - fy) + bot * fy) // (t * t)


def _fbm(seed: int, stream: int, t: int) -> np.ndarray:
    """Three octaves of value noise, 0..65535."""
    return (4 * _value_noise(seed, stream, t, 4) + 2 * _value_noise(seed, stream + 1, t, 9)
            + _value_noise(seed, stream + 2, t, 21)) // 7


def _ground(seed: int, t: int, bands, with_water: bool) -> np.ndarray:
    """(C, t, t) int64 DN of a vegetation / soil (/ water) mosaic with brightness texture."""
    f = _fbm(seed, 10, t)
    tex = 900 + _value_noise(seed, 20, t, 32) * 250 // 65535            # 900..1150 (/1024)
    surface = np.where(f < 30000, 0, 1)                                  # 0 vegetation, 1 soil
    if with_water:
        surface = np.where(f < 16000, 2, surface)                        # 2 water
    out = np.empty((len(bands), t, t), np.int64)
    for ci, b in enumerate(bands):
        lut = np.array([_spectrum(s, b) for s in ("vegetation", "soil", "water")], np.int64)
        out[ci] = lut[surface] * tex // 1024
    return out


def _mix(a: np.ndarray, b: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(a * (256 - alpha) + b * alpha) / 256 with alpha 0..256 (t, t)."""
    return (a * (256 - alpha) + b * alpha) >> 8


def _cloud(seed: int, t: int, bands, ground: np.ndarray, cover: int, thin: bool = False) -> np.ndarray:
    """Ground under cloud: opacity from smooth noise above a threshold set by cover (0..65535), cloud
    shadows cast one offset away."""
    f = _fbm(seed, 30, t)
    alpha = np.clip((f - (65535 - cover)) * 256 // 9000, 0, 256)
    if thin:
        alpha = alpha // 3
    shift = max(1, t // 12)
    shadow = np.zeros_like(alpha)
    shadow[shift:, shift:] = alpha[:-shift, :-shift]
    shaded = ground * (1024 - shadow * 3 // 2) // 1024                   # down to ~60 % of the ground
    cloud = np.stack([np.full((t, t), _spectrum("cloud", b), np.int64) for b in bands])
    tex = 950 + _value_noise(seed, 40, t, 40) * 100 // 65535
    return _mix(shaded, cloud * tex // 1024, alpha)


def _snow_water(seed: int, t: int, bands) -> np.ndarray:
    f = _fbm(seed, 50, t)
    surface = np.where(f < 22000, 2, np.where(f > 40000, 3, 1))          # water, soil, snow
    out = np.empty((len(bands), t, t), np.int64)
    for ci, b in enumerate(bands):
        lut = np.array([_spectrum(s, b) for s in ("vegetation", "soil", "water", "snow")], np.int64)
        out[ci] = lut[surface]
    return _cloud(seed, t, bands, out, 30000, thin=True)


def _noise(seed: int, t: int, c: int) -> np.ndarray:
    return (_uniform16(seed, 60, (c, t, t)) >> 12) * 800                  # 16 levels, 0..1.2 reflectance


def _pattern(seed: int, t: int, c: int) -> np.ndarray:
    y, x = np.mgrid[0:t, 0:t].astype(np.int64)
    out = np.empty((c, t, t), np.int64)
    for ci in range(c):
        ramp = (x * 9000 // max(t - 1, 1) + ci * 700) % 10000
        stripes = np.where(((x + y * (ci + 1)) // max(t // 16, 1)) % 2 == 0, 8000, 600)
        checker = np.where(((x // 8) + (y // 8)) % 2 == 0, 5500, 1500)
        q = np.where(y < t // 4, ramp, np.where(y < t // 2, stripes, np.where(y < 3 * t // 4, checker, 20000)))
        q[3 * t // 4:, : t // 4] = 0                                     # no-data corner (all bands zero)
        out[ci] = q
    return out


def golden_tiles(bands, optional_bands=(), tile: int = 256, seed: int = 20260101,
                 kinds=GOLDEN_KINDS) -> list[tuple[str, np.ndarray]]:
    """[(kind, uint16 DN (C, tile, tile))] in the card's input order (bands, then the presence flag
    when optional_bands is non-empty)."""
    return list(iter_golden_tiles(bands, optional_bands, tile, seed, kinds))


def iter_golden_tiles(bands, optional_bands=(), tile: int = 256, seed: int = 20260101, kinds=GOLDEN_KINDS):
    """golden_tiles, one tile at a time (one tile in memory)."""
    bands = [str(b) for b in bands]
    optional = set(optional_bands)
    for k, kind in enumerate(kinds):
        s = seed + 101 * k
        c = len(bands)
        if kind == "clear":
            dn = _ground(s, tile, bands, with_water=True)
        elif kind == "overcast":
            dn = _cloud(s, tile, bands, _ground(s, tile, bands, False), 62000)
        elif kind == "partly":
            dn = _cloud(s, tile, bands, _ground(s, tile, bands, True), 26000)
        elif kind == "snow_water":
            dn = _snow_water(s, tile, bands)
        elif kind == "noise":
            dn = _noise(s, tile, c)
        elif kind == "pattern":
            dn = _pattern(s, tile, c)
        else:
            raise ValueError(f"unknown golden tile kind {kind!r}; known: {GOLDEN_KINDS}")
        if kind not in ("noise", "pattern"):
            dn = dn // _STEP * _STEP                  # 0.0016 reflectance steps (finer than INT8 input steps)
        dn = np.clip(dn, 0, 65535).astype(np.uint16)
        if optional:
            present = kind not in _ABSENT_OPTIONAL
            for ci, b in enumerate(bands):
                if b in optional and not present:
                    dn[ci] = 0
            flag = np.full((1, tile, tile), 10000 if present else 0, np.uint16)
            dn = np.concatenate([dn, flag])
        yield kind, np.ascontiguousarray(dn)


def encode_tile(dn: np.ndarray) -> bytes:
    """uint16 (C, T, T) -> zlib of the row-wise differences (int16, little endian): what the package stores."""
    d = np.diff(dn.astype(np.int32), axis=-1, prepend=0).astype("<i2")
    return zlib.compress(d.tobytes(), 9)


def decode_tile(blob: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """encode_tile's inverse; bounded (never inflates past the expected size). ValueError when corrupt."""
    want = 2 * int(np.prod(shape))
    z = zlib.decompressobj()
    try:
        raw = z.decompress(blob, want + 1)
    except zlib.error as e:
        raise ValueError(f"golden tile does not decompress: {e}") from None
    if len(raw) != want or not z.eof or z.unconsumed_tail:
        raise ValueError(f"golden tile inflates to {len(raw)}{'+' if not z.eof else ''} bytes, expected {want}")
    d = np.frombuffer(raw, "<i2").reshape(shape).astype(np.int32)
    return np.cumsum(d, axis=-1).astype(np.uint16)
