"""Runs inside the (possibly emulated) interpreter: gate each scene with a full mask, save masks + decisions.
Imports only flight (numpy, pyyaml, runtimes), so it runs in the minimal aarch64 root."""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="litert")
    ap.add_argument("scenes", nargs="+")
    a = ap.parse_args()
    from flight import CloudGate
    from flight.scenefile import read_npz_scene

    gate = CloudGate.from_model(backend=a.backend, threads=1)
    masks, summary = {}, {}
    for p in a.scenes:
        sc = read_npz_scene(p)
        m = np.empty(sc["bands"].shape[:2], np.uint8)
        d = gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], mask_out=m,
                         valid_mask=sc["valid_mask"], radiometry=sc["radiometry"])
        masks[sc["scene_id"]] = m
        summary[sc["scene_id"]] = {"action": d.action, "cloud_fraction": d.cloud_fraction, "valid_fraction": d.valid_fraction,
                                   "tiles_processed": d.tiles_processed, "machine": platform.machine()}
    out = Path(a.out)
    np.savez(out, **masks)
    out.with_suffix(".json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
