"""Fused SwiGLU kernel against silu(g) * u in torch: forward and gradients, fp32 and fp16.

On CPU the kernels run in Triton's interpreter (see test_kernels_rmsnorm.py); bf16 and timing need CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (if this module is the first)

import pytest  # noqa: E402

from puzzle.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def gpu(test):
    """Run only with CUDA: marked `gpu` and skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def _check(shape, dtype, device="cpu", fused_gate_up=False):
    """Kernel vs reference on (gate, up) of `shape`; with fused_gate_up both are strided halves of one tensor."""
    gen = torch.Generator().manual_seed(0)
    *lead, width = shape
    if fused_gate_up:  # the two halves of one (..., 2F) projection: views with row stride 2F
        gu = (2 * torch.randn(*lead, 2 * width, generator=gen)).to(device, dtype)
        leaves = [gu.clone().requires_grad_(), gu.clone().requires_grad_()]
        split = [leaf.chunk(2, dim=-1) for leaf in leaves]
    else:
        g = (2 * torch.randn(shape, generator=gen)).to(device, dtype)
        u = torch.randn(shape, generator=gen).to(device, dtype)
        leaves = [t.clone().requires_grad_() for t in (g, u, g, u)]
        split = [leaves[:2], leaves[2:]]
    y, y_ref = swiglu(*split[0]), swiglu_reference(*split[1])
    assert y.dtype == dtype and y.shape == tuple(shape)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)

    dy = torch.randn(shape, generator=gen).to(device, dtype)
    n = len(leaves) // 2
    grads = torch.autograd.grad(y, leaves[:n], dy)
    grads_ref = torch.autograd.grad(y_ref, leaves[n:], dy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (2, 5, 130), (3, 1536)])
def test_forward_and_grads(shape, dtype):
    _check(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_halves_of_a_fused_gate_up_projection(dtype):
    _check((3, 5, 97), dtype, fused_gate_up=True)


def test_large_activations_do_not_overflow_in_fp16():
    g = torch.tensor([[-60.0, -10.0, 0.0, 10.0, 60.0]], dtype=torch.float16)
    u = torch.full_like(g, 2.0)
    y = swiglu(g, u)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, swiglu_reference(g, u), atol=2e-3, rtol=2e-3)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33), (64, 14336), (2048, 1536)])
def test_compiled_on_cuda(shape, dtype):
    _check(shape, dtype, device="cuda")
