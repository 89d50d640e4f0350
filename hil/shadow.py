"""HIL shadow-mode run: a candidate model runs beside the active one on the next N frames of the campaign
stream before it may gate (flight.shadow), through the real store and CLI.

    python -m hil.shadow --board myriad-x --backend litert --frames 24 --min-agreement 0.95 --out DIR \
        [--report docs/results/update_shadow]

A model store with the default model (model_version 2) active and a gate gating the campaign stream
(in this process, with the board's threads), with a ShadowMonitor on its output. Two candidates, each
installed (staged) with `python -m flight model install`, then:

  agreeing    the default model repacked as model_version 3 (same weights): it must be activated
  differing   the other carded model in models/ (model_version 4): it runs in shadow; if its action
              agreement with the active model on these frames is under --min-agreement it must be held
              back (exit 1, model_shadow_held), its disagreement logged

For each: `activate --shadow-frames N --min-agreement x` before the shadow run (must exit 1: no shadow run
yet), then the shadow run (N frames; model_shadow events in STORE/journal.jsonl), then the activation again.
Requirements: the agreeing candidate is activated (exit 0), a differing one below the bar is held (exit 1),
every shadow frame logged, the active gate's decisions all made by the active package during the shadow run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .boards import load_board
from .paths import REPO


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flight", "model", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def run(board_name: str, backend: str, frames: int, min_agreement: float, out: Path) -> dict:
    import shutil

    from flight import CloudGate
    from flight.model import default_card
    from flight.package import load_key, pack, write_key
    from flight.shadow import ShadowMonitor, read_shadow
    from flight.slots import ModelStore

    from .streams import load_item, load_stream
    from .update import differing_card

    board = load_board(board_name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_key(out / "mission.key")
    key = load_key(out / "mission.key")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CLOUDGATE_MISSION_KEY", None)
    k = ["--store", out / "store", "--key", out / "mission.key", "--backend", backend]
    active = pack(default_card(), key, out / "active.cgpkg", model_version=2)
    cands = {"agreeing": pack(default_card(), key, out / "agreeing.cgpkg", model_version=3)}
    cands["differing"] = pack(differing_card(out / "cloud-biased"), key, out / "differing.cgpkg", model_version=4)
    r = _cli("install", out / "active.cgpkg", *k, "--activate", env=env)
    if r.returncode:
        raise RuntimeError(f"initial install failed: {r.stderr}")
    store = ModelStore(out / "store", key)
    _, items = load_stream(str(REPO / "hil/streams/campaign.yaml"))
    scenes = [load_item(it) for it in items]
    threads = min(board.threads, os.cpu_count() or 1)
    gate = CloudGate.from_model(backend=backend, threads=threads, update={"store": str(store.root),
                                "key": str(out / "mission.key"), "bist_every": 0},
                                log={"path": str(out / "decisions.jsonl")})
    results, i = [], 0
    try:
        for name, pkg in cands.items():
            rec = {"candidate": name, "model": pkg.name, "model_version": pkg.card.raw["model_version"],
                   "package_sha256": pkg.sha256}
            r = _cli("install", out / f"{name}.cgpkg", *k, env=env)
            rec["install_rc"] = r.returncode
            before = store.read_pointer()
            r = _cli("activate", *k, "--shadow-frames", frames, "--min-agreement", min_agreement, env=env)
            rec["activate_before_shadow_rc"], rec["activate_before_shadow"] = r.returncode, r.stderr.strip()[-300:]
            monitor = ShadowMonitor(store, out / "mission.key", frames, gate_options={"backend": backend, "threads": threads})
            compared, by_active, t0 = [], [], time.monotonic()
            while len(compared) < frames and i < 20 * len(scenes) * max(1, frames):
                s = scenes[i % len(scenes)]
                i += 1
                mask = np.empty(s["bands"].shape[:2], np.uint8)
                d = gate.process(s["bands"], s["band_names"], scene_id=s["scene_id"], valid_mask=s.get("valid_mask"),
                                 mask_out=mask)
                by_active.append(d.package_sha256 == before.package_sha256)
                c = monitor.observe(s["bands"], s["band_names"], d, active_mask=mask, scene_id=s["scene_id"],
                                    valid_mask=s.get("valid_mask"))
                if c is not None:
                    compared.append(dict(c, scene_id=s["scene_id"]))
            monitor.close()
            rec["shadow_s"] = round(time.monotonic() - t0, 1)
            rec["shadow"] = read_shadow(store, _staged_slot(store, pkg.sha256))
            rec["frames"] = compared
            rec["gated_by_active_during_shadow"] = all(by_active)
            r = _cli("activate", *k, "--shadow-frames", frames, "--min-agreement", min_agreement, env=env)
            rec["activate_rc"], rec["activate_msg"] = r.returncode, (r.stderr or r.stdout).strip()[-300:]
            after = store.read_pointer()
            rec["activated"] = after.package_sha256 == pkg.sha256
            sh = rec["shadow"] or {}
            below = sh.get("action_agreement", 0) < min_agreement
            rec["expected"] = "held" if (name == "differing" and below) else "activated"
            rec["as_expected"] = (rec["install_rc"] == 0 and rec["activate_before_shadow_rc"] == 1
                                  and sh.get("frames") == frames and rec["gated_by_active_during_shadow"]
                                  and ((rec["activate_rc"] == 1 and not rec["activated"]) if rec["expected"] == "held"
                                       else (rec["activate_rc"] == 0 and rec["activated"])))
            results.append(rec)
            if rec["activated"]:                          # the next candidate runs beside the new active model
                d = gate.process(scenes[0]["bands"], scenes[0]["band_names"], valid_mask=scenes[0].get("valid_mask"))
    finally:
        gate.close()
    from flight.decisionlog import read_log

    journal = read_log(store.root / "journal.jsonl").records
    ev = Counter(r.get("event") for r in journal)
    rep = {"board": board.name, "backend": backend, "frames": frames, "min_agreement": min_agreement,
           "candidates": results, "journal_events": dict(ev),
           "passed": bool(results) and all(r["as_expected"] for r in results)
           and ev.get("model_shadow", 0) >= frames * len(results)}
    (out / "shadow_report.json").write_text(json.dumps(rep, indent=1, default=str))
    return rep


def _staged_slot(store, sha: str) -> str:
    from flight.errors import ModelError
    from flight.package import open_package

    for s in ("a", "b"):
        try:
            if open_package(store.package_path(s), store.key, store.max_bytes).sha256 == sha:
                return s
        except ModelError:
            pass
    return "a"


def markdown(rep: dict, command: str) -> str:
    L = ["# HIL shadow-mode run", "", f"Command: `{command}`", "",
         f"Board {rep['board']} ({rep['backend']}), the campaign stream. The default model (model_version 2) is "
         "active and gates every frame; each candidate is installed (staged, `python -m flight model install`), "
         f"runs beside it on the next {rep['frames']} frames (flight.shadow.ShadowMonitor; one `model_shadow` event "
         "per frame in STORE/journal.jsonl), and is then activated with `python -m flight model activate "
         f"--shadow-frames {rep['frames']} --min-agreement {rep['min_agreement']}`.", "",
         f"Result: **{'PASS' if rep['passed'] else 'FAIL'}**", "",
         "| candidate | model | model_version | activate before the shadow run | shadow frames | action agreement | "
         "mean abs cloud-fraction diff | pixel agreement | activate after | outcome | as expected |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["candidates"]:
        sh = r.get("shadow") or {}
        L.append(f"| {r['candidate']} | {r['model']} | {r['model_version']} | exit {r['activate_before_shadow_rc']} | "
                 f"{sh.get('frames')} | {sh.get('action_agreement')} | {sh.get('mean_abs_cf_diff')} | "
                 f"{sh.get('pixel_agreement')} | exit {r['activate_rc']} | "
                 f"{'activated' if r['activated'] else 'held back'} | {'yes' if r['as_expected'] else '**no**'} |")
    for r in rep["candidates"]:
        dis = [f for f in r["frames"] if not f["agree"]]
        L += ["", f"{r['candidate']}: {len(dis)} of {len(r['frames'])} shadow frames disagree on the action"
              + (": " + "; ".join(f"{f['scene_id']} active {f['active']} / candidate {f['candidate']} "
                                  f"(|cf diff| {f['cf_diff']:.3f}, pixels {f.get('pixel_agreement')})"
                                  for f in dis[:8]) if dis else "") + f". Activation message: `{r['activate_msg']}`"]
    L += ["", f"Journal events: {rep['journal_events']}"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil.shadow")
    ap.add_argument("--board", default="myriad-x", help="board profile (threads)")
    ap.add_argument("--backend", default="litert", choices=["litert", "onnxruntime"])
    ap.add_argument("--frames", type=int, default=24, help="shadow frames per candidate")
    ap.add_argument("--min-agreement", type=float, default=0.95, help="action agreement needed to activate")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", help="also write Markdown + JSON here (e.g. docs/results/update_shadow)")
    a = ap.parse_args(argv)
    rep = run(a.board, a.backend, a.frames, a.min_agreement, Path(a.out))
    md = markdown(rep, "python -m hil.shadow " + " ".join(sys.argv[1:] if argv is None else argv))
    (Path(a.out) / "shadow_report.md").write_text(md)
    if a.report:
        Path(a.report + ".md").write_text(md)
        Path(a.report + ".json").write_text(json.dumps(rep, indent=1, default=str))
    print(md)
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
