"""Typed errors of the flight gate. Each message says what to fix.

CloudGateError
├── ConfigError            bad gate config (raised at init; .key names the offending key)
├── ModelError
│   ├── ModelMissingError  model file or model card not found
│   └── ModelIntegrityError sha256 mismatch with the model card, or a file the runtime refuses
├── SceneError             raised by process(strict=True); a fault decision otherwise
│   ├── SceneShapeError    not (H, W, C), or mask_out / valid_mask of the wrong shape
│   ├── SceneDtypeError    unsupported dtype
│   ├── BandMismatchError  the scene lacks a band the model needs (.missing lists them)
│   └── AllInvalidSceneError every pixel is no-data / NaN / masked
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
                         "(pass band_names in canonical or sensor names, e.g. ('blue','green','red','nir'))")


class AllInvalidSceneError(SceneError):
    code = "all_invalid"


class DecisionLogError(CloudGateError, OSError):
    code = "log_error"


class DecisionLogBusyError(DecisionLogError):
    code = "log_busy"
