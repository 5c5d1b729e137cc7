"""Decode an image file to a grey float32 (H, W) array in [0, 1] (OpenCV and pydicom only).

Formats: PNG (8/16-bit), JPEG, BMP, TIFF (grey, RGB or RGBA) and DICOM (MONOCHROME1/2).
The format is found from the file's signature, not its name. Colour is reduced to grey with
Rec. 601 luma (0.299 R + 0.587 G + 0.114 B); an alpha channel is dropped; 8-bit values are
divided by 255 and 16-bit values by 65535. JPEG EXIF orientation is applied.

DICOM: the modality LUT (rescale slope/intercept) is applied, then the first VOI window
(Window Center/Width, LINEAR, LINEAR_EXACT or SIGMOID) or, without one, the VOI LUT Sequence,
or, without either, the full data range; MONOCHROME1 is inverted so bone is bright.

Decompression bombs: the image dimensions are read from the file header (PNG IHDR, JPEG SOF,
BMP info header, TIFF IFD, DICOM Rows/Columns) and checked against ``max_pixels`` before any
pixel is decoded. Every failure raises :class:`DecodeError` with a one-line reason.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; the largest chest X-ray detectors are ~20 MP
DICOM_SUFFIXES = (".dcm", ".dicom")
_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR  # keeps 16-bit, drops alpha, applies EXIF
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DecodeError(ValueError):
    """A file could not be decoded; the message is a one-line reason (without the path)."""


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to a grey float32 (H, W) array in [0, 1]."""
    data = _read_bytes(Path(path), max_pixels)
    if is_dicom(data) or Path(path).suffix.lower() in DICOM_SUFFIXES:
        return _decode_dicom(data, max_pixels)
    fmt, width, height = image_header(data)
    _check_pixels(width, height, max_pixels)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    if arr is None or arr.size == 0:
        raise DecodeError(f"cannot decode {fmt} (corrupt or unsupported data)")
    return to_grey(arr)


def is_dicom(data: bytes) -> bool:
    """True if ``data`` starts with a DICOM Part 10 preamble ('DICM' at byte 128)."""
    return data[128:132] == b"DICM"


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of a PNG, JPEG, BMP or TIFF file, without
    decoding pixels; raises DecodeError for other, truncated or malformed data."""
    try:
        if data.startswith(_PNG_SIGNATURE):
            return ("PNG", *_png_size(data))
        if data.startswith(b"\xff\xd8"):
            return ("JPEG", *_jpeg_size(data))
        if data.startswith(b"BM"):
            return ("BMP", *_bmp_size(data))
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return ("TIFF", *_tiff_size(data))
    except (struct.error, IndexError):
        raise DecodeError("truncated or malformed image header") from None
    raise DecodeError("not a supported image (PNG, JPEG, BMP, TIFF or DICOM); unrecognised file signature")


def to_grey(arr: np.ndarray) -> np.ndarray:
    """OpenCV image (H, W) or (H, W, 3|4) BGR[A] of any depth -> grey float32 (H, W) in [0, 1]."""
    if arr.dtype == np.uint8:
        grey = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        grey = arr.astype(np.float32) / 65535.0
    else:  # float or signed TIFF: no fixed range, use the image's own
        grey = _min_max(arr.astype(np.float64)).astype(np.float32)
    if grey.ndim == 3:
        channels = grey.shape[2]
        if channels in (3, 4):
            grey = cv2.cvtColor(grey, cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY)
        else:
            grey = grey[:, :, 0]
    return np.ascontiguousarray(np.clip(grey, 0.0, 1.0), dtype=np.float32)


def _read_bytes(path: Path, max_pixels: int) -> bytes:
    try:
        size = path.stat().st_size
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        if size > 8 * max_pixels + (64 << 20):
            raise DecodeError(f"file is {size / 2**20:.0f} MiB, too large for the {_mp(max_pixels)} pixel limit")
        return path.read_bytes()
    except PermissionError:
        raise DecodeError("permission denied (file is not readable)") from None
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except IsADirectoryError:
        raise DecodeError("is a folder, not a file") from None
    except OSError as e:
        raise DecodeError(f"cannot read file ({e.strerror or e})") from None


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:g} MP"


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image dimensions {width}x{height} in header")
    if width * height > max_pixels:
        raise DecodeError(
            f"image claims {width}x{height} pixels ({_mp(width * height)}), over the {_mp(max_pixels)} "
            "limit (possible decompression bomb); raise it with --max-pixels if the file is genuine"
        )


def _png_size(data: bytes) -> tuple[int, int]:
    """IHDR dimensions; walks the chunks (lengths and CRCs) so truncation or corruption is
    reported here rather than by libpng."""
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise DecodeError("malformed PNG (first chunk is not IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        if zlib.crc32(data[pos + 4 : end]) != struct.unpack(">I", data[end : end + 4])[0]:
            raise DecodeError(f"corrupt PNG (checksum mismatch in its {kind.decode('latin-1')} chunk)")
        if kind == b"IEND":
            return width, height
        pos = end + 4
    raise DecodeError("truncated PNG (file ends before the IEND chunk)")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """SOF dimensions; checks an end-of-image marker follows the first scan (truncation)."""
    pos, size = 2, None
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
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise DecodeError("malformed JPEG (scan before frame header)")
            if data.find(b"\xff\xd9", pos) < 0:
                raise DecodeError("truncated JPEG (no end-of-image marker)")
            return size
        pos += 2 + length


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


def _min_max(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise DecodeError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds:
            raise DecodeError("DICOM file has no pixel data")
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except DecodeError:
        raise
    except Exception as e:  # pydicom raises many types for malformed files
        raise DecodeError(f"not a readable DICOM file ({_one_line(e)})") from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(
            f"colour DICOM (PhotometricInterpretation {photometric or 'missing'}) is not supported; "
            "only MONOCHROME1/MONOCHROME2 X-rays"
        )
    _check_pixels(cols, rows * frames, max_pixels)
    if frames != 1:
        raise DecodeError(f"multi-frame DICOM ({frames} frames) is not supported")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = ds.pixel_array
    except Exception as e:
        if syntax is not None and syntax.is_compressed:
            raise DecodeError(
                f"cannot decode DICOM transfer syntax {syntax.name} ({syntax}) with the installed decoders; "
                "convert the file to uncompressed DICOM or install pydicom decoder plugins (pylibjpeg, gdcm)"
            ) from None
        raise DecodeError(f"cannot decode DICOM pixel data ({_one_line(e)})") from None
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        grey = _dicom_voi(values, ds)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"invalid DICOM LUT or window ({_one_line(e)})") from None
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def _dicom_voi(values: np.ndarray, ds) -> np.ndarray:
    """Modality values -> [0, 1] through the first window, else the VOI LUT, else the data range."""
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = float(_first(ds, "WindowCenter")), float(_first(ds, "WindowWidth"))
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
        if function == "LINEAR" and width >= 1:  # PS3.3 C.11.2.1.2.1
            return np.clip((values - (center - 0.5)) / max(width - 1, 1e-9) + 0.5, 0.0, 1.0)
        if function == "LINEAR_EXACT" and width > 0:
            return np.clip((values - center) / width + 0.5, 0.0, 1.0)
        if function == "SIGMOID" and width > 0:
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        raise DecodeError(f"invalid DICOM window (function {function}, width {width:g})")
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        indices = np.rint(values).astype(np.int64)  # LUT inputs are whole modality values
        return apply_voi_lut(indices, ds, prefer_lut=True).astype(np.float64) / (2**bits - 1)
    return _min_max(values)


def _first(ds, keyword: str):
    """First value of a possibly multi-valued element (several windows may be offered)."""
    return ds[keyword].value[0] if ds[keyword].VM > 1 else ds[keyword].value


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text or type(e).__name__)[:200]
