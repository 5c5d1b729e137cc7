"""The model contract: the one source of truth shared by training, export, runtime and benchmark.

Everything a model needs to be run correctly lives here: class names and order, input size,
the preprocessing recipe (decode -> grey -> [lung crop] -> border crop -> resize -> intensity
normalisation), the model's outputs and the rules applied to them (operating thresholds, the
"uncertain, refer" band, the input gate, age-group warnings, heatmap settings), all in the
versioned metadata record stored inside every exported ONNX file (``metadata_props``).

Steps that can live inside the graph (scaling to 0..255, grey -> 3 channels, the VGG "caffe"
mean subtraction) are inside the graph; the runtime only decodes, crops, resizes and normalises
intensity, following the record read from the model file itself.

A record is checked field by field (type and range) when it is read, and it is tamper-evident:
it carries the sha256 of the ONNX graph it was exported with (``graph_sha256``) and of its own
content (``record_sha256``); ``session.load_model`` refuses a file where either does not match.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

SCHEMA = "xray-edge/model-record"
SCHEMA_VERSION = 2
RECORD_KEY = "xray_edge.record"

CLASSES: tuple[str, ...] = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
NEGATIVE_CLASS = "NORMAL"  # every other class is a finding: flagged, and a "positive" decision
AGE_GROUPS: tuple[str, ...] = ("adult", "child")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INPUT_SIZE = 224
VARIANTS = ("fp32", "fp16", "int8")
INTERPOLATIONS = ("area", "linear")
INTENSITY_METHODS = ("percentile", "clahe")
COLOURMAPS = ("jet", "inferno", "turbo")

# VGG-19 ImageNet ("caffe" mode) channel means, in BGR order; applied inside the graph.
VGG_BGR_MEANS = (103.939, 116.779, 123.68)

LICENCE = (
    "Code: MIT. VGG-19 ImageNet weights: CC BY 4.0, Visual Geometry Group, University of Oxford "
    "(K. Simonyan, A. Zisserman, 'Very Deep Convolutional Networks for Large-Scale Image "
    "Recognition', arXiv:1409.1556, 2014). Training images: research use only, see MODEL_CARD.md."
)
INTENDED_USE = "Research screening aid only. Not a diagnostic device; every result needs a clinician."


class ModelContractError(ValueError):
    """A model file has no valid xray-edge record, or the record does not fit this runtime."""


def _number(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> list[str]:
    """Problems with a finite real number ``value`` in [low, high] ((low, high] if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return [f"{name} {value!r} must be a finite number"]
    if value < low or value > high or (low_open and value == low):
        return [f"{name} {value!r} must be in {'(' if low_open else '['}{low:g}, {high:g}]"]
    return []


def _refuse_constant(name: str) -> None:
    """JSON has no NaN or Infinity; Python's parser accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON number")


LUNG_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.onnx")  # a file in xray_edge.models, never a path


def _text(value: Any, name: str, allowed: tuple[str, ...] | None = None) -> list[str]:
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
        out = _text(self.model, "lung_crop.model")
        if not out and not LUNG_MODEL_NAME.fullmatch(self.model):
            out.append(f"lung_crop.model {self.model[:80]!r} must be a file name ending .onnx (letters, digits, "
                       "'.', '_', '-'; no folders)")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            out.append("lung_crop.sha256 must be a 64-character lower-case hex digest")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 16 <= self.size <= 1024:
            out.append(f"lung_crop.size {self.size!r} must be an integer in [16, 1024]")
        return (out + _number(self.threshold, "lung_crop.threshold", 0, 1, low_open=True)
                + _number(self.margin, "lung_crop.margin", 0, 1) + _number(self.min_area, "lung_crop.min_area", 0, 1))


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
        out += _text(self.colour, "colour", ("grey",)) + _text(self.resize, "resize", ("squash",))
        out += _text(self.interpolation, "interpolation", INTERPOLATIONS)
        out += _text(self.intensity, "intensity", INTENSITY_METHODS)
        out += _number(self.crop_fraction, "crop_fraction", 0, 0.45)
        out += _number(self.low_percentile, "low_percentile", 0, 100) + _number(self.high_percentile, "high_percentile", 0, 100)
        if not out and self.low_percentile >= self.high_percentile:
            out.append("low_percentile must be below high_percentile")
        out += _number(self.clahe_clip, "clahe_clip", 0, 100, low_open=True)
        if self.in_graph != ("scale_0_255", "grey_to_bgr", "vgg_caffe_mean_subtraction"):
            out.append(f"in_graph {list(self.in_graph)!r} is not the graph this runtime feeds")
        if self.lung_crop is not None:
            out += self.lung_crop.problems()
        return out

    def key(self) -> str:
        """A stable string naming this recipe (used in feature-cache keys)."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Outputs:
    """Names of the graph outputs by role. Only ``logits`` is required: a model without an age,
    gate or heatmap output simply gives no age warning, no rejection and no heatmap."""

    logits: str = OUTPUT_NAME
    age_logits: str | None = None  # (N, len(AGE_GROUPS))
    ood_distance: str | None = None  # (N,) squared Mahalanobis distance to the training features
    cam: str | None = None  # (N, h, w, C) Grad-CAM map of every class

    def problems(self) -> list[str]:
        names = [v for v in asdict(self).values() if v is not None]
        out = [p for f, v in asdict(self).items() if v is not None for p in _text(v, f"outputs.{f}")]
        if len(set(names)) != len(names):
            out.append("output names must be distinct")
        return out


@dataclass(frozen=True)
class Gate:
    """The input gate: an image whose ``ood_distance`` output is above ``threshold`` is rejected
    as "not a usable chest X-ray". The threshold is the ``quantile`` of the validation images'
    distances (so about 1 - quantile of real validation X-rays are rejected)."""

    threshold: float = 0.0
    quantile: float = 0.99
    feature: str = ""
    val_rejection_rate: float = 0.0

    def problems(self) -> list[str]:
        return (_number(self.threshold, "gate.threshold", 0, 1e12, low_open=True)
                + _number(self.quantile, "gate.quantile", 0.5, 1) + _number(self.val_rejection_rate, "gate.val_rejection_rate", 0, 1))


@dataclass(frozen=True)
class Heatmap:
    """How the ``cam`` output is drawn: colour map and overlay opacity."""

    method: str = "grad-cam"
    layer: str = ""
    colourmap: str = "jet"
    alpha: float = 0.45

    def problems(self) -> list[str]:
        return (_text(self.method, "heatmap.method", ("grad-cam",)) + _text(self.colourmap, "heatmap.colourmap", COLOURMAPS)
                + _number(self.alpha, "heatmap.alpha", 0, 1))


def _sub(cls: type, value: Any, name: str) -> Any:
    """A sub-record dataclass from its JSON object (None stays None); unknown fields refused."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ModelContractError(f"{name} must be an object or null")
    unknown = set(value) - {f.name for f in fields(cls)}
    if unknown:
        raise ModelContractError(f"unknown {name} fields {sorted(unknown)}")
    return cls(**value)


@dataclass
class ModelRecord:
    """The metadata that travels inside every exported model (MONAI-bundle style)."""

    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    model_name: str = "xray-edge-vgg19"
    model_version: str = "0.0.0"
    variant: str = "fp32"
    input_name: str = INPUT_NAME
    input_shape: list[Any] = field(default_factory=lambda: ["N", INPUT_SIZE, INPUT_SIZE, 1])
    outputs: Outputs = field(default_factory=Outputs)
    output_kind: str = "logits"
    temperature: float = 1.0
    # Operating thresholds of the finding classes: flagged when the probability is >= threshold.
    thresholds: dict[str, float] = field(default_factory=dict)
    # "Uncertain, refer": the top two class probabilities are within this margin (0: exact ties only).
    abstain_margin: float = 0.0
    # Age groups each class was seen in during training: a prediction outside them gets a warning.
    seen_age_groups: dict[str, list[str]] = field(default_factory=dict)
    gate: Gate | None = None
    heatmap: Heatmap | None = None
    source_model_sha256: str = ""
    data_manifest_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    forced: bool = False
    licence: str = LICENCE
    intended_use: str = INTENDED_USE
    graph_sha256: str = ""
    record_sha256: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"]["in_graph"] = list(self.preprocessing.in_graph)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def content_sha256(self) -> str:
        """sha256 of the record's canonical JSON without its own ``record_sha256``."""
        d = self.to_dict()
        d.pop("record_sha256")
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self, graph_sha256: str) -> "ModelRecord":
        """A copy bound to the graph with ``graph_sha256`` and carrying its own digest."""
        out = replace(self, graph_sha256=graph_sha256, record_sha256="")
        out.record_sha256 = out.content_sha256()
        return out

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelRecord":
        try:
            d = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise ModelContractError(f"{source}: metadata record is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ModelContractError(f"{source}: metadata record has no '{SCHEMA}' schema")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ModelContractError(
                f"{source}: record schema version {d.get('schema_version')!r} is not supported "
                f"(this xray-edge reads version {SCHEMA_VERSION}); use the xray-edge version that exported it"
            )
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelContractError(f"{source}: unknown record fields {sorted(unknown)}")
        try:
            d["preprocessing"] = Preprocessing.from_dict(d.get("preprocessing", {}))
            d["outputs"] = _sub(Outputs, d.get("outputs", {}), "outputs")
            d["gate"] = _sub(Gate, d.get("gate"), "gate")
            d["heatmap"] = _sub(Heatmap, d.get("heatmap"), "heatmap")
            rec = cls(**d)
        except (TypeError, ModelContractError) as e:
            raise ModelContractError(f"{source}: invalid metadata record ({e})") from None
        rec.validate(source)
        return rec

    def problems(self) -> list[str]:
        """Every field whose type or value is wrong (an empty list for a usable record)."""
        out: list[str] = []
        if (not isinstance(self.classes, list) or len(self.classes) < 2
                or any(c not in CLASSES for c in self.classes)
                or self.classes != [c for c in CLASSES if c in self.classes]):
            out.append(f"classes {self.classes!r} must be at least two of {list(CLASSES)}, in that order")
        out += self.preprocessing.problems() if isinstance(self.preprocessing, Preprocessing) else ["bad preprocessing"]
        out += self.outputs.problems() if isinstance(self.outputs, Outputs) else ["bad outputs"]
        for name in ("model_name", "model_version", "input_name", "licence", "intended_use"):
            out += _text(getattr(self, name), name)
        out += _text(self.variant, "variant", VARIANTS) + _text(self.output_kind, "output_kind", ("logits", "probabilities"))
        out += _number(self.temperature, "temperature", 0, 100, low_open=True)
        out += _number(self.abstain_margin, "abstain_margin", 0, 1)
        classes = self.classes if isinstance(self.classes, list) else []
        if not isinstance(self.thresholds, dict):
            out.append("thresholds must be an object")
        else:
            for c, t in self.thresholds.items():
                if c not in classes or c == NEGATIVE_CLASS:
                    out.append(f"threshold for {c!r}: only finding classes of this model have thresholds")
                out += _number(t, f"thresholds[{c}]", 0, 1)
        if not isinstance(self.seen_age_groups, dict):
            out.append("seen_age_groups must be an object")
        else:
            for c, groups in self.seen_age_groups.items():
                if c not in classes or not isinstance(groups, list) or not groups or set(groups) - set(AGE_GROUPS):
                    out.append(f"seen_age_groups[{c!r}] must list some of {list(AGE_GROUPS)} for a class of the model")
            if self.seen_age_groups and self.outputs.age_logits is None:
                out.append("seen_age_groups needs an age_logits output")
        if self.gate is not None:
            out += self.gate.problems() if isinstance(self.gate, Gate) else ["bad gate"]
            if self.outputs.ood_distance is None:
                out.append("a gate needs an ood_distance output")
        if self.heatmap is not None:
            out += self.heatmap.problems() if isinstance(self.heatmap, Heatmap) else ["bad heatmap"]
            if self.outputs.cam is None:
                out.append("heatmap settings need a cam output")
        size = getattr(self.preprocessing, "size", None)
        if not isinstance(self.input_shape, list) or len(self.input_shape) != 4 or self.input_shape[1:] != [size, size, 1]:
            out.append(f"input_shape {self.input_shape!r} does not match preprocessing size")
        for name in ("source_model_sha256", "data_manifest_sha256", "graph_sha256", "record_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or value and len(value) != 64:
                out.append(f"{name} must be empty or a 64-character hex digest")
        if not isinstance(self.metrics, dict) or not isinstance(self.forced, bool):
            out.append("metrics must be an object and forced a boolean")
        return out

    def validate(self, source: str = "model") -> None:
        """Raise ModelContractError naming every problem if the record is not usable."""
        problems = self.problems()
        if problems:
            raise ModelContractError(f"{source}: invalid metadata record: " + "; ".join(problems))

    def findings(self) -> list[str]:
        """The classes that are findings (every class but the negative one)."""
        return [c for c in self.classes if c != NEGATIVE_CLASS]


def record_from_metadata(metadata: Mapping[str, str], source: str = "model") -> ModelRecord:
    """Read the record from an ONNX ``metadata_props`` mapping; refuse models without one."""
    if RECORD_KEY not in metadata:
        raise ModelContractError(
            f"{source}: not an xray-edge model (no '{RECORD_KEY}' metadata record); "
            "export it with 'xray-edge export' so its preprocessing and classes travel with it"
        )
    return ModelRecord.from_json(metadata[RECORD_KEY], source)


def attach_record(onnx_model: Any, record: ModelRecord) -> ModelRecord:
    """Seal ``record`` to the graph of an ``onnx.ModelProto`` and store it in its
    metadata_props (replacing an older one). Returns the sealed record."""
    record.validate()
    sealed = record.sealed(hashlib.sha256(onnx_model.graph.SerializeToString()).hexdigest())
    props = {p.key: p.value for p in onnx_model.metadata_props}
    props[RECORD_KEY] = sealed.to_json()
    props["model_version"] = sealed.model_version
    props["variant"] = sealed.variant
    del onnx_model.metadata_props[:]
    for k, v in sorted(props.items()):
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = k, v
    return sealed


def check_seal(record: ModelRecord, graph_bytes: bytes | memoryview | None, source: str) -> None:
    """Refuse a record whose own digest, or the digest of the graph it came with, does not match
    (an edited record or a graph swapped under it)."""
    if not record.record_sha256 or record.content_sha256() != record.record_sha256:
        raise ModelContractError(f"{source}: the metadata record was altered after export (its sha256 does not match)")
    if graph_bytes is None or hashlib.sha256(graph_bytes).hexdigest() != record.graph_sha256:
        raise ModelContractError(f"{source}: the model graph does not match its record (graph sha256 differs)")


def onnx_graph_bytes(data: bytes) -> memoryview | None:
    """The serialized ``graph`` field (number 7) of an ONNX ModelProto (a view of ``data``), read
    from the protobuf wire format without the ``onnx`` package; None if the bytes are not such a
    message."""
    pos, n, graph = 0, len(data), None
    try:
        while pos < n:
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(data, pos)
                if number == 7:
                    graph = memoryview(data)[pos:pos + length]
                pos += length
            else:
                return None
        return graph if pos == n else None
    except IndexError:
        return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the hashes of source model and split manifest in the record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
