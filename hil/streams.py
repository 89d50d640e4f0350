"""Scene streams: a YAML manifest (real scene paths and/or generated scenes) or a directory of .npz.

Manifest entries:
  - path: ../shared/data/real/...npz      # relative to the repository root, read in place
    acquired_utc: 2026-11-22T10:00:00Z
    priority: 0
    expected_action: downlink             # optional; scored when present
    known_miss: "issue 8: ..."            # optional, with expected_action and known_action: the shipped model
    known_action: discard                 # is known to take known_action here instead; reported apart; any
                                          # other action fails the run, the expected one too (strict, like
                                          # pytest's xfail(strict=True)): remove the mark when it is fixed
  - generate: {kind: overcast, seed: 3, size: 768, swath_edge: false}
    priority: 2
    expected_action: reacquire
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .paths import REPO
GEN_BANDS = ("blue", "green", "red", "nir")
GEN_KINDS = ("clear", "partly", "overcast", "snow", "haze", "urban", "water", "cirrus", "broken")


class StreamError(ValueError):
    pass


@dataclass
class StreamItem:
    index: int
    source: str                       # path or "generate:<kind>:<seed>:<size>"
    acquired_utc: str
    priority: int = 0
    expected_action: str | None = None
    generate: dict | None = None
    known_miss: str | None = None     # why the shipped model is expected to miss expected_action (tracked issue)
    known_action: str | None = None   # the action it takes instead (the only one a known miss may take)
    path: str | None = None
    extra: dict = field(default_factory=dict)


def generate_scene(kind: str, seed: int, size: int, swath_edge: bool = False) -> dict:
    """A labelled 4-band reflectance scene of size² built from 256² generator tiles (hil.synth,
    numpy only). swath_edge blanks a slanted band of no-data (all bands zero) on one side."""
    from .synth import make_scene

    if kind not in GEN_KINDS:
        raise StreamError(f"generate.kind {kind!r}: choose one of {GEN_KINDS}")
    reps = -(-size // 256)
    refl = np.zeros((reps * 256, reps * 256, 4), np.float32)
    label = np.zeros((reps * 256, reps * 256), np.uint8)
    for i in range(reps):
        for j in range(reps):
            s = make_scene(seed * 7919 + i * reps + j, 256, kind=kind)
            refl[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = s.reflectance[..., :4]
            label[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = s.mask
    refl, label = refl[:size, :size].copy(), label[:size, :size].copy()
    valid = None
    if swath_edge:
        yy, xx = np.mgrid[:size, :size]
        nodata = xx < (0.15 + 0.2 * yy / size) * size
        refl[nodata] = 0.0
        label[nodata] = 255
        valid = ~nodata
    return {"bands": refl, "band_names": GEN_BANDS, "radiometry": (1.0, 0.0), "valid_mask": valid,
            "scene_id": f"gen-{kind}-{seed}-{size}{'-edge' if swath_edge else ''}", "label": label, "tag": kind}


def load_item(item: StreamItem) -> dict:
    if item.generate is not None:
        g = item.generate
        return generate_scene(g["kind"], int(g.get("seed", 0)), int(g.get("size", 512)), bool(g.get("swath_edge", False)))
    from flight.scenefile import read_npz_scene

    return read_npz_scene(item.path)


def load_stream(spec: str | Path) -> tuple[str, list[StreamItem]]:
    p = Path(spec)
    if p.is_dir():
        paths = sorted(p.glob("**/*.npz"))
        if not paths:
            raise StreamError(f"stream directory {p} holds no .npz scenes")
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        return p.name, [StreamItem(i, str(q), (t0 + dt.timedelta(seconds=i)).isoformat(), path=str(q))
                        for i, q in enumerate(paths)]
    if not p.exists():
        raise StreamError(f"stream {p} not found (give a manifest .yaml or a directory of .npz scenes)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise StreamError(f"stream manifest {p}: invalid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("scenes"), list):
        raise StreamError(f"stream manifest {p}: needs a 'scenes' list")
    items = []
    for i, e in enumerate(raw["scenes"]):
        where = f"{p}: scenes[{i}]"
        if not isinstance(e, dict) or ("path" in e) == ("generate" in e):
            raise StreamError(f"{where}: give exactly one of 'path' or 'generate'")
        exp = e.get("expected_action")
        if exp not in (None, "downlink", "discard", "reacquire", "fault"):
            raise StreamError(f"{where}.expected_action {exp!r}: use downlink, discard, reacquire or fault")
        known, known_action = e.get("known_miss"), e.get("known_action")
        if (known is None) != (known_action is None):
            raise StreamError(f"{where}: known_miss (the reason) and known_action (the action taken instead) go together")
        if known is not None and (not isinstance(known, str) or not known.strip() or exp is None):
            raise StreamError(f"{where}.known_miss must be a non-empty reason string beside an expected_action")
        if known is not None and (known_action not in ("downlink", "discard", "reacquire", "fault") or known_action == exp):
            raise StreamError(f"{where}.known_action {known_action!r}: an action other than expected_action {exp!r}")
        acq = str(e.get("acquired_utc", f"2026-01-01T00:00:{i % 60:02d}Z"))
        if "path" in e:
            q = (REPO / e["path"]).resolve() if not Path(e["path"]).is_absolute() else Path(e["path"])
            items.append(StreamItem(i, str(e["path"]), acq, int(e.get("priority", 0)), exp, path=str(q), known_miss=known,
                                    known_action=known_action))
        else:
            g = dict(e["generate"])
            src = f"generate:{g.get('kind')}:{g.get('seed', 0)}:{g.get('size', 512)}{':edge' if g.get('swath_edge') else ''}"
            items.append(StreamItem(i, src, acq, int(e.get("priority", 0)), exp, generate=g, known_miss=known,
                                    known_action=known_action))
    return raw.get("name", p.stem), items


def missing_real_scenes(items: list[StreamItem]) -> list[str]:
    return [it.source for it in items if it.path and not Path(it.path).exists()]
