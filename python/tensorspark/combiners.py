"""Weight combiners: how a worker's update is folded into the server's model.

A combiner is passed to :meth:`tensorspark.SparkSession.run` as
``weight_combiner``. The arithmetic runs in the C++ parameter server; these
classes only say which rule a run uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _core
from .errors import TensorSparkValueError


@dataclass(frozen=True)
class DeltaCombiner:
    """Delta combiner: ``w += local - last_pulled`` for each worker push.

    Every worker's progress since its last pull is added to the server's
    model, like asynchronous SGD. With many workers that pull the same model
    their changes add up, which overshoots at a large learning rate.
    """

    kind: int = _core.KIND_DELTA


@dataclass(frozen=True)
class MeanCombiner:
    """Mean combiner: ``w = ((n - 1) * w + new) / n`` for each worker push.

    This is the default. Each worker starts every sync interval from the
    server's model and pushes its own estimate ``new``; the server folds it
    in as a moving average over ``n`` pushes.

    Parameters
    ----------
    n : int, optional
        Averaging window; by default the number of partitions of the run.
    average_iterates : bool
        Push the average of the worker's parameters over the steps since its
        last sync (Polyak-Ruppert averaging, kept in the task's graph at the
        cost of one add per parameter per step) instead of the last step's
        parameters. With a constant learning rate the last iterate jitters
        around the optimum; its average does not. False pushes the last
        iterate, as the original TensorSpark did.
    """

    n: int | None = None
    average_iterates: bool = True
    kind: int = _core.KIND_PARAMETERS

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise TensorSparkValueError(f"MeanCombiner: n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class ElasticCombiner:
    """Elastic averaging (EASGD): workers are pulled toward a centre model.

    At each sync a worker with parameters ``x`` reads the server's centre
    ``c``, computes ``e = alpha * (x - c)``, keeps training from ``x - e`` and
    pushes ``e`` as a delta, so the server moves the centre to ``c + e``.
    Workers keep their own models between syncs (they are not replaced by the
    centre), which lets them explore while the centre averages them. The
    driver's session receives the centre.

    Parameters
    ----------
    alpha : float
        The moving rate, in (0, 1]; typical values are about 0.9 / workers.
    """

    alpha: float = 0.5
    kind: int = _core.KIND_DELTA

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise TensorSparkValueError(
                f"ElasticCombiner: alpha must be in (0, 1], got {self.alpha}"
            )


# Names used by the original TensorSpark.
DeltaWeightCombiner = DeltaCombiner
MeanWeightCombiner = MeanCombiner

__all__ = [
    "DeltaCombiner",
    "DeltaWeightCombiner",
    "ElasticCombiner",
    "MeanCombiner",
    "MeanWeightCombiner",
]
