"""A tiny xray-edge ONNX model built with onnx.helper, for tests that must not need TensorFlow.

image (N, S, S, 1) -> AveragePool to a 4x4 grid of cells -> Flatten (16 values) -> Gemm ->
``logits`` (N, 3), with fixed random weights (or ``weights`` given), plus the other outputs of a
real xray-edge model:

* ``age_logits`` (N, 2): another Gemm on the 16 cells;
* ``ood_distance`` (N,): squared distance of the 16 cells to ``centre`` (an image whose cells are
  all ``centre`` is at distance 0);
* ``cam`` (N, 4, 4, 3): each cell's contribution to each class logit, ReLU(cell * weight) (for
  this linear model that is what Grad-CAM measures): a model whose decision rests on one cell
  puts its heat there.

With ``site=True`` it also has the site inputs of site calibration (``site_scale``, ``site_shift``
(1, 16), identity by default): every output above reads the aligned cells ``cells * scale +
shift``, and ``pooled`` (N, 16) gives the cells before alignment; the record names the inputs and
a site reference (the cells of a typical image: mean ``centre``, spread 0.1).

It carries a valid, sealed metadata record (optionally altered).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xray_edge.contract import (CLASSES, INPUT_NAME, OUTPUT_NAME, SITE_INPUTS, Heatmap, ModelRecord, Outputs,
                                Preprocessing, SiteReference, attach_record)

SEEN = {"COVID": ["adult"], "NORMAL": ["adult", "child"], "VIRAL_PNEUMONIA": ["child"]}


def tiny_record(size: int = 32, **overrides) -> ModelRecord:
    rec = ModelRecord(preprocessing=Preprocessing(size=size), input_shape=["N", size, size, 1],
                      model_name="tiny-test-model", model_version="0.0.1",
                      outputs=Outputs(age_logits="age_logits", ood_distance="ood_distance", cam="cam"),
                      seen_age_groups=dict(SEEN), heatmap=Heatmap(layer="cells"))
    for k, v in overrides.items():
        setattr(rec, k, v)
    return rec


def make_tiny_onnx(path: Path, size: int = 32, seed: int = 0, record: ModelRecord | None = None,
                   with_record: bool = True, weights: np.ndarray | None = None, bias: np.ndarray | None = None,
                   centre: float = 0.5, site: bool = False) -> Path:
    """Write a tiny model to ``path`` and return it. ``weights``: the (16, 3) class weights of the
    cells (row-major 4x4), ``bias`` the (3,) class biases; default random."""
    rng = np.random.default_rng(seed)
    pool = size // 4
    w = rng.normal(0, 3.0, (16, len(CLASSES))).astype(np.float32) if weights is None else weights.astype(np.float32)
    b = rng.normal(0, 0.1, (len(CLASSES),)).astype(np.float32)
    b = b if bias is None else np.asarray(bias, np.float32)
    wa = rng.normal(0, 3.0, (16, 2)).astype(np.float32)
    consts = {"W": w, "B": b, "WA": wa, "BA": np.zeros(2, np.float32), "C": np.full((1, 16), centre, np.float32),
              "W3": w[None], "CELLS3": np.array([-1, 16, 1], np.int64), "GRID": np.array([-1, 4, 4, len(CLASSES)], np.int64)}
    raw = "raw_cells" if site else "cells"
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled4"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled4"], [raw], axis=1),
        *([helper.make_node("Mul", [raw, SITE_INPUTS[0]], ["scaled"]),
           helper.make_node("Add", ["scaled", SITE_INPUTS[1]], ["cells"]),
           helper.make_node("Identity", [raw], ["pooled"])] if site else []),
        helper.make_node("Gemm", ["cells", "W", "B"], [OUTPUT_NAME]),
        helper.make_node("Gemm", ["cells", "WA", "BA"], ["age_logits"]),
        helper.make_node("Sub", ["cells", "C"], ["centred"]),
        helper.make_node("ReduceSumSquare", ["centred"], ["ood_distance"], axes=[1], keepdims=0),
        helper.make_node("Reshape", ["cells", "CELLS3"], ["cells3"]),
        helper.make_node("Mul", ["cells3", "W3"], ["contrib"]),
        helper.make_node("Reshape", ["contrib", "GRID"], ["grid"]),
        helper.make_node("Relu", ["grid"], ["cam"]),
    ]
    n = len(CLASSES)
    if site:  # graph inputs with default values: identity alignment
        consts |= {SITE_INPUTS[0]: np.ones((1, 16), np.float32), SITE_INPUTS[1]: np.zeros((1, 16), np.float32)}
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", size, size, 1]),
         *(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16]) for name in SITE_INPUTS if site)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", n]),
         helper.make_tensor_value_info("age_logits", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("ood_distance", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 4, 4, n]),
         *([helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 16])] if site else [])],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if with_record:
        record = record or tiny_record(size)
        if site:
            record.outputs = Outputs(age_logits="age_logits", ood_distance="ood_distance", cam="cam", pooled="pooled")
            record.site_inputs = list(SITE_INPUTS)
            record.site_reference = SiteReference((centre,) * 16, (0.1,) * 16)
        attach_record(model, record)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path
