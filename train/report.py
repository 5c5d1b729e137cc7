"""Training outputs besides the model: history CSVs, plots, and the Wilson interval."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """One row per epoch: epoch, then every Keras history key."""
    keys = sorted(history)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["epoch", *keys])
        for e in range(len(history[keys[0]])):
            w.writerow([e + 1, *(f"{history[k][e]:.6f}" for k in keys)])


def plot_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Loss and accuracy per epoch (training and validation) for every head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, h), colour in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green")):
        for ax, metric in zip(axes, ("loss", "accuracy")):
            epochs = np.arange(1, len(h[metric]) + 1)
            ax.plot(epochs, h[metric], color=colour, ls="--", label=f"{name} train")
            ax.plot(epochs, h[f"val_{metric}"], color=colour, label=f"{name} val")
    for ax, metric in zip(axes, ("loss (class-weighted on train)", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> None:
    """Confusion matrix (rows = truth) with counts and row percentages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(classes) + 2, 1.4 * len(classes) + 1.5))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{rows[i, j]:.1%}", ha="center", va="center",
                    color="white" if rows[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=20)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wilson(k: int, n: int) -> list[float]:
    """Wilson score 95 % interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]
