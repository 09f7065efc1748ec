"""Shared fixtures: a real Spark local[2] context and a per-test TF graph."""

from __future__ import annotations

import os
import sys

import pytest

# Spark's Python workers must run this interpreter (it has TensorFlow and
# tensorspark installed).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Functions defined in test modules (model builders) are pickled by
# reference, so the workers must be able to import the test modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_HERE, os.environ.get("PYTHONPATH", "")) if p
)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def spark_tmp_dir(tmp_path_factory):
    """The seed's spark.tmp.dir setting, pointed at a fresh directory."""
    return tmp_path_factory.mktemp("spark-tmp")


@pytest.fixture(scope="session")
def sc(spark_tmp_dir):
    import pyspark

    conf = (
        pyspark.SparkConf()
        .setMaster("local[2]")
        .setAppName("tensorspark-tests")
        .set("spark.ui.enabled", "false")
        .set("spark.ui.showConsoleProgress", "false")
        .set("spark.driver.memory", "2g")
        .set("spark.tmp.dir", str(spark_tmp_dir))
    )
    context = pyspark.SparkContext(conf=conf)
    context.setLogLevel("ERROR")
    yield context
    context.stop()


@pytest.fixture
def tf1():
    """``tensorflow.compat.v1`` building a fresh default graph (graph mode)."""
    import tensorflow.compat.v1 as tf

    # Graph mode only inside this graph: disable_v2_behavior() would be
    # process-wide and final, and the Keras tests in this process need eager.
    with tf.Graph().as_default():
        yield tf


@pytest.fixture(scope="session")
def spark(sc):
    """A SparkSession on the shared local[2] context (DataFrames)."""
    from pyspark.sql import SparkSession

    return SparkSession.builder.getOrCreate()
