"""GPUs that Spark schedules: a task's addresses become the only devices TensorFlow sees.

Spark hands a task GPUs by address (``spark.task.resource.gpu.amount``,
``TaskContext.resources()["gpu"].addresses``) but leaves the Python worker
to use them; TensorFlow would otherwise take every GPU of the machine, and
all of its memory, in every task. :func:`claim` runs in a task before the
worker's first TensorFlow use: it sets ``CUDA_VISIBLE_DEVICES`` to the
task's addresses (with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, the order of
``nvidia-smi`` that Spark's discovery scripts report). :func:`grow_memory`
then makes TensorFlow allocate GPU memory as it needs it, so that tasks
sharing a GPU (an amount below 1) each get some.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process. Spark reuses Python
workers across tasks, and a reused worker may get a task with other
addresses: :func:`claim` then refuses the task (a ``StaleGPUWorkerError``
that names both), the worker exits as PySpark's workers do after a failed
task, and Spark retries the task (docs/deploy.md, "GPU executors").

Module state is per Python worker; tasks run one at a time in a worker.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from ..errors import StaleGPUWorkerError

# The addresses this worker's CUDA was pointed at; None before the first claim.
_CLAIMED: tuple[str, ...] | None = None
# What the first claim saw: TensorFlow already imported, the previous value.
_FIRST: dict[str, Any] = {}


def task_addresses() -> tuple[str, ...]:
    """The GPU addresses Spark gave the running task; () outside a task or without GPUs."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return ()
    gpu = ctx.resources().get("gpu")
    return tuple(gpu.addresses) if gpu is not None else ()


def claim(addresses: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Point this worker's CUDA at the task's GPUs; what was done, for the task result.

    Call it in a task before TensorFlow first touches a device.
    ``addresses`` defaults to the running task's (:func:`task_addresses`).
    A task without GPU addresses changes nothing. Raises
    :class:`StaleGPUWorkerError` when this worker already claimed other
    addresses, or when TensorFlow's devices started before the first claim
    with other devices visible.
    """
    global _CLAIMED
    from pyspark import TaskContext

    addresses = task_addresses() if addresses is None else tuple(addresses)
    if not addresses:
        return {"addresses": [], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if _CLAIMED is None:
        _FIRST.update(
            tf_loaded_before="tensorflow" in sys.modules,
            tf_started_before=_tf_runtime_started(),
            previous=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        wanted = ",".join(addresses)
        if _FIRST["tf_started_before"] and _FIRST["previous"] != wanted:
            raise StaleGPUWorkerError(
                f"Spark gave this task GPU {','.join(addresses)}, but TensorFlow in its Python "
                "worker already started its devices (a UDF or an earlier job used TensorFlow "
                "here before tensorspark): the GPUs it sees cannot change. The worker exits and "
                "Spark retries the task; keep TensorFlow out of other jobs' tasks on GPU "
                "executors, or set spark.python.worker.reuse=false"
            )
        os.environ["CUDA_VISIBLE_DEVICES"] = wanted
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        _CLAIMED = addresses
    elif addresses != _CLAIMED:
        raise StaleGPUWorkerError(
            f"Spark gave this task GPU {','.join(addresses)}, but its reused Python worker "
            f"runs TensorFlow on GPU {','.join(_CLAIMED)} (CUDA reads CUDA_VISIBLE_DEVICES "
            "once per process). The worker exits and Spark retries the task on another; "
            "to avoid the retries give each executor one GPU, or set "
            "spark.python.worker.reuse=false (docs/deploy.md, GPU executors)"
        )
    out = {
        "addresses": list(addresses),
        "cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"],
        "tf_loaded_before": _FIRST["tf_loaded_before"],
        "tf_started_before": _FIRST["tf_started_before"],
    }
    # One line per task in the executor's log: which GPUs it trained on.
    ctx = TaskContext.get()
    who = f"task {ctx.taskAttemptId()} (partition {ctx.partitionId()})" if ctx else "no task"
    print(
        f"tensorspark: {who}: GPU "
        f"addresses {','.join(addresses)}, CUDA_VISIBLE_DEVICES={out['cuda_visible_devices']}, "
        f"TensorFlow {_tf_state(out)} at this worker's first claim",
        file=sys.stderr,
        flush=True,
    )
    return out


def grow_memory() -> None:
    """Make TensorFlow take GPU memory as needed, not all of it at start.

    Imports TensorFlow. A no-op without GPUs, or once TensorFlow's devices
    have started (the setting is then fixed).
    """
    import tensorflow as tf

    for device in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(device, True)


def _tf_state(claimed: dict[str, Any]) -> str:
    if claimed["tf_started_before"]:
        return "devices started"
    return "loaded, devices not started" if claimed["tf_loaded_before"] else "not loaded"


def _tf_runtime_started() -> bool:
    """True when TensorFlow in this process has already created its devices."""
    if "tensorflow" not in sys.modules:
        return False
    try:
        from tensorflow.python.eager import context
    except ImportError:
        return False
    ctx = context.context()
    return getattr(ctx, "_context_handle", None) is not None
