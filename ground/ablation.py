"""Ablation of the KD methods and the capacity check, scored through CloudGate on real scenes.

    python -m ground ablate --config ground/configs/ablation.yaml [--only ARM[,ARM]] [--seeds 0,1] [--capacity]
    python -m ground ablate --config ground/configs/ablation.yaml --report docs/results/ablation

Runs are independent and resumable (runs/ablation/<arm>[_<spec>]_s<seed>/), so two processes can share
the two cores (--only); --report aggregates whatever runs have finished into one table.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import yaml

from .distill import REPO, build_transfer_set, disagreement, load_config, load_student, train

RUNS = REPO / "runs" / "ablation"


def load_ablation(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    ab = yaml.safe_load(path.read_text())
    base = load_config(path.parent / ab["base_config"])
    return ab, base


def run_names(ab: dict, capacity: bool) -> list[tuple[str, str | None, int]]:
    if capacity:
        c = ab["capacity"]
        return [(c["arm"], spec, s) for spec in c["specs"] for s in c.get("seeds", [0])]
    return [(arm, None, s) for arm in ab["arms"] for s in ab["seeds"]]


def run_dir(arm: str, spec: str | None, seed: int) -> Path:
    return RUNS / (f"{arm}_{spec}_s{seed}" if spec else f"{arm}_s{seed}")


def run_one(ab: dict, base: dict, arm: str, spec: str | None, seed: int, log=print) -> dict:
    """Train one arm (same views, steps and schedule as every other), export INT8, score through the gate."""
    from .evaluate import GateContender, score_real
    from .export import export_artifacts, model_card, quantization_tiles
    from .student import StudentSpec

    d = run_dir(arm, spec, seed)
    res_path = d / "result.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    cfg = copy.deepcopy(base)
    cfg["seed"] = int(seed)
    cfg["experiment"] = d.name
    if spec:
        cfg["student"] = {**cfg["student"], **ab["capacity"]["specs"][spec], "name": f"cloudgate-{spec}"}
    cfg["train"] = {**cfg["train"], "steps": int(ab["steps"])}
    if not ab.get("use_supplement", False):  # the arms compare KD methods on the real-view pool alone
        cfg.pop("supplement", None)
    ts = build_transfer_set(cfg, log=log)
    terms = ab["arms"][arm]
    pt = train(cfg, ts, d / "train", terms, d.name, log)
    sp, model = load_student(pt)
    probe = float(disagreement(model, cfg, ts, ts["probe"]).mean()) if len(ts["probe"]) else None
    name = d.name.replace("_", "-")
    artifacts, quant = export_artifacts(sp, model, d / "model", name, quantization_tiles(ts, sp))
    card_path = d / "model" / f"{name}.yaml"
    card_path.write_text(yaml.safe_dump(model_card(sp, name, artifacts, quant, False, role=f"ablation arm {arm}"),
                                        sort_keys=False))
    gate = GateContender(d / "model" / artifacts["tflite_int8"]["file"], "litert")
    try:
        real = score_real({"student": gate})
    finally:
        gate.close()
    st = StudentSpec.from_dict(cfg["student"])
    res = {"arm": arm, "spec": spec or "s4_default", "seed": seed, "steps": int(ab["steps"]),
           "train_views": int(len(ts["train"])), "pool": ts["key"], "probe_disagreement": probe,
           "parameters": st.parameters(), "macs_per_pixel": round(st.macs_per_pixel(), 1),
           "int8_tflite_bytes": artifacts["tflite_int8"]["bytes"], "int8_onnx_bytes": artifacts["onnx_int8"]["bytes"],
           "evaluation": real["evaluation"]["summary"]["student"], "training": real["training"]["summary"]["student"],
           "evaluation_scenes": {s: r["student"] for s, r in real["evaluation"]["scenes"].items()}}
    res_path.write_text(json.dumps(res, indent=1))
    return res


METRICS = (("action_agreement", "action agr."), ("mean_abs_cf_error", "mean abs CF err"),
           ("clear_scenes_discarded", "clear discarded"), ("pooled_cloud_iou", "pooled IoU"))


def _ms(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def report(ab: dict, out: Path, teacher: dict | None = None) -> str:
    """Aggregate finished runs: mean ± spread over seeds per arm, evaluation part first."""
    rows = {}
    for p in sorted(RUNS.glob("*/result.json")):
        r = json.loads(p.read_text())
        rows.setdefault((r["arm"], r["spec"]), []).append(r)
    if not rows:   # never overwrite a report with an empty table (e.g. a fresh clone: runs/ is not committed)
        raise FileNotFoundError(f"no finished ablation run under {RUNS} (run `python -m ground ablate` first); "
                                f"{out.with_suffix('.md')} left as it was")
    lines = ["# KD-method ablation and capacity check on real scenes", "",
             "Commands (2 cores, runs resumable): `python -m ground ablate` (arms × seeds), `python -m ground ablate "
             "--capacity`, then `python -m ground ablate --report docs/results/ablation`. Config: "
             "`ground/configs/ablation.yaml` (arms, seeds, steps, selection rule); base: `ground/configs/real_kd.yaml` "
             "(student, view pool, training views); split: `ground/data/split.yaml`. Scores: INT8 TFLite of each arm "
             "through `CloudGate.process(mask_out=...)` on the evaluation part (12 scenes) and the training part.", "",
             f"Every arm: {ab['steps']} steps, batch as in {ab['base_config']}, the same {next(iter(rows.values()))[0]['train_views'] if rows else '?'} "
             "training views of one cached real-view pool, INT8 TFLite through CloudGate. mean ± std over seeds.", "",
             "| arm | spec | seeds | probe disagreement (selection) | " + " | ".join(f"eval: {h}" for _, h in METRICS)
             + " | train part: action agr. | MACs/px | params |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|---|"]
    for (arm, spec), rs in sorted(rows.items(), key=lambda kv: (kv[0][1] != "s4_default", kv[0][1], kv[0][0])):
        cells = [_ms([r["evaluation"][k] for r in rs]) for k, _ in METRICS]
        lines.append(f"| {arm} | {spec} | {','.join(str(r['seed']) for r in rs)} | {_ms([r['probe_disagreement'] for r in rs])} | "
                     + " | ".join(cells) + f" | {_ms([r['training']['action_agreement'] for r in rs])} | "
                     f"{rs[0]['macs_per_pixel']} | {rs[0]['parameters']} |")
    if teacher:
        lines.append(f"| teacher_4b (reference) | — | — | — | {teacher['action_agreement']:.3f} | {teacher['mean_abs_cf_error']:.3f} | "
                     f"{teacher['clear_scenes_discarded']} | {teacher['pooled_cloud_iou']:.3f} | — | — | 19.5 M |")
    default = [(a, rs) for (a, s), rs in rows.items() if s == "s4_default"]
    if default:
        win = min(default, key=lambda kv: np.mean([r["probe_disagreement"] for r in kv[1]]))[0]
        lines += ["", f"Selected by the pre-declared rule (lowest probe disagreement): **{win}**."]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({f"{a}|{s}": rs for (a, s), rs in rows.items()}, indent=1))
    _pareto(rows, out.with_name(out.name + "_pareto.png"))
    return text


def _pareto(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (arm, spec), rs in rows.items():
        if arm != "all":
            continue
        x = rs[0]["macs_per_pixel"]
        y = [r["evaluation"]["action_agreement"] for r in rs]
        ax.errorbar(x, np.mean(y), yerr=np.std(y) if len(y) > 1 else None, fmt="o", capsize=3)
        ax.annotate(spec, (x, np.mean(y)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("student MACs per pixel (log)")
    ax.set_ylabel("action agreement, evaluation part")
    ax.set_title("Capacity check (arm 'all', INT8 TFLite through CloudGate)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
