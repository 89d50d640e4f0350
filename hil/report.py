"""HIL report: report.json, report.md and PNG plots; requirement checks decide the exit status.

Host-measured times are what this x86 machine measured. Emulated board times come from the board
model (hil.boards.Board.emulated_latency_s) and are labelled as such everywhere."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from flight import read_log

from .boards import Board
from .faults import FAULT_CLASSES


SOAK_FRAMES = 200               # runs this long get the flat-RSS requirement


def _pct(v, q):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def build_report(board: Board, stream: str, out: Path, n_frames: int, events: dict, rates: dict, seed: int,
                 wall_s: float, backend: str) -> dict:
    frames = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines() if line.strip()
              and _ok(line)]
    frames = [f for f in frames if "marker" not in f]
    by_frame = {f["frame"]: f for f in frames}
    processed = [f for f in frames if "action" in f]
    for f in processed:
        f["emulated_latency_s"] = board.emulated_latency_s(f.get("macs", 0.0), f.get("latency_s", 0.0), f.get("infer_s", 0.0))
        f["energy_j"] = board.energy_j(f["emulated_latency_s"])
    log = read_log(out / "decisions.jsonl")
    for v in sorted((out / "vanished").glob("*.jsonl")):       # log files removed under the gate (log_vanished)
        part = read_log(v, include_rotated=False)
        log.records += part.records
        log.problems += part.problems
    all_seqs = [r["seq"] for r in log.records]
    log_seqs = set(all_seqs)
    duplicate_seqs = sorted(k for k, c in Counter(all_seqs).items() if c > 1)
    reported = {f["seq"] for f in processed if f.get("seq") is not None}
    lost = sorted(reported - log_seqs)
    by_seq = {r["seq"]: r for r in log.records}
    # an acked seq must be that frame's own record (a seq reused after a restart would pass the set check)
    mismatched = sorted(f["seq"] for f in processed if f.get("seq") in by_seq and
                        (by_seq[f["seq"]].get("scene_id"), by_seq[f["seq"]].get("action")) != (f.get("scene_id"), f["action"]))
    acked_in_order = [f["seq"] for f in sorted(processed, key=lambda f: f["frame"]) if f.get("seq") is not None]
    seq_back = [(a, b) for a, b in zip(acked_in_order, acked_in_order[1:]) if b <= a]
    rss = rss_flatness(frames)
    crashes = [f for f in processed if f["action"] == "crash"]
    labelled_all = [f for f in processed if f.get("expected")]
    labelled = [f for f in labelled_all if not f.get("faults")]          # a fault may legitimately change the action
    known = [f for f in labelled if f.get("known_miss")]                   # tracked model misses, reported apart
    labelled = [f for f in labelled if not f.get("known_miss")]
    labelled_all = [f for f in labelled_all if not f.get("known_miss")]
    wrong = [f for f in labelled if f["action"] != f["expected"]]
    known_now_right = [f for f in known if f["action"] == f["expected"]]
    known_changed = [f for f in known if f["action"] not in (f["expected"], f.get("known_action"))]
    stream_has_labels = any(it.get("expected_action") for it in _job(out).get("items", []))
    gated = [f for f in processed if f["action"] != "crash"]              # every frame the gate answered, faults too
    misses = [f for f in gated if f["emulated_latency_s"] > board.deadline_s]
    host_misses = [f for f in gated if f.get("latency_s", 0) > board.deadline_s]
    measured = [f for f in gated if "gate_peak_growth_mib" in f]
    mem_peak = max([f["gate_peak_growth_mib"] for f in measured], default=0.0)
    fault_stats = {}
    for c in FAULT_CLASSES:
        hit = [by_frame[i] for i in range(n_frames) if i in by_frame and c in by_frame[i].get("faults", [])
               and (c == "dropped_frame" or not by_frame[i].get("dropped"))]   # a dropped frame got no other fault
        if c in ("log_short_write", "log_vanished"):
            outcome = Counter("crash" if f.get("action") == "crash" else "dropped" if f.get("dropped") else
                              "log_write_failed" if f.get("log_failed") else "logged" for f in hit)
        else:
            outcome = Counter((f.get("fault_code") or f.get("action") or ("dropped" if f.get("dropped") else "?")) for f in hit)
        fault_stats[c] = {"injected": len(hit), "outcomes": dict(outcome)}
    planned_kills = sum(1 for i in range(n_frames) if "hard_kill" in _planned(out, i))
    sites = events.get("kill_sites", {})
    fault_stats["hard_kill"] = {"injected": events["hard_kills"], "planned": planned_kills,
                                "outcomes": {"killed_and_restarted": events["hard_kills"], **{f"at {k}": v for k, v in sorted(sites.items())}}}
    pressure = [f for f in processed if "memory_pressure" in f.get("faults", [])]
    pressure_real = [f for f in pressure if f.get("ballast_mib", 0) > 0 and not f.get("ballast_failed")
                     and f.get("pressure_left_kib", 1e12) <= board.gate_budget_mib * 512]
    refused = [f["model_file_refused"] for f in frames if "model_file_refused" in f]
    # an upset in the runtime's executed weights is caught by the scrub of the runtime's own buffer (LiteRT)
    # or by the known-answer self-test (both backends) before the frame is gated, or the reload could not run
    # (memory pressure) and the frame faulted instead of being gated
    scrubbed = [_upset_caught(f) for f in processed if "seu_weights" in f.get("faults", []) and f.get("weights_flipped_at")]
    n_faults = sum(s["injected"] for s in fault_stats.values())
    implausible = [f for f in processed if "implausible_radiometry" in f.get("faults", [])]
    implausible_gated = [f for f in implausible if f["action"] != "fault"]
    torn_allowed = events["hard_kills"] + events["watchdog_kills"] + events["child_crashes"]
    # a row states its denominator; a row whose check ran on nothing fails (it would otherwise pass 0/0)
    reqs = [
        ("no payload-loop crash", len(crashes) == 0 and events["child_crashes"] == 0,
         f"{len(crashes)} crashes in {len(processed)} frames, {events['child_crashes']} child deaths"),
        ("no lost complete log record", not lost and not mismatched and bool(reported) if processed else True,
         f"{len(lost)} of {len(reported)} acknowledged records lost, {len(mismatched)} acked seqs hold another frame's record"),
        ("no duplicate log seq", not duplicate_seqs, f"{len(duplicate_seqs)} of {len(log_seqs)} seqs logged more than once"),
        ("acknowledged seqs strictly increase, restarts included", not seq_back,
         f"{len(seq_back)} steps back in {len(acked_in_order)} acked seqs" + (f" (first {seq_back[0]})" if seq_back else "")),
        ("decision log readable", len(log.problems) <= torn_allowed,
         f"{len(log.problems)} skipped line(s) (<= {torn_allowed} torn by kills allowed)"),
    ]
    if n_frames >= SOAK_FRAMES:                    # a soak: RSS must stay flat (short runs only report it)
        reqs.append(("flat RSS", rss["passed"], rss["detail"]))
    if rates.get("hard_kill"):
        reqs.append(("every planned hard kill landed at a kill point and was restarted",
                     events["hard_kills"] == planned_kills and planned_kills > 0,
                     f"{events['hard_kills']}/{planned_kills} kills: " +
                     (", ".join(f"{k} {v}" for k, v in sorted(sites.items())) or "none")))
    if rates.get("memory_pressure"):
        reqs.append(("memory pressure applied inside RLIMIT_AS during the frame", bool(pressure) and
                     len(pressure_real) == len(pressure),
                     f"{len(pressure_real)}/{len(pressure)} pressure frames with a resident ballast leaving <= budget/2 "
                     f"of address space (min left {min([f.get('pressure_left_kib', 0) for f in pressure], default=0)} KiB); "
                     f"outcomes {dict(Counter(f.get('fault_code') or f['action'] for f in pressure))}"))
    if rates.get("seu_model_file"):
        reqs.append(("every corrupted model refused", bool(refused) and all(refused),
                     f"{sum(map(bool, refused))}/{len(refused)} refused"))
    if rates.get("seu_weights"):
        reqs.append(("weight upsets caught by scrub", bool(scrubbed) and all(scrubbed),
                     f"{sum(scrubbed)}/{len(scrubbed)} upsets in the runtime's executed weights caught (scrub of "
                     "its own buffer or known-answer self-test) before the frame was gated"))
    if rates.get("implausible_radiometry"):
        reqs.append(("implausible radiometry never gated", bool(implausible) and not implausible_gated,
                     f"{len(implausible) - len(implausible_gated)}/{len(implausible)} frames faulted"))
    if stream_has_labels:
        reqs.append(("labelled scenes: expected action", bool(labelled) and not wrong,
                     f"{len(labelled) - len(wrong)}/{len(labelled)} correct ({len(labelled_all) - len(labelled)} "
                     f"labelled frames not checked: faults injected)"))
        if known:
            still = len(known) - len(known_now_right) - len(known_changed)
            reqs.append(("known model misses exactly as tracked (known_action; a fixed one must lose its mark)",
                         not known_now_right and not known_changed,
                         f"{still}/{len(known)} still missed as tracked: " +
                         "; ".join(sorted({f"{Path(f['source']).stem} -> {f.get('known_action')}: {f['known_miss']}"
                                           for f in known}))[:400] +
                         (f"; now right, remove the mark: {sorted({Path(f['source']).stem for f in known_now_right})}"
                          if known_now_right else "") +
                         (f"; action changed (regression?): {sorted({(Path(f['source']).stem, f['action']) for f in known_changed})}"
                          if known_changed else "")))
    reqs += [
        ("emulated deadline misses within allowance",
         bool(gated) and len(misses) <= board.deadline_miss_allowance * len(gated),
         f"{len(misses)}/{len(gated)} answered frames over {board.deadline_s}s (allowance {board.deadline_miss_allowance:.0%})"),
        ("gate memory within budget", bool(measured) and mem_peak <= board.gate_budget_mib,
         f"peak growth {mem_peak:.1f} MiB / {board.gate_budget_mib} MiB over {len(measured)} frames "
         f"({sum(1 for f in measured if f.get('ballast_mib'))} under memory pressure, ballast excluded)"),
    ]
    lat = [f["latency_s"] for f in gated]
    emu = [f["emulated_latency_s"] for f in gated]
    report = {
        "board": board.name, "stream": stream, "backend": backend, "frames_planned": n_frames, "seed": seed,
        "frames_processed": len(processed), "wall_s": round(wall_s, 2),
        "actions": dict(Counter(f["action"] for f in processed)),
        "host_measured_latency_s": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "max": max(lat, default=None)},
        "emulated_board_latency_s": {"p50": _pct(emu, 50), "p95": _pct(emu, 95), "max": max(emu, default=None),
                                     "model": "MACs / (peak_gmacs x derate) + host non-inference time x host_overhead_factor"},
        "host_deadline_misses": len(host_misses),
        "energy_j_per_scene_mean": (sum(f["energy_j"] for f in gated) / len(gated)) if gated else None,
        "gate_memory_peak_growth_mib": mem_peak, "gate_budget_mib": board.gate_budget_mib,
        "faults_injected": n_faults, "fault_rates": {k: v for k, v in rates.items() if v},
        "fault_classes": fault_stats, "events": events,
        "log": {"records": len(log.records), "skipped_lines": len(log.problems), "lost_records": lost,
                "duplicate_seqs": duplicate_seqs, "mismatched_seqs": mismatched, "acked": len(reported),
                "seq_steps_back": len(seq_back)},
        "rss": rss,
        "wrong_actions": [{"frame": f["frame"], "source": f["source"], "expected": f["expected"], "got": f["action"],
                           "cloud_fraction": f.get("cloud_fraction")} for f in wrong],
        "requirements": [{"requirement": r, "passed": bool(ok), "detail": d} for r, ok, d in reqs],
        "passed": all(ok for _, ok, _ in reqs),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(_markdown(report, processed))
    _plots(board, processed, out)
    return report


def rss_flatness(frames: list[dict], warmup: int = 50, max_slope_mib_per_1k: float = 2.0,
                 max_growth_mib: float = 8.0) -> dict:
    """RSS between frames (at the top of each, the previous frame's buffers released), per child process (a
    restart starts a new one). The first `warmup` frames of a process are its warm-up (first use of each
    fault path, the scene cache). After it: the pooled within-process slope (least squares, each process
    centred on its own mean) must stay under max_slope_mib_per_1k MiB per 1000 frames, and no process may
    grow more than max_growth_mib above its RSS at the end of its warm-up."""
    seg: dict = {}
    for f in sorted((f for f in frames if "rss_idle_mib" in f and "pid" in f), key=lambda f: f["frame"]):
        seg.setdefault(f["pid"], []).append(f["rss_idle_mib"])        # between frames: the loop's own state
    sxx = sxy = 0.0
    used, longest, drift, growth = 0, 0, None, 0.0
    for vals in seg.values():
        v = vals[warmup:]
        if len(v) < 2:
            continue
        mx, my = (len(v) - 1) / 2, sum(v) / len(v)
        sxx += sum((i - mx) ** 2 for i in range(len(v)))
        sxy += sum((i - mx) * (y - my) for i, y in enumerate(v))
        used += len(v)
        growth = max(growth, max(v) - v[0])
        if len(v) > longest:
            k = max(1, min(20, len(v) // 4))
            longest, drift = len(v), sorted(v[-k:])[k // 2] - sorted(v[:k])[k // 2]
    slope = 1000 * sxy / sxx if sxx else None
    steady = [x for vals in seg.values() for x in vals[warmup:]]
    ok = slope is not None and slope <= max_slope_mib_per_1k and growth <= max_growth_mib
    detail = (f"slope {slope:+.2f} MiB/1000 frames (<= {max_slope_mib_per_1k}), max growth after warm-up "
              f"{growth:.1f} MiB (<= {max_growth_mib}) over {used} frames in {len(seg)} processes ({warmup} warm-up "
              f"frames each); RSS {min(steady):.1f}..{max(steady):.1f} MiB; longest process {longest + warmup} "
              f"frames, drift {drift:+.1f} MiB" if slope is not None else
              f"not enough frames after the {warmup}-frame warm-up of each process")
    return {"passed": ok, "slope_mib_per_1000_frames": slope, "max_growth_mib": growth, "frames": used,
            "processes": len(seg), "warmup_frames": warmup, "min_mib": min(steady, default=None),
            "max_mib": max(steady, default=None), "longest_process_frames": longest + warmup if longest else 0,
            "longest_drift_mib": drift, "detail": detail}


def _upset_caught(f: dict) -> bool:
    """A weight upset was caught: the scrub repaired it before the frame was gated, or the reload could not
    run (memory pressure: out_of_memory, model_reload_failed) and the frame faulted, not gated (the next
    frame reloads)."""
    return bool({"model_scrub_repaired", "model_bist_recovered"} & _event_codes(f)) or \
        f.get("fault_code") in ("out_of_memory", "model_reload_failed")


def _event_codes(frame: dict) -> set[str]:
    """Codes of a frame's degraded events (frames.jsonl carries Decision.degraded; schema-1 text is read too)."""
    deg = frame.get("degraded") or []
    if isinstance(deg, str):
        return {"model_scrub_repaired"} if "scrub" in deg else {"legacy"}
    return {e.get("code") for e in deg if isinstance(e, dict)}


def _job(out: Path) -> dict:
    try:
        return json.loads((out / "job.json").read_text())
    except (OSError, ValueError):
        return {}


def _planned(out: Path, i: int) -> list[str]:
    plan = _planned.cache.get(out)
    if plan is None:
        plan = _planned.cache[out] = json.loads((out / "job.json").read_text())["plan"]
    return plan[i] if i < len(plan) else []


_planned.cache = {}


def _ok(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _fmt(v, unit="s", scale=1.0):
    return "—" if v is None else f"{v * scale:.1f} m{unit}" if unit == "s" else f"{v:.2f}"


def _markdown(r: dict, processed: list[dict]) -> str:
    L = [f"# HIL report: {r['board']} / {r['stream']} ({'PASS' if r['passed'] else 'FAIL'})", "",
         f"Backend {r['backend']}, {r['frames_processed']}/{r['frames_planned']} frames gated, seed {r['seed']}, "
         f"wall {r['wall_s']} s. Host times are measured on this x86 machine; board times are **emulated** "
         f"({r['emulated_board_latency_s']['model']}), not measured on hardware.", "",
         "| requirement | result | detail |", "|---|---|---|"]
    L += [f"| {q['requirement']} | {'pass' if q['passed'] else '**FAIL**'} | {q['detail']} |" for q in r["requirements"]]
    h, e = r["host_measured_latency_s"], r["emulated_board_latency_s"]
    L += ["", "| latency | p50 | p95 | max |", "|---|---|---|---|",
          f"| host-measured | {_fmt(h['p50'], scale=1e3)} | {_fmt(h['p95'], scale=1e3)} | {_fmt(h['max'], scale=1e3)} |",
          f"| emulated board | {_fmt(e['p50'], scale=1e3)} | {_fmt(e['p95'], scale=1e3)} | {_fmt(e['max'], scale=1e3)} |", "",
          f"Actions: {r['actions']}. Mean energy per scene (emulated): "
          f"{r['energy_j_per_scene_mean'] if r['energy_j_per_scene_mean'] is None else round(r['energy_j_per_scene_mean'], 3)} J. "
          f"Gate memory peak growth {r['gate_memory_peak_growth_mib']:.1f} / {r['gate_budget_mib']} MiB.", ""]
    if r["faults_injected"]:
        L += [f"Faults injected: {r['faults_injected']}; events {r['events']}.", "", "| fault class | injected | what the gate did |", "|---|---|---|"]
        L += [f"| {c} | {s['injected']} | {s['outcomes']} |" for c, s in r["fault_classes"].items() if s["injected"]]
    L += ["", "Per frame: *injected faults* are what the harness injected; *gate fault* is the gate's fault_code "
          "when it refused the frame.", "",
          "| frame | source | expected | action | cloud | valid | tiles | host ms | emulated ms | injected faults | gate fault |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in processed[:200]:
        L.append(f"| {f['frame']} | {Path(f['source']).name} | {f.get('expected') or ''} | {f['action']} | "
                 f"{f.get('cloud_fraction', 0):.3f} | {f.get('valid_fraction', 0):.3f} | {f.get('tiles', 0)}/{f.get('tiles_total', 0)} | "
                 f"{f.get('latency_s', 0) * 1e3:.1f} | {f['emulated_latency_s'] * 1e3:.1f} | {','.join(f.get('faults', []))} | "
                 f"{f.get('fault_code') or ''} |")
    return "\n".join(L) + "\n"


def _plots(board: Board, frames: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [f["frame"] for f in frames]
    fig, ax = plt.subplots(5, 1, figsize=(10, 13))
    ax[0].plot(x, [f.get("latency_s", 0) for f in frames], ".", label="host-measured")
    ax[0].plot(x, [f["emulated_latency_s"] for f in frames], "x", label=f"emulated {board.name}")
    ax[0].axhline(board.deadline_s, color="r", label="deadline"); ax[0].set_yscale("log"); ax[0].set_ylabel("latency s"); ax[0].legend(fontsize=7)
    ax[1].plot(x, [f.get("gate_peak_growth_mib", 0) for f in frames], ".", label="gate peak growth")
    ax[1].axhline(board.gate_budget_mib, color="r", label="budget"); ax[1].set_ylabel("MiB"); ax[1].legend(fontsize=7)
    colors = {"downlink": "tab:green", "discard": "tab:gray", "reacquire": "tab:orange", "fault": "tab:red", "crash": "k"}
    for act, col in colors.items():                      # faults and crashes have no cloud fraction: drawn at the top
        sel = [f for f in frames if f["action"] == act]
        y = [1.05 if act in ("fault", "crash") else f.get("cloud_fraction", 0) for f in sel]
        ax[2].scatter([f["frame"] for f in sel], y, c=col, s=10, marker="x" if act in ("fault", "crash") else "o",
                      label=act if act not in ("fault", "crash") else f"{act} (no fraction)")
    ax[2].set_ylabel("cloud fraction"); ax[2].set_ylim(-0.05, 1.1); ax[2].legend(fontsize=7, ncol=5)
    acts = ["downlink", "discard", "reacquire", "fault", "crash"]
    lab = [f for f in frames if f.get("expected")]
    ax[3].scatter([f["frame"] for f in lab], [acts.index(f["expected"]) for f in lab], marker="o", facecolors="none", edgecolors="b", label="expected")
    ax[3].scatter([f["frame"] for f in lab], [acts.index(f["action"]) if f["action"] in acts else 4 for f in lab], marker="x", c="r", label="got")
    ax[3].set_yticks(range(len(acts))); ax[3].set_yticklabels(acts); ax[3].legend(fontsize=7)
    ax[3].set_title("labelled frames: expected vs decided action", fontsize=8)
    ax[4].bar(x, [f["energy_j"] for f in frames], label=f"energy per frame (emulated {board.name})")
    ax[4].set_ylabel("energy J (emulated)"); ax[4].set_xlabel("frame"); ax[4].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=70)
    plt.close(fig)


def combined_table(reports: list[tuple[dict, Path]]) -> str:
    """One table over several board runs (python -m hil run --board all)."""
    L = ["| board | result | frames | actions | injected faults | host p95 | emulated p95 | failed requirements | report |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r, out in reports:
        failed = "; ".join(q["requirement"] for q in r["requirements"] if not q["passed"]) or "-"
        L.append(f"| {r['board']} | {'PASS' if r['passed'] else 'FAIL'} | {r['frames_processed']}/{r['frames_planned']} | "
                 f"{', '.join(f'{k}={v}' for k, v in sorted(r['actions'].items()))} | {r['faults_injected']} | "
                 f"{_fmt(r['host_measured_latency_s']['p95'], scale=1e3)} | "
                 f"{_fmt(r['emulated_board_latency_s']['p95'], scale=1e3)} | {failed} | {out / 'report.md'} |")
    return "\n".join(L)
