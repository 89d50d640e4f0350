"""The gate process of a HIL run (started by hil.runner; one per board run, restarted after a kill).

Writes one JSON line per frame to OUT/frames.jsonl and the gate's decision log to OUT/decisions.jsonl.
Limits enforced by the OS: CPU affinity and thread caps, RLIMIT_AS on address-space growth.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                     # resets VmHWM (peak RSS) for this process
        return True
    except OSError:
        return False


def _load(item, load_item, cache: dict) -> dict:
    """A stream item's scene. Generated scenes are synthesised once per child and handed out read-only
    (synthesis took ~10x a frame's gating; the fault injectors copy before they change anything); scene
    files are read per frame."""
    if item.generate is None:
        return load_item(item)
    if item.index not in cache:
        scene = load_item(item)
        for v in scene.values():
            if isinstance(v, np.ndarray):
                v.flags.writeable = False
        cache[item.index] = scene
    return dict(cache[item.index])


def _apply_pressure(limit: int, budget_mib: float, rng) -> tuple[np.ndarray | None, int, int]:
    """memory_pressure: touch a ballast that leaves the gate only a little of the address space RLIMIT_AS
    still allows (64..256 KiB, 256 KiB..4 MiB or 4 MiB..budget/2, one third each). Returns the ballast,
    its resident KiB and the KiB of address space left; (None, 0, left) when no ballast could be placed."""
    lo, hi = [(64, 256), (256, 4096), (4096, max(4097, int(budget_mib * 512)))][int(rng.integers(3))]
    leave = int(rng.integers(lo, hi)) * 1024
    for _ in range(8):                                   # bounded: widen the margin if the allocator needs it
        free = limit - _status_kib("VmSize") * 1024
        n = (free - leave) // 4096 * 4096
        if n <= 0:
            break
        try:
            ballast = np.ones(n, np.uint8)               # written: resident, not only reserved
            return ballast, n // 1024, (limit - _status_kib("VmSize") * 1024) // 1024
        except MemoryError:
            leave += 256 * 1024
    return None, 0, (limit - _status_kib("VmSize") * 1024) // 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True, help="job.json written by hil.runner")
    ap.add_argument("--start", type=int, default=0)
    a = ap.parse_args(argv)
    job = json.loads(Path(a.job).read_text())
    out = Path(job["out"])
    threads = int(job["threads"])
    cpus = sorted(os.sched_getaffinity(0))[:max(1, threads)]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)

    from flight import CloudGate, DecisionLog, ModelIntegrityError
    from flight.config import LogConfig
    from flight.model import default_card, load_card

    from .faults import (FaultBackendFactory, FaultClock, apply_frame_faults, apply_radiometry_fault, flip_bits,
                         flip_runtime_weights)
    from .killpoints import KILL_SITES, KillLogIO, KillPoint
    from .streams import StreamItem, load_item

    # fault injectors enter through the gate's ports (flight.ports), never by patching flight internals;
    # hard kills land inside the tile loop (backend port) and inside DecisionLog.append (its io port)
    clock, backends = FaultClock(), FaultBackendFactory()
    kill = KillPoint(os.open(out / "frames.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    backends.on_infer = kill.on_infer
    dlog = DecisionLog(out / "decisions.jsonl", "every", LogConfig.max_bytes, LogConfig.keep, clock=clock,
                       io=KillLogIO(kill))
    gate = CloudGate.from_model(job.get("model"), clock=clock, backend_factory=backends, backend=job["backend"],
                                threads=threads, workers="auto", deadline_s=job["deadline_s"],
                                update={"bist_every": int(job.get("bist_every", 50))},
                                log_sink=dlog)
    baseline_vms = _status_kib("VmSize")
    limit = (baseline_vms * 1024 + int(job["budget_mib"] * 2**20) + int(job["frame_headroom_mib"] * 2**20))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    items = [StreamItem(**it) for it in job["items"]]
    plan = job["plan"]
    rng = np.random.default_rng([job["seed"], a.start])
    model_copy_dir = Path(tempfile.mkdtemp(prefix="hil-model-"))
    card = load_card(Path(job["model"]) if job.get("model") and job["model"].endswith(".yaml") else default_card())
    generated: dict = {}                 # generated scenes, made once per child (read-only; faults copy)
    frames = open(out / "frames.jsonl", "a", buffering=1)
    # tests only: a deliberate leak (KiB kept alive per frame) that the flat-RSS requirement must catch
    leak_kib, leaked = int(os.environ.get("HIL_TEST_LEAK_KIB_PER_FRAME", "0") or 0), []
    period = job["period_s"]
    t_start = time.monotonic()
    try:
        for i in range(a.start, len(plan)):
            item = items[i % len(items)]
            faults = plan[i]
            scene = d = None                 # the previous frame's buffers go before the idle RSS is read
            if leak_kib:
                leaked.append(np.ones(leak_kib * 1024, np.uint8))
            rss_idle = _status_kib("VmRSS") / 1024
            rec = {"frame": i, "item": item.index, "source": item.source, "expected": item.expected_action,
                   "known_miss": item.known_miss, "known_action": item.known_action,
                   "priority": item.priority, "faults": faults, "pid": os.getpid(), "rss_idle_mib": rss_idle}
            if "hard_kill" in faults:        # seeded per frame: the same sites whatever restarts came before
                krng = np.random.default_rng([job["seed"], i, 15])
                kill.arm(i, KILL_SITES[int(krng.integers(len(KILL_SITES)))], krng)
            if job["realtime"]:
                time.sleep(max(0.0, t_start + (i - a.start) * period - time.monotonic()))
            if "dropped_frame" in faults:
                if kill.site:
                    kill.fire("before_process")
                rec.update(dropped=True)
                frames.write(json.dumps(rec) + "\n")
                continue
            scene = _load(item, load_item, generated)
            if any(f in faults for f in ("seu_frame", "truncated_frame", "short_frame", "nan_burst", "stuck_band",
                                         "dead_band", "saturation")):
                scene = apply_frame_faults(scene, faults, rng)
            if "implausible_radiometry" in faults:
                scene = apply_radiometry_fault(scene)
            log_path = out / "decisions.jsonl"
            if "log_vanished" in faults and log_path.exists():
                (out / "vanished").mkdir(exist_ok=True)
                log_path.rename(out / "vanished" / f"decisions.{i}.{os.getpid()}.jsonl")   # gone from under the gate
            if "seu_model_file" in faults:
                shutil.copy(card.path, model_copy_dir / card.path.name)
                for art in card.artifacts.values():
                    shutil.copy(card.path.parent / art["file"], model_copy_dir / art["file"])
                victim = model_copy_dir / card.artifacts["tflite_int8" if job["backend"] == "litert" else "onnx_int8"]["file"]
                data = np.fromfile(victim, np.uint8)
                flip_bits(data, 1, rng)
                data.tofile(victim)
                try:
                    CloudGate.from_model(victim)
                    rec["model_file_refused"] = False
                except ModelIntegrityError:
                    rec["model_file_refused"] = True
            if "seu_weights" in faults:                 # in the weights the runtime executes (not a copy)
                # any worker's interpreter (not only the last one opened), drawn from its own stream so the
                # campaign's other draws stay where they were
                running = gate.custody.instances or [backends.backend]
                k = int(np.random.default_rng([job["seed"], i, 17]).integers(len(running)))
                rec["weights_instance"] = k
                rec["weights_flipped_at"] = flip_runtime_weights(running[k], 1, rng)
            clock.wall_offset_s = float(rng.choice([-86400.0, -3600.0, 3600.0, 1e6])) if "clock_jump" in faults else 0.0
            ballast, ballast_kib = None, 0
            backends.stall_s = job["deadline_s"] / 2 if "deadline_overrun" in faults else 0.0
            backends.infer_s, backends.infers = 0.0, 0
            rss_before = _status_kib("VmRSS")
            _reset_peak_rss()
            if "memory_pressure" in faults:  # after the peak reset, inside RLIMIT_AS, for the frame only
                ballast, ballast_kib, rec["pressure_left_kib"] = _apply_pressure(
                    limit, job["budget_mib"], np.random.default_rng([job["seed"], i, 16]))
                rec["ballast_mib"] = ballast_kib / 1024
                if ballast is None:
                    rec["ballast_failed"] = True
            fsize = None
            try:
                if "log_short_write" in faults:          # only the gate's own writes see the limit
                    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
                    cur = log_path.stat().st_size if log_path.exists() else 0
                    resource.setrlimit(resource.RLIMIT_FSIZE, (cur + int(rng.integers(1, 400)), fsize[1]))
                d = gate.process(scene["bands"], scene["band_names"], scene_id=scene["scene_id"],
                                 valid_mask=scene.get("valid_mask"), radiometry=scene.get("radiometry"),
                                 priority=item.priority, target_id=item.source)
                rec.update(action=d.action, cloud_fraction=d.cloud_fraction, valid_fraction=d.valid_fraction,
                           latency_s=d.latency_s, infer_s=d.infer_s, tiles=d.tiles_processed, tiles_total=d.tiles_total,
                           tile_pixels=d.tile_pixels, seq=d.log_seq, fault_code=d.fault_code, fault=d.fault,
                           degraded=d.degraded, rule=d.rule, early_exit=d.early_exit, scene_id=d.scene_id,
                           log_failed=d.log_seq is None, reason=d.reason, partial=d.partial,
                           clear_tiles=len(d.clear_tiles) + d.clear_tiles_omitted, thresholds=d.thresholds)
            except BaseException as e:      # the payload loop must survive; count it as a crash
                if isinstance(e, KeyboardInterrupt):
                    raise
                rec.update(action="crash", crash=f"{type(e).__name__}: {e}")
            finally:
                peak = _status_kib("VmHWM")
                ballast = None                    # the pressure lasts the frame only
                if fsize is not None:
                    resource.setrlimit(resource.RLIMIT_FSIZE, fsize)
                backends.stall_s, clock.wall_offset_s = 0.0, 0.0
            if kill.site:                         # the armed site was not reached inside process()
                kill.fire("after_process")
            # inference as seen at the backend port: a frame that faults after its scan (implausible
            # radiometry) still spent that time inferring, though its Decision reports 0 tiles and 0 s
            tile = getattr(backends.backend, "tile", 0) or 0
            rec.update(port_infer_s=backends.infer_s, port_infers=backends.infers, port_tile_pixels=int(tile) ** 2)
            rec["gate_peak_growth_mib"] = max(peak - rss_before - ballast_kib, 0) / 1024
            rec["rss_mib"] = _status_kib("VmRSS") / 1024
            rec["vms_growth_mib"] = (_status_kib("VmSize") - baseline_vms) / 1024
            # a frame the gate decided: its own tile count; a faulted one (0 tiles reported): what the port saw
            px = float(rec.get("tiles", 0) or 0) * float(rec.get("tile_pixels", 0) or 0) or \
                float(rec["port_infers"] * rec["port_tile_pixels"])
            rec["macs"] = px * float(job["macs_per_pixel"])
            frames.write(json.dumps(rec) + "\n")
    finally:
        kill.disarm()
        gate.close()
        frames.close()
        shutil.rmtree(model_copy_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
