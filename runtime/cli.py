"""The ``xray-edge`` command line. Each subcommand lives with its own part of the toolkit; none
imports TensorFlow at import time, so ``classify`` runs on a runtime-only install."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Chest X-ray screening on cheap hardware (research aid, not a diagnostic device).")
