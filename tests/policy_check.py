"""Test helper: a non-fault Decision must be the action the public policy gives its own numbers."""
from __future__ import annotations

from flight.policy import policy_band


def assert_policy_consistent(d, policy, previous_action=None) -> None:
    """d.action and d.partial follow from d.cloud_fraction / d.valid_fraction / d.priority by the policy
    (flight.policy), with the rule the decision names."""
    assert d.action != "fault", (d.fault_code, d.fault)
    high = d.priority >= policy.reacquire_priority
    drop = "reacquire" if high else "discard"
    if d.valid_fraction < policy.min_valid_fraction:
        assert (d.action, d.partial, d.rule) == (drop, False, "min_valid_fraction"), d
        return
    if d.rule == "ambiguous_surface":    # the policy dropped it; the discard guard (flight.evidence) kept it
        assert (d.action, d.partial) == ("downlink", False), d
        assert policy_band(d.cloud_fraction, policy, previous_action) != "low", d
        assert [e["code"] for e in d.degraded if e["code"] == "ambiguous_bright_surface"], d
        return
    assert d.rule in ("threshold", "early_exit", "deadline", "hysteresis"), d.rule
    band = policy_band(d.cloud_fraction, policy, previous_action)
    if band == "low":
        assert (d.action, d.partial) == ("downlink", False), d
    elif band == "high":
        assert (d.action, d.partial) == (drop, False), d
    elif high and d.cloud_fraction >= policy.reacquire_min_cloud:
        assert d.action == "reacquire" and d.partial == bool(d.clear_tiles), d
    else:
        assert (d.action, d.partial) == (("downlink", True) if d.clear_tiles else ("discard", False)), d
    lo, hi = d.confidence_bound
    assert lo - 1e-9 <= d.cloud_fraction <= hi + 1e-9
