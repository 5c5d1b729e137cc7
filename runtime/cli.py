"""The ``xray-edge`` command line. Each subcommand lives with its own part of the toolkit; none
imports TensorFlow at import time, so ``classify`` runs on a runtime-only install."""
from __future__ import annotations

import typer

from .classify import classify
from xray_edge.benchmarks.cli import benchmark
from xray_edge.export.command import export
from xray_edge.train.cli import train

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Chest X-ray screening on cheap hardware (research aid, not a diagnostic device).")
app.command(name="classify")(classify)
app.command(name="train")(train)
app.command(name="export")(export)
app.command(name="benchmark")(benchmark)
