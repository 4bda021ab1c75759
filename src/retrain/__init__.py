"""retrain: a folder of labelled photos in, an accurate ONNX image classifier out, offline."""
__version__ = "0.1.0"

from .api import HeadConfig, TrainConfig, TrainedModel, evaluate, load, predict, train  # noqa: E402

__all__ = ["HeadConfig", "TrainConfig", "TrainedModel", "evaluate", "load", "predict", "train", "__version__"]
