"""A tiny xray-edge ONNX model built with onnx.helper, for tests that must not need TensorFlow.

image (N, S, S, 1) -> AveragePool to 4x4 -> Flatten -> Gemm -> logits (N, 3), with fixed random
weights, carrying a valid metadata record (optionally altered).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xray_edge.contract import CLASSES, INPUT_NAME, OUTPUT_NAME, ModelRecord, Preprocessing, attach_record


def tiny_record(size: int = 32, **overrides) -> ModelRecord:
    rec = ModelRecord(preprocessing=Preprocessing(size=size), input_shape=["N", size, size, 1],
                      model_name="tiny-test-model", model_version="0.0.1")
    for k, v in overrides.items():
        setattr(rec, k, v)
    return rec


def make_tiny_onnx(path: Path, size: int = 32, seed: int = 0, record: ModelRecord | None = None,
                   with_record: bool = True) -> Path:
    """Write a tiny model to ``path`` and return it."""
    rng = np.random.default_rng(seed)
    pool = size // 4
    w = rng.normal(0, 3.0, (16, len(CLASSES))).astype(np.float32)
    b = rng.normal(0, 0.1, (len(CLASSES),)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", size, size, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if with_record:
        attach_record(model, record or tiny_record(size))
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path
