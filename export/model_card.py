"""Fill MODEL_CARD.md's generated section from the records inside exported ONNX models, so every
figure in the card comes from a command:

    python -m xray_edge.export.model_card MODEL_CARD.md artifacts/xray-edge-vgg19-fp32.onnx \\
        runtime/models/xray-edge-vgg19-int8.onnx [artifacts/xray-edge-vgg19-fp16.onnx]

(``xray-edge export ... --model-card MODEL_CARD.md`` does the same with the files it wrote.)
Only the text between the BEGIN/END markers is replaced; the prose around it is kept.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from xray_edge.contract import VARIANTS, ModelContractError, ModelRecord, Preprocessing, record_from_metadata

from .command import shipped_path
from .data import sha256_file

BEGIN = "<!-- BEGIN GENERATED: python -m xray_edge.export.model_card (do not edit by hand) -->"
END = "<!-- END GENERATED -->"
SUMMARY = (("accuracy", "Accuracy"), ("macro_f1", "Macro F1"), ("macro_auroc", "Macro AUROC (one-vs-rest)"))
PER_CLASS = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"),
             ("auroc", "AUROC"))


def read_record(path: Path) -> ModelRecord:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return record_from_metadata({p.key: p.value for p in proto.metadata_props}, source=str(path))


def _shown(path: Path) -> str:
    """Path relative to the working folder when inside it (the repository root in practice)."""
    rel = os.path.relpath(path.resolve())
    return str(path) if rel.startswith("..") else Path(rel).as_posix()


def _ci(entry: dict[str, Any]) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci95") or (None, None)
    return f"{entry['value']:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None else f"{entry['value']:.3f}"


def _metric_rows(models: Sequence[tuple[Path, ModelRecord]], split: str, per_class: bool) -> list[str]:
    head = "| metric | " + " | ".join(r.variant.upper() for _, r in models) + " |"
    rows = [head, "|---|" + "---:|" * len(models)]
    for key, name in SUMMARY:
        rows.append(f"| {name} | " + " | ".join(_ci(r.metrics[split].get(key)) for _, r in models) + " |")
    for c in models[0][1].classes if per_class else ():
        for key, name in PER_CLASS:
            rows.append(f"| {c} {name} | " + " | ".join(
                _ci(r.metrics[split]["per_class"][c].get(key)) for _, r in models) + " |")
    return rows


def _cross_origin(cross: dict[str, Any] | None) -> list[str]:
    """The training run's cross-origin summary (carried in the record): per held-out origin, means
    over the training seeds."""
    if not cross:
        return ["### Cross-origin (leave-one-origin-out)", "", "Not measured for this model."]

    def cell(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    rows = [f"| {o}{'' if o in cross['criterion_origins'] else ' (not in the criterion)'} | {f['n']} | "
            f"{f['macro_f1']:.3f} | {cell(f.get('auroc_covid_vs_normal'), '.3f')} | {cell(f.get('sent_back'), '.0%')} |"
            for o, f in cross["origins"].items()]
    worst = cross["worst_origin_macro_f1"]
    return ["### Cross-origin (leave-one-origin-out, Keras model)", "",
            f"The model trained without any image of one origin, tested on all of its images; means over "
            f"{len(cross['seeds'])} training seed(s). macro-F1 over the classes that origin has (most likely class); "
            "COVID-vs-NORMAL AUROC inside the origin where it has both; share sent back to a person (uncertain or "
            "rejected by the rules fitted without it). Full per-seed figures: `train/results/metrics.json`.", "",
            "| held-out origin | images | macro-F1 | COVID AUROC | sent back |", "|---|---:|---:|---:|---:|", *rows,
            f"| **worst held-out origin** | | **{cell(worst, '.3f')}** | | |"]


def describe_preprocessing(p: Preprocessing) -> str:
    """One line of the record's preprocessing recipe, in the order it is applied."""
    crop = p.lung_crop
    steps = ["decode to grey [0, 1]"]
    if crop is not None:
        steps.append(f"lung crop (lung model `{crop.model}`, sha256 `{crop.sha256}`, {crop.size} px input, threshold "
                     f"{crop.threshold:g}, box margin {crop.margin:.0%}; whole image where the lungs cover under "
                     f"{crop.min_area:.0%})")
    if p.crop_fraction:
        steps.append(f"border crop {p.crop_fraction:.0%} per side")
    steps += [f"{p.interpolation} resize to {p.size} x {p.size}",
              f"percentile stretch {p.low_percentile:g}-{p.high_percentile:g}"]
    if p.intensity == "clahe":
        steps.append(f"CLAHE (clip {p.clahe_clip:g}, {p.clahe_tiles} x {p.clahe_tiles} tiles)")
    return " -> ".join(steps)


def render(models: Sequence[tuple[Path, ModelRecord]], shipped: Path | None) -> str:
    """The generated section (without markers) for ``models`` (path, record) in variant order."""
    models = sorted(models, key=lambda m: VARIANTS.index(m[1].variant))
    missing = [str(p) for p, r in models if "test" not in r.metrics or "val" not in r.metrics]
    if missing:
        raise ModelContractError(f"{', '.join(missing)}: record has no validation/test metrics "
                                 "(exported without a split manifest)")
    first = models[0][1]
    n_boot = first.metrics["test"].get("n_boot")
    gates = ", ".join(f"{r.variant.upper()} {r.gate.threshold:.1f}" for _, r in models if r.gate)
    out = [
        f"Model `{first.model_name}` version `{first.model_version}`; source Keras model sha256 "
        f"`{first.source_model_sha256}`; split manifest (split.csv) sha256 `{first.data_manifest_sha256}`.",
        f"Temperature {first.temperature:.4f}; thresholds "
        + (", ".join(f"{k} {v:.4f}" for k, v in first.thresholds.items()) or "none")
        + f"; 'uncertain, refer' when the top two probabilities are within {first.abstain_margin:.3f}"
        + (f"; input gate: squared Mahalanobis distance above the {first.gate.quantile:.0%} quantile of the "
           f"validation images' ({gates}) is rejected" if first.gate else "")
        + ("; classes seen per age group: " + ", ".join(f"{c} {'/'.join(g)}" for c, g in first.seen_age_groups.items())
           if first.seen_age_groups else "") + ".",
        f"Preprocessing (record): {describe_preprocessing(first.preprocessing)}.",
        "",
        "### Files",
        "",
        "| variant | file | size (MiB) | sha256 | gate |",
        "|---|---|---:|---|---|",
    ]
    for path, r in models:
        g = r.metrics["gate"]
        gate = (f"Keras check: max abs prob. diff {g['max_abs_prob_diff']:.1e} on {g['n']} {g['images']} images"
                if g.get("reference") == "keras" else
                "; ".join(f"{s}: agreement {g[s]['argmax_agreement']:.2%}, accuracy drop "
                          f"{g[s]['accuracy_drop_points']:+.2f} points" for s in ("val", "test")))
        gate += " (FORCED: failed its gate)" if r.forced else ""
        out.append(f"| {r.variant} | `{path.name}` | {path.stat().st_size / 2**20:.1f} | `{sha256_file(path)}` | {gate} |")
    for path, r in models:
        if "quantization" in r.metrics:
            qz = r.metrics["quantization"]
            out += ["", f"{r.variant.upper()}: static {qz['format']} quantization, {qz['weights']} weights, "
                        f"{qz['activations']} activations, {qz['method']} calibration on {qz['images']} training images "
                        f"(options {qz['calibrator_options']})."]
    if shipped is not None:
        out += ["", f"Shipped model: `{_shown(shipped)}`, sha256 `{sha256_file(shipped)}`"]
    counts = first.metrics.get("split_counts", {})
    out += ["", "### Split (images per class)", "",
            "| split | " + " | ".join(first.classes) + " | total |", "|---|" + "---:|" * (len(first.classes) + 1)]
    for split in ("train", "val", "test"):
        per = counts.get(split, {})
        out.append(f"| {split} | " + " | ".join(str(per.get(c, 0)) for c in first.classes)
                   + f" | {sum(per.values())} |")
    out += ["", *_cross_origin(first.metrics.get("cross_origin")),
            "", f"### Test metrics (n = {first.metrics['test']['n']}, 95 % bootstrap CI, {n_boot} resamples)", "",
            "Class decisions by argmax of the probabilities (the per-class thresholds are not applied here).", "",
            *_metric_rows(models, "test", per_class=True),
            "", f"### Validation metrics (n = {first.metrics['val']['n']})", "",
            *_metric_rows(models, "val", per_class=False)]
    return "\n".join(out)


def update_card(card: Path, model_paths: Sequence[Path], shipped: Path | None = None) -> None:
    """Replace the generated section of ``card`` with figures from ``model_paths``' records.
    ``shipped`` (default: whichever of them is the package's shipped model) gets its sha256 named."""
    if not card.is_file():
        raise FileNotFoundError(f"{card}: model card not found")
    text = card.read_text()
    if BEGIN not in text or END not in text:
        raise ModelContractError(f"{card}: no generated section (add the lines {BEGIN!r} and {END!r})")
    models = [(Path(p), read_record(Path(p))) for p in model_paths]
    if shipped is None:
        shipped = next((p for p, _ in models if p.resolve() == shipped_path().resolve()), None)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    card.write_text(f"{head}{BEGIN}\n{render(models, shipped)}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xray_edge.export.model_card", description=__doc__.split("\n\n")[0])
    parser.add_argument("card", type=Path, help="MODEL_CARD.md to update")
    parser.add_argument("models", type=Path, nargs="+", help="exported ONNX models (fp32, fp16, int8)")
    parser.add_argument("--shipped", type=Path, help="the shipped model (default: the one in runtime/models)")
    args = parser.parse_args(argv)
    try:
        update_card(args.card, args.models, args.shipped)
    except (OSError, ModelContractError) as e:
        print(f"model_card: {e}", file=sys.stderr)
        return 2
    print(f"updated {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
