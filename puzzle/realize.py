"""Assemble a child from the parent, the block library and a per-layer architecture.

A subblock equal to the parent layer's keeps the parent's weights; a no_op subblock has none; any
other variant loads its library entry ("bld": trained; "init": initialised only). A layer the caller
names as coupled takes its whole block's coupled entry instead (`coupled.stage_coupled`: the block
trained as one unit, scored as the score table's block row that the search chose in place of its two
subblocks' rows). The embedding, final norm and LM head are the parent's. The result is our own
`PuzzleForCausalLM`, built from the block configs (no patched HF class).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .architecture import BlockConfig
from .errors import PuzzleError
from .library import Library
from .modeling import PuzzleForCausalLM

ATTN_PREFIXES = ("input_layernorm.", "self_attn.")
FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


def _subset(state: dict, prefixes) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def _coupled_entry(library: Library, layer: int, block: BlockConfig, stage: str) -> dict:
    """The coupled entry's weights (the whole layer's state dict).

    Raises:
        PuzzleError: the entry's weights are missing or do not match its checksum."""
    try:
        return library.load(layer, block.id, stage)
    except PuzzleError:
        raise PuzzleError(f"the coupled library entry of layer {layer} {block.id} ({stage}) is missing or corrupt: "
                          f"run `puzzle run` (bld.coupled_top_k > 0) or `puzzle.coupled.stage_coupled(run)` again, "
                          f"which trains it again; or set bld.coupled_top_k to 0 and run `puzzle score` and `puzzle "
                          f"search` again, which build the children from subblocks") from None


@torch.no_grad()
def realize_child(parent: PuzzleForCausalLM, library: Library | None, blocks: Sequence[BlockConfig],
                  stage: str = "bld", *, share: bool = False, entries: dict | None = None,
                  coupled: Collection[tuple[int, str]] = ()) -> PuzzleForCausalLM:
    """Build the child with `blocks[i]` at layer i.

    Args:
        parent: the parent model (its config's blocks define the "parent" variant per layer).
        library: where non-parent variants come from (may be None when every block is the
            parent's or no_op).
        stage: "bld" or "init" entries.
        share: hold the parent's own tensors where the child keeps the parent's subblocks (and its embedding,
            final norm and LM head) instead of copies, and library entries cast to the parent's device and dtype;
            for many children timed at once (`one_session`). Such a child must not be trained or edited: its
            parameters are the parent's. False (the default): every weight is the child's own copy.
        entries: with `share`, a dict the caller keeps across calls: (layer, variant id, stage) -> that entry's
            tensors as loaded, so children that use the same library entry hold it once.
        coupled: (layer, block id) pairs whose layer takes the block's coupled entry (`coupled.stage_coupled`)
            instead of its two subblocks' entries: the block rows a search chose (`pipeline.coupled_blocks`). Empty
            (the default): every layer is built from its subblocks.

    Returns:
        A new PuzzleForCausalLM in eval mode, same dtype as the parent (with `share`, on its device too, and
        without gradients).

    Raises:
        PuzzleError: a needed library entry is missing or corrupt (a coupled one too).
        ValueError: a non-parent, non-no_op variant and no library.
    """
    config = parent.config.with_blocks(blocks)
    like = next(parent.parameters())
    entries = {} if entries is None else entries
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith("model.layers.")}
    for i, (block, parent_block) in enumerate(zip(config.blocks, parent.config.blocks)):
        if (i, block.id) in coupled:
            # breaker: `puzzle realize` built the decoupled pair where the search had chosen the coupled block row
            if library is None:
                raise ValueError(f"layer {i} needs the coupled library entry {block.id} but no library was given")
            key = (i, block.id, stage)
            sub = entries.get(key) if share else None
            if sub is None:
                sub = _coupled_entry(library, i, block, stage)
                if share:
                    entries[key] = sub = {k: v.to(device=like.device, dtype=like.dtype) for k, v in sub.items()}
            state.update({f"model.layers.{i}.{k}": v for k, v in sub.items()})
            continue
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
                key = (i, variant.id, stage)
                if not share or key not in entries:
                    sub = _subset(library.load(i, variant.id, stage), prefixes)
                    if share:
                        entries[key] = sub = {k: v.to(device=like.device, dtype=like.dtype) for k, v in sub.items()}
                else:
                    sub = entries[key]
            state.update({f"model.layers.{i}.{k}": v for k, v in sub.items()})
    if share:  # no weights of its own
        return PuzzleForCausalLM.holding(config, state, like.device)
    child = PuzzleForCausalLM(config).to(like.dtype)
    child.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    return child.eval()
