"""The `parent-samples` calibration source: parsing, sampling, resume, and a run's data stage."""

import json
import types

import pytest
import torch

from puzzle.data import DataConfig, load_token_splits, resolve_source
from puzzle.errors import PuzzleError
from puzzle.samples import (META_FILE, MIN_DOC_TOKENS, SAMPLES_FILE, draw_tokens, ensure_parent_samples, sample_rows,
                            sample_tokens, split_at_eos)
from puzzle.tiny import tiny_parent


@pytest.fixture(scope="module")
def parent():
    return tiny_parent()


def test_spec_token_counts_and_bad_specs(tmp_path):
    assert sample_tokens("parent-samples:30000", 1000, 100, 0.2) == 30000
    assert sample_tokens("parent-samples:30_000", 1000, 100, 0.2) == 30000
    # auto: enough for both splits if the samples were the only source, 10 % more
    assert sample_tokens("parent-samples", 16896, 4096, 0.2) == int(-(-max(16896 / 0.8, 4096 / 0.2) * 1.1 // 1))
    assert sample_tokens("parent-samples", 800, 1000, 0.2) == 5500  # the score split can be the larger need
    for bad in ("parent-samples:0", "parent-samples:-5", "parent-samples:1e4", "parent-samples:", "parent-samples:x"):
        with pytest.raises(PuzzleError, match="parent-samples:N` with N a whole number of tokens of at least 1"):
            sample_tokens(bad, 1000, 100, 0.2)
    # breaker: 999999999999 sampled with an ETA of 21,509 h; refused before sampling, not with the configuration
    # (a saved run asking for more stays readable)
    config = DataConfig(calib_sources=("parent-samples:9000001",), eval_sources=("e.txt",), seq_len=64,
                        calib_tokens=64000, score_tokens=1600, score_fraction=0.2)
    assert config.parent_sample_tokens() == 9000001 and config.parent_sample_limit() == 100 * 88000
    tokenizer = types.SimpleNamespace(bos_token_id=1, eos_token_id=2)
    with pytest.raises(PuzzleError, match="parent samples: 9,000,001 tokens asked, over 8,800,000 \\(100 times what"):
        ensure_parent_samples(None, tokenizer, tmp_path, 9000001, seed=0, limit=config.parent_sample_limit())


def test_data_config_refuses_misplaced_specs():
    with pytest.raises(PuzzleError, match="parent-samples:N"):
        DataConfig(calib_sources=("parent-samples:many",), eval_sources=("e.txt",))
    with pytest.raises(PuzzleError, match="calibration source only"):
        DataConfig(calib_sources=("c.txt",), eval_sources=("parent-samples",))
    with pytest.raises(PuzzleError, match="once"):
        DataConfig(calib_sources=("parent-samples", "parent-samples:100"), eval_sources=("e.txt",))
    assert DataConfig(calib_sources=("c.txt",), eval_sources=("e.txt",)).parent_sample_tokens() == 0
    with pytest.raises(PuzzleError, match="data stage"):
        resolve_source("parent-samples")


def test_auto_sample_count_follows_the_samples_weight():
    """With calib_weights, plain `parent-samples` draws only its share of the splits; N stays N."""
    alone = DataConfig(calib_sources=("parent-samples",), eval_sources=("e.txt",), calib_tokens=16896,
                       score_tokens=4096)
    need = max(16896 / 0.8, 4096 / 0.2)
    assert alone.parent_sample_tokens() == int(-(-need * 1.1 // 1))
    mixed = DataConfig(calib_sources=("c.txt", "parent-samples"), eval_sources=("e.txt",), calib_tokens=16896,
                       score_tokens=4096, calib_weights=(3, 1))
    assert mixed.parent_sample_tokens() == int(-(-need * 0.25 * 1.1 // 1))
    fixed = DataConfig(calib_sources=("c.txt", "parent-samples:5000"), eval_sources=("e.txt",), calib_weights=(3, 1))
    assert fixed.parent_sample_tokens() == 5000


def test_split_at_eos_drops_short_pieces():
    long = list(range(10, 10 + MIN_DOC_TOKENS))
    assert split_at_eos(long + [2] + [5, 6] + [2] + long, {2}) == [long, long]
    assert split_at_eos([5] * (MIN_DOC_TOKENS - 1), {2}) == []


def test_sampling_follows_the_parent_distribution(parent):
    """Ancestral sampling at temperature 1: the first token's frequencies match the parent's softmax."""
    model = parent.model
    gen = torch.Generator().manual_seed(0)
    rows = sample_rows(model, 1, 4000, 1, gen)  # (4000, 1)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[1]]))[0, -1], -1)  # (V,)
    freq = torch.bincount(rows[:, 0], minlength=probs.numel()).float() / rows.shape[0]
    tv = 0.5 * (freq - probs).abs().sum().item()
    # a random tiny parent is near uniform over ~300 tokens; 4000 draws give total variation ~0.12 from
    # sampling noise alone, while greedy decoding (one token) would give ~1
    assert tv < 0.2
    # the same generator seed gives the same rows; another seed other rows
    a = sample_rows(model, 1, 2, 20, torch.Generator().manual_seed(3))
    b = sample_rows(model, 1, 2, 20, torch.Generator().manual_seed(3))
    c = sample_rows(model, 1, 2, 20, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_and_extension_give_the_same_text(parent, tmp_path):
    kw = dict(seed=7, length=32, batch_size=4, parent_fingerprint="p", tokenizer_sha256="t")
    said = []  # a breaker: N=1 sampled a whole batch without a word
    whole = ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "whole", 300, **kw, log=said.append)
    assert said == [f"data: sampling 300 more tokens from the parent (0 done) into {whole}, in whole batches of 4 "
                    f"rows of up to 32 tokens"]
    lines = whole.read_text().splitlines()
    assert sum(json.loads(x)["tokens"] for x in lines) >= 300
    # in two calls (an interrupted stage, or a raised token count): the same file
    part = ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "part", 100, **kw)
    first = part.read_text()
    assert whole.read_text().startswith(first) and first != whole.read_text()
    ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "part", 300, **kw)
    assert part.read_text() == whole.read_text()
    # fewer asked for: what a fresh run for that count holds (reviewer: the larger run's documents stayed, so the
    # splits drawn over the file depended on the run's history), and then the file untouched
    fresh = ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "fresh", 50, **kw).read_text()
    ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "part", 50, **kw)
    assert part.read_text() == fresh and len(fresh) < len(whole.read_text())
    stamp = part.stat().st_mtime_ns
    ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "part", 50, **kw)
    assert part.stat().st_mtime_ns == stamp
    ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "part", 300, **kw)  # and back: the same again
    assert part.read_text() == whole.read_text()
    # another parent (fingerprint) or seed: sampled afresh, not appended
    other = ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "part", 100, **{**kw, "seed": 8})
    assert other.read_text() != first and json.loads((tmp_path / "part" / META_FILE).read_text())["seed"] == 8
    # a damaged meta file: sampled afresh, same result as a fresh folder
    (tmp_path / "whole" / META_FILE).write_text("{not json")
    again = ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "whole", 300, **kw)
    assert again.read_text().splitlines() == lines


def test_large_seeds_stay_in_the_generators_range():
    """Reviewer: seeds above about 1.8e13 overflowed torch.manual_seed (data.seed allows up to 2**63)."""
    import torch

    from puzzle.samples import batch_seed

    assert batch_seed(7, 3) == 7 * 1_000_003 + 3 and batch_seed(-1, 0) == -1_000_003  # unchanged in range
    for seed in (2 ** 63 - 1, -2 ** 63, 2 * 10 ** 13):
        torch.Generator().manual_seed(batch_seed(seed, 5))


def test_bad_arguments(parent, tmp_path):
    with pytest.raises(PuzzleError, match="length"):
        ensure_parent_samples(parent.model, parent.tokenizer, tmp_path, 100, seed=0, length=4)
    with pytest.raises(PuzzleError, match="tokens"):
        ensure_parent_samples(parent.model, parent.tokenizer, tmp_path, 0, seed=0)


def test_run_data_stage_calibrates_on_parent_samples(tmp_path):
    """`--calib parent-samples` in a run: the calibration and scoring splits are the parent's samples,
    the evaluation split is unchanged, and a second Run reloads the data without sampling again."""
    from puzzle.config import load_preset
    from puzzle.pipeline import Run, stage_data

    base = load_preset("tiny")
    config = base.replace(data={"calib_sources": ("parent-samples",), "calib_tokens": 1024, "score_tokens": 256})
    run = Run(tmp_path / "run", config, progress=False)
    tokens = stage_data(run)
    samples = tmp_path / "run" / "data" / SAMPLES_FILE
    texts = [json.loads(x)["text"] for x in samples.read_text().splitlines()]
    assert sum(json.loads(x)["tokens"] for x in samples.read_text().splitlines()) >= config.data.parent_sample_tokens()
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    source = next(s for s in manifest["sources"] if s["spec"] == "parent-samples")
    assert source["role"] == "calib" and source["documents"] == len(texts)
    assert tokens.calib.shape == (1024 // 64, 64) and tokens.score.shape == (256 // 64, 64)
    first_doc = run.parent.tokenizer(texts[int(manifest["splits"]["calib"]["doc_ids"]["parent-samples"][0])],
                                     add_special_tokens=False)["input_ids"]
    flat = tokens.calib.flatten().tolist()
    assert any(flat[i:i + 8] == first_doc[:8] for i in range(len(flat) - 8))  # the calib text is sampled text
    reference = Run(tmp_path / "ref", base.replace(data={"calib_tokens": 1024, "score_tokens": 256}), progress=False)
    assert torch.equal(tokens.eval, stage_data(reference).eval)
    stamp = samples.stat().st_mtime_ns
    again = Run(tmp_path / "run", config, progress=False)
    assert torch.equal(again.tokens.calib, tokens.calib) and samples.stat().st_mtime_ns == stamp
    loaded = load_token_splits(tmp_path / "run" / "data")
    assert torch.equal(loaded.score, tokens.score)


def test_resume_survives_unicode_line_breaks_and_a_truncated_file(parent, tmp_path):
    """Texts holding U+2028 / U+0085 (JSON keeps them raw when not ASCII-escaped) resume in full; a file cut
    mid-line keeps the batches before the cut one, and finishing it gives the uninterrupted text."""
    kw = dict(seed=2, length=32, batch_size=4, parent_fingerprint="p", tokenizer_sha256="t")
    whole = ensure_parent_samples(parent.model, parent.tokenizer, tmp_path / "whole", 300, **kw).read_text()
    folder = tmp_path / "odd"
    ensure_parent_samples(parent.model, parent.tokenizer, folder, 300, **kw)
    records = [json.loads(x) for x in (folder / SAMPLES_FILE).read_text().split("\n") if x]
    records[0]["text"] += "\u2028odd\x85break"
    (folder / SAMPLES_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    stamp = (folder / SAMPLES_FILE).stat().st_mtime_ns
    ensure_parent_samples(parent.model, parent.tokenizer, folder, 300, **kw)  # all there: nothing resampled
    assert (folder / SAMPLES_FILE).stat().st_mtime_ns == stamp
    cut = tmp_path / "cut"
    ensure_parent_samples(parent.model, parent.tokenizer, cut, 300, **kw)
    text = (cut / SAMPLES_FILE).read_text()
    (cut / SAMPLES_FILE).write_text(text[: int(len(text) * 0.7)])  # ends mid-line
    said = []
    ensure_parent_samples(parent.model, parent.tokenizer, cut, 300, **kw, log=said.append)
    assert (cut / SAMPLES_FILE).read_text() == whole
    assert len(said) == 1 and "(0 done)" not in said[0]  # resumed after the kept batches, not from the start


def test_draw_tokens_follows_the_softmax_and_refuses_nan_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]]).repeat(100_000, 1)  # (B, 4)
    counts = torch.bincount(draw_tokens(logits, torch.Generator().manual_seed(0))[:, 0], minlength=4)
    torch.testing.assert_close(counts / 100_000, torch.softmax(logits[0], -1), atol=0.006, rtol=0)
    assert draw_tokens(torch.tensor([[-1e30, 1e30, -1e30]]), torch.Generator()).item() == 1
    for bad in (float("nan"), float("inf")):
        with pytest.raises(PuzzleError, match="NaN or infinite"):
            draw_tokens(torch.tensor([[0.0, bad]]), torch.Generator())
    with pytest.raises(PuzzleError, match="NaN or infinite"):
        draw_tokens(torch.full((1, 3), float("-inf")), torch.Generator())


def test_sample_rows_keeps_its_draws(parent):
    """Golden rows of the tiny parent (format 2, drawn by the code before the buffers): the same seed must give
    the same tokens, or `_FORMAT` must change so that earlier sample files are drawn afresh."""
    rows = sample_rows(parent.model, 1, 3, 10, torch.Generator().manual_seed(5))
    assert rows.tolist() == [[191, 93, 173, 136, 237, 97, 224, 117, 253, 37],
                             [77, 78, 213, 108, 65, 106, 151, 11, 75, 163],
                             [109, 253, 253, 97, 32, 111, 195, 105, 52, 260]]


def test_sample_rows_allocates_its_buffers_once(parent, monkeypatch):
    """Every step's draw reuses one (B, V) float64 CDF buffer, and no step's tokens outlive the next step: a list
    of per-step tensors between the steps' freed (B, V) temporaries fragmented glibc's heap (GBs of peak RSS)."""
    import gc
    import weakref

    import puzzle.samples as samples

    buffers, returned, alive = [], [], []

    def spy(logits, generator, cdf=None):
        gc.collect()
        alive.append(sum(r() is not None for r in returned[:-1]))  # draws before the previous step's
        buffers.append(None if cdf is None else (cdf.data_ptr(), cdf.dtype, tuple(cdf.shape)))
        out = draw_tokens(logits, generator) if cdf is None else draw_tokens(logits, generator, cdf)
        returned.append(weakref.ref(out))
        return out

    monkeypatch.setattr(samples, "draw_tokens", spy)
    B, L = 4, 12
    rows = sample_rows(parent.model, 1, B, L, torch.Generator().manual_seed(0))
    assert rows.shape == (B, L) and len(buffers) == L
    assert alive == [0] * L
    V = parent.model.config.vocab_size
    assert buffers[0] is not None and buffers[0][1:] == (torch.float64, (B, V)) and len(set(buffers)) == 1


def test_draw_tokens_into_a_buffer_gives_the_same_tokens():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1)) * 4  # (B, V)
    kept = logits.clone()
    alone = draw_tokens(logits, torch.Generator().manual_seed(2))
    cdf = torch.empty(5, 1000, dtype=torch.float64)
    assert torch.equal(draw_tokens(logits, torch.Generator().manual_seed(2), cdf), alone)
    assert torch.equal(logits, kept)  # the logits are not modified
    assert torch.equal(draw_tokens(logits.double(), torch.Generator().manual_seed(2)), alone)
