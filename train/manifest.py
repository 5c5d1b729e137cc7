"""The split manifest (split.csv next to the model), read by evaluation, export calibration and the
benchmark. Standard library only, so it imports on any install.

Columns: path (relative to the data folder that holds the data roots, so a clone on another
machine finds the images with ``--data`` or ``$XRAY_EDGE_DATA`` alone), label (class name), origin
(the collection it comes from), age_group (adult/child), source (the data's own manifest entry),
sha256 (of the file), group (duplicate/patient/study group id), split (train/val/test, or excluded for
a known label conflict).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

from xray_edge.contract import CLASSES

SPLITS = ("train", "val", "test")
EXCLUDED = "excluded"  # split of a known label conflict (train.data): never trained on by default, never scored
COLUMNS = ("path", "label", "origin", "age_group", "source", "sha256", "group", "split")


def write_manifest(path: Path, rows: Iterable[dict[str, str]]) -> None:
    """Write manifest rows (dicts with COLUMNS keys)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: row[k] for k in COLUMNS} for row in rows)


def read_manifest(manifest_csv: str | Path) -> list[dict[str, str]]:
    """All rows of a manifest; ValueError (one line) if columns are missing."""
    with open(manifest_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest_csv}: not a split manifest (missing columns {sorted(missing)})")
        return list(reader)


def manifest_classes(rows: Sequence[dict[str, str]]) -> list[str]:
    """Classes present in the manifest, in contract order (the model's class order)."""
    labels = {r["label"] for r in rows}
    return [c for c in CLASSES if c in labels]


def load_split(manifest_csv: str | Path, split: str,
               classes: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """``(path, label_index)`` of every image in ``split`` ("train", "val" or "test"). Label indices
    follow ``classes`` (default: the manifest's classes in contract order = the trained model's
    ``record.classes``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rows = read_manifest(manifest_csv)
    classes = list(classes or manifest_classes(rows))
    return [(r["path"], classes.index(r["label"])) for r in rows if r["split"] == split]
