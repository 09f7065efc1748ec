"""Membership and consistency modes through the Python binding (threads as workers)."""

from __future__ import annotations

import faulthandler
import math
import threading
import time
import urllib.request

import numpy as np
import pytest

from tensorspark import (
    FencedError,
    ParameterServer,
    PSClient,
    PSTimeoutError,
    ShardedPSClient,
    TensorSparkError,
    TensorSparkValueError,
    generate_secret,
)


@pytest.fixture
def server():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1", metrics_port=0) as s:
        s.secret = secret
        yield s


def connect(server, **kw) -> PSClient:
    return PSClient("127.0.0.1", server.port, server.secret, io_timeout=10.0, **kw)


def start_run(server, mode, staleness=0, **kw):
    driver = connect(server)
    driver.register({"w": np.zeros(2, np.float32)})
    driver.configure(mode, staleness, **kw)
    return driver


def test_sync_round_applies_the_average(server):
    driver = start_run(server, "sync")
    workers = [connect(server, partition_id=p) for p in range(3)]
    assert [w.join() for w in workers] == [0, 0, 0]
    results = {}

    def work(p, w):
        w.push({"w": np.full(2, p + 1, np.float32)}, kind="delta")
        results[p] = w.pull(["w"])["w"].tolist()

    threads = [threading.Thread(target=work, args=(p, w)) for p, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {0: [2.0, 2.0], 1: [2.0, 2.0], 2: [2.0, 2.0]}
    assert server.version == 1
    assert driver.pull(["w"])["w"].tolist() == [2.0, 2.0]
    stats = server.stats()
    assert stats["members"] == 3
    assert stats['worker_clock{partition="2",attempt="0"}'] == 1
    for w in workers:
        w.leave()
        w.close()
    assert server.stats()["members"] == 0


def test_ssp_blocks_the_fast_worker_until_the_slow_one_catches_up(server):
    start_run(server, "ssp", 1)
    fast = connect(server, partition_id=0)
    slow = connect(server, partition_id=1)
    fast.join()
    slow.join()
    one = {"w": np.ones(2, np.float32)}
    fast.push(one)
    fast.push(one)  # clock 2: pulls need every clock >= 1
    done = threading.Event()

    def pull():
        fast.pull(["w"])
        done.set()

    t = threading.Thread(target=pull)
    t.start()
    assert not done.wait(0.3)
    slow.push(one)
    assert done.wait(5)
    t.join()
    # Clock 3 needs the slow worker at 2; when it leaves, nobody is waited for.
    fast.push(one)
    done.clear()
    t = threading.Thread(target=pull)
    t.start()
    assert not done.wait(0.2)
    slow.leave()
    assert done.wait(5)
    t.join()


def test_wait_timeout_names_the_missing_partitions(server):
    start_run(server, "sync", wait_timeout=0.3)
    a = connect(server, partition_id=0)
    b = connect(server, partition_id=1)
    a.join()
    b.join()
    a.push({"w": np.ones(2, np.float32)})
    with pytest.raises(PSTimeoutError, match="waiting for partitions 1"):
        a.pull(["w"])


def test_newer_attempt_fences_the_older_one(server):
    start_run(server, "async")
    old = connect(server, partition_id=4, attempt=0)
    new = connect(server, partition_id=4, attempt=1)
    old.join()
    new.join()
    with pytest.raises(FencedError, match="replaced by attempt 1") as info:
        old.push({"w": np.ones(2, np.float32)})
    assert isinstance(info.value, TensorSparkError)
    assert isinstance(info.value, PermissionError)
    new.push({"w": np.ones(2, np.float32)})
    assert server.stats()['refused{reason="fenced"}'] == 1


def test_heartbeat_thread_keeps_a_quiet_worker_live(server):
    start_run(server, "sync", heartbeat_timeout=0.5)
    quiet = connect(server, partition_id=0, heartbeat_interval=0.1)
    silent = connect(server, partition_id=1)
    quiet.join()
    silent.join()
    quiet.heartbeat()
    time.sleep(1.0)
    stats = server.stats()
    assert stats["members"] == 1
    assert 'worker_clock{partition="0",attempt="0"}' in stats
    quiet.leave()


def test_metrics_endpoint_serves_the_counters(server):
    start_run(server, "async")
    w = connect(server, partition_id=0)
    w.join()
    w.pull(["w"])
    w.push({"w": np.ones(2, np.float32)})
    assert server.metrics_port and server.metrics_port > 0
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        page = r.read().decode()
    assert 'tensorspark_worker_clock{partition="0",attempt="0"} 1' in page
    assert 'tensorspark_staleness_bucket{le="0"} 1' in page
    assert "tensorspark_members 1" in page


def test_progress_reports_show_in_stats_as_floats(server):
    driver = start_run(server, "async")
    w = connect(server, partition_id=0, heartbeat_interval=0.05)
    quiet = connect(server, partition_id=1)
    w.join()
    quiet.join()
    w.report_progress(12, np.int64(384), 0.25)  # carried by the heartbeat thread
    labels = '{partition="0",attempt="0"}'
    deadline = time.monotonic() + 5
    while server.stats()["worker_steps" + labels] != 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    for stats in (server.stats(), driver.stats()):
        assert stats["worker_steps" + labels] == 12
        assert stats["worker_samples" + labels] == 384
        loss = stats["worker_loss_f64" + labels]
        assert isinstance(loss, float) and loss == 0.25
        assert isinstance(stats["worker_progress_age_ms" + labels], int)
        assert isinstance(stats["version"], int)
        # Never reported: counts 0, loss NaN.
        assert stats['worker_steps{partition="1",attempt="0"}'] == 0
        assert math.isnan(stats['worker_loss_f64{partition="1",attempt="0"}'])
    quiet.report_progress(1, 32, float("nan"))
    quiet.heartbeat()
    assert math.isnan(driver.stats()['worker_loss_f64{partition="1",attempt="0"}'])
    assert driver.stats()['worker_steps{partition="1",attempt="0"}'] == 1
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        page = r.read().decode()
    assert f"tensorspark_worker_loss_f64{labels} 0.25\n" in page
    assert 'tensorspark_worker_loss_f64{partition="1",attempt="0"} NaN\n' in page
    assert f"tensorspark_worker_samples{labels} 384\n" in page
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(TensorSparkValueError, match="steps"):
            w.report_progress(bad, 0, 0.0)
        with pytest.raises(TensorSparkValueError, match="samples"):
            w.report_progress(0, bad, 0.0)
    with pytest.raises(TensorSparkValueError, match="loss"):
        w.report_progress(0, 0, "high")
    w.leave()
    quiet.leave()


def test_faulthandler_dump_reaches_the_driver(server, tmp_path):
    driver = start_run(server, "async")
    w = connect(server, partition_id=3, heartbeat_interval=0.05)
    quiet = connect(server, partition_id=4)
    dump_path = tmp_path / "stack-3.txt"
    w.set_dump_file(dump_path)  # not there yet: skipped until it is
    w.join()
    quiet.join()
    with open(dump_path, "w") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        by_partition = {r["partition"]: r for r in driver.reports()}
        if by_partition[3]["text"]:
            break
        time.sleep(0.02)
    report = by_partition[3]
    assert "File" in report["text"]
    assert "test_faulthandler_dump_reaches_the_driver" in report["text"]
    assert report["attempt"] == 0 and report["clock"] == 0 and report["steps"] == 0
    assert isinstance(report["progress_age_s"], float) and report["progress_age_s"] >= 0
    assert 0 <= report["report_age_s"] < 5
    assert by_partition[4]["report_age_s"] is None and by_partition[4]["text"] == ""
    # report() sends now; bad text and paths are refused before any I/O.
    quiet.report('Thread 0x1 (most recent call first):\n  File "q.py", line 1 \u2192 f')
    by_partition = {r["partition"]: r for r in w.reports()}
    assert by_partition[4]["text"].endswith("\u2192 f")
    with pytest.raises(TensorSparkValueError, match="text"):
        w.report(b"bytes")
    with pytest.raises(TensorSparkValueError, match="path"):
        w.set_dump_file(3)
    assert driver.reports()[0]["partition"] == 3
    w.leave()
    quiet.leave()
    assert driver.reports() == []


def test_sharded_stats_keep_floats_unsummed(server):
    with ParameterServer(server.secret, host="127.0.0.1") as other:
        workers = []
        for s, loss in ((server, 0.5), (other, 0.75)):
            w = PSClient("127.0.0.1", s.port, server.secret, partition_id=0)
            w.join()
            w.report_progress(3, 96, loss)
            w.heartbeat()
            workers.append(w)
        addresses = [("127.0.0.1", server.port), ("127.0.0.1", other.port)]
        with ShardedPSClient(addresses, server.secret) as c:
            per_server = c.stats_per_server()
            total = c.stats()
        key = '{partition="0",attempt="0"}'
        assert [d["worker_loss_f64" + key] for d in per_server] == [0.5, 0.75]
        assert total["worker_loss_f64" + key] == 0.5  # the first server's, not a sum
        assert total["worker_steps" + key] == 3  # per member: the first server's
        for w in workers:
            w.close()


def test_bad_values_are_refused(server):
    c = connect(server)
    with pytest.raises(TensorSparkValueError, match="mode"):
        c.configure("bsp")
    with pytest.raises(TensorSparkValueError, match="staleness"):
        c.configure("ssp", -1)
    with pytest.raises(TensorSparkValueError, match="wait_timeout"):
        c.configure("sync", wait_timeout=0)
    with pytest.raises(TensorSparkValueError, match="partition"):
        c.join()  # the driver is not a worker
    with pytest.raises(TensorSparkValueError, match="metrics_port"):
        ParameterServer(server.secret, host="127.0.0.1", metrics_port=70000)
    with pytest.raises(TensorSparkValueError, match="heartbeat_interval"):
        connect(server, partition_id=0, heartbeat_interval=-1)
    with ParameterServer(server.secret, host="127.0.0.1") as off:
        assert off.metrics_port is None
