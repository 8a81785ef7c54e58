"""Initialising a child subblock (or block) from its parent block (DESIGN.md, "Initialising a child subblock").

A subblock is held as a `DecoderBlock` with the other subblock set to no_op, so its parameter
names are exactly the layer's (`input_layernorm.weight`, `self_attn.k_proj.weight`, ...,
`post_attention_layernorm.weight`, `mlp.down_proj.weight`, ...). The parent's RMSNorm weight is
copied into every variant. Every init is deterministic (no random numbers are drawn).

FFN narrowing (`ffn_init`):
- "channel_contribution": keep the channels with the largest contribution
  C_i = mean_tokens |x_i| * ||W_down[:, i]||_2, x = the input of down_proj (Puzzle, Bercovich et
  al. 2024, Sec. 3.1; `ffn_channel_scores`). Each channel is judged alone.
- "iterative": greedy removal that re-scores after each removal. Removing a set S of channels
  changes the FFN output by e_t(S) = sum_{k in S} x_tk W_down[:, k], so the mean squared error
  E(S) = mean_t ||e_t(S)||^2 = 1_S^T G 1_S with G = (A^T A / n) * (W_down^T W_down) (elementwise),
  A the (n, F) down_proj inputs. Greedy step: remove the channel k of least marginal error
  2 * sum_{j in S} G_jk + G_kk, then update the sums (exact re-scoring on the calibration
  activations, O(F) per removal once G is known; `greedy_channel_removal`). Channels whose
  errors cancel are kept or dropped together, which the independent score cannot see.

Fewer KV heads (`kv_init`):
- "mean_pool": mean-pool the K and V projections of the parent KV heads merged into one group;
  query heads are kept and regrouped (GQA uptraining, Ainslie et al. 2023).
- "top_groups": keep the K and V projections of the g parent KV groups with the largest o_proj
  output contribution C_j = mean_tokens ||W_o[:, heads of j] . attn_out_j||_2, and move the query
  heads of every dropped group into the kept group whose K/V weights are most similar (cosine),
  by permuting q_proj rows and o_proj columns head by head (the output is a sum over heads, so
  the permutation itself changes nothing).

Linear replacements (`linear_init`):
- "parent": attention W = W_o . W_v with V heads repeated to the query heads (attention restricted
  to the current token: softmax over one key is 1); FFN W = W_down . W_up (gate dropped). Products in
  fp32. Linear subblocks have no bias, so a parent with attention or MLP biases loses their constant
  (W_o . b_v + b_o, W_down . b_up + b_down) here and in "lstsq" alike; BLD then fits what it can.
- "lstsq": ridge least squares on calibration activations, W = argmin ||X W^T - Y||^2 + lambda ||W||^2.

Whole blocks (coupled BLD) are composed from subblock weights with `compose_block`.
"""

from __future__ import annotations

import torch

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from .modeling import DecoderBlock

NO_ATTN, NO_FFN = AttentionConfig("no_op"), FFNConfig("no_op")
FFN_INITS = ("channel_contribution", "iterative")
KV_INITS = ("mean_pool", "top_groups")
LINEAR_INITS = ("parent", "lstsq")


def attention_subblock(config: ModelConfig, variant: AttentionConfig, layer_idx: int) -> DecoderBlock:
    """An attention-only DecoderBlock (its FFN is no_op)."""
    return DecoderBlock(config, BlockConfig(variant, NO_FFN), layer_idx)


def ffn_subblock(config: ModelConfig, variant: FFNConfig, layer_idx: int) -> DecoderBlock:
    """An FFN-only DecoderBlock (its attention is no_op)."""
    return DecoderBlock(config, BlockConfig(NO_ATTN, variant), layer_idx)


def empty_block(config: ModelConfig, block: BlockConfig, layer_idx: int, device=None) -> DecoderBlock:
    """A fp32 DecoderBlock with uninitialised weights (no random init: every init below overwrites all)."""
    with torch.device("meta"):
        sub = DecoderBlock(config, block, layer_idx)
    # by hand rather than Module.to_empty, whose first call imports torch's meta kernels (seconds)
    for module in sub.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device or "cpu")))
    return sub


# ----------------------------------------------------------------------------------------------
# FFN statistics on calibration activations


@torch.no_grad()
def ffn_forward_stats(parent_layer: DecoderBlock, h_mid: torch.Tensor, gram: bool = False):
    """The parent's FFN output and per-channel statistics of the down_proj input.

    Args:
        h_mid: (n, T, C) FFN subblock input (residual stream after attention).
        gram: also return the (F, F) fp32 sum of act^T act over the n*T tokens (for "iterative").

    Returns:
        (ffn output (n, T, C), (F,) fp32 sums of |act|, (F, F) fp32 Gram or None), where
        act = silu(gate(x)) * up(x) is the (n, T, F) input of down_proj.
    """
    mlp = parent_layer.mlp
    x = parent_layer.post_attention_layernorm(h_mid)
    act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (n, T, F)
    flat = act.reshape(-1, act.shape[-1]).float()  # (n*T, F)
    return mlp.down_proj(act), flat.abs().sum(dim=0), (flat.T @ flat if gram else None)


@torch.no_grad()
def ffn_with_activation_stats(parent_layer: DecoderBlock, h_mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The parent's FFN output (n, T, C) and the (F,) fp32 summed |silu(gate(x)) * up(x)| over n*T tokens."""
    out, sums, _ = ffn_forward_stats(parent_layer, h_mid)
    return out, sums


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
def greedy_channel_removal(act_gram: torch.Tensor, w_down: torch.Tensor, width: int, tokens: int = 1,
                           chunk: int = 1) -> torch.Tensor:
    """The channels kept by greedy removal of least marginal output error (the "iterative" init).

    Args:
        act_gram: (F, F) sum over `tokens` tokens of act^T act, act the down_proj input.
        w_down: (C, F) down_proj weight.
        width: channels to keep (1 <= width <= F).
        chunk: channels removed per re-scoring (1 = exact greedy; larger is coarser and faster).

    Returns:
        (width,) int64 kept channel indices, ascending.

    Formula: E(S) = 1_S^T G 1_S, G = (act_gram / tokens) * (W^T W); removing k after S adds
    2 * sum_{j in S} G_jk + G_kk (module docstring).
    """
    F = act_gram.shape[0]
    if not 1 <= width <= F:
        raise ValueError(f"cannot keep {width} of {F} channels")
    w = w_down.double().to(act_gram.device)
    g = act_gram.double() / max(tokens, 1) * (w.T @ w)  # (F, F)
    diag, cross = g.diagonal().clone(), torch.zeros(F, dtype=torch.float64, device=g.device)
    removed = torch.zeros(F, dtype=torch.bool, device=g.device)
    left = F - width
    while left > 0:
        cost = (2 * cross + diag).masked_fill(removed, float("inf"))  # (F,) marginal error of each removal
        picks = torch.topk(cost, min(chunk, left), largest=False).indices
        removed[picks] = True
        cross += g[picks].sum(dim=0)
        left -= len(picks)
    return torch.nonzero(~removed).flatten()


@torch.no_grad()
def ffn_iterative_channels(parent_layer: DecoderBlock, h_mid: torch.Tensor, width: int, chunk: int = 1) -> torch.Tensor:
    """Kept channels of the "iterative" init computed from (N, T, C) FFN inputs; (width,) int64."""
    _, _, gram = ffn_forward_stats(parent_layer, h_mid, gram=True)
    return greedy_channel_removal(gram, parent_layer.mlp.down_proj.weight, width, h_mid.shape[0] * h_mid.shape[1], chunk)


@torch.no_grad()
def init_ffn(config: ModelConfig, parent_layer: DecoderBlock, variant: FFNConfig, layer_idx: int,
             channel_scores: torch.Tensor | None = None, lstsq_data=None, channels: torch.Tensor | None = None) -> DecoderBlock:
    """A new FFN subblock initialised from the parent's.

    Args:
        channel_scores: (F_parent,) from `ffn_channel_scores`; the top `width` are kept.
        channels: (width,) explicit kept channels (e.g. `greedy_channel_removal`); wins over scores.
        lstsq_data: (X, Y) with X (n, C) normed inputs and Y (n, C) parent FFN outputs, for a
            least-squares linear init; None uses W_down . W_up (biases dropped: a linear subblock has none, as
            the nemotron-nas format's linear_mlp).

    Raises:
        ValueError: a narrower width without channel scores or channels, or a width above the parent's.
    """
    if variant.kind == "no_op":
        return ffn_subblock(config, variant, layer_idx)
    sub = empty_block(config, BlockConfig(NO_ATTN, variant), layer_idx)
    sub.post_attention_layernorm.weight.copy_(parent_layer.post_attention_layernorm.weight)
    pm = parent_layer.mlp
    if variant.kind == "linear":
        if lstsq_data is not None:
            sub.mlp.linear_mlp.weight.copy_(ridge_lstsq(*lstsq_data))
        else:
            # in fp32 whatever the parent's dtype (reviewer: bf16 products were off by 2.6e-3); biases are dropped
            sub.mlp.linear_mlp.weight.copy_(pm.down_proj.weight.float() @ pm.up_proj.weight.float())  # (C, F) @ (F, C)
        return sub
    width = variant.intermediate_size
    if width > pm.down_proj.in_features:
        raise ValueError(f"cannot widen an FFN from {pm.down_proj.in_features} to {width}")
    if width == pm.down_proj.in_features:
        keep = torch.arange(width)
    elif channels is not None:
        keep = torch.as_tensor(channels).sort().values
        F_in = pm.down_proj.in_features
        if keep.is_floating_point() or len(keep) != width or len(keep.unique()) != width or keep[0] < 0 \
                or keep[-1] >= F_in:  # width >= 1 here, so keep[0] exists once the length matches
            raise ValueError(f"channels must be {width} distinct whole indices in [0, {F_in}), got {len(keep)} "
                             f"({len(keep.unique())} distinct, {keep.dtype})")
    else:
        if channel_scores is None:
            raise ValueError("narrowing an FFN needs channel_scores from ffn_channel_scores (or channels)")
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


# ----------------------------------------------------------------------------------------------
# Attention statistics and inits


class KVGroupStats:
    """Collects the o_proj contribution of each parent KV group while the parent's attention runs.

    Use as a context manager around `parent_layer.attention_delta(...)` calls: a forward pre-hook
    on o_proj reads its (B, T, H*D) input. `sums` is (G,) fp32: the summed per-token
    ||W_o[:, heads of group j] . out_j||_2 over `tokens` tokens.
    """

    def __init__(self, parent_layer: DecoderBlock):
        a = parent_layer.self_attn
        self.attn, self.tokens = a, 0
        self.sums = torch.zeros(a.num_kv_heads)
        self.enabled = True
        self._handle = None

    def _hook(self, module, args):
        if not self.enabled:
            return
        a = self.attn
        x = args[0]  # (B, T, H*D)
        G, C = a.num_kv_heads, module.weight.shape[0]
        per_group = x.reshape(*x.shape[:-1], G, -1).float()  # (B, T, G, H/G*D)
        w = module.weight.float().view(C, G, -1)  # (C, G, H/G*D)
        out = torch.einsum("btgk,cgk->btgc", per_group, w)  # (B, T, G, C)
        self.sums += out.norm(dim=-1).sum(dim=(0, 1)).cpu()
        self.tokens += x.shape[0] * x.shape[1]

    def __enter__(self):
        self._handle = self.attn.o_proj.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def scores(self) -> torch.Tensor:
        """(G,) mean o_proj contribution per parent KV group."""
        return self.sums / max(self.tokens, 1)


@torch.no_grad()
def kv_group_scores(parent_layer: DecoderBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(G,) mean o_proj output contribution of each parent KV group on (N, T, C) attention inputs."""
    with KVGroupStats(parent_layer) as stats:
        parent_layer.attention_delta(h, cos, sin)
    return stats.scores()


def top_group_permutation(group_scores: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor, num_heads: int,
                          new_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which parent KV groups to keep and the query-head order that regroups the others into them.

    Args:
        group_scores: (G,) contribution per parent KV group.
        k_weight, v_weight: (G*D, C) parent K and V projections (for the similarity of groups).
        num_heads: H query heads; new_groups: g (must divide G).

    Returns:
        kept (g,) parent KV groups, in the order of the new groups; head_order (H,): new query head
        h is parent query head head_order[h]. New group i holds the kept group's own query heads,
        then those of the dropped groups most similar to it (cosine of the concatenated K and V
        weights; each kept group takes G/g - 1 dropped groups, assigned greedily by similarity).
    """
    G = group_scores.shape[0]
    r, hq = G // new_groups, num_heads // G
    kept = torch.topk(group_scores.double(), new_groups).indices.sort().values
    dropped = [j for j in range(G) if j not in set(kept.tolist())]
    feats = torch.cat([k_weight.reshape(G, -1), v_weight.reshape(G, -1)], dim=1).double()  # (G, 2*D*C)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = feats @ feats.T  # (G, G)
    members = {int(k): [] for k in kept}
    pairs = sorted(((float(sim[d, k]), d, int(k)) for d in dropped for k in kept), key=lambda p: (-p[0], p[1], p[2]))
    placed = set()
    for _, d, k in pairs:
        if d not in placed and len(members[k]) < r - 1:
            members[k].append(d)
            placed.add(d)
    order = []
    for k in kept.tolist():
        for grp in [k] + sorted(members[k]):
            order += range(grp * hq, (grp + 1) * hq)
    return kept, torch.tensor(order)


@torch.no_grad()
def init_attention(config: ModelConfig, parent_layer: DecoderBlock, variant: AttentionConfig, layer_idx: int,
                   lstsq_data=None, kv_init: str = "mean_pool", group_scores: torch.Tensor | None = None) -> DecoderBlock:
    """A new attention subblock initialised from the parent's (fewer KV heads or linear).

    Args:
        lstsq_data: (X, Y), X (n, C) normed inputs and Y (n, C) parent attention outputs, for a
            least-squares linear init; None uses W_o . W_v. A linear subblock has no bias (the nemotron-nas
            format's linear_attn has none), so a parent's attention biases leave W_o . b_v + b_o out of it.
        kv_init: "mean_pool" or "top_groups" (module docstring).
        group_scores: (G,) from `kv_group_scores` / `KVGroupStats`, needed by "top_groups".

    Raises:
        ValueError: the new KV-head count does not divide the parent layer's; "top_groups" without scores.
    """
    if variant.kind == "no_op":
        return attention_subblock(config, variant, layer_idx)
    sub = empty_block(config, BlockConfig(variant, NO_FFN), layer_idx)
    sub.input_layernorm.weight.copy_(parent_layer.input_layernorm.weight)
    pa = parent_layer.self_attn
    H, D = config.num_attention_heads, config.head_dim
    G = pa.num_kv_heads
    if variant.kind == "linear":
        if lstsq_data is not None:
            sub.self_attn.linear_attn.weight.copy_(ridge_lstsq(*lstsq_data))
        else:
            w_v = pa.v_proj.weight.float().view(G, D, -1).repeat_interleave(H // G, dim=0).reshape(H * D, -1)  # (H*D, C)
            sub.self_attn.linear_attn.weight.copy_(pa.o_proj.weight.float() @ w_v)  # (C, H*D) @ (H*D, C), in fp32
        return sub
    g = variant.num_kv_heads
    if G % g:
        raise ValueError(f"{g} KV heads cannot be formed from {G} parent KV heads: the count must divide it")
    a = sub.self_attn
    if kv_init == "top_groups" and g < G:
        if group_scores is None:
            raise ValueError("kv_init='top_groups' needs group_scores from kv_group_scores")
        kept, order = top_group_permutation(group_scores, pa.k_proj.weight, pa.v_proj.weight, H, g)
        a.q_proj.weight.copy_(pa.q_proj.weight.view(H, D, -1)[order].reshape(H * D, -1))  # rows by head
        a.o_proj.weight.copy_(pa.o_proj.weight.view(-1, H, D)[:, order].reshape(-1, H * D))  # columns by head
        if pa.q_proj.bias is not None:
            a.q_proj.bias.copy_(pa.q_proj.bias.view(H, D)[order].reshape(H * D))
        if pa.o_proj.bias is not None:
            a.o_proj.bias.copy_(pa.o_proj.bias)
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(pa, name), getattr(a, name)
            dst.weight.copy_(src.weight.view(G, D, -1)[kept].reshape(g * D, -1))  # (g*D, C)
            if src.bias is not None:
                dst.bias.copy_(src.bias.view(G, D)[kept].reshape(g * D))
        return sub
    if kv_init not in KV_INITS:
        raise ValueError(f"kv_init must be one of {KV_INITS}, got {kv_init!r}")
    a.q_proj.load_state_dict(pa.q_proj.state_dict())
    a.o_proj.load_state_dict(pa.o_proj.state_dict())
    for name in ("k_proj", "v_proj"):
        src, dst = getattr(pa, name), getattr(a, name)
        dst.weight.copy_(src.weight.float().view(g, G // g, D, -1).mean(dim=1).reshape(g * D, -1))  # (g*D, C), fp32 mean
        if src.bias is not None:
            dst.bias.copy_(src.bias.float().view(g, G // g, D).mean(dim=1).reshape(g * D))
    return sub


def ridge_lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """W (C_out, C_in) minimising ||x W^T - y||^2 + ridge * tr(x^T x)/C_in * ||W||^2; x (n, C_in), y (n, C_out)."""
    # Gram matrices in fp32 (the n-long reductions are the expensive part), the solve in fp64
    xtx, xty = (x.float().T @ x.float()).double(), (x.float().T @ y.float()).double()  # (C_in, C_in), (C_in, C_out)
    return ridge_solve(xtx, xty, ridge)


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """W (C_out, C_in) from accumulated Gram matrices x^T x (C_in, C_in) and x^T y (C_in, C_out) (see ridge_lstsq)."""
    xtx, xty = xtx.double(), xty.double()
    # relative to the inputs' scale; an absolute floor keeps all-zero inputs (reviewer: a raw Cholesky error) solvable
    lam = ridge * xtx.diagonal().mean() + torch.finfo(torch.float64).tiny
    a = xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)  # symmetric positive definite
    w_t = torch.cholesky_solve(xty, torch.linalg.cholesky(a))  # (C_in, C_out)
    return w_t.T.float()


# ----------------------------------------------------------------------------------------------
# Whole blocks (coupled BLD)


ATTN_PREFIXES = ("input_layernorm.", "self_attn.")
FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


@torch.no_grad()
def compose_block(config: ModelConfig, block: BlockConfig, layer_idx: int, attention_state: dict | None,
                  ffn_state: dict | None) -> DecoderBlock:
    """A whole DecoderBlock whose subblocks take the given weights (layer-relative names).

    Args:
        attention_state / ffn_state: state dicts of the attention and FFN parts (e.g. a decoupled
            library entry or the parent layer's state); keys outside the part are ignored; None
            for a no_op part.

    Raises:
        RuntimeError: a state that does not fit the block's variant (missing or misshapen tensors).
    """
    sub = empty_block(config, block, layer_idx)
    state = {}
    for part, prefixes in ((attention_state, ATTN_PREFIXES), (ffn_state, FFN_PREFIXES)):
        if part is not None:
            state.update({k: v for k, v in part.items() if k.startswith(prefixes)})
    sub.load_state_dict(state, strict=True)
    return sub
