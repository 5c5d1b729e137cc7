"""The benchmark's outputs: the terminal table, results.json, results.csv, RESULTS.md and the
latency-accuracy plot results.png."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

# (key, header, format) of the table columns; the CSV has these keys and then CSV_EXTRA.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("format", "format", "s"),
    ("status", "status", "s"),
    ("size_mb", "size MB", ".1f"),
    ("accuracy", "accuracy", ".3f"),
    ("macro_f1", "macro-F1", ".3f"),
    ("covid_sensitivity", "COVID sens", ".3f"),
    ("covid_ppv", "COVID PPV", ".3f"),
    ("macro_auroc", "macro AUROC", ".4f"),
    ("agreement_fp32", "agree FP32", ".3f"),
    ("b1_median_ms", "b1 median ms", "ms"),
    ("b1_p90_ms", "b1 p90 ms", "ms"),
    ("b8_ms_per_image", "b8 ms/img", "ms"),
    ("images_per_s", "img/s", ".1f"),
    ("b8_gmac_per_s", "GMAC/s", ".0f"),
    ("share_of_ort_int8_gemm", "% of ORT int8 GEMM", "%"),
    ("share_of_hw_int8_bound", "% of HW int8 bound", "%"),
    ("load_s", "load s", ".2f"),
    ("rss_delta_mb", "peak RSS Δ MB", ".0f"),
    ("rejected_rate", "gate rejects", "%"),
    ("uncertain_rate", "uncertain", "%"),
    ("decided_accuracy", "decided acc", ".3f"),
)
CSV_EXTRA = ("title", "engine", "path", "sha256", "max_prob_diff_fp32", "b1_runs", "b8_runs", "peak_rss_mb",
             "import_s", "gmac_per_image", "b1_gmac_per_s", "covid_sensitivity_decided", "covid_ppv_decided",
             "covid_flagged_or_referred")
CSV_FIELDS = tuple(k for k, _, _ in COLUMNS) + CSV_EXTRA
FILES = {"json": "results.json", "csv": "results.csv", "markdown": "RESULTS.md", "plot": "results.png"}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "ms":  # one decimal from 10 ms up, 3 significant figures below (tiny models)
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    if fmt == "%":
        return f"{100 * value:.1f} %"
    return format(value, fmt) if fmt != "s" else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table for the terminal."""
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(results: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(results["rows"])


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Latency (batch 1 median) against accuracy, marker area proportional to file size. Returns
    a note instead if matplotlib is missing or nothing was measured."""
    rows = [r for r in results["rows"] if r["status"] == "ok" and r.get("accuracy") is not None]
    if not rows:
        return "no plot: no format was measured"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'xray-edge[bench]')"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    biggest = max(r["size_mb"] for r in rows) or 1.0
    for r in rows:
        ax.scatter(r["b1_median_ms"], r["accuracy"], s=40 + 900 * r["size_mb"] / biggest, alpha=0.6,
                   label=f"{r['title']} ({r['size_mb']:.3g} MB)")
    latencies = [r["b1_median_ms"] for r in rows]
    if max(latencies) > 5 * min(latencies):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    legend = ax.legend(fontsize=8, loc="best")
    for handle in legend.legend_handles:
        handle.set_sizes([40])
    m, d = results["machine"], results["data"]
    ax.set_xlabel(f"latency, batch 1, median ms ({m['threads']} threads, {m['cpu']})")
    ax.set_ylabel(f"accuracy (n={d['used']})")
    ax.set_title("xray-edge: latency vs accuracy (marker area ~ file size)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _e2e_markdown(e2e: dict[str, Any] | None) -> list[str]:
    if not e2e:
        return ["Not measured (e2e_format is empty)."]
    if "sets" not in e2e:
        return [f"Not measured: {e2e.get('skipped') or e2e.get('error')}"]
    lines = [f"`xray-edge classify`'s pipeline (decode + preprocess in a prefetching thread pool, batches of 8) "
             f"against inference alone on the already-preprocessed images, with {e2e['format']}, "
             f"{e2e['threads']} threads; medians of {e2e.get('rounds', 1)} interleaved round(s) of the two. "
             "Bound: the rate the cores allow, 1 / (decode s / cores + inference s); shares just above 100 % are "
             "timing noise (the decode time is a median measured alone, one file at a time).", "",
             "| set | file MiB | decode + preprocess ms/img (1 thread) | inference alone img/s | end to end img/s | "
             "bound img/s | share of bound | share of model rate | decode workers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in e2e["sets"].items():
        lines.append(f"| {name}: {s['description']} | {s['mean_file_mb']:.2f} | {s['decode_preprocess_ms_median']:.1f} "
                     f"| {s['inference_images_per_s']:.1f} | {s['end_to_end_images_per_s']:.1f} "
                     f"| {s['bound_images_per_s']:.1f} | {s['share_of_bound']:.0%} | {s['share_of_model_rate']:.0%} "
                     f"| {s['decode_workers']} |")
    maps = e2e.get("heatmaps") or {}
    if "ms_added_per_image" in maps:
        lines += ["", f"Heatmaps (`classify --heatmaps`: the Grad-CAM output plus drawing and encoding the PNG) add "
                      f"{maps['ms_added_per_image']:.1f} ms per image ({maps['ms_per_image_without']:.1f} -> "
                      f"{maps['ms_per_image_with']:.1f} ms/img through the pipeline, {maps['images']} images)."]
    cold = e2e.get("cold_start")
    if cold:
        t = cold["seconds"]
        how = "the shipped model, as installed" if cold.get("shipped_model") else "--model"
        lines += ["", f"Cold start (a fresh process to the result, median of {cold['rounds']}, bytecode cached): "
                      f"`xray-edge classify` one image ({how}) {t['classify']:.2f} s, a bare onnxruntime + OpenCV "
                      f"script on the same image and model {t['bare_script']:.2f} s ({cold['classify_over_bare']:.2f}x); `xray-edge --help` {t['help']:.2f} s."]
    gate = e2e.get("gate")
    if gate:
        lines += ["", "### Input gate on images the model was not built for", "",
                  "| set | images | rejected by the gate | refused as unreadable/empty | given a label | refused |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {g['images']} | {g['rejected']} | {g['error']} | {g['labelled']} | {g['refused_rate']:.0%} |"
                  for name, g in gate.items()]
        labelled = [f for g in gate.values() for f in g["labelled_files"]]
        if labelled:
            lines += ["", "Given a label anyway: " + "; ".join(labelled) + "."]
    return lines


def _peak(m: dict[str, Any]) -> str:
    peak, bound = m.get("int8_peak"), m.get("hw_int8_bound")
    text = ("onnxruntime's int8 GEMM: not measured." if not peak else
            f"onnxruntime's int8 GEMM: not measured ({peak['error']})." if "error" in peak else
            f"onnxruntime's int8 GEMM: {peak['gmac_per_s']:.0f} GMAC/s ({peak['method']}, {peak['threads']} threads).")
    return text + (f" Hardware int8 bound: {bound['gmac_per_s']:.0f} GMAC/s ({bound['basis']})." if bound else
                   " Hardware int8 bound: unknown for this CPU.")


def markdown(results: dict[str, Any], with_plot: bool) -> str:
    m, d, s = results["machine"], results["data"], results["settings"]
    ref = results["reference_record"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    subset = (f"{d['used']} images ({d['subset']} of the {d['available']} {d['split'] + ' ' if d['split'] else ''}"
              f"images of {d['kind']} `{d['source']}`; per class: "
              + ", ".join(f"{c} {n}" for c, n in d["per_class"].items()) + ")")
    lines = [
        "# xray-edge benchmark",
        "",
        f"Model: {ref['model_name']} {ref['model_version']} (record from `{ref['source']}`, temperature "
        f"{ref['temperature']:.3f}). Created {results['created']} with:",
        "",
        "```",
        results["command"] or "xray-edge benchmark",
        "```",
        "",
        f"Machine: {m['cpu']} ({m['arch']}), {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gb']} GB RAM, "
        f"{m['os']}, Python {m['python']}; {pkgs}. Threads: {m['threads']}. Load average at start "
        f"{m['load_average_start']}, at end {m.get('load_average_end')}.",
        "",
        f"int8 features: {', '.join(m.get('int8_features') or []) or 'none found'}. {_peak(m)}",
        "",
        f"Images: {subset}. Decoded and preprocessed once; every format gets the same arrays.",
        "",
        markdown_table(results["rows"]),
        "",
        "Columns: accuracy, macro-F1, COVID sensitivity and PPV, macro one-vs-rest AUROC on the images above; "
        "agree FP32 = argmax agreement with the FP32 reference; b1 = one image per call; b8 ms/img, img/s and "
        "GMAC/s (the model's multiply-accumulates per second) at batch 8; % of ORT int8 GEMM = that GMAC/s over "
        "onnxruntime's own int8 matrix-product rate on this CPU (int8 rows; another engine can pass 100 %); % of HW int8 "
        "bound = that GMAC/s over cores x clock x int8 MACs per cycle of the CPU's best int8 instruction; peak RSS Δ MB = peak RSS growth from loading and running the model; gate rejects, "
        "uncertain and decided acc = what the model record's rules (as in `classify`) make of these real X-rays "
        "(ONNX rows). 95 % bootstrap CIs are in results.json. Research screening aid, not a diagnostic device.",
        "",
    ]
    if with_plot:
        lines += [f"![latency vs accuracy]({FILES['plot']})", ""]
    lines += ["## Status and details", ""]
    for r in results["rows"]:
        build = r.get("build") or {}
        built = build.get("converter") or build.get("by")
        how = f"built from {build.get('source')} by {built}" if built else None
        if how and build.get("calibration_images"):
            how += f", calibrated on {build['calibration_images']} training images"
        extra = "; ".join(x for x in (r.get("detail"), how) if x)
        lines.append(f"- {r['format']} ({r['title']}, {r['engine']}): {r['status']}" + (f" ({extra})" if extra else ""))
    lines += ["", "## End to end (decoding included)", "", *_e2e_markdown(results.get("e2e")), "",
              "## How it was measured", ""]
    lines += [f"- {k}: {v}" for k, v in results["method"].items()]
    lines += [f"- note: {n}" for n in results["notes"]]
    lines += ["", f"Settings: `{json.dumps(s, sort_keys=True)}`", ""]
    return "\n".join(lines)


def write_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write every output file into ``out``; returns them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / name for k, name in FILES.items()}
    plot_note = plot(results, files["plot"])
    if plot_note:
        files.pop("plot")
        results["notes"].append(plot_note)
    files["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_csv(results, files["csv"])
    files["markdown"].write_text(markdown(results, "plot" in files))
    return files
