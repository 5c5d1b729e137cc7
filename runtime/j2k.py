"""JPEG 2000 codestreams (as in DICOM): what the main header says, and decoding at a reduced
resolution through Pillow's OpenJPEG.

pydicom's JPEG 2000 decoder (python-gdcm) always decodes every resolution level. OpenJPEG can
stop ``reduce`` wavelet levels short of the full image and return it at 1/2**reduce of its size
(the wavelet's low-pass band, close to an area average of the full image) for a fraction of the
work: the highest levels hold most of the coded data.
"""
from __future__ import annotations

import io
import struct
import warnings
from typing import NamedTuple

import numpy as np

# Pillow's decompression-bomb warning would reach the terminal: the decoder has checked the
# frame's size against its own pixel limit already.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

_SOC_SIZ = b"\xff\x4f\xff\x51"
_COD, _COC, _SOT = 0xFF52, 0xFF53, 0xFF90


class Header(NamedTuple):
    """The facts of a codestream's main header (SIZ, COD and COC marker segments)."""

    width: int
    height: int
    components: int
    precision: int  # bits per sample of the first component
    signed: bool
    levels: int  # fewest wavelet decomposition levels of any component: the most ``reduce`` can drop
    at_origin: bool  # no image or tile offsets


def frame_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the SIZ marker segment; ValueError without a codestream header."""
    at = _siz(data)
    x, y, x0, y0 = struct.unpack_from(">IIII", data, at + 6)
    return x - x0, y - y0


def read_header(data: bytes) -> Header:
    """The main header of the codestream in ``data``; ValueError or struct.error if malformed."""
    at = _siz(data)
    x, y, x0, y0, _, _, tx0, ty0 = struct.unpack_from(">8I", data, at + 6)
    (components,) = struct.unpack_from(">H", data, at + 38)
    sample = data[at + 40]
    levels, pos = [], at
    while True:  # marker segments up to the first tile
        marker, length = struct.unpack_from(">HH", data, pos)
        if marker == _SOT:
            break
        if length < 2:
            raise ValueError("malformed JPEG 2000 marker segment")
        if marker == _COD:
            levels.append(data[pos + 9])
        elif marker == _COC:
            levels.append(data[pos + 6 + (components >= 257)])
        pos += 2 + length
    return Header(x - x0, y - y0, components, (sample & 0x7F) + 1, bool(sample & 0x80), min(levels, default=0),
                  x0 == y0 == tx0 == ty0 == 0)


def workable_reduce(header: Header, reduce: int) -> int:
    """The largest ``r`` <= ``reduce`` that Pillow can decode: it sizes a reduced image by
    rounding half up where OpenJPEG rounds up, and fails where the two differ."""
    def agrees(side: int, r: int) -> bool:
        return (side + (1 << r >> 1)) >> r == -(-side >> r)

    while reduce > 0 and not (agrees(header.width, reduce) and agrees(header.height, reduce)):
        reduce -= 1
    return reduce


def decode_reduced(data: bytes, header: Header, reduce: int) -> np.ndarray:
    """The stored sample values of a one-component codestream at 1/2**reduce of its size,
    uint8/uint16 (int32 where signed). Raises (Pillow's exceptions, ValueError) on failure."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["JPEG2000"]) as image:
        image.reduce = reduce
        image.load()
        pixels = np.asarray(image)
    expected = (-(-header.height >> reduce), -(-header.width >> reduce))
    if pixels.shape != expected or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"Pillow gave {pixels.dtype} {pixels.shape}, expected {expected}")
    # Pillow scales samples up to its 8- or 16-bit mode and offsets signed ones to unsigned
    stored = pixels >> (8 * pixels.itemsize - header.precision)
    if header.signed:
        return stored.astype(np.int32) - (1 << (header.precision - 1))
    return stored


def _siz(data: bytes) -> int:
    """Offset of the SIZ marker (right after SOC)."""
    at = data.find(_SOC_SIZ)
    if at < 0:
        raise ValueError("no JPEG 2000 codestream header")
    return at + 2
