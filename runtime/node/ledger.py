"""The node's ledger: one SQLite database in the spool recording every instance received, what
became of it and each delivery of its results, so that nothing is lost or done twice across
restarts and crashes.

An instance is ``received`` (spooled, committed, then acknowledged), ``classified`` (its results
are built and one delivery per destination and result object is queued), ``sent`` (every
delivery was acknowledged by its destination) or ``failed`` (``error`` says why: unreadable, not
classified in MAX_ATTEMPTS tries, or a destination refused a result for good). Its SOP Instance
UID is the key: the same instance arriving again is counted in ``duplicates``, never classified
again. A delivery is ``pending`` (``next_try_at``), ``sent`` or ``failed``.

WAL journal with ``synchronous=FULL``: a commit survives a crash or a power cut. The node holds
one connection, used under a lock (a few rows per image); the worklist reads through its own
read-only connections (:func:`open_read_only`).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("received", "classified", "sent", "failed")
MAX_ATTEMPTS = 3  # classification runs an instance may start; a node that dies on it each time gives up

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_instance_uid TEXT PRIMARY KEY,
  sop_class_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL,
  calling_ae TEXT NOT NULL,
  peer TEXT NOT NULL,
  modality TEXT NOT NULL,
  patient_id TEXT NOT NULL,
  accession TEXT NOT NULL,
  path TEXT NOT NULL,
  size INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('received', 'classified', 'sent', 'failed')),
  attempts INTEGER NOT NULL DEFAULT 0,
  duplicates INTEGER NOT NULL DEFAULT 0,
  received_at REAL NOT NULL,
  classified_at REAL,
  sent_at REAL,
  updated_at REAL NOT NULL,
  row TEXT,
  sr_path TEXT NOT NULL DEFAULT '',
  sc_path TEXT NOT NULL DEFAULT '',
  thumb_path TEXT NOT NULL DEFAULT '',
  heat_path TEXT NOT NULL DEFAULT '',
  error TEXT NOT NULL DEFAULT '',
  purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_by_state ON instances (state, received_at);
CREATE INDEX IF NOT EXISTS instances_by_arrival ON instances (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
  sop_instance_uid TEXT NOT NULL REFERENCES instances (sop_instance_uid),
  destination TEXT NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('sr', 'sc')),
  object_uid TEXT NOT NULL,
  path TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
  attempts INTEGER NOT NULL DEFAULT 0,
  next_try_at REAL NOT NULL,
  sent_at REAL,
  error TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (sop_instance_uid, destination, kind)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_try_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Arrival:
    """An instance just spooled."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    calling_ae: str
    peer: str
    modality: str
    patient_id: str
    accession: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Pending:
    """An instance to classify."""

    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class Delivery:
    """A result object to store to a destination."""

    sop_instance_uid: str
    destination: str
    kind: str  # 'sr' or 'sc'
    object_uid: str
    path: str
    attempts: int


@dataclass(frozen=True)
class Outputs:
    """What classifying an instance produced, by path ('' for what it did not)."""

    sr_uid: str = ""
    sr_path: str = ""
    sc_uid: str = ""
    sc_path: str = ""
    thumb_path: str = ""
    heat_path: str = ""


class Ledger:
    """The node's read-write connection to its ledger."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        # Patient data: made 0600 before SQLite opens it (its -wal and -shm files get the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock, committed at the end of the block (rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def device_uid(self) -> str:
        """This node's own UID (made once, kept in the ledger): it identifies the node as the
        device that observed every report it writes."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'device_uid'").fetchone()
            if row:
                return row[0]
            value = f"2.25.{uuid.uuid4().int}"
            db.execute("INSERT INTO meta (key, value) VALUES ('device_uid', ?)", (value,))
            return value

    def known(self, sop_instance_uid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                                    (sop_instance_uid,)).fetchone() is not None

    def note_duplicate(self, sop_instance_uid: str) -> None:
        with self._write() as db:
            db.execute("UPDATE instances SET duplicates = duplicates + 1 WHERE sop_instance_uid = ?", (sop_instance_uid,))

    def add(self, arrival: Arrival) -> bool:
        """Record a received instance; False if it was there already."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, calling_ae, peer, "
                "modality, patient_id, accession, path, size, sha256, state, received_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?, ?) ON CONFLICT DO NOTHING",
                (arrival.sop_instance_uid, arrival.sop_class_uid, arrival.study_uid, arrival.series_uid,
                 arrival.calling_ae, arrival.peer, arrival.modality, arrival.patient_id, arrival.accession,
                 arrival.path, arrival.size, arrival.sha256, now, now))
            return cursor.rowcount == 1

    def spooled_bytes(self) -> int:
        """Bytes of received instances still in the spool."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM instances WHERE purged = 0").fetchone()[0]

    def paths(self) -> set[str]:
        """Spool paths of every instance in the ledger."""
        with self._lock:
            return {p for (p,) in self._db.execute("SELECT path FROM instances")}

    def claim(self, limit: int) -> tuple[list[Pending], list[str]]:
        """Up to ``limit`` received instances to classify, oldest first, each with one more attempt
        counted (committed before they are classified: a node that dies on an instance each time
        gives up on it); and the UIDs given up on now (failed after MAX_ATTEMPTS)."""
        now = time.time()
        with self._write() as db:
            rows = db.execute("SELECT sop_instance_uid, path, attempts FROM instances WHERE state = 'received' "
                              "ORDER BY received_at LIMIT ?", (limit,)).fetchall()
            claimed, given_up = [], []
            for uid, path, attempts in rows:
                if attempts >= MAX_ATTEMPTS:
                    db.execute("UPDATE instances SET state = 'failed', error = ?, updated_at = ? "
                               "WHERE sop_instance_uid = ?",
                               (f"not classified in {attempts} attempts (the node stopped, or could not record "
                                "the result, each time)", now, uid))
                    given_up.append(uid)
                else:
                    db.execute("UPDATE instances SET attempts = attempts + 1, updated_at = ? WHERE sop_instance_uid = ?",
                               (now, uid))
                    claimed.append(Pending(uid, path))
            return claimed, given_up

    def fail(self, sop_instance_uid: str, error: str, row: dict[str, Any] | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE instances SET state = 'failed', error = ?, row = COALESCE(?, row), updated_at = ? "
                       "WHERE sop_instance_uid = ?",
                       (error, None if row is None else json.dumps(row), time.time(), sop_instance_uid))

    def classified(self, sop_instance_uid: str, row: dict[str, Any], outputs: Outputs,
                   destinations: list[str]) -> None:
        """Record an instance's results and queue one delivery per destination and result object
        (none without destinations: the instance stays ``classified``)."""
        now = time.time()
        objects = [(kind, uid, path) for kind, uid, path in (("sr", outputs.sr_uid, outputs.sr_path),
                                                              ("sc", outputs.sc_uid, outputs.sc_path)) if path]
        with self._write() as db:
            db.execute("UPDATE instances SET state = 'classified', row = ?, sr_path = ?, sc_path = ?, thumb_path = ?, "
                       "heat_path = ?, classified_at = ?, updated_at = ?, error = '' WHERE sop_instance_uid = ?",
                       (json.dumps(row), outputs.sr_path, outputs.sc_path, outputs.thumb_path, outputs.heat_path,
                        now, now, sop_instance_uid))
            db.executemany("INSERT INTO deliveries (sop_instance_uid, destination, kind, object_uid, path, state, "
                           "next_try_at) VALUES (?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
                           [(sop_instance_uid, d, kind, uid, path, now) for d in destinations
                            for kind, uid, path in objects])

    def due(self, destination: str, limit: int) -> list[Delivery]:
        """Pending deliveries to ``destination`` whose time has come, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, destination, kind, object_uid, path, attempts FROM deliveries "
                "WHERE destination = ? AND state = 'pending' AND next_try_at <= ? ORDER BY next_try_at, rowid LIMIT ?",
                (destination, time.time(), limit)).fetchall()
        return [Delivery(*r) for r in rows]

    def next_due(self, destination: str) -> float | None:
        """When the next pending delivery to ``destination`` is due (None: none pending)."""
        with self._lock:
            (when,) = self._db.execute("SELECT MIN(next_try_at) FROM deliveries WHERE destination = ? "
                                       "AND state = 'pending'", (destination,)).fetchone()
        return when

    def delivered(self, delivery: Delivery) -> bool:
        """Mark a delivery sent; True if that made its instance ``sent`` (every delivery done)."""
        return self._settle(delivery, "sent", "")

    def refused(self, delivery: Delivery, error: str) -> bool:
        """Mark a delivery failed for good (and its instance); True (its instance is settled)."""
        return self._settle(delivery, "failed", error)

    def retry(self, delivery: Delivery, error: str, delay: float) -> None:
        with self._write() as db:
            db.execute("UPDATE deliveries SET attempts = attempts + 1, error = ?, next_try_at = ? "
                       "WHERE sop_instance_uid = ? AND destination = ? AND kind = ?",
                       (error, time.time() + delay, delivery.sop_instance_uid, delivery.destination, delivery.kind))

    def _settle(self, delivery: Delivery, state: str, error: str) -> bool:
        now = time.time()
        key = (delivery.sop_instance_uid, delivery.destination, delivery.kind)
        with self._write() as db:
            db.execute("UPDATE deliveries SET state = ?, error = ?, attempts = attempts + 1, sent_at = ? "
                       "WHERE sop_instance_uid = ? AND destination = ? AND kind = ?",
                       (state, error, now if state == "sent" else None, *key))
            if state == "failed":
                db.execute("UPDATE instances SET state = 'failed', error = ?, updated_at = ? WHERE sop_instance_uid = ?",
                           (f"{delivery.destination} refused the {delivery.kind.upper()}: {error}", now, key[0]))
                return True
            (left,) = db.execute("SELECT COUNT(*) FROM deliveries WHERE sop_instance_uid = ? AND state != 'sent'",
                                 (key[0],)).fetchone()
            if left == 0:
                db.execute("UPDATE instances SET state = 'sent', sent_at = ?, updated_at = ? "
                           "WHERE sop_instance_uid = ? AND state = 'classified'", (now, now, key[0]))
            return left == 0

    def finished_before(self, when: float) -> list[tuple[str, list[str]]]:
        """(UID, spooled files) of instances that are done with (sent, failed, or classified with
        nothing left to deliver) and arrived before ``when``, whose files are still kept."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, path, sr_path, sc_path, thumb_path, heat_path FROM instances i "
                "WHERE purged = 0 AND received_at < ? AND (state IN ('sent', 'failed') OR (state = 'classified' "
                "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sop_instance_uid = i.sop_instance_uid "
                "AND d.state = 'pending')))", (when,)).fetchall()
        return [(r[0], [p for p in r[1:] if p]) for r in rows]

    def purged(self, sop_instance_uid: str) -> None:
        with self._write() as db:
            db.execute("UPDATE instances SET purged = 1, updated_at = ? WHERE sop_instance_uid = ?",
                       (time.time(), sop_instance_uid))


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the ledger at ``path`` (for the worklist and checks)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def counts(db: sqlite3.Connection) -> dict[str, int]:
    """Instances per state (every state, 0 where none), and deliveries pending."""
    out = dict.fromkeys(STATES, 0)
    out.update(db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
    (out["deliveries_pending"],) = db.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()
    return out


def recent(db: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The ``limit`` latest arrivals, newest first."""
    return db.execute("SELECT * FROM instances ORDER BY received_at DESC LIMIT ?", (limit,)).fetchall()
