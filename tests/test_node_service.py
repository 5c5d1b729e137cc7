"""``xray-edge serve`` as it runs (a subprocess with a tiny model) against real peers: Orthanc
sends a CR and a DX image and gets the report and heatmap back in the same study; and the
faults: the destination down then back, the node killed with SIGKILL mid-stream and restarted,
four senders at once."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from node_peers import (ORTHANC, Destination, Node, Orthanc, free_port, ledger_rows, radiograph,  # noqa: E402
                        report_content, save, sender, store, wait_until)
from tiny_model import make_tiny_onnx  # noqa: E402

from xray_edge.node.sr import class_code  # noqa: E402

OK = 0x0000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture
def nodes():
    """Every node started by a test is stopped (or was killed) when it ends."""
    started: list[Node] = []
    yield started
    for node in started:
        node.kill()


def settled(spool, count: int) -> bool:
    """``count`` instances in the ledger, every one sent."""
    rows = ledger_rows(spool)
    return len(rows) == count and all(r["state"] == "sent" for r in rows)


def check_delivered_once(spool, destination: Destination, sources: set[str]) -> None:
    """Every source has one report and one heatmap at the destination, each received once, and
    the ledger says so."""
    rows = ledger_rows(spool)
    assert {r["sop_instance_uid"] for r in rows} == sources and {r["state"] for r in rows} == {"sent"}
    deliveries = ledger_rows(spool, "deliveries")
    assert len(deliveries) == 2 * len(sources) and {d["state"] for d in deliveries} == {"sent"}
    assert set(destination.received.values()) == {1} and len(destination.received) == 2 * len(sources)
    kinds = Counter((str(ds.SOPClassUID.name), _source_of(ds)) for ds in destination.datasets.values())
    assert set(kinds.values()) == {1}
    assert {src for _, src in kinds} == sources


def _source_of(ds) -> str:
    if "SourceImageSequence" in ds:
        return ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    return evidence[0].ReferencedSOPInstanceUID


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it)")
def test_orthanc_sends_cr_and_dx_and_gets_report_and_heatmap_in_the_same_study(tmp_path, model, nodes):
    node_port = free_port()
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", {"xedge": ("XRAY_EDGE", node_port)}).start()
    try:
        node = Node(tmp_path / "spool", model, node_port, "--allow", "ORTHANC@127.0.0.1", "--send-to",
                    f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--http-port", "0")
        nodes.append(node.start())
        cr = radiograph("CR", 1)
        dx = radiograph("DX", 2, study=cr.StudyInstanceUID)
        ids = [orthanc.upload(save(ds, tmp_path / f"{ds.Modality}.dcm")) for ds in (cr, dx)]
        job = orthanc.request("POST", "/modalities/xedge/store", json.dumps({"Resources": ids, "Synchronous": True})
                              .encode())
        assert (job["InstancesCount"], job["FailedInstancesCount"]) == (2, 0)
        assert wait_until(lambda: len(orthanc.get("/instances")) == 6, 20), node.output()
        study = orthanc.request("POST", "/tools/lookup", cr.StudyInstanceUID.encode(), "text/plain")[0]["ID"]
        series = {s["MainDicomTags"].get("Modality"): s for s in orthanc.get(f"/studies/{study}/series")}
        assert set(series) == {"CR", "DX", "SR", "OT"}
        results = {}
        for modality in ("SR", "OT"):
            for instance in series[modality]["Instances"]:
                ds = pydicom.dcmread(_bytes(orthanc, f"/instances/{instance}/file"))
                results[(modality, _source_of(ds))] = ds
        assert set(results) == {(m, str(s.SOPInstanceUID)) for m in ("SR", "OT") for s in (cr, dx)}
        for (modality, _), ds in results.items():
            assert ds.StudyInstanceUID == cr.StudyInstanceUID and ds.PatientID == cr.PatientID
            assert "research aid, not for diagnostic use" in ds.SeriesDescription
        report = results[("SR", str(dx.SOPInstanceUID))]
        decided = json.loads(next(r for r in ledger_rows(tmp_path / "spool")
                                  if r["sop_instance_uid"] == dx.SOPInstanceUID)["row"])
        items = report_content(report)
        assert items["Source of Measurement"] == [dx.SOPInstanceUID]
        assert items["Screening decision"] and items["Most likely class"] == [class_code(decided["label"]).meaning]
        assert items["Intended use"] == ["Research screening aid, not for diagnostic use: every result needs a clinician."]
        assert wait_until(lambda: settled(tmp_path / "spool", 2), 10)  # Orthanc answered; the node records it
    finally:
        orthanc.stop()


def _bytes(orthanc: Orthanc, path: str):
    import io

    return io.BytesIO(orthanc.request("GET", path))


def test_results_wait_while_the_destination_is_down_and_arrive_once(tmp_path, model, nodes):
    pacs = Destination("PACS")
    spool = tmp_path / "spool"
    node = Node(spool, model, free_port(), "--allow", "MODALITY", "--send-to", f"PACS@127.0.0.1:{pacs.port}",
                "--retry-delay", "0.1", "--retry-max", "0.5", "--http-port", str(free_port()))
    nodes.append(node.start())
    sent = [radiograph("CR", 10), radiograph("DX", 11)]
    assert store(sender(), node.port, sent) == [OK, OK]
    assert wait_until(lambda: all(d["attempts"] >= 2 for d in ledger_rows(spool, "deliveries"))
                      and len(ledger_rows(spool, "deliveries")) == 4, 15), node.output()
    health = _get_json(node, "/healthz")
    assert health["destinations"][f"PACS@127.0.0.1:{pacs.port}"]["reachable"] is False
    pacs.start()
    try:
        assert wait_until(lambda: settled(spool, 2), 20), node.output()
        time.sleep(0.3)  # anything sent twice would have arrived by now
        check_delivered_once(spool, pacs, {str(ds.SOPInstanceUID) for ds in sent})
        assert "reached again" in node.output()
        health = _get_json(node, "/healthz")
        assert health["status"] == "ok" and health["instances"]["sent"] == 2
    finally:
        pacs.stop()


def _get_json(node: Node, path: str) -> dict:
    port = int(node.args[node.args.index("--http-port") + 1])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
        return json.loads(rsp.read())


def _send_all(port: int, batches: list[list], statuses: dict[str, int | None], timeout: float = 10) -> None:
    """One sender per batch, all at once, each over its own association."""
    def send(batch):
        for ds, status in zip(batch, store(sender(timeout=timeout), port, batch)):
            statuses[str(ds.SOPInstanceUID)] = status

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_four_senders_at_once_all_classified_and_sent_once(tmp_path, model, nodes):
    pacs = Destination("PACS").start()
    try:
        spool = tmp_path / "spool"
        node = Node(spool, model, free_port(), "--allow", "MODALITY", "--send-to", f"PACS@127.0.0.1:{pacs.port}",
                    "--http-port", "0", "--batch-size", "8")
        nodes.append(node.start())
        batches = [[radiograph("CR", 100 * s + i) for i in range(3)] for s in range(4)]
        statuses: dict[str, int | None] = {}
        _send_all(node.port, batches, statuses)
        assert list(statuses.values()) == [OK] * 12
        assert wait_until(lambda: settled(spool, 12), 30), node.output()
        check_delivered_once(spool, pacs, set(statuses))
        assert all(r["attempts"] == 1 for r in ledger_rows(spool))  # each classified once
        assert node.stop() == 0 and node.output().rstrip().endswith("INFO stopped")  # SIGTERM: a clean stop
    finally:
        pacs.stop()


def test_killed_mid_stream_and_restarted_nothing_lost_nothing_twice(tmp_path, model, nodes):
    pacs = Destination("PACS")  # down until the node has been killed and restarted
    spool, port = tmp_path / "spool", free_port()
    args = ("--allow", "MODALITY", "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--retry-delay", "0.1", "--retry-max", "0.5",
            "--http-port", "0", "--batch-size", "2")
    first = Node(spool, model, port, *args)
    nodes.append(first.start())
    batches = [[radiograph("DX", 1000 * s + i) for i in range(3)] for s in range(4)]
    statuses: dict[str, int | None] = {}
    senders = threading.Thread(target=_send_all, args=(port, batches, statuses, 1))  # they notice the death in 1 s
    senders.start()
    assert wait_until(lambda: len(ledger_rows(spool)) >= 4, 20), first.output()
    first.kill()  # SIGKILL while instances arrive and are classified
    senders.join(60)
    acked = {uid for uid, s in statuses.items() if s == OK}
    assert 0 < len(acked) < 12  # the kill cut the stream
    assert acked <= {r["sop_instance_uid"] for r in ledger_rows(spool)}  # committed before acknowledged
    second = Node(spool, model, port, *args)
    nodes.append(second.start())
    every = [ds for b in batches for ds in b]
    again = [ds for ds in every if str(ds.SOPInstanceUID) not in acked] + every[:2]  # the senders retry (2 twice)
    assert store(sender(), port, again) == [OK] * len(again)
    pacs.start()
    try:
        assert wait_until(lambda: settled(spool, 12), 30), second.output()
        time.sleep(0.3)
        check_delivered_once(spool, pacs, {str(ds.SOPInstanceUID) for ds in every})
        assert not list(spool.rglob(".*.tmp"))
    finally:
        pacs.stop()
