"""Sending results to a destination by C-STORE (pynetdicom SCU), one thread per destination.

Due deliveries go over one association at a time. A delivery counts as sent only on a status
the standard calls stored (0x0000, or the warnings 0xB000, 0xB006, 0xB007), and is marked sent
in the ledger at once, so a restart does not send it again. While the destination cannot be
reached, refuses the association, is out of resources (0xA7xx) or gives no answer, deliveries
are retried after ``retry_delay`` seconds, doubling up to ``retry_max``; any other failure status is
a refusal for good (the instance fails, with the status, on the worklist and in the log).

What cannot be helped: a crash after the destination stored an object and before the ledger
committed it sends that object once more after the restart, with the same SOP Instance UID (a
PACS keeps one copy).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from .scp import no_delay

if TYPE_CHECKING:
    from .config import Destination, NodeConfig
    from .ledger import Delivery, Ledger

LOG = logging.getLogger("xray_edge.node")
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
BATCH = 32  # deliveries per association
IDLE_WAIT = 5.0
LINGER = 1.0  # seconds an association is kept open for more work (associating costs more than a C-STORE)


def retry_delay(first: float, most: float, attempts: int) -> float:
    """Seconds before the next try of a delivery that has failed ``attempts`` times before."""
    return min(most, first * 2 ** min(attempts, 20))


class Sender:
    """Delivers to one destination until ``stop`` is set; ``wake`` makes it look at once."""

    def __init__(self, destination: Destination, config: NodeConfig, ledger: Ledger):
        self.destination, self.config, self.ledger = destination, config, ledger
        self.name = str(destination)
        self.wake = threading.Event()
        self.down_since: float | None = None  # when it was last found unreachable (None: reachable)
        self.last_error = ""
        self.ae = AE(ae_title=config.ae_title)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = config.timeout
        self.ae.connection_timeout = config.timeout
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                due = self.ledger.due(self.name, BATCH)
                if due:
                    self.send(due, stop)
                    continue
                next_due = self.ledger.next_due(self.name)
                wait = IDLE_WAIT if next_due is None else min(IDLE_WAIT, max(0.05, next_due - time.time()))
            except Exception as e:  # the ledger: log, wait, try again
                LOG.error("sending to %s paused: %s: %s", self.name, type(e).__name__, str(e)[:200])
                wait = IDLE_WAIT
            self.wake.wait(wait)
            self.wake.clear()

    def send(self, due: list[Delivery], stop: threading.Event) -> None:
        """One association for as long as there is work (the due deliveries, then what falls due
        within LINGER seconds: the next images' results): each stored, retried later or refused."""
        d = self.destination
        tls = (self.config.send_tls, d.host) if self.config.send_tls is not None else None
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=tls)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "cannot be reached"
            self._down(due, why)
            return
        no_delay(assoc.dul.socket.socket)
        try:
            while due:
                for n, delivery in enumerate(due):
                    if stop.is_set() or not assoc.is_established:
                        self._down(due[n:], "closed the association")
                        return
                    self._store(assoc, delivery)
                due = self._more(stop)
        finally:
            if assoc.is_established:
                assoc.release()

    def _more(self, stop: threading.Event) -> list[Delivery]:
        """Deliveries that fall due within LINGER seconds ([] if none or stopping)."""
        deadline = time.monotonic() + LINGER
        while not stop.is_set():
            due = self.ledger.due(self.name, BATCH)
            left = deadline - time.monotonic()
            if due or left <= 0:
                return due
            next_due = self.ledger.next_due(self.name)
            self.wake.wait(left if next_due is None else min(left, max(0.01, next_due - time.time())))
            self.wake.clear()
        return []

    def _store(self, assoc, delivery: Delivery) -> None:
        what = f"the {delivery.kind.upper()} of {delivery.sop_instance_uid}"
        try:
            ds = dcmread(delivery.path)
        except Exception as e:
            self._refused(delivery, f"cannot read {delivery.path} ({type(e).__name__}: {str(e)[:200]})")
            return
        try:
            rsp = assoc.send_c_store(ds)
        except ValueError as e:  # no accepted presentation context for it
            self._refused(delivery, f"it accepts no {ds.SOPClassUID.name} ({str(e)[:200]})")
            return
        status = int(rsp.Status) if "Status" in rsp else None
        if status in STORED:
            done = self.ledger.delivered(delivery)
            if self.down_since is not None:
                LOG.info("%s reached again", self.name)
                self.down_since, self.last_error = None, ""
            LOG.info("sent %s to %s%s", what, self.name, " (every result of it sent)" if done else "")
        elif status is None or 0xA700 <= status <= 0xA7FF:
            self._retry(delivery, "no answer" if status is None else f"out of resources (0x{status:04X})")
        else:
            self._refused(delivery, f"status 0x{status:04X}")

    def _down(self, deliveries: list[Delivery], why: str) -> None:
        if self.down_since is None:
            self.down_since = time.time()
        for delivery in deliveries:
            self._retry(delivery, why, quiet=True)
        delay = retry_delay(self.config.retry_delay, self.config.retry_max, min(d.attempts for d in deliveries))
        if why != self.last_error:
            LOG.warning("%s %s: %d results wait (next try in %.0f s, then less often)", self.name, why,
                        len(deliveries), delay)
        self.last_error = why

    def _retry(self, delivery: Delivery, why: str, quiet: bool = False) -> None:
        delay = retry_delay(self.config.retry_delay, self.config.retry_max, delivery.attempts)
        self.ledger.retry(delivery, why, delay)
        if not quiet:
            LOG.warning("%s: %s for the %s of %s; retry in %.0f s", self.name, why, delivery.kind.upper(),
                        delivery.sop_instance_uid, delay)

    def _refused(self, delivery: Delivery, why: str) -> None:
        self.ledger.refused(delivery, why)
        LOG.error("%s refused the %s of %s for good: %s", self.name, delivery.kind.upper(),
                  delivery.sop_instance_uid, why)
