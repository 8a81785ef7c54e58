"""Inputs the kernels met in a probe (stop 35) and got wrong or crashed on, against the torch references.

On CPU the kernels run in Triton's interpreter (see test_kernels_rmsnorm.py); bf16 there runs as fp32 copies
(`utils.launch_interpreted`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (if this module is the first)

import pytest  # noqa: E402

from puzzle.kernels.attention_decode import decode_attention, decode_attention_reference  # noqa: E402
from puzzle.kernels.attention_prefill import prefill_attention, prefill_attention_reference  # noqa: E402
from puzzle.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from puzzle.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

BF16 = dict(atol=4e-2, rtol=2e-2)  # a few bf16 ulps at magnitudes up to ~4


def test_bfloat16_matches_the_reference_on_every_kernel():
    # the interpreter held bf16 as raw 16-bit integers: x + r gave NaN, attention was 8e8 off
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 96, generator=gen).bfloat16() for _ in range(2))
    w = (1 + 0.1 * torch.randn(96, generator=gen)).bfloat16()
    for got, want in zip(rms_norm(x, w, r), rms_norm_reference(x, w, r)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), **BF16)
    g, u = (torch.randn(4, 100, generator=gen).bfloat16() for _ in range(2))
    torch.testing.assert_close(swiglu(g, u).float(), swiglu_reference(g, u).float(), **BF16)
    q = torch.randn(1, 4, 9, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 9, 64, generator=gen).bfloat16() for _ in range(2))
    torch.testing.assert_close(prefill_attention(q, k, v).float(), prefill_attention_reference(q, k, v).float(), **BF16)
    q1 = q[:, :, -1:]
    got = decode_attention(q1, k, v, torch.tensor([7]))
    torch.testing.assert_close(got.float(), decode_attention_reference(q1, k, v, torch.tensor([7])).float(), **BF16)


def test_bfloat16_gradients_match_the_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, generator=gen).bfloat16().requires_grad_()
    w = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    rms_norm(x, w)[0].float().pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    rms_norm_reference(x, w)[0].float().pow(2).sum().backward()
    torch.testing.assert_close(gx.float(), x.grad.float(), **BF16)
    torch.testing.assert_close(gw.float(), w.grad.float(), atol=0.2, rtol=2e-2)  # a sum over rows


def test_a_strided_weight_is_read_by_its_strides():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    for w in (torch.randn(128, generator=gen)[::2], torch.full((1,), 2.0).expand(64)):
        w = w.requires_grad_() if w.is_leaf else w
        y, _ = rms_norm(x, w)
        torch.testing.assert_close(y, rms_norm_reference(x, w)[0], atol=1e-5, rtol=1e-5)
        (dx,) = torch.autograd.grad(y.sum(), x)
        (dx_ref,) = torch.autograd.grad(rms_norm_reference(x, w)[0].sum(), x)
        torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)


def test_decode_reads_a_strided_lengths_view_by_its_stride():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 1, 32, generator=gen)
    k, v = (torch.randn(3, 2, 40, 32, generator=gen) for _ in range(2))
    pairs = torch.tensor([[5, 0], [40, 0], [17, 0]])
    lengths = pairs[:, 0]  # stride 2
    assert not lengths.is_contiguous()
    torch.testing.assert_close(decode_attention(q, k, v, lengths), decode_attention_reference(q, k, v, lengths),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [10.5, True, torch.tensor([True])])
def test_decode_refuses_lengths_that_are_no_integers(lengths):
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 20, 16)
    with pytest.raises(ValueError, match="lengths must be an int|outside"):
        decode_attention(q, k, k, lengths)


def test_decode_refuses_a_split_count_below_one():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 20, 16)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        decode_attention(q, k, k, 5, num_splits=0)


def test_zero_width_rows_and_bad_dtypes():
    y, h = rms_norm(torch.randn(3, 0), torch.ones(0))
    assert y.shape == h.shape == (3, 0)
    assert swiglu(torch.randn(3, 0), torch.randn(3, 0)).shape == (3, 0)
    with pytest.raises(ValueError, match=r"\(\.\.\., F\)"):
        swiglu(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8))  # was all zeros
    with pytest.raises(ValueError, match="weight fp32, fp16, bf16 or float64"):  # breaker: fp8 failed in torch
        rms_norm(torch.randn(2, 8), torch.ones(8).to(torch.float8_e4m3fn))
    y, _ = rms_norm_reference(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    assert y.dtype == torch.float64  # the reference (the CPU runtime's path) still takes float64


def test_bf16_write_back_touches_only_what_the_kernel_wrote():
    """Review: each bf16 tensor's fp32 copy was written back over its whole storage span, so outputs that are
    interleaved views of one buffer undid each other, and an input holding a NaN was written in place."""
    import triton
    import triton.language as tl

    from puzzle.kernels.utils import launch_interpreted

    @triton.jit
    def write_both(A, B, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(A + offs * 2, tl.full((BLOCK,), 1.0, tl.float32), mask=offs < n)
        tl.store(B + offs * 2, tl.full((BLOCK,), 2.0, tl.float32), mask=offs < n)

    buf = torch.zeros(8, 2, dtype=torch.bfloat16)
    launch_interpreted(write_both, (1,), buf[:, 0], buf[:, 1], 8, BLOCK=8)
    assert (buf[:, 0] == 1).all() and (buf[:, 1] == 2).all()

    @triton.jit
    def double(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

    x, y = torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), torch.empty(2, dtype=torch.bfloat16)
    version = x._version
    launch_interpreted(double, (1,), x, y, 2, BLOCK=2)
    assert x._version == version and y[0] == 2 and y[1].isnan()  # the input was not written back


def test_review_of_stop_38_grid_second_order_grads_dtypes_lengths_and_forward_only():
    """Reviewer (stop 38): prefill put B * H on the launch grid's axis 1, which CUDA caps at 65535 (the interpreter
    does not: checked here by the axis the kernel reads); rms_norm and swiglu lost second-order gradients without a
    word; int32 attention truncated in the reference; lengths past S_max read past the cache; the attention kernels
    returned detached outputs for inputs that need a gradient."""
    import inspect

    from puzzle.kernels import attention_prefill, ops

    source = inspect.getsource(attention_prefill)
    assert "grid = (B * H, triton.cdiv(T" in source and "bh = tl.program_id(0)" in source
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(40, 3, 5, 16, generator=gen)  # 120 (batch, head) programs on axis 0
    k, v = (torch.randn(40, 1, 5, 16, generator=gen) for _ in range(2))
    torch.testing.assert_close(prefill_attention(q, k, v), prefill_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)

    # a gradient with create_graph=True is refused where it is asked for: was x.grad == 2 x (the penalty ignored),
    # and with a plain sum the penalty's gradient was dropped even beside another term (breaker: no error at all)
    x, w = torch.randn(3, 9, generator=gen, requires_grad=True), torch.randn(9, generator=gen)
    g, u = (torch.randn(2, 5, generator=gen, requires_grad=True) for _ in range(2))
    for loss, wrt in ((lambda: rms_norm(x, w)[0].pow(2).sum(), x), (lambda: rms_norm(x, w)[0].sum(), x),
                      (lambda: swiglu(g, u).pow(2).sum(), g), (lambda: swiglu(g, u).sum(), g)):
        with pytest.raises(RuntimeError, match="the Triton backward is not differentiable .*create_graph=True"):
            torch.autograd.grad(loss(), wrt, create_graph=True)
        (first,) = torch.autograd.grad(loss(), wrt)  # a plain gradient as before
        assert first.shape == wrt.shape and torch.isfinite(first).all()

    qi, ki = torch.ones(1, 2, 3, 4, dtype=torch.int32), torch.ones(1, 2, 3, 4, dtype=torch.int32)
    f8 = qi.to(torch.float8_e4m3fn)  # breaker: fp8 passed the check and failed in torch ("Promotion for Float8")
    for a, b in ((qi, ki), (f8, f8)):
        for call in (lambda: ops.prefill_attention(a, b, b), lambda: ops.decode_attention(a[:, :, :1], b, b, 2)):
            with pytest.raises(ValueError, match=r"in fp32, fp16 or bf16 \(float64 in the reference\)"):
                call()
    with pytest.raises(ValueError, match="takes fp32, fp16 or bf16"):
        prefill_attention(q.double(), k.double(), v.double())
    q1, kc = torch.randn(3, 4, 1, 8, generator=gen), torch.randn(3, 2, 50, 8, generator=gen)
    for lengths in (torch.tensor([51, 3, 1]), torch.tensor([0, 3, 1])):
        for call in (decode_attention, decode_attention_reference):
            with pytest.raises(ValueError, match=r"outside \[1, 50\]"):
                call(q1, kc, kc, lengths)
    with pytest.raises(ValueError, match="S_max = 0"):
        decode_attention(q1, kc[:, :, :0], kc[:, :, :0], torch.tensor([1, 1, 1]))
    empty = decode_attention(q1[:0], kc[:0, :, :0], kc[:0, :, :0], torch.zeros(0, dtype=torch.long))  # (breaker)
    assert empty.shape == (0, 4, 1, 8)
    # leftover: an empty batch took a (0,) tensor of lengths but refused the int 1 ("outside [1, 0]")
    assert decode_attention(q1[:0], kc[:0, :, :0], kc[:0, :, :0], 1).shape == (0, 4, 1, 8)
    for call in (lambda: prefill_attention(q, k[:, :0], v[:, :0]),
                 lambda: decode_attention(q1, kc[:, :0], kc[:, :0], 2)):
        with pytest.raises(ValueError, match=r"hold no KV head \(G = 0\); give at least one"):  # "divides 4"
            call()

    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        prefill_attention(qg, k, v)
    with torch.no_grad():
        prefill_attention(qg, k, v)  # inference is fine
    out = ops.prefill_attention(qg, k, v)  # the default path takes the differentiable reference
    assert out.requires_grad
    with pytest.raises(ValueError, match="no backward"):
        ops.prefill_attention(qg, k, v, use_triton=True)


def test_references_compute_float64_in_float64_and_decode_never_reads_past_a_length():
    """Breaker: the references promised float64 but computed it in fp32 (gradcheck failed); the decode reference
    (what `ops` runs on CPU) gave NaN where the unused cache held inf, which the kernel ignores."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_reference(a, b)[0], (x, w))
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a: prefill_attention_reference(a, k, v), (q,))
    assert torch.autograd.gradcheck(lambda a: decode_attention_reference(a[:, :, :1], k, v, 3), (q,))

    q, k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    lengths = torch.tensor([5, 3])
    clean = decode_attention_reference(q, k, v, lengths)
    for junk in (float("inf"), float("nan")):
        kj, vj = k.clone(), v.clone()
        kj[0, :, 5:], vj[0, :, 5:], kj[1, :, 3:], vj[1, :, 3:] = junk, junk, junk, junk
        torch.testing.assert_close(decode_attention_reference(q, kj, vj, lengths), clean)
        torch.testing.assert_close(decode_attention(q, kj, vj, lengths), clean, atol=1e-5, rtol=1e-5)


def test_kernels_refuse_a_zero_head_dim_tensors_on_two_devices_and_take_a_tensor_scale():
    """Breaker: D = 0 divided by zero, a 0-dim tensor scale failed inside Triton's interpreter, and tensors on two
    devices failed deep in torch (a meta weight: 'Cannot copy out of meta tensor')."""
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16)
    for fn in (prefill_attention, prefill_attention_reference):
        torch.testing.assert_close(fn(q, k, k, torch.tensor(0.3)), prefill_attention_reference(q, k, k, 0.3),
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="head dim D = 0"):
            fn(torch.randn(1, 2, 3, 0), torch.randn(1, 1, 3, 0), torch.randn(1, 1, 3, 0))
        for bad in (torch.ones(2), "0.5", True, float("nan")):
            with pytest.raises(ValueError, match="scale must be a finite real number"):
                fn(q, k, k, bad)
    for fn in (decode_attention, decode_attention_reference):
        torch.testing.assert_close(fn(q[:, :, :1], k, k, 2, torch.tensor(0.3)),
                                   decode_attention_reference(q[:, :, :1], k, k, 2, 0.3), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="head dim D = 0"):
            fn(torch.randn(1, 2, 1, 0), torch.randn(1, 1, 3, 0), torch.randn(1, 1, 3, 0), 2)
        with pytest.raises(ValueError, match=r"different devices \(q on cpu, k_cache on meta, v_cache on cpu"):
            fn(q[:, :, :1], k.to("meta"), k, 2)
    x, w = torch.randn(2, 8), torch.rand(8)  # rms_norm's eps as attention's scale (breaker: a tensor eps failed inside
    for fn in (rms_norm, rms_norm_reference):  # Triton's interpreter, None gave an AttributeError there)
        torch.testing.assert_close(fn(x, w, eps=torch.tensor(1e-3))[0], rms_norm_reference(x, w, eps=1e-3)[0])
        for bad, words in ((None, "finite real number"), ("a", "finite real number"), (torch.ones(2), "finite real"),
                           (float("nan"), "finite real number"), (-1e-6, "eps must be at least 0")):
            with pytest.raises(ValueError, match=f"rms_norm: .*{words}"):
                fn(x, w, eps=bad)
    with pytest.raises(ValueError, match="lengths on meta"):  # the kernel's; the reference moves them to q's device
        decode_attention(q[:, :, :1], k, k, torch.tensor([2], device="meta"))
    with pytest.raises(ValueError, match=r"rms_norm: the tensors are on different devices \(x on cpu, weight on meta"):
        rms_norm(torch.ones(3, 4), torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="swiglu: the tensors are on different devices"):
        swiglu(torch.ones(3, 4), torch.ones(3, 4, device="meta"))
    with pytest.raises(ValueError, match="prefill attention: the tensors are on different devices"):
        prefill_attention(q, k, k.to("meta"))
