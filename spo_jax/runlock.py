"""One run per run directory: ``<run_dir>/run.lock``.

``RunLock(run_dir).acquire()`` is taken by ``spo_jax.train.train`` before anything is written
to the run directory and released when the run ends (its file removed). The file holds who
has it (pid, host, start time) and is ``fcntl.flock``-ed while held, so a process that dies
(SIGKILL, power loss) releases it with its file descriptors: a lock file that is present but
not locked is stale, and is taken over with a warning naming its old holder. A second run
on a held directory raises ``RunLocked`` (a config error: exit 2) naming the holder.

Multi-host: the lock is process 0's (the directory is shared); the other processes learn
from it whether the run may go on.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from spo_jax.validation import ConfigError

__all__ = ["RunLocked", "RunLock", "lock_run_dir", "LOCK_NAME"]

logger = logging.getLogger("spo_jax.runlock")

LOCK_NAME = "run.lock"


class RunLocked(ConfigError):
    """Another live process holds the run directory."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (unreadable lock file)"


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(os.path.expanduser(run_dir))
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        os.makedirs(self.run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                with open(self.path, errors="replace") as f:
                    holder = _holder(f.read())
                raise RunLocked(
                    f"config.run_dir={self.run_dir!r} is in use by another run: {holder} holds {self.path}; wait "
                    "for it to end (or stop it), or use another run_dir") from None
            try:  # the holder may have released and removed the file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.read(fd, 4096).decode(errors="replace").strip()
        if old:
            logger.warning("run_dir %s: took over the stale lock of %s, which is gone (it did not end cleanly)",
                           self.run_dir, _holder(old))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def lock_run_dir(run_dir: str, *, is_main: bool, agree) -> RunLock | None:
    """Process 0 takes the lock; ``agree(ok) -> bool`` (every process's vote) tells the others
    whether it did. Returns the held lock on process 0, None elsewhere."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as e:
            error = e
    if not agree(error is None):
        if lock is not None:
            lock.release()
        raise error or RunLocked(f"config.run_dir={run_dir!r} is in use by another run (process 0 could not "
                                 "lock it; its message names the holder)")
    return lock
