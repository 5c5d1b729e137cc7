"""Run the frozen base once per image view and cache its features on disk.

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
from xray_edge.preprocess import LungBox, preprocess
from xray_edge.train import augment
from xray_edge.train.data import Image

DECODER = "xray_edge.decode.read_image/v1"  # part of the cache key: change when decoding changes


def onnx_runner(onnx_bytes: bytes, output: int = 0):
    """A function batch (N, S, S, 1) float32 -> the model's ``output``-th output, on onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    name, wanted = sess.get_inputs()[0].name, [sess.get_outputs()[output].name]
    return lambda batch: sess.run(wanted, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


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
             recipe: str = "geometric") -> str:
    """Cache key of one view's features."""
    parts = {"image": image.sha256, "decoder": DECODER, "preprocessing": spec.key(), "base": base_digest,
             "view": view}
    if view:
        parts |= {"augment": augment.RECIPES[recipe], "seed": seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def extract(run_base, views: Sequence[tuple[Image, int]], spec: Preprocessing, base_digest: str,
            seed: int, cache_dir: Path, recipe: str = "geometric", lung_box: LungBox | None = None,
            batch_size: int = 16) -> tuple[np.ndarray, dict[str, Any]]:
    """Features (N, ...) float16 of every (image, view), from the cache or computed with ``run_base``
    (and then cached as one float16 .npy per view). Also counts and timing."""
    paths = [cache_dir / k[:2] / f"{k}.npy"
             for k in (view_key(im, v, spec, base_digest, seed, recipe) for im, v in views)]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        feats = run_base(np.stack([view_input(*views[i], spec, seed, recipe, lung_box) for i in idx])).astype(np.float16)
        for i, f in zip(idx, feats):
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
            with tmp.open("wb") as fh:
                np.save(fh, f)
            os.replace(tmp, paths[i])
        done = start + len(idx)
        if done % (batch_size * 25) < batch_size or done == len(todo):
            rate = (time.perf_counter() - t0) / done
            print(f"features: {done}/{len(todo)} computed, {rate:.3f} s/view, "
                  f"{rate * (len(todo) - done) / 60:.1f} min left", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    feats = np.stack([np.load(p) for p in paths])
    stats = {"views": len(views), "computed": len(todo), "from_cache": len(views) - len(todo),
             "compute_seconds": round(seconds, 1),
             "seconds_per_computed_view": round(seconds / len(todo), 4) if todo else None}
    return feats, stats
