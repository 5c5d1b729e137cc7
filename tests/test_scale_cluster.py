"""``classify --ray`` on a real Ray cluster on this machine: a head node and one worker node,
started as separate ``ray start`` processes (one CPU each), shared by the tests of this module.
Every run is compared row by row with ``classify`` on one machine; one test kills an inference
worker mid-run, one kills the driver and resumes."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray", reason="classify --ray needs the [scale] extra (ray[data])")

from scale_data import archive, command, read_rows, scale_model, site_profile, without_ms  # noqa: E402
from xray_edge.cli import app  # noqa: E402
from xray_edge.scale_cluster import local_cluster  # noqa: E402
from xray_edge.shards import shards_folder  # noqa: E402

pytestmark = pytest.mark.cluster

IMAGES = 240  # plus 4 JPEGs, 6 bad files and 6 hostile names
RUN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(workers=1, cpus=1, head_cpus=1) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    archive(root / "scans", IMAGES)
    archive(root / "more", 6)
    model = scale_model(root / "tiny.onnx")
    return {"scans": root / "scans", "more": sorted(str(p) for p in (root / "more").glob("img*.png")),
            "model": model, "site": site_profile(root, model)}


def local_run(data, output, *args):
    """``classify`` on one machine (no Ray) into ``output``; its rows."""
    result = CliRunner().invoke(app, ["classify", *map(str, args), "-m", str(data["model"]), "-o", str(output), "-q"])
    assert result.exit_code == 1, result.output  # the bad files
    return read_rows(output)


def start_ray_run(cluster, data, output, *args, log):
    return subprocess.Popen(command("classify", data["scans"], "-m", data["model"], "--ray", cluster.address,
                                    "-o", output, *args), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **cluster.env})


def wait_for_shards(output, proc, at_least=1):
    """Wait until the run has written ``at_least`` shards; their number."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            shards = [n for n in os.listdir(shards_folder(output)) if n.endswith(".parquet")]
        except FileNotFoundError:
            shards = []
        if len(shards) >= at_least:
            return len(shards)
        time.sleep(0.05)
    raise AssertionError(f"no shard written (exit {proc.poll()})")


def inference_actors(cluster):
    found = []
    for pid in cluster.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if title.startswith(b"ray::") and b"ChunkClassifier" in title:
            found.append(pid)
    return found


def test_ray_run_gives_the_rows_of_a_local_run(cluster, data, tmp_path):
    missing = str(tmp_path / "listed-but-nowhere.png")
    listing = tmp_path / "more.txt"
    listing.write_text("\n".join([*data["more"], missing]) + "\n")
    expected = local_run(data, tmp_path / "local.csv", data["scans"], *data["more"],
                         "--heatmaps", tmp_path / "maps-local", "--site", data["site"])
    out = tmp_path / "ray.csv"
    proc = subprocess.run(command("classify", data["scans"], listing, "-m", data["model"], "--ray", cluster.address,
                                  "-o", out, "--heatmaps", tmp_path / "maps-ray", "--site", data["site"]),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ, **cluster.env})
    assert proc.returncode == 1, proc.stderr
    rows = read_rows(out)
    lost = rows.pop()
    assert lost["path"] == missing and lost["status"] == "error"
    assert lost["reason"].startswith("file not found on Ray node ")
    assert "every node must see the files" in lost["reason"]
    assert {r["decision"] for r in expected} == {"positive", "negative", "uncertain", "rejected", "error"}
    assert {r["site"] for r in expected} == {lost["site"]} and lost["site"].startswith("clinic-a")
    for row in expected:
        row["heatmap"] = row["heatmap"].replace("maps-local", "maps-ray")
    assert without_ms(rows) == without_ms(expected)
    pictures = sorted(os.listdir(tmp_path / "maps-local"))
    assert pictures and pictures == sorted(os.listdir(tmp_path / "maps-ray"))
    assert all((tmp_path / "maps-local" / p).read_bytes() == (tmp_path / "maps-ray" / p).read_bytes() for p in pictures)
    assert not shards_folder(out).exists()
    total, failed = len(rows) + 1, sum(r["status"] != "ok" for r in rows) + 1
    assert f"... {total - 50} more rows in {out}" in proc.stdout
    lines = proc.stderr.splitlines()  # nothing of Ray's own on the terminal: the pool, then progress
    assert lines[0].startswith("Ray: 2 nodes, 2 CPUs; ") and lines[-1].startswith(
        f"classifying: {total}/{total} files, {failed} failed, "), proc.stderr
    assert all(line.startswith("classifying: ") for line in lines[1:]), proc.stderr


def test_a_worker_killed_mid_run_leaves_no_duplicate_and_no_missing_row(cluster, data, tmp_path):
    expected = local_run(data, tmp_path / "local.jsonl", data["scans"], "--batch-size", 2)
    out = tmp_path / "ray.jsonl"
    with open(tmp_path / "run.log", "wb") as log:
        proc = start_ray_run(cluster, data, out, "--batch-size", 2, log=log)  # chunks of 16 files
        done = wait_for_shards(out, proc)
        victims = inference_actors(cluster)
        assert victims, "no inference actor running"
        os.kill(victims[0], signal.SIGKILL)
        proc.wait(timeout=RUN_TIMEOUT_S)
    chunks = -(-len(expected) // 16)
    assert done < chunks, "the run ended before the kill"
    assert proc.returncode == 1, (tmp_path / "run.log").read_text()
    rows = read_rows(out)
    assert len({r["path"] for r in rows}) == len(rows) == len(expected)
    assert without_ms(rows) == without_ms(expected)


def test_resume_after_the_driver_is_killed(cluster, data, tmp_path):
    expected = {r["path"]: r for r in without_ms(local_run(data, tmp_path / "local.csv", data["scans"]))}
    out = tmp_path / "ray.csv"
    with open(tmp_path / "run.log", "wb") as log:
        proc = start_ray_run(cluster, data, out, log=log)
        wait_for_shards(out, proc)
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while inference_actors(cluster) and time.monotonic() < deadline:  # Ray ends the dead driver's job
        time.sleep(0.1)
    left = len(os.listdir(shards_folder(out)))
    resumed = subprocess.run(command("classify", data["scans"], "-m", data["model"], "--ray", cluster.address,
                                     "-o", out, "--resume"), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                             env={**os.environ, **cluster.env})
    assert resumed.returncode == 1, resumed.stderr
    assert "already done" in resumed.stdout and left
    rows = without_ms(read_rows(out))
    assert len({r["path"] for r in rows}) == len(rows) == len(expected)
    assert {r["path"]: r for r in rows} == expected


def test_an_actor_that_cannot_use_the_model_stops_the_run_in_one_line(cluster, data, tmp_path):
    """As on a node without the model file: the actor's own checks refuse it, and the driver
    says why in one line (a process of its own: Ray reads the token's variables when imported)."""
    absent = tmp_path / "absent.onnx"
    code = textwrap.dedent(f"""
        from pathlib import Path
        from xray_edge.classify import find_images, open_model
        from xray_edge.scale import make_chunks
        from xray_edge.scale_ray import ClusterError, Pool, classified_chunks, connected
        model = open_model(Path({str(data["model"])!r}))
        chunks = make_chunks(find_images([Path({str(data["scans"])!r})])[0][:16], 8)
        try:
            with connected({cluster.address!r}, Path({str(tmp_path / "ray.log")!r})):
                list(classified_chunks(chunks, model.record.preprocessing, 64_000_000, Pool(1, 1, 2, 2),
                                       {{"model": Path({str(absent)!r})}}, model.sha256, 8, None))
        except ClusterError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, **cluster.env})
    assert proc.stdout.startswith(f"a Ray actor cannot use the model: {absent}: model file not found (on Ray node "), \
        proc.stderr
    assert len(proc.stdout.splitlines()) == 1
