"""One puzzle command at a time per run directory.

Two commands on one run directory at once (a second `puzzle fuse` of the same child, `puzzle front` while `puzzle
refine` writes the front rows) can overwrite each other's files and time their models against each other's load.
`run_lock` holds an exclusive `flock` for the duration of a command and refuses a second one with the first one's
command line and start time.

The lock file lives outside the run directory (in the temporary folder, one per user, named by a hash of the run
directory's resolved path), so a refused or finished command leaves the run directory as it was, and it is never
deleted, so two commands cannot each lock a different file of the same name. The kernel releases a `flock` when its
process ends, however it ends, so a killed command leaves no stale lock. Processes of one torchrun job (WORLD_SIZE
above 1) share their run directory by design and take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .errors import PuzzleError

_HELD: set[str] = set()  # run directories this process holds (a command run inside another takes no second lock)


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of `run_dir` (which need not exist yet): <tmp>/puzzle-locks-<uid>/<sha256 of its path>.lock."""
    key = hashlib.sha256(str(Path(run_dir).expanduser().resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"puzzle-locks-{os.getuid()}" / f"{key}.lock"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike | None, argv=None):
    """Hold the run directory's lock while the block runs.

    Args:
        run_dir: the command's --out folder, or None (nothing to lock).
        argv: the command line recorded for a refused command's message (default: sys.argv).

    Raises:
        PuzzleError: another process holds the lock (its message names that command and when it started).
    """
    if run_dir is None or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        yield
        return
    resolved = str(Path(run_dir).expanduser().resolve())
    if resolved in _HELD:
        yield
        return
    path = lock_path(resolved)
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # no writable temporary folder: run unlocked rather than not at all
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise PuzzleError(f"another puzzle command is working on {run_dir}: {holder}. Two commands on one run "
                              f"directory at once can overwrite each other's files; wait for it to finish (or stop "
                              f"it), or give another --out") from None
        words = shlex.join(str(a) for a in (sys.argv if argv is None else argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `{words}`, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        _HELD.add(resolved)
        try:
            yield
        finally:
            _HELD.discard(resolved)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)
