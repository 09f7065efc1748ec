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

from . import layers
from ._fit import FitResult, History, fit
from ._inference import predict
from .layers import ParameterServerEmbedding

__all__ = ["FitResult", "History", "ParameterServerEmbedding", "fit", "layers", "predict"]
