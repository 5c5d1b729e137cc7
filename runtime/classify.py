"""``xray-edge classify PATH...``: screen chest X-ray files and folders with an xray-edge model.

Prints a table (and a disclaimer) on stdout, progress on stderr (a bar on a terminal, plain
lines otherwise), and optionally writes every result to ``--output`` (.csv, .json or .jsonl),
synced per batch and published atomically, so ``--resume`` can finish a run that was killed;
``--heatmaps DIR`` writes a picture per image, ``--report FILE.html`` a visual report. Each
image's decision comes from the model record's rules (``decision.decide``).
Exit codes: 0 every file got a decision, 1 some could not be read or were rejected by the input
gate, 2 nothing run or results could not be saved (one ``error:`` line on stderr), 130 interrupted.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

from .files import read_head
from .inputs import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, is_dicom
from .terminal import Progress, printable, say

if TYPE_CHECKING:
    from .pipeline import Result
    from .report import Gallery
    from .session import LoadedModel

SHIPPED_MODEL = "xray-edge-vgg19-int8.onnx"
SHIPPED_PIN = "shipped.json"  # {file name: sha256} of the models installed with the package
DISCLAIMER = "xray-edge is a research screening aid, not a diagnostic device: every result needs a clinician."
TABLE_LIMIT = 50  # rows shown on the terminal when the full results go to --output
MAX_BATCH_SIZE = 64  # more only multiplies memory (batch_size x 3 images are in flight)


def classify(
    paths: Annotated[list[Path], typer.Argument(
        metavar="PATH", show_default=False,
        help="Image files and/or folders (a folder gives its image files and extensionless DICOM).")],
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", metavar="", help="Also look in sub-folders (default: only the folder itself).")] = False,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write every result to a .csv, .json or .jsonl file (default: the table on stdout only).")] = None,
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", metavar="FILE",
        help="ONNX model exported by xray-edge (default: the model shipped with this install).")] = None,
    batch_size: Annotated[int, typer.Option(
        min=1, max=MAX_BATCH_SIZE, clamp=True, metavar="N", show_default=True,
        help=f"Images per inference call (larger values are capped at {MAX_BATCH_SIZE}).")] = 8,
    threads: Annotated[int, typer.Option(
        min=0, metavar="N", show_default=True,
        help="onnxruntime threads; 0: one per core (capped at the cores available).")] = 0,
    workers: Annotated[int, typer.Option(
        min=0, metavar="N", show_default=True,
        help="Decoding threads; 0: one per core up to 2, then half the cores, at most 4 (capped at the cores available).")] = 0,
    resume: Annotated[bool, typer.Option(
        "--resume", metavar="",
        help="Skip files already classified in --output; failed ones are retried (default: start afresh).")] = False,
    max_pixels: Annotated[int, typer.Option(
        min=1, metavar="N", show_default=True,
        help="Refuse images with more pixels than this (decompression bombs).")] = DEFAULT_MAX_PIXELS,
    heatmaps: Annotated[Optional[Path], typer.Option(
        "--heatmaps", metavar="DIR",
        help="Write one PNG per classified image into DIR: what the model saw, with the heatmap of the most "
             "likely class and its label and probability (default: none).")] = None,
    report: Annotated[Optional[Path], typer.Option(
        "--report", metavar="FILE.html",
        help="Write a self-contained visual report (summary, pictures, probabilities, decisions, "
             "rejected and failed files) (default: none).")] = None,
    site: Annotated[Optional[Path], typer.Option(
        "--site", metavar="FILE", envvar="XRAY_EDGE_SITE", show_envvar=True,
        help="Apply this site profile (from `xray-edge calibrate`, fitted for this model) (default: none).")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", metavar="", help="No progress on stderr (default: progress shown).")] = False,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS",
        help="Classify on a Ray cluster (extra [scale]; needs --output): 'local' starts one on this machine, "
             "'auto' joins the running one, else HOST:PORT. A PATH may also be a text file listing image paths, "
             "one per line (default: this machine, without Ray).")] = None,
) -> None:
    """Screen chest X-ray images (PNG, JPEG, BMP, TIFF, DICOM) for COVID-19 / viral pneumonia."""
    import cv2

    from .contract import ModelContractError
    from .files import write_atomic
    from .report import Gallery, render
    from .results import OutputError, check_output, locked, output_format
    for stream in (sys.stdout, sys.stderr):  # never crash on a character the terminal cannot show
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # failures become result rows
    if output is not None:
        try:
            output_format(output)
            check_output(output)
        except (ValueError, OutputError) as e:
            _usage(str(e))
    elif resume:
        _usage("--resume needs --output (the results file to continue)")
    cores = available_cores()
    model_args = {"model": model, "site": site or None}  # how the model is opened, here and by every --ray actor
    try:
        loaded = open_model(**model_args, threads=min(threads, cores))
    except ModelContractError as e:
        _usage(str(e))
    if (heatmaps or report) and (loaded.record.outputs.cam is None or loaded.record.heatmap is None):
        _usage(f"{loaded.path} has no heatmap output (cam); --heatmaps and --report need a model exported with one")
    if report is not None and (report.suffix.lower() not in (".html", ".htm") or report.is_dir()):
        _usage(f"--report must name an .html file, got '{report}'")
    if ray is not None:
        from .extras import require

        require("scale", "ray", "pyarrow")
        from .scale import classify_on_ray

        raise typer.Exit(classify_on_ray(ray, paths, recursive, model_args, loaded, output, resume, quiet,
                                         batch_size, threads, max_pixels, heatmaps, report))
    try:
        files, skipped, unlisted = find_images(paths, recursive)
    except FileNotFoundError as e:
        _usage(f"no such file or folder: {e}")
    for folder, reason in unlisted:
        say(f"warning: cannot list folder {folder} ({reason})", err=True)
    if not files:
        where = ", ".join(str(p) for p in paths)
        _usage(f"no images found in {where} (looked for {', '.join(IMAGE_SUFFIXES)}"
               f"{'' if recursive else '; add --recursive for sub-folders'})")
    gallery = Gallery(loaded.record) if report is not None else None
    try:
        with locked(output) if output is not None else nullcontext():
            rows, kept, elapsed = _run(loaded, files, output, resume, quiet, batch_size,
                                       min(workers, cores) or None, max_pixels, heatmaps, gallery)
            if gallery is not None:
                html = render(kept + rows, gallery.pictures(), loaded.record, described(loaded), DISCLAIMER)
                write_atomic(report, html.encode("utf-8", "surrogateescape"))
    except OutputError as e:
        _usage(str(e))
    except OSError as e:
        _usage(f"cannot write results ({e.strerror or e}: {e.filename or output})")

    not_classified = sum(r["status"] != "ok" for r in rows)
    shown = rows if output is None else rows[:TABLE_LIMIT]
    if shown:
        typer.echo(format_table(shown, loaded.classes))
    if len(shown) < len(rows):
        say(f"... {len(rows) - len(shown)} more rows in {output}")
    say(summary(rows, elapsed, kept, skipped, output, heatmaps, report, loaded.site))
    typer.echo(DISCLAIMER)
    raise typer.Exit(1 if not_classified or unlisted else 0)


def _run(model: LoadedModel, files: list[str], output: Path | None, resume: bool, quiet: bool, batch_size: int,
         workers: int | None, max_pixels: int, heatmaps: Path | None,
         gallery: Gallery | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """Classify ``files`` (less those an earlier run finished, with --resume), writing rows to
    ``output`` and pictures to ``heatmaps`` / ``gallery`` as they come; returns (rows of this run,
    rows kept from the earlier one, seconds)."""
    from .pipeline import classify_paths
    from .results import ResultsWriter, partial_path

    keep: list[dict[str, Any]] = []
    if resume:
        keep, files = _resume(output, model, files)
    elif output is not None and partial_path(output).exists() and not quiet:
        say(f"note: replacing {partial_path(output)} left by an unfinished run (use --resume to continue one)", err=True)
    writer = ResultsWriter(output, model.classes, keep) if output is not None else None
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        with Progress(len(files), hidden=quiet) as progress:
            for results in classify_paths(model, files, batch_size, workers, max_pixels,
                                          cam=heatmaps is not None or gallery is not None):
                batch = [row_for(r, model, heatmaps, gallery) for r in results]
                if writer is not None:
                    writer.write(batch)
                rows.extend(batch)
                progress.update(len(batch), sum(r["status"] != "ok" for r in batch))
        if writer is not None:
            writer.publish()
    except OSError as e:
        if writer is None:
            raise
        _usage(f"cannot write {output} ({e.strerror or e}); the {len(keep) + len(rows)} results so far are kept "
               f"in {writer.partial}: make room and run the same command with --resume to continue")
    except KeyboardInterrupt:
        if writer is None:
            say(f"interrupted after {len(rows)} files", err=True)
        else:
            say(f"interrupted: {len(keep) + len(rows)} results kept in {writer.partial}; "
                "run the same command with --resume to continue", err=True)
        raise typer.Exit(130) from None
    finally:
        if writer is not None:
            writer.close()
    return rows, keep, time.perf_counter() - start


def row_for(result: Result, model: LoadedModel, heatmaps: Path | None = None,
            gallery: Gallery | None = None) -> dict[str, Any]:
    """One file's results row, by the record's rules (the one place a row is made: ``classify``,
    and every other front end that classifies files); its heatmap picture written to ``heatmaps``
    and kept for the report when asked for (classified images only)."""
    import numpy as np

    from .decision import decide
    from .heatmap import caption, overlay, png_bytes, save
    from .results import make_row

    decision = decide(model.record, result.probs, result.age, result.ood) if result.ok else None
    if decision is None or decision.decision == "rejected" or result.cam is None:
        return make_row(result, model, decision)
    k = model.classes.index(decision.label)
    picture = png_bytes(overlay(result.image, result.cam[..., k],
                                caption(decision.label, float(result.probs[k]), decision.decision), model.record.heatmap))
    saved = str(save(heatmaps, result.path, picture)) if heatmaps is not None else ""
    row = make_row(result, model, decision, saved)
    if gallery is not None:
        gallery.add(row, png_bytes(np.round(result.image[..., 0] * 255).astype(np.uint8)), picture)
    return row


def _resume(output: Path, model: LoadedModel, files: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows of the earlier run into ``output`` that got a decision, files still to do); files that
    could not be read are retried."""
    from .results import ResumeError, read_previous

    try:
        keep = [r for r in read_previous(output, model.classes) if r["status"] != "error"]
        check_same_model(keep, model, output)
    except ResumeError as e:
        _usage(str(e))
    done = {os.path.abspath(r["path"]) for r in keep}
    return keep, [f for f in files if f not in done]


def check_same_model(rows: list[dict[str, Any]], model: LoadedModel, output: Path) -> None:
    """ResumeError if earlier ``rows`` of ``output`` come from another model or site profile."""
    from .results import ResumeError

    others = {r["model"] for r in rows} - {model.label}
    if others:
        raise ResumeError(f"{output} holds results of another model ({', '.join(sorted(others))}), "
                          f"not {model.label}; choose another --output")
    site = model.site.label if model.site is not None else ""
    other_sites = {r["site"] for r in rows} - {site}
    if other_sites:
        raise ResumeError(f"{output} holds results with another site profile "
                          f"({', '.join(sorted(s or 'none' for s in other_sites))}), not {site or 'none'}; "
                          "choose another --output")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a cgroup)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def open_model(model: Path | None = None, threads: int = 0, site: Path | None = None) -> LoadedModel:
    """The model to classify with: ``model``, else the one shipped with this install (its sha256
    pinned); every check of ``session.load_model``; with ``site``, that site profile applied
    (``site.apply``). ModelContractError (one line) if there is none or it cannot be used."""
    from .contract import ModelContractError
    from .session import load_model

    shipped = None if model else shipped_model()
    if model is None and shipped is None:
        raise ModelContractError("no --model given and no model is shipped with this install; create one with "
                                 "`xray-edge train` then `xray-edge export`, and pass it with --model PATH")
    model_path, pinned = (model, None) if model else shipped
    loaded = load_model(model_path, threads, expected_sha256=pinned)
    if site is None:
        return loaded
    from .site import apply, read_profile

    return apply(loaded, read_profile(site), site)


def shipped_model() -> tuple[Path, str | None] | None:
    """The model installed with the package (xray_edge.models) and its pinned sha256, if there is one."""
    import json

    folder = resources.files("xray_edge.models")
    resource = folder / SHIPPED_MODEL
    if not resource.is_file():
        return None
    pin = folder / SHIPPED_PIN
    pins = json.loads(pin.read_text()) if pin.is_file() else {}
    return Path(str(resource)), pins.get(SHIPPED_MODEL)


def find_images(inputs: list[Path], recursive: bool = False) -> tuple[list[str], int, list[tuple[str, str]]]:
    """Files named on the command line are taken as they are; folders give their image files
    (by suffix, or extensionless DICOM), sorted, hidden ones skipped. Paths are made absolute
    (not resolved: a link keeps its own name), so results compare across working folders.
    Returns (files, number of other files skipped, [(folder, reason)] for folders that could
    not be listed); raises FileNotFoundError for a path that does not exist."""
    files: list[str] = []
    skipped = 0
    unlisted: list[tuple[str, str]] = []
    for item in map(os.path.abspath, inputs):
        if not os.path.isdir(item):
            if not os.path.lexists(item):
                raise FileNotFoundError(item)
            files.append(item)
            continue
        walk = os.walk(item, onerror=lambda e: unlisted.append((e.filename, e.strerror or str(e))))
        for folder, subfolders, names in walk if recursive else [next(walk, (str(item), [], []))]:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                path = os.path.join(folder, name)
                if _looks_like_image(path):
                    files.append(path)
                else:
                    skipped += 1
    return list(dict.fromkeys(files)), skipped, unlisted  # the same file named twice is classified once


def _looks_like_image(path: str) -> bool:
    """By suffix; an extensionless file by its DICOM signature. Only regular files are opened:
    anything else (a FIFO, socket or device) is kept, to get its error row."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix:
        return suffix in IMAGE_SUFFIXES
    try:
        return is_dicom(read_head(path, 132))
    except OSError:
        return True  # let it fail with its reason in the results


def format_table(rows: list[dict[str, Any]], classes: list[str]) -> str:
    """A fixed-width table: file, decision, most likely class, one probability column per class,
    ms, flagged findings (';'-separated, as in the CSV) and a '!' where the row has a warning.
    Rejected and failed files show their reason. File names and reasons are escaped with
    :func:`printable`."""
    paths = [printable(r["path"]) for r in rows]
    path_w = min(max(len("file"), *map(len, paths)), 48)
    label_w = max(len("prediction"), *(len(c) for c in classes))
    prob_w = [max(len(c), 5) for c in classes]
    head = [f"{'file':<{path_w}}", f"{'decision':<9}", f"{'prediction':<{label_w}}",
            *(f"{c:>{w}}" for c, w in zip(classes, prob_w)), f"{'ms':>7}", "flagged"]
    lines = ["  ".join(head)]
    for r, path in zip(rows, paths):
        path = path if len(path) <= path_w else "..." + path[-(path_w - 3):]
        if r["status"] != "ok":
            lines.append(f"{path:<{path_w}}  {r['decision'].upper():<9}  {printable(r['reason'])}")
            continue
        cells = [f"{path:<{path_w}}", f"{r['decision']:<9}", f"{printable(r['label']):<{label_w}}",
                 *(f"{r[f'p_{c}']:>{w}.3f}" for c, w in zip(classes, prob_w)), f"{r['ms']:>7.1f}",
                 (printable(";".join(r["flagged"])) or "-") + (" !" if r["warning"] else "")]
        lines.append("  ".join(cells))
    if any(r.get("warning") for r in rows):
        lines.append("! warning: " + "; ".join(sorted({printable(r["warning"]) for r in rows if r.get("warning")})))
    return "\n".join(lines)


def described(model: LoadedModel) -> str:
    """The model, and the site profile applied if any (report header)."""
    return model.label + (f"; site profile {model.site.label}" if model.site is not None else "")


def summary(rows: list[dict[str, Any]], seconds: float, kept: list[dict[str, Any]], skipped: int,
            output: Path | None, heatmaps: Path | None = None, report: Path | None = None, site: Any = None) -> str:
    return summary_of(Counter(r["decision"] for r in rows), Counter(r["label"] for r in rows if r["status"] == "ok"),
                      seconds, len(kept), skipped, output, heatmaps, report, site)


def summary_of(counts: Counter[str], labels: Counter[str], seconds: float, kept: int, skipped: int,
               output: Path | None, heatmaps: Path | None = None, report: Path | None = None,
               site: Any = None) -> str:
    """``summary`` from counts: files per decision, classified files per most likely class."""
    files = sum(counts.values())
    parts = [f"{counts['positive'] + counts['negative'] + counts['uncertain']} classified "
             f"({', '.join(f'{counts[d]} {d}' for d in ('positive', 'uncertain', 'negative'))}), "
             f"{counts['rejected']} rejected, {counts['error']} failed in {seconds:.1f} s"
             + (f" ({files / seconds:.1f} images/s)" if files and seconds > 0 else "")]
    if labels:
        parts.append("most likely " + ", ".join(f"{label} {n}" for label, n in sorted(labels.items())))
    if kept:
        parts.append(f"{kept} already done in {output} (resumed)")
    if skipped:
        parts.append(f"{skipped} non-image files skipped")
    parts.append(f"site profile: {site.label}" if site is not None else "no site profile")
    parts += [f"{what}: {path}" for what, path in (("results", output), ("heatmaps", heatmaps), ("report", report))
              if path is not None]
    return "; ".join(parts)


def _usage(message: str) -> NoReturn:
    say(f"error: {message}", err=True)
    raise typer.Exit(2)
