"""The spool: the folder where the node keeps what it received and what it made, beside its
ledger (``ledger.sqlite3``)::

    in/<SOP Instance UID>.dcm        each instance as received (Part 10 file)
    out/<SOP Instance UID>.sr.dcm    its structured report
    out/<SOP Instance UID>.sc.dcm    its heatmap as a secondary-capture image
    pictures/<UID>.thumb.png, <UID>.heat.png   what the worklist shows

Every file is written by :func:`files.create`: a new, randomly named file beside its target,
synced, renamed over it and the folder synced, so a crash leaves the old file or the whole new
one, and a ``.*.tmp`` leftover that :meth:`Spool.open` removes. Folders are 0700 and files 0600:
they hold patient data. Names come from UIDs the node has checked (digits and dots only).
"""
from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..files import create

FILE_MODE = 0o600
LEDGER_NAME = "ledger.sqlite3"


class SpoolFull(OSError):
    """No room for an instance: the disk, the free-space reserve or the spool's cap; the
    message says which."""


@dataclass(frozen=True)
class Spool:
    """The spool folder and the room it must leave."""

    root: Path
    min_free_bytes: int
    max_bytes: int  # 0: no cap but the disk's

    @property
    def incoming(self) -> Path:
        return self.root / "in"

    @property
    def results(self) -> Path:
        return self.root / "out"

    @property
    def pictures(self) -> Path:
        return self.root / "pictures"

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_NAME

    def open(self) -> list[Path]:
        """Create the folders (0700) and remove files a crash left half-written; returns those."""
        left = []
        for folder in (self.root, self.incoming, self.results, self.pictures):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder is not self.root:
                for path in folder.glob(".*.tmp"):
                    path.unlink(missing_ok=True)
                    left.append(path)
        return left

    def check_room(self, size: int, spooled: int) -> None:
        """SpoolFull unless ``size`` more bytes fit: under the cap with the ``spooled`` bytes already
        kept, and leaving the free-space reserve on the disk."""
        if self.max_bytes and spooled + size > self.max_bytes:
            raise SpoolFull(errno.ENOSPC, f"the spool holds {spooled / 2**20:.0f} MiB; {size / 2**20:.1f} MiB more "
                                          f"would pass its {self.max_bytes / 2**20:.0f} MiB cap")
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        if free - size < self.min_free_bytes:
            raise SpoolFull(errno.ENOSPC, f"{free / 2**20:.0f} MiB free on the spool's disk; {size / 2**20:.1f} MiB "
                                          f"more would leave less than the {self.min_free_bytes / 2**20:.0f} MiB reserve")

    def instance_path(self, uid: str) -> Path:
        return self.incoming / f"{uid}.dcm"

    def result_path(self, uid: str, kind: str) -> Path:
        return self.results / f"{uid}.{kind}.dcm"

    def picture_path(self, uid: str, kind: str) -> Path:
        return self.pictures / f"{uid}.{kind}.png"

    def orphans(self, known: set[str]) -> list[Path]:
        """Spooled instances the ledger does not list (the node stopped between writing one and
        committing it, before acknowledging it)."""
        return sorted(p for p in self.incoming.glob("*.dcm") if str(p) not in known)


def write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` durably (see the module docstring); returns its sha256."""
    os.close(create(path, data, FILE_MODE))
    return hashlib.sha256(data).hexdigest()


def remove(paths: list[str]) -> None:
    """Delete spooled files (missing ones are fine)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)
