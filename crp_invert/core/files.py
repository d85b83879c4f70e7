"""Writing output files safely: through a temporary file in the same folder and a rename (a process killed
while writing leaves the old file or the new one, never half of one), with the permissions an ordinary new
file gets (``0o666`` less the umask; an existing file keeps its own)."""
from __future__ import annotations

import os
import stat
import tempfile
from os import PathLike
from pathlib import Path

__all__ = ["write_text_atomically", "write_bytes_atomically", "new_file_mode", "current_umask"]


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (the only portable way to read it)
    os.umask(mask)
    return mask


def new_file_mode(path: str | PathLike) -> int:
    """The permissions for writing ``path``: those of the existing file, else ``0o666`` less the umask."""
    try:
        info = os.stat(path)
    except OSError:
        return 0o666 & ~current_umask()
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else 0o666 & ~current_umask()


def write_bytes_atomically(path: str | PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename; the file gets
    :func:`new_file_mode` (``tempfile`` alone would leave it private, 0600).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_bytes_atomically(folder / "a.txt", b"hello")
    >>> (folder / "a.txt").read_bytes()
    b'hello'
    """
    path = Path(path)
    mode = new_file_mode(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomically(path: str | PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` like :func:`write_bytes_atomically`."""
    write_bytes_atomically(path, text.encode("utf-8"))
