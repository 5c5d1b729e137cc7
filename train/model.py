"""The Keras VGG-19 transfer-learning model: in-graph preprocessing, frozen base, dense head.

The full model maps ``image`` (N, S, S, 1) grey in [0, 1] (see ``xray_edge.contract``) to class
probabilities; its ``logits`` layer is what gets exported to ONNX. The base (preprocessing + VGG-19
convolutions) and the head are separate models so the base can be run once per image and cached.
"""
from __future__ import annotations

import os
from typing import Any

import keras

from xray_edge.contract import CLASSES, INPUT_NAME, INPUT_SIZE, VGG_BGR_MEANS

WEIGHTS_ENV = "XRAY_EDGE_VGG19_WEIGHTS"
HEADS = ("flatten", "gap")


def resolve_weights(weights: str | None) -> str | None:
    """``None``/"none": random init; "imagenet": Keras's own download/cache; else a local .h5 path
    (default from ``$XRAY_EDGE_VGG19_WEIGHTS``)."""
    weights = weights or os.environ.get(WEIGHTS_ENV)
    if weights in (None, "", "none"):
        return None
    if weights == "imagenet":
        return weights
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"VGG-19 weights file not found: {weights}")
    return weights


def build_base(weights: str | None, size: int = INPUT_SIZE) -> keras.Model:
    """image (N, S, S, 1) in [0, 1] -> VGG-19 block5_pool features, frozen.

    In-graph steps: scale to 0..255, grey -> 3 channels, VGG "caffe" BGR mean subtraction."""
    inp = keras.Input((size, size, 1), name=INPUT_NAME)
    x = keras.layers.Rescaling(255.0, name="scale_0_255")(inp)
    x = keras.layers.Concatenate(name="grey_to_bgr")([x, x, x])
    x = keras.layers.Normalization(
        mean=list(VGG_BGR_MEANS), variance=[1.0, 1.0, 1.0], name="vgg_caffe_mean_subtraction"
    )(x)
    vgg = keras.applications.VGG19(
        include_top=False, weights=resolve_weights(weights), input_shape=(size, size, 3)
    )
    vgg.trainable = False
    return keras.Model(inp, vgg(x), name="base")


def build_head(feature_shape: tuple[int, ...], head: str = "gap", n_classes: int = len(CLASSES),
               dropout: float = 0.5, seed: int = 0) -> keras.Model:
    """features -> logits. The seed's head: pooling/flatten, dropout, Dense 256, Dense 128, Dense n."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    init = keras.initializers.GlorotUniform
    inp = keras.Input(feature_shape, name="features")
    x = (keras.layers.Flatten() if head == "flatten" else keras.layers.GlobalAveragePooling2D())(inp)
    x = keras.layers.Dropout(dropout, seed=seed)(x)
    x = keras.layers.Dense(256, activation="relu", kernel_initializer=init(seed))(x)
    x = keras.layers.Dense(128, activation="relu", kernel_initializer=init(seed + 1))(x)
    x = keras.layers.Dense(n_classes, kernel_initializer=init(seed + 2), name="logits")(x)
    return keras.Model(inp, x, name=f"head_{head}")


def assemble(base: keras.Model, head: keras.Model) -> keras.Model:
    """base + head -> image to probabilities, with the head's output as layer ``logits``."""
    inp = keras.Input(base.input.shape[1:], name=INPUT_NAME)
    logits = keras.layers.Identity(name="logits")(head(base(inp)))
    probs = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model(inp, probs, name="xray_edge_vgg19")


def logits_model(model: keras.Model) -> keras.Model:
    """The sub-model image -> logits (what is exported to ONNX)."""
    return keras.Model(model.inputs, model.get_layer("logits").output, name="xray_edge_logits")


def to_onnx(model: keras.Model, opset: int = 17, output_name: str | None = None) -> Any:
    """tf2onnx export (an ``onnx.ModelProto``) of a Keras model with one input ``image``
    (N, S, S, 1) float32, dynamic batch, and one output (named ``output_name`` if given)."""
    import tensorflow as tf
    import tf2onnx
    from onnx import numpy_helper

    size = int(model.inputs[0].shape[1])
    spec = (tf.TensorSpec((None, size, size, 1), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def forward(image):
        out = model(image, training=False)
        return {output_name: out} if output_name else out

    # Constants that layers hold outside variables (the Normalization mean/variance) are captured by
    # the tf.function and would become extra graph inputs: turn them into initializers.
    captured = {inner.name: outer.numpy() for outer, inner in forward.get_concrete_function().graph.captures
                if outer.dtype != tf.resource}
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    for inp in list(graph.input):
        if inp.name in captured:
            graph.input.remove(inp)
            if inp.name in used:
                graph.initializer.append(numpy_helper.from_array(captured[inp.name], inp.name))
    if [i.name for i in graph.input] != [INPUT_NAME] or len(graph.output) != 1:
        raise RuntimeError(f"unexpected ONNX graph inputs {[i.name for i in graph.input]} / "
                           f"outputs {[o.name for o in graph.output]}")
    return proto
