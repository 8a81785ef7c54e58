"""Prefill (causal GQA flash) and decode (split-KV) attention kernels against their fp32 torch references.

Odd lengths, head dims 64 and 128, one and several KV heads, fp32 and fp16, on CPU in Triton's interpreter
(see test_kernels_rmsnorm.py); bf16, the compiled kernels and timing need CUDA (`gpu` marker).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (if this module is the first)

import pytest  # noqa: E402

from puzzle.kernels.attention_decode import decode_attention, decode_attention_reference  # noqa: E402
from puzzle.kernels.attention_prefill import prefill_attention, prefill_attention_reference  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def gpu(test):
    """Run only with CUDA: marked `gpu` and skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def _randn(*shape, dtype, device="cpu", gen):
    return torch.randn(shape, generator=gen).to(device, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Prefill

# (B, H, G, T, S, D): T in {1, 7, 33, 65}, D in {64, 128}, G in {1, 2, H}; S > T appends queries to cached keys.
PREFILL_CASES = [
    (1, 2, 1, 1, 1, 64),
    (2, 4, 2, 7, 7, 128),
    (1, 4, 1, 33, 33, 64),
    (1, 2, 2, 65, 65, 64),
    (1, 4, 2, 33, 33, 128),
    (1, 2, 1, 7, 40, 64),
]


def _check_prefill(case, dtype, device="cpu", scale=None, tol=None):
    B, H, G, T, S, D = case
    gen = torch.Generator().manual_seed(0)
    q = _randn(B, H, T, D, dtype=dtype, device=device, gen=gen)
    k = _randn(B, G, S, D, dtype=dtype, device=device, gen=gen)
    v = _randn(B, G, S, D, dtype=dtype, device=device, gen=gen)
    out = prefill_attention(q, k, v, scale)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    atol, rtol = tol or TOL[dtype]
    torch.testing.assert_close(out, prefill_attention_reference(q, k, v, scale), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "B{}H{}G{}T{}S{}D{}".format(*c))
def test_prefill_matches_reference(case, dtype):
    _check_prefill(case, dtype)


def test_prefill_reference_is_causal_sdpa():
    """The reference itself agrees with torch's SDPA on expanded heads, so the kernel is checked against truth."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = _randn(1, 4, 9, 16, dtype=torch.float32, gen=gen), *(_randn(1, 2, 9, 16, dtype=torch.float32, gen=gen)
                                                                    for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(prefill_attention_reference(q, k, v), sdpa, atol=1e-5, rtol=1e-5)


def test_prefill_custom_scale_and_odd_head_dim():
    _check_prefill((1, 3, 1, 20, 20, 80), torch.float32, scale=0.3)


def test_prefill_reads_strided_inputs():
    """q, k, v as (B, T, heads, D) transposed views, as they come out of the projections, need no copy."""
    gen = torch.Generator().manual_seed(0)
    q = _randn(2, 19, 4, 64, dtype=torch.float32, gen=gen).transpose(1, 2)  # (B, H, T, D) view
    k = _randn(2, 19, 2, 64, dtype=torch.float32, gen=gen).transpose(1, 2)
    v = _randn(2, 19, 2, 64, dtype=torch.float32, gen=gen).transpose(1, 2)
    torch.testing.assert_close(prefill_attention(q, k, v), prefill_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [prefill_attention, prefill_attention_reference])
def test_prefill_refuses_head_counts_the_kv_heads_do_not_divide(fn):
    q, kv = torch.randn(1, 6, 5, 64), torch.randn(1, 4, 5, 64)
    with pytest.raises(ValueError, match="6 query heads cannot share 4 KV heads"):
        fn(q, kv, kv)


def test_prefill_refuses_fewer_keys_than_queries():
    with pytest.raises(ValueError, match="keys"):
        prefill_attention(torch.randn(1, 2, 9, 64), torch.randn(1, 1, 8, 64), torch.randn(1, 1, 8, 64))


# ---------------------------------------------------------------------------------------------------------------------
# Decode

# (B, H, G, S_max, D, lengths, num_splits): lengths an int or per sequence; splits None = the launcher's choice.
DECODE_CASES = [
    (2, 4, 2, 70, 64, 65, None),
    (3, 4, 1, 50, 128, [1, 33, 50], 3),
    (1, 2, 2, 40, 64, 17, 1),
    (2, 2, 1, 33, 64, [7, 1], 4),
]


def _check_decode(case, dtype, device="cpu"):
    B, H, G, S_max, D, lengths, splits = case
    gen = torch.Generator().manual_seed(0)
    q = _randn(B, H, 1, D, dtype=dtype, device=device, gen=gen)
    k = _randn(B, G, S_max, D, dtype=dtype, device=device, gen=gen)
    v = _randn(B, G, S_max, D, dtype=dtype, device=device, gen=gen)
    if isinstance(lengths, list):
        lengths = torch.tensor(lengths, device=device)
    out = decode_attention(q, k, v, lengths, num_splits=splits)
    assert out.shape == (B, H, 1, D) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "B{}H{}G{}S{}D{}-L{}-P{}".format(*c))
def test_decode_matches_reference(case, dtype):
    _check_decode(case, dtype)


def test_decode_ignores_cache_positions_past_the_length():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(1, 2, n, 64, dtype=torch.float32, gen=gen) for n in (1, 24, 24))
    out = decode_attention(q, k, v, 10)
    k[:, :, 10:], v[:, :, 10:] = 1e4, float("nan")  # garbage beyond the valid length
    torch.testing.assert_close(decode_attention(q, k, v, 10), out, atol=0, rtol=0)


def test_decode_equals_last_row_of_prefill():
    gen = torch.Generator().manual_seed(0)
    q = _randn(1, 4, 21, 64, dtype=torch.float32, gen=gen)
    k, v = (_randn(1, 2, 21, 64, dtype=torch.float32, gen=gen) for _ in range(2))
    last = decode_attention(q[:, :, -1:], k, v, 21)
    torch.testing.assert_close(last, prefill_attention(q, k, v)[:, :, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [decode_attention, decode_attention_reference])
def test_decode_refuses_bad_head_ratio_and_length(fn):
    q, kv = torch.randn(1, 4, 1, 64), torch.randn(1, 3, 8, 64)
    with pytest.raises(ValueError, match="4 query heads cannot share 3 KV heads"):
        fn(q, kv, kv, 4)
    kv = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="outside"):
        fn(q, kv, kv, 9)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16, timing


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES + [(2, 32, 8, 1000, 1000, 128), (1, 9, 3, 515, 515, 64)])
def test_prefill_compiled_on_cuda(case, dtype):
    tol = (1e-4, 1e-4) if dtype == torch.float32 else None  # long rows: a different summation order
    _check_prefill(case, dtype, device="cuda", tol=tol)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", DECODE_CASES + [(8, 32, 8, 4096, 128, 3001, None), (4, 9, 3, 600, 64, [1, 77, 600, 300], None)]
)
def test_decode_compiled_on_cuda(case, dtype):
    _check_decode(case, dtype, device="cuda")
