"""The rules a model's record carries, fitted on its own validation images: temperature, operating
thresholds, the "uncertain, refer" band and the input gate. The same function serves the shipped
model and every cross-origin fold, so that what a fold reports (decisions, share sent back) is
what a model trained without that origin would do there; decisions come from the runtime's own
``decision.decide``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from xray_edge.contract import Gate, ModelRecord, Outputs
from xray_edge.decision import decide
from xray_edge.metrics import fit_temperature, softmax
from xray_edge.train import ood, thresholds


@dataclass
class Rules:
    """Fitted rules, and the gate's statistics (class means and whitening of pooled features)."""

    temperature: float
    thresholds: dict[str, float]
    abstain_margin: float
    gate: Gate
    means: np.ndarray
    whiten: np.ndarray

    def record(self, classes: Sequence[str], seen_age_groups: dict[str, list[str]] | None = None) -> ModelRecord:
        """A record holding these rules (for ``decide``; not a model's full record)."""
        return ModelRecord(classes=list(classes), temperature=self.temperature, thresholds=dict(self.thresholds),
                           abstain_margin=self.abstain_margin, gate=self.gate, seen_age_groups=seen_age_groups or {},
                           outputs=Outputs(ood_distance="ood_distance",
                                           age_logits="age_logits" if seen_age_groups else None))


def fit_rules(val_logits: np.ndarray, y_val: np.ndarray, pooled_train: np.ndarray, y_train: np.ndarray,
              pooled_val: np.ndarray, classes: Sequence[str], covid_sensitivity: float, abstain_accuracy: float,
              max_abstain: float, gate_quantile: float) -> Rules:
    """Temperature (validation NLL), thresholds (``thresholds.choose_thresholds``), abstain margin
    and the input gate (Mahalanobis on the training images' pooled features, limit at
    ``gate_quantile`` of the validation images' distances)."""
    temperature = fit_temperature(val_logits, y_val)
    probs = softmax(val_logits, temperature)
    means, whiten = ood.fit_mahalanobis(pooled_train, y_train, len(classes))
    return Rules(temperature, thresholds.choose_thresholds(probs, y_val, classes, covid_sensitivity),
                 thresholds.choose_abstain_margin(probs, y_val, abstain_accuracy, max_abstain),
                 ood.calibrate(ood.distances(pooled_val, means, whiten), gate_quantile), means, whiten)


def decisions(rules: Rules, classes: Sequence[str], logits: np.ndarray, pooled: np.ndarray) -> list[Any]:
    """``decision.decide`` of every image (no age output)."""
    record = rules.record(classes)
    probs = softmax(logits, rules.temperature)
    distance = ood.distances(pooled, rules.means, rules.whiten)
    return [decide(record, p, None, float(d)) for p, d in zip(probs, distance)]


def referral(decided: list[Any], y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """What the rules do on labelled images: shares rejected, uncertain and sent back (both), and
    the accuracy of the label on the images that got a decision (positive or negative)."""
    kind = np.array([d.decision for d in decided])
    label = np.array([classes.index(d.label) if d.label else -1 for d in decided])
    ok = np.isin(kind, ("positive", "negative"))
    return {"n": int(len(y)), "rejected": float(np.mean(kind == "rejected")),
            "uncertain": float(np.mean(kind == "uncertain")),
            "sent_back": float(np.mean(~ok)),
            "decided_accuracy": float(np.mean(label[ok] == y[ok])) if ok.any() else None}


def normal_reference(pooled: np.ndarray, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training normals' pooled features as site calibration aligns to them: the mean of the
    origins' means (every origin counts the same) and the spread of all of them (at least 1e-6: a
    feature no normal activates has none)."""
    mean = np.mean([pooled[origins == o].mean(axis=0) for o in sorted(set(origins))], axis=0)
    return mean, np.maximum(pooled.std(axis=0), 1e-6)
