"""Small helpers for the Python tests."""

from __future__ import annotations

import itertools
import socket
import subprocess
import time


def free_port() -> int:
    """A port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ps_count = itertools.count()


def start_ps(tmp_path, *args, secret: bytes | None = None):
    """Start a `tensorspark-ps` process on loopback; returns (process, port, secret).

    Its stderr goes to a file (``process.log_path``), so a chatty server can
    never block on a full pipe.
    """
    from tensorspark import generate_secret
    from tensorspark.cli import ps_binary

    n = next(_ps_count)
    secret = secret or generate_secret().hex().encode()
    secret_file = tmp_path / f"secret-{n}"
    secret_file.write_bytes(secret + b"\n")
    log_path = tmp_path / f"ps-{n}.log"
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                ps_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--secret-file",
                str(secret_file),
                *args,
            ],
            stderr=log,
        )
    proc.log_path = log_path
    # It prints "listening" after blocking SIGTERM for its clean shutdown; a
    # SIGTERM before that would kill it (exit -15). A start that fails exits.
    deadline = time.monotonic() + 20.0
    while proc.poll() is None and time.monotonic() < deadline:
        if "listening on" in log_path.read_text():
            break
        time.sleep(0.01)
    return proc, port, secret
