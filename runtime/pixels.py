"""What the image-file and DICOM decoders share: the error they raise (a one-line reason), the
pixel limit against decompression bombs, where the pixels of a reduced decode lie (Reduction) and
how often an image may be halved, and the stretch of an image's own value range to [0, 1]."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DecodeError(ValueError):
    """A file could not be decoded; the message is a one-line reason (without the path)."""


class NoImageContent(DecodeError):
    """The image decodes but holds nothing to classify (every pixel the same)."""


class Reduction(NamedTuple):
    """Where the pixels of a reduced decode lie on the full image: along each axis, pixel j
    stands for full-resolution pixels [scale * j + origin, scale * (j + 1) + origin)."""

    scale: int  # 2, 4, 8, ...
    full_size: tuple[int, int]  # (height, width) at full resolution
    origin: float  # 0 for JPEG's block averages; JPEG 2000's low-pass band is centred on pixel scale * j


def halvings(width: int, height: int, min_side: int, most: int) -> int:
    """How often (up to ``most`` times) the image can be halved, rounding up, keeping its
    shorter side at least ``min_side``."""
    n = 0
    while n < most and -(-min(width, height) >> (n + 1)) >= min_side:
        n += 1
    return n


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:g} MP"


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image dimensions {width}x{height} in header")
    if width * height > max_pixels:
        raise DecodeError(
            f"image claims {width}x{height} pixels ({megapixels(width * height)}), over the {megapixels(max_pixels)} "
            "limit (possible decompression bomb); raise it with --max-pixels if the file is genuine"
        )


def min_max(arr: np.ndarray) -> np.ndarray:
    """``arr`` (float, changed in place) stretched from its own min..max to 0..1."""
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):  # a NaN anywhere makes min and max NaN
        raise DecodeError("image contains NaN or infinite values")
    if hi <= lo:
        arr[...] = 0.0
        return arr
    arr -= lo
    arr /= hi - lo
    return arr


def one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text or type(e).__name__)[:200]
