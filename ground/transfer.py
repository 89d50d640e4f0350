"""Real-imagery transfer set with function matching (Beyer et al. 2022, "Knowledge distillation: a good
teacher is patient and consistent"): the teachers label the *augmented view the student sees*.

Sources: every real scene with blue, green, red and nir that is not in the evaluation part of the split
(ground/data/split.yaml): the training-part labelled scenes (their human masks travel with the view
through every geometric step) and all unlabelled real scenes. Each view is one 256² tile:
  random crop at a random scale (0.6-1.6 x 256 px, resized; small scenes mirror-padded), flips/rot90,
  scene gain 0.8-1.2 and per-band gain 0.92-1.08 and offset +-0.015 (sensor calibration, sun angle,
  L1C vs L2A), smooth haze, sensor noise, 8-bit saturation, mixup and cutmix between real views, and
  procedural clouds composited on real clear crops (hil.synth) as a supplement of configurable share.
Human labels survive flips, crops, cutmix and gain; mixup and synthetic composites carry none.

The pool (views + both teachers' soft masks and 1/8-resolution decoder features) is deterministic in
its config and cached on disk (CLOUDGATE_CACHE, default ~/.cache/cloudgate) under a key of the config,
the source scenes' bytes and the generator version, so every run and every ablation arm reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from flight.scenefile import load_npz
from hil.paths import SHARED_REAL, real_scene_paths
from hil.synth import SYNTH_BANDS, make_scene, saturation_levels

from .losses import IGNORE
from .split import load_split

GENERATOR_VERSION = "views-2"   # views-2: every view records its source scenes (src.npy) for CV by acquisition
TILE = 256
VNIR = SYNTH_BANDS[:4]
CACHE = Path(os.environ.get("CLOUDGATE_CACHE", Path.home() / ".cache" / "cloudgate"))


class Source:
    """One real scene as float32 reflectance in SYNTH_BANDS order (SWIR zero when absent)."""

    def __init__(self, path: Path):
        sc = load_npz(path)
        self.name = path.stem
        self.has_swir = all(b in sc.band_names for b in SYNTH_BANDS)
        img = sc.reflectance(SYNTH_BANDS if self.has_swir else VNIR)
        if not self.has_swir:
            img = np.concatenate([img, np.zeros(img.shape[:2] + (2,), np.float32)], -1)
        self.img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
        self.label = sc.mask if sc.labelled else None
        self.digest = hashlib.sha256(np.ascontiguousarray(sc.bands).tobytes()).hexdigest()[:12]


def source_scenes(root: Path = SHARED_REAL, include: str = "training") -> list[Source]:
    """Real scenes usable for training: has blue/green/red/nir; include="training" leaves out the
    evaluation part of the fixed split, include="all" takes every scene (cross-validation: a fold's
    held-out scenes are then removed per run by the views' recorded sources, ground/cv.py)."""
    if include not in ("training", "all"):
        raise ValueError(f"pool.sources={include!r}: choose 'training' (fixed split) or 'all' (cross-validation)")
    evaluation = set(load_split()["evaluation"]) if include == "training" else set()
    out = []
    for p in real_scene_paths(root):
        if p.stem in evaluation:
            continue
        sc = load_npz(p)
        if all(b in sc.band_names for b in VNIR):
            out.append(Source(p))
    return out


def _resize(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """(H, W[, C]) -> (size, size[, C]) by index sampling (nearest) or bilinear."""
    h, w = a.shape[:2]
    ys = (np.arange(size) + 0.5) * h / size - 0.5
    xs = (np.arange(size) + 0.5) * w / size - 0.5
    if nearest:
        return a[np.clip(np.rint(ys).astype(int), 0, h - 1)][:, np.clip(np.rint(xs).astype(int), 0, w - 1)]
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1); y1 = np.clip(y0 + 1, 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1); x1 = np.clip(x0 + 1, 0, w - 1)
    fy = np.clip(ys - y0, 0, 1)[:, None, None]; fx = np.clip(xs - x0, 0, 1)[None, :, None]
    a3 = a if a.ndim == 3 else a[..., None]
    top = a3[y0][:, x0] * (1 - fx) + a3[y0][:, x1] * fx
    bot = a3[y1][:, x0] * (1 - fx) + a3[y1][:, x1] * fx
    out = top * (1 - fy) + bot * fy
    return out if a.ndim == 3 else out[..., 0]


def _crop(rng, src: Source, size: int):
    img, lab = src.img, src.label
    side = int(np.clip(rng.uniform(0.6, 1.6) * size, 48, max(img.shape[:2]) * 1.0))
    h, w = img.shape[:2]
    if h < side or w < side:
        py, px = max(0, side - h), max(0, side - w)
        img = np.pad(img, ((0, py), (0, px), (0, 0)), mode="symmetric")
        if lab is not None:
            lab = np.pad(lab, ((0, py), (0, px)), mode="symmetric")
        h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    v = img[y:y + side, x:x + side]
    lv = None if lab is None else lab[y:y + side, x:x + side]
    if side != size:
        v = _resize(v, size, nearest=False).astype(np.float32)
        lv = None if lv is None else _resize(lv, size, nearest=True)
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    v = np.rot90(v, k, axes=(0, 1)); lv = None if lv is None else np.rot90(lv, k)
    if flip:
        v = v[:, ::-1]; lv = None if lv is None else lv[:, ::-1]
    return np.ascontiguousarray(v, np.float32), (None if lv is None else np.ascontiguousarray(lv))


def _smooth_field(rng, size: int, scale: int = 32) -> np.ndarray:
    n = size // scale + 2
    return _resize(rng.random((n, n)).astype(np.float32), size, nearest=False)


def _radiometry(rng, v: np.ndarray, cfg: dict) -> np.ndarray:
    c = v.shape[-1]
    if rng.random() < cfg.get("p_gain", 0.8):
        # scene-wide gain keeps the band ratios that tell bright clear surfaces from cloud decks (green/blue,
        # nir/blue differ by 5-10 %); the per-band gain (band_gain, default +-8 %) moves them by as much
        bg = float(cfg.get("band_gain", 0.08))
        v = v * rng.uniform(0.8, 1.2) * rng.uniform(1 - bg, 1 + bg, c) + rng.uniform(-0.015, 0.015, c)
    if rng.random() < cfg.get("p_haze", 0.2):
        t = (_smooth_field(rng, v.shape[0]) * rng.uniform(0.03, 0.15))[..., None]
        haze = np.array([0.30, 0.28, 0.27, 0.28, 0.22, 0.15], np.float32)[:c]
        v = v * (1 - t) + haze * t
    if rng.random() < cfg.get("p_noise", 0.5):
        v = v + rng.normal(0, rng.uniform(0.002, 0.01), v.shape)
    if rng.random() < cfg.get("p_saturation", 0.08):
        v = np.minimum(v, saturation_levels(rng)[:c])
    return np.clip(v, 0.0, 1.6).astype(np.float32)


def snow_view(rng, size: int, cfg: dict):
    """A procedural snow/ice landscape (hil.synth kind 'snow': snow, vegetation, soil, water end
    members, fBm texture, terrain-like shading, 0-40 % cloud) with exact labels -- snow is clear. The
    snow's NIR/VIS ratio is drawn from 0.78-1.1 (fresh to old snow at TOA, as seen in real L8 snow
    scenes) so bright flat VNIR alone never means cloud."""
    sc = make_scene(int(rng.integers(2**31)), size, kind="snow")
    x = sc.reflectance.copy()
    x[..., 3] *= rng.uniform(0.9, 1.28)
    return _radiometry(rng, x, cfg), sc.mask.astype(np.uint8), True, "synthetic_snow"


def make_view(rng, sources: list[Source], labelled: list[int], cfg: dict, used: list | None = None):
    """One augmented view -> (x (T,T,6) float32, label (T,T) uint8 or IGNORE, has_swir, kind). The indices
    of the source scenes whose pixels went into the view are appended to `used` (if given): a view built
    from a held-out scene must never train that fold."""
    used = [] if used is None else used
    size = cfg.get("tile", TILE)
    if cfg.get("generator") == "synthetic_snow":
        return snow_view(rng, size, cfg)
    r = rng.random()
    if r < cfg.get("synthetic_share", 0.1):
        # procedural clouds composited on a real crop (the generator draws the cloud field)
        si = int(rng.integers(len(sources)))
        src = sources[si]
        used.append(si)
        bg, _ = _crop(rng, src, size)
        sc = make_scene(int(rng.integers(2**31)), size, background=bg)
        x = sc.reflectance.copy()
        if not src.has_swir:
            x[..., 4:] = 0.0
        return _radiometry(rng, x, cfg), np.full((size, size), IGNORE, np.uint8), src.has_swir, "synthetic"
    use_lab = labelled and rng.random() < cfg.get("labelled_view_share", 0.5)
    i = labelled[int(rng.integers(len(labelled)))] if use_lab else int(rng.integers(len(sources)))
    used.append(i)
    x, lab = _crop(rng, sources[i], size)
    lab = np.full((size, size), IGNORE, np.uint8) if lab is None else lab.astype(np.uint8)
    swir = sources[i].has_swir
    kind = "real"
    r2 = rng.random()
    if r2 < cfg.get("p_mixup", 0.08) + cfg.get("p_cutmix", 0.12):
        j = int(rng.integers(len(sources)))
        used.append(j)
        x2, lab2 = _crop(rng, sources[j], size)
        swir = swir and sources[j].has_swir
        if r2 < cfg.get("p_mixup", 0.08):
            lam = rng.uniform(0.3, 0.7)
            x = lam * x + (1 - lam) * x2
            lab = np.full_like(lab, IGNORE)
            kind = "mixup"
        else:
            h = int(rng.integers(size // 4, size * 3 // 4)); w = int(rng.integers(size // 4, size * 3 // 4))
            y0, x0 = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            x[y0:y0 + h, x0:x0 + w] = x2[y0:y0 + h, x0:x0 + w]
            lab[y0:y0 + h, x0:x0 + w] = IGNORE if lab2 is None else lab2[y0:y0 + h, x0:x0 + w]
            kind = "cutmix"
        if not swir:
            x[..., 4:] = 0.0
    return _radiometry(rng, x, cfg), lab, swir, kind


def code_digest(*modules: str) -> str:
    """sha256 (16 hex) of the source files that shape a cached product (paths relative to the repo), so a
    cache is never reused after the code that made it changed (e.g. an augmentation)."""
    repo = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for m in modules:
        h.update(m.encode() + b"\0" + (repo / m).read_bytes())
    return h.hexdigest()[:16]


POOL_CODE = ("ground/transfer.py", "ground/teachers.py", "hil/synth.py")


def pool_key(cfg: dict, sources: list[Source]) -> str:
    """Key of a cached pool: generator version, its config, the source scenes' bytes and the code that
    makes views and runs the teachers."""
    body = {k: cfg[k] for k in sorted(cfg) if not k.startswith("_")}
    return hashlib.sha256(json.dumps([GENERATOR_VERSION, body, [(s.name, s.digest) for s in sources],
                                      code_digest(*POOL_CODE)], sort_keys=True).encode()).hexdigest()[:16]


def build_pool(cfg: dict, teachers: list, log=print, cache_dir: Path = CACHE) -> dict:
    """The view pool with teacher outputs, cached. cfg: {views, seed, synthetic_share, ...}.

    Returns arrays (memory-mapped from the cache): X (N,T,T,6) float16, Y (N,T,T) uint8,
    swir (N,) bool, kind (N,) str, and per teacher name: probs (N,3,T,T) uint8 (p*255), feats
    (N,64,T/8,T/8) float16. A teacher that needs SWIR on a view without it copies the VNIR teacher."""
    sources = source_scenes(Path(cfg.get("real_root", SHARED_REAL)), cfg.get("sources", "training"))
    if not sources:
        raise FileNotFoundError(f"no real scenes under {cfg.get('real_root', SHARED_REAL)}: the transfer set is built "
                                "from ../shared/data/real")
    key = pool_key(cfg, sources)
    d = cache_dir / f"pool_{key}"
    done = d / "done.json"
    if done.exists():
        meta = json.loads(done.read_text())
        return _open_pool(d, meta)
    d.mkdir(parents=True, exist_ok=True)
    n, size = int(cfg["views"]), int(cfg.get("tile", TILE))
    labelled = [i for i, s in enumerate(sources) if s.label is not None]
    log(f"transfer pool {key}: {n} views from {len(sources)} real scenes ({len(labelled)} labelled): "
        + ", ".join(s.name for s in sources))
    X = np.lib.format.open_memmap(d / "X.npy", "w+", np.float16, (n, size, size, 6))
    Y = np.lib.format.open_memmap(d / "Y.npy", "w+", np.uint8, (n, size, size))
    swir = np.zeros(n, bool)
    src = np.full((n, 2), -1, np.int16)   # source scene indices (meta["sources"]) per view; -1 = none
    kinds = []
    for i in range(n):
        rng = np.random.default_rng([int(cfg.get("seed", 0)), i])
        used: list[int] = []
        x, y, s, k = make_view(rng, sources, labelled, cfg, used)
        X[i], Y[i], swir[i] = x, y, s
        src[i, :len(used)] = used[:2]
        kinds.append(k)
    X.flush(); Y.flush()
    np.save(d / "swir.npy", swir)
    np.save(d / "src.npy", src)
    t0 = time.time()
    for t in teachers:
        probs = np.lib.format.open_memmap(d / f"{t.key}_probs.npy", "w+", np.uint8, (n, 3, size, size))
        feats = np.lib.format.open_memmap(d / f"{t.key}_feats.npy", "w+", np.float16, (n, 64, size // 8, size // 8))
        bidx = [SYNTH_BANDS.index(b) for b in t.bands]
        todo = np.flatnonzero(swir) if len(t.bands) > 4 else np.arange(n)
        for s in range(0, len(todo), 4):
            ii = todo[s:s + 4]
            logits, f = t.run(X[ii][..., bidx].astype(np.float32), features=True)
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs[ii] = np.rint(255 * e / e.sum(1, keepdims=True)).astype(np.uint8)
            b, c, h, w = f.shape
            feats[ii] = f.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))
            if s % 200 == 0:
                log(f"  teacher {t.key}: {s}/{len(todo)} views, {time.time() - t0:.0f} s")
        probs.flush(); feats.flush()
    # views without SWIR: a SWIR teacher's target falls back to the VNIR teacher's (marked by swir=False)
    vnir = [t for t in teachers if len(t.bands) == 4]
    for t in teachers:
        if len(t.bands) > 4 and vnir:
            p = np.load(d / f"{t.key}_probs.npy", mmap_mode="r+"); f = np.load(d / f"{t.key}_feats.npy", mmap_mode="r+")
            p0 = np.load(d / f"{vnir[0].key}_probs.npy", mmap_mode="r"); f0 = np.load(d / f"{vnir[0].key}_feats.npy", mmap_mode="r")
            for i in np.flatnonzero(~swir):
                p[i], f[i] = p0[i], f0[i]
            p.flush(); f.flush()
    meta = {"key": key, "views": n, "teachers": [t.key for t in teachers], "kinds": kinds,
            "sources": [s.name for s in sources], "teacher_seconds": round(time.time() - t0, 1), "config": cfg}
    done.write_text(json.dumps(meta))
    return _open_pool(d, meta)


def _open_pool(d: Path, meta: dict) -> dict:
    pool = {"X": np.load(d / "X.npy", mmap_mode="r"), "Y": np.load(d / "Y.npy", mmap_mode="r"),
            "swir": np.load(d / "swir.npy"), "kinds": meta["kinds"],
            "src": np.load(d / "src.npy") if (d / "src.npy").exists() else None, "key": meta["key"], "meta": meta, "dir": str(d),
            "t_probs": {}, "t_feats": {}}
    for k in meta["teachers"]:
        pool["t_probs"][k] = np.load(d / f"{k}_probs.npy", mmap_mode="r")
        pool["t_feats"][k] = np.load(d / f"{k}_feats.npy", mmap_mode="r")
    return pool
