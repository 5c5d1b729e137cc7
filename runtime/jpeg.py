"""JPEG frame headers (SOF): the coding process, sample precision and size, read without
decoding anything, with a check that the file is not cut off before its image data ends."""
from __future__ import annotations

import struct
from typing import NamedTuple

from .pixels import DecodeError

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS
DCT_PROCESSES = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}  # non-hierarchical DCT processes: libjpeg can scale these


class Frame(NamedTuple):
    """A JPEG's frame header (SOF)."""

    marker: int  # the SOF marker: which coding process
    precision: int  # bits per sample
    width: int
    height: int


def frame_size(data: bytes) -> tuple[int, int]:
    frame = frame_header(data)
    return frame.width, frame.height


def frame_header(data: bytes) -> Frame:
    """The frame header; checks an end-of-image marker follows the first scan (truncation)."""
    pos, frame = 2, None
    while True:
        pos = data.find(b"\xff", pos)  # like libjpeg, skip stray bytes between segments
        if pos < 0:
            raise DecodeError("truncated JPEG (file ends inside its header)")
        while data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if marker == 0xD9:
            raise DecodeError("malformed JPEG (no image data)")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in SOF_MARKERS:
            precision, height, width = struct.unpack(">BHH", data[pos + 4 : pos + 9])
            frame = Frame(marker, precision, width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if frame is None:
                raise DecodeError("malformed JPEG (scan before frame header)")
            if data.find(b"\xff\xd9", pos) < 0:
                raise DecodeError("truncated JPEG (no end-of-image marker)")
            return frame
        pos += 2 + length
