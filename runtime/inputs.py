"""What counts as an input image, known before anything heavy is imported (the command line
reads these for its help): file suffixes, the DICOM signature and the pixel limit."""
from __future__ import annotations

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; the largest chest X-ray detectors are ~20 MP
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)


def is_dicom(data: bytes) -> bool:
    """True if ``data`` starts with a DICOM Part 10 preamble ('DICM' at byte 128)."""
    return data[128:132] == b"DICM"
