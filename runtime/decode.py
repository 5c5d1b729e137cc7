"""Decode an image file to a grey (H, W) array: float32 in [0, 1] (read_image), or as little
converted and, for large JPEG and JPEG 2000, as little decoded as the model needs (read_grey).

Formats: PNG (8/16-bit), JPEG, BMP, TIFF (grey, RGB or RGBA) and DICOM (MONOCHROME1/2), in any
transfer syntax pydicom has a decoder for (native, deflated, RLE, and with python-gdcm JPEG
baseline/lossless, JPEG-LS and JPEG 2000). The format is found from the file's signature, not
its name (a name ending in .dcm only matters for a DICOM data set without the Part 10 preamble).
Only regular files are read (see :mod:`files`). Colour is reduced to grey with
Rec. 601 luma (0.299 R + 0.587 G + 0.114 B); an alpha channel is dropped; 8-bit values are
divided by 255 and 16-bit values by 65535. JPEG EXIF orientation is applied.

DICOM is read by :mod:`dicom` (the modality LUT, the VOI window or LUT, MONOCHROME1; shared
with the DICOM node).

Reduced decoding (read_grey's ``min_side``; the classify pipeline gives preprocess's
min_decoded_side, 534 pixels for the 224 x 224 model: twice its input after the 8 % crop):
an 8-bit DCT JPEG is decoded at 1/2, 1/4 or 1/8 by libjpeg's DCT-domain scaling (the scale
dividing both sides), a JPEG 2000 DICOM at 1/2**n by dropping n wavelet levels (Pillow's
OpenJPEG; python-gdcm cannot), the smallest size whose shorter side is still ``min_side``.
Other DICOM (uncompressed, or decoded in full by pydicom) is averaged over 2**n x 2**n blocks
of its stored integers before the float conversion, rescale and window, where those are affine
over the image's values (no LUT, no SIGMOID window, a window that clips none of them), so that
averaging first is what full decoding followed by the area resize gives (to within the
integer rounding of the averages).
The Reduction returned with the pixels lets preprocess lay the crop and the area resize on the
full image's pixel grid. Tolerance, on the [0, 1] model input against full decoding: max abs
0.05 and mean abs 0.006 (tested). Measured on real chest X-rays (224 x 224 originals upscaled
to 1070-4400 pixels, noise sd 0.5 %, 8 to 16 per size): JPEG max 0.041, mean 0.0015; JPEG 2000
max 0.016, mean 0.0012; on synthetic images with strong texture at the input's pixel scale:
max 0.040, mean 0.0058. Shifting the same full images by one pixel changes the input by up to
max 0.26, mean 0.007. Large burned-in text is worse: where its edges set the 99.5th
percentile, the stretch of the whole image moves (measured up to max 0.16, mean 0.015).

Decompression bombs: the image dimensions are read from the file header (PNG IHDR, JPEG SOF,
BMP info header, TIFF IFD, DICOM Rows/Columns) and checked against ``max_pixels`` before any
pixel is decoded. DICOM is checked further before pydicom decodes anything: a deflated data set
is inflated here with a hard output cap, native pixel data must hold exactly the declared
frames (no undeclared or extra frames), and a compressed frame's own header must give the
declared size. An image whose pixels all have one value has no content and is refused.
Every failure raises :class:`DecodeError` with a one-line reason.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from . import jpeg
from .dicom import decode_dicom
from .files import FileTooLarge, NotRegularFile, read_regular
from .inputs import DEFAULT_MAX_PIXELS, DICOM_SUFFIXES, is_dicom  # noqa: F401 (re-exported)
from .pixels import DecodeError, NoImageContent, Reduction, check_pixels, halvings, megapixels, min_max  # noqa: F401 (re-exports)

_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR  # keeps 16-bit, drops alpha, applies EXIF
_JPEG_SCALED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = ((_PNG_SIGNATURE, "PNG"), (b"\xff\xd8", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` at full resolution to a grey float32 (H, W) array in [0, 1]."""
    return unit_float(read_grey(path, max_pixels)[0])


def read_grey(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
              min_side: int | None = None) -> tuple[np.ndarray, Reduction | None]:
    """Decode ``path`` to a grey (H, W) array without converting what needs no converting: the
    decoder's uint8 or uint16 for grey PNG, JPEG, BMP and TIFF (see :func:`unit_float`), float32
    in [0, 1] for the rest. With ``min_side``, a large JPEG or DICOM is decoded (or, for DICOM
    that cannot be, averaged) at 1/2, 1/4 or 1/8 (JPEG 2000: 1/2**n) of its size, the smallest
    whose shorter side is still at least ``min_side``, and its Reduction comes with it (else None)."""
    data = _read_bytes(path, max_pixels)
    fmt = file_format(data)
    if fmt == "DICOM" or (fmt is None and Path(path).suffix.lower() in DICOM_SUFFIXES):
        grey, reduction = decode_dicom(data, max_pixels, min_side)
    else:
        grey, reduction = _decode_raster(data, max_pixels, min_side)
    if grey.min() == grey.max():
        raise NoImageContent("no image content: constant pixel values")
    return grey, reduction


def unit_float(grey: np.ndarray) -> np.ndarray:
    """A grey array as float32 in [0, 1]: uint8 divided by 255 and uint16 by 65535 (a new
    array), float as it is (float32 without a copy)."""
    scale = _FULL_SCALE.get(grey.dtype)
    if scale is None:
        return grey.astype(np.float32, copy=False)
    out = grey.astype(np.float32)
    out /= scale
    return out


def file_format(data: bytes) -> str | None:
    """'DICOM', 'PNG', 'JPEG', 'BMP' or 'TIFF' from the file's signature; None if unknown."""
    if is_dicom(data):
        return "DICOM"
    return next((fmt for signature, fmt in _SIGNATURES if data.startswith(signature)), None)


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of a PNG, JPEG, BMP or TIFF file, without
    decoding pixels; raises DecodeError for other, truncated or malformed data."""
    fmt = file_format(data)
    size = {"PNG": _png_size, "JPEG": jpeg.frame_size, "BMP": _bmp_size, "TIFF": _tiff_size}.get(fmt or "")
    if size is None:
        raise DecodeError("not a supported image (PNG, JPEG, BMP, TIFF or DICOM); unrecognised file signature")
    try:
        return (fmt, *size(data))
    except (struct.error, IndexError):
        raise DecodeError("truncated or malformed image header") from None


def _decode_raster(data: bytes, max_pixels: int, min_side: int | None) -> tuple[np.ndarray, Reduction | None]:
    fmt, width, height = image_header(data)
    check_pixels(width, height, max_pixels)
    scale = _jpeg_scale(jpeg.frame_header(data), min_side) if fmt == "JPEG" and min_side else 1
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_SCALED[scale] if scale > 1 else _FLAGS)
    if arr is None or arr.size == 0:
        raise DecodeError(f"cannot decode {fmt} (corrupt or unsupported data)")
    grey = arr if arr.ndim == 2 and arr.dtype in _FULL_SCALE else to_grey(arr)
    if scale == 1:
        return grey, None
    return grey, Reduction(scale, (grey.shape[0] * scale, grey.shape[1] * scale), 0.0)


def _jpeg_scale(frame: jpeg.Frame, min_side: int) -> int:
    """1, or for an 8-bit DCT JPEG, the largest of 2, 4 and 8 that libjpeg can scale it down by
    (straight to grey, EXIF orientation still applied) keeping its shorter side at least
    ``min_side``. The scale must divide both sides, so that whichever way EXIF turns or flips
    the image, the scaled pixels are block averages aligned with its edges. (The scaling flags
    would also drop the 16-bit output of a 12-bit JPEG.)"""
    if frame.precision != 8 or frame.marker not in jpeg.DCT_PROCESSES:
        return 1
    n = halvings(frame.width, frame.height, min_side, 3)
    while n and (frame.width | frame.height) & ((1 << n) - 1):
        n -= 1
    return 1 << n


def to_grey(arr: np.ndarray) -> np.ndarray:
    """OpenCV image (H, W) or (H, W, 3|4) BGR[A] of any depth -> grey float32 (H, W) in [0, 1]."""
    if arr.dtype in _FULL_SCALE:
        grey = unit_float(arr)
    else:  # float or signed TIFF: no fixed range, use the image's own
        grey = min_max(arr.astype(np.float64)).astype(np.float32)
    if grey.ndim == 3:
        channels = grey.shape[2]
        if channels in (3, 4):
            grey = cv2.cvtColor(grey, cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY)
        else:
            grey = grey[:, :, 0]
    return np.ascontiguousarray(np.clip(grey, 0.0, 1.0), dtype=np.float32)


def _read_bytes(path: str | os.PathLike, max_pixels: int) -> bytes:
    """The file's bytes, or DecodeError saying why not (never blocks on a FIFO or device)."""
    try:
        data = read_regular(path, 8 * max_pixels + (64 << 20))
    except FileTooLarge as e:
        raise DecodeError(f"file is {e.size / 2**20:.0f} MiB, too large for the {megapixels(max_pixels)} pixel limit") from None
    except NotRegularFile as e:
        raise DecodeError("is a folder, not a file" if e.kind == "folder" else str(e)) from None
    except PermissionError:
        raise DecodeError("permission denied (file is not readable)") from None
    except FileNotFoundError:
        reason = "broken symbolic link (its target does not exist)" if os.path.islink(path) else "file not found"
        raise DecodeError(reason) from None
    except OSError as e:
        raise DecodeError(f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return data


def _png_size(data: bytes) -> tuple[int, int]:
    """IHDR dimensions; walks the chunks (lengths and CRCs) so truncation or corruption is
    reported here rather than by libpng."""
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise DecodeError("malformed PNG (first chunk is not IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    view, pos = memoryview(data), 8  # CRCs over views: no copy of the chunks
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        if zlib.crc32(view[pos + 4 : end]) != struct.unpack(">I", data[end : end + 4])[0]:
            raise DecodeError(f"corrupt PNG (checksum mismatch in its {kind.decode('latin-1')} chunk)")
        if kind == b"IEND":
            return width, height
        pos = end + 4
    raise DecodeError("truncated PNG (file ends before the IEND chunk)")


def _bmp_size(data: bytes) -> tuple[int, int]:
    offset, header = struct.unpack("<II", data[10:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bpp = struct.unpack("<HHHH", data[18:26])
        compression = 0
    else:
        width, height, _, bpp, compression = struct.unpack("<iiHHI", data[18:34])
    height = abs(height)
    if compression in (0, 3) and offset + ((bpp * width + 31) // 32) * 4 * height > len(data):
        raise DecodeError("truncated BMP (file shorter than its pixel data)")
    return width, height


def _tiff_size(data: bytes) -> tuple[int, int]:
    """ImageWidth/ImageLength from the first IFD of a classic or BigTIFF file."""
    end = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        (ifd,) = struct.unpack(end + "Q", data[8:16])
        (count,) = struct.unpack(end + "Q", data[ifd : ifd + 8])
        first, entry_size, count_fmt = ifd + 8, 20, "Q"
    else:
        (ifd,) = struct.unpack(end + "I", data[4:8])
        (count,) = struct.unpack(end + "H", data[ifd : ifd + 2])
        first, entry_size, count_fmt = ifd + 2, 12, "I"
    dims: dict[int, int] = {}
    for i in range(min(count, 4096)):
        at = first + i * entry_size
        tag, kind = struct.unpack(end + "HH", data[at : at + 4])
        if tag in (256, 257):
            value_at = at + 4 + struct.calcsize(count_fmt)
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                raise DecodeError("malformed TIFF (bad dimension tag type)")
            (dims[tag],) = struct.unpack(end + fmt, data[value_at : value_at + struct.calcsize(fmt)])
    if 256 not in dims or 257 not in dims:
        raise DecodeError("malformed TIFF (no image dimensions in the first directory)")
    return dims[256], dims[257]
