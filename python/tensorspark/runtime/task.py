"""The task loop that both APIs run in a Spark task.

A task connects to the parameter server (or to every shard), joins the run
(fencing its partition's older attempts), pulls, and streams its partition
through the one feed (``runtime.feed``), running groups of steps on a
replica. Every ``sync_interval`` steps it checks the loss, lets the update
rule make the push, checks the push for NaN/Inf, pushes, pulls, reports
progress and re-arms the stack dumps. It returns one result record.

The replica is the only API-specific part: a TF1 graph (``tf1.replica``) or
a Keras model (``keras.replica``). It implements :class:`Replica`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .. import _core
from ..errors import PSConnectionError, TensorSparkValueError
from . import feed, gpu, shards, spark, sparse, watchdog
from .updates import Rule


@dataclass(frozen=True)
class TaskConfig:
    """What every task needs, shipped in the task closure (plain values)."""

    host: str
    port: int
    servers: tuple[tuple[str, int], ...]  # several servers sharing the model, or ()
    secret: bytes
    run_id: str  # names the run; a Python worker keeps one replica per run id
    epoch: int  # the job's index within the run (a Keras epoch, a TF1 run call)
    names: tuple[str, ...]  # synced variables, in the replica's order
    batch_size: int
    buffer_batches: int
    shuffle: bool | str  # False, True (buffered) or "full" (the whole partition)
    seed: int
    sync_interval: int
    steps_per_call: int
    rule: Rule
    threads: int
    connect_timeout: float
    io_timeout: float
    heartbeat_interval: float
    hang_timeout: float | None  # stack dumps after half of it without a sync
    join: bool = True  # False: a validation job (no membership, no push)
    tables: tuple[Any, ...] = ()  # runtime.sparse.TableFeed: tables whose rows travel per batch
    prefetch: bool = True  # pull the next batch's rows during this batch (runtime.sparse)
    tls_fingerprints: tuple[str, ...] = ()  # pinned server certificates (TLS), or ()
    directory: tuple[str, int] | None = None  # the driver's shard directory (ps_shards), or None
    shard_wait: float = 240.0  # seconds to wait for a lost shard to serve again

    def where(self, partition: int) -> str:
        return f"partition {partition} (epoch {self.epoch + 1})"


class Replica(Protocol):
    """A task's copy of the model, one per Python worker and run: the only API-specific part.

    Values are lists of float32 arrays in ``TaskConfig.names`` order; the
    loss totals and metrics count from the last :meth:`begin`.
    """

    def begin(self, cfg: TaskConfig) -> None: ...  # a job starts: reset totals
    def train(self, batches: list[feed.Chunk]) -> None: ...  # a step per (equal) batch
    def read(self) -> list[np.ndarray]: ...  # the synced variables' values
    def load(self, values: list[np.ndarray]) -> None: ...  # set them
    def iterate_means(self, steps: int) -> list[np.ndarray]: ...  # then reset
    def gradient_means(self, steps: int) -> list[np.ndarray]: ...  # then reset
    def loss_totals(self) -> tuple[float, float]: ...  # sum of loss x rows, rows
    def metrics(self) -> dict[str, float]: ...  # the loss excluded
    def extra_result(self) -> dict[str, Any]: ...  # API-specific result fields


# The latest run's replica in this Python worker (Spark reuses workers).
_REPLICAS: dict[str, Any] = {}


def cached_replica(key: str, build: Any) -> Any:
    """The replica for ``key``, built by ``build()`` on the worker's first task.

    One replica per worker: building a new one frees the previous run's.
    The task's GPUs (``runtime.gpu``) are claimed first, on every call.
    """
    claimed = gpu.claim()  # before TensorFlow's devices start: build() may start them
    replica = _REPLICAS.get(key)
    if replica is None:
        _REPLICAS.clear()
        gpu.grow_memory()
        replica = _REPLICAS[key] = build()
        replica.tasks_served = 0
    replica.tasks_served += 1
    replica.gpu = claimed
    return replica


def connect(cfg: TaskConfig, partition: int, attempt: int, *, member: bool = True) -> Any:
    """The task's connection: to the one server, or to every shard.

    ``member=False``: a connection that never joins (row traffic), so no heartbeat thread.
    """
    common = {
        "partition_id": partition,
        "attempt": attempt,
        "connect_timeout_s": cfg.connect_timeout,
        "io_timeout_s": cfg.io_timeout,
        "heartbeat_interval_s": cfg.heartbeat_interval if cfg.join and member else 0.0,
        "tls_fingerprints": list(cfg.tls_fingerprints),
    }
    if cfg.directory is not None:
        return ShardClient(cfg, common)
    if cfg.servers:
        return _core.ShardedClient(list(cfg.servers), cfg.secret, **common)
    return _core.Client(cfg.host, cfg.port, cfg.secret, **common)


class PushDropped(Exception):  # noqa: N818 - control flow, not an error
    """A push lost with a shard that moved: the task pulls and trains on."""


class ShardClient:
    """A task's connection to shards hosted by Spark (``ps_shards``).

    The shards' addresses come from the driver's directory
    (:func:`runtime.shards.lookup`). When a shard goes away (its executor
    died), the next pull or push finds where Spark runs it now, connects
    again (joining again if the task had joined) and goes on: a pull is
    repeated; a push, which may have reached the other shards, is dropped
    (:class:`PushDropped`), so no update is applied twice. Other calls pass
    through. Not thread-safe, as the core client.
    """

    def __init__(self, cfg: TaskConfig, common: dict[str, Any]) -> None:
        self._cfg, self._common = cfg, common
        self._joined, self._dump = False, ""
        self.reconnects = 0
        self._client = self._open()

    def _open(self) -> Any:
        cfg = self._cfg
        _, addresses = shards.lookup(
            cfg.directory, cfg.secret, cfg.shard_wait, connect_timeout=cfg.connect_timeout
        )
        servers, pins = shards.endpoints(addresses)
        return _core.ShardedClient(
            servers,
            cfg.secret,
            **{**self._common, "tls_fingerprints": pins},
        )

    def _reconnect(self, error: PSConnectionError) -> None:
        deadline = time.monotonic() + self._cfg.shard_wait
        with contextlib.suppress(Exception):
            self._client.close()
        print(
            f"tensorspark: a parameter-server shard went away ({error}); finding it again",
            file=sys.stderr,
            flush=True,
        )
        while True:
            try:
                client = self._open()  # waits until every shard serves
                if self._dump:
                    client.set_dump_file(self._dump)
                if self._joined:
                    client.join()
                self._client = client
                self.reconnects += 1
                return
            except PSConnectionError as e:  # a shard that moved again, or not yet listening
                if time.monotonic() >= deadline:
                    raise PSConnectionError(
                        f"the parameter-server shards did not serve again within "
                        f"{self._cfg.shard_wait:g} s (wait_timeout): {e}"
                    ) from error
                time.sleep(0.5)

    def join(self) -> Any:
        try:
            clock = self._client.join()
        except PSConnectionError as e:
            self._reconnect(e)
            clock = self._client.join()
        self._joined = True
        return clock

    def leave(self) -> None:
        self._joined = False
        self._client.leave()

    def set_dump_file(self, path: str) -> None:
        self._dump = path
        self._client.set_dump_file(path)

    def pull_into(self, names: Any, out: Any) -> int:
        try:
            return self._client.pull_into(names, out)
        except PSConnectionError as e:
            self._reconnect(e)
            return self._client.pull_into(names, out)

    def push(self, *args: Any, **kwargs: Any) -> int:
        try:
            return self._client.push(*args, **kwargs)
        except PSConnectionError as e:
            self._reconnect(e)
            raise PushDropped from e

    def report_progress(self, *args: Any) -> None:
        with contextlib.suppress(PSConnectionError):  # the next pull or push reconnects
            self._client.report_progress(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def rss_bytes() -> int:
    try:  # resident set size, for the memory bound
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Sync:
    """Pushes the task's update and pulls the merged model."""

    def __init__(self, client: Any, replica: Any, cfg: TaskConfig) -> None:
        self.client, self.replica, self.cfg = client, replica, cfg
        self.names = list(cfg.names)
        self.pulled: list[np.ndarray] | None = None
        self.version = self.pushes = self.dropped = 0
        self.staleness: list[int] = []

    def pull(self) -> None:
        if self.pulled is None:
            self.pulled = [np.empty_like(v, np.float32) for v in self.replica.read()]
        self.version = self.client.pull_into(self.names, self.pulled)
        self.replica.load(self.pulled)

    def push_and_pull(self, steps: int, since_sync: int, where: str) -> tuple[float, float]:
        """Check the loss and the update, push, pull; the loss totals."""
        totals = self.replica.loss_totals()
        if not np.isfinite(totals[0]):
            raise TensorSparkValueError(
                f"the loss became NaN or Inf before step {steps} of {where}; nothing from this "
                "interval was pushed, so the parameter server keeps the last good model "
                f"(version {self.version}). Lower the learning rate or check the data for NaN/Inf"
            )
        rule = self.cfg.rule
        if rule.pulls_first:
            self.version = self.client.pull_into(self.names, self.pulled)
        push = rule.push(self.replica, self.pulled, since_sync)
        for name, arr in zip(self.names, push.arrays, strict=True):
            if not np.isfinite(arr).all():
                raise TensorSparkValueError(
                    f"the update of variable {name!r} is NaN or Inf at step {steps} of {where}; "
                    "nothing from this interval was pushed, so the parameter server keeps the "
                    f"last good model (version {self.version}). Lower the learning rate or "
                    "check the data"
                )
        pulled_at = self.version
        try:
            self.version = self.client.push(
                push.kind, self.names, push.arrays, mean_window=push.mean_window
            )
        except PushDropped:
            self.dropped += 1
            self.pull()  # the moved shard's model, as it came back
            return totals
        self.staleness.append(max(0, self.version - pulled_at - 1))
        self.pushes += 1
        if push.keep is None:
            self.pull()
        else:
            self.replica.load(push.keep)
        return totals


def train(
    cfg: TaskConfig,
    replica: Any,
    chunks: Iterable[feed.Chunk],
    *,
    identity: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Train ``replica`` on one partition's chunks; returns the result record.

    ``identity`` (partition, attempt number, attempt id) defaults to the
    Spark task's (``runtime.spark.task_identity``).
    """
    partition, attempt_number, attempt = identity or spark.task_identity()
    started = time.monotonic()
    replica.begin(cfg)
    rss_base = rss_peak = rss_bytes()
    where = cfg.where(partition)
    client = connect(cfg, partition, attempt)
    with (
        contextlib.ExitStack() as stack,
        watchdog.membership(
            client, cfg.join, cfg.hang_timeout, f"p{partition}-a{attempt}"
        ) as dumps,
    ):
        sync = Sync(client, replica, cfg)
        sync.pull()
        stream = feed.BatchStream(
            chunks,
            cfg.batch_size,
            buffer_batches=cfg.buffer_batches,
            shuffle=cfg.shuffle is True,
            seed=[cfg.seed, cfg.epoch, partition],
        )
        group = feed.steps_per_call(cfg.steps_per_call, cfg.buffer_batches, cfg.sync_interval)
        rows = None
        if cfg.tables:  # one step per call: each batch has its own rows
            rows = sparse.RowExchange(
                sparse.Rows(connect(cfg, partition, attempt, member=False), cfg.tables),
                cfg.tables,
                prefetch=cfg.prefetch,
            )
            stack.callback(rows.close)
            stack.callback(setattr, replica, "rows", None)
            replica.rows = rows
            batches_in, group = rows.batches(stream), 1
        else:
            batches_in = stream
        steps = samples = since_sync = 0
        last = (0.0, 0.0)  # loss totals at the last sync
        train_started = time.monotonic()
        for batches in feed.grouped(batches_in, cfg.batch_size, group, cfg.sync_interval):
            replica.train(batches)
            steps += len(batches)
            samples += sum(len(b[0]) for b in batches)
            since_sync += len(batches)
            if since_sync == cfg.sync_interval:
                if rows is not None:
                    rows.flush()
                now = sync.push_and_pull(steps, since_sync, where)
                loss = (now[0] - last[0]) / (now[1] - last[1]) if now[1] > last[1] else np.nan
                client.report_progress(steps, samples, float(loss))
                last = now
                if dumps is not None:
                    dumps.progress()
                since_sync = 0
                rss_peak = max(rss_peak, rss_bytes())
        if rows is not None:
            rows.flush()
        if since_sync:
            sync.push_and_pull(steps, since_sync, where)
        rss_peak = max(rss_peak, rss_bytes())
        train_seconds = time.monotonic() - train_started
        loss_sum, loss_count = replica.loss_totals()
        return {
            "partition": partition,
            "attempt": attempt,
            "attempt_number": attempt_number,
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
            "replica_tasks": getattr(replica, "tasks_served", 1),  # 2+: built by an earlier task
            "rows_pulled": rows.rows_pulled if rows is not None else 0,
            "rows_pushed": rows.rows_pushed if rows is not None else 0,
            "shard_reconnects": getattr(client, "reconnects", 0),
            "pushes_dropped": sync.dropped,
            "gpu": getattr(replica, "gpu", None),  # runtime.gpu.claim()
            **replica.extra_result(),
        }
