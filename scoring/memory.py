"""Memory model: parameter bytes and KV-cache bytes per subblock and per model.

Memory is computed, not measured: it is exact arithmetic on the shapes that `puzzle.modeling`
allocates, so the sum over a child's subblocks plus the non-block parameters equals the bytes of
the real model's parameters and of its preallocated `KVCache` (tests check this to the byte).

Parameters (C hidden, H query heads, G KV heads of the layer, D head dim, F FFN width, V vocab):

    attention gqa      C (input_layernorm) + C·H·D (q) + 2·C·G·D (k, v) + H·D·C (o)
                       + H·D + 2·G·D + C          with attention_bias
    attention linear   C (input_layernorm) + C·C
    ffn swiglu         C (post_attention_layernorm) + 3·C·F (gate, up, down)
                       + 2·F + C                  with mlp_bias
    ffn linear         C (post_attention_layernorm) + C·C
    no_op              0 (a removed subblock keeps neither weights nor its norm)
    non-block          V·C (embed_tokens) + C (final norm) + V·C (lm_head, 0 when tied)

KV cache of one gqa layer holding S positions for a batch of B (DESIGN.md, Scoring):

    kv_bytes = 2 · G · D · bytes(kv_dtype) · S · B        (2: keys and values)

Linear and no_op attention hold no cache. Memory of a subblock = parameter bytes (weight dtype)
+ its KV cache; memory of a model = non-block parameter bytes + the sum over its subblocks.
Activations and framework workspace are not modelled: at the batch sizes and lengths of a
decode workload they are small next to the weights and the cache.

Dtypes: "float32" (fp32, 4 bytes), "bfloat16" (bf16, 2), "float16" (fp16, 2), "float8" (fp8, 1;
e4m3 and e5m2 alike). fp8 is a storage format here (weights or KV cache quantized to one byte);
the model itself runs in the other three. fp8 weights quantize the blocks' matrices only: the
embedding, the LM head, the RMSNorms and biases stay in bf16, as an fp8 checkpoint for vLLM or
TensorRT-LLM keeps them (vLLM's fp8 quantizes its Linear layers and leaves the embedding and LM
head alone; reviewer: counting them at one byte put SmolLM2's fp8 weights 17 % low).
"""

from __future__ import annotations

import numbers
import operator

from puzzle.architecture import AttentionConfig, FFNConfig, ModelConfig
from puzzle.errors import PuzzleError

MIB = 2**20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}

_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "half": "float16",
    "fp8": "float8", "float8_e4m3fn": "float8", "float8_e4m3": "float8", "float8_e5m2": "float8",
}


def canonical_dtype(dtype) -> str:
    """The canonical name ("float32", "bfloat16", "float16", "float8") of a dtype name or torch.dtype.

    Accepts "fp32", "bf16", "fp16", "fp8", "torch.bfloat16", torch.float16, ...
    Raises PuzzleError for anything else.
    """
    name = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise PuzzleError(f"dtype {dtype!r} is not supported; use one of fp32, bf16, fp16, fp8 ({', '.join(DTYPE_BYTES)})")
    return name


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype name or torch.dtype (see `canonical_dtype`)."""
    return DTYPE_BYTES[canonical_dtype(dtype)]


def subblock_params(config: ModelConfig, variant: AttentionConfig | FFNConfig) -> int:
    """Parameters of one subblock variant, its RMSNorm included (formula in the module docstring)."""
    C, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
    if isinstance(variant, AttentionConfig):
        if variant.kind == "gqa":
            G = _checked_kv_heads(config, variant)
            weights = C * H * D + 2 * C * G * D + H * D * C
            bias = H * D + 2 * G * D + C if config.attention_bias else 0
            return C + weights + bias
        return C + C * C if variant.kind == "linear" else 0
    if isinstance(variant, FFNConfig):
        if variant.kind == "swiglu":
            F = variant.intermediate_size
            bias = 2 * F + C if config.mlp_bias else 0
            return C + 3 * C * F + bias
        return C + C * C if variant.kind == "linear" else 0
    raise PuzzleError(f"expected an AttentionConfig or FFNConfig, got {type(variant).__name__}")


def unquantized_params(config: ModelConfig, variant: AttentionConfig | FFNConfig) -> int:
    """Parameters of a subblock that fp8 weights keep in bf16: its RMSNorm and biases (0 for no_op)."""
    C, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
    if variant.kind == "no_op":
        return 0
    if isinstance(variant, AttentionConfig) and variant.kind == "gqa" and config.attention_bias:
        return C + H * D + 2 * _checked_kv_heads(config, variant) * D + C
    if isinstance(variant, FFNConfig) and variant.kind == "swiglu" and config.mlp_bias:
        return C + 2 * variant.intermediate_size + C
    return C


def unquantized_dtype(weight_dtype) -> str:
    """The dtype the parts fp8 does not quantize are stored in: bf16 for fp8 weights, else the weight dtype."""
    weight_dtype = canonical_dtype(weight_dtype)
    return "bfloat16" if weight_dtype == "float8" else weight_dtype


def subblock_weight_bytes(config: ModelConfig, variant: AttentionConfig | FFNConfig, weight_dtype="float32") -> int:
    """Parameter bytes of one subblock in `weight_dtype` (fp8: its matrices at one byte, norm and biases in bf16)."""
    params, kept = subblock_params(config, variant), unquantized_params(config, variant)
    return (params - kept) * dtype_bytes(weight_dtype) + kept * dtype_bytes(unquantized_dtype(weight_dtype))


def non_block_params(config: ModelConfig) -> int:
    """Parameters outside the blocks: embedding, final norm, LM head (counted once when tied)."""
    V, C = config.vocab_size, config.hidden_size
    return V * C + C + (0 if config.tie_word_embeddings else V * C)


def model_params(config: ModelConfig) -> int:
    """Distinct parameters of the whole model (equals `PuzzleForCausalLM(config).num_parameters()`; a model whose
    FFN runs `fusion.fuse_ffn_runs` fused keeps its config but has folded the fused layers' RMSNorms away: count
    `fusion.to_plain_model`'s)."""
    blocks = sum(subblock_params(config, b.attention) + subblock_params(config, b.ffn) for b in config.blocks)
    return non_block_params(config) + blocks


def _checked_kv_heads(config: ModelConfig, attention: AttentionConfig) -> int:
    """G of a gqa variant, checked against the model's query heads as `ModelConfig` checks its layers."""
    G, H = attention.num_kv_heads, config.num_attention_heads
    if G > H or H % G:
        raise PuzzleError(f"{attention.id}: {G} KV heads do not divide the model's {H} query heads; give a divisor of {H}")
    return G


def _checked_count(name: str, value) -> int:
    """`value` as a plain int (a numpy int32 would multiply in 32 bits and wrap: breaker, 0 bytes of KV cache)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise PuzzleError(f"{name} must be a whole number >= 0, got {value!r}")
    return operator.index(value)


def kv_cache_bytes(config: ModelConfig, attention: AttentionConfig, batch_size: int, seq_len: int,
                   kv_dtype) -> int:
    """KV-cache bytes of one attention subblock: 2 · G · D · bytes · S · B (0 unless gqa).

    Args:
        batch_size: B sequences.
        seq_len: S cached positions per sequence (prompt + generated tokens).
        kv_dtype: storage dtype of the cache (no default: `default_kv_dtype` gives the usual one for a weight dtype).

    Raises:
        PuzzleError: B or S not a whole number >= 0, KV heads that do not divide the query heads, an unknown dtype.
    """
    batch_size, seq_len = _checked_count("batch_size", batch_size), _checked_count("seq_len", seq_len)
    if attention.kind != "gqa":
        return 0
    G = _checked_kv_heads(config, attention)
    return 2 * G * config.head_dim * dtype_bytes(kv_dtype) * seq_len * batch_size


def default_kv_dtype(weight_dtype) -> str:
    """The KV cache's dtype when none is given: the weight dtype, but bf16 for fp8 weights.

    fp8 weights compute with bf16 activations, and an engine keeps the cache in the activation dtype unless told
    otherwise (vLLM's `kv_cache_dtype="auto"`), as `roofline.estimate_subblock_costs` does for a bf16 workload; an
    fp8 cache is asked for explicitly (`kv_dtype="fp8"`)."""
    weight_dtype = canonical_dtype(weight_dtype)
    return "bfloat16" if weight_dtype == "float8" else weight_dtype


def subblock_memory_bytes(config: ModelConfig, variant: AttentionConfig | FFNConfig, batch_size: int, seq_len: int,
                          weight_dtype="float32", kv_dtype=None) -> int:
    """Parameter bytes (weight dtype) + KV-cache bytes at (B, S) (kv dtype, default `default_kv_dtype`)."""
    kv_dtype = default_kv_dtype(weight_dtype) if kv_dtype is None else kv_dtype
    batch_size, seq_len = _checked_count("batch_size", batch_size), _checked_count("seq_len", seq_len)  # FFN too
    weights = subblock_weight_bytes(config, variant, weight_dtype)
    kv = kv_cache_bytes(config, variant, batch_size, seq_len, kv_dtype) if isinstance(variant, AttentionConfig) else 0
    return weights + kv


def non_block_memory_bytes(config: ModelConfig, weight_dtype="float32") -> int:
    """Bytes of the embedding, final norm and (untied) LM head (in bf16 for fp8 weights: fp8 leaves them alone)."""
    return non_block_params(config) * dtype_bytes(unquantized_dtype(weight_dtype))


def model_memory_bytes(config: ModelConfig, batch_size: int, seq_len: int, weight_dtype="float32",
                       kv_dtype=None) -> int:
    """Whole-model bytes: all parameters + the KV cache of every gqa layer at (B, S).

    Equals the parameter bytes of `PuzzleForCausalLM(config)` in `weight_dtype` plus
    `KVCache(config, B, S, kv_dtype).nbytes()`; `kv_dtype` None is `default_kv_dtype(weight_dtype)` (bf16 for fp8
    weights, as `roofline.estimate_model` on a bf16 workload).
    """
    blocks = sum(subblock_memory_bytes(config, b.attention, batch_size, seq_len, weight_dtype, kv_dtype)
                 + subblock_memory_bytes(config, b.ffn, batch_size, seq_len, weight_dtype, kv_dtype)
                 for b in config.blocks)
    return non_block_memory_bytes(config, weight_dtype) + blocks


def memory_table(config: ModelConfig, variants, batch_size: int, seq_len: int,
                 weight_dtypes=("float32", "bfloat16", "float8"), kv_dtypes=("float32", "bfloat16", "float8")):
    """Tidy memory table: every subblock variant (and the non-block part) for every weight and KV dtype.

    Args:
        variants: AttentionConfig / FFNConfig objects (no_op rows are all zero).
        batch_size, seq_len: B sequences holding S cached positions each.
        weight_dtypes, kv_dtypes: dtype names (fp32, bf16, fp16, fp8 and aliases).

    Returns:
        pandas DataFrame with subblock ("attention" | "ffn" | "non_block"), variant, weight_dtype,
        kv_dtype, params, weight_mib, kv_mib, memory_mib, batch_size, seq_len.

    Raises:
        PuzzleError: an unknown dtype or variant type.
    """
    import pandas as pd

    rows = []
    for wd in (canonical_dtype(d) for d in weight_dtypes):
        for kd in (canonical_dtype(d) for d in kv_dtypes):
            for v in variants:
                subblock = "attention" if isinstance(v, AttentionConfig) else "ffn"
                params = subblock_params(config, v)
                kv = kv_cache_bytes(config, v, batch_size, seq_len, kd) if subblock == "attention" else 0
                weights = subblock_weight_bytes(config, v, wd)
                rows.append({"subblock": subblock, "variant": v.id, "weight_dtype": wd, "kv_dtype": kd, "params": params,
                             "weight_mib": weights / MIB, "kv_mib": kv / MIB, "memory_mib": (weights + kv) / MIB})
            nb, nb_bytes = non_block_params(config), non_block_memory_bytes(config, wd)
            rows.append({"subblock": "non_block", "variant": "non_block", "weight_dtype": wd, "kv_dtype": kd,
                         "params": nb, "weight_mib": nb_bytes / MIB, "kv_mib": 0.0, "memory_mib": nb_bytes / MIB})
    df = pd.DataFrame(rows)
    df["batch_size"], df["seq_len"] = int(batch_size), int(seq_len)
    return df
