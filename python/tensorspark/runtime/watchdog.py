"""Hang diagnosis: stack dumps in the tasks, a watchdog on the driver.

Task side, :class:`StackDumps`: Python's ``faulthandler`` writes a dump of
every thread to a file when the task has not synced for half the hang
timeout (a C thread does it, without the GIL), and the C++ client's
heartbeat thread ships the file to the parameter server.

Driver side, :class:`HangWatchdog`: when no worker has made progress
(reported steps) for ``timeout`` seconds, it prints every worker's clock,
steps and latest stack dump from the server, cancels the Spark job and
records a message naming the stuck workers, which the caller raises.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from ..errors import PSTimeoutError, TensorSparkError

log = logging.getLogger("tensorspark")


class StackDumps:
    """Dump this task's Python stacks when it stops syncing (task side).

    Parameters
    ----------
    client : core client
        Its heartbeat thread ships the dump file (``set_dump_file``).
    after : float
        Seconds without :meth:`progress` before a dump is written.
    task : str
        Names the task in the file's name (``p<partition>-a<attempt>``), so
        that tools such as :mod:`tensorspark.chaos` can tell which process
        runs which task.
    """

    def __init__(self, client: Any, after: float, task: str = "") -> None:
        self.after = after
        prefix = f"tensorspark-stacks-{task}-" if task else "tensorspark-stacks-"
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".txt")
        self.file = os.fdopen(fd, "w")
        client.set_dump_file(self.path)
        self._client = client
        self.progress()

    def progress(self) -> None:
        """Re-arm the timer (call at each sync); drops an outdated dump."""
        if os.fstat(self.file.fileno()).st_size:
            self.file.truncate(0)
        faulthandler.dump_traceback_later(self.after, repeat=False, file=self.file)

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with contextlib.suppress(TensorSparkError, AttributeError):
            self._client.set_dump_file("")
        self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@contextlib.contextmanager
def membership(
    client: Any, join: bool, hang_timeout: float | None, task: str = ""
) -> Iterator[StackDumps | None]:
    """A task's time as a member of the run; closes ``client`` at the end.

    Joins (fencing older attempts of the partition) when ``join``, arms the
    stack dumps when ``hang_timeout`` is set (yielded, for re-arming at each
    sync), and leaves at the end so the others stop waiting for this task.
    """
    dumps = None
    try:
        if join:
            client.join()
            if hang_timeout:
                dumps = StackDumps(client, hang_timeout / 2, task)
        yield dumps
    finally:
        if dumps is not None:
            dumps.close()
        if join and client.connected:
            with contextlib.suppress(TensorSparkError):
                client.leave()
        client.close()


def reconnect(client: Any, connect: Any) -> Any:
    """A new connection from ``connect()`` in place of ``client``; ``client`` if none."""
    try:
        fresh = connect()
    except TensorSparkError:
        return client
    with contextlib.suppress(TensorSparkError):
        client.close()
    return fresh


class HangWatchdog:
    """Fail a Spark job in which no worker makes progress (driver side).

    Parameters
    ----------
    connect : callable
        Returns a new ``PSClient`` (the watchdog's own connection).
    cluster : runtime.spark.Cluster
        Its job group (or Spark Connect tag) ``group`` is cancelled when the
        watchdog fires.
    timeout : float
        Seconds without progress from any live worker.
    group : str
        The Spark job group of the watched job.
    """

    def __init__(
        self,
        connect: Any,
        cluster: Any,
        timeout: float,
        group: str,
        *,
        stream: TextIO | None = None,
        interval: float = 1.0,
    ) -> None:
        self._connect, self._cluster, self.timeout, self.group = connect, cluster, timeout, group
        self._stream = stream or sys.stderr
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.message: str | None = None  # set when the watchdog fired

    def __enter__(self) -> HangWatchdog:
        self._thread = threading.Thread(target=self._run, name="tensorspark-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def raise_if_fired(self, cause: BaseException | None = None) -> None:
        """Raise :class:`PSTimeoutError` with the diagnosis if the watchdog fired."""
        if self.message is not None:
            raise PSTimeoutError(self.message) from cause

    def _run(self) -> None:
        try:
            client = self._connect()
        except TensorSparkError as e:
            log.warning("tensorspark: the hang watchdog could not connect: %s", e)
            return
        try:
            while not self._stop.wait(self._interval):
                try:
                    reports = client.reports()
                except TensorSparkError:
                    client = reconnect(client, self._connect)  # a shard may have moved
                    continue
                if reports and all(r["progress_age_s"] >= self.timeout for r in reports):
                    self._fire(reports)
                    return
        finally:
            client.close()

    def _fire(self, reports: list[dict[str, Any]]) -> None:
        names = ", ".join(
            f"partition {r['partition']} (attempt {r['attempt']}, clock {r['clock']}, "
            f"{r['steps']} steps, no progress for {r['progress_age_s']:.0f} s)"
            for r in reports
        )
        self.message = (
            f"training hung: no worker made progress for hang_timeout = {self.timeout:g} s; "
            f"stuck workers: {names}. Their stack dumps are printed above (stderr); the Spark "
            "job was cancelled and the parameter server keeps the model trained so far"
        )
        lines = ["", f"tensorspark: {self.message}", ""]
        for r in reports:
            head = (
                f"--- partition {r['partition']} (attempt {r['attempt']}): clock {r['clock']}, "
                f"steps {r['steps']}, last progress {r['progress_age_s']:.1f} s ago"
            )
            if r["report_age_s"] is None:
                lines += [head, "(no stack dump received)"]
            else:
                lines += [f"{head}, stack dump from {r['report_age_s']:.1f} s ago:", r["text"]]
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()
        self._cluster.cancel(self.group)
