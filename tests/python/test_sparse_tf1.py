"""``SparkSession.run(sparse_params=[table])``: only each batch's rows of table travel."""

from __future__ import annotations

import numpy as np
import pytest

VOCAB, DIM = 50, 3


def _graph(tf):
    ids = tf.placeholder(tf.int64, [None], name="ids")
    y = tf.placeholder(tf.float32, [None], name="y")
    table = tf.Variable(tf.random.uniform([VOCAB, DIM], -0.1, 0.1, seed=1), name="W")
    w = tf.Variable(tf.ones([DIM]), name="w")
    logits = tf.reduce_sum(tf.nn.embedding_lookup(table, ids) * w, axis=1)
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
    step = tf.train.GradientDescentOptimizer(0.5).minimize(loss)
    return ids, y, table, w, loss, step


def _rdd(sc, n=800, seed=0, vocab=30):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, n)  # ids >= vocab are never seen
    y = (ids % 2).astype(np.float32)
    return sc.parallelize([(int(i), float(t)) for i, t in zip(ids, y, strict=True)], 2)


def test_sparse_params_train_only_the_rows_seen(sc, tf1):
    import tensorspark

    ids, y, table, w, loss, step = _graph(tf1)
    with tf1.Session() as sess:
        sess.run(tf1.global_variables_initializer())
        before = sess.run(table)
        with tensorspark.SparkSession(
            sc, sess, user="u", name="sparse-tf1", server_port=0, sync_interval=5, batch_size=20
        ) as ss:
            summary = ss.run(
                step,
                feed_rdd=_rdd(sc),
                feed_name_list=[ids.name, y.name],
                param_list=[table, w],
                sparse_params=[table],
                loss=loss,
            )
            first = summary.loss
            for _ in range(2):
                summary = ss.run(
                    step,
                    feed_rdd=_rdd(sc, seed=1),
                    feed_name_list=[ids.name, y.name],
                    param_list=[table, w],
                    sparse_params=[table],
                    loss=loss,
                )
            stats = ss.stats()
        after = sess.run(table)
    assert summary.loss < first, (first, summary.loss)
    np.testing.assert_array_equal(after[30:], before[30:])  # ids never fed: untouched
    assert np.abs(after[:30] - before[:30]).max() > 0.05
    assert stats.get("rows_pushed", 0) > 0, stats
    # Only batches' rows travelled: far fewer than a whole table per step.
    assert stats["rows_pulled"] < summary.steps * 3 * 20, stats


def test_sparse_params_need_a_fed_lookup(sc, tf1):
    import tensorspark
    from tensorspark.errors import TensorSparkError

    ids, y, table, w, loss, step = _graph(tf1)
    other = tf1.Variable(tf1.zeros([4, 2]), name="unused_table")
    with tf1.Session() as sess:
        sess.run(tf1.global_variables_initializer())
        with (
            tensorspark.SparkSession(sc, sess, server_port=0, batch_size=20) as ss,
            pytest.raises(TensorSparkError, match="never looks up rows of 'unused_table'"),
        ):
            ss.run(
                step,
                feed_rdd=_rdd(sc, 40),
                feed_name_list=[ids.name, y.name],
                sparse_params=[other],
            )
