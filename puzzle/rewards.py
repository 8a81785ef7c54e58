"""Graded reward functions for preference optimization: verifiable synthetic tasks and a model as judge.

Pairs labelled only 1/0 make every RPO distance collapse to a DPO-like loss (Δ* is then ±η); a reward
with a graded score gives RPO something to match. A reward function here is any callable

    reward_fn(prompts: list, responses: list[str]) -> list[float]

(prompts as given to the trainer: strings or chat messages; one float per response).

Synthetic tasks (`TASKS`) write prompts whose answer can be checked from the prompt text alone, and
score partial correctness in [0, 1]:

    count    "Count from 7 to 12 ..."       share of positions holding the right number, over
                                            max(expected, given) numbers (extra numbers cost)
    repeat   "Repeat these words ...: a b"  difflib similarity ratio 2·M/T of the word sequences
    reverse  "Write these words in reverse order: a b c"   the same ratio against the reversed list

`LikelihoodJudge` uses a model (e.g. the parent) as a judge: the reward is the judge's mean log-prob
per response token given the prompt (nats/token), a graded score of how plausible the judge finds it.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass

import torch

from .errors import PuzzleError

WORDS = ("apple", "river", "stone", "cloud", "green", "table", "music", "horse", "bread", "light", "paper", "chair",
         "ocean", "tiger", "smile", "glass", "train", "house", "water", "bird", "sun", "moon", "book", "door", "tree",
         "fish", "milk", "snow", "rain", "road", "king", "star", "cat", "dog", "hat", "cup", "box", "car", "pen", "egg")


def prompt_text(prompt) -> str:
    """The text a task reads from a prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise PuzzleError("a chat prompt needs a user message for the task to read")
    return users[-1]


def positional_score(expected: list, given: list) -> float:
    """Share of positions i with given[i] == expected[i], over max(len(expected), len(given)); in [0, 1]."""
    if not expected and not given:
        return 1.0
    hits = sum(1 for a, b in zip(expected, given) if a == b)
    return hits / max(len(expected), len(given))


def sequence_ratio(expected: list, given: list) -> float:
    """difflib's ratio 2·M/T of two sequences (M matched items, T their total length); in [0, 1]."""
    if not expected and not given:
        return 1.0
    return difflib.SequenceMatcher(None, expected, given, autojunk=False).ratio()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@dataclass(frozen=True)
class SyntheticTask:
    """A verifiable task: `prompts(n, seed)` writes chat prompts, `score(prompt, response)` grades an answer."""

    name: str
    description: str

    def prompts(self, n: int, seed: int = 0) -> list[tuple[dict, ...]]:
        """n chat prompts (one user message each), deterministic for a seed."""
        rng = random.Random(f"{self.name}-{seed}")
        out = []
        for _ in range(n):
            if self.name == "count":
                a = rng.randint(1, 30)
                b = a + rng.randint(3, 7)
                text = f"Count from {a} to {b}. Write only the numbers, separated by commas."
            else:
                words = rng.sample(WORDS, rng.randint(3, 5))
                lead = ("Repeat these words exactly, in the same order" if self.name == "repeat"
                        else "Write these words in reverse order")
                text = f"{lead}: {' '.join(words)}"
            out.append(({"role": "user", "content": text},))
        return out

    def held_out_prompts(self, n: int, seed: int, exclude) -> list[tuple[dict, ...]]:
        """n distinct prompts of this task, none of them among `exclude` (the training prompts), deterministic for
        a seed: what `puzzle rpo --eval-prompts` evaluates on (reviewer: 19 of 32 count prompts were training ones,
        the count task having only 150).

        Raises:
            PuzzleError: fewer than n such prompts exist (lower --eval-prompts or --num-prompts)."""
        taken = {prompt_text(q) for q in exclude}
        out = []
        for q in self.prompts(50 * n + 2000, seed=seed):  # count: every one of its 150 prompts shows up
            if (text := prompt_text(q)) not in taken:
                taken.add(text)
                out.append(q)
                if len(out) == n:
                    return out
        raise PuzzleError(f"--eval-prompts {n}: the {self.name} task has only {len(out)} prompts beside the "
                          f"{len({prompt_text(q) for q in exclude})} distinct training prompts; lower --eval-prompts "
                          f"or --num-prompts")

    def score(self, prompt, response: str) -> float:
        """Partial-correctness score in [0, 1]; PuzzleError when the prompt is not this task's."""
        text = prompt_text(prompt)
        if self.name == "count":
            m = re.search(r"Count from (\d+) to (\d+)", text)
            if not m:
                raise PuzzleError(f"not a count prompt: {text[:60]!r}")
            expected = list(range(int(m.group(1)), int(m.group(2)) + 1))
            return positional_score(expected, [int(x) for x in re.findall(r"\d+", response)])
        lead, sep, words = text.partition(": ")
        if not sep:
            raise PuzzleError(f"not a {self.name} prompt: {text[:60]!r}")
        expected = _words(words)
        if self.name == "reverse":
            expected = expected[::-1]
        return sequence_ratio(expected, _words(response))

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        return [self.score(p, r) for p, r in zip(prompts, responses)]

    def accepts(self, prompt) -> bool:
        """Whether `score` can grade answers to `prompt` (a --prompts file is checked whole before training)."""
        try:
            self.score(prompt, "")
        except PuzzleError:
            return False
        return True

    @property
    def prompt_form(self) -> str:
        """How this task's prompts read, for a refusal: one that `prompts` writes."""
        return f"like {prompt_text(self.prompts(1)[0])!r}"


TASKS = {
    "count": SyntheticTask("count", "count from a to b; positional partial credit"),
    "repeat": SyntheticTask("repeat", "repeat 3-5 words; sequence similarity"),
    "reverse": SyntheticTask("reverse", "reverse 3-5 words; sequence similarity"),
}


def get_task(name: str) -> SyntheticTask:
    """The synthetic task called `name`; PuzzleError lists the known ones."""
    if name not in TASKS:
        raise PuzzleError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


class LikelihoodJudge:
    """A language model as a graded judge: reward = its mean log-prob per response token (nats/token).

    Args:
        model: a PuzzleForCausalLM (the parent, typically); used without gradients.
        tokenizer: the judge's tokenizer (it reads the responses' text; `--reward judge:PATH` passes PATH's own).
        string_prompts: "raw" or "chat", as in `puzzle.preference.encode_prompt`.
        batch_size: responses scored per forward pass.
    """

    def __init__(self, model, tokenizer, string_prompts: str = "raw", batch_size: int = 8):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.string_prompts, self.batch_size = string_prompts, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        from .preference import encode_prompt, encode_response, response_logprobs

        p_ids = [encode_prompt(self.tokenizer, p, self.string_prompts) for p in prompts]
        r_ids = [encode_response(self.tokenizer, r) for r in responses]
        out = []
        for i in range(0, len(p_ids), self.batch_size):
            s, n = response_logprobs(self.model, p_ids[i:i + self.batch_size], r_ids[i:i + self.batch_size])
            out += (s.double().cpu() / n.clamp(min=1)).tolist()
        return out
