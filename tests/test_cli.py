"""The command line as a new user meets it: help that names each command's extra, one-line
install hints instead of tracebacks when an extra is missing, and a fast, light start."""
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import xray_edge.extras as extras
from xray_edge.cli import app


@pytest.mark.parametrize("command, extra", [("train", "train"), ("export", "train"), ("benchmark", "bench")])
def test_help_names_the_extra(command, extra, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and f'pip install "xray-edge[{extra}]"' in result.stdout


@pytest.mark.parametrize("args, extra", [
    (["train", "data", "--weights", "none"], "train"),
    (["export", "missing/model.keras"], "train"),
    (["benchmark", "--data", "folder"], "bench"),
])
def test_a_missing_extra_gives_one_install_line(args, extra, monkeypatch):
    monkeypatch.setattr(extras, "missing", lambda *modules: list(modules))  # as in a runtime-only install
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f'pip install "xray-edge[{extra}]"' in lines[0]


def test_the_command_line_imports_no_model_code():
    code = ("import sys; import xray_edge.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'cv2', 'onnxruntime', 'pydicom', "
            "'tensorflow', 'onnx', 'sklearn', 'rich'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_console_entry_builds_only_the_command_it_runs():
    """``xray-edge classify ...`` imports neither training, export nor benchmark code (cold
    start); ``xray-edge --help`` still lists every command."""
    code = ("import sys; from xray_edge import cli; sys.argv = ['xray-edge'] + sys.argv[1:]\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('xray_edge.train', 'xray_edge.export', "
            "'xray_edge.benchmarks'))))")
    run = lambda *args: subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,  # noqa: E731
                                       check=True).stdout
    out = run("classify", "--help")
    assert "Usage: xray-edge classify" in out and out.strip().endswith("[]")
    listing = run("--help")
    assert all(name in listing for name in ("classify", "train", "export", "benchmark"))
