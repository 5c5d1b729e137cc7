"""Decode an image file to a grey float32 (H, W) array in [0, 1] (OpenCV and pydicom only).

Formats: PNG (8/16-bit), JPEG, BMP, TIFF (grey, RGB or RGBA) and DICOM (MONOCHROME1/2), in any
transfer syntax pydicom has a decoder for (native, deflated, RLE, and with python-gdcm JPEG
baseline/lossless, JPEG-LS and JPEG 2000). The format is found from the file's signature, not
its name (a name ending in .dcm only matters for a DICOM data set without the Part 10 preamble).
Only regular files are read (see :mod:`files`). Colour is reduced to grey with
Rec. 601 luma (0.299 R + 0.587 G + 0.114 B); an alpha channel is dropped; 8-bit values are
divided by 255 and 16-bit values by 65535. JPEG EXIF orientation is applied.

DICOM: the modality LUT (rescale slope/intercept) is applied, then the first VOI window
(Window Center/Width, LINEAR, LINEAR_EXACT or SIGMOID) or, without one, the VOI LUT Sequence,
or, without either, the full data range; MONOCHROME1 is inverted so bone is bright.

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

import cv2
import numpy as np

from .files import FileTooLarge, NotRegularFile, read_regular

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; the largest chest X-ray detectors are ~20 MP
DICOM_SUFFIXES = (".dcm", ".dicom")
_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR  # keeps 16-bit, drops alpha, applies EXIF
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


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to a grey float32 (H, W) array in [0, 1]."""
    data = _read_bytes(path, max_pixels)
    fmt = file_format(data)
    if fmt == "DICOM" or (fmt is None and Path(path).suffix.lower() in DICOM_SUFFIXES):
        grey = _decode_dicom(data, max_pixels)
    else:
        grey = _decode_raster(data, max_pixels)
    if grey.min() == grey.max():
        raise NoImageContent("no image content: constant pixel values")
    return grey


def is_dicom(data: bytes) -> bool:
    """True if ``data`` starts with a DICOM Part 10 preamble ('DICM' at byte 128)."""
    return data[128:132] == b"DICM"


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


def _decode_raster(data: bytes, max_pixels: int) -> np.ndarray:
    fmt, width, height = image_header(data)
    _check_pixels(width, height, max_pixels)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    if arr is None or arr.size == 0:
        raise DecodeError(f"cannot decode {fmt} (corrupt or unsupported data)")
    return to_grey(arr)


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


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS


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
    from pydicom.pixels import apply_modality_lut

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
    if syntax is not None and syntax.is_encapsulated:
        _check_compressed_frame(pixel_data, syntax, rows, cols)
    else:
        _check_native_frame(len(pixel_data), rows, cols, sample_bits)
    try:
        stored = ds.pixel_array
    except Exception as e:
        if syntax is not None and syntax.is_compressed:
            raise DecodeError(f"cannot decode DICOM transfer syntax {syntax.name} ({syntax}): "
                              f"{_decoder_failure(syntax, e)}") from None
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


def _check_compressed_frame(pixel_data: bytes, syntax, rows: int, cols: int) -> None:
    """Encapsulated pixel data must hold one frame whose own header (JPEG SOF, JPEG 2000 SIZ)
    gives the declared size: decoders size their output from the codestream."""
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
        size_of = _j2k_size
    elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        size_of = _jpeg_size
    else:
        return  # RLE: decoded to the declared size
    try:
        width, height = size_of(frame)
    except (DecodeError, struct.error, IndexError) as e:
        reason = str(e) if isinstance(e, DecodeError) else "malformed header"
        raise DecodeError(f"cannot decode DICOM transfer syntax {syntax.name} ({syntax}): corrupt frame ({reason})") from None
    if (width, height) != (cols, rows):
        raise DecodeError(f"compressed DICOM frame is {width}x{height} pixels where {cols}x{rows} are declared "
                          "(possible decompression bomb)")


def _j2k_size(data: bytes) -> tuple[int, int]:
    """Image size from a JPEG 2000 codestream's SIZ marker segment (after SOC)."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0:
        raise DecodeError("no JPEG 2000 codestream header")
    x, y, x0, y0 = struct.unpack_from(">IIII", data, at + 8)
    return x - x0, y - y0


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
