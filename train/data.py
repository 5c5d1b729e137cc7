"""Folder-per-class datasets: find the images, their labels and sources, hash and decode them
(with the runtime's decoder, so training and inference decode identically)."""
from __future__ import annotations

import csv
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_edge.contract import CLASSES
from xray_edge.decode import DecodeError, read_image
from xray_edge.train.split import phash_bits, thumbnail

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


class DatasetError(ValueError):
    """The dataset folder cannot be used (the message is one line naming the reason)."""


@dataclass(frozen=True)
class Image:
    """One usable image: absolute path, class name, origin (from the dataset's manifest.csv, if any),
    sha256 of the file and of its decoded pixels."""

    path: str
    label: str
    source: str
    sha256: str
    pixel_sha256: str


def dataset_classes(root: Path, selected: list[str] | None = None) -> list[str]:
    """Class folders of ``root`` in contract order, optionally restricted to ``selected``."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in CLASSES]
    if unknown:
        raise DatasetError(f"{root}: unknown class folder(s) {unknown}; expected folders named from {list(CLASSES)}")
    if selected:
        missing = [c for c in selected if c not in folders]
        if missing:
            raise DatasetError(f"{root}: --classes names {missing}, but the class folders are {folders}")
        folders = [f for f in folders if f in selected]
    classes = [c for c in CLASSES if c in folders]
    if len(classes) < 2:
        raise DatasetError(f"{root}: need at least 2 class folders, found {classes}")
    return classes


def read_sources(root: Path) -> dict[str, str]:
    """``relative path -> source`` from the dataset's optional ``manifest.csv`` (path, source columns)."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    with manifest.open(newline="") as f:
        return {row["path"]: row.get("source", "") for row in csv.DictReader(f) if row.get("path")}


def scan(root: Path, classes: list[str]) -> tuple[list[Image], np.ndarray, np.ndarray]:
    """Hash and decode every image under the class folders (recursively). Files that cannot be
    decoded are reported on stderr (one line each) and skipped. Returns the images (sorted by class,
    then path), their perceptual hashes (N, 64) bool and NCC thumbnails (N, 4096)."""
    sources = read_sources(root)
    images: list[Image] = []
    hashes: list[np.ndarray] = []
    thumbs: list[np.ndarray] = []
    for label in classes:
        for p in sorted((root / label).rglob("*")):
            if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                grey = read_image(p)
                if min(grey.shape) < 8:
                    raise DecodeError(f"image too small ({grey.shape[1]}x{grey.shape[0]})")
            except DecodeError as e:
                print(f"skip {p}: {e}", file=sys.stderr)
                continue
            rel = p.relative_to(root).as_posix()
            images.append(Image(
                path=str(p.resolve()), label=label, source=sources.get(rel, ""),
                sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                pixel_sha256=hashlib.sha256(np.ascontiguousarray(grey).tobytes()).hexdigest(),
            ))
            hashes.append(phash_bits(grey))
            thumbs.append(thumbnail(grey))
    for label in classes:
        if not any(im.label == label for im in images):
            raise DatasetError(f"{root / label}: no readable images")
    return images, np.array(hashes, dtype=bool).reshape(-1, 64), np.array(thumbs, dtype=np.float32)
