"""Per-class operating thresholds on calibrated probabilities: class c is flagged when
softmax(logits / T)[c] >= thresholds[c] (one-vs-rest)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from xray_edge.contract import NEGATIVE_CLASS

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
    """Thresholds of the finding classes (not NORMAL): COVID sensitivity >= ``covid_sensitivity``
    on these data; other findings: Youden's J."""
    out = {}
    for c, name in enumerate(classes):
        if name == NEGATIVE_CLASS:
            continue
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
        if name not in thresholds:
            continue
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


def top_two_margin(probs: np.ndarray) -> np.ndarray:
    """Probability of the most likely class minus that of the runner-up, per row."""
    top = np.sort(probs, axis=1)
    return top[:, -1] - top[:, -2]


def choose_abstain_margin(probs: np.ndarray, y: np.ndarray, target_accuracy: float,
                          max_abstain: float = 0.10) -> float:
    """The smallest margin such that the images whose top-two margin is above it are classified
    with at least ``target_accuracy`` (the rest are "uncertain, refer"), abstaining on at most
    ``max_abstain`` of the images; 0 (exact ties only) if the whole set already reaches it."""
    margin = top_two_margin(probs)
    correct = probs.argmax(axis=1) == y
    order = np.argsort(margin)
    for k in range(0, int(max_abstain * len(y)) + 1):  # abstain on the k least certain images
        if correct[order[k:]].mean() >= target_accuracy:
            return 0.0 if k == 0 else float(margin[order[k - 1]])
    return float(margin[order[int(max_abstain * len(y))]])


def abstain_effect(probs: np.ndarray, y: np.ndarray, classes: Sequence[str], thresholds: dict[str, float],
                   margin: float) -> dict[str, Any]:
    """What the "uncertain, refer" band does on a labelled set: how many images it takes, accuracy
    and each finding's sensitivity/PPV at its threshold on all images and on the images left
    (decided), and sensitivity when an uncertain image counts as referred (flagged)."""
    uncertain = top_two_margin(probs) <= margin
    decided = ~uncertain
    pred = probs.argmax(axis=1)

    def rate(hit: np.ndarray, of: np.ndarray) -> float | None:
        return float(hit[of].mean()) if of.any() else None

    out: dict[str, Any] = {"margin": margin, "n": int(len(y)), "uncertain": int(uncertain.sum()),
                           "uncertain_rate": float(uncertain.mean()), "accuracy_all": rate(pred == y, np.ones_like(decided)),
                           "accuracy_decided": rate(pred == y, decided), "findings": {}}
    for name, t in thresholds.items():
        c = list(classes).index(name)
        flag, pos = probs[:, c] >= t, y == c
        out["findings"][name] = {
            "sensitivity_all": rate(flag, pos), "ppv_all": rate(pos, flag),
            "sensitivity_decided": rate(flag, pos & decided), "ppv_decided": rate(pos, flag & decided),
            "sensitivity_flagged_or_referred": rate(flag | uncertain, pos),
        }
    return out
