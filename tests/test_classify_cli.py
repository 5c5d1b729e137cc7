"""`xray-edge classify` end to end through the real command line (typer CliRunner), asserting on
the CSV / JSON / JSONL it writes, exit codes, resume after interruption, and that it runs
without TensorFlow or onnx."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

import xray_edge.classify as classify_module
import xray_edge.pipeline as pipeline_module
from images import as_uint8, write, write_bad_corpus, write_good_set, xray_like
from tiny_model import make_tiny_onnx, tiny_record
from xray_edge.cli import app
from xray_edge.pipeline import prepare
from xray_edge.session import load_model, predict_proba

SIZE = 32
CLASSES = ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]
COLUMNS = ["path", "status", "decision", "label", "p_COVID", "p_NORMAL", "p_VIRAL_PNEUMONIA", "flagged", "age_group",
           "warning", "gate_score", "reason", "heatmap", "ms", "model", "site"]
THRESHOLDS = {"COVID": 0.01, "VIRAL_PNEUMONIA": 0.9}


def run(*args):
    return CliRunner().invoke(app, ["classify", *map(str, args)])


def read_rows(path):
    """Rows of a results file (a .csv.partial is CSV, other partial files are JSON lines)."""
    if path.name.endswith((".csv", ".csv.partial")):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.name.endswith((".jsonl", ".partial")):
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


@pytest.fixture
def model_path(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx", size=SIZE, record=tiny_record(SIZE, thresholds=THRESHOLDS))


@pytest.fixture
def good(tmp_path):
    return write_good_set(tmp_path / "good")


def expected_probs(model_path, paths):
    model = load_model(model_path)
    return predict_proba(model, np.stack([prepare(p, model.record.preprocessing).image for p in paths]))


def test_mixed_folder_gives_one_row_per_file(tmp_path, model_path, good):
    folder = tmp_path / "good"
    bad = write_bad_corpus(folder)
    (folder / "readme.txt").write_text("not an image, skipped by suffix")
    out = tmp_path / "results.csv"
    result = run(folder, "--model", model_path, "--output", out)
    assert result.exit_code == 1, result.output
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = {os.path.basename(r["path"]): r for r in read_rows(out)}
    assert set(rows) == {p.name for p in good} | set(bad)
    for name, reason in bad.items():
        assert rows[name]["status"] == rows[name]["decision"] == "error" and reason in rows[name]["reason"], rows[name]
        assert rows[name]["label"] == rows[name]["p_COVID"] == ""
        assert f"{name}" in result.stdout and reason in result.stdout  # the table names file and reason
    probs = expected_probs(model_path, good)
    for path, p in zip(good, probs):
        row = rows[path.name]
        assert row["status"] == "ok" and row["reason"] == "" and row["decision"] in ("positive", "negative", "uncertain")
        got = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        np.testing.assert_allclose(got, p, atol=2e-6)
        assert row["label"] == CLASSES[int(np.argmax(p))]
        flagged = [c for c in CLASSES if c in THRESHOLDS and p[CLASSES.index(c)] >= THRESHOLDS[c]]
        assert row["flagged"] == ";".join(flagged)
        assert float(row["ms"]) > 0 and row["model"] == "tiny-test-model 0.0.1 fp32"
    assert any(r["flagged"] for r in rows.values()) and not all(r["flagged"] for r in rows.values())
    assert "research screening aid" in result.stdout
    assert f"{len(good)} classified (" in result.stdout and f"0 rejected, {len(bad)} failed" in result.stdout
    assert "1 non-image files skipped" in result.stdout
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "results.csv", "tiny.onnx"]  # no temp files


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_outputs_match_csv(tmp_path, model_path, good, suffix):
    csv_out, other = tmp_path / "r.csv", tmp_path / f"r{suffix}"
    assert run(tmp_path / "good", "-m", model_path, "-o", csv_out, "-q").exit_code == 0
    result = run(tmp_path / "good", "-m", model_path, "-o", other, "-q", "--batch-size", 3)
    assert result.exit_code == 0, result.output
    rows = read_rows(other)
    assert [list(r) for r in rows] == [COLUMNS] * len(good)
    for a, b in zip(read_rows(csv_out), rows):
        assert a["path"] == b["path"] and b["status"] == "ok" and isinstance(b["flagged"], list)
        for c in CLASSES:
            assert abs(float(a[f"p_{c}"]) - b[f"p_{c}"]) <= 2e-6
    assert not (tmp_path / f"r{suffix}.partial").exists()


def test_batch_size_does_not_change_results(tmp_path, model_path, good):
    outs = [tmp_path / "b1.jsonl", tmp_path / "b5.jsonl"]
    for out, size in zip(outs, (1, 5)):
        assert run(tmp_path / "good", "-m", model_path, "-o", out, "--batch-size", size, "--threads", 1).exit_code == 0
    for a, b in zip(*(read_rows(o) for o in outs)):
        assert a["path"] == b["path"]
        np.testing.assert_allclose([a[f"p_{c}"] for c in CLASSES], [b[f"p_{c}"] for c in CLASSES], atol=2e-6)


def test_recursive_and_explicit_files(tmp_path, model_path):
    top = tmp_path / "study"
    (top / "series").mkdir(parents=True)
    write(top / "a.png", as_uint8(xray_like(seed=1)))
    write(top / "series" / "b.png", as_uint8(xray_like(seed=2)))
    write(top / ".hidden.png", as_uint8(xray_like(seed=3)))
    extra = write(tmp_path / "c.tiff", as_uint8(xray_like(seed=4)))
    out = tmp_path / "r.jsonl"
    assert run(top, extra, top / "a.png", "-m", model_path, "-o", out).exit_code == 0
    assert [os.path.basename(r["path"]) for r in read_rows(out)] == ["a.png", "c.tiff"]  # a.png once
    assert run(top, "--recursive", "-m", model_path, "-o", out).exit_code == 0
    assert [os.path.basename(r["path"]) for r in read_rows(out)] == ["a.png", "b.png"]


def test_extensionless_dicom_is_found_in_folders(tmp_path, model_path, good):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "IM000001").write_bytes((tmp_path / "good" / "g_mono2.dcm").read_bytes())
    (folder / "LICENSE").write_text("plain text without a suffix")
    out = tmp_path / "r.csv"
    result = run(folder, "-m", model_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert [(os.path.basename(r["path"]), r["status"]) for r in read_rows(out)] == [("IM000001", "ok")]


def usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_usage_errors_exit_2_with_one_line(tmp_path, model_path, good):
    folder = tmp_path / "good"
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 50)
    bare = make_tiny_onnx(tmp_path / "bare.onnx", size=SIZE, with_record=False)
    usage_error(run(empty, "-m", model_path), "no images found", "--recursive")
    usage_error(run(tmp_path / "nowhere", "-m", model_path), "no such file or folder", "nowhere")
    usage_error(run(folder, "-m", bare), "not an xray-edge model", "bare.onnx")
    usage_error(run(folder, "-m", junk), "not a loadable ONNX model", "junk.onnx")
    usage_error(run(folder, "-m", tmp_path / "absent.onnx"), "model file not found")
    usage_error(run(folder, "-m", model_path, "-o", tmp_path / "r.xlsx"), ".csv, .json or .jsonl")
    usage_error(run(folder, "-m", model_path, "--resume"), "--resume needs --output")
    assert not list(tmp_path.glob("r.*"))


def test_missing_shipped_model_says_how_to_get_one(tmp_path, good, monkeypatch):
    monkeypatch.setattr(classify_module, "shipped_model", lambda: None)
    usage_error(run(tmp_path / "good"), "xray-edge train", "xray-edge export", "--model")


def test_progress_bar_on_stderr_unless_quiet(tmp_path, model_path, good):
    loud = run(tmp_path / "good", "-m", model_path)
    quiet = run(tmp_path / "good", "-m", model_path, "--quiet")
    assert loud.exit_code == quiet.exit_code == 0
    assert "classifying" in loud.stderr and quiet.stderr == ""
    assert quiet.stdout.splitlines()[0].split()[:3] == ["file", "decision", "prediction"]


def interrupt_after(monkeypatch, calls: int, partial):
    """Make the model raise KeyboardInterrupt (Ctrl-C) on its ``calls + 1``-th batch; returns a
    list of (batch size, lines already on disk in ``partial``) for each model call."""
    real, seen = pipeline_module.predict, []

    def flaky(model, batch, cam=False):
        seen.append((len(batch), len(partial.read_text().splitlines())))
        if len(seen) > calls:
            raise KeyboardInterrupt
        return real(model, batch, cam)

    monkeypatch.setattr(pipeline_module, "predict", flaky)
    return seen


def test_interrupted_run_keeps_flushed_batches_and_resumes(tmp_path, model_path, good, monkeypatch):
    out, partial = tmp_path / "results.csv", tmp_path / "results.csv.partial"
    out.write_text("an older results file that must survive an interrupted run\n")
    seen = interrupt_after(monkeypatch, 2, partial)
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--batch-size", 3)
    assert result.exit_code == 130
    assert "--resume" in result.stderr
    assert seen == [(3, 1), (3, 4), (len(good) - 6, 7)]  # each batch is on disk before the next runs
    assert out.read_text().startswith("an older results file")  # not clobbered
    kept = read_rows(partial)
    assert [os.path.basename(r["path"]) for r in kept] == [p.name for p in good[:6]]

    monkeypatch.undo()
    seen = interrupt_after(monkeypatch, 99, partial)
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--batch-size", 3, "--resume")
    assert result.exit_code == 0, result.output
    assert seen == [(len(good) - 6, 7)]  # only the missing files went through the model
    rows = read_rows(out)
    assert [os.path.basename(r["path"]) for r in rows] == [p.name for p in good]
    assert rows[:6] == kept
    assert "6 already done" in result.stdout
    assert not partial.exists()


def test_resume_from_partial_with_cut_line_and_error_rows(tmp_path, model_path, good):
    out = tmp_path / "results.jsonl"
    assert run(tmp_path / "good", "-m", model_path, "-o", out, "-q").exit_code == 0
    full = read_rows(out)
    out.unlink()
    kept = [dict(r) for r in full[:3]]
    kept[0]["p_COVID"] = 0.123456  # a marker: a re-classified file would not keep it
    failed = dict(full[3], status="error", decision="error", label="", reason="cannot read file (I/O error)",
                  **{f"p_{c}": None for c in CLASSES})
    lines = [json.dumps(r) for r in [*kept, failed]] + [json.dumps(full[4])[:40]]  # killed mid-line
    (tmp_path / "results.jsonl.partial").write_text("\n".join(lines))
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--resume", "-q")
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in full)  # each file once
    assert rows[:3] == kept
    assert {r["path"]: r for r in rows}[full[3]["path"]]["status"] == "ok"  # error row retried
    assert f"{len(full) - 3} classified (" in result.stdout


def test_resume_after_finished_json_only_runs_new_files(tmp_path, model_path, good):
    out = tmp_path / "results.json"
    assert run(tmp_path / "good", "-m", model_path, "-o", out).exit_code == 0
    before = read_rows(out)
    write(tmp_path / "good" / "z_new.png", as_uint8(xray_like(seed=42)))
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert rows[: len(before)] == before and len(rows) == len(before) + 1
    assert rows[-1]["path"].endswith("z_new.png") and rows[-1]["status"] == "ok"
    assert "1 classified (" in result.stdout and "0 rejected, 0 failed" in result.stdout


def test_resume_refuses_results_of_another_model(tmp_path, model_path, good):
    out = tmp_path / "results.csv"
    assert run(tmp_path / "good", "-m", model_path, "-o", out).exit_code == 0
    other = make_tiny_onnx(tmp_path / "other.onnx", size=SIZE, record=tiny_record(SIZE, model_version="9.9.9"))
    usage_error(run(tmp_path / "good", "-m", other, "-o", out, "--resume"), "another model")


def test_classify_never_imports_tensorflow_or_onnx(tmp_path, model_path, good):
    write_bad_corpus(tmp_path / "good")
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from xray_edge.cli import app
        result = CliRunner().invoke(app, ["classify", {str(tmp_path / 'good')!r}, "-m", {str(model_path)!r},
                                          "-o", {str(tmp_path / 'r.csv')!r}])
        assert result.exit_code == 1, result.output
        heavy = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter_common", "sklearn", "matplotlib", "ray",
                 "pyarrow", "pandas")
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert len(read_rows(tmp_path / "r.csv")) >= len(good) + 10


def evidence_model(tmp_path, **record):
    """A tiny model that calls COVID on brightness in the top-left cell only, with an input gate
    (distance of the 4x4 cells to 0.5 above 1.5 is rejected)."""
    from xray_edge.contract import Gate

    weights = np.zeros((16, 3), np.float32)
    weights[0, 0] = 40.0  # cell (0, 0): COVID
    rec = tiny_record(SIZE, thresholds={"COVID": 0.5}, abstain_margin=0.05,
                      gate=Gate(threshold=1.5, quantile=0.99, feature="cells"), **record)
    return make_tiny_onnx(tmp_path / "evidence.onnx", size=SIZE, record=rec, weights=weights,
                          bias=np.array([-30.0, 0.0, -30.0]))


def lit(cell_value: float, size: int = 96, seed: int = 0) -> np.ndarray:
    """A grey image with noise, its top-left quarter at ``cell_value``."""
    img = np.clip(0.5 + np.random.default_rng(seed).normal(0, 0.2, (size, size)), 0, 1)
    img[: size // 4 + 4, : size // 4 + 4] = cell_value
    return img


def test_heatmaps_report_and_gate(tmp_path):
    import cv2

    model = evidence_model(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "covid.png", as_uint8(lit(1.0)))
    write(folder / "normal.png", as_uint8(lit(0.5, seed=1)))
    half = np.zeros((96, 96))
    half[:, 48:] = 1.0
    half[:2, :2] = 0.5
    write(folder / "photo.png", as_uint8(half))  # far from every training-like image: rejected
    write(folder / "blank.png", np.zeros((64, 64), np.uint8))
    out, maps, report = tmp_path / "r.csv", tmp_path / "maps", tmp_path / "report.html"
    result = run(folder, "-m", model, "-o", out, "--heatmaps", maps, "--report", report)
    assert result.exit_code == 1, result.output  # the photo is rejected and the blank image refused
    rows = {os.path.basename(r["path"]): r for r in read_rows(out)}
    assert rows["covid.png"]["decision"] == "positive" and rows["covid.png"]["flagged"] == "COVID"
    assert rows["normal.png"]["decision"] == "negative" and rows["normal.png"]["label"] == "NORMAL"
    assert rows["photo.png"]["status"] == "rejected" and rows["photo.png"]["label"] == rows["photo.png"]["p_COVID"] == ""
    assert "not a usable chest X-ray" in rows["photo.png"]["reason"] and float(rows["photo.png"]["gate_score"]) > 1
    assert rows["blank.png"]["status"] == "error" and "no image content" in rows["blank.png"]["reason"]
    picture = cv2.imread(rows["covid.png"]["heatmap"])
    assert picture.shape == (2 * SIZE, 2 * SIZE, 3) and rows["photo.png"]["heatmap"] == ""
    colour = np.abs(picture.astype(int) - picture.mean(axis=2, keepdims=True)).sum(axis=2)
    h = picture.shape[0]
    assert colour[h // 4 : h // 2, : h // 4].mean() > 3 * colour[h // 2 :, h // 2 :].mean()  # heat where COVID was read
    assert sorted(p.name.split(".")[0] for p in maps.iterdir()) == ["covid", "normal"]
    html = report.read_text()
    assert html.index("covid.png") < html.index("normal.png") < html.index("photo.png")
    assert html.count("data:image/png;base64,") == 4 and "src=\"http" not in html
    assert "no image content" in html and "not a diagnostic device" in html
    assert "1 rejected, 1 failed" in result.stdout and f"heatmaps: {maps}" in result.stdout


def test_a_tie_is_reported_uncertain(tmp_path, good):
    tie = make_tiny_onnx(tmp_path / "tie.onnx", size=SIZE, weights=np.zeros((16, 3)), bias=np.zeros(3),
                         record=tiny_record(SIZE, thresholds={"COVID": 0.5}))
    out = tmp_path / "r.jsonl"
    assert run(tmp_path / "good", "-m", tie, "-o", out).exit_code == 0
    assert {r["decision"] for r in read_rows(out)} == {"uncertain"}


def test_heatmaps_need_a_model_with_a_cam_output(tmp_path, good):
    import onnx

    plain = make_tiny_onnx(tmp_path / "plain.onnx", size=SIZE, record=tiny_record(SIZE, heatmap=None))
    proto = onnx.load(str(plain))
    del proto.graph.output[3]  # no cam output, and a record that names none
    from xray_edge.contract import Outputs, attach_record

    attach_record(proto, tiny_record(SIZE, heatmap=None, outputs=Outputs(age_logits="age_logits",
                                                                         ood_distance="ood_distance")))
    onnx.save(proto, str(plain))
    usage_error(run(tmp_path / "good", "-m", plain, "--heatmaps", tmp_path / "maps"), "no heatmap output")
    usage_error(run(tmp_path / "good", "-m", make_tiny_onnx(tmp_path / "t.onnx", size=SIZE), "--report",
                    tmp_path / "r.txt"), "--report must name an .html file")
