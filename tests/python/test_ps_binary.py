"""The standalone `tensorspark-ps` executable, driven as a real process."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import AuthenticationError, PSClient
from tensorspark.cli import ps_binary


def test_help():
    out = subprocess.run([ps_binary(), "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    assert "--port" in out.stdout + out.stderr
    assert "--threads" in out.stdout


def test_bad_arguments_exit_2(tmp_path):
    out = subprocess.run(
        [ps_binary(), "--port", "notaport"], capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 2
    out = subprocess.run(
        [ps_binary(), "--secret-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 2
    assert "missing" in out.stderr
    out = subprocess.run(
        [ps_binary(), "--threads", "5000", "--secret-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 2
    assert "--threads" in out.stderr


def test_serves_until_sigterm(tmp_path):
    proc, port, secret = start_ps(tmp_path)
    try:
        with PSClient("127.0.0.1", port, secret, connect_timeout=10) as c:
            c.register({"w": np.zeros(5)})
            c.push({"w": np.ones(5)}, kind="delta")
            np.testing.assert_array_equal(c.pull()["w"], np.ones(5))
        with pytest.raises(AuthenticationError):
            PSClient("127.0.0.1", port, b"x" * 32)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "listening" in proc.log_path.read_text()


def test_shutdown_call_stops_it(tmp_path):
    proc, port, secret = start_ps(tmp_path, "--threads", "2")
    try:
        with PSClient("127.0.0.1", port, secret, connect_timeout=10) as c:
            # A server-side optimizer on the standalone server.
            c.register({"w": np.ones(3)})
            c.set_optimizer("momentum", learning_rate=0.5)
            c.push({"w": np.ones(3)}, kind="gradient")
            c.push({"w": np.ones(3)}, kind="gradient")
            # m = 1, w = 0.5; m = 0.9 + 1 = 1.9, w = 0.5 - 0.95
            np.testing.assert_allclose(c.pull()["w"], np.full(3, -0.45), rtol=1e-6)
            c.shutdown_server()
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tls_with_a_new_identity_and_with_given_files(tmp_path):
    """--tls prints (and writes) the fingerprint clients pin; --tls-cert/--tls-key use files."""
    from tensorspark import make_tls_identity

    fp_file = tmp_path / "fingerprint"
    proc, port, secret = start_ps(tmp_path, "--tls", "--tls-fingerprint-file", str(fp_file))
    try:
        fp = fp_file.read_text().strip()
        assert f"TLS certificate fingerprint {fp}" in proc.log_path.read_text()
        with PSClient("127.0.0.1", port, secret, tls_fingerprint=fp) as c:
            c.register({"w": np.zeros(5)})
        with pytest.raises(AuthenticationError, match="TLS connections only"):
            PSClient("127.0.0.1", port, secret)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    cert, key, fp = make_tls_identity()
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    proc, port, secret = start_ps(
        tmp_path, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")
    )
    try:
        with PSClient("127.0.0.1", port, secret, tls_fingerprint=fp) as c:
            assert c.stats()["connections"] >= 1
    finally:
        proc.kill()
        proc.wait(timeout=10)
    out = subprocess.run(
        [ps_binary(), "--tls-cert", str(tmp_path / "cert.pem"), "--secret-file", "x"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 2 and "--tls-key" in out.stderr
