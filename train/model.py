"""The Keras VGG-19 transfer-learning model: in-graph preprocessing, frozen base, dense head, and
the outputs the runtime needs besides the class logits.

The full model (``assemble``) maps ``image`` (N, S, S, 1) grey in [0, 1] (see
``xray_edge.contract``), and the site inputs ``site_scale`` and ``site_shift`` (1, K) (identity by
default: ``image_only``), to five outputs, exported to ONNX under the same names. The site inputs
align the block5_pool features per channel (``x * scale + shift``, ``xray_edge.site``) before
every head, the gate and Grad-CAM:

* ``logits`` (N, C): the class head on the (aligned) VGG-19 block5_pool features;
* ``age_logits`` (N, 2): adult / child, from the same features (``contract.AGE_GROUPS`` order);
* ``ood_distance`` (N,): the smallest squared Mahalanobis distance of the image's pooled features to
  a class mean of the training features (shared, shrunk covariance): the input gate's score;
* ``cam`` (N, h, w, C): Grad-CAM of every class on block5_conv4, computed in the graph from the
  head's own weights (``GradCAM``), so that heatmaps need no TensorFlow at run time;
* ``pooled`` (N, K): the global average of block5_pool before alignment (what site calibration
  measures a clinic's normals by).

The base (preprocessing + VGG-19 convolutions) and the heads are separate models so the base can
be run once per image and its features cached.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from xray_edge.contract import AGE_GROUPS, CLASSES, INPUT_NAME, INPUT_SIZE, SITE_INPUTS, VGG_BGR_MEANS

WEIGHTS_ENV = "XRAY_EDGE_VGG19_WEIGHTS"
HEADS = ("flatten", "gap")
ARCHS = ("vgg19", "vgg-tiny")  # vgg-tiny: VGG's five blocks at a few channels, random weights (tests, dry runs)
TINY_WIDTHS = (16, 32, 64, 64, 64)
CAM_LAYER = "block5_conv4"
CUT_LAYER = "block4_pool"  # the last frozen activations, cached for block-5 fine-tuning (train.finetune)
OUTPUTS = ("logits", "age_logits", "ood_distance", "cam", "pooled")


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


def tiny_vgg(size: int, seed: int = 0) -> keras.Model:
    """VGG's layout (five blocks of 3x3 convolutions and 2x2 max pools, the last convolution
    named block5_conv4) with one convolution per block and ``TINY_WIDTHS`` channels, random
    weights: the same graph shapes in a model small enough for tests and dry runs."""
    inp = keras.Input((size, size, 3))
    x = inp
    for block, width in enumerate(TINY_WIDTHS, start=1):
        name = f"block{block}_conv{4 if block == 5 else 1}"
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=name,
                                kernel_initializer=keras.initializers.HeNormal(seed + block))(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inp, x, name="vgg_tiny")


def build_base(weights: str | None, size: int = INPUT_SIZE, arch: str = "vgg19") -> keras.Model:
    """image (N, S, S, 1) in [0, 1] -> [block5_conv4 activations, block5_pool features, block4_pool
    activations], frozen.

    In-graph steps: scale to 0..255, grey -> 3 channels, VGG "caffe" BGR mean subtraction.
    ``arch`` "vgg-tiny" swaps in :func:`tiny_vgg` (random weights only)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "vgg-tiny" and weights is not None:
        raise ValueError("the vgg-tiny base has no pretrained weights: use --weights none")
    inp = keras.Input((size, size, 1), name=INPUT_NAME)
    x = keras.layers.Rescaling(255.0, name="scale_0_255")(inp)
    x = keras.layers.Concatenate(name="grey_to_bgr")([x, x, x])
    x = keras.layers.Normalization(
        mean=list(VGG_BGR_MEANS), variance=[1.0, 1.0, 1.0], name="vgg_caffe_mean_subtraction"
    )(x)
    vgg = (keras.applications.VGG19(include_top=False, weights=resolve_weights(weights), input_shape=(size, size, 3))
           if arch == "vgg19" else tiny_vgg(size))
    vgg = keras.Model(vgg.input, [vgg.get_layer(CAM_LAYER).output, vgg.output, vgg.get_layer(CUT_LAYER).output],
                      name="vgg19")
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


def build_age_head(n_features: int, seed: int = 0) -> keras.Model:
    """pooled features -> age-group logits (adult, child): a linear layer on standardised inputs."""
    inp = keras.Input((n_features,), name="pooled")
    x = keras.layers.Normalization(name="standardise")(inp)  # adapted to the training features
    x = keras.layers.Dense(len(AGE_GROUPS), kernel_initializer=keras.initializers.GlorotUniform(seed),
                           kernel_regularizer=keras.regularizers.L2(1e-3), name="age_logits")(x)
    return keras.Model(inp, x, name="head_age")


def head_kind(head: keras.Model) -> str:
    return "flatten" if any(isinstance(layer, keras.layers.Flatten) for layer in head.layers) else "gap"


def dense_weights(head: keras.Model) -> list[np.ndarray]:
    """[W1, b1, W2, b2, W3, b3] of the head's three Dense layers, in order."""
    return [np.asarray(w) for layer in head.layers if isinstance(layer, keras.layers.Dense) for w in layer.get_weights()]


@keras.saving.register_keras_serializable(package="xray_edge")
class MahalanobisDistance(keras.layers.Layer):
    """(N, D) features -> (N,) min over classes of the squared Mahalanobis distance
    ``|(x - mean_c) @ whiten|^2`` (``whiten`` @ whiten.T = the inverse covariance)."""

    def __init__(self, n_classes: int, n_features: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_classes, self.n_features = n_classes, n_features
        self.whiten = self.add_weight(shape=(n_features, n_features), initializer="zeros", trainable=False, name="whiten")
        self.centres = self.add_weight(shape=(n_classes, n_features), initializer="zeros", trainable=False,
                                       name="centres")  # class means @ whiten

    def call(self, x):
        z = ops.expand_dims(ops.matmul(x, self.whiten), 1) - ops.expand_dims(self.centres, 0)
        return ops.min(ops.sum(z * z, axis=-1), axis=-1)

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"n_classes": self.n_classes, "n_features": self.n_features}


@keras.saving.register_keras_serializable(package="xray_edge")
class SiteAlign(keras.layers.Layer):
    """[features (N, h, w, K), scale (1, K), shift (1, K)] -> features * scale + shift per channel
    (per pooled feature after global average pooling)."""

    def call(self, inputs):
        x, scale, shift = inputs
        return x * ops.reshape(scale, (1, 1, 1, -1)) + ops.reshape(shift, (1, 1, 1, -1))


@keras.saving.register_keras_serializable(package="xray_edge")
class Constant(keras.layers.Layer):
    """Any input -> a (1, n) tensor of ``value`` (the identity site inputs of ``image_only``)."""

    def __init__(self, n: int, value: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.n, self.value = n, value

    def call(self, x):
        return ops.full((1, self.n), self.value, dtype=x.dtype)

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"n": self.n, "value": self.value}


@keras.saving.register_keras_serializable(package="xray_edge")
class GradCAM(keras.layers.Layer):
    """[block5_conv4 activations A (N, h, w, K), site scale, site shift (1, K)] -> Grad-CAM maps
    (N, h, w, C) of every class.

    The class head is ``pool(maxpool2(A) * scale + shift)`` (global average or flatten) -> Dense-ReLU -> Dense-ReLU
    -> Dense; this layer holds a copy of its weights and differentiates it analytically: the
    gradient of logit c with respect to the pooled input is W1 (m1 * (W2 (m2 * W3[:, c]))) with the
    ReLU masks m of this image. Max pooling routes each window's gradient to its maximum, so the
    Grad-CAM channel weight (the spatial mean of dlogit/dA) is the sum over block5_pool positions
    of dlogit/dF divided by h * w, and the map is ReLU(sum_k weight_k A_k)."""

    def __init__(self, kind: str, n_channels: int, pooled_shape: Sequence[int], hidden: Sequence[int],
                 n_classes: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.kind, self.n_channels, self.n_classes = kind, n_channels, n_classes
        self.pooled_shape, self.hidden = list(pooled_shape), list(hidden)
        n_in = n_channels * (int(np.prod(pooled_shape)) if kind == "flatten" else 1)
        sizes = [n_in, *hidden, n_classes]
        self.dense = [(self.add_weight(shape=(a, b), initializer="zeros", trainable=False, name=f"w{i}"),
                       self.add_weight(shape=(b,), initializer="zeros", trainable=False, name=f"b{i}"))
                      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def call(self, inputs):
        a, scale, shift = inputs
        f = ops.max_pool(a, 2, 2) * ops.reshape(scale, (1, 1, 1, -1)) + ops.reshape(shift, (1, 1, 1, -1))  # aligned pool
        positions = int(np.prod(self.pooled_shape))
        x = ops.reshape(f, (-1, positions * self.n_channels)) if self.kind == "flatten" else ops.mean(f, axis=(1, 2))
        masks = []
        for w, b in self.dense[:-1]:
            x = ops.relu(ops.matmul(x, w) + b)
            masks.append(ops.sign(x))  # the ReLU's gradient, 1 where it passed, 0 where it cut (no Cast op)
        grad = ops.expand_dims(masks[-1], -1) * ops.expand_dims(self.dense[-1][0], 0)  # (N, units, C)
        for (w, _), mask in zip(reversed(self.dense[1:-1]), reversed(masks[:-1])):
            grad = ops.expand_dims(mask, -1) * ops.einsum("jk,nkc->njc", w, grad)
        # d logit / d pooled input. Global average pooling spreads it evenly over the block5_pool
        # positions, so its sum over them is the gradient itself; flatten has one per position.
        grad = ops.einsum("ij,njc->nic", self.dense[0][0], grad)
        if self.kind == "flatten":
            grad = ops.sum(ops.reshape(grad, (-1, positions, self.n_channels, self.n_classes)), axis=1)
        # the alignment scales each channel: d logit / d pool = scale * d logit / d aligned pool
        weights = grad * ops.reshape(scale, (1, -1, 1)) / float(a.shape[1] * a.shape[2])
        return ops.relu(ops.einsum("nhwk,nkc->nhwc", a, weights))

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"kind": self.kind, "n_channels": self.n_channels, "pooled_shape": self.pooled_shape,
                                       "hidden": self.hidden, "n_classes": self.n_classes}


def grad_cam_layer(head: keras.Model, feature_shape: Sequence[int]) -> GradCAM:
    """A GradCAM layer holding a copy of ``head``'s weights (``feature_shape``: block5_pool h, w, K)."""
    weights = dense_weights(head)
    layer = GradCAM(head_kind(head), int(feature_shape[-1]), list(feature_shape[:2]),
                    [w.shape[1] for w in weights[0:-2:2]], weights[-1].shape[0], name="cam")
    layer.set_weights(weights)
    return layer


def mahalanobis_layer(means: np.ndarray, whiten: np.ndarray) -> MahalanobisDistance:
    layer = MahalanobisDistance(means.shape[0], means.shape[1], name="ood_distance")
    layer.set_weights([whiten.astype(np.float32), (means @ whiten).astype(np.float32)])
    return layer


def assemble(base: keras.Model, head: keras.Model, age_head: keras.Model, means: np.ndarray,
             whiten: np.ndarray) -> keras.Model:
    """base + heads -> [image, site_scale, site_shift] to {logits, age_logits, ood_distance, cam,
    pooled} (``OUTPUTS``)."""
    inp = keras.Input(base.input.shape[1:], name=INPUT_NAME)
    conv4, pool, _ = base(inp)
    k = int(pool.shape[-1])
    scale, shift = (keras.Input((k,), batch_size=1, name=name) for name in SITE_INPUTS)
    aligned = SiteAlign(name="site_align")([pool, scale, shift])
    pooled = keras.layers.GlobalAveragePooling2D(name="pooled_aligned")(aligned)
    outputs = {
        "logits": keras.layers.Identity(name="logits")(head(aligned)),
        "age_logits": keras.layers.Identity(name="age_logits")(age_head(pooled)),
        "ood_distance": mahalanobis_layer(means, whiten)(pooled),
        "cam": grad_cam_layer(head, pool.shape[1:])([conv4, scale, shift]),
        "pooled": keras.layers.GlobalAveragePooling2D(name="pooled")(pool),
    }
    return keras.Model([inp, scale, shift], outputs, name="xray_edge_vgg19")


def image_only(model: keras.Model) -> keras.Model:
    """``assemble``'s model with the site inputs at the identity (scale 1, shift 0): image -> outputs."""
    inp = keras.Input(model.inputs[0].shape[1:], name=INPUT_NAME)
    k = int(model.inputs[1].shape[-1])
    return keras.Model(inp, model([inp, Constant(k, 1.0)(inp), Constant(k, 0.0)(inp)]), name="xray_edge_image_only")


def logits_model(model: keras.Model) -> keras.Model:
    """image -> logits, site inputs (where the model has them) at the identity (what the Keras and
    TFLite benchmark rows run)."""
    if len(model.inputs) == 1:
        return keras.Model(model.inputs, model.get_layer("logits").output, name="xray_edge_logits")
    inp = keras.Input(model.inputs[0].shape[1:], name=INPUT_NAME)
    return keras.Model(inp, image_only(model)(inp)["logits"], name="xray_edge_logits")


def to_onnx(model: keras.Model, opset: int = 17, names: Sequence[str] | None = None) -> Any:
    """tf2onnx export (an ``onnx.ModelProto``) of a Keras model whose first input is ``image``
    (N, S, S, 1) float32, dynamic batch; the site inputs of ``assemble``'s model (1, K) become graph
    inputs with their identity as default values (initializers of the same name), so a caller that
    feeds only the image gets the unaligned model. A model with dict outputs gives the graph outputs
    in ``names`` order (default: the dict's keys), named so; list outputs keep tf2onnx's names."""
    import tensorflow as tf
    import tf2onnx
    from onnx import numpy_helper

    size = int(model.inputs[0].shape[1])
    site = [i for i in model.inputs[1:] if i.name in SITE_INPUTS]
    if len(site) != len(model.inputs) - 1:
        raise RuntimeError(f"unexpected model inputs {[i.name for i in model.inputs]}")
    spec = (tf.TensorSpec((None, size, size, 1), tf.float32, name=INPUT_NAME),
            *(tf.TensorSpec((1, int(i.shape[-1])), tf.float32, name=i.name) for i in site))
    keys = list(names or (model.output.keys() if isinstance(model.output, dict) else []))

    @tf.function(input_signature=spec)
    def forward(*inputs):
        out = model(list(inputs) if site else inputs[0], training=False)
        return [out[k] for k in keys] if keys else out

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
    if [i.name for i in graph.input] != [INPUT_NAME, *(i.name for i in site)] or (keys and len(graph.output) != len(keys)):
        raise RuntimeError(f"unexpected ONNX graph inputs {[i.name for i in graph.input]} / "
                           f"outputs {[o.name for o in graph.output]}")
    for i in site:  # defaults: scale 1, shift 0
        default = 1.0 if i.name == SITE_INPUTS[0] else 0.0
        graph.initializer.append(numpy_helper.from_array(np.full((1, int(i.shape[-1])), default, np.float32), i.name))
    for out, key in zip(list(graph.output), keys):
        rename_value(proto, out.name, key)
    return proto


def rename_value(proto: Any, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in the graph (node inputs/outputs, graph outputs)."""
    if old == new:
        return
    for node in proto.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in proto.graph.output:
        if out.name == old:
            out.name = new
