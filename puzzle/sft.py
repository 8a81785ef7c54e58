"""Supervised fine-tuning (SFT) on chat data, with the Llama-Nemotron reasoning toggle.

Data. JSON lines, one conversation per line, in either common form:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..."(optional)}

Each conversation is rendered with the model's own chat template (`tokenizer.apply_chat_template`).
Only assistant turns are learned: every other token (system, user, the template's role headers)
gets the label -100. The assistant span of turn i is what rendering messages[:i+1] adds after
rendering messages[:i] with the generation prompt, so it holds the answer and the template's
end-of-turn token (the model learns to stop), up to the last end-of-sequence token in it: what a
template writes after that (ChatML's newline after `<|im_end|>`) is not learned, since generation
stops before it. A template whose renderings are not prefixes of each other is refused.

Packing. Conversations are laid into rows of `seq_len` tokens, first come first served in a seeded
order; a row holds whole conversations only. Attention is isolated between the conversations of
a row: positions restart at 0 for each, and a block-diagonal causal mask (B, 1, T, T) lets a
token see only the earlier tokens of its own conversation, so a packed row computes exactly what
each conversation alone would (`block_causal_mask`). The first token of a conversation is never a
target (nothing of its own comes before it), packed or not: the last token of the conversation
before it in the row is not trained to predict it.

Reasoning toggle (Llama-Nemotron, Bercovich et al. 2025): the system message "detailed thinking
on" asks for a `<think>…</think>` trace before the answer, "detailed thinking off" for the answer
alone. `reasoning_toggle_examples` writes a small verifiable demonstration set in code (no hub
data): arithmetic, word problems, sorting, unit conversion and comparisons, each question once
with each system message; `toggle_report` measures how often greedy answers carry a well-formed
think block with the toggle on and off, and how often they are right.

Training is `train_utils.train_loop` (AdamW, warmup + cosine, checkpoints, resume, torchrun DDP /
FSDP). The loss of a step is the mean over all its learned tokens, whichever process holds them.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from .errors import PuzzleError, require_finite, require_learning_rate
from .io import atomic_write_json, atomic_write_text, dir_arg
from .modeling import PuzzleForCausalLM
from .runlock import WORK_ADVICE, also_lock
from .train_utils import (FOLDER_SOURCE, DistEnv, OptimSettings, TrainResult, barrier, check_work_folder,
                          global_batch, init_distributed, peer_lost, rank_slice, recorded_settings,
                          recorded_source, shutdown_distributed, stalled_gradient_note, train_loop,
                          with_earlier_training)

ROLES = ("system", "user", "assistant")
DEMO_SPEC = "demo:reasoning-toggle"  # the demonstration set below, built in memory (nothing shipped)
REASONING_ON = "detailed thinking on"
REASONING_OFF = "detailed thinking off"
IGNORE = -100


# ------------------------------------------------------------------------------------------------
# reading chat data


def conversation_from_record(record: dict, where: str) -> list[dict]:
    """The messages of one JSON record (`messages`, or `prompt`/`response` with an optional `system`).

    Raises:
        PuzzleError: neither form, an unknown role, non-string content, or no assistant message.
    """
    if record.get("messages") is not None and not isinstance(record["messages"], list):  # reviewer: it fell back to
        # prompt/response (a null is a missing column of a mixed data set, as Hugging Face's to_json writes it)
        raise PuzzleError(f"{where}: 'messages' must be a list of {{role, content}}, got "
                          f"{type(record['messages']).__name__}")
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        # a system of another type is refused below, as in the messages form (breaker: 5 was dropped unsaid); a null
        # is a missing column
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
        messages += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise PuzzleError(f"{where}: expected 'messages' (a list of {{role, content}}) or 'prompt' and 'response' strings")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PuzzleError(f"{where}: every message needs a role in {ROLES} and a string content, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise PuzzleError(f"{where}: no assistant message, nothing to learn")
    return out


def resolve_data_path(spec: str) -> Path:
    """A file path, or `package:<name>` for a file shipped in puzzle/data."""
    if spec.startswith("package:"):
        from .data import packaged_text_path

        return packaged_text_path(spec.removeprefix("package:"))
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise PuzzleError(f"chat data {spec} {what}; give a .jsonl file (or {DEMO_SPEC}, the built-in demonstration set)")
    return path


def read_chat_jsonl(spec: str) -> list[list[dict]]:
    """Conversations from a .jsonl(.gz) file (see the module docstring), or the reasoning-toggle
    demonstration set written in code for the spec `demo:reasoning-toggle`. Raises PuzzleError on bad lines."""
    if spec == DEMO_SPEC:
        return [conversation_from_record(r, DEMO_SPEC) for r in reasoning_toggle_examples()]
    from .data import iter_json_lines

    path = resolve_data_path(spec)
    conversations = [conversation_from_record(record, f"{path}, line {lineno}") for lineno, record in iter_json_lines(path)]
    if not conversations:
        raise PuzzleError(f"{path} holds no conversations")
    if near := toggle_look_alikes(conversations):  # stop 76's leftover: "Detailed Thinking On" was trained unsaid
        warnings.warn(f"{path}: {len(near)} system message(s) read like the reasoning toggle but are not its exact "
                      f"text ({', '.join(repr(t) for t in sorted(set(near))[:3])}); the toggle is "
                      f"{REASONING_ON!r} / {REASONING_OFF!r} (as Llama-Nemotron and --measure-toggle use it), so "
                      f"the model learns these as other system messages; write them exactly to train the toggle")
    return conversations


def toggle_look_alikes(conversations: list[list[dict]]) -> list[str]:
    """The system messages that spell the reasoning toggle otherwise: the same words once case, punctuation and
    spacing are set aside ('Detailed Thinking: ON', 'detailed_thinking off'), but not REASONING_ON/OFF exactly."""
    def words(text: str) -> str:
        return " ".join(re.findall(r"[a-z]+", text.lower()))

    exact = (REASONING_ON, REASONING_OFF)
    return [m["content"] for c in conversations for m in c if m["role"] == "system"
            and m["content"] not in exact and words(m["content"]) in exact]


# ------------------------------------------------------------------------------------------------
# tokenizing with the chat template, masking the prompt


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and their labels (the id where learned, -100 elsewhere).

    Labels are aligned with the ids (label[t] is the token at t; the loss shifts them).

    Raises:
        PuzzleError: the tokenizer has no chat template, or its renderings are not prefix-stable.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PuzzleError("the tokenizer has no chat template; SFT renders conversations with the model's own template")
    ids = _render(tokenizer, messages, False)
    labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
    if train_on_prompt:
        return ids, labels
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[:i + 1], False)
        if i:
            before = _render(tokenizer, messages[:i], True)
        else:  # no prefix to render with a generation prompt: the header is what the turn shares with an empty one
            blank = _render(tokenizer, [{**m, "content": ""}], False)
            before = upto[:next((t for t, (a, b) in enumerate(zip(upto, blank)) if a != b), min(len(upto), len(blank)))]
        if upto[:len(before)] != before or ids[:len(upto)] != upto:
            # a reply that opens with whitespace can merge with the header's last token ("\n" + "\n\n"): locate the
            # turns by characters instead (reviewer: such a reply stopped the whole data set)
            return ids, _labels_by_offsets(tokenizer, messages, ids)
        span = upto[len(before):]
        # what the template writes after the end-of-turn token (ChatML's newline) is not the answer's to learn
        stops = [t for t, tok in enumerate(span) if tok == tokenizer.eos_token_id]
        end = len(before) + (stops[-1] + 1 if stops else len(span))
        labels[len(before):end] = upto[len(before):end]
    return ids, labels


def _labels_by_offsets(tokenizer, messages: list[dict], ids: list[int]) -> list[int]:
    """Labels of `tokenize_conversation` found through the rendered text: an assistant turn's tokens are those
    that start at or after its header's end and end within the turn (a token across the header's end stays
    unlearned), up to and including its last end-of-turn token.

    Raises:
        PuzzleError: a slow tokenizer (no character offsets), or renderings of the prefixes that are not text
            prefixes of the whole conversation's.
    """
    def text(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    whole = text(messages, False)
    try:
        encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # transformers' slow tokenizers
        encoded = None
    if encoded is None or encoded["input_ids"] != ids:
        raise PuzzleError("the chat template's rendering of a conversation prefix is not a prefix of the whole "
                          "conversation's, and the tokenizer gives no character offsets to locate the assistant "
                          "tokens by; use a standard template and a fast tokenizer (tokenizer.json), or strip "
                          "whitespace at the start of replies")
    offsets = encoded["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = text(messages[:i + 1], False)
        if i:
            before = text(messages[:i], True)
        else:  # the header: what two renderings with other contents share (an empty one would share a reply's
            # opening "<" with its "<|im_end|>": reviewer)
            a, b = text([{**m, "content": "a"}], False), text([{**m, "content": "b"}], False)
            before = a[:next((c for c, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
        if not (whole.startswith(upto) and upto.startswith(before)):
            raise PuzzleError("the chat template's rendering of a conversation prefix is not a prefix of the whole "
                              "conversation's; the assistant tokens cannot be located (use a standard template)")
        turn = [t for t, (start, end) in enumerate(offsets) if start >= len(before) and start < end <= len(upto)]
        stops = [t for t in turn if ids[t] == tokenizer.eos_token_id]
        for t in (turn if not stops else [t for t in turn if t <= stops[-1]]):
            labels[t] = ids[t]
    return labels


@dataclass(frozen=True)
class Packed:
    """Packed training rows, all (N, T) int64.

    input_ids: tokens (padding: the pad id); labels: learned tokens, -100 elsewhere; position_ids:
    0, 1, ... restarting at every conversation; segments: 1, 2, ... per conversation in a row, 0 on
    padding. `dropped`: conversations longer than T that were left out (`dropped_indices`: their
    positions in the input list); `longest`: the longest conversation's tokens (kept or not).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    dropped: int
    longest: int = 0
    dropped_indices: tuple = ()


def pack_conversations(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool = True,
                       seed: int = 0, positions: int | None = None) -> Packed:
    """Lay (ids, labels) examples into rows of `seq_len`, in a seeded order, whole examples only.

    pack=False gives one example per row (padded). Examples longer than seq_len are dropped. The label of
    each example's first token is set to -100: as the first token of a row it is never a target, and
    packed after another example it must not be either (that example's last token would learn to
    predict it), so packed and unpacked rows learn the same targets.

    Raises:
        PuzzleError: no example fits; naming the --seq-len that keeps the shortest, where it is within the model's
            `positions` (max_position_embeddings, when given).
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    dropped = 0
    fill = seq_len + 1  # force a new row first
    for k in order:
        n = len(examples[k][0])
        if n > seq_len:
            dropped += 1
            continue
        if not pack or fill + n > seq_len:
            rows.append([])
            fill = 0
        rows[-1].append(k)
        fill += n
    if not rows:
        shortest = min(len(e[0]) for e in examples) if examples else 0
        if positions is not None and shortest > positions:
            fix = f"that is more than the {positions} positions the model was trained on: give shorter conversations"
        else:
            fix = f"give --seq-len {shortest} or more" + (f" (at most {positions}, the model's positions)"
                                                           if positions is not None else "")
        raise PuzzleError(f"every conversation is longer than seq_len={seq_len} (the shortest has {shortest} tokens); "
                          f"{fix}")
    N = len(rows)
    input_ids = torch.full((N, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((N, seq_len), IGNORE, dtype=torch.int64)
    position_ids = torch.zeros((N, seq_len), dtype=torch.int64)
    segments = torch.zeros((N, seq_len), dtype=torch.int64)
    for r, members in enumerate(rows):
        at = 0
        for s, k in enumerate(members, start=1):
            ids, lab = examples[k]
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            labels[r, at:at + n] = torch.tensor(lab)
            labels[r, at] = IGNORE  # no earlier token of this conversation predicts its first
            position_ids[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = s
            at += n
    too_long = tuple(k for k, e in enumerate(examples) if len(e[0]) > seq_len)
    return Packed(input_ids, labels, position_ids, segments, dropped, max(len(e[0]) for e in examples), too_long)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool attention mask: query t sees key s iff s <= t and both
    are in the same conversation. Padding (segment 0) sees only itself, so no row is empty."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    real = (segments != 0)[:, :, None]
    eye = torch.eye(T, dtype=torch.bool, device=segments.device)
    return ((same & causal & real) | eye)[:, None]  # (B, 1, T, T)


def prepare_sft_data(tokenizer, conversations: list[list[dict]], seq_len: int, pack: bool = True,
                     train_on_prompt: bool = False, seed: int = 0, positions: int | None = None) -> Packed:
    """Tokenize, mask and pack conversations (see the module docstring); `positions`: the model's
    max_position_embeddings, which the fix a refusal names stays within.

    Raises:
        PuzzleError: as `tokenize_conversation` and `pack_conversations`, or a chat template that refuses a
            conversation (raise_exception, e.g. on the order of roles); naming the conversation (counting from 1).
    """
    from jinja2 import TemplateError

    examples = []
    for k, conversation in enumerate(conversations, start=1):
        try:
            examples.append(tokenize_conversation(tokenizer, conversation, train_on_prompt))
        except (PuzzleError, TemplateError) as e:  # reviewer: a template's refusal was a bare jinja2 traceback
            roles = ", ".join(m["role"] for m in conversation)
            raise PuzzleError(f"conversation {k} of the data (roles {roles}): {e}") from None
        except (ArithmeticError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # breaker: {{ 1/0 }}
            raise PuzzleError(f"the chat template failed on conversation {k} of the data ({type(e).__name__}: {e}); "
                              f"fix the template (chat_template.jinja or tokenizer_config.json)") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack_conversations(examples, seq_len, int(pad if pad is not None else 0), pack, seed, positions)


# ------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class SFTConfig:
    """Settings of supervised fine-tuning.

    Attributes:
        epochs: passes over the packed rows (fractions allowed); steps = ceil(epochs · rows / batch_size).
        seq_len: tokens per packed row.
        batch_size: rows per optimizer step over all processes (a multiple of the process count).
        micro_batch_size: rows per forward/backward on one process (0: its whole share).
        lr, warmup_fraction, min_lr_fraction, weight_decay, grad_clip: AdamW, warmup + cosine decay.
        pack: several conversations per row (attention isolated) or one per row.
        train_on_prompt: learn every token instead of the assistant turns only.
        freeze_embeddings: keep the embedding (and a tied LM head) fixed.
        checkpoint_every: steps between checkpoints.
        seed: packing and batch order.
    """

    epochs: float = 2.0
    seq_len: int = 512
    batch_size: int = 8
    micro_batch_size: int = 0
    lr: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    pack: bool = True
    train_on_prompt: bool = False
    freeze_embeddings: bool = False
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite("sft", epochs=self.epochs)
        for name, ok, want in (("epochs", self.epochs > 0, "positive"), ("seq_len", self.seq_len >= 2, ">= 2"),
                               ("batch_size", self.batch_size >= 1, ">= 1"),
                               ("micro_batch_size", self.micro_batch_size >= 0, ">= 0")):
            if not ok:  # breaker: one message listed all four
                raise PuzzleError(f"sft {name} (--{name.replace('_', '-')}) must be {want}, got {getattr(self, name)}")
        if self.checkpoint_every < 1:
            raise PuzzleError(f"sft checkpoint_every must be >= 1 step, got {self.checkpoint_every}")
        require_learning_rate("sft", self.lr)
        self.optim()  # lr, warmup, decay, clip: finite and in range

    def optim(self) -> OptimSettings:
        return OptimSettings(self.lr, self.warmup_fraction, self.min_lr_fraction, self.weight_decay, self.grad_clip)

    def steps(self, rows: int) -> int:
        return max(1, -(-int(self.epochs * rows) // self.batch_size))


def _step_fn(data: Packed, cfg: SFTConfig, env: DistEnv):
    """The train_loop step: summed cross-entropy of this rank's learned tokens over the step's total count."""

    def step(wrapped, k: int) -> dict:
        batch = global_batch(k, cfg.batch_size, data.input_ids.shape[0], cfg.seed)
        targets = data.labels[batch, 1:]
        total = int((targets != IGNORE).sum())  # learned tokens of the whole step, all ranks
        mine = rank_slice(batch, env)
        mb = cfg.micro_batch_size or len(mine)
        parts = [mine[s:s + mb] for s in range(0, len(mine), mb)]
        loss_sum, correct = 0.0, 0
        for j, idx in enumerate(parts):
            ids, pos = data.input_ids[idx].to(env.device), data.position_ids[idx].to(env.device)
            mask = block_causal_mask(data.segments[idx].to(env.device))
            tgt = data.labels[idx, 1:].to(env.device)  # (b, T-1)
            last = j == len(parts) - 1
            if hasattr(wrapped, "set_requires_gradient_sync"):
                wrapped.set_requires_gradient_sync(last)
            ctx = wrapped.no_sync() if (not last and hasattr(wrapped, "no_sync")) else nullcontext()
            with ctx:
                logits = wrapped(ids, position_ids=pos, attention_mask=mask)[:, :-1]  # (b, T-1, V)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                      ignore_index=IGNORE, reduction="sum")
                # DDP averages gradients over ranks: scale so the result is the mean over the step's tokens
                (nll * env.world_size / max(1, total)).backward()
            loss_sum += float(nll.detach())
            correct += int(((logits.argmax(-1) == tgt) & (tgt != IGNORE)).sum())
        # the step's mean loss and token accuracy, as a per-rank share the caller averages over ranks
        return {"loss": loss_sum * env.world_size / max(1, total), "token_acc": correct * env.world_size / max(1, total)}

    return step


def sft_meta(model: PuzzleForCausalLM, data: Packed, config: SFTConfig, extra_meta: dict | None = None) -> dict:
    """What an SFT checkpoint must match to be resumed: settings, the model (before training), the packed rows,
    extras; with the work folder it makes the export's `training_ref`."""
    from .distill import model_fingerprint, tokens_sha

    # --freeze-embeddings with an untied LM head trains the head (earlier versions froze it): their checkpoint's
    # optimizer state holds other parameters, so it must not be resumed as this one
    untied = model.lm_head.weight is not model.model.embed_tokens.weight
    head = {"lm_head_trains": True} if config.freeze_embeddings and untied else {}
    return {"stage": "sft", "config": asdict(config), "model": model_fingerprint(model),
            "data": tokens_sha(torch.cat([data.input_ids, data.labels, data.segments])), **head, **(extra_meta or {})}


def supervised_finetune(model: PuzzleForCausalLM, data: Packed, config: SFTConfig, work_dir, *,
                        env: DistEnv | None = None, fsdp: bool = False, progress: bool = False, on_step=None,
                        stop_after_steps: int | None = None, extra_meta: dict | None = None) -> TrainResult:
    """Fine-tune `model` on packed chat rows (prepare_sft_data); resumes from WORK/checkpoint.pt.

    Returns:
        train_utils.TrainResult: the trained model (rank 0), the per-step history (loss: mean
        cross-entropy in nats per learned token; token_acc: top-1 accuracy on them).

    Raises:
        PuzzleError: rows with nothing to learn, a diverging loss, a checkpoint of other settings.
    """
    env = env or DistEnv()
    if int((data.labels != IGNORE).sum()) == 0:
        raise PuzzleError("the chat data has no assistant tokens to learn")
    if config.batch_size % env.world_size:
        raise PuzzleError(f"batch size {config.batch_size} does not divide by {env.world_size} processes; give a "
                          f"multiple of {env.world_size}")
    for p in model.parameters():
        p.requires_grad_(True)
    if config.freeze_embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)  # a tied LM head is this Parameter; an untied one trains
    meta = sft_meta(model, data, config, extra_meta)
    optim = config.optim()
    result = train_loop(model, _step_fn(data, config, env), total_steps=config.steps(data.input_ids.shape[0]),
                        optim=optim, env=env, checkpoint_path=Path(work_dir) / "checkpoint.pt", meta=meta,
                        checkpoint_every=config.checkpoint_every, fsdp=fsdp, progress=progress, desc="sft",
                        on_step=on_step, stop_after_steps=stop_after_steps)
    if result.model is not None:
        for p in result.model.parameters():
            p.requires_grad_(False)
    return result


# ------------------------------------------------------------------------------------------------
# the reasoning-toggle demonstration set


def _task_add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    trace = (f"Add the ones: {a % 10} + {b % 10} = {ones}" + (", write {} and carry 1".format(ones - 10) if ones >= 10 else "")
             + f". Add the tens: {a // 10} + {b // 10}" + (" + 1" if ones >= 10 else "")
             + f" = {a // 10 + b // 10 + (ones >= 10)}. So {a} + {b} = {a + b}.")
    return f"What is {a} + {b}?", trace, f"{a} + {b} = {a + b}.", a + b


def _task_sub(rng):
    a = rng.randint(30, 99)
    b = rng.randint(10, a - 1)
    return (f"What is {a} - {b}?", f"Take {b // 10 * 10} from {a}: {a - b // 10 * 10}. Then take {b % 10}: "
            f"{a - b}. So {a} - {b} = {a - b}.", f"{a} - {b} = {a - b}.", a - b)


def _task_mul(rng):
    a, b = rng.choice([x for x in range(11, 40) if x % 10]), rng.randint(3, 9)
    return (f"What is {a} times {b}?", f"{a} x {b} = {a // 10 * 10} x {b} + {a % 10} x {b} = {a // 10 * 10 * b} + "
            f"{a % 10 * b} = {a * b}.", f"{a} times {b} is {a * b}.", a * b)


_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam")
_ITEMS = ("apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells")


def _task_story(rng):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    have, gets, gives = rng.randint(5, 40), rng.randint(2, 20), rng.randint(1, 5)
    end = have + gets - gives
    return (f"{name} has {have} {item}, buys {gets} more and gives {gives} away. How many {item} does {name} have now?",
            f"{name} starts with {have}. Buying {gets} more gives {have} + {gets} = {have + gets}. Giving {gives} away "
            f"leaves {have + gets} - {gives} = {end}.", f"{name} has {end} {item} now.", end)


def _task_sort(rng):
    nums = rng.sample(range(1, 60), 4)
    s = sorted(nums)
    listing = ", ".join(map(str, nums))
    return (f"Sort these numbers from smallest to largest: {listing}.",
            f"The smallest is {s[0]}, then {s[1]}, then {s[2]}, and the largest is {s[3]}.",
            f"{', '.join(map(str, s))}.", ", ".join(map(str, s)))


_UNITS = (("meter", "meters", "centimeters", 100), ("kilometer", "kilometers", "meters", 1000),
          ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60),
          ("kilogram", "kilograms", "grams", 1000), ("foot", "feet", "inches", 12))


def _task_units(rng):
    one, big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 40)
    return (f"How many {small} are in {n} {big}?", f"1 {one} is {factor} {small}, so {n} {big} are "
            f"{n} x {factor} = {n * factor} {small}.", f"{n} {big} are {n * factor} {small}.", n * factor)


def _task_compare(rng):
    a, b = rng.sample(range(100, 999), 2)
    big = max(a, b)
    return (f"Which number is larger, {a} or {b}?", f"Both have three digits. Compare the hundreds: {a // 100} and "
            f"{b // 100}" + (f"; they are equal, so compare the rest: {a % 100} and {b % 100}" if a // 100 == b // 100 else "")
            + f". So {big} is larger.", f"{big} is larger.", big)


TASKS = {"add": _task_add, "sub": _task_sub, "mul": _task_mul, "story": _task_story, "sort": _task_sort,
         "units": _task_units, "compare": _task_compare}


def reasoning_toggle_questions(n: int, seed: int, exclude=frozenset()) -> list[dict]:
    """n distinct synthetic questions (tasks in turn), none of whose text is in `exclude`.

    Each: {"task", "question", "reasoning", "answer" (the answer sentence), "value" (the verifiable result)}.
    """
    rng = random.Random(seed)
    names = list(TASKS)
    out, seen = [], set(exclude)
    tries = 0
    while len(out) < n:
        task = names[len(out) % len(names)]
        q, reasoning, answer, value = TASKS[task](rng)
        tries += 1
        if tries > 100 * n + 1000:
            raise PuzzleError(f"cannot make {n} distinct questions; ask for fewer")
        if q in seen:
            continue
        seen.add(q)
        out.append({"task": task, "question": q, "reasoning": reasoning, "answer": answer, "value": str(value)})
    return out


def toggle_conversation(question: dict, thinking: bool) -> dict:
    """The chat record of one question with the toggle on (think trace, then answer) or off (answer)."""
    system = REASONING_ON if thinking else REASONING_OFF
    reply = f"<think>\n{question['reasoning']}\n</think>\n{question['answer']}" if thinking else question["answer"]
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question["question"]},
                         {"role": "assistant", "content": reply}],
            "task": question["task"], "value": question["value"], "thinking": thinking}


def reasoning_toggle_examples(n_questions: int = 400, seed: int = 0) -> list[dict]:
    """The training set: each of n_questions questions twice, with the toggle on and off (in a seeded order)."""
    records = [toggle_conversation(q, t) for q in reasoning_toggle_questions(n_questions, seed) for t in (True, False)]
    random.Random(seed + 1).shuffle(records)
    return records


def reasoning_toggle_heldout(n_questions: int = 100, seed: int = 1, train_questions: int = 400,
                             train_seed: int = 0) -> list[dict]:
    """Held-out questions (not in the training set of (train_questions, train_seed)) with their answers."""
    train = {q["question"] for q in reasoning_toggle_questions(train_questions, train_seed)}
    return reasoning_toggle_questions(n_questions, seed, exclude=train)


def write_jsonl(records: list[dict], path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------------------------------------
# measuring the toggle

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.S)


def parse_think(text: str) -> dict:
    """has_think: "<think>" appears; well_formed: the text is <think>trace</think> then a non-empty
    answer, with a non-empty trace and one think block; answer: the text after the last "</think>", the
    whole text when there is no think tag, and "" when a "<think>" is never closed (a trace cut off by
    the token limit holds no answer: reviewer, its numbers were scored as one)."""
    m = _THINK.match(text)
    well = bool(m) and bool(m.group(1).strip()) and text.count("<think>") == 1 and text.count("</think>") == 1
    if "</think>" in text:
        answer = text.rsplit("</think>", 1)[1]
    else:
        answer = "" if "<think>" in text else text
    return {"has_think": "<think>" in text, "well_formed": well, "answer": answer.strip()}


_NUMBER = re.compile(r"(?<![\d.])\d+(?:,\d{3})*(?![\d]|\.\d)")  # whole numbers: "122.5" is none


def answer_is_correct(question: dict, answer: str) -> bool:
    """Whether `answer` (the text after the think block) states the result of a toggle question
    (`reasoning_toggle_questions`).

    sort: the sorted list appears, with no number after it. compare: the larger number appears and the
    smaller does not (both are in the question, so a reply that repeats it, or says "300 is larger than
    512", is not an answer; "512 is larger than 300" is not counted either: the demonstrations answer
    "512 is larger.").
    The others: the answer's last number is the value ("23 + 12 = 35."), so numbers of a repeated
    question do not count. Thousands separators are read ("40,000").
    """
    value = question["value"]
    if question["task"] == "sort":  # the list itself, not the start of a longer one
        return re.search(rf"(?<![\d.]){re.escape(value)}(?![\d]|\.\d|,\s*\d)", answer) is not None
    numbers = [n.replace(",", "") for n in _NUMBER.findall(answer)]
    if question["task"] == "compare":
        others = {n for n in re.findall(r"\d+", question["question"]) if n != value}
        return value in numbers and not others & set(numbers)
    return bool(numbers) and numbers[-1] == value


@torch.no_grad()
def greedy_chat(model: PuzzleForCausalLM, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The model's greedy reply to `messages` (rendered with the chat template; plain text without one:
    `runtime.chat_ids`), special tokens removed; at most `max_new_tokens`, and no further than the model's
    positions (reviewer: a report asked for 5000 ran past the tiny model's 2048).

    Raises:
        PuzzleError: a chat template that does not render."""
    from .runtime import chat_ids, stop_token_ids, until_stop

    ids = chat_ids(tokenizer, messages)[0][None]  # (1, T)
    room = model.config.max_position_embeddings - ids.shape[1] + 1  # the last new token is never fed back
    if room < 1:
        return ""
    stops = stop_token_ids(model.config, tokenizer)  # reviewer: a configuration's list of EOS ids was not used
    out = model.eval().generate(ids, max_new_tokens=min(max_new_tokens, room), eos_token_id=list(stops))
    return tokenizer.decode(until_stop(out[0, ids.shape[1]:].tolist(), stops), skip_special_tokens=True)


def toggle_report(model: PuzzleForCausalLM, tokenizer, questions: list[dict], max_new_tokens: int = 96,
                  progress: bool = False) -> pd.DataFrame:
    """Greedy answers to each question with the toggle on and off.

    Returns:
        A table: task, question, mode ("on"/"off"), reply, has_think, well_formed, correct
        (`answer_is_correct` of the answer part, after the think block).
    """
    rows = []
    items = [(q, mode) for q in questions for mode in ("on", "off")]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="toggle", unit="answer")
    for q, mode in items:
        system = REASONING_ON if mode == "on" else REASONING_OFF
        reply = greedy_chat(model, tokenizer, [{"role": "system", "content": system},
                                               {"role": "user", "content": q["question"]}], max_new_tokens)
        parsed = parse_think(reply)
        correct = answer_is_correct(q, parsed["answer"])
        rows.append({"task": q["task"], "question": q["question"], "mode": mode, "reply": reply,
                     "has_think": parsed["has_think"], "well_formed": parsed["well_formed"], "correct": correct})
    return pd.DataFrame(rows)


def toggle_summary(report: pd.DataFrame) -> pd.DataFrame:
    """Per mode: answers, share with a think block, share well-formed, share correct."""
    return (report.groupby("mode", sort=False)
            .agg(answers=("reply", "size"), think_fraction=("has_think", "mean"),
                 well_formed_fraction=("well_formed", "mean"), correct_fraction=("correct", "mean"))
            .reset_index())


# ------------------------------------------------------------------------------------------------
# command line


def _load_model(args, log, builtin_tiny: bool):
    """(model, tokenizer) from --model PATH (the built-in tiny model when `builtin_tiny`) or --out DIR --name NAME,
    as run_sft_command checked them."""
    if args.model:
        from .tiny import tiny_parent

        if builtin_tiny:
            return (loaded := tiny_parent()).model, loaded.tokenizer
        from .parent import load_parent

        loaded = load_parent(args.model)
        return loaded.model, loaded.tokenizer
    from .config import load_run_config
    from .pipeline import Run, build_child, read_architecture

    run = Run(args.out, load_run_config(args.out), progress=False, log=log)
    if args.name == "parent":
        from .parent import model_from_state_dict

        model = model_from_state_dict(run.parent.config, run.parent.model.state_dict())  # a copy to train
    else:
        model = build_child(run, read_architecture(run, args.name))
    return model, run.parent.tokenizer


def config_from_args(args) -> SFTConfig:
    return SFTConfig(epochs=args.epochs, seq_len=args.seq_len, batch_size=args.batch_size,
                     micro_batch_size=args.micro_batch_size, lr=args.lr, warmup_fraction=args.warmup_fraction,
                     min_lr_fraction=args.min_lr_fraction, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                     pack=not args.no_pack, train_on_prompt=args.train_on_prompt,
                     freeze_embeddings=args.freeze_embeddings, checkpoint_every=args.checkpoint_every, seed=args.seed)


def _check_sft_flags(args) -> None:
    """Refuse command-line values that would be ignored or fail late, before loading anything."""
    if args.device not in ("auto", "cpu", "cuda"):  # under torchrun each process takes cuda:LOCAL_RANK
        raise PuzzleError(f"--device {args.device!r}: give auto, cpu or cuda")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise PuzzleError(f"--stop-after-steps must be >= 1, got {args.stop_after_steps}")
    if args.measure_toggle < 0 or args.max_new_tokens < 1:
        raise PuzzleError(f"--measure-toggle must be >= 0 and --max-new-tokens >= 1 (got {args.measure_toggle}, "
                          f"{args.max_new_tokens})")
    if args.measure_toggle:  # reviewer: too many failed only after training and export (a fraction of a second)
        try:
            reasoning_toggle_heldout(args.measure_toggle)
        except PuzzleError as e:
            raise PuzzleError(f"--measure-toggle {args.measure_toggle}: {e}") from None


def run_sft_command(args, log=None) -> dict | None:
    """`puzzle sft`: load, prepare data, train, export to --dest, optionally measure the toggle.
    Returns the summary written to WORK/sft.json (None on ranks other than 0)."""
    log = log or (lambda msg: None)
    config = config_from_args(args)
    _check_sft_flags(args)
    if args.model and args.out:
        raise PuzzleError("give either --model PATH or --out DIR --name NAME, not both")
    if not args.model and (not args.out or not args.name):
        raise PuzzleError("give --model PATH (HF folder, .gguf, exported folder) or --out DIR --name NAME "
                          "(a run's child, or 'parent')")
    from .parent import local_model_arg

    args.model = local_model_arg(args.model)  # asset:<name> as the packaged model's file
    if args.dest is None:
        if not args.out:
            raise PuzzleError("give --dest FOLDER for the fine-tuned model")
        args.dest = args.out / "export" / f"{args.name}-sft"
    from .export import check_export_target, export_provenance, model_ref, run_ref, training_ref
    from .tiny import means_builtin_tiny

    from .io import refuse_repeated

    refuse_repeated("--data", args.data)
    dest = Path(args.dest)
    from .pipeline import check_dest_in_a_run, check_run_dest

    if args.out:
        check_run_dest(args.out, dest)
    else:
        check_dest_in_a_run(dest, "sft")
    work = Path(args.work or f"{dest}.sft-work")
    for folder in (work, dest):  # the same model twice at once (the run's lock is shared by gkd and sft)
        also_lock(folder, WORK_ADVICE)
    inputs = [p for p in (args.model, args.out) if p]
    builtin_tiny = not args.out and means_builtin_tiny(args.model)
    if args.out:  # a run's child: the run relative to dest (to work) when inside it
        from .config import load_run_config
        from .pipeline import local_parent_path, read_architecture_at

        run_config = load_run_config(args.out)
        if args.name != "parent":
            read_architecture_at(args.out, args.name)  # an unknown name, before anything loads
        what = f"{args.name} of run {run_ref(args.out, dest)}"
        source = f"{args.name} of run {run_ref(args.out, work)}"  # as the work folder's checkpoint records it
        inputs += local_parent_path(run_config)  # its parent is an input too
    else:  # the checkpoint's "model" hashes the weights: a moved folder is the same model and resumes
        what = "tiny" if builtin_tiny else model_ref(args.model)
        source = "tiny" if builtin_tiny else FOLDER_SOURCE
    check_export_target(dest, overwrite=True, keep=[*inputs, work],  # before loading and training, not after
                        provenance=export_provenance({"sft": {"model": what}}), training_pending=True, work=work)
    # a run's export folder takes new folders: the default DEST and its work folder are there
    check_work_folder(work, inputs, [args.out / "export"] if args.out else [])
    env = init_distributed(args.device, fsdp=args.fsdp)
    if not env.is_main:
        log = lambda msg: None  # noqa: E731
    try:
        # loading a run's parent to check the flags writes nothing to the run (pipeline.Run)
        model, tokenizer = _load_model(args, log, builtin_tiny)
        positions = model.config.max_position_embeddings
        if config.seq_len > positions:
            raise PuzzleError(f"--seq-len {config.seq_len} is longer than the {positions} positions the model was "
                              f"trained on; give --seq-len {positions} or less")
        read = [(spec, read_chat_jsonl(spec)) for spec in args.data]
        conversations = [c for _, cs in read for c in cs]
        demo = {k for k, spec in enumerate(spec for spec, cs in read for _ in cs) if spec == DEMO_SPEC}
        from .parent import transformers_quiet

        with transformers_quiet():  # its "Token indices sequence length is longer ..." before our own count of them
            data = prepare_sft_data(tokenizer, conversations, config.seq_len, config.pack, config.train_on_prompt,
                                    config.seed, positions)
        if data.dropped:  # reviewer: --seq-len 128 left out every "thinking on" demo example, with an info line
            # breaker: the hint named a --seq-len past the model's positions, which is refused
            keep = (f"--seq-len {data.longest} keeps them all" if data.longest <= positions else
                    f"the longest has {data.longest} tokens, more than the {positions} positions the model was trained "
                    f"on, so no --seq-len keeps them all (at most --seq-len {positions})")
            cut = (f"{data.dropped} of {len(conversations)} conversations are longer than --seq-len {config.seq_len} "
                   f"and left out; {keep}")
            if demo & set(data.dropped_indices):  # the demo set's own conversations (reviewer: not the user's)
                raise PuzzleError(f"{cut} (the {DEMO_SPEC} set teaches the toggle with its longer 'thinking on' "
                                  f"examples paired with the short 'off' ones; it needs them all)")
            log(f"sft: warning: {cut}")
        rows = data.input_ids.shape[0]
        if config.batch_size > rows:  # breaker: 300 on 3 rows used each row 100 times in "1 epoch"; 100000 hung
            passes = config.steps(rows) * config.batch_size / rows
            raise PuzzleError(f"--batch-size {config.batch_size} is more than the {rows} rows the data packs into "
                              f"at --seq-len {config.seq_len}: each step would take the same rows again (--epochs "
                              f"{config.epochs:g} would make {passes:.1f} passes); give --batch-size {rows} or less, "
                              f"or more data")
        learned = int((data.labels != IGNORE).sum())
        log(f"sft: {len(conversations)} conversations -> {data.input_ids.shape[0]} rows of {config.seq_len} tokens "
            f"({learned} learned tokens, {data.dropped} too long and dropped); "
            f"{config.steps(data.input_ids.shape[0])} steps, {env.world_size} process(es)")
        if source == FOLDER_SOURCE:  # or its path, as a checkpoint of an earlier version recorded it
            source = recorded_source(work / "checkpoint.pt", "model_source", what, source)
        # the checkpoint's --checkpoint-every / --micro-batch-size, where only those differ: the same training
        extra_meta = {"model_source": source, "config": recorded_settings(work / "checkpoint.pt", asdict(config))}
        from . import distributed  # ranks started with other settings or data would drift apart or wait forever

        meta = sft_meta(model, data, config, extra_meta)  # a pass over the model's weights: once
        distributed.check_ranks_agree(env.world_size, distributed.digests(meta), "sft")
        training = training_ref(meta, work, dest)
        check_export_target(dest, overwrite=True,  # an export of another training of this model: before training
                            provenance=export_provenance({"sft": {"model": what, "training": training}}))
        result = supervised_finetune(model, data, config, work, env=env, fsdp=args.fsdp,
                                     progress=not args.no_progress and env.is_main, stop_after_steps=args.stop_after_steps,
                                     extra_meta=extra_meta)
        if not result.finished:
            log(f"sft: stopped after step {result.steps_done} of {result.total_steps}; rerun the same command to continue")
            return {"finished": False, "steps_done": result.steps_done}
        summary = None
        if env.is_main:
            from .export import export_checkpoint
            from .io import sha256_file

            exported = export_checkpoint(result.model, tokenizer, dest, overwrite=True,
                                         extra_info={"sft": {"model": what, "data": list(args.data),  # the
                                                             "config": extra_meta["config"],  # training's settings
                                                             "training": training}})
            if exported.replaced:
                log(f"sft: replaced the export of {exported.replaced} that was in {exported.path}")
            summary = {"model": what, "data": list(args.data), "config": extra_meta["config"],
                       "rows": data.input_ids.shape[0],
                       "learned_tokens": learned, "dropped": data.dropped, "steps": result.steps_done,
                       "resumed_from_step": result.resumed_from,
                       "train_s": round(result.seconds, 1), "dest": str(exported.path),
                       "first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"],
                       "history": result.history}
            if result.resumed_from >= result.steps_done:  # only exported: the training's own figures stand
                summary = with_earlier_training(summary, work / "sft.json")
            if args.measure_toggle:
                summary["toggle_inputs"] = {"training": training, "steps": result.steps_done,
                                            "questions": args.measure_toggle, "max_new_tokens": args.max_new_tokens}
                report = _kept_toggle_report(work, summary["toggle_inputs"])
                if report is not None:  # fresh user: a finished rerun answered every question again (2 min)
                    log(f"sft: {work / 'toggle.csv'} measured this training with these settings: kept")
                else:
                    questions = reasoning_toggle_heldout(args.measure_toggle)
                    report = toggle_report(result.model, tokenizer, questions, args.max_new_tokens)
                    atomic_write_text(work / "toggle.csv", report.to_csv(index=False))
                summary["toggle_csv_sha256"] = sha256_file(work / "toggle.csv")
                summary["toggle"] = toggle_summary(report).to_dict(orient="records")
            atomic_write_json(work / "sft.json", summary)
        barrier(env)
        return summary
    except RuntimeError as e:  # another rank stopped: its message says why (breaker: gloo's traceback here)
        if (lost := peer_lost(env, e)) is not None:
            raise lost from None
        raise
    finally:
        shutdown_distributed(env)


def _kept_toggle_report(work: Path, inputs: dict) -> pd.DataFrame | None:
    """WORK/toggle.csv as an earlier call wrote it for the same `inputs` (training, its steps, the questions and
    --max-new-tokens; WORK/sft.json records them with the file's sha256), else None: greedy answers of the same
    weights are the same, so they are not generated again."""
    from .io import read_json
    from .io import sha256_file

    path = work / "toggle.csv"
    try:
        earlier = read_json(work / "sft.json")
        same = (isinstance(earlier, dict) and earlier.get("toggle_inputs") == json.loads(json.dumps(inputs))
                and path.is_file() and earlier.get("toggle_csv_sha256") == sha256_file(path))
        return pd.read_csv(path) if same else None
    except (PuzzleError, OSError, ValueError, pd.errors.ParserError):
        return None


def cmd_sft(args) -> int:
    import sys

    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    summary = run_sft_command(args, log)
    if summary and summary.get("dest"):
        resumed = summary.get("resumed_from_step", 0)
        how = ("; all steps done by an earlier call, only exported"
               if summary.get("only_exported") or resumed >= summary["steps"] else
               f"; resumed from step {resumed} of {summary['steps']}" if resumed else "")
        log(f"sft: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} nats/token{how}; exported to "
            f"{summary['dest']} ({time.perf_counter() - t0:.0f} s in all)")
        if note := stalled_gradient_note(summary.get("history", []), "sft"):
            log(note)
        for row in summary.get("toggle", []):
            log(f"sft: toggle {row['mode']:>3}: think {row['think_fraction']:.0%}, well-formed "
                f"{row['well_formed_fraction']:.0%}, correct {row['correct_fraction']:.0%} of {row['answers']}")
    return 0


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle sft` to an argparse subparsers object; func(args) returns an exit code."""
    d = SFTConfig()
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat jsonl (reasoning toggle), writes an exported folder",
                              description="Fine-tune a parent, a run's child or an exported folder on chat data "
                                          "(messages or prompt/response jsonl), with the model's chat template, "
                                          "prompt tokens masked and packed rows with isolated attention. The "
                                          "demonstration set demo:reasoning-toggle teaches the "
                                          "'detailed thinking on/off' toggle.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="PATH", help="HF folder, .gguf, exported (nemotron-nas) folder, or 'tiny'")
    g.add_argument("--out", type=dir_arg, metavar="DIR", help="a run directory (with --name: one of its children, or 'parent')")
    g.add_argument("--name", help="architecture name in DIR/search/, or 'parent'")
    g.add_argument("--data", nargs="+", action="extend", required=True, metavar="FILE",
                   help="chat .jsonl(.gz) files, or demo:reasoning-toggle")
    g.add_argument("--dest", type=Path, metavar="FOLDER", help="exported folder to write (run default: DIR/export/<name>-sft)")
    g.add_argument("--work", type=Path, metavar="DIR", help="checkpoints and logs (default: DEST.sft-work)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=d.epochs, help="passes over the packed rows")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed row")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step over all processes")
    t.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="rows per forward/backward per process (0: all)")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    t.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction, help="share of steps with linear warmup")
    t.add_argument("--min-lr-fraction", type=float, default=d.min_lr_fraction, help="cosine decay floor, fraction of --lr")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0: off)")
    t.add_argument("--no-pack", action="store_true", help="one conversation per row instead of packing")
    t.add_argument("--train-on-prompt", action="store_true", help="learn all tokens, not only the assistant turns")
    t.add_argument("--freeze-embeddings", action="store_true", help="keep the embedding / tied LM head fixed")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of packing and batch order")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto")
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (under torchrun)")
    t.add_argument("--stop-after-steps", type=int, default=None, help="stop after this many steps (checkpointed); rerun to continue")
    m = p.add_argument_group("after training")
    m.add_argument("--measure-toggle", type=int, default=0, metavar="N",
                   help="greedy answers to N held-out toggle questions, on and off (WORK/toggle.csv)")
    m.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer when measuring the toggle")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_sft)
    return p
