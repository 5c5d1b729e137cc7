"""FP16 and static INT8 variants of the FP32 ONNX model (onnxconverter-common, onnxruntime).

INT8: ``quant_pre_process`` (ONNX shape inference + graph optimisation), then activation ranges
from calibration images through ``create_calibrator`` with explicit options, then
``quantize_static`` in QDQ format with per-channel int8 weights and int8 or uint8 activations, fed the
computed ranges through its calibration cache. The ranges are computed here rather than inside
``quantize_static`` because that function does not pass the histogram bin counts to the calibrator:
its Entropy method then runs with num_bins == num_quantized_bins == 128, has a single candidate
threshold and silently returns the full (MinMax-like) range.

The classifier's settings are ``CLASSIFIER_INT8``: every op of the convolutional base that
onnxruntime can quantize (the in-graph preprocessing, convolutions, ReLUs, max pools) up to
``BASE_END`` (block5_conv4 and its ReLU); everything after it (the last max pool, site alignment,
class and age heads, gate, Grad-CAM) stays float: small, nothing to gain in speed, and a site
profile then acts on float features. Calibrated on 500 training images (``xray-edge export
--calib-images``). ``benchmarks/int8_variants.md`` compares the alternatives on 500 test images.

Activations are uint8 (U8S8 kernels): with asymmetric ranges the quantized values are those of
int8 activations shifted by 128 (the same answers), and onnxruntime runs u8 x s8 products on AMX
where the CPU has it (its AMX GEMM is U8S8 only): 37.3 against 40.3 ms per image at batch 1 on a
2-core Sapphire Rapids (int8_variants.md). On an AVX512-VNNI machine without AMX (onnxruntime
1.31, batch 1, 1 thread) S8S8 and U8S8 measured 71.2 and 72.6 ms. Dynamic quantization is never
used: 1305 ms there, 5.6x slower than FP32 (per-call activation quantization around every conv).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from xray_edge.contract import INPUT_NAME

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# activation types: int8 (S8S8 kernels) or uint8 (U8S8: the kernels onnxruntime runs on AMX)
ACTIVATION_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
BASE_END = "block5_conv4"  # the base's last convolution: its ReLU is the last node quantized
# The classifier's INT8 settings (xray-edge export), chosen on benchmarks/int8_variants.md: the base quantized up
# to BASE_END, uint8 activations (onnxruntime's AMX kernels are u8 x s8)
CLASSIFIER_INT8: dict[str, Any] = {"upto": BASE_END, "activations": "uint8"}
# create_calibrator options per method. Ranges are asymmetric (ORT's QDQ activations carry a zero
# point), so ReLU outputs use the whole int8 range.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": False},
    "percentile": {"symmetric": False, "num_bins": 2048, "percentile": 99.999},
    "entropy": {"symmetric": False, "num_bins": 2048, "num_quantized_bins": 128},
}
CALIBRATION_CHUNK = 8  # images per calibrator pass (histogram methods hold every activation of a pass)


def int8_unsupported() -> str | None:
    """Why this onnxruntime cannot make the INT8 variant, or None. ``quantize_static`` takes
    precomputed ranges through ``calibration_cache_path`` only since microsoft/onnxruntime#28221
    (May 2026; works with 1.31)."""
    import inspect

    import onnxruntime
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return (f"onnxruntime {onnxruntime.__version__} cannot quantize with precomputed ranges "
                "(quantize_static has no calibration_cache_path); upgrade onnxruntime (1.31 works)")
    return None


def to_fp16(proto: Any) -> Any:
    """FP16 weights and activations; graph inputs and outputs stay float32 (``keep_io_types``), and so
    do the default values of the site inputs (initializers named like a graph input)."""
    from onnxconverter_common import float16

    inputs = {i.name for i in proto.graph.input}
    defaults = [i for i in proto.graph.initializer if i.name in inputs]
    for init in defaults:
        proto.graph.initializer.remove(init)
    with warnings.catch_warnings():  # one warning per weight below fp16's smallest subnormal
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(proto, keep_io_types=True)
    for target in (proto, out):
        target.graph.initializer.extend(defaults)
    return out


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def _chunks(x: np.ndarray, size: int) -> Iterator[Any]:
    """One calibration data reader per ``size`` images, each yielding them as a single batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, batch: np.ndarray):
            self.batches = iter([{INPUT_NAME: batch}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    for start in range(0, len(x), size):
        yield Reader(x[start:start + size])


def preprocess_for_quantization(fp32_path: Path, out_path: Path) -> None:
    """onnxruntime's recommended pre-processing (shape inference + optimisation). Symbolic shape
    inference is skipped: it needs sympy and only matters for dynamic shapes inside the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)


def calibrate(model_path: Path, images: np.ndarray, method: str, work_dir: Path,
              options: dict[str, Any] | None = None) -> Any:
    """Activation ranges (``TensorsData``) of ``model_path`` on ``images`` with ``method``
    (``options`` replace the method's ``CALIBRATOR_OPTIONS``)."""
    from onnxruntime.quantization import create_calibrator

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if len(images) == 0:
        raise ValueError("no calibration images")
    calibrator = create_calibrator(
        str(model_path), augmented_model_path=str(work_dir / f"augmented-{method}.onnx"),
        calibrate_method=_method(method), extra_options=dict(options or CALIBRATOR_OPTIONS[method]),
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram collectors print progress
        for reader in _chunks(images, CALIBRATION_CHUNK):
            calibrator.collect_data(reader)  # each pass merges into the running ranges/histograms
        return calibrator.compute_data()


def ranges(tensors_data: Any) -> dict[str, tuple[float, float]]:
    """``tensor name -> (low, high)`` of calibrated ranges (for reports and tests)."""
    return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1])))
            for name, t in tensors_data.items()}


def upstream_of(proto: Any, name_part: str) -> set[str]:
    """Names of the last node (in graph order) whose name contains ``name_part`` and of every node it
    depends on."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    todo = [n for n in proto.graph.node if name_part in n.name][-1:]
    if not todo:
        raise ValueError(f"no node named like {name_part!r} in the graph")
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if node.name not in seen:
            seen.add(node.name)
            todo += [producer[i] for i in node.input if i in producer]
    return seen


def to_int8(fp32_path: Path, out_path: Path, images: np.ndarray, method: str = "minmax",
            op_types: tuple[str, ...] | None = None, options: dict[str, Any] | None = None,
            weight_bits: int = 7, float_nodes: tuple[str, ...] = (), upto: str | None = None,
            activations: str = "int8") -> dict[str, Any]:
    """Write the static INT8 (QDQ) model of ``fp32_path`` to ``out_path``, calibrated on ``images``,
    quantizing the nodes of ``op_types`` (None: every op onnxruntime can) except those whose name
    contains one of ``float_nodes`` and, with ``upto``, every node after the one named like it
    (``BASE_END``: the convolutional base quantized, the last max pool, the heads, gate, Grad-CAM and site alignment
    left float). ``weight_bits`` 7 (the default) keeps every int8 weight in
    [-64, 64]: onnxruntime's AVX2 kernels (x86 without VNNI) add pairs of u8 x s8 products in int16
    and saturate beyond that, so 8-bit weights give other answers there than on VNNI or ARM
    (``AVX2_SAFE_WEIGHT``). Returns the quantization settings for the model record."""
    import onnx
    import onnxruntime
    import onnxruntime.quantization as q

    # the calibrator's own sessions would warn, for every pass, that the site inputs' defaults are not constants
    onnxruntime.set_default_logger_severity(3)
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits}")
    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}")
    with tempfile.TemporaryDirectory(prefix="xray-edge-int8-") as tmp:
        tmp = Path(tmp)
        pre = tmp / "pre.onnx"
        preprocess_for_quantization(fp32_path, pre)
        graph = onnx.load(str(pre))
        kept = upstream_of(graph, upto) if upto else {n.name for n in graph.graph.node}
        excluded = [n.name for n in graph.graph.node if any(f in n.name for f in float_nodes) or n.name not in kept]
        tensors = calibrate(pre, images, method, tmp, options)
        cache = tmp / "ranges.json"
        q.save_tensors_data(tensors, cache)
        q.quantize_static(
            str(pre), str(out_path), calibration_data_reader=None, calibration_cache_path=str(cache),
            calibrate_method=_method(method), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=getattr(q.QuantType, ACTIVATION_TYPES[activations]), weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None, nodes_to_exclude=excluded,
            reduce_range=weight_bits == 7,
        )
    return {
        "method": method,
        "calibrator_options": dict(options or CALIBRATOR_OPTIONS[method]),
        "images": int(len(images)),
        "format": "QDQ",
        "weights": f"int8 per-channel, {weight_bits}-bit range" + (" (reduce_range: AVX2-safe)" if weight_bits == 7 else ""),
        "activations": activations,
        "op_types": list(op_types) if op_types else "all",
        "quantized_up_to": upto,
        "float_nodes": len(excluded),
    }


AVX2_SAFE_WEIGHT = 64  # largest |int8 weight| for which no AVX2 u8 x s8 pair sum (2 x 255 x 64) leaves int16


def int8_weight_ranges(proto: Any) -> dict[str, int]:
    """Largest |value| of every int8 weight initializer a DequantizeLinear reads, by name (the
    drift test checks them against ``AVX2_SAFE_WEIGHT``)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.dtype == np.int8 and w.ndim > 1:
                out[node.input[0]] = int(np.abs(w.astype(np.int16)).max())
    return out
