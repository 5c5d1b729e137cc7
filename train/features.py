"""Run the frozen base once per image view and cache its outputs on disk: block5_pool (what the
frozen-base heads, the age head and the input gate learn from) and block4_pool (where block-5
fine-tuning starts, ``train.finetune``), one float16 .npy per view and output.

Keras predict of VGG-19 is ~3x slower on a small CPU than the same graph exported with tf2onnx and
run in onnxruntime, so features come from an ONNX export of the base, checked against Keras.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.contract import Preprocessing
from xray_edge.decode import read_image
from xray_edge.preprocess import RESIZE, LungBox, preprocess
from xray_edge.train import augment
from xray_edge.train.data import Image

DECODER = "xray_edge.decode.read_image/v1"  # part of the cache key: change when decoding changes


def onnx_runner(onnx_bytes: bytes, outputs: Sequence[int] = (0,)):
    """A function batch (N, S, S, 1) float32 -> the model's ``outputs`` (by position), on
    onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    name, wanted = sess.get_inputs()[0].name, [sess.get_outputs()[i].name for i in outputs]
    return lambda batch: sess.run(wanted, {name: np.ascontiguousarray(batch, dtype=np.float32)})


def compare(reference: np.ndarray, other: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Max absolute difference, relative to the reference's max magnitude, and whether it is within."""
    abs_diff = float(np.max(np.abs(reference - other)))
    rel = abs_diff / max(float(np.max(np.abs(reference))), 1e-12)
    return {"max_abs_diff": abs_diff, "max_abs_reference": float(np.max(np.abs(reference))),
            "relative_diff": rel, "tolerance": tolerance, "passed": rel < tolerance}


def weights_digest(model: Any) -> str:
    """sha256 of the model's weight values (identifies the base for the cache, random init included)."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(np.asarray(w.numpy())).tobytes())
    return h.hexdigest()


def view_input(image: Image, view: int, spec: Preprocessing, seed: int, recipe: str = "geometric",
               lung_box: LungBox | None = None) -> np.ndarray:
    """Model input (S, S, 1) of one view: view 0 is the clean image, view k >= 1 a seeded
    augmentation by the named ``recipe`` (``augment.RECIPES``)."""
    grey = read_image(image.path)
    if view:
        grey = augment.augment(grey, augment.view_rng(seed, image.sha256, view), recipe)
    return preprocess(grey, spec, lung_box=lung_box)


def view_key(image: Image, view: int, spec: Preprocessing, base_digest: str, seed: int,
             recipe: str = "geometric", output: str = "block5_pool") -> str:
    """Cache key of one view's ``output``."""
    parts = {"image": image.sha256, "decoder": DECODER, "resize": RESIZE, "preprocessing": spec.key(),
             "base": base_digest, "view": view, "output": output}
    if view:
        parts |= {"augment": augment.RECIPES[recipe], "seed": seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def extract(run_base, outputs: Sequence[str], views: Sequence[tuple[Image, int]], spec: Preprocessing,
            base_digest: str, seed: int, cache_dir: Path, recipe: str = "geometric", lung_box: LungBox | None = None,
            load: Sequence[str] | None = None, batch_size: int = 16) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The base's ``outputs`` (``run_base`` gives them in that order) for every (image, view), from
    the cache or computed (and then cached as float16 .npy, one per view and output). Returns the
    outputs named in ``load`` (default: all) as float16 arrays (N, ...), and counts and timing."""
    paths = {o: [cache_dir / k[:2] / f"{k}.npy" for k in (view_key(im, v, spec, base_digest, seed, recipe, o)
                                                         for im, v in views)] for o in outputs}
    todo = [i for i in range(len(views)) if not all(paths[o][i].is_file() for o in outputs)]
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        got = run_base(np.stack([view_input(*views[i], spec, seed, recipe, lung_box) for i in idx]))
        for o, values in zip(outputs, got):
            for i, f in zip(idx, values.astype(np.float16)):
                paths[o][i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[o][i].with_suffix(f".{os.getpid()}.tmp")
                with tmp.open("wb") as fh:
                    np.save(fh, f)
                os.replace(tmp, paths[o][i])
        done = start + len(idx)
        if done % (batch_size * 25) < batch_size or done == len(todo):
            rate = (time.perf_counter() - t0) / done
            print(f"features: {done}/{len(todo)} computed, {rate:.3f} s/view, "
                  f"{rate * (len(todo) - done) / 60:.1f} min left", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    arrays = {o: np.stack([np.load(p) for p in paths[o]]) for o in (load if load is not None else outputs)}
    stats = {"views": len(views), "computed": len(todo), "from_cache": len(views) - len(todo),
             "compute_seconds": round(seconds, 1),
             "seconds_per_computed_view": round(seconds / len(todo), 4) if todo else None}
    return arrays, stats
