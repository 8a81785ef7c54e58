"""What every kernel file shares: where a launch runs (compiled or in Triton's interpreter) and GPU facts.

Each kernel is written once with `@triton.jit`. On CUDA tensors the launcher calls the compiled,
autotuned kernel; on CPU tensors (tests, machines without a GPU) it calls the same source in Triton's
interpreter. `triton.jit` decides compiled-or-interpreted once, when the decorator runs, from
`TRITON_INTERPRET`; that holds for our kernels and for triton.language's own jit functions (`tl.sum`,
`tl.max`, `tl.sigmoid`, ...), decorated when triton is first imported. So `launch_interpreted` builds
the interpreter twin explicitly and, for the duration of the launch, runs any compiled-mode jit function
that the kernel calls through the interpreter too: CPU tensors work whatever `TRITON_INTERPRET` was when
triton was imported.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl  # noqa: F401  (read by _patch_lang through this module's globals)
from triton.language import core as tl_core  # noqa: F401  (read by _patch_lang through this module's globals)
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

#: the dtypes the kernels compute in (the plain-torch references also take float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_twins: dict[object, InterpretedFunction] = {}


def interpreter_twin(kernel) -> InterpretedFunction:
    """The same `@triton.jit` source, run by Triton's interpreter (numpy on the CPU); cached per function."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _twins:
        _twins[kernel.fn] = InterpretedFunction(kernel.fn)
    return _twins[kernel.fn]


def _lang_anchor():
    """Never called: its globals (this module's) hold both `triton.language` and `triton.language.core`."""


@contextlib.contextmanager
def _device_calls_interpreted():
    """While active, jit functions called from interpreted code run through their twins, without re-patching.

    Triton's interpreter swaps `triton.language` for numpy-backed versions around a launch, and again at every
    device-function call (`tl.sum`, `tl.max`, `tl.sigmoid`, ... are jit functions): about 10 ms per call, which
    dominated interpreted runs, and it never restores what a device call patched (`triton.language.core` stayed
    patched after the launch, which breaks a later compiled launch in the same process). Here both language
    modules are patched once for the whole launch and restored afterwards; device calls skip the patching.
    Falls back to triton's own behaviour where its interpreter internals differ (other triton versions).
    """
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope = patch_lang(_lang_anchor) if patch_lang is not None else None
    originals = (JITFunction.__call__, InterpretedFunction.__call__)
    fast = scope is not None and hasattr(scope, "restore")

    def call_twin(self, *args, **kwargs):
        twin = interpreter_twin(self)
        if not fast:
            return originals[1](twin, *args, **kwargs)
        try:
            return twin.rewrite()(*args, **kwargs)
        except Exception as e:  # the same wrapping as InterpretedFunction.__call__
            raise interpreter.InterpreterError(repr(e)) from e

    JITFunction.__call__ = call_twin
    InterpretedFunction.__call__ = call_twin
    try:
        yield
    finally:
        JITFunction.__call__, InterpretedFunction.__call__ = originals
        if fast:
            scope.restore()


def _float32_twin(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`t`'s storage span (from its first element to its last, gaps included) as a 1-D view, an fp32 copy of that
    span, the copy's bits before the launch, and `t`'s shape and strides laid over the copy: the kernel's pointer
    arithmetic (from `t`'s strides, passed separately) lands on the same elements."""
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) if t.numel() else 0
    flat = torch.as_strided(t, (span,), (1,))  # t's storage offset is kept
    copy = flat.float()
    return flat, copy, copy.view(torch.int32).clone(), torch.as_strided(copy, t.shape, t.stride(), 0)


def launch_interpreted(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Run `kernel` (a `@triton.jit` function) over `grid` in Triton's interpreter; tensors may live on the CPU.

    bfloat16 tensors run as float32: Triton's interpreter holds bf16 as raw 16-bit integers, so its arithmetic on
    them is wrong (`x + r` gave NaN, attention scores 8e8 off; triton 3.x `interpreter.py`) and its fp32 -> bf16
    stores truncate. Each bf16 tensor argument is copied to fp32 (exact), the kernel runs on the copies, and the
    elements the kernel wrote (their bits changed) are rounded back into their tensor (round to nearest even), as a
    compiled kernel that computes in fp32 would store them; inputs are not written (a NaN in them included), and
    outputs that are interleaved views of one buffer each get only their own elements back. Casts to the input
    dtype inside the kernel stay in fp32.
    """
    twins: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def swap(a):
        if not (isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16):
            return a
        if id(a) not in twins:  # one tensor given twice (an input that is also the output) gets one copy
            twins[id(a)] = _float32_twin(a)
        return twins[id(a)][3]

    args, kwargs = tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}
    with _device_calls_interpreted():
        interpreter_twin(kernel)[grid](*args, **kwargs)
    for flat, copy, before, _ in twins.values():
        written = copy.view(torch.int32) != before  # (span,) the elements the kernel stored
        if written.any():
            flat[written] = copy[written].to(torch.bfloat16)


def interpret_requested() -> bool:
    """True when the user asked for the interpreter everywhere (`TRITON_INTERPRET=1`)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4 reads the variable through its knobs
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_interpreted(t: torch.Tensor) -> bool:
    """A launch on `t` runs in the interpreter: `t` is not on a GPU, or the interpreter was requested."""
    return t.device.type == "cpu" or interpret_requested()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def is_hopper(device: torch.device) -> bool:
    """True on compute capability 9.x (H100, H200, GH200): the devices the larger configs are tuned for."""
    return device.type == "cuda" and _capability(_index(device))[0] == 9


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_hint(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 8 for a CPU device (the interpreter), to keep CPU runs short."""
    if device.type != "cuda":
        return 8
    return _sm_count(_index(device))


def wide_rows(t: torch.Tensor, block_d: int) -> bool:
    """Whether `t`'s head rows, padded to `block_d` elements, take more than 512 bytes (fp32 with head_dim over 128,
    16-bit over 256): the attention kernels then take their wide tiles, which fit an SM's shared memory."""
    return t.element_size() * block_d > 512


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd is on and some of `tensors` requires grad (an output would need a backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def refuse_double_backward(name: str) -> None:
    """Called first in a Triton backward: with create_graph=True (autograd on inside the backward) the gradient would
    come back without a graph, so a second derivative built on it would be dropped without a word (breaker:
    `once_differentiable` raised only when nothing else was backpropagated with it).

    Raises:
        RuntimeError: autograd is on, i.e. the gradient was asked for with create_graph=True."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: the Triton backward is not differentiable (a gradient asked for with "
                           f"create_graph=True); use the reference (`ops` with use_triton=False) for higher "
                           f"derivatives")


def check_same_device(name: str, **tensors) -> None:
    """Refuse tensors on more than one device (None entries are skipped): a kernel launch would read another
    device's memory, and the error came from deep inside torch or Triton (breaker: a meta weight).

    Raises:
        ValueError: naming each tensor's device."""
    given = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len({t.device for t in given.values()}) > 1:
        raise ValueError(f"{name}: the tensors are on different devices ("
                         f"{', '.join(f'{k} on {t.device}' for k, t in given.items())}); move them to one device")


def softmax_scale(name: str, scale, head_dim: int) -> float:
    """The softmax scale as a Python float: 1 / sqrt(head_dim) when `scale` is None; a number or a one-element tensor
    otherwise (breaker: a 0-dim tensor failed inside Triton's interpreter).

    Raises:
        ValueError: a head dim of 0 (1 / sqrt(0)), or a scale that is not one real number."""
    import math

    if head_dim < 1:
        raise ValueError(f"{name}: head dim D = {head_dim}; give q, k and v at least one feature per head")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return real_number(name, "scale", scale)


def real_number(name: str, what: str, value, least: float = -float("inf")) -> float:
    """`value` (a number or a one-element tensor) as a Python float, for a kernel's scalar argument.

    Raises:
        ValueError: not one finite real number (text, a bool, None, a tensor of several values), or below `least`."""
    import math

    try:
        number = None if isinstance(value, (str, bytes, bool)) else float(value)  # not "0.5" or True
    except (TypeError, ValueError, RuntimeError):
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}: {what} must be a finite real number (or a one-element tensor); got {value!r}")
    if number < least:
        raise ValueError(f"{name}: {what} must be at least {least:g}; got {number:g}")
    return number


def check_forward_only(name: str, *tensors: torch.Tensor) -> None:
    """Refuse inputs a forward-only kernel would detach: with autograd on, a tensor that requires grad would get
    an output without a graph (the attention kernels have no backward; `ops` sends such inputs to the reference).

    Raises:
        ValueError: autograd is on and some input requires grad, or a dtype the kernels do not take."""
    if needs_grad(*tensors):
        raise ValueError(f"{name}: the Triton kernel has no backward, and an input requires grad; run it under "
                         f"torch.no_grad() or use the reference (ops with use_triton=None picks it)")
    if tensors[0].dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: the Triton kernel takes fp32, fp16 or bf16; got {tensors[0].dtype}")
