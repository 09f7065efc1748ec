"""Task failures mid-run: a killed worker's task is retried and the run
finishes within 1 accuracy point of a run without failures.

Each run is the seed program (examples/fashion_mnist_seed.py, softmax
regression on Fashion-MNIST, 2 partitions, 2 epochs) in its own driver
process on Spark ``local[2,4]`` (up to 3 retries per task). The fault comes
from ``tensorspark.chaos`` inside that driver: SIGKILL of the Python worker
of a training task at a random moment, or a frozen task that Spark kills
and reschedules and that pushes after its retry joined (a zombie).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist_seed.py"
MASTER = "local[2,4]"
# Two of the ways the seed program trains, one per consistency path a retry
# takes: asynchronous SGD (delta pushes; 0.5 overshoots when two workers'
# deltas add up, and 100 local steps per push leave the last iterate
# jittering by a point or more from run to run, so pushes every 10 steps at
# 0.05: 0.816 +- 0.0002 over three runs) and synchronous rounds of the mean
# combiner. Asynchronous model averaging rejoins exactly as asynchronous SGD
# does (the combiner only changes what a push means), and each case costs
# two runs of the seed program, so it is left to `make chaos`.
MODES = {
    "async": ["--combiner", "delta", "--learning-rate", "0.05", "--sync-interval", "10"],
    "sync": ["--combiner", "mean", "--consistency", "sync"],
}
TOLERANCE = 0.01  # one accuracy point

_baselines: dict[str, dict] = {}


def _run(tmp_path: Path, name: str, args: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(EXAMPLE), "--master", MASTER, "--json", str(out), *args]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    result["log"] = proc.stdout + proc.stderr
    return result


def _baseline(tmp_path: Path, mode: str) -> dict:
    if mode not in _baselines:
        result = _run(tmp_path, f"{mode}-baseline", MODES[mode])
        assert result["stats"]["workers_lost"] == 0
        assert result["stats"]["workers_retried"] == 0
        _baselines[mode] = result
    return _baselines[mode]


# async runs in make chaos: tests/cluster's executor loss kills an async
# worker on a real cluster (a minute of the suite each).
@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=[pytest.mark.chaos] if m == "async" else []) for m in MODES]
)
def test_killed_worker_is_retried_and_the_run_finishes(tmp_path, mode):
    base = _baseline(tmp_path, mode)
    hit = _run(tmp_path, f"{mode}-kill", [*MODES[mode], "--kill-worker", "0.5,3"])
    assert hit["kill_error"] is None
    assert len(hit["kills"]) == 1, hit["kills"]
    stats = hit["stats"]
    # The dead attempt was dropped (connection closed) and a new attempt of
    # its partition joined, pulled the current model and finished.
    assert stats["workers_lost"] >= 1
    assert stats["workers_retried"] >= 1
    assert "lost: connection closed" in hit["log"]
    # No worse than one point. The retry trains its whole partition again
    # while the server keeps what the killed attempt had pushed, so in two
    # epochs of an underfit model the run may end more than a point better
    # (averaging: 0.8215 against 0.8098 once); that is extra training, not a loss.
    assert hit["test_accuracy"] >= base["test_accuracy"] - TOLERANCE, (
        f"{mode}: {hit['test_accuracy']:.4f} with a killed worker against "
        f"{base['test_accuracy']:.4f} without"
    )


@pytest.mark.chaos
def test_zombie_attempts_late_pushes_are_refused(tmp_path):
    """A frozen attempt that Spark retried pushes after its retry joined.

    Run by ``make chaos``, not ``make test``: it takes up to four runs of the
    seed program (about 3 minutes of the suite's 20). ``make test`` keeps
    the fencing itself covered against real servers
    (test_modes, test_sharded_membership, runtime/test_task) and Spark task
    retries by the two kill tests above.
    """
    base = _baseline(tmp_path, "async")
    # The premise: Spark ends the killed attempt at once, so its retry joins
    # while the frozen worker lives. When Spark instead holds the slot until
    # the frozen worker is dropped as silent, no zombie is left to push; that
    # run says nothing about fencing and is repeated (at most 3 runs).
    for run in range(3):
        hit = _run(tmp_path, f"async-zombie-{run}", [*MODES["async"], "--zombie-partition", "1"])
        zombie = hit["zombie"]
        if "error" in zombie or f"(attempt {zombie['attempt']}) lost: silent" not in hit["log"]:
            break
    assert "error" not in zombie, zombie
    assert zombie["new_attempt"] > zombie["attempt"]
    stats = hit["stats"]
    assert stats['refused{reason="fenced"}'] >= 1
    assert stats["workers_retried"] >= 1
    assert f"worker 1 (attempt {zombie['attempt']}) lost: replaced by attempt" in hit["log"]
    assert abs(hit["test_accuracy"] - base["test_accuracy"]) <= TOLERANCE
