"""A multi-node Ray cluster on one machine, on loopback, for tests and local runs.

:class:`LocalRayCluster` starts a head with ``ray start --head --block`` and, on
request, more nodes with ``ray start --address=HEAD_IP:GCS_PORT --block``: every node
is a separate set of Ray processes (raylet, agents, workers) with its own node IP in
127.0.0.0/8 (the head 127.0.0.2, then 127.0.0.3, ...) and its own temporary directory,
as on separate machines, so a node can be lost without taking the rest down. Ports
are ones the OS reported free and the temporary directory is private and short, so
the cluster never collides with another Ray on the same machine; it is stopped by the
process ids it started, never with ``ray stop`` (which stops every Ray of the user,
other people's included). The dashboard and its Jobs API listen on 127.0.0.1.

Why not 127.0.0.1 for every node: Ray keeps a node on 127.0.0.1 only with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and with that ``ray start --address`` refuses
to join a node ("multi-node Ray clusters are not supported on Windows and OSX");
without it Ray rewrites 127.0.0.1 and ``localhost`` into the machine's external
address, but leaves other loopback addresses alone. Known limit: with a node IP other
than 127.0.0.1, Ray's gRPC servers (GCS, raylets, workers) bind all interfaces, though
everything connects over loopback; on a shared machine they are reachable from the
network for as long as the cluster runs (with authentication off).

Each node's ``ray start --block`` runs in its own session. Ray's daemons stay in that
process group, but the raylet gives each worker process a process group of its own
and a job's driver runs in a new session, so killing one group is not enough: a node
is stopped by killing every process that descends from its ``ray start`` (collected
before the first signal, as orphans are re-parented), its process group, and any
process left whose command line names the cluster's temporary directory.

The executables come from the virtual environment the caller runs in
(``sys.executable``'s directory), which is also put first on ``PATH`` of every node, so
a job's entrypoint finds that environment's ``ppray``.

Example::

    with LocalRayCluster(num_cpus=1) as cluster:
        worker = cluster.add_node(num_cpus=1, resources={"detector": 4})
        subprocess.run(
            cluster.ray_cli("job", "submit", "--address", cluster.dashboard_url,
                            "--", "ppray", "demo", "--config", "...", "--output", "..."),
            env=cluster.env, check=True,
        )
        cluster.kill_node(worker)     # abrupt node loss (SIGKILL)

Run one by hand (Ctrl-C stops it)::

    .venv/bin/python -m ppray.testing.raycluster --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LocalRayCluster", "RayNode", "free_ports", "venv_bin_dir"]

#: Where the dashboard (and so the Jobs API) listens.
DASHBOARD_HOST = "127.0.0.1"
#: The head's node IP; other nodes get 127.0.0.3, 127.0.0.4, ... (see add_node).
HEAD_IP = "127.0.0.2"

# What every Ray process of the cluster runs with. Token authentication is on by default
# in this Ray and would need a token in every client; a loopback-only cluster does not.
# The cluster flag must be on for nodes to join (see the module docstring on addresses).
_BASE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A raylet has 60 s to register with the GCS by default; a machine busy with other
    # work (two test workers, another Ray beside this one) took 72 s once.
    "RAY_raylet_start_wait_time_s": "240",
}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Inherited addresses would point the nodes' clients at some other cluster.
_DROPPED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_HEADERS")


def venv_bin_dir() -> Path:
    """The directory of the running interpreter: its virtual environment's ``bin``."""
    return Path(sys.executable).parent


def free_ports(n: int, host: str = "0.0.0.0") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago.

    The default, all interfaces, finds ports free on every address: Ray's gRPC servers
    bind all interfaces even when they advertise a loopback address.

    The sockets are held open together until all are chosen, so the ports differ.
    Another process can still take one before Ray binds it; the cluster then fails
    to start, loudly (:class:`RuntimeError`), rather than sharing a port.
    """
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind((host, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in ``/proc``."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name (field 2) may contain spaces and parentheses: split after it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> set[int]:
    tree = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _group_members(pgid: int) -> set[int]:
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ProcessLookupError):
                if os.getpgid(int(entry)) == pgid:
                    members.add(int(entry))
    return members


def _naming(text: str) -> dict[int, int]:
    """Processes whose command line contains ``text`` (the cluster's unique temp dir).

    Returns pid -> start time.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            started = _start_time(int(entry))
            if text.encode() in cmdline and started is not None:
                found[int(entry)] = started
    return found


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process.

    A pid and its start time name one process: a pid alone may have been reused.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])  # field 22 of proc(5); the list starts at field 3


def _kill(procs: Mapping[int, int], sig: int) -> None:
    """Signal each (pid, start time) that is still that same process."""
    for pid, started in procs.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies.

    A safety net for a caller killed before it could call :meth:`LocalRayCluster.stop`
    (SIGKILL, an OOM kill): ``ray start --block`` stops its node on SIGTERM. Linux only;
    the signal follows the death of the starting *thread*, so start clusters from a
    thread that outlives them (the main thread, in tests).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``started``, is still the process seen then)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if started is not None and int(fields[19]) != started:
        return False
    return fields[0] != "Z"  # a zombie is dead, only not yet reaped by its parent


@dataclass
class RayNode:
    """One node of a :class:`LocalRayCluster`: the ``ray start --block`` process and its ports.

    ``name`` is also the node's Ray node name (``node_name`` in the state API); ``ip`` its
    node IP (``127.0.0.2`` for the head, ``127.0.0.3``, ``127.0.0.4``, ... for the others).
    """

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    num_cpus: int
    resources: dict[str, float]
    ports: dict[str, int]
    ip: str
    is_head: bool = False
    killed: bool = False
    #: Every process of this node seen so far: pid -> start time.
    seen: dict[int, int] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        """Whether its ``ray start --block`` process is still running."""
        return not self.killed and self.process.poll() is None

    def processes(self) -> dict[int, int]:
        """This node's processes now (pid -> start time), also added to :attr:`seen`.

        ``ray start``, its descendants and its process group. Looked up only while
        ``ray start`` has not been reaped: until then its pid, which is also the
        group's id, cannot have been given to another process.
        """
        if self.process.returncode is not None:
            return {}
        pid = self.process.pid
        found = {pid} | _descendants(pid) | _group_members(pid)
        now = {p: t for p in found if (t := _start_time(p)) is not None}
        self.seen.update(now)
        return now

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of this node's ``ray start`` output (startup errors land here)."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


class LocalRayCluster:
    """A Ray head, and optionally more nodes, on loopback addresses with free ports.

    Parameters
    ----------
    num_cpus
        CPUs the head advertises.
    resources
        Custom resources of the head, e.g. ``{"head": 100}`` to pin actors there.
    object_store_mb
        Object store of each node; small, since several nodes share this machine.
    env
        Extra environment of every node's processes (and of the job drivers and actors
        they start), e.g. ``{"RAY_health_check_period_ms": "1000"}``.
    ready_timeout_s
        How long the head's dashboard and job API, and each added node, may take to
        come up.
    temp_root
        Where to create the cluster's temporary directory. Keep it short: Ray's Unix
        socket paths below it must stay under 108 characters.

    Notes
    -----
    Use it as a context manager, or call :meth:`start` and :meth:`stop` (in a
    ``finally``): every process it started is killed on exit, on failure too.
    """

    def __init__(
        self,
        num_cpus: int = 1,
        resources: Mapping[str, float] | None = None,
        *,
        object_store_mb: int = 128,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 90.0,
        temp_root: str = "/tmp",
    ) -> None:
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.object_store_mb = object_store_mb
        self.ready_timeout_s = ready_timeout_s
        self.bin_dir = venv_bin_dir()
        base = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        path = f"{self.bin_dir}{os.pathsep}{base.get('PATH', os.defpath)}"
        #: Environment of the cluster's processes; also what a client (``ray job
        #: submit``, ``ray status``) of this cluster should run with.
        self.env: dict[str, str] = {
            **base,
            **_BASE_ENV,
            **dict(env or {}),
            "PATH": path,
        }
        self._temp_root = temp_root
        self.temp_dir: Path | None = None
        self.head: RayNode | None = None
        #: The nodes added with :meth:`add_node`, killed ones included.
        self.nodes: list[RayNode] = []
        self._all_nodes: list[RayNode] = []  # the head too, kept after stop()
        self.gcs_port = 0
        self.dashboard_port = 0

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalRayCluster:
        """Start the head and wait until its dashboard and job API answer.

        Raises
        ------
        RuntimeError
            If the head exits or does not become ready within ``ready_timeout_s``
            (with the end of its output); nothing is left running then.
        """
        if self.head is not None:
            raise RuntimeError("cluster already started")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ppray-ray-", dir=self._temp_root))
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--dashboard-host={DASHBOARD_HOST}",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={client_port}",
        ]
        ports = {"gcs": self.gcs_port, "dashboard": self.dashboard_port, "client": client_port}
        try:
            self.head = self._launch("head", args, self.num_cpus, self.resources, ports, HEAD_IP)
            self.head.is_head = True
            self._wait(self._head_ready, self.head, "the dashboard and job API")
            self._wait(lambda: self._node_alive("head"), self.head, "the head node")
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(
        self,
        num_cpus: int = 1,
        resources: Mapping[str, float] | None = None,
        name: str | None = None,
        wait: bool = True,
    ) -> RayNode:
        """Join one more node to the cluster, with its own ports.

        Parameters
        ----------
        num_cpus
            CPUs the node advertises.
        resources
            Its custom resources, e.g. ``{"detector": 4}``.
        name
            Its Ray node name (default ``worker-N``).
        wait
            Wait until the cluster reports the node alive; with False, call
            :meth:`wait_for_node` later (nodes then start side by side).

        Returns
        -------
        RayNode
            The node, for :meth:`wait_for_node` and :meth:`kill_node`.
        """
        if self.head is None:
            raise RuntimeError("start the cluster first")
        name = name or f"worker-{len(self.nodes) + 1}"
        # Never reused: a node that replaces a lost one is a new machine.
        ip = f"127.0.0.{len(self.nodes) + 3}"
        role = [f"--address={self.address}"]
        node = self._launch(name, role, num_cpus, dict(resources or {}), {}, ip)
        self.nodes.append(node)
        if wait:
            self.wait_for_node(node)
        return node

    def wait_for_node(self, node: RayNode) -> None:
        """Wait until the cluster reports ``node`` alive.

        Raises
        ------
        RuntimeError
            If its ``ray start`` exits or the node is not alive within
            ``ready_timeout_s``; the node is killed then.
        """
        try:
            self._wait(lambda: self._node_alive(node.name), node, f"node {node.name}")
        except BaseException:
            self.kill_node(node)
            raise

    def kill_node(self, node: RayNode) -> None:
        """Kill a node abruptly (SIGKILL to all its processes), as if its machine died.

        The rest of the cluster learns of it through the GCS health checks
        (``RAY_health_check_*`` in ``env``), as it would of a lost machine.
        """
        # Everything at once from one snapshot, then again: a process forked meanwhile,
        # e.g. a worker the raylet was starting, is caught by the next round (the
        # killed `ray start` stays unreaped, so its group can still be looked up).
        for _ in range(3):
            procs = node.processes()
            if not any(_alive(p, t) for p, t in procs.items()):
                break
            _kill(procs, signal.SIGKILL)
            time.sleep(0.1)
        _kill(node.seen, signal.SIGKILL)
        node.killed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=5)

    def stop(self) -> None:
        """Kill every node (workers first) and remove the temporary directory.

        SIGKILL to a snapshot of each node's processes, as :meth:`kill_node`: in a
        graceful shutdown processes die in turn and their children are re-parented out
        of the tree before anyone saw them; a test cluster has nothing to save.
        """
        for node in [*self.nodes, *([self.head] if self.head else [])]:
            self.kill_node(node)
        if self.temp_dir is not None:
            # A process that lost its parent before any snapshot saw it, if any.
            _kill(_naming(str(self.temp_dir)), signal.SIGKILL)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.head = None
        self.nodes = []

    def leftover_pids(self) -> set[int]:
        """Processes this cluster started that are still alive (none after :meth:`stop`)."""
        procs: dict[int, int] = {}
        for node in self._all_nodes:
            procs.update(node.seen)
        if self.temp_dir is not None:
            procs.update(_naming(str(self.temp_dir)))
        return {p for p, t in procs.items() if _alive(p, t)}

    # -- addresses and queries --------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address, ``127.0.0.2:PORT`` (for ``ray start --address``, ``ray.init``)."""
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and Jobs API, ``http://127.0.0.1:PORT`` (for ``ray job submit``)."""
        return f"http://{DASHBOARD_HOST}:{self.dashboard_port}"

    def ray_cli(self, *args: str) -> list[str]:
        """A ``ray`` command line from this environment, e.g. ``ray_cli("job", "list")``."""
        return [str(self.bin_dir / "ray"), *args]

    def get_json(self, path: str, timeout_s: float = 10.0) -> Any:
        """GET ``path`` from the dashboard and decode its JSON."""
        with urllib.request.urlopen(f"{self.dashboard_url}{path}", timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def list_state(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        """Rows of the state API (``/api/v0/KIND``, e.g. ``nodes``, ``actors``).

        ``filters`` are equality filters, e.g. ``list_state("actors", state="ALIVE")``.
        """
        params = [("limit", "10000"), ("detail", "1")]
        for key, value in filters.items():
            params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        body = self.get_json(f"/api/v0/{kind}?{urllib.parse.urlencode(params)}")
        if not body.get("result", False):
            raise RuntimeError(f"state API {kind}: {body.get('msg')}")
        rows: list[dict[str, Any]] = body["data"]["result"]["result"]
        return rows

    def node_id(self, node: RayNode | str) -> str:
        """The Ray node id of a node (alive or dead), by its node name."""
        name = node if isinstance(node, str) else node.name
        ids = [n["node_id"] for n in self.list_state("nodes") if n.get("node_name") == name]
        if not ids:
            raise KeyError(f"no Ray node named {name}")
        # A name reused after a node died: the last one registered is the live one.
        return str(ids[-1])

    def alive_node_names(self) -> list[str]:
        """Node names the cluster currently reports ALIVE."""
        return sorted(n["node_name"] for n in self.list_state("nodes", state="ALIVE"))

    # -- internals --------------------------------------------------------------------

    def _launch(
        self,
        name: str,
        role_args: Sequence[str],
        num_cpus: int,
        resources: dict[str, float],
        ports: dict[str, int],
        ip: str,
    ) -> RayNode:
        assert self.temp_dir is not None
        names = ("agent_http", "agent_grpc", "metrics", "node_manager", "object_manager", "env")
        ports = {**ports, **dict(zip(names, free_ports(len(names)), strict=True))}
        args = [
            *self.ray_cli("start"),
            *role_args,
            "--block",
            f"--node-ip-address={ip}",
            f"--node-name={name}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self._node_temp_dir(ip)}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--runtime-env-agent-port={ports['env']}",
            # 0..0: each worker binds a port the OS picks, so there is no range to collide.
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        log_path = self.temp_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the caller's terminal does not reach it,
                # and its daemons share a process group we can kill.
                start_new_session=True,
                preexec_fn=_stop_with_parent,
            )
        node = RayNode(name, process, log_path, num_cpus, resources, ports, ip)
        self._all_nodes.append(node)
        return node

    def _node_temp_dir(self, ip: str) -> Path:
        """The head's temp dir is the cluster's; each other node gets one below it.

        Nodes sharing one session directory would each tail every node's worker logs
        (every line reaches a job's output once per node); separate ones are also what
        separate machines have. Short names: Ray's socket paths below must stay under
        108 characters.
        """
        assert self.temp_dir is not None
        if ip == HEAD_IP:
            return self.temp_dir
        path = self.temp_dir / f"n{ip.rsplit('.', 1)[1]}"
        path.mkdir(exist_ok=True)
        return path

    def _wait(self, ready: Any, node: RayNode, what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            node.processes()  # seen before poll() reaps a `ray start` that gave up
            if node.process.poll() is not None:
                raise RuntimeError(
                    f"ray start for {node.name} exited ({node.process.returncode}) "
                    f"before {what} was ready:\n{node.log_tail()}"
                )
            try:
                if ready():
                    return
            except (OSError, ValueError, KeyError, RuntimeError):
                pass  # not up yet
            time.sleep(0.5)
        raise RuntimeError(
            f"{what} not ready after {self.ready_timeout_s:.0f} s:\n{node.log_tail()}"
        )

    def _head_ready(self) -> bool:
        version = self.get_json("/api/version", timeout_s=2)
        # The job API is a separate dashboard module: it answers after /api/version does.
        jobs = self.get_json("/api/jobs/", timeout_s=2)
        return bool(version.get("ray_version")) and isinstance(jobs, list)

    def _node_alive(self, name: str) -> bool:
        return name in self.alive_node_names()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a local cluster until interrupted (``python -m ppray.testing.raycluster``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs of the head")
    parser.add_argument("--workers", type=int, default=0, help="worker nodes to add")
    parser.add_argument("--worker-cpus", type=int, default=1, help="CPUs of each worker")
    parser.add_argument(
        "--worker-resources", default="{}", help="custom resources of each worker, JSON"
    )
    args = parser.parse_args(argv)
    # `kill PID` stops the cluster as Ctrl-C does (through the with block's exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalRayCluster(num_cpus=args.num_cpus) as cluster:
        for _ in range(args.workers):
            cluster.add_node(args.worker_cpus, json.loads(args.worker_resources))
        print(f"GCS address:   {cluster.address}", flush=True)
        print(f"dashboard/API: {cluster.dashboard_url}", flush=True)
        print(f"nodes:         {', '.join(cluster.alive_node_names())}", flush=True)
        print(
            f"submit a job:  RAY_AUTH_MODE=disabled {cluster.bin_dir}/ray job submit "
            f"--address {cluster.dashboard_url} --working-dir . -- ppray demo "
            "--config configs/deployments/ray-job.yaml --output /tmp/ppray-job",
            flush=True,
        )
        print("Ctrl-C stops the cluster", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while cluster.head is not None and cluster.head.alive:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
