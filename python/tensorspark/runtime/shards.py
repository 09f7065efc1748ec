"""Parameter-server shards hosted by Spark tasks (``ps_shards=N``).

Driver side, :class:`ShardHost`: a small TCP *directory* on the driver and
one long-running Spark job of N tasks, each serving one shard (a
:class:`~tensorspark.ps.ParameterServer` inside the task's Python worker).
A shard task claims its shard in the directory, starts its server (from
its newest snapshot when it is a rerun), reports its address and then
heartbeats until the driver tells it to stop. Workers and the driver look
the addresses up in the directory, so a shard that Spark reruns elsewhere
is found again.

Task side, :func:`serve` (a shard task) and :func:`lookup` (anyone who
needs the addresses).

One instance per shard: a second claim of a served shard (a speculative
copy, or a task that Spark thinks lost while it still runs) waits as a
standby without a server, and takes over only when the owner's connection
is gone; an owner whose directory connection ends stops its server at
once, so two servers never hold one shard.

The directory's wire (docs/protocol.md, "Shard directory"): fixed 12-byte
headers, length-checked payloads, and after a nonce handshake proving the
run's secret both ways, an HMAC-SHA256 tag on every frame.

Threading: :class:`ShardHost` runs an accept thread, one thread per
directory connection and one for the Spark job; its public methods may be
called from any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import (
    AuthenticationError,
    ProtocolError,
    PSConnectionError,
    PSTimeoutError,
    TensorSparkError,
    TensorSparkValueError,
)

log = logging.getLogger("tensorspark")

MAGIC = b"TSDR"
VERSION = 1
HEADER = struct.Struct("<4sHHI")  # magic, version, type, payload bytes
TAG_BYTES = 32
NONCE_BYTES = 16
MAX_PAYLOAD = 64 << 10
MAX_TEXT = 8 << 10

# Frame types (docs/protocol.md, "Shard directory").
HELLO, AUTH, AUTH_OK = 1, 2, 3  # the handshake: untagged, fixed sizes
CLAIM, GRANT, STANDBY, READY, BEAT, STOP, STOPPED, FAILED = 10, 11, 12, 13, 14, 15, 16, 17
LOOKUP, ADDRESSES = 20, 21
ERROR = 30

_HANDSHAKE_SIZES = {HELLO: NONCE_BYTES, AUTH: NONCE_BYTES + 32, AUTH_OK: 32}
_CONTEXT = b"tensorspark shard directory v1"
BEAT_INTERVAL_S = 1.0


# -- the wire ------------------------------------------------------------------


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PSTimeoutError(f"shard directory: timed out waiting for {what}")
            sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError as e:
            raise PSTimeoutError(f"shard directory: timed out waiting for {what}") from e
        except OSError as e:
            raise PSConnectionError(f"shard directory: connection lost reading {what}: {e}") from e
        if not chunk:
            raise PSConnectionError(f"shard directory: the peer closed the connection ({what})")
        buf += chunk
    return bytes(buf)


class Writer:
    """A payload built field by field (little-endian)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def u16(self, v: int) -> Writer:
        self.buf += struct.pack("<H", v)
        return self

    def u32(self, v: int) -> Writer:
        self.buf += struct.pack("<I", v)
        return self

    def u64(self, v: int) -> Writer:
        self.buf += struct.pack("<Q", v)
        return self

    def raw(self, b: bytes) -> Writer:
        self.buf += b
        return self

    def text(self, s: str) -> Writer:
        b = s.encode()[:MAX_TEXT]
        return self.u16(len(b)).raw(b)


class Reader:
    """Reads a payload's fields; every read is bounds-checked (ProtocolError)."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(
                f"shard directory: {self.what} frame is truncated: needs {self.pos + n} bytes, "
                f"has {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def text(self) -> str:
        n = self.u16()
        if n > MAX_TEXT:
            raise ProtocolError(
                f"shard directory: a {n}-byte string in {self.what} (max {MAX_TEXT})"
            )
        try:
            return self._take(n).decode()
        except UnicodeDecodeError as e:
            raise ProtocolError(f"shard directory: {self.what} holds a non-UTF-8 string") from e

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(
                f"shard directory: {len(self.data) - self.pos} stray bytes after {self.what}"
            )


def _header(kind: int, n: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, n)


def _read_header(sock: socket.socket, deadline: float | None, what: str) -> tuple[int, int]:
    magic, version, kind, n = HEADER.unpack(_recv_exact(sock, HEADER.size, deadline, what))
    if magic != MAGIC:
        raise ProtocolError(f"shard directory: bad magic {magic!r} (not a tensorspark directory)")
    if version != VERSION:
        raise ProtocolError(f"shard directory: wire version {version}, this side speaks {VERSION}")
    if n > MAX_PAYLOAD:
        raise ProtocolError(f"shard directory: a {n}-byte frame (max {MAX_PAYLOAD})")
    return kind, n


class Channel:
    """An authenticated directory connection: every frame carries a tag.

    The tag is HMAC-SHA256 under a per-connection key over the direction,
    a sequence number and the frame, so frames can be neither changed,
    replayed nor reflected. One thread sends and one receives at a time
    (the directory's handler does both from one thread).
    """

    def __init__(self, sock: socket.socket, key: bytes, server: bool) -> None:
        self.sock, self._key = sock, key
        self._out, self._in = (b"S", b"C") if server else (b"C", b"S")
        self._sent = self._received = 0
        self._send_lock = threading.Lock()

    def send(self, kind: int, payload: bytes = b"") -> None:
        header = _header(kind, len(payload))
        with self._send_lock:
            tag = _mac(self._key, self._out, struct.pack("<Q", self._sent), header, payload)
            self._sent += 1
            try:
                self.sock.sendall(header + payload + tag)
            except OSError as e:
                raise PSConnectionError(f"shard directory: connection lost sending: {e}") from e

    def recv(self, timeout: float | None, what: str) -> tuple[int, bytes] | None:
        """The next frame; None when nothing started arriving within ``timeout``."""
        if timeout is not None:
            self.sock.settimeout(timeout)
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                return None
            except OSError as e:
                raise PSConnectionError(f"shard directory: connection lost ({what}): {e}") from e
            if not first:
                raise PSConnectionError(f"shard directory: the peer closed the connection ({what})")
        deadline = time.monotonic() + 30.0  # a started frame must finish
        kind, n = _read_header(self.sock, deadline, what)
        payload = _recv_exact(self.sock, n, deadline, what)
        tag = _recv_exact(self.sock, TAG_BYTES, deadline, what)
        want = _mac(
            self._key, self._in, struct.pack("<Q", self._received), _header(kind, n), payload
        )
        if not hmac.compare_digest(tag, want):
            raise AuthenticationError(
                f"shard directory: a frame's tag does not match ({what}): changed on the way, "
                "or the peer does not hold the run's secret"
            )
        self._received += 1
        return kind, payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _send_plain(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(_header(kind, len(payload)) + payload)


def _recv_plain(sock: socket.socket, kind: int, deadline: float, what: str) -> bytes:
    got, n = _read_header(sock, deadline, what)
    if got != kind or n != _HANDSHAKE_SIZES[kind]:
        raise ProtocolError(
            f"shard directory: expected {what} (type {kind}, {_HANDSHAKE_SIZES[kind]} bytes), "
            f"got type {got} with {n} bytes"
        )
    return _recv_exact(sock, n, deadline, what)


def accept_handshake(sock: socket.socket, secret: bytes, timeout: float) -> Channel:
    """The directory's side of the handshake: the peer must prove the secret."""
    deadline = time.monotonic() + timeout
    nonce_s = secrets.token_bytes(NONCE_BYTES)
    _send_plain(sock, HELLO, nonce_s)
    auth = _recv_plain(sock, AUTH, deadline, "the handshake's AUTH")
    nonce_c, proof = auth[:NONCE_BYTES], auth[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _mac(secret, _CONTEXT, b"client", nonce_s, nonce_c)):
        raise AuthenticationError("shard directory: a peer failed the handshake (wrong secret)")
    _send_plain(sock, AUTH_OK, _mac(secret, _CONTEXT, b"server", nonce_c, nonce_s))
    return Channel(sock, _mac(secret, _CONTEXT, b"key", nonce_s, nonce_c), server=True)


def open_channel(address: tuple[str, int], secret: bytes, timeout: float) -> Channel:
    """Connect to the directory at ``address`` and authenticate both ways."""
    deadline = time.monotonic() + timeout
    host, port = address
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise PSConnectionError(
            f"cannot reach the driver's shard directory at {host}:{port} within {timeout:g} s: "
            f"{e}. Executors must reach the driver (spark.driver.host)"
        ) from e
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce_s = _recv_plain(sock, HELLO, deadline, "the directory's HELLO")
        nonce_c = secrets.token_bytes(NONCE_BYTES)
        _send_plain(sock, AUTH, nonce_c + _mac(secret, _CONTEXT, b"client", nonce_s, nonce_c))
        try:
            proof = _recv_plain(sock, AUTH_OK, deadline, "the directory's AUTH_OK")
        except PSConnectionError as e:  # the directory hangs up on a wrong proof
            raise AuthenticationError(
                f"the shard directory at {host}:{port} refused this connection's proof: the "
                "secret is not the run's"
            ) from e
        if not hmac.compare_digest(proof, _mac(secret, _CONTEXT, b"server", nonce_c, nonce_s)):
            raise AuthenticationError(
                f"the shard directory at {host}:{port} does not hold the run's secret"
            )
    except BaseException:
        sock.close()
        raise
    return Channel(sock, _mac(secret, _CONTEXT, b"key", nonce_s, nonce_c), server=False)


@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int
    fingerprint: str  # "sha256:..." with TLS, else ""


def endpoints(addresses: list[Address]) -> tuple[list[tuple[str, int]], list[str]]:
    """A client's server list and the TLS fingerprints it pins (none without TLS)."""
    return [(a.host, a.port) for a in addresses], [
        a.fingerprint for a in addresses if a.fingerprint
    ]


def encode_addresses(generation: int, addresses: list[Address]) -> bytes:
    w = Writer().u64(generation).u16(len(addresses))
    for a in addresses:
        w.u16(a.port).text(a.host).text(a.fingerprint)
    return bytes(w.buf)


def decode_addresses(payload: bytes) -> tuple[int, list[Address]]:
    r = Reader(payload, "ADDRESSES")
    generation, n = r.u64(), r.u16()
    out = []
    for _ in range(n):
        port = r.u16()
        out.append(Address(r.text(), port, r.text()))
    r.end()
    return generation, out


def lookup(
    directory: tuple[str, int], secret: bytes, wait: float, *, connect_timeout: float = 30.0
) -> tuple[int, list[Address]]:
    """Every shard's address, once all serve; waits up to ``wait`` seconds.

    Returns (generation, addresses); the generation grows whenever a shard
    is lost or comes back. Raises :class:`PSTimeoutError` naming the shards
    still missing, or the shard job's error when it failed.
    """
    ch = open_channel(directory, secret, connect_timeout)
    try:
        ch.send(LOOKUP, bytes(Writer().u32(int(min(wait, 86400.0) * 1000)).buf))
        got = ch.recv(wait + 30.0, "the answer to LOOKUP")
        if got is None:
            raise PSTimeoutError(
                f"the shard directory at {directory[0]}:{directory[1]} did not answer a "
                f"lookup within {wait + 30.0:g} s"
            )
        kind, payload = got
        if kind == ERROR:
            r = Reader(payload, "ERROR")
            code, text = r.u16(), r.text()
            raise (PSTimeoutError if code == 1 else TensorSparkError)(text)
        if kind != ADDRESSES:
            raise ProtocolError(f"shard directory: LOOKUP answered with frame type {kind}")
        return decode_addresses(payload)
    finally:
        ch.close()


# -- driver side -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """What every shard task needs, shipped in the task closure (plain values)."""

    directory: tuple[str, int]
    secret: bytes
    count: int
    snapshot_root: str  # "" or checkpoint_dir/run-<id>: shard i snapshots in shard-<i>
    snapshot_every_s: float
    snapshot_every_versions: int
    snapshot_keep: int
    tls: bool
    threads: int
    connect_timeout: float
    io_timeout: float


@dataclasses.dataclass
class _Shard:
    owner: Any = None  # the owning connection's handler, or None
    standbys: list[Any] = dataclasses.field(default_factory=list)
    address: Address | None = None
    attempt: int = -1
    starts: int = 0  # grants so far: 0 means the first start
    lost: int = 0


class ShardHost:
    """The shards of one run: their Spark job and the directory that finds them.

    Parameters
    ----------
    cluster : runtime.spark.Cluster
        Where the shard job runs.
    config : callable
        ``config(directory_address) -> ShardConfig``.
    bind, advertise : str
        The address the directory binds and the host tasks reach it at.
    name : str
        The run's name, for the job's description.
    group : str
        The shard job's job group (tag under Spark Connect).
    heartbeat_timeout : float
        Seconds without a shard's heartbeat before it counts as lost.
    resume_from : list of str
        Empty, or per shard the snapshot file its first start resumes
        from (:func:`common_snapshot`).
    """

    def __init__(
        self,
        cluster: Any,
        config: Callable[[tuple[str, int]], ShardConfig],
        *,
        bind: str,
        advertise: str,
        name: str,
        group: str,
        heartbeat_timeout: float,
        resume_from: list[str] | None = None,
    ) -> None:
        self.cluster, self.name, self.group = cluster, name, group
        self.heartbeat_timeout = heartbeat_timeout
        self.resume_from = list(resume_from or [])
        self._cv = threading.Condition()
        self._closing = False
        self.error: BaseException | None = None  # the shard job's failure
        self.generation = 0
        self.on_ready: Callable[[int, Address, bool], None] | None = None
        self._listener = socket.create_server((bind, 0), backlog=256)
        self.address = (advertise, self._listener.getsockname()[1])
        self.config = config(self.address)
        self._shards = [_Shard() for _ in range(self.config.count)]
        self._dropped, self._dropped_logged = 0, -1e9  # connections dropped, for _refused
        self._job_done = threading.Event()
        self._job_done.set()  # until start(): no job to wait for
        self._spawn(self._accept, "tensorspark-shard-directory")

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

    # -- the Spark job -----------------------------------------------------------

    def start(self) -> None:
        """Submit the shard job (in its own thread: it runs for the whole run)."""
        self._job_done.clear()
        self._spawn(self._run_job, "tensorspark-shard-job")

    def _run_job(self) -> None:
        from . import spark

        cfg, n = self.config, self.config.count
        what = f"tensorspark {self.name}: {n} parameter-server shard(s)"
        try:
            with self.cluster.job_group(self.group, what):
                if self.cluster.connect:
                    frame = self.cluster.session.range(0, n, 1, n)
                    frame.mapInArrow(_ArrowTask(cfg), "shard int, version long").collect()
                else:
                    self.cluster.sc.parallelize(range(n), n).mapPartitions(_RddTask(cfg)).collect()
            if not self._closing:
                raise TensorSparkError("the shard job ended before the run did")
        except BaseException as e:  # noqa: BLE001 - kept for the run to raise
            if not self._closing:
                try:
                    if isinstance(e, TensorSparkError):
                        raise
                    spark.raise_task_error(e, what)
                except BaseException as translated:  # noqa: BLE001
                    self.error = translated
                log.error("tensorspark: the parameter-server shards failed: %s", self.error)
        finally:
            with self._cv:
                self._job_done.set()
                self._cv.notify_all()

    # -- waiting and lookups -------------------------------------------------------

    def _missing(self) -> list[int]:
        return [i for i, s in enumerate(self._shards) if s.address is None]

    def addresses(self, wait: float) -> tuple[int, list[Address]]:
        """(generation, every shard's address) once all serve, within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        with self._cv:
            while True:
                if self.error is not None:
                    raise TensorSparkError(
                        f"the parameter-server shards of {self.name} failed: {self.error}"
                    ) from self.error
                if self._closing:
                    raise PSConnectionError(f"the run {self.name} is ending; its shards stop")
                missing = self._missing()
                if not missing:
                    return self.generation, [s.address for s in self._shards]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PSTimeoutError(self._waiting_message(missing, wait))
                self._cv.wait(min(left, 1.0))

    def _waiting_message(self, missing: list[int], wait: float) -> str:
        lost = [i for i in missing if self._shards[i].lost]
        head = (
            f"parameter-server shard(s) {', '.join(map(str, missing))} of {self.name} not "
            f"serving after {wait:g} s"
        )
        if lost:
            return (
                f"{head}: shard(s) {', '.join(map(str, lost))} were lost and Spark has not "
                "started their tasks again (no free task slot, or the executors are gone)"
            )
        return (
            f"{head}: their Spark tasks have not started; each shard holds a task slot for the "
            "whole run, so the cluster needs ps_shards + 1 free slots"
        )

    # -- the directory ---------------------------------------------------------------

    def _accept(self) -> None:
        self._listener.settimeout(0.5)  # a closed listener does not wake accept()
        while not self._closing:
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            sock.settimeout(None)
            self._spawn(self._serve_connection, f"tensorspark-shard-directory-{peer}", sock, peer)

    def _serve_connection(self, sock: socket.socket, peer: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ch = accept_handshake(sock, self.config.secret, 10.0)
            got = ch.recv(30.0, "the first request")
            if got is None:
                return
            kind, payload = got
            if kind == LOOKUP:
                self._answer_lookup(ch, payload)
            elif kind == CLAIM:
                _ShardSession(self, ch, payload, peer).run()
            else:
                raise ProtocolError(f"shard directory: unexpected first frame type {kind}")
        except TensorSparkError as e:
            self._refused(f"{e} (peer {peer[0]})")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _refused(self, why: str) -> None:
        """Log a dropped connection: the first at once, then a summary every 10 s at most."""
        with self._cv:
            self._dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged < 10.0:
                return
            count, self._dropped, self._dropped_logged = self._dropped, 0, now
        more = f" ({count - 1} more since the last report)" if count > 1 else ""
        log.warning("tensorspark: %s; the directory dropped the connection%s", why, more)

    def _answer_lookup(self, ch: Channel, payload: bytes) -> None:
        r = Reader(payload, "LOOKUP")
        wait = r.u32() / 1000.0
        r.end()
        try:
            generation, addrs = self.addresses(wait)
        except PSTimeoutError as e:
            ch.send(ERROR, bytes(Writer().u16(1).text(str(e)).buf))
        except TensorSparkError as e:
            ch.send(ERROR, bytes(Writer().u16(2).text(str(e)).buf))
        else:
            ch.send(ADDRESSES, encode_addresses(generation, addrs))

    def fail(self, message: str) -> None:
        """Fail the run's shards: every lookup (and so every task) raises ``message``."""
        with self._cv:
            if self.error is None:
                self.error = TensorSparkError(message)
                log.error("tensorspark: %s", message)
            self._cv.notify_all()

    # -- shutdown ------------------------------------------------------------------------

    def close(self, timeout: float = 120.0) -> None:
        """Stop every shard (each writes its final snapshot) and end the job."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            self._listener.close()
        if not self._job_done.wait(timeout):
            log.warning("tensorspark: shards did not stop within %g s; cancelling them", timeout)
            with contextlib.suppress(Exception):
                self.cluster.cancel(self.group)
            self._job_done.wait(30.0)
        self.on_ready = None  # the run it calls back into is over


class _ShardSession:
    """The directory's side of one shard task's connection (its own thread)."""

    def __init__(self, host: ShardHost, ch: Channel, claim: bytes, peer: Any) -> None:
        r = Reader(claim, "CLAIM")
        self.index, self.attempt, self.instance = r.u32(), r.u32(), r.raw(16).hex()
        r.end()
        self.host, self.ch, self.peer = host, ch, peer[0]
        self.last_beat = time.monotonic()

    def run(self) -> None:
        host, i = self.host, self.index
        if i >= len(host._shards):
            self.ch.send(ERROR, bytes(Writer().u16(2).text(f"no shard {i}").buf))
            return
        slot = host._shards[i]
        owner = False
        try:
            with host._cv:
                if slot.owner is None and not slot.standbys:
                    slot.owner, owner = self, True
                else:
                    slot.standbys.append(self)
            if not owner:
                self.ch.send(
                    STANDBY,
                    bytes(
                        Writer()
                        .text(
                            f"shard {i} is served by task attempt {slot.attempt}; this copy "
                            f"(attempt {self.attempt}) waits as its standby"
                        )
                        .buf
                    ),
                )
                log.warning(
                    "tensorspark: a second task (attempt %d, %s) claimed shard %d; it waits as "
                    "a standby without a server",
                    self.attempt,
                    self.peer,
                    i,
                )
                if not self._wait_promotion(slot):
                    return
            self._own(slot)
        finally:
            with host._cv:
                if self in slot.standbys:
                    slot.standbys.remove(self)
                if slot.owner is self:
                    slot.owner = None
                    if slot.address is not None:
                        slot.address = None
                        host.generation += 1
                host._cv.notify_all()

    def _beats(self) -> bool:
        """Read the shard's frames for up to a second; False once it went quiet too long."""
        got = self.ch.recv(BEAT_INTERVAL_S, f"shard {self.index}'s heartbeat")
        now = time.monotonic()
        if got is not None:
            kind, payload = got
            if kind == FAILED:
                r = Reader(payload, "FAILED")
                raise TensorSparkError(f"shard {self.index} failed to start: {r.text()}")
            if kind != BEAT:
                raise ProtocolError(f"shard directory: unexpected frame type {kind} from a shard")
            self.last_beat = now
        return now - self.last_beat < self.host.heartbeat_timeout

    def _wait_promotion(self, slot: _Shard) -> bool:
        host = self.host
        while True:
            with host._cv:
                if host._closing:
                    self._stop()
                    return False
                if slot.owner is None and slot.standbys and slot.standbys[0] is self:
                    slot.standbys.pop(0)
                    slot.owner = self
                    return True
            if not self._beats():
                return False

    def _own(self, slot: _Shard) -> None:
        host, i = self.host, self.index
        with host._cv:
            first = slot.starts == 0
            slot.starts += 1
            slot.attempt = self.attempt
        resume = ""
        if first and host.resume_from:
            resume = host.resume_from[i]
        elif not first and host.config.snapshot_root:
            resume = os.path.join(host.config.snapshot_root, f"shard-{i}")
        self.ch.send(GRANT, bytes(Writer().text(resume).buf))
        deadline = time.monotonic() + 600.0  # a resume reads the whole shard
        while True:
            got = self.ch.recv(max(0.1, deadline - time.monotonic()), f"shard {i}'s READY")
            if got is None:
                raise PSTimeoutError(f"shard {i} did not start its server within 600 s")
            kind, payload = got
            if kind == BEAT:
                continue
            if kind == FAILED:
                raise TensorSparkError(
                    f"shard {i} failed to start: {Reader(payload, 'FAILED').text()}"
                )
            if kind != READY:
                raise ProtocolError(f"shard directory: expected READY from shard {i}, got {kind}")
            break
        r = Reader(payload, "READY")
        port, h, fp = r.u16(), r.text(), r.text()
        r.end()
        address = Address(h, port, fp)
        if host.on_ready is not None:
            host.on_ready(i, address, first)  # e.g. the run's consistency mode, before workers
        with host._cv:
            slot.address = address
            host.generation += 1
            host._cv.notify_all()
        restored = "" if first else f", restored from {resume or 'nothing (no checkpoint_dir)'}"
        # On stderr, as the status page's address: a run's servers are worth a line.
        print(
            f"tensorspark: parameter-server shard {i} serving at {h}:{port} "
            f"(task attempt {self.attempt}){restored}",
            file=sys.stderr,
            flush=True,
        )
        self.last_beat = time.monotonic()
        while True:
            with host._cv:
                closing = host._closing
            if closing:
                self._stop()
                return
            try:
                alive = self._beats()
            except PSConnectionError as e:
                self._lost(slot, str(e))
                return
            if not alive:
                self._lost(slot, f"no heartbeat for {host.heartbeat_timeout:g} s")
                return

    def _lost(self, slot: _Shard, why: str) -> None:
        slot.lost += 1
        where = self.host.config.snapshot_root
        log.warning(
            "tensorspark: parameter-server shard %d (task attempt %d on %s) lost: %s. Spark "
            "reruns its task; it comes back from %s",
            self.index,
            self.attempt,
            self.peer,
            why,
            f"its newest snapshot in {os.path.join(where, f'shard-{self.index}')}"
            if where
            else "nothing: without checkpoint_dir its part of the model is lost",
        )

    def _stop(self) -> None:
        with contextlib.suppress(TensorSparkError, OSError):
            self.ch.send(STOP)
            deadline = time.monotonic() + 300.0  # the final snapshot
            while time.monotonic() < deadline:
                got = self.ch.recv(1.0, f"shard {self.index}'s STOPPED")
                if got is not None and got[0] == STOPPED:
                    return


# -- task side -------------------------------------------------------------------


class _RddTask:
    """The shard task of the classic job (picklable; runs :func:`serve`)."""

    def __init__(self, cfg: ShardConfig) -> None:
        self.cfg = cfg

    def __call__(self, rows: Iterator[int]) -> Iterator[tuple[int, int]]:
        from . import spark

        index, _, _ = spark.task_identity()
        yield serve(self.cfg, index)


class _ArrowTask:
    """The shard task under Spark Connect (``mapInArrow``)."""

    def __init__(self, cfg: ShardConfig) -> None:
        self.cfg = cfg

    def __call__(self, batches: Any) -> Any:
        import pyarrow as pa

        from . import spark

        for _ in batches:
            pass
        index, _, _ = spark.task_identity()
        shard, version = serve(self.cfg, index)
        yield pa.RecordBatch.from_pydict({"shard": [shard], "version": [version]})


def serve(cfg: ShardConfig, index: int) -> tuple[int, int]:
    """Serve shard ``index`` until the driver stops it; (index, final version).

    Raises when the directory connection ends without a stop (the driver
    ended, or declared this shard lost): the server is stopped first, so a
    replacement never shares the shard with it, and the failed task lets
    Spark run the shard again.
    """
    from ..ps import ParameterServer
    from . import spark

    _, _, attempt = spark.task_identity()
    ch = open_channel(cfg.directory, cfg.secret, cfg.connect_timeout)
    parent = os.getppid()
    try:
        ch.send(CLAIM, bytes(Writer().u32(index).u32(attempt).raw(secrets.token_bytes(16)).buf))
        try:
            resume = _wait_grant(ch, index, parent)
        except _Standby:
            return index, 0  # a standby the run ended before it was needed
        snapshot_dir = (
            os.path.join(cfg.snapshot_root, f"shard-{index}") if cfg.snapshot_root else None
        )
        if resume and not _holds_snapshot(resume):
            resume = ""  # lost before its first snapshot: starts empty (the driver checks)
        try:
            server = ParameterServer(
                cfg.secret,
                host="0.0.0.0",
                port=0,
                io_timeout=cfg.io_timeout,
                update_threads=cfg.threads,
                snapshot_dir=snapshot_dir,
                snapshot_every_s=cfg.snapshot_every_s if snapshot_dir else 0,
                snapshot_every_versions=cfg.snapshot_every_versions if snapshot_dir else 0,
                snapshot_keep=cfg.snapshot_keep,
                resume_from=resume or None,
                tls=cfg.tls,
            )
        except TensorSparkError as e:
            ch.send(FAILED, bytes(Writer().text(str(e)).buf))
            raise
        try:
            host = ch.sock.getsockname()[0]  # this machine on the route the driver takes
            ch.send(
                READY,
                bytes(Writer().u16(server.port).text(host).text(server.tls_fingerprint or "").buf),
            )
            last = time.monotonic()
            while True:
                got = ch.recv(0.5, "the driver's STOP")
                if got is not None and got[0] == STOP:
                    version = server.version
                    server.stop()  # the final snapshot
                    ch.send(STOPPED, bytes(Writer().u64(version).buf))
                    return index, version
                if os.getppid() != parent:
                    raise PSConnectionError(
                        f"shard {index}: the Spark executor running this task is gone"
                    )
                if time.monotonic() - last >= BEAT_INTERVAL_S:
                    ch.send(BEAT)
                    last = time.monotonic()
        finally:
            server.stop()
    except PSConnectionError as e:
        raise PSConnectionError(
            f"parameter-server shard {index} stopped: {e}. The driver ended or counted this "
            "shard lost; Spark runs it again where it can"
        ) from e
    finally:
        ch.close()


def _wait_grant(ch: Channel, index: int, parent: int) -> str:
    """Wait for the driver's GRANT (a standby heartbeats meanwhile); the path to resume from."""
    last = 0.0
    while True:
        got = ch.recv(0.5, "the driver's GRANT")
        if got is not None:
            kind, payload = got
            r = Reader(payload, "GRANT")
            if kind == GRANT:
                resume = r.text()
                r.end()
                return resume
            if kind == STOP:
                raise _Standby()
            if kind == ERROR:
                r.u16()
                raise TensorSparkValueError(r.text())
            if kind != STANDBY:
                raise ProtocolError(f"shard directory: unexpected frame type {kind} before GRANT")
        if os.getppid() != parent:
            raise PSConnectionError(f"shard {index}: the Spark executor running this task is gone")
        if time.monotonic() - last >= BEAT_INTERVAL_S:
            ch.send(BEAT)
            last = time.monotonic()


class _Standby(Exception):  # noqa: N818 - control flow, not an error
    """A standby told to stop: it never served."""


def _holds_snapshot(path: str) -> bool:
    """True for a snapshot file, or a directory holding one."""
    if os.path.isfile(path):
        return True
    with contextlib.suppress(OSError):
        return any(n.startswith("snapshot-") and n.endswith(".tsnap") for n in os.listdir(path))
    return False


_TAGGED = re.compile(r"^snapshot-(\d+)-tag-(\d+)\.tsnap$")


def common_snapshot(root: str, count: int, prefix: int) -> tuple[list[str], int]:
    """Per shard, the file of the newest tag every shard of ``root`` holds; that tag.

    ``root`` is an earlier sharded run's ``run-<id>`` directory; only tags
    whose upper 32 bits are ``prefix`` (the run's name) count. Read on the
    driver, which must reach the directory too.
    """
    per_shard: list[dict[int, tuple[int, str]]] = []
    for i in range(count):
        d = os.path.join(root, f"shard-{i}")
        try:
            names = os.listdir(d)
        except OSError as e:
            raise TensorSparkValueError(
                f"resume_from={root!r}: cannot read {d} ({e.strerror}); give the run-<id> "
                "directory of an earlier run with the same ps_shards, reachable from the driver"
            ) from e
        tags: dict[int, tuple[int, str]] = {}
        for n in names:
            m = _TAGGED.match(n)
            if m and int(m[2]) >> 32 == prefix >> 32:
                version, tag = int(m[1]), int(m[2])
                if version >= tags.get(tag, (-1, ""))[0]:
                    tags[tag] = (version, os.path.join(d, n))
        per_shard.append(tags)
    if os.path.isdir(os.path.join(root, f"shard-{count}")):
        raise TensorSparkValueError(
            f"resume_from={root!r} was written by more than ps_shards={count} shards; resume "
            "with the ps_shards of that run"
        )
    common = set.intersection(*(set(t) for t in per_shard))
    if not common:
        held = "; ".join(
            f"shard {i}: {sorted(t & 0xFFFFFFFF for t in tags) or 'none'}"
            for i, tags in enumerate(per_shard)
        )
        raise TensorSparkValueError(
            f"resume_from={root!r}: its shards hold no epoch snapshot of this run's name that "
            f"they all have (epochs per shard: {held}); resume with the same name, after at "
            "least one completed epoch"
        )
    tag = max(common, key=lambda t: t & 0xFFFFFFFF)
    return [tags[tag][1] for tags in per_shard], tag & 0xFFFFFFFF


def check_slots(cluster: Any, shards: int, wait: float) -> None:
    """Fail early unless the cluster has a task slot per shard plus one for training.

    Executors of a fresh application register over a few seconds, so this
    waits up to ``wait`` seconds for enough slots. Under Spark Connect (the
    client cannot count them) and with dynamic allocation (executors are
    requested once tasks wait) it checks nothing; the wait for the shards
    then says what is missing.
    """
    if cluster.connect:
        return
    if (cluster.conf("spark.dynamicAllocation.enabled", "false") or "").lower() == "true":
        return  # executors come when tasks wait for them: the shard job asks for its own
    sc = cluster.sc
    jsc = sc._jsc.sc()
    rp = jsc.resourceProfileManager().defaultResourceProfile()
    need = shards + 1
    deadline = time.monotonic() + wait
    while True:
        slots = int(jsc.maxNumConcurrentTasks(rp))
        if slots >= need or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if slots < need:
        cpus = cluster.conf("spark.task.cpus", "1")
        raise TensorSparkValueError(
            f"ps_shards={shards} needs at least {need} task slots: each shard holds one for the "
            f"whole run and training needs one more, but the cluster has {slots} "
            f"(executor cores / spark.task.cpus={cpus}). Add executors or cores, or lower "
            "ps_shards"
        )
