"""Test images for comparing installs: N real X-rays picked from data roots, or generated ones.

With ``--data ROOT...`` (data roots as training reads them: a manifest.csv or class folders):
a fixed, seeded pick of N images spread over the (origin, class) groups in turn, leaving out
films whose label another source contradicts; copied into OUT_DIR under their own names.

Without: synthetic radiograph-like images (fixed seed): bright body, two dark lung fields with
rib stripes, an optional opacity and noise; cycling through 8-bit grey PNG, 16-bit grey PNG,
colour JPEG and colour PNG at random sizes, so a cross-platform check also covers the decoders
and the resize. Not X-rays (the input gate rejects them): for checking that two installs agree,
never for judging a model. Needs numpy and opencv (runtime install).

    python deploy/make_images.py OUT_DIR [N] [--data ROOT...]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

KINDS = (("png", 8, 1), ("png", 16, 1), ("jpg", 8, 3), ("png", 8, 3))  # format, bits, channels


def synthetic_radiograph(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A grey (h, w) float image in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w], dtype=float)[:, None, None]
    body = np.exp(-((xx - 0.5) ** 2 / 0.12 + (yy - 0.5) ** 2 / 0.3))
    lungs = sum(np.exp(-((xx - cx) ** 2 / rng.uniform(0.01, 0.03) + (yy - 0.45) ** 2 / rng.uniform(0.04, 0.08)))
                for cx in (0.32 + rng.normal(0, 0.02), 0.68 + rng.normal(0, 0.02)))
    ribs = 0.08 * np.sin(yy * rng.uniform(30, 60)) ** 2 * (lungs > 0.2)
    cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.75)
    opacity = rng.uniform(0, 0.5) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / rng.uniform(0.005, 0.03))
    noise = rng.normal(0, 0.03, (h, w))
    return np.clip(0.15 + 0.7 * body - 0.45 * lungs + ribs + opacity + noise, 0, 1)


def write_images(out: Path, n: int, seed: int = 2024) -> list[Path]:
    """Write ``n`` images into ``out`` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        ext, bits, chans = KINDS[i % len(KINDS)]
        h, w = (int(v) for v in rng.integers(256, 640, size=2))
        img = (synthetic_radiograph(rng, h, w) * (2**bits - 1)).astype(np.uint16 if bits == 16 else np.uint8)
        if chans == 3:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        path = out / f"image{i:02d}_{bits}bit_{chans}ch.{ext}"
        if not cv2.imwrite(str(path), img):
            raise OSError(f"{path}: cannot write")
        paths.append(path)
    return paths


def pick_real(roots: list[Path], out: Path, n: int, seed: int = 2024) -> list[Path]:
    """Copy ``n`` images of ``roots`` into ``out`` under their own names and return where they came
    from: one from each (origin, class) group in turn (groups in a seeded order, images of a group
    in a seeded order), label conflicts left out."""
    from xray_edge.train.data import list_images

    groups = defaultdict(list)
    for image in list_images(roots)[0]:
        if not image.conflict:
            groups[image.origin, image.label].append(image.path)
    rng = np.random.default_rng(seed)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in
              (groups[k] for k in [sorted(groups)[i] for i in rng.permutation(len(groups))])]
    picked: list[str] = []
    while len(picked) < n and any(queues):
        picked += [queue.pop(0) for queue in queues if queue][: n - len(picked)]
    out.mkdir(parents=True, exist_ok=True)
    for src in picked:
        if (out / Path(src).name).exists():
            raise ValueError(f"{Path(src).name}: two picked images have this name")
        shutil.copyfile(src, out / Path(src).name)
    return sorted(map(Path, picked))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("n", type=int, nargs="?", default=4)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--data", type=Path, nargs="+", help="pick real images from these data roots")
    args = ap.parse_args(argv)
    try:
        paths = pick_real(args.data, args.out, args.n, args.seed) if args.data else write_images(args.out, args.n, args.seed)
    except (OSError, ValueError) as e:  # DatasetError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
