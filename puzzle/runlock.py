"""One puzzle command at a time per run directory.

Two commands on one run directory at once (a second `puzzle fuse` of the same child, `puzzle front` while `puzzle
refine` writes the front rows) can overwrite each other's files and time their models against each other's load.
`run_lock` holds `flock`s for the duration of a command and refuses a second one, naming the first.

Two locks, both released by the kernel when their process ends, however it ends (no stale lock after a kill):
  * the folder's own: an flock on the run directory itself, so its spellings, a rename, another user and another
    TMPDIR (a batch job's) all meet the same lock; a command that makes the folder takes it then (`claim_folder`,
    from `pipeline.Run` and `puzzle rpo`);
  * the path's: an flock on <tmp>/puzzle-locks-<uid>/<sha256 of the resolved path>.lock, which holds for a run
    directory still to be made and records the holder's pid, command line, folder and start time for the refusal.
    Its folder must be this user's and closed to others (else it is not used, with a warning), the file is opened
    without following a link, and its last holder removes it when done (a killed one's stays, unlocked; a taker
    checks that the file it locked is still the one at the path, so two commands cannot lock different files of one
    name).

gkd and sft take them shared: several run side by side (one per GPU), but not beside a command that takes them
whole; each also locks its work and export folders whole (`also_lock`), so one model is not trained twice at once,
as `puzzle export --dest` and `puzzle merge` lock theirs (two runs' exports to one folder: one removed the other's
half-written files).
Processes of one torchrun job (WORLD_SIZE above 1) share their run directory by design: RANK 0 takes the locks for
the job, and a process with another RANK none; only bld, gkd and sft run as one of several processes, the other
commands refuse WORLD_SIZE above 1 (`cli._one_process_refusal`: a shell with those variables left set included).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shlex
import stat
import sys
import tempfile
import time
from pathlib import Path

from .errors import PuzzleError

_HELD: dict[bytes, "_Hold"] = {}  # run directories this process holds (a nested command takes no second lock)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:  # torchrun sets whole numbers; anything else is no torchrun job
        return default


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 where it is unset or no whole number (no torchrun job)."""
    return _env_int("WORLD_SIZE", 1)


def takes_lock() -> bool:
    """Whether this process locks its run directory: yes outside torchrun, and rank 0 of a torchrun job."""
    return env_world_size() <= 1 or _env_int("RANK", 0) == 0


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The path lock's file of `run_dir` (which need not exist yet)."""
    key = hashlib.sha256(os.fsencode(Path(run_dir).expanduser().resolve())).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"puzzle-locks-{os.getuid()}" / f"{key}.lock"


RUN_ADVICE = ("Two commands on one --out at once can overwrite each other's files and time their models under each "
              "other's load; wait for it to finish (or stop it), or give another --out")


def _refuse(out, holder: str, advice: str = RUN_ADVICE) -> PuzzleError:
    return PuzzleError(f"another puzzle command is working on {out}: {holder}. {advice}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _holders(notes: bytes) -> str:
    """The lock file's notes of processes still alive (shared holders append one each; a killed one's stays)."""
    lines = [x.strip() for x in notes.decode("utf-8", "replace").splitlines() if x.strip()]
    live = [x for x in lines if not re.match(r"pid \d+,", x) or _alive(int(x.split(",")[0][4:]))]
    return " and ".join(live) or "another process"


def _private_folder(folder: Path) -> bool:
    """Create `folder` (mode 0700) if needed; whether it is a real folder of this user that no one else can write."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


class _Hold:
    """The locks one `run_lock` holds on one run directory."""

    def __init__(self, resolved: Path, out, shared: bool, advice: str = RUN_ADVICE):
        self.resolved, self.out, self.shared, self.advice = resolved, out, shared, advice
        self.mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        self.path_fd: int | None = None
        self.folder_fd: int | None = None

    def take_path_lock(self, note: str) -> None:
        """Lock the path lock's file and write `note` in it (none where it cannot be used: warned).

        Raises:
            PuzzleError: another process holds it (the message names that command).
        """
        path = lock_path(self.resolved)
        try:
            if not _private_folder(path.parent):
                self._warn(f"{path.parent} is not a folder of this user closed to others")
                return
            for _ in range(100):  # a holder may remove the file between our open and our lock: open again
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, self.mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holders(os.pread(fd, 65536, 0))
                    os.close(fd)
                    raise _refuse(self.out, holder, self.advice) from None
                except BaseException:
                    os.close(fd)
                    raise
                try:
                    same = os.fstat(fd).st_ino == os.lstat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.path_fd = fd
                    break
                os.close(fd)
            else:
                raise OSError(errno.EAGAIN, "the lock file kept being replaced", str(path))
        except OSError as e:
            self._warn(f"its lock file {path} cannot be used ({e.strerror or e})")
            return
        with contextlib.suppress(OSError):  # the note is for a refused command's message only
            data = note.encode("utf-8", "backslashreplace").replace(b"\n", b" ") + b"\n"
            if self.shared:  # one line per holder, appended (a refusal names the live ones)
                append = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                try:
                    os.write(append, data)
                finally:
                    os.close(append)
            else:
                os.ftruncate(self.path_fd, 0)  # a killed holder's longer note must not show through
                os.pwrite(self.path_fd, data, 0)

    def take_folder_lock(self) -> None:
        """Lock the run directory itself, where it is an existing folder (not yet made, or a file such as eval's
        --out x.csv: the path lock alone, until `claim_folder`).

        Raises:
            PuzzleError: another process holds it.
        """
        try:
            fd = os.open(self.resolved, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            fcntl.flock(fd, self.mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self.path_fd is None:
                raise _refuse(self.out, "a command this one cannot name, as its lock file could not be used (see the "
                                        "warning above)", self.advice) from None
            raise _refuse(self.out, "a command that reached this folder by another path (before a rename), as "
                                    "another user or with another TMPDIR (a batch job's)", self.advice) from None
        except OSError as e:  # a file system without flock on folders (e.g. Lustre mounted without -o flock)
            os.close(fd)
            if self.path_fd is None:
                self._warn(f"it cannot be locked ({e.strerror or e})", alone=False)
            return
        self.folder_fd = fd

    def release(self) -> None:
        if self.folder_fd is not None:
            os.close(self.folder_fd)
            self.folder_fd = None
        if self.path_fd is None:
            return
        with contextlib.suppress(OSError):
            if self.shared:  # remove the file only if no other shared holder has it (the conversion may fail)
                fcntl.flock(self.path_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(lock_path(self.resolved))  # still locked: a taker that opened it finds it gone, opens again
        os.close(self.path_fd)
        self.path_fd = None

    def _warn(self, why: str, alone: bool = True) -> None:
        then = (", so a second command there is refused by the lock on the folder alone, without its details, and "
                "not before the folder is made") if alone else ", so it is not locked against a second command"
        print(f"puzzle: warning: {self.out}: {why}{then}", file=sys.stderr)


def claim_folder(run_dir: str | os.PathLike) -> None:
    """Lock a run directory the running command has just made (its `run_lock` began before it existed).

    Raises:
        PuzzleError: another process made it and holds it (by another path, user or TMPDIR).
    """
    hold = _HELD.get(os.fsencode(Path(run_dir).expanduser().resolve()))
    if hold is not None and hold.folder_fd is None:
        hold.take_folder_lock()


WORK_ADVICE = ("One training per work folder and export folder at a time: wait for it to finish (or stop it); to "
               "train the same model again beside it, give another --work and another --dest")
EXPORT_ADVICE = ("One export per folder at a time (the second would write over the first, or remove its files "
                 "half-written): wait for it to finish (or stop it), or give another --dest")
_EXTRA: list[bytes] = []  # folders `also_lock` holds until the command's `run_lock` ends
_COMMAND: list = []  # the command line of the innermost `run_lock`, which `also_lock` records too


def also_lock(folder: str | os.PathLike, advice: str) -> None:
    """Hold an exclusive lock on one more folder (a training's work folder or export) until the command ends: the end
    of the `run_lock` around it (`cli.main` opens one for every command), else the process's.

    Args:
        folder: the folder (need not exist yet).
        advice: what a refused command is told to do.

    Raises:
        PuzzleError: another process holds it.
    """
    if (key := _take(folder, _COMMAND[-1] if _COMMAND else sys.argv, advice=advice)) is not None:
        _EXTRA.append(key)


def _take(folder, argv, shared: bool = False, advice: str = RUN_ADVICE) -> bytes | None:
    """Lock `folder` for this process (`_Hold`); its key in `_HELD`, or None where this process takes no lock on it
    (no folder, a rank that takes none, or one this process holds already).

    Raises:
        PuzzleError: another process holds it.
    """
    if folder is None or not takes_lock():
        return None
    resolved = Path(folder).expanduser().resolve()
    key = os.fsencode(resolved)
    if key in _HELD:
        return None
    hold = _Hold(resolved, folder, shared, advice)
    try:
        hold.take_path_lock(_note(argv))
        hold.take_folder_lock()
    except BaseException:
        hold.release()
        raise
    _HELD[key] = hold
    return key


def _note(argv) -> str:
    words = shlex.join(str(a) for a in argv)
    try:
        where = f" in {os.getcwd()}"
    except OSError:  # the working folder was removed
        where = ""
    return f"pid {os.getpid()}, `{words}`{where}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike | None, argv=None, shared: bool = False):
    """Hold the run directory's locks while the block runs.

    Args:
        run_dir: the command's --out, or None (nothing to lock).
        argv: the command line recorded for a refused command's message (default: sys.argv).
        shared: take the locks shared: other shared holders may work beside it (gkd and sft, each training one
            child into its own folders), no exclusive one.

    Raises:
        PuzzleError: another process holds a lock (its message names that command where it can).
    """
    extra = len(_EXTRA)
    argv = sys.argv if argv is None else argv
    key = _take(run_dir, argv, shared)
    _COMMAND.append(argv)
    try:
        yield
    finally:
        _COMMAND.pop()
        while len(_EXTRA) > extra:  # what `also_lock` took meanwhile (with or without a run directory)
            _HELD.pop(_EXTRA.pop()).release()
        if key is not None:
            _HELD.pop(key).release()
