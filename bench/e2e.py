"""End-to-end benchmark on Fashion-MNIST: plain Keras, tensorspark and Elephas.

Every system trains the same model (``bench/e2e_common.py``: softmax
regression and a CNN) on the same 60,000 images with the same batch size,
optimizer, seed and thread budget, in one run, one subprocess per row (a
fresh interpreter and its own SparkContext). Each row records its samples
per second and the (wall time, test accuracy) curve, measured after every
epoch, from which the time to reach the model's accuracy bound follows
(0.83 softmax, 0.90 CNN). Wall time starts when the orchestrator launches
the row's subprocess, so interpreter start, imports, Spark start and data
loading count; test evaluation runs with the clock paused.

Rows (``--thread-budget 2``, the default):

- ``keras``: single-process ``model.fit`` with TF intra/inter-op threads =
  the budget, and 1 thread, each at its fastest ``steps_per_execution``
  (``--keras-spe``: a short sweep in a subprocess of its own before the
  row picks it; the row records the value and the sweep);
- ``tensorspark``: ``tensorspark.keras.fit`` with each ``--workers`` count
  (threads per worker = budget / workers unless ``--threads-per-worker``)
  in each ``--modes`` consistency mode;
- ``elephas``: Elephas 7.3 (its own venv, ``--elephas-python``) with
  ``--elephas-workers`` workers: ``SparkModel`` (synchronous) and
  ``AsynchronousSparkModel`` (asynchronous, frequency epoch).

Results: ``--out`` (bench/results/e2e.json), a plot of accuracy against wall
time beside it (.png) and the table in docs/benchmarks.md.

``--scale`` runs only tensorspark's sweep (e.g. ``--workers 1,2,4,8
--threads-per-worker 1``) and writes bench/results/scale.json with the
scaling efficiency throughput(n) / (n x throughput(1)).

    make bench-e2e
    python bench/e2e.py --models softmax --epochs-softmax 3    # a quick look
    python bench/e2e.py --scale --workers 1,2,4,8 --threads-per-worker 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import e2e_common as common  # noqa: E402 - lives beside this file

MODES = ("async", "sync", "ssp")
ELEPHAS_MODES = ("sync", "async", "hogwild", "async-batch")


# --------------------------------------------------------------------------
# Rows (each runs in its own subprocess)
# --------------------------------------------------------------------------


def _epoch_timer() -> Any:
    """A callback timing each epoch (its class needs Keras imported)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(time.perf_counter() - self.t)

    return EpochTimer()


def keras_calibrate(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain Keras' samples/s at each ``steps_per_execution`` of the sweep.

    Each value trains a fresh model for one warm-up pass and two timed
    passes over the first ``calibrate_samples`` images; the faster timed
    pass counts. The row then runs, in a fresh process, with the fastest.
    """
    common.set_tf_threads(spec["threads"])
    import keras

    model_spec = common.MODELS[spec["model"]]
    x, y = common.load_split("train", model_spec.input_shape)
    n = min(len(x), spec["calibrate_samples"])
    x, y = x[:n], y[:n]
    sweep: dict[str, float] = {}
    for spe in spec["spe_sweep"]:
        keras.utils.set_random_seed(spec["seed"])
        model = model_spec.build(steps_per_execution=spe)
        timer = _epoch_timer()
        model.fit(x, y, batch_size=spec["batch_size"], epochs=3, verbose=0, callbacks=[timer])
        sweep[str(spe)] = round(n / min(timer.seconds[1:]), 1)
        print(f"steps_per_execution {spe}: {sweep[str(spe)]:,.0f} samples/s", flush=True)
    best = max(sweep, key=lambda k: sweep[k])
    return {"steps_per_execution": int(best), "spe_sweep": sweep}


def keras_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain single-process ``model.fit`` on NumPy arrays at ``steps_per_execution``."""
    clock = common.Clock(spec["t0"])
    common.set_tf_threads(spec["threads"])
    import keras

    clock.mark("imports")
    model_spec = common.MODELS[spec["model"]]
    x, y = common.load_split("train", model_spec.input_shape)
    clock.mark("data")
    keras.utils.set_random_seed(spec["seed"])
    model = model_spec.build(steps_per_execution=spec.get("steps_per_execution", 1))
    evaluator = common.Evaluator(model_spec, clock)
    curve = common.Curve(clock, model_spec.bound, spec["min_epochs"], spec["epochs"])

    class Measure(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            at = curve.epoch_end(len(x))
            curve.add(*evaluator(self.model.get_weights()), epoch=epoch + 1, at=at)
            self.model.stop_training = curve.done(epoch + 1)

    startup = clock.start_training()
    model.fit(
        x,
        y,
        batch_size=spec["batch_size"],
        epochs=spec["epochs"],
        shuffle=True,
        verbose=0,
        callbacks=[Measure()],
    )
    return {
        "startup_s": round(startup, 3),
        "startup_marks": clock.marks,
        **curve.summary(),
        "curve": curve.points,
        "versions": common.versions(),
    }


def tensorspark_row(spec: dict[str, Any]) -> dict[str, Any]:
    """``tensorspark.keras.fit`` on a cached DataFrame, one partition per worker."""
    clock = common.Clock(spec["t0"])
    workers, threads = spec["workers"], spec["threads_per_worker"]
    spark = common.spark_session(
        f"e2e tensorspark {spec['label']}", cores=workers * threads, task_cpus=threads
    )
    clock.mark("spark")
    # The driver only evaluates (clock paused); give it the whole budget.
    common.set_tf_threads(workers * threads)
    import keras

    import tensorspark
    import tensorspark.keras
    from tensorspark.datasets import fashion_mnist_dataframe

    clock.mark("imports")
    model_spec = common.MODELS[spec["model"]]
    train = fashion_mnist_dataframe(spark, "train", partitions=workers).cache()
    rows = train.count()
    clock.mark("data")
    keras.utils.set_random_seed(spec["seed"])
    evaluator = common.Evaluator(model_spec, clock)
    curve = common.Curve(clock, model_spec.bound, spec["min_epochs"], spec["epochs"])

    class Measure(keras.callbacks.Callback):
        # fit runs callbacks on the driver after loading the server's weights.
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            at = curve.epoch_end(rows)
            curve.add(*evaluator(self.model.get_weights()), epoch=epoch + 1, at=at)
            self.model.stop_training = curve.done(epoch + 1)

    startup = clock.start_training()
    _, history = tensorspark.keras.fit(
        model_spec.build,
        train,
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        sync_interval=spec["sync_interval"],
        consistency=spec["mode"],
        staleness=spec["staleness"],
        threads_per_worker=threads,
        callbacks=[Measure()],
        progress=False,
        seed=spec["seed"],
        name=f"e2e-{spec['model']}-{spec['label']}",
    )
    train.unpersist()
    spark.stop()
    per_task = [w["samples_per_sec"] for epoch in history.workers[1:] for w in epoch]
    return {
        "startup_s": round(startup, 3),
        "startup_marks": clock.marks,
        **curve.summary(),
        "curve": curve.points,
        "spark_job_samples_per_sec": [round(r, 1) for r in history.samples_per_sec],
        "task_samples_per_sec_mean": sum(per_task) / len(per_task) if per_task else None,
        "versions": common.versions(tensorspark=getattr(tensorspark, "__version__", "")),
    }


ROWS = {"keras": keras_row, "keras-calibrate": keras_calibrate, "tensorspark": tensorspark_row}


# --------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _words(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return out


def _per(workers: int, threads: int) -> str:
    w = "worker" if workers == 1 else "workers"
    return f"{workers} {w} x {threads} TF thread{'s' if threads > 1 else ''}"


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows to run, in order, per model."""
    systems = _words(args.systems, ("keras", "tensorspark", "elephas"), "system")
    if args.scale:
        systems = ["tensorspark"]
    modes = _words(args.modes, MODES, "mode")
    budget = args.thread_budget
    rows: list[dict[str, Any]] = []
    for model in _words(args.models, list(common.MODELS), "model"):
        base = {
            "model": model,
            "batch_size": args.batch_size,
            "epochs": args.epochs_softmax if model == "softmax" else args.epochs_cnn,
            "min_epochs": args.min_epochs,
            "seed": args.seed,
        }
        if "keras" in systems:
            for t in _ints(args.keras_threads) or [budget]:
                rows.append(
                    {
                        **base,
                        "system": "keras",
                        "label": f"keras {t} thread{'s' if t > 1 else ''}",
                        "mode": None,
                        "workers": 1,
                        "threads_per_worker": t,
                        "threads": t,
                        "budget": f"1 process x {t} TF thread{'s' if t > 1 else ''}",
                    }
                )
        if "tensorspark" in systems:
            for n in _ints(args.workers):
                t = args.threads_per_worker or max(1, budget // n)
                for mode in modes:
                    rows.append(
                        {
                            **base,
                            "system": "tensorspark",
                            "label": f"tensorspark {n}x{t} {mode}",
                            "mode": mode,
                            "staleness": args.staleness if mode == "ssp" else 0,
                            "sync_interval": args.sync_interval,
                            "workers": n,
                            "threads_per_worker": t,
                            "budget": f"local[{n * t}], {_per(n, t)}",
                        }
                    )
        if "elephas" in systems:
            n = args.elephas_workers
            t = max(1, budget // n)
            for mode in _words(args.elephas_modes, ELEPHAS_MODES, "Elephas mode"):
                rows.append(
                    {
                        **base,
                        "system": "elephas",
                        "label": f"elephas {n}x{t} {mode}",
                        "mode": mode,
                        "poll_s": args.elephas_poll_s,
                        "workers": n,
                        "threads_per_worker": t,
                        "budget": f"local[{n * t}], {_per(n, t)}",
                    }
                )
    return rows


def _env(system: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(BENCH)  # Spark's Python workers import e2e_common
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Every server (tensorspark's PS, Elephas's Flask PS, Spark) on loopback.
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    if system == "elephas":
        # Its runner points Spark at its own interpreter.
        for key in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV"):
            env.pop(key, None)
    else:
        env["PYSPARK_PYTHON"] = sys.executable
        env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    return env


def run_one(spec: dict[str, Any], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Run a row in its own subprocess; its result merged into its spec."""
    slug = spec["model"] + "-" + spec["label"].replace(" ", "-")
    out = logs / f"{slug}.json"
    log = logs / f"{slug}.log"
    out.unlink(missing_ok=True)
    if spec["system"] == "elephas":
        python = args.elephas_python
        if not Path(python).exists():
            return {
                **spec,
                "error": f"no Elephas interpreter at {python} (make bench-e2e creates it)",
            }
        cmd = [python, str(BENCH / "e2e_elephas.py")]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row"]
    spec = {**spec, "out": str(out), "load_avg_start": _wait_quiet(args), "t0": time.time()}
    started = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                [*cmd, json.dumps(spec)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=_env(spec["system"]),
                timeout=args.row_timeout,
                check=False,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    result = dict(spec)
    result.pop("out")
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["log"] = str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)
    if out.exists():
        result.update(json.loads(out.read_text()))
    elif rc is None:
        result["error"] = f"timed out after {args.row_timeout} s"
    else:
        result["error"] = f"exit status {rc} without a result; see {result['log']}"
    return result


def calibrate(spec: dict[str, Any], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """The Keras row at its fastest ``steps_per_execution`` of ``--keras-spe``.

    The sweep runs in a subprocess of its own before the row (one value:
    no sweep), so the row's clock and process stay as fresh as the others'.
    """
    sweep = _ints(args.keras_spe)
    if len(sweep) == 1:
        best, found = sweep[0], {}
    else:
        cal = run_one(
            {
                **spec,
                "system": "keras-calibrate",
                "label": spec["label"] + " calibrate",
                "spe_sweep": sweep,
                "calibrate_samples": args.calibrate_samples,
            },
            args,
            logs,
        )
        if cal.get("error"):
            print(f"  calibration failed ({cal['error'][:200]}); steps_per_execution 1")
            best, found = 1, {"calibration_error": cal["error"]}
        else:
            best, found = cal["steps_per_execution"], {"spe_sweep": cal["spe_sweep"]}
            print(f"  {spec['label']}: steps_per_execution sweep {cal['spe_sweep']}", flush=True)
    return {
        **spec,
        **found,
        "label": f"{spec['label']} spe{best}",
        "steps_per_execution": best,
    }


def _wait_quiet(args: argparse.Namespace) -> list[float]:
    """Wait (up to ``--quiet-wait`` s) for the 1-min load to drop below ``--quiet-load``.

    On a shared machine other jobs skew the figures; the load at each row's
    start goes into the row either way.
    """
    deadline = time.monotonic() + args.quiet_wait
    while args.quiet_load and os.getloadavg()[0] > args.quiet_load:
        if time.monotonic() > deadline:
            print(f"  (load {os.getloadavg()[0]:.1f} still above {args.quiet_load})", flush=True)
            break
        time.sleep(5)
    return [round(x, 2) for x in os.getloadavg()]


def _line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{r['model']:8} {r['label']:28} ERROR {r['error'][:200]}"
    tta = r.get("time_to_bound_s")
    to_bound = f"{tta:.1f} s" if tta is not None else "not reached"
    sps = r.get("samples_per_sec_steady") or r.get("samples_per_sec") or 0
    return (
        f"{r['model']:8} {r['label']:28} {sps:9,.0f} samples/s  "
        f"to bound: {to_bound:12} "
        f"best {r.get('best_accuracy')}  startup {r.get('startup_s')} s  "
        f"epochs {r.get('epochs_run')}"
    )


def _pick(rows: list[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and not r.get("error")]


def targets(rows: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """The issue's two targets, per model, from the rows."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        t: dict[str, Any] = {}
        keras_rows = _pick(mine, system="keras", threads=budget)
        one = _pick(mine, system="tensorspark", workers=1)
        if keras_rows and one:
            base = keras_rows[0]["samples_per_sec_steady"] or keras_rows[0]["samples_per_sec"]
            ratios = {
                r["mode"]: (r["samples_per_sec_steady"] or r["samples_per_sec"]) / base for r in one
            }
            t["throughput"] = {
                "what": "tensorspark 1 worker samples/s / plain Keras samples/s, same budget",
                "keras_samples_per_sec": base,
                "ratio_by_mode": ratios,
                "required": 0.9,
                "met": ratios.get("async", max(ratios.values())) >= 0.9,
            }
        ts = [r for r in _pick(mine, system="tensorspark") if r["time_to_bound_s"] is not None]
        el = _pick(mine, system="elephas")
        if ts and el:
            best = min(ts, key=lambda r: r["time_to_bound_s"])
            reached = [r for r in el if r["time_to_bound_s"] is not None]
            if reached:
                el_best = min(reached, key=lambda r: r["time_to_bound_s"])
                el_time, exact = el_best["time_to_bound_s"], True
            else:
                # Never reached: its whole run is a lower bound on its time.
                el_best = max(el, key=lambda r: r["curve"][-1]["elapsed_s"] if r["curve"] else 0)
                el_time = el_best["curve"][-1]["elapsed_s"] if el_best["curve"] else None
                exact = False
            if el_time:
                ratio = el_time / best["time_to_bound_s"]
                # The same ratio without startup (Spark, imports, data loading).
                ts_train = min(r["train_time_to_bound_s"] for r in ts)
                el_train = (
                    el_best["train_time_to_bound_s"] if exact else el_time - el_best["startup_s"]
                )
                t["time_to_accuracy"] = {
                    "what": "Elephas's best time to bound / tensorspark's best",
                    "tensorspark_best": best["label"],
                    "tensorspark_s": best["time_to_bound_s"],
                    "elephas_best": el_best["label"],
                    "elephas_s": el_time,
                    "elephas_reached_bound": exact,
                    "ratio": ratio,
                    "ratio_is_lower_bound": not exact,
                    "training_only_ratio": el_train / ts_train if ts_train else None,
                    "required": 3.0,
                    "met": ratio >= 3.0,
                }
        out[model] = t
    return out


def scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput(n) / (n x throughput(smallest n)) per model and mode."""
    out: dict[str, Any] = {}
    for r in _pick(rows, system="tensorspark"):
        key = f"{r['model']} {r['mode']}"
        out.setdefault(key, []).append(r)
    table: dict[str, Any] = {}
    for key, rs in out.items():
        rs.sort(key=lambda r: r["workers"])
        base = rs[0]
        rate = base["samples_per_sec_steady"] or base["samples_per_sec"]
        table[key] = [
            {
                "workers": r["workers"],
                "threads_per_worker": r["threads_per_worker"],
                "samples_per_sec": r["samples_per_sec_steady"] or r["samples_per_sec"],
                "efficiency": (r["samples_per_sec_steady"] or r["samples_per_sec"])
                / (r["workers"] / base["workers"] * rate),
                "time_to_bound_s": r["time_to_bound_s"],
            }
            for r in rs
        ]
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--row":
        sys.argv = [sys.argv[0], *argv[1:]]
        return common.run_row(lambda spec: ROWS[spec["system"]](spec))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="softmax,cnn")
    p.add_argument("--systems", default="keras,tensorspark,elephas")
    p.add_argument("--thread-budget", type=int, default=2, help="TF threads in all, per row")
    p.add_argument("--workers", default="1,2", help="tensorspark worker counts")
    p.add_argument("--threads-per-worker", type=int, default=None, help="default: budget / workers")
    p.add_argument("--modes", default="async,sync,ssp", help="tensorspark consistency modes")
    p.add_argument("--staleness", type=int, default=2, help="the ssp bound, in syncs")
    p.add_argument("--sync-interval", type=int, default=10)
    p.add_argument("--keras-threads", default="", help="default: the budget, then 1")
    p.add_argument(
        "--keras-spe",
        default="1,8,32,128",
        help="plain Keras steps_per_execution: the sweep to pick the fastest from, or one value",
    )
    p.add_argument("--calibrate-samples", type=int, default=16384, help="images per sweep pass")
    p.add_argument("--elephas-workers", type=int, default=2)
    p.add_argument("--elephas-modes", default="sync,async")
    p.add_argument(
        "--elephas-poll-s", type=float, default=0.25, help="async: weight polling interval"
    )
    p.add_argument("--elephas-python", default=str(ROOT / ".venv-elephas/bin/python"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs-softmax", type=int, default=8, help="epoch cap, softmax")
    p.add_argument("--epochs-cnn", type=int, default=10, help="epoch cap, CNN")
    p.add_argument("--min-epochs", type=int, default=5, help="epochs run even past the bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-timeout", type=int, default=1200, help="seconds per row")
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.0,
        help="before each row wait for the 1-min load average to fall below this (0: off)",
    )
    p.add_argument("--quiet-wait", type=int, default=300, help="longest such wait, s")
    p.add_argument("--scale", action="store_true", help="only tensorspark's scale sweep")
    p.add_argument("--out", default=None, help="default bench/results/e2e.json (scale.json)")
    p.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    if not args.keras_threads:
        args.keras_threads = f"{args.thread_budget},1" if args.thread_budget > 1 else "1"
    name = "scale" if args.scale else "e2e"
    out = Path(args.out or ROOT / f"bench/results/{name}.json")
    logs = ROOT / "build" / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    rows_plan = plan(args)
    result: dict[str, Any] = {
        "benchmark": name,
        "command": " ".join(["python", "bench/e2e.py", *argv]),
        "machine": common.machine(),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("out", "no_docs", "elephas_python")
        },
        "models": {
            m: {"bound": s.bound, "description": s.description}
            for m, s in common.MODELS.items()
            if m in args.models.split(",")
        },
        "rows": [],
    }
    cores = os.cpu_count() or 1
    for spec in rows_plan:
        # More TF threads than cores measures contention, not scaling.
        spec["oversubscribed"] = spec["workers"] * spec["threads_per_worker"] > cores
    if any(s["oversubscribed"] for s in rows_plan):
        print(f"note: some rows want more threads than the {cores} cores here", flush=True)
    print(f"{len(rows_plan)} rows; logs in {logs}", flush=True)
    started = time.monotonic()
    for spec in rows_plan:
        if spec["system"] == "keras":
            spec = calibrate(spec, args, logs)
        row = run_one(spec, args, logs)
        result["rows"].append(row)
        print(_line(row), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive
    result["total_s"] = round(time.monotonic() - started, 1)
    result["machine_after"] = {"load_avg": common.machine()["load_avg"]}
    if args.scale:
        result["scaling"] = scaling(result["rows"])
    else:
        result["targets"] = targets(result["rows"], args.thread_budget)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result.get("targets") or result.get("scaling"), indent=1))
    import e2e_report

    png = out.with_suffix(".png")
    e2e_report.plot(result, png)
    if not args.scale and not args.no_docs:
        e2e_report.update_docs(result, ROOT / "docs/benchmarks.md")
    print(f"wrote {out}, {png} in {result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
