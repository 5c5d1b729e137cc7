"""Reading DICOM: a data set from bytes (a deflated one inflated with a hard cap), checked
before pydicom decodes any pixel, and its single frame as a grey image. Shared by the file
decoder (:mod:`decode`) and the DICOM node (:mod:`node`).

Pixels: the modality LUT (rescale slope/intercept) is applied, then the first VOI window
(Window Center/Width, LINEAR, LINEAR_EXACT or SIGMOID) or, without one, the VOI LUT Sequence,
or, without either, the full data range; MONOCHROME1 is inverted so bone is bright. These run
in float32, in place. With ``min_side`` a large JPEG 2000 frame is decoded at a reduced
resolution and other frames are block-averaged where that gives what full decoding would (see
:mod:`decode`).

Decompression bombs: Rows x Columns x frames is checked against ``max_pixels`` before any pixel
is decoded; a deflated data set is inflated with a hard output cap, native pixel data must hold
exactly the declared frame (no undeclared or extra frames), and a compressed frame's own header
must give the declared size. Every failure raises :class:`DecodeError` with a one-line reason.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from typing import NamedTuple

import cv2
import numpy as np

from . import j2k, jpeg
from .inputs import is_dicom
from .pixels import DecodeError, Reduction, check_pixels, halvings, megapixels, min_max, one_line

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_IDENTITY_KEYWORDS = {"sop_class": "SOPClassUID", "sop_instance": "SOPInstanceUID", "study": "StudyInstanceUID",
                      "series": "SeriesInstanceUID"}

_DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
_DICOM_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# Problems are reported as DecodeError; pydicom's warnings about the same files (excess frames,
# non-conforming values) would only reach the terminal.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def decode_dicom(data: bytes, max_pixels: int, min_side: int | None) -> tuple[np.ndarray, Reduction | None]:
    """The grey float32 image in [0, 1] of the DICOM file ``data`` (a single-frame MONOCHROME1/2
    image), decoded at a reduced resolution where ``min_side`` allows (with its Reduction, else
    None); DecodeError with a one-line reason."""
    from pydicom.uid import JPEG2000TransferSyntaxes

    try:
        ds = read_dataset(data, max_pixels)
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
        raise DecodeError(f"not a readable DICOM file ({one_line(e)})") from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(
            f"colour DICOM (PhotometricInterpretation {photometric or 'missing'}) is not supported; "
            "only MONOCHROME1/MONOCHROME2 X-rays"
        )
    check_pixels(cols, rows * frames, max_pixels)
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
        raise DecodeError(f"invalid DICOM LUT or window ({one_line(e)})") from None
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
        raise DecodeError(f"cannot decode DICOM pixel data ({one_line(e)})") from None


def _reduced_j2k(frame: bytes, ds, min_side: int) -> tuple[np.ndarray, Reduction] | None:
    """The stored values of a large JPEG 2000 frame decoded at a reduced resolution, or None where
    that is not to be had (a small image, a codestream that does not match the data set or that
    Pillow cannot reduce, any failure): pydicom's decoder then decodes it and reports problems."""
    try:
        header = j2k.read_header(frame)
        if (not header.at_origin or header.components != 1 or header.precision != int(ds.BitsStored)
                or header.signed != bool(ds.PixelRepresentation) or header.precision > 16):
            return None
        reduce = j2k.workable_reduce(header, halvings(header.width, header.height, min_side, header.levels))
        if not reduce:
            return None
        scale = 1 << reduce
        reduction = Reduction(scale, (header.height, header.width), -(scale - 1) / 2)
        return j2k.decode_reduced(frame, header, reduce), reduction
    except Exception:  # only a shortcut: the full decoder decides
        return None


def read_dataset(data: bytes, max_pixels: int, stop_before_pixels: bool = False):
    """The pydicom Dataset in ``data`` (without the pixel data and what follows it with
    ``stop_before_pixels``). A deflated data set is inflated here, never to more than the largest
    image ``max_pixels`` allows (pydicom would inflate it whole, however large)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset as read_body
    from pydicom.uid import ExplicitVRLittleEndian

    meta_end, syntax = _file_meta(data)
    if syntax != _DEFLATED_DICOM:
        return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    limit = 2 * max_pixels + (16 << 20)  # 16-bit samples at the pixel limit, plus 16 MiB of other elements
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[meta_end:], limit + 1)
    except zlib.error as e:
        raise DecodeError(f"corrupt deflated DICOM data ({e})") from None
    if len(body) > limit:
        raise DecodeError(f"deflated DICOM data set inflates to more than {limit / 2**20:.0f} MiB, over what the "
                          f"{megapixels(max_pixels)} pixel limit allows (possible decompression bomb)")
    ds = read_body(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True,
                   stop_when=_at_pixels if stop_before_pixels else None)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what is left once inflated
    return ds


class Identity(NamedTuple):
    """The UIDs that place an instance: what it is, itself, its study and its series."""

    sop_class: str
    sop_instance: str
    study: str
    series: str


def valid_uid(value: object) -> bool:
    """A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def read_header(data: bytes, max_pixels: int):
    """The data set of the DICOM file ``data`` up to its pixel data, every element read (pydicom
    reads values lazily: a malformed one fails here, not later); DecodeError (one line) if it
    cannot be parsed."""
    try:
        ds = read_dataset(data, max_pixels, stop_before_pixels=True)
        for element in ds.iterall():
            element.value
        return ds
    except DecodeError:
        raise
    except Exception as e:  # pydicom raises many types for malformed data
        raise DecodeError(f"not a readable DICOM data set ({one_line(e)})") from None


def identity(ds) -> Identity:
    """The instance's SOP class, SOP instance, study and series UIDs; DecodeError naming the
    first one that is missing or not a valid UID."""
    values = []
    for keyword in Identity._fields:
        name = _IDENTITY_KEYWORDS[keyword]
        value = text(ds, name, 65).strip()
        if not value:
            raise DecodeError(f"no {name}")
        if not valid_uid(value):
            raise DecodeError(f"{name} is not a valid UID ({value!r})")
        values.append(value)
    return Identity(*values)


def text(ds, keyword: str, limit: int = 64) -> str:
    """An attribute's value as one line of printable ASCII (others as '?'), at most ``limit``
    characters; '' if it is absent or unreadable."""
    try:
        value = ds.get(keyword)
        value = "" if value is None else str(value)
    except Exception:
        return ""
    return "".join(c if " " <= c <= "~" else "?" for c in value[:limit])


def _at_pixels(tag, vr, length) -> bool:
    return tag >> 16 == 0x7FE0  # (float / double float) pixel data


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
        raise DecodeError(f"malformed encapsulated DICOM pixel data ({one_line(e)})") from None
    if len(offsets) > 1:
        raise DecodeError(f"DICOM pixel data holds {len(offsets)} frames where one is declared: undeclared frames refused")
    if syntax in JPEG2000TransferSyntaxes:
        size_of = j2k.frame_size
    elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        size_of = jpeg.frame_size
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
    return f"corrupt or unsupported data ({one_line(error)})"


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
    return min_max(values)


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
    n = halvings(stored.shape[1], stored.shape[0], min_side, 3)
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
