"""`xray-edge train`: data roots with origins and groups, honest splits (planted duplicates,
patients, studies), weights, thresholds, the abstain band, cross-origin validation, the model's
extra outputs (Grad-CAM against TensorFlow's own gradients, the Mahalanobis gate), and a tiny
end-to-end run on generated images with a random-weight VGG-19."""
import csv
import json
from collections import defaultdict

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TRAIN_SIZE
from tiny_data import CLASSES, PLANTED, make_roots

from xray_edge.cli import app
from xray_edge.contract import ModelRecord, Preprocessing
from xray_edge.decode import read_image
from xray_edge.preprocess import preprocess
from xray_edge.train import augment, crossorigin, heads, ood, thresholds
from xray_edge.train.data import DatasetError, list_images, scan
from xray_edge.train.features import view_input
from xray_edge.train.manifest import load_split, read_manifest
from xray_edge.train.split import group_images, patient_key, stratified_group_split

FAST = ["--arch", "vgg-tiny", "--weights", "none", "--size", "32", "--epochs", "8", "--lr", "1e-2", "--n-boot", "20",
        "--child-origins", "kids", "--aug-views", "1"]


def train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_roots_give_origins_age_groups_and_relative_paths(roots):
    images, classes = list_images(roots, child_origins=("kids",))
    assert classes == CLASSES
    by_rel = {im.rel: im for im in images}
    assert by_rel["cxr/VIRAL_PNEUMONIA/person1_virus_1.png"].origin == "kids"
    assert by_rel["cxr/VIRAL_PNEUMONIA/person1_virus_1.png"].age_group == "child"
    assert by_rel["cxr/COVID/covid-2.png"].origin == "adults" and by_rel["cxr/COVID/covid-2.png"].age_group == "adult"
    clinic = by_rel["extra/NORMAL/clinic-3.jpg"]
    assert (clinic.origin, clinic.group, clinic.age_group) == ("clinic", "clinic:NORMAL1", "adult")
    assert not any("masks" in im.rel for im in images)
    assert {im.label for im in list_images(roots, ["NORMAL", "COVID"])[0]} == {"COVID", "NORMAL"}


def test_unknown_folder_without_manifest_and_unknown_class(tmp_path):
    for name in ("COVID", "NORMAL", "Lung_Opacity"):
        (tmp_path / "d" / name).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"unknown class folder\(s\) \['Lung_Opacity'\]"):
        list_images([tmp_path / "d"])
    result = train(tmp_path / "d", "--weights", "none", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Lung_Opacity" in result.output and "Traceback" not in result.output
    assert train(tmp_path / "d", "--weights", "none", "--classes", "COVID,FLU").exit_code == 2


def test_planted_duplicates_patients_and_studies_are_grouped(roots):
    images, bits, thumbs = scan(list_images(roots)[0])
    groups, stats = group_images([im.path for im in images], [im.pixel_sha256 for im in images], bits, thumbs,
                                 hamming=8, ncc=0.95, given=[im.group for im in images])
    group_of = {im.rel: g for im, g in zip(images, groups)}
    for copy, original, _ in PLANTED:
        assert group_of[f"cxr/{copy}"] == group_of[f"cxr/{original}"], copy
    assert group_of["extra/COVID/clinic-2.jpg"] == group_of["extra/COVID/clinic-3.jpg"]
    assert group_of["extra/COVID/clinic-3.jpg"] != group_of["extra/COVID/clinic-4.jpg"]
    assert stats["exact_duplicate_links"] == 1 and stats["same_patient_links"] == 1
    assert stats["manifest_group_links"] == 8  # 16 clinic images in studies of 2


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


def test_weights_must_be_named(roots, tmp_path, monkeypatch):
    monkeypatch.delenv("XRAY_EDGE_VGG19_WEIGHTS", raising=False)
    result = train(*roots, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--weights" in result.output
    result = train(*roots, "--out", tmp_path / "b", "--weights", tmp_path / "missing.h5", "--size", "32")
    assert result.exit_code == 2 and "missing.h5" in result.output and "Traceback" not in result.output


def test_existing_results_are_not_overwritten_without_force(roots, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    result = train(*roots, "--out", tmp_path, *FAST)
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_bad_image_is_skipped_with_one_line(tmp_path, capsys):
    (cxr, _) = make_roots(tmp_path, n=3)
    (cxr / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with (cxr / "manifest.csv").open("a") as f:
        f.write("COVID/broken.png,COVID,adults/set@0:b,\n")
    images, _, _ = scan(list_images([cxr])[0])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skip {cxr / 'COVID' / 'broken.png'}: ")
    assert len(images) == 3 * 3 + len(PLANTED)


def test_thresholds_only_for_findings_and_abstain_margin():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 1, 101)
    t = thresholds.sensitivity_threshold(pos, 0.95)
    assert np.mean(pos >= t) >= 0.95 and np.mean(pos >= np.nextafter(t, 1)) < 0.95
    probs = np.eye(3)[[0, 0, 1, 2]] * 0.7 + 0.1
    chosen = thresholds.choose_thresholds(probs, np.array([0, 1, 1, 2]), CLASSES, 0.95)
    assert set(chosen) == {"COVID", "VIRAL_PNEUMONIA"}
    # 100 images: the 10 least certain are wrong; refusing them brings accuracy to 1.0
    probs = np.tile([[0.8, 0.1, 0.1]], (100, 1))
    probs[:10] = [0.45, 0.4, 0.15]
    y = np.r_[np.ones(10, int), np.zeros(90, int)]
    margin = thresholds.choose_abstain_margin(probs, y, 0.99)
    assert margin == pytest.approx(0.05)
    effect = thresholds.abstain_effect(probs, y, CLASSES, {"COVID": 0.5}, margin)
    assert effect["uncertain"] == 10 and effect["accuracy_decided"] == 1.0
    assert effect["findings"]["COVID"]["ppv_all"] == effect["findings"]["COVID"]["ppv_decided"] == 1.0
    assert thresholds.choose_abstain_margin(probs[10:], y[10:], 0.99) == 0.0


def test_sample_weights_count_origins_not_images():
    y = np.array([0] * 90 + [0] * 10 + [1] * 50)
    origins = np.array(["a"] * 90 + ["b"] * 10 + ["a"] * 50)
    w = heads.sample_weights(y, origins, by_origin=True)
    assert w[:90].sum() == pytest.approx(w[90:100].sum()) == pytest.approx(w[100:].sum() / 2)
    assert w.mean() == pytest.approx(1.0)
    plain = heads.sample_weights(y, origins, by_origin=False)
    assert plain[:100].sum() == pytest.approx(plain[100:].sum()) and plain[0] == plain[95]


def test_views_clean_for_0_and_seeded_augmentation(roots):
    images, _ = list_images(roots)
    images, _, _ = scan(images[:1])
    spec, im = Preprocessing(size=32), images[0]
    assert np.array_equal(view_input(im, 0, spec, seed=0), preprocess(read_image(im.path), spec))
    for recipe in augment.RECIPES:
        a1 = view_input(im, 1, spec, seed=0, recipe=recipe)
        assert np.array_equal(a1, view_input(im, 1, spec, seed=0, recipe=recipe))
        assert not np.array_equal(a1, view_input(im, 2, spec, seed=0, recipe=recipe))
        assert not np.array_equal(a1, view_input(im, 1, spec, seed=1, recipe=recipe))
        out = augment.augment(read_image(im.path), augment.view_rng(0, im.sha256, 1), recipe)
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1.0


def test_holdable_origins_and_fold_report():
    labels = np.array([0, 0, 1, 1, 1, 2])
    origins = np.array(["a", "b", "a", "b", "k", "k"])
    assert crossorigin.holdable_origins(labels, origins, 3) == ["a", "b"]  # k alone has class 2
    probs = np.eye(3)[[0, 1, 1]]
    report = crossorigin.fold_report(np.array([0, 0, 1]), probs, CLASSES)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert report["per_class"]["COVID"]["sensitivity"]["value"] == 0.5
    assert report["per_class"]["VIRAL_PNEUMONIA"]["sensitivity"] is None
    assert report["macro_f1_present"] == pytest.approx(np.mean([2 / 3, 2 / 3]))


def test_both_bases_give_the_last_block_and_its_pool():
    pytest.importorskip("tensorflow")
    from xray_edge.train.model import build_base

    for arch, channels in (("vgg19", 512), ("vgg-tiny", 64)):
        conv4, pool, cut = build_base(None, 64, arch).outputs
        assert tuple(conv4.shape) == (None, 4, 4, channels) and tuple(pool.shape) == (None, 2, 2, channels), arch
        assert tuple(cut.shape) == (None, 4, 4, 512 if arch == "vgg19" else 64), arch
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_base("imagenet", 64, "vgg-tiny")


def test_gradcam_layer_matches_tensorflow_gradients():
    tf = pytest.importorskip("tensorflow")
    import keras

    from xray_edge.train.model import build_head, grad_cam_layer

    rng = np.random.default_rng(0)
    identity = (tf.ones((1, 8)), tf.zeros((1, 8)))
    aligned = (tf.constant(rng.uniform(0.5, 2, (1, 8)).astype(np.float32)),
               tf.constant(rng.normal(0, 0.3, (1, 8)).astype(np.float32)))
    for kind, (scale, shift) in (("gap", identity), ("flatten", identity), ("gap", aligned), ("flatten", aligned)):
        head = build_head((2, 2, 8), kind, n_classes=3, seed=1)
        a = tf.constant(rng.uniform(0, 1, (3, 4, 4, 8)).astype(np.float32))
        cam = np.asarray(grad_cam_layer(head, (2, 2, 8))([a, scale, shift]))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(a)  # the site alignment (scale, shift per channel) sits between the pool and the head
            logits = head(keras.layers.MaxPooling2D(2)(a) * scale[:, None, None, :] + shift[:, None, None, :],
                          training=False)
            scores = [logits[:, c] for c in range(3)]
        for c in range(3):
            grads = tape.gradient(scores[c], a).numpy()
            weights = grads.mean(axis=(1, 2))  # Grad-CAM: spatially averaged gradient per channel
            want = np.maximum((a.numpy() * weights[:, None, None, :]).sum(-1), 0)
            np.testing.assert_allclose(cam[..., c], want, rtol=1e-4, atol=1e-6)


def test_gradcam_points_at_the_region_the_decision_rests_on():
    """Feature maps where the class evidence is one channel firing in one corner only: a head
    trained on them, and its Grad-CAM for that class peaks in that corner."""
    pytest.importorskip("tensorflow")
    import keras

    from xray_edge.train.model import build_head, grad_cam_layer

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 0.2, (120, 4, 4, 6)).astype(np.float32)  # block5_conv4-like maps, 2x2 after pooling
    y = np.arange(120) % 3
    a[y == 0, 0, 0, 2] += 3.0  # class 0: channel 2 fires in the top-left corner
    a[y == 2, 3, 3, 4] += 3.0  # class 2: channel 4 fires in the bottom-right corner
    keras.utils.set_random_seed(0)
    head = build_head((2, 2, 6), "gap", n_classes=3, dropout=0.0)
    head.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    head.fit(keras.layers.MaxPooling2D(2)(a).numpy(), y, epochs=60, verbose=0)
    cam = np.asarray(grad_cam_layer(head, (2, 2, 6))([a, np.ones((1, 6), np.float32), np.zeros((1, 6), np.float32)]))
    for cls, corner in ((0, (0, 0)), (2, (3, 3))):
        peaks = [np.unravel_index(np.argmax(c[..., cls]), (4, 4)) for c in cam[y == cls]]
        assert np.mean([p == corner for p in peaks]) >= 0.95, (cls, peaks[:5])


def test_mahalanobis_gate_layer_and_calibration():
    pytest.importorskip("tensorflow")
    from xray_edge.train.model import mahalanobis_layer

    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (200, 6)), rng.normal(3, 1, (200, 6))]
    y = np.r_[np.zeros(200, int), np.ones(200, int)]
    means, whiten = ood.fit_mahalanobis(x, y, 2)
    d = ood.distances(x, means, whiten)
    np.testing.assert_allclose(np.asarray(mahalanobis_layer(means, whiten)(x.astype(np.float32))), d, rtol=1e-4)
    gate = ood.calibrate(d, 0.95)
    assert gate.val_rejection_rate == pytest.approx(0.05, abs=0.005)
    far = ood.distances(rng.normal(12, 1, (20, 6)), means, whiten)
    assert (far > gate.threshold).all()


def test_end_to_end_outputs(trained, roots):
    for name in ("model.keras", "record.json", "split.csv", "metrics.json", "history_head.csv", "curves.png",
                 "confusion_test.png"):
        assert (trained / name).is_file(), name
    rows = read_manifest(trained / "split.csv")
    by_path = {r["path"]: r for r in rows}
    assert all(not r["path"].startswith("/") for r in rows)
    splits_of_group = defaultdict(set)
    for r in rows:
        splits_of_group[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    for copy, original, _ in PLANTED:
        a, b = by_path[f"cxr/{copy}"], by_path[f"cxr/{original}"]
        assert a["group"] == b["group"] and a["split"] == b["split"]
    assert by_path["extra/COVID/clinic-2.jpg"]["split"] == by_path["extra/COVID/clinic-3.jpg"]["split"]
    for split in ("train", "val", "test"):  # stratified by class and origin
        assert {(r["label"], r["origin"]) for r in rows if r["split"] == split} >= {
            ("COVID", "adults"), ("COVID", "clinic"), ("VIRAL_PNEUMONIA", "kids")}
    test = load_split(trained / "split.csv", "test")
    assert len(test) == sum(r["split"] == "test" for r in rows)
    assert all(CLASSES[i] == by_path[p]["label"] for p, i in test)

    m = json.loads((trained / "metrics.json").read_text())
    record = ModelRecord.from_json((trained / "record.json").read_text())
    assert record.classes == CLASSES and record.preprocessing.size == TRAIN_SIZE
    assert record.temperature == m["temperature"] and set(record.thresholds) == {"COVID", "VIRAL_PNEUMONIA"}
    assert record.seen_age_groups == {"COVID": ["adult"], "NORMAL": ["adult", "child"], "VIRAL_PNEUMONIA": ["child"]}
    assert record.gate.threshold == m["gate"]["threshold"] > 0 and record.abstain_margin == m["abstain_margin"]
    assert record.outputs.cam == "cam" and record.data_manifest_sha256 == m["data"]["manifest_sha256"]
    summary = m["protocol"]["summary"]
    assert set(summary["origins"]) == {"adults", "clinic"} == set(summary["criterion_origins"])  # "kids" alone has VIRAL
    assert summary["seeds"] == [0, 1] and len(m["protocol"]["per_seed"]) == 2
    fold = m["protocol"]["per_seed"][0]["looo"]["clinic"]
    assert fold["n"] == 16 and 0 <= fold["referral"]["sent_back"] <= 1 and fold["covid_vs_normal"]["n_normal"] == 8
    assert m["protocol"]["age_by_origin"]["clinic"]["called"]["adult"] >= 0
    worst = [min(s["looo"][o]["macro_f1_present"] for o in ("adults", "clinic")) for s in m["protocol"]["per_seed"]]
    assert summary["worst_origin_macro_f1"]["mean"] == pytest.approx(np.mean(worst))
    assert record.metrics["cross_origin"]["worst_origin_macro_f1"] == pytest.approx(np.mean(worst))
    assert m["recipe"]["head"] == "flatten"
    assert m["onnx_feature_check"]["passed"] and m["shipped_model_check"]["passed"]
    heat = m["heat_in_lungs"]
    assert heat["images"] > 0 and 0 <= heat["heat_in_lungs_quartiles"][1] <= 1
    views_per_train_image = len(m["features"]["augment"].split("+")) * m["features"]["aug_views"]
    assert views_per_train_image == 2  # as asked: one geometric and one processing view
    assert record.preprocessing.lung_crop is not None and record.preprocessing.crop_fraction == 0  # the default recipe
    assert m["features"]["computed"] == len(rows) + views_per_train_image * sum(r["split"] == "train" for r in rows)
    assert set(m["test_by_age_group"]) == {"adult", "child"}
    with open(trained / "history_head.csv", newline="") as f:
        history = list(csv.DictReader(f))
    # learnable patterns: labels reach the head (weighted accuracy: every origin x class weighs the same, so
    # chance is 1/3; worst-group reweighting stops on the worst group's loss, earlier than on the mean's)
    assert max(float(h["accuracy"]) for h in history) > 0.5


def test_split_is_reproducible(trained, roots, tmp_path):
    from xray_edge.train.pipeline import TrainConfig, load_dataset

    load_dataset(TrainConfig(data_dirs=roots, child_origins=("kids",)), tmp_path / "split.csv")
    assert (tmp_path / "split.csv").read_bytes() == (trained / "split.csv").read_bytes()


def test_two_class_subset_has_one_finding_threshold():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    assert set(thresholds.choose_thresholds(probs, np.array([0, 1, 0, 1]), ["COVID", "NORMAL"], 0.95)) == {"COVID"}


def test_block5_fine_tuning_from_cached_activations_changes_the_last_convolutions_only():
    pytest.importorskip("tensorflow")
    import keras

    from xray_edge.train import finetune
    from xray_edge.train.fit import EpochData
    from xray_edge.train.model import build_base, build_head

    keras.utils.set_random_seed(0)
    base = build_base(None, 32, "vgg-tiny")
    head = build_head(base.outputs[1].shape[1:], "flatten", n_classes=2)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (16, 32, 32, 1)).astype(np.float32), np.arange(16) % 2
    cut = np.asarray(base.predict(x, verbose=0)[2], np.float16)
    top_in = finetune.frozen_inputs(base, 1, cut)  # the tiny base's block 5 is one convolution: nothing frozen before it
    assert top_in is cut
    before = {w.path: np.array(w) for w in base.weights}
    data = EpochData(top_in, y, np.ones(16, np.float32), y.astype(str))
    logits_model, pooled_model, history = finetune.fine_tune(
        base, head, 1, lambda epoch: data, top_in[:4].astype(np.float32), y[:4], np.ones(4), y[:4].astype(str),
        epochs=2, batch_size=8, lr=1e-2, seed=0)
    assert len(history["loss"]) >= 1 and pooled_model.output.shape[-1] == 64
    assert {w.path: np.array(w) for w in base.weights}.keys() == before.keys()
    assert all(np.array_equal(before[w.path], np.array(w)) for w in base.weights)  # the base is untouched until applied
    assert finetune.apply(base, logits_model) == ["block5_conv4"]
    changed = {w.path for w in base.weights if not np.array_equal(before[w.path], np.array(w))}
    assert changed and all("block5_conv4" in p for p in changed)
    full = keras.Model(base.input, head(base.outputs[1]))  # the tuned base + head = the evaluated path
    np.testing.assert_allclose(np.asarray(full.predict(x, verbose=0)), np.asarray(logits_model.predict(top_in, verbose=0)),
                               rtol=2e-2, atol=2e-2)

