"""End-to-end throughput: the runtime's classify pipeline (decode + preprocess in its prefetching
thread pool, batched inference) against inference alone on already-preprocessed arrays, so the
cost of decoding shows. Run on the real images and on generated full-size clinical files: a
2500 x 2500 16-bit PNG, 3000 x 3000 DICOM (uncompressed and JPEG 2000) and 3000 x 3000 JPEG.

The rate the cores allow for a set: decoding one image takes ``d`` seconds of one core and
inference ``m`` seconds of the whole machine (all its threads), so ``C`` cores can at best finish
``1 / (d / C + m)`` images per second; the pipeline's share of that bound says how well decoding
overlaps inference."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xray_edge.benchmarks.formats import BATCH

FULLSIZE_TITLES = {"png16": "16-bit grey PNG", "dicom": "uncompressed 12-bit DICOM",
                   "dicom_j2k": "JPEG 2000 (lossless) 12-bit DICOM", "jpeg": "8-bit grey JPEG (quality 90)"}


def _upscaled(source: str, px: int, rng: np.random.Generator) -> np.ndarray:
    """A real image upscaled (bicubic) to ``px`` x ``px``, with Gaussian noise (sd 0.5 % of full
    scale) so the file does not compress unrealistically well; float in [0, 1]."""
    import cv2

    from xray_edge.decode import read_image

    big = cv2.resize(read_image(source), (px, px), interpolation=cv2.INTER_CUBIC)
    return np.clip(big + rng.normal(0.0, 0.005, big.shape).astype(np.float32), 0.0, 1.0)


def write_dicom(path: Path, pixels: np.ndarray, j2k: bool = False) -> None:
    """A single-frame MONOCHROME2 12-bit DX DICOM of ``pixels`` (values 0..4095), uncompressed or
    JPEG 2000 lossless (encoded by imagecodecs, the dev extra's encoder: ImportError without it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    stored = pixels.astype(np.uint16)
    frame = None
    if j2k:
        import imagecodecs

        frame = bytes(imagecodecs.jpeg2k_encode(stored, level=0, codecformat="J2K", reversible=True, bitspersample=12))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless if frame else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Benchmark^Generated"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([frame]) if frame else stored.tobytes()
    if frame:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


WRITERS: dict[str, tuple[str, Callable[[Path, np.ndarray], None]]] = {
    "png16": (".png", lambda p, img: _imwrite(p, np.round(img * 65535).astype(np.uint16), [])),
    "dicom": (".dcm", lambda p, img: write_dicom(p, np.round(img * 4095))),
    "dicom_j2k": (".dcm", lambda p, img: write_dicom(p, np.round(img * 4095), j2k=True)),
    "jpeg": (".jpg", lambda p, img: _imwrite(p, np.round(img * 255).astype(np.uint8), [1, 90])),  # IMWRITE_JPEG_QUALITY
}


def _imwrite(path: Path, array: np.ndarray, params: list[int]) -> None:
    import cv2

    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"cannot write {path}")


def make_fullsize(kind: str, sources: Sequence[str], out_dir: Path, px: int, seed: int = 0) -> list[str]:
    """One ``px`` x ``px`` file of ``kind`` (``WRITERS``) per source image."""
    suffix, write = WRITERS[kind]
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, src in enumerate(sources):
        path = out_dir / f"{kind}-{i:03d}{suffix}"
        write(path, _upscaled(src, px, rng))
        paths.append(str(path))
    return paths


def measure_set(model: Any, paths: Sequence[str], workers: int | None, threads: int,
                rounds: int = 1) -> dict[str, Any]:
    """Decode + preprocess alone (one file at a time), then ``rounds`` interleaved rounds of
    inference alone (batches of BATCH on the preprocessed arrays) and of the whole pipeline
    (``classify_paths``), each over all ``paths``; medians. The files are read once first, so
    all of them see the files in the OS page cache."""
    from xray_edge.pipeline import classify_paths, default_workers, prepare
    from xray_edge.session import predict_proba

    spec = model.record.preprocessing
    prepared = [prepare(p, spec) for p in paths]
    failed = [f"{p.path}: {p.error}" for p in prepared if p.image is None]
    if failed:
        raise ValueError(f"{len(failed)} images could not be decoded, e.g. {failed[0]}")
    x = np.stack([p.image for p in prepared])
    predict_proba(model, x[:BATCH])  # warm-up
    infer, e2e = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(x), BATCH):
            predict_proba(model, x[i : i + BATCH])
        infer.append((time.perf_counter() - start) / len(x))
        start = time.perf_counter()
        ok = sum(r.ok for results in classify_paths(model, paths, BATCH, workers) for r in results)
        e2e.append(time.perf_counter() - start)
    infer_s, e2e_s = float(np.median(infer)), float(np.median(e2e))
    decode_s = float(np.median([p.ms for p in prepared])) / 1000
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bound = 1 / (decode_s / cores + infer_s)
    rate = len(paths) / e2e_s
    return {
        "images": len(paths),
        "classified": ok,
        "mean_file_mb": float(np.mean([os.path.getsize(p) for p in paths]) / 2**20),
        "decode_preprocess_ms_median": decode_s * 1000,
        "inference_images_per_s": 1 / infer_s,
        "end_to_end_images_per_s": rate,
        "end_to_end_ms_per_image": e2e_s * 1000 / len(paths),
        "bound_images_per_s": bound,
        "share_of_bound": rate / bound,
        "share_of_model_rate": rate * infer_s,
        "cores": cores,
        "threads": threads,
        "decode_workers": workers or default_workers(),
        "batch": BATCH,
        "rounds": rounds,
    }


def run(path: Path, threads: int, sets: dict[str, list[str]], workers: int | None = None,
        ood: dict[str, list[str]] | None = None, cold_start: int = 0, rounds: int = 1) -> dict[str, Any]:
    """Every set through ``path`` (an ONNX model) with ``threads`` onnxruntime threads, ``rounds``
    times (``measure_set``); the heatmap cost on the first set; the input gate on the ``ood``
    sets; ``cold_start`` rounds of the cold start on the first image."""
    from xray_edge.session import load_model

    model = load_model(path, threads)
    out: dict[str, Any] = {"sets": {name: measure_set(model, paths, workers, threads, rounds)
                                    for name, paths in sets.items()}}
    first = next(iter(sets.values()), [])
    out["heatmaps"] = heatmap_cost(model, first, workers) if first else None
    out["gate"] = gate_sets(model, ood, workers) if ood else None
    if first and cold_start:
        from xray_edge.benchmarks.coldstart import measure

        out["cold_start"] = measure(path, Path(first[0]), cold_start)
    return out


def heatmap_cost(model: Any, paths: Sequence[str], workers: int | None) -> dict[str, Any]:
    """What heatmaps add per image: the pipeline with the Grad-CAM output and the overlay PNG drawn
    for every image against the pipeline without."""
    from xray_edge.heatmap import overlay, png_bytes
    from xray_edge.pipeline import classify_paths

    if model.record.outputs.cam is None or model.record.heatmap is None:
        return {"skipped": "the model has no cam output"}

    def timed(cam: bool) -> float:
        start = time.perf_counter()
        for results in classify_paths(model, paths, BATCH, workers, cam=cam):
            for r in results:
                if cam and r.ok:
                    png_bytes(overlay(r.image, r.cam[..., int(np.argmax(r.probs))], ["label"], model.record.heatmap))
        return (time.perf_counter() - start) * 1000 / len(paths)

    timed(True)  # warm-up
    without, with_maps = timed(False), timed(True)
    return {"images": len(paths), "ms_per_image_without": without, "ms_per_image_with": with_maps,
            "ms_added_per_image": with_maps - without}


def gate_sets(model: Any, sets: dict[str, list[str]], workers: int | None) -> dict[str, Any]:
    """How the record's rules (``decision.decide``, as in classify) answer each set of images the
    model was not built for: rejected by the gate, refused as unreadable/empty, or given a label."""
    from xray_edge.decision import decide
    from xray_edge.pipeline import classify_paths

    out = {}
    for name, paths in sets.items():
        counts = {"rejected": 0, "error": 0, "labelled": 0}
        labelled = []
        for results in classify_paths(model, paths, BATCH, workers):
            for r in results:
                if not r.ok:
                    counts["error"] += 1
                    continue
                d = decide(model.record, r.probs, r.age, r.ood)
                key = "rejected" if d.decision == "rejected" else "labelled"
                counts[key] += 1
                if key == "labelled":
                    labelled.append(f"{Path(r.path).name}: {d.label} ({d.decision})")
        out[name] = counts | {"images": len(paths), "refused_rate": (counts["rejected"] + counts["error"]) / len(paths),
                              "labelled_files": labelled}
    return out
