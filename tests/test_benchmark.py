"""`xray-edge benchmark` on tiny ONNX models and generated images (no timing assertions)."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from tiny_model import make_tiny_onnx, tiny_record
from xray_edge.benchmarks import bench, formats, peak, report
from xray_edge.benchmarks.config import ConfigError, settings
from xray_edge.benchmarks.worker import timed_runs
from xray_edge.cli import app
from xray_edge.contract import CLASSES, attach_record
from xray_edge.pipeline import prepare
from xray_edge.session import load_model, predict_proba

SIZE = 32
FAST = ["--threads", "1", "--warmup", "1", "--runs", "3", "--seconds", "0", "--n-boot", "20", "--no-build",
        "--no-peak", "--no-gate-sets", "--cold-start", "0"]


def patch_image(block: int, seed: int) -> np.ndarray:
    """64x64 grey: noisy background with one bright square in cell ``block`` of a 4x4 grid (the
    tiny model averages 4x4 cells, so different cells give different predictions)."""
    rng = np.random.default_rng(seed)
    img = 0.3 + rng.normal(0, 0.03, (64, 64))
    r, c = divmod(block, 4)
    img[4 + r * 14 : 18 + r * 14, 4 + c * 14 : 18 + c * 14] += 0.5
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Class folders (7 images per class) and tiny models: fp32, and an "int8" with perturbed weights."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    for k, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for i in range(7):
            cv2.imwrite(str(data / name / f"{name}-{i}.png"), patch_image((5 * k + i) % 16, 10 * k + i))
    fp32 = make_tiny_onnx(root / "tiny-fp32.onnx", SIZE)
    model = onnx.load(str(fp32))
    w = next(t for t in model.graph.initializer if t.name == "W")
    noisy = numpy_helper.to_array(w) + np.random.default_rng(1).normal(0, 1.5, (16, 3)).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(noisy, "W"))
    attach_record(model, tiny_record(SIZE, variant="int8"))
    onnx.save(model, str(root / "tiny-int8.onnx"))
    (root / "corrupt.onnx").write_bytes(b"not an onnx model")
    return {"root": root, "data": data, "fp32": fp32, "int8": root / "tiny-int8.onnx", "corrupt": root / "corrupt.onnx"}


def run_cli(setup: dict[str, Path], out: Path, *extra: str) -> dict:
    args = ["benchmark", "--data", str(setup["data"]), "--model", f"onnx_fp32={setup['fp32']}",
            "--model", f"onnx_int8={setup['int8']}", "--limit", "0", "--out", str(out), *FAST, *extra]
    if "--formats" not in extra:
        args += ["--formats", ",".join(f.name for f in formats.FORMATS)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    results = run_cli(setup, out, "--model", f"onnx_fp16={setup['corrupt']}", "--e2e-images", "6", "--fullsize", "1",
                      "--fullsize-px", "300", "--e2e-rounds", "2", "--peak", "--gate-sets", "--cold-start", "1")
    return results | {"_out": str(out)}


def direct_probs(model_path: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities computed without the benchmark: runtime load_model + prepare + predict_proba."""
    model = load_model(model_path)
    files = sorted((p, CLASSES.index(p.parent.name)) for p in data.rglob("*.png"))
    x = np.stack([prepare(p, model.record.preprocessing).image for p, _ in files])
    return predict_proba(model, x), np.array([y for _, y in files])


def test_every_format_gets_a_row_with_the_right_status(results):
    rows = {r["format"]: r for r in results["rows"]}
    assert list(rows) == [f.name for f in formats.FORMATS]
    assert rows["onnx_fp32"]["status"] == "ok" and rows["onnx_int8"]["status"] == "ok"
    assert rows["onnx_fp16"]["status"].startswith("error: ")  # corrupt file: a row, not a crash
    assert "not a loadable ONNX model" in rows["onnx_fp16"]["status"]
    for name in ("keras_fp32", "tflite_fp32", "tflite_int8"):  # no file given, building off
        assert rows[name]["status"] in ("missing", "not installed"), rows[name]
    assert rows["tflite_fp32"]["status"] != "missing" or "not found" in rows["tflite_fp32"]["detail"]


def test_metrics_come_from_real_predictions(results, setup):
    rows = {r["format"]: r for r in results["rows"]}
    p32, y = direct_probs(setup["fp32"], setup["data"])
    p8, _ = direct_probs(setup["int8"], setup["data"])
    assert results["data"]["used"] == len(y) == 21
    for name, p in (("onnx_fp32", p32), ("onnx_int8", p8)):
        row = rows[name]
        assert row["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
        covid = y == CLASSES.index("COVID")
        assert row["covid_sensitivity"] == pytest.approx(np.mean(p[covid].argmax(1) == 0))
        lo, hi = row["ci95"]["accuracy"]
        assert lo <= row["accuracy"] <= hi
        assert sum(map(sum, row["confusion_matrix"])) == len(y)
        assert row["b1_runs"] >= 3 and row["b8_runs"] == 21 // 8
        assert row["size_mb"] > 0 and row["rss_delta_mb"] > 0 and row["b1_median_ms"] > 0
    agreement = np.mean(p8.argmax(1) == p32.argmax(1))
    assert 0 < agreement < 1  # the perturbed copy disagrees on some images
    assert rows["onnx_int8"]["agreement_fp32"] == pytest.approx(agreement)
    assert rows["onnx_fp32"]["agreement_fp32"] == 1.0
    assert 0 < rows["onnx_fp32"]["accuracy"] < 1


def test_end_to_end_measured(results):
    e2e = results["e2e"]
    assert e2e["format"] == "onnx_int8"
    assert e2e["sets"]["real"]["classified"] == 6 and e2e["rounds"] == e2e["sets"]["real"]["rounds"] == 2
    for kind in ("png16", "dicom", "jpeg"):
        s = e2e["sets"][kind]
        assert s["classified"] == 1 and "300x300" in s["description"], kind
        assert s["decode_preprocess_ms_median"] > 0 and s["bound_images_per_s"] > 0 and 0 < s["share_of_bound"]
    assert e2e["heatmaps"]["ms_per_image_with"] > 0
    assert e2e["cold_start"]["shipped_model"] is False  # a test model: run with --model
    cold = e2e["cold_start"]["seconds"]
    assert cold["classify"] > 0 and cold["bare_script"] > 0 and cold["help"] > 0
    gate = e2e["gate"]
    assert gate and all(g["images"] == g["rejected"] + g["error"] + g["labelled"] for g in gate.values())
    generated = gate["generated (blank, noise, pattern, document)"]
    assert generated["error"] >= 3  # black, white and grey are refused as having no content


def test_cpu_features_peak_and_throughput_columns(results):
    m = results["machine"]
    assert isinstance(m["int8_features"], list) and m["int8_peak"]["gmac_per_s"] > 0
    assert peak.hardware_int8_bound(["AVX2", "AVX-512 VNNI"], 2, 2.5)["gmac_per_s"] == 2 * 2.5 * 128
    assert peak.hardware_int8_bound([], 2, 2.5) is None and peak.cpu_ghz("cpu MHz\t\t: 2600.000\n") == 2.6
    rows = {r["format"]: r for r in results["rows"]}
    for name in ("onnx_fp32", "onnx_int8"):
        assert rows[name]["gmac_per_image"] > 0 and rows[name]["b8_gmac_per_s"] > 0
    assert rows["onnx_int8"]["share_of_ort_int8_gemm"] == pytest.approx(
        rows["onnx_int8"]["b8_gmac_per_s"] / m["int8_peak"]["gmac_per_s"])
    assert "share_of_ort_int8_gemm" not in rows["onnx_fp32"]
    if m["hw_int8_bound"]:  # x86 with AVX2 or better, ARM with dot product: cores x clock x MACs/cycle
        assert rows["onnx_int8"]["share_of_hw_int8_bound"] == pytest.approx(
            rows["onnx_int8"]["b8_gmac_per_s"] / m["hw_int8_bound"]["gmac_per_s"])
    for name in ("onnx_fp32", "onnx_int8"):  # the record's rules applied to real images, as in classify
        assert 0 <= rows[name]["rejected_rate"] <= 1 and 0 <= rows[name]["uncertain_rate"] <= 1


def test_output_files_follow_their_schema(results):
    out = Path(results["_out"])
    assert results["schema"] == bench.SCHEMA and results["schema_version"] == bench.SCHEMA_VERSION
    for key in ("created", "command", "settings", "machine", "reference_record", "data", "method", "rows", "e2e",
                "notes"):
        assert key in results
    for key in ("cpu", "cores", "ram_gb", "os", "python", "packages", "threads"):
        assert key in results["machine"]
    assert results["machine"]["packages"]["onnxruntime"]
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.CSV_FIELDS
        assert [r["format"] for r in reader] == [f.name for f in formats.FORMATS]
    md = (out / "RESULTS.md").read_text()
    header = "| " + " | ".join(h for _, h, _ in report.COLUMNS) + " |"
    assert header in md
    table = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in
             {f.name for f in formats.FORMATS}]
    assert len(table) == len(formats.FORMATS)
    assert results["machine"]["cpu"] in md and "--limit 0" in md and "int8 GEMM" in md and "int8 bound" in md
    assert "| png16: " in md and "Input gate" in md and "Heatmaps" in md
    assert (out / "results.png").stat().st_size > 0


def test_missing_engine_gives_not_installed(setup, tmp_path, monkeypatch):
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"never read")
    absent = ("xray_edge_no_such_engine",)
    monkeypatch.setattr(formats, "FORMATS", tuple(replace(f, engine=absent) if f.name in ("onnx_fp16", "tflite_fp32")
                                                  else f for f in formats.FORMATS))
    s = settings(None, {"data": setup["data"], "formats": ["onnx_fp32", "onnx_fp16", "tflite_fp32"], "threads": 1,
                        "runs": 1, "seconds": 0, "warmup": 0, "n_boot": 10, "e2e_format": "", "build": False,
                        "models": {"onnx_fp32": str(setup["fp32"]), "onnx_fp16": str(setup["fp32"]),
                                   "tflite_fp32": str(tflite)}})
    rows = {r["format"]: r for r in bench.run(s)["rows"]}
    assert rows["onnx_fp16"]["status"] == "not installed"
    assert rows["tflite_fp32"]["status"] == "not installed"
    assert "xray_edge_no_such_engine" in rows["tflite_fp32"]["detail"]
    assert rows["onnx_fp32"]["status"] == "ok"


def test_engine_check_imports_nothing():
    assert formats.missing_modules(("numpy", "xray_edge_no_such_engine")) == ["xray_edge_no_such_engine"]


def test_missing_artifact_and_no_models(setup, tmp_path):
    s = settings(None, {"data": setup["data"], "formats": ["onnx_fp32", "onnx_int8"], "threads": 1, "runs": 1,
                        "seconds": 0, "warmup": 0, "n_boot": 10, "e2e_format": "onnx_int8",
                        "models": {"onnx_fp32": str(setup["fp32"]), "onnx_int8": str(tmp_path / "gone.onnx")}})
    res = bench.run(s)
    rows = {r["format"]: r for r in res["rows"]}
    assert rows["onnx_int8"]["status"] == "missing" and "gone.onnx not found" in rows["onnx_int8"]["detail"]
    assert "not measured" in res["e2e"]["skipped"]
    with pytest.raises(bench.BenchmarkError, match="no model record"):
        bench.run(settings(None, {"data": setup["data"], "models": {"onnx_fp32": str(tmp_path / "gone.onnx")}}))


def test_cli_errors_are_one_line(setup, tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "--data", str(tmp_path / "nothing"), "--model",
                                      f"onnx_fp32={setup['fp32']}", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    result = CliRunner().invoke(app, ["benchmark", "--model", "onnx_fp32"])
    assert result.exit_code == 2 and "NAME=PATH" in result.output


def test_existing_results_are_kept_without_force(setup, tmp_path):
    (tmp_path / "RESULTS.md").write_text("committed")
    result = CliRunner().invoke(app, ["benchmark", "--data", str(setup["data"]), "--model", f"onnx_fp32={setup['fp32']}",
                                      "--out", str(tmp_path), *FAST])
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "RESULTS.md").read_text() == "committed"


def test_only_the_formats_given_are_run_and_the_installed_model_by_default(setup, tmp_path, monkeypatch):
    import xray_edge.classify as classify

    res = run_cli(setup, tmp_path / "a", "--formats", "onnx_fp32", "--e2e-format", "")
    assert [r["format"] for r in res["rows"]] == ["onnx_fp32"]
    monkeypatch.setattr(classify, "shipped_model", lambda: (setup["int8"], None))
    s = settings(None, {"data": setup["data"]})
    assert s.formats == ["onnx_int8"] and s.models == {"onnx_int8": setup["int8"]}
    s = settings(None, {"data": setup["data"], "models": {"keras_fp32": "m.keras"}})
    assert s.formats == ["keras_fp32"]  # a Keras model alone builds nothing


def test_subset_is_stratified_and_seeded(setup, tmp_path):
    a = run_cli(setup, tmp_path / "a", "--limit", "9", "--formats", "onnx_fp32", "--e2e-format", "")
    b = run_cli(setup, tmp_path / "b", "--limit", "9", "--formats", "onnx_fp32", "--e2e-format", "")
    assert a["data"]["used"] == 9 and a["data"]["per_class"] == {c: 3 for c in CLASSES}
    assert a["data"]["inputs_sha256"] == b["data"]["inputs_sha256"]
    assert a["rows"][0]["accuracy"] == b["rows"][0]["accuracy"]


def test_config_file_then_options(tmp_path):
    cfg = tmp_path / "bench" / "shipped.toml"
    cfg.parent.mkdir()
    cfg.write_text('root = ".."\ndata = "split.csv"\nlimit = 50\nthreads = 3\n'
                   '[models]\nonnx_int8 = "models/m-int8.onnx"\n')
    s = settings(cfg, {"limit": 7, "models": {"onnx_fp32": "x.onnx"}})
    assert s.limit == 7 and s.threads == 3  # option beats config beats default
    assert s.data == tmp_path.resolve() / "split.csv"
    assert s.models["onnx_int8"] == tmp_path.resolve() / "models" / "m-int8.onnx"
    assert s.models["onnx_fp32"] == Path.cwd() / "x.onnx"
    cfg.write_text("limits = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'limits'"):
        settings(cfg, {})
    with pytest.raises(ConfigError, match="unknown"):
        settings(None, {"formats": ["onnx_fp64"]})


def test_shipped_config_is_valid():
    s = settings(Path(__file__).parent.parent / "benchmarks" / "shipped.toml", {})
    assert set(s.formats) == {f.name for f in formats.FORMATS}
    assert s.limit > 0 and s.e2e_format == "onnx_int8" and s.out.name == "benchmarks"


def test_timed_runs_counts_runs():
    calls = []
    times = timed_runs(lambda: calls.append(1), warmup=2, runs=5, seconds=0)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)


def test_keras_and_tflite_formats(tmp_path):
    """A tiny Keras model (with the 'logits' layer), its TFLite FP32 and INT8 builds, run through
    the format table's runners: same probabilities as Keras for FP32, valid ones for INT8."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(0))(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(1))(x)
    logits = keras.layers.Identity(name="logits")(x)
    path = tmp_path / "model.keras"
    keras.Model(inp, keras.layers.Softmax()(logits)).save(path)
    rng = np.random.default_rng(0)
    images = np.stack([cv2.resize(patch_image(b, b), (SIZE, SIZE))[..., None] / 255.0
                       for b in range(16)]).astype(np.float32)
    record = tiny_record(SIZE, temperature=2.0)
    split = tmp_path / "split.csv"
    folder = tmp_path / "img" / "COVID"
    folder.mkdir(parents=True)
    with split.open("w") as f:
        f.write("path,label,origin,age_group,source,sha256,group,split\n")
        for i in range(6):
            cv2.imwrite(str(folder / f"{i}.png"), patch_image(int(rng.integers(16)), i))
            f.write(f"{folder / f'{i}.png'},COVID,o,adult,,,g{i},train\n")
    options = {"record": record.to_json(), "split": str(split), "data_root": None, "calibration_images": 6, "seed": 0}
    formats.get("tflite_fp32").build(path, tmp_path / "m-fp32.tflite", options)
    info = formats.get("tflite_int8").build(path, tmp_path / "m-int8.tflite", options)
    assert info["calibration_images"] == 6
    p_keras = formats.load_keras(path, 1, record)(images)
    p_fp32 = formats.load_tflite(tmp_path / "m-fp32.tflite", 1, record)(images)
    run_int8 = formats.load_tflite(tmp_path / "m-int8.tflite", 1, record)
    p_int8 = np.concatenate([run_int8(images[:8]), run_int8(images[8:9])])  # resizes between batch sizes
    assert np.abs(p_keras - p_fp32).max() < 1e-4
    assert p_int8.shape == (9, 3) and np.allclose(p_int8.sum(1), 1.0)
    assert np.abs(p_int8 - p_keras[:9]).max() < 0.5


def test_built_files_are_rebuilt_only_when_their_inputs_change(tmp_path):
    keras = tmp_path / "model.keras"
    keras.write_bytes(b"model one")
    s = settings(None, {"calibration_images": 10})
    key = bench.build_key(keras, s, None)
    built = tmp_path / "m-fp32.tflite"
    assert bench._needs_build(built, key)  # missing
    built.write_bytes(b"x")
    assert not bench._needs_build(built, key)  # from elsewhere (no .build.json): kept
    (tmp_path / ("m-fp32.tflite" + bench.BUILD_SIDECAR)).write_text(json.dumps({"key": key}))
    assert not bench._needs_build(built, key)
    keras.write_bytes(b"model two")
    assert bench._needs_build(built, bench.build_key(keras, s, None))
    assert bench._needs_build(built, bench.build_key(keras, settings(None, {"calibration_images": 20}), None))


def test_onnx_exported_from_another_keras_model_is_noted(tmp_path):
    keras = tmp_path / "model.keras"
    keras.write_bytes(b"model")
    rows = [{"format": "onnx_int8", "path": "m.onnx", "record_source_sha256": "0" * 64},
            {"format": "onnx_fp32", "path": "f.onnx", "record_source_sha256": bench.sha256_file(keras)},
            {"format": "onnx_fp16", "path": "h.onnx", "record_source_sha256": ""}]
    notes = bench.provenance_notes(rows, keras)
    assert len(notes) == 1 and notes[0].startswith("onnx_int8 (m.onnx) was exported from another Keras model")
