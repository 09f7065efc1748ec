"""Parameter snapshots and resume through ParameterServer and tensorspark-ps."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from helpers import start_ps

import tensorspark
from tensorspark import (
    ParameterServer,
    PSClient,
    TensorSparkValueError,
    VariableNotFoundError,
    generate_secret,
)


def _gradients(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((20, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }


def _client(server: ParameterServer, secret: bytes) -> PSClient:
    return PSClient("127.0.0.1", server.port, secret)


def _train(server: ParameterServer, secret: bytes, steps: range) -> None:
    with _client(server, secret) as c:
        c.register({"w": np.full((20, 5), 0.5), "b": np.zeros(5)})
        c.set_optimizer("adam", learning_rate=0.01)
        for seed in steps:
            c.push(_gradients(seed), kind="gradient")


def test_the_built_extension_is_tested():
    # The snapshot API exists only in this build; a stale install would fail
    # every other test here in a confusing way.
    assert hasattr(tensorspark._core.Server, "snapshot"), tensorspark.__file__


def test_resume_gives_same_values_version_and_next_step(tmp_path):
    secret = generate_secret()
    snaps = tmp_path / "snaps"
    with ParameterServer(secret, host="127.0.0.1", snapshot_dir=snaps) as a:
        _train(a, secret, range(1, 6))
        path = a.snapshot()
        assert os.path.dirname(path) == str(snaps)
        assert os.path.basename(path) == "snapshot-00000000000000000005.tsnap"
        stats = a.stats()
        assert stats["snapshots_written"] == 1
        assert stats["snapshot_version"] == 5
        with _client(a, secret) as c:
            at_snapshot = c.pull()
            c.push(_gradients(6), kind="gradient")
            expected = c.pull()
        assert a.version == 6
    # stop() wrote the final snapshot.
    assert sorted(os.listdir(snaps)) == [
        "snapshot-00000000000000000005.tsnap",
        "snapshot-00000000000000000006.tsnap",
    ]

    # From the requested snapshot: same values and version, and the same
    # next Adam step, bit for bit.
    with ParameterServer(secret, host="127.0.0.1", resume_from=path) as b:
        assert b.version == 5
        assert b.stats()["resumed_version"] == 5
        with _client(b, secret) as c:
            for name, value in c.pull().items():
                np.testing.assert_array_equal(value, at_snapshot[name])
            assert c.push(_gradients(6), kind="gradient") == 6
            for name, value in c.pull().items():
                assert value.tobytes() == expected[name].tobytes(), name

    # From the directory: the newest snapshot (the final one).
    with ParameterServer(secret, host="127.0.0.1", resume_from=str(snaps)) as c_server:
        assert c_server.version == 6
        with _client(c_server, secret) as c:
            for name, value in c.pull().items():
                assert value.tobytes() == expected[name].tobytes(), name


def test_resume_skips_a_truncated_newest_snapshot(tmp_path, capfd):
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1", snapshot_dir=tmp_path) as a:
        _train(a, secret, range(1, 3))
        older = a.snapshot()
        with _client(a, secret) as c:
            c.push(_gradients(3), kind="gradient")
        newest = a.snapshot()
    size = os.path.getsize(newest)
    os.truncate(newest, size - 10)
    capfd.readouterr()
    with ParameterServer(secret, host="127.0.0.1", resume_from=tmp_path) as b:
        assert b.version == 2
    err = capfd.readouterr().err
    assert f"resume: skipping {newest}: truncated at byte {size - 10}" in err
    assert f"resumed from {older}" in err


def test_every_versions_trigger(tmp_path):
    secret = generate_secret()
    with ParameterServer(
        secret, host="127.0.0.1", snapshot_dir=tmp_path, snapshot_every_versions=3
    ) as server:
        _train(server, secret, range(3))
        deadline = time.monotonic() + 10
        while server.stats()["snapshots_written"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.stats()["snapshot_version"] == 3
    assert os.listdir(tmp_path) == ["snapshot-00000000000000000003.tsnap"]


def test_errors(tmp_path):
    secret = generate_secret()
    with (
        ParameterServer(secret, host="127.0.0.1") as plain,
        pytest.raises(TensorSparkValueError, match="snapshot_dir"),
    ):
        plain.snapshot()
    with pytest.raises(VariableNotFoundError, match="holds no snapshot file"):
        ParameterServer(secret, host="127.0.0.1", resume_from=tmp_path)
    (tmp_path / "snapshot-00000000000000000001.tsnap").write_bytes(b"garbage")
    with pytest.raises(TensorSparkValueError, match="holds no valid snapshot") as info:
        ParameterServer(secret, host="127.0.0.1", resume_from=tmp_path)
    assert "snapshot-00000000000000000001.tsnap: not a tensorspark snapshot" in str(info.value)
    with pytest.raises(TensorSparkValueError, match="snapshot_dir"):
        ParameterServer(secret, host="127.0.0.1", snapshot_every_s=1.0)
    with pytest.raises(TensorSparkValueError, match="snapshot_keep"):
        ParameterServer(secret, host="127.0.0.1", snapshot_dir=tmp_path, snapshot_keep=-1)
    server = ParameterServer(secret, host="127.0.0.1", snapshot_dir=tmp_path / "s")
    server.stop()
    with pytest.raises(TensorSparkValueError, match="stopped"):
        server.snapshot()


def test_ps_binary_snapshots_on_sigterm_and_resumes(tmp_path):
    snaps = tmp_path / "snaps"
    proc, port, secret = start_ps(tmp_path, "--snapshot-dir", str(snaps), "--snapshot-keep", "2")
    try:
        with PSClient("127.0.0.1", port, secret, connect_timeout=10) as c:
            c.register({"w": np.zeros(4)})
            c.set_optimizer("momentum", learning_rate=0.5)
            c.push({"w": np.ones(4)}, kind="gradient")
            c.push({"w": np.ones(4)}, kind="gradient")
            expected = c.pull()["w"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.listdir(snaps) == ["snapshot-00000000000000000002.tsnap"]
    assert "snapshot (final) written" in proc.log_path.read_text()

    proc, port, secret = start_ps(tmp_path, "--resume-from", str(snaps), secret=secret)
    try:
        with PSClient("127.0.0.1", port, secret, connect_timeout=10) as c:
            np.testing.assert_array_equal(c.pull()["w"], expected)
            assert c.stats()["resumed_version"] == 2
            # The momentum slot came back: m = 0.9 * 1.9 + 1 = 2.71.
            c.push({"w": np.ones(4)}, kind="gradient")
            np.testing.assert_allclose(c.pull()["w"], expected - 0.5 * 2.71, rtol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
