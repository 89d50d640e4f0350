"""Decision: what the gate decided for one scene, and why (one decision-log record)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .logschema import DECISION_FIELDS, clear_tiles_record, degraded_text
from .policy import Action


@dataclass
class Decision:
    """What the gate decided for one scene, and why. Written to the decision log as one record
    (flight.logschema.FIELDS is the schema; docs/decision-log.md renders it).

    action           "downlink" | "discard" | "reacquire" | "fault"
    rule             which rule decided: "threshold" | "hysteresis" | "min_valid_fraction" | "early_exit" |
                     "deadline" | "fault"
    reason           one sentence: the comparison that decided, with the values and thresholds
    thresholds       policy thresholds in force (fractions 0..1; the target's hysteresis applied); {} on fault
    cloud_fraction   cloud pixels / valid pixels of the visited tiles (0..1)
    valid_fraction   valid pixels / scene pixels of the visited tiles (0..1)
    shadow_fraction  cloud-shadow pixels / valid pixels of the visited tiles (0..1)
    tiles_processed  tiles inferred; tiles_total: tiles in the scene; grid: (rows, cols) of tiles
    confidence_bound (low, high) bound on the scene cloud fraction (0..1); (cf, cf) after a full scan
    clear_tiles      [(row, col, cloud fraction)] in tile-core units (core_pixels scene pixels per step) of the
                     clear tiles to downlink when partial (the log record stores them as row runs, at most
                     flight.logschema.MAX_CLEAR_RUNS; clear_tiles_omitted counts the tiles beyond those)
    partial          only clear_tiles are to be downlinked (or kept, when reacquiring)
    early_exit       the scan stopped early on the confidence bound
    latency_s        seconds inside process() (monotonic clock); infer_s: inside the runtime, summed over the
                     tiles (with workers > 1 the tiles run in parallel, so it can exceed latency_s)
    tile_pixels      pixels of one model input window (tile²); core_pixels: side of a tile core in pixels
    model_name, model_sha256, backend, policy_version: what decided (card name, artifact sha256, runtime)
    package_sha256, model_slot: the signed package and A/B slot the model came from ("" when unsigned)
    degraded         events [{code, severity, text}] (flight.logschema.EVENT_CODES); [] when none
    fault, fault_code  why the frame faulted (text, flight.errors code); None otherwise
    scene_id, target_id, priority: the caller's arguments (as logged)
    hysteresis       the reason text when the target's previous action changed the action, else None
    scene_bytes      in-memory size of the scene array passed (every band, its dtype), 0 when unknown
    downlink_bytes   share of scene_bytes to downlink (clear-tile area share when partial; 0 unless downlink)
    log_seq          sequence number of the log record; None without a log or when the write failed
    """
    action: Action
    cloud_fraction: float
    valid_fraction: float
    rule: str = "threshold"
    reason: str = ""
    thresholds: dict = field(default_factory=dict)
    shadow_fraction: float = 0.0
    tiles_processed: int = 0
    tiles_total: int = 0
    confidence_bound: tuple[float, float] = (0.0, 1.0)
    clear_tiles: list = field(default_factory=list)
    clear_tiles_omitted: int = 0
    partial: bool = False
    early_exit: bool = False
    latency_s: float = 0.0
    infer_s: float = 0.0
    tile_pixels: int = 0
    core_pixels: int = 0
    model_name: str = ""
    model_sha256: str = ""
    package_sha256: str = ""
    model_slot: str = ""
    backend: str = ""
    policy_version: str = ""
    degraded: list = field(default_factory=list)
    fault: str | None = None
    fault_code: str | None = None
    scene_id: str = ""
    target_id: str | None = None
    priority: int = 0
    hysteresis: str | None = None
    grid: tuple[int, int] = (0, 0)
    scene_bytes: int = 0
    downlink_bytes: int = 0
    log_seq: int | None = None

    def to_record(self) -> dict:
        """The log record: exactly flight.logschema.DECISION_FIELDS, JSON types only."""
        rec = {k: getattr(self, k) for k in DECISION_FIELDS}
        rec["confidence_bound"] = list(self.confidence_bound)
        rec["grid"] = list(self.grid)
        rec["clear_tiles"], rec["clear_tiles_omitted"] = clear_tiles_record(self.clear_tiles)
        rec["degraded"] = [dict(e) for e in self.degraded]
        rec["thresholds"] = dict(self.thresholds)
        return rec

    @property
    def degraded_text(self) -> str:
        """The degraded events as one line ("code: text; ..."), for consoles."""
        return degraded_text(self.degraded)

