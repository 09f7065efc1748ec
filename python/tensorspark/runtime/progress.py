"""Driver-side training progress: a live bar and TensorBoard logs.

The bar is fed from the parameter server's STATS: each worker reports its
steps, samples and recent loss with its heartbeats (``worker_steps``,
``worker_samples``, ``worker_loss_f64`` per ``partition``/``attempt``). A
background thread on the driver polls them over its own connection.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from typing import Any, TextIO

from ..errors import TensorSparkError, TensorSparkValueError
from . import watchdog

log = logging.getLogger("tensorspark")

_WORKER_KEY = re.compile(r'^worker_(\w+)\{partition="(\d+)",attempt="(\d+)"\}$')


def worker_progress(stats: dict[str, Any]) -> dict[tuple[int, int], dict[str, float]]:
    """Per live ``(partition, attempt)``: its ``worker_*`` keys, without the prefix.

    For example ``steps``, ``samples`` and ``loss_f64`` (what it reported),
    ``clock``, ``staleness`` and ``progress_age_ms`` (what the server saw).
    """
    out: dict[tuple[int, int], dict[str, float]] = {}
    for key, value in stats.items():
        m = _WORKER_KEY.match(key)
        if m:
            out.setdefault((int(m.group(2)), int(m.group(3))), {})[m.group(1)] = value
    return out


class ProgressBar:
    """A one-line progress display of a training epoch, fed by polling.

    Parameters
    ----------
    connect : callable
        Returns a new client with a ``stats()`` method (the poller's own
        connection; clients are not thread-safe).
    total_samples : int
        Rows in one epoch (for the percentage), 0 if unknown.
    enabled : bool
        False shows nothing (no thread, no connection).
    stream : file, optional
        Where to draw; stderr by default. On a terminal the line is redrawn
        in place; otherwise a line is written every ``line_every`` seconds.
    on_sample : callable, optional
        Called with ``(samples_so_far, samples_per_sec, loss)`` at each
        poll (the TensorBoard log uses it).
    """

    def __init__(
        self,
        connect: Any,
        total_samples: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.5,
        line_every: float = 10.0,
        on_sample: Any = None,
    ) -> None:
        self.enabled = enabled
        self._connect, self.total = connect, int(total_samples)
        self._stream = stream or sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._interval, self._line_every = interval, line_every
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: dict[tuple[int, int], dict[str, float]] = {}
        self.samples_done = 0  # samples counted in earlier epochs (for on_sample)
        self._label: str | None = None

    def start_epoch(self, label: str) -> None:
        """Start polling for one job (an epoch, a TF1 run), drawn as ``label``."""
        self._label = label
        if not self.enabled and self._on_sample is None:
            return
        self._stop.clear()
        self._done = {}
        self._thread = threading.Thread(target=self._run, name="tensorspark-progress", daemon=True)
        self._thread.start()

    def end_epoch(self, summary: str, samples: int) -> None:
        """Stop polling and print the epoch's summary line."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10.0)
            self._thread = None
        self.samples_done += samples
        if self.enabled and self._label is not None:
            self._write(f"{self._label}: {summary}", final=True)
        self._label = None

    def _run(self) -> None:
        try:
            client = self._connect()
        except TensorSparkError:
            return  # progress is best effort; training reports its own errors
        started = last_line = time.monotonic()
        history: list[tuple[float, int]] = [(started, 0)]
        try:
            while not self._stop.wait(self._interval):
                try:
                    workers = worker_progress(client.stats())
                except TensorSparkError:
                    client = watchdog.reconnect(client, self._connect)  # a shard may have moved
                    continue
                self._done.update(workers)  # keeps the last report of finished tasks
                samples = int(sum(w.get("samples", 0) for w in self._done.values()))
                steps = int(sum(w.get("steps", 0) for w in self._done.values()))
                losses = [w["loss_f64"] for w in workers.values() if _finite(w.get("loss_f64"))]
                loss = sum(losses) / len(losses) if losses else math.nan
                now = time.monotonic()
                history.append((now, samples))
                while len(history) > 2 and now - history[0][0] > 5.0:
                    history.pop(0)  # rate over the last ~5 s
                t0, s0 = history[0]
                rate = (samples - s0) / (now - t0) if now > t0 else 0.0
                if self._on_sample is not None:
                    try:
                        self._on_sample(self.samples_done + samples, rate, loss)
                    except Exception as e:  # noqa: BLE001 - logging must not stop training
                        log.warning("tensorspark: progress log failed, stopping it: %s", e)
                        self._on_sample = None
                if not self.enabled:
                    continue
                line = self._line(samples, steps, rate, loss, len(workers))
                if self._tty:
                    self._write(line)
                elif now - last_line >= self._line_every:
                    self._write(line, final=True)
                    last_line = now
        finally:
            client.close()

    def _line(self, samples: int, steps: int, rate: float, loss: float, live: int) -> str:
        if self.total > 0:
            frac = min(1.0, samples / self.total)
            filled = int(frac * 24)
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] {samples:,}/{self.total:,}"
        else:
            bar = f"{samples:,}"
        loss_text = f" · loss {loss:.4f}" if _finite(loss) else ""
        return (
            f"{self._label} {bar} samples · {steps:,} steps · {rate:,.0f} samples/s"
            f"{loss_text} · {live} workers"
        )

    def _write(self, line: str, final: bool = False) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


class TensorBoardLog:
    """Scalars for TensorBoard under ``log_dir`` (written on the driver).

    Events are written with tensorboard's own writer, not ``tf.summary``, so
    logging works in TF1 graph mode (``disable_v2_behavior``) as in eager.
    Thread-safe: the writer serializes its events.
    """

    def __init__(self, log_dir: str) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise TensorSparkValueError(
                "log_dir needs the tensorboard package: pip install tensorboard"
            ) from None
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        value = [
            self._summary.Value(tag=name, simple_value=float(v))
            for name, v in values.items()
            if v is not None and math.isfinite(v)
        ]
        event = self._event(
            wall_time=time.time(), step=int(step), summary=self._summary(value=value)
        )
        self._writer.add_event(event)
        self._writer.flush()

    def epoch(self, epoch: int, logs: dict[str, float], workers: list[dict[str, Any]]) -> None:
        values = {f"epoch/{k}": float(v) for k, v in logs.items()}
        for w in workers:
            p = w["partition"]
            values[f"worker_{p}/samples_per_sec"] = float(w["samples_per_sec"])
            values[f"worker_{p}/staleness_mean"] = float(w["staleness_mean"])
            values[f"worker_{p}/loss"] = float(w["loss"])
        self.scalars(values, epoch)

    def close(self) -> None:
        self._writer.close()
