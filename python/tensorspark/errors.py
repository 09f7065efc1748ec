"""Exceptions raised by tensorspark.

Every error derives from :class:`TensorSparkError`. The classes also derive
from the matching built-in exception, so ``except ConnectionError`` or
``except ValueError`` keep working:

- :class:`PSConnectionError` (``ConnectionError``): the parameter server could
  not be reached or hung up; :class:`AuthenticationError` when it refused the
  run's secret, :class:`AddressInUseError` when its port is taken.
- :class:`PSTimeoutError` (``TimeoutError``): a wait ran past its limit.
- :class:`FencedError` (``PermissionError``): a newer attempt of this
  worker's partition joined the run, so this attempt is refused.
- :class:`ProtocolError`: a malformed, oversized or incompatible frame.
- :class:`TensorSparkValueError` (``ValueError``): bad input, such as a feed
  name not in the graph; :class:`ShapeMismatchError` and
  :class:`VariableNotFoundError` are its special cases.
- :class:`SparkDriverError`: the Spark driver JVM died, or ran out of
  memory, while Python waited on it (raised by the driver-side guard of
  :mod:`tensorspark._jvm`).
- :class:`StaleGPUWorkerError`: a reused Python worker's TensorFlow runs on
  other GPUs than Spark gave its task (Spark retries the task).
"""

from ._core import (
    AddressInUseError,
    AuthenticationError,
    FencedError,
    ProtocolError,
    PSConnectionError,
    PSTimeoutError,
    ShapeMismatchError,
    TensorSparkError,
    TensorSparkValueError,
    VariableNotFoundError,
)


class SparkDriverError(TensorSparkError):
    """The Spark driver JVM died, or ran out of memory, during a Spark call.

    The SparkContext is unusable afterwards; the message says what was
    running and how the JVM ended.
    """


class StaleGPUWorkerError(TensorSparkError):
    """A reused Python worker holds other GPUs than the ones Spark gave its new task.

    CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process; the worker exits
    after the failed task and Spark retries it (``tensorspark.runtime.gpu``).
    """


__all__ = [
    "AddressInUseError",
    "AuthenticationError",
    "FencedError",
    "ProtocolError",
    "PSConnectionError",
    "PSTimeoutError",
    "ShapeMismatchError",
    "SparkDriverError",
    "StaleGPUWorkerError",
    "TensorSparkError",
    "TensorSparkValueError",
    "VariableNotFoundError",
    "by_name",
]


def by_name(name: str) -> type[TensorSparkError] | None:
    """Return the tensorspark exception class called ``name``, or None."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, TensorSparkError):
        return cls
    return None
