"""The one feed: a partition streamed into training batches with bounded memory.

Driver side: :func:`check_columns` validates a DataFrame's feature and label
columns against the schema before any job starts. Task side: Arrow record
batches (from ``mapInArrow``) or RDD rows become chunks, tuples of NumPy
columns (``(x, y)`` for Keras, one column per feed name for a TF1 graph);
:class:`BatchStream` turns chunks into fixed-size batches while holding at
most ``buffer_batches`` batches of rows (the shuffle buffer), never the whole
partition; :func:`grouped` gathers batches into groups of steps that never
span a sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import TensorSparkValueError

# Spark SQL type names (``DataType.typeName()``) accepted as numbers.
_NUMERIC = {"byte", "short", "integer", "long", "float", "double", "decimal", "boolean"}
_INTEGRAL = {"byte", "short", "integer", "long", "boolean"}


def _column_kind(field: Any) -> str:
    """'scalar', 'array' or 'vector' for a numeric column; '' otherwise."""
    dtype = field.dataType
    name = dtype.typeName()
    if name in _NUMERIC:
        return "scalar"
    if name == "array" and dtype.elementType.typeName() in _NUMERIC:
        return "array"
    if type(dtype).__name__ == "VectorUDT":
        return "vector"
    return ""


def check_columns(
    schema: Any, features: Sequence[str], label: str | None
) -> tuple[list[str], bool]:
    """Check that the feature and label columns exist and are numeric.

    Returns the feature column kinds and whether the label is integral (so it
    is fed as int64, e.g. for a sparse categorical loss).
    """
    by_name = {f.name: f for f in schema.fields}
    available = ", ".join(f"{f.name} ({f.dataType.simpleString()})" for f in schema.fields)
    kinds = []
    wanted = [*features, label] if label is not None else list(features)
    for col in wanted:
        if col not in by_name:
            role = "label" if col == label else "feature"
            raise TensorSparkValueError(
                f"the DataFrame has no {role} column {col!r}; its columns are: {available}. "
                f"Pass {'label_col' if role == 'label' else 'features_col'}= to name it"
            )
    for col in features:
        kind = _column_kind(by_name[col])
        if not kind:
            raise TensorSparkValueError(
                f"feature column {col!r} has type {by_name[col].dataType.simpleString()}; a "
                "feature column must be numeric, an array of numbers or an ML vector"
            )
        kinds.append(kind)
    integral = False
    if label is not None:
        kind = _column_kind(by_name[label])
        if not kind:
            raise TensorSparkValueError(
                f"label column {label!r} has type {by_name[label].dataType.simpleString()}, "
                "which is not numeric; convert it first, e.g. with pyspark.ml.feature."
                "StringIndexer for class names"
            )
        dtype = by_name[label].dataType
        integral = kind == "scalar" and dtype.typeName() in _INTEGRAL
    return kinds, integral


def _arrow_column(column: Any, name: str) -> np.ndarray:
    """One Arrow column (scalar, list or ML vector struct) as a 2-D float32 array."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if column.null_count:
        row = next(i for i in range(n) if not column[i].is_valid)
        raise TensorSparkValueError(f"column {name!r} has a null in row {row} of a batch")
    if pa.types.is_struct(column.type):  # pyspark.ml.linalg vector: type, size, indices, values
        return _vectors(column, name)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets = np.asarray(column.offsets)
        lengths = np.diff(offsets)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            bad = int(np.flatnonzero(lengths != width)[0])
            raise TensorSparkValueError(
                f"column {name!r}: rows of different lengths ({width} and {int(lengths[bad])} "
                f"at row {bad} of a batch); every row must have the same length"
            )
        values = column.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        if values.null_count:
            raise TensorSparkValueError(f"column {name!r} has a null element")
        flat = values.to_numpy(zero_copy_only=False)
        return flat.astype(np.float32, copy=False).reshape(n, width)
    if pa.types.is_fixed_size_list(column.type):
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.float32, copy=False).reshape(n, column.type.list_size)
    return column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, 1)


def _vectors(column: Any, name: str) -> np.ndarray:
    """Dense or sparse pyspark.ml vectors (Arrow structs) as a 2-D float32 array."""
    kinds = column.field("type").to_numpy(zero_copy_only=False)
    values = column.field("values")
    n = len(column)
    if n and (kinds == 1).all():
        return _arrow_column(values, name)
    sizes = column.field("size").to_numpy(zero_copy_only=False)
    width = int(sizes[0]) if n else 0
    out = np.zeros((n, width), dtype=np.float32)
    indices = column.field("indices")
    for i in range(n):
        vals = np.asarray(values[i].values, dtype=np.float32)
        if kinds[i] == 1:
            if len(vals) != width:
                raise TensorSparkValueError(
                    f"column {name!r}: vectors of different sizes ({width} and {len(vals)})"
                )
            out[i] = vals
        else:
            if int(sizes[i]) != width:
                raise TensorSparkValueError(
                    f"column {name!r}: vectors of different sizes ({width} and {int(sizes[i])})"
                )
            out[i, np.asarray(indices[i].values)] = vals
    return out


def arrow_chunks(
    batches: Iterable[Any],
    features: Sequence[str],
    label: str | None,
    integral_label: bool,
    classes: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """NumPy ``(x, y)`` chunks from Arrow record batches, one per batch.

    ``classes`` > 0: the label is a class index below it (see :func:`class_labels`).
    """
    for batch in batches:
        if batch.num_rows == 0:
            continue
        parts = [_arrow_column(batch.column(c), c) for c in features]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        yield x, _label(batch, label, integral_label, classes)


@dataclass(frozen=True)
class InputColumn:
    """How one DataFrame column feeds one model input.

    ``kind``: "dense" (numbers, arrays, vectors: float32), "ids" (an int
    column), "multi_hot" (``array<int|long>``: int64 padded with -1),
    "strings" / "multi_hot_strings" (hashed to int64 ids,
    ``tensorspark.tables.hash_strings``). ``width``: a multi-hot input's
    fixed length (0: the longest row of each batch). ``table``: the table
    an id column feeds ("" for dense inputs).
    """

    column: str
    kind: str
    width: int = 0
    table: str = ""


def input_column(field: Any, table: str, width: int, input_name: str) -> InputColumn:
    """The :class:`InputColumn` of a schema field, or a clear error for a wrong type."""
    dtype = field.dataType
    name = dtype.typeName()
    elem = dtype.elementType.typeName() if name == "array" else ""
    if not table:
        if not _column_kind(field):
            raise TensorSparkValueError(
                f"column {field.name!r} (for model input {input_name!r}) has type "
                f"{dtype.simpleString()}; a dense input must be numeric, an array of numbers or "
                "an ML vector"
            )
        return InputColumn(field.name, "dense")
    if name in _INTEGRAL and name != "boolean":
        return InputColumn(field.name, "ids", table=table)
    if name == "array" and elem in _INTEGRAL and elem != "boolean":
        return InputColumn(field.name, "multi_hot", width, table)
    if name == "string":
        return InputColumn(field.name, "strings", table=table)
    if name == "array" and elem == "string":
        return InputColumn(field.name, "multi_hot_strings", width, table)
    hint = ""
    if name in ("float", "double", "decimal") or elem in ("float", "double", "decimal"):
        hint = " (float ids: cast the column to long, e.g. col(...).cast('long'), if whole)"
    raise TensorSparkValueError(
        f"column {field.name!r} feeds table {table!r} (model input {input_name!r}) but has type "
        f"{dtype.simpleString()}; ids must be int or long, array<long> for multi-hot, or "
        f"strings{hint}"
    )


def _id_column(column: Any, spec: InputColumn) -> np.ndarray:
    """An id column as int64: ``(n,)`` or ``(n, width)`` padded with -1."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if column.null_count:
        row = next(i for i in range(n) if not column[i].is_valid)
        raise TensorSparkValueError(
            f"column {spec.column!r} (table {spec.table!r}) has a null id in row {row} of a batch"
        )
    if spec.kind in ("ids", "strings"):
        if spec.kind == "strings":
            from ..tables import hash_strings

            return hash_strings(column.to_pylist())
        return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    offsets = np.asarray(column.offsets)
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if n else 0
    width = spec.width or max(1, longest)
    if longest > width:
        row = int(np.argmax(lengths))
        raise TensorSparkValueError(
            f"column {spec.column!r} (table {spec.table!r}): row {row} of a batch has {longest} "
            f"ids but the model input takes at most {width}; give keras.Input shape=(None,) "
            "for any length"
        )
    values = column.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if values.null_count:
        raise TensorSparkValueError(f"column {spec.column!r} (table {spec.table!r}) has a null id")
    if spec.kind == "multi_hot_strings":
        from ..tables import hash_strings

        flat = hash_strings(values.to_pylist())
    else:
        flat = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    out = np.full((n, width), -1, np.int64)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = flat
    return out


def arrow_inputs(
    batches: Iterable[Any],
    inputs: Sequence[InputColumn],
    label: str | None,
    integral_label: bool,
    classes: int = 0,
) -> Iterator[Chunk]:
    """Chunks ``(input_1, ..., input_k, y)`` from Arrow record batches, one per model input."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        cols = [
            _arrow_column(batch.column(c.column), c.column)
            if c.kind == "dense"
            else _id_column(batch.column(c.column), c)
            for c in inputs
        ]
        yield (*cols, _label(batch, label, integral_label, classes))


def _label(batch: Any, label: str | None, integral: bool, classes: int = 0) -> np.ndarray | None:
    if label is None:
        return None
    col = batch.column(label)
    if classes:
        return class_labels(col, label, classes, integral)
    if integral:
        if col.null_count:
            raise TensorSparkValueError(f"label column {label!r} has a null")
        return col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    y = _arrow_column(col, label)
    return y[:, 0] if y.shape[1] == 1 else y


def class_labels(column: Any, name: str, classes: int, as_int: bool) -> np.ndarray:
    """A classifier's label column: class indices ``0, 1, ..., classes - 1``.

    Spark ML's labels are doubles (``StringIndexer`` gives 0.0, 1.0, ...):
    each must be a whole number in range. Fed as int64 (``as_int``, for a
    sparse categorical loss) or float32 (e.g. binary cross-entropy).
    """
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise TensorSparkValueError(
            f"label column {name!r} has type {column.type}; a classifier's label is one class "
            "index per row (a number: 0.0, 1.0, ...)"
        )
    if column.null_count:
        row = next(i for i in range(len(column)) if not column[i].is_valid)
        raise TensorSparkValueError(f"label column {name!r} has a null in row {row} of a batch")
    y = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    bad = ~((y == np.floor(y)) & (y >= 0) & (y < classes))  # NaN is bad too
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TensorSparkValueError(
            f"label column {name!r} has {float(y[row])!r} in row {row} of a batch; a classifier's "
            f"labels must be class indices 0.0, 1.0, ..., {classes - 1}.0 for the model's "
            f"{classes} classes (pyspark.ml.feature.StringIndexer turns class names into them)"
        )
    return y.astype(np.int64) if as_int else y.astype(np.float32)


def row_chunks(
    rows: Iterable[Any], chunk_rows: int, partition: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """NumPy ``(x, y)`` chunks of ``chunk_rows`` from RDD rows ``(features, label)``."""
    xs: list[Any] = []
    ys: list[Any] = []
    for k, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != 2:
            got = f"{len(row)} items" if isinstance(row, (tuple, list)) else type(row).__name__
            raise TensorSparkValueError(
                f"RDD row {k} of partition {partition} has {got}; each row must be a tuple "
                "(features, label) of NumPy arrays or numbers"
            )
        xs.append(row[0])
        ys.append(row[1])
        if len(xs) == chunk_rows:
            yield _stack_rows(xs, ys, partition)
            xs, ys = [], []
    if xs:
        yield _stack_rows(xs, ys, partition)


def _stack_rows(xs: list[Any], ys: list[Any], partition: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(xs, dtype=np.float32)
        y = np.asarray(ys)
    except (ValueError, TypeError) as e:
        raise TensorSparkValueError(
            f"RDD partition {partition}: rows have features or labels of different shapes or "
            f"non-numeric values ({e})"
        ) from None
    if not np.issubdtype(y.dtype, np.number) and y.dtype != np.bool_:
        raise TensorSparkValueError(
            f"RDD partition {partition}: labels must be numeric, got dtype {y.dtype}"
        )
    y = y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
    return x.reshape(len(xs), -1), y


def shape_features(x: np.ndarray, input_shape: tuple[int, ...], where: str) -> np.ndarray:
    """Reshape flat rows to the model's input shape, or fail naming both sizes."""
    want = int(np.prod(input_shape)) if input_shape else 1
    if x.shape[1] != want:
        raise TensorSparkValueError(
            f"{where}: each row has {x.shape[1]} feature values but the model's input shape "
            f"{tuple(input_shape)} needs {want}; check features_col or the model's input"
        )
    return x.reshape((x.shape[0], *input_shape))


Chunk = tuple[Any, ...]  # columns of equal length; a column may be None (no label)


def tuple_chunks(
    rows: Iterable[Any],
    chunk_rows: int,
    partition: int,
    names: Sequence[str],
    *,
    full_shuffle: Any = None,
) -> Iterator[Chunk]:
    """Chunks of ``chunk_rows`` from RDD rows holding one value per name in ``names``.

    Each column keeps the dtype NumPy gives its values (a TF1 feed converts
    it). ``full_shuffle``, a seed, holds the whole partition and permutes
    it first: the original TensorSpark's exact whole-partition shuffle.
    """
    if full_shuffle is not None:
        held = list(rows)
        order = np.random.default_rng(full_shuffle).permutation(len(held))
        rows = (held[i] for i in order)
    arity = len(names)
    cols: list[list[Any]] = [[] for _ in names]
    for k, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != arity:
            got = f"{len(row)} items" if isinstance(row, (tuple, list)) else type(row).__name__
            raise TensorSparkValueError(
                f"feed_rdd row {k} of partition {partition} has {got} but feed_name_list has "
                f"{arity} names {list(names)}; each row must be a tuple with one value per feed "
                "name"
            )
        for c, v in zip(cols, row, strict=True):
            c.append(v)
        if len(cols[0]) == chunk_rows:
            yield _stack_columns(cols, names)
            cols = [[] for _ in names]
    if cols[0]:
        yield _stack_columns(cols, names)


def _stack_columns(cols: list[list[Any]], names: Sequence[str]) -> Chunk:
    out = []
    for name, values in zip(names, cols, strict=True):
        try:
            out.append(np.asarray(values))
        except ValueError as e:
            raise TensorSparkValueError(
                f"feed {name!r}: the rows have values of different shapes ({e}); every row must "
                "give this feed a value of the same shape"
            ) from None
    return tuple(out)


def _rows(chunk: Chunk) -> int:
    return len(chunk[0])


def _take(chunk: Chunk, index: Any) -> Chunk:
    return tuple(None if c is None else c[index] for c in chunk)


def _join(parts: list[Chunk]) -> Chunk:
    if len(parts) == 1:
        return parts[0]
    out = []
    for j in range(len(parts[0])):
        cols = [p[j] for p in parts]
        if cols[0] is None:
            out.append(None)
            continue
        width = max(c.shape[1] for c in cols) if cols[0].ndim == 2 else 0
        if width and any(c.shape[1] != width for c in cols):
            cols = [pad_ids(c, width) for c in cols]  # multi-hot ids of varying length
        out.append(np.concatenate(cols))
    return tuple(out)


def pad_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """Multi-hot ids ``(n, w)`` padded with -1 to ``(n, width)``, ``width >= w``."""
    if ids.shape[1] == width:
        return ids
    out = np.full((ids.shape[0], width), -1, ids.dtype)
    out[:, : ids.shape[1]] = ids
    return out


class BatchStream:
    """Fixed-size batches from a stream of chunks, holding a bounded buffer.

    Without shuffling, rows come out in order and the buffer holds less than
    one batch plus the current chunk. With shuffling it is a shuffle buffer
    of ``buffer_batches * batch_size`` rows (like ``tf.data``'s): each batch
    draws random rows from the buffer, which refills from the stream. Chunks
    are consumed lazily, so at most one incoming chunk is held beside the
    buffer. Every batch has ``batch_size`` rows but the last.
    """

    def __init__(
        self,
        chunks: Iterable[Chunk],
        batch_size: int,
        *,
        buffer_batches: int = 4,
        shuffle: bool = False,
        seed: Any = 0,
    ) -> None:
        if batch_size < 1 or buffer_batches < 1:
            raise TensorSparkValueError("batch_size and buffer_batches must be >= 1")
        self._chunks = iter(chunks)
        self.batch_size = batch_size
        self.capacity = batch_size * buffer_batches
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self.rows_held_max = 0  # the most rows buffered at once (for the memory bound)

    def __iter__(self) -> Iterator[Chunk]:
        return self._shuffled() if self.shuffle else self._in_order()

    def _in_order(self) -> Iterator[Chunk]:
        bs = self.batch_size
        pending: list[Chunk] = []
        held = 0
        for chunk in self._chunks:
            pending.append(chunk)
            held += _rows(chunk)
            self.rows_held_max = max(self.rows_held_max, held)
            if held < bs:
                continue
            joined = _join(pending)
            n_full = held // bs * bs
            for start in range(0, n_full, bs):
                yield _take(joined, slice(start, start + bs))
            pending = [_take(joined, slice(n_full, held))] if n_full < held else []
            held -= n_full
        if held:
            yield _join(pending)

    def _shuffled(self) -> Iterator[Chunk]:
        bs, cap = self.batch_size, self.capacity
        buf: list[np.ndarray | None] = []
        size = 0
        for chunk in self._chunks:
            if not buf:
                buf = [
                    None if c is None else np.empty((cap, *c.shape[1:]), dtype=c.dtype)
                    for c in chunk
                ]
            buf, chunk = _same_widths(buf, chunk)
            pos, n = 0, _rows(chunk)
            while pos < n:
                take = min(cap - size, n - pos)
                for b, c in zip(buf, chunk, strict=True):
                    if b is not None:
                        b[size : size + take] = c[pos : pos + take]
                size += take
                pos += take
                self.rows_held_max = max(self.rows_held_max, size)
                if size == cap:
                    # Emit a random batch, then fill its holes from the buffer's tail.
                    pick = self._rng.choice(size, size=bs, replace=False)
                    yield _take(tuple(buf), pick)
                    picked = np.zeros(size, bool)
                    picked[pick] = True
                    holes = pick[pick < size - bs]
                    movers = np.flatnonzero(~picked[size - bs :]) + (size - bs)
                    for b in buf:
                        if b is not None:
                            b[holes] = b[movers]
                    size -= bs
        if size:
            order = self._rng.permutation(size)
            for start in range(0, size, bs):
                yield _take(tuple(buf), order[start : start + bs])


def _same_widths(buf: list[Any], chunk: Chunk) -> tuple[list[Any], Chunk]:
    """Pad multi-hot id columns of the buffer or the chunk to the wider of the two."""
    if not any(
        b is not None and b.ndim == 2 and b.shape[1] != c.shape[1]
        for b, c in zip(buf, chunk, strict=True)
    ):
        return buf, chunk
    buf, chunk = list(buf), list(chunk)
    for j, (b, c) in enumerate(zip(buf, chunk, strict=True)):
        if b is None or b.ndim != 2 or b.shape[1] == c.shape[1]:
            continue
        width = max(b.shape[1], c.shape[1])
        buf[j], chunk[j] = pad_ids(b, width), pad_ids(c, width)
    return buf, tuple(chunk)


def steps_per_call(steps_per_call: int, buffer_batches: int, sync_interval: int) -> int:
    """Most steps per compiled call: ``steps_per_call``, capped by the buffer and the sync."""
    return max(1, min(steps_per_call, buffer_batches, sync_interval))


def grouped(
    batches: Iterable[Chunk], batch_size: int, group: int, sync_interval: int
) -> Iterator[list[Chunk]]:
    """Lists of at most ``group`` batches, never across a sync.

    A short batch (fewer than ``batch_size`` rows, the last one) goes alone,
    since a stack needs equal batches.
    """
    out: list[Chunk] = []
    since_sync = 0
    for batch in batches:
        if _rows(batch) != batch_size:
            if out:
                yield out
            yield [batch]
            out = []
            since_sync = (since_sync + 1) % sync_interval
            continue
        out.append(batch)
        since_sync += 1
        if len(out) == group or since_sync == sync_interval:
            yield out
            out = []
        if since_sync == sync_interval:
            since_sync = 0
    if out:
        yield out
