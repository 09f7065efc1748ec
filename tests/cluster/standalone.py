"""A real Spark standalone cluster for tests: one Master, N Workers, spark-submit.

The Master and Workers are the JVM daemons of the installed PySpark, started
with ``spark-class org.apache.spark.deploy.master.Master`` and
``...deploy.worker.Worker``. When running as root where ``ip netns`` works,
each Worker lives in its own network namespace with its own address on a
private /24, joined to the root namespace by a veth pair on a bridge; the
driver (and the parameter server inside it) then listens on the bridge's
address, so executors reach it over a real network interface, not loopback.
Otherwise everything runs on 127.0.0.1, and :class:`StandaloneCluster` says
so.

Everything it creates (processes, namespaces, veth pairs, the bridge) is
removed by :meth:`StandaloneCluster.stop`, which also runs when
:meth:`StandaloneCluster.start` fails half way and at interpreter exit.
Leftovers of a run that was killed outright are swept at the next start:
their names carry the creating process id.

Run it by hand to get a cluster to play with::

    .venv/bin/python tests/cluster/standalone.py      # Ctrl-C stops it
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"
# Names carry the creating process's id so that a later run can tell its own
# live resources from the leftovers of a run that was SIGKILLed.
_NETNS_PREFIX = "tscluster-"
_NETNS_RE = re.compile(rf"^{_NETNS_PREFIX}(\d+)-(?:w\d+|probe)$")
_BRIDGE_RE = re.compile(r"^tsb(\d+)$")
_SUBNET_BASE = "10.213"
_TMP_PREFIX = "tensorspark-cluster-"
_TMP_RE = re.compile(rf"^{_TMP_PREFIX}(\d+)-")
# Set in the environment of every daemon and driver the cluster starts (and
# so inherited by executors and Python workers): the owner's pid.
OWNER_ENV = "TENSORSPARK_TEST_CLUSTER_OWNER"


class ClusterError(RuntimeError):
    """The cluster could not be started or did not behave."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.5,
    on_timeout: Callable[[], str] | None = None,
    retry_on: tuple[type[BaseException], ...] = (OSError, ValueError),
) -> T:
    """Poll ``predicate`` until it returns something truthy.

    Parameters
    ----------
    predicate : callable
        Returns the awaited value, or a falsy value to keep waiting.
    timeout : float
        Seconds to wait in all.
    what : str
        What is awaited, for the error message.
    interval : float
        Seconds between polls.
    on_timeout : callable, optional
        Extra text for the error (log tails, state seen last).
    retry_on : tuple of exception classes
        Exceptions of ``predicate`` that mean "not yet" (a daemon whose
        port is not open yet, a half-written JSON answer); others propagate.

    Returns
    -------
    object
        The first truthy value ``predicate`` returned.

    Raises
    ------
    TimeoutError
        Nothing truthy came within ``timeout``; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except retry_on as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            extra = on_timeout() if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}{extra}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when it is missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, then theirs)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def kill_pids(pids: Iterable[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace`` seconds."""
    pids = [p for p in set(pids) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return


def netns_supported() -> tuple[bool, str]:
    """Whether this process can create network namespaces, and if not, why."""
    if os.geteuid() != 0:
        return False, "not running as root"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is missing"
    probe = f"{_NETNS_PREFIX}{os.getpid()}-probe"
    try:
        r = _run(["ip", "netns", "add", probe], check=False)
        if r.returncode != 0:
            return False, f"`ip netns add` failed: {r.stderr.strip()}"
        r = _run(["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"], check=False)
        if r.returncode != 0:
            return False, f"`ip netns exec` failed: {r.stderr.strip()}"
        probe_veth = f"tsp{os.getpid()}"
        _run(["ip", "link", "add", probe_veth, "type", "veth", "peer", "name", probe_veth + "p"])
        _run(["ip", "link", "del", probe_veth], check=False)
        return True, ""
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"`ip` failed: {e}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def _owner(pid: int) -> int | None:
    """The cluster owner recorded in the environment of ``pid``, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    key = OWNER_ENV.encode() + b"="
    for item in env:
        if item.startswith(key):
            with contextlib.suppress(ValueError):
                return int(item[len(key) :])
    return None


def sweep_leftovers() -> None:
    """Kill processes and delete namespaces and bridges of dead earlier runs.

    Only what carries an owner's pid (:data:`OWNER_ENV`, or the names of
    namespaces, bridges and temporary directories) is touched, and only when
    that owner is no longer alive.
    """
    stale = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            owner = _owner(int(entry))
            if owner is not None and owner != os.getpid() and not _pid_alive(owner):
                stale.append(int(entry))
    kill_pids(stale)
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{_TMP_PREFIX}*"):
        m = _TMP_RE.match(d.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return
    names = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
    for line in names:
        name = line.split(" ")[0]
        m = _NETNS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns(name)
    links = _run(["ip", "-o", "link", "show", "type", "bridge"], check=False).stdout
    for line in links.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        m = _BRIDGE_RE.match(dev)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "link", "del", dev], check=False)


def _delete_netns(name: str) -> None:
    """Kill every process inside namespace ``name``, then delete it."""
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    kill_pids(int(p) for p in pids if p.isdigit())
    # Deleting the namespace destroys its end of each veth pair, and with it
    # the peer end in the root namespace.
    _run(["ip", "netns", "del", name], check=False)


@dataclass
class NetnsNetwork:
    """A bridge in the root namespace and one namespace per worker, on a /24.

    The bridge holds ``<prefix>.1`` (the driver's and the Master's address);
    worker ``i`` gets ``<prefix>.(11 + i)`` on a veth pair whose other end
    is a port of the bridge.
    """

    workers: int
    tag: str = field(default_factory=lambda: str(os.getpid()))
    prefix: str = ""
    namespaces: list[str] = field(default_factory=list)
    _created_bridge: bool = False

    @property
    def bridge(self) -> str:
        return f"tsb{self.tag}"

    @property
    def host_address(self) -> str:
        return f"{self.prefix}.1"

    def worker_address(self, i: int) -> str:
        return f"{self.prefix}.{11 + i}"

    def _pick_prefix(self) -> str:
        """The first 10.213.X.0/24 that no interface of this machine uses."""
        used = _run(["ip", "-4", "-o", "addr"], check=False).stdout
        for x in range(256):
            p = f"{_SUBNET_BASE}.{x}"
            if f" {p}." not in used:
                return p
        raise ClusterError(f"no free {_SUBNET_BASE}.X.0/24 subnet for the cluster's network")

    def setup(self) -> None:
        """Create the bridge, namespaces and veth pairs (undone by teardown)."""
        self.prefix = self.prefix or self._pick_prefix()
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._created_bridge = True
            _run(["ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i in range(self.workers):
                ns = f"{_NETNS_PREFIX}{self.tag}-w{i}"
                host_end, ns_end = f"tsv{self.tag}h{i}", f"tsv{self.tag}n{i}"
                _run(["ip", "netns", "add", ns])
                self.namespaces.append(ns)
                _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end])
                _run(["ip", "link", "set", ns_end, "netns", ns])
                _run(["ip", "link", "set", host_end, "master", self.bridge])
                _run(["ip", "link", "set", host_end, "up"])
                in_ns = ["ip", "netns", "exec", ns, "ip"]
                _run([*in_ns, "addr", "add", f"{self.worker_address(i)}/24", "dev", ns_end])
                _run([*in_ns, "link", "set", ns_end, "up"])
                _run([*in_ns, "link", "set", "lo", "up"])
        except subprocess.CalledProcessError as e:
            self.teardown()
            raise ClusterError(
                f"network setup failed at `{' '.join(e.cmd)}`: {e.stderr.strip()}"
            ) from e
        # Each namespace must reach the bridge's address (driver, Master) and
        # the other namespaces (shuffle between executors) before a Worker
        # starts; a firewall on bridged traffic (br_netfilter with a DROP
        # FORWARD policy, as Docker hosts have) would stop the latter.
        for i, ns in enumerate(self.namespaces):
            targets = [self.host_address]
            targets += [self.worker_address(j) for j in range(self.workers) if j != i]
            for target in targets:
                try:
                    wait_for(
                        lambda ns=ns, target=target: self._reaches(ns, target),
                        20,
                        f"worker namespace {i} ({ns}) to reach {target}",
                    )
                except TimeoutError as e:
                    self.teardown()
                    raise ClusterError(str(e)) from e

    @staticmethod
    def _reaches(ns: str, address: str) -> bool:
        probe = ["ip", "netns", "exec", ns, sys.executable, "-c", _CONNECT_PROBE, address]
        return _run(probe, check=False).returncode == 0

    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside worker ``i``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def pids(self) -> list[int]:
        """Every process inside the workers' namespaces."""
        out: list[int] = []
        for ns in self.namespaces:
            r = _run(["ip", "netns", "pids", ns], check=False)
            out.extend(int(p) for p in r.stdout.split() if p.isdigit())
        return out

    def teardown(self) -> None:
        """Kill what runs in the namespaces; delete namespaces, veths and bridge."""
        for ns in self.namespaces:
            _delete_netns(ns)
        self.namespaces.clear()
        if self._created_bridge:
            _run(["ip", "link", "del", self.bridge], check=False)
            self._created_bridge = False


# Whether a namespace routes to an address: a TCP connect to a closed port
# there is refused (routed) rather than unreachable.
_CONNECT_PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    sys.exit(0)
except OSError:
    sys.exit(1)
"""


@dataclass
class Worker:
    """One Worker daemon: its address, web UI, process and log."""

    index: int
    host: str
    webui_port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def webui(self) -> str:
        return f"http://{self.host}:{self.webui_port}"

    def executor_pids(self) -> list[int]:
        """Executor JVMs (``CoarseGrainedExecutorBackend``) this Worker launched."""
        pids = []
        for p in descendants(self.process.pid):
            argv = cmdline(p)
            if argv and EXECUTOR_CLASS in argv and os.path.basename(argv[0]) == "java":
                pids.append(p)
        return pids


def spark_home() -> Path:
    """The Spark distribution inside the installed PySpark package."""
    import pyspark

    home = Path(pyspark.__file__).parent
    if not (home / "bin" / "spark-class").exists():
        raise ClusterError(f"{home}/bin/spark-class is missing: is PySpark installed fully?")
    return home


class StandaloneCluster:
    """A Spark standalone Master and Workers, on namespaces or on loopback.

    Parameters
    ----------
    workers : int
        Number of Worker daemons.
    cores, memory : int, str
        What each Worker offers (``--cores``, ``--memory``).
    base_dir : path, optional
        Where the work dirs, local dirs and logs go; a new temporary
        directory when None (removed by :meth:`stop` when it made it).
    isolate : bool, optional
        True requires network namespaces, False never uses them, None (the
        default) uses them where they work and falls back to loopback,
        printing why.
    python : str
        The interpreter of the driver and of Spark's Python workers.
    start_timeout : float
        Seconds allowed for the Master and each Worker to come up.
    gpus : list of list of str, optional
        Per Worker, the GPU addresses it declares (``spark.worker.resource.gpu``)
        through a discovery script that reports them: made up, so that
        Spark's GPU scheduling runs on machines without GPUs.

    Examples
    --------
    >>> with StandaloneCluster(workers=2) as cluster:  # doctest: +SKIP
    ...     sub = cluster.submit(
    ...         "examples/fashion_mnist_seed.py", ["--master", cluster.master_url]
    ...     )
    ...     assert sub.wait() == 0, sub.output
    """

    def __init__(
        self,
        workers: int = 2,
        cores: int = 1,
        memory: str = "3g",
        base_dir: str | os.PathLike[str] | None = None,
        isolate: bool | None = None,
        python: str = sys.executable,
        start_timeout: float = 120.0,
        gpus: list[list[str]] | None = None,
    ) -> None:
        self.num_workers, self.cores, self.memory = workers, cores, memory
        self.gpus = gpus
        self.python, self.start_timeout = python, start_timeout
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
        self.isolate = isolate
        self.network: NetnsNetwork | None = None
        self.fallback_reason = ""
        self.host = "127.0.0.1"
        self.master: subprocess.Popen[bytes] | None = None
        self.master_port = self.master_webui_port = 0
        self.workers: list[Worker] = []
        self._spark_home = spark_home()
        self._stopped = True

    # -- addresses -----------------------------------------------------------

    @property
    def isolated(self) -> bool:
        """True when the Workers run in their own network namespaces."""
        return self.network is not None

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.master_port}"

    @property
    def master_webui(self) -> str:
        return f"http://{self.host}:{self.master_webui_port}"

    @property
    def driver_host(self) -> str:
        """The address a driver must bind and advertise (bridge or loopback)."""
        return self.host

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StandaloneCluster:
        """Set up the network, start the Master and Workers, wait until all are ALIVE."""
        self._stopped = False
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        sweep_leftovers()
        for d in ("logs", "work", "local"):
            (self.base_dir / d).mkdir(parents=True, exist_ok=True)
        ok, why = netns_supported() if self.isolate is not False else (False, "turned off")
        if ok:
            network = NetnsNetwork(self.num_workers)
            try:
                network.setup()
                self.network, self.host = network, network.host_address
            except ClusterError as e:
                why = str(e)
        if self.network is None:
            if self.isolate:
                raise ClusterError(f"network namespaces were required but {why}")
            self.fallback_reason = why
            print(
                f"tensorspark cluster: network namespaces unavailable ({why}); "
                "falling back to loopback: Master, Workers and driver on 127.0.0.1",
                flush=True,
            )
        self.master_port = free_port(self.host)
        self.master_webui_port = free_port(self.host)
        self.master = self._spawn(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                self.host,
                "--port",
                str(self.master_port),
                "--webui-port",
                str(self.master_webui_port),
            ],
            prefix=[],
            local_ip=self.host,
        )
        wait_for(
            lambda: self._master_state() is not None,
            self.start_timeout,
            f"the Spark Master's web UI at {self.master_webui}/json",
            on_timeout=lambda: self._logs_hint("master"),
        )
        for i in range(self.num_workers):
            host = self.network.worker_address(i) if self.network else "127.0.0.1"
            # Each namespace has its own ports; on loopback they must differ.
            webui_port = 8081 if self.network else free_port(host)
            name = f"worker{i}"
            work_dir, local_dir = self.base_dir / "work" / name, self.base_dir / "local" / name
            work_dir.mkdir(exist_ok=True)
            local_dir.mkdir(exist_ok=True)
            extra_env = {"SPARK_LOCAL_DIRS": str(local_dir), "SPARK_WORKER_DIR": str(work_dir)}
            if self.gpus:
                extra_env["SPARK_WORKER_OPTS"] = self._gpu_opts(i)
            proc = self._spawn(
                name,
                [
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    host,
                    "--cores",
                    str(self.cores),
                    "--memory",
                    self.memory,
                    "--work-dir",
                    str(work_dir),
                    "--webui-port",
                    str(webui_port),
                    self.master_url,
                ],
                prefix=self.network.exec_prefix(i) if self.network else [],
                local_ip=host,
                extra_env=extra_env,
            )
            self.workers.append(Worker(i, host, webui_port, proc, self.base_dir / "logs" / name))
        wait_for(
            lambda: self.alive_workers() >= self.num_workers,
            self.start_timeout,
            f"{self.num_workers} ALIVE workers at {self.master_webui}/json",
            interval=1.0,
            on_timeout=lambda: "".join(
                self._logs_hint(f"worker{i}") for i in range(len(self.workers))
            ),
        )

    def _gpu_opts(self, i: int) -> str:
        """Worker ``i``'s made-up GPUs: a discovery script that reports ``gpus[i]``."""
        addresses = self.gpus[i]
        script = self.base_dir / "conf" / f"gpus-worker{i}.sh"
        script.parent.mkdir(exist_ok=True)
        found = json.dumps({"name": "gpu", "addresses": addresses})
        script.write_text(f"#!/bin/sh\necho '{found}'\n")
        script.chmod(0o755)
        return (
            f"-Dspark.worker.resource.gpu.amount={len(addresses)} "
            f"-Dspark.worker.resource.gpu.discoveryScript={script}"
        )

    def _spawn(
        self,
        name: str,
        args: list[str],
        prefix: list[str],
        local_ip: str,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(self._spark_home),
            SPARK_LOCAL_IP=local_ip,
            SPARK_LOG_DIR=str(self.base_dir / "logs"),
            PYSPARK_PYTHON=self.python,
            TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            **{OWNER_ENV: str(os.getpid())},
            **(extra_env or {}),
        )
        # A conf dir of our own keeps a site's spark-env.sh/spark-defaults.conf out.
        conf_dir = self.base_dir / "conf"
        conf_dir.mkdir(exist_ok=True)
        env["SPARK_CONF_DIR"] = str(conf_dir)
        cmd = [*prefix, str(self._spark_home / "bin" / "spark-class"), *args]
        log = open(self.base_dir / "logs" / name, "wb")  # noqa: SIM115 - the child keeps it
        try:
            # A session of its own: a Ctrl-C in the terminal reaches only the
            # owner, which then stops everything in order.
            return subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            log.close()

    def stop(self) -> None:
        """Kill every process the cluster started and remove its network (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        pids: list[int] = []
        for w in self.workers:
            pids += [w.process.pid, *descendants(w.process.pid)]
        if self.master is not None:
            pids += [self.master.pid, *descendants(self.master.pid)]
        if self.network is not None:
            pids += self.network.pids()
        kill_pids(pids)
        for p in [w.process for w in self.workers] + ([self.master] if self.master else []):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        if self.network is not None:
            self.network.teardown()
        self.workers.clear()
        self.master = None
        atexit.unregister(self.stop)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- state ---------------------------------------------------------------

    def _master_state(self) -> dict[str, Any] | None:
        try:
            return http_json(f"{self.master_webui}/json")
        except (OSError, ValueError):
            return None

    def alive_workers(self) -> int:
        """How many Workers the Master lists as ALIVE."""
        state = self._master_state() or {}
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def _logs_hint(self, name: str) -> str:
        path = self.base_dir / "logs" / name
        return f"\n--- last lines of {path}:\n{tail(path)}"

    def executor_pids(self) -> dict[int, list[int]]:
        """Worker index -> pids of the executor JVMs it runs now."""
        return {w.index: w.executor_pids() for w in self.workers}

    # -- spark-submit --------------------------------------------------------

    def submit_args(self, conf: dict[str, str] | None = None) -> list[str]:
        """``spark-submit`` options for a client-mode driver in the root namespace.

        The driver binds and advertises :attr:`driver_host`, so executors in
        the namespaces reach its RPC, block manager and the parameter server
        over the bridge. ``conf`` entries are added (or override) as
        ``--conf key=value``.
        """
        settings = {
            "spark.driver.host": self.driver_host,
            "spark.driver.bindAddress": self.driver_host,
            "spark.ui.showConsoleProgress": "false",
            "spark.executor.memory": "1g",
            "spark.pyspark.python": self.python,
            "spark.pyspark.driver.python": self.python,
            "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": "2",
            "spark.local.dir": str(self.base_dir / "local" / "driver"),
        }
        settings.update(conf or {})
        args = ["--master", self.master_url, "--deploy-mode", "client"]
        for k, v in settings.items():
            args += ["--conf", f"{k}={v}"]
        return args

    def submit(
        self,
        script: str | os.PathLike[str],
        script_args: Iterable[str] = (),
        *,
        timeout: float = 600.0,
        driver_memory: str = "2g",
        conf: dict[str, str] | None = None,
        log_name: str | None = None,
    ) -> Submission:
        """Start ``spark-submit`` on ``script`` (client mode); see :class:`Submission`.

        Parameters
        ----------
        script : path
            The application's main Python file.
        script_args : iterable of str
            Its arguments.
        timeout : float
            Seconds :meth:`Submission.wait` allows.
        driver_memory : str
            ``--driver-memory`` (the driver JVM starts with it).
        conf : dict, optional
            Extra ``--conf`` settings.
        log_name : str, optional
            Name of the output file under ``<base_dir>/logs``.
        """
        cmd = [
            str(self._spark_home / "bin" / "spark-submit"),
            *self.submit_args(conf),
            "--driver-memory",
            driver_memory,
            str(script),
            *script_args,
        ]
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(self._spark_home),
            SPARK_CONF_DIR=str(self.base_dir / "conf"),
            SPARK_LOCAL_IP=self.driver_host,
            PYSPARK_PYTHON=self.python,
            PYSPARK_DRIVER_PYTHON=self.python,
            # Lines reach the log as printed, for tests that watch it.
            PYTHONUNBUFFERED="1",
            TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            **{OWNER_ENV: str(os.getpid())},
        )
        (self.base_dir / "local" / "driver").mkdir(parents=True, exist_ok=True)
        log = self.base_dir / "logs" / (log_name or f"submit-{Path(script).stem}-{time.time():.0f}")
        return Submission(cmd, env, log, timeout)


class Submission:
    """A running ``spark-submit``: its output log and its end.

    Parameters
    ----------
    cmd, env : list of str, dict
        The command line and environment.
    log : Path
        File that receives stdout and stderr together.
    timeout : float
        Seconds :meth:`wait` allows from the start.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
        self.cmd, self.log, self.timeout = cmd, log, timeout
        self.started = time.monotonic()
        with open(log, "wb") as f:
            self.process = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self) -> int:
        """Wait for the driver to exit; its exit status.

        Raises
        ------
        TimeoutError
            The driver ran past the timeout; it is killed, with its children.
        """
        remaining = self.timeout - (time.monotonic() - self.started)
        try:
            return self.process.wait(timeout=max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"timed out after {self.timeout:.0f} s waiting for spark-submit "
                f"{' '.join(self.cmd[-3:])} to finish\n--- last lines of {self.log}:\n"
                f"{tail(self.log)}"
            ) from None

    def kill(self) -> None:
        """Kill the driver and everything it started (idempotent)."""
        if self.process.poll() is None:
            kill_pids([self.process.pid, *descendants(self.process.pid)])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    """Start a cluster and keep it until Ctrl-C or SIGTERM (prints how to submit to it)."""
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = StandaloneCluster()
    cluster.start()
    where = "in network namespaces" if cluster.isolated else "on loopback"
    print(f"master {cluster.master_url} (web UI {cluster.master_webui}); workers {where}:")
    for w in cluster.workers:
        print(f"  worker {w.index} at {w.host}, web UI {w.webui}")
    # The example's own --master (default local[2]) would win over spark-submit's.
    print(
        "spark-submit " + " ".join(cluster.submit_args()) + " examples/fashion_mnist_seed.py"
        f" --master {cluster.master_url}",
        flush=True,
    )
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
