"""CloudGate flight segment: on-board cloud gating in fixed memory.

    from flight import CloudGate
    gate = CloudGate.from_model()
    d = gate.process(scene, band_names=("blue", "green", "red", "nir"), scene_id="S2A_...")

Dependencies: numpy, onnxruntime and/or ai-edge-litert; pyyaml at init only. Never torch or ground.
"""
from .config import EarlyExitConfig, GateConfig, LogConfig, PolicyConfig, config_from_dict, load_config
from .decisionlog import DecisionLog, read_log
from .errors import (AllInvalidSceneError, BandMismatchError, CloudGateError, ConfigError, DecisionLogError,
                     ModelError, ModelIntegrityError, ModelMissingError, SceneDtypeError, SceneError,
                     SceneShapeError)
from .gate import ACTIONS, CloudGate, Decision

__all__ = [
    "ACTIONS", "AllInvalidSceneError", "BandMismatchError", "CloudGate", "CloudGateError", "ConfigError", "Decision",
    "DecisionLog", "DecisionLogError", "EarlyExitConfig", "GateConfig", "LogConfig", "ModelError",
    "ModelIntegrityError", "ModelMissingError", "PolicyConfig", "SceneDtypeError", "SceneError", "SceneShapeError",
    "config_from_dict", "load_config", "read_log",
]
