"""Train dense heads on cached base features and score them on validation."""
from __future__ import annotations

from typing import Any

import numpy as np

# Adam learning rates tuned on the CXR3 validation split (the flatten head, 6.5 M weights on
# 25,088 inputs, overfits within a few epochs at 1e-4; the GAP head, 0.16 M weights, needs 1e-3).
LEARNING_RATES = {"flatten": 1e-4, "gap": 1e-3}


def balanced_class_weight(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights: n / (n_classes * count(class))."""
    from sklearn.utils.class_weight import compute_class_weight

    w = compute_class_weight("balanced", classes=np.arange(n_classes), y=y)
    return {c: float(v) for c, v in enumerate(w)}


def sample_weights(y: np.ndarray, origins: np.ndarray, by_origin: bool) -> np.ndarray:
    """Per-image weights (mean 1) under which every class counts equally and, with ``by_origin``,
    every origin within a class counts equally (not every image)."""
    cells = np.array([f"{c}\0{o}" for c, o in zip(y, origins)]) if by_origin else y.astype(str)
    _, cell, cell_n = np.unique(cells, return_inverse=True, return_counts=True)
    _, cls, cls_n = np.unique(y, return_inverse=True, return_counts=True)
    cells_per_class = np.array([len(set(cell[cls == k])) for k in range(len(cls_n))])
    w = 1.0 / (cell_n[cell] * cells_per_class[cls])
    return (w * len(y) / w.sum()).astype(np.float32)


def groups_of(y: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """The (origin x class) group of every image, as 'origin|class index' strings."""
    return np.array([f"{o}|{c}" for o, c in zip(origins, y)])


def train_head(kind: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               n_classes: int, *, seed: int, epochs: int, batch_size: int, lr: float, patience: int,
               w_train: np.ndarray | None = None, w_val: np.ndarray | None = None,
               g_train: np.ndarray | None = None, g_val: np.ndarray | None = None,
               dro_eta: float = 0.0) -> tuple[Any, dict[str, list[float]]]:
    """Fit ``build_head(kind)`` with early stopping on the (weighted) validation loss, best weights
    restored (``fit.train``; ``dro_eta`` > 0: worst-group reweighting over the groups ``g_*``).
    Sample weights default to balanced class weights (``sample_weights``). Returns the head
    (features -> logits) and the per-epoch history."""
    import keras

    from xray_edge.train.fit import EpochData, train
    from xray_edge.train.model import build_head

    keras.utils.set_random_seed(seed)
    head = build_head(x_train.shape[1:], kind, n_classes=n_classes, seed=seed)
    if w_train is None:
        w_train = sample_weights(y_train, y_train, by_origin=False)
    if w_val is None:
        w_val = sample_weights(y_val, y_val, by_origin=False)
    data = EpochData(x_train.astype(np.float32), y_train, w_train,
                     y_train.astype(str) if g_train is None else g_train)
    history = train(head, lambda epoch: data, x_val.astype(np.float32), y_val, w_val,
                    y_val.astype(str) if g_val is None else g_val, epochs=epochs, batch_size=batch_size, lr=lr,
                    patience=patience, seed=seed, dro_eta=dro_eta)
    return head, history


def train_age_head(x_train: np.ndarray, age_train: np.ndarray, x_val: np.ndarray, age_val: np.ndarray, *,
                   seed: int, epochs: int = 60, batch_size: int = 128) -> Any:
    """Fit ``build_age_head`` (adult/child) on pooled features, balanced by age group, with early
    stopping on the validation loss."""
    import keras

    from xray_edge.train.model import build_age_head

    keras.utils.set_random_seed(seed)
    head = build_age_head(x_train.shape[1], seed=seed)
    head.get_layer("standardise").adapt(x_train.astype(np.float32))
    head.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    head.fit(x_train.astype(np.float32), age_train, sample_weight=sample_weights(age_train, age_train, False),
             validation_data=(x_val.astype(np.float32), age_val), epochs=epochs, batch_size=batch_size,
             callbacks=[stop], shuffle=True, verbose=0)
    return head


def predict_logits(model: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of a Keras features->logits model, float64."""
    return np.asarray(model.predict(x.astype(np.float32), batch_size=batch_size, verbose=0), dtype=np.float64)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
