"""Cross-validation by acquisition over every shared labelled scene: the judge of every ground choice.

    python -m ground cv folds [--draw]                      # the committed fold file (ground/data/cv_folds.yaml)
    python -m ground cv run [--only ARM[,ARM]] [--folds 0,1] [--seeds 0,1]   # train + score, resumable per run
    python -m ground cv references                          # teachers and the threshold on every labelled scene
    python -m ground cv report --out docs/results/cv        # tables with paired bootstrap intervals

Folds (`draw_folds`): every labelled scene of ../shared/data/real in exactly one of K folds, grouped by
acquisition (L8 Biome patches of one biome+scene index together; the three On Cloud N demo chips as one
group, since their acquisitions are undocumented) and stratified by source/biome (each stratum's groups are
dealt round-robin over the folds from a seeded shuffle). A run (arm, fold, seed) trains on every pool view
whose source scenes are all outside the fold (unlabelled scenes and the synthetic snow supplement always
train), exports the INT8 QDQ ONNX (calibrated on the run's own training views only) and scores the fold's
scenes through `CloudGate.process(mask_out=...)`: every scene is scored exactly once per seed, by a
model that never saw its acquisition. Student-teacher disagreement is measured on the pool views made from
the held-out scenes (never trained in that run). Teachers and the threshold have no training, so they are
scored once per scene on the same arrays (`references`).

Every arm gets the same pool, views, steps, batch, schedule and seeds (`ground/configs/cv.yaml`).
"""
from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import yaml

from .distill import REPO, build_transfer_set, disagreement, load_config, load_student, train

FOLDS_FILE = REPO / "ground" / "data" / "cv_folds.yaml"
CV_CONFIG = REPO / "ground" / "configs" / "cv.yaml"
RUNS = REPO / "runs" / "cv"
FOLDS_SEED = 20261203
N_FOLDS = 5


# ----------------------------------------------------------------------------------- folds
def acquisition(stem: str) -> str:
    """The acquisition a labelled scene comes from (scenes of one acquisition always share a fold)."""
    m = re.match(r"l8biome_([A-Za-z]+)_(\d+)_", stem)
    if m:
        return f"l8biome_{m.group(1)}_{m.group(2)}"
    if stem.startswith("oncloudn_"):
        return "oncloudn_demo"   # acquisitions of the demo chips are not documented: one group
    return stem


def stratum(stem: str) -> str:
    m = re.match(r"l8biome_([A-Za-z]+)_", stem)
    return f"l8biome/{m.group(1)}" if m else "other"


def draw_folds(stems: list[str], k: int = N_FOLDS, seed: int = FOLDS_SEED) -> dict:
    """Deterministic grouped, stratified K-fold assignment -> {"folds": [[stems], ...], ...}."""
    rng = np.random.default_rng(seed)
    strata: dict[str, dict[str, list[str]]] = {}
    for s in sorted(stems):
        strata.setdefault(stratum(s), {}).setdefault(acquisition(s), []).append(s)
    folds: list[list[str]] = [[] for _ in range(k)]
    start = 0
    for name in sorted(strata):
        groups = sorted(strata[name])
        order = rng.permutation(len(groups))
        for j, gi in enumerate(order):
            folds[(start + j) % k].extend(strata[name][groups[gi]])
        start = (start + len(groups)) % k   # the next stratum continues where this one stopped: balanced sizes
    return {"rule": f"python -m ground cv folds --draw: grouped by acquisition, stratified by source/biome, "
                    f"{k} folds, seeded round-robin", "seed": seed, "folds": [sorted(f) for f in folds]}


def load_folds(path: Path = FOLDS_FILE) -> list[list[str]]:
    d = yaml.safe_load(Path(path).read_text())
    folds = d["folds"]
    seen = [s for f in folds for s in f]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{path}: a scene is in two folds")
    for f in folds:   # one acquisition never straddles folds
        for g in {acquisition(s) for s in f}:
            if any(acquisition(s) == g for o in folds if o is not f for s in o):
                raise ValueError(f"{path}: acquisition {g} is split across folds")
    return folds


def labelled_stems() -> list[str]:
    from flight.scenefile import load_npz
    from hil.paths import real_scene_paths

    return [p.stem for p in real_scene_paths() if load_npz(p).labelled]


# ----------------------------------------------------------------------------------- config
def load_cv(path: str | Path = CV_CONFIG) -> tuple[dict, dict]:
    path = Path(path)
    cv = yaml.safe_load(path.read_text())
    base = load_config(path.parent / cv["base_config"])
    return cv, base


def run_dir(arm: str, fold: int, seed: int) -> Path:
    return RUNS / arm / f"f{fold}_s{seed}"


def fold_views(ts: dict, held_out: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(training views, held-out views) of a fold: a pool view trains only if none of its source scenes is
    held out; the held-out views are the pool views made (in part) from held-out scenes."""
    names = ts["meta"]["sources"]
    src = ts["src"]
    if src is None:
        raise ValueError("the view pool records no sources (pool generator views-1): rebuild it with pool.sources: all")
    bad = np.array([i for i, n in enumerate(names) if n in held_out], np.int64)
    n_pool = len(src)
    touches = np.isin(src, bad).any(1) if len(bad) else np.zeros(n_pool, bool)
    pool_train = np.flatnonzero(~touches)
    extra = np.asarray(ts["train"])[np.asarray(ts["train"]) >= n_pool]   # the synthetic supplement
    return np.concatenate([pool_train, extra]), np.flatnonzero(touches)


def calibration_tiles(ts: dict, spec, idx: np.ndarray, n: int = 128) -> np.ndarray:
    from hil.synth import SYNTH_BANDS

    pick = idx[np.linspace(0, len(idx) - 1, n).astype(int)]
    return np.ascontiguousarray(np.stack([spec.model_input(np.asarray(ts["X"][i], np.float32), SYNTH_BANDS, ts["swir"][i])
                                          for i in pick]))


def export_onnx_int8(spec, model, out_dir: Path, name: str, calib: np.ndarray) -> Path:
    """fp32 ONNX -> INT8 QDQ ONNX (the same quantizer as the shipped export) and a minimal card the gate
    loads; returns the card path."""
    from .export import export_onnx_fp32, quantize_onnx, sha256

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out_dir / f"{name}.fp32.onnx", out_dir / f"{name}.int8.onnx"
    export_onnx_fp32(model, spec, fp32)
    quantize_onnx(fp32, int8, calib)
    card = {"card_version": 1, "name": name, "default": False, "role": "cross-validation run (not a flight model)",
            "bands": list(spec.bands), "output": {"classes": list(spec.classes)}, "tile": 256,
            "artifacts": {k: {"file": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}
                          for k, p in (("onnx_fp32", fp32), ("onnx_int8", int8))}}
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def scene_frames(stems: set[str]):
    from flight.scenefile import load_npz
    from hil.paths import real_scene_paths

    for p in real_scene_paths():
        if p.stem in stems:
            yield p.stem, load_npz(p)


def score_fold(card: Path, stems: set[str]) -> dict:
    """Each held-out scene through the gate (INT8 ONNX Runtime, full pass with mask_out): the scorer's row
    plus the gate's rule and degraded codes."""
    from flight import CloudGate

    from .evaluate import scene_row

    gate = CloudGate.from_model(str(card), backend="onnxruntime", threads=1, early_exit={"enabled": False})
    rows = {}
    try:
        for stem, scene in scene_frames(stems):
            fs = scene.frame()
            mask = np.empty(fs["bands"].shape[:2], np.uint8)
            d = gate.process(fs["bands"], fs["band_names"], scene_id=fs["scene_id"], target_id=fs["scene_id"],
                             valid_mask=fs["valid_mask"], radiometry=fs["radiometry"], mask_out=mask)
            if d.action == "fault":
                rows[stem] = {"fault": d.fault}
                continue
            row = scene_row(mask, float(d.cloud_fraction), d.action, fs["label"])
            row["rule"] = d.rule
            row["degraded"] = [e["code"] for e in d.degraded]
            row["probe"] = probe_stats(fs)
            rows[stem] = row
    finally:
        gate.close()
    return rows


def probe_stats(fs: dict) -> list[float] | None:
    """The discard guard's measurement of a frame (flight.evidence): [bright share, green/blue, saturated]."""
    from flight.evidence import BrightSurfaceProbe

    names = list(fs["band_names"])
    if not {"blue", "green"} <= set(names):
        return None
    return [float(v) for v in BrightSurfaceProbe().measure(fs["bands"], names.index("blue"), names.index("green"),
                                                          *fs["radiometry"], fs["valid_mask"])]


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


def run_one(cv: dict, base: dict, arm: str, fold: int, seed: int, folds: list[list[str]], log=print,
            ts: dict | None = None) -> dict:
    d = run_dir(arm, fold, seed)
    res_path = d / "result.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    held = set(folds[fold])
    cfg = copy.deepcopy(base)
    cfg["seed"] = int(seed)
    cfg["experiment"] = f"cv_{arm}_f{fold}_s{seed}"
    cfg["train"] = {**cfg["train"], "steps": int(cv["steps"])}
    cfg["losses"] = cv["arms"][arm]
    ts = ts if ts is not None else build_transfer_set(cfg, log=log)
    train_idx, held_idx = fold_views(ts, held)
    t0 = time.time()
    pt = train(cfg, ts, d / "train", cfg["losses"], cfg["experiment"], log, train_idx=train_idx)
    train_s = time.time() - t0
    spec, model = load_student(pt)
    dis = disagreement(model, cfg, ts, held_idx) if len(held_idx) and ts["t_probs"] else np.array([])
    card = export_onnx_int8(spec, model, d / "model", f"cv-{arm}-f{fold}-s{seed}",
                            calibration_tiles(ts, spec, train_idx))
    rows = score_fold(card, held)
    res = {"arm": arm, "fold": fold, "seed": seed, "steps": int(cv["steps"]), "train_views": int(len(train_idx)),
           "held_out_views": int(len(held_idx)), "pool": ts["key"], "train_seconds": round(train_s, 1),
           "held_out_view_disagreement": float(dis.mean()) if len(dis) else None,
           "loss_terms": cv["arms"][arm], "scenes": rows}
    res_path.write_text(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------- references
def references(out: Path = RUNS / "references.json", log=print) -> dict:
    """Teachers (CSmask, as their users run them) and the Fmask-style threshold on every labelled scene:
    no training, so no folds; the same arrays as the students."""
    from .evaluate import gate_policy_action, reference_contenders, scene_row

    if out.exists():
        return json.loads(out.read_text())
    contenders = reference_contenders(True)
    rows: dict[str, dict] = {}
    for stem, scene in scene_frames(set(labelled_stems())):
        log(f"references: {stem}")
        fs = scene.frame()
        valid = fs["valid_mask"] if fs["valid_mask"] is not None else np.ones(fs["bands"].shape[:2], bool)
        for name, c in contenders.items():
            r = c(fs, scene)
            if r is not None:
                mask, cf, _ = r   # the policy's action before the guard; the guard is applied per fold (action_at)
                row = scene_row(mask, cf, gate_policy_action(mask, valid, cf), fs["label"])
                rows.setdefault(name, {})[stem] = {**row, "rule": "threshold", "probe": probe_stats(fs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows


# ----------------------------------------------------------------------------------- statistics
def scene_metrics(rows: dict[str, dict]) -> dict:
    """Per-scene contributions -> the summary metrics (same definitions as ground.evaluate.summarise)."""
    from .evaluate import summarise

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

    from .evaluate import CLEAR_MAX, OVERCAST_MIN

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


def label_conflicts(cfg: dict, out: Path, max_views: int = 60) -> str:
    """Where the teacher and the human labels disagree, per labelled scene of the pool: views made from it
    (labelled / without labels: mixup, synthetic composites), and the share of labelled pixels (clear or
    cloud) whose label the teacher's argmax contradicts, at most `max_views` labelled views per scene."""
    ts = build_transfer_set(cfg)
    names, src, Y = ts["meta"]["sources"], ts["src"], ts["Y"]
    teacher = cfg["teachers"][0]["name"]
    P = ts["t_probs"][teacher]
    rows = []
    for si, n in enumerate(names):
        idx = np.flatnonzero((src == si).any(1))
        lab = [i for i in idx if (np.asarray(Y[i]) != 255).any()]
        if not lab:
            continue
        conflict = cloud_on_clear = total = 0
        for i in lab[:max_views]:
            y, t = np.asarray(Y[i]), np.asarray(P[i]).argmax(0)
            m = (y != 255) & (y != 2) & (t != 2)
            conflict += np.count_nonzero((t != y) & m)
            cloud_on_clear += np.count_nonzero((t == 1) & (y == 0) & m)
            total += np.count_nonzero(m)
        rows.append((n, len(idx), len(lab), len(idx) - len(lab), conflict / max(total, 1), cloud_on_clear / max(total, 1)))
    rows.sort(key=lambda r: -r[4])
    lines = [f"# Teacher ({teacher}) vs human labels on the pool views (`python -m ground cv conflicts`)", "",
             "| scene | views | with labels | without labels | teacher contradicts the label | teacher says cloud on labelled clear |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {a} | {b} | {c} | {d:.3f} | {e:.3f} |" for n, a, b, c, d, e in rows]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(args) -> int:
    if args.cv_cmd == "folds":
        if args.draw:
            print(yaml.safe_dump(draw_folds(labelled_stems()), sort_keys=False))
        else:
            print(yaml.safe_dump({"folds": load_folds()}, sort_keys=False))
        return 0
    cv, base = load_cv(args.config)
    folds = load_folds()
    if args.cv_cmd == "references":
        references()
        return 0
    if args.cv_cmd == "conflicts":
        print(label_conflicts(base, Path(args.out).with_name("label_conflicts.md")))
        return 0
    if args.cv_cmd == "report":
        report(cv, Path(args.out), folds)
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    only = set(args.only.split(",")) if args.only else None
    fsel = {int(x) for x in args.folds.split(",")} if args.folds else None
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else cv["seeds"]
    for seed in seeds:
        for fold in range(len(folds)):
            for arm in cv["arms"]:
                if (only and arm not in only) or (fsel is not None and fold not in fsel):
                    continue
                r = run_one(cv, base, arm, fold, seed, folds)
                agree = np.mean([row["band"] == row["label_band"] for row in r["scenes"].values() if "fault" not in row])
                print(f"cv {arm} fold {fold} seed {seed}: action agreement {agree:.3f} on {len(r['scenes'])} scenes, "
                      f"held-out view disagreement {r['held_out_view_disagreement']}", flush=True)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("cv", help="cross-validation by acquisition over every shared labelled scene (ground/cv.py)")
    c.add_argument("cv_cmd", choices=("folds", "run", "references", "report", "conflicts"))
    c.add_argument("--config", default=str(CV_CONFIG))
    c.add_argument("--draw", action="store_true", help="folds: re-draw the folds from the scenes present")
    c.add_argument("--only", default=None, help="run: comma-separated arms")
    c.add_argument("--folds", default=None, help="run: comma-separated fold indices")
    c.add_argument("--seeds", default=None, help="run: comma-separated seeds (default: the config's)")
    c.add_argument("--out", default="docs/results/cv", help="report: output path without suffix")


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
