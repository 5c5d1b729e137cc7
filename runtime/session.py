"""Load an xray-edge ONNX model with onnxruntime and turn input batches into probabilities.

The model's metadata record (classes, preprocessing, temperature, thresholds) is read from the
file itself; a model without a valid record, or whose input/output does not match it, is refused.

Privacy: onnxruntime's telemetry is switched off. Its official builds for Linux queue events
(device id, executable path, model file name, error text) in ~/.cache/Microsoft/DeveloperTools/
and upload them. The package (``xray_edge/__init__``, imported before this module) sets
``ORT_DISABLE_TELEMETRY=1`` before onnxruntime is first loaded, which is when onnxruntime reads
it (no uploader, device id or event queue is created); ``disable_telemetry_events()`` is called
before every session as well, for a process that loaded onnxruntime before xray-edge.

    model = load_model("model.onnx", threads=4)
    probs = predict_proba(model, batch)   # batch: (N, S, S, 1) float32 from preprocess()
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import ModelContractError, ModelRecord, record_from_metadata


@dataclass(frozen=True)
class LoadedModel:
    """An onnxruntime session together with the record it was exported with."""

    session: ort.InferenceSession
    record: ModelRecord
    path: Path

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def label(self) -> str:
        """Short identity written next to every result: name, version and variant."""
        r = self.record
        return f"{r.model_name} {r.model_version} {r.variant}"


def load_model(path: str | os.PathLike, threads: int = 0) -> LoadedModel:
    """Open ``path`` on the CPU with ``threads`` intra-op threads (0: onnxruntime's default, one
    per physical core). Raises ModelContractError with a one-line reason if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise ModelContractError(f"{path}: model file not found")
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; problems are reported as exceptions
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelContractError(f"{path}: not a loadable ONNX model ({reason})") from None
    record = record_from_metadata(session.get_modelmeta().custom_metadata_map, source=str(path))
    check_io(session, record, str(path))
    return LoadedModel(session, record, path)


def check_io(session: ort.InferenceSession, record: ModelRecord, source: str) -> None:
    """Refuse a model whose graph input/output does not match its record."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != record.input_name:
        names = [i.name for i in inputs]
        raise ModelContractError(f"{source}: model inputs {names} do not match the record's '{record.input_name}'")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != record.input_shape[1:]:
        raise ModelContractError(f"{source}: model input shape {shape} does not match the record's {record.input_shape}")
    outputs = {o.name: o for o in session.get_outputs()}
    if record.output_name not in outputs:
        raise ModelContractError(f"{source}: model has no output '{record.output_name}' (has {sorted(outputs)})")
    out_shape = outputs[record.output_name].shape
    if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != len(record.classes)):
        raise ModelContractError(
            f"{source}: output shape {out_shape} does not fit {len(record.classes)} classes {record.classes}"
        )


def predict_logits(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    """Run the model on a (N, S, S, 1) float32 batch; returns its raw (N, C) output.

    A model exported with a fixed batch size is fed in chunks of that size (last one padded)."""
    size = model.record.preprocessing.size
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 1):
        raise ValueError(f"expected a batch of shape (N, {size}, {size}, 1), got {batch.shape}")
    fixed = model.session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(batch), 1)
    out = []
    for start in range(0, len(batch), step):
        chunk = batch[start : start + step]
        n = len(chunk)
        if n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
        out.append(model.session.run([model.record.output_name], {model.record.input_name: chunk})[0][:n])
    return np.concatenate(out) if out else np.zeros((0, len(model.record.classes)), np.float32)


def predict_proba(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    """Class probabilities (N, C) float64: softmax(logits / record.temperature)."""
    out = predict_logits(model, batch)
    if model.record.output_kind == "probabilities":
        out = np.log(np.clip(out.astype(np.float64), 1e-12, None))
    return softmax(out, model.record.temperature)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (max-subtracted, no overflow)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
