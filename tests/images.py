"""Test images written on the fly: synthetic X-ray-like pictures in every supported format,
DICOM files written with pydicom (native, deflated and compressed), a corpus of bad inputs with
the reason each must give, and good images under names that break naive tools."""
from __future__ import annotations

import os
import socket
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless,
                         SecondaryCaptureImageStorage, generate_uid)


def xray_like(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    """A float (H, W) image in [0, 1]: bright body, two dark lungs, noise; distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.7 - 0.4 * np.exp(-(((x - 0.3) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2))
    img -= 0.4 * np.exp(-(((x - 0.7) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2)) * rng.uniform(0.3, 1.0)
    return np.clip(img + rng.normal(0, 0.05, (h, w)), 0, 1)


def as_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(img * 255).astype(np.uint8)


def as_uint16(img: np.ndarray) -> np.ndarray:
    return np.round(img * 65535).astype(np.uint16)


def write(path: Path, array: np.ndarray) -> Path:
    """Write a uint8/uint16 grey, BGR or BGRA array with OpenCV (format from the suffix)."""
    if not cv2.imwrite(str(path), array):
        raise RuntimeError(f"cv2 could not write {path}")
    return path


def write_good_set(folder: Path, n: int = 6) -> list[Path]:
    """One file per supported kind: PNG 8/16-bit, JPEG, BMP, TIFF, RGBA PNG, then DICOMs."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = [xray_like(seed=i) for i in range(n + 2)]
    paths = [
        write(folder / "a_grey8.png", as_uint8(grey[0])),
        write(folder / "b_grey16.png", as_uint16(grey[1])),
        write(folder / "c_photo.jpg", as_uint8(grey[2])),
        write(folder / "d_bitmap.bmp", cv2.cvtColor(as_uint8(grey[3]), cv2.COLOR_GRAY2BGR)),
        write(folder / "e_scan.tif", as_uint16(grey[4])),
        write(folder / "f_rgba.png", cv2.cvtColor(as_uint8(grey[5]), cv2.COLOR_GRAY2BGRA)),
        write_dicom(folder / "g_mono2.dcm", as_uint16(grey[6]) >> 4, bits=12),
        write_dicom(folder / "h_mono1.dcm", as_uint16(grey[7]) >> 4, bits=12, photometric="MONOCHROME1"),
    ]
    return paths


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16,
                slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | None = None, voi_function: str | None = None,
                voi_lut: np.ndarray | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
                rows_cols: tuple[int, int] | None = None, frames: int | None = None,
                frame_data: bytes | None = None) -> Path:
    """A single-frame DICOM (Part 10 file) with the given stored pixels and VOI/modality tags.
    ``pixels`` may be (H, W) uint16 or (H, W, 3) uint8 (RGB); ``rows_cols`` overrides the
    declared size (to claim enormous dimensions), ``frames`` sets NumberOfFrames, and
    ``frame_data`` is the encoded frame for a compressed ``transfer_syntax`` (else a dummy)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Test^Synthetic"
    ds.Rows, ds.Columns = rows_cols or pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if colour else 16
    ds.BitsStored = 8 if colour else bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0.0, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
        if voi_function:
            ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new("LUTData", "US", [int(v) for v in voi_lut])
        ds.VOILUTSequence = [item]
    if frames is not None:
        ds.NumberOfFrames = frames
    if pydicom.uid.UID(transfer_syntax).is_compressed:
        ds.PixelData = encapsulate([frame_data or b"\x00\x01" * 64])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype(np.uint8 if colour else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment whose IFD0 holds only the Orientation tag."""
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
            + struct.pack("<I", 0))
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b""))


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A real small JPEG whose frame header (SOF) is patched to claim enormous dimensions."""
    data = bytearray(cv2.imencode(".jpg", as_uint8(xray_like(16, 16)))[1].tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encode_frame(pixels: np.ndarray, syntax: str, bits: int) -> bytes:
    """One frame of grey ``pixels`` encoded for a compressed transfer syntax, by an encoder other
    than the decoder xray-edge uses (OpenCV for JPEG baseline, imagecodecs for the rest)."""
    import imagecodecs

    if syntax == JPEGBaseline8Bit:
        return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    if syntax == JPEGLosslessSV1:  # process 14, selection value (predictor) 1
        return imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits)
    if syntax == JPEGLSLossless:
        return imagecodecs.jpegls_encode(pixels, level=0)
    if syntax == JPEG2000Lossless:
        return imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K", reversible=True, bitspersample=bits)
    raise ValueError(f"no test encoder for {syntax}")


def write_compressed_dicom(path: Path, pixels: np.ndarray, syntax: str, bits: int) -> Path:
    """A DICOM whose grey ``pixels`` (uint8 or uint16 holding ``bits`` bits) are stored in ``syntax``;
    RLE is encoded by pydicom's own encoder, the others by :func:`encode_frame`."""
    if syntax == RLELossless:
        write_dicom(path, pixels, bits=bits)
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
        return path
    write_dicom(path, pixels, bits=bits, transfer_syntax=syntax, frame_data=encode_frame(pixels, syntax, bits))
    if pixels.dtype == np.uint8:  # write_dicom declares 16-bit grey
        ds = pydicom.dcmread(path)
        ds.BitsAllocated = 8
        ds.save_as(path)
    return path


def frame_bomb(path: Path, declare_frames: bool, deflated: bool = False, size: int = 16,
               data_bytes: int = 1 << 20) -> Path:
    """A DICOM whose native pixel data holds ``data_bytes`` (many frames of ``size`` x ``size``)
    while it declares one frame (NumberOfFrames 1) or says nothing (no NumberOfFrames)."""
    frames = data_bytes // (size * size * 2)
    pixels = np.tile(as_uint16(xray_like(size, size)), (frames, 1))
    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    return write_dicom(path, pixels, rows_cols=(size, size), frames=1 if declare_frames else None,
                       transfer_syntax=syntax)


def deflate_bomb(path: Path, inflated: int = 1 << 30) -> Path:
    """A Deflated Explicit VR Little Endian DICOM of about ``inflated`` / 1000 bytes whose data
    set inflates to ``inflated`` bytes: a 512x512 image followed by undeclared frames of zeros."""

    def split(file: Path) -> tuple[bytes, bytes]:  # (preamble and file meta group, data set)
        data = file.read_bytes()
        end = 144 + struct.unpack("<I", data[140:144])[0]  # (0002,0000) group length
        return data[:end], data[end:]

    meta, _ = split(write_dicom(path, np.zeros((8, 8), np.uint16), transfer_syntax=DeflatedExplicitVRLittleEndian))
    _, plain = split(write_dicom(path, np.zeros((8, 8), np.uint16), rows_cols=(512, 512)))
    at = plain.index(b"\xe0\x7f\x10\x00OW\x00\x00")  # the Pixel Data element, given a huge length
    body = plain[: at + 8] + struct.pack("<I", inflated)
    mib = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = mib.compress(bytes(1 << 20)) + mib.flush(zlib.Z_FULL_FLUSH)  # 1 MiB of zeros, self-contained
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = head.compress(body) + head.flush(zlib.Z_FULL_FLUSH) + chunk * (inflated >> 20) + b"\x03\x00"
    path.write_bytes(meta + stream)  # b"\x03\x00": the final, empty block
    return path


def j2k_size_bomb(path: Path) -> Path:
    """A JPEG 2000 DICOM declaring 40x36 whose codestream claims 60000x60000 pixels."""
    pixels = as_uint16(xray_like(40, 36)) >> 4
    frame = bytearray(encode_frame(pixels, JPEG2000Lossless, 12))
    siz = frame.find(b"\xff\x51")
    frame[siz + 6 : siz + 14] = struct.pack(">II", 60_000, 60_000)
    return write_dicom(path, pixels, bits=12, transfer_syntax=JPEG2000Lossless, frame_data=bytes(frame))


def vr_mismatch_dicom(path: Path) -> Path:
    """A good DICOM whose file meta says explicit VR while its data set is implicit VR: pydicom
    reads it, with a UserWarning (which must not reach classify's terminal)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    data = write_dicom(path, as_uint16(xray_like(40, 36)) >> 4, bits=12).read_bytes()
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]  # (0002,0000) group length
    ds = pydicom.dcmread(path)
    del ds.file_meta
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    path.write_bytes(data[:meta_end] + buffer.getvalue())
    return path


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Bad inputs, each with a fragment of the reason it must fail with. The unreadable
    (chmod 000) file is only made when not running as root (root can read it anyway). The
    memory bombs (deflate_bomb, frame_bomb) would take gigabytes if decoded: use it in a
    process with a memory limit where a regression could run them."""
    folder.mkdir(parents=True, exist_ok=True)
    good_png = cv2.imencode(".png", as_uint8(xray_like(64, 64, seed=9)))[1].tobytes()
    good_jpg = cv2.imencode(".jpg", as_uint8(xray_like(64, 64, seed=9)))[1].tobytes()
    corrupt = bytearray(good_png)
    idat = corrupt.find(b"IDAT")
    corrupt[idat + 20 : idat + 60] = bytes(range(40))  # damaged compressed data, CRC mismatch
    garbled = bytearray(corrupt)  # the same damage with a recomputed CRC: only the decoder sees it
    length = struct.unpack(">I", garbled[idat - 4 : idat])[0]
    garbled[idat + 4 + length : idat + 8 + length] = struct.pack(">I", zlib.crc32(garbled[idat : idat + 4 + length]))
    files = {
        "corrupt.png": (bytes(corrupt), "corrupt PNG"),
        "garbled.png": (bytes(garbled), "cannot decode PNG"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated PNG"),
        "truncated.jpg": (good_jpg[: len(good_jpg) * 2 // 3], "truncated JPEG"),
        "empty.png": (b"", "empty file"),
        "notes.jpg": (b"Patient notes: this is a text file, not an image.\n" * 20, "unrecognised file signature"),
        "bomb.png": (png_bomb(), "decompression bomb"),
        "bomb.jpg": (jpeg_bomb(), "decompression bomb"),
        "blank.png": (cv2.imencode(".png", np.full((64, 64), 200, np.uint8))[1].tobytes(),
                      "no image content: constant pixel values"),
        "dot.png": (cv2.imencode(".png", np.full((1, 1), 90, np.uint8))[1].tobytes(),
                    "no image content: constant pixel values"),
    }
    expected = {}
    for name, (data, reason) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = reason
    write_dicom(folder / "jpeg2000.dcm", np.zeros((8, 8), np.uint16), transfer_syntax=JPEG2000)
    expected["jpeg2000.dcm"] = "DICOM transfer syntax JPEG 2000"
    write_dicom(folder / "colour.dcm", np.zeros((8, 8, 3), np.uint8))
    expected["colour.dcm"] = "colour DICOM"
    write_dicom(folder / "bomb.dcm", np.zeros((8, 8), np.uint16), rows_cols=(60_000, 60_000))
    expected["bomb.dcm"] = "decompression bomb"
    frame_bomb(folder / "frames-undeclared.dcm", declare_frames=False)
    expected["frames-undeclared.dcm"] = "undeclared frames"
    frame_bomb(folder / "frames-one-declared.dcm", declare_frames=True)
    expected["frames-one-declared.dcm"] = "undeclared frames"
    frame_bomb(folder / "frames-deflated.dcm", declare_frames=False, deflated=True)
    expected["frames-deflated.dcm"] = "undeclared frames"
    deflate_bomb(folder / "deflate-bomb.dcm")
    expected["deflate-bomb.dcm"] = "possible decompression bomb"
    j2k_size_bomb(folder / "j2k-size-bomb.dcm")
    expected["j2k-size-bomb.dcm"] = "60000x60000 pixels where 36x40 are declared"
    os.mkfifo(folder / "incoming")  # extensionless: the folder scan must not open it either
    expected["incoming"] = "not a regular file (FIFO)"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock.png"))
    expected["sock.png"] = "not a regular file (socket)"
    (folder / "device.png").symlink_to(os.devnull)
    expected["device.png"] = "not a regular file (character device)"
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    expected["dangling.png"] = "broken symbolic link"
    if not running_as_root():
        locked = folder / "locked.png"
        locked.write_bytes(good_png)
        locked.chmod(0)
        expected["locked.png"] = "permission denied"
    return expected


def framed_blank(size: int = 96) -> np.ndarray:
    """A blank grey picture whose only content is a thin frame at the very edge (the model's
    border crop removes it): nothing is left to classify."""
    img = np.full((size, size), 128, np.uint8)
    img[:2, :] = img[-2:, :] = img[:, :2] = img[:, -2:] = 255
    return img


# Good images under names that break naive tools: bytes that are not UTF-8, line breaks, quotes
# and commas (CSV), spreadsheet formulas, terminal escape sequences, a symbolic link, a PNG
# named .dcm. Every one must be classified and its name must come back exactly.
TRICKY_NAMES = [
    os.fsdecode(b"scan-\xff\xfe-latin1-\xe9.png"),
    "carriage\rreturn.png",
    "new\nline.png",
    'quote"and,comma.png',
    "=HYPERLINK(\"http---x\",\"click\").png",
    "+1 formula.png",
    "-2 formula.png",
    "@SUM(A1).png",
    "\tTab first.png",
    "\x1b[2J\x1b[31mred\x1b[0m.png",
    "'quoted.png",
    "png-named.dcm",
]


def write_tricky_names(folder: Path) -> list[str]:
    """Write one good image per name of TRICKY_NAMES plus a symbolic link to a good image;
    returns the names (str, with surrogate escapes for the non-UTF-8 bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(TRICKY_NAMES):
        data = cv2.imencode(".png", as_uint8(xray_like(64, 64, seed=100 + i)))[1].tobytes()
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    os.symlink(os.path.join(folder, TRICKY_NAMES[0]), folder / "link-to-scan.png")
    return [*TRICKY_NAMES, "link-to-scan.png"]
