"""What one Spark task runs: train the TF1 graph on its partition.

The task rebuilds the driver's graph from the broadcast MetaGraphDef in its
own TF session, pulls the model from the parameter server, runs the fetches
on batches of its rows, and every ``sync_interval`` steps (and once at the
end) pushes its update and pulls the merged model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core, _spark, _watchdog
from ._graph import load_values
from .errors import TensorSparkValueError


@dataclass(frozen=True)
class TaskConfig:
    """Everything a task needs, shipped in the task closure (plain values)."""

    host: str
    port: int
    servers: tuple[tuple[str, int], ...]  # several servers sharing the model, or ()
    secret: bytes
    run_name: str
    run_index: int
    fetch_names: tuple[str, ...]
    feed_names: tuple[str, ...]
    param_names: tuple[str, ...]
    extra_feeds: tuple[tuple[str, Any], ...]
    batch_size: int
    sync_interval: int
    kind: int
    mean_window: int
    average_iterates: bool
    elastic_alpha: float  # > 0: elastic averaging (EASGD) with this moving rate
    shuffle: bool
    seed: int
    threads: int
    connect_timeout: float
    io_timeout: float
    join: bool  # join the run as a member (single server): sync/ssp wait for members
    heartbeat_interval: float
    hang_timeout: float | None = None  # stack dumps after half of it without a sync


def _batches(rows: Iterable[Any], cfg: TaskConfig, partition: int) -> Iterator[list[Any]]:
    """Yield lists of ``batch_size`` rows, checking each row's arity."""
    n_feeds = len(cfg.feed_names)
    if cfg.shuffle:
        # The seed's semantics: the partition is shuffled as a whole.
        held = list(rows)
        order = np.random.default_rng([cfg.seed, cfg.run_index, partition]).permutation(len(held))
        rows = (held[i] for i in order)
    batch: list[Any] = []
    for k, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != n_feeds:
            got = f"{len(row)} items" if isinstance(row, (tuple, list)) else type(row).__name__
            raise TensorSparkValueError(
                f"feed_rdd row {k} of partition {partition} has {got} but feed_name_list has "
                f"{n_feeds} names {list(cfg.feed_names)}; each row must be a tuple with one "
                "value per feed name"
            )
        batch.append(row)
        if len(batch) == cfg.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stack(batch: list[Any], cfg: TaskConfig) -> list[np.ndarray]:
    cols = []
    for j, name in enumerate(cfg.feed_names):
        try:
            cols.append(np.asarray([row[j] for row in batch]))
        except ValueError as e:
            raise TensorSparkValueError(
                f"feed {name!r}: the rows of a batch have values of different shapes ({e}); "
                "every row must give this feed a value of the same shape"
            ) from None
    return cols


class _Model:
    """The task's copy of the graph, its session and the synced variables."""

    def __init__(self, meta_graph: bytes, cfg: TaskConfig) -> None:
        import tensorflow.compat.v1 as tf

        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.train.import_meta_graph(tf.MetaGraphDef.FromString(meta_graph), clear_devices=True)
            by_name = {v.op.name: v for v in tf.global_variables()}
            self.variables = [by_name[n] for n in cfg.param_names]
            init = tf.global_variables_initializer()
            self.fetches = [self.graph.as_graph_element(n) for n in cfg.fetch_names]
            self.feeds = [self.graph.get_tensor_by_name(n) for n in cfg.feed_names]
            self.extra = {self.graph.get_tensor_by_name(n): v for n, v in cfg.extra_feeds}
            self.sums, self.accumulate, self.reset = self._iterate_sums(tf, cfg.average_iterates)
        config = tf.ConfigProto(
            intra_op_parallelism_threads=cfg.threads, inter_op_parallelism_threads=cfg.threads
        )
        self.sess = tf.Session(graph=self.graph, config=config)
        self.sess.run(init)
        if self.sums:
            self.sess.run([s.initializer for s in self.sums])

    def _iterate_sums(self, tf: Any, enabled: bool) -> tuple[list[Any], Any, Any]:
        """Task-local sums of each variable over the steps since the last sync.

        The add runs in the same session call as the fetches, after them
        (control dependency), so it sees each step's updated values.
        """
        if not enabled:
            return [], None, None
        sums = [
            tf.Variable(
                tf.zeros(v.shape, v.dtype.base_dtype),
                trainable=False,
                collections=[tf.GraphKeys.LOCAL_VARIABLES],
                name=f"tensorspark_iterate_sum_{i}",
            )
            for i, v in enumerate(self.variables)
        ]
        after = [f if isinstance(f, tf.Operation) else f.op for f in self.fetches]
        with tf.control_dependencies(after):
            accumulate = tf.group(
                *[
                    tf.assign_add(s, v.read_value())
                    for s, v in zip(sums, self.variables, strict=True)
                ]
            )
        reset = tf.group(*[tf.assign(s, tf.zeros_like(s)) for s in sums])
        return sums, accumulate, reset

    def averages(self, steps: int) -> list[np.ndarray]:
        """Mean of each variable over the last ``steps`` steps; resets the sums."""
        sums = self.sess.run(self.sums)
        self.sess.run(self.reset)
        return [s / np.float32(steps) for s in sums]

    def step(self, cols: list[np.ndarray]) -> Any:
        feed = dict(self.extra)
        feed.update(zip(self.feeds, cols, strict=True))
        try:
            if self.accumulate is not None:
                return self.sess.run([self.fetches, self.accumulate], feed_dict=feed)[0]
            return self.sess.run(self.fetches, feed_dict=feed)
        except ValueError as e:
            # TF's message names the tensor and both shapes.
            raise TensorSparkValueError(f"cannot feed this batch: {e}") from None

    def read(self) -> list[np.ndarray]:
        return self.sess.run(self.variables)

    def load(self, values: list[np.ndarray]) -> None:
        load_values(self.sess, self.variables, values)

    def close(self) -> None:
        self.sess.close()


class _Sync:
    """Pushes the task's update and pulls the merged model."""

    def __init__(self, client: Any, cfg: TaskConfig, model: _Model) -> None:
        self.client, self.cfg, self.model = client, cfg, model
        self.names = list(cfg.param_names)
        self.pulled = [np.empty(v.shape.as_list(), np.float32) for v in model.variables]
        self.version = 0
        self.pushes = 0

    def pull(self) -> None:
        self.version = self.client.pull_into(self.names, self.pulled)
        self.model.load(self.pulled)

    def push_and_pull(self, step: int, partition: int, steps_since_sync: int) -> None:
        model = self.model
        local = model.averages(steps_since_sync) if model.sums else model.read()
        if self.cfg.elastic_alpha > 0:
            self._elastic(local, step, partition)
            return
        if self.cfg.kind == _core.KIND_DELTA:
            pairs = zip(local, self.pulled, strict=True)
            update = [np.ascontiguousarray(a - p, dtype=np.float32) for a, p in pairs]
        else:
            update = [np.ascontiguousarray(a, dtype=np.float32) for a in local]
        self._push(update, step, partition)
        self.pull()

    def _elastic(self, local: list[np.ndarray], step: int, partition: int) -> None:
        """EASGD: e = alpha (x - centre); the worker keeps x - e, pushes e."""
        self.version = self.client.pull_into(self.names, self.pulled)
        alpha = np.float32(self.cfg.elastic_alpha)
        pairs = zip(local, self.pulled, strict=True)
        update = [np.ascontiguousarray(alpha * (x - c), dtype=np.float32) for x, c in pairs]
        self._push(update, step, partition)
        self.model.load([x - e for x, e in zip(local, update, strict=True)])

    def _push(self, update: list[np.ndarray], step: int, partition: int) -> None:
        for name, arr in zip(self.names, update, strict=True):
            if not np.isfinite(arr).all():
                raise TensorSparkValueError(
                    f"training produced NaN or Inf in variable {name!r} at step {step} of "
                    f"partition {partition}; nothing from this task was pushed, so the "
                    "parameter server keeps the last good model (try a lower learning rate)"
                )
        self.version = self.client.push(
            self.cfg.kind, self.names, update, mean_window=self.cfg.mean_window
        )
        self.pushes += 1


def _connect(cfg: TaskConfig, partition: int, attempt: int) -> Any:
    """The task's connection: to the one server, or to every shard."""
    common = {
        "partition_id": partition,
        "attempt": attempt,
        "connect_timeout_s": cfg.connect_timeout,
        "io_timeout_s": cfg.io_timeout,
    }
    if cfg.servers:
        return _core.ShardedClient(list(cfg.servers), cfg.secret, **common)
    return _core.Client(
        cfg.host, cfg.port, cfg.secret, heartbeat_interval_s=cfg.heartbeat_interval, **common
    )


def train_partition(
    cfg: TaskConfig, graph_broadcast: Any, partition: int, rows: Iterable[Any]
) -> Iterator[dict[str, Any]]:
    """Spark ``mapPartitionsWithIndex`` function: train on one partition."""
    _, attempt, fence = _spark.task_identity()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.monotonic()
    model = _Model(graph_broadcast.value, cfg)
    try:
        client = _connect(cfg, partition, fence)
        with _watchdog.membership(
            client, cfg.join, cfg.hang_timeout, f"p{partition}-a{fence}"
        ) as dumps:
            sync = _Sync(client, cfg, model)
            sync.pull()
            steps = samples = 0
            last: Any = None
            since_sync = 0
            for batch in _batches(rows, cfg, partition):
                last = model.step(_stack(batch, cfg))
                steps += 1
                samples += len(batch)
                since_sync += 1
                if since_sync == cfg.sync_interval:
                    sync.push_and_pull(steps, partition, since_sync)
                    since_sync = 0
                    if not cfg.servers:  # heartbeats carry it to the driver's stats
                        client.report_progress(steps, samples, float("nan"))
                    if dumps is not None:
                        dumps.progress()
            if since_sync:
                sync.push_and_pull(steps, partition, since_sync)
            yield {
                "partition": partition,
                "attempt": attempt,
                "steps": steps,
                "samples": samples,
                "pushes": sync.pushes,
                "version": sync.version,
                "seconds": time.monotonic() - started,
                "last_fetch": _plain(last),
            }
    finally:
        model.close()


def _plain(value: Any) -> Any:
    """Fetch results as plain Python values (scalars) or None for ops."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value
    return None if value is None else value
