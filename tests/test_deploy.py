"""The helpers behind deploy/check-cpus.sh (the emulated runs themselves are too slow for pytest)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

import compare_probs  # noqa: E402
from xray_edge.benchmarks import macs as count_macs  # noqa: E402
import make_images  # noqa: E402
from tiny_model import make_tiny_onnx  # noqa: E402

CLASSES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


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
    from xray_edge.export.quantize import AVX2_SAFE_WEIGHT, int8_weight_ranges
    from xray_edge.session import load_model

    model = load_model(make_standin.make_standin(tmp_path / "standin.onnx"))
    assert model.record.variant == "int8" and model.classes == list(CLASSES)
    assert model.record.preprocessing.lung_crop is not None and model.record.gate is not None
    assert model.record.outputs.age_logits and model.record.outputs.ood_distance
    proto = onnx.load(str(model.path))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in proto.graph.node}
    assert max(int8_weight_ranges(proto).values()) <= AVX2_SAFE_WEIGHT


def _target(name: str, probs=(0.7, 0.2, 0.1), box=(1, 9, 2, 8), x=None, **extra) -> compare_probs.Target:
    x = np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10, 1) if x is None else x
    row = {"error": "", "note": "", "lung_box": list(box), "probs": list(probs), "decision": "positive",
           "label": "COVID", "age": [0.9, 0.1], "gate_score": 0.5} | extra
    report = {"model": "m 1 int8", "sha256": "ab" * 32, "machine": "x86_64", "files": {"a.png": row}}
    return compare_probs.Target(name, report, {"a.png": x}, {"sha256": "s", "logits": [[1.0, 2.0]]})


def test_compare_passes_the_same_answers_and_names_each_difference():
    ref = _target("native")
    same = compare_probs.compare(ref, _target("arm"))
    assert same.ok and same.values["box"] == ("1/1", True)
    assert same.values["dx"] == ("0 (same bits)", True)
    assert same.values["selfcheck"] == ("identical", True)
    saturated = compare_probs.compare(ref, _target("avx2", probs=(0.5, 0.4, 0.1), box=(0, 9, 2, 8), decision="negative",
                                                    label="NORMAL", gate_score=0.6))
    assert not saturated.ok and len(saturated.problems) == 1  # one line per file
    line = saturated.problems[0]
    for what in ("lung box [0, 9, 2, 8] instead of [1, 9, 2, 8]", "probabilities (same input) off by 0.2",
                 "gate score (same input) off by 0.2", "negative NORMAL instead of positive COVID"):
        assert what in line
    assert "(end to end)" not in line  # the same input: not repeated
    assert compare_probs.compare(ref, _target("arm", probs=(0.70005, 0.19995, 0.1))).ok  # within 1e-4


def test_compare_separates_kernels_from_preprocessing():
    ref = _target("native")
    x = np.nextafter(ref.inputs["a.png"], np.float32(2))  # an ulp off: the float SIMD code of another CPU
    kernels_ok = _target("arm", x=x, probs=(0.69, 0.21, 0.1), on_reference_input=ref.report["files"]["a.png"])
    cmp = compare_probs.compare(ref, kernels_ok)
    assert cmp.values["dx"][0].endswith("(1 differ)")
    assert cmp.values["dp_same"] == ("0", True)
    assert cmp.values["dp"][1] is False and "(end to end)" in cmp.problems[0]
    not_run = compare_probs.compare(ref, _target("arm", x=x))
    assert "was not run on the reference's" in not_run.problems[0]
    shifted = compare_probs.compare(ref, _target("arm", x=ref.inputs["a.png"] + np.float32(1e-3)))
    assert "model input off by 0.001" in shifted.problems[0]


def test_compare_selfcheck_must_run_unless_optional():
    ref, cand = _target("native"), _target("arm")
    ref.selfcheck, ref.selfcheck_error = None, "ModelContractError: no shipped model"
    assert not compare_probs.compare(ref, cand).ok
    assert compare_probs.compare(ref, cand, selfcheck_optional=True).ok
    cand.selfcheck = None
    assert not compare_probs.compare(_target("native"), cand).ok


def test_probe_and_compare_round_trip(tmp_path, capsys):
    import probe_model

    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    images = tmp_path / "images"
    make_images.write_images(images, 3)
    assert probe_model.main([str(images), "--model", str(model), "--out", str(tmp_path / "native")]) == 0
    assert probe_model.main([str(images), "--model", str(model), "--out", str(tmp_path / "again"),
                             "--reference-inputs", str(tmp_path / "native.npz")]) == 0
    report = json.loads((tmp_path / "again.json").read_text())
    assert sorted(report["files"]) == sorted(p.name for p in images.iterdir())
    assert all(abs(sum(f["probs"]) - 1) < 1e-9 and "on_reference_input" not in f for f in report["files"].values())
    (tmp_path / "native-selfcheck.err").write_text("ModelContractError: no shipped model\n")
    assert compare_probs.main([str(tmp_path / "native"), str(tmp_path / "again")]) == 1
    assert compare_probs.main([str(tmp_path / "native"), str(tmp_path / "again"), "--selfcheck-optional"]) == 0
    assert "PASS: every target agrees with native" in capsys.readouterr().out
    assert compare_probs.main([str(tmp_path / "native"), str(tmp_path / "missing")]) == 2


def test_make_images_picks_real_images_across_origins_and_classes(tmp_path):
    from tiny_data import make_roots
    from xray_edge.train.data import list_images

    roots = make_roots(tmp_path / "data", n=3)
    group = {i.path: (i.origin, i.label) for i in list_images(roots)[0]}
    picked = make_images.pick_real(roots, tmp_path / "a", 6)
    assert len({group[str(p)] for p in picked}) == 6
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in picked)
    assert picked == make_images.pick_real(roots, tmp_path / "b", 6)  # a fixed pick


def test_guide_shows_the_committed_systemd_units():
    root = Path(__file__).resolve().parents[1]
    guide = (root / "docs" / "raspberry-pi.md").read_text()
    for unit in sorted((root / "deploy" / "systemd").iterdir()):
        assert f"`deploy/systemd/{unit.name}`:\n\n```ini\n{unit.read_text()}```" in guide, unit.name
