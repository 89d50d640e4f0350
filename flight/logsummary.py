"""Decision-log summary for mission planners (ground-side tool; matplotlib only for --png)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .decisionlog import read_log


def _pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def summarize(path: str | Path, png: str | None = None) -> str:
    res = read_log(path)
    recs = res.records
    counts = Counter(r.get("action", "?") for r in recs)
    total = sum(int(r.get("scene_bytes", 0)) for r in recs)
    down = sum(int(r.get("downlink_bytes", 0)) for r in recs)
    lat = [float(r.get("latency_s", 0.0)) * 1e3 for r in recs]
    lines = [f"decision log {path}: {len(recs)} intact records, {len(res.problems)} skipped lines"]
    for p in res.problems[:20]:
        lines.append(f"  skipped {Path(p.file).name}:{p.line}: {p.reason}")
    lines.append("actions: " + ", ".join(f"{k}={counts.get(k, 0)}" for k in ("downlink", "discard", "reacquire", "fault")))
    partial = sum(1 for r in recs if r.get("partial"))
    lines.append(f"partial downlinks: {partial}; early exits: {sum(1 for r in recs if r.get('early_exit'))}; "
                 f"degraded: {sum(1 for r in recs if r.get('degraded'))}")
    if total:
        lines.append(f"data volume: {total / 2**20:.1f} MiB acquired, {down / 2**20:.1f} MiB to downlink, "
                     f"{(total - down) / 2**20:.1f} MiB saved ({100 * (total - down) / total:.1f} %)")
    if lat:
        lines.append(f"latency ms: p50={_pct(lat, 50):.1f} p90={_pct(lat, 90):.1f} p99={_pct(lat, 99):.1f} max={max(lat):.1f}")
    seqs = [r.get("seq") for r in recs if isinstance(r.get("seq"), int)]
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
    lines.append(f"sequence: {seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'}, {gaps} gap(s)")
    if png and recs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {"downlink": "tab:green", "discard": "tab:gray", "reacquire": "tab:orange", "fault": "tab:red"}
        fig, ax = plt.subplots(figsize=(10, 3))
        x = list(range(len(recs)))
        ax.scatter(x, [r.get("cloud_fraction", 0) for r in recs], c=[colors.get(r.get("action"), "k") for r in recs], s=12)
        ax.set_xlabel("record (log order)"); ax.set_ylabel("cloud fraction"); ax.set_ylim(-0.05, 1.05)
        for k, c in colors.items():
            ax.scatter([], [], c=c, label=k)
        ax.legend(loc="upper right", fontsize=7, ncol=4)
        fig.tight_layout(); fig.savefig(png, dpi=90); plt.close(fig)
        lines.append(f"timeline written to {png}")
    return "\n".join(lines)
