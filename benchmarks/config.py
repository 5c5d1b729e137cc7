"""Benchmark settings: built-in defaults, overridden by a TOML config file, overridden by
command-line options. Relative paths in a config file are taken from its ``root`` key (itself
relative to the config file's folder; default: that folder); on the command line, from the
current folder.

What is measured: the formats named in ``formats``, else every format given a model file; with
neither, the model installed with the package (``onnx_int8``, the one ``classify`` uses)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from xray_edge.benchmarks.formats import FORMATS

FULLSIZE = {"png16": 2500, "dicom": 3000, "dicom_j2k": 3000, "jpeg": 3000}  # generated full-size formats, px


def shown(path: Path | str) -> str:
    """``path`` relative to the current folder when inside it (results travel between machines)."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


class ConfigError(ValueError):
    """A config file or option cannot be used (one-line message)."""


@dataclass
class Settings:
    data: Path | None = None  # class-folder root or split.csv
    data_root: Path | None = None  # where a split manifest's images are now (re-rooting)
    split: str = "test"
    limit: int = 300  # seeded stratified subset size (0: every image)
    seed: int = 0
    models: dict[str, Path] = field(default_factory=dict)  # format name -> file
    formats: list[str] = field(default_factory=list)  # empty: every format given a model (see module doc)
    build: bool = True  # build missing formats from models["keras_fp32"]
    build_dir: Path = Path("artifacts")
    calibration: Path | None = None  # split.csv for INT8 calibration (default: data, if a manifest)
    calibration_images: int = 200
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    warmup: int = 5
    runs: int = 30
    seconds: float = 10.0
    timeout: float = 3600.0  # per child process (build or measurement)
    n_boot: int = 1000
    e2e_format: str = "onnx_int8"  # "" skips the end-to-end measurement
    e2e_images: int = 64  # real images through the classify pipeline
    fullsize: int = 6  # generated full-size images per format in FULLSIZE (0: none)
    fullsize_px: int = 0  # 0: each format's size in FULLSIZE
    e2e_rounds: int = 1  # interleaved rounds of inference alone and the pipeline per set; medians reported
    gate_sets: bool = True  # the input gate on out-of-distribution images (photos, CT/MR, blank, text)
    peak: bool = True  # the int8 peak micro-benchmark
    cold_start: int = 7  # rounds of the cold-start measurement (0: none)
    out: Path | None = None  # None: a new folder runs/benchmark-<date>-<time>
    force: bool = False  # overwrite results already in out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: ({n: shown(p) for n, p in v.items()} if k == "models" else shown(v) if isinstance(v, Path) else v)
                for k, v in d.items()}


PATH_KEYS = {"data", "data_root", "build_dir", "calibration", "out"}


def _coerce(key: str, value: Any, base: Path) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    if key not in kinds:
        raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(kinds))}")
    if key in PATH_KEYS:
        return None if value in (None, "") else base / Path(value).expanduser()
    if key == "models":
        if not isinstance(value, dict):
            raise ConfigError("models must be a table of format = path")
        known = {f.name for f in FORMATS}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"models: unknown formats {unknown}; known: {', '.join(sorted(known))}")
        return {k: base / Path(v).expanduser() for k, v in value.items()}
    return value


def read_config(path: Path) -> dict[str, Any]:
    """Settings from a TOML file, paths resolved."""
    try:
        import tomllib
    except ModuleNotFoundError:
        raise ConfigError(f"{path}: TOML config files need Python 3.11 or newer; give the settings as options"
                          ) from None
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base = (path.parent / raw.pop("root", ".")).resolve()
    return {k: _coerce(k, v, base) for k, v in raw.items()}


def settings(config: Path | None, options: dict[str, Any]) -> Settings:
    """Defaults <- config file <- command-line ``options`` (None means not given)."""
    merged = read_config(config) if config else {}
    given = {k: _coerce(k, v, Path.cwd()) for k, v in options.items() if v is not None}
    models = {**merged.get("models", {}), **given.pop("models", {})}
    merged |= given | {"models": models}
    s = Settings(**merged)
    if not s.formats:
        if not s.models:
            from xray_edge.classify import shipped_model

            shipped = shipped_model()
            if shipped is None:
                raise ConfigError("no model given and none is installed: give --model FORMAT=PATH")
            s.models = {"onnx_int8": shipped[0]}
        s.formats = [f.name for f in FORMATS if f.name in s.models]
    if s.out is None:
        s.out = Path("runs") / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    unknown = [f for f in s.formats if f not in {x.name for x in FORMATS}]
    if unknown:
        raise ConfigError(f"formats: unknown {unknown}; known: {', '.join(f.name for f in FORMATS)}")
    if s.e2e_format and not s.e2e_format.startswith("onnx_"):
        raise ConfigError(f"e2e_format must be an ONNX format (the runtime runs ONNX), got {s.e2e_format!r}")
    for key in ("limit", "warmup", "calibration_images", "e2e_images", "fullsize", "fullsize_px", "n_boot", "cold_start"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{key} must be >= 0")
    if s.threads < 1 or s.runs < 1 or s.e2e_rounds < 1:
        raise ConfigError("threads, runs and e2e_rounds must be >= 1")
    return s
