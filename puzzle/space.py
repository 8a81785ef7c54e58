"""The search space: which attention and FFN variants each layer of a child may use.

DESIGN.md, "Search space": attention is the parent's GQA, fewer KV heads (every count below the
parent's that divides it, so that mean-pooling merges whole groups), `linear` or `no_op`; the FFN is
the parent's width or narrower widths (fractions of the parent's, rounded to a hardware-friendly
multiple), `linear` or `no_op`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .architecture import AttentionConfig, FFNConfig, ModelConfig
from .errors import PuzzleError


@dataclass(frozen=True)
class SpaceConfig:
    """Settings of the per-layer search space.

    Attributes:
        ffn_fractions: narrower FFN widths as fractions of the parent's (1.0 is always included).
        ffn_multiple: widths are rounded to the nearest multiple of this (256 suits GPUs; small
            models may use 64); a width never rounds to 0 or to the parent's width.
        kv_heads: KV-head counts to offer besides the parent's; empty means every divisor of the
            parent's KV-head count below it.
        linear: offer `linear` replacements of both subblocks (vLLM cannot serve them).
        no_op: offer removal of either subblock.
    """

    ffn_fractions: tuple[float, ...] = (0.75, 0.5, 0.25)
    ffn_multiple: int = 256
    kv_heads: tuple[int, ...] = ()
    linear: bool = True
    no_op: bool = True

    def __post_init__(self) -> None:
        # reviewer: "12" read as (1, 2), 2.7 as 2, a scalar and 0 crashed later (not iterable, modulo by zero)
        for name, kind in (("ffn_fractions", "fractions in (0, 1], e.g. [0.75, 0.5]"),
                           ("kv_heads", "whole KV-head counts >= 1, e.g. [2, 1]")):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise PuzzleError(f"space.{name} must be a list of {kind}; got {value!r}")
        if any(isinstance(f, bool) or not isinstance(f, numbers.Real) for f in self.ffn_fractions):
            raise PuzzleError(f"space.ffn_fractions must be a list of fractions in (0, 1]; got "
                              f"{list(self.ffn_fractions)}")
        object.__setattr__(self, "ffn_fractions", tuple(float(f) for f in self.ffn_fractions))
        whole = lambda k: isinstance(k, numbers.Integral) and not isinstance(k, bool)  # noqa: E731
        if any(not whole(k) or k < 1 for k in self.kv_heads):
            raise PuzzleError(f"space.kv_heads must be a list of whole KV-head counts >= 1; got {list(self.kv_heads)}")
        object.__setattr__(self, "kv_heads", tuple(int(k) for k in self.kv_heads))
        bad = [f for f in self.ffn_fractions if not 0.0 < f <= 1.0]
        if bad:
            raise PuzzleError(f"space.ffn_fractions must lie in (0, 1]; got {bad}")
        if not whole(self.ffn_multiple) or self.ffn_multiple < 1:
            raise PuzzleError(f"space.ffn_multiple must be a whole number of channels >= 1; got {self.ffn_multiple!r}")


def attention_variants(parent: ModelConfig, space: SpaceConfig) -> list[AttentionConfig]:
    """Attention variants for every layer, the parent's first.

    Raises:
        PuzzleError: a requested KV-head count does not divide the parent's KV heads or is not below it.
    """
    g = parent.num_key_value_heads
    counts = space.kv_heads or tuple(k for k in range(g - 1, 0, -1) if g % k == 0)
    for k in counts:
        if k >= g or g % k:
            raise PuzzleError(
                f"space.kv_heads={k} is not a divisor of the parent's {g} KV heads below {g}; "
                f"choose from {[d for d in range(1, g) if g % d == 0]}")
    out = [AttentionConfig("gqa", g)] + [AttentionConfig("gqa", k) for k in sorted(set(counts), reverse=True)]
    if space.linear:
        out.append(AttentionConfig("linear"))
    if space.no_op:
        out.append(AttentionConfig("no_op"))
    return out


def ffn_widths(intermediate_size: int, fractions, multiple: int) -> list[int]:
    """Narrower widths (descending, unique, excluding the parent's) from fractions of the parent's width."""
    widths = set()
    for f in fractions:
        w = max(multiple, math.floor(f * intermediate_size / multiple + 0.5) * multiple)  # round half up
        if w < intermediate_size:
            widths.add(w)
    return sorted(widths, reverse=True)


def ffn_variants(parent: ModelConfig, space: SpaceConfig) -> list[FFNConfig]:
    """FFN variants for every layer, the parent's first.

    Raises:
        PuzzleError: fractions below 1 ask for narrower FFNs, but `ffn_multiple` leaves none below the parent's width.
    """
    out = [FFNConfig("swiglu", parent.intermediate_size)]
    widths = ffn_widths(parent.intermediate_size, space.ffn_fractions, space.ffn_multiple)
    if not widths and any(f < 1 for f in space.ffn_fractions):  # reviewer: the space lost them without a word
        lower = max(1, parent.intermediate_size // 8)
        raise PuzzleError(f"space.ffn_fractions {list(space.ffn_fractions)} ask for FFNs narrower than the parent's "
                          f"{parent.intermediate_size} channels, but widths are multiples of space.ffn_multiple="
                          f"{space.ffn_multiple}, which leaves none; lower ffn_multiple (e.g. {lower}: "
                          f"`ffn_multiple = {lower}` under `[space]` in a copy of the run's preset file, given as "
                          f"--preset FILE.toml; `puzzle presets` says where they are)")
    out += [FFNConfig("swiglu", w) for w in widths]
    if space.linear:
        out.append(FFNConfig("linear"))
    if space.no_op:
        out.append(FFNConfig("no_op"))
    return out


def trainable(variant) -> bool:
    """Whether a non-parent variant has weights that BLD trains (no_op has none)."""
    return variant.kind != "no_op"


@dataclass(frozen=True)
class LayerSpace:
    """The variants of one layer (the parent's variant first in each list)."""

    layer: int
    attention: tuple[AttentionConfig, ...]
    ffn: tuple[FFNConfig, ...] = field(default=())


def build_space(parent: ModelConfig, space: SpaceConfig) -> list[LayerSpace]:
    """One LayerSpace per parent layer (the same variants everywhere for a homogeneous parent).

    A heterogeneous parent (a child searched again) offers, per layer, its own block as the
    "parent" variant plus the variants that are cheaper than it.
    """
    attn_all, ffn_all = attention_variants(parent, space), ffn_variants(parent, space)
    layers = []
    for i, block in enumerate(parent.blocks):
        attn = [block.attention] + [a for a in attn_all if a != block.attention and _cheaper_attention(a, block.attention)]
        ffn = [block.ffn] + [f for f in ffn_all if f != block.ffn and _cheaper_ffn(f, block.ffn)]
        layers.append(LayerSpace(i, tuple(attn), tuple(ffn)))
    return layers


def _cheaper_attention(a: AttentionConfig, ref: AttentionConfig) -> bool:
    rank = {"gqa": 2, "linear": 1, "no_op": 0}
    if a.kind == ref.kind == "gqa":
        return a.num_kv_heads < ref.num_kv_heads and ref.num_kv_heads % a.num_kv_heads == 0
    return rank[a.kind] < rank[ref.kind]


def _cheaper_ffn(f: FFNConfig, ref: FFNConfig) -> bool:
    rank = {"swiglu": 2, "linear": 1, "no_op": 0}
    if f.kind == ref.kind == "swiglu":
        return f.intermediate_size < ref.intermediate_size
    return rank[f.kind] < rank[ref.kind]
