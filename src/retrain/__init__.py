"""retrain: a folder of labelled photos in, an accurate ONNX image classifier out, offline.

The Python API (retrain.train, retrain.load, retrain.predict, retrain.evaluate, TrainConfig,
HeadConfig, TrainedModel, ServeConfig) is loaded on first use, so `retrain --help` and the modules that need
none of it do not pay for ONNX Runtime and PyTorch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {"train": "api", "TrainConfig": "api", "TrainedModel": "api", "evaluate": "api", "HeadConfig": "api",
        "load": "api", "predict": "api", "ServeConfig": "webconfig"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'retrain' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
