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
from standalone import EXECUTOR_CLASS, StandaloneCluster, Submission, cmdline, tail, wait_for

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "examples" / "fashion_mnist_seed.py"
KERAS = REPO / "examples" / "fashion_mnist_keras.py"
# Generous: other Spark users may share the machine's 2 cores.
SUBMIT_TIMEOUT = 600.0
# The parameter server's line for a task joining: its partition, then the
# attempt it fences by, which is Spark's TID (docs/consistency.md).
# Each Worker declares one made-up GPU (tests/cluster/conftest.py); a task takes it.
# No locality wait: the cached partitions may all sit on one Worker, and
# waiting for it would run both training tasks there, one after the other
# (one GPU each), leaving the other Worker's GPU unclaimed.
GPU_CONF = {
    "spark.executor.resource.gpu.amount": "1",
    "spark.task.resource.gpu.amount": "1",
    "spark.locality.wait": "0s",
}
_JOINED = re.compile(r"\[tensorspark-ps\] worker (\d+) \(attempt (\d+)\) joined")


def _finished(sub: Submission) -> str:
    """Wait for ``sub``; its output, after checking that it exited with 0."""
    rc = sub.wait()
    assert rc == 0, f"spark-submit exited with {rc}; last lines of {sub.log}:\n{tail(sub.log, 60)}"
    return sub.output


def _app_id(sub: Submission) -> str:
    """The application id the standalone Master gave ``sub``'s driver."""
    m = re.search(r"Connected to Spark cluster with app ID (\S+)", sub.output)
    assert m, f"no app ID in the driver's output:\n{tail(sub.log)}"
    return m.group(1)


def _executor_logs(cluster: StandaloneCluster, app_id: str) -> dict[tuple[int, str], Path]:
    """(worker index, executor id) -> stderr of each of the app's executors."""
    logs = {}
    for w in cluster.workers:
        for log in (cluster.base_dir / "work" / f"worker{w.index}" / app_id).glob("*/stderr"):
            logs[(w.index, log.parent.name)] = log
    return logs


def _tasks_per_worker(cluster: StandaloneCluster, sub: Submission) -> dict[str, int]:
    """Worker address -> tasks of ``sub``'s app that its executors finished."""
    counts = {w.host: 0 for w in cluster.workers}
    for (index, _), log in _executor_logs(cluster, _app_id(sub)).items():
        text = log.read_text(errors="replace")
        counts[cluster.workers[index].host] += text.count("Finished task")
    return counts


def _result_file(cluster: StandaloneCluster, name: str) -> Path:
    """Where an example writes its --json results (beside the cluster's logs)."""
    path = cluster.base_dir / "results" / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    return path


def _report(what: str, seconds: float, accuracy: float, cluster: StandaloneCluster) -> None:
    where = "Workers in network namespaces" if cluster.isolated else "loopback"
    print(f"\n[cluster] {what}: test accuracy {accuracy:.4f}, {seconds:.0f} s ({where})")


def test_workers_run_in_their_own_namespaces(cluster: StandaloneCluster) -> None:
    """Each Worker JVM is in its own network namespace, with its own address."""
    if not cluster.isolated:
        pytest.skip(f"loopback fallback: {cluster.fallback_reason}")
    hosts = {w.host for w in cluster.workers}
    assert len(hosts) == 2 and cluster.driver_host not in hosts
    assert cluster.alive_workers() == 2
    mine = os.readlink("/proc/self/ns/net")
    for w, ns in zip(cluster.workers, cluster.network.namespaces, strict=True):
        theirs = os.readlink(f"/proc/{w.process.pid}/ns/net")
        assert theirs != mine
        assert theirs == f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"


def test_seed_example_on_the_cluster(cluster: StandaloneCluster) -> None:
    """The TF1 seed program over TLS, 2 epochs, bound 0.80 (it reaches ~0.82), on Spark GPUs.

    Its executors live in the namespaces, where the driver's address is
    reached only through their veth pair, so every pull and push crossed it.
    Each Worker declares one made-up GPU (address "0" on one, "1" on the
    other) and every task asks for one: each task must have pointed
    CUDA_VISIBLE_DEVICES at exactly its Worker's address before TensorFlow
    started, and training (on CPU) must complete.
    """
    result = _result_file(cluster, "seed.json")
    sub = cluster.submit(
        SEED,
        ["--master", cluster.master_url, "--partitions", "2", "--epochs", "2", "--tls"]
        + ["--min-accuracy", "0.80", "--json", str(result)],
        timeout=SUBMIT_TIMEOUT,
        conf=GPU_CONF,
        log_name="seed",
    )
    _finished(sub)
    _check_gpu_claims(cluster, sub)
    report = json.loads(result.read_text())
    acc = report["test_accuracy"]
    assert acc >= 0.80
    tasks = _tasks_per_worker(cluster, sub)
    assert all(n > 0 for n in tasks.values()), f"a Worker's executor ran no task: {tasks}"
    # 2 epochs x 2 partitions x 3 pushes (300 steps, one push per 100).
    assert report["stats"]["version"] >= 12, report["stats"]
    # Over TLS: the server refuses plain clients, so every task pinned the
    # run's certificate across its veth pair.
    assert report["tls_fingerprint"].startswith("sha256:"), report
    assert report["stats"]['refused{reason="auth"}'] == 0, report["stats"]
    _report("seed example (TF1 softmax, 2 epochs)", sub.seconds, acc, cluster)


_GPU_CLAIM = re.compile(
    r"tensorspark: task \d+ \(partition \d+\): GPU addresses (\S+), "
    r"CUDA_VISIBLE_DEVICES=(\S+), TensorFlow ([a-z, ]+) at this worker's first claim"
)


def _gpu_claims(cluster: StandaloneCluster, app_id: str) -> dict[int, list[tuple[str, str, str]]]:
    """Worker index -> (addresses, CUDA_VISIBLE_DEVICES, TF state) of each task's GPU claim."""
    claims: dict[int, list[tuple[str, str, str]]] = {w.index: [] for w in cluster.workers}
    for (index, _), log in _executor_logs(cluster, app_id).items():
        claims[index] += _GPU_CLAIM.findall(log.read_text(errors="replace"))
    return claims


def _check_gpu_claims(cluster: StandaloneCluster, sub: Submission) -> None:
    """Every task of ``sub`` set CUDA_VISIBLE_DEVICES to its Worker's GPU before loading TF."""
    for index, lines in _gpu_claims(cluster, _app_id(sub)).items():
        want = ",".join(cluster.gpus[index])
        assert lines, f"Worker {index}'s executors logged no GPU claim"
        for addresses, visible, state in lines:
            assert (addresses, visible, state) == (want, want, "not loaded"), lines


def _running(cluster: StandaloneCluster, app_id: str, tid: int) -> tuple[int, str] | None:
    """(worker index, executor id) of the executor running task ``tid`` now.

    Read from the executors' own logs ("Running task 1.0 in stage 3.0
    (TID 7)"), which are written as it happens.
    """
    finished = re.compile(rf"Finished task \S+ in stage \S+ \(TID {tid}\)")
    for key, log in _executor_logs(cluster, app_id).items():
        text = log.read_text(errors="replace")
        if f"(TID {tid})" in text and not finished.search(text):
            return key
    return None


def _executor_pid(cluster: StandaloneCluster, worker: int, executor_id: str) -> int | None:
    for pid in cluster.workers[worker].executor_pids():
        argv = cmdline(pid)
        if "--executor-id" in argv and argv[argv.index("--executor-id") + 1] == executor_id:
            return pid
    return None


def test_executor_loss_during_training(cluster: StandaloneCluster) -> None:
    """SIGKILL one executor JVM mid-epoch: Spark retries its task, the PS fences the old attempt.

    The Keras example runs 2 epochs (its tasks train for several seconds,
    long enough to be caught in the act). Once a task has joined the PS and
    trained for 2 s, the JVM of the executor running it
    (``CoarseGrainedExecutorBackend``) gets SIGKILL. Its Worker reports the
    loss, the driver reschedules the task (the partition's cached rows died
    with the executor, so Spark recomputes them), the PS drops the dead
    attempt and the retry joins as a newer attempt of the same partition.
    The job must finish with a good model; this is also the Keras example's
    run on the cluster (a second, undisturbed run of it would add minutes
    and check nothing this one does not).
    """
    result = _result_file(cluster, "executor-loss.json")
    sub = cluster.submit(
        KERAS,
        ["--master", cluster.master_url, "--partitions", "2", "--epochs", "2"]
        + ["--no-progress", "--min-accuracy", "0.80", "--json", str(result)],
        timeout=SUBMIT_TIMEOUT,
        driver_memory="4g",
        # A lost executor costs each task it was running one failure.
        conf={"spark.task.maxFailures": "8", **GPU_CONF},
        log_name="executor-loss",
    )
    first_seen: dict[int, float] = {}

    def training_task() -> tuple[int, int, int, str] | None:
        """(partition, TID, worker, executor) of a task joined >= 2 s ago, still running."""
        assert sub.process.poll() is None, f"the driver exited early:\n{tail(sub.log, 60)}"
        for partition, tid in map(lambda m: (int(m[0]), int(m[1])), _JOINED.findall(sub.output)):
            first_seen.setdefault(tid, time.monotonic())
            if time.monotonic() - first_seen[tid] >= 2.0:
                where = _running(cluster, _app_id(sub), tid)
                if where is not None:
                    return partition, tid, *where
        return None

    try:
        partition, tid, worker, victim = wait_for(
            training_task,
            SUBMIT_TIMEOUT,
            "a task that joined the PS 2 s ago and is still running",
            interval=0.2,
            on_timeout=lambda: f"\n{tail(sub.log)}",
        )
        pid = _executor_pid(cluster, worker, victim)
        assert pid is not None, (
            f"no {EXECUTOR_CLASS} with --executor-id {victim} on worker {worker}"
        )
        os.kill(pid, signal.SIGKILL)
        killed_at = sub.seconds
        out = _finished(sub)
    finally:
        sub.kill()
    acc = json.loads(result.read_text())["test_accuracy"]
    assert acc >= 0.80
    assert re.search(rf"Lost executor {victim} on ", out), out[-3000:]
    _check_gpu_claims(cluster, sub)  # the replacement executor's tasks too
    # The PS dropped the killed attempt, and a newer attempt of the same
    # partition (the retry) joined after it.
    lost = re.search(rf"worker {partition} \(attempt {tid}\) lost: ", out)
    assert lost, f"the PS never dropped partition {partition}'s TID {tid}:\n{out[-3000:]}"
    retries = [int(t) for p, t in _JOINED.findall(out, lost.start()) if int(p) == partition]
    assert any(t > tid for t in retries), (
        f"no retry of partition {partition} joined:\n{out[-3000:]}"
    )
    _report(
        f"Keras example, executor {victim} (running TID {tid}) SIGKILLed {killed_at:.0f} s into "
        "the run, 2 epochs",
        sub.seconds,
        acc,
        cluster,
    )


_SHARD_SERVING = re.compile(
    r"tensorspark: parameter-server shard (\d+) serving at (\S+):(\d+) \(task attempt (\d+)\)"
    r"(, restored from \S+)?"
)


def _sharded_run(cluster: StandaloneCluster, name: str) -> tuple[Submission, Path]:
    """The TF1 seed program against one shard in a Spark task, snapshotting every second.

    The cluster's two slots hold the shard and one training task, so the
    two partitions train one after the other; 5 epochs and a push every 20
    steps give the kill a few seconds of training to land in.
    """
    result = _result_file(cluster, f"{name}.json")
    ckpt = cluster.base_dir / "results" / f"{name}-ckpt"
    sub = cluster.submit(
        SEED,
        ["--master", cluster.master_url, "--partitions", "2", "--epochs", "5"]
        + ["--sync-interval", "20", "--ps-shards", "1", "--checkpoint-dir", str(ckpt)]
        + ["--checkpoint-every-s", "1", "--min-accuracy", "0.78", "--json", str(result)],
        timeout=SUBMIT_TIMEOUT,
        conf={"spark.task.maxFailures": "8", "spark.locality.wait": "0s"},
        log_name=name,
    )
    return sub, result


def test_shard_executor_loss_during_training(cluster: StandaloneCluster) -> None:
    """SIGKILL the executor that hosts the parameter-server shard, mid-training.

    Spark runs the shard's task again (on the replacement executor); the
    shard comes back from its newest snapshot (every second), the training
    task finds it through the driver's directory, joins it again and goes
    on. The model must end within 1 accuracy point of the same run
    undisturbed, run first.
    """
    ref, ref_result = _sharded_run(cluster, "shards-undisturbed")
    _finished(ref)
    ref_seconds = ref.seconds
    ref_acc = json.loads(ref_result.read_text())["test_accuracy"]
    sub, result = _sharded_run(cluster, "shards-killed")
    try:
        shard = wait_for(
            lambda: _SHARD_SERVING.search(sub.output),
            SUBMIT_TIMEOUT,
            "the shard's serving line",
            on_timeout=lambda: f"\n{tail(sub.log)}",
        )
        tid = int(shard[4])
        worker, victim = wait_for(
            lambda: _running(cluster, _app_id(sub), tid),
            60.0,
            f"the executor running the shard's task (TID {tid})",
        )
        log = _executor_logs(cluster, _app_id(sub))[(worker, victim)]
        # Training has pushed: a timed snapshot of a changed model was written.
        wait_for(
            lambda: re.search(r"snapshot \(every_s\) written: .*\(version [1-9]", log.read_text()),
            SUBMIT_TIMEOUT,
            "a timed snapshot of the shard after training started",
            interval=0.1,
            on_timeout=lambda: f"\n{tail(log)}\n{tail(sub.log)}",
        )
        pid = _executor_pid(cluster, worker, victim)
        assert pid is not None, f"no {EXECUTOR_CLASS} with --executor-id {victim}"
        os.kill(pid, signal.SIGKILL)
        killed_at = sub.seconds
        out = _finished(sub)
    finally:
        sub.kill()
    report = json.loads(result.read_text())
    acc = report["test_accuracy"]
    lost = re.search(r"parameter-server shard 0 \(task attempt \d+ on \S+\) lost: ", out)
    assert lost, out[-3000:]
    back = [m for m in _SHARD_SERVING.finditer(out) if int(m[4]) > tid]
    assert back and back[0][5], f"the shard never came back from a snapshot:\n{out[-3000:]}"
    assert report["shard_reconnects"] >= 1, report
    assert re.search(r"epoch 5: \d+ steps", out), out[-3000:]
    assert abs(acc - ref_acc) <= 0.01, f"{acc:.4f} after the kill, {ref_acc:.4f} without"
    _report(
        f"seed program on 1 shard in a Spark task, its executor SIGKILLed {killed_at:.0f} s "
        f"in (undisturbed: {ref_acc:.4f} in {ref_seconds:.0f} s)",
        sub.seconds,
        acc,
        cluster,
    )
