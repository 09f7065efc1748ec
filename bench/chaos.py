"""Chaos benchmark: the seed program, trained with a worker killed in every run.

Runs examples/fashion_mnist_seed.py (softmax regression on Fashion-MNIST,
2 partitions, Spark ``local[2,4]``) once without faults and ``--runs``
times with one random fault each, drawn with ``--seed``:

- ``sigkill``: SIGKILL of a training task's Python worker at a random
  moment (``--kill-worker LO,HI``); Spark retries the task.
- ``zombie``: a training task is frozen, killed and rescheduled by Spark,
  and let go once its retry has joined; its late pushes must be refused.

Each run is its own driver process. Writes ``bench/results/chaos.json``:
per run the fault, whether the run completed, its test accuracy and the
server's counters (pushes refused as fenced, workers lost and retried),
and a summary (runs completed, accuracy range, the largest drop against
the fault-free run, pushes refused in all).

    python bench/chaos.py --runs 10 --out bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist_seed.py"


def run_once(args: list[str], json_path: Path, timeout: float) -> dict[str, Any]:
    """One driver process of the seed program; its report, or why it failed."""
    cmd = [sys.executable, str(EXAMPLE), "--json", str(json_path), *args]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    started = time.monotonic()
    json_path.unlink(missing_ok=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"completed": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.monotonic() - started
    if proc.returncode != 0 or not json_path.exists():
        tail = (proc.stdout + proc.stderr)[-2000:]
        return {"completed": False, "error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
    report = json.loads(json_path.read_text())
    stats = report.pop("stats")
    report.update(
        completed=True,
        wall_s=round(wall, 1),
        training_seconds=round(report["training_seconds"], 1),
        test_accuracy=round(report["test_accuracy"], 4),
        pushes=stats["pushes"],
        pushes_refused=stats['refused{reason="fenced"}'],
        workers_lost=stats["workers_lost"],
        workers_retried=stats["workers_retried"],
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--master", default="local[2,4]")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    tmp = Path(args.out).with_suffix(".run.json")
    common = ["--master", args.master, "--epochs", str(args.epochs)]
    print(f"chaos: fault-free run ({args.master}, {args.epochs} epochs)", flush=True)
    baseline = run_once(common, tmp, args.timeout)
    print(f"  accuracy {baseline.get('test_accuracy')}", flush=True)
    runs = []
    for i in range(args.runs):
        fault = rng.choice(["sigkill", "zombie"])
        if fault == "sigkill":
            lo = round(rng.uniform(0.2, 2.0), 2)
            extra = ["--kill-worker", f"{lo},{lo + 2.0}"]
        else:
            # Frozen as soon as it joins, while it still reads its input
            # (see tensorspark.chaos.make_zombie).
            extra = ["--zombie-partition", str(rng.randrange(2))]
        result = run_once(common + extra, tmp, args.timeout)
        result.update(run=i + 1, fault=fault, fault_args=extra)
        if result["completed"]:
            # Did the fault hit a training task? A SIGKILL: its attempt was
            # lost and retried. A zombie: it pushed after its retry joined.
            if fault == "sigkill":
                hit = result["workers_lost"] >= 1 and result["workers_retried"] >= 1
            else:
                hit = result["pushes_refused"] >= 1
            result["fault_took_effect"] = hit
        runs.append(result)
        print(
            f"  run {i + 1}/{args.runs} {fault}: completed={result['completed']} "
            f"accuracy={result.get('test_accuracy')} refused={result.get('pushes_refused')} "
            f"lost={result.get('workers_lost')} retried={result.get('workers_retried')}",
            flush=True,
        )
    tmp.unlink(missing_ok=True)

    done = [r for r in runs if r["completed"]]
    accs = [r["test_accuracy"] for r in done]
    base_acc = baseline.get("test_accuracy")
    summary = {
        "runs": len(runs),
        "runs_completed": len(done),
        "runs_where_the_fault_took_effect": sum(r["fault_took_effect"] for r in done),
        "baseline_accuracy": base_acc,
        "accuracy_min": min(accs) if accs else None,
        "accuracy_max": max(accs) if accs else None,
        "largest_drop_vs_baseline": (
            round(max(base_acc - a for a in accs), 4) if accs and base_acc else None
        ),
        "pushes_refused_total": sum(r["pushes_refused"] for r in done),
        "workers_lost_total": sum(r["workers_lost"] for r in done),
        "workers_retried_total": sum(r["workers_retried"] for r in done),
    }
    result = {
        "benchmark": "chaos",
        "command": "make chaos",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "master": args.master,
        "epochs": args.epochs,
        "seed": args.seed,
        "summary": summary,
        "baseline": baseline,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    ok = summary["runs_completed"] == len(runs) and baseline.get("completed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
