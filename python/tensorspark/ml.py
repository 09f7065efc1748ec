"""Spark ML pipeline stages for Keras models.

Estimators: :class:`KerasEstimator` (any model), :class:`KerasClassifier`
and :class:`KerasRegressor`; ``fit(df)`` trains with
:func:`tensorspark.keras.fit` and returns :class:`KerasModel`,
:class:`KerasClassificationModel` or :class:`KerasRegressionModel`, whose
``transform(df)`` adds the prediction columns by batched, distributed
inference (:func:`tensorspark.keras.predict`):

- ``KerasModel``: ``prediction``, the model's raw output (a float, or an
  array of floats).
- ``KerasClassificationModel``: as Spark ML's classifiers,
  ``rawPrediction`` (a vector of margins), ``probability`` (a vector) and
  ``prediction`` (the class index, a double), so the evaluators,
  ``CrossValidator`` and ``TrainValidationSplit`` read them. The model may
  end in softmax, in one sigmoid unit (binary), or give logits (a loss
  with ``from_logits=True``); ``outputKind`` says which when that cannot
  be told from the model. Several classes: ``rawPrediction`` is the
  logits (for a probability output, its log, the probabilities clipped
  to ``[1e-15, 1]`` first) and ``probability = softmax(rawPrediction)``.
  One unit (binary), as LogisticRegression: ``probability`` is
  ``[1 - p, p]`` and ``rawPrediction`` is ``[-z, z]``, ``z`` the log-odds
  (``p`` clipped to ``[1e-15, 1 - 1e-15]`` first for a sigmoid output).
  Labels are class indices, doubles as ``StringIndexer`` gives them,
  checked in the tasks and fed as int64 for a sparse categorical loss.
- ``KerasRegressionModel``: ``prediction``, a double.

Every fit starts from the model as the estimator was given it (a compiled
model is kept as its ``.keras`` bytes; a builder function is called
again), so the folds of a ``CrossValidator`` do not continue each other's
training; ``copy`` gives an independent estimator. ``epochs``,
``batchSize`` and ``learningRate`` are Params for ``ParamGridBuilder``.

A fitted model saves and loads like any Spark ML model
(``model.write().overwrite().save(path)``, ``KerasModel.load(path)``, or
inside a ``PipelineModel``): the Params as Spark ML metadata JSON, the Keras
model as its ``.keras`` bytes in a Parquet file beside it, so any
Hadoop-compatible path Spark can write works.

The estimators save and load the same way (``KerasClassifier.load(path)``),
so an unfitted ``Pipeline``, a ``CrossValidatorModel`` and a
``TrainValidationSplitModel`` save too: the Params, ``fit_options`` (plain
data only: numbers, strings, bools, None, lists and dicts of those; a
callback, a DataFrame or the ``secret`` is refused, naming the option, to be
dropped before saving and set again after loading) and the model as every
fit starts from it. A builder function is saved pickled by cloudpickle, as
Spark ships Python functions: loading it runs code, as loading any pickle
does, so load only files you trust, with the same Python and TensorFlow
(a builder defined in a module is saved by reference, its module must then
be importable).
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
)
from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)

from .errors import TensorSparkValueError
from .runtime.spark import Cluster

_MODEL_DIR = "keras_model"


class _KerasParams(HasFeaturesCol, HasLabelCol, HasPredictionCol):
    batchSize: Param[int] = Param(
        Params._dummy(),
        "batchSize",
        "rows per training or inference batch",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(batchSize=32)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setBatchSize(self, value: int) -> _KerasParams:
        return self._set(batchSize=value)

    def setFeaturesCol(self, value: str) -> _KerasParams:
        return self._set(featuresCol=value)

    def setPredictionCol(self, value: str) -> _KerasParams:
        return self._set(predictionCol=value)


# Keyword arguments of the classifier and its model beyond the shared ones
# (defaults: rawPrediction, probability, auto).
_CLASSIFIER_KEYS = ("rawPredictionCol", "probabilityCol", "outputKind")


class _ClassifierParams(HasRawPredictionCol, HasProbabilityCol):
    outputKind: Param[str] = Param(
        Params._dummy(),
        "outputKind",
        "what the model outputs: auto (told from its loss and last activation), "
        "probabilities or logits",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(outputKind="auto")

    @staticmethod
    def own(params: dict[str, Any]) -> dict[str, Any]:
        """Takes the classifier's own keyword arguments out of ``params``."""
        return {k: params.pop(k) for k in _CLASSIFIER_KEYS if k in params}

    def getOutputKind(self) -> str:
        return self.getOrDefault(self.outputKind)

    def setOutputKind(self, value: str) -> _ClassifierParams:
        return self._set(outputKind=value)

    def setRawPredictionCol(self, value: str) -> _ClassifierParams:
        return self._set(rawPredictionCol=value)

    def setProbabilityCol(self, value: str) -> _ClassifierParams:
        return self._set(probabilityCol=value)


def _built_with_learning_rate(builder: Callable[[], Any], value: float) -> Any:
    """Run the user's builder and set its optimizer's rate (in the driver and the tasks)."""
    from .keras import _spec

    model = builder()
    _spec.check_compiled(model, "the model builder")
    return _spec.set_learning_rate(model, value)


class KerasEstimator(Estimator, _KerasParams, MLWritable, MLReadable):
    """Train a Keras model on a DataFrame as a Spark ML estimator.

    Each fit trains a fresh copy of the model as given (see the module
    docstring), so the estimator can be fitted again, copied and searched
    by ``CrossValidator``.

    Parameters
    ----------
    model : keras.Model or callable
        A compiled Keras model, or a function that builds and compiles one.
    featuresCol, labelCol, predictionCol : str
        Column names (``features``, ``label``, ``prediction``).
    epochs, batchSize, syncInterval : int
        As in :func:`tensorspark.keras.fit`.
    consistency : str
        ``"async"``, ``"sync"`` or ``"ssp"``.
    update : str
        ``"delta"`` or ``"gradient"``.
    learningRate : float, optional
        The optimizer's learning rate for this fit; default the compiled
        optimizer's.
    fit_options : dict, optional
        Further keyword arguments for :func:`tensorspark.keras.fit`
        (``callbacks``, ``validation_data``, ``log_dir``, ``progress``...);
        ``{"mlflow": True}`` logs each fit as one MLflow run. Saved with
        the estimator when they are plain data (see the module docstring).

    Examples
    --------
    >>> est = KerasEstimator(model=build, featuresCol="pixels", epochs=3)  # doctest: +SKIP
    >>> fitted = est.fit(train_df)  # doctest: +SKIP
    >>> fitted.transform(test_df).select("label", "prediction").show()  # doctest: +SKIP
    """

    epochs: Param[int] = Param(
        Params._dummy(), "epochs", "passes over the data", typeConverter=TypeConverters.toInt
    )
    syncInterval: Param[int] = Param(
        Params._dummy(),
        "syncInterval",
        "local steps between push-and-pull",
        typeConverter=TypeConverters.toInt,
    )
    consistency: Param[str] = Param(
        Params._dummy(), "consistency", "async, sync or ssp", typeConverter=TypeConverters.toString
    )
    staleness: Param[int] = Param(
        Params._dummy(), "staleness", "the ssp bound", typeConverter=TypeConverters.toInt
    )
    update: Param[str] = Param(
        Params._dummy(), "update", "delta or gradient", typeConverter=TypeConverters.toString
    )
    learningRate: Param[float] = Param(
        Params._dummy(),
        "learningRate",
        "the optimizer's learning rate (default: the compiled optimizer's)",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(
        self,
        model: Any = None,
        *,
        featuresCol: str = "features",
        labelCol: str = "label",
        predictionCol: str = "prediction",
        epochs: int = 1,
        batchSize: int = 32,
        syncInterval: int = 10,
        consistency: str = "async",
        staleness: int = 0,
        update: str = "delta",
        learningRate: float | None = None,
        fit_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._setDefault(
            epochs=1, syncInterval=10, consistency="async", staleness=0, update="delta"
        )
        self._set(
            featuresCol=featuresCol,
            labelCol=labelCol,
            predictionCol=predictionCol,
            epochs=epochs,
            batchSize=batchSize,
            syncInterval=syncInterval,
            consistency=consistency,
            staleness=staleness,
            update=update,
        )
        if learningRate is not None:
            self._set(learningRate=learningRate)
        self.model = model
        self.fit_options = dict(fit_options or {})
        self.history = None  # the History of the last fit

    @property
    def model(self) -> Any:
        """The compiled model or builder function that every fit starts from."""
        if self._model is None and self._initial is not None:  # a loaded estimator's
            from .keras import _spec

            self._model = _spec.from_bytes(self._initial, self.fit_options.get("custom_objects"))
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        self._model, self._initial = value, None
        # A compiled model is kept as it is now: later fits must not start
        # from weights an earlier fit trained. (No Keras import for a builder.)
        keras = sys.modules.get("keras")
        if keras is not None and isinstance(value, keras.Model):
            from .keras import _spec

            self._initial = _spec.to_bytes(value)

    def getLearningRate(self) -> float | None:
        """The learning rate set for fits, or None (the compiled optimizer's)."""
        return self.getOrDefault(self.learningRate) if self.isDefined(self.learningRate) else None

    def setLearningRate(self, value: float) -> KerasEstimator:
        return self._set(learningRate=value)

    def copy(self, extra: dict[Param, Any] | None = None) -> KerasEstimator:
        """A copy with its own ``fit_options`` and history (and ``extra`` Params)."""
        that = super().copy(extra)
        that.fit_options = dict(self.fit_options)
        that.history = None
        return that

    def _model_for_fit(self) -> Any:
        """A fresh compiled model (or builder) for one fit, at this fit's learning rate."""
        from .keras import _spec

        name = type(self).__name__
        if self._model is None and self._initial is None:
            raise TensorSparkValueError(
                f"{name} needs a model: {name}(model=<compiled keras.Model or builder function>)"
            )
        lr = self.getLearningRate()
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise TensorSparkValueError(f"{name}: learningRate must be > 0, got {lr!r}")
        if self._initial is not None:
            model = _spec.from_bytes(self._initial, self.fit_options.get("custom_objects"))
            _spec.check_compiled(model, name)
            return model if lr is None else _spec.set_learning_rate(model, lr)
        if lr is None or not callable(self._model):
            return self._model  # fit() refuses what is neither a model nor a builder
        return functools.partial(_built_with_learning_rate, self._model, lr)

    def _fit_output(self) -> str | None:
        """What ``fit`` checks of the model and its labels (see ``keras._fit._label_kind``)."""
        return None

    def _fitted(self, model: Any) -> KerasModel:
        return KerasModel(
            model,
            featuresCol=self.getOrDefault(self.featuresCol),
            predictionCol=self.getOrDefault(self.predictionCol),
        )

    def _fit(self, dataset: Any) -> KerasModel:
        from .keras import fit

        get = self.getOrDefault
        model, self.history = fit(
            self._model_for_fit(),
            dataset,
            features_col=get(self.featuresCol),
            label_col=get(self.labelCol),
            epochs=get(self.epochs),
            batch_size=get(self.batchSize),
            sync_interval=get(self.syncInterval),
            consistency=get(self.consistency),
            staleness=get(self.staleness),
            update=get(self.update),
            _output=self._fit_output(),
            **self.fit_options,
        )
        return self._fitted(model)

    def write(self) -> MLWriter:
        """Saves the Params, ``fit_options`` and the model (see the module docstring)."""
        return _KerasWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _KerasReader(cls)


class KerasClassifier(KerasEstimator, _ClassifierParams):
    """A Keras model as a Spark ML classifier.

    Takes :class:`KerasEstimator`'s parameters and these:

    Parameters
    ----------
    rawPredictionCol, probabilityCol : str
        The vector columns the fitted model adds (``rawPrediction``,
        ``probability``); an empty name skips one.
    outputKind : {"auto", "probabilities", "logits"}
        What the model outputs; ``"auto"`` tells it from the compiled loss
        (``from_logits=True``: logits) and the last activation (softmax or
        one sigmoid unit: probabilities) and refuses an ambiguous model.

    The label column holds class indices (0.0, 1.0, ...; e.g. from
    ``StringIndexer``); compile with ``sparse_categorical_crossentropy`` (n
    outputs) or ``binary_crossentropy`` (one output).
    """

    def __init__(self, model: Any = None, **params: Any) -> None:
        own = _ClassifierParams.own(params)
        super().__init__(model, **params)
        self._set(**own)

    def _fit_output(self) -> str | None:
        return self.getOutputKind()

    def _fitted(self, model: Any) -> KerasClassificationModel:
        from .keras import _spec

        kind, _ = _spec.classifier_output(model, self.getOutputKind())
        get = self.getOrDefault
        return KerasClassificationModel(
            model,
            featuresCol=get(self.featuresCol),
            predictionCol=get(self.predictionCol),
            rawPredictionCol=get(self.rawPredictionCol),
            probabilityCol=get(self.probabilityCol),
            outputKind=kind,
        )


class KerasRegressor(KerasEstimator):
    """A Keras model with one output value per row as a Spark ML regressor.

    Takes :class:`KerasEstimator`'s parameters; the fitted model's
    ``prediction`` is a double.
    """

    def _fit_output(self) -> str | None:
        return "regression"

    def _fitted(self, model: Any) -> KerasRegressionModel:
        return KerasRegressionModel(
            model,
            featuresCol=self.getOrDefault(self.featuresCol),
            predictionCol=self.getOrDefault(self.predictionCol),
        )


class KerasModel(Model, _KerasParams, MLWritable, MLReadable):
    """A trained Keras model as a Spark ML transformer.

    ``transform(df)`` adds ``predictionCol``: a float for a model with one
    output value, else an array of floats (e.g. class probabilities).

    Parameters
    ----------
    model : keras.Model
        The trained model.
    featuresCol, predictionCol : str
        Input and output columns.
    batchSize : int
        Rows per inference batch.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        featuresCol: str = "features",
        predictionCol: str = "prediction",
        batchSize: int = 1024,
    ) -> None:
        super().__init__()
        self._set(featuresCol=featuresCol, predictionCol=predictionCol, batchSize=batchSize)
        self.model = model
        self._loads = None
        self._uncounted = False

    @property
    def model_loads(self) -> int | None:
        """Times a Python worker loaded the model in the last transform's jobs.

        None after a transform under Spark Connect, which has no
        accumulators to count them with.
        """
        if self._uncounted:
            return None
        return 0 if self._loads is None else int(self._loads.value)

    def _output_columns(self) -> Any:
        """The columns ``transform`` adds (``keras._inference.OutputColumns``); None: raw."""
        return None

    def _transform(self, dataset: Any) -> Any:
        from .keras import predict

        if self.model is None:
            raise TensorSparkValueError(f"{type(self).__name__}.transform: there is no model")
        cluster = Cluster(dataset.sparkSession)
        self._loads, self._uncounted = cluster.accumulator(), cluster.connect
        return predict(
            self.model,
            dataset,
            features_col=self.getOrDefault(self.featuresCol),
            prediction_col=self.getOrDefault(self.predictionCol),
            batch_size=self.getBatchSize(),
            load_counter=self._loads,
            _output=self._output_columns(),
        )

    def write(self) -> MLWriter:
        return _KerasWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _KerasReader(cls)


class KerasClassificationModel(KerasModel, _ClassifierParams):
    """A trained Keras classifier: ``transform`` adds Spark ML's classifier columns.

    ``rawPredictionCol`` and ``probabilityCol`` (vectors; an empty name
    skips one) and ``predictionCol`` (the class index, a double); see the
    module docstring for how each output kind maps onto them.

    Parameters
    ----------
    model : keras.Model
        The trained model.
    featuresCol, predictionCol, rawPredictionCol, probabilityCol : str
        Input and output columns.
    outputKind : {"auto", "probabilities", "logits"}
        What the model outputs (a fitted model has it resolved).
    batchSize : int
        Rows per inference batch.
    """

    def __init__(self, model: Any = None, **params: Any) -> None:
        own = _ClassifierParams.own(params)
        super().__init__(model, **params)
        self._set(**own)

    @property
    def numClasses(self) -> int:
        """The number of classes (2 for a model with one output unit)."""
        from .keras import _spec

        return max(2, _spec.output_width(self.model, "KerasClassificationModel"))

    def _output_columns(self) -> Any:
        from .keras import _inference, _spec

        kind, width = _spec.classifier_output(self.model, self.getOutputKind())
        get = self.getOrDefault
        return _inference.OutputColumns(
            kind,
            get(self.predictionCol),
            width,
            raw_prediction=get(self.rawPredictionCol),
            probability=get(self.probabilityCol),
        )


class KerasRegressionModel(KerasModel):
    """A trained Keras regressor: ``transform`` adds ``predictionCol`` as a double."""

    def _output_columns(self) -> Any:
        from .keras import _inference, _spec

        _spec.regression_output(self.model)
        return _inference.OutputColumns("regression", self.getOrDefault(self.predictionCol))


_PLAIN_DATA = "numbers, strings, bools, None and lists or dicts of those"


def _not_plain(value: Any) -> str | None:
    """What in ``value`` is not plain JSON data (None when all of it is)."""
    if value is None or isinstance(value, (bool, str, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"the float {value!r}"
    if isinstance(value, list):
        return next((w for w in map(_not_plain, value) if w), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"the dict key {k!r}"
            what = _not_plain(v)
            if what:
                return what
        return None
    if isinstance(value, tuple):
        return "a tuple (a list of plain values is saved)"
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__}"


def _savable_fit_options(name: str, fit_options: dict[str, Any]) -> dict[str, Any]:
    """``fit_options`` as saved: plain data only, never the secret; else a clear error."""
    for key, value in fit_options.items():
        if key == "secret":
            raise TensorSparkValueError(
                f"{name}.save: fit option 'secret' is never saved; drop it before saving "
                "(del estimator.fit_options['secret']) and set it again after loading"
            )
        what = _not_plain(value)
        if what:
            raise TensorSparkValueError(
                f"{name}.save: fit option {key!r} holds {what}, which cannot be saved (only "
                f"{_PLAIN_DATA} are); drop it before saving (del estimator.fit_options[{key!r}]) "
                "and set it again after loading"
            )
    return dict(fit_options)


class _KerasWriter(MLWriter):
    """Saves any of the six stages: Spark ML metadata JSON, and the model in a Parquet file.

    The metadata holds the Params, ``modelKind`` (``"keras"``: ``.keras``
    bytes in the Parquet column ``keras``; ``"builder"``: the builder
    function pickled by cloudpickle in the column ``builder``; null: no
    model) and, for an estimator, ``fitOptions``.
    """

    def __init__(self, instance: KerasEstimator | KerasModel) -> None:
        super().__init__()
        self.instance = instance

    def _model_blob(self) -> tuple[str | None, bytes | None]:
        instance, name = self.instance, type(self.instance).__name__
        if isinstance(instance, KerasModel):
            if instance.model is None:
                raise TensorSparkValueError(f"{name}.save: there is no model to save")
            from .keras import _spec

            return "keras", _spec.to_bytes(instance.model)
        if instance._initial is not None:
            return "keras", instance._initial  # the model as every fit starts from it
        if instance._model is None:
            return None, None
        if not callable(instance._model):
            raise TensorSparkValueError(
                f"{name}.save: the model is a {type(instance._model).__name__}, neither a "
                "compiled keras.Model nor a builder function"
            )
        from pyspark import cloudpickle

        try:
            return "builder", cloudpickle.dumps(instance._model)
        except Exception as e:
            raise TensorSparkValueError(
                f"{name}.save: the model builder cannot be pickled ({type(e).__name__}: {e}); "
                "save an estimator made from the compiled model instead"
            ) from e

    def saveImpl(self, path: str) -> None:
        instance, name = self.instance, type(self.instance).__name__
        extra: dict[str, Any] = {}
        if isinstance(instance, KerasEstimator):  # checked before anything is written
            extra["fitOptions"] = _savable_fit_options(name, instance.fit_options)
        kind, blob = self._model_blob()
        extra["modelKind"] = kind
        DefaultParamsWriter.saveMetadata(instance, path, self.sparkSession, extraMetadata=extra)
        if blob is not None:
            frame = self.sparkSession.createDataFrame([(bytearray(blob),)], f"{kind} binary")
            frame.coalesce(1).write.parquet(f"{path.rstrip('/')}/{_MODEL_DIR}")


class _KerasReader(MLReader):
    """Loads what :class:`_KerasWriter` saved (a saved subclass loads as itself)."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> Any:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        module, _, name = metadata["class"].rpartition(".")
        try:  # as Spark's DefaultParamsReader: the class the metadata names
            saved = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            saved = None
        if not (isinstance(saved, type) and issubclass(saved, self.cls)):
            raise TensorSparkValueError(
                f"{self.cls.__name__}.load: {path} holds a {metadata['class']}, not a "
                f"{self.cls.__name__}"
            )
        instance = saved()
        instance._resetUid(metadata["uid"])  # a validator's saved param grid names it
        DefaultParamsReader.getAndSetParams(instance, metadata)
        if isinstance(instance, KerasEstimator):
            instance.fit_options = dict(metadata.get("fitOptions") or {})
        kind = metadata.get("modelKind", "keras")
        if kind is None:
            return instance
        blob = self._blob(path, kind)
        if kind == "builder":
            from pyspark import cloudpickle

            instance.model = cloudpickle.loads(blob)
        elif isinstance(instance, KerasEstimator):
            # Loaded when first used, with the fit_options' custom_objects.
            instance._model, instance._initial = None, blob
        else:
            from .keras import _spec

            instance.model = _spec.from_bytes(blob)
        return instance

    def _blob(self, path: str, kind: str) -> bytes:
        where = f"{path.rstrip('/')}/{_MODEL_DIR}"
        rows = self.sparkSession.read.parquet(where).collect()
        if len(rows) != 1 or kind not in rows[0].asDict():
            raise TensorSparkValueError(
                f"{self.cls.__name__}.load: {where} should hold one {kind!r} model, found "
                f"{len(rows)} rows"
            )
        return bytes(rows[0][kind])
