"""The four ops the runtime calls: Triton kernels on CUDA tensors, the plain-torch references elsewhere.

    from puzzle.kernels.ops import rms_norm, swiglu, prefill_attention, decode_attention

`use_triton=None` (the default) picks Triton for CUDA tensors in fp32, fp16 or bf16 and the reference otherwise
(CPU tensors, float64);
`use_triton=True` forces the kernel (on CPU tensors it then runs in Triton's interpreter, slowly: for
tests), `use_triton=False` forces the reference.
"""

from __future__ import annotations

import torch

from . import attention_decode, attention_prefill, rmsnorm
from . import swiglu as swiglu_op
from .utils import KERNEL_DTYPES, needs_grad


def _triton_for(t: torch.Tensor, use_triton: bool | None) -> bool:
    return t.is_cuda and t.dtype in KERNEL_DTYPES if use_triton is None else use_triton


def _attention_triton_for(tensors, use_triton: bool | None) -> bool:
    """As `_triton_for`, but inputs that need a gradient go to the (differentiable) reference by default: the
    attention kernels are forward only (reviewer: on CUDA the output came back detached, on CPU it did not)."""
    if use_triton is None and needs_grad(*tensors):
        return False
    return _triton_for(tensors[0], use_triton)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(x + residual), x + residual); see `rmsnorm.rms_norm` for shapes, dtypes and errors."""
    if _triton_for(x, use_triton):
        return rmsnorm.rms_norm(x, weight, residual, eps)
    return rmsnorm.rms_norm_reference(x, weight, residual, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """silu(gate) * up, (..., F); see `swiglu.swiglu`."""
    if _triton_for(gate, use_triton):
        return swiglu_op.swiglu(gate, up)
    return swiglu_op.swiglu_reference(gate, up)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Causal GQA attention, q (B, H, T, D), k/v (B, G, S, D) -> (B, H, T, D); see `attention_prefill`.

    Raises:
        ValueError: H not a multiple of G (on either path).
    """
    if _attention_triton_for((q, k, v), use_triton):
        return attention_prefill.prefill_attention(q, k, v, scale)
    return attention_prefill.prefill_attention_reference(q, k, v, scale)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: int | torch.Tensor,
    scale: float | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """One query per sequence over a KV cache, q (B, H, 1, D), caches (B, G, S_max, D) -> (B, H, 1, D).

    See `attention_decode.decode_attention` for `lengths` and errors.
    """
    if _attention_triton_for((q, k_cache, v_cache), use_triton):
        return attention_decode.decode_attention(q, k_cache, v_cache, lengths, scale)
    return attention_decode.decode_attention_reference(q, k_cache, v_cache, lengths, scale)
