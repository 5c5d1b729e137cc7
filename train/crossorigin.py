"""Cross-origin pieces of the protocol (``train.protocol``): which origins can be held out, the
per-fold report (per-class sensitivity and specificity with Wilson 95 % intervals, confusion
matrix, macro-F1 over the classes the origin has), the age head's calls on held-out origins, and
the test split's figures by age group.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from xray_edge.contract import AGE_GROUPS
from xray_edge.train.report import wilson

# (train mask, val mask) over the images -> a predictor of class (or age-group) probabilities for a mask
FitFn = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def holdable_origins(labels: np.ndarray, origins: np.ndarray, n_classes: int) -> list[str]:
    """Origins whose removal leaves every class with training images from some other origin."""
    return [o for o in sorted(set(origins))
            if all(((labels == c) & (origins != o)).any() for c in range(n_classes))]


def fold_report(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class sensitivity and specificity with Wilson CIs, confusion matrix (rows = truth),
    macro-F1 over the classes present and balanced accuracy."""
    pred = probs.argmax(axis=1)
    n = len(classes)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (y, pred), 1)
    present = [c for c in range(n) if (y == c).any()]
    per_class, f1s = {}, []
    for c in range(n):
        tp, pos, flagged = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        neg, tn = len(y) - pos, int(((y != c) & (pred != c)).sum())
        per_class[classes[c]] = {
            "n": pos,
            "predicted": flagged,
            "sensitivity": {"value": tp / pos, "ci95_wilson": wilson(tp, pos)} if pos else None,
            "specificity": {"value": tn / neg, "ci95_wilson": wilson(tn, neg)} if neg else None,
        }
        if pos:
            f1s.append(2 * tp / (pos + flagged))
    return {
        "n": int(len(y)),
        "classes_present": [classes[c] for c in present],
        "macro_f1_present": float(np.mean(f1s)) if f1s else None,
        "balanced_accuracy": float(np.mean([cm[c, c] / cm[c].sum() for c in present])) if present else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def age_by_origin(fit_age: FitFn, labels: np.ndarray, origins: np.ndarray, splits: np.ndarray, age: np.ndarray,
                  n_classes: int) -> dict[str, Any]:
    """For every holdable origin: the age head trained without it, and how it calls its images
    (adult/child) against the age group of that origin."""
    out = {}
    for o in holdable_origins(labels, origins, n_classes):
        keep = origins != o
        called = fit_age(keep & (splits == "train"), keep & (splits == "val"))(origins == o).argmax(axis=1)
        out[o] = {"accuracy": float(np.mean(called == age[origins == o])),
                  "called": {g: int((called == i).sum()) for i, g in enumerate(AGE_GROUPS)}}
    return out


def by_age_group(y: np.ndarray, probs: np.ndarray, age: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The test split's per-class figures separately for adult and child images."""
    return {g: fold_report(y[age == i], probs[age == i], classes) for i, g in enumerate(AGE_GROUPS) if (age == i).any()}
