"""SparkSession on real Spark local[2] with real TensorFlow."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from helpers import free_port

import tensorspark
from tensorspark import (
    AddressInUseError,
    AuthenticationError,
    DeltaCombiner,
    ElasticCombiner,
    MeanCombiner,
    ParameterServer,
    PSConnectionError,
    SparkSession,
    TensorSparkValueError,
    generate_secret,
)


def counting_graph(tf):
    """A graph whose train op adds the batch's row count to `v`.

    Each pushed delta equals the rows seen since the last pull, so the final
    value is exactly the number of rows if, and only if, every push was
    applied.
    """
    x = tf.placeholder(tf.float32, [None, 2], name="x")
    v = tf.Variable(tf.zeros([2]), name="v")
    train = tf.assign_add(v, tf.reduce_sum(x, axis=0), name="train")
    return x, v, train


def ones_rdd(sc, rows, parts):
    return sc.parallelize([(np.ones(2, np.float32),) for _ in range(rows)], parts)


def train_counting(sc, tf1, rows, parts, sync_interval, batch_size=10, **run_kwargs):
    """Train the counting graph in a fresh session; returns (summary, model v)."""
    x, v, train = counting_graph(tf1)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(sc, sess, sync_interval=sync_interval, batch_size=batch_size) as ss:
        summary = ss.run(
            train, feed_rdd=ones_rdd(sc, rows, parts), feed_name_list=[x.name], **run_kwargs
        )
        assert ss.stats()["members"] == 0  # every task left at the end
    return summary, sess.run(v)


def test_every_push_from_two_workers_is_applied(sc, tf1, spark_tmp_dir):
    x, v, train = counting_graph(tf1)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(sc, sess, user="t", name="count", sync_interval=1, batch_size=7) as ss:
        rdd = ones_rdd(sc, 200, 2)
        summary = ss.run(
            train,
            feed_rdd=rdd,
            feed_name_list=[x.name],
            param_list=[v],
            weight_combiner=DeltaCombiner(),
        )
        # 100 rows per partition, batches of 7 -> 15 steps, a push each.
        assert [p["pushes"] for p in summary.partitions] == [15, 15]
        assert summary.steps == 30 and summary.samples == 200
        assert summary.version == 30 == ss.stats()["version"]
        np.testing.assert_array_equal(sess.run(v), [200.0, 200.0])

        # A second run (epoch) reuses the server and continues from its model.
        port = ss.server_port
        summary = ss.run(
            train,
            feed_rdd=rdd,
            feed_name_list=[x.name],
            param_list=[v],
            weight_combiner=DeltaCombiner(),
        )
        assert ss.server_port == port and summary.version == 60
        np.testing.assert_array_equal(sess.run(v), [400.0, 400.0])

    # spark.tmp.dir receives the exported graph and the trained parameters.
    run_dir = spark_tmp_dir / "tensorspark" / "t" / "count"
    assert (run_dir / "graph.meta").stat().st_size > 0
    np.testing.assert_array_equal(np.load(run_dir / "params.npz")["v"], [400.0, 400.0])


def test_mean_combiner_and_sync_interval(sc, tf1):
    summary, final = train_counting(
        sc, tf1, 80, 2, sync_interval=4, weight_combiner=MeanCombiner(average_iterates=False)
    )
    # 40 rows per partition = 4 steps = 1 push each (the final sync).
    assert [p["pushes"] for p in summary.partitions] == [1, 1]
    assert summary.version == 2
    # Both pull 0 first: (0+40)/2=20, (20+40)/2=30; or the second pulls
    # the first's 20: (20+60)/2=40.
    assert final[0] == final[1] and final[0] in (30.0, 40.0)


def test_mean_combiner_pushes_iterate_average(sc, tf1):
    _, final = train_counting(sc, tf1, 80, 2, sync_interval=4)  # default combiner
    # A worker's iterates are p+10, p+20, p+30, p+40: it pushes p+25.
    # Both pull 0: 12.5 then (12.5+25)/2 = 18.75; or the second pulls
    # 12.5 and pushes 37.5: (12.5+37.5)/2 = 25.
    assert final[0] == final[1] and final[0] in (18.75, 25.0)


def test_elastic_averaging(sc, tf1):
    _, final = train_counting(
        sc, tf1, 40, 1, sync_interval=2, weight_combiner=ElasticCombiner(alpha=0.5)
    )
    # One worker, centre c = 0: after 2 steps x = 20, e = 0.5 (20 - 0) = 10,
    # c = 10, x = 10; after 2 more x = 30, e = 0.5 (30 - 10) = 10, c = 20.
    np.testing.assert_array_equal(final, [20.0, 20.0])
    with pytest.raises(ValueError, match="alpha"):
        ElasticCombiner(alpha=1.5)


def test_seed_program_reaches_accuracy(sc, tf1):
    """The seed example, 2 partitions, on the Debian Fashion-MNIST files."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_mnist_seed.py")
    spec = importlib.util.spec_from_file_location("fashion_mnist_seed", path)
    example = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(example)  # runs the seed's tf.disable_v2_behavior()
        acc = example.train(
            sc=sc,
            user="test",
            name="seed",
            server_host=None,
            server_port=0,
            sync_interval=100,
            batch_size=100,
            num_partition=2,
            num_epoch=2,
        )
    finally:
        # Process-wide (tensor equality, TensorShape, control flow, resource
        # variables): the later Keras tests in this process need them back.
        # (Eager execution cannot be re-enabled, and was never turned off:
        # the process was already executing eagerly.)
        tf1.enable_tensor_equality()
        tf1.enable_v2_tensorshape()
        tf1.enable_control_flow_v2()
        tf1.enable_resource_variables()
    assert acc >= 0.80


class TestBadInput:
    """Each mistake gives a clear exception quickly, never a hang."""

    @pytest.fixture
    def setup(self, sc, tf1):
        x, v, train = counting_graph(tf1)
        y = tf1.identity(v, name="not_a_variable")
        sess = tf1.Session()
        sess.run(tf1.global_variables_initializer())
        ss = SparkSession(sc, sess, sync_interval=2, batch_size=5)
        yield sc, sess, ss, x, v, y, train
        ss.close()

    def test_feed_name_not_in_graph(self, setup):
        sc, _, ss, x, v, _, train = setup
        with pytest.raises(TensorSparkValueError, match="nothere:0"):
            ss.run(train, feed_rdd=ones_rdd(sc, 10, 2), feed_name_list=["nothere:0"])

    def test_feed_name_without_index_gets_hint(self, setup):
        sc, _, ss, x, v, _, train = setup
        with pytest.raises(TensorSparkValueError, match="'x:0'"):
            ss.run(train, feed_rdd=ones_rdd(sc, 10, 2), feed_name_list=["x"])

    def test_param_not_a_variable(self, setup):
        sc, _, ss, x, v, y, train = setup
        with pytest.raises(TensorSparkValueError, match="param_list\\[1\\].*not_a_variable"):
            ss.run(train, feed_rdd=ones_rdd(sc, 10, 2), feed_name_list=[x.name], param_list=[v, y])

    def test_feed_tuple_wrong_length_then_state_intact(self, setup):
        sc, sess, ss, x, v, _, train = setup
        good = ones_rdd(sc, 20, 2)
        ss.run(train, feed_rdd=good, feed_name_list=[x.name], param_list=[v])
        trained = sess.run(v).copy()
        version = ss.stats()["version"]
        bad = sc.parallelize([(np.ones(2), np.ones(2)) for _ in range(10)], 2)
        started = time.monotonic()
        with pytest.raises(TensorSparkValueError, match="has 2 items but feed_name_list has 1"):
            ss.run(train, feed_rdd=bad, feed_name_list=[x.name], param_list=[v])
        assert time.monotonic() - started < 120
        # Nothing already trained is lost: the server and the session agree.
        assert ss.stats()["version"] == version
        np.testing.assert_array_equal(ss._run.client.pull(["v"])["v"], trained)

    def test_wrong_feature_length(self, setup):
        sc, _, ss, x, v, _, train = setup
        bad = sc.parallelize([(np.ones(3),) for _ in range(10)], 2)
        with pytest.raises(TensorSparkValueError, match="shape"):
            ss.run(train, feed_rdd=bad, feed_name_list=[x.name], param_list=[v])


def test_server_port_already_taken(sc, tf1):
    sess = tf1.Session()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(AddressInUseError, match=str(port)):
            SparkSession(sc, sess, server_host="127.0.0.1", server_port=port)


def test_unreachable_server(sc, tf1):
    sess = tf1.Session()
    started = time.monotonic()
    with pytest.raises((PSConnectionError, TimeoutError)):
        SparkSession(
            sc,
            sess,
            server_host="127.0.0.1",
            server_port=free_port(),
            start_server=False,
            secret=generate_secret(),
            connect_timeout=1.5,
        )
    assert time.monotonic() - started < 10


def test_wrong_secret(sc, tf1):
    sess = tf1.Session()
    server = ParameterServer(generate_secret(), host="127.0.0.1")
    with server, pytest.raises(AuthenticationError):
        SparkSession(
            sc,
            sess,
            server_host="127.0.0.1",
            server_port=server.port,
            start_server=False,
            secret=generate_secret(),
        )


def test_external_server(sc, tf1):
    """Training against a server that the session did not start, over TLS.

    The server refuses plain connections, so every task pinned the
    fingerprint the session was given.
    """
    x, v, train = counting_graph(tf1)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1", tls=True) as server:
        ss = SparkSession(
            sc,
            sess,
            server_host="127.0.0.1",
            server_port=server.port,
            start_server=False,
            secret=secret,
            tls=server.tls_fingerprint,
            sync_interval=3,
            batch_size=4,
        )
        ss.run(
            train,
            feed_rdd=ones_rdd(sc, 24, 2),
            feed_name_list=[x.name],
            weight_combiner=DeltaCombiner(),
        )
        assert server.version == 2  # 3 steps per partition: one sync, at step 3
        np.testing.assert_array_equal(sess.run(v), [24.0, 24.0])
        ss.close()
        assert server.running  # closing the session leaves an external server up


def test_seed_module_paths():
    import tensorspark.core.spark_session as sps
    import tensorspark.core.weight_combiner as comb

    assert sps.SparkSession is tensorspark.SparkSession
    assert comb.MeanWeightCombiner is tensorspark.MeanCombiner


def test_sync_rounds_average_the_workers(sc, tf1):
    summary, final = train_counting(
        sc, tf1, 80, 2, sync_interval=2, weight_combiner=DeltaCombiner(), consistency="sync"
    )
    # 4 steps per task, a round every 2; each push is +20. A round closes
    # when every *live* task has pushed, and the server adds the round's
    # mean (+20). Tasks that overlap share rounds (2 rounds in all); a
    # task that starts after the other finished has rounds of its own
    # (up to 4). Either way the model is 20 x rounds: averaged, where
    # async deltas would add up to 80 whatever the overlap.
    assert summary.version in (2, 3, 4)  # one version per round
    np.testing.assert_array_equal(final, [20.0 * summary.version] * 2)


def test_bounded_staleness_applies_every_push(sc, tf1):
    summary, final = train_counting(
        sc,
        tf1,
        80,
        2,
        sync_interval=2,
        weight_combiner=DeltaCombiner(),
        consistency="ssp",
        staleness=1,
    )
    assert summary.version == 4
    np.testing.assert_array_equal(final, [80.0, 80.0])
    with pytest.raises(TensorSparkValueError, match="mode"):
        train_counting(sc, tf1, 8, 2, sync_interval=2, consistency="bogus")


def test_trained_graph_exports_as_checkpoint_and_saved_model(sc, tf1, tmp_path):
    x, v, train = counting_graph(tf1)
    y = tf1.identity(v * 2.0, name="y")
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(sc, sess, sync_interval=3, batch_size=10) as ss:
        ss.run(
            train,
            feed_rdd=ones_rdd(sc, 40, 2),
            feed_name_list=[x.name],
            weight_combiner=DeltaCombiner(),
        )
        prefix = ss.save_checkpoint(str(tmp_path / "ckpt" / "model"))
        export = ss.export_saved_model(str(tmp_path / "saved"), {"x": x}, {"y": y})
        with pytest.raises(TensorSparkValueError, match="already exists"):
            ss.export_saved_model(export, {"x": x}, {"y": y})
    np.testing.assert_array_equal(sess.run(v), [40.0, 40.0])
    with tf1.Graph().as_default():
        restored = tf1.Session()
        tf1.train.import_meta_graph(prefix + ".meta").restore(restored, prefix)
        [saved_v] = [g for g in tf1.global_variables() if g.op.name == "v"]
        np.testing.assert_array_equal(restored.run(saved_v), [40.0, 40.0])
    with tf1.Graph().as_default():
        served = tf1.Session()
        tf1.saved_model.loader.load(served, ["serve"], export)
        np.testing.assert_array_equal(served.run("y:0"), [80.0, 80.0])
