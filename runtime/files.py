"""Read and write files without being led astray by what sits at their names.

Only regular files are read: a FIFO would block forever, a device can have side effects when
opened (a tape rewinds, a watchdog arms) and a socket cannot be read at all. The kind is checked
before opening, the file is opened non-blocking (so a FIFO swapped in meanwhile cannot block) and
checked again on the open descriptor, and at most the size it had when opened is read.

Files are written only as new, randomly named files (``mkstemp``: O_EXCL, never an existing file
or a planted link) beside their target, synced, then renamed over it (``create``,
``write_atomic``): a reader sees the old file or the whole new one, and a symbolic link at the
target name is replaced, never written through.
"""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"))


class NotRegularFile(OSError):
    """The name is a FIFO, socket, device, folder (or, not following links, a symbolic link)."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"not a regular file ({kind})")
        self.path, self.kind = os.fspath(path), kind


class FileTooLarge(OSError):
    """The file is larger than the caller's limit."""

    def __init__(self, path: str | os.PathLike, size: int):
        super().__init__(f"file is {size} bytes")
        self.path, self.size = os.fspath(path), size


def kind_of(mode: int) -> str:
    """'regular file', 'FIFO', 'socket', 'character device', 'block device', 'folder', ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def read_regular(path: str | os.PathLike, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """All bytes of the regular file at ``path``; FileTooLarge if it has more than ``limit``."""
    with _open_regular(path, follow_symlinks) as (fd, size):
        if size > limit:
            raise FileTooLarge(path, size)
        return _read(fd, size)


def read_head(path: str | os.PathLike, n: int) -> bytes:
    """The first ``n`` bytes (fewer if the file is shorter) of the regular file at ``path``."""
    with _open_regular(path, True) as (fd, size):
        return _read(fd, min(n, size))


@contextmanager
def _open_regular(path: str | os.PathLike, follow_symlinks: bool) -> Iterator[tuple[int, int]]:
    """(descriptor, size) of a regular file; NotRegularFile for anything else, other OSErrors
    (FileNotFoundError, PermissionError, ...) as os.open raises them."""
    mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, kind_of(mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the check and the open
            raise NotRegularFile(path, kind_of(st.st_mode))
        yield fd, st.st_size
    finally:
        os.close(fd)


def _read(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``fd`` (fewer if the file shrank meanwhile). Each read asks for
    all that is left, so a file that comes at once is one read and no copy (``join`` returns a
    lone chunk as it is)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def new_file_mode() -> int:
    """The mode an ordinary new file gets here (0666 less the umask); mkstemp's is 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def create(path: Path, data: bytes, mode: int) -> int:
    """Write ``data`` to a new, randomly named file beside ``path`` (O_EXCL: never an existing
    file or link), sync it, rename it over ``path`` and return its open descriptor."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with a file holding ``data`` (see the module docstring)."""
    os.close(create(Path(path), data, new_file_mode()))
