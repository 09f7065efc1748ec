"""tensorspark.keras and tensorspark.ml under Spark Connect, against a real local server.

No SparkContext exists in this process: the data is a Connect DataFrame,
the tasks run through ``mapInArrow``, and the parameter server runs here,
in the client, reached by the server's executors on loopback.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

from tensorspark import PSTimeoutError, TensorSparkValueError

pytestmark = pytest.mark.slow

DIM = 8


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    w = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
    return x, (x @ w > 0).astype(np.int64)


def build(lr: float = 0.02):
    """A compiled two-class MLP (module level: the tasks import it by name)."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _df(session, x, y, partitions: int = 2):
    rows = [(x[i].tolist(), int(y[i])) for i in range(len(x))]
    return session.createDataFrame(rows, "features array<float>, label long").repartition(
        partitions
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def train_df(connect):
    x, y = _data(3000)
    return _df(connect, x, y).cache()


def test_fit_validates_checkpoints_resumes_and_predicts(
    connect, train_df, tmp_path, capsys, monkeypatch
):
    import mlflow

    from tensorspark.keras import fit, predict

    xv, yv = _data(600, seed=7)
    val_df = _df(connect, xv, yv)
    ckpt = str(tmp_path / "ckpt")
    common = dict(batch_size=32, sync_interval=4, checkpoint_dir=ckpt, checkpoint_every_s=0)
    model, history = fit(build(), train_df, epochs=2, validation_data=val_df, **common)
    assert history.epoch == [0, 1]
    assert history.history["val_accuracy"][-1] > 0.9
    assert sorted(w["partition"] for w in history.workers[-1]) == [0, 1]
    # progress=True (the default) reports through the driver's console.
    assert "epoch 2/2" in capsys.readouterr().err.lower()
    assert any(n.endswith(".tsnap") for n in os.listdir(ckpt)), os.listdir(ckpt)

    # The resumed run also writes TensorBoard logs, an MLflow run and a status page.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    tb = tmp_path / "tb"
    _, resumed = fit(
        build(),
        train_df,
        epochs=3,
        resume_from=ckpt,
        progress=False,
        log_dir=str(tb),
        mlflow=True,
        ui_port=0,
        **common,
    )
    assert resumed.resumed_version > 0
    assert resumed.epoch == [2]
    assert resumed.mlflow_run_id
    assert list(tb.rglob("events.out.tfevents.*"))
    assert "status page at http://" in capsys.readouterr().err
    mlflow.set_tracking_uri(None)

    out = predict(model, val_df, prediction_col="logits").collect()
    assert len(out) == len(xv)
    got = np.array([r["logits"] for r in out])
    acc = np.mean(got.argmax(1) == np.array([r["label"] for r in out]))
    assert acc > 0.9


def test_keras_classifier_fits_and_transforms_against_a_shard_in_a_task(connect, train_df, capfd):
    """The estimator with ``ps_shards=1``: the shard's job is a ``mapInArrow`` too."""
    from pyspark.ml.functions import array_to_vector

    from tensorspark.ml import KerasClassifier

    df = train_df.select(array_to_vector("features").alias("features"), "label")
    clf = KerasClassifier(
        model=build(),
        batchSize=32,
        syncInterval=4,
        epochs=2,
        fit_options={"progress": False, "ps_shards": 1},
    )
    fitted = clf.fit(df)
    assert "tensorspark: parameter-server shard 0 serving at 127.0.0.1:" in capfd.readouterr().err
    out = fitted.transform(df).select("prediction", "label").collect()
    assert len(out) == 3000
    assert np.mean([r["prediction"] == r["label"] for r in out]) > 0.9


def test_killed_worker_is_retried(connect, train_df):
    from tensorspark import chaos
    from tensorspark.keras import fit

    port = _free_port()
    killer = chaos.WorkerKiller(port=port, delay_s=(0.5, 1.5), min_workers=2).start()
    try:
        _, history = fit(
            build(),
            train_df,
            epochs=3,
            batch_size=16,
            sync_interval=2,
            server_port=port,
            progress=False,
        )
    finally:
        killer.stop()
        killer.join()
    assert killer.error is None
    assert len(killer.killed) == 1, killer.killed
    attempts = [w["attempt"] for w in history.workers[0]]
    assert max(attempts) >= 1, history.workers[0]  # the killed task's retry
    assert history.history["accuracy"][-1] > 0.85


def stall(v):
    """Sleeps for an hour at row 300 of the data; returns ``v`` otherwise."""
    if v == 300:
        time.sleep(3600)
    return v


def test_hung_worker_is_named_and_its_job_interrupted(connect):
    from pyspark.sql import functions as F

    from tensorspark.keras import fit

    stuck = F.udf(stall, "long")
    features = F.array(*[F.randn(seed=k).cast("float") for k in range(DIM)])
    df = (
        connect.range(0, 1200, numPartitions=2)
        .withColumn("features", features)
        .withColumn("label", stuck(F.col("id")) % 2)
    )
    started = time.monotonic()
    with pytest.raises(PSTimeoutError, match=r"training hung: .*stuck workers: partition 0 "):
        fit(build(), df, epochs=1, batch_size=20, sync_interval=2, hang_timeout=8, progress=False)
    # The stuck job was interrupted by its tag, not waited out.
    assert time.monotonic() - started < 90
    assert connect.range(10).count() == 10


def test_tf1_session_and_hadoop_uris_need_classic_spark(connect, train_df):
    import tensorflow.compat.v1 as tf

    import tensorspark
    from tensorspark.keras import fit

    needs = "needs classic Spark.*tensorspark.keras"
    with tf.Graph().as_default(), pytest.raises(TensorSparkValueError, match=needs):
        tensorspark.SparkSession(connect, tf.Session(), user="u", name="n")
    with pytest.raises(TensorSparkValueError, match="needs classic Spark"):
        fit(build(), train_df, checkpoint_dir="file:///tmp/x", progress=False)
