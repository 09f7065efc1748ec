"""The TF1-graph replica: the driver's graph rebuilt in a Spark task.

The graph travels as a MetaGraphDef in a broadcast. A Python worker builds
it once per run and graph (later ``SparkSession.run`` calls and tasks reuse
it) and runs the fetches on each batch, feeding one column per feed name.
Everything else (connect, sync, feed, result) is ``runtime.task``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import TensorSparkValueError
from ..runtime import feed, task
from .graph import load_values


@dataclass(frozen=True)
class GraphSpec:
    """What a task needs to rebuild and run the graph (plain values)."""

    key: str  # digest of the MetaGraphDef: a changed graph is rebuilt
    fetch_names: tuple[str, ...]
    feed_names: tuple[str, ...]
    extra_feeds: tuple[tuple[str, Any], ...]
    loss_name: str | None  # a scalar tensor whose mean the task reports


class GraphReplica:
    """The task's copy of the graph, its session and the synced variables."""

    def __init__(self, meta_graph: bytes, spec: GraphSpec, cfg: task.TaskConfig) -> None:
        import tensorflow.compat.v1 as tf

        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.train.import_meta_graph(tf.MetaGraphDef.FromString(meta_graph), clear_devices=True)
            by_name = {v.op.name: v for v in tf.global_variables()}
            self.variables = [by_name[n] for n in cfg.names]
            init = tf.global_variables_initializer()
            self.fetches = [self.graph.as_graph_element(n) for n in spec.fetch_names]
            self.feeds = [self.graph.get_tensor_by_name(n) for n in spec.feed_names]
            self.extra = {self.graph.get_tensor_by_name(n): v for n, v in spec.extra_feeds}
            self.loss = self.graph.get_tensor_by_name(spec.loss_name) if spec.loss_name else None
            self.sums, self.accumulate, self.reset = self._iterate_sums(
                tf, cfg.rule.accumulates == "iterates"
            )
            self.tables = self._table_ops(tf, by_name, cfg)
        config = tf.ConfigProto(
            intra_op_parallelism_threads=cfg.threads, inter_op_parallelism_threads=cfg.threads
        )
        config.gpu_options.allow_growth = True  # tasks may share a GPU (runtime.gpu)
        self.sess = tf.Session(graph=self.graph, config=config)
        self.sess.run(init)
        if self.sums:
            self.sess.run([s.initializer for s in self.sums])
        self.last: Any = None
        self.loss_sum = self.loss_count = 0.0
        self.rows: Any = None  # runtime.sparse.RowExchange of the running task

    def _table_ops(self, tf: Any, by_name: dict[str, Any], cfg: task.TaskConfig) -> list[Any]:
        """Per table: (ids, rows placeholders, scatter op, gather tensor) into its variable."""
        out = []
        for f in cfg.tables:
            var = by_name[f.table]
            ids = tf.placeholder(tf.int64, [None], name=f"tensorspark_rows_ids_{len(out)}")
            rows = tf.placeholder(var.dtype.base_dtype, [None, f.dim])
            scatter = (
                tf.scatter_update(var, ids, rows)
                if not _is_resource(var)
                else (var.scatter_update(tf.IndexedSlices(rows, ids)))
            )
            out.append((ids, rows, scatter, tf.gather(var, ids)))
        return out

    def _iterate_sums(self, tf: Any, enabled: bool) -> tuple[list[Any], Any, Any]:
        """Sums of each variable over the steps since the last sync, added after each step."""
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
            adds = [
                tf.assign_add(s, v.read_value()) for s, v in zip(sums, self.variables, strict=True)
            ]
            accumulate = tf.group(*adds)
        reset = tf.group(*[tf.assign(s, tf.zeros_like(s)) for s in sums])
        return sums, accumulate, reset

    # -- runtime.task.Replica ---------------------------------------------

    def begin(self, cfg: task.TaskConfig) -> None:
        self.last = None
        self.loss_sum = self.loss_count = 0.0
        if self.sums:
            self.sess.run(self.reset)

    def train(self, batches: list[feed.Chunk]) -> None:
        run = [self.fetches]
        if self.loss is not None:
            run.append(self.loss)
        if self.accumulate is not None:
            run.append(self.accumulate)
        for cols in batches:
            rb = None
            if self.rows is not None:  # sparse_params: this batch's rows into the variables
                *cols, rb = cols
                scatter = {}
                for (ids, rows, _, _), uniq, pulled in zip(
                    self.tables, rb.uniques, rb.rows, strict=True
                ):
                    scatter.update({ids: uniq, rows: pulled})
                self.sess.run([t[2] for t in self.tables], feed_dict=scatter)
            feed_dict = dict(self.extra)
            feed_dict.update(zip(self.feeds, cols, strict=True))
            try:
                out = self.sess.run(run, feed_dict=feed_dict)
            except ValueError as e:
                # TF's message names the tensor and both shapes.
                raise TensorSparkValueError(f"cannot feed this batch: {e}") from None
            self.last = out[0]
            if rb is not None:
                after = self.sess.run(
                    [t[3] for t in self.tables],
                    feed_dict={t[0]: u for t, u in zip(self.tables, rb.uniques, strict=True)},
                )
                deltas = [a - p for a, p in zip(after, rb.rows, strict=True)]
                self.rows.push(rb, deltas, "a training batch", kind="delta")
            if self.loss is not None:
                rows = len(cols[0])
                self.loss_sum += float(np.mean(out[1])) * rows
                self.loss_count += rows

    def read(self) -> list[np.ndarray]:
        return self.sess.run(self.variables)

    def load(self, values: list[np.ndarray]) -> None:
        load_values(self.sess, self.variables, values)

    def iterate_means(self, steps: int) -> list[np.ndarray]:
        sums = self.sess.run(self.sums)
        self.sess.run(self.reset)
        return [s / np.float32(steps) for s in sums]

    def gradient_means(self, steps: int) -> list[np.ndarray]:
        raise TensorSparkValueError("a TF1 graph does not push gradients")

    def loss_totals(self) -> tuple[float, float]:
        return self.loss_sum, self.loss_count

    def metrics(self) -> dict[str, float]:
        return {}

    def extra_result(self) -> dict[str, Any]:
        return {"last_fetch": _plain(self.last)}


def train_partition(
    cfg: task.TaskConfig, spec: GraphSpec, graph: Any, partition: int, rows: Iterable[Any]
) -> Iterator[dict[str, Any]]:
    """Spark ``mapPartitionsWithIndex`` function: train on one partition."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    replica = task.cached_replica(
        f"{cfg.run_id}/{spec.key}/{cfg.rule.accumulates}",
        lambda: GraphReplica(graph.value, spec, cfg),
    )
    full = [cfg.seed, cfg.epoch, partition] if cfg.shuffle == "full" else None
    chunk_rows = cfg.batch_size * cfg.buffer_batches
    chunks = feed.tuple_chunks(rows, chunk_rows, partition, spec.feed_names, full_shuffle=full)
    yield task.train(cfg, replica, chunks)


def _is_resource(var: Any) -> bool:
    return "Resource" in type(var).__name__ or var.op.type == "VarHandleOp"


def _plain(value: Any) -> Any:
    """Fetch results as plain Python values: scalars as numbers, ops as None."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic) and np.size(value) == 1:
        return value.item()
    return value
