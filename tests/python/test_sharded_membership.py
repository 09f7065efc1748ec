"""ShardedPSClient as a member of a run over two real `tensorspark-ps` processes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import (
    FencedError,
    ShardedPSClient,
    TensorSparkValueError,
    VariableNotFoundError,
)

CHUNK = 64  # 16 floats per chunk: W (40 floats) is 3 chunks, on both servers
W = 40


@pytest.fixture
def servers(tmp_path):
    """Two `tensorspark-ps` processes sharing a secret: (addresses, secret)."""
    first, port0, secret = start_ps(tmp_path)
    second, port1, _ = start_ps(tmp_path, secret=secret)
    yield [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"], secret
    for p in (first, second):
        p.terminate()
        assert p.wait(timeout=10) == 0  # clean shutdown on SIGTERM


def connect(servers, **kw) -> ShardedPSClient:
    addresses, secret = servers
    return ShardedPSClient(addresses, secret, chunk_bytes=CHUNK, io_timeout=20.0, **kw)


def driver_with_model(servers) -> ShardedPSClient:
    driver = connect(servers)
    driver.register({"W": np.zeros(W, np.float32), "b": np.zeros(5, np.float32)})
    # The premise: W's chunks are spread over both servers.
    assert all(s["variables"] >= 1 for s in driver.stats_per_server())
    return driver


def delta(x: float) -> dict[str, np.ndarray]:
    return {"W": np.full(W, x, np.float32), "b": np.full(5, x, np.float32)}


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_zombie_push_is_fenced_after_a_newer_attempt_joined(servers):
    driver = driver_with_model(servers)
    zombie = connect(servers, partition_id=0, attempt=0)
    assert zombie.join() == 0
    zombie.push(delta(1.0))
    retry = connect(servers, partition_id=0, attempt=1)
    retry.join()
    with pytest.raises(FencedError, match="replaced by attempt 1") as info:
        zombie.push(delta(100.0))
    assert "server 127.0.0.1:" in str(info.value)
    assert isinstance(info.value, PermissionError)
    with pytest.raises(FencedError):
        zombie.join()
    retry.push(delta(2.0))
    pulled = driver.pull(["W", "b"])
    assert (pulled["W"] == 3.0).all() and (pulled["b"] == 3.0).all()  # never the 100
    per_server = driver.stats_per_server()
    assert [s['refused{reason="fenced"}'] for s in per_server] == [2, 2]  # push and join
    total = driver.stats()
    assert total["members"] == 1 and total["workers_retried"] == 1  # not summed
    assert [s["workers_fenced"] for s in per_server] == [1, 1]  # one attempt, counted once
    assert total["workers_fenced"] == 1
    assert total['refused{reason="fenced"}'] == 4  # per-server work: summed
    retry.leave()
    assert driver.stats()["members"] == 0
    for c in (zombie, retry, driver):
        c.close()


def test_sync_round_closes_on_both_servers(servers, tmp_path):
    driver = driver_with_model(servers)
    driver.configure("sync", heartbeat_timeout=5.0, wait_timeout=20.0)
    assert [s["mode"] for s in driver.stats_per_server()] == [1, 1]
    workers = [connect(servers, partition_id=p, heartbeat_interval=0.05) for p in (0, 1)]
    for w in workers:  # as a task does: the first registration wins, values kept
        assert w.register({"W": np.ones(W, np.float32), "b": np.ones(5, np.float32)}) == {
            "W": False,
            "b": False,
        }
    dump = tmp_path / "stack-0.txt"
    dump.write_text('Thread 0x1 (most recent call first):\n  File "train.py", line 7\n')
    workers[0].set_dump_file(dump)
    assert [w.join() for w in workers] == [0, 0]
    assert all(w.connected for w in workers)
    results = {}

    def work(p, w):
        w.push(delta(2 * p + 1.0))  # 1 and 3: the round's average is 2
        results[p] = w.pull(["W", "b"])

    threads = [threading.Thread(target=work, args=(p, w)) for p, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == [0, 1]
    for got in results.values():
        assert (got["W"] == 2.0).all() and (got["b"] == 2.0).all()

    workers[1].report_progress(7, 70, 0.25)
    key = '{partition="1",attempt="0"}'
    wait_for(lambda: driver.stats()["worker_steps" + key] == 7)
    wait_for(lambda: driver.reports()[0]["text"] != "")
    reports = driver.reports()
    assert [(r["partition"], r["attempt"], r["clock"]) for r in reports] == [(0, 0, 1), (1, 0, 1)]
    assert "train.py" in reports[0]["text"] and reports[1]["report_age_s"] is None
    assert reports[1]["steps"] == 7

    per_server = driver.stats_per_server()
    total = driver.stats()
    assert [s["members"] for s in per_server] == [2, 2]
    assert total["members"] == 2  # every worker is a member of both servers
    assert total["worker_clock" + key] == 1 and total["worker_steps" + key] == 7
    assert total["worker_loss_f64" + key] == 0.25
    assert total["sync_round"] == 1 and total["mode"] == 1
    assert total["pushes"] == sum(s["pushes"] for s in per_server) == 4
    assert total["version"] == sum(s["version"] for s in per_server) == 2

    for w in workers:
        w.leave()
        w.close()
    assert driver.stats()["members"] == 0 and driver.reports() == []
    assert not workers[0].connected


def test_set_optimizer_reaches_every_chunk(servers):
    driver = driver_with_model(servers)
    assert driver.set_optimizer("sgd", learning_rate=0.5, variables=["W"]) == 0
    driver.push({"W": np.ones(W, np.float32)}, kind="gradient")
    assert (driver.pull(["W"])["W"] == -0.5).all()
    with pytest.raises(TensorSparkValueError, match="learning_rate"):
        driver.push({"b": np.ones(5, np.float32)}, kind="gradient")  # b has no optimizer
    with pytest.raises(VariableNotFoundError, match="'nope'"):
        driver.set_optimizer("sgd", learning_rate=0.5, variables=["W", "nope"])
    with pytest.raises(TensorSparkValueError, match="not one string"):
        driver.set_optimizer("sgd", learning_rate=0.5, variables="W")
    with pytest.raises(TensorSparkValueError, match="takes no hyperparameter"):
        driver.set_optimizer("sgd", learning_rate=0.5, momentum=0.9)
    driver.set_optimizer("momentum", learning_rate=0.5, momentum=0.0)  # every variable
    driver.push({"b": np.ones(5, np.float32)}, kind="gradient")
    assert (driver.pull(["b"])["b"] == -0.5).all()
    driver.close()


def test_bad_heartbeat_interval_is_refused(servers):
    with pytest.raises(TensorSparkValueError, match="heartbeat_interval"):
        connect(servers, heartbeat_interval=-1.0)
