"""Decode an image file to a grey (H, W) array: float32 in [0, 1] (read_image), or as little
converted and, for large JPEG and JPEG 2000, as little decoded as the model needs (read_grey).

Formats: PNG (8/16-bit), JPEG, BMP, TIFF (grey, RGB or RGBA) and DICOM (MONOCHROME1/2), in any
transfer syntax pydicom has a decoder for (native, deflated, RLE, and with python-gdcm JPEG
baseline/lossless, JPEG-LS and JPEG 2000). The format is found from the file's signature, not
its name (a name ending in .dcm only matters for a DICOM data set without the Part 10 preamble).
Only regular files are read (see :mod:`files`). Colour is reduced to grey with
Rec. 601 luma (0.299 R + 0.587 G + 0.114 B); an alpha channel is dropped; 8-bit values are
divided by 255 and 16-bit values by 65535. JPEG EXIF orientation is applied.

DICOM: the modality LUT (rescale slope/intercept) is applied, then the first VOI window
(Window Center/Width, LINEAR, LINEAR_EXACT or SIGMOID) or, without one, the VOI LUT Sequence,
or, without either, the full data range; MONOCHROME1 is inverted so bone is bright. These run
in float32, in place.

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

import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from .inputs import DEFAULT_MAX_PIXELS, DICOM_SUFFIXES, is_dicom  # noqa: F401 (re-exported)

from . import j2k
from .files import FileTooLarge, NotRegularFile, read_regular

_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR  # keeps 16-bit, drops alpha, applies EXIF
_JPEG_SCALED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = ((_PNG_SIGNATURE, "PNG"), (b"\xff\xd8", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))
_DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
_DICOM_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# Problems are reported as DecodeError; pydicom's warnings about the same files (excess frames,
# non-conforming values) would only reach the terminal.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


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
        grey, reduction = _decode_dicom(data, max_pixels, min_side)
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
    size = {"PNG": _png_size, "JPEG": _jpeg_size, "BMP": _bmp_size, "TIFF": _tiff_size}.get(fmt or "")
    if size is None:
        raise DecodeError("not a supported image (PNG, JPEG, BMP, TIFF or DICOM); unrecognised file signature")
    try:
        return (fmt, *size(data))
    except (struct.error, IndexError):
        raise DecodeError("truncated or malformed image header") from None


def _decode_raster(data: bytes, max_pixels: int, min_side: int | None) -> tuple[np.ndarray, Reduction | None]:
    fmt, width, height = image_header(data)
    _check_pixels(width, height, max_pixels)
    scale = _jpeg_scale(_jpeg_frame(data), min_side) if fmt == "JPEG" and min_side else 1
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_SCALED[scale] if scale > 1 else _FLAGS)
    if arr is None or arr.size == 0:
        raise DecodeError(f"cannot decode {fmt} (corrupt or unsupported data)")
    grey = arr if arr.ndim == 2 and arr.dtype in _FULL_SCALE else to_grey(arr)
    if scale == 1:
        return grey, None
    return grey, Reduction(scale, (grey.shape[0] * scale, grey.shape[1] * scale), 0.0)


def _jpeg_scale(frame: _JpegFrame, min_side: int) -> int:
    """1, or for an 8-bit DCT JPEG, the largest of 2, 4 and 8 that libjpeg can scale it down by
    (straight to grey, EXIF orientation still applied) keeping its shorter side at least
    ``min_side``. The scale must divide both sides, so that whichever way EXIF turns or flips
    the image, the scaled pixels are block averages aligned with its edges. (The scaling flags
    would also drop the 16-bit output of a 12-bit JPEG.)"""
    if frame.precision != 8 or frame.marker not in _JPEG_DCT:
        return 1
    n = _halvings(frame.width, frame.height, min_side, 3)
    while n and (frame.width | frame.height) & ((1 << n) - 1):
        n -= 1
    return 1 << n


def _halvings(width: int, height: int, min_side: int, most: int) -> int:
    """How often (up to ``most`` times) the image can be halved, rounding up, keeping its
    shorter side at least ``min_side``."""
    n = 0
    while n < most and -(-min(width, height) >> (n + 1)) >= min_side:
        n += 1
    return n


def to_grey(arr: np.ndarray) -> np.ndarray:
    """OpenCV image (H, W) or (H, W, 3|4) BGR[A] of any depth -> grey float32 (H, W) in [0, 1]."""
    if arr.dtype in _FULL_SCALE:
        grey = unit_float(arr)
    else:  # float or signed TIFF: no fixed range, use the image's own
        grey = _min_max(arr.astype(np.float64)).astype(np.float32)
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
        raise DecodeError(f"file is {e.size / 2**20:.0f} MiB, too large for the {_mp(max_pixels)} pixel limit") from None
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


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS
_JPEG_DCT = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}  # non-hierarchical DCT processes: libjpeg can scale these


class _JpegFrame(NamedTuple):
    """A JPEG's frame header (SOF)."""

    marker: int  # the SOF marker: which coding process
    precision: int  # bits per sample
    width: int
    height: int


def _jpeg_size(data: bytes) -> tuple[int, int]:
    frame = _jpeg_frame(data)
    return frame.width, frame.height


def _jpeg_frame(data: bytes) -> _JpegFrame:
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
        if marker in _JPEG_SOF:
            precision, height, width = struct.unpack(">BHH", data[pos + 4 : pos + 9])
            frame = _JpegFrame(marker, precision, width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if frame is None:
                raise DecodeError("malformed JPEG (scan before frame header)")
            if data.find(b"\xff\xd9", pos) < 0:
                raise DecodeError("truncated JPEG (no end-of-image marker)")
            return frame
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


def _decode_dicom(data: bytes, max_pixels: int, min_side: int | None) -> tuple[np.ndarray, Reduction | None]:
    from pydicom.uid import JPEG2000TransferSyntaxes

    try:
        ds = _read_dicom(data, max_pixels)
        if "PixelData" not in ds:
            raise DecodeError("DICOM file has no pixel data")
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        sample_bits = int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated)
        pixel_data = ds.PixelData
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
    reduced = None
    if syntax is not None and syntax.is_encapsulated:
        frame = _compressed_frame(pixel_data, syntax, rows, cols)
        if min_side is not None and syntax in JPEG2000TransferSyntaxes:
            reduced = _reduced_j2k(frame, ds, min_side)
    else:
        _check_native_frame(len(pixel_data), rows, cols, sample_bits)
    stored, reduction = reduced or (_stored_pixels(ds, syntax), None)
    if reduction is None and min_side is not None:
        stored, reduction = _block_averaged(stored, ds, min_side) or (stored, None)
    try:
        grey = _dicom_voi(_modality_values(stored, ds), ds)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"invalid DICOM LUT or window ({_one_line(e)})") from None
    if photometric == "MONOCHROME1":
        np.subtract(1.0, grey, out=grey)
    return np.clip(grey, 0.0, 1.0, out=grey), reduction


def _stored_pixels(ds, syntax) -> np.ndarray:
    """The stored values of the (single) frame, decoded by pydicom."""
    try:
        return ds.pixel_array
    except Exception as e:
        if syntax is not None and syntax.is_compressed:
            raise DecodeError(f"cannot decode DICOM transfer syntax {syntax.name} ({syntax}): "
                              f"{_decoder_failure(syntax, e)}") from None
        raise DecodeError(f"cannot decode DICOM pixel data ({_one_line(e)})") from None


def _reduced_j2k(frame: bytes, ds, min_side: int) -> tuple[np.ndarray, Reduction] | None:
    """The stored values of a large JPEG 2000 frame decoded at a reduced resolution, or None where
    that is not to be had (a small image, a codestream that does not match the data set or that
    Pillow cannot reduce, any failure): pydicom's decoder then decodes it and reports problems."""
    try:
        header = j2k.read_header(frame)
        if (not header.at_origin or header.components != 1 or header.precision != int(ds.BitsStored)
                or header.signed != bool(ds.PixelRepresentation) or header.precision > 16):
            return None
        reduce = j2k.workable_reduce(header, _halvings(header.width, header.height, min_side, header.levels))
        if not reduce:
            return None
        scale = 1 << reduce
        reduction = Reduction(scale, (header.height, header.width), -(scale - 1) / 2)
        return j2k.decode_reduced(frame, header, reduce), reduction
    except Exception:  # only a shortcut: the full decoder decides
        return None


def _read_dicom(data: bytes, max_pixels: int):
    """The pydicom Dataset in ``data``. A deflated data set is inflated here, never to more than
    the largest image ``max_pixels`` allows (pydicom would inflate it whole, however large)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta_end, syntax = _file_meta(data)
    if syntax != _DEFLATED_DICOM:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    limit = 2 * max_pixels + (16 << 20)  # 16-bit samples at the pixel limit, plus 16 MiB of other elements
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[meta_end:], limit + 1)
    except zlib.error as e:
        raise DecodeError(f"corrupt deflated DICOM data ({e})") from None
    if len(body) > limit:
        raise DecodeError(f"deflated DICOM data set inflates to more than {limit / 2**20:.0f} MiB, over what the "
                          f"{_mp(max_pixels)} pixel limit allows (possible decompression bomb)")
    ds = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what is left once inflated
    return ds


def _file_meta(data: bytes) -> tuple[int, str | None]:
    """(offset where the data set starts, Transfer Syntax UID) from a Part 10 file meta group
    (explicit VR little endian); (0, None) without the DICM preamble."""
    if not is_dicom(data):
        return 0, None
    pos, syntax = 132, None
    try:
        while pos + 8 <= len(data):
            group, element = struct.unpack_from("<HH", data, pos)
            if group != 2:
                break
            vr = data[pos + 4 : pos + 6]
            if vr in _DICOM_LONG_VRS:
                (length,), header = struct.unpack_from("<I", data, pos + 8), 12
            else:
                (length,), header = struct.unpack_from("<H", data, pos + 6), 8
            if element == 0x0010:
                syntax = data[pos + header : pos + header + length].rstrip(b"\x00 ").decode("ascii", "replace")
            pos += header + length
    except struct.error:
        pass  # a cut-off meta group: pydicom reports it
    return pos, syntax


def _check_native_frame(length: int, rows: int, cols: int, sample_bits: int) -> None:
    """Uncompressed pixel data must hold exactly one frame: pydicom would decode every frame
    that fits, declared or not."""
    if sample_bits <= 0:
        raise DecodeError(f"invalid DICOM sample size ({sample_bits} bits per pixel)")
    expected = (rows * cols * sample_bits + 7) // 8
    if length < expected:
        raise DecodeError(f"truncated DICOM pixel data ({length} bytes, {expected} expected for {cols}x{rows})")
    if length > expected + expected % 2:  # an odd length is padded to even
        raise DecodeError(f"DICOM pixel data is {length} bytes, room for {length // expected} frames of {cols}x{rows} "
                          "where one is declared: undeclared frames or extra data refused (possible decompression bomb)")


def _compressed_frame(pixel_data: bytes, syntax, rows: int, cols: int) -> bytes:
    """The one encoded frame of encapsulated pixel data. It must be the only frame, and its own
    header (JPEG SOF, JPEG 2000 SIZ) must give the declared size: decoders size their output
    from the codestream."""
    from pydicom.encaps import generate_fragments, parse_basic_offsets
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    buffer = io.BytesIO(pixel_data)
    try:
        offsets = parse_basic_offsets(buffer)
        frame = b"".join(generate_fragments(buffer))
    except Exception as e:
        raise DecodeError(f"malformed encapsulated DICOM pixel data ({_one_line(e)})") from None
    if len(offsets) > 1:
        raise DecodeError(f"DICOM pixel data holds {len(offsets)} frames where one is declared: undeclared frames refused")
    if syntax in JPEG2000TransferSyntaxes:
        size_of = j2k.frame_size
    elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        size_of = _jpeg_size
    else:
        return frame  # RLE: decoded to the declared size
    try:
        width, height = size_of(frame)
    except (ValueError, struct.error, IndexError) as e:  # DecodeError is a ValueError
        reason = "malformed header" if isinstance(e, (struct.error, IndexError)) else str(e)
        raise DecodeError(f"cannot decode DICOM transfer syntax {syntax.name} ({syntax}): corrupt frame ({reason})") from None
    if (width, height) != (cols, rows):
        raise DecodeError(f"compressed DICOM frame is {width}x{height} pixels where {cols}x{rows} are declared "
                          "(possible decompression bomb)")
    return frame


def _decoder_failure(syntax, error: Exception) -> str:
    from pydicom.pixels import get_decoder

    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        return ("no installed decoder handles it (pydicom's plugins: python-gdcm, installed with xray-edge, "
                "or pylibjpeg); convert the file to uncompressed DICOM")
    return f"corrupt or unsupported data ({_one_line(error)})"


def _modality_values(stored: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values as float32: through the Modality LUT if there is one
    (pydicom), else rescaled by slope and intercept here, in place."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(stored, ds).astype(np.float32)
    values = stored.astype(np.float32)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:  # as pydicom's apply_modality_lut
        values *= float(ds.RescaleSlope)
        values += float(ds.RescaleIntercept)
    return values


def _dicom_voi(values: np.ndarray, ds) -> np.ndarray:
    """Modality values (float32, changed in place) -> [0, 1] through the first window, else the
    VOI LUT, else the data range."""
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width, function = _window(ds)
        if function == "SIGMOID" and width > 0:
            values -= center
            values *= -4.0 / width
            with np.errstate(over="ignore"):  # exp overflows to inf: the value becomes 0
                np.exp(values, out=values)
            values += 1.0
            return np.reciprocal(values, out=values)
        scale, offset = _linear_window(center, width, function)
        values *= scale
        values += offset
        return np.clip(values, 0.0, 1.0, out=values)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        indices = np.rint(values).astype(np.int64)  # LUT inputs are whole modality values
        return apply_voi_lut(indices, ds, prefer_lut=True).astype(np.float32) / np.float32(2**bits - 1)
    return _min_max(values)


def _window(ds) -> tuple[float, float, str]:
    """(center, width, function) of the data set's first VOI window."""
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
    return float(_first(ds, "WindowCenter")), float(_first(ds, "WindowWidth")), function


def _linear_window(center: float, width: float, function: str) -> tuple[float, float]:
    """(scale, offset) of a LINEAR (PS3.3 C.11.2.1.2.1) or LINEAR_EXACT window: output = value *
    scale + offset, before the clip to [0, 1]."""
    if function == "LINEAR" and width >= 1:
        scale = 1.0 / max(width - 1, 1e-9)
        return scale, 0.5 - (center - 0.5) * scale
    if function == "LINEAR_EXACT" and width > 0:
        return 1.0 / width, 0.5 - center / width
    raise DecodeError(f"invalid DICOM window (function {function}, width {width:g})")


def _block_averaged(stored: np.ndarray, ds, min_side: int) -> tuple[np.ndarray, Reduction] | None:
    """Full-resolution stored values averaged over 2**n x 2**n blocks (OpenCV's area resize, in
    the stored integer type), the smallest reduction keeping the shorter side at least
    ``min_side``, so that the float conversion, rescale and window run on 1/4**n of the pixels.
    Only where that is what full decoding gives: the rescale and window must be affine over the
    image's values (no Modality or VOI LUT, no SIGMOID window, a window that clips none of them;
    the data-range stretch is affine too, and the percentile stretch after the resize undoes any
    affine map), so they commute with averaging; else None."""
    if stored.ndim != 2 or stored.dtype not in (np.uint8, np.uint16, np.int16) or ds.get("ModalityLUTSequence"):
        return None
    n = _halvings(stored.shape[1], stored.shape[0], min_side, 3)
    if not n:
        return None
    try:
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width, function = _window(ds)
            if function not in ("LINEAR", "LINEAR_EXACT"):
                return None
            scale, offset = _linear_window(center, width, function)
            ends = _modality_values(np.array([stored.min(), stored.max()], np.float32), ds) * scale + offset
            if ends.min() < 0.0 or ends.max() > 1.0:  # the window clips: clipping does not commute with averaging
                return None
        elif ds.get("VOILUTSequence"):
            return None
    except Exception:  # only a shortcut: the full path reports what is wrong
        return None
    k = 1 << n
    rows, cols = stored.shape[0] // k, stored.shape[1] // k
    small = cv2.resize(stored[: rows * k, : cols * k], (cols, rows), interpolation=cv2.INTER_AREA)
    return small, Reduction(k, stored.shape, 0.0)


def _first(ds, keyword: str):
    """First value of a possibly multi-valued element (several windows may be offered)."""
    return ds[keyword].value[0] if ds[keyword].VM > 1 else ds[keyword].value


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text or type(e).__name__)[:200]
