"""The ``xray-edge train`` command (TensorFlow is imported only when it runs)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from xray_edge.contract import INPUT_SIZE
from xray_edge.train.features import DEFAULT_CACHE


def train(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class (COVID, NORMAL, VIRAL_PNEUMONIA)."),
    out: Path = typer.Option(Path("artifacts/train"), help="Output folder (model.keras, record.json, split.csv, metrics.json, plots)."),
    weights: Optional[str] = typer.Option(None, help="VGG-19 no-top .h5 file, 'imagenet' (Keras download) or 'none' (random init, tests). Default: $XRAY_EDGE_VGG19_WEIGHTS."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated subset of class folders, e.g. COVID,NORMAL."),
    size: int = typer.Option(INPUT_SIZE, help="Model input size (pixels)."),
    seed: int = typer.Option(0, help="Seed of the split, augmentation and training."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Feature cache folder."),
    aug_views: int = typer.Option(1, min=0, help="Extra augmented views per training image."),
    heads: str = typer.Option("flatten,gap", help="Heads to compare on validation (the better one is kept)."),
    epochs: int = typer.Option(40, min=1, help="Maximum head-training epochs (early stopping on val loss)."),
    batch_size: int = typer.Option(64, min=1),
    lr: Optional[float] = typer.Option(None, help="Head learning rate (Adam) for every head. Default: flatten 1e-4, gap 1e-3."),
    fine_tune_epochs: int = typer.Option(0, min=0, help="Epochs of block-5 fine-tuning after the head (slow on a CPU)."),
    test_fraction: float = typer.Option(0.33, help="Test share (1 / number of group folds)."),
    val_fraction: float = typer.Option(0.15, help="Validation share of the whole set, taken from the training part."),
    phash_hamming: int = typer.Option(8, help="pHash Hamming distance that shortlists near-duplicate pairs."),
    ncc_threshold: float = typer.Option(0.95, help="Thumbnail NCC that confirms a near-duplicate pair."),
    covid_sensitivity: float = typer.Option(0.95, help="Validation sensitivity the COVID threshold must reach."),
    n_boot: int = typer.Option(1000, min=1, help="Bootstrap resamples for the 95 % CIs."),
) -> None:
    """Train the VGG-19 transfer model on a folder-per-class chest X-ray set."""
    from xray_edge.contract import CLASSES, ModelContractError
    from xray_edge.train.data import DatasetError

    head_list = tuple(h.strip() for h in heads.split(",") if h.strip())
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    problems = [f"unknown head {h!r} (use flatten, gap)" for h in head_list if h not in ("flatten", "gap")]
    problems += [f"unknown class {c!r} in --classes (use {', '.join(CLASSES)})" for c in class_list or [] if c not in CLASSES]
    if weights is None and not os.environ.get("XRAY_EDGE_VGG19_WEIGHTS"):  # train.model.WEIGHTS_ENV
        problems.append("give --weights PATH (VGG-19 no-top .h5), 'imagenet' or 'none' (random init), "
                        "or set XRAY_EDGE_VGG19_WEIGHTS")
    if not head_list:
        problems.append("--heads names no head")
    if not 0 < test_fraction < 1 or not 0 < val_fraction < 1 - test_fraction:
        problems.append("need 0 < test-fraction < 1 and 0 < val-fraction < 1 - test-fraction")
    if problems:
        typer.echo(f"error: {'; '.join(problems)}", err=True)
        raise typer.Exit(2)

    from xray_edge.train.pipeline import TrainConfig, run

    cfg = TrainConfig(data_dir=data_dir, out=out, weights=weights, classes=class_list, size=size, seed=seed,
                      cache_dir=cache_dir, aug_views=aug_views, heads=head_list, epochs=epochs, batch_size=batch_size,
                      lr=lr, fine_tune_epochs=fine_tune_epochs, test_fraction=test_fraction,
                      val_fraction=val_fraction, phash_hamming=phash_hamming, ncc_threshold=ncc_threshold,
                      covid_sensitivity=covid_sensitivity, n_boot=n_boot)
    try:
        m = run(cfg)
    except (DatasetError, ModelContractError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    t = m["test"]
    typer.echo(f"head {m['selected_head']} (val macro-F1 {m['heads'][m['selected_head']]['macro_f1']:.3f}); "
               f"test n={t['n']}: accuracy {t['accuracy']['value']:.3f} {t['accuracy']['ci95']}, "
               f"macro-F1 {t['macro_f1']['value']:.3f}, ECE {m['ece']['test']['before']:.3f} -> "
               f"{m['ece']['test']['after']:.3f} (T={m['temperature']:.2f}); {m['timings_seconds']['total']:.0f} s")
    typer.echo(f"wrote {out}/model.keras, record.json, split.csv, metrics.json, curves.png, confusion_test.png")
