"""The record's rules (``decision.decide``), heatmap pictures and the HTML report, on their own."""
import numpy as np
import pytest

from tiny_model import tiny_record
from xray_edge.contract import Gate, Heatmap
from xray_edge.decision import decide
from xray_edge.heatmap import normalised, overlay, png_bytes
from xray_edge.report import priority, render

ADULT, CHILD = np.array([0.9, 0.1]), np.array([0.2, 0.8])


def record(**overrides):
    rec = tiny_record(thresholds={"COVID": 0.4, "VIRAL_PNEUMONIA": 0.5}, abstain_margin=0.1,
                      gate=Gate(threshold=10.0, quantile=0.99, feature="test"))
    for k, v in overrides.items():
        setattr(rec, k, v)
    return rec


def test_findings_flagged_at_their_thresholds_and_normal_never():
    d = decide(record(), np.array([0.46, 0.54, 0.0]), ADULT, 1.0)
    assert d.label == "NORMAL" and d.flagged == ["COVID"] and d.decision == "uncertain"  # 0.54 - 0.46 <= 0.1
    d = decide(record(), np.array([0.05, 0.9, 0.05]), ADULT, 1.0)
    assert (d.decision, d.flagged, d.warning, d.reason) == ("negative", [], "", "")
    d = decide(record(), np.array([0.7, 0.2, 0.1]), ADULT, 1.0)
    assert d.decision == "positive" and d.flagged == ["COVID"] and d.age_group == "adult"
    assert d.gate_score == pytest.approx(0.1)


def test_a_tie_is_uncertain_even_with_no_margin():
    d = decide(record(abstain_margin=0.0), np.array([0.5, 0.5, 0.0]), ADULT, 1.0)
    assert d.decision == "uncertain"


def test_gate_rejects_and_gives_no_class():
    for distance in (10.5, float("nan"), float("inf")):
        d = decide(record(), np.array([0.99, 0.005, 0.005]), ADULT, distance)
        assert d.decision == "rejected" and d.label == "" and d.flagged == []
        assert d.reason.startswith("not a usable chest X-ray")
    assert decide(record(gate=None), np.array([0.99, 0.005, 0.005]), ADULT, 1e9).decision == "positive"


def test_age_warning_when_a_class_was_never_seen_in_that_age_group():
    d = decide(record(), np.array([0.05, 0.05, 0.9]), ADULT, 1.0)
    assert d.label == "VIRAL_PNEUMONIA" and "only ever seen in child images" in d.warning and "adult" in d.warning
    d = decide(record(), np.array([0.9, 0.05, 0.05]), CHILD, 1.0)
    assert "COVID was only ever seen in adult images" in d.warning
    assert decide(record(), np.array([0.05, 0.9, 0.05]), CHILD, 1.0).warning == ""
    assert decide(record(), np.array([0.9, 0.05, 0.05]), None, 1.0).warning == ""  # no age output


def test_without_thresholds_the_most_likely_finding_is_flagged():
    assert decide(record(thresholds={}), np.array([0.2, 0.1, 0.7]), CHILD, 1.0).flagged == ["VIRAL_PNEUMONIA"]
    assert decide(record(thresholds={}), np.array([0.2, 0.7, 0.1]), CHILD, 1.0).flagged == []


def test_overlay_puts_the_heat_where_the_map_is():
    image = np.full((112, 112, 1), 0.5, np.float32)
    cam = np.zeros((4, 4), np.float32)
    cam[3, 3] = 5.0  # bottom right
    picture = overlay(image, cam, ["COVID 0.91", "positive"], Heatmap(colourmap="jet", alpha=0.6))
    assert picture.shape == (224, 224, 3) and picture.dtype == np.uint8
    colour = np.abs(picture.astype(int) - picture.mean(axis=2, keepdims=True)).sum(axis=2)  # away from grey
    bottom_right, bottom_left = colour[176:, 176:], colour[176:, :48]
    assert bottom_right.mean() > 5 * max(bottom_left.mean(), 1)
    assert png_bytes(picture).startswith(b"\x89PNG")
    assert not normalised(np.full((4, 4), -1.0)).any()


def test_report_orders_cards_and_lists_refusals():
    rec = record()
    rows = [
        {"path": "neg.png", "status": "ok", "decision": "negative", "label": "NORMAL", "p_COVID": 0.1, "p_NORMAL": 0.8,
         "p_VIRAL_PNEUMONIA": 0.1, "flagged": [], "age_group": "adult", "warning": "", "reason": ""},
        {"path": "pos.png", "status": "ok", "decision": "positive", "label": "COVID", "p_COVID": 0.8, "p_NORMAL": 0.1,
         "p_VIRAL_PNEUMONIA": 0.1, "flagged": ["COVID"], "age_group": "adult", "warning": "", "reason": ""},
        {"path": "<script>.png", "status": "ok", "decision": "uncertain", "label": "NORMAL", "p_COVID": 0.4,
         "p_NORMAL": 0.45, "p_VIRAL_PNEUMONIA": 0.15, "flagged": ["COVID"], "age_group": "child",
         "warning": "COVID was only ever seen in adult images", "reason": ""},
        {"path": "photo.jpg", "status": "rejected", "decision": "rejected", "label": "", "p_COVID": None,
         "p_NORMAL": None, "p_VIRAL_PNEUMONIA": None, "flagged": [], "age_group": "", "warning": "",
         "reason": "not a usable chest X-ray"},
        {"path": "broken.png", "status": "error", "decision": "error", "label": "", "p_COVID": None, "p_NORMAL": None,
         "p_VIRAL_PNEUMONIA": None, "flagged": [], "age_group": "", "warning": "", "reason": "truncated PNG"},
    ]
    png = png_bytes(np.zeros((8, 8, 3), np.uint8))
    pictures = {r["path"]: (png, png) for r in rows if r["status"] == "ok"}
    html = render(rows, pictures, rec, "tiny 0.0.1 int8", "research aid, not a diagnostic device")
    order = [html.index(name) for name in ("pos.png", "&lt;script&gt;.png", "neg.png")]
    assert order == sorted(order)  # positive, uncertain, negative
    assert "<script>" not in html and "data:image/png;base64," in html and "http" not in html
    assert "truncated PNG" in html and "not a usable chest X-ray" in html and "not a diagnostic device" in html
    assert "COVID was only ever seen in adult images" in html
    assert priority(rows[1], rec) < priority(rows[2], rec) < priority(rows[0], rec)
