"""The node's worklist page and health endpoint (stdlib ``http.server``).

``/``: what arrived, newest first, each with its decision and heatmap card (the visual report's
cards) and what became of its results; it refreshes itself every REFRESH seconds.
``/pictures/<SOP Instance UID>.<thumb|heat>.png``: a card's pictures. ``/healthz``: JSON for
monitoring, HTTP 200 when the node is doing its job, 503 with the problems when it is not.

Bound to a loopback address by default. Bound wider, every request but ``/healthz`` (counts and
states only, no patient data) must carry the token, as ``?token=`` (the page's own links carry it)
or ``Authorization: Bearer``. The page holds patient identifiers: serve it only where the clinic
may see them; plain HTTP (put it behind a TLS proxy to cross a network you do not trust).
"""
from __future__ import annotations

import hmac
import html
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from .. import __version__
from ..files import read_regular
from ..report import CSS, card
from .ledger import counts, open_read_only, recent

LOG = logging.getLogger("xray_edge.node")
REFRESH = 10  # seconds
SHOWN = 60  # arrivals on the page
_PICTURE = re.compile(r"/pictures/([0-9.]{1,64})\.(thumb|heat)\.png")
_PICTURE_COLUMNS = {kind: f"SELECT {kind}_path FROM instances WHERE sop_instance_uid = ?" for kind in ("thumb", "heat")}
_EXTRA_CSS = """
.arrival{font-size:12px;color:#4a5160;margin:0 0 6px}.state{font-weight:600}
.ok{color:#2e7d32}.bad{color:#c62828}.wait{color:#8a6d00}
"""
_TOTALS = {"received": "waiting to be classified", "classified": "classified, results not all sent",
           "sent": "results sent", "failed": "failed", "deliveries_pending": "result objects waiting to be sent"}
_SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'",
                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                     "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


def start(bind: str, port: int, ledger_path: Path, classes: list[str], model_label: str, token: str,
          health: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Serve the worklist on ``bind``:``port`` from a thread; returns the server (``shutdown``)."""

    class Handler(_Handler):
        pass

    Handler.context = _Context(ledger_path, classes, model_label, token, health)
    server = ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.1,), name="xray-edge-worklist", daemon=True).start()
    return server


class _Context:
    def __init__(self, ledger_path: Path, classes: list[str], model_label: str, token: str,
                 health: Callable[[], dict[str, Any]]):
        self.ledger_path, self.classes, self.model_label = ledger_path, classes, model_label
        self.token, self.health = token, health


class _Handler(BaseHTTPRequestHandler):
    context: _Context
    server_version, sys_version = f"xray-edge/{__version__}", ""
    timeout = 10  # seconds a client has to send its request

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        try:
            if url.path == "/healthz":
                report = self.context.health()
                self._send(200 if report["status"] == "ok" else 503, "application/json",
                           json.dumps(report, indent=1).encode())
            elif not self._authorised(url.query):
                self._send(401, "text/plain; charset=utf-8", b"a token is needed: add ?token=... to the address\n")
            elif url.path == "/":
                self._send(200, "text/html; charset=utf-8", self._page(url.query).encode("utf-8"))
            elif match := _PICTURE.fullmatch(url.path):
                self._picture(*match.groups())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
        except Exception as e:  # one line in the log, a 500 to the client, the server carries on
            LOG.error("worklist: %s %s failed: %s: %s", self.command, url.path[:100], type(e).__name__, str(e)[:200])
            self._send(500, "text/plain; charset=utf-8", b"internal error (see the node's log)\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # requests are not logged (the query holds the token)
        pass

    def _authorised(self, query: str) -> bool:
        token = self.context.token
        if not token:
            return True
        given = parse_qs(query).get("token", [""])[0]
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = given or header[7:].strip()
        return hmac.compare_digest(given.encode(), token.encode())

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _picture(self, uid: str, kind: str) -> None:
        with closing(open_read_only(self.context.ledger_path)) as db:
            row = db.execute(_PICTURE_COLUMNS[kind], (uid,)).fetchone()
        if not row or not row[0]:
            self._send(404, "text/plain; charset=utf-8", b"no such picture\n")
            return
        try:
            self._send(200, "image/png", read_regular(row[0], 32 << 20))
        except OSError:
            self._send(404, "text/plain; charset=utf-8", b"picture no longer kept\n")

    def _page(self, query: str) -> str:
        context = self.context
        suffix = f"?token={quote(context.token)}" if context.token else ""
        with closing(open_read_only(context.ledger_path)) as db:
            totals, rows = counts(db), recent(db, SHOWN)
            waiting = dict(db.execute("SELECT sop_instance_uid, COUNT(*) FROM deliveries WHERE state = 'pending' "
                                      "GROUP BY sop_instance_uid").fetchall())
        health = context.health()
        cards = "".join(_arrival(r, context.classes, suffix, waiting.get(r["sop_instance_uid"], 0)) for r in rows)
        summary = "".join(f"<tr><td>{_e(_TOTALS[k])}</td><td>{v}</td></tr>" for k, v in totals.items())
        problems = "".join(f"<li>{_e(p)}</li>" for p in health.get("problems", []))
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xray-edge worklist</title>
<meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}{_EXTRA_CSS}</style></head><body>
<header><h1>xray-edge worklist</h1><div>DICOM node {_e(health.get('ae_title', ''))}; model {_e(context.model_label)};
{time.strftime('%Y-%m-%d %H:%M:%S')}, refreshes every {REFRESH} s</div></header>
<p class="disclaimer"><b>Research screening aid, not for diagnostic use: every result needs a clinician.</b>
NORMAL means no radiographic finding was flagged, not that there is no infection. Heatmaps show what raised the most
likely class's score; they are not a segmentation of disease.</p>
<main><section><h2>Node</h2>{f'<ul class="bad">{problems}</ul>' if problems else '<p class="ok">working</p>'}
<table>{summary}</table></section>
<section><h2>Arrivals, newest first ({len(rows)} shown)</h2><div class="cards">{cards or '<p>nothing yet</p>'}</div>
</section></main></body></html>
"""


def _arrival(r: Any, classes: list[str], suffix: str, pending: int) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received_at"]))
    who = " ".join(x for x in (r["modality"], f"accession {r['accession']}" if r["accession"] else "",
                                f"patient {r['patient_id']}" if r["patient_id"] else "") if x)
    title = f"{who or r['sop_instance_uid']}"
    line = f'<p class="arrival">{_e(when)} from {_e(r["calling_ae"])}; {_state(r, pending)}</p>'
    row = json.loads(r["row"]) if r["row"] else None
    if row is None or row["status"] != "ok" or not r["thumb_path"]:
        what = (f'<span class="badge {_e(row["decision"])}">{_e(row["decision"])}</span>{_e(row["reason"])}'
                if row else "")
        return f'<div class="card"><h3>{_e(title)}</h3>{line}<p>{what}</p></div>'
    uid = r["sop_instance_uid"]
    heat = f"/pictures/{uid}.heat.png{suffix}" if r["heat_path"] else None
    return card(row, classes, (f"/pictures/{uid}.thumb.png{suffix}", heat), title).replace(
        "</h3>", f"</h3>{line}", 1)


def _state(r: Any, pending: int) -> str:
    state = r["state"]
    if state == "received":
        return '<span class="state wait">waiting to be classified</span>'
    if state == "failed":
        return f'<span class="state bad">failed: {_e(r["error"])}</span>'
    if state == "sent":
        return '<span class="state ok">results sent</span>'
    return (f'<span class="state wait">{pending} result objects waiting to be sent</span>' if pending
            else '<span class="state ok">classified (no destination)</span>')


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
