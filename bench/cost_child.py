"""python -m bench.cost_child --kind KIND --threads N --reps R --scene SCENE.npz [--s2-scene S2.npz]

One contender's cost in a fresh process (so peak RSS is its own): the median time of R runs on the
first four bands of SCENE tiled to 1024 x 1024, printed as one JSON line {s_per_mpx, peak_rss_mib}.
KIND: teacher_ukis (one CSmask call per pass, its session built each time, as the wrapper's users call it) |
teacher_ukis_session (the teacher at its best: the same ONNX session built once and reused, the same tiling,
normalisation, blending and argmax as CSmask; the median pass after warm-up is its marginal per-pixel rate) |
cloudgate:litert | cloudgate:onnxruntime | cloudgate_decision:litert (no mask_out, early exit off) |
cloudgate_workers:litert / cloudgate_decision_workers:litert (one single-threaded interpreter per thread) |
cloudgate_default:litert (the shipped defaults exactly: workers auto, early exit on, decision only) |
cloudgate_default_every_tile:litert (the same, early exit off) | cloudgate_default_mask:litert (the same with a
full-resolution mask_out) | cloudgate_half:litert / cloudgate_half_mask:litert (workers auto, every tile, the
shipped model under bench.halfcard's input_grid.downsample 2 card: NOT a validated half-resolution model) |
s2cloudless | threshold | invoke_only:litert. The workers-auto kinds at --threads 1 run pinned to one core
(auto = 1 worker). Single-worker cloudgate kinds also report where one full pass
spends its time ("stages_ms", from cProfile over 5 extra passes, so slightly inflated)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import numpy as np

from .procstat import proc_status_mib

KINDS = ("teacher_ukis", "teacher_ukis_session", "cloudgate:litert", "cloudgate:onnxruntime", "cloudgate_decision:litert",
         "cloudgate_workers:litert", "cloudgate_decision_workers:litert", "s2cloudless", "threshold", "invoke_only:litert",
         "cloudgate_default:litert", "cloudgate_default_every_tile:litert", "cloudgate_default_mask:litert",
         "cloudgate_half:litert", "cloudgate_half_mask:litert")
AUTO_KINDS = KINDS[-5:]              # workers: auto (the shipped default), pinned to --threads cores
BANDS4 = ("blue", "green", "red", "nir")
S2C_BANDS = ("coastal", "blue", "red", "rededge1", "nir", "nir08", "nir09", "cirrus", "swir16", "swir22")


def s2cloudless_mask(refl13: np.ndarray) -> np.ndarray:
    """s2cloudless 1.7.3 with its documented settings (threshold 0.4, average_over 4, dilation 2) on
    Sentinel-2 L1C reflectance. CC BY-SA 4.0: evaluation only, never a training signal."""
    from s2cloudless import S2PixelCloudDetector

    det = S2PixelCloudDetector(threshold=0.4, average_over=4, dilation_size=2, all_bands=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return det.get_cloud_masks(refl13[None].astype(np.float32))[0].astype(np.uint8)


def _invoke_only(threads: int):
    """The runtime alone on pre-quantized 256² tiles: the ceiling for the gate."""
    from ai_edge_litert.interpreter import Interpreter

    from flight.model import MODELS_DIR, default_card, load_card

    card = load_card(default_card())
    it = Interpreter(model_path=str(MODELS_DIR / card.artifacts["tflite_int8"]["file"]), num_threads=threads)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    tile = np.zeros((1, 256, 256, 4), np.int8)

    def run():
        for _ in range(16):              # 16 tiles of 256² = one 1024² scene, no overlap
            it.set_tensor(i, tile)
            it.invoke()
            it.get_tensor(o)
    return run


def _teacher_session(threads: int):
    """ukis-csmask's 4-band model at its best for a stream of scenes: CSmask's own code path (band order,
    normalisation, 256² tiles with 20 % overlap, softmax, smooth blending, argmax) on one ONNX Runtime
    session built once here and reused by every pass; only the per-scene valid-mask dilation, which is not
    part of the cloud mask, is left out."""
    import json as _json
    import warnings as _w
    from pathlib import Path as _P

    import onnxruntime
    import ukis_csmask.mask
    from ukis_csmask.mask import CSmask

    model_file = _P(ukis_csmask.mask.__file__).parent / "model_4b_l1c.onnx"   # what CSmask picks for 4 bands, L1C
    meta = _json.loads(model_file.with_suffix(".json").read_text())
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    cs = CSmask.__new__(CSmask)                          # CSmask's methods, without its per-call set-up
    cs.session = onnxruntime.InferenceSession(str(model_file), sess_options=so, providers=["CPUExecutionProvider"])
    cs.input_names = cs.session.get_inputs()[0].name
    cs.target_size, cs.batch_size = meta["data"]["target_size"], 1
    stats = meta["data"]["dataset_statistics"]

    def run(img: np.ndarray) -> np.ndarray:
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            x = CSmask.adjust_band_order(img, [b.lower() for b in BANDS4], stats["band_names"]).astype(np.float32)
            cs.img = CSmask.normalize(x, stats["img"][0], stats["img"][1])
            return cs._csm()[..., 0]
    return run


def contender(kind: str, threads: int, img: np.ndarray, s2_scene: str | None, half_card: str | None = None):
    """(run, image) for one cost kind; run() processes the whole image once."""
    if kind == "teacher_ukis":
        from ground.evaluate import teacher_mask

        return (lambda: teacher_mask(img, BANDS4, threads)), img
    if kind == "teacher_ukis_session":
        run_teacher = _teacher_session(threads)
        return (lambda: run_teacher(img)), img
    if kind in AUTO_KINDS:
        import os
        import tempfile
        from pathlib import Path

        from flight import CloudGate

        from .halfcard import write_half_grid_card

        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])   # auto: one worker per core given
        model = None
        if kind.startswith("cloudgate_half"):          # written by the parent (stamping opens both runtimes,
            model = half_card or write_half_grid_card(Path(tempfile.mkdtemp()))   # which would count in RSS)
        extra = {} if kind == "cloudgate_default:litert" else {"early_exit": {"enabled": False}}
        g = CloudGate.from_model(model, backend="litert", threads=threads, **extra)
        m = np.empty(img.shape[:2], np.uint8) if kind.endswith("_mask:litert") else None
        return (lambda: g.process(img, BANDS4, mask_out=m)), img
    if kind.startswith("cloudgate"):
        from flight import CloudGate

        # *_workers kinds: one worker per thread, each with a single-threaded interpreter (threads // workers)
        workers = threads if kind.startswith(("cloudgate_workers", "cloudgate_decision_workers")) else 1
        g = CloudGate.from_model(backend=kind.split(":")[1], threads=threads, workers=workers,
                                 early_exit={"enabled": False})
        m = np.empty(img.shape[:2], np.uint8) if kind.startswith(("cloudgate:", "cloudgate_workers:")) else None
        return (lambda: g.process(img, BANDS4, mask_out=m)), img
    if kind == "s2cloudless":        # needs the S2 L1C bands: a real eo-learn L1C scene, tiled to 1024 x 1024
        from flight.scenefile import load_npz

        if not s2_scene:
            raise SystemExit("s2cloudless needs --s2-scene (a 13-band Sentinel-2 L1C scene)")
        r13 = load_npz(s2_scene).reflectance(S2C_BANDS)
        img13 = np.ascontiguousarray(np.tile(r13, (-(-1024 // r13.shape[0]), -(-1024 // r13.shape[1]), 1))[:1024, :1024])
        return (lambda: s2cloudless_mask(img13)), img13
    if kind == "threshold":
        from .threshold import threshold_mask

        return (lambda: threshold_mask(img, BANDS4)), img
    if kind == "invoke_only:litert":
        return _invoke_only(threads), img
    raise SystemExit(f"unknown cost kind {kind!r}; choose one of {KINDS}")


# cProfile function -> stage of one tile's work (what is left is scan bookkeeping, policy and the decision)
_STAGES = {"_load_tile_hwc": "tile loading", "_load_tile_planar": "tile loading", "_pad": "tile loading",
           "Invoke": "runtime invoke", "run_with_iobinding": "runtime invoke", "__call__": "argmax (3 classes)",
           "infer": "quantize + copy into the runtime", "visit": "counting + mask_out", "check_backing_file": "tile loading"}


def stage_profile(run, passes: int) -> dict:
    """Milliseconds per pass by stage (tottime of the functions in _STAGES; the rest is 'scan, policy, decision')."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(passes):
        run()
    pr.disable()
    st = pstats.Stats(pr).stats
    total = sum(v[2] for v in st.values())
    out: dict[str, float] = {}
    for (file, _, fn), v in st.items():
        stage = _STAGES.get(fn) or next((st_ for key, st_ in _STAGES.items() if fn.startswith("<") and key in fn), None)
        if stage == "argmax (3 classes)" and "backends" not in file:
            stage = None
        if stage:
            out[stage] = out.get(stage, 0.0) + v[2]
    out["scan, policy, decision"] = total - sum(out.values())
    return {k: round(1e3 * v / passes, 2) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost_child", description=__doc__)
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--scene", required=True, help=".npz with 'bands' (H, W, >= 4) reflectance")
    ap.add_argument("--s2-scene", default=None)
    ap.add_argument("--half-card", default=None, help="cloudgate_half* kinds: bench.halfcard's card (else written here)")
    a = ap.parse_args(argv)
    with np.load(a.scene) as z:
        img = np.ascontiguousarray(np.tile(z["bands"][..., :4], (2, 2, 1)).astype(np.float32))   # 1024 x 1024
    run, img = contender(a.kind, a.threads, img, a.s2_scene, a.half_card)
    run()
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        last = run()
        times.append(time.perf_counter() - t)
    res = {"s_per_mpx": statistics.median(times) / (img.shape[0] * img.shape[1] / 1e6), "peak_rss_mib": proc_status_mib("VmHWM")}
    if hasattr(last, "tiles_processed"):                 # a gate decision: how much of the scene it inferred
        res["tiles"] = [last.tiles_processed, last.tiles_total]
    if a.kind.startswith("cloudgate") and "workers" not in a.kind and a.kind not in AUTO_KINDS:   # cProfile: one thread
        res["stages_ms"] = stage_profile(run, 5)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
