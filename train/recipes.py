"""Training recipes and their comparison on the cross-origin protocol.

A recipe is what changes how well the features transfer to other hospitals: the intensity
normalisation and lung crop (part of the model contract), the augmentation, the sample weights and
the head. ``compare`` evaluates named recipes on one split with the same leave-one-origin-out
protocol as ``xray-edge train`` and writes the table that docs/training.md shows:

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
    """One way to train: preprocessing choices (contract), augmentation, weights, head."""

    name: str
    intensity: str = "percentile"
    crop_fraction: float = 0.08
    lung_crop: bool = False
    augment: str = "processing"
    aug_views: int = 1
    origin_weights: bool = True
    head: str = "gap"

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


TODAY = Recipe("today (v0.1 shipped)", augment="geometric", origin_weights=False)
RECIPES: tuple[Recipe, ...] = (
    TODAY,
    Recipe("+ processing augmentation", origin_weights=False),
    Recipe("+ origin weights"),
    Recipe("+ origin weights, flatten head", head="flatten"),
    # Intensity and lung crop, each compared without augmentation (their features cost a full pass).
    Recipe("no augmentation, origin weights", aug_views=0),
    Recipe("no augmentation, origin weights, CLAHE", aug_views=0, intensity="clahe"),
    Recipe("no augmentation, origin weights, lung crop", aug_views=0, lung_crop=True, crop_fraction=0.0),
    Recipe("geometric augmentation, origin weights", augment="geometric"),
    Recipe("geometric + processing augmentation, origin weights", augment="geometric+processing"),
    Recipe("geometric + processing augmentation, origin weights, lung crop", augment="geometric+processing",
           lung_crop=True, crop_fraction=0.0),
)
DEFAULT = RECIPES[6]  # best mean cross-origin macro-F1 (docs/training.md)


def compare(cfg: Any, recipes: Sequence[Recipe]) -> list[dict[str, Any]]:
    """Internal and leave-one-origin-out figures of each recipe (one split, one feature cache),
    merged into ``cfg.out``/recipes.json with the rows of other recipes from earlier runs."""
    from xray_edge.train import pipeline

    timings: dict[str, float] = {}
    cfg.out.mkdir(parents=True, exist_ok=True)
    pipeline.seed_everything(cfg.seed)
    with pipeline.stage(timings, "scan_group_split"):
        ds = pipeline.load_dataset(cfg, cfg.out / "split.csv")
    with pipeline.stage(timings, "onnx_export_and_check"):
        _, run_base, digest, _ = pipeline.base_runner(cfg, ds)
    results = cfg.out / "recipes.json"
    earlier = json.loads(results.read_text())["rows"] if results.is_file() else []
    rows = [r for r in earlier if r["recipe"]["name"] not in {x.name for x in recipes}]  # kept from earlier runs
    for recipe in recipes:
        key = f"recipe {recipe.name}"
        with pipeline.stage(timings, f"{key}: features"):
            views = pipeline.recipe_views(cfg, ds, recipe, run_base, digest)
        with pipeline.stage(timings, f"{key}: heads"):
            result = pipeline.evaluate_recipe(cfg, ds, views, recipe, recipe.head)
        rows.append({"recipe": recipe.describe(), "features": views.stats, "val_nll": result["val_nll"],
                     "internal": result["internal"], "looo": result["looo"],
                     "seconds": {k.split(": ")[1]: v for k, v in timings.items() if k.startswith(key)}})
        order = [r.name for r in RECIPES]
        rows.sort(key=lambda r: order.index(r["recipe"]["name"]) if r["recipe"]["name"] in order else len(order))
        results.write_text(json.dumps({"rows": rows}, indent=2))
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: recipe -> internal test macro-F1 and per-origin / mean cross-origin figures."""
    origins = sorted({o for r in rows for o in r["looo"]["origins"]})
    head = ("| recipe | intensity | augmentation | weights | head | internal test macro-F1 | "
            + " | ".join(f"held out: {o}" for o in origins) + " | **mean cross-origin macro-F1** |")
    out = [head, "|---|---|---|---|---|---:|" + "---:|" * len(origins) + "---:|"]
    for r in rows:
        rec, looo = r["recipe"], r["looo"]
        cells = []
        for o in origins:
            f = looo["origins"].get(o)
            sens = "; ".join(f"{c} sens {v['sensitivity']['value']:.2f}" for c, v in f["per_class"].items()
                             if v["sensitivity"]) if f else ""
            cells.append(f"{f['macro_f1_present']:.3f} ({sens})" if f else "")
        aug = f"{rec['augment']} x{rec['aug_views']}" if rec["aug_views"] else "none"
        crop = " + lung crop" if rec["lung_crop"] else ""
        out.append(f"| {rec['name']} | {rec['intensity']}{crop} | {aug} | "
                   f"{'class x origin' if rec['origin_weights'] else 'class'} | {rec['head']} | "
                   f"{r['internal']['test']['macro_f1_present']:.3f} | " + " | ".join(cells)
                   + f" | **{looo['mean_macro_f1']:.3f}** |")
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    chosen = [RECIPES[int(i) - 1] for i in args.only.split(",")] if args.only else list(RECIPES)
    cfg = TrainConfig(data_dirs=args.data, out=args.out, weights=args.weights, seed=args.seed)
    rows = compare(cfg, chosen)
    print(table(rows))
    if args.doc:
        update_doc(args.doc, rows)
        print(f"updated {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
