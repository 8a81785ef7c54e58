"""The per-layer search space."""

import re

import pytest

from puzzle.architecture import ArchitectureError, AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import PuzzleError
from puzzle.space import SpaceConfig, attention_variants, build_space, ffn_variants, ffn_widths
from puzzle.tiny import tiny_parent


def test_smollm2_shaped_space():
    from puzzle.architecture import ModelConfig

    block = BlockConfig(AttentionConfig("gqa", 3), FFNConfig("swiglu", 1536))
    cfg = ModelConfig(vocab_size=10, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      intermediate_size=1536, blocks=[block] * 2)
    space = SpaceConfig(ffn_fractions=(2 / 3, 0.5, 1 / 3), ffn_multiple=256)
    assert [a.id for a in attention_variants(cfg, space)] == ["attn-kv3", "attn-kv1", "attn-linear", "attn-noop"]
    assert [f.id for f in ffn_variants(cfg, space)] == ["ffn-1536", "ffn-1024", "ffn-768", "ffn-512", "ffn-linear", "ffn-noop"]


def test_kv_heads_must_divide_the_parents():
    cfg = tiny_parent().config  # 4 heads, 2 KV heads
    assert [a.id for a in attention_variants(cfg, SpaceConfig())][:2] == ["attn-kv2", "attn-kv1"]
    with pytest.raises(PuzzleError, match="divisor"):
        attention_variants(cfg, SpaceConfig(kv_heads=(3,)))


@pytest.mark.parametrize("bad, words", [
    ({"kv_heads": (0,)}, "whole KV-head counts >= 1"), ({"kv_heads": "12"}, "must be a list"),
    ({"kv_heads": (2.7,)}, "whole KV-head counts"), ({"kv_heads": 2}, "must be a list"),
    ({"ffn_fractions": 0.5}, "must be a list"), ({"ffn_fractions": ("x",)}, "fractions in (0, 1]"),
    ({"ffn_multiple": 2.5}, "whole number of channels"), ({"ffn_multiple": True}, "whole number of channels")])
def test_space_settings_of_the_wrong_kind_are_refused_by_name(bad, words):
    """Reviewer: kv_heads "12" read as (1, 2), 2.7 as 2; 0 and scalars crashed later with raw errors."""
    with pytest.raises(PuzzleError, match=re.escape(words)):
        SpaceConfig(**bad)


def test_a_multiple_that_leaves_no_narrower_ffn_is_refused():
    """Reviewer: ffn_multiple at or above the parent's width offered no narrower FFN without a word."""
    cfg = tiny_parent().config
    with pytest.raises(PuzzleError, match="leaves none; lower ffn_multiple"):
        ffn_variants(cfg, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=cfg.intermediate_size))
    assert [f.kind for f in ffn_variants(cfg, SpaceConfig(ffn_fractions=(1.0,), ffn_multiple=cfg.intermediate_size))] \
        == ["swiglu", "linear", "no_op"]  # none was asked for


def test_widths_round_and_never_reach_zero_or_the_parent():
    assert ffn_widths(1536, (0.75, 0.5, 0.01, 0.99), 256) == [1280, 768, 256]
    with pytest.raises(PuzzleError):
        SpaceConfig(ffn_fractions=(1.5,))


def test_a_child_searched_again_offers_only_cheaper_variants():
    parent = tiny_parent().config
    child = parent.with_blocks([BlockConfig(AttentionConfig("linear"), FFNConfig("swiglu", 64))] + list(parent.blocks[1:]))
    layer0 = build_space(child, SpaceConfig(ffn_fractions=(0.5, 0.25), ffn_multiple=16))[0]
    assert [a.id for a in layer0.attention] == ["attn-linear", "attn-noop"]
    assert [f.id for f in layer0.ffn] == ["ffn-64", "ffn-32", "ffn-linear", "ffn-noop"]


@pytest.mark.parametrize("bad, fix", [("attn-kv01", "attn-kv1"), ("ffn-0128", "ffn-128")])
def test_a_variant_id_with_leading_zeros_is_refused_with_its_spelling(bad, fix):
    # breaker: 'attn-kv01' beside 'attn-kv1' passed a table's duplicate check, then broke the search's own check
    with pytest.raises(ArchitectureError, match=re.escape(f"write {fix!r}")):
        BlockConfig.from_id(bad + "+ffn-noop" if bad.startswith("attn") else "attn-noop+" + bad)


@pytest.mark.parametrize("odd", ["attn-kv²", "ffn-٣٢", "ffn- 32", "attn-kv"])
def test_a_variant_id_with_no_ascii_number_is_unknown(odd):
    from puzzle.architecture import is_variant_id

    assert not is_variant_id(odd)
    assert AttentionConfig.from_id("attn-kv3").id == "attn-kv3" and FFNConfig.from_id("ffn-768").id == "ffn-768"
