"""The cluster fixture: one Spark standalone Master and two Workers per session."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    """A running cluster: 2 Workers of 1 core and 3 GB, isolated where possible.

    ``TENSORSPARK_CLUSTER_ISOLATE=1`` requires network namespaces (fails
    without them), ``0`` forbids them; unset uses them where they work.
    """
    missing = [p for p in ("train-images-idx3-ubyte.gz",) if not (FASHION_MNIST / p).exists()]
    if missing:
        pytest.fail(f"{FASHION_MNIST}/{missing[0]} is missing: apt-get install dataset-fashion-mnist")
    choice = os.environ.get("TENSORSPARK_CLUSTER_ISOLATE", "")
    isolate = {"1": True, "0": False}.get(choice)
    c = StandaloneCluster(
        workers=2, cores=1, memory="3g", base_dir=tmp_path_factory.mktemp("cluster"), isolate=isolate
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
