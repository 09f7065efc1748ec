"""tensorspark.datasets.fashion_mnist_dataframe: Parquet written once, read by Spark.

The DataFrame used to be built from an in-memory Arrow table, whose ~90 MB
of task closures went through the driver JVM: with Spark's default 1 GB
driver heap a second build plus a job over it ended in
``OutOfMemoryError: Java heap space`` and a Python process waiting forever.
The test runs exactly that on a default-memory session, in a subprocess
with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tensorspark.datasets import FASHION_MNIST_DIR, fashion_mnist_dataframe
from tensorspark.errors import TensorSparkValueError

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="needs Debian's dataset-fashion-mnist"
)

SCRIPT = r"""
import json, os, sys, time
import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from tensorspark.datasets import fashion_mnist_dataframe, load_fashion_mnist

cache = sys.argv[1]
# No spark.driver.memory: the default 1 GB heap.
spark = (
    SparkSession.builder.master("local[2]")
    .config("spark.ui.enabled", "false")
    .config("spark.ui.showConsoleProgress", "false")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("ERROR")
x, y = load_fashion_mnist("train")
x = x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)

started = time.monotonic()
df = fashion_mnist_dataframe(spark, "train", 3, cache_dir=cache)
first_seconds = time.monotonic() - started
files = sorted(os.listdir(cache))
stat = os.stat(os.path.join(cache, files[0]))

# Rows per partition, then the first and last row of each (by the ids
# Spark numbers rows with: partition << 33 | index in the partition).
sizes = dict(df.groupBy(F.spark_partition_id().alias("p")).count().collect())
rows = [sizes.get(p, 0) for p in range(len(sizes))]
wanted, index = {}, 0
for p, n in enumerate(rows):
    wanted[(p << 33)] = index
    wanted[(p << 33) + n - 1] = index + n - 1
    index += n
picked = (
    df.withColumn("id", F.monotonically_increasing_id())
    .where(F.col("id").isin(list(wanted)))
    .collect()
)
low, high = df.selectExpr("min(array_min(features))", "max(array_max(features))").first()
checks = {
    "partitions": df.rdd.getNumPartitions(),
    "schema": df.schema.simpleString(),
    "count": df.count(),
    "rows_per_partition": rows,
    "labels_in_order": bool(
        (df.select("label").toArrow().column("label").to_numpy() == y).all()
    ),
    "pixels_checked": len(picked),
    "pixels_match": all(
        r.label == int(y[wanted[r.id]]) and np.allclose(r.features, x[wanted[r.id]], atol=1e-7)
        for r in picked
    ),
    "pixel_range": [low, high],
}

# The same call again reuses the file.
started = time.monotonic()
again = fashion_mnist_dataframe(spark, "train", 3, cache_dir=cache)
checks["second_seconds"] = time.monotonic() - started
checks["first_seconds"] = first_seconds
checks["second_count"] = again.count()
after = os.stat(os.path.join(cache, files[0]))
checks["reused"] = (
    sorted(os.listdir(cache)) == files and len(files) == 1
    and (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
)
print(json.dumps(checks), flush=True)
"""


def test_train_dataframe_on_a_default_memory_driver(tmp_path):
    script = tmp_path / "datasets_check.py"
    script.write_text(SCRIPT)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(cache)],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung (driver OutOfMemoryError?); stderr ends:\n{(e.stderr or '')[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}:\n{proc.stderr[-3000:]}"
    got = json.loads(lines[-1])
    assert got["partitions"] == 3
    assert got["schema"] == "struct<features:array<float>,label:bigint>"
    assert got["count"] == 60000 and got["second_count"] == 60000
    assert got["rows_per_partition"] == [20000, 20000, 20000]
    assert got["labels_in_order"] and got["pixels_match"] and got["pixels_checked"] == 6, got
    assert got["pixel_range"] == [0.0, 1.0]
    assert got["reused"], got
    assert got["second_seconds"] < got["first_seconds"], got


def test_bad_arguments_fail_before_spark():
    with pytest.raises(TensorSparkValueError, match="split"):
        fashion_mnist_dataframe(None, "validation")
    with pytest.raises(TensorSparkValueError, match="partitions"):
        fashion_mnist_dataframe(None, "train", 0)
