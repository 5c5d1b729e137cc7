"""Site simulation: what ``xray-edge calibrate`` would do at a hospital the model never saw.

For every fold the protocol saved (``train.protocol.fold``: a model trained without one origin, and
that origin's outputs), ``draws`` times for each k: k of the held-out origin's normals are the
site's calibration films; the rest of the origin (every class it has) is scored with the model's
own rules and with each calibration method (``xray_edge.site``), through the same decision
function as ``classify``. Reported per origin, k and method, mean and spread over draws and seeds:
the share of the scored normals called a finding (decision positive) and sent back (uncertain or
rejected), each finding's sensitivity (decision positive with it flagged), and the share of all
images sent back.

    python -m xray_edge.train.sitesim runs/recipes/folds/2 --out docs/site-simulation.md

The default method is the one with the largest cut in normals called a finding on the worst
criterion origin while COVID sensitivity stays >= 0.90 of its uncalibrated value on every origin.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge import site
from xray_edge.contract import CLASSES, Gate, ModelRecord, Outputs
from xray_edge.decision import decide
from xray_edge.metrics import softmax

KS = (10, 20, 50)
# (name, site.fit method, settings)
VARIANTS: tuple[tuple[str, str | None, dict[str, Any]], ...] = (
    ("none", None, {}),
    *((f"threshold q{q:.2f}", "threshold", {"quantile": q}) for q in (0.5, 0.6, 0.7, 0.8, 0.9)),
    ("align mean", "align", {"spread": False}),
    *((f"align mean+spread, shrink {k:g}", "align", {"shrink": float(k)}) for k in (10, 20, 30, 50)),
    ("align + threshold q0.70", "align+threshold", {"quantile": 0.7, "shrink": 30.0}),
    ("align + threshold q0.90", "align+threshold", {"quantile": 0.9, "shrink": 30.0}),
)
SENSITIVITY_KEPT = 0.90


class Fold:
    """One saved fold: the held-out origin's outputs, the fold model's dense head and rules."""

    def __init__(self, path: Path, classes: Sequence[str] = CLASSES):
        z = np.load(path)
        self.classes = list(classes)[:z["logits"].shape[1]]
        self.y, self.pooled, self.logits = z["y"], z["pooled"].astype(np.float64), z["logits"]
        self.dense = [z[f"dense{i}"] for i in range(6)]
        self.temperature = float(z["temperature"])
        self.reference = (z["normal_mean"], z["normal_std"])
        self.gate_means, self.gate_whiten = z["gate_means"], z["gate_whiten"]
        self.record = ModelRecord(classes=self.classes, temperature=self.temperature, abstain_margin=float(z["abstain_margin"]),
                                  thresholds={c: float(t) for c, t in zip(self.classes, z["thresholds"]) if np.isfinite(t)},
                                  gate=Gate(threshold=float(z["gate_threshold"]), quantile=float(z["gate_quantile"])),
                                  outputs=Outputs(ood_distance="ood"))
        check = self.head(self.pooled[:50])
        if np.abs(check - self.logits[:50]).max() > 1e-2 * max(1.0, np.abs(self.logits[:50]).max()):
            raise ValueError(f"{path}: the dense head does not reproduce the saved logits (not a GAP head?)")

    def head(self, pooled: np.ndarray) -> np.ndarray:
        """Logits of the GAP head's dense layers on pooled features."""
        x = pooled
        for i in range(0, 4, 2):
            x = np.maximum(x @ self.dense[i] + self.dense[i + 1], 0)
        return x @ self.dense[4] + self.dense[5]

    def scores(self, idx: np.ndarray, scale: np.ndarray | None = None, shift: np.ndarray | None = None) -> site.Scores:
        x = self.pooled[idx] if scale is None else self.pooled[idx] * scale + shift
        z = (x @ self.gate_whiten)[:, None, :] - (self.gate_means @ self.gate_whiten)[None]
        return site.Scores(softmax(self.head(x) if scale is not None else self.logits[idx], self.temperature),
                           (z * z).sum(axis=-1).min(axis=1), self.pooled[idx])


def outcome(fold: Fold, record: ModelRecord, scores: site.Scores, y: np.ndarray) -> dict[str, float | None]:
    """What the runtime's decisions make of the scored images: normals called a finding (decision
    positive) and sent back (uncertain or rejected), each finding's sensitivity (decision positive
    with that finding flagged) and the share of all images sent back."""
    made = [decide(record, p, None, float(d)) for p, d in zip(scores.probs, scores.distance)]
    kind = np.array([m.decision for m in made])
    back = np.isin(kind, ("uncertain", "rejected"))
    normal = y == fold.classes.index("NORMAL")
    out: dict[str, float | None] = {
        "normals_called_finding": float(np.mean(kind[normal] == "positive")) if normal.any() else None,
        "normals_sent_back": float(back[normal].mean()) if normal.any() else None, "sent_back": float(back.mean())}
    for c in record.thresholds:
        k = fold.classes.index(c)
        caught = [m.decision == "positive" and c in m.flagged for m, t in zip(made, y) if t == k]
        out[f"sensitivity_{c}"] = float(np.mean(caught)) if caught else None
    return out


def simulate(fold: Fold, k: int, draws: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Every variant's outcome on ``draws`` random calibration sets of ``k`` normals."""
    normal = fold.classes.index("NORMAL")
    normals = np.flatnonzero(fold.y == normal)
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(draws):
        drawn = rng.choice(normals, k, replace=False)
        rest = np.setdiff1d(np.arange(len(fold.y)), drawn)
        gate = (fold.record.gate.threshold, fold.record.gate.quantile)
        calib = drawn[site.usable(fold.scores(drawn).distance, gate)]
        if len(calib) < k // 2:  # calibrate would refuse a set the gate mostly rejects
            continue
        for name, method, settings in VARIANTS:
            if method is None:
                record, scale, shift = fold.record, None, None
            else:
                fitted = site.fit(method, fold.classes, fold.record.thresholds, gate, fold.scores(calib),
                                  rescore=lambda a, b: fold.scores(calib, a, b), reference=fold.reference, **settings)
                record = ModelRecord(classes=fold.classes, temperature=fold.temperature,
                                     abstain_margin=fold.record.abstain_margin, thresholds=fitted.thresholds,
                                     gate=Gate(threshold=fitted.gate_threshold, quantile=fold.record.gate.quantile),
                                     outputs=fold.record.outputs)
                scale = None if fitted.scale is None else np.array(fitted.scale)
                shift = None if fitted.shift is None else np.array(fitted.shift)
            out[name].append(outcome(fold, record, fold.scores(rest, scale, shift), fold.y[rest]))
    return out


def _mean_sd(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v)) if v else None}


def run(folder: Path, ks: Sequence[int] = KS, draws: int = 20, seed: int = 0) -> dict[str, Any]:
    """Simulate every saved fold (``seed<s>-<origin>.npz``) of ``folder``; pooled over seeds."""
    table: dict[str, Any] = {}
    for path in sorted(folder.glob("seed*-*.npz")):
        origin = path.stem.split("-", 1)[1]
        fold = Fold(path)
        n_normals = int((fold.y == fold.classes.index("NORMAL")).sum())
        for k in ks:
            if n_normals < k + 10:
                continue
            for name, results in simulate(fold, k, draws, seed).items():
                cell = table.setdefault(origin, {}).setdefault(str(k), {}).setdefault(name, [])
                cell.extend(results)
    return {o: {k: {name: {metric: _mean_sd([r[metric] for r in results]) for metric in results[0]}
                    for name, results in methods.items()} for k, methods in by_k.items()} for o, by_k in table.items()}


def choose(result: dict[str, Any], origins: Sequence[str], k: str = "20") -> dict[str, Any]:
    """The variant with the largest cut in normals called a finding on the worst of ``origins`` (the
    one whose normals are called a finding most often without calibration) while COVID sensitivity
    stays >= SENSITIVITY_KEPT of its uncalibrated value on every one of them."""
    present = [o for o in origins if k in result.get(o, {})]
    if not present:
        return {"k": int(k), "origins": [], "worst_origin": None, "variants": {}, "chosen": None}
    worst = max(present, key=lambda o: result[o][k]["none"]["normals_called_finding"]["mean"] or 0.0)
    scores = {}
    for name, _, _ in VARIANTS[1:]:
        before, after = result[worst][k]["none"], result[worst][k][name]
        b, a = before["normals_called_finding"]["mean"], after["normals_called_finding"]["mean"]
        kept = []
        for o in present:
            sb = result[o][k]["none"].get("sensitivity_COVID", {}).get("mean")
            sa = result[o][k][name].get("sensitivity_COVID", {}).get("mean")
            if sb:
                kept.append(sa / sb)
        scores[name] = {"worst_origin_cut": 1 - a / b if b else 0.0, "covid_sensitivity_kept": min(kept) if kept else None}
    feasible = {n: v for n, v in scores.items()
                if v["covid_sensitivity_kept"] is None or v["covid_sensitivity_kept"] >= SENSITIVITY_KEPT}
    return {"k": int(k), "origins": present, "worst_origin": worst, "variants": scores,
            "chosen": max(feasible, key=lambda n: feasible[n]["worst_origin_cut"]) if feasible else None}


def markdown(result: dict[str, Any], choice: dict[str, Any], command: str) -> str:
    metrics = sorted({m for by_k in result.values() for methods in by_k.values() for v in methods.values() for m in v})
    lines = ["# Site simulation", "", f"Made by `{command}`. Per held-out origin and number k of the site's normals "
             "used to calibrate: mean ± sd over random draws and training seeds, on the rest of that origin's images.",
             "", "| origin | k | method | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
             "|---|---:|---|" + "---:|" * len(metrics)]
    for o, by_k in result.items():
        for k, methods in by_k.items():
            for name, v in methods.items():
                cells = ["" if v[m]["mean"] is None else f"{v[m]['mean']:.3f} ± {v[m]['sd']:.3f}" for m in metrics]
                lines.append(f"| {o} | {k} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Choice (k = {choice['k']}, origins {', '.join(choice['origins'])}; worst origin without calibration: "
              f"{choice['worst_origin']}): the largest cut there in normals called a finding while COVID sensitivity stays "
              f">= {SENSITIVITY_KEPT:.0%} of its uncalibrated value on every origin: **{choice['chosen']}**.", "",
              f"| method | cut in normals called a finding ({choice['worst_origin']}) | COVID sensitivity kept (worst origin) |",
              "|---|---:|---:|"]
    for n, v in choice["variants"].items():
        kept = "" if v["covid_sensitivity_kept"] is None else f"{v['covid_sensitivity_kept']:.1%}"
        lines.append(f"| {n} | {v['worst_origin_cut']:.1%} | {kept} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xray_edge.train.sitesim", description=__doc__.split("\n\n")[0])
    parser.add_argument("folds", type=Path, help="a folder of saved folds (recipes --out .../folds/<n>)")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--origins", default="rtchanon,siim", help="origins the choice looks at")
    parser.add_argument("--out", type=Path, help="write the table here (and the figures as .json beside it)")
    args = parser.parse_args(argv)
    result = run(args.folds, draws=args.draws)
    choice = choose(result, args.origins.split(","))
    text = markdown(result, choice, "python -m xray_edge.train.sitesim " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"result": result, "choice": choice}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
