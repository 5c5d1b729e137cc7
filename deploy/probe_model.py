"""What this CPU makes of a folder of images, for comparing CPUs (deploy/check-cpus.sh).

For every file: the lung box found, the model input, the class probabilities, the decision and
label, the age-group probabilities and the gate score, made by the runtime's own functions
(``pipeline.prepare``, ``session.predict``, ``decision.decide``), so they are what ``classify``
computes. Writes OUT.json (those, per file) and OUT.npz (the model inputs by file name).

With ``--reference-inputs`` (another CPU's OUT.npz), every file whose model input here is not
bit for bit the reference's also goes through the model with the reference's tensor
(``on_reference_input``): that separates the model's kernels from the float preprocessing. Where
the inputs are the same bits, the file's own outputs are already that comparison.

    python deploy/probe_model.py IMAGES --out native                      # the reference CPU
    python deploy/probe_model.py IMAGES --out arm --reference-inputs native.npz
    python deploy/compare_probs.py native arm

Runtime install only (``--model``: default the shipped model, sha256 pinned as in classify).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from xray_edge.classify import open_model
from xray_edge.contract import ModelContractError
from xray_edge.decision import decide
from xray_edge.pipeline import prepare
from xray_edge.session import LoadedModel, predict

PACKAGES = ("onnxruntime", "numpy", "opencv-python-headless")


def outputs(model: LoadedModel, probs: np.ndarray, age: np.ndarray | None, ood: float | None) -> dict[str, Any]:
    """One image's model outputs and what the record's rules make of them."""
    d = decide(model.record, probs, age, ood)
    return {"probs": probs.tolist(), "decision": d.decision, "label": d.label,
            "age": None if age is None else age.tolist(), "gate_score": d.gate_score}


def probe(model: LoadedModel, folder: Path, reference: dict[str, np.ndarray] | None = None
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(report, {file name: model input}) for every file in ``folder`` (sorted by name); with
    ``reference``, files whose input differs from it are also run on the reference's input."""
    prepared = [prepare(p, model.record.preprocessing) for p in sorted(folder.iterdir()) if p.is_file()]
    files: dict[str, Any] = {Path(p.path).name: {"error": p.error, "note": p.note, "lung_box": p.lung_box}
                             for p in prepared}
    inputs = {Path(p.path).name: p.image for p in prepared if p.image is not None}
    differ = [n for n, x in inputs.items() if reference is not None and n in reference
              and not np.array_equal(reference[n], x)]
    names = list(inputs) + differ
    if names:  # one batch: own inputs, then the reference's where they differ
        out = predict(model, np.stack([inputs[n] for n in inputs] + [reference[n] for n in differ]))
        for k, name in enumerate(names):
            row = outputs(model, out.probs[k], None if out.age is None else out.age[k],
                          None if out.ood is None else float(out.ood[k]))
            if k < len(inputs):
                files[name] |= row
            else:
                files[name]["on_reference_input"] = row
    return {"model": model.label, "sha256": model.sha256, "machine": platform.machine(),
            "versions": {p: version(p) for p in PACKAGES}, "files": files}, inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path, help="folder of images (its files, not sub-folders)")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.npz")
    ap.add_argument("--model", type=Path, help="default: the shipped model")
    ap.add_argument("--reference-inputs", type=Path, help="another CPU's OUT.npz")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        model = open_model(args.model, args.threads)
        reference = None
        if args.reference_inputs is not None:
            with np.load(args.reference_inputs) as saved:
                reference = {k: saved[k] for k in saved.files}
        if not args.images.is_dir():
            raise ValueError(f"{args.images}: not a folder")
        report, inputs = probe(model, args.images, reference)
    except (ModelContractError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not report["files"]:
        print(f"error: {args.images}: no files", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - start, 1)
    np.savez(f"{args.out}.npz", **inputs)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
