"""Assemble a child from the parent, the block library and a per-layer architecture.

A subblock equal to the parent layer's keeps the parent's weights; a no_op subblock has none; any
other variant loads its library entry ("bld": trained; "init": initialised only). The embedding,
final norm and LM head are the parent's. The result is our own `PuzzleForCausalLM`, built from the
block configs (no patched HF class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .architecture import BlockConfig
from .library import Library
from .modeling import PuzzleForCausalLM

ATTN_PREFIXES = ("input_layernorm.", "self_attn.")
FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


def _subset(state: dict, prefixes) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


@torch.no_grad()
def realize_child(parent: PuzzleForCausalLM, library: Library | None, blocks: Sequence[BlockConfig],
                  stage: str = "bld") -> PuzzleForCausalLM:
    """Build the child with `blocks[i]` at layer i.

    Args:
        parent: the parent model (its config's blocks define the "parent" variant per layer).
        library: where non-parent variants come from (may be None when every block is the
            parent's or no_op).
        stage: "bld" or "init" entries.

    Returns:
        A new PuzzleForCausalLM in eval mode, same dtype as the parent.

    Raises:
        PuzzleError: a needed library entry is missing or corrupt.
        ValueError: a non-parent, non-no_op variant and no library.
    """
    config = parent.config.with_blocks(blocks)
    child = PuzzleForCausalLM(config).to(next(parent.parameters()).dtype)
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith("model.layers.")}
    for i, (block, parent_block) in enumerate(zip(config.blocks, parent.config.blocks)):
        parent_layer = parent.model.layers[i].state_dict()
        parts = [(block.attention, parent_block.attention, ATTN_PREFIXES),
                 (block.ffn, parent_block.ffn, FFN_PREFIXES)]
        for variant, parent_variant, prefixes in parts:
            if variant.kind == "no_op":
                continue
            if variant == parent_variant:
                sub = _subset(parent_layer, prefixes)
            else:
                if library is None:
                    raise ValueError(f"layer {i} needs library entry {variant.id} but no library was given")
                sub = _subset(library.load(i, variant.id, stage), prefixes)
            state.update({f"model.layers.{i}.{k}": v for k, v in sub.items()})
    child.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    return child.eval()
