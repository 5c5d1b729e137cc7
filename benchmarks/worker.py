"""The benchmark's child process: ``python -m xray_edge.benchmarks.worker JOB.json``.

A fresh process per format gives each its own peak RSS (``ru_maxrss``) and keeps TensorFlow and
onnxruntime out of each other's way (and out of the parent). ``job["mode"]``:

- ``measure``: one format on the preprocessed images (.npy); writes ``probs.npy``.
- ``build``: build one format's file from model.keras (``Format.build``).
- ``e2e``: the runtime's classify pipeline against inference alone (``e2e.run``).

Each writes ``result.json`` (its figures, or ``{"error": reason}``) into the job's folder.

Measure order: import the engine (timed) -> read the images -> load the model (timed; RSS baseline taken
just before) -> one warm-up batch -> every image in batches of ``batch`` (the accuracy pass; each
full batch is timed and gives ms/image at that batch size) -> batch 1: ``warmup`` runs, then timed
runs until at least ``runs`` runs and ``seconds`` seconds -> peak RSS.
"""
from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from xray_edge.benchmarks import formats
from xray_edge.contract import ModelRecord

PROGRESS = "progress: "  # lines starting so are passed on to the benchmark's stderr


def progress(message: str) -> None:
    print(f"{PROGRESS}{message}", flush=True)


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; else the peak so far)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def timed_runs(fn: Callable[[], Any], warmup: int, runs: int, seconds: float) -> list[float]:
    """Milliseconds of each timed call of ``fn``: ``warmup`` untimed calls, then calls until at
    least ``runs`` were timed and ``seconds`` have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def accuracy_pass(run: Callable[[np.ndarray], Any], x: np.ndarray, batch: int,
                  name: str = "") -> tuple[list[Any], list[float]]:
    """The runner's output for every batch of ``batch`` images, and the ms of each full batch."""
    outs, times = [], []
    every = max(1, len(x) // batch // 5)
    for k, start in enumerate(range(0, len(x), batch)):
        chunk = x[start : start + batch]
        t = time.perf_counter()
        outs.append(run(chunk))
        if len(chunk) == batch:
            times.append((time.perf_counter() - t) * 1000)
        if k % every == every - 1:
            progress(f"{name}: accuracy pass {min(start + batch, len(x))}/{len(x)} images")
    return outs, times


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement described by ``job``; writes probs.npy next to the result."""
    fmt = formats.get(job["format"])
    out = Path(job["out"])
    t = time.perf_counter()
    for module in fmt.engine:
        importlib.import_module(module)
    import_s = time.perf_counter() - t
    x = np.load(job["images"])
    baseline = rss_mb()
    t = time.perf_counter()
    run = fmt.load(Path(job["path"]), job["threads"], ModelRecord.from_json(job["record"]))
    load_s = time.perf_counter() - t
    batch = formats.BATCH
    run(x[:batch])  # warm-up at the accuracy-pass batch size
    outs, batch_ms = accuracy_pass(run, x, batch, fmt.name)
    probs = np.concatenate([formats.probabilities(o) for o in outs])
    np.save(out / "probs.npy", probs)
    progress(f"{fmt.name}: batch-1 latency, at least {job['runs']} runs and {job['seconds']:g} s")
    singles = iter(range(10**9))
    b1 = timed_runs(lambda: run(x[next(singles) % len(x)][None]), job["warmup"], job["runs"], job["seconds"])
    peak = peak_rss_mb()
    source, decisions = None, None
    if fmt.load is formats.load_onnx:  # read after the peak: provenance and the record's decisions
        from xray_edge.decision import decide
        from xray_edge.session import load_model

        record = load_model(Path(job["path"]), 1).record
        source = record.source_model_sha256
        decisions = [decide(record, p, a, d).__dict__
                     for o in outs for p, a, d in zip(o.probs, _rows(o.age, len(o.probs)), _rows(o.ood, len(o.probs)))]
    return {
        "decisions": decisions,
        "record_source_sha256": source,
        "import_s": import_s,
        "load_s": load_s,
        "batch_ms": batch_ms,
        "b1_ms": b1,
        "rss_before_load_mb": baseline,
        "peak_rss_mb": peak,
        "rss_delta_mb": peak - baseline,
    }


def _rows(values: np.ndarray | None, n: int) -> list[Any]:
    return [None] * n if values is None else list(values)


def build(job: dict[str, Any]) -> dict[str, Any]:
    fmt = formats.get(job["format"])
    return fmt.build(Path(job["keras"]), Path(job["target"]), job["options"])


def e2e(job: dict[str, Any]) -> dict[str, Any]:
    from xray_edge.benchmarks.e2e import run

    progress("end to end: " + ", ".join(f"{name} ({len(paths)} files)" for name, paths in job["sets"].items()))
    return run(Path(job["path"]), job["threads"], job["sets"], job.get("workers"), job.get("ood"),
               job.get("cold_start", 0), job.get("rounds", 1))


def peak(job: dict[str, Any]) -> dict[str, Any]:
    from xray_edge.benchmarks.peak import int8_peak

    progress(f"int8 peak micro-benchmark, {job['threads']} threads")
    return int8_peak(job["threads"])


MODES = {"measure": measure, "build": build, "e2e": e2e, "peak": peak}


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    try:
        result = MODES[job["mode"]](job)
    except Exception as e:  # reported as the row's status; the traceback goes to the log
        traceback.print_exc()
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        result = {"error": f"{type(e).__name__}: {reason}"}
    (Path(job["out"]) / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
