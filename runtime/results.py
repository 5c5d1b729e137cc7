"""Results files for ``xray-edge classify``: one row per file in CSV, JSON or JSONL.

Rows are appended to ``<output>.partial`` and synced to disk after every batch (CSV for a .csv
output, JSON lines otherwise), so a killed run loses at most the batch in flight; at the end the
finished file replaces ``<output>`` atomically (``os.replace``). ``read_previous`` reads them
back for ``--resume``; a half-written last row is ignored.

Safety: a run holds ``<output>.lock`` (``flock``, exclusive, non-blocking) from before it reads
earlier results until it has published, so a second run on the same output is refused rather
than interleaving or overwriting rows. Nothing is ever written through a name someone else could
have planted: new files are created with ``mkstemp`` (random name, ``O_EXCL``) in the output's
folder and renamed into place, the partial file is written through the descriptor that created
it, and an output, partial or lock file that is a symbolic link is refused.

Every file name round-trips: names are written as the bytes the filesystem holds (CSV, UTF-8
with undecodable bytes written back as the original bytes) or as Python's surrogate escapes
(JSON, ``\\udcNN`` for an undecodable byte NN), every CSV field is quoted (line breaks in names
stay in one row), and a CSV text cell that a spreadsheet would run as a formula (first
character ``= + - @``, tab or CR) gets a leading ``'``, as does one that starts with ``'``;
reading strips exactly one leading ``'``.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .decision import Decision
from .files import create, kind_of, new_file_mode, read_regular, write_all
from .pipeline import Result
from .session import LoadedModel

FORMATS = (".csv", ".json", ".jsonl")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


class ResumeError(ValueError):
    """An earlier results file cannot be continued by this run."""


class OutputError(ValueError):
    """``--output`` cannot be written safely now (a folder, a symbolic link, another run's)."""


def output_format(path: Path) -> str:
    """'.csv', '.json' or '.jsonl'; ValueError for anything else."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--output must end in .csv, .json or .jsonl, got '{path.name}'")
    return suffix


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def check_output(output: Path) -> None:
    """Refuse an output that is a folder, or whose output, partial or lock name is a symbolic
    link or anything else but a regular file (OutputError)."""
    for path in (output, partial_path(output), lock_path(output)):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode):
            raise OutputError(f"{path} is a symbolic link; refusing to write through it "
                              "(remove it or choose another --output)")
        if stat.S_ISDIR(mode) and path == output:
            raise OutputError(f"--output {output} is a folder; name a .csv, .json or .jsonl file")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{path} is not a regular file ({kind_of(mode)}); remove it or choose another --output")


@contextmanager
def locked(output: Path) -> Iterator[None]:
    """Hold ``<output>.lock`` exclusively for the block (creating the output's folder); OutputError
    at once if another run holds it. The lock file is removed when the block ends."""
    output.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(output)
    fd = _lock(path, output)
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _lock(path: Path, output: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{path} is a symbolic link; refusing to use it as a lock") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(f"{path} is not a regular file; remove it or choose another --output")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(f"{output} is being written by another xray-edge classify run (it holds {path}); "
                                  "wait for it to finish or choose another --output") from None
            with suppress(FileNotFoundError):
                named, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
                if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the run that held it removed the file meanwhile: lock the new one


STATUSES = ("ok", "rejected", "error")  # classified; refused by the input gate; could not be read


def columns(classes: Iterable[str]) -> list[str]:
    return ["path", "status", "decision", "label", *[f"p_{c}" for c in classes], "flagged", "age_group", "warning",
            "gate_score", "reason", "heatmap", "ms", "model", "site"]


def make_row(result: Result, model: LoadedModel, decision: Decision | None, heatmap: str = "") -> dict[str, Any]:
    """A results row from a file's result and what the record's rules made of it (``decision``;
    None when the file could not be read). A rejected image gets no class and no probabilities."""
    classes = model.classes
    if decision is None:
        status, reason = "error", result.error
    else:
        status, reason = ("rejected" if decision.decision == "rejected" else "ok"), decision.reason
    classified = status == "ok"
    probs = [round(float(p), 6) for p in result.probs] if classified else [None] * len(classes)
    return {"path": result.path, "status": status, "decision": decision.decision if decision else "error",
            "label": decision.label if classified else "", **{f"p_{c}": p for c, p in zip(classes, probs)},
            "flagged": decision.flagged if classified else [], "age_group": decision.age_group if classified else "",
            "warning": "; ".join(w for w in (decision.warning, result.note) if w) if classified else "",
            "gate_score": None if decision is None or decision.gate_score is None else round(decision.gate_score, 3),
            "reason": reason, "heatmap": heatmap, "ms": round(result.ms, 1), "model": model.label,
            "site": model.site.label if model.site is not None else ""}


def read_previous(output: Path, classes: list[str]) -> list[dict[str, Any]]:
    """Rows of an earlier run into ``output``, for --resume: its ``.partial`` file if it left one
    (which starts with every row it resumed from), else the published file; one row per file,
    the latest. Raises ResumeError if they cannot be continued with these classes."""
    fmt = output_format(output)
    for path, kind in ((partial_path(output), ".csv" if fmt == ".csv" else ".jsonl"), (output, fmt)):
        try:
            data = read_regular(path, sys.maxsize, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ResumeError(f"cannot read earlier results {path} ({e.strerror or e})") from None
        rows = _parse(data, kind, columns(classes), path)
        return list({os.path.abspath(r["path"]): r for r in rows}.values())
    return []


class ResultsWriter:
    """Streams rows to ``<output>.partial`` and publishes ``<output>`` atomically at the end.

    A failed write (disk full) is undone (the partial file is cut back to its last whole batch)
    and raised as OSError; the rows written before it stay."""

    def __init__(self, output: Path, classes: list[str], keep: list[dict[str, Any]]):
        self.output, self.fmt, self.fields = output, output_format(output), columns(classes)
        self.partial = partial_path(output)
        self.mode = new_file_mode()
        self.fd = create(self.partial, self._encode(keep, header=True), self.mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and push them to disk."""
        data = self._encode(rows)
        try:
            write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError:
            with suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)

    def publish(self) -> None:
        """Replace ``output`` with the finished results and remove the partial file."""
        data = os.pread(self.fd, self.size, 0)
        if self.fmt == ".json":
            rows = _parse(data, ".jsonl", self.fields, self.partial)
            data = (json.dumps(rows, indent=2, ensure_ascii=True) + "\n").encode("ascii")
        os.close(create(self.output, data, self.mode))
        with suppress(FileNotFoundError):
            os.unlink(self.partial)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _encode(self, rows: list[dict[str, Any]], header: bool = False) -> bytes:
        if self.fmt != ".csv":
            return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows).encode("ascii")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if header:
            writer.writerow(self.fields)
        writer.writerows([_csv_cell(row[f]) for f in self.fields] for row in rows)
        return buffer.getvalue().encode("utf-8", "surrogateescape")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        value = ";".join(value)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _from_csv_cell(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def _parse(data: bytes, kind: str, fields: list[str], path: Path) -> list[dict[str, Any]]:
    """Rows of a results file's bytes (``kind``: '.csv', '.jsonl' or '.json'); a last row cut
    off mid-write is dropped."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        if kind == ".csv":
            records = _csv_records(text, path)
            if records and records[0] != fields:
                raise ResumeError(f"{path} has columns {records[0]}, this model writes {fields}")
            rows = [dict(zip(fields, map(_from_csv_cell, r))) if len(r) == len(fields) else r  # refused below
                    for r in records[1:]]
        elif kind == ".jsonl":
            lines = text.split("\n")[:-1]  # after the last newline: nothing, or a row cut off mid-write
            rows = [json.loads(line) for line in lines if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResumeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise ResumeError(f"{path} is not a list of result rows")
    for row in rows:
        if not isinstance(row, dict) or list(row) != fields or row["status"] not in STATUSES:
            raise ResumeError(f"{path} has a row that this model would not write: {str(row)[:200]}")
    return rows


def _csv_records(text: str, path: Path) -> list[list[str]]:
    records: list[list[str]] = []
    try:
        records.extend(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        if "unexpected end of data" not in str(e):  # anything but a quoted field cut off at the end
            raise ResumeError(f"{path} is not valid CSV ({e})") from None
        return records
    if records and not text.endswith("\n"):
        records.pop()  # the last row was cut off mid-write
    return records
