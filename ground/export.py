"""Export a trained student: fp32 ONNX (reference), INT8 QDQ ONNX (onnxruntime.quantization, U8S8,
per-channel, static calibration on real + synthetic tiles), full-integer INT8 TFLite (Keras twin with
BN folded + TFLiteConverter), parity checks, and the model card."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import yaml

from .calibrate import apply_cloud_bias, choose_cloud_bias, probe_views, training_part_scenes
from .distill import REPO, build_transfer_set, load_config, load_student
from .errors import ExperimentConfigError as ConfigError
from hil.synth import SYNTH_BANDS

TILE = 256
DEVELOPMENT_NOTE = (
    "Seen before this model was fixed: evaluation-part scores of the v4 model, of the ablation arms and of a "
    "first real-view KD run whose cloud-logit bias was picked on the training-part scenes. Changed afterwards: "
    "the bias is picked on probe views never trained on (the student had been fit on the training-part scenes), "
    "and a procedural snow/ice supplement (exact labels) was added for the VNIR teacher's documented snow failure. "
    "No knob was tuned on evaluation scores.")


DEVELOPMENT_NOTE_V6 = (
    "Round 3 (issue 18): the recipe (pool of every shared scene, per-band gain +-1 %, teacher terms skip labelled "
    "pixels), the KD arm and the discard guard's threshold were chosen on cross-validation by acquisition over every "
    "shared labelled scene; the shipped model then trained on all of them, so its in-sample scores are a regression "
    "guard only. Known before: the 12-scene evaluation part's scores of v4/v5 and the issue's description of the "
    "scenes kept aside (two clear snow scenes discarded, the 4-band teacher ahead); nothing was tuned on the kept-aside "
    "scenes, which no one here has seen.")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantization_tiles(ts: dict, spec, n: int = 128) -> np.ndarray:
    """Representative tiles for INT8 calibration: the first n training views of the real-view pool
    (training part of the split only), NHWC float32 in model-input order (optional bands as the view has them)."""
    idx = ts["train"][:n]
    return np.ascontiguousarray(np.stack([spec.model_input(np.asarray(ts["X"][i], np.float32), SYNTH_BANDS, ts["swir"][i])
                                          for i in idx]))


def calibrate_students(cfg: dict, students: dict, ts: dict) -> dict:
    """Cloud-logit bias per the config's `calibration.cloud_logit_bias` (auto | number | absent = 0),
    folded into every student of `students` ({"kd": (spec, model), "baseline": ...}) in place;
    returns what the model card records (see ground.calibrate)."""
    import torch

    setting = cfg.get("calibration", {}).get("cloud_logit_bias", 0.0)
    if setting != "auto":  # a fixed bias applies to every student, like the automatic rule
        chosen = {name: {"cloud_logit_bias": float(setting), "criterion": "fixed in config"} for name in students}
    else:
        def logits_fn(m):
            def run(x):
                with torch.no_grad():
                    return m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
            return run

        teachers = [t["name"] for t in cfg["teachers"]]
        chosen = {name: choose_cloud_bias(logits_fn(m), probe_views(ts, teachers, sp),
                                          check=training_part_scenes(sp)) for name, (sp, m) in students.items()}
    for name, (_, m) in students.items():
        apply_cloud_bias(m, chosen[name]["cloud_logit_bias"])
    return chosen


def export_onnx_fp32(model, spec, path: Path) -> None:
    import torch

    x = torch.zeros(1, spec.in_channels, TILE, TILE)
    torch.onnx.export(model.eval(), x, str(path), dynamo=False, opset_version=17,
                      input_names=["reflectance"], output_names=["logits"],
                      dynamic_axes={"reflectance": {2: "height", 3: "width"}, "logits": {2: "height", 3: "width"}})


def quantize_onnx(fp32: Path, int8: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, tiles):
            self.it = iter(tiles)

        def get_next(self):
            t = next(self.it, None)
            return None if t is None else {"reflectance": np.ascontiguousarray(t.transpose(2, 0, 1)[None])}

    pre = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # dynamic H/W defeats symbolic inference
    try:
        # No reduce_range: tried, it costs TFLite agreement (99.5 -> 99.2 % of pixels) and ORT's x86 and
        # ARM INT8 kernels still round a few pixels differently (hil arm-check), so it buys nothing.
        quantize_static(str(pre), str(int8), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)


def export_tflite(model, spec, path: Path, calib: np.ndarray) -> float:
    """Full-integer INT8 TFLite from the Keras twin; returns the torch-vs-Keras fp32 max logit diff."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import torch

    from .student import build_keras

    keras_model = build_keras(spec, model, TILE)
    probe = calib[:4]
    with torch.no_grad():
        ref = model(torch.from_numpy(probe.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    got = np.concatenate([keras_model(probe[i:i + 1], training=False).numpy() for i in range(len(probe))])
    parity = float(np.abs(ref - got).max())
    if parity >= 1e-4:
        raise RuntimeError(f"torch vs Keras parity failed: max logit diff {parity:.2e} >= 1e-4")

    def representative():
        for t in calib:
            yield [t[None].astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())
    return parity


def tflite_quant_params(path: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    (si, zi), (so, zo) = it.get_input_details()[0]["quantization"], it.get_output_details()[0]["quantization"]
    return {"input_scale": float(si), "input_zero_point": int(zi), "output_scale": float(so), "output_zero_point": int(zo)}


def export_artifacts(spec, model, out_dir: Path, name: str, calib: np.ndarray) -> tuple[dict, dict]:
    """fp32 ONNX + INT8 QDQ ONNX + INT8 TFLite of one (calibrated) student -> (artifacts, quant info)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8, tfl = out_dir / f"{name}.fp32.onnx", out_dir / f"{name}.int8.onnx", out_dir / f"{name}.int8.tflite"
    export_onnx_fp32(model, spec, fp32)
    quantize_onnx(fp32, int8, calib)
    parity = export_tflite(model, spec, tfl, calib)
    artifacts = {k: {"file": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}
                 for k, p in (("onnx_fp32", fp32), ("onnx_int8", int8), ("tflite_int8", tfl))}
    return artifacts, {**tflite_quant_params(tfl), "torch_vs_keras_max_logit_diff": parity, "tiles": len(calib)}


def stamp_artifacts(card_path: Path) -> dict:
    """Write the card's input/output description (bands and order, scaling, classes, tile, quantization)
    into its artifacts' own metadata (flight.modelmeta: ONNX metadata_props, TFLite metadata; the gate
    refuses a card that disagrees with it) and their new sha256 into the card. Returns the card's artifacts."""
    from flight.model import load_card
    from flight.modelmeta import stamp_card

    stamp_card(card_path)
    return load_card(card_path).raw["artifacts"]


def model_card(spec, name: str, artifacts: dict, quant: dict, default: bool, **extra) -> dict:
    """The card the gate reads (bands, scaling, classes, artifacts with sha256) plus provenance."""
    from .student import TEACHER_MACS_PER_PIXEL, TEACHER_PARAMS

    return {
        "card_version": 1,
        "name": name,
        "default": bool(default),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bands": list(spec.bands),
        **({"optional_bands": list(spec.optional_bands),
            "input_channels": list(spec.bands) + ["optional_bands_present"]} if spec.optional_bands else {}),
        "units": "TOA reflectance (Level-1C), float, nominal 0..1; DN must be rescaled (reflectance = DN*scale + offset)",
        "input_scaling": {"onnx": f"float32 reflectance, NCHW (1, {spec.in_channels}, H, W); INT8 QDQ quantization inside the graph",
                          "tflite": {"layout": "NHWC", "dtype": "int8", "scale": quant["input_scale"],
                                     "zero_point": quant["input_zero_point"],
                                     "rule": "q = clip(round(reflectance / scale) + zero_point, -128, 127)"}},
        "output": {"classes": list(spec.classes), "codes": {"clear": 0, "cloud": 1, "shadow": 2},
                   "tflite": {"dtype": "int8", "scale": quant["output_scale"], "zero_point": quant["output_zero_point"]},
                   "onnx": "float32 logits (1, 3, H, W)"},
        "tile": TILE,
        "stem_stride": spec.stem_stride,
        "spec": spec.to_dict(),
        "parameters": spec.parameters(),
        "macs_per_pixel": round(spec.macs_per_pixel(), 1),
        "teacher_ratio": {"parameters": round(TEACHER_PARAMS / spec.parameters(), 1),
                          "macs_per_pixel": round(TEACHER_MACS_PER_PIXEL / spec.macs_per_pixel(), 1)},
        "quantization": {"onnx": "onnxruntime.quantization.quantize_static QDQ, per-channel, activations uint8, "
                                 "weights int8 (U8S8), MinMax calibration",
                         "tflite": "TFLiteConverter full-integer (TFLITE_BUILTINS_INT8), representative dataset",
                         "calibration": f"{quant['tiles']} real training-part views of the transfer pool",
                         "torch_vs_keras_max_logit_diff": quant["torch_vs_keras_max_logit_diff"]},
        "artifacts": artifacts,
        **extra,
    }


def export_all(student_pt, config_path, out_dir: Path, baseline=None, default: bool = False,
               training: dict | None = None) -> dict:
    """Calibrate, export and card the KD student (and the no-KD baseline as its own carded model), then
    score both through CloudGate on the real split; the scores go into the card."""
    from .evaluate import evaluate_card
    from .split import SPLIT_FILE, load_split

    cfg = load_config(config_path)
    spec, model = load_student(student_pt)
    if spec.input_downsample != 1:
        raise ConfigError(f"{student_pt}: a half-resolution student (input_downsample {spec.input_downsample}) cannot be "
                          "exported here yet: the card must declare input_grid and the INT8 calibration must see the "
                          "averaged grid (ground/judge/runs.py does both for the judge's ONNX); export a full-resolution student")
    students = {"kd": (spec, model), **({"baseline": load_student(baseline)} if baseline else {})}
    ts = build_transfer_set(cfg)
    calibration = calibrate_students(cfg, students, ts)
    name = spec.name
    calib = quantization_tiles(ts, spec)
    teachers = [{"name": t["name"], "package": "ukis-csmask==1.0.0", "model": f"model_{t['kind']}_{t.get('level', 'l1c')}.onnx",
                 "license": "Apache-2.0"} for t in cfg["teachers"]]
    split = load_split()
    every_scene = cfg["pool"].get("sources", "training") == "all"
    if every_scene:   # round 3: chosen by cross-validation, then trained on every shared labelled scene
        from .cv.folds import FOLDS_FILE, load_folds

        data = {"selection": "cross-validation by acquisition over every shared labelled scene "
                             "(python -m ground cv run / report; docs/results/cv.md)",
                "folds_file": str(FOLDS_FILE.relative_to(REPO)),
                "trained_or_calibrated_on": {"labelled_scenes": sorted(s for f in load_folds() for s in f),
                                             "transfer_pool_sources": ts["meta"]["sources"],
                                             "transfer_pool_key": ts["key"]},
                "disclosure": DEVELOPMENT_NOTE_V6}
    else:
        data = {"split_file": str(SPLIT_FILE.relative_to(REPO)), "evaluation_part": split["evaluation"],
                "trained_or_calibrated_on": {"labelled_training_part": split["training"],
                                             "transfer_pool_sources": ts["meta"]["sources"],
                                             "transfer_pool_key": ts["key"]},
                "disclosure": DEVELOPMENT_NOTE}
    command = ("python -m ground make-models --config " + str(Path(config_path).resolve().relative_to(REPO))
               if Path(config_path).resolve().is_relative_to(REPO) else " ".join(shlex.quote(a) for a in sys.argv))
    base_card = None
    if baseline:  # its own carded model: scored through the gate like the student; flight never defaults to it
        bspec, bmodel = students["baseline"]
        bname = f"{name}-nokd"
        b_art, b_q = export_artifacts(bspec, bmodel, out_dir, bname, quantization_tiles(ts, bspec))
        base_card = out_dir / f"{bname}.yaml"
        base_card.write_text(yaml.safe_dump(model_card(bspec, bname, b_art, b_q, False, role="no-KD baseline (labels only)",
                                                       calibration=calibration["baseline"], data=data, command=command),
                                            sort_keys=False, width=120))
        stamp_artifacts(base_card)
    artifacts, quant = export_artifacts(spec, model, out_dir, name, calib)
    card = model_card(spec, name, artifacts, quant, default, calibration=calibration, teachers=teachers, data=data,
                      training=training or {}, command=command,
                      config={k: v for k, v in cfg.items() if not k.startswith("_")},
                      **({"baseline_card": base_card.name} if base_card else {}))
    card_path = out_dir / f"{name}.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False, width=120))
    card["artifacts"] = stamp_artifacts(card_path)
    if every_scene:
        # the teachers' rows are in the CV table (same arrays); in-sample they would compare nothing new
        real, synthetic, _ = evaluate_card(card_path, parts=("all",), with_teachers=False)
        card["metrics"] = {"method": "CloudGate.process(mask_out=...) on the shipped artifacts; teachers via CSmask; "
                                     "python -m ground evaluate --model " + str(card_path),
                           "real_in_sample": real["all"]["summary"],
                           "real_in_sample_note": "every labelled scene trained this model: a regression guard, not "
                                                  "evidence of generalisation (that is the CV table, cv_selection)",
                           "real_in_sample_scenes": real["all"]["scenes"],
                           "synthetic": synthetic}
        cv_json = REPO / "docs" / "results" / "cv.json"
        if cv_json.exists():
            import json

            cvr = json.loads(cv_json.read_text())
            card["cv_selection"] = {"report": "docs/results/cv.md", "arm": cfg.get("arm"),
                                    "arms": {a: {k: v for k, v in e.items() if k != "per_seed"} for a, e in cvr["arms"].items()},
                                    "references": cvr["references"], "paired": cvr.get("paired", {})}
    else:
        real, synthetic, _ = evaluate_card(card_path)
        card["metrics"] = {"method": "CloudGate.process(mask_out=...) on the shipped artifacts; teachers via CSmask; "
                                     "python -m ground evaluate --model " + str(card_path),
                           "real_evaluation_part": real["evaluation"]["summary"],
                           "real_training_part": real["training"]["summary"],
                           "real_evaluation_scenes": real["evaluation"]["scenes"],
                           "synthetic": synthetic}
    card_path.write_text(yaml.safe_dump(card, sort_keys=False, width=120))
    return {"card": str(card_path), **{k: v["file"] for k, v in artifacts.items()},
            "ships_with_cv_table": bool(every_scene and "cv_selection" in card
                                        and Path(out_dir).resolve() == (REPO / "models").resolve())}
