"""Atomic file writes and tidy tables with JSON sidecars.

Every long stage writes through these helpers so an interrupted run never leaves a half-written
file that a rerun would trust: data goes to a temporary file in the same folder, is flushed and
fsynced, then renamed over the target (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PuzzleError

if TYPE_CHECKING:  # pandas is imported where a table is read: the CLI's parser (`dir_arg`) starts without it
    import pandas as pd


def file_mode() -> int:
    """The mode a plainly created file gets under this process's umask (0o644 for umask 022).

    mkstemp and safetensors create files 0o600; the atomic writes give them this mode instead, so a
    run directory or an exported checkpoint reads like any other folder (e.g. for a serving container)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return 0o666 & ~mask


def tensor_sha256(t) -> str:
    """sha256 (hex) of a CPU tensor's values as its raw bytes (not its shape or dtype): token splits,
    scoring and evaluation ids."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing folder above `path` when it is a file (so nothing can be made at `path`), else None."""
    above = next((p for p in Path(path).absolute().parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def refuse_repeated(flag: str, specs, advice: str = "give each file once") -> None:
    """Refuse a file named twice in one flag's list, which would be read twice and weigh double without a word
    (breaker: `sft --data a a` trained on 40 conversations of 20). Existing paths compare resolved (`a ./a`), and
    files of one size by their bytes (a hard link or a copy of `a`); folders and asset names compare by name.

    Raises:
        PuzzleError: naming the flag and the file."""
    import filecmp

    seen: dict = {}
    by_size: dict[int, list] = {}
    for spec in specs:
        path = Path(spec)
        key = path.resolve() if path.exists() else str(spec)
        if key in seen:
            raise PuzzleError(f"{flag} names {seen[key]}{f' (as {spec})' if str(spec) != str(seen[key]) else ''} "
                              f"twice; {advice}")
        seen[key] = spec
        try:
            if path.is_file() and (size := path.stat().st_size):  # empty files hold no text to weigh double
                by_size.setdefault(size, []).append(spec)
        except OSError:  # unreadable: said by the reader, with its own advice
            continue
    for same_size in (group for group in by_size.values() if len(group) > 1):
        for i, spec in enumerate(same_size):
            for other in same_size[:i]:
                try:  # a hard link shares the inode; filecmp stops at the first differing block
                    same = os.path.samefile(other, spec) or filecmp.cmp(other, spec, shallow=False)
                except OSError:
                    continue
                if same:
                    raise PuzzleError(f"{flag} names {other} and {spec}, which hold the same bytes (a copy or a link "
                                      f"of one file); {advice}")


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM (Ctrl-C, `kill`) until the block ends, where they act as usual: for a few steps that
    must happen together (a temporary file made and its clean-up armed; a file written and the fact recorded).
    In the main thread the signals' handlers note them during the block and raise them again at its end: a signal
    mask would hold them in this thread alone, and the kernel hands a signal to any thread that does not block it
    (torch's own threads), whose Python handler then ran in the block (CI: a test of this held nothing, now and
    then). Elsewhere (another thread sets no handlers) the thread's signal mask holds them, where the platform has
    one."""
    import signal
    import threading

    held: list[int] = []
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):  # an ignored signal stays ignored; None: set outside Python
                signal.signal(s, lambda signum, frame: held.append(signum))
        try:
            yield
        finally:
            for s, handler in previous.items():
                if handler not in (signal.SIG_IGN, None):
                    signal.signal(s, handler)
            # as usual now, SIGTERM first: the first that raises ends the loop, and a kill outranks a Ctrl-C
            for signum in sorted(set(held), key=lambda s: s != signal.SIGTERM):
                signal.raise_signal(signum)
        return
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + rename); creates parent folders.

    Raises:
        PuzzleError: `path` is a folder (a rename cannot replace it).
    """
    path = Path(path)
    if path.is_dir():
        raise PuzzleError(f"{path} is a folder where a file belongs; move it away and run the command again")
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_deferred():  # breaker: a Ctrl-C between mkstemp and the try left the temporary file behind
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: `remove_stale_temp_files` leaves a locked file alone
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


#: the temporary files `atomic_write_bytes` writes: mkstemp's names, ".NAME." + 8 random characters + ".tmp"
TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
TEMP_GRACE_S = 60.0  # a temporary file this long untouched is no write in progress (one write, fsync, rename)


def remove_stale_temp_files(root: str | os.PathLike, before: float, grace_s: float | None = None) -> list[Path]:
    """Remove the temporary files under `root` that `atomic_write_bytes` left behind when its process was killed
    mid-write (SIGKILL, out of memory: its own clean-up never ran), so they do not pile up in a run directory.

    Only regular files named like its temporaries, last modified before `before` (a time.time(), the start
    of the calling command: files of writes it made itself, or that another process started meanwhile, are
    left) and over `grace_s` ago (default TEMP_GRACE_S; 0 for a command that held the run's lock alone, so no
    other writer can be between creating a file and locking it), and not locked (a write in progress holds an
    flock on its file until it closes it, also through a long write or fsync that leaves its time unchanged:
    reviewer) are removed. Returns the removed paths; files that vanish or cannot be removed meanwhile are skipped.
    """
    root, removed = Path(root), []
    latest = min(before, time.time() - (TEMP_GRACE_S if grace_s is None else grace_s))
    if not root.is_dir():
        return removed
    for path in root.rglob(".*.tmp"):
        try:
            if TEMP_FILE.fullmatch(path.name) and path.is_file() and not path.is_symlink() \
                    and path.stat().st_mtime < latest:
                with open(path, "rb") as f:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its writer is still at work
                    path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """safetensors.torch.save_file, atomically. Tensors are made contiguous; metadata values become strings, written
    in sorted order (`_sorted_metadata`), so the same tensors and metadata give the same bytes."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    return atomic_write_bytes(path, _sorted_metadata(data))


def _sorted_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its header's __metadata__ entries in sorted order. safetensors writes them
    from a hash map, in an order that changes from call to call (stop 76's leftover: two saves of the same adapters
    differed); the tensors' entries are already sorted. The file is returned as it was where the rewritten header
    would not have the very same length (an escaping the two JSON writers spell differently)."""
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8:8 + n]
    header = json.loads(raw)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or list(meta) == sorted(meta):  # nothing to reorder: no copy of a large file
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = raw.rstrip(b" ")
    if len(text) != len(body):
        return data
    return data[:8] + text + raw[len(body):] + data[8 + n:]


def dir_arg(value: str) -> Path:
    """argparse type of a --out DIR flag: the path, refusing an empty one (breaker: `--out ""` was taken as the
    current folder, unsaid)."""
    import argparse

    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; give a directory (e.g. runs/demo, or . for the current folder)")
    return Path(value)


def is_run_directory(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a puzzle run directory: a config.json naming a parent (a model folder's names a
    model_type instead) beside a search/ or library/ folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not ((folder / "search").is_dir() or (folder / "library").is_dir()):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "parent" in config and "model_type" not in config


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file; PuzzleError names the file when it is missing or not valid JSON."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise PuzzleError(f"{path} is a folder (or not a regular file) where a JSON file belongs; move it away")
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{path} is not valid JSON ({e}); delete it and rerun the stage that writes it") from e


def read_json_or_none(path: str | os.PathLike):
    """The JSON value in `path`, or None where it is missing, damaged or unreadable (RecursionError included: a
    hand-edited file nested too deep)."""
    try:
        return read_json(path) if Path(path).is_file() else None
    except (PuzzleError, RecursionError, OSError):
        return None


def save_table(df: pd.DataFrame, path: str | os.PathLike, meta: dict) -> Path:
    """Write a tidy table as CSV plus a JSON sidecar (`<path>.json`) holding `meta`, the columns, the row count and
    the CSV's sha256 (`load_table` tells a table edited since from one written so)."""
    path = Path(path)
    text = df.to_csv(index=False)
    atomic_write_text(path, text)
    meta = {k: v for k, v in meta.items() if k != EDITED_KEY}  # a meta read by `load_table` (reviewer: coupled.py)
    atomic_write_json(path.with_suffix(path.suffix + ".json"), {**meta, "columns": list(df.columns), "rows": len(df),
                                                                "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return path


def load_table(path: str | os.PathLike, required_columns=(), expect: dict | None = None,
               sidecar_required: bool = True) -> tuple[pd.DataFrame, dict]:
    """Read a table written by `save_table` and check it.

    Args:
        required_columns: columns that must be present.
        expect: sidecar entries that must equal these values (e.g. the device and workload the
            caller plans for); a table measured for another device or workload is refused.
        sidecar_required: False for a table the user supplies by hand: without a sidecar its meta is
            {"missing_sidecar": <the sidecar's path>} (device and workload unknown). With `expect`
            the sidecar is always required.

    Returns:
        (table, meta): meta is the sidecar's, with EDITED_KEY (the table's path) added where the table's bytes
        differ from the sha256 the sidecar recorded (edited since it was written; `edited_table_note` says it).

    Raises:
        PuzzleError: missing file or (required) sidecar, missing columns, a sidecar that disagrees
            with `expect`, a row count other than the one the sidecar recorded, or a table cut inside its last row.
    """
    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"table {path} does not exist; run the stage that writes it first")
    sidecar = path.with_suffix(path.suffix + ".json")
    if not sidecar_required and not expect and not sidecar.exists():
        meta = {"missing_sidecar": str(sidecar)}
    else:
        meta = read_json(sidecar)
    if not isinstance(meta, dict):
        raise PuzzleError(f"{sidecar} must hold a JSON object (the table's sidecar), "
                          f"not a {type(meta).__name__}; rerun the stage that writes the table")
    import pandas as pd

    data = path.read_bytes()  # read once: parsed, hashed and looked at for a cut last row
    try:
        df = pd.read_csv(BytesIO(data))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        fix = "delete it and rerun the stage that writes it" if sidecar_required else "give a CSV with a header row"
        raise PuzzleError(f"table {path} cannot be read ({e}); {fix}") from e
    missing = [c for c in required_columns if c not in df.columns]
    sep = next((c for c in (";", "\t", "|") if len(df.columns) == 1 and c in str(df.columns[0])), None)
    if missing and sep is not None:  # the whole header read as one column
        raise PuzzleError(f"table {path} separates its columns by {sep!r}, not by commas; write it as a "
                          f"comma-separated CSV with the columns {list(required_columns)}")
    if missing:
        fix = ("it was cut or edited since it was written (its bytes differ from the sha256 its sidecar recorded), "
               "rerun its stage" if _bytes_changed(data, meta) else
               "it was written by another version, rerun its stage" if sidecar_required else
               f"the table needs the columns {list(required_columns)}")
        raise PuzzleError(f"table {path} lacks columns {missing}; {fix}")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise PuzzleError(
                f"table {path} was made for {key}={meta.get(key)!r}, but {key}={want!r} was requested; "
                f"rerun its stage for this {key} or request the same {key}")
    rows = meta.get("rows")
    if isinstance(rows, int) and not isinstance(rows, bool) and rows != len(df):  # save_table records its row count
        hand = "" if sidecar_required or expect else " (or delete the sidecar of a table edited on purpose)"
        raise PuzzleError(f"table {path} has {len(df)} rows, but its sidecar {sidecar.name} recorded {rows}: the table "
                          f"was cut or edited since; rerun the stage that writes it{hand}")
    meta = {k: v for k, v in meta.items() if k != EDITED_KEY}  # only this load says it
    if _bytes_changed(data, meta):  # breaker: a hand-edited score table was taken as a new one without a word
        if not data.endswith(b"\n"):  # to_csv ends every row so: cut inside its last row (reviewer)
            raise PuzzleError(f"table {path} ends inside a row (no newline after its last one) and differs from the "
                              f"sha256 its sidecar recorded: the table was cut since (or saved without its last "
                              f"newline); rerun the stage that writes it")
        meta = {**meta, EDITED_KEY: str(path)}  # the callers say it
    return df, meta


def _bytes_changed(data: bytes, meta: dict) -> bool:
    """Whether a table's bytes `data` differ from the sha256 its sidecar `meta` recorded (False without one)."""
    return isinstance(meta.get("sha256"), str) and hashlib.sha256(data).hexdigest() != meta["sha256"]


def table_changed_since_written(path: str | os.PathLike) -> bool:
    """Whether a `save_table` table was cut or edited since it was written: its bytes differ from the sha256 its
    sidecar recorded. False where the table, its sidecar or the recorded sha256 is missing or unreadable."""
    path = Path(path)
    meta = read_json_or_none(path.with_suffix(path.suffix + ".json"))
    return isinstance(meta, dict) and path.is_file() and _bytes_changed(path.read_bytes(), meta)


#: the key `load_table` adds to a table's meta when the CSV's bytes differ from the sha256 its sidecar recorded
EDITED_KEY = "edited_since_written"


def edited_table_note(meta: dict, rewrite: str) -> str | None:
    """A sentence for a table `load_table` found edited since it was written (values changed, rows kept), or None.
    `rewrite`: how to write it afresh (a command)."""
    if not meta.get(EDITED_KEY):
        return None
    return (f"{meta[EDITED_KEY]} was edited since it was written (its bytes differ from the sha256 its sidecar "
            f"recorded): it is used as it is now; {rewrite} writes it afresh")
