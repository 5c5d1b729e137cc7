"""The lung-field crop (``xray_edge.lungs``): the box from a mask, the shipped lung model on an
X-ray-like image, and a lung-crop model through ``xray-edge classify`` (its lung model pinned)."""
import csv
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import xray_edge.lungs as lungs
from images import as_uint8, write, xray_like
from tiny_model import make_tiny_onnx, tiny_record
from xray_edge.cli import app
from xray_edge.contract import ModelContractError, Preprocessing, sha256_file
from xray_edge.recipe import LungCrop
from xray_edge.pipeline import NO_LUNGS, prepare
from xray_edge.preprocess import preprocess
from xray_edge.decode import read_image
from xray_edge.session import load_model, predict_proba
from xray_edge.train.lungs import FILE, installed_spec

SIZE = 32
SHIPPED = FILE  # the lung model in xray_edge.models


def test_the_mask_keeps_the_two_largest_regions():
    probs = np.zeros((20, 20))
    probs[2:18, 2:8] = probs[2:18, 12:18] = 0.9  # two lungs
    probs[0, 10] = 0.9  # a speck
    mask = lungs.lung_mask(probs, 0.5)
    assert mask.sum() == 2 * 16 * 6 and not mask[0, 10]


def test_the_box_mirrors_a_missed_lung_and_adds_the_margin():
    mask = np.zeros((100, 100), bool)
    mask[20:80, 10:40] = True  # only the right lung (image left) found
    spec = LungCrop(model=SHIPPED, sha256="0" * 64, margin=0.1, min_area=0.05)
    box = lungs.box_of(mask, (200, 300), spec)
    expected = ((0.2 - 0.06) * 200, (0.8 + 0.06) * 200, (0.1 - 0.08) * 300, (0.9 + 0.08) * 300)  # mirrored: 0.1-0.9
    assert np.abs(np.array(box) - expected).max() < 1.01, box  # pixel rounding
    assert lungs.box_of(np.zeros((100, 100), bool), (200, 300), spec) is None  # no lungs: no crop


def test_the_shipped_lung_model_finds_the_lungs_of_an_xray_like_image():
    grey = xray_like(400, 360, seed=3)  # dark lung fields: rows 0.2-0.8 of the height, columns 0.15-0.85
    top, bottom, left, right = lungs.lung_finder(installed_spec())(grey)
    assert top <= 0.2 * 400 and 0.8 * 400 <= bottom < 0.9 * 400, (top, bottom)  # both fields, not the belly
    assert left <= 0.15 * 360 and right >= 0.85 * 360, (left, right)


@pytest.fixture
def crop_model(tmp_path):
    pre = Preprocessing(size=SIZE, lung_crop=installed_spec(), crop_fraction=0.0)
    return make_tiny_onnx(tmp_path / "crop.onnx", size=SIZE, record=tiny_record(SIZE, preprocessing=pre))


def test_classify_crops_to_the_lungs_before_the_model(tmp_path, crop_model):
    (tmp_path / "in").mkdir()
    path = write(tmp_path / "in" / "a.png", as_uint8(xray_like(400, 360, seed=3)))
    model = load_model(crop_model)
    spec = model.record.preprocessing
    grey = read_image(path)
    expected = preprocess(grey, spec, lung_box=lungs.lung_finder(spec.lung_crop))
    np.testing.assert_allclose(prepare(path, spec).image, expected, atol=1e-6)
    assert np.abs(expected - preprocess(grey, Preprocessing(size=SIZE, crop_fraction=0.0))).max() > 0.1  # it cropped
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["classify", str(tmp_path / "in"), "--model", str(crop_model), "--output", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    got = [row[f"p_{c}"] for c in model.classes]
    np.testing.assert_allclose(got, predict_proba(model, expected[None])[0], atol=2e-6)
    assert NO_LUNGS not in row["warning"]


def test_an_image_without_lungs_is_classified_whole_with_a_warning(tmp_path, crop_model):
    (tmp_path / "in").mkdir()
    ramp = np.tile(np.linspace(0, 1, 300)[:, None], (1, 300))  # top to bottom: no lung fields in it
    path = write(tmp_path / "in" / "ramp.png", as_uint8(ramp))
    spec = load_model(crop_model).record.preprocessing
    assert lungs.lung_finder(spec.lung_crop)(read_image(path)) is None
    np.testing.assert_allclose(prepare(path, spec).image, preprocess(read_image(path), Preprocessing(
        size=SIZE, crop_fraction=0.0)), atol=1e-6)  # the whole image
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["classify", str(tmp_path / "in"), "--model", str(crop_model), "--output", str(out)])
    with open(out, newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "ok" and NO_LUNGS in row["warning"], (row, result.output)


def test_a_lung_model_that_is_not_the_pinned_file_is_refused(tmp_path, monkeypatch):
    pre = Preprocessing(size=SIZE, lung_crop=installed_spec(), crop_fraction=0.0)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(lungs.model_path(LungCrop(model=SHIPPED)), models / SHIPPED)
    with open(models / SHIPPED, "ab") as f:
        f.write(b"\0")  # one byte more: another file
    monkeypatch.setattr(lungs, "model_path", lambda spec: models / spec.model)
    path = make_tiny_onnx(tmp_path / "crop.onnx", size=SIZE, record=tiny_record(SIZE, preprocessing=pre))
    with pytest.raises(ModelContractError, match="lung model's sha256 is not the one"):
        load_model(path)


def test_a_pinned_file_that_is_not_a_lung_model_is_refused(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    make_tiny_onnx(models / "other.onnx", size=SIZE)  # an ONNX model, but no lung model
    (models / "junk.onnx").write_bytes(b"not a protobuf")
    monkeypatch.setattr(lungs, "model_path", lambda spec: models / spec.model)
    for name, reason in (("other.onnx", "not a lung model"), ("junk.onnx", "cannot be loaded")):
        pre = Preprocessing(size=SIZE, crop_fraction=0.0, lung_crop=LungCrop(model=name, sha256=sha256_file(models / name)))
        path = make_tiny_onnx(tmp_path / f"crop-{name}", size=SIZE, record=tiny_record(SIZE, preprocessing=pre))
        with pytest.raises(ModelContractError, match=reason):
            load_model(path)
