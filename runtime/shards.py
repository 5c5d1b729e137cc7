"""Parquet shards: the durable state of a ``classify --ray`` run, one file per chunk of files.

A run splits its file list into chunks; each chunk's rows, once classified, are written to
``<output>.shards/<name>.parquet``, where the name is a digest of the chunk's paths (the same
chunk always gets the same name, so a chunk that Ray runs twice is written twice to the same
file, with the same rows). A shard is written to a new, randomly named file and renamed into
place (``files.create``): a reader sees a whole shard or none. At the end the shards are merged,
one row per path, into the results file the user asked for, and the folder is removed; a run
that stops before that leaves them for ``--resume``.

Columns: ``path`` (binary: the file name's bytes), ``status`` and ``decision`` (for queries
over the shards of a long run), and ``row``: the full results row as one JSON object, exactly
what a ``.jsonl`` output holds (ASCII, undecodable name bytes as ``\\udcNN``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .files import create, kind_of, new_file_mode
from .results import OutputError, ResumeError, columns

SUFFIX = ".parquet"
SCHEMA = pa.schema([("path", pa.binary()), ("status", pa.string()), ("decision", pa.string()), ("row", pa.string())])


def shards_folder(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def check_shards_folder(output: Path) -> None:
    """OutputError if ``<output>.shards`` exists and is a symbolic link or not a folder."""
    folder = shards_folder(output)
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise OutputError(f"{folder} is a {kind_of(mode)}, not a folder of shards; "
                          "remove it or choose another --output")


def remove_shards(output: Path) -> None:
    shutil.rmtree(shards_folder(output), ignore_errors=True)


def chunk_name(paths: Iterable[str]) -> str:
    """The shard name of a chunk: a digest of its paths, in order."""
    digest = hashlib.sha256(b"\0".join(os.fsencode(p) for p in paths))
    return "chunk-" + digest.hexdigest()[:32]


def write_shard(output: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """Write (or rewrite, with the same rows) the shard ``name``."""
    table = pa.table({"path": [os.fsencode(r["path"]) for r in rows], "status": [r["status"] for r in rows],
                      "decision": [r["decision"] for r in rows],
                      "row": [json.dumps(r, ensure_ascii=True) for r in rows]}, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    folder = shards_folder(output)
    folder.mkdir(exist_ok=True)
    os.close(create(folder / (name + SUFFIX), sink.getvalue().to_pybytes(), new_file_mode()))


def read_shard(path: Path, classes: list[str]) -> list[dict[str, Any]]:
    """The rows of one shard; ResumeError if it cannot be read or holds rows of other columns."""
    try:
        texts = pq.read_table(path, columns=["row"]).column("row").to_pylist()
        rows = [json.loads(text) for text in texts]
    except (OSError, pa.ArrowException, ValueError) as e:
        raise ResumeError(f"cannot read shard {path} ({e}); remove it to classify its files again") from None
    fields = columns(classes)
    for row in rows:
        if not isinstance(row, dict) or list(row) != fields:
            raise ResumeError(f"{path} has a row that this model would not write: {str(row)[:200]}")
    return rows


def shard_path(output: Path, name: str) -> Path:
    return shards_folder(output) / (name + SUFFIX)


def earlier_shards(output: Path) -> list[Path]:
    """The shards an unfinished run left, by name."""
    try:
        names = sorted(n for n in os.listdir(shards_folder(output)) if n.endswith(SUFFIX) and not n.startswith("."))
    except FileNotFoundError:
        return []
    return [shards_folder(output) / n for n in names]
