"""Evidence a discard must have: never discard what the model cannot tell apart from cloud.

Discarding a clear frame destroys the data the gate exists to save; downlinking an overcast one costs
bandwidth. Bright clear snow and ice look like cloud decks in VNIR to a small model (and to its teachers);
what still separates them is a small band ratio. Over bright pixels (blue TOA reflectance > 0.3) of the
shared Landsat-8 scenes, clear snow/ice has green/blue 0.855 (median) while every cloud deck has 0.906-1.15:
a surface seen through the whole atmosphere carries its Rayleigh path radiance (blue-heavy), a cloud top
high in it carries less. So before a discard (or a re-acquisition, which also drops the frame) the gate
looks at a bounded, fixed sample of the scene (at most SAMPLE x SAMPLE pixels on a regular grid, buffers
allocated once) and, when enough of it is bright and its median green/blue is at or below
`policy.discard_guard_green_blue`, downlinks the frame instead, with the rule "ambiguous_surface" and an
`ambiguous_bright_surface` event: a planner sees why, and the data is kept. The threshold is chosen by
cross-validation over acquisitions (ground/cv.py, docs/results/cv.md); 0 disables the guard.

Saturation erases the same cue: where blue and green both sit at their sample maximum (the detector's
ceiling: 8-bit sensors over snow, e.g. Landsat-7 over the Himalaya) the ratio is the ratio of the
saturation levels, not of the surface. When at least `SATURATED_SHARE` of the bright sampled pixels are
saturated in both bands, the frame is not dropped either (same rule and event, the reason says which).

Limits, stated: Level-2A (atmospherically corrected) products remove the Rayleigh term, so the ratio is
not a snow cue there; the guard then does not fire and the model's call stands. Cloud decks that saturate
a detector are downlinked too: bandwidth spent, never a clear frame lost.
"""
from __future__ import annotations

import numpy as np

SAMPLE = 64                  # the sample grid is at most SAMPLE x SAMPLE pixels, whatever the scene size
BRIGHT_BLUE = 0.30           # TOA reflectance above which a pixel is "bright" (snow, ice, cloud)
SATURATED_SHARE = 0.25       # bright pixels at the blue and green ceiling at once: the ratio is unreadable


class BrightSurfaceProbe:
    """Median green/blue of the bright pixels of a strided sample of one scene. The sample buffers are
    allocated at construction; `measure` allocates only small temporaries bounded by the sample (~35 KB per
    call, freed on return), and runs only for frames the policy would drop."""

    def __init__(self, sample: int = SAMPLE):
        self.sample = int(sample)
        shape = (self.sample, self.sample)
        self._blue = np.empty(shape, np.float32)
        self._green = np.empty(shape, np.float32)
        self._bright = np.empty(shape, bool)
        self._tmp = np.empty(shape, bool)
        self._tmp2 = np.empty(shape, bool)
        self._ratio = np.empty(self.sample * self.sample, np.float32)

    def measure(self, scene: np.ndarray, blue: int, green: int, scale: float, offset: float,
                valid_mask: np.ndarray | None = None, release=None) -> tuple[float, float, float]:
        """-> (bright share of the valid sampled pixels (0..1), median green/blue over them (NaN when
        none), share of the bright ones at the sample's blue and green maximum at once (saturated)).

        scene: (H, W, C) array as passed to the gate; blue, green: channel indices; scale, offset: the
        frame's radiometry (reflectance = value * scale + offset); valid_mask: (H, W) bool or None;
        release: None or release(scene, y0, y1), called after each sampled row is read (a memmap's pages are
        dropped row by row, so the probe's peak memory stays one row, not the sampled rows' whole span)."""
        h, w = scene.shape[:2]
        sy, sx = -(-h // self.sample), -(-w // self.sample)
        ny, nx = -(-h // sy), -(-w // sx)
        b, g = self._blue[:ny, :nx], self._green[:ny, :nx]
        for i in range(ny):                      # bounded: at most SAMPLE rows
            y = i * sy
            np.multiply(scene[y, ::sx, blue], scale, out=b[i], casting="unsafe")
            np.multiply(scene[y, ::sx, green], scale, out=g[i], casting="unsafe")
            if release is not None:
                release(scene, y, y + 1)
        b += offset
        g += offset
        bright, tmp = self._bright[:ny, :nx], self._tmp[:ny, :nx]
        np.isfinite(g, out=tmp)
        np.greater(b, BRIGHT_BLUE, out=bright)          # NaN compares False: invalid pixels are never bright
        bright &= tmp
        if valid_mask is not None:            # bool or 0/1 integers, as the gate accepts it
            vm = valid_mask[::sy, ::sx]
            np.logical_and(bright, vm, out=bright)
            np.logical_and(tmp, vm, out=tmp)
        np.isfinite(b, out=self._tmp2[:ny, :nx])
        tmp &= self._tmp2[:ny, :nx]               # valid: finite in both bands (and in the caller's mask)
        n_valid = int(np.count_nonzero(tmp))
        n = int(np.count_nonzero(bright))
        if n == 0 or n_valid == 0:
            return 0.0, float("nan"), 0.0
        bb, gg = b[bright], g[bright]
        bmax, gmax = bb.max(), gg.max()
        # a ceiling is a maximum that many pixels share while others lie below it (a perfectly flat frame
        # says nothing about saturation)
        ceiling = n >= 16 and bb.min() < bmax and gg.min() < gmax
        sat = float(np.count_nonzero((bb >= bmax) & (gg >= gmax))) / n if ceiling else 0.0
        r = self._ratio[:n]
        np.divide(gg, bb, out=r)
        return n / n_valid, float(np.median(r)), sat


def review_discard(action: str, rule: str, share: float, green_blue: float, threshold: float,
                   min_share: float, saturated: float = 0.0) -> tuple[bool, str]:
    """Pure rule: should a frame the policy would drop (discard / reacquire by threshold or hysteresis) be
    downlinked because its bright pixels look like snow/ice rather than cloud, or are saturated so that
    nothing tells them apart? share, green_blue, saturated: BrightSurfaceProbe.measure's results;
    threshold, min_share: policy.discard_guard_green_blue / discard_guard_min_bright. -> (override, reason)"""
    if action not in ("discard", "reacquire") or rule not in ("threshold", "hysteresis") or threshold <= 0:
        return False, ""
    if share < min_share or not np.isfinite(green_blue):
        return False, ""
    if saturated >= SATURATED_SHARE:
        return True, (f"{saturated:.0%} of the bright pixels ({share:.0%} of the sample) are saturated in blue and "
                      f"green: their band ratio is unreadable, so snow/ice cannot be told from cloud")
    if green_blue > threshold:
        return False, ""
    return True, (f"bright pixels ({share:.0%} of the sample) have median green/blue {green_blue:.3f} <= "
                  f"discard_guard_green_blue {threshold:.3f}: snow/ice-like, the model's cloud call is not trusted "
                  f"enough to drop the frame")


def guard_decision(pd, probe: BrightSurfaceProbe, scene: np.ndarray, blue: int | None, green: int | None,
                   radiometry: tuple[float, float], valid_mask, policy, release=None):
    """The discard guard on one policy decision, for the gate and for every scorer that applies the gate's
    policy to a mask: pd (flight.policy.PolicyDecision) is returned unchanged unless it drops the frame and
    the probe finds its bright pixels snow/ice-like or saturated; then a downlink with rule
    "ambiguous_surface". blue, green: the scene's channel indices (None: the bands are absent, no guard);
    radiometry: (scale, offset); policy: flight.config.PolicyConfig; release: as for measure.
    -> (decision, [degraded events])"""
    from .logschema import event
    from .policy import PolicyDecision

    if pd.action not in ("discard", "reacquire") or policy.discard_guard_green_blue <= 0 or blue is None or green is None:
        return pd, []
    share, gb, sat = probe.measure(scene, blue, green, *radiometry, valid_mask, release=release)
    override, why = review_discard(pd.action, pd.rule, share, gb, policy.discard_guard_green_blue,
                                   policy.discard_guard_min_bright, sat)
    if not override:
        return pd, []
    return (PolicyDecision("downlink", False, [], pd.band, "ambiguous_surface", f"{why} (policy: {pd.reason})",
                           pd.thresholds), [event("ambiguous_bright_surface", why)])
