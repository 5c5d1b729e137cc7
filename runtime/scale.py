"""``xray-edge classify SOURCE... --ray ADDRESS --output FILE``: the same rows as ``classify``,
computed on a Ray cluster (extra ``[scale]``).

SOURCE is a folder (``--recursive`` as usual), an image file, or a text file listing image paths,
one per line (relative ones from the current folder); every node must see the files at the same
paths. The driver lists the files, splits those still to do into chunks (a whole number of
``--batch-size`` batches, so the model sees the batches ``classify`` would give it), and streams
them through Ray (``scale_ray``). Each chunk's rows are written as a Parquet shard named by its
paths (``shards``) as it comes back; at the end the shards are merged in file order, one row per
path, into ``--output`` through the same writer as ``classify`` (atomic publish), and removed.

Exactly once: a chunk that Ray runs twice (a killed worker, a restarted actor) has the same shard
name and the same rows, the driver keeps the first, and the merge keeps one row per path; a
chunk that never came back gets error rows saying so. ``--resume`` keeps the rows of the results
file and of the shards a stopped run left (failed files are retried), like ``classify``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import typer

from .classify import DISCLAIMER, TABLE_LIMIT, check_same_model, find_images, format_table, summary_of
from .files import FileTooLarge, read_head, read_regular
from .inputs import IMAGE_SUFFIXES, is_dicom
from .pipeline import Result
from .results import OutputError, ResultsWriter, ResumeError, locked, make_row, partial_path, read_previous
from .session import LoadedModel
from .shards import (check_shards_folder, chunk_name, earlier_shards, read_shard, remove_shards, shard_path,
                     shards_folder, write_shard)
from .terminal import Progress, say

CHUNK_BATCHES = 8  # batches per chunk (a Ray task, a shard) ...
MAX_CHUNKS = 20_000  # ... more when a run has more files than this many chunks of CHUNK_BATCHES
MAX_LIST_BYTES = 1 << 32  # a path list larger than 4 GiB is refused
MERGE_ROWS = 10_000  # rows per write (and sync) while merging shards into --output
RAY_LOG = "ray.log"  # in the shards folder: what Ray prints during the run

Chunk = tuple[str, list[str]]  # (shard name, paths)


def classify_on_ray(address: str, sources: list[Path], recursive: bool, model_args: dict[str, Any],
                    model: LoadedModel, output: Path | None, resume: bool, quiet: bool, batch_size: int,
                    threads: int, max_pixels: int, heatmaps: Path | None, report: Path | None) -> int:
    """Run ``classify`` on the Ray cluster at ``address``; prints what ``classify`` prints and
    returns its exit code. ``model_args``: ``open_model``'s arguments as ``classify`` gave them
    (each actor opens the model with them); ``model``: the model the driver opened with them."""
    if output is None:
        _usage("--ray needs --output (the results file the cluster's rows are merged into)")
    if report is not None:
        _usage("--report is not available with --ray (it keeps every picture in one process); "
               "--heatmaps DIR on storage every node can write gives the pictures")
    try:
        check_shards_folder(output)
    except OutputError as e:
        _usage(str(e))
    files, skipped, unlisted = list_sources(sources, recursive)
    for folder, reason in unlisted:
        say(f"warning: cannot list folder {folder} ({reason})", err=True)
    if not files:
        _usage(f"no images found in {', '.join(map(str, sources))} (looked for {', '.join(IMAGE_SUFFIXES)}"
               f"{'' if recursive else '; add --recursive for sub-folders'})")
    actor_args = {k: Path(os.path.abspath(v)) if isinstance(v, Path) else v for k, v in model_args.items()}
    pictures = None if heatmaps is None else (os.path.abspath(heatmaps), str(heatmaps))
    try:
        with locked(output):
            keep = earlier_rows(output, model) if resume else fresh_start(output, quiet)
            done = {os.path.abspath(r["path"]) for r in keep}
            chunks = make_chunks([f for f in files if f not in done], batch_size)
            start = time.perf_counter()
            if chunks:
                run_chunks(address, chunks, actor_args, model, output, quiet, batch_size, threads, max_pixels, pictures)
            shown, decisions, labels = merge(output, model, keep, chunks)
            elapsed = time.perf_counter() - start
            remove_shards(output)
    except (OutputError, ResumeError) as e:
        _usage(str(e))
    except OSError as e:
        _usage(f"cannot write results ({e.strerror or e}: {e.filename or output}); the results so far are kept in "
               f"{shards_folder(output)}: make room and run the same command with --resume to continue")
    rows = sum(decisions.values())
    if shown:
        typer.echo(format_table(shown, model.classes))
    if len(shown) < rows:
        say(f"... {rows - len(shown)} more rows in {output}")
    say(summary_of(decisions, labels, elapsed, len(keep), skipped, output, heatmaps, site=model.site))
    typer.echo(DISCLAIMER)
    return 1 if decisions["rejected"] + decisions["error"] or unlisted else 0


def list_sources(sources: list[Path], recursive: bool) -> tuple[list[str], int, list[tuple[str, str]]]:
    """``find_images`` for folders and image files; a file that is not an image (by suffix, or
    an extensionless DICOM) is a list of paths. Returns (files, skipped, unlisted folders)."""
    files: list[str] = []
    skipped = 0
    unlisted: list[tuple[str, str]] = []
    for source in sources:
        if os.path.isfile(source) and not _looks_like_image(source):
            files += read_path_list(source)
            continue
        try:
            found, n, bad = find_images([source], recursive)
        except FileNotFoundError as e:
            _usage(f"no such file or folder: {e}")
        files += found
        skipped += n
        unlisted += bad
    return list(dict.fromkeys(files)), skipped, unlisted


def _looks_like_image(path: Path) -> bool:
    if path.suffix:
        return path.suffix.lower() in IMAGE_SUFFIXES
    try:
        return is_dicom(read_head(path, 132))
    except OSError:
        return False


def read_path_list(path: Path) -> list[str]:
    """The paths a text file lists, one per line (a trailing CR is dropped, blank lines
    skipped), made absolute from the current folder; not checked here (a worker that cannot
    read one gives it an error row)."""
    try:
        data = read_regular(path, MAX_LIST_BYTES)
    except FileTooLarge as e:
        _usage(f"path list {path} is {e.size / 2**30:.1f} GiB; split it (at most {MAX_LIST_BYTES >> 30} GiB)")
    except OSError as e:
        _usage(f"cannot read path list {path} ({e.strerror or e})")
    if b"\0" in data:
        _usage(f"{path} is neither an image (by its suffix: {', '.join(IMAGE_SUFFIXES)}) nor a list of paths "
               "(it holds binary data)")
    lines = (line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n"))
    return [os.path.abspath(os.fsdecode(line)) for line in lines if line.strip()]


def fresh_start(output: Path, quiet: bool) -> list[dict[str, Any]]:
    """Without --resume: the shards an unfinished run left are removed (and said so)."""
    if (earlier_shards(output) or os.path.lexists(partial_path(output))) and not quiet:
        say(f"note: replacing the results an unfinished run left in {shards_folder(output)} "
            "(use --resume to continue it)", err=True)
    remove_shards(output)
    return []


def earlier_rows(output: Path, model: LoadedModel) -> list[dict[str, Any]]:
    """Rows of the results file and of the shards an unfinished run left, one per path (the
    latest), less the files that could not be read (retried); ResumeError if they come from
    another model or site profile."""
    rows = {os.path.abspath(r["path"]): r for r in read_previous(output, model.classes)}
    for shard in earlier_shards(output):
        rows.update((os.path.abspath(r["path"]), r) for r in read_shard(shard, model.classes))
    keep = [r for r in rows.values() if r["status"] != "error"]
    check_same_model(keep, model, output)
    return keep


def make_chunks(files: list[str], batch_size: int) -> list[Chunk]:
    """Consecutive chunks of whole batches (batch boundaries as ``classify`` draws them)."""
    batches = max(CHUNK_BATCHES, math.ceil(len(files) / (batch_size * MAX_CHUNKS)))
    size = batch_size * batches
    return [(chunk_name(files[i:i + size]), files[i:i + size]) for i in range(0, len(files), size)]


def run_chunks(address: str, chunks: list[Chunk], model_args: dict[str, Any], model: LoadedModel, output: Path,
               quiet: bool, batch_size: int, threads: int, max_pixels: int,
               heatmaps: tuple[str, str] | None) -> None:
    """Classify the chunks on the cluster, writing each one's shard as it comes back (the first
    time only), with progress; a chunk Ray gave up on gets error rows."""
    from .scale_ray import ClusterError, classified_chunks, connected, size_pool

    wanted = dict(chunks)
    written: set[str] = set()
    log = shards_folder(output) / RAY_LOG
    log.parent.mkdir(exist_ok=True)
    try:
        with connected(address, log):
            pool = size_pool(threads)
            if not quiet:
                say(f"Ray: {_count(pool.nodes, 'node')}, {_count(pool.cpus, 'CPU')}; up to "
                    f"{_count(pool.max_actors, 'inference actor')} of {_count(pool.threads, 'thread')}; "
                    f"{_count(len(chunks), 'chunk')}", err=True)
            with Progress(sum(len(paths) for _, paths in chunks), hidden=quiet) as progress:
                for name, lines in classified_chunks(chunks, model.record.preprocessing, max_pixels, pool, model_args,
                                                     model.sha256, batch_size, heatmaps):
                    if name in written or name not in wanted:
                        continue
                    rows = [json.loads(line) for line in lines.split("\n") if line]
                    write_shard(output, name, rows)
                    written.add(name)
                    progress.update(len(rows), sum(r["status"] != "ok" for r in rows))
                for name, paths in chunks:
                    if name not in written:  # Ray gave up on it
                        write_shard(output, name, lost_chunk_rows(paths, model))
                        progress.update(len(paths), len(paths))
    except ClusterError as e:
        kept = f"; the results so far are kept in {shards_folder(output)}: run the same command with --resume" \
            if written else ""
        messages = log.exists() and log.stat().st_size > 0
        if not written and not messages:
            remove_shards(output)
        _usage(f"{e}{kept}{f' (what Ray said: {log})' if messages else ''}")
    except KeyboardInterrupt:
        say(f"interrupted: {_count(len(written), 'chunk')} of results kept in {shards_folder(output)}; "
            "run the same command with --resume to continue", err=True)
        raise typer.Exit(130) from None


def lost_chunk_rows(paths: list[str], model: LoadedModel) -> list[dict[str, Any]]:
    """Error rows for the files of a chunk that Ray gave up on."""
    from .scale_ray import RETRIES

    reason = (f"not classified: the Ray worker running this file's chunk of {len(paths)} died {RETRIES + 1} times "
              "(a crash while decoding or classifying one of them, or out of memory); --resume retries it")
    return [make_row(Result(path, None, reason, 0.0), model, None) for path in paths]


def merge(output: Path, model: LoadedModel, keep: list[dict[str, Any]],
          chunks: list[Chunk]) -> tuple[list[dict[str, Any]], Counter[str], Counter[str]]:
    """Publish ``keep`` then the chunks' rows, in order, one row per path, to ``output``.
    Returns (this run's first TABLE_LIMIT rows, its files per decision, its classified files per
    most likely class)."""
    writer = ResultsWriter(output, model.classes, keep)
    seen = {os.path.abspath(r["path"]) for r in keep}
    shown: list[dict[str, Any]] = []
    decisions: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    pending: list[dict[str, Any]] = []
    try:
        for name, _ in chunks:
            for row in read_shard(shard_path(output, name), model.classes):
                key = os.path.abspath(row["path"])
                if key in seen:
                    continue
                seen.add(key)
                pending.append(row)
                decisions[row["decision"]] += 1
                if row["status"] == "ok":
                    labels[row["label"]] += 1
                if len(shown) < TABLE_LIMIT:
                    shown.append(row)
            if len(pending) >= MERGE_ROWS:
                writer.write(pending)
                pending = []
        writer.write(pending)
        writer.publish()
    finally:
        writer.close()
    return shown, decisions, labels


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _usage(message: str) -> NoReturn:
    say(f"error: {message}", err=True)
    raise typer.Exit(2)
