"""The model contract: the one source of truth shared by training, export, runtime and benchmark.

Everything a model needs to be run correctly lives here: class names and order, input size,
the preprocessing recipe (``recipe.Preprocessing``: decode -> grey -> [lung crop] -> border crop ->
resize -> intensity normalisation), the model's outputs and the rules applied to them (operating thresholds, the
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
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from .recipe import INPUT_SIZE, ModelContractError, Preprocessing, number_problems, text_problems

SCHEMA = "xray-edge/model-record"
SCHEMA_VERSION = 3  # 3: pooled output, site inputs and the site reference (site calibration)
READS_VERSIONS = (2, 3)
RECORD_KEY = "xray_edge.record"

CLASSES: tuple[str, ...] = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
NEGATIVE_CLASS = "NORMAL"  # every other class is a finding: flagged, and a "positive" decision
AGE_GROUPS: tuple[str, ...] = ("adult", "child")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SITE_INPUTS = ("site_scale", "site_shift")  # optional graph inputs (1, K): pooled features x scale + shift
VARIANTS = ("fp32", "fp16", "int8")
COLOURMAPS = ("jet", "inferno", "turbo")

# VGG-19 ImageNet ("caffe" mode) channel means, in BGR order; applied inside the graph.
VGG_BGR_MEANS = (103.939, 116.779, 123.68)

LICENCE = (
    "Code: MIT. VGG-19 ImageNet weights: CC BY 4.0, Visual Geometry Group, University of Oxford "
    "(K. Simonyan, A. Zisserman, 'Very Deep Convolutional Networks for Large-Scale Image "
    "Recognition', arXiv:1409.1556, 2014). Training images: research use only, see MODEL_CARD.md."
)
INTENDED_USE = "Research screening aid only. Not a diagnostic device; every result needs a clinician."


@dataclass(frozen=True)
class Outputs:
    """Names of the graph outputs by role. Only ``logits`` is required: a model without an age,
    gate or heatmap output simply gives no age warning, no rejection and no heatmap."""

    logits: str = OUTPUT_NAME
    age_logits: str | None = None  # (N, len(AGE_GROUPS))
    ood_distance: str | None = None  # (N,) squared Mahalanobis distance to the training features
    cam: str | None = None  # (N, h, w, C) Grad-CAM map of every class
    pooled: str | None = None  # (N, K) pooled image features, before any site alignment

    def problems(self) -> list[str]:
        names = [v for v in asdict(self).values() if v is not None]
        out = [p for f, v in asdict(self).items() if v is not None for p in text_problems(v, f"outputs.{f}")]
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
        return (number_problems(self.threshold, "gate.threshold", 0, 1e12, low_open=True)
                + number_problems(self.quantile, "gate.quantile", 0.5, 1) + number_problems(self.val_rejection_rate, "gate.val_rejection_rate", 0, 1))


@dataclass(frozen=True)
class Heatmap:
    """How the ``cam`` output is drawn: colour map and overlay opacity."""

    method: str = "grad-cam"
    layer: str = ""
    colourmap: str = "jet"
    alpha: float = 0.45

    def problems(self) -> list[str]:
        return (text_problems(self.method, "heatmap.method", ("grad-cam",)) + text_problems(self.colourmap, "heatmap.colourmap", COLOURMAPS)
                + number_problems(self.alpha, "heatmap.alpha", 0, 1))


@dataclass(frozen=True)
class SiteReference:
    """The training normals' pooled features (mean and spread per feature, origins weighted
    equally): what site calibration aligns a clinic's normals to (``xray_edge.site``)."""

    normal_mean: tuple[float, ...] = ()
    normal_std: tuple[float, ...] = ()

    def problems(self) -> list[str]:
        mean, std = self.normal_mean, self.normal_std
        if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)) or not mean or len(mean) != len(std):
            return ["site_reference needs normal_mean and normal_std of one length"]
        problems = [p for v in mean for p in number_problems(v, "site_reference.normal_mean", -1e6, 1e6)]
        problems += [p for v in std for p in number_problems(v, "site_reference.normal_std", 0, 1e6, low_open=True)]
        return problems[:1]


def _refuse_constant(name: str) -> None:
    """JSON has no NaN or Infinity; Python's parser accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON number")


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
    # Site calibration by feature alignment: the graph's inputs (SITE_INPUTS) and what they align to.
    site_inputs: list[str] = field(default_factory=list)
    site_reference: SiteReference | None = None
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
        if d.get("schema_version") not in READS_VERSIONS:
            raise ModelContractError(
                f"{source}: record schema version {d.get('schema_version')!r} is not supported "
                f"(this xray-edge reads versions {', '.join(map(str, READS_VERSIONS))}); use the xray-edge version "
                "that exported it"
            )
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelContractError(f"{source}: unknown record fields {sorted(unknown)}")
        try:
            d["preprocessing"] = Preprocessing.from_dict(d.get("preprocessing", {}))
            d["outputs"] = _sub(Outputs, d.get("outputs", {}), "outputs")
            d["gate"] = _sub(Gate, d.get("gate"), "gate")
            d["heatmap"] = _sub(Heatmap, d.get("heatmap"), "heatmap")
            d["site_reference"] = _sub(SiteReference, d.get("site_reference"), "site_reference")
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
            out += text_problems(getattr(self, name), name)
        out += text_problems(self.variant, "variant", VARIANTS) + text_problems(self.output_kind, "output_kind", ("logits", "probabilities"))
        out += number_problems(self.temperature, "temperature", 0, 100, low_open=True)
        out += number_problems(self.abstain_margin, "abstain_margin", 0, 1)
        classes = self.classes if isinstance(self.classes, list) else []
        if not isinstance(self.thresholds, dict):
            out.append("thresholds must be an object")
        else:
            for c, t in self.thresholds.items():
                if c not in classes or c == NEGATIVE_CLASS:
                    out.append(f"threshold for {c!r}: only finding classes of this model have thresholds")
                out += number_problems(t, f"thresholds[{c}]", 0, 1)
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
        if self.site_inputs:
            if self.site_inputs != list(SITE_INPUTS) or self.outputs.pooled is None or self.site_reference is None:
                out.append(f"site_inputs must be {list(SITE_INPUTS)}, with a pooled output and a site_reference")
            elif isinstance(self.site_reference, SiteReference):
                out += self.site_reference.problems()
            else:
                out.append("bad site_reference")
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
