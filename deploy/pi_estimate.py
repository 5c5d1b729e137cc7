"""Raspberry Pi speed on paper, from measurements made here: the model's per-layer profile on this
machine, this machine's measured int8 peak, and the Pi boards' int8 throughput per core and clock.

    python deploy/pi_estimate.py runtime/models/xray-edge-vgg19-int8.onnx --results benchmarks/results.json

Method, per convolution: its MACs (from the graph) and the time onnxruntime spends on it here
(profiling, batch 1) give the share of this machine's int8 peak it reaches; the same share of a
board's peak for that layer gives its time there. On a Pi 5 (Cortex-A76, Armv8.2 dot product)
onnxruntime's dot-product convolution kernels skip layers with fewer than 64 input channels, so
the first convolution runs on the plain NEON int8 path, like every layer on a Pi 4 (Cortex-A72,
no dot product). Everything that is not a convolution (pooling, quantize/dequantize, the heads)
is scaled by the ratio of single-core speed. Decoding a full-size image (from the benchmark's
end-to-end table) is scaled by the same ratio; images per minute follow from the rate the
board's cores allow when decoding overlaps inference: 1 / (decode / cores + model).
Needs ``onnx`` (the bench extra).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# int8 MACs per cycle per core (docs/raspberry-pi.md): without dot product, widening multiply-
# accumulate (8 lanes) on the one SIMD pipe that multiplies integers: 8; with sdot/udot (16 MACs
# each) on the A76's two 128-bit pipes: 32. single_core_vs_here (assumed, not measured): one
# board core's speed on scalar and memory-bound work (pooling, quantize/dequantize, the heads,
# decoding) against one core of the reference machine.
BOARDS = {
    "Pi 4 (Cortex-A72, 1.5 GHz)": {"cores": 4, "ghz": 1.5, "int8_mac_per_cycle": 8, "dotprod": False,
                                   "single_core_vs_here": 0.25},
    "Pi 5 (Cortex-A76, 2.4 GHz)": {"cores": 4, "ghz": 2.4, "int8_mac_per_cycle": 8, "dotprod_mac_per_cycle": 32,
                                   "dotprod": True, "single_core_vs_here": 0.55},
}
DOTPROD_MIN_INPUT_CHANNELS = 64


def conv_layers(model_path: Path) -> list[dict[str, Any]]:
    """Every convolution: its node name, input channels and MACs per image."""
    import onnx

    from xray_edge.benchmarks.macs import _fix_batch, _shapes

    model = onnx.load(str(model_path))
    _fix_batch(model)
    shapes = _shapes(model)
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, y = shapes[node.input[1]], shapes[node.output[0]]
            out.append({"name": node.name, "input_channels": w[1], "macs": int(np.prod(y) * np.prod(w[1:]))})
    return out


def profile(model_path: Path, threads: int, runs: int = 20) -> dict[str, float]:
    """Mean microseconds per batch-1 run of every node, from onnxruntime's own profiler."""
    import onnxruntime as ort

    from xray_edge.contract import record_from_metadata

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        size = record_from_metadata(session.get_modelmeta().custom_metadata_map).preprocessing.size
        x = np.random.default_rng(0).uniform(0, 1, (1, size, size, 1)).astype(np.float32)
        for _ in range(3):
            session.run(None, {"image": x})
        session.end_profiling()  # drop the warm-up runs
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, {"image": x})
        for _ in range(runs):
            session.run(None, {"image": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["name"][: -len("_kernel_time")]] += e["dur"]
    return {name: us / (runs + 3) for name, us in total.items()}


def estimate(model_path: Path, results: dict[str, Any], threads: int) -> dict[str, Any]:
    """Per-board model ms, decode ms per full-size format and images per minute."""
    peak_here = results["machine"]["int8_peak"]["gmac_per_s"]
    layers = conv_layers(model_path)
    times = profile(model_path, threads)
    conv_names = {layer["name"] for layer in layers}
    # a fused or quantized node keeps the convolution's name as a prefix
    for layer in layers:
        layer["us_here"] = sum(us for name, us in times.items() if name.startswith(layer["name"]))
        layer["share_of_peak_here"] = layer["macs"] / (layer["us_here"] * 1e3) / peak_here if layer["us_here"] else 0.5
    other_us = sum(us for name, us in times.items() if not any(name.startswith(c) for c in conv_names))
    decode_ms = {k: v["decode_preprocess_ms_median"] for k, v in (results.get("e2e") or {}).get("sets", {}).items()}
    out = {"here": {"conv_ms": sum(l["us_here"] for l in layers) / 1e3, "other_ms": other_us / 1e3,
                    "int8_peak_gmac_per_s": peak_here, "threads": threads}, "boards": {}}
    for board, b in BOARDS.items():
        conv_ms = 0.0
        for layer in layers:
            per_cycle = (b["dotprod_mac_per_cycle"] if b["dotprod"] and layer["input_channels"] >= DOTPROD_MIN_INPUT_CHANNELS
                         else b["int8_mac_per_cycle"])
            peak = b["cores"] * b["ghz"] * per_cycle  # GMAC/s
            conv_ms += layer["macs"] / (layer["share_of_peak_here"] * peak * 1e6)
        model_ms = conv_ms + other_us / 1e3 / b["single_core_vs_here"]
        decode = {k: v / b["single_core_vs_here"] for k, v in decode_ms.items()}
        out["boards"][board] = {"model_ms": model_ms, "decode_ms": decode,
                                "images_per_minute": {k: 60_000 / (d / b["cores"] + model_ms) for k, d in decode.items()}}
    return out


def markdown(e: dict[str, Any]) -> str:
    here = e["here"]
    lines = [f"This machine: convolutions {here['conv_ms']:.1f} ms, other nodes {here['other_ms']:.1f} ms per image "
             f"(batch 1, {here['threads']} threads), int8 peak {here['int8_peak_gmac_per_s']:.0f} GMAC/s.", "",
             "| board | model ms/image | " + " | ".join(f"{k}: decode ms / images per min"
                                                      for k in next(iter(e["boards"].values()))["decode_ms"]) + " |",
             "|---|---:|" + "---:|" * len(next(iter(e["boards"].values()))["decode_ms"])]
    for board, b in e["boards"].items():
        cells = [f"{b['decode_ms'][k]:.0f} / {b['images_per_minute'][k]:.0f}" for k in b["decode_ms"]]
        lines.append(f"| {board} | {b['model_ms']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--results", type=Path, required=True, help="a benchmark's results.json (int8 peak, decode times)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    e = estimate(args.model, json.loads(args.results.read_text()), args.threads)
    print(markdown(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
