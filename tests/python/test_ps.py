"""The C++ parameter server and client through the Python binding (no Spark)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from helpers import free_port

from tensorspark import (
    AddressInUseError,
    AuthenticationError,
    ParameterServer,
    PSClient,
    PSConnectionError,
    ShapeMismatchError,
    TensorSparkError,
    TensorSparkValueError,
    VariableNotFoundError,
    generate_secret,
)


@pytest.fixture
def server():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as s:
        s.secret = secret
        yield s


def connect(server, **kw) -> PSClient:
    return PSClient("127.0.0.1", server.port, server.secret, **kw)


def test_register_pull_push_round_trip(server):
    with connect(server) as c:
        w0 = np.arange(12, dtype=np.float32).reshape(3, 4)
        assert c.register({"w": w0, "b": np.zeros(4)}) == {"w": True, "b": True}
        # First registration wins: same shape keeps the server's values.
        assert c.register({"w": np.ones((3, 4))}) == {"w": False}
        np.testing.assert_array_equal(c.pull(["w"])["w"], w0)

        c.push({"w": np.full((3, 4), 0.5)}, kind="delta")
        np.testing.assert_allclose(c.pull(["w"])["w"], w0 + 0.5)

        c.push({"b": np.full(4, 2.0)}, kind="gradient", learning_rate=0.25)
        np.testing.assert_allclose(c.pull(["b"])["b"], np.full(4, -0.5))

        # Mean combiner, n = 2: (w + new) / 2
        c.push({"b": np.full(4, 1.5)}, kind="parameters", mean_window=2)
        np.testing.assert_allclose(c.pull(["b"])["b"], np.full(4, 0.5))
        assert c.stats()["version"] == 3 == server.version
        assert set(c.pull()) == {"w", "b"}


def test_pull_into_fills_callers_buffer(server):
    with connect(server) as c:
        c.register({"v": np.full(1000, 3.0)})
        buf = np.zeros(1000, np.float32)
        address = buf.ctypes.data
        c.pull_into({"v": buf})
        assert buf.ctypes.data == address
        assert (buf == 3.0).all()
        with pytest.raises(TensorSparkValueError, match="float32"):
            c.pull_into({"v": np.zeros(1000, np.float64)})


def test_errors_leave_state_and_connection_intact(server):
    with connect(server) as c:
        c.register({"w": np.ones((2, 2))})
        with pytest.raises(ShapeMismatchError, match="w"):
            c.register({"w": np.ones(3)})
        with pytest.raises(ShapeMismatchError):
            c.push({"w": np.ones(4)}, kind="delta")
        with pytest.raises(VariableNotFoundError, match="nope"):
            c.push({"w": np.ones((2, 2)), "nope": np.ones(1)}, kind="delta")
        with pytest.raises(TensorSparkValueError):
            c.push({"w": np.ones((2, 2))}, kind="gradient", learning_rate=0.0)
        # Nothing above changed the model, and the connection still works.
        np.testing.assert_array_equal(c.pull()["w"], np.ones((2, 2)))
        assert c.stats()["version"] == 0


def test_concurrent_pushes_are_all_applied(server):
    with connect(server) as c:
        c.register({"w": np.zeros(10_000)})
    n_threads, n_pushes = 4, 50

    def worker(i):
        with connect(server, partition_id=i) as c:
            one = np.ones(10_000, np.float32)
            for _ in range(n_pushes):
                c.push({"w": one}, kind="delta")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with connect(server) as c:
        assert c.stats()["version"] == n_threads * n_pushes
        np.testing.assert_array_equal(c.pull()["w"], np.full(10_000, n_threads * n_pushes))


def test_wrong_secret_is_refused(server):
    started = time.monotonic()
    with pytest.raises(AuthenticationError):
        PSClient("127.0.0.1", server.port, b"not-the-run-secret-0123456789abcd")
    assert time.monotonic() - started < 10
    assert issubclass(AuthenticationError, ConnectionError)
    assert server.stats()["auth_failures"] >= 1


def test_unreachable_server_fails_within_timeout():
    port = free_port()
    started = time.monotonic()
    with pytest.raises((PSConnectionError, TimeoutError)) as info:
        PSClient("127.0.0.1", port, generate_secret(), connect_timeout=1.5)
    assert time.monotonic() - started < 8
    assert str(port) in str(info.value)
    assert isinstance(info.value, TensorSparkError)


def test_port_already_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(AddressInUseError, match=str(port)):
            ParameterServer(generate_secret(), host="127.0.0.1", port=port)


def test_short_secret_rejected():
    with pytest.raises(TensorSparkValueError, match="secret"):
        ParameterServer(b"short")


def test_stop_with_connected_clients(server):
    c = connect(server)
    c.register({"w": np.ones(3)})
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(TensorSparkError):
        c.pull()
