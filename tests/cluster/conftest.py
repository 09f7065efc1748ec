"""The cluster fixture: one Spark standalone Master and two Workers per session."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standalone import StandaloneCluster  # noqa: E402 - needs the path above

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
GPUS = [["0"], ["1"]]


# Work dirs, executor logs and drivers' output; kept after the run for a
# look at what failed, replaced by the next run.
BASE_DIR = REPO / "build" / "test-cluster"


@pytest.fixture(scope="session")
def cluster() -> Iterator[StandaloneCluster]:
    """A running cluster: 2 Workers of 1 core and 3 GB, isolated where possible.

    ``TENSORSPARK_CLUSTER_ISOLATE=1`` requires network namespaces (fails
    without them), ``0`` forbids them; unset uses them where they work.
    Logs go to build/test-cluster/logs, executors' to
    build/test-cluster/work/worker<i>/<app>/<executor>/stderr.
    """
    missing = [p for p in ("train-images-idx3-ubyte.gz",) if not (FASHION_MNIST / p).exists()]
    if missing:
        pytest.fail(
            f"{FASHION_MNIST}/{missing[0]} is missing: apt-get install dataset-fashion-mnist"
        )
    choice = os.environ.get("TENSORSPARK_CLUSTER_ISOLATE", "")
    isolate = {"1": True, "0": False}.get(choice)
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    # Made-up GPUs, one per Worker: apps that ask for them get Spark's GPU scheduling.
    c = StandaloneCluster(
        workers=2, cores=1, memory="3g", base_dir=BASE_DIR, isolate=isolate, gpus=GPUS
    )

    # A SIGTERM (a CI timeout, `kill`) then still tears the cluster down.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        signal.signal(signal.SIGTERM, previous)
