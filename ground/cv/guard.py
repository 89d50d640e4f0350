"""The discard guard's operating point under cross-validation: the action a scored scene gets at a
green/blue threshold, the threshold the pre-declared rule picks on training folds, and its sweep."""
from __future__ import annotations

from pathlib import Path





def action_at(row: dict, threshold: float) -> str:
    """The gate's action on a scored scene had policy.discard_guard_green_blue been `threshold` (the same
    pure rule, flight.evidence.review_discard, on the recorded probe)."""
    from flight.config import PolicyConfig
    from flight.evidence import review_discard

    dropped = row["action"] in ("discard", "reacquire") or row.get("rule") == "ambiguous_surface"
    if not dropped or row.get("rule") == "min_valid_fraction":   # the gate guards cloud calls only
        return row["action"]
    pre = "discard" if row.get("rule") == "ambiguous_surface" else row["action"]
    pr = row.get("probe")
    if pr is None:
        return pre
    p = PolicyConfig()
    return "downlink" if review_discard(pre, "threshold", pr[0], pr[1], threshold, p.discard_guard_min_bright, pr[2])[0] else pre


GUARD_GRID = tuple(round(0.80 + 0.01 * i, 2) for i in range(21))


def dropped_before_guard(row: dict) -> bool:
    return row["action"] in ("discard", "reacquire") or row.get("rule") == "ambiguous_surface"


def choose_guard(rows: dict[str, dict]) -> float:
    """The operating point, a rule fixed before any fold was scored: the largest green/blue threshold on
    GUARD_GRID at which the guard keeps none of the given (training-fold) scenes that the model rightly
    drops (label cloud fraction >= discard_min_cloud): maximal protection of bright clear frames at no
    measured bandwidth cost on the scenes the threshold is chosen on."""
    from flight.config import PolicyConfig

    from flight.evidence import SATURATED_SHARE

    hi = PolicyConfig().discard_min_cloud
    # a saturated deck is kept at every threshold (its ratio is unreadable): it cannot inform the choice
    decks = [r for r in rows.values() if "fault" not in r and r["cloud_fraction_ref"] >= hi and dropped_before_guard(r)
             and not (r.get("probe") and r["probe"][2] >= SATURATED_SHARE)]
    ok = [t for t in GUARD_GRID if all(action_at(r, t) != "downlink" for r in decks)]
    return max(ok) if ok else 0.0



def apply_guard_by_fold(rows: dict[str, dict], folds: list[list[str]]) -> dict[int, float]:
    """In place: each scene's action under the guard threshold chosen (choose_guard) on the other folds'
    scenes of the same contender and seed. Returns {fold: threshold}."""
    chosen = {k: choose_guard({s: r for s, r in rows.items() if s not in f}) for k, f in enumerate(folds)}
    for k, f in enumerate(folds):   # every threshold is chosen on the unchanged rows first
        t = chosen[k]
        for s in f:
            if s in rows and "fault" not in rows[s]:
                rows[s]["action"] = action_at(rows[s], t)
                rows[s]["guard_threshold"] = t
    return chosen


def guard_curve(per_contender_rows: dict[str, list[dict[str, dict]]], path: Path) -> list[str]:
    """Clear scenes discarded vs overcast scenes downlinked as the guard threshold sweeps GUARD_GRID (every
    scene, every seed), one line per contender; PNG beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluate import CLEAR_MAX, OVERCAST_MIN

    lines = ["| contender | " + " | ".join(f"{t:.2f}" for t in GUARD_GRID[::2]) + " |",
             "|---|" + "---|" * len(GUARD_GRID[::2])]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, seeds in per_contender_rows.items():
        clear, over = [], []
        for t in GUARD_GRID:
            c = o = 0
            for rows in seeds:
                for r in rows.values():
                    if "fault" in r:
                        continue
                    a = action_at(r, t)
                    c += r["cloud_fraction_ref"] <= CLEAR_MAX and a in ("discard", "reacquire")
                    o += r["cloud_fraction_ref"] >= OVERCAST_MIN and a == "downlink"
            clear.append(c / len(seeds))
            over.append(o / len(seeds))
        ax[0].plot(GUARD_GRID, clear, marker="o", ms=3, label=name)
        ax[1].plot(GUARD_GRID, over, marker="o", ms=3, label=name)
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f} / {o:.1f}" for c, o in list(zip(clear, over))[::2]) + " |")
    for a, title in zip(ax, ("clear scenes (label CF <= 0.05) discarded", "overcast scenes (label CF >= 0.95) downlinked")):
        a.set_xlabel("policy.discard_guard_green_blue (dashed: the shipped default)", fontsize=8)
        a.set_ylabel("scenes (mean over seeds)")
        a.set_title(title, fontsize=9)
        a.axvline(PolicyConfigDefault(), color="k", ls="--", lw=0.8)
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=7, loc="upper left", title="lines coincide where equal", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return lines


def PolicyConfigDefault() -> float:
    from flight.config import PolicyConfig

    return PolicyConfig().discard_guard_green_blue


