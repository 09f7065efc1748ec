"""Local datasets for examples and benchmarks (never downloaded).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``): idx files under
``/usr/share/datasets/fashion-mnist``.

:func:`fashion_mnist_dataframe` writes a split once as a Parquet file (from
Python, with pyarrow) and returns ``spark.read.parquet`` of it, so the data
never passes through the driver JVM: building the DataFrame from an
in-memory Arrow table shipped about 90 MB of task closures through the
driver, which killed a driver with Spark's default 1 GB heap
(``java.lang.OutOfMemoryError: Java heap space``) and left Python waiting
forever.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import uuid
from typing import Any

import numpy as np

from .errors import TensorSparkValueError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Bumped when the layout of the cached Parquet file changes.
_CACHE_FORMAT = 1

_log = logging.getLogger(__name__)


def _idx(path: str, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TensorSparkValueError(
            f"{path} not found; install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist) or pass data_dir="
        ) from None
    header = np.frombuffer(data, dtype=">u4", count=2)
    if int(header[0]) != magic:
        raise TensorSparkValueError(f"{path}: not an idx file (magic {int(header[0])})")
    dims = np.frombuffer(data, dtype=">u4", count=magic & 0xFF, offset=4).astype(int)
    offset = 4 + 4 * len(dims)
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def load_fashion_mnist(
    split: str = "train", data_dir: str = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Images (``uint8``, ``(n, 28, 28)``) and labels (``uint8``) of a split."""
    if split not in _FILES:
        raise TensorSparkValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _FILES[split]
    x = _idx(os.path.join(data_dir, images), 2051)
    y = _idx(os.path.join(data_dir, labels), 2049)
    return x, y


def fashion_mnist_dataframe(
    spark: Any,
    split: str = "train",
    partitions: int = 2,
    data_dir: str = FASHION_MNIST_DIR,
    *,
    cache_dir: str | None = None,
) -> Any:
    """A DataFrame ``features array<float>`` (784 pixels in [0, 1]), ``label long``.

    The split is written once as a Parquet file with one row group per
    partition, and read back with ``spark.read.parquet`` as exactly
    ``partitions`` partitions (no shuffle), in the order of the idx files.
    A later call with the same split, data files and partition count reuses
    the file.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
        The session to read with.
    split : {"train", "test"}
        Which split.
    partitions : int
        Partitions of the DataFrame (at least 1, at most the row count).
    data_dir : str
        Directory of the idx files.
    cache_dir : str, optional
        Directory for the Parquet file, created if missing. It must be
        readable at the same path by every executor: on a cluster pass a
        shared directory (NFS or similar; a local path, not an ``hdfs://``
        URI, since Python writes it). By default the driver's
        ``spark.tmp.dir``, else the first ``spark.local.dir``, else the
        system temp directory, with ``tensorspark-datasets`` appended, which
        is right for local mode (executors share the driver's filesystem). On
        a cluster master without ``cache_dir``, a short Spark job checks that
        the executors see the file and raises ``TensorSparkValueError`` if
        they do not.

    Returns
    -------
    pyspark.sql.DataFrame
        Rows in idx order; partition ``k`` holds rows
        ``k * ceil(n / partitions)`` onwards. The DataFrame belongs to a
        child session of ``spark`` (``spark.newSession()``: same
        SparkContext, own SQL settings), which holds the file-split settings
        that make Spark read one row group per partition.
    """
    if split not in _FILES:
        raise TensorSparkValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise TensorSparkValueError(f"partitions must be an int >= 1, got {partitions!r}")
    sc = spark.sparkContext
    explicit = cache_dir is not None
    directory = cache_dir if explicit else _default_cache_dir(sc)
    path = os.path.join(directory, _cache_name(split, partitions, data_dir))
    if not os.path.exists(path):
        _write_parquet(path, split, partitions, data_dir)
    split_bytes = _split_bytes(path, partitions)
    session = spark.newSession()
    # The file scan reads these from the session of the relation, whichever
    # session later runs a query on it: byte splits of split_bytes, one per
    # partition, each holding the midpoint of exactly one row group.
    session.conf.set("spark.sql.files.maxPartitionBytes", str(split_bytes))
    session.conf.set("spark.sql.files.openCostInBytes", "0")
    session.conf.set("spark.sql.files.minPartitionNum", "1")
    session.conf.set("spark.sql.files.maxPartitionNum", str(partitions))
    df = session.read.parquet(_file_uri(path))
    got = df.rdd.getNumPartitions()
    if got != partitions:
        raise TensorSparkValueError(
            f"Spark reads {path} as {got} partitions, not {partitions}; delete the file to "
            "rewrite it"
        )
    if not explicit and not sc.master.startswith("local"):
        _check_visible(sc, path)
    return df


def _default_cache_dir(sc: Any) -> str:
    conf = sc.getConf()
    base = conf.get("spark.tmp.dir", None)
    if not base:
        local = conf.get("spark.local.dir", None)
        base = local.split(",")[0].strip() if local else ""
    return os.path.join(base or tempfile.gettempdir(), "tensorspark-datasets")


def _cache_name(split: str, partitions: int, data_dir: str) -> str:
    """File name keyed by the split, the idx files' identity and the partitions."""
    key = [str(_CACHE_FORMAT), split, str(partitions)]
    for name in _FILES[split]:
        path = os.path.realpath(os.path.join(data_dir, name))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise TensorSparkValueError(
                f"{path} not found; install Debian's dataset-fashion-mnist package "
                "(apt-get install dataset-fashion-mnist) or pass data_dir="
            ) from None
        key += [path, str(st.st_size), str(st.st_mtime_ns)]
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    return f"fashion-mnist-{split}-p{partitions}-{digest}.parquet"


def _write_parquet(path: str, split: str, partitions: int, data_dir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = load_fashion_mnist(split, data_dir)
    if partitions > len(y):
        raise TensorSparkValueError(
            f"partitions must be at most the {len(y)} rows of the {split} split, got {partitions}"
        )
    flat = (x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)).ravel()
    offsets = np.arange(0, flat.size + 1, 784, dtype=np.int32)
    features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    table = pa.table({"features": features, "label": pa.array(y.astype(np.int64))})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written under a temporary name and renamed, so a reader (or a second
    # driver writing the same file) never sees half a file.
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp, row_group_size=-(-len(y) // partitions))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _log.info("wrote %s (%d rows, %d row groups)", path, len(y), partitions)


def _split_bytes(path: str, partitions: int) -> int:
    """Split size that gives Spark one split per row group of ``path``.

    Spark cuts a file into splits of the same size ``B`` (the last one
    shorter) and the Parquet reader gives each row group to the split that
    holds its midpoint (``first column's offset + compressed size / 2``).
    ``B`` is picked in the middle of the range where there are exactly
    ``partitions`` splits and midpoint ``i`` lies in split ``i``.
    """
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    length = os.path.getsize(path)
    if meta.num_row_groups != partitions:
        raise TensorSparkValueError(
            f"{path} holds {meta.num_row_groups} row groups, not {partitions}; delete it to "
            "rewrite it"
        )
    lo = -(-length // partitions)
    hi = (length - 1) // (partitions - 1) if partitions > 1 else length
    for i in range(partitions):
        group = meta.row_group(i)
        first = group.column(0)
        start = first.data_page_offset
        if first.has_dictionary_page and 0 < first.dictionary_page_offset < start:
            start = first.dictionary_page_offset
        size = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        mid = start + size // 2
        lo = max(lo, mid // (i + 1) + 1)
        if i > 0:
            hi = min(hi, mid // i)
    if lo > hi:
        raise TensorSparkValueError(
            f"{path}: its row groups are too uneven to read as {partitions} partitions"
        )
    return (lo + hi) // 2


def _file_uri(path: str) -> str:
    # An explicit scheme, so a default filesystem of HDFS does not apply.
    return "file://" + os.path.abspath(path)


def _check_visible(sc: Any, path: str) -> None:
    """Raise if an executor cannot see ``path`` (the driver's local disk)."""
    n = max(2, sc.defaultParallelism)
    seen = sc.parallelize(range(n), n).map(lambda _: os.path.isfile(path)).collect()
    if not all(seen):
        raise TensorSparkValueError(
            f"the executors cannot read {path}, which is on the driver's local disk; pass "
            "cache_dir= a directory every executor sees at the same path"
        )
