"""Decision-log summary for mission planners (ground-side tool; matplotlib only for --png).

    python -m flight log summary FILE [--action A] [--reason R] [--limit N] [--png OUT.png]

Counts per action and rule, the data volume (see BYTES_MEANING; gating savings apart from faulted frames),
latency, sequence gaps, then one line per frame (filtered by action and by rule / fault code / reason text)
saying what was decided and why, with the full scene id and partial downlinks marked. Every str field is
printed with non-printable characters escaped (a lone surrogate such as "\\ud800" included), so any id the
gate accepted can be shown. A file without one intact record is an error (NoReadableRecordError), never an
empty summary. Field meanings: docs/decision-log.md (flight.logschema).
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

from .decisionlog import read_log
from .errors import DecisionLogError
from .logschema import is_model_event
from .policy import ACTIONS, RULES

BYTES_MEANING = ('"bytes" = in-memory size of each scene array as passed to the gate (every band at its dtype, '
                 "e.g. 13-band float32), not the size of a downlink product")
_COLORS = {"downlink": "tab:green", "discard": "tab:gray", "reacquire": "tab:orange", "fault": "tab:red"}


class NoReadableRecordError(DecisionLogError):
    """The decision log holds no intact record (empty, or nothing but torn / corrupt / foreign lines)."""
    code = "log_unreadable"


def safe_text(value) -> str:
    """value as one printable line: non-printable characters (control characters, line breaks, lone
    surrogates, ...) escaped as Python escapes (\\n, \\x1b, \\ud800); everything else unchanged."""
    s = str(value)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in s)


def _pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def matches(rec: dict, action: str | None = None, reason: str | None = None) -> bool:
    """Filter: action exactly; reason = a rule name, a fault code, or text contained in the reason."""
    if action and rec.get("action") != action:
        return False
    if reason and reason not in (rec.get("rule"), rec.get("fault_code")) and reason not in (rec.get("reason") or ""):
        return False
    return True


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _volume(recs) -> list[str]:
    """Data volume, one total per line, each line naming the total it belongs to: acquired = gated + faulted;
    gated = downlinked + saved by gating (discard, reacquire, tiles pruned from partial downlinks); faulted
    frames were not gated, so their bytes are neither downlinked nor a gating saving."""
    sized = [r for r in recs if r.get("scene_bytes")]
    total = sum(int(r["scene_bytes"]) for r in sized)
    lines = [f"data volume ({BYTES_MEANING}):"]
    if not total:
        return lines + ["  no scene sizes recorded"]
    gated = [r for r in sized if r.get("action") != "fault"]
    faulted = [r for r in sized if r.get("action") == "fault"]
    g_bytes = sum(int(r["scene_bytes"]) for r in gated)
    f_bytes = sum(int(r["scene_bytes"]) for r in faulted)
    down = sum(int(r.get("downlink_bytes", 0)) for r in gated)
    by = Counter()
    for r in gated:
        kind = "partial-downlink pruning" if r.get("action") == "downlink" else str(r.get("action"))
        by[kind] += int(r["scene_bytes"]) - int(r.get("downlink_bytes", 0))
    unknown = len(recs) - len(sized)
    lines.append(f"  acquired (all frames with a size): {_mib(total)} in {len(sized)} frames = gated + faulted"
                 + (f"; {unknown} frame(s) of unknown size not counted" if unknown else ""))
    if g_bytes:
        lines.append(f"  gated (of acquired): {_mib(g_bytes)} in {len(gated)} frames -> {_mib(down)} to downlink, "
                     f"{_mib(g_bytes - down)} saved by gating ({100 * (g_bytes - down) / g_bytes:.1f} % of gated)")
    else:
        lines.append(f"  gated (of acquired): none ({len(gated)} frames)")
    if g_bytes - down:
        lines.append("    saved by gating, by cause (of gated): " + ", ".join(
            f"{k} {_mib(v)}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v))
    lines.append(f"  faulted (of acquired): {_mib(f_bytes)} in {len(faulted)} faulted frame(s), not gated: nothing "
                 f"downlinked, not counted as saved")
    return lines


def action_text(r: dict) -> str:
    """The action, with partial downlinks marked (only the clear tiles go down)."""
    a = str(r.get("action", "?"))
    return f"{a} PARTIAL" if r.get("partial") else a


def _frame_line(r: dict, id_width: int) -> str:
    tiles = f"{r.get('tiles_processed', 0)}/{r.get('tiles_total', 0)}"
    why = r.get("reason") or r.get("fault") or ""
    return (f"  {r.get('seq', '-'):>6} {str(r.get('utc', ''))[:19]:19s} {safe_text(r.get('scene_id', '')):{id_width}s} "
            f"{action_text(r):16s} {r.get('rule', '') or '-':18s} cloud={r.get('cloud_fraction', 0):.3f} "
            f"valid={r.get('valid_fraction', 0):.3f} tiles={tiles:7s} {why}")


def summarize(path: str | Path, png: str | None = None, action: str | None = None, reason: str | None = None,
              limit: int = 50) -> str:
    """The summary text (and the PNG when asked). limit: frames listed (0 = all). Raises
    NoReadableRecordError when the file holds no intact record (empty, or only unreadable lines)."""
    res = read_log(path)
    if not res.records:
        why = (f"{len(res.problems)} line(s) skipped, none intact (first: line {res.problems[0].line}: "
               f"{res.problems[0].reason})" if res.problems else "it is empty")
        raise NoReadableRecordError(f"decision log {path} holds no readable record: {why}; is it a CloudGate "
                                    "decision log (JSON Lines, docs/decision-log.md)?")
    events = [r for r in res.records if is_model_event(r)]
    recs = [r for r in res.records if not is_model_event(r)]           # decisions
    counts = Counter(r.get("action", "?") for r in recs)
    rules = Counter(r.get("rule") or "-" for r in recs)
    lat = [float(r.get("latency_s", 0.0)) * 1e3 for r in recs]
    lines = [f"decision log {path}: {len(res.records)} intact records, {len(res.problems)} skipped lines "
             f"({len(recs)} decisions, {len(events)} model events)"]
    for p in res.problems[:20]:
        lines.append(f"  skipped {Path(p.file).name}:{p.line}: {p.reason}")
    lines.append("actions: " + ", ".join(f"{k}={counts.get(k, 0)}" for k in ACTIONS))
    lines.append("rules: " + ", ".join(f"{k}={rules[k]}" for k in (*RULES, "-") if rules.get(k)))
    lines.append(f"partial downlinks (PARTIAL below): {sum(1 for r in recs if r.get('partial'))}; early exits: "
                 f"{sum(1 for r in recs if r.get('early_exit'))}; degraded: {sum(1 for r in recs if r.get('degraded'))}")
    lines += _volume(recs)
    if lat:
        lines.append(f"latency ms: p50={_pct(lat, 50):.1f} p90={_pct(lat, 90):.1f} p99={_pct(lat, 99):.1f} max={max(lat):.1f}")
    if events:
        ev = Counter(r.get("event") for r in events)
        lines.append("model events: " + ", ".join(f"{k}={v}" for k, v in sorted(ev.items())))
        for r in [r for r in events if r.get("severity") != "info"][-10:]:
            lines.append(f"  {r.get('seq', '-'):>6} {r.get('utc', '')[:19]:19s} {r.get('event', ''):22s} "
                         f"{r.get('model_name', '')} {r.get('model_slot', '') or ''} {str(r.get('text', ''))[:160]}")
    seqs = [r.get("seq") for r in res.records if isinstance(r.get("seq"), int)]
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
    lines.append(f"sequence: {seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'}, {gaps} gap(s)")
    sel = [r for r in recs if matches(r, action, reason)]
    shown = sel if limit <= 0 else sel[:limit]
    flt = ", ".join(f for f in (f"action={action}" if action else "", f"reason={reason}" if reason else "") if f)
    lines.append(f"frames{f' ({flt})' if flt else ''}: {len(sel)}{f', first {len(shown)} shown (--limit 0: all)' if len(shown) < len(sel) else ''}")
    width = max([8] + [len(safe_text(r.get("scene_id", ""))) for r in shown])     # full ids, never cut
    lines.append(f"  {'seq':>6} {'utc':19s} {'scene_id':{width}s} {'action':16s} {'rule':18s} fractions, tiles, reason")
    lines += [_frame_line(r, width) for r in shown]
    if png and recs:
        _plot(recs, png)
        lines.append(f"timeline written to {png}")
    elif png:
        lines.append(f"no decisions: no timeline written to {png}")
    return "\n".join(safe_text(x) for x in lines)


def policy_lines(recs) -> list[tuple[str, float, str, float, str]]:
    """(key, value, line style, width, label) of the policy thresholds the records were decided with (their
    "thresholds"): the policy's own edges (hysteresis only ever widens a target's band, so the narrowest
    values seen), then the widened edges where a target's previous action moved them (thinner)."""
    seen: dict = {}
    for r in recs:
        for k, v in (r.get("thresholds") or {}).items():
            if isinstance(v, (int, float)):
                seen.setdefault(k, set()).add(float(v))
    out = []
    for key, style, pick in (("downlink_max_cloud", "--", min), ("discard_min_cloud", ":", max),
                             ("reacquire_min_cloud", "-.", min)):
        if key not in seen:
            continue
        base = pick(seen[key])
        what = (f" (priority >= {min(seen['reacquire_priority']):g})" if key == "reacquire_min_cloud" and
                seen.get("reacquire_priority") else "")
        out.append((key, base, style, 1.0, f"{key} {base:.2f}{what}"))
        if key != "reacquire_min_cloud":
            out += [(key, v, style, 0.5, f"{key} {v:.2f} with hysteresis (target's previous action)")
                    for v in sorted(seen[key] - {base})]
    return out


def _utc(recs):
    try:
        return [datetime.strptime(r["utc"], "%Y-%m-%dT%H:%M:%S.%fZ") for r in recs]
    except (KeyError, TypeError, ValueError):
        return None


def _plot(recs, png: str) -> None:
    """Timeline PNG: cloud fraction per decision against the policy thresholds, faults above the axis.
    Up to 40 decisions: one tick per decision, labelled with its scene id (first and last UTC in the axis
    label); more: a UTC axis with unique ticks (or record seq when no UTC is usable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    utc = _utc(recs)
    few = len(recs) <= 40
    if few:
        x = list(range(len(recs)))
        span = f", {utc[0]:%Y-%m-%d %H:%M:%S} .. {utc[-1]:%H:%M:%S} UTC" if utc else ""
        xlabel = f"decision (in log order{span}), labelled with its scene id"
    elif utc:
        x, xlabel = utc, "UTC (record written; the date and hour the ticks count from at the lower right)"
    else:
        x, xlabel = [r.get("seq", i) for i, r in enumerate(recs)], "record seq (no usable UTC)"
    fig, ax = plt.subplots(figsize=(12, 6.0 if few else 4.5))
    for act, col in _COLORS.items():
        idx = [i for i, r in enumerate(recs) if r.get("action") == act]
        if not idx:
            continue
        if act == "fault":                               # no cloud fraction: drawn above the axis, never as clear
            ax.scatter([x[i] for i in idx], [1.08] * len(idx), c=col, marker="x", s=24, label="fault (no fraction)")
            continue
        whole = [i for i in idx if not recs[i].get("partial")]
        part = [i for i in idx if recs[i].get("partial")]
        ax.scatter([x[i] for i in whole], [recs[i].get("cloud_fraction", 0) for i in whole], c=col, s=16, label=act)
        if part:
            ax.scatter([x[i] for i in part], [recs[i].get("cloud_fraction", 0) for i in part], facecolors="none",
                       edgecolors=col, s=30, label=f"{act} PARTIAL (clear tiles)")
    for _, val, style, lw, label in policy_lines(recs):
        ax.axhline(val, color="k", lw=lw, ls=style, label=label)
    if few:
        ax.set_xticks(x)
        ax.set_xticklabels([safe_text(r.get("scene_id", "")) or f"seq {r.get('seq', '?')}" for r in recs],
                           rotation=90, fontsize=6)
        ax.set_xlim(-0.7, len(recs) - 0.3)
    elif utc:
        loc = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    ax.set_xlabel(xlabel); ax.set_ylabel("cloud fraction (of valid pixels)"); ax.set_ylim(-0.05, 1.15)
    ax.set_title("decisions: cloud fraction against the policy thresholds (faults drawn above, at 1.08)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7, bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout(); fig.savefig(png, dpi=90, bbox_inches="tight"); plt.close(fig)
