"""Throughput of ``classify --ray`` on local Ray clusters of 1 and 2 worker nodes against
``classify`` on one machine (what the engine costs), and the memory of each inference actor.

    python -m xray_edge.scale_bench FOLDER [--limit N] [--model FILE] [--nodes 1 2] [--cpus-per-node N]
                                           [--rounds 3] [--out scale-bench.json]

FOLDER holds the images (``--limit N``: its first N, named on the command line for the local run
and in a path list for the Ray runs). Each configuration runs the
whole command as a user would (interpreter start, model load, for Ray the connection and the
workers' start included): ``local`` is ``classify SOURCE`` with its defaults (every core), ``ray
xK`` is ``classify SOURCE --ray`` on a cluster of its own: a head node without CPUs (driver only)
and K worker nodes of ``--cpus-per-node`` CPUs each, separate ``ray start`` processes on this
machine. Rounds are interleaved (local, ray x1, ray x2, local, ...) and medians reported. Every
Ray run's rows are compared with the local run's (all columns but ``ms``). Memory: the peak
proportional set size (PSS, shared pages split between the processes sharing them) of each
inference actor process and of each decoding worker, sampled every 0.2 s.

On one machine the worker nodes share its cores: the figures give the engine's overhead, not a
cluster's scaling (docs/scale.md projects that).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .classify import find_images
from .scale_cluster import LocalCluster, local_cluster

ACTOR_TITLE = b"ray::MapWorker(MapBatches(ChunkClassifier))"
DECODER_TITLES = (b"ray::Map(prepare_chunk)", b"ray::IDLE")
SUMMARY = re.compile(r"failed in ([0-9.]+) s")


def classify_command(sources: list[str], output: Path, model: Path | None, address: str | None) -> list[str]:
    command = [sys.executable, "-c", "from xray_edge.cli import main; main()", "classify", *sources,
               "-o", str(output), "-q"]
    command += ["--model", str(model)] if model else []
    return command + (["--ray", address] if address else [])


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


def title(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0")
    except OSError:
        return b""


class MemorySampler:
    """Peak PSS per Ray worker process of a cluster while a run goes on."""

    def __init__(self, cluster: LocalCluster):
        self.cluster, self.peaks, self.kinds = cluster, {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            for pid in self.cluster.pids():
                name = title(pid)
                kind = "actor" if name.startswith(ACTOR_TITLE) else \
                    "decoder" if name.startswith(DECODER_TITLES) else None
                if kind:
                    self.kinds[pid] = kind
                    self.peaks[pid] = max(self.peaks.get(pid, 0), pss_kib(pid))

    def peak_mib(self, kind: str) -> list[float]:
        return sorted(self.peaks[pid] / 1024 for pid in self.peaks if self.kinds[pid] == kind)


def run(command: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """(wall seconds, classify's own seconds from its summary, stderr); exit 0 or 1 expected."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = SUMMARY.search(done.stdout)
    return wall, float(found.group(1)) if found else None, done.stderr


def rows_without_ms(path: Path) -> list[dict[str, Any]]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [{k: v for k, v in row.items() if k != "ms"} for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images")
    parser.add_argument("--limit", type=int, default=0, help="only the folder's first N images [default: all]")
    parser.add_argument("--model", type=Path, help="model file [default: the shipped model]")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="worker node counts [default: 1 2]")
    parser.add_argument("--cpus-per-node", type=int, default=0,
                        help="logical CPUs per worker node [default: this machine's cores / the largest node count, "
                             "at least 2]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported [default: 3]")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    per_node = args.cpus_per_node or max(2, cores // max(args.nodes))
    print(f"{cores} cores, load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds; worker nodes of "
          f"{per_node} CPUs", flush=True)
    times: dict[str, list[tuple[float, float | None]]] = {}
    memory: dict[str, dict[str, list[float]]] = {}
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="xray-edge-scale-bench-") as tmp, ExitStack() as clusters:
        local_sources, ray_sources = [str(args.folder)], [str(args.folder)]
        if args.limit:
            local_sources = find_images([args.folder])[0][:args.limit]
            listing = Path(tmp) / "files.txt"
            listing.write_bytes(b"".join(os.fsencode(f) + b"\n" for f in local_sources))
            ray_sources = [str(listing)]
        started = {k: clusters.enter_context(local_cluster(workers=k, cpus=per_node, head_cpus=0)) for k in args.nodes}
        for round_ in range(args.rounds):
            local_out = Path(tmp) / f"local-{round_}.csv"
            wall, own, _ = run(classify_command(local_sources, local_out, args.model, None), dict(os.environ))
            times.setdefault("local", []).append((wall, own))
            expected = rows_without_ms(local_out)
            for k, cluster in started.items():
                name = f"ray x{k}"
                out = Path(tmp) / f"ray{k}-{round_}.csv"
                with MemorySampler(cluster) as sampler:
                    wall, own, _ = run(classify_command(ray_sources, out, args.model, cluster.address),
                                       {**os.environ, **cluster.env})
                times.setdefault(name, []).append((wall, own))
                for kind in ("actor", "decoder"):
                    memory.setdefault(name, {}).setdefault(kind, []).extend(sampler.peak_mib(kind))
                identical[name] = identical.get(name, True) and rows_without_ms(out) == expected
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1][0]:.1f} s" for n, t in times.items()), flush=True)
        files = len(expected)
    report(files, per_node, times, memory, identical, args.out)


def report(files: int, per_node: int, times: dict[str, list[tuple[float, float | None]]],
           memory: dict[str, dict[str, list[float]]], identical: dict[str, bool], out: Path | None) -> None:
    """A markdown table (for docs/scale.md) and, with ``out``, the same as JSON."""
    local_rate = files / statistics.median(w for w, _ in times["local"])
    results = {}
    print(f"\n| {files} files | wall s (median) | images/s | vs local | classify's own s | actor PSS MiB (max) "
          "| decoder PSS MiB (max) | rows = local |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        own = [o for _, o in runs if o is not None]
        mem = memory.get(name, {})
        r = results[name] = {
            "wall_s": wall, "images_per_s": files / wall, "vs_local": files / wall / local_rate,
            "classify_s": statistics.median(own) if own else None, "actor_pss_mib": mem.get("actor", []),
            "decoder_pss_mib": mem.get("decoder", []), "rows_identical": identical.get(name),
            "cpus_per_node": None if name == "local" else per_node}
        cells = [name, f"{wall:.1f}", f"{r['images_per_s']:.1f}", f"{r['vs_local']:.2f}",
                 "-" if r["classify_s"] is None else f"{r['classify_s']:.1f}",
                 *(f"{max(m):.0f}" if m else "-" for m in (r["actor_pss_mib"], r["decoder_pss_mib"])),
                 {None: "-", True: "yes", False: "NO"}[r["rows_identical"]]]
        print("| " + " | ".join(cells) + " |")
    print(f"load average {os.getloadavg()[0]:.2f} (other work on the machine slows and scatters the times)")
    if out is not None:
        out.write_text(json.dumps({"files": files, "cpus_per_node": per_node, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
