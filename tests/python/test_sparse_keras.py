"""ParameterServerEmbedding on real Spark and a real parameter server.

The parity test holds tensorspark with one worker and ``sync_interval=1``
against plain Keras with ``keras.layers.Embedding`` on the same batches.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import start_ps

VOCAB, DIM = 40, 4


@pytest.fixture(scope="module")
def spark(sc):
    from pyspark.sql import SparkSession

    return SparkSession(sc)


def _rows(n: int = 512, seed: int = 0, unique_per: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, n)
    if unique_per:  # every block of VOCAB rows a permutation: no id twice in a batch
        ids = np.concatenate([rng.permutation(VOCAB) for _ in range(n // VOCAB + 1)])[:n]
    dense = rng.normal(size=(n, 3)).astype(np.float32)
    label = ((ids % 3 == 0) ^ (dense[:, 0] > 0.5)).astype(np.int64)
    return ids, dense, label


def _df(spark, ids, dense, label, partitions=1):
    rows = [
        (int(i), [float(v) for v in d], int(y)) for i, d, y in zip(ids, dense, label, strict=True)
    ]
    return spark.createDataFrame(rows, "item long, feats array<float>, label long").coalesce(
        partitions
    )


def _model(embedding, seed: int = 3, optimizer=None):
    import keras

    keras.utils.set_random_seed(seed)
    item = keras.Input(shape=(1,), dtype="int64", name="item")
    dense = keras.Input(shape=(3,), name="feats")
    e = keras.layers.Flatten()(embedding(item))
    h = keras.layers.Concatenate()([e, dense])
    h = keras.layers.Dense(8, activation="relu")(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model([item, dense], out)
    model.compile(optimizer=optimizer or keras.optimizers.Adagrad(0.1), loss="binary_crossentropy")
    return model


# Keras 3's Adagrad adds the square of each duplicate of an id's gradient
# separately (IndexedSlices); the server sums a row's gradients first, as a
# dense gradient does. So the Adagrad case feeds batches without duplicates.
@pytest.mark.parametrize(
    ("optimizer", "batch_size"), [("sgd", 32), ("adagrad", VOCAB)], ids=["sgd", "adagrad"]
)
def test_layer_trains_like_keras_embedding(spark, optimizer, batch_size):
    """One worker, sync_interval=1, no prefetch: the losses and weights of plain Keras."""
    import keras
    import tensorflow as tf

    import tensorspark
    import tensorspark.keras
    from tensorspark.keras.layers import ParameterServerEmbedding

    def opt():
        return keras.optimizers.SGD(0.5) if optimizer == "sgd" else keras.optimizers.Adagrad(0.1)

    # The dense weights train with stateless SGD: a Keras optimizer's state
    # lives in the Python worker, and Spark may run epoch 2 on another one.
    ids, dense, label = _rows(unique_per=VOCAB if optimizer == "adagrad" else 0)
    ps_layer = ParameterServerEmbedding(VOCAB, DIM, optimizer=opt())
    model = _model(ps_layer, optimizer=keras.optimizers.SGD(0.5))
    ref_layer = keras.layers.Embedding(VOCAB, DIM)
    ref = _model(ref_layer, optimizer=keras.optimizers.SGD(0.5))
    emb_opt, dense_opt = opt(), keras.optimizers.SGD(0.5)
    # Same starting point: the server's initial rows and the same dense weights.
    ref_layer.set_weights([ps_layer.initial_rows(np.arange(VOCAB))])
    dense_w = [w for layer in model.layers if layer is not ps_layer for w in layer.get_weights()]
    ref_w = [w for layer in ref.layers if layer is not ref_layer for w in layer.get_weights()]
    assert [w.shape for w in dense_w] == [w.shape for w in ref_w]
    for layer, src in zip(
        [x for x in ref.layers if x is not ref_layer],
        [x for x in model.layers if x is not ps_layer],
        strict=True,
    ):
        layer.set_weights(src.get_weights())

    bs = batch_size
    losses = []
    for _ in range(2):
        epoch_losses = []
        for i in range(0, len(ids), bs):
            sl = slice(i, i + bs)
            with tf.GradientTape() as tape:  # Keras' optimizers, the table's apart
                pred = ref({"item": ids[sl].reshape(-1, 1), "feats": dense[sl]}, training=True)
                loss = keras.losses.binary_crossentropy(label[sl].astype("float32"), pred[:, 0])
                loss = tf.reduce_mean(loss)
            others = [v for v in ref.trainable_variables if v is not ref_layer.embeddings]
            grads = tape.gradient(loss, [ref_layer.embeddings, *others])
            emb_opt.apply(grads[:1], [ref_layer.embeddings])
            dense_opt.apply(grads[1:], others)
            epoch_losses.append(float(loss) * len(ids[sl]))
        losses.append(sum(epoch_losses) / len(ids))

    trained, history = tensorspark.keras.fit(
        model,
        _df(spark, ids, dense, label),
        features_col=None,
        label_col="label",
        epochs=2,
        batch_size=bs,
        sync_interval=1,
        shuffle=False,
        prefetch_rows=False,
        progress=False,
    )
    np.testing.assert_allclose(history.history["loss"], losses, rtol=1e-5)
    got = next(x for x in trained.layers if isinstance(x, ParameterServerEmbedding))
    np.testing.assert_allclose(
        got.embeddings.numpy(), ref_layer.embeddings.numpy(), rtol=1e-4, atol=1e-5
    )
    preds = trained.predict({"item": ids[:64].reshape(-1, 1), "feats": dense[:64]}, verbose=0)
    want = ref.predict({"item": ids[:64].reshape(-1, 1), "feats": dense[:64]}, verbose=0)
    np.testing.assert_allclose(preds, want, rtol=1e-3, atol=1e-4)
    rows = sum(r["rows_pulled"] for epoch in history.workers for r in epoch)
    assert 0 < rows <= 2 * (len(ids) // bs + 1) * VOCAB


def _ctr_rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 10**12, n)  # dynamic ids far outside any fixed range
    user_pool = rng.choice(users, 60)
    user = user_pool[rng.integers(0, 60, n)]
    tags = [rng.integers(0, 30, rng.integers(0, 5)).tolist() for _ in range(n)]
    city = [f"city-{c}" for c in rng.integers(0, 12, n)]
    label = np.array(
        [(u % 2 == 0) or (len(t) and t[0] < 10) for u, t in zip(user, tags, strict=True)],
        np.int64,
    )
    return user, tags, city, label


def _ctr_model():
    import keras

    from tensorspark.keras.layers import ParameterServerEmbedding

    keras.utils.set_random_seed(5)
    user = keras.Input(shape=(1,), dtype="int64", name="user")
    tags = keras.Input(shape=(None,), dtype="int64", name="tags")
    city = keras.Input(shape=(1,), dtype="int64", name="city")
    opt = keras.optimizers
    u = ParameterServerEmbedding(None, 8, optimizer=opt.Adam(0.02), name="u")
    t = ParameterServerEmbedding(30, 8, optimizer=opt.Adagrad(0.2), combiner="mean", name="t")
    c = ParameterServerEmbedding(None, 4, optimizer=opt.SGD(0.2), name="c")
    flat = keras.layers.Flatten
    parts = [flat()(u(user)), t(tags), flat()(c(city))]
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()(parts))
    model = keras.Model([user, tags, city], keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(optimizer=opt.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def _ctr_df(spark, user, tags, city, label):
    rows = list(zip(map(int, user), tags, city, map(int, label), strict=True))
    return spark.createDataFrame(rows, "user long, tags array<long>, city string, label long")


def test_multi_input_dynamic_multi_hot_and_string_ids(spark, tmp_path):
    """Dynamic ids, multi-hot array<long> (mean), hashed strings; two servers; export."""
    import keras

    import tensorspark
    import tensorspark.keras
    from tensorspark.keras.layers import ParameterServerEmbedding

    user, tags, city, label = _ctr_rows(1500, 1)
    df = _ctr_df(spark, user, tags, city, label).repartition(2)
    first, port1, secret = start_ps(tmp_path)
    second, port2, _ = start_ps(tmp_path, secret=secret)
    procs = [(first, port1), (second, port2)]
    try:
        servers = [f"127.0.0.1:{port}" for _, port in procs]
        trained, history = tensorspark.keras.fit(
            _ctr_model(),
            df,
            features_col=None,
            label_col="label",
            epochs=4,
            batch_size=32,
            sync_interval=4,
            servers=servers,
            secret=secret,
            progress=False,
            save_path=str(tmp_path / "ctr.keras"),
        )
    finally:
        for proc, _ in procs:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
    loss = history.history["loss"]
    assert loss[-1] < loss[0] and history.history["accuracy"][-1] > 0.7, history.history
    by_name = {x.name: x for x in trained.layers if isinstance(x, ParameterServerEmbedding)}
    assert by_name["u"].stored_rows == len(set(user.tolist()))  # every trained id, no others
    assert by_name["t"].embeddings.shape == (30, 8)  # a fixed vocabulary: materialized
    assert by_name["c"].stored_rows == 12
    reloaded = keras.saving.load_model(str(tmp_path / "ctr.keras"))
    from tensorspark.tables import hash_strings

    x = {
        "user": user[:50].reshape(-1, 1),
        "tags": np.array([(t + [-1] * 5)[:5] for t in tags[:50]], np.int64),
        "city": hash_strings(city[:50]).reshape(-1, 1),
    }
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), trained.predict(x, verbose=0), rtol=1e-6
    )
    acc = np.mean((trained.predict(x, verbose=0)[:, 0] > 0.5) == label[:50])
    assert acc > 0.7


def test_float_ids_and_out_of_range_ids_are_named(spark):
    import tensorspark
    import tensorspark.keras
    from tensorspark.errors import TensorSparkError

    ids, dense, label = _rows(64)
    df = _df(spark, ids, dense, label)
    from tensorspark.keras.layers import ParameterServerEmbedding

    with pytest.raises(TensorSparkError, match=r"column 'item' feeds table 'emb'.*float ids"):
        tensorspark.keras.fit(
            _model(ParameterServerEmbedding(VOCAB, DIM, name="emb")),
            df.withColumn("item", df["item"].cast("double")),
            features_col=None,
            progress=False,
        )
    with pytest.raises(
        TensorSparkError, match=r"column 'item' holds id 4\d.*\[0, 30\) of table 'small'"
    ):
        tensorspark.keras.fit(
            _model(ParameterServerEmbedding(30, DIM, name="small")),
            df.withColumn("item", df["item"] + 10),
            features_col=None,
            progress=False,
        )


def test_full_table_with_eviction_off_fails_naming_the_table(spark):
    import tensorspark
    import tensorspark.keras
    from tensorspark.errors import TensorSparkError
    from tensorspark.keras.layers import ParameterServerEmbedding

    ids, dense, label = _rows(256)
    with pytest.raises(TensorSparkError, match=r"table 'capped'.*full"):
        tensorspark.keras.fit(
            _model(ParameterServerEmbedding(None, DIM, capacity=5, name="capped")),
            _df(spark, ids, dense, label),
            features_col=None,
            progress=False,
        )


def _resume_model():
    import keras

    from tensorspark.keras.layers import ParameterServerEmbedding

    layer = ParameterServerEmbedding(None, DIM, optimizer=keras.optimizers.Adam(0.05), name="r")
    return _model(layer, optimizer=keras.optimizers.SGD(0.2))


def test_resume_with_tables_continues_the_uninterrupted_run(spark, tmp_path):
    """One worker, SGD (stateless) for the dense part: epoch 2 after a resume is epoch 2."""
    import tensorspark
    import tensorspark.keras

    ids, dense, label = _rows(384, seed=3)
    df = _df(spark, ids, dense, label)
    kw = {
        "features_col": None,
        "batch_size": 32,
        "sync_interval": 1,
        "shuffle": False,
        "prefetch_rows": False,
        "progress": False,
    }
    straight, _ = tensorspark.keras.fit(_resume_model(), df, epochs=2, **kw)
    ckpt = str(tmp_path / "ckpt")
    tensorspark.keras.fit(_resume_model(), df, epochs=1, checkpoint_dir=ckpt, **kw)
    resumed, history = tensorspark.keras.fit(
        _resume_model(), df, epochs=2, checkpoint_dir=ckpt, resume_from=ckpt, **kw
    )
    assert history.epoch == [1] and history.resumed_version
    assert len(resumed.weights) == len(straight.weights) > 0
    for got, exp in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_predict_and_estimator_with_tables(spark, tmp_path):
    import keras

    import tensorspark
    import tensorspark.keras
    from tensorspark.ml import KerasEstimator, KerasModel

    user, tags, city, label = _ctr_rows(600, 2)
    df = _ctr_df(spark, user, tags, city, label).repartition(2)
    est = KerasEstimator(model=_ctr_model, labelCol="label", epochs=2, batchSize=32)
    fitted = est.fit(df)
    out = fitted.transform(df).select("prediction").toPandas()["prediction"].to_numpy()
    assert len(out) == 600 and ((out > 0) & (out < 1)).all()
    path = str(tmp_path / "est")
    fitted.write().save(path)
    again = KerasModel.load(path).transform(df).select("prediction").toPandas()
    np.testing.assert_allclose(again["prediction"].to_numpy(), out, rtol=1e-5)
    # tensorspark.keras.predict over the DataFrame agrees with the driver's predict
    rows = df.limit(20).toPandas()
    got = tensorspark.keras.predict(fitted.model, spark.createDataFrame(rows)).toPandas()
    from tensorspark.tables import hash_strings

    width = max(1, max(len(t) for t in rows["tags"]))
    x = {
        "user": rows["user"].to_numpy().reshape(-1, 1),
        "tags": np.array([list(t) + [-1] * (width - len(t)) for t in rows["tags"]], np.int64),
        "city": hash_strings(list(rows["city"])).reshape(-1, 1),
    }
    want = fitted.model.predict(x, verbose=0)[:, 0]
    np.testing.assert_allclose(got["prediction"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert isinstance(fitted.model, keras.Model)


def test_dim_differing_from_the_server_is_named(spark, tmp_path):
    import keras

    import tensorspark
    import tensorspark.keras
    from tensorspark.errors import TensorSparkError
    from tensorspark.keras.layers import ParameterServerEmbedding
    from tensorspark.ps import PSClient
    from tensorspark.tables import TableSpec

    proc, port, secret = start_ps(tmp_path)
    try:
        with PSClient("127.0.0.1", port, secret) as client:
            client.create_tables([TableSpec(name="shared", dim=8)])
        ids, dense, label = _rows(64)
        layer = ParameterServerEmbedding(None, DIM, name="shared")
        with pytest.raises(TensorSparkError, match=r"table 'shared'.*dim 8.*4"):
            tensorspark.keras.fit(
                _model(layer, optimizer=keras.optimizers.SGD(0.1)),
                _df(spark, ids, dense, label),
                features_col=None,
                servers=[f"127.0.0.1:{port}"],
                secret=secret,
                progress=False,
            )
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(("consistency", "update"), [("sync", "delta"), ("ssp", "gradient")])
def test_tables_train_in_every_consistency_mode(spark, consistency, update):
    """Two workers: row pushes are applied at once while the dense weights follow the mode."""
    import keras

    import tensorspark
    import tensorspark.keras
    from tensorspark.keras.layers import ParameterServerEmbedding

    ids, dense, label = _rows(640, seed=5)
    layer = ParameterServerEmbedding(VOCAB, DIM, optimizer=keras.optimizers.Adagrad(0.2))
    trained, history = tensorspark.keras.fit(
        _model(layer, optimizer=keras.optimizers.Adam(0.02)),
        _df(spark, ids, dense, label, partitions=2),
        features_col=None,
        export_tables=consistency == "sync",
        epochs=3,
        batch_size=32,
        sync_interval=2,
        consistency=consistency,
        staleness=1,
        update=update,
        progress=False,
    )
    loss = history.history["loss"]
    assert loss[-1] < loss[0] - 0.02, loss
    assert all(r["rows_pushed"] > 0 for r in history.workers[-1])
    (table,) = [x for x in trained.layers if isinstance(x, ParameterServerEmbedding)]
    # export_tables=False (ssp here): the rows stay on the server.
    assert (table.embeddings is not None) == (consistency == "sync")
