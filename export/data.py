"""Images for the export: validation/test splits for the gate and the metrics, training images for
INT8 calibration, all read from the training run's split manifest (split.csv) and decoded and
preprocessed exactly as the runtime does (``xray_edge.pipeline.prepare``)."""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from xray_edge.contract import Preprocessing, sha256_file  # noqa: F401 (re-exported)
from xray_edge.train.manifest import load_split, read_manifest

DATA_ENV = "XRAY_EDGE_DATA"


class ExportDataError(ValueError):
    """The split manifest or its images cannot be used (one-line message)."""


@dataclass
class Images:
    """Preprocessed model inputs (N, S, S, 1) float32, their label indices and files."""

    x: np.ndarray
    y: np.ndarray
    paths: list[str]


def data_root(given: Path | None) -> Path | None:
    """``--data`` or else ``$XRAY_EDGE_DATA`` (None: only absolute manifest paths can be read)."""
    root = given or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if root is not None and not root.is_dir():
        raise ExportDataError(f"{root}: data root is not a folder")
    return root


class SplitManifest:
    """One split.csv: rows by split, with relative paths resolved against the data folder
    (absolute paths, from a hand-made manifest, are used as written)."""

    def __init__(self, manifest_csv: Path, classes: Sequence[str], root: Path | None):
        self.path = manifest_csv
        self.classes = list(classes)
        self.root = root
        try:
            rows = read_manifest(manifest_csv)
        except (OSError, ValueError) as e:
            raise ExportDataError(f"{manifest_csv}: cannot read split manifest ({e})") from None
        unknown = sorted({r["label"] for r in rows} - set(self.classes))
        if unknown:
            raise ExportDataError(f"{manifest_csv}: labels {unknown} are not among the model's classes {self.classes}")
        self.sha256 = {r["path"]: r["sha256"] for r in rows}
        self.counts = {s: dict(Counter(r["label"] for r in rows if r["split"] == s)) for s in ("train", "val", "test")}

    def resolve(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute():
            return p
        if self.root is None:
            raise ExportDataError(f"{self.path}: its paths are relative to the data folder; give it with --data DIR "
                                  f"(or set {DATA_ENV}), e.g. ../shared/data")
        return self.root / p

    def items(self, split: str) -> list[tuple[str, int]]:
        """``(manifest path, label index)`` of every image of ``split``."""
        items = load_split(self.path, split, self.classes)
        if not items:
            raise ExportDataError(f"{self.path}: no '{split}' images")
        return items


def stratified_sample(items: Sequence[tuple[str, int]], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` items drawn without replacement, each class in proportion to its share (largest
    remainder), seeded; returned in manifest order."""
    if n >= len(items):
        return list(items)
    labels = np.array([y for _, y in items])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(items)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                             for c, k in zip(classes, take)])
    return [items[i] for i in np.sort(chosen)]


def load_images(manifest: SplitManifest, items: Sequence[tuple[str, int]], spec: Preprocessing,
                what: str) -> Images:
    """Check, decode and preprocess ``items`` like the runtime. A file that is missing, changed since
    the manifest was written (sha256) or undecodable is reported on stderr in one line and left out."""
    from xray_edge.pipeline import prepare

    xs, ys, paths, skipped = [], [], [], 0
    for path, label in items:
        file = manifest.resolve(path)
        if not file.is_file():
            reason = "file not found"
        elif manifest.sha256.get(path) and sha256_file(file) != manifest.sha256[path]:
            reason = "sha256 differs from the split manifest (file changed)"
        else:
            prepared = prepare(file, spec)
            if prepared.image is not None:
                xs.append(prepared.image)
                ys.append(label)
                paths.append(str(file))
                continue
            reason = prepared.error
        print(f"skip {file}: {reason}", file=sys.stderr)
        skipped += 1
    if not xs:
        raise ExportDataError(f"{manifest.path}: none of the {len(items)} {what} images could be read")
    if skipped:
        print(f"{what}: {skipped} of {len(items)} images left out", file=sys.stderr)
    return Images(np.stack(xs).astype(np.float32), np.array(ys, dtype=int), paths)


def generated_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random grey images in [0, 1] (only for checking a conversion when no data are given)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.random((n, 8, 8)).astype(np.float32)
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
                     for s in small])[..., None].astype(np.float32)
