"""Write a small INT8 stand-in for the shipped model, for checking a deployment before it exists.

A 224 x 224 grey-input conv net (3 strided conv layers, 4 x 4 average pool, dense -> 3 logits) with fixed random
weights, statically quantised by onnxruntime like export/quantize.py quantises the shipped model
(QDQ, per-channel int8 weights in the AVX2-safe 7-bit range unless ``--weight-bits 8``, int8
activations: the same int8 kernels run) and carrying a valid xray-edge record (variant "int8").
Like the shipped model it has an age output and an input gate (squared distance of its pooled
features to those of its calibration images, a generous limit), and its recipe crops to the
lungs with the lung model this install ships (``--no-lung-crop``: without). Its predictions are
meaningless; it only exercises the runtime. Needs ``onnx`` and ``onnxruntime`` on the host.

    python deploy/make_standin.py /tmp/standin-int8.onnx
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from make_images import synthetic_radiograph
from xray_edge.contract import (AGE_GROUPS, CLASSES, INPUT_NAME, INPUT_SIZE, OUTPUT_NAME, Gate, ModelRecord, Outputs,
                                Preprocessing, attach_record)
from xray_edge.recipe import LungCrop
from xray_edge.lungs import finder_for
from xray_edge.pipeline import prepare
from xray_edge.preprocess import preprocess
from xray_edge.train.lungs import FILE as LUNG_MODEL, SIZE as LUNG_SIZE

SIZE = INPUT_SIZE
GATE_MARGIN = 4.0  # gate limit: this many times the largest distance of a calibration image


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
    for head, n in (("d", len(CLASSES)), ("a", len(AGE_GROUPS))):  # class and age heads, rescaled by _fit_heads
        inits += [numpy_helper.from_array(rng.normal(0, 1.0, (chans[-1] * 16, n)).astype(np.float32), f"w{head}"),
                  numpy_helper.from_array(np.zeros(n, np.float32), f"b{head}")]
    inits.append(numpy_helper.from_array(np.zeros((1, chans[-1] * 16), np.float32), "centre"))
    nodes += [helper.make_node("AveragePool", [x], ["pool"], kernel_shape=[7, 7], strides=[7, 7]),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "wd", "bd"], [OUTPUT_NAME]),
              helper.make_node("Gemm", ["flat", "wa", "ba"], ["age_logits"]),
              helper.make_node("Sub", ["flat", "centre"], ["centred"]),
              helper.make_node("ReduceSumSquare", ["centred"], ["ood_distance"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "standin",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", SIZE, SIZE, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", len(CLASSES)]),
         helper.make_tensor_value_info("age_logits", TensorProto.FLOAT, ["N", len(AGE_GROUPS)]),
         helper.make_tensor_value_info("ood_distance", TensorProto.FLOAT, ["N"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _calibration_inputs(recipe: Preprocessing, seed: int, images: Path | None = None, n: int = 16) -> np.ndarray:
    """(n, S, S, 1) model inputs through ``recipe``, as the runtime would feed them: of the files
    in ``images``, else of synthetic radiographs (deploy/make_images.py)."""
    if images is None:
        rng = np.random.default_rng(seed + 1)
        return np.stack([preprocess(synthetic_radiograph(rng, *rng.integers(256, 640, size=2)), recipe,
                                    lung_box=finder_for(recipe)) for _ in range(n)])
    prepared = [prepare(p, recipe) for p in sorted(images.iterdir()) if p.is_file()]
    bad = next((p for p in prepared if p.image is None), None)
    if bad is not None or not prepared:
        raise ValueError(f"{bad.path}: {bad.error}" if bad else f"{images}: no files")
    return np.stack([p.image for p in prepared])


class _Calibration(CalibrationDataReader):
    """The calibration inputs one at a time, for onnxruntime's quantizer."""

    def __init__(self, inputs: np.ndarray) -> None:
        self._batches = iter({INPUT_NAME: x[None]} for x in inputs)

    def get_next(self):  # noqa: ANN201 - onnxruntime's interface
        return next(self._batches, None)


def _fit_heads(model: onnx.ModelProto, inputs: np.ndarray) -> float:
    """Rescale the class and age heads so their logits vary from image to image (mean 0, std ~3
    on the calibration images) instead of all images landing on the same near-tie; centre the
    gate's distance on the calibration features. Returns the gate limit."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = sess.run(["flat"], {INPUT_NAME: inputs})[0]
    init = {t.name: t for t in model.graph.initializer}
    centre = feats.mean(axis=0)
    for head in "da":
        w = numpy_helper.to_array(init[f"w{head}"])
        w = (w * 3.0 / (((feats - centre) @ w).std(axis=0) + 1e-6)).astype(np.float32)
        init[f"w{head}"].CopyFrom(numpy_helper.from_array(w, f"w{head}"))
        init[f"b{head}"].CopyFrom(numpy_helper.from_array((-centre @ w).astype(np.float32), f"b{head}"))
    init["centre"].CopyFrom(numpy_helper.from_array(centre[None].astype(np.float32), "centre"))
    return GATE_MARGIN * float(((feats - centre) ** 2).sum(axis=1).max())


def _lung_crop() -> LungCrop:
    """The recipe's lung crop with the lung model this install ships (sha256 pinned)."""
    data = (resources.files("xray_edge.models") / LUNG_MODEL).read_bytes()
    return LungCrop(model=LUNG_MODEL, sha256=hashlib.sha256(data).hexdigest(), size=LUNG_SIZE)


def make_standin(path: Path, seed: int = 0, lung_crop: bool = True, weight_bits: int = 7,
                 images: Path | None = None) -> Path:
    """Write the INT8 stand-in model to ``path`` and return it, calibrated on the files in
    ``images`` (default: synthetic radiographs). ``weight_bits`` 7 (export's default, AVX2-safe)
    or 8 (full range: onnxruntime's AVX2 kernels saturate; shows that a cross-CPU check catches it)."""
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits}")
    recipe = Preprocessing(lung_crop=_lung_crop() if lung_crop else None)
    inputs = _calibration_inputs(recipe, seed, images)
    model = _float_model(seed)
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, None))
    gate = _fit_heads(model, inputs)
    del model.graph.output[-1]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(model, fp32)
        quantize_static(str(fp32), str(path), _Calibration(inputs), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=weight_bits == 7)
    model = onnx.load(str(path))
    attach_record(model, ModelRecord(
        model_name="xray-edge-standin", model_version=f"0.0.0-standin-w{weight_bits}", variant="int8",
        preprocessing=recipe, outputs=Outputs(age_logits="age_logits", ood_distance="ood_distance"),
        gate=Gate(threshold=gate, feature=f"stand-in: {GATE_MARGIN:g} x the calibration images' largest distance")))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-lung-crop", action="store_true", help="a recipe without the lung crop")
    ap.add_argument("--weight-bits", type=int, choices=(7, 8), default=7)
    ap.add_argument("--calibration", type=Path, help="calibrate on the files of this folder (default: synthetic)")
    args = ap.parse_args(argv)
    try:
        print(make_standin(args.output, args.seed, not args.no_lung_crop, args.weight_bits, args.calibration))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
