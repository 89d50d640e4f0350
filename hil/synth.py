"""Deterministic procedural generator of labelled 6-band TOA-reflectance scenes (numpy only).

One place for HIL streams, bench, the tests and ground's training supplement: importing it pulls in
neither torch nor ground/ (ground imports it, never the other way round).

Layers (all physically motivated, all exact labels):
  background  procedural land cover from 1/f noise with end-member spectra (vegetation, soil, sand,
              water, turbid water, bright urban, snow/ice), or a real clear background tile;
  haze        thin, low-frequency alpha blend towards a bluish path radiance (labelled clear);
  cloud       fBm optical thickness tau -> alpha = 1 - exp(-tau); thick (water) clouds are bright in
              VNIR and darker in SWIR; cirrus is streaky, semi-transparent, dark in SWIR;
  shadow      the cloud alpha displaced along the sun azimuth by height * tan(zenith), darkening the
              ground by the blocked direct-sun fraction;
  confusers   snow/ice (bright VNIR, dark SWIR), bright urban, turbid water, sun glint on water.
A pixel is labelled cloud where cloud alpha >= CLOUD_ALPHA, shadow where the displaced alpha >=
SHADOW_ALPHA and it is not cloud. Band order: SYNTH_BANDS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SYNTH_BANDS = ("blue", "green", "red", "nir", "swir16", "swir22")
CLOUD_ALPHA = 0.25
SHADOW_ALPHA = 0.35

# Surface reflectance end members (blue, green, red, nir, swir16, swir22); typical library values.
ENDMEMBERS = {
    "vegetation": (0.04, 0.07, 0.04, 0.38, 0.18, 0.08),
    "crop": (0.06, 0.10, 0.08, 0.30, 0.24, 0.14),
    "soil": (0.10, 0.14, 0.19, 0.26, 0.34, 0.29),
    "sand": (0.22, 0.30, 0.38, 0.45, 0.55, 0.46),
    "water": (0.05, 0.05, 0.03, 0.015, 0.006, 0.004),
    "turbid_water": (0.09, 0.11, 0.10, 0.05, 0.015, 0.008),
    "urban": (0.20, 0.21, 0.23, 0.28, 0.31, 0.27),
    "snow": (0.88, 0.86, 0.83, 0.74, 0.09, 0.05),
}
RAYLEIGH_PATH = np.array([0.06, 0.035, 0.02, 0.008, 0.002, 0.001], np.float32)  # L1C path radiance, TOA
# water-cloud TOA shape relative to red, from the cores of real labelled L1C clouds (S2/L5 tiles:
# NIR 1.12-1.21, SWIR16 0.86-0.95, SWIR22 0.66-0.74)
THICK_CLOUD_SHAPE = np.array([1.0, 1.0, 1.0, 1.05, 0.9, 0.7], np.float32)
CIRRUS_SHAPE = np.array([1.0, 1.0, 1.0, 1.0, 0.45, 0.28], np.float32)

# 8-bit sensors (Landsat-4/5 TM, -7 ETM+ high gain) saturate over bright cloud, blue first (TM band 1
# near 0.4 TOA reflectance): clouds then lose their flat spectrum. Emulated on a share of scenes.
SATURATION_P = 0.25
SATURATION_RANGES = ((0.3, 0.5), (0.45, 0.9), (0.5, 0.85), (0.6, 0.95), (0.45, 0.75), (0.5, 0.85))


def saturation_levels(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(lo, hi) for lo, hi in SATURATION_RANGES], np.float32)


SCENE_KINDS = ("clear", "partly", "overcast", "snow", "haze", "urban", "water", "cirrus", "broken", "popcorn")


def fractal_noise(rng: np.random.Generator, h: int, w: int, beta: float = 3.0, anisotropy: float = 1.0,
                  angle: float = 0.0, f_min: float = 0.0) -> np.ndarray:
    """1/f^beta noise, standardised to zero mean and unit variance. anisotropy > 1 stretches features
    along `angle` (streaky cirrus); f_min (cycles/pixel) removes features larger than ~1/f_min pixels
    (fields of small cumulus)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    u, v = fx * c + fy * s, (-fx * s + fy * c) * anisotropy
    f = np.sqrt(u * u + v * v)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))) * f ** (-beta / 2)
    spec[0, 0] = 0
    if f_min > 0:
        spec = spec * (1.0 / (1.0 + (f_min / f) ** 4))   # smooth high-pass
    n = np.fft.irfft2(spec, s=(h, w))
    return ((n - n.mean()) / (n.std() + 1e-9)).astype(np.float32)


def _cover_alpha(noise: np.ndarray, cover: float, sharpness: float) -> np.ndarray:
    """alpha in [0,1] covering ~`cover` of the pixels above CLOUD_ALPHA."""
    if cover <= 0:
        return np.zeros_like(noise)
    if cover >= 1:
        thr = noise.min() - 1.0
    else:
        thr = np.quantile(noise, 1 - cover)
    tau = np.clip(noise - thr, 0, None) * sharpness
    # shift so that the cover boundary sits at alpha == CLOUD_ALPHA
    tau = np.where(noise >= thr, tau - np.log(1 - CLOUD_ALPHA), tau)
    return (1 - np.exp(-tau)).astype(np.float32)


def cumulus_field(rng: np.random.Generator, h: int, w: int, cover: float, r_min: float, r_max: float) -> np.ndarray:
    """Optical thickness of a field of discrete cumulus cells (popcorn clouds): domes of random radius
    with noisy edges, placed until ~`cover` of the scene is cloudy. Returns tau >= 0."""
    tau = np.zeros((h, w), np.float32)
    rough = np.clip(1 + 0.35 * fractal_noise(rng, h, w, beta=2.0), 0.5, None)   # >= 0.5 keeps domes in their window
    target = cover * h * w
    for _ in range(4000):                      # bounded; stops once the cover is reached
        if np.count_nonzero(tau > 0.3) >= target:
            break
        r = rng.uniform(r_min, r_max)
        cy, cx = rng.uniform(-r, h + r), rng.uniform(-r, w + r)
        r_win = r * 1.42
        y0, y1 = int(max(cy - r_win, 0)), int(min(cy + r_win + 1, h))
        x0, x1 = int(max(cx - r_win, 0)), int(min(cx + r_win + 1, w))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)
        dome = np.clip(1 - d2 * rough[y0:y1, x0:x1], 0, None) * rng.uniform(2, 8)
        np.maximum(tau[y0:y1, x0:x1], dome, out=tau[y0:y1, x0:x1])
    return tau


def landcover(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """Procedural clear-sky surface reflectance (h, w, 6)."""
    names = ["vegetation", "crop", "soil", "water"]
    weights = [0.35, 0.25, 0.2, 0.2]
    if kind == "snow":
        names, weights = ["snow", "vegetation", "soil", "water"], [0.55, 0.2, 0.15, 0.1]
    elif kind == "urban":
        names, weights = ["urban", "soil", "vegetation", "sand"], [0.5, 0.2, 0.2, 0.1]
    elif kind == "water":
        names, weights = ["water", "turbid_water", "vegetation", "sand"], [0.45, 0.3, 0.15, 0.1]
    elif rng.random() < 0.3:
        names, weights = ["sand", "soil", "crop", "urban"], [0.35, 0.35, 0.2, 0.1]
    weights = np.array(weights) * rng.uniform(0.5, 1.5, len(weights))
    weights /= weights.sum()
    field = fractal_noise(rng, h, w, beta=rng.uniform(2.0, 3.5))
    edges = np.quantile(field, np.cumsum(weights)[:-1])
    cls = np.digitize(field, edges)
    spectra = np.array([ENDMEMBERS[n] for n in names], np.float32)
    surf = spectra[cls]
    texture = 1 + 0.15 * fractal_noise(rng, h, w, beta=1.5)[..., None]
    surf = surf * texture
    water_like = np.isin(np.array(names)[cls], ["water", "turbid_water"])
    if water_like.any() and rng.random() < 0.35:  # sun glint: bright, nearly spectrally flat, on water only
        glint = np.clip(fractal_noise(rng, h, w, beta=2.0) - 0.5, 0, None) * rng.uniform(0.1, 0.3)
        surf += (glint * water_like)[..., None] * np.array([1, 1, 1, 0.95, 0.8, 0.7], np.float32)
    return surf


@dataclass
class SynthScene:
    reflectance: np.ndarray  # (H, W, 6) float32 TOA, band order SYNTH_BANDS
    mask: np.ndarray         # (H, W) uint8 0 clear / 1 cloud / 2 shadow
    kind: str
    seed: int


def make_scene(seed: int, size: int = 256, kind: str | None = None, background: np.ndarray | None = None) -> SynthScene:
    """One deterministic labelled scene. `background` (H, W, 6 surface/TOA reflectance) replaces the
    procedural land cover when given (real clear tiles)."""
    rng = np.random.default_rng(seed)
    kind = kind or SCENE_KINDS[rng.integers(len(SCENE_KINDS))]
    h = w = size
    if background is not None:
        surf = background.astype(np.float32)
        toa = surf  # real L1C backgrounds already include the path radiance
    else:
        surf = landcover(rng, h, w, kind)
        toa = surf + RAYLEIGH_PATH
    cover = {"clear": 0.0, "snow": rng.uniform(0, 0.4), "haze": rng.uniform(0, 0.15), "urban": rng.uniform(0, 0.5),
             "water": rng.uniform(0, 0.5), "partly": rng.uniform(0.1, 0.6), "overcast": rng.uniform(0.85, 1.0),
             "cirrus": 0.0, "broken": rng.uniform(0.3, 0.8), "popcorn": rng.uniform(0.08, 0.45)}[kind]
    beta = rng.uniform(3.0, 4.0)
    # cloud-field scale: fields of small cumulus (popcorn) are common and hard; broken fields medium
    f_min = {"popcorn": rng.uniform(1 / 40, 1 / 12), "broken": rng.uniform(1 / 80, 1 / 30)}.get(
        kind, rng.choice([0.0, 0.0, 1 / 64, 1 / 32]))
    if kind in ("popcorn", "broken") or (kind == "partly" and rng.random() < 0.4):
        r_lo = rng.uniform(2, 6) if kind == "popcorn" else rng.uniform(5, 15)
        alpha = (1 - np.exp(-cumulus_field(rng, h, w, cover, r_lo, r_lo * rng.uniform(1.5, 4)))).astype(np.float32)
    else:
        alpha = _cover_alpha(fractal_noise(rng, h, w, beta=beta, f_min=f_min), cover, sharpness=rng.uniform(2.0, 8.0))
    # cloud-top TOA reflectance: small cumulus ~0.4, thick stratocumulus up to ~0.85
    cloud_refl = rng.uniform(0.4, 0.85) * (1 + 0.12 * fractal_noise(rng, h, w, beta=2.5))
    # TOA cloud spectra vary: NIR/VIS from ~0.95 (thick, high) to ~1.3 (thin or low cloud over
    # vegetation, as seen in real L1C scenes), a little extra blue from Rayleigh above the cloud
    shape = THICK_CLOUD_SHAPE * np.array([rng.uniform(0.97, 1.06), 1.0, 1.0, rng.uniform(0.95, 1.25),
                                          rng.uniform(0.88, 1.08), rng.uniform(0.88, 1.08)], np.float32)
    cloud_spec = cloud_refl[..., None] * shape
    if kind == "cirrus" or rng.random() < 0.15:
        c_cover = rng.uniform(0.2, 0.9) if kind == "cirrus" else rng.uniform(0.05, 0.4)
        streaks = fractal_noise(rng, h, w, beta=3.0, anisotropy=rng.uniform(4, 10), angle=rng.uniform(0, np.pi))
        c_alpha = _cover_alpha(streaks, c_cover, sharpness=rng.uniform(0.3, 1.0)) * rng.uniform(0.5, 0.9)
        c_spec = rng.uniform(0.3, 0.5) * CIRRUS_SHAPE
        # composite: cirrus above the water cloud
        cloud_spec = (cloud_spec * alpha[..., None] * (1 - c_alpha[..., None]) + c_spec * c_alpha[..., None])
        alpha = 1 - (1 - alpha) * (1 - c_alpha)
        cloud_spec = cloud_spec / np.maximum(alpha[..., None], 1e-6)
    # shadow: cloud alpha displaced by cloud height * tan(sun zenith) along the sun azimuth
    zen, az = np.deg2rad(rng.uniform(20, 65)), rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(8, 40) * np.tan(zen)
    dy, dx = int(round(shift * np.cos(az))), int(round(shift * np.sin(az)))
    s_alpha = np.roll(alpha, (dy, dx), axis=(0, 1))
    direct = rng.uniform(0.6, 0.85)  # share of ground irradiance that is direct sun
    shade = 1 - direct * s_alpha
    ground = toa - RAYLEIGH_PATH * (background is None)
    toa = ground * shade[..., None] + RAYLEIGH_PATH * (background is None)
    if kind == "haze" or rng.random() < 0.2:
        h_alpha = rng.uniform(0.04, 0.18) * (0.6 + 0.4 * (fractal_noise(rng, h, w, beta=4.0) > 0))
        h_alpha = np.minimum(h_alpha, CLOUD_ALPHA * 0.8)
        haze_spec = np.array([0.30, 0.28, 0.26, 0.22, 0.12, 0.08], np.float32)
        toa = toa * (1 - h_alpha[..., None]) + haze_spec * h_alpha[..., None]
    toa = toa * (1 - alpha[..., None]) + cloud_spec * alpha[..., None]
    toa = toa + rng.normal(0, 0.003, toa.shape).astype(np.float32)
    if rng.random() < SATURATION_P:
        toa = np.minimum(toa, saturation_levels(rng))
    mask = np.zeros((h, w), np.uint8)
    mask[(s_alpha >= SHADOW_ALPHA)] = 2
    mask[alpha >= CLOUD_ALPHA] = 1
    return SynthScene(np.clip(toa, 0, 1.6).astype(np.float32), mask, kind, seed)


def make_set(n: int, seed: int = 0, size: int = 256, backgrounds: list[np.ndarray] | None = None,
             real_background_share: float = 0.25) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n scenes -> (N, H, W, 6) float32 reflectance, (N, H, W) uint8 masks, kinds. Deterministic in seed."""
    X = np.empty((n, size, size, len(SYNTH_BANDS)), np.float32)
    Y = np.empty((n, size, size), np.uint8)
    kinds = []
    for i in range(n):
        s = seed * 1_000_003 + i
        rng = np.random.default_rng(s + 17)
        bg = None
        if backgrounds and rng.random() < real_background_share:
            bg = real_background_tile(rng, backgrounds[rng.integers(len(backgrounds))], size)
        sc = make_scene(s, size, background=bg)
        X[i], Y[i] = sc.reflectance, sc.mask
        kinds.append(sc.kind)
    return X, Y, kinds


def real_background_tile(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    """A size² crop of a real clear scene; small scenes are mirror-tiled (symmetric padding)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="symmetric")
        h, w = img.shape[:2]
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    tile = img[y:y + size, x:x + size]
    if rng.random() < 0.5:
        tile = tile[::-1]
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    return np.ascontiguousarray(tile)
