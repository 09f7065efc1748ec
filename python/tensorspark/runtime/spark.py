"""Spark-facing helpers: addresses, job names, task errors (driver side);
a task's identity (task side)."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Iterator
from typing import Any, NoReturn

from ..errors import TensorSparkError, by_name

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


@contextlib.contextmanager
def job_group(sc: Any, group: str, text: str) -> Iterator[None]:
    """Run the block's Spark jobs in a cancellable job group named ``text``."""
    keys = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")
    previous = {k: sc.getLocalProperty(k) for k in keys}
    sc.setJobGroup(group, text, interruptOnCancel=True)
    try:
        yield
    finally:
        unless_jvm_gone(lambda: [sc.setLocalProperty(k, v) for k, v in previous.items()])


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
