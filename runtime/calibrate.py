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

from .terminal import Progress, say


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
        help="How the site is corrected (docs/site-calibration.md): threshold.")] = "threshold",
    quantile: Annotated[float, typer.Option(
        min=0.5, max=0.995, help="Each finding's threshold is raised to this quantile of the normals' probability of it.")
    ] = 0.9,
    site_name: Annotated[str, typer.Option(
        "--name", metavar="TEXT", help="A name for the site, written into every results row.")] = "site",
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", metavar="", help="Also look in sub-folders (default: only the folder itself).")] = False,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing --out file.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", metavar="", help="No progress on stderr (default: progress shown).")] = False,
) -> None:
    """Fit a site profile from this site's confirmed-normal films (classify --site applies it)."""
    from . import site
    from .classify import DISCLAIMER, find_images, open_model
    from .contract import ModelContractError
    from .files import write_atomic

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if method not in site.RUNTIME_METHODS:
        _usage(f"--method must be one of {', '.join(site.RUNTIME_METHODS)}, got {method!r}")
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

    scored = _score(loaded, normal_files, quiet)
    gate = (loaded.record.gate.threshold, loaded.record.gate.quantile) if loaded.record.gate else None
    ok = [r for r in scored if r.ok]
    use = site.usable(np.array([r.ood if r.ood is not None else 0.0 for r in ok]), gate)
    kept = [r for r, u in zip(ok, use) if u]
    for r in scored:
        if not r.ok:
            say(f"not used: {r.path}: {r.error}", err=True)
    for r in (r for r, u in zip(ok, use) if not u):
        say(f"not used: {r.path}: the input gate refuses it even for a site (not a usable chest X-ray for this model)",
            err=True)
    if len(kept) < site.MIN_NORMALS:
        _usage(f"{len(kept)} usable normal films in {normals}; calibration needs at least {site.MIN_NORMALS} "
               "(docs/site-calibration.md says why)")
    fitted = site.fit(method, loaded.classes, loaded.record.thresholds, gate,
                      site.Scores(np.stack([r.probs for r in kept]),
                                  np.array([r.ood for r in kept]) if gate else None), quantile=quantile)
    calibrated = site.apply_fit(loaded, fitted)
    effect = {"normals": _called(loaded, kept), "normals_after": _called(calibrated, kept), "findings": {}}
    for c, files in finding_files.items():
        results = [r for r in _score(loaded, files, quiet) if r.ok]
        effect["findings"][c] = {"n": len(results), "sensitivity_before": _sensitivity(loaded, results, c),
                                 "sensitivity_after": _sensitivity(calibrated, results, c)}
    profile = site.SiteProfile(
        site=site_name, model_name=loaded.record.model_name, model_version=loaded.record.model_version,
        model_variant=loaded.record.variant, model_sha256=loaded.sha256, method=method,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        counts={"normals_given": len(normal_files), "normals_used": len(kept),
                "normals_not_used": len(normal_files) - len(kept),
                "findings_given": {c: len(f) for c, f in finding_files.items()}},
        fitted=fitted, settings={"quantile": quantile, "gate_cap": site.GATE_CAP},
        effect=effect).sealed()
    try:
        write_atomic(out, profile.to_json().encode())
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
    return files


def _score(model: Any, files: list[str], quiet: bool) -> list[Any]:
    """Every file's result through the classify pipeline."""
    from .pipeline import classify_paths

    out = []
    with Progress(len(files), hidden=quiet) as progress:
        for batch in classify_paths(model, files):
            out.extend(batch)
            progress.update(len(batch), sum(not r.ok for r in batch))
    return out


def _decisions(model: Any, results: list[Any]) -> list[Any]:
    from .decision import decide

    return [decide(model.record, r.probs, r.age, r.ood) for r in results]


def _called(model: Any, results: list[Any]) -> dict[str, int]:
    made = _decisions(model, results)
    return {"n": len(made), "called_a_finding": sum(d.decision == "positive" for d in made),
            **{f"called_{c}": sum(c in d.flagged for d in made) for c in model.record.findings()}}


def _sensitivity(model: Any, results: list[Any], finding: str) -> float | None:
    made = _decisions(model, results)
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
