"""Local datasets for examples and benchmarks (never downloaded).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``): idx files under
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

from .errors import TensorSparkValueError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


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
    spark: Any, split: str = "train", partitions: int = 2, data_dir: str = FASHION_MNIST_DIR
) -> Any:
    """A DataFrame ``features array<float>`` (784 pixels in [0, 1]), ``label long``.

    Built from an Arrow table, so no row passes through Python objects.
    """
    import pyarrow as pa

    x, y = load_fashion_mnist(split, data_dir)
    flat = (x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)).ravel()
    offsets = np.arange(0, flat.size + 1, 784, dtype=np.int32)
    features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    table = pa.table({"features": features, "label": pa.array(y.astype(np.int64))})
    if partitions < 1:
        raise TensorSparkValueError(f"partitions must be >= 1, got {partitions}")
    # Spark makes one partition per Arrow batch of the table, so batches of
    # ceil(n / partitions) rows give the partitions without a shuffle
    # (repartition would write the whole dataset through the shuffle).
    conf = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(conf, None)
    spark.conf.set(conf, str(max(1, -(-len(y) // partitions))))
    try:
        df = spark.createDataFrame(table)
    finally:
        if previous is None:
            spark.conf.unset(conf)
        else:
            spark.conf.set(conf, previous)
    return df if df.rdd.getNumPartitions() == partitions else df.repartition(partitions)
