"""The model record: every field checked for type and range at load, and tamper-evident (the
record's own digest and the graph's digest are sealed into it at export)."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tiny_model import make_tiny_onnx, tiny_record
from xray_edge.contract import ModelContractError, ModelRecord, Preprocessing, onnx_graph_bytes
from xray_edge.recipe import LungCrop
from xray_edge.session import load_model, predict

SIZE = 32


def edit_record(src, dst, change=None, text=None):
    """Copy the model ``src`` to ``dst`` with its record JSON edited (``change`` on the dict, or
    ``text`` on the JSON string); the seal is left as it was."""
    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == "xray_edge.record":
            if change is not None:
                d = json.loads(prop.value)
                change(d)
                prop.value = json.dumps(d)
            if text is not None:
                prop.value = text(prop.value)
    onnx.save(model, str(dst))
    return dst


@pytest.fixture
def model_path(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx", size=SIZE)


def test_the_graph_digest_is_read_without_onnx(model_path):
    import hashlib

    data = model_path.read_bytes()
    graph = onnx_graph_bytes(data)
    assert hashlib.sha256(graph).hexdigest() == load_model(model_path).record.graph_sha256
    assert onnx_graph_bytes(b"\xff\xff\xff") is None and onnx_graph_bytes(b"") is None


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(classes=["NORMAL", "COVID", "VIRAL_PNEUMONIA"]), "in that order"),
    (lambda d: d.update(classes=["COVID", "FLU", "NORMAL"]), "in that order"),
    (lambda d: d.update(thresholds={"COVID": "0.5"}), "thresholds[COVID] '0.5' must be a finite number"),
    (lambda d: d.update(thresholds={"NORMAL": 0.5}), "only finding classes"),
    (lambda d: d.update(temperature=-1), "temperature -1"),
    (lambda d: d.update(abstain_margin=2), "abstain_margin 2"),
    (lambda d: d["preprocessing"].update(interpolation="lanczos"), "interpolation 'lanczos'"),
    (lambda d: d["preprocessing"].update(crop_fraction=0.9), "crop_fraction 0.9"),
    (lambda d: d["preprocessing"].update(size="224"), "size '224'"),
    (lambda d: d.update(gate={"threshold": 0, "quantile": 0.99, "feature": "", "val_rejection_rate": 0}),
     "gate.threshold 0"),
    (lambda d: d.update(seen_age_groups={"COVID": ["elderly"]}), "seen_age_groups"),
    (lambda d: d["outputs"].update(cam="logits"), "distinct"),
    (lambda d: d.update(extra=1), "unknown record fields"),
])
def test_invalid_fields_are_refused_at_load(model_path, tmp_path, change, message):
    bad = edit_record(model_path, tmp_path / "bad.onnx", change)
    with pytest.raises(ModelContractError) as e:
        load_model(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


def test_non_json_numbers_are_refused(model_path, tmp_path):
    bad = edit_record(model_path, tmp_path / "inf.onnx", text=lambda t: t.replace('"temperature": 1.0', '"temperature": Infinity'))
    with pytest.raises(ModelContractError, match="Infinity is not a JSON number"):
        load_model(bad)


def test_an_edited_record_and_a_swapped_graph_are_refused(model_path, tmp_path):
    edited = edit_record(model_path, tmp_path / "edited.onnx", lambda d: d.update(temperature=2.0))
    with pytest.raises(ModelContractError, match="altered after export"):
        load_model(edited)
    model = onnx.load(str(model_path))
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.CopyFrom(numpy_helper.from_array(np.zeros((16, 3), np.float32), "W"))
    onnx.save(model, str(tmp_path / "swapped.onnx"))
    with pytest.raises(ModelContractError, match="graph does not match its record"):
        load_model(tmp_path / "swapped.onnx")


def test_the_pinned_sha256_is_checked(model_path):
    with pytest.raises(ModelContractError, match="not the shipped model"):
        load_model(model_path, expected_sha256="0" * 64)
    assert load_model(model_path, expected_sha256=load_model(model_path).sha256).record.variant == "fp32"


def test_a_recipe_whose_lung_model_is_missing_is_refused_at_load(tmp_path):
    crop = LungCrop(model="no-such-lung-model.onnx", sha256="0" * 64)
    rec = tiny_record(SIZE, preprocessing=Preprocessing(size=SIZE, lung_crop=crop, crop_fraction=0.0))
    path = make_tiny_onnx(tmp_path / "lungs.onnx", size=SIZE, record=rec)
    with pytest.raises(ModelContractError, match="lung model not found"):
        load_model(path)


@pytest.mark.parametrize("name", ["../../../../dev/zero", "/dev/zero", "lungs", "a/b.onnx", ".onnx"])
def test_a_lung_model_named_by_anything_but_a_plain_file_name_is_refused(name):
    crop = LungCrop(model="lungs.onnx", sha256="0" * 64)
    rec = json.loads(tiny_record(SIZE, preprocessing=Preprocessing(size=SIZE, lung_crop=crop, crop_fraction=0.0))
                     .to_json())
    rec["preprocessing"]["lung_crop"]["model"] = name  # as a hostile model's metadata could say
    with pytest.raises(ModelContractError, match="lung_crop.model .* must be a file name ending .onnx"):
        ModelRecord.from_json(json.dumps(rec))


def test_predict_gives_every_output(model_path):
    model = load_model(model_path)
    x = np.random.default_rng(0).random((3, SIZE, SIZE, 1), dtype=np.float32)
    out = predict(model, x, cam=True)
    assert out.probs.shape == (3, 3) and np.allclose(out.probs.sum(1), 1)
    assert out.age.shape == (3, 2) and out.ood.shape == (3,) and out.cam.shape == (3, 4, 4, 3)
    assert predict(model, x).cam is None


def test_record_round_trips_and_seals():
    rec = tiny_record(SIZE)
    again = ModelRecord.from_json(rec.to_json())
    assert again == rec
    sealed = rec.sealed("a" * 64)
    assert sealed.record_sha256 == sealed.content_sha256() and sealed.graph_sha256 == "a" * 64
    assert rec.record_sha256 == ""  # sealing copies
