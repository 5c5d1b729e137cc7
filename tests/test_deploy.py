"""The helpers behind deploy/check-aarch64.sh (the emulated run itself is too slow for pytest)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

import compare_probs  # noqa: E402
from xray_edge.benchmarks import macs as count_macs  # noqa: E402
import make_images  # noqa: E402
from tiny_model import make_tiny_onnx  # noqa: E402

CLASSES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


def _csv(path: Path, rows: list[tuple[str, str, list[float] | None]], model: str = "m 1.0 int8") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "status", "decision", "label", *[f"p_{c}" for c in CLASSES], "flagged", "age_group",
                    "warning", "gate_score", "reason", "heatmap", "ms", "model", "site"])
        for name, status, probs in rows:
            cells = [""] * 3 if probs is None else probs
            w.writerow([name, status, "", "", *cells, "", "", "", "", "" if probs else "bad file", "", 1.0, model])
    return path


def _compare(tmp_path: Path, ref_rows, cand_rows, tol: float = 0.02) -> compare_probs.Comparison:
    ref = compare_probs.read_results(_csv(tmp_path / "a.csv", ref_rows))
    cand = compare_probs.read_results(_csv(tmp_path / "b.csv", cand_rows))
    return compare_probs.compare(ref, cand, tol)


def test_compare_matches_by_file_name_and_passes_within_tolerance(tmp_path):
    cmp = _compare(tmp_path, [("/x86/img/a.png", "ok", [0.7, 0.2, 0.1])],
                   [("/tmp/arm/img/a.png", "ok", [0.69, 0.21, 0.1])])
    assert cmp.ok and cmp.max_diff == pytest.approx(0.01)


def test_compare_fails_beyond_tolerance(tmp_path):
    cmp = _compare(tmp_path, [("a.png", "ok", [0.7, 0.2, 0.1])], [("a.png", "ok", [0.67, 0.23, 0.1])])
    assert not cmp.ok and "differ by 0.03" in cmp.problems[0]


def test_compare_flip_is_tolerated_only_at_a_near_tie(tmp_path):
    near = _compare(tmp_path, [("a.png", "ok", [0.495, 0.485, 0.02])], [("a.png", "ok", [0.485, 0.495, 0.02])])
    assert near.ok and near.near_ties
    clear = _compare(tmp_path, [("a.png", "ok", [0.55, 0.44, 0.01])], [("a.png", "ok", [0.44, 0.55, 0.01])])
    assert not clear.ok and any("predicted COVID vs NORMAL" in p for p in clear.problems)


def test_compare_fails_on_missing_or_failed_files(tmp_path):
    cmp = _compare(tmp_path, [("a.png", "ok", [1, 0, 0]), ("b.png", "ok", [1, 0, 0])],
                   [("a.png", "error", None)])
    assert not cmp.ok and len(cmp.problems) == 2


def test_compare_accepts_files_the_gate_rejects_on_both_sides_only(tmp_path):
    both = _compare(tmp_path, [("a.png", "ok", [0.7, 0.2, 0.1]), ("b.png", "rejected", [None] * 3)],
                    [("a.png", "ok", [0.7, 0.2, 0.1]), ("b.png", "rejected", [None] * 3)])
    assert both.ok and both.rejected == ["b.png"]
    one = _compare(tmp_path, [("b.png", "rejected", [None] * 3)], [("b.png", "ok", [0.7, 0.2, 0.1])])
    assert not one.ok and "not classified" in one.problems[0]


def test_model_variant_is_read_from_the_results(tmp_path):
    rows = compare_probs.read_results(_csv(tmp_path / "a.csv", [("a.png", "ok", [1, 0, 0])], "m 1 fp32"))
    assert compare_probs.model_variant(rows) == "fp32"


def test_int8_tolerance_is_one_output_level(tmp_path):
    import make_standin

    path = make_standin.make_standin(tmp_path / "standin.onnx")
    tol, why = compare_probs.output_level_tolerance(path)
    model = onnx.load(str(path))
    scale = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "logits_scale")
    assert tol == pytest.approx(np.tanh(float(scale) / 2)) and "one output level" in why
    assert compare_probs.output_level_tolerance(make_tiny_onnx(tmp_path / "float.onnx")) is None


def test_compare_main_exit_codes(tmp_path, capsys):
    a = _csv(tmp_path / "a.csv", [("a.png", "ok", [0.7, 0.2, 0.1])])
    b = _csv(tmp_path / "b.csv", [("a.png", "ok", [0.6, 0.3, 0.1])])
    assert compare_probs.main([str(a), str(a)]) == 0
    assert compare_probs.main([str(a), str(b)]) == 1
    (tmp_path / "c.csv").write_text("not,a,results,file\n1,2,3,4\n")
    assert compare_probs.main([str(a), str(tmp_path / "c.csv")]) == 2
    assert "not an xray-edge classify CSV" in capsys.readouterr().err


def test_count_macs_conv_and_gemm(tmp_path):
    # Conv 1->4, 3x3, pad 1 on 8x8: 4*8*8 * 1*3*3 = 2304; tiny model Gemms: 16 x 3 (class) + 16 x 2 (age) = 80
    w = numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    conv = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert count_macs.count_macs(conv) == ({"Conv": 2304}, [])
    tiny = onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx")))
    assert count_macs.count_macs(tiny) == ({"Gemm": 80}, [])


def test_make_images_are_decodable(tmp_path):
    from xray_edge.decode import read_image

    paths = make_images.write_images(tmp_path, 4)
    assert [p.suffix for p in paths] == [".png", ".png", ".jpg", ".png"]
    for p in paths:
        img = read_image(p)
        assert img.ndim == 2 and 0 <= img.min() < img.max() <= 1


def test_standin_is_a_loadable_int8_model(tmp_path):
    import make_standin
    from xray_edge.session import load_model

    model = load_model(make_standin.make_standin(tmp_path / "standin.onnx"))
    assert model.record.variant == "int8" and model.classes == list(CLASSES)
    ops = {n.op_type for n in onnx.load(str(model.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_compare_tensors_flags_real_preprocessing_differences():
    x = {"a.png": np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10, 1)}
    ulps = {"a.png": np.nextafter(x["a.png"], np.float32(2))}
    assert compare_probs.compare_tensors(x, ulps, 1e-5, ("x86", "arm"))[0]
    shifted = {"a.png": x["a.png"] + np.float32(1e-3)}
    ok, text = compare_probs.compare_tensors(x, shifted, 1e-5, ("x86", "arm"))
    assert not ok and "inputs differ" in text
    assert not compare_probs.compare_tensors(x, {}, 1e-5, ("x86", "arm"))[0]


def test_probe_model_reproduces_its_own_inputs(tmp_path):
    import probe_model

    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    images = tmp_path / "images"
    make_images.write_images(images, 3)
    a, b, inputs = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "inputs.npz"
    assert probe_model.main([str(model), "--images", str(images), "--save-inputs", str(inputs),
                             "--output", str(a)]) == 0
    assert probe_model.main([str(model), "--inputs", str(inputs), "--output", str(b)]) == 0
    assert a.read_text() == b.read_text()
    rows = compare_probs.read_results(a)
    assert sorted(rows) == sorted(p.name for p in images.iterdir())
    assert all(abs(sum(r.probs.values()) - 1) < 1e-5 for r in rows.values())


def test_guide_shows_the_committed_systemd_units():
    root = Path(__file__).resolve().parents[1]
    guide = (root / "docs" / "raspberry-pi.md").read_text()
    for unit in sorted((root / "deploy" / "systemd").iterdir()):
        assert f"`deploy/systemd/{unit.name}`:\n\n```ini\n{unit.read_text()}```" in guide, unit.name
