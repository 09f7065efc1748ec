"""Batched, distributed inference: add a prediction column to a DataFrame.

The model travels once per job in a Spark broadcast (``.keras`` bytes) and is
loaded once per Python worker process: later tasks and batches on that
worker reuse it (Spark reuses Python workers between tasks). In a task, the
next batch's Arrow columns are decoded on a second thread while the model
runs on this one, and TensorFlow gets the task's ``spark.task.cpus``
threads (bench/inference.py measures it against plain Keras).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import TensorSparkValueError
from ..runtime import feed as _feed
from ..runtime.spark import Cluster
from . import _spec

# Models loaded in this Python worker, by the driver's key (the newest few).
_LOADED: dict[str, Any] = {}
_KEEP = 2


# Probabilities are clipped to [_TINY, 1 - _TINY] before their log, so margins stay finite.
_TINY = 1e-15


@dataclass(frozen=True)
class OutputColumns:
    """The columns ``predict`` adds, computed from each batch's model output.

    ``kind``: ``"raw"`` (the output as it is: a float, or an array of
    floats), ``"regression"`` (a double), or a classifier's
    ``"probabilities"`` / ``"logits"``: ``rawPrediction`` (margins, a
    vector), ``probability`` (a vector) and ``prediction`` (the class
    index, a double), as Spark ML's classifiers. An empty name skips that
    column, as in Spark ML.
    """

    kind: str
    prediction: str
    width: int = 1  # output values per row
    raw_prediction: str = ""
    probability: str = ""

    def names(self) -> list[str]:
        if self.kind in ("raw", "regression"):
            return [self.prediction] if self.prediction else []
        return [c for c in (self.raw_prediction, self.probability, self.prediction) if c]

    def fields(self) -> list[Any]:
        """The new columns' Spark fields, in :meth:`names` order."""
        from pyspark.ml.linalg import VectorUDT
        from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField

        if self.kind == "raw":
            kind = FloatType() if self.width == 1 else ArrayType(FloatType(), False)
            return [StructField(self.prediction, kind, False)]
        if self.kind == "regression":
            return [StructField(self.prediction, DoubleType(), False)]
        vector = {self.raw_prediction, self.probability}
        return [
            StructField(c, VectorUDT() if c in vector else DoubleType(), False)
            for c in self.names()
        ]

    def arrays(self, y: np.ndarray) -> list[Any]:
        """The new columns from a batch's output ``y`` (rows, width), as Arrow arrays."""
        import pyarrow as pa

        if self.kind == "raw":
            if self.width == 1:
                return [pa.array(y[:, 0], type=pa.float32())]
            return [_lists(pa, y, pa.float32())]
        if self.kind == "regression":
            return [pa.array(y[:, 0].astype(np.float64), type=pa.float64())]
        raw, prob = _margins_and_probabilities(y.astype(np.float64), self.kind == "logits")
        by_name = {
            self.raw_prediction: lambda: _dense_vectors(pa, raw),
            self.probability: lambda: _dense_vectors(pa, prob),
            self.prediction: lambda: pa.array(
                np.argmax(prob, axis=1).astype(np.float64), type=pa.float64()
            ),
        }
        return [by_name[c]() for c in self.names()]


def _margins_and_probabilities(y: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """``rawPrediction`` and ``probability`` rows of a batch's output.

    Several units: the logits and their softmax; for a probability output,
    its log and itself. One unit is binary, as Spark's LogisticRegression:
    ``[-z, z]`` and ``[1 - p, p]``, ``z`` the log-odds and ``p = sigmoid(z)``.
    """
    if y.shape[1] == 1:
        if logits:
            z = y[:, 0]
            p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        else:
            p = y[:, 0]
            q = np.clip(p, _TINY, 1.0 - _TINY)
            z = np.log(q) - np.log1p(-q)
        return np.stack([-z, z], axis=1), np.stack([1.0 - p, p], axis=1)
    if logits:
        e = np.exp(y - y.max(axis=1, keepdims=True))
        return y, e / e.sum(axis=1, keepdims=True)
    return np.log(np.clip(y, _TINY, None)), y


def _lists(pa: Any, y: np.ndarray, kind: Any) -> Any:
    offsets = pa.array(np.arange(0, y.size + 1, y.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(y.ravel(), type=kind))


def _dense_vectors(pa: Any, y: np.ndarray) -> Any:
    """Rows of ``y`` as ``pyspark.ml.linalg`` dense vectors: VectorUDT's Arrow struct."""
    n = len(y)
    return pa.StructArray.from_arrays(
        [
            pa.array(np.ones(n, np.int8)),  # type 1: dense
            pa.nulls(n, pa.int32()),  # size and indices: sparse vectors only
            pa.nulls(n, pa.list_(pa.int32())),
            _lists(pa, y, pa.float64()),
        ],
        names=["type", "size", "indices", "values"],
    )


def _model(key: str, blob: Any, custom_objects: Any, loads: Any) -> Any:
    from ..runtime import gpu

    gpu.claim()
    model = _LOADED.get(key)
    if model is None:
        _task_threads()
        gpu.grow_memory()
        while len(_LOADED) >= _KEEP:
            _LOADED.pop(next(iter(_LOADED)))
        model = _LOADED[key] = _spec.from_bytes(blob.value, custom_objects)
        if loads is not None:
            loads.add(1)
    return model


def _task_threads() -> None:
    """TensorFlow's threads: the task's CPUs, so that tasks on one executor do
    not oversubscribe its cores. Only possible before TensorFlow's runtime
    starts (the worker's first model); a worker that already ran it keeps its
    threads."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    cpus = ctx.cpus() if ctx is not None else 0
    if cpus:
        import tensorflow as tf

        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(cpus)
            tf.config.threading.set_inter_op_parallelism_threads(cpus)


_END = object()


def _ahead(items: Iterator[Any], fn: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` for each item, the next one read and computed on a
    worker thread while the caller works on this one. Closing the generator
    early waits for the one in flight."""
    it = iter(items)

    def one() -> Any:
        item = next(it, _END)
        return _END if item is _END else (item, fn(item))

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ts-decode") as pool:
        pending = pool.submit(one)
        while True:
            got = pending.result()
            if got is _END:
                return
            pending = pool.submit(one)
            yield got


def _predict_batches(
    key: str,
    blob: Any,
    custom_objects: Any,
    loads: Any,
    features: tuple[str, ...],
    input_shape: tuple[int, ...],
    batch_size: int,
    output: OutputColumns,
    batches: Iterator[Any],
) -> Iterator[Any]:

    model = None
    decode = functools.partial(_inputs, features=features, input_shape=input_shape)
    for batch, x in _ahead(_rebatch(batches, batch_size), decode):
        if model is None:
            model = _model(key, blob, custom_objects, loads)
        yield _with_outputs(model, batch, x, output)


def _rebatch(batches: Iterator[Any], size: int) -> Iterator[Any]:
    """Record batches of exactly ``size`` rows (the last one may be shorter).

    The JVM's Arrow batches follow the session's maxRecordsPerBatch when the
    action runs; cutting (zero-copy) and joining them gives the model the
    same batch shape throughout, so it is traced once.
    """
    import pyarrow as pa

    pending: list[Any] = []
    rows = 0
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            take = min(size - rows, batch.num_rows - start)
            pending.append(batch.slice(start, take))
            rows += take
            start += take
            if rows == size:
                yield _join(pa, pending)
                pending, rows = [], 0
    if rows:
        yield _join(pa, pending)


def _join(pa: Any, parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def _inputs(batch: Any, *, features: tuple[str, ...], input_shape: Any) -> Any:
    """The model's input for an Arrow batch (NumPy, or a dict by input name)."""
    if isinstance(input_shape, dict):  # several inputs or tables: by input name
        from .replica import feed_inputs

        spec = input_shape
        cols = next(_feed.arrow_inputs([batch], spec["inputs"], None, False))[:-1]
        return feed_inputs(spec["names"], spec["shapes"], spec["inputs"], cols, "predict")
    x, _ = next(_feed.arrow_chunks([batch.select(list(features))], features, None, False))
    return _feed.shape_features(x, input_shape, "predict")


def _with_outputs(model: Any, batch: Any, x: Any, output: OutputColumns) -> Any:
    """``batch`` with the model's output columns for input ``x`` added."""
    import pyarrow as pa

    y = np.asarray(model.predict_on_batch(x), dtype=np.float32).reshape(batch.num_rows, -1)
    return pa.RecordBatch.from_arrays(
        [*batch.columns, *output.arrays(y)], names=[*batch.schema.names, *output.names()]
    )


def predict(
    model: Any,
    df: Any,
    *,
    features_col: str | list[str] | dict[str, str] | None = "features",
    prediction_col: str = "prediction",
    batch_size: int = 1024,
    custom_objects: dict[str, Any] | None = None,
    load_counter: Any = None,
    _blob: Any = None,
    _output: OutputColumns | None = None,
) -> Any:
    """Add the model's predictions as a column, computed in Spark tasks.

    Parameters
    ----------
    model : keras.Model
        The model (compiled or not); it is sent once per call in a broadcast
        and loaded once per Python worker. A worker that loaded the same
        bytes in an earlier call (the same architecture and weights) keeps
        using that copy.
    df : pyspark.sql.DataFrame
        Rows to predict; every column is kept.
    features_col : str, list of str, dict or None
        Numeric, array or ML vector column(s), concatenated and reshaped to
        the model's input shape. A model with several inputs or with
        tables is fed by input name, as in :func:`fit`.
    prediction_col : str
        The new column: ``float`` for a model with one output value per
        row, otherwise ``array<float>`` (e.g. class probabilities).
    batch_size : int
        Rows per inference batch (the last of a partition may be shorter).
        The Arrow batches from the JVM, of
        ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows (10000 by
        default, read when the result runs), are cut and joined to this
        size in the task; lower that setting for very large rows. The
        session's settings are left as they are.
    custom_objects : dict, optional
        Passed to ``keras.saving.load_model`` in the tasks.
    load_counter : pyspark.Accumulator, optional
        Incremented each time a Python worker loads the model.

    Returns
    -------
    pyspark.sql.DataFrame
        ``df`` with ``prediction_col`` added (lazy, like any transformation).
    """
    import keras
    from pyspark.sql.types import StructType

    if not isinstance(model, keras.Model):
        raise TensorSparkValueError(f"predict: expected a keras.Model, got {type(model).__name__}")
    inputs = _spec.model_inputs(model)
    by_input = _spec.fed_by_input(inputs, features_col)
    if by_input:
        from ._fit import input_columns

        features = ()
        columns = input_columns(df.schema, features_col, inputs, "predict")
    else:
        features = (features_col,) if isinstance(features_col, str) else tuple(features_col)
        _feed.check_columns(df.schema, features, None)
    out_dims = int(np.prod(model.output_shape[1:]))
    output = _output or OutputColumns("raw", prediction_col, out_dims)
    if not output.names():
        raise TensorSparkValueError(
            "predict: every output column name is empty; name at least one (predictionCol)"
        )
    if len(set(output.names())) < len(output.names()):
        raise TensorSparkValueError(
            f"predict: the output columns {output.names()} repeat a name; give each its own "
            "(rawPredictionCol, probabilityCol, predictionCol)"
        )
    for name in output.names():
        if name in df.columns:
            raise TensorSparkValueError(
                f"predict: the DataFrame already has a column {name!r}; choose another name "
                "for that output column (or drop the column first)"
            )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TensorSparkValueError(f"predict: batch_size must be an int >= 1, got {batch_size!r}")
    from ._fit import _input_shape

    input_shape: Any = _input_shape(model)
    if by_input:
        input_shape = {
            "names": tuple(n for n, _, _ in inputs),
            "shapes": tuple(sh for _, sh, _ in inputs),
            "inputs": columns,
        }
    spark = df.sparkSession
    data = _spec.to_bytes(model) if _blob is None else _blob.value
    blob = _blob if _blob is not None else Cluster(spark).broadcast(data)
    # By content: a worker that loaded these exact bytes (an earlier call
    # with the same weights) keeps using its copy.
    key = hashlib.sha256(data).hexdigest()
    schema = StructType([*df.schema.fields, *output.fields()])
    fn = functools.partial(
        _predict_batches,
        key,
        blob,
        custom_objects,
        load_counter,
        features,
        input_shape,
        batch_size,
        output,
    )
    # No session setting for the batch size: Spark reads those when the
    # (lazy) result runs, long after this returns, so one set here would
    # either leak into the session or, restored, do nothing.
    return df.mapInArrow(fn, schema)
