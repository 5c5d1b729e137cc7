"""Fit a recipe's model on any subset of the images (a cross-origin fold or the final model) from
the cached views, and predict for any other subset.

A fit trains the dense head on the frozen base's block5_pool features of every view of the
training images (sample weights by class, or class x origin; optionally worst-group reweighting,
``fit.train``; optionally with each origin's offset of its normals' mean feature removed), then,
when the recipe fine-tunes, the last block-5 convolutions together with that head from the cached
activations (``finetune``). Predictions are always on the clean view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import numpy as np

from xray_edge.train import heads

PREDICT_CHUNK = 512  # images per predict call (float32 copies of 14 x 14 x 512 activations)


@dataclass
class Views:
    """Cached base outputs of every view: the clean view of each image and the augmented views
    (kind 1, 2, ...) of the training images."""

    pool: np.ndarray  # (V, h, w, K) float16 block5_pool
    image: np.ndarray  # (V,) index into the dataset's images
    view: np.ndarray  # (V,) 0 = clean, k = k-th augmented view
    stats: dict[str, Any]
    top_in: np.ndarray | None = None  # (V, ...) float16 input of the fine-tuned convolutions (recipes that fine-tune)

    @cached_property
    def pooled(self) -> np.ndarray:
        """Global-average-pooled block5_pool (V, K) float32 (what the age head and the gate see)."""
        return np.concatenate([self.pool[i:i + 4096].astype(np.float32).mean(axis=(1, 2))
                               for i in range(0, len(self.pool), 4096)])

    def rows(self, view: int = 0) -> np.ndarray:
        """The row of every image's view ``view``, by image index (-1 where it has none)."""
        out = np.full(int(self.image.max()) + 1, -1)
        picked = self.view == view
        out[self.image[picked]] = np.flatnonzero(picked)
        return out


@dataclass
class Fitted:
    """A model fitted on some images: logits and pooled features of any images' clean views."""

    logits: Callable[[np.ndarray], np.ndarray]  # image indices -> (n, C) float64
    pooled: Callable[[np.ndarray], np.ndarray]  # image indices -> (n, K) float32
    head: Any
    top: Any | None = None  # the fine-tuned convolutions + head (image activations -> logits); None: frozen base
    history: dict[str, Any] = field(default_factory=dict)


FitFn = Callable[[np.ndarray, np.ndarray], Fitted]  # (train mask, val mask) over images -> Fitted


def origin_offsets(pooled: np.ndarray, labels: np.ndarray, origins: np.ndarray, normal: int,
                   mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per origin of the ``mask``ed images: the mean pooled feature of its normals minus the mean of
    those origin means (origins without normals get none)."""
    means = {o: pooled[mask & (origins == o) & (labels == normal)].mean(axis=0)
             for o in sorted(set(origins[mask])) if (mask & (origins == o) & (labels == normal)).any()}
    centre = np.mean(list(means.values()), axis=0)
    return {o: (m - centre).astype(np.float32) for o, m in means.items()}


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict(x[i:i + PREDICT_CHUNK].astype(np.float32), verbose=0), np.float64)
                           for i in range(0, len(x), PREDICT_CHUNK)]) if len(x) else np.zeros((0, 0))


def fitter(cfg: Any, ds: Any, views: Views, recipe: Any, seed: int, base: Any = None) -> FitFn:
    """The recipe's fit function (``base``: the Keras base whose block 5 a fine-tuning recipe
    starts from)."""
    clean = views.rows(0)
    aug = [views.rows(k) for k in range(1, int(views.view.max()) + 1)]
    labels, origins = ds.labels, ds.origins
    normal = ds.classes.index("NORMAL") if "NORMAL" in ds.classes else -1

    def fit(train: np.ndarray, val: np.ndarray) -> Fitted:
        if recipe.drop_conflicts:
            train, val = train & ~ds.conflict, val & ~ds.conflict
        rows = np.flatnonzero(train[views.image])
        vrows = clean[np.flatnonzero(val)]
        y, yv = labels[views.image[rows]], labels[views.image[vrows]]
        o, ov = origins[views.image[rows]], origins[views.image[vrows]]
        w, wv = heads.sample_weights(y, o, recipe.origin_weights), heads.sample_weights(yv, ov, recipe.origin_weights)
        g, gv = heads.groups_of(y, o), heads.groups_of(yv, ov)
        offsets = origin_offsets(views.pooled[clean], labels, origins, normal, train) if recipe.centre else {}

        def shifted(x: np.ndarray, image_origins: np.ndarray) -> np.ndarray:
            if not offsets:
                return x
            off = np.stack([offsets.get(k, np.zeros(x.shape[-1], np.float32)) for k in image_origins])
            return (x.astype(np.float32) - off[:, None, None, :]).astype(np.float16)

        head, history = heads.train_head(
            recipe.head, shifted(views.pool[rows], o), y, shifted(views.pool[vrows], ov), yv, len(ds.classes), seed=seed,
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr or heads.LEARNING_RATES[recipe.head],
            patience=cfg.patience, w_train=w, w_val=wv, g_train=g, g_val=gv, dro_eta=recipe.dro_eta)
        if not recipe.fine_tune:
            return Fitted(lambda idx: heads.predict_logits(head, shifted(views.pool[clean[idx]], origins[idx])),
                          lambda idx: views.pooled[clean[idx]], head, None, {"head": history})
        from xray_edge.train import finetune

        images = np.flatnonzero(train)
        sampler = finetune.epoch_sampler(views.top_in, [r[images] for r in [clean, *aug]], labels[images],
                                         heads.sample_weights(labels[images], origins[images], recipe.origin_weights),
                                         heads.groups_of(labels[images], origins[images]), seed)
        top, pooled_model, tuned = finetune.fine_tune(
            base, head, recipe.fine_tune, sampler, views.top_in[vrows].astype(np.float32), yv, wv, gv,
            epochs=cfg.fine_tune_epochs, batch_size=cfg.fine_tune_batch, lr=cfg.fine_tune_lr, seed=seed,
            patience=cfg.fine_tune_patience, dro_eta=recipe.dro_eta)
        return Fitted(lambda idx: _predict(top, views.top_in[clean[idx]]),
                      lambda idx: _predict(pooled_model, views.top_in[clean[idx]]).astype(np.float32),
                      head, top, {"head": history, "fine_tune": tuned})

    return fit


def age_fitter(ds: Any, pooled: np.ndarray, seed: int) -> Callable[[np.ndarray, np.ndarray], tuple[Any, Callable]]:
    """(train mask, val mask) -> (age head, predictor of age-group probabilities for image
    indices), on the clean views' pooled features ``pooled`` (one row per image)."""
    from xray_edge.metrics import softmax

    def fit(train: np.ndarray, val: np.ndarray) -> tuple[Any, Callable]:
        tr, va = np.flatnonzero(train), np.flatnonzero(val)
        head = heads.train_age_head(pooled[tr], ds.age[tr], pooled[va], ds.age[va], seed=seed)
        return head, lambda idx: softmax(heads.predict_logits(head, pooled[idx]))

    return fit
