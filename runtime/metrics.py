"""Screening metrics with bootstrap 95 % confidence intervals, on scikit-learn's metrics.

Shared by training (test/validation reports), the export accuracy gate and the benchmark. Needs
scikit-learn (extras ``bench`` or ``train``); ``classify`` never imports this module.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from .session import softmax  # re-exported: one softmax for runtime, training and metrics

__all__ = ["softmax", "fit_temperature", "expected_calibration_error", "classification_report"]


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=int)

    def nll(log_t: float) -> float:
        p = softmax(z, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def _point_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """Flat dict of every point metric; NaN where undefined (e.g. a class absent)."""
    pred = probs.argmax(axis=1)
    labels = list(range(n_classes))
    cm = confusion_matrix(y, pred, labels=labels)
    out = {
        "accuracy": accuracy_score(y, pred),
        "macro_f1": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
    }
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    aurocs = []
    for c in labels:
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        pos = y == c
        auroc = roc_auc_score(pos, probs[:, c]) if 0 < pos.sum() < len(y) else np.nan
        aurocs.append(auroc)
        out |= {
            f"{c}.sensitivity": tp / (tp + fn) if tp + fn else np.nan,
            f"{c}.specificity": tn / (tn + fp) if tn + fp else np.nan,
            f"{c}.ppv": tp / (tp + fp) if tp + fp else np.nan,
            f"{c}.npv": tn / (tn + fn) if tn + fn else np.nan,
            f"{c}.f1": f1[c],
            f"{c}.auroc": auroc,
        }
    out["macro_auroc"] = float(np.mean(aurocs)) if not np.isnan(aurocs).any() else np.nan
    return {k: float(v) for k, v in out.items()}


def classification_report(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str],
                          n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy, macro-F1, macro AUROC and per-class sensitivity, specificity, PPV, NPV, F1 and
    one-vs-rest AUROC, each ``{"value", "ci95": [lo, hi]}`` from a seeded percentile bootstrap
    over images; plus ``n``, per-class support and the confusion matrix (rows = truth)."""
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y) != len(probs) or probs.shape[1] != len(classes):
        raise ValueError(f"shape mismatch: {len(y)} labels, probs {probs.shape}, {len(classes)} classes")
    n_classes = len(classes)
    point = _point_metrics(y, probs, n_classes)
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for k, v in _point_metrics(y[idx], probs[idx], n_classes).items():
            samples[k].append(v)

    def entry(key: str) -> dict[str, Any]:
        s = np.asarray(samples[key])
        s = s[~np.isnan(s)]
        ci = [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if len(s) else [None, None]
        value = point[key]
        return {"value": None if np.isnan(value) else value, "ci95": ci}

    per_class = {
        name: {m: entry(f"{c}.{m}") for m in ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc")}
        | {"support": int((y == c).sum())}
        for c, name in enumerate(classes)
    }
    return {
        "n": int(len(y)),
        "n_boot": n_boot,
        "accuracy": entry("accuracy"),
        "macro_f1": entry("macro_f1"),
        "macro_auroc": entry("macro_auroc"),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, probs.argmax(axis=1), labels=list(range(n_classes))).tolist(),
        "classes": list(classes),
    }
