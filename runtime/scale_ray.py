"""The Ray side of ``classify --ray`` on the driver: connect, size the actor pool from the
cluster's nodes, and stream classified chunks back through a Ray Data pipeline:

    chunks (paths) -> prepare_chunk: decode + preprocess, CPU tasks (1 CPU each)
                   -> ChunkClassifier: an autoscaling actor pool, one onnxruntime session per
                      actor, ``threads`` CPUs each -> (chunk name, JSON rows) to the driver

Fault tolerance is Ray's: a task whose worker process dies is run again, an actor that dies is
restarted and its chunk retried, up to RETRIES times; a chunk that still fails (a decoder that
crashes the process on some file, a node out of memory) is left out rather than failing the
run, and the driver reports its files (``scale.lost_chunk_rows``).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data

from .contract import ModelContractError, Preprocessing
from .scale_workers import ChunkClassifier, prepare_chunk

RETRIES = 3  # runs of a chunk after the first whose worker process died (crash, out of memory, killed)
MAX_ACTOR_THREADS = 4  # onnxruntime threads per actor by default: half a node's CPUs, at most this
CONNECT_TIMEOUT_S = 10


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot run this job (one line)."""


@dataclass(frozen=True)
class Pool:
    """How the inference actors are sized on this cluster."""

    threads: int  # onnxruntime threads and CPUs per actor
    max_actors: int
    nodes: int
    cpus: int  # CPUs in the cluster


@contextmanager
def connected(address: str, log: Path) -> Iterator[None]:
    """Connect to the Ray cluster at ``address`` (Ray's own vocabulary: ``auto`` a running one,
    ``local`` a new one on this machine for this run, or ``HOST:PORT``) with Ray's messages sent
    to ``log`` (see ``ray_messages_to``); disconnect at the end."""
    check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # like onnxruntime's telemetry (session.py): off
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    with ray_messages_to(log):
        if ray.is_initialized():
            ray.shutdown()
        local = {"include_dashboard": False} if address == "local" else {}
        if address == "local" and not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
            # Ray 2.60 protects a new local cluster with a token, which it writes to ~/.ray/auth_token if it
            # finds none, where every later `ray start` on the machine picks it up: this one's token lives
            # in the run's environment (the local cluster's processes inherit it) and dies with it.
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, **local)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError: Ray's reasons, as one line
            raise ClusterError(f"cannot connect to the Ray cluster at '{address}' ({one_line(e)})") from None
        try:
            yield
        finally:
            ray.shutdown()


def check_reachable(address: str) -> None:
    """A HOST:PORT that accepts no connection is refused at once (Ray itself would retry for
    minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # 'auto', 'local', a ray:// client address: Ray's own checks
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at '{address}' ({e.strerror or e})") from None


@contextmanager
def ray_messages_to(log: Path) -> Iterator[None]:
    """Ray's native code writes warnings straight to file descriptor 2 (e.g. one per actor about
    its constructor's arguments), Ray Data logs there, and the driver prints the errors the
    raylets report (a retried task, a dead worker) on ``sys.stdout``: for the block, all of that
    goes to ``log``, while ``sys.stderr`` (progress, errors) stays on the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    terminal, table = sys.stderr, sys.stdout
    saved = os.dup(2)
    try:
        own = terminal.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test runner's)
        own = False
    messages = open(log, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    os.dup2(messages.fileno(), 2)
    sys.stdout = messages
    if own:
        sys.stderr = open(saved, "w", encoding=terminal.encoding, errors="backslashreplace", buffering=1,
                          closefd=False)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr, sys.stdout = terminal, table
        os.dup2(saved, 2)
        os.close(saved)
        messages.close()


def size_pool(threads: int) -> Pool:
    """``pool_for`` the CPUs of the cluster's live nodes."""
    return pool_for([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")], threads)


def pool_for(node_cpus: list[int], threads: int) -> Pool:
    """Actor threads: ``threads`` if given, else half the CPUs of the smallest node (at most
    MAX_ACTOR_THREADS); as many actors as fit the nodes while one CPU is left for decoding (an
    actor pool holding every CPU would wait forever for decoded files). ClusterError if the
    cluster is too small."""
    cpus = [c for c in node_cpus if c > 0]
    if not cpus:
        raise ClusterError("the Ray cluster has no CPUs (has a worker node joined? `ray status` lists them)")
    per_actor = threads or max(1, min(MAX_ACTOR_THREADS, min(cpus) // 2))
    if per_actor > max(cpus):
        raise ClusterError(f"--threads {per_actor}: no Ray node has that many CPUs (the largest has {max(cpus)})")
    if sum(cpus) < per_actor + 1:
        raise ClusterError(f"the Ray cluster has {sum(cpus)} CPU(s); classify needs {per_actor + 1}: "
                           f"{per_actor} for an inference actor of {per_actor} threads and 1 for decoding")
    most = min(sum(c // per_actor for c in cpus), (sum(cpus) - 1) // per_actor)
    return Pool(per_actor, most, len(cpus), sum(cpus))


def classified_chunks(chunks: list[tuple[str, list[str]]], spec: Preprocessing, max_pixels: int, pool: Pool,
                      model_args: dict[str, Any], sha256: str, batch_size: int,
                      heatmaps: tuple[str, str] | None) -> Iterator[tuple[str, str]]:
    """(chunk name, its rows as JSON lines) as each chunk is done, in no set order; a chunk may
    come twice (when Ray ran it twice) and a chunk that failed RETRIES + 1 times not at all."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a chunk that keeps killing its worker is reported, not fatal
    items = [{"chunk": name, "paths": [os.fsencode(p) for p in paths]} for name, paths in chunks]
    with warnings.catch_warnings():
        # Ray 2.60 deprecates max_retries / max_task_retries as keyword arguments without another way to
        # set them (pyproject pins ray below 2.64, which removes them); its defaults retry forever.
        warnings.simplefilter("ignore")
        data = ray.data.from_items(items, override_num_blocks=len(items))  # one chunk per task
        data = data.map(prepare_chunk, fn_kwargs={"spec": spec, "max_pixels": max_pixels}, num_cpus=1,
                        max_retries=RETRIES)
        data = data.map_batches(
            ChunkClassifier, batch_size=1, batch_format="numpy", num_cpus=pool.threads,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.max_actors),
            fn_constructor_kwargs={"model_args": model_args, "threads": pool.threads, "sha256": sha256,
                                   "batch_size": batch_size, "heatmaps": heatmaps},
            max_restarts=-1, max_task_retries=RETRIES)
    try:
        for row in data.iter_rows():
            yield str(row["chunk"]), str(row["rows"])
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as e:
        raise ClusterError(failure_reason(e)) from None


def failure_reason(error: BaseException) -> str:
    """One line for a failed Ray job: a model an actor could not use names its reason (Ray
    passes an actor's failed ``__init__`` on only as text: ``ActorDiedError`` keeps no cause)."""
    marker = f"{ModelContractError.__name__}: "
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ModelContractError):
            return f"a Ray actor cannot use the model: {str(e).strip()[:300]}"
        if marker in str(e):
            return f"a Ray actor cannot use the model: {str(e).rsplit(marker, 1)[1].strip().splitlines()[0][:300]}"
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return f"the Ray job failed ({one_line(error)})"


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]
