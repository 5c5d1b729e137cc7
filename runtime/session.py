"""Load an xray-edge ONNX model with onnxruntime and turn input batches into predictions.

The model's metadata record (classes, preprocessing, outputs, temperature, rules) is read from
the file itself and checked: a model without a valid record, whose record or graph was altered
after export (digests), or whose inputs/outputs do not match the record is refused.

Privacy: onnxruntime's telemetry is switched off. Its official builds for Linux queue events
(device id, executable path, model file name, error text) in ~/.cache/Microsoft/DeveloperTools/
and upload them. The package (``xray_edge/__init__``, imported before this module) sets
``ORT_DISABLE_TELEMETRY=1`` before onnxruntime is first loaded, which is when onnxruntime reads
it (no uploader, device id or event queue is created); ``disable_telemetry_events()`` is called
before every session as well, for a process that loaded onnxruntime before xray-edge.

    model = load_model("model.onnx", threads=4)
    out = predict(model, batch)            # batch: (N, S, S, 1) float32 from preprocess()
    out.probs, out.age, out.ood, out.cam   # age/ood/cam: None where the model has no such output
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .contract import AGE_GROUPS, ModelContractError, ModelRecord, check_seal, onnx_graph_bytes, record_from_metadata
from .files import FileTooLarge, read_regular

MAX_MODEL_BYTES = 1 << 30  # no xray-edge model comes near 1 GiB


@dataclass(frozen=True)
class LoadedModel:
    """An onnxruntime session together with the record it was exported with."""

    session: ort.InferenceSession
    record: ModelRecord  # with a site profile: its thresholds and gate limit (``site.apply``)
    path: Path
    sha256: str
    site: Any = None  # the ``site.SiteProfile`` applied, if any

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def label(self) -> str:
        """Short identity written next to every result: name, version and variant."""
        r = self.record
        return f"{r.model_name} {r.model_version} {r.variant}"


@dataclass(frozen=True)
class Prediction:
    """Everything the model says about a batch (None where the model has no such output)."""

    probs: np.ndarray  # (N, C) float64 class probabilities, softmax(logits / T)
    age: np.ndarray | None  # (N, len(AGE_GROUPS)) float64 age-group probabilities
    ood: np.ndarray | None  # (N,) float64 distance of the image's features to the training data
    cam: np.ndarray | None  # (N, h, w, C) float32 Grad-CAM maps (only when asked for)
    pooled: np.ndarray | None = None  # (N, K) float32 pooled features before site alignment (only when asked for)


def read_model_file(path: Path, what: str = "model file") -> bytes:
    """The bytes of a regular model file of at most MAX_MODEL_BYTES; ModelContractError (one line,
    naming ``what``) if it is missing, not a regular file, too large or unreadable."""
    try:
        return read_regular(path, MAX_MODEL_BYTES)
    except FileNotFoundError:
        raise ModelContractError(f"{path}: {what} not found") from None
    except FileTooLarge as e:
        raise ModelContractError(f"{path}: {e.size / 2**20:.0f} MiB is too large for an xray-edge model") from None
    except OSError as e:
        raise ModelContractError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def load_model(path: str | os.PathLike, threads: int = 0, expected_sha256: str | None = None) -> LoadedModel:
    """Open ``path`` on the CPU with ``threads`` intra-op threads (0: onnxruntime's default, one
    per physical core). ``expected_sha256`` pins the file's bytes (the shipped model's is checked
    this way). Raises ModelContractError with a one-line reason if it cannot be used."""
    path = Path(path)
    data = read_model_file(path)  # hashed, checked and loaded from the same bytes
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelContractError(f"{path}: sha256 {digest[:12]}... is not the shipped model's "
                                 f"{expected_sha256[:12]}... (file damaged or replaced); reinstall xray-edge")
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; problems are reported as exceptions
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelContractError(f"{path}: not a loadable ONNX model ({reason})") from None
    record = record_from_metadata(session.get_modelmeta().custom_metadata_map, source=str(path))
    if expected_sha256 is None:  # a pinned file is the shipped one byte for byte, sealed and checked when pinned
        check_seal(record, onnx_graph_bytes(data), str(path))
    check_io(session, record, str(path))
    if record.preprocessing.lung_crop is not None:
        from .lungs import lung_finder

        lung_finder(record.preprocessing.lung_crop)  # the recipe's lung model: present and the pinned file
    return LoadedModel(session, record, path, digest)


def check_io(session: ort.InferenceSession, record: ModelRecord, source: str) -> None:
    """Refuse a model whose graph inputs/outputs do not match its record."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != record.input_name:
        names = [i.name for i in inputs]
        raise ModelContractError(f"{source}: model inputs {names} do not match the record's '{record.input_name}'")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != record.input_shape[1:]:
        raise ModelContractError(f"{source}: model input shape {shape} does not match the record's {record.input_shape}")
    # site inputs are graph inputs with default values, which onnxruntime lists as overridable initializers
    k = len(record.site_reference.normal_mean) if record.site_reference is not None else None
    site = {i.name: list(i.shape) for i in session.get_overridable_initializers() if i.name in record.site_inputs}
    if site != {name: [1, k] for name in record.site_inputs}:
        raise ModelContractError(f"{source}: the model's site inputs {site} are not the record's {record.site_inputs} "
                                 f"of shape [1, {k}]")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    n = len(record.classes)
    expected = {record.outputs.logits: (2, n), record.outputs.age_logits: (2, len(AGE_GROUPS)),
                record.outputs.ood_distance: (1, None), record.outputs.cam: (4, n),
                record.outputs.pooled: (2, k)}
    for name, (rank, last) in expected.items():
        if name is None:
            continue
        if name not in outputs:
            raise ModelContractError(f"{source}: model has no output '{name}' (has {sorted(outputs)})")
        shape = outputs[name]
        if len(shape) != rank or (last is not None and isinstance(shape[-1], int) and shape[-1] != last):
            raise ModelContractError(f"{source}: output '{name}' has shape {shape}, not the record's "
                                     f"rank {rank}{f' with {last} at the end' if last else ''}")


def run_outputs(model: LoadedModel, batch: np.ndarray, names: list[str],
                alignment: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run the model on a (N, S, S, 1) float32 batch; returns the named raw outputs. The site inputs
    get ``alignment`` (scale, shift), else the model's site profile's, else their defaults.

    A model exported with a fixed batch size is fed in chunks of that size (last one padded)."""
    size = model.record.preprocessing.size
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 1):
        raise ValueError(f"expected a batch of shape (N, {size}, {size}, 1), got {batch.shape}")
    fixed = model.session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(batch), 1)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    feeds = site_feeds(model, alignment)
    for start in range(0, max(len(batch), 1), step):
        chunk = batch[start : start + step]
        n = len(chunk)
        if n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
        for part, out in zip(parts, model.session.run(names, {model.record.input_name: chunk, **feeds})):
            part.append(out[:n])
    return [np.concatenate(p) for p in parts]


def site_feeds(model: LoadedModel, alignment: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What to feed the site inputs: ``alignment``, else the model's site profile's when it aligns
    features, else nothing (the graph's identity defaults)."""
    fitted = model.site.fitted if model.site is not None else None
    if alignment is None and fitted is not None and fitted.scale is not None:
        alignment = (fitted.scale, fitted.shift)
    if alignment is None:
        return {}
    return {name: np.asarray(v, np.float32).reshape(1, -1) for name, v in zip(model.record.site_inputs, alignment)}


def predict_logits(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    """The raw (N, C) class output of the model."""
    return run_outputs(model, batch, [model.record.outputs.logits])[0]


def predict(model: LoadedModel, batch: np.ndarray, cam: bool = False, pooled: bool = False,
            alignment: tuple[np.ndarray, np.ndarray] | None = None) -> Prediction:
    """Class and age-group probabilities, gate distance and, if asked for, Grad-CAM maps and the
    pooled features (before any site alignment); ``alignment``: as ``run_outputs``."""
    o = model.record.outputs
    names = ([o.logits] + [n for n in (o.age_logits, o.ood_distance) if n] + ([o.cam] if cam and o.cam else [])
             + ([o.pooled] if pooled and o.pooled else []))
    got = dict(zip(names, run_outputs(model, batch, names, alignment)))
    logits = got[o.logits]
    if model.record.output_kind == "probabilities":
        logits = np.log(np.clip(logits.astype(np.float64), 1e-12, None))
    return Prediction(
        probs=softmax(logits, model.record.temperature),
        age=softmax(got[o.age_logits]) if o.age_logits else None,
        ood=np.asarray(got[o.ood_distance], np.float64).reshape(len(batch)) if o.ood_distance else None,
        cam=got.get(o.cam) if cam else None,
        pooled=got.get(o.pooled) if pooled else None,
    )


def predict_proba(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    """Class probabilities (N, C) float64: softmax(logits / record.temperature)."""
    return predict(model, batch).probs


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (max-subtracted, no overflow)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
