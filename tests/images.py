"""Test images written on the fly: synthetic X-ray-like pictures in every supported format,
DICOM files written with pydicom, and a corpus of bad inputs with the reason each must give."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


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
                rows_cols: tuple[int, int] | None = None) -> Path:
    """A single-frame DICOM (Part 10 file) with the given stored pixels and VOI/modality tags.
    ``pixels`` may be (H, W) uint16 or (H, W, 3) uint8 (RGB); ``rows_cols`` overrides the
    declared size (to claim enormous dimensions)."""
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
    if pydicom.uid.UID(transfer_syntax).is_compressed:
        ds.PixelData = encapsulate([b"\x00\x01" * 64])
    else:
        ds.PixelData = pixels.astype(np.uint8 if colour else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


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


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Bad inputs, each with a fragment of the reason it must fail with. The unreadable
    (chmod 000) file is only made when not running as root (root can read it anyway)."""
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
    if not running_as_root():
        locked = folder / "locked.png"
        locked.write_bytes(good_png)
        locked.chmod(0)
        expected["locked.png"] = "permission denied"
    return expected
