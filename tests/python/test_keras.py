"""Keras models on real Spark local[2] with real TensorFlow: tensorspark.keras and .ml."""

from __future__ import annotations

import glob
import io
import os
import time

import numpy as np
import pytest

from tensorspark import TensorSparkValueError

pytestmark = pytest.mark.slow

DIM = 8


def _data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A linearly separable two-class problem."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    w = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
    return x, (x @ w > 0).astype(np.int64)


def _df(spark, x, y, partitions: int = 2):
    rows = [(x[i].tolist(), int(y[i])) for i in range(len(x))]
    return spark.createDataFrame(rows, "features array<float>, label long").repartition(partitions)


def _build(lr: float = 0.01, optimizer: str = "adam", seed: int = 1, activation="relu"):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(16, activation=activation), keras.layers.Dense(2)]
    )
    opt = keras.optimizers.Adam(lr) if optimizer == "adam" else keras.optimizers.SGD(lr)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def train_df(spark):
    x, y = _data()
    return _df(spark, x, y).cache()


@pytest.mark.parametrize("update", ["delta", "gradient"])
@pytest.mark.parametrize("consistency", ["async", "sync", "ssp"])
def test_each_mode_and_update_kind_trains(train_df, consistency, update):
    from tensorspark.keras import fit

    xv, yv = _data(500, seed=7)
    model, history = fit(
        _build(0.02),
        train_df,
        epochs=3,
        batch_size=32,
        sync_interval=4,
        consistency=consistency,
        staleness=1,
        update=update,
        validation_data=(xv, yv),
        progress=False,
    )
    assert history.epoch == [0, 1, 2]
    assert history.history["loss"][-1] < 0.25
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["val_accuracy"][-1] > 0.9
    # The driver's model holds the trained weights.
    assert model.evaluate(xv, yv, verbose=0, return_dict=True)["accuracy"] > 0.9
    workers = history.workers[-1]
    assert sorted(w["partition"] for w in workers) == [0, 1]
    assert sum(w["samples"] for w in workers) == 3000
    for w in workers:
        assert w["samples_per_sec"] > 0 and w["pushes"] >= 1
        assert w["rows_buffered_max"] <= 8 * 32  # buffer_batches * batch_size
        if consistency == "sync":
            assert w["staleness_max"] == 0


def test_dataframe_and_rdd_give_the_same_model_and_tls_changes_nothing(spark, sc):
    from tensorspark.keras import fit

    x, y = _data(600)
    # coalesce, not repartition: a shuffle may reorder the rows.
    rows = [(x[i].tolist(), int(y[i])) for i in range(len(x))]
    df = spark.createDataFrame(rows, "features array<float>, label long").coalesce(1)
    rdd = sc.parallelize([(x[i], y[i]) for i in range(len(x))], 1)
    common = dict(epochs=2, batch_size=50, sync_interval=3, shuffle=False, progress=False)
    # SGD, not Adam: a reused Python worker may run TF with another thread
    # count, and Adam's normalization would amplify the rounding differences.
    m_df, h_df = fit(_build(0.1, optimizer="sgd", seed=3), df, **common)
    # The RDD run also goes over TLS (a per-run certificate the tasks pin):
    # the bytes are encrypted, the training is the same.
    m_rdd, h_rdd = fit(_build(0.1, optimizer="sgd", seed=3), rdd, tls=True, **common)
    for a, b in zip(m_df.get_weights(), m_rdd.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h_df.history["loss"], h_rdd.history["loss"], rtol=1e-5)


def test_steps_per_call_gives_the_same_model_as_one_step_per_call(sc):
    from tensorspark.keras import fit

    x, y = _data(620)  # 19 batches of 32 and a short one of 12
    rdd = sc.parallelize([(x[i], y[i]) for i in range(len(x))], 1)
    # Groups of 3, 3, 1 per sync of 7: in-graph loops, single steps and the short batch.
    common = dict(epochs=2, batch_size=32, sync_interval=7, seed=5, progress=False)
    m_one, h_one = fit(_build(0.1, optimizer="sgd", seed=3), rdd, steps_per_call=1, **common)
    m_grp, h_grp = fit(_build(0.1, optimizer="sgd", seed=3), rdd, steps_per_call=3, **common)
    for a, b in zip(m_one.get_weights(), m_grp.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h_one.history["loss"], h_grp.history["loss"], rtol=1e-5)
    assert [w["steps"] for w in h_grp.workers[-1]] == [20]
    assert [w["pushes"] for w in h_grp.workers[-1]] == [3]


def test_vector_column_builder_callbacks_and_tensorboard(spark, tmp_path):
    import keras
    from pyspark.ml.linalg import Vectors

    from tensorspark.keras import fit

    x, y = _data(800)
    rows = [(Vectors.dense(x[i].tolist()), float(y[i])) for i in range(len(x))]
    df = spark.createDataFrame(rows, ["vec", "target"]).repartition(2)
    seen = []

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, dict(logs)))
            if epoch == 1:
                self.model.stop_training = True

    model, history = fit(
        lambda: _build(0.02),
        df,
        features_col="vec",
        label_col="target",
        epochs=5,
        batch_size=40,
        callbacks=[StopAfterTwo()],
        validation_data=df,
        log_dir=str(tmp_path),
        save_path=str(tmp_path / "trained.keras"),
        progress=False,
    )
    assert history.epoch == [0, 1]
    saved = keras.saving.load_model(tmp_path / "trained.keras")
    for a, b in zip(saved.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [e for e, _ in seen] == [0, 1]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(seen[-1][1])
    assert history.history["val_accuracy"][-1] > 0.85
    tags = _tensorboard_tags(tmp_path)
    assert {"epoch/loss", "epoch/val_accuracy", "worker_0/samples_per_sec"} <= tags
    assert {"worker_1/staleness_mean", "worker_1/loss"} <= tags


def _tensorboard_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_progress_bar_reads_worker_reports_from_the_server():
    from tensorspark.ps import ParameterServer, PSClient, generate_secret
    from tensorspark.runtime.progress import ProgressBar

    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as server:
        worker = PSClient("127.0.0.1", server.port, secret, partition_id=0)
        worker.join()
        worker.report_progress(10, 320, 0.5)
        worker.heartbeat()
        out = io.StringIO()
        connect = lambda: PSClient("127.0.0.1", server.port, secret)  # noqa: E731
        bar = ProgressBar(connect, 640, stream=out, interval=0.05, line_every=0.0)
        bar.start_epoch("epoch 1/3")
        time.sleep(0.5)
        worker.report_progress(20, 640, 0.25)
        worker.heartbeat()
        time.sleep(0.5)
        bar.end_epoch("loss 0.25", 640)
        worker.close()
    text = out.getvalue()
    assert "epoch 1/3 [" in text and "320/640 samples" in text and "loss 0.5000" in text
    assert "640/640 samples" in text and "samples/s" in text and "1 workers" in text
    assert text.rstrip().endswith("epoch 1/3: loss 0.25")


def test_estimator_fit_transform_save_load(spark, tmp_path):
    from tensorspark.ml import KerasEstimator, KerasModel

    x, y = _data(2000)
    df = _df(spark, x, y)
    est = KerasEstimator(
        model=_build(0.02), epochs=2, batchSize=32, syncInterval=5, fit_options={"progress": False}
    )
    fitted = est.fit(df)
    assert est.history.history["loss"][-1] < 0.3
    test_x, test_y = _data(400, seed=5)
    test_df = _df(spark, test_x, test_y, partitions=4)
    fitted.setBatchSize(25)  # many batches per partition
    out = fitted.transform(test_df).select("features", "prediction").collect()
    assert fitted.model_loads <= 2  # once per Python worker, not per batch (16 batches)
    got = np.array([r["prediction"] for r in out], dtype=np.float32)
    feats = np.array([r["features"] for r in out], dtype=np.float32)
    want = fitted.model.predict(feats, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    path = str(tmp_path / "model")
    fitted.write().overwrite().save(path)
    loaded = KerasModel.load(path)
    assert loaded.getOrDefault("featuresCol") == "features"
    again = loaded.transform(test_df).select("features", "prediction").collect()
    got2 = np.array([r["prediction"] for r in again], dtype=np.float32)
    feats2 = np.array([r["features"] for r in again], dtype=np.float32)
    np.testing.assert_allclose(got2, fitted.model.predict(feats2, verbose=0), rtol=1e-5, atol=1e-5)
    for a, b in zip(loaded.model.get_weights(), fitted.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# -- bad input: a clear error naming what is wrong, in bounded time ---------------------------


def _fails(match: str, fn, *args, **kwargs) -> None:
    started = time.monotonic()
    with pytest.raises(TensorSparkValueError, match=match):
        fn(*args, **kwargs)
    assert time.monotonic() - started < 120


def test_missing_column(train_df):
    from tensorspark.keras import fit

    _fails(
        "no feature column 'pixels'.*features \\(array<float>\\)",
        fit,
        _build(),
        train_df,
        features_col="pixels",
    )
    _fails("no label column 'y'", fit, _build(), train_df, label_col="y")


def test_non_numeric_label(spark):
    from tensorspark.keras import fit

    df = spark.createDataFrame([([0.0] * DIM, "cat"), ([1.0] * DIM, "dog")], ["features", "label"])
    _fails("label column 'label' has type string, which is not numeric", fit, _build(), df)


def test_wrong_feature_length(spark):
    from tensorspark.keras import fit

    df = spark.createDataFrame([([0.0] * 5, 1), ([1.0] * 5, 0)], ["features", "label"])
    _fails(
        r"each row has 5 feature values but the model's input shape \(8,\) needs 8",
        fit,
        _build(),
        df,
        progress=False,
    )


def test_uncompiled_model(train_df):
    import keras

    from tensorspark.keras import fit

    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(2)])
    _fails("the model is not compiled; call model.compile", fit, model, train_df)


def test_empty_dataframe(spark):
    from tensorspark.keras import fit

    df = spark.createDataFrame([], "features array<float>, label long")
    _fails("the training DataFrame is empty", fit, _build(), df)


def test_loss_turning_nan_keeps_the_last_good_model(spark):
    from tensorspark.keras import fit

    x, y = _data(1200)
    x[900:] = np.nan  # late rows poison the loss after some good syncs
    df = _df(spark, x, y, partitions=1)
    model = _build(0.01, activation=None)  # relu would turn NaN inputs into 0
    before = [w.copy() for w in model.get_weights()]
    _fails(
        "the loss became NaN or Inf before step .* nothing from this interval was pushed",
        fit,
        model,
        df,
        batch_size=50,
        sync_interval=2,
        shuffle=False,
        progress=False,
    )
    after = model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("update", ["delta", "gradient"])
def test_mixed_float16_trains_with_float32_weights_on_the_server(train_df, update):
    """The global mixed_float16 policy: float16 compute in the tasks, float32 weights synced.

    Plain SGD, whose step scales with the gradient, so a loss scale left in
    the applied gradients (2**15) would stop it from learning.
    """
    import keras

    from tensorspark.keras import fit

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _build(0.1, optimizer="sgd")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[0].compute_dtype == "float16"
    xv, yv = _data(500, seed=7)
    model, history = fit(
        model,
        train_df,
        epochs=1,
        batch_size=32,
        sync_interval=4,
        update=update,
        validation_data=(xv, yv),
        progress=False,
    )
    assert model.layers[0].compute_dtype == "float16"
    assert all(w.dtype == "float32" for w in model.weights)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert history.history["val_accuracy"][-1] > 0.9
    assert all(w["pushes"] > 0 for w in history.workers[-1])
