"""The export pipeline: Keras -> checked FP32 ONNX -> FP16 / INT8 variants, each gated against
FP32 on the validation and test splits, measured through the runtime, its input-gate threshold
calibrated on its own validation distances, and written with its record only if every variant
passed (or with ``ignore_gate``, marked ``forced``)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.contract import VARIANTS, ModelContractError, ModelRecord, attach_record

from . import CALIB_IMAGES, MAX_ACCURACY_DROP_POINTS, MIN_AGREEMENT
from .data import ExportDataError, Images, SplitManifest, data_root, generated_images, load_images, stratified_sample
from .gate import describe, gate, reports, runtime_outputs


class ExportRefused(RuntimeError):
    """A variant failed its check or gate; nothing was written (the message gives the figures)."""


@dataclass
class ExportOptions:
    model: Path
    out: Path
    variants: list[str]
    calibration: str = "minmax"
    calib_images: int = CALIB_IMAGES
    data: Path | None = None
    record: Path | None = None  # default: record.json next to the model
    split: Path | None = None  # default: split.csv next to the model
    check_images: int = 32
    gate_images: int = 0  # per split, stratified and seeded; 0: every validation and test image
    n_boot: int = 200
    seed: int = 0
    ignore_gate: bool = False
    min_agreement: float = MIN_AGREEMENT
    max_drop: float = MAX_ACCURACY_DROP_POINTS
    force: bool = False  # overwrite files already in ``out``


@dataclass
class Exported:
    """One variant: its file and its final record."""

    variant: str
    path: Path
    record: ModelRecord
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inputs:
    """Everything the export reads besides the Keras model."""

    record: ModelRecord
    sets: dict[str, Images]  # "val", "test" (empty without a split manifest)
    calibration: Images | None
    split_counts: dict[str, dict[str, int]]
    check_x: np.ndarray
    check_images: str  # "val" or "generated"


def read_record(path: Path) -> ModelRecord:
    if not path.is_file():
        raise ExportDataError(f"{path}: training record not found (give --record)")
    return ModelRecord.from_json(path.read_text(), source=str(path))


def target_path(opts: ExportOptions, record: ModelRecord, variant: str) -> Path:
    return opts.out / f"{record.model_name}-{variant}.onnx"


def gate_items(items: Sequence[tuple[str, int]], opts: ExportOptions) -> list[tuple[str, int]]:
    """The images of one split that the gate and the metrics use: all, or a stratified sample."""
    return stratified_sample(items, opts.gate_images, opts.seed) if opts.gate_images else list(items)


def read_inputs(opts: ExportOptions, size: int) -> Inputs:
    """The training record (with the source model's sha256), the split's images and the images the
    FP32 conversion is checked on."""
    from xray_edge.contract import sha256_file

    folder = opts.model.parent
    record = read_record(opts.record or folder / "record.json")
    if size != record.preprocessing.size:
        raise ModelContractError(f"{opts.model}: input size {size} differs from the record's {record.preprocessing.size}")
    record = replace(record, source_model_sha256=sha256_file(opts.model), forced=False,
                     metrics={k: v for k, v in record.metrics.items() if k == "cross_origin"})
    split_csv = opts.split or folder / "split.csv"
    if not split_csv.is_file():
        if opts.variants != ["fp32"]:
            raise ExportDataError(f"{split_csv}: no split manifest; fp16/int8 need its training images "
                                  "(calibration) and validation/test images (gate); give --split and --data")
        print(f"no split manifest ({split_csv}): checking the conversion on {opts.check_images} generated "
              "images only; no gate, no validation or test metrics", file=sys.stderr)
        return Inputs(record, {}, None, {}, generated_images(opts.check_images, size, opts.seed), "generated")
    manifest_sha = sha256_file(split_csv)
    if record.data_manifest_sha256 and record.data_manifest_sha256 != manifest_sha:
        raise ExportDataError(f"{split_csv}: sha256 differs from the record's data_manifest_sha256 "
                              "(not the split this model was trained on)")
    record.data_manifest_sha256 = manifest_sha
    manifest = SplitManifest(split_csv, record.classes, data_root(opts.data))
    sets = {s: load_images(manifest, gate_items(manifest.items(s), opts), record.preprocessing, s) for s in ("val", "test")}
    calibration = None
    if "int8" in opts.variants:
        picked = stratified_sample(manifest.items("train"), opts.calib_images, opts.seed)
        calibration = load_images(manifest, picked, record.preprocessing, "calibration (train)")
    pick = np.sort(np.random.default_rng(opts.seed).permutation(len(sets["val"].x))[:opts.check_images])
    return Inputs(record, sets, calibration, manifest.counts, sets["val"].x[pick], "val")


def _save(proto: Any, record: ModelRecord, path: Path) -> ModelRecord:
    import onnx

    sealed = attach_record(proto, record)
    onnx.save(proto, str(path))
    return sealed


def measure(variant: str, proto: Any, path: Path, inputs: Inputs, opts: ExportOptions,
            reference: dict[str, np.ndarray] | None, check: dict[str, Any] | None = None,
            extra: dict[str, Any] | None = None) -> tuple[Exported, dict[str, np.ndarray]]:
    """Save ``proto`` to ``path``, run it through the runtime on val and test, gate it against the
    FP32 ``reference`` probabilities of both splits (FP32 itself: its Keras ``check``), calibrate its
    input gate on its own validation distances, and store the record with this variant's metrics.
    Returns the variant and its probabilities per split."""
    from xray_edge.train.ood import calibrate

    record = replace(inputs.record, variant=variant)
    _save(proto, record, path)  # the runtime only loads files with a record
    sizes = " + ".join(f"{len(images.y)} {split}" for split, images in inputs.sets.items())
    if sizes:
        print(f"{variant}: evaluating on {sizes} images", file=sys.stderr)
    out = runtime_outputs(path, {split: images.x for split, images in inputs.sets.items()})
    probs = {split: o.probs for split, o in out.items()}
    y = {split: images.y for split, images in inputs.sets.items()}
    if check is not None:
        figures = check
    else:
        figures = {split: gate(reference[split], probs[split], y[split], split, opts.min_agreement, opts.max_drop) for split in ("val", "test")}
        figures["passed"] = all(f["passed"] for f in figures.values())
        for split in ("val", "test"):
            print(describe(variant, figures[split]), file=sys.stderr)
    if record.gate is not None and "val" in out:
        record.gate = calibrate(out["val"].ood, record.gate.quantile)
    record.forced = not figures["passed"]  # only written so when ignore_gate is given
    record.metrics = {**inputs.record.metrics, **reports(probs, y, record.classes, opts.n_boot, opts.seed),
                      "gate": figures, "split_counts": inputs.split_counts, **(extra or {})}
    sealed = _save(proto, record, path)
    return Exported(variant, path, sealed, figures), probs


def export_variants(opts: ExportOptions) -> list[Exported]:
    """Run the whole export; returns the written variants. Raises ExportRefused (nothing written)
    if the FP32 check fails, or a gate fails without ``ignore_gate``; ExportDataError or
    ModelContractError on unusable input."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown or not opts.variants:
        raise ExportDataError(f"--variants must name some of {list(VARIANTS)}, got {opts.variants}")
    if not opts.model.is_file():
        raise ExportDataError(f"{opts.model}: Keras model not found")
    import keras
    import onnx

    import xray_edge.train.model  # noqa: F401 (registers the model's own layers with Keras)

    from .convert import check_against_keras, keras_to_onnx
    from .quantize import CLASSIFIER_INT8, to_fp16, to_int8

    try:
        model = keras.models.load_model(opts.model, compile=False)
        model.get_layer("logits")
    except Exception as e:  # Keras raises many types for unusable files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportDataError(f"{opts.model}: not an xray-edge Keras model with a 'logits' layer ({reason})") from None
    inputs = read_inputs(opts, int(model.inputs[0].shape[1]))
    existing = [p for v in opts.variants if (p := target_path(opts, inputs.record, v)).exists()]
    if existing and not opts.force:
        raise ExportDataError(f"{', '.join(map(str, existing))} already exist(s); give another --out or --force "
                              "to overwrite")

    print("fp32: converting with tf2onnx and checking against Keras", file=sys.stderr)
    fp32 = keras_to_onnx(model)
    check = {"reference": "keras", **check_against_keras(model, fp32, inputs.check_x, inputs.check_images)}
    print(describe("fp32", check), file=sys.stderr)
    if not check["passed"]:
        raise ExportRefused(describe("fp32", check) + "; nothing written")

    created = not opts.out.exists()
    opts.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=opts.out))
    try:
        done, probs32 = measure("fp32", fp32, staging / "fp32.onnx", inputs, opts, None, check=check)
        built = [done]
        if "fp16" in opts.variants:
            built.append(measure("fp16", to_fp16(fp32), staging / "fp16.onnx", inputs, opts, probs32)[0])
        if "int8" in opts.variants:
            path = staging / "int8.onnx"
            print(f"int8: {opts.calibration} calibration on {len(inputs.calibration.y)} training images",
                  file=sys.stderr)
            settings = to_int8(staging / "fp32.onnx", path, inputs.calibration.x, opts.calibration, **CLASSIFIER_INT8)
            built.append(measure("int8", onnx.load(str(path)), path, inputs, opts, probs32,
                                 extra={"quantization": settings})[0])
        refused = [describe(b.variant, b.figures[s]) for b in built if not b.figures["passed"]
                   for s in ("val", "test") if s in b.figures and not b.figures[s]["passed"]]
        if refused and not opts.ignore_gate:
            raise ExportRefused("; ".join(refused) + "; nothing written (--ignore-gate writes it anyway, marked forced)")
        written = []
        for b in built:
            if b.variant in opts.variants:
                final = target_path(opts, b.record, b.variant)
                os.replace(b.path, final)
                written.append(replace(b, path=final))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(opts.out.iterdir()):
            opts.out.rmdir()
