"""Sending results (the node's sender, in the test process, against pynetdicom destinations that
answer as a PACS may): retried while out of resources, refused for good on a failure status or
when the destination takes no such object; and finished instances' files removed on schedule."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from node_peers import Destination, classify_in_process, ledger_rows, node_config, radiograph, wait_until  # noqa: E402
from pydicom.uid import SecondaryCaptureImageStorage  # noqa: E402
from tiny_model import make_tiny_onnx  # noqa: E402

from xray_edge.node.classifier import purge_finished  # noqa: E402
from xray_edge.node.config import destination as parse_destination  # noqa: E402
from xray_edge.node.ledger import Ledger  # noqa: E402
from xray_edge.node.sender import Sender  # noqa: E402

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


def deliver(tmp_path, model, pacs: Destination, count: int = 1) -> list[dict]:
    """Classify ``count`` radiographs with deliveries to ``pacs`` queued, run the sender until
    every instance is settled (sent or failed); the ledger's instances."""
    spool = tmp_path / "spool"
    target = parse_destination(f"{pacs.ae_title}@127.0.0.1:{pacs.port}")
    classify_in_process(spool, model, [radiograph("CR", 50 + i) for i in range(count)], destinations=(target,))
    config = node_config(spool, destinations=(target,), retry_delay=0.05, retry_max=0.1)
    ledger = Ledger(spool / "ledger.sqlite3")
    stop, sender = threading.Event(), Sender(target, config, ledger)
    thread = threading.Thread(target=sender.run, args=(stop,))
    pacs.start()
    thread.start()
    try:
        assert wait_until(lambda: {r["state"] for r in ledger_rows(spool)} <= {"sent", "failed"}, 15)
    finally:
        stop.set()
        sender.wake.set()
        thread.join(10)
        pacs.stop()
        ledger.close()
    return ledger_rows(spool)


def test_out_of_resources_is_retried_until_stored(tmp_path, model):
    pacs = Destination(answers={SecondaryCaptureImageStorage: [0xA700, 0xA702]})
    (row,) = deliver(tmp_path, model, pacs)
    assert row["state"] == "sent"
    attempts = {d["kind"]: d["attempts"] for d in ledger_rows(tmp_path / "spool", "deliveries")}
    assert attempts == {"sr": 1, "sc": 3} and set(pacs.received.values()) == {1} and len(pacs.received) == 2


def test_a_failure_status_is_a_refusal_for_good(tmp_path, model):
    pacs = Destination(answers={SecondaryCaptureImageStorage: [0xC001] * 5})
    (row,) = deliver(tmp_path, model, pacs)
    assert row["state"] == "failed" and row["error"].endswith("refused the SC: status 0xC001")
    states = {d["kind"]: (d["state"], d["attempts"]) for d in ledger_rows(tmp_path / "spool", "deliveries")}
    assert states == {"sr": ("sent", 1), "sc": ("failed", 1)}


def test_a_destination_that_takes_no_heatmap_refuses_it(tmp_path, model):
    pacs = Destination(classes=(COMPREHENSIVE_SR,))
    (row,) = deliver(tmp_path, model, pacs)
    assert row["state"] == "failed" and "accepts no Secondary Capture Image Storage" in row["error"]
    assert len(pacs.received) == 1  # the report


def test_finished_instances_files_are_removed_and_their_rows_kept(tmp_path, model):
    rows = deliver(tmp_path, model, Destination(), count=2)
    files = [p for r in rows for p in (r["path"], r["sr_path"], r["sc_path"], r["thumb_path"], r["heat_path"])]
    ledger = Ledger(tmp_path / "spool" / "ledger.sqlite3")
    try:
        assert purge_finished(ledger, time.time() - 3600) == 0  # nothing arrived that long ago
        assert purge_finished(ledger, time.time() + 1) == 2
        assert all(ledger.known(r["sop_instance_uid"]) for r in rows)  # a late duplicate is still recognised
    finally:
        ledger.close()
    assert not [f for f in files if (tmp_path / f).exists()]
    assert {r["purged"] for r in ledger_rows(tmp_path / "spool")} == {1}
