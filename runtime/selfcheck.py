"""Does this CPU compute what the reference CPU computed? The shipped models' outputs on fixed
generated inputs, against the values pinned beside them (``xray_edge.models/selfcheck.json``).

onnxruntime picks its int8 kernels by CPU (AVX2, AVX-512 VNNI, AMX, ARM dot product). With weights
in the AVX2-safe range (``export.quantize.AVX2_SAFE_WEIGHT``) every kernel sums exactly and the
outputs agree to float rounding; a kernel that saturates (8-bit weights on an AVX2-only x86) moves
them far beyond the tolerances here. The inputs are built from integers only (no libm), so they are
the same bits on every machine.

    python -m xray_edge.selfcheck            # exit 0: same outputs as pinned; 1: a drift, listed
    python -m xray_edge.selfcheck --write    # pin this machine's outputs (after shipping new models)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PINS = "selfcheck.json"
N_INPUTS = 4
RTOL = {"logits": 1e-4, "age_logits": 1e-4, "ood_distance": 1e-4, "lung_probability_sum": 1e-4}
MAX_MASK_PIXELS_DIFFERENT = 2  # of the lung mask (128 x 128), across the fixed inputs


def fixed_inputs(size: int, n: int = N_INPUTS, seed: int = 20261206) -> np.ndarray:
    """(n, size, size, 1) float32 in [0, 1]: an X-ray-like layout (bright body, two dark lung fields)
    with noise, from integer arithmetic only."""
    rng = np.random.Generator(np.random.PCG64(seed))
    y, x = np.mgrid[0:size, 0:size].astype(np.int64)
    out = np.empty((n, size, size, 1), np.float32)
    for k in range(n):
        img = np.full((size, size), 180, np.int64)
        for cx in (size * 3 // 10, size * 7 // 10):  # lung fields: ellipses, integer test
            rx, ry = size * (5 + k) // 40, size * (11 + k) // 40
            inside = (x - cx) ** 2 * ry ** 2 + (y - size // 2) ** 2 * rx ** 2 <= rx ** 2 * ry ** 2
            img[inside] -= 90 + 10 * k
        img += rng.integers(-20, 21, (size, size))
        out[k, :, :, 0] = np.clip(img, 0, 255).astype(np.float32) / np.float32(255)
    return out


def outputs() -> dict[str, Any]:
    """This machine's outputs of the shipped classifier and lung model on the fixed inputs."""
    from .classify import open_model
    from .lungs import box_of, lung_mask, probabilities
    from .session import run_outputs

    model = open_model()
    o = model.record.outputs
    names = [n for n in (o.logits, o.age_logits, o.ood_distance) if n]
    got = dict(zip(names, run_outputs(model, fixed_inputs(model.record.preprocessing.size), names)))
    out: dict[str, Any] = {"model": model.label, "sha256": model.sha256,
                           **{k: np.asarray(v, np.float64).round(7).tolist() for k, v in got.items()}}
    crop = model.record.preprocessing.lung_crop
    if crop is not None:
        probs = probabilities(crop, fixed_inputs(crop.size))
        masks = [lung_mask(p, crop.threshold) for p in probs]
        out |= {"lung_sha256": crop.sha256, "lung_probability_sum": [round(float(p.sum()), 4) for p in probs],
                "lung_mask": [np.packbits(m.ravel()).tobytes().hex() for m in masks],
                "lung_box": [box_of(m, (512, 512), crop) for m in masks]}
    return out


def compare(pinned: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Every difference beyond the tolerances, one line each (empty: the same answers)."""
    if pinned.get("sha256") != here["sha256"] or pinned.get("lung_sha256") != here.get("lung_sha256"):
        return ["the pins are for other model files: run python -m xray_edge.selfcheck --write after shipping"]
    problems = []
    for key, rtol in RTOL.items():
        if key not in pinned:
            continue
        a, b = np.asarray(pinned[key], np.float64), np.asarray(here[key], np.float64)
        scale = np.maximum(np.abs(a).max(), 1e-9)
        worst = float(np.abs(a - b).max() / scale)
        if worst > rtol:
            problems.append(f"{key}: differs by {worst:.2e} of its largest value (tolerance {rtol:.0e})")
    if "lung_mask" in pinned:
        flips = sum(int(np.unpackbits(np.frombuffer(bytes.fromhex(a), np.uint8)
                                      ^ np.frombuffer(bytes.fromhex(b), np.uint8)).sum())
                    for a, b in zip(pinned["lung_mask"], here["lung_mask"]))
        if flips > MAX_MASK_PIXELS_DIFFERENT:
            problems.append(f"lung mask: {flips} pixels differ (tolerance {MAX_MASK_PIXELS_DIFFERENT})")
        if [list(b) if b else None for b in pinned["lung_box"]] != [list(b) if b else None for b in here["lung_box"]]:
            problems.append(f"lung box: {here['lung_box']} instead of {pinned['lung_box']}")
    return problems


def pins_path() -> Path:
    return Path(str(resources.files("xray_edge.models") / PINS))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xray_edge.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="pin this machine's outputs")
    parser.add_argument("--json", action="store_true", help="print this machine's outputs as JSON")
    args = parser.parse_args(argv)
    here = outputs()
    if args.json:
        print(json.dumps(here))
        return 0
    if args.write:
        pins_path().write_text(json.dumps(here | {"pinned_on": f"{platform.machine()} {platform.processor()}".strip()},
                                          indent=1) + "\n")
        print(f"wrote {pins_path()}")
        return 0
    try:
        pinned = json.loads(pins_path().read_text())
    except (OSError, ValueError) as e:
        print(f"error: no usable pins at {pins_path()} ({e})", file=sys.stderr)
        return 2
    problems = compare(pinned, here)
    for line in problems:
        print(f"drift: {line}", file=sys.stderr)
    print("same outputs as pinned" if not problems else f"{len(problems)} output(s) differ from the pinned ones")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
