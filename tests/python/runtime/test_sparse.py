"""runtime.sparse: local indices, and when a task's pulled rows are stale (a real server)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorspark import _core
from tensorspark.errors import TensorSparkValueError
from tensorspark.ps import ParameterServer, PSClient, generate_secret
from tensorspark.runtime import sparse
from tensorspark.tables import RowOptimizer, TableSpec


def test_local_indices_deduplicate_across_columns_and_keep_padding():
    a = np.array([[7], [3], [7]], np.int64)
    b = np.array([[3, -1], [9, 7], [-1, -1]], np.int64)
    uniq, (la, lb) = sparse.local_indices([a, b], padded=True)
    np.testing.assert_array_equal(uniq, [3, 7, 9])
    np.testing.assert_array_equal(uniq[la], a)
    assert (lb[b == -1] == -1).all()
    np.testing.assert_array_equal(uniq[lb[b != -1]], b[b != -1])


@pytest.fixture
def server():
    secret = generate_secret()
    with ParameterServer(secret, "127.0.0.1", 0) as ps:
        with PSClient("127.0.0.1", ps.port, secret) as c:
            sgd = RowOptimizer(kind="sgd", learning_rate=1.0)
            spec = TableSpec(name="t", dim=2, vocab=10, initializer="zeros", optimizer=sgd)
            c.create_tables([spec])
        yield ps.port, secret


def _exchange(port: int, secret: bytes, prefetch: bool) -> sparse.RowExchange:
    feeds = (sparse.TableFeed("t", 2, (0,), 10, ("ids",)),)
    raw = _core.Client("127.0.0.1", port, secret)
    return sparse.RowExchange(sparse.Rows(raw, feeds), feeds, prefetch=prefetch)


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_shared_row_is_one_step_stale_only_with_prefetch(server, prefetch):
    """Two batches on row 4; the first pushes gradient -1 (SGD lr 1: the row becomes 1)."""
    port, secret = server
    batches = [(np.array([4, 4, 5], np.int64), None), (np.array([4], np.int64), None)]
    seen = []
    rows = _exchange(port, secret, prefetch)
    try:
        for batch in rows.batches(batches):
            *cols, rb = batch
            seen.append(rb.rows[0][np.searchsorted(rb.uniques[0], 4)].copy())
            if len(seen) == 1:
                np.testing.assert_array_equal(cols[0], [0, 0, 1])  # local indices
                rows.push(rb, [-np.ones((2, 2), np.float32)], "batch 1")
        rows.flush()
    finally:
        rows.close()
    np.testing.assert_array_equal(seen[0], [0, 0])
    # Without prefetch batch 2 is pulled after batch 1's push; with it, before.
    np.testing.assert_array_equal(seen[1], [0, 0] if prefetch else [1, 1])


def test_out_of_range_ids_are_named_before_any_pull(server):
    port, secret = server
    rows = _exchange(port, secret, False)
    try:
        with pytest.raises(TensorSparkValueError, match=r"column 'ids' holds id 12.*\[0, 10\)"):
            list(rows.batches([(np.array([1, 12], np.int64), None)]))
        with pytest.raises(TensorSparkValueError, match="gradient of table 't' is NaN"):
            batch = next(iter(rows.batches([(np.array([1], np.int64), None)])))
            rows.push(batch[-1], [np.full((1, 2), np.nan, np.float32)], "batch 1")
    finally:
        rows.close()
