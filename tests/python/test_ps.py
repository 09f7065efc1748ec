"""The C++ parameter server and client through the Python binding (no Spark)."""

from __future__ import annotations

import socket
import struct
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


def test_a_full_server_is_a_connection_error_and_counted_and_a_stalled_handshake_too():
    secret = generate_secret()
    with ParameterServer(
        secret, host="127.0.0.1", max_connections=1, handshake_timeout=0.5
    ) as server:
        first = PSClient("127.0.0.1", server.port, secret)
        with pytest.raises(PSConnectionError, match="refused the connection.*max_connections"):
            PSClient("127.0.0.1", server.port, secret, connect_timeout=2)
        first.close()
        deadline = time.monotonic() + 5
        while server.stats()["connections"] and time.monotonic() < deadline:
            time.sleep(0.02)
        # A peer that connects and never sends its HELLO: dropped after the deadline.
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b""  # the server closed it
        stats = server.stats()
        assert stats['refused{reason="limit"}'] == 1
        assert stats['refused{reason="handshake"}'] >= 1


class _Member:
    """A member that pushes and pulls in a loop until stopped, keeping every error."""

    def __init__(self, server):
        self.client = connect(server)
        self.client.register({"w": np.zeros(1000, np.float32)})
        self.pushes, self.errors, self.stop = 0, [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        one = {"w": np.ones(1000, np.float32)}
        while not self.stop.is_set():
            try:
                self.client.push(one, kind="delta")
                self.pushes += 1
                self.client.pull(["w"])
            except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                self.errors.append(repr(e))
                return

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the member's push/pull loop hung"
        assert self.errors == []
        assert self.pushes > 0
        np.testing.assert_array_equal(self.client.pull(["w"])["w"], np.full(1000, self.pushes))
        self.client.close()


def test_a_flood_of_idle_connections_never_refuses_a_member():
    """1,100 sockets that never send a byte, at the default caps, while a
    member trains and new members keep joining."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as server:
        server.secret = secret
        member = _Member(server)
        flood: list[socket.socket] = []
        joined = 0
        try:
            for i in range(1100):
                flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
                if i % 50 == 25:  # a new member joins mid-flood
                    with connect(server, connect_timeout=5) as c:
                        assert "w" in c.pull(["w"])
                    joined += 1
            # and with the whole flood held open
            for _ in range(8):
                with connect(server, connect_timeout=5) as c:
                    c.pull(["w"])
                joined += 1
            time.sleep(0.5)
            stats = server.stats()
            member.finish()
        finally:
            for s in flood:
                s.close()
        assert joined == 30
        assert stats['refused{reason="limit"}'] == 0
        assert stats['refused{reason="auth"}'] == 0
        # All from one address: at most max_pending_per_peer (32) pending at once.
        assert stats['refused{reason="evicted"}'] >= 1100 - 32
        assert stats["connections"] <= 32 + 2


def test_a_peer_sending_a_byte_a_second_is_dropped_at_the_handshake_deadline():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1", handshake_timeout=2.0) as server:
        server.secret = secret
        member = _Member(server)
        header = struct.pack("<IHHIIQQ", 0x53505354, 1, 1, 0, 0, 1, 48)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            closed = False
            for byte in header:
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                slow.settimeout(1.0)
                try:
                    if slow.recv(64) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
                except OSError:  # reset: closed with our bytes unread
                    closed = True
                    break
            elapsed = time.monotonic() - started
        assert closed, "a peer trickling its HELLO a byte a second was never dropped"
        assert 1.5 < elapsed < 5.0
        member.finish()
        assert server.stats()['refused{reason="handshake"}'] == 1


def test_a_two_to_the_forty_byte_frame_is_refused_without_reading_it():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as server:
        server.secret = secret
        member = _Member(server)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(struct.pack("<IHHIIQQ", 0x53505354, 1, 1, 0, 0, 7, 1 << 40))
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert time.monotonic() - started < 2.0
        magic, _, opcode, flags, _, request_id, length = struct.unpack("<IHHIIQQ", reply[:32])
        assert (magic, opcode, request_id) == (0x53505354, 1, 7)
        assert flags & 0b11 == 0b11  # RESPONSE | ERROR
        assert len(reply) == 32 + length
        member.finish()
        with connect(server) as c:
            c.pull(["w"])
        assert server.stats()['refused{reason="frame_too_large"}'] == 1


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
