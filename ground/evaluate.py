"""Scoring through the gate that flies.

Every student mask scored here comes from `CloudGate.process(mask_out=...)` on a carded artifact (the
shipped INT8 TFLite / ONNX, or an ablation arm's carded ONNX): one inference path for what flies and
what is scored. Teachers (ukis-csmask 4- and 6-band, run as their users run them) and a spectral
threshold are scored on the same arrays beside them.

Scene level first (what the payload loop acts on), pixels second:
- action agreement: the gate's policy band (flight.policy.policy_band, priority 0, no history: low
  <= 0.30 < mid < 0.70 <= high, i.e. downlink the frame / prune cloudy tiles / discard) of the
  contender's cloud fraction vs that of the human label's;
- |cloud-fraction error| (the gate's own fraction for gate contenders);
- clear scenes (label <= 0.05) discarded, and overcast scenes (label >= 0.95) downlinked, by the gate's
  actual decision (for whole-scene mask contenders: flight.policy.decide on the mask's counts over the
  gate's tile cores, so every contender's action is one the gate has);
- pooled cloud IoU over the part, and a per-scene table.
Real and synthetic numbers are never averaged together; the real labelled scenes are reported per part
of the committed split (ground/data/split.yaml), the evaluation part first. L8 Biome thin cloud
(mask_orig 192) is cloud (the shared files already map it to 1).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import yaml

from flight.scenefile import load_npz
from hil.paths import SHARED_REAL, real_scene_paths

from .split import load_split

CLOUD, INVALID = 1, 255
CLEAR_MAX, OVERCAST_MIN = 0.05, 0.95
BANDS4 = ("blue", "green", "red", "nir")
BANDS6 = ("blue", "green", "red", "nir", "swir16", "swir22")


# ----------------------------------------------------------------------------------- contenders
def teacher_mask(refl: np.ndarray, bands, threads: int = 2) -> np.ndarray:
    """ukis-csmask as its users run it: the CSmask wrapper (own tiling, 20 % overlap, blending); it
    picks its 6-band model when SWIR is among `bands`."""
    from ukis_csmask.mask import CSmask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs = CSmask(np.ascontiguousarray(refl, dtype=np.float32), band_order=list(bands),
                    intra_op_num_threads=threads, inter_op_num_threads=1)
    return cs.csm[..., 0]


class GateContender:
    """A carded model run through `flight.CloudGate` exactly as on board (full pass with mask_out)."""

    def __init__(self, model: str | Path | None = None, backend: str = "auto", threads: int = 2,
                 only_bands: tuple[str, ...] | None = None):
        """model: a card, .tflite or .onnx path; None = the shipped default. only_bands: hand the gate only
        these bands of each scene (e.g. VNIR, to score a SWIR-optional model as a VNIR-only payload runs it)."""
        from flight import CloudGate

        self.gate = CloudGate.from_model(None if model is None else str(model), backend=backend, threads=threads)
        self.only_bands = tuple(only_bands) if only_bands else None

    def __call__(self, fs: dict, scene) -> tuple[np.ndarray, float, str]:
        mask = np.empty(fs["bands"].shape[:2], np.uint8)
        if self.only_bands:
            keep = [i for i, b in enumerate(fs["band_names"]) if b in self.only_bands]
            fs = {**fs, "bands": fs["bands"][..., keep], "band_names": [fs["band_names"][i] for i in keep]}
        # target_id = scene id: every scene is its own target, so no hysteresis from another scene
        d = self.gate.process(fs["bands"], fs["band_names"], scene_id=fs["scene_id"], target_id=fs["scene_id"],
                              valid_mask=fs["valid_mask"], radiometry=fs["radiometry"], mask_out=mask)
        if d.action == "fault":
            raise RuntimeError(f"gate fault on {fs['scene_id']}: {d.fault}")
        return mask, float(d.cloud_fraction), d.action

    def close(self):
        self.gate.close()


class MaskContender:
    """A whole-scene mask function (teachers, threshold) on reflectance in `bands`."""

    def __init__(self, fn, bands):
        self.fn, self.bands = fn, tuple(bands)

    def __call__(self, fs: dict, scene) -> tuple[np.ndarray, float, str] | None:
        if not all(b in scene.band_names for b in self.bands):
            return None
        mask = self.fn(scene.reflectance(self.bands), self.bands).astype(np.uint8)
        valid = fs["valid_mask"] if fs["valid_mask"] is not None else np.ones(mask.shape, bool)
        cf = float(np.count_nonzero((mask == CLOUD) & valid) / max(np.count_nonzero(valid), 1))
        return mask, cf, gate_policy_action(mask, valid, cf, fs)

    def close(self):
        pass


def reference_contenders(with_teachers: bool = True) -> dict:
    from bench.threshold import threshold_mask

    out = {}
    if with_teachers:
        out["teacher_4b"] = MaskContender(lambda r, b: teacher_mask(r, b), BANDS4)
        out["teacher_6b"] = MaskContender(lambda r, b: teacher_mask(r, b), BANDS6)
    out["threshold"] = MaskContender(threshold_mask, BANDS4)
    return out


def gate_policy_action(mask: np.ndarray, valid: np.ndarray, cf: float, fs: dict | None = None) -> str:
    """The action the gate's policy (default config, priority 0, no history) takes on a whole-scene mask
    that did not come from the gate: flight.policy.decide on the mask's counts over the gate's tile cores,
    then the gate's discard guard (flight.evidence) on the frame `fs` when given."""
    from flight.config import GateConfig
    from flight.evidence import BrightSurfaceProbe, guard_decision
    from flight.policy import TileCounts, decide

    g = GateConfig()
    tiles = TileCounts.from_mask(mask == CLOUD, valid, g.tile - g.overlap)
    pd = decide(cf, float(valid.mean()), 0, None, tiles, g.policy)
    if fs is not None:
        names = list(fs["band_names"])
        blue, green = (names.index(b) if b in names else None for b in ("blue", "green"))
        pd, _ = guard_decision(pd, BrightSurfaceProbe(), fs["bands"], blue, green, fs["radiometry"], fs["valid_mask"],
                               g.policy)
    return pd.action


# ----------------------------------------------------------------------------------- scoring
def scene_row(mask: np.ndarray, cf: float, action: str, label: np.ndarray) -> dict:
    """One contender on one scene. action: the gate's action (GateContender) or the gate policy's on the
    mask (MaskContender); band / label_band: the policy band of cf / of the label's cloud fraction."""
    from flight.config import PolicyConfig
    from flight.policy import policy_band

    lab = label != INVALID
    g = label[lab] == CLOUD
    p = mask[lab] == CLOUD
    ref = float(g.mean())
    inter, union = int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))
    return {"cloud_fraction": round(cf, 4), "cloud_fraction_ref": round(ref, 4), "cf_error": round(cf - ref, 4),
            "action": action, "band": policy_band(cf, PolicyConfig()), "label_band": policy_band(ref, PolicyConfig()),
            "iou": round(inter / union, 4) if union else 1.0, "inter": inter, "union": union}


def summarise(rows: dict[str, dict]) -> dict:
    """Scene-level first, then pixels, over the scenes a contender scored."""
    rs = list(rows.values())
    if not rs:
        return {}
    inter, union = sum(r["inter"] for r in rs), sum(r["union"] for r in rs)
    clear = [r for r in rs if r["cloud_fraction_ref"] <= CLEAR_MAX]
    over = [r for r in rs if r["cloud_fraction_ref"] >= OVERCAST_MIN]
    return {"scenes": len(rs),
            "action_agreement": round(float(np.mean([r["band"] == r["label_band"] for r in rs])), 4),
            "mean_abs_cf_error": round(float(np.mean([abs(r["cf_error"]) for r in rs])), 4),
            "clear_scenes_discarded": sum(r["action"] in ("discard", "reacquire") for r in clear),
            "clear_scenes": len(clear),
            "overcast_scenes_downlinked": sum(r["action"] == "downlink" for r in over),
            "overcast_scenes": len(over),
            "pooled_cloud_iou": round(inter / union, 4) if union else 1.0}


def score_real(contenders: dict, parts=("evaluation", "training"), scenes_dir: Path | None = None,
               keep_masks: bool = False, log=None) -> dict:
    """Per-scene rows and per-part summaries for the labelled real scenes of the committed split; the part
    "all" is every labelled scene present."""
    split = load_split()
    wanted = {s: part for part in parts if part != "all" for s in split[part]}
    out = {part: {"scenes": {}, "summary": {}} for part in parts}
    masks = {}
    for p in real_scene_paths(scenes_dir or SHARED_REAL):
        part = wanted.get(p.stem, "all" if "all" in parts else None)
        if part is None:
            continue
        scene = load_npz(p)
        if part == "all" and not scene.labelled:   # every labelled scene present, each read once
            continue
        fs = scene.frame()
        if log:
            log(f"scoring {p.stem} ({part})")
        row = {}
        for name, c in contenders.items():
            res = c(fs, scene)
            if res is None:
                continue
            row[name] = scene_row(*res, fs["label"])
            if keep_masks:
                masks.setdefault(p.stem, {"image": scene.reflectance(BANDS4), "label": fs["label"]})[name] = res[0]
        out[part]["scenes"][p.stem] = row
    for part in parts:
        sc = out[part]["scenes"]
        for name in contenders:
            out[part]["summary"][name] = summarise({s: r[name] for s, r in sc.items() if name in r})
    return (out, masks) if keep_masks else out


def score_synthetic(contenders: dict, n: int = 48, seed: int = 99) -> dict:
    """Held-out procedural tiles through the same contenders (reported apart from real scenes)."""
    from hil.synth import SYNTH_BANDS, make_set

    X, Y, _ = make_set(n, seed=seed)
    out = {}
    for name, c in contenders.items():
        if not isinstance(c, GateContender):
            continue
        rows = {}
        for i in range(n):
            fs = {"bands": X[i], "band_names": SYNTH_BANDS,   # all six: the gate takes what its card uses
                  "scene_id": f"synth_{seed}_{i}", "valid_mask": None, "radiometry": (1.0, 0.0)}
            rows[i] = scene_row(*c(fs, None), Y[i])
        out[name] = summarise(rows)
    return {"set": f"hil.synth.make_set(n={n}, seed={seed}), 256² tiles", **out}


# ----------------------------------------------------------------------------------- report
SUMMARY_COLS = ("action_agreement", "mean_abs_cf_error", "clear_scenes_discarded", "overcast_scenes_downlinked",
                "pooled_cloud_iou")


def summary_table(summary: dict) -> list[str]:
    lines = ["| contender | scenes | action agreement | mean abs CF err | clear discarded | overcast downlinked | pooled cloud IoU |",
             "|---|---|---|---|---|---|---|"]
    for n, s in summary.items():
        if not s:
            continue
        lines.append(f"| {n} | {s['scenes']} | {s['action_agreement']:.3f} | {s['mean_abs_cf_error']:.3f} | "
                     f"{s['clear_scenes_discarded']}/{s['clear_scenes']} | {s['overcast_scenes_downlinked']}/{s['overcast_scenes']} | "
                     f"{s['pooled_cloud_iou']:.3f} |")
    return lines


def trained_on_every_labelled_scene(card_raw: dict) -> bool:
    """A card whose student's view pool drew on every shared scene (config.pool.sources: all, v6 on): its
    scores on either part of the split are in-sample."""
    return ((card_raw.get("config") or {}).get("pool") or {}).get("sources") == "all"


def format_report(real: dict, synthetic: dict | None = None, in_sample: bool = False) -> str:
    """in_sample: the student trained on every labelled scene, so no part is held out (titles say so)."""
    lines = []
    for part, res in real.items():
        held_out = ("Evaluation part (in-sample for this student, which trained on every shared labelled scene: a "
                    "regression guard; generalisation is the cross-validation table, docs/results/cv.md)" if in_sample
                    else "Evaluation part (never trained, calibrated or chosen on)")
        title = {"evaluation": held_out,
                 "training": "Training part (trained / calibrated on: not evidence of generalisation)",
                 "all": "Every labelled scene (in-sample for a model trained on all of them: a regression guard; "
                        "generalisation is the cross-validation table, docs/results/cv.md)"}.get(part, part)
        lines += [f"### {title}", "", *summary_table(res["summary"]), "",
                  "| scene | contender | label CF | CF | CF err | policy band (label's) | gate action | IoU |",
                  "|---|---|---|---|---|---|---|---|"]
        for sid, row in res["scenes"].items():
            for n, r in row.items():
                lines.append(f"| {sid} | {n} | {r['cloud_fraction_ref']:.3f} | {r['cloud_fraction']:.3f} | {r['cf_error']:+.3f} | "
                             f"{r['band']} ({r['label_band']}) | {r['action']} | {r['iou']:.3f} |")
        lines.append("")
    if synthetic:
        lines += [f"### Synthetic held-out set ({synthetic['set']}; never averaged with real)", "",
                  *summary_table({k: v for k, v in synthetic.items() if isinstance(v, dict)}), ""]
    return "\n".join(lines)


def save_mask_png(masks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(masks)
    names = sorted({n for m in masks.values() for n in m if n not in ("image", "label")})
    cols = 2 + len(names)
    fig, ax = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False)
    for r, (sid, m) in enumerate(masks.items()):
        ax[r, 0].imshow(np.clip(m["image"][..., [2, 1, 0]] * 3, 0, 1)); ax[r, 0].set_title(sid[:22], fontsize=6)
        ax[r, 1].imshow(np.where(m["label"] == INVALID, 3, m["label"]), vmin=0, vmax=3, interpolation="nearest")
        ax[r, 1].set_title("label", fontsize=6)
        for c, n in enumerate(names):
            if n in m:
                ax[r, 2 + c].imshow(np.where(m[n] == INVALID, 3, m[n]), vmin=0, vmax=3, interpolation="nearest")
            ax[r, 2 + c].set_title(n, fontsize=6)
        for a in ax[r]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def card_contenders(card_path: Path) -> dict:
    """The shipped student through the gate on both INT8 artifacts, and the no-KD baseline's card if listed."""
    card = yaml.safe_load(Path(card_path).read_text())
    d = Path(card_path).parent
    a = card["artifacts"]
    out = {"student_int8_tflite": GateContender(d / a["tflite_int8"]["file"], "litert"),
           "student_int8_onnx": GateContender(d / a["onnx_int8"]["file"], "onnxruntime")}
    if card.get("optional_bands"):  # the same student as a payload without its optional bands (VNIR only) runs it
        required = tuple(b for b in card["bands"] if b not in card["optional_bands"])
        out["student_int8_tflite_without_optional_bands"] = GateContender(d / a["tflite_int8"]["file"], "litert",
                                                                           only_bands=required)
    base = card.get("baseline_card")
    if base and (d / base).exists():
        out["baseline_nokd_int8_tflite"] = GateContender(d / base, "litert")
    return out


def evaluate_card(card_path: Path, parts=("evaluation", "training"), with_teachers: bool = True,
                  keep_masks: bool = False, log=None):
    contenders = {**card_contenders(card_path), **reference_contenders(with_teachers)}
    try:
        res = score_real(contenders, parts, keep_masks=keep_masks, log=log)
        real, masks = res if keep_masks else (res, None)
        synthetic = score_synthetic(contenders)
    finally:
        for c in contenders.values():
            c.close()
    return real, synthetic, masks


def evaluate_cli(card_path: str, out: str | None) -> None:
    card = yaml.safe_load(Path(card_path).read_text())
    parts = ("all",) if "folds_file" in (card.get("data") or {}) else ("evaluation", "training")
    real, synthetic, masks = evaluate_card(Path(card_path), parts=parts, keep_masks=bool(out), log=print)
    text = format_report(real, synthetic, in_sample=trained_on_every_labelled_scene(card))
    print(text)
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "evaluation.md").write_text(text + "\n")
        (o / "evaluation.yaml").write_text(yaml.safe_dump({"real": real, "synthetic": synthetic}, sort_keys=False))
        save_mask_png({k: v for k, v in masks.items() if k in real.get(parts[0], {}).get("scenes", {})},
                      o / "masks_evaluation.png")
        print(f"wrote {o}/evaluation.md, evaluation.yaml, masks_evaluation.png")
