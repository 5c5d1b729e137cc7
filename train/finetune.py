"""Fine-tuning of the top of VGG-19 block 5 together with the head, on a CPU, from cached activations.

The frozen base's block4_pool activations (``train.model.CUT_LAYER``, 14 x 14 x 512 at 224 px, float16)
of every view are cached once with the other features (``train.features``). The block-5
convolutions before the trainable ones are frozen, so they too are run once over the cache
(``frozen_inputs``); an epoch then runs only the last ``n`` convolutions of block 5, block5_pool
and the head (``top``), which starts from the head already trained on the frozen features. The
trained convolutions are copied into a base with ``apply``; nothing else of the base changes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from xray_edge.train.fit import EpochData, train


def block5_convs(base: Any) -> list[Any]:
    """The block-5 convolutions of the VGG inside ``build_base``'s model, in order."""
    vgg = base.get_layer("vgg19")
    return [layer for layer in vgg.layers if layer.name.startswith("block5_conv")]


def frozen_inputs(base: Any, n: int, cut: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The input of the first of the last ``n`` block-5 convolutions for cached block4_pool
    activations ``cut`` (float16, like the cache): the frozen convolutions before it applied."""
    import keras

    frozen = block5_convs(base)[:-n]
    if not frozen:
        return cut
    inp = keras.Input(cut.shape[1:])
    x = inp
    for layer in frozen:
        x = layer(x)
    model = keras.Model(inp, x)
    return np.concatenate([np.asarray(model.predict(cut[i:i + 1024].astype(np.float32), batch_size=batch_size,
                                                    verbose=0), np.float16) for i in range(0, len(cut), 1024)])


def top(base: Any, head: Any, n: int, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """(logits model, pooled-features model) from the input of the last ``n`` block-5 convolutions:
    trainable copies of those convolutions (their current weights), block5_pool, then ``head``
    (trained in place) for the logits, or global average pooling for the pooled features."""
    import keras

    vgg = base.get_layer("vgg19")
    inp = keras.Input(input_shape)
    x = inp
    for layer in block5_convs(base)[-n:]:
        copy = layer.__class__.from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())
        copy.trainable = True
    pool = vgg.get_layer("block5_pool").__class__.from_config(vgg.get_layer("block5_pool").get_config())(x)
    head.trainable = True
    return keras.Model(inp, head(pool)), keras.Model(inp, keras.layers.GlobalAveragePooling2D()(pool))


def fine_tune(base: Any, head: Any, n: int, epoch_data: Any, x_val: np.ndarray, y_val: np.ndarray,
              w_val: np.ndarray, g_val: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
              patience: int = 2, dro_eta: float = 0.0) -> tuple[Any, Any, dict[str, list[float]]]:
    """Train the last ``n`` block-5 convolutions (copies) and ``head`` end to end on inputs from
    ``frozen_inputs``; ``epoch_data(epoch)`` gives each epoch's ``fit.EpochData``. Early stopping
    on the validation loss (``fit.train``). Returns (logits model, pooled model, history); ``base``
    is not changed (see ``apply``)."""
    if not 1 <= n <= len(block5_convs(base)):
        raise ValueError(f"can fine-tune 1 to {len(block5_convs(base))} block-5 convolutions, not {n}")
    logits_model, pooled_model = top(base, head, n, tuple(x_val.shape[1:]))
    history = train(logits_model, epoch_data, x_val, y_val, w_val, g_val, epochs=epochs, batch_size=batch_size,
                    lr=lr, patience=patience, seed=seed, dro_eta=dro_eta)
    return logits_model, pooled_model, history


def apply(base: Any, logits_model: Any) -> list[str]:
    """Copy the fine-tuned convolutions of ``logits_model`` into ``base`` (by position from the end
    of block 5); returns their names."""
    tuned = [layer for layer in logits_model.layers if layer.name.startswith("block5_conv")]
    convs = block5_convs(base)[-len(tuned):]
    for target, source in zip(convs, tuned):
        target.set_weights(source.get_weights())
    return [c.name for c in convs]


def epoch_sampler(source: np.ndarray, rows: list[np.ndarray], y: np.ndarray, w: np.ndarray, groups: np.ndarray,
                  seed: int) -> Any:
    """``epoch_data`` for ``fine_tune``: each epoch takes, for every training image, the row of one
    of its views in ``source`` (``rows``: one array of rows per view kind, aligned by image), drawn
    with a seeded generator."""
    rng = np.random.default_rng(seed)
    table = np.stack(rows, axis=1)

    def epoch(_: int) -> EpochData:
        return EpochData(source[table[np.arange(len(y)), rng.integers(0, len(rows), len(y))]], y, w, groups)

    return epoch
