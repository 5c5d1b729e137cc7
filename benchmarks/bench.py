"""Run the benchmark: every format of the table on the same preprocessed images, each in its own
child process (``worker``), then metrics, agreement with FP32 and the end-to-end measurement."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from xray_edge.benchmarks import evalset, formats
from xray_edge.benchmarks.config import Settings, shown
from xray_edge.benchmarks.formats import BATCH, Format
from xray_edge.benchmarks.machine import describe, load_average
from xray_edge.benchmarks.worker import PROGRESS
from xray_edge.contract import ModelContractError, ModelRecord
from xray_edge.export.data import sha256_file

SCHEMA = "xray-edge/benchmark"
SCHEMA_VERSION = 2
BUILD_SIDECAR = ".build.json"  # next to a file this benchmark built: what it was built from


class BenchmarkError(ValueError):
    """The benchmark cannot run (one-line message)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reference_record(s: Settings) -> tuple[ModelRecord, str]:
    """The record every format is measured against (classes, preprocessing, temperature): that
    of the first configured ONNX file that loads, else ``record.json`` beside the Keras model."""
    from xray_edge.session import load_model

    for name in ("onnx_fp32", "onnx_int8", "onnx_fp16"):
        path = s.models.get(name)
        if name in s.formats and path is not None and path.is_file():
            try:
                return load_model(path, 1).record, shown(path)
            except ModelContractError as e:
                log(f"warning: {e}")
    keras = s.models.get("keras_fp32")
    if keras is not None and (keras.parent / "record.json").is_file():
        path = keras.parent / "record.json"
        return ModelRecord.from_json(path.read_text(), str(path)), shown(path)
    raise BenchmarkError("no model record found: give an ONNX model (--model onnx_fp32=PATH) or a Keras model "
                         "with the training run's record.json beside it (--model keras_fp32=PATH)")


def child(job: dict[str, Any], work: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run ``job`` in ``python -m xray_edge.benchmarks.worker``; its result, or ``{"error": ...}``.
    The worker's progress lines (a build's every line but TensorFlow's log) are passed on to
    stderr; everything it prints goes to its log. The worker is killed on timeout or when this
    process is interrupted."""
    folder = work / f"{job['mode']}-{job.get('format', 'e2e')}"
    folder.mkdir(parents=True, exist_ok=True)
    job = job | {"out": str(folder)}
    (folder / "job.json").write_text(json.dumps(job))
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    logfile = folder / "log.txt"
    proc = subprocess.Popen([sys.executable, "-m", "xray_edge.benchmarks.worker", str(folder / "job.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace")
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    try:
        with logfile.open("w") as f:
            for line in proc.stdout:
                f.write(line)
                if line.startswith(PROGRESS):
                    log(f"  {line[len(PROGRESS):].rstrip()}")
                elif job["mode"] == "build" and line.strip() and not line.startswith(("I0000", "W0000", "E0000")):
                    log(f"  {line.rstrip()}")
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = folder / "result.json"
    if timed_out.is_set():
        return {"error": f"timed out after {timeout:.0f} s"}
    if result.is_file():
        return json.loads(result.read_text())
    lines = [line for line in logfile.read_text(errors="replace").splitlines() if line.strip()]
    return {"error": f"worker exited with code {proc.returncode}" + (f" ({lines[-1][:200]})" if lines else "")}


def build_key(keras: Path, s: Settings, calibration: Path | None) -> dict[str, Any]:
    """What a built file depends on; a file whose ``.build.json`` holds another key is rebuilt."""
    return {"source_sha256": sha256_file(keras), "calibration_images": s.calibration_images, "seed": s.seed,
            "calibration_manifest_sha256": sha256_file(calibration) if calibration else None}


def _needs_build(path: Path, key: dict[str, Any]) -> bool:
    """Missing, or built by this benchmark with another key (files from elsewhere are kept)."""
    sidecar = path.with_name(path.name + BUILD_SIDECAR)
    return not path.is_file() or (sidecar.is_file() and json.loads(sidecar.read_text()).get("key") != key)


def ensure_file(fmt: Format, path: Path, s: Settings, record: ModelRecord, work: Path,
                paths: dict[str, Path]) -> tuple[str | None, str | None]:
    """Build ``path`` from the Keras model if it is missing (or this benchmark built it from another
    model or calibration) and building is on, recording how in a ``.build.json`` beside it.
    Returns (a status if the format cannot be measured, its detail)."""
    keras = s.models.get("keras_fp32")
    if not (s.build and fmt.build is not None and keras is not None and keras.is_file()):
        if path.is_file():
            return None, None
        how = "" if fmt.build is None else "; building it needs the Keras model (keras_fp32) and build on"
        return "missing", f"{shown(path)} not found{how}"
    calibration = s.calibration or (s.data if s.data is not None and s.data.is_file() else None)
    key = build_key(keras, s, calibration)
    if not _needs_build(path, key):
        return None, None
    lacking = formats.missing_modules(fmt.builder)
    if lacking:
        if path.is_file():
            return None, None
        return "missing", f"{shown(path)} not found; building it needs {', '.join(lacking)} (the train extra)"
    onnx_todo = [f.name.removeprefix("onnx_") for f in map(formats.get, s.formats)
                 if f.name.startswith("onnx_") and _needs_build(paths[f.name], key)]
    options = {"record": record.to_json(), "split": str(calibration) if calibration else None,
               "data_root": str(s.data_root) if s.data_root else None, "calibration_images": s.calibration_images,
               "seed": s.seed, "onnx_variants": onnx_todo}
    log(f"[{fmt.name}] building {path} from {keras}: {build_plan(fmt, onnx_todo, calibration, s)}")
    start = time.perf_counter()
    info = child({"mode": "build", "format": fmt.name, "keras": str(keras), "target": str(path), "options": options},
                 work, s.threads, s.timeout)
    if "error" in info:
        return f"error: build failed: {info['error']}", None
    files = [Path(f) for f in info.pop("files", [path])]  # the export writes every ONNX variant still to do
    info = {"source": shown(keras), "key": key, "seconds": round(time.perf_counter() - start, 1), **info,
            "files": [shown(f) for f in files]}
    for built in files:
        built.with_name(built.name + BUILD_SIDECAR).write_text(json.dumps(info, indent=2))
    return None, None


def build_plan(fmt: Format, onnx_todo: list[str], calibration: Path | None, s: Settings) -> str:
    """What a build will do and roughly how long it takes (said before it starts)."""
    if fmt.name.startswith("onnx_"):
        n = 0
        if calibration is not None:
            from xray_edge.train.manifest import read_manifest

            n = sum(r["split"] in ("val", "test") for r in read_manifest(calibration))
        return (f"xray-edge export of {', '.join(onnx_todo)}: tf2onnx conversion (~1 min), INT8 calibration on "
                f"{s.calibration_images} training images, and each variant's gate on the split's {n} validation and "
                f"test images (roughly {max(1, round(n * 0.15 * (len(onnx_todo) + 1) / 60))} min on 2 cores)")
    return ("TensorFlow Lite conversion (~1 min)"
            + (f" and INT8 calibration on {s.calibration_images} training images" if "int8" in fmt.name else ""))


def measure_format(fmt: Format, path: Path, s: Settings, record: ModelRecord, images: Path, work: Path,
                   paths: dict[str, Path]) -> tuple[dict[str, Any], np.ndarray | None]:
    """One row of the results (without metrics) and the format's probabilities (None unless ok)."""
    row: dict[str, Any] = {"format": fmt.name, "title": fmt.title, "engine": ", ".join(fmt.engine),
                           "path": shown(path), "status": "ok"}
    lacking = formats.missing_modules(fmt.engine)
    if lacking:
        return row | {"status": "not installed", "detail": f"needs {', '.join(lacking)}"}, None
    status, detail = ensure_file(fmt, path, s, record, work, paths)
    if status:
        return row | {"status": status, "detail": detail}, None
    sidecar = path.with_name(path.name + BUILD_SIDECAR)
    if sidecar.is_file():
        row["build"] = json.loads(sidecar.read_text())
    row |= {"size_mb": path.stat().st_size / 2**20, "sha256": sha256_file(path)}
    log(f"[{fmt.name}] measuring {path}")
    job = {"mode": "measure", "format": fmt.name, "path": str(path), "threads": s.threads, "images": str(images),
           "record": record.to_json(), "warmup": s.warmup, "runs": s.runs, "seconds": s.seconds}
    result = child(job, work, s.threads, s.timeout)
    if "error" in result:
        return row | {"status": f"error: {result['error']}"}, None
    b1, batch = np.array(result["b1_ms"]), np.array(result["batch_ms"])
    row |= {
        "load_s": result["load_s"],
        "import_s": result["import_s"],
        "b1_median_ms": float(np.median(b1)),
        "b1_p90_ms": float(np.percentile(b1, 90)),
        "b1_runs": len(b1),
        "b8_ms_per_image": float(np.median(batch)) / BATCH if len(batch) else None,
        "b8_runs": len(batch),
        "images_per_s": BATCH * 1000 / float(np.median(batch)) if len(batch) else None,
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_delta_mb": result["rss_delta_mb"],
        "record_source_sha256": result["record_source_sha256"],
        "_decisions": result["decisions"],
    }
    return row, np.load(Path(work) / f"measure-{fmt.name}" / "probs.npy")


def add_metrics(rows: list[dict[str, Any]], probs: dict[str, np.ndarray], y: np.ndarray,
                classes: list[str], n_boot: int, seed: int) -> None:
    """Accuracy, macro-F1, COVID sensitivity/PPV, macro AUROC (with bootstrap CIs) and argmax
    agreement with the FP32 reference (the first of FP32_REFERENCES that ran) for every ok row."""
    from xray_edge.metrics import classification_report

    reference = next((name for name in formats.FP32_REFERENCES if name in probs), None)
    for row in rows:
        p = probs.get(row["format"])
        if p is None:
            continue
        r = classification_report(y, p, classes, n_boot=n_boot, seed=seed)
        covid = r["per_class"].get("COVID", {})
        picked = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "macro_auroc": r["macro_auroc"],
                  "covid_sensitivity": covid.get("sensitivity"), "covid_ppv": covid.get("ppv")}
        row |= {k: v["value"] if v else None for k, v in picked.items()}
        row["ci95"] = {k: v["ci95"] for k, v in picked.items() if v}
        row["confusion_matrix"] = r["confusion_matrix"]
        if reference is not None:
            ref = probs[reference]
            row["agreement_fp32"] = float(np.mean(p.argmax(1) == ref.argmax(1)))
            row["max_prob_diff_fp32"] = float(np.abs(p - ref).max())
            row["fp32_reference"] = reference
        decisions = row.pop("_decisions", None)
        if decisions:
            row |= decision_stats(decisions, y, classes)


def decision_stats(decisions: list[dict[str, Any]], y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """What the record's rules (``decision.decide``, as in classify) make of the labelled images:
    share rejected by the input gate, share "uncertain", accuracy of the rest, and COVID
    sensitivity / PPV at its threshold among the decided images and with uncertain ones referred."""
    kind = np.array([d["decision"] for d in decisions])
    label = np.array([d["label"] for d in decisions])
    truth = np.array(classes)[y]
    decided = (kind == "positive") | (kind == "negative")
    out = {"rejected_rate": float(np.mean(kind == "rejected")), "uncertain_rate": float(np.mean(kind == "uncertain")),
           "decided_accuracy": float(np.mean(label[decided] == truth[decided])) if decided.any() else None}
    if "COVID" in classes:
        flagged = np.array(["COVID" in d["flagged"] for d in decisions])
        covid = truth == "COVID"
        hit = flagged & decided
        out["covid_sensitivity_decided"] = float(hit[covid & decided].mean()) if (covid & decided).any() else None
        out["covid_ppv_decided"] = float(covid[hit].mean()) if hit.any() else None
        out["covid_flagged_or_referred"] = float((hit | (kind == "uncertain"))[covid].mean()) if covid.any() else None
    return out


def add_throughput(rows: list[dict[str, Any]], paths: dict[str, Path], machine: dict[str, Any],
                   notes: list[str]) -> None:
    """Achieved GMAC/s of every measured row (the model's MACs, counted on an ONNX file of it, over
    the batch-1 and batch-8 times) and, for int8 engines, its share of onnxruntime's int8 GEMM rate
    and of the hardware's int8 bound (``peak``)."""
    from xray_edge.benchmarks.macs import count_macs

    source = next((paths[name] for name in ("onnx_fp32", "onnx_int8", "onnx_fp16")
                   if name in paths and paths[name].is_file()), None)
    if source is None or formats.missing_modules(("onnx",)):
        notes.append("no MAC count (needs an ONNX file of the model and the onnx package): no GMAC/s columns")
        return
    import onnx

    gmac = sum(count_macs(onnx.load(str(source)))[0].values()) / 1e9
    peak_gmac = (machine.get("int8_peak") or {}).get("gmac_per_s")
    bound_gmac = (machine.get("hw_int8_bound") or {}).get("gmac_per_s")
    for row in rows:
        if row["status"] != "ok":
            continue
        row["gmac_per_image"] = gmac
        row["b1_gmac_per_s"] = gmac / (row["b1_median_ms"] / 1000)
        if row.get("b8_ms_per_image"):
            row["b8_gmac_per_s"] = gmac / (row["b8_ms_per_image"] / 1000)
        rate = row.get("b8_gmac_per_s", row["b1_gmac_per_s"])
        if peak_gmac and row["format"].endswith("int8"):
            row["share_of_ort_int8_gemm"] = rate / peak_gmac
        if bound_gmac and row["format"].endswith("int8"):
            row["share_of_hw_int8_bound"] = rate / bound_gmac


def provenance_notes(rows: list[dict[str, Any]], keras: Path | None) -> list[str]:
    """A note for every ONNX file whose record names another source model than ``keras``."""
    if keras is None or not keras.is_file():
        return []
    digest = sha256_file(keras)
    return [f"{r['format']} ({r['path']}) was exported from another Keras model (record source_model_sha256 "
            f"{r['record_source_sha256'][:12]}...) than keras_fp32 ({digest[:12]}...): compare its rows with care"
            for r in rows if r.get("record_source_sha256") and r["record_source_sha256"] != digest]


def end_to_end(s: Settings, rows: list[dict[str, Any]], path: Path | None, images: evalset.Images,
               work: Path) -> dict[str, Any]:
    """The classify pipeline against inference alone with ``s.e2e_format``, on real images and on
    generated full-size files of every kind in ``config.FULLSIZE``."""
    from xray_edge.benchmarks.config import FULLSIZE
    from xray_edge.benchmarks.e2e import FULLSIZE_TITLES, make_fullsize

    row = next((r for r in rows if r["format"] == s.e2e_format), None)
    if row is None or row["status"] != "ok":
        return {"skipped": f"{s.e2e_format} was not measured ({row['status'] if row else 'not selected'})"}
    real = images.paths[: s.e2e_images]
    sets = {"real": real}
    described = {"real": f"{len(real)} of the benchmark's real images, as stored"}
    for kind, px in FULLSIZE.items() if s.fullsize else ():
        px = s.fullsize_px or px
        log(f"[e2e] generating {s.fullsize} {px}x{px} {FULLSIZE_TITLES[kind]} files")
        try:
            sets[kind] = make_fullsize(kind, real[: s.fullsize], work / kind, px, s.seed)
        except Exception as e:  # e.g. no JPEG 2000 encoder installed: that set is left out, with a note
            log(f"[e2e] {kind} left out: cannot write it ({type(e).__name__}: {str(e)[:150]})")
            continue
        described[kind] = (f"{s.fullsize} generated {px}x{px} {FULLSIZE_TITLES[kind]} files: real images upscaled "
                           "(bicubic) + Gaussian noise sd 0.5 %")
    ood = None
    if s.gate_sets:
        from xray_edge.benchmarks.oodsets import write_sets

        ood = write_sets(work / "ood")
    log(f"[e2e] classify pipeline vs inference alone with {s.e2e_format}" + (", heatmap cost, input gate" if ood else ""))
    job = {"mode": "e2e", "path": str(path), "threads": s.threads, "sets": sets, "ood": ood, "cold_start": s.cold_start,
           "rounds": s.e2e_rounds}
    result = child(job, work, s.threads, s.timeout)
    if "error" in result:
        return {"format": s.e2e_format, "error": result["error"]}
    return {"format": s.e2e_format, "threads": s.threads, "rounds": s.e2e_rounds,
            "sets": {name: {"description": described[name], **result["sets"][name]} for name in sets},
            "heatmaps": result["heatmaps"], "gate": result["gate"], "cold_start": result.get("cold_start")}


def run(s: Settings, command: str = "") -> dict[str, Any]:
    """The whole benchmark; returns the results document (see ``report`` for the files)."""
    if s.data is None:
        raise BenchmarkError("no images: give --data (a class-folder root or a split.csv) or a --config")
    if formats.missing_modules(("sklearn",)):
        raise BenchmarkError('the metrics need scikit-learn: pip install "xray-edge[bench]"')
    machine = describe(s.threads)
    notes = []
    if machine["load_average_start"] and machine["load_average_start"][0] > 0.5 * (machine["cores_usable"] or 1):
        notes.append(f"the machine was busy at the start (load average {machine['load_average_start'][0]}): "
                     "timings may not be representative")
        log(f"warning: {notes[-1]}")
    record, record_source = reference_record(s)
    selected = [formats.get(name) for name in s.formats]
    paths = {f.name: s.models.get(f.name) or s.build_dir / f"{record.model_name}{f.suffix}" for f in selected}
    log(f"decoding and preprocessing the images once ({s.data})")
    images, data = evalset.load(s.data, record.classes, record.preprocessing, s.limit, s.seed, s.split, s.data_root)
    with tempfile.TemporaryDirectory(prefix="xray-edge-bench-") as tmp:
        work = Path(tmp)
        np.save(work / "images.npy", images.x)
        rows, probs = [], {}
        for fmt in selected:
            row, p = measure_format(fmt, paths[fmt.name], s, record, work / "images.npy", work, paths)
            log(f"[{fmt.name}] {row['status']}")
            rows.append(row)
            if p is not None:
                probs[fmt.name] = p
        add_metrics(rows, probs, images.y, record.classes, s.n_boot, s.seed)
        if s.peak:
            log("[peak] int8 micro-benchmark")
            machine["int8_peak"] = child({"mode": "peak", "threads": s.threads}, work, s.threads, s.timeout)
        add_throughput(rows, paths, machine, notes)
        notes += provenance_notes(rows, s.models.get("keras_fp32"))
        if probs and not any(name in probs for name in formats.FP32_REFERENCES):
            notes.append("no FP32 reference (onnx_fp32 or keras_fp32) was measured: no agreement column")
        e2e = end_to_end(s, rows, paths.get(s.e2e_format), images, work) if s.e2e_format else None
    machine["load_average_end"] = load_average()
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": s.to_json(),
        "machine": machine,
        "reference_record": {"source": record_source, "model_name": record.model_name,
                             "model_version": record.model_version, "classes": record.classes,
                             "temperature": record.temperature,
                             "preprocessing": json.loads(record.to_json())["preprocessing"]},
        "data": data,
        "method": method(s),
        "rows": rows,
        "e2e": e2e,
        "notes": notes,
    }


def method(s: Settings) -> dict[str, str]:
    """How each figure was measured (copied into the results files)."""
    return {
        "isolation": "each format is loaded and run in its own fresh Python process (no shared engine state)",
        "accuracy": "every image once, in batches of 8; probabilities = softmax(logits / T): ONNX with its own "
                    "record's T, Keras and TFLite (logits sub-model) with the reference record's T; 95 % CIs from "
                    f"a seeded bootstrap ({s.n_boot} resamples)",
        "agreement": "share of images whose argmax equals that of the FP32 reference (ONNX FP32, else Keras)",
        "batch8": "the accuracy pass after one warm-up batch: median time of the full batches of 8, divided by 8; "
                  "images/s = 8000 / median batch ms",
        "batch1": f"{s.warmup} warm-up runs, then single images (cycling through the set) until at least {s.runs} "
                  f"runs and {s.seconds:g} s; median and 90th percentile",
        "load": "model load time (session / interpreter creation), after the engine import",
        "memory": "peak RSS of the process (ru_maxrss) minus its RSS just before loading the model: loading + "
                  "running, with the engine already imported and the images already in memory",
        "threads": f"{s.threads} intra-op threads for every engine (onnxruntime, TensorFlow, LiteRT)",
    }
