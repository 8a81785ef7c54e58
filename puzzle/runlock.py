"""One puzzle command at a time per run directory.

Two commands on one run directory at once (a second `puzzle fuse` of the same child, `puzzle front` while `puzzle
refine` writes the front rows) can overwrite each other's files and time their models against each other's load.
`run_lock` holds exclusive `flock`s for the duration of a command and refuses a second one, naming the first.

Two locks, both released by the kernel when their process ends, however it ends (no stale lock after a kill):
  * the folder's own: an flock on the run directory itself, when it exists, so its spellings, a rename, another
    user and another TMPDIR (a batch job's) all meet the same lock;
  * the path's: an flock on <tmp>/puzzle-locks-<uid>/<sha256 of the resolved path>.lock, which holds for a run
    directory the command has yet to create and records the holder's pid, command line, folder and start time for
    the refusal. Its folder must be this user's and closed to others (else it is not used, with a warning), the file
    is opened without following a link, and the holder removes it when done (a taker checks that the file it
    locked is still the one at the path, so two commands cannot lock different files of one name).

Processes of one torchrun job (WORLD_SIZE above 1) share their run directory by design: rank 0 takes the locks for
the job, the other ranks none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shlex
import stat
import sys
import tempfile
import time
from pathlib import Path

from .errors import PuzzleError

_HELD: set[bytes] = set()  # run directories this process holds (a command run inside another takes no second lock)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:  # torchrun sets whole numbers; anything else is no torchrun job
        return default


def takes_lock() -> bool:
    """Whether this process locks its run directory: yes outside torchrun, and rank 0 of a torchrun job."""
    return _env_int("WORLD_SIZE", 1) <= 1 or _env_int("RANK", 0) == 0


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The path lock's file of `run_dir` (which need not exist yet)."""
    key = hashlib.sha256(os.fsencode(Path(run_dir).expanduser().resolve())).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"puzzle-locks-{os.getuid()}" / f"{key}.lock"


def _warn(out, why: str) -> None:
    print(f"puzzle: warning: {why}, so {out} is not locked against a second puzzle command working there at the "
          f"same time", file=sys.stderr)


def _refuse(out, holder: str) -> PuzzleError:
    return PuzzleError(f"another puzzle command is working on {out}: {holder}. Two commands on one --out at once "
                       f"can overwrite each other's files and time their models under each other's load; wait for it "
                       f"to finish (or stop it), or give another --out")


def _private_folder(folder: Path) -> bool:
    """Create `folder` (mode 0700) if needed; whether it is a real folder of this user that no one else can write."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _take_path_lock(resolved: Path, out) -> int | None:
    """The locked path-lock file's descriptor (None where no lock file can be used: warned).

    Raises:
        PuzzleError: another process holds it (the message names that command).
    """
    path = lock_path(resolved)
    try:
        if not _private_folder(path.parent):
            _warn(out, f"{path.parent} is not a folder of this user closed to others")
            return None
        for _ in range(100):  # a holder may remove the file between our open and our lock: open again
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise _refuse(out, holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise OSError(errno.EAGAIN, "the lock file kept being replaced", str(path))
    except OSError as e:
        _warn(out, f"its lock file {path} cannot be used ({e.strerror or e})")
        return None


@contextlib.contextmanager
def _path_lock(resolved: Path, out):
    """Hold the path lock while the block runs; yields its descriptor or None (`_take_path_lock`)."""
    fd = _take_path_lock(resolved, out)
    if fd is None:
        yield None
        return
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path(resolved))  # while still locked: a taker that opened it finds it gone, opens again
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(resolved: Path, out):
    """Hold an flock on the run directory itself, where it is an existing folder."""
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not made yet, or a file (eval --out x.csv): the path lock alone
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(out, "a command that reached this folder by another path (before a rename), as another "
                               "user or with another TMPDIR (a batch job's)") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike | None, argv=None):
    """Hold the run directory's locks while the block runs.

    Args:
        run_dir: the command's --out, or None (nothing to lock).
        argv: the command line recorded for a refused command's message (default: sys.argv).

    Raises:
        PuzzleError: another process holds a lock (its message names that command where it can).
    """
    if run_dir is None or not takes_lock():
        yield
        return
    resolved = Path(run_dir).expanduser().resolve()
    key = os.fsencode(resolved)
    if key in _HELD:
        yield
        return
    with _path_lock(resolved, run_dir) as fd, _folder_lock(resolved, run_dir):
        if fd is not None:
            words = shlex.join(str(a) for a in (sys.argv if argv is None else argv))
            with contextlib.suppress(OSError):
                where = f" in {os.getcwd()}"
                note = f"pid {os.getpid()}, `{words}`{where}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                os.pwrite(fd, note.encode("utf-8", "backslashreplace"), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
