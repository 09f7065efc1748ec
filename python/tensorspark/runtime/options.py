"""The one place that validates the options both APIs share.

``SparkSession`` and ``keras.fit`` call :func:`check` with their keyword
arguments; each option is checked here once, with one message, so the two
APIs accept and refuse the same values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _core, tracking
from ..combiners import DeltaCombiner, ElasticCombiner, MeanCombiner
from ..errors import TensorSparkValueError
from . import updates

MODES = ("async", "sync", "ssp")

_POSITIVE_INTS = ("epochs", "batch_size", "sync_interval", "buffer_batches", "steps_per_call")
# checkpoint_keep 0 keeps every snapshot.
_NON_NEGATIVE_INTS = (
    "staleness",
    "server_port",
    "checkpoint_every_versions",
    "checkpoint_keep",
    "seed",
)
_POSITIVE_SECONDS = ("connect_timeout", "io_timeout", "heartbeat_timeout", "wait_timeout")


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def check(opts: dict[str, Any]) -> dict[str, Any]:
    """Validate the shared options present in ``opts``; returns them normalized."""
    out = dict(opts)
    for key in _POSITIVE_INTS:
        if key in out and (not _is_int(out[key]) or out[key] < 1):
            raise TensorSparkValueError(f"{key} must be an int >= 1, got {out[key]!r}")
    for key in _NON_NEGATIVE_INTS:
        if key in out and (not _is_int(out[key]) or out[key] < 0):
            raise TensorSparkValueError(f"{key} must be an int >= 0, got {out[key]!r}")
    for key in _POSITIVE_SECONDS:
        if key in out and not (_is_number(out[key]) and math.isfinite(out[key]) and out[key] > 0):
            raise TensorSparkValueError(f"{key} must be a number of seconds > 0, got {out[key]!r}")
    if "checkpoint_every_s" in out:
        v = out["checkpoint_every_s"]
        if not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise TensorSparkValueError(f"checkpoint_every_s must be >= 0 seconds, got {v!r}")
    if "hang_timeout" in out:
        ht = out["hang_timeout"]
        if ht is not None and not (_is_number(ht) and ht > 0):
            raise TensorSparkValueError(f"hang_timeout must be > 0 seconds or None, got {ht!r}")
    if out.get("ui_port") is not None:
        port = out["ui_port"]
        if not _is_int(port) or not 0 <= port <= 65535:
            raise TensorSparkValueError(
                "ui_port must be None (no status page), 0 (a free port) or a port number "
                f"1..65535, got {port!r}"
            )
    threads = out.get("threads")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise TensorSparkValueError(
            f"threads_per_worker must be an int >= 1 or None, got {threads!r}"
        )
    if "consistency" in out and out["consistency"] not in MODES:
        raise TensorSparkValueError(
            f"consistency (the mode) must be one of {list(MODES)}, got {out['consistency']!r}"
        )
    if "shuffle" in out and out["shuffle"] != "full" and not isinstance(out["shuffle"], bool):
        raise TensorSparkValueError(
            f"shuffle must be True (a shuffle buffer), False or 'full' (the whole partition), "
            f"got {out['shuffle']!r}"
        )
    if "mlflow" in out:
        out["mlflow"] = tracking.check_option(out["mlflow"])
    if "tls" in out:
        out["tls"] = _tls(out["tls"], bool(out.get("servers")) or out.get("start_server") is False)
    if out.get("ps_shards") is not None:
        _shards(out)
    if out.get("servers"):
        if not out.get("secret"):
            raise TensorSparkValueError(
                "servers=[...] needs the run's secret: pass secret=<bytes of the file given to "
                "tensorspark-ps --secret-file>"
            )
        if out.get("checkpoint_dir"):
            raise TensorSparkValueError(
                "checkpoint_dir configures the parameter server that tensorspark starts; with "
                "servers=[...] give each tensorspark-ps --snapshot-dir instead (each then writes "
                "a consistent snapshot after every epoch; docs/snapshots.md)"
            )
        if out.get("resume_from") not in (None, "servers"):
            raise TensorSparkValueError(
                "with servers=[...], resume_from='servers' returns every server to the newest "
                f"snapshot they all hold; got resume_from={out['resume_from']!r}"
            )
    return out


def _shards(out: dict[str, Any]) -> None:
    """``ps_shards`` checked against the options it cannot go with."""
    n = out["ps_shards"]
    if not _is_int(n) or n < 0:
        raise TensorSparkValueError(
            f"ps_shards must be an int >= 0 (0: the server runs in the driver), got {n!r}"
        )
    if not n:
        return
    if out.get("servers") or out.get("start_server") is False:
        raise TensorSparkValueError(
            "ps_shards starts the parameter servers in Spark tasks; it cannot go with "
            "servers=[...] or start_server=False (servers you started yourself)"
        )
    if out.get("server_port"):
        raise TensorSparkValueError(
            "server_port sets the port of the server in the driver; with ps_shards each shard "
            "listens on a free port of its executor (leave server_port at 0)"
        )
    for key in ("checkpoint_dir", "resume_from"):
        path = out.get(key)
        if path is not None and "://" in str(path):
            raise TensorSparkValueError(
                f"with ps_shards the shards write and read snapshots themselves, in their Spark "
                f"tasks, so {key} must be a path every executor reaches (a shared mount), not "
                f"the URI {path!r}"
            )
    if out.get("resume_from") == "servers":
        raise TensorSparkValueError(
            "resume_from='servers' is for servers=[...]; with ps_shards, resume_from names the "
            "run directory an earlier sharded run wrote (checkpoint_dir/run-<id>)"
        )


def _tls(tls: Any, external: bool) -> bool | tuple[str, ...]:
    """``tls`` checked: False, True (the server tensorspark starts) or pinned fingerprints."""
    if tls is None or tls is False:
        return False
    if tls is True:
        if external:
            raise TensorSparkValueError(
                "tls=True makes a certificate for the parameter server tensorspark starts; an "
                "external tensorspark-ps started with --tls prints its certificate's "
                "fingerprint: pass tls='sha256:...' (or a list, one per server)"
            )
        return True
    pins = [tls] if isinstance(tls, str) else tls
    if not isinstance(pins, list | tuple) or not pins or not all(isinstance(p, str) for p in pins):
        raise TensorSparkValueError(
            "tls must be False, True (TLS to the parameter server tensorspark starts) or the "
            f"fingerprint(s) of external servers' certificates, got {tls!r}"
        )
    if not external:
        raise TensorSparkValueError(
            "tls='<fingerprint>' pins the certificate of an external server (servers=[...] or "
            "start_server=False); the server tensorspark starts makes its own: pass tls=True"
        )
    return tuple(_core.normalize_tls_fingerprint(p) for p in pins)


def rule(update: Any, num_tasks: int, *, api: str) -> updates.Rule:
    """The update rule for ``update`` (a combiner or a name) with ``num_tasks`` tasks.

    Accepted everywhere: ``"delta"``, ``"mean"``, ``"elastic"`` and the
    combiner objects (:class:`MeanCombiner`, :class:`DeltaCombiner`,
    :class:`ElasticCombiner`); ``"gradient"`` needs the Keras API (its
    gradients come from the model's loss).
    """
    if isinstance(update, str):
        named = {"delta": DeltaCombiner(), "mean": MeanCombiner(), "elastic": ElasticCombiner()}
        if update == "gradient":
            if api != "keras":
                raise TensorSparkValueError(
                    "the gradient update needs the loss of a Keras model; a TF1 graph pushes "
                    "'mean', 'delta' or 'elastic' updates (weight_combiner=MeanCombiner(), "
                    "DeltaCombiner() or ElasticCombiner())"
                )
            return updates.Gradient()
        if update not in named:
            raise TensorSparkValueError(
                "update must be 'delta', 'mean', 'elastic', 'gradient' (Keras) or a combiner "
                f"(tensorspark.MeanCombiner(), DeltaCombiner(), ElasticCombiner()), got {update!r}"
            )
        update = named[update]
    if isinstance(update, MeanCombiner):
        return updates.ParameterMean(int(update.n or max(1, num_tasks)), update.average_iterates)
    if isinstance(update, DeltaCombiner):
        return updates.Delta()
    if isinstance(update, ElasticCombiner):
        return updates.Elastic(float(update.alpha))
    raise TensorSparkValueError(
        "weight_combiner must be tensorspark.MeanCombiner(), DeltaCombiner() or "
        f"ElasticCombiner(), got {type(update).__name__}"
    )
