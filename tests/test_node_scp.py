"""The node's Storage SCP against real pynetdicom peers, run in the test process (no model: only
receiving): what is accepted and made durable, and every refusal (unknown AE, wrong SOP class,
oversized, malformed and lying data sets, no room, an association storm, TLS)."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from node_peers import ledger_rows, node_config, radiograph, save, sender, store, wait_until  # noqa: E402
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForProcessing, generate_uid  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

from xray_edge.node.config import peer, server_tls  # noqa: E402
from xray_edge.node.ledger import Ledger  # noqa: E402
from xray_edge.node.scp import Receiver  # noqa: E402
from xray_edge.node.spool import Spool  # noqa: E402

OK, OUT_OF_RESOURCES, NOT_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210


@pytest.fixture
def receiver(tmp_path):
    """start(**config overrides) -> (Receiver, spool folder); every one stopped afterwards."""
    started = []

    def start(spool: Path | None = None, **overrides):
        config = node_config(spool or tmp_path / f"spool{len(started)}", **overrides)
        spooled = Spool(config.spool, config.min_free_bytes, config.max_spool_bytes)
        spooled.open()
        ledger = Ledger(spooled.ledger)
        started.append((Receiver(config, ledger, spooled, lambda: None), ledger))
        return started[-1][0], config.spool

    yield start
    for r, ledger in started:
        r.stop(0.2)
        ledger.close()


def spooled_files(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "in").iterdir())


def test_cr_dx_and_sc_are_spooled_and_recorded_before_the_ack(receiver):
    r, spool = receiver()
    sent = [radiograph("CR", 1), radiograph("DX", 2), radiograph("SC", 3)]
    assert store(sender(), r.port, sent) == [OK, OK, OK]
    rows = {row["sop_instance_uid"]: row for row in ledger_rows(spool)}
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in sent}
    for ds in sent:
        row = rows[str(ds.SOPInstanceUID)]
        assert (row["state"], row["calling_ae"], row["study_uid"]) == ("received", "MODALITY", ds.StudyInstanceUID)
        back = pydicom.dcmread(row["path"])
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
        assert os.stat(row["path"]).st_mode & 0o777 == 0o600  # patient data
    assert os.stat(spool / "ledger.sqlite3").st_mode & 0o777 == 0o600


def test_the_same_instance_sent_again_is_kept_once(receiver):
    r, spool = receiver()
    ds = radiograph("CR", 4)
    threads = [threading.Thread(target=store, args=(sender(), r.port, [ds, ds])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (row,) = ledger_rows(spool)
    assert row["duplicates"] == 5 and len(spooled_files(spool)) == 1


def test_unknown_calling_ae_and_wrong_host_are_refused_at_association(receiver):
    r, spool = receiver(allowed=(peer("MODALITY@127.0.0.1"), peer("PACS@10.0.0.0/8")))
    for calling in ("STRANGER", "PACS"):  # not listed; listed, but only from 10.x
        assoc = sender(calling).associate("127.0.0.1", r.port, ae_title="XRAY_EDGE")
        assert assoc.is_rejected
        assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (0x01, 0x03)
    assoc = sender("MODALITY").associate("127.0.0.1", r.port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not the node's
    assert store(sender("MODALITY"), r.port, [radiograph()]) == [OK]
    assert len(ledger_rows(spool)) == 1
    echo = sender("MODALITY", contexts=[Verification]).associate("127.0.0.1", r.port, ae_title="XRAY_EDGE")
    assert echo.is_established and echo.send_c_echo().Status == 0x0000  # verification works
    echo.release()
    # every allowed peer names its hosts: another host is hung up on before any DICOM
    elsewhere = sender("MODALITY").associate("127.0.0.1", r.port, ae_title="XRAY_EDGE", bind_address=("127.0.0.2", 0))
    assert not elsewhere.is_established and not elsewhere.is_rejected
    assert wait_until(lambda: not [a for a in r.ae.active_associations if a.is_acceptor], 3)


def test_other_sop_classes_are_refused_at_association(receiver):
    r, spool = receiver()
    for only in (CTImageStorage, DigitalXRayImageStorageForProcessing):
        assert sender(contexts=[only]).associate("127.0.0.1", r.port, ae_title="XRAY_EDGE").is_rejected
    assoc = sender(contexts=[CTImageStorage, radiograph().SOPClassUID]).associate("127.0.0.1", r.port,
                                                                                  ae_title="XRAY_EDGE")
    assert assoc.is_established
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [radiograph().SOPClassUID]
    ct = radiograph()
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    with pytest.raises(ValueError):  # no accepted context: pynetdicom will not even send it
        assoc.send_c_store(ct)
    assoc.release()
    assert ledger_rows(spool) == []


@pytest.fixture
def raw_files(monkeypatch):
    """pynetdicom sends a file's data set as raw bytes under its file meta's UIDs (a peer that
    lies or sends garbage)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_a_data_set_that_is_not_what_the_request_says_is_refused(receiver, tmp_path, raw_files):
    r, spool = receiver()
    ds = radiograph("CR", 5)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request will name another instance
    ds.preamble = b"\0" * 128
    forged = tmp_path / "forged.dcm"
    ds.save_as(forged)  # as it is
    assert store(sender(), r.port, [forged]) == [NOT_SOP_CLASS]
    assert ledger_rows(spool) == [] and spooled_files(spool) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")  # sent on purpose
def test_malformed_data_sets_are_refused(receiver, tmp_path, raw_files):
    r, spool = receiver()
    garbage = save(radiograph("CR", 6), tmp_path / "garbage.dcm")
    data = garbage.read_bytes()
    meta_end = data.index(b"\x08\x00")  # the data set starts at its first (0008,xxxx) element
    garbage.write_bytes(data[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(300))
    no_study = radiograph("CR", 7)
    del no_study.StudyInstanceUID
    bad_uid = radiograph("CR", 8)
    bad_uid.SeriesInstanceUID = "1.2.03.x"
    assert store(sender(), r.port, [garbage, no_study, bad_uid]) == [CANNOT_UNDERSTAND] * 3
    assert store(sender(), r.port, [radiograph("CR", 9)]) == [OK]  # and the node goes on
    assert len(ledger_rows(spool)) == 1


def test_an_oversized_data_set_is_cut_off_while_it_arrives(receiver):
    r, spool = receiver(max_instance_bytes=256 << 10)  # the cap, plus one PDU of slack: 1.25 MiB
    assert store(sender(), r.port, [radiograph("CR", 10, size=900)]) == [None]  # 1.6 MiB: connection dropped
    assert store(sender(), r.port, [radiograph("CR", 11)]) == [OK]
    assert len(ledger_rows(spool)) == 1 and len(spooled_files(spool)) == 1


def test_no_room_in_the_spool_refuses_with_out_of_resources(receiver):
    r, spool = receiver(min_free_bytes=1 << 60)  # the free-space reserve is never met
    assert store(sender(), r.port, [radiograph("CR", 12)]) == [OUT_OF_RESOURCES]
    r2, spool2 = receiver(max_spool_bytes=50_000)  # two 19 kB instances fit, not three
    assert store(sender(), r2.port, [radiograph("CR", s) for s in (13, 14, 15)]) == [OK, OK, OUT_OF_RESOURCES]
    assert ledger_rows(spool) == [] and len(ledger_rows(spool2)) == 2
    assert spooled_files(spool) == [] and len(spooled_files(spool2)) == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (needs root and the right to mount; skipped where there is none)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs for the disk-full test needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_refuses_with_out_of_resources_and_leaves_nothing(receiver, tiny_disk):
    r, spool = receiver(spool=tiny_disk / "spool")  # no reserve: the write itself hits ENOSPC
    assert store(sender(), r.port, [radiograph("CR", 16, size=600)]) == [OUT_OF_RESOURCES]  # 720 kB
    assert spooled_files(spool) == [] and not list((spool / "in").glob(".*"))
    assert store(sender(), r.port, [radiograph("CR", 17)]) == [OK]
    assert len(ledger_rows(spool)) == 1


def test_an_association_storm_is_refused_in_part_and_leaves_the_node_working(receiver):
    r, spool = receiver(max_associations=3, timeout=1.0)
    silent = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(10)]  # connect, say nothing
    datasets = [radiograph("CR", 100 + i) for i in range(12)]
    statuses: dict[str, int | None] = {}

    def send(ds) -> None:
        (statuses[str(ds.SOPInstanceUID)],) = store(sender(), r.port, [ds])

    threads = [threading.Thread(target=send, args=(ds,)) for ds in datasets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(statuses) == 12 and set(statuses.values()) <= {OK, None} and None in statuses.values()
    acked = {uid for uid, s in statuses.items() if s == OK}
    assert {row["sop_instance_uid"] for row in ledger_rows(spool)} == acked  # every ack is in the ledger, only those
    for s in silent:  # the node hangs up on each after its timeout
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()
    assert wait_until(lambda: not [a for a in r.ae.active_associations if a.is_acceptor], 5)
    assert store(sender(), r.port, [radiograph("CR", 99)]) == [OK]


def test_tls_is_required_when_configured_and_a_silent_client_blocks_no_one(receiver, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    r, spool = receiver(tls=server_tls(cert, key, None))
    client = ssl.create_default_context(cafile=str(cert))
    stalled = socket.create_connection(("127.0.0.1", r.port))  # never says hello
    start = time.monotonic()
    secured = radiograph("CR", 20)
    assert store(sender(), r.port, [secured], tls=(client, "127.0.0.1")) == [OK]
    assert time.monotonic() - start < 3  # not behind the silent client's handshake
    assert store(sender(), r.port, [radiograph("CR", 21)]) == [None]  # plain DICOM to a TLS port
    stalled.close()
    assert [row["sop_instance_uid"] for row in ledger_rows(spool)] == [secured.SOPInstanceUID]


def test_the_nodes_own_heatmap_sent_back_is_acknowledged_and_not_kept(receiver):
    from xray_edge.node.sc import SERIES_DESCRIPTION

    r, spool = receiver()
    echo = radiograph("SC", 30)
    echo.Manufacturer, echo.SeriesDescription = "xray-edge", SERIES_DESCRIPTION
    assert store(sender(), r.port, [echo]) == [OK]
    assert ledger_rows(spool) == [] and spooled_files(spool) == []


@pytest.mark.filterwarnings("ignore:Expected implicit VR")  # the junk file, read on purpose
def test_after_a_crash_the_spool_and_the_ledger_are_put_back_in_step(tmp_path):
    from xray_edge.node.ledger import Arrival
    from xray_edge.node.service import recover

    spool = Spool(tmp_path / "spool", 0, 0)
    spool.open()
    orphan = radiograph("CR", 40)  # spooled, never recorded (the node died before its commit)
    save(orphan, spool.instance_path(orphan.SOPInstanceUID))
    junk = spool.incoming / "1.2.3.dcm"
    junk.write_bytes(b"not DICOM")
    half = spool.incoming / ".1.2.4.dcm.x1y2.tmp"  # a write cut off
    half.write_bytes(b"\0" * 10)
    ledger = Ledger(spool.ledger)
    gone = radiograph("CR", 41)  # recorded, its file lost
    ledger.add(Arrival(gone.SOPInstanceUID, gone.SOPClassUID, gone.StudyInstanceUID, gone.SeriesInstanceUID,
                       "MODALITY", "127.0.0.1", "CR", "", "", str(spool.instance_path(gone.SOPInstanceUID)), 1, ""))
    assert spool.open() == [half] and not half.exists()
    recover(spool, ledger, 1 << 20, 64_000_000)
    ledger.close()
    rows = {r["sop_instance_uid"]: r for r in ledger_rows(spool.root)}
    assert rows[orphan.SOPInstanceUID]["state"] == "received"
    assert rows[gone.SOPInstanceUID]["state"] == "failed" and "is gone" in rows[gone.SOPInstanceUID]["error"]
    assert not junk.exists() and len(rows) == 2
