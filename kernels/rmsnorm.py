"""RMSNorm fused with the residual add: h = x + r, y = norm(h) * w, forward and backward.

    h = x + r                                  (..., C)   in the input dtype, as an unfused block adds
    rstd = 1 / sqrt(mean(h^2) + eps)           (...,)     fp32
    y = w * (h * rstd).to(dtype)               (..., C)   the HF Llama / `puzzle.modeling.RMSNorm` order

RMSNorm: Zhang & Sennrich 2019. Fusing the residual add saves one read and one write of the residual
stream per sub-block (as in Liger-Kernel and vLLM's `fused_add_rms_norm`).

Backward, per row, with xhat = h * rstd and g = dy * w (all fp32):
    dh = rstd * (g - xhat * mean(g * xhat)) + dh_out        dx = dr = dh
    dw = sum over rows of dy * xhat
where dh_out is the gradient that reaches the returned h (the residual stream downstream).

Notation: N rows (all leading dims flattened), C hidden size.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .utils import (KERNEL_DTYPES, check_same_device, is_hopper, launch_interpreted, next_power_of_2, num_programs_hint,
                    real_number, refuse_double_backward, runs_interpreted)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,  # X, R, H: (N, C) rows with unit column stride; W: (C,); Y: (N, C); RSTD: (N,) fp32
    stride_x, stride_r, stride_y, stride_h,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = h + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)  # added in the input dtype
        tl.store(H + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    xhat = (hf * rstd).to(h.dtype).to(tl.float32)  # rounded to the input dtype before the weight, as HF does
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH_OUT, H, W, RSTD, DH, DW_PART,  # DY, DH_OUT, H, DH: (N, C); W: (C,); RSTD: (N,); DW_PART: (P, C) fp32
    stride_dy, stride_dho, stride_h, stride_dh,
    n_rows, n_cols, rows_per_program,
    HAS_DH_OUT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds: row * stride may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = h * rstd
        g = dy * w
        dh = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + row * stride_dho + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + row * stride_dh + cols, dh.to(DH.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Autotune configurations: the kernels are memory bound; only the warps per row change.


def _configs(hopper: bool) -> list[triton.Config]:
    warps = (4, 8, 16) if hopper else (4, 8)
    return [triton.Config({}, num_warps=w) for w in warps]


@functools.cache
def _tuned_fwd(hopper: bool):
    return triton.autotune(configs=_configs(hopper), key=["BLOCK_C", "HAS_RESIDUAL"])(_rms_norm_fwd_kernel)


@functools.cache
def _tuned_bwd(hopper: bool):
    return triton.autotune(configs=_configs(hopper), key=["BLOCK_C", "HAS_DH_OUT"])(_rms_norm_bwd_kernel)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C) with a unit column stride (a view when possible); C = 0 keeps its N rows."""
    t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns y (N, C), h (N, C) and rstd (N,) fp32 (x itself is h without residual)."""
    x2 = _rows(x)  # (N, C)
    n_rows, n_cols = x2.shape
    r2 = _rows(residual) if residual is not None else x2
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = torch.empty_like(x2) if residual is not None else x2
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_c = next_power_of_2(n_cols)
    args = (x2, r2, weight, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n_cols, eps)
    if n_rows > 0 and n_cols > 0:  # (N, 0) rows: nothing to normalise
        if runs_interpreted(x):
            launch_interpreted(_rms_norm_fwd_kernel, (n_rows,), *args, HAS_RESIDUAL=residual is not None, BLOCK_C=block_c)
        else:
            _tuned_fwd(is_hopper(x.device))[(n_rows,)](*args, HAS_RESIDUAL=residual is not None, BLOCK_C=block_c)
    return y, h, rstd


def rms_norm_bwd(
    dy: torch.Tensor, dh_out: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on (N, C) rows: returns dh (N, C) in h's dtype and dw (C,) in weight's dtype."""
    dy = _rows(dy)
    dh_out = _rows(dh_out) if dh_out is not None else None
    n_rows, n_cols = h.shape
    n_programs = max(1, min(n_rows, num_programs_hint(h.device)))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dh = torch.empty_like(h)
    dw_part = torch.empty((n_programs, n_cols), dtype=torch.float32, device=h.device)  # (P, C)
    dho = dh_out if dh_out is not None else dy
    args = (dy, dho, h, weight, rstd, dh, dw_part, dy.stride(0), dho.stride(0), h.stride(0), dh.stride(0),
            n_rows, n_cols, rows_per_program)
    block_c = next_power_of_2(n_cols)
    if n_rows > 0 and n_cols > 0:
        if runs_interpreted(h):
            launch_interpreted(_rms_norm_bwd_kernel, (n_programs,), *args, HAS_DH_OUT=dh_out is not None, BLOCK_C=block_c)
        else:
            _tuned_bwd(is_hopper(h.device))[(n_programs,)](*args, HAS_DH_OUT=dh_out is not None, BLOCK_C=block_c)
    else:
        dw_part.zero_()
    return dh, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: forward (x, weight, residual, eps) -> y, or (y, h) with a residual; backward gives dx, dw, dr."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        weight = weight.contiguous()  # the kernels read it as C consecutive values (a strided view read others)
        y, h, rstd = rms_norm_fwd(x, weight, residual, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused h costs no zero tensor in the backward
        ctx.has_residual = residual is not None
        ctx.shape = x.shape
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        refuse_double_backward("rms_norm")
        h, weight, rstd = ctx.saved_tensors
        if dy is None:  # only h was used downstream
            dy = torch.zeros_like(h)
        dh, dw = rms_norm_bwd(dy, dh_out, h, weight, rstd)
        dh = dh.view(ctx.shape)
        return dh, dw, (dh if ctx.has_residual else None), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add and RMSNorm with the Triton kernels (compiled on CUDA, interpreted on CPU).

    Args:
        x: (..., C) fp32, fp16 or bf16; at least one dimension.
        weight: (C,) fp32, fp16, bf16 or float64, any stride; the output dtype is the promotion of x's and weight's.
        residual: optional (..., C), same shape and dtype as x, added to x before the norm.
        eps: added to the mean square: a number >= 0, or a one-element tensor.
    Returns:
        y: (..., C) = weight * norm(x + residual);
        h: (..., C) = x + residual in x's dtype (the new residual stream); x itself when residual is None.
    Raises:
        ValueError: shapes or dtypes that do not match, a 0-dim x, an x not in fp32/fp16/bf16, an eps that is not
            one finite number >= 0.
    """
    _check(x, weight, residual)
    eps = real_number("rms_norm", "eps", eps, least=0.0)  # breaker: a tensor eps failed inside Triton's interpreter
    if residual is None:
        return RMSNormFunction.apply(x, weight, None, eps), x
    return RMSNormFunction.apply(x, weight, residual, eps)


def _check(x, weight, residual, dtypes=KERNEL_DTYPES):
    """Raises ValueError unless x is (..., C) in `dtypes` (the kernels': fp32, fp16, bf16), weight (C,) in those or
    float64, and residual None or x's shape and dtype."""
    if x.dim() == 0 or x.dtype not in dtypes or weight.dtype not in (*KERNEL_DTYPES, torch.float64):
        raise ValueError(f"rms_norm: x must be (..., C) in {', '.join(map(str, dtypes))} and weight fp32, fp16, bf16 "
                         f"or float64; got x {x.dtype} {tuple(x.shape)}, weight {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}; expected ({x.shape[-1]},) for x {tuple(x.shape)}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    check_same_device("rms_norm", x=x, weight=weight, residual=residual)


# ---------------------------------------------------------------------------------------------------------------------
# Reference


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the same contract as `rms_norm` (differentiable by torch autograd), float64 allowed too (computed
    in float64; other dtypes in fp32)."""
    _check(x, weight, residual, dtypes=(*KERNEL_DTYPES, torch.float64))
    eps = real_number("rms_norm", "eps", eps, least=0.0)
    h = x if residual is None else x + residual  # (..., C)
    hf = h.to(torch.promote_types(h.dtype, torch.float32))  # breaker: float64 went through fp32 (gradcheck failed)
    xhat = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xhat.to(h.dtype), h
