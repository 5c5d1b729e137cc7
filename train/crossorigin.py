"""Cross-origin validation: how the model does on images from a collection it never saw.

Leave-one-origin-out (LOOO): for every origin that can be held out without removing a class from
training, the heads are trained again without any image of that origin (training and validation
splits) and tested on every image of it. Reported per origin and class: sensitivity and
specificity (Wilson 95 % intervals), the confusion matrix, macro-F1 over the classes the origin
has, and how often the age head calls its images adult/child. The mean over origins of that
macro-F1 is the figure recipes and models are chosen by.

The NORMAL probe is the older, narrower variant: a head trained without one origin's NORMAL
images, tested on that origin's test NORMALs.
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


def leave_one_origin_out(fit: FitFn, labels: np.ndarray, origins: np.ndarray, splits: np.ndarray,
                         classes: Sequence[str]) -> dict[str, Any]:
    """LOOO over every holdable origin: ``fit`` on the training/validation images of the other
    origins, report on every image of the held-out one."""
    folds = {}
    pooled_y, pooled_p = [], []
    for o in holdable_origins(labels, origins, len(classes)):
        keep = origins != o
        predict = fit(keep & (splits == "train"), keep & (splits == "val"))
        test = origins == o
        probs = predict(test)
        folds[o] = fold_report(labels[test], probs, classes)
        pooled_y.append(labels[test])
        pooled_p.append(probs)
    f1 = [f["macro_f1_present"] for f in folds.values() if f["macro_f1_present"] is not None]
    return {
        "protocol": ("for each origin that can be held out without removing a class from training: heads trained "
                     "without any image of it, tested on all of its images"),
        "origins": folds,
        "mean_macro_f1": float(np.mean(f1)) if f1 else None,
        "mean_balanced_accuracy": float(np.mean([f["balanced_accuracy"] for f in folds.values()])) if folds else None,
        "pooled": fold_report(np.concatenate(pooled_y), np.concatenate(pooled_p), classes) if folds else None,
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


def gate_by_origin(pooled: np.ndarray, labels: np.ndarray, origins: np.ndarray, splits: np.ndarray,
                   n_classes: int, quantile: float) -> dict[str, float]:
    """For every holdable origin: the input gate fitted without it (training images of the other
    origins, limit at ``quantile`` of their validation images) and the share of its real X-rays
    that gate would reject (``pooled``: clean pooled features, one row per image)."""
    from xray_edge.train import ood

    out = {}
    for o in holdable_origins(labels, origins, n_classes):
        keep = origins != o
        train, val = keep & (splits == "train"), keep & (splits == "val")
        means, whiten = ood.fit_mahalanobis(pooled[train], labels[train], n_classes)
        gate = ood.calibrate(ood.distances(pooled[val], means, whiten), quantile)
        out[o] = float(np.mean(ood.distances(pooled[origins == o], means, whiten) > gate.threshold))
    return out


def normal_probe(fit: FitFn, labels: np.ndarray, origins: np.ndarray, splits: np.ndarray,
                 classes: Sequence[str]) -> dict[str, Any]:
    """For each NORMAL origin: heads trained without its NORMAL images; how are its test NORMALs called?"""
    if "NORMAL" not in classes:
        return {}
    c = list(classes).index("NORMAL")
    out = {}
    for o in sorted(set(origins[labels == c])):
        keep = ~((labels == c) & (origins == o))
        predict = fit(keep & (splits == "train"), keep & (splits == "val"))
        test = (labels == c) & (origins == o) & (splits == "test")
        pred = predict(test).argmax(axis=1)
        k, n = int((pred == c).sum()), int(test.sum())
        out[o] = {"n_test_normals": n, "called_normal": {"value": k / n if n else None, "ci95_wilson": wilson(k, n)},
                  "called": {classes[j]: int((pred == j).sum()) for j in range(len(classes))}}
    return out


def by_age_group(y: np.ndarray, probs: np.ndarray, age: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The test split's per-class figures separately for adult and child images."""
    return {g: fold_report(y[age == i], probs[age == i], classes) for i, g in enumerate(AGE_GROUPS) if (age == i).any()}
