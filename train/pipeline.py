"""``xray-edge train``: data -> honest split -> cached base features -> heads -> calibration ->
thresholds -> model.keras, record.json, split.csv, metrics.json and plots."""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from xray_edge import __version__
from xray_edge.contract import ModelRecord, Preprocessing, sha256_file
from xray_edge.metrics import classification_report, expected_calibration_error, fit_temperature, softmax
from xray_edge.train import data, features, heads, report, split, thresholds
from xray_edge.train.manifest import SPLITS, write_manifest

SELECTION_RULE = "lowest validation NLL (mean negative log-likelihood at T=1, best early-stopping epoch)"
THRESHOLD_RULE = ("on validation, calibrated probabilities, one-vs-rest (flag class c when p_c >= t_c): "
                  "COVID = largest threshold with sensitivity >= {s:.2f}; other classes = Youden's J")
LOSO_NOTE = (
    "Leave-one-source-out is not meaningful on this set: each source carries different classes "
    "(rtchanon = COVID + adult NORMAL; waliatushar = pediatric NORMAL + VIRAL_PNEUMONIA), so holding out "
    "a source removes whole classes from training. The meaningful cheap variant is 'normal_cross_origin': "
    "a head trained without one origin's NORMAL images, tested on that origin's test NORMALs. If those are "
    "no longer called NORMAL, the model separates classes by origin (age, processing), not by disease."
)


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in metrics.json)."""

    data_dir: Path
    out: Path = Path("artifacts/train")
    weights: str | None = None
    classes: list[str] | None = None
    size: int = 224
    seed: int = 0
    cache_dir: Path = features.DEFAULT_CACHE
    aug_views: int = 1
    heads: tuple[str, ...] = ("flatten", "gap")
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
    n_boot: int = 1000


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a stage into ``timings`` (seconds) and log its start."""
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 1)


def _seed_everything(seed: int) -> None:
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


def _split_counts(labels: np.ndarray, split_of: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    return {s: {c: int(((split_of == s) & (labels == i)).sum()) for i, c in enumerate(classes)} for s in SPLITS}


def _ece(logits: np.ndarray, y: np.ndarray, t: float) -> dict[str, float]:
    return {"before": expected_calibration_error(softmax(logits), y),
            "after": expected_calibration_error(softmax(logits, t), y)}


def _normal_cross_origin(cfg: TrainConfig, kind: str, x: dict[str, np.ndarray], y: dict[str, np.ndarray],
                         org: dict[str, np.ndarray], classes: list[str], main_pred: np.ndarray) -> dict[str, Any]:
    """For each NORMAL origin: a head trained without it; how are its test NORMALs classified?"""
    c = classes.index("NORMAL")
    out = {}
    for o in sorted(set(org["test"][y["test"] == c])):
        keep = {s: ~((y[s] == c) & (org[s] == o)) for s in ("train", "val")}
        head, hist = heads.train_head(kind, x["train"][keep["train"]], y["train"][keep["train"]],
                                      x["val"][keep["val"]], y["val"][keep["val"]], len(classes), seed=cfg.seed,
                                      epochs=cfg.epochs, batch_size=cfg.batch_size,
                                      lr=cfg.lr or heads.LEARNING_RATES[kind], patience=cfg.patience)
        sel = (y["test"] == c) & (org["test"] == o)
        pred = heads.predict_logits(head, x["test"][sel]).argmax(axis=1)
        k, n = int((pred == c).sum()), int(sel.sum())
        out[o] = {"head": kind, "n_test_normals": n, "epochs_run": len(hist["loss"]),
                  "accuracy_when_origin_unseen": {"value": k / n, "ci95_wilson": report.wilson(k, n)},
                  "accuracy_main_model": float((main_pred[sel] == c).mean()),
                  "predicted_as": {classes[j]: int((pred == j).sum()) for j in range(len(classes))}}
    return out


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and write every output into ``cfg.out``; returns the metrics dict."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    classes = data.dataset_classes(cfg.data_dir, cfg.classes)  # refuse a bad folder before importing TF
    import keras

    from xray_edge.train.model import assemble, build_base, logits_model, resolve_weights, to_onnx

    timings: dict[str, float] = {"import_tensorflow": round(time.perf_counter() - t_start, 1)}
    weights = resolve_weights(cfg.weights)
    _seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    spec = Preprocessing(size=cfg.size)

    with _stage(timings, "scan_hash_decode"):
        images, bits, thumbs = data.scan(cfg.data_dir, classes)
    with _stage(timings, "group_and_split"):
        groups, group_stats = split.group_images([im.path for im in images], [im.pixel_sha256 for im in images],
                                                 bits, thumbs, cfg.phash_hamming, cfg.ncc_threshold)
        labels = np.array([classes.index(im.label) for im in images])
        try:
            split_of = split.stratified_group_split(labels, groups, cfg.test_fraction, cfg.val_fraction, cfg.seed)
        except ValueError as e:
            raise data.DatasetError(f"{cfg.data_dir}: {e}") from None
        manifest = cfg.out / "split.csv"
        write_manifest(manifest, ({"path": im.path, "label": im.label, "source": im.source, "sha256": im.sha256,
                                   "group": f"g{g:05d}", "split": s} for im, g, s in zip(images, groups, split_of)))
        manifest_sha = sha256_file(manifest)

    with _stage(timings, "onnx_export_and_check"):
        base = build_base(weights, cfg.size)
        digest = features.weights_digest(base)
        run_base = features.onnx_runner(to_onnx(base).SerializeToString())
        probe_idx = np.flatnonzero(split_of == "val")[:4]
        x_probe = np.stack([features.view_input(images[i], 0, spec, cfg.seed) for i in probe_idx])
        onnx_check = features.compare(np.asarray(base.predict(x_probe, verbose=0)), run_base(x_probe), 1e-4)
        onnx_check["images"] = len(probe_idx)
        if not onnx_check["passed"]:
            raise RuntimeError(f"ONNX export of the base disagrees with Keras: {onnx_check}")

    idx = {s: np.flatnonzero(split_of == s) for s in SPLITS}
    views = [(images[i], 0) for i in range(len(images))]
    views += [(images[i], v) for v in range(1, cfg.aug_views + 1) for i in idx["train"]]
    with _stage(timings, "features"):
        feats, feature_stats = features.extract(run_base, views, spec, digest, cfg.seed, cfg.cache_dir)
    train_rows = np.concatenate([idx["train"], np.arange(len(images), len(views))])
    train_src = np.concatenate([idx["train"]] + [idx["train"]] * cfg.aug_views)
    x = {"train": feats[train_rows], "val": feats[idx["val"]], "test": feats[idx["test"]]}
    y = {"train": labels[train_src], "val": labels[idx["val"]], "test": labels[idx["test"]]}

    trained, histories, head_scores = {}, {}, {}
    for kind in cfg.heads:
        with _stage(timings, f"head_{kind}"):
            trained[kind], histories[kind] = heads.train_head(
                kind, x["train"], y["train"], x["val"], y["val"], len(classes), seed=cfg.seed, epochs=cfg.epochs,
                batch_size=cfg.batch_size, lr=cfg.lr or heads.LEARNING_RATES[kind], patience=cfg.patience)
            val_logits = heads.predict_logits(trained[kind], x["val"])
            head_scores[kind] = heads.validation_scores(val_logits, y["val"], len(classes)) | {
                "epochs_run": len(histories[kind]["loss"]),
                "best_epoch": int(np.argmin(histories[kind]["val_loss"])) + 1,
                "parameters": int(trained[kind].count_params()), "lr": cfg.lr or heads.LEARNING_RATES[kind]}
        report.write_history(cfg.out / f"history_{kind}.csv", histories[kind])
    chosen = heads.pick_head(head_scores)
    head = trained[chosen]

    if cfg.fine_tune_epochs:
        from xray_edge.train.finetune import fine_tune

        with _stage(timings, "fine_tune_block5"):
            img = {s: np.stack([features.view_input(*views[r], spec, cfg.seed) for r in rows])
                   for s, rows in (("train", train_rows), ("val", idx["val"]), ("test", idx["test"]))}
            histories["finetune"] = fine_tune(base, head, img["train"], y["train"], img["val"], y["val"],
                                              len(classes), epochs=cfg.fine_tune_epochs, batch_size=cfg.batch_size,
                                              lr=cfg.fine_tune_lr, seed=cfg.seed)
            report.write_history(cfg.out / "history_finetune.csv", histories["finetune"])
            full = keras.Model(base.input, head(base.output))
            run_full = features.onnx_runner(to_onnx(full).SerializeToString())
            logits = {s: np.concatenate([run_full(img[s][i:i + 16]) for i in range(0, len(img[s]), 16)]).astype(np.float64)
                      for s in ("val", "test")}
    else:
        logits = {s: heads.predict_logits(head, x[s]) for s in ("val", "test")}

    with _stage(timings, "calibration_thresholds_reports"):
        temperature = fit_temperature(logits["val"], y["val"])
        probs = {s: softmax(logits[s], temperature) for s in ("val", "test")}
        chosen_thresholds = thresholds.choose_thresholds(probs["val"], y["val"], classes, cfg.covid_sensitivity)
        reports = {s: classification_report(y[s], probs[s], classes, n_boot=cfg.n_boot, seed=cfg.seed)
                   for s in ("val", "test")}
        operating = thresholds.operating_points(probs["test"], y["test"], classes, chosen_thresholds,
                                                n_boot=cfg.n_boot, seed=cfg.seed)
        report.plot_curves(histories, cfg.out / "curves.png")
        report.plot_confusion(reports["test"]["confusion_matrix"], classes, cfg.out / "confusion_test.png",
                              f"test split (n={len(y['test'])}), head={chosen}")

    with _stage(timings, "save_and_check_model"):
        model = assemble(base, head)
        model_path = cfg.out / "model.keras"
        model.save(model_path)
        reloaded = logits_model(keras.saving.load_model(model_path, compile=False))
        x_check = np.stack([features.view_input(images[i], 0, spec, cfg.seed) for i in idx["test"][:4]])
        model_check = features.compare(logits["test"][:4], np.asarray(reloaded.predict(x_check, verbose=0)), 1e-2)
        model_check["note"] = "reloaded model.keras logits vs the evaluated path (ONNX base, float16 feature cache)"

    probe: dict[str, Any] = {}
    origins = np.array([report.origin(im.source) for im in images])
    if "NORMAL" in classes and len(set(origins[labels == classes.index("NORMAL")])) > 1:
        with _stage(timings, "shortcut_probe"):
            org = {"train": origins[train_src], "val": origins[idx["val"]], "test": origins[idx["test"]]}
            pred = probs["test"].argmax(axis=1)
            probe = {"normal_test_accuracy_by_origin": report.class_by_origin(pred, y["test"], org["test"], classes, "NORMAL"),
                     "normal_cross_origin": _normal_cross_origin(cfg, chosen, x, y, org, classes, pred),
                     "note": "normal_cross_origin uses the frozen-base feature cache" if cfg.fine_tune_epochs else ""}

    timings["total"] = round(time.perf_counter() - t_start, 1)
    metrics = {
        "seed": cfg.seed,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "data": {"root": str(cfg.data_dir.resolve()), "classes": classes, "images": len(images),
                 "split_counts": _split_counts(labels, split_of, classes), "grouping": group_stats,
                 "manifest": "split.csv", "manifest_sha256": manifest_sha},
        "onnx_feature_check": onnx_check,
        "features": feature_stats | {"aug_views": cfg.aug_views, "cache_dir": str(cfg.cache_dir)},
        "heads": head_scores,
        "selected_head": chosen,
        "selection_rule": SELECTION_RULE,
        "fine_tune_epochs_run": len(histories["finetune"]["loss"]) if "finetune" in histories else 0,
        "temperature": temperature,
        "ece": {s: _ece(logits[s], y[s], temperature) for s in ("val", "test")},
        "thresholds": chosen_thresholds,
        "threshold_rule": THRESHOLD_RULE.format(s=cfg.covid_sensitivity),
        "test_operating_points": operating,
        "test": reports["test"],
        "val": reports["val"],
        "shortcut_probe": probe,
        "leave_one_source_out": LOSO_NOTE,
        "shipped_model_check": model_check,
        "timings_seconds": timings,
    }
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    record = ModelRecord(
        classes=classes, preprocessing=spec, model_version=__version__, input_shape=["N", cfg.size, cfg.size, 1],
        temperature=temperature, thresholds=chosen_thresholds, source_model_sha256=sha256_file(model_path),
        data_manifest_sha256=manifest_sha, metrics=_record_metrics(metrics))
    record.validate(str(cfg.out / "record.json"))
    (cfg.out / "record.json").write_text(json.dumps(json.loads(record.to_json()), indent=2))
    return metrics


def _record_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The short summary stored in the model record (full figures stay in metrics.json)."""
    t = m["test"]
    return {"split": "test", "n": t["n"], "head": m["selected_head"], "accuracy": t["accuracy"],
            "macro_f1": t["macro_f1"], "macro_auroc": t["macro_auroc"],
            "sensitivity": {c: v["sensitivity"] for c, v in t["per_class"].items()},
            "specificity": {c: v["specificity"] for c, v in t["per_class"].items()},
            "ece_before_temperature": m["ece"]["test"]["before"], "ece_after_temperature": m["ece"]["test"]["after"]}
