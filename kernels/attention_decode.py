"""Decode attention: one new query per sequence against a KV cache, grouped-query, split along the keys.

    out[b, h] = sum_{j < L_b} softmax_j(scale * q[b, h] . k[b, g, j]) v[b, g, j]          g = h // (H / G)

Decoding reads the whole valid cache once per token, so the kernel is built around memory traffic:
- one program per (sequence, KV head) serves all H / G query heads that share the KV head, so K and V are
  read once (the query heads are padded to 16 rows for tl.dot);
- the keys are split into chunks ("flash-decoding", Dao et al. 2023, and the split-KV kernels of vLLM and
  SGLang): each (sequence, KV head, chunk) program writes an unnormalised partial output with its running
  max and sum (online softmax, Milakov & Gimelshein 2018), and a second kernel merges the chunks. Small
  batches then still fill every SM.

L_b, the valid length, counts the new token's own key (write the new key and value into the cache first);
it is one int shared by the batch or a (B,) integer tensor, and must be >= 1.

Notation:
    B  batch    H  query heads    G  KV heads (H % G == 0)    S_max  cache positions    D  head dim
    P  chunks ("splits") of the keys
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import triton
import triton.language as tl

from .utils import (KERNEL_DTYPES, check_forward_only, check_same_device, is_hopper, launch_interpreted,
                    next_power_of_2, num_programs_hint, runs_interpreted, softmax_scale, wide_rows)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _decode_partial_kernel(
    Q, K, V, LENGTHS, ACC, M, L,  # Q: (B, H, D); K, V: (B, G, S_max, D); LENGTHS: (B,) int
    # ACC: (B, H, P, D) fp32; M, L: (B, H, P) fp32, contiguous
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    G, H, D, group, n_splits, chunk,  # group = H // G; chunk = keys per split
    qk_scale,  # softmax scale * log2(e)
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)  # (BLOCK_H,) query heads of this KV head, padded
    heads = g * group + offs_h
    h_ok = offs_h < group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)
    kt_ptrs = K + b * stride_kb + g * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd

    length = tl.load(LENGTHS + b).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # Every block of this loop holds at least one valid key, so m_i is finite after the first; a split that
    # starts past the length runs no block and leaves m = -inf, l = 0, which the merge weighs as zero.
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        valid = cols < end
        kt = tl.load(kt_ptrs + start_n * stride_ks, mask=valid[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_H, BLOCK_N)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vs, mask=valid[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    row = (b * H + heads) * n_splits + split  # (BLOCK_H,) index into the (B, H, P) buffers
    tl.store(M + row, m_i, mask=h_ok)
    tl.store(L + row, l_i, mask=h_ok)
    tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_merge_kernel(
    ACC, M, L, O,  # ACC: (B, H, P, D) fp32; M, L: (B, H, P) fp32; O: (B, H, D) any strides
    stride_ob, stride_oh, stride_od,
    H, D, n_splits,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < n_splits
    d_ok = offs_d < D
    m = tl.load(M + bh * n_splits + offs_p, mask=p_ok, other=float("-inf"))  # (BLOCK_P,)
    l = tl.load(L + bh * n_splits + offs_p, mask=p_ok, other=0.0)
    acc = tl.load(ACC + (bh * n_splits + offs_p)[:, None] * D + offs_d[None, :],
                  mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_D)
    m_max = tl.max(m, 0)  # finite: split 0 holds the first key
    w = tl.math.exp2(m - m_max)  # (BLOCK_P,) zero for empty splits
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)  # (BLOCK_D,)
    b, h = bh // H, bh % H
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------------------------------
# Autotune configurations (memory bound: deeper pipelines on Hopper)

_INTERPRETER_BLOCK_N = 16
_CHUNK_ALIGN = 128  # chunk sizes are multiples of every BLOCK_N below


def _configs(hopper: bool, wide: bool = False) -> list[triton.Config]:
    """The autotuner's tiles. `wide`: head rows of more than 512 bytes (fp32 head_dim over 128, 16-bit over 256),
    where the usual Hopper tiles need 215-623 KB of shared memory (compiled for sm_90 at fp32 head_dim 256, 16 and 64
    query heads per KV head), over an H100's 227 KiB; the wide ones need 50-148 KB there (tests/test_kernels_compile.py;
    not checked past 1024-byte rows)."""
    if wide:
        shapes = [(64, 4, 1), (32, 4, 2), (16, 4, 2)]
    elif hopper:
        shapes = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4)]
    else:
        shapes = [(64, 4, 2), (32, 4, 3), (128, 8, 2)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


@functools.cache
def _tuned(hopper: bool, wide: bool = False):
    return triton.autotune(configs=_configs(hopper, wide), key=["BLOCK_H", "BLOCK_D"])(_decode_partial_kernel)


def _num_splits(batch_kv_heads: int, span: int, device: torch.device) -> int:
    """Chunks per (sequence, KV head): enough programs for about four per SM, chunks of at least 256 keys."""
    want = triton.cdiv(4 * num_programs_hint(device), max(1, batch_kv_heads))
    return max(1, min(want, triton.cdiv(span, 256)))


# ---------------------------------------------------------------------------------------------------------------------
# Launcher


def _is_index(n) -> bool:
    """An int, a numpy integer or anything else `operator.index` takes."""
    try:
        operator.index(n)
    except TypeError:
        return False
    return True


def _check(q, k_cache, v_cache, lengths):
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode attention takes q (B, H, 1, D); got {tuple(q.shape)}")
    B, H, _, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         f"both be (B={B}, G, S_max, D={D})")
    G, S_max = k_cache.shape[1], k_cache.shape[2]
    if G < 1:  # leftover: G = 0 was told to "choose a KV-head count that divides 0"
        raise ValueError("decode attention: k and v hold no KV head (G = 0); give at least one")
    if H % G != 0:
        raise ValueError(f"decode attention: {H} query heads cannot share {G} KV heads (H must be a multiple of G); "
                         f"choose a KV-head count that divides {H}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"decode attention: q, k_cache, v_cache dtypes differ ({q.dtype}, {k_cache.dtype}, {v_cache.dtype})"
        )
    if q.dtype not in (*KERNEL_DTYPES, torch.float64):  # int32 truncated scores, fp8 failed in torch
        raise ValueError(f"decode attention takes q and caches in fp32, fp16 or bf16 (float64 in the reference); "
                         f"got {q.dtype}")
    check_same_device("decode attention", q=q, k_cache=k_cache, v_cache=v_cache)  # lengths: the kernel's own check
    if S_max < 1 and B * H:
        raise ValueError("decode attention: the cache holds no position (S_max = 0); it must hold the new token")
    if isinstance(lengths, torch.Tensor):
        if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"decode attention: lengths must be an int or a (B={B},) integer tensor; got "
                             f"{lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device.type == "cpu" and lengths.numel() and not bool(((lengths >= 1) & (lengths <= S_max)).all()):
            # checked where it costs no device sync; on CUDA a length past S_max would read past the cache
            raise ValueError(f"decode attention: lengths {lengths.tolist()} outside [1, {S_max}] (the cache holds "
                             f"{S_max} positions)")
        return
    if isinstance(lengths, bool) or not _is_index(lengths):  # 10.5 is no length (the kernel would cut it to 10)
        raise ValueError(f"decode attention: lengths must be an int or a (B={B},) integer tensor; got {lengths!r}")
    if B * H and not 1 <= operator.index(lengths) <= S_max:  # an empty batch takes any int, as it takes (0,)
        raise ValueError(f"decode attention: length {lengths!r} outside [1, {S_max}] (the cache holds {S_max} "
                         "positions)")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: int | torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over a KV cache, with the Triton kernels (no backward).

    Args:
        q: (B, H, 1, D) fp32, fp16 or bf16; any strides.
        k_cache, v_cache: (B, G, S_max, D), same dtype; H must be a multiple of G.
        lengths: valid cache positions per sequence, counting the new token: an int shared by the batch, or a
            (B,) integer tensor on q's device with values in [1, S_max] (checked on the CPU; on a GPU not checked,
            to avoid a device sync).
        scale: softmax scale; 1 / sqrt(D) when None.
        num_splits: chunks of the keys per (sequence, KV head), >= 1; chosen from the SM count when None.
    Returns:
        (B, H, 1, D) in q's dtype.
    Raises:
        ValueError: H not a multiple of G, an int length (or a CPU tensor's) outside [1, S_max] or not an integer,
            num_splits < 1, or mismatched shapes or dtypes.
    Note:
        On CUDA the first call per shape class autotunes (several launches); warm up before capturing a CUDA graph.
    """
    _check(q, k_cache, v_cache, lengths)
    check_forward_only("decode attention", q, k_cache, v_cache)
    # the kernel reads the lengths on q's device (the reference moves them there)
    check_same_device("decode attention", q=q, lengths=lengths if isinstance(lengths, torch.Tensor) else None)
    B, H, _, D = q.shape
    G, S_max = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale("decode attention", scale, D)
    interpreted = runs_interpreted(q)
    if num_splits is not None and (isinstance(num_splits, bool) or not _is_index(num_splits) or num_splits < 1):
        raise ValueError(f"decode attention: num_splits must be an int >= 1 (or None to choose); got {num_splits!r}")
    if B * H == 0:  # nothing to attend (breaker: B = 0 with an empty cache divided by zero)
        return torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if isinstance(lengths, torch.Tensor):
        span, lengths_t = S_max, lengths.contiguous()  # the kernel reads LENGTHS + b (a strided view read others)
    else:
        span, lengths_t = int(lengths), torch.full((B,), int(lengths), dtype=torch.int32, device=q.device)
    align = _INTERPRETER_BLOCK_N if interpreted else _CHUNK_ALIGN
    n_splits = num_splits if num_splits is not None else _num_splits(B * G, span, q.device)
    chunk = triton.cdiv(triton.cdiv(span, n_splits), align) * align
    n_splits = triton.cdiv(span, chunk)  # no split that starts past every length

    acc = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, H, n_splits), dtype=torch.float32, device=q.device)
    l = torch.empty((B, H, n_splits), dtype=torch.float32, device=q.device)
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    q3 = q[:, :, 0]  # (B, H, D)
    block_h = max(16, next_power_of_2(H // G))
    block_d = max(16, next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 stays exact (no tf32); others: the default
    args = (q3, k_cache, v_cache, lengths_t, acc, m, l, *q3.stride(), *k_cache.stride(), *v_cache.stride(),
            G, H, D, H // G, n_splits, chunk, scale * math.log2(math.e))
    merge_args = (acc, m, l, out, out.stride(0), out.stride(1), out.stride(3), H, D, n_splits)
    block_p = next_power_of_2(n_splits)
    if interpreted:
        launch_interpreted(_decode_partial_kernel, (B * G, n_splits), *args, BLOCK_H=block_h,
                           BLOCK_N=_INTERPRETER_BLOCK_N, BLOCK_D=block_d, DOT_PRECISION=precision)
        launch_interpreted(_decode_merge_kernel, (B * H,), *merge_args, BLOCK_P=block_p, BLOCK_D=block_d)
    else:
        wide = wide_rows(q, block_d)
        _tuned(is_hopper(q.device), wide)[(B * G, n_splits)](*args, BLOCK_H=block_h, BLOCK_D=block_d,
                                                             DOT_PRECISION=precision)
        _decode_merge_kernel[(B * H,)](*merge_args, BLOCK_P=block_p, BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reference


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: int | torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain torch, in fp32 (float64 inputs in float64): the same contract as `decode_attention`; cache positions
    at or past a sequence's length are never read, whatever they hold (NaN, inf: an uninitialised cache)."""
    _check(q, k_cache, v_cache, lengths)
    B, H, _, D = q.shape
    G, S_max = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale("decode attention", scale, D)
    ct = torch.promote_types(q.dtype, torch.float32)  # breaker: float64 went through fp32 (gradcheck failed)
    lengths = torch.as_tensor(lengths, device=q.device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
    hidden = torch.arange(S_max, device=q.device) >= lengths  # (B or 1, 1, 1, S_max)
    k = k_cache.to(ct).repeat_interleave(H // G, dim=1)  # (B, H, S_max, D)
    v = v_cache.to(ct).repeat_interleave(H // G, dim=1)  # (B, H, S_max, D)
    v = v.masked_fill(hidden.transpose(-1, -2), 0.0)  # breaker: 0 * inf past the length gave NaN
    scores = (q.to(ct) @ k.transpose(-1, -2)) * scale  # (B, H, 1, S_max)
    scores = scores.masked_fill(hidden, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)  # (B, H, 1, D)
