"""Driver side of :func:`tensorspark.keras.fit`: one Spark job per epoch.

The driver starts a parameter server (threads in this process), registers
the model's weights, and for each epoch runs ordinary (non-barrier) Spark
tasks that stream their partition and train against the server. Between
epochs it loads the server's model into the Keras model, evaluates the
validation data, runs the callbacks and draws the progress.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .. import _feed, _hadoop, _progress, _spark, _watchdog
from ..errors import TensorSparkError, TensorSparkValueError
from ..ps import ParameterServer, PSClient, generate_secret
from . import _spec, _task

log = logging.getLogger("tensorspark")

MODES = ("async", "sync", "ssp")

# A one-element variable on the server counting completed epochs.
_EPOCHS_DONE = "__tensorspark__/epochs_done"

# Arrow batches reach a task at most this many rows at a time (the memory bound).
_ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"


@dataclass
class History:
    """What :func:`fit` measured, epoch by epoch.

    Attributes
    ----------
    history : dict of str to list of float
        As Keras' ``History.history``: ``loss`` and each compiled metric,
        and ``val_``-prefixed ones when there is validation data; one value
        per epoch. Training values are the sample-weighted means over the
        tasks.
    epoch : list of int
        The epochs run (0-based).
    workers : list of list of dict
        Per epoch, per task: ``partition``, ``attempt``, ``steps``,
        ``samples``, ``pushes``, ``samples_per_sec``, ``loss``,
        ``staleness_mean``/``staleness_max`` (versions applied by others
        between a task's pull and its push), ``rss_peak_bytes`` and more.
    samples_per_sec : list of float
        Per epoch: samples trained divided by the Spark job's wall time.
    seconds : list of float
        Wall time of each epoch's Spark job.
    resumed_version : int or None
        The model version of the snapshot a ``resume_from`` run started
        from; None for a fresh run.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    workers: list[list[dict[str, Any]]] = field(default_factory=list)
    samples_per_sec: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resumed_version: int | None = None


class FitResult(NamedTuple):
    """The trained Keras model and its :class:`History`."""

    model: Any
    history: History


@dataclass(frozen=True)
class _Data:
    """A DataFrame or RDD with what the tasks need to read it."""

    frame: Any  # DataFrame or None
    rdd: Any  # RDD of (features, label) or None
    features: tuple[str, ...]
    label: str | None
    integral_label: bool
    rows: int  # 0 when unknown (RDDs are not counted)


def _prepare(
    data: Any, features_col: str | list[str], label_col: str | None, what: str, workers: int | None
) -> _Data:
    features = (features_col,) if isinstance(features_col, str) else tuple(features_col)
    if not features:
        raise TensorSparkValueError("features_col is empty; name at least one column")
    if hasattr(data, "mapInArrow"):
        _, integral = _feed.check_columns(data.schema, features, label_col)
        cols = [*features, label_col] if label_col is not None else list(features)
        frame = data.select(*cols)
        if workers:
            frame = frame.repartition(int(workers))
        rows = frame.count()
        if rows == 0:
            raise TensorSparkValueError(
                f"the {what} DataFrame is empty; there is nothing to train on"
            )
        return _Data(frame, None, features, label_col, integral, rows)
    if hasattr(data, "mapPartitionsWithIndex"):
        rdd = data.repartition(int(workers)) if workers else data
        # Not count(): that would compute the RDD's whole lineage an extra time.
        if rdd.isEmpty():
            raise TensorSparkValueError(f"the {what} RDD is empty; there is nothing to train on")
        return _Data(None, rdd, ("features",), "label", False, 0)
    raise TensorSparkValueError(
        f"{what} must be a Spark DataFrame or an RDD of (features, label) tuples, got "
        f"{type(data).__name__}"
    )


def _input_shape(model: Any) -> tuple[int, ...]:
    shape = model.input_shape
    if isinstance(shape, list) or (
        isinstance(shape, tuple) and shape and isinstance(shape[0], tuple)
    ):
        raise TensorSparkValueError(
            "the model has several inputs; tensorspark.keras feeds one input tensor (concatenate "
            "feature columns with features_col=[...] and split them inside the model)"
        )
    dims = tuple(shape[1:])
    if any(d is None for d in dims):
        raise TensorSparkValueError(
            f"the model's input shape {shape} has unknown dimensions besides the batch; give "
            "keras.Input a fixed shape"
        )
    return tuple(int(d) for d in dims)


class _Run:
    """One fit: the server, the driver's connection and the Spark jobs."""

    def __init__(self, model: Any, builder: Any, data: _Data, opts: dict[str, Any]) -> None:
        self.model, self.builder, self.data, self.opts = model, builder, data, opts
        self.sc = self._spark_context()
        self.run_id = uuid.uuid4().hex
        self.name = opts["name"] or model.name
        conf = self.sc.getConf()
        self.threads = int(opts["threads_per_worker"] or conf.get("spark.task.cpus", "1"))
        local = self.sc.master.startswith("local")
        host = opts["server_host"] or ("127.0.0.1" if local else conf.get("spark.driver.host"))
        self.host = host
        self.secret = generate_secret()
        bind = "127.0.0.1" if _spark.is_loopback(host) else "0.0.0.0"
        # Hadoop URIs: the server writes to a local staging directory that
        # a mirror copies out; a resume reads a local copy.
        ckpt, resume = opts["checkpoint_dir"], opts["resume_from"]
        if _hadoop.is_hadoop_uri(resume):
            resume = _hadoop.fetch_snapshots(self.sc, resume)
        snapshot_dir = (
            tempfile.mkdtemp(prefix="tensorspark-ckpt-") if _hadoop.is_hadoop_uri(ckpt) else ckpt
        )
        self.server = ParameterServer(
            self.secret,
            host=bind,
            port=int(opts["server_port"]),
            snapshot_dir=snapshot_dir,
            snapshot_every_s=opts["checkpoint_every_s"] if ckpt else 0,
            snapshot_every_versions=opts["checkpoint_every_versions"],
            snapshot_keep=opts["checkpoint_keep"],
            resume_from=resume,
        )
        self.mirror = None
        if snapshot_dir != ckpt:
            try:
                self.mirror = _hadoop.SnapshotMirror(
                    self.sc, ckpt, snapshot_dir, opts["checkpoint_keep"]
                )
            except BaseException:
                self.server.stop()
                raise
        self.resumed_version: int | None = None
        self.port = self.server.port
        self.client = self.connect()
        self.update = opts["update"]
        self.synced = _spec.synced(model, self.update)
        self.names = _spec.weight_names(model)
        self.input_shape = _input_shape(model)
        self.blob = None if builder is not None else self.sc.broadcast(_spec.to_bytes(model))

    def _spark_context(self) -> Any:
        if self.data.frame is not None:
            return self.data.frame.sparkSession.sparkContext
        return self.data.rdd.context

    def connect(self) -> PSClient:
        return PSClient(
            self.host,
            self.port,
            self.secret,
            connect_timeout=self.opts["connect_timeout"],
            io_timeout=self.opts["io_timeout"],
        )

    def setup_server(self) -> int:
        """Register the model and configure the run; the epochs already done.

        A server resumed from a snapshot already holds the variables (the
        first registration wins), so the driver's model takes its values and
        training continues after the last completed epoch.
        """
        weights = self.model.get_weights()
        values = {self.names[i]: weights[i] for i in self.synced}
        values[_EPOCHS_DONE] = np.zeros(1, np.float32)
        created = self.client.register(values)
        self.client.configure(
            self.opts["consistency"],
            self.opts["staleness"],
            heartbeat_timeout=self.opts["heartbeat_timeout"],
            wait_timeout=self.opts["wait_timeout"],
        )
        if self.update == "gradient":
            self.set_server_optimizer()
        if created[_EPOCHS_DONE]:
            return 0
        version = self.load_model()
        done = int(self.client.pull([_EPOCHS_DONE])[_EPOCHS_DONE][0])
        log.warning(
            "tensorspark: resumed %s from a snapshot at version %d after %d completed epochs",
            self.name,
            version,
            done,
        )
        self.resumed_version = version
        return done

    def epoch_done(self, epoch: int) -> None:
        """Record the completed epoch on the server (so snapshots carry it)."""
        done = np.array([epoch + 1], np.float32)
        self.client.push({_EPOCHS_DONE: done}, kind="parameters")

    def set_server_optimizer(self) -> None:
        name, lr, hyper = _spec.server_optimizer(self.model.optimizer)
        self.client.set_optimizer(name, learning_rate=lr, **hyper)

    def task_config(self, data: _Data, epoch: int, *, train: bool) -> _task.KerasTaskConfig:
        o = self.opts
        lr = _spec.learning_rate(self.model.optimizer) if self.update == "delta" else None
        return _task.KerasTaskConfig(
            host=self.host,
            port=self.port,
            secret=self.secret,
            run_id=self.run_id,
            epoch=epoch,
            weight_names=tuple(self.names),
            weight_shapes=tuple(tuple(w.shape) for w in self.model.weights),
            synced=tuple(self.synced),
            input_shape=self.input_shape,
            features=data.features,
            label=data.label,
            integral_label=data.integral_label,
            batch_size=o["batch_size"],
            buffer_batches=o["buffer_batches"],
            shuffle=o["shuffle"] and train,
            seed=o["seed"],
            sync_interval=o["sync_interval"],
            steps_per_call=o["steps_per_call"],
            update=self.update,
            learning_rate=lr,
            threads=self.threads,
            connect_timeout=o["connect_timeout"],
            io_timeout=o["io_timeout"],
            # Heartbeats also carry the progress reports the driver draws.
            heartbeat_interval=min(1.0, o["heartbeat_timeout"] / 3),
            hang_timeout=o["hang_timeout"],
            join=train,
        )

    def run_job(self, fn: Any, data: _Data, cfg: _task.KerasTaskConfig, what: str) -> list[dict]:
        """Run ``fn`` on every partition of ``data``; the tasks' result dicts."""
        custom = self.opts["custom_objects"]
        description = f"tensorspark keras {self.name}: {what}"
        group = f"tensorspark-{self.run_id}-{cfg.epoch}-{what}"
        watchdog = _watchdog.HangWatchdog(self.connect, self.sc, self.opts["hang_timeout"], group)
        watch = watchdog if self.opts["hang_timeout"] and cfg.join else contextlib.nullcontext()
        try:
            with _spark.job_group(self.sc, group, description), watch:
                if data.frame is not None:
                    return self._run_arrow(fn, data, cfg, custom)
                part = functools.partial(
                    _task.rdd_partition, fn, cfg, self.blob, self.builder, custom
                )
                return data.rdd.mapPartitionsWithIndex(part).collect()
        except Exception as e:  # noqa: BLE001 - translated, original chained
            watchdog.raise_if_fired(e)
            _spark.raise_task_error(e, description)

    def _run_arrow(self, fn: Any, data: _Data, cfg: Any, custom: Any) -> list[dict]:
        spark = data.frame.sparkSession
        previous = spark.conf.get(_ARROW_BATCH_CONF, None)
        # Arrow batches of a shuffle buffer's rows: fewer, larger messages
        # from the JVM for the same memory bound.
        rows = cfg.batch_size * (cfg.buffer_batches if cfg.join else 1)
        spark.conf.set(_ARROW_BATCH_CONF, str(max(1, min(rows, 10000))))
        try:
            part = functools.partial(
                _task.arrow_partition, fn, cfg, self.blob, self.builder, custom
            )
            rows = data.frame.mapInArrow(part, "result string").collect()
        finally:
            if previous is None:
                spark.conf.unset(_ARROW_BATCH_CONF)
            else:
                spark.conf.set(_ARROW_BATCH_CONF, previous)
        return [json.loads(r["result"]) for r in rows]

    def load_model(self) -> int:
        """Copy the server's weights into the driver's model; the version."""
        names = [self.names[i] for i in self.synced]
        pulled = self.client.pull(names)
        weights = self.model.get_weights()
        for i, n in zip(self.synced, names, strict=True):
            weights[i] = pulled[n]
        self.model.set_weights(weights)
        return self.client.stats().get("version", 0)

    def close(self) -> None:
        self.client.close()
        self.server.stop()  # writes the final snapshot
        if self.mirror is not None:
            self.mirror.close()
            shutil.rmtree(self.mirror.local_dir, ignore_errors=True)
        if self.blob is not None:
            self.blob.unpersist()


def _weighted(results: list[dict[str, Any]], key: str) -> float:
    total = sum(r["samples"] for r in results)
    if not total:
        return float("nan")
    return sum(r[key] * r["samples"] for r in results) / total


def _merge_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """Sample-weighted means of the tasks' metrics."""
    total = sum(r["samples"] for r in results)
    keys = sorted({k for r in results for k in r["metrics"]})
    return {
        k: sum(r["metrics"].get(k, 0.0) * r["samples"] for r in results) / total
        for k in keys
        if total
    }


def _validate(
    run: _Run, validation_data: Any, opts: dict[str, Any], epoch: int
) -> dict[str, float]:
    if validation_data is None:
        return {}
    if isinstance(validation_data, tuple):
        x, y = validation_data
        x = np.asarray(x, dtype=np.float32).reshape((len(x), *run.input_shape))
        logs = run.model.evaluate(
            x, np.asarray(y), batch_size=opts["batch_size"], verbose=0, return_dict=True
        )
        return {f"val_{k}": float(v) for k, v in logs.items()}
    results = run.run_job(
        _task.evaluate,
        opts["_validation"],
        run.task_config(opts["_validation"], epoch, train=False),
        f"validation after epoch {epoch + 1}",
    )
    samples = sum(r["samples"] for r in results)
    logs = {"val_loss": sum(r["loss_sum"] for r in results) / max(1, samples)}
    logs.update({f"val_{k}": v for k, v in _merge_metrics(results).items()})
    return logs


def fit(
    model: Any,
    data: Any,
    *,
    features_col: str | list[str] = "features",
    label_col: str = "label",
    epochs: int = 1,
    batch_size: int = 32,
    sync_interval: int = 10,
    consistency: str = "async",
    staleness: int = 0,
    update: str = "delta",
    validation_data: Any = None,
    callbacks: list[Any] | None = None,
    shuffle: bool = True,
    buffer_batches: int = 8,
    steps_per_call: int = 32,
    num_workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    log_dir: str | None = None,
    name: str | None = None,
    custom_objects: dict[str, Any] | None = None,
    save_path: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every_s: float = 30.0,
    checkpoint_every_versions: int = 0,
    checkpoint_keep: int = 3,
    resume_from: str | None = None,
    server_host: str | None = None,
    server_port: int = 0,
    seed: int = 0,
    connect_timeout: float = 30.0,
    io_timeout: float = 300.0,
    heartbeat_timeout: float = 30.0,
    wait_timeout: float = 240.0,
    hang_timeout: float | None = 600.0,
) -> FitResult:
    """Train a Keras 3 model on a Spark DataFrame or RDD across Spark tasks.

    Each epoch is one Spark job of ordinary tasks, one per partition. A task
    streams its partition in Arrow batches (never the whole partition),
    trains a replica of the model, and every ``sync_interval`` steps pushes
    its update to a parameter server on the driver and pulls the merged
    model. After each epoch the driver's ``model`` holds the server's
    weights, validation runs, and the Keras ``callbacks`` see the logs.

    Parameters
    ----------
    model : keras.Model or callable
        A compiled model (optimizer, loss, metrics), or a function with no
        arguments that builds and compiles one (it then runs in each task
        too, which avoids serializing custom layers).
    data : pyspark.sql.DataFrame or pyspark.RDD
        A DataFrame with ``features_col`` (numbers, arrays of numbers or
        ``pyspark.ml`` vectors; several columns are concatenated) and a
        numeric ``label_col`` (integers stay int64, e.g. for
        ``sparse_categorical_crossentropy``), or an RDD of ``(features,
        label)`` tuples of NumPy arrays or numbers. Each row's features are
        reshaped to the model's input shape (784 values -> ``(28, 28, 1)``).
    features_col, label_col : str
        Column names (DataFrames only).
    epochs, batch_size : int
        Passes over the data, and rows per training step.
    sync_interval : int
        Local steps between a task's push-and-pull.
    consistency : {"async", "sync", "ssp"}
        ``"async"``: each push is applied on arrival. ``"sync"``: each sync
        is a round, and the server applies the average of the round's
        updates once every live task has pushed (model averaging). ``"ssp"``:
        bounded staleness ``staleness``. All three run as ordinary tasks: a
        lost task is not waited for, and Spark retries it.
    staleness : int
        The ``"ssp"`` bound, in syncs.
    update : {"delta", "gradient"}
        ``"delta"`` (default): each task runs the model's own optimizer
        locally and pushes the change of its weights since the last pull.
        ``"gradient"``: each task pushes the mean gradient of its last
        ``sync_interval`` batches and the server applies the model's
        optimizer (SGD, Adam, AdamW, RMSprop or Adagrad) with its state kept
        on the server; non-trainable weights then stay at the driver's.
    validation_data : DataFrame, RDD or tuple of arrays, optional
        Evaluated after each epoch: ``(x, y)`` arrays on the driver, a
        DataFrame or RDD in a Spark job. Adds ``val_`` logs.
    callbacks : list of keras.callbacks.Callback, optional
        Run on the driver at train and epoch begin/end (EarlyStopping,
        ModelCheckpoint, LearningRateScheduler, CSVLogger, ...); setting
        ``model.stop_training`` ends training after the epoch. A learning
        rate changed by a callback is used by the next epoch.
    shuffle : bool
        Shuffle rows within each task through a buffer of
        ``buffer_batches`` batches.
    buffer_batches : int
        Most batches of rows a task holds at once in its shuffle buffer; a
        task holds about three times this many rows in all (the buffer, the
        Arrow batch arriving, the group of steps being run).
    steps_per_call : int
        Most training steps run by one call of the compiled step function,
        like Keras' ``steps_per_execution``: the batches are stacked and
        looped in the graph, which saves the per-call Python overhead on
        small models. The group is also capped by ``buffer_batches`` and
        never spans a sync, so it does not change when tasks sync. 1 runs
        one step per call.
    num_workers : int, optional
        Repartition the data into this many tasks; default its partitions.
    threads_per_worker : int, optional
        TensorFlow threads per task; default ``spark.task.cpus``.
    progress : bool
        Draw a progress bar on stderr (steps, samples/s, loss), fed from the
        server's stats, and a summary line per epoch.
    log_dir : str, optional
        Write TensorBoard scalars here: loss, metrics, throughput, and
        per-worker samples/s, loss and staleness.
    name : str, optional
        Names the run in the Spark UI's job descriptions; default the
        model's name.
    custom_objects : dict, optional
        Passed to ``keras.saving.load_model`` in the tasks.
    save_path : str, optional
        Save the trained model here at the end (a ``.keras`` file, as
        ``model.save``).
    checkpoint_dir : str, optional
        A local directory (or a mounted file system), or a Hadoop URI
        (``hdfs://``, ``s3a://``, ``file://``, ...; copied there through
        the driver JVM's Hadoop ``FileSystem``), where the parameter
        server writes atomic snapshots of every weight, its optimizer state
        (``update="gradient"``) and the completed epochs: every
        ``checkpoint_every_s`` seconds and/or ``checkpoint_every_versions``
        pushes, keeping the newest ``checkpoint_keep`` (docs/snapshots.md).
    checkpoint_every_s, checkpoint_every_versions, checkpoint_keep : float, int, int
        Snapshot intervals (0 turns one off) and how many files to keep.
    resume_from : str, optional
        Continue a run whose driver died: a snapshot file, or a
        ``checkpoint_dir`` (a path or a Hadoop URI) whose newest valid
        snapshot is used (a corrupt or
        truncated newer one is skipped with a message). The model takes
        the snapshot's weights and training resumes at the first epoch not
        completed; the updates since the snapshot are lost.
    server_host, server_port : str, int
        Address tasks use to reach the driver's parameter server; default
        the driver's address (loopback in local mode) and a free port.
    seed : int
        Seeds the shuffling.
    connect_timeout, io_timeout, heartbeat_timeout, wait_timeout : float
        Seconds to reach the server, for one transfer, of worker silence
        before the server stops waiting for it, and of the longest wait for
        other workers (sync and ssp).
    hang_timeout : float or None
        When no worker has made progress for this many seconds, print every
        worker's clock and Python stack dump (faulthandler), cancel the job
        and raise :class:`PSTimeoutError` naming the stuck workers; the
        driver's model keeps the weights trained so far. None turns it off.
        Keep it well above the time of ``sync_interval`` steps.

    Returns
    -------
    FitResult
        ``(model, history)``: the driver's model with the trained weights
        and a :class:`History`.

    Raises
    ------
    TensorSparkValueError
        Bad input, named: a missing or non-numeric column, a wrong feature
        length, an uncompiled model, an empty DataFrame, a loss that turns
        NaN (the model then holds the last good weights).

    Examples
    --------
    >>> model, history = tensorspark.keras.fit(  # doctest: +SKIP
    ...     model, df, features_col="pixels", label_col="label", epochs=5,
    ...     batch_size=64, validation_data=test_df)
    """
    opts = _options(locals())
    model, builder = _spec.resolve(model, "fit")
    train = _prepare(data, features_col, label_col, "training", num_workers)
    if validation_data is not None and not isinstance(validation_data, tuple):
        opts["_validation"] = _prepare(validation_data, features_col, label_col, "validation", None)
    run = _Run(model, builder, train, opts)
    try:
        return _train(run, opts)
    finally:
        run.close()


def _options(given: dict[str, Any]) -> dict[str, Any]:
    opts = {k: v for k, v in given.items() if k not in ("model", "data")}
    for key in ("epochs", "batch_size", "sync_interval", "buffer_batches", "steps_per_call"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise TensorSparkValueError(f"{key} must be an int >= 1, got {value!r}")
    if opts["consistency"] not in MODES:
        raise TensorSparkValueError(
            f"consistency must be one of {list(MODES)}, got {opts['consistency']!r}"
        )
    if opts["update"] not in _spec.UPDATES:
        raise TensorSparkValueError(
            f"update must be one of {list(_spec.UPDATES)}, got {opts['update']!r}"
        )
    if opts["save_path"] and not str(opts["save_path"]).endswith(".keras"):
        raise TensorSparkValueError(f"save_path must name a .keras file, got {opts['save_path']!r}")
    ht = opts["hang_timeout"]
    if ht is not None and (isinstance(ht, bool) or not isinstance(ht, int | float) or ht <= 0):
        raise TensorSparkValueError(f"hang_timeout must be > 0 seconds or None, got {ht!r}")
    vd = opts["validation_data"]
    if isinstance(vd, tuple) and len(vd) != 2:
        raise TensorSparkValueError("validation_data as a tuple must be (x, y)")
    return opts


def _train(run: _Run, opts: dict[str, Any]) -> FitResult:
    import keras

    model = run.model
    first_epoch = run.setup_server()
    history = History(resumed_version=run.resumed_version)
    tb = _progress.TensorBoardLog(opts["log_dir"]) if opts["log_dir"] else None
    bar = _progress.ProgressBar(
        run.connect,
        run.data.rows,
        enabled=opts["progress"],
        on_sample=(
            lambda s, r, loss: tb.scalars({"progress/samples_per_sec": r, "progress/loss": loss}, s)
        )
        if tb
        else None,
    )
    callbacks = keras.callbacks.CallbackList(
        opts["callbacks"] or [],
        add_history=False,
        add_progbar=False,
        model=model,
        epochs=opts["epochs"],
        verbose=0,
    )
    model.stop_training = False
    callbacks.on_train_begin()
    logs: dict[str, float] = {}
    try:
        for epoch in range(first_epoch, opts["epochs"]):
            callbacks.on_epoch_begin(epoch)
            if run.update == "gradient":
                run.set_server_optimizer()  # a callback may have changed the rate
            cfg = run.task_config(run.data, epoch, train=True)
            bar.start_epoch(epoch, opts["epochs"])
            started = time.monotonic()
            try:
                results = run.run_job(
                    _task.train, run.data, cfg, f"epoch {epoch + 1}/{opts['epochs']}"
                )
            finally:
                seconds = time.monotonic() - started
            samples = sum(r["samples"] for r in results)
            run.load_model()
            logs = {"loss": _weighted(results, "loss"), **_merge_metrics(results)}
            logs.update(_validate(run, opts.get("validation_data"), opts, epoch))
            run.epoch_done(epoch)
            _record(history, epoch, logs, results, samples, seconds)
            bar.end_epoch(_summary(logs, samples, seconds), samples)
            if tb:
                tb.epoch(epoch, {**logs, "samples_per_sec": samples / seconds}, results)
            callbacks.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    except BaseException:
        bar.end_epoch("stopped", 0)
        _keep_trained(run)
        raise
    finally:
        if tb:
            tb.close()
    callbacks.on_train_end(logs)
    if opts["save_path"]:
        model.save(opts["save_path"])
    return FitResult(model, history)


def _keep_trained(run: _Run) -> None:
    """On failure, leave the server's last good model in the driver's model."""
    try:
        run.load_model()
    except TensorSparkError as e:
        log.warning("tensorspark: could not load the trained weights after the failure: %s", e)


def _record(
    history: History,
    epoch: int,
    logs: dict[str, float],
    results: list[dict],
    samples: int,
    seconds: float,
) -> None:
    history.epoch.append(epoch)
    for k, v in logs.items():
        history.history.setdefault(k, []).append(float(v))
    history.workers.append(sorted(results, key=lambda r: r["partition"]))
    history.seconds.append(seconds)
    history.samples_per_sec.append(samples / seconds if seconds > 0 else 0.0)


def _summary(logs: dict[str, float], samples: int, seconds: float) -> str:
    parts = [f"{k} {v:.4f}" for k, v in logs.items()]
    rate = samples / seconds if seconds > 0 else 0.0
    return " · ".join([*parts, f"{samples:,} samples in {seconds:.1f} s ({rate:,.0f}/s)"])
