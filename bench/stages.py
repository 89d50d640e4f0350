"""python -m bench.stages [--reps 5] [--out bench/results]

Where one tile's time goes on the shipped LiteRT INT8 path, at 1 and 2 workers, full resolution and the
half grid (bench.halfcard: the shipped model under a card declaring input_grid.downsample 2 -- the flight
path's speed, NOT a validated half-resolution model). One process, one machine, configurations measured
back to back on the same 1024² real scene (the ukis S2 tile, first four bands, tiled 2x2, as bench.cost_child).

Each worker's stages are timed with perf_counter around the gate's own calls (no cProfile, so no
per-call inflation and both threads are seen):
  2x2 mean          HalfGrid.fill (half grid only): the 2x2 block means of the (2T)² window
  load + validity   TileLoader.load: scale to model units, NaN/no-data/valid_mask, plausibility, clip
  dark sample       TileLoader.count_bright (every 8th pixel)
  quantize + copy   backend.infer minus invoke and argmax: round to int8 into the interpreter's input
  invoke            the interpreter's invoke()
  argmax            the 3-class argmax on the int8 output
  count + mask_out  the rest of TileWorker.visit: cloud/shadow/valid counts, mask_out core (upsampled)
Stage figures are thread-milliseconds per scene megapixel (summed over the workers, so with 2 workers
they may add up to more than the wall time); 'wall' is the end-to-end process() time per megapixel.
Writes <date>-stages.json and .md."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BANDS4 = ("blue", "green", "red", "nir")
STAGES = ("2x2 mean", "load + validity", "dark sample", "quantize + copy", "invoke", "argmax", "count + mask_out")


def host_cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn, acc: dict, key: str):
    def run(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
    return run


def instrument(gate) -> list[dict]:
    """Wrap every worker's stage calls (after the first scene bound them); one accumulator per worker."""
    accs = []
    for wk in gate._scanner.workers:
        acc: dict = {}
        b = wk.backend
        wk.loader.load = _timed(wk.loader.load, acc, "load + validity")
        wk.loader.count_bright = _timed(wk.loader.count_bright, acc, "dark sample")
        if wk.half is not None:
            wk.half.fill = _timed(wk.half.fill, acc, "2x2 mean")
        b.it.invoke = _timed(b.it.invoke, acc, "invoke")
        b._argmax = _timed(b._argmax, acc, "argmax")
        b.infer = _timed(b.infer, acc, "_infer")
        wk.visit = _timed(wk.visit, acc, "_visit")
        accs.append(acc)
    return accs


def profile(card, workers: int, mask: bool, img: np.ndarray, reps: int) -> dict:
    from flight import CloudGate

    g = CloudGate.from_model(card, backend="litert", workers=workers, threads=workers, early_exit={"enabled": False})
    m = np.empty(img.shape[:2], np.uint8) if mask else None
    g.process(img, BANDS4, mask_out=m)                   # warm-up (binds the workers)
    accs = instrument(g)
    walls = []
    for _ in range(reps):
        t = time.perf_counter()
        d = g.process(img, BANDS4, mask_out=m)
        walls.append(time.perf_counter() - t)
    g.close()
    mpx = img.shape[0] * img.shape[1] / 1e6
    tot: dict = {}
    for acc in accs:
        for k, v in acc.items():
            tot[k] = tot.get(k, 0.0) + v
    st = {k: tot.get(k, 0.0) for k in STAGES}
    st["quantize + copy"] = tot.get("_infer", 0.0) - st["invoke"] - st["argmax"]
    st["count + mask_out"] = (tot.get("_visit", 0.0) - tot.get("_infer", 0.0) - st["load + validity"]
                              - st["dark sample"] - st["2x2 mean"])
    per = {k: round(1e3 * v / reps / mpx, 2) for k, v in st.items()}
    wall = statistics.median(walls)
    return {"workers": workers, "grid": "half" if g.card.downsample == 2 else "full", "mask_out": mask,
            "tiles": d.tiles_total, "wall_ms_per_mpx": round(1e3 * wall / mpx, 2), "mpx_per_s": round(mpx / wall, 2),
            "stages_thread_ms_per_mpx": per,
            "serial_ms_per_mpx": round(1e3 * wall / mpx - sum(per.values()) / workers, 2)}


def markdown(res: dict) -> str:
    L = [f"# Hot-path stage profile {res['stamp']}", "", f"Command: `{res['command']}` on {res['host']}. "
         f"Host 1-minute load average at start / end: {res['load_avg'][0]} / {res['load_avg'][1]} (other jobs shared "
         "these cores: compare rows of this run with each other, not with other runs).", "",
         "Scene: " + res["scene"] + ". Stage columns: thread-milliseconds per scene megapixel, summed over the "
         "workers (bench/stages.py explains each stage). Half grid rows: " + res["half_grid_note"] + ".", "",
         "| grid | workers | mask_out | wall ms/Mpx | Mpx/s | " + " | ".join(STAGES) + " |",
         "|---|---|---|---|---|" + "---|" * len(STAGES)]
    for r in res["rows"]:
        s = r["stages_thread_ms_per_mpx"]
        L.append(f"| {r['grid']} | {r['workers']} | {'yes' if r['mask_out'] else 'no'} | {r['wall_ms_per_mpx']} | "
                 f"{r['mpx_per_s']} | " + " | ".join(str(s[k]) if r["grid"] == "half" or k != "2x2 mean" else "—"
                                                   for k in STAGES) + " |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    from hil.paths import SHARED_REAL

    from .halfcard import NOT_VALIDATED, write_half_grid_card

    scene = SHARED_REAL / "ukis_csmask_tests/ukis_sentinel2.npz"
    with np.load(scene) as z:
        img = np.ascontiguousarray(np.tile(z["bands"][..., :4], (2, 2, 1)).astype(np.float32))
    half = write_half_grid_card(Path(tempfile.mkdtemp()))
    load0 = round(os.getloadavg()[0], 2)
    rows = []
    for card in (None, half):
        for workers in (1, 2):
            for mask in (False, True):
                rows.append(profile(card, workers, mask, img, a.reps))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    import ai_edge_litert

    res = {"stamp": dt.date.today().isoformat(), "command": f"python -m bench.stages --reps {a.reps}",
           "host": f"{host_cpu()}, {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}, "
                   f"numpy {np.__version__}, ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}",
           "scene": f"{img.shape[0]}x{img.shape[1]} float32 reflectance ({scene.name}, first 4 bands, tiled 2x2)",
           "half_grid_note": NOT_VALIDATED, "load_avg": [load0, round(os.getloadavg()[0], 2)], "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{res['stamp']}-stages.json").write_text(json.dumps(res, indent=1))
    (out / f"{res['stamp']}-stages.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
