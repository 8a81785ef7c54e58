"""Causal grouped-query flash attention for prefill, forward only.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // (H/G), j]) v[b, h // (H/G), j]   over j <= i + S - T

Flash attention (Dao et al. 2022, "FlashAttention", Algorithm 1; the forward of the Triton fused-attention
tutorial): a program owns BLOCK_M query rows of one head, streams the keys and values of its KV head in
BLOCK_N blocks and keeps a running max m, a running sum l and an unnormalised output (the online softmax of
Milakov & Gimelshein 2018), in base 2 (exp2 with scale * log2(e) folded in). The key loop has two stages:
blocks every query row of the program sees in full (no mask), then the blocks on the diagonal (causal mask).
Grouped-query attention (Ainslie et al. 2023): query head h reads KV head h // (H / G); no copy of K or V.

Keys may be longer than queries (S >= T, e.g. a prompt appended to a cache): the queries are the last T
positions, so query i sees keys j <= i + S - T (the bottom-right causal alignment of flash-attn).

Notation:
    B  batch    H  query heads    G  KV heads (H % G == 0)    T  queries    S  keys (S >= T)    D  head dim
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .utils import (KERNEL_DTYPES, check_forward_only, check_same_device, is_hopper, launch_interpreted,
                    next_power_of_2, runs_interpreted, softmax_scale, wide_rows)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _prefill_attention_kernel(
    Q, K, V, O,  # Q, O: (B, H, T, D); K, V: (B, G, S, D); any strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S, D, group,  # group = H // G query heads per KV head
    qk_scale,  # softmax scale * log2(e)
    t_bucket,  # only a key for the autotuner
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)  # B * H on axis 0 (up to 2**31 - 1 programs); axis 1 stops at 65535 (reviewer)
    start_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // group
    offset = S - T  # query i sits at key position i + offset

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_ok = offs_d < D

    # positions times strides in int64: T * (H + G) * D passes 2**31 for long prompts in the runtime's layout
    rows = offs_m.to(tl.int64)  # (BLOCK_M,)
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + g * stride_kh + offs_d[:, None] * stride_kd  # (BLOCK_D, 1)
    v_base = V + b * stride_vb + g * stride_vh + offs_d[None, :] * stride_vd  # (1, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output

    # Stage 1: key blocks that lie wholly at or before the first query row's position: no mask.
    full_end = (start_m * BLOCK_M + offset + 1) // BLOCK_N * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        keys = (start_n + offs_n).to(tl.int64)  # (BLOCK_N,) key positions
        kt = tl.load(k_base + keys[None, :] * stride_ks, mask=d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vs, mask=d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Stage 2: the diagonal blocks, masked causally and at the end of the keys. Every row sees at least the
    # first key of this stage (its own position or an earlier one), so m_i is finite after the first block.
    hi = tl.minimum((start_m + 1) * BLOCK_M + offset, S)
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        keys = cols.to(tl.int64)
        kt = tl.load(k_base + keys[None, :] * stride_ks, mask=(cols[None, :] < S) & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = (cols[None, :] <= offs_m[:, None] + offset) & (cols[None, :] < S)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vs, mask=(cols[:, None] < S) & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------------
# Autotune configurations (any BLOCK_M and BLOCK_N: the two stages split on a BLOCK_N boundary).

_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}  # small tiles: the odd test lengths span several of them


def _configs(hopper: bool, wide: bool = False) -> list[triton.Config]:
    """The autotuner's tiles. `wide`: head rows of more than 512 bytes (fp32 with head_dim over 128, fp16/bf16 over
    256), for which none of the usual tiles fits an SM's shared memory (breaker, compiled for sm_90: 279-426 KB at
    fp32 head_dim 256, over the 227 KiB of an H100); the autotuner skips any tile that does not fit, so each list
    keeps one that does. The wide tiles are checked at 1024-byte rows (head_dim 256 in fp32), not beyond."""
    if wide:  # fp32, head_dim 256, sm_90 and sm_80 alike: 140 / 148 / 68 KB (tests/test_kernels_compile.py)
        shapes = [(64, 32, 4, 2), (64, 64, 4, 1), (32, 16, 4, 2)]
    elif hopper:  # 228 KiB of shared memory per SM, wgmma wants 64-row multiples and 8 warps for 128-row tiles
        shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
    else:  # Ampere-class and older: smaller tiles and fewer stages
        shapes = [(128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


@functools.cache
def _tuned(hopper: bool, wide: bool = False):
    return triton.autotune(configs=_configs(hopper, wide), key=["BLOCK_D", "t_bucket"])(_prefill_attention_kernel)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"prefill attention takes q (B, H, T, D), k and v (B, G, S, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), (Bk, G, S, Dk) = q.shape, k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"prefill attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, G, S, D={D})")
    if G < 1:  # leftover: G = 0 was told to "choose a KV-head count that divides 0"
        raise ValueError("prefill attention: k and v hold no KV head (G = 0); give at least one")
    if H % G != 0:
        raise ValueError(f"prefill attention: {H} query heads cannot share {G} KV heads (H must be a multiple of G); "
                         f"choose a KV-head count that divides {H}")
    if S < T:
        raise ValueError(f"prefill attention: {S} keys for {T} queries; the keys must include every query position")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"prefill attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in (*KERNEL_DTYPES, torch.float64):  # int32 truncated scores, fp8 failed in torch
        raise ValueError(f"prefill attention takes q, k, v in fp32, fp16 or bf16 (float64 in the reference); "
                         f"got {q.dtype}")
    check_same_device("prefill attention", q=q, k=k, v=v)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal GQA flash attention with the Triton kernel (compiled on CUDA, interpreted on CPU); no backward.

    Args:
        q: (B, H, T, D) fp32, fp16 or bf16; any strides.
        k, v: (B, G, S, D), S >= T, same dtype; H must be a multiple of G (G = 1 is multi-query attention).
            The T queries are the last T of the S positions.
        scale: softmax scale; 1 / sqrt(D) when None.
    Returns:
        (B, H, T, D) in q's dtype.
    Raises:
        ValueError: H not a multiple of G, S < T, mismatched shapes or dtypes, a dtype other than fp32, fp16 or
            bf16, or an input that requires grad with autograd on (there is no backward).
    """
    _check(q, k, v)
    check_forward_only("prefill attention", q, k, v)
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scale = softmax_scale("prefill attention", scale, D)
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    args = (q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, T, S, D, H // G, scale * math.log2(math.e), min(next_power_of_2(T), 4096))
    block_d = max(16, next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 stays exact (no tf32); others: the default
    if runs_interpreted(q):
        grid = (B * H, triton.cdiv(T, _INTERPRETER_CONFIG["BLOCK_M"]))
        launch_interpreted(_prefill_attention_kernel, grid, *args, BLOCK_D=block_d, DOT_PRECISION=precision,
                           **_INTERPRETER_CONFIG)
    else:
        grid = lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"]))  # noqa: E731
        wide = wide_rows(q, block_d)
        _tuned(is_hopper(q.device), wide)[grid](*args, BLOCK_D=block_d, DOT_PRECISION=precision)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reference


def prefill_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain torch, in fp32 (float64 inputs in float64): the same contract as `prefill_attention`."""
    _check(q, k, v)
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scale = softmax_scale("prefill attention", scale, D)
    ct = torch.promote_types(q.dtype, torch.float32)  # breaker: float64 went through fp32 (gradcheck failed)
    k = k.to(ct).repeat_interleave(H // G, dim=1)  # (B, H, S, D)
    v = v.to(ct).repeat_interleave(H // G, dim=1)  # (B, H, S, D)
    scores = (q.to(ct) @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    q_pos = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=q.device)[None, :]  # (1, S)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)  # (B, H, T, D)
