"""The Keras CNN on Fashion-MNIST: accuracy, throughput and a worker's memory bound.

Part 1 trains examples/fashion_mnist_keras.py's CNN on Spark ``local[2]``
(2 partitions, async, local Adam deltas, the rate lowered for the last
third of the epochs) for ``--epochs`` and records the
test accuracy (target >= 0.90) and samples per second.

Part 2 shows that a worker's memory does not grow with its partition: one
task streams a partition of ``small`` and then of ``large`` rows (10x more)
with a buffer of ``buffer_batches`` batches, and the worker's peak RSS
above its baseline (after the model is built) is recorded for both.

python bench/keras_fashion_mnist.py [--epochs 10] [--out bench/results/keras_fashion_mnist.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def _spark(master: str):
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(master)
        .appName("tensorspark bench keras")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def accuracy_run(spark, epochs: int, batch_size: int, sync_interval: int) -> dict:
    import keras
    import numpy as np

    import tensorspark.keras
    from fashion_mnist_keras import build_model, lr_schedule
    from tensorspark.datasets import fashion_mnist_dataframe, load_fashion_mnist

    train = fashion_mnist_dataframe(spark, "train", partitions=2).cache()
    train.count()
    started = time.monotonic()
    model, history = tensorspark.keras.fit(
        build_model,
        train,
        epochs=epochs,
        batch_size=batch_size,
        sync_interval=sync_interval,
        callbacks=[keras.callbacks.LearningRateScheduler(lambda e, lr: lr_schedule(e, lr, epochs))],
        progress=False,
        name="bench-fashion-cnn",
    )
    seconds = time.monotonic() - started
    x, y = load_fashion_mnist("test")
    x = x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
    test = model.evaluate(x, y.astype(np.int64), batch_size=512, verbose=0, return_dict=True)
    train.unpersist()
    per_worker = [w["samples_per_sec"] for epoch in history.workers[1:] for w in epoch]
    return {
        "test_accuracy": float(test["accuracy"]),
        "target_accuracy": 0.90,
        "test_loss": float(test["loss"]),
        "epochs": epochs,
        "batch_size": batch_size,
        "sync_interval": sync_interval,
        "workers": 2,
        "mode": "async",
        "update": "delta",
        "train_seconds": seconds,
        "samples_per_sec_per_epoch": history.samples_per_sec,
        # The first epoch includes building the model in each Python worker.
        "samples_per_sec_after_first_epoch": (
            sum(60000 for _ in history.seconds[1:]) / sum(history.seconds[1:])
            if len(history.seconds) > 1
            else history.samples_per_sec[0]
        ),
        "worker_samples_per_sec_mean": sum(per_worker) / len(per_worker) if per_worker else None,
        "history": history.history,
    }


def memory_run(spark, rows: int, batch_size: int, buffer_batches: int) -> dict:
    import tensorspark.keras
    from fashion_mnist_keras import build_model
    from tensorspark.datasets import fashion_mnist_dataframe

    df = fashion_mnist_dataframe(spark, "train", partitions=1).limit(rows).repartition(1).cache()
    df.count()
    _, history = tensorspark.keras.fit(
        build_model,
        df,
        epochs=1,
        batch_size=batch_size,
        buffer_batches=buffer_batches,
        sync_interval=20,
        progress=False,
        name=f"bench-memory-{rows}",
    )
    df.unpersist()
    [w] = history.workers[0]
    return {
        "partition_rows": rows,
        "partition_feature_bytes": rows * 784 * 4,
        "buffer_rows": batch_size * buffer_batches,
        "buffer_feature_bytes": batch_size * buffer_batches * 784 * 4,
        "rows_buffered_max": w["rows_buffered_max"],
        "worker_rss_base_mb": w["rss_base_bytes"] / 2**20,
        "worker_rss_peak_mb": w["rss_peak_bytes"] / 2**20,
        "worker_rss_growth_mb": (w["rss_peak_bytes"] - w["rss_base_bytes"]) / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sync-interval", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "bench/results/keras_fashion_mnist.json"))
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The model builder lives in examples/; Spark's Python workers import it.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")) if p
    )
    import pyspark
    import tensorflow as tf

    spark = _spark("local[2]")
    result: dict = {
        "benchmark": "keras_fashion_mnist",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": {
            "python": platform.python_version(),
            "pyspark": pyspark.__version__,
            "tensorflow": tf.__version__,
        },
        "command": "make bench (python bench/keras_fashion_mnist.py)",
    }
    result["cnn"] = accuracy_run(spark, args.epochs, args.batch_size, args.sync_interval)
    print(json.dumps(result["cnn"], indent=1)[:600], flush=True)
    small, large, buffer_batches = 6000, 60000, 8
    result["memory"] = {
        "small": memory_run(spark, small, args.batch_size, buffer_batches),
        "large": memory_run(spark, large, args.batch_size, buffer_batches),
    }
    mem = result["memory"]
    mem["large_over_buffer"] = large / (args.batch_size * buffer_batches)
    mem["growth_difference_mb"] = (
        mem["large"]["worker_rss_growth_mb"] - mem["small"]["worker_rss_growth_mb"]
    )
    mem["bound_holds"] = (
        mem["large"]["rows_buffered_max"] <= args.batch_size * buffer_batches
        and mem["growth_difference_mb"] < mem["large"]["partition_feature_bytes"] / 2**20 / 4
    )
    spark.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["memory"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
