"""A Ray cluster on this machine made of separate ``ray start`` processes, a head node and worker
nodes, for the ``classify --ray`` tests and ``scale_bench``:

    with local_cluster(workers=1, cpus=1) as cluster:
        ... xray-edge classify DIR --ray cluster.address --output out.csv ...

Every node gets its own free ports and the cluster its own short temporary folder and its own
authentication token, so it never meets another Ray instance on the machine (``ray stop`` would
stop them all); a driver connects with ``cluster.env`` in its environment. ``stop`` kills exactly
the processes of this cluster: those started with its folder and their children.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

OBJECT_STORE_BYTES = 80 << 20  # per node: Ray's smallest is 75 MiB
START_TIMEOUT_S = 90


@dataclass
class LocalCluster:
    address: str  # HOST:PORT of the head's GCS
    folder: Path  # Ray's temporary folder for every node of this cluster
    env: dict[str, str]  # what a driver needs in its environment to connect (the token)
    client_port: int = 0  # the head's Ray Client server, the one process that does not name the folder
    nodes: int = 0
    logs: list[Path] = field(default_factory=list)

    def pids(self) -> list[int]:
        """Processes of this cluster: those whose command line names its folder (or is its Ray
        Client server), and their descendants (workers, actors, agents)."""
        parents: dict[int, int] = {}
        roots = set()
        marker = os.fsencode(str(self.folder))
        client = f"--port={self.client_port}\0".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
                if marker in command or (b"ray.util.client.server" in command and client in command):
                    roots.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        found = set(roots)
        grew = True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in found} - found
            found |= children
            grew = bool(children)
        return sorted(found - {os.getpid()})

    def stop(self) -> None:
        """Kill every process of this cluster and remove its folder."""
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that nothing listens on now (all held open until all are chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")


def _ray_start(cluster: LocalCluster, args: list[str], ports: dict[str, int], cpus: int, object_store: int) -> None:
    """``ray start`` one node (it returns once the node runs); RuntimeError with its output if not.
    One node at a time: a node started beside another can time out on a busy machine."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, f"--num-cpus={cpus}",
               f"--object-store-memory={object_store}", f"--temp-dir={cluster.folder}", "--disable-usage-stats",
               *(f"{option}={port}" for option, port in ports.items())]
    log = cluster.folder / f"node-{cluster.nodes}.log"
    cluster.logs.append(log)
    with open(log, "wb") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S,
                              env={**os.environ, **cluster.env, "RAY_USAGE_STATS_ENABLED": "0"})
    if done.returncode != 0:
        raise RuntimeError(f"ray start failed ({' '.join(command)}):\n{log.read_text(errors='replace')[-3000:]}")
    cluster.nodes += 1


@contextmanager
def local_cluster(workers: int = 1, cpus: int = 1, head_cpus: int = 1,
                  object_store: int = OBJECT_STORE_BYTES) -> Iterator[LocalCluster]:
    """A head node with ``head_cpus`` CPUs and ``workers`` worker nodes of ``cpus`` CPUs each,
    as separate processes; stopped (every process killed) when the block ends."""
    free = iter(free_ports(len(HEAD_PORTS) + len(NODE_PORTS) * (workers + 1)))
    head = {option: next(free) for option in HEAD_PORTS + NODE_PORTS}
    cluster = LocalCluster(f"127.0.0.1:{head['--port']}", Path(tempfile.mkdtemp(prefix="xr-ray-", dir="/tmp")),
                           {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
                           head["--ray-client-server-port"])
    try:
        _ray_start(cluster, ["--head", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             "--include-log-monitor=false"], head, head_cpus, object_store)
        for _ in range(workers):
            _ray_start(cluster, [f"--address={cluster.address}", "--node-ip-address=127.0.0.1",
                                 "--include-log-monitor=false"], {option: next(free) for option in NODE_PORTS},
                       cpus, object_store)
        yield cluster
    finally:
        cluster.stop()
