"""Seeded fault injection. Each class has a rate (expected injections per frame); plan() draws the
schedule up front so a run is reproducible and the parent knows where hard kills go."""
from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

from flight.ports import SystemClock

FAULT_CLASSES = (
    "seu_frame",        # single-event upsets: bit flips in the frame bytes
    "seu_model_file",   # bit flip in a copy of the model file -> must be refused at load
    "seu_weights",      # bit flips in the weights the runtime executes (hil.faults.runtime_weight_regions):
                        # caught by the gate's scrub (LiteRT's own buffer) or its known-answer self-test
    "truncated_frame",  # frame cut short (rows missing)
    "short_frame",      # frame missing bands (shape no longer matches its band list)
    "nan_burst",        # blocks of NaN / Inf (no-data fill for integer frames)
    "stuck_band",       # one band frozen at a constant
    "dead_band",        # one band all zero
    "saturation",       # a region at full scale
    "dropped_frame",    # frame never delivered
    "clock_jump",       # wall clock jumps (the log's UTC), monotonic clock unaffected
    "memory_pressure",  # ballast takes the address space RLIMIT_AS leaves, down to 64 KiB..budget/2, during the frame
    "deadline_overrun", # the runtime stalls: each tile takes longer than the deadline allows
    "hard_kill",        # SIGKILL inside the tile loop or DecisionLog.append (hil.killpoints); the harness restarts
    "log_short_write",  # the log's filesystem fills up mid-record (RLIMIT_FSIZE a few bytes past the end)
    "log_vanished",     # the decision log file is removed under the running gate (moved to OUT/vanished/)
    "implausible_radiometry",  # the frame arrives in the wrong units (DN without its scale, or x10000)
)
DEFAULT_RATES = {c: 0.0 for c in FAULT_CLASSES}


def parse_rates(spec: str | None) -> dict[str, float]:
    """'all:0.1,hard_kill:0.01' -> per-class rates."""
    rates = dict(DEFAULT_RATES)
    if not spec:
        return rates
    for part in spec.split(","):
        name, _, val = part.partition(":")
        name = name.strip()
        try:
            v = float(val)
        except ValueError:
            raise ValueError(f"fault rate {part!r}: use CLASS:RATE, e.g. nan_burst:0.1") from None
        if not 0 <= v <= 1:
            raise ValueError(f"fault rate {part!r}: rate must be in [0, 1]")
        if name == "all":
            rates = {c: v for c in FAULT_CLASSES}
        elif name in rates:
            rates[name] = v
        else:
            raise ValueError(f"unknown fault class {name!r}; known: {', '.join(FAULT_CLASSES)}")
    return rates


def plan(n_frames: int, rates: dict[str, float], seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_frames):
        out.append([c for c in FAULT_CLASSES if rates.get(c, 0) > 0 and rng.random() < rates[c]])
    return out


def flip_bits(buf: np.ndarray, n: int, rng: np.random.Generator) -> None:
    """Flip n random bits of a (contiguous, writeable) array in place."""
    raw = buf.reshape(-1).view(np.uint8)
    for _ in range(n):
        i = int(rng.integers(raw.size))
        raw[i] ^= np.uint8(1 << int(rng.integers(8)))


def flip_bit_in_bytes(b: bytes, rng: np.random.Generator) -> int:
    """Flip one bit inside an immutable bytes object's storage (an upset in RAM, not a Python-level
    change). Returns the byte offset."""
    header = sys.getsizeof(b"") - 1          # CPython bytes header size (ob_sval offset)
    i = int(rng.integers(len(b)))
    cell = ctypes.c_ubyte.from_address(id(b) + header + i)
    cell.value ^= 1 << int(rng.integers(8))
    return i


def apply_radiometry_fault(scene: dict) -> dict:
    """implausible_radiometry: integer DN lose their radiometry (read as reflectance); float reflectance
    arrives x10000 (a DN-like scale). The gate must fault, never gate the frame."""
    s = dict(scene)
    if s["bands"].dtype.kind in "iu":
        s["radiometry"] = None
    else:
        s["bands"] = s["bands"] * np.float32(10000.0)
        s["radiometry"] = None
    return s


def apply_frame_faults(scene: dict, faults: list[str], rng: np.random.Generator) -> dict:
    """Frame-level faults on a copy of the scene dict (bands, band_names, ...)."""
    s = dict(scene)
    bands = s["bands"]
    touched = any(f in faults for f in ("seu_frame", "nan_burst", "stuck_band", "dead_band", "saturation"))
    if touched:
        bands = np.array(bands, copy=True)
    h, w, c = bands.shape
    if "seu_frame" in faults:
        flip_bits(bands, int(rng.integers(1, 64)), rng)
    if "nan_burst" in faults:
        for _ in range(int(rng.integers(1, 6))):
            y, x = int(rng.integers(h)), int(rng.integers(w))
            bh, bw = int(rng.integers(1, max(2, h // 4))), int(rng.integers(1, max(2, w // 4)))
            if bands.dtype.kind == "f":
                bands[y:y + bh, x:x + bw] = rng.choice([np.nan, np.inf, -np.inf])
            else:
                bands[y:y + bh, x:x + bw] = 0
    if "stuck_band" in faults:
        k = int(rng.integers(c))
        bands[..., k] = bands[int(rng.integers(h)), int(rng.integers(w)), k]
    if "dead_band" in faults:
        bands[..., int(rng.integers(c))] = 0
    if "saturation" in faults:
        y, x = int(rng.integers(h)), int(rng.integers(w))
        full = np.iinfo(bands.dtype).max if bands.dtype.kind in "iu" else 1.5
        bands[y:y + h // 3 + 1, x:x + w // 3 + 1] = full
    if "truncated_frame" in faults:
        bands = bands[: max(1, int(h * rng.uniform(0.05, 0.9)))]
        if s.get("valid_mask") is not None:
            s["valid_mask"] = s["valid_mask"][: bands.shape[0]]
    if "short_frame" in faults:
        bands = bands[..., : max(1, c - int(rng.integers(1, c + 1)))]
    s["bands"] = bands
    return s


# ---------------------------------------------------------------- injectors plugged into the gate's ports
class FaultClock(SystemClock):
    """The gate's clock port (flight.ports.Clock): the host's clocks, plus a wall-clock offset the HIL
    arms per frame (clock_jump). Monotonic clocks never jump."""

    def __init__(self):
        self.wall_offset_s = 0.0

    def wall(self) -> float:
        return time.time() + self.wall_offset_s


class FaultBackendFactory:
    """The gate's backend-factory port: opens the real runtime behind a wrapper whose infer() can be
    stalled per frame (deadline_overrun), and keeps the last backend it opened (backend), whose executed
    weights seu_weights upsets (runtime_weight_regions / flip_runtime_weights). onnxruntime sessions are
    opened with pre-packing disabled, so the initializers it executes are the ones found in memory (with
    pre-packing its packed copies have no findable layout). model_image: the bytes the gate handed over
    (for LiteRT the very buffer the interpreter reads; for onnxruntime a copy it never reads)."""

    def __init__(self):
        self.stall_s = 0.0
        self.model_image: bytes | None = None
        self.backend = None
        self.opened = 0
        self.on_infer = None                         # called before each inference (hil.killpoints.KillPoint)
        self.infer_s, self.infers = 0.0, 0           # seconds spent in infer() (stalls included) and calls, as
                                                     # seen at the port (the harness resets them per frame)

    def __call__(self, path, model_bytes, kind, threads, tile, n_bands):
        from flight.backends import OrtBackend, open_backend

        self.model_image = model_bytes
        onnx = kind == "onnxruntime" or (kind == "auto" and str(path).endswith(".onnx"))
        if onnx:
            inner = OrtBackend(path, model_bytes, threads, tile, n_bands,
                               session_config={"session.disable_prepacking": "1"})
        else:
            inner = open_backend(path, model_bytes, kind, threads, tile, n_bands)
        self.backend = _StallableBackend(inner, self)
        self.backend.hil_onnx = model_bytes if onnx else None    # where its initializers are looked up
        self.opened += 1
        return self.backend


class _StallableBackend:
    """A backend (flight.backends.Backend) that sleeps factory.stall_s before each inference."""

    def __init__(self, inner, factory: FaultBackendFactory):
        self._inner, self._factory = inner, factory
        self.hil_onnx = None                     # harness-side bookkeeping of the weights (runtime_weight_regions)
        self.hil_regions = self.hil_weights = None

    def __getattr__(self, name):                 # name, tile, n_bands, input_affine, input_range, planes
        return getattr(self._inner, name)

    def infer(self, planes, mask_out) -> None:
        if self._factory.on_infer is not None:
            self._factory.on_infer()
        t0 = time.perf_counter()
        if self._factory.stall_s:
            time.sleep(self._factory.stall_s)
        self._inner.infer(planes, mask_out)
        self._factory.infer_s += time.perf_counter() - t0
        self._factory.infers += 1


# ---------------------------------------------------------------- upsets in the weights the runtime executes
def _litert_regions(inner) -> list[tuple[int, int]]:
    """LiteRT: the constant tensors (weights, biases) inside the buffer the interpreter was built from
    (located through the interpreter's own tensor data pointers)."""
    buf = inner.model_buffer
    base = id(buf) + sys.getsizeof(b"") - 1
    out = []
    for t in inner.it.get_tensor_details():
        try:
            v = inner.it.tensor(t["index"])()
        except ValueError:
            continue
        a, n = v.ctypes.data, v.nbytes
        del v
        if base <= a and a + n <= base + len(buf) and n >= 8:
            out.append((a, n, len(out)))
    return out


def _ort_regions(wrapper) -> list[tuple[int, int, int]]:
    """onnxruntime (pre-packing disabled): every copy in this process's anonymous memory of each int8 /
    int32 initializer of the model, found by its first 64 bytes. The session's own copy is among them
    (the others are dead parse copies, freed memory: flip_runtime_weights writes one only while it still
    holds the tensor, checked right before the write)."""
    import re

    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(wrapper.hil_onnx)
    pats = []
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        full = a.tobytes()                               # one copy (a second, freed one would be found too)
        head = full[:64]
        if a.nbytes >= 128 and a.dtype.kind in "iu" and len(set(head)) >= 24:   # distinctive: real weights
            pats.append((head, full))
    del m
    regions = []
    with open("/proc/self/maps") as f:
        maps = [ln.split() for ln in f]
    chunk, over = 4 << 20, 64                                # bounded reads (the gate runs under RLIMIT_AS)
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for parts in maps:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if "rw" not in parts[1] or (len(parts) > 5 and not parts[5].startswith("[heap")) or hi - lo > 1 << 30:
                continue
            pos = lo
            while pos < hi:
                try:
                    mem.seek(pos)
                    blob = mem.read(min(chunk + over, hi - pos))
                except OSError:
                    break
                for pid, (pat, full) in enumerate(pats):
                    for hit in re.finditer(re.escape(pat), blob):
                        if hit.start() >= chunk:
                            continue                        # found again by the next chunk
                        a = pos + hit.start()
                        try:
                            mem.seek(a)
                            if mem.read(len(full)) == full:  # a whole, live copy
                                regions.append((a, len(full), pid))
                        except OSError:
                            pass
                pos += chunk
    wrapper.hil_weights = {pid: full for pid, (_, full) in enumerate(pats)}
    return regions


def runtime_weight_regions(backend) -> list[tuple[int, int, int]]:
    """(address, bytes, group) of the weights the given backend's runtime executes, where the harness can
    reach them (group: copies of one tensor share it); cached on the backend."""
    if not isinstance(backend, _StallableBackend):
        raise TypeError("runtime_weight_regions needs a backend opened by FaultBackendFactory")
    if backend.hil_regions is None:
        inner = backend._inner
        backend.hil_regions = (_litert_regions(inner) if getattr(inner, "model_buffer", None) is not None else
                               _ort_regions(backend) if backend.hil_onnx is not None else [])
    return backend.hil_regions


def flip_runtime_weights(backend, n_bits: int, rng: np.random.Generator) -> list[int]:
    """Flip n_bits random bits in the runtime's executed weights (through /proc/self/mem, as an upset
    ignores page protection). onnxruntime: the same offset of one initializer is flipped in every copy
    found, so the session's own copy is hit. Returns the offsets flipped ([] when nothing is reachable).

    The copies found include dead ones: freed memory that still holds a parse copy. Writing there is
    harmless only while nothing owns it, so every flip is drawn first, and each copy is then re-checked and
    written with no heap allocation in between (pread into a buffer allocated up front; onnxruntime: one
    pwrite of the upset bytes prepared before the loop): an allocation between the check and the write could
    hand the freed copy to a live object, and the write would corrupt the heap (seen: "realloc(): invalid
    next size" after a 256-bit upset on onnxruntime). Returns [] when no copy was written."""
    regions = runtime_weight_regions(backend)
    if not regions:
        return []
    groups: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}
    for a, n, g in regions:                                  # the copies of one tensor form a group
        groups.setdefault(g, []).append(a)
        sizes[g] = n
    expect = backend.hil_weights                            # onnxruntime: what a live copy still holds
    if expect is not None:                                   # the reference bytes are a copy the scan found too:
        ours = {np.frombuffer(v, np.uint8).ctypes.data for v in expect.values()}   # never flip them (the check
        groups = {k: [a for a in v if a not in ours] for k, v in groups.items()}   # of later copies reads them)
    buf = bytearray(max(sizes.values()))
    views = {k: memoryview(buf)[:n] for k, n in sizes.items()}
    iovs = {k: [v] for k, v in views.items()}
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        def holds(k: int, a: int) -> bool:                   # the copy at a still holds tensor k
            try:
                return os.preadv(fd, iovs[k], a) == sizes[k] and (expect is None or views[k] == expect[k])
            except OSError:                                  # unmapped since the scan
                return False

        keys = sorted(k for k in groups if expect is None or any(holds(k, a) for a in groups[k]))
        plan: dict[int, dict[int, int]] = {}                # group -> {offset: xor mask}, drawn up front
        flipped = []
        for _ in range(n_bits if keys else 0):
            k = keys[int(rng.integers(len(keys)))]
            off, bit = int(rng.integers(sizes[k])), int(rng.integers(8))
            plan.setdefault(k, {})
            plan[k][off] = plan[k].get(off, 0) ^ (1 << bit)
            flipped.append(off)
        patched = {}                                    # onnxruntime: what every live copy becomes, made up front
        if expect is not None:
            for k, m in plan.items():
                b = bytearray(expect[k])
                for off, mask in m.items():
                    b[off] ^= mask
                patched[k] = bytes(b)
        todo = {k: list(m.items()) for k, m in plan.items()}
        copies = 0
        for k, items in todo.items():
            for a in groups[k]:
                if expect is not None:                   # check, then one pwrite of prepared bytes (its buffer
                    if holds(k, a):                      # is borrowed on the C stack: no heap allocation between)
                        try:
                            os.pwrite(fd, patched[k], a)
                            copies += 1
                        except OSError:
                            pass
                    continue
                if not holds(k, a):                      # LiteRT: the live model buffer (never freed)
                    continue
                for off, mask in items:
                    buf[off] ^= mask
                try:
                    os.pwritev(fd, iovs[k], a)
                    copies += 1
                except OSError:
                    pass
    finally:
        os.close(fd)
    backend.hil_copies_flipped = copies
    return flipped if copies else []                     # nothing written: no upset landed
