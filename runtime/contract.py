"""The model contract: the one source of truth shared by training, export, runtime and benchmark.

Everything a model needs to be run correctly lives here: class names and order, input size,
the preprocessing recipe (decode -> grey -> crop -> resize -> intensity normalisation) and the
versioned metadata record stored inside every exported ONNX file (``metadata_props``).

Steps that can live inside the graph (scaling to 0..255, grey -> 3 channels, the VGG "caffe"
mean subtraction) are inside the graph; the runtime only decodes, crops, resizes and normalises
intensity, following the record read from the model file itself.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

SCHEMA = "xray-edge/model-record"
SCHEMA_VERSION = 1
RECORD_KEY = "xray_edge.record"

CLASSES: tuple[str, ...] = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INPUT_SIZE = 224
VARIANTS = ("fp32", "fp16", "int8")

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


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model input (outside the graph).

    Order: decode to grey float in [0, 1] (bit depth and DICOM handled by the decoder) ->
    crop ``crop_fraction`` of each side (drops borders, side markers and burned-in text near
    the edges) -> resize to ``size`` x ``size`` (``squash``: aspect ratio not kept, as in the
    training data) -> percentile intensity stretch ``low``..``high`` to [0, 1].
    """

    version: int = 1
    size: int = INPUT_SIZE
    colour: str = "grey"
    crop_fraction: float = 0.08
    resize: str = "squash"
    interpolation: str = "area"
    intensity: str = "percentile"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    in_graph: tuple[str, ...] = ("scale_0_255", "grey_to_bgr", "vgg_caffe_mean_subtraction")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ModelContractError(f"unknown preprocessing fields {sorted(unknown)}")
        d = dict(d)
        if "in_graph" in d:
            d["in_graph"] = tuple(d["in_graph"])
        p = cls(**d)
        if p.version != 1 or p.colour != "grey" or p.resize != "squash" or p.intensity != "percentile":
            raise ModelContractError(f"unsupported preprocessing {asdict(p)}")
        if not 0 <= p.crop_fraction < 0.5 or not 0 <= p.low_percentile < p.high_percentile <= 100:
            raise ModelContractError(f"invalid preprocessing parameters {asdict(p)}")
        return p

    def key(self) -> str:
        """A stable string naming this recipe (used in feature-cache keys)."""
        return json.dumps(asdict(self), sort_keys=True)


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
    output_name: str = OUTPUT_NAME
    output_kind: str = "logits"
    temperature: float = 1.0
    thresholds: dict[str, float] = field(default_factory=dict)
    source_model_sha256: str = ""
    data_manifest_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    forced: bool = False
    licence: str = LICENCE
    intended_use: str = INTENDED_USE
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocessing"]["in_graph"] = list(self.preprocessing.in_graph)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelRecord":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelContractError(f"{source}: metadata record is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ModelContractError(f"{source}: metadata record has no '{SCHEMA}' schema")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ModelContractError(
                f"{source}: record schema version {d.get('schema_version')} is not supported "
                f"(this xray-edge reads version {SCHEMA_VERSION}); upgrade xray-edge"
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ModelContractError(f"{source}: unknown record fields {sorted(unknown)}")
        try:
            d["preprocessing"] = Preprocessing.from_dict(d.get("preprocessing", {}))
            rec = cls(**d)
        except (TypeError, ModelContractError) as e:
            raise ModelContractError(f"{source}: invalid metadata record ({e})") from None
        rec.validate(source)
        return rec

    def validate(self, source: str = "model") -> None:
        """Raise ModelContractError if the record is inconsistent."""
        problems = []
        if not self.classes or len(set(self.classes)) != len(self.classes):
            problems.append(f"classes {self.classes!r} must be non-empty and unique")
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} not in {VARIANTS}")
        if self.output_kind not in ("logits", "probabilities"):
            problems.append(f"output_kind {self.output_kind!r} must be 'logits' or 'probabilities'")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            problems.append(f"temperature {self.temperature!r} must be > 0")
        if set(self.thresholds) - set(self.classes):
            problems.append(f"thresholds name unknown classes {sorted(set(self.thresholds) - set(self.classes))}")
        if len(self.input_shape) != 4 or self.input_shape[1:] != [
            self.preprocessing.size, self.preprocessing.size, 1
        ]:
            problems.append(f"input_shape {self.input_shape} does not match preprocessing size")
        if problems:
            raise ModelContractError(f"{source}: invalid metadata record: " + "; ".join(problems))


def record_from_metadata(metadata: Mapping[str, str], source: str = "model") -> ModelRecord:
    """Read the record from an ONNX ``metadata_props`` mapping; refuse models without one."""
    if RECORD_KEY not in metadata:
        raise ModelContractError(
            f"{source}: not an xray-edge model (no '{RECORD_KEY}' metadata record); "
            "export it with 'xray-edge export' so its preprocessing and classes travel with it"
        )
    return ModelRecord.from_json(metadata[RECORD_KEY], source)


def attach_record(onnx_model: Any, record: ModelRecord) -> None:
    """Store ``record`` in an ``onnx.ModelProto``'s metadata_props (replacing an older one)."""
    record.validate()
    props = {p.key: p.value for p in onnx_model.metadata_props}
    props[RECORD_KEY] = record.to_json()
    props["model_version"] = record.model_version
    props["variant"] = record.variant
    del onnx_model.metadata_props[:]
    for k, v in sorted(props.items()):
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = k, v


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the hashes of source model and split manifest in the record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
