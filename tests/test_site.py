"""Site calibration: ``xray-edge calibrate`` fits a sealed profile from a folder of normals,
``classify --site`` (and ``$XRAY_EDGE_SITE``) applies it to every row, and a tampered, foreign or
malformed profile is refused in one line before any image is read."""
import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from images import as_uint8, write, xray_like
from tiny_model import make_tiny_onnx, tiny_record
from xray_edge import site
from xray_edge.cli import app
from xray_edge.contract import CLASSES, Gate
from xray_edge.pipeline import prepare
from xray_edge.session import load_model, predict

SIZE = 32
THRESHOLDS = {"COVID": 0.05, "VIRAL_PNEUMONIA": 0.5}


def invoke(*args, env=None):
    return CliRunner().invoke(app, [*map(str, args)], env=env)


@pytest.fixture
def model(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx", size=SIZE, record=tiny_record(SIZE, thresholds=THRESHOLDS))


@pytest.fixture
def normals(tmp_path):
    folder = tmp_path / "normals"
    folder.mkdir()
    for i in range(30):
        write(folder / f"n{i:02d}.png", as_uint8(xray_like(seed=100 + i)))
    return folder


def outputs(model_path, paths):
    m = load_model(model_path)
    return predict(m, np.stack([prepare(p, m.record.preprocessing).image for p in paths]))


def test_calibrate_writes_a_profile_that_classify_applies_to_every_row(tmp_path, model, normals):
    out = tmp_path / "site.json"
    result = invoke("calibrate", normals, "--out", out, "--model", model, "--name", "clinic-a", "--method", "threshold",
                    "-q")
    assert result.exit_code == 0, result.output
    profile = site.read_profile(out)
    assert profile.model_sha256 == load_model(model).sha256 and profile.method == "threshold"
    assert profile.counts["normals_used"] == 30 and profile.site == "clinic-a"
    probs = outputs(model, sorted(normals.iterdir())).probs
    expected = max(THRESHOLDS["COVID"], float(np.quantile(probs[:, 0], site.DEFAULT_QUANTILE)))
    assert profile.fitted.thresholds["COVID"] == pytest.approx(expected)
    assert profile.effect["normals"]["called_a_finding"] > profile.effect["normals_after"]["called_a_finding"]
    assert "normals called a finding" in result.stdout

    rows_out = tmp_path / "rows.csv"
    result = invoke("classify", normals, "-m", model, "--site", out, "-o", rows_out, "-q")
    assert result.exit_code == 0, result.output
    with open(rows_out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["site"] for r in rows} == {profile.label} and profile.label.startswith("clinic-a (threshold, ")
    def flags(thresholds):
        return [";".join(c for c in thresholds if p[CLASSES.index(c)] >= thresholds[c]) for p in probs]

    assert [r["flagged"] for r in rows] == flags(profile.fitted.thresholds)
    assert sum(map(bool, flags(profile.fitted.thresholds))) < sum(map(bool, flags(THRESHOLDS)))
    assert f"site profile: {profile.label}" in result.output

    env_out = tmp_path / "env.csv"
    result = invoke("classify", normals, "-m", model, "-o", env_out, "-q", env={"XRAY_EDGE_SITE": str(out)})
    assert result.exit_code == 0 and env_out.read_text() .count(profile.label) == 30
    plain = invoke("classify", normals, "-m", model, "-q")
    assert "no site profile" in plain.output


def test_too_few_normals_are_refused(tmp_path, model):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(site.MIN_NORMALS - 1):
        write(folder / f"n{i}.png", as_uint8(xray_like(seed=i)))
    (folder / "broken.png").write_bytes(b"not a png")
    result = invoke("calibrate", folder, "--out", tmp_path / "site.json", "--model", model, "--method", "threshold", "-q")
    assert result.exit_code == 2 and f"at least {site.MIN_NORMALS}" in result.output
    assert "not used: " in result.output and "broken.png" in result.output
    assert not (tmp_path / "site.json").exists() and "Traceback" not in result.output


@pytest.fixture
def profile(tmp_path, model, normals):
    out = tmp_path / "site.json"
    assert invoke("calibrate", normals, "--out", out, "--model", model, "--method", "threshold", "-q").exit_code == 0
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["fitted"]["thresholds"].update(COVID=0.99), "altered after calibration"),
    (lambda d: d.update(site="another clinic"), "altered after calibration"),
    (lambda d: d.update(schema="something else"), "not a site profile"),
    (lambda d: d.pop("digest"), "malformed site profile"),
])
def test_an_edited_or_malformed_profile_is_refused_before_any_image(tmp_path, model, normals, profile, damage, message):
    d = json.loads(profile.read_text())
    damage(d)
    profile.write_text(json.dumps(d))
    out = tmp_path / "rows.csv"
    result = invoke("classify", normals, "-m", model, "--site", profile, "-o", out)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists() and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["not json", '{"schema": "xray-edge/site-profile", "schema_version": 1, "x": NaN}',
                                  "[]", ""])
def test_garbage_profiles_are_refused(tmp_path, model, normals, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    result = invoke("classify", normals, "-m", model, "--site", bad)
    assert result.exit_code == 2 and str(bad) in result.output and "Traceback" not in result.output


def test_a_profile_of_another_model_is_refused(tmp_path, normals, profile):
    other = make_tiny_onnx(tmp_path / "other.onnx", size=SIZE, seed=5, record=tiny_record(SIZE, thresholds=THRESHOLDS))
    result = invoke("classify", normals, "-m", other, "--site", profile)
    assert result.exit_code == 2 and "fitted for tiny-test-model 0.0.1 fp32" in result.output
    assert invoke("classify", normals, "-m", other, "--site", tmp_path / "missing.json").exit_code == 2


def test_the_gate_is_recentred_on_the_site_within_its_cap(tmp_path, normals):
    """A site whose films all sit a little beyond the gate's limit is not rejected wholesale after
    calibration; an image far outside (half white, half black, like a page) still is."""
    model_out = tmp_path / "gated.onnx"
    d = outputs(make_tiny_onnx(tmp_path / "probe.onnx", size=SIZE), sorted(normals.iterdir())).ood
    limit = float(np.max(d)) / 1.8  # the site's films: up to 1.8x the limit (spread 0.5-1 of the largest)
    make_tiny_onnx(model_out, size=SIZE, record=tiny_record(SIZE, thresholds=THRESHOLDS,
                                                            gate=Gate(threshold=limit, quantile=0.99)))
    (tmp_path / "blank").mkdir()
    blank = write(tmp_path / "blank" / "page.png", np.repeat([[255], [0]], 32, axis=0).repeat(64, axis=1).astype(np.uint8))
    before = invoke("classify", normals, blank, "-m", model_out, "-q")
    assert before.output.count("REJECTED") > 15
    out = tmp_path / "site.json"
    result = invoke("calibrate", normals, "--out", out, "--model", model_out, "--method", "threshold", "-q")
    assert result.exit_code == 0, result.output
    fitted = site.read_profile(out).fitted
    assert limit < fitted.gate_threshold <= site.GATE_CAP * limit
    after = invoke("classify", normals, blank, "-m", model_out, "--site", out, "-q")
    rejected = [line.split()[0] for line in after.output.splitlines() if "REJECTED" in line]
    assert any(name.endswith("page.png") for name in rejected) and len(rejected) <= 2  # the gate quantile: 0.99


def test_alignment_moves_the_sites_normals_to_the_training_normals(tmp_path):
    """A site whose films are brighter on one side (its machine's processing): --method align fits a
    scale and shift per pooled feature; classify --site feeds them to the model's site inputs and
    gives exactly what the model gives with them, and the site's normals land nearer the training
    normals (smaller gate distances)."""
    model = make_tiny_onnx(tmp_path / "aligned.onnx", size=SIZE, record=tiny_record(SIZE, thresholds=THRESHOLDS),
                           site=True)
    folder = tmp_path / "site"
    folder.mkdir()
    ramp = np.linspace(0.0, 0.35, 80)[None, :]  # this site's films: brighter towards the right
    for i in range(30):
        write(folder / f"n{i:02d}.png", as_uint8(np.clip(xray_like(seed=200 + i) * 0.65 + ramp, 0, 1)))
    out = tmp_path / "site.json"
    result = invoke("calibrate", folder, "--out", out, "--model", model, "--method", "align", "-q")
    assert result.exit_code == 0, result.output
    profile = site.read_profile(out)
    scale, shift = np.array(profile.fitted.scale), np.array(profile.fitted.shift)
    assert scale.shape == shift.shape == (16,) and not np.allclose(shift, 0)

    paths = sorted(folder.iterdir())
    m = load_model(model)
    x = np.stack([prepare(p, m.record.preprocessing).image for p in paths])
    plain, aligned = predict(m, x, pooled=True), predict(m, x, alignment=(scale, shift))
    assert aligned.ood.mean() < plain.ood.mean()  # nearer the training normals' centre
    rows_out = tmp_path / "rows.jsonl"
    assert invoke("classify", folder, "-m", model, "--site", out, "-o", rows_out, "-q").exit_code == 0
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    np.testing.assert_allclose([[r[f"p_{c}"] for c in CLASSES] for r in rows], aligned.probs, atol=2e-6)
    assert {r["site"] for r in rows} == {profile.label} and "(align, " in profile.label


def test_alignment_needs_a_model_with_site_inputs(tmp_path, model, normals):
    result = invoke("calibrate", normals, "--out", tmp_path / "site.json", "--model", model, "--method", "align", "-q")
    assert result.exit_code == 2 and "cannot align features" in result.output and "Traceback" not in result.output
