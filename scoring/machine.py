"""The machine's own speed, timed next to every CPU measurement: a fingerprint that flags drift.

Speed-ups are ratios taken within one session (every timing interleaves the models or variants it
compares), so a machine that is uniformly slower in one session than in another changes nothing.
But a cost table timed in one session predicts whole-model speed-ups measured in another, and a
shared machine does not slow down uniformly: on the project's 2-core VM, one session ran the parent
39 % slower than the session before and the children 15-31 % slower (memory-bound work suffers more
from a neighbour on the host), with no CPU contention visible (`cost.Contention` read 0.015
cores), and every measured speed-up came out 4-14 % above the table's prediction. Nothing on the
CPUs the measurement may use shows such a slowdown; only the work itself does.

So every CPU timing window also runs a fixed reference workload (`ReferenceProbe`), in two parts:

    compute_ms   REFERENCE_PRODUCTS fp32 products (256, 256) @ (256, 256) into a preallocated
                 output (0.67 GFLOP; 768 KiB of operands, cache resident): core speed
    memory_ms    one copy of a float32 buffer of max(64 MiB, 2 x last-level cache) into another
                 (read and write from DRAM): memory bandwidth

with the measurement's own thread count (whole-model measurements also take one between every two
models of a round, so that the samples spread over the measurement: a few seconds of a slow machine
must not speak for all of it). The medians over the kept windows go into the table's
attrs / sidecar (`reference_compute_ms`, `reference_memory_ms`), and `machine_drift` compares two
measurements' fingerprints: a ratio away from 1 by more than DRIFT_WARN, either way (1.3x as long or as fast),
means the machine ran at a different speed, and speed-ups taken across the two may disagree by about that much.

Measured on the 2-core VM (`python benchmarks/contention.py --out DIR --only fingerprint`, two runs;
this process and a 1-thread SwiGLU decode pinned to CPU 0, the neighbour pinned to CPU 1, outside the
process's affinity, so `Contention` reads 0.001-0.010 cores throughout): next to a memory-streaming
loop the decode ran 1.47 / 1.39 x as long as idle and memory_ms 1.25 / 1.68 x; next to a busy loop
1.12 / 0.97 x and 1.12 / 0.99 x; idle again 1.02 / 0.96 x and 1.02 / 1.02 x.

The machine's own speed also wanders over seconds, which sets how large a drift means anything. On
the idle VM, 12 back-to-back batches of 15 samples had medians up to 1.28 x (compute) and 1.39 x
(memory) apart at 2 threads, 1.47 / 1.37 x at 1 thread (single samples: IQR 13-20 % of the median),
and two tiny-model measurements a few seconds apart (5 samples each) read up to 1.29 / 0.68 x of
each other. Hence DRIFT_WARN = 0.30: the check catches a host-level slowdown like the 39 % above or
a strong bandwidth neighbour, not a drift of 10-20 %, which on this machine is within its wander.
That wander comes in spells: in 10 batches of 7 samples, each sample after a forward of the SmolLM2
parent, one batch read 1.7 x the others' median, in four probe sizes alike (256^2 x 20, 512^2 x 20,
256^2 x 80, 1024^2 x 3 products), so a bigger probe would not help; samples spread over time do.
With one sample per 16 s round plus 4 back-to-back top-up samples, the demo's whole-model
measurement read compute 1.73 x the cost table on an idle machine while its models ran 1.16-1.20 x
the table's prediction; six back-to-back measurements of the demo's parent and 5 children (3 rounds)
read compute 0.93-1.19 x and memory 0.67-1.69 x that way, and 0.94-1.07 x / 0.99-1.08 x with the
samples between models (18 per measurement), while the models ran 1.08-1.17 x the prediction in
both (whole-model overhead the summed table does not hold, not machine drift).
CPU workloads only: a CUDA measurement times device work, which this probe does not represent.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping

import numpy as np
import torch

REFERENCE_N = 256  # side of the compute part's square fp32 matrices
REFERENCE_PRODUCTS = 20  # products per compute sample (about 8 ms at 1 thread on the 2-core VM)
REFERENCE_MIN_BYTES = 64 * 2**20  # smallest buffer the memory part copies
DRIFT_WARN = 0.30  # max(ratio, 1 / ratio) - 1 of a fingerprint part above which two measurements are said to differ
PARTS = ("compute", "memory")

_buffers: dict[int, tuple[torch.Tensor, ...]] = {}


def reference_bytes(last_level_cache: int) -> int:
    """Bytes the memory part copies: max(REFERENCE_MIN_BYTES, 2 x the last-level cache)."""
    return max(REFERENCE_MIN_BYTES, 2 * int(last_level_cache))


class ReferenceProbe:
    """Times the fixed reference workload; one `sample()` per measurement window.

    Buffers are allocated on first use and kept for the process (2 x `reference_bytes` plus
    768 KiB), so repeated measurements do not page-fault them in again. Call under the
    measurement's thread setting (`torch.set_num_threads`).
    """

    def __init__(self, last_level_cache: int):
        self.nbytes = reference_bytes(last_level_cache)
        if self.nbytes not in _buffers:
            self._allocate()
        self.a, self.b, self.out, self.src, self.dst = _buffers[self.nbytes]

    @torch.inference_mode(False)  # normal tensors: usable in and out of inference mode alike
    def _allocate(self) -> None:
        g = torch.Generator().manual_seed(0)
        f32 = dict(dtype=torch.float32, device="cpu")  # whatever torch's default dtype is
        a = torch.randn(REFERENCE_N, REFERENCE_N, generator=g, **f32)  # (n, n) float32
        b = torch.randn(REFERENCE_N, REFERENCE_N, generator=g, **f32)
        src = torch.ones(self.nbytes // 4, **f32)  # (nbytes / 4,) float32, touched: no page faults later
        _buffers[self.nbytes] = (a, b, torch.empty_like(a), src, torch.zeros_like(src))

    @torch.no_grad()
    def sample(self) -> tuple[float, float]:
        """One timing of each part: (compute_ms, memory_ms), wall clock.

        One untimed product first: right after other work the first product ran 12-16 % slower
        at 2 threads (the thread pool waking up), which would set windows that follow work apart
        from samples taken back to back."""
        torch.mm(self.a, self.b, out=self.out)
        t0 = time.perf_counter()
        for _ in range(REFERENCE_PRODUCTS):
            torch.mm(self.a, self.b, out=self.out)
        t1 = time.perf_counter()
        self.dst.copy_(self.src)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def meta(self) -> dict:
        """What the fingerprint's figures are comparable under (same sizes; compare with the same threads)."""
        return {"reference_bytes": self.nbytes, "reference_products": REFERENCE_PRODUCTS, "reference_n": REFERENCE_N}


def summarize(samples: list[tuple[float, float]]) -> dict:
    """Medians of a measurement's probe samples: {"reference_compute_ms", "reference_memory_ms"}
    (NaN when there are none) and "reference_samples"."""
    arr = np.asarray(samples, dtype=float).reshape(-1, 2)
    med = np.median(arr, axis=0) if len(arr) else np.full(2, math.nan)
    return {"reference_compute_ms": float(med[0]), "reference_memory_ms": float(med[1]), "reference_samples": len(arr)}


def machine_record(attrs: Mapping) -> dict:
    """The fingerprint entries of a measurement's attrs or sidecar, JSON-ready: timings as floats
    (ms, 3 decimals), counts and sizes as ints; entries that are not finite numbers > 0 (strings,
    bools, NaN, negatives, hand edits) are left out. {} when there are none."""
    out = {}
    for key in ("reference_compute_ms", "reference_memory_ms", "reference_samples", "reference_bytes"):
        value = _finite_positive(attrs.get(key))
        if value is not None:
            out[key] = round(value, 3) if key.endswith("_ms") else int(value)
    return out


def _finite_positive(value) -> float | None:
    """`value` as a float if it is a real number (not a bool or a string), finite and > 0; else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    v = float(value)
    return v if math.isfinite(v) and v > 0 else None


def machine_drift(before: Mapping, after: Mapping) -> dict[str, float]:
    """How much slower each part of the fingerprint ran in `after` than in `before`.

    Args:
        before, after: mappings holding `reference_compute_ms` / `reference_memory_ms` (a table's
            attrs or sidecar, a row of remeasure.csv); missing, non-numeric or non-positive values
            give NaN for that part, as do fingerprints of different sizes (`reference_bytes`).

    Returns:
        {"compute": after / before, "memory": after / before}: 1.3 means 30 % slower in `after`.
    """
    out = {}
    sizes = before.get("reference_bytes"), after.get("reference_bytes")
    same_size = None in sizes or sizes[0] == sizes[1]
    for part in PARTS:
        key = f"reference_{part}_ms"
        b, a = _finite_positive(before.get(key)), _finite_positive(after.get(key))
        ratio = a / b if (a is not None and b is not None and same_size) else math.nan
        out[part] = ratio if math.isfinite(ratio) else math.nan
    return out


def drift_message(drift: Mapping[str, float], before: str, after: str) -> str | None:
    """A sentence for the user when a part of `machine_drift` is off by more than DRIFT_WARN; else None."""
    # either way by the same factor: 0.72x as long is 1.39x as fast (a fresh user: no warning, the README said 30 %)
    off = {p: r for p, r in drift.items() if not math.isnan(r) and r > 0 and max(r, 1 / r) - 1 > DRIFT_WARN}
    if not off:
        return None
    parts = ", ".join(f"its {p} part took {r:.2f}x as long" + ("" if r > 1 else f", {1 / r:.2f}x as fast")
                      for p, r in off.items())  # reviewer: 0.29 read "71% faster" for 3.4x as fast
    return (f"the machine ran at another speed during {after} than during {before} ({parts}, by a fixed "
            f"reference workload timed with both): speed-ups that set one against the other may be off by about as "
            f"much. Time them again when the machine is quiet (other jobs, on this host too, share its memory bandwidth).")
