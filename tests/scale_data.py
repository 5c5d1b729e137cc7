"""Data for the ``classify --ray`` tests: a tiny model whose decisions vary over generated
images (positive, negative, uncertain, rejected), an "archive" folder of such images with bad
files and hostile names among them, and results files read back row by row, as written."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from images import TRICKY_NAMES, as_uint8, write_bad_corpus, xray_like
from tiny_model import make_tiny_onnx, tiny_record

SIZE = 32
BAD = ("truncated.png", "empty.png", "notes.jpg", "blank.png", "incoming", "dangling.png")  # of write_bad_corpus


def scale_model(path: Path) -> Path:
    """A tiny model with an input gate and an abstain margin: over ``archive`` images it gives
    every decision."""
    from xray_edge.contract import Gate

    record = tiny_record(SIZE, thresholds={"COVID": 0.95, "VIRAL_PNEUMONIA": 0.95}, abstain_margin=0.5,
                         gate=Gate(threshold=1.1, quantile=0.99, val_rejection_rate=0.01))
    return make_tiny_onnx(path, size=SIZE, record=record, seed=3)


def site_profile(folder: Path, model: Path) -> Path:
    """A site profile for ``model`` fitted by ``xray-edge calibrate`` on 40 generated normals."""
    from typer.testing import CliRunner

    from xray_edge.cli import app

    normals = folder / "normals"
    normals.mkdir(parents=True)
    for i in range(40):
        cv2.imwrite(str(normals / f"n{i}.png"), as_uint8(blocks(5000 + i)))
    result = CliRunner().invoke(app, ["calibrate", str(normals), "--out", str(folder / "site.json"), "--model",
                                      str(model), "--name", "clinic-a", "--method", "threshold", "-q"])
    assert result.exit_code == 0, result.output
    return folder / "site.json"


def blocks(seed: int) -> np.ndarray:
    """A 48x48 picture of 4x4 blocks of random grey (the tiny model sees one value per block)."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0.3, 0.7, (4, 4)), (48, 48), interpolation=cv2.INTER_NEAREST)
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)


def archive(folder: Path, images: int) -> list[str]:
    """``images`` generated PNGs, a few X-ray-like JPEGs, bad files (error rows) and good images
    under hostile names; returns the names of the bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        cv2.imwrite(str(folder / f"img{i:04d}.png"), as_uint8(blocks(i)))
    for i in range(4):
        cv2.imwrite(str(folder / f"film{i}.jpg"), as_uint8(xray_like(64, 56, seed=i)))
    corpus = folder.with_name(folder.name + "-bad-corpus")
    write_bad_corpus(corpus)
    for name in BAD:
        os.replace(corpus / name, folder / name)
    for i, name in enumerate(TRICKY_NAMES[:6]):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(cv2.imencode(".png", as_uint8(blocks(10_000 + i)))[1].tobytes())
    return list(BAD)


def read_rows(path: Path) -> list[dict]:
    """Every row of a results file in file order (no de-duplication), values as the file holds
    them (CSV: text; names with their exact bytes)."""
    data = path.read_bytes().decode("utf-8", "surrogateescape")
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(data, newline="")))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in data.splitlines() if line]
    return json.loads(data)


def without_ms(rows: list[dict]) -> list[dict]:
    """Rows less the one column that may differ between two runs (timing)."""
    return [{k: v for k, v in row.items() if k != "ms"} for row in rows]


def command(*args: object) -> list[str]:
    """The ``xray-edge`` command line, run by this interpreter."""
    return [sys.executable, "-c", "from xray_edge.cli import main; main()", *map(str, args)]
