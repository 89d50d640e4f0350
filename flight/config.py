"""Gate configuration: a YAML/dict validated once at init; every error names its key."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Union, get_args

from .bands import SENSOR_ALIASES, sensor_table_key
from .errors import ConfigError

MAX_TILES_LIMIT = 1 << 20   # preallocated per-tile statistics; the memory budget check comes on top
BackendName = Literal["auto", "litert", "onnxruntime"]        # auto: by the model file's suffix
BACKENDS: tuple[str, ...] = get_args(BackendName)
EarlyExitMethod = Literal["normal", "bernstein"]              # see flight.estimate
EARLY_EXIT_METHODS: tuple[str, ...] = get_args(EarlyExitMethod)
FsyncMode = Union[Literal["every", "never"], int]             # int N: fsync every N records
FSYNC_WORDS: tuple[str, ...] = ("every", "never")


@dataclass(frozen=True)
class PolicyConfig:
    version: str = "policy-2"          # policy-2: the discard guard (flight.evidence)
    downlink_max_cloud: float = 0.30    # cloud fraction at or below which the whole frame goes down
    discard_min_cloud: float = 0.70     # at or above: discard (Φsat-1's 70 % rule) or reacquire
    reacquire_priority: int = 2         # targets with priority >= this are re-acquired instead of discarded
    reacquire_min_cloud: float = 0.50   # between the thresholds, a high-priority target this cloudy is re-acquired
    hysteresis: float = 0.05            # widen the previous action's band by this much (per target)
    min_valid_fraction: float = 0.05    # below: too little valid data to judge -> discard/reacquire, degraded
    tile_clear_max: float = 0.10        # a tile is "clear" for partial downlink at or below this cloud fraction
    max_targets: int = 1024             # bounded hysteresis memory (targets remembered)
    # discard guard (flight.evidence): a frame the policy would drop is downlinked instead when at least
    # discard_guard_min_bright of its sampled valid pixels are bright and their median green/blue is at or
    # below discard_guard_green_blue (snow/ice-like); chosen by cross-validation (docs/results/cv.md); 0: off
    discard_guard_green_blue: float = 0.90
    discard_guard_min_bright: float = 0.10


@dataclass(frozen=True)
class EarlyExitConfig:
    enabled: bool = True
    method: EarlyExitMethod = "normal"  # normal | bernstein (flight.estimate explains both)
    confidence: float = 0.99            # two-sided confidence of the bound
    sd_floor: float = 0.1               # "normal" only: minimum tile-level standard deviation assumed
    min_tiles: int = 8


@dataclass(frozen=True)
class LogConfig:
    path: str | None = None
    fsync: FsyncMode = "every"          # "every" | "never" | N
    max_bytes: int = 16 << 20
    keep: int = 5


@dataclass(frozen=True)
class UpdateConfig:
    """In-orbit model update (flight.package, flight.slots; README "Updating the model in orbit")."""
    store: str | None = None            # A/B model store directory; the gate runs its active slot (null: no store)
    key: str | None = None              # mission key file (HMAC-SHA256); null: $CLOUDGATE_MISSION_KEY
    require_signed: bool = False        # refuse models that do not come from a signed package
    bist_every: int = 50                # known-answer self-test every N scenes (0: only at load and after errors)
    watch_active: bool = True           # follow activations made outside the gate (python -m flight model activate)
    rollback_window: int = 20           # scenes after a switch watched for the new model's fault rate
    rollback_fault_rate: float = 0.5    # model-attributable fault share in that window that rolls back (store)
    max_package_mib: float = 8.0        # a package larger than this is refused unread
    shadow_frames: int = 0              # activating a package that never ran needs a shadow run (flight.shadow) of
                                        # at least this many frames beside the active model (0: no shadow run needed)
    shadow_min_agreement: float = 0.0   # ... with at least this action agreement (0..1; needs shadow_frames >= 1)


@dataclass(frozen=True)
class GateConfig:
    model: str | None = None            # .tflite / .onnx / model card .yaml; None = shipped default
    backend: BackendName = "auto"       # auto (by suffix) | litert | onnxruntime
    threads: int = 2                    # runtime threads in all: each of N workers' interpreters gets threads // N (>= 1)
    workers: int | str = "auto"         # tile workers, each with its own interpreter: "auto" (the cores this process
                                        # may use: its CPU affinity, which the HIL pins to the board profile's cores;
                                        # capped by threads and memory_budget_mib) or 1, 2, ...; bit-identical
                                        # whatever the count
    tile: int = 256
    overlap: int = 16
    memory_budget_mib: float = 32.0     # gate-owned buffers (the runtime's own arena is measured in bench/)
    max_tiles: int = 4096               # preallocated per-scene statistics; 10980² at tile 256 needs 2116
    sensor: str | None = None           # band-id table for bare sensor ids, e.g. landsat8 (B2..B5); see flight.bands
    radiometry_scale: float = 1.0       # reflectance = value * scale + offset (DN inputs)
    radiometry_offset: float = 0.0
    deadline_s: float = 10.0
    strict: bool = False
    scrub_every: int = 1                # re-hash the runtime's own model buffer every N scenes (0 = never)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    log: LogConfig = field(default_factory=LogConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)


def _build(cls, data, prefix: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(prefix + str(k), f"unknown key; known keys: {sorted(known)}")
        sub = ({"policy": PolicyConfig, "early_exit": EarlyExitConfig, "log": LogConfig, "update": UpdateConfig}.get(k)
               if cls is GateConfig else None)
        if sub is not None:
            kwargs[k] = _build(sub, v, prefix + k + ".")
            continue
        default = known[k].default
        key = prefix + k
        if v is None:
            if default is None:                           # model, log.path, update.store: None means "not set"
                kwargs[k] = None
                continue
            raise ConfigError(key, "is empty (a key without a value); give a value or remove the key")
        if k == "workers" and cls is GateConfig:
            if v != "auto" and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(key, f"expected 'auto' or a worker count, got {v!r}")
        elif k == "fsync" and cls is LogConfig:
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise ConfigError(key, f"expected 'every', 'never' or a record count, got {v!r}")
        elif default is None or isinstance(default, str):
            if not isinstance(v, str):
                raise ConfigError(key, f"expected a string, got {type(v).__name__} {v!r}")
        else:
            want = type(default)
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is not bool and isinstance(v, bool)):
                raise ConfigError(key, f"expected {want.__name__}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def validate(cfg: GateConfig) -> GateConfig:
    def need(ok: bool, key: str, problem: str):
        if not ok:
            raise ConfigError(key, problem)

    need(cfg.backend in BACKENDS, "backend", f"choose one of {', '.join(BACKENDS)}")
    need(1 <= cfg.threads <= 64, "threads", "must be 1..64")
    need(cfg.workers == "auto" or (isinstance(cfg.workers, int) and 1 <= cfg.workers <= 64), "workers",
         "must be 'auto' or 1..64")
    need(32 <= cfg.tile <= 4096 and cfg.tile % 16 == 0, "tile", "must be a multiple of 16 in 32..4096")
    need(0 <= cfg.overlap < cfg.tile // 2 and cfg.overlap % 2 == 0, "overlap", "must be even and < tile/2")
    need(cfg.memory_budget_mib > 0, "memory_budget_mib", "must be > 0")
    need(1 <= cfg.max_tiles <= MAX_TILES_LIMIT, "max_tiles", f"must be 1..{MAX_TILES_LIMIT}")
    need(math.isfinite(cfg.radiometry_scale) and cfg.radiometry_scale > 0, "radiometry_scale",
         "must be a finite number > 0 (reflectance = value * scale + offset)")
    need(math.isfinite(cfg.radiometry_offset), "radiometry_offset", "must be a finite number")
    need(cfg.deadline_s > 0, "deadline_s", "must be > 0 seconds")
    need(cfg.sensor is None or sensor_table_key(cfg.sensor) in SENSOR_ALIASES, "sensor",
         f"unknown sensor; known: {', '.join(sorted(SENSOR_ALIASES))}")
    need(cfg.scrub_every >= 0, "scrub_every", "must be >= 0 (0 disables the model scrub)")
    p = cfg.policy
    need(0 <= p.downlink_max_cloud < p.discard_min_cloud <= 1, "policy.downlink_max_cloud",
         "need 0 <= downlink_max_cloud < discard_min_cloud <= 1")
    need(p.downlink_max_cloud <= p.reacquire_min_cloud <= p.discard_min_cloud, "policy.reacquire_min_cloud",
         "must lie between downlink_max_cloud and discard_min_cloud")
    need(0 <= p.hysteresis < (p.discard_min_cloud - p.downlink_max_cloud) / 2, "policy.hysteresis",
         "must be >= 0 and less than half the gap between the thresholds")
    need(0 <= p.min_valid_fraction < 1, "policy.min_valid_fraction", "must be in [0, 1)")
    need(0 <= p.tile_clear_max <= 1, "policy.tile_clear_max", "must be in [0, 1]")
    need(1 <= p.max_targets <= 1_000_000, "policy.max_targets", "must be 1..1000000")
    need(0 <= p.discard_guard_green_blue <= 2, "policy.discard_guard_green_blue", "must be in [0, 2] (0 disables the guard)")
    need(0 < p.discard_guard_min_bright <= 1, "policy.discard_guard_min_bright", "must be in (0, 1]")
    e = cfg.early_exit
    need(0.5 <= e.confidence < 1, "early_exit.confidence", "must be in [0.5, 1)")
    need(e.min_tiles >= 1, "early_exit.min_tiles", "must be >= 1")
    need(e.method in EARLY_EXIT_METHODS, "early_exit.method", f"choose one of {', '.join(EARLY_EXIT_METHODS)}")
    need(0 <= e.sd_floor <= 0.5, "early_exit.sd_floor", "must be in [0, 0.5]")
    lg = cfg.log
    need(lg.fsync in FSYNC_WORDS or (isinstance(lg.fsync, int) and lg.fsync >= 1), "log.fsync",
         "use 'every', 'never' or a positive record count")
    need(lg.max_bytes >= 4096, "log.max_bytes", "must be >= 4096")
    need(1 <= lg.keep <= 1000, "log.keep", "must be 1..1000")
    u = cfg.update
    need(0 <= u.bist_every <= 1_000_000, "update.bist_every", "must be 0..1000000 (0: self-test only at load and "
                                                              "after errors)")
    need(1 <= u.rollback_window <= 10_000, "update.rollback_window", "must be 1..10000 scenes")
    need(0 < u.rollback_fault_rate <= 1, "update.rollback_fault_rate", "must be in (0, 1]")
    need(0.01 <= u.max_package_mib <= 1024, "update.max_package_mib", "must be 0.01..1024 MiB")
    need(0 <= u.shadow_frames <= 1_000_000, "update.shadow_frames", "must be 0..1000000 frames (0: an activation "
                                                                      "needs no shadow run)")
    need(0 <= u.shadow_min_agreement <= 1, "update.shadow_min_agreement", "must be in [0, 1] (the share of shadow "
                                                                           "frames with the active model's action)")
    need(u.shadow_min_agreement == 0 or u.shadow_frames >= 1, "update.shadow_min_agreement",
         "needs update.shadow_frames >= 1 (without shadow frames there is no agreement to measure): set "
         "update.shadow_frames or drop update.shadow_min_agreement")
    need(not (u.store and cfg.model), "update.store", "a gate runs either the store's active slot or the configured "
                                                      "model: drop one of update.store and model")
    return cfg


def config_from_dict(data: dict | None) -> GateConfig:
    return validate(_build(GateConfig, data or {}, ""))


def load_config(path: str | Path) -> GateConfig:
    import yaml  # init-time only

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", f"{path} is not UTF-8 text ({e}); save it as UTF-8") from e
    except OSError as e:
        raise ConfigError("<file>", f"cannot read {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"{path} is not valid YAML: {e}") from e
    cfg = config_from_dict(data)
    from dataclasses import replace

    if cfg.model and not Path(cfg.model).is_absolute():  # model paths are relative to the config file
        cfg = replace(cfg, model=str((path.parent / cfg.model).resolve()))
    for k in ("store", "key"):                          # so are the store and the key file
        v = getattr(cfg.update, k)
        if v and not Path(v).is_absolute():
            cfg = replace(cfg, update=replace(cfg.update, **{k: str((path.parent / v).resolve())}))
    return cfg
