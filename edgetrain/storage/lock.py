"""Advisory file locks (`fcntl.flock`): the run-directory lock and the writer lock of a
shared file (a data pack, a cache) that must be written once.

A lock is the kernel's, held by an open file description: it is released when its holder
exits, however it exits (SIGKILL included), so a lock left by a dead process is simply
taken over; no PID is ever polled. The PID written into the file is only there to be
named in the refusal. This file knows nothing about runs or regimes.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from edgetrain.errors import UserError


class FileLock:
    """An exclusive `flock` on `path` (created if absent), with the holder's PID in it.

    `acquire(wait=False)` raises `Held` when another live process holds it; `wait=True`
    blocks until it is free (two writers of one pack: the second waits, then finds the
    pack written). `release` unlinks the file while still holding the lock; an acquirer
    that locked a file which was unlinked meanwhile retries on the new one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool = False) -> "FileLock":
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Held(self.path, holder_pid(self.path)) from None
                raise
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # the previous holder unlinked it between our open and our flock
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Held(UserError):
    """The lock is held by another live process (`pid`, None when unreadable)."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = Path(path), pid
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{self.path} is held by {who}")


def holder_pid(path: Path) -> int | None:
    """The PID written in a lock file (None if absent or unreadable)."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def lock_run_dir(run_dir: Path) -> FileLock:
    """Take RUN_DIR/lock for this process (the run directory must exist).

    Raises:
        UserError: a live process holds the run; the message names its PID.
    """
    try:
        return FileLock(Path(run_dir) / "lock").acquire(wait=False)
    except Held as e:
        who = f"process {e.pid}" if e.pid is not None else "another process"
        raise UserError(f"{run_dir} is in use by {who} (RUN_DIR/lock): wait for it to end, "
                        f"or stop it (kill {e.pid if e.pid is not None else 'PID'}) first") from None
    except OSError as e:
        raise UserError(f"cannot lock {run_dir}: {e.strerror or e}") from None
