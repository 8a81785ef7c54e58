"""Initialising a child subblock from its parent block (DESIGN.md, "Initialising a child subblock").

A subblock is held as a `DecoderBlock` with the other subblock set to no_op, so its parameter
names are exactly the layer's (`input_layernorm.weight`, `self_attn.k_proj.weight`, ...,
`post_attention_layernorm.weight`, `mlp.down_proj.weight`, ...). The parent's RMSNorm weight is
copied into every variant.

- FFN narrowing keeps the channels with the largest contribution
  C_i = mean_tokens |x_i| * ||W_down[:, i]||_2, x = the input of down_proj (Puzzle, Bercovich et
  al. 2024, Sec. 3.1; `ffn_channel_scores`). The iterative variant is left to the block-library work.
- Fewer KV heads mean-pool the K and V projections of the parent heads merged into one group;
  query heads are kept and regrouped (GQA uptraining, Ainslie et al. 2023).
- Linear attention: W = W_o . W_v with V heads repeated to the query heads (attention restricted
  to the current token: softmax over one key is 1, so the head outputs its own value).
  Linear FFN: W = W_down . W_up (the gate is dropped). Biases are dropped.
- `linear_init="lstsq"` fits the (C, C) map by ridge least squares on calibration activations
  instead: W = argmin ||X W^T - Y||^2 + lambda ||W||^2, a stronger start.
"""

from __future__ import annotations

import torch

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from .modeling import DecoderBlock

NO_ATTN, NO_FFN = AttentionConfig("no_op"), FFNConfig("no_op")


def attention_subblock(config: ModelConfig, variant: AttentionConfig, layer_idx: int) -> DecoderBlock:
    """An attention-only DecoderBlock (its FFN is no_op)."""
    return DecoderBlock(config, BlockConfig(variant, NO_FFN), layer_idx)


def ffn_subblock(config: ModelConfig, variant: FFNConfig, layer_idx: int) -> DecoderBlock:
    """An FFN-only DecoderBlock (its attention is no_op)."""
    return DecoderBlock(config, BlockConfig(NO_ATTN, variant), layer_idx)


@torch.no_grad()
def ffn_with_activation_stats(parent_layer: DecoderBlock, h_mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The parent's FFN output and the summed |activation| of each SwiGLU channel.

    Args:
        h_mid: (n, T, C) FFN subblock input (residual stream after attention).

    Returns:
        ffn output (n, T, C) and (F,) fp32 sums of |silu(gate(x)) * up(x)| over the n*T tokens.
    """
    mlp = parent_layer.mlp
    x = parent_layer.post_attention_layernorm(h_mid)
    act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (n, T, F)
    return mlp.down_proj(act), act.abs().float().sum(dim=(0, 1))


def channel_scores_from_sums(parent_layer: DecoderBlock, abs_sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """C_i = mean |x_i| * ||W_down[:, i]||_2 from summed |activations| over `tokens` tokens: (F,) fp32."""
    return abs_sums / max(tokens, 1) * parent_layer.mlp.down_proj.weight.float().norm(dim=0)


@torch.no_grad()
def ffn_channel_scores(parent_layer: DecoderBlock, h_mid: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Channel contribution of the parent's SwiGLU channels on calibration activations.

    Args:
        parent_layer: the parent's block; its FFN must be SwiGLU.
        h_mid: (N, T, C) residual stream after the parent's attention (the FFN subblock's input).

    Returns:
        (F,) fp32 scores C_i = mean |x_i| * ||W_down[:, i]||_2.
    """
    total = sum(ffn_with_activation_stats(parent_layer, h_mid[s:s + chunk])[1] for s in range(0, h_mid.shape[0], chunk))
    return channel_scores_from_sums(parent_layer, total, h_mid.shape[0] * h_mid.shape[1])


@torch.no_grad()
def init_ffn(config: ModelConfig, parent_layer: DecoderBlock, variant: FFNConfig, layer_idx: int,
             channel_scores: torch.Tensor | None = None, lstsq_data=None) -> DecoderBlock:
    """A new FFN subblock initialised from the parent's.

    Args:
        channel_scores: (F_parent,) from `ffn_channel_scores`; needed for narrower SwiGLU widths.
        lstsq_data: (X, Y) with X (n, C) normed inputs and Y (n, C) parent FFN outputs, for a
            least-squares linear init; None uses W_down . W_up.

    Raises:
        ValueError: a narrower width without channel scores, or a width above the parent's.
    """
    sub = ffn_subblock(config, variant, layer_idx)
    if variant.kind == "no_op":
        return sub
    sub.post_attention_layernorm.weight.copy_(parent_layer.post_attention_layernorm.weight)
    pm = parent_layer.mlp
    if variant.kind == "linear":
        if lstsq_data is not None:
            sub.mlp.linear_mlp.weight.copy_(ridge_lstsq(*lstsq_data))
        else:
            sub.mlp.linear_mlp.weight.copy_(pm.down_proj.weight @ pm.up_proj.weight)  # (C, F) @ (F, C)
        return sub
    width = variant.intermediate_size
    if width > pm.down_proj.in_features:
        raise ValueError(f"cannot widen an FFN from {pm.down_proj.in_features} to {width}")
    if width == pm.down_proj.in_features:
        keep = torch.arange(width)
    else:
        if channel_scores is None:
            raise ValueError("narrowing an FFN needs channel_scores from ffn_channel_scores")
        keep = torch.topk(channel_scores, width).indices.sort().values
    m = sub.mlp
    m.gate_proj.weight.copy_(pm.gate_proj.weight[keep])
    m.up_proj.weight.copy_(pm.up_proj.weight[keep])
    m.down_proj.weight.copy_(pm.down_proj.weight[:, keep])
    if pm.gate_proj.bias is not None:
        m.gate_proj.bias.copy_(pm.gate_proj.bias[keep])
        m.up_proj.bias.copy_(pm.up_proj.bias[keep])
        m.down_proj.bias.copy_(pm.down_proj.bias)
    return sub


@torch.no_grad()
def init_attention(config: ModelConfig, parent_layer: DecoderBlock, variant: AttentionConfig, layer_idx: int,
                   lstsq_data=None) -> DecoderBlock:
    """A new attention subblock initialised from the parent's (mean-pooled KV heads or linear).

    Raises:
        ValueError: the new KV-head count does not divide the parent layer's.
    """
    sub = attention_subblock(config, variant, layer_idx)
    if variant.kind == "no_op":
        return sub
    sub.input_layernorm.weight.copy_(parent_layer.input_layernorm.weight)
    pa = parent_layer.self_attn
    H, D = config.num_attention_heads, config.head_dim
    G = pa.num_kv_heads
    if variant.kind == "linear":
        if lstsq_data is not None:
            sub.self_attn.linear_attn.weight.copy_(ridge_lstsq(*lstsq_data))
        else:
            w_v = pa.v_proj.weight.view(G, D, -1).repeat_interleave(H // G, dim=0).reshape(H * D, -1)  # (H*D, C)
            sub.self_attn.linear_attn.weight.copy_(pa.o_proj.weight @ w_v)  # (C, H*D) @ (H*D, C)
        return sub
    g = variant.num_kv_heads
    if G % g:
        raise ValueError(f"{g} KV heads cannot be mean-pooled from {G}: the count must divide it")
    a = sub.self_attn
    a.q_proj.load_state_dict(pa.q_proj.state_dict())
    a.o_proj.load_state_dict(pa.o_proj.state_dict())
    for name in ("k_proj", "v_proj"):
        src, dst = getattr(pa, name), getattr(a, name)
        dst.weight.copy_(src.weight.view(g, G // g, D, -1).mean(dim=1).reshape(g * D, -1))  # (g*D, C)
        if src.bias is not None:
            dst.bias.copy_(src.bias.view(g, G // g, D).mean(dim=1).reshape(g * D))
    return sub


def ridge_lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """W (C_out, C_in) minimising ||x W^T - y||^2 + ridge * tr(x^T x)/C_in * ||W||^2; x (n, C_in), y (n, C_out)."""
    # Gram matrices in fp32 (the n-long reductions are the expensive part), the solve in fp64
    xtx, xty = (x.float().T @ x.float()).double(), (x.float().T @ y.float()).double()  # (C_in, C_in), (C_in, C_out)
    lam = ridge * xtx.diagonal().mean()
    w_t = torch.linalg.solve(xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty)  # (C_in, C_out)
    return w_t.T.float()
