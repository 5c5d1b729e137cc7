"""Cold start: from process start to a result. ``xray-edge classify IMAGE`` against a bare script
that only imports onnxruntime and OpenCV, decodes and preprocesses the image the simplest way
(with the model's lung crop, if its recipe has one: the same lung model, a plain bounding box) and
runs the same model, and ``xray-edge --help``; each a fresh process, the three interleaved in
rounds, medians reported."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BARE = """
import sys
import cv2, numpy as np, onnxruntime as ort
model, image, crop, lungs = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
size = session.get_inputs()[0].shape[1]
grey = cv2.imread(image, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255

def stretch(x):
    lo, hi = np.percentile(x, (0.5, 99.5))
    return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)

if lungs:  # the lung box: bounding box of the lung model's mask, plus 10 %
    seg = ort.InferenceSession(lungs, providers=["CPUExecutionProvider"])
    n = seg.get_inputs()[0].shape[1]
    small = stretch(cv2.resize(grey, (n, n), interpolation=cv2.INTER_AREA))[None, :, :, None]
    mask = seg.run(None, {seg.get_inputs()[0].name: small})[0][0, :, :, 0] >= 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows):
        h, w = grey.shape
        t, b, l, r = rows[0] / n, (rows[-1] + 1) / n, cols[0] / n, (cols[-1] + 1) / n
        dy, dx = 0.1 * (b - t), 0.1 * (r - l)
        grey = grey[int(max(0, t - dy) * h): int(min(1, b + dy) * h), int(max(0, l - dx) * w): int(min(1, r + dx) * w)]
h, w = grey.shape
grey = grey[round(h * crop): h - round(h * crop), round(w * crop): w - round(w * crop)]
x = stretch(cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA))[None, :, :, None]
print(session.run(["logits"], {"image": x})[0])
"""


def _seconds(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return elapsed


def measure(model: Path, image: Path, rounds: int = 7) -> dict[str, Any]:
    """Median seconds of each command over ``rounds`` interleaved rounds, after one warm-up round
    that puts the files in the page cache and Python's bytecode cache in place (as a pip install
    does; PYTHONDONTWRITEBYTECODE is dropped). The shipped model is run as a user runs it, without
    ``--model`` (checked against its pinned sha256)."""
    from xray_edge.classify import shipped_model
    from xray_edge.lungs import model_path
    from xray_edge.session import load_model

    script = Path(sys.executable).with_name("xray-edge")  # the console script a user runs
    cli = [str(script)] if script.is_file() else [shutil.which("xray-edge") or "xray-edge"]
    shipped = shipped_model()
    is_shipped = shipped is not None and shipped[0].resolve() == model.resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    spec = load_model(model).record.preprocessing  # the bare script does the same crops
    commands = {
        "classify": [*cli, "classify", str(image), "--quiet", *([] if is_shipped else ["--model", str(model)])],
        "bare_script": [sys.executable, "-c", BARE, str(model), str(image), str(spec.crop_fraction),
                        str(model_path(spec.lung_crop)) if spec.lung_crop else ""],
        "help": [*cli, "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(rounds + 1):
        for name, command in commands.items():
            t = _seconds(command, env)
            if r:
                times[name].append(t)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"rounds": rounds, "seconds": median, "classify_over_bare": median["classify"] / median["bare_script"],
            "shipped_model": is_shipped,
            "method": "fresh process each; classify of one image (the shipped model as installed, else --model) vs "
                      "a bare onnxruntime + OpenCV script on the same image and model; bytecode cached; "
                      "interleaved rounds after one warm-up round, median"}
