"""Sparse embedding tables on the parameter server: specs and id helpers.

A table maps int64 ids to float32 rows of ``dim`` values. Create tables with
:meth:`tensorspark.PSClient.create_tables` (or the same call of
:class:`tensorspark.ShardedPSClient`), then pull and push only the rows a
batch touches (``pull_rows``, ``push_rows``). Row ``id`` of every table lives
on server :func:`server_of_ids` (docs/protocol.md, "Sharding"); string ids
are hashed with :func:`hash_strings` ("String ids").

Examples
--------
>>> from tensorspark.tables import RowOptimizer, TableSpec
>>> user = TableSpec("user", dim=16, optimizer=RowOptimizer("adagrad", learning_rate=0.05))
>>> client.create_tables([user])  # doctest: +SKIP
[True]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from .errors import TensorSparkValueError

__all__ = [
    "RowOptimizer",
    "TableSpec",
    "hash_strings",
    "initial_rows",
    "server_of_ids",
    "validate_table",
]

# Wire values (tensorspark/tables.h).
_OPTIMIZERS = {"sgd": 1, "adagrad": 2, "adam": 3, "ftrl": 4}
_INITIALIZERS = {"zeros": 0, "uniform": 1, "normal": 2}
_EVICTIONS = {"none": 0, "lru": 1, "lfu": 2}
_MAX_DIM = 65536
_MAX_NAME_BYTES = 1024
_U32 = 2**32
_U64 = 2**64


@dataclass(frozen=True)
class RowOptimizer:
    """Per-row optimizer of a table (formulas: docs/sparse.md, "Row optimizers").

    Parameters
    ----------
    kind : {"sgd", "adagrad", "adam", "ftrl"}
        The update rule. Adam is lazy: only rows a push names change.
    learning_rate : float
        Finite, > 0. A push's ``learning_rate`` > 0 overrides it.
    beta1, beta2 : float
        Adam's moment decays, in [0, 1).
    epsilon : float
        Adagrad's and Adam's epsilon, >= 0.
    initial_accumulator : float
        Adagrad's and FTRL's starting accumulator, >= 0 (FTRL: > 0 when
        ``lr_power`` < 0).
    l1, l2, lr_power, beta : float
        FTRL-proximal's regularization (>= 0), learning rate power (<= 0)
        and beta (>= 0), as in Keras.
    """

    kind: str = "sgd"
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-7
    initial_accumulator: float = 0.1
    l1: float = 0.0
    l2: float = 0.0
    lr_power: float = -0.5
    beta: float = 0.0


@dataclass(frozen=True)
class TableSpec:
    """A table's configuration (mirrors ``TableConfig`` in tensorspark/tables.h).

    Parameters
    ----------
    name : str
        1..1024 UTF-8 bytes.
    dim : int
        Row width, 1..65536.
    vocab : int
        Fixed vocabulary: ids in [0, vocab). 0 (default): any int64 id, a row
        being stored on its first update.
    seed : int
        Seed of the initial values (with the name and the id).
    initializer : {"uniform", "zeros", "normal"}
        Initial values of rows never written: uniform in [-init_scale,
        init_scale), zeros, or normal with stddev init_scale truncated at 2
        stddev.
    init_scale : float
        Finite, >= 0.
    optimizer : RowOptimizer
        The per-row update of gradient pushes.
    capacity : int
        Most stored rows (0: no limit).
    eviction : {"none", "lru", "lfu"}
        What a full table does: refuse new rows ("none") or evict the least
        recently or least often used row (approximately).
    admit_after : int
        An id gets a stored row only once requests have named it this many
        times (0 or 1: at once).
    ttl_s : int
        Rows untouched this many seconds read as initial values again (0:
        never).
    """

    name: str
    dim: int
    vocab: int = 0
    seed: int = 0
    initializer: str = "uniform"
    init_scale: float = 0.05
    optimizer: RowOptimizer = field(default_factory=RowOptimizer)
    capacity: int = 0
    eviction: str = "none"
    admit_after: int = 0
    ttl_s: int = 0


def _fail(table: str, message: str) -> None:
    raise TensorSparkValueError(f"table {table!r}: {message}")


def _check_int(table: str, field_name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        _fail(table, f"{field_name} must be an integer, got {value!r}")
    if not lo <= int(value) < hi:
        _fail(table, f"{field_name} must be in [{lo}, {hi}), got {value}")
    return int(value)


def _check_float(
    table: str, field_name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        _fail(table, f"{field_name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo):
        lo_text = f"> {lo}" if open_lo else f">= {lo}"
        hi_text = "" if hi == math.inf else f" and <= {hi}"
        _fail(table, f"{field_name} must be finite, {lo_text}{hi_text}, got {value!r}")
    return v


def _check_choice(table: str, field_name: str, value: Any, choices: dict[str, int]) -> int:
    if value not in choices:
        _fail(table, f"{field_name} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def validate_table(spec: TableSpec) -> dict[str, Any]:
    """Check every field of ``spec`` and return the dict the core client takes.

    Parameters
    ----------
    spec : TableSpec
        The table to check.

    Returns
    -------
    dict
        The wire values (enums as integers).

    Raises
    ------
    TensorSparkValueError
        Naming the table and the first bad field.
    """
    if not isinstance(spec, TableSpec):
        raise TensorSparkValueError(f"expected a TableSpec, got {type(spec).__name__}")
    name = spec.name
    if not isinstance(name, str) or not 1 <= len(name.encode("utf-8")) <= _MAX_NAME_BYTES:
        raise TensorSparkValueError(
            f"table name must be a str of 1..{_MAX_NAME_BYTES} UTF-8 bytes, got {name!r}"
        )
    opt = spec.optimizer
    if not isinstance(opt, RowOptimizer):
        _fail(name, f"optimizer must be a RowOptimizer, got {type(opt).__name__}")
    kind = _check_choice(name, "optimizer.kind", opt.kind, _OPTIMIZERS)
    d = {
        "name": name,
        "dim": _check_int(name, "dim", spec.dim, 1, _MAX_DIM + 1),
        "vocab": _check_int(name, "vocab", spec.vocab, 0, _U64),
        "seed": _check_int(name, "seed", spec.seed, 0, _U64),
        "initializer": _check_choice(name, "initializer", spec.initializer, _INITIALIZERS),
        "init_scale": _check_float(name, "init_scale", spec.init_scale, 0.0, math.inf),
        "capacity": _check_int(name, "capacity", spec.capacity, 0, _U64),
        "eviction": _check_choice(name, "eviction", spec.eviction, _EVICTIONS),
        "admit_after": _check_int(name, "admit_after", spec.admit_after, 0, _U32),
        "ttl_s": _check_int(name, "ttl_s", spec.ttl_s, 0, _U32),
        "optimizer": kind,
        "learning_rate": _check_float(
            name, "optimizer.learning_rate", opt.learning_rate, 0.0, math.inf, open_lo=True
        ),
        "beta1": _check_float(name, "optimizer.beta1", opt.beta1, 0.0, math.inf),
        "beta2": _check_float(name, "optimizer.beta2", opt.beta2, 0.0, math.inf),
        "epsilon": _check_float(name, "optimizer.epsilon", opt.epsilon, 0.0, math.inf),
        "initial_accumulator": _check_float(
            name, "optimizer.initial_accumulator", opt.initial_accumulator, 0.0, math.inf
        ),
        "l1": _check_float(name, "optimizer.l1", opt.l1, 0.0, math.inf),
        "l2": _check_float(name, "optimizer.l2", opt.l2, 0.0, math.inf),
        "lr_power": _check_float(name, "optimizer.lr_power", opt.lr_power, -math.inf, 0.0),
        "beta": _check_float(name, "optimizer.beta", opt.beta, 0.0, math.inf),
    }
    for beta in ("beta1", "beta2"):
        if d[beta] >= 1.0:
            _fail(name, f"optimizer.{beta} must be in [0, 1), got {d[beta]!r}")
    if opt.kind == "ftrl" and d["lr_power"] < 0 and d["initial_accumulator"] == 0:
        _fail(name, "optimizer.initial_accumulator must be > 0 for ftrl with lr_power < 0")
    return d


def as_ids(table: str, ids: Any) -> np.ndarray:
    """``ids`` as a C-contiguous int64 vector, refusing non-integer dtypes.

    Raises
    ------
    TensorSparkValueError
        When the ids are not integers or not 1-D, naming the table.
    """
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        _fail(table, f"ids must be integers, got {arr.dtype}")
    if arr.ndim != 1:
        _fail(table, f"ids must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        _fail(table, f"id {int(arr.max())} does not fit in int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def initial_rows(
    table: str,
    ids: Any,
    dim: int,
    seed: int = 0,
    initializer: str = "uniform",
    scale: float = 0.05,
) -> np.ndarray:
    """Initial values of rows never written, exactly as every server computes them.

    Parameters
    ----------
    table : str
        Table name (part of the value's key).
    ids : array_like of int
        Row ids, 1-D.
    dim, seed, initializer, scale
        As in :class:`TableSpec` (``scale`` is ``init_scale``).

    Returns
    -------
    numpy.ndarray
        float32, shape ``[len(ids), dim]``.
    """
    spec = TableSpec(table, dim=dim, seed=seed, initializer=initializer, init_scale=scale)
    d = validate_table(spec)
    return _core.initial_rows(
        table, as_ids(table, ids), d["dim"], d["seed"], d["initializer"], d["init_scale"]
    )


def server_of_ids(ids: Any, num_servers: int) -> np.ndarray:
    """The server (0..num_servers-1) that holds each id's rows in every table.

    The documented rule: SplitMix64's finalizer of the id's bits, modulo
    ``num_servers`` (docs/protocol.md, "Sharding").

    Returns
    -------
    numpy.ndarray
        int64, one server index per id.
    """
    if isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 1:
        raise TensorSparkValueError(f"num_servers must be an integer >= 1, got {num_servers!r}")
    return _core.server_of_ids(as_ids("server_of_ids", ids), num_servers)


def hash_strings(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids of strings: 64-bit FNV-1a of the UTF-8 bytes, SplitMix64, masked to 63 bits.

    Deterministic across processes, runs and machines (docs/protocol.md,
    "String ids"); the ids are non-negative.

    Parameters
    ----------
    values : sequence of str
        The strings (a list, tuple or NumPy array of str).

    Returns
    -------
    numpy.ndarray
        int64, one id per string.
    """
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    for v in items:
        if not isinstance(v, str):
            raise TensorSparkValueError(
                f"hash_strings takes str values, got {type(v).__name__} {v!r}"
            )
    return _core.hash_strings(items)
