"""Classic spectral-threshold cloud test (the 'thresholding' baseline of the On Cloud N challenge).

First-pass potential-cloud-pixel rules of Fmask (Zhu & Woodcock 2012, RSE 118) without the thermal
band, on TOA reflectance:
  bright    mean(blue, green, red) > 0.20
  white     sum(|b - mean_vis|) / mean_vis < 0.7 over blue/green/red
  HOT       blue - 0.5 * red - 0.08 > 0          (haze-optimised transform)
  NDVI      (nir - red) / (nir + red) < 0.8
  with SWIR (when present): swir22 > 0.03 and NDSI = (green - swir16)/(green + swir16) < 0.8 (snow)
"""
from __future__ import annotations

import numpy as np


def threshold_mask(refl: np.ndarray, bands) -> np.ndarray:
    bands = list(bands)
    g = {b: refl[..., bands.index(b)].astype(np.float32) for b in bands}
    vis = (g["blue"] + g["green"] + g["red"]) / 3
    white = (np.abs(g["blue"] - vis) + np.abs(g["green"] - vis) + np.abs(g["red"] - vis)) / np.maximum(vis, 1e-6)
    hot = g["blue"] - 0.5 * g["red"] - 0.08
    ndvi = (g["nir"] - g["red"]) / np.maximum(g["nir"] + g["red"], 1e-6)
    cloud = (vis > 0.20) & (white < 0.7) & (hot > 0) & (ndvi < 0.8)
    if "swir16" in g and "swir22" in g:
        ndsi = (g["green"] - g["swir16"]) / np.maximum(g["green"] + g["swir16"], 1e-6)
        cloud &= (g["swir22"] > 0.03) & (ndsi < 0.8)
    return cloud.astype(np.uint8)
