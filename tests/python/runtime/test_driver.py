"""The driver-side run: a refused call leaves nothing running (real Spark, real servers)."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest

from tensorspark import TensorSparkValueError


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _staging_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "tensorspark-ckpt-*")))


def _snapshot():
    return _native_threads(), _staging_dirs(), len(os.listdir("/proc/self/fd"))


def _assert_nothing_left(before):
    threads, staging, fds = before
    now = _snapshot()
    assert now[0] <= threads, "a server or helper thread was left running"
    assert now[1] == staging, "a staging directory was left behind"
    assert now[2] <= fds, "a socket or file was left open"


def test_refused_keras_fit_stops_its_server_and_staging(spark):
    from test_keras import _build, _data, _df

    import tensorspark.keras

    x, y = _data(100)
    df, model = _df(spark, x, y), _build(0.02)
    df.count()
    # Warm up what the call itself legitimately starts once (py4j, TF).
    with pytest.raises(TensorSparkValueError, match="nosuchscheme"):
        tensorspark.keras.fit(model, df, progress=False, checkpoint_dir="nosuchscheme://b/c")
    before = _snapshot()
    kept = []  # the errors and their tracebacks stay alive, as in a notebook
    for _ in range(3):  # the server starts, then the Hadoop mirror is refused
        with pytest.raises(TensorSparkValueError, match="nosuchscheme") as info:
            tensorspark.keras.fit(model, df, progress=False, checkpoint_dir="nosuchscheme://b/c")
        kept.append(info)
    _assert_nothing_left(before)


def test_refused_session_stops_its_server_and_staging(sc, tf1):
    from tensorspark import SparkSession

    sess = tf1.Session()
    with pytest.raises(TensorSparkValueError, match="nosuchscheme"):
        SparkSession(sc, sess, checkpoint_dir="nosuchscheme://b/c")
    before = _snapshot()
    kept = []  # the errors and their tracebacks stay alive, as in a notebook
    for _ in range(3):
        with pytest.raises(TensorSparkValueError, match="nosuchscheme") as info:
            SparkSession(sc, sess, checkpoint_dir="nosuchscheme://b/c")
        kept.append(info)
    _assert_nothing_left(before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_interval": 2.7}, "sync_interval must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"io_timeout": -1}, "io_timeout must be a number of seconds > 0"),
        ({"servers": ["127.0.0.1:1"]}, "needs the run's secret"),
    ],
)
def test_both_apis_refuse_the_same_options_the_same_way(sc, spark, tf1, kwargs, match):
    from test_keras import _build, _data, _df

    import tensorspark.keras
    from tensorspark import SparkSession

    with pytest.raises(TensorSparkValueError, match=match):
        SparkSession(sc, tf1.Session(), **kwargs)
    x, y = _data(50)
    with pytest.raises(TensorSparkValueError, match=match):
        tensorspark.keras.fit(_build(), _df(spark, x, y), progress=False, **kwargs)
