"""Results files for ``xray-edge classify``: one row per file in CSV, JSON or JSONL.

Rows are appended to ``<output>.partial`` and flushed to disk after every batch (CSV for a .csv
output, JSON lines otherwise), so a killed run loses at most the batch in flight; at the end the
finished file replaces ``<output>`` atomically (``os.replace``). ``read_previous`` reads them
back for ``--resume``; a half-written last line is ignored.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .pipeline import Result
from .session import LoadedModel

FORMATS = (".csv", ".json", ".jsonl")


class ResumeError(ValueError):
    """An earlier results file cannot be continued by this run."""


def output_format(path: Path) -> str:
    """'.csv', '.json' or '.jsonl'; ValueError for anything else."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--output must end in .csv, .json or .jsonl, got '{path.name}'")
    return suffix


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def columns(classes: Iterable[str]) -> list[str]:
    return ["path", "status", "label", *[f"p_{c}" for c in classes], "flagged", "error", "ms", "model"]


def make_row(result: Result, model: LoadedModel) -> dict[str, Any]:
    """A results row: predicted label, every class probability, and the classes flagged at the
    record's operating thresholds (probability >= threshold)."""
    classes, thresholds = model.classes, model.record.thresholds
    if result.probs is None:
        probs: list[float | None] = [None] * len(classes)
        label, flagged, status = "", [], "error"
    else:
        probs = [round(float(p), 6) for p in result.probs]
        label, status = classes[int(np.argmax(result.probs))], "ok"
        flagged = [c for c, p in zip(classes, result.probs) if c in thresholds and p >= thresholds[c]]
    return {"path": result.path, "status": status, "label": label,
            **{f"p_{c}": p for c, p in zip(classes, probs)}, "flagged": flagged,
            "error": result.error, "ms": round(result.ms, 1), "model": model.label}


def read_previous(output: Path, classes: list[str]) -> list[dict[str, Any]]:
    """Rows of an earlier run into ``output``, for --resume: its ``.partial`` file if it left one
    (which starts with every row it resumed from), else the published file; one row per file,
    the latest. Raises ResumeError if they cannot be continued with these classes."""
    partial = partial_path(output)
    fmt = output_format(output)
    if partial.is_file():
        rows = _read_rows(partial, ".csv" if fmt == ".csv" else ".jsonl", columns(classes))
    elif output.is_file():
        rows = _read_rows(output, fmt, columns(classes))
    else:
        rows = []
    return list({os.path.abspath(r["path"]): r for r in rows}.values())


class ResultsWriter:
    """Streams rows to ``<output>.partial`` and publishes ``<output>`` atomically at the end."""

    def __init__(self, output: Path, classes: list[str], keep: list[dict[str, Any]]):
        self.output, self.fmt, self.fields = output, output_format(output), columns(classes)
        self.partial = partial_path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.partial, self._header() + self._encode(keep))
        self.file = open(self.partial, "a", encoding="utf-8", newline="")

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and push them to disk."""
        self.file.write(self._encode(rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def publish(self) -> None:
        """Replace ``output`` with the finished results and remove the partial file."""
        self.file.close()
        if self.fmt == ".json":
            rows = _read_rows(self.partial, ".jsonl", self.fields)
            _atomic_write(self.output, json.dumps(rows, indent=2) + "\n")
            self.partial.unlink()
        else:
            os.replace(self.partial, self.output)

    def close(self) -> None:
        self.file.close()

    def _header(self) -> str:
        return _csv_text([self.fields]) if self.fmt == ".csv" else ""

    def _encode(self, rows: list[dict[str, Any]]) -> str:
        if self.fmt == ".csv":
            return _csv_text([[_csv_value(row[f]) for f in self.fields] for row in rows])
        return "".join(json.dumps(row) + "\n" for row in rows)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return ";".join(value) if isinstance(value, list) else value


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _read_rows(path: Path, kind: str, fields: list[str]) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResumeError(f"cannot read earlier results {path} ({e})") from None
    if kind != ".json" and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last line was cut off mid-write
    if kind == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames and reader.fieldnames != fields:
            raise ResumeError(f"{path} has columns {reader.fieldnames}, this model writes {fields}")
        rows = list(reader)
    else:
        try:
            rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if kind == ".jsonl"
                    else json.loads(text))
        except json.JSONDecodeError as e:
            raise ResumeError(f"{path} is not valid JSON ({e})") from None
    for row in rows:
        if not isinstance(row, dict) or list(row) != fields or row["status"] not in ("ok", "error"):
            raise ResumeError(f"{path} has a row that this model would not write: {str(row)[:200]}")
    return rows


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, sync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
