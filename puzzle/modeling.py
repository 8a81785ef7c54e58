"""A heterogeneous Llama-family decoder: every layer builds its block from its own BlockConfig.

Torch only: this file (with `architecture.py`) is copied verbatim into exported checkpoints.
Parameter names follow HF Llama / DeciLM, so a state dict loads in either:

    model.embed_tokens.weight                      (V, C)
    model.layers.{i}.input_layernorm.weight        (C,)        absent when attention is no_op
    model.layers.{i}.self_attn.{q,k,v,o}_proj.*    gqa         q: (H*D, C)  k, v: (G_i*D, C)  o: (C, H*D)
    model.layers.{i}.self_attn.linear_attn.weight  linear      (C, C)
    model.layers.{i}.post_attention_layernorm.weight (C,)      absent when ffn is no_op
    model.layers.{i}.mlp.{gate,up,down}_proj.*     swiglu      gate, up: (F_i, C)  down: (C, F_i)
    model.layers.{i}.mlp.linear_mlp.weight         linear      (C, C)
    model.norm.weight                              (C,)
    lm_head.weight                                 (V, C)      tied to embed_tokens when configured

Notation:
    B  batch                 T  new tokens in this call       S  cached + new positions
    C  hidden size           H  query heads                   G  KV heads of this layer
    D  head dim              F  FFN width of this layer       V  vocab size
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (Zhang & Sennrich 2019; as in HF Llama)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (D/2,) fp32 for the configured rope type (default, linear, llama3).

    llama3 follows Meta's Llama 3.1 reference scaling (low/high frequency factors around the
    original context length); linear divides every frequency by `factor`.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (Su et al. 2021), HF's half-split layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves and casts (`model.to(...)`) keep the table in fp32, rebuilt from the config: a cast to bf16 and
        back left it rounded (reviewer: relative error 3e-3, logits off by 1e-2)."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, D)
        if self.inv_freq.dtype != torch.float32:  # a table assigned from outside: rebuild it in fp32
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D), cos/sin (B, T, D) -> (B, heads, T, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class KVCache:
    """Preallocated key/value cache; each attention layer gets its own KV-head count.

    Layers whose attention is linear or no_op hold nothing. `update` follows the protocol of HF's
    `Cache.update(key_states, value_states, layer_idx)`, so the attention code also runs on HF caches.

    Args:
        config: the model whose layers the cache serves.
        batch_size, max_len: B and the largest S the cache will hold.
        dtype, device: storage dtype and device.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        for block in config.blocks:
            if block.attention.kind == "gqa":
                shape = (batch_size, block.attention.num_kv_heads, max_len, config.head_dim)
                self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
                self.values.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                self.keys.append(None)
                self.values.append(None)
        self.lengths = [0] * len(config.blocks)

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        """Cached positions S - T before the current call (0 when no layer has attention)."""
        if layer_idx is not None:
            return self.lengths[layer_idx]
        return max(self.lengths, default=0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Append (B, G, T, D) keys/values of `layer_idx`; returns all cached (B, G, S, D) keys and values."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this call needs {end}. Allocate a longer cache.")
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def nbytes(self) -> int:
        """Bytes held by the preallocated tensors."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S) for SDPA: causal, keys with attention_mask == 0 hidden.

    Every query keeps its own position visible so a padded row never softmaxes over nothing.
    Returns None when plain causal attention (`is_causal`) or no mask at all is enough.
    A 4-D `attention_mask` (B or 1, 1, T, S) is already the whole mask (True = attend; e.g. the
    block-diagonal causal mask of packed samples, puzzle.sft.block_causal_mask) and is used as given.
    A 2-D (B, L) mask covers the cached and the new positions: L >= S, its last S entries are used.

    Raises:
        ValueError: a 2-D mask shorter than the S = cached + new positions (it would be broadcast over them).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None and (q_len == 1 or q_len == kv_len):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] < kv_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, but the cache and the new "
                             f"tokens hold {kv_len}: give a (B, {kv_len}) mask, 1 where a token is real")
        keep = attention_mask[:, None, None, -kv_len:].bool()  # (B, 1, 1, S)
        mask = (mask & keep) | (k_pos == q_pos)[None, None]
    return mask


class GQAAttention(nn.Module):
    """Causal grouped-query attention with RoPE (Ainslie et al. 2023): H query heads share G KV heads."""

    def __init__(self, config: ModelConfig, num_kv_heads: int, layer_idx: int):
        super().__init__()
        C, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim, self.layer_idx = H, num_kv_heads, D, layer_idx
        bias = config.attention_bias
        self.q_proj = nn.Linear(C, H * D, bias=bias)
        self.k_proj = nn.Linear(C, num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(H * D, C, bias=bias)

    def forward(self, x, cos, sin, cache=None, attention_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, G, S, D)
        S = k.shape[2]
        mask = build_attention_mask(attention_mask, T, S, x.device)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and T == S)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class LinearAttention(nn.Module):
    """Attention replaced by one (C, C) matrix: each token sees only itself (Puzzle, Bercovich et al. 2024)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos=None, sin=None, cache=None, attention_mask=None):
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020) with width F."""

    def __init__(self, config: ModelConfig, intermediate_size: int):
        super().__init__()
        C, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(C, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, C, bias=bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearFFN(nn.Module):
    """FFN replaced by one (C, C) matrix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


def build_attention(config: ModelConfig, attention: AttentionConfig, layer_idx: int) -> nn.Module | None:
    if attention.kind == "gqa":
        return GQAAttention(config, attention.num_kv_heads, layer_idx)
    if attention.kind == "linear":
        return LinearAttention(config)
    return None


def build_ffn(config: ModelConfig, ffn: FFNConfig) -> nn.Module | None:
    if ffn.kind == "swiglu":
        return SwiGLU(config, ffn.intermediate_size)
    if ffn.kind == "linear":
        return LinearFFN(config)
    return None


class DecoderBlock(nn.Module):
    """h + attn(norm(h)), then + ffn(norm(.)); a no_op subblock has neither weights nor norm."""

    def __init__(self, config: ModelConfig, block: BlockConfig, layer_idx: int):
        super().__init__()
        self.block_config, self.layer_idx = block, layer_idx
        self.self_attn = build_attention(config, block.attention, layer_idx)
        if self.self_attn is not None:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_ffn(config, block.ffn)
        if self.mlp is not None:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_delta(self, h, cos, sin, cache=None, attention_mask=None) -> torch.Tensor:
        """What the attention subblock adds to the residual stream: (B, T, C) -> (B, T, C)."""
        if self.self_attn is None:
            return torch.zeros_like(h)
        return self.self_attn(self.input_layernorm(h), cos, sin, cache, attention_mask)

    def ffn_delta(self, h) -> torch.Tensor:
        """What the FFN subblock adds to the residual stream: (B, T, C) -> (B, T, C)."""
        if self.mlp is None:
            return torch.zeros_like(h)
        return self.mlp(self.post_attention_layernorm(h))

    def forward(self, h, cos, sin, cache=None, attention_mask=None):
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, attention_mask)
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class PuzzleDecoder(nn.Module):
    """Embedding, the per-layer blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, b, i) for i, b in enumerate(config.blocks))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class PuzzleForCausalLM(nn.Module):
    """Heterogeneous causal LM. `forward` returns logits; `generate` decodes greedily with a KVCache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = PuzzleDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def holding(cls, config: ModelConfig, state: dict, device) -> "PuzzleForCausalLM":
        """A model of `config` whose weights are `state`'s tensors themselves (name -> tensor, as `state_dict()`
        names them, all on `device`): nothing is allocated or initialised for weights first, and tensors shared
        with another model stay shared. The RoPE table is made on `device` in fp32; a tied LM head is tied again.
        For inference only: gradients are off (the tensors may belong to another model).

        Raises:
            RuntimeError: `state` lacks or adds a weight, or a shape differs (`load_state_dict(strict=True)`).
        """
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)  # a buffer outside the state dict
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.requires_grad_(False).eval()

    # -- pieces, used by scoring and distillation to run part of the model -------------------
    def positions(self, input_shape, past: int, device) -> torch.Tensor:
        B, T = input_shape
        return torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)  # (B, T)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (B, T) -> cos, sin (B, T, D)."""
        return self.model.rotary_emb(position_ids, dtype)

    def run_layers(self, h, cos, sin, start: int = 0, end: int | None = None, cache=None, attention_mask=None):
        """Apply layers [start, end) to hidden states h (B, T, C)."""
        for layer in self.model.layers[start:end]:
            h = layer(h, cos, sin, cache, attention_mask)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (B, T, C) -> logits (B, T, V)."""
        return self.lm_head(self.model.norm(h))

    def forward(self, input_ids, position_ids=None, cache=None, attention_mask=None, logits_to_keep: int = 0):
        """input_ids (B, T) int64 -> logits (B, T, V) (or the last `logits_to_keep` positions).

        With a cache, positions continue after the cached ones. `attention_mask` (B, S) marks
        real (1) and padding (0) tokens over cached + new positions; a (B, 1, T, S) boolean mask
        is used as given (`build_attention_mask`).
        """
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self.positions(input_ids.shape, past, input_ids.device)
        h = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope(position_ids, h.dtype)
        h = self.run_layers(h, cos, sin, cache=cache, attention_mask=attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> torch.Tensor:
        """Greedy decoding with a KV cache: (B, P) -> (B, P + n) with n <= max_new_tokens.

        Sequences that produced an EOS keep emitting it; stops early once all have.
        """
        B, P = input_ids.shape
        param = next(self.parameters())
        cache = KVCache(self.config, B, P + max_new_tokens, param.dtype, param.device)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        out, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = self.forward(input_ids, cache=cache, logits_to_keep=1)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            if eos:
                fill = next(iter(eos))
                nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
                done = done | torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
            out = torch.cat([out, nxt[:, None]], dim=1)
            if out.shape[1] - P == max_new_tokens or (eos and bool(done.all())):
                break
            logits = self.forward(nxt[:, None], cache=cache, logits_to_keep=1)
        return out

    def num_parameters(self) -> int:
        """Distinct parameters (a tied LM head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
