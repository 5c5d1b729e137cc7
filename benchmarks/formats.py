"""The benchmarked model formats, declared once (Ultralytics style): name, title, file suffix, the
engine modules that run it, the modules that build it from ``model.keras``, how to build it and
how to run it.

A runner maps a (N, S, S, 1) float32 batch in [0, 1] to class probabilities (N, C) float64 (Keras
and TFLite: the ``logits`` sub-model, softmax with the reference record's temperature) or, for
ONNX, to the runtime's whole ``session.Prediction`` (softmax(logits / the file's record
temperature), age group, gate distance): ``probabilities`` reads either.
Only numpy is imported at module level; every engine is imported inside the function using it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from xray_edge.contract import ModelRecord

BATCH = 8  # the throughput batch size (the accuracy pass runs at it too)

Runner = Callable[[np.ndarray], np.ndarray]
Loader = Callable[[Path, int, "ModelRecord"], Runner]  # (path, threads, reference record) -> runner
# (model.keras, file to write, options) -> what was done. Options: "record" (JSON of the reference
# record), "split" (split.csv or None), "data_root", "calibration_images", "seed", "onnx_variants".
Builder = Callable[[Path, Path, dict], dict]


@dataclass(frozen=True)
class Format:
    """One row of the format table."""

    name: str  # key in configs, ``--model NAME=PATH`` and results
    title: str
    suffix: str  # file name ending, appended to the model stem when building
    engine: tuple[str, ...]  # modules needed to run it
    load: Loader
    builder: tuple[str, ...] = ()  # modules needed to build it from model.keras
    build: Builder | None = None


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    from xray_edge.session import softmax

    return softmax(logits, temperature)


def load_onnx(path: Path, threads: int, reference: ModelRecord) -> Runner:
    """ONNX through the runtime's own session and ``predict_proba`` (the file's own record and
    temperature); refused if its classes or preprocessing differ from the reference record's,
    since every format is fed the same preprocessed images."""
    from xray_edge.contract import ModelContractError
    from xray_edge.session import load_model, predict

    model = load_model(path, threads)
    own = model.record
    if own.classes != reference.classes or own.preprocessing != reference.preprocessing:
        raise ModelContractError(f"{path}: its record's classes/preprocessing differ from the reference "
                                 f"record's ({reference.model_name} {reference.model_version})")
    return lambda x: predict(model, x)


def probabilities(out: Any) -> np.ndarray:
    """Class probabilities from a runner's output (an array, or a Prediction)."""
    return np.asarray(getattr(out, "probs", out), dtype=np.float64)


def load_keras(path: Path, threads: int, reference: ModelRecord) -> Runner:
    """The Keras model's ``logits`` sub-model on TensorFlow, softmax(logits / temperature)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started in this process (never in the benchmark's worker)
        pass
    import keras

    from xray_edge.train.model import logits_model

    model = logits_model(keras.saving.load_model(path, compile=False))
    return lambda x: _softmax(np.asarray(model.predict_on_batch(x)), reference.temperature)


def load_tflite(path: Path, threads: int, reference: ModelRecord) -> Runner:
    """A TFLite logits model through ``ai_edge_litert``; the input is resized to each batch size,
    and quantized (int8/uint8) input/output tensors are (de)quantized with their own parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape: list[tuple[int, ...]] = [()]

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape != shape[0]:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(x))
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return _softmax(y, reference.temperature)

    return run


def build_tflite(keras_path: Path, out: Path, options: dict, int8: bool = False) -> dict:
    """Convert the Keras model's ``logits`` sub-model to TFLite (via a SavedModel, dynamic batch).
    ``int8``: full-integer post-training quantization (int8 weights and activations,
    TFLITE_BUILTINS_INT8 ops only) calibrated on a seeded stratified sample of the split manifest's
    training images; input and output stay float32."""
    import tempfile

    from xray_edge.contract import ModelRecord

    import keras
    import tensorflow as tf

    from xray_edge.train.model import logits_model

    model = logits_model(keras.saving.load_model(keras_path, compile=False))
    info: dict = {"converter": f"tf.lite.TFLiteConverter (TensorFlow {tf.__version__})"}
    with tempfile.TemporaryDirectory(prefix="xray-edge-tflite-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if int8:
            if not options.get("split"):
                raise ValueError("INT8 calibration needs the training split: give a split.csv "
                                 "(--data or --calibration)")
            from xray_edge.benchmarks.evalset import calibration_images

            record = ModelRecord.from_json(options["record"])
            images = calibration_images(Path(options["split"]), record.classes, record.preprocessing,
                                        options["calibration_images"], options["seed"],
                                        Path(options["data_root"]) if options.get("data_root") else None).x
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            info |= {"quantization": "full-integer PTQ, int8 weights and activations, float32 io",
                     "calibration_images": int(len(images))}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(converter.convert())
    return info


def build_onnx(keras_path: Path, out: Path, options: dict, variant: str) -> dict:
    """``xray-edge export`` (its FP32 check, INT8 calibration and accuracy gate) into ``out``'s
    folder, for every ONNX variant the run still misses (``options["onnx_variants"]``) at once."""
    from xray_edge.export.run import ExportOptions, export_variants

    variants = options.get("onnx_variants") or [variant]
    written = export_variants(ExportOptions(
        model=keras_path, out=out.parent, variants=variants, calib_images=options["calibration_images"],
        data=Path(options["data_root"]) if options.get("data_root") else None,
        split=Path(options["split"]) if options.get("split") else None, seed=options["seed"]))
    files = {e.variant: e.path for e in written}
    if files[variant] != out:
        files[variant] = files[variant].replace(out)
    return {"by": "xray_edge.export.run.export_variants", "variants": variants,
            "files": [str(p) for p in files.values()]}


_EXPORT = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter_common")
FORMATS: tuple[Format, ...] = (
    Format("keras_fp32", "Keras FP32", ".keras", ("tensorflow", "keras"), load_keras),
    Format("onnx_fp32", "ONNX FP32", "-fp32.onnx", ("onnxruntime",), load_onnx, _EXPORT,
           lambda k, o, opts: build_onnx(k, o, opts, "fp32")),
    Format("onnx_fp16", "ONNX FP16", "-fp16.onnx", ("onnxruntime",), load_onnx, _EXPORT,
           lambda k, o, opts: build_onnx(k, o, opts, "fp16")),
    Format("onnx_int8", "ONNX INT8 static", "-int8.onnx", ("onnxruntime",), load_onnx, _EXPORT,
           lambda k, o, opts: build_onnx(k, o, opts, "int8")),
    Format("tflite_fp32", "TFLite FP32", "-fp32.tflite", ("ai_edge_litert",), load_tflite,
           ("tensorflow", "keras"), build_tflite),
    Format("tflite_int8", "TFLite INT8", "-int8.tflite", ("ai_edge_litert",), load_tflite,
           ("tensorflow", "keras"), lambda k, o, opts: build_tflite(k, o, opts, int8=True)),
)
FP32_REFERENCES = ("onnx_fp32", "keras_fp32")  # argmax agreement is measured against the first that ran


def get(name: str) -> Format:
    """The format called ``name``; ValueError listing the known names otherwise."""
    for f in FORMATS:
        if f.name == name:
            return f
    raise ValueError(f"unknown format {name!r}; known: {', '.join(f.name for f in FORMATS)}")


def module_available(module: str) -> bool:
    """True if ``module`` can be imported (looked up without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if not module_available(m)]
