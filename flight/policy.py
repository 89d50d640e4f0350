"""The gate's policy bands as a pure function, shared by the gate and by every scorer (ground evaluate,
bench), so "the action a cloud fraction implies" has one owner."""
from __future__ import annotations

from typing import Literal

from .config import PolicyConfig

Band = Literal["low", "mid", "high"]
# What each band means for a priority-0 frame: downlink the whole frame, prune cloudy tiles (partial
# downlink, or discard when no tile is clear), discard (Φsat-1's 70 % rule).
BAND_ACTION = {"low": "downlink", "mid": "partial", "high": "discard"}


def policy_band(cloud_fraction: float, policy: PolicyConfig, previous_action: str | None = None) -> Band:
    """Policy band of a cloud fraction (0..1 of the valid pixels). A target's previous action widens its
    own band by `policy.hysteresis`; pass None for a scene without history."""
    lo = policy.downlink_max_cloud + (policy.hysteresis if previous_action == "downlink" else 0.0)
    hi = policy.discard_min_cloud - (policy.hysteresis if previous_action in ("discard", "reacquire") else 0.0)
    if cloud_fraction <= lo:
        return "low"
    if cloud_fraction >= hi:
        return "high"
    return "mid"


def implied_action(cloud_fraction: float, policy: PolicyConfig | None = None) -> str:
    """Scene-level action class a cloud fraction implies for a priority-0 frame without history:
    'downlink', 'partial' or 'discard' (used to score any mask, labels included, on one scale)."""
    return BAND_ACTION[policy_band(cloud_fraction, policy or PolicyConfig())]
