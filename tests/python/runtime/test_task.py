"""The shared task loop with a small fake replica against real parameter servers (no Spark)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import FencedError, ParameterServer, PSClient, ShardedPSClient, generate_secret
from tensorspark.errors import TensorSparkValueError
from tensorspark.runtime import task, updates


class Counting:
    """``w += column sum`` per step; the loss is the step's row count (or NaN)."""

    def __init__(self, nan_at: int | None = None, barrier: threading.Barrier | None = None) -> None:
        self.barrier = barrier
        self.w = np.zeros(2, np.float32)
        self.sums = np.zeros(2, np.float32)
        self.grads = np.zeros(2, np.float32)
        self.nan_at, self.steps = nan_at, 0
        self.loss_sum = self.loss_count = 0.0

    def begin(self, cfg):
        self.loss_sum = self.loss_count = 0.0

    def train(self, batches):
        if self.barrier is not None:  # both tasks have joined before either pushes
            self.barrier.wait(10)
            self.barrier = None
        for (x,) in batches:
            self.steps += 1
            self.w += x.sum(axis=0)
            self.sums += self.w
            self.grads += x.mean(axis=0)
            loss = np.nan if self.steps == self.nan_at else 1.0
            self.loss_sum += loss * len(x)
            self.loss_count += len(x)

    def read(self):
        return [self.w.copy()]

    def load(self, values):
        self.w = np.array(values[0], np.float32)

    def iterate_means(self, steps):
        out, self.sums = self.sums / steps, np.zeros(2, np.float32)
        return [out]

    def gradient_means(self, steps):
        out, self.grads = self.grads / steps, np.zeros(2, np.float32)
        return [out]

    def loss_totals(self):
        return self.loss_sum, self.loss_count

    def metrics(self):
        return {}

    def extra_result(self):
        return {"fake": True}


def config(port: int, secret: bytes, rule, servers=(), **over) -> task.TaskConfig:
    base = dict(
        host="127.0.0.1",
        port=port,
        servers=tuple(servers),
        secret=secret,
        run_id="r",
        epoch=0,
        names=("w",),
        batch_size=4,
        buffer_batches=2,
        shuffle=False,
        seed=0,
        sync_interval=3,
        steps_per_call=2,
        rule=rule,
        threads=1,
        connect_timeout=5.0,
        io_timeout=20.0,
        heartbeat_interval=0.2,
        hang_timeout=None,
    )
    return task.TaskConfig(**{**base, **over})


def ones(rows: int):
    return [(np.ones((rows, 2), np.float32),)]


@pytest.fixture
def server():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as s:
        driver = PSClient("127.0.0.1", s.port, secret)
        driver.register({"w": np.zeros(2, np.float32)})
        yield s, driver, secret
        driver.close()


def test_delta_loop_pushes_every_row_once(server):
    s, driver, secret = server
    result = task.train(config(s.port, secret, updates.Delta()), Counting(), ones(30))
    # 30 rows in batches of 4: 8 steps (the last has 2 rows), syncs at 3, 6 and the end.
    assert (result["steps"], result["samples"], result["pushes"]) == (8, 30, 3)
    assert result["version"] == 3 and result["loss"] == 1.0 and result["fake"]
    assert result["attempt"] == 0 and result["rows_buffered_max"] <= 30
    np.testing.assert_array_equal(driver.pull(["w"])["w"], [30.0, 30.0])
    assert driver.stats()["members"] == 0  # the task left


def test_parameter_mean_pushes_the_iterate_average(server):
    s, driver, secret = server
    rule = updates.ParameterMean(window=1, average_iterates=True)
    task.train(config(s.port, secret, rule, sync_interval=4), Counting(), ones(16))
    # Iterates 4, 8, 12, 16: their mean 10 replaces the model (window 1).
    np.testing.assert_array_equal(driver.pull(["w"])["w"], [10.0, 10.0])


def test_elastic_keeps_the_worker_between_its_model_and_the_centre(server):
    s, driver, secret = server
    task.train(config(s.port, secret, updates.Elastic(0.5), sync_interval=2), Counting(), ones(16))
    # As in the TF1 test: centre 0 -> 4 (x 8 -> 4) -> 8 (x 12 -> 8).
    np.testing.assert_array_equal(driver.pull(["w"])["w"], [8.0, 8.0])


def test_gradient_rule_lets_the_server_apply_sgd(server):
    s, driver, secret = server
    driver.set_optimizer("sgd", learning_rate=0.5)
    task.train(config(s.port, secret, updates.Gradient(), sync_interval=4), Counting(), ones(16))
    # One push of the mean gradient (1, 1): w = 0 - 0.5.
    np.testing.assert_array_equal(driver.pull(["w"])["w"], [-0.5, -0.5])


def test_nan_loss_is_never_pushed(server):
    s, driver, secret = server
    cfg = config(s.port, secret, updates.Delta())
    with pytest.raises(TensorSparkValueError, match=r"loss became NaN.*\(version 1\)"):
        task.train(cfg, Counting(nan_at=5), ones(40))
    assert driver.stats()["version"] == 1  # the first sync only
    np.testing.assert_array_equal(driver.pull(["w"])["w"], [12.0, 12.0])


def test_sync_rounds_average_two_tasks(server):
    s, driver, secret = server
    driver.configure("sync", 0, heartbeat_timeout=10.0, wait_timeout=20.0)
    cfg = config(s.port, secret, updates.Delta(), sync_interval=2)
    results = {}
    barrier = threading.Barrier(2)

    def run(p):
        results[p] = task.train(cfg, Counting(barrier=barrier), ones(16), identity=(p, 0, p + 1))

    threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Each of 2 rounds adds the mean delta (+8): averaged, not summed (which is 32).
    assert sorted(results) == [0, 1] and results[0]["pushes"] == 2
    np.testing.assert_array_equal(driver.pull(["w"])["w"], [16.0, 16.0])


def test_zombie_attempt_is_fenced_on_every_shard(tmp_path):
    first, port0, secret = start_ps(tmp_path)
    second, port1, _ = start_ps(tmp_path, secret=secret)
    try:
        addresses = [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]
        driver = ShardedPSClient(addresses, secret)
        driver.register({"w": np.zeros(2, np.float32)})
        servers = [("127.0.0.1", port0), ("127.0.0.1", port1)]
        cfg = config(0, secret, updates.Delta(), servers=servers)
        newer = task.train(cfg, Counting(), ones(12), identity=(0, 1, 9))
        assert newer["pushes"] == 1
        with pytest.raises(FencedError, match="replaced by attempt 9"):
            task.train(cfg, Counting(), ones(12), identity=(0, 0, 5))
        np.testing.assert_array_equal(driver.pull(["w"])["w"], [12.0, 12.0])
        driver.close()
    finally:
        for p in (first, second):
            p.terminate()
            p.wait(timeout=10)
