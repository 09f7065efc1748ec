"""A Keras CNN trained on Fashion-MNIST across Spark tasks with tensorspark.

Two convolution + max-pooling layers, dropout, a dense layer and a softmax output
(the architecture the Fashion-MNIST benchmark table lists at 0.916), trained
on a Spark DataFrame built from Debian's ``dataset-fashion-mnist`` files.
Each task streams its partition through Arrow and trains against the
parameter server on the driver; the test accuracy is printed at the end.

    python examples/fashion_mnist_keras.py --master "local[2]" --partitions 2 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_model():
    """The CNN, compiled (also run inside the Spark tasks)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="fashion_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def lr_schedule(epoch: int, lr: float, epochs: int = 10) -> float:
    """Adam's rate: 1e-3, then 3e-4 for the last third of the epochs.

    The lower rate at the end damps the noise of asynchronous updates.
    """
    return 1e-3 if epoch < epochs - max(1, epochs // 3) else 3e-4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--master", help="Spark master URL (default: spark-submit's --master, else local[2])"
    )
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sync-interval", type=int, default=10)
    p.add_argument("--consistency", default="async", choices=["async", "sync", "ssp"])
    p.add_argument("--update", default="delta", choices=["delta", "gradient"])
    p.add_argument(
        "--ps-shards", type=int, default=0, help="parameter-server shards in Spark tasks"
    )
    p.add_argument("--checkpoint-dir", help="snapshots (with --ps-shards: a lost shard's)")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0)
    p.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 below this")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    if args.master or not SparkConf().contains("spark.master"):
        builder = builder.master(args.master or "local[2]")
    spark = (
        builder.appName("tensorspark fashion-mnist keras")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")

    import keras
    import numpy as np

    import tensorspark.keras
    from tensorspark.datasets import fashion_mnist_dataframe, load_fashion_mnist

    keras.utils.set_random_seed(0)
    train = fashion_mnist_dataframe(spark, "train", partitions=args.partitions).cache()
    print(f"training rows: {train.count()} in {args.partitions} partitions", flush=True)
    started = time.monotonic()
    model, history = tensorspark.keras.fit(
        build_model,
        train,
        features_col="features",
        label_col="label",
        epochs=args.epochs,
        batch_size=args.batch_size,
        sync_interval=args.sync_interval,
        consistency=args.consistency,
        update=args.update,
        callbacks=[
            keras.callbacks.LearningRateScheduler(lambda e, lr: lr_schedule(e, lr, args.epochs))
        ],
        progress=not args.no_progress,
        name="fashion-mnist-cnn",
        ps_shards=args.ps_shards,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_s=args.checkpoint_every_s,
    )
    seconds = time.monotonic() - started
    x_test, y_test = load_fashion_mnist("test")
    x_test = x_test.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
    test = model.evaluate(
        x_test, y_test.astype(np.int64), batch_size=512, verbose=0, return_dict=True
    )
    accuracy = float(test["accuracy"])
    print(
        f"test accuracy: {accuracy:.4f} (test loss {test['loss']:.4f}) after {args.epochs} "
        f"epochs in {seconds:.1f} s"
    )
    if args.json:
        result = {
            "test_accuracy": accuracy,
            "test_loss": float(test["loss"]),
            "epochs": args.epochs,
            "train_seconds": seconds,
            "samples_per_sec": history.samples_per_sec,
            "history": history.history,
            "workers": history.workers,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    spark.stop()
    if accuracy < args.min_accuracy:
        print(f"test accuracy {accuracy:.4f} is below --min-accuracy {args.min_accuracy}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
