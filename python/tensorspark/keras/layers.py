"""Keras layers whose weights live on the parameter server.

:class:`ParameterServerEmbedding` is an embedding table held by the
parameter server as a sparse table (docs/sparse.md): in a
:func:`tensorspark.keras.fit` task only the rows of each batch's unique ids
travel, the server applies the layer's optimizer per row, and the table
never has to fit in a task or in the driver. Anywhere else (on the driver,
in ``predict``, in a saved model) it is a plain Keras layer that looks ids
up in the rows it holds, like ``keras.layers.Embedding``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TensorSparkValueError

try:
    import keras
except ImportError as _e:  # pragma: no cover - keras ships with TensorFlow
    raise ImportError("tensorspark.keras.layers needs Keras 3 (pip install tensorflow)") from _e

_COMBINERS = (None, "sum", "mean")
_EVICTIONS = (None, "none", "lru", "lfu")
_INITIALIZERS = ("uniform", "zeros", "normal")
# A fixed vocabulary up to this many values is held by the layer on the
# driver as soon as it is built (as keras.layers.Embedding does); a larger
# one only once trained rows are exported into it (materialize=True).
_AUTO_MATERIALIZE = 1 << 24


def row_optimizer(optimizer: Any, where: str) -> dict[str, Any]:
    """The per-row optimizer of a table as plain fields (``tensorspark.tables.RowOptimizer``).

    Takes a Keras optimizer (``SGD`` without momentum, ``Adagrad``, ``Adam``,
    ``Ftrl``), a name (``"sgd"``, ``"adagrad"``, ``"adam"``, ``"ftrl"``, with
    Keras' default hyperparameters), or a dict of the fields.
    """
    if optimizer is None:
        optimizer = "adagrad"
    if isinstance(optimizer, dict):
        out = dict(optimizer)
        if "kind" not in out:
            raise TensorSparkValueError(f"{where}: an optimizer dict needs 'kind'")
        return out
    if isinstance(optimizer, str):
        name = optimizer.lower()
        defaults = {
            "sgd": keras.optimizers.SGD,
            "adagrad": keras.optimizers.Adagrad,
            "adam": keras.optimizers.Adam,
            "ftrl": keras.optimizers.Ftrl,
        }
        if name not in defaults:
            raise TensorSparkValueError(
                f"{where}: unknown optimizer {optimizer!r}; use 'sgd', 'adagrad', 'adam' or "
                "'ftrl', or a keras.optimizers instance of one of them"
            )
        optimizer = defaults[name]()
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TensorSparkValueError(
            f"{where}: optimizer must be a Keras optimizer, a name or a dict, got "
            f"{type(optimizer).__name__}"
        )
    cfg = optimizer.get_config()
    lr = cfg.get("learning_rate")
    if not isinstance(lr, (int, float)):
        raise TensorSparkValueError(
            f"{where}: the table's optimizer needs a constant learning rate (the server applies "
            "it per row); got a schedule"
        )
    for unsupported in ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay"):
        if cfg.get(unsupported):
            raise TensorSparkValueError(
                f"{where}: the server's row optimizers do not support {unsupported}="
                f"{cfg[unsupported]}"
            )
    name = type(optimizer).__name__
    if isinstance(optimizer, keras.optimizers.SGD):
        if cfg.get("momentum"):
            raise TensorSparkValueError(f"{where}: SGD with momentum is not a row optimizer")
        return {"kind": "sgd", "learning_rate": float(lr)}
    if isinstance(optimizer, keras.optimizers.Adagrad):
        return {
            "kind": "adagrad",
            "learning_rate": float(lr),
            "initial_accumulator": float(cfg["initial_accumulator_value"]),
            "epsilon": float(cfg["epsilon"]),
        }
    if isinstance(optimizer, keras.optimizers.Adam) and not isinstance(
        optimizer, keras.optimizers.AdamW
    ):
        if cfg.get("amsgrad"):
            raise TensorSparkValueError(f"{where}: Adam(amsgrad=True) is not a row optimizer")
        return {
            "kind": "adam",
            "learning_rate": float(lr),
            "beta1": float(cfg["beta_1"]),
            "beta2": float(cfg["beta_2"]),
            "epsilon": float(cfg["epsilon"]),
        }
    if isinstance(optimizer, keras.optimizers.Ftrl):
        if cfg.get("l2_shrinkage_regularization_strength"):
            raise TensorSparkValueError(f"{where}: Ftrl's l2 shrinkage is not supported")
        return {
            "kind": "ftrl",
            "learning_rate": float(lr),
            "lr_power": float(cfg["learning_rate_power"]),
            "initial_accumulator": float(cfg["initial_accumulator_value"]),
            "l1": float(cfg["l1_regularization_strength"]),
            "l2": float(cfg["l2_regularization_strength"]),
            "beta": float(cfg["beta"]),
        }
    raise TensorSparkValueError(
        f"{where}: the server has no row optimizer like {name}; use SGD, Adagrad, Adam or Ftrl"
    )


@keras.saving.register_keras_serializable(package="tensorspark")
class ParameterServerEmbedding(keras.layers.Layer):
    """An embedding table on the parameter server, trained row by row.

    Parameters
    ----------
    input_dim : int or None
        The vocabulary size: ids in ``[0, input_dim)`` (a fixed vocabulary).
        None: a dynamic table, where any int64 id (or a hashed string) gets
        a row on the server when it is first trained.
    output_dim : int
        Width of each row.
    optimizer : keras optimizer, str or dict
        The per-row optimizer the server applies to the rows' gradients:
        ``keras.optimizers.SGD``, ``Adagrad`` (the default), ``Adam`` (lazy:
        only rows in a batch change) or ``Ftrl``. Independent of the model's
        own optimizer, which trains the dense weights.
    combiner : {None, "sum", "mean"}
        None: the output has one row per id, like ``keras.layers.Embedding``
        (``(batch, n) -> (batch, n, output_dim)``). "sum" or "mean": the ids
        of a row (a multi-hot input, e.g. an ``array<long>`` column) are
        reduced to one vector, ``(batch, n) -> (batch, output_dim)``; id -1
        is padding and is left out.
    embeddings_initializer : {"uniform", "zeros", "normal"}
        The initial value of a row that was never trained, a deterministic
        function of (table, id, seed) computed by the server
        (docs/sparse.md): uniform in ``[-init_scale, init_scale)`` (Keras'
        Embedding default with 0.05), zeros, or a normal with standard
        deviation ``init_scale`` truncated at two deviations.
    init_scale : float
        See ``embeddings_initializer``.
    seed : int
        Seeds the initial values.
    capacity : int
        Most rows the server stores (0: no limit). At capacity, ``eviction``
        decides; with no eviction a batch that needs a new row fails,
        naming the table.
    eviction : {None, "lru", "lfu"}
        Which stored row makes room: least recently or least often used
        (sampled, as in Redis). An evicted row reads as its initial value.
    admit_after : int
        An id gets a stored row only after batches have named it this many
        times; until then it reads as its initial value and its gradients
        are dropped (0 or 1: at once).
    ttl_s : int
        Rows untrained and unread for this many seconds are dropped (0:
        never).
    table : str, optional
        The server's table name; default the layer's name. Two models
        training the same table share it.
    materialize : bool, optional
        Whether the layer holds the whole fixed vocabulary on the driver
        from the start (initialized exactly as the server's rows are), so
        that it can be used or trained in plain Keras at once. Default: for
        fixed vocabularies of up to 16M values. A dynamic table, or a
        larger one, holds only the rows exported after training.
    stored_rows : int
        Rows held by a dynamic (or not materialized) layer: set when
        trained rows are exported into the model; 0 before.

    Notes
    -----
    In plain Keras, a fixed vocabulary behaves as ``keras.layers.Embedding``
    (ids out of range fail). A dynamic table looks ids up among its
    exported rows; an id it does not hold reads as zeros (the documented
    fallback for ids never trained, whose server-side value is a small
    random initial row). The inputs of the layer must be model inputs (int
    ids, ``array<long>`` for multi-hot, or strings, hashed on the way in).
    """

    def __init__(
        self,
        input_dim: int | None,
        output_dim: int,
        optimizer: Any = "adagrad",
        combiner: str | None = None,
        embeddings_initializer: str = "uniform",
        init_scale: float = 0.05,
        seed: int = 0,
        capacity: int = 0,
        eviction: str | None = None,
        admit_after: int = 0,
        ttl_s: int = 0,
        table: str | None = None,
        materialize: bool | None = None,
        stored_rows: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        where = f"ParameterServerEmbedding {self.name!r}"
        if input_dim is not None and (
            isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1
        ):
            raise TensorSparkValueError(
                f"{where}: input_dim must be a positive int (a fixed vocabulary) or None (a "
                f"dynamic table), got {input_dim!r}"
            )
        if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1:
            raise TensorSparkValueError(
                f"{where}: output_dim must be a positive int, got {output_dim!r}"
            )
        if combiner not in _COMBINERS:
            raise TensorSparkValueError(
                f"{where}: combiner must be None, 'sum' or 'mean', got {combiner!r}"
            )
        if eviction not in _EVICTIONS:
            raise TensorSparkValueError(
                f"{where}: eviction must be None, 'lru' or 'lfu', got {eviction!r}"
            )
        if embeddings_initializer not in _INITIALIZERS:
            raise TensorSparkValueError(
                f"{where}: embeddings_initializer must be one of {_INITIALIZERS}, got "
                f"{embeddings_initializer!r}"
            )
        self.input_dim, self.output_dim = input_dim, output_dim
        self.optimizer_config = row_optimizer(optimizer, where)
        self.combiner = combiner
        self.embeddings_initializer = embeddings_initializer
        self.init_scale, self.seed = float(init_scale), int(seed)
        self.capacity, self.eviction = int(capacity), eviction or "none"
        self.admit_after, self.ttl_s = int(admit_after), int(ttl_s)
        self.table = table or self.name
        if materialize is None:
            materialize = input_dim is not None and input_dim * output_dim <= _AUTO_MATERIALIZE
        if materialize and input_dim is None:
            materialize = False
        self.materialize = bool(materialize)
        self.stored_rows = int(stored_rows)
        # Set by a tensorspark task while it traces its step: the batch's
        # pulled rows, indexed by the local ids fed in place of the ids.
        self._ps_rows: Any = None
        self.embeddings = None
        self.ids = None

    # -- the table on the server -------------------------------------------

    def table_spec(self) -> Any:
        """The server-side table (``tensorspark.tables.TableSpec``)."""
        from .. import tables

        return tables.TableSpec(
            name=self.table,
            dim=self.output_dim,
            vocab=self.input_dim or 0,
            seed=self.seed,
            initializer=self.embeddings_initializer,
            init_scale=self.init_scale,
            optimizer=tables.RowOptimizer(**self.optimizer_config),
            capacity=self.capacity,
            eviction=self.eviction,
            admit_after=self.admit_after,
            ttl_s=self.ttl_s,
        )

    def initial_rows(self, ids: np.ndarray) -> np.ndarray:
        """The server's initial value of rows ``ids`` (float32, ``(n, output_dim)``)."""
        from .. import tables

        return tables.initial_rows(
            self.table,
            np.asarray(ids, np.int64),
            self.output_dim,
            seed=self.seed,
            initializer=self.embeddings_initializer,
            scale=self.init_scale,
        )

    # -- Keras --------------------------------------------------------------

    def build(self, input_shape: Any) -> None:
        dim = self.output_dim
        if self.materialize:
            vocab = self.input_dim

            def init(shape: Any, dtype: Any = None) -> Any:
                return self.initial_rows(np.arange(vocab, dtype=np.int64)).reshape(shape)

            self.embeddings = self.add_weight(
                shape=(vocab, dim), initializer=init, name="embeddings", trainable=True
            )
        elif self.stored_rows:
            n = self.stored_rows
            self.embeddings = self.add_weight(
                shape=(n, dim), initializer="zeros", name="embeddings", trainable=True
            )
            if self.input_dim is None or n != self.input_dim:
                self.ids = self.add_weight(
                    shape=(n,), initializer="zeros", dtype="int64", name="ids", trainable=False
                )
        self.built = True

    def call(self, inputs: Any) -> Any:
        import tensorflow as tf

        rows = self._ps_rows
        if rows is not None:  # in a task: local indices into the pulled rows
            table, index, valid = rows, tf.cast(inputs, tf.int64), None
            if self.combiner is not None:
                valid = tf.greater_equal(index, 0)
        else:
            ids = tf.cast(inputs, tf.int64)
            valid = tf.greater_equal(ids, 0) if self.combiner is not None else None
            if self.embeddings is None:
                table = tf.zeros((1, self.output_dim), self.compute_dtype)
                index = tf.zeros_like(ids)
            elif self.ids is None:  # the whole fixed vocabulary
                table, index = self.embeddings, ids
            else:
                # Sorted ids: look up, unseen ids read the zero row appended.
                flat = tf.reshape(ids, [-1])
                pos = tf.searchsorted(self.ids, flat, side="left")
                pos = tf.minimum(pos, tf.shape(self.ids, out_type=pos.dtype)[0] - 1)
                hit = tf.equal(tf.gather(self.ids, pos), flat)  # not ==: TF1 mode changes it
                unseen = tf.cast(self.stored_rows, pos.dtype)
                index = tf.reshape(tf.where(hit, pos, unseen), tf.shape(ids))
                zero = tf.zeros((1, self.output_dim), self.embeddings.dtype)
                table = tf.concat([self.embeddings, zero], 0)
        if valid is not None:
            index = tf.where(valid, index, tf.zeros_like(index))
        out = tf.gather(table, index)
        if self.combiner is None:
            return out
        if valid is None:
            valid = tf.ones_like(index, tf.bool)
        mask = tf.cast(valid, out.dtype)[..., None]
        total = tf.reduce_sum(out * mask, axis=-2)
        if self.combiner == "sum":
            return total
        count = tf.maximum(tf.reduce_sum(mask, axis=-2), 1.0)
        return total / count

    def compute_output_shape(self, input_shape: Any) -> tuple:
        shape = tuple(input_shape)
        if self.combiner is None:
            return (*shape, self.output_dim)
        return (*shape[:-1], self.output_dim)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "optimizer": self.optimizer_config,
            "combiner": self.combiner,
            "embeddings_initializer": self.embeddings_initializer,
            "init_scale": self.init_scale,
            "seed": self.seed,
            "capacity": self.capacity,
            "eviction": None if self.eviction == "none" else self.eviction,
            "admit_after": self.admit_after,
            "ttl_s": self.ttl_s,
            "table": self.table,
            "materialize": self.materialize,
            "stored_rows": self.stored_rows,
        }


def tables_of(model: Any) -> list[ParameterServerEmbedding]:
    """The model's ParameterServerEmbedding layers, in layer order (nested models too)."""
    out: list[ParameterServerEmbedding] = []

    def walk(layer: Any) -> None:
        if isinstance(layer, ParameterServerEmbedding):
            out.append(layer)
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)

    for layer in model.layers:
        walk(layer)
    names = [t.table for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TensorSparkValueError(
            f"the model has several ParameterServerEmbedding layers on table {sorted(dup)[0]!r}; "
            "call one layer on several inputs to share a table, or give each layer its own "
            "table= name"
        )
    return out


def clone_with(model: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """A copy of ``model`` whose tables get ``overrides[table]`` config, other weights copied.

    The copy is compiled like ``model`` (when it was compiled).
    """

    def clone(layer: Any) -> Any:
        cfg = layer.get_config()
        if isinstance(layer, ParameterServerEmbedding):
            cfg.update(overrides.get(layer.table, {}))
        return layer.__class__.from_config(cfg)

    copy = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(_leaf_layers(model), _leaf_layers(copy), strict=True):
        if not isinstance(old, ParameterServerEmbedding) and old.weights:
            new.set_weights(old.get_weights())
    if getattr(model, "compiled", False) and model.optimizer is not None:
        optimizer = model.optimizer.__class__.from_config(model.optimizer.get_config())
        cfg = model.get_compile_config() or {}
        copy.compile(
            optimizer=optimizer,
            loss=model.loss,
            metrics=cfg.get("metrics"),
            loss_weights=cfg.get("loss_weights"),
            weighted_metrics=cfg.get("weighted_metrics"),
            jit_compile=False,
        )
    return copy


def _leaf_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and not isinstance(layer, ParameterServerEmbedding):
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out
