"""`xray-edge classify` on hostile input and faults: a corpus of bad files and names in every
output format, two runs on one output, kill -9 and --resume, a full disk, planted symbolic
links, escapes on the terminal, progress without a terminal, and the help text."""
import csv
import errno
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

import xray_edge.pipeline as pipeline_module
import xray_edge.results as results_module
import xray_edge.terminal as terminal_module
from images import (as_uint8, framed_blank, vr_mismatch_dicom, write, write_bad_corpus, write_good_set,
                    write_tricky_names, xray_like)
from tiny_model import make_tiny_onnx, tiny_record
from xray_edge.cli import app
from xray_edge.classify import MAX_BATCH_SIZE, available_cores
from xray_edge.results import columns, read_previous
from xray_edge.terminal import printable

SIZE = 32
CLASSES = ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]
FIELDS = columns(CLASSES)


def run(*args):
    return CliRunner().invoke(app, ["classify", *map(str, args)])


@pytest.fixture
def model_path(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx", size=SIZE)


@pytest.fixture
def good(tmp_path):
    return write_good_set(tmp_path / "good")


def parse(path):
    """Rows of a results file, parsed here independently of xray_edge.results: CSV bytes with
    undecodable bytes as surrogate escapes and one leading ' stripped from text cells."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if path.name.endswith((".csv", ".csv.partial")):
        records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
        assert records[0] == FIELDS
        return [dict(zip(FIELDS, (c[1:] if c.startswith("'") else c for c in r))) for r in records[1:]]
    if path.name.endswith((".jsonl", ".partial")):
        return [json.loads(line) for line in text.split("\n") if line]
    return json.loads(text)


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- the corpus, every format

CORPUS_CHILD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the memory bombs must not be decoded
    from typer.testing import CliRunner
    from xray_edge.cli import app
    folder, model, *outputs = sys.argv[1:]
    report = []
    for out in outputs:
        for extra in ([], ["--resume"]):
            r = CliRunner().invoke(app, ["classify", folder, "-m", model, "-o", out, "--max-pixels", "8000000",
                                         *extra])
            report.append({"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                           "exception": repr(r.exception) if not isinstance(r.exception, SystemExit) else None})
    print(json.dumps(report))
""")


def test_corpus_gives_one_row_per_file_in_every_format(tmp_path, model_path):
    """Every good file classified, every bad one exactly one error row with its reason, names
    (not UTF-8, line breaks, formulas, escapes) back exactly, also through --resume; no
    traceback, no hang, no pydicom warning, exit 1, nothing unescaped on the terminal."""
    folder = tmp_path / "inbox"
    good = [p.name for p in write_good_set(folder)] + write_tricky_names(folder)
    good.append(vr_mismatch_dicom(folder / "vr-mismatch.dcm").name)  # pydicom warns reading it
    bad = write_bad_corpus(folder)
    write(folder / "border-only.png", framed_blank())
    bad["border-only.png"] = "no image content"
    outputs = [tmp_path / f"results{s}" for s in (".csv", ".json", ".jsonl")]
    proc = subprocess.run([sys.executable, "-c", CORPUS_CHILD, str(folder), str(model_path), *map(str, outputs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # libpng prints its own error line for garbled.png (a C library writing to stderr); nothing else may
    assert [line for line in proc.stderr.splitlines() if not line.startswith("libpng error:")] == []
    report = json.loads(proc.stdout)
    expected = {os.path.join(folder, name): None for name in good} | {os.path.join(folder, n): r for n, r in bad.items()}
    for out, first, resumed in zip(outputs, report[::2], report[1::2]):
        for r in (first, resumed):
            assert r["code"] == 1 and r["exception"] is None, r
            assert "Traceback" not in r["stdout"] + r["stderr"] and "Warning" not in r["stderr"], r["stderr"]
            assert not any(c in r["stdout"] for c in "\x1b\r"), "raw control characters on the terminal"
        assert f"{len(good)} already done" in resumed["stdout"]
        assert "0 classified (" in resumed["stdout"] and f"0 rejected, {len(bad)} failed" in resumed["stdout"]
        rows = parse(out)
        assert len(rows) == len(expected), out
        got = {r["path"]: r for r in rows}
        assert set(got) == set(expected), set(got) ^ set(expected)
        for path, reason in expected.items():
            row = got[path]
            if reason is None:
                assert row["status"] == "ok" and row["label"] in CLASSES, row
            else:
                assert row["status"] == "error" and reason in row["reason"] and "\n" not in row["reason"], row
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or p.endswith((".partial", ".lock"))]


# ---------------------------------------------------------------- two runs, kill -9, full disk

SLOW_CHILD = textwrap.dedent("""
    import sys, time
    import xray_edge.pipeline as pipeline
    real = pipeline.predict
    def slow(model, batch, cam=False):
        time.sleep(float(sys.argv[1]))
        return real(model, batch, cam)
    pipeline.predict = slow
    from xray_edge.cli import app
    app(["classify", *sys.argv[2:]], prog_name="xray-edge")
""")


def slow_run(seconds_per_batch, *args):
    return subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(seconds_per_batch), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def data_lines(path):
    return len(path.read_text(errors="replace").splitlines()) - 1 if path.exists() else 0


def test_second_run_on_the_same_output_is_refused(tmp_path, model_path, good):
    out = tmp_path / "results.csv"
    first = slow_run(0.2, tmp_path / "good", "-m", model_path, "-o", out, "--batch-size", 1, "-q")
    try:
        wait_for(lambda: (tmp_path / "results.csv.partial").exists() or first.poll() is not None)
        second = run(tmp_path / "good", "-m", model_path, "-o", out)
        one_line_error(second, "being written by another xray-edge classify run", "results.csv.lock")
        stdout, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    rows = parse(out)
    assert sorted(r["path"] for r in rows) == sorted(map(str, good)) and all(r["status"] == "ok" for r in rows)


def test_kill_9_mid_run_then_resume_loses_and_repeats_nothing(tmp_path, model_path, good):
    out, partial = tmp_path / "results.csv", tmp_path / "results.csv.partial"
    victim = slow_run(0.15, tmp_path / "good", "-m", model_path, "-o", out, "--batch-size", 1, "-q")
    try:
        wait_for(lambda: data_lines(partial) >= 3)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    kept = parse(partial)
    assert 3 <= len(kept) < len(good)
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--resume", "-q")  # the stale lock file is free
    assert result.exit_code == 0, result.output
    assert f"{len(kept)} already done" in result.stdout
    rows = parse(out)
    assert rows[: len(kept)] == kept
    assert sorted(r["path"] for r in rows) == sorted(map(str, good))  # each file once


def test_csv_cut_anywhere_in_a_row_with_line_breaks_reads_back_whole_rows(tmp_path):
    out = tmp_path / "r.csv"
    names = ["/x/a\nb.png", "/x/c\rd.png", '/x/"e",\r\nf.png']
    rows = [{**{f: "" for f in FIELDS}, "path": n, "status": "error", "decision": "error", "reason": "boom", "ms": 1.0, "model": "m"}
            for n in names]
    writer = results_module.ResultsWriter(out, CLASSES, rows)
    writer.close()
    data = (tmp_path / "r.csv.partial").read_bytes()
    last = data.rindex(b'"/x/"')  # where the last row starts
    assert [r["path"] for r in read_previous(out, CLASSES)] == names
    for cut in range(last, len(data)):
        (tmp_path / "r.csv.partial").write_bytes(data[:cut])
        assert [r["path"] for r in read_previous(out, CLASSES)] == names[:2], cut


def test_full_disk_keeps_whole_batches_and_resumes(tmp_path, model_path, good, monkeypatch):
    """The write that hits ENOSPC half-way is undone; the run stops with exit 2 and one line;
    --resume finishes it once there is room."""
    out, partial = tmp_path / "results.jsonl", tmp_path / "results.jsonl.partial"
    import xray_edge.files as files_module

    real, calls = files_module.write_all, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # the header/kept rows, batch 1, then batch 2 half-written
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(files_module, "write_all", full_disk)  # new files (the partial file's start)
    monkeypatch.setattr(results_module, "write_all", full_disk)  # appended batches
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--batch-size", 3)
    one_line_error(result, "No space left on device", "results.jsonl.partial", "--resume")
    assert not out.exists()
    kept = parse(partial)
    assert [r["path"] for r in kept] == list(map(str, good[:3]))  # batch 1 whole, nothing of batch 2
    monkeypatch.undo()
    result = run(tmp_path / "good", "-m", model_path, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in parse(out)] == list(map(str, good))


# ---------------------------------------------------------------- planted links and temp files

def test_output_partial_or_lock_that_is_a_link_is_refused(tmp_path, model_path, good):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("r.csv", "r.csv.partial", "r.csv.lock"):
        (tmp_path / name).symlink_to(victim)
        one_line_error(run(tmp_path / "good", "-m", model_path, "-o", tmp_path / "r.csv"), "symbolic link", name)
        (tmp_path / name).unlink()
    assert victim.read_text() == "precious\n"


def test_predictable_temp_names_are_not_followed(tmp_path, model_path, good):
    """Links planted at the temporary names older versions used (.<name>.<pid>.tmp) are left
    alone; files are made with mkstemp and get the usual 0666-less-umask mode."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("r.json", "r.json.partial"):
        (tmp_path / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    result = run(tmp_path / "good", "-m", model_path, "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious\n"
    assert len(parse(tmp_path / "r.json")) == len(good)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask


def test_output_that_is_a_folder_fails_before_the_run(tmp_path, model_path, good, monkeypatch):
    (tmp_path / "out.csv").mkdir()
    monkeypatch.setattr(pipeline_module, "predict", lambda *a, **k: pytest.fail("the run started"))
    one_line_error(run(tmp_path / "good", "-m", model_path, "-o", tmp_path / "out.csv"), "is a folder")


# ---------------------------------------------------------------- resume, caps, CSV cells

def test_resume_from_another_working_folder_repeats_nothing(tmp_path, model_path, good, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run("good", "-m", model_path, "-o", "r.csv", "-q").exit_code == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = run("../good", "-m", model_path, "-o", "../r.csv", "--resume", "-q")
    assert result.exit_code == 0, result.output
    assert "0 classified (" in result.stdout and "0 rejected, 0 failed" in result.stdout
    assert f"{len(good)} already done" in result.stdout
    assert sorted(r["path"] for r in parse(tmp_path / "r.csv")) == sorted(map(str, good))


def test_threads_and_batch_size_are_capped(tmp_path, model_path, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(MAX_BATCH_SIZE + 6):
        write(folder / f"{i:03d}.png", as_uint8(xray_like(40, 40, seed=i)))
    import xray_edge.session as session_module
    real_load, real_predict, seen = session_module.load_model, pipeline_module.predict, {"batches": []}

    def load(path, threads, expected_sha256=None):
        seen["threads"] = threads
        return real_load(path, threads, expected_sha256)

    def predict(model, batch, cam=False):
        seen["batches"].append(len(batch))
        return real_predict(model, batch, cam)

    monkeypatch.setattr(session_module, "load_model", load)
    monkeypatch.setattr(pipeline_module, "predict", predict)
    result = run(folder, "-m", model_path, "--threads", 10_000, "--workers", 10_000, "--batch-size", 1_000_000, "-q")
    assert result.exit_code == 0, result.output
    assert seen["threads"] == available_cores()
    assert max(seen["batches"]) == MAX_BATCH_SIZE


def test_formula_cells_are_neutralised_and_read_back(tmp_path, good):
    """A text cell a spreadsheet would run gets a leading ' in the CSV; --resume reads the
    original back (here the model's name, which is written in every row)."""
    model = make_tiny_onnx(tmp_path / "m.onnx", size=SIZE, record=tiny_record(SIZE, model_name="=cmd|'/c calc'!A1"))
    out = tmp_path / "r.csv"
    assert run(tmp_path / "good", "-m", model, "-o", out, "-q").exit_code == 0
    with open(out, newline="") as f:
        cells = [r["model"] for r in csv.DictReader(f)]
    assert cells and all(c.startswith("'=cmd") for c in cells)
    result = run(tmp_path / "good", "-m", model, "-o", out, "--resume", "-q")
    assert result.exit_code == 0 and f"{len(good)} already done" in result.stdout, result.output


# ---------------------------------------------------------------- terminal, progress, help

def test_printable_escapes_what_a_terminal_would_act_on():
    name = os.fsdecode(b"a\x1b[2J\r\n\t\x7f\x9b\xff\xfe") + "\u202e.png é"
    assert printable(name) == "a\\x1b[2J\\x0d\\x0a\\x09\\x7f\\x9b\\xff\\xfe\\u202e.png é"
    assert printable("plain/name.png") == "plain/name.png"


def test_progress_without_a_terminal_is_plain_lines(tmp_path, model_path, good, monkeypatch):
    monkeypatch.setattr(terminal_module, "PROGRESS_EVERY_FILES", 3)
    result = run(tmp_path / "good", "-m", model_path, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    for n, line in zip((3, 6, len(good)), lines):
        assert line.startswith(f"classifying: {n}/{len(good)} files, 0 failed, ")
        assert re.search(r" images/s, about \d+ s left$" if n < len(good) else r" images/s$", line), line


def test_help_is_readable_and_shows_every_default():
    result = CliRunner().invoke(app, ["classify", "--help"])
    assert result.exit_code == 0
    assert "{paths}" not in result.stdout and "PATH" in result.stdout
    options = result.stdout.split("Options:")[1]
    blocks = re.split(r"\n  (?=-)", options)[1:]  # one block per option, wrapped lines included
    blocks = [" ".join(block.split()) for block in blocks if not block.startswith("--help")]
    assert len(blocks) == 13, blocks
    for block in blocks:
        assert "default" in block and "<bool>" not in block, block
