"""``xray-edge export MODEL.keras``: ONNX FP32/FP16/INT8 variants with an accuracy gate, optionally
shipped as the package's default model and written into the model card.

Exit codes: 0 written, 1 a check or gate failed (nothing written), 2 unusable input.
Imports only typer at import time (TensorFlow, onnx and onnxruntime.quantization load on use).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from .run import Exported


def export(
    model: Annotated[Path, typer.Argument(help="Trained Keras model (model.keras with a 'logits' layer).",
                                          show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for the ONNX files.")] = Path("artifacts"),
    variants: Annotated[str, typer.Option(help="Comma-separated: fp32, fp16, int8.")] = "fp32,fp16,int8",
    calibration: Annotated[str, typer.Option(help="INT8 activation ranges: minmax, percentile or entropy.")] = "minmax",
    calib_images: Annotated[int, typer.Option(min=1, help="Training images for INT8 calibration "
                                              "(stratified by class, seeded).")] = 200,
    data: Annotated[Optional[Path], typer.Option(help="Dataset root for the split's paths "
                                                 "(default: $XRAY_EDGE_DATA, else the paths as written).")] = None,
    record: Annotated[Optional[Path], typer.Option(help="Training record (default: record.json next to MODEL).")] = None,
    split: Annotated[Optional[Path], typer.Option(help="Split manifest (default: split.csv next to MODEL).")] = None,
    check_images: Annotated[int, typer.Option(min=1, help="Validation images for the Keras/ONNX check.")] = 32,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95 % CIs.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for image selection and bootstrap.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write variants that fail the gate, marked forced.")] = False,
    ship: Annotated[bool, typer.Option("--ship", help="Copy the INT8 model into the package "
                                       "(xray_edge/models), the default model of `classify`.")] = False,
    model_card: Annotated[Optional[Path], typer.Option(help="Update this MODEL_CARD.md's generated section "
                                                       "from the written models.")] = None,
) -> None:
    """Export a trained model to ONNX (FP32, FP16, static INT8), each variant gated on the
    validation split against FP32 and carrying its record and metrics."""
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
    opts = ExportOptions(model=model, out=out, variants=wanted, calibration=calibration, calib_images=calib_images,
                         data=data, record=record, split=split, check_images=check_images, n_boot=n_boot,
                         seed=seed, force=force)
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
    """Copy the written INT8 variant to :func:`shipped_path`; a forced (gate-failing) model is not
    shipped."""
    if int8.record.forced:
        _fail(1, f"{int8.path}: failed its gate (written with --force); not shipping it")
    target = shipped_path()
    shutil.copyfile(int8.path, target)
    return target


def _fail(code: int, message: str) -> None:
    print(f"xray-edge export: {message}", file=sys.stderr)
    raise typer.Exit(code)
