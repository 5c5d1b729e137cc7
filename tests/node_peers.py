"""What the DICOM node tests talk to: generated chest radiographs (CR, DX, secondary capture)
as a modality would send them, a pynetdicom sender, a pynetdicom storage destination that
counts what it receives and can go down and come back, the node run as a subprocess, and
Orthanc started on free ports with a generated configuration."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid)

from images import as_uint16, xray_like

from xray_edge.node.scp import no_delay

SOP_CLASSES = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation,
               "SC": SecondaryCaptureImageStorage}
ORTHANC = shutil.which("Orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def radiograph(modality: str = "CR", seed: int = 0, size: int = 96, study: str | None = None,
               patient: str = "XEDGE-TEST-1") -> Dataset:
    """A chest radiograph data set as a modality sends it (12-bit MONOCHROME2 unless DX's
    MONOCHROME1 test), with the patient, study and series attributes a PACS files it by."""
    pixels = as_uint16(xray_like(size, size, seed)) >> 4
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Synthetic", patient, "19800101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "101500", "1", f"ACC{seed:04d}"
    ds.ReferringPhysicianName = ""
    ds.Modality = "OT" if modality == "SC" else modality
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "xray-edge tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType, ds.PixelIntensityRelationship = "FOR PRESENTATION", "LOG"
        ds.PixelIntensityRelationshipSign, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 1, 0, 1, "US"
        ds.DetectorType, ds.ImagerPixelSpacing = "DIRECT", [0.2, 0.2]
    if modality == "SC":
        ds.ConversionType = "DI"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def node_config(spool: Path, **overrides):
    """A NodeConfig for a node run in the test process (port 0: any free port)."""
    from xray_edge.node.config import NodeConfig, peer

    values = dict(ae_title="XRAY_EDGE", bind="127.0.0.1", port=0, allowed=(peer("MODALITY"),), destinations=(),
                  spool=spool, max_instance_bytes=8 << 20, max_pixels=64_000_000, min_free_bytes=0, max_spool_bytes=0,
                  max_associations=4, timeout=5.0, retry_delay=0.2, retry_max=1.0, batch_size=4, keep_days=0.0)
    values.update(overrides)
    return NodeConfig(**values)


def classify_in_process(spool: Path, model_path: Path, datasets: list[Dataset], calling: str = "MODALITY",
                        site: Path | None = None, destinations: tuple = ()) -> None:
    """Spool ``datasets`` as the SCP does and classify them as the node does (with the ``site``
    profile, if given; deliveries queued for ``destinations``), in this process."""
    from xray_edge import dicom
    from xray_edge.classify import open_model
    from xray_edge.node.classifier import Classifier
    from xray_edge.node.ledger import Arrival, Ledger
    from xray_edge.node.spool import Spool

    config = node_config(spool, destinations=destinations)
    spooled = Spool(spool, 0, 0)
    spooled.open()
    ledger = Ledger(spooled.ledger)
    try:
        for ds in datasets:
            path = save(ds, spooled.instance_path(ds.SOPInstanceUID))
            ids = dicom.identity(ds)
            ledger.add(Arrival(ids.sop_instance, ids.sop_class, ids.study, ids.series, calling, "127.0.0.1",
                               str(ds.Modality), str(ds.PatientID), str(ds.AccessionNumber), str(path),
                               path.stat().st_size, ""))
            time.sleep(0.01)  # distinct arrival times
        model = open_model(model=model_path, threads=1, site=site)
        classifier = Classifier(config, ledger, spooled, model, ledger.device_uid(), lambda: None)
        pending, _ = ledger.claim(len(datasets))
        classifier.classify(pending)
    finally:
        ledger.close()


def ledger_rows(spool: Path, table: str = "instances") -> list[dict]:
    """Every row of a ledger table, read as the worklist reads it."""
    from contextlib import closing

    from xray_edge.node.ledger import open_read_only

    with closing(open_read_only(spool / "ledger.sqlite3")) as db:
        return [dict(r) for r in db.execute(f"SELECT * FROM {table}")]


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def report_content(sr: Dataset) -> dict[str, list]:
    """Every content item of a structured report, by concept name: CODE meanings, TEXT, NUM
    values and referenced images."""
    out: dict[str, list] = {}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            value = {"CODE": lambda: item.ConceptCodeSequence[0].CodeMeaning, "TEXT": lambda: item.TextValue,
                     "NUM": lambda: float(item.MeasuredValueSequence[0].NumericValue),
                     "IMAGE": lambda: item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}.get(item.ValueType)
            if value:
                out.setdefault(name, []).append(value())
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def sender(ae_title: str = "MODALITY", contexts=tuple(SOP_CLASSES.values()), timeout: float = 10):
    """A pynetdicom AE that proposes ``contexts`` (explicit and implicit VR little endian)."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for c in contexts:
        ae.add_requested_context(c)
    return ae


def store(ae, port: int, datasets: list, called: str = "XRAY_EDGE", tls=None) -> list[int | None]:
    """Send ``datasets`` over one association; each one's status (None: no response)."""
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return [None] * len(datasets)
    no_delay(assoc.dul.socket.socket)
    statuses = []
    for ds in datasets:
        if not assoc.is_established:  # the peer went away
            statuses.append(None)
            continue
        rsp = assoc.send_c_store(ds)
        statuses.append(int(rsp.Status) if "Status" in rsp else None)
    if assoc.is_established:
        assoc.release()
    return statuses


class Destination:
    """A storage SCP (pynetdicom) standing in for a PACS: counts each SOP Instance UID it stores,
    keeps the data sets; ``start``/``stop`` take it up and down on the same port. ``answers``: per
    SOP class, failure statuses to give (in turn) before it stores; ``classes``: what it accepts."""

    def __init__(self, ae_title: str = "PACS", port: int | None = None, answers: dict[str, list[int]] | None = None,
                 classes: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.88.33", SecondaryCaptureImageStorage)):
        self.ae_title, self.port = ae_title, port or free_port()
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.classes = classes
        self.received: Counter[str] = Counter()
        self.datasets: dict[str, Dataset] = {}
        self.lock = threading.Lock()
        self.ae = self.server = None

    def start(self) -> Destination:
        from pynetdicom import AE, evt

        self.ae = AE(ae_title=self.ae_title)
        for c in self.classes:
            self.ae.add_supported_context(c)
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.ae is not None:
            self.ae.shutdown()
            self.ae = self.server = None

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            pending = self.answers.get(str(ds.SOPClassUID))
            if pending:
                return pending.pop(0)
            self.received[str(ds.SOPInstanceUID)] += 1
            self.datasets[str(ds.SOPInstanceUID)] = ds
        return 0x0000


class Node:
    """``xray-edge serve`` run as a subprocess (this Python, the installed package): ``start`` waits for
    its DICOM port; ``kill`` sends SIGKILL; ``stop`` SIGTERM. Its stderr goes to ``log``."""

    def __init__(self, spool: Path, model: Path, port: int, *args: str):
        self.spool, self.model, self.port, self.args = spool, model, port, args
        self.log = spool.parent / f"{spool.name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Node:
        cmd = [sys.executable, "-c", "from xray_edge.cli import main; main()", "serve", "--spool", str(self.spool),
               "--model", str(self.model), "--port", str(self.port), "--threads", "1", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        begin = len(self.output())  # a restarted node appends to the same log
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.output()}")
            if "listening" in self.output()[begin:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"node did not start in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else None


class Orthanc:
    """Orthanc (Debian package) on free localhost ports with a generated configuration, its
    REST API on ``url``; ``modalities`` maps an id to (AE title, port) on 127.0.0.1."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, int]]):
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {"Name": "xray-edge-test", "StorageDirectory": str(folder / "storage"),
                  "IndexDirectory": str(folder / "storage"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                  "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomModalities": {k: [aet, "127.0.0.1", port] for k, (aet, port) in modalities.items()},
                  "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False, "DicomAssociationCloseDelay": 0,
                  "StableAge": 1, "SaveJobs": False, "Plugins": [], "LuaScripts": [], "HttpServerEnabled": True,
                  "StorageCompression": False, "ConcurrentJobs": 1, "HttpThreadsCount": 4}
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> Orthanc:
        self.log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer in time")

    def stop(self) -> None:
        """Kill it (its storage is a temporary folder; a clean shutdown takes seconds)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process:
            self.log.close()

    def request(self, method: str, path: str, body: bytes | None = None, kind: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": kind})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        with opener.open(req, timeout=30) as rsp:
            data = rsp.read()
        return json.loads(data) if rsp.headers.get_content_type() == "application/json" else data

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, path: Path) -> str:
        """POST the file to /instances; its Orthanc ID."""
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")["ID"]
