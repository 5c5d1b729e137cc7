"""Keras -> FP32 ONNX with tf2onnx, and the check that the ONNX model computes what Keras does.

The exported graph maps ``image`` (N, S, S, 1) float32 in [0, 1], and the optional site inputs
(1, K) (identity by default), to the model's outputs (``train.model.OUTPUTS``: logits, age_logits,
ood_distance, cam, pooled), batch dimension dynamic. The
first convolution is given a fourth input channel with zero weights (``four_channel_input``):
onnxruntime's fast int8 convolution kernels skip a convolution with three input channels.
Needs the ``train`` extras (TensorFlow, tf2onnx, onnx).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from xray_edge.contract import INPUT_NAME, SITE_INPUTS

OPSET = 17
BATCH_DIM = "N"
# Keras vs ONNX FP32: max |p_keras - p_onnx| of the class and age probabilities, and the max
# difference of the gate distance and the heatmaps relative to their largest value.
MAX_PROB_DIFF = 1e-4
MAX_RELATIVE_DIFF = 1e-3


def keras_to_onnx(model: Any, opset: int = OPSET, four_channels: bool = True) -> Any:
    """The model's outputs as an ``onnx.ModelProto`` (no record yet)."""
    from xray_edge.train.model import OUTPUTS, to_onnx

    proto = to_onnx(model, opset, names=[n for n in OUTPUTS if n in model.output])
    if four_channels:
        four_channel_input(proto)
    name_batch_dim(proto)
    return proto


def name_batch_dim(proto: Any) -> None:
    """Give the dynamic first dimension of the image input and the outputs one symbolic name."""
    for value in (proto.graph.input[0], *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM


def four_channel_input(proto: Any) -> None:
    """Feed the first convolution four channels instead of three: the grey-to-BGR Concat repeats
    the image a fourth time, the mean subtraction and scaling treat it like the first channel (so
    its int8 range is the same) and the convolution gets zero weights for it. The output is
    unchanged; the int8 convolution can then use onnxruntime's fast kernels. Raises RuntimeError
    if the graph does not have the expected Concat -> Sub -> Mul -> Transpose -> Conv start."""
    from onnx import numpy_helper

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    chain = [conv]
    for op in ("Transpose", "Mul", "Sub", "Concat"):
        node = producer.get(chain[-1].input[0])
        if node is None or node.op_type != op:
            raise RuntimeError(f"unexpected graph before the first convolution ({op} expected)")
        chain.append(node)
    _, _, mul, sub, concat = chain
    if len(concat.input) != 3 or len(set(concat.input)) != 1:
        raise RuntimeError("the first convolution's input is not one grey channel repeated three times")
    concat.input.append(concat.input[0])

    def widen(name: str, pad: Any) -> None:
        array = numpy_helper.to_array(inits[name])
        wide = pad(array)
        inits[name].CopyFrom(numpy_helper.from_array(wide.astype(array.dtype), name))

    widen(sub.input[1], lambda a: np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]).reshape((*a.shape[:-1], 4)))
    widen(mul.input[1], lambda a: np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]).reshape((*a.shape[:-1], 4)))
    widen(conv.input[1], lambda w: np.concatenate([w, np.zeros_like(w[:, :1])], axis=1))


def onnx_outputs(proto_or_path: Any, x: np.ndarray, batch_size: int = 16,
                 site: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every output of an ONNX model (ModelProto or path) on ``x``, with onnxruntime alone; ``site``
    feeds the site inputs (default: their identity values in the graph)."""
    import onnxruntime as ort

    source = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {INPUT_NAME: x[i:i + batch_size], **(site or {})}) for i in range(0, len(x), batch_size)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def _keras_outputs(model: Any, x: np.ndarray, site: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The Keras model's outputs on ``x``: image only, or with the site inputs fed."""
    from xray_edge.train.model import image_only

    if site is None:
        return {k: np.asarray(v, np.float64) for k, v in image_only(model).predict(x, batch_size=16, verbose=0).items()}
    parts = [model([x[i:i + 16], *(site[n] for n in SITE_INPUTS)], training=False) for i in range(0, len(x), 16)]
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) for k in parts[0]}


def site_probe(model: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded, non-identity site inputs (scale 0.8-1.25, shift within +-10 % of the feature's
    typical size) for checking the aligned path."""
    rng = np.random.default_rng(seed)
    k = int(model.inputs[1].shape[-1])
    return {SITE_INPUTS[0]: rng.uniform(0.8, 1.25, (1, k)).astype(np.float32),
            SITE_INPUTS[1]: rng.normal(0, 0.1, (1, k)).astype(np.float32)}


def check_against_keras(model: Any, proto: Any, x: np.ndarray, images: str) -> dict[str, Any]:
    """Compare every output of Keras and of the ONNX graph on ``x`` (``images`` says what they are),
    with the site inputs at their default and, for a model that has them, at ``site_probe``'s values."""
    from xray_edge.metrics import softmax

    checks = [None] + ([site_probe(model)] if len(model.inputs) > 1 else [])
    diffs: dict[str, float] = {}
    agreement = 1.0
    for site in checks:
        keras_out, onnx_out = _keras_outputs(model, x, site), onnx_outputs(proto, x, site=site)
        for name, ref in keras_out.items():
            got = np.asarray(onnx_out[name], np.float64)
            key = name if site is None else f"{name} (site inputs fed)"
            if name.endswith("logits"):
                diffs[key] = float(np.abs(softmax(ref) - softmax(got)).max())
            else:
                diffs[key] = float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-12))
        agreement = min(agreement, float(np.mean(keras_out["logits"].argmax(1) == onnx_out["logits"].argmax(1))))
    limits = {name: MAX_PROB_DIFF if name.split(" ")[0].endswith("logits") else MAX_RELATIVE_DIFF for name in diffs}
    return {
        "images": images,
        "n": int(len(x)),
        "max_abs_prob_diff": diffs["logits"],
        "differences": diffs,
        "limits": limits,
        "argmax_agreement": agreement,
        "limit": MAX_PROB_DIFF,
        "passed": all(diffs[k] < limits[k] for k in diffs),
    }
