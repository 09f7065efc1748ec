"""The seed-compatible ``SparkSession``: a TF1 session trained across Spark tasks.

The driver owns the parameter server (C++ threads inside the driver process
by default), ships the graph to the tasks in a broadcast, runs one Spark job
per :meth:`SparkSession.run`, and loads the trained values back into the
driver's own ``tf.Session`` when the job completes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from . import _graph, _spark, _watchdog
from ._worker import TaskConfig, train_partition
from .combiners import DeltaCombiner, ElasticCombiner, MeanCombiner
from .errors import TensorSparkValueError
from .ps import ParameterServer, PSClient, ShardedPSClient, generate_secret, parse_address

log = logging.getLogger("tensorspark")


def _shutdown(client: PSClient | ShardedPSClient, server: ParameterServer | None) -> None:
    client.close()
    if server is not None:
        server.stop()


@dataclass
class RunSummary:
    """What one :meth:`SparkSession.run` did.

    Attributes
    ----------
    version : int
        Model version on the server after the run (total pushes applied).
    steps, samples : int
        Training steps and rows processed by all tasks.
    seconds : float
        Wall time of the Spark job.
    partitions : list of dict
        Per task: partition, attempt, steps, samples, pushes, seconds and the
        last value of the fetches.
    """

    version: int
    steps: int
    samples: int
    seconds: float
    partitions: list[dict[str, Any]] = field(default_factory=list)


class SparkSession:
    """Train a TensorFlow 1 graph (``tensorflow.compat.v1``) on a Spark RDD.

    Parameters
    ----------
    sc : pyspark.SparkContext
        The Spark context whose executors run the training tasks.
    sess : tf.compat.v1.Session
        The driver's session; it holds the trained values after each run.
    user, name : str
        Owner and name of the training run (shown in the Spark UI).
    server_host : str, optional
        Address at which executors reach the parameter server. ``None`` means
        the driver's address (``spark.driver.host``; ``127.0.0.1`` in local
        mode). With the default ``start_server=True`` the server runs inside
        this process; a loopback host makes it listen on loopback only.
    server_port : int
        Port of the parameter server; 0 picks a free one.
    sync_interval : int
        Local steps between a task's push-and-pull.
    batch_size : int
        Rows per training step.
    secret : bytes, optional
        The run's shared secret; generated when None. Required with
        ``start_server=False``.
    start_server : bool
        False connects to an already running ``tensorspark-ps`` at
        ``server_host:server_port`` instead of starting one.
    servers : list of str, optional
        Several running ``tensorspark-ps`` processes (``"host:port"``) that
        hold the model together, each variable cut into chunks spread over
        them (docs/protocol.md, "Sharding"). Implies ``start_server=False``;
        needs ``secret``.
    connect_timeout, io_timeout : float
        Seconds allowed to reach the server, and for any single transfer.
    heartbeat_timeout : float
        Seconds of silence after which the server stops waiting for a task
        (its tasks send heartbeats every third of it).
    wait_timeout : float
        Longest time a task waits for the others in the ``"sync"`` and
        ``"ssp"`` modes before failing with a message naming them; keep it
        below ``io_timeout``.
    threads_per_task : int, optional
        TensorFlow threads per task; default ``spark.task.cpus``.

    Raises
    ------
    AddressInUseError
        ``server_port`` is taken.
    PSConnectionError, AuthenticationError
        With ``start_server=False``: the server is unreachable or refuses
        the secret.
    """

    def __init__(
        self,
        sc: Any,
        sess: Any,
        user: str = "",
        name: str = "",
        server_host: str | None = None,
        server_port: int = 0,
        sync_interval: int = 100,
        batch_size: int = 100,
        *,
        secret: bytes | None = None,
        start_server: bool = True,
        servers: list[str] | None = None,
        connect_timeout: float = 30.0,
        io_timeout: float = 300.0,
        heartbeat_timeout: float = 30.0,
        wait_timeout: float = 240.0,
        threads_per_task: int | None = None,
        seed: int = 0,
    ) -> None:
        if int(sync_interval) < 1:
            raise TensorSparkValueError(f"sync_interval must be >= 1, got {sync_interval}")
        if int(batch_size) < 1:
            raise TensorSparkValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sc, self.sess = sc, sess
        self.user, self.name = user, name
        self.sync_interval, self.batch_size = int(sync_interval), int(batch_size)
        self.connect_timeout, self.io_timeout = float(connect_timeout), float(io_timeout)
        self.heartbeat_timeout, self.wait_timeout = float(heartbeat_timeout), float(wait_timeout)
        self.seed = int(seed)
        conf = sc.getConf()
        self.threads_per_task = int(threads_per_task or conf.get("spark.task.cpus", "1"))
        self._tmp_dir = conf.get("spark.tmp.dir", None)
        if conf.get("spark.hdfs.dir", None):
            log.info(
                "spark.hdfs.dir is no longer needed: the graph travels to tasks in a Spark "
                "broadcast; the setting is ignored"
            )
        self._runs = 0
        self._server: ParameterServer | None = None
        self._registered: set[str] = set()

        local = sc.master.startswith("local")
        if server_host is None:
            server_host = "127.0.0.1" if local else conf.get("spark.driver.host")
        self.server_host = server_host
        self.servers: tuple[tuple[str, int], ...] = ()
        if servers:
            self.servers = tuple(parse_address(a) for a in servers)
            self.server_host, self.server_port = self.servers[0]
            start_server = False
        if start_server:
            self.secret = secret or generate_secret()
            bind = "127.0.0.1" if _spark.is_loopback(server_host) else "0.0.0.0"
            self._server = ParameterServer(self.secret, host=bind, port=int(server_port))
            self.server_port = self._server.port
        else:
            if not secret:
                raise TensorSparkValueError(
                    "an external parameter server needs the run's secret: pass secret=<bytes of "
                    "the file given to tensorspark-ps --secret-file>"
                )
            self.secret = secret
            if not self.servers:
                self.server_port = int(server_port)
        # The driver's own connection: registers variables, reads the result.
        try:
            self._client = self._connect()
        except BaseException:
            if self._server is not None:
                self._server.stop()
            raise
        # Stops the in-driver server when the session is dropped or at exit.
        self._finalizer = weakref.finalize(self, _shutdown, self._client, self._server)
        where = (
            ", ".join(f"{h}:{p}" for h, p in self.servers)
            or f"{self.server_host}:{self.server_port}"
        )
        log.info("tensorspark: parameter server at %s", where)

    def _connect(self) -> PSClient | ShardedPSClient:
        timeouts = {"connect_timeout": self.connect_timeout, "io_timeout": self.io_timeout}
        if self.servers:
            return ShardedPSClient(self.servers, self.secret, **timeouts)
        return PSClient(self.server_host, self.server_port, self.secret, **timeouts)

    @property
    def server(self) -> ParameterServer | None:
        """The in-driver parameter server, or None when using an external one."""
        return self._server

    def stats(self) -> dict[str, int | float]:
        """The parameter server's counters (``_f64`` keys as floats)."""
        return self._client.stats()

    def run(
        self,
        fetches: Any,
        feed_rdd: Any = None,
        feed_name_list: list[str] | None = None,
        param_list: list[Any] | None = None,
        feed_dict: dict[Any, Any] | None = None,
        weight_combiner: MeanCombiner | DeltaCombiner | ElasticCombiner | None = None,
        shuffle_within_partition: bool = False,
        *,
        consistency: str = "async",
        staleness: int = 0,
        hang_timeout: float | None = 600.0,
    ) -> RunSummary | Any:
        """Run ``fetches`` on every batch of ``feed_rdd`` across Spark tasks.

        Parameters
        ----------
        fetches : tf.Operation, tf.Tensor, str or list of them
            What each training step runs, usually the train op.
        feed_rdd : pyspark.RDD
            Rows as tuples with one value per name in ``feed_name_list``.
            Without it, ``fetches`` runs once in the driver's session.
        feed_name_list : list of str
            Names of the tensors each row's values feed, e.g.
            ``[x.name, y_.name]``.
        param_list : list of tf.Variable, optional
            Variables synchronized through the parameter server; default all
            trainable variables.
        feed_dict : dict, optional
            Extra constant feeds for every step (tensor or name -> value).
        weight_combiner : MeanCombiner, DeltaCombiner or ElasticCombiner, optional
            How pushes merge on the server; default :class:`MeanCombiner`.
        shuffle_within_partition : bool
            Shuffle each partition's rows before batching.
        consistency : {"async", "sync", "ssp"}
            ``"async"`` (default): each push is applied when it arrives.
            ``"sync"``: every sync is a round; the server applies the average
            of the round's pushes once every live task has pushed, and the
            tasks continue from that model. ``"ssp"``: bounded staleness, a
            task at sync ``c`` waits until every live task has reached
            ``c - staleness``. A task that dies is not waited for.
        staleness : int
            The ``"ssp"`` bound.
        hang_timeout : float or None
            When no task has made progress (a sync) for this many seconds,
            print every task's clock and Python stack dump, cancel the job
            and raise :class:`PSTimeoutError` naming the stuck tasks. None
            turns it off (it needs a single parameter server).

        Returns
        -------
        RunSummary
            Steps, samples, model version and per-task figures.
        """
        graph = self.sess.graph
        if feed_rdd is None:
            return self.sess.run(fetches, feed_dict=feed_dict)
        fetch_names, _ = _graph.fetch_names(graph, fetches)
        if not feed_name_list:
            raise TensorSparkValueError(
                "run: feed_name_list is required with feed_rdd, e.g. [x.name, y_.name]"
            )
        feed_names = [n if isinstance(n, str) else getattr(n, "name", n) for n in feed_name_list]
        _graph.check_feed_names(graph, feed_names)
        extra = self._extra_feeds(graph, feed_dict)
        params = _graph.resolve_params(graph, param_list)
        combiner = weight_combiner or MeanCombiner()
        if not isinstance(combiner, (DeltaCombiner, MeanCombiner, ElasticCombiner)):
            raise TensorSparkValueError(
                "weight_combiner must be tensorspark.MeanCombiner(), DeltaCombiner() or "
                "ElasticCombiner(), got "
                f"{type(combiner).__name__}"
            )
        names = [_graph.param_name(v) for v in params]
        self._configure(consistency, staleness)
        self._register(names, params)

        num_parts = feed_rdd.getNumPartitions()
        mean_window = getattr(combiner, "n", None) or max(1, num_parts)
        cfg = TaskConfig(
            host=self.server_host,
            port=self.server_port,
            servers=self.servers,
            secret=self.secret,
            run_name=f"{self.user}/{self.name}",
            run_index=self._runs,
            fetch_names=tuple(fetch_names),
            feed_names=tuple(feed_names),
            param_names=tuple(names),
            extra_feeds=extra,
            batch_size=self.batch_size,
            sync_interval=self.sync_interval,
            kind=combiner.kind,
            mean_window=int(mean_window),
            average_iterates=bool(getattr(combiner, "average_iterates", False)),
            elastic_alpha=float(getattr(combiner, "alpha", 0.0)),
            shuffle=bool(shuffle_within_partition),
            seed=self.seed,
            threads=self.threads_per_task,
            connect_timeout=self.connect_timeout,
            io_timeout=self.io_timeout,
            join=not self.servers,
            heartbeat_interval=min(1.0, self.heartbeat_timeout / 3),
            hang_timeout=None if self.servers else hang_timeout,
        )
        meta = _graph.export_graph(graph)
        self._write_tmp("graph.meta", meta)
        broadcast = self.sc.broadcast(meta)
        description = f"tensorspark {cfg.run_name or 'run'} #{self._runs} ({num_parts} tasks)"
        group = f"tensorspark-{id(self):x}-{self._runs}"
        watch: Any = contextlib.nullcontext()
        if cfg.hang_timeout:
            watch = _watchdog.HangWatchdog(self._connect, self.sc, cfg.hang_timeout, group)
        started = time.monotonic()
        try:
            with _spark.job_group(self.sc, group, description), watch:
                results = feed_rdd.mapPartitionsWithIndex(
                    functools.partial(train_partition, cfg, broadcast)
                ).collect()
        except Exception as e:  # noqa: BLE001 - translated below, original chained
            if isinstance(watch, _watchdog.HangWatchdog):
                watch.raise_if_fired(e)
            _spark.raise_task_error(e, description)
        finally:
            broadcast.unpersist()
        seconds = time.monotonic() - started
        self._runs += 1
        version = self._load_trained(names, params)
        return RunSummary(
            version=version,
            steps=sum(r["steps"] for r in results),
            samples=sum(r["samples"] for r in results),
            seconds=seconds,
            partitions=results,
        )

    def save_checkpoint(self, path: str, var_list: list[Any] | None = None) -> str:
        """Save the driver's trained variables as a TF checkpoint.

        Parameters
        ----------
        path : str
            Checkpoint prefix, e.g. ``"ckpt/model"`` (files
            ``model.index`` and ``model.data-*`` are written; directories
            are created).
        var_list : list of tf.Variable, optional
            Variables to save; default every global variable.

        Returns
        -------
        str
            The prefix, for ``tf.compat.v1.train.Saver().restore``.
        """
        import tensorflow.compat.v1 as tf

        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with self.sess.graph.as_default():
            saver = tf.train.Saver(var_list=var_list, save_relative_paths=True)
        return saver.save(self.sess, path, write_meta_graph=True)

    def export_saved_model(
        self, export_dir: str, inputs: dict[str, Any], outputs: dict[str, Any]
    ) -> str:
        """Export the trained graph as a SavedModel for serving.

        Parameters
        ----------
        export_dir : str
            A directory that does not exist yet.
        inputs, outputs : dict of str to tf.Tensor
            The serving signature, e.g. ``{"x": x}`` and ``{"y": y}``.

        Returns
        -------
        str
            ``export_dir``, loadable with ``tf.saved_model.load``.
        """
        import tensorflow.compat.v1 as tf

        if os.path.exists(export_dir):
            raise TensorSparkValueError(
                f"export_saved_model: {export_dir} already exists; choose a new directory"
            )
        with self.sess.graph.as_default():
            tf.saved_model.simple_save(self.sess, export_dir, inputs=inputs, outputs=outputs)
        return export_dir

    def close(self) -> None:
        """Close the driver's connection and stop the in-driver server."""
        self._finalizer()
        self._server = None

    def __enter__(self) -> SparkSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------

    def _extra_feeds(self, graph: Any, feed_dict: dict | None) -> tuple[tuple[str, Any], ...]:
        if not feed_dict:
            return ()
        import numpy as np

        names = [k if isinstance(k, str) else getattr(k, "name", k) for k in feed_dict]
        _graph.check_feed_names(graph, names, what="feed_dict")
        return tuple((n, np.asarray(v)) for n, v in zip(names, feed_dict.values(), strict=True))

    def _configure(self, consistency: str, staleness: int) -> None:
        """Set the run's consistency mode on the server before the tasks join."""
        if self.servers:
            if consistency != "async":
                raise TensorSparkValueError(
                    f"consistency={consistency!r} needs a single parameter server; with "
                    "servers=[...] only 'async' is supported"
                )
            return
        self._client.configure(
            consistency,
            staleness,
            heartbeat_timeout=self.heartbeat_timeout,
            wait_timeout=self.wait_timeout,
        )

    def _register(self, names: list[str], params: list[Any]) -> None:
        """Register the variables with the driver's current values (first run)."""
        new = [(n, v) for n, v in zip(names, params, strict=True) if n not in self._registered]
        if not new:
            return
        values = self.sess.run([v for _, v in new])
        self._client.register(dict(zip([n for n, _ in new], values, strict=True)))
        self._registered.update(n for n, _ in new)

    def _load_trained(self, names: list[str], params: list[Any]) -> int:
        pulled = self._client.pull(names)
        _graph.load_values(self.sess, params, [pulled[n] for n in names])
        if self._tmp_dir:
            import numpy as np

            path = self._tmp_path("params.npz")
            np.savez(path, **{n.replace("/", "__"): pulled[n] for n in names})
        return self._client.stats().get("version", 0)

    def _tmp_path(self, filename: str) -> str:
        d = os.path.join(self._tmp_dir, "tensorspark", self.user or "user", self.name or "run")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, filename)

    def _write_tmp(self, filename: str, data: bytes) -> None:
        if self._tmp_dir:
            with open(self._tmp_path(filename), "wb") as f:
                f.write(data)
