"""Advisory locks of the files we write: a lock file next to the data file, held with ``flock``.

A writer holds ``FILE.lock`` exclusively, readers hold it shared while it exists. The kernel releases a
``flock`` when its process dies (``kill -9`` included), so a lock never outlives its holder; a lock file that
is left behind is taken over by the next writer, and removed when that writer closes. A second writer, or a
reader while a writer is at work, is refused with :class:`FileInUseError` ("in use by another process")
instead of both corrupting the file or the reader reporting a half-written file as damaged.

Within one process, locks of the same file are counted (HDF5 itself arbitrates between handles of one
process, with its own errors).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["FileInUseError", "FileLock", "lock_path"]

# lock file -> [fd, exclusive, count] of the locks this process holds
_HELD: dict[str, list] = {}


class FileInUseError(ValueError):
    """The file is locked by another process (recording into it, or reading it while we want to write)."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``FILE.lock`` next to the real file (symbolic links resolved)."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class FileLock:
    """An exclusive (writer) or shared (reader) lock of ``path``; :meth:`release` is idempotent.

    Parameters
    ----------
    path : str or os.PathLike
        The data file (the lock file is :func:`lock_path` of it).
    exclusive : bool
        True for a writer: refused if another process writes or reads the file. False for a reader: refused
        only if another process writes it; a reader never creates a lock file.

    Raises
    ------
    FileInUseError
        Another process holds a conflicting lock.
    ValueError
        A writer cannot create the lock file (read-only folder).
    """

    def __init__(self, path: str | os.PathLike, exclusive: bool) -> None:
        self.path = Path(path)
        self.lock_file = lock_path(path)
        self.exclusive = bool(exclusive)
        self._key: str | None = None
        key = str(self.lock_file)
        held = _HELD.get(key)
        if held is not None:  # this process holds it already: HDF5 arbitrates between our own handles
            held[2] += 1
            self._key = key
            return
        fd = self._acquire()
        if fd is not None:
            _HELD[key] = [fd, self.exclusive, 1]
            self._key = key

    def _acquire(self) -> int | None:
        for _ in range(16):  # retried only when another process removed the lock file under us
            try:
                if self.exclusive:
                    fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                else:
                    fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if self.exclusive:
                    raise ValueError(f"cannot create the lock file {str(self.lock_file)!r}: no such folder") from None
                return None  # no lock file: no writer
            except OSError as error:
                if self.exclusive:
                    raise ValueError(
                        f"cannot create the lock file {str(self.lock_file)!r} next to {str(self.path)!r}: "
                        f"{error.strerror}; the folder must be writable to record into it"
                    ) from None
                return None  # unreadable lock file: leave the arbitration to HDF5's own lock
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as error:
                holder = _holder(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    doing = "which is writing it" if not self.exclusive else "which is writing or reading it"
                    raise FileInUseError(
                        f"{str(self.path)!r} is in use by another process{holder}, {doing}; wait for it to "
                        "finish, or stop it"
                    ) from None
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    return None  # a file system without flock: no lock
                raise
            if _same_file(fd, self.lock_file):
                if self.exclusive:
                    try:  # who holds it, for the message of the next one (best effort: a full disk is no reason)
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
                    except OSError:
                        pass
                return fd
            os.close(fd)  # the previous holder removed the file between our open and flock
            if not self.exclusive:
                return None
        raise FileInUseError(f"{str(self.path)!r}: could not take its lock file; another process keeps replacing it")

    @property
    def held(self) -> bool:
        """Whether this object still holds (a count of) the lock."""
        return self._key is not None

    def release(self) -> None:
        """Drop the lock (the last writer's release also removes the lock file)."""
        key, self._key = self._key, None
        if key is None:
            return
        held = _HELD[key]
        held[2] -= 1
        if held[2] > 0:
            return
        del _HELD[key]
        fd, exclusive = held[0], held[1]
        try:
            if exclusive and _same_file(fd, self.lock_file):
                os.unlink(self.lock_file)  # while still holding it: a newcomer then creates a fresh one
        except OSError:
            pass
        finally:
            os.close(fd)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.release()
        except Exception:
            pass
