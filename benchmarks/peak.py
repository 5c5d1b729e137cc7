"""What this CPU can do in int8: its int8 instruction-set features, a micro-benchmark of the int8
multiply-accumulate rate onnxruntime's own GEMM reaches on it (a large int8 x int8 matrix product in
QDQ form, which onnxruntime runs on its best integer kernel: AMX/VNNI/AVX2 on x86, dot-product
instructions on ARM), and the hardware's bound (cores x clock x int8 MACs per cycle of its best
int8 instruction). A model's achieved GMAC/s over the first says how close a whole model comes to
onnxruntime's GEMM (another engine can exceed 100 %); over the second, to what the silicon allows."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

# /proc/cpuinfo flag -> feature name
X86_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
             "amx_int8": "AMX-INT8", "amx_tile": "AMX-TILE"}
ARM_FLAGS = {"asimddp": "dotprod", "i8mm": "i8mm", "sve": "SVE", "bf16": "BF16"}


def int8_features(cpuinfo: str | None = None) -> list[str]:
    """The int8-relevant instruction-set extensions this CPU reports (Linux /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return [name for flag, name in {**X86_FLAGS, **ARM_FLAGS}.items() if flag in flags]


# int8 multiply-accumulates per cycle per core of the best int8 instruction, by feature (issue rate of the
# multiplying instruction alone: AMX TMUL 16x64x... tile, two 512-bit VPDPBUSD ports, two 256-bit VPDPBUSD /
# VPMADDUBSW ports, two 128-bit SDOT pipes on Cortex-A76-class cores).
MACS_PER_CYCLE = (("AMX-INT8", 1024), ("AVX-512 VNNI", 128), ("AVX-VNNI", 64), ("AVX2", 64), ("dotprod", 32))


def cpu_ghz(cpuinfo: str | None = None) -> float | None:
    """The clock /proc/cpuinfo reports ("cpu MHz": the nominal clock in most VMs), in GHz."""
    try:
        cpuinfo = cpuinfo if cpuinfo is not None else open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return float(value) / 1000
            except ValueError:
                return None
    return None


def hardware_int8_bound(features: list[str], cores: int, ghz: float | None) -> dict[str, Any] | None:
    """cores x clock x MACs per cycle of the best int8 instruction in ``features`` (None if unknown)."""
    best = next(((name, macs) for name, macs in MACS_PER_CYCLE if name in features), None)
    if best is None or not ghz:
        return None
    return {"gmac_per_s": cores * ghz * best[1], "basis": f"{cores} cores x {ghz:.2f} GHz x {best[1]} int8 MAC/cycle "
            f"({best[0]}; the clock /proc/cpuinfo reports, no turbo)"}


def _matmul_model(n: int) -> bytes:
    """y = DQ(Q(DQ(Q(a)) @ DQ(w))): an (n, n) x (n, n) int8 product in QDQ form (onnxruntime fuses
    it into one integer matrix product)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, n), dtype=np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.01, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"), numpy_helper.from_array(np.array(0.001, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "z"], ["wd"]),
             helper.make_node("MatMul", ["ad", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def int8_peak(threads: int, n: int = 1536, seconds: float = 3.0) -> dict[str, Any]:
    """Best GMAC/s over repeated (n x n) int8 products with ``threads`` onnxruntime threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(_matmul_model(n), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).uniform(-1, 1, (n, n)).astype(np.float32)
    session.run(None, {"a": a})
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - t)
        runs += 1
    return {"gmac_per_s": n ** 3 / best / 1e9, "matrix": n, "threads": threads, "runs": runs,
            "method": f"best of {runs} runs of a {n}x{n}x{n} int8 QDQ MatMul in onnxruntime"}
