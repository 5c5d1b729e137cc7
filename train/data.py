"""Training data from one or more data roots: find the images, their labels, origins, age groups
and split groups, hash and decode them (with the runtime's decoder, so training and inference
decode identically).

A root may list ``label-conflicts.csv``: images of another root (column ``<root folder name>_path``,
relative to that root) whose label another source contradicts (``cxr3-extra`` lists ``cxr3/COVID``
films that SIIM radiologists read as negative for pneumonia). They are marked ``conflict``;
training leaves them out or keeps them by recipe, and evaluation never scores them.

A root either has a ``manifest.csv`` (columns ``path,label,source,sha256`` and optionally
``origin`` and ``group``), whose rows define its images, or is scanned: every image under a
folder named after a class. An image's ``origin`` is the manifest's ``origin`` column, else the
owner of its ``source`` repository (``owner/repo@commit:path``), else the root folder's name.
Its age group follows from the origin (``child_origins``; every other origin is adult).
"""
from __future__ import annotations

import csv
import hashlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from xray_edge.contract import CLASSES
from xray_edge.decode import DecodeError, read_image
from xray_edge.inputs import IMAGE_SUFFIXES
from xray_edge.train.recipes import CHILD_ORIGINS
from xray_edge.train.split import phash_bits, thumbnail


class DatasetError(ValueError):
    """The dataset cannot be used (the message is one line naming the reason)."""


@dataclass(frozen=True)
class Image:
    """One usable image. ``path`` is absolute; ``rel`` is relative to the data folder that holds
    every root (what split.csv stores)."""

    path: str
    rel: str
    label: str
    origin: str
    age_group: str
    group: str  # the manifest's split group ('' where it has none)
    source: str
    sha256: str
    pixel_sha256: str = ""
    conflict: bool = False  # listed in a label-conflicts.csv


def data_folder(roots: Sequence[Path]) -> Path:
    """The folder that split.csv paths are relative to: the common parent of every root."""
    return Path(os.path.commonpath([str(Path(r).resolve().parent) for r in roots]))


def origin_of(source: str) -> str:
    """The owner of ``owner/repo@commit:path`` ('' when the source names none)."""
    return source.split("/", 1)[0] if "/" in source.split("@", 1)[0] else ""


def _manifest_rows(root: Path) -> list[dict[str, str]] | None:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return None
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{manifest}: missing columns {sorted(missing)}")
        return list(reader)


def _scanned_rows(root: Path) -> list[dict[str, str]]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in CLASSES]
    if unknown:
        raise DatasetError(f"{root}: unknown class folder(s) {unknown}; expected folders named from {list(CLASSES)} "
                           "(or a manifest.csv listing the images)")
    return [{"path": p.relative_to(root).as_posix(), "label": label}
            for label in folders for p in sorted((root / label).rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def label_conflicts(roots: Sequence[Path]) -> set[str]:
    """Resolved paths of the images that some root's ``label-conflicts.csv`` lists (a
    ``<name>_path`` column names a file of the root folder called ``name``)."""
    by_name = {Path(r).resolve().name: Path(r) for r in roots}
    out: set[str] = set()
    for root in roots:
        listing = Path(root) / "label-conflicts.csv"
        if not listing.is_file():
            continue
        with listing.open(newline="") as f:
            for row in csv.DictReader(f):
                for column, value in row.items():
                    if column and column.endswith("_path") and column[:-5] in by_name and value:
                        out.add(str((by_name[column[:-5]] / value).resolve()))
    return out


def list_images(roots: Sequence[Path], selected: list[str] | None = None,
                child_origins: Sequence[str] = CHILD_ORIGINS) -> tuple[list[Image], list[str]]:
    """Every image of ``roots`` (files not yet read) and the classes, in contract order."""
    for root in roots:
        if not Path(root).is_dir():
            raise DatasetError(f"{root}: not a folder")
    unknown = [c for c in selected or [] if c not in CLASSES]
    if unknown:
        raise DatasetError(f"unknown class(es) {unknown}; use some of {list(CLASSES)}")
    folder = data_folder(roots)
    conflicts = label_conflicts(roots)
    images = []
    for root in map(Path, roots):
        rows = _manifest_rows(root)
        for row in rows if rows is not None else _scanned_rows(root):
            if row["label"] not in CLASSES:
                raise DatasetError(f"{root}/manifest.csv: unknown label {row['label']!r} for {row['path']}")
            if selected and row["label"] not in selected:
                continue
            path = (root / row["path"]).resolve()
            source = row.get("source", "")
            origin = row.get("origin") or origin_of(source) or root.resolve().name
            images.append(Image(path=str(path), rel=path.relative_to(folder).as_posix(), label=row["label"],
                                origin=origin, age_group="child" if origin in child_origins else "adult",
                                group=row.get("group", ""), source=source, sha256=row.get("sha256", ""),
                                conflict=str(path) in conflicts))
    classes = [c for c in CLASSES if any(im.label == c for im in images)]
    if len(classes) < 2:
        raise DatasetError(f"{', '.join(map(str, roots))}: need images of at least 2 classes, found {classes}")
    return images, classes


def scan(images: Sequence[Image]) -> tuple[list[Image], np.ndarray, np.ndarray]:
    """Hash and decode every image. Files that are missing, differ from their manifest sha256 or
    cannot be decoded are reported on stderr (one line each) and left out. Returns the usable
    images (with file and pixel hashes), their perceptual hashes (N, 64) bool and NCC thumbnails
    (N, 4096)."""
    kept: list[Image] = []
    hashes: list[np.ndarray] = []
    thumbs: list[np.ndarray] = []
    for im in images:
        try:
            data = Path(im.path).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if im.sha256 and sha != im.sha256:
                raise DecodeError("sha256 differs from the data's manifest (file changed)")
            grey = read_image(im.path)
            if min(grey.shape) < 8:
                raise DecodeError(f"image too small ({grey.shape[1]}x{grey.shape[0]})")
        except (DecodeError, OSError) as e:
            print(f"skip {im.path}: {e}", file=sys.stderr)
            continue
        kept.append(replace(im, sha256=sha,
                            pixel_sha256=hashlib.sha256(np.ascontiguousarray(grey).tobytes()).hexdigest()))
        hashes.append(phash_bits(grey))
        thumbs.append(thumbnail(grey))
    for label in sorted({im.label for im in images}):
        if not any(im.label == label for im in kept):
            raise DatasetError(f"no readable {label} images")
    return kept, np.array(hashes, dtype=bool).reshape(-1, 64), np.array(thumbs, dtype=np.float32)
