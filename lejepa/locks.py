"""Advisory locks held by the live process: one writer per run folder and per sweep name.

``flock`` on a small lock file: the kernel releases it when the holding process dies, however it
dies (SIGKILL, a lost node), so a lock can never be left stale; the file keeps the holder's pid
for the message. Only POSIX systems take the lock (elsewhere nothing is locked).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from lejepa.errors import ConfigError


class ProcessLock:
    """An exclusive lock on ``path`` for the life of this object (or of the process)."""

    def __init__(self, path: Path, what: str, remove: bool = False) -> None:
        self.path, self.what, self.remove = Path(path), what, remove
        self._file: IO[str] | None = None

    def acquire(self) -> ProcessLock:
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(
                f"{self.what} is in use by another process (pid {holder}): wait for it to end or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            if self.remove:  # while still held: nobody else can be holding it
                self.path.unlink(missing_ok=True)
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> ProcessLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
