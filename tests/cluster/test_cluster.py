"""The examples on a real Spark standalone cluster, and the loss of an executor.

Every test submits an example with ``spark-submit --master spark://...`` in
client mode: the driver, and the parameter server inside it, run in the root
namespace on the bridge's address; the executors run under Workers in their
own network namespaces (see standalone.py), where the root namespace's
loopback does not exist, so every task reaches the PS over a veth pair. The
tests check the examples' exit status and test accuracy, and that both
Workers' executors ran tasks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from standalone import StandaloneCluster, Submission, cmdline, tail, wait_for

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "examples" / "fashion_mnist_seed.py"
KERAS = REPO / "examples" / "fashion_mnist_keras.py"
# Generous: two other Spark users may share the machine's 2 cores.
SUBMIT_TIMEOUT = 900.0


def _accuracy(output: str) -> float:
    m = re.findall(r"^test accuracy: ([0-9.]+)", output, re.MULTILINE)
    assert m, f"no 'test accuracy:' line in the driver's output:\n{output[-3000:]}"
    return float(m[-1])


def _finished(sub: Submission) -> str:
    """Wait for ``sub``; its output, after checking that it exited with 0."""
    rc = sub.wait()
    out = sub.output
    assert rc == 0, f"spark-submit exited with {rc}; last lines of {sub.log}:\n{tail(sub.log, 60)}"
    return out


def _tasks_per_worker(cluster: StandaloneCluster, since: float) -> dict[str, int]:
    """Worker host -> tasks its executors finished, from logs written after ``since``."""
    counts: dict[str, int] = {}
    for w in cluster.workers:
        n = 0
        for log in (cluster.base_dir / "work" / f"worker{w.index}").glob("app-*/*/stderr"):
            if log.stat().st_mtime >= since:
                n += log.read_text(errors="replace").count("Finished task")
        counts[w.host] = n
    return counts


def _report(what: str, seconds: float, accuracy: float, cluster: StandaloneCluster) -> None:
    where = "workers in network namespaces" if cluster.isolated else "loopback"
    print(f"\n[cluster] {what}: test accuracy {accuracy:.4f} in {seconds:.0f} s ({where})")


def test_workers_run_in_their_own_namespaces(cluster: StandaloneCluster) -> None:
    if not cluster.isolated:
        pytest.skip(f"loopback fallback: {cluster.fallback_reason}")
    hosts = {w.host for w in cluster.workers}
    assert len(hosts) == 2 and cluster.driver_host not in hosts
    assert cluster.alive_workers() == 2
    for w in cluster.workers:
        # The Worker JVM is inside its namespace, not in the driver's.
        ns = cluster.network.namespaces[w.index]
        assert os.readlink(f"/proc/{w.process.pid}/ns/net") == _netns_inode(ns)
        assert os.readlink(f"/proc/{w.process.pid}/ns/net") != os.readlink("/proc/self/ns/net")


def _netns_inode(name: str) -> str:
    st = os.stat(f"/run/netns/{name}")
    return f"net:[{st.st_ino}]"


def test_seed_example_on_the_cluster(cluster: StandaloneCluster) -> None:
    started = time.time()
    sub = cluster.submit(
        SEED,
        ["--master", cluster.master_url, "--partitions", "2", "--epochs", "2",
         "--min-accuracy", "0.80"],
        timeout=SUBMIT_TIMEOUT,
        log_name="seed",
    )
    out = _finished(sub)
    acc = _accuracy(out)
    assert acc >= 0.80
    # Both Workers' executors trained (each joined the PS as one partition).
    assert all(n > 0 for n in _tasks_per_worker(cluster, started).values()), _tasks_per_worker(
        cluster, started
    )
    assert out.count("(attempt 0) joined") == 4, out[-3000:]
    _report("seed example (TF1 softmax, 2 epochs)", sub.seconds, acc, cluster)


def test_keras_example_on_the_cluster(cluster: StandaloneCluster, tmp_path: Path) -> None:
    """The CNN for 2 epochs of the 60,000 images (10 reach 0.90; 2 give ~0.86)."""
    result = tmp_path / "keras.json"
    started = time.time()
    sub = cluster.submit(
        KERAS,
        [
            "--master", cluster.master_url,
            "--partitions", "2",
            "--epochs", "2",
            "--no-progress",
            "--min-accuracy", "0.80",
            "--json", str(result),
        ],
        timeout=SUBMIT_TIMEOUT,
        driver_memory="4g",
        log_name="keras",
    )
    _finished(sub)
    acc = json.loads(result.read_text())["test_accuracy"]
    assert acc >= 0.80
    assert all(n > 0 for n in _tasks_per_worker(cluster, started).values())
    _report("Keras CNN example (2 epochs)", sub.seconds, acc, cluster)


def _busy_executor(sub: Submission) -> str | None:
    """Id of an executor (not the driver) running a task now, per the driver's REST API."""
    for e in sub.rest("executors"):
        if e["id"] != "driver" and e["activeTasks"] > 0:
            return e["id"]
    return None


def _executor_pid(cluster: StandaloneCluster, executor_id: str) -> int | None:
    for pids in cluster.executor_pids().values():
        for pid in pids:
            argv = cmdline(pid)
            if "--executor-id" in argv and argv[argv.index("--executor-id") + 1] == executor_id:
                return pid
    return None


def test_executor_loss_during_training(cluster: StandaloneCluster) -> None:
    """SIGKILL one executor JVM mid-epoch: Spark retries its task, the PS fences the old attempt.

    The seed example runs 3 epochs; once the first is done and an executor
    has been running a training task for 2 s, that executor's JVM gets
    SIGKILL. The job must still finish with a good model, the driver must
    have seen the executor lost, and the PS a second attempt of a partition.
    """
    sub = cluster.submit(
        SEED,
        ["--master", cluster.master_url, "--partitions", "2", "--epochs", "3",
         "--min-accuracy", "0.80"],
        timeout=SUBMIT_TIMEOUT,
        conf={"spark.task.maxFailures": "8"},
        log_name="executor-loss",
    )
    try:
        # Training is under way: one epoch done, the PS has its pushes.
        wait_for(
            lambda: "epoch 1:" in sub.output or sub.process.poll() is not None,
            SUBMIT_TIMEOUT,
            "the seed example to finish its first epoch",
            on_timeout=lambda: f"\n{tail(sub.log)}",
        )
        assert sub.process.poll() is None, f"the driver exited early:\n{tail(sub.log, 60)}"

        def busy_for_two_seconds() -> str | None:
            first = _busy_executor(sub)
            if first is None:
                return None
            time.sleep(2.0)
            return first if _busy_executor(sub) == first else None

        victim = wait_for(
            busy_for_two_seconds,
            300,
            "an executor running a training task of epoch 2 for 2 s",
            interval=0.2,
        )
        pid = _executor_pid(cluster, victim)
        assert pid is not None, f"no CoarseGrainedExecutorBackend with --executor-id {victim}"
        os.kill(pid, signal.SIGKILL)
        killed_at = sub.seconds
        out = _finished(sub)
    finally:
        sub.kill()
    acc = _accuracy(out)
    assert acc >= 0.80
    assert re.search(rf"Lost executor {victim}\b", out), out[-3000:]
    # The retried task joined the PS as a new attempt, fencing the dead one.
    assert re.search(r"worker \d+ \(attempt [1-9]\d*\) joined", out), out[-3000:]
    _report(
        f"seed example, executor {victim} SIGKILLed at {killed_at:.0f} s, 3 epochs",
        sub.seconds,
        acc,
        cluster,
    )
