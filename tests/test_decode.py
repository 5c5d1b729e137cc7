"""Decoders: every format to grey float32 in [0, 1], DICOM LUTs, bomb guard, bad input reasons."""
import os
import struct
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from images import (as_uint8, as_uint16, deflate_bomb, frame_bomb, framed_blank, j2k_size_bomb, png_bomb, write,
                    write_bad_corpus, write_compressed_dicom, write_dicom, xray_like)
from tiny_model import tiny_record
from xray_edge.decode import DecodeError, NoImageContent, image_header, read_image
from xray_edge.preprocess import preprocess

GREY = xray_like(61, 47, seed=3)


def luma(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[..., i].astype(np.float64) for i in range(3))
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.mark.parametrize("name, array, expected, tol", [
    ("grey8.png", as_uint8(GREY), as_uint8(GREY) / 255, 1e-6),
    ("grey16.png", as_uint16(GREY), as_uint16(GREY) / 65535, 1e-6),
    ("grey8.tif", as_uint8(GREY), as_uint8(GREY) / 255, 1e-6),
    ("grey16.tif", as_uint16(GREY), as_uint16(GREY) / 65535, 1e-6),
    ("grey.bmp", as_uint8(GREY), as_uint8(GREY) / 255, 1e-6),
    ("grey.jpg", as_uint8(GREY), GREY, 0.03),  # lossy: mean error bound
])
def test_grey_formats_decode_to_unit_float(tmp_path, name, array, expected, tol):
    img = read_image(write(tmp_path / name, array))
    assert img.dtype == np.float32 and img.shape == GREY.shape
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert np.abs(img - expected).mean() <= tol


def test_sixteen_bit_uses_the_full_range(tmp_path):
    img = read_image(write(tmp_path / "levels.png", np.array([[0, 32768, 65535]], np.uint16)))
    np.testing.assert_allclose(img, [[0.0, 32768 / 65535, 1.0]], atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_colour_is_reduced_with_luma(tmp_path, suffix):
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = read_image(write(tmp_path / f"colour{suffix}", bgr))
    np.testing.assert_allclose(img, luma(bgr) / 255, atol=1e-4)


def test_rgba_alpha_is_dropped(tmp_path):
    rng = np.random.default_rng(2)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = np.zeros((20, 30, 1), np.uint8)
    alpha[:, 15:] = 255  # half transparent: the colour underneath is still used
    img = read_image(write(tmp_path / "rgba.png", np.concatenate([bgr, alpha], axis=2)))
    np.testing.assert_allclose(img, luma(bgr) / 255, atol=1e-4)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_header_gives_dimensions_without_decoding(tmp_path, suffix):
    data = cv2.imencode(suffix, as_uint8(xray_like(37, 53)))[1].tobytes()
    fmt, width, height = image_header(data)
    assert (width, height) == (53, 37)
    assert fmt == {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}[suffix]


def test_bigtiff_header_is_read():
    entries = [struct.pack("<HHQQ", 256, 16, 1, 70_000), struct.pack("<HHQQ", 257, 4, 1, 90_000)]
    data = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2) + b"".join(entries)
    assert image_header(data) == ("TIFF", 70_000, 90_000)


@pytest.mark.parametrize("data", [
    png_bomb(100_000, 100_000),
    png_bomb(2**31 - 1, 1),
    b"BM" + struct.pack("<IHHII", 0, 0, 0, 54, 40) + struct.pack("<iiHHI", 50_000, -50_000, 1, 24, 2),
])
def test_bomb_is_refused_from_header(tmp_path, data):
    path = tmp_path / "bomb.img"
    path.write_bytes(data)
    with pytest.raises(DecodeError, match="decompression bomb"):
        read_image(path)


def test_pixel_limit_applies_to_genuine_images(tmp_path):
    path = write(tmp_path / "small.png", as_uint8(GREY))
    assert read_image(path, max_pixels=GREY.size).shape == GREY.shape
    with pytest.raises(DecodeError, match=r"47x61 pixels"):
        read_image(path, max_pixels=GREY.size - 1)


def test_bad_inputs_give_one_line_reasons(tmp_path):
    expected = write_bad_corpus(tmp_path)
    assert len(expected) >= 22
    for name, reason in expected.items():
        with pytest.raises(DecodeError) as info:
            read_image(tmp_path / name, max_pixels=4_000_000)  # a small limit keeps the deflate bomb check quick
        message = str(info.value)
        assert reason in message, (name, message)
        assert "\n" not in message


def test_no_image_content(tmp_path):
    for shape in ((50, 40), (1, 1)):
        with pytest.raises(NoImageContent, match="no image content: constant pixel values"):
            read_image(write(tmp_path / "flat.png", np.full(shape, 77, np.uint8)))
    with pytest.raises(NoImageContent, match="constant pixel values"):
        read_image(write_dicom(tmp_path / "flat.dcm", np.full((20, 20), 1000, np.uint16), window=(500.0, 100.0)))
    # content only at the very edge: the decoder sees it, the model input would be blank
    grey = read_image(write(tmp_path / "framed.png", framed_blank()))
    with pytest.raises(NoImageContent, match="no image content: flat"):
        preprocess(grey, tiny_record(32).preprocessing)


def test_signature_decides_the_format_not_the_name(tmp_path):
    png = write(tmp_path / "real.png", as_uint8(GREY))
    named_dcm = tmp_path / "scan.dcm"
    named_dcm.write_bytes(png.read_bytes())
    np.testing.assert_array_equal(read_image(named_dcm), read_image(png))
    bare = tmp_path / "bare.dcm"  # a DICOM data set without the Part 10 preamble: known by its name
    bare.write_bytes(write_dicom(tmp_path / "full.dcm", STORED, bits=12).read_bytes()[132:])
    assert read_image(bare).shape == STORED.shape


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DecodeError, match="folder"):
        read_image(tmp_path)


# ---------------------------------------------------------------- DICOM

STORED = (as_uint16(xray_like(40, 36, seed=5)) >> 4)  # 12-bit stored values


def test_dicom_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", STORED, bits=12))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", STORED, bits=12, photometric="MONOCHROME1"))
    lo, hi = STORED.min(), STORED.max()
    np.testing.assert_allclose(mono2, (STORED - lo) / (hi - lo), atol=1e-6)  # full data range
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2.std() > 0.05


def test_dicom_rescale_then_window(tmp_path):
    slope, intercept, center, width = 2.0, -1000.0, 2500.0, 3000.0
    img = read_image(write_dicom(tmp_path / "w.dcm", STORED, bits=12, slope=slope, intercept=intercept,
                                 window=(center, width)))
    hu = STORED * slope + intercept
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(img, expected, atol=1e-5)
    assert 0 < (img == 0).sum() + (img == 1).sum() < img.size  # the window clips some pixels
    unrescaled = np.clip((STORED - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert np.abs(img - unrescaled).max() > 0.1


def test_dicom_window_on_monochrome1_is_inverted(tmp_path):
    kw = dict(bits=12, window=(2000.0, 2500.0), voi_function="LINEAR_EXACT")
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", STORED, **kw))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1", **kw))
    np.testing.assert_allclose(mono2, np.clip((STORED - 2000.0) / 2500.0 + 0.5, 0, 1), atol=1e-5)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a gamma-like VOI LUT
    img = read_image(write_dicom(tmp_path / "lut.dcm", STORED, bits=12, voi_lut=lut))
    np.testing.assert_allclose(img, lut[STORED] / 65535, atol=1e-5)


def test_dicom_truncated_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", STORED, bits=12)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DecodeError, match="DICOM"):
        read_image(path)


@pytest.mark.parametrize("syntax, bits", [
    (JPEGBaseline8Bit, 8), (JPEGLosslessSV1, 12), (JPEGLSLossless, 12), (JPEG2000Lossless, 12), (RLELossless, 12),
])
def test_compressed_dicom_decodes_to_the_original_pixels(tmp_path, syntax, bits):
    """Each transfer syntax clinics send, encoded here by an independent encoder."""
    import pydicom

    pixels = as_uint8(xray_like(40, 36, seed=5)) if bits == 8 else STORED
    path = write_compressed_dicom(tmp_path / "c.dcm", pixels, syntax, bits)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    native = read_image(write_dicom(tmp_path / "n.dcm", pixels.astype(np.uint16), bits=bits))
    if syntax == JPEGBaseline8Bit:  # lossy: compare with OpenCV's decoding of the same JPEG stream
        reference = cv2.imdecode(np.frombuffer(bytes(next(iter_fragments(ds))), np.uint8), cv2.IMREAD_GRAYSCALE)
        assert np.abs(ds.pixel_array.astype(int) - reference).max() <= 1
        assert np.abs(read_image(path) - native).mean() < 0.02
    else:
        np.testing.assert_array_equal(ds.pixel_array, pixels)
        np.testing.assert_array_equal(read_image(path), native)


def iter_fragments(ds):
    from pydicom.encaps import generate_fragments, parse_basic_offsets
    import io

    buffer = io.BytesIO(ds.PixelData)
    parse_basic_offsets(buffer)
    return generate_fragments(buffer)


def test_memory_bombs_are_refused_under_a_memory_limit(tmp_path):
    """Decoded, each would take gigabytes; refused before decoding, they fit in 1.5 GB of
    address space (a regression fails here instead of taking the machine down)."""
    files = {
        "frames-undeclared.dcm": (frame_bomb(tmp_path / "a.dcm", declare_frames=False), "undeclared frames"),
        "frames-one-declared.dcm": (frame_bomb(tmp_path / "b.dcm", declare_frames=True), "undeclared frames"),
        "deflated.dcm": (deflate_bomb(tmp_path / "c.dcm"), "possible decompression bomb"),
        "j2k.dcm": (j2k_size_bomb(tmp_path / "d.dcm"), "possible decompression bomb"),
    }
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        from xray_edge.decode import DecodeError, read_image
        for path in sys.argv[1:]:
            try:
                read_image(path)
                print(path, "DECODED")
            except DecodeError as e:
                print(path, e)
    """)
    proc = subprocess.run([sys.executable, "-c", code, *(str(p) for p, _ in files.values())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files)
    for line, (path, reason) in zip(lines, files.values()):
        assert line.startswith(str(path)) and reason in line, line
    assert proc.stderr == ""


def test_unreadable_file_reason(tmp_path, monkeypatch):
    """chmod 000 cannot stop root (write_bad_corpus covers it for other users): simulate it."""
    path = write(tmp_path / "locked.png", as_uint8(GREY))
    real_open = os.open

    def denied(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(DecodeError, match="permission denied"):
        read_image(path)
