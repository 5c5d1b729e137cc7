"""Apply the contract's preprocessing recipe to a decoded grey image (numpy + OpenCV only)."""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from .contract import Preprocessing
from .decode import NoImageContent

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}

# (grey image) -> (top, bottom, left, right) box of the lung fields, or None where none was found
LungBox = Callable[[np.ndarray], "tuple[int, int, int, int] | None"]


def crop_border(img: np.ndarray, fraction: float) -> np.ndarray:
    """Drop ``fraction`` of the height and width from each side."""
    h, w = img.shape[:2]
    dy, dx = int(round(h * fraction)), int(round(w * fraction))
    return img[dy : h - dy or h, dx : w - dx or w]


def normalise_intensity(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stretch the ``low``..``high`` percentiles to [0, 1] and clip (removes source-specific
    brightness, contrast and bit-depth differences). An image that is flat between those
    percentiles would become a blank model input: NoImageContent."""
    lo, hi = np.percentile(img, (low, high))
    if hi - lo < 1e-6:
        raise NoImageContent(f"no image content: flat between the {low:g} and {high:g} percentiles "
                             "inside the cropped border")
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def equalise(img: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """The recipe's local histogram equalisation (CLAHE, on 8 bits) of a [0, 1] image, if any."""
    if spec.intensity == "percentile":
        return img
    eight = np.round(img * 255).astype(np.uint8)
    out = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles,) * 2).apply(eight)
    return out.astype(np.float32) / 255.0


def preprocess(grey: np.ndarray, spec: Preprocessing, lung_box: LungBox | None = None) -> np.ndarray:
    """Grey float image (H, W) in [0, 1] -> model input (size, size, 1) float32 in [0, 1].

    A recipe with a lung crop needs ``lung_box`` (``xray_edge.lungs``); the crop is skipped when it
    finds no lungs (``lung_box`` returns None)."""
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    img = grey.astype(np.float32, copy=False)
    if spec.lung_crop is not None:
        if lung_box is None:
            raise ValueError("this recipe crops to the lungs: a lung finder is needed")
        box = lung_box(img)
        if box is not None:
            top, bottom, left, right = box
            img = img[top:bottom, left:right]
    img = crop_border(img, spec.crop_fraction)
    img = cv2.resize(img, (spec.size, spec.size), interpolation=_INTERPOLATION[spec.interpolation])
    img = equalise(normalise_intensity(img, spec.low_percentile, spec.high_percentile), spec)
    return img[:, :, None]
