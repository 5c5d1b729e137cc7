"""The preprocessing recipe of the model contract (``xray_edge.contract``): how a decoded image becomes
the model input outside the graph, optionally cropped to the lung fields first. Each field is
checked (type and range) when a record is read; the checks are shared with the rest of the record.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

INPUT_SIZE = 224
INTERPOLATIONS = ("area", "linear")
INTENSITY_METHODS = ("percentile", "clahe")


class ModelContractError(ValueError):
    """A model file has no valid xray-edge record, or the record does not fit this runtime."""


def number_problems(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> list[str]:
    """Problems with a finite real number ``value`` in [low, high] ((low, high] if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return [f"{name} {value!r} must be a finite number"]
    if value < low or value > high or (low_open and value == low):
        return [f"{name} {value!r} must be in {'(' if low_open else '['}{low:g}, {high:g}]"]
    return []


LUNG_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.onnx")  # a file in xray_edge.models, never a path


def text_problems(value: Any, name: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    if not isinstance(value, str) or not value:
        return [f"{name} {value!r} must be a non-empty string"]
    if allowed is not None and value not in allowed:
        return [f"{name} {value!r} must be one of {list(allowed)}"]
    return []


@dataclass(frozen=True)
class LungCrop:
    """Crop to the lung fields found by a small segmentation model before the rest of the recipe.

    ``model`` names an ONNX file shipped in ``xray_edge.models`` (a bare file name, checked against
    ``sha256``); it maps (N, size, size, 1) grey in [0, 1] to lung probabilities of the same
    shape. The crop is the bounding box of the two largest regions with probability >=
    ``threshold``, made symmetric about the vertical midline and widened by ``margin`` of its size
    on every side; where the mask covers less than ``min_area`` of the image (no lungs found) the
    whole image is used."""

    model: str = ""
    sha256: str = ""
    size: int = 128
    threshold: float = 0.5
    margin: float = 0.1
    min_area: float = 0.05

    def problems(self) -> list[str]:
        out = text_problems(self.model, "lung_crop.model")
        if not out and not LUNG_MODEL_NAME.fullmatch(self.model):
            out.append(f"lung_crop.model {self.model[:80]!r} must be a file name ending .onnx (letters, digits, "
                       "'.', '_', '-'; no folders)")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            out.append("lung_crop.sha256 must be a 64-character lower-case hex digest")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 16 <= self.size <= 1024:
            out.append(f"lung_crop.size {self.size!r} must be an integer in [16, 1024]")
        return (out + number_problems(self.threshold, "lung_crop.threshold", 0, 1, low_open=True)
                + number_problems(self.margin, "lung_crop.margin", 0, 1) + number_problems(self.min_area, "lung_crop.min_area", 0, 1))


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model input (outside the graph).

    Order: decode to grey float in [0, 1] (bit depth and DICOM handled by the decoder) ->
    optional lung-field crop (``lung_crop``) -> crop ``crop_fraction`` of each side (drops
    borders, side markers and burned-in text near the edges) -> resize to ``size`` x ``size``
    (``squash``: aspect ratio not kept, as in the training data) -> percentile intensity stretch
    ``low``..``high`` to [0, 1] -> ``intensity``: nothing more (``percentile``), or CLAHE with
    ``clahe_clip`` and ``clahe_tiles`` x ``clahe_tiles`` tiles (``clahe``).
    """

    version: int = 2
    size: int = INPUT_SIZE
    colour: str = "grey"
    crop_fraction: float = 0.08
    resize: str = "squash"
    interpolation: str = "area"
    intensity: str = "percentile"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    lung_crop: LungCrop | None = None
    in_graph: tuple[str, ...] = ("scale_0_255", "grey_to_bgr", "vgg_caffe_mean_subtraction")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        if not isinstance(d, Mapping):
            raise ModelContractError("preprocessing must be an object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelContractError(f"unknown preprocessing fields {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("in_graph"), list):
            d["in_graph"] = tuple(d["in_graph"])
        crop = d.get("lung_crop")
        if isinstance(crop, Mapping):
            unknown = set(crop) - {f.name for f in fields(LungCrop)}
            if unknown:
                raise ModelContractError(f"unknown lung_crop fields {sorted(unknown)}")
            d["lung_crop"] = LungCrop(**crop)
        elif crop is not None:
            raise ModelContractError("preprocessing.lung_crop must be an object or null")
        p = cls(**d)
        problems = p.problems()
        if problems:
            raise ModelContractError("invalid preprocessing: " + "; ".join(problems))
        return p

    def problems(self) -> list[str]:
        """Every field whose type or value this runtime cannot apply."""
        out = []
        if self.version != 2:
            out.append(f"preprocessing version {self.version!r} is not supported (this xray-edge applies version 2)")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 8 <= self.size <= 2048:
            out.append(f"size {self.size!r} must be an integer in [8, 2048]")
        if not isinstance(self.clahe_tiles, int) or isinstance(self.clahe_tiles, bool) or not 1 <= self.clahe_tiles <= 64:
            out.append(f"clahe_tiles {self.clahe_tiles!r} must be an integer in [1, 64]")
        out += text_problems(self.colour, "colour", ("grey",)) + text_problems(self.resize, "resize", ("squash",))
        out += text_problems(self.interpolation, "interpolation", INTERPOLATIONS)
        out += text_problems(self.intensity, "intensity", INTENSITY_METHODS)
        out += number_problems(self.crop_fraction, "crop_fraction", 0, 0.45)
        out += number_problems(self.low_percentile, "low_percentile", 0, 100) + number_problems(self.high_percentile, "high_percentile", 0, 100)
        if not out and self.low_percentile >= self.high_percentile:
            out.append("low_percentile must be below high_percentile")
        out += number_problems(self.clahe_clip, "clahe_clip", 0, 100, low_open=True)
        if self.in_graph != ("scale_0_255", "grey_to_bgr", "vgg_caffe_mean_subtraction"):
            out.append(f"in_graph {list(self.in_graph)!r} is not the graph this runtime feeds")
        if self.lung_crop is not None:
            out += self.lung_crop.problems()
        return out

    def key(self) -> str:
        """A stable string naming this recipe (used in feature-cache keys)."""
        return json.dumps(asdict(self), sort_keys=True)
