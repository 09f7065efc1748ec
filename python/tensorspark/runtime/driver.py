"""The driver-side run that both APIs use.

:class:`DriverRun` starts the parameter server in this process (or attaches
to one or several running ``tensorspark-ps``), resolves the address tasks
use and the one the server binds, makes the run's secret, configures the
consistency mode, registers the variables, runs each Spark job (job group,
description, hang watchdog, driver-JVM guard, error translation, progress
bar, TensorBoard, MLflow, status page) and reads the trained values back.

Lifetime: everything it starts (server, snapshot mirror and staging
directory, broadcasts, threads) is released by :meth:`close`, and also when
its constructor fails part-way. Not thread-safe: one thread drives a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import tracking
from ..errors import TensorSparkError, TensorSparkValueError
from ..ps import ParameterServer, PSClient, ShardedPSClient, generate_secret, parse_address
from . import hadoop, progress, shards, spark, status_page, watchdog

log = logging.getLogger("tensorspark")

# A one-element variable on the server counting completed epochs (TF1: runs).
EPOCHS_DONE = "__tensorspark__/epochs_done"


class DriverRun:
    """One training run's server side on the driver.

    Parameters
    ----------
    sc : pyspark.SparkContext or pyspark.sql.SparkSession
        Classic Spark, or a Spark Connect session (:class:`runtime.spark.Cluster`
        says what differs).
    name : str
        Names the run in job descriptions and logs.
    opts : dict
        Options checked by :func:`runtime.options.check`: ``server_host``,
        ``server_port``, ``servers``, ``secret``, ``start_server``,
        ``checkpoint_dir``, ``checkpoint_every_s``,
        ``checkpoint_every_versions``, ``checkpoint_keep``, ``resume_from``,
        ``connect_timeout``, ``io_timeout``, ``heartbeat_timeout``,
        ``wait_timeout``, ``threads``, ``progress``, ``log_dir``,
        ``ui_port``, ``mlflow`` (a :class:`tracking.MlflowCallback` or None),
        ``ps_shards`` (servers in Spark tasks: :mod:`runtime.shards`).
    api : {"keras", "tf1"}
        Which API runs it (MLflow parameter names and tags).

    Attributes
    ----------
    status_url : str or None
        The live status page (``ui_port`` not None), else None.
    """

    def __init__(self, sc: Any, name: str, opts: dict[str, Any], *, api: str = "keras") -> None:
        self.cluster = spark.Cluster(sc)
        self.name, self.opts, self.api = name, opts, api
        self.run_id = uuid.uuid4().hex
        self._cleanup = contextlib.ExitStack()
        self._status = "FINISHED"  # how an MLflow run ends
        self.tracker: tracking.Tracker | None = None
        try:
            self._start()
        except BaseException as e:
            self.failed(e)
            self._cleanup.close()
            raise

    def _start(self) -> None:
        o, cluster = self.opts, self.cluster
        self.threads = int(o.get("threads") or cluster.conf("spark.task.cpus") or "1")
        host = o.get("server_host")
        if host is None:
            host = cluster.task_host()
        self.host, self.port = host, int(o.get("server_port") or 0)
        self._driver_host = host  # where tasks reach this process
        self.servers = tuple(parse_address(a) for a in o.get("servers") or ())
        self.server: ParameterServer | None = None
        self.shards: shards.ShardHost | None = None
        self._shard_snapshots = True
        self._configured: tuple[str, int] | None = None
        self._baseline = False
        self._shard_vars: dict[int, int] = {}  # variables + tables per shard, at the baseline
        tls = o.get("tls", False)
        # Fingerprints every client pins (TLS), or () for plain frames.
        self.tls_pins: tuple[str, ...] = tls if isinstance(tls, tuple) else ()
        if o.get("ps_shards"):
            self.secret = o.get("secret") or generate_secret()
            self._start_shards(int(o["ps_shards"]))
        elif self.servers:
            self.host, self.port = self.servers[0]
            self.secret = o["secret"]
        elif o.get("start_server", True):
            self.secret = o.get("secret") or generate_secret()
            self.server = self._start_server()
            self.port = self.server.port
            if self.server.tls_fingerprint is not None:
                self.tls_pins = (self.server.tls_fingerprint,)
        else:
            if not o.get("secret"):
                raise TensorSparkValueError(
                    "an external parameter server needs the run's secret: pass secret=<bytes of "
                    "the file given to tensorspark-ps --secret-file>"
                )
            self.secret = o["secret"]
        self._client = self.connect()
        self._client_generation = self.shards.generation if self.shards else 0
        self._cleanup.callback(lambda: self._client.close())
        where = ", ".join(f"{h}:{p}" for h, p in self.servers) or f"{self.host}:{self.port}"
        log.info("tensorspark: parameter server at %s", where)
        self.tb = progress.TensorBoardLog(o["log_dir"]) if o.get("log_dir") else None
        if self.tb is not None:
            self._cleanup.callback(self.tb.close)
        self.bar = progress.ProgressBar(
            self.connect,
            0,
            enabled=bool(o.get("progress", True)),
            on_sample=self._on_sample if self.tb else None,
        )
        self.page: status_page.StatusPage | None = None
        if o.get("ui_port") is not None:
            self.page = self._start_page(int(o["ui_port"]))
        self.status_url = self.page.url if self.page is not None else None
        if o.get("mlflow") is not None:
            self.tracker = tracking.Tracker(
                o["mlflow"], self.name, self._tags(), tracking.params(o, self.api)
            )
            self._cleanup.callback(lambda: self.tracker.close(self._status))

    def _tags(self) -> dict[str, str]:
        from .. import __version__

        return {
            "tensorspark.spark_app_id": self.cluster.app_id,
            "tensorspark.run_name": self.name,
            "tensorspark.api": self.api,
            "tensorspark.version": __version__,
        }

    def _bind_host(self) -> str:
        """Where the driver listens: loopback only when tasks reach it on loopback."""
        return "127.0.0.1" if spark.is_loopback(self._driver_host) else "0.0.0.0"

    def _start_shards(self, count: int) -> None:
        """Start ``count`` shards in a Spark job of their own; wait until all serve."""
        o = self.opts
        shards.check_slots(self.cluster, count, o.get("connect_timeout", 30.0))
        ckpt = o.get("checkpoint_dir")
        root = os.path.join(ckpt, f"run-{self.run_id[:12]}") if ckpt else ""
        resume: list[str] = []
        if o.get("resume_from"):
            resume, self._resumed_epochs = shards.common_snapshot(
                str(o["resume_from"]), count, self._tag(0)
            )

        def config(directory: tuple[str, int]) -> shards.ShardConfig:
            return shards.ShardConfig(
                directory=directory,
                secret=self.secret,
                count=count,
                snapshot_root=root,
                snapshot_every_s=float(o.get("checkpoint_every_s", 30.0)),
                snapshot_every_versions=int(o.get("checkpoint_every_versions", 0)),
                snapshot_keep=int(o.get("checkpoint_keep", 3)),
                tls=o.get("tls", False) is True,
                # The shard's slot: spark.task.cpus cores (threads_per_worker is the tasks').
                threads=int(self.cluster.conf("spark.task.cpus") or "1"),
                connect_timeout=float(o.get("connect_timeout", 30.0)),
                io_timeout=float(o.get("io_timeout", 300.0)),
            )

        host = shards.ShardHost(
            self.cluster,
            config,
            bind=self._bind_host(),
            advertise=self._driver_host,
            name=self.name,
            group=f"tensorspark-{self.run_id}-shards",
            heartbeat_timeout=float(o.get("heartbeat_timeout", 30.0)),
            resume_from=resume,
        )
        self._cleanup.callback(host.close)
        host.on_ready = self._shard_ready
        self.shards = host
        host.start()
        servers, pins = shards.endpoints(host.addresses(float(o.get("wait_timeout", 240.0)))[1])
        self.servers, self.tls_pins = tuple(servers), tuple(pins)
        self.host, self.port = self.servers[0]
        if root:
            log.info("tensorspark: the shards snapshot into %s/shard-<i>", root)

    def _shard_ready(self, index: int, address: shards.Address, first: bool) -> None:
        """A shard Spark ran again serves: give it the run's mode before workers find it."""
        if first or self._configured is None:
            return
        client = PSClient(
            address.host,
            address.port,
            self.secret,
            connect_timeout=self.opts.get("connect_timeout", 30.0),
            tls_fingerprint=address.fingerprint or None,
        )
        try:
            if self._baseline and not client.list_variables() and self._shard_vars.get(index):
                self.shards.fail(
                    f"parameter-server shard {index} came back without its part of the model: "
                    + (
                        "it was lost before its first snapshot"
                        if self.opts.get("checkpoint_dir")
                        else "the run has no checkpoint_dir to restore it from (pass "
                        "checkpoint_dir on storage every executor reaches)"
                    )
                )
                return
            self._configure(client, *self._configured)
        finally:
            client.close()

    def _start_page(self, port: int) -> status_page.StatusPage:
        """The status page, bound where the in-driver server binds; closed before it."""
        bind = self._bind_host()
        url_host = "127.0.0.1"
        if bind != "127.0.0.1":
            url_host = (
                self.host if self.server else self.cluster.conf("spark.driver.host", self.host)
            )
        where = ", ".join(f"{h}:{p}" for h, p in self.servers) or f"{self.host}:{self.port}"
        o = self.opts
        page = status_page.StatusPage(
            self.connect,
            self.secret,
            bind=bind,
            port=port,
            url_host=url_host,
            run={
                "name": self.name,
                "servers": where,
                "sync_interval": o.get("sync_interval"),
                "staleness": o.get("staleness", 0),
                # External servers snapshot by their own flags: unknown here.
                "snapshots": bool(o.get("checkpoint_dir")) if self.server or self.shards else None,
            },
        )
        self._cleanup.callback(page.close)
        log.info("tensorspark: status page at %s", page.url)
        print(f"tensorspark: status page at {page.url}", file=sys.stderr, flush=True)
        return page

    def _start_server(self) -> ParameterServer:
        """The in-driver server; Hadoop URIs are staged through a local directory."""
        o = self.opts
        bind = self._bind_host()
        ckpt, resume = o.get("checkpoint_dir"), o.get("resume_from")
        for uri in (ckpt, resume):
            if hadoop.is_hadoop_uri(uri):
                self.cluster.needs_classic(
                    f"the Hadoop URI {uri!r} (copied through the driver JVM's FileSystem)",
                    "The parameter server runs in this process: give checkpoint_dir and "
                    "resume_from as local or mounted paths.",
                )
        if hadoop.is_hadoop_uri(resume):
            resume = hadoop.fetch_snapshots(self.cluster.sc, resume)  # a local copy, read at start
            self._cleanup.callback(shutil.rmtree, resume, ignore_errors=True)
        staging = None
        if hadoop.is_hadoop_uri(ckpt):
            staging = tempfile.mkdtemp(prefix="tensorspark-ckpt-")
            self._cleanup.callback(shutil.rmtree, staging, ignore_errors=True)
        server = ParameterServer(
            self.secret,
            host=bind,
            port=self.port,
            snapshot_dir=staging or ckpt,
            snapshot_every_s=o.get("checkpoint_every_s", 30.0) if ckpt else 0,
            snapshot_every_versions=o.get("checkpoint_every_versions", 0),
            snapshot_keep=o.get("checkpoint_keep", 3),
            resume_from=resume,
            tls=o.get("tls", False) is True,
        )
        self._cleanup.callback(server.stop)
        if staging is not None:
            mirror = hadoop.SnapshotMirror(
                self.cluster.sc, ckpt, staging, o.get("checkpoint_keep", 3)
            )
            # Closed (LIFO) after the server's final snapshot; stop is idempotent.
            self._cleanup.callback(mirror.close)
            self._cleanup.callback(server.stop)
        return server

    def connect(self) -> PSClient | ShardedPSClient:
        """A new driver connection (for the watchdog, the progress bar, tools)."""
        timeouts = {
            "connect_timeout": self.opts.get("connect_timeout", 30.0),
            "io_timeout": self.opts.get("io_timeout", 300.0),
            "tls_fingerprint": list(self.tls_pins) or None,
        }
        if self.shards is not None:  # where the shards serve now
            _, addresses = self.shards.addresses(self.opts.get("wait_timeout", 240.0))
            servers, pins = shards.endpoints(addresses)
            return ShardedPSClient(
                servers, self.secret, **{**timeouts, "tls_fingerprint": pins or None}
            )
        if self.servers:
            return ShardedPSClient(self.servers, self.secret, **timeouts)
        return PSClient(self.host, self.port, self.secret, **timeouts)

    @property
    def client(self) -> PSClient | ShardedPSClient:
        """The driver's own connection; with shards, renewed after one moved."""
        if self.shards is not None and self.shards.generation != self._client_generation:
            generation = self.shards.generation
            fresh = self.connect()
            old, self._client, self._client_generation = self._client, fresh, generation
            fresh._shapes.update(old._shapes)  # what pull() knows from the registrations
            fresh._table_dims.update(old._table_dims)
            old.close()
        return self._client

    def task_fields(self) -> dict[str, Any]:
        """The :class:`runtime.task.TaskConfig` fields the run decides."""
        o = self.opts
        return {
            "host": self.host,
            "port": self.port,
            "servers": self.servers,
            "secret": self.secret,
            "tls_fingerprints": self.tls_pins,
            "directory": self.shards.address if self.shards is not None else None,
            "shard_wait": float(o.get("wait_timeout", 240.0)),
            "run_id": self.run_id,
            "threads": self.threads,
            "connect_timeout": o.get("connect_timeout", 30.0),
            "io_timeout": o.get("io_timeout", 300.0),
            # Heartbeats also carry the progress reports the driver draws.
            "heartbeat_interval": min(1.0, o.get("heartbeat_timeout", 30.0) / 3),
        }

    def configure(self, consistency: str, staleness: int) -> None:
        """Set the consistency mode on every server before the tasks join."""
        if self.page is not None:
            self.page.run["staleness"] = staleness
        self._configured = (consistency, staleness)
        self._configure(self.client, consistency, staleness)

    def _configure(self, client: Any, consistency: str, staleness: int) -> None:
        client.configure(
            consistency,
            staleness,
            heartbeat_timeout=self.opts.get("heartbeat_timeout", 30.0),
            wait_timeout=self.opts.get("wait_timeout", 240.0),
        )

    def register(self, values: dict[str, np.ndarray]) -> dict[str, bool]:
        """Register variables; False for a name the server already held (resumed)."""
        return self.client.register(values)

    def start_epochs(self) -> int:
        """Register the completed-epochs counter; the epochs a resumed run had done.

        Only a run that snapshots or resumes keeps the counter (its pushes
        count as model versions). With ``servers=[...]`` and
        ``resume_from="servers"`` every server first returns to the newest
        snapshot set that all of them hold (:meth:`_restore_servers`).
        """
        if self.shards is not None and self.opts.get("resume_from"):
            return self._resumed_epochs  # each shard started from the common epoch snapshot
        if self.servers and self.opts.get("resume_from"):
            return self._restore_servers()
        if not (self.opts.get("checkpoint_dir") or self.opts.get("resume_from")):
            return 0
        created = self.register({EPOCHS_DONE: np.zeros(1, np.float32)})
        if created[EPOCHS_DONE]:
            return 0
        return int(self.pull([EPOCHS_DONE])[EPOCHS_DONE][0])

    def epoch_done(self, epoch: int) -> None:
        """Record a completed epoch (or TF1 run) so that snapshots carry it.

        The in-driver server gets the count as a variable. Several servers
        each write a snapshot tagged with the run and the count, at this
        quiescent point (no task is live), so the set is consistent.
        """
        ckpt = self.opts.get("checkpoint_dir")
        if ckpt:
            self.client.push({EPOCHS_DONE: np.array([epoch + 1], np.float32)}, kind="parameters")
        if self.servers and self._shard_snapshots and (self.shards is None or ckpt):
            try:
                self.client.snapshot(self._tag(epoch + 1))
            except TensorSparkValueError as e:
                if "snapshot dir" not in str(e):
                    raise
                self._shard_snapshots = False  # a server has no --snapshot-dir
                log.warning("tensorspark: no consistent snapshots across the servers: %s", e)

    def _tag(self, epochs: int) -> int:
        """A snapshot tag: this run's name (CRC-32) above, the epochs done below."""
        return (zlib.crc32(self.name.encode()) << 32) | epochs

    def _restore_servers(self) -> int:
        """Return every server to this run's newest common snapshot; its epochs done."""
        prefix = self._tag(0)
        per_server = [
            {d["tag"] for d in snaps if d["tag"] & ~0xFFFFFFFF == prefix}
            for snaps in self.client.snapshots()
        ]
        common = set.intersection(*per_server)
        if not common:
            held = "; ".join(
                f"{h}:{p}: {sorted(t & 0xFFFFFFFF for t in tags) or 'none'}"
                for (h, p), tags in zip(self.servers, per_server, strict=True)
            )
            raise TensorSparkValueError(
                f"resume_from='servers': the servers hold no snapshot of run {self.name!r} that "
                f"they all have (epochs per server: {held}); start each tensorspark-ps with "
                "--snapshot-dir and train at least one epoch first"
            )
        tag = max(common, key=lambda t: t & 0xFFFFFFFF)
        self.client.restore(tag)
        log.warning(
            "tensorspark: every server restored to the snapshot of %s after %d epochs",
            self.name,
            tag & 0xFFFFFFFF,
        )
        return tag & 0xFFFFFFFF

    def _shard_baseline(self, epoch: int) -> None:
        """Before the first training job: a snapshot of every shard, and what each holds.

        A shard lost before its own timer's first snapshot comes back from
        this one rather than empty.
        """
        self._baseline = True
        self._shard_vars = {
            i: int(st.get("variables", 0)) + int(st.get("tables", 0))
            for i, st in enumerate(self.client.stats_per_server())
        }
        if self.opts.get("checkpoint_dir"):
            self.client.snapshot(self._tag(epoch) or 1)

    def pull(self, names: list[str]) -> dict[str, np.ndarray]:
        return self.client.pull(names)

    def version(self) -> int:
        return int(self.client.stats().get("version", 0))

    def broadcast(self, value: Any) -> Any:
        """A Spark broadcast released with the run (inline under Spark Connect)."""
        b = self.cluster.broadcast(value)
        self._cleanup.callback(spark.unless_jvm_gone, b.unpersist)
        return b

    def run_job(
        self,
        what: str,
        job: Callable[[], list[dict[str, Any]]],
        *,
        epoch: int = 0,
        hang_timeout: float | None = None,
        members: bool = True,
        total_rows: int = 0,
        progress_label: str | None = None,
    ) -> tuple[list[dict[str, Any]], float]:
        """Run one Spark job; its task results and wall seconds.

        ``members``: the tasks join the run, so the hang watchdog (after
        ``hang_timeout`` seconds without progress; None: off) watches them
        and the progress bar draws them. A failed job is raised as the
        tensorspark error its task raised (``runtime.spark.raise_task_error``),
        a hang as :class:`PSTimeoutError`.
        """
        description = f"tensorspark {self.name}: {what}"
        # The Spark UI shows where to follow the job; errors keep the short form.
        shown = description + (f" (status: {self.status_url})" if self.status_url else "")
        group = f"tensorspark-{self.run_id}-{epoch}-{what.replace(' ', '_')}"
        keeps = "the parameter servers keep" if self.servers else "the parameter server keeps"
        guard = self.cluster.guard(description, f"{keeps} the model trained so far")
        dog = watchdog.HangWatchdog(self.connect, self.cluster, hang_timeout or 0, group)
        watch = dog if hang_timeout and members else contextlib.nullcontext()
        if progress_label and members:
            self.bar.total = total_rows
            self.bar.start_epoch(progress_label)
        if members and self.shards is not None and not self._baseline:
            self._shard_baseline(epoch)
        started = time.monotonic()
        try:
            if self.page is not None:
                self.page.phase = what
            with guard, self.cluster.job_group(group, shown), watch:
                results = job()
        except Exception as e:  # noqa: BLE001 - translated, original chained
            self.bar.end_epoch("stopped", 0)
            dog.raise_if_fired(e)
            if isinstance(e, TensorSparkError):
                raise
            spark.raise_task_error(e, description)
        finally:
            if self.page is not None:
                self.page.phase = f"{what}: ended"
        return results, time.monotonic() - started

    def end_epoch(
        self, epoch: int, logs: dict[str, float], results: list[dict[str, Any]], seconds: float
    ) -> None:
        """The epoch's summary line, TensorBoard scalars and MLflow metrics."""
        samples = sum(r["samples"] for r in results)
        rate = samples / seconds if seconds > 0 else 0.0
        parts = [f"{k} {v:.4f}" for k, v in logs.items()]
        line = " · ".join([*parts, f"{samples:,} samples in {seconds:.1f} s ({rate:,.0f}/s)"])
        self.bar.end_epoch(line, samples)
        if self.tb is not None:
            self.tb.epoch(epoch, {**logs, "samples_per_sec": rate}, results)
        if self.tracker is not None:
            self.tracker.epoch(epoch, tracking.epoch_metrics(logs, results, seconds))

    def log_params(self, values: dict[str, Any], step: int) -> None:
        """Log more options (a TF1 run's) as MLflow parameters, when MLflow is on."""
        if self.tracker is not None:
            self.tracker.params(tracking.params(values, self.api), step)

    def log_model(self, model: Any, custom_objects: dict[str, Any] | None) -> None:
        """Log the trained Keras model to MLflow, when MLflow is on."""
        if self.tracker is not None:
            self.tracker.model(model, custom_objects)

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run's id; None without MLflow (or when it could not start one)."""
        return None if self.tracker is None else self.tracker.callback.run_id

    def failed(self, error: BaseException) -> None:
        """Mark the run failed: its MLflow run ends FAILED (KILLED when interrupted)."""
        self._status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"

    def _on_sample(self, samples: int, rate: float, loss: float) -> None:
        self.tb.scalars({"progress/samples_per_sec": rate, "progress/loss": loss}, samples)

    def keep_trained(self, load: Callable[[], Any]) -> None:
        """After a failure, try to leave the server's last good model on the driver."""
        try:
            load()
        except TensorSparkError as e:
            log.warning("tensorspark: could not load the trained weights after the failure: %s", e)

    def close(self) -> None:
        """Release everything the run started (the in-driver server writes its final snapshot)."""
        self._cleanup.close()


def weighted(results: list[dict[str, Any]], key: str) -> float:
    """Sample-weighted mean of a per-task figure."""
    total = sum(r["samples"] for r in results)
    if not total:
        return float("nan")
    return sum(r[key] * r["samples"] for r in results) / total


def merged_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """Sample-weighted means of the tasks' metrics."""
    total = sum(r["samples"] for r in results)
    keys = sorted({k for r in results for k in r["metrics"]})
    return {
        k: sum(r["metrics"].get(k, 0.0) * r["samples"] for r in results) / total
        for k in keys
        if total
    }
