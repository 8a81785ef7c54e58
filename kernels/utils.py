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
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_twins: dict[object, InterpretedFunction] = {}


def interpreter_twin(kernel) -> InterpretedFunction:
    """The same `@triton.jit` source, run by Triton's interpreter (numpy on the CPU); cached per function."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _twins:
        _twins[kernel.fn] = InterpretedFunction(kernel.fn)
    return _twins[kernel.fn]


@contextlib.contextmanager
def _device_calls_interpreted():
    """While active, a compiled-mode jit function called from interpreted code runs through its twin."""
    original = JITFunction.__call__

    def call_twin(self, *args, **kwargs):
        return interpreter_twin(self)(*args, **kwargs)

    JITFunction.__call__ = call_twin
    try:
        yield
    finally:
        JITFunction.__call__ = original


def launch_interpreted(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Run `kernel` (a `@triton.jit` function) over `grid` in Triton's interpreter; tensors may live on the CPU."""
    with _device_calls_interpreted():
        interpreter_twin(kernel)[grid](*args, **kwargs)


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


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
