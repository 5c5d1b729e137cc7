"""The ``xray-edge train`` command (TensorFlow is imported only when it runs)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from xray_edge.recipe import INPUT_SIZE, INTENSITY_METHODS
from xray_edge.extras import require
from xray_edge.train.recipes import CHILD_ORIGINS, DEFAULT, FEATURE_CACHE


def train(
    data_dirs: Annotated[list[Path], typer.Argument(
        help="Data roots: folders with one sub-folder per class (COVID, NORMAL, VIRAL_PNEUMONIA) or a "
             "manifest.csv listing the images.", metavar="DATA_DIR", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (model.keras, record.json, split.csv, metrics.json, plots). "
             "[default: a new folder runs/train-<date>-<time>]", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the results already in --out.")] = False,
    weights: Annotated[Optional[str], typer.Option(
        help="VGG-19 no-top .h5 file, 'imagenet' (Keras download) or 'none' (random init, tests). "
             "[default: $XRAY_EDGE_VGG19_WEIGHTS]", show_default=False)] = None,
    arch: Annotated[str, typer.Option(
        help="Convolutional base: vgg19, or vgg-tiny (VGG's layout at a few channels, random weights: tests and "
             "dry runs).")] = "vgg19",
    classes: Annotated[Optional[str], typer.Option(
        help="Comma-separated subset of classes, e.g. COVID,NORMAL. [default: every class found]",
        show_default=False)] = None,
    child_origins: Annotated[str, typer.Option(
        help="Comma-separated origins whose images are children (every other origin: adults).")] = ",".join(CHILD_ORIGINS),
    size: Annotated[int, typer.Option(help="Model input size (pixels).")] = INPUT_SIZE,
    seed: Annotated[int, typer.Option(help="Seed of the split and the augmentation.")] = 0,
    seeds: Annotated[str, typer.Option(
        help="Comma-separated training seeds: the cross-origin protocol runs on each (mean and spread reported); "
             "the model written is the first seed's.")] = "0,1,2",
    cache_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = FEATURE_CACHE,
    intensity: Annotated[str, typer.Option(
        help=f"Intensity normalisation after the percentile stretch: {', '.join(INTENSITY_METHODS)}.")] = DEFAULT.intensity,
    crop_fraction: Annotated[float, typer.Option(help="Border cropped from each side.")] = DEFAULT.crop_fraction,
    lung_crop: Annotated[bool, typer.Option(
        "--lung-crop/--no-lung-crop",
        help="Crop to the lung fields found by the lung model shipped in xray_edge.models (before the border "
             "crop).")] = DEFAULT.lung_crop,
    augment: Annotated[str, typer.Option(
        help="Augmentation: processing, geometric, or both (geometric+processing: the views of each).")] = DEFAULT.augment,
    aug_views: Annotated[int, typer.Option(min=0, help="Augmented views per training image.")] = DEFAULT.aug_views,
    origin_weights: Annotated[bool, typer.Option(
        "--origin-weights/--class-weights",
        help="Weight images so every origin of a class counts equally (else every image of a class).")
    ] = DEFAULT.origin_weights,
    drop_conflicts: Annotated[bool, typer.Option(
        "--drop-conflicts/--keep-conflicts",
        help="Leave the images a root's label-conflicts.csv lists out of training (they are never scored).")
    ] = DEFAULT.drop_conflicts,
    dro_eta: Annotated[float, typer.Option(
        min=0, help="Worst-group reweighting: after each epoch, weight each (origin x class) group by "
                    "exp(eta x its validation loss - the worst's); 0: off.")] = DEFAULT.dro_eta,
    centre: Annotated[bool, typer.Option(
        "--centre/--no-centre", help="Remove each origin's offset of its normals' mean feature in training.")
    ] = DEFAULT.centre,
    fine_tune: Annotated[int, typer.Option(
        min=0, max=4, help="Block-5 convolutions (from the last) trained together with the head, from cached "
                           "block4_pool activations; 0: frozen base.")] = DEFAULT.fine_tune,
    head: Annotated[str, typer.Option(help="Head: gap (global average pooling) or flatten.")] = DEFAULT.head,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum head-training epochs (early stopping on val loss).")] = 40,
    batch_size: Annotated[int, typer.Option(min=1, help="Head-training batch size.")] = 64,
    lr: Annotated[Optional[float], typer.Option(
        help="Head learning rate (Adam). [default: flatten 1e-4, gap 1e-3]", show_default=False)] = None,
    fine_tune_epochs: Annotated[int, typer.Option(min=1, help="Maximum fine-tuning epochs (early stopping).")] = 8,
    fine_tune_lr: Annotated[float, typer.Option(help="Fine-tuning learning rate (Adam).")] = 2e-5,
    test_fraction: Annotated[float, typer.Option(help="Test share (1 / number of group folds).")] = 0.33,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the whole set, taken from the training part.")] = 0.15,
    phash_hamming: Annotated[int, typer.Option(help="pHash Hamming distance that shortlists near-duplicate pairs.")] = 8,
    ncc_threshold: Annotated[float, typer.Option(help="Thumbnail NCC that confirms a near-duplicate pair.")] = 0.95,
    covid_sensitivity: Annotated[float, typer.Option(help="Validation sensitivity the COVID threshold must reach.")] = 0.95,
    abstain_accuracy: Annotated[float, typer.Option(
        help="Validation accuracy the images outside the 'uncertain' band must reach.")] = 0.97,
    max_abstain: Annotated[float, typer.Option(
        help="Largest share of validation images the 'uncertain' band may take.")] = 0.10,
    gate_quantile: Annotated[float, typer.Option(
        help="Share of validation X-rays the input gate must accept.")] = 0.99,
    n_boot: Annotated[int, typer.Option(min=1, help="Bootstrap resamples for the 95 % CIs.")] = 1000,
) -> None:
    """Train the VGG-19 transfer model on chest X-rays from one or more data roots
    (needs the train extra: pip install "xray-edge[train]")."""
    require("train", "tensorflow", "keras", "tf2onnx", "onnx", "sklearn")
    from xray_edge.contract import CLASSES, ModelContractError
    from xray_edge.train.data import DatasetError
    from xray_edge.train.recipes import Recipe

    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    problems = [f"unknown head {head!r} (use flatten, gap)"] if head not in ("flatten", "gap") else []
    try:
        seed_list = tuple(int(x) for x in seeds.split(","))
    except ValueError:
        seed_list = ()
    if not seed_list:
        problems.append(f"--seeds must be comma-separated integers, got {seeds!r}")
    if centre and fine_tune:
        problems.append("--centre applies to the frozen base only: not with --fine-tune")
    problems += [f"unknown class {c!r} in --classes (use {', '.join(CLASSES)})" for c in class_list or [] if c not in CLASSES]
    if intensity not in INTENSITY_METHODS:
        problems.append(f"--intensity must be one of {', '.join(INTENSITY_METHODS)}")
    if arch not in ("vgg19", "vgg-tiny"):
        problems.append("--arch must be vgg19 or vgg-tiny")
    if arch == "vgg-tiny" and weights not in (None, "none"):
        problems.append("--arch vgg-tiny has no pretrained weights: give --weights none")
    if not set(augment.split("+")) <= {"processing", "geometric"}:
        problems.append("--augment must be processing, geometric or geometric+processing")
    if weights not in (None, "none", "imagenet") and not os.path.isfile(weights):
        problems.append(f"VGG-19 weights file not found: {weights}")
    if weights is None and arch == "vgg19" and not os.environ.get("XRAY_EDGE_VGG19_WEIGHTS"):  # train.model.WEIGHTS_ENV
        problems.append("give --weights PATH (VGG-19 no-top .h5), 'imagenet' or 'none' (random init), "
                        "or set XRAY_EDGE_VGG19_WEIGHTS")
    if not 0 < test_fraction < 1 or not 0 < val_fraction < 1 - test_fraction:
        problems.append("need 0 < test-fraction < 1 and 0 < val-fraction < 1 - test-fraction")
    out = out or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not force:
        problems.append(f"{out} already holds results; choose another --out or add --force to overwrite them")
    if problems:
        typer.echo(f"error: {'; '.join(problems)}", err=True)
        raise typer.Exit(2)

    from xray_edge.train.pipeline import TrainConfig, run

    recipe = Recipe("command line", intensity=intensity, crop_fraction=crop_fraction, lung_crop=lung_crop,
                    augment=augment, aug_views=aug_views, origin_weights=origin_weights, head=head,
                    drop_conflicts=drop_conflicts, dro_eta=dro_eta, centre=centre, fine_tune=fine_tune)
    cfg = TrainConfig(data_dirs=data_dirs, out=out, weights=weights, arch=arch, classes=class_list,
                      child_origins=tuple(o.strip() for o in child_origins.split(",") if o.strip()), size=size,
                      seed=seed, seeds=seed_list, cache_dir=cache_dir, recipe=recipe, epochs=epochs,
                      batch_size=batch_size, lr=lr, fine_tune_epochs=fine_tune_epochs, fine_tune_lr=fine_tune_lr,
                      test_fraction=test_fraction, val_fraction=val_fraction, phash_hamming=phash_hamming,
                      ncc_threshold=ncc_threshold, covid_sensitivity=covid_sensitivity,
                      abstain_accuracy=abstain_accuracy, max_abstain=max_abstain, gate_quantile=gate_quantile,
                      n_boot=n_boot)
    try:
        m = run(cfg)
    except (DatasetError, ModelContractError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    t, summary = m["test"], m["protocol"]["summary"]
    cross = ", ".join(f"{o} {f['macro_f1']['mean']:.3f}" for o, f in summary["origins"].items())
    worst = summary["worst_origin_macro_f1"]
    typer.echo(f"test n={t['n']} accuracy {t['accuracy']['value']:.3f}, macro-F1 {t['macro_f1']['value']:.3f}; "
               f"held-out origins ({len(summary['seeds'])} seeds): {cross or 'none can be held out'}; worst "
               f"{worst['mean'] if worst['mean'] is not None else float('nan'):.3f} ± {worst['sd']:.3f}; "
               f"{m['timings_seconds']['total']:.0f} s")
    typer.echo(f"wrote {out}/model.keras, record.json, split.csv, metrics.json, curves.png, confusion_test.png")
