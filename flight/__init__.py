"""CloudGate flight segment: on-board cloud gating in fixed memory.

    from flight import CloudGate
    gate = CloudGate.from_model()
    d = gate.process(scene, band_names=("blue", "green", "red", "nir"), scene_id="S2A_...")

Dependencies: numpy, onnxruntime and/or ai-edge-litert; pyyaml at init only. Never torch or ground.
"""
from .config import EarlyExitConfig, GateConfig, LogConfig, PolicyConfig, config_from_dict, load_config
from .decisionlog import DecisionLog, read_log
from .errors import (AllInvalidSceneError, ArgumentError, BandMismatchError, CloudGateError, ConcurrentUseError,
                     ConfigError, DecisionLogBusyError, DecisionLogError, ImplausibleRadiometryError, ModelError,
                     ModelIntegrityError, ModelMissingError, SceneDtypeError, SceneError, SceneFileError,
                     SceneShapeError, ValidMaskError)
from .errors import ModelReloadError, OutOfMemoryError
from .gate import ACTIONS, CloudGate, Decision
from .ports import Clock, LogIO, LogSink, SystemClock

__all__ = [
    "ACTIONS", "AllInvalidSceneError", "ArgumentError", "BandMismatchError", "Clock", "CloudGate", "CloudGateError",
    "ConcurrentUseError", "ConfigError", "Decision", "DecisionLog", "DecisionLogBusyError", "DecisionLogError",
    "EarlyExitConfig", "GateConfig", "ImplausibleRadiometryError", "LogConfig", "LogSink", "ModelError", "ModelIntegrityError",
    "ModelMissingError", "PolicyConfig", "SceneDtypeError", "SceneError", "SceneFileError", "SceneShapeError",
    "SystemClock", "ValidMaskError", "config_from_dict", "load_config", "read_log",
    "LogIO", "ModelReloadError", "OutOfMemoryError",
]
