"""The benchmark's images: a labelled folder (one sub-folder per class) or a split manifest
(split.csv), a seeded stratified subset of it, decoded and preprocessed once by the runtime's own
code; the arrays are then shared by every format.

Manifest images go through the export's loader (re-rooting with ``data_root``, sha256 check
against the manifest); folder images through the runtime's prefetching ``prepared_batches``.
A file that cannot be used is reported on stderr in one line and left out.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.benchmarks.config import shown
from xray_edge.contract import Preprocessing
from xray_edge.export.data import Images, SplitManifest, data_root as resolve_root, load_images, stratified_sample


class EvalSetError(ValueError):
    """The images cannot be used (one-line message)."""


def folder_items(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label index)`` of the images in ``root/<class>/`` (recursively), sorted."""
    from xray_edge.classify import find_images

    if not root.is_dir():
        raise EvalSetError(f"{root}: not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise EvalSetError(f"{root}: folders {unknown} are not classes of the model {list(classes)}")
    items = []
    for folder in folders:
        files, _, _ = find_images([root / folder], recursive=True)
        items += [(f, list(classes).index(folder)) for f in files]
    if not items:
        raise EvalSetError(f"{root}: no images in class folders (expected {root}/<class>/*.png)")
    return items


def decode_items(items: Sequence[tuple[str, int]], spec: Preprocessing) -> Images:
    """Decode and preprocess with the runtime's prefetching pipeline; bad files are left out."""
    from xray_edge.pipeline import prepared_batches

    labels = dict(items)
    xs, ys, paths = [], [], []
    for batch in prepared_batches([p for p, _ in items], spec, batch_size=16):
        for p in batch:
            if p.image is None:
                print(f"skip {p.path}: {p.error}", file=sys.stderr)
                continue
            xs.append(p.image)
            ys.append(labels[p.path])
            paths.append(p.path)
    if not xs:
        raise EvalSetError(f"none of the {len(items)} images could be read")
    return Images(np.stack(xs).astype(np.float32), np.array(ys, dtype=int), paths)


def load(data: Path, classes: Sequence[str], spec: Preprocessing, limit: int, seed: int,
         split: str = "test", data_root: Path | None = None) -> tuple[Images, dict[str, Any]]:
    """The evaluation images and a description of them (for the results files).

    ``data``: a class-folder root or a split.csv (then its ``split`` rows, re-rooted under
    ``data_root`` or $XRAY_EDGE_DATA when moved). ``limit`` > 0 keeps a seeded stratified subset
    of that many images."""
    if data.is_file():
        data_root = resolve_root(data_root)  # --data-root, else $XRAY_EDGE_DATA, else paths as written
        manifest = SplitManifest(data, classes, data_root)
        available = manifest.items(split)
        items = stratified_sample(available, limit, seed) if limit > 0 else available
        images = load_images(manifest, items, spec, split)
        kind = "split manifest"
    elif data.is_dir():
        available = folder_items(data, classes)
        items = stratified_sample(available, limit, seed) if limit > 0 else available
        images = decode_items(items, spec)
        kind = "class folders"
    else:
        raise EvalSetError(f"{data}: no such file or folder (give a class-folder root or a split.csv)")
    counts = np.bincount(images.y, minlength=len(classes))
    description = {
        "source": shown(data),
        "kind": kind,
        "split": split if kind == "split manifest" else None,
        "data_root": shown(data_root) if data_root else None,
        "available": len(available),
        "selected": len(items),
        "used": len(images.y),
        "left_out": len(items) - len(images.y),
        "subset": f"seeded stratified subset (seed {seed})" if 0 < limit < len(available) else "all images",
        "seed": seed,
        "per_class": {c: int(n) for c, n in zip(classes, counts)},
        "inputs_sha256": hashlib.sha256(images.x.tobytes()).hexdigest(),  # the preprocessed arrays
    }
    return images, description


def calibration_images(manifest_csv: Path, classes: Sequence[str], spec: Preprocessing, n: int, seed: int,
                       data_root: Path | None = None) -> Images:
    """``n`` training-split images (seeded, stratified) for post-training quantization."""
    manifest = SplitManifest(manifest_csv, classes, resolve_root(data_root))
    return load_images(manifest, stratified_sample(manifest.items("train"), n, seed), spec, "calibration (train)")
