"""runtime.gpu: a task's GPU addresses become CUDA_VISIBLE_DEVICES, once per Python worker.

Each case runs in a fresh interpreter, as a new Python worker would: the
claim sets process-wide state (the environment, TensorFlow's devices). The
standalone-cluster test (tests/cluster) checks the same with addresses that
Spark itself assigns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _worker(body: str) -> dict:
    """Run ``body`` in a new interpreter; the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_")}
    code = "import json\nfrom tensorspark.runtime import gpu\n" + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_first_claim_sets_the_devices_and_the_same_addresses_are_reused():
    got = _worker(
        """
        import os
        first = gpu.claim(("1",))
        again = gpu.claim(("1",))
        print(json.dumps([first, again, os.environ["CUDA_DEVICE_ORDER"]]))
        """
    )
    first, again, order = got
    assert first == {
        "addresses": ["1"],
        "cuda_visible_devices": "1",
        "tf_loaded_before": False,
        "tf_started_before": False,
    }
    assert again == first
    assert order == "PCI_BUS_ID"


def test_a_reused_worker_refuses_other_addresses():
    got = _worker(
        """
        gpu.claim(("0",))
        try:
            gpu.claim(("1",))
        except Exception as e:
            print(json.dumps([type(e).__name__, str(e), isinstance(e, ValueError)]))
        """
    )
    name, message, _ = got
    assert name == "StaleGPUWorkerError"
    assert "GPU 1" in message and "on GPU 0" in message and "spark.python.worker.reuse" in message


def test_no_addresses_change_nothing():
    got = _worker(
        """
        import os
        print(json.dumps([gpu.claim(()), os.environ.get("CUDA_VISIBLE_DEVICES")]))
        """
    )
    assert got == [{"addresses": [], "cuda_visible_devices": None}, None]


@pytest.mark.slow
def test_tensorflow_started_before_the_first_claim_is_refused():
    got = _worker(
        """
        import tensorflow as tf
        tf.constant(1.0) + 1.0  # starts the eager context and its devices
        try:
            gpu.claim(("0",))
        except Exception as e:
            print(json.dumps([type(e).__name__, str(e)]))
        """
    )
    assert got[0] == "StaleGPUWorkerError"
    assert "already started its devices" in got[1]


@pytest.mark.slow
def test_grow_memory_and_a_claim_before_tensorflow_loads():
    got = _worker(
        """
        import os, sys
        claimed = gpu.claim(("3",))
        gpu.grow_memory()
        import tensorflow as tf
        print(json.dumps([claimed["tf_loaded_before"], os.environ["CUDA_VISIBLE_DEVICES"],
                          len(tf.config.list_physical_devices("GPU"))]))
        """
    )
    # No GPU 3 on a CPU machine: TensorFlow sees none, and memory growth is a no-op.
    assert got == [False, "3", 0]


def test_a_task_function_unpickles_without_loading_tensorflow():
    """What a task's function imports when unpickled must leave TensorFlow unloaded,
    so that the claim comes first."""
    got = _worker(
        """
        import sys
        import tensorspark, tensorspark.ml
        from tensorspark.keras import _inference, replica
        from tensorspark.tf1 import replica as tf1_replica
        print(json.dumps("tensorflow" in sys.modules))
        """
    )
    assert got is False
