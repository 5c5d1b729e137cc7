"""What ``classify`` shows a person: text made safe for a terminal, and progress on stderr.

File names come from whoever filled the folder. Printed as they are, a name can clear the
screen, recolour or rewrite earlier lines (ANSI escape sequences), break a line, or crash the
print (bytes that are not UTF-8). :func:`printable` escapes all of that.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import typer

PROGRESS_EVERY_FILES = 500  # without a terminal: a progress line every this many files ...
PROGRESS_EVERY_SECONDS = 30.0  # ... or this many seconds, whichever comes first


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on or cannot show escaped: control
    characters (ESC, CR, LF, tab, DEL, C1) as ``\\xNN``, other unprintable characters (such as
    bidirectional overrides) as ``\\uNNNN``, and bytes of a file name that are not UTF-8 (held
    as surrogate escapes) as ``\\xNN``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def say(message: str, err: bool = False) -> None:
    """Print one line, escaped with :func:`printable`."""
    typer.echo(printable(message), err=err)


class Progress:
    """Files done so far, on stderr: a bar (with its ETA) on a terminal; otherwise (systemd, cron,
    a pipe) a plain line with the rate and the time left every PROGRESS_EVERY_FILES files or
    PROGRESS_EVERY_SECONDS seconds and one at the end; nothing when ``hidden``."""

    def __init__(self, total: int, hidden: bool = False, stream: TextIO | None = None):
        self.total, self.done, self.failed = total, 0, 0
        self.stream = stream or sys.stderr
        self.hidden = hidden or total == 0
        self.tty = not self.hidden and self.stream.isatty()
        self.bar = typer.progressbar(length=total, label="classifying", file=self.stream) if self.tty else None
        self.start = self.last_time = time.monotonic()
        self.last_done = 0

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif not self.hidden and exc[0] is None:
            self._line()

    def update(self, files: int, failed: int = 0) -> None:
        self.done += files
        self.failed += failed
        if self.bar is not None:
            self.bar.update(files)
        elif not self.hidden and (self.done - self.last_done >= PROGRESS_EVERY_FILES
                                  or time.monotonic() - self.last_time >= PROGRESS_EVERY_SECONDS):
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        rate = self.done / (now - self.start) if now > self.start else 0.0
        left = self.total - self.done
        eta = f", about {duration(left / rate)} left" if left and rate > 0 else ""
        print(f"classifying: {self.done}/{self.total} files, {self.failed} failed, {rate:.1f} images/s{eta}",
              file=self.stream, flush=True)
        self.last_time, self.last_done = now, self.done


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"
