"""``xray-edge benchmark``: every model format on the same images, in one table (size, load time,
accuracy and screening metrics, agreement with FP32, latency, throughput and its share of the
CPU's int8 peak, memory, the record's gate and abstain rules), plus the classify pipeline end to
end on real and full-size clinical files, the heatmap cost and the input gate on images the
model was not built for; written as RESULTS.md, results.json, results.csv and results.png."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer


def _parse_models(items: list[str]) -> dict[str, str]:
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model takes NAME=PATH (e.g. onnx_int8=model-int8.onnx), got {item!r}")
        models[name.strip()] = path.strip()
    return models


def _command(options: dict[str, object]) -> str:
    """The command line that reproduces this run (the options given, in a fixed order)."""
    parts = ["xray-edge", "benchmark"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value == []:
            continue
        if isinstance(value, bool):
            parts.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, list):
            parts += [x for v in value for x in (flag, str(v))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def benchmark(
    config: Annotated[Optional[Path], typer.Option(help="TOML settings file (e.g. benchmarks/shipped.toml); "
                                                        "options given here override it.")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Class-folder root (one folder per class) or a split.csv.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Where a split.csv's images are now, if moved.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of the split.csv to measure on. (default: test)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seeded stratified subset of this many images (0: all). "
                                                      "[default: 300]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the subsets. (default: 0)")] = None,
    model: Annotated[Optional[list[str]], typer.Option(
        help="FORMAT=PATH, repeatable; formats: keras_fp32, onnx_fp32, onnx_fp16, onnx_int8, tflite_fp32, "
             "tflite_int8. (default: the installed model as onnx_int8)")] = None,
    formats: Annotated[Optional[str], typer.Option(
        help="Comma-separated formats to run; formats without a file are built from keras_fp32. "
             "(default: the formats given a model)")] = None,
    build: Annotated[Optional[bool], typer.Option(
        "--build/--no-build", help="Build missing formats from the Keras model (needs the train extra). "
                                   "[default: build]")] = None,
    build_dir: Annotated[Optional[Path], typer.Option(help="Where built files go. (default: artifacts)")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        help="split.csv whose training images calibrate INT8 builds. (default: --data if it is a split.csv)")] = None,
    calibration_images: Annotated[Optional[int], typer.Option(help="INT8 calibration images. (default: 200)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads for every engine. (default: all cores)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up runs at batch 1. (default: 5)")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Minimum timed runs at batch 1. (default: 30)")] = None,
    seconds: Annotated[Optional[float], typer.Option(help="Minimum timed seconds at batch 1. (default: 10)")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Limit per build or measurement, s. (default: 3600)")] = None,
    n_boot: Annotated[Optional[int], typer.Option(help="Bootstrap resamples for the CIs. (default: 1000)")] = None,
    e2e_format: Annotated[Optional[str], typer.Option(
        help="ONNX format for the end-to-end classify measurement ('' to skip). (default: onnx_int8)")] = None,
    e2e_images: Annotated[Optional[int], typer.Option(help="Real images for it. (default: 64)")] = None,
    fullsize: Annotated[Optional[int], typer.Option(
        help="Generated full-size files per kind (16-bit PNG, DICOM, JPEG 2000 DICOM, JPEG) for it. "
             "(default: 6)")] = None,
    fullsize_px: Annotated[Optional[int], typer.Option(
        help="Their width and height. (default: 2500 for PNG, 3000 for the others)")] = None,
    e2e_rounds: Annotated[Optional[int], typer.Option(
        help="Interleaved rounds of inference alone and the pipeline per set; medians reported. (default: 1)")] = None,
    gate_sets: Annotated[Optional[bool], typer.Option(
        "--gate-sets/--no-gate-sets", help="Run the input gate on photos, CT/MR slices and generated images. "
                                           "[default: gate-sets]")] = None,
    peak: Annotated[Optional[bool], typer.Option(
        "--peak/--no-peak", help="Measure the CPU's int8 peak (a 3 s micro-benchmark). [default: peak]")] = None,
    cold_start: Annotated[Optional[int], typer.Option(
        help="Rounds of the cold-start measurement: classify one image in a fresh process vs a bare script "
             "(0: none). (default: 7)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for RESULTS.md and results.*. (default: a new folder runs/benchmark-<date>-<time>)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite results already in --out.")] = False,
) -> None:
    """Benchmark model formats (Keras, ONNX FP32/FP16/INT8, TFLite FP32/INT8) on the same images
    (needs the bench extra: pip install "xray-edge[bench]"; Keras/TFLite rows and builds need
    the train extra)."""
    from xray_edge.extras import require

    require("bench", "sklearn")
    from xray_edge.benchmarks import bench, report
    from xray_edge.benchmarks.config import settings

    given = dict(data=data, data_root=data_root, split=split, limit=limit, seed=seed, model=model,
                 formats=formats, build=build, build_dir=build_dir, calibration=calibration,
                 calibration_images=calibration_images, threads=threads, warmup=warmup, runs=runs,
                 seconds=seconds, timeout=timeout, n_boot=n_boot, e2e_format=e2e_format, e2e_images=e2e_images,
                 fullsize=fullsize, fullsize_px=fullsize_px, e2e_rounds=e2e_rounds, gate_sets=gate_sets, peak=peak,
                 cold_start=cold_start,
                 out=out)
    command = _command({"config": config, **given, "force": force or None})
    try:
        options = {k: v for k, v in given.items() if k != "model"}
        options["models"] = _parse_models(model) if model else None
        options["formats"] = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
        s = settings(config, options)
        existing = [p for p in report.FILES.values() if (s.out / p).exists()]
        if existing and not force:
            raise ValueError(f"{s.out} already holds results ({', '.join(existing)}); give another --out or --force")
        results = bench.run(s, command)
    except ValueError as e:  # ConfigError, BenchmarkError, data and record errors: one line
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    files = report.write_all(results, s.out)
    typer.echo(report.table(results["rows"]))
    for name, e2e in ((results.get("e2e") or {}).get("sets") or {}).items():
        typer.echo(f"end to end ({name}): {e2e['end_to_end_images_per_s']:.1f} img/s through classify vs "
                   f"{e2e['inference_images_per_s']:.1f} img/s inference alone; decode + preprocess "
                   f"{e2e['decode_preprocess_ms_median']:.1f} ms/img")
    for note in results["notes"]:
        typer.echo(f"note: {note}")
    typer.echo("wrote " + ", ".join(str(p) for p in files.values()))
    if not any(r["status"] == "ok" for r in results["rows"]):
        raise typer.Exit(1)
