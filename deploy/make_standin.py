"""Write a small INT8 stand-in for the shipped model, for checking a deployment before it exists.

A 224 x 224 grey-input conv net (3 strided conv layers, 4 x 4 average pool, dense -> 3 logits) with fixed random
weights, statically quantised by onnxruntime like export/quantize.py quantises the shipped model
(QDQ, per-channel int8 weights, int8 activations: the same int8 kernels run) and carrying a valid xray-edge record (variant "int8"). Its predictions are
meaningless; it only exercises the runtime. Needs ``onnx`` and ``onnxruntime`` on the host.

    python deploy/make_standin.py /tmp/standin-int8.onnx
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from make_images import synthetic_radiograph
from xray_edge.contract import (CLASSES, INPUT_NAME, INPUT_SIZE, OUTPUT_NAME, ModelRecord, Preprocessing,
                                attach_record)
from xray_edge.preprocess import preprocess

SIZE = INPUT_SIZE


def _float_model(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    chans = [1, 8, 16, 32]
    inits, nodes, x = [], [helper.make_node("Transpose", [INPUT_NAME], ["c0"], perm=[0, 3, 1, 2])], "c0"
    for i, (cin, cout) in enumerate(zip(chans, chans[1:]), start=1):
        w = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"conv{i}"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", [f"conv{i}"], [f"c{i}"])]
        x = f"c{i}"
    wd = rng.normal(0, 1.0, (chans[-1] * 16, len(CLASSES))).astype(np.float32)
    inits += [numpy_helper.from_array(wd, "wd"), numpy_helper.from_array(np.zeros(len(CLASSES), np.float32), "bd")]
    nodes += [helper.make_node("AveragePool", [x], ["pool"], kernel_shape=[7, 7], strides=[7, 7]),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "wd", "bd"], [OUTPUT_NAME])]
    graph = helper.make_graph(
        nodes, "standin",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", SIZE, SIZE, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class _Calibration(CalibrationDataReader):
    """Preprocessed synthetic radiographs (deploy/make_images.py), as the runtime would feed them."""

    def __init__(self, seed: int, n: int = 16) -> None:
        rng = np.random.default_rng(seed + 1)
        spec = Preprocessing()
        self._batches = iter(
            {INPUT_NAME: preprocess(synthetic_radiograph(rng, *rng.integers(256, 640, size=2)), spec)[None]}
            for _ in range(n)
        )

    def get_next(self):  # noqa: ANN201 - onnxruntime's interface
        return next(self._batches, None)


def _spread_logits(model: onnx.ModelProto, seed: int) -> None:
    """Rescale the dense layer so logits vary from image to image (mean 0, std ~3 per class on
    the calibration images) instead of all images landing on the same near-tie."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reader = _Calibration(seed)
    feats = np.concatenate([sess.run(["flat"], b)[0] for b in iter(reader.get_next, None)])
    init = {t.name: t for t in model.graph.initializer}
    wd = numpy_helper.to_array(init["wd"])
    logits = (feats - feats.mean(axis=0)) @ wd
    wd = (wd * 3.0 / (logits.std(axis=0) + 1e-6)).astype(np.float32)
    init["wd"].CopyFrom(numpy_helper.from_array(wd, "wd"))
    init["bd"].CopyFrom(numpy_helper.from_array((-feats.mean(axis=0) @ wd).astype(np.float32), "bd"))


def make_standin(path: Path, seed: int = 0) -> Path:
    """Write the INT8 stand-in model to ``path`` and return it."""
    model = _float_model(seed)
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, None))
    _spread_logits(model, seed)
    del model.graph.output[-1]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(model, fp32)
        quantize_static(str(fp32), str(path), _Calibration(seed), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    model = onnx.load(str(path))
    attach_record(model, ModelRecord(model_name="xray-edge-standin", model_version="0.0.0-standin", variant="int8"))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(make_standin(args.output, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
