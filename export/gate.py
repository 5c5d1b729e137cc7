"""The accuracy gate: a reduced-precision variant must agree with the FP32 ONNX model on the
validation and the test split before it is written, and its metrics are measured through the
runtime itself."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import MAX_ACCURACY_DROP_POINTS, MIN_AGREEMENT


def runtime_outputs(model_path: Path, inputs: dict[str, np.ndarray], batch_size: int = 16) -> dict[str, Any]:
    """``session.Prediction`` of the model file on each set of preprocessed inputs, through the
    runtime's own loader (record checks, softmax(logits / record.temperature))."""
    from xray_edge.session import Prediction, load_model, predict

    model = load_model(model_path)
    out = {}
    for name, x in inputs.items():
        parts = [predict(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        out[name] = Prediction(*(None if getattr(parts[0], f) is None else np.concatenate([getattr(p, f) for p in parts])
                                 for f in ("probs", "age", "ood", "cam")))
    return out


def gate(reference: np.ndarray, probs: np.ndarray, y: np.ndarray, split: str = "val",
         min_agreement: float = MIN_AGREEMENT, max_drop: float = MAX_ACCURACY_DROP_POINTS) -> dict[str, Any]:
    """Agreement and accuracy drop of ``probs`` against the FP32 ``reference`` probabilities."""
    acc_ref = float(np.mean(reference.argmax(1) == y))
    acc = float(np.mean(probs.argmax(1) == y))
    agreement = float(np.mean(reference.argmax(1) == probs.argmax(1)))
    drop = 100.0 * (acc_ref - acc)
    return {
        "reference": "fp32 onnx",
        "split": split,
        "n": int(len(y)),
        "argmax_agreement": agreement,
        "accuracy_fp32": acc_ref,
        "accuracy": acc,
        "accuracy_drop_points": drop,
        "max_abs_prob_diff": float(np.abs(reference - probs).max()),
        "min_agreement": min_agreement,
        "max_accuracy_drop_points": max_drop,
        "passed": agreement >= min_agreement and drop <= max_drop,
    }


def describe(variant: str, figures: dict[str, Any]) -> str:
    """One line of gate figures."""
    verdict = "passed" if figures["passed"] else "FAILED"
    if figures.get("reference") == "keras":
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in figures["differences"].items())
        return (f"{variant}: Keras check {verdict}: max differences {diffs} (limits: probabilities "
                f"{figures['limit']:.0e}, others relative 1e-3) on {figures['n']} {figures['images']} images")
    return (f"{variant}: gate {verdict}: agreement with fp32 {figures['argmax_agreement']:.2%} "
            f"(min {figures['min_agreement']:.0%}), accuracy {figures['accuracy']:.2%} vs fp32 "
            f"{figures['accuracy_fp32']:.2%} (drop {figures['accuracy_drop_points']:+.2f} points, max "
            f"{figures['max_accuracy_drop_points']}), max |dp| {figures['max_abs_prob_diff']:.3f} "
            f"on {figures['n']} {figures['split']} images")


def reports(probs_by_split: dict[str, np.ndarray], y_by_split: dict[str, np.ndarray],
            classes: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """``metrics.classification_report`` of each split."""
    from xray_edge.metrics import classification_report

    return {split: classification_report(y_by_split[split], probs, classes, n_boot=n_boot, seed=seed)
            for split, probs in probs_by_split.items()}
