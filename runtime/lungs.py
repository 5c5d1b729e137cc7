"""The lung-field crop of a recipe that has one (``contract.LungCrop``): a small segmentation
model, shipped in ``xray_edge.models`` and pinned by sha256 in the classifier's record, finds the
lungs; the image is cropped to their bounding box (plus a margin) before the rest of the recipe.

The segmentation model maps (N, size, size, 1) grey in [0, 1] (area-resized, percentile-stretched
0.5-99.5) to lung probabilities of the same shape. Its own record (``xray_edge.lung_record``
metadata) says how it was trained and checked."""
from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from .recipe import LungCrop, ModelContractError, Preprocessing
from .preprocess import LungBox, normalise_intensity, resize
from .session import read_model_file

LUNG_RECORD_KEY = "xray_edge.lung_record"


def model_input(grey: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 1) float32 input of the segmentation model for a grey image in [0, 1]."""
    return normalise_intensity(resize(grey.astype(np.float32, copy=False), size), 0.5, 99.5)[:, :, None]


def lung_mask(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The two largest connected regions at or above ``threshold`` (the lungs), as a bool mask."""
    binary = (probs >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = 1 + np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2] if n > 1 else []
    return np.isin(labels, keep)


def box_of(mask: np.ndarray, shape: tuple[int, int], spec: LungCrop) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) in an image of ``shape`` of the mask's bounding box, made
    symmetric about the vertical midline (a lung the mask missed, as happens with dense
    consolidation or children's films, is assumed to mirror the one it found) and widened by
    ``spec.margin``; None when the mask covers less than ``spec.min_area`` (no lungs found)."""
    if mask.mean() < spec.min_area:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    size = mask.shape[0]
    top, bottom, left, right = rows[0] / size, (rows[-1] + 1) / size, cols[0] / size, (cols[-1] + 1) / size
    left, right = min(left, 1 - right), max(right, 1 - left)
    dy, dx = spec.margin * (bottom - top), spec.margin * (right - left)
    h, w = shape
    return (int(max(0.0, top - dy) * h), int(np.ceil(min(1.0, bottom + dy) * h)),
            int(max(0.0, left - dx) * w), int(np.ceil(min(1.0, right + dx) * w)))


def model_path(spec: LungCrop) -> Path:
    return Path(str(resources.files("xray_edge.models") / spec.model))


@functools.lru_cache(maxsize=4)
def _session(path: str, sha256: str, size: int):
    import onnxruntime as ort

    data = read_model_file(Path(path), "the recipe's lung model")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ModelContractError(f"{path}: the lung model's sha256 is not the one the classifier's record names")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # runs inside the decode workers, beside the classifier's threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types
        raise ModelContractError(f"{path}: the recipe's lung model cannot be loaded ({type(e).__name__})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (LUNG_RECORD_KEY not in session.get_modelmeta().custom_metadata_map or len(inputs) != 1 or len(outputs) != 1
            or list(inputs[0].shape[1:]) != [size, size, 1]):
        raise ModelContractError(f"{path}: not a lung model of size {size} (no {LUNG_RECORD_KEY} record, or another "
                                 "input shape)")
    return session


def probabilities(spec: LungCrop, batch: np.ndarray) -> np.ndarray:
    """The recipe's lung model on a (N, size, size, 1) float32 batch of its inputs: (N, size, size)."""
    session = _session(str(model_path(spec)), spec.sha256, spec.size)
    return session.run(None, {session.get_inputs()[0].name: batch})[0][..., 0]


def lung_finder(spec: LungCrop) -> LungBox:
    """The function grey image -> lung box (or None) of the recipe's lung model (the one shipped in
    xray_edge.models); ModelContractError if it is missing or not the pinned file."""
    session = _session(str(model_path(spec)), spec.sha256, spec.size)
    name = session.get_inputs()[0].name

    def find(grey: np.ndarray) -> tuple[int, int, int, int] | None:
        probs = session.run(None, {name: model_input(grey, spec.size)[None]})[0][0, :, :, 0]
        return box_of(lung_mask(probs, spec.threshold), grey.shape[:2], spec)

    return find


def finder_for(spec: Preprocessing) -> LungBox | None:
    """The lung finder ``preprocess`` needs for a recipe with a lung crop; None for one without."""
    return lung_finder(spec.lung_crop) if spec.lung_crop is not None else None
