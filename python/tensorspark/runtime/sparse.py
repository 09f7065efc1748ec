"""Sparse tables in a task: only each batch's rows travel (docs/sparse.md, "In a task").

For every batch, a task gathers the ids each table sees (over all the
inputs that feed it; -1 is multi-hot padding), deduplicates them, pulls the
unique rows from the server(s) and feeds the model local indices into
those rows in place of the ids. After the step it pushes one summed
gradient per unique id; the server's row optimizer applies it.

Row traffic runs on a connection of its own, on one background thread, in
FIFO order. With ``prefetch`` the next batch's rows are pulled while the
current batch trains: a row that both batches touch is then read before
the current batch's gradient reached the server, so it is one step stale
for this task (as rows touched by other tasks always may be). Without
``prefetch`` every pull waits for the previous push.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from ..errors import TensorSparkValueError


@dataclass(frozen=True)
class TableFeed:
    """A table as a task feeds it: its name, row width and input columns."""

    table: str
    dim: int
    columns: tuple[int, ...]  # chunk columns holding this table's ids
    vocab: int = 0  # a fixed vocabulary's size (ids checked before a pull); 0: dynamic
    names: tuple[str, ...] = ()  # the DataFrame columns of ``columns`` (errors)
    # True: the model takes local indices into the pulled rows (Keras); False: the ids
    # stay (a TF1 graph scatters the rows into its own variable).
    local: bool = True


@dataclass
class RowBatch:
    """The rows pulled for one batch: per table, its unique ids and their rows."""

    uniques: list[np.ndarray]
    rows: list[np.ndarray]


def local_indices(columns: list[np.ndarray], padded: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique ids of ``columns`` and each column with ids replaced by their index.

    ``padded``: -1 entries are padding, kept as -1 and left out of the ids.
    """
    flat = np.concatenate([c.reshape(-1) for c in columns]) if len(columns) > 1 else columns[0]
    flat = flat.reshape(-1)
    if padded:
        keep = flat != -1
        uniq, inverse = np.unique(flat[keep], return_inverse=True)
        index = np.full(flat.shape, -1, np.int64)
        index[keep] = inverse
    else:
        uniq, index = np.unique(flat, return_inverse=True)
        index = index.astype(np.int64, copy=False)
    out, pos = [], 0
    for c in columns:
        out.append(index[pos : pos + c.size].reshape(c.shape))
        pos += c.size
    return uniq.astype(np.int64, copy=False), out


# Rows per request when a whole vocabulary moves (about 16 MB of values).
_VOCAB_CHUNK_VALUES = 1 << 22


def vocabulary_chunks(vocab: int, dim: int) -> Iterator[np.ndarray]:
    """The ids ``0..vocab-1`` in chunks of about 16 MB of rows."""
    step = max(1, _VOCAB_CHUNK_VALUES // dim)
    for start in range(0, vocab, step):
        yield np.arange(start, min(start + step, vocab), dtype=np.int64)


def pull_vocabulary(client: Any, table: str, vocab: int, dim: int) -> np.ndarray:
    """Every row of a fixed vocabulary (``client``: a PSClient or ShardedPSClient)."""
    parts = [client.pull_rows({table: ids})[table] for ids in vocabulary_chunks(vocab, dim)]
    return np.concatenate(parts) if parts else np.empty((0, dim), np.float32)


class RowExchange:
    """A task's row traffic for its tables, on its own connection and thread."""

    def __init__(self, client: Any, feeds: tuple[TableFeed, ...], *, prefetch: bool) -> None:
        self.client, self.feeds, self.prefetch = client, feeds, prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ts-rows")
        self._pushes: list[concurrent.futures.Future] = []
        self.rows_pulled = self.rows_pushed = 0

    def _prepare(self, batch: tuple) -> tuple:
        cols = list(batch)
        uniques, requests = [], {}
        for f in self.feeds:
            ids = [cols[c] for c in f.columns]
            padded = any(a.ndim == 2 and a.shape[1] != 1 for a in ids)
            uniq, local = local_indices(ids, padded)
            if not f.local:
                local = ids
            if f.vocab and len(uniq) and (uniq[0] < 0 or uniq[-1] >= f.vocab):
                bad = int(uniq[0] if uniq[0] < 0 else uniq[-1])
                col = next(
                    (n for n, a in zip(f.names, ids, strict=False) if (a == bad).any()),
                    "?",
                )
                raise TensorSparkValueError(
                    f"column {col!r} holds id {bad}, outside the fixed vocabulary [0, {f.vocab}) "
                    f"of table {f.table!r}; raise the layer's input_dim, map ids into range, or "
                    "use a dynamic table (input_dim=None)"
                )
            for c, a in zip(f.columns, local, strict=True):
                cols[c] = a
            uniques.append(uniq)
            requests[f.table] = uniq
        pulled = self.client.pull_rows(requests)
        rows = [pulled[f.table] for f in self.feeds]
        self.rows_pulled += sum(len(u) for u in uniques)
        return (*cols, RowBatch(uniques, rows))

    def batches(self, stream: Iterable[tuple]) -> Iterator[tuple]:
        """``stream``'s batches with local indices and a trailing :class:`RowBatch`."""
        it = iter(stream)
        first = next(it, None)
        if first is None:
            return
        pending = self._pool.submit(self._prepare, first)
        for nxt in it:
            if self.prefetch:
                ahead = self._pool.submit(self._prepare, nxt)
                yield pending.result()
                pending = ahead
            else:
                yield pending.result()
                pending = self._pool.submit(self._prepare, nxt)
            self._check_pushes()
        yield pending.result()

    def push(
        self, batch: RowBatch, grads: list[np.ndarray], where: str, kind: str = "gradient"
    ) -> None:
        """Queue the push of one batch's row gradients (summed per unique id), or deltas."""
        updates = {}
        for f, uniq, g in zip(self.feeds, batch.uniques, grads, strict=True):
            g = np.ascontiguousarray(g, np.float32).reshape(len(uniq), f.dim)
            if not np.isfinite(g).all():
                raise TensorSparkValueError(
                    f"the {kind} of table {f.table!r} is NaN or Inf in {where}; nothing from "
                    "this batch was pushed. Lower the learning rate or check the data"
                )
            updates[f.table] = (uniq, g)
        self._pushes.append(self._pool.submit(self._push, updates, kind))

    def _push(self, updates: dict, kind: str) -> None:
        self.client.push_rows(updates, kind=kind)
        self.rows_pushed += sum(len(u[0]) for u in updates.values())

    def _check_pushes(self) -> None:
        done = [f for f in self._pushes if f.done()]
        for f in done:
            self._pushes.remove(f)
            f.result()  # raises a failed push's error

    def flush(self) -> None:
        """Wait for every queued push; raises the first failure."""
        pushes, self._pushes = self._pushes, []
        for f in pushes:
            f.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


class Rows:
    """Row calls straight on a core client (``runtime.task.connect(..., member=False)``).

    A connection of its own that never joins: rows are applied at once in
    every consistency mode, and the task's member connection stays free for
    the dense syncs.
    """

    _KINDS = {"gradient": _core.KIND_GRADIENT, "delta": _core.KIND_DELTA}

    def __init__(self, raw: Any, tables: tuple[TableFeed, ...]) -> None:
        self.raw, self.dims = raw, {f.table: f.dim for f in tables}

    def pull_rows(self, requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tables = list(requests)
        ids = [np.ascontiguousarray(requests[t], np.int64) for t in tables]
        outs = [
            np.empty((len(i), self.dims[t]), np.float32) for t, i in zip(tables, ids, strict=True)
        ]
        self.raw.pull_rows_into(tables, ids, outs)
        return dict(zip(tables, outs, strict=True))

    def push_rows(self, updates: dict[str, tuple[np.ndarray, np.ndarray]], kind: str) -> int:
        tables = list(updates)
        ids = [np.ascontiguousarray(updates[t][0], np.int64) for t in tables]
        values = [np.ascontiguousarray(updates[t][1], np.float32) for t in tables]
        return self.raw.push_rows(self._KINDS[kind], 0.0, tables, ids, values)

    def close(self) -> None:
        self.raw.close()
