"""Classifying what arrived, through the one pipeline ``xray-edge classify`` uses: the spooled
files go through ``pipeline.classify_paths`` (decode, input gate inputs, lung crop, model) and
each result through ``classify.row_for`` (decisions, thresholds, warnings, heatmap picture), then
become a structured report and a heatmap secondary capture in the spool, and deliveries queued.

A file that cannot be read fails with the pipeline's one-line reason; anything else that goes
wrong with one instance fails that instance, never the node. Finished instances' files are
removed after ``keep_days``.
"""
from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from .. import dicom
from ..classify import row_for
from ..files import read_regular
from ..pipeline import classify_paths
from ..pixels import DecodeError
from ..report import Gallery
from . import sc, spool as spooling, sr
from .ledger import MAX_ATTEMPTS, Outputs, Pending

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ..pipeline import Result
    from ..session import LoadedModel
    from .config import NodeConfig
    from .ledger import Ledger

LOG = logging.getLogger("xray_edge.node")
PURGE_EVERY = 600.0  # seconds between looks for finished instances to remove
IDLE_WAIT = 5.0  # seconds to sleep when there is nothing to do (an arrival wakes it at once)


class Classifier:
    """The classification worker (one thread): ``run`` until ``stop`` is set."""

    def __init__(self, config: NodeConfig, ledger: Ledger, spool: spooling.Spool, model: LoadedModel,
                 device_uid: str, on_classified):
        self.config, self.ledger, self.spool, self.model = config, ledger, spool, model
        self.device_uid, self.on_classified = device_uid, on_classified
        self.namespace = uuid.uuid5(uuid.NAMESPACE_OID, device_uid)
        self.wake = threading.Event()
        self.heartbeat = time.monotonic()  # last time the loop came round (for the health check)
        self.cam = model.record.outputs.cam is not None and model.record.heatmap is not None
        self._last_purge = 0.0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                self._purge_finished()
                pending, given_up = self.ledger.claim(self.config.batch_size)
                for uid in given_up:
                    LOG.error("gave up on %s: not classified in %d attempts (the node stopped, or could not record the "
                              "result, each time)", uid, MAX_ATTEMPTS)
                if pending:
                    self.classify(pending)
                    continue
            except Exception as e:  # the ledger or the disk: log, wait, try again
                LOG.error("classification paused: %s: %s", type(e).__name__, str(e)[:200])
            self.wake.wait(IDLE_WAIT)
            self.wake.clear()

    def classify(self, pending: list[Pending]) -> None:
        """Classify a batch of spooled instances and record what became of each."""
        gallery = Gallery(self.model.record, limit=len(pending))
        results: list[Result] = []
        for batch in classify_paths(self.model, [p.path for p in pending], self.config.batch_size,
                                    max_pixels=self.config.max_pixels, cam=self.cam):
            results += batch
        for item, result in zip(pending, results):
            row = row_for(result, self.model, None, gallery)
            try:
                self._finish(item, row, gallery.pictures().get(result.path))
            except Exception as e:  # this instance fails, the others go on
                reason = f"cannot build its results ({type(e).__name__}: {str(e)[:200]})"
                LOG.error("failed %s: %s", item.sop_instance_uid, reason)
                self.ledger.fail(item.sop_instance_uid, reason, row)

    def _finish(self, item: Pending, row: dict[str, Any], pictures: tuple[bytes, bytes | None] | None) -> None:
        uid = item.sop_instance_uid
        if row["status"] == "error":
            LOG.warning("failed %s: %s", uid, row["reason"])
            self.ledger.fail(uid, row["reason"], row)
            return
        header = self._header(item.path)
        outputs = self._write(uid, header, row, pictures)
        self.ledger.classified(uid, row, outputs, [str(d) for d in self.config.destinations])
        LOG.info("classified %s: %s", uid, _summary(row))
        self.on_classified()

    def _header(self, path: str) -> Dataset:
        try:
            data = read_regular(path, self.config.max_instance_bytes + (1 << 20))
        except OSError as e:
            raise DecodeError(f"cannot read the spooled file {path} ({e.strerror or e})") from None
        return dicom.read_header(data, self.config.max_pixels)

    def _write(self, uid: str, header: Dataset, row: dict[str, Any],
               pictures: tuple[bytes, bytes | None] | None) -> Outputs:
        """The report, the heatmap image and the worklist's pictures, written to the spool."""
        study = dicom.identity(header).study
        sr_uid = _new_uid()
        report = sr.build(header, row, self.model, self.device_uid, self.config.ae_title, self._series(study, "sr"),
                          sr_uid)
        sr_path = self.spool.result_path(uid, "sr")
        spooling.write(sr_path, _encoded(report))
        outputs = {"sr_uid": sr_uid, "sr_path": str(sr_path)}
        if pictures is not None:
            thumb, heat = pictures
            thumb_path = self.spool.picture_path(uid, "thumb")
            spooling.write(thumb_path, thumb)
            outputs["thumb_path"] = str(thumb_path)
            if heat is not None:
                sc_uid = _new_uid()
                image = sc.build(header, heat, row, self.model, self._series(study, "sc"), sc_uid)
                sc_path, heat_path = self.spool.result_path(uid, "sc"), self.spool.picture_path(uid, "heat")
                spooling.write(sc_path, _encoded(image))
                spooling.write(heat_path, heat)
                outputs.update(sc_uid=sc_uid, sc_path=str(sc_path), heat_path=str(heat_path))
        return Outputs(**outputs)

    def _series(self, study: str, kind: str) -> str:
        """The node's series of reports (or heatmaps) in ``study``: the same UID every time, so a
        study's results from this node gather in one series of each kind."""
        return f"2.25.{uuid.uuid5(self.namespace, f'{study}/{kind}').int}"

    def _purge_finished(self) -> None:
        now = time.time()
        if not self.config.keep_days or now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        purge_finished(self.ledger, now - self.config.keep_days * 86400)


def purge_finished(ledger: Ledger, before: float) -> int:
    """Remove the spooled files of instances done with (sent, failed, or classified with nothing
    left to deliver) that arrived before ``before``; the ledger keeps their rows (a late duplicate
    is still recognised). Returns how many."""
    finished = ledger.finished_before(before)
    for uid, paths in finished:
        spooling.remove(paths)
        ledger.purged(uid)
    if finished:
        LOG.info("removed the spooled files of %d finished instances that arrived before %s", len(finished),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(before)))
    return len(finished)


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"rejected by the input gate (score {row['gate_score']})"
    p = row[f"p_{row['label']}"]
    flagged = f", flagged {';'.join(row['flagged'])}" if row["flagged"] else ""
    return f"{row['decision']}, most likely {row['label']} (p={p:.3f}){flagged}"


def _new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _encoded(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
