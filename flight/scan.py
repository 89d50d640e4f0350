"""The tile scan of one scene: visit order, per-tile inference and counting, early exit, deadline.

Tiles partition the scene into cores of (tile - overlap)² pixels; each tile window adds overlap/2
context on every side (reflect-padded at scene edges) and only its core is counted and written, so a
tile's counts do not depend on visiting order. Per-tile counts land in per-tile arrays (index =
row * cols + col) and are reduced into the scene totals in visiting order, so the totals, the early-exit
point and the decision do not depend on which worker ran which tile.

TileWorker   one worker's lane: a TileLoader (flight.sceneinput), a mask buffer and one runtime instance
TileScanner  the scan: the per-tile arrays, the estimator, the workers; bound to ModelCustody's instances

With N > 1 workers the scan runs in rounds of N consecutive tiles of the visiting order: worker 0 in the
calling thread, workers 1..N-1 in threads of their own (started once, parked on a barrier between rounds;
the runtimes' invoke releases the GIL, so the interpreters run in parallel). After each round the
tiles are committed in visiting order and early exit / the deadline are checked after every tile, exactly
as with one worker: tiles a round computed beyond the stopping point are not counted (their mask_out cores
are reset to 255 like any unvisited tile). A round costs about one tile's time, so the scan still stops
within one tile time of the deadline.

Half resolution (a model card's input_grid.downsample: 2): the scan runs on the grid of 2x2 block means of
the scene, ceil(H/2) x ceil(W/2), which is never materialised: each worker averages the (2T)² scene window
its tile needs into a preallocated (T, T, bands) buffer (HalfGrid) and loads from it as from a scene, so a
tile of T² model pixels covers (2T)² scene pixels. Odd last rows/columns average the pixels there are (the
edge pixel counted twice, as edge padding would). A half-grid pixel is valid when all its scene pixels are
(valid_mask ANDed, NaN propagates through the mean). The decision comes from the half grid alone; mask_out,
when asked, is its nearest upsampling: each decided pixel is written to its 2x2 scene pixels (four strided
copies of the tile core per tile, plus the invalid marking).
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

from .estimate import FractionEstimator
from .policy import policy_band
from .sceneinput import SceneInput, TileLoader

CLEAR, CLOUD, SHADOW, INVALID = 0, 1, 2, 255


class ScanCounts:
    """Counts of one scene's tile scan (reset per scene; no arrays)."""
    __slots__ = ("cloud_px", "valid_px", "shadow_px", "area_px", "oor_px", "sample_px", "bright_px", "infer_s",
                 "early", "deadline", "bound")

    def __init__(self):
        self.cloud_px = self.valid_px = self.shadow_px = self.area_px = self.oor_px = 0
        self.sample_px = self.bright_px = 0              # the dark-scene sample (flight.sceneinput.DARK_*)
        self.infer_s = 0.0
        self.early = self.deadline = False
        self.bound = (0.0, 1.0)


def golden_step(n: int) -> int:
    """A step coprime with n near n/φ: k -> (k * step) % n visits every tile once, spread evenly."""
    if n <= 2:
        return 1
    g = max(1, int(round(n / 1.6180339887)))
    for d in range(n):  # bounded: some step in [1, n) is coprime with n
        for c in (g + d, g - d):
            if 1 <= c < n and math.gcd(c, n) == 1:
                return c
    return 1


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):                    # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# gate-owned bytes per worker: t*t*5 (four bool masks + the class mask), t*t*16 (the HWC loader's two per-pixel
# bool buffers of <= 8 bytes), t*t*12 (the runtime's argmax scratch), t*t*4*8 (an input buffer of <= 8 bands)
def worker_bytes(tile: int) -> int:
    return tile * tile * (5 + 16 + 12 + 32)


def resolve_workers(cfg) -> int:
    """config.workers as a count: 'auto' = usable_cores(), capped by config.threads (the runtime threads the
    gate may use in all, so a caller that grants one thread -- a scorer in a process pool, the HIL on a board
    profile -- never gets more) and so that the per-tile statistics and every worker's buffers fit
    memory_budget_mib (at least 1; the budget check then says what does not fit)."""
    if cfg.workers != "auto":
        return int(cfg.workers)
    fit = (cfg.memory_budget_mib * 2**20 - cfg.max_tiles * TileScanner.PER_TILE_BYTES) // worker_bytes(cfg.tile)
    return int(max(1, min(usable_cores(), cfg.threads, fit, 64)))


class _Window:
    """Stands in for the scene (or valid_mask) in TileLoader.load: indexing by scene window coordinates
    [y0:y1, x0:x1, ...] reads the same window of a HalfGrid buffer holding the window at (y0, x0)."""

    __slots__ = ("buf", "y0", "x0")

    def __init__(self, buf: np.ndarray):
        self.buf, self.y0, self.x0 = buf, 0, 0

    @property
    def dtype(self):
        return self.buf.dtype

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        return self.buf[(slice(ys.start - self.y0, ys.stop - self.y0), slice(xs.start - self.x0, xs.stop - self.x0))
                        + key[2:]]


def _mean2x2(src, out) -> None:
    """out (rh, rw[, k]) float32 <- the 2x2 block means of src, the scene rows/cols 2*y0 .. 2*(y0+rh) (fewer
    when the scene ends on an odd row/col: the missing pixel repeats its neighbour, as edge padding would).
    Summed in the order (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1), then times 0.25, in place."""
    rh, rw = out.shape[:2]
    a, b, c, d = src[0::2, 0::2], src[1::2, 0::2], src[0::2, 1::2], src[1::2, 1::2]
    pb, pc = b.shape[0], c.shape[1]                      # rows / cols that have their second pixel
    np.copyto(out, a, casting="unsafe")
    np.add(out[:pb], b, out=out[:pb], casting="unsafe")
    if pb < rh:
        np.add(out[pb:], a[pb:], out=out[pb:], casting="unsafe")
    np.add(out[:, :pc], c, out=out[:, :pc], casting="unsafe")
    if pc < rw:
        np.add(out[:, pc:], a[:, pc:], out=out[:, pc:], casting="unsafe")
    np.add(out[:pb, :pc], d, out=out[:pb, :pc], casting="unsafe")
    if pc < rw:
        np.add(out[:pb, pc:], b[:, pc:], out=out[:pb, pc:], casting="unsafe")
    if pb < rh:
        np.add(out[pb:, :pc], c[pb:], out=out[pb:, :pc], casting="unsafe")
        if pc < rw:
            np.add(out[pb:, pc:], a[pb:, pc:], out=out[pb:, pc:], casting="unsafe")
    np.multiply(out, np.float32(0.25), out=out)


def _all2x2(src, out) -> None:
    """out (rh, rw) bool <- every available pixel of each 2x2 block of src is valid."""
    a, b, c, d = src[0::2, 0::2], src[1::2, 0::2], src[0::2, 1::2], src[1::2, 1::2]
    pb, pc = b.shape[0], c.shape[1]
    np.not_equal(a, 0, out=out)
    np.logical_and(out[:pb], b, out=out[:pb])
    np.logical_and(out[:, :pc], c, out=out[:, :pc])
    np.logical_and(out[:pb, :pc], d, out=out[:pb, :pc])


class HalfGrid:
    """One worker's half-resolution input: the 2x2 block means of the scene window a tile needs, in the
    model's band order (channel j = the scene channel of the j-th present model band), and the half-grid
    valid mask. Buffers allocated once per bound model (TileScanner.bind), none per tile."""

    def __init__(self, tile: int, bands: int):
        self.values = np.zeros((tile, tile, max(1, bands)), np.float32)
        self.valid = np.zeros((tile, tile), bool)
        self.valid_tmp = np.zeros((tile, tile), bool)
        self.nonzero = np.zeros((2 * tile, 2 * tile), bool)    # scene pixels with any model band != 0
        self.nonzero_tmp = np.zeros((2 * tile, 2 * tile), bool)
        self.scene, self.valid_mask = _Window(self.values), _Window(self.valid)

    def fill(self, scene, valid_mask, chans, y0: int, x0: int, rh: int, rw: int, has_mask: bool) -> None:
        """Half-grid rows y0..y0+rh, cols x0..x0+rw of the scene channels chans (model order)."""
        fy, fx = slice(2 * y0, 2 * (y0 + rh)), slice(2 * x0, 2 * (x0 + rw))
        # band by band: numpy's inner loop then runs along a row (rw pixels), not over one pixel's few bands
        # (measured 1.4x faster than one pass over all bands on a 512² window)
        for j, si in enumerate(chans):                   # bounded by the model's band count
            _mean2x2(scene[fy, fx, si], self.values[:rh, :rw, j])
        # a block is valid only if none of its scene pixels is no-data fill (every model band exactly 0, as the
        # full-resolution loader reads it) and, with a valid_mask, all of them are valid: a block half on a
        # swath edge would otherwise average fill into a darker, valid pixel
        sh, sw = min(2 * rh, scene.shape[0] - 2 * y0), min(2 * rw, scene.shape[1] - 2 * x0)
        nz, tmp = self.nonzero[:sh, :sw], self.nonzero_tmp[:sh, :sw]
        np.not_equal(scene[fy, fx, chans[0]], 0, out=nz)
        for si in chans[1:]:
            np.not_equal(scene[fy, fx, si], 0, out=tmp)
            np.logical_or(nz, tmp, out=nz)
        _all2x2(nz, self.valid[:rh, :rw])
        if has_mask:
            _all2x2(valid_mask[fy, fx], self.valid_tmp[:rh, :rw])
            np.logical_and(self.valid[:rh, :rw], self.valid_tmp[:rh, :rw], out=self.valid[:rh, :rw])
        for w in (self.scene, self.valid_mask):
            w.y0, w.x0 = y0, x0


class HalfScene:
    """The half grid as the discard guard's probe (flight.evidence) reads it: scene[y, ::sx, c] is the 2x2
    mean of that half-grid row's sampled pixels (the same sums as HalfGrid), valid[::sy, ::sx] their
    all-valid flag. Small temporaries bounded by the probe's sample, only for frames the policy drops."""

    def __init__(self, scene, h2: int, w2: int):
        self.full, self.shape = scene, (h2, w2, scene.shape[2])

    def __getitem__(self, key):
        y, xs, c = key
        h, w = self.full.shape[:2]
        x = np.arange(0, self.shape[1], xs.step or 1) * 2
        y0, y1, x1 = 2 * y, min(2 * y + 1, h - 1), np.minimum(x + 1, w - 1)
        f = self.full
        out = f[y0, x, c].astype(np.float32)
        out += f[y1, x, c]
        out += f[y0, x1, c]
        out += f[y1, x1, c]
        out *= np.float32(0.25)
        return out


class HalfValid:
    """valid_mask on the half grid for the probe: [::sy, ::sx] -> every scene pixel of the sampled blocks valid."""

    def __init__(self, valid_mask, h2: int, w2: int):
        self.full, self.h2, self.w2 = valid_mask, h2, w2

    def __getitem__(self, key):
        ys, xs = key
        h, w = self.full.shape
        y = np.arange(0, self.h2, ys.step or 1) * 2
        x = np.arange(0, self.w2, xs.step or 1) * 2
        y1, x1 = np.minimum(y + 1, h - 1), np.minimum(x + 1, w - 1)
        f = self.full
        return ((f[np.ix_(y, x)] != 0) & (f[np.ix_(y1, x)] != 0) & (f[np.ix_(y, x1)] != 0)
                & (f[np.ix_(y1, x1)] != 0))


class TileWorker:
    """One lane of the scan: its own tile buffers (TileLoader), mask buffer and runtime instance, and with
    a half-resolution model its HalfGrid."""

    def __init__(self, tile: int):
        self.loader = TileLoader(tile)
        self.mask = np.zeros((tile, tile), np.uint8)
        self.backend = None
        self.half: HalfGrid | None = None

    def bind(self, backend, channels: int, downsample: int = 1) -> None:
        self.backend = backend
        self.loader.bind(backend, channels)
        self.half = HalfGrid(self.loader.tile, channels) if downsample == 2 and backend is not None else None

    def visit(self, sc: "TileScanner", scene, idx, nx, h, w, src_idx, imap, mask_out, valid_mask) -> None:
        """Load, infer and count tile idx: its core's counts go to sc.t_*[idx] (and its core of mask_out)."""
        step, half, t = sc.step, sc.half, sc.tile
        ld = self.loader
        ty, tx = divmod(idx, nx)
        cy0, cx0 = ty * step, tx * step
        cy1, cx1 = min(cy0 + step, h), min(cx0 + step, w)
        wy0 = min(max(cy0 - half, 0), max(h - t, 0))
        wx0 = min(max(cx0 - half, 0), max(w - t, 0))
        sc.input.check_file()                            # the file may shrink mid-scan (one fstat per tile)
        src, vmask = scene, valid_mask
        if sc.downsample == 2:                           # the window's 2x2 means: the loader reads them instead
            hg = self.half
            with np.errstate(over="ignore", invalid="ignore"):
                hg.fill(scene, valid_mask, sc.half_channels, wy0, wx0, min(t, h - wy0), min(t, w - wx0),
                        valid_mask is not None)
            src, vmask = hg.scene, hg.valid_mask           # always: the half grid knows which blocks hold fill
        with np.errstate(over="ignore", invalid="ignore"):   # absurd values (an upset exponent) become
            ld.load(src, wy0, wx0, h, w, src_idx, imap, vmask)   # inf: invalid pixels, no warning
        sc.t_sample[idx], sc.t_bright[idx] = ld.count_bright(src_idx, imap)
        ti = sc.clock.perf_counter()
        self.backend.infer(ld.planes, self.mask)
        sc.t_infer[idx] = sc.clock.perf_counter() - ti
        ry0, ry1, rx0, rx1 = cy0 - wy0, cy1 - wy0, cx0 - wx0, cx1 - wx0
        m, v, hit = self.mask[ry0:ry1, rx0:rx1], ld.valid[ry0:ry1, rx0:rx1], ld.tmp[ry0:ry1, rx0:rx1]
        nv = int(np.count_nonzero(v))
        np.logical_and(ld.oor[ry0:ry1, rx0:rx1], v, out=hit)
        sc.t_oor[idx] = int(np.count_nonzero(hit))
        np.equal(m, CLOUD, out=hit)
        np.logical_and(hit, v, out=hit)
        nc = int(np.count_nonzero(hit))
        np.equal(m, SHADOW, out=hit)
        np.logical_and(hit, v, out=hit)
        sc.t_shadow[idx] = int(np.count_nonzero(hit))
        if mask_out is not None:
            np.logical_not(v, out=hit)
            if sc.downsample == 1:
                dst = mask_out[cy0:cy1, cx0:cx1]
                np.copyto(dst, m)
                np.copyto(dst, INVALID, where=hit)
            else:                                        # nearest upsampling: each pixel to its 2x2 block
                fh, fw = mask_out.shape
                for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                    dst = mask_out[2 * cy0 + dy:min(2 * cy1, fh):2, 2 * cx0 + dx:min(2 * cx1, fw):2]
                    ny_, nx_ = dst.shape
                    np.copyto(dst, m[:ny_, :nx_])
                    np.copyto(dst, INVALID, where=hit[:ny_, :nx_])
        d = sc.downsample
        sc.input.release_pages(scene, d * wy0, min(d * (wy0 + t), scene.shape[0]))
        sc.t_cloud[idx], sc.t_valid[idx], sc.t_area[idx] = nc, nv, (cy1 - cy0) * (cx1 - cx0)


class TileScanner:
    """The scan of one scene at a time. Buffers (per-tile arrays for max_tiles tiles, each worker's tile
    buffers) are allocated once here. bind() attaches the workers to ModelCustody's runtime instances
    (again only when custody.generation changed)."""

    PER_TILE_BYTES = 8 * 8 + 1                           # eight int64/float64 arrays and t_done (bool)

    def __init__(self, cfg, clock, workers: int = 1):
        self.config, self.clock = cfg, clock
        t, n = cfg.tile, cfg.max_tiles
        self.tile, self.step, self.half = t, t - cfg.overlap, cfg.overlap // 2
        self.t_cloud = np.zeros(n, np.int64)             # per tile core: valid cloud pixels,
        self.t_valid = np.zeros(n, np.int64)             # valid pixels,
        self.t_area = np.zeros(n, np.int64)              # scene pixels,
        self.t_done = np.zeros(n, bool)                  # visited (and counted),
        self.t_shadow = np.zeros(n, np.int64)            # valid shadow pixels,
        self.t_oor = np.zeros(n, np.int64)               # valid pixels outside the plausible reflectance range,
        self.t_infer = np.zeros(n, np.float64)           # seconds inside the runtime,
        self.t_sample = np.zeros(n, np.int64)            # valid pixels of the dark-scene sample,
        self.t_bright = np.zeros(n, np.int64)            # of which not implausibly dark
        ee = cfg.early_exit
        self.est = FractionEstimator(ee.method, ee.confidence, ee.sd_floor)
        self.input = SceneInput()
        self.downsample = 1                              # the bound model's input grid (card input_grid)
        self.half_channels: list[int] = []               # half grid: the scene channels averaged, model order
        self.workers = [TileWorker(t) for _ in range(max(1, workers))]
        self._generation = None
        self._job = None                                 # this round: (k0, count, the scene's arguments)
        self._errors: list = [None] * len(self.workers)
        self._closing = False
        self._threads: list[threading.Thread] = []
        if len(self.workers) > 1:
            self._start = threading.Barrier(len(self.workers))
            self._done = threading.Barrier(len(self.workers))
            for i in range(1, len(self.workers)):        # bounded by the worker count
                th = threading.Thread(target=self._helper, args=(i,), name=f"cloudgate-worker-{i}", daemon=True)
                th.start()
                self._threads.append(th)

    def close(self) -> None:
        """Stop the worker threads (they are parked between rounds)."""
        if self._threads and not self._closing:
            self._closing = True
            try:
                self._start.wait(timeout=5.0)
            except threading.BrokenBarrierError:
                pass
            for th in self._threads:
                th.join(timeout=5.0)
            self._threads = []

    def _helper(self, i: int) -> None:
        """Worker i (>= 1): each round, visit tile k0 + i of the visiting order if the round has one."""
        wk = self.workers[i]
        while True:
            try:
                self._start.wait()
            except threading.BrokenBarrierError:
                return
            if self._closing:
                return
            k0, count, stride, args = self._job
            if i < count:
                try:
                    wk.visit(self, args[0], ((k0 + i) * stride) % args[1], *args[2:])
                except BaseException as e:               # handed to the calling thread after the round
                    self._errors[i] = e
            try:
                self._done.wait()
            except threading.BrokenBarrierError:
                return

    def bind(self, custody) -> None:
        """Worker i runs custody.instances[i] (between scenes)."""
        if custody.generation == self._generation:
            return
        self._generation = custody.generation
        channels = custody.card.input_channels if custody.instances else 0
        self.downsample = getattr(custody.card, "downsample", 1) if custody.instances else 1
        for i, wk in enumerate(self.workers):
            wk.bind(custody.instances[i] if i < len(custody.instances) else None, channels, self.downsample)

    def prepare(self, src_idx: list[int]) -> list[int]:
        """Per scene: the loaders' plan. Half grid: the scene channels the model reads are averaged into
        channels 0..k-1 of HalfGrid (model order), so the loaders see those. Returns the loaders' src_idx."""
        if self.downsample == 2:
            self.half_channels = [si for si in src_idx if si >= 0]
            it = iter(range(len(self.half_channels)))
            src_idx = [next(it) if si >= 0 else si for si in src_idx]
        for wk in self.workers:
            wk.loader.prepare(src_idx)
        return src_idx

    def scan(self, scene, h, w, nx, n_tiles, src_idx, imap, mask_out, valid_mask, previous, t0) -> ScanCounts:
        """Visit the tiles in a spread order until all are done, the estimate is certain enough (early
        exit: both ends of the confidence bound in one policy band, valid share certainly enough), or the
        deadline passes. Per-tile counts land in self.t_*; scene totals in the returned ScanCounts."""
        cfg, est, step = self.config, self.est, self.step
        est.reset(n_tiles, step * step, h * w)
        self.t_done[:n_tiles] = False
        scan = ScanCounts()
        early_ok = cfg.early_exit.enabled and mask_out is None
        stride = golden_step(n_tiles)
        deadline = t0 + cfg.deadline_s
        n_workers = len(self.workers)
        args = (scene, n_tiles, nx, h, w, src_idx, imap, mask_out, valid_mask)
        k0, stop = 0, False
        while k0 < n_tiles and not stop:                  # bounded: every round advances k0 by >= 1
            count = min(n_workers, n_tiles - k0)
            self._round(k0, count, stride, args)
            for k in range(k0, k0 + count):               # commit in visiting order, stop checks per tile
                self._commit((k * stride) % n_tiles, scan)
                if est.n < n_tiles and early_ok and est.n >= cfg.early_exit.min_tiles:
                    c_lo, c_hi, valid_lo = est.bounds()
                    scan.bound = (c_lo, c_hi)
                    band = policy_band(c_lo, cfg.policy, previous)
                    if (band == policy_band(c_hi, cfg.policy, previous) != "mid"
                            and valid_lo >= cfg.policy.min_valid_fraction):
                        scan.early = stop = True
                        break
                if self.clock.monotonic() > deadline and est.n < n_tiles:
                    scan.deadline = stop = True
                    break
            k0 += count
        if mask_out is not None and est.n < n_tiles:      # deadline: no decision where no tile was visited
            d, (fh, fw) = self.downsample, mask_out.shape
            for idx in range(n_tiles):                    # bounded by the tile count
                if not self.t_done[idx]:
                    ty, tx = divmod(idx, nx)
                    mask_out[d * ty * step:min(d * (ty * step + step), fh),
                             d * tx * step:min(d * (tx * step + step), fw)] = INVALID
        return scan

    def _round(self, k0: int, count: int, stride: int, args) -> None:
        """Tiles k0 .. k0+count-1 of the visiting order, tile k0 + i on worker i; raises the first error."""
        scene, n_tiles = args[0], args[1]
        if count == 1 or len(self.workers) == 1:
            self.workers[0].visit(self, scene, (k0 * stride) % n_tiles, *args[2:])
            return
        self._job = (k0, count, stride, args)
        self._start.wait()
        try:
            self.workers[0].visit(self, scene, (k0 * stride) % n_tiles, *args[2:])
        except BaseException as e:                       # the others finish their tiles first
            self._errors[0] = e
        self._done.wait()
        self._job = None
        for i, e in enumerate(self._errors):             # bounded by the worker count
            if e is not None:
                self._errors = [None] * len(self.workers)
                raise e

    def _commit(self, idx: int, scan: ScanCounts) -> None:
        """Tile idx's counts into the estimator and the scene totals (in visiting order)."""
        nc, nv = int(self.t_cloud[idx]), int(self.t_valid[idx])
        self.t_done[idx] = True
        scan.cloud_px += nc
        scan.valid_px += nv
        scan.area_px += int(self.t_area[idx])
        scan.shadow_px += int(self.t_shadow[idx])
        scan.oor_px += int(self.t_oor[idx])
        scan.infer_s += float(self.t_infer[idx])
        scan.sample_px += int(self.t_sample[idx])
        scan.bright_px += int(self.t_bright[idx])
        self.est.add(nc, nv)
