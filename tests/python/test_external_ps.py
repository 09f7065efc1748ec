"""Training on Spark through separately started `tensorspark-ps` processes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import DeltaCombiner, PSClient, ShardedPSClient, SparkSession


@pytest.fixture
def ps_processes(tmp_path):
    procs = []

    def start(count: int):
        first = start_ps(tmp_path)
        procs.append(first[0])
        started = [first]
        for _ in range(count - 1):
            started.append(start_ps(tmp_path, secret=first[2]))
            procs.append(started[-1][0])
        return [(p, port) for p, port, _ in started], first[2]

    yield start
    for p in procs:
        p.terminate()
        assert p.wait(timeout=10) == 0  # clean shutdown on SIGTERM


def adding_graph(tf, size):
    """Each step adds the batch's row count to every element of `v` (and `b`)."""
    x = tf.placeholder(tf.float32, [None, 1], name="x")
    v = tf.Variable(tf.zeros([size]), name="v")
    b = tf.Variable(tf.zeros([3]), name="b")
    rows = tf.reduce_sum(x)
    train = tf.group(tf.assign_add(v, tf.fill([size], rows)), tf.assign_add(b, tf.fill([3], rows)))
    return x, v, b, train


def rows_rdd(sc, n, parts):
    return sc.parallelize([(np.ones(1, np.float32),) for _ in range(n)], parts)


def test_train_through_external_ps(sc, tf1, ps_processes):
    [(proc, port)], secret = ps_processes(1)
    x, v, b, train = adding_graph(tf1, 10)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(
        sc,
        sess,
        server_host="127.0.0.1",
        server_port=port,
        start_server=False,
        secret=secret,
        sync_interval=2,
        batch_size=5,
    ) as ss:
        summary = ss.run(
            train,
            feed_rdd=rows_rdd(sc, 40, 2),
            feed_name_list=[x.name],
            weight_combiner=DeltaCombiner(),
        )
        np.testing.assert_array_equal(sess.run(v), np.full(10, 40.0))
    # The process holds the model after the session is gone.
    with PSClient("127.0.0.1", port, secret) as c:
        assert c.stats()["version"] == summary.version == 4  # 4 steps/partition, sync every 2
        np.testing.assert_array_equal(c.pull(["b"])["b"], np.full(3, 40.0))


def test_train_through_two_external_ps(sc, tf1, ps_processes):
    servers, secret = ps_processes(2)
    addresses = [f"127.0.0.1:{port}" for _, port in servers]
    size = 1_500_000  # 6 MB: two 4 MB chunks, one on each server
    x, v, b, train = adding_graph(tf1, size)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(
        sc, sess, servers=addresses, secret=secret, sync_interval=3, batch_size=4
    ) as ss:
        ss.run(
            train,
            feed_rdd=rows_rdd(sc, 24, 2),
            feed_name_list=[x.name],
            weight_combiner=DeltaCombiner(),
        )
        got = sess.run(v)
        assert got.shape == (size,) and (got == 24.0).all()
        np.testing.assert_array_equal(sess.run(b), np.full(3, 24.0))
    with ShardedPSClient(addresses, secret) as c:
        per_server = c.stats_per_server()
    # Both servers hold part of the model and took part in every push.
    assert all(s["variables"] >= 1 and s["pushes"] == 2 for s in per_server), per_server
    assert sum(s["parameters"] for s in per_server) == size + 3
