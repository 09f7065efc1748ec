"""The Keras replica: the driver's model rebuilt in a Spark task.

A Python worker builds the model and its compiled step functions once per
run (epochs reuse them). Training runs groups of steps in one call of a
``tf.function`` that loops over the stacked batches in the graph (like
Keras' ``steps_per_execution``). Everything else (connect, sync, feed,
result) is ``runtime.task``; this module also has the Spark-facing task
functions for DataFrames (``mapInArrow``) and RDDs.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime import feed, spark, task
from . import _spec


@dataclass(frozen=True)
class ModelSpec:
    """What a task needs to rebuild and feed the model (plain values)."""

    weight_shapes: tuple[tuple[int, ...], ...]
    synced: tuple[int, ...]  # indices into model.weights kept on the server
    input_shape: tuple[int, ...]
    features: tuple[str, ...]
    label: str | None
    integral_label: bool
    learning_rate: float | None  # the driver optimizer's rate this epoch (local optimizer)
    custom_objects: Any = None
    # Several inputs or tables: one chunk column per model input (feed.InputColumn), fed
    # by input name; () for one dense input from ``features``.
    inputs: tuple[Any, ...] = ()
    input_names: tuple[str, ...] = ()
    input_shapes: tuple[tuple[int | None, ...], ...] = ()
    label_classes: int = 0  # > 0: the label is a class index below it (a classifier)

    def model_inputs(self, cols: Any, where: str) -> Any:
        """A batch's input columns as the model takes them (a dict by input name)."""
        return feed_inputs(self.input_names, self.input_shapes, self.inputs, cols, where)


def feed_inputs(names: Any, shapes: Any, inputs: Any, cols: Any, where: str) -> dict[str, Any]:
    """Input columns (``feed.arrow_inputs``) as a dict by model input name, shaped."""
    out = {}
    for name, shape, spec, col in zip(names, shapes, inputs, cols, strict=True):
        if spec.kind == "dense":
            col = feed.shape_features(col, tuple(shape), f"{where}, input {name!r}")
        elif len(shape) == 1 and shape[0] == 1 and col.ndim == 1:
            col = col.reshape(-1, 1)
        out[name] = col
    return out


class KerasReplica:
    """The task's copy of the model, its step functions and metric totals."""

    def __init__(self, model: Any, spec: ModelSpec, cfg: task.TaskConfig) -> None:
        import keras
        import tensorflow as tf

        _spec.check_compiled(model, "in a Spark task")
        _spec.check_same_weights(model, list(spec.weight_shapes))
        self.model, self.spec = model, spec
        self.lr_error = ""
        self.weights = [model.weights[i] for i in spec.synced]
        trainable = model.trainable_variables
        # (sum of loss x rows, rows): one variable, so a sync reads it in one call.
        self.loss = tf.Variable(tf.zeros(2, tf.float64), trainable=False)
        self.gradients = []
        self.iterates = []
        lso = keras.optimizers.LossScaleOptimizer
        if _float16_compute(model) and not isinstance(model.optimizer, lso):
            # A mixed_float16 model loses its LossScaleOptimizer when it is
            # deserialized under the task's float32 global policy.
            model.optimizer = lso(model.optimizer)
        if cfg.rule.accumulates == "gradients":
            self.gradients = [tf.Variable(tf.zeros_like(v), trainable=False) for v in trainable]
        else:
            model.optimizer.build(trainable)
        if cfg.rule.accumulates == "iterates":
            self.iterates = [tf.Variable(tf.zeros_like(w), trainable=False) for w in self.weights]
        # mixed_float16 compiles a LossScaleOptimizer. Where it applies the
        # step (the dense local step), the loss is scaled as Keras' own
        # train_step does and it unscales; pushed gradients and table rows'
        # steps are unscaled, applied by the inner optimizer.
        optimizer = model.optimizer
        scaled = isinstance(optimizer, lso) and not self.gradients
        local_opt = getattr(optimizer, "inner_optimizer", optimizer)

        def add_loss(loss: Any, y_pred: Any) -> None:
            n = tf.cast(tf.shape(y_pred)[0], tf.float64)
            self.loss.assign_add(tf.stack([tf.cast(loss, tf.float64) * n, n]))

        self._add_loss = add_loss

        def one_step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
                target = optimizer.scale_loss(loss) if scaled else loss
            grads = tape.gradient(target, trainable)
            if self.gradients:
                for acc, g in zip(self.gradients, grads, strict=True):
                    acc.assign_add(tf.convert_to_tensor(g))
            else:
                model.optimizer.apply_gradients(zip(grads, trainable, strict=True))
            if self.iterates:
                for s, w in zip(self.iterates, self.weights, strict=True):
                    s.assign_add(w)
            model.compute_metrics(x, y, y_pred)
            self._add_loss(loss, y_pred)
            return loss

        # Several steps in one call: batches stacked on a leading axis, looped
        # in the graph, so the Python call and the NumPy-to-tensor conversion
        # are paid once per group.
        def train_steps(xs: Any, ys: Any = None) -> None:
            for i in tf.range(tf.shape(tf.nest.flatten(xs)[0])[0]):
                x = tf.nest.map_structure(lambda a, i=i: a[i], xs)
                one_step(x, None if ys is None else ys[i])

        @tf.function(reduce_retracing=True)
        def eval_step(x: Any, y: Any) -> Any:
            y_pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
            model.compute_metrics(x, y, y_pred)
            self._add_loss(loss, y_pred)
            return loss

        self._loop, self.eval_step = train_steps, eval_step
        self._compiled: dict[tuple, Any] = {}
        self.rows: Any = None  # runtime.sparse.RowExchange of the running task
        self.table_layers = _table_layers(model, cfg)

        def sparse_step(x: Any, y: Any, rows: Any, training: bool) -> Any:
            for layer, r in zip(self.table_layers, rows, strict=True):
                layer._ps_rows = r
            try:
                with tf.GradientTape() as tape:
                    tape.watch(rows)
                    y_pred = model(x, training=training)
                    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
            finally:
                for layer in self.table_layers:
                    layer._ps_rows = None
            model.compute_metrics(x, y, y_pred)
            self._add_loss(loss, y_pred)
            if not training:
                return []
            grads = tape.gradient(loss, [*trainable, *rows])
            dense, row_grads = grads[: len(trainable)], grads[len(trainable) :]
            if self.gradients:
                for acc, g in zip(self.gradients, dense, strict=True):
                    acc.assign_add(tf.convert_to_tensor(g))
            elif trainable:
                local_opt.apply_gradients(zip(dense, trainable, strict=True))
            if self.iterates:
                for s, w in zip(self.iterates, self.weights, strict=True):
                    s.assign_add(w)
            return [
                tf.zeros_like(r) if g is None else tf.convert_to_tensor(g)
                for g, r in zip(row_grads, rows, strict=True)
            ]

        self._sparse_step = sparse_step
        self._targets: list[Any] | None = None

    # -- runtime.task.Replica ---------------------------------------------

    def begin(self, cfg: task.TaskConfig) -> None:
        self.model.reset_metrics()
        self.loss.assign(np.zeros(2))
        self.lr_error = ""
        lr = self.spec.learning_rate
        if lr is not None and not self.gradients:
            try:
                self.model.optimizer.learning_rate.assign(lr)
            except (AttributeError, ValueError, TypeError) as e:
                # Reported to the driver (the result record), not suppressed.
                self.lr_error = f"{type(e).__name__}: {e}"

    def train(self, batches: list[feed.Chunk]) -> None:
        """Run ``len(batches)`` steps in one call of the compiled loop.

        One trace serves every group size and batch length (the last batch
        may be short): the signature leaves both leading dimensions open.
        """
        if self.rows is not None:
            for batch in batches:
                self.sparse_batch(batch, training=True)
            return
        if self.spec.inputs:
            xs = [self.spec.model_inputs(b[:-1], "a training batch") for b in batches]
            args = [{k: np.stack([x[k] for x in xs]) for k in xs[0]}]
            if batches[0][-1] is not None:
                args.append(np.stack([b[-1] for b in batches]))
            return self._call_loop(args)
        shape = self.spec.input_shape
        args = [np.stack([feed.shape_features(b[0], shape, "a training batch") for b in batches])]
        if batches[0][1] is not None:
            args.append(np.stack([b[1] for b in batches]))
        self._call_loop(args)

    def _call_loop(self, args: list[Any]) -> None:
        import tensorflow as tf

        key = tuple((a.dtype, a.shape[2:]) for a in tf.nest.flatten(args))
        fn = self._compiled.get(key)
        if fn is None:
            sig = tf.nest.map_structure(
                lambda a: tf.TensorSpec((None, None, *a.shape[2:]), tf.as_dtype(a.dtype)), args
            )
            fn = self._compiled[key] = tf.function(self._loop, input_signature=sig)
        fn(*args)

    def sparse_batch(self, batch: feed.Chunk, *, training: bool) -> None:
        """One step (or evaluation) of a batch whose tables' rows were pulled."""
        import tensorflow as tf

        *cols, y, rb = batch
        x = self.spec.model_inputs(cols, "a training batch" if training else "a validation batch")
        args = [x, y, list(rb.rows)]
        sig = tf.nest.map_structure(_open_spec, args)
        key = ("sparse", training, *((s.dtype, tuple(s.shape)) for s in tf.nest.flatten(sig)))
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = tf.function(
                lambda x, y, rows: self._sparse_step(x, y, rows, training), input_signature=sig
            )
        grads = fn(*args)
        if training:
            self.rows.push(rb, [g.numpy() for g in grads], "a training batch")

    def read(self) -> list[np.ndarray]:
        return [np.asarray(w.numpy(), np.float32) for w in self.weights]

    def load(self, values: list[np.ndarray]) -> None:
        if self._targets is None:
            import tensorflow as tf

            # The TF variables under Keras' (outside an autocast scope): their
            # assign skips Keras' per-call checks, a third of a sync on small models.
            self._targets = [
                w.value if isinstance(getattr(w, "value", None), tf.Variable) else w
                for w in self.weights
            ]
        for w, a in zip(self._targets, values, strict=True):
            w.assign(a)

    def iterate_means(self, steps: int) -> list[np.ndarray]:
        return _means_and_reset(self.iterates, steps)

    def gradient_means(self, steps: int) -> list[np.ndarray]:
        return _means_and_reset(self.gradients, steps)

    def loss_totals(self) -> tuple[float, float]:
        total, rows = self.loss.numpy()
        return float(total), float(rows)

    def metrics(self) -> dict[str, float]:
        """The compiled metrics' values (the loss is tracked separately)."""
        out = {}
        for key, value in self.model.get_metrics_result().items():
            if key != "loss":
                with contextlib.suppress(TypeError, ValueError):
                    out[key] = float(np.asarray(value))
        return out

    def extra_result(self) -> dict[str, Any]:
        return {"learning_rate_error": self.lr_error} if self.lr_error else {}


def _open_spec(a: np.ndarray) -> Any:
    """A TensorSpec open in the batch axis, and in the width of multi-hot ids."""
    import tensorflow as tf

    dims = [None, *a.shape[1:]]
    if a.dtype == np.int64 and a.ndim == 2 and a.shape[1] != 1:
        dims[1] = None
    return tf.TensorSpec(dims, tf.as_dtype(a.dtype))


def _table_layers(model: Any, cfg: task.TaskConfig) -> list[Any]:
    """The model's table layers in ``cfg.tables`` order."""
    if not cfg.tables:
        return []
    from .layers import tables_of

    by_table = {layer.table: layer for layer in tables_of(model)}
    return [by_table[f.table] for f in cfg.tables]


def _float16_compute(model: Any) -> bool:
    """True for a model (or any of its layers) computing in float16 (mixed_float16)."""
    layers = [model, *getattr(model, "layers", [])]
    return any(getattr(layer, "compute_dtype", None) == "float16" for layer in layers)


def _means_and_reset(sums: list[Any], steps: int) -> list[np.ndarray]:
    scale = np.float32(1.0 / steps)
    out = [np.ascontiguousarray(s.numpy() * scale, dtype=np.float32) for s in sums]
    for s in sums:
        s.assign(np.zeros(s.shape, np.float32))
    return out


def _replica(cfg: task.TaskConfig, spec: ModelSpec, blob: Any, builder: Any) -> KerasReplica:
    def build() -> KerasReplica:
        import tensorflow as tf

        # Only possible before TF's runtime starts (the worker's first task).
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
            tf.config.threading.set_inter_op_parallelism_threads(cfg.threads)
        model = (
            builder() if builder is not None else _spec.from_bytes(blob.value, spec.custom_objects)
        )
        return KerasReplica(model, spec, cfg)

    replica = task.cached_replica(f"{cfg.run_id}/{cfg.rule.accumulates}", build)
    replica.spec = spec  # this epoch's (its learning rate)
    return replica


def train(cfg: task.TaskConfig, spec: ModelSpec, blob: Any, builder: Any, chunks: Any) -> dict:
    """Train on one partition's chunks (the shared task loop)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return task.train(cfg, _replica(cfg, spec, blob, builder), chunks)


def evaluate(cfg: task.TaskConfig, spec: ModelSpec, blob: Any, builder: Any, chunks: Any) -> dict:
    """Evaluate the server's current model on one partition's chunks."""
    partition = spark.task_identity()[0]
    replica = _replica(cfg, spec, blob, builder)
    replica.begin(cfg)
    with contextlib.closing(task.connect(cfg, -1, 0)) as client:
        task.Sync(client, replica, cfg).pull()
    samples = 0
    where = f"validation partition {partition}"
    stream = feed.BatchStream(chunks, cfg.batch_size, buffer_batches=1)
    if cfg.tables:
        from ..runtime import sparse

        raw = task.connect(cfg, -1, 0, member=False)
        with contextlib.closing(
            sparse.RowExchange(sparse.Rows(raw, cfg.tables), cfg.tables, prefetch=True)
        ) as rows:
            for batch in rows.batches(stream):
                replica.sparse_batch(batch, training=False)
                samples += len(batch[0])
    else:
        for batch in stream:
            if spec.inputs:
                x = spec.model_inputs(batch[:-1], where)
            else:
                x = feed.shape_features(batch[0], spec.input_shape, where)
            replica.eval_step(x, batch[-1])
            samples += len(batch[0])
    loss_sum = replica.loss_totals()[0]
    return {
        "partition": partition,
        "samples": samples,
        "loss_sum": loss_sum,
        "metrics": replica.metrics(),
    }


def arrow_partition(fn: Any, cfg: Any, spec: ModelSpec, blob: Any, builder: Any, batches: Any):
    """``mapInArrow`` function: run ``fn`` on the batches, yield one JSON row."""
    import pyarrow as pa

    label = (spec.label, spec.integral_label, spec.label_classes)
    if spec.inputs:
        chunks = feed.arrow_inputs(batches, spec.inputs, *label)
    else:
        chunks = feed.arrow_chunks(batches, spec.features, *label)
    result = fn(cfg, spec, blob, builder, chunks)
    yield pa.RecordBatch.from_pydict({"result": [json.dumps(result)]})


def rdd_partition(fn: Any, cfg: Any, spec: ModelSpec, blob: Any, builder: Any, index: int, rows):
    """``mapPartitionsWithIndex`` function over ``(features, label)`` rows."""
    yield fn(cfg, spec, blob, builder, feed.row_chunks(rows, cfg.batch_size, index))
