"""The decision-log record schema: the one table every writer and reader uses.

FIELDS lists every field of a record (name, JSON types, unit, meaning, who writes it). Decision.to_record
writes exactly the "decision" fields; DecisionLog.append adds the "log" fields; read_log validates
against FIELD_TYPES and returns records upgraded to SCHEMA_VERSION (upgrade()). docs/decision-log.md is
rendered from this table (render_markdown(); tests/test_decision_log.py checks the file matches).

Version history
  1  degraded was free text ("; "-joined); no rule / reason / thresholds
  2  degraded is a list of coded events {code, severity, text}; rule, reason, thresholds added
  3  model events (install, switch, rollback, self-test, ...) are records of their own ("kind":
     "model_event", written by model_event()); decisions name the signed package and slot their model
     came from (package_sha256, model_slot)
  4  clear_tiles as row runs [row, col_first, col_last, max cloud fraction], at most MAX_CLEAR_RUNS of them
     (clear_tiles_omitted counts the tiles beyond); upgrade() turns older [row, col, cf] entries into runs
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

SCHEMA_VERSION = 4
MAX_ID_CHARS = 256               # scene_id / target_id
MAX_CLEAR_RUNS = 4096            # clear_tiles runs per record (~25 bytes each: ~100 KiB, well inside 256 KiB)

_NUM = (int, float)
_OPT_STR = (str, type(None))

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = get_args(Severity)


@dataclass(frozen=True)
class EventCode:
    code: str
    severity: str
    meaning: str


# Events a decision can carry in "degraded" (F Prime style: a code and a severity per event).
EVENT_CODES: dict[str, EventCode] = {e.code: e for e in (
    EventCode("deadline", "warning", "the deadline stopped the tile scan; the decision uses the visited tiles only"),
    EventCode("partial_list_incomplete", "info", "the partial-downlink list covers the visited tiles only"),
    EventCode("low_valid_fraction", "warning", "valid fraction below policy.min_valid_fraction: too little data to judge"),
    EventCode("ambiguous_bright_surface", "warning", "the policy would have dropped this frame, but its bright pixels "
              "look like snow/ice (median green/blue at or below policy.discard_guard_green_blue): downlinked instead "
              "(rule ambiguous_surface; flight/evidence.py)"),
    EventCode("model_scrub_repaired", "warning", "the runtime's own model buffer (LiteRT: the flatbuffer the "
              "interpreter reads) failed its sha256 scrub; the model was reloaded verified before this frame"),
    EventCode("model_bist_recovered", "warning", "the known-answer self-test before this frame failed (or a runtime "
              "error preceded it); the model was reloaded or rolled back, verified and self-tested, before gating it"),
    # model events: records of their own (kind "model_event"), written between frames
    EventCode("model_loaded", "info", "the gate loaded a verified model (start, swap, reload) and it passed its "
              "known-answer self-test"),
    EventCode("model_install", "info", "a package verified (signature, card <-> model, self-test) in the standby slot"),
    EventCode("model_install_refused", "error", "a package was refused (signature, truncation, card <-> model "
              "mismatch, self-test); nothing active changed"),
    EventCode("model_install_no_space", "error", "an install was refused for lack of space on the store's file "
              "system (the package plus the margin kept for the logs); nothing was written or changed"),
    EventCode("model_downgrade_allowed", "warning", "a package older than the store's version high-water mark was "
              "installed or activated because the operator passed --allow-downgrade"),
    EventCode("model_metadata_missing", "warning", "the model file carries no CloudGate metadata to check its card "
              "against (an artifact exported before metadata; python -m flight model stamp adds it)"),
    EventCode("model_shadow", "info", "shadow mode: the installed, not yet activated model ran beside the active one "
              "on a frame (the text gives both actions, the cloud-fraction difference and the pixel agreement), or "
              "its shadow run started or ended (flight.shadow)"),
    EventCode("model_shadow_held", "warning", "an activation was held back: the slot's shadow run has too few frames "
              "or too low an action agreement with the active model (ModelStore shadow_frames / "
              "shadow_min_agreement)"),
    EventCode("model_switch", "info", "the active model changed (pointer switched and/or the gate swapped models)"),
    EventCode("model_switch_refused", "error", "a switch was refused: the target failed verification or its "
              "self-test; the running model stays"),
    EventCode("model_rollback", "warning", "back to the other slot (manual, or automatic: self-test failures or "
              "the new model's fault rate over the limit; the text says which)"),
    EventCode("model_reload", "warning", "the model was reloaded from its verified file or slot after a failed "
              "self-test, a failed scrub or a runtime error"),
    EventCode("bist_pass", "info", "periodic known-answer self-test on the running interpreter passed"),
    EventCode("bist_fail", "error", "known-answer self-test failed: the running interpreter's outputs differ from "
              "the reference (the text names the tiles)"),
    EventCode("model_unavailable", "error", "no model verifies (both slots, or the configured model): every frame "
              "faults model_corrupt until one does; recovery is retried"),
    EventCode("clear_tiles_truncated", "warning", f"the clear tiles form more than {MAX_CLEAR_RUNS} row runs: the "
              "record lists the first runs, clear_tiles_omitted counts the tiles left out (the Decision has them all)"),
    EventCode("log_write_failed", "error", "this decision could not be written to the decision log"),
    EventCode("legacy", "warning", "free-text note from a schema-1 log (read back as one event per '; ' part)"),
)}

# A decision's fault_code (action "fault", severity error: no decision was made on the frame): the code of the
# flight.errors class raised. The gate faults rather than warns whenever a decision would be confidently wrong.
FAULT_CODES: dict[str, str] = {
    "bad_scene_shape": "not (H, W, C), or mask_out / valid_mask of the wrong shape, or more tiles than max_tiles",
    "bad_scene_dtype": "unsupported scene dtype, or a radiometry pair that is not finite with scale > 0",
    "bad_argument": "scene_id / target_id / priority / band_names / radiometry of the wrong type or size "
                    "(radiometry must be a (scale, offset) pair, never a scalar)",
    "bad_valid_mask": "valid_mask not bool (or 0/1 integers)",
    "missing_band": "the scene lacks a band the model needs",
    "all_invalid": "every pixel is no-data, NaN/Inf or masked invalid",
    "implausible_radiometry": "not reflectance: integer DN without a radiometry scale; reflectance outside "
                              "[-0.5, 2.5] on most valid pixels (DN read as reflectance, x10000); or nearly every "
                              "sampled valid pixel darker than 0.01 in every band, which no sunlit scene is "
                              "(reflectance scaled twice, e.g. 0..1 data with radiometry=(1e-4, 0); a night frame)",
    "scene_file_truncated": "the file backing a memmap scene shrank under the mapping",
    "model_corrupt": "no verified model runs (verification, self-test or scrub failed and recovery found none)",
    "model_reload_failed": "the runtime refused to reopen the verified model (transient; retried next frame)",
    "out_of_memory": "an allocation failed while gating the frame",
    "internal": "anything unexpected (a runtime error): the model is self-tested before the next frame",
}


def event(code: str, text: str) -> dict:
    """A degraded-event record {code, severity, text}; code must be in EVENT_CODES."""
    return {"code": code, "severity": EVENT_CODES[code].severity, "text": text}


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple
    unit: str
    meaning: str
    writer: Literal["log", "decision", "event", "both"] = "decision"   # both: decision and model-event records


FIELDS: tuple[Field, ...] = (
    Field("schema", (int,), "-", f"record schema version (this table: {SCHEMA_VERSION})", "log"),
    Field("seq", (int,), "-", "record sequence number, +1 per record across rotations and restarts", "log"),
    Field("utc", (str,), "ISO 8601 UTC", "wall-clock time the record was written (may jump; use mono_ns to order)",
          "log"),
    Field("mono_ns", (int,), "ns", "monotonic clock when the record was written (this boot only)", "log"),
    Field("log_recreated", (bool,), "-", "present and true on the first record after the log file was deleted or "
                                         "replaced under the writer", "log"),
    Field("kind", (str,), "-", "record kind: absent on decisions; \"model_event\" on model events", "event"),
    Field("event", (str,), "-", "model event code (event table below: model_install, model_switch, "
                                "model_rollback, bist_pass, bist_fail, ...)", "event"),
    Field("severity", (str,), "-", "info | warning | error (of the model event)", "event"),
    Field("text", (str,), "-", "what happened, with the numbers (model event)", "event"),
    Field("duration_s", _NUM, "s", "how long the operation took (model event; 0 when not timed)", "event"),
    Field("action", (str,), "-", "downlink | discard | reacquire | fault"),
    Field("rule", (str,), "-", "which rule decided: threshold | hysteresis | min_valid_fraction | early_exit | "
                               "deadline | fault"),
    Field("reason", (str,), "-", "one sentence: the comparison that decided (values and thresholds)"),
    Field("thresholds", (dict,), "fraction 0..1 (reacquire_priority: int)",
          "policy thresholds in force for this frame, the target's hysteresis applied: downlink_max_cloud, "
          "discard_min_cloud, min_valid_fraction, reacquire_priority, reacquire_min_cloud, tile_clear_max "
          "(empty for a fault)"),
    Field("cloud_fraction", _NUM, "fraction 0..1", "cloud pixels / valid pixels of the visited tiles"),
    Field("valid_fraction", _NUM, "fraction 0..1", "valid pixels / scene pixels of the visited tiles"),
    Field("shadow_fraction", _NUM, "fraction 0..1", "cloud-shadow pixels / valid pixels of the visited tiles"),
    Field("confidence_bound", (list,), "fraction 0..1",
          "[low, high] bound on the scene cloud fraction (equal to cloud_fraction when every tile was visited)"),
    Field("tiles_processed", (int,), "tiles", "tiles inferred"),
    Field("tiles_total", (int,), "tiles", "tiles in the scene (grid rows x cols)"),
    Field("grid", (list,), "tiles", "[rows, cols] of the tile grid"),
    Field("tile_pixels", (int,), "pixels", "model input window of one tile (tile x tile, overlap included)"),
    Field("core_pixels", (int,), "pixels", "side of a tile core in scene pixels (tile - overlap; twice that "
                                           "for a model carded at half resolution, input_grid.downsample 2): "
                                           "clear_tiles row/col index the scene in steps of this many pixels"),
    Field("clear_tiles", (list,), "[row, col, col] in tile cores; fraction 0..1",
          "the clear tiles to downlink when partial, as row runs [[row, col_first, col_last, max cloud fraction "
          "of the run's tiles]] in row-major order (tile (r, c) covers scene rows r*core_pixels.. and cols "
          f"c*core_pixels..); at most {MAX_CLEAR_RUNS} runs (see clear_tiles_omitted)"),
    Field("clear_tiles_omitted", (int,), "tiles", f"clear tiles beyond the first {MAX_CLEAR_RUNS} runs, not listed "
                                                  "in clear_tiles (event clear_tiles_truncated); 0 normally"),
    Field("partial", (bool,), "-", "only clear_tiles are to be downlinked (or kept, when reacquiring)"),
    Field("early_exit", (bool,), "-", "the scan stopped early on a confidence bound"),
    Field("latency_s", _NUM, "s", "wall time inside process() (monotonic clock)"),
    Field("infer_s", _NUM, "s", "inside the inference runtime, summed over the tiles (with workers > 1 it can "
          "exceed latency_s)"),
    Field("scene_bytes", (int,), "bytes", "in-memory size of the scene array passed to process() (every band, "
                                          "its dtype), not the size of a downlink product; 0 when unknown"),
    Field("downlink_bytes", (int,), "bytes", "share of scene_bytes to downlink (scene_bytes x clear-tile area / "
                                             "scene area when partial; 0 for discard, reacquire, fault)"),
    Field("model_name", (str,), "-", "model card name", "both"),
    Field("model_sha256", (str,), "hex", "sha256 of the loaded model artifact (from its card)", "both"),
    Field("package_sha256", (str,), "hex", "sha256 of the signed package the model came from; empty for an "
                                           "unsigned card (the checkout / factory path)", "both"),
    Field("model_slot", (str,), "-", "A/B store slot the model came from (a | b); empty outside a store", "both"),
    Field("backend", (str,), "-", "litert | onnxruntime", "both"),
    Field("policy_version", (str,), "-", "policy.version of the gate config"),
    Field("degraded", (list,), "-", "events [{code, severity, text}] (codes in the event table below); empty "
                                    "when nothing was degraded"),
    Field("fault", _OPT_STR, "-", "why the frame faulted (free text), else null"),
    Field("fault_code", _OPT_STR, "-", "error code of the fault (flight.errors), else null"),
    Field("scene_id", (str,), "-", f"caller's scene id (<= {MAX_ID_CHARS} characters)"),
    Field("target_id", _OPT_STR, "-", f"caller's ground-target id (<= {MAX_ID_CHARS} characters); hysteresis "
                                      "applies per named target"),
    Field("priority", (int,), "-", "caller's priority (>= reacquire_priority: reacquire instead of discard)"),
    Field("hysteresis", _OPT_STR, "-", "set when the target's previous action changed this action (as reason)"),
)
FIELD_TYPES: dict[str, tuple] = {f.name: f.types for f in FIELDS}
DECISION_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.writer in ("decision", "both"))
EVENT_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.writer in ("event", "both"))
LOG_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.writer == "log")
_V1_TYPES = dict(FIELD_TYPES, degraded=_OPT_STR)
MODEL_EVENT = "model_event"


def model_event(code: str, text: str, *, model_name: str = "", model_sha256: str = "", package_sha256: str = "",
                model_slot: str = "", backend: str = "", duration_s: float = 0.0) -> dict:
    """A model-event record (EVENT_FIELDS; DecisionLog.append adds the log fields); code in EVENT_CODES."""
    return {"kind": MODEL_EVENT, "event": code, "severity": EVENT_CODES[code].severity, "text": str(text)[:4000],
            "model_name": model_name, "model_sha256": model_sha256, "package_sha256": package_sha256 or "",
            "model_slot": model_slot or "", "backend": backend, "duration_s": round(float(duration_s), 6)}


def is_model_event(rec: dict) -> bool:
    return rec.get("kind") == MODEL_EVENT


def validate_record(rec) -> str | None:
    """None if rec satisfies the record schema (of its own version), else the reason."""
    if not isinstance(rec, dict):
        return f"record is a JSON {type(rec).__name__}, not an object"
    seq = rec.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return f"record without a valid seq (got {seq!r:.40})"
    version = rec.get("schema", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        return f"unknown schema version {version!r:.40} (this reader knows 1..{SCHEMA_VERSION})"
    types_of = _V1_TYPES if version == 1 else FIELD_TYPES
    for k, types in types_of.items():
        if k in rec:
            v = rec[k]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                return f"field {k!r} has type {type(v).__name__}, expected {'/'.join(t.__name__ for t in types)}"
    for k, v in rec.items():  # numbers a reader can do arithmetic on (no 400-digit integers)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**63:
            return f"field {k!r} is an integer out of range"
    for k in ("scene_id", "target_id"):
        if isinstance(rec.get(k), str) and len(rec[k]) > MAX_ID_CHARS:
            return f"field {k!r} is {len(rec[k])} characters long (max {MAX_ID_CHARS})"
    kind = rec.get("kind")
    if kind is not None and kind != MODEL_EVENT:
        return f"unknown record kind {kind!r:.40}"
    if kind == MODEL_EVENT and (not isinstance(rec.get("event"), str) or rec.get("severity") not in SEVERITIES):
        return "model event without an event code and severity"
    ct = rec.get("clear_tiles")
    if isinstance(ct, list) and not all(isinstance(e, list) and len(e) in (3, 4) and all(
            isinstance(x, _NUM) and not isinstance(x, bool) for x in e) for e in ct):
        return "field 'clear_tiles' must be a list of [row, col_first, col_last, cloud] runs"
    deg = rec.get("degraded")
    if isinstance(deg, list) and not all(isinstance(e, dict) and isinstance(e.get("code"), str)
                                         and e.get("severity") in SEVERITIES for e in deg):
        return "field 'degraded' must be a list of {code, severity, text} events"
    return None


def clear_tile_runs(tiles) -> list[list]:
    """[(row, col, cloud fraction)] per tile -> row runs [[row, col_first, col_last, max cloud fraction]]
    (row-major; adjacent columns of one row merge)."""
    runs: list[list] = []
    for r, c, f in sorted((int(t[0]), int(t[1]), float(t[2])) for t in tiles):
        last = runs[-1] if runs else None
        if last is not None and last[0] == r and last[2] == c - 1:
            last[2], last[3] = c, max(last[3], round(f, 4))
        else:
            runs.append([r, c, c, round(f, 4)])
    return runs


def clear_tiles_record(tiles) -> tuple[list[list], int]:
    """The record's clear_tiles (at most MAX_CLEAR_RUNS runs) and clear_tiles_omitted (tiles left out)."""
    runs = clear_tile_runs(tiles)
    kept = runs[:MAX_CLEAR_RUNS]
    return kept, sum(r[2] - r[1] + 1 for r in runs[MAX_CLEAR_RUNS:])


def _clear_tiles_as_runs(rec: dict) -> dict:
    """Records before schema 4 list clear tiles one by one ([row, col, cf]): as runs (a copy)."""
    ct = rec.get("clear_tiles")
    if not ct or all(len(e) == 4 for e in ct):
        return rec
    r = dict(rec)
    r["clear_tiles"] = clear_tile_runs([e if len(e) == 3 else None for e in ct if len(e) == 3])
    r["clear_tiles"] += [list(e) for e in ct if len(e) == 4]
    r.setdefault("clear_tiles_omitted", 0)
    return r


def upgrade(rec: dict) -> dict:
    """A valid record of any version as a SCHEMA_VERSION record (a copy when anything changes): schema-1
    free-text degraded notes become "legacy" events; missing rule/reason/thresholds are filled."""
    rec = _clear_tiles_as_runs(rec)                  # keyed on the entries' shape, not the version number
    version = rec.get("schema", 1)
    if version >= SCHEMA_VERSION:
        return rec
    r = dict(rec)
    if version < 2:
        text = r.get("degraded")
        r["degraded"] = [event("legacy", part) for part in text.split("; ") if part] if text else []
        r.setdefault("rule", "fault" if r.get("action") == "fault" else "")
        r.setdefault("reason", r.get("fault") or "")
        r.setdefault("thresholds", {})
    r.setdefault("package_sha256", "")
    r.setdefault("model_slot", "")
    r.setdefault("clear_tiles_omitted", 0)
    return r


def degraded_text(events) -> str:
    """Events as one line ("code: text; ..."), for consoles."""
    return "; ".join(f"{e['code']}: {e['text']}" for e in events or ())


def render_markdown() -> str:
    """docs/decision-log.md, from this table."""
    out = [
        "# Decision log format",
        "",
        "<!-- generated from flight/logschema.py by `python -m flight log schema`; "
        "tests/test_decision_log.py checks it matches -->",
        "",
        f"Schema version: **{SCHEMA_VERSION}**. One JSON object per line: "
        '`{"crc32": <int>, "record": {...}}`, where crc32 is zlib.crc32 of the record serialised with sorted '
        "keys and compact separators. Files rotate by size: FILE.N (oldest) ... FILE.1, FILE. Read them with "
        "`flight.read_log` (validates, skips and reports damaged lines, upgrades older records) or "
        "`python -m flight log summary FILE`.",
        "",
        "## Record fields",
        "",
        "| field | type | unit | meaning | written by |",
        "|---|---|---|---|---|",
    ]
    for f in FIELDS:
        types = " or ".join("null" if t is type(None) else {"int": "integer", "float": "number", "str": "string",
                                                             "bool": "boolean", "list": "array",
                                                             "dict": "object"}[t.__name__] for t in f.types)
        if f.types == _NUM:
            types = "number"
        writer = {"log": "DecisionLog.append", "decision": "Decision.to_record", "event": "model_event",
                  "both": "Decision.to_record, model_event"}[f.writer]
        out.append(f"| `{f.name}` | {types} | {f.unit} | {f.meaning.replace('|', chr(92) + '|')} | {writer} |")
    out += ["", "## Events", "",
            "One table of coded events (F Prime style). Codes up to `model_bist_recovered` appear in a decision's "
            "`degraded` list; the `model_*` and `bist_*` codes are model-event records of their own "
            "(`\"kind\": \"model_event\"`, fields written by `model_event`: kind, event, severity, text, "
            "model_name, model_sha256, package_sha256, model_slot, backend, duration_s, plus the log fields), "
            "written by the gate to its decision log and by the model store (`python -m flight model ...`) to "
            "STORE/journal.jsonl.", "", "| code | severity | meaning |", "|---|---|---|"]
    out += [f"| `{e.code}` | {e.severity} | {e.meaning} |" for e in EVENT_CODES.values()]
    out += ["", "## Fault codes", "",
            "A fault decision (`action` \"fault\", `rule` \"fault\") carries no cloud fraction; `fault_code` says "
            "why (the flight.errors class; `process(strict=True)` raises it instead). Every fault is an error: the "
            "gate refuses to decide rather than decide confidently wrong.", "", "| fault_code | meaning |", "|---|---|"]
    out += [f"| `{c}` | {m} |" for c, m in FAULT_CODES.items()]
    out += ["", "## Rules", "",
            "`rule` names what decided the action: `threshold` (cloud fraction against the thresholds in force), "
            "`hysteresis` (the target's previous action widened its band and that changed the action), "
            "`min_valid_fraction` (too little valid data), `early_exit` (the threshold rule on a confidence bound "
            "after a sample of the tiles), `deadline` (the threshold rule on the tiles visited before the "
            "deadline), `fault` (no decision; see `fault_code`).",
            "", "## Versions", "",
            "- 1: `degraded` was free text joined by \"; \"; no `rule`, `reason`, `thresholds`, `core_pixels`. "
            "Readers upgrade such records: each part becomes a `legacy` event.",
            "- 2: `degraded` is a list of coded events; `rule`, `reason`, `thresholds`, `core_pixels` added.",
            "- 3: model-event records (`kind`, `event`, `severity`, `text`, `duration_s`); decisions "
            "carry `package_sha256` and `model_slot`. Readers upgrade older decisions with both empty.",
            f"- 4: `clear_tiles` as row runs `[row, col_first, col_last, max cloud fraction]`, at most "
            f"{MAX_CLEAR_RUNS} (a record stays far below the 256 KiB record limit whatever max_tiles is); "
            "`clear_tiles_omitted` counts tiles beyond them. Readers turn older per-tile entries into runs.", ""]
    return "\n".join(out)
