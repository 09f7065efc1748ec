"""Fault injection: kill training tasks to check that a run survives it.

Two kinds of fault, both against a run whose parameter server listens on a
known port of this machine (Spark ``local[N,F]`` or workers on this host):

- :class:`WorkerKiller` sends SIGKILL to a Python worker that is training,
  as an out-of-memory kill or a crashed process would. Spark retries the
  task (``local[N,F]`` allows ``F - 1`` retries, ``spark.task.maxFailures``
  on a cluster) and the new attempt pulls the current model.
- :func:`kill_task_attempt` asks Spark to kill and reschedule one task
  attempt while its Python worker keeps running for a while: a zombie, as
  after a lost executor whose processes live on. The retried attempt fences
  the zombie, whose later pushes the server refuses (``refused_fenced``).

Training workers are found as the processes with an established TCP
connection to the server's port (``/proc/net/tcp``), the calling process
excepted, so this works on Linux only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import PSTimeoutError, TensorSparkValueError

log = logging.getLogger("tensorspark")

_ESTABLISHED = "01"
_DUMP_FILE = re.compile(r"tensorspark-stacks-p(\d+)-a(\d+)-")


def _socket_inodes_to(port: int) -> set[str]:
    """Inodes of established TCP sockets whose remote port is ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            remote, state, inode = cols[2], cols[3], cols[9]
            if state == _ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _connected(port: int, exclude: tuple[int, ...]) -> dict[int, list[str]]:
    """PID -> the targets of its open files, for processes connected to ``port``."""
    if not os.path.isdir("/proc/net"):
        raise TensorSparkValueError(
            "tensorspark.chaos needs Linux's /proc; it is not available here"
        )
    inodes = {f"socket:[{i}]" for i in _socket_inodes_to(port)}
    skip = {os.getpid(), *exclude}
    found: dict[int, list[str]] = {}
    if not inodes:
        return found
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in skip:
            continue
        try:
            fd_dir = f"/proc/{pid}/fd"
            targets = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
        except OSError:  # the process ended or is not ours to read
            continue
        if any(t in inodes for t in targets):
            found[int(pid)] = targets
    return found


def worker_pids(port: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """Processes connected to the parameter server on ``port`` of this host.

    Parameters
    ----------
    port : int
        The server's TCP port.
    exclude : tuple of int
        PIDs to leave out; the calling process is always left out (a
        driver's own client connects to the same port).

    Returns
    -------
    list of int
        Sorted PIDs, in practice the Python workers running training tasks.
    """
    return sorted(_connected(port, exclude))


def worker_tasks(port: int, exclude: tuple[int, ...] = ()) -> dict[int, tuple[int, int]]:
    """PID -> (partition, attempt) of the training tasks connected to ``port``.

    A task names itself in its stack-dump file (open while it is a member
    of the run, when the hang watchdog is on, as it is by default); workers
    without one are left out.
    """
    out = {}
    for pid, targets in _connected(port, exclude).items():
        for t in targets:
            m = _DUMP_FILE.search(t)
            if m:
                out[pid] = (int(m.group(1)), int(m.group(2)))
    return out


@dataclass
class Kill:
    """One injected fault: which process, when (seconds after start)."""

    pid: int
    at_s: float


@dataclass
class WorkerKiller:
    """A thread that SIGKILLs one training worker at a random moment.

    Training workers are the members of the run found by
    :func:`worker_tasks` (so the hang watchdog must be on, as it is by
    default). Once at least ``min_workers`` of them are connected,
    it waits a random delay in ``delay_s`` and kills one of the workers
    connected at that moment, chosen at random; ``kills`` says how many
    times it does so.

    Parameters
    ----------
    port : int
        The parameter server's port on this host.
    delay_s : tuple of float
        Bounds of the random delay after the workers are seen.
    kills : int
        How many workers to kill, one after the other (each waits for the
        workers to be connected again, then a new delay).
    min_workers : int
        Workers that must be connected before the delay starts.
    ready : callable, optional
        Extra condition checked before the delay starts, e.g. that the
        server reports progress.
    seed : int, optional
        Seeds the delay and the choice of worker.
    timeout_s : float
        Gives up (``error`` set, nothing killed) when no worker connects in
        this time.

    Examples
    --------
    >>> killer = WorkerKiller(port=session.server_port, delay_s=(1.0, 4.0)).start()
    >>> session.run(train_step, feed_rdd=rdd, feed_name_list=[x.name, y_.name])
    >>> killer.join(); killer.killed
    [Kill(pid=4242, at_s=6.3)]
    """

    port: int
    delay_s: tuple[float, float] = (1.0, 3.0)
    kills: int = 1
    min_workers: int = 1
    ready: Callable[[], bool] | None = None
    seed: int | None = None
    timeout_s: float = 300.0
    killed: list[Kill] = field(default_factory=list)
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> WorkerKiller:
        """Start the thread; returns ``self``."""
        self._thread = threading.Thread(target=self._run, name="tensorspark-killer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop waiting (no further kill); joins the thread."""
        self._stop.set()
        self.join()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _members(self) -> list[int]:
        # Members only: a worker between its task's end and its next task
        # may still hold a connection, and killing it would change nothing.
        return sorted(worker_tasks(self.port))

    def _wait_for_workers(self) -> list[int] | None:
        deadline = time.monotonic() + self.timeout_s
        while not self._stop.is_set():
            pids = self._members()
            if len(pids) >= self.min_workers and (self.ready is None or self.ready()):
                return pids
            if time.monotonic() > deadline:
                self.error = (
                    f"no {self.min_workers} worker(s) connected to port {self.port} within "
                    f"{self.timeout_s:.0f} s; nothing was killed"
                )
                return None
            self._stop.wait(0.1)
        return None

    def _run(self) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        while len(self.killed) < self.kills:
            if self._wait_for_workers() is None:
                return
            if self._stop.wait(rng.uniform(*self.delay_s)):
                return
            # The tasks may have ended meanwhile (between two epochs' jobs):
            # then the first member of the next job is the one.
            pids = self._wait_for_workers()
            if pids is None:
                return
            pid = rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append(Kill(pid, round(time.monotonic() - started, 3)))
            log.warning("tensorspark.chaos: killed worker process %d (SIGKILL)", pid)
            # The connection lingers until the kernel has reaped the process.
            deadline = time.monotonic() + 30
            while pid in worker_pids(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)


def running_tasks(sc: Any) -> list[dict[str, int]]:
    """Spark's running task attempts: task id, stage, partition, attempt.

    Read from the driver's status store, so it works for any master.
    """
    store = sc._jsc.sc().statusStore()
    out = []
    stages = store.activeStages()
    for i in range(stages.size()):
        stage = stages.apply(i)
        tasks = store.taskList(stage.stageId(), stage.attemptId(), 10_000)
        for j in range(tasks.size()):
            t = tasks.apply(j)
            if t.status() == "RUNNING":
                out.append(
                    {
                        "task_id": int(t.taskId()),
                        "stage": int(stage.stageId()),
                        "partition": int(t.index()),
                        "attempt": int(t.attempt()),
                    }
                )
    return out


def kill_task_attempt(sc: Any, partition: int, timeout_s: float = 60.0) -> dict[str, int]:
    """Kill and reschedule the running attempt of ``partition`` (a zombie).

    Spark marks the attempt killed, launches a new attempt of the partition
    and, after ``spark.python.task.killTimeout``, ends the old attempt's
    Python worker. Until then the old worker trains on; once the new
    attempt has joined, the server refuses its pushes as fenced.

    Parameters
    ----------
    sc : pyspark.SparkContext
        The driver's context.
    partition : int
        The partition (task index) of the running stage.
    timeout_s : float
        How long to wait for such a task to be running.

    Returns
    -------
    dict
        The killed attempt: task_id, stage, partition, attempt.

    Raises
    ------
    PSTimeoutError
        If no running task of ``partition`` appeared within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = [t for t in running_tasks(sc) if t["partition"] == partition]
        if tasks:
            task = max(tasks, key=lambda t: t["attempt"])
            sc._jsc.sc().killTaskAttempt(task["task_id"], True, "tensorspark.chaos zombie")
            log.warning("tensorspark.chaos: killed and rescheduled task attempt %s", task)
            return task
        if time.monotonic() > deadline:
            raise PSTimeoutError(
                f"kill_task_attempt: no running task of partition {partition} within "
                f"{timeout_s:.0f} s"
            )
        time.sleep(0.1)


def make_zombie(
    sc: Any,
    port: int,
    partition: int,
    stats: Callable[[], dict[str, Any]],
    after_s: float = 0.0,
    timeout_s: float = 120.0,
) -> dict[str, int]:
    """Turn the running attempt of ``partition`` into a zombie that is fenced.

    Freezes the attempt's Python worker (SIGSTOP, like a long pause or a
    network partition), has Spark kill and reschedule the attempt, waits
    until the new attempt has joined the run, then lets the old worker go
    on (SIGCONT). The old worker's next push is refused as fenced and its
    task ends with :class:`FencedError`, which Spark ignores because the
    attempt was already killed. Set ``spark.python.task.killTimeout`` above
    the time this takes, or Spark ends the frozen worker first.

    Parameters
    ----------
    sc : pyspark.SparkContext
        The driver's context.
    port : int
        The parameter server's port on this host.
    partition : int
        Which task to turn into a zombie.
    stats : callable
        Returns the server's counters (e.g. ``SparkSession.stats``).
    after_s : float
        Seconds to let the task train after its worker is seen. Keep it
        short: a task frozen after it has read all of its input holds its
        Spark slot until ``spark.python.task.killTimeout`` ends the worker,
        and only then is it retried (no zombie). Frozen while it still
        reads, the killed task ends at once and the worker, let go, trains
        on what it read and pushes (fenced).
    timeout_s : float
        Bound on each wait: for the task to run, for the new attempt.

    Returns
    -------
    dict
        pid, partition, the zombie's attempt and the new attempt.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        mine = [(a, pid) for pid, (p, a) in worker_tasks(port).items() if p == partition]
        if mine:
            attempt, pid = max(mine)
            break
        if time.monotonic() > deadline:
            raise PSTimeoutError(
                f"make_zombie: no worker of partition {partition} connected to port {port} "
                f"within {timeout_s:.0f} s"
            )
        time.sleep(0.05)
    time.sleep(after_s)
    os.kill(pid, signal.SIGSTOP)
    try:
        kill_task_attempt(sc, partition, timeout_s)
        key = re.compile(rf'^worker_clock\{{partition="{partition}",attempt="(\d+)"\}}$')
        while True:
            newer = [int(m.group(1)) for k in stats() if (m := key.match(k))]
            newer = [a for a in newer if a > attempt]
            if newer:
                break
            if time.monotonic() > deadline + timeout_s:
                raise PSTimeoutError(
                    f"make_zombie: no new attempt of partition {partition} joined within "
                    f"{timeout_s:.0f} s of killing attempt {attempt}"
                )
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # Spark ended it first
            os.kill(pid, signal.SIGCONT)
    log.warning(
        "tensorspark.chaos: partition %d attempt %d (pid %d) is a zombie of attempt %d",
        partition,
        attempt,
        pid,
        newer[0],
    )
    return {"pid": pid, "partition": partition, "attempt": attempt, "new_attempt": max(newer)}
