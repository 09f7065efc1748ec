"""Weight combiners: how a worker's update is folded into the server's model.

A combiner is passed to :meth:`tensorspark.SparkSession.run` as
``weight_combiner``. The arithmetic runs in the C++ parameter server; these
classes only say which rule a run uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _core


@dataclass(frozen=True)
class DeltaCombiner:
    """Delta combiner: ``w += local - last_pulled`` for each worker push.

    Every worker's progress since its last pull is added to the server's
    model, like asynchronous SGD. This is the default.
    """

    kind: int = _core.KIND_DELTA


@dataclass(frozen=True)
class MeanCombiner:
    """Mean combiner: ``w = ((n - 1) * w + new) / n`` for each worker push.

    Parameters
    ----------
    n : int, optional
        Averaging window; by default the number of partitions of the run.
    """

    n: int | None = None
    kind: int = _core.KIND_PARAMETERS

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ValueError(f"MeanCombiner: n must be >= 1, got {self.n}")


# Names used by the original TensorSpark.
DeltaWeightCombiner = DeltaCombiner
MeanWeightCombiner = MeanCombiner

__all__ = ["DeltaCombiner", "MeanCombiner", "DeltaWeightCombiner", "MeanWeightCombiner"]
