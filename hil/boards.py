"""Board profiles as data (hil/boards/*.yaml); validation names the bad key."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

BOARDS_DIR = Path(__file__).parent / "boards"


class ProfileError(ValueError):
    def __init__(self, path, key: str, problem: str):
        self.key = key
        super().__init__(f"board profile {path}: key '{key}': {problem}")


@dataclass(frozen=True)
class Board:
    name: str
    cores: int
    threads: int
    memory_total_mib: float
    gate_budget_mib: float
    peak_gmacs: float
    derate: float
    host_overhead_factor: float
    power_modes: dict
    power_mode: str
    idle_w: float
    period_s: float
    deadline_s: float
    deadline_miss_allowance: float
    raw: dict

    @property
    def effective_gmacs(self) -> float:
        return self.peak_gmacs * self.derate

    @property
    def active_w(self) -> float:
        return float(self.power_modes[self.power_mode])

    def emulated_latency_s(self, macs: float, host_latency_s: float, host_infer_s: float) -> float:
        """Emulated board latency = model MACs / effective INT8 throughput
        + host-measured non-inference overhead x host_overhead_factor."""
        return macs / (self.effective_gmacs * 1e9) + max(host_latency_s - host_infer_s, 0.0) * self.host_overhead_factor

    def energy_j(self, latency_s: float) -> float:
        """Energy per frame: active power while gating, idle power for the rest of the frame period."""
        busy = min(latency_s, self.period_s)
        return self.active_w * busy + self.idle_w * (self.period_s - busy)


_SCHEMA = {  # dotted key -> (type, check, message)
    "name": (str, lambda v: bool(v), "non-empty string"),
    "cpu.cores": (int, lambda v: v >= 1, "integer >= 1"),
    "memory.total_mib": ((int, float), lambda v: v > 0, "positive number"),
    "memory.gate_budget_mib": ((int, float), lambda v: v > 0, "positive number"),
    "threads": (int, lambda v: v >= 1, "integer >= 1"),
    "int8.peak_gmacs": ((int, float), lambda v: v > 0, "positive number (GMAC/s)"),
    "int8.derate": ((int, float), lambda v: 0 < v <= 1, "number in (0, 1]"),
    "int8.source": (str, lambda v: bool(v), "where the number comes from"),
    "host_overhead_factor": ((int, float), lambda v: v > 0, "positive number"),
    "power.modes": (dict, lambda v: bool(v) and all(isinstance(x, (int, float)) and x > 0 for x in v.values()),
                    "mapping of mode -> watts > 0"),
    "power.mode": (str, lambda v: True, "one of power.modes"),
    "power.idle_w": ((int, float), lambda v: v >= 0, "number >= 0"),
    "power.source": (str, lambda v: bool(v), "where the number comes from"),
    "frame.period_s": ((int, float), lambda v: v > 0, "positive seconds"),
    "frame.deadline_s": ((int, float), lambda v: v > 0, "positive seconds"),
    "frame.deadline_miss_allowance": ((int, float), lambda v: 0 <= v < 1, "fraction in [0, 1)"),
}


def _get(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def load_board(name_or_path: str | Path) -> Board:
    p = Path(name_or_path)
    if not p.suffix:
        p = BOARDS_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in BOARDS_DIR.glob("*.yaml"))
        raise ProfileError(p, "<file>", f"not found; known boards: {known}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(p, "<file>", f"invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ProfileError(p, "<root>", "must be a mapping")
    for key, (typ, check, msg) in _SCHEMA.items():
        try:
            v = _get(raw, key)
        except KeyError:
            raise ProfileError(p, key, f"missing; expected {msg}") from None
        if not isinstance(v, typ) or isinstance(v, bool) or not check(v):
            raise ProfileError(p, key, f"got {v!r}; expected {msg}")
    if raw["power"]["mode"] not in raw["power"]["modes"]:
        raise ProfileError(p, "power.mode", f"{raw['power']['mode']!r} is not one of {list(raw['power']['modes'])}")
    if raw["frame"]["deadline_s"] > raw["frame"]["period_s"]:
        raise ProfileError(p, "frame.deadline_s", "must not exceed frame.period_s")
    if raw["threads"] > raw["cpu"]["cores"]:
        raise ProfileError(p, "threads", f"{raw['threads']} > cpu.cores {raw['cpu']['cores']}")
    return Board(name=raw["name"], cores=raw["cpu"]["cores"], threads=raw["threads"],
                 memory_total_mib=float(raw["memory"]["total_mib"]), gate_budget_mib=float(raw["memory"]["gate_budget_mib"]),
                 peak_gmacs=float(raw["int8"]["peak_gmacs"]), derate=float(raw["int8"]["derate"]),
                 host_overhead_factor=float(raw["host_overhead_factor"]), power_modes=dict(raw["power"]["modes"]),
                 power_mode=raw["power"]["mode"], idle_w=float(raw["power"]["idle_w"]),
                 period_s=float(raw["frame"]["period_s"]), deadline_s=float(raw["frame"]["deadline_s"]),
                 deadline_miss_allowance=float(raw["frame"]["deadline_miss_allowance"]), raw=raw)


def all_boards() -> list[str]:
    return sorted(p.stem for p in BOARDS_DIR.glob("*.yaml"))
