"""Decode + preprocess speed on full-size clinical-like files: the full-resolution decode against
the runtime's path (pipeline.prepare: reduced-resolution JPEG and JPEG 2000, block-averaged
uncompressed DICOM, integer crop before float), with the difference between the model inputs they give. Without
``--model`` it measures the default recipe (border crop) and needs no model; with one (``shipped``: the installed
model), that model's recipe (the shipped one's lung crop) and how much its probabilities differ between the paths.

    python -m xray_edge.benchmarks.decode_speed --data ../shared/data/cxr3 --n 6 [--model shipped]

Files are made from real images (bicubic upscale + Gaussian noise, sd 0.5 % of full scale, so
they do not compress unrealistically well): 2500x2500 16-bit PNG, 3000x3000 uncompressed 12-bit
DICOM, 3000x3000 JPEG 2000 lossless 12-bit DICOM (with imagecodecs, the dev extra's encoder),
3000x3000 8-bit JPEG quality 90. Times are medians of one image at a time on one thread, the two
paths interleaved file by file.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import cv2
import numpy as np

from xray_edge.benchmarks.e2e import write_dicom
from xray_edge.contract import Preprocessing
from xray_edge.classify import shipped_model
from xray_edge.decode import read_grey, read_image
from xray_edge.lungs import finder_for
from xray_edge.pipeline import prepare
from xray_edge.preprocess import min_decoded_side, preprocess
from xray_edge.session import LoadedModel, load_model, predict_proba


def real_images(folder: Path, n: int) -> list[np.ndarray]:
    """``n`` grey float images spread over the PNG/JPEG files under ``folder`` (sorted order)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no PNG or JPEG images under {folder}")
    return [read_image(files[i * len(files) // n]) for i in range(n)]


def upscale(img: np.ndarray, px: int, rng: np.random.Generator) -> np.ndarray:
    big = cv2.resize(img, (px, px), interpolation=cv2.INTER_CUBIC)
    return np.clip(big + rng.normal(0.0, 0.005, big.shape).astype(np.float32), 0.0, 1.0)


def make_files(images: list[np.ndarray], out: Path, seed: int = 0) -> dict[str, list[Path]]:
    """The full-size files, by format name (JPEG 2000 only where imagecodecs can encode it)."""
    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
        print("JPEG 2000: skipped, no encoder (pip install imagecodecs)")
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {"PNG 16-bit 2500x2500": [], "DICOM 12-bit 3000x3000": [],
                                    "JPEG q90 3000x3000": []}
    if imagecodecs:
        files["DICOM JPEG 2000 lossless 12-bit 3000x3000"] = []
    for i, img in enumerate(images):
        png = out / f"{i}.png"
        cv2.imwrite(str(png), np.round(upscale(img, 2500, rng) * 65535).astype(np.uint16))
        files["PNG 16-bit 2500x2500"].append(png)
        big = upscale(img, 3000, rng)
        stored = np.round(big * 4095).astype(np.uint16)
        write_dicom(out / f"{i}.dcm", stored)
        files["DICOM 12-bit 3000x3000"].append(out / f"{i}.dcm")
        if imagecodecs:
            write_dicom(out / f"{i}-j2k.dcm", stored, j2k=True)
            files["DICOM JPEG 2000 lossless 12-bit 3000x3000"].append(out / f"{i}-j2k.dcm")
        jpg = out / f"{i}.jpg"
        cv2.imwrite(str(jpg), np.round(big * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        files["JPEG q90 3000x3000"].append(jpg)
    return files


def measure(paths: list[Path], spec: Preprocessing, rounds: int, model: LoadedModel | None = None) -> dict[str, object]:
    """Median ms per image of the full decode and of the runtime's path (interleaved), and the
    largest per-image max and mean absolute difference between their model inputs (with a lung
    crop, each path finds its own box); with ``model``, the largest difference between the
    probabilities it gives the two inputs and how many files keep their argmax."""
    full_ms, new_ms, max_abs, mean_abs, inputs = [], [], 0.0, 0.0, []
    lung_box = finder_for(spec)
    for r in range(rounds):
        for path in paths:
            start = time.perf_counter()
            full = preprocess(read_image(path), spec, lung_box=lung_box)
            full_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            new = prepare(path, spec).image
            new_ms.append((time.perf_counter() - start) * 1000)
            diff = np.abs(new - full)
            max_abs, mean_abs = max(max_abs, float(diff.max())), max(mean_abs, float(diff.mean()))
            if r == 0:
                inputs.append((full, new))
    decoded = read_grey(paths[0], min_side=min_decoded_side(spec))[0].shape
    out = {"full": median(full_ms), "new": median(new_ms), "max_abs": max_abs, "mean_abs": mean_abs,
           "decoded": f"{decoded[1]}x{decoded[0]}"}
    if model is not None:
        p_full, p_new = (predict_proba(model, np.stack([pair[i] for pair in inputs])) for i in (0, 1))
        out |= {"max_dp": float(np.abs(p_full - p_new).max()),
                "same_argmax": f"{int((p_full.argmax(1) == p_new.argmax(1)).sum())}/{len(inputs)}"}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of real PNG/JPEG images")
    parser.add_argument("--n", type=int, default=6, help="images per format")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the files")
    parser.add_argument("--model", help="'shipped' or a model file: its recipe (e.g. the lung crop), and how much "
                                        "its probabilities differ between the two paths [default: the default "
                                        "recipe, no model]")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # one thread, as in one decoding worker
    model = None
    if args.model:
        path, pin = shipped_model() if args.model == "shipped" else (Path(args.model), None)
        model = load_model(path, threads=1, expected_sha256=pin)
    spec = model.record.preprocessing if model else Preprocessing()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores; making files ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="xray-edge-decode-") as tmp:
        files = make_files(real_images(args.data, args.n), Path(tmp))
        print(f"{'format':<42} {'full ms':>8} {'new ms':>8} {'speed-up':>8}  {'decoded at':<10} "
              f"{'max abs':>8} {'mean abs':>9}" + ("  max |dp|  same argmax" if model else ""))
        for name, paths in files.items():
            r = measure(paths, spec, args.rounds, model)
            print(f"{name:<42} {r['full']:8.1f} {r['new']:8.1f} {r['full'] / r['new']:7.1f}x  {r['decoded']:<10} "
                  f"{r['max_abs']:8.4f} {r['mean_abs']:9.5f}"
                  + (f"  {r['max_dp']:8.4f}  {r['same_argmax']:>11}" if model else ""), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} (other work on the machine slows and scatters the times)")


if __name__ == "__main__":
    main()
