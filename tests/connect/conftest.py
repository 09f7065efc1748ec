"""A real local Spark Connect server, started by the tests, and its client session.

These tests run in a pytest process of their own (``make test-python`` runs
``tests/connect`` after ``tests/python``): a classic SparkContext in the
same process would make ``SparkSession.builder.remote("local...")`` reuse
it instead of starting a Connect server.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The server's Python workers import the model builders of these modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_HERE, os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def connect(tmp_path_factory):
    """A Spark Connect session on a local server (2 cores, 3 retries per task)."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.remote("local[2,4]")
        .appName("tensorspark-connect-tests")
        .config("spark.local.dir", str(tmp_path_factory.mktemp("spark-local")))
        .getOrCreate()
    )
    assert type(session).__module__.startswith("pyspark.sql.connect")
    yield session
    session.stop()
