"""The run's folder: checked writable and locked while a run uses it.

The lock is ``flock`` on the folder itself (no lock file): the kernel drops it when
the process ends, however it ends (``kill -9`` included), so nothing stale is ever
left behind. A second run on a locked workdir fails at once naming the holder's
pid (read from ``/proc/locks`` on Linux).

Several processes of one multi-host job share the workdir by design: process 0
takes the lock for the job and tells the others whether it got it, so either the
whole job runs or the whole job stops. The lock protects against a second *job*
on the same folder; it is only as good as ``flock`` on the file system (local
file systems; on NFS it depends on the mount).
"""

from __future__ import annotations

import errno
import fcntl
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["WorkdirError", "WorkdirLock", "has_checkpoint"]


class WorkdirError(ValueError):
    """The workdir cannot be used: not a folder, not writable, or locked by another run."""


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds at least one finalised checkpoint."""
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def _holder_pid(fd: int) -> str | None:
    """The pid holding a ``flock`` on ``fd``'s inode, from ``/proc/locks`` (Linux)."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            return fields[4]
    return None


def _check_folder(workdir: str) -> bool:
    """Creates ``workdir`` if needed; returns whether it was created. Raises WorkdirError."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder; pick another --workdir")
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir={workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(
            f"--workdir={workdir} is not writable (a run writes its checkpoints, metrics and "
            "summary there); fix its permissions or pick another --workdir"
        )
    return created


class WorkdirLock:
    """Context manager: checks ``workdir``, creates it if needed and locks it for this run.

    Every process of a job enters it; process 0 locks, and all processes agree on
    the outcome. A folder this run created and left empty (it failed before
    writing anything) is removed on exit.

    Raises:
      WorkdirError: not a folder, not writable, or locked by another run.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> WorkdirLock:
        problem = None
        if jax.process_index() == 0:
            try:
                self._created = _check_folder(self.workdir)
                self._lock()
            except WorkdirError as e:
                problem = str(e)
        if jax.process_count() > 1:
            failed = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
            if int(failed) and problem is None:
                problem = f"process 0 could not use --workdir={self.workdir} (see its error)"
        if problem is not None:
            self._release()
            raise WorkdirError(problem)
        return self

    def _lock(self) -> None:
        self._fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = _holder_pid(self._fd)
            holder = f"pid {pid}" if pid else "another process"
            raise WorkdirError(
                f"--workdir={self.workdir} is in use by another run ({holder}); wait for it to "
                "end, or use another --workdir"
            ) from None

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
        if self._created:
            try:
                os.rmdir(self.workdir)  # only succeeds if this run left it empty
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        self._release()
