"""A live status page of a training run, served by the driver.

A poller thread reads the parameter server's STATS over its own connection
(the counters that ``PSClient.stats()`` and the Prometheus endpoint show,
parsed by :func:`runtime.progress.worker_progress`) and keeps a short
history; a stdlib HTTP server on a daemon thread serves one inline page
(no remote script, style or font) that follows the run over server-sent
events. Every path starts with a token derived from the run's secret;
anything else gets 403.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import math
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ..errors import TensorSparkError, TensorSparkValueError
from .progress import worker_progress

log = logging.getLogger("tensorspark")

# The token is an HMAC of this label: the page's URL never holds the secret
# that lets a client join the parameter server.
_TOKEN_LABEL = b"tensorspark status page"
_MODES = {0: "async", 1: "sync", 2: "ssp"}
_RATE_WINDOW_S = 5.0
# A live worker is a straggler below this fraction of the median step rate,
# or when it has made no progress for this long while others did.
_STRAGGLER_FRACTION = 0.5
_STUCK_MS = 10_000
_SERVER_RATES = ("pushes", "pulls", "bytes_in", "bytes_out")


def page_token(secret: bytes) -> str:
    """The hex token in the page's URL: HMAC-SHA256 of a fixed label under ``secret``."""
    return hmac.new(bytes(secret), _TOKEN_LABEL, hashlib.sha256).hexdigest()


def _finite(x: Any) -> float | None:
    """JSON has no NaN: non-finite numbers become null."""
    if isinstance(x, int | float) and math.isfinite(x):
        return x
    return None


class _Worker:
    """What the page remembers of one ``(partition, attempt)``."""

    def __init__(self, points: int) -> None:
        self.keys: dict[str, float] = {}
        self.state = "live"
        self.recent: collections.deque[tuple[float, float, float]] = collections.deque()
        self.loss: collections.deque[tuple[float, float]] = collections.deque(maxlen=points)
        self.steps_per_sec = 0.0
        self.samples_per_sec = 0.0
        self.reported = -1.0  # the steps of the last loss point

    def update(self, t: float, keys: dict[str, float]) -> None:
        steps, samples = float(keys.get("steps", 0)), float(keys.get("samples", 0))
        if self.recent and steps < self.recent[-1][1]:
            self.recent.clear()  # joined again (a new epoch): counts restart
        self.keys, self.state = keys, "live"
        self.recent.append((t, steps, samples))
        while len(self.recent) > 2 and t - self.recent[0][0] > _RATE_WINDOW_S:
            self.recent.popleft()
        t0, s0, n0 = self.recent[0]
        dt = t - t0
        self.steps_per_sec = (steps - s0) / dt if dt > 0 else 0.0
        self.samples_per_sec = (samples - n0) / dt if dt > 0 else 0.0
        # One point per progress report (heartbeats), not per poll.
        loss = keys.get("loss_f64")
        if _finite(loss) is not None and steps != self.reported:
            self.loss.append((round(t, 2), loss))
        self.reported = steps


class StatusPage:
    """Serves the run's status page until :meth:`close`.

    Parameters
    ----------
    connect : callable
        Returns a new parameter-server client (the poller's own connection).
    secret : bytes
        The run's secret; the URL carries :func:`page_token` of it.
    bind : str
        Address to listen on (where the parameter server listens).
    port : int
        0 picks a free port.
    url_host : str
        The host named in :attr:`url`.
    run : dict
        Fixed facts shown on the page (name, servers, sync interval, ...).
    interval : float
        Seconds between polls of STATS.
    points : int
        Loss points kept per worker (the curve a page opened mid-run shows).

    Raises
    ------
    TensorSparkValueError
        The port cannot be bound (named as ``ui_port``).
    """

    def __init__(
        self,
        connect: Any,
        secret: bytes,
        *,
        bind: str,
        port: int,
        url_host: str,
        run: dict[str, Any],
        interval: float = 0.5,
        points: int = 1200,
    ) -> None:
        self._connect, self._interval, self._points = connect, interval, points
        self._token = page_token(secret)
        self.run = dict(run)
        self.phase = "starting"
        self._html = (
            resources.files(__package__).joinpath("status_page.html").read_text(encoding="utf-8")
        )
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._seq = 0
        # Until the first poll answers: the run's facts and no counters.
        self._snapshot: dict[str, Any] = {
            "seq": 0,
            "t": 0.0,
            "phase": self.phase,
            "run": dict(self.run),
            "workers": [],
            "server": {},
            "stats": {},
            "error": None,
        }
        self._workers: dict[tuple[int, int], _Worker] = {}
        self._server_prev: tuple[float, dict[str, float]] | None = None
        self._started = time.monotonic()
        try:
            self._httpd = ThreadingHTTPServer((bind, port), self._handler())
        except OSError as e:
            raise TensorSparkValueError(
                f"ui_port={port}: cannot serve the status page on {bind}:{port} "
                f"({e.strerror or e}); pass ui_port=0 for a free port, or a free port number"
            ) from None
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://{url_host}:{self.port}/{self._token}/"
        self._threads = [
            threading.Thread(
                target=self._httpd.serve_forever, args=(0.1,), name="tensorspark-ui", daemon=True
            ),
            threading.Thread(target=self._poll, name="tensorspark-ui-poll", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- polling ---------------------------------------------------------

    def _poll(self) -> None:
        client = None
        error_logged = False
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self._connect()
                stats = client.stats()
            except TensorSparkError as e:
                if client is not None:
                    client.close()
                client = None
                if not error_logged:  # the page is best effort; training reports its errors
                    log.warning("tensorspark: status page cannot read the server's stats: %s", e)
                    error_logged = True
                self._publish(None, str(e))
            else:
                self._publish(stats, None)
            self._stop.wait(self._interval)
        if client is not None:
            client.close()

    def _publish(self, stats: dict[str, Any] | None, error: str | None) -> None:
        t = time.monotonic() - self._started
        with self._cond:
            snap = self._build(t, stats) if stats is not None else dict(self._snapshot)
            snap["error"] = error
            self._seq += 1
            snap["seq"] = self._seq
            self._snapshot = snap
            self._cond.notify_all()

    def _build(self, t: float, stats: dict[str, Any]) -> dict[str, Any]:
        live = worker_progress(stats)
        # A worker that vanishes while workers_lost grows was lost, not done.
        before = self._snapshot["stats"].get("workers_lost")
        lost_now = before is not None and stats.get("workers_lost", 0) > before
        for key, keys in live.items():
            self._workers.setdefault(key, _Worker(self._points)).update(t, keys)
        newest = {}
        for p, a in self._workers:
            newest[p] = max(newest.get(p, a), a)
        for (p, a), w in self._workers.items():
            if (p, a) in live:
                continue
            if a < newest[p]:
                w.state = "fenced"  # a newer attempt of its partition replaced it
            elif w.state == "live":
                w.state = "lost" if lost_now else "left"
            w.steps_per_sec = w.samples_per_sec = 0.0
        rates = [w.steps_per_sec for k, w in self._workers.items() if k in live]
        median = statistics.median(rates) if len(rates) >= 2 else 0.0
        progressing = any(k.get("progress_age_ms", 0) < _STUCK_MS for k in live.values())
        workers = []
        for (p, a), w in sorted(self._workers.items()):
            k = w.keys
            count = k.get("staleness_count", 0)
            is_live = (p, a) in live
            slow = median > 0 and w.steps_per_sec < _STRAGGLER_FRACTION * median
            stuck = len(live) >= 2 and progressing and k.get("progress_age_ms", 0) >= _STUCK_MS
            workers.append(
                {
                    "id": f"{p}-{a}",
                    "partition": p,
                    "attempt": a,
                    "state": w.state,
                    "straggler": bool(is_live and (slow or stuck)),
                    "clock": k.get("clock"),
                    "steps": k.get("steps"),
                    "samples": k.get("samples"),
                    "loss": _finite(k.get("loss_f64")),
                    "steps_per_sec": round(w.steps_per_sec, 2),
                    "samples_per_sec": round(w.samples_per_sec, 1),
                    "staleness": k.get("staleness"),
                    "staleness_mean": (
                        round(k.get("staleness_sum", 0) / count, 3) if count else None
                    ),
                    "last_seen_ms": k.get("last_seen_ms"),
                    "progress_age_ms": k.get("progress_age_ms"),
                    "loss_point": list(w.loss[-1]) if is_live and w.loss else None,
                }
            )
        return {
            "t": round(t, 2),
            "phase": self.phase,
            "run": {**self.run, "mode": _MODES.get(stats.get("mode"), str(stats.get("mode")))},
            "workers": workers,
            "server": self._server(t, stats),
            "stats": {k: _finite(v) if isinstance(v, float) else v for k, v in stats.items()},
        }

    def _server(self, t: float, stats: dict[str, Any]) -> dict[str, Any]:
        prev, self._server_prev = self._server_prev, (t, stats)
        out: dict[str, Any] = {}
        for key in _SERVER_RATES:
            rate = 0.0
            if prev is not None and t > prev[0]:
                rate = max(0.0, (stats.get(key, 0) - prev[1].get(key, 0)) / (t - prev[0]))
            out[key + "_per_sec"] = round(rate, 1)
        count = stats.get("staleness_count", 0)
        out["staleness_mean"] = round(stats.get("staleness_sum", 0) / count, 3) if count else None
        out["refused"] = {
            k[len('refused{reason="') : -2]: v for k, v in stats.items() if k.startswith("refused{")
        }
        return out

    def state(self, *, history: bool) -> dict[str, Any]:
        """The latest snapshot; with ``history``, every worker's loss curve so far."""
        with self._cond:
            snap = dict(self._snapshot)
            if history:
                snap["loss_history"] = {
                    f"{p}-{a}": [list(x) for x in w.loss] for (p, a), w in self._workers.items()
                }
        return snap

    # -- serving ---------------------------------------------------------

    def _changed(self, seen: int) -> Any:
        """A predicate: a snapshot newer than ``seen`` exists, or the page closes."""
        return lambda: self._seq != seen or self._stop.is_set()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        page = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "tensorspark"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the URL holds the token: keep it out of logs

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                token, _, rest = path.lstrip("/").partition("/")
                if not hmac.compare_digest(token.encode(), page._token.encode()):
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rest == "":
                    self._send(200, "text/html; charset=utf-8", page._html.encode())
                elif rest == "stats.json":
                    body = json.dumps(page.state(history=True)).encode()
                    self._send(200, "application/json", body)
                elif rest == "events":
                    self._events()
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _headers(self, code: int, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Referrer-Policy", "no-referrer")
                # Inline only: the page loads nothing from anywhere else.
                self.send_header(
                    "Content-Security-Policy",
                    "default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                )

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self._headers(code, ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _events(self) -> None:
                self._headers(200, "text/event-stream")
                self.end_headers()
                try:
                    first = json.dumps(page.state(history=True))
                    self.wfile.write(f"retry: 2000\nevent: history\ndata: {first}\n\n".encode())
                    self.wfile.flush()
                    seen = -1
                    while not page._stop.is_set():
                        with page._cond:
                            page._cond.wait_for(page._changed(seen), timeout=15.0)
                            if page._stop.is_set():
                                return
                            if page._seq == seen:
                                msg = ": keep-alive\n\n"
                            else:
                                seen = page._seq
                                msg = f"data: {json.dumps(page._snapshot)}\n\n"
                        self.wfile.write(msg.encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the browser went away

        return Handler

    def close(self) -> None:
        """Stop polling and serving; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=10.0)
