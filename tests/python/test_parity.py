"""Feature parity of the two APIs on real Spark: API x mode x (one server | two tensorspark-ps).

Both APIs run the same driver-side run and task loop; each cell of the
matrix trains on real Spark ``local[2]`` and checks what the mode promises
on every server: all pushes applied (async, ssp), one averaged update per
round (sync), every task joined and left, nothing lost or fenced.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import DeltaCombiner, ShardedPSClient, SparkSession

pytestmark = pytest.mark.slow

MODES = {"async": 0, "sync": 1, "ssp": 2}
ROWS, PARTS, BATCH, SYNC = 40, 2, 5, 2  # 4 steps per task, a push every 2


@pytest.fixture(params=["one", "two"])
def servers(request, tmp_path):
    """None (the in-driver server) or two `tensorspark-ps` processes."""
    if request.param == "one":
        yield None
        return
    first, port0, secret = start_ps(tmp_path)
    second, port1, _ = start_ps(tmp_path, secret=secret)
    yield [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"], secret
    for p in (first, second):
        p.terminate()
        assert p.wait(timeout=10) == 0


def _server_kwargs(servers):
    return {} if servers is None else {"servers": servers[0], "secret": servers[1]}


def _check_servers(stats_per_server, mode):
    for s in stats_per_server:
        assert s["mode"] == MODES[mode]
        assert s["members"] == 0  # every task left
        assert s["workers_lost"] == 0 and s.get('refused{reason="fenced"}', 0) == 0


def _stats(servers, fallback):
    if servers is None:
        return [fallback]
    with ShardedPSClient(servers[0], servers[1]) as c:
        return c.stats_per_server()


@pytest.mark.parametrize("mode", list(MODES))
def test_tf1_session(sc, tf1, servers, mode):
    x = tf1.placeholder(tf1.float32, [None, 2], name="x")
    v = tf1.Variable(tf1.zeros([2]), name="v")
    train = tf1.assign_add(v, tf1.reduce_sum(x, axis=0))
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    rdd = sc.parallelize([(np.ones(2, np.float32),) for _ in range(ROWS)], PARTS)
    with SparkSession(
        sc, sess, sync_interval=SYNC, batch_size=BATCH, **_server_kwargs(servers)
    ) as ss:
        summary = ss.run(
            train,
            feed_rdd=rdd,
            feed_name_list=[x.name],
            weight_combiner=DeltaCombiner(),
            consistency=mode,
            staleness=1,
        )
        stats = _stats(servers, ss.stats())
    assert [p["pushes"] for p in summary.partitions] == [2, 2]
    assert all(p["attempt"] >= 0 and "staleness_max" in p for p in summary.partitions)
    final = sess.run(v)
    if mode == "sync":  # each round adds the mean delta (+10), whatever the overlap
        np.testing.assert_array_equal(final, [10.0 * (summary.version)] * 2)
    else:  # every push applied
        np.testing.assert_array_equal(final, [40.0, 40.0])
    _check_servers(stats, mode)


def build_model():
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("mode", list(MODES))
def test_keras_fit(sc, servers, mode):
    from tensorspark.keras import fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    rdd = sc.parallelize([(x[i], y[i]) for i in range(ROWS)], PARTS)
    before = build_model().get_weights()
    model, history = fit(
        build_model,
        rdd,
        batch_size=BATCH,
        sync_interval=SYNC,
        consistency=mode,
        staleness=1,
        progress=False,
        **_server_kwargs(servers),
    )
    workers = history.workers[0]
    assert [w["pushes"] for w in workers] == [2, 2]
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    if servers is not None:
        _check_servers(_stats(servers, None), mode)


def _counting(tf1):
    """``v += column sums``; ``loss`` is the batch's mean value (1.0 for rows of ones)."""
    x = tf1.placeholder(tf1.float32, [None, 2], name="x")
    v = tf1.Variable(tf1.zeros([2]), name="v")
    train = tf1.assign_add(v, tf1.reduce_sum(x, axis=0))
    loss = tf1.reduce_mean(x * tf1.ones_like(x), name="loss")
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    return x, v, train, loss, sess


def _ones(sc, rows=ROWS):
    return sc.parallelize([(np.ones(2, np.float32),) for _ in range(rows)], PARTS)


def test_tf1_snapshots_and_resume_like_fit(sc, tf1, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    x, v, train, _, sess = _counting(tf1)
    kw = dict(sync_interval=SYNC, batch_size=BATCH, checkpoint_dir=ckpt, progress=False)
    with SparkSession(sc, sess, **kw) as ss:
        assert ss.runs_done == 0
        for _ in range(2):
            ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], weight_combiner="delta")
    np.testing.assert_array_equal(sess.run(v), [80.0, 80.0])
    # A new driver (a new graph at zeros) resumes from the newest snapshot: 2 runs done.
    with tf1.Graph().as_default():
        x, v, train, _, sess = _counting(tf1)
        with SparkSession(sc, sess, resume_from=ckpt, **kw) as ss:
            assert ss.runs_done == 2
            ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], weight_combiner="delta")
        np.testing.assert_array_equal(sess.run(v), [120.0, 120.0])


def test_tf1_progress_tensorboard_loss_and_graph_reuse(sc, tf1, tmp_path, capfd):
    from test_keras import _tensorboard_tags

    x, v, train, loss, sess = _counting(tf1)
    with SparkSession(
        sc, sess, sync_interval=SYNC, batch_size=BATCH, log_dir=str(tmp_path), name="feat"
    ) as ss:
        first = ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], loss=loss)
        second = ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], loss=loss)
    assert first.loss == 1.0 and [p["loss"] for p in first.partitions] == [1.0, 1.0]
    # The graph is built once per Python worker: the second run's tasks reuse it.
    assert sum(p["replica_tasks"] for p in second.partitions) > len(second.partitions)
    err = capfd.readouterr().err
    assert "run #0: loss 1.0000" in err and "run #1: loss 1.0000" in err
    tags = _tensorboard_tags(tmp_path)
    assert {"epoch/loss", "epoch/samples_per_sec", "worker_0/staleness_mean"} <= tags


def test_nan_is_refused_the_same_way_in_both_apis(sc, tf1):
    from tensorspark import TensorSparkValueError

    x = tf1.placeholder(tf1.float32, [None, 2], name="x")
    v = tf1.Variable(tf1.zeros([2]), name="v")
    train = tf1.assign_add(v, tf1.reduce_sum(tf1.math.log(x - 1.0), axis=0))  # log(0): -inf
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(sc, sess, sync_interval=SYNC, batch_size=BATCH, progress=False) as ss:
        with pytest.raises(TensorSparkValueError, match="NaN or Inf .*keeps the last good model"):
            ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], weight_combiner="delta")
        assert ss.stats()["version"] == 0
    np.testing.assert_array_equal(sess.run(v), [0.0, 0.0])  # the last good model


def test_several_servers_snapshot_each_run_and_resume_from_a_common_set(sc, tf1, tmp_path):
    import glob

    from test_sharded_snapshots import Servers

    servers = Servers(tmp_path)
    kw = dict(sync_interval=SYNC, batch_size=BATCH, progress=False, name="shards")
    x, v, train, _, sess = _counting(tf1)
    addresses = servers.start()
    try:
        with SparkSession(sc, sess, servers=addresses, secret=servers.secret, **kw) as ss:
            for _ in range(2):  # each run ends with a tagged snapshot on both servers
                ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], weight_combiner="delta")
        np.testing.assert_array_equal(sess.run(v), [80.0, 80.0])
    finally:
        servers.crash()
    # One server lost its newest tagged snapshot: the newest common set is run 1's.
    second = sorted(glob.glob(str(servers.dirs[1] / "snapshot-*-tag-*.tsnap")))
    assert len(second) == 2
    for path in second[-1:]:
        os.remove(path)
    addresses = servers.start(resume=True)
    try:
        with tf1.Graph().as_default():
            x, v, train, _, sess = _counting(tf1)
            with SparkSession(
                sc, sess, servers=addresses, secret=servers.secret, resume_from="servers", **kw
            ) as ss:
                assert ss.runs_done == 1
                ss.run(train, feed_rdd=_ones(sc), feed_name_list=[x.name], weight_combiner="delta")
            np.testing.assert_array_equal(sess.run(v), [80.0, 80.0])  # 40 at run 1, + 40
    finally:
        servers.crash()


def test_keras_fit_resumes_several_servers_from_a_common_set(sc, tmp_path):
    import glob

    from test_sharded_snapshots import Servers

    from tensorspark.keras import fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    rdd = sc.parallelize([(x[i], np.int64(x[i, 0] > 0)) for i in range(ROWS)], PARTS)
    servers = Servers(tmp_path)
    kw = dict(batch_size=BATCH, sync_interval=SYNC, progress=False, name="kshards", epochs=3)
    try:
        model, history = fit(build_model, rdd, servers=servers.start(), secret=servers.secret, **kw)
        assert history.epoch == [0, 1, 2]
    finally:
        servers.crash()
    for d in servers.dirs[:1]:  # the first server lost epoch 3's snapshot
        os.remove(sorted(glob.glob(str(d / "snapshot-*-tag-*.tsnap")))[-1])
    addresses = servers.start(resume=True)
    try:
        model, history = fit(
            build_model, rdd, servers=addresses, secret=servers.secret, resume_from="servers", **kw
        )
    finally:
        servers.crash()
    assert history.epoch == [2]  # epochs 1 and 2 were in the common set
    assert history.resumed_version is not None


def test_tf1_reports_the_loss_a_train_op_minimizes(sc, tf1):
    """As in the seed program: only the train op is fetched, the loss is found."""
    x = tf1.placeholder(tf1.float32, [None, 2], name="x")
    y_ = tf1.placeholder(tf1.float32, [None, 2], name="y")
    w = tf1.Variable(tf1.zeros([2, 2]), name="w")
    loss = tf1.reduce_mean(
        tf1.nn.softmax_cross_entropy_with_logits(labels=y_, logits=tf1.matmul(x, w)), name="xent"
    )
    train = tf1.train.GradientDescentOptimizer(0.5).minimize(loss)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    rows = [(np.array([1.0, 0.0], np.float32), np.array([1.0, 0.0], np.float32))] * ROWS
    with SparkSession(sc, sess, sync_interval=SYNC, batch_size=BATCH, progress=False) as ss:
        summary = ss.run(train, feed_rdd=sc.parallelize(rows, PARTS), feed_name_list=["x:0", "y:0"])
    # ln 2 at the start, falling as w learns the one class.
    assert 0.0 < summary.loss < np.log(2.0)
    assert all(0.0 < p["loss"] < np.log(2.0) + 1e-6 for p in summary.partitions)


@pytest.mark.parametrize("update", ["mean", "elastic", "plain-mean"])
def test_keras_fit_takes_the_tf1_update_rules(sc, update):
    from tensorspark import MeanCombiner
    from tensorspark.keras import fit

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    rdd = sc.parallelize([(x[i], y[i]) for i in range(len(x))], PARTS)
    rule = MeanCombiner(average_iterates=False) if update == "plain-mean" else update
    model, history = fit(
        build_model, rdd, batch_size=20, sync_interval=5, epochs=3, update=rule, progress=False
    )
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # it learns
    assert [w["pushes"] for w in history.workers[-1]] == [2, 2]
