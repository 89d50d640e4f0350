"""Scene-level cloud and valid fractions from a sample of tiles, with finite-population bounds.

The gate visits tiles in a spread order and feeds each tile's core counts here; after n of N tiles the
estimator bounds the scene's cloud fraction (cloud / valid pixels) and its valid share, so the policy can
stop early once both ends of the bound fall in the same policy band. Per-tile values are in core-area
units (pixels / full core area), so every value lies in [0, 1]. Pure arithmetic on floats: no arrays,
no allocation beyond Python floats.

Bounds (two-sided confidence c, each of the two means gets delta = (1 - c) / 2):
  normal     Cochran's finite-population normal bound with a floor on the tile-level standard deviation
             (guards the all-identical-so-far case); tight, validated empirically.
  bernstein  Bardenet & Maillard (2015) empirical Bernstein-Serfling bound; distribution-free but needs
             ~100+ tiles before it can certify anything.
"""
from __future__ import annotations

import math
from statistics import NormalDist

_KAPPA = 7.0 / 3.0 + 3.0 / math.sqrt(2.0)  # Bardenet & Maillard (2015) empirical Bernstein-Serfling


class FractionEstimator:
    """Running sums over the visited tiles of one scene; reset() per scene."""

    def __init__(self, method: str, confidence: float, sd_floor: float):
        self.method = method
        self.sd_floor = sd_floor
        self.delta = (1.0 - confidence) / 2.0
        self.z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 4.0)  # two bounds share delta
        self.reset(1, 1, 1)

    def reset(self, n_tiles: int, core_area: int, scene_area: int) -> None:
        """n_tiles: tiles in the scene (N); core_area: pixels of a full tile core; scene_area: H * W."""
        self.n_tiles, self.core_area, self.scene_area = n_tiles, core_area, scene_area
        self.n = 0
        self.s_cloud = self.ss_cloud = self.s_valid = self.ss_valid = 0.0

    def add(self, cloud_px: int, valid_px: int) -> None:
        """One visited tile: valid cloud pixels and valid pixels in its core."""
        xc, xv = cloud_px / self.core_area, valid_px / self.core_area
        self.s_cloud += xc
        self.ss_cloud += xc * xc
        self.s_valid += xv
        self.ss_valid += xv * xv
        self.n += 1

    def half_width(self, s_x: float, ss_x: float) -> float:
        """Half-width of a (1 - delta) finite-population bound on the mean of n of N values in [0, 1]."""
        n, N = self.n, self.n_tiles
        if n >= N:
            return 0.0
        mean = s_x / n
        var = max(ss_x / n - mean * mean, 0.0)
        if self.method == "normal":
            sd = max(math.sqrt(var * n / max(n - 1, 1)), self.sd_floor)
            return self.z * sd / math.sqrt(n) * math.sqrt(1.0 - n / N)
        rho = (1.0 - (n - 1) / N) if n <= N / 2 else (1.0 - n / N) * (1.0 + 1.0 / n)
        lg = math.log(5.0 / self.delta)
        return math.sqrt(var) * math.sqrt(2.0 * rho * lg / n) + _KAPPA * lg / n

    def bounds(self) -> tuple[float, float, float]:
        """(cloud fraction low, cloud fraction high, valid fraction low) after the tiles added so far;
        each half-width computed once. Cloud fraction = mean cloud per tile / mean valid per tile."""
        n = self.n
        ec, ev = self.half_width(self.s_cloud, self.ss_cloud), self.half_width(self.s_valid, self.ss_valid)
        mc, mv = self.s_cloud / n, self.s_valid / n
        v_lo, v_hi = max(mv - ev, 1e-12), min(mv + ev, 1.0)
        c_lo, c_hi = max(mc - ec, 0.0), min(mc + ec, v_hi)
        valid_lo = max(mv - ev, 0.0) * self.n_tiles * self.core_area / self.scene_area
        return min(c_lo / v_hi, 1.0), min(c_hi / v_lo, 1.0), valid_lo
