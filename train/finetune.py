"""Optional fine-tuning of VGG-19 block 5 together with the trained head (slow on a CPU)."""
from __future__ import annotations

from typing import Any

import numpy as np

from xray_edge.train.heads import balanced_class_weight


def _vgg(base: Any) -> Any:
    """The VGG-19 sub-model inside ``build_base``'s model."""
    import keras

    return next(layer for layer in base.layers if isinstance(layer, keras.Model))


def set_block5_trainable(base: Any, trainable: bool) -> None:
    """Unfreeze (or freeze again) the block5 convolutions; blocks 1-4 stay frozen."""
    vgg = _vgg(base)
    base.trainable = trainable
    vgg.trainable = trainable
    for layer in vgg.layers:
        layer.trainable = trainable and layer.name.startswith("block5")


def fine_tune(base: Any, head: Any, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
              y_val: np.ndarray, n_classes: int, *, epochs: int, batch_size: int, lr: float, seed: int,
              patience: int = 2) -> dict[str, list[float]]:
    """Train block5 + head end to end on images (N, S, S, 1) with balanced class weights and early
    stopping on validation loss (best weights restored); base and head are updated in place and
    the base is frozen again afterwards. Returns the per-epoch history."""
    import keras

    keras.utils.set_random_seed(seed)
    set_block5_trainable(base, True)
    inp = keras.Input(base.input.shape[1:])
    model = keras.Model(inp, head(base(inp)[1]))  # base: [block5_conv4, block5_pool]
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    hist = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs, batch_size=batch_size,
                     class_weight=balanced_class_weight(y_train, n_classes), callbacks=[stop], shuffle=True,
                     verbose=2)
    set_block5_trainable(base, False)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}
