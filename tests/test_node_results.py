"""What the node makes of a received radiograph, run in the test process with tiny models: the
row is the one ``xray-edge classify`` writes for the same file, and the structured report and
heatmap image (highdicom) say it, in the source's study, referencing it."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")

from node_peers import classify_in_process, ledger_rows, radiograph, report_content as content  # noqa: E402
from images import as_uint8, write, xray_like  # noqa: E402
from tiny_model import make_tiny_onnx, tiny_record  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from xray_edge.classify import open_model  # noqa: E402
from xray_edge.cli import app  # noqa: E402
from xray_edge.contract import Gate  # noqa: E402

FLAT = np.zeros((16, 3), np.float32)  # the class comes from the biases alone


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"covid": make_tiny_onnx(folder / "covid.onnx", weights=FLAT, bias=[6, 0, 0]),
            "normal": make_tiny_onnx(folder / "normal.onnx", weights=FLAT, bias=[0, 6, 0]),
            "gated": make_tiny_onnx(folder / "gated.onnx", record=tiny_record(gate=Gate(threshold=1e-9)))}


def run_node(tmp_path, model_path, ds, site=None):
    """Spool ``ds`` as the SCP would, classify it as the node does; (ledger row, SR, SC or None)."""
    classify_in_process(tmp_path / "spool", model_path, [ds], site=site)
    (row,) = ledger_rows(tmp_path / "spool")
    sr = pydicom.dcmread(row["sr_path"]) if row["sr_path"] else None
    sc = pydicom.dcmread(row["sc_path"]) if row["sc_path"] else None
    return row, sr, sc


def test_the_node_writes_the_row_classify_writes_for_the_same_file(tmp_path, models):
    ds = radiograph("CR", 1)
    row, _, _ = run_node(tmp_path, models["covid"], ds)
    out = tmp_path / "classify.json"
    result = CliRunner().invoke(app, ["classify", row["path"], "--model", str(models["covid"]), "--output", str(out),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    (expected,) = json.loads(out.read_text())
    node_row = json.loads(row["row"])
    assert {k: v for k, v in node_row.items() if k != "ms"} == {k: v for k, v in expected.items() if k != "ms"}


def test_a_site_profile_is_applied_as_classify_applies_it(tmp_path, models):
    normals = tmp_path / "normals"
    normals.mkdir()
    for i in range(30):
        write(normals / f"n{i:02d}.png", as_uint8(xray_like(seed=100 + i)))
    profile = tmp_path / "site.json"
    result = CliRunner().invoke(app, ["calibrate", str(normals), "--out", str(profile), "--model",
                                      str(models["covid"]), "--name", "clinic-a", "--method", "threshold", "-q"])
    assert result.exit_code == 0, result.output
    row, sr, _ = run_node(tmp_path, models["covid"], radiograph("CR", 7), site=profile)
    out = tmp_path / "classify.json"
    result = CliRunner().invoke(app, ["classify", row["path"], "--model", str(models["covid"]), "--site", str(profile),
                                      "--output", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    (expected,) = json.loads(out.read_text())
    node_row = json.loads(row["row"])
    assert node_row["site"].startswith("clinic-a (") and node_row["site"] == expected["site"]
    assert {k: v for k, v in node_row.items() if k != "ms"} == {k: v for k, v in expected.items() if k != "ms"}
    assert f"site profile {node_row['site']}" in content(sr)["Algorithm Parameters"]


def test_report_and_heatmap_of_a_flagged_image(tmp_path, models):
    ds = radiograph("DX", 2)
    row, sr, sc = run_node(tmp_path, models["covid"], ds)
    decided = json.loads(row["row"])
    assert (row["state"], decided["decision"], decided["label"], decided["flagged"]) == (
        "classified", "positive", "COVID", ["COVID"])
    # the same study and patient, a series of its own, marked as unverified research output
    for result in (sr, sc):
        assert (result.StudyInstanceUID, result.PatientID) == (ds.StudyInstanceUID, ds.PatientID)
        assert result.SeriesInstanceUID != ds.SeriesInstanceUID and result.ContentQualification == "RESEARCH"
        assert "not for diagnostic use" in result.SeriesDescription
    assert sr.SOPClassUID.name == "Comprehensive SR Storage" and sr.VerificationFlag == "UNVERIFIED"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    items = content(sr)
    assert items["Source of Measurement"] == [ds.SOPInstanceUID]
    assert items["Screening decision"] == ["Finding flagged: look at this image first"]
    assert items["Most likely class"] == items["Finding"] == ["COVID-19 radiographic pattern"]
    assert items["Input gate"] == ["The model has no input gate"]
    probabilities = {k: v[0] for k, v in items.items() if k.startswith("Probability: ")}
    assert probabilities == pytest.approx({"Probability: COVID-19 radiographic pattern": decided["p_COVID"],
                                           "Probability: No radiographic finding": decided["p_NORMAL"],
                                           "Probability: Viral pneumonia radiographic pattern":
                                               decided["p_VIRAL_PNEUMONIA"]})
    model = open_model(model=models["covid"])
    assert items["Algorithm Name"] == ["tiny-test-model"] and items["Algorithm Version"] == ["0.0.1"]
    assert f"sha256 {model.sha256}" in items["Algorithm Parameters"]
    assert items["Intended use"] == ["Research screening aid, not for diagnostic use: every result needs a clinician."]
    # the heatmap: RGB, the decision and the disclaimer burned in, its source referenced
    assert (sc.SOPClassUID.name, sc.PhotometricInterpretation, sc.BurnedInAnnotation) == (
        "Secondary Capture Image Storage", "RGB", "YES")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID and "decision positive" in sc.DerivationDescription
    footer = sc.pixel_array[-60:]
    assert footer.max() == 255 and np.median(footer) == 0  # white text on the black footer


def test_a_normal_result_reads_no_radiographic_finding(tmp_path, models):
    row, sr, sc = run_node(tmp_path, models["normal"], radiograph("CR", 3))
    items = content(sr)
    assert items["Screening decision"] == ["No finding flagged: routine reading"]
    assert items["Most likely class"] == ["No radiographic finding"]
    assert items["Finding"] == ["No finding flagged"]
    assert "infection" not in str(sr).lower()
    assert sc is not None


def test_an_image_the_gate_rejects_gets_a_report_without_classes(tmp_path, models):
    row, sr, sc = run_node(tmp_path, models["gated"], radiograph("CR", 4))
    decided = json.loads(row["row"])
    assert (row["state"], decided["status"], sc, row["heat_path"]) == ("classified", "rejected", None, "")
    items = content(sr)
    assert items["Screening decision"] == ["Not assessed: not an image the model was built for"]
    assert items["Input gate"] == ["Rejected: unlike the X-rays the model was trained on"]
    assert items["Reason"] == [decided["reason"]] and "Most likely class" not in items
    assert not [k for k in items if k.startswith("Probability")]
    assert items["Input gate distance over its limit (above 1: rejected)"][0] > 1


def test_an_age_warning_is_in_the_report(tmp_path, models):
    row, _, _ = run_node(tmp_path / "first", models["covid"], radiograph("CR", 5))
    age = json.loads(row["row"])["age_group"]
    other = {"adult": "child", "child": "adult"}[age]
    seen = {"COVID": [other], "NORMAL": ["adult", "child"], "VIRAL_PNEUMONIA": ["adult", "child"]}
    unseen = make_tiny_onnx(tmp_path / "unseen.onnx", weights=FLAT, bias=[6, 0, 0],
                            record=tiny_record(seen_age_groups=seen))
    row, sr, _ = run_node(tmp_path / "second", unseen, radiograph("CR", 5))
    warning = json.loads(row["row"])["warning"]
    assert warning and content(sr)["Warning"] == [warning]
    assert content(sr)["Apparent age group"] == [age.capitalize()]


def test_an_unreadable_instance_fails_with_the_pipeline_reason(tmp_path, models):
    colour = radiograph("SC", 6)
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "RGB", 0
    colour.BitsAllocated = colour.BitsStored = 8
    colour.HighBit = 7
    colour.PixelData = np.zeros((96, 96, 3), np.uint8).tobytes()
    row, sr, sc = run_node(tmp_path, models["covid"], colour)
    assert row["state"] == "failed" and row["error"].startswith("colour DICOM")
    assert (sr, sc) == (None, None)
