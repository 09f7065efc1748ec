"""Spark-facing helpers: what a run needs of Spark, classic or Spark Connect
(:class:`Cluster`), addresses, job groups, task errors (driver side); a
task's identity (task side)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any, NoReturn

from ..errors import TensorSparkError, TensorSparkValueError, by_name

# The last "Module.ClassName: message" line of a Python traceback that Spark
# forwards from a failed task.
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.*)$", re.MULTILINE)


def is_loopback(host: str | None) -> bool:
    """True when ``host`` names this machine's loopback interface."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def is_connect(obj: Any) -> bool:
    """True for a Spark Connect session or DataFrame (no SparkContext behind it)."""
    return type(obj).__module__.startswith("pyspark.sql.connect")


class _Inline:
    """A broadcast's stand-in under Spark Connect: the value travels in the closure."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def unpersist(self) -> None:
        pass


class Cluster:
    """What a driver-side run needs of Spark, from a classic or a Spark Connect session.

    Classic Spark gives a ``SparkContext``: broadcasts, accumulators, job
    groups and the driver JVM's Hadoop file systems. A Spark Connect
    client (``SparkSession.builder.remote(...)``) has none of them: values
    travel in the task closure (in the plan, so below the server's
    ``spark.connect.grpc.maxInboundMessageSize``), jobs are tagged
    (``addTag``) and cancelled by tag (``interruptTag``), and only
    DataFrame operations run. ``connect`` tells which.

    Parameters
    ----------
    spark : pyspark.SparkContext or pyspark.sql.SparkSession
        A classic context or session, or a Spark Connect session.

    Not thread-safe, except :meth:`cancel`, which the hang watchdog calls
    from its own thread.
    """

    def __init__(self, spark: Any) -> None:
        self.connect = is_connect(spark)
        self.session = spark if self.connect else None
        self.sc = None if self.connect else getattr(spark, "sparkContext", spark)

    def conf(self, key: str, default: str | None = None) -> str | None:
        """A Spark setting (the application's, or the session's under Connect)."""
        if self.connect:
            return self.session.conf.get(key, default)
        return self.sc.getConf().get(key, default)

    @property
    def master(self) -> str:
        return self.conf("spark.master", "") or ""

    @property
    def app_id(self) -> str:
        return self.conf("spark.app.id", "") or ""

    def task_host(self) -> str:
        """The address tasks use to reach a server in this (the driver's) process.

        Classic: loopback in local mode, else ``spark.driver.host``. Under
        Connect this process is the client, not Spark's driver: loopback
        when Spark runs locally on this machine, else this machine's
        address on the route to the Connect server (executors must be able
        to reach it: docs/deploy.md, "Spark Connect").
        """
        if not self.connect:
            if self.master.startswith("local"):
                return "127.0.0.1"
            return self.conf("spark.driver.host") or socket.gethostname()
        endpoint = self.session.client.host
        if self.master.startswith("local") and is_loopback(endpoint):
            return "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((endpoint, 15002))  # no packet is sent: picks the route
                return s.getsockname()[0]
        except OSError:
            return socket.gethostname()

    def broadcast(self, value: Any) -> Any:
        """A Spark broadcast (classic), or the value inline (Connect); both have ``.value``."""
        return _Inline(value) if self.connect else self.sc.broadcast(value)

    def accumulator(self) -> Any:
        """An int accumulator at 0; None under Connect, which has none."""
        return None if self.connect else self.sc.accumulator(0)

    def guard(self, description: str, note: str) -> Any:
        """Watch the driver JVM for the block (classic; a Connect client has none in reach)."""
        from .. import _jvm

        return (
            contextlib.nullcontext()
            if self.connect
            else _jvm.guard(self.sc, description, note=note)
        )

    @contextlib.contextmanager
    def job_group(self, group: str, text: str) -> Iterator[None]:
        """Run the block's Spark jobs cancellably as ``group`` (described as ``text``).

        Connect has no job descriptions: the jobs carry ``group`` as their
        tag (shown in the Spark UI).
        """
        if self.connect:
            self.session.addTag(group)
            try:
                yield
            except BaseException:
                # A Connect client interrupted (Ctrl-C) leaves the server's
                # jobs running unless they are interrupted by tag.
                unless_connect_gone(lambda: self.session.interruptTag(group))
                raise
            finally:
                unless_connect_gone(lambda: self.session.removeTag(group))
            return
        sc = self.sc
        keys = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")
        previous = {k: sc.getLocalProperty(k) for k in keys}
        sc.setJobGroup(group, text, interruptOnCancel=True)
        try:
            yield
        finally:
            unless_jvm_gone(lambda: [sc.setLocalProperty(k, v) for k, v in previous.items()])

    def cancel(self, group: str) -> None:
        """Cancel the jobs of ``group`` (from any thread)."""
        if self.connect:
            self.session.interruptTag(group)
        else:
            self.sc.cancelJobGroup(group)

    def needs_classic(self, what: str, instead: str) -> None:
        """Refuse ``what`` under Spark Connect, saying what to do ``instead``."""
        if self.connect:
            raise TensorSparkValueError(
                f"{what} needs classic Spark (a SparkContext with a driver JVM in this "
                f"process); this is a Spark Connect session. {instead}"
            )


def rows_and_partitions(frame: Any) -> tuple[int, int]:
    """A DataFrame's row count and partitions, in one job.

    Classic: ``count()`` and the RDD's partitions. Connect has no RDDs:
    each partition's task counts its rows in ``mapInArrow``, so empty
    partitions are counted as well.
    """
    if not is_connect(frame):
        return frame.count(), frame.rdd.getNumPartitions()
    from pyspark.sql import functions as F

    # One byte a row reaches Python, not the columns.
    ones = frame.select(F.lit(True).alias("one"))
    counts = ones.mapInArrow(_count_rows, "rows long").collect()
    return sum(r["rows"] for r in counts), len(counts)


def _count_rows(batches: Any) -> Any:
    import pyarrow as pa

    yield pa.RecordBatch.from_pydict({"rows": [sum(b.num_rows for b in batches)]})


def unless_connect_gone(fn: Any) -> None:
    """Run a Spark Connect clean-up call; log, not raise, when the server is unreachable.

    It runs while another error propagates, which must stay the one raised.
    """
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - logged; the error in flight wins
        logging.getLogger("tensorspark").warning("Spark Connect clean-up failed: %s", e)


def unless_jvm_gone(fn: Any) -> None:
    """Run a Spark clean-up call; skip it quietly when the driver JVM is gone.

    After the JVM died, a clean-up's py4j error would replace the error
    that says so.
    """
    from .. import _jvm

    try:
        fn()
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the lost JVM
        if _jvm.translate(e, "a clean-up") is None:
            raise


def raise_task_error(exc: BaseException, description: str) -> NoReturn:
    """Re-raise a failed Spark job as the tensorspark error its task raised.

    Spark reports a task's Python exception as text inside a JVM exception;
    the last exception line names the class and message. A tensorspark error
    is raised again as the same class; anything else becomes a
    :class:`TensorSparkError` carrying the task's message. The original is
    chained as ``__cause__``.
    """
    text = str(exc)
    # Only the Python traceback(s) inside the JVM message name task errors.
    tb = text.rfind("Traceback (most recent call last)")
    matches = _EXC_LINE.findall(text[tb:]) if tb >= 0 else []
    ours = [(cls, msg) for cls, msg in matches if by_name(cls) is not None]
    if ours:
        cls_name, msg = ours[-1]
        raise by_name(cls_name)(f"{msg} [in a Spark task of {description}]") from exc
    if matches:
        cls_name, msg = matches[0]
        raise TensorSparkError(f"a Spark task of {description} failed: {cls_name}: {msg}") from exc
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    raise TensorSparkError(f"the Spark job of {description} failed: {first}") from exc


def task_identity() -> tuple[int, int, int]:
    """This task's partition, attempt number and fencing attempt id.

    The parameter server fences a partition's older attempts by a number
    that must grow with every launch of the partition. Spark's
    ``attemptNumber`` starts again at 0 in every job and stage attempt, so
    the server gets the task attempt id (Spark's TID, unique and growing
    within the application), kept to the protocol's 31 bits. Outside a
    task all three are 0.
    """
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return 0, 0, 0
    return ctx.partitionId(), ctx.attemptNumber(), ctx.taskAttemptId() & 0x7FFFFFFF
