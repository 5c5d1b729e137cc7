"""``xray-edge train``: data roots -> honest split -> cached base features -> the recipe's model
judged by the cross-origin protocol on every seed (``train.protocol``) -> the first seed's model
fitted on every origin, with its age head, calibration, thresholds, abstain band and input gate ->
model.keras, record.json, split.csv, metrics.json and plots.

The pieces are shared with ``train.recipes``, which compares recipes on the same protocol.
"""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from xray_edge import __version__
from xray_edge.contract import (AGE_GROUPS, SITE_INPUTS, Heatmap, ModelRecord, Outputs, Preprocessing, SiteReference,
                                sha256_file)
from xray_edge.metrics import classification_report, expected_calibration_error, softmax
from xray_edge.train import crossorigin, data, features, finetune, folds, ood, protocol, report, rules, split, thresholds
from xray_edge.train.heatcheck import heat_in_lungs
from xray_edge.train.manifest import EXCLUDED, SPLITS, write_manifest
from xray_edge.train.recipes import CHILD_ORIGINS, DEFAULT, FEATURE_CACHE, Recipe

FEATURE_OUTPUTS = ("block5_pool", "block4_pool")  # what the base's ONNX runner gives, in order (train.features)

SELECTION_RULE = ("recipes (train.recipes) are compared by the worst held-out origin's macro-F1 (over the classes "
                  "it has), mean over seeds; origins whose masks trained the lung model are left out for lung-crop "
                  "recipes; a recipe replaces the shipped one only when it gains more than the seed spread")
THRESHOLD_RULE = ("on validation, calibrated probabilities, one-vs-rest for the finding classes (flag class c when "
                  "p_c >= t_c): COVID = largest threshold with sensitivity >= {s:.2f}; other findings = Youden's J")
ABSTAIN_RULE = ("'uncertain, refer' when the top two calibrated probabilities are within the margin: the smallest "
                "margin at which validation accuracy on the rest reaches {a:.2f} (abstaining on at most {m:.0%})")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in metrics.json)."""

    data_dirs: list[Path]
    out: Path = Path("runs/train")
    weights: str | None = None
    arch: str = "vgg19"
    classes: list[str] | None = None
    child_origins: tuple[str, ...] = CHILD_ORIGINS
    size: int = 224
    seed: int = 0  # the split and the augmentation draws
    seeds: tuple[int, ...] = (0,)  # training seeds of the protocol; the shipped model is the first one's
    cache_dir: Path = FEATURE_CACHE
    recipe: Recipe = field(default_factory=lambda: DEFAULT)
    epochs: int = 40
    batch_size: int = 64
    lr: float | None = None  # None: heads.LEARNING_RATES per head
    patience: int = 6
    fine_tune_epochs: int = 8
    fine_tune_lr: float = 2e-5
    fine_tune_batch: int = 32
    fine_tune_patience: int = 2
    test_fraction: float = 0.33
    val_fraction: float = 0.15
    phash_hamming: int = 8
    ncc_threshold: float = 0.95
    covid_sensitivity: float = 0.95
    abstain_accuracy: float = 0.97
    max_abstain: float = 0.10
    gate_quantile: float = 0.99
    n_boot: int = 1000
    save_folds: bool = False  # write each fold's held-out features for the site simulation (train.sitesim)
    heat_images: int = 200  # test images the heatmaps are checked on (train.heatcheck)


@dataclass
class Dataset:
    """The images of every data root, with labels, origins, age groups, the split and the known
    label conflicts (never scored; trained on or not by recipe)."""

    images: list[data.Image]
    classes: list[str]
    labels: np.ndarray
    origins: np.ndarray
    age: np.ndarray  # index into AGE_GROUPS
    splits: np.ndarray
    conflict: np.ndarray
    stats: dict[str, Any]


@contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a stage into ``timings`` (seconds) and log its start."""
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0) + time.perf_counter() - t0, 1)


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _versions() -> dict[str, str]:
    import cv2
    import keras
    import onnx
    import onnxruntime
    import sklearn
    import tensorflow as tf
    import tf2onnx

    return {"xray_edge": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "opencv": cv2.__version__}


def load_dataset(cfg: TrainConfig, manifest: Path) -> Dataset:
    """Scan, hash and decode every image, group duplicates/patients/studies and split by group,
    stratified by class and origin; writes the split manifest to ``manifest`` (label conflicts
    with split ``excluded``: export and benchmark never use them)."""
    listed, classes = data.list_images(cfg.data_dirs, cfg.classes, cfg.child_origins)
    images, bits, thumbs = data.scan(listed)
    groups, stats = split.group_images([im.path for im in images], [im.pixel_sha256 for im in images], bits, thumbs,
                                       cfg.phash_hamming, cfg.ncc_threshold, [im.group for im in images])
    labels = np.array([classes.index(im.label) for im in images])
    origins = np.array([im.origin for im in images])
    strata = np.unique([f"{im.label}|{im.origin}" for im in images], return_inverse=True)[1]
    try:
        splits = split.stratified_group_split(strata, groups, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    except ValueError as e:
        raise data.DatasetError(str(e)) from None
    write_manifest(manifest, ({"path": im.rel, "label": im.label, "origin": im.origin, "age_group": im.age_group,
                               "source": im.source, "sha256": im.sha256, "group": f"g{g:05d}",
                               "split": EXCLUDED if im.conflict else s}
                              for im, g, s in zip(images, groups, splits)))
    age = np.array([AGE_GROUPS.index(im.age_group) for im in images])
    conflict = np.array([im.conflict for im in images], bool)
    return Dataset(images, classes, labels, origins, age, splits, conflict, stats | {"label_conflicts": int(conflict.sum())})


def base_runner(cfg: TrainConfig, ds: Dataset) -> tuple[Any, Callable[[np.ndarray], list[np.ndarray]], str, dict[str, Any]]:
    """The Keras base, an onnxruntime runner of its (block5_pool, block4_pool) outputs
    (``FEATURE_OUTPUTS``), its weights digest and the check of the ONNX export against Keras on 4
    validation images."""
    from xray_edge.train.model import build_base, resolve_weights, to_onnx

    base = build_base(resolve_weights(cfg.weights) if cfg.arch == "vgg19" else None, cfg.size, cfg.arch)
    digest = features.weights_digest(base)
    run_onnx = features.onnx_runner(to_onnx(base).SerializeToString(), outputs=(1, 2))
    spec = Preprocessing(size=cfg.size)
    probe = [ds.images[i] for i in np.flatnonzero(ds.splits == "val")[:4]]
    x = np.stack([features.view_input(im, 0, spec, cfg.seed) for im in probe])
    reference = base.predict(x, verbose=0)
    check = features.compare(np.asarray(reference[1]), run_onnx(x)[0], 1e-4) | {"images": len(probe)}
    if not check["passed"]:
        raise RuntimeError(f"ONNX export of the base disagrees with Keras: {check}")
    return base, run_onnx, digest, check


def recipe_views(cfg: TrainConfig, ds: Dataset, recipe: Recipe, run_base, digest: str, base: Any = None) -> folds.Views:
    """Cached base outputs of every clean view and of ``recipe.aug_views`` augmented views per
    training image by each augmentation of the recipe (``augment``: one name, or several joined by
    '+'); with the fine-tuned convolutions' inputs when the recipe fine-tunes (``base`` needed)."""
    spec = recipe.preprocessing(cfg.size)
    train = np.flatnonzero(ds.splits == "train")
    jobs = [([(im, 0) for im in ds.images], "geometric", np.arange(len(ds.images)), 0)]
    kinds = [name for name in recipe.augment.split("+") for _ in range(recipe.aug_views)] if recipe.aug_views else []
    for k, name in enumerate(kinds, start=1):
        jobs.append(([(ds.images[i], 1 + (k - 1) % recipe.aug_views) for i in train], name, train, k))

    def outputs(job: tuple, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        got, stats = features.extract(run_base, FEATURE_OUTPUTS, job[0], spec, digest, cfg.seed, cfg.cache_dir, job[1],
                                      recipe.lung_box(), load=(name,))
        return got[name], stats

    parts = [outputs(job, FEATURE_OUTPUTS[0]) for job in jobs]
    stats = {k: sum(p[1][k] for p in parts) for k in ("views", "computed", "from_cache", "compute_seconds")}
    top_in = None
    if recipe.fine_tune:  # one job's block4_pool in memory at a time, turned into the fine-tuned convolutions' input
        from xray_edge.train.finetune import frozen_inputs

        starts = np.cumsum([0, *(len(job[0]) for job in jobs)])
        for job, start in zip(jobs, starts):
            x = frozen_inputs(base, recipe.fine_tune, outputs(job, FEATURE_OUTPUTS[1])[0])
            top_in = np.empty((starts[-1], *x.shape[1:]), np.float16) if top_in is None else top_in
            top_in[start:start + len(x)] = x
    return folds.Views(np.concatenate([p[0] for p in parts]), np.concatenate([images for _, _, images, _ in jobs]),
                       np.concatenate([np.full(len(images), k) for _, _, images, k in jobs]),
                       stats | {"augment": recipe.augment, "aug_views": recipe.aug_views}, top_in)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate by the protocol on every seed and write every output into ``cfg.out``;
    returns the metrics dict."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    data.list_images(cfg.data_dirs, cfg.classes, cfg.child_origins)  # refuse bad data before importing TF
    import keras

    from xray_edge.train.model import assemble, image_only, resolve_weights

    if cfg.arch == "vgg19":
        resolve_weights(cfg.weights)  # a missing weights file is refused before the data are read
    timings: dict[str, float] = {"import_tensorflow": round(time.perf_counter() - t_start, 1)}
    seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    recipe = cfg.recipe
    spec = recipe.preprocessing(cfg.size)
    manifest = cfg.out / "split.csv"
    with stage(timings, "scan_group_split"):
        ds = load_dataset(cfg, manifest)
        manifest_sha = sha256_file(manifest)
    with stage(timings, "onnx_export_and_check"):
        base, run_base, digest, onnx_check = base_runner(cfg, ds)
    with stage(timings, "features"):
        views = recipe_views(cfg, ds, recipe, run_base, digest, base)
    seeds = []
    for seed in cfg.seeds:
        with stage(timings, f"protocol_seed_{seed}"):
            seeds.append(protocol.evaluate_seed(cfg, ds, views, recipe, seed, base,
                                                cfg.out / "folds" if cfg.save_folds else None))
    final = seeds[0]["_final"]
    for name, history in final.history.items():
        report.write_history(cfg.out / f"history_{name}.csv", history)

    idx = {s: np.flatnonzero((ds.splits == s) & ~ds.conflict) for s in SPLITS}
    with stage(timings, "rules_age_head_reports"):
        if recipe.fine_tune:
            tuned_layers = finetune.apply(base, final.top)
        pooled = final.pooled(np.arange(len(ds.images)))
        logits = {s: final.logits(idx[s]) for s in ("val", "test")}
        y = {s: ds.labels[idx[s]] for s in SPLITS}
        fitted = rules.fit_rules(logits["val"], y["val"], pooled[idx["train"]], y["train"], pooled[idx["val"]],
                                 ds.classes, cfg.covid_sensitivity, cfg.abstain_accuracy, cfg.max_abstain,
                                 cfg.gate_quantile)
        probs = {s: softmax(logits[s], fitted.temperature) for s in ("val", "test")}
        age_fit = folds.age_fitter(ds, pooled, cfg.seeds[0])
        age_head, age_predict = age_fit(ds.splits == "train", ds.splits == "val")
        age_looo = crossorigin.age_by_origin(lambda tr, va: _mask_predictor(age_fit(tr, va)[1]), ds.labels, ds.origins,
                                             ds.splits, ds.age, len(ds.classes))
        reports = {s: classification_report(y[s], probs[s], ds.classes, n_boot=cfg.n_boot, seed=cfg.seed)
                   for s in ("val", "test")}
        operating = thresholds.operating_points(probs["test"], y["test"], ds.classes, fitted.thresholds,
                                                n_boot=cfg.n_boot, seed=cfg.seed)
        abstain = thresholds.abstain_effect(probs["test"], y["test"], ds.classes, fitted.thresholds,
                                            fitted.abstain_margin)
        report.plot_curves(final.history, cfg.out / "curves.png")
        report.plot_confusion(reports["test"]["confusion_matrix"], ds.classes, cfg.out / "confusion_test.png",
                              f"test split (n={len(y['test'])}), head={recipe.head}")

    with stage(timings, "save_and_check_model"):
        normals = idx["train"][y["train"] == ds.classes.index("NORMAL")] if "NORMAL" in ds.classes else idx["train"]
        normal_mean, normal_std = rules.normal_reference(pooled[normals], ds.origins[normals])
        model = assemble(base, final.head, age_head, fitted.means, fitted.whiten)
        model_path = cfg.out / "model.keras"
        model.save(model_path)
        reloaded = image_only(keras.saving.load_model(model_path, compile=False))
        x_check = np.stack([features.view_input(ds.images[i], 0, spec, cfg.seed, lung_box=recipe.lung_box())
                            for i in idx["test"][:4]])
        got = reloaded.predict(x_check, verbose=0)
        model_check = features.compare(logits["test"][:4], np.asarray(got["logits"], np.float64), 1e-2)
        model_check["note"] = "reloaded model.keras logits vs the evaluated path (ONNX base, float16 feature cache)"
        model_check["ood_distance_relative_diff"] = float(np.max(np.abs(
            got["ood_distance"] - ood.distances(pooled[idx["test"][:4]], fitted.means, fitted.whiten)))
            / fitted.gate.threshold)
    with stage(timings, "heat_in_lungs"):
        from xray_edge.train.lungs import installed_spec

        heat = heat_in_lungs(reloaded, np.stack([features.view_input(ds.images[i], 0, spec, cfg.seed,
                                                                     lung_box=recipe.lung_box())
                                                 for i in idx["test"][:cfg.heat_images]]),
                             spec.lung_crop or installed_spec())

    timings["total"] = round(time.perf_counter() - t_start, 1)
    looo_summary = protocol.summary(seeds)
    metrics = {
        "seed": cfg.seed,
        "seeds": list(cfg.seeds),
        "config": _jsonable(asdict(cfg)),
        "recipe": recipe.describe(),
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "data": {"roots": [str(p) for p in cfg.data_dirs], "classes": ds.classes, "images": len(ds.images),
                 "by_origin": _counts(ds), "split_counts": _split_counts(ds), "grouping": ds.stats,
                 "label_conflicts": {"n": int(ds.conflict.sum()), "trained_on": not recipe.drop_conflicts,
                                     "scored": False},
                 "manifest": "split.csv", "manifest_sha256": manifest_sha},
        "onnx_feature_check": onnx_check,
        "features": views.stats,
        "selection_rule": SELECTION_RULE,
        "protocol": {"summary": looo_summary, "per_seed": [{k: v for k, v in s.items() if k != "_final"} for s in seeds],
                     "age_by_origin": age_looo, "note": protocol.__doc__.strip().split("\n\n")[0]},
        "fine_tune": ({"convolutions": tuned_layers, "epochs_run": len(final.history["fine_tune"]["loss"])}
                      if recipe.fine_tune else None),
        "temperature": fitted.temperature,
        "ece": {s: {"before": expected_calibration_error(softmax(logits[s]), y[s]),
                    "after": expected_calibration_error(probs[s], y[s])} for s in ("val", "test")},
        "thresholds": fitted.thresholds,
        "threshold_rule": THRESHOLD_RULE.format(s=cfg.covid_sensitivity),
        "abstain_margin": fitted.abstain_margin,
        "abstain_rule": ABSTAIN_RULE.format(a=cfg.abstain_accuracy, m=cfg.max_abstain),
        "test_abstain_effect": abstain,
        "test_operating_points": operating,
        "test": reports["test"],
        "val": reports["val"],
        "test_by_age_group": crossorigin.by_age_group(y["test"], probs["test"], ds.age[idx["test"]], ds.classes),
        "age_head_test": crossorigin.fold_report(ds.age[idx["test"]], age_predict(idx["test"]), list(AGE_GROUPS)),
        "gate": asdict(fitted.gate),
        "shipped_model_check": model_check,
        "heat_in_lungs": heat,
        "timings_seconds": timings,
    }
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    seen = {c: [g for i, g in enumerate(AGE_GROUPS) if ((ds.labels == k) & (ds.age == i) & (ds.splits == "train")).any()]
            for k, c in enumerate(ds.classes)}
    record = ModelRecord(
        classes=ds.classes, preprocessing=spec, model_version=__version__, input_shape=["N", cfg.size, cfg.size, 1],
        outputs=Outputs(age_logits="age_logits", ood_distance="ood_distance", cam="cam", pooled="pooled"),
        temperature=fitted.temperature, thresholds=fitted.thresholds, abstain_margin=fitted.abstain_margin,
        seen_age_groups=seen, gate=fitted.gate, heatmap=Heatmap(layer="block5_conv4"), site_inputs=list(SITE_INPUTS),
        site_reference=SiteReference(tuple(float(v) for v in normal_mean), tuple(float(v) for v in normal_std)),
        source_model_sha256=sha256_file(model_path), data_manifest_sha256=manifest_sha,
        metrics=record_metrics(metrics))
    record.validate(str(cfg.out / "record.json"))
    (cfg.out / "record.json").write_text(json.dumps(record.to_dict(), indent=2))
    return metrics


def _mask_predictor(predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """An image-index predictor as a mask predictor (``crossorigin``'s interface)."""
    return lambda mask: predict(np.flatnonzero(mask))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _counts(ds: Dataset) -> dict[str, dict[str, int]]:
    return {o: {c: int(((ds.origins == o) & (ds.labels == k)).sum()) for k, c in enumerate(ds.classes)}
            for o in sorted(set(ds.origins))}


def _split_counts(ds: Dataset) -> dict[str, dict[str, int]]:
    return {s: {c: int(((ds.splits == s) & (ds.labels == i)).sum()) for i, c in enumerate(ds.classes)} for s in SPLITS}


def record_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The short summary stored in the model record (full figures stay in metrics.json)."""
    t = m["test"]
    summary = m["protocol"]["summary"]
    return {"split": "test", "n": t["n"], "head": m["recipe"]["head"], "accuracy": t["accuracy"],
            "macro_f1": t["macro_f1"], "macro_auroc": t["macro_auroc"],
            "sensitivity": {c: v["sensitivity"] for c, v in t["per_class"].items()},
            "specificity": {c: v["specificity"] for c, v in t["per_class"].items()},
            "cross_origin": {"seeds": summary["seeds"], "criterion_origins": summary["criterion_origins"],
                             "worst_origin_macro_f1": summary["worst_origin_macro_f1"]["mean"],
                             "origins": {o: {"n": m["protocol"]["per_seed"][0]["looo"][o]["n"],
                                             "macro_f1": f["macro_f1"]["mean"],
                                             "auroc_covid_vs_normal": f["auroc_covid_vs_normal"]["mean"],
                                             "sent_back": f["sent_back"]["mean"]}
                                         for o, f in summary["origins"].items()}},
            "ece_before_temperature": m["ece"]["test"]["before"], "ece_after_temperature": m["ece"]["test"]["after"]}
