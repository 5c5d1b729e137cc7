"""Seeded augmentation of a decoded grey image (applied before the contract's preprocessing, to
training views only; validation and test views are always clean).

Two recipes, each named by a string that is part of every augmented view's feature-cache key
(change it when the recipe changes):

* ``geometric``: small rotation, scale and translation, a random border crop, gamma, contrast and
  brightness jitter.
* ``processing``: every step of ``geometric``, then what differs between hospitals' pipelines
  rather than between diseases, so that "JPEG artefacts", "sharpness", "noise" and "contrast
  curve" stop identifying an origin: down- and up-scaling, blur or sharpening, noise, a random
  tone curve, and JPEG re-encoding at quality 30-95, each applied with probability 0.5-0.7.
"""
from __future__ import annotations

import cv2
import numpy as np

RECIPES = {
    "geometric": "v1 rot7 scale0.92-1.08 shift0.04 crop0-0.05 gamma0.8-1.25 contrast0.9-1.1 bright0.05",
    "processing": "v2 geometric+rescale0.35-1(p.6)+blur0.4-1.6|sharpen0.3-1.5(p.6)+noise0-0.03(p.5)"
                  "+tone-gamma0.6-1.6+scurve(p.7)+jpeg30-95(p.7)",
}


def view_rng(seed: int, image_sha256: str, view: int) -> np.random.Generator:
    """The random stream of one (image, view): independent of image order and of other views."""
    return np.random.default_rng([seed, view, int(image_sha256[:16], 16)])


def geometric(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


def processing(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``geometric``, then a random imaging/processing history (``imaging``)."""
    return imaging(geometric(grey, rng), rng)


def imaging(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random imaging/processing history (see the module docstring), pixels only: no geometry."""
    h, w = img.shape
    if rng.random() < 0.6:  # acquired or stored at a lower resolution, then resized again
        f = rng.uniform(0.35, 1.0)
        small = cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_CUBIC)
    if rng.random() < 0.6:  # a softer detector or a vendor's edge enhancement
        sigma = rng.uniform(0.4, 1.6)
        blurred = cv2.GaussianBlur(img, (0, 0), sigma)
        img = blurred if rng.random() < 0.5 else img + rng.uniform(0.3, 1.5) * (img - blurred)
    if rng.random() < 0.5:
        img = img + rng.normal(0.0, rng.uniform(0.0, 0.03), img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.7:  # a vendor tone curve: a logistic S (or inverse S) of random strength
        k = rng.uniform(-4.0, 6.0)
        if abs(k) > 0.5:
            s = 1 / (1 + np.exp(-k * (img - 0.5)))
            lo, hi = 1 / (1 + np.exp(k * 0.5)), 1 / (1 + np.exp(-k * 0.5))
            img = (s - lo) / (hi - lo)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    if rng.random() < 0.7:
        quality = int(rng.integers(30, 96))
        ok, buf = cv2.imencode(".jpg", np.round(img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    return img


AUGMENT = {"geometric": geometric, "processing": processing}


def augment(grey: np.ndarray, rng: np.random.Generator, recipe: str = "geometric") -> np.ndarray:
    """One augmented view of ``grey`` by the named recipe; grey float32 in [0, 1]."""
    return AUGMENT[recipe](grey, rng)
