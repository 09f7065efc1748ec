"""Spark ML pipeline stages for Keras models: :class:`KerasEstimator` and
:class:`KerasModel`.

``KerasEstimator.fit(df)`` trains with :func:`tensorspark.keras.fit`;
``KerasModel.transform(df)`` adds a prediction column by batched,
distributed inference (:func:`tensorspark.keras.predict`). A fitted
``KerasModel`` saves and loads like any Spark ML model
(``model.write().overwrite().save(path)``, ``KerasModel.load(path)``, or
inside a ``PipelineModel``): the Params as Spark ML metadata JSON, the Keras
model as its ``.keras`` bytes in a Parquet file beside it, so any
Hadoop-compatible path Spark can write works.
"""

from __future__ import annotations

from typing import Any

from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasLabelCol, HasPredictionCol
from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)

from .errors import TensorSparkValueError

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


class KerasEstimator(Estimator, _KerasParams):
    """Train a Keras model on a DataFrame as a Spark ML estimator.

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
    fit_options : dict, optional
        Further keyword arguments for :func:`tensorspark.keras.fit`
        (``callbacks``, ``validation_data``, ``log_dir``, ``progress``...);
        ``{"mlflow": True}`` logs each fit as one MLflow run.

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
        self.model = model
        self.fit_options = dict(fit_options or {})
        self.history = None  # the History of the last fit

    def _fit(self, dataset: Any) -> KerasModel:
        from .keras import fit

        if self.model is None:
            raise TensorSparkValueError(
                "KerasEstimator needs a model: KerasEstimator(model=<compiled keras.Model or "
                "builder function>)"
            )
        get = self.getOrDefault
        model, self.history = fit(
            self.model,
            dataset,
            features_col=get(self.featuresCol),
            label_col=get(self.labelCol),
            epochs=get(self.epochs),
            batch_size=get(self.batchSize),
            sync_interval=get(self.syncInterval),
            consistency=get(self.consistency),
            staleness=get(self.staleness),
            update=get(self.update),
            **self.fit_options,
        )
        return KerasModel(
            model, featuresCol=get(self.featuresCol), predictionCol=get(self.predictionCol)
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

    @property
    def model_loads(self) -> int:
        """Times a Python worker loaded the model in the last transform's jobs."""
        return 0 if self._loads is None else int(self._loads.value)

    def _transform(self, dataset: Any) -> Any:
        from .keras import predict

        self._loads = dataset.sparkSession.sparkContext.accumulator(0)
        return predict(
            self.model,
            dataset,
            features_col=self.getOrDefault(self.featuresCol),
            prediction_col=self.getOrDefault(self.predictionCol),
            batch_size=self.getBatchSize(),
            load_counter=self._loads,
        )

    def write(self) -> MLWriter:
        return _KerasModelWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _KerasModelReader(cls)


class _KerasModelWriter(MLWriter):
    def __init__(self, instance: KerasModel) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        from .keras import _spec

        if self.instance.model is None:
            raise TensorSparkValueError("KerasModel.save: there is no model to save")
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession)
        blob = _spec.to_bytes(self.instance.model)
        frame = self.sparkSession.createDataFrame([(bytearray(blob),)], "keras binary")
        frame.coalesce(1).write.parquet(f"{path.rstrip('/')}/{_MODEL_DIR}")


class _KerasModelReader(MLReader):
    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> KerasModel:
        from .keras import _spec

        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        instance = self.cls()
        DefaultParamsReader.getAndSetParams(instance, metadata)
        rows = self.sparkSession.read.parquet(f"{path.rstrip('/')}/{_MODEL_DIR}").collect()
        if len(rows) != 1:
            raise TensorSparkValueError(
                f"KerasModel.load: {path}/{_MODEL_DIR} should hold one model, found {len(rows)}"
            )
        instance.model = _spec.from_bytes(bytes(rows[0]["keras"]))
        return instance
