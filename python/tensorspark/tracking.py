"""MLflow tracking of training runs, logged from the driver.

``keras.fit(..., mlflow=True)``, ``SparkSession(..., mlflow=True)`` and
``KerasEstimator(fit_options={"mlflow": True})`` log one MLflow run per fit
(per TF1 session) from the driver, never one per Spark task:

- every option as a parameter (a readable string; ``secret`` redacted);
- per epoch (TF1: per ``run``), with ``step=epoch``: the loss and metrics,
  the ``val_`` ones, ``samples_per_sec``, ``staleness_mean``,
  ``staleness_max``, ``samples`` and ``epoch_seconds``;
- the trained Keras model (``mlflow.keras``, as the ``model`` artifact);
- tags: ``tensorspark.spark_app_id``, ``tensorspark.run_name``,
  ``tensorspark.api`` and ``tensorspark.version``.

:class:`MlflowCallback` carries settings of one's own (tracking URI,
experiment, run name, tags, model registration) and is the place to
subclass for more logging. mlflow is imported only when a run asks for it.
A failure of MLflow never stops training: it is logged as a warning and
the run goes on without MLflow.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import TensorSparkValueError

log = logging.getLogger("tensorspark")

# MLflow's limits: 100 params or tags per batch; param values are kept within
# 500 characters, the limit of older tracking servers (newer ones take 6000).
_BATCH = 100
_VALUE_CHARS = 500
# Options that are not the user's: internal keys and this option itself.
_UNLOGGED = ("mlflow",)
_REDACTED = ("secret",)
_THREADS = {"keras": "threads_per_worker", "tf1": "threads_per_task"}


class MlflowCallback:
    """MLflow settings for a run, and the hooks that log it.

    Pass it as ``mlflow=MlflowCallback(...)``; ``mlflow=True`` is
    ``mlflow=MlflowCallback()``. Subclass it to log more: each ``on_*``
    method gets the :class:`mlflow.MlflowClient` as ``self.client`` and
    the run's id as ``self.run_id``.

    Parameters
    ----------
    tracking_uri : str, optional
        Where to log. Default: MLflow's own setting (``MLFLOW_TRACKING_URI``
        or ``mlflow.set_tracking_uri``); with neither, a local ``./mlruns``
        file store, which then becomes the process's tracking URI
        (``mlflow.set_tracking_uri``) so that later MLflow calls find the
        run. A file store needs ``MLFLOW_ALLOW_FILE_STORE=true`` in MLflow
        3.7 and later; tensorspark sets it when it is unset and the URI is
        a local path.
    experiment_name : str, optional
        The experiment (created if missing). Default: the active run's, else
        ``mlflow.set_experiment``'s (``MLFLOW_EXPERIMENT_NAME`` or
        ``MLFLOW_EXPERIMENT_ID``), else MLflow's ``Default``.
    run_name : str, optional
        Default: the training run's name (``fit(name=...)``, else
        ``"keras <model name>"``; TF1: ``"user/name"``).
    tags : dict, optional
        Extra tags for the run.
    log_model : bool
        Log the trained Keras model as the run's ``model`` artifact.
    registered_model_name : str, optional
        Also register the logged model under this name.

    Notes
    -----
    Inside a run the user started (``with mlflow.start_run():``), each fit
    logs a nested run (tagged ``mlflow.parentRunId``) in the parent's
    experiment, so several fits never mix their parameters. A fit that
    raises ends its run as ``FAILED`` (``KILLED`` on KeyboardInterrupt).
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        log_model: bool = True,
        registered_model_name: str | None = None,
    ) -> None:
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.run_name, self.tags = run_name, dict(tags or {})
        self.log_model, self.registered_model_name = log_model, registered_model_name
        self.client: Any = None
        self.run_id: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_name={self.run_name!r})"

    def on_run_begin(self, name: str, tags: dict[str, str], params: dict[str, str]) -> None:
        """Start the MLflow run (nested in an active one) with its tags and params."""
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        uri = resolve_tracking_uri(mlflow, self.tracking_uri)
        self.client = mlflow.MlflowClient(uri)
        parent = mlflow.active_run()
        tags = {**tags, **{k: str(v) for k, v in self.tags.items()}}
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent.info.run_id
        run = self.client.create_run(
            self._experiment_id(parent), run_name=self.run_name or name, tags=tags
        )
        self.run_id = run.info.run_id
        self.on_params(params)

    def on_params(self, params: dict[str, str]) -> None:
        """Log parameters, at most 100 per call."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log an epoch's (TF1: a run's) metrics at ``step=epoch``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def on_model(self, model: Any, custom_objects: Mapping[str, Any] | None, step: int) -> None:
        """Log the trained Keras model as the run's ``model`` (``mlflow.keras``).

        ``step`` is the number of epochs trained: the step after the last
        epoch's metrics, so that MLflow, which copies a model's step's
        metrics to the model, leaves the run's metric histories as they are.

        A model with custom layers loads back with ``mlflow.keras.load_model(
        uri, custom_objects=...)``; one with ParameterServerEmbedding layers
        once ``tensorspark.keras`` is imported (it registers the layer).
        """
        if not self.log_model:
            return
        import mlflow
        import mlflow.keras

        # The run is made the active one while it logs: MLflow files a logged
        # model under the active run's experiment. Leaving the block ends it.
        with (
            _global_tracking_uri(mlflow, self.client.tracking_uri),
            mlflow.start_run(run_id=self.run_id, nested=True),
        ):
            mlflow.keras.log_model(
                model,
                name="model",
                step=step,
                signature=_signature(model),
                pip_requirements=_requirements(model),
                registered_model_name=self.registered_model_name,
            )

    def on_run_end(self, status: str) -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.client.set_terminated(self.run_id, status)

    def _experiment_id(self, parent: Any) -> str:
        name = self.experiment_name
        if name is None and parent is not None:
            return parent.info.experiment_id
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name:
            found = self.client.get_experiment_by_name(name)
            return found.experiment_id if found else self.client.create_experiment(name)
        return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # MLflow's "Default"


def resolve_tracking_uri(mlflow: Any, explicit: str | None) -> str:
    """The tracking URI: ``explicit``, else MLflow's setting, else ``./mlruns``."""
    if explicit:
        uri = explicit
    elif mlflow.tracking.is_tracking_uri_set():
        uri = mlflow.get_tracking_uri()
    else:
        uri = Path("mlruns").absolute().as_uri()
        mlflow.set_tracking_uri(uri)
    if _is_local_path(uri):
        # MLflow >= 3.7 refuses a file store unless this is set (its opt-out).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _is_local_path(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


class _global_tracking_uri:  # noqa: N801 - used as a context manager
    """MLflow's process-wide tracking URI set to ``uri`` for a block.

    ``Model.log`` reads the process-wide URI; a callback with its own
    ``tracking_uri`` must log the model there too.
    """

    def __init__(self, mlflow: Any, uri: str) -> None:
        self.mlflow, self.uri = mlflow, uri
        self.previous: str | None = None

    def __enter__(self) -> None:
        m = self.mlflow
        self.previous = m.get_tracking_uri() if m.tracking.is_tracking_uri_set() else None
        if self.previous != self.uri:
            m.set_tracking_uri(self.uri)

    def __exit__(self, *exc: Any) -> None:
        if self.previous != self.uri:
            self.mlflow.set_tracking_uri(self.previous)


def _signature(model: Any) -> Any:
    """The model's input and output tensor shapes as an MLflow signature (None if odd)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(tensors: list[Any]) -> Any:
        named = len(tensors) > 1
        return Schema(
            [
                TensorSpec(
                    np.dtype(str(getattr(t.dtype, "name", t.dtype))),
                    tuple(-1 if d is None else int(d) for d in t.shape),
                    _tensor_name(t) if named else None,
                )
                for t in tensors
            ]
        )

    try:
        return ModelSignature(
            inputs=schema(list(model.inputs)), outputs=schema(list(model.outputs))
        )
    except Exception:  # noqa: BLE001 - a signature is optional; MLflow logs without one
        return None


def _tensor_name(t: Any) -> str:
    history = getattr(t, "_keras_history", None)
    layer = getattr(history, "operation", None)
    return getattr(layer, "name", None) or t.name


def _requirements(model: Any) -> list[str]:
    """Pinned pip requirements, given so that MLflow does not infer them (slow)."""
    reqs = [_pinned("keras")]
    tf = next((d for d in ("tensorflow", "tensorflow-cpu") if _version(d)), None)
    if tf:
        reqs.append(_pinned(tf))
    if any(type(layer).__module__.startswith("tensorspark") for layer in _layers(model)):
        reqs.append(_pinned("tensorspark"))
    return reqs


def _layers(model: Any) -> list[Any]:
    try:
        return list(model._flatten_layers(include_self=False))
    except Exception:  # noqa: BLE001 - private Keras API; the top level suffices
        return list(getattr(model, "layers", []))


def _pinned(dist: str) -> str:
    version = _version(dist)
    return f"{dist}=={version}" if version else dist


# -- the driver's side -------------------------------------------------------


def check_option(value: Any) -> MlflowCallback | None:
    """The callback for the ``mlflow`` option (None when off); refuses a bad value.

    Called by ``runtime.options.check`` before anything starts, so a missing
    mlflow package is reported at once.
    """
    if value is None or value is False:
        return None
    if value is True:
        value = MlflowCallback()
    if not isinstance(value, MlflowCallback):
        raise TensorSparkValueError(
            "mlflow must be True, False or a tensorspark.tracking.MlflowCallback(...), got "
            f"{type(value).__name__}"
        )
    if importlib.util.find_spec("mlflow") is None:
        raise TensorSparkValueError(
            "mlflow=... needs the mlflow package: pip install mlflow-skinny (or mlflow)"
        )
    found = [v for v in map(_version, ("mlflow", "mlflow-skinny")) if v]
    if found and all(int(v.split(".")[0]) < 3 for v in found):
        raise TensorSparkValueError(
            f"mlflow=... needs MLflow 3 or later, found {found[0]}: pip install -U mlflow-skinny"
        )
    return value


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def readable(value: Any) -> str:
    """An option's value as a parameter: short, and naming objects and functions."""
    if value is None or isinstance(value, bool | int | float | str):
        text = str(value)
    elif isinstance(value, bytes | bytearray):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {readable(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(readable(v) for v in value) + "]"
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        text = f"array(shape={tuple(value.shape)}, dtype={value.dtype})"
    elif hasattr(value, "schema") and hasattr(value, "columns"):
        text = f"DataFrame[{', '.join(value.columns)}]"
    elif isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        text = f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    else:
        text = repr(value)
        if " at 0x" in text or len(text) > _VALUE_CHARS:
            text = type(value).__qualname__
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def params(opts: Mapping[str, Any], api: str) -> dict[str, str]:
    """Every option the user gave as a parameter, by the API's own names."""
    out = {}
    for key, value in opts.items():
        if key.startswith("_") or key in _UNLOGGED:
            continue
        if key == "threads":
            key = _THREADS.get(api, key)
        out[key] = "<redacted>" if key in _REDACTED and value else readable(value)
    return out


def epoch_metrics(
    logs: Mapping[str, float], results: list[dict[str, Any]], seconds: float
) -> dict[str, float]:
    """An epoch's metrics: its logs, throughput and staleness over the tasks."""
    samples = sum(r["samples"] for r in results)
    out = dict(logs)
    out["samples"] = samples
    out["samples_per_sec"] = samples / seconds if seconds > 0 else 0.0
    out["epoch_seconds"] = seconds
    if samples:
        out["staleness_mean"] = sum(r["staleness_mean"] * r["samples"] for r in results) / samples
    if results:
        out["staleness_max"] = max(r["staleness_max"] for r in results)
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


class Tracker:
    """The driver's MLflow run: each hook of the callback, guarded.

    The first MLflow failure is logged as a warning and turns logging off
    for the rest of the run (a slow or broken tracking server must not hold
    up training); the run is still ended, if MLflow lets it.
    """

    def __init__(
        self, callback: MlflowCallback, name: str, tags: dict[str, str], params: dict[str, str]
    ) -> None:
        self.callback = callback
        self._logged: dict[str, str] = {}
        self._step = 0  # the step after the last one logged
        self._ok = True
        callback.run_id = None
        if self._call("start the run", callback.on_run_begin, name, tags, params):
            self._logged.update(params)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        if not self._ok:
            return False
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._ok = False
            log.warning("tensorspark: MLflow could not %s, logging no more of it: %s", what, e)
            return False
        return True

    def params(self, values: dict[str, str], step: int) -> None:
        """Log new parameters; one that changes gets a ``.run<step>`` copy."""
        new = {}
        for k, v in values.items():
            if k not in self._logged:
                new[k] = v
            elif self._logged[k] != v:
                new[f"{k}.run{step}"] = v
        if new and self._call("log parameters", self.callback.on_params, new):
            self._logged.update(new)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._step = epoch + 1
        self._call(f"log the metrics of step {epoch}", self.callback.on_epoch_end, epoch, metrics)

    def model(self, model: Any, custom_objects: Mapping[str, Any] | None) -> None:
        self._call("log the model", self.callback.on_model, model, custom_objects, self._step)

    def close(self, status: str) -> None:
        if self.callback.run_id is not None:
            self._ok = True  # ending the run is worth one try even after a failure
            self._call(f"end the run as {status}", self.callback.on_run_end, status)
