"""``xray-edge export MODEL.keras``: ONNX FP32/FP16/INT8 variants with an accuracy gate, optionally
shipped as the package's default model and written into the model card.

Exit codes: 0 written, 1 a check or gate failed (nothing written), 2 unusable input.
Imports only typer at import time (TensorFlow, onnx and onnxruntime.quantization load on use).
Nothing already there is overwritten (ONNX files in --out, the shipped model, the model card's
generated section) without --force.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import CALIB_IMAGES, MAX_ACCURACY_DROP_POINTS, MIN_AGREEMENT

if TYPE_CHECKING:
    from .run import Exported


def export(
    model: Annotated[Path, typer.Argument(help="Trained Keras model (model.keras with a 'logits' layer).",
                                          show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for the ONNX files. [default: a new folder runs/export-<date>-<time>]", show_default=False)] = None,
    variants: Annotated[str, typer.Option(help="Comma-separated: fp32, fp16, int8.")] = "fp32,fp16,int8",
    calibration: Annotated[str, typer.Option(help="INT8 activation ranges: minmax, percentile or entropy.")] = "minmax",
    calib_images: Annotated[int, typer.Option(min=1, help="Training images for INT8 calibration "
                                              "(stratified by class, seeded).")] = CALIB_IMAGES,
    data: Annotated[Optional[Path], typer.Option(help="Data folder the split's paths are relative to "
                                                 "(e.g. ../shared/data). [default: $XRAY_EDGE_DATA]",
                                                 show_default=False)] = None,
    record: Annotated[Optional[Path], typer.Option(help="Training record. [default: record.json next to MODEL]",
                                                   show_default=False)] = None,
    split: Annotated[Optional[Path], typer.Option(help="Split manifest. [default: split.csv next to MODEL]",
                                                  show_default=False)] = None,
    check_images: Annotated[int, typer.Option(min=1, help="Validation images for the Keras/ONNX check.")] = 32,
    gate_images: Annotated[int, typer.Option(min=0, help="Validation and test images (each, stratified, seeded) "
                                             "that the gates and metrics use; 0: all of them.")] = 0,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95 % CIs.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for image selection and bootstrap.")] = 0,
    ignore_gate: Annotated[bool, typer.Option("--ignore-gate", help="Write variants that fail the gate, marked forced.")] = False,
    min_agreement: Annotated[float, typer.Option(min=0.0, max=1.0, help="Gate: least argmax agreement of a "
                                                 "variant with FP32, on each of val and test.")] = MIN_AGREEMENT,
    max_drop: Annotated[float, typer.Option(min=0.0, help="Gate: largest accuracy drop against FP32, "
                                            "percentage points.")] = MAX_ACCURACY_DROP_POINTS,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing ONNX files, the shipped model and "
                                        "the model card's generated section.")] = False,
    ship: Annotated[bool, typer.Option("--ship", help="Copy the INT8 model into the package "
                                       "(xray_edge/models), the default model of `classify`.")] = False,
    model_card: Annotated[Optional[Path], typer.Option(help="Update this MODEL_CARD.md's generated section "
                                                       "from the written models.")] = None,
) -> None:
    """Export a trained model to ONNX (FP32, FP16, static INT8), each variant gated on the
    validation and test splits against FP32 and carrying its record and metrics
    (needs the train extra: pip install "xray-edge[train]")."""
    from xray_edge.extras import require

    require("train", "tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter_common", "sklearn")
    from xray_edge.contract import ModelContractError

    from .data import ExportDataError
    from .quantize import CALIBRATION_METHODS, int8_unsupported
    from .run import ExportOptions, ExportRefused, export_variants

    wanted = [v.strip() for v in variants.split(",") if v.strip()]
    if calibration not in CALIBRATION_METHODS:
        _fail(2, f"--calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {calibration!r}")
    if "int8" in wanted and (reason := int8_unsupported()):
        _fail(2, reason)
    if ship and "int8" not in wanted:
        _fail(2, "--ship needs the int8 variant in --variants")
    if ship and shipped_path().exists() and not force:
        _fail(2, f"--ship would replace the shipped model {shipped_path()}; add --force to do so")
    if model_card is not None and not force:
        _fail(2, f"--model-card would rewrite the generated section of {model_card}; add --force to do so")
    out = out or Path("runs") / f"export-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = ExportOptions(model=model, out=out, variants=wanted, calibration=calibration, calib_images=calib_images,
                         data=data, record=record, split=split, check_images=check_images,
                         gate_images=gate_images, n_boot=n_boot,
                         seed=seed, ignore_gate=ignore_gate, min_agreement=min_agreement,
                         max_drop=max_drop, force=force)
    try:
        written = export_variants(opts)
    except ExportRefused as e:
        _fail(1, f"refused: {e}")
    except (ExportDataError, ModelContractError, OSError) as e:
        _fail(2, str(e))
    for w in written:
        m = w.record.metrics
        test = m.get("test", {}).get("accuracy", {}).get("value")
        flag = " FORCED (failed its gate)" if w.record.forced else ""
        print(f"{w.variant}: {w.path} ({w.path.stat().st_size / 2**20:.1f} MiB)"
              + (f", test accuracy {test:.4f}" if test is not None else "") + flag)
    paths = {w.variant: w.path for w in written}
    shipped = None
    if ship:
        shipped = paths["int8"] = ship_model(next(w for w in written if w.variant == "int8"))
        print(f"shipped: {shipped}")
    if model_card is not None:
        from .model_card import update_card

        update_card(model_card, list(paths.values()), shipped)
        print(f"model card: {model_card}")


def shipped_path() -> Path:
    """Where ``classify`` looks for its default model (the package's models folder)."""
    from importlib import resources

    from xray_edge.classify import SHIPPED_MODEL

    return Path(str(resources.files("xray_edge.models"))) / SHIPPED_MODEL


def ship_model(int8: "Exported") -> Path:
    """Copy the written INT8 variant to :func:`shipped_path` and pin its sha256 in the package's
    ``shipped.json`` (checked whenever classify loads it); a forced (gate-failing) model is not
    shipped."""
    from xray_edge.classify import SHIPPED_PIN
    from xray_edge.contract import sha256_file

    if int8.record.forced:
        _fail(1, f"{int8.path}: failed its gate (written with --ignore-gate); not shipping it")
    target = shipped_path()
    shutil.copyfile(int8.path, target)
    pin = target.with_name(SHIPPED_PIN)
    pin.write_text(json.dumps({target.name: sha256_file(target)}, indent=2) + "\n")
    return target


def _fail(code: int, message: str) -> None:
    print(f"xray-edge export: {message}", file=sys.stderr)
    raise typer.Exit(code)
