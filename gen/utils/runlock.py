"""One run folder, one writer: an advisory lock on ``<run folder>/.lock`` that the kernel drops when its process ends.

Two identical ``train.py`` commands started at once would both resume from the same state and interleave their
``stats.jsonl`` and training states. The first takes the lock; the second stops with one line naming the holder.
A crashed or killed run leaves the file but not the lock (``flock`` locks belong to open files, which the kernel
closes with the process), so re-running after a crash is never blocked. Where the file system has no ``flock``
(some network file systems) or the platform has no ``fcntl`` (Windows), the run goes on unlocked and says so.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
from pathlib import Path
from typing import IO

from gen.utils.cli import CommandError, printable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class RunFolderBusy(CommandError):
    """Another process holds the run folder's lock; the message names it and the way out."""


class RunFolderLock:
    """Held from construction until ``release()`` (or the end of the process).

    Raises:
        RunFolderBusy: another process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike, command: str = "train.py") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.file: IO[str] | None = None
        self.note = ""
        if fcntl is None:
            self.note = f"no lock on {printable(self.path.parent)} (this platform has no flock)"
            return
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise RunFolderBusy(
                f"{printable(self.path.parent)} is being written by another run ({holder}); wait for it to end, or "
                "give this run another name=... (one run folder takes one writer at a time)"
            ) from None
        except OSError as e:
            f.close()
            if e.errno not in _NO_LOCKS:
                raise
            self.note = f"no lock on {printable(self.path.parent)} (its file system has no flock)"
            return
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(f"{command}, pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays, empty of meaning until the next holder writes its name."""
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
