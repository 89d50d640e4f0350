"""The cross-validation table: per arm and reference, metrics per seed, paired bootstrap intervals over
acquisitions, the guard's operating point per fold; the acceptance read off the committed table."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import yaml

from hil.paths import REPO

from .folds import acquisition, load_cv
from .guard import GUARD_GRID, apply_guard_by_fold, choose_guard, guard_curve
from .runs import RUNS, references

# ----------------------------------------------------------------------------------- statistics
def scene_metrics(rows: dict[str, dict]) -> dict:
    """Per-scene contributions -> the summary metrics (same definitions as ground.evaluate.summarise)."""
    from ..evaluate import summarise

    return summarise({s: r for s, r in rows.items() if "fault" not in r})


def bootstrap(rows_by_contender: dict[str, dict[str, dict]], stat, n: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap over acquisitions: resample acquisition groups with replacement (the same draw for
    every contender), recompute `stat(rows) -> float` per contender; returns {name: (lo, hi)} 95 %
    intervals and the draws (for paired differences)."""
    stems = sorted(set.intersection(*[set(r) for r in rows_by_contender.values()]))
    groups: dict[str, list[str]] = {}
    for s in stems:
        groups.setdefault(acquisition(s), []).append(s)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(n) for name in rows_by_contender}
    for b in range(n):
        pick = rng.integers(0, len(keys), len(keys))
        sample = [s for g in pick for s in groups[keys[g]]]
        for name, rows in rows_by_contender.items():
            draws[name][b] = stat([rows[s] for s in sample])
    return draws


def stat_agreement(rs):
    """Rows carry "agree": the share of seeds (or 1/0 for a single run) in the label's policy band."""
    return float(np.mean([r["agree"] for r in rs]))


def stat_cf(rs):
    return float(np.mean([abs(r["cf_error"]) for r in rs]))


def stat_iou(rs):
    u = sum(r["union"] for r in rs)
    return sum(r["inter"] for r in rs) / u if u else 1.0


STATS = {"action_agreement": stat_agreement, "mean_abs_cf_error": stat_cf, "pooled_cloud_iou": stat_iou}
HARD = ("SnowIce", "Barren", "Water", "Urban", "oncloudn")   # bright / flat surfaces: spread across seeds reported


def collect(arm: str) -> dict[int, dict[str, dict]]:
    """{seed: {scene: row}} for every finished fold run of an arm (each scene once per seed)."""
    out: dict[int, dict[str, dict]] = {}
    for p in sorted((RUNS / arm).glob("f*_s*/result.json")):
        r = json.loads(p.read_text())
        out.setdefault(r["seed"], {}).update({s: {**row, "fold": r["fold"]} for s, row in r["scenes"].items()})
    return out



def _ci(draws: np.ndarray) -> str:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return f"[{lo:.3f}, {hi:.3f}]"


def report(cv: dict, out: Path, folds: list[list[str]]) -> dict:
    """Aggregate every finished run: per arm, metrics per seed (each scene scored once per seed, by the
    fold that held it out), mean ± spread over seeds, 95 % paired bootstrap intervals over acquisitions
    (seed-averaged per-scene rows), differences vs the 4-band teacher and vs no-KD."""
    raw_refs = references()
    all_stems = sorted(s for f in folds for s in f)
    raw_arms = {a: collect(a) for a in cv["arms"]}
    raw_arms = {a: v for a, v in raw_arms.items() if v and all(set(all_stems) <= set(rows) for rows in v.values())}
    result = {"folds": folds, "arms": {}, "references": {}, "guard": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    # the guard's operating point: curve on the raw rows, then each fold's threshold chosen on the others
    curve = guard_curve({**{a: list(v.values()) for a, v in raw_arms.items()},
                         **{n: [r] for n, r in raw_refs.items() if n != "teacher_6b"}}, out.with_name(out.name + "_guard.png"))
    refs, arms = copy.deepcopy(raw_refs), copy.deepcopy(raw_arms)   # actions under the per-fold thresholds
    for a, per_seed in arms.items():
        result["guard"][a] = {"per_fold": {seed: apply_guard_by_fold(rows, folds) for seed, rows in per_seed.items()},
                              "all_scenes": {seed: choose_guard(rows) for seed, rows in raw_arms[a].items()}}
    for n, rows in refs.items():
        result["guard"][n] = {"per_fold": apply_guard_by_fold(rows, folds), "all_scenes": choose_guard(raw_refs[n])}
    lines = ["# Cross-validation by acquisition over every shared labelled scene", "",
             f"Command: `python -m ground cv run` then `python -m ground cv report --out {out}` "
             f"(config `ground/configs/cv.yaml`, folds `ground/data/cv_folds.yaml`: {len(folds)} folds, "
             f"{len(all_stems)} scenes, {len({acquisition(s) for s in all_stems})} acquisition groups). Every arm: "
             f"{cv['steps']} steps, seeds {cv['seeds']}, the same view pool and per-fold training views; each scene "
             "is scored once per seed by the model of the fold that held its acquisition out, INT8 QDQ ONNX through "
             "`CloudGate.process(mask_out=...)` (the gate's policy, guards included). Teachers and the threshold have "
             "no training: scored once per scene on the same arrays (gate policy on their masks).", "",
             "Intervals: 95 % paired bootstrap over acquisition groups (2 000 draws), on seed-averaged per-scene rows "
             "(action agreement per scene = share of seeds in the label's policy band). ± is the standard deviation over "
             "seeds (with 2 seeds: half their difference). 'Action agreement' is the policy band of the model's cloud "
             "fraction vs the label's: the discard guard changes the action, not the band, so a guarded clear scene "
             "still counts as a miss here and a guarded overcast deck as agreeing; the guard's effect is in the "
             "'clear scenes discarded' and 'overcast downlinked' columns (actions).", "",
             "| contender | action agreement | mean \\|CF err\\| | pooled cloud IoU | clear scenes discarded (any seed) | "
             "overcast downlinked | held-out view disagreement | seeds |",
             "|---|---|---|---|---|---|---|---|"]

    def averaged(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
        avg = {}
        for s in all_stems:
            rs = [per_seed[k][s] for k in per_seed if s in per_seed[k] and "fault" not in per_seed[k][s]]
            if not rs:
                continue
            avg[s] = {"cf_error": float(np.mean([r["cf_error"] for r in rs])),
                      "inter": float(np.mean([r["inter"] for r in rs])), "union": float(np.mean([r["union"] for r in rs])),
                      "agree": float(np.mean([r["band"] == r["label_band"] for r in rs]))}
        return avg

    stats = STATS
    per_contender = {}
    for a, per_seed in arms.items():
        per_contender[a] = averaged(per_seed)
    for name, rows in refs.items():
        per_contender[name] = {s: {**r, "agree": float(r["band"] == r["label_band"])} for s, r in rows.items() if s in all_stems}
    common = {n: r for n, r in per_contender.items() if set(all_stems) <= set(r)}
    draws = {k: bootstrap(common, f) for k, f in stats.items()} if common else {}
    for name, rows in per_contender.items():
        entry = {}
        if name in arms:
            per_seed = {seed: scene_metrics(rs) for seed, rs in arms[name].items()}
            entry["per_seed"] = per_seed
            for k in ("action_agreement", "mean_abs_cf_error", "pooled_cloud_iou", "clear_scenes_discarded",
                      "overcast_scenes_downlinked"):
                v = [m[k] for m in per_seed.values()]
                entry[k] = {"mean": float(np.mean(v)), "std": float(np.std(v))}
            dis = [json.loads(p.read_text()).get("held_out_view_disagreement")
                   for p in (RUNS / name).glob("f*_s*/result.json")]
            dis = [x for x in dis if x is not None]
            entry["held_out_view_disagreement"] = float(np.mean(dis)) if dis else None
            clear_any = sorted({s for rs in arms[name].values() for s, r in rs.items()
                                if "fault" not in r and r["cloud_fraction_ref"] <= 0.05 and r["action"] in ("discard", "reacquire")})
            entry["clear_discarded_scenes"] = clear_any
            entry["coverage"] = {"seeds": len(arms[name]),
                                 "faults": sum("fault" in r for rs in arms[name].values() for r in rs.values()),
                                 "missing": sum(s not in rs for rs in arms[name].values() for s in all_stems)}
        else:
            m = scene_metrics(refs[name])
            entry = {k: {"mean": m[k], "std": 0.0} for k in ("action_agreement", "mean_abs_cf_error", "pooled_cloud_iou",
                                                              "clear_scenes_discarded", "overcast_scenes_downlinked")}
            entry["clear_discarded_scenes"] = sorted(s for s, r in refs[name].items()
                                                     if r["cloud_fraction_ref"] <= 0.05 and r["action"] in ("discard", "reacquire"))
            entry["scenes"] = m["scenes"]
        if name in common:
            entry["ci95"] = {k: [float(x) for x in np.percentile(draws[k][name], [2.5, 97.5])] for k in draws}
        result["arms" if name in arms else "references"][name] = entry

        def cell(k):
            e = entry[k]
            ci = f" {_ci(draws[k][name])}" if name in common and k in draws else ""
            sd = f" ± {e['std']:.3f}" if name in arms else ""
            return f"{e['mean']:.3f}{sd}{ci}"
        n_clear = sum(1 for s in all_stems if (refs.get("teacher_4b", {}).get(s, {}).get("cloud_fraction_ref", 1) <= 0.05))
        lines.append(f"| {name} | {cell('action_agreement')} | {cell('mean_abs_cf_error')} | {cell('pooled_cloud_iou')} | "
                     f"{len(entry['clear_discarded_scenes'])} of {n_clear} ({', '.join(entry['clear_discarded_scenes']) or '-'}) | "
                     f"{entry['overcast_scenes_downlinked']['mean']:.1f} | "
                     f"{entry.get('held_out_view_disagreement') if entry.get('held_out_view_disagreement') is None else round(entry['held_out_view_disagreement'], 3)} | "
                     f"{','.join(str(s) for s in sorted(arms[name])) if name in arms else '-'} |")
    # paired differences
    lines += ["", "Paired differences (95 % bootstrap over acquisitions; positive = first is better for action "
              "agreement and IoU, negative = first is better for CF error):", "",
              "| comparison | Δ action agreement | Δ mean \\|CF err\\| | Δ pooled IoU |", "|---|---|---|---|"]
    pairs = [(a, "teacher_4b") for a in arms] + [(a, "no_kd") for a in arms if a != "no_kd" and "no_kd" in arms]
    result["paired"] = {}
    for a, b in pairs:
        if a in common and b in common:
            cells, rec = [], {}
            for k in ("action_agreement", "mean_abs_cf_error", "pooled_cloud_iou"):
                d = draws[k][a] - draws[k][b]
                lo, hi = np.percentile(d, [2.5, 97.5])
                point = stats[k](list(common[a].values())) - stats[k](list(common[b].values()))
                cells.append(f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                rec[k] = {"point": float(point), "ci95": [float(lo), float(hi)]}
            result["paired"][f"{a} - {b}"] = rec
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    # stability on hard surfaces
    lines += ["", "Stability across seeds on hard surfaces (cloud fraction per seed; label in brackets):", "",
              "| scene | label CF | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    result["stability"] = {}
    for s in all_stems:
        if not any(h in s for h in HARD):
            continue
        ref = next((rows[s]["cloud_fraction_ref"] for rows in refs.values() if s in rows), float("nan"))
        cells = []
        for a in arms:
            cfs = [arms[a][k][s]["cloud_fraction"] for k in sorted(arms[a]) if s in arms[a][k] and "fault" not in arms[a][k][s]]
            result["stability"].setdefault(s, {})[a] = cfs
            cells.append(" / ".join(f"{c:.2f}" for c in cfs))
        lines.append(f"| {s} | {ref:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Decision safety: the discard guard's operating point (flight/evidence.py)", "",
              "Clear scenes discarded / overcast scenes downlinked (mean over seeds) as `policy.discard_guard_green_blue` "
              f"sweeps {GUARD_GRID[0]:.2f}..{GUARD_GRID[-1]:.2f} (every second value shown; plot: "
              f"`{out.name}_guard.png`). The table above applies, per fold, the threshold chosen on the other folds "
              "by the pre-declared rule (`ground.cv.choose_guard`: the largest threshold that keeps no rightly dropped "
              "overcast training scene).", "", *curve, "",
              "| contender | threshold chosen per fold (held-out fold: threshold) | on all scenes (the shipped default) |",
              "|---|---|---|"]
    for n, g in result["guard"].items():
        lines.append(f"| {n} | {g['per_fold']} | {g['all_scenes']} |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result



# ----------------------------------------------------------------------------------- acceptance
def winner(cvr: dict) -> str | None:
    """The arm the CV picks (rule fixed before scoring): 0 clear scenes discarded first, then the highest mean
    action agreement, then the lowest mean |CF err|."""
    arms = cvr.get("arms", {})
    if not arms:
        return None
    return min(arms, key=lambda a: (len(arms[a]["clear_discarded_scenes"]), -arms[a]["action_agreement"]["mean"],
                                    arms[a]["mean_abs_cf_error"]["mean"]))


def acceptance_failures(cvr: dict, arm: str) -> list[str]:
    """Issue 18's acceptance on the committed CV table for the shipped arm, each miss with its numbers."""
    a, t = cvr["arms"].get(arm), cvr["references"].get("teacher_4b")
    if a is None or t is None:
        return [f"the CV table has no arm {arm!r} or no teacher_4b row"]
    out = []
    cov = a.get("coverage", {})
    if cov.get("seeds", 0) < 2 or cov.get("faults", 1) or cov.get("missing", 1):
        out.append(f"coverage: {cov.get('seeds', 0)} seed(s), {cov.get('faults', '?')} faulted and "
                   f"{cov.get('missing', '?')} missing scene-runs (needs >= 2 seeds, every scene scored, no faults)")
    sa, ta = a["action_agreement"]["mean"], t["action_agreement"]["mean"]
    sc, tc = a["mean_abs_cf_error"]["mean"], t["mean_abs_cf_error"]["mean"]
    si, ti = a["pooled_cloud_iou"]["mean"], t["pooled_cloud_iou"]["mean"]
    if sa < ta:
        out.append(f"action agreement {sa:.3f} < teacher_4b {ta:.3f}")
    if sc > tc + 0.02:
        out.append(f"mean |CF err| {sc:.3f} > teacher_4b {tc:.3f} + 0.02")
    if si < 0.95 * ti:
        out.append(f"pooled IoU {si:.3f} < 0.95 x teacher_4b {ti:.3f} = {0.95 * ti:.3f}")
    if a["clear_discarded_scenes"]:
        out.append(f"clear scenes discarded in some fold/seed: {a['clear_discarded_scenes']}")
    if winner(cvr) != arm:
        out.append(f"shipped arm {arm!r} is not the CV winner {winner(cvr)!r}")
    return out


def record_shipped(card_path: Path, out: Path = REPO / "docs" / "results" / "cv") -> None:
    """Name the shipped artifacts (sha256) and arm in the committed CV table, so CI can check that the table
    describes the model that ships."""
    card = yaml.safe_load(Path(card_path).read_text())
    js = out.with_suffix(".json")
    cvr = json.loads(js.read_text())
    arm = (card.get("cv_selection") or {}).get("arm")
    cvr["shipped"] = {"card": Path(card_path).name, "arm": arm,
                      "artifacts": {k: v["sha256"] for k, v in card["artifacts"].items()},
                      "acceptance_failures": acceptance_failures(cvr, arm) if arm else ["no arm named"]}
    js.write_text(json.dumps(cvr, indent=1))
    md = out.with_suffix(".md")
    text = md.read_text().split("\n## Shipped model\n")[0]
    fails = cvr["shipped"]["acceptance_failures"]
    steps = (card.get("config") or {}).get("train", {}).get("steps")
    cv_steps = load_cv()[0]["steps"]
    text += ("\n## Shipped model\n\n" + f"`models/{cvr['shipped']['card']}` = arm **{arm}** trained on every shared "
             f"labelled scene with the CV runs' recipe, {steps} steps (each CV run: {cv_steps}; selection runs are short, "
             "the same for every arm); artifacts (sha256): "
             + ", ".join(f"{k} `{v[:16]}…`" for k, v in cvr["shipped"]["artifacts"].items()) + ".\n\n"
             + ("Acceptance (issue 18) on this table: **met**.\n" if not fails else
                "Acceptance (issue 18) on this table: **not met**: " + "; ".join(fails) + ".\n"))
    md.write_text(text)

