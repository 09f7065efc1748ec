"""TF1 graph helpers shared by the driver and the tasks.

The driver validates names against the session's graph and serializes it as
a MetaGraphDef; each task rebuilds it in its own graph and session. TensorFlow
is imported inside functions only, so importing tensorspark never imports TF
(tasks must import it after PySpark forks its workers).
"""

from __future__ import annotations

from typing import Any

from ..errors import TensorSparkValueError


def _tf():
    import tensorflow.compat.v1 as tf

    return tf


def fetch_names(graph: Any, fetches: Any) -> tuple[list[str], bool]:
    """Names of ``fetches`` (op, tensor, name or a list of them) in ``graph``.

    Returns the names and whether ``fetches`` was a single element.
    """
    single = not isinstance(fetches, (list, tuple))
    items = [fetches] if single else list(fetches)
    if not items:
        raise TensorSparkValueError("run: fetches is empty; pass the train op, e.g. train_step")
    names = []
    for i, item in enumerate(items):
        name = item if isinstance(item, str) else getattr(item, "name", None)
        if not isinstance(name, str):
            raise TensorSparkValueError(
                f"run: fetches[{i}] is a {type(item).__name__}; pass a tf.Operation, a tf.Tensor "
                "or its name"
            )
        try:
            graph.as_graph_element(name)
        except (KeyError, ValueError, TypeError) as e:
            raise TensorSparkValueError(
                f"run: fetch {name!r} is not an operation or tensor of the session's graph ({e})"
            ) from None
        names.append(name)
    return names, single


def check_feed_names(graph: Any, feed_names: list[str], what: str = "feed_name_list") -> None:
    """Raise unless every name is a tensor of ``graph`` that can be fed."""
    for i, name in enumerate(feed_names):
        if not isinstance(name, str):
            name = getattr(name, "name", name)
        try:
            tensor = graph.get_tensor_by_name(name)
        except (KeyError, ValueError, TypeError) as e:
            hint = ""
            if isinstance(name, str) and ":" not in name:
                hint = f" (tensor names end in an output index: did you mean '{name}:0'?)"
            raise TensorSparkValueError(
                f"{what}[{i}] = {name!r} is not a tensor of the session's graph{hint}; "
                f"use the .name of a placeholder, e.g. x.name ({e})"
            ) from None
        if not graph.is_feedable(tensor):
            raise TensorSparkValueError(f"{what}[{i}] = {name!r} is a tensor that cannot be fed")


def resolve_params(graph: Any, param_list: Any) -> list[Any]:
    """The tf.Variable objects of ``graph`` named by ``param_list``.

    ``None`` means every trainable variable. Entries may be variables or their
    names (``"W"`` or ``"W:0"``).
    """
    tf = _tf()
    with graph.as_default():
        global_vars = tf.global_variables()
        if param_list is None:
            params = tf.trainable_variables()
            if not params:
                raise TensorSparkValueError(
                    "run: the graph has no trainable variables; pass param_list=[...]"
                )
            return params
    by_name = {}
    for v in global_vars:
        by_name[v.op.name] = v
        by_name[v.name] = v
    if not isinstance(param_list, (list, tuple)) or not param_list:
        raise TensorSparkValueError(
            "run: param_list must be a non-empty list of tf.Variable objects, e.g. [W, b]"
        )
    params, seen = [], set()
    for i, p in enumerate(param_list):
        key = p if isinstance(p, str) else getattr(p, "name", None)
        var = by_name.get(key) if isinstance(key, str) else None
        if var is None or (not isinstance(p, str) and getattr(p, "graph", graph) is not graph):
            kind = type(p).__name__
            shown = key if isinstance(key, str) else repr(p)[:60]
            raise TensorSparkValueError(
                f"param_list[{i}] = {shown!r} ({kind}) is not a variable of the session's graph; "
                "param_list takes the tf.Variable objects to synchronize, e.g. [W, b]"
            )
        if var.op.name in seen:
            raise TensorSparkValueError(
                f"param_list[{i}]: variable {var.op.name!r} is listed twice"
            )
        seen.add(var.op.name)
        params.append(var)
    return params


def loss_name(graph: Any, loss: Any, fetch_names: list[str]) -> str | None:
    """The scalar tensor reported as the loss: ``loss``, else the first scalar float fetch."""
    if loss is not None:
        name = loss if isinstance(loss, str) else getattr(loss, "name", None)
        try:
            tensor = graph.get_tensor_by_name(name)
        except (KeyError, ValueError, TypeError) as e:
            raise TensorSparkValueError(
                f"run: loss {name!r} is not a tensor of the session's graph ({e})"
            ) from None
        if not tensor.dtype.is_floating:
            raise TensorSparkValueError(f"run: loss {name!r} must be a floating-point tensor")
        return tensor.name
    for name in fetch_names:
        element = graph.as_graph_element(name)
        shape = getattr(element, "shape", None)
        if shape is not None and shape.rank == 0 and element.dtype.is_floating:
            return element.name
    return _minimized_loss(graph, fetch_names)


def _minimized_loss(graph: Any, fetch_names: list[str], limit: int = 20000) -> str | None:
    """The scalar loss that a fetched train op minimizes, or None.

    ``tf.gradients(loss)`` (and so ``optimizer.minimize``) seeds the
    backward pass with ``<scope>/grad_ys_0``, and the first gradient op that
    reads it is named after the loss's op: ``<scope>/<loss op>_grad/...``.
    The search walks the fetches' inputs (at most ``limit`` ops) for it.
    """
    todo = [graph.as_graph_element(n) for n in fetch_names]
    todo = [getattr(t, "op", t) for t in todo]
    seen: set[str] = set()
    while todo and len(seen) < limit:
        op = todo.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        scope, _, last = op.name.rpartition("/")
        if op.type == "Fill" and last == "grad_ys_0":
            for consumer in op.outputs[0].consumers():
                forward = consumer.name[len(scope) + 1 :].rpartition("_grad/")[0]
                try:
                    loss = graph.get_operation_by_name(forward).outputs[0]
                except (KeyError, ValueError, IndexError):
                    continue
                if loss.shape.rank == 0 and loss.dtype.is_floating:
                    return loss.name
        todo.extend(t.op for t in op.inputs)
        todo.extend(op.control_inputs)
    return None


def param_name(var: Any) -> str:
    """The name a variable has on the parameter server."""
    return var.op.name


def export_graph(graph: Any) -> bytes:
    """Serialize ``graph`` (with its variable collections) as a MetaGraphDef."""
    tf = _tf()
    meta = tf.train.export_meta_graph(graph=graph, clear_devices=True)
    # Deterministic: the bytes key the tasks' cached graph.
    return meta.SerializeToString(deterministic=True)


def load_values(sess: Any, variables: list[Any], values: list[Any]) -> None:
    """Assign ``values`` to ``variables`` in one session call.

    Feeds each variable's initial-value tensor and runs its initializer, so no
    op is added to the graph (safe to call any number of times).
    """
    ops = [v.initializer for v in variables]
    feed = {v.initializer.inputs[1]: val for v, val in zip(variables, values, strict=True)}
    sess.run(ops, feed_dict=feed)


# Ops an id tensor may pass through between its placeholder and a lookup.
_PASS_THROUGH = {"Identity", "Reshape", "Cast", "ExpandDims", "Squeeze"}


def lookup_feed(graph: Any, var: Any, feed_names: list[str]) -> int:
    """The position in ``feed_names`` of the ids that ``tf.nn.embedding_lookup(var, ids)`` reads.

    Finds the gather ops that read ``var`` and follows their indices back
    (through identity, reshape and cast ops) to a fed placeholder; every
    lookup of ``var`` must use the same one.
    """
    sources = {var.op.name, f"{var.op.name}/read"}
    found: set[int] = set()
    gathers = 0
    for op in graph.get_operations():
        if op.type not in ("ResourceGather", "GatherV2", "Gather"):
            continue
        params = op.inputs[0].op
        while params.type in ("Identity", "ReadVariableOp") and params.name not in sources:
            params = params.inputs[0].op
        if params.name not in sources:
            continue
        gathers += 1
        ids = op.inputs[1]
        while ids.name not in feed_names and ids.op.type in _PASS_THROUGH:
            ids = ids.op.inputs[0]
        if ids.name not in feed_names:
            raise TensorSparkValueError(
                f"sparse_params: {var.op.name!r} is looked up with ids computed by "
                f"{ids.op.type} op {ids.op.name!r}; the ids of tf.nn.embedding_lookup must be a "
                "placeholder in feed_name_list (reshapes and casts are fine)"
            )
        found.add(feed_names.index(ids.name))
    if not gathers:
        raise TensorSparkValueError(
            f"sparse_params: the graph never looks up rows of {var.op.name!r}; use "
            "tf.nn.embedding_lookup(W, ids) with ids fed from feed_name_list"
        )
    if len(found) > 1:
        raise TensorSparkValueError(
            f"sparse_params: {var.op.name!r} is looked up with several fed id tensors "
            f"{sorted(feed_names[i] for i in found)}; feed one id tensor per table"
        )
    return found.pop()
