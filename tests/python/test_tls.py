"""TLS between the parameter server and its clients: pinning, refusals, tampering (no Spark)."""

from __future__ import annotations

import contextlib
import socket
import threading

import numpy as np
import pytest

from tensorspark import (
    AuthenticationError,
    ParameterServer,
    PSClient,
    PSConnectionError,
    ShardedPSClient,
    TensorSparkValueError,
    generate_secret,
    make_tls_identity,
)


@pytest.fixture
def tls_server():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1", tls=True) as s:
        s.secret = secret
        yield s


class FlippingProxy:
    """A TCP relay to ``port`` that can flip one byte of the next chunk in one direction.

    ``arm("up")`` (client to server) or ``arm("down")`` XORs a byte 64 bytes
    into the next chunk relayed that way with 0x01, then relays faithfully.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = {"up": threading.Event(), "down": threading.Event()}
        self.flipped = {"up": 0, "down": 0}
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, direction: str) -> None:
        self.armed[direction].set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            for src, dst, d in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, d), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while chunk := src.recv(65536):
                if self.armed[direction].is_set() and len(chunk) > 64:
                    self.armed[direction].clear()
                    chunk = bytearray(chunk)
                    chunk[64] ^= 0x01
                    self.flipped[direction] += 1
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_a_pinned_client_trains_over_tls_and_the_fingerprint_is_the_certificates(tls_server):
    fp = tls_server.tls_fingerprint
    assert fp.startswith("sha256:") and len(fp) == 71
    with PSClient(
        "127.0.0.1", tls_server.port, tls_server.secret, tls_fingerprint=fp.upper()[7:]
    ) as c:
        w = np.arange(300_000, dtype=np.float32)
        c.register({"w": w})
        c.push({"w": np.ones_like(w)}, kind="delta")
        np.testing.assert_array_equal(c.pull(["w"])["w"], w + 1)
    with ShardedPSClient(
        [f"127.0.0.1:{tls_server.port}"], tls_server.secret, tls_fingerprint=[fp]
    ) as c:
        c.register({"w": np.zeros(300_000, np.float32)})  # kept: the first registration wins
        np.testing.assert_array_equal(c.pull(["w"])["w"], w + 1)


def test_a_client_with_the_wrong_fingerprint_is_refused(tls_server):
    other = make_tls_identity()[2]
    wrong = "fingerprint sha256:[0-9a-f]{64}, not the pinned"
    with pytest.raises(AuthenticationError, match=wrong):
        PSClient("127.0.0.1", tls_server.port, tls_server.secret, tls_fingerprint=other)
    with pytest.raises(AuthenticationError, match="accepts TLS connections only"):
        PSClient("127.0.0.1", tls_server.port, tls_server.secret)
    with pytest.raises(TensorSparkValueError, match="not a TLS certificate fingerprint"):
        PSClient("127.0.0.1", tls_server.port, tls_server.secret, tls_fingerprint="abc")
    secret = generate_secret()
    with (
        ParameterServer(secret, host="127.0.0.1") as plain,
        pytest.raises(PSConnectionError, match="started with TLS"),
    ):
        PSClient("127.0.0.1", plain.port, secret, tls_fingerprint=other, connect_timeout=2)


def test_a_server_identity_of_ones_own_is_used():
    cert, key, fp = make_tls_identity()
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1", tls=(cert, key)) as s:
        assert s.tls_fingerprint == fp
        with PSClient("127.0.0.1", s.port, secret, tls_fingerprint=fp) as c:
            assert c.stats()["connections"] >= 1
    with pytest.raises(TensorSparkValueError, match="tls must be"):
        ParameterServer(secret, host="127.0.0.1", tls="yes")
    with pytest.raises(TensorSparkValueError, match="does not match"):
        ParameterServer(secret, host="127.0.0.1", tls=(cert, make_tls_identity()[1]))


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_byte_flipped_on_the_wire_is_detected_and_nothing_is_applied(tls_server, direction):
    """A proxy on the path flips one bit of a push (up) or of a pull's answer (down).

    TLS authenticates every record (AES-GCM or ChaCha20-Poly1305), so the
    receiver refuses the record and drops the connection instead of applying
    or returning altered values; the client sees a PSConnectionError.
    """
    proxy = FlippingProxy(tls_server.port)
    fp = tls_server.tls_fingerprint
    tls_refused = 'refused{reason="tls"}'
    before = tls_server.stats()[tls_refused]
    try:
        c = PSClient("127.0.0.1", proxy.port, tls_server.secret, tls_fingerprint=fp)
        w = np.zeros(100_000, np.float32)
        c.register({"w": w})
        proxy.arm(direction)
        with pytest.raises(PSConnectionError):
            if direction == "up":
                c.push({"w": np.ones_like(w)}, kind="delta")
            else:
                c.pull(["w"])
        assert proxy.flipped[direction] == 1
        c.close()
    finally:
        proxy.close()
    with PSClient("127.0.0.1", tls_server.port, tls_server.secret, tls_fingerprint=fp) as direct:
        assert tls_server.version == 0  # the altered push was never applied
        np.testing.assert_array_equal(direct.pull(["w"])["w"], w)
    # The server counts the record it refused (up); the client refused the other.
    assert tls_server.stats()[tls_refused] == before + (direction == "up")


def test_the_run_option_is_checked_in_one_place():
    from tensorspark.runtime import options

    fp = make_tls_identity()[2]
    assert options.check({"tls": True})["tls"] is True
    assert options.check({"tls": None})["tls"] is False
    assert options.check({"tls": fp.upper()[7:], "start_server": False})["tls"] == (fp,)
    got = options.check({"tls": [fp, fp], "servers": ["a:1"], "secret": b"s" * 32})["tls"]
    assert got == (fp, fp)
    with pytest.raises(TensorSparkValueError, match="tensorspark-ps started with --tls"):
        options.check({"tls": True, "servers": ["a:1"], "secret": b"s" * 32})
    with pytest.raises(TensorSparkValueError, match="pass tls=True"):
        options.check({"tls": fp})
    with pytest.raises(TensorSparkValueError, match="tls must be False, True"):
        options.check({"tls": 1})
    with pytest.raises(TensorSparkValueError, match="not a TLS certificate fingerprint"):
        options.check({"tls": "sha256:zz", "start_server": False})


def test_tls_and_the_handshake_work_in_a_process_that_imported_tensorflow_first():
    """TensorFlow loads its BoringSSL with RTLD_GLOBAL; _core keeps its own OpenSSL.

    With OpenSSL linked dynamically, BoringSSL's same-named symbols took the
    place of OpenSSL's, and making the identity failed with
    ``OPENSSL_internal:UNSUPPORTED_ALGORITHM`` in any driver that imported
    TensorFlow before tensorspark (the seed example does).
    """
    import subprocess
    import sys

    code = """
import tensorflow
import numpy as np
import tensorspark as ts
secret = ts.generate_secret()
with ts.ParameterServer(secret, host="127.0.0.1", tls=True) as s:
    with ts.PSClient("127.0.0.1", s.port, secret, tls_fingerprint=s.tls_fingerprint) as c:
        c.register({"w": np.arange(1000, dtype=np.float32)})
        assert c.pull(["w"])["w"][999] == 999
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
