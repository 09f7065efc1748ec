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

import secrets
from collections.abc import Iterable, Mapping

import numpy as np

from . import _core
from .errors import TensorSparkValueError

_KINDS = {
    "parameters": _core.KIND_PARAMETERS,
    "delta": _core.KIND_DELTA,
    "gradient": _core.KIND_GRADIENT,
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
    io_timeout : float
        Seconds a half-received frame may stall before the connection drops.

    Raises
    ------
    AddressInUseError
        The port is taken.
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
        io_timeout: float = 120.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise TensorSparkValueError(
                "ParameterServer: secret must be bytes of length >= 16; use generate_secret()"
            )
        if not 0 <= int(port) <= 65535:
            raise TensorSparkValueError(f"ParameterServer: port must be 0..65535, got {port}")
        self.host = host
        self._server = _core.Server(
            host,
            int(port),
            secret,
            max_frame_bytes=max_frame_bytes,
            max_variables=max_variables,
            max_connections=max_connections,
            io_timeout_s=io_timeout,
            handshake_timeout_s=handshake_timeout,
        )

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._server.port

    @property
    def version(self) -> int:
        """Model version: the number of pushes applied."""
        return self._server.version

    @property
    def running(self) -> bool:
        return self._server.running

    def stats(self) -> dict[str, int]:
        """The server's counters (pushes, pulls, bytes, connections, ...)."""
        return dict(self._server.stats())

    def stop(self) -> None:
        """Stop serving; close every connection and join the server threads."""
        self._server.stop()

    def wait_until_stopped(self, timeout: float) -> bool:
        """Wait until a client's shutdown call or :meth:`stop`; True if stopped."""
        return self._server.wait_until_stopped(timeout)

    def __enter__(self) -> ParameterServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class PSClient:
    """One authenticated connection to a parameter server.

    Parameters
    ----------
    host, port : str, int
        Address of the server.
    secret : bytes
        The run's shared secret.
    partition_id, attempt : int
        Identity of the worker (Spark partition id and attempt number); -1 for
        the driver or a tool.
    connect_timeout : float
        Seconds allowed for connecting, retries with backoff included.
    io_timeout : float
        Limit for any single read or write once connected.

    Raises
    ------
    PSConnectionError, PSTimeoutError, AuthenticationError
        The server cannot be reached in time or refuses the secret.

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
    ) -> None:
        self.host, self.port = host, int(port)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._client = _core.Client(
            host,
            self.port,
            secret,
            partition_id=partition_id,
            attempt=attempt,
            connect_timeout_s=connect_timeout,
            io_timeout_s=io_timeout,
            max_retries=max_retries,
        )

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

    def pull_into(self, out: Mapping[str, np.ndarray]) -> int:
        """Fill caller-owned float32, C-contiguous arrays in place; returns the version."""
        names = list(out)
        arrays = list(out.values())
        for n, a in zip(names, arrays, strict=True):
            if not (
                isinstance(a, np.ndarray)
                and a.dtype == np.float32
                and a.flags.c_contiguous
                and a.flags.writeable
            ):
                raise TensorSparkValueError(
                    f"pull_into: buffer for {n!r} must be a writable C-contiguous float32 "
                    "numpy array"
                )
        return self._client.pull_into(names, arrays)

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
        ``"delta"`` (added to the model) or ``"gradient"`` (SGD step with
        ``learning_rate``).
        """
        if kind not in _KINDS:
            raise TensorSparkValueError(f"push: kind must be one of {sorted(_KINDS)}, got {kind!r}")
        names = list(values)
        arrays = [_as_float32(n, values[n]) for n in names]
        return self._client.push(
            _KINDS[kind], names, arrays, learning_rate=learning_rate, mean_window=mean_window
        )

    def push_arrays(self, kind: int, names: list[str], arrays: list[np.ndarray], **kw) -> int:
        """Push already float32, C-contiguous arrays without any checks or copies."""
        return self._client.push(kind, names, arrays, **kw)

    def stats(self) -> dict[str, int]:
        """The server's counters."""
        return dict(self._client.stats())

    def shutdown_server(self) -> None:
        """Ask the server to stop serving."""
        self._client.shutdown_server()

    @property
    def connected(self) -> bool:
        return self._client.connected

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
