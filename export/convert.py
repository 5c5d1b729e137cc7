"""Keras -> FP32 ONNX with tf2onnx, and the check that the ONNX model computes what Keras does.

The exported graph is ``train.model.logits_model``: ``image`` (N, S, S, 1) float32 in [0, 1] ->
``logits`` (N, C), batch dimension dynamic. Needs the ``train`` extras (TensorFlow, tf2onnx, onnx).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from xray_edge.contract import INPUT_NAME, OUTPUT_NAME
from xray_edge.metrics import softmax

OPSET = 17
BATCH_DIM = "N"
MAX_PROB_DIFF = 1e-4  # Keras vs ONNX FP32, max |p_keras - p_onnx| over images and classes


def keras_to_onnx(model: Any, opset: int = OPSET) -> Any:
    """The probabilities model's ``logits`` sub-model as an ``onnx.ModelProto`` (no record yet)."""
    from xray_edge.train.model import logits_model, to_onnx

    proto = to_onnx(logits_model(model), opset, output_name=OUTPUT_NAME)
    rename_output(proto, proto.graph.output[0].name, OUTPUT_NAME)
    name_batch_dim(proto)
    return proto


def rename_output(proto: Any, old: str, new: str) -> None:
    """Rename graph output ``old`` to ``new`` everywhere it is referenced."""
    if old == new:
        return
    for node in proto.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in proto.graph.output:
        if out.name == old:
            out.name = new


def name_batch_dim(proto: Any) -> None:
    """Give the dynamic first dimension of the graph input and output one symbolic name."""
    for value in (*proto.graph.input, *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM


def onnx_logits(proto_or_path: Any, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Raw ``logits`` of an ONNX model (ModelProto, bytes or path) with onnxruntime alone."""
    import onnxruntime as ort

    source = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def check_against_keras(model: Any, proto: Any, x: np.ndarray, images: str) -> dict[str, Any]:
    """Compare Keras probabilities with softmax(ONNX logits) on ``x``; ``images`` says what they are."""
    keras_probs = np.asarray(model.predict(x, batch_size=16, verbose=0), dtype=np.float64)
    onnx_probs = softmax(onnx_logits(proto, x))
    diff = float(np.abs(keras_probs - onnx_probs).max())
    return {
        "images": images,
        "n": int(len(x)),
        "max_abs_prob_diff": diff,
        "argmax_agreement": float(np.mean(keras_probs.argmax(1) == onnx_probs.argmax(1))),
        "limit": MAX_PROB_DIFF,
        "passed": diff < MAX_PROB_DIFF,
    }
