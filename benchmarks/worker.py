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


def accuracy_pass(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                  batch: int) -> tuple[np.ndarray, list[float]]:
    """Probabilities of every image (batches of ``batch``) and the ms of each full batch."""
    probs, times = [], []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        t = time.perf_counter()
        probs.append(np.asarray(run(chunk), dtype=np.float64))
        if len(chunk) == batch:
            times.append((time.perf_counter() - t) * 1000)
    return np.concatenate(probs), times


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
    probs, batch_ms = accuracy_pass(run, x, batch)
    np.save(out / "probs.npy", probs)
    singles = iter(range(10**9))
    b1 = timed_runs(lambda: run(x[next(singles) % len(x)][None]), job["warmup"], job["runs"], job["seconds"])
    peak = peak_rss_mb()
    source = None
    if fmt.load is formats.load_onnx:  # which Keras model it was exported from (read after the peak)
        from xray_edge.session import load_model

        source = load_model(Path(job["path"]), 1).record.source_model_sha256
    return {
        "record_source_sha256": source,
        "import_s": import_s,
        "load_s": load_s,
        "batch_ms": batch_ms,
        "b1_ms": b1,
        "rss_before_load_mb": baseline,
        "peak_rss_mb": peak,
        "rss_delta_mb": peak - baseline,
    }


def build(job: dict[str, Any]) -> dict[str, Any]:
    fmt = formats.get(job["format"])
    return fmt.build(Path(job["keras"]), Path(job["target"]), job["options"])


def e2e(job: dict[str, Any]) -> dict[str, Any]:
    from xray_edge.benchmarks.e2e import run

    return run(Path(job["path"]), job["threads"], job["sets"], job.get("workers"))


MODES = {"measure": measure, "build": build, "e2e": e2e}


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
