"""Model loading (record, input checks, threads, no telemetry), probabilities, and the prefetching
pipeline."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from images import as_uint8, write, write_bad_corpus, write_good_set, xray_like
from tiny_model import make_tiny_onnx, tiny_record
from xray_edge.contract import ModelContractError
from xray_edge.pipeline import classify_paths, prepare, prepared_batches
from xray_edge.session import load_model, predict_logits, predict_proba, softmax

SIZE = 32


@pytest.fixture
def model_path(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx", size=SIZE)


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 1), dtype=np.float32)


def test_load_reads_record_and_sets_threads(model_path):
    model = load_model(model_path, threads=2)
    assert model.record.model_name == "tiny-test-model"
    assert model.classes == ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]
    assert model.session.get_session_options().intra_op_num_threads == 2


def test_probabilities_are_softmax_of_logits_over_temperature(tmp_path):
    plain = load_model(make_tiny_onnx(tmp_path / "t1.onnx", size=SIZE))
    warm = load_model(make_tiny_onnx(tmp_path / "t3.onnx", size=SIZE, record=tiny_record(SIZE, temperature=3.0)))
    x = batch(5)
    logits = predict_logits(plain, x).astype(np.float64)
    np.testing.assert_allclose(predict_logits(warm, x), logits, rtol=1e-6)  # same weights
    for model, t in ((plain, 1.0), (warm, 3.0)):
        p = predict_proba(model, x)
        e = np.exp(logits / t)
        assert p.dtype == np.float64
        np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-6)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert not np.allclose(predict_proba(plain, x), predict_proba(warm, x))


def test_softmax_does_not_overflow():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [5e3, 5e3, 0.0]]))
    np.testing.assert_allclose(p, [[1, 0, 0], [0.5, 0.5, 0]], atol=1e-12)


def test_batching_does_not_change_results(model_path):
    model = load_model(model_path)
    x = batch(7, seed=1)
    together = predict_proba(model, x)
    one_by_one = np.concatenate([predict_proba(model, x[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5)


def test_wrong_batch_shape_is_refused(model_path):
    with pytest.raises(ValueError, match="batch of shape"):
        predict_logits(load_model(model_path), np.zeros((2, SIZE + 1, SIZE, 1), np.float32))


def test_model_without_record_is_refused(tmp_path):
    path = make_tiny_onnx(tmp_path / "bare.onnx", size=SIZE, with_record=False)
    with pytest.raises(ModelContractError, match="not an xray-edge model"):
        load_model(path)


def test_record_that_does_not_match_the_graph_is_refused(tmp_path):
    path = make_tiny_onnx(tmp_path / "odd.onnx", size=SIZE, record=tiny_record(64))
    with pytest.raises(ModelContractError, match="input shape"):
        load_model(path)


def test_unloadable_and_missing_files_are_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(ModelContractError, match="not a loadable ONNX model"):
        load_model(junk)
    with pytest.raises(ModelContractError, match="not found"):
        load_model(tmp_path / "missing.onnx")


def test_prepared_batches_keep_order_and_report_errors(tmp_path, model_path):
    spec = load_model(model_path).record.preprocessing
    good = write_good_set(tmp_path / "good")
    bad = sorted((tmp_path / "bad" / name) for name in write_bad_corpus(tmp_path / "bad"))
    paths = [p for pair in zip(good, bad) for p in pair] + bad[len(good):]
    batches = list(prepared_batches(paths, spec, batch_size=3, workers=2))
    assert [len(b) for b in batches] == [3] * (len(paths) // 3) + ([len(paths) % 3] if len(paths) % 3 else [])
    items = [p for b in batches for p in b]
    assert [p.path for p in items] == [str(p) for p in paths]
    for item in items:
        assert (item.image is None) == bool(item.error) == ("bad" in item.path)
        if item.image is not None:
            assert item.image.shape == (SIZE, SIZE, 1) and item.image.dtype == np.float32
            np.testing.assert_array_equal(item.image, prepare(item.path, spec).image)


def test_classify_paths_matches_direct_prediction(tmp_path, model_path):
    model = load_model(model_path)
    paths = [write(tmp_path / f"x{i}.png", as_uint8(xray_like(50, 40, seed=i))) for i in range(5)]
    paths.insert(2, tmp_path / "missing.png")
    results = [r for b in classify_paths(model, paths, batch_size=2, workers=2) for r in b]
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert results[2].error == "file not found"
    ok = [p for p in paths if p.exists()]
    direct = predict_proba(model, np.stack([prepare(p, model.record.preprocessing).image for p in ok]))
    np.testing.assert_allclose(np.stack([r.probs for r in results if r.ok]), direct, rtol=1e-5)
    assert all(r.ms > 0 for r in results)


TELEMETRY_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    if sys.argv[1] == "xray-edge":
        from xray_edge.session import load_model, predict_proba
        predict_proba(load_model(sys.argv[2]), np.zeros((1, 32, 32, 1), np.float32))
    else:
        import onnxruntime as ort
        ort.InferenceSession(sys.argv[2]).run(None, {"image": np.zeros((1, 32, 32, 1), np.float32)})
""")


def test_onnxruntime_writes_no_telemetry(tmp_path, model_path):
    """With HOME in a fresh folder and no CI variables (onnxruntime keeps quiet under CI),
    onnxruntime used directly creates its telemetry queue under ~/.cache; through xray-edge
    nothing is created."""

    def files_written(who):
        home = tmp_path / who
        home.mkdir()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
        proc = subprocess.run([sys.executable, "-c", TELEMETRY_CHILD, who, str(model_path)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())

    if not files_written("onnxruntime"):
        pytest.skip("this onnxruntime writes no telemetry files even when left alone")
    assert files_written("xray-edge") == []
