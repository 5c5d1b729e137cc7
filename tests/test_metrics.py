import numpy as np
import pytest

from xray_edge.metrics import classification_report, expected_calibration_error, fit_temperature, softmax

CLASSES = ["A", "B", "C"]


def test_report_matches_hand_counts():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 2, 0, 2])
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    r = classification_report(y, probs, CLASSES, n_boot=50)
    assert r["accuracy"]["value"] == pytest.approx(6 / 8)
    a = r["per_class"]["A"]
    assert a["sensitivity"]["value"] == pytest.approx(2 / 3)  # 2 of 3 A found
    assert a["ppv"]["value"] == pytest.approx(2 / 3)  # one C called A
    assert a["specificity"]["value"] == pytest.approx(4 / 5)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    lo, hi = r["accuracy"]["ci95"]
    assert lo <= 0.75 <= hi and lo < hi


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = softmax(rng.normal(size=(200, 3)) + 2 * np.eye(3)[y])
    assert classification_report(y, p, CLASSES, n_boot=100, seed=3) == classification_report(y, p, CLASSES, n_boot=100, seed=3)


def test_temperature_reduces_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    true_logits = rng.normal(size=(3000, 3)) + 1.5 * np.eye(3)[y]
    labels = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    over = true_logits * 4  # an overconfident model
    t = fit_temperature(over, labels)
    assert 3.0 < t < 5.5
    assert expected_calibration_error(softmax(over, t), labels) < expected_calibration_error(softmax(over), labels)
