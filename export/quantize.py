"""FP16 and static INT8 variants of the FP32 ONNX model (onnxconverter-common, onnxruntime).

INT8: ``quant_pre_process`` (ONNX shape inference + graph optimisation), then activation ranges
from calibration images through ``create_calibrator`` with explicit options, then
``quantize_static`` in QDQ format with per-channel int8 weights and int8 activations, fed the
computed ranges through its calibration cache. The ranges are computed here rather than inside
``quantize_static`` because that function does not pass the histogram bin counts to the calibrator:
its Entropy method then runs with num_bins == num_quantized_bins == 128, has a single candidate
threshold and silently returns the full (MinMax-like) range.

Only the convolutions and max pools are quantized (``OP_TYPES``): the in-graph preprocessing
(scaling, grey to BGR, mean subtraction) and the small heads, gate and Grad-CAM stay float, where
quantizing them costs agreement and buys no speed.

Activations are QInt8 (S8S8), onnxruntime's recommended QDQ default for x86 and ARM. Measured on
this x86 machine (AVX512-VNNI, onnxruntime 1.31, VGG-19 at 224 px, batch 1, 1 thread, best of 5x3
runs): FP32 234 ms, S8S8 71.2 ms, U8S8 (QUInt8 activations) 72.6 ms. Dynamic quantization is never
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
OP_TYPES = ("Conv", "MaxPool")
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


def to_int8(fp32_path: Path, out_path: Path, images: np.ndarray, method: str = "minmax",
            op_types: tuple[str, ...] | None = OP_TYPES, options: dict[str, Any] | None = None,
            weight_bits: int = 7, float_nodes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write the static INT8 (QDQ) model of ``fp32_path`` to ``out_path``, calibrated on ``images``,
    quantizing the nodes of ``op_types`` (None: every op onnxruntime can) except those whose name
    contains one of ``float_nodes``. ``weight_bits`` 7 (the default) keeps every int8 weight in
    [-64, 64]: onnxruntime's AVX2 kernels (x86 without VNNI) add pairs of u8 x s8 products in int16
    and saturate beyond that, so 8-bit weights give other answers there than on VNNI or ARM
    (``AVX2_SAFE_WEIGHT``). Returns the quantization settings for the model record."""
    import onnx
    import onnxruntime.quantization as q

    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits}")
    with tempfile.TemporaryDirectory(prefix="xray-edge-int8-") as tmp:
        tmp = Path(tmp)
        pre = tmp / "pre.onnx"
        preprocess_for_quantization(fp32_path, pre)
        excluded = [n.name for n in onnx.load(str(pre)).graph.node if any(f in n.name for f in float_nodes)]
        tensors = calibrate(pre, images, method, tmp, options)
        cache = tmp / "ranges.json"
        q.save_tensors_data(tensors, cache)
        q.quantize_static(
            str(pre), str(out_path), calibration_data_reader=None, calibration_cache_path=str(cache),
            calibrate_method=_method(method), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None, nodes_to_exclude=excluded,
            reduce_range=weight_bits == 7,
        )
    return {
        "method": method,
        "calibrator_options": dict(options or CALIBRATOR_OPTIONS[method]),
        "images": int(len(images)),
        "format": "QDQ",
        "weights": f"int8 per-channel, {weight_bits}-bit range" + (" (reduce_range: AVX2-safe)" if weight_bits == 7 else ""),
        "activations": "int8",
        "op_types": list(op_types) if op_types else "all",
        "float_nodes": excluded,
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
