"""Wire options through the binding: fp16/bf16 encodings, Unix-domain sockets."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from tensorspark import ParameterServer, PSClient, TensorSparkValueError, generate_secret


@pytest.fixture
def server(tmp_path):
    secret = generate_secret()
    path = f"/tmp/ts-wire-py-{os.getpid()}.sock"
    with ParameterServer(secret, host="127.0.0.1", unix_path=path) as s:
        s.secret = secret
        yield s
    assert not os.path.exists(path)  # removed on stop


def _values(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mags = 10.0 ** rng.uniform(-4, 4, size=n)
    return (mags * rng.choice([-1.0, 1.0], size=n)).astype(np.float32)


@pytest.mark.parametrize(("encoding", "bound"), [("fp32", 0.0), ("fp16", 2**-11), ("bf16", 2**-8)])
def test_encoded_push_pull_round_trip(server, encoding, bound):
    want = _values(50_001, 3)
    with PSClient("127.0.0.1", server.port, server.secret, encoding=encoding) as c:
        assert c.encoding == encoding
        c.register({"w": np.zeros_like(want)})
        c.push({"w": want}, kind="delta")
        got = c.pull(["w"])["w"]
        rel = np.max(np.abs(got.astype(np.float64) - want) / np.abs(want))
        assert rel <= bound
        if encoding == "fp16":
            assert rel < 1e-3
        out = np.empty_like(want)
        c.pull_into({"w": out})
        np.testing.assert_array_equal(out, got)


def test_bad_encoding_is_value_error(server):
    with pytest.raises(TensorSparkValueError, match="encoding"):
        PSClient("127.0.0.1", server.port, server.secret, encoding="fp8")


def test_unix_socket_round_trip_and_mixed_clients(server):
    st = os.stat(server.unix_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    with (
        PSClient("unix:" + server.unix_path, 0, server.secret, encoding="fp16") as u,
        PSClient("127.0.0.1", server.port, server.secret) as t,
    ):
        u.register({"w": w0})
        np.testing.assert_array_equal(t.pull(["w"])["w"], w0)
        u.push({"w": np.full((2, 3), 0.5, dtype=np.float32)}, kind="delta")
        np.testing.assert_array_equal(t.pull(["w"])["w"], w0 + 0.5)
        np.testing.assert_array_equal(u.pull(["w"])["w"], w0 + 0.5)
        assert t.stats()["version"] == 1


def test_bad_unix_path_is_value_error():
    with pytest.raises(TensorSparkValueError):
        ParameterServer(generate_secret(), host="127.0.0.1", unix_path="")


def test_checksums_negotiated_per_connection(server):
    w0 = np.arange(1000, dtype=np.float32)
    with (
        PSClient("unix:" + server.unix_path, 0, server.secret) as u,
        PSClient("127.0.0.1", server.port, server.secret) as t,
        PSClient("127.0.0.1", server.port, server.secret, checksums="off") as t_off,
        PSClient("unix:" + server.unix_path, 0, server.secret, checksums="on") as u_on,
    ):
        assert (u.checksums, t.checksums, t_off.checksums, u_on.checksums) == (
            False,
            True,
            False,
            True,
        )
        assert t.stats()["connections_unchecked"] == 2
        u.register({"w": w0})
        t_off.push({"w": np.ones_like(w0)}, kind="delta")
        for c in (u, t, t_off, u_on):
            np.testing.assert_array_equal(c.pull(["w"])["w"], w0 + 1)


def test_bad_checksums_is_value_error(server):
    with pytest.raises(TensorSparkValueError, match="checksums"):
        PSClient("127.0.0.1", server.port, server.secret, checksums="maybe")
