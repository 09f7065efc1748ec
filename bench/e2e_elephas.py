"""One Elephas row of the end-to-end benchmark (runs in Elephas's own venv).

Elephas 7.3 pins ``tensorflow<2.20``, ``pyspark<=4.0.0`` and ``numpy<2``,
which clash with tensorspark's venv (TF 2.21, PySpark 4.1+), so ``make
bench-e2e`` gives it ``.venv-elephas`` and bench/e2e.py starts this file
with that interpreter: ``python bench/e2e_elephas.py '<row spec JSON>'``.

Elephas's own API, as its README shows it: ``to_simple_rdd(sc, x, y)``, then

- ``mode sync``: ``SparkModel(model)``; ``fit(rdd, epochs=1, ...)`` per epoch
  (each call is one Spark job whose workers fit their partition for an
  epoch; the driver averages their weight changes, Elephas's synchronous
  scheme, one average per epoch), evaluated between calls;
- ``mode async`` / ``hogwild`` / ``async-batch``: ``AsynchronousSparkModel(
  model, mode=..., frequency="epoch" | "batch")`` and one ``fit(rdd,
  epochs=cap)``: a single Spark job in which each worker pulls from and
  pushes to Elephas's HTTP parameter server (a Flask process). Epochs are
  invisible to the driver, so a thread polls the server's weights every
  ``poll_s`` seconds (one GET, cheap) and keeps each new version with its
  time; they are evaluated after training. An ``AsynchronousSparkModel``
  cannot be fitted twice (its server process starts once), so it cannot
  stop at the bound: it runs the epoch cap.

TF threads per worker are set through ``TF_NUM_INTRAOP_THREADS`` and
``TF_NUM_INTEROP_THREADS`` (Elephas has no setting; in local mode Spark's
Python workers inherit the driver's environment).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_common as common  # noqa: E402 - lives beside this file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(weights: list[Any]) -> str:
    h = hashlib.sha1()
    for w in weights:
        h.update(w.tobytes())
    return h.hexdigest()


def sync_fit(spark_model: Any, rdd: Any, spec: dict, curve: Any, evaluator: Any, rows: int) -> None:
    for epoch in range(spec["epochs"]):
        spark_model.fit(rdd, epochs=1, batch_size=spec["batch_size"], verbose=0)
        at = curve.epoch_end(rows)
        curve.add(*evaluator(spark_model.master_network.get_weights()), epoch=epoch + 1, at=at)
        if curve.done(epoch + 1):
            break


def async_fit(
    spark_model: Any, rdd: Any, spec: dict, curve: Any, evaluator: Any, rows: int
) -> dict[str, Any]:
    """One fit for the whole epoch cap, the server's weights polled meanwhile."""
    clock = curve.clock
    snapshots: list[tuple[float, list[Any]]] = []
    seen: set[str] = set()
    stop = threading.Event()
    errors: list[str] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                weights = spark_model.client.get_parameters()
            except OSError as e:  # not listening yet, or already stopped
                errors.append(type(e).__name__)
            else:
                at = clock.now()
                d = _digest(weights)
                if d not in seen:
                    seen.add(d)
                    snapshots.append((at, weights))
            stop.wait(spec.get("poll_s", 1.0))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        spark_model.fit(rdd, epochs=spec["epochs"], batch_size=spec["batch_size"], verbose=0)
    finally:
        stop.set()
        poller.join()
    end = curve.epoch_end(rows * spec["epochs"])
    workers = spec["workers"]
    first_update: float | None = None
    # The first snapshot is the initial model; each later one is >= 1 push.
    for k, (at, weights) in enumerate(snapshots[1:], start=1):
        if first_update is None:
            first_update = at
        curve.add(*evaluator(weights), epoch=round(k / workers, 2), at=at)
    curve.add(*evaluator(spark_model.master_network.get_weights()), epoch=spec["epochs"], at=end)
    extra: dict[str, Any] = {"server_versions_seen": len(snapshots), "poll_errors": len(errors)}
    if first_update is not None and spec["epochs"] > 1 and end > first_update:
        # After the first push (about one epoch in) every epoch is steady work.
        extra["samples_per_sec_steady"] = rows * (spec["epochs"] - 1) / (end - first_update)
    return extra


def elephas_row(spec: dict[str, Any]) -> dict[str, Any]:
    clock = common.Clock(spec["t0"])
    workers, threads = spec["workers"], spec["threads_per_worker"]
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
    spark = common.spark_session(
        f"e2e elephas {spec['label']}", cores=workers * threads, task_cpus=threads
    )
    clock.mark("spark")
    import elephas
    import keras
    from elephas.spark_model import AsynchronousSparkModel, SparkModel
    from elephas.utils.rdd_utils import to_simple_rdd

    clock.mark("imports")
    model_spec = common.MODELS[spec["model"]]
    x, y = common.load_split("train", model_spec.input_shape)
    rdd = to_simple_rdd(spark.sparkContext, x, y)
    if rdd.getNumPartitions() != workers:
        rdd = rdd.repartition(workers)
    rdd = rdd.cache()
    rows = rdd.count()
    clock.mark("data")
    keras.utils.set_random_seed(spec["seed"])
    model = model_spec.build()
    evaluator = common.Evaluator(model_spec, clock)
    curve = common.Curve(clock, model_spec.bound, spec["min_epochs"], spec["epochs"])
    mode = spec["mode"]
    extra: dict[str, Any] = {}
    if mode == "sync":
        spark_model = SparkModel(model, batch_size=spec["batch_size"])
        startup = clock.start_training()
        sync_fit(spark_model, rdd, spec, curve, evaluator, rows)
    else:
        spark_model = AsynchronousSparkModel(
            model,
            batch_size=spec["batch_size"],
            mode="hogwild" if mode == "hogwild" else "asynchronous",
            frequency="batch" if mode == "async-batch" else "epoch",
            parameter_server_mode="http",
            port=_free_port(),
        )
        startup = clock.start_training()
        extra = async_fit(spark_model, rdd, spec, curve, evaluator, rows)
    summary = curve.summary()
    if mode != "sync":
        summary["samples_per_sec_steady"] = extra.pop("samples_per_sec_steady", None)
        summary["epochs_run"] = spec["epochs"]
        summary["epoch_seconds"] = None  # one job for all epochs: not measurable
    rdd.unpersist()
    spark.stop()
    return {
        "startup_s": round(startup, 3),
        "startup_marks": clock.marks,
        **summary,
        "curve": curve.points,
        **extra,
        "versions": common.versions(elephas=getattr(elephas, "__version__", _dist_version())),
    }


def _dist_version() -> str:
    from importlib.metadata import version

    return version("elephas")


if __name__ == "__main__":
    sys.exit(common.run_row(elephas_row))
