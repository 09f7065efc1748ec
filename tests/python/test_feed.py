"""The bounded-memory batch stream and the column checks (no Spark jobs)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorspark import TensorSparkValueError
from tensorspark._feed import BatchStream, arrow_chunks, row_chunks, shape_features


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


def _cfg(**over):
    from tensorspark.keras._task import KerasTaskConfig

    base = dict(
        host="",
        port=0,
        secret=b"",
        run_id="",
        epoch=0,
        weight_names=(),
        weight_shapes=(),
        synced=(),
        input_shape=(3,),
        features=("f",),
        label="y",
        integral_label=True,
        batch_size=4,
        buffer_batches=8,
        shuffle=False,
        seed=0,
        sync_interval=7,
        steps_per_call=3,
        update="delta",
        learning_rate=None,
        threads=1,
        connect_timeout=1.0,
        io_timeout=1.0,
        heartbeat_interval=0.0,
    )
    return KerasTaskConfig(**{**base, **over})


@pytest.mark.parametrize(
    ("sync", "per_call", "buffer", "want"),
    [(7, 3, 8, 3), (10, 32, 8, 8), (10, 1, 8, 1), (4, 32, 8, 4), (100, 32, 8, 8), (1, 32, 8, 1)],
)
def test_steps_per_call_is_capped_by_the_buffer_and_the_sync(sync, per_call, buffer, want):
    from tensorspark.keras._task import steps_per_call

    cfg = _cfg(sync_interval=sync, steps_per_call=per_call, buffer_batches=buffer)
    assert steps_per_call(cfg) == want


def test_grouped_batches_keep_order_and_never_span_a_sync():
    from tensorspark.keras._task import _grouped

    cfg = _cfg()  # batch 4, sync every 7 steps, groups of at most 3
    x = np.arange(75 * 3, dtype=np.float32).reshape(75, 3)
    y = np.arange(75, dtype=np.int64)
    stream = BatchStream([(x[:40], y[:40]), (x[40:], y[40:])], 4)
    groups = list(_grouped(stream, cfg, "p0"))
    # 18 full batches, then a short one of 3 rows, alone.
    assert [n for n, _, _ in groups] == [3, 3, 1, 3, 3, 1, 3, 1, 1]
    steps = np.cumsum([n for n, _, _ in groups])
    assert 7 in steps and 14 in steps  # every sync boundary ends a group
    assert groups[-1][1].shape == (1, 3, 3)
    np.testing.assert_array_equal(np.concatenate([g.reshape(-1, 3) for _, g, _ in groups]), x)
    np.testing.assert_array_equal(np.concatenate([g.ravel() for _, _, g in groups]), y)
