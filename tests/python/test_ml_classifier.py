"""Spark ML classifier and regressor conventions on real Spark local[2] and TensorFlow.

KerasClassifier / KerasRegressor with Spark's own evaluators, Pipeline,
CrossValidator, TrainValidationSplit and the save/load of unfitted and
fitted pipelines, estimators and validator models. Small blobs that a one-layer
model learns in an epoch or two keep the file cheap.
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorspark import TensorSparkValueError

pytestmark = pytest.mark.slow

DIM = 4
SPECIES = ("setosa", "versicolor", "virginica")


def _blobs(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs: features (n, DIM) and class indices."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(classes, DIM) - 1.0
    y = rng.integers(0, classes, n)
    return (centres[y] + 0.5 * rng.normal(size=(n, DIM))).astype(np.float32), y


def _softmax_model(lr: float = 0.1):
    import keras

    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(
        keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def _logits_model():
    import keras

    keras.utils.set_random_seed(12)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(3)])
    model.compile(
        keras.optimizers.Adam(0.001),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def build_sigmoid():
    """A builder function (module level: the tasks import it by name)."""
    import keras

    keras.utils.set_random_seed(13)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(0.001), "binary_crossentropy", metrics=["accuracy"])
    return model


def _common(**extra):
    return dict(batchSize=16, syncInterval=4, fit_options={"progress": False}, **extra)


def _params(stage):
    return {p.name: v for p, v in stage.extractParamMap().items()}


def _assembled(species_df):
    """Indexed labels and assembled features in one partition (one task per fit)."""
    from pyspark.ml.feature import StringIndexer, VectorAssembler

    indexed = StringIndexer(inputCol="species", outputCol="label").fit(species_df)
    assembler = VectorAssembler(inputCols=["a", "b", "c", "d"], outputCol="features")
    return assembler.transform(indexed.transform(species_df)).coalesce(1)


def _collect(df, *cols):
    rows = df.select(*cols).collect()
    return [
        np.array([r[c].toArray() if hasattr(r[c], "toArray") else r[c] for r in rows]) for c in cols
    ]


@pytest.fixture(scope="module")
def species_df(spark):
    """Iris-like rows: four numeric columns and a string class name."""
    x, y = _blobs(240, 3, seed=1)
    rows = [(*map(float, x[i]), SPECIES[y[i]]) for i in range(len(x))]
    return spark.createDataFrame(rows, ["a", "b", "c", "d", "species"]).repartition(2).cache()


@pytest.fixture(scope="module")
def pipeline_run(species_df, tmp_path_factory):
    """StringIndexer -> VectorAssembler -> KerasClassifier saved unfitted and loaded; the
    loaded pipeline fitted, its output, the fitted pipeline reloaded."""
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import StringIndexer, VectorAssembler

    from tensorspark.ml import KerasClassifier

    model = _softmax_model()
    initial = [w.copy() for w in model.get_weights()]
    pipeline = Pipeline(
        stages=[
            StringIndexer(inputCol="species", outputCol="label"),
            VectorAssembler(inputCols=["a", "b", "c", "d"], outputCol="features"),
            KerasClassifier(model=model, **_common()),
        ]
    )
    root = tmp_path_factory.mktemp("pipeline")
    pipeline.write().save(str(root / "unfitted"))
    unfitted = Pipeline.load(str(root / "unfitted"))
    fitted = unfitted.fit(species_df)
    out = fitted.transform(species_df).cache()
    fitted.write().overwrite().save(str(root / "model"))
    yield fitted, out, PipelineModel.load(str(root / "model")), model, initial, pipeline, unfitted
    out.unpersist()


def test_pipeline_gives_spark_ml_classifier_columns(pipeline_run):
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import DoubleType

    from tensorspark.ml import KerasClassificationModel

    fitted, out, _, model, initial, _, _ = pipeline_run
    stage = fitted.stages[-1]
    assert isinstance(stage, KerasClassificationModel)
    assert stage.getOutputKind() == "probabilities" and stage.numClasses == 3
    # The estimator trained a copy: the model it was given is untouched.
    for a, b in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(a, b)

    types = {f.name: f.dataType for f in out.schema.fields}
    assert isinstance(types["rawPrediction"], VectorUDT)
    assert isinstance(types["probability"], VectorUDT)
    assert isinstance(types["prediction"], DoubleType) and isinstance(types["label"], DoubleType)

    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(out)
    assert accuracy > 0.9  # chance is 1/3

    raw, prob, pred, feats = _collect(out, "rawPrediction", "probability", "prediction", "features")
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred, prob.argmax(axis=1).astype(np.float64))
    np.testing.assert_allclose(prob, stage.model.predict(feats, verbose=0), rtol=1e-5, atol=1e-6)
    # Margins are the log of a probability output: softmax(raw) == probability.
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), prob, rtol=1e-4, atol=1e-6)


def test_pipeline_model_reloads_with_its_params_and_predictions(species_df, pipeline_run):
    from tensorspark.ml import KerasClassificationModel

    _, out, loaded, _, _, _, _ = pipeline_run
    stage = loaded.stages[-1]
    assert isinstance(stage, KerasClassificationModel)
    assert stage.getRawPredictionCol() == "rawPrediction"
    assert stage.getProbabilityCol() == "probability"
    assert stage.getOutputKind() == "probabilities"
    cols = ("species", "label", "rawPrediction", "probability", "prediction")
    # The same cached rows in the same order: mapInArrow keeps it.
    before = _collect(out, *cols)
    after = _collect(loaded.transform(species_df), *cols)
    assert before[0].tolist() == after[0].tolist()
    for a, b in zip(before[1:], after[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_unfitted_pipeline_reloads_its_estimator(pipeline_run):
    from tensorspark.ml import KerasClassifier

    _, _, _, _, initial, pipeline, unfitted = pipeline_run
    names = [type(s).__name__ for s in unfitted.getStages()]
    assert names == ["StringIndexer", "VectorAssembler", "KerasClassifier"]
    est, again = pipeline.getStages()[-1], unfitted.getStages()[-1]
    assert type(again) is KerasClassifier and again.uid == est.uid
    assert _params(again) == _params(est) and again.getBatchSize() == 16
    assert again.fit_options == est.fit_options == {"progress": False}
    # The model as every fit starts from it, untouched by the loaded estimator's fit.
    for a, b in zip(again.model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(a, b)


def test_binary_sigmoid_classifier_from_a_builder(spark):
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.linalg import Vectors

    from tensorspark.ml import KerasClassifier

    x, y = _blobs(200, 2, seed=2)
    rows = [(Vectors.dense(x[i].tolist()), float(y[i])) for i in range(len(x))]
    df = spark.createDataFrame(rows, ["features", "label"]).repartition(2)
    # The builder's rate (0.001) is too slow for one epoch: learningRate sets it.
    est = KerasClassifier(model=build_sigmoid, learningRate=0.1, **_common())
    fitted = est.fit(df)
    assert fitted.getOutputKind() == "probabilities" and fitted.numClasses == 2
    out = fitted.transform(df).cache()
    auc = BinaryClassificationEvaluator(metricName="areaUnderROC").evaluate(out)
    assert auc > 0.9
    raw, prob, pred, feats = _collect(out, "rawPrediction", "probability", "prediction", "features")
    p = fitted.model.predict(feats, verbose=0)[:, 0]
    np.testing.assert_allclose(prob[:, 1], p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prob[:, 0], 1.0 - p, rtol=1e-5, atol=1e-6)
    # Log-odds, as LogisticRegression: [-z, z].
    q = np.clip(p.astype(np.float64), 1e-15, 1 - 1e-15)
    np.testing.assert_allclose(raw[:, 1], np.log(q / (1 - q)), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(raw[:, 0], -raw[:, 1])
    np.testing.assert_array_equal(pred, (p > 0.5).astype(np.float64))
    out.unpersist()


def test_regressor_prediction_is_a_double(spark):
    import keras
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.sql.types import DoubleType

    from tensorspark.ml import KerasRegressionModel, KerasRegressor

    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, DIM))
    target = x @ np.array([0.5, -0.3, 0.2, 0.1]) + 0.05 * rng.normal(size=200)
    rows = [(x[i].tolist(), float(target[i])) for i in range(len(x))]
    # One task: no race between pushes, so the fit (and r2) is the same every run.
    df = spark.createDataFrame(rows, "features array<double>, label double").coalesce(1)
    keras.utils.set_random_seed(14)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.2), "mse")
    fitted = KerasRegressor(model=model, **_common()).fit(df)
    assert isinstance(fitted, KerasRegressionModel)
    out = fitted.transform(df)
    assert isinstance(out.schema["prediction"].dataType, DoubleType)
    r2 = RegressionEvaluator(metricName="r2").evaluate(out)
    assert r2 > 0.95


def test_cross_validator_searches_epochs_batch_size_and_learning_rate(species_df, tmp_path):
    import keras
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, CrossValidatorModel, ParamGridBuilder

    from tensorspark.ml import KerasClassificationModel, KerasClassifier

    # One partition: one task (and one model trace) per fit and per evaluation.
    df = _assembled(species_df)
    starts, epochs_run = [], []

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            starts.append([w.copy() for w in self.model.get_weights()])
            epochs_run.append(0)

        def on_epoch_end(self, epoch, logs=None):
            epochs_run[-1] += 1

    model = _logits_model()
    initial = model.get_weights()
    est = KerasClassifier(
        model=model, epochs=2, batchSize=32, syncInterval=4, fit_options={"progress": False}
    )
    est.fit_options["callbacks"] = [Record()]
    # lr 1e-6 cannot leave the random start; 0.1 learns. The grid's epochs
    # and batchSize override the estimator's (2 and 32).
    grid = (
        ParamGridBuilder()
        .addGrid(est.learningRate, [1e-6, 0.1])
        .addGrid(est.epochs, [1])
        .addGrid(est.batchSize, [16])
        .build()
    )
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    cv = CrossValidator(
        estimator=est, estimatorParamMaps=grid, evaluator=evaluator, numFolds=2, seed=5
    )
    cv_model = cv.fit(df)
    assert len(cv_model.avgMetrics) == len(grid) == 2
    assert int(np.argmax(cv_model.avgMetrics)) == 1
    assert cv_model.avgMetrics[1] > 0.9 > cv_model.avgMetrics[0] + 0.05
    assert isinstance(cv_model.bestModel, KerasClassificationModel)
    assert cv_model.bestModel.getOutputKind() == "logits"
    # 2 folds x 2 points, then the best point on all rows: each from the same start.
    assert len(starts) == 5 and epochs_run == [1] * 5
    for start in starts + [model.get_weights()]:  # the model given is untouched too
        for a, b in zip(start, initial, strict=True):
            np.testing.assert_array_equal(a, b)

    # The callback cannot be saved: the error names it, then it is dropped.
    path = str(tmp_path / "cv")
    with pytest.raises(TensorSparkValueError, match=r"fit option 'callbacks' holds a .*Record"):
        cv_model.write().save(path)
    cv_model.getEstimator().fit_options.pop("callbacks")
    cv_model.write().overwrite().save(path)
    loaded = CrossValidatorModel.load(path)
    assert loaded.avgMetrics == cv_model.avgMetrics and loaded.getNumFolds() == 2
    again = loaded.getEstimator()
    assert type(again) is KerasClassifier and _params(again) == _params(est)
    assert again.fit_options == {"progress": False}
    grid_again = [{p.name: v for p, v in m.items()} for m in loaded.getEstimatorParamMaps()]
    assert grid_again == [{p.name: v for p, v in m.items()} for m in grid]
    assert all(p.parent == again.uid for m in loaded.getEstimatorParamMaps() for p in m)
    best = loaded.bestModel
    assert isinstance(best, KerasClassificationModel) and best.getOutputKind() == "logits"
    for a, b in zip(best.model.get_weights(), cv_model.bestModel.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_validation_split_fits_transforms_saves_and_loads(species_df, tmp_path):
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import VectorUDT
    from pyspark.ml.tuning import ParamGridBuilder, TrainValidationSplit, TrainValidationSplitModel
    from pyspark.sql.types import DoubleType

    from tensorspark.ml import KerasClassificationModel, KerasClassifier

    df = _assembled(species_df)
    est = KerasClassifier(model=_logits_model(), **_common())
    grid = ParamGridBuilder().addGrid(est.learningRate, [1e-6, 0.1]).build()
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    tvs = TrainValidationSplit(
        estimator=est, estimatorParamMaps=grid, evaluator=evaluator, trainRatio=0.75, seed=6
    )
    tvs_model = tvs.fit(df)
    metrics = tvs_model.validationMetrics
    assert len(metrics) == 2 and metrics[1] > 0.9 > metrics[0] + 0.05
    # The evaluations above read the transformed columns already: the schema suffices here.
    types = {f.name: f.dataType for f in tvs_model.transform(df).schema.fields}
    assert isinstance(types["rawPrediction"], VectorUDT)
    assert isinstance(types["probability"], VectorUDT)
    assert isinstance(types["prediction"], DoubleType)

    path = str(tmp_path / "tvs")
    tvs_model.write().save(path)
    loaded = TrainValidationSplitModel.load(path)
    assert loaded.validationMetrics == metrics and loaded.getTrainRatio() == 0.75
    again = loaded.getEstimator()
    assert type(again) is KerasClassifier and _params(again) == _params(est)
    rates = [m[again.learningRate] for m in loaded.getEstimatorParamMaps()]
    assert rates == [1e-6, 0.1]
    best = loaded.bestModel
    assert isinstance(best, KerasClassificationModel) and best.getOutputKind() == "logits"
    for a, b in zip(best.model.get_weights(), tvs_model.bestModel.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def _build_closure(rate):
    def build():  # a closure: cloudpickle saves it by value
        return _softmax_model(rate)

    return build


def test_estimator_with_a_builder_round_trips(spark, tmp_path):
    from tensorspark.ml import KerasClassifier, KerasEstimator, KerasRegressor

    options = {
        "progress": False,
        "seed": 3,
        "name": "blobs",
        "checkpoint_every_s": 2.5,
        "log_dir": None,
        "servers": ["ps0:7000", "ps1:7000"],
    }
    est = KerasClassifier(
        model=_build_closure(0.05),
        learningRate=0.2,
        epochs=2,
        outputKind="probabilities",
        probabilityCol="",
        fit_options=options,
    )
    path = str(tmp_path / "est")
    est.write().save(path)
    loaded = KerasEstimator.load(path)  # a saved subclass loads as itself
    assert type(loaded) is KerasClassifier and loaded.uid == est.uid
    assert _params(loaded) == _params(est) and loaded.getLearningRate() == 0.2
    assert loaded.getProbabilityCol() == "" and loaded.fit_options == options
    model, want = loaded.model(), est.model()
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)
    for a, b in zip(model.get_weights(), want.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TensorSparkValueError, match="holds a tensorspark.ml.KerasClassifier, not"):
        KerasRegressor.load(path)
    # A module-level builder is saved by reference.
    KerasEstimator(model=build_sigmoid).write().save(str(tmp_path / "ref"))
    assert KerasEstimator.load(str(tmp_path / "ref")).model is build_sigmoid


def test_unsavable_fit_options_are_refused_naming_the_option(spark, tmp_path):
    import keras

    from tensorspark.ml import KerasEstimator

    x = np.zeros((2, DIM), np.float32)
    path = tmp_path / "est"
    est = KerasEstimator(model=build_sigmoid)
    for key, value, what in (
        ("callbacks", [keras.callbacks.EarlyStopping()], "a keras.*EarlyStopping"),
        ("validation_data", spark.range(2), "a pyspark.*DataFrame"),
        ("validation_data", (x, x[:, 0]), "a tuple"),
        ("checkpoint_every_s", float("nan"), "the float nan"),
        ("custom_objects", {"Dense": keras.layers.Dense}, "the class keras.*Dense"),
    ):
        est.fit_options = {"progress": False, key: value}
        with pytest.raises(TensorSparkValueError, match=f"option '{key}' holds {what}.*drop it"):
            est.write().save(str(path))
    est.fit_options = {"secret": b"s3cr3t"}
    with pytest.raises(TensorSparkValueError, match="'secret' is never saved; drop it"):
        est.write().save(str(path))
    assert not path.exists()  # refused before anything is written


def test_copy_is_independent_and_takes_the_extra_params(spark):
    from tensorspark.ml import KerasClassifier

    x, y = _blobs(60, 3, seed=4)
    rows = [(x[i].tolist(), float(y[i])) for i in range(len(x))]
    df = spark.createDataFrame(rows, "features array<float>, label double").coalesce(1)
    est = KerasClassifier(model=_softmax_model(), epochs=3, **_common())
    copy = est.copy({est.epochs: 1, est.batchSize: 20})
    assert copy.fit_options == est.fit_options and copy.fit_options is not est.fit_options
    copy.fit_options["shuffle"] = False
    assert "shuffle" not in est.fit_options
    assert (est.getOrDefault("epochs"), est.getBatchSize()) == (3, 16)
    copy.fit(df)
    assert copy.history.epoch == [0] and est.history is None
    assert [w["steps"] for w in copy.history.workers[-1]] == [3]  # 60 rows / 20


# -- bad input: a clear error naming what is wrong --------------------------------------------


def test_non_integral_label_is_refused_naming_the_column(spark):
    from tensorspark.ml import KerasClassifier

    rows = [([0.0] * DIM, 0.0), ([1.0] * DIM, 1.5), ([2.0] * DIM, 2.0)]
    df = spark.createDataFrame(rows, "features array<float>, target double").coalesce(1)
    est = KerasClassifier(model=_softmax_model(), labelCol="target", **_common())
    with pytest.raises(TensorSparkValueError, match=r"label column 'target' has 1\.5 in row 1"):
        est.fit(df)


def test_model_outputs_that_fit_no_convention_are_refused():
    import keras

    from tensorspark.keras import _spec

    def build(units, activation, loss):
        m = keras.Sequential(
            [keras.Input((DIM,)), keras.layers.Dense(units, activation=activation)]
        )
        m.compile("adam", loss)
        return m

    bce_logits = keras.losses.BinaryCrossentropy(from_logits=True)
    assert _spec.classifier_output(build(1, None, bce_logits)) == ("logits", 1)
    assert _spec.classifier_output(build(3, "log_softmax", "mse")) == ("logits", 3)
    assert _spec.classifier_output(build(3, "relu", "mse"), "logits") == ("logits", 3)
    with pytest.raises(TensorSparkValueError, match="cannot tell.*set outputKind"):
        _spec.classifier_output(build(3, None, "sparse_categorical_crossentropy"))
    with pytest.raises(TensorSparkValueError, match="3 sigmoid units .*multi-label"):
        _spec.classifier_output(build(3, "sigmoid", "binary_crossentropy"))
    with pytest.raises(TensorSparkValueError, match="one-hot labels.*sparse_categorical"):
        _spec.classifier_output(build(3, "softmax", "categorical_crossentropy"))
    with pytest.raises(TensorSparkValueError, match="one output unit per class"):
        _spec.classifier_output(build(1, None, "sparse_categorical_crossentropy"))
    with pytest.raises(TensorSparkValueError, match="outputKind must be one of"):
        _spec.classifier_output(build(3, "softmax", "mse"), "probs")
    with pytest.raises(TensorSparkValueError, match="one output value per row; this one gives 3"):
        _spec.regression_output(build(3, None, "mse"))


def test_binary_logits_become_sigmoid_probabilities():
    from tensorspark.keras._inference import OutputColumns

    z = np.array([[-2.0], [0.0], [3.0]], np.float32)
    cols = OutputColumns("logits", "prediction", 1, "rawPrediction", "probability")
    raw, prob, pred = cols.arrays(z)
    p = 1.0 / (1.0 + np.exp(-z[:, 0].astype(np.float64)))
    np.testing.assert_allclose(np.array(prob.field("values").to_pylist()), np.c_[1 - p, p])
    np.testing.assert_allclose(np.array(raw.field("values").to_pylist()), np.c_[-z, z])
    assert pred.to_pylist() == [0.0, 0.0, 1.0]
    assert cols.names() == ["rawPrediction", "probability", "prediction"]
    skip = OutputColumns("logits", "prediction", 1, "", "probability")
    assert skip.names() == ["probability", "prediction"] and len(skip.arrays(z)) == 2


def test_class_labels_are_fed_as_the_loss_needs_and_checked():
    import pyarrow as pa

    from tensorspark.runtime.feed import class_labels

    doubles = pa.array([0.0, 2.0, 1.0])
    got = class_labels(doubles, "label", 3, as_int=True)
    assert got.dtype == np.int64 and got.tolist() == [0, 2, 1]
    got = class_labels(pa.array([1, 0], pa.int64()), "label", 2, as_int=False)
    assert got.dtype == np.float32 and got.tolist() == [1.0, 0.0]
    for bad, what in (([0.0, 3.0], "3.0 in row 1"), ([float("nan")], "nan in row 0")):
        with pytest.raises(TensorSparkValueError, match=f"label column 'y' has {what}.*0.0, 1.0"):
            class_labels(pa.array(bad), "y", 3, as_int=True)
    with pytest.raises(TensorSparkValueError, match="label column 'y' has a null in row 1"):
        class_labels(pa.array([1.0, None]), "y", 3, as_int=True)
    with pytest.raises(TensorSparkValueError, match="one class index per row"):
        class_labels(pa.array([[1.0]]), "y", 3, as_int=True)
