"""SwiGLU activation fused: y = silu(g) * u, forward and backward.

    silu(g) = g * sigmoid(g)                                    (Shazeer 2020, "GLU Variants Improve Transformer")
    dy/dg = u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))         dy/du = silu(g)

Unfused, torch reads g, writes silu(g), reads it and u, writes y (and keeps silu(g) for the backward); the
fused kernel reads g and u once and writes y once. The backward recomputes sigmoid(g) instead of storing it.
Math in fp32, storage in the input dtype.

Notation: N rows (all leading dims flattened), F the FFN width.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .utils import (KERNEL_DTYPES, check_same_device, is_hopper, launch_interpreted, refuse_double_backward,
                    runs_interpreted)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels: program (row, column block); rows may be strided (e.g. the two halves of a fused gate_up output).


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,  # (N, F) each, unit column stride
    stride_g, stride_u, stride_y,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,  # (N, F) each, unit column stride
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Autotune configurations: elementwise and memory bound; wider blocks and more warps on Hopper.

_INTERPRETER_BLOCK = 64  # small, so the odd widths of the tests cover several blocks and a ragged last one


def _configs(hopper: bool) -> list[triton.Config]:
    if hopper:
        return [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048) for w in (4, 8)]


@functools.cache
def _tuned_fwd(hopper: bool):
    return triton.autotune(configs=_configs(hopper), key=["n_cols"])(_swiglu_fwd_kernel)


@functools.cache
def _tuned_bwd(hopper: bool):
    return triton.autotune(configs=_configs(hopper), key=["n_cols"])(_swiglu_bwd_kernel)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (N, F) with a unit column stride (a view when possible); F = 0 keeps its N rows."""
    t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(n_rows: int, n_cols: int, interpreted: bool):
    if interpreted:
        return (n_rows, triton.cdiv(n_cols, _INTERPRETER_BLOCK))
    return lambda meta: (n_rows, triton.cdiv(n_cols, meta["BLOCK"]))


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: (..., F) gate and up -> (..., F) silu(gate) * up in gate's dtype."""
    g, u = _rows(gate), _rows(up)  # (N, F)
    n_rows, n_cols = g.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    args = (g, u, y, g.stride(0), u.stride(0), y.stride(0), n_cols)
    if y.numel() > 0:
        if runs_interpreted(gate):
            launch_interpreted(_swiglu_fwd_kernel, _grid(n_rows, n_cols, True), *args, BLOCK=_INTERPRETER_BLOCK)
        else:
            _tuned_fwd(is_hopper(gate.device))[_grid(n_rows, n_cols, False)](*args)
    return y.view(gate.shape)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns (dgate, dup), (..., F) each in the dtypes of gate and up."""
    d, g, u = _rows(dy), _rows(gate), _rows(up)  # (N, F)
    n_rows, n_cols = g.shape
    dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    args = (d, g, u, dg, du, d.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), n_cols)
    if dg.numel() > 0:
        if runs_interpreted(gate):
            launch_interpreted(_swiglu_bwd_kernel, _grid(n_rows, n_cols, True), *args, BLOCK=_INTERPRETER_BLOCK)
        else:
            _tuned_bwd(is_hopper(gate.device))[_grid(n_rows, n_cols, False)](*args)
    return dg.view(gate.shape), du.view(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: forward (gate, up) -> silu(gate) * up; the backward recomputes sigmoid(gate)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("swiglu")
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the Triton kernels (compiled on CUDA, interpreted on CPU); differentiable.

    Args:
        gate, up: (..., F), same shape and dtype (fp32, fp16 or bf16); rows may be strided views.
    Returns:
        (..., F) in the input dtype.
    Raises:
        ValueError: shapes or dtypes that differ, a 0-dim tensor or another dtype.
    """
    _check(gate, up)
    return SwiGLUFunction.apply(gate, up)


def _check(gate, up, dtypes=KERNEL_DTYPES):
    """Raises ValueError unless gate and up are (..., F) of one shape and one of `dtypes` (the kernels' by default)."""
    if gate.dim() == 0 or gate.dtype not in dtypes:
        raise ValueError(f"swiglu: gate and up must be (..., F) in {', '.join(map(str, dtypes))}; got {gate.dtype} "
                         f"{tuple(gate.shape)}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    check_same_device("swiglu", gate=gate, up=up)


# ---------------------------------------------------------------------------------------------------------------------
# Reference


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain torch: silu(gate) * up, the unfused expression of `puzzle.modeling.SwiGLU`; float64 allowed too."""
    _check(gate, up, dtypes=(*KERNEL_DTYPES, torch.float64))
    return torch.nn.functional.silu(gate) * up
