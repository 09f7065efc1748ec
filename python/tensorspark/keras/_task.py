"""What one Spark task runs for a Keras model: train or evaluate a partition.

A task streams its partition through :class:`~tensorspark._feed.BatchStream`
(bounded memory), runs a compiled ``tf.function`` step per batch, and every
``sync_interval`` steps pushes its update to the parameter server and pulls
the merged model. The model and its step functions are built once per
Python worker process and run (epochs reuse them), keyed by the run id.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core, _feed, _spark, _watchdog
from ..errors import TensorSparkValueError
from . import _spec


@dataclass(frozen=True)
class KerasTaskConfig:
    """Everything a task needs, shipped in the task closure (plain values)."""

    host: str
    port: int
    secret: bytes
    run_id: str
    epoch: int
    weight_names: tuple[str, ...]
    weight_shapes: tuple[tuple[int, ...], ...]
    synced: tuple[int, ...]  # indices into model.weights kept on the server
    input_shape: tuple[int, ...]
    features: tuple[str, ...]
    label: str | None
    integral_label: bool
    batch_size: int
    buffer_batches: int
    shuffle: bool
    seed: int
    sync_interval: int
    steps_per_call: int
    update: str  # "delta" or "gradient"
    learning_rate: float | None  # the driver optimizer's rate this epoch (delta)
    threads: int
    connect_timeout: float
    io_timeout: float
    heartbeat_interval: float
    hang_timeout: float | None = None  # stack dumps after half of it without a sync
    join: bool = True


# The latest run's replica in this Python worker (Spark reuses workers).
_REPLICAS: dict[str, _Replica] = {}


class _Replica:
    """The task's copy of the model, its step functions and sync buffers."""

    def __init__(self, cfg: KerasTaskConfig, model: Any) -> None:
        import tensorflow as tf

        _spec.check_compiled(model, "in a Spark task")
        _spec.check_same_weights(model, list(cfg.weight_shapes))
        self.model = model
        self.weights = [model.weights[i] for i in cfg.synced]
        self.names = [cfg.weight_names[i] for i in cfg.synced]
        self.buffers = [np.empty(tuple(w.shape), np.float32) for w in self.weights]
        self.base = [np.empty_like(b) for b in self.buffers]
        self.update = cfg.update
        trainable = model.trainable_variables
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.loss_count = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        if cfg.update == "gradient":
            self.accumulators = [tf.Variable(tf.zeros_like(v), trainable=False) for v in trainable]
        else:
            self.accumulators = []
            model.optimizer.build(trainable)

        def one_step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            grads = tape.gradient(loss, trainable)
            if self.accumulators:
                for acc, g in zip(self.accumulators, grads, strict=True):
                    acc.assign_add(tf.convert_to_tensor(g))
            else:
                model.optimizer.apply_gradients(zip(grads, trainable, strict=True))
            model.compute_metrics(x, y, y_pred)
            n = tf.cast(tf.shape(x)[0], tf.float64)
            self.loss_sum.assign_add(tf.cast(loss, tf.float64) * n)
            self.loss_count.assign_add(n)
            return loss

        # Several steps in one call: batches stacked on a leading axis, looped
        # in the graph (like Keras' steps_per_execution), so the Python call
        # and the NumPy-to-tensor conversion are paid once per group.
        def train_steps(xs: Any, ys: Any) -> None:
            for i in tf.range(tf.shape(xs)[0]):
                one_step(xs[i], None if ys is None else ys[i])

        @tf.function(reduce_retracing=True)
        def eval_step(x: Any, y: Any) -> Any:
            y_pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
            model.compute_metrics(x, y, y_pred)
            n = tf.cast(tf.shape(x)[0], tf.float64)
            self.loss_sum.assign_add(tf.cast(loss, tf.float64) * n)
            self.loss_count.assign_add(n)
            return loss

        self._loop, self.eval_step = train_steps, eval_step
        self._compiled: dict[tuple, Any] = {}

    def train_steps(self, xs: np.ndarray, ys: np.ndarray | None) -> None:
        """Run ``len(xs)`` steps on stacked batches ``xs[i]``, ``ys[i]``.

        One trace serves every group size and batch length (the last batch
        may be short): the signature leaves both leading dimensions open.
        """
        key = (xs.dtype, xs.shape[2:], None if ys is None else (ys.dtype, ys.shape[2:]))
        fn = self._compiled.get(key)
        if fn is None:
            import tensorflow as tf

            def spec(a: np.ndarray) -> Any:
                return tf.TensorSpec((None, None, *a.shape[2:]), tf.as_dtype(a.dtype))

            loop = self._loop
            if ys is None:
                fn = tf.function(lambda a: loop(a, None), input_signature=[spec(xs)])
            else:
                fn = tf.function(loop, input_signature=[spec(xs), spec(ys)])
            self._compiled[key] = fn
        if ys is None:
            fn(xs)
        else:
            fn(xs, ys)

    def reset(self) -> None:
        self.model.reset_metrics()
        self.loss_sum.assign(0.0)
        self.loss_count.assign(0.0)

    def loss_totals(self) -> tuple[float, float]:
        return float(self.loss_sum.numpy()), float(self.loss_count.numpy())

    def metrics(self) -> dict[str, float]:
        """The compiled metrics' values (the loss is tracked separately)."""
        out = {}
        for key, value in self.model.get_metrics_result().items():
            if key != "loss":
                with contextlib.suppress(TypeError, ValueError):
                    out[key] = float(np.asarray(value))
        return out

    def load(self, arrays: list[np.ndarray]) -> None:
        for w, a in zip(self.weights, arrays, strict=True):
            w.assign(a)


def _replica(
    cfg: KerasTaskConfig, model_blob: Any, builder: Callable[[], Any] | None, custom: Any
) -> _Replica:
    """The replica for this run, built on the worker's first task of the run."""
    replica = _REPLICAS.get(cfg.run_id)
    if replica is None:
        _set_threads(cfg.threads)
        _REPLICAS.clear()  # one run at a time per worker: free the previous model
        model = builder() if builder is not None else _spec.from_bytes(model_blob.value, custom)
        replica = _REPLICAS[cfg.run_id] = _Replica(cfg, model)
    return replica


def _set_threads(threads: int) -> None:
    import tensorflow as tf

    # Only possible before TF's runtime starts (the worker's first task).
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class _Sync:
    """Pushes the task's update and pulls the merged model."""

    def __init__(self, client: Any, replica: _Replica, cfg: KerasTaskConfig) -> None:
        self.client, self.replica, self.cfg = client, replica, cfg
        self.version = 0
        self.pushes = 0
        self.staleness: list[int] = []

    def pull(self) -> None:
        r = self.replica
        self.version = self.client.pull_into(r.names, r.buffers)
        r.load(r.buffers)
        for b, p in zip(r.base, r.buffers, strict=True):
            np.copyto(b, p)

    def push_and_pull(self, steps: int, since_sync: int, partition: int) -> None:
        r = self.replica
        if r.update == "gradient":
            scale = np.float32(1.0 / since_sync)
            update = [np.ascontiguousarray(a.numpy() * scale) for a in r.accumulators]
            for a in r.accumulators:
                a.assign(np.zeros(a.shape, np.float32))
            kind = _core.KIND_GRADIENT
        else:
            update = [
                np.ascontiguousarray(w.numpy() - b, dtype=np.float32)
                for w, b in zip(r.weights, r.base, strict=True)
            ]
            kind = _core.KIND_DELTA
        for name, arr in zip(r.names, update, strict=True):
            if not np.isfinite(arr).all():
                raise TensorSparkValueError(
                    f"the update of weight {name!r} is NaN or Inf at step {steps} of partition "
                    f"{partition} (epoch {self.cfg.epoch + 1}); nothing from this interval was "
                    "pushed, so the parameter server keeps the last good model (version "
                    f"{self.version}). Lower the learning rate or check the data"
                )
        pulled_at = self.version
        self.version = self.client.push(kind, r.names, update)
        self.staleness.append(max(0, self.version - pulled_at - 1))
        self.pushes += 1
        self.pull()


def _connect(cfg: KerasTaskConfig, partition: int, attempt: int) -> Any:
    return _core.Client(
        cfg.host,
        cfg.port,
        cfg.secret,
        partition_id=partition,
        attempt=attempt,
        connect_timeout_s=cfg.connect_timeout,
        io_timeout_s=cfg.io_timeout,
        heartbeat_interval_s=cfg.heartbeat_interval if cfg.join else 0.0,
    )


def train(
    cfg: KerasTaskConfig,
    model_blob: Any,
    builder: Callable[[], Any] | None,
    custom_objects: Any,
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
) -> dict[str, Any]:
    """Train on one partition's chunks; returns the task's figures."""
    partition, attempt, fence = _spark.task_identity()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.monotonic()
    replica = _replica(cfg, model_blob, builder, custom_objects)
    if cfg.update == "delta" and cfg.learning_rate is not None:
        with contextlib.suppress(AttributeError, ValueError, TypeError):
            replica.model.optimizer.learning_rate.assign(cfg.learning_rate)
    replica.reset()
    rss_base = rss_peak = _rss_bytes()
    client = _connect(cfg, partition, fence)
    with _watchdog.membership(
        client, cfg.join, cfg.hang_timeout, f"p{partition}-a{fence}"
    ) as dumps:
        sync = _Sync(client, replica, cfg)
        sync.pull()
        stream = _feed.BatchStream(
            chunks,
            cfg.batch_size,
            buffer_batches=cfg.buffer_batches,
            shuffle=cfg.shuffle,
            seed=[cfg.seed, cfg.epoch, partition],
        )
        steps = samples = since_sync = 0
        last = (0.0, 0.0)  # loss totals at the last sync
        where = f"partition {partition}"
        train_started = time.monotonic()
        for n, x, y in _grouped(stream, cfg, where):
            replica.train_steps(x, y)
            steps += n
            samples += n * x.shape[1]
            since_sync += n
            if since_sync == cfg.sync_interval:
                now = _check_loss(replica, steps, partition, cfg, sync.version)
                sync.push_and_pull(steps, since_sync, partition)
                loss = (now[0] - last[0]) / max(1.0, now[1] - last[1])
                client.report_progress(steps, samples, loss)
                last = now
                if dumps is not None:
                    dumps.progress()
                since_sync = 0
                rss_peak = max(rss_peak, _rss_bytes())
        if since_sync:
            _check_loss(replica, steps, partition, cfg, sync.version)
            sync.push_and_pull(steps, since_sync, partition)
        rss_peak = max(rss_peak, _rss_bytes())
        train_seconds = time.monotonic() - train_started
        loss_sum, loss_count = replica.loss_totals()
        return {
            "partition": partition,
            "attempt": attempt,
            "steps": steps,
            "samples": samples,
            "pushes": sync.pushes,
            "version": sync.version,
            "seconds": time.monotonic() - started,
            "train_seconds": train_seconds,
            "samples_per_sec": samples / train_seconds if train_seconds > 0 else 0.0,
            "loss": loss_sum / loss_count if loss_count else float("nan"),
            "metrics": replica.metrics(),
            "staleness_mean": float(np.mean(sync.staleness)) if sync.staleness else 0.0,
            "staleness_max": int(max(sync.staleness, default=0)),
            "rss_base_bytes": rss_base,
            "rss_peak_bytes": rss_peak,
            "rows_buffered_max": stream.rows_held_max,
        }


def steps_per_call(cfg: KerasTaskConfig) -> int:
    """Most steps per compiled call: ``steps_per_call``, capped by the buffer and the sync."""
    return max(1, min(cfg.steps_per_call, cfg.buffer_batches, cfg.sync_interval))


def _grouped(
    stream: Iterable[tuple[np.ndarray, np.ndarray | None]], cfg: KerasTaskConfig, where: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """``(steps, xs, ys)``: batches stacked by ``steps_per_call``, never across a sync.

    A short last batch (fewer than ``batch_size`` rows) goes alone, since a
    stack needs equal batches.
    """
    group = steps_per_call(cfg)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray | None] = []
    since_sync = 0

    def flush() -> tuple[int, np.ndarray, np.ndarray | None]:
        n = len(xs)
        x = np.stack(xs) if n > 1 else xs[0][np.newaxis]
        y = None if ys[0] is None else (np.stack(ys) if n > 1 else ys[0][np.newaxis])
        xs.clear()
        ys.clear()
        return n, x, y

    for x, y in stream:
        x = _feed.shape_features(x, cfg.input_shape, where)
        if len(x) != cfg.batch_size:
            if xs:
                yield flush()
            xs.append(x)
            ys.append(y)
            yield flush()
            since_sync = (since_sync + 1) % cfg.sync_interval
            continue
        xs.append(x)
        ys.append(y)
        since_sync += 1
        if len(xs) == group or since_sync == cfg.sync_interval:
            yield flush()
        if since_sync == cfg.sync_interval:
            since_sync = 0
    if xs:
        yield flush()


def _check_loss(
    replica: _Replica, steps: int, partition: int, cfg: KerasTaskConfig, version: int
) -> tuple[float, float]:
    """Fail before pushing when the loss turned NaN; returns the loss totals."""
    total, count = replica.loss_totals()
    if not np.isfinite(total):
        raise TensorSparkValueError(
            f"the loss became NaN or Inf before step {steps} of partition {partition} (epoch "
            f"{cfg.epoch + 1}); nothing from this interval was pushed, so the parameter server "
            f"keeps the last good model (version {version}). Lower the learning rate or check "
            "the data for NaN/Inf"
        )
    return total, count


def evaluate(
    cfg: KerasTaskConfig,
    model_blob: Any,
    builder: Callable[[], Any] | None,
    custom_objects: Any,
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
) -> dict[str, Any]:
    """Evaluate the server's current model on one partition's chunks."""
    partition, _, _ = _spark.task_identity()
    replica = _replica(cfg, model_blob, builder, custom_objects)
    replica.reset()
    client = _connect(cfg, -1, 0)
    try:
        client.pull_into(replica.names, replica.buffers)
    finally:
        client.close()
    replica.load(replica.buffers)
    samples = 0
    for x, y in _feed.BatchStream(chunks, cfg.batch_size, buffer_batches=1):
        x = _feed.shape_features(x, cfg.input_shape, f"validation partition {partition}")
        replica.eval_step(x, y)
        samples += len(x)
    loss_sum, _ = replica.loss_totals()
    return {
        "partition": partition,
        "samples": samples,
        "loss_sum": loss_sum,
        "metrics": replica.metrics(),
    }


def arrow_partition(
    fn: Callable[..., dict[str, Any]],
    cfg: KerasTaskConfig,
    model_blob: Any,
    builder: Any,
    custom_objects: Any,
    batches: Iterator[Any],
) -> Iterator[Any]:
    """``mapInArrow`` function: run ``fn`` on the batches, yield one JSON row."""
    import json

    import pyarrow as pa

    chunks = _feed.arrow_chunks(batches, cfg.features, cfg.label, cfg.integral_label)
    result = fn(cfg, model_blob, builder, custom_objects, chunks)
    yield pa.RecordBatch.from_pydict({"result": [json.dumps(result)]})


def rdd_partition(
    fn: Callable[..., dict[str, Any]],
    cfg: KerasTaskConfig,
    model_blob: Any,
    builder: Any,
    custom_objects: Any,
    index: int,
    rows: Iterable[Any],
) -> Iterator[dict[str, Any]]:
    """``mapPartitionsWithIndex`` function over ``(features, label)`` rows."""
    chunks = _feed.row_chunks(rows, cfg.batch_size, index)
    yield fn(cfg, model_blob, builder, custom_objects, chunks)
