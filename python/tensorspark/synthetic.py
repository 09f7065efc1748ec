"""A seeded, Criteo-like click-through-rate data set, generated in Spark tasks.

No CTR data set can be downloaded here, so examples, tests and
``bench/sparse.py`` use this generator. Its layout and rules are in
``docs/ctr_data.md``; in short:

- ``label`` (long, 0 or 1), ``dense`` (``array<float>``, 13 values) and
  ``C1`` ... ``C26`` (long ids in ``[0, vocab)``), plus ``planted_logit``
  (double) with ``with_logit=True``;
- categorical ids follow a truncated Zipf law over each vocabulary; ranks
  are mapped to ids by a seeded affine bijection, so the hot ids are spread
  over the vocabulary rather than being 0, 1, 2, ...;
- labels are drawn from a planted model: hidden embeddings per (feature, id),
  computed on the fly from a hash of (seed, feature, id), and dense weights,
  through a logistic of linear terms plus pairwise dot products.
  :func:`planted_auc` is the planted model's own AUC, the ceiling of any
  model trained on the data;
- every value of row ``i`` is a function of ``(seed, i)`` only (a
  counter-based hash, no sequential random state), so the data does not
  depend on the number of partitions, on which task made a row, or on the
  order the tasks ran.

:func:`ctr_arrays` makes the same rows as NumPy arrays in the calling
process (for single-process baselines and checks); :func:`ctr_dataframe`
makes them in Spark tasks, never through the driver.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import TensorSparkValueError

NUM_CATEGORICAL = 26
NUM_DENSE = 13
#: The default vocabulary sizes: 26 sizes log-spaced from 10^3 to 10^7,
#: rounded to integers (C1 has 1,000 ids, C26 has 10,000,000).
DEFAULT_VOCAB_SIZES: tuple[int, ...] = tuple(
    int(round(v)) for v in np.logspace(3.0, 7.0, NUM_CATEGORICAL)
)

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Stream tags: every (stream, counter) pair feeds the hash once.
_S_LABEL = 1
_S_CAT = 100  # + feature index
_S_DENSE = 200  # + 2 * dense index (+ 1): two uniforms per dense value
_S_EMB = 1000  # + feature index
_S_PERM = 2000  # + feature index
_S_MODEL = 3000


def _mix_int(x: int) -> int:
    """The splitmix64 finalizer on a Python int (mod 2^64)."""
    x &= _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return x


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, stream: int) -> int:
    return _mix_int(_mix_int(seed) ^ (stream * _GOLDEN))


def _hash(seed: int, stream: int, counter: np.ndarray) -> np.ndarray:
    """``mix(counter * golden + key(seed, stream))``: 64 random bits per counter."""
    c = counter.astype(np.uint64, copy=False)
    return _mix(c * np.uint64(_GOLDEN) + np.uint64(_key(seed, stream)))


def _uniform(seed: int, stream: int, counter: np.ndarray) -> np.ndarray:
    """Uniform floats in the open interval (0, 1), 53 bits each."""
    bits = _hash(seed, stream, counter) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * (1.0 / (1 << 53))


class _Planted:
    """The planted model's small parameters, derived from the seed alone."""

    def __init__(
        self, seed: int, vocab: Sequence[int], num_dense: int, zipf_a: float, dim: int
    ) -> None:
        rng = np.random.default_rng([_key(seed, _S_MODEL) >> 1, 7])
        n = len(vocab)
        self.vocab = np.asarray(vocab, dtype=np.int64)
        self.dim = dim
        self.zipf_a = zipf_a
        self.num_dense = num_dense
        # Dense values: floor(exp(mu + sigma * z)), then log1p.
        self.mu = rng.uniform(0.0, 3.0, num_dense)
        self.sigma = rng.uniform(0.5, 1.5, num_dense)
        self.w_dense = rng.standard_normal(num_dense)
        # Pairs (f, f+1) and (f, f+3), mod n: each feature meets four others.
        self.pairs = np.array(
            [(f, (f + d) % n) for d in (1, 3) for f in range(n)] if n > 1 else [], dtype=np.int64
        ).reshape(-1, 2)
        # Rank r -> id (a * r + b) mod V, with gcd(a, V) = 1: a bijection.
        self.mult = np.empty(n, dtype=np.int64)
        self.add = np.empty(n, dtype=np.int64)
        for f, v in enumerate(vocab):
            h = _mix_int(_key(seed, _S_PERM + f))
            a = (h % v) | 1 if v > 1 else 1
            while math.gcd(a, v) != 1:
                a = (a + 2) % v if v > 2 else 1
            self.mult[f] = a
            self.add[f] = (h >> 32) % v
        self.bias = -1.0

    def ids(self, seed: int, f: int, rows: np.ndarray) -> np.ndarray:
        """Zipf ranks for feature ``f`` at the given row indices, mapped to ids."""
        v = int(self.vocab[f])
        u = _uniform(seed, _S_CAT + f, rows)
        a = self.zipf_a
        top = float(v + 1)
        # Inverse CDF of the density ~ x^-a on [1, V+1); rank = floor(x) - 1.
        if abs(a - 1.0) < 1e-12:
            x = np.exp(u * math.log(top))
        else:
            x = (1.0 + u * (top ** (1.0 - a) - 1.0)) ** (1.0 / (1.0 - a))
        rank = np.clip(np.floor(x).astype(np.int64) - 1, 0, v - 1)
        # Exact in uint64: a, r < V <= 2^31, so a * r < 2^62.
        prod = (rank.astype(np.uint64) * np.uint64(self.mult[f])) % np.uint64(v)
        return ((prod + np.uint64(self.add[f])) % np.uint64(v)).astype(np.int64)

    def embedding(self, seed: int, f: int, ids: np.ndarray) -> np.ndarray:
        """The hidden embedding of each id: ``(len(ids), dim)``, components in [-√3, √3]."""
        counter = ids.astype(np.uint64)[:, None] * np.uint64(self.dim) + np.arange(
            self.dim, dtype=np.uint64
        )
        return (_uniform(seed, _S_EMB + f, counter) - 0.5) * (2.0 * math.sqrt(3.0))


def expected_rank_probability(vocab: int, zipf_a: float, rank: int = 0) -> float:
    """Probability that one categorical value has the given Zipf ``rank`` (0 = hottest).

    Parameters
    ----------
    vocab : int
        The feature's vocabulary size.
    zipf_a : float
        The Zipf exponent passed to :func:`ctr_dataframe`.
    rank : int, optional
        The rank (0 is the most frequent id).

    Returns
    -------
    float
        ``F(rank + 2) - F(rank + 1)`` for the truncated power-law CDF ``F``
        on ``[1, vocab + 1)`` that the generator samples.
    """
    top = float(vocab + 1)

    def cdf(x: float) -> float:
        if abs(zipf_a - 1.0) < 1e-12:
            return math.log(x) / math.log(top)
        return (x ** (1.0 - zipf_a) - 1.0) / (top ** (1.0 - zipf_a) - 1.0)

    return cdf(rank + 2.0) - cdf(rank + 1.0)


def _check(
    rows: int, vocab_sizes: Sequence[int] | None, num_dense: int, zipf_a: float, planted_dim: int
) -> tuple[int, ...]:
    if rows < 0:
        raise TensorSparkValueError(f"rows must be >= 0, got {rows}")
    vocab = tuple(DEFAULT_VOCAB_SIZES if vocab_sizes is None else (int(v) for v in vocab_sizes))
    if not vocab:
        raise TensorSparkValueError("vocab_sizes must name at least one feature")
    if any(v < 1 for v in vocab):
        raise TensorSparkValueError(f"every vocabulary size must be >= 1, got {vocab}")
    if any(v > (1 << 31) for v in vocab):
        raise TensorSparkValueError("vocabulary sizes above 2^31 are not supported")
    if num_dense < 0:
        raise TensorSparkValueError(f"num_dense must be >= 0, got {num_dense}")
    if zipf_a <= 0:
        raise TensorSparkValueError(f"zipf_a must be > 0, got {zipf_a}")
    if planted_dim < 1:
        raise TensorSparkValueError(f"planted_dim must be >= 1, got {planted_dim}")
    return vocab


def ctr_arrays(
    rows: int,
    *,
    offset: int = 0,
    vocab_sizes: Sequence[int] | None = None,
    num_dense: int = NUM_DENSE,
    zipf_a: float = 1.1,
    planted_dim: int = 8,
    logit_scale: float = 1.4,
    seed: int = 0,
    with_logit: bool = False,
) -> dict[str, np.ndarray]:
    """Rows ``offset`` .. ``offset + rows - 1`` of the data set as NumPy arrays.

    The same rows, bit for bit, as :func:`ctr_dataframe` with the same
    arguments; see it for the parameters.

    Returns
    -------
    dict of str to numpy.ndarray
        ``label`` (int64, ``(rows,)``), ``dense`` (float32, ``(rows,
        num_dense)``), ``C1`` ... (int64, ``(rows,)``) and, with
        ``with_logit``, ``planted_logit`` (float64).
    """
    vocab = _check(rows, vocab_sizes, num_dense, zipf_a, planted_dim)
    model = _Planted(seed, vocab, num_dense, zipf_a, planted_dim)
    return _generate(
        model, seed, np.arange(offset, offset + rows, dtype=np.int64), logit_scale, with_logit
    )


def _generate(
    model: _Planted, seed: int, rows: np.ndarray, logit_scale: float, with_logit: bool
) -> dict[str, np.ndarray]:
    n = len(model.vocab)
    out: dict[str, np.ndarray] = {}
    # Dense: z ~ N(0, 1) by Box-Muller; value = log1p(floor(exp(mu + sigma z))).
    dense = np.empty((len(rows), model.num_dense), dtype=np.float32)
    dense_term = np.zeros(len(rows))
    for j in range(model.num_dense):
        u1 = _uniform(seed, _S_DENSE + 2 * j, rows)
        u2 = _uniform(seed, _S_DENSE + 2 * j + 1, rows)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
        dense[:, j] = np.log1p(np.floor(np.exp(model.mu[j] + model.sigma[j] * z)))
        dense_term += model.w_dense[j] * z
    ids = [model.ids(seed, f, rows) for f in range(n)]
    emb = [model.embedding(seed, f, ids[f]) for f in range(n)]
    linear = sum(e[:, 0] for e in emb)
    pair = np.zeros(len(rows))
    for f, g in model.pairs:
        pair += np.einsum("ij,ij->i", emb[f], emb[g]) / math.sqrt(model.dim)
    # Each term has unit variance before weighting: 0.25 + 0.49 + 0.26 = 1.
    z_all = 0.5 * linear / math.sqrt(n) + 0.7 * (pair / math.sqrt(max(len(model.pairs), 1)))
    if model.num_dense:
        z_all = z_all + math.sqrt(0.26) * dense_term / float(np.linalg.norm(model.w_dense))
    logit = model.bias + logit_scale * z_all
    p = 1.0 / (1.0 + np.exp(-logit))
    out["label"] = (_uniform(seed, _S_LABEL, rows) < p).astype(np.int64)
    out["dense"] = dense
    for f in range(n):
        out[f"C{f + 1}"] = ids[f]
    if with_logit:
        out["planted_logit"] = logit
    return out


def ctr_schema(num_categorical: int = NUM_CATEGORICAL, with_logit: bool = False) -> str:
    """The DataFrame schema of :func:`ctr_dataframe`, as a DDL string."""
    cols = ["label long", "dense array<float>"]
    cols += [f"C{f + 1} long" for f in range(num_categorical)]
    if with_logit:
        cols.append("planted_logit double")
    return ", ".join(cols)


def _arrow_batch(arrays: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    dense = arrays["dense"]
    rows, width = dense.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    columns = {
        "label": pa.array(arrays["label"]),
        "dense": pa.ListArray.from_arrays(offsets, pa.array(dense.reshape(-1))),
    }
    for name, values in arrays.items():
        if name not in ("label", "dense"):
            columns[name] = pa.array(values)
    return pa.RecordBatch.from_pydict(columns)


def ctr_dataframe(
    spark: Any,
    rows: int,
    *,
    offset: int = 0,
    vocab_sizes: Sequence[int] | None = None,
    num_dense: int = NUM_DENSE,
    zipf_a: float = 1.1,
    planted_dim: int = 8,
    logit_scale: float = 1.4,
    seed: int = 0,
    partitions: int | None = None,
    path: str | None = None,
    with_logit: bool = False,
    batch_rows: int = 65536,
) -> Any:
    """A Criteo-like CTR DataFrame, generated in Spark tasks.

    ``spark.range(offset, offset + rows)`` is split into ``partitions``
    tasks; each task turns its row indices into rows with
    ``mapInArrow``. Nothing but the small arguments passes through the
    driver.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
        The session.
    rows : int
        The number of rows.
    offset : int, optional
        The index of the first row: ``offset=n`` continues a data set of
        ``n`` rows with new rows from the same distribution (a test split).
    vocab_sizes : sequence of int, optional
        One vocabulary size per categorical column (``C1``, ``C2``, ...);
        :data:`DEFAULT_VOCAB_SIZES` (26 sizes from 10^3 to 10^7) by default.
    num_dense : int, optional
        The length of the ``dense`` array (13).
    zipf_a : float, optional
        The Zipf exponent of the categorical ids (1.1): ``P(rank r)`` is
        proportional to about ``(r + 1)^-zipf_a``.
    planted_dim : int, optional
        The dimension of the planted model's hidden embeddings (8).
    logit_scale : float, optional
        The planted logit's standard deviation before the bias (1.4, which
        gives a planted AUC near 0.8 with the defaults).
    seed : int, optional
        Everything follows from the seed: the same ``(seed, offset, rows)``
        and other arguments give the same rows whatever ``partitions``.
    partitions : int, optional
        The number of tasks (the context's default parallelism).
    path : str, optional
        Write the rows to Parquet at ``path`` (overwriting it) and return
        ``spark.read.parquet(path)``.
    with_logit : bool, optional
        Add the ``planted_logit`` column (double), for :func:`planted_auc`.
    batch_rows : int, optional
        Rows per Arrow batch inside a task (bounds a task's memory).

    Returns
    -------
    pyspark.sql.DataFrame
        ``label`` long (0/1), ``dense`` array<float>, ``C1`` ... long ids
        in ``[0, vocab)`` and, with ``with_logit``, ``planted_logit`` double.

    Raises
    ------
    TensorSparkValueError
        A negative row count, an empty or non-positive vocabulary, or a bad
        exponent, dimension or partition count.
    """
    vocab = _check(rows, vocab_sizes, num_dense, zipf_a, planted_dim)
    if partitions is None:
        partitions = spark.sparkContext.defaultParallelism
    if partitions < 1:
        raise TensorSparkValueError(f"partitions must be >= 1, got {partitions}")
    if batch_rows < 1:
        raise TensorSparkValueError(f"batch_rows must be >= 1, got {batch_rows}")
    params = (seed, vocab, num_dense, zipf_a, planted_dim, logit_scale, with_logit, batch_rows)

    def make(batches: Iterator[Any]) -> Iterator[Any]:
        seed_, vocab_, dense_, a_, dim_, scale_, logit_, step = params
        model = _Planted(seed_, vocab_, dense_, a_, dim_)
        for batch in batches:
            index = batch.column(0).to_numpy()
            for start in range(0, len(index), step):
                part = index[start : start + step].astype(np.int64)
                yield _arrow_batch(_generate(model, seed_, part, scale_, logit_))

    df = spark.range(offset, offset + rows, numPartitions=partitions).mapInArrow(
        make, ctr_schema(len(vocab), with_logit)
    )
    if path is not None:
        df.write.mode("overwrite").parquet(path)
        df = spark.read.parquet(path)
    return df


def auc(labels: Any, scores: Any) -> float:
    """The area under the ROC curve, by ranks (Mann-Whitney U), ties averaged.

    Parameters
    ----------
    labels : array_like
        0/1 (or boolean) labels.
    scores : array_like
        Scores, higher meaning more likely positive.

    Returns
    -------
    float
        The probability that a random positive scores above a random
        negative, counting ties as one half.

    Raises
    ------
    TensorSparkValueError
        The arrays differ in length, or one class is missing.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise TensorSparkValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        raise TensorSparkValueError("AUC needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average rank (1-based) of each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def planted_auc(df: Any) -> float:
    """The planted model's own test AUC on ``df``: the ceiling for learned models.

    Parameters
    ----------
    df : pyspark.sql.DataFrame
        Made by :func:`ctr_dataframe` with ``with_logit=True``; only
        ``label`` and ``planted_logit`` are collected.

    Returns
    -------
    float
        :func:`auc` of ``planted_logit`` against ``label``.

    Raises
    ------
    TensorSparkValueError
        ``df`` has no ``planted_logit`` column.
    """
    if "planted_logit" not in df.columns:
        raise TensorSparkValueError(
            "the DataFrame has no planted_logit column; generate it with with_logit=True"
        )
    table = df.select("label", "planted_logit").toArrow()
    return auc(table.column("label").to_numpy(), table.column("planted_logit").to_numpy())


__all__ = [
    "DEFAULT_VOCAB_SIZES",
    "NUM_CATEGORICAL",
    "NUM_DENSE",
    "auc",
    "ctr_arrays",
    "ctr_dataframe",
    "ctr_schema",
    "expected_rank_probability",
    "planted_auc",
]
