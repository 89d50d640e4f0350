"""HIL update campaign: in-orbit model updates with faults, while the payload loop keeps gating.

    python -m hil update --board jetson-nano --board myriad-x --updates 100 --out DIR [--seed S]

Per board: a model store (flight.slots) with the default model installed and active; a gate process
(`python -m hil.update child`, the payload loop under the board's memory limit, update.store = the store,
self-test before every frame) gating the campaign stream continuously; and a sequence of updates, each
drawn from UPDATE_FAULTS, run through the real installer (`python -m flight model install --activate`,
or hil.update op for the kills, which SIGKILLs itself at a chosen phase of the install or the switch):

  none            a good package of the other model (a real switch: v1 <-> v2)
  corrupt_package bit flips anywhere in a good package
  wrong_key       a good package signed with another mission key
  truncated       an upload cut short
  kill_install    kill -9 at a random phase of the install (verify, write, fsync, rename, self-test...)
  kill_switch     install completes, kill -9 at a random phase of the pointer switch
  bist_mismatch   signed and consistent, but its golden results are another model's
  card_mismatch   signed, but its card does not fit the model (a band fewer, other quantization scale,
                  other classes)
  weight_upset    bit flips in the weights the running gate's runtime executes (hil.faults)
  disk_full       the store's file system is full: either no room for the package plus the log margin
                  (refused before writing) or ENOSPC in the middle of the slot write (hil.update op
                  --no-space): exit 4, nothing changed, no temporary file left
  replay          an older signed package (a lower model_version than the store has activated): exit 1
  stale_pointer   a good package installed but not activated, then the active pointer damaged: the
                  store's fallback (and the gate) must keep the activated model, never the staged one;
                  the operator then re-activates the running slot (exit 0) to rewrite the pointer
  rotten_active   the active slot's file rots on disk (bit flips), then an install: a good package goes
                  into the rotten slot and is activated; a refused one (card mismatch) leaves both slots
                  as they were, and the operator's rollback to the previous slot (exit 0) restores a
                  verified pointer. The previous model is never touched

After every update the parent checks the invariants: the active pointer names a slot whose package
verifies (signature, card <-> model, self-test on the board's backend) and is one of the good packages;
good updates switched, refused ones changed nothing, killed ones left the old or the new model; the
gate follows. At the end: every decision was made by a good signed package, the gate never crashed, no
acknowledged log record was lost. Report: OUT/update_report.{json,md} (and one per board).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .boards import load_board
from .streams import REPO

UPDATE_FAULTS = ("none", "corrupt_package", "wrong_key", "truncated", "kill_install", "kill_switch",
                 "bist_mismatch", "card_mismatch", "weight_upset", "disk_full", "replay", "stale_pointer",
                 "rotten_active")
_WEIGHTS = {"none": 3.0, "weight_upset": 1.5}          # relative draw weights (others 1.0)
INSTALL_PHASES = ("verify_upload", "write_slot", "write_tmp", "write_tmp_partial", "fsync_tmp", "rename",
                  "fsync_dir", "written", "verify_slot", "installed")
SWITCH_PHASES = ("verify_slot", "pointer_write", "pointer_partial", "pointer_fsync", "pointer_rename",
                 "pointer_fsync_dir", "pointer_done")
_EXPECT_REFUSED = {"corrupt_package", "wrong_key", "truncated", "bist_mismatch", "card_mismatch", "replay"}
GOOD_VERSION = 2                                        # model_version of the good packages; the replay is older


# ---------------------------------------------------------------- packages for the campaign (ground side)
def _second_card():
    from flight.errors import ModelError
    from flight.model import MODELS_DIR, default_card, load_card

    d = default_card()
    for p in sorted(MODELS_DIR.glob("*.yaml")):
        if p == d:
            continue
        try:
            c = load_card(p)
        except ModelError:
            continue
        if all(k in c.artifacts for k in ("tflite_int8", "onnx_int8")):
            return p
    return d


def cloud_biased_card(work: Path, shift: float = 4.0) -> Path:
    """A copy of the default card whose INT8 models (TFLite and ONNX) add `shift` to the cloud logit of the
    output layer: a consistent, signable candidate that calls more cloud than the shipped model, for shadow
    mode's hold-back path (the repository ships one model since v6). Only the output layer's cloud bias
    changes; the card's sha256 / bytes entries follow the edited files, the models' own metadata is kept."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from flight.model import default_card, load_card

    src = default_card()
    card = load_card(src)
    cloud = list(card.raw["output"]["classes"]).index("cloud")
    work.mkdir(parents=True, exist_ok=True)
    text = src.read_text()
    for key, entry in card.artifacts.items():
        data = (src.parent / entry["file"]).read_bytes()
        if key == "onnx_int8":
            m = onnx.load_from_string(data)
            inits = {i.name: i for i in m.graph.initializer}
            head = next(n for n in reversed(m.graph.node) if n.op_type == "Conv")       # the output layer
            deq = next((n for n in m.graph.node if n.op_type == "DequantizeLinear" and head.input[2] in n.output), None)
            name, step = head.input[2], 1.0                  # a float bias, or (QDQ) an int32 one and its scale
            if deq is not None:
                name = deq.input[0]
                sc = numpy_helper.to_array(inits[deq.input[1]]).ravel()
                step = float(sc[cloud] if sc.size > 1 else sc[0])
            b = numpy_helper.to_array(inits[name]).copy()
            b[cloud] += type(b.flat[0])(round(shift / step) if deq is not None else shift)
            inits[name].CopyFrom(numpy_helper.from_array(b, name))
            data = m.SerializeToString()
        elif key == "tflite_int8":
            from ai_edge_litert.interpreter import Interpreter

            it = Interpreter(model_content=data)
            it.allocate_tensors()
            conv = [o for o in it._get_ops_details() if o["op_name"] == "CONV_2D"][-1]
            det = next(t for t in it.get_tensor_details() if t["index"] == conv["inputs"][2])
            old = it.get_tensor(det["index"]).astype("<i4")
            scale = det["quantization_parameters"]["scales"]
            new = old.copy()
            new[cloud] += int(round(shift / float(scale[cloud] if len(scale) > 1 else scale[0])))
            if data.count(old.tobytes()) != 1:
                raise RuntimeError("the output layer's bias is not a unique byte string in the TFLite file")
            data = data.replace(old.tobytes(), new.tobytes())
        (work / entry["file"]).write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        text = text.replace(entry["sha256"], sha)
        if entry.get("bytes") is not None:
            text = text.replace(f"file: {entry['file']}\n    sha256: {sha}\n    bytes: {entry['bytes']}\n",
                                f"file: {entry['file']}\n    sha256: {sha}\n    bytes: {len(data)}\n")
    out = work / src.name
    out.write_text(text)
    load_card(out)                                       # the edited card still parses and names its files
    for key, entry in load_card(out).artifacts.items():
        if hashlib.sha256((work / entry["file"]).read_bytes()).hexdigest() != entry["sha256"]:
            raise RuntimeError(f"{out}: the sha256 of {key} was not updated")
    return out


def differing_card(work: Path) -> Path:
    """A model that decides differently from the default: another carded model in models/ when there is
    one, else the default with its cloud logit biased (cloud_biased_card, written under work)."""
    from flight.model import default_card

    second = _second_card()
    return second if second != default_card() else cloud_biased_card(work)


def make_packages(work: Path, key: bytes, backend: str) -> dict:
    """Good v1 / v2 (the default card and another carded model), a foreign-key one, a golden-mismatch one
    and signed-but-inconsistent cards; the per-update corruptions are derived at draw time."""
    import yaml

    from flight.model import default_card
    from flight.package import assemble, pack

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    p1 = pack(default_card(), key, work / "v1.cgpkg", model_version=GOOD_VERSION)
    p2 = pack(_second_card(), key, work / "v2.cgpkg", model_version=GOOD_VERSION)
    out["good"] = [work / "v1.cgpkg", work / "v2.cgpkg"]
    pack(default_card(), key, work / "replay.cgpkg", model_version=GOOD_VERSION - 1)
    out["replay"] = work / "replay.cgpkg"
    pack(default_card(), os.urandom(32), work / "foreign.cgpkg")
    out["wrong_key"] = work / "foreign.cgpkg"
    golden = json.loads(json.dumps(p1.golden))
    if p2.artifacts != p1.artifacts:
        golden["expected"] = json.loads(json.dumps(p2.golden["expected"]))
    else:                                               # one model only: expected results of another tile set
        for e in golden["expected"].values():
            e["tiles"] = e["tiles"][1:] + e["tiles"][:1]
    card_bytes = yaml.safe_dump(p1.card.raw, sort_keys=False).encode()
    (work / "bist_mismatch.cgpkg").write_bytes(assemble(card_bytes, p1.artifacts, golden, p1.golden_blobs, key))
    out["bist_mismatch"] = work / "bist_mismatch.cgpkg"
    out["card_mismatch"] = []
    raw = p1.card.raw
    fewer = dict(raw, bands=list(raw["bands"][:-1]), optional_bands=[b for b in raw.get("optional_bands") or []
                                                                        if b in raw["bands"][:-1]] or [])
    g_fewer = dict(p1.golden, shape=[len(fewer["bands"]) + (1 if fewer["optional_bands"] else 0), p1.card.tile,
                                     p1.card.tile])
    variants = [("fewer_bands", fewer, g_fewer)]
    scale = json.loads(json.dumps(raw))
    scale["input_scaling"]["tflite"]["scale"] = float(scale["input_scaling"]["tflite"]["scale"]) * 1.25
    scale["output"]["tflite"]["scale"] = float(scale["output"]["tflite"]["scale"]) * 0.8
    variants.append(("quant_scale", scale, p1.golden))
    classes = json.loads(json.dumps(raw))
    classes["output"]["classes"] = ["clear", "cloud", "shadow", "snow"]
    variants.append(("classes", classes, p1.golden))
    for name, r, g in variants:
        f = work / f"card_{name}.cgpkg"
        f.write_bytes(assemble(yaml.safe_dump(r, sort_keys=False).encode(), p1.artifacts, g, p1.golden_blobs, key))
        out["card_mismatch"].append(f)
    out["sha"] = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in out["good"]}
    out["artifact_sha"] = sorted({c.artifacts[k]["sha256"] for c in (p1.card, p2.card) for k in ("tflite_int8", "onnx_int8")})
    out["sizes"] = {p.name: p.stat().st_size for p in out["good"]}
    return out


# ---------------------------------------------------------------- the installer side of one update
def op_main(argv=None) -> int:
    """python -m hil.update op: install (and activate) a package; SIGKILL itself at --kill-at PHASE of
    --kill-in (install | switch). Exit 0 done, 1 refused, 2 usage."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--backend", action="append")
    ap.add_argument("--kill-in", choices=["install", "switch"])
    ap.add_argument("--kill-at")
    ap.add_argument("--no-space", choices=["precheck", "write"],
                    help="a full file system: no room before the write, or ENOSPC in the middle of it")
    a = ap.parse_args(argv)
    import errno

    from flight.errors import ModelError
    from flight.package import load_key
    from flight.slots import ModelStore, StoreFullError

    st = ModelStore(a.store, load_key(a.key), backends=tuple(a.backend) if a.backend else None)
    if a.no_space == "precheck":
        st.free_bytes = lambda: 64 << 10                   # what statvfs says on a full file system
    elif a.no_space == "write":
        real, calls = os.write, [0]

        def full(fd, data):
            calls[0] += 1
            if calls[0] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)
        os.write = full                                     # every writer of this process: the disk is full

    def hook(where):
        def step(phase):
            if a.kill_in == where and phase == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return step

    try:
        out = st.install(a.package, progress=hook("install"))
        st.activate(out["slot"], progress=hook("switch"))
    except StoreFullError as e:
        print(f"no space: {e}", file=sys.stderr)
        return 4
    except ModelError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- the payload loop (gate process)
def child_main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    a = ap.parse_args(argv)
    job = json.loads(Path(a.job).read_text())
    out = Path(job["out"])
    threads = int(job["threads"])
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:max(1, threads)])
    from flight import CloudGate

    from .child import _status_kib
    from .faults import FaultBackendFactory, FaultClock, flip_runtime_weights
    from .streams import StreamItem, load_item

    clock, backends = FaultClock(), FaultBackendFactory()
    gate = CloudGate.from_model(clock=clock, backend_factory=backends, backend=job["backend"], threads=threads,
                                workers="auto",
                                deadline_s=job["deadline_s"],
                                update={"store": job["store"], "key": job["key"], "bist_every": 1,
                                        "rollback_window": 20},
                                log={"path": str(out / "decisions.jsonl"), "fsync": "every"})
    baseline = _status_kib("VmSize")
    rss0 = _status_kib("VmRSS")
    limit = baseline * 1024 + int(job["budget_mib"] * 2**20) + int(job["frame_headroom_mib"] * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    scenes = [load_item(StreamItem(**it)) for it in job["items"]]
    rng = np.random.default_rng(job["seed"])
    control = out / "control"
    frames = open(out / "frames.jsonl", "a", buffering=1)
    i = 0
    try:
        while not (control / "stop").exists():
            req = control / "upset.json"
            if req.exists():
                r = json.loads(req.read_text())
                try:
                    flipped, err = flip_runtime_weights(backends.backend, int(r["bits"]), rng), None
                except Exception as e:                      # the injector failed, not the gate: say so
                    flipped, err = [], f"{type(e).__name__}: {e}"[:300]
                frames.write(json.dumps({"marker": "upset", "id": r["id"], "frame": i, "flipped": len(flipped),
                                         "error": err}) + "\n")
                req.unlink()
            s = scenes[i % len(scenes)]
            rec = {"frame": i, "pid": os.getpid()}
            try:
                d = gate.process(s["bands"], s["band_names"], scene_id=s["scene_id"], valid_mask=s.get("valid_mask"),
                                 priority=0, target_id=s["scene_id"])
                rec.update(action=d.action, seq=d.log_seq, fault_code=d.fault_code, rule=d.rule, scene=i % len(scenes),
                           cf=d.cloud_fraction, sf=d.shadow_fraction, vf=d.valid_fraction,
                           degraded=[e["code"] for e in d.degraded], package_sha256=d.package_sha256,
                           model_sha256=d.model_sha256, model_slot=d.model_slot, latency_s=d.latency_s,
                           vms_growth_mib=(_status_kib("VmSize") - baseline) / 1024,
                           rss_growth_mib=(_status_kib("VmHWM") - rss0) / 1024)
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                rec.update(action="crash", crash=f"{type(e).__name__}: {e}"[:500])
            frames.write(json.dumps(rec) + "\n")
            i += 1
            time.sleep(float(job["period_s"]))
    finally:
        st = gate.model_status()
        frames.write(json.dumps({"marker": "final", "status": st, "self_tests": gate.self_tests, "workers": gate.workers,
                                 "recoveries": gate.recoveries, "rollbacks": gate.rollbacks}) + "\n")
        gate.close()
        frames.close()
    return 0


# ---------------------------------------------------------------- the parent
def _frames(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass                          # a line torn by a kill
    return out


def _wait_frames(path: Path, n_more: int, proc, timeout: float = 120.0) -> None:
    start = sum(1 for f in _frames(path) if "action" in f)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if sum(1 for f in _frames(path) if "action" in f) >= start + n_more:
            return
        time.sleep(0.05)


def run_board(board_name: str, out: Path, updates: int, seed: int, backend: str, progress: bool = True) -> dict:
    from flight.decisionlog import read_log
    from flight.errors import ModelError
    from flight.model import default_card, load_card
    from flight.package import load_key, write_key
    from flight.slots import ModelStore

    from .streams import load_stream

    board = load_board(board_name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "control").mkdir()
    write_key(out / "mission.key")
    key = load_key(out / "mission.key")
    t_setup = time.monotonic()
    pk = make_packages(out / "packages", key, backend)
    store = ModelStore(out / "store", key, backends=(backend,))
    first = store.install(pk["good"][0])
    store.activate(first["slot"])
    good_sha = set(pk["sha"].values())
    _, items = load_stream(str(REPO / "hil/streams/campaign.yaml"))
    from dataclasses import asdict

    job = {"out": str(out), "store": str(out / "store"), "key": str(out / "mission.key"), "backend": backend,
           "threads": min(board.threads, os.cpu_count() or 1), "deadline_s": board.deadline_s,
           "budget_mib": board.gate_budget_mib, "frame_headroom_mib": 64 + 6 * 384 ** 2 * 16 / 2**20,
           "items": [asdict(it) for it in items], "seed": seed, "period_s": 0.02}
    (out / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CLOUDGATE_MISSION_KEY", None)
    child = subprocess.Popen([sys.executable, "-m", "hil.update", "child", "--job", str(out / "job.json")], cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=open(out / "child.stderr", "w"))
    _wait_frames(out / "frames.jsonl", 3, child, timeout=180)
    rng = np.random.default_rng(seed)
    names = list(UPDATE_FAULTS)
    w = np.array([_WEIGHTS.get(n, 1.0) for n in names])
    draws = [names[int(k)] for k in rng.choice(len(names), size=updates, p=w / w.sum())]
    need = min(2, updates // len(names))
    for c in names:                                     # every class at least twice (once, when there is room)
        while draws.count(c) < need:
            top = max(names, key=draws.count)
            draws[max(j for j, x in enumerate(draws) if x == top)] = c
    records, nxt = [], 1
    t_run = time.monotonic()
    load0 = round(os.getloadavg()[0], 2)
    for i, fault in enumerate(draws):
        before = store.read_pointer()
        rec = {"update": i, "fault": fault, "before": before.slot if before else None}
        target = pk["good"][nxt]
        cmd = None
        if fault == "weight_upset":
            req = out / "control" / "upset.json"
            bits = 256 if rng.random() < 0.15 else int(rng.integers(1, 9))      # now and then a heavy hit
            rec["bits"] = bits
            req.write_text(json.dumps({"id": i, "bits": bits}))
            t0 = time.monotonic()
            while req.exists() and child.poll() is None and time.monotonic() - t0 < 60:
                time.sleep(0.02)
            _wait_frames(out / "frames.jsonl", 2, child)
            rec["rc"] = None
        else:
            pkg = target
            rec["verifiable_before"] = _verifiable(store)
            slot_bytes = {s: _read(store.package_path(s)) for s in ("a", "b")}
            if fault == "corrupt_package":
                b = bytearray(target.read_bytes())
                for _ in range(int(rng.integers(1, 9))):
                    b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
                pkg = out / "packages" / "upload.cgpkg"
                pkg.write_bytes(bytes(b))
            elif fault == "truncated":
                b = target.read_bytes()
                pkg = out / "packages" / "upload.cgpkg"
                pkg.write_bytes(b[: int(rng.integers(1, len(b)))])
            elif fault == "wrong_key":
                pkg = pk["wrong_key"]
            elif fault == "bist_mismatch":
                pkg = pk["bist_mismatch"]
            elif fault == "card_mismatch":
                pkg = pk["card_mismatch"][int(rng.integers(len(pk["card_mismatch"])))]
                rec["variant"] = pkg.stem
            elif fault == "replay":
                pkg = pk["replay"]
            elif fault == "rotten_active" and before is not None:
                other = "b" if before.slot == "a" else "a"
                refused = other in store.runnable() and rng.random() < 0.5
                rec["variant"] = "refused_package" if refused else "good_package"
                if refused:
                    pkg = pk["card_mismatch"][0]
                b = bytearray(store.package_path(before.slot).read_bytes())
                for _ in range(int(rng.integers(1, 5))):
                    b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
                store.package_path(before.slot).write_bytes(bytes(b))      # rots on disk; no gate restarts
                slot_bytes[before.slot] = bytes(b)
                rec["verifiable_before"] = _verifiable(store)
            verifying = _verifying(store)
            install = [sys.executable, "-m", "flight", "model", "install", str(pkg), "--store", str(store.root),
                       "--key", str(out / "mission.key"), "--backend", backend]
            op = [sys.executable, "-m", "hil.update", "op", "--store", str(store.root), "--key",
                  str(out / "mission.key"), "--package", str(pkg), "--backend", backend]
            if fault in ("kill_install", "kill_switch"):
                phase = (INSTALL_PHASES if fault == "kill_install" else SWITCH_PHASES)[
                    int(rng.integers(len(INSTALL_PHASES if fault == "kill_install" else SWITCH_PHASES)))]
                rec["phase"] = phase
                cmd = op + ["--kill-in", "install" if fault == "kill_install" else "switch", "--kill-at", phase]
            elif fault == "disk_full":
                rec["variant"] = ("precheck", "write")[int(rng.integers(2))]
                cmd = op + ["--no-space", rec["variant"]]
            elif fault == "stale_pointer":
                cmd = install                                       # staged, not activated
            else:
                cmd = install + ["--activate"]
            t0 = time.monotonic()
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            rec.update(rc=r.returncode, wall_s=round(time.monotonic() - t0, 3), stderr=r.stderr.strip()[-300:])
            if fault == "stale_pointer":
                store.pointer_path.write_text('{"slot": "damaged"')          # a torn / rotten pointer
                rec["runnable"] = store.runnable()
                _wait_frames(out / "frames.jsonl", 2, child)
                tail = [f for f in _frames(out / "frames.jsonl") if "action" in f][-2:]
                rec["gate_kept_activated"] = bool(tail) and all(
                    f.get("package_sha256") == before.package_sha256 for f in tail)
                fix = subprocess.run(install[:4] + ["activate", before.slot] + install[6:], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=300)
                rec["repair_rc"] = fix.returncode
            elif fault == "rotten_active" and rec.get("variant") == "refused_package":
                fix = subprocess.run(install[:4] + ["rollback"] + install[6:], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=300)
                rec["repair_rc"] = fix.returncode
            rec["leftovers"] = [str(p.relative_to(store.root)) for p in store.root.rglob("*")
                                if p.name.endswith((".tmp", ".new"))]
            after_bytes = {s: _read(store.package_path(s)) for s in ("a", "b")}
            rec["slots_unchanged"] = after_bytes == slot_bytes
            if fault == "rotten_active":                        # every slot that verified is as it was
                rec["previous_untouched"] = all(after_bytes[s] == slot_bytes[s] for s in verifying)
            rec["verifiable_after"] = _verifiable(store)
            _wait_frames(out / "frames.jsonl", 2, child)
        after = ModelStore(store.root, key).read_pointer()
        rec["after"] = after.slot if after else None
        last = [f for f in _frames(out / "frames.jsonl") if "action" in f][-1:]
        rec["gate_on_active"] = bool(last and after and last[0].get("package_sha256") == after.package_sha256)
        rec["active_package_good"] = bool(after and after.package_sha256 in good_sha)
        try:
            pkg_a, res = ModelStore(store.root, key, backends=(backend,)).verify_slot(after.slot)
            rec["active_verified"] = pkg_a.sha256 == after.package_sha256 and all(x.passed for x in res.values())
        except (ModelError, AttributeError) as e:
            rec["active_verified"], rec["verify_error"] = False, str(e)[:300]
        switched = after is not None and before is not None and after.package_sha256 != before.package_sha256
        rec["switched"] = switched
        if fault == "none":
            rec["as_expected"] = rec["rc"] == 0 and switched and after.package_sha256 == pk["sha"][str(target)]
        elif fault in _EXPECT_REFUSED:
            rec["as_expected"] = rec["rc"] == 1 and not switched and rec["slots_unchanged"]
        elif fault in ("kill_install", "kill_switch"):
            rec["as_expected"] = rec["rc"] == -signal.SIGKILL and (not switched or (
                fault == "kill_switch" and after.package_sha256 == pk["sha"][str(target)]))
        elif fault == "disk_full":
            rec["as_expected"] = rec["rc"] == 4 and not switched and rec["slots_unchanged"] and not rec["leftovers"]
        elif fault == "stale_pointer":
            rec["as_expected"] = (rec["rc"] == 0 and rec["runnable"][:1] == [before.slot] and rec["gate_kept_activated"]
                                  and rec["repair_rc"] == 0 and not switched)
        elif fault == "rotten_active":
            if rec.get("variant") == "refused_package":
                rec["as_expected"] = (rec["rc"] == 1 and rec["previous_untouched"] and rec["repair_rc"] == 0
                                      and after.slot != before.slot)
            else:
                rec["as_expected"] = (rec["rc"] == 0 and rec["previous_untouched"]
                                      and after.package_sha256 == pk["sha"][str(target)])
        else:
            rec["as_expected"] = not switched
        if after is not None:                               # the next good update installs the other model
            nxt = 0 if after.package_sha256 == pk["sha"][str(pk["good"][1])] else 1
        records.append(rec)
        if progress and (i + 1) % 10 == 0:
            print(f"[{board.name}] update {i + 1}/{updates}", file=sys.stderr, flush=True)
    (out / "control" / "stop").write_text("")
    try:
        child.wait(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    wall = time.monotonic() - t_run
    rep = _report(board, out, records, pk, child.returncode, wall, time.monotonic() - t_setup, backend)
    rep["host_load_avg_1min"] = {"start": load0, "end": round(os.getloadavg()[0], 2)}   # how busy the host was
    return rep


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _verifying(store) -> list[str]:
    """The slots holding a package that verifies (signature, members, card)."""
    from flight.errors import ModelError
    from flight.package import open_package

    out = []
    for s in ("a", "b"):
        try:
            open_package(store.package_path(s), store.key, store.max_bytes)
            out.append(s)
        except ModelError:
            pass
    return out


def _verifiable(store) -> int:
    return len(_verifying(store))


def _pct(v, q):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def _report(board, out: Path, records: list[dict], pk: dict, child_rc, wall: float, total: float, backend: str) -> dict:
    from flight.decisionlog import read_log
    from flight.model import default_card, load_card

    frames = _frames(out / "frames.jsonl")
    decided = [f for f in frames if "action" in f]
    upsets = [f for f in frames if f.get("marker") == "upset"]
    final = next((f for f in frames if f.get("marker") == "final"), {})
    log = read_log(out / "decisions.jsonl")
    decisions = [r for r in log.records if r.get("kind") != "model_event"]
    events = [r for r in log.records if r.get("kind") == "model_event"]
    journal = read_log(out / "store" / "journal.jsonl").records
    good_sha, good_art = set(pk["sha"].values()), set(pk["artifact_sha"])
    crashes = [f for f in decided if f["action"] == "crash"]
    acked = {f["seq"] for f in decided if f.get("seq") is not None}
    logged = [r["seq"] for r in log.records]
    lost = sorted(acked - set(logged))
    dup = sorted(k for k, c in Counter(logged).items() if c > 1)
    bad_model = [f for f in decided if f["action"] != "fault" and (f.get("package_sha256") not in good_sha
                                                                     or f.get("model_sha256") not in good_art)]
    # an upset is caught when the frame right after it carries the scrub / self-test recovery event
    by_frame = {f["frame"]: f for f in decided}
    caught, gated_after = [], 0
    for u in upsets:
        if not u.get("flipped"):
            continue
        f = by_frame.get(u["frame"])
        ok = bool(f and {"model_scrub_repaired", "model_bist_recovered"} & set(f.get("degraded") or []))
        caught.append(ok)
    # every frame against the first frame of the same scene under the same model (deterministic gate): a
    # frame that differs was gated by weights that no longer compute what the verified model computes
    first, altered = {}, []
    for f in decided:
        if f["action"] in ("fault", "crash") or f.get("scene") is None:
            continue
        k = (f["scene"], f.get("model_sha256"))
        ref = first.setdefault(k, f)
        if (ref["action"], ref.get("cf"), ref.get("sf"), ref.get("vf")) != (f["action"], f.get("cf"), f.get("sf"), f.get("vf")):
            altered.append(f["frame"])
    by_class = {}
    for c in UPDATE_FAULTS:
        rs = [r for r in records if r["fault"] == c]
        by_class[c] = {"updates": len(rs), "as_expected": sum(1 for r in rs if r.get("as_expected")),
                       "switched": sum(1 for r in rs if r.get("switched")),
                       "exit_codes": dict(Counter(str(r.get("rc")) for r in rs))}
        if c in ("kill_install", "kill_switch"):
            by_class[c]["phases"] = dict(Counter(r.get("phase") for r in rs))
        if c in ("card_mismatch", "disk_full", "rotten_active"):
            by_class[c]["variants"] = dict(Counter(r.get("variant") for r in rs))
        if c == "weight_upset":
            by_class[c]["bits"] = dict(Counter(str(r.get("bits")) for r in rs))
    installs = [r for r in journal if r.get("event") == "model_install"]
    inst_s = [r["duration_s"] for r in installs]
    cli_s = [r["wall_s"] for r in records if r.get("fault") == "none" and r.get("wall_s")]
    bist_s = [r["duration_s"] for r in events if r.get("event") == "bist_pass"]
    card = load_card(default_card())
    tiles = 6
    macs = tiles * card.tile ** 2 * float(card.raw["macs_per_pixel"])
    emulated_bist = macs / (board.effective_gmacs * 1e9)
    reqs = [
        ("active model always verified", all(r.get("active_verified") for r in records),
         f"{sum(1 for r in records if r.get('active_verified'))}/{len(records)} updates left an active slot whose "
         "package verifies (signature, card <-> model, self-test)"),
        ("active model always a good package", all(r.get("active_package_good") for r in records),
         f"{sum(1 for r in records if r.get('active_package_good'))}/{len(records)}"),
        ("every update as expected", all(r.get("as_expected") for r in records),
         f"{sum(1 for r in records if r.get('as_expected'))}/{len(records)} (good: switched; bad: refused, exit 1, "
         "nothing changed; killed: old or new; disk full: exit 4, nothing written; stale pointer: the activated model "
         "kept; rotten active slot: the previous model untouched)"),
        ("the gate runs the active model after every update", all(r.get("gate_on_active") for r in records),
         f"{sum(1 for r in records if r.get('gate_on_active'))}/{len(records)} updates followed by a frame gated "
         "with the active slot's package"),
        ("no unsigned or inconsistent model gated a scene", bool(decided) and not bad_model,
         f"{len(bad_model)} of {len(decided)} frames gated by a model outside the good signed packages"),
        ("runtime weight upsets caught before the next frame", bool(caught) and all(caught),
         f"{sum(caught)}/{len(caught)} upsets caught (scrub of the runtime's buffer or self-test)"),
        ("no frame gated with altered weights", bool(decided) and not altered,
         f"{len(altered)} of {len(decided)} frames differ from the same scene under the same verified model"),
        ("never zero verifiable models when one existed before", all(
            r.get("verifiable_after", 1) >= 1 for r in records if r.get("verifiable_before", 0) >= 1),
         f"{sum(1 for r in records if r.get('verifiable_before', 0) >= 1 and r.get('verifiable_after', 1) < 1)} updates "
         f"left no slot that verifies ({sum(1 for r in records if 'verifiable_before' in r)} checked)"),
        ("no temporary file left by a refused or failed install", all(
            not r.get("leftovers") for r in records if r["fault"] not in ("kill_install", "kill_switch")),
         f"{sum(1 for r in records if r.get('leftovers') and r['fault'] not in ('kill_install', 'kill_switch'))} "
         "updates left a .tmp / .new file (a killed install's is removed by the next operation)"),
        ("no payload-loop crash", not crashes and child_rc == 0,
         f"{len(crashes)} crashed frames, gate process exit {child_rc}"),
        ("no lost log record", bool(acked) and not lost, f"{len(lost)} of {len(acked)} acknowledged records lost"),
        ("no duplicate log seq", not dup, f"{len(dup)} duplicates in {len(logged)} records"),
        ("decision log readable", not log.problems, f"{len(log.problems)} skipped lines"),
    ]
    rep = {"board": board.name, "backend": backend, "updates": len(records), "frames_gated": len(decided),
           "wall_s": round(wall, 1), "total_s": round(total, 1), "by_class": by_class,
           "altered_frames": altered,
           "upsets": {"injected": len(upsets), "with_flips": len(caught), "caught": sum(caught),
                      "injector_errors": [u["error"] for u in upsets if u.get("error")]},
           "gate": {"switches_followed": sum(1 for e in events if e.get("event") == "model_switch"),
                    "rollbacks": sum(1 for e in events if e.get("event") == "model_rollback"),
                    "reloads": sum(1 for e in events if e.get("event") == "model_reload"),
                    "bist_pass": sum(1 for e in events if e.get("event") == "bist_pass"),
                    "bist_fail": sum(1 for e in events if e.get("event") == "bist_fail"),
                    "model_events": dict(Counter(e.get("event") for e in events)),
                    "final": final.get("status"), "workers": final.get("workers"), "vms_growth_mib_max": max(
                        [f.get("vms_growth_mib", 0) for f in decided], default=0),
                    "rss_peak_growth_mib": max([f.get("rss_growth_mib", 0) for f in decided], default=0),
                    "budget_mib": board.gate_budget_mib},
           "package_bytes": pk["sizes"],
           "install_s_host": {"n": len(inst_s), "p50": _pct(inst_s, 50), "p95": _pct(inst_s, 95), "max": max(inst_s, default=None),
                              "meaning": "ModelStore.install: verify upload, write standby slot, re-verify + self-test there"},
           "installer_process_s_host": {"n": len(cli_s), "p50": _pct(cli_s, 50), "p95": _pct(cli_s, 95),
                                        "meaning": "python -m flight model install --activate, process start to exit"},
           "bist_s_host": {"n": len(bist_s), "p50": _pct(bist_s, 50), "p95": _pct(bist_s, 95)},
           "bist_s_emulated": round(emulated_bist, 4),
           "bist_emulation": f"{tiles} golden tiles x {card.tile}^2 px x {card.raw['macs_per_pixel']} MAC/px / "
                             f"{board.effective_gmacs:.1f} GMAC/s effective",
           "decisions": len(decisions), "actions": dict(Counter(f["action"] for f in decided)),
           "log": {"records": len(log.records), "lost": lost, "duplicates": dup, "skipped": len(log.problems)},
           "requirements": [{"requirement": q, "passed": bool(ok), "detail": d} for q, ok, d in reqs],
           "passed": all(ok for _, ok, _ in reqs), "updates_detail": records}
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    return rep


def markdown(reps: list[dict], command: str) -> str:
    L = ["# HIL update campaign", "", f"Command: `{command}`", "",
         "Each board: a model store with the default model active, a gate process gating the campaign stream "
         "under the board's memory limit (self-test before every frame, following activations), and a sequence "
         "of updates through the real installer with a fault drawn per update (hil/update.py). Host times were "
         f"measured on this {os.cpu_count()}-core x86 host (its 1-minute load average at each board's start and end "
         "is in the table: other work on the host slows them); the gate runs one tile worker per core the board "
         "profile gives it (`workers: auto`); board BIST times are "
         "**emulated** from the board profile (MACs / effective INT8 throughput), not measured on hardware.", "",
         "| board | backend | result | updates | frames gated | gate workers | upsets caught | switches followed | package bytes | "
         "install s p50 / p95 (host) | installer process s p50 (host) | BIST s p50 (host) | BIST s (emulated board) | wall s | host load start / end |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reps:
        load = r.get("host_load_avg_1min", {})
        L.append(f"| {r['board']} | {r['backend']} | {'PASS' if r['passed'] else 'FAIL'} | {r['updates']} | "
                 f"{r['frames_gated']} | {r['gate'].get('workers', '?')} | "
                 f"{r['upsets']['caught']}/{r['upsets']['with_flips']} | "
                 f"{r['gate']['switches_followed']} | {', '.join(f'{k} {v}' for k, v in r['package_bytes'].items())} | "
                 f"{_f(r['install_s_host']['p50'])} / {_f(r['install_s_host']['p95'])} | "
                 f"{_f(r['installer_process_s_host']['p50'])} | {_f(r['bist_s_host']['p50'])} | "
                 f"{r['bist_s_emulated']} | {r['wall_s']} | {load.get('start', '?')} / {load.get('end', '?')} |")
    for r in reps:
        L += ["", f"## {r['board']} ({r['backend']})", "", "| requirement | result | detail |", "|---|---|---|"]
        L += [f"| {q['requirement']} | {'pass' if q['passed'] else '**FAIL**'} | {q['detail']} |" for q in r["requirements"]]
        L += ["", "| update fault | updates | as expected | switched | installer exit codes | detail |", "|---|---|---|---|---|---|"]
        for c, s in r["by_class"].items():
            extra = s.get("phases") or s.get("variants") or (f"bits flipped: {s['bits']}" if s.get("bits") else "")
            L.append(f"| {c} | {s['updates']} | {s['as_expected']} | {s['switched']} | {s['exit_codes']} | {extra} |")
        g = r["gate"]
        L += ["", f"Gate: {r['frames_gated']} frames, actions {r['actions']}; model events {g['model_events']}; "
                  f"peak RSS growth since start {g['rss_peak_growth_mib']:.1f} MiB (gate budget {g['budget_mib']:.0f} MiB; "
                  f"the old and the new model coexist during a switch), peak address-space growth "
                  f"{g['vms_growth_mib_max']:.1f} MiB (RLIMIT_AS: budget + frame headroom); log {r['log']['records']} records, {len(r['log']['lost'])} lost, "
                  f"{len(r['log']['duplicates'])} duplicate seqs. BIST emulation: {r['bist_emulation']}."]
    return "\n".join(L) + "\n"


def _f(v):
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil update")
    ap.add_argument("--board", action="append", required=True, help="board profile (repeatable)")
    ap.add_argument("--backend", action="append", help="backend per board, in order (default litert)")
    ap.add_argument("--updates", type=int, default=100, help="updates per board")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", help="also write the combined Markdown and JSON here (e.g. docs/results/update_campaign)")
    a = ap.parse_args(argv)
    if a.updates < 1:
        print("error: --updates must be >= 1", file=sys.stderr)
        return 2
    reps = []
    for k, b in enumerate(a.board):
        be = (a.backend or [])[k] if a.backend and k < len(a.backend) else "litert"
        try:
            reps.append(run_board(b, Path(a.out) / b, a.updates, a.seed + k, be))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        r = reps[-1]
        print(f"{r['board']} ({r['backend']}): {'PASS' if r['passed'] else 'FAIL'}  updates {r['updates']}  frames "
              f"{r['frames_gated']}  upsets caught {r['upsets']['caught']}/{r['upsets']['with_flips']}  wall {r['wall_s']} s")
        for q in r["requirements"]:
            if not q["passed"]:
                print(f"  FAILED: {q['requirement']}: {q['detail']}")
    cmd = "python -m hil update " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(reps, cmd)
    (Path(a.out) / "update_report.md").write_text(md)
    summary = [{k: v for k, v in r.items() if k != "updates_detail"} for r in reps]
    (Path(a.out) / "update_report.json").write_text(json.dumps(summary, indent=1, default=str))
    if a.report:
        Path(a.report + ".md").write_text(md)
        Path(a.report + ".json").write_text(json.dumps(summary, indent=1, default=str))
    print(md)
    return 0 if all(r["passed"] for r in reps) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "op":
        sys.exit(op_main(sys.argv[2:]))
    sys.exit(main())
