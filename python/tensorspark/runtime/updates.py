"""Update rules: what a task pushes at a sync, and what it trains from next.

One small set of objects serves both APIs. Each rule reads the replica's
synced values (or what the replica accumulated over the steps since the
last sync) and the model pulled at the previous sync, and returns the push.
The arithmetic on the server is C++ (``docs/protocol.md``). Rules are frozen
dataclasses, plain values in task closures; ``accumulates`` says what the
replica must sum over each step ("iterates", "gradients" or nothing).

- :class:`ParameterMean`: push the local parameters (or their average over
  the interval's steps), the server folds them in as a moving mean;
- :class:`Delta`: push ``local - pulled``;
- :class:`Elastic`: elastic averaging (EASGD) towards the server's centre;
- :class:`Gradient`: push the interval's mean gradient, the server applies
  its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core


@dataclass(frozen=True)
class Push:
    """One sync's push; ``keep``: the values to train from next (None: pull)."""

    kind: int
    arrays: list[np.ndarray]
    keep: list[np.ndarray] | None = None
    mean_window: int = 0


class _Rule:
    accumulates = ""  # what the replica sums at each step: "iterates", "gradients" or ""
    pulls_first = False  # pull the server's model before making the push


@dataclass(frozen=True)
class ParameterMean(_Rule):
    """``w = ((n - 1) w + new) / n`` per push (``n = window``).

    ``average_iterates`` pushes each variable's mean over the interval's
    steps (Polyak-Ruppert averaging) instead of the last step's value.
    """

    window: int
    average_iterates: bool = True

    @property
    def accumulates(self) -> str:  # type: ignore[override]
        return "iterates" if self.average_iterates else ""

    def push(self, replica: Any, pulled: list[np.ndarray], steps: int) -> Push:
        local = replica.iterate_means(steps) if self.average_iterates else replica.read()
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in local]
        return Push(_core.KIND_PARAMETERS, arrays, mean_window=self.window)


@dataclass(frozen=True)
class Delta(_Rule):
    """``w += local - pulled`` per push (asynchronous SGD on model deltas)."""

    def push(self, replica: Any, pulled: list[np.ndarray], steps: int) -> Push:
        pairs = zip(replica.read(), pulled, strict=True)
        arrays = [np.ascontiguousarray(a - p, dtype=np.float32) for a, p in pairs]
        return Push(_core.KIND_DELTA, arrays)


@dataclass(frozen=True)
class Elastic(_Rule):
    """EASGD: with centre ``c`` just pulled, push ``e = alpha (x - c)``, keep ``x - e``."""

    alpha: float
    pulls_first = True

    def push(self, replica: Any, pulled: list[np.ndarray], steps: int) -> Push:
        alpha = np.float32(self.alpha)
        local = replica.read()
        arrays = [
            np.ascontiguousarray(alpha * (x - c), dtype=np.float32)
            for x, c in zip(local, pulled, strict=True)
        ]
        keep = [x - e for x, e in zip(local, arrays, strict=True)]
        return Push(_core.KIND_DELTA, arrays, keep=keep)


@dataclass(frozen=True)
class Gradient(_Rule):
    """Push the interval's mean gradient; the server's optimizer applies it."""

    accumulates = "gradients"

    def push(self, replica: Any, pulled: list[np.ndarray], steps: int) -> Push:
        arrays = [np.ascontiguousarray(g, dtype=np.float32) for g in replica.gradient_means(steps)]
        return Push(_core.KIND_GRADIENT, arrays)


Rule = ParameterMean | Delta | Elastic | Gradient
