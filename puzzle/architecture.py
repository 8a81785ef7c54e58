"""What each layer of a parent or child holds: the block variants and the model config.

Standard library only: this file is copied verbatim into every exported checkpoint, next to
`modeling.py`, so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs
nothing but torch and transformers.

A *block* is (attention subblock, FFN subblock). Each subblock is one of:

    attention: "gqa"    grouped-query attention with `num_kv_heads` KV heads (the parent's or fewer)
               "linear" one (C, C) matrix applied to the normed input (attends to the current token only)
               "no_op"  removed, with its RMSNorm
    ffn:       "swiglu" SwiGLU MLP of width `intermediate_size` (the parent's or narrower)
               "linear" one (C, C) matrix applied to the normed input
               "no_op"  removed, with its RMSNorm

Export format (nemotron-nas / DeciLM `block_configs`): see `block_config_entry` and
`block_from_entry`. The ffn_mult rounding rule follows the DeciLM configuration used by
Nemotron-51B and Llama-3.3-Nemotron-Super-49B.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ATTENTION_KINDS = ("gqa", "linear", "no_op")
FFN_KINDS = ("swiglu", "linear", "no_op")


class ArchitectureError(ValueError):
    """A block or model configuration that cannot exist; the message says what to change."""


@dataclass(frozen=True)
class AttentionConfig:
    """One attention subblock variant.

    Attributes:
        kind: "gqa", "linear" or "no_op".
        num_kv_heads: KV heads for "gqa" (must divide the query heads); None otherwise.
    """

    kind: str = "gqa"
    num_kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ArchitectureError(f"attention kind {self.kind!r} is not one of {ATTENTION_KINDS}")
        if self.kind == "gqa":
            if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
                raise ArchitectureError(f"gqa attention needs num_kv_heads >= 1, got {self.num_kv_heads!r}")
        elif self.num_kv_heads is not None:
            raise ArchitectureError(f"{self.kind} attention has no KV heads (got num_kv_heads={self.num_kv_heads})")

    @property
    def id(self) -> str:
        """Stable string id, used as a table key and in file names: 'attn-kv3', 'attn-linear', 'attn-noop'."""
        if self.kind == "gqa":
            return f"attn-kv{self.num_kv_heads}"
        return "attn-linear" if self.kind == "linear" else "attn-noop"

    @classmethod
    def from_id(cls, variant_id: str) -> "AttentionConfig":
        """Inverse of `id`. Raises ArchitectureError for an unknown id."""
        if variant_id == "attn-linear":
            return cls("linear")
        if variant_id == "attn-noop":
            return cls("no_op")
        if variant_id.startswith("attn-kv") and (heads := _count(variant_id, 7)) is not None:
            return cls("gqa", heads)
        raise ArchitectureError(f"unknown attention variant id {variant_id!r} (expected attn-kvN, attn-linear, attn-noop)")


def _count(variant_id: str, start: int) -> int | None:
    """The number that ends a variant id from `start` on ("attn-kv1", "ffn-768"), or None where the rest is no ASCII
    number. Raises ArchitectureError for a number spelt otherwise than `id` spells it ("attn-kv01", "ffn-0768"): one
    variant under two ids would pass a table's duplicate check and break the search's own checks (breaker)."""
    digits = variant_id[start:]
    if not (digits.isascii() and digits.isdigit()):  # no `re`: this file goes into every export, stdlib-light
        return None
    if str(int(digits)) != digits:
        raise ArchitectureError(f"variant id {variant_id!r} spells its number with leading zeros: write "
                                f"{variant_id[:start] + str(int(digits))!r}")
    return int(digits)


@dataclass(frozen=True)
class FFNConfig:
    """One FFN subblock variant.

    Attributes:
        kind: "swiglu", "linear" or "no_op".
        intermediate_size: SwiGLU width for "swiglu"; None otherwise.
    """

    kind: str = "swiglu"
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FFN_KINDS:
            raise ArchitectureError(f"ffn kind {self.kind!r} is not one of {FFN_KINDS}")
        if self.kind == "swiglu":
            if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
                raise ArchitectureError(f"swiglu ffn needs intermediate_size >= 1, got {self.intermediate_size!r}")
        elif self.intermediate_size is not None:
            raise ArchitectureError(f"{self.kind} ffn has no width (got intermediate_size={self.intermediate_size})")

    @property
    def id(self) -> str:
        """Stable string id: 'ffn-1536', 'ffn-linear', 'ffn-noop'."""
        if self.kind == "swiglu":
            return f"ffn-{self.intermediate_size}"
        return "ffn-linear" if self.kind == "linear" else "ffn-noop"

    @classmethod
    def from_id(cls, variant_id: str) -> "FFNConfig":
        """Inverse of `id`. Raises ArchitectureError for an unknown id."""
        if variant_id == "ffn-linear":
            return cls("linear")
        if variant_id == "ffn-noop":
            return cls("no_op")
        if variant_id.startswith("ffn-") and (width := _count(variant_id, 4)) is not None:
            return cls("swiglu", width)
        raise ArchitectureError(f"unknown ffn variant id {variant_id!r} (expected ffn-N, ffn-linear, ffn-noop)")


@dataclass(frozen=True)
class BlockConfig:
    """One decoder block: an attention subblock followed by an FFN subblock, each with its residual."""

    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def id(self) -> str:
        """Stable id 'attn-kv3+ffn-1536' (safe in file names)."""
        return f"{self.attention.id}+{self.ffn.id}"

    @property
    def removed(self) -> bool:
        """Whether the block is skipped whole: its attention and its FFN are both no_op."""
        return self.attention.kind == "no_op" and self.ffn.kind == "no_op"

    @classmethod
    def from_id(cls, block_id: str) -> "BlockConfig":
        attn, sep, ffn = block_id.partition("+")
        if not sep:
            raise ArchitectureError(f"block id {block_id!r} must look like 'attn-kv3+ffn-1536'")
        return cls(AttentionConfig.from_id(attn), FFNConfig.from_id(ffn))


def is_variant_id(key: str) -> bool:
    """Whether `key` is an attention ("attn-kv1"), FFN ("ffn-768") or block ("attn-kv1+ffn-768") variant id."""
    for parse in (AttentionConfig.from_id, FFNConfig.from_id, BlockConfig.from_id):
        try:
            parse(key)
            return True
        except ArchitectureError:
            pass
    return False


# ----------------------------------------------------------------------------------------------
# ffn_mult <-> intermediate size (DeciLM rule)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int, multiple: int = 256) -> int:
    """DeciLM's width rule: int(2 * ffn_mult * hidden / 3), rounded up to a multiple of `multiple`."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return multiple * math.ceil(size / multiple)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> tuple[float, bool]:
    """ffn_mult (rounded to 6 decimals) for a width, and whether the DeciLM rule gives that width back.

    A width that is not a multiple of 256 (or not reproduced after rounding) returns exact=False:
    tools that read only ffn_mult (vLLM) would build a different width, so the exporter must also
    write the exact size and warn.
    """
    mult = round(1.5 * intermediate_size / hidden_size, 6)
    return mult, ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size


def block_config_entry(block: BlockConfig, num_attention_heads: int, hidden_size: int) -> dict:
    """The nemotron-nas `block_configs` entry for one block (plus the exact FFN width).

    Returns:
        {"attention": {"no_op", "replace_with_linear", "n_heads_in_group", "sparsify"},
         "ffn": {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size", "sparsify"}}, without ffn_mult for a
        width the DeciLM rule cannot give back (vLLM reads ffn_mult when an entry has it); `sparsify` is always
        null, as in NVIDIA's published Nemotron-NAS configs (TensorRT-LLM's older DeciLM converter reads it as an
        attribute of both entries).
    """
    a, f = block.attention, block.ffn
    attention = {
        "no_op": a.kind == "no_op",
        "replace_with_linear": a.kind == "linear",
        "n_heads_in_group": num_attention_heads // a.num_kv_heads if a.kind == "gqa" else None,
        "sparsify": None,
    }
    ffn = {"no_op": f.kind == "no_op", "replace_with_linear": f.kind == "linear", "ffn_mult": None, "intermediate_size": None,
           "sparsify": None}
    if f.kind == "swiglu":
        ffn["ffn_mult"], exact = intermediate_size_to_ffn_mult(f.intermediate_size, hidden_size)
        ffn["intermediate_size"] = f.intermediate_size
        if not exact:  # vLLM takes ffn_mult whenever the entry has it (`hasattr`), so an inexact one would build the
            del ffn["ffn_mult"]  # wrong width: without it, vLLM reads intermediate_size (reviewer)
    return {"attention": attention, "ffn": ffn}


def _whole(value) -> bool:
    """A JSON whole number: an int, or a float without a fraction (1536.0); never a bool."""
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer())


def block_from_entry(entry: dict, num_attention_heads: int, hidden_size: int) -> BlockConfig:
    """Parse one nemotron-nas `block_configs` entry. An exact `intermediate_size` wins over ffn_mult.

    Raises ArchitectureError for features this toolkit cannot run (sliding windows, sink tokens,
    sparsified attention), inconsistent head counts, a no_op / replace_with_linear flag that is not true or false
    (or both set), or a width that is not a whole number >= 1.
    """
    att, ffn = entry.get("attention", {}), entry.get("ffn", {})
    for key in ("window_length", "num_sink_tokens", "sparsify", "unshifted_sink", "use_prefill_window_in_sink_attention"):
        if att.get(key) not in (None, False):
            raise ArchitectureError(f"block_configs attention option {key}={att[key]!r} is not supported; only full causal GQA, linear and no_op")
    for part, sub in (("attention", att), ("ffn", ffn)):  # breaker: "false" (text) was read as true
        for flag in ("no_op", "replace_with_linear"):
            if not (sub.get(flag) is None or isinstance(sub.get(flag), bool)):  # 1 == True: by type
                raise ArchitectureError(f"block_configs {part} {flag}={sub[flag]!r} must be true or false")
        if sub.get("no_op") and sub.get("replace_with_linear"):  # it was taken as no_op, unsaid
            raise ArchitectureError(f"block_configs {part} sets both no_op and replace_with_linear; keep one of them")
    if att.get("no_op"):
        attention = AttentionConfig("no_op")
    elif att.get("replace_with_linear"):
        attention = AttentionConfig("linear")
    else:
        group = att.get("n_heads_in_group")
        if not _whole(group) or group < 1 or num_attention_heads % group:
            raise ArchitectureError(f"n_heads_in_group={group!r} must be a positive divisor of num_attention_heads={num_attention_heads}")
        attention = AttentionConfig("gqa", num_attention_heads // int(group))
    width, mult = ffn.get("intermediate_size"), ffn.get("ffn_mult")
    if ffn.get("no_op"):
        ffn_cfg = FFNConfig("no_op")
    elif ffn.get("replace_with_linear"):
        ffn_cfg = FFNConfig("linear")
    elif width is not None:  # 64.5 was cut to 64, 0 called missing (breaker)
        if not _whole(width) or width < 1:
            raise ArchitectureError(f"block_configs ffn intermediate_size={width!r} must be a whole number >= 1")
        ffn_cfg = FFNConfig("swiglu", int(width))
    elif mult is not None:
        if isinstance(mult, bool) or not isinstance(mult, (int, float)):
            raise ArchitectureError(f"block_configs ffn ffn_mult={mult!r} must be a number")
        ffn_cfg = FFNConfig("swiglu", ffn_mult_to_intermediate_size(float(mult), hidden_size))
    else:
        raise ArchitectureError(f"block_configs ffn entry {ffn!r} has neither no_op, replace_with_linear, ffn_mult nor intermediate_size")
    return BlockConfig(attention, ffn_cfg)


# ----------------------------------------------------------------------------------------------
# Whole-model config

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder whose layers may differ (one BlockConfig per layer).

    Sizes are in elements; `blocks[i]` is layer i. `rope_scaling` is None or a dict with
    "rope_type" in SUPPORTED_ROPE_TYPES and that type's parameters (HF's format).
    """

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    blocks: tuple[BlockConfig, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # free-form provenance (source file, name); not used by the model

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise ArchitectureError("a model needs at least one layer")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
            if int(getattr(self, name)) < 1:
                raise ArchitectureError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ArchitectureError(f"{name} must be a positive finite number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ArchitectureError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}")
        for i, block in enumerate(self.blocks):
            a = block.attention
            if a.kind == "gqa" and self.num_attention_heads % a.num_kv_heads:
                raise ArchitectureError(
                    f"layer {i}: {a.num_kv_heads} KV heads do not divide {self.num_attention_heads} query heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ArchitectureError(f"rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.blocks)

    @property
    def parent_block(self) -> BlockConfig:
        """The block a homogeneous parent of these sizes would have in every layer."""
        return BlockConfig(AttentionConfig("gqa", self.num_key_value_heads), FFNConfig("swiglu", self.intermediate_size))

    def with_blocks(self, blocks) -> "ModelConfig":
        """The same model sizes with other per-layer blocks (a child of this parent)."""
        blocks = tuple(blocks)
        if len(blocks) != len(self.blocks):
            raise ArchitectureError(f"expected {len(self.blocks)} blocks, got {len(blocks)}")
        return dataclasses.replace(self, blocks=blocks)

    def to_dict(self) -> dict:
        """JSON-ready dict; blocks as ids. Inverse: `from_dict`."""
        d = dataclasses.asdict(self)
        d["blocks"] = [b.id for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["blocks"] = tuple(BlockConfig.from_id(b) if isinstance(b, str) else b for b in d["blocks"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ArchitectureError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)
