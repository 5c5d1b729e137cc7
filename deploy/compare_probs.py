"""Compare what several CPUs make of the same images against the first (the reference).

Each target is a prefix P of deploy/probe_model.py's output (P.json, P.npz) with, beside it,
P-selfcheck.json (``python -m xray_edge.selfcheck --json``) or P-selfcheck.err (why it did not
run). Files are matched by name. Per file and target:

* lung box: exactly the reference's (integer pixels: a moved box is a different crop);
* model input: max abs difference <= 1e-5 (inputs in [0, 1]; float SIMD code differs by a few
  ulps, ~1e-7; a different crop or interpolation differs by 1e-2 and more);
* on the same input tensor (the reference's): probabilities max abs difference <= 1e-4, age
  probabilities and gate score relative 1e-4. onnxruntime's int8 kernels sum exactly on every CPU
  (AVX2 as well, with weights in its safe range), so only float rounding around them remains;
* end to end (each CPU's own decode and preprocessing): the same tolerances, and the same
  decision and label;
* selfcheck: the shipped models on fixed inputs, by ``xray_edge.selfcheck.compare`` (its own
  tolerances: relative 1e-4, at most 2 lung-mask pixels, the same lung boxes).

    python deploy/compare_probs.py work/native work/haswell work/a72 [--selfcheck-optional]

Exit 0: every target agrees; 1: some difference beyond tolerance (listed); 2: unusable input.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INPUT_TOL = 1e-5
PROB_TOL = 1e-4
REL_TOL = 1e-4


@dataclass
class Target:
    """One CPU's probe and selfcheck."""

    name: str
    report: dict[str, Any]
    inputs: dict[str, np.ndarray]
    selfcheck: dict[str, Any] | None
    selfcheck_error: str = ""


@dataclass
class Comparison:
    """One target against the reference: each quantity's measured value and verdict, and every
    difference beyond tolerance."""

    values: dict[str, tuple[str, bool]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# key: (table row, what a failure line calls it, tolerance: None where it must be equal), in table order
QUANTITIES = {
    "box": ("lung box: files equal", "lung box", None),
    "dx": ("model input: max |dx|", "model input", INPUT_TOL),
    "dp_same": ("same input: probabilities max |dp|", "probabilities (same input)", PROB_TOL),
    "age_same": ("same input: age probs max rel", "age probs (same input)", REL_TOL),
    "gate_same": ("same input: gate score max rel", "gate score (same input)", REL_TOL),
    "dp": ("end to end: probabilities max |dp|", "probabilities (end to end)", PROB_TOL),
    "age": ("end to end: age probs max rel", "age probs (end to end)", REL_TOL),
    "gate": ("end to end: gate score max rel", "gate score (end to end)", REL_TOL),
    "decision": ("end to end: decision+label equal", "decision", None),
    "selfcheck": ("selfcheck (shipped models)", "selfcheck", None),
}
MEASURED = [k for k, (_, _, tol) in QUANTITIES.items() if tol is not None]


def load(prefix: Path) -> Target:
    """A target's files; ValueError (one line) if they cannot be read."""
    try:
        report = json.loads(Path(f"{prefix}.json").read_text())
        with np.load(f"{prefix}.npz") as saved:
            inputs = {k: saved[k] for k in saved.files}
        check, err = Path(f"{prefix}-selfcheck.json"), Path(f"{prefix}-selfcheck.err")
        selfcheck = json.loads(check.read_text()) if check.is_file() else None
        error = "" if selfcheck else ((err.read_text().strip().splitlines() or ["no output"])[-1]
                                      if err.is_file() else "not run")
    except (OSError, ValueError) as e:
        raise ValueError(f"{prefix}: cannot read the probe's results ({e})") from None
    if not isinstance(report.get("files"), dict):
        raise ValueError(f"{prefix}.json: not a probe_model.py report")
    return Target(prefix.name, report, inputs, selfcheck, error)


def relative(a: Any, b: Any) -> float:
    """max |a - b| relative to the largest |a| (0 when both are None, inf when only one is)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = np.atleast_1d(np.asarray(a, np.float64)), np.atleast_1d(np.asarray(b, np.float64))
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12))


def compare(ref: Target, cand: Target, selfcheck_optional: bool = False) -> Comparison:
    """``cand`` against ``ref``, file by file (one problem line per file), then their selfchecks."""
    from xray_edge.selfcheck import compare as compare_selfcheck

    cmp, name = Comparison(), cand.name
    rf, cf = ref.report["files"], cand.report["files"]
    if ref.report.get("sha256") != cand.report.get("sha256"):
        cmp.problems.append(f"{name}: another model ({cand.report.get('model')}) than the reference's")
    cmp.problems += [f"{name}: {f}: missing" for f in sorted(set(rf) - set(cf))]
    cmp.problems += [f"{name}: {f}: not in the reference" for f in sorted(set(cf) - set(rf))]
    worst = dict.fromkeys(MEASURED, 0.0)
    boxes = decisions = compared = differing = 0
    for f in sorted(set(rf) & set(cf)):
        a, b = rf[f], cf[f]
        if a["error"] or b["error"]:
            if a["error"] != b["error"]:
                cmp.problems.append(f"{name}: {f}: unreadable on one side ({a['error'] or 'ok'} / {b['error'] or 'ok'})")
            continue
        xa, xb = ref.inputs.get(f), cand.inputs.get(f)
        if xa is None or xb is None or xa.shape != xb.shape:
            cmp.problems.append(f"{name}: {f}: model inputs missing or of another shape")
            continue
        compared += 1
        fails = []
        if a["lung_box"] == b["lung_box"]:
            boxes += 1
        else:
            fails.append(f"lung box {b['lung_box']} instead of {a['lung_box']}")
        values = {"dx": float(np.abs(xa.astype(np.float64) - xb).max())}
        same = b if np.array_equal(xa, xb) else b.get("on_reference_input")  # the model on the reference's tensor
        differing += same is not b
        if same is None:
            fails.append("inputs differ and the model was not run on the reference's")
        for suffix, out in (("_same", same), ("", b)):
            if out is not None:
                values |= {"dp" + suffix: float(np.abs(np.subtract(a["probs"], out["probs"])).max()),
                           "age" + suffix: relative(a["age"], out["age"]),
                           "gate" + suffix: relative(a["gate_score"], out["gate_score"])}
        for key, value in values.items():
            worst[key] = max(worst[key], value)
            _, what, tol = QUANTITIES[key]
            if not value <= tol and not (same is b and key in ("dp", "age", "gate")):  # NaN too; no repeats
                fails.append(f"{what} off by {value:.3g} > {tol:g}")
        if (a["decision"], a["label"]) == (b["decision"], b["label"]):
            decisions += 1
        else:
            fails.append(f"{b['decision']} {b['label'] or '-'} instead of {a['decision']} {a['label'] or '-'}")
        if fails:
            cmp.problems.append(f"{name}: {f}: " + "; ".join(fails))
    cmp.values = {k: (f"{worst[k]:.3g}", worst[k] <= QUANTITIES[k][2]) for k in MEASURED}
    cmp.values["dx"] = (f"{worst['dx']:.3g} ({differing} differ)" if differing else "0 (same bits)",
                        worst["dx"] <= INPUT_TOL)
    cmp.values |= {"box": (f"{boxes}/{compared}", boxes == compared),
                   "decision": (f"{decisions}/{compared}", decisions == compared)}
    if ref.selfcheck is None:
        cmp.values["selfcheck"] = ("not run", selfcheck_optional)
        if not selfcheck_optional:
            cmp.problems.append(f"{ref.name}: selfcheck did not run ({ref.selfcheck_error})")
    elif cand.selfcheck is None:
        cmp.values["selfcheck"] = ("did not run", False)
        cmp.problems.append(f"{name}: selfcheck did not run ({cand.selfcheck_error})")
    else:
        drift = compare_selfcheck(ref.selfcheck, cand.selfcheck)
        cmp.problems += [f"{name}: selfcheck: {line}" for line in drift]
        cmp.values["selfcheck"] = ("identical" if ref.selfcheck == cand.selfcheck else "DIFFERS" if drift
                                   else "within tol.", not drift)
    if compared == 0:
        cmp.problems.append(f"{name}: no file could be compared")
    return cmp


def table(ref: Target, targets: list[Target], comparisons: list[Comparison]) -> str:
    """Quantities down, targets across: each target's value against the reference, '!' beyond tolerance."""
    width = max(len(label) for label, _, _ in QUANTITIES.values())
    cols = [max(12, len(t.name), *(len(value) + 2 for value, _ in c.values.values()))
            for t, c in zip(targets, comparisons)]
    head = f"{'against ' + ref.name:<{width}}  {'tolerance':>9}  " + "  ".join(
        f"{t.name:>{w}}" for t, w in zip(targets, cols))
    lines = [head, "-" * len(head)]
    for key, (label, _, tol) in QUANTITIES.items():
        shown = "its own" if key == "selfcheck" else "exact" if tol is None else f"{tol:g}"
        cells = [f"{c.values[key][0] + ('' if c.values[key][1] else ' !'):>{w}}" for c, w in zip(comparisons, cols)]
        lines.append(f"{label:<{width}}  {shown:>9}  " + "  ".join(cells))
    lines.append(f"{'verdict':<{width}}  {'':>9}  " + "  ".join(
        f"{'PASS' if c.ok else 'FAIL':>{w}}" for c, w in zip(comparisons, cols)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="prefix of the reference CPU's results (e.g. work/native)")
    ap.add_argument("targets", type=Path, nargs="+", help="prefixes of the CPUs to check against it")
    ap.add_argument("--selfcheck-optional", action="store_true",
                    help="pass even where the shipped models' selfcheck cannot run on the reference")
    args = ap.parse_args(argv)
    try:
        ref, targets = load(args.reference), [load(p) for p in args.targets]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    comparisons = [compare(ref, t, args.selfcheck_optional) for t in targets]
    files = ref.report["files"]
    print(f"model {ref.report['model']} (sha256 {ref.report['sha256'][:12]}), {len(files)} files, "
          f"{sum(1 for f in files.values() if not f['error'])} readable")
    for t in [ref, *targets]:
        v = t.report.get("versions", {})
        print(f"  {t.name}: {t.report.get('machine')}, " + ", ".join(f"{k} {x}" for k, x in v.items())
              + f"; probe {t.report.get('seconds', '?')} s")
    print(table(ref, targets, comparisons))
    if ref.selfcheck is None:
        print(f"note: the selfcheck did not run on {ref.name}: {ref.selfcheck_error}")
    problems = [p for c in comparisons for p in c.problems]
    for p in problems:
        print(f"FAIL: {p}")
    print("PASS: every target agrees with " + ref.name if not problems
          else f"FAIL: {len(problems)} difference(s) beyond tolerance")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
