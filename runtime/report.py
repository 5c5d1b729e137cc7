"""The visual report: one self-contained HTML file (pictures inlined, no network, no scripts)
for a clinician. A summary (counts per decision and class, the model and its validation figures,
the disclaimer), then one card per image (thumbnail, heatmap, probability bars, decision and
warnings), flagged and uncertain cases first, then the rejected and failed files with reasons."""
from __future__ import annotations

import base64
import heapq
import html
import itertools
import time
from collections import Counter
from typing import Any, Sequence

from .contract import ModelRecord

ORDER = {"positive": 0, "uncertain": 1, "negative": 2}
MAX_CARDS = 400  # pictures kept for the report; further rows are listed in a table
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:16px 24px}header h1{margin:0 0 4px;font-size:20px}
.disclaimer{background:#fff3cd;border-left:5px solid #e0a800;padding:10px 24px;margin:0}
main{padding:16px 24px}section{margin-bottom:24px}
table{border-collapse:collapse;background:#fff}td,th{padding:4px 10px;border:1px solid #d8dbe0;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;padding:10px;width:470px}
.card h3{margin:0 0 6px;font-size:13px;word-break:break-all}
.pics{display:flex;gap:6px}.pics img{width:228px;height:228px;border-radius:4px;background:#000}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600;margin-right:6px}
.positive{background:#c62828}.uncertain{background:#e08a00}.negative{background:#2e7d32}
.rejected{background:#616161}.error{background:#37474f}
.bar{display:flex;align-items:center;gap:6px;margin:2px 0}.bar span{width:130px;font-size:12px}
.bar div{height:10px;background:#3f51b5;border-radius:2px}.warn{color:#b26a00;font-size:12px;margin-top:4px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figures(record: ModelRecord) -> str:
    """The model's own validation figures, from its record."""
    m = record.metrics
    parts = []
    for key, name in (("macro_f1", "internal test macro-F1"), ("macro_auroc", "internal test macro AUROC")):
        value = (m.get(key) or {}).get("value") if isinstance(m.get(key), dict) else None
        if value is not None:
            parts.append(f"{name} {value:.3f}")
    cross = (m.get("cross_origin") or {}).get("worst_origin_macro_f1")
    if isinstance(cross, (int, float)):
        parts.append(f"macro-F1 on the worst collection it was not trained on (leave-one-origin-out) {cross:.3f}")
    return "; ".join(parts) or "no figures in the model record"


def _p(row: dict[str, Any], c: str) -> float:
    """A row's probability of ``c`` (rows read back from a CSV hold strings)."""
    value = row.get(f"p_{c}")
    return float(value) if value not in (None, "") else 0.0


def priority(row: dict[str, Any], record: ModelRecord) -> tuple[int, float]:
    """Sort key: positive, then uncertain, then negative; within each, the likeliest finding first."""
    return ORDER.get(row["decision"], 3), -max((_p(row, c) for c in record.findings()), default=0)


class Gallery:
    """The pictures kept for the report: at most ``limit``, the highest-priority rows' (a long run
    keeps its flagged and uncertain cases' pictures rather than its first ones)."""

    def __init__(self, record: ModelRecord, limit: int = MAX_CARDS):
        self.record, self.limit, self.order = record, limit, itertools.count()
        self.heap: list[tuple[tuple[int, float], int, str, tuple[bytes, bytes | None]]] = []  # least important first

    def add(self, row: dict[str, Any], thumbnail: bytes, heatmap: bytes | None) -> None:
        rank = priority(row, self.record)
        item = ((-rank[0], -rank[1]), next(self.order), row["path"], (thumbnail, heatmap))
        if len(self.heap) < self.limit:
            heapq.heappush(self.heap, item)
        elif item[0] > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def pictures(self) -> dict[str, tuple[bytes, bytes | None]]:
        return {path: pics for _, _, path, pics in self.heap}


def _flags(row: dict[str, Any]) -> list[str]:
    flagged = row["flagged"]
    return flagged.split(";") if isinstance(flagged, str) and flagged else list(flagged or [])


def card(row: dict[str, Any], classes: Sequence[str], sources: tuple[str, str | None], title: str | None = None) -> str:
    """One image's card: ``sources`` are the thumbnail's and the heatmap's image addresses (the
    report inlines them as data: URIs; the node's worklist links them); ``title`` is its heading
    (default: the row's path)."""
    thumb, heat = sources
    bars = "".join(
        f'<div class="bar"><span>{_e(c)} {_p(row, c):.3f}</span>'
        f'<div style="width:{max(1, round(200 * _p(row, c)))}px"></div></div>' for c in classes)
    flagged = ", ".join(_flags(row)) or "none"
    warning = f'<div class="warn">&#9888; {_e(row["warning"])}</div>' if row.get("warning") else ""
    heat_img = f'<img alt="heatmap" src="{_e(heat)}">' if heat else ""
    return (f'<div class="card"><h3>{_e(row["path"] if title is None else title)}</h3><div class="pics">'
            f'<img alt="X-ray" src="{_e(thumb)}">'
            f'{heat_img}</div><p><span class="badge {row["decision"]}">{_e(row["decision"])}</span>'
            f'most likely <b>{_e(row["label"])}</b>; flagged: {_e(flagged)}'
            f'{"; looks " + _e(row["age_group"]) if row.get("age_group") else ""}</p>{bars}{warning}</div>')


def _inlined(thumb: bytes, heat: bytes | None) -> tuple[str, str | None]:
    return data_uri(thumb), data_uri(heat) if heat else None


def render(rows: Sequence[dict[str, Any]], pictures: dict[str, tuple[bytes, bytes | None]], record: ModelRecord,
           model_label: str, disclaimer: str) -> str:
    """The whole report. ``pictures`` maps a row's path to (thumbnail PNG, heatmap PNG or None)."""
    classes = record.classes
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: priority(r, record))
    others = [r for r in rows if r["status"] != "ok"]
    decisions = Counter(r["decision"] for r in rows)
    labels = Counter(r["label"] for r in ok)
    summary = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in
                      [*((f"decision: {d}", decisions[d]) for d in (*ORDER, "rejected", "error") if decisions[d]),
                       *((f"most likely: {c}", labels[c]) for c in classes if labels[c])])
    cards = "".join(card(r, classes, _inlined(*pictures[r["path"]])) for r in ok if r["path"] in pictures)
    unpictured = [r for r in ok if r["path"] not in pictures]
    listed = "".join(f'<tr><td>{_e(r["path"])}</td><td><span class="badge {r["decision"]}">{_e(r["decision"])}</span></td>'
                     f'<td>{_e(r["label"])}</td><td>{_e(", ".join(_flags(r)))}</td><td>{_e(r.get("warning", ""))}</td></tr>'
                     for r in unpictured)
    refused = "".join(f'<tr><td>{_e(r["path"])}</td><td><span class="badge {r["status"]}">{_e(r["status"])}</span></td>'
                      f'<td>{_e(r["reason"])}</td></tr>' for r in others)
    rec = record
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xray-edge report</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>
<header><h1>xray-edge screening report</h1>
<div>{len(rows)} files, {time.strftime('%Y-%m-%d %H:%M')}; model {_e(model_label)}</div></header>
<p class="disclaimer"><b>{_e(disclaimer)}</b> Heatmaps show the regions that raised the most likely class's score
(Grad-CAM on the last convolutional block); they are not a segmentation of disease.</p>
<main><section><h2>Summary</h2><table>{summary}</table>
<p>Model: {_e(rec.model_name)} {_e(rec.model_version)} ({_e(rec.variant)}); {_e(_figures(rec))}.
Decisions: <b>positive</b> = a finding (COVID or viral pneumonia) at or above its operating threshold;
<b>negative</b> = no finding flagged; <b>uncertain</b> = the two most likely classes are too close to call, refer;
<b>rejected</b> = not an image this model was built to judge.</p></section>
<section><h2>Images ({len(ok)} classified)</h2><div class="cards">{cards}</div>
{f'<h3>Further classified images (no pictures kept)</h3><table><tr><th>file</th><th>decision</th><th>most likely</th><th>flagged</th><th>warning</th></tr>{listed}</table>' if listed else ''}
</section>
<section><h2>Rejected and failed files ({len(others)})</h2>
{f'<table><tr><th>file</th><th>status</th><th>reason</th></tr>{refused}</table>' if refused else '<p>none</p>'}
</section></main></body></html>
"""
