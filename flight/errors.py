"""Typed errors of the flight gate. Each message says what to fix.

CloudGateError
├── ConfigError            bad gate config (raised at init; .key names the offending key)
├── ModelError
│   ├── ModelMissingError  model file or model card not found
│   ├── ModelIntegrityError sha256 mismatch with the model card, or a file the runtime refuses
│   └── ModelReloadError   the scrub's reload of a verified model was refused by the runtime (transient,
│                          typically memory; retried on the next frame)
├── SceneError             raised by process(strict=True); a fault decision otherwise
│   ├── SceneShapeError    not (H, W, C), or mask_out / valid_mask of the wrong shape
│   ├── SceneDtypeError    unsupported dtype (bool, complex, object, text, dates, > 64-bit); says what to pass
│   ├── BandMismatchError  the scene lacks a band the model needs (.missing lists them)
│   ├── AllInvalidSceneError every pixel is no-data / NaN / masked
│   ├── ArgumentError      priority / target_id / scene_id / band_names / radiometry of the wrong type or size
│   ├── ValidMaskError     valid_mask not bool (or 0/1 integers)
│   ├── ImplausibleRadiometryError integer DN without a radiometry scale, reflectance far outside
│   │                      the physical range on most valid pixels, or implausibly dark for a sunlit scene
│   └── SceneFileError     the file backing a memmap scene shrank under the mapping
├── OutOfMemoryError       an allocation failed while gating a frame (MemoryError, e.g. under RLIMIT_AS)
├── ConcurrentUseError     process() entered from a second thread while running (one gate per thread)
└── DecisionLogError       the decision log cannot be opened, or a record could not be written whole
    └── DecisionLogBusyError another writer holds the log (one writer per log)
"""
from __future__ import annotations


class CloudGateError(Exception):
    """Base of every error the gate raises on purpose."""

    code = "error"


class ConfigError(CloudGateError, ValueError):
    code = "bad_config"

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key '{key}': {problem}")


class ModelError(CloudGateError):
    code = "bad_model"


class ModelMissingError(ModelError, FileNotFoundError):
    code = "model_missing"


class ModelIntegrityError(ModelError):
    code = "model_corrupt"


class ModelReloadError(ModelError):
    """The model bytes verified against the card (they opened at start-up), but the runtime refused to
    open them again when the scrub reloaded: not a corrupt model, a transient runtime failure (under
    memory pressure LiteRT can fail with no message at all). The frame faults; the next one retries."""
    code = "model_reload_failed"


class SceneError(CloudGateError, ValueError):
    code = "bad_scene"


class SceneShapeError(SceneError):
    code = "bad_scene_shape"


class SceneDtypeError(SceneError):
    code = "bad_scene_dtype"


class BandMismatchError(SceneError):
    code = "missing_band"

    def __init__(self, missing: list[str], available: list[str]):
        self.missing = list(missing)
        super().__init__(f"scene lacks band(s) {self.missing} that the model needs; scene bands are {list(available)} "
                         "(pass band_names in canonical or sensor names, e.g. ('blue','green','red','nir'); bare "
                         "Landsat ids such as 'B2'..'B5' need the gate config key sensor, e.g. sensor: landsat8)")


class AllInvalidSceneError(SceneError):
    code = "all_invalid"


class ArgumentError(SceneError):
    code = "bad_argument"


class ValidMaskError(SceneError):
    code = "bad_valid_mask"


class ImplausibleRadiometryError(SceneError):
    code = "implausible_radiometry"


class SceneFileError(SceneError):
    code = "scene_file_truncated"


class OutOfMemoryError(CloudGateError, MemoryError):
    """An allocation failed while gating one frame (the process is at its memory limit); the frame is a
    fault decision and the loop carries on (process(strict=True) raises this instead)."""
    code = "out_of_memory"


class ConcurrentUseError(CloudGateError, RuntimeError):
    """Raised (never turned into a fault decision) when a second thread enters process() of a gate that
    is still running: a runtime interpreter and the gate's buffers serve one caller at a time."""
    code = "gate_busy"


class DecisionLogError(CloudGateError, OSError):
    code = "log_error"


class DecisionLogBusyError(DecisionLogError):
    code = "log_busy"
