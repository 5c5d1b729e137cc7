"""`xray-edge train`: honest splits (planted duplicates and patients), the manifest API, thresholds,
augmentation, and tiny end-to-end runs on generated images with a random-weight VGG-19."""
import csv
import json
import shutil
from collections import defaultdict

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from xray_edge.cli import app
from xray_edge.contract import ModelRecord, Preprocessing
from xray_edge.decode import read_image
from xray_edge.preprocess import preprocess
from xray_edge.train import augment, thresholds
from xray_edge.train.data import DatasetError, dataset_classes, scan
from xray_edge.train.features import view_input
from xray_edge.train.manifest import load_split, read_manifest
from xray_edge.train.split import group_images, patient_key, stratified_group_split

CLASSES = ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]
# Files planted as duplicates of another image: (copy, original, kind).
PLANTED = [("COVID/copy-of-covid-0.png", "COVID/covid-0.png", "exact"),
           ("NORMAL/near-normal-0.png", "NORMAL/normal-0.png", "near"),
           ("VIRAL_PNEUMONIA/person3_virus_99.png", "VIRAL_PNEUMONIA/person3_virus_3.png", "patient")]
FAST = ["--weights", "none", "--size", "64", "--epochs", "15", "--lr", "1e-2", "--n-boot", "20"]


def _pattern(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Class-dependent picture: horizontal stripes, vertical stripes or a blob, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(3, 5)
    if cls == 0:
        img = 0.5 + 0.3 * np.sin(2 * np.pi * freq * yy + phase)
    elif cls == 1:
        img = 0.5 + 0.3 * np.sin(2 * np.pi * freq * xx + phase)
    else:
        cy, cx = rng.uniform(0.3, 0.7, 2)
        img = 0.2 + 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.03)
    return np.clip(img + rng.normal(0, 0.12, img.shape), 0, 1)


def _write(path, img):
    cv2.imwrite(str(path), np.round(img * 255).astype(np.uint8))


def make_dataset(root, n=10, size=48, seed=0):
    """n images per class; NORMAL alternates two origins in manifest.csv; plus the PLANTED files."""
    rng = np.random.default_rng(seed)
    rows = ["path,label,source,sha256"]
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            name = f"person{i}_virus_{i}.png" if cls == "VIRAL_PNEUMONIA" else f"{cls.lower()}-{i}.png"
            _write(root / cls / name, _pattern(c, rng, size))
            origin = ("adult/set" if i % 2 else "child/set") if cls == "NORMAL" else "other/set"
            rows.append(f"{cls}/{name},{cls},{origin}@0:{name},")
    shutil.copy(root / PLANTED[0][1], root / PLANTED[0][0])
    near = read_image(root / PLANTED[1][1]) * 0.97 + 0.02 + rng.normal(0, 0.01, (size, size))
    _write(root / PLANTED[1][0], np.clip(near, 0, 1))
    _write(root / PLANTED[2][0], _pattern(2, rng, size))  # another image of patient 3
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def train(*args):
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    return result


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    result = train(dataset, "--out", out, "--cache-dir", out / "cache", *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_planted_duplicates_and_patients_are_grouped(dataset):
    images, bits, thumbs = scan(dataset, CLASSES)
    groups, stats = group_images([im.path for im in images], [im.pixel_sha256 for im in images], bits, thumbs,
                                 hamming=8, ncc=0.95)
    group_of = {im.path: g for im, g in zip(images, groups)}
    for copy, original, _ in PLANTED:
        assert group_of[str(dataset / copy)] == group_of[str(dataset / original)], copy
    assert stats["exact_duplicate_links"] == 1 and stats["same_patient_links"] == 1
    assert stats["near_duplicate_pairs"] >= 2  # the near copy and the exact copy of another image
    assert stats["groups"] == len(images) - 3  # nothing else is merged


def test_patient_key():
    assert patient_key("/x/person1609_virus_2790.png") == patient_key("person1609_virus_2791.png") == "person1609"
    assert patient_key("IM-0429-0001-0002.png") == patient_key("IM-0429-0001.png") == "IM-429"
    assert patient_key("NORMAL2-IM-0429-0001.png") == "NORMAL2-IM-429" != patient_key("IM-0429-0001.png")
    assert patient_key("COVID-12.png") is None


def test_stratified_group_split_keeps_groups_whole_and_is_seeded():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 150, 600)
    labels = groups % 3  # every group has one label
    a = stratified_group_split(labels, groups, 0.33, 0.15, seed=1)
    assert (a == stratified_group_split(labels, groups, 0.33, 0.15, seed=1)).all()
    assert (a != stratified_group_split(labels, groups, 0.33, 0.15, seed=2)).any()
    for g in np.unique(groups):
        assert len(set(a[groups == g])) == 1
    share = {s: np.mean(a == s) for s in ("train", "val", "test")}
    assert 0.25 < share["test"] < 0.42 and 0.1 < share["val"] < 0.24
    for s in share:
        assert set(labels[a == s]) == {0, 1, 2}


def test_unknown_folder_and_class_selection(tmp_path):
    for name in ("COVID", "NORMAL", "VIRAL_PNEUMONIA"):
        (tmp_path / name).mkdir()
    assert dataset_classes(tmp_path, ["NORMAL", "COVID"]) == ["COVID", "NORMAL"]  # contract order
    with pytest.raises(DatasetError, match="--classes names"):
        dataset_classes(tmp_path, ["COVID", "LUNG_OPACITY"])
    (tmp_path / "Lung_Opacity").mkdir()
    with pytest.raises(DatasetError, match=r"unknown class folder\(s\) \['Lung_Opacity'\]"):
        dataset_classes(tmp_path)
    result = train(tmp_path, "--weights", "none", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "Lung_Opacity" in result.output and "Traceback" not in result.output
    assert train(tmp_path, "--weights", "none", "--classes", "COVID,FLU").exit_code == 2


def test_weights_must_be_named(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("XRAY_EDGE_VGG19_WEIGHTS", raising=False)
    result = train(dataset, "--out", tmp_path)
    assert result.exit_code == 2 and "--weights" in result.output
    result = train(dataset, "--out", tmp_path, "--weights", tmp_path / "missing.h5", "--size", "32")
    assert result.exit_code == 2 and "missing.h5" in result.output and "Traceback" not in result.output


def test_bad_image_is_skipped_with_one_line(tmp_path, capsys):
    make_dataset(tmp_path, n=3)
    (tmp_path / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    images, _, _ = scan(tmp_path, CLASSES)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skip {tmp_path / 'COVID' / 'broken.png'}: ")
    assert len(images) == 3 * 3 + len(PLANTED)


def test_thresholds():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 1, 101)
    t = thresholds.sensitivity_threshold(pos, 0.95)
    assert np.mean(pos >= t) >= 0.95 and np.mean(pos >= np.nextafter(t, 1)) < 0.95
    scores = np.r_[rng.uniform(0, 0.6, 50), rng.uniform(0.4, 1, 50)]
    positive = np.r_[np.zeros(50, bool), np.ones(50, bool)]
    assert 0.35 < thresholds.youden_threshold(scores, positive) < 0.65
    probs = np.eye(3)[[0, 0, 1, 2]] * 0.7 + 0.1
    ops = thresholds.operating_points(probs, np.array([0, 1, 1, 2]), CLASSES, dict.fromkeys(CLASSES, 0.5), n_boot=10)
    assert ops["NORMAL"]["sensitivity"]["value"] == 0.5 and ops["COVID"]["specificity"]["value"] == pytest.approx(2 / 3)


def test_views_clean_for_0_and_seeded_augmentation(dataset):
    images, _, _ = scan(dataset, CLASSES)
    spec = Preprocessing(size=32)
    im = images[0]
    assert np.array_equal(view_input(im, 0, spec, seed=0), preprocess(read_image(im.path), spec))
    a1, b1 = view_input(im, 1, spec, seed=0), view_input(im, 1, spec, seed=0)
    assert np.array_equal(a1, b1)
    assert not np.array_equal(a1, view_input(im, 2, spec, seed=0))
    assert not np.array_equal(a1, view_input(im, 1, spec, seed=1))
    assert augment.augment(read_image(im.path), augment.view_rng(0, im.sha256, 1)).max() <= 1.0


def test_end_to_end_outputs(trained, dataset):
    for name in ("model.keras", "record.json", "split.csv", "metrics.json", "history_flatten.csv",
                 "history_gap.csv", "curves.png", "confusion_test.png"):
        assert (trained / name).is_file(), name
    rows = read_manifest(trained / "split.csv")
    by_path = {r["path"]: r for r in rows}
    splits_of_group = defaultdict(set)
    for r in rows:
        splits_of_group[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    for copy, original, _ in PLANTED:
        a, b = by_path[str(dataset / copy)], by_path[str(dataset / original)]
        assert a["group"] == b["group"] and a["split"] == b["split"]
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == set(CLASSES)
    test = load_split(trained / "split.csv", "test")
    assert len(test) == sum(r["split"] == "test" for r in rows)
    assert all(CLASSES[i] == by_path[p]["label"] for p, i in test)

    m = json.loads((trained / "metrics.json").read_text())
    record = ModelRecord.from_json((trained / "record.json").read_text())
    assert record.classes == CLASSES and record.preprocessing.size == 64
    assert record.temperature == m["temperature"] and set(record.thresholds) == set(CLASSES)
    assert record.data_manifest_sha256 == m["data"]["manifest_sha256"]
    assert set(m["heads"]) == {"flatten", "gap"}
    assert m["heads"][m["selected_head"]]["nll"] == min(h["nll"] for h in m["heads"].values())
    assert m["onnx_feature_check"]["passed"] and m["shipped_model_check"]["passed"]
    assert m["features"]["computed"] == len(rows) + sum(r["split"] == "train" for r in rows)  # 1 aug view
    assert m["test"]["n"] == len(test) and set(m["ece"]["test"]) == {"before", "after"}
    probe = m["shortcut_probe"]
    assert set(probe["normal_test_accuracy_by_origin"]) == {"adult/set", "child/set"}
    assert set(probe["normal_cross_origin"]) == {"adult/set", "child/set"}
    with open(trained / f"history_{m['selected_head']}.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert max(float(h["accuracy"]) for h in history) > 0.6  # learnable patterns: labels reach the head


def test_same_seed_same_split_and_metrics(trained, dataset, tmp_path):
    result = train(dataset, "--out", tmp_path, "--cache-dir", tmp_path / "cache", *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "split.csv").read_bytes() == (trained / "split.csv").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (trained, tmp_path))
    for key in ("heads", "selected_head", "temperature", "thresholds", "test", "val", "ece", "shortcut_probe"):
        assert a[key] == b[key], key


def test_class_subset_with_fine_tuning(dataset, tmp_path):
    result = train(dataset, "--out", tmp_path, "--cache-dir", tmp_path / "cache", "--classes", "NORMAL,COVID",
                   "--heads", "gap", "--fine-tune-epochs", "1", *FAST)
    assert result.exit_code == 0, result.output
    record = ModelRecord.from_json((tmp_path / "record.json").read_text())
    assert record.classes == ["COVID", "NORMAL"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["fine_tune_epochs_run"] == 1 and (tmp_path / "history_finetune.csv").is_file()
    assert m["shipped_model_check"]["passed"]
    assert {r["label"] for r in read_manifest(tmp_path / "split.csv")} == {"COVID", "NORMAL"}
