"""Inference speed: ``tensorspark.keras.predict`` against plain Keras ``model.predict``.

The CNN of ``bench/e2e_common.py`` (random weights: speed only) predicts the
60,000 Fashion-MNIST training rows. Both sides have the same 2 cores:

- tensorspark: a ``local[2]`` session, the rows a 2-partition DataFrame
  (``tensorspark.datasets.fashion_mnist_dataframe``), ``predict(model, df)``
  written to Spark's ``noop`` sink, so every row is predicted and nothing
  is collected. The first call is *cold* (the Python workers import
  TensorFlow and load the model); later calls are *warm*.
- plain Keras: a subprocess with 2 TensorFlow threads (intra and inter op)
  and the arrays in memory, ``model.predict(x, batch_size=1024)`` after one
  warm-up call.

Rounds alternate in ABBA order (tensorspark, Keras, Keras, tensorspark,
...); each figure is the median over the rounds, with the paired ratio's
median and interquartile range, and the best round of each side. One warm
call is profiled: the CPU seconds of the JVM and of the Python workers.
Writes ``bench/results/inference.json``.

    python bench/inference.py [--rounds 8] [--out bench/results/inference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e_common  # noqa: E402

THREADS = 2
BATCH = 1024


def _cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def keras_rounds(model_path: str, rounds: int) -> list[float]:
    """Rows/s of ``rounds`` timed ``model.predict`` calls in a fresh process."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(HERE)!r})
import e2e_common
e2e_common.set_tf_threads({THREADS})
import keras
x, _ = e2e_common.load_split("train", (28, 28, 1))
model = keras.saving.load_model({model_path!r})
model.predict(x[:{BATCH * 4}], batch_size={BATCH}, verbose=0)  # warm-up: traced, allocated
rates = []
for _ in range({rounds}):
    t = time.perf_counter()
    model.predict(x, batch_size={BATCH}, verbose=0)
    rates.append(len(x) / (time.perf_counter() - t))
print(json.dumps(rates))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"the Keras baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="paired rounds (even: ABBA)")
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "inference.json"))
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Spark's Python workers must import the model's module (e2e_common).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
    )
    spark = e2e_common.spark_session("tensorspark inference bench", THREADS, 1)

    from tensorspark.datasets import fashion_mnist_dataframe
    from tensorspark.keras import predict

    df = fashion_mnist_dataframe(spark, "train", partitions=args.partitions)
    rows = df.count()
    e2e_common.set_tf_threads(THREADS)
    model = e2e_common.build_cnn()
    tmp = tempfile.mkdtemp(prefix="tensorspark-inference-")
    model_path = os.path.join(tmp, "cnn.keras")
    model.save(model_path)

    def tensorspark_rate() -> float:
        t = time.perf_counter()
        predict(model, df, batch_size=BATCH).write.format("noop").mode("overwrite").save()
        return rows / (time.perf_counter() - t)

    load_before = os.getloadavg()[0]
    cold = tensorspark_rate()
    # Where a warm call's CPU goes: the JVM (Parquet, Arrow to and from
    # Python, the sink) and the Python workers (decode, TensorFlow).
    jvm = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
    workers = _descendants(jvm)
    cpu0 = _cpu_s(jvm), sum(_cpu_s(w) for w in workers)
    t0 = time.perf_counter()
    tensorspark_rate()
    wall = time.perf_counter() - t0
    cpu1 = _cpu_s(jvm), sum(_cpu_s(w) for w in workers)
    profile = {
        "wall_s": wall,
        "jvm_cpu_s": cpu1[0] - cpu0[0],
        "python_workers_cpu_s": cpu1[1] - cpu0[1],
        "cores": THREADS,
    }
    ts, keras_ = [], []
    for r in range(args.rounds):
        order = ("ts", "keras") if r % 4 in (0, 3) else ("keras", "ts")
        for side in order:
            if side == "ts":
                ts.append(tensorspark_rate())
            else:
                keras_.append(keras_rounds(model_path, 1)[0])
        print(
            f"round {r + 1}: tensorspark {ts[-1]:,.0f} rows/s, Keras {keras_[-1]:,.0f} rows/s",
            flush=True,
        )
    ratios = np.array(ts) / np.array(keras_)
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    result = {
        "model": "fashion_cnn (bench/e2e_common.build_cnn), random weights",
        "rows": rows,
        "partitions": args.partitions,
        "batch_size": BATCH,
        "threads": THREADS,
        "rows_per_sec": float(np.median(ts)),
        "keras_rows_per_sec": float(np.median(keras_)),
        "cold_rows_per_sec": cold,
        "ratio_median": float(med),
        "ratio_iqr": [float(q1), float(q3)],
        # Plain Keras's predict runs at one of two speeds from call to call
        # (one of its two threads idle in the slow one; docs/benchmarks.md),
        # so the best rounds are compared too.
        "rows_per_sec_best": float(max(ts)),
        "keras_best_rows_per_sec": float(max(keras_)),
        "ratio_best": float(max(ts) / max(keras_)),
        "warm_call_profile": profile,
        "tensorspark_rounds": ts,
        "keras_rounds": keras_,
        "order": "ABBA, tensorspark first",
        "load_avg_start": load_before,
        "machine": e2e_common.machine(),
        "versions": e2e_common.versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"tensorspark warm {result['rows_per_sec']:,.0f} rows/s (cold {cold:,.0f}), plain Keras "
        f"{result['keras_rows_per_sec']:,.0f} rows/s: {med:.2f}x (IQR {q1:.2f} to {q3:.2f}); "
        f"a warm call: {wall:.1f} s, JVM {profile['jvm_cpu_s']:.1f} CPU s, Python workers "
        f"{profile['python_workers_cpu_s']:.1f} CPU s; wrote {args.out}"
    )
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
