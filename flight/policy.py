"""The gate's decision policy as pure functions, shared by the gate and by every scorer (ground evaluate,
bench), so "the action a cloud fraction implies" has one owner.

    policy_band(cf, policy, previous_action)        -> "low" | "mid" | "high"
    decide(cf, vf, priority, previous_action, tiles, policy) -> PolicyDecision
    TileCounts.from_mask(cloud, valid, core)        a mask the gate did not make, counted as the gate does
    TargetHistory(max_targets)                      bounded per-target memory of the last action

Nothing here reads a scene, a clock or a log: the gate measures (flight.estimate), this module decides.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from .config import PolicyConfig

Action = Literal["downlink", "discard", "reacquire", "fault"]
ACTIONS: tuple[str, ...] = get_args(Action)
# Which rule decided a frame (recorded in the decision log as "rule"):
#   threshold           the cloud fraction against downlink_max_cloud / discard_min_cloud (and, for
#                       high-priority targets, reacquire_min_cloud)
#   hysteresis          the target's previous action widened its band and that changed the action
#   min_valid_fraction  too little valid data to judge the frame
#   early_exit          the threshold rule, applied to a confidence bound after a sample of the tiles
#   deadline            the threshold rule on the tiles visited before the deadline stopped the scan
#   ambiguous_surface   the policy would have dropped the frame, but its bright pixels look like snow/ice
#                       (flight.evidence): downlinked instead, never discarded on an ambiguous call
#   fault               no decision: the frame (or the gate) faulted; see fault_code
Rule = Literal["threshold", "hysteresis", "min_valid_fraction", "early_exit", "deadline", "ambiguous_surface", "fault"]
RULES: tuple[str, ...] = get_args(Rule)
# What each band means for a priority-0 frame: low, downlink the whole frame; mid, prune cloudy tiles
# (downlink with partial=True, or discard when no tile is clear); high, discard (Φsat-1's 70 % rule).
PolicyBand = Literal["low", "mid", "high"]


def band_edges(policy: PolicyConfig, previous_action: str | None = None) -> tuple[float, float]:
    """(downlink edge, discard edge) in force: a target's previous action widens its own band by
    `policy.hysteresis`."""
    lo = policy.downlink_max_cloud + (policy.hysteresis if previous_action == "downlink" else 0.0)
    hi = policy.discard_min_cloud - (policy.hysteresis if previous_action in ("discard", "reacquire") else 0.0)
    return lo, hi


def policy_band(cloud_fraction: float, policy: PolicyConfig, previous_action: str | None = None) -> PolicyBand:
    """Policy band of a cloud fraction (0..1 of the valid pixels). A target's previous action widens its
    own band by `policy.hysteresis`; pass None for a scene without history."""
    lo, hi = band_edges(policy, previous_action)
    if cloud_fraction <= lo:
        return "low"
    if cloud_fraction >= hi:
        return "high"
    return "mid"


@dataclass(frozen=True)
class TileCounts:
    """Per-tile pixel counts of one scene, indexed row-major on the tile grid (index = row * cols + col).
    cloud/valid: valid cloud pixels / valid pixels in each tile's core; visited: the tile was inferred."""
    cloud: np.ndarray
    valid: np.ndarray
    visited: np.ndarray
    n_tiles: int
    cols: int

    @classmethod
    def uniform(cls, cloud_fraction: float, n_tiles: int = 1, cols: int = 1, pixels: int = 10000) -> "TileCounts":
        """Every tile visited, fully valid, at the same cloud fraction (tests and scorers)."""
        return cls(cloud=np.full(n_tiles, int(round(cloud_fraction * pixels)), np.int64),
                   valid=np.full(n_tiles, pixels, np.int64), visited=np.ones(n_tiles, bool), n_tiles=n_tiles, cols=cols)

    @classmethod
    def from_mask(cls, cloud: np.ndarray, valid: np.ndarray, core: int) -> "TileCounts":
        """Counts of a whole-scene (H, W) boolean cloud mask and valid mask on the gate's tile grid
        (cores of `core` pixels per side, the last row/column clipped at the scene edge), every tile
        visited: how the gate would count a mask it did not make (scorers; not used on board)."""
        h, w = cloud.shape
        rows, cols = -(-h // core), -(-w // core)

        def per_tile(a: np.ndarray) -> np.ndarray:
            padded = np.zeros((rows * core, cols * core), np.int64)
            padded[:h, :w] = a
            return padded.reshape(rows, core, cols, core).sum((1, 3)).reshape(-1)

        return cls(cloud=per_tile(cloud & valid), valid=per_tile(valid), visited=np.ones(rows * cols, bool),
                   n_tiles=rows * cols, cols=cols)


@dataclass(frozen=True)
class PolicyDecision:
    action: str                       # one of ACTIONS except "fault"
    partial: bool                     # downlink (or keep, when reacquiring) only clear_tiles
    clear_tiles: list = field(default_factory=list)   # [(row, col, cloud fraction of the tile's valid pixels)]
    band: str = "low"                 # policy band the cloud fraction fell in (with the target's hysteresis)
    rule: str = "threshold"           # threshold | hysteresis | min_valid_fraction
    reason: str = ""                  # one sentence: the comparison that decided
    thresholds: dict = field(default_factory=dict)  # thresholds in force (hysteresis applied)


def clear_tiles(tiles: TileCounts, tile_clear_max: float) -> list:
    """[(row, col, cloud fraction)] of the visited tiles with valid pixels and cloud <= tile_clear_max."""
    out = []
    for idx in range(tiles.n_tiles):                      # bounded by the tile count
        nv = tiles.valid[idx]
        if tiles.visited[idx] and nv > 0 and tiles.cloud[idx] <= tile_clear_max * nv:
            out.append((idx // tiles.cols, idx % tiles.cols, round(float(tiles.cloud[idx] / nv), 4)))
    return out


def _by_band(cf: float, vf: float, priority: int, previous_action: str | None, tiles: TileCounts,
             p: PolicyConfig) -> PolicyDecision:
    high_priority = priority >= p.reacquire_priority
    lo, hi = band_edges(p, previous_action)
    th = {"downlink_max_cloud": lo, "discard_min_cloud": hi, "min_valid_fraction": p.min_valid_fraction,
          "reacquire_priority": p.reacquire_priority, "reacquire_min_cloud": p.reacquire_min_cloud,
          "tile_clear_max": p.tile_clear_max}
    drop = "reacquire" if high_priority else "discard"
    prio = f"priority {priority} {'>=' if high_priority else '<'} reacquire_priority {p.reacquire_priority}"
    if vf < p.min_valid_fraction:
        return PolicyDecision(drop, False, [], "low", "min_valid_fraction",
                              f"valid fraction {vf:.3f} < min_valid_fraction {p.min_valid_fraction}; {prio}", th)
    band = policy_band(cf, p, previous_action)
    if band == "low":
        return PolicyDecision("downlink", False, [], band, "threshold",
                              f"cloud fraction {cf:.3f} <= downlink_max_cloud {lo:.3f}", th)
    if band == "high":
        return PolicyDecision(drop, False, [], band, "threshold",
                              f"cloud fraction {cf:.3f} >= discard_min_cloud {hi:.3f}; {prio}", th)
    # between the thresholds: prune cloudy tiles, downlink the clear ones
    clear = clear_tiles(tiles, p.tile_clear_max)
    mid = f"downlink_max_cloud {lo:.3f} < cloud fraction {cf:.3f} < discard_min_cloud {hi:.3f}"
    if high_priority and cf >= p.reacquire_min_cloud:
        return PolicyDecision("reacquire", bool(clear), clear, band, "threshold",
                              f"{mid}, >= reacquire_min_cloud {p.reacquire_min_cloud}; {prio}", th)
    if not clear:
        return PolicyDecision("discard", False, [], band, "threshold",
                              f"{mid}; no tile at or below tile_clear_max {p.tile_clear_max}", th)
    return PolicyDecision("downlink", True, clear, band, "threshold",
                          f"{mid}; {len(clear)} tile(s) at or below tile_clear_max {p.tile_clear_max}", th)


def decide(cloud_fraction: float, valid_fraction: float, priority: int, previous_action: str | None,
           tiles: TileCounts, policy: PolicyConfig) -> PolicyDecision:
    """The action for one frame. cloud_fraction: cloud pixels / valid pixels (0..1); valid_fraction:
    valid pixels / scene pixels (0..1); priority: int (>= policy.reacquire_priority re-acquires instead of
    discarding); previous_action: the same target's last action (None: no history, no hysteresis);
    tiles: per-tile counts for the partial-downlink list. rule is "hysteresis" when the previous action
    changed the outcome, else the rule that decided."""
    d = _by_band(cloud_fraction, valid_fraction, priority, previous_action, tiles, policy)
    if previous_action is None or d.rule != "threshold" or \
            policy_band(cloud_fraction, policy, previous_action) == policy_band(cloud_fraction, policy, None):
        return d
    alone = _by_band(cloud_fraction, valid_fraction, priority, None, tiles, policy)
    if (alone.action, alone.partial) == (d.action, d.partial):
        return d
    why = (f"hysteresis: target's previous action {previous_action} changed {alone.action}"
           f"{' (partial)' if alone.partial else ''} to {d.action}{' (partial)' if d.partial else ''}: {d.reason}")
    return PolicyDecision(d.action, d.partial, d.clear_tiles, d.band, "hysteresis", why, d.thresholds)


class TargetHistory:
    """Bounded per-target memory of the last action (least recently seen target forgotten first)."""

    def __init__(self, max_targets: int):
        self.max_targets = int(max_targets)
        self._last: OrderedDict[str, str] = OrderedDict()

    def previous(self, target_id: str | None) -> str | None:
        return self._last.get(target_id) if target_id is not None else None

    def record(self, target_id: str | None, action: str) -> None:
        if target_id is None:                             # hysteresis only for a named target
            return
        if len(self._last) >= self.max_targets and target_id not in self._last:
            self._last.popitem(last=False)
        self._last[target_id] = action
        self._last.move_to_end(target_id)

    def __len__(self) -> int:
        return len(self._last)

    def __bool__(self) -> bool:
        return bool(self._last)
