"""``xray-edge train``: data roots -> honest split -> cached base features -> heads chosen by
leave-one-origin-out -> age head, calibration, thresholds, abstain band, input gate ->
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
from xray_edge.contract import AGE_GROUPS, Heatmap, ModelRecord, Outputs, Preprocessing, sha256_file
from xray_edge.metrics import classification_report, expected_calibration_error, fit_temperature, softmax
from xray_edge.train import crossorigin, data, features, heads, ood, report, split, thresholds
from xray_edge.train.manifest import SPLITS, write_manifest
from xray_edge.train.recipes import CHILD_ORIGINS, DEFAULT, FEATURE_CACHE, Recipe

SELECTION_RULE = ("highest mean leave-one-origin-out macro-F1 (over the classes each held-out origin has); "
                  "ties broken by the lower validation NLL")
THRESHOLD_RULE = ("on validation, calibrated probabilities, one-vs-rest for the finding classes (flag class c when "
                  "p_c >= t_c): COVID = largest threshold with sensitivity >= {s:.2f}; other findings = Youden's J")
ABSTAIN_RULE = ("'uncertain, refer' when the top two calibrated probabilities are within the margin: the smallest "
                "margin at which validation accuracy on the rest reaches {a:.2f} (abstaining on at most 25 %)")


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
    seed: int = 0
    cache_dir: Path = FEATURE_CACHE
    recipe: Recipe = field(default_factory=lambda: DEFAULT)
    heads: tuple[str, ...] = ("gap",)
    epochs: int = 40
    batch_size: int = 64
    lr: float | None = None  # None: heads.LEARNING_RATES per head
    patience: int = 6
    fine_tune_epochs: int = 0
    fine_tune_lr: float = 1e-5
    test_fraction: float = 0.33
    val_fraction: float = 0.15
    phash_hamming: int = 8
    ncc_threshold: float = 0.95
    covid_sensitivity: float = 0.95
    abstain_accuracy: float = 0.97
    gate_quantile: float = 0.99
    n_boot: int = 1000


@dataclass
class Dataset:
    """The images of every data root, with labels, origins, age groups and the split."""

    images: list[data.Image]
    classes: list[str]
    labels: np.ndarray
    origins: np.ndarray
    age: np.ndarray  # index into AGE_GROUPS
    splits: np.ndarray
    stats: dict[str, Any]


@dataclass
class Views:
    """Cached base features of every view: the clean view of each image and the augmented views of
    the training images."""

    x: np.ndarray  # (V, h, w, K) float16
    image: np.ndarray  # (V,) index into Dataset.images
    view: np.ndarray  # (V,) 0 = clean
    stats: dict[str, Any]

    def pooled(self) -> np.ndarray:
        """Global-average-pooled features (V, K) float32 (what the age head and the gate see)."""
        return self.x.astype(np.float32).mean(axis=(1, 2))

    def clean_rows(self) -> np.ndarray:
        """The row of every image's clean view, by image index."""
        clean = self.view == 0
        rows = np.empty(int(clean.sum()), int)
        rows[self.image[clean]] = np.flatnonzero(clean)
        return rows


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
    stratified by class and origin; writes the split manifest to ``manifest``."""
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
                               "source": im.source, "sha256": im.sha256, "group": f"g{g:05d}", "split": s}
                              for im, g, s in zip(images, groups, splits)))
    age = np.array([AGE_GROUPS.index(im.age_group) for im in images])
    return Dataset(images, classes, labels, origins, age, splits, stats)


def base_runner(cfg: TrainConfig, ds: Dataset) -> tuple[Any, Callable[[np.ndarray], np.ndarray], str, dict[str, Any]]:
    """The Keras base, an onnxruntime runner of its block5_pool output, its weights digest and the
    check of the ONNX export against Keras on 4 validation images."""
    from xray_edge.train.model import build_base, resolve_weights, to_onnx

    base = build_base(resolve_weights(cfg.weights) if cfg.arch == "vgg19" else None, cfg.size, cfg.arch)
    digest = features.weights_digest(base)
    run_onnx = features.onnx_runner(to_onnx(base).SerializeToString(), output=1)
    spec = Preprocessing(size=cfg.size)
    probe = [ds.images[i] for i in np.flatnonzero(ds.splits == "val")[:4]]
    x = np.stack([features.view_input(im, 0, spec, cfg.seed) for im in probe])
    check = features.compare(np.asarray(base.predict(x, verbose=0)[1]), run_onnx(x), 1e-4) | {"images": len(probe)}
    if not check["passed"]:
        raise RuntimeError(f"ONNX export of the base disagrees with Keras: {check}")
    return base, run_onnx, digest, check


def recipe_views(cfg: TrainConfig, ds: Dataset, recipe: Recipe, run_base, digest: str) -> Views:
    """Features of every clean view and of ``recipe.aug_views`` augmented views per training image
    by each augmentation of the recipe (``augment``: one name, or several joined by '+')."""
    spec = recipe.preprocessing(cfg.size)
    train = np.flatnonzero(ds.splits == "train")
    parts = [features.extract(run_base, [(im, 0) for im in ds.images], spec, digest, cfg.seed, cfg.cache_dir,
                              lung_box=recipe.lung_box())]
    images, views = [np.arange(len(ds.images))], [np.zeros(len(ds.images), int)]
    for name in recipe.augment.split("+") if recipe.aug_views else ():
        for v in range(1, recipe.aug_views + 1):
            parts.append(features.extract(run_base, [(ds.images[i], v) for i in train], spec, digest, cfg.seed,
                                          cfg.cache_dir, name, recipe.lung_box()))
            images.append(train)
            views.append(np.full(len(train), v))
    stats = {k: sum(p[1][k] for p in parts) for k in ("views", "computed", "from_cache", "compute_seconds")}
    return Views(np.concatenate([p[0] for p in parts]), np.concatenate(images), np.concatenate(views),
                 stats | {"augment": recipe.augment, "aug_views": recipe.aug_views})


def head_fitter(cfg: TrainConfig, ds: Dataset, views: Views, kind: str, by_origin: bool,
                histories: dict[str, Any] | None = None) -> crossorigin.FitFn:
    """A function (train images, val images) -> predictor of calibrated-free class probabilities
    for any set of images, training a ``kind`` head on the views of those images."""
    row_of = views.clean_rows()
    y_view = ds.labels[views.image]

    def fit(train: np.ndarray, val: np.ndarray):
        rows = np.flatnonzero(train[views.image])
        vrows = row_of[np.flatnonzero(val)]
        w = heads.sample_weights(y_view[rows], ds.origins[views.image[rows]], by_origin)
        wv = heads.sample_weights(y_view[vrows], ds.origins[views.image[vrows]], by_origin)
        head, hist = heads.train_head(kind, views.x[rows], y_view[rows], views.x[vrows], y_view[vrows],
                                      len(ds.classes), seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                      lr=cfg.lr or heads.LEARNING_RATES[kind], patience=cfg.patience,
                                      w_train=w, w_val=wv)
        if histories is not None:
            histories[kind] = hist
        fit.head = head  # the last head trained (the final model's, when called last)
        return lambda mask: softmax(heads.predict_logits(head, views.x[row_of[np.flatnonzero(mask)]]))

    return fit


def age_fitter(cfg: TrainConfig, ds: Dataset, views: Views) -> Callable[[np.ndarray, np.ndarray], Any]:
    """Like ``head_fitter`` for the age head (on pooled features, every training view)."""
    pooled = views.pooled()
    row_of = views.clean_rows()

    def fit(train: np.ndarray, val: np.ndarray):
        rows, vrows = np.flatnonzero(train[views.image]), row_of[np.flatnonzero(val)]
        head = heads.train_age_head(pooled[rows], ds.age[views.image[rows]], pooled[vrows], ds.age[views.image[vrows]],
                                    seed=cfg.seed)
        fit.head = head
        return lambda mask: softmax(heads.predict_logits(head, pooled[row_of[np.flatnonzero(mask)]]))

    return fit


def evaluate_recipe(cfg: TrainConfig, ds: Dataset, views: Views, recipe: Recipe, kind: str,
                    histories: dict[str, Any] | None = None) -> dict[str, Any]:
    """Internal validation/test figures and leave-one-origin-out of one recipe and head kind."""
    fit = head_fitter(cfg, ds, views, kind, recipe.origin_weights, histories)
    looo = crossorigin.leave_one_origin_out(fit, ds.labels, ds.origins, ds.splits, ds.classes)
    predict = fit(ds.splits == "train", ds.splits == "val")  # last: fit.head is the all-origin head
    probs = {s: predict(ds.splits == s) for s in ("val", "test")}
    y = {s: ds.labels[ds.splits == s] for s in ("val", "test")}
    return {
        "recipe": recipe.name,
        "head": kind,
        "internal": {s: crossorigin.fold_report(y[s], probs[s], ds.classes) for s in ("val", "test")},
        "val_nll": heads.nll(probs["val"], y["val"]),
        "looo": looo,
        "_fit": fit,
        "_probs": probs,
    }


def choose_head(candidates: dict[str, dict[str, Any]]) -> str:
    """The head kind with the best mean leave-one-origin-out macro-F1 (``SELECTION_RULE``)."""
    return max(candidates, key=lambda k: (candidates[k]["looo"]["mean_macro_f1"] or 0, -candidates[k]["val_nll"]))


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and write every output into ``cfg.out``; returns the metrics dict."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    data.list_images(cfg.data_dirs, cfg.classes, cfg.child_origins)  # refuse bad data before importing TF
    import keras

    from xray_edge.train.model import assemble, resolve_weights

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
        views = recipe_views(cfg, ds, recipe, run_base, digest)

    histories: dict[str, Any] = {}
    candidates = {}
    for kind in cfg.heads:
        with stage(timings, f"heads_{kind}_with_looo"):
            candidates[kind] = evaluate_recipe(cfg, ds, views, recipe, kind, histories)
    chosen = choose_head(candidates)
    result = candidates[chosen]
    head = result["_fit"].head
    for kind in cfg.heads:
        report.write_history(cfg.out / f"history_{kind}.csv", histories[kind])

    pooled = views.pooled()
    rows_of = views.clean_rows()
    split_rows = {s: rows_of[ds.splits == s] for s in SPLITS}  # clean views, in image order
    with stage(timings, "age_head_gate"):
        age_fit = age_fitter(cfg, ds, views)
        for o, ages in crossorigin.age_by_origin(age_fit, ds.labels, ds.origins, ds.splits, ds.age,
                                                  len(ds.classes)).items():
            result["looo"]["origins"][o]["age"] = ages
        age_predict = age_fit(ds.splits == "train", ds.splits == "val")
        age_head = age_fit.head
        means, whiten = ood.fit_mahalanobis(pooled[split_rows["train"]], ds.labels[views.image[split_rows["train"]]],
                                            len(ds.classes))
        val_distance = ood.distances(pooled[split_rows["val"]], means, whiten)
        gate = ood.calibrate(val_distance, cfg.gate_quantile)
        for o, rate in crossorigin.gate_by_origin(pooled[rows_of], ds.labels, ds.origins, ds.splits,
                                                  len(ds.classes), cfg.gate_quantile).items():
            result["looo"]["origins"][o]["gate_rejection_rate"] = rate

    if cfg.fine_tune_epochs:
        from xray_edge.train.finetune import fine_tune

        with stage(timings, "fine_tune_block5"):
            img = {s: np.stack([features.view_input(ds.images[i], v, spec, cfg.seed, recipe.augment, recipe.lung_box())
                                for i, v in zip(views.image[r], views.view[r])])
                   for s, r in (("train", np.flatnonzero(ds.splits[views.image] == "train")),
                                ("val", split_rows["val"]), ("test", split_rows["test"]))}
            y_img = {s: ds.labels[views.image[r]] for s, r in (("train", np.flatnonzero(ds.splits[views.image] == "train")),
                                                               ("val", split_rows["val"]), ("test", split_rows["test"]))}
            histories["finetune"] = fine_tune(base, head, img["train"], y_img["train"], img["val"], y_img["val"],
                                              len(ds.classes), epochs=cfg.fine_tune_epochs, batch_size=cfg.batch_size,
                                              lr=cfg.fine_tune_lr, seed=cfg.seed)
            report.write_history(cfg.out / "history_finetune.csv", histories["finetune"])
            tuned = keras.Model(base.input, head(base.output[1]))
            logits = {s: np.asarray(tuned.predict(img[s], batch_size=16, verbose=0), np.float64) for s in ("val", "test")}
    else:
        logits = {s: heads.predict_logits(head, views.x[split_rows[s]]) for s in ("val", "test")}

    y = {s: ds.labels[ds.splits == s] for s in ("val", "test")}
    with stage(timings, "calibration_thresholds_reports"):
        temperature = fit_temperature(logits["val"], y["val"])
        probs = {s: softmax(logits[s], temperature) for s in ("val", "test")}
        chosen_thresholds = thresholds.choose_thresholds(probs["val"], y["val"], ds.classes, cfg.covid_sensitivity)
        margin = thresholds.choose_abstain_margin(probs["val"], y["val"], cfg.abstain_accuracy)
        reports = {s: classification_report(y[s], probs[s], ds.classes, n_boot=cfg.n_boot, seed=cfg.seed)
                   for s in ("val", "test")}
        operating = thresholds.operating_points(probs["test"], y["test"], ds.classes, chosen_thresholds,
                                                n_boot=cfg.n_boot, seed=cfg.seed)
        abstain = thresholds.abstain_effect(probs["test"], y["test"], ds.classes, chosen_thresholds, margin)
        age_test = age_predict(ds.splits == "test")
        report.plot_curves({k: h for k, h in histories.items()}, cfg.out / "curves.png")
        report.plot_confusion(reports["test"]["confusion_matrix"], ds.classes, cfg.out / "confusion_test.png",
                              f"test split (n={len(y['test'])}), head={chosen}")

    with stage(timings, "normal_probe"):
        probe = crossorigin.normal_probe(head_fitter(cfg, ds, views, chosen, recipe.origin_weights), ds.labels,
                                         ds.origins, ds.splits, ds.classes)

    with stage(timings, "save_and_check_model"):
        model = assemble(base, head, age_head, means, whiten)
        model_path = cfg.out / "model.keras"
        model.save(model_path)
        reloaded = keras.saving.load_model(model_path, compile=False)
        x_check = np.stack([features.view_input(ds.images[i], 0, spec, cfg.seed, lung_box=recipe.lung_box())
                            for i in np.flatnonzero(ds.splits == "test")[:4]])
        got = reloaded.predict(x_check, verbose=0)
        model_check = features.compare(logits["test"][:4], np.asarray(got["logits"], np.float64), 1e-2)
        model_check["note"] = "reloaded model.keras logits vs the evaluated path (ONNX base, float16 feature cache)"
        model_check["ood_distance_relative_diff"] = float(np.max(np.abs(
            got["ood_distance"] - ood.distances(pooled[split_rows["test"][:4]], means, whiten))) / gate.threshold)

    timings["total"] = round(time.perf_counter() - t_start, 1)
    metrics = {
        "seed": cfg.seed,
        "config": _jsonable(asdict(cfg)),
        "recipe": recipe.describe(),
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "data": {"roots": [str(p) for p in cfg.data_dirs], "classes": ds.classes, "images": len(ds.images),
                 "by_origin": _counts(ds), "split_counts": _split_counts(ds), "grouping": ds.stats,
                 "manifest": "split.csv", "manifest_sha256": manifest_sha},
        "onnx_feature_check": onnx_check,
        "features": views.stats,
        "heads": {k: {"looo_mean_macro_f1": c["looo"]["mean_macro_f1"], "val_nll": c["val_nll"],
                      "val_macro_f1": c["internal"]["val"]["macro_f1_present"]} for k, c in candidates.items()},
        "selected_head": chosen,
        "selection_rule": SELECTION_RULE,
        "leave_one_origin_out": result["looo"],
        "fine_tune_epochs_run": len(histories["finetune"]["loss"]) if "finetune" in histories else 0,
        "temperature": temperature,
        "ece": {s: {"before": expected_calibration_error(softmax(logits[s]), y[s]),
                    "after": expected_calibration_error(probs[s], y[s])} for s in ("val", "test")},
        "thresholds": chosen_thresholds,
        "threshold_rule": THRESHOLD_RULE.format(s=cfg.covid_sensitivity),
        "abstain_margin": margin,
        "abstain_rule": ABSTAIN_RULE.format(a=cfg.abstain_accuracy),
        "test_abstain_effect": abstain,
        "test_operating_points": operating,
        "test": reports["test"],
        "val": reports["val"],
        "test_by_age_group": crossorigin.by_age_group(y["test"], probs["test"], ds.age[ds.splits == "test"], ds.classes),
        "age_head_test": crossorigin.fold_report(ds.age[ds.splits == "test"], age_test, list(AGE_GROUPS)),
        "gate": asdict(gate),
        "normal_probe": probe,
        "shipped_model_check": model_check,
        "timings_seconds": timings,
    }
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    seen = {c: [g for i, g in enumerate(AGE_GROUPS) if ((ds.labels == k) & (ds.age == i) & (ds.splits == "train")).any()]
            for k, c in enumerate(ds.classes)}
    record = ModelRecord(
        classes=ds.classes, preprocessing=spec, model_version=__version__, input_shape=["N", cfg.size, cfg.size, 1],
        outputs=Outputs(age_logits="age_logits", ood_distance="ood_distance", cam="cam"),
        temperature=temperature, thresholds=chosen_thresholds, abstain_margin=margin, seen_age_groups=seen,
        gate=gate, heatmap=Heatmap(layer="block5_conv4"), source_model_sha256=sha256_file(model_path),
        data_manifest_sha256=manifest_sha, metrics=record_metrics(metrics))
    record.validate(str(cfg.out / "record.json"))
    (cfg.out / "record.json").write_text(json.dumps(record.to_dict(), indent=2))
    return metrics


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
    looo = m["leave_one_origin_out"]
    return {"split": "test", "n": t["n"], "head": m["selected_head"], "accuracy": t["accuracy"],
            "macro_f1": t["macro_f1"], "macro_auroc": t["macro_auroc"],
            "sensitivity": {c: v["sensitivity"] for c, v in t["per_class"].items()},
            "specificity": {c: v["specificity"] for c, v in t["per_class"].items()},
            "cross_origin": {"mean_macro_f1": looo["mean_macro_f1"],
                             "origins": {o: {"n": f["n"], "macro_f1": f["macro_f1_present"]}
                                         for o, f in looo["origins"].items()}},
            "ece_before_temperature": m["ece"]["test"]["before"], "ece_after_temperature": m["ece"]["test"]["after"]}
