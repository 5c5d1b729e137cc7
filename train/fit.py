"""The training loop shared by the dense heads and block-5 fine-tuning: Keras ``fit`` one epoch at a
time, early stopping on the validation loss with the best weights restored, and optionally
worst-group reweighting.

Worst-group reweighting (``dro_eta`` > 0) is the online form of group DRO (Sagawa et al., 2020)
with the validation split as its judge: after every epoch each (origin x class) group's mean
validation loss L_g is measured and the training weight of every image of group g is multiplied by
exp(dro_eta * (L_g - max L)) (renormalised to mean 1), so that the groups the model fits worst
count most in the next epoch; early stopping then watches the worst group's validation loss
instead of the mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class EpochData:
    """The training images of one epoch: inputs, labels, base weights and group of every image."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    groups: np.ndarray


def sample_losses(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy of every image's true class under ``model``'s logits, and whether the
    most likely class is the true one."""
    logits = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y], logits.argmax(axis=1) == y


def group_means(values: np.ndarray, groups: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Mean of ``values`` per group (weighted where ``weights`` are given)."""
    w = np.ones(len(values)) if weights is None else weights
    return {str(g): float(np.average(values[groups == g], weights=w[groups == g])) for g in np.unique(groups)}


def reweight(base: np.ndarray, groups: np.ndarray, val_loss: dict[str, float], eta: float) -> np.ndarray:
    """``base`` weights scaled per group by exp(eta * (L_g - max L)), mean 1 (groups without a
    validation loss keep the factor of the best-fitted group)."""
    worst = max(val_loss.values())
    factor = np.array([np.exp(eta * (val_loss.get(str(g), min(val_loss.values())) - worst)) for g in groups])
    w = base * factor
    return (w * len(w) / w.sum()).astype(np.float32)


def train(model: Any, epoch_data: Callable[[int], EpochData], x_val: np.ndarray, y_val: np.ndarray,
          w_val: np.ndarray, g_val: np.ndarray, *, epochs: int, batch_size: int, lr: float, patience: int,
          seed: int, dro_eta: float = 0.0) -> dict[str, list[float]]:
    """Train the compiled-here ``model`` (inputs -> logits) with Adam at ``lr``; returns the per-epoch
    history (weighted loss and accuracy on training and validation, the worst group's validation
    loss and the largest training weight).
    The weights of the best epoch (by val_loss, or by the worst group's under DRO) are restored."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=["accuracy"])
    history: dict[str, list[float]] = {k: [] for k in ("loss", "accuracy", "val_loss", "val_accuracy",
                                                       "worst_group_val_loss", "max_group_weight")}
    best, best_weights, waited = np.inf, model.get_weights(), 0
    val_loss: dict[str, float] | None = None
    for epoch in range(epochs):
        data = epoch_data(epoch)
        w = reweight(data.w, data.groups, val_loss, dro_eta) if dro_eta and val_loss else data.w
        fitted = model.fit(data.x, data.y, sample_weight=w, epochs=1, batch_size=batch_size, shuffle=True, verbose=0)
        losses, correct = sample_losses(model, x_val, y_val)
        val_loss = group_means(losses, g_val, w_val)
        history["loss"].append(float(fitted.history["loss"][0]))
        history["accuracy"].append(float(fitted.history["accuracy"][0]))
        history["val_loss"].append(float(np.average(losses, weights=w_val)))
        history["val_accuracy"].append(float(np.average(correct, weights=w_val)))
        history["worst_group_val_loss"].append(max(val_loss.values()))
        history["max_group_weight"].append(float(w.max()))
        score = history["worst_group_val_loss" if dro_eta else "val_loss"][-1]
        if score < best:
            best, best_weights, waited = score, model.get_weights(), 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.set_weights(best_weights)
    return history
