"""python -m bench.memmap_child --path SCENE.npy [--early-exit] [--workers N|auto]

The gate's resident memory on a uint16 (H, W, 4) memmap scene (DN, reflectance = DN x 1e-4), decision
only, in a fresh process: one JSON line {baseline_rss_mib, peak_rss_mib, seconds, action, tiles,
cloud_fraction}. The baseline is taken after a warm-up frame, and the peak counter reset there."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .procstat import proc_status_mib

BANDS4 = ("blue", "green", "red", "nir")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memmap_child", description=__doc__)
    ap.add_argument("--path", required=True, help=".npy uint16 (H, W, 4)")
    ap.add_argument("--early-exit", action="store_true")
    ap.add_argument("--workers", default="1", help="tile workers: 1, 2, ... or auto (every usable core)")
    a = ap.parse_args(argv)
    from flight import CloudGate

    workers = a.workers if a.workers == "auto" else int(a.workers)
    g = CloudGate.from_model(backend="litert", threads=2, max_tiles=4096, workers=workers,
                             early_exit={"enabled": a.early_exit})
    g.process(np.full((256, 256, 4), 1000, np.uint16), BANDS4, radiometry=(1e-4, 0.0))   # warm-up
    scene = np.load(a.path, mmap_mode="r")
    base = proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # reset the peak (VmHWM) to the current RSS
    t = time.perf_counter()
    d = g.process(scene, BANDS4, radiometry=(1e-4, 0.0))
    el = time.perf_counter() - t
    print(json.dumps({"baseline_rss_mib": base, "peak_rss_mib": proc_status_mib("VmHWM"), "seconds": el,
                      "action": d.action, "tiles": [d.tiles_processed, d.tiles_total], "workers": g.workers,
                      "cloud_fraction": d.cloud_fraction}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
