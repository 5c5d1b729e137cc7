"""INT8 export variants side by side: what the calibration method, the weight range, keeping some
convolutions float, the four-channel first convolution and quantizing only the convolutions do to
agreement with FP32 and to speed.

    python -m xray_edge.benchmarks.int8_variants train/results/model.keras --data ../shared/data \\
        --images 500 --out benchmarks/int8_variants.md

Every variant is quantized from the same FP32 graph (with or without the fourth channel) with the
same calibration images; latency is timed in interleaved rounds (each round runs every variant),
so that a busy moment of the machine does not favour one of them. Only variants with 7-bit weights
give the same answers on x86 CPUs without VNNI (``quantize.AVX2_SAFE_WEIGHT``); the 8-bit row is
there to show what that costs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.benchmarks.profile_ops import session
from xray_edge.export import CALIB_IMAGES
from xray_edge.export.quantize import BASE_END, CLASSIFIER_INT8

CONV = ("Conv", "MaxPool")
CONV_RELU = ("Conv", "Relu", "MaxPool")  # the ReLU quantized with its convolution: its output range is [0, max]
PCT = {"symmetric": False, "num_bins": 2048, "percentile": 99.999}
# name -> to_int8's keyword arguments, plus "four": the first convolution takes the zero-weight fourth channel
VARIANTS: dict[str, dict[str, Any]] = {
    "3-ch conv1_1, every op, MinMax (v0.1)": {"four": False},
    "convolutions only, MinMax (0.2.0)": {"op_types": CONV},
    "convolutions only, MinMax, 8-bit weights": {"op_types": CONV, "weight_bits": 8},
    "convolutions only, entropy": {"op_types": CONV, "method": "entropy"},
    "convolutions + ReLU, MinMax": {"op_types": CONV_RELU},
    "every op, MinMax": {},
    "every op, percentile 99.999": {"method": "percentile", "options": PCT},
    "every op of the base, percentile 99.999": {"upto": BASE_END, "method": "percentile", "options": PCT},
    "every op of the base, block5 convolutions float": {"upto": BASE_END, "float_nodes": ("block5_conv",)},
    "every op of the base, MinMax, int8 activations": {"upto": BASE_END},
    "every op of the base, MinMax, uint8 activations (0.3.0)": CLASSIFIER_INT8,
}


def _logits(session, x: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def compare(model_path: Path, data: Path, n_images: int = 500, n_calib: int = CALIB_IMAGES, threads: int = 2, rounds: int = 5,
            seed: int = 0, only: Sequence[str] = ()) -> dict[str, Any]:
    """Build every variant (with ``only``: those whose name contains one of its parts), then measure
    agreement with FP32 on ``n_images`` test images and batch-1 and batch-8 latency in interleaved rounds."""
    import keras
    import onnx

    import xray_edge.train.model  # noqa: F401 (registers the model's layers)
    from xray_edge.contract import ModelRecord
    from xray_edge.export.convert import keras_to_onnx
    from xray_edge.export.data import SplitManifest, load_images, stratified_sample
    from xray_edge.export.quantize import AVX2_SAFE_WEIGHT, int8_weight_ranges, to_int8
    from xray_edge.metrics import softmax

    record = ModelRecord.from_json((model_path.parent / "record.json").read_text())
    manifest = SplitManifest(model_path.parent / "split.csv", record.classes, data)
    test = load_images(manifest, stratified_sample(manifest.items("test"), n_images, seed), record.preprocessing, "test")
    calib = load_images(manifest, stratified_sample(manifest.items("train"), n_calib, seed), record.preprocessing,
                        "calibration (train)")
    model = keras.saving.load_model(model_path, compile=False)
    out: dict[str, Any] = {"images": len(test.y), "calibration_images": len(calib.y), "threads": threads,
                           "rounds": rounds, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="xray-edge-int8-variants-") as tmp:
        tmp = Path(tmp)
        fp32 = {}
        for four in (False, True):
            fp32[four] = tmp / f"fp32-{four}.onnx"
            onnx.save(keras_to_onnx(model, four_channels=four), str(fp32[four]))
        reference_logits = _logits(session(fp32[True], threads, {}), test.x)
        reference = reference_logits.argmax(1)
        sessions = {}
        for name, variant in VARIANTS.items():
            if only and not any(part in name for part in only):
                continue
            path = tmp / f"int8-{len(sessions)}.onnx"
            print(f"building: {name}", file=sys.stderr)
            settings = dict(variant)
            to_int8(fp32[settings.pop("four", True)], path, calib.x, **settings)
            sessions[name] = session(path, threads, {})
            logits = _logits(sessions[name], test.x)
            pred = logits.argmax(1)
            out["variants"][name] = {"agreement_fp32": float(np.mean(pred == reference)),
                                     "accuracy": float(np.mean(pred == test.y)),
                                     "max_prob_diff": float(np.abs(softmax(logits) - softmax(reference_logits)).max()),
                                     "avx2_safe": max(int8_weight_ranges(onnx.load(str(path))).values()) <= AVX2_SAFE_WEIGHT,
                                     "b1_ms": [], "b8_ms": []}
        out["fp32_accuracy"] = float(np.mean(reference == test.y))
        for r in range(rounds):
            print(f"timing round {r + 1}/{rounds}", file=sys.stderr)
            for name, variant_session in sessions.items():
                for _ in range(2):  # warm-up
                    variant_session.run(["logits"], {"image": test.x[:1]})
                times = out["variants"][name]
                for i in range(10):
                    t = time.perf_counter()
                    variant_session.run(["logits"], {"image": test.x[i:i + 1]})
                    times["b1_ms"].append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                variant_session.run(["logits"], {"image": test.x[:8]})
                times["b8_ms"].append((time.perf_counter() - t) * 1000 / 8)
    for v in out["variants"].values():
        v["b1_median_ms"], v["b8_median_ms_per_image"] = float(np.median(v.pop("b1_ms"))), float(np.median(v.pop("b8_ms")))
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    from xray_edge.benchmarks.machine import describe

    m = describe(result["threads"])
    lines = ["# INT8 export variants", "", f"Created with `{command}` on {m['cpu']} ({', '.join(m['int8_features']) or 'no int8 features found'}), "
             f"{result['threads']} threads; {result['images']} test images (seeded stratified), {result['calibration_images']} "
             f"calibration images; latency: {result['rounds']} interleaved rounds, median. FP32 accuracy on these "
             f"images {result['fp32_accuracy']:.3f}. Agreement: the same most likely class as FP32.", "",
             "| variant | agreement with FP32 | largest probability difference | accuracy | same answer on AVX2-only x86 "
             "| batch-1 ms | batch-8 ms/img |", "|---|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {name} | {v['agreement_fp32']:.1%} | {v['max_prob_diff']:.3f} | {v['accuracy']:.3f} | "
              f"{'yes (7-bit weights)' if v['avx2_safe'] else 'no (8-bit weights saturate)'} | {v['b1_median_ms']:.1f} | "
              f"{v['b8_median_ms_per_image']:.1f} |" for name, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xray_edge.benchmarks.int8_variants",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model.keras with record.json and split.csv beside it")
    parser.add_argument("--data", type=Path, required=True, help="data folder the split's paths are relative to")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--calib-images", type=int, default=CALIB_IMAGES, help="training images that calibrate every variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the table here (and the figures as .json beside it)")
    parser.add_argument("--only", help="parts of variant names, separated by ';' (names hold commas): run only the variants "
                        "named like them")
    args = parser.parse_args(argv)
    result = compare(args.model, args.data, args.images, args.calib_images, threads=args.threads, rounds=args.rounds,
                     only=tuple(args.only.split(";")) if args.only else ())
    text = markdown(result, "python -m xray_edge.benchmarks.int8_variants " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
