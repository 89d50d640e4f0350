"""Seeded fault injection. Each class has a rate (expected injections per frame); plan() draws the
schedule up front so a run is reproducible and the parent knows where hard kills go."""
from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

from flight.ports import SystemClock

FAULT_CLASSES = (
    "seu_frame",        # single-event upsets: bit flips in the frame bytes
    "seu_model_file",   # bit flip in a copy of the model file -> must be refused at load
    "seu_weights",      # bit flip in the loaded model image in RAM -> caught by the gate's scrub
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
    """The gate's backend-factory port: opens the real runtime (flight.backends.open_backend) behind a
    wrapper whose infer() can be stalled per frame (deadline_overrun), and keeps the verified model bytes
    the gate handed over (model_image), where seu_weights flips a bit as an upset in RAM would."""

    def __init__(self):
        self.stall_s = 0.0
        self.model_image: bytes | None = None
        self.on_infer = None                         # called before each inference (hil.killpoints.KillPoint)

    def __call__(self, path, model_bytes, kind, threads, tile, n_bands):
        from flight.backends import open_backend

        self.model_image = model_bytes
        return _StallableBackend(open_backend(path, model_bytes, kind, threads, tile, n_bands), self)


class _StallableBackend:
    """A backend (flight.backends.Backend) that sleeps factory.stall_s before each inference."""

    def __init__(self, inner, factory: FaultBackendFactory):
        self._inner, self._factory = inner, factory

    def __getattr__(self, name):                 # name, tile, n_bands, input_affine, input_range, planes
        return getattr(self._inner, name)

    def infer(self, planes, mask_out) -> None:
        if self._factory.on_infer is not None:
            self._factory.on_infer()
        if self._factory.stall_s:
            time.sleep(self._factory.stall_s)
        self._inner.infer(planes, mask_out)
