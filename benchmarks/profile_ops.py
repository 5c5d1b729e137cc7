"""Where an ONNX model spends its time, and what onnxruntime's session settings change: batch-1
median latency under each setting of ``SETTINGS`` (interleaved rounds) and the share of kernel time
per operator type (onnxruntime's own profiler).

    python -m xray_edge.benchmarks.profile_ops runtime/models/xray-edge-vgg19-int8.onnx --threads 2
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# name -> session config entries (onnxruntime SessionOptions.add_session_config_entry)
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "intra-op spinning off": {"session.intra_op.allow_spinning": "0"},
    "denormals as zero": {"session.set_denormal_as_zero": "1"},
}


def session(path: Path, threads: int, config: dict[str, str], profile_dir: str | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads and ``config`` entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_shares(path: Path, x: np.ndarray, threads: int, runs: int = 10) -> dict[str, float]:
    """Share of the kernel time per operator type over ``runs`` batch-1 runs."""
    with tempfile.TemporaryDirectory(prefix="xray-edge-profile-") as tmp:
        s = session(path, threads, {}, tmp)
        for _ in range(runs):
            s.run(None, {s.get_inputs()[0].name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
    whole = sum(total.values()) or 1
    return {op: t / whole for op, t in total.most_common()}


def latencies(path: Path, x: np.ndarray, threads: int, rounds: int = 5, runs: int = 10) -> dict[str, float]:
    """Batch-1 median ms per setting, the settings interleaved in every round."""
    sessions = {name: session(path, threads, config) for name, config in SETTINGS.items()}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, s in sessions.items():
            feed = {s.get_inputs()[0].name: x}
            s.run(None, feed)  # warm-up
            for _ in range(runs):
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    from xray_edge.benchmarks.machine import describe
    from xray_edge.contract import INPUT_SIZE

    parser = argparse.ArgumentParser(prog="python -m xray_edge.benchmarks.profile_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).random((1, INPUT_SIZE, INPUT_SIZE, 1), dtype=np.float32)
    machine = describe(args.threads)
    print(f"{args.model} on {machine['cpu']} ({', '.join(machine['int8_features'])}), {args.threads} threads, batch 1")
    for name, ms in latencies(args.model, x, args.threads, args.rounds).items():
        print(f"  {name}: median {ms:.1f} ms")
    print("share of kernel time per operator type:")
    for op, share in list(op_shares(args.model, x, args.threads).items())[:10]:
        print(f"  {op}: {share:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
