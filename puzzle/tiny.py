"""The "tiny" preset's parent: a small random Llama and a byte-level tokenizer, built in code.

Used by the tests and by `puzzle run --preset tiny`, so the whole pipeline runs in seconds with
nothing downloaded. Everything here is deterministic: the same seed gives the same weights, and
the tokenizer is the same on every machine (its merges are learned by a few lines of plain Python
from a fixed text, not by a trainer whose tie-breaking could change between library versions).

The tokenizer mirrors SmolLM2-Instruct's layout (the demo parent): byte-level BPE, special tokens
`<|endoftext|>` (id 0), `<|im_start|>` (id 1), `<|im_end|>` (id 2), bos `<|im_start|>`,
eos and pad `<|im_end|>`, and a ChatML chat template.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from .errors import PuzzleError
from .modeling import PuzzleForCausalLM
from .parent import LoadedModel

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, as SmolLM2-Instruct uses it, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The fixed text the merges are learned from (any change here changes the vocabulary).
_MERGE_TEXT = (
    "The parent model is a trained language model. The child is the same depth, but each layer may use "
    "a cheaper block: fewer key and value heads, no attention, a single linear map, a narrower feed forward "
    "network, or no feed forward network at all. The search trains the candidate blocks, scores them, and "
    "then solves for the best child under the budget. There are the things that the search needs to know."
)
NUM_MERGES = 40


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (Radford et al. 2019, `encoder.py`).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points 256+ in
    byte order, so every byte-level token is a printable string.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) learned from `text`, deterministically.

    The text is split into words by the byte-level pre-tokenizer; each step merges the most
    frequent adjacent pair, ties broken by the pair's string order.
    """
    words = Counter(w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text))
    splits = {w: list(w) for w in words}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for w, count in words.items():
            for pair in zip(splits[w], splits[w][1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[w] = merged
    return merges


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: 3 special tokens, 256 byte tokens, NUM_MERGES merges (vocab 299).

    Encodes any UTF-8 text and decodes it back unchanged (every byte has a token; no normalizer,
    no prefix space, no clean-up of spaces). Saves and reloads with save_pretrained /
    AutoTokenizer.from_pretrained; `apply_chat_template` writes ChatML.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    merges = learn_merges(_MERGE_TEXT, NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocab: they keep ids 0, 1, 2
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def tiny_parent(
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
) -> LoadedModel:
    """A random Llama parent with the tiny tokenizer; the same weights for the same arguments.

    Linear and embedding weights are N(0, 0.02) drawn from a torch.Generator seeded with `seed`
    (in parameter order), norms are ones; tied embeddings, RoPE theta 10000, head_dim
    hidden_size / num_heads, vocab = len(tiny_tokenizer()), fp32.

    Raises:
        PuzzleError: sizes that cannot form a model (e.g. KV heads that do not divide the heads).
    """
    tokenizer = tiny_tokenizer()
    if hidden_size % num_heads:
        raise PuzzleError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    try:
        config = ModelConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            intermediate_size=intermediate_size,
            blocks=(BlockConfig(AttentionConfig("gqa", num_kv_heads), FFNConfig("swiglu", intermediate_size)),) * num_layers,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            extra={"source": "tiny", "name": "tiny", "seed": seed},
        )
    except ValueError as e:
        raise PuzzleError(f"tiny parent: {e}") from e
    model = PuzzleForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied LM head appears once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, config=config, source=f"tiny random Llama (seed {seed})")


def means_builtin_tiny(spec: str) -> bool:
    """Whether a command-line model argument names the built-in tiny model: the word "tiny" when no file
    or folder called tiny is in the working directory. An existing ./tiny wins (a run or model folder the
    user made, e.g. with `puzzle run --preset tiny --out tiny`), and a note on stderr says so."""
    if spec != "tiny":
        return False
    if Path(spec).exists():
        print("note: 'tiny' is the folder ./tiny here, not the built-in tiny model (run from a directory without "
              "./tiny for that)", file=sys.stderr)
        return False
    return True
