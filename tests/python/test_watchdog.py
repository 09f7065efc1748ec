"""The hang watchdog: a deliberately stuck worker is named, with its stack dump."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from tensorspark import PSTimeoutError, SparkSession

pytestmark = pytest.mark.slow


def stall_partition_zero(index, rows):
    """Partition 0 stops in the middle of its rows; the others run through."""
    for k, row in enumerate(rows):
        if index == 0 and k == 300:
            time.sleep(3600)
        yield row


def _expect_hang(capfd, run, timeout: float) -> None:
    started = time.monotonic()
    with pytest.raises(PSTimeoutError, match=r"training hung: .*stuck workers: partition 0 "):
        run()
    assert time.monotonic() - started < timeout + 90
    err = capfd.readouterr().err
    assert re.search(r"--- partition 0 \(attempt \d+\): clock", err)
    assert "in stall_partition_zero" in err  # the stuck frame, from faulthandler


def test_keras_fit_names_the_stuck_worker(sc, capfd):
    from test_keras import DIM, _build, _data

    from tensorspark.keras import fit

    x, y = _data(1200)
    rdd = sc.parallelize([(x[i], y[i]) for i in range(len(x))], 2).mapPartitionsWithIndex(
        stall_partition_zero
    )
    model = _build()
    _expect_hang(
        capfd,
        lambda: fit(
            model, rdd, epochs=1, batch_size=20, sync_interval=2, hang_timeout=8, progress=False
        ),
        8,
    )
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert model.input_shape == (None, DIM)


def _seed_session_hangs(sc, tf1, capfd, **session_kwargs) -> None:
    x = tf1.placeholder(tf1.float32, [None, 2], name="x")
    v = tf1.Variable(tf1.zeros([2]), name="v")
    train = tf1.assign_add(v, tf1.reduce_sum(x, axis=0))
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    rdd = sc.parallelize([(np.ones(2, np.float32),) for _ in range(1000)], 2)
    with SparkSession(sc, sess, sync_interval=5, batch_size=10, **session_kwargs) as ss:
        _expect_hang(
            capfd,
            lambda: ss.run(
                train,
                feed_rdd=rdd.mapPartitionsWithIndex(stall_partition_zero),
                feed_name_list=[x.name],
                hang_timeout=8,
            ),
            8,
        )
        assert ss.stats()["version"] > 0  # what was trained is still on the server


def test_seed_session_names_the_stuck_worker(sc, tf1, capfd):
    _seed_session_hangs(sc, tf1, capfd)


def test_watchdog_over_several_servers_names_the_stuck_worker(sc, tf1, capfd, tmp_path):
    from helpers import start_ps

    first, port0, secret = start_ps(tmp_path)
    second, port1, _ = start_ps(tmp_path, secret=secret)
    try:
        servers = [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]
        _seed_session_hangs(sc, tf1, capfd, servers=servers, secret=secret)
    finally:
        for p in (first, second):
            p.terminate()
            p.wait(timeout=10)
