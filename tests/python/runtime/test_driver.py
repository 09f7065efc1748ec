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


DEAD_JVM = r"""
import os, signal, threading, time
import numpy as np, pyspark
import tensorflow.compat.v1 as tf
tf.disable_v2_behavior()
from tensorspark import SparkSession
from tensorspark.errors import SparkDriverError

conf = pyspark.SparkConf().setMaster("local[2]").set("spark.ui.enabled", "false")
sc = pyspark.SparkContext(conf=conf)  # the default 1g of driver memory
sc.setLogLevel("OFF")
x = tf.placeholder(tf.float32, [None, 2])
v = tf.Variable(tf.zeros([2]))
train = tf.assign_add(v, tf.reduce_sum(x, 0))
sess = tf.Session()
sess.run(tf.global_variables_initializer())
ss = SparkSession(sc, sess, sync_interval=1, batch_size=1, progress=False)

def slow(row):
    time.sleep(0.02)
    return row

rdd = sc.parallelize([(np.ones(2, np.float32),)] * 20000, 2).map(slow)
killed = []
def kill():
    while ss.stats().get("version", 0) < 5:  # training is under way
        time.sleep(0.1)
    killed.append(time.monotonic())
    os.kill(sc._gateway.proc.pid, signal.SIGKILL)
threading.Thread(target=kill, daemon=True).start()
try:
    ss.run(train, feed_rdd=rdd, feed_name_list=[x.name])
    print("RESULT no error")
except SparkDriverError as e:
    print(f"RESULT {time.monotonic() - killed[0]:.1f} {e}")
    print("TRAINED", sess.run(v)[0] > 0)
"""


def test_a_dead_driver_jvm_fails_run_clearly_instead_of_hanging(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "dead_jvm.py"
    script.write_text(DEAD_JVM)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env
    )
    out = proc.stdout
    assert "RESULT" in out, proc.stderr[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    seconds, message = line.split(" ", 2)[1:]
    assert float(seconds) < 30
    assert "driver JVM died" in message and "keeps the model trained so far" in message
    assert "TRAINED True" in out  # the driver's session holds what was trained
