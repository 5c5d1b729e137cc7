"""Generated training data for the training, export and benchmark tests: two data roots with
manifests, origins, groups and planted duplicates, where each class's evidence sits in one
region of the image (so a heatmap can be checked against it)."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from xray_edge.decode import read_image

CLASSES = ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]
# Files planted as duplicates of another image: (copy, original, kind), in root "cxr".
PLANTED = [("COVID/copy-of-covid-0.png", "COVID/covid-0.png", "exact"),
           ("NORMAL/near-normal-0.png", "NORMAL/normal-0.png", "near"),
           ("VIRAL_PNEUMONIA/person3_virus_99.png", "VIRAL_PNEUMONIA/person3_virus_3.png", "patient")]


def pattern(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise everywhere; the class evidence in one quadrant: COVID stripes top left, VIRAL_PNEUMONIA
    a bright disc bottom right, NORMAL faint vertical stripes over the whole image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.45 + rng.normal(0, 0.08, (size, size))
    freq, phase = rng.uniform(4, 6), rng.uniform(0, 2 * np.pi)
    if cls == 0:
        top_left = (yy < 0.5) & (xx < 0.5)
        img += np.where(top_left, 0.35 * np.sin(2 * np.pi * 2 * freq * yy + phase), 0)
    elif cls == 1:
        img += 0.12 * np.sin(2 * np.pi * freq * xx + phase)
    else:
        cy, cx = rng.uniform(0.65, 0.85, 2)
        img += 0.45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
    return np.clip(img, 0, 1)


def write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.round(img * 255).astype(np.uint8))


def make_roots(folder: Path, n: int = 8, size: int = 40, seed: int = 0) -> list[Path]:
    """Two data roots under ``folder``. ``cxr``: a manifest with sources, COVID and half the NORMAL
    from origin "adults", VIRAL_PNEUMONIA and the other NORMAL from "kids", plus the PLANTED
    files. ``extra``: a manifest with origin and group columns (origin "clinic": COVID and
    NORMAL, studies of two images), and a masks/ folder that is not a class."""
    rng = np.random.default_rng(seed)
    cxr, extra = folder / "cxr", folder / "extra"
    rows = ["path,label,source,sha256"]
    for c, cls in enumerate(CLASSES):
        for i in range(n):
            name = f"person{i}_virus_{i}.png" if cls == "VIRAL_PNEUMONIA" else f"{cls.lower()}-{i}.png"
            write(cxr / cls / name, pattern(c, rng, size))
            owner = "kids" if cls == "VIRAL_PNEUMONIA" or (cls == "NORMAL" and i % 2) else "adults"
            rows.append(f"{cls}/{name},{cls},{owner}/set@0:{name},")
    shutil.copy(cxr / PLANTED[0][1], cxr / PLANTED[0][0])
    near = read_image(cxr / PLANTED[1][1]) * 0.97 + 0.02 + rng.normal(0, 0.01, (size, size))
    write(cxr / PLANTED[1][0], np.clip(near, 0, 1))
    write(cxr / PLANTED[2][0], pattern(2, rng, size))  # another image of patient 3
    rows += [f"{p},{p.split('/')[0]},{'kids' if 'virus' in p else 'adults'}/set@0:{p}," for p, _, _ in PLANTED]
    (cxr / "manifest.csv").write_text("\n".join(rows) + "\n")
    rows = ["path,label,origin,group,source,sha256"]
    for c, cls in enumerate(CLASSES[:2]):
        for i in range(n):
            write(extra / cls / f"clinic-{i}.jpg", pattern(c, rng, size + 8))
            rows.append(f"{cls}/clinic-{i}.jpg,{cls},clinic,clinic:{cls}{i // 2},x/y@0:{i},")
    write(extra / "masks" / "clinic-0.png", np.ones((size, size)))
    (extra / "manifest.csv").write_text("\n".join(rows) + "\n")
    return [cxr, extra]
