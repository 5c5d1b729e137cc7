"""``xray-edge calibrate NORMALS_DIR [--findings DIR] --out site.json``: fit a site profile from a
clinic's own confirmed-normal films (``xray_edge.site``), through the same pipeline as
``classify``, and say what it changes: how many of those normals were called a finding before and
after (in-sample, so an optimistic figure), and for confirmed findings given, the sensitivity kept.

Exit codes: 0 profile written; 2 nothing written (one ``error:`` line on stderr).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import numpy as np
import typer

from . import site
from .session import predict
from .terminal import Progress, say

MAX_FILMS = 1000  # per folder: more adds nothing to a mean or a quantile, and every input is held in memory


def calibrate(
    normals: Annotated[Path, typer.Argument(
        metavar="NORMALS_DIR", show_default=False,
        help="Folder of this site's films that its own reader confirmed as normal (no radiographic finding).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="FILE", show_default=False, help="Where to write the site profile (.json).")],
    findings: Annotated[Optional[Path], typer.Option(
        "--findings", metavar="DIR",
        help="Folder of this site's films with confirmed findings, one sub-folder per class (COVID, "
             "VIRAL_PNEUMONIA): only to report the sensitivity kept (default: none).")] = None,
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", metavar="FILE",
        help="ONNX model exported by xray-edge (default: the model shipped with this install).")] = None,
    method: Annotated[str, typer.Option(
        help="How the site is corrected (docs/site-calibration.md): align, threshold or align+threshold.")
    ] = site.DEFAULT_METHOD,
    quantile: Annotated[float, typer.Option(
        min=0.5, max=0.995, help="Each finding's threshold is raised to this quantile of the normals' probability of it.")
    ] = site.DEFAULT_QUANTILE,
    site_name: Annotated[str, typer.Option(
        "--name", metavar="TEXT", help="A name for the site, written into every results row.")] = "site",
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", metavar="", help="Also look in sub-folders (default: only the folder itself).")] = False,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing --out file.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", metavar="", help="No progress on stderr (default: progress shown).")] = False,
) -> None:
    """Fit a site profile from this site's confirmed-normal films (classify --site applies it)."""
    from .classify import DISCLAIMER, find_images, open_model
    from .contract import ModelContractError
    from .files import write_atomic

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if method not in site.METHODS:
        _usage(f"--method must be one of {', '.join(site.METHODS)}, got {method!r}")
    if out.suffix.lower() != ".json" or out.is_dir():
        _usage(f"--out must name a .json file, got '{out}'")
    if out.exists() and not force:
        _usage(f"{out} already exists; add --force to replace it")
    try:
        loaded = open_model(model)
        normal_files = _files(find_images, normals, recursive)
        finding_files = {c: _files(find_images, findings / c, recursive) for c in loaded.record.findings()
                         if findings is not None and (findings / c).is_dir()}
    except ModelContractError as e:
        _usage(str(e))
    if findings is not None and not finding_files:
        _usage(f"--findings {findings} has no sub-folder named after a finding ({', '.join(loaded.record.findings())})")
    if method.startswith("align") and site.reference(loaded.record) is None:
        _usage(f"{loaded.path} has no site inputs: it cannot align features; use --method threshold")

    gate = (loaded.record.gate.threshold, loaded.record.gate.quantile) if loaded.record.gate else None
    x, paths = _inputs(loaded, normal_files, quiet)
    before = predict(loaded, x, pooled=True) if len(x) else None
    use = site.usable(before.ood if before is not None and before.ood is not None else np.zeros(len(x)), gate)
    for path in np.array(paths, dtype=object)[~use]:
        say(f"not used: {path}: the input gate refuses it even for a site (not a usable chest X-ray for this model)",
            err=True)
    if use.sum() < site.MIN_NORMALS:
        _usage(f"{int(use.sum())} usable normal films in {normals}; calibration needs at least {site.MIN_NORMALS} "
               "(docs/site-calibration.md says why)")
    x = x[use]
    normals_scores = site.Scores(before.probs[use], None if before.ood is None else before.ood[use],
                                 None if before.pooled is None else before.pooled[use])

    def rescore(scale: np.ndarray, shift: np.ndarray) -> site.Scores:
        after = predict(loaded, x, alignment=(scale, shift))
        return site.Scores(after.probs, after.ood, normals_scores.pooled)

    try:
        fitted = site.fit(method, loaded.classes, loaded.record.thresholds, gate, normals_scores, rescore,
                          site.reference(loaded.record), quantile=quantile)
    except site.SiteProfileError as e:
        _usage(str(e))
    profile = site.SiteProfile(
        site=site_name, model_name=loaded.record.model_name, model_version=loaded.record.model_version,
        model_variant=loaded.record.variant, model_sha256=loaded.sha256, method=method,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        counts={"normals_given": len(normal_files), "normals_used": int(use.sum()),
                "normals_not_used": len(normal_files) - int(use.sum()),
                "findings_given": {c: len(f) for c, f in finding_files.items()}},
        fitted=fitted, settings={"quantile": quantile, "align_shrink": site.ALIGN_SHRINK, "gate_cap": site.GATE_CAP})
    calibrated = site.apply(loaded, profile, out)
    profile.effect = {"normals": _called(loaded, x), "normals_after": _called(calibrated, x), "findings": {}}
    for c, files in finding_files.items():
        fx, _ = _inputs(loaded, files, quiet)
        profile.effect["findings"][c] = {"n": len(fx), "sensitivity_before": _sensitivity(loaded, fx, c),
                                         "sensitivity_after": _sensitivity(calibrated, fx, c)}
    try:
        write_atomic(out, profile.sealed().to_json().encode())
    except OSError as e:
        _usage(f"cannot write {out} ({e.strerror or e})")
    say(report(profile))
    typer.echo(DISCLAIMER)


def _files(find_images: Any, folder: Path, recursive: bool) -> list[str]:
    from .contract import ModelContractError

    try:
        files, _, _ = find_images([folder], recursive)
    except FileNotFoundError:
        raise ModelContractError(f"no such folder: {folder}") from None
    return files[:MAX_FILMS]


def _inputs(model: Any, files: list[str], quiet: bool) -> tuple[np.ndarray, list[str]]:
    """The model inputs of the files that decode (through the classify pipeline's preparation),
    with their paths; the others are listed as not used."""
    from .pipeline import prepared_batches

    size = model.record.preprocessing.size
    x, paths = [], []
    with Progress(len(files), hidden=quiet) as progress:
        for batch in prepared_batches(files, model.record.preprocessing):
            for p in batch:
                if p.image is None:
                    say(f"not used: {p.path}: {p.error}", err=True)
                else:
                    x.append(p.image)
                    paths.append(p.path)
            progress.update(len(batch), sum(p.image is None for p in batch))
    return (np.stack(x) if x else np.zeros((0, size, size, 1), np.float32)), paths


def _decisions(model: Any, x: np.ndarray, alignment: Any = None) -> list[Any]:
    from .decision import decide

    out = predict(model, x, alignment=alignment)
    return [decide(model.record, p, None if out.age is None else a, None if out.ood is None else d)
            for p, a, d in zip(out.probs, out.age if out.age is not None else [None] * len(x),
                               out.ood if out.ood is not None else [None] * len(x))]


def _called(model: Any, x: np.ndarray, alignment: Any = None) -> dict[str, int]:
    made = _decisions(model, x, alignment)
    return {"n": len(made), "called_a_finding": sum(d.decision == "positive" for d in made),
            **{f"called_{c}": sum(c in d.flagged for d in made) for c in model.record.findings()}}


def _sensitivity(model: Any, x: np.ndarray, finding: str, alignment: Any = None) -> float | None:
    made = _decisions(model, x, alignment) if len(x) else []
    return sum(finding in d.flagged for d in made) / len(made) if made else None


def report(profile: Any) -> str:
    """What the profile changes, for the terminal."""
    e, c = profile.effect, profile.counts
    before, after = e["normals"], e["normals_after"]
    lines = [f"site profile {profile.label} written for {profile.model_name} {profile.model_version} "
             f"{profile.model_variant}: {c['normals_used']} normal films used, {c['normals_not_used']} not used",
             f"normals called a finding: {before['called_a_finding']}/{before['n']} before, "
             f"{after['called_a_finding']}/{after['n']} after (on the calibration films themselves: optimistic)"]
    for name, f in e["findings"].items():
        fmt = "{:.1%}".format
        lines.append(f"{name} sensitivity on {f['n']} confirmed films: {fmt(f['sensitivity_before'] or 0)} before, "
                     f"{fmt(f['sensitivity_after'] or 0)} after")
    return "\n".join(lines)


def _usage(message: str) -> NoReturn:
    say(f"error: {message}", err=True)
    raise typer.Exit(2)
