"""The seed-compatible ``SparkSession``: a TF1 session trained across Spark tasks.

The driver-side run (``runtime.driver``) owns the parameter server (C++
threads inside the driver process by default, or running
``tensorspark-ps`` processes), the graph travels to the tasks in a
broadcast, each :meth:`SparkSession.run` is one Spark job of the shared
task loop (``runtime.task``) over a TF1-graph replica, and the trained
values are loaded back into the driver's own ``tf.Session`` when the job
completes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..combiners import DeltaCombiner, ElasticCombiner, MeanCombiner
from ..errors import TensorSparkValueError
from ..ps import ParameterServer
from ..runtime import driver, options, spark, task
from ..runtime.sparse import TableFeed, pull_vocabulary, vocabulary_chunks
from . import graph as _graph
from .replica import GraphSpec, train_partition

log = logging.getLogger("tensorspark")


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
    loss : float
        Sample-weighted mean of ``run(loss=...)`` over the tasks (NaN without
        one).
    partitions : list of dict
        Per task, the result record of the task loop: partition, attempt
        (Spark's task attempt id), steps, samples, pushes, seconds, loss,
        staleness and the last value of the fetches.
    """

    version: int
    steps: int
    samples: int
    seconds: float
    partitions: list[dict[str, Any]] = field(default_factory=list)
    loss: float = float("nan")


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
        ``start_server=False`` and ``servers``.
    tls : bool, str or list of str
        Encrypt the parameter-server traffic with TLS 1.3 (docs/protocol.md,
        "TLS"), as :func:`tensorspark.keras.fit`'s ``tls``: True for the
        server tensorspark starts (a per-run self-signed certificate whose
        fingerprint the tasks pin), fingerprints for external servers.
    start_server : bool
        False connects to an already running ``tensorspark-ps`` at
        ``server_host:server_port`` instead of starting one.
    servers : list of str, optional
        Several running ``tensorspark-ps`` processes (``"host:port"``) that
        hold the model together, each variable cut into chunks spread over
        them (docs/protocol.md, "Sharding"). Tasks join every server, so
        fencing, the consistency modes and the hang watchdog work as with
        one. Implies ``start_server=False``; needs ``secret``.
    ps_shards : int
        Run the parameter server as this many shards in Spark tasks of
        their own, as :func:`tensorspark.keras.fit`'s ``ps_shards`` (a task
        slot each for the whole run; a lost shard comes back from its
        newest snapshot under ``checkpoint_dir``). 0 (default): the server
        runs in the driver.
    checkpoint_dir, checkpoint_every_s, checkpoint_every_versions, checkpoint_keep, resume_from
        Snapshots of the in-driver server and resuming from them, with the
        names, defaults and meaning of :func:`tensorspark.keras.fit`'s
        (docs/snapshots.md). After a resume the variables start from the
        snapshot, and :attr:`runs_done` says how many runs it had
        completed. With ``servers``, each ``tensorspark-ps`` snapshots into
        its own ``--snapshot-dir``, tagged after every run, and
        ``resume_from="servers"`` returns all of them to the newest set
        they all hold.
    progress : bool
        Draw a progress bar on stderr during each run.
    log_dir : str, optional
        Write TensorBoard scalars here (per run: loss, samples/s, and per
        worker samples/s, loss and staleness).
    mlflow : bool or tensorspark.tracking.MlflowCallback
        Log the session as one MLflow run from the driver (docs/tracking.md):
        these options and each :meth:`run`'s as parameters, and per run
        (``step`` = the run's number) its loss, samples/s and staleness. The
        MLflow run ends at :meth:`close`, ``FAILED`` if a run raised. A TF1
        graph is not logged as a model (use :meth:`export_saved_model`).
    ui_port : int, optional
        Serve a live status page of the run from the driver (each worker's
        clock, steps, samples/s, loss curve and staleness; the server's
        traffic, refused frames and snapshots; docs/status_page.md). 0 picks
        a free port. The URL (with a token derived from the secret) is
        printed, logged, kept in :attr:`status_url` and added to the Spark
        job descriptions. None: off.
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
    seed : int
        Seeds the shuffling.

    Raises
    ------
    AddressInUseError
        ``server_port`` is taken.
    PSConnectionError, AuthenticationError
        With ``start_server=False`` or ``servers``: a server is unreachable
        or refuses the secret.
    TensorSparkValueError
        A bad option, named.
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
        tls: bool | str | list[str] = False,
        start_server: bool = True,
        servers: list[str] | None = None,
        ps_shards: int = 0,
        checkpoint_dir: str | None = None,
        checkpoint_every_s: float = 30.0,
        checkpoint_every_versions: int = 0,
        checkpoint_keep: int = 3,
        resume_from: str | None = None,
        progress: bool = True,
        log_dir: str | None = None,
        mlflow: Any = False,
        ui_port: int | None = None,
        connect_timeout: float = 30.0,
        io_timeout: float = 300.0,
        heartbeat_timeout: float = 30.0,
        wait_timeout: float = 240.0,
        threads_per_task: int | None = None,
        seed: int = 0,
    ) -> None:
        if not hasattr(sc, "getConf") or not hasattr(sc, "parallelize"):
            raise TensorSparkValueError(
                "SparkSession(sc, sess, ...) needs a classic pyspark.SparkContext as sc, got "
                f"{type(sc).__name__}. The TF1 API needs classic Spark (RDDs and broadcasts), "
                "which a Spark Connect client does not have; under Spark Connect, train a Keras "
                "model with tensorspark.keras.fit on a DataFrame (docs/deploy.md, Spark Connect)"
            )
        opts = dict(locals())
        opts["threads"] = opts.pop("threads_per_task")
        for k in ("self", "sc", "sess", "user", "name"):
            opts.pop(k)
        opts = options.check(opts)
        self.sc, self.sess = sc, sess
        self.user, self.name = user, name
        self.sync_interval, self.batch_size = sync_interval, batch_size
        self.seed = seed
        conf = sc.getConf()
        self._tmp_dir = conf.get("spark.tmp.dir", None)
        if conf.get("spark.hdfs.dir", None):
            log.info(
                "spark.hdfs.dir is no longer needed: the graph travels to tasks in a Spark "
                "broadcast; the setting is ignored"
            )
        self._run = driver.DriverRun(
            sc, f"{user}/{name}" if user or name else "run", opts, api="tf1"
        )
        # Stops the in-driver server when the session is dropped or at exit.
        self._finalizer = weakref.finalize(self, self._run.close)
        try:
            self.runs_done = self._run.start_epochs()
        except BaseException as e:
            self._run.failed(e)
            self._finalizer()
            raise
        self._runs = self.runs_done
        self._registered: set[str] = set()
        self.server_host, self.server_port = self._run.host, self._run.port
        self.servers = self._run.servers
        self.secret = self._run.secret
        self.status_url: str | None = self._run.status_url

    @property
    def server(self) -> ParameterServer | None:
        """The in-driver parameter server, or None when using external ones."""
        return self._run.server

    def stats(self) -> dict[str, int | float]:
        """The parameter server's counters (``_f64`` keys as floats)."""
        return self._run.client.stats()

    def run(
        self,
        fetches: Any,
        feed_rdd: Any = None,
        feed_name_list: list[str] | None = None,
        param_list: list[Any] | None = None,
        feed_dict: dict[Any, Any] | None = None,
        weight_combiner: MeanCombiner | DeltaCombiner | ElasticCombiner | str | None = None,
        shuffle_within_partition: bool | str = False,
        *,
        loss: Any = None,
        sparse_params: list[Any] | None = None,
        consistency: str = "async",
        staleness: int = 0,
        buffer_batches: int = 8,
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
            The update rule (how pushes merge on the server); default
            :class:`MeanCombiner`. The names ``"mean"``, ``"delta"`` and
            ``"elastic"`` work too, as in ``keras.fit(update=...)``.
        shuffle_within_partition : bool or "full"
            True: shuffle rows through a buffer of ``buffer_batches``
            batches as they stream in (bounded memory, the same feed as
            ``keras.fit``). ``"full"``: hold the whole partition and permute
            it, the original TensorSpark's exact shuffle (memory grows with
            the partition). False: rows in order.
        loss : tf.Tensor or str, optional
            A scalar tensor of the graph whose value each step reports: the
            progress bar, ``RunSummary.loss``, TensorBoard and the NaN check
            (a NaN loss stops the run before it is pushed) use it. Default:
            the first scalar floating-point tensor among ``fetches``, else
            the loss a fetched ``optimizer.minimize(...)`` op minimizes
            (found through its gradients), else none (NaN).
        sparse_params : list of tf.Variable, optional
            Embedding tables ``W`` (2-D, ``[vocabulary, dim]``) read with
            ``tf.nn.embedding_lookup(W, ids)``, ``ids`` fed from
            ``feed_name_list``. The server holds each as a sparse table
            (docs/sparse.md) whose rows start as the driver's values; for
            every batch a task pulls only the rows of the batch's unique ids
            into its copy of ``W``, runs the step, and pushes those rows'
            change (a delta) at once, not every ``sync_interval``. The task's
            graph still allocates the whole ``W``: the table must fit in a
            task's memory, but only a batch's rows travel. After the run the
            driver's ``W`` holds the server's rows. They are left out of
            ``param_list``.
        consistency : {"async", "sync", "ssp"}
            ``"async"`` (default): each push is applied when it arrives.
            ``"sync"``: every sync is a round; the server applies the average
            of the round's pushes once every live task has pushed, and the
            tasks continue from that model. ``"ssp"``: bounded staleness, a
            task at sync ``c`` waits until every live task has reached
            ``c - staleness``. A task that dies is not waited for.
        staleness : int
            The ``"ssp"`` bound.
        buffer_batches : int
            Batches held by a task's shuffle buffer.
        hang_timeout : float or None
            When no task has made progress (a sync) for this many seconds,
            print every task's clock and Python stack dump, cancel the job
            and raise :class:`PSTimeoutError` naming the stuck tasks. None
            turns it off.

        Returns
        -------
        RunSummary
            Steps, samples, model version, loss and per-task figures.
        """
        graph = self.sess.graph
        if feed_rdd is None:
            return self.sess.run(fetches, feed_dict=feed_dict)
        opts = options.check(
            {
                "consistency": consistency,
                "staleness": staleness,
                "buffer_batches": buffer_batches,
                "hang_timeout": hang_timeout,
                "shuffle": shuffle_within_partition,
            }
        )
        fetch_names, _ = _graph.fetch_names(graph, fetches)
        if not feed_name_list:
            raise TensorSparkValueError(
                "run: feed_name_list is required with feed_rdd, e.g. [x.name, y_.name]"
            )
        feed_names = [n if isinstance(n, str) else getattr(n, "name", n) for n in feed_name_list]
        _graph.check_feed_names(graph, feed_names)
        params = _graph.resolve_params(graph, param_list)
        sparse = _graph.resolve_params(graph, sparse_params) if sparse_params else []
        sparse_names = {_graph.param_name(v) for v in sparse}
        params = [v for v in params if _graph.param_name(v) not in sparse_names]
        names = [_graph.param_name(v) for v in params]
        tables = self._tables(graph, sparse, feed_names)
        num_parts = feed_rdd.getNumPartitions()
        rule = options.rule(weight_combiner or MeanCombiner(), num_parts, api="tf1")
        spec_fields = {
            "fetch_names": tuple(fetch_names),
            "feed_names": tuple(feed_names),
            "extra_feeds": self._extra_feeds(graph, feed_dict),
            "loss_name": _graph.loss_name(graph, loss, fetch_names),
        }
        self._run.log_params(
            {
                "weight_combiner": weight_combiner or MeanCombiner(),
                "shuffle_within_partition": shuffle_within_partition,
                "consistency": consistency,
                "staleness": staleness,
                "buffer_batches": buffer_batches,
                "hang_timeout": hang_timeout,
            },
            self._runs,
        )
        self._run.configure(consistency, staleness)
        self._register(names, params)
        cfg = task.TaskConfig(
            **self._run.task_fields(),
            epoch=self._runs,
            names=tuple(names),
            batch_size=self.batch_size,
            buffer_batches=buffer_batches,
            shuffle=opts["shuffle"],
            seed=self.seed,
            sync_interval=self.sync_interval,
            steps_per_call=1,
            rule=rule,
            hang_timeout=opts["hang_timeout"],
            tables=tables,
            prefetch=False,
        )
        meta = _graph.export_graph(graph)
        self._write_tmp("graph.meta", meta)
        spec = GraphSpec(key=hashlib.sha256(meta).hexdigest()[:16], **spec_fields)
        broadcast = self.sc.broadcast(meta)
        part = functools.partial(train_partition, cfg, spec, broadcast)
        what = f"run #{self._runs} ({num_parts} tasks)"
        try:
            results, seconds = self._run.run_job(
                what,
                lambda: feed_rdd.mapPartitionsWithIndex(part).collect(),
                epoch=self._runs,
                hang_timeout=opts["hang_timeout"],
                progress_label=f"run #{self._runs}",
            )
        except BaseException as e:
            self._run.failed(e)
            self._run.keep_trained(lambda: self._load_trained(names, params, sparse))
            raise
        finally:
            spark.unless_jvm_gone(broadcast.unpersist)
        version = self._load_trained(names, params, sparse)
        self._run.epoch_done(self._runs)
        logs = {"loss": driver.weighted(results, "loss")} if spec.loss_name else {}
        self._run.end_epoch(self._runs, logs, results, seconds)
        self._runs += 1
        return RunSummary(
            version=version,
            steps=sum(r["steps"] for r in results),
            samples=sum(r["samples"] for r in results),
            seconds=seconds,
            partitions=sorted(results, key=lambda r: r["partition"]),
            loss=driver.weighted(results, "loss"),
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

    def __enter__(self) -> SparkSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------

    def _extra_feeds(self, graph: Any, feed_dict: dict | None) -> tuple[tuple[str, Any], ...]:
        if not feed_dict:
            return ()
        names = [k if isinstance(k, str) else getattr(k, "name", k) for k in feed_dict]
        _graph.check_feed_names(graph, names, what="feed_dict")
        return tuple((n, np.asarray(v)) for n, v in zip(names, feed_dict.values(), strict=True))

    def _register(self, names: list[str], params: list[Any]) -> None:
        """Register the variables with the driver's current values (first run)."""
        new = [(n, v) for n, v in zip(names, params, strict=True) if n not in self._registered]
        if not new:
            return
        values = self.sess.run([v for _, v in new])
        created = self._run.register(dict(zip([n for n, _ in new], values, strict=True)))
        self._registered.update(n for n, _ in new)
        kept = [n for n, c in created.items() if not c]
        if kept:
            log.info("tensorspark: %d variables take the server's values (resumed)", len(kept))

    def _tables(self, graph: Any, sparse: list[Any], feed_names: list[str]) -> tuple:
        """Tables for ``sparse_params``: created on the server from the driver's values."""
        from .. import tables as _tables

        feeds, specs = [], []
        for v in sparse:
            shape = tuple(v.shape.as_list())
            if len(shape) != 2 or None in shape:
                raise TensorSparkValueError(
                    f"sparse_params: {v.op.name!r} has shape {shape}; a table is a 2-D variable "
                    "[vocabulary, dim]"
                )
            name = _graph.param_name(v)
            col = _graph.lookup_feed(graph, v, feed_names)
            feeds.append(TableFeed(name, shape[1], (col,), shape[0], (feed_names[col],), False))
            specs.append(
                _tables.TableSpec(name=name, dim=shape[1], vocab=shape[0], initializer="zeros")
            )
        if not specs:
            return ()
        created = self._run.client.create_tables(specs)
        new = [(s, v) for s, v, c in zip(specs, sparse, created, strict=True) if c]
        for spec, v in new:  # the server's rows start as the driver's values
            value = self.sess.run(v)
            for ids in vocabulary_chunks(spec.vocab, spec.dim):
                self._run.client.push_rows({spec.name: (ids, value[ids])}, kind="delta")
        return tuple(feeds)

    def _load_trained(self, names: list[str], params: list[Any], sparse: list[Any] = ()) -> int:
        pulled = self._run.pull(names)
        _graph.load_values(self.sess, params, [pulled[n] for n in names])
        for v in sparse:
            vocab, dim = v.shape.as_list()
            rows = pull_vocabulary(self._run.client, _graph.param_name(v), vocab, dim)
            _graph.load_values(self.sess, [v], [rows])
        if self._tmp_dir:
            path = self._tmp_path("params.npz")
            np.savez(path, **{n.replace("/", "__"): pulled[n] for n in names})
        return self._run.version()

    def _tmp_path(self, filename: str) -> str:
        d = os.path.join(self._tmp_dir, "tensorspark", self.user or "user", self.name or "run")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, filename)

    def _write_tmp(self, filename: str, data: bytes) -> None:
        if self._tmp_dir:
            with open(self._tmp_path(filename), "wb") as f:
                f.write(data)
