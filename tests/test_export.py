"""`xray-edge export`: FP32 ONNX checked against Keras on every output, the four-channel first
convolution, FP16/INT8 variants gated against FP32 on the validation and test splits, records
(sealed, gate recalibrated per variant), calibration, shipping with a pinned sha256, the model
card. Uses the session's tiny training run (the tiny VGG-layout base at 64 px on generated images)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from typer.testing import CliRunner  # noqa: E402

from conftest import TINY_MIN_AGREEMENT  # noqa: E402
from tiny_data import CLASSES  # noqa: E402
from xray_edge.cli import app  # noqa: E402
from xray_edge.contract import ModelRecord, record_from_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "runtime" / "models" / "xray-edge-vgg19-int8.onnx"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_onnx_record(path: Path) -> ModelRecord:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return record_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))


def run_onnx(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": x})))


def variant(exported, name: str) -> Path:
    return exported["out"] / f"xray-edge-vgg19-{name}.onnx"


def images(trained: Path, roots, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from xray_edge.pipeline import prepare
    from xray_edge.train.manifest import read_manifest

    spec = ModelRecord.from_json((trained / "record.json").read_text()).preprocessing
    rows = [r for r in read_manifest(trained / "split.csv") if r["split"] == split]
    x = np.stack([prepare(roots[0].parent / r["path"], spec).image for r in rows])
    return x, np.array([CLASSES.index(r["label"]) for r in rows]), [r["path"] for r in rows]


def export(trained: Path, roots, out: Path, *extra: str):
    args = ["export", str(trained / "model.keras"), "--out", str(out), "--data", str(roots[0].parent), "--n-boot", "20",
            "--calib-images", "12", "--check-images", "8", *extra]
    return CliRunner().invoke(app, args)


def test_fp32_onnx_matches_keras_on_every_output(trained, roots, exported):
    import keras

    import xray_edge.train.model  # noqa: F401 (registers the model's layers)

    from xray_edge.export.convert import site_probe
    from xray_edge.train.model import image_only

    model = keras.saving.load_model(trained / "model.keras", compile=False)
    x, _, _ = images(trained, roots, "val")
    want = image_only(model).predict(x, verbose=0)
    got = run_onnx(variant(exported, "fp32"), x)
    assert list(got) == ["logits", "age_logits", "ood_distance", "cam", "pooled"]
    for name in got:
        assert np.abs(got[name] - want[name]).max() <= 1e-3 * max(1.0, np.abs(want[name]).max()), name
    site = site_probe(model, seed=3)  # the site inputs: the aligned model, in Keras and in the graph
    want = model([x, site["site_scale"], site["site_shift"]], training=False)
    session = ort.InferenceSession(str(variant(exported, "fp32")), providers=["CPUExecutionProvider"])
    aligned = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x, **site})))
    for name in ("logits", "ood_distance", "cam"):
        assert np.abs(aligned[name] - np.asarray(want[name])).max() <= 1e-3 * max(1.0, np.abs(want[name]).max()), name
    assert np.array_equal(aligned["pooled"], got["pooled"]) and not np.allclose(aligned["logits"], got["logits"])
    single = run_onnx(variant(exported, "fp32"), x[:1])
    assert np.allclose(single["logits"], got["logits"][:1], atol=1e-5)  # batch of 1 and of many
    session = ort.InferenceSession(str(variant(exported, "fp32")), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)


def test_first_convolution_gets_four_channels(exported):
    model = onnx.load(str(variant(exported, "fp32")))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weights = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = onnx.numpy_helper.to_array(weights)
    assert w.shape[1] == 4 and not w[:, 3].any()


def test_every_variant_carries_a_sealed_record(trained, exported):
    from xray_edge.contract import sha256_file
    from xray_edge.session import load_model

    training = ModelRecord.from_json((trained / "record.json").read_text())
    for name in ("fp32", "fp16", "int8"):
        model = load_model(variant(exported, name))  # checks the seal
        rec = model.record
        assert rec.variant == name and not rec.forced and rec.record_sha256 and rec.graph_sha256
        assert rec.source_model_sha256 == sha256_file(trained / "model.keras")
        assert rec.data_manifest_sha256 == sha256_file(trained / "split.csv")
        assert rec.temperature == training.temperature and rec.thresholds == training.thresholds
        assert rec.seen_age_groups == training.seen_age_groups and rec.abstain_margin == training.abstain_margin
        assert rec.metrics["val"]["n"] > 0 and rec.metrics["test"]["n"] > 0
        assert rec.metrics["cross_origin"] == training.metrics["cross_origin"]
        if name != "fp32":  # the gate's limits travel with the figures they were applied to
            assert rec.metrics["gate"]["val"]["min_agreement"] == TINY_MIN_AGREEMENT
        assert rec.metrics["gate"]["passed"]
        assert rec.gate.quantile == training.gate.quantile and rec.gate.threshold > 0
    int8 = read_onnx_record(variant(exported, "int8"))
    assert int8.metrics["quantization"]["method"] == "minmax" and int8.metrics["quantization"]["images"] == 12


def test_gate_threshold_is_calibrated_on_each_variants_own_distances(trained, roots, exported):
    x, _, _ = images(trained, roots, "val")
    for name in ("fp32", "int8"):
        rec = read_onnx_record(variant(exported, name))
        d = run_onnx(variant(exported, name), x)["ood_distance"]
        assert rec.gate.threshold == pytest.approx(np.quantile(d, rec.gate.quantile), rel=1e-5)


def test_gates_on_val_and_test_come_from_the_models_predictions(trained, roots, exported):
    for split in ("val", "test"):
        x, y, _ = images(trained, roots, split)
        ref = run_onnx(variant(exported, "fp32"), x)["logits"].argmax(1)
        for name in ("fp16", "int8"):
            pred = run_onnx(variant(exported, name), x)["logits"].argmax(1)
            gate = read_onnx_record(variant(exported, name)).metrics["gate"][split]
            assert gate["split"] == split and gate["argmax_agreement"] == pytest.approx(np.mean(pred == ref))
            assert gate["accuracy"] == pytest.approx(np.mean(pred == y))
    assert "int8: gate passed" in exported["output"] and re.search(r"Keras check passed: .* on \d+ val images",
                                                                   exported["output"])


def test_int8_quantizes_the_base_and_leaves_the_heads_float(exported):
    from xray_edge.export.quantize import BASE_END, upstream_of

    model = onnx.load(str(variant(exported, "int8")))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "DynamicQuantizeLinear" not in ops
    assert [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    base = upstream_of(model, BASE_END)
    requantized = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    quantized = {n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                 and any(o in requantized for o in n.output)}  # nodes whose output is quantized again
    assert quantized and quantized <= base  # nothing after block5_conv4: heads, gate, Grad-CAM, site alignment
    assert {n.name for n in model.graph.node if n.op_type == "Relu" and n.name in base} <= quantized
    fp16 = onnx.load(str(variant(exported, "fp16")))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    sizes = {v: variant(exported, v).stat().st_size for v in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_ship_pins_the_sha256_and_fills_the_model_card(exported):
    shipped = exported["shipped"]
    assert sha256(shipped) == sha256(variant(exported, "int8"))
    assert json.loads(shipped.with_name("shipped.json").read_text()) == {shipped.name: sha256(shipped)}
    text = exported["card"].read_text()
    assert text.startswith("# Card\n\nprose\n") and text.endswith("\nafter\n")
    m = re.search(r"Shipped model: `[^`]*xray-edge-vgg19-int8\.onnx`, sha256 `([0-9a-f]{64})`", text)
    assert m and m.group(1) == sha256(shipped)
    acc = read_onnx_record(shipped).metrics["test"]["accuracy"]
    assert f"{acc['value']:.3f} ({acc['ci95'][0]:.3f}-{acc['ci95'][1]:.3f})" in text
    assert "| metric | FP32 | FP16 | INT8 |" in text and "leave-one-origin-out" in text
    from xray_edge.export.model_card import describe_preprocessing

    spec = read_onnx_record(shipped).preprocessing
    assert f"Preprocessing (record): {describe_preprocessing(spec)}." in text
    assert ("lung crop (lung model `xray-edge-lungseg-int8.onnx`" in text) == (spec.lung_crop is not None)


def _rotate_classes(proto):
    """A broken variant: the class outputs rotated by one (every prediction changes)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    for node in graph.node:
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array([1, 2, 0], dtype=np.int64), "rotation"))
    graph.node.append(helper.make_node("Gather", ["logits_raw", "rotation"], ["logits"], axis=1))
    return proto


@pytest.fixture
def cached_fp32(exported, monkeypatch):
    """Reuse the exported FP32 graph instead of converting again (these tests are about the gate)."""
    import xray_edge.export.convert as convert

    monkeypatch.setattr(convert, "keras_to_onnx", lambda model, opset=17: onnx.load(str(variant(exported, "fp32"))))


def test_gate_refuses_a_broken_variant_and_ignore_gate_marks_it(trained, roots, cached_fp32, monkeypatch, tmp_path):
    import xray_edge.export.quantize as quantize

    real = quantize.to_fp16
    monkeypatch.setattr(quantize, "to_fp16", lambda proto: _rotate_classes(real(proto)))
    result = export(trained, roots, tmp_path / "refused", "--variants", "fp16")
    assert result.exit_code == 1
    assert "fp16: gate FAILED: agreement with fp32 0.00%" in result.output
    assert not (tmp_path / "refused").exists()

    result = export(trained, roots, tmp_path / "forced", "--variants", "fp16", "--ignore-gate")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "forced").glob("*.onnx")] == ["xray-edge-vgg19-fp16.onnx"]
    rec = read_onnx_record(tmp_path / "forced" / "xray-edge-vgg19-fp16.onnx")
    assert rec.forced and not rec.metrics["gate"]["passed"] and rec.metrics["gate"]["val"]["argmax_agreement"] == 0.0
    assert "FORCED" in result.output
    result = export(trained, roots, tmp_path / "forced", "--variants", "fp16", "--ignore-gate")
    assert result.exit_code == 2 and "already exist" in result.output and "--force" in result.output


def test_a_conversion_that_differs_from_keras_is_never_written(trained, roots, exported, monkeypatch, tmp_path):
    import xray_edge.export.convert as convert

    fp32 = variant(exported, "fp32")
    monkeypatch.setattr(convert, "keras_to_onnx", lambda model, opset=17: _rotate_classes(onnx.load(str(fp32))))
    result = export(trained, roots, tmp_path / "out", "--variants", "fp32")
    assert result.exit_code == 1
    assert "fp32: Keras check FAILED" in result.output and re.search(r"on \d+ val images", result.output)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.onnx"))


def test_without_a_split_only_fp32_is_checked_on_generated_images(trained, cached_fp32, tmp_path):
    shutil.copy(trained / "model.keras", tmp_path / "model.keras")
    shutil.copy(trained / "record.json", tmp_path / "record.json")
    args = ["export", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--variants", "int8"])
    assert result.exit_code == 2 and "no split manifest" in result.output
    result = CliRunner().invoke(app, [*args, "--variants", "fp32", "--check-images", "4"])
    assert result.exit_code == 0, result.output
    assert "on 4 generated images" in result.output
    rec = read_onnx_record(tmp_path / "out" / "xray-edge-vgg19-fp32.onnx")
    assert rec.metrics["gate"]["images"] == "generated" and "test" not in rec.metrics


def test_calibration_uses_stratified_training_images_only(trained, roots):
    from xray_edge.export.data import SplitManifest, stratified_sample
    from xray_edge.train.manifest import read_manifest

    manifest = SplitManifest(trained / "split.csv", list(CLASSES), roots[0].parent)
    train = manifest.items("train")
    picked = stratified_sample(train, 12, seed=0)
    assert len(picked) == 12 and set(picked) <= set(train)
    assert picked == stratified_sample(train, 12, seed=0) != stratified_sample(train, 12, seed=1)
    assert {p for p, _ in picked} <= {r["path"] for r in read_manifest(trained / "split.csv") if r["split"] == "train"}
    with pytest.raises(ValueError, match="--data"):
        SplitManifest(trained / "split.csv", list(CLASSES), None).resolve(train[0][0])


def test_calibration_methods_give_different_ranges(trained, roots, exported, monkeypatch, tmp_path):
    from xray_edge.export import quantize

    monkeypatch.setitem(quantize.CALIBRATOR_OPTIONS, "entropy",
                        {**quantize.CALIBRATOR_OPTIONS["entropy"], "num_bins": 256})  # faster, still > 128 quantized bins
    pre = tmp_path / "pre.onnx"
    quantize.preprocess_for_quantization(variant(exported, "fp32"), pre)
    x, _, _ = images(trained, roots, "train")
    ranges = {m: quantize.ranges(quantize.calibrate(pre, x[:12], m, tmp_path)) for m in quantize.CALIBRATION_METHODS}
    names = sorted(ranges["minmax"])
    assert names == sorted(ranges["percentile"]) == sorted(ranges["entropy"])
    for method in ("percentile", "entropy"):
        narrower = [n for n in names if ranges[method][n][1] < 0.99 * ranges["minmax"][n][1]]
        assert narrower, f"{method} ranges equal MinMax's: its options did not reach the calibrator"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped model yet (runtime/models/xray-edge-vgg19-int8.onnx)")
def test_shipped_model():
    from xray_edge.classify import shipped_model
    from xray_edge.session import load_model, predict

    path, pinned = shipped_model()
    model = load_model(path, expected_sha256=pinned)
    rec = model.record
    assert rec.variant == "int8" and not rec.forced and rec.metrics["gate"]["passed"]
    assert rec.gate is not None and rec.heatmap is not None and rec.seen_age_groups
    out = predict(model, np.zeros((2, rec.preprocessing.size, rec.preprocessing.size, 1), np.float32), cam=True)
    assert out.probs.shape == (2, len(rec.classes)) and out.cam.shape[-1] == len(rec.classes)
    card = (REPO / "MODEL_CARD.md").read_text()
    m = re.search(r"Shipped model: `[^`]*runtime/models/xray-edge-vgg19-int8\.onnx`, sha256 `([0-9a-f]{64})`", card)
    assert m, "MODEL_CARD.md names no sha256 for the shipped model"
    assert m.group(1) == sha256(SHIPPED) == pinned


def test_unusable_inputs_fail_with_one_line(trained, roots, tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not an xray-edge Keras model" in result.output
    result = export(trained, roots, tmp_path / "out", "--calibration", "kl")
    assert result.exit_code == 2 and "--calibration must be one of" in result.output
    result = export(trained, roots, tmp_path / "out", "--record", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "training record not found" in result.output
    result = export(trained, roots, tmp_path / "out", "--ship")
    assert result.exit_code == 2 and "--force" in result.output
    assert not (tmp_path / "out").exists()


def test_committed_model_card_has_a_generated_section():
    from xray_edge.export.model_card import BEGIN, END

    text = (REPO / "MODEL_CARD.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)
