"""What every system of the end-to-end benchmark shares: models, data, clock, curve.

Imported by ``bench/e2e.py`` (tensorspark's venv) and by
``bench/e2e_elephas.py`` (Elephas's own venv, which has no tensorspark), so
it needs only NumPy and Keras, and reads the Fashion-MNIST idx files itself.
Spark's Python workers import it too (tensorspark ships the model builders
by reference), which is why it sits on their ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def build_softmax(steps_per_execution: int = 1) -> Any:
    """Softmax regression (784 -> 10), compiled with Adam(1e-3)."""
    import keras

    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(10, activation="softmax")],
        name="softmax_regression",
    )
    return _compile(model, steps_per_execution)


def build_cnn(steps_per_execution: int = 1) -> Any:
    """examples/fashion_mnist_keras.py's CNN, with a softmax output.

    The softmax output and the string loss keep the model serializable by
    Elephas (``model.to_json`` plus ``compile(loss=model.loss)`` in its
    workers); the architecture is otherwise the example's.
    """
    import keras

    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="fashion_cnn",
    )
    return _compile(model, steps_per_execution)


def _compile(model: Any, steps_per_execution: int = 1) -> Any:
    """Compile; ``steps_per_execution`` only matters to plain Keras' ``fit``."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its builder, input shape and accuracy bound."""

    name: str
    build: Callable[..., Any]  # build(steps_per_execution=1)
    input_shape: tuple[int, ...]
    bound: float
    description: str


MODELS: dict[str, ModelSpec] = {
    "softmax": ModelSpec(
        "softmax", build_softmax, (784,), 0.83, "softmax regression 784->10, Adam(1e-3)"
    ),
    "cnn": ModelSpec(
        "cnn",
        build_cnn,
        (28, 28, 1),
        0.90,
        "CNN conv32-pool-conv64-pool-dropout-dense128-dense10, Adam(1e-3)",
    ),
}


def _idx(path: str, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">u4", count=2)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: not an idx file (magic {int(header[0])})")
    dims = np.frombuffer(data, dtype=">u4", count=magic & 0xFF, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(tuple(dims))


def load_split(
    split: str, shape: tuple[int, ...], data_dir: str = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as float32 pixels in [0, 1] of ``shape`` and int64 labels.

    The same scaling as ``tensorspark.datasets.fashion_mnist_dataframe``, so
    every system trains on identical values.
    """
    images, labels = _FILES[split]
    x = _idx(os.path.join(data_dir, images), 2051)
    y = _idx(os.path.join(data_dir, labels), 2049)
    x = x.reshape((len(x), *shape)).astype(np.float32) / np.float32(255.0)
    return x, y.astype(np.int64)


class Clock:
    """Wall time since the run's subprocess was launched, with evaluation left out.

    ``t0`` is the orchestrator's ``time.time()`` just before it started the
    subprocess, so interpreter start, imports, Spark start and data loading
    all count. Test-set evaluation is a measurement, not training, so the
    clock is paused while it runs (it costs every system the same).
    """

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.paused = 0.0
        self.train_started: float | None = None
        self.marks: dict[str, float] = {}

    def mark(self, what: str) -> None:
        """Note when a startup phase ended (e.g. "spark", "data")."""
        self.marks[what] = round(self.now(), 3)

    def now(self) -> float:
        """Seconds since launch, evaluation excluded."""
        return time.time() - self.t0 - self.paused

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Leave what runs inside out of the clock (measurement work)."""
        started = time.time()
        try:
            yield
        finally:
            self.paused += time.time() - started

    def start_training(self) -> float:
        """Mark the end of startup; returns the startup seconds."""
        self.train_started = self.now()
        return self.train_started

    def train_seconds(self) -> float:
        return self.now() - (self.train_started or 0.0)


class Evaluator:
    """Test accuracy of a set of weights, on the driver, with the clock paused."""

    def __init__(self, spec: ModelSpec, clock: Clock, batch_size: int = 1000) -> None:
        with clock.pause():
            self.model = spec.build()
            self.x, self.y = load_split("test", spec.input_shape)
        self.clock = clock
        self.batch_size = batch_size

    def __call__(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """``(accuracy, loss)`` of ``weights`` on the 10,000 test images."""
        with self.clock.pause():
            self.model.set_weights(weights)
            loss, acc = self.model.evaluate(self.x, self.y, batch_size=self.batch_size, verbose=0)
        return float(acc), float(loss)


class Curve:
    """The (wall time, test accuracy) points of one run and what follows from them."""

    def __init__(self, clock: Clock, bound: float, min_epochs: int, epoch_cap: int) -> None:
        self.clock, self.bound = clock, bound
        self.min_epochs, self.epoch_cap = min_epochs, epoch_cap
        self.points: list[dict[str, Any]] = []
        self.epoch_seconds: list[float] = []
        self.epoch_samples: list[int] = []
        self._last_end: float | None = None

    def epoch_end(self, samples: int) -> float:
        """Record an epoch's training time (call before evaluating it); the clock.

        An epoch runs from the previous epoch's end (or the start of
        training) to now, so what a system does between epochs counts.
        """
        now = self.clock.now()
        start = self._last_end if self._last_end is not None else self.clock.train_started
        self.epoch_seconds.append(now - (start if start is not None else now))
        self.epoch_samples.append(samples)
        self._last_end = now
        return now

    def add(self, accuracy: float, loss: float, epoch: float, at: float | None = None) -> None:
        """Add a point measured at ``at`` (default: now) after ``epoch`` epochs."""
        at = self.clock.now() if at is None else at
        self.points.append(
            {
                "elapsed_s": round(at, 3),
                "train_s": round(at - (self.clock.train_started or 0.0), 3),
                "epoch": epoch,
                "test_accuracy": round(accuracy, 5),
                "test_loss": round(loss, 5),
            }
        )

    def done(self, epochs_run: int) -> bool:
        """Stop once the bound is reached (after ``min_epochs``) or at the cap."""
        if epochs_run >= self.epoch_cap:
            return True
        return epochs_run >= self.min_epochs and self.reached() is not None

    def reached(self) -> dict[str, Any] | None:
        return next((p for p in self.points if p["test_accuracy"] >= self.bound), None)

    def summary(self) -> dict[str, Any]:
        """Throughput and time-to-bound figures of the run."""
        hit = self.reached()
        seconds, samples = sum(self.epoch_seconds), sum(self.epoch_samples)
        steady_s, steady_n = sum(self.epoch_seconds[1:]), sum(self.epoch_samples[1:])
        best = max((p["test_accuracy"] for p in self.points), default=None)
        return {
            "epochs_run": len(self.epoch_seconds),
            "train_s": round(seconds, 3),
            "samples": samples,
            "samples_per_sec": samples / seconds if seconds > 0 else None,
            # The first epoch pays for tracing and building the model in workers.
            "samples_per_sec_steady": steady_n / steady_s if steady_s > 0 else None,
            "epoch_seconds": [round(s, 3) for s in self.epoch_seconds],
            "time_to_bound_s": hit["elapsed_s"] if hit else None,
            "train_time_to_bound_s": hit["train_s"] if hit else None,
            "bound_epoch": hit["epoch"] if hit else None,
            "final_accuracy": self.points[-1]["test_accuracy"] if self.points else None,
            "best_accuracy": best,
            "not_reached_reason": None
            if hit
            else f"best test accuracy {best} < {self.bound} within {self.epoch_cap} epochs",
        }


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and load: what the figures depend on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def versions(**extra: str) -> dict[str, str]:
    import keras
    import pyspark
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "pyspark": pyspark.__version__,
        **extra,
    }


def spark_session(app: str, cores: int, task_cpus: int) -> Any:
    """A ``local[cores]`` SparkSession with ``task_cpus`` cores per task, UI off."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName(app)
        .config("spark.task.cpus", str(task_cpus))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def set_tf_threads(threads: int) -> None:
    """TensorFlow intra- and inter-op threads of this process (before TF starts)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def run_row(main: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Entry point of a row's subprocess: spec JSON in argv[1], result to spec["out"]."""
    spec = json.loads(sys.argv[1])
    try:
        result = main(spec)
    except Exception as e:  # noqa: BLE001 - the row records why it failed
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(spec["out"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if "error" not in result else 1
