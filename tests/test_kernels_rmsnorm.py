"""Fused residual-add RMSNorm kernel against its torch reference: forward and gradients, fp32 and fp16.

On CPU the kernels run in Triton's interpreter (the launchers pick it for CPU tensors; TRITON_INTERPRET is set
too when no GPU is present, so triton's own jit functions are interpreted as well when triton is first
imported here). bf16 and the compiled kernels run only with CUDA (`gpu` marker).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (if this module is the first)

import pytest  # noqa: E402

from puzzle.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def gpu(test):
    """Run only with CUDA: marked `gpu` and skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def _inputs(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    r = torch.randn(shape, generator=gen).to(device, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    return x, r, w


def _check_forward_and_grads(shape, dtype, with_residual, device="cpu"):
    x, r, w = _inputs(shape, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    y, h = rms_norm(leaves[0], leaves[2], leaves[1] if with_residual else None, eps=1e-6)
    y_ref, h_ref = rms_norm_reference(ref_leaves[0], ref_leaves[2], ref_leaves[1] if with_residual else None, eps=1e-6)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)  # the residual add is one rounding either way

    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    dh = torch.randn(shape, generator=gen).to(device, dtype)
    # Both outputs feed the loss, as in a decoder block: y into the sub-block, h into the residual stream.
    loss = (y.float() * dy.float()).sum() + ((h.float() * dh.float()).sum() if with_residual else 0)
    loss_ref = (y_ref.float() * dy.float()).sum() + ((h_ref.float() * dh.float()).sum() if with_residual else 0)
    used = [0, 2, 1] if with_residual else [0, 2]
    grads = torch.autograd.grad(loss, [leaves[i] for i in used])
    grads_ref = torch.autograd.grad(loss_ref, [ref_leaves[i] for i in used])
    atol, rtol = GRAD_TOL[dtype]
    for name, g, g_ref in zip(["dx", "dw", "dr"], grads, grads_ref):
        assert g.dtype == g_ref.dtype, name
        torch.testing.assert_close(g, g_ref, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 65), (2, 33, 128), (5, 576)])
def test_forward_and_grads_with_residual(shape, dtype):
    _check_forward_and_grads(shape, dtype, with_residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grads_without_residual(dtype):
    _check_forward_and_grads((4, 7, 96), dtype, with_residual=False)


def test_without_residual_returns_x_itself():
    x, _, w = _inputs((3, 40), torch.float32)
    y, h = rms_norm(x, w)
    assert h is x
    assert y.shape == x.shape


def test_only_residual_stream_used_still_differentiates():
    x, r, w = _inputs((6, 48), torch.float32)
    x.requires_grad_()
    _, h = rms_norm(x, w, r)
    (h * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_fp32_weight_promotes_fp16_output_like_the_reference():
    x, r, _ = _inputs((5, 72), torch.float16)
    w = torch.linspace(0.5, 1.5, 72)  # fp32 weight with fp16 activations: HF promotes the product to fp32
    y, _ = rms_norm(x, w, r)
    y_ref, _ = rms_norm_reference(x, w, r)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_strided_rows_are_read_correctly():
    base = torch.randn(9, 2 * 80)
    x = base[:, :80]  # row stride 160: a view, not a copy
    w = torch.rand(80) + 0.5
    y, _ = rms_norm(x, w)
    torch.testing.assert_close(y, rms_norm_reference(x, w)[0], atol=1e-5, rtol=1e-5)


def test_mismatched_weight_is_refused():
    x, r, _ = _inputs((3, 32), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(31), r)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(32), r.half())


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 65), (16, 4096), (33, 576)])
def test_compiled_on_cuda(shape, dtype):
    _check_forward_and_grads(shape, dtype, with_residual=True, device="cuda")
