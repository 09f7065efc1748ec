"""Driver side: a clear error, not a hang, when the Spark driver JVM is lost.

PySpark talks to the driver JVM over py4j sockets without timeouts. What
happens when that JVM goes away during a Spark action (measured with
PySpark 4.3, py4j 0.10.9.9, local mode):

- **SIGKILL** (or any death): a call blocked in py4j reads end-of-file,
  py4j retries once on a new connection and raises
  ``ConnectionRefusedError`` within a second. An action that reads its
  result from a data socket (``DataFrame.collect``, ``toArrow``) may instead
  end quietly with *partial* results: PySpark's framed reader takes
  end-of-file at a frame boundary for the end of the data.
- **OutOfMemoryError**: the JVM stays up, py4j still answers, but Spark's
  scheduler loses the message it was handling when the error hit (for
  example ``LocalSchedulerBackendEndpoint``'s), so the job never ends and
  Python waits forever.

:func:`guard` covers both: a daemon thread checks every ``poll_s`` seconds
that the driver JVM is alive and, every ``oom_check_s`` seconds, whether it
threw ``OutOfMemoryError`` since the block began. When either happens, the
blocked thread is interrupted and the block raises
:class:`~tensorspark.errors.SparkDriverError`, which says what was running,
how the JVM ended and what to check::

    from tensorspark import _jvm

    with _jvm.guard(spark, "training epoch 3"):
        rows = df.mapInArrow(fn, schema).collect()

API
---
``guard(sc_or_spark, what, poll_s=1.0, *, oom_check_s=5.0, note=...)``
    Context manager. ``sc_or_spark`` is a ``SparkContext`` or
    ``SparkSession``; ``what`` completes "... died while <what>". The error
    comes out of the ``with`` block within about ``poll_s`` (death) or
    ``oom_check_s + poll_s`` (OutOfMemoryError) seconds. An exception raised
    in the block that shows the JVM is gone (py4j's ``Py4JNetworkError``, a
    refused connection) is translated to the same error; any other exception
    passes through unchanged. A block that ends normally while the JVM died
    meanwhile raises too, since its results may be incomplete. The thread is
    joined when the block exits.
``translate(exc, what, sc_or_spark=None, *, note=...)``
    The :class:`~tensorspark.errors.SparkDriverError` for ``exc`` if it
    means the driver JVM is gone, else None. For ``except`` clauses outside
    a guard.

How it checks:

- A JVM that this Python launched (local mode, ``pyspark`` shell):
  ``SparkContext._gateway.proc.poll()``, which also gives the exit code or
  signal.
- A JVM that launched this Python (``spark-submit``; no ``proc``): the
  parent process id changes when it exits, and a one-round-trip py4j call
  fails.
- OutOfMemoryError: the HotSpot ``DiagnosticCommand`` MBean's ``vmInfo``
  (``jcmd VM.info``), read over py4j, counts them ("OutOfMemoryError
  java_heap_errors=N"); about 50 ms of JVM time per check. Any
  OutOfMemoryError thrown while the block runs counts, even one a thread
  survived: after one the driver is not to be trusted. On a JVM without
  that MBean this check is off. Setting
  ``spark.driver.extraJavaOptions=-XX:+ExitOnOutOfMemoryError`` when the
  session is created turns an OutOfMemoryError into a death, seen at once.

How it interrupts: when the block runs in the main thread, the guard
installs a handler for ``SIGUSR2`` (restored on exit) and sends that signal
to the main thread with ``signal.pthread_kill``, repeatedly every
``poll_s`` until the block exits (PySpark's own ``finally`` clauses may
call the dead JVM again). A system call blocked on a py4j or data socket
returns ``EINTR``, the handler raises, and py4j, which wraps it, closes
the connection without retrying (an error while receiving). In another
thread signals cannot be used, so the guard shuts down that thread's py4j
socket (PySpark's pinned-thread mode gives each thread its own) with
py4j's retry switched off for it, which ends a call blocked in py4j but not
a read of a data socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from types import TracebackType
from typing import Any

from .errors import SparkDriverError, TensorSparkError, TensorSparkValueError

__all__ = ["guard", "translate"]

log = logging.getLogger("tensorspark")

_SIGNAL = signal.SIGUSR2
_NOTE = "the parameter server in this Python process keeps the model trained so far"
_OOM_RE = re.compile(r"OutOfMemoryError\s+((?:\w+_errors=\d+\s*)+)")


class _GuardInterruptError(SparkDriverError):
    """Raised in the guarded thread by the signal handler (then translated)."""


def _context(sc_or_spark: Any) -> Any:
    sc = getattr(sc_or_spark, "sparkContext", None)
    sc = sc if sc is not None else sc_or_spark
    if getattr(sc, "_gateway", None) is None:
        raise TensorSparkValueError(
            f"expected a SparkContext or SparkSession with a py4j gateway, got {type(sc).__name__}"
        )
    return sc


def _driver_memory(sc: Any) -> str:
    try:
        value = sc.getConf().get("spark.driver.memory", None)
    except Exception:  # noqa: BLE001 - the JVM may be gone already
        return "spark.driver.memory"
    return (
        f"spark.driver.memory (now {value})"
        if value
        else "spark.driver.memory (now 1g, the default)"
    )


def _message(what: str, how: str, memory: str, note: str | None, oom: bool) -> str:
    head = "ran out of memory" if oom else "died"
    parts = [f"the Spark driver JVM {head} while {what} ({how})"]
    if note:
        parts.append(note)
    parts.append("this SparkContext is unusable: stop it and start a new SparkSession")
    parts.append(f"check {memory}")
    return "; ".join(parts)


def _how_exited(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"signal {-returncode}, {name}"
    return f"exit code {returncode}"


def _oom_text(n: int) -> str:
    return (
        f"java.lang.OutOfMemoryError, {n} since this call began; Spark's driver does not "
        "recover from one and its job would wait forever"
    )


def _through_py4j(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}py4j{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (py4j's ``cause``, ``__cause__``, ``__context__``)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or any(cur is seen for seen in out):
            continue
        out.append(cur)
        todo += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
    return [e for e in out if isinstance(e, BaseException)]


def _py4j_trouble(exc: BaseException) -> bool:
    """A py4j error other than a Java exception, or a lost connection."""
    for e in _chain(exc):
        name = type(e).__name__
        if type(e).__module__.startswith("py4j") and name != "Py4JJavaError":
            return True
        if isinstance(e, _GuardInterruptError) or (
            isinstance(e, ConnectionError | EOFError) and _through_py4j(e)
        ):
            return True
    return False


def _is_connection_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a lost or refused py4j connection."""
    if isinstance(exc, TensorSparkError) and not isinstance(exc, _GuardInterruptError):
        return False  # ours already, e.g. a parameter server connection
    for e in _chain(exc):
        if type(e).__name__ == "Py4JNetworkError" or isinstance(e, _GuardInterruptError):
            return True
        if isinstance(e, ConnectionError) and _through_py4j(e):
            return True
    return False


class _Probe:
    """Liveness and OutOfMemoryError checks on one driver JVM."""

    def __init__(self, sc: Any) -> None:
        self.gateway = sc._gateway
        self.proc = getattr(self.gateway, "proc", None)
        # spark-submit starts Python as a child of the driver JVM.
        self.ppid = (
            os.getppid() if self.proc is None and "PYSPARK_GATEWAY_PORT" in os.environ else None
        )
        self._system: Any = None
        self._invoke: Any = None
        self._oom_args: Any = None
        self.oom_ok = True

    def exited(self, wait: float = 0.0) -> str | None:
        """How the JVM ended, or None while it runs (no py4j call)."""
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout=wait) if wait > 0 else self.proc.poll()
            except subprocess.TimeoutExpired:
                rc = None
            return None if rc is None else _how_exited(rc)
        if self.ppid is not None and os.getppid() != self.ppid:
            return f"the JVM that started this Python process (pid {self.ppid}) exited"
        return None

    def ping(self) -> str | None:
        """One py4j round trip; how it failed if the JVM is unreachable."""
        try:
            if self._system is None:
                self._system = self.gateway.jvm.java.lang.System
            self._system.currentTimeMillis()
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_connection_loss(e) or isinstance(e, OSError):
                return f"its py4j gateway is unreachable: {type(e).__name__}"
            raise
        return None

    def oom_count(self) -> int | None:
        """OutOfMemoryErrors the JVM has thrown so far (None: unknown)."""
        if not self.oom_ok:
            return None
        try:
            if self._invoke is None:
                self._prepare_oom()
            text = self._invoke.invoke(self._oom_mbs, self._oom_args)
        except Exception as e:  # noqa: BLE001
            if _is_connection_loss(e) or isinstance(e, OSError):
                raise
            self.oom_ok = False
            log.debug("driver JVM OutOfMemoryError check off: %s", e)
            return None
        m = _OOM_RE.search(str(text))
        if not m:
            return 0
        return sum(int(n) for n in re.findall(r"=(\d+)", m.group(1)))

    def _prepare_oom(self) -> None:
        # The platform MBeanServer's class is not exported from its module,
        # so py4j cannot call it directly: go through the public interface's
        # Method object. The arguments never change, so they are built once.
        gw, jvm = self.gateway, self.gateway.jvm
        cls = jvm.java.lang.Class
        types = gw.new_array(cls, 4)
        for i, name in enumerate(
            (
                "javax.management.ObjectName",
                "java.lang.String",
                "[Ljava.lang.Object;",
                "[Ljava.lang.String;",
            )
        ):
            types[i] = cls.forName(name)
        method = cls.forName("javax.management.MBeanServerConnection").getMethod("invoke", types)
        params = gw.new_array(jvm.java.lang.Object, 1)
        params[0] = gw.new_array(jvm.java.lang.String, 0)
        signature = gw.new_array(jvm.java.lang.String, 1)
        signature[0] = "[Ljava.lang.String;"
        args = gw.new_array(jvm.java.lang.Object, 4)
        args[0] = jvm.javax.management.ObjectName("com.sun.management:type=DiagnosticCommand")
        args[1] = "vmInfo"
        args[2] = params
        args[3] = signature
        self._oom_mbs = jvm.java.lang.management.ManagementFactory.getPlatformMBeanServer()
        self._oom_args = args
        self._invoke = method


class guard:  # noqa: N801 - used like a function: ``with guard(...)``
    """Raise :class:`~tensorspark.errors.SparkDriverError` if the driver JVM is lost.

    Parameters
    ----------
    sc_or_spark : pyspark.SparkContext or pyspark.sql.SparkSession
        Whose driver JVM to watch.
    what : str
        What the block does, for the message ("... died while <what>").
    poll_s : float
        Seconds between liveness checks (and between interrupts once fired).
    oom_check_s : float
        Seconds between OutOfMemoryError checks; 0 turns them off.
    note : str, optional
        A sentence added to the message after how the JVM ended.

    See the module docstring for how the checks and the interrupt work.
    """

    def __init__(
        self,
        sc_or_spark: Any,
        what: str,
        poll_s: float = 1.0,
        *,
        oom_check_s: float = 5.0,
        note: str | None = _NOTE,
    ) -> None:
        if poll_s <= 0:
            raise TensorSparkValueError(f"guard: poll_s must be > 0, got {poll_s}")
        self._sc = _context(sc_or_spark)
        self.what = what
        self.poll_s = float(poll_s)
        self.oom_check_s = float(oom_check_s)
        self.note = note
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._how: str | None = None
        self._oom = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._previous_handler: Any = None
        self._use_signal = False
        self._connection: Any = None

    # -- the guarded thread ---------------------------------------------------

    def __enter__(self) -> guard:
        self._probe = _Probe(self._sc)
        self._memory = _driver_memory(self._sc)
        self._target = threading.get_ident()
        self._use_signal = threading.current_thread() is threading.main_thread()
        if self._use_signal:
            self._previous_handler = signal.signal(_SIGNAL, self._on_signal)
        else:
            self._connection = self._thread_connection()
        self._thread = threading.Thread(
            target=self._watch, name="tensorspark-jvm-guard", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        with self._lock:
            self._closing = True  # no more interrupts from here on
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=self.poll_s + 10.0)
        if self._thread.is_alive():
            log.warning("tensorspark-jvm-guard: the checking thread did not stop in time")
        if self._use_signal:
            self._restore_handler()
        how, oom = self._how, self._oom
        if how is None:
            how = self._last_look(exc)
        if how is None:
            return False
        error = SparkDriverError(_message(self.what, how, self._memory, self.note, oom))
        raise error from exc

    def _last_look(self, exc: BaseException | None) -> str | None:
        """How the JVM ended if it did just before the block ended, else None."""
        if exc is None or not _py4j_trouble(exc):
            return self._probe.exited()
        # The JVM may still be dying (its sockets close before it can be
        # reaped), so give it a moment; a Java exception passes at once.
        how = self._probe.exited(wait=1.0)
        if how is None and self._probe.proc is None:
            with contextlib.suppress(Exception):
                how = self._probe.ping()
        if how is None and _is_connection_loss(exc):
            how = f"the py4j connection to it failed: {type(exc).__name__}: {exc}"
        return how

    def _restore_handler(self) -> None:
        # A signal sent just before _closing may still be pending in the
        # kernel; with the default action restored it would kill the
        # process. Block it, consume any pending one, then restore.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {_SIGNAL})
        try:
            if self._how is not None:
                while signal.sigtimedwait({_SIGNAL}, 0) is not None:
                    pass
            signal.signal(_SIGNAL, self._previous_handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._how is not None and not self._closing:
            raise _GuardInterruptError(f"interrupted: the Spark driver JVM is lost ({self._how})")
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)

    def _thread_connection(self) -> Any:
        """This thread's own py4j connection (PySpark's pinned-thread mode)."""
        client = getattr(self._probe.gateway, "_gateway_client", None)
        get = getattr(client, "get_thread_connection", None)
        if get is None:
            log.warning("guard: py4j without per-thread connections; cannot interrupt a call")
            return None
        if get() is None:
            with contextlib.suppress(Exception):
                self._probe.gateway.jvm.java.lang.System.currentTimeMillis()
        return get()

    # -- the checking thread --------------------------------------------------

    def _watch(self) -> None:
        baseline: int | None = None  # OutOfMemoryErrors before the block
        next_oom = time.monotonic()
        while True:
            if self._how is None:
                how, oom = None, False
                try:
                    how = self._probe.exited()
                    if how is None and self._probe.proc is None:
                        how = self._probe.ping()
                    if how is None and self.oom_check_s > 0 and time.monotonic() >= next_oom:
                        next_oom = time.monotonic() + self.oom_check_s
                        count = self._probe.oom_count()
                        if count is not None and baseline is None:
                            baseline = count
                        elif count is not None and count > baseline:
                            how, oom = _oom_text(count - baseline), True
                except Exception as e:  # noqa: BLE001 - py4j failed: the JVM is unreachable
                    how = self._probe.exited() or f"its py4j gateway is unreachable: {e!r}"
                if how is not None:
                    self._oom = oom
                    self._how = how
                    log.error("the Spark driver JVM is lost while %s: %s", self.what, how)
            if self._how is not None:
                self._interrupt()
            if self._stop.wait(self.poll_s):
                return

    def _interrupt(self) -> None:
        with self._lock:
            if self._closing:
                return
            if self._use_signal:
                signal.pthread_kill(self._target, _SIGNAL)
                return
            conn = self._connection
            if conn is None:
                return
            # py4j would resend the command on a new connection after an
            # empty answer; a command sent twice could start a second job.
            conn.initiated_from_client = False
            sock = getattr(conn, "socket", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def translate(
    exc: BaseException, what: str, sc_or_spark: Any = None, *, note: str | None = _NOTE
) -> SparkDriverError | None:
    """The :class:`~tensorspark.errors.SparkDriverError` for ``exc``, or None.

    Parameters
    ----------
    exc : BaseException
        An exception from a Spark call.
    what : str
        What the call did, for the message.
    sc_or_spark : SparkContext or SparkSession, optional
        With it, the JVM's exit code or signal goes into the message when it
        is known.
    note : str, optional
        A sentence added to the message.

    Returns
    -------
    SparkDriverError or None
        The error to raise (``raise err from exc``) when ``exc`` is a lost
        or refused py4j connection (or a ``SparkDriverError`` already),
        else None.
    """
    if isinstance(exc, SparkDriverError) and not isinstance(exc, _GuardInterruptError):
        return exc
    how = None
    memory = "spark.driver.memory"
    if sc_or_spark is not None and _py4j_trouble(exc):
        with contextlib.suppress(Exception):
            how = _Probe(_context(sc_or_spark)).exited(wait=1.0)
    if how is None and _is_connection_loss(exc):
        how = f"the py4j connection to it failed: {type(exc).__name__}: {exc}"
    if how is None:
        return None
    return SparkDriverError(_message(what, how, memory, note, False))
