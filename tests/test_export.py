"""`xray-edge export`: FP32 ONNX checked against Keras, FP16/INT8 variants gated against FP32 on the
validation split, records, calibration, shipping and the model card. A tiny random-base VGG-19 at
32 px with a quickly fitted head, on generated class-pattern images (no real data needed)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from typer.testing import CliRunner  # noqa: E402

from xray_edge.cli import app  # noqa: E402
from xray_edge.contract import CLASSES, ModelRecord, Preprocessing, record_from_metadata  # noqa: E402

SIZE = 32
PER_CLASS = {"train": 10, "val": 6, "test": 4}
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "runtime" / "models" / "xray-edge-vgg19-int8.onnx"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pattern(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Class 0: horizontal stripes, 1: vertical stripes, 2: a bright disc; random phase and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period, phase = rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
    if label == 0:
        img = np.sin(2 * np.pi * yy / period + phase)
    elif label == 1:
        img = np.sin(2 * np.pi * xx / period + phase)
    else:
        cy, cx = rng.uniform(16, 32, 2)
        img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(80, 160), 1.0, -1.0)
    img = img + rng.normal(0, 0.3, img.shape)
    return (np.clip((img + 1.5) / 3.0, 0, 1) * 255).astype(np.uint8)


def read_onnx_record(path: Path) -> ModelRecord:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return record_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x})[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A class-folder dataset, its split.csv, a tiny trained model.keras and its record.json."""
    import keras

    from xray_edge.export.data import sha256_file
    from xray_edge.train.manifest import write_manifest
    from xray_edge.train.model import assemble, build_base, build_head

    root = tmp_path_factory.mktemp("data")
    run = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for split, n in PER_CLASS.items():
            for i in range(n):
                path = root / name / f"{split}-{i}.png"
                cv2.imwrite(str(path), pattern(label, rng))
                rows.append({"path": str(path), "label": name, "source": "generated", "sha256": sha256(path),
                             "group": f"g{len(rows)}", "split": split})
    write_manifest(run / "split.csv", rows)

    from xray_edge.pipeline import prepare

    spec = Preprocessing(size=SIZE)
    train = [r for r in rows if r["split"] == "train"]
    x = np.stack([prepare(r["path"], spec).image for r in train])
    y = np.array([CLASSES.index(r["label"]) for r in train])
    keras.utils.set_random_seed(0)
    base = build_base(None, size=SIZE)
    head = build_head(base.output.shape[1:], head="gap", dropout=0.0)
    head.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    head.fit(base.predict(x, verbose=0), y, epochs=40, batch_size=len(x), verbose=0)
    model = assemble(base, head)
    model.save(run / "model.keras")
    record = ModelRecord(preprocessing=spec, input_shape=["N", SIZE, SIZE, 1], model_version="0.0.1-test",
                         temperature=1.3, thresholds={"COVID": 0.4},
                         data_manifest_sha256=sha256_file(run / "split.csv"))
    (run / "record.json").write_text(record.to_json())
    return {"root": root, "run": run, "model": model, "rows": rows, "spec": spec}


def export(trained: dict, out: Path, *extra: str):
    args = ["export", str(trained["run"] / "model.keras"), "--out", str(out), "--n-boot", "20",
            "--calib-images", "12", "--check-images", "8", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    """One full export (fp32, fp16, int8), with --ship into a temporary folder and the model card."""
    import xray_edge.export.command as command

    out = tmp_path_factory.mktemp("export")
    shipped = tmp_path_factory.mktemp("shipped") / "xray-edge-vgg19-int8.onnx"
    card = tmp_path_factory.mktemp("card") / "CARD.md"
    card.write_text("# Card\n\nprose\n\n" + _markers() + "\nafter\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(command, "shipped_path", lambda: shipped)
        result = export(trained, out, "--ship", "--model-card", str(card))
    assert result.exit_code == 0, result.output
    return {"out": out, "card": card, "output": result.output, "shipped": shipped}


def _markers() -> str:
    from xray_edge.export.model_card import BEGIN, END

    return f"{BEGIN}\nnot generated yet\n{END}"


def _images(trained: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    from xray_edge.pipeline import prepare

    rows = [r for r in trained["rows"] if r["split"] == split]
    return (np.stack([prepare(r["path"], trained["spec"]).image for r in rows]),
            np.array([CLASSES.index(r["label"]) for r in rows]))


def test_fp32_onnx_matches_keras_with_dynamic_batch(trained, exported):
    path = exported["out"] / "xray-edge-vgg19-fp32.onnx"
    x, _ = _images(trained, "val")
    keras_probs = trained["model"].predict(x, verbose=0)
    logits = onnx_logits(path, x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.abs(p - keras_probs).max() < 1e-4
    assert np.allclose(onnx_logits(path, x[:1]), logits[:1], atol=1e-5)  # batch of 1 and of 18
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)
    assert len(set(keras_probs.argmax(1))) == 3  # the fixture model really separates the classes


def test_every_variant_carries_a_valid_record(trained, exported):
    from xray_edge.export.data import sha256_file

    for variant in ("fp32", "fp16", "int8"):
        rec = read_onnx_record(exported["out"] / f"xray-edge-vgg19-{variant}.onnx")
        assert rec.variant == variant and not rec.forced
        assert rec.source_model_sha256 == sha256_file(trained["run"] / "model.keras")
        assert rec.data_manifest_sha256 == sha256_file(trained["run"] / "split.csv")
        assert rec.temperature == 1.3 and rec.thresholds == {"COVID": 0.4} and rec.model_version == "0.0.1-test"
        assert rec.metrics["val"]["n"] == 3 * PER_CLASS["val"] and rec.metrics["test"]["n"] == 3 * PER_CLASS["test"]
        assert rec.metrics["gate"]["passed"]
    int8 = read_onnx_record(exported["out"] / "xray-edge-vgg19-int8.onnx")
    assert int8.metrics["quantization"]["method"] == "minmax" and int8.metrics["quantization"]["images"] == 12
    assert int8.metrics["split_counts"]["train"] == {c: PER_CLASS["train"] for c in CLASSES}


def test_gate_figures_come_from_the_models_predictions(trained, exported):
    x, y = _images(trained, "val")
    ref = onnx_logits(exported["out"] / "xray-edge-vgg19-fp32.onnx", x).argmax(1)
    for variant in ("fp16", "int8"):
        path = exported["out"] / f"xray-edge-vgg19-{variant}.onnx"
        pred = onnx_logits(path, x).argmax(1)
        gate = read_onnx_record(path).metrics["gate"]
        assert gate["argmax_agreement"] == pytest.approx(np.mean(pred == ref))
        assert gate["accuracy"] == pytest.approx(np.mean(pred == y))
        assert gate["accuracy_fp32"] == pytest.approx(np.mean(ref == y))
        assert read_onnx_record(path).metrics["val"]["accuracy"]["value"] == pytest.approx(np.mean(pred == y))
    assert "int8: gate passed" in exported["output"]


def test_int8_is_quantized_static_qdq(exported):
    model = onnx.load(str(exported["out"] / "xray-edge-vgg19-int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "DynamicQuantizeLinear" not in ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights  # convolution kernels stored as int8
    fp16 = onnx.load(str(exported["out"] / "xray-edge-vgg19-fp16.onnx"))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    sizes = {v: (exported["out"] / f"xray-edge-vgg19-{v}.onnx").stat().st_size for v in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_ship_and_model_card(exported):
    shipped = exported["shipped"]
    assert sha256(shipped) == sha256(exported["out"] / "xray-edge-vgg19-int8.onnx")
    text = exported["card"].read_text()
    assert text.startswith("# Card\n\nprose\n") and text.endswith("\nafter\n")
    m = re.search(r"Shipped model: `[^`]*xray-edge-vgg19-int8\.onnx`, sha256 `([0-9a-f]{64})`", text)
    assert m and m.group(1) == sha256(shipped)
    int8 = read_onnx_record(shipped)
    acc = int8.metrics["test"]["accuracy"]
    assert f"{acc['value']:.3f} ({acc['ci95'][0]:.3f}-{acc['ci95'][1]:.3f})" in text
    assert "| metric | FP32 | FP16 | INT8 |" in text


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

    path = exported["out"] / "xray-edge-vgg19-fp32.onnx"
    monkeypatch.setattr(convert, "keras_to_onnx", lambda model, opset=17: onnx.load(str(path)))


def test_gate_refuses_a_broken_variant_and_force_marks_it(trained, cached_fp32, monkeypatch, tmp_path):
    import xray_edge.export.quantize as quantize

    real = quantize.to_fp16
    monkeypatch.setattr(quantize, "to_fp16", lambda proto: _rotate_classes(real(proto)))
    result = export(trained, tmp_path / "refused", "--variants", "fp16")
    assert result.exit_code == 1
    assert "fp16: gate FAILED: agreement with fp32 0.00%" in result.output
    assert not (tmp_path / "refused").exists()

    result = export(trained, tmp_path / "forced", "--variants", "fp16", "--force")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "forced").glob("*.onnx")] == ["xray-edge-vgg19-fp16.onnx"]
    rec = read_onnx_record(tmp_path / "forced" / "xray-edge-vgg19-fp16.onnx")
    assert rec.forced and not rec.metrics["gate"]["passed"] and rec.metrics["gate"]["argmax_agreement"] == 0.0
    assert "FORCED" in result.output


def test_a_conversion_that_differs_from_keras_is_never_written(trained, exported, monkeypatch, tmp_path):
    import xray_edge.export.convert as convert

    path = exported["out"] / "xray-edge-vgg19-fp32.onnx"
    monkeypatch.setattr(convert, "keras_to_onnx", lambda model, opset=17: _rotate_classes(onnx.load(str(path))))
    result = export(trained, tmp_path / "out", "--variants", "fp32", "--force")
    assert result.exit_code == 1
    assert "fp32: Keras check FAILED" in result.output and "on 8 val images" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.onnx"))


def test_without_a_split_only_fp32_is_checked_on_generated_images(trained, cached_fp32, tmp_path):
    import shutil

    shutil.copy(trained["run"] / "model.keras", tmp_path / "model.keras")
    shutil.copy(trained["run"] / "record.json", tmp_path / "record.json")
    args = ["export", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--variants", "int8"])
    assert result.exit_code == 2 and "no split manifest" in result.output
    result = CliRunner().invoke(app, [*args, "--variants", "fp32", "--check-images", "4"])
    assert result.exit_code == 0, result.output
    assert "on 4 generated images" in result.output
    rec = read_onnx_record(tmp_path / "out" / "xray-edge-vgg19-fp32.onnx")
    assert rec.metrics["gate"]["images"] == "generated" and "test" not in rec.metrics


def test_calibration_uses_stratified_training_images_only(trained):
    from xray_edge.export.data import SplitManifest, stratified_sample

    manifest = SplitManifest(trained["run"] / "split.csv", list(CLASSES), None)
    train = manifest.items("train")
    picked = stratified_sample(train, 12, seed=0)
    assert len(picked) == 12 and set(picked) <= set(train)
    assert np.bincount([y for _, y in picked]).tolist() == [4, 4, 4]
    assert picked == stratified_sample(train, 12, seed=0) != stratified_sample(train, 12, seed=1)
    assert {p for p, _ in picked} <= {r["path"] for r in trained["rows"] if r["split"] == "train"}


def test_calibration_methods_give_different_ranges(trained, exported, monkeypatch, tmp_path):
    from xray_edge.export import quantize

    monkeypatch.setitem(quantize.CALIBRATOR_OPTIONS, "entropy",
                        {**quantize.CALIBRATOR_OPTIONS["entropy"], "num_bins": 256})  # faster, still > 128 quantized bins
    pre = tmp_path / "pre.onnx"
    quantize.preprocess_for_quantization(exported["out"] / "xray-edge-vgg19-fp32.onnx", pre)
    x, _ = _images(trained, "train")
    ranges = {m: quantize.ranges(quantize.calibrate(pre, x, m, tmp_path)) for m in quantize.CALIBRATION_METHODS}
    names = sorted(ranges["minmax"])
    assert names == sorted(ranges["percentile"]) == sorted(ranges["entropy"])
    for method in ("percentile", "entropy"):
        narrower = [n for n in names if ranges[method][n][1] < 0.99 * ranges["minmax"][n][1]]
        assert narrower, f"{method} ranges equal MinMax's: its options did not reach the calibrator"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped model yet (runtime/models/xray-edge-vgg19-int8.onnx)")
def test_shipped_model():
    session = ort.InferenceSession(str(SHIPPED), providers=["CPUExecutionProvider"])
    rec = record_from_metadata(session.get_modelmeta().custom_metadata_map, str(SHIPPED))
    assert rec.variant == "int8" and not rec.forced and rec.metrics["gate"]["passed"]
    size = rec.preprocessing.size
    out = session.run(["logits"], {"image": np.zeros((2, size, size, 1), np.float32)})[0]
    assert out.shape == (2, len(rec.classes))
    card = (REPO / "MODEL_CARD.md").read_text()
    m = re.search(r"Shipped model: `[^`]*runtime/models/xray-edge-vgg19-int8\.onnx`, sha256 `([0-9a-f]{64})`", card)
    assert m, "MODEL_CARD.md names no sha256 for the shipped model"
    assert m.group(1) == sha256(SHIPPED)
    assert rec.metrics["test"]["n"] > 0


def test_unusable_inputs_fail_with_one_line(trained, tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not an xray-edge Keras model" in result.output
    result = export(trained, tmp_path / "out", "--calibration", "kl")
    assert result.exit_code == 2 and "--calibration must be one of" in result.output
    result = export(trained, tmp_path / "out", "--record", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "training record not found" in result.output
    assert not (tmp_path / "out").exists()


def test_committed_model_card_has_a_generated_section():
    from xray_edge.export.model_card import BEGIN, END

    text = (REPO / "MODEL_CARD.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)
