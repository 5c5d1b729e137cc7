"""Heatmap pictures: the preprocessed X-ray (what the model saw) with the Grad-CAM map of the
predicted class laid over it in colour, and the label and probability written on it. OpenCV and
numpy only; the map itself comes from the model's ``cam`` output (``session.predict(cam=True)``)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np

from .contract import Heatmap

_COLOURMAPS = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO, "turbo": cv2.COLORMAP_TURBO}
SCALE = 2  # the model sees 224 px; the picture is drawn at twice that


def normalised(cam: np.ndarray) -> np.ndarray:
    """A class map scaled to [0, 1] by its maximum (all zeros where the class had no evidence)."""
    cam = np.nan_to_num(np.maximum(np.asarray(cam, np.float32), 0))
    top = float(cam.max())
    return cam / top if top > 0 else np.zeros_like(cam)


def overlay(image: np.ndarray, cam: np.ndarray, caption: list[str], spec: Heatmap) -> np.ndarray:
    """BGR uint8 picture: ``image`` (S, S[, 1]) grey in [0, 1] with ``cam`` (h, w) drawn over it
    (opacity ``spec.alpha`` times the heat, so cold regions show the X-ray) and ``caption`` lines
    in a bar along the top."""
    grey = np.asarray(image, np.float32).reshape(image.shape[0], image.shape[1])
    size = (grey.shape[1] * SCALE, grey.shape[0] * SCALE)
    base = cv2.cvtColor(np.round(cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR) * 255).clip(0, 255)
                        .astype(np.uint8), cv2.COLOR_GRAY2BGR)
    heat = cv2.resize(normalised(cam), size, interpolation=cv2.INTER_CUBIC).clip(0, 1)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), _COLOURMAPS[spec.colourmap])
    weight = (spec.alpha * heat)[..., None]
    picture = np.round(base * (1 - weight) + colour * weight).astype(np.uint8)
    bar = 22 * len(caption) + 8
    picture[:bar] = (picture[:bar] * 0.35).astype(np.uint8)
    for i, line in enumerate(caption):
        cv2.putText(picture, line, (8, 22 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return picture


def png_bytes(picture: np.ndarray) -> bytes:
    """The picture encoded as PNG."""
    ok, buf = cv2.imencode(".png", picture)
    if not ok:
        raise ValueError("could not encode the picture as PNG")
    return buf.tobytes()


def caption(label: str, probability: float, decision: str) -> list[str]:
    """The lines written on a heatmap picture."""
    return [f"{label} p={probability:.3f}", f"decision: {decision}"]


def file_name(source: str) -> str:
    """A picture's file name for the image at ``source``: its name made safe (letters, digits,
    '.', '_', '-'), and a short hash of its whole path, so images of the same name in different
    folders do not collide."""
    stem = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "_" for ch in os.path.basename(source))
    digest = hashlib.sha1(os.fsencode(os.path.abspath(source))).hexdigest()[:10]
    return f"{stem[:80].lstrip('.') or 'image'}.{digest}.png"


def save(folder: Path, source: str, png: bytes) -> Path:
    """Write the picture of ``source`` into ``folder`` (created if needed) atomically, never
    through a link planted at its name; returns its path."""
    from .files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(source)
    write_atomic(path, png)
    return path
