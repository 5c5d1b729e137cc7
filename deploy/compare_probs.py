"""Compare two ``xray-edge classify`` CSV results of the same images (e.g. x86-64 vs aarch64).

Given two .npz files instead (model inputs saved by probe_model.py), compares the preprocessed
tensors file by file: max abs difference <= 1e-5 by default (inputs are in [0, 1]; different
SIMD code paths differ by a few float32 ulps, ~4e-7; a real preprocessing difference, such as
another interpolation, differs by 1e-2 and more).

Rows are matched by file name (the two runs see the same images under different folders).
Passes when every file was classified on both sides, every class probability agrees within the
tolerance, and the predicted class agrees. A flip of the predicted class is tolerated only where
the reference's top two probabilities are within 2 x tolerance of each other (a near-tie that the
allowed difference can legitimately reorder); it is reported. (A flip with a wider margin always
breaks the tolerance as well: swapping two classes m apart moves one of them by at least m / 2.)

Default probability tolerance, by the model variant in the results' ``model`` column:
  int8: one output quantisation level. The logits of a QDQ int8 model come out of a
       DequantizeLinear with scale s, so they move in steps of s; moving every logit by one step
       (s / T after the runtime's temperature T) moves a probability by at most tanh(s / 2T)
       (the bound is tight). With ``--model`` that bound is read from the model (0.057 for the
       shipped VGG-19: s = 0.1076, T = 0.943); without it, 0.05.
       Why int8 needs this although its kernels agree bit for bit between x86-64 (AVX512-VNNI)
       and ARM (emulated Cortex-A72) on the same input tensors: the float preprocessing (OpenCV
       resize / colour conversion, numpy) differs in the last bits between SIMD instruction sets
       (<= 4.2e-7 measured), which moves a few input pixels across an int8 rounding boundary, and
       the int8 network turns that into a step of one output level. On x86-64 alone, +-2.4e-7
       noise on the inputs of the shipped model moved logits by at most one level and
       probabilities by median 0.009, 90th percentile 0.027, max 0.047 (16 images x 8 draws).
  fp16 0.001, fp32 0.0001: float models are smooth in their input; only summation order differs.

    python deploy/compare_probs.py x86_64.csv aarch64.csv [--model MODEL.onnx | --tol 0.05]
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOLERANCE = {"int8": 0.05, "fp16": 1e-3, "fp32": 1e-4}  # int8: fallback without --model
TENSOR_TOLERANCE = 1e-5


@dataclass
class Row:
    status: str
    probs: dict[str, float]
    model: str
    error: str


@dataclass
class Comparison:
    tol: float
    classes: list[str]
    lines: list[tuple[str, list[float], list[float], float, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    near_ties: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # rejected by the input gate on both sides (no probabilities)

    @property
    def max_diff(self) -> float:
        return max((d for *_, d, _, _ in self.lines), default=0.0)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.lines or self.rejected)


def read_results(path: Path) -> dict[str, Row]:
    """{file name: Row} from a classify CSV; ValueError with a one-line reason if unusable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if not rows or "path" not in rows[0] or not any(k.startswith("p_") for k in rows[0]):
        raise ValueError(f"{path}: not an xray-edge classify CSV (needs path and p_<class> columns)")
    out: dict[str, Row] = {}
    for r in rows:
        name = os.path.basename(r["path"])
        if name in out:
            raise ValueError(f"{path}: file name {name} appears twice; compare flat folders")
        try:
            probs = {k[2:]: float(v) for k, v in r.items() if k.startswith("p_") and v != ""}
        except ValueError:
            raise ValueError(f"{path}: {name}: probabilities are not numbers") from None
        out[name] = Row(r.get("status", ""), probs, r.get("model", ""), r.get("reason", ""))
    return out


def model_variant(rows: dict[str, Row]) -> str:
    """The variant named last in the ``model`` column ("name version variant")."""
    variants = {r.model.split()[-1] for r in rows.values() if r.model.split()}
    if len(variants) != 1 or next(iter(variants)) not in TOLERANCE:
        raise ValueError(f"cannot tell the model variant from {sorted(variants)}; pass --tol")
    return variants.pop()


def output_level_tolerance(model_path: Path) -> tuple[float, str] | None:
    """(tanh(s / 2T), explanation) for a model whose logits come from a DequantizeLinear with a
    single scale s; None for any other model. Needs ``onnx`` (host side only)."""
    import onnx
    from onnx import numpy_helper

    from xray_edge.contract import record_from_metadata

    model = onnx.load(str(model_path))
    record = record_from_metadata({p.key: p.value for p in model.metadata_props}, str(model_path))
    if record.output_kind != "logits":
        return None
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and record.outputs.logits in node.output and node.input[1] in init:
            scale = numpy_helper.to_array(init[node.input[1]])
            if scale.size == 1:
                s, t = float(scale.reshape(())), record.temperature
                return math.tanh(s / (2 * t)), f"one output level: tanh(s / 2T), s = {s:.4g}, T = {t:.4g}"
    return None


def compare(ref: dict[str, Row], cand: dict[str, Row], tol: float) -> Comparison:
    """Compare candidate results against reference results, file by file."""
    classes = sorted({c for r in ref.values() for c in r.probs})
    cmp = Comparison(tol, classes)
    for name in sorted(set(ref) - set(cand)):
        cmp.problems.append(f"{name}: missing from the second results")
    for name in sorted(set(cand) - set(ref)):
        cmp.problems.append(f"{name}: missing from the first results")
    for name in sorted(set(ref) & set(cand)):
        a, b = ref[name], cand[name]
        if a.status == b.status == "rejected":
            cmp.rejected.append(name)
            continue
        if a.status != "ok" or b.status != "ok":
            cmp.problems.append(f"{name}: not classified ({a.status}: {a.error or '-'} / {b.status}: {b.error or '-'})")
            continue
        if set(a.probs) != set(b.probs):
            cmp.problems.append(f"{name}: different classes {sorted(a.probs)} vs {sorted(b.probs)}")
            continue
        pa, pb = [a.probs[c] for c in classes], [b.probs[c] for c in classes]
        diff = max(abs(x - y) for x, y in zip(pa, pb))
        top_a, top_b = classes[pa.index(max(pa))], classes[pb.index(max(pb))]
        cmp.lines.append((name, pa, pb, diff, top_a, top_b))
        if diff > tol:
            cmp.problems.append(f"{name}: probabilities differ by {diff:.6f} > {tol}")
        if top_a != top_b:
            margin = sorted(pa)[-1] - sorted(pa)[-2]
            if margin <= 2 * tol:
                cmp.near_ties.append(f"{name}: {top_a} vs {top_b} (reference top-2 margin {margin:.6f})")
            else:
                cmp.problems.append(f"{name}: predicted {top_a} vs {top_b} (margin {margin:.6f})")
    return cmp


def report(cmp: Comparison, names: tuple[str, str]) -> str:
    """A per-file table and a one-line verdict."""
    width = max([len("file"), *(len(n) for n, *_ in cmp.lines)])
    probs_head = " ".join(f"{c[:10]:>10}" for c in cmp.classes)
    out = [f"{'file':<{width}}  {'side':<8} {probs_head}  {'max|dp|':>9}  prediction"]
    for name, pa, pb, diff, top_a, top_b in cmp.lines:
        out.append(f"{name:<{width}}  {names[0]:<8} {' '.join(f'{p:10.6f}' for p in pa)}  {'':>9}  {top_a}")
        out.append(f"{'':<{width}}  {names[1]:<8} {' '.join(f'{p:10.6f}' for p in pb)}  {diff:9.6f}  {top_b}")
    out += [f"note: near-tie {t}" for t in cmp.near_ties]
    out += [f"note: {name}: rejected by the input gate on both sides" for name in cmp.rejected]
    out += [f"FAIL: {p}" for p in cmp.problems]
    n = len(cmp.lines)
    agree = sum(a == b for *_, a, b in cmp.lines)
    verdict = "PASS" if cmp.ok else "FAIL"
    same = " (identical to 6 decimals)" if cmp.ok and all(pa == pb for _, pa, pb, *_ in cmp.lines) else ""
    out.append(f"{verdict}: {n} files, max |p_{names[1]} - p_{names[0]}| = {cmp.max_diff:.6f}{same} "
               f"(tolerance {cmp.tol:.4g}), predicted class agrees on {agree}/{n}")
    return "\n".join(out)


def compare_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float,
                    names: tuple[str, str]) -> tuple[bool, str]:
    """(ok, report) for two {file name: model input} mappings."""
    lines, problems, worst = [], [], 0.0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            problems.append(f"{key}: only in {names[0] if key in a else names[1]}")
        elif a[key].shape != b[key].shape:
            problems.append(f"{key}: shapes {a[key].shape} vs {b[key].shape}")
        else:
            d = np.abs(a[key].astype(np.float64) - b[key].astype(np.float64))
            worst = max(worst, float(d.max()))
            lines.append(f"{key:<28} max |dx| {d.max():.3g}  differing values {int((d > 0).sum())}/{d.size}")
            if d.max() > tol:
                problems.append(f"{key}: inputs differ by {d.max():.3g} > {tol}")
    ok, compared = not problems and bool(lines), len(lines)
    lines += [f"FAIL: {p}" for p in problems]
    lines.append(f"{'PASS' if ok else 'FAIL'}: {compared} model inputs, "
                 f"max |x_{names[1]} - x_{names[0]}| = {worst:.3g} (tolerance {tol})")
    return ok, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="results CSV (or inputs .npz) of the reference (e.g. x86-64)")
    ap.add_argument("candidate", type=Path, help="results CSV (or inputs .npz) to check (e.g. aarch64)")
    ap.add_argument("--tol", type=float, help="max abs difference (default: by model variant, see above)")
    ap.add_argument("--model", type=Path, help="the model both results came from (int8: exact tolerance)")
    ap.add_argument("--names", nargs=2, default=("x86_64", "aarch64"), metavar=("REF", "CAND"))
    args = ap.parse_args(argv)
    if args.reference.suffix == args.candidate.suffix == ".npz":
        try:
            with np.load(args.reference) as fa, np.load(args.candidate) as fb:
                ok, text = compare_tensors({k: fa[k] for k in fa.files}, {k: fb[k] for k in fb.files},
                                           args.tol if args.tol is not None else TENSOR_TOLERANCE,
                                           tuple(args.names))
        except (OSError, ValueError) as e:
            print(f"error: cannot read model inputs ({e})", file=sys.stderr)
            return 2
        print(text)
        return 0 if ok else 1
    try:
        ref, cand = read_results(args.reference), read_results(args.candidate)
        if args.tol is not None:
            tol, why = args.tol, "--tol"
        else:
            variant = model_variant(ref)
            tol, why = TOLERANCE[variant], f"{variant} default"
            if variant == "int8" and args.model is not None:
                tol, why = output_level_tolerance(args.model) or (tol, why)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmp = compare(ref, cand, tol)
    print(report(cmp, tuple(args.names)))
    print(f"tolerance {tol:.4g}: {why}")
    return 0 if cmp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
