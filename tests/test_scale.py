"""``classify --ray`` without a cluster: the worker code against ``classify``'s own rows, the
shards, the merge and resume rules, path lists and the one-line refusals (the cluster runs are in
test_scale_cluster.py)."""
import json
import os
import pickle
import subprocess
import sys

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray", reason="classify --ray needs the [scale] extra (ray[data])")

from scale_data import archive, read_rows, scale_model, without_ms  # noqa: E402
from tiny_model import make_tiny_onnx, tiny_record  # noqa: E402
from xray_edge.classify import find_images, open_model, row_for  # noqa: E402
from xray_edge.cli import app  # noqa: E402
from xray_edge.contract import ModelContractError  # noqa: E402
from xray_edge.pipeline import classify_paths  # noqa: E402
from xray_edge.results import ResultsWriter, columns  # noqa: E402
from xray_edge.scale import earlier_rows, lost_chunk_rows, make_chunks, merge, read_path_list  # noqa: E402
from xray_edge.scale_ray import ClusterError, Pool, pool_for  # noqa: E402
from xray_edge.scale_workers import ChunkClassifier, prepare_chunk  # noqa: E402
from xray_edge.shards import chunk_name, read_shard, shard_path, shards_folder, write_shard  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    archive(root / "scans", 40)
    return root / "scans"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return scale_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def local_rows(model, files, batch_size=8):
    return [row_for(r, model) for batch in classify_paths(model, files, batch_size) for r in batch]


def test_a_chunk_through_the_worker_code_gives_classifys_rows(folder, model_path):
    model = open_model(model_path)
    files = find_images([folder])[0]
    expected = local_rows(model, files)
    assert {r["decision"] for r in expected} >= {"positive", "negative", "uncertain", "rejected", "error"}
    actor = ChunkClassifier({"model": model_path}, 1, model.sha256, batch_size=8)
    got = []
    for name, paths in make_chunks(files, 8):
        prepared = prepare_chunk({"chunk": name, "paths": [os.fsencode(p) for p in paths]},
                                 model.record.preprocessing, 64_000_000)
        out = actor({"chunk": [name], "prepared": [prepared["prepared"]]})
        assert out["chunk"] == [name]
        got += [json.loads(line) for line in out["rows"][0].splitlines()]
    assert without_ms(got) == without_ms(expected)


def test_every_actor_checks_the_model(tmp_path, model_path):
    tampered = make_tiny_onnx(tmp_path / "tampered.onnx", size=32, record=tiny_record(32))
    data = bytearray(tampered.read_bytes())
    at = data.find(b"tiny-test-model")
    data[at:at + 4] = b"TINY"  # the record no longer matches its seal
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelContractError):
        ChunkClassifier({"model": tampered}, 1, "0" * 64, batch_size=8)
    with pytest.raises(ModelContractError, match="install the same model on every node"):
        ChunkClassifier({"model": model_path}, 1, "0" * 64, batch_size=8)


def test_a_file_a_worker_cannot_see_is_an_error_row_naming_the_node(tmp_path, model_path):
    model = open_model(model_path)
    gone = str(tmp_path / "only-on-the-driver.png")
    out = prepare_chunk({"chunk": "c", "paths": [os.fsencode(gone)]}, model.record.preprocessing, 64_000_000)
    prepared = pickle.loads(out["prepared"])
    assert prepared[0].image is None
    assert prepared[0].error.startswith("file not found on Ray node ") and "every node must see" in prepared[0].error


def test_chunks_are_whole_batches_named_by_their_paths(monkeypatch):
    files = [f"/a/{i}.png" for i in range(100)]
    chunks = make_chunks(files, 4)
    assert [len(paths) for _, paths in chunks] == [32, 32, 32, 4]
    assert [p for _, paths in chunks for p in paths] == files
    assert make_chunks(files, 4) == chunks and chunks[0][0] == chunk_name(files[:32])
    assert make_chunks(files[32:], 4)[0][0] == chunks[1][0]
    monkeypatch.setattr("xray_edge.scale.MAX_CHUNKS", 2)
    assert [len(paths) for _, paths in make_chunks(files, 4)] == [52, 48]  # 13 batches per chunk


def test_shards_round_trip_any_name_and_rewrite_to_the_same_rows(tmp_path, folder, model_path):
    model = open_model(model_path)
    rows = local_rows(model, find_images([folder])[0])
    output = tmp_path / "out.csv"
    write_shard(output, "chunk-a", rows)
    write_shard(output, "chunk-a", rows)  # Ray ran the chunk twice
    assert read_shard(shard_path(output, "chunk-a"), model.classes) == rows
    assert sorted(os.listdir(shards_folder(output))) == ["chunk-a.parquet"]  # no temporary file left


def test_merge_keeps_one_row_per_file_in_file_order(tmp_path, folder, model_path):
    model = open_model(model_path)
    files = find_images([folder])[0]
    rows = local_rows(model, files)
    output = tmp_path / "out.jsonl"
    chunks = make_chunks(files, 8)
    at = 0
    for name, paths in chunks:
        write_shard(output, name, rows[at:at + len(paths)])
        at += len(paths)
    keep = rows[:3]  # done by an earlier run: written once, first
    shown, decisions, labels = merge(output, model, keep, chunks)
    assert without_ms(read_rows(output)) == without_ms(rows)
    assert shown == rows[3:53] and sum(decisions.values()) == len(rows) - 3
    assert sum(labels.values()) == sum(r["status"] == "ok" for r in rows[3:])


def test_resume_keeps_results_and_shards_and_retries_failures(tmp_path, folder, model_path):
    model = open_model(model_path)
    rows = local_rows(model, find_images([folder])[0])
    assert any(r["status"] == "error" for r in rows[:20])
    output = tmp_path / "out.csv"
    writer = ResultsWriter(output, model.classes, [])
    writer.write(rows[:10])  # a finished run
    writer.publish()
    redone = next(r for r in rows[:10] if r["status"] == "ok")
    newer = dict(redone, reason="from the shard")  # a later, unfinished run: its shards win
    write_shard(output, "chunk-b", [newer, *rows[10:20]])
    keep = earlier_rows(output, model)
    assert [r["path"] for r in keep] == [r["path"] for r in rows[:20] if r["status"] != "error"]
    assert [r for r in keep if r["path"] == redone["path"]] == [newer]


def test_a_chunk_ray_gave_up_on_gets_error_rows(model_path):
    model = open_model(model_path)
    rows = lost_chunk_rows(["/x/a.png", "/x/b.png"], model)
    assert [r["path"] for r in rows] == ["/x/a.png", "/x/b.png"]
    assert all(r["status"] == "error" and "--resume retries it" in r["reason"] for r in rows)
    assert list(rows[0]) == columns(model.classes)


def test_the_actor_pool_leaves_a_cpu_for_decoding():
    assert pool_for([1, 1], 0) == Pool(threads=1, max_actors=1, nodes=2, cpus=2)
    assert pool_for([0, 16, 16], 0) == Pool(threads=4, max_actors=7, nodes=2, cpus=32)
    assert pool_for([2, 8], 0) == Pool(threads=1, max_actors=9, nodes=2, cpus=10)
    assert pool_for([4, 4], 3) == Pool(threads=3, max_actors=2, nodes=2, cpus=8)
    for cpus, threads, message in (([1], 0, "needs 2: 1 for an inference actor"), ([0], 0, "no CPUs"),
                                   ([4, 4], 6, "no Ray node has that many CPUs"), ([4], 4, "needs 5")):
        with pytest.raises(ClusterError, match=message):
            pool_for(cpus, threads)


def test_a_path_list_is_one_path_per_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "paths.txt"
    name = os.fsencode(os.fsdecode(b"odd-\xff.png"))
    listing.write_bytes(b"/abs/one.png\r\n\nrelative/two.png\n" + name + b"\n   \n/abs/one.png\n")
    assert read_path_list(listing) == ["/abs/one.png", str(tmp_path / "relative/two.png"),
                                       os.path.join(str(tmp_path), os.fsdecode(name)), "/abs/one.png"]


@pytest.mark.parametrize("args, message", [
    (["{folder}", "--ray", "local"], "--ray needs --output"),
    (["{folder}", "--ray", "local", "-o", "{tmp}/r.csv", "--report", "{tmp}/r.html"],
     "--report is not available with --ray"),
    (["{tmp}/binary.list", "--ray", "local", "-o", "{tmp}/r.csv"], "nor a list of paths (it holds binary data)"),
    (["{tmp}/empty.txt", "--ray", "local", "-o", "{tmp}/r.csv"], "no images found"),
    (["{tmp}/missing", "--ray", "local", "-o", "{tmp}/r.csv"], "no such file or folder"),
])
def test_refusals_are_one_line_before_any_cluster(tmp_path, folder, model_path, args, message):
    (tmp_path / "binary.list").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (tmp_path / "empty.txt").write_text("\n")
    args = [a.format(tmp=tmp_path, folder=folder) for a in args]
    result = CliRunner().invoke(app, ["classify", "-m", str(model_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_without_ray_installed_it_names_the_extra(tmp_path, folder, model_path):
    code = ("import sys; sys.modules['ray'] = None; from xray_edge.cli import main; "
            f"sys.argv = ['xray-edge', 'classify', {str(folder)!r}, '-m', {str(model_path)!r}, '--ray', 'local', "
            f"'-o', {str(tmp_path / 'r.csv')!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'error: this command needs ray: pip install "xray-edge[scale]"'
