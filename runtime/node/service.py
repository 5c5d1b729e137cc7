"""The running node: spool and ledger opened and put right after a crash, the model loaded, then
the Storage SCP, the classification worker, one sender per destination and the worklist started;
SIGTERM or SIGINT stops them in order (no new associations, those under way finish, the batch in
hand is finished). Logs one line per event on stderr."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from .. import __version__, dicom
from ..files import read_regular
from ..pixels import DecodeError
from . import spool as spooling
from .config import NodeConfig
from .ledger import Arrival, Ledger, counts, open_read_only

LOG = logging.getLogger("xray_edge.node")
STALLED_AFTER = 600.0  # seconds without the classification loop coming round while work waits
DOWN_TOO_LONG = 600.0  # seconds a destination may be unreachable before the health check says so


def run(config: NodeConfig, model_path: Path | None, threads: int, site: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; the exit status (0, or 2 when it could not start)."""
    _logging()
    spool = spooling.Spool(config.spool, config.min_free_bytes, config.max_spool_bytes)
    try:
        left = spool.open()
        ledger = Ledger(spool.ledger)
    except OSError as e:
        return _cannot_start(f"cannot use the spool {config.spool} ({e.strerror or e})")
    except Exception as e:  # sqlite3.Error and the like: a damaged ledger
        return _cannot_start(f"cannot open the ledger {spool.ledger} ({type(e).__name__}: {e})")
    try:
        return _serve(config, model_path, threads, site, spool, ledger, left)
    finally:
        ledger.close()


def _serve(config: NodeConfig, model_path: Path | None, threads: int, site: Path | None, spool: spooling.Spool,
           ledger: Ledger, left: list[Path]) -> int:
    from ..classify import available_cores, described, open_model
    from ..contract import ModelContractError
    from .classifier import Classifier
    from .scp import Receiver
    from .sender import Sender
    from .worklist import start as start_worklist

    for path in left:
        LOG.warning("removed %s, left half-written when the node stopped", path)
    recover(spool, ledger, config.max_instance_bytes + (1 << 20), config.max_pixels)
    try:
        model = open_model(model=model_path, threads=min(threads, available_cores()), site=site)
    except ModelContractError as e:
        return _cannot_start(str(e))
    stop = threading.Event()
    senders = [Sender(d, config, ledger) for d in config.destinations]
    classifier = Classifier(config, ledger, spool, model, ledger.device_uid(),
                            on_classified=lambda: [s.wake.set() for s in senders])
    try:
        receiver = Receiver(config, ledger, spool, classifier.wake.set)
    except OSError as e:
        return _cannot_start(f"cannot listen on {config.bind}:{config.port} ({e.strerror or e})")
    workers = [threading.Thread(target=classifier.run, args=(stop,), name="xray-edge-classify", daemon=True)]
    workers += [threading.Thread(target=s.run, args=(stop,), name=f"xray-edge-send-{n}", daemon=True)
                for n, s in enumerate(senders)]
    for worker in workers:
        worker.start()

    def health() -> dict[str, Any]:
        return health_report(config, spool, classifier, workers[0], senders)

    web = None
    if config.http_port:
        try:
            web = start_worklist(config.http_bind, config.http_port, spool.ledger, model.classes, described(model),
                                 config.http_token, health)
        except OSError as e:
            receiver.stop(0)
            stop.set()
            return _cannot_start(f"cannot serve the worklist on {config.http_bind}:{config.http_port} "
                                 f"({e.strerror or e})")
    signals = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: stop.set()),
               signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: stop.set())}
    page = f"; worklist on http://{config.http_bind}:{web.server_address[1]}/" if web else ""
    LOG.info("xray-edge %s node %s listening on %s:%d (%s; model %s; %s)%s", __version__, config.ae_title,
             config.bind, receiver.port, "TLS" if config.tls else "no TLS", described(model),
             "sending to " + ", ".join(map(str, config.destinations)) if senders else "no destination", page)
    try:
        stop.wait()
    finally:
        LOG.info("stopping: no new associations; those under way get %.0f s", config.timeout)
        receiver.stop(config.timeout)
        stop.set()
        classifier.wake.set()
        for s in senders:
            s.wake.set()
        for worker in workers:
            worker.join(config.timeout + 60)
        if web is not None:
            web.shutdown()
        for number, previous in signals.items():
            signal.signal(number, previous)
    LOG.info("stopped")
    return 0


def recover(spool: spooling.Spool, ledger: Ledger, max_bytes: int, max_pixels: int) -> None:
    """Put the spool and the ledger back in step after a crash: a spooled instance the ledger
    lacks (written, never acknowledged) is recorded, so it is classified; an unreadable one is
    removed; an instance waiting to be classified whose file is gone fails."""
    for path in spool.orphans(ledger.paths()):
        try:
            data = read_regular(path, max_bytes)
            header = dicom.read_header(data, max_pixels)
            ids = dicom.identity(header)
            if path != spool.instance_path(ids.sop_instance):
                raise DecodeError("its name is not its SOP Instance UID")
        except (OSError, DecodeError) as e:  # never acknowledged: its sender still has it
            LOG.warning("removed %s, found in the spool but not readable (%s)", path, e)
            path.unlink(missing_ok=True)
            continue
        ledger.add(Arrival(ids.sop_instance, ids.sop_class, ids.study, ids.series, "(recovered)", "",
                           dicom.text(header, "Modality", 16), dicom.text(header, "PatientID"),
                           dicom.text(header, "AccessionNumber"), str(path), len(data), hashlib.sha256(data).hexdigest()))
        LOG.info("recovered %s: spooled before the node stopped, not yet in the ledger", ids.sop_instance)
    with closing(open_read_only(spool.ledger)) as db:
        waiting = db.execute("SELECT sop_instance_uid, path FROM instances WHERE state = 'received'").fetchall()
    for uid, path in waiting:
        if not os.path.exists(path):
            ledger.fail(uid, f"its spooled file {path} is gone")
            LOG.error("failed %s: its spooled file %s is gone", uid, path)


def health_report(config: NodeConfig, spool: spooling.Spool, classifier, worker: threading.Thread,
                  senders: list) -> dict[str, Any]:
    """What ``/healthz`` says: the counts, each destination, and the problems (none: status ok)."""
    with closing(open_read_only(spool.ledger)) as db:
        states = counts(db)
    problems = []
    idle = time.monotonic() - classifier.heartbeat
    if not worker.is_alive():
        problems.append("the classification worker has stopped")
    elif states["received"] and idle > STALLED_AFTER:
        problems.append(f"classification has not moved for {idle:.0f} s with {states['received']} instances waiting")
    stats = os.statvfs(spool.root)
    free = stats.f_bavail * stats.f_frsize
    if free < config.min_free_bytes:
        problems.append(f"the spool's disk has {free / 2**20:.0f} MiB free, under the reserve: instances are refused")
    destinations = {}
    for s in senders:
        down = s.down_since is not None
        destinations[s.name] = {"reachable": not down, "down_since": s.down_since, "error": s.last_error}
        if down and time.time() - s.down_since > DOWN_TOO_LONG:
            problems.append(f"{s.name} {s.last_error} since {time.strftime('%H:%M', time.localtime(s.down_since))}")
    return {"status": "degraded" if problems else "ok", "problems": problems, "ae_title": config.ae_title,
            "version": __version__, "instances": states, "destinations": destinations,
            "spool_free_mib": round(free / 2**20), "classifier_idle_s": round(idle, 1)}


def _logging() -> None:
    """One line per event on stderr (unless the process has set up logging itself, as a test run
    has); pynetdicom's and highdicom's own messages from warning level, one line each."""
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(message)s"))
        handler.addFilter(_said_already)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    LOG.setLevel(logging.INFO)
    for noisy in ("pynetdicom", "highdicom"):  # highdicom logs every module it copies at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _said_already(record: logging.LogRecord) -> bool:
    """Drop pynetdicom's two lines for each failed connection: the sender says once that a
    destination cannot be reached, and again when it is back."""
    return not (record.name.startswith("pynetdicom") and record.getMessage().startswith(
        ("Association request failed: unable to connect", "TCP Initialisation Error")))


class _OneLine(logging.Formatter):
    """No tracebacks, no line breaks or control characters: what a peer sends (an AE title, a
    UID) cannot forge log lines or drive a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_info = record.exc_text = None
        record.stack_info = None
        return "".join(c if c.isprintable() else "?" for c in super().format(record))


def _cannot_start(message: str) -> int:
    LOG.error("cannot start: %s", message)
    return 2
