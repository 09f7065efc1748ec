"""Tagged snapshots over two real `tensorspark-ps` processes, and restoring both to one tag."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import (
    PSClient,
    ShardedPSClient,
    TensorSparkValueError,
    VariableNotFoundError,
)

CHUNK = 64  # 16 floats per chunk: W (40 floats) is 3 chunks, on both servers
W = 40


class Servers:
    """Two `tensorspark-ps` processes, each with its own snapshot directory."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.dirs = [tmp_path / "ckpt-0", tmp_path / "ckpt-1"]
        self.secret = None
        self.procs = []
        self.ports = []

    def start(self, resume: bool = False) -> list[str]:
        self.procs, self.ports = [], []
        for d in self.dirs:
            args = ["--snapshot-dir", str(d)]
            if resume:
                args += ["--resume-from", str(d)]
            proc, port, self.secret = start_ps(self.tmp_path, *args, secret=self.secret)
            self.procs.append(proc)
            self.ports.append(port)
        return self.addresses

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def crash(self) -> None:
        """SIGKILL both: no final snapshot, as after a crash."""
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                assert p.wait(timeout=10) == 0  # clean shutdown on SIGTERM

    def client(self, **kw) -> ShardedPSClient:
        return ShardedPSClient(
            self.addresses,
            self.secret,
            chunk_bytes=CHUNK,
            io_timeout=20.0,
            connect_timeout=20.0,
            **kw,
        )


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    s.start()
    yield s
    s.stop()


def delta(x: float) -> dict[str, np.ndarray]:
    return {"W": np.full(W, x, np.float32), "b": np.full(5, x, np.float32)}


def test_restore_brings_both_servers_back_to_the_newest_common_tag(servers):
    driver = servers.client()
    driver.register({"W": np.arange(W, dtype=np.float32), "b": np.zeros(5, np.float32)})
    assert all(s["variables"] >= 1 for s in driver.stats_per_server())  # W is on both
    driver.push(delta(1.0))
    names = driver.snapshot(tag=1)
    assert [n.endswith("-tag-00000000000000000001.tsnap") for n in names] == [True, True]
    at_tag1 = driver.pull(["W", "b"])

    # More training; tag 2 reaches only the first server before the crash.
    driver.push(delta(10.0))
    first = PSClient("127.0.0.1", servers.ports[0], servers.secret)
    assert first.snapshot(2).endswith("-tag-00000000000000000002.tsnap")
    first.close()
    driver.push(delta(100.0))
    driver.close()
    servers.crash()

    # Each server resumes from its own newest snapshot: inconsistent points.
    servers.start(resume=True)
    driver = servers.client()
    mixed = {n: np.empty(s, np.float32) for n, s in (("W", W), ("b", 5))}
    driver.pull_into(mixed)
    assert not all(np.array_equal(mixed[n], at_tag1[n]) for n in mixed)
    per_server = driver.snapshots()
    assert [[f["tag"] for f in files] for files in per_server] == [[2, 1], [1]]
    assert all(f["version"] > 0 and f["name"].startswith("snapshot-") for f in per_server[0])

    assert driver.newest_common_tag() == 1
    version = driver.restore(1)
    got = {n: np.empty(s, np.float32) for n, s in (("W", W), ("b", 5))}
    assert driver.pull_into(got) == version
    for n in got:
        np.testing.assert_array_equal(got[n], at_tag1[n])
    # The first server's tag 2 went with the history it belonged to.
    assert [[f["tag"] for f in files] for files in driver.snapshots()] == [[1], [1]]
    assert driver.newest_common_tag() == 1
    # Training goes on from the restored model.
    driver.push(delta(1.0))
    after = {n: np.empty(s, np.float32) for n, s in (("W", W), ("b", 5))}
    driver.pull_into(after)
    np.testing.assert_array_equal(after["W"], at_tag1["W"] + 1.0)
    driver.close()


def test_restore_refusals(servers):
    driver = servers.client()
    assert driver.newest_common_tag() is None
    driver.register({"W": np.zeros(W, np.float32), "b": np.zeros(5, np.float32)})
    driver.snapshot(tag=1)
    driver.push(delta(1.0))
    first = PSClient("127.0.0.1", servers.ports[0], servers.secret)
    first.snapshot(3)

    # A tag one server lacks changes neither.
    with pytest.raises(VariableNotFoundError, match="no server was changed"):
        driver.restore(3)
    assert (driver.pull(["W"])["W"] == 1.0).all()
    with pytest.raises(VariableNotFoundError, match="holds no snapshot with tag 5"):
        first.restore(5)

    # Refused while a worker is live.
    worker = servers.client(partition_id=0)
    worker.join()
    with pytest.raises(TensorSparkValueError, match=r"while workers are live \(partitions 0\)"):
        driver.restore(1)
    worker.leave()
    worker.close()
    assert driver.restore(1) == 0
    assert (driver.pull(["W"])["W"] == 0.0).all()

    for bad in (0, -1, 2**64, True, "1", 1.0):
        with pytest.raises(TensorSparkValueError, match="tag must be"):
            driver.snapshot(bad)
        with pytest.raises(TensorSparkValueError, match="tag must be"):
            first.restore(bad)
    first.close()
    driver.close()


def test_a_server_without_a_snapshot_dir_refuses(tmp_path):
    proc, port, secret = start_ps(tmp_path)
    try:
        with PSClient("127.0.0.1", port, secret) as c:
            for call in (lambda: c.snapshot(1), c.snapshots, lambda: c.restore(1)):
                with pytest.raises(TensorSparkValueError, match="no snapshot directory"):
                    call()
            assert c.connected
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
