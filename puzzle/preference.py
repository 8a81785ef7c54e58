"""Preference optimization of a child (`puzzle rpo`): data, reference log-probs, offline and online training.

    data       jsonl/json/parquet records, either pairs {prompt, chosen, rejected[, chosen_reward,
               rejected_reward]} or K-response groups {prompt, responses, rewards}; a prompt is a string
               (used as is) or chat messages (rendered with the tokenizer's chat template, generation
               prompt added). Only response tokens are scored; an EOS token ends every response.
    reference  π_ref is a frozen copy of the starting model, or its log-probs precomputed once and
               cached on disk (atomic safetensors file keyed by the data's tokens and the model's weights).
    offline    `train_offline`: the losses of `puzzle.rpo` on fixed data (`puzzle rpo --data` refuses rloo, a
               policy gradient on the policy's own samples).
    online     `train_online`: each step samples K responses per prompt from the current policy
               (`sample`, temperature sampling with a KV cache), scores them with a reward function
               (`puzzle.rewards`), and optimises: pair losses on the best and worst of the K, rpo-multi
               on all K, or RLOO.
    evaluate   `evaluate_rewards` (reward of generated answers, with confidence intervals) and
               `preference_accuracy` (implicit-reward accuracy on held-out pairs, with standard error).

The model is any PuzzleForCausalLM, with or without adapters (`puzzle.adapters`): the trainers optimise
whatever parameters require gradients. Library code: nothing prints; progress goes to tqdm when asked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import pandas as pd
import torch

from .errors import PuzzleError, is_finite_number, require_finite, require_learning_rate
from .io import atomic_save_safetensors, dir_arg
from .modeling import KVCache
from .rpo import (AGGREGATES, LOSSES, PAIR_LOSSES, check_loss, check_rewards, needs_reference, needs_rewards,
                  preference_loss)
from .runlock import claim_folder

# ------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class PreferenceRecord:
    """One prompt with K >= 2 responses and, optionally, one explicit reward per response.

    Attributes:
        prompt: text (used as is) or chat messages, a tuple of {"role", "content"} dicts.
        responses: K response texts; for a pair, (chosen, rejected).
        rewards: K floats, or None when the data has none.
        is_pair: whether the record came from the {prompt, chosen, rejected} format.
    """

    prompt: object
    responses: tuple[str, ...]
    rewards: tuple[float, ...] | None = None
    is_pair: bool = False


def _messages(value, where: str) -> tuple[dict, ...]:
    """Chat messages as (role, content) dicts, roles as `sft.ROLES` (breaker: rpo took "tool", which sft refuses)."""
    from .sft import ROLES

    if not value:  # breaker: {"prompt": []} ended in the chat template's ValueError traceback
        raise PuzzleError(f"{where}: the list of messages is empty; an empty prompt cannot condition a response")
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES for m in value):
        raise PuzzleError(f"{where}: chat messages must be objects with a 'role' in {ROLES} and a string 'content'")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _response_text(value, where: str) -> tuple[tuple[dict, ...], str]:
    """A response given as text, or as messages ending with the assistant's turn -> (prefix, text)."""
    if isinstance(value, str):
        return (), value
    if isinstance(value, list) and value:
        msgs = _messages(value, where)
        if msgs[-1]["role"] != "assistant":
            raise PuzzleError(f"{where}: a response given as messages must end with an assistant message")
        return msgs[:-1], msgs[-1]["content"]
    raise PuzzleError(f"{where}: a response must be a string or a list of chat messages")


#: the largest reward magnitude the data may hold: the RPO losses square eta-scaled reward differences in float32
#: (at most 3.4e38), so 1e300 became inf there and was reported as a missing reward (breaker)
MAX_REWARD = 1e9


def _reward(value, where: str) -> float:
    if not is_finite_number(value):
        raise PuzzleError(f"{where}: rewards must be finite numbers, got {value!r}")
    if abs(value) > MAX_REWARD:
        raise PuzzleError(f"{where}: reward {value:g} is beyond +-{MAX_REWARD:g}: the losses square scaled reward "
                          f"differences in float32, which overflow; rescale the rewards (a common factor on "
                          f"them acts as that factor on --eta)")
    return float(value)


def record_from_dict(d: dict, where: str = "record") -> PreferenceRecord:
    """Parse one pair or group record (formats in the module docstring).

    Pairs whose chosen/rejected are full conversations (messages ending with the assistant's reply)
    may omit `prompt`: their shared prefix is the prompt. Raises PuzzleError naming `where` for a
    record in neither format, a missing field, only one of the two pair rewards, or a rewards list
    whose length differs from the responses'.
    """
    if not isinstance(d, dict):
        raise PuzzleError(f"{where}: expected a JSON object")
    if "chosen" in d or "rejected" in d:
        if "chosen" not in d or "rejected" not in d:
            raise PuzzleError(f"{where}: a pair needs both 'chosen' and 'rejected'")
        pre_c, chosen = _response_text(d["chosen"], f"{where}, chosen")
        pre_l, rejected = _response_text(d["rejected"], f"{where}, rejected")
        if "prompt" in d:
            prompt = d["prompt"]
        elif pre_c and pre_c == pre_l:
            prompt = list(pre_c)
        else:
            raise PuzzleError(f"{where}: no 'prompt' (and chosen/rejected are not conversations with the same prefix)")
        has = ("chosen_reward" in d, "rejected_reward" in d)
        if has[0] != has[1]:
            raise PuzzleError(f"{where}: give both chosen_reward and rejected_reward, or neither")
        rewards = (_reward(d["chosen_reward"], where), _reward(d["rejected_reward"], where)) if all(has) else None
        if rewards is not None and rewards[0] < rewards[1]:  # breaker: dpo and the reward losses trained opposite ways
            raise PuzzleError(f"{where}: chosen_reward {rewards[0]:g} is below rejected_reward {rewards[1]:g}, so the "
                              f"pair contradicts itself (dpo follows the labels, the rpo losses the rewards); swap "
                              f"chosen and rejected, or fix the rewards")
        responses, is_pair = (chosen, rejected), True
    elif "responses" in d:
        prompt = d.get("prompt")
        if not isinstance(d["responses"], list) or len(d["responses"]) < 2:
            raise PuzzleError(f"{where}: 'responses' must be a list of at least 2 responses")
        responses = tuple(_response_text(r, f"{where}, response {i}")[1] for i, r in enumerate(d["responses"]))
        rewards = d.get("rewards")
        if rewards is not None:
            if not isinstance(rewards, list) or len(rewards) != len(responses):
                raise PuzzleError(f"{where}: 'rewards' must be a list with one number per response ({len(responses)})")
            rewards = tuple(_reward(r, where) for r in rewards)
        is_pair = False
    else:
        raise PuzzleError(f"{where}: expected a pair {{prompt, chosen, rejected}} or a group {{prompt, responses, rewards}}")
    if isinstance(prompt, list):
        prompt = _messages(prompt, f"{where}, prompt")
    elif not isinstance(prompt, str):
        raise PuzzleError(f"{where}: 'prompt' must be a string or a list of chat messages")
    return PreferenceRecord(prompt, tuple(responses), rewards, is_pair)


def read_preference_data(path) -> list[PreferenceRecord]:
    """Records from a .jsonl(.gz), a .json list or a .parquet file.

    Raises:
        PuzzleError: a missing file, an unknown extension, a bad line (named), or no records.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "is not a regular file" if path.exists() else \
            "does not exist"  # breaker: /dev/null "did not exist"
        raise PuzzleError(f"preference data {path} {what}; give a .jsonl, .json or .parquet file of preference records")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        from .data import iter_json_lines

        rows = [(f"{path}, line {line}", record) for line, record in iter_json_lines(path)]
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PuzzleError(f"{path} is not UTF-8 JSON ({e}); a .json file holds one list of records") from e
        if not isinstance(data, list):
            raise PuzzleError(f"{path}: a .json file must hold a list of records")
        rows = [(f"{path}, record {i}", r) for i, r in enumerate(data)]
    elif name.endswith(".parquet"):
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError, ImportError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise PuzzleError(f"{path} cannot be read as parquet ({e})") from e
        rows = [(f"{path}, row {i}", json.loads(json.dumps(r, default=lambda o: o.tolist()))) for i, r in
                enumerate(df.to_dict("records"))]
    else:
        raise PuzzleError(f"{path}: unknown preference data format; use .jsonl, .jsonl.gz, .json or .parquet")
    records = [record_from_dict(r, where) for where, r in rows]
    if not records:
        raise PuzzleError(f"{path} holds no records")
    return records


def _best_worst(rewards) -> tuple[int, int] | None:
    """Indices (best, worst) of the highest and lowest of K rewards (the first of equals); None when all tie."""
    hi = max(range(len(rewards)), key=lambda i: rewards[i])
    lo = min(range(len(rewards)), key=lambda i: rewards[i])
    return None if rewards[hi] == rewards[lo] else (hi, lo)


def best_worst_pair(record: PreferenceRecord) -> PreferenceRecord | None:
    """The highest- and lowest-reward responses of a rewarded group as a pair; None when all rewards tie."""
    if record.rewards is None:
        raise PuzzleError("best_worst_pair needs rewards")
    if (ends := _best_worst(record.rewards)) is None:
        return None
    return PreferenceRecord(record.prompt, tuple(record.responses[i] for i in ends),
                            tuple(record.rewards[i] for i in ends), True)


def hhh_alignment_records(sdist_path) -> list[PreferenceRecord]:
    """The 221 BIG-bench HHH-alignment pairs (harmless, helpful, honest, other) from the bigbench 1.0.0 sdist.

    Each example's input becomes one user message; its reply scored 1 is chosen, the one scored 0
    rejected. Evaluation only: the files carry a "do not train on this" canary and 1/0 labels (no
    graded reward), so the records have no rewards. Streams the members with tarfile (about 30 s).
    """
    import tarfile

    path = Path(sdist_path)
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist; `pip download --no-deps --no-binary :all: bigbench==1.0.0` "
                          "fetches it (358 MB)")
    records = []
    with tarfile.open(path, "r:gz") as tf:
        for member in tf:
            if "/hhh_alignment/" not in member.name or not member.name.endswith("/task.json"):
                continue
            for ex in json.load(tf.extractfile(member)).get("examples", ()):  # the parent task.json lists subtasks only
                scores = ex["target_scores"]
                chosen = [t for t, s in scores.items() if s == 1]
                rejected = [t for t, s in scores.items() if s == 0]
                if len(chosen) == 1 and len(rejected) == 1:
                    records.append(PreferenceRecord(({"role": "user", "content": ex["input"].strip()},),
                                                    (chosen[0].strip(), rejected[0].strip()), None, True))
    if not records:
        raise PuzzleError(f"{path} holds no hhh_alignment tasks; is it the bigbench 1.0.0 sdist?")
    return records


# ------------------------------------------------------------------------------------------------
# tokens


@dataclass(frozen=True)
class EncodedRecord:
    """A record as token ids: prompt_ids (P,), K response id tuples, rewards or None, and whether it is a pair
    with the chosen response first (a {prompt, chosen, rejected} record, a 2-response group whose rewards differ,
    put best first by `encode_records`, or `_pair_of` a sampled group)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...] | None
    is_pair: bool = False
    truncated: bool = False  # a response was cut to max_response_tokens


def encode_prompt(tokenizer, prompt, string_prompts: str = "raw") -> list[int]:
    """Prompt token ids: chat messages through the chat template (generation prompt added); strings
    as is (`string_prompts="raw"`) or as one user message (`"chat"`).

    Raises PuzzleError when messages need a chat template the tokenizer lacks, or the prompt is empty.
    """
    if isinstance(prompt, str) and string_prompts == "chat":
        prompt = ({"role": "user", "content": prompt},)
    elif string_prompts not in ("raw", "chat"):
        raise PuzzleError(f"string_prompts must be 'raw' or 'chat', got {string_prompts!r}")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise PuzzleError("the prompts are chat messages but the tokenizer has no chat template; "
                              "give plain-text prompts or a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise PuzzleError("an empty prompt cannot condition a response; give every record a non-empty prompt")
    return list(ids)


def encode_response(tokenizer, text: str, append_eos: bool = True) -> list[int]:
    """Response token ids, EOS appended (it is scored: ending the answer is part of the response)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_records(tokenizer, records: list[PreferenceRecord], *, max_prompt_tokens: int = 512,
                   max_response_tokens: int = 256, append_eos: bool = True,
                   string_prompts: str = "raw") -> list[EncodedRecord]:
    """Tokenize records; prompts keep their last `max_prompt_tokens`, responses their first `max_response_tokens`.

    A group of two responses whose rewards differ becomes a pair, its better response first (a group's order
    means nothing: pair losses and their margins take column 0 as the chosen response)."""
    from .parent import transformers_quiet

    out, cut_prompts, cut_responses = [], 0, 0
    for r in records:
        with transformers_quiet():  # its "indexing errors" note on a long text: cut here, as said below (breaker)
            prompt = encode_prompt(tokenizer, r.prompt, string_prompts)
            whole = [encode_response(tokenizer, t, append_eos) for t in r.responses]
        long = sum(len(x) > max_response_tokens for x in whole)
        cut_prompts, cut_responses = cut_prompts + (len(prompt) > max_prompt_tokens), cut_responses + long
        prompt = prompt[-max_prompt_tokens:]
        responses = tuple(tuple(x[:max_response_tokens]) for x in whole)
        if any(len(x) == 0 for x in responses):
            raise PuzzleError("a response has no tokens; drop empty responses or keep append_eos=True")
        record = EncodedRecord(tuple(prompt), responses, r.rewards, r.is_pair, truncated=long > 0)
        if not r.is_pair and len(responses) == 2 and r.rewards is not None:
            record = _pair_of(record) or record  # rewards that tie leave a group (no chosen response)
        out.append(record)
    if cut_prompts or cut_responses:  # breaker: a 40000-token prompt was cut to its last 512 without a word
        parts = [f"{cut_prompts} prompt(s) longer than {max_prompt_tokens} tokens keep their last {max_prompt_tokens}",
                 f"{cut_responses} response(s) longer than {max_response_tokens} tokens keep their first "
                 f"{max_response_tokens}"]
        warnings.warn(", ".join(part for part, n in zip(parts, (cut_prompts, cut_responses)) if n))  # breaker: "0 ..."
    return out


# ------------------------------------------------------------------------------------------------
# log-probabilities of responses


def response_logprobs(model, prompts: list, responses: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(y|x) of each response given its prompt, scoring response tokens only.

    Args:
        model: a PuzzleForCausalLM (its `run_layers`/`head` pieces are used so that the LM head runs
            on response positions only).
        prompts, responses: N token-id sequences each (prompt non-empty).
    Returns:
        sum_logp (N,) in nats, in the model's dtype (fp32 at least; gradients flow when enabled),
        and num_tokens (N,) int64.
    """
    N = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    T = max(lengths)
    device = next(model.parameters()).device
    ids = torch.zeros(N, T, dtype=torch.long)
    sel = torch.zeros(N, T - 1, dtype=torch.bool)  # position t predicts token t + 1, a response token
    for n, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise PuzzleError("an empty prompt cannot condition a response")
        ids[n, :lengths[n]] = torch.tensor(list(p) + list(r))
        sel[n, len(p) - 1:len(p) + len(r) - 1] = True
    ids, sel = ids.to(device), sel.to(device)
    h = model.model.embed_tokens(ids)  # (N, T, C)
    cos, sin = model.rope(model.positions((N, T), 0, device), h.dtype)
    h = model.run_layers(h, cos, sin)  # right padding only follows the real tokens: causal attention is enough
    logits = model.head(h[:, :-1][sel])  # (M, V) for the M response tokens
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = ids[:, 1:][sel]  # (M,)
    token_logp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (M,)
    rows = sel.nonzero()[:, 0]  # (M,) which response each token belongs to
    sum_logp = torch.zeros(N, dtype=token_logp.dtype, device=device).index_add(0, rows, token_logp)
    return sum_logp, sel.sum(1).cpu()


def _flat(encoded: list[EncodedRecord]) -> tuple[list, list]:
    prompts, responses = [], []
    for r in encoded:
        for y in r.response_ids:
            prompts.append(r.prompt_ids)
            responses.append(y)
    return prompts, responses


def batched_logprobs(model, prompts: list, responses: list, batch_size: int = 8, progress: bool = False):
    """`response_logprobs` over many responses in batches, without gradients -> (N,) float64, (N,) int64."""
    pieces = [slice(i, i + batch_size) for i in range(0, len(prompts), batch_size)]
    sums, counts = _chunked_logprobs(model, prompts, responses, pieces, progress)
    return sums.double().cpu(), counts


@torch.no_grad()
def _chunked_logprobs(model, prompts: list, responses: list, pieces: list[slice],
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` without gradients, one piece at a time (`token_chunks`, or batches): (N,) sums in the
    model's dtype (fp32 at least), (N,) token counts."""
    from tqdm.auto import tqdm

    parts = [response_logprobs(model, prompts[c], responses[c])
             for c in tqdm(pieces, disable=not progress, desc="reference log-probs", leave=False)]
    return torch.cat([s for s, _ in parts]), torch.cat([c for _, c in parts])


def _reference_sums(reference, batch: list) -> torch.Tensor:
    """(R,) float64 summed log-probs of π_ref (a frozen copy) over the flattened responses of `batch`, in pieces."""
    prompts, responses = _flat(batch)
    pieces = token_chunks(prompts, responses, grad_chunk_tokens(reference))
    return _chunked_logprobs(reference, prompts, responses, pieces)[0].double()


def weights_sha256(model) -> str:
    """sha256 of a model's architecture (its config without `extra`, which holds where it was loaded from, as
    `pipeline.weights_sha` leaves it out) and every parameter and buffer, in name order (a cache key): the same
    weights loaded from a moved folder give the same hash."""
    return _state_sha256(model, {k: v for k, v in model.config.to_dict().items() if k != "extra"})


def _state_sha256(model, config: dict) -> str:
    """sha256 of `config` (as sorted JSON) and every parameter and buffer's name and bytes, in name order."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_sha(prompts: list, responses: list) -> str:
    """16 hex digits of sha256 over the token ids of every (prompt, response), in order: the data half of a
    reference key."""
    return hashlib.sha256(json.dumps([prompts, responses]).encode()).hexdigest()[:16]


def frozen_copy(model):
    """A deep copy of `model` in eval mode with no parameter requiring gradients (π_ref)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass(frozen=True)
class ReferenceLogprobs:
    """π_ref's summed log-probs of every response of a data set, flattened in record order.

    Attributes:
        sum_logp: (R,) float64 nats; num_tokens: (R,) int64; key: the cache key "<data>-<model>", 16 hex
            digits each (`_data_sha` of the token ids, `weights_sha256` of π_ref); the trainers and
            `preference_accuracy` check its data half against the records they are given.
    """

    sum_logp: torch.Tensor
    num_tokens: torch.Tensor
    key: str


def reference_logprobs(ref_model, encoded: list[EncodedRecord], cache_dir=None, batch_size: int = 8,
                       progress: bool = False) -> ReferenceLogprobs:
    """Reference log-probs of every response, read from `cache_dir` when cached, else computed (and cached).

    `ref_model` is π_ref: a frozen copy, or the policy itself before it trains (it runs in eval mode
    without gradients, and its mode is restored after, so no copy is needed). The key hashes the token
    ids of every prompt and response and `weights_sha256(ref_model)`, so other data or other weights
    never reuse a stale file, and the same weights loaded from elsewhere do. The file is written
    atomically. A file of an earlier version (whose key also hashed the config's `extra`) is still
    read when it matches, and saved under the current key.
    """
    from safetensors.torch import load_file

    prompts, responses = _flat(encoded)
    key = f"{_data_sha(prompts, responses)}-{weights_sha256(ref_model)[:16]}"
    path = Path(cache_dir) / f"ref_logprobs-{key}.safetensors" if cache_dir is not None else None
    found = (path if path is not None and path.is_file()
             else _legacy_cache_file(cache_dir, ref_model, prompts, responses))
    if found is not None and found.is_file():
        t = load_file(str(found))
        if t["sum_logp"].shape[0] == len(prompts):
            if found != path:
                atomic_save_safetensors(t, path, {"key": key, "responses": len(prompts)})
            return ReferenceLogprobs(t["sum_logp"], t["num_tokens"], key)
    training = ref_model.training
    try:
        sums, counts = batched_logprobs(ref_model.eval(), prompts, responses, batch_size, progress)
    finally:
        ref_model.train(training)
    if path is not None:
        atomic_save_safetensors({"sum_logp": sums, "num_tokens": counts}, path,
                                {"key": key, "responses": len(prompts)})
    return ReferenceLogprobs(sums, counts, key)


def _drop_stale_references(cache_dir: Path, key: str, say) -> None:
    """Remove the reference log-prob files in an rpo output's own `cache_dir` other than the one keyed `key` (an
    interrupted run on other data or weights left them; this folder's run will never read them again)."""
    keep = f"ref_logprobs-{key}.safetensors"
    stale = [f for f in Path(cache_dir).glob("ref_logprobs-*.safetensors") if f.name != keep]
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:  # leftover: they stayed in the folder for good
        say(f"rpo: removed {len(stale)} reference log-prob file(s) of other data or weights from {cache_dir}")


def _legacy_cache_file(cache_dir, ref_model, prompts: list, responses: list) -> Path | None:
    """The cache file an earlier version would have written for these data and weights (its key, 32 hex digits,
    hashed the whole config, `extra` included); looked for only when `cache_dir` holds such files, since it
    hashes every weight once more."""
    if cache_dir is None:
        return None
    prefix = "ref_logprobs-"
    if not any(len(f.stem) == len(prefix) + 32 and "-" not in f.stem[len(prefix):]
               for f in Path(cache_dir).glob(f"{prefix}*.safetensors")):
        return None
    h = hashlib.sha256(_state_sha256(ref_model, ref_model.config.to_dict()).encode())
    h.update(json.dumps([prompts, responses]).encode())
    return Path(cache_dir) / f"{prefix}{h.hexdigest()[:32]}.safetensors"


def _check_reference(reference: ReferenceLogprobs, prompts: list, responses: list, what: str = "reference") -> None:
    """Refuse precomputed log-probs of other records: the count, then the data half of the key.

    Raises:
        PuzzleError: naming both counts, or both data hashes.
    """
    if reference.sum_logp.shape[0] != len(prompts):
        raise PuzzleError(f"the {what} log-probs cover {reference.sum_logp.shape[0]} responses, the data "
                          f"{len(prompts)}; compute them for this data (reference_logprobs)")
    data = _data_sha(prompts, responses)
    if reference.key.split("-")[0] != data:
        raise PuzzleError(f"the {what} log-probs were computed for other records (key {reference.key}, this "
                          f"data hashes to {data}); compute them for this data (reference_logprobs)")


# ------------------------------------------------------------------------------------------------
# sampling from the policy


@torch.no_grad()
def sample(model, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           eos_token_id=None, pad_token_id: int = 0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample a continuation of each prompt from `model` with a KV cache (temperature 0: greedy).

    Prompts of different lengths are left-padded; the attention mask hides the padding and position
    ids start at 0 on each prompt's first token, so every row decodes as if alone.

    Args:
        prompts: B token-id sequences (non-empty).
        max_new_tokens: at most this many tokens per continuation.
        temperature: softmax temperature; 0 picks the argmax.
        top_k: keep the k most likely tokens before sampling (0: all).
        eos_token_id: an id or list of ids that end a continuation (kept in the output).
        generator: a torch.Generator for reproducible samples.
    Returns:
        B lists of new token ids, each ending at its first EOS (included) or after max_new_tokens.
    Raises:
        PuzzleError: temperature below 0, or the longest prompt and max_new_tokens past the model's positions.
    """
    if temperature < 0:
        raise PuzzleError(f"temperature must be >= 0, got {temperature}")
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > (positions := model.config.max_position_embeddings):  # breaker: 100000 was cached
        raise PuzzleError(f"a prompt of {P} tokens and {max_new_tokens} new ones pass the {positions} positions the "
                          f"model was trained on; give max_new_tokens (--max-new-tokens) {max(positions - P, 0)} or "
                          f"less, or shorter prompts")
    param = next(model.parameters())
    device = param.device
    ids = torch.full((B, P), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1  # generated positions are real too
    ids, mask = ids.to(device), mask.to(device)
    padded = any(len(p) != P for p in prompts)
    positions = (mask[:, :P].cumsum(1) - 1).clamp(min=0)  # (B, P)
    cache = KVCache(model.config, B, P + max_new_tokens, param.dtype, device)
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])),
                       dtype=torch.long, device=device)
    logits = model(ids, position_ids=positions, cache=cache, attention_mask=mask[:, :P] if padded else None,
                   logits_to_keep=1)[:, -1]  # (B, V)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)  # (B,)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).squeeze(-1).to(device)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1  # (B, 1)
        logits = model(nxt[:, None], position_ids=positions, cache=cache,
                       attention_mask=mask[:, :P + t + 1] if padded else None)[:, -1]
    new = torch.stack(out, 1).cpu()  # (B, n)
    result = []
    for b in range(B):
        row = new[b].tolist()
        ends = [i for i, x in enumerate(row) if x in set(eos.tolist())]
        result.append(row[:ends[0] + 1] if ends else row)
    return result


# ------------------------------------------------------------------------------------------------
# training


#: the largest --beta taken: far above the published settings (DPO 0.1, SimPO 2-10), below float32's trouble
MAX_BETA = 1000.0


@dataclass(frozen=True)
class RPOConfig:
    """Settings of one preference-optimization run (offline or online).

    Loss: `loss` (see puzzle.rpo.LOSSES), `beta` β, `eta` η, `gamma` SimPO's margin γ, `aggregate`
    "sum" (summed token log-probs, default) or "mean" (length-averaged), `kl_coef` RLOO's KL penalty.
    Optimisation: AdamW with `lr`, linear warmup over `warmup_steps`, then constant; gradient norm
    clipped to `max_grad_norm`; `batch_size` prompts per step for `steps` steps.
    Online: `k` samples per prompt of at most `max_new_tokens` tokens at `temperature` (`top_k`).
    """

    loss: str = "rpo-bwd-kl"
    beta: float = 0.1
    eta: float = 1.0
    gamma: float = 0.5
    aggregate: str = "sum"
    kl_coef: float = 0.0
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_prompt_tokens: int = 512
    max_response_tokens: int = 256
    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        check_loss(self.loss)
        if self.aggregate not in AGGREGATES:
            raise PuzzleError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        # one message per setting, naming its flag where it has one (reviewer: one message listed all four; nan and
        # inf named no flag)
        if not is_finite_number(self.temperature) or self.temperature <= 0:  # the reason is 0's, not nan's (breaker)
            why = (": a group's responses are sampled, and greedy decoding (0) would make all k of them alike"
                   if is_finite_number(self.temperature) else "")
            raise PuzzleError(f"--temperature (rpo temperature) must be a finite number > 0, got "
                              f"{self.temperature}{why}")
        if not is_finite_number(self.kl_coef) or self.kl_coef < 0:
            raise PuzzleError(f"--kl-coef (rpo kl_coef) must be a finite number >= 0, got {self.kl_coef}")
        require_finite("rpo", beta=self.beta, eta=self.eta, gamma=self.gamma, lr=self.lr,
                       weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)
        if self.beta <= 0 or self.eta <= 0:
            raise PuzzleError(f"beta and eta must be > 0 (got beta={self.beta}, eta={self.eta})")
        if self.gamma < 0:  # breaker: accepted, while beta, eta and kl_coef are checked
            raise PuzzleError(f"--gamma (SimPO's target reward margin: how far the chosen response's reward should "
                              f"exceed the rejected one's) must be >= 0, got {self.gamma}")
        if self.beta > MAX_BETA:  # breaker: 1e30 overflowed the gradient, and 5 steps at loss ln 2 "succeeded"
            raise PuzzleError(f"--beta {self.beta:g} is above {MAX_BETA:g}: the loss saturates (its gradient vanishes "
                              f"or overflows float32) and nothing is learned; DPO uses about 0.1, SimPO 2 to 10")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise PuzzleError(f"rpo weight_decay must be >= 0 and max_grad_norm > 0 (got weight_decay="
                              f"{self.weight_decay}, max_grad_norm={self.max_grad_norm})")
        if self.loss == "rloo" and (self.temperature != 1 or self.top_k):  # Ahmadian et al. 2024: on-policy
            raise PuzzleError(f"rloo samples the policy itself (temperature 1, no top-k): its gradient is unbiased "
                              f"only for the distribution it samples from, and log-probs are scored at temperature 1 "
                              f"over the whole vocabulary (got temperature={self.temperature}, top_k={self.top_k}); "
                              f"drop --temperature (and keep top_k 0), or use a pair loss or rpo-multi")
        # each named by its flag where it has one (leftover: "warmup_steps and top_k must be >= 0" for --warmup-steps)
        flag = lambda name: f"--{name.replace('_', '-')} (rpo {name})" if name in RPO_FLAGS else f"rpo {name}"  # noqa
        for name, least in (("warmup_steps", 0), ("top_k", 0), ("steps", 1), ("batch_size", 1),
                            ("max_prompt_tokens", 1), ("max_response_tokens", 1), ("max_new_tokens", 1)):
            if getattr(self, name) < least:
                raise PuzzleError(f"{flag(name)} must be >= {least}, got {getattr(self, name)}")
        if not 2 <= self.k <= MAX_K:  # breaker: --k 100000 sampled every response at once, 24 GB and a kill
            raise PuzzleError(f"--k (rpo k) must be from 2 to {MAX_K} (responses to compare per prompt; RLOO and GRPO "
                              f"use about 4 to 64), got {self.k}")
        require_learning_rate("rpo", self.lr)
        if self.warmup_steps > self.steps:  # breaker: 1000 of 2 steps trained at 1e-8 and said nothing
            warnings.warn(f"{flag('warmup_steps')} {self.warmup_steps} is more than {flag('steps')} {self.steps}, so "
                          f"the learning rate rises only to {self.steps / self.warmup_steps:.0%} of --lr; give "
                          f"--warmup-steps {self.steps} or fewer, or more --steps", stacklevel=3)

    @property
    def logprob_label(self) -> str:
        """What the run's log-probs are, for reports: SimPO is always length-averaged."""
        if self.loss == "simpo":
            return "mean over response tokens (SimPO's definition)"
        return "sum over response tokens" if self.aggregate == "sum" else "mean over response tokens"


#: RPOConfig fields that `puzzle rpo` sets from a flag of the same name (--warmup-steps for warmup_steps)
RPO_FLAGS = ("warmup_steps", "steps", "batch_size", "max_new_tokens", "k")

#: the most responses per prompt (--k) a run samples; responses are sampled SAMPLE_CHUNK sequences at a time
MAX_K, SAMPLE_CHUNK = 1024, 64
#: activation bytes one forward of a training step may keep for its backward on a CPU (on CUDA half the memory free
#: then): a larger step is trained in pieces (`_train_step`)
GRAD_CHUNK_BYTES = 2 * 2**30


def activation_bytes_per_token(model) -> int:
    """Estimated bytes of activations a forward with gradients keeps per token for the backward: per layer 10 C + 3 F
    elements in the model's dtype (the residual stream, norms, q, k, v and attention outputs, about 10 widths of C,
    and the SwiGLU's gate, up and product; F the block's own width, 0 without a SwiGLU), plus 3 V fp32 values for the
    LM head (logits, their log-softmax and its gradient). SmolLM2-135M: 1.83 MB; measured about 1.5 MB (`puzzle rpo
    --k 64`: 7.7 GB peak on 3584 padded tokens, before the pieces)."""
    c = model.config
    itemsize = next(model.parameters()).element_size()
    widths = sum(10 * c.hidden_size + 3 * (b.ffn.intermediate_size or 0) for b in c.blocks)
    return widths * itemsize + 3 * c.vocab_size * 4


def grad_chunk_tokens(model) -> int:
    """Padded tokens (responses x the longest prompt + response) one forward with gradients takes: GRAD_CHUNK_BYTES,
    or on CUDA half the device's free memory (when it can be read), over `activation_bytes_per_token`."""
    from .scoring.cost import available_bytes

    budget, device = GRAD_CHUNK_BYTES, next(model.parameters()).device
    if device.type == "cuda" and (free := available_bytes(str(device))) is not None:
        budget = free // 2  # reviewer: a 2 GiB floor could exceed what a small GPU has left
    return max(1, budget // activation_bytes_per_token(model))


def token_chunks(prompts: list, responses: list, budget: int) -> list[slice]:
    """Consecutive slices of the N (prompt, response) pairs, each padding to at most `budget` tokens (pairs x the
    longest pair in the slice), one pair at least (a longer pair is a piece alone): the pieces `response_logprobs`
    runs at a time."""
    chunks, start, longest = [], 0, 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        longest = max(longest, len(p) + len(r))
        if i > start and (i - start + 1) * longest > budget:
            chunks.append(slice(start, i))
            start, longest = i, len(p) + len(r)
    return chunks + [slice(start, len(prompts))] if len(prompts) else chunks


def _optimizer(model, config: RPOConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PuzzleError("the model has no trainable parameters (all have requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    warm = max(config.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return params, opt, sched


def _train_step(model, batch, config, ref_sum, params, opt, sched, update: bool = True) -> dict:
    """One optimiser step on `batch`: loss, backward, gradient clipping, AdamW and scheduler step. Returns the metrics.
    With `update` False the caller takes the AdamW and scheduler step (`_Checkpoints.finish_step`).

    Every loss reaches the weights only through the responses' summed log-probs s (N,). A batch past
    `grad_chunk_tokens` padded tokens is therefore trained in two passes with the same gradient: s without
    gradients, the loss's gradient g = dL/ds on a detached copy, then per `token_chunks` piece a forward with
    gradients and backward(g[piece]), so activations are held for one piece at a time (leftover: --k 64 on SmolLM2
    peaked at 7.7 GB, growing with k; 512 would not fit 24 GB). It costs one more forward without gradients."""
    prompts, responses = _flat(batch)
    pieces = token_chunks(prompts, responses, grad_chunk_tokens(model))
    if len(pieces) == 1:
        loss, metrics = _records_loss(model, batch, config, ref_sum)
    else:
        sum_logp, counts = _chunked_logprobs(model, prompts, responses, pieces)
        sum_logp.requires_grad_(True)
        loss, metrics = _loss_of_logprobs(sum_logp, counts, batch, config, ref_sum)
    if not math.isfinite(metrics["loss"]):
        raise PuzzleError(f"rpo {config.loss}: the loss became {metrics['loss']}; lower the learning rate (or beta)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if len(pieces) > 1 and sum_logp.grad is not None:  # (N,) dL/ds, then each piece's log-probs, with gradients
        for c in pieces:
            response_logprobs(model, prompts[c], responses[c])[0].backward(sum_logp.grad[c].to(sum_logp.dtype))
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))  # before clipping
    metrics["lr"] = opt.param_groups[0]["lr"]  # the rate this step took (breaker: logged after sched.step: ahead)
    if update:
        opt.step()
        sched.step()
    return metrics


#: seconds between two checkpoints of an rpo training (and one when it is interrupted), and its file in --out
CHECKPOINT_EVERY_S = 300.0
RPO_CHECKPOINT = "checkpoint.pt"


class _Checkpoints:
    """An rpo training's checkpoint at `path` (DIR/checkpoint.pt): the trained parameters (by name: all of them, or the
    adapters'), AdamW's and the scheduler's states, the batch order and generators, and the history, at the last
    finished step. Saved every CHECKPOINT_EVERY_S seconds and when the training is interrupted (then the
    KeyboardInterrupt carries the note `cli.main` prints); `meta` (the training's record, `training_record`) must
    match to resume. A step's update, its history row and the state after it are made together, Ctrl-C held
    (`io.signals_deferred`), so a checkpoint is never of half a step. `path` None: no checkpoints."""

    def __init__(self, path: Path | None, meta: dict | None, model, opt, sched, gen: torch.Generator, steps: int):
        self.path, self.meta, self.model, self.opt, self.sched, self.gen = path, meta, model, opt, sched, gen
        self.steps, self.done, self.saved, self.order, self.rows = steps, 0, 0, [], []
        self.last = time.monotonic()
        self.state = self._state()  # (order, generator, global RNG) after the last finished step

    def resume(self) -> int:
        """Load the checkpoint of this training, where there is one: returns its finished steps (0: none)."""
        from .train_utils import load_checkpoint, set_rng_state

        if self.path is None or not self.path.is_file():
            return 0
        _check_checkpoint(self.path, self.meta, self.steps)
        ckpt = load_checkpoint(self.path)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in ckpt["trainable"].items():
                named[name].copy_(tensor)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.gen.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"])
        self.done = self.saved = int(ckpt["step"])
        self.order, self.rows = list(ckpt["order"]), list(ckpt["history"])
        self.state = self._state()
        return self.done

    def next_batch(self, items: int, size: int) -> list[int]:
        """The next `size` of `items` indices: passes over them in orders the seeded generator draws, one after the
        other (the order left over is part of the checkpoint)."""
        while len(self.order) < size:
            self.order += torch.randperm(items, generator=self.gen).tolist()
        idx, self.order = self.order[:size], self.order[size:]
        return idx

    def _state(self) -> tuple:
        from .train_utils import rng_state

        return list(self.order), self.gen.get_state(), rng_state()

    def finish_step(self, row: dict, update: bool) -> None:
        """The step's AdamW and scheduler update (where `update`), its history `row`, and the state after it, made
        together; then a checkpoint when CHECKPOINT_EVERY_S have passed since the last."""
        from .io import signals_deferred

        with signals_deferred():
            if update:
                self.opt.step()
                self.sched.step()
            self.rows.append(row)
            self.done += 1
            self.state = self._state()
        if self.path is not None and time.monotonic() - self.last >= CHECKPOINT_EVERY_S and self.done < self.steps:
            self.save()

    def save(self) -> None:
        from .train_utils import save_checkpoint

        order, generator, rng = self.state
        trainable = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        save_checkpoint(self.path, {"meta": self.meta, "steps": self.steps, "step": self.done, "trainable": trainable,
                                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                                    "order": order, "generator": generator, "rng": rng, "history": self.rows})
        self.saved, self.last = self.done, time.monotonic()

    def interrupted(self, e: KeyboardInterrupt) -> None:
        """Save the last finished step (where not saved yet) and note it on `e` for `cli.main`'s message."""
        if self.path is None:
            return
        if self.done > self.saved:
            self.save()
        if self.saved:
            e.puzzle_note = (f"rpo saved its training at step {self.saved} of {self.steps} in {self.path}; the same "
                             f"command resumes from it")


def training_summary(config: RPOConfig, history: pd.DataFrame) -> str:
    """rpo's last line on its training (breaker: it ended with the files it wrote, no figure): at the first and last
    steps that took a loss, that loss, and for pair losses the batch's implicit-reward margin and accuracy, for online
    losses the sampled responses' mean reward."""
    took = history[history["loss"].notna()] if "loss" in history else history.iloc[:0]

    def ends(column, fmt):
        values = took[column] if column in took else pd.Series(dtype=float)
        return f"{format(values.iloc[0], fmt)} -> {format(values.iloc[-1], fmt)}" if values.notna().all() and \
            len(values) else None

    if (loss := ends("loss", ".4f")) is None:
        return f"rpo {config.loss}: no step took a loss ({len(history)} steps)"
    parts = [f"loss {loss} over {len(history)} steps"]
    for column, label, fmt in (("margin", "margin", ".3f"), ("accuracy", "accuracy", ".0%"),
                               ("reward_mean", "sampled reward", ".3f")):
        if (span := ends(column, fmt)) is not None:
            parts.append(f"{label} {span}")
    return f"rpo {config.loss}: " + "; ".join(parts) + " (first and last step that took a loss)"


def _check_finite_weights(model, config: RPOConfig) -> None:
    """The last update comes after the last loss check: refuse to hand back non-finite weights."""
    from .train_utils import non_finite_parameter

    if (broken := non_finite_parameter(model)) is not None:
        raise PuzzleError(f"rpo {config.loss}: the weights became non-finite ({broken}); lower the learning rate")


def _records_loss(model, batch: list[EncodedRecord], config: RPOConfig, ref_sum: torch.Tensor | None):
    """Mean loss over a batch of records and per-batch metrics; ref_sum (R,) for the flattened responses."""
    sum_logp, counts = response_logprobs(model, *_flat(batch))
    return _loss_of_logprobs(sum_logp, counts, batch, config, ref_sum)


def _loss_of_logprobs(sum_logp: torch.Tensor, counts: torch.Tensor, batch: list[EncodedRecord], config: RPOConfig,
                      ref_sum: torch.Tensor | None):
    """`_records_loss` from the policy's summed log-probs (R,) and response token counts (R,) of the flattened
    responses of `batch`."""
    dtype = sum_logp.dtype
    losses, margins, correct, offset = [], [], [], 0
    Ks = [len(r.response_ids) for r in batch]
    same_k = len(set(Ks)) == 1
    groups = [(0, len(batch))] if same_k else [(i, i + 1) for i in range(len(batch))]
    for a, b in groups:
        n = sum(Ks[a:b])
        K = Ks[a]
        pol = sum_logp[offset:offset + n].view(b - a, K)
        cnt = counts[offset:offset + n].view(b - a, K).to(sum_logp.device)
        ref = ref_sum[offset:offset + n].view(b - a, K).to(sum_logp.device, dtype) if ref_sum is not None else None
        rewards = None
        if batch[a].rewards is not None and all(r.rewards is not None for r in batch[a:b]):
            rewards = torch.tensor([r.rewards for r in batch[a:b]], dtype=dtype, device=sum_logp.device)
        out = preference_loss(config.loss, pol, cnt, ref, rewards, beta=config.beta, eta=config.eta,
                              gamma=config.gamma, aggregate=config.aggregate, kl_coef=config.kl_coef)
        losses.append(out.loss)
        if K == 2 and config.loss in PAIR_LOSSES:  # a group loss's two responses are in no order (reviewer)
            m = out.implicit_rewards[:, 0] - out.implicit_rewards[:, 1]
            margins.append(m)
            correct.append((m > 0).to(dtype))
        offset += n
    loss = torch.cat(losses).mean()
    metrics = {"loss": float(loss.detach()), "tokens": int(counts.sum())}
    if margins:
        metrics["margin"] = float(torch.cat(margins).mean())
        metrics["accuracy"] = float(torch.cat(correct).mean())
    return loss, metrics


def _check_data(encoded: list[EncodedRecord], config: RPOConfig) -> None:
    if not encoded:
        raise PuzzleError("no preference records to train on")
    if config.loss in PAIR_LOSSES and any(len(r.response_ids) != 2 for r in encoded):
        # leftover: groups without rewards were pointed at best_worst_pair, which needs rewards
        rewarded = all(r.rewards is not None for r in encoded if len(r.response_ids) != 2)
        raise PuzzleError(f"{config.loss} trains on pairs; this data has groups of K != 2 responses. " + (
            "Use rpo-multi or rloo, or turn each rewarded group into its best and worst responses "
            "(puzzle.preference.best_worst_pair)" if rewarded else
            "Give those groups a reward per response (then rpo-multi or rloo train on them), or write each as "
            "{prompt, chosen, rejected}"))
    if config.loss in PAIR_LOSSES and not needs_rewards(config.loss) and not all(r.is_pair for r in encoded):
        first = next(i for i, r in enumerate(encoded) if not r.is_pair)
        raise PuzzleError(f"{config.loss} trains on pairs with a chosen response; record {first} (counting from 0) is "
                          "a group of 2 responses without rewards, or with equal rewards, so neither is chosen. Write "
                          "it as {prompt, chosen, rejected}, give rewards that differ, or drop it")
    for r in encoded:
        check_rewards(config.loss, None if r.rewards is None else torch.tensor(r.rewards))
    # breaker: pairs whose chosen and rejected were the same text trained at loss ln 2, margin 0, and "succeeded"
    alike = sum(len({tuple(ids) for ids in r.response_ids}) == 1 for r in encoded)
    cut = (f" (after each response is cut to its first {config.max_response_tokens} tokens)"
           if any(r.truncated for r in encoded) else "")  # breaker: texts differing past the cut read as "the same"
    if alike == len(encoded):
        raise PuzzleError(f"in all {alike} records the responses are the same text{cut}, so there is nothing to "
                          f"prefer and the model would learn nothing; give records whose responses differ"
                          + (" within that many tokens" if cut else ""))
    if alike:
        warnings.warn(f"{alike} of {len(encoded)} records have responses that are the same text{cut}: they prefer "
                      f"nothing, and train nothing")  # one place: said once though checked twice
    # breaker: pairs whose rewards all tie trained at loss 0, margin 0, and "succeeded" under the reward losses (a
    # tied record among others does train: it holds its margin at 0 once the policy moves)
    tied = sum(r.rewards is not None and len(set(r.rewards)) == 1 for r in encoded) if needs_rewards(config.loss) else 0
    if tied == len(encoded):
        raise PuzzleError(f"in all {tied} records every response has the same reward, so {config.loss}, whose "
                          f"target is each record's reward difference, starts at its optimum (the policy is its "
                          f"reference) and learns nothing; give rewards that differ")


def train_offline(model, encoded: list[EncodedRecord], config: RPOConfig, reference=None,
                  progress: bool = False, checkpoint: Path | None = None, meta: dict | None = None) -> pd.DataFrame:
    """Optimise `model` in place on fixed preference data.

    Args:
        model: a PuzzleForCausalLM; its parameters with requires_grad are trained (all of them, or
            only adapters after `puzzle.adapters.apply_adapters`).
        encoded: records from `encode_records`; pair losses need K = 2 (chosen first).
        config: RPOConfig.
        reference: a ReferenceLogprobs for exactly these records (`reference_logprobs`), a frozen
            model (`frozen_copy`) evaluated on each batch, or None for losses without π_ref.
        checkpoint, meta: the training's checkpoint file and record (`_Checkpoints`): resumed from where it holds
            this training, saved every CHECKPOINT_EVERY_S seconds and on Ctrl-C. None: no checkpoints.
    Returns:
        History, one row per step: step, loss, margin (mean Δπ for pairs; pair losses only), accuracy
        (share of pairs with Δπ > 0; pair losses only), lr, tokens, seconds.
    Raises:
        PuzzleError: pair loss on groups, missing rewards or reference, reference log-probs of other
            records (another count, or another data hash in their key).
    """
    from tqdm.auto import tqdm

    _check_data(encoded, config)
    use_ref = needs_reference(config.loss, config.kl_coef)
    offsets = [0]
    for r in encoded:
        offsets.append(offsets[-1] + len(r.response_ids))
    if use_ref and reference is None:
        raise PuzzleError(f"{config.loss} needs a reference: pass reference_logprobs(...) or frozen_copy(model)")
    if isinstance(reference, ReferenceLogprobs):
        _check_reference(reference, *_flat(encoded))
    params, opt, sched = _optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    ck = _Checkpoints(checkpoint, meta, model, opt, sched, gen, config.steps)
    start = ck.resume()
    model.train()
    try:
        for step in tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
                         desc=f"rpo {config.loss}"):
            t0 = time.perf_counter()
            idx = ck.next_batch(len(encoded), config.batch_size)
            batch = [encoded[i] for i in idx]
            ref_sum = None
            if use_ref and isinstance(reference, ReferenceLogprobs):
                ref_sum = torch.cat([reference.sum_logp[offsets[i]:offsets[i + 1]] for i in idx])
            elif use_ref:
                ref_sum = _reference_sums(reference, batch)
            metrics = _train_step(model, batch, config, ref_sum, params, opt, sched, update=False)
            ck.finish_step({"step": step + 1, **metrics, "seconds": time.perf_counter() - t0}, update=True)
    except KeyboardInterrupt as e:
        ck.interrupted(e)
        raise
    model.eval()
    _check_finite_weights(model, config)
    return pd.DataFrame(ck.rows)


def sample_groups(model, tokenizer, prompts: list, prompt_ids: list, reward_fn, k: int, max_new_tokens: int,
                  temperature: float, top_k: int = 0, generator=None) -> tuple[list[PreferenceRecord], list[EncodedRecord]]:
    """K sampled responses per prompt, scored: (records with texts and rewards, the same as token ids)."""
    rep_ids = [p for p in prompt_ids for _ in range(k)]
    new = [y for at in range(0, len(rep_ids), SAMPLE_CHUNK)  # a KV cache of SAMPLE_CHUNK rows at a time
           for y in sample(model, rep_ids[at:at + SAMPLE_CHUNK], max_new_tokens, temperature, top_k,
                           tokenizer.eos_token_id, tokenizer.pad_token_id or 0, generator)]
    texts = [tokenizer.decode(y, skip_special_tokens=True) for y in new]
    rewards = [float(r) for r in reward_fn([p for p in prompts for _ in range(k)], texts)]
    if len(rewards) != len(texts) or not all(math.isfinite(r) for r in rewards):
        raise PuzzleError("the reward function must return one finite number per response")
    records, encoded = [], []
    for i, (p, ids) in enumerate(zip(prompts, prompt_ids)):
        sl = slice(i * k, (i + 1) * k)
        records.append(PreferenceRecord(p, tuple(texts[sl]), tuple(rewards[sl])))
        encoded.append(EncodedRecord(tuple(ids), tuple(tuple(y) if y else (tokenizer.eos_token_id,) for y in new[sl]),
                                     tuple(rewards[sl])))
    return records, encoded


def _pair_of(e: EncodedRecord) -> EncodedRecord | None:
    """`best_worst_pair` of a sampled group as token ids (None when all rewards tie)."""
    if (ends := _best_worst(e.rewards)) is None:
        return None
    return EncodedRecord(e.prompt_ids, tuple(e.response_ids[i] for i in ends), tuple(e.rewards[i] for i in ends), True,
                         e.truncated)


def train_online(model, tokenizer, prompts: list, reward_fn, config: RPOConfig, reference=None,
                 string_prompts: str = "raw", progress: bool = False, checkpoint: Path | None = None,
                 meta: dict | None = None) -> pd.DataFrame:
    """Online preference optimization: sample, score, optimise, repeat.

    Each step takes `batch_size` prompts, samples `k` responses per prompt from the current policy,
    scores them with `reward_fn(prompts, texts) -> rewards`, and takes one optimiser step on: the
    best-vs-worst pair of each prompt for a pair loss (prompts whose K rewards all tie are skipped),
    all K responses for rpo-multi, or the RLOO policy gradient for rloo.

    Args:
        model: the policy (trained in place); reference: a frozen model (`frozen_copy`) or None for
            losses without π_ref (simpo, rloo without kl_coef).
        prompts: strings or chat messages; reward_fn: see `puzzle.rewards`.
        checkpoint, meta: as `train_offline`'s.
    Returns:
        History per step: step, reward_mean, reward_std (of the sampled responses, before the
        update), groups (prompts that contributed), groups_with_signal (sampled groups whose rewards differ: none
        means the step had nothing to learn from), loss, lr, seconds.
    """
    from tqdm.auto import tqdm

    if isinstance(reference, ReferenceLogprobs):
        raise PuzzleError("online training samples new responses each step; pass a frozen reference model, not cached log-probs")
    if needs_reference(config.loss, config.kl_coef) and reference is None:
        raise PuzzleError(f"{config.loss} needs a reference model: pass frozen_copy(model)")
    whole = [encode_prompt(tokenizer, p, string_prompts) for p in prompts]
    if cut := sum(len(ids) > config.max_prompt_tokens for ids in whole):  # breaker: cut without a word
        warnings.warn(f"{cut} prompt(s) longer than {config.max_prompt_tokens} tokens keep their last "
                      f"{config.max_prompt_tokens}: the model samples without their beginning (an instruction there "
                      f"included), while the reward still sees the whole prompt")
    prompt_ids = [ids[-config.max_prompt_tokens:] for ids in whole]
    params, opt, sched = _optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    ck = _Checkpoints(checkpoint, meta, model, opt, sched, gen, config.steps)
    start = ck.resume()
    try:
        for step in tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
                         desc=f"online {config.loss}"):
            t0 = time.perf_counter()
            idx = ck.next_batch(len(prompts), config.batch_size)
            model.eval()
            _, groups = sample_groups(model, tokenizer, [prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                                      reward_fn, config.k, config.max_new_tokens, config.temperature, config.top_k, gen)
            all_rewards = torch.tensor([r for g in groups for r in g.rewards])
            batch = [p for p in map(_pair_of, groups) if p is not None] if config.loss in PAIR_LOSSES else groups
            row = {"step": step + 1, "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
                   "groups": len(batch), "groups_with_signal": sum(len(set(g.rewards)) > 1 for g in groups),
                   "loss": float("nan")}
            if batch:
                model.train()
                ref_sum = None
                if needs_reference(config.loss, config.kl_coef):
                    ref_sum = _reference_sums(reference, batch)
                row.update(_train_step(model, batch, config, ref_sum, params, opt, sched, update=False))
            row.setdefault("lr", sched.get_last_lr()[0])  # no step taken: the rate the next one takes
            row.update({"seconds": time.perf_counter() - t0})
            ck.finish_step(row, update=bool(batch))
    except KeyboardInterrupt as e:
        ck.interrupted(e)
        raise
    model.eval()
    _check_finite_weights(model, config)
    return pd.DataFrame(ck.rows)


# ------------------------------------------------------------------------------------------------
# evaluation


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean, standard error and a normal-approximation confidence interval of `values`.

    Returns {"mean", "se", "ci_low", "ci_high", "n"}; se = sample std / sqrt(n) (0 for n = 1).
    """
    x = torch.as_tensor(list(values), dtype=torch.float64)
    n = x.numel()
    if n == 0:
        raise PuzzleError("no values to summarise")
    mean = float(x.mean())
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return {"mean": mean, "se": se, "ci_low": mean - z * se, "ci_high": mean + z * se, "n": n}


@torch.no_grad()
def evaluate_rewards(model, tokenizer, prompts: list, reward_fn, max_new_tokens: int, temperature: float = 0.0,
                     samples: int = 1, batch_size: int = 16, seed: int = 0, string_prompts: str = "raw") -> pd.DataFrame:
    """Reward of the model's answers: one row per (prompt, sample) with columns prompt_index, sample,
    reward, response. Greedy answers by default (temperature 0, one sample per prompt)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = [encode_prompt(tokenizer, p, string_prompts) for p in prompts]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    rows = []
    for a in range(0, len(jobs), batch_size):
        chunk = jobs[a:a + batch_size]
        new = sample(model, [ids[i] for i, _ in chunk], max_new_tokens, temperature, 0, tokenizer.eos_token_id,
                     tokenizer.pad_token_id or 0, gen)
        texts = [tokenizer.decode(y, skip_special_tokens=True) for y in new]
        rewards = reward_fn([prompts[i] for i, _ in chunk], texts)
        rows += [{"prompt_index": i, "sample": s, "reward": float(r), "response": t}
                 for (i, s), r, t in zip(chunk, rewards, texts)]
    return pd.DataFrame(rows)


def _logprobs_of(source, prompts, responses, batch_size, what: str) -> torch.Tensor:
    """(N,) float64 summed log-probs of the responses: a model's, or precomputed ones checked against the data."""
    if isinstance(source, ReferenceLogprobs):
        _check_reference(source, prompts, responses, what)
        return source.sum_logp
    return batched_logprobs(source, prompts, responses, batch_size)[0]


@torch.no_grad()
def preference_accuracy(model, reference, encoded: list[EncodedRecord], beta: float = 0.1, aggregate: str = "sum",
                        batch_size: int = 8) -> dict:
    """How often the model prefers the chosen response of held-out pairs.

    Implicit-reward accuracy: share of pairs with r_π(chosen) > r_π(rejected) (ties count 1/2; when the
    policy equals the reference every pair ties and the accuracy is 0.5). Likelihood accuracy: share
    with logπ(chosen) > logπ(rejected) (aggregated as `aggregate`), which needs no reference.

    Args:
        model: the policy, or its precomputed log-probs (a ReferenceLogprobs for these records).
        reference: a frozen model, a ReferenceLogprobs for these records, or None (implicit skipped).
    Returns:
        {"pairs", "implicit_accuracy", "implicit_se", "ties", "mean_margin", "likelihood_accuracy",
         "likelihood_se"}; standard errors are sqrt(p(1 − p)/n) over pairs (ties as 1/2 in p).
    Raises:
        PuzzleError: groups instead of pairs, or precomputed log-probs of other records.
    """
    if any(len(r.response_ids) != 2 or not r.is_pair for r in encoded):  # a group's order names no chosen one
        raise PuzzleError("preference accuracy needs pairs (chosen, rejected): {prompt, chosen, rejected} records, or "
                          "2-response groups whose rewards differ")
    prompts, responses = _flat(encoded)
    counts = torch.tensor([len(y) for y in responses], dtype=torch.float64).view(-1, 2)
    pol = _logprobs_of(model, prompts, responses, batch_size, "policy").view(-1, 2)
    agg = (lambda s: s) if aggregate == "sum" else (lambda s: s / counts)  # noqa: E731
    n = pol.shape[0]
    out = {"pairs": n}
    lik = (agg(pol)[:, 0] > agg(pol)[:, 1]).double() + 0.5 * (agg(pol)[:, 0] == agg(pol)[:, 1]).double()
    out["likelihood_accuracy"] = float(lik.mean())
    out["likelihood_se"] = math.sqrt(out["likelihood_accuracy"] * (1 - out["likelihood_accuracy"]) / n)
    if reference is not None:
        ref = _logprobs_of(reference, prompts, responses, batch_size, "reference").view(-1, 2)
        implicit = beta * (agg(pol) - agg(ref))  # (n, 2)
        margin = implicit[:, 0] - implicit[:, 1]
        score = (margin > 0).double() + 0.5 * (margin == 0).double()
        p = float(score.mean())
        out.update({"implicit_accuracy": p, "implicit_se": math.sqrt(p * (1 - p) / n),
                    "ties": int((margin == 0).sum()), "mean_margin": float(margin.mean())})
    return out


def config_record(config: RPOConfig) -> dict:
    """The config as a JSON-ready dict, with the log-prob convention spelled out."""
    return {**asdict(config), "logprobs": config.logprob_label, "losses_available": list(LOSSES)}


# ------------------------------------------------------------------------------------------------
# command line: `puzzle rpo`


def add_rpo_parser(subparsers) -> None:
    """Add `puzzle rpo` (offline from --data, or online from --task / --prompts) to an argparse subparsers."""
    p = subparsers.add_parser("rpo", help="preference optimization of a child (DPO, IPO, SimPO, RPO family, RLOO), "
                                          "offline on preference data or online with a reward")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="model to train: an exported child (nemotron-nas folder), HF folder, .gguf, or 'tiny'")
    p.add_argument("--out", type=dir_arg, required=True, metavar="DIR",
                   help="output folder: rpo.json, history.csv, model/ (merged HF folder), adapters.safetensors; "
                        "checkpoint.pt while it trains")
    src = p.add_argument_group("data (one of --data, --task, --prompts)")
    src.add_argument("--data", type=Path, metavar="FILE", help="offline: preference records (.jsonl/.json/.parquet): "
                     "{prompt, chosen, rejected[, chosen_reward, rejected_reward]} or {prompt, responses, rewards}")
    src.add_argument("--task", help="online: a built-in graded task (count, repeat, reverse) gives prompts and reward")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="online: prompts (.jsonl with 'prompt' or 'messages')")
    src.add_argument("--reward", help="online reward for --prompts: a task name (count, repeat, reverse) or "
                                      "judge:PATH (that model's mean log-prob per response token, its end-of-text "
                                      "token included: a response cut at --max-new-tokens is scored as if it ended "
                                      "there)")
    src.add_argument("--num-prompts", type=int, help="prompts drawn from --task (default 128)")
    src.add_argument("--string-prompts", choices=["raw", "chat"], default="raw",
                     help="plain-text prompts as is (raw) or as one user message (chat)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", default="rpo-bwd-kl", choices=list(LOSSES), help="loss (default rpo-bwd-kl)")
    lo.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward (default 0.1)")
    lo.add_argument("--eta", type=float, help="η, scale of the explicit rewards (the rpo losses; default 1)")
    lo.add_argument("--gamma", type=float, help="SimPO's target margin γ (default 0.5)")
    lo.add_argument("--aggregate", choices=list(AGGREGATES), default="sum",
                    help="token log-probs summed (default) or averaged over the response")
    lo.add_argument("--kl-coef", type=float, default=0.0, help="RLOO: KL penalty on the reward (default 0)")
    lo.add_argument("--reference", choices=["cache", "copy"],
                    help="offline π_ref: log-probs precomputed and cached in DIR/ref_cache (default) or a frozen copy")
    tr = p.add_argument_group("optimisation")
    tr.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    tr.add_argument("--batch-size", type=int, default=4, help="prompts per step (default 4)")
    tr.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    tr.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the data order and the samples")
    tr.add_argument("--k", type=int, help="online: responses sampled per prompt (default 4)")
    tr.add_argument("--max-new-tokens", type=int, help="online: tokens per sampled response (default 48)")
    tr.add_argument("--temperature", type=float, help="online: sampling temperature, > 0 (default 1; rloo takes 1 "
                                                      "only: its gradient needs samples of the policy itself)")
    ad = p.add_argument_group("adapters (default: full fine-tuning)")
    ad.add_argument("--adapters", metavar="SPEC", help="Tied-LoRA factors in use: BA, BuA, vBA or vBuA (B, A: the "
                    "rank-r matrices; u, v: per-layer scaling vectors; all trained unless --freeze names them)")
    ad.add_argument("--freeze", default="", metavar="FACTORS",
                    help="with --adapters: factors kept at their random init, e.g. AB (VeRA-like with vBuA)")
    ad.add_argument("--rank", type=int, help="with --adapters: rank r (default 8)")
    ad.add_argument("--untied", action="store_true", help="one A, B per module and layer (plain LoRA with --adapters BA)")
    p.add_argument("--eval-prompts", type=int,
                   help="with --task: greedy reward on this many held-out prompts before and after (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_rpo)


def _judge(path: str, policy_tokenizer, string_prompts: str):
    """`--reward judge:PATH`: the model at PATH as a LikelihoodJudge that reads the responses' text with its own
    tokenizer (the policy's when PATH has none; a judge of another vocabulary scored the policy's token ids as its
    own: wrong rewards, or an IndexError).

    Raises:
        PuzzleError: PATH has no tokenizer and fewer vocabulary entries than the policy's tokenizer (a larger one,
            often padded, cannot be told from a vocabulary of its own, and is taken as the policy's).
    """
    from .rewards import LikelihoodJudge

    judge = _load_model(path)
    tokenizer = judge.tokenizer
    if tokenizer is None:
        vocab = judge.model.config.vocab_size
        if len(policy_tokenizer) > vocab:
            raise PuzzleError(f"--reward judge:{path}: the judge has no tokenizer and a vocabulary of {vocab} tokens, "
                              f"the policy's tokenizer {len(policy_tokenizer)}; give a judge folder with its tokenizer")
        tokenizer = policy_tokenizer
    return LikelihoodJudge(judge.model, tokenizer, string_prompts)


def _load_model(path: str):
    from .tiny import means_builtin_tiny, tiny_parent

    if means_builtin_tiny(path):
        return tiny_parent()
    from .parent import load_parent

    return load_parent(path)


def _read_prompts(path: Path, task=None) -> list:
    """The prompts of a --prompts file (a 'prompt' string or 'messages' list per line). Raises PuzzleError, naming the
    line, on a record without one or an empty prompt (blank, or messages without text; reviewer: a blank prompt
    trained in chat mode, and raw mode refused it only after the model loaded, naming no line), or one that `task`
    (a rewards.SyntheticTask, --reward NAME) cannot grade (breaker: it stopped the training when first sampled)."""
    from .data import iter_json_lines
    from .rewards import prompt_text

    prompts = []
    for line, d in iter_json_lines(Path(path)):
        value = d.get("prompt", d.get("messages"))
        if isinstance(value, list):
            value = _messages(value, f"{path}, line {line}")
        if not isinstance(value, (str, tuple)):
            raise PuzzleError(f"{path}, line {line}: needs a 'prompt' string or 'messages' list")
        if not (value.strip() if isinstance(value, str) else any(m["content"].strip() for m in value)):
            raise PuzzleError(f"{path}, line {line}: the prompt is empty; an empty prompt cannot condition a response")
        if task is not None and not task.accepts(value):
            raise PuzzleError(f"{path}, line {line}: --reward {task.name} cannot grade this prompt "
                              f"({prompt_text(value)[:60]!r}); its prompts read {task.prompt_form}: give prompts of "
                              f"that form, or another --reward")
        prompts.append(value)
    if not prompts:
        raise PuzzleError(f"{path} holds no prompts")
    return prompts


def _check_rpo_flags(args) -> None:
    """Refuse flags this kind of run would ignore, and counts below their least value, before any work."""
    online = {"--num-prompts": args.num_prompts, "--eval-prompts": args.eval_prompts or None, "--k": args.k,
              "--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature, "--reward": args.reward}
    if args.data is not None and (given := [f for f, v in online.items() if v is not None]):
        raise PuzzleError(f"{', '.join(given)} set the online sampling; --data trains offline on its responses")
    if args.data is None and args.reference is not None:
        raise PuzzleError("--reference chooses how offline (--data) runs keep π_ref; online runs use a frozen copy")
    if args.reference is not None and not needs_reference(args.loss, args.kl_coef):  # breaker: a copy never used
        raise PuzzleError(f"--loss {args.loss} uses no reference model π_ref; drop --reference")
    if args.kl_coef != 0 and args.loss != "rloo":
        raise PuzzleError(f"--kl-coef is RLOO's KL penalty; --loss {args.loss} does not use it")
    if args.gamma is not None and args.loss != "simpo":  # breaker: accepted and ignored by dpo
        raise PuzzleError(f"--gamma is SimPO's target margin; --loss {args.loss} does not use it")
    if args.eta is not None and (args.loss == "rloo" or not needs_rewards(args.loss)):  # (the rpo losses scale r*)
        raise PuzzleError(f"--eta scales the explicit rewards of the rpo losses (rpo-sq, rpo-fwd-kl, rpo-bwd-kl, "
                          f"rpo-multi); --loss {args.loss} does not use it")
    if args.data is not None and args.loss == "rloo":  # breaker: on fixed responses its loss fell without bound
        raise PuzzleError("--loss rloo is a policy gradient on the policy's own samples (online: --task, or --prompts "
                          "with --reward); --data trains offline on given responses: use dpo, ipo, simpo or an rpo "
                          "loss")
    if args.task is None and (given := [f for f in ("--num-prompts", "--eval-prompts") if online[f] is not None]):
        raise PuzzleError(f"{', '.join(given)} count --task prompts; with --prompts the file decides")
    if args.task is not None and args.reward:
        raise PuzzleError("--reward is for --prompts; a --task brings its own reward")
    if args.prompts is not None and not args.reward:
        raise PuzzleError("--prompts needs --reward (a task name or judge:PATH)")
    if args.adapters is not None and not args.adapters.strip():  # breaker: '' ran full fine-tuning without a word
        raise PuzzleError("--adapters is empty; give a spec (BA, BuA, vBA or vBuA), or drop it for full fine-tuning")
    if not args.adapters and (args.rank is not None or args.untied or args.freeze):
        raise PuzzleError("--rank, --untied and --freeze shape the adapters; add --adapters SPEC (e.g. vBuA), or drop "
                          "them for full fine-tuning")
    for flag, value, least in (("--num-prompts", args.num_prompts, 1), ("--eval-prompts", args.eval_prompts, 0)):
        if value is not None and value < least:
            raise PuzzleError(f"{flag} must be >= {least}, got {value}")
    from .rewards import get_task

    for name in (args.task, None if (args.reward or "").startswith("judge:") else args.reward):
        if name:
            get_task(name)  # an unknown name, before the model loads


def _rpo_history(path: Path) -> bool:
    """Whether `path` is a history.csv `puzzle rpo` wrote (its header), not a user's file of that name."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return head[0] == "step" and len(head) > 2


def cmd_rpo(args) -> int:
    """`puzzle rpo`: train, write DIR/{rpo.json, history.csv, model/, adapters.safetensors}; returns 0.
    A call that stops (refused, failed, interrupted) removes the --out folders it made while they are empty."""
    made = [p for p in (args.out, *args.out.parents) if not p.exists()]  # deepest first
    try:
        return _rpo(args)
    except BaseException as e:
        for p in made:
            try:
                p.rmdir()  # only an empty folder goes
            except OSError:
                break
        if isinstance(e, KeyboardInterrupt) and not hasattr(e, "puzzle_note"):  # for main's message (a saved
            e.puzzle_note = "no training step was saved, so a rerun trains from the start" + (  # step says so itself)
                f" (the reference log-probs in {args.out / 'ref_cache'}, when made, are reused)"
                if args.data is not None else "")  # online runs make no reference cache (reviewer)
        raise


def training_record(args, config: RPOConfig, adapter_config, model) -> dict:
    """What a `puzzle rpo` call trains, recorded in OUT/rpo.json; another call into the same --out must match it
    (`_check_earlier_training`). Settings as resolved (a flag given at its default is the default), the model by
    its weights (`pipeline.weights_sha`: a moved model is the same), --data and --prompts by their contents (sha256),
    a judge by its resolved path; not --eval-prompts, which evaluates and trains nothing."""
    from .export import model_ref
    from .io import sha256_file
    from .pipeline import weights_sha

    def content(path):
        return None if path is None else sha256_file(Path(path)) if Path(path).is_file() else str(path)

    reward = args.reward
    if reward and reward.startswith("judge:"):
        reward = "judge:" + model_ref(reward[len("judge:"):])
    return {"config": json.loads(json.dumps(config_record(config))), "model": weights_sha(model),
            # in JSON form, as read back from rpo.json (a tuple of targets never equalled the saved list: breaker)
            "adapters": json.loads(json.dumps(adapter_config.to_dict())) if adapter_config is not None else None,
            "data": content(args.data), "prompts": content(args.prompts), "task": args.task,
            "num_prompts": (128 if args.num_prompts is None else args.num_prompts) if args.task else None,
            "reward": reward, "string_prompts": args.string_prompts,
            "reference": ("copy" if args.reference == "copy" else "cache") if args.data is not None else None}


def _check_earlier_training(out: Path, record: dict) -> dict | None:
    """Refuse to replace a finished rpo training in `out` by another (trained weights are replaced only by a rerun
    of the same training, as for gkd, sft and merge). An rpo.json of an earlier version (no "training") is
    replaced, as it was then.

    Raises:
        PuzzleError: naming the settings that differ.
    """
    try:
        saved = json.loads((out / "rpo.json").read_text())
        earlier = saved.get("training")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(earlier, dict) and earlier != record:
        raise PuzzleError(f"--out {out} holds a finished rpo training with other settings or inputs "
                          f"({_differences(earlier, record)} differ), which this one would replace; give a new --out, "
                          f"or delete that folder first if it is no longer needed")
    return saved


def _differences(earlier: dict, record: dict) -> str:
    """The flags and inputs in which two `training_record`s differ, as a user names them ('--lr, --data (contents)')."""
    keys = sorted(k for k in set(earlier) | set(record) if earlier.get(k) != record.get(k) and k != "config")
    old, new = earlier.get("config"), record["config"]
    if old != new:  # the loss and optimisation settings, by their flags (not the labels derived from them)
        old = old if isinstance(old, dict) else {}
        keys = sorted(keys + [k for k in set(old) | set(new) if old.get(k) != new.get(k)
                              and k not in ("logprobs", "losses_available")] or ["config"])
    was, now = earlier.get("adapters"), record.get("adapters")
    if "adapters" in keys and isinstance(was, dict) and isinstance(now, dict):  # breaker: --untied was named
        flags = {"spec": "--adapters", "rank": "--rank", "tied": "--untied", "frozen": "--freeze"}  # else adapters
        keys = sorted(set(keys) - {"adapters"} | {flags.get(k, "adapters").lstrip("-")
                                                   for k in set(was) | set(now) if was.get(k) != now.get(k)})
    names = {"model": "the model's weights", "data": "--data (contents)", "prompts": "--prompts (contents)"}
    return ", ".join(names.get(k, "--" + k.replace("_", "-")) for k in keys)


def _check_checkpoint(path: Path, record: dict, steps: int) -> None:
    """Refuse a checkpoint (`_Checkpoints`) of another training than `record` of `steps` steps, naming what differs.

    Raises:
        PuzzleError: another training's checkpoint, or an unreadable one (`train_utils.load_checkpoint`).
    """
    from .train_utils import load_checkpoint

    saved = load_checkpoint(path, mmap=True)
    earlier = saved.get("meta") if isinstance(saved.get("meta"), dict) else {}
    if earlier == record and saved.get("steps") == steps:
        return
    named = _differences(earlier, record).split(", ") if earlier != record and "config" in earlier else []
    named += ["--steps"] if saved.get("steps") != steps else []
    what = ", ".join(dict.fromkeys(n for n in named if n)) or "its settings"
    raise PuzzleError(f"{path} is the checkpoint of another rpo training ({what} differ); rerun that command to "
                      f"finish it, or delete the file to start this one")


def _finished_training(out: Path, saved: dict | None, record: dict, adapters: bool, held_out: bool) -> bool:
    """Whether `out` holds `record`'s training finished: its rpo.json (written last; `saved`, as
    `_check_earlier_training` read it) names that training, model/ is there (with adapters.safetensors where
    `adapters`), and where `held_out` prompts are asked for, their rewards (a reviewer: an --eval-prompts added on a
    rerun was not acted on)."""
    if not isinstance(saved, dict):
        return False
    trained, summary = saved.get("training"), saved.get("summary")
    return trained == record and (out / "model" / "config.json").is_file() \
        and any((out / "model").glob("*.safetensors")) and (not adapters or (out / "adapters.safetensors").is_file()) \
        and (not held_out or isinstance(summary, dict) and "reward_after" in summary)


def _rpo(args) -> int:
    import sys

    from .export import export_checkpoint
    from .io import atomic_write_json
    from .rewards import get_task

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from .parent import local_model_arg

    args.model = local_model_arg(args.model)
    if (args.reward or "").startswith("judge:asset:"):
        args.reward = "judge:" + local_model_arg(args.reward[len("judge:"):])
    sources = [x is not None for x in (args.data, args.task, args.prompts)]
    if sum(sources) != 1:
        raise PuzzleError("give exactly one of --data (offline), --task or --prompts (online)")
    _check_rpo_flags(args)
    if args.adapters:
        from .adapters import AdapterConfig

        adapter_config = AdapterConfig(spec=args.adapters, frozen=args.freeze, rank=8 if args.rank is None else args.rank,
                                       tied=not args.untied)  # a bad spec is refused before the model loads
    config = RPOConfig(loss=args.loss, beta=args.beta, aggregate=args.aggregate,
                       **{k: v for k, v in (("eta", args.eta), ("gamma", args.gamma)) if v is not None},
                       kl_coef=args.kl_coef, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=args.warmup_steps, seed=args.seed, k=4 if args.k is None else args.k,
                       max_new_tokens=48 if args.max_new_tokens is None else args.max_new_tokens,
                       temperature=1.0 if args.temperature is None else args.temperature)
    progress = not args.no_progress
    from .export import check_export_target

    if args.out.exists() and not args.out.is_dir():
        raise PuzzleError(f"--out {args.out} is a file; give a folder for rpo.json, history.csv and model/")
    from .io import TEMP_FILE, remove_stale_temp_files

    # a checkpoint's write killed (SIGKILL) leaves its temporary file: removed (a breaker: the folder was refused as
    # one "no rpo wrote" for good); one a write in progress holds locked stays, and is no file of the user's either
    remove_stale_temp_files(args.out, time.time(), grace_s=0)
    have = {p.name for p in args.out.iterdir()} if args.out.is_dir() else set()
    # an export of model/ killed mid-write leaves its hidden temp folder (`export.remove_stale_temp` clears it later)
    have = {n for n in have if not re.fullmatch(r"\.model\.[A-Za-z0-9_]+\.(tmp|old)", n) and not TEMP_FILE.fullmatch(n)}
    # an interrupted run left its reference cache (offline) or its history (online, stopped while writing model/)
    interrupted = have <= {"ref_cache", "history.csv", "model", "adapters.safetensors", RPO_CHECKPOINT} and (
        "ref_cache" in have or RPO_CHECKPOINT in have
        or "history.csv" in have and _rpo_history(args.out / "history.csv"))
    if have and "rpo.json" not in have and not interrupted:
        raise PuzzleError(f"--out {args.out} holds files no `puzzle rpo` wrote; give a new or empty folder "
                          f"(an interrupted rpo output, or a finished one of the same settings, is replaced)")
    check_export_target(args.out / "model", overwrite=True, keep=[args.model])  # before the training
    from .pipeline import enclosing_run

    if (run_dir := enclosing_run(args.out)) is not None and (run_dir / "export").resolve() in \
            [args.out.resolve(), *args.out.resolve().parents]:  # model folders only there (`check_run_dest`)
        raise PuzzleError(f"--out {args.out} is inside the run's export folder {run_dir / 'export'}, which holds "
                          f"model folders only; rpo writes rpo.json, history.csv and model/: give a folder "
                          f"elsewhere, e.g. {run_dir / 'rpo' / args.out.name}")
    records = read_preference_data(args.data) if args.data is not None else None  # bad data fails before any work
    graded = get_task(args.reward) if args.reward and not args.reward.startswith("judge:") else None
    prompts = _read_prompts(args.prompts, graded) if args.prompts is not None else None
    held_out = []
    if args.task:  # the task's prompts, the held-out ones apart from the training ones, before the model loads
        task = get_task(args.task)
        prompts = task.prompts(128 if args.num_prompts is None else args.num_prompts, seed=args.seed)
        held_out = task.held_out_prompts(args.eval_prompts, args.seed + 10_000, prompts) if args.eval_prompts else []
    loaded = _load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    training = training_record(args, config, adapter_config if args.adapters else None, model)
    if RPO_CHECKPOINT in have:  # before the reference log-probs and any word of resuming (a breaker: a refused
        _check_checkpoint(args.out / RPO_CHECKPOINT, training, config.steps)  # rerun replaced them first)
    if "rpo.json" in have:
        earlier = _check_earlier_training(args.out, training)
        if _finished_training(args.out, earlier, training, bool(args.adapters), held_out=bool(held_out)):  # breaker:
            say(f"rpo: {args.out} holds this training, finished by an earlier call (the same settings, inputs and "
                f"model): nothing trained again; delete {args.out / 'rpo.json'} to train afresh")  # trained all again
            return 0
    args.out.mkdir(parents=True, exist_ok=True)
    claim_folder(args.out)  # the command's lock on --out, now that it exists (puzzle/runlock.py)
    handle = None
    if args.adapters:
        from .adapters import apply_adapters

        handle = apply_adapters(model, adapter_config)
        say(f"adapters {handle.config.name}: {handle.num_trainable():,} trainable parameters")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    uses_ref = needs_reference(config.loss, config.kl_coef)
    summary: dict = {"model": loaded.source, "logprobs": config.logprob_label}
    resumable = {"checkpoint": args.out / RPO_CHECKPOINT, "meta": training}
    if (args.out / RPO_CHECKPOINT).is_file():
        say(f"rpo: resuming the interrupted training from {args.out / RPO_CHECKPOINT}")
    if records is not None:
        encoded = encode_records(tokenizer, records, max_prompt_tokens=config.max_prompt_tokens,
                                 max_response_tokens=config.max_response_tokens, string_prompts=args.string_prompts)
        _check_data(encoded, config)  # before the reference log-probs (a forward pass over the data) are computed
        if config.batch_size > len(encoded):  # breaker: 100 on 8 records took each about 12 times per step
            raise PuzzleError(f"--batch-size {config.batch_size} is more than the {len(encoded)} records: each step "
                              f"would take the same records again; give --batch-size {len(encoded)} or less, or "
                              f"more data")
        reference = None
        if uses_ref:  # π_ref is the model before training: its cached log-probs need no copy of it
            reference = (reference_logprobs(model, encoded, args.out / "ref_cache", progress=progress)
                         if args.reference in (None, "cache") else frozen_copy(model))
            if isinstance(reference, ReferenceLogprobs):
                _drop_stale_references(args.out / "ref_cache", reference.key, say)
        say(f"offline {config.loss} on {len(encoded)} records from {args.data} ({config.logprob_label})")
        history = train_offline(model, encoded, config, reference, progress=progress, **resumable)
        summary["data"] = str(args.data)
    else:
        if args.task:
            reward_fn = task
        else:
            reward_fn = (_judge(args.reward[len("judge:"):], tokenizer, args.string_prompts)
                         if args.reward.startswith("judge:") else get_task(args.reward))
        if held_out:
            before = evaluate_rewards(model, tokenizer, held_out, reward_fn, config.max_new_tokens)
            summary["reward_before"] = mean_ci(before.reward)
        reference = frozen_copy(model) if uses_ref else None
        say(f"online {config.loss}: {len(prompts)} prompts, k={config.k} ({config.logprob_label})")
        history = train_online(model, tokenizer, prompts, reward_fn, config, reference, args.string_prompts, progress,
                               **resumable)
        if len(history) and not history["groups_with_signal"].any():
            say(f"warning: in all {len(history)} steps every sampled group's {config.k} responses got the same reward, "
                f"so there was nothing to prefer and the model learned nothing (weight decay aside); more --steps, a larger --k or "
                f"--max-new-tokens (answers cut short score alike), or a reward that tells the answers apart")
        if held_out:
            after = evaluate_rewards(model, tokenizer, held_out, reward_fn, config.max_new_tokens)
            summary["reward_after"] = mean_ci(after.reward)
            summary["reward_change"] = mean_ci(after.reward.to_numpy() - before.reward.to_numpy())
            say(f"held-out reward: {summary['reward_before']['mean']:.3f} -> {summary['reward_after']['mean']:.3f}")
    history.to_csv(args.out / "history.csv", index=False)
    if handle is not None:
        from .adapters import save_adapters

        save_adapters(handle, args.out / "adapters.safetensors")
        handle.merge()
    else:
        (args.out / "adapters.safetensors").unlink(missing_ok=True)  # an earlier run's, not this model's
    export_checkpoint(model, tokenizer, args.out / "model", overwrite=True, replace_trained=True,  # rpo's own folder
                      extra_info={"stage": "rpo", "loss": config.loss, "source": loaded.source})
    last = float(history["loss"].iloc[-1]) if len(history) else math.nan
    summary["final_loss"] = last if math.isfinite(last) else None  # null: an online last step whose rewards all tied
    atomic_write_json(args.out / "rpo.json", {"config": config_record(config), "summary": summary,
                                              "adapters": handle.config.to_dict() if handle is not None else None,
                                              "training": training})
    (args.out / RPO_CHECKPOINT).unlink(missing_ok=True)  # the training is in model/ now
    from .train_utils import stalled_gradient_note

    say(training_summary(config, history))
    # steps whose sampled rewards all tied have a zero gradient by design (RLOO's advantages are 0): not a stall
    trained = history[history["groups_with_signal"] > 0] if "groups_with_signal" in history else history
    if note := stalled_gradient_note(trained.to_dict("records"), "rpo"):
        say(note)
    say(f"wrote {args.out / 'model'} and {args.out / 'history.csv'}")
    return 0
