"""Update rules: what a task pushes at a sync, and what it trains from next.

One small set of objects serves both APIs. Each rule reads the replica's
synced values (or what the replica accumulated over the steps since the
last sync) and the model pulled at the previous sync, and returns the push.
The server-side arithmetic is in C++ (``docs/protocol.md``); these only say
which kind of push a run makes. Rules are frozen dataclasses, so they travel
in task closures as plain values.

- :class:`ParameterMean`: push the local parameters (or their average over
  the interval's steps), the server folds them in as a moving mean;
- :class:`Delta`: push ``local - pulled``;
- :class:`Elastic`: elastic averaging (EASGD) towards the server's centre;
- :class:`Gradient`: push the interval's mean gradient, the server applies
  its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .. import _core


class Replica(Protocol):
    """What a rule needs of a task's model copy (see ``runtime.task``)."""

    def read(self) -> list[np.ndarray]:
        """The synced variables' current values."""

    def iterate_means(self, steps: int) -> list[np.ndarray]:
        """Each variable's mean over the last ``steps`` steps; resets the sums."""

    def gradient_means(self, steps: int) -> list[np.ndarray]:
        """The mean gradient over the last ``steps`` steps; resets the sums."""


@dataclass(frozen=True)
class Push:
    """One sync's push, and the values to train from afterwards.

    ``keep`` None means pull the merged model after the push.
    """

    kind: int
    arrays: list[np.ndarray]
    keep: list[np.ndarray] | None = None
    mean_window: int = 0


@dataclass(frozen=True)
class ParameterMean:
    """``w = ((n - 1) w + new) / n`` per push (``n = window``).

    ``average_iterates`` pushes each variable's mean over the interval's
    steps (Polyak-Ruppert averaging) instead of the last step's value.
    """

    window: int
    average_iterates: bool = True
    accumulates: str = "iterates"
    pulls_first: bool = False

    def push(self, replica: Replica, pulled: list[np.ndarray], steps: int) -> Push:
        local = replica.iterate_means(steps) if self.average_iterates else replica.read()
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in local]
        return Push(_core.KIND_PARAMETERS, arrays, mean_window=self.window)


@dataclass(frozen=True)
class Delta:
    """``w += local - pulled`` per push (asynchronous SGD on model deltas)."""

    accumulates: str = ""
    pulls_first: bool = False

    def push(self, replica: Replica, pulled: list[np.ndarray], steps: int) -> Push:
        pairs = zip(replica.read(), pulled, strict=True)
        arrays = [np.ascontiguousarray(a - p, dtype=np.float32) for a, p in pairs]
        return Push(_core.KIND_DELTA, arrays)


@dataclass(frozen=True)
class Elastic:
    """EASGD: with centre ``c`` just pulled, push ``e = alpha (x - c)``, keep ``x - e``."""

    alpha: float
    accumulates: str = ""
    pulls_first: bool = True

    def push(self, replica: Replica, pulled: list[np.ndarray], steps: int) -> Push:
        alpha = np.float32(self.alpha)
        local = replica.read()
        arrays = [
            np.ascontiguousarray(alpha * (x - c), dtype=np.float32)
            for x, c in zip(local, pulled, strict=True)
        ]
        keep = [x - e for x, e in zip(local, arrays, strict=True)]
        return Push(_core.KIND_DELTA, arrays, keep=keep)


@dataclass(frozen=True)
class Gradient:
    """Push the interval's mean gradient; the server's optimizer applies it."""

    accumulates: str = "gradients"
    pulls_first: bool = False

    def push(self, replica: Replica, pulled: list[np.ndarray], steps: int) -> Push:
        arrays = [np.ascontiguousarray(g, dtype=np.float32) for g in replica.gradient_means(steps)]
        return Push(_core.KIND_GRADIENT, arrays)


Rule = ParameterMean | Delta | Elastic | Gradient
