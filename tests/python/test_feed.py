"""The bounded-memory batch stream and the column checks (no Spark jobs)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorspark import TensorSparkValueError
from tensorspark.runtime.feed import (
    BatchStream,
    arrow_chunks,
    grouped,
    row_chunks,
    shape_features,
    steps_per_call,
    tuple_chunks,
)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        idx = np.arange(start, min(n, start + size))
        yield idx[:, None].astype(np.float32), idx.astype(np.int64)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 32, 100])
def test_every_row_once_in_bounded_memory(shuffle, chunk):
    stream = BatchStream(_chunks(1000, chunk), 32, buffer_batches=4, shuffle=shuffle, seed=1)
    batches = list(stream)
    xs = np.concatenate([x[:, 0] for x, _ in batches]).astype(np.int64)
    ys = np.concatenate([y for _, y in batches])
    assert sorted(xs.tolist()) == list(range(1000))
    assert (xs == ys).all()  # features and labels stay paired
    assert all(len(x) == 32 for x, _ in batches[:-1])
    assert (xs != np.arange(1000)).any() == shuffle
    # The buffer never holds more than buffer_batches batches (plus one
    # incoming chunk without shuffling).
    assert stream.rows_held_max <= (128 if shuffle else 32 + chunk)


def test_shuffle_mixes_beyond_one_batch():
    first = next(iter(BatchStream(_chunks(1000, 10), 32, buffer_batches=8, shuffle=True)))
    assert first[1].max() > 64  # drawn from the whole 256-row buffer


def test_arrow_columns_lists_vectors_and_scalars():
    pa = pytest.importorskip("pyarrow")
    batch = pa.RecordBatch.from_pydict(
        {
            "a": pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float64())),
            "s": pa.array([5, 6], type=pa.int32()),
            "label": pa.array([0, 1], type=pa.int64()),
        }
    )
    [(x, y)] = list(arrow_chunks([batch], ("a", "s"), "label", True))
    assert x.dtype == np.float32 and x.tolist() == [[1, 2, 5], [3, 4, 6]]
    assert y.dtype == np.int64 and y.tolist() == [0, 1]


def test_ragged_array_column_is_named():
    pa = pytest.importorskip("pyarrow")
    batch = pa.RecordBatch.from_pydict({"a": [[1.0, 2.0], [3.0]], "label": [0.0, 1.0]})
    with pytest.raises(TensorSparkValueError, match="column 'a': rows of different lengths"):
        list(arrow_chunks([batch], ("a",), "label", False))


def test_wrong_feature_length_names_both_sizes():
    with pytest.raises(
        TensorSparkValueError, match=r"has 5 feature values .* \(28, 28, 1\) needs 784"
    ):
        shape_features(np.zeros((2, 5), np.float32), (28, 28, 1), "partition 0")


def test_rdd_rows_must_be_pairs():
    with pytest.raises(TensorSparkValueError, match="RDD row 1 of partition 3 has 3 items"):
        list(row_chunks([(1.0, 0), (1.0, 2.0, 3.0)], 10, 3))


@pytest.mark.parametrize(
    ("sync", "per_call", "buffer", "want"),
    [(7, 3, 8, 3), (10, 32, 8, 8), (10, 1, 8, 1), (4, 32, 8, 4), (100, 32, 8, 8), (1, 32, 8, 1)],
)
def test_steps_per_call_is_capped_by_the_buffer_and_the_sync(sync, per_call, buffer, want):
    assert steps_per_call(per_call, buffer, sync) == want


def test_grouped_batches_keep_order_and_never_span_a_sync():
    # batch 4, sync every 7 steps, groups of at most 3
    x = np.arange(75 * 3, dtype=np.float32).reshape(75, 3)
    y = np.arange(75, dtype=np.int64)
    stream = BatchStream([(x[:40], y[:40]), (x[40:], y[40:])], 4)
    groups = list(grouped(stream, 4, 3, 7))
    # 18 full batches, then a short one of 3 rows, alone.
    assert [len(g) for g in groups] == [3, 3, 1, 3, 3, 1, 3, 1, 1]
    steps = np.cumsum([len(g) for g in groups])
    assert 7 in steps and 14 in steps  # every sync boundary ends a group
    assert groups[-1][0][0].shape == (3, 3)
    batches = [b for g in groups for b in g]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def test_tf1_rows_stream_through_the_same_shuffle_buffer():
    """Rows with three feeds: chunks of columns, then the bounded shuffle."""
    rows = [(np.full(2, i, np.float32), i, np.int64(i % 3)) for i in range(50)]
    chunks = list(tuple_chunks(rows, 8, 0, ["a:0", "b:0", "c:0"]))
    assert [len(c[0]) for c in chunks] == [8] * 6 + [2]
    assert chunks[0][0].shape == (8, 2) and chunks[0][2].dtype == np.int64
    stream = BatchStream(chunks, 5, buffer_batches=2, shuffle=True, seed=1)
    out = list(stream)
    assert stream.rows_held_max <= 10
    seen = np.concatenate([b[1] for b in out])
    assert sorted(seen.tolist()) == list(range(50)) and seen.tolist() != list(range(50))
    for b in out:  # the columns of a row stay together
        np.testing.assert_array_equal(b[0][:, 0], b[1])
        np.testing.assert_array_equal(b[2], b[1] % 3)


def test_full_shuffle_permutes_the_whole_partition():
    rows = [(i,) for i in range(100)]
    a = np.concatenate([c[0] for c in tuple_chunks(rows, 7, 0, ["x:0"], full_shuffle=[0, 0, 0])])
    b = np.concatenate([c[0] for c in tuple_chunks(rows, 7, 0, ["x:0"], full_shuffle=[0, 0, 0])])
    np.testing.assert_array_equal(a, b)  # seeded
    assert sorted(a.tolist()) == list(range(100)) and a[:10].tolist() != list(range(10))
    # Unlike the buffer, a full shuffle moves a row anywhere in the partition.
    assert np.abs(a - np.arange(100)).max() > 20


def test_tf1_row_with_wrong_arity_names_the_feeds():
    with pytest.raises(TensorSparkValueError, match="has 2 items but feed_name_list has 1"):
        list(tuple_chunks([(1,), (1, 2)], 8, 4, ["x:0"]))
