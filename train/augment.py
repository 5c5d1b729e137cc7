"""Seeded augmentation of a decoded grey image (applied before the contract's preprocessing, to
training views only; validation and test views are always clean)."""
from __future__ import annotations

import cv2
import numpy as np

# Part of every augmented view's feature-cache key: change it when the recipe changes.
RECIPE = "v1 rot7 scale0.92-1.08 shift0.04 crop0-0.05 gamma0.8-1.25 contrast0.9-1.1 bright0.05"


def view_rng(seed: int, image_sha256: str, view: int) -> np.random.Generator:
    """The random stream of one (image, view): independent of image order and of other views."""
    return np.random.default_rng([seed, view, int(image_sha256[:16], 16)])


def augment(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small rotation (+-7 deg), scale and translation, random extra border crop, then gamma,
    contrast and brightness jitter; returns grey float32 in [0, 1]. The contract's percentile
    normalisation later undoes most of a pure contrast/brightness change; gamma and the clipping
    at 0/1 survive it."""
    h, w = grey.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-7, 7), rng.uniform(0.92, 1.08))
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * (w, h)
    img = cv2.warpAffine(grey.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    top, bottom, left, right = (rng.uniform(0, 0.05, 4) * (h, h, w, w)).astype(int)
    img = img[top:h - bottom, left:w - right]
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    img = (img - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
