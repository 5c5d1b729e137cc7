"""Training recipes and their comparison on the cross-origin protocol.

A recipe is what changes how well the model transfers to other hospitals: the intensity
normalisation and lung crop (part of the model contract), the augmentation, the sample weights,
the label conflicts, worst-group reweighting, per-origin offsets, the head and block-5
fine-tuning. ``compare`` evaluates named recipes on one split, over several training seeds, with
the protocol of ``xray-edge train`` (``train.protocol``) and writes the table that
docs/training.md shows:

    python -m xray_edge.train.recipes ../shared/data/cxr3 ../shared/data/cxr3-extra \\
        --weights ../shared/weights/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 \\
        --out runs/recipes --doc docs/training.md
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from xray_edge.contract import Preprocessing

if TYPE_CHECKING:
    from xray_edge.preprocess import LungBox

BEGIN = "<!-- BEGIN GENERATED: python -m xray_edge.train.recipes (do not edit by hand) -->"
CHILD_ORIGINS = ("waliatushar",)  # the Kermany pediatric set (children aged 1-5) in CXR3: every other origin is adult
FEATURE_CACHE = Path.home() / ".cache" / "xray-edge" / "features"  # base features, one file per image view
END = "<!-- END GENERATED -->"


@dataclass(frozen=True)
class Recipe:
    """One way to train: preprocessing choices (contract), augmentation, sample weights, label
    conflicts, worst-group reweighting, per-origin offsets, head and block-5 fine-tuning."""

    name: str
    intensity: str = "percentile"
    crop_fraction: float = 0.08
    lung_crop: bool = False
    augment: str = "processing"
    aug_views: int = 1
    origin_weights: bool = True
    head: str = "gap"
    drop_conflicts: bool = True  # leave the known label conflicts (train.data) out of training
    dro_eta: float = 0.0  # worst-group reweighting strength (train.fit); 0: off
    centre: bool = False  # remove each origin's offset of its normals' mean feature (train.folds)
    fine_tune: int = 0  # block-5 convolutions trained with the head, counted from the last (train.finetune)

    def __post_init__(self) -> None:
        if self.centre and self.fine_tune:
            raise ValueError("per-origin offsets are removed from frozen features only: no fine-tuning with centre")

    def preprocessing(self, size: int) -> Preprocessing:
        """The contract's recipe; a lung crop uses the lung model installed in xray_edge.models."""
        crop = None
        if self.lung_crop:
            from xray_edge.train.lungs import installed_spec

            crop = installed_spec()
        return Preprocessing(size=size, intensity=self.intensity, crop_fraction=self.crop_fraction, lung_crop=crop)

    def lung_box(self) -> "LungBox | None":
        from xray_edge.lungs import finder_for

        return finder_for(self.preprocessing(224))

    def describe(self) -> dict[str, Any]:
        return asdict(self)


LUNG = {"lung_crop": True, "crop_fraction": 0.0}
AUG = {"augment": "geometric+processing", "aug_views": 1}
SHIPPED_0_2 = Recipe("0.2.0: lung crop, no augmentation, origin weights", aug_views=0, drop_conflicts=False, **LUNG)
RECIPES: tuple[Recipe, ...] = (
    SHIPPED_0_2,
    Recipe("+ label conflicts dropped", aug_views=0, **LUNG),
    Recipe("+ label conflicts dropped, worst-group reweighting", aug_views=0, dro_eta=2.0, **LUNG),
    Recipe("+ label conflicts dropped, per-origin normal offsets removed", aug_views=0, centre=True, **LUNG),
    Recipe("+ label conflicts dropped, worst-group reweighting, augmentation", dro_eta=2.0, **AUG, **LUNG),
    Recipe("+ label conflicts dropped, worst-group reweighting, augmentation, block5_conv4 fine-tuned", dro_eta=2.0,
           fine_tune=1, **AUG, **LUNG),
    Recipe("+ label conflicts dropped, augmentation, block5_conv4 fine-tuned", fine_tune=1, **AUG, **LUNG),
    Recipe("+ label conflicts dropped, worst-group reweighting, augmentation, block5_conv3-4 fine-tuned", dro_eta=2.0,
           fine_tune=2, **AUG, **LUNG),
)
DEFAULT = RECIPES[2]  # worst-group reweighting: the best worst held-out origin, gain beyond the seed spread (docs/training.md)


def compare(cfg: Any, recipes: Sequence[Recipe]) -> list[dict[str, Any]]:
    """The protocol (``train.protocol``) of each recipe on every seed of ``cfg.seeds`` (one split,
    one feature cache), merged into ``cfg.out``/recipes.json with the rows of other recipes from
    earlier runs; each fold's held-out features go to ``cfg.out``/folds/<recipe number> for the
    site simulation (``train.sitesim``)."""
    from xray_edge.train import pipeline, protocol

    timings: dict[str, float] = {}
    cfg.out.mkdir(parents=True, exist_ok=True)
    pipeline.seed_everything(cfg.seed)
    with pipeline.stage(timings, "scan_group_split"):
        ds = pipeline.load_dataset(cfg, cfg.out / "split.csv")
    with pipeline.stage(timings, "onnx_export_and_check"):
        base, run_base, digest, _ = pipeline.base_runner(cfg, ds)
    results = cfg.out / "recipes.json"
    earlier = json.loads(results.read_text())["rows"] if results.is_file() else []
    rows = [r for r in earlier if r["recipe"]["name"] not in {x.name for x in recipes}]  # kept from earlier runs
    order = [r.name for r in RECIPES]
    for recipe in recipes:
        key = f"recipe {recipe.name}"
        number = order.index(recipe.name) + 1 if recipe.name in order else 0
        with pipeline.stage(timings, f"{key}: features"):
            views = pipeline.recipe_views(cfg, ds, recipe, run_base, digest, base)
        per_seed = []
        for seed in cfg.seeds:
            with pipeline.stage(timings, f"{key}: seed {seed}"):
                result = protocol.evaluate_seed(cfg, ds, views, recipe, seed, base, cfg.out / "folds" / str(number))
            per_seed.append({k: v for k, v in result.items() if k != "_final"})
        del views
        rows.append({"number": number, "recipe": recipe.describe(), "summary": protocol.summary(per_seed),
                     "per_seed": per_seed, "seconds": {k.split(": ")[1]: v for k, v in timings.items()
                                                       if k.startswith(key)}})
        rows.sort(key=lambda r: r["number"] or len(order) + 1)
        results.write_text(json.dumps({"rows": rows}, indent=2))
    return rows


def _cell(stats: dict[str, Any], spread: bool = True) -> str:
    if stats["mean"] is None:
        return ""
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}" if spread else f"{stats['mean']:.3f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: recipe -> worst held-out origin (the criterion), each held-out origin's macro-F1,
    COVID-vs-NORMAL AUROC inside siim held out and within siim, share sent back, internal test;
    mean ± sd over seeds."""
    origins = sorted({o for r in rows for o in r["summary"]["origins"]})
    out = ["| # | recipe | **worst held-out origin macro-F1** | "
           + " | ".join(f"held out {o}: macro-F1 (sent back)" for o in origins)
           + " | siim held out: COVID AUROC | siim within (test split): COVID AUROC | internal test macro-F1 | seeds |",
           "|---|---|---:|" + "---:|" * len(origins) + "---:|---:|---:|---:|"]
    for r in rows:
        s = r["summary"]
        cells = []
        for o in origins:
            f = s["origins"].get(o)
            mark = "" if o in s["criterion_origins"] else "*"
            cells.append(f"{_cell(f['macro_f1'])}{mark} ({f['sent_back']['mean']:.0%})" if f else "")
        siim = s["origins"].get("siim", {}).get("auroc_covid_vs_normal", {"mean": None})
        within = s["within_origin_auroc"].get("siim", {"mean": None})
        out.append(f"| {r['number'] or ''} | {r['recipe']['name']} | **{_cell(s['worst_origin_macro_f1'])}** | "
                   + " | ".join(cells) + f" | {_cell(siim)} | {_cell(within)} | {_cell(s['test_macro_f1'])} | "
                   f"{len(s['seeds'])} |")
    return "\n".join(out)


def update_doc(doc: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the generated section of ``doc`` with the recipe table."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc}: no generated section (add the lines {BEGIN!r} and {END!r})")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{rest.split(END, 1)[1]}")


def main(argv: Sequence[str] | None = None) -> int:
    from xray_edge.train.pipeline import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m xray_edge.train.recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="+", help="data roots (as for xray-edge train)")
    parser.add_argument("--weights", required=True, help="VGG-19 no-top .h5, 'imagenet' or 'none'")
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--only", help="comma-separated recipe numbers (1-based) to run")
    parser.add_argument("--doc", type=Path, help="update this document's generated section")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    args = parser.parse_args(argv)
    chosen = [RECIPES[int(i) - 1] for i in args.only.split(",")] if args.only else list(RECIPES)
    cfg = TrainConfig(data_dirs=args.data, out=args.out, weights=args.weights,
                      seeds=tuple(int(s) for s in args.seeds.split(",")))
    rows = compare(cfg, chosen)
    print(table(rows))
    if args.doc:
        update_doc(args.doc, rows)
        print(f"updated {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
