"""Quality of candidate subblocks (replace-1-block) and of whole models, measured against the parent.

Replace-1-block (Puzzle, Bercovich et al. 2024, Sec. 4.1): the parent with exactly one subblock
swapped for a library candidate is run on held-out scoring text; the candidate's score is the KL
divergence KL(p_parent || p_child) of the next-token distributions, in nats per token (the paper
found KL a better guide than LM loss or downstream scores). Also reported: LM loss of the swapped
model (nats per token), top-1 agreement with the parent, and the cosine similarity of the final
hidden states.

With `stride` > 1 the LM head (the costliest single matmul of a small model) runs on every
stride-th position only, starting at the last one; the layers still see every position, so the
metrics are exact averages over that subset of positions.

Only layers from the swapped one onward change, so the parent's residual stream at every layer
input (and after every attention subblock) is computed once and cached (`ParentCache`); a candidate
at layer i costs the remaining L - i layers plus the LM head.

Coupled scoring (subblock "block", `replace_block_score`) swaps a whole layer, attention and FFN
variant together, for the coupled BLD entries of a narrowed space. `replace_one_scores` scores
several candidates of one layer in one stacked forward. Sharding across processes (torchrun) and
resuming per candidate: scoring/parallel.py.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

METRICS = ("kl_nats", "lm_loss", "top1_agree", "cosine")


def position_kl(child_logp: torch.Tensor, parent_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_parent || p_child) in nats at every position: (..., V) fp32 child and parent log-probabilities ->
    (...) fp32, at least 0 (a child equal to the parent up to rounding sums to about -1e-8, which the search would
    take for a gain: breaker, a linear attention that reproduced its parent exactly)."""
    return (parent_logp.exp() * (parent_logp - child_logp)).sum(-1).clamp_min(0)


def token_metrics(child_logits: torch.Tensor, parent_logp: torch.Tensor, targets: torch.Tensor | None,
                  weights: torch.Tensor | None = None) -> dict:
    """Summed per-token metrics of one chunk (divide by `tokens` to average).

    Args:
        child_logits: (B, T, V) any float dtype.
        parent_logp: (B, T, V) fp32 parent log-probabilities.
        targets: (B, T) next-token ids, -100 where none (the LM loss skips them); None skips the loss.
        weights: (B, T) per-position weights of the KL sum (divide by their sum to average); None: 1 each.

    Returns:
        dict with kl_nats, lm_loss, top1_agree sums, the token counts (`tokens`, `lm_tokens`) and `kl_weight`, what
        the kl_nats sum is to be divided by (the weights' sum; `tokens` without weights).
    """
    logq = F.log_softmax(child_logits.float(), dim=-1)
    kl = position_kl(logq, parent_logp)  # (B, T)
    if weights is not None:
        kl = kl * weights
    out = {"kl_nats": float(kl.sum()), "top1_agree": float((logq.argmax(-1) == parent_logp.argmax(-1)).sum()),
           "tokens": kl.numel(), "kl_weight": float(kl.numel() if weights is None else weights.sum())}
    if targets is not None:
        valid = targets != -100
        nll = F.nll_loss(logq.reshape(-1, logq.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
        out.update(lm_loss=float(nll), lm_tokens=int(valid.sum()))
    return out


def weighted_kl(sums: dict) -> float:
    """Mean KL in nats/token from `token_metrics` sums added up over chunks: kl_nats / kl_weight (the weighted mean
    where weights were given; 0 where every weight was 0)."""
    return sums["kl_nats"] / max(sums["kl_weight"], 1e-12)


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T) targets: ids shifted left by one, -100 at the last position."""
    t = torch.full_like(ids, -100)
    t[:, :-1] = ids[:, 1:]
    return t


@dataclass
class ParentCache:
    """The parent's activations on the scoring tokens.

    Attributes:
        ids: (N, T) int64 tokens.
        h: list of L+1 tensors (N, T, C): residual stream at each layer input (h[L] = final).
        h_mid: list of L tensors (N, T, C): after each layer's attention subblock.
        logp: (N, T', V) fp32 parent log-probabilities at the scored positions.
        positions: (T',) positions the LM head scores (every `stride`-th, ending at the last).
        cos, sin: (N, T, D) rotary tables.
        lm_loss: the parent's LM loss (nats/token).
    """

    ids: torch.Tensor
    h: list
    h_mid: list
    logp: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    lm_loss: float


@torch.no_grad()
def scored_positions(seq_len: int, stride: int) -> torch.Tensor:
    """Every `stride`-th position of a sequence, ending at the last one: (T',) int64."""
    return torch.arange(seq_len - 1, -1, -max(1, stride)).flip(0)


@torch.no_grad()
def parent_cache(parent, ids: torch.Tensor, chunk: int = 4, stride: int = 1) -> ParentCache:
    """Run the parent once over (N, T) ids and keep what replace-1-block scoring reuses."""
    parent.eval()
    h = parent.model.embed_tokens(ids)  # (N, T, C)
    cos, sin = parent.rope(parent.positions(ids.shape, 0, ids.device), h.dtype)
    hs, mids = [h], []
    for layer in parent.model.layers:
        mid = torch.empty_like(h)
        out = torch.empty_like(h)
        for s in range(0, ids.shape[0], chunk):
            e = s + chunk
            mid[s:e] = h[s:e] + layer.attention_delta(h[s:e], cos[s:e], sin[s:e])
            out[s:e] = mid[s:e] + layer.ffn_delta(mid[s:e])
        mids.append(mid)
        hs.append(out)
        h = out
    pos = scored_positions(ids.shape[1], stride)
    logp = torch.cat([F.log_softmax(parent.head(h[s:s + chunk, pos]).float(), -1) for s in range(0, ids.shape[0], chunk)])
    targets = next_token_targets(ids)[:, pos]
    nll = F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return ParentCache(ids, hs, mids, logp, pos, cos, sin, float(nll))


SUBBLOCKS = ("attention", "ffn", "block")


def _swapped_output(parent, cache: ParentCache, layer_idx: int, subblock: str, sub, s: int, e: int) -> torch.Tensor:
    """Residual stream after layer `layer_idx` with `sub` in place of one subblock or the whole block.

    Sequences s:e of the cache; returns (e - s, T, C).
    """
    layer = parent.model.layers[layer_idx]
    cos, sin = cache.cos[s:e], cache.sin[s:e]
    if subblock == "attention":
        h = cache.h[layer_idx][s:e]
        mid = h + (sub.attention_delta(h, cos, sin) if sub is not None else 0)
        return mid + layer.ffn_delta(mid)
    if subblock == "ffn":
        mid = cache.h_mid[layer_idx][s:e]
        return mid + (sub.ffn_delta(mid) if sub is not None else 0)
    if subblock == "block":  # coupled: attention and FFN variant together; None removes the layer
        h = cache.h[layer_idx][s:e]
        if sub is None:
            return h
        mid = h + sub.attention_delta(h, cos, sin)
        return mid + sub.ffn_delta(mid)
    raise ValueError(f"subblock must be one of {SUBBLOCKS}, got {subblock!r}")


@torch.no_grad()
def replace_one_scores(parent, cache: ParentCache, layer_idx: int, subblock: str, subs, chunk: int = 4,
                       weights: torch.Tensor | None = None) -> list[dict]:
    """`replace_one_score` for several candidates of the same layer and subblock at once.

    The candidates' swapped residual streams are stacked along the batch, so the remaining
    L - layer_idx - 1 layers and the LM head run once on k * chunk sequences instead of k times
    on chunk sequences (fewer, larger matmuls; memory grows k-fold: pass a smaller chunk).

    Args:
        subblock: "attention", "ffn" or "block" (a whole DecoderBlock, coupled scoring).
        subs: candidates as for `replace_one_score` (None = no_op).
        weights: (N, T') fp32 weights of the scored positions (`cache.positions`, e.g. `context_weights`
            columns): kl_nats is then sum(w * KL) / sum(w); the other metrics stay plain means. None: 1 each.

    Returns:
        One metrics dict per candidate, in order (the same values as `replace_one_score`, up to
        floating-point summation order).

    Raises:
        ValueError: an unknown subblock, or weights not of shape (N, T').
    """
    subs = list(subs)
    if subblock not in SUBBLOCKS:
        raise ValueError(f"subblock must be one of {SUBBLOCKS}, got {subblock!r}")
    k = len(subs)
    pos = cache.positions
    if weights is not None and tuple(weights.shape) != (cache.ids.shape[0], len(pos)):
        raise ValueError(f"weights must be (N, T') = {(cache.ids.shape[0], len(pos))} (the scored positions), "
                         f"got {tuple(weights.shape)}")
    targets = next_token_targets(cache.ids)[:, pos]
    sums = [{"kl_nats": 0.0, "lm_loss": 0.0, "top1_agree": 0.0, "cosine": 0.0, "tokens": 0, "lm_tokens": 0,
             "kl_weight": 0.0} for _ in subs]
    for s in range(0, cache.ids.shape[0], chunk):
        e = min(s + chunk, cache.ids.shape[0])
        n = e - s
        h = torch.cat([_swapped_output(parent, cache, layer_idx, subblock, sub, s, e) for sub in subs])  # (k*n, T, C)
        cos, sin = cache.cos[s:e].repeat(k, 1, 1), cache.sin[s:e].repeat(k, 1, 1)  # (k*n, T, D)
        h = parent.run_layers(h, cos, sin, start=layer_idx + 1)
        h = h[:, pos]  # (k*n, T', C)
        logits = parent.head(h)  # (k*n, T', V)
        final = cache.h[-1][s:e, pos].float()
        for j in range(k):
            part = slice(j * n, (j + 1) * n)
            m = token_metrics(logits[part], cache.logp[s:e], targets[s:e], None if weights is None else weights[s:e])
            for key in ("kl_nats", "lm_loss", "top1_agree", "tokens", "lm_tokens", "kl_weight"):
                sums[j][key] += m[key]
            sums[j]["cosine"] += float(F.cosine_similarity(h[part].float(), final, dim=-1).sum())
    return [{"kl_nats": weighted_kl(t), "lm_loss": t["lm_loss"] / max(1, t["lm_tokens"]),
             "top1_agree": t["top1_agree"] / t["tokens"], "cosine": t["cosine"] / t["tokens"]} for t in sums]


@torch.no_grad()
def replace_one_score(parent, cache: ParentCache, layer_idx: int, subblock: str, sub, chunk: int = 4,
                      weights: torch.Tensor | None = None) -> dict:
    """Metrics of the parent with one subblock of `layer_idx` replaced by `sub`.

    Args:
        subblock: "attention" or "ffn"; or "block" for a whole block (coupled: attention and FFN
            variant together, `sub` a full DecoderBlock as from init.compose_block).
        sub: a DecoderBlock holding only that subblock (init.attention_subblock / ffn_subblock
            layout), or None for no_op (for "block": the layer removed).
        weights: as for `replace_one_scores` (a weighted-mean KL).

    Returns:
        {"kl_nats", "lm_loss", "top1_agree", "cosine"} averaged per token.
    """
    return replace_one_scores(parent, cache, layer_idx, subblock, [sub], chunk, weights)[0]


def replace_block_score(parent, cache: ParentCache, layer_idx: int, block, chunk: int = 4) -> dict:
    """Coupled replace-1-block: the parent with its whole layer `layer_idx` replaced by `block`
    (a DecoderBlock holding an attention and an FFN variant, e.g. init.compose_block; None removes
    the layer). Same metrics as `replace_one_score`."""
    return replace_one_score(parent, cache, layer_idx, "block", block, chunk)


@torch.no_grad()
def parent_logprobs(parent, ids: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """(N, T) ids -> (N, T, V) fp32 parent log-probabilities, computed chunk by chunk."""
    parent.eval()
    return torch.cat([F.log_softmax(parent(ids[s:s + chunk]).float(), -1) for s in range(0, ids.shape[0], chunk)])


@torch.no_grad()
def context_weights(parent, ids: torch.Tensor, parent_logp: torch.Tensor, window: int = 32,
                    chunk: int = 64) -> torch.Tensor:
    """How much each position's next-token prediction needs more than the last `window` tokens.

    weight[n, t] = KL(p_parent(. | ids[n, :t+1]) || p_parent(. | ids[n, t-window+1:t+1])) in nats: the parent
    run on the whole prefix against the parent run on a window of the last `window` tokens alone. Zero where
    the prefix is no longer than the window (t < window). A child that keeps the parent's long-range context
    is one whose KL stays low where these weights are high; per-token subblocks (linear attention) lose it
    together although no one of them does alone (README, "Which scoring text chooses").

    Args:
        parent: the parent model (PuzzleForCausalLM).
        ids: (N, T) int64 tokens.
        parent_logp: (N, T, V) fp32 log-probabilities of the parent on `ids` (`parent_logprobs`).
        window: tokens the short context keeps (>= 1).
        chunk: windows per forward pass (each window runs the layers on `window` tokens and the LM head on the
            last one).

    Returns:
        (N, T) fp32 weights, >= 0.

    Raises:
        ValueError: window < 1, or parent_logp's shape does not match ids.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if tuple(parent_logp.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"parent_logp {tuple(parent_logp.shape)} does not match ids {tuple(ids.shape)}")
    parent.eval()
    n_seq, seq_len = ids.shape
    out = torch.zeros(n_seq, seq_len)
    if seq_len <= window:
        return out
    for n in range(n_seq):
        windows = ids[n, 1:].unfold(0, window, 1)  # (T - window, window): row j ends at position j + window
        for s in range(0, windows.shape[0], chunk):
            logits = parent(windows[s:s + chunk], logits_to_keep=1)[:, -1]  # (b, V)
            at = slice(window + s, window + s + logits.shape[0])
            out[n, at] = position_kl(F.log_softmax(logits.float(), -1), parent_logp[n, at]).clamp_min(0)
    return out


@torch.no_grad()
def evaluate_model(model, ids: torch.Tensor, parent_logp: torch.Tensor | None = None, chunk: int = 4,
                   weights: torch.Tensor | None = None) -> dict:
    """Whole-model quality on (N, T) ids: lm_loss (nats/token) and, given the parent's (N, T, V)
    log-probabilities, kl_nats (KL(parent || model), nats/token) and top1_agree.

    weights: (N, T) fp32 per-position weights (`context_weights`); given with parent_logp, kl_nats is the
    weighted mean sum(w * KL) / sum(w) instead of the plain mean (lm_loss and top1_agree stay plain).
    """
    model.eval()
    if weights is not None and (parent_logp is None or tuple(weights.shape) != tuple(ids.shape)):
        raise ValueError(f"weights need parent_logp and the shape of ids {tuple(ids.shape)}, got "
                         f"{None if weights is None else tuple(weights.shape)}")
    targets = next_token_targets(ids)
    sums = {"kl_nats": 0.0, "lm_loss": 0.0, "top1_agree": 0.0, "tokens": 0, "lm_tokens": 0, "kl_weight": 0.0}
    for s in range(0, ids.shape[0], chunk):
        logits = model(ids[s:s + chunk])
        if parent_logp is None:
            logq = F.log_softmax(logits.float(), -1)
            sums["lm_loss"] += float(F.nll_loss(logq.reshape(-1, logq.shape[-1]), targets[s:s + chunk].reshape(-1),
                                                ignore_index=-100, reduction="sum"))
            sums["lm_tokens"] += int((targets[s:s + chunk] != -100).sum())
            sums["tokens"] += logits.shape[0] * logits.shape[1]
            continue
        m = token_metrics(logits, parent_logp[s:s + chunk], targets[s:s + chunk],
                          None if weights is None else weights[s:s + chunk])
        for k in sums:
            sums[k] += m[k]
    out = {"lm_loss": sums["lm_loss"] / max(1, sums["lm_tokens"]), "tokens": sums["tokens"]}
    if parent_logp is not None:
        out["kl_nats"] = weighted_kl(sums)
        out["top1_agree"] = sums["top1_agree"] / sums["tokens"]
    return out


#: (path, skipped line numbers) a ResultLog warned of in this process: refine reads its memo once per child
_WARNED_LOGS: set = set()


class ResultLog:
    """Append-only JSON-lines log of finished candidates, so scoring resumes after an interruption.

    Each line is flushed and fsynced; a torn last line (killed mid-write, so no newline ends the file) is ignored on
    reading and cut off by the next append. Any other line that is no result (a damaged or hand-edited file) is
    skipped too, with a warning naming the file and its line numbers (once per process), so what those lines held is
    computed again unless a later line holds it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def _result(line: str | bytes) -> dict | None:
        """The logged result a line holds (a JSON object with a string "key"), else None."""
        try:
            row = json.loads(line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line)
        except (json.JSONDecodeError, RecursionError):
            return None
        return row if isinstance(row, dict) and isinstance(row.get("key"), str) else None

    def read(self) -> dict:
        """The logged rows by their "key". Warns (UserWarning) of skipped lines other than a torn last one."""
        done, skipped = {}, []
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.is_file() else ""
        lines = text.split("\n")  # JSON lines end in "\n" alone (a U+2028 in a string is no line end), as
        if lines[-1] == "":  # `set_aside_skipped` splits them; "" after the last newline (or of an empty file)
            lines.pop()
        for number, line in enumerate(lines, 1):
            if (row := self._result(line)) is not None:
                done[row["key"]] = row
            elif line.strip() and (number < len(lines) or text.endswith("\n")):  # not a torn last line: news
                skipped.append(number)
        if skipped and (str(self.path), tuple(skipped)) not in _WARNED_LOGS:
            _WARNED_LOGS.add((str(self.path), tuple(skipped)))
            shown = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            many = len(skipped) > 1
            warnings.warn(f"{self.path}: line{'s' * many} {shown} {'are' if many else 'is'} not a logged result "
                          f"(damaged or edited) and {'are' if many else 'is'} skipped; what {'they' if many else 'it'} "
                          f"held is computed again unless a later line holds it", stacklevel=2)
        return done

    def set_aside_skipped(self) -> Path | None:
        """Move the lines `read` skips (damaged or edited; a torn last line stays for `append`) out of the log: they
        are appended to <log>.skipped and the log is rewritten without them (atomically), so they are warned of once,
        not at every later read (stop 76's leftover). Only for a log no other process appends to meanwhile (the run
        lock held). Returns the .skipped file, or None where no line was set aside."""
        from puzzle.io import atomic_write_bytes

        if not self.path.is_file():
            return None
        *lines, tail = self.path.read_bytes().split(b"\n")  # tail: b"" after a last newline, else a torn line
        moved = [line for line in lines if line.strip() and self._result(line) is None]
        if not moved:
            return None
        aside = self.path.with_name(self.path.name + ".skipped")
        with open(aside, "ab") as f:  # first: a kill between the two writes keeps the lines in both, never neither
            f.write(b"".join(line + b"\n" for line in moved))
            f.flush()
            os.fsync(f.fileno())
        kept = [line for line in lines if not line.strip() or self._result(line) is not None]
        atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept) + tail)
        return aside

    def append(self, row: dict) -> None:
        """Add `row` (JSON-serialisable, with a "key") as one line, flushed and fsynced; a torn last line is cut off
        first, and a whole one that lacks its newline (a hand edit) gets one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = ""
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # no newline at the end: a line torn by a kill mid-write, or an edit
                    f.seek(0)
                    data = f.read()
                    cut = data.rfind(b"\n") + 1
                    try:
                        json.loads(data[cut:])
                        start = "\n"  # a whole line (reviewer: it was cut off, and lost)
                    except (ValueError, RecursionError):  # torn: cut it off, so it never sits mid-file
                        f.seek(0)
                        f.truncate(cut)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(start + json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
