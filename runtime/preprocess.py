"""Apply the contract's preprocessing recipe to a decoded grey image (numpy + OpenCV only)."""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from .contract import Preprocessing
from .decode import NoImageContent, Reduction, unit_float

# A decoder may hand over a reduced image (see decode.read_grey) as long as, once cropped, it is
# still this many times the model's input size, so that the area resize still averages over
# 2 x 2 or more of its pixels (the tolerance this gives is in decode's docstring).
REDUCED_DECODE_MARGIN = 2
# A recipe with a lung crop resizes only the lung box: a reduced decode keeps the margin for boxes
# down to this share of the image's shorter side (``python -m xray_edge.train.lungs --check``
# reports how often real boxes are smaller: they are then resized from fewer pixels, not refused).
# 0.6 lets a 3000 px image be decoded at 1/4 (0.5 would need 1/2: JPEG 2000 ~3x slower).
LUNG_BOX_MIN_SIDE = 0.6

# The resize's implementation: part of the training feature cache's key (change it when the resize changes).
RESIZE = "numpy fixed-order area/linear v1"

# (grey image) -> (top, bottom, left, right) box of the lung fields, or None where none was found
LungBox = Callable[[np.ndarray], "tuple[int, int, int, int] | None"]


def crop_border(img: np.ndarray, fraction: float) -> np.ndarray:
    """Drop ``fraction`` of the height and width from each side."""
    h, w = img.shape[:2]
    dy, dx = _margins(h, w, fraction)
    return img[dy : h - dy or h, dx : w - dx or w]


def _margins(h: int, w: int, fraction: float) -> tuple[int, int]:
    return int(round(h * fraction)), int(round(w * fraction))


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


def min_decoded_side(spec: Preprocessing) -> int | None:
    """The shortest side a decoder may reduce an image to for ``spec`` (``min_side`` of
    decode.read_grey): REDUCED_DECODE_MARGIN times the model's input size after the crop (after a
    lung crop, a box of LUNG_BOX_MIN_SIDE of the image). None (no reduced decoding) unless the
    resize is an area resize, which can follow a reduction."""
    if spec.interpolation != "area":
        return None
    side = REDUCED_DECODE_MARGIN * spec.size / (1 - 2 * spec.crop_fraction)
    return math.ceil(side / LUNG_BOX_MIN_SIDE if spec.lung_crop is not None else side)


def preprocess(grey: np.ndarray, spec: Preprocessing, reduction: Reduction | None = None,
               lung_box: LungBox | None = None) -> np.ndarray:
    """Grey image (H, W) -> model input (size, size, 1) float32 in [0, 1]. ``grey`` is float in
    [0, 1], or uint8/uint16 as decode.read_grey gives it (made float after the crop). With a
    ``reduction`` (``grey`` is a reduced decode), the crop and the area resize are laid on the
    full image's pixel grid, so they average what they would have at full resolution. A recipe
    with a lung crop needs ``lung_box`` (``xray_edge.lungs``); the crop is skipped when it finds
    no lungs (``lung_box`` returns None)."""
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    if spec.lung_crop is not None:
        if lung_box is None:
            raise ValueError("this recipe crops to the lungs: a lung finder is needed")
        grey = unit_float(grey)
        box = lung_box(grey)
        if box is not None:
            top, bottom, left, right = box
            grey, reduction = grey[top:bottom, left:right], None  # the box is cut on the decoded grid
    if reduction is None:
        img = resize(unit_float(crop_border(grey, spec.crop_fraction)), spec.size, spec.interpolation)
    else:
        img = _resize_reduced(unit_float(grey), reduction, spec)
    img = equalise(normalise_intensity(img, spec.low_percentile, spec.high_percentile), spec)
    return img[:, :, None]


def resize(img: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """A float32 image resized to ``size`` x ``size`` as OpenCV's INTER_AREA (``area``: averages where
    it shrinks both sides, else its area-weighted linear interpolation) or INTER_LINEAR (``linear``)
    does, but in numpy, in a fixed order of float operations, so that every CPU gives the same
    bits: OpenCV's SIMD resize differs in the last bits between x86 and ARM, and the int8 rounding
    of a model's input can turn that into a moved lung box."""
    h, w = img.shape
    if interpolation == "area" and h >= size and w >= size:
        rows, row_weights = _area_taps(0.0, h, size, h)
        cols, col_weights = _area_taps(0.0, w, size, w)
    else:
        area = interpolation == "area"
        (rows, row_weights), (cols, col_weights) = _linear_taps(size, h, area), _linear_taps(size, w, area)
    return _apply_taps(img, rows, row_weights, cols, col_weights)


def _apply_taps(img: np.ndarray, rows: np.ndarray, row_weights: np.ndarray, cols: np.ndarray,
                col_weights: np.ndarray) -> np.ndarray:
    """Separable resampling: each output row a weighted sum of ``rows``, then each column of ``cols``."""
    img = (img[rows] * row_weights[:, :, None]).sum(axis=1)
    return (img[:, cols] * col_weights).sum(axis=2)


def _linear_taps(n: int, length: int, area: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, both (n, 2), of OpenCV's linear resize of ``length`` pixels to
    ``n``: pixel centres aligned, or with ``area`` the weights of its INTER_AREA when enlarging
    (each output pixel takes its source pixel, blended with the next where it straddles their
    border); edges clamped."""
    scale, dst = length / n, np.arange(n)
    if area:
        left = np.floor(dst * scale).astype(np.intp)
        frac = (dst + 1) - (left + 1) / scale
        frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    else:
        x = (dst + 0.5) * scale - 0.5
        left = np.floor(x).astype(np.intp)
        frac = x - left
    frac = np.where(left < 0, 0.0, frac).astype(np.float32)
    left = np.clip(left, 0, length - 1)
    return np.stack([left, np.minimum(left + 1, length - 1)], axis=1), np.stack([1 - frac, frac], axis=1)


def _resize_reduced(img: np.ndarray, reduction: Reduction, spec: Preprocessing) -> np.ndarray:
    """Area resize to ``spec.size`` of the full image's cropped region, mapped (fractionally)
    onto the reduced image's pixels."""
    (height, width), scale, origin = reduction.full_size, reduction.scale, reduction.origin
    dy, dx = _margins(height, width, spec.crop_fraction)
    rows, row_weights = _area_taps((dy - origin) / scale, (height - dy - origin) / scale, spec.size, img.shape[0])
    cols, col_weights = _area_taps((dx - origin) / scale, (width - dx - origin) / scale, spec.size, img.shape[1])
    return _apply_taps(img, rows, row_weights, cols, col_weights)


def _area_taps(start: float, stop: float, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, both (n, taps), of an area resize of the source span
    [start, stop) to ``n`` pixels: output i is the mean of the source over
    [start + i * step, start + (i + 1) * step), step = (stop - start) / n (what cv2.INTER_AREA
    does for whole-pixel spans). Source beyond 0..length is left out."""
    edges = start + (stop - start) / n * np.arange(n + 1)
    index = np.floor(edges[:-1]).astype(np.intp)[:, None] + np.arange(math.ceil((stop - start) / n) + 1)
    overlap = np.minimum(edges[1:, None], index + 1) - np.maximum(edges[:-1, None], index)
    weights = np.where((index >= 0) & (index < length), np.clip(overlap, 0.0, None), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(index, 0, length - 1), weights.astype(np.float32)
