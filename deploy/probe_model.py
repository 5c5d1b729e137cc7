"""Model inputs and class probabilities from fixed tensors: compares machines step by step.

``classify`` on two machines can differ for two reasons: the float decode/resize/normalise
(OpenCV and numpy SIMD code differ in the last bits) and the model's kernels. Saving each side's
preprocessed tensors, and running the very same tensors through the model on both sides,
separates them:

    # machine A: decode + preprocess, keep the tensors, probabilities for them
    python deploy/probe_model.py MODEL --images DIR --save-inputs a.npz --output a.csv
    # machine B: its own tensors (to compare preprocessing), then A's tensors through the model
    python deploy/probe_model.py MODEL --images DIR --save-inputs b.npz
    python deploy/probe_model.py MODEL --inputs a.npz --output b.csv
    python deploy/compare_probs.py a.npz b.npz && python deploy/compare_probs.py a.csv b.csv

The CSVs have classify's path / status / label / p_<class> / model columns. Runtime install only.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from xray_edge.contract import ModelContractError
from xray_edge.decode import DecodeError, read_image
from xray_edge.lungs import finder_for
from xray_edge.preprocess import preprocess
from xray_edge.session import LoadedModel, load_model, predict_proba


def prepare(model: LoadedModel, folder: Path) -> dict[str, np.ndarray]:
    """{file name: model input (S, S, 1)} for every file in ``folder`` (sorted)."""
    spec, out = model.record.preprocessing, {}
    lung_box = finder_for(spec)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            out[path.name] = preprocess(read_image(path), spec, lung_box=lung_box)
        except DecodeError as e:
            raise DecodeError(f"{path}: {e}") from None
    return out


def write_csv(path: Path, model: LoadedModel, names: list[str], probs: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "status", "label", *[f"p_{c}" for c in model.classes], "model"])
        for name, p in zip(names, probs):
            w.writerow([name, "ok", model.classes[int(np.argmax(p))], *[f"{v:.6f}" for v in p], model.label])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images to decode and preprocess here")
    src.add_argument("--inputs", type=Path, help="tensors saved by another machine's --save-inputs")
    ap.add_argument("--save-inputs", type=Path, help="with --images: save the tensors (.npz)")
    ap.add_argument("--output", type=Path, help="probabilities CSV")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.output is None and (args.save_inputs is None or args.images is None):
        ap.error("nothing to do: give --output, or --images with --save-inputs")
    try:
        model = load_model(args.model, args.threads)
        if args.images is not None:
            tensors = prepare(model, args.images)
            if args.save_inputs is not None:
                np.savez(args.save_inputs, **tensors)
        else:
            with np.load(args.inputs) as saved:
                tensors = {k: saved[k] for k in saved.files}
    except (ModelContractError, DecodeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not tensors:
        print("error: no inputs", file=sys.stderr)
        return 2
    if args.output is None:
        return 0
    names = list(tensors)
    write_csv(args.output, model, names, predict_proba(model, np.stack([tensors[n] for n in names])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
