"""Images the model was not built to judge, for measuring the input gate: real photographs and
scanned pages from scikit-image's bundled sample images, real CT and MR slices from pydicom's
bundled test files, and generated ones (blank, noise, gradients, a typed document). Every set is
written as files into a folder and then classified like any other input. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DICOM_MODALITIES = ("CT", "MR", "US", "NM", "PT")


def photos(folder: Path) -> list[str]:
    """The sample pictures scikit-image ships as files (photographs, a scanned page, text,
    microscopy, a retina, a CT phantom), copied; read from its package folder, so nothing is
    downloaded."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source in sorted((Path(spec.origin).parent / "data").glob("*")):
        if source.suffix.lower() in (".png", ".jpg", ".jpeg"):
            shutil.copyfile(source, folder / source.name)
            out.append(str(folder / source.name))
    return out


def ct_mr(folder: Path, limit: int = 20) -> list[str]:
    """Distinct single-frame greyscale CT/MR/US/NM/PT slices among the test files bundled inside
    pydicom (read from its package folder: nothing is downloaded), copied."""
    import shutil
    import warnings

    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    out, seen = [], set()
    for source in sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(source)
                if (str(ds.get("Modality", "")) not in DICOM_MODALITIES or int(ds.get("NumberOfFrames", 1) or 1) != 1
                        or not str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")):
                    continue
                signature = (int(ds.Rows), int(ds.Columns), float(np.mean(ds.pixel_array)))
        except Exception:  # unreadable here (no decoder) or no pixels: not a usable sample
            continue
        if signature in seen:  # the same slice in another transfer syntax
            continue
        seen.add(signature)
        target = folder / f"{ds.Modality}-{source.name}"
        shutil.copyfile(source, target)
        out.append(str(target))
        if len(out) >= limit:
            break
    return out


def generated(folder: Path, size: int = 512, seed: int = 0) -> list[str]:
    """Blank, noise, gradient, checkerboard, blob and typed-document images."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    page = np.full((size, size), 245, np.uint8)
    for i in range(18):
        cv2.putText(page, f"Patient record {i:02d}: findings as reported, see attached", (20, 30 + 26 * i),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, 20, 1, cv2.LINE_AA)
    images = {
        "black": np.zeros((size, size), np.uint8),
        "white": np.full((size, size), 255, np.uint8),
        "grey": np.full((size, size), 128, np.uint8),
        "noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "gradient": np.round(255 * xx).astype(np.uint8),
        "checkerboard": (((yy * 8).astype(int) + (xx * 8).astype(int)) % 2 * 255).astype(np.uint8),
        "blob": np.round(255 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)).astype(np.uint8),
        "document": page,
    }
    out = []
    for name, img in images.items():
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), img)
        out.append(str(path))
    return out


def write_sets(folder: Path) -> dict[str, list[str]]:
    """Every out-of-distribution set that can be made here, by name (empty sets left out)."""
    sets = {"photos and pages (scikit-image)": photos(folder / "photos"),
            "CT/MR slices (pydicom test files)": ct_mr(folder / "ct_mr"),
            "generated (blank, noise, pattern, document)": generated(folder / "generated")}
    return {name: paths for name, paths in sets.items() if paths}
