"""End-to-end throughput: the runtime's classify pipeline (decode + preprocess in its prefetching
thread pool, batched inference) against inference alone on already-preprocessed arrays, so the
cost of decoding shows. Run on the real images and on generated full-size 16-bit PNGs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.benchmarks.formats import BATCH


def make_fullsize(sources: Sequence[str], out_dir: Path, px: int, seed: int = 0) -> list[str]:
    """One ``px`` x ``px`` 16-bit grey PNG per source image: the real image upscaled (bicubic)
    plus Gaussian noise (sd 0.5 % of full scale) so the file does not compress unrealistically well."""
    import cv2

    from xray_edge.decode import read_image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, src in enumerate(sources):
        big = cv2.resize(read_image(src), (px, px), interpolation=cv2.INTER_CUBIC)
        big = big + rng.normal(0.0, 0.005, big.shape).astype(np.float32)
        path = out_dir / f"fullsize-{i:03d}.png"
        cv2.imwrite(str(path), np.round(np.clip(big, 0.0, 1.0) * 65535).astype(np.uint16))
        paths.append(str(path))
    return paths


def measure_set(model: Any, paths: Sequence[str], workers: int | None) -> dict[str, Any]:
    """Decode + preprocess alone (one file at a time), inference alone (batches of BATCH on the
    preprocessed arrays) and the whole pipeline (``classify_paths``), each over all ``paths``.
    The files are read once first, so all three see them in the OS page cache."""
    from xray_edge.pipeline import classify_paths, default_workers, prepare
    from xray_edge.session import predict_proba

    spec = model.record.preprocessing
    prepared = [prepare(p, spec) for p in paths]
    failed = [f"{p.path}: {p.error}" for p in prepared if p.image is None]
    if failed:
        raise ValueError(f"{len(failed)} images could not be decoded, e.g. {failed[0]}")
    x = np.stack([p.image for p in prepared])
    predict_proba(model, x[:BATCH])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), BATCH):
        predict_proba(model, x[i : i + BATCH])
    infer_s = time.perf_counter() - start
    start = time.perf_counter()
    ok = sum(r.ok for results in classify_paths(model, paths, BATCH, workers) for r in results)
    e2e_s = time.perf_counter() - start
    return {
        "images": len(paths),
        "classified": ok,
        "decode_preprocess_ms_median": float(np.median([p.ms for p in prepared])),
        "inference_images_per_s": len(x) / infer_s,
        "end_to_end_images_per_s": len(paths) / e2e_s,
        "end_to_end_ms_per_image": e2e_s * 1000 / len(paths),
        "decode_workers": workers or default_workers(),
        "batch": BATCH,
    }


def run(path: Path, threads: int, sets: dict[str, list[str]], workers: int | None = None) -> dict[str, Any]:
    """Every set through ``path`` (an ONNX model) with ``threads`` onnxruntime threads."""
    from xray_edge.session import load_model

    model = load_model(path, threads)
    return {name: measure_set(model, paths, workers) for name, paths in sets.items()}
