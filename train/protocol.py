"""The protocol a recipe is judged by: for each seed, leave-one-origin-out folds scored as a clinic
would meet them, a within-origin figure, and the worst held-out origin.

Per seed and held-out origin: the recipe is fitted without any image of that origin; its rules
(temperature, thresholds, "uncertain" band, input gate: ``rules.fit_rules``) are fitted on the
validation images of the other origins; every image of the held-out origin is then scored (known
label conflicts excepted): macro-F1 over the classes it has (most likely class), per-class
sensitivity and specificity with Wilson intervals, COVID-vs-NORMAL AUROC inside it where it has
both, and what the runtime's decisions do there (share rejected, uncertain, sent back, accuracy of
the decided images). ``within_origin``: the model fitted on every origin, COVID vs NORMAL inside
the test split of each origin that has both (``siim``: same hospitals, so the film style does not
give the class away).

Selection (``summary``): the worst held-out origin's macro-F1, mean and spread over seeds; origins
whose lung masks trained the lung model are reported but left out of the criterion for lung-crop
recipes (their crop is optimistic).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.metrics import softmax
from xray_edge.train import crossorigin, folds, rules
from xray_edge.train.model import dense_weights

LUNG_MODEL_ORIGINS = ("openist",)  # origins whose masks trained the shipped lung model (train.lungs)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC; None without both classes."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores)) if positive.any() and not positive.all() else None


def covid_vs_normal(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any] | None:
    """COVID-vs-NORMAL figures on the COVID and NORMAL images: AUROC of p(COVID), and
    sensitivity/specificity of the most likely class."""
    if "COVID" not in classes or "NORMAL" not in classes:
        return None
    c, n = classes.index("COVID"), classes.index("NORMAL")
    both = (y == c) | (y == n)
    if not (y == c).any() or not (y == n).any():
        return None
    pred = probs[both].argmax(axis=1)
    return {"n_covid": int((y == c).sum()), "n_normal": int((y == n).sum()),
            "auroc": auroc(probs[both, c], y[both] == c),
            "covid_sensitivity": float(np.mean(pred[y[both] == c] == c)),
            "normal_specificity": float(np.mean(pred[y[both] == n] == n))}


def fold(cfg: Any, ds: Any, fitted: folds.Fitted, train: np.ndarray, val: np.ndarray, test: np.ndarray,
         save: Path | None = None) -> dict[str, Any]:
    """Score ``fitted`` (trained on ``train``, early-stopped on ``val``) on the ``test`` images, with
    rules fitted on ``val``; ``save``: also write what the site simulation needs (``train.sitesim``)."""
    tr, va, te = np.flatnonzero(train & ~ds.conflict), np.flatnonzero(val & ~ds.conflict), np.flatnonzero(test)
    y_tr, y_va, y_te = ds.labels[tr], ds.labels[va], ds.labels[te]
    pooled_tr = fitted.pooled(tr)
    fitted_rules = rules.fit_rules(fitted.logits(va), y_va, pooled_tr, y_tr, fitted.pooled(va), ds.classes,
                                   cfg.covid_sensitivity, cfg.abstain_accuracy, cfg.max_abstain, cfg.gate_quantile)
    logits, pooled = fitted.logits(te), fitted.pooled(te)
    probs = softmax(logits, fitted_rules.temperature)
    report = crossorigin.fold_report(y_te, probs, ds.classes)
    report["covid_vs_normal"] = covid_vs_normal(y_te, probs, ds.classes)
    report["referral"] = rules.referral(rules.decisions(fitted_rules, ds.classes, logits, pooled), y_te, ds.classes)
    if save is not None:
        normal = y_tr == ds.classes.index("NORMAL")
        normal_mean, normal_std = rules.normal_reference(pooled_tr[normal], ds.origins[tr][normal])
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(save, pooled=pooled.astype(np.float32), y=y_te, logits=logits,
                            val_logits=fitted.logits(va), val_y=y_va,
                            normal_mean=normal_mean, normal_std=normal_std,
                            temperature=fitted_rules.temperature, abstain_margin=fitted_rules.abstain_margin,
                            thresholds=np.array([fitted_rules.thresholds.get(c, np.nan) for c in ds.classes]),
                            gate_threshold=fitted_rules.gate.threshold, gate_quantile=fitted_rules.gate.quantile,
                            gate_means=fitted_rules.means,
                            gate_whiten=fitted_rules.whiten, **{f"dense{i}": w for i, w in
                                                                enumerate(dense_weights(fitted.head))})
    return report


def evaluate_seed(cfg: Any, ds: Any, views: folds.Views, recipe: Any, seed: int, base: Any = None,
                  save: Path | None = None) -> dict[str, Any]:
    """The protocol for one seed; ``_final`` holds the model fitted on every origin."""
    fit = folds.fitter(cfg, ds, views, recipe, seed, base)
    train, val, scored = ds.splits == "train", ds.splits == "val", ~ds.conflict
    looo = {}
    for o in crossorigin.holdable_origins(ds.labels, ds.origins, len(ds.classes)):
        keep = ds.origins != o
        fitted = fit(keep & train, keep & val)
        looo[o] = fold(cfg, ds, fitted, keep & train, keep & val, (ds.origins == o) & scored,
                       save / f"seed{seed}-{o}.npz" if save else None)
        print(f"  seed {seed}, held out {o}: macro-F1 {looo[o]['macro_f1_present']:.3f}, sent back "
              f"{looo[o]['referral']['sent_back']:.1%}", flush=True)
    final = fit(train, val)
    test = np.flatnonzero((ds.splits == "test") & scored)
    probs = softmax(final.logits(test))
    within = {o: covid_vs_normal(ds.labels[test][ds.origins[test] == o], probs[ds.origins[test] == o], ds.classes)
              for o in sorted(set(ds.origins))}
    return {"seed": seed, "looo": looo, "criterion_origins": criterion(recipe, list(looo)),
            "test": crossorigin.fold_report(ds.labels[test], probs, ds.classes),
            "within_origin": {o: v for o, v in within.items() if v is not None}, "_final": final}


def criterion(recipe: Any, origins: Sequence[str]) -> list[str]:
    """The held-out origins the selection looks at."""
    return [o for o in origins if not (recipe.lung_crop and o in LUNG_MODEL_ORIGINS)]


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "values": [None if x is None else float(x) for x in values]}


def summary(seeds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds, per held-out origin and of the worst criterion origin."""
    origins = list(seeds[0]["looo"])
    crit = seeds[0]["criterion_origins"]

    def per(o: str, get) -> dict[str, Any]:
        return _stats([get(s["looo"][o]) for s in seeds])

    out: dict[str, Any] = {"seeds": [s["seed"] for s in seeds], "criterion_origins": crit, "origins": {}}
    for o in origins:
        out["origins"][o] = {
            "macro_f1": per(o, lambda f: f["macro_f1_present"]),
            "sensitivity": {c: per(o, lambda f, c=c: (f["per_class"][c]["sensitivity"] or {}).get("value"))
                            for c in seeds[0]["looo"][o]["classes_present"]},
            "auroc_covid_vs_normal": per(o, lambda f: (f["covid_vs_normal"] or {}).get("auroc")),
            "sent_back": per(o, lambda f: f["referral"]["sent_back"]),
            "decided_accuracy": per(o, lambda f: f["referral"]["decided_accuracy"]),
        }
    out["worst_origin_macro_f1"] = _stats([min(s["looo"][o]["macro_f1_present"] for o in crit) if crit else None
                                           for s in seeds])
    out["worst_origin"] = [min(crit, key=lambda o: s["looo"][o]["macro_f1_present"]) if crit else None for s in seeds]
    out["test_macro_f1"] = _stats([s["test"]["macro_f1_present"] for s in seeds])
    out["within_origin_auroc"] = {o: _stats([s["within_origin"].get(o, {}).get("auroc") for s in seeds])
                                  for o in seeds[0]["within_origin"]}
    return out
