"""Python face of the C++ parameter server and client.

:class:`ParameterServer` runs the server on threads of the current process
(the driver, by default); :class:`PSClient` is one authenticated connection to
a server, in-process or a separate ``tensorspark-ps``. Both are thin: all
state, I/O and arithmetic live in the C++ core, and every call that waits on
the network releases the GIL.

Example
-------
>>> import numpy as np
>>> from tensorspark.ps import ParameterServer, PSClient, generate_secret
>>> secret = generate_secret()
>>> with ParameterServer(secret=secret, host="127.0.0.1") as server:
...     with PSClient("127.0.0.1", server.port, secret) as client:
...         client.register({"w": np.zeros(3, np.float32)})
...         client.push({"w": np.ones(3, np.float32)}, kind="delta")
...         client.pull()["w"].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

import numpy as np

from . import _core
from .errors import ShapeMismatchError, TensorSparkValueError, VariableNotFoundError
from .tables import RowOptimizer, TableSpec, as_ids, validate_table

_KINDS = {
    "parameters": _core.KIND_PARAMETERS,
    "delta": _core.KIND_DELTA,
    "gradient": _core.KIND_GRADIENT,
}

# Consistency modes of CONFIGURE (docs/consistency.md).
_MODES = {
    "async": _core.MODE_ASYNC,
    "sync": _core.MODE_SYNC,
    "ssp": _core.MODE_BOUNDED_STALENESS,
}

# Server-side optimizers: name -> (kind, hyperparameters with their Keras
# defaults). Hyperparameters use the Keras argument names.
_OPTIMIZERS: dict[str, tuple[int, dict[str, float]]] = {
    "sgd": (_core.OPTIMIZER_SGD, {}),
    "momentum": (_core.OPTIMIZER_MOMENTUM, {"momentum": 0.9}),
    "nesterov": (_core.OPTIMIZER_NESTEROV, {"momentum": 0.9}),
    "adagrad": (_core.OPTIMIZER_ADAGRAD, {"initial_accumulator_value": 0.1, "epsilon": 1e-7}),
    "adam": (_core.OPTIMIZER_ADAM, {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}),
    "adamw": (
        _core.OPTIMIZER_ADAMW,
        {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "weight_decay": 0.004},
    ),
    "rmsprop": (_core.OPTIMIZER_RMSPROP, {"rho": 0.9, "epsilon": 1e-7}),
}
# Other accepted spellings (the fields of the C++ OptimizerConfig).
_HYPERPARAMETER_ALIASES = {
    "beta1": "beta_1",
    "beta2": "beta_2",
    "initial_accumulator": "initial_accumulator_value",
}
# Keras name -> argument of _core.Client.set_optimizer.
_CORE_ARGUMENT = {
    "momentum": "beta1",
    "beta_1": "beta1",
    "beta_2": "beta2",
    "rho": "beta2",
    "epsilon": "epsilon",
    "weight_decay": "weight_decay",
    "initial_accumulator_value": "initial_accumulator",
}


def generate_secret() -> bytes:
    """Return a fresh random 32-byte secret for one training run."""
    return secrets.token_bytes(32)


def _as_float32(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.float32:
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise TensorSparkValueError(
                f"tensor {name!r} has dtype {arr.dtype}; the parameter server holds float32 "
                "numbers only"
            )
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def _as_number(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TensorSparkValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _out_buffers(out: Mapping[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """Names and buffers of a pull_into call, checked to be filled in place."""
    names, arrays = list(out), list(out.values())
    for n, a in zip(names, arrays, strict=True):
        if not (
            isinstance(a, np.ndarray)
            and a.dtype == np.float32
            and a.flags.c_contiguous
            and a.flags.writeable
        ):
            raise TensorSparkValueError(
                f"pull_into: buffer for {n!r} must be a writable C-contiguous float32 numpy array"
            )
    return names, arrays


def _push(client, values: Mapping[str, np.ndarray], kind: str, lr: float, window: int) -> int:
    if kind not in _KINDS:
        raise TensorSparkValueError(f"push: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    names = list(values)
    arrays = [_as_float32(n, values[n]) for n in names]
    return client.push(_KINDS[kind], names, arrays, learning_rate=lr, mean_window=window)


_ROW_KINDS = {"delta": _core.KIND_DELTA, "gradient": _core.KIND_GRADIENT}
_ROW_OPTIMIZER_NAMES = {1: "sgd", 2: "adagrad", 3: "adam", 4: "ftrl"}
_INITIALIZER_NAMES = {0: "zeros", 1: "uniform", 2: "normal"}
_EVICTION_NAMES = {0: "none", 1: "lru", 2: "lfu"}


def _f32(x: float) -> float:
    """The shortest decimal that reads back as float32 ``x`` (0.05, not 0.0500000007)."""
    return float(str(np.float32(x)))


def _spec_of(d: dict[str, Any]) -> TableSpec:
    """A TableSpec from a core table dict (list_tables)."""
    opt = RowOptimizer(
        kind=_ROW_OPTIMIZER_NAMES.get(d["optimizer"], str(d["optimizer"])),
        **{
            k: _f32(d[k])
            for k in (
                "learning_rate",
                "beta1",
                "beta2",
                "epsilon",
                "initial_accumulator",
                "l1",
                "l2",
                "lr_power",
                "beta",
            )
        },
    )
    return TableSpec(
        name=d["name"],
        dim=d["dim"],
        vocab=d["vocab"],
        seed=d["seed"],
        initializer=_INITIALIZER_NAMES.get(d["initializer"], str(d["initializer"])),
        init_scale=_f32(d["init_scale"]),
        optimizer=opt,
        capacity=d["capacity"],
        eviction=_EVICTION_NAMES.get(d["eviction"], str(d["eviction"])),
        admit_after=d["admit_after"],
        ttl_s=d["ttl_s"],
    )


def _row_buffer(table: str, n: int, out: Any) -> np.ndarray:
    """``out`` checked to receive ``n`` rows in place (float32, C-contiguous)."""
    if not (
        isinstance(out, np.ndarray)
        and out.dtype == np.float32
        and out.flags.c_contiguous
        and out.flags.writeable
    ):
        raise TensorSparkValueError(
            f"table {table!r}: the output buffer must be a writable C-contiguous float32 "
            "numpy array"
        )
    if out.ndim != 2 or out.shape[0] != n:
        raise ShapeMismatchError(
            f"table {table!r}: the output buffer for {n} ids must have shape [{n}, dim], "
            f"got {list(out.shape)}"
        )
    return out


def _row_values(table: str, n: int, values: Any) -> np.ndarray:
    """``values`` as float32 [n, dim], C-contiguous."""
    arr = np.asarray(values)
    if arr.dtype != np.float32:
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
            raise TensorSparkValueError(
                f"table {table!r}: values must be numbers, got dtype {arr.dtype}"
            )
        arr = arr.astype(np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ShapeMismatchError(
            f"table {table!r}: values for {n} ids must have shape [{n}, dim], got {list(arr.shape)}"
        )
    return np.ascontiguousarray(arr)


def _heartbeat_interval(who: str, value) -> float:
    """A ``heartbeat_interval`` checked to be finite and >= 0 seconds."""
    interval = _as_number(f"{who}: heartbeat_interval", value)
    if not (interval >= 0.0 and np.isfinite(interval)):
        raise TensorSparkValueError(
            f"{who}: heartbeat_interval must be >= 0 seconds, got {value!r}"
        )
    return interval


def _snapshot_tag(what: str, tag) -> int:
    """A snapshot ``tag`` checked to be an int in [1, 2**64)."""
    if isinstance(tag, bool) or not isinstance(tag, int | np.integer):
        raise TensorSparkValueError(f"{what}: tag must be an int, got {tag!r}")
    if not 1 <= tag < 2**64:
        raise TensorSparkValueError(
            f"{what}: tag must be in [1, 2**64) (0 marks untagged snapshots), got {tag}"
        )
    return int(tag)


def _path_or_empty(what: str, path: str | os.PathLike | None) -> str:
    if path is None:
        return ""
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise TensorSparkValueError(
            f"ParameterServer: {what} must be a non-empty path or None, got {path!r}"
        )
    return os.fsdecode(path)


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` (or a ``(host, port)`` pair) as ``(host, port)``."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port = str(address).rpartition(":")
        if not sep or not host:
            raise TensorSparkValueError(f"server address {address!r} is not of the form host:port")
    try:
        port = int(port)
    except ValueError:
        raise TensorSparkValueError(f"server address {address!r}: port is not a number") from None
    if not 0 < port < 65536:
        raise TensorSparkValueError(f"server address {address!r}: port must be 1..65535")
    return host.strip("[]"), port


# ShardedPSClient.stats(): keys that describe the run's members, the same on
# every server (first server's value), and the one taken as the maximum.
_PER_MEMBER_KEYS = frozenset(
    {"members", "workers_lost", "workers_retried", "workers_fenced", "mode"}
)
_MAX_OVER_SERVERS = frozenset({"sync_round"})


def _per_member(key: str) -> bool:
    return key in _PER_MEMBER_KEYS or key.startswith("worker_")


def _tls_pins(who: str, tls_fingerprint: str | Iterable[str] | None) -> list[str]:
    """The fingerprints a client pins; [] for a plain connection (the core checks each)."""
    if tls_fingerprint is None:
        return []
    pins = [tls_fingerprint] if isinstance(tls_fingerprint, str) else list(tls_fingerprint)
    if not pins or not all(isinstance(p, str) for p in pins):
        raise TensorSparkValueError(
            f"{who}: tls_fingerprint must be None (plain), a fingerprint str or a list of them "
            f"(as ParameterServer.tls_fingerprint or tensorspark-ps --tls prints it), got "
            f"{tls_fingerprint!r}"
        )
    return pins


def make_tls_identity() -> tuple[str, str, str]:
    """A new TLS key and self-signed certificate: ``(cert_pem, key_pem, fingerprint)``.

    ECDSA P-256, valid for 30 days; ``fingerprint`` is ``"sha256:"`` and the
    hex SHA-256 of the certificate, what clients pin. Pass the pair to
    ``ParameterServer(tls=(cert_pem, key_pem))`` or write it to files for
    ``tensorspark-ps --tls-cert/--tls-key``.
    """
    return _core.make_tls_identity()


# Wire encodings of PSClient(encoding=...) -> the core's WireEncoding.
_ENCODINGS = {"fp32": 0, "fp16": 1, "bf16": 2}
_CHECKSUMS = {"auto": 0, "on": 1, "off": 2}


class ParameterServer:
    """A parameter server on threads of this process.

    Parameters
    ----------
    secret : bytes
        Per-run shared secret (at least 16 bytes); clients must prove it.
    host : str
        Address to bind: ``"0.0.0.0"`` for every interface (default) or
        ``"127.0.0.1"`` for this machine only.
    port : int
        Port to listen on; 0 picks a free one (see :attr:`port`).
    max_frame_bytes : int
        Largest request payload accepted.
    max_connections : int
        Most authenticated connections; more are refused
        (``PSConnectionError`` in the client) after their handshake.
    max_pending_handshakes, max_pending_per_peer : int
        Most connections still in their handshake, in all and from one IP
        address. Over either cap a new connection evicts a pending one (one
        that sent nothing yet first, the oldest first), so strangers holding
        idle sockets can neither use up ``max_connections`` nor lock out a
        member that is connecting.
    handshake_timeout : float
        Seconds a connection has to authenticate.
    io_timeout : float
        Seconds a half-received frame may stall before the connection drops.
    update_threads : int
        Threads that apply one large push together, splitting tensors of 1M+
        elements into chunks; 0 (default) means one per CPU core, 1 applies
        every push on its connection's thread.
    unix_path : str or None
        If set, the server also listens on this Unix-domain socket path
        (mode 0600, at most 107 bytes); clients on the same host connect with
        ``PSClient("unix:" + unix_path, 0, secret)``, skipping the TCP stack.
        A stale socket file from a crashed server is replaced; the file is
        removed on :meth:`stop`.
    metrics_port : int, optional
        Serve the counters in the Prometheus text format at
        ``http://host:metrics_port/metrics``; 0 picks a free port (see
        :attr:`metrics_port`). None (default) serves no endpoint.
    snapshot_dir : str or os.PathLike, optional
        Directory for snapshots of the variables, their optimizer state and
        the model version (created if missing; docs/snapshots.md). With it,
        :meth:`snapshot` writes one, and :meth:`stop` writes a final one if
        the model changed since the last. None (default): no snapshots.
    snapshot_every_s : float
        Write a snapshot in the background when the model changed and this
        many seconds passed since the last one; 0 (default) is off. Needs
        ``snapshot_dir``.
    snapshot_every_versions : int
        Write a snapshot when this many more pushes were applied since the
        last one; 0 (default) is off. Needs ``snapshot_dir``.
    snapshot_keep : int
        Snapshot files kept in ``snapshot_dir``; older ones are deleted after
        a new one is written. 0 keeps all. Default 3.
    resume_from : str or os.PathLike, optional
        Start from a snapshot file, or from the newest valid snapshot in a
        directory (newer corrupt or truncated ones are skipped with a message
        on stderr naming the file and its fault). The server starts with its
        variables, optimizer state and version, and counts on from it.
    tls : bool or (str, str)
        Encrypt every connection (TCP and Unix) with TLS 1.3: True makes a
        new key and self-signed certificate (:func:`make_tls_identity`); a
        ``(cert_pem, key_pem)`` pair uses that one. Clients must pin
        :attr:`tls_fingerprint` (``PSClient(tls_fingerprint=...)``); plain
        clients are refused with :class:`AuthenticationError`. False
        (default): plain frames, checked by CRC-32C only.

    Attributes
    ----------
    tls_fingerprint : str or None
        ``"sha256:<hex>"`` of the server's certificate, or None without TLS.

    Raises
    ------
    AddressInUseError
        The port (or a live ``unix_path``) is taken.
    TensorSparkValueError
        A bad option, an unusable ``snapshot_dir``, or a ``resume_from`` with
        no valid snapshot (the message names each file and its fault;
        :class:`VariableNotFoundError`, a subclass, when the path or any
        snapshot file is missing).
    """

    def __init__(
        self,
        secret: bytes,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        max_frame_bytes: int = 1 << 31,
        max_variables: int = 1 << 16,
        max_connections: int = 1024,
        max_pending_handshakes: int = 128,
        max_pending_per_peer: int = 32,
        io_timeout: float = 120.0,
        handshake_timeout: float = 10.0,
        update_threads: int = 0,
        unix_path: str | None = None,
        metrics_port: int | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        snapshot_every_s: float = 0,
        snapshot_every_versions: int = 0,
        snapshot_keep: int = 3,
        resume_from: str | os.PathLike | None = None,
        tls: bool | tuple[str, str] = False,
    ) -> None:
        cert_pem = key_pem = ""
        self.tls_fingerprint: str | None = None
        if tls is True:
            cert_pem, key_pem, self.tls_fingerprint = make_tls_identity()
        elif isinstance(tls, tuple) and len(tls) == 2 and all(isinstance(t, str) for t in tls):
            cert_pem, key_pem = tls
            self.tls_fingerprint = _core.tls_fingerprint(cert_pem)
        elif tls is not False:
            raise TensorSparkValueError(
                "ParameterServer: tls must be False, True (a new self-signed identity) or a "
                f"(cert_pem, key_pem) pair of PEM strings, got {type(tls).__name__}"
            )
        if unix_path is not None and (not isinstance(unix_path, str) or not unix_path):
            raise TensorSparkValueError(
                f"ParameterServer: unix_path must be a non-empty str or None, got {unix_path!r}"
            )
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise TensorSparkValueError(
                "ParameterServer: secret must be bytes of length >= 16; use generate_secret()"
            )
        if not 0 <= int(port) <= 65535:
            raise TensorSparkValueError(f"ParameterServer: port must be 0..65535, got {port}")
        if metrics_port is not None and (
            isinstance(metrics_port, bool)
            or not isinstance(metrics_port, int)
            or not 0 <= metrics_port <= 65535
        ):
            raise TensorSparkValueError(
                "ParameterServer: metrics_port must be None (off) or 0..65535, "
                f"got {metrics_port!r}"
            )
        snapshot_every_s = _as_number("ParameterServer: snapshot_every_s", snapshot_every_s)
        for what, n, least in (
            ("snapshot_every_versions", snapshot_every_versions, 0),
            ("snapshot_keep", snapshot_keep, 0),
            ("max_connections", max_connections, 1),
            ("max_pending_handshakes", max_pending_handshakes, 1),
            ("max_pending_per_peer", max_pending_per_peer, 1),
        ):
            if isinstance(n, bool) or not isinstance(n, int) or n < least:
                raise TensorSparkValueError(
                    f"ParameterServer: {what} must be an int >= {least}, got {n!r}"
                )
        self.host = host
        self._server = _core.Server(
            host,
            int(port),
            secret,
            max_frame_bytes=max_frame_bytes,
            max_variables=max_variables,
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
            max_pending_per_peer=max_pending_per_peer,
            io_timeout_s=io_timeout,
            handshake_timeout_s=handshake_timeout,
            update_threads=int(update_threads),
            unix_path=unix_path or "",
            metrics_port=-1 if metrics_port is None else metrics_port,
            snapshot_dir=_path_or_empty("snapshot_dir", snapshot_dir),
            snapshot_every_s=snapshot_every_s,
            snapshot_every_versions=snapshot_every_versions,
            snapshot_keep=snapshot_keep,
            resume_from=_path_or_empty("resume_from", resume_from),
            tls_cert_pem=cert_pem,
            tls_key_pem=key_pem,
        )
        self.unix_path = unix_path

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._server.port

    @property
    def metrics_port(self) -> int | None:
        """Port of the Prometheus ``/metrics`` endpoint, or None when it is off."""
        port = self._server.metrics_port
        return None if port < 0 else port

    @property
    def version(self) -> int:
        """Model version: the number of pushes applied."""
        return self._server.version

    @property
    def running(self) -> bool:
        return self._server.running

    def stats(self) -> dict[str, int | float]:
        """The server's counters (pushes, pulls, bytes, connections, ...).

        Values are ints, except keys whose name (before any ``{...}`` labels)
        ends in ``_f64``, such as ``worker_loss_f64``: those are floats.
        """
        return dict(self._server.stats())

    def snapshot(self) -> str:
        """Write a snapshot into ``snapshot_dir`` now and return its path.

        Raises :class:`TensorSparkValueError` when the server has no
        ``snapshot_dir``, is stopped, or the write failed (the message names
        the file; the server keeps serving and counts it in
        ``stats()["snapshot_errors"]``).
        """
        return self._server.snapshot()

    def stop(self) -> None:
        """Stop serving; close every connection and join the server threads.

        With ``snapshot_dir`` set, a final snapshot is written first if the
        model changed since the last one.
        """
        self._server.stop()

    def wait_until_stopped(self, timeout: float) -> bool:
        """Wait until a client's shutdown call or :meth:`stop`; True if stopped."""
        return self._server.wait_until_stopped(timeout)

    def __enter__(self) -> ParameterServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _TensorClient:
    """Calls shared by :class:`PSClient` and :class:`ShardedPSClient`.

    Subclasses set ``self._client`` (a core client: ``_core.Client`` or
    ``_core.ShardedClient``, which take the same calls) and ``self._shapes``.
    On a :class:`ShardedPSClient` the membership calls (:meth:`join`,
    :meth:`leave`, :meth:`heartbeat`) and :meth:`configure` go to every
    server: a worker is a member of each, so each server fences stale
    attempts and runs its own sync rounds (docs/protocol.md, "Sharding").
    """

    _client: Any
    _shapes: dict[str, tuple[int, ...]]
    _table_dims: dict[str, int]

    def register(self, variables: Mapping[str, np.ndarray]) -> dict[str, bool]:
        """Register variables with initial values; the first registration wins.

        Returns ``{name: created}``; ``created`` is False where the server
        already held the variable (its values are kept).
        """
        names = list(variables)
        arrays = [_as_float32(n, variables[n]) for n in names]
        created, _ = self._client.register(names, arrays)
        for n, a in zip(names, arrays, strict=True):
            self._shapes[n] = tuple(a.shape)
        return dict(zip(names, created, strict=True))

    def pull_into(self, out: Mapping[str, np.ndarray]) -> int:
        """Fill caller-owned float32, C-contiguous arrays in place; returns the version."""
        return self._client.pull_into(*_out_buffers(out))

    def push(
        self,
        values: Mapping[str, np.ndarray],
        kind: str = "delta",
        *,
        learning_rate: float = 0.0,
        mean_window: int = 1,
    ) -> int:
        """Push values; returns the model version after the push.

        ``kind`` is ``"parameters"`` (Mean combiner with ``mean_window``),
        ``"delta"`` (added to the model) or ``"gradient"`` (a step of each
        variable's server-side optimizer, see :meth:`set_optimizer`, or plain
        SGD where none is set). For a gradient, ``learning_rate`` > 0
        overrides the optimizer's learning rate for this push; 0 uses it (a
        variable without an optimizer then refuses the push).
        """
        return _push(self._client, values, kind, learning_rate, mean_window)

    def push_arrays(self, kind: int, names: list[str], arrays: list[np.ndarray], **kw) -> int:
        """Push already float32, C-contiguous arrays without any checks or copies."""
        return self._client.push(kind, names, arrays, **kw)

    def set_optimizer(
        self,
        name: str = "adam",
        *,
        learning_rate: float,
        variables: Iterable[str] | None = None,
        **hyperparameters: float,
    ) -> int:
        """Choose the optimizer the server applies to gradient pushes.

        From now on a ``push(..., kind="gradient")`` to these variables is a
        step of this optimizer, computed on the server with its state (slots)
        kept beside each variable. Formulas (element-wise; ``g`` is the pushed
        gradient, ``lr`` the learning rate; slots start at 0)::

            sgd       w -= lr * g
            momentum  m = momentum * m + g;  w -= lr * m
            nesterov  m = momentum * m + g;  w -= lr * (g + momentum * m)
            adagrad   a += g**2;  w -= lr * g / (sqrt(a) + epsilon)
                      (a starts at initial_accumulator_value)
            adam      t += 1;  m = beta_1 * m + (1 - beta_1) * g
                      v = beta_2 * v + (1 - beta_2) * g**2
                      w -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)
            adamw     w -= lr * weight_decay * w, then the adam step
            rmsprop   v = rho * v + (1 - rho) * g**2;  w -= lr * g / sqrt(v + epsilon)

        These are the formulas of ``tf.raw_ops.Apply*`` and, for Adam, AdamW
        and RMSProp, of Keras 3. Calling this again with only another
        ``learning_rate`` (or ``epsilon``, ``weight_decay``) keeps the slots, so
        a learning-rate schedule is a series of calls; another optimizer or
        other betas/momentum/rho reset them.

        Parameters
        ----------
        name : str
            ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adagrad"``,
            ``"adam"`` (default), ``"adamw"`` or ``"rmsprop"``.
        learning_rate : float
            Step size, > 0. A push's own ``learning_rate`` > 0 overrides it
            for that push.
        variables : iterable of str, optional
            Variables to configure. None (default) means every variable on
            the server, including ones registered later. A
            :class:`ShardedPSClient` configures every chunk of each, on the
            servers that hold them (with None: every server).
        **hyperparameters : float
            Keras-named hyperparameters of the optimizer; missing ones take
            the Keras defaults: ``momentum=0.9`` (momentum, nesterov);
            ``beta_1=0.9``, ``beta_2=0.999``, ``epsilon=1e-7`` (adam, adamw);
            ``weight_decay=0.004`` (adamw); ``rho=0.9``, ``epsilon=1e-7``
            (rmsprop); ``initial_accumulator_value=0.1``, ``epsilon=1e-7``
            (adagrad). ``beta1``, ``beta2`` and ``initial_accumulator`` are
            accepted as other spellings.

        Returns
        -------
        int
            The model version (unchanged by this call).

        Raises
        ------
        TensorSparkValueError
            Unknown optimizer or hyperparameter, or a value out of range
            (``learning_rate`` <= 0, a beta outside [0, 1), a negative
            ``epsilon``...); nothing is changed.
        VariableNotFoundError
            A name in ``variables`` is not registered; nothing is changed.

        Examples
        --------
        >>> client.set_optimizer("adam", learning_rate=1e-3)  # doctest: +SKIP
        >>> client.push({"w": grad}, kind="gradient")  # doctest: +SKIP
        >>> client.set_optimizer("adam", learning_rate=1e-4)  # decay, slots kept  # doctest: +SKIP
        """
        key = name.lower() if isinstance(name, str) else name
        if key not in _OPTIMIZERS:
            raise TensorSparkValueError(
                f"set_optimizer: unknown optimizer {name!r}; choose one of {sorted(_OPTIMIZERS)}"
            )
        kind, defaults = _OPTIMIZERS[key]
        values = dict(defaults)
        for given, value in hyperparameters.items():
            hp = _HYPERPARAMETER_ALIASES.get(given, given)
            if hp not in defaults:
                accepted = ", ".join(sorted(defaults)) or "none"
                raise TensorSparkValueError(
                    f"set_optimizer: {key} takes no hyperparameter {given!r}; it takes: {accepted}"
                )
            values[hp] = _as_number(f"set_optimizer: {given}", value)
        if variables is None:
            names: list[str] = []
        elif isinstance(variables, str):
            raise TensorSparkValueError(
                "set_optimizer: variables must be a list of names, not one string; "
                f"use variables=[{variables!r}]"
            )
        else:
            names = list(variables)
            if not names:
                raise TensorSparkValueError(
                    "set_optimizer: variables is empty; pass None for every variable"
                )
        core_args = {_CORE_ARGUMENT[hp]: v for hp, v in values.items()}
        return self._client.set_optimizer(
            kind,
            _as_number("set_optimizer: learning_rate", learning_rate),
            names=names,
            **core_args,
        )

    def join(self) -> int:
        """Join the run as a worker; the sync and ssp modes wait for members.

        The client must have been created with a ``partition_id`` >= 0. A
        newer ``attempt`` of the same partition fences older ones. A
        :class:`ShardedPSClient` joins every server (and leaves them again
        if any join fails).

        Returns
        -------
        int
            The worker's starting clock (0 for a fresh run; in sync mode the
            round in progress). Sharded: the largest over the servers.

        Raises
        ------
        FencedError
            A newer attempt of this partition has joined (sharded: any
            server; the message names it).
        TensorSparkValueError
            The client is not a worker (``partition_id`` < 0).
        """
        return self._client.join()

    def leave(self) -> None:
        """Leave the run: the server no longer waits for this worker."""
        self._client.leave()

    def heartbeat(self) -> None:
        """Tell the server this worker is alive (any other call does too).

        Carries the latest :meth:`report_progress` values, if any.
        """
        self._client.heartbeat()

    def report_progress(self, steps: int, samples: int, loss: float) -> None:
        """Record this worker's progress for the server's stats.

        Stores the values without any I/O (cheap enough for every step; safe
        to call from another thread than the one using the client); the next
        heartbeat, from the ``heartbeat_interval`` thread or
        :meth:`heartbeat`, carries them. While the worker is a live member
        (after :meth:`join`), :meth:`stats` on any connection then shows
        ``worker_steps``, ``worker_samples``, ``worker_loss_f64`` (a float)
        and ``worker_progress_age_ms`` (milliseconds since ``steps`` last
        increased, or since the join) with the labels
        ``{partition="p",attempt="a"}``: enough for a progress bar on the
        driver and a watchdog that spots a worker that stopped making
        progress.

        Parameters
        ----------
        steps : int
            Training steps done so far (>= 0). Only an increase counts as
            progress.
        samples : int
            Samples processed so far (>= 0).
        loss : float
            The latest loss; ``float("nan")`` when unknown.

        Raises
        ------
        TensorSparkValueError
            ``steps`` or ``samples`` is not an int in [0, 2**64), or
            ``loss`` is not a number.

        Examples
        --------
        >>> client = PSClient(host, port, secret, partition_id=0,
        ...                   heartbeat_interval=5.0)  # doctest: +SKIP
        >>> client.join()  # doctest: +SKIP
        >>> client.report_progress(100, 3200, 0.41)  # doctest: +SKIP
        """
        counts = {"steps": steps, "samples": samples}
        for what, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TensorSparkValueError(
                    f"report_progress: {what} must be an int, got {value!r}"
                )
            if not 0 <= value < 2**64:
                raise TensorSparkValueError(f"report_progress: {what} must be >= 0, got {value}")
        self._client.report_progress(
            int(steps), int(samples), _as_number("report_progress: loss", loss)
        )

    def report(self, text: str) -> None:
        """Send a stack dump to the server as this worker's latest report.

        The server keeps the newest report of each live member (after
        :meth:`join`) for :meth:`reports`, replacing the previous one, and
        ignores reports from any other connection. A worker that may hang
        in native code should rather let the heartbeat thread ship a
        ``faulthandler`` file (:meth:`set_dump_file`).

        Parameters
        ----------
        text : str
            The dump, e.g. from ``faulthandler.dump_traceback``. Only its
            last 64 KiB (UTF-8) are sent.

        Raises
        ------
        TensorSparkValueError
            ``text`` is not a str.

        Examples
        --------
        >>> import traceback
        >>> client.report("".join(traceback.format_stack()))  # doctest: +SKIP
        """
        if not isinstance(text, str):
            raise TensorSparkValueError(f"report: text must be a str, got {type(text).__name__}")
        self._client.report(text)

    def reports(self) -> list[dict[str, Any]]:
        """Every live member's progress and latest report, for a watchdog.

        Any connection may ask (typically the driver's). A
        :class:`ShardedPSClient` merges the servers' lists by
        ``(partition, attempt)``: the largest ``clock``, ``steps`` and
        ``progress_age_s``, and the newest report (smallest
        ``report_age_s``) with its ``text``.

        Returns
        -------
        list of dict
            One dict per live member, in partition order, with the keys
            ``partition``, ``attempt``, ``clock``, ``steps`` (ints),
            ``progress_age_s`` (float: seconds since ``steps`` last
            increased, or since the join), ``report_age_s`` (float seconds
            since its latest report arrived, or None if it sent none) and
            ``text`` (str: that report, ``""`` if none; invalid UTF-8 is
            replaced).

        Examples
        --------
        >>> for w in driver.reports():  # doctest: +SKIP
        ...     if w["progress_age_s"] > 600:
        ...         print(f"worker {w['partition']} is stuck:\n{w['text']}")
        """
        return list(self._client.reports())

    def set_dump_file(self, path: str | os.PathLike) -> None:
        """Have the heartbeat thread ship a stack dump file to the server.

        At each heartbeat the client's background thread (it needs no GIL)
        checks the file's size and modification time and, when the file is
        not empty and changed since it was last sent, sends its last 64 KiB
        as this worker's report (see :meth:`report`). Together with
        ``faulthandler.dump_traceback_later(t, repeat=True, file=f)``,
        whose C thread writes without the GIL, the driver's
        :meth:`reports` shows where a worker is, even one stuck in native
        code holding the GIL. Needs ``heartbeat_interval`` > 0 and
        :meth:`join`; without the heartbeat thread nothing is shipped.
        Stores the path without any I/O; safe to call from another thread.
        A file that cannot be read is skipped (logged once on stderr).
        A :class:`ShardedPSClient` ships it (and :meth:`report`) to its
        first server only: the text is the same for every server, and
        :meth:`reports` keeps each member's newest report.

        Parameters
        ----------
        path : str or os.PathLike
            The file; ``""`` stops shipping.

        Raises
        ------
        TensorSparkValueError
            ``path`` is not a str or path.

        Examples
        --------
        >>> import faulthandler
        >>> f = open("/tmp/stack-0.txt", "w")  # doctest: +SKIP
        >>> faulthandler.dump_traceback_later(60, repeat=True, file=f)  # doctest: +SKIP
        >>> client = PSClient(host, port, secret, partition_id=0,
        ...                   heartbeat_interval=5.0)  # doctest: +SKIP
        >>> client.set_dump_file(f.name)  # doctest: +SKIP
        >>> client.join()  # doctest: +SKIP
        """
        try:
            name = os.fspath(path)
        except TypeError:
            name = None
        if not isinstance(name, str):
            raise TensorSparkValueError(
                f"set_dump_file: path must be a str or os.PathLike, got {type(path).__name__}"
            )
        self._client.set_dump_file(name)

    def configure(
        self,
        mode: str,
        staleness: int = 0,
        *,
        heartbeat_timeout: float = 30.0,
        wait_timeout: float = 600.0,
    ) -> None:
        """Set the run's consistency mode (the driver, before workers join).

        A :class:`ShardedPSClient` configures every server (a server with
        live workers refuses, and the others may then have changed).

        Parameters
        ----------
        mode : str
            ``"async"``: pushes apply on arrival, pulls never wait.
            ``"sync"``: each member's push joins the open round; when every
            live member has pushed, the server applies the round's average,
            and a member's next pull waits for that.
            ``"ssp"``: bounded staleness; pushes apply on arrival and a
            member at clock ``c`` pulls once every live member's clock is
            ``>= c - staleness``.
        staleness : int
            The ssp bound (>= 0); ignored by the other modes.
        heartbeat_timeout : float
            Seconds of silence after which a member is dropped (> 0).
        wait_timeout : float
            Longest wait of a pull or push, in seconds (> 0); then
            :class:`PSTimeoutError` names what it waited for.

        Raises
        ------
        TensorSparkValueError
            Unknown mode or bad value, or workers are live.
        """
        if mode not in _MODES:
            raise TensorSparkValueError(
                f"configure: mode must be one of {sorted(_MODES)}, got {mode!r}"
            )
        if isinstance(staleness, bool) or not isinstance(staleness, int | np.integer):
            raise TensorSparkValueError(f"configure: staleness must be an int, got {staleness!r}")
        if not 0 <= staleness < 2**32:
            raise TensorSparkValueError(f"configure: staleness must be >= 0, got {staleness}")
        timeouts = {"heartbeat_timeout": heartbeat_timeout, "wait_timeout": wait_timeout}
        for what, value in timeouts.items():
            v = _as_number(f"configure: {what}", value)
            if not (v > 0.0 and np.isfinite(v)):
                raise TensorSparkValueError(f"configure: {what} must be > 0 seconds, got {value!r}")
        self._client.configure(
            _MODES[mode],
            int(staleness),
            heartbeat_timeout_s=float(heartbeat_timeout),
            wait_timeout_s=float(wait_timeout),
        )

    def restore(self, tag: int) -> int:
        """Bring the server (sharded: every server) back to its snapshot tagged ``tag``.

        Replaces the server's whole state (variables, optimizer state and
        slots, default optimizer, version) by the newest valid snapshot
        carrying ``tag`` in its snapshot directory (docs/snapshots.md,
        "Tagged snapshots"). The file is read and checked in full before
        anything changes. Snapshot files newer than the restored one are
        deleted: they belong to the history left behind. Call it at a
        quiescent point: it is refused while workers are live. A
        :class:`ShardedPSClient` first checks that every server lists the
        tag, so a missing tag changes no server.

        Parameters
        ----------
        tag : int
            The tag given to :meth:`snapshot` (>= 1).

        Returns
        -------
        int
            The restored model version (sharded: the sum over the servers).

        Raises
        ------
        VariableNotFoundError
            No snapshot with this tag (sharded: on some server; none changed).
        TensorSparkValueError
            A bad tag, workers are live, the server has no snapshot
            directory, or none of its files with this tag is valid.

        Examples
        --------
        >>> tag = driver.newest_common_tag()  # doctest: +SKIP
        >>> if tag is not None:
        ...     driver.restore(tag)  # doctest: +SKIP
        """
        return self._client.restore(_snapshot_tag("restore", tag))

    # ---- sparse tables (docs/protocol.md, "Sparse tables") ----

    def create_tables(self, tables: Sequence[TableSpec]) -> list[bool]:
        """Create tables, or reconfigure the ones that exist.

        Every spec is validated first (:func:`tensorspark.tables.validate_table`),
        so a bad one creates nothing. An existing table keeps its rows and takes
        the new optimizer, capacity, eviction, admission and TTL; another
        ``dim`` is a :class:`ShapeMismatchError`, another vocab, seed or
        initializer a :class:`TensorSparkValueError`. On a sharded client every
        server gets every table.

        Parameters
        ----------
        tables : sequence of TableSpec
            The tables.

        Returns
        -------
        list of bool
            ``True`` where the table was created by this call.
        """
        specs = [validate_table(t) for t in tables]
        created = self._client.create_tables(specs)
        for d in specs:
            self._table_dims[d["name"]] = d["dim"]
        return list(created)

    def list_tables(self) -> dict[str, dict[str, Any]]:
        """The server's tables (summed over servers when sharded).

        Returns
        -------
        dict
            ``{name: {"spec": TableSpec, "dim": int, "vocab": int, "rows": int}}``,
            in creation order; ``rows`` is the number of stored rows.
        """
        out: dict[str, dict[str, Any]] = {}
        for d in self._client.list_tables():
            spec = _spec_of(d)
            self._table_dims[spec.name] = spec.dim
            out[spec.name] = {"spec": spec, "dim": spec.dim, "vocab": spec.vocab, "rows": d["rows"]}
        return out

    def _dim_of(self, table: str) -> int:
        if table not in self._table_dims:
            self.list_tables()
        if table not in self._table_dims:
            raise VariableNotFoundError(
                f"no table {table!r} on the parameter server (create it first with create_tables)"
            )
        return self._table_dims[table]

    def pull_rows(self, requests: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Pull the rows of some ids of one or more tables.

        Rows never written read as their initial values; duplicates are
        allowed. Rows are served at once in every consistency mode.

        Parameters
        ----------
        requests : mapping of str to array_like of int
            ``{table: ids}``, ids 1-D integers.

        Returns
        -------
        dict of str to numpy.ndarray
            ``{table: rows}``, float32 of shape ``[len(ids), dim]``.

        Raises
        ------
        TensorSparkValueError
            Float ids, or an id outside a fixed vocabulary (naming the table
            and the id).
        VariableNotFoundError
            An unknown table.
        """
        pairs = {}
        for table, ids in requests.items():
            arr = as_ids(table, ids)
            pairs[table] = (arr, np.empty((arr.size, self._dim_of(table)), np.float32))
        self.pull_rows_into(pairs)
        return {t: out for t, (_, out) in pairs.items()}

    def pull_rows_into(self, requests: Mapping[str, tuple[Any, np.ndarray]]) -> int:
        """Pull rows straight into caller-owned buffers (no copy); returns the version.

        Parameters
        ----------
        requests : mapping of str to (ids, out)
            ``out`` is a writable C-contiguous float32 array of shape
            ``[len(ids), dim]``; the socket writes into it.

        Returns
        -------
        int
            The model version (summed over servers when sharded).
        """
        tables, ids, outs = [], [], []
        for table, (table_ids, out) in requests.items():
            arr = as_ids(table, table_ids)
            tables.append(table)
            ids.append(arr)
            outs.append(_row_buffer(table, arr.size, out))
        return self._client.pull_rows_into(tables, ids, outs)

    def push_rows(
        self,
        updates: Mapping[str, tuple[Any, Any]],
        kind: str = "gradient",
        learning_rate: float = 0.0,
    ) -> int:
        """Push row gradients or deltas; returns the model version after the push.

        Parameters
        ----------
        updates : mapping of str to (ids, values)
            ``{table: (ids, values)}``: ids 1-D integers, unique within a
            table's update (sum the gradients of repeated ids first); values
            of shape ``[len(ids), dim]``.
        kind : {"gradient", "delta"}
            A gradient is a step of each table's optimizer; a delta is added.
        learning_rate : float
            > 0 overrides each table's learning rate for this push (gradients).

        Returns
        -------
        int
            The model version after the push.

        Raises
        ------
        ShapeMismatchError
            A ``dim`` other than the table's (naming both).
        TensorSparkValueError
            Float ids, an id out of range, a repeated id, or a table full with
            eviction off; that table's rows are left unchanged.
        """
        if kind not in _ROW_KINDS:
            raise TensorSparkValueError(
                f"push_rows: kind must be one of {sorted(_ROW_KINDS)}, got {kind!r}"
            )
        lr = _as_number("push_rows: learning_rate", learning_rate)
        tables, ids, values = [], [], []
        for table, (table_ids, table_values) in updates.items():
            arr = as_ids(table, table_ids)
            tables.append(table)
            ids.append(arr)
            values.append(_row_values(table, arr.size, table_values))
        return self._client.push_rows(_ROW_KINDS[kind], lr, tables, ids, values)

    def export_rows(self, table: str, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Every row ``table`` stores, in batches of at most ``batch_rows``.

        Consistent when no push runs meanwhile. Rows never written (and rows
        evicted or expired) are not stored: they read as their initial
        values (:func:`tensorspark.tables.initial_rows`).

        Returns
        -------
        ids : numpy.ndarray
            int64, shape ``[n]``.
        values : numpy.ndarray
            float32, shape ``[n, dim]``.
        """
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise TensorSparkValueError(
                f"export_rows: batch_rows must be an integer >= 1, got {batch_rows!r}"
            )
        batch = min(batch_rows, 2**32 - 1)
        cursor = 0
        all_ids, all_values = [], []
        while cursor != _core.EXPORT_DONE:
            ids, values, cursor = self._client.export_rows(table, cursor, batch)
            all_ids.append(ids)
            all_values.append(values)
        dim = all_values[0].shape[1]
        return (
            np.concatenate(all_ids) if all_ids else np.empty(0, np.int64),
            np.concatenate(all_values) if all_values else np.empty((0, dim), np.float32),
        )

    @property
    def connected(self) -> bool:
        """True while the connection (sharded: every server's) is up."""
        return self._client.connected

    def close(self) -> None:
        """Close the connection(s)."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PSClient(_TensorClient):
    """One authenticated connection to a parameter server.

    Parameters
    ----------
    host, port : str, int
        Address of the server; a host ``"unix:/path/to.sock"`` connects over
        that Unix-domain socket (the server's ``unix_path``; port ignored).
    secret : bytes
        The run's shared secret.
    partition_id, attempt : int
        Identity of the worker (Spark partition id and attempt number); -1 for
        the driver or a tool.
    connect_timeout : float
        Seconds allowed for connecting, retries with backoff included.
    io_timeout : float
        Limit for any single read or write once connected. After
        :meth:`join`, a pull or push may also wait on the server for other
        workers (sync and ssp modes), so each round trip then allows
        ``io_timeout`` + 600 s (the default ``wait_timeout``).
    encoding : str
        How pushed and pulled values travel: ``"fp32"`` (default, exact),
        ``"fp16"`` (half the bytes; relative error <= 2**-11 ~ 4.9e-4 for
        ``|x|`` in [6.1e-5, 65504], larger values become inf and smaller
        ones lose precision down to 0) or ``"bf16"`` (half the bytes, float32's
        range, but relative error up to 2**-8 ~ 3.9e-3 per element, so it
        does not meet 1e-3). The server stores float32 either way;
        :meth:`register` always sends float32.
    heartbeat_interval : float
        After :meth:`join`, send a heartbeat from a background thread (with
        its own connection) every this many seconds, so the worker stays a
        live member during long local work; 0 (default) sends none.
    tls_fingerprint : str or list of str, optional
        Connect with TLS 1.3 and keep the connection only if the server's
        certificate has this fingerprint (or one of these), as
        :attr:`ParameterServer.tls_fingerprint` or ``tensorspark-ps --tls``
        gives it. None (default): plain frames.
    checksums : str
        Whether frames carry a CRC-32C: ``"auto"`` (default: on over plain
        TCP, off on a Unix socket and under TLS, whose AEAD already checks
        every record), ``"on"`` or ``"off"``. Negotiated in the handshake; a
        server that predates the option keeps checksums on. See
        :attr:`checksums` for the outcome.

    Raises
    ------
    PSConnectionError, PSTimeoutError, AuthenticationError
        The server cannot be reached in time or refuses the secret;
        :class:`AuthenticationError` also when its certificate does not
        match ``tls_fingerprint``, or when it wants TLS and none was asked.
    TensorSparkValueError
        ``encoding`` is not one of ``"fp32"``, ``"fp16"``, ``"bf16"``, or
        ``checksums`` not one of ``"auto"``, ``"on"``, ``"off"``.

    Notes
    -----
    Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        *,
        partition_id: int = -1,
        attempt: int = 0,
        connect_timeout: float = 10.0,
        io_timeout: float = 120.0,
        max_retries: int = 8,
        encoding: str = "fp32",
        heartbeat_interval: float = 0.0,
        tls_fingerprint: str | Iterable[str] | None = None,
        checksums: str = "auto",
    ) -> None:
        if encoding not in _ENCODINGS:
            raise TensorSparkValueError(
                f"PSClient: encoding must be one of {sorted(_ENCODINGS)}, got {encoding!r}"
            )
        if checksums not in _CHECKSUMS:
            raise TensorSparkValueError(
                f"PSClient: checksums must be one of {sorted(_CHECKSUMS)}, got {checksums!r}"
            )
        self.encoding = encoding
        heartbeat_interval = _heartbeat_interval("PSClient", heartbeat_interval)
        self.host, self.port = host, int(port)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._table_dims: dict[str, int] = {}
        self._client = _core.Client(
            host,
            self.port,
            secret,
            partition_id=partition_id,
            attempt=attempt,
            connect_timeout_s=connect_timeout,
            io_timeout_s=io_timeout,
            max_retries=max_retries,
            encoding=_ENCODINGS[encoding],
            heartbeat_interval_s=heartbeat_interval,
            tls_fingerprints=_tls_pins("PSClient", tls_fingerprint),
            checksums=_CHECKSUMS[checksums],
        )

    @property
    def checksums(self) -> bool:
        """True when this connection's frames carry CRC-32C checksums."""
        return self._client.checksums

    def list_variables(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of every variable on the server."""
        infos, _ = self._client.list_variables()
        shapes = {name: tuple(shape) for name, shape in infos}
        self._shapes.update(shapes)
        return shapes

    def pull(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Pull variables (all when ``names`` is None) into new float32 arrays."""
        if names is None:
            shapes = self.list_variables()
            names = list(shapes)
        else:
            names = list(names)
            if any(n not in self._shapes for n in names):
                self.list_variables()
            shapes = self._shapes
        missing = [n for n in names if n not in shapes]
        if missing:
            raise TensorSparkValueError(
                f"pull: the parameter server holds no variable named {missing[0]!r}; "
                f"it has {sorted(shapes)[:10]}"
            )
        out = {n: np.empty(shapes[n], dtype=np.float32) for n in names}
        self.pull_into(out)
        return out

    def stats(self) -> dict[str, int | float]:
        """The server's counters.

        Values are ints, except keys whose name (before any ``{...}`` labels)
        ends in ``_f64``, such as ``worker_loss_f64``: those are floats.
        """
        return dict(self._client.stats())

    def snapshot(self, tag: int) -> str:
        """Have the server write a snapshot tagged ``tag`` now; returns its file name.

        Tagged snapshots mark points that are consistent across the servers
        of a sharded model (see :meth:`ShardedPSClient.snapshot`); take
        them at quiescent points, between Spark jobs. The file (in the
        server's ``--snapshot-dir``) is named
        ``snapshot-<version>-tag-<tag>.tsnap``. The server writes the whole
        model before it answers, so the call lasts about as long as that.

        Parameters
        ----------
        tag : int
            Chosen by the driver, >= 1; use increasing numbers (the job
            number, the epoch), since :meth:`ShardedPSClient.newest_common_tag`
            takes the largest.

        Raises
        ------
        TensorSparkValueError
            A bad tag, the server has no snapshot directory, or the write
            failed (the message names the file).

        Examples
        --------
        >>> client.snapshot(tag=3)  # doctest: +SKIP
        'snapshot-00000000000000001200-tag-00000000000000000003.tsnap'
        """
        return self._client.snapshot(_snapshot_tag("snapshot", tag))

    def snapshots(self) -> list[dict[str, Any]]:
        """The valid snapshot files in the server's snapshot directory, newest first.

        Newest means the highest version, then the highest tag. Only each
        file's header and trailer are checked (cheap for big models);
        :meth:`restore` reads and checks the whole file.

        Returns
        -------
        list of dict
            ``{"tag": int, "version": int, "name": str}`` per file; ``tag``
            is 0 for untagged snapshots (timed, final, or written before
            tags existed).

        Raises
        ------
        TensorSparkValueError
            The server has no snapshot directory.
        """
        return [dict(d) for d in self._client.snapshots()]

    def shutdown_server(self) -> None:
        """Ask the server to stop serving."""
        self._client.shutdown_server()


class ShardedPSClient(_TensorClient):
    """One model spread over several parameter servers.

    Each variable is cut into chunks of about ``chunk_bytes`` that live on the
    servers by a fixed rule (docs/protocol.md, "Sharding"), so every worker
    finds the same chunk on the same server; calls go to all servers in
    parallel.

    Parameters
    ----------
    servers : list of str or (host, port)
        The servers, as ``"host:port"``; every client of a run must list them
        in the same order.
    secret : bytes
        The run's shared secret (the same on every server).
    partition_id, attempt : int
        Identity of the worker, as for :class:`PSClient`; -1 for the driver
        or a tool.
    chunk_bytes : int
        Chunk size; must be the same for every client of a run.
    heartbeat_interval : float
        After :meth:`join`, send heartbeats to every server, each from its
        own background thread and connection, every this many seconds; 0
        (default) sends none.
    tls_fingerprint : str or list of str, optional
        TLS to every server, as for :class:`PSClient`; with a list, each
        server's certificate must match one of its fingerprints.

    Notes
    -----
    Not thread-safe: use one client per thread (except
    :meth:`report_progress` and :meth:`set_dump_file`).

    A worker joins every server, so every server fences a stale attempt and
    runs the sync rounds and ssp waits over its part of the model; a push
    only goes to the servers holding a piece of it (docs/protocol.md,
    "Sharding").
    """

    def __init__(
        self,
        servers: Iterable[str | tuple[str, int]],
        secret: bytes,
        *,
        partition_id: int = -1,
        attempt: int = 0,
        connect_timeout: float = 10.0,
        io_timeout: float = 120.0,
        chunk_bytes: int = 4 << 20,
        heartbeat_interval: float = 0.0,
        tls_fingerprint: str | Iterable[str] | None = None,
    ) -> None:
        heartbeat_interval = _heartbeat_interval("ShardedPSClient", heartbeat_interval)
        self.servers = [parse_address(a) for a in servers]
        if not self.servers:
            raise TensorSparkValueError("ShardedPSClient needs at least one server address")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._table_dims: dict[str, int] = {}
        self._client = _core.ShardedClient(
            self.servers,
            secret,
            partition_id=partition_id,
            attempt=attempt,
            connect_timeout_s=connect_timeout,
            io_timeout_s=io_timeout,
            chunk_bytes=int(chunk_bytes),
            heartbeat_interval_s=heartbeat_interval,
            tls_fingerprints=_tls_pins("ShardedPSClient", tls_fingerprint),
        )

    def pull(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Pull the named variables (registered through this client) into new arrays."""
        names = list(names)
        unknown = [n for n in names if n not in self._shapes]
        if unknown:
            raise TensorSparkValueError(
                f"pull: shape of {unknown[0]!r} unknown; register it through this client first "
                "or use pull_into with a buffer of the right size"
            )
        out = {n: np.empty(self._shapes[n], np.float32) for n in names}
        self.pull_into(out)
        return out

    def snapshot(self, tag: int) -> list[str]:
        """Have every server write a snapshot tagged ``tag``; returns their file names.

        Each server also snapshots on its own timer, so after a crash their
        newest files come from different moments. Tagged snapshots, taken
        by the driver at quiescent points (between Spark jobs, when no
        worker is live), are the points all servers share: after a restart
        :meth:`newest_common_tag` finds the newest one every server holds
        and :meth:`restore` brings them all back to it.

        Parameters
        ----------
        tag : int
            >= 1; use increasing numbers (the job number), since
            :meth:`newest_common_tag` takes the largest.

        Returns
        -------
        list of str
            Each server's file name, in server order.

        Raises
        ------
        TensorSparkValueError
            A bad tag, or a server without a snapshot directory or whose
            write failed (named in the message; the others wrote theirs).

        Examples
        --------
        >>> for job, rdd in enumerate(jobs, start=1):  # doctest: +SKIP
        ...     run_job(rdd)
        ...     driver.snapshot(tag=job)
        """
        return list(self._client.snapshot(_snapshot_tag("snapshot", tag)))

    def snapshots(self) -> list[list[dict[str, Any]]]:
        """Each server's valid snapshot files, newest first, in server order.

        Per server as :meth:`PSClient.snapshots`: dicts with ``tag``,
        ``version`` and ``name``.
        """
        return [[dict(d) for d in files] for files in self._client.snapshots()]

    def newest_common_tag(self) -> int | None:
        """The largest tag that every server holds a valid snapshot of, or None.

        Examples
        --------
        >>> tag = driver.newest_common_tag()  # doctest: +SKIP
        >>> if tag is not None:
        ...     driver.restore(tag)  # doctest: +SKIP
        """
        return self._client.newest_common_tag()

    def stats_per_server(self) -> list[dict[str, int | float]]:
        """Each server's counters, in server order (``_f64`` keys as floats)."""
        return [dict(d) for d in self._client.stats()]

    def stats(self) -> dict[str, int | float]:
        """The servers' counters as one dict.

        Every worker is a member of every server, so what describes the
        members and the run is taken from the first server, never summed:
        ``members``, ``workers_lost``, ``workers_retried``, ``workers_fenced``,
        ``mode`` and the per-member ``worker_*{partition=...,attempt=...}`` keys. Float keys
        (``_f64``, such as a worker's loss) come from the first server that
        has them. ``sync_round`` is the largest over the servers (a server
        that holds no part of the model never closes a round). Everything
        else counts work each server did and is summed: ``pushes``,
        ``pulls``, ``bytes_in``, ``connections``, ``variables``,
        ``refused{...}``, the staleness histogram and ``version`` (the
        summed version the sharded calls report).
        """
        total: dict[str, int | float] = {}
        for d in self.stats_per_server():
            for k, v in d.items():
                if k in _MAX_OVER_SERVERS:
                    total[k] = max(total.get(k, v), v)
                elif isinstance(v, float) or _per_member(k):
                    total.setdefault(k, v)
                else:
                    total[k] = total.get(k, 0) + v
        return total
