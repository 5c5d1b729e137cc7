"""The ``xray-edge`` command line. Each subcommand lives with its own part of the toolkit and is
imported only when it is run or listed (``xray-edge classify`` loads neither the training, the
export nor the benchmark code: a faster cold start); none imports TensorFlow at import time, so
``classify`` runs on a runtime-only install."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib import import_module

import typer

# subcommand -> (module, function)
COMMANDS = {"classify": ("xray_edge.classify", "classify"), "train": ("xray_edge.train.cli", "train"),
            "export": ("xray_edge.export.command", "export"), "benchmark": ("xray_edge.benchmarks.cli", "benchmark"),
            "serve": ("xray_edge.node.command", "serve"), "calibrate": ("xray_edge.calibrate", "calibrate")}
HELP = "Chest X-ray screening on cheap hardware (research aid, not a diagnostic device)."


def build(names: Iterable[str] = COMMANDS) -> typer.Typer:
    """The application with the named subcommands (all of them by default)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help=HELP)
    app.callback()(_group)
    for name in names:
        module, function = COMMANDS[name]
        app.command(name=name)(getattr(import_module(module), function))
    return app


def _group() -> None:
    """A group callback keeps ``xray-edge NAME ...`` a subcommand even when only NAME is built."""


def main() -> None:
    """Console entry point: builds only the subcommand being run; every one for help or a typo."""
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    build([name] if name in COMMANDS else COMMANDS)()


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the full application (``from xray_edge.cli import app``, as the tests use it)
        return build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
