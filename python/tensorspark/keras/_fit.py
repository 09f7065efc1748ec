"""Driver side of :func:`tensorspark.keras.fit`: one Spark job per epoch.

The shared driver-side run (``runtime.driver``) starts the parameter server
or attaches to running ones and registers the model's weights; each epoch
is one job of the shared task loop (``runtime.task``) over a Keras replica
(``keras.replica``). Between epochs the driver loads the server's model
into the Keras model, evaluates the validation data, runs the callbacks and
draws the progress.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from .. import tracking
from ..errors import TensorSparkValueError
from ..runtime import driver, feed, options, task
from ..runtime import spark as runtime_spark
from . import _spec, replica

log = logging.getLogger("tensorspark")

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
        Per epoch, per task, the shared task loop's result record (the same
        as ``SparkSession.run``'s): ``partition``, ``attempt`` (Spark's task
        attempt id, the TID, as in the server's logs and STATS),
        ``attempt_number``, ``steps``, ``samples``, ``pushes``,
        ``samples_per_sec``, ``loss``, ``staleness_mean``/``staleness_max``
        (versions applied by others between a task's pull and its push),
        ``rss_peak_bytes``, ``gpu`` (the task's GPU addresses and its
        ``CUDA_VISIBLE_DEVICES``) and more.
    samples_per_sec : list of float
        Per epoch: samples trained divided by the Spark job's wall time.
    seconds : list of float
        Wall time of each epoch's Spark job.
    resumed_version : int or None
        The model version of the snapshot a ``resume_from`` run started
        from; None for a fresh run.
    mlflow_run_id : str or None
        The MLflow run that ``mlflow=...`` logged; None without one.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    workers: list[list[dict[str, Any]]] = field(default_factory=list)
    samples_per_sec: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resumed_version: int | None = None
    mlflow_run_id: str | None = None


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
    partitions: int  # the tasks of an epoch
    inputs: tuple[feed.InputColumn, ...] = ()  # one per model input (several inputs, tables)
    classes: int = 0  # > 0: the label is a class index below it (a classifier)


def _prepare(
    data: Any,
    features_col: Any,
    label_col: str | None,
    what: str,
    workers: int | None,
    model: Any,
) -> _Data:
    inputs = _spec.model_inputs(model)
    by_input = _spec.fed_by_input(inputs, features_col)
    if by_input:
        return _prepare_inputs(data, features_col, label_col, what, workers, inputs)
    features = (features_col,) if isinstance(features_col, str) else tuple(features_col)
    if not features:
        raise TensorSparkValueError("features_col is empty; name at least one column")
    if hasattr(data, "mapInArrow"):
        _, integral = feed.check_columns(data.schema, features, label_col)
        frame, rows, parts = _frame(data, [*features, label_col], workers, what)
        return _Data(frame, None, features, label_col, integral, rows, parts)
    if hasattr(data, "mapPartitionsWithIndex"):
        rdd = data.repartition(int(workers)) if workers else data
        # Not count(): that would compute the RDD's whole lineage an extra time.
        if rdd.isEmpty():
            raise TensorSparkValueError(f"the {what} RDD is empty; there is nothing to train on")
        return _Data(None, rdd, ("features",), "label", False, 0, rdd.getNumPartitions())
    raise TensorSparkValueError(
        f"{what} must be a Spark DataFrame or an RDD of (features, label) tuples, got "
        f"{type(data).__name__}"
    )


def _frame(
    data: Any, cols: list[str | None], workers: int | None, what: str
) -> tuple[Any, int, int]:
    """The DataFrame's needed columns (each once), repartitioned; its rows and partitions."""
    frame = data.select(*dict.fromkeys(c for c in cols if c is not None))
    if workers:
        frame = frame.repartition(int(workers))
    rows, partitions = runtime_spark.rows_and_partitions(frame)
    if rows == 0:
        raise TensorSparkValueError(f"the {what} DataFrame is empty; there is nothing to train on")
    return frame, rows, partitions


def _prepare_inputs(
    data: Any,
    features_col: Any,
    label_col: str | None,
    what: str,
    workers: int | None,
    inputs: list[tuple[str, tuple[int | None, ...], str]],
) -> _Data:
    """A DataFrame that feeds each model input from a column: by input name or a dict."""
    if not hasattr(data, "mapInArrow"):
        raise TensorSparkValueError(
            f"the {what} data must be a DataFrame: a model with several inputs or with a "
            "ParameterServerEmbedding is fed from DataFrame columns by input name"
        )
    columns = input_columns(data.schema, features_col, inputs, what)
    _, integral = feed.check_columns(data.schema, [], label_col)
    frame, rows, parts = _frame(data, [*(c.column for c in columns), label_col], workers, what)
    return _Data(
        frame,
        None,
        tuple(c.column for c in columns),
        label_col,
        integral,
        rows,
        parts,
        tuple(columns),
    )


def input_columns(
    schema: Any,
    features_col: Any,
    inputs: list[tuple[str, tuple[int | None, ...], str]],
    what: str,
) -> tuple[feed.InputColumn, ...]:
    """The column of each model input: by input name, or ``features_col={input: column}``."""
    names = [n for n, _, _ in inputs]
    if isinstance(features_col, dict):
        unknown = sorted(set(features_col) - set(names))
        if unknown:
            raise TensorSparkValueError(
                f"features_col names {unknown} but the model's inputs are {names}"
            )
        mapping = {n: features_col.get(n, n) for n in names}
    elif isinstance(features_col, str) and len(names) == 1 and features_col != "features":
        mapping = {names[0]: features_col}
    else:
        mapping = {n: n for n in names}
    by_name = {f.name: f for f in schema.fields}
    available = ", ".join(f"{f.name} ({f.dataType.simpleString()})" for f in schema.fields)
    columns = []
    for name, shape, table in inputs:
        col = mapping[name]
        if col not in by_name:
            raise TensorSparkValueError(
                f"the {what} DataFrame has no column {col!r} for model input {name!r}; its "
                f"columns are: {available}. Name the inputs after the columns, or pass "
                "features_col={input_name: column}"
            )
        width = int(shape[-1]) if table and shape and shape[-1] not in (None, 1) else 0
        columns.append(feed.input_column(by_name[col], table, width, name))
    return tuple(columns)


def _input_shape(model: Any) -> tuple[int, ...]:
    shape = model.input_shape
    if isinstance(shape, list) or (
        isinstance(shape, tuple) and shape and isinstance(shape[0], tuple)
    ):
        return ()  # several inputs: fed by name (ModelSpec.inputs)
    dims = tuple(shape[1:])
    if any(d is None for d in dims):
        raise TensorSparkValueError(
            f"the model's input shape {shape} has unknown dimensions besides the batch; give "
            "keras.Input a fixed shape"
        )
    return tuple(int(d) for d in dims)


class _Fit:
    """One fit's model side: the weights on the server, the epoch jobs."""

    def __init__(self, model: Any, builder: Any, data: _Data, opts: dict[str, Any]) -> None:
        from . import layers

        self.user_model = model
        self.tables = layers.tables_of(model)
        if self.tables:
            # Tasks and the driver train a copy without the tables' rows: they
            # live on the server, and only a batch's rows travel.
            model = layers.clone_with(
                model, {t.table: {"materialize": False, "stored_rows": 0} for t in self.tables}
            )
            builder = None
        self.model, self.builder, self.data, self.opts = model, builder, data, opts
        spark = data.frame.sparkSession if data.frame is not None else data.rdd.context
        self.name = opts["name"] or model.name
        self.names = _spec.weight_names(model)
        self.input_shape = _input_shape(model)
        self.rule = options.rule(opts["update"], data.partitions, api="keras")
        self.gradient = self.rule.accumulates == "gradients"
        self.synced = _spec.synced(model, "gradient" if self.gradient else "delta")
        if self.gradient:
            _spec.server_optimizer(model.optimizer)  # refuses an optimizer the server lacks
        blob = None if builder is not None else _spec.to_bytes(model)
        # Every check that can fail is above: nothing is started before it.
        self.run = driver.DriverRun(spark, f"keras {self.name}", opts)
        try:
            self.blob = None if blob is None else self.run.broadcast(blob)
        except BaseException as e:
            self.run.failed(e)
            self.run.close()
            raise

    def setup(self) -> tuple[int, int | None]:
        """Register the weights, configure the run; the epochs done and resumed version.

        A server resumed from a snapshot already holds the variables (the
        first registration wins), so the driver's model takes its values and
        training continues after the last completed epoch.
        """
        done = self.run.start_epochs()  # several servers: restored to a common snapshot
        if self.tables:
            self.run.client.create_tables([t.table_spec() for t in self.tables])
        weights = self.model.get_weights()
        created = self.run.register({self.names[i]: weights[i] for i in self.synced})
        self.run.configure(self.opts["consistency"], self.opts["staleness"])
        if self.gradient:
            self.set_server_optimizer()
        if all(created.values()):
            return done, None
        version = self.load_model()
        log.warning(
            "tensorspark: resumed %s from a snapshot at version %d after %d completed epochs",
            self.name,
            version,
            done,
        )
        return done, version

    def set_server_optimizer(self) -> None:
        name, lr, hyper = _spec.server_optimizer(self.model.optimizer)
        self.run.client.set_optimizer(name, learning_rate=lr, **hyper)

    def task_config(self, epoch: int, *, train: bool) -> task.TaskConfig:
        o = self.opts
        return task.TaskConfig(
            **self.run.task_fields(),
            epoch=epoch,
            names=tuple(self.names[i] for i in self.synced),
            batch_size=o["batch_size"],
            buffer_batches=o["buffer_batches"],
            shuffle=o["shuffle"] if train else False,
            seed=o["seed"],
            sync_interval=o["sync_interval"],
            steps_per_call=o["steps_per_call"],
            rule=self.rule,
            hang_timeout=o["hang_timeout"],
            join=train,
            tables=self.table_feeds(self.data if train else o["_validation"]),
            prefetch=o["prefetch_rows"],
        )

    def table_feeds(self, data: _Data) -> tuple[Any, ...]:
        from ..runtime import sparse

        return tuple(
            sparse.TableFeed(
                t.table,
                t.output_dim,
                tuple(i for i, c in enumerate(data.inputs) if c.table == t.table),
                t.input_dim or 0,
                tuple(c.column for c in data.inputs if c.table == t.table),
            )
            for t in self.tables
        )

    def model_spec(self, data: _Data) -> replica.ModelSpec:
        lr = None if self.gradient else _spec.learning_rate(self.model.optimizer)
        inputs = _spec.model_inputs(self.model)
        return replica.ModelSpec(
            weight_shapes=tuple(tuple(w.shape) for w in self.model.weights),
            synced=tuple(self.synced),
            input_shape=self.input_shape,
            features=data.features,
            label=data.label,
            integral_label=data.integral_label,
            learning_rate=lr,
            custom_objects=self.opts["custom_objects"],
            inputs=data.inputs,
            input_names=tuple(n for n, _, _ in inputs) if data.inputs else (),
            input_shapes=tuple(s for _, s, _ in inputs) if data.inputs else (),
            label_classes=data.classes,
        )

    def job(self, fn: Any, data: _Data, cfg: task.TaskConfig) -> Any:
        """The Spark job running ``fn`` on every partition of ``data``."""
        args = (fn, cfg, self.model_spec(data), self.blob, self.builder)
        if data.frame is None:
            return lambda: data.rdd.mapPartitionsWithIndex(
                functools.partial(replica.rdd_partition, *args)
            ).collect()
        # Arrow batches of a shuffle buffer's rows: fewer, larger messages
        # from the JVM for the same memory bound.
        rows = cfg.batch_size * (cfg.buffer_batches if cfg.join else 1)
        part = functools.partial(replica.arrow_partition, *args)

        def run() -> list[dict[str, Any]]:
            with _conf(data.frame.sparkSession, _ARROW_BATCH_CONF, str(max(1, min(rows, 10000)))):
                out = data.frame.mapInArrow(part, "result string").collect()
            return [json.loads(r["result"]) for r in out]

        return run

    def export(self) -> Any:
        """The trained model: the dense weights, with the tables' rows exported into it.

        A fixed vocabulary that the layer materializes (see
        ``ParameterServerEmbedding``) gets every row (trained or initial);
        any other table gets its stored rows, sorted by id.
        """
        if not self.tables:
            return self.model
        from ..runtime import sparse
        from . import layers

        client, overrides, values = self.run.client, {}, {}
        if not self.opts["export_tables"]:
            log.warning(
                "tensorspark: export_tables=False: the tables' rows stay on the parameter "
                "server (and in its snapshots); the returned model's tables hold none"
            )
            return self.model
        for t in self.tables:
            if t.materialize:
                rows = sparse.pull_vocabulary(client, t.table, t.input_dim, t.output_dim)
                overrides[t.table] = {"materialize": True, "stored_rows": 0}
                values[t.table] = (None, rows)
            else:
                ids, rows = client.export_rows(t.table)
                order = np.argsort(ids, kind="stable")
                overrides[t.table] = {"materialize": False, "stored_rows": len(ids)}
                values[t.table] = (ids[order], rows[order])
        model = layers.clone_with(self.model, overrides)
        for layer in layers.tables_of(model):
            ids, rows = values[layer.table]
            if layer.embeddings is not None:
                layer.embeddings.assign(rows)
            if layer.ids is not None:
                layer.ids.assign(ids)
        return model

    def load_model(self) -> int:
        """Copy the server's weights into the driver's model; the version."""
        names = [self.names[i] for i in self.synced]
        pulled = self.run.pull(names)
        weights = self.model.get_weights()
        for i, n in zip(self.synced, names, strict=True):
            weights[i] = pulled[n]
        self.model.set_weights(weights)
        return self.run.version()


@contextlib.contextmanager
def _conf(spark: Any, key: str, value: str) -> Any:
    """Set a Spark SQL conf for the block, then restore it (unset if it was)."""
    previous = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        runtime_spark.unless_jvm_gone(
            lambda: spark.conf.unset(key) if previous is None else spark.conf.set(key, previous)
        )


def _validate(fit_: _Fit, validation_data: Any, epoch: int) -> dict[str, float]:
    opts = fit_.opts
    if validation_data is None:
        return {}
    if isinstance(validation_data, tuple):
        x, y = validation_data
        x = np.asarray(x, dtype=np.float32).reshape((len(x), *fit_.input_shape))
        logs = fit_.model.evaluate(
            x, np.asarray(y), batch_size=opts["batch_size"], verbose=0, return_dict=True
        )
        return {f"val_{k}": float(v) for k, v in logs.items()}
    data = opts["_validation"]
    results, _ = fit_.run.run_job(
        f"validation after epoch {epoch + 1}",
        fit_.job(replica.evaluate, data, fit_.task_config(epoch, train=False)),
        epoch=epoch,
        members=False,
    )
    samples = sum(r["samples"] for r in results)
    logs = {"val_loss": sum(r["loss_sum"] for r in results) / max(1, samples)}
    logs.update({f"val_{k}": v for k, v in driver.merged_metrics(results).items()})
    return logs


def fit(
    model: Any,
    data: Any,
    *,
    features_col: str | list[str] | dict[str, str] | None = "features",
    label_col: str = "label",
    epochs: int = 1,
    batch_size: int = 32,
    sync_interval: int = 10,
    consistency: str = "async",
    staleness: int = 0,
    update: Any = "delta",
    validation_data: Any = None,
    callbacks: list[Any] | None = None,
    shuffle: bool = True,
    buffer_batches: int = 8,
    steps_per_call: int = 32,
    prefetch_rows: bool = True,
    export_tables: bool = True,
    num_workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    log_dir: str | None = None,
    mlflow: Any = False,
    ui_port: int | None = None,
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
    servers: list[str] | None = None,
    ps_shards: int = 0,
    secret: bytes | None = None,
    tls: bool | str | list[str] = False,
    seed: int = 0,
    connect_timeout: float = 30.0,
    io_timeout: float = 300.0,
    heartbeat_timeout: float = 30.0,
    wait_timeout: float = 240.0,
    hang_timeout: float | None = 600.0,
    _output: str | None = None,
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
        Column names (DataFrames only). A model with several inputs, or
        with a :class:`~tensorspark.keras.layers.ParameterServerEmbedding`,
        is fed by input name: each ``keras.Input(name=...)`` from the column
        of that name, or from ``features_col={input_name: column}``. Inputs
        of a table take int/long ids, ``array<long>`` multi-hot ids (padded
        with -1 up to the input's length, or to the batch's longest row for
        ``shape=(None,)``), or strings (hashed, docs/sparse.md); other inputs
        take numbers, arrays or vectors as above.
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
    update : {"delta", "gradient", "mean", "elastic"} or a combiner
        The update rule, shared with ``SparkSession.run``'s
        ``weight_combiner`` (``tensorspark.MeanCombiner(...)``,
        ``DeltaCombiner()`` and ``ElasticCombiner(alpha)`` are accepted as
        well). ``"delta"`` (default): each task runs the model's own optimizer
        locally and pushes the change of its weights since the last pull.
        ``"mean"``: it pushes its weights averaged over the interval's steps
        and the server keeps a moving mean over one push per task.
        ``"elastic"``: elastic averaging (EASGD) towards the server's centre.
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
    prefetch_rows : bool
        With tables: pull the next batch's rows while a batch trains
        (communication overlaps compute). A row that two consecutive
        batches of a task share is then one step stale in the second one;
        False pulls each batch's rows after the previous push (exact, as a
        single process).
    export_tables : bool
        With tables: copy the trained rows into the returned model (see
        Returns). False leaves them on the server (and in its snapshots)
        and returns the model with empty tables, for tables too big for the
        driver.
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
    mlflow : bool or tensorspark.tracking.MlflowCallback
        Log the fit as one MLflow run from the driver (docs/tracking.md):
        every option as a parameter, per epoch the loss, metrics,
        validation, samples/s and staleness, the trained model
        (``mlflow.keras``) and tags for the Spark application and the run's
        name. It follows ``MLFLOW_TRACKING_URI`` or
        ``mlflow.set_tracking_uri``, else a local ``./mlruns``. An
        ``MlflowCallback(...)`` gives settings of one's own. Needs the
        mlflow package; an MLflow failure only warns.
    ui_port : int, optional
        Serve a live status page of the run from the driver (each worker's
        clock, steps, samples/s, loss curve and staleness; the server's
        traffic, refused frames and snapshots; docs/status_page.md). 0 picks
        a free port. The URL (with a token derived from the secret) is
        printed, logged and added to the Spark job descriptions. None: off.
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
    servers : list of str, optional
        Train against several running ``tensorspark-ps`` processes
        (``"host:port"``) that hold the model together, as
        ``SparkSession(servers=...)``; tasks join every server, so fencing,
        the consistency modes and the hang watchdog work as with one.
        Each ``tensorspark-ps`` started with ``--snapshot-dir`` then writes a
        snapshot tagged with the run and the epoch after every epoch, and
        ``resume_from="servers"`` returns every server to the newest set
        they all hold (``checkpoint_dir`` is refused: it configures the
        server tensorspark starts).
    ps_shards : int
        Run the parameter server as this many shards inside Spark tasks of
        their own job, spread over the executors, instead of in the driver
        (docs/deploy.md, "Shards in Spark tasks"). The model is cut over
        them as with ``servers``, so server memory and work leave the
        driver. Each shard holds one task slot (``spark.task.cpus`` cores,
        which become its update threads) for the whole run: the cluster
        needs ``ps_shards + 1`` slots, checked at the start. When a shard's
        executor dies Spark runs its task again; with ``checkpoint_dir`` (a
        path every executor reaches) the shard comes back from its newest
        snapshot in ``checkpoint_dir/run-<id>/shard-<i>`` and the tasks find
        it and go on, losing that shard's updates since the snapshot (every
        ``checkpoint_every_s``). Without ``checkpoint_dir`` a lost shard
        fails the run. 0 (default): one server in the driver.
    secret : bytes, optional
        The run's secret; required with ``servers``, generated otherwise.
    tls : bool, str or list of str
        Encrypt the parameter-server traffic with TLS 1.3 (docs/protocol.md,
        "TLS"). True: the server tensorspark starts makes a per-run key and
        self-signed certificate, and its fingerprint travels to the tasks
        beside the secret, so every client pins it (no CA, no files). With
        ``servers=[...]`` or ``start_server=False``: the fingerprint(s) that
        ``tensorspark-ps --tls`` printed. False (default): plain frames with
        a CRC-32C each.
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
        and a :class:`History`. A model with tables comes back as a new
        model (the same architecture) whose tables hold the trained rows
        (docs/sparse.md, "Export").

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
    labels = _label_kind(model, _output)
    train = labels(_prepare(data, features_col, label_col, "training", num_workers, model))
    if validation_data is not None and not isinstance(validation_data, tuple):
        opts["_validation"] = labels(
            _prepare(validation_data, features_col, label_col, "validation", None, model)
        )
    fit_ = _Fit(model, builder, train, opts)
    try:
        return _train(fit_)
    except BaseException as e:
        fit_.run.failed(e)  # its MLflow run ends FAILED
        raise
    finally:
        fit_.run.close()


def _label_kind(model: Any, output: str | None) -> Any:
    """What the Spark ML stage needs of the model and its labels (``_output``).

    ``"regression"``: one output value per row. A classifier's output kind
    (``"auto"``, ``"probabilities"``, ``"logits"``): the labels are class
    indices, checked in the tasks and fed as int64 for a sparse categorical
    loss (Spark ML's double labels included).
    """
    if output is None:
        return lambda data: data
    if output == "regression":
        _spec.regression_output(model)
        return lambda data: data
    _, width = _spec.classifier_output(model, output)
    classes = max(2, width)
    sparse = _spec.sparse_loss(model)
    return lambda data: replace(data, classes=classes, integral_label=sparse or data.integral_label)


def _options(given: dict[str, Any]) -> dict[str, Any]:
    opts = {k: v for k, v in given.items() if k not in ("model", "data")}
    opts["threads"] = opts.pop("threads_per_worker")
    opts = options.check(opts)
    options.rule(opts["update"], 1, api="keras")  # refuses an unknown update early
    if opts["save_path"] and not str(opts["save_path"]).endswith(".keras"):
        raise TensorSparkValueError(f"save_path must name a .keras file, got {opts['save_path']!r}")
    if any(isinstance(c, tracking.MlflowCallback) for c in opts["callbacks"] or ()):
        raise TensorSparkValueError(
            "an MlflowCallback is not a Keras callback: pass it as mlflow=MlflowCallback(...)"
        )
    vd = opts["validation_data"]
    if isinstance(vd, tuple) and len(vd) != 2:
        raise TensorSparkValueError("validation_data as a tuple must be (x, y)")
    return opts


def _train(fit_: _Fit) -> FitResult:
    import keras

    model, run, opts = fit_.model, fit_.run, fit_.opts
    first_epoch, resumed = fit_.setup()
    history = History(resumed_version=resumed, mlflow_run_id=run.mlflow_run_id)
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
            if fit_.gradient:
                fit_.set_server_optimizer()  # a callback may have changed the rate
            label = f"epoch {epoch + 1}/{opts['epochs']}"
            results, seconds = run.run_job(
                label,
                fit_.job(replica.train, fit_.data, fit_.task_config(epoch, train=True)),
                epoch=epoch,
                hang_timeout=opts["hang_timeout"],
                total_rows=fit_.data.rows,
                progress_label=label,
            )
            _report_learning_rate(results)
            fit_.load_model()
            logs = {"loss": driver.weighted(results, "loss"), **driver.merged_metrics(results)}
            logs.update(_validate(fit_, opts.get("validation_data"), epoch))
            run.epoch_done(epoch)
            _record(history, epoch, logs, results, seconds)
            run.end_epoch(epoch, logs, results, seconds)
            callbacks.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    except BaseException:
        run.keep_trained(fit_.load_model)
        raise
    callbacks.on_train_end(logs)
    model = fit_.export()
    if opts["save_path"]:
        model.save(opts["save_path"])
    run.log_model(model, opts["custom_objects"])
    return FitResult(model, history)


def _report_learning_rate(results: list[dict[str, Any]]) -> None:
    errors = {r["learning_rate_error"] for r in results if r.get("learning_rate_error")}
    for e in sorted(errors):
        log.warning(
            "tensorspark: a learning rate set on the driver's optimizer did not reach the "
            "tasks (%s); they trained at the rate their model was built with",
            e,
        )


def _record(
    history: History, epoch: int, logs: dict[str, float], results: list[dict], seconds: float
) -> None:
    samples = sum(r["samples"] for r in results)
    history.epoch.append(epoch)
    for k, v in logs.items():
        history.history.setdefault(k, []).append(float(v))
    history.workers.append(sorted(results, key=lambda r: r["partition"]))
    history.seconds.append(seconds)
    history.samples_per_sec.append(samples / seconds if seconds > 0 else 0.0)
