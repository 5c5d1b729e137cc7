"""From a model's outputs to what a results row says, by the rules in the model's record: the
input gate (``rejected``), the operating thresholds (``flagged``), the "uncertain, refer" band and
the age-group warning. One function, used by ``classify``, the benchmark and the Pi path alike.

Decisions:

* ``positive``: a finding class (every class but NORMAL) is at or above its threshold: flagged;
* ``negative``: no finding is flagged;
* ``uncertain``: the two most probable classes are within the record's abstain margin (an exact
  tie always is): refer to a clinician rather than read the label;
* ``rejected``: the input gate says this is not an image the model was built for: no class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import AGE_GROUPS, ModelRecord

DECISIONS = ("positive", "negative", "uncertain", "rejected")


@dataclass(frozen=True)
class Decision:
    """What one classified image comes to."""

    decision: str  # one of DECISIONS
    label: str  # most probable class ('' when rejected)
    flagged: list[str]  # finding classes at or above their threshold
    age_group: str  # adult / child from the age output ('' without one or when rejected)
    warning: str  # why to be careful with this label ('' when none)
    reason: str  # why the image was rejected ('' otherwise)
    gate_score: float | None  # ood distance / gate threshold (> 1: rejected); None without a gate


def decide(record: ModelRecord, probs: np.ndarray, age: np.ndarray | None = None,
           ood: float | None = None) -> Decision:
    """Apply the record's rules to one image's class probabilities (C,), age-group probabilities
    (len(AGE_GROUPS),) and gate distance."""
    score = None
    if record.gate is not None and ood is not None:
        score = float(ood) / record.gate.threshold
        if not score <= 1.0:  # NaN too
            return Decision("rejected", "", [], "", "",
                            f"not a usable chest X-ray for this model: its image features are {score:.1f}x farther "
                            "from the training X-rays than the gate allows (photo, document, CT/MR slice, other body "
                            "part, lateral view, or a blank or heavily processed image)", score)
    classes = record.classes
    label = classes[int(np.argmax(probs))]
    if record.thresholds:
        flagged = [c for c in record.findings() if c in record.thresholds and probs[classes.index(c)] >= record.thresholds[c]]
    else:
        flagged = [label] if label in record.findings() else []
    top = np.sort(probs)
    if top[-1] - top[-2] <= record.abstain_margin:
        decision = "uncertain"
    else:
        decision = "positive" if flagged else "negative"
    age_group, warning = "", ""
    if age is not None:
        age_group = AGE_GROUPS[int(np.argmax(age))]
        unseen = [c for c in dict.fromkeys([label, *flagged])
                  if c in record.seen_age_groups and age_group not in record.seen_age_groups[c]]
        if unseen:
            warning = "; ".join(
                f"{c} was only ever seen in {' and '.join(record.seen_age_groups[c])} images in training and this "
                f"looks like a(n) {age_group}'s image: outside what the model knows" for c in unseen)
    return Decision(decision, label, flagged, age_group, warning, "", score)
