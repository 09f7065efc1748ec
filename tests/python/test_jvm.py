"""tensorspark._jvm.guard: a lost driver JVM gives a clear error, not a hang.

The scenarios run a real local[2] SparkSession (default driver memory) in
subprocesses (so killing a JVM cannot hurt this process); the two
subprocesses start together to keep the test short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tensorspark import _jvm
from tensorspark.errors import PSConnectionError, SparkDriverError, TensorSparkValueError

# Writes one JSON line: what the guarded block raised, how long it took,
# the threads left and whether the SIGUSR2 handler was restored.
SCRIPT = r"""
import json, os, signal, sys, threading, time
from pyspark.sql import SparkSession
from tensorspark import _jvm
from tensorspark.errors import SparkDriverError

spark = (
    SparkSession.builder.master("local[2]")
    .config("spark.ui.enabled", "false")
    .config("spark.ui.showConsoleProgress", "false")
    .getOrCreate()
)
sc = spark.sparkContext
sc.setLogLevel("OFF")
handler = signal.getsignal(signal.SIGUSR2)

def threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("tensorspark"))

def slow_rows(x):
    time.sleep(300)
    return x

def slow_batches(it):
    time.sleep(300)
    yield from it

def later(fn):
    def run():
        time.sleep(2.0)  # the job's tasks are running by then
        try:
            fn()
        except Exception:
            pass  # the OOM raises in this thread too
    threading.Thread(target=run, daemon=True).start()

def step(mode):
    if mode == "quick":
        # A block that ends normally: no error, no thread left, handler restored.
        with _jvm.guard(spark, "a quick job", poll_s=0.1, oom_check_s=0.2):
            result = sc.parallelize(range(10), 2).sum()
            time.sleep(0.5)
        return {"result": result, "threads": threads(),
                "handler_restored": signal.getsignal(signal.SIGUSR2) is handler}
    if mode.startswith("kill"):
        later(lambda: os.kill(sc._gateway.proc.pid, signal.SIGKILL))
    else:
        # An OutOfMemoryError in the driver JVM, from another thread.
        later(lambda: sc._jvm.java.nio.ByteBuffer.allocate(1_500_000_000))
    if mode == "kill-df":
        # Reads from a data socket (Arrow), not blocked in py4j.
        action = lambda: spark.range(2).repartition(2).mapInArrow(slow_batches, "id long").toArrow()
    else:
        action = lambda: sc.parallelize(range(2), 2).map(slow_rows).collect()
    started = time.monotonic()
    error = None
    try:
        with _jvm.guard(spark, "a slow test job", poll_s=0.5, oom_check_s=1.0):
            action()
    except SparkDriverError as e:
        error = str(e)
    out = {"error": error, "seconds": time.monotonic() - started, "threads": threads(),
           "handler_restored": signal.getsignal(signal.SIGUSR2) is handler}
    if mode == "oom":
        sc.cancelAllJobs()  # that JVM lives on: free its cores for the next step
    return out

for mode in sys.argv[1:]:
    print(json.dumps({"mode": mode, **step(mode)}), flush=True)
"""

# Two processes, each ending with a SIGKILLed JVM; they run at the same time.
PROCESSES = (("quick", "kill-rdd"), ("oom", "kill-df"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the scenarios; each test reads the results it needs."""
    script = tmp_path_factory.mktemp("jvm") / "scenario.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *modes],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for modes in PROCESSES
    ]
    results: dict[str, dict] = {}

    def result(mode: str) -> dict:
        if not results:
            for proc in procs:
                results.update(_results(proc))
        assert mode in results, f"no result for {mode}: {results}"
        return results[mode]

    yield result
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _results(proc: subprocess.Popen, timeout: float = 150) -> dict[str, dict]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a scenario hung; its stderr ends:\n{err[-3000:]}")
    assert proc.returncode == 0, f"rc {proc.returncode}; stderr ends:\n{err[-3000:]}"
    return {r["mode"]: r for r in (json.loads(x) for x in out.splitlines() if x.startswith("{"))}


def test_a_block_that_ends_normally_leaves_nothing_behind(runs):
    got = runs("quick")
    assert got["result"] == 45 and got["threads"] == [] and got["handler_restored"], got


@pytest.mark.parametrize("mode", ["kill-rdd", "kill-df"])
def test_sigkilled_driver_jvm_raises_a_clear_error(runs, mode):
    got = runs(mode)
    assert got["error"] is not None, got
    assert got["error"].startswith("the Spark driver JVM died while a slow test job")
    assert "signal 9, SIGKILL" in got["error"] and "spark.driver.memory" in got["error"]
    assert got["seconds"] < 30, got
    assert got["threads"] == [] and got["handler_restored"], got


def test_out_of_memory_in_driver_jvm_raises_instead_of_hanging(runs):
    got = runs("oom")
    assert got["error"] is not None, got
    assert got["error"].startswith("the Spark driver JVM ran out of memory while a slow test job")
    assert "java.lang.OutOfMemoryError" in got["error"]
    assert got["seconds"] < 30, got
    assert got["threads"] == [] and got["handler_restored"], got


def test_translate():
    from py4j.protocol import Py4JNetworkError

    lost = Py4JNetworkError("Answer from Java side is empty")
    err = _jvm.translate(lost, "training")
    assert isinstance(err, SparkDriverError)
    assert str(err).startswith("the Spark driver JVM died while training")
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = lost
    assert isinstance(_jvm.translate(wrapped, "training"), SparkDriverError)
    assert _jvm.translate(ValueError("bad input"), "training") is None
    assert _jvm.translate(ConnectionRefusedError(111, "not from py4j"), "training") is None
    assert _jvm.translate(PSConnectionError("parameter server gone"), "training") is None


def test_guard_needs_a_spark_context():
    with pytest.raises(TensorSparkValueError, match="SparkContext or SparkSession"):
        _jvm.guard(object(), "nothing")
    with pytest.raises(TensorSparkValueError, match="poll_s"):
        _jvm.guard(object(), "nothing", poll_s=0)
