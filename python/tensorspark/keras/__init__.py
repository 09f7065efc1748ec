"""Keras 3 models on Spark: distributed training and inference.

- :func:`fit` trains a compiled Keras model on a DataFrame or RDD across
  Spark tasks against the parameter server, and returns the model with a
  :class:`History`.
- :func:`predict` adds a prediction column to a DataFrame by batched,
  distributed inference.
- :class:`~tensorspark.keras.layers.ParameterServerEmbedding` is an embedding
  table held by the parameter server; only a batch's rows travel.
- :class:`tensorspark.ml.KerasEstimator` wraps both as a Spark ML pipeline
  stage.
"""

import importlib
from typing import Any

from ._fit import FitResult, History, fit
from ._inference import predict

__all__ = ["FitResult", "History", "ParameterServerEmbedding", "fit", "layers", "predict"]


def __getattr__(name: str) -> Any:
    # Keras (and so TensorFlow) loads with the layers, on first use: a task
    # unpickling its function imports this package, and must claim its GPUs
    # (runtime.gpu) before TensorFlow loads.
    if name in ("layers", "ParameterServerEmbedding"):
        layers = importlib.import_module(f"{__name__}.layers")  # `from . import` would recurse
        return layers if name == "layers" else layers.ParameterServerEmbedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
