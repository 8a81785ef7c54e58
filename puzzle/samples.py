"""Calibration text sampled from the parent itself: the `parent-samples` data source.

BLD fits every subblock to its parent block on the calibration text, so a child built from the
library is good on text like that and worse elsewhere: on the SmolLM2 demo, the summed
replace-1-block KL of the chosen subblocks is 1.3-1.6x higher on the evaluation text than on the
calibration text (`puzzle.kl_gap`, "transfer"). Text drawn from the parent's own distribution
covers what the parent models, not one corpus. Distilling a student on text its teacher generated
is the data-free recipe of LLM-QAT (Liu et al. 2023, "LLM-QAT: Data-Free Quantization Aware
Training for Large Language Models", Sec. 2.1), where it beat real pre-training subsets.

Source spec (in `data.calib_sources`, `--calib`): `parent-samples` draws enough tokens for the
calibration and scoring splits; `parent-samples:N` draws N tokens. The run's data stage samples
from BOS at temperature 1 (ancestral sampling, so the text follows the parent's distribution),
`length` new tokens per row (the run's seq_len, at least 64), and cuts a row at each EOS into
documents. Batches are seeded from
(seed, batch index), and the file is rewritten atomically after each batch, so an interrupted
stage resumes where it stopped and gives the same text as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import PuzzleError
from .io import atomic_write_json, atomic_write_text

PARENT_SAMPLES = "parent-samples"
SAMPLES_FILE = "parent_samples.jsonl"
META_FILE = "parent_samples.json"
MIN_DOC_TOKENS = 16  # shorter pieces between two EOS are dropped
AUTO_MARGIN = 1.1  # `parent-samples` without N draws 10 % more than the splits need
_FORMAT = 2  # 2: inverse-CDF draws (1: torch.multinomial); another format is sampled afresh


def is_parent_samples(spec: str) -> bool:
    """True for the specs `parent-samples` and `parent-samples:N`."""
    return spec == PARENT_SAMPLES or spec.startswith(PARENT_SAMPLES + ":")


def sample_tokens(spec: str, calib_tokens: int, score_tokens: int, score_fraction: float, share: float = 1.0) -> int:
    """How many tokens the spec asks for.

    `parent-samples:N` -> N. `parent-samples` -> enough for the samples' share of both
    calibration-source splits: share x max(calib / (1 - f), score / f) x 1.1, f the score fraction
    (documents, not tokens, are split, hence the margin); `share` is the samples' weight over the
    sum of `DataConfig.calib_weights` (1 without weights: as if the samples were the only source).

    Raises:
        PuzzleError: N that is not a whole number of at least 1.
    """
    if spec == PARENT_SAMPLES:
        need = max(calib_tokens / (1.0 - score_fraction), score_tokens / score_fraction)
        return int(math.ceil(need * share * AUTO_MARGIN))
    text = spec[len(PARENT_SAMPLES) + 1:].strip().replace("_", "")
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise PuzzleError(f"data source {spec!r}: give `{PARENT_SAMPLES}` (as many tokens as the splits need) or "
                          f"`{PARENT_SAMPLES}:N` with N a whole number of tokens of at least 1, e.g. "
                          f"{PARENT_SAMPLES}:30000")
    return int(text)


#: `parent-samples:N` above this many times what the splits take (`parent-samples` alone) is refused before
#: sampling (`ensure_parent_samples`' `limit`): tokens sampled for hours, never packed
MAX_OVER_NEED = 100


def draw_tokens(logits: torch.Tensor, generator: torch.Generator, cdf: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(logits), by inverting the CDF with one uniform per row.

    Exact in distribution like `torch.multinomial`, but draws B uniforms instead of B x V
    exponentials (a third of the time per step at V = 49k on the 2-core CPU VM). The CDF is
    accumulated in float64, so tokens of tiny probability keep their share.

    Args:
        logits: (B, V) float on the CPU (not modified).
        generator: a CPU torch.Generator.
        cdf: a (B, V) float64 CPU buffer the CDF is built in (overwritten), reused across the steps
            of a row so that no step allocates a (B, V) float64 tensor; None allocates one.

    Returns:
        (B, 1) int64 token ids.

    Raises:
        PuzzleError: a row with NaN logits, only -inf or any +inf (no distribution to sample from).
    """
    if cdf is None:
        cdf = torch.empty(logits.shape, dtype=torch.float64)
    cdf.copy_(logits)  # (B, V) float64
    cdf.sub_(cdf.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)  # (B, V) unnormalised
    if not torch.isfinite(cdf[:, -1]).all():  # NaN logits, or a row of only -inf / +inf
        raise PuzzleError("the parent's logits hold NaN or infinite values, so no token can be sampled; check the "
                          "parent's weights (puzzle eval on it should give a finite LM loss)")
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # first index with cdf > u


@torch.no_grad()
def sample_rows(model, bos_id: int, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Ancestral sampling (temperature 1) from BOS on `puzzle.runtime.ChildRuntime`.

    The runtime's decode step reads each layer's KV cache with its own KV-head count (no repeated
    K/V per step, which dominated long rows on the modeling path), and on CUDA runs the Triton
    kernels and a CUDA graph.

    Args:
        model: a PuzzleForCausalLM (any device and floating dtype; not modified).
        bos_id: the first token of every row.
        batch_size, length: B rows of `length` new tokens each.
        generator: a CPU torch.Generator; the draws depend on it and the logits only.

    Returns:
        (B, length) int64 on the CPU, the new tokens (BOS not included).
    """
    from .runtime import ChildRuntime

    rt = ChildRuntime(model, batch_size=batch_size, max_len=length)
    ids = torch.full((batch_size, 1), bos_id, dtype=torch.long)  # (B, 1)
    logits = rt.prefill(ids)  # (B, V)
    # Both buffers are allocated once, and nothing a step allocates outlives the next step. A list of the
    # drawn (B, 1) columns, one small tensor kept per step between the step's freed (B, V) temporaries, fragmented
    # glibc's heap in about half the runs: up to a freed ~24 MiB chunk left resident per step at B = 64, V = 49k
    # (the SmolLM2 parent's peak RSS 5.8 GB for 256 tokens instead of 2.1 GB). The CDF buffer also spares each
    # step two (B, V) float64 allocations.
    cdf = torch.empty(logits.shape, dtype=torch.float64)  # (B, V)
    rows = torch.empty(batch_size, length, dtype=torch.long)  # (B, length)
    for step in range(length):
        nxt = draw_tokens(logits.float().cpu(), generator, cdf)  # (B, 1)
        rows[:, step] = nxt[:, 0]
        if step + 1 < length:
            logits = rt.decode(nxt[:, 0])
    return rows


def split_at_eos(row: list[int], eos_ids: set[int]) -> list[list[int]]:
    """A sampled row -> its documents: the pieces between EOS tokens with >= MIN_DOC_TOKENS tokens."""
    pieces, cur = [], []
    for t in row:
        if t in eos_ids:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    return [p for p in pieces if len(p) >= MIN_DOC_TOKENS]


def _identity(parent_fingerprint: str, tokenizer_sha256: str, seed: int, length: int, batch_size: int) -> dict:
    return {"format": _FORMAT, "parent": parent_fingerprint, "tokenizer_sha256": tokenizer_sha256, "seed": seed,
            "length": length, "batch_size": batch_size, "temperature": 1.0}


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of sample batch `batch`: seed * 1_000_003 + batch, taken modulo 2**63 only where it leaves
    torch's range [-2**63, 2**64) (reviewer: seeds above about 1.8e13 overflowed; smaller ones are unchanged)."""
    value = seed * 1_000_003 + batch
    return value if -2 ** 63 <= value < 2 ** 64 else value % 2 ** 63


def _last_batch_needed(records: list[dict], tokens: int) -> int:
    """The batch after which a fresh sampling run for `tokens` stops: the first whose documents bring the total to
    `tokens` (the sampling loop adds whole batches); the last batch when the records never reach it."""
    total = 0
    for r in records:
        total += r["tokens"]
        if total >= tokens:
            return r["batch"]
    return records[-1]["batch"] if records else -1


def _read_done(folder: Path, identity: dict) -> tuple[list[dict], int]:
    """The records and batch count a matching earlier call left; ([], 0) when none or another identity."""
    meta_path, file = folder / META_FILE, folder / SAMPLES_FILE
    if not (meta_path.is_file() and file.is_file()):
        return [], 0
    try:
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in identity} != identity:
            return [], 0
        batches = int(meta["batches"])
        text = file.read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError):
        return [], 0  # damaged metadata: sample afresh
    records = []
    for line in text.split("\n"):  # not splitlines(): a sampled text may hold U+2028 or U+0085
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record = {"text": str(record["text"]), "batch": int(record["batch"]), "tokens": int(record["tokens"])}
        except (ValueError, KeyError, TypeError):
            # a damaged line: keep the batches before the one it belongs to (that one may be incomplete)
            batches = min(batches, records[-1]["batch"] if records else 0)
            break
        records.append(record)
    return [r for r in records if r["batch"] < batches], batches


def ensure_parent_samples(model, tokenizer, folder, tokens: int, seed: int, length: int = 256, batch_size: int = 64,
                          parent_fingerprint: str = "", tokenizer_sha256: str = "", progress: bool = False,
                          log=None, limit: int | None = None) -> Path:
    """Write (or finish, or reuse) `folder/parent_samples.jsonl` holding at least `tokens` sampled tokens.

    Each line is {"text", "batch", "tokens"}; `folder/parent_samples.json` records who sampled
    (parent fingerprint, tokenizer, seed, length, batch size) and how many batches are done. A file
    from the same parent and settings is extended or reused; one from another parent or settings
    is replaced. Raising `tokens` later samples only the missing batches.

    Args:
        model: the parent (PuzzleForCausalLM, eval mode).
        tokenizer: its tokenizer (needs a BOS or EOS token to start rows from).
        folder: where the two files go (created).
        tokens: sampled tokens to hold at least (kept documents' tokens, EOS not counted).
        seed: batch b is drawn with torch.Generator().manual_seed(batch_seed(seed, b)).
        length: new tokens per row (documents are cut at EOS inside it).
        batch_size: rows sampled together.
        parent_fingerprint, tokenizer_sha256: identity of the parent and tokenizer, recorded.
        progress: show a progress bar (tokens, rate, ETA).
        log: callable taking a message line, or None.
        limit: the most tokens to sample (`DataConfig.parent_sample_limit`); more asked is refused before sampling,
            samples already held are used whatever their count.

    Returns:
        The path of the jsonl file (a source `puzzle.data.read_documents` reads).

    Raises:
        PuzzleError: a tokenizer with neither BOS nor EOS, non-positive sizes, `tokens` over `limit` where more
            are to be sampled, or 4 batches in a row without a document (a parent that ends its text at once).
    """
    if tokens < 1 or length < MIN_DOC_TOKENS or batch_size < 1:
        raise PuzzleError(f"parent samples: tokens ({tokens}) and batch_size ({batch_size}) must be >= 1 and "
                          f"length ({length}) >= {MIN_DOC_TOKENS}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    start = bos if bos is not None else eos
    if start is None:
        raise PuzzleError("parent samples need a tokenizer with a BOS or EOS token to start rows from")
    eos_ids = {eos} if eos is not None else set()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = _identity(parent_fingerprint, tokenizer_sha256, seed, length, batch_size)
    records, batches = _read_done(folder, identity)
    have = sum(int(r["tokens"]) for r in records)
    path = folder / SAMPLES_FILE
    if have >= tokens and path.is_file():
        last = _last_batch_needed(records, tokens)
        kept = [r for r in records if r["batch"] <= last]
        if len(kept) < len(records):  # sampled for a larger N before: hold what a fresh run holds (reviewer: the
            # splits, drawn over every document of the file, depended on the run's history)
            have = sum(r["tokens"] for r in kept)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            atomic_write_json(folder / META_FILE, {**identity, "batches": last + 1, "tokens": have})
            if log is not None:
                log(f"data: parent samples cut to the {have:,} tokens of their first {last + 1} batches, as a fresh "
                    f"run for {tokens:,} tokens samples them")
        return path
    if limit is not None and tokens > limit:  # breaker: 999999999999 started sampling with an ETA of 21,509 h
        raise PuzzleError(f"parent samples: {tokens:,} tokens asked, over {limit:,} ({MAX_OVER_NEED} times what the "
                          f"calibration and scoring splits take, which `{PARENT_SAMPLES}` alone samples); give a "
                          f"smaller N in {PARENT_SAMPLES}:N, or raise data.calib_tokens / data.score_tokens first")
    if log is not None:
        log(f"data: sampling {tokens - have:,} more tokens from the parent ({have:,} done) into {path}, in whole "
            f"batches of {batch_size} rows of up to {length} tokens")  # a breaker: N=1 sampled ~4,000 tokens unsaid
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens, initial=min(have, tokens), desc="sample parent", unit="tok")
    empty = 0
    was_training = model.training
    model.eval()
    try:
        while have < tokens:
            generator = torch.Generator().manual_seed(batch_seed(seed, batches))
            rows = sample_rows(model, start, batch_size, length, generator)  # (B, length)
            new = []
            for row in rows.tolist():
                for piece in split_at_eos(row, eos_ids):
                    text = tokenizer.decode(piece, skip_special_tokens=True).strip()
                    if text:
                        new.append({"text": text, "batch": batches, "tokens": len(piece)})
            batches += 1
            empty = 0 if new else empty + 1
            if empty > 3:
                raise PuzzleError(f"parent samples: {empty} batches of {batch_size} rows gave no document of "
                                  f">= {MIN_DOC_TOKENS} tokens (the parent ends its text at once); give text files "
                                  "with --calib instead")
            records += new
            added = sum(r["tokens"] for r in new)
            have += added
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
            atomic_write_json(folder / META_FILE, {**identity, "batches": batches, "tokens": have})
            if bar is not None:
                bar.update(min(added, tokens - bar.n))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return path
