"""Memory and throughput of the DICOM node as it runs: ``xray-edge serve`` started as its own
process, N radiographs sent by S senders at once, every result stored back to a destination in
this process; then the ledger and the destination are checked (each instance classified and its
report and heatmap, where it has one, delivered exactly once). Linux (reads /proc). The senders
and the destination share the machine with the node: on a small board, part of what is measured
is theirs.

    python -m xray_edge.node.bench --images 100 --senders 4            # the shipped model
    python -m xray_edge.node.bench --images 20 --model tiny.onnx --size 512 --json out.json
    python -m xray_edge.node.bench --from ../shared/data/cxr3/NORMAL --images 6 --worklist-shot docs/worklist.png

Images are synthetic chest-like 12-bit CR/DX of ``--size`` pixels (uncompressed, as modalities
send them), or PNG/JPEG files from ``--from`` made into CR/DX instances. Prints one summary
line per measure and, with ``--json``, writes them all.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np

from .ledger import open_read_only

SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    folder = Path(tempfile.mkdtemp(prefix="xray-edge-node-bench-"))
    destination = _Destination().start()
    node = None
    try:
        datasets = _datasets(args.images, args.size, args.source)
        port, http = _free_port(), _free_port()
        command = [sys.executable, "-c", "from xray_edge.cli import main; main()", "serve", "--spool",
                   str(folder / "spool"), "--port", str(port), "--http-port", str(http), "--allow", "BENCH",
                   "--send-to", f"BENCHPACS@127.0.0.1:{destination.port}", "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size), "--max-associations", str(max(4, args.senders)),
                   "--retry-delay", "1", "--retry-max", "2", "--min-free-mb", "0",
                   *(["--model", str(args.model)] if args.model else [])]
        log = open(folder / "node.log", "wb")
        node = subprocess.Popen(command, stdout=log, stderr=log)
        started = time.monotonic()
        if not _wait(lambda: b"listening" in (folder / "node.log").read_bytes(), 120, node):
            raise SystemExit(f"the node did not start:\n{(folder / 'node.log').read_text(errors='replace')}")
        memory = _Memory(node.pid).start()
        ready_s, idle_mib = time.monotonic() - started, memory.current_mib()
        begin = time.monotonic()
        statuses, store_ms = _send(port, datasets, args.senders)
        sent_s = time.monotonic() - begin
        every = {str(ds.SOPInstanceUID) for ds in datasets}
        done = _wait(lambda: _all_sent(folder / "spool", every, destination), args.timeout, node)
        total_s = time.monotonic() - begin
        memory.stop()
        result = _measures(args, folder, destination, every, statuses, store_ms, ready_s, idle_mib, memory.peak_mib,
                           sent_s, total_s, done)
        result["instance_mib"] = round(statistics.mean(len(ds.PixelData) for ds in datasets) / 2**20, 2)
        if args.worklist_shot:
            _screenshot(f"http://127.0.0.1:{http}/", args.worklist_shot)
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        destination.stop()
    result["node_exit_status"] = node.returncode
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return 0 if result["consistent"] and node.returncode == 0 else 1


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m xray_edge.node.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="instances to send (default 100)")
    parser.add_argument("--senders", type=int, default=4, help="senders at once, each its own association (4)")
    parser.add_argument("--size", type=int, default=2048, help="side of the synthetic images in pixels (2048)")
    parser.add_argument("--from", dest="source", type=Path, help="make the instances from the PNG/JPEG files here")
    parser.add_argument("--model", type=Path, help="model for the node (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=0, help="the node's onnxruntime threads (0: one per core)")
    parser.add_argument("--batch-size", type=int, default=4, help="the node's --batch-size (4)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every result (1800)")
    parser.add_argument("--json", type=Path, help="also write the measures to this JSON file")
    parser.add_argument("--worklist-shot", type=Path, help="screenshot the worklist page here (headless Chromium)")
    return parser.parse_args(argv)


def _measures(args, folder: Path, destination, every: set[str], statuses: dict[str, int | None],
              store_ms: list[float], ready_s: float, idle_mib: float, peak_mib: float, sent_s: float,
              total_s: float, done: bool) -> dict:
    with closing(open_read_only(folder / "spool" / "ledger.sqlite3")) as db:
        rows = db.execute("SELECT sop_instance_uid, state, attempts, received_at, sent_at, (sr_path != '') + "
                          "(sc_path != '') AS objects FROM instances").fetchall()
        deliveries = db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
    latencies = sorted(r["sent_at"] - r["received_at"] for r in rows if r["sent_at"])
    stored = Counter(destination.sources.values())
    consistent = (done and {r["sop_instance_uid"] for r in rows} == every and {r["state"] for r in rows} == {"sent"}
                  and dict(deliveries) == {"sent": sum(r["objects"] for r in rows)}
                  and set(destination.received.values()) == {1}
                  and stored == Counter({r["sop_instance_uid"]: r["objects"] for r in rows}))
    return {
        "images": len(every), "senders": args.senders, "image_side_px": args.size if not args.source else "from files",
        "acknowledged": sum(s == 0 for s in statuses.values()), "refused_or_lost": sum(s != 0 for s in statuses.values()),
        "node_ready_s": round(ready_s, 2), "node_idle_rss_mib": round(idle_mib), "node_peak_rss_mib": round(peak_mib),
        "receive_images_per_s": round(len(every) / sent_s, 2), "c_store_median_ms": round(statistics.median(store_ms), 1),
        "end_to_end_images_per_s": round(len(every) / total_s, 2), "end_to_end_s": round(total_s, 1),
        "result_latency_median_s": round(statistics.median(latencies), 2) if latencies else None,
        "result_latency_max_s": round(latencies[-1], 2) if latencies else None,
        "classified_more_than_once": sum(r["attempts"] > 1 for r in rows),
        "gate_rejected_or_no_heatmap": sum(r["objects"] == 1 for r in rows),
        "consistent": consistent, "cpu_cores": os.cpu_count(),
    }


def _datasets(count: int, size: int, source: Path | None) -> list:
    if source is None:
        return [_radiograph(_chest_like(size, seed), seed) for seed in range(count)]
    import cv2

    files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no PNG or JPEG files in {source}")
    out = []
    for seed in range(count):
        grey = cv2.imread(str(files[seed % len(files)]), cv2.IMREAD_GRAYSCALE)
        out.append(_radiograph(grey.astype(np.float32) / 255, seed))
    return out


def _chest_like(size: int, seed: int) -> np.ndarray:
    """A float image in [0, 1]: bright body, two darker lung fields, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.75 - 0.45 * np.exp(-(((x - 0.3) / 0.14) ** 2 + ((y - 0.45) / 0.28) ** 2))
    img -= 0.45 * np.exp(-(((x - 0.7) / 0.14) ** 2 + ((y - 0.45) / 0.28) ** 2)) * rng.uniform(0.5, 1.0)
    return np.clip(img + rng.normal(0, 0.03, img.shape).astype(np.float32), 0, 1)


def _radiograph(image: np.ndarray, seed: int):
    """A CR (even seeds) or DX for presentation instance of ``image``, 12 bits stored."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = "CR" if seed % 2 == 0 else "DX"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[modality], generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Synthetic", f"BENCH{seed:04d}", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "090000", "1", f"B{seed:05d}"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", modality, 1, 1
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    pixels = np.round(image * 4095).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _send(port: int, datasets: list, senders: int) -> tuple[dict[str, int | None], list[float]]:
    """Send ``datasets`` split over ``senders`` threads, each over one association."""
    from pynetdicom import AE

    from .scp import no_delay

    statuses: dict[str, int | None] = {}
    times: list[float] = []

    def send(part: list) -> None:
        ae = AE(ae_title="BENCH")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        for uid in SOP_CLASSES.values():
            ae.add_requested_context(uid)
        assoc = ae.associate("127.0.0.1", port, ae_title="XRAY_EDGE")
        if assoc.is_established:
            no_delay(assoc.dul.socket.socket)
        for ds in part:
            start = time.monotonic()
            rsp = assoc.send_c_store(ds) if assoc.is_established else None
            times.append((time.monotonic() - start) * 1000)
            statuses[str(ds.SOPInstanceUID)] = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=send, args=(datasets[n::senders],)) for n in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, times


class _Destination:
    """A storage SCP in this process standing in for the PACS: counts what it is sent."""

    def __init__(self):
        self.port = _free_port()
        self.received: Counter[str] = Counter()
        self.sources: dict[str, str] = {}  # result UID -> the source instance it is about
        self.lock = threading.Lock()

    def start(self) -> _Destination:
        from pydicom.uid import SecondaryCaptureImageStorage
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage

        self.ae = AE(ae_title="BENCHPACS")
        for uid in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(uid)
        self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        self.ae.shutdown()

    def _store(self, event) -> int:
        ds = event.dataset
        if "SourceImageSequence" in ds:
            source = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        else:
            source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        with self.lock:
            self.received[str(ds.SOPInstanceUID)] += 1
            self.sources[str(ds.SOPInstanceUID)] = str(source)
        return 0x0000


class _Memory:
    """The node's resident memory, sampled every 0.2 s (peak: the kernel's own high-water mark)."""

    def __init__(self, pid: int):
        self.pid, self.peak_mib, self._stop = pid, 0.0, threading.Event()

    def start(self) -> _Memory:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.peak_mib = max(self.peak_mib, self._field("VmHWM"))

    def current_mib(self) -> float:
        return self._field("VmRSS")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_mib = max(self.peak_mib, self._field("VmHWM"))

    def _field(self, name: str) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def _all_sent(spool: Path, every: set[str], destination: _Destination) -> bool:
    with closing(open_read_only(spool / "ledger.sqlite3")) as db:
        (sent,) = db.execute("SELECT COUNT(*) FROM instances WHERE state IN ('sent', 'failed')").fetchone()
    return sent >= len(every)


def _wait(condition, timeout: float, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.2)
    return condition()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot(url: str, path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium found for --worklist-shot (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,1900",
                        f"--screenshot={Path(path).resolve()}", url], check=True, capture_output=True, timeout=120)
    print(f"worklist screenshot: {path}")


if __name__ == "__main__":
    sys.exit(main())
