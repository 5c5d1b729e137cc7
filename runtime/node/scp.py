"""The node's DICOM Storage SCP (pynetdicom): who may send, what, how much, and how a received
instance is made safe before it is acknowledged.

A connection from a host no allowed peer sends from is closed at once. At association: the
calling AE title (and, where configured, the host) must be allowed, the called AE title must be
the node's, at most ``max_associations`` at once, and at least one proposed context must be CR,
DX for presentation, secondary capture or verification; other SOP classes' contexts are refused.
The peer's messages are capped as they are read, not once they are whole: a connection that
sends more than ``max_instance_bytes`` in one message is dropped (a peer's PDU length is
otherwise believed, however large). Every connection has ``timeout`` to say something; with TLS,
its handshake happens in its own thread, not where connections are accepted.

A C-STORE is acknowledged (0x0000) only once the instance is durably in the spool and its
ledger row committed; a known SOP Instance UID is acknowledged without being stored again. It
is refused with 0xA700 (out of resources) when there is no room, 0xA900 when the data set is not
what the request says, 0xC210 when it cannot be parsed; each refusal and each arrival is one log
line naming the instance and the peer.
"""
from __future__ import annotations

import errno
import logging
import socket
import socketserver
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydicom.uid import (UID, ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian,
                         DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
                         SecondaryCaptureImageStorage)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from .. import dicom
from ..pixels import DecodeError
from . import spool as spooling
from .config import NodeConfig, allowed_networks, in_networks
from .ledger import Arrival, Ledger
from .sc import SERIES_DESCRIPTION as HEATMAP_SERIES
from .sr import MANUFACTURER

LOG = logging.getLogger("xray_edge.node")

ACCEPTED_CLASSES = {ComputedRadiographyImageStorage: "CR", DigitalXRayImageStorageForPresentation: "DX",
                    SecondaryCaptureImageStorage: "secondary capture"}
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit,
                     JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                     JPEG2000Lossless, JPEG2000, RLELossless]
MAX_PDU = 1 << 20  # the largest PDU the node asks peers to send
SUCCESS, OUT_OF_RESOURCES, NOT_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210


class _CappedReads:
    """A socket that counts what it reads and fails (an OSError, which closes the association)
    once more than ``budget`` bytes arrive without ``used`` being reset (at each whole message)."""

    budget = 0
    used = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)  # type: ignore[misc]
        self.used += len(data)
        if self.used > self.budget:
            LOG.warning("dropped the connection from %s: more than %.0f MiB in one message (the instance size cap)",
                        _peer_of(self), self.budget / 2**20)
            raise OSError(errno.EMSGSIZE, "message over the size cap")
        return data


class CappedSocket(_CappedReads, socket.socket):
    pass


class CappedSSLSocket(_CappedReads, ssl.SSLSocket):
    pass


def no_delay(sock) -> None:
    """Send small PDUs at once: pynetdicom writes a message's PDUs one by one, and Nagle's algorithm
    holds each behind the peer's delayed acknowledgement (measured: 55 ms per C-STORE, 18 without)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP


def _peer_of(sock) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "a peer"


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with every accepted connection given a timeout and the
    message cap, TLS handshakes left to the connection's own thread, and connections from hosts
    no allowed peer may send from closed at once (they never hold an association slot)."""

    budget = 0
    networks: tuple | None = None  # None: any host may connect

    def verify_request(self, request, client_address) -> bool:
        if self.networks is None or in_networks(client_address[0], self.networks):
            return True
        LOG.warning("refused a connection from %s: no allowed peer sends from there", client_address[0])
        return False

    def get_request(self):
        sock, address = self.socket.accept()
        capped = CappedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        capped.settimeout(self.ae.network_timeout)
        no_delay(capped)
        if self.ssl_context:
            capped = self.ssl_context.wrap_socket(capped, server_side=True, do_handshake_on_connect=False)
        capped.budget = self.budget
        return capped, address

    def shutdown(self) -> None:
        """Stop accepting connections and close the listening socket (associations carry on)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class Receiver:
    """The running SCP: ``stop`` ends it."""

    def __init__(self, config: NodeConfig, ledger: Ledger, spool: spooling.Spool, on_arrival: Callable[[], None]):
        self.config, self.ledger, self.spool, self.on_arrival = config, ledger, spool, on_arrival
        self._busy: set[str] = set()  # SOP Instance UIDs being stored right now
        self._busy_changed = threading.Condition()
        self.ae = _make_ae(config)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, _on_rejected),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_DIMSE_RECV, _on_message)]
        if config.tls is not None:
            config.tls.sslsocket_class = CappedSSLSocket
        self.server = self.ae.make_server((config.bind, config.port), ae_title=config.ae_title,
                                          ssl_context=config.tls, evt_handlers=handlers, server_class=_Server)
        self.server.budget = config.max_instance_bytes + MAX_PDU
        self.server.networks = allowed_networks(config.allowed)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), name="xray-edge-scp",
                                        daemon=True)
        self._thread.start()

    def stop(self, grace: float) -> None:
        """Stop accepting associations, let those under way finish for up to ``grace`` seconds,
        then abort what is left."""
        self.server.shutdown()
        deadline = time.monotonic() + grace
        while self._acceptors() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._acceptors():
            assoc.abort()
        self._thread.join(5)

    def _acceptors(self) -> list:
        return [a for a in self.ae.active_associations if a.is_acceptor]

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling, host = assoc.requestor.primitive.calling_ae_title.strip(), assoc.requestor.address
        if not any(p.admits(calling, host) for p in self.config.allowed):
            LOG.warning("refused an association from %s@%s: calling AE title not allowed from this host", calling, host)
            _reject(assoc, 0x03)  # calling AE title not recognised
            return
        proposed = {str(cx.abstract_syntax) for cx in assoc.requestor.requested_contexts}
        if not proposed & {*ACCEPTED_CLASSES, Verification}:
            LOG.warning("refused an association from %s@%s: it proposes none of CR, DX for presentation, secondary "
                        "capture or verification (%s)", calling, host, ", ".join(sorted(_names(proposed)))[:300])
            _reject(assoc, 0x01)  # no reason given

    def _on_store(self, event) -> int:
        requestor, request = event.assoc.requestor, event.request
        calling, host = requestor.ae_title.strip(), requestor.address
        uid, sop_class = str(request.AffectedSOPInstanceUID or ""), str(request.AffectedSOPClassUID or "")
        try:
            return self._store(event, calling, host, uid, sop_class)
        except Exception as e:  # never a traceback, never a dead association thread
            LOG.error("refused instance %r from %s@%s: %s: %s", uid[:70], calling, host, type(e).__name__,
                      str(e)[:200])
            return OUT_OF_RESOURCES

    def _store(self, event, calling: str, host: str, uid: str, sop_class: str) -> int:
        who = f"{calling}@{host}"
        if not dicom.valid_uid(uid):
            LOG.warning("refused an instance from %s: its SOP Instance UID %r is not a valid UID", who, uid[:70])
            return CANNOT_UNDERSTAND
        with self._claim(uid):
            if self.ledger.known(uid):
                self.ledger.note_duplicate(uid)
                LOG.info("instance %s from %s: already received, acknowledged again (not classified again)", uid, who)
                return SUCCESS
            data = event.encoded_dataset(include_meta=True)
            try:
                header = dicom.read_header(data, self.config.max_pixels)
                ids = dicom.identity(header)
            except DecodeError as e:
                LOG.warning("refused instance %s from %s: %s", uid, who, e)
                return CANNOT_UNDERSTAND
            if (ids.sop_instance, ids.sop_class) != (uid, sop_class) or sop_class not in ACCEPTED_CLASSES:
                LOG.warning("refused instance %s from %s: its data set is %s %s, the request said %s %s", uid, who,
                            _names({ids.sop_class})[0], ids.sop_instance, _names({sop_class})[0], uid)
                return NOT_SOP_CLASS
            if is_own_result(header):
                LOG.info("instance %s from %s: one of xray-edge's own heatmaps (a routing rule sent it back?), "
                         "acknowledged, not kept", uid, who)
                return SUCCESS
            path = self.spool.instance_path(uid)
            try:
                self.spool.check_room(len(data), self.ledger.spooled_bytes())
                digest = spooling.write(path, data)
            except OSError as e:
                LOG.error("refused instance %s from %s: cannot keep it (%s)", uid, who, e.strerror or e)
                return OUT_OF_RESOURCES
            arrival = Arrival(uid, sop_class, ids.study, ids.series, calling, host, dicom.text(header, "Modality", 16),
                              dicom.text(header, "PatientID"), dicom.text(header, "AccessionNumber"), str(path),
                              len(data), digest)
            try:
                self.ledger.add(arrival)
            except sqlite3.Error as e:
                spooling.remove([str(path)])
                LOG.error("refused instance %s from %s: cannot record it in the ledger (%s)", uid, who, e)
                return OUT_OF_RESOURCES
        LOG.info("received %s %s from %s (%.1f MiB)", ACCEPTED_CLASSES[sop_class], uid, who, len(data) / 2**20)
        self.on_arrival()
        return SUCCESS

    @contextmanager
    def _claim(self, uid: str) -> Iterator[None]:
        """Hold ``uid`` while it is stored: another association sending the same instance at once
        waits, then finds it in the ledger."""
        with self._busy_changed:
            self._busy_changed.wait_for(lambda: uid not in self._busy)
            self._busy.add(uid)
        try:
            yield
        finally:
            with self._busy_changed:
                self._busy.discard(uid)
                self._busy_changed.notify_all()


def is_own_result(header) -> bool:
    """A heatmap this software made (a PACS routing everything back would send it): not classified."""
    return (str(header.get("SOPClassUID", "")) == SecondaryCaptureImageStorage
            and dicom.text(header, "Manufacturer") == MANUFACTURER
            and dicom.text(header, "SeriesDescription", 70) == HEATMAP_SERIES)


def _make_ae(config: NodeConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = MAX_PDU
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout
    for sop_class in ACCEPTED_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def _reject(assoc, diagnostic: int) -> None:
    """Reject the association (permanent, by the DUL service user) and end it once the reply is
    sent, as pynetdicom does for its own rejections."""
    assoc.acse.send_reject(0x01, 0x01, diagnostic)
    assoc.kill()


def _on_message(event) -> None:
    """A whole DIMSE message arrived: the next one gets the full size budget."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if isinstance(sock, _CappedReads):
        sock.used = 0


def _on_rejected(event) -> None:
    requestor = event.assoc.requestor
    LOG.warning("refused an association from %s@%s (pynetdicom: %s)", requestor.ae_title.strip(), requestor.address,
                "too many associations at once" if event.assoc.acceptor.primitive.result_source == 0x03 else
                "called AE title is not the node's")


def _names(uids: set[str]) -> list[str]:
    return [UID(u).name if UID(u).is_valid else repr(u[:70]) for u in uids]
