"""Per-class operating thresholds on calibrated probabilities: class c is flagged when
softmax(logits / T)[c] >= thresholds[c] (one-vs-rest)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

SENSITIVITY_CLASS = "COVID"


def sensitivity_threshold(pos_scores: np.ndarray, target: float) -> float:
    """The largest threshold that flags at least ``target`` of the positives."""
    s = np.sort(pos_scores)[::-1]
    return float(s[max(math.ceil(target * len(s)), 1) - 1])


def youden_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(positive, scores)
    return float(min(thr[int(np.argmax(tpr - fpr))], 1.0))


def choose_thresholds(probs: np.ndarray, y: np.ndarray, classes: Sequence[str],
                      covid_sensitivity: float) -> dict[str, float]:
    """COVID: sensitivity >= ``covid_sensitivity`` on these data; other classes: Youden's J."""
    out = {}
    for c, name in enumerate(classes):
        pos = y == c
        out[name] = (sensitivity_threshold(probs[pos, c], covid_sensitivity) if name == SENSITIVITY_CLASS
                     else youden_threshold(probs[:, c], pos))
    return out


def operating_points(probs: np.ndarray, y: np.ndarray, classes: Sequence[str], thresholds: dict[str, float],
                     n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Sensitivity and specificity of each class's threshold rule, with percentile-bootstrap 95 % CIs."""
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(y), (n_boot, len(y)))
    out = {}
    for c, name in enumerate(classes):
        flag, pos = probs[:, c] >= thresholds[name], y == c
        entry: dict[str, Any] = {"threshold": thresholds[name]}
        for metric, cond, hit in (("sensitivity", pos, flag), ("specificity", ~pos, ~flag)):
            n = cond[boot].sum(axis=1)
            k = (cond & hit)[boot].sum(axis=1)
            samples = k[n > 0] / n[n > 0]
            value = float((cond & hit).sum() / cond.sum()) if cond.any() else None
            ci = [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))] if len(samples) else [None, None]
            entry[metric] = {"value": value, "ci95": ci}
        out[name] = entry
    return out
