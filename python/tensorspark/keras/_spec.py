"""How a Keras model travels and maps onto the parameter server.

The driver serializes the compiled model to ``.keras`` bytes (or ships the
user's builder function); tasks rebuild it once per Python worker. Weights
are matched by position in ``model.weights`` (layer names differ between
processes that build the same architecture), with shapes checked.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import TensorSparkValueError

UPDATES = ("delta", "gradient")


def check_compiled(model: Any, where: str = "fit") -> None:
    """Fail clearly unless ``model`` is a compiled Keras model."""
    import keras

    if not isinstance(model, keras.Model):
        raise TensorSparkValueError(
            f"{where}: expected a keras.Model or a function returning one, got "
            f"{type(model).__name__}"
        )
    if not getattr(model, "compiled", False) or model.optimizer is None or model.loss is None:
        raise TensorSparkValueError(
            f"{where}: the model is not compiled; call model.compile(optimizer=..., loss=..., "
            "metrics=[...]) before training (the model builder must return a compiled model)"
        )
    if not model.built or not model.weights:
        raise TensorSparkValueError(
            f"{where}: the model has no weights yet; give it an input shape "
            "(keras.Input(shape=...)) so it is built before training"
        )


def resolve(model_or_builder: Any, where: str = "fit") -> tuple[Any, Callable[[], Any] | None]:
    """The driver's model, and the builder when one was given."""
    import keras

    if isinstance(model_or_builder, keras.Model):
        check_compiled(model_or_builder, where)
        return model_or_builder, None
    if callable(model_or_builder):
        model = model_or_builder()
        check_compiled(model, where)
        return model, model_or_builder
    raise TensorSparkValueError(
        f"{where}: expected a compiled keras.Model or a function that builds one, got "
        f"{type(model_or_builder).__name__}"
    )


def to_bytes(model: Any) -> bytes:
    """The model (architecture, weights, compile config) as ``.keras`` bytes."""
    with tempfile.TemporaryDirectory(prefix="tensorspark-") as d:
        path = os.path.join(d, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def from_bytes(data: bytes, custom_objects: dict[str, Any] | None = None) -> Any:
    """A model from :func:`to_bytes` output."""
    import keras

    from . import layers  # noqa: F401  (registers ParameterServerEmbedding for loading)

    with tempfile.TemporaryDirectory(prefix="tensorspark-") as d:
        path = os.path.join(d, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        with warnings.catch_warnings():
            # A model saved before training has no optimizer slots yet.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return keras.saving.load_model(path, custom_objects=custom_objects, compile=True)


def weight_names(model: Any) -> list[str]:
    """Parameter-server names of ``model.weights``: position and the weight's own name.

    Not the Keras path: it holds layer names that Keras numbers per process
    (``dense_3``), so a model rebuilt elsewhere (a resumed driver, a task)
    would not find its weights.
    """
    return [f"{i:04d}/{w.name}" for i, w in enumerate(model.weights)]


def synced(model: Any, update: str) -> list[int]:
    """Indices into ``model.weights`` that the parameter server keeps in sync.

    Deltas cover every weight (BatchNorm statistics included); gradients
    exist for trainable weights only.
    """
    if update == "delta":
        return list(range(len(model.weights)))
    trainable = {id(w) for w in model.trainable_weights}
    return [i for i, w in enumerate(model.weights) if id(w) in trainable]


def check_same_weights(model: Any, shapes: list[tuple[int, ...]]) -> None:
    """Fail when a task's model does not have the driver's weight shapes."""
    got = [tuple(w.shape) for w in model.weights]
    if got != [tuple(s) for s in shapes]:
        raise TensorSparkValueError(
            "the model built in the Spark task does not match the driver's: weight shapes "
            f"{got} vs {list(shapes)}; the model builder must build the same architecture "
            "every time"
        )


def learning_rate(optimizer: Any) -> float | None:
    """The optimizer's current learning rate, or None for a schedule."""
    import keras

    lr = optimizer.learning_rate
    if isinstance(
        getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule
    ):
        return None
    return float(np.asarray(lr))


def server_optimizer(optimizer: Any) -> tuple[str, float, dict[str, float]]:
    """The server-side optimizer equivalent to a Keras optimizer.

    Used with ``update="gradient"``: the server applies the pushed gradients
    with these formulas (see ``PSClient.set_optimizer``).
    """
    import keras

    opt = keras.optimizers
    # mixed_float16: the server applies unscaled gradients with the inner optimizer.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    lr = learning_rate(optimizer)
    name = type(optimizer).__name__
    if lr is None:
        raise TensorSparkValueError(
            f"update='gradient' needs a constant learning rate; the {name} optimizer has a "
            "schedule. Use update='delta', or change the rate per epoch with a callback "
            "(keras.callbacks.LearningRateScheduler)"
        )
    cfg = optimizer.get_config()
    for unsupported in ("clipnorm", "clipvalue", "global_clipnorm"):
        if cfg.get(unsupported):
            raise TensorSparkValueError(
                f"update='gradient': the server does not clip gradients ({unsupported}="
                f"{cfg[unsupported]}); use update='delta'"
            )
    if isinstance(optimizer, opt.AdamW):
        keys = ("beta_1", "beta_2", "epsilon", "weight_decay")
        return "adamw", lr, {k: float(cfg[k]) for k in keys}
    if isinstance(optimizer, opt.Adam):
        if cfg.get("amsgrad"):
            raise TensorSparkValueError("update='gradient': Adam(amsgrad=True) is not supported")
        return "adam", lr, {k: float(cfg[k]) for k in ("beta_1", "beta_2", "epsilon")}
    if isinstance(optimizer, opt.SGD):
        momentum = float(cfg.get("momentum", 0.0))
        if momentum == 0.0:
            return "sgd", lr, {}
        return ("nesterov" if cfg.get("nesterov") else "momentum"), lr, {"momentum": momentum}
    if isinstance(optimizer, opt.RMSprop):
        if cfg.get("momentum") or cfg.get("centered"):
            raise TensorSparkValueError(
                "update='gradient': RMSprop with momentum or centered=True is not supported"
            )
        return "rmsprop", lr, {"rho": float(cfg["rho"]), "epsilon": float(cfg["epsilon"])}
    if isinstance(optimizer, opt.Adagrad):
        keys = ("initial_accumulator_value", "epsilon")
        return "adagrad", lr, {k: float(cfg[k]) for k in keys}
    raise TensorSparkValueError(
        f"update='gradient': the server has no equivalent of the {name} optimizer; use SGD, "
        "Adam, AdamW, RMSprop or Adagrad, or update='delta' (any optimizer, run in the tasks)"
    )


def model_inputs(model: Any) -> list[tuple[str, tuple[int | None, ...], str]]:
    """Each model input as ``(name, shape without the batch axis, table)``.

    ``table`` names the ParameterServerEmbedding that takes the input's ids
    ("" for a dense input). A table's layer must take model inputs
    directly, since a task feeds it local row indices in place of the ids.
    """
    import keras

    from .layers import tables_of

    inputs = list(model.inputs)
    by_id = {id(t): i for i, t in enumerate(inputs)}
    tables = [""] * len(inputs)
    for layer in tables_of(model):
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                i = by_id.get(id(t))
                if i is None:
                    raise TensorSparkValueError(
                        f"ParameterServerEmbedding {layer.name!r} takes a computed tensor "
                        f"({getattr(t, 'name', t)!r}); its ids must come straight from a model "
                        "input (keras.Input(..., dtype='int64')), fed from a DataFrame column"
                    )
                if tables[i] and tables[i] != layer.table:
                    raise TensorSparkValueError(
                        f"model input {inputs[i].name!r} feeds two tables ({tables[i]!r} and "
                        f"{layer.table!r}); give each table its own input"
                    )
                tables[i] = layer.table
    from .layers import ParameterServerEmbedding

    for layer in model.layers:
        if isinstance(layer, (ParameterServerEmbedding, keras.layers.InputLayer)):
            continue
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                i = by_id.get(id(t))
                if i is not None and tables[i]:
                    raise TensorSparkValueError(
                        f"model input {inputs[i].name!r} feeds table {tables[i]!r} and also layer "
                        f"{layer.name!r}; a task feeds a table's input row indices, not the ids, "
                        "so give the other layer its own input (from the same column)"
                    )
    out = []
    for t, table in zip(inputs, tables, strict=True):
        shape = tuple(None if d is None else int(d) for d in tuple(t.shape)[1:])
        out.append((t.name, shape, table))
    return out


def fed_by_input(inputs: list[tuple[str, tuple[int | None, ...], str]], features_col: Any) -> bool:
    """Whether the model is fed by input name (several inputs, a table, a dict or None)."""
    return (
        len(inputs) > 1
        or any(table for _, _, table in inputs)
        or not isinstance(features_col, str | list | tuple)
    )


# -- Spark ML classifier and regressor outputs -------------------------------------------------

OUTPUT_KINDS = ("auto", "probabilities", "logits")


def _loss_info(loss: Any) -> tuple[str, bool]:
    """The loss's name (lower case, no underscores) and whether it takes logits."""
    import keras

    if isinstance(loss, dict) and len(loss) == 1:
        loss = next(iter(loss.values()))
    if isinstance(loss, list | tuple) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, str):
        return loss.replace("_", "").lower(), False
    if isinstance(loss, keras.losses.Loss):
        cfg = loss.get_config()
        name = getattr(loss, "fn", None)
        name = getattr(name, "__name__", None) or cfg.get("name") or type(loss).__name__
        return str(name).replace("_", "").lower(), bool(cfg.get("from_logits", False))
    keywords = getattr(loss, "keywords", None) or {}  # functools.partial(loss, from_logits=True)
    fn = getattr(loss, "func", loss)
    name = getattr(fn, "__name__", type(fn).__name__)
    return name.replace("_", "").lower(), bool(keywords.get("from_logits", False))


def sparse_loss(model: Any) -> bool:
    """Whether the model's loss takes class indices (sparse categorical)."""
    return _loss_info(model.loss)[0].startswith("sparsecategorical")


def _last_activation(model: Any) -> str:
    """The name of the activation that produces the model's output ("linear" for none)."""
    import keras

    layer = model.outputs[0]._keras_history.operation if model.outputs else model.layers[-1]
    while isinstance(layer, keras.Model) and layer.layers:  # a nested model's own last layer
        layer = layer.outputs[0]._keras_history.operation if layer.outputs else layer.layers[-1]
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear" if isinstance(layer, keras.layers.Dense) else type(layer).__name__
    return getattr(activation, "__name__", type(activation).__name__)


def output_width(model: Any, who: str) -> int:
    """Values per row of the model's one output; a clear error for several outputs."""
    shapes = model.output_shape
    if isinstance(shapes, list | dict) or (shapes and isinstance(shapes[0], tuple | list)):
        raise TensorSparkValueError(
            f"{who} needs a model with one output; this one has {len(shapes)}"
        )
    if len(shapes) != 2 or shapes[1] is None:
        raise TensorSparkValueError(
            f"{who} needs a model whose output is one vector per row, shape (batch, n); this "
            f"one's is {shapes}. Flatten it (keras.layers.Flatten) or end with a Dense layer"
        )
    return int(shapes[1])


def classifier_output(model: Any, requested: str = "auto") -> tuple[str, int]:
    """How a classifier reads the model's output: ``("probabilities" | "logits", width)``.

    ``"auto"`` follows the compiled loss (``from_logits=True``: logits), then
    the last layer's activation (softmax or one sigmoid unit: probabilities;
    log_softmax: logits). Anything else is ambiguous and refused.
    """
    who = "KerasClassifier"
    if requested not in OUTPUT_KINDS:
        raise TensorSparkValueError(
            f"{who}: outputKind must be one of {list(OUTPUT_KINDS)}, got {requested!r}"
        )
    width = output_width(model, who)
    if requested != "auto":
        return requested, width
    loss, from_logits = _loss_info(getattr(model, "loss", None))
    activation = _last_activation(model)
    if loss.startswith("categorical"):
        raise TensorSparkValueError(
            f"{who}: the model is compiled with {loss!r}, which takes one-hot labels; Spark ML "
            "labels are class indices (0.0, 1.0, ...), so compile with "
            "sparse_categorical_crossentropy instead"
        )
    if loss.startswith("sparsecategorical") and width < 2:
        raise TensorSparkValueError(
            f"{who}: a sparse categorical loss needs one output unit per class; this model has "
            "one. End with Dense(n_classes), or with Dense(1, activation='sigmoid') and "
            "binary_crossentropy for two classes"
        )
    if from_logits or activation == "log_softmax":
        return "logits", width
    if activation == "softmax" and width >= 2:
        return "probabilities", width
    if activation == "sigmoid" and width == 1:
        return "probabilities", width
    if activation == "sigmoid":
        raise TensorSparkValueError(
            f"{who}: the model ends in {width} sigmoid units (multi-label); a classifier needs "
            "softmax over the classes or one sigmoid unit (binary), or set "
            "outputKind='probabilities' to take the output as it is"
        )
    raise TensorSparkValueError(
        f"{who} cannot tell whether the model outputs probabilities or logits: its last "
        f"activation is {activation!r} and its loss ({loss or 'none'}) has no "
        "from_logits=True. End with softmax (or one sigmoid unit), compile the loss with "
        "from_logits=True, or set outputKind='probabilities' or 'logits'"
    )


def regression_output(model: Any) -> None:
    """Fail clearly unless the model gives one value per row."""
    width = output_width(model, "KerasRegressor")
    if width != 1:
        raise TensorSparkValueError(
            f"KerasRegressor needs a model with one output value per row; this one gives "
            f"{width}. End it with keras.layers.Dense(1)"
        )


def set_learning_rate(model: Any, value: float) -> Any:
    """Set the compiled optimizer's constant learning rate; returns the model."""
    import keras

    opt = model.optimizer
    schedule = keras.optimizers.schedules.LearningRateSchedule
    if isinstance(getattr(opt, "_learning_rate", None), schedule):
        raise TensorSparkValueError(
            f"learningRate={value}: the model's {type(opt).__name__} optimizer has a "
            "learning-rate schedule; leave learningRate unset, or compile with a constant rate"
        )
    opt.learning_rate = float(value)
    return model
