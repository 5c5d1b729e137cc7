"""Which optional extra a command needs, checked before anything heavy is imported."""
from __future__ import annotations

import importlib.util

import typer

PACKAGE_OF = {"sklearn": "scikit-learn", "onnxconverter_common": "onnxconverter-common",
              "ai_edge_litert": "ai-edge-litert", "tf2onnx": "tf2onnx", "tensorflow": "tensorflow-cpu"}


def missing(*modules: str) -> list[str]:
    """The ``modules`` that cannot be imported here (looked up without importing them)."""
    out = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(module)
    return out


def require(extra: str, *modules: str) -> None:
    """Exit 2 with one line naming the extra to install if any of ``modules`` is missing."""
    lacking = missing(*modules)
    if lacking:
        names = ", ".join(PACKAGE_OF.get(m, m) for m in lacking)
        typer.echo(f'error: this command needs {names}: pip install "xray-edge[{extra}]"', err=True)
        raise typer.Exit(2)
