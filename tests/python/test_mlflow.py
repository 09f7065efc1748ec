"""MLflow tracking on real Spark local[2], real TensorFlow and a real MLflow file store."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from tensorspark import TensorSparkValueError

pytestmark = pytest.mark.slow

DIM = 4


def _data(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, (x.sum(axis=1) > 0).astype(np.int64)


def _build():
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def train_df(spark):
    x, y = _data()
    rows = [(x[i].tolist(), int(y[i])) for i in range(len(x))]
    return spark.createDataFrame(rows, "features array<float>, label long").repartition(2).cache()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh MLflow file store, named by MLFLOW_TRACKING_URI; a client on it."""
    import mlflow

    # Recorded as unset, so that tensorspark's opt-in to the file store is undone.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(None)  # a default ./mlruns set by a fit


def _client(uri: str):
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.MlflowClient(uri)


def _runs(client, experiment: str = "Default"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_keras_fit_logs_one_run_with_params_metrics_tags_and_model(train_df, store):
    import mlflow.keras

    from tensorspark.keras import fit

    xv, yv = _data(64, seed=3)
    model, history = fit(
        _build(),
        train_df,
        epochs=2,
        batch_size=16,
        sync_interval=3,
        validation_data=(xv, yv),
        progress=False,
        name="tiny",
        mlflow=True,
    )
    client = _client(store)
    runs = _runs(client)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == history.mlflow_run_id
    p = run.data.params
    assert (p["epochs"], p["batch_size"], p["sync_interval"]) == ("2", "16", "3")
    assert (p["consistency"], p["update"], p["name"], p["shuffle"]) == (
        "async",
        "delta",
        "tiny",
        "True",
    )
    assert p["threads_per_worker"] == "None" and p["hang_timeout"] == "600.0"
    assert p["validation_data"].startswith("[array(shape=(64, 4)")
    assert "mlflow" not in p and "_validation" not in p
    rid = run.info.run_id
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        steps = _history(client, rid, key)
        assert [s for s, _ in steps] == [0, 1]
        np.testing.assert_allclose([v for _, v in steps], history.history[key], rtol=1e-6)
    for key in ("samples_per_sec", "staleness_mean", "staleness_max", "samples"):
        assert [s for s, _ in _history(client, rid, key)] == [0, 1], key
    rates = [v for _, v in _history(client, rid, "samples_per_sec")]
    np.testing.assert_allclose(rates, history.samples_per_sec, rtol=1e-6)
    assert [v for _, v in _history(client, rid, "samples")] == [256, 256]
    tags = run.data.tags
    assert tags["tensorspark.spark_app_id"] == train_df.sparkSession.sparkContext.applicationId
    assert tags["tensorspark.run_name"] == "keras tiny" == tags["mlflow.runName"]
    assert tags["tensorspark.api"] == "keras"
    import tensorspark

    assert tags["tensorspark.version"] == tensorspark.__version__
    loaded = mlflow.keras.load_model(f"runs:/{rid}/model")
    np.testing.assert_allclose(
        loaded.predict(xv, verbose=0), model.predict(xv, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_estimator_with_a_callback_of_its_own_logs_to_the_default_mlruns(
    train_df, store, tmp_path, monkeypatch
):
    from tensorspark.ml import KerasEstimator
    from tensorspark.tracking import MlflowCallback

    class Extra(MlflowCallback):
        def on_epoch_end(self, epoch, metrics):
            super().on_epoch_end(epoch, {**metrics, "extra": 10.0 + epoch})

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    cb = Extra(experiment_name="exp", run_name="mine", tags={"team": "ads"})
    est = KerasEstimator(model=_build(), epochs=1, fit_options={"mlflow": cb, "progress": False})
    est.fit(train_df)
    assert (tmp_path / "mlruns").is_dir()
    client = _client((tmp_path / "mlruns").as_uri())
    (run,) = _runs(client, "exp")
    assert run.info.run_id == cb.run_id == est.history.mlflow_run_id
    assert run.data.params["epochs"] == "1" and run.data.params["batch_size"] == "32"
    assert run.data.tags["mlflow.runName"] == "mine" and run.data.tags["team"] == "ads"
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [0]
    assert _history(client, run.info.run_id, "extra") == [(0, 10.0)]
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id
    assert len(_runs(client)) == 0  # nothing in Default


def test_failing_fit_in_an_active_run_ends_a_nested_run_failed(train_df, store, monkeypatch):
    import keras
    import mlflow

    from tensorspark.keras import fit

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the user's own run

    class Boom(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            raise RuntimeError("boom")

    with mlflow.start_run() as parent:
        with pytest.raises(RuntimeError, match="boom"):
            fit(_build(), train_df, progress=False, callbacks=[Boom()], mlflow=True)
        assert mlflow.active_run().info.run_id == parent.info.run_id
    client = _client(store)
    (child,) = [r for r in _runs(client) if r.info.run_id != parent.info.run_id]
    assert child.info.status == "FAILED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_broken_tracking_store_warns_and_training_goes_on(train_df, store, tmp_path, caplog):
    from tensorspark.keras import fit
    from tensorspark.tracking import MlflowCallback

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    cb = MlflowCallback(tracking_uri=(blocker / "store").as_uri())
    with caplog.at_level(logging.WARNING, logger="tensorspark"):
        _, history = fit(_build(), train_df, epochs=1, progress=False, mlflow=cb)
    assert history.epoch == [0] and history.mlflow_run_id is None
    assert "MLflow could not start the run" in caplog.text


def test_tf1_session_logs_one_run_where_set_tracking_uri_says(sc, tf1, store, monkeypatch):
    import mlflow

    from tensorspark import SparkSession

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(store)

    x = tf1.placeholder(tf1.float32, [None, 2], name="x")
    y = tf1.placeholder(tf1.float32, [None], name="y")
    w = tf1.Variable(tf1.zeros([2]), name="w")
    loss = tf1.reduce_mean(tf1.square(tf1.linalg.matvec(x, w) - y))
    train = tf1.train.GradientDescentOptimizer(0.1).minimize(loss)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(200, 2)).astype(np.float32)
    rdd = sc.parallelize([(r, np.float32(r @ [1.0, -1.0])) for r in xs], 2)
    with SparkSession(
        sc, sess, user="u", name="lin", sync_interval=5, batch_size=10, progress=False, mlflow=True
    ) as ss:
        first = ss.run(train, feed_rdd=rdd, feed_name_list=[x.name, y.name], loss=loss)
        second = ss.run(
            train, feed_rdd=rdd, feed_name_list=[x.name, y.name], loss=loss, consistency="sync"
        )
    client = _client(store)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["sync_interval"], p["batch_size"], p["threads_per_task"]) == ("5", "10", "None")
    assert p["consistency"] == "async" and p["consistency.run1"] == "sync"
    assert p["weight_combiner"].startswith("MeanCombiner(")
    assert run.data.tags["tensorspark.api"] == "tf1"
    assert run.data.tags["mlflow.runName"] == "u/lin"
    losses = _history(client, run.info.run_id, "loss")
    assert [s for s, _ in losses] == [0, 1]
    np.testing.assert_allclose([v for _, v in losses], [first.loss, second.loss], rtol=1e-6)
    assert [s for s, _ in _history(client, run.info.run_id, "staleness_mean")] == [0, 1]


def test_a_model_with_a_parameter_server_embedding_logs_and_loads(store):
    import keras
    import mlflow.keras

    from tensorspark.keras import ParameterServerEmbedding
    from tensorspark.tracking import MlflowCallback, Tracker

    ids = keras.Input((3,), dtype="int64", name="ids")
    emb = ParameterServerEmbedding(50, 4, name="emb")(ids)
    model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.Flatten()(emb)))
    cb = MlflowCallback()
    tracker = Tracker(cb, "sparse", {}, {})
    tracker.model(model, None)
    tracker.close("FINISHED")
    x = np.array([[1, 2, 3], [4, 5, 49]], np.int64)
    loaded = mlflow.keras.load_model(f"runs:/{cb.run_id}/model")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    reqs = mlflow.artifacts.download_artifacts(f"runs:/{cb.run_id}/model/requirements.txt")
    with open(reqs) as f:
        assert "tensorspark==" in f.read()


def test_bad_mlflow_options_are_refused(train_df, monkeypatch):
    from tensorspark.keras import fit
    from tensorspark.tracking import MlflowCallback

    with pytest.raises(TensorSparkValueError, match="mlflow must be True, False or"):
        fit(_build(), train_df, mlflow="yes")
    with pytest.raises(TensorSparkValueError, match="pass it as mlflow=MlflowCallback"):
        fit(_build(), train_df, callbacks=[MlflowCallback()])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    with pytest.raises(TensorSparkValueError, match="pip install mlflow"):
        fit(_build(), train_df, mlflow=True)
