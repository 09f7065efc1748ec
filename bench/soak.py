"""Soak test of the parameter server: 32 clients for 10 minutes, RSS growth < 5%.

Starts ``tensorspark-ps`` on a free loopback port (with a random secret, the
Prometheus endpoint and background snapshots on), drives it with ``ps_soak``
(bench/ps_soak.cc: 32 threads of worker-like tasks that join, push, pull,
heartbeat, report stack dumps and leave, with churn: new attempts fencing
old ones, killed tasks, zombies, wrong secrets, garbage connections) and
samples the server's RSS, thread count and open file descriptors from
``/proc`` every few seconds, scraping ``/metrics`` each time.

The load runs in two phases against the same server. The **warm-up**
(``--warmup``, default 5% of ``--seconds`` but at least 30 s, at most half)
is not measured: the model, the optimizer's slots, the glibc arenas of the
connection threads and their grow-only frame buffers get allocated then, and
that is not growth. When it ends every client has closed, so the server is
idle; after ``--settle`` seconds the **start** RSS is the median of three
idle samples a second apart. The **main** phase runs for the rest of
``--seconds``; the **end** RSS is taken the same way after it. Measuring
idle against idle keeps the per-connection buffers of whichever clients
happen to be open out of the comparison; anything a client left behind
(leaked memory, threads, descriptors, members) shows. The RSS right after
startup and the whole time series (loaded and idle) are recorded too.

growth = (end - start) / start must stay under ``--max-growth`` (0.05); the
server's idle thread and descriptor counts must not grow; ``ps_soak`` must
see no unexpected error in either phase and the server must drain to no
connection and no member after each; every scrape must answer; and the
server must exit 0 on SIGTERM. Writes ``--out`` (bench/results/soak.json)
and exits 1 with a message naming each failed check, 0 when all pass.

    python bench/soak.py [--seconds 600] [--threads 32] [--ps PATH] [--soak PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"tensorspark-ps listening on 127\.0\.0\.1:(\d+)")
METRICS_RE = re.compile(r"tensorspark-ps metrics at http://127\.0\.0\.1:(\d+)/metrics")


@dataclass
class Sample:
    """One look at the server process.

    Attributes
    ----------
    t : float
        Seconds since the server was started.
    phase : str
        ``"startup"``, ``"warmup"``, ``"idle-start"``, ``"main"`` or
        ``"idle-end"``.
    rss_kb : int
        Resident set size (``VmRSS``), KiB.
    threads : int
        Threads of the process.
    fds : int
        Open file descriptors.
    """

    t: float
    phase: str
    rss_kb: int
    threads: int
    fds: int


def default_ps() -> str:
    """Return the ``tensorspark-ps`` of this Python's environment.

    Returns
    -------
    str
        ``<sys.prefix>/bin/tensorspark-ps`` if it exists, else the one on
        ``PATH``, else ``"tensorspark-ps"``.
    """
    venv = Path(sys.prefix) / "bin" / "tensorspark-ps"
    if venv.exists():
        return str(venv)
    return shutil.which("tensorspark-ps") or "tensorspark-ps"


def read_proc(pid: int) -> tuple[int, int, int]:
    """Read RSS, thread count and open descriptors of a process.

    Parameters
    ----------
    pid : int
        Process id.

    Returns
    -------
    tuple of int
        ``(rss_kb, threads, fds)``.

    Raises
    ------
    OSError
        When the process is gone.
    """
    rss = threads = -1
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, threads, fds


def read_hwm_kb(pid: int) -> int:
    """Return the peak RSS (``VmHWM``, KiB) of a process, or -1 if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Server:
    """A ``tensorspark-ps`` subprocess on a free loopback port.

    Parameters
    ----------
    binary : str
        Path of ``tensorspark-ps``.
    workdir : Path
        Directory for the secret, the log and the snapshots.
    update_threads : int
        ``--threads`` of the server (0: one per core).
    snapshot_every_s : float
        ``--snapshot-every-s`` (0: no snapshots).
    """

    def __init__(
        self, binary: str, workdir: Path, update_threads: int, snapshot_every_s: float
    ) -> None:
        self.secret_file = workdir / "secret"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32))
        self.log_path = workdir / "server.log"
        self.args = [
            binary,
            "--secret-file",
            str(self.secret_file),
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--threads",
            str(update_threads),
        ]
        if snapshot_every_s > 0:
            self.args += [
                "--snapshot-dir",
                str(workdir / "snapshots"),
                "--snapshot-every-s",
                str(snapshot_every_s),
                "--snapshot-keep",
                "2",
            ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.started = time.monotonic()
        self.port = 0
        self.metrics_port = 0

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self.proc.pid

    def wait_listening(self, timeout_s: float) -> None:
        """Wait until the log names the ports the server picked.

        Parameters
        ----------
        timeout_s : float
            Longest wait.

        Raises
        ------
        RuntimeError
            When the server exits or does not report both ports in time.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            port, mport = LISTEN_RE.search(text), METRICS_RE.search(text)
            if port and mport:
                self.port, self.metrics_port = int(port.group(1)), int(mport.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tensorspark-ps exited with {self.proc.returncode} at startup:\n{text}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"tensorspark-ps did not report its ports within {timeout_s:.0f} s")

    def scrape(self, timeout_s: float) -> str:
        """Return the Prometheus text of ``/metrics``.

        Parameters
        ----------
        timeout_s : float
            Socket timeout of the request.

        Returns
        -------
        str
            The response body.
        """
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode("utf-8", errors="replace")

    def stop(self, timeout_s: float) -> int | None:
        """Send SIGTERM and wait for the exit; SIGKILL after the timeout.

        Parameters
        ----------
        timeout_s : float
            Longest wait after SIGTERM.

        Returns
        -------
        int or None
            The exit status, or None when it had to be killed.
        """
        rc: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            rc = None
        self._log.close()
        return rc

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the server's log."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Sampler(threading.Thread):
    """Samples the server every ``every_s`` seconds and scrapes ``/metrics``.

    Parameters
    ----------
    server : Server
        The server to watch.
    every_s : float
        Sampling period.
    """

    def __init__(self, server: Server, every_s: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.every_s = every_s
        self.phase = "startup"
        self.samples: list[Sample] = []
        self.scrapes = 0
        self.scrape_failures: list[str] = []
        self.lock = threading.Lock()
        self._stop_event = threading.Event()

    def sample(self, phase: str | None = None) -> Sample | None:
        """Take one sample now (None when the process is gone)."""
        try:
            rss, threads, fds = read_proc(self.server.pid)
        except OSError:
            return None
        s = Sample(
            round(time.monotonic() - self.server.started, 2),
            phase or self.phase,
            rss,
            threads,
            fds,
        )
        with self.lock:
            self.samples.append(s)
        return s

    def run(self) -> None:
        """Sample until stopped."""
        while not self._stop_event.wait(self.every_s):
            if self.sample() is None:
                return
            try:
                body = self.server.scrape(timeout_s=10)
                if "tensorspark_pushes_total" not in body:
                    raise ValueError("no tensorspark_pushes_total in the response")
                self.scrapes += 1
            except (OSError, ValueError) as e:
                self.scrape_failures.append(f"{time.monotonic() - self.server.started:.1f} s: {e}")

    def stop(self) -> None:
        """Stop sampling and wait for the thread (bounded)."""
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(timeout=30)


def idle_samples(sampler: Sampler, phase: str, settle_s: float) -> list[Sample]:
    """Take three samples one second apart once the server has settled.

    Parameters
    ----------
    sampler : Sampler
        Records the samples in its series too.
    phase : str
        Phase label of the samples.
    settle_s : float
        Wait before the first sample (connection threads are reaped
        within 0.2 s of closing).

    Returns
    -------
    list of Sample
        The samples (fewer if the server died).
    """
    time.sleep(settle_s)
    out = []
    for i in range(3):
        if i:
            time.sleep(1.0)
        s = sampler.sample(phase)
        if s is not None:
            out.append(s)
    return out


def run_phase(
    soak: str, server: Server, args: argparse.Namespace, seconds: float, name: str, seed: int
) -> tuple[int | None, dict[str, Any] | None, Path]:
    """Run ``ps_soak`` for one phase.

    Parameters
    ----------
    soak : str
        Path of ``ps_soak``.
    server : Server
        The server under test.
    args : argparse.Namespace
        Command-line options (threads, log_dir, heartbeat timeout, think time).
    seconds : float
        Duration of the phase.
    name : str
        ``"warmup"`` or ``"main"``: names the log and JSON files.
    seed : int
        Seed of the phase's random choices.

    Returns
    -------
    tuple
        ``(exit status, or None when it was killed because it ran past
        ``seconds`` + 180 s or the server died; parsed JSON or None; log path)``.
    """
    out = Path(args.log_dir) / f"soak-{name}.json"
    log = Path(args.log_dir) / f"soak-{name}.log"
    out.unlink(missing_ok=True)
    cmd = [
        soak,
        "--port",
        str(server.port),
        "--secret-file",
        str(server.secret_file),
        "--threads",
        str(args.threads),
        "--seconds",
        f"{seconds:g}",
        "--seed",
        str(seed),
        "--heartbeat-timeout-s",
        f"{args.heartbeat_timeout_s:g}",
        "--think-ms",
        f"{args.think_ms:g}",
        "--out",
        str(out),
    ]
    print(f"soak: {name} phase, {seconds:.0f} s: {' '.join(cmd)}", flush=True)
    rc: int | None = None
    # Setup (CONFIGURE retries up to 30 s), the run, the drain (10 s).
    deadline = time.monotonic() + seconds + 180
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while (rc := proc.poll()) is None:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                # The server died (no point going on) or the run hangs.
                proc.kill()
                proc.wait(timeout=30)
                rc = None
                break
            time.sleep(0.5)
    result = json.loads(out.read_text()) if out.exists() else None
    return rc, result, log


def median_of(samples: list[Sample], field: str) -> int:
    """Median of one field over samples (-1 when there are none)."""
    values = [getattr(s, field) for s in samples]
    return int(statistics.median(values)) if values else -1


def main(argv: list[str] | None = None) -> int:
    """Run the soak test.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every check passed, 1 otherwise.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600, help="load time, warm-up included")
    p.add_argument("--threads", type=int, default=32, help="client threads of ps_soak")
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured warm-up seconds (default: 5%% of --seconds, >= 30, <= half)",
    )
    p.add_argument("--ps", default=default_ps(), help="tensorspark-ps binary (default: the venv's)")
    p.add_argument("--soak", default=str(REPO / "build" / "cpp" / "ps_soak"), help="ps_soak binary")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    p.add_argument("--log-dir", default=None, help="logs and phase JSON (default: a temp dir)")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds before idle samples")
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed idle RSS growth")
    p.add_argument("--server-threads", type=int, default=0, help="tensorspark-ps --threads")
    p.add_argument("--snapshot-every-s", type=float, default=10.0, help="server snapshots (0: off)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=2.0)
    p.add_argument("--think-ms", type=float, default=2.0, help="mean pause between steps")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    warmup = args.warmup
    if warmup is None:
        warmup = min(max(30.0, 0.05 * args.seconds), args.seconds / 2)
    main_s = args.seconds - warmup
    if warmup <= 0 or main_s <= 0:
        p.error("--seconds must leave time for both the warm-up and the measured phase")
    for binary in (args.ps, args.soak):
        if shutil.which(binary) is None:
            p.error(f"{binary} is not an executable (build it, or pass --ps / --soak)")
    tmp = None
    if args.log_dir is None:
        tmp = tempfile.mkdtemp(prefix="ts-soak-")
        args.log_dir = tmp
    workdir = Path(args.log_dir)
    workdir.mkdir(parents=True, exist_ok=True)

    failures: list[str] = []
    started_at = time.time()
    load_start = os.getloadavg()
    server = Server(args.ps, workdir, args.server_threads, args.snapshot_every_s)
    sampler = Sampler(server, args.sample_every)
    phases: dict[str, Any] = {}
    idle_start: list[Sample] = []
    idle_end: list[Sample] = []
    after_startup: Sample | None = None
    server_rc: int | None = None
    hwm = -1
    try:
        server.wait_listening(timeout_s=15)
        print(
            f"soak: tensorspark-ps pid {server.pid} on port {server.port} "
            f"(metrics {server.metrics_port}); logs in {workdir}",
            flush=True,
        )
        time.sleep(0.5)
        after_startup = sampler.sample("startup")
        sampler.start()
        for name, seconds, seed in (("warmup", warmup, args.seed), ("main", main_s, args.seed + 1)):
            sampler.phase = name
            t0 = time.monotonic()
            rc, result, log = run_phase(args.soak, server, args, seconds, name, seed)
            phases[name] = {"exit_code": rc, "wall_s": round(time.monotonic() - t0, 1)}
            phases[name]["result"] = result
            if rc is None:
                failures.append(f"ps_soak ({name}) was stopped (server died or timeout); see {log}")
            elif rc != 0:
                failures.append(f"ps_soak ({name}) exited with {rc}; see {log}")
            if result is not None:
                if result["unexpected_total"]:
                    failures.append(
                        f"{result['unexpected_total']} unexpected errors in the {name} phase: "
                        + "; ".join(result["error_samples"][:3])
                    )
                if not result["drained"]:
                    failures.append(f"the server did not drain after the {name} phase")
            if server.proc.poll() is not None:
                failures.append(
                    f"tensorspark-ps died with status {server.proc.returncode} during the "
                    f"{name} phase:\n{server.log_tail()}"
                )
                break
            sampler.phase = "idle-start" if name == "warmup" else "idle-end"
            idle = idle_samples(sampler, sampler.phase, args.settle)
            if name == "warmup":
                idle_start = idle
            else:
                idle_end = idle
    except RuntimeError as e:
        failures.append(str(e))
    finally:
        sampler.stop()
        hwm = read_hwm_kb(server.pid)
        final_metrics = ""
        if server.proc.poll() is None and server.metrics_port:
            try:
                final_metrics = server.scrape(timeout_s=10)
            except OSError as e:
                failures.append(f"final /metrics scrape failed: {e}")
        server_rc = server.stop(timeout_s=30)
    if server_rc != 0:
        failures.append(
            "tensorspark-ps did not exit 0 on SIGTERM "
            f"({'killed after 30 s' if server_rc is None else f'status {server_rc}'})"
        )
    if sampler.scrape_failures:
        failures.append(
            f"{len(sampler.scrape_failures)} /metrics scrapes failed: {sampler.scrape_failures[:3]}"
        )

    start_kb, end_kb = median_of(idle_start, "rss_kb"), median_of(idle_end, "rss_kb")
    growth = (end_kb - start_kb) / start_kb if start_kb > 0 and end_kb > 0 else None
    threads_start, threads_end = median_of(idle_start, "threads"), median_of(idle_end, "threads")
    fds_start, fds_end = median_of(idle_start, "fds"), median_of(idle_end, "fds")
    if growth is None:
        failures.append("no idle RSS samples at start or end (the server died?)")
    elif growth >= args.max_growth:
        failures.append(
            f"idle RSS grew {100 * growth:.2f}% ({start_kb} -> {end_kb} KiB), "
            f"limit {100 * args.max_growth:.1f}%"
        )
    if threads_end > threads_start >= 0:
        failures.append(f"idle server threads grew from {threads_start} to {threads_end}")
    if fds_end > fds_start >= 0:
        failures.append(f"idle server file descriptors grew from {fds_start} to {fds_end}")

    # Request counts of both phases; rates over the load time.
    ops: dict[str, int] = {}
    expected: dict[str, int] = {}
    unexpected: dict[str, int] = {}
    load_s = 0.0
    for ph in phases.values():
        r = ph.get("result")
        if not r:
            continue
        load_s += r["elapsed_s"]
        for dst, key in (
            (ops, "ops"),
            (expected, "expected_errors"),
            (unexpected, "unexpected_errors"),
        ):
            for k, v in r[key].items():
                dst[k] = dst.get(k, 0) + v
    total_ops = sum(ops.values())
    main_result = (phases.get("main") or {}).get("result") or {}
    warm_conns = ((phases.get("warmup") or {}).get("result") or {}).get("server_stats", {})
    main_conns = main_result.get("server_stats", {}).get("connections_total", 0) - warm_conns.get(
        "connections_total", 0
    )
    loaded = [s for s in sampler.samples if s.phase == "main"]
    tenth = max(1, len(loaded) // 10)
    report: dict[str, Any] = {
        "passed": not failures,
        "failures": failures,
        "duration_s": args.seconds,
        "warmup_s": warmup,
        "main_s": main_s,
        "threads": args.threads,
        "load_elapsed_s": round(load_s, 2),
        "ops_total": total_ops,
        "ops_per_s": round(total_ops / load_s, 1) if load_s else 0.0,
        "ops": ops,
        "rates_per_s": {k: round(v / load_s, 2) for k, v in ops.items()} if load_s else {},
        "main_ops_per_s": main_result.get("ops_per_s"),
        "errors": {
            "unexpected": unexpected,
            "unexpected_total": sum(unexpected.values()),
            "expected": expected,
            "expected_total": sum(expected.values()),
            "metrics_scrapes": sampler.scrapes,
            "metrics_scrape_failures": sampler.scrape_failures,
        },
        "rss": {
            "after_startup_kb": after_startup.rss_kb if after_startup else -1,
            "start_kb": start_kb,
            "end_kb": end_kb,
            "growth": round(growth, 5) if growth is not None else None,
            "growth_kb": end_kb - start_kb if growth is not None else None,
            # What a leak per connection could be at most (informational).
            "main_connections": main_conns,
            "growth_bytes_per_connection": round(1024 * (end_kb - start_kb) / main_conns, 1)
            if growth is not None and main_conns > 0
            else None,
            "max_growth": args.max_growth,
            "start_samples_kb": [s.rss_kb for s in idle_start],
            "end_samples_kb": [s.rss_kb for s in idle_end],
            "peak_kb": hwm,
            "loaded_main_first_tenth_median_kb": median_of(loaded[:tenth], "rss_kb"),
            "loaded_main_last_tenth_median_kb": median_of(loaded[-tenth:], "rss_kb"),
            "how": "start/end: median of 3 idle samples (no client connected) taken "
            f"{args.settle:g} s after the warm-up and after the main phase",
        },
        "threads_idle": {"start": threads_start, "end": threads_end},
        "fds_idle": {"start": fds_start, "end": fds_end},
        "series": [asdict(s) for s in sampler.samples],
        "server": {
            "binary": args.ps,
            "args": server.args[1:],
            "exit_code": server_rc,
            "stats_end": main_result.get("server_stats", {}),
            "metrics_end_lines": len(final_metrics.splitlines()),
        },
        "phases": phases,
        "machine": {
            "cores": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "logs": str(workdir) if tmp is None else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")

    g = f"{100 * growth:+.2f}%" if growth is not None else "n/a"
    print(
        f"soak: {load_s:.0f} s of load, {total_ops} requests ({report['ops_per_s']}/s), "
        f"{sum(expected.values())} expected refusals, {sum(unexpected.values())} unexpected errors"
    )
    print(
        f"soak: idle RSS after startup {report['rss']['after_startup_kb']} KiB, start {start_kb} "
        f"KiB, end {end_kb} KiB: growth {g} (limit {100 * args.max_growth:.1f}%); "
        f"peak {hwm} KiB; threads {threads_start} -> {threads_end}, fds {fds_start} -> {fds_end}"
    )
    print(f"soak: wrote {out}")
    if tmp is not None and not failures:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        for f in failures:
            print(f"soak: FAILED: {f}", file=sys.stderr)
        print(f"soak: logs in {workdir}", file=sys.stderr)
        return 1
    print("soak: PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
