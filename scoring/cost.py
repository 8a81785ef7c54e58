"""Measured hardware cost of candidate subblocks and of whole models, for a declared workload.

A *workload* is (device, dtype, batch size B, prompt length P, generated tokens G). Its runtime is
the latency of one request: a prefill of the (B, P) prompt followed by G greedy decode steps,
embedding, final norm, LM head and argmax included (issue 2). Per subblock variant:

    prefill_ms   latency of the subblock, RMSNorm and residual add included, on a (B, P, C) input
                 (GQA attention also writes its keys and values into a KVCache)
    decode_ms    latency of one decode step on (B, 1, C); GQA attends over a KVCache holding
                 C_ctx = P + G // 2 positions, the mean context over the G steps (attention cost is
                 linear in the context, so the mean context gives the mean step)
    runtime_ms   prefill_ms + G * decode_ms
    memory_mib   parameter bytes + KV cache at (B, P + G), both in the workload dtype (memory.py)
    params       parameters, RMSNorm included; a no_op variant costs 0 everywhere

The non-block part (embedding lookup, RoPE tables, cache bookkeeping, per-layer dispatch, final
norm, LM head on the last position only, argmax) is measured once. A child's predicted cost is the
non-block cost plus the sum of its subblocks' rows (`select_rows`, `predict_totals`);
`measure_model` measures the real child and `additivity_report` compares the two.

Why the sum of parts matches the whole. Every timed piece runs the code the model runs:
`DecoderBlock.forward` evaluates `h + attn(input_layernorm(h), cos, sin, cache)` and
`h + mlp(post_attention_layernorm(h))`, and that expression, on modules built by
`puzzle.modeling` (GQAAttention with a real KVCache, SwiGLU, LinearAttention, LinearFFN,
RMSNorm), is what a subblock sample times. The non-block cost is `PuzzleForCausalLM.forward` (with
`logits_to_keep=1`) plus the argmax, run on a model of the same depth whose layers are all no_op:
it holds everything the forward does around the subblocks, including the loop over the layers and
each layer's module call, so these are counted once and not once per subblock. What remains
outside the sum is a few hundred nanoseconds per layer of the `if` tests in `DecoderBlock.forward`.

Python overhead is therefore included, on purpose and in the same amount as in the model: a
GQA subblock is about 35 ATen ops (projections, RoPE, cache writes, repeat_interleave, SDPA,
RMSNorm, residual) and SwiGLU about 12, each with its Python and dispatch cost. On the 2-core
development VM a tiny model's decode step (where that overhead is all there is) measured
~0.45 ms per GQA subblock and ~0.17 ms per SwiGLU; leaving it out would make cheap variants look
cheaper than they are in the model. In that Python-bound regime the sum of parts still runs
~15-25% under the whole model: a subblock called in a tight loop keeps the interpreter's and the
branch predictor's state warm, which the long, varied forward of a real model does not. Where the
subblocks do real work (a SmolLM2-sized parent: milliseconds per subblock) this is a few percent.

Cache effects. A decode step streams every layer's weights once, so in the model each subblock
finds its weights cold in the last-level cache. A subblock timed alone in a loop would find them
hot and look faster than it is. Decode samples therefore cycle through copies of the subblock (each
with its own KV cache) whose weights together exceed twice the last-level cache (L3 on a CPU, L2
on a GPU); the sample is the mean over the copies. Prefill reuses each weight B*P times, is
compute bound, and is timed on one copy at a time (rotating), with its input read just before, as
the model's input was just written by the previous subblock.

Allocator. glibc's malloc, left to itself, gives the free top of its heap back to the OS and
page-faults it in again on the next large activation. In a whole-model prefill this happens over
and over (5-25% extra time on a SmolLM2-sized parent, depending on the order of allocations), while
a subblock timed alone reuses its freed buffers and never faults. Measurements therefore pin the
allocator first (`steady_allocator`), so that both the parts and the whole run fault-free.

Noise. Shared machines are noisy, so samples of all variants are interleaved: every repeat runs
one sample of each variant in a fresh random order, and the reported figure is the median over the
repeats, with the interquartile range as the spread (`*_iqr_ms`). Threads are fixed with
`torch.set_num_threads` while measuring and restored afterwards. On CUDA, samples are timed with
CUDA events after a synchronize. On a CPU two clocks are offered:

    clock="wall"  time.perf_counter: the latency a user sees (the default).
    clock="cpu"   time.process_time of this process, with one thread only: the time the work took
                  on the core, without the time the OS gave to other processes. On a loaded,
                  shared machine it estimates the latency of an idle one far more steadily than
                  the wall clock; it still includes memory-bandwidth and cache contention.

Compare a prediction only with a measurement taken with the same clock and threads.

Other processes. Interleaving protects the *ratios* between variants from slow drift, not from
another job that takes cores the measurement needs: then every variant runs slower, but not by
the same factor (small, Python-bound pieces suffer more from a descheduled thread than long
matrix products), and the table mispredicts. Measured on the 2-core VM: a cost table taken while
two 1-thread BLD jobs ran predicted speed-ups of 1.25 / 1.5 / 2 / 3 for children that, measured
alone, ran 1.08 / 1.33 / 1.68 / 2.07 times faster than the parent. So on Linux CPU workloads
every timing window (one round, or consecutive rounds adding up to at least `MIN_WINDOW_S`) is
checked with `Contention`: the CPU time the CPUs this process may use spent busy (/proc/stat, the
hypervisor's steal time included) minus this process's own, per second, also on cores the
measurement leaves idle (a neighbour there still takes cache and memory bandwidth). A window whose contention exceeds `max_contention` cores (default 0.25)
is dropped and measured again after a short pause; after `GIVE_UP_WINDOWS` contended windows in
a row the measurement raises PuzzleError, saying what to stop. /proc/stat counts in 10 ms ticks,
so a window shorter than MIN_WINDOW_S (the last one, or all of a tiny model's) is judged against
the limit plus its tick noise (`Contention.tick_noise`). The contention of the kept windows (max
over those of at least MIN_WINDOW_S) and the number of rounds dropped go into the table's attrs.

What was measured (2-vCPU shared VM, SmolLM2-sized random parent, B=4, P=256, G=64, fp32; the
whole space of 3 attention and 6 FFN variants takes 4-13 s at the default 5 repeats). Timed in
one process, side by side, a subblock alone and the same subblock inside the real model agree
within 5-9% (decode step of the parent: 292 ms predicted, 278 ms measured). End to end, over 15
child measurements in 3 sessions, the runtime error was 0-12.5% (median 3.7%, 12 of 15 within
10%), and it was dominated by the machine's own drift between the table and the whole-model runs
(the same child measured 15-20% apart minutes later), not by the method. On such a machine,
measure the parent with the children (`measure_models`) and read `ratio_error` in
`additivity_report`. Not yet measured on a GPU.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import math
import numbers
import os
import platform
import re
import resource
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from puzzle.architecture import ArchitectureError, AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.errors import PuzzleError
from puzzle.modeling import DecoderBlock, KVCache, PuzzleForCausalLM, RotaryEmbedding

from . import memory
from .machine import ReferenceProbe, summarize

COST_COLUMNS = ("prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params")
TABLE_COLUMNS = ("subblock", "variant", *COST_COLUMNS, "prefill_iqr_ms", "decode_iqr_ms")
RUNNABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLOCKS = ("wall", "cpu")


# ------------------------------------------------------------------------------------------------
# The workload


@dataclass(frozen=True)
class Workload:
    """What the child is built for: a request is a prefill of (B, P) tokens, then G decode steps.

    Attributes:
        batch_size: B sequences per request.
        prompt_len: P prompt tokens per sequence.
        gen_len: G generated tokens (decode steps) per sequence.
        dtype: weights, activations and KV cache: "float32", "bfloat16" or "float16" (fp32/bf16/fp16
            accepted and stored canonically).
        device: "cpu", "cuda" or "cuda:N". CUDA availability is checked when measuring, so a
            workload for another machine can still be declared (to read or check its tables).
        num_threads: CPU threads while measuring; None uses torch's current setting.

    Raises:
        PuzzleError: a size below 1, an unknown dtype or device, or fp8 (a storage format in
            `memory.py`, not a dtype the model runs in).
    """

    batch_size: int
    prompt_len: int
    gen_len: int
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "prompt_len", "gen_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PuzzleError(f"workload {name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        dtype = memory.canonical_dtype(self.dtype)
        if dtype not in RUNNABLE_DTYPES:
            raise PuzzleError(f"workload dtype {self.dtype!r} is a storage format only; measure in one of "
                              f"{', '.join(RUNNABLE_DTYPES)} and use scoring.memory for {dtype} weights or KV cache")
        object.__setattr__(self, "dtype", dtype)
        device = str(self.device)
        if not is_device_name(device):
            raise PuzzleError(f"workload device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        object.__setattr__(self, "device", device)
        if self.num_threads is not None:
            if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, (int, np.integer)) or self.num_threads < 1:
                raise PuzzleError(f"workload num_threads must be an integer >= 1 or None, got {self.num_threads!r}")
            object.__setattr__(self, "num_threads", int(self.num_threads))

    @property
    def decode_context(self) -> int:
        """C_ctx = P + G // 2: the cached positions of the mean decode step."""
        return self.prompt_len + self.gen_len // 2

    @property
    def kv_len(self) -> int:
        """P + G: the positions the KV cache holds at the end of the request (memory is sized for it)."""
        return self.prompt_len + self.gen_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return RUNNABLE_DTYPES[self.dtype]

    def threads(self) -> int:
        """The CPU thread count used while measuring."""
        return int(self.num_threads) if self.num_threads is not None else torch.get_num_threads()

    def meta(self) -> dict:
        """JSON-ready sidecar for a cost table: the workload, the device's name and the software.

        device_name is None for a CUDA device on a machine without CUDA.
        """
        return {
            "device": self.device, "device_name": device_name(self.device), "dtype": self.dtype,
            "batch_size": self.batch_size, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
            "decode_context": self.decode_context, "num_threads": self.threads(), "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "python_version": platform.python_version(),
        }

    def check_meta(self, meta: Mapping) -> None:
        """Raise PuzzleError unless a table's sidecar `meta` was measured for this workload on this device.

        Compared: device name, dtype, B, P, G and (on a CPU) the thread count.
        """
        mine = self.meta()
        keys = ["device", "dtype", "batch_size", "prompt_len", "gen_len"]
        if mine["device_name"] is not None:  # None: a GPU target checked on a machine without it
            keys.append("device_name")
        if self.device == "cpu":
            keys.append("num_threads")
        diff = [f"{k}: table {meta.get(k)!r}, wanted {mine[k]!r}" for k in keys if meta.get(k) != mine[k]]
        if diff:
            raise PuzzleError("cost table was measured for another device or workload (" + "; ".join(diff)
                              + "); measure it again for this target")


def device_name(device: str) -> str | None:
    """A readable name: the CPU model from /proc/cpuinfo (or platform), torch.cuda.get_device_name,
    or None for a CUDA device on a machine without CUDA."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------
# Timing


class Stopwatch:
    """Milliseconds between `start()` and `stop()` with the clock the workload calls for.

    CUDA: events recorded on the current stream after a synchronize. CPU: time.perf_counter
    ("wall") or time.process_time ("cpu", one thread only).
    """

    def __init__(self, device: str, clock: str = "wall"):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            self.device = torch.device(device)
            with torch.cuda.device(self.device):
                self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.begin.record(torch.cuda.current_stream(self.device))
        else:
            self.t0 = self.now()

    def stop(self) -> float:
        if self.cuda:
            self.end.record(torch.cuda.current_stream(self.device))
            self.end.synchronize()
            return float(self.begin.elapsed_time(self.end))
        return (self.now() - self.t0) * 1e3


MIN_WINDOW_S = 0.5  # shortest timing window judged for contention (/proc/stat ticks are 10 ms)
GIVE_UP_WINDOWS = 3  # contended windows in a row before a measurement gives up
RETRY_PAUSE_S = 2.0  # pause before measuring a contended window again
DEFAULT_MAX_CONTENTION = 0.25  # cores
REFERENCE_MIN_SAMPLES = 7  # fewest machine-fingerprint samples a CPU measurement keeps (scoring/machine.py)


def _allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity: taskset, cgroup cpusets); None where unknown."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _machine_busy_s(cpus: set[int] | None = None) -> float | None:
    """CPU seconds the CPUs in `cpus` (all when None) spent busy since boot: user, nice, system, irq,
    softirq and steal of their /proc/stat lines (guest time is already inside user). None where
    there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    wanted = [f for f in lines if (f[0] == "cpu" if cpus is None else f[0][3:].isdigit() and int(f[0][3:]) in cpus)]
    if not wanted or any(len(f) < 9 for f in wanted):
        return None
    busy = 0
    for f in wanted:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
        busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process, all its threads, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Contention:
    """Cores that other processes kept busy, over a window, on the CPUs a measurement runs on.

        contention = max(0, (busy_cpus - busy_self) / wall)     [cores]

    CPUs are the ones this process may run on (its affinity; all of the machine's when unknown),
    busy_cpus their busy time in /proc/stat (steal included: a hypervisor running another guest
    slows the measurement just the same), busy_self this process's CPU time (getrusage). A process
    on a core the measurement leaves idle counts too: it shares the cache and the memory bandwidth.
    Measured on the 2-core VM (benchmarks/contention.py; two runs), 1-thread timings of a
    SmolLM2-sized SwiGLU stack (30 layers' weights; decode B=4, prefill 1024 tokens) with the
    other core idle / running a busy loop / running a memory-streaming loop (numpy copy of 512
    MiB): decode 89-111 / 91-95 / 103-139 ms and 70-71 / 70 / 77-81 ms, prefill 396-470 /
    388-480 / 439-567 ms and 348-385 / 354 / 414-433 ms. Readings: 0.00-0.03 over 0.5 s windows
    when idle; 0.7-0.9 for a 2-thread measurement next to one busy-looping process, 1.0 for a
    1-thread one.

    `stop()` returns (wall seconds, contention in cores); the contention is NaN off Linux.
    """

    def __init__(self):
        self.cpus = _allowed_cpus()
        self.n_cpus = len(self.cpus) if self.cpus else os.cpu_count() or 1

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(self.cpus), _own_cpu_s()

    def stop(self) -> tuple[float, float]:
        wall, busy = time.perf_counter() - self.t0, _machine_busy_s(self.cpus)
        if busy is None or self.busy0 is None or wall <= 0:
            return wall, float("nan")
        return wall, max(0.0, (busy - self.busy0 - (_own_cpu_s() - self.own0)) / wall)

    def tick_noise(self, wall: float) -> float:
        """Cores a reading over `wall` seconds may be off by from /proc/stat's ticks alone.

            noise = 2 * CPUs * tick / wall     [cores]; tick = 1 / SC_CLK_TCK (10 ms)

        Per CPU, one tick from the whole-tick counts at the window's ends and one from this
        process's exact CPU time (getrusage) set against their tick-sampled accounting. Measured on
        the 2-core VM (benchmarks/contention.py, idle, 2-thread matrix products): the worst reading
        over 200 / 80 / 40 / 20 / 8 windows of 0.02 / 0.05 / 0.1 / 0.2 / 0.5 s was 1.97 / 0.94 /
        0.16 / 0.06 / 0.02 cores, under 0.25 + noise (2.0 / 0.8 / 0.4 / 0.2 / 0.08); next to a
        busy-looping process the median reading was 0.67 / 0.72 / 0.78 / 0.78 / 0.76 cores, so a
        busy neighbour is caught from windows of about 0.1 s.
        """
        return 2 * self.n_cpus / os.sysconf("SC_CLK_TCK") / wall if wall > 0 else math.inf


def max_ignoring_nan(*values: float | None) -> float:
    """The largest of `values` ignoring NaN and None (a contention not judged); NaN when none is left."""
    return max((v for v in values if v is not None and not math.isnan(v)), default=math.nan)


def check_max_contention(value, name: str = "max_contention") -> float | None:
    """`value` as a contention limit: None, or a number of cores > 0 (inf allowed); `name` is how the error calls
    it: the API argument (the default; the message adds that None is allowed), a setting or a flag.

    Raises:
        PuzzleError: anything else (0 or less, NaN, a string, a bool): idle machines read 0.01-0.04
            cores of /proc/stat tick noise, so 0 would refuse every measurement.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        api = "; None: no check" if name == "max_contention" else ""  # a flag or a run's setting takes no None
        raise PuzzleError(f"{name} must be a number of cores > 0 ('inf' measures regardless of other jobs{api}), "
                          f"got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: no limit
        return math.inf


def _contention_error(contention: float, limit: float, workload: "Workload", what: str, n_cpus: int) -> PuzzleError:
    """The error after GIVE_UP_WINDOWS contended windows in a row; `contention` is the worst of them."""
    return PuzzleError(
        f"other processes kept up to {contention:.2f} cores busy on the {n_cpus} "
        f"CPUs that timing {what} ({workload.threads()} threads) runs on, {GIVE_UP_WINDOWS} windows in a row over the "
        f"limit (max_contention={limit:g}); they share the cores, cache and memory bandwidth, so timings taken now "
        "would mispredict speed-ups. Stop the other jobs (see `top`) and run the same command again (finished "
        "stages are kept), or accept distorted timings: `--max-contention inf` on the same command (run, score, "
        "realize, front, refine, baselines and fuse take it, and save it to DIR/config.json for the run's later "
        "commands); in a preset, [score] max_contention.")


def _over_limit(guard: Contention, wall: float, contention: float, limit: float) -> bool:
    """Whether a window's reading exceeds `limit`, raised by its tick noise when shorter than MIN_WINDOW_S."""
    noise = 0.0 if wall >= MIN_WINDOW_S else guard.tick_noise(wall)
    return contention - noise > limit


def _guarded_rounds(run_round: Callable[..., dict[str, list[float]]], workload: "Workload", repeats: int,
                    warmup: int, max_contention: float | None, what: str,
                    progress: bool = False, fingerprint: bool = True,
                    probe_in_round: bool = False) -> tuple[dict[str, list[float]], dict]:
    """Run `warmup` untimed rounds, then timing rounds until `repeats` were kept in uncontended windows.

    `run_round(timed)` runs one round and returns its samples (name -> list of ms). Rounds are
    grouped into windows of at least MIN_WINDOW_S; a CPU window whose `Contention` exceeds
    `max_contention` is dropped and run again after RETRY_PAUSE_S. A shorter window (the last one,
    cut short by `repeats`, or a whole measurement of a tiny model) is judged too, with the limit
    raised by its tick noise (`Contention.tick_noise`): a busy neighbour still shows above it from
    about 0.1 s on. None disables the check (and CUDA workloads are not checked: their timings are
    device time). `progress` shows a tqdm bar over the kept rounds, named `what`, with the rounds
    dropped so far. On a CPU every window ends with one sample of the machine's reference workload
    (`machine.ReferenceProbe`, about 20 ms), inside the window the guard judges; a measurement of
    fewer than REFERENCE_MIN_SAMPLES windows takes the rest in one more window at the end
    (`fingerprint=False`: no probe, for callers that do not keep it). With `probe_in_round`,
    `run_round(timed, probe)` also gets a callable that takes one more sample of the window, for
    rounds long enough that one sample per window would leave a few moments to speak for the whole
    measurement (whole models: the demo's 16 s rounds gave 3 moments, and the top-up's 4 samples
    from one 50 ms moment set the median; this VM's speed moves by up to 1.7x for seconds at a time).

    Returns:
        (samples, info): samples name -> kept ms; info {"contention_cores": max over the kept
        windows of their reading, less its tick noise for windows shorter than MIN_WINDOW_S (about a
        lower bound: their readings are mostly tick noise); NaN if no window was read, "rounds_dropped":
        int}, on a CPU also the fingerprint's medians over the kept windows ("reference_compute_ms",
        "reference_memory_ms", "reference_samples") and its sizes (`ReferenceProbe.meta`).

    Raises:
        PuzzleError: GIVE_UP_WINDOWS contended windows in a row (see `_contention_error`), or a
            `max_contention` that `check_max_contention` refuses.
    """
    from tqdm.auto import tqdm

    max_contention = check_max_contention(max_contention)
    for _ in range(warmup):
        run_round(False, lambda: None) if probe_in_round else run_round(False)
    guard = None if (max_contention is None or workload.device != "cpu") else Contention()
    probe = ReferenceProbe(last_level_cache_bytes("cpu")) if fingerprint and workload.device == "cpu" else None
    samples: dict[str, list[float]] = {}
    reference: list[tuple[float, float]] = []
    kept = dropped = in_a_row = 0
    worst = worst_in_a_row = float("nan")
    with tqdm(total=repeats, desc=what, unit="round", disable=not progress) as bar:
        while kept < repeats:
            pending: list[dict[str, list[float]]] = []
            window_reference: list[tuple[float, float]] = []
            if guard is not None:
                guard.start()
            elapsed = time.perf_counter()
            take = (lambda: window_reference.append(probe.sample())) if probe is not None else (lambda: None)
            while kept + len(pending) < repeats:
                pending.append(run_round(True, take) if probe_in_round else run_round(True))
                if time.perf_counter() - elapsed >= MIN_WINDOW_S:
                    break
            if probe is not None:
                window_reference.append(probe.sample())
            if guard is not None:
                wall, contention = guard.stop()
                if _over_limit(guard, wall, contention, max_contention):
                    dropped += len(pending)
                    in_a_row += 1
                    worst_in_a_row = max_ignoring_nan(worst_in_a_row, contention)
                    if in_a_row >= GIVE_UP_WINDOWS:
                        raise _contention_error(worst_in_a_row, max_contention, workload, what, guard.n_cpus)
                    # (a fresh user: "contention=0.56, dropped=2" beside a report's 0.01 of the windows kept)
                    bar.set_postfix_str(f"{dropped} rounds timed again: other jobs kept {contention:.2f} cores busy, "
                                        f"over the limit {max_contention:g}", refresh=False)
                    time.sleep(RETRY_PAUSE_S)
                    continue
                if not math.isnan(contention):  # a short window's reading less its tick noise, near a lower
                    # bound (reviewer: a table timed in short windows next to a busy neighbour recorded none, so a
                    # later run with a stricter --max-contention reused it without a word; an idle 0.05 s window
                    # can still read 0.14 over the noise, which only retimes a measurement that short)
                    noise = 0.0 if wall >= MIN_WINDOW_S else guard.tick_noise(wall)
                    worst = max_ignoring_nan(worst, max(0.0, contention - noise))
            in_a_row, worst_in_a_row = 0, float("nan")
            for part in pending:
                for name, ms in part.items():
                    samples.setdefault(name, []).extend(ms)
            reference += window_reference
            kept += len(pending)
            bar.update(len(pending))
    if probe is not None and len(reference) < REFERENCE_MIN_SAMPLES:
        # few windows (a short measurement): top the fingerprint up in one more window, kept if uncontended
        if guard is not None:
            guard.start()
        extra = [probe.sample() for _ in range(REFERENCE_MIN_SAMPLES - len(reference))]
        if guard is None or not _over_limit(guard, *guard.stop(), max_contention):
            reference += extra
    info = {"contention_cores": worst, "rounds_dropped": dropped}
    if probe is not None:
        info.update(summarize(reference), **probe.meta())
    return samples, info


def is_device_name(device) -> bool:
    """Whether `device` is "cpu", "cuda" or "cuda:N" (N in ASCII digits, as torch.device parses it)."""
    return isinstance(device, str) and re.fullmatch(r"cpu|cuda(:[0-9]+)?", device) is not None


def check_device_available(device: str) -> None:
    """Raise PuzzleError unless `device` ("cpu", "cuda", "cuda:N") can run on this machine."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise PuzzleError(f"device {device!r} needs CUDA, which this machine does not have (torch {torch.__version__}); "
                          "measure on --device cpu, or run on the machine with that GPU")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise PuzzleError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"give cuda:0 … cuda:{torch.cuda.device_count() - 1}")


#: of the memory available now, the most one timing's models, KV caches and activations may take
MEMORY_SHARE = 0.7


def available_bytes(device: str) -> int | None:
    """Memory free for new allocations on `device` (bytes), or None when it cannot be read. On CUDA: the device's
    free memory plus what PyTorch's caching allocator holds unused (freed tensors of an earlier timing), on the
    device named (cuda:N), not the current one."""
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(torch.cuda.mem_get_info(dev)[0] + unused)
    try:  # MemAvailable counts the page cache the kernel can give back; free pages alone do not
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def workload_bytes(configs: Sequence[ModelConfig], workload: Workload) -> int:
    """A lower bound of the bytes a timing of models of `configs` allocates beyond their weights: each one's KV
    cache at (B, P + G) (`memory.kv_cache_bytes` per gqa layer, all held at once) and one layer's prefill
    activations at their peak, B · P · (2 C + max(2 (H + G) D, 3 F)) elements in the workload dtype (the residual
    stream and the normed input; then either q, k, v and the attention output, or the SwiGLU's gate, up and
    product: without gradients the two subblocks' are never held together)."""
    B, P, dtype = workload.batch_size, workload.prompt_len, workload.torch_dtype
    kv = sum(memory.kv_cache_bytes(c, b.attention, B, workload.kv_len, workload.dtype) for c in configs
             for b in c.blocks)
    act = max(2 * c.hidden_size + max(2 * (c.num_attention_heads + c.num_key_value_heads) * c.head_dim,
                                      3 * c.intermediate_size) for c in configs)
    return kv + B * P * act * dtype.itemsize


def check_workload_fits(configs: Sequence[ModelConfig], workload: Workload, what: str) -> None:
    """Refuse a timing whose KV caches and activations alone (`workload_bytes`) would take more than MEMORY_SHARE of
    the memory free on the workload's device: allocating them would fail, or get the process killed.

    Raises:
        PuzzleError: naming the bytes needed and the target settings that set them (breaker: `puzzle score
            --prompt-len 100000000` was killed by the kernel's OOM killer, --batch-size 100000000 ended in a
            traceback from the allocator)."""
    need, free = workload_bytes(configs, workload), available_bytes(workload.device)
    if free is not None and need > MEMORY_SHARE * free:
        raise PuzzleError(
            f"timing {what} at batch {workload.batch_size}, prompt {workload.prompt_len} + {workload.gen_len} "
            f"generated tokens needs at least {need / 2**30:.1f} GiB for KV caches and activations, over "
            f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free now on {workload.device}: lower --batch-size, "
            f"--prompt-len or --gen-len (the run's [target] settings), or free memory")


def _check_target(workload: Workload, clock: str, pin_allocator: bool) -> str:
    """Raise PuzzleError for a clock unknown or unfit for the device, or a CUDA workload without CUDA.

    Pins the allocator for a CPU workload when asked; returns the allocator's name for the sidecar.
    """
    if clock not in CLOCKS:
        raise PuzzleError(f"clock must be one of {CLOCKS}, got {clock!r}")
    check_device_available(workload.device)
    if workload.device.startswith("cuda"):
        if clock != "wall":
            raise PuzzleError("clock='cpu' is for CPU workloads; CUDA timings use CUDA events (clock='wall')")
    elif clock == "cpu" and workload.threads() != 1:
        raise PuzzleError(f"clock='cpu' sums the CPU time of all threads, which is not a latency with {workload.threads()} threads; "
                          "use num_threads=1 or clock='wall'")
    if workload.device == "cpu" and pin_allocator and steady_allocator():
        return "glibc-pinned"
    return "glibc-pinned" if _allocator_pinned else "default"


class _fixed_threads:
    """Context: the workload's thread count (restored on exit) and inference mode."""

    def __init__(self, workload: Workload):
        self.workload = workload

    def __enter__(self):
        self.saved = torch.get_num_threads()
        threads = self.workload.threads()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or threads
        if self.workload.num_threads is not None and threads > cpus:  # breaker: 64 on 2 cores timed slow, unsaid
            warnings.warn(f"target.threads {threads} is more than the {cpus} CPUs this process may use: the threads "
                          f"share cores, and the timings run slow (give at most {cpus}, or null for torch's default)")
        torch.set_num_threads(threads)
        self.mode = torch.inference_mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.set_num_threads(self.saved)
        return False


@dataclass
class _Task:
    """One timed piece: `prepare()` runs untimed before each sample, `run()` is timed, and the
    elapsed time is divided by `per_sample` (the number of calls `run` makes)."""

    name: str
    prepare: Callable[[], None]
    run: Callable[[], object]
    per_sample: int = 1


def _time_interleaved(tasks: Sequence[_Task], workload: Workload, clock: str, repeats: int, warmup: int,
                      seed: int, progress: bool, desc: str, max_contention: float | None = DEFAULT_MAX_CONTENTION,
                      fingerprint: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Per task, `repeats` samples in ms; each round runs every task once in a new random order.

    Rounds run in windows checked for contention (`_guarded_rounds`); returns (samples, info).
    """
    if repeats < 1 or warmup < 0:
        raise PuzzleError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    rng = np.random.default_rng(seed)
    watch = Stopwatch(workload.device, clock)

    def run_round(timed: bool) -> dict[str, list[float]]:
        out = {}
        for i in rng.permutation(len(tasks)):
            task = tasks[i]
            task.prepare()
            watch.start()
            task.run()
            out[task.name] = [watch.stop() / task.per_sample]
        return out if timed else {}

    samples, info = _guarded_rounds(run_round, workload, repeats, warmup, max_contention, desc, progress, fingerprint)
    return {k: np.asarray(v) for k, v in samples.items()}, info


def _median_iqr(x: np.ndarray) -> tuple[float, float]:
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return float(med), float(q3 - q1)


def last_level_cache_bytes(device: str) -> int:
    """L2 size of a CUDA device, else the largest CPU cache in sysfs (L3); 32 MiB when unknown."""
    if device.startswith("cuda"):
        check_device_available(device)
        return int(torch.cuda.get_device_properties(torch.device(device)).L2_cache_size)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if entry.startswith("index"):
                with open(f"{base}/{entry}/size") as f:
                    text = f.read().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 * memory.MIB


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
_allocator_pinned = False


def steady_allocator(trim_mib: int = 512, mmap_mib: int = 32) -> bool:
    """Pin glibc malloc's thresholds so that freed activations stay in the process; True if pinned.

    By default glibc adapts its mmap threshold and returns the free top of the heap to the OS
    (trim), so the next large activation page-faults its memory back: on a SmolLM2-sized prefill
    this added 5-25% of system time to the whole model, by amounts that depend on the order of
    allocations, and that a subblock timed alone (which reuses its freed buffers) never saw. With
    the thresholds fixed (M_TRIM_THRESHOLD = trim_mib, M_MMAP_THRESHOLD = mmap_mib, the largest
    glibc allows), allocations up to 32 MiB are served from the heap without faults in both cases;
    larger ones are mmapped, and fault, in both alike.

    Process-wide and for the rest of the process (glibc has no way to read the previous values):
    up to `trim_mib` of freed memory is kept instead of being given back. A no-op returning False
    where the C library is not glibc. Called by every measure_* function on a CPU workload (their
    `steady_allocator=True` default); serving with the same settings (MALLOC_TRIM_THRESHOLD_,
    MALLOC_MMAP_THRESHOLD_ environment variables) or with jemalloc/tcmalloc gives the same effect.
    """
    global _allocator_pinned
    if _allocator_pinned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _allocator_pinned = (mallopt(_M_TRIM_THRESHOLD, int(trim_mib) * memory.MIB) == 1
                         and mallopt(_M_MMAP_THRESHOLD, int(mmap_mib) * memory.MIB) == 1)
    return _allocator_pinned


# ------------------------------------------------------------------------------------------------
# Subblocks


def _as_variants(variants: Iterable, kind: type) -> list:
    """Unique variants, in the given order, from configs or ids."""
    out = []
    for v in variants:
        if isinstance(v, str):
            try:
                v = kind.from_id(v)
            except ArchitectureError as e:
                raise PuzzleError(str(e)) from None
        if not isinstance(v, kind):
            raise PuzzleError(f"expected {kind.__name__} variants (or their ids), got {v!r}")
        if v not in out:
            out.append(v)
    return out


class _SubblockBench:
    """Copies of one subblock variant with their inputs, KV caches and RoPE tables, ready to time.

    The timed expression is the one DecoderBlock.forward evaluates for the subblock:
    attention `h + self_attn(input_layernorm(h), cos, sin, cache)`, FFN `h + mlp(post_attention_layernorm(h))`.
    """

    def __init__(self, config: ModelConfig, variant, workload: Workload, working_set_bytes: int,
                 context: int | None = None):
        self.variant = variant
        self.is_attention = isinstance(variant, AttentionConfig)
        block = (BlockConfig(variant, FFNConfig("no_op")) if self.is_attention
                 else BlockConfig(AttentionConfig("no_op"), variant))
        one_layer = dataclasses.replace(config, blocks=(block,))
        B, P = workload.batch_size, workload.prompt_len
        ctx = workload.decode_context if context is None else int(context)  # cached positions of the decode step
        device, dtype = torch.device(workload.device), workload.torch_dtype
        per_copy = memory.subblock_memory_bytes(one_layer, variant, B, ctx, workload.dtype)  # what a decode step touches
        n = max(1, min(config.num_hidden_layers, math.ceil(working_set_bytes / max(per_copy, 1))))
        first = DecoderBlock(one_layer, block, 0).to(device=device, dtype=dtype).eval()
        self.copies = [first] + [copy.deepcopy(first) for _ in range(n - 1)]
        # sized like the model's cache (P + G positions), so that the cached keys are the same strided views
        cache_len = max(workload.kv_len, ctx + 1)
        self.caches = [KVCache(one_layer, B, cache_len, dtype, device) if variant.kind == "gqa" else None
                       for _ in range(n)]
        C = config.hidden_size
        self.h_prefill = torch.randn(B, P, C).to(device=device, dtype=dtype)  # (B, P, C)
        self.h_decode = torch.randn(B, 1, C).to(device=device, dtype=dtype)  # (B, 1, C)
        rope = RotaryEmbedding(one_layer).to(device)
        self.rope_prefill = rope(torch.arange(P, device=device).expand(B, P), dtype)  # cos, sin (B, P, D)
        self.rope_decode = rope(torch.full((B, 1), ctx, device=device), dtype)  # cos, sin (B, 1, D)
        self.context = ctx
        self.k = 0

    def _apply(self, i: int, h: torch.Tensor, rope) -> torch.Tensor:
        block = self.copies[i]
        if self.is_attention:
            return h + block.self_attn(block.input_layernorm(h), rope[0], rope[1], self.caches[i])
        return h + block.mlp(block.post_attention_layernorm(h))

    def prepare_prefill(self) -> None:
        self.k = (self.k + 1) % len(self.copies)
        if self.caches[self.k] is not None:
            self.caches[self.k].lengths[0] = 0
        self.h_prefill.sum()  # in the model the input was just written by the previous subblock: cache-hot

    def prefill(self) -> torch.Tensor:
        return self._apply(self.k, self.h_prefill, self.rope_prefill)  # (B, P, C)

    def prepare_decode(self) -> None:
        for cache in self.caches:
            if cache is not None:
                cache.lengths[0] = self.context

    def decode(self) -> None:
        for i in range(len(self.copies)):
            self._apply(i, self.h_decode, self.rope_decode)  # (B, 1, C)


def measure_subblock_costs(config: ModelConfig, attention_variants: Iterable, ffn_variants: Iterable,
                           workload: Workload, *, repeats: int = 5, warmup: int = 1, clock: str = "wall",
                           working_set_mib: float | None = None, pin_allocator: bool = True, seed: int = 0,
                           progress: bool = False,
                           max_contention: float | None = DEFAULT_MAX_CONTENTION) -> pd.DataFrame:
    """Measured cost of each subblock variant for `workload` (one row per unique variant).

    Each variant is built once as a `puzzle.modeling.DecoderBlock` with random weights and the
    other subblock no_op, and timed as described in the module docstring (prefill on (B, P, C);
    one decode step on (B, 1, C) at context P + G // 2; medians over interleaved repeats).
    Costs do not depend on the layer: all layers of a model have the same sizes.

    Args:
        config: the parent (sizes, biases, RoPE); its blocks only set the layer count, which caps
            the number of copies used for decode.
        attention_variants, ffn_variants: AttentionConfig / FFNConfig objects or their ids.
        workload: device, dtype, B, P, G and threads.
        repeats, warmup: timed and untimed rounds (each round samples every variant once).
        clock: "wall" or "cpu" (CPU only, one thread); see the module docstring.
        working_set_mib: bytes of decode copies to cycle through; default twice the last-level cache.
        pin_allocator: call `steady_allocator()` first (CPU workloads; see there).
        seed: fixes the random weights, inputs and the order of samples.
        progress: show a tqdm bar over the rounds.
        max_contention: cores other processes may keep busy on the CPUs this process may use before a timing
            window is dropped and measured again (module docstring, "Other processes"); None
            disables the check.

    Returns:
        DataFrame with columns subblock ("attention" | "ffn"), variant (id), prefill_ms, decode_ms,
        runtime_ms (= prefill_ms + G * decode_ms), memory_mib (params + KV at (B, P + G)), params,
        prefill_iqr_ms, decode_iqr_ms; no_op rows are all zero. `df.attrs` holds `workload.meta()`
        plus the clock, allocator, repeats, warmup, contention_cores (max over the kept windows,
        NaN when not judged), rounds_dropped and, on a CPU, the machine's fingerprint
        (reference_compute_ms, reference_memory_ms: medians in ms; scoring/machine.py).

    Raises:
        PuzzleError: a variant that is not valid for `config` (e.g. KV heads that do not divide the
            query heads), a CUDA workload without CUDA, a bad clock / repeats, or other processes
            taking more than `max_contention` cores for GIVE_UP_WINDOWS windows in a row.
    """
    attention = _as_variants(attention_variants, AttentionConfig)
    ffn = _as_variants(ffn_variants, FFNConfig)
    variants = [("attention", v) for v in attention] + [("ffn", v) for v in ffn]
    working_set = int((working_set_mib * memory.MIB) if working_set_mib is not None
                      else 2 * last_level_cache_bytes(workload.device))
    allocator = _check_target(workload, clock, pin_allocator)
    # at least one copy of one layer (its cache and activations): the benchmarks hold 1 to L copies per variant
    check_workload_fits([dataclasses.replace(config, blocks=config.blocks[:1])], workload, "the subblock variants")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        tasks = []
        for subblock, v in variants:
            if v.kind == "no_op":
                continue
            try:
                bench = _SubblockBench(config, v, workload, working_set)
            except ArchitectureError as e:
                raise PuzzleError(f"{subblock} variant {v.id} does not fit this model: {e}") from None
            tasks.append(_Task(f"{v.id}/prefill", bench.prepare_prefill, bench.prefill))
            tasks.append(_Task(f"{v.id}/decode", bench.prepare_decode, bench.decode, len(bench.copies)))
    with _fixed_threads(workload):
        samples, info = _time_interleaved(tasks, workload, clock, repeats, warmup, seed, progress, "subblock costs",
                                          max_contention)
    rows = []
    for subblock, v in variants:
        row = {"subblock": subblock, "variant": v.id}
        if v.kind == "no_op":
            row.update({c: 0.0 for c in TABLE_COLUMNS[2:]}, params=0)
        else:
            prefill, prefill_iqr = _median_iqr(samples[f"{v.id}/prefill"])
            decode, decode_iqr = _median_iqr(samples[f"{v.id}/decode"])
            nbytes = memory.subblock_memory_bytes(config, v, workload.batch_size, workload.kv_len, workload.dtype)
            row.update(prefill_ms=prefill, decode_ms=decode, runtime_ms=prefill + workload.gen_len * decode,
                       memory_mib=nbytes / memory.MIB, params=memory.subblock_params(config, v),
                       prefill_iqr_ms=prefill_iqr, decode_iqr_ms=decode_iqr)
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).astype({"params": "int64"})
    df.attrs.update(workload.meta(), clock=clock, allocator=allocator, repeats=repeats, warmup=warmup, **info)
    return df


# ------------------------------------------------------------------------------------------------
# Non-block part


def _empty_like(config: ModelConfig) -> ModelConfig:
    """The same sizes and depth with every layer no_op: what the forward does around the subblocks."""
    empty = BlockConfig(AttentionConfig("no_op"), FFNConfig("no_op"))
    return config.with_blocks([empty] * config.num_hidden_layers)


def on_workload(model: PuzzleForCausalLM, workload: Workload) -> bool:
    """Whether `model`'s weights are on the workload's device and in its dtype (`measure_models` times it as it is)."""
    p = next(model.parameters())
    return p.dtype == workload.torch_dtype and p.device == torch.device(workload.device)


def to_workload(model: PuzzleForCausalLM, workload: Workload) -> PuzzleForCausalLM:
    """`model` itself when its weights are on the workload's device and dtype, else a copy moved and cast there
    (`model` is left as it is: the pipeline scores quality in the parent's dtype and times in the target's).

    A run's `--dtype`/`--device` (`[target]`) name where costs are measured; the parent and its children are
    loaded in `[parent] dtype` on the CPU, so the whole-model timings (`measure_models`) take such a copy, made
    tensor by tensor on the target (`PuzzleForCausalLM.holding`). RoPE tables stay fp32.

    Raises:
        PuzzleError: a CUDA device this machine does not have (`check_device_available`).
    """
    if on_workload(model, workload):
        return model
    check_device_available(workload.device)
    device, dtype = torch.device(workload.device), workload.torch_dtype
    moved: dict = {}  # one copy per tensor: a tied LM head stays one tensor
    state = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride())
        if key not in moved:
            moved[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        state[name] = moved[key]
    return type(model).holding(model.config, state, device)  # no full copy on the model's own device first


def _check_model(model: PuzzleForCausalLM, workload: Workload) -> None:
    if not on_workload(model, workload):
        p = next(model.parameters())
        raise PuzzleError(f"model is {str(p.dtype).removeprefix('torch.')} on {p.device} but the workload is "
                          f"{workload.dtype} on {workload.device}; move it with model.to(device, dtype) first")


def measure_non_block_costs(config: ModelConfig, workload: Workload, *, repeats: int = 5, warmup: int = 1,
                            clock: str = "wall", pin_allocator: bool = True, seed: int = 0,
                            max_contention: float | None = DEFAULT_MAX_CONTENTION) -> dict:
    """Measured cost of everything outside the subblocks, for `workload`.

    Runs the real `PuzzleForCausalLM.forward(ids, cache=KVCache, logits_to_keep=1)` and the argmax
    of the last logits on a model of `config`'s sizes and depth whose layers are all no_op:
    prefill on (B, P) ids (logits of the last position only, as generation does), decode on (B, 1).

    Returns:
        {"prefill_ms", "decode_ms", "runtime_ms" (= prefill + G * decode), "memory_mib" (embedding,
        final norm, LM head when untied, in the workload dtype), "params", "prefill_iqr_ms",
        "decode_iqr_ms", "contention_cores" (as in `measure_subblock_costs`'s attrs; None when no
        window was judged), "rounds_dropped"}: plain floats, ints and None, JSON-ready.

    Raises:
        PuzzleError: a CUDA workload without CUDA, a bad clock / repeats, or other processes taking
            more than `max_contention` cores (see `measure_subblock_costs`).
    """
    _check_target(workload, clock, pin_allocator)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        empty = _empty_like(config)
        device = torch.device(workload.device)
        model = PuzzleForCausalLM(empty).to(device=device, dtype=workload.torch_dtype).eval()
        B, P = workload.batch_size, workload.prompt_len
        cache = KVCache(empty, B, workload.kv_len, workload.torch_dtype, device)  # holds nothing: no gqa layer
        prompt = torch.randint(config.vocab_size, (B, P)).to(device)  # (B, P)
        token = torch.randint(config.vocab_size, (B, 1)).to(device)  # (B, 1)

    def step(ids):
        return model(ids, cache=cache, logits_to_keep=1)[:, -1].argmax(-1)  # (B, 1, V) -> (B,)

    tasks = [_Task("prefill", lambda: None, lambda: step(prompt)), _Task("decode", lambda: None, lambda: step(token))]
    with _fixed_threads(workload):
        samples, info = _time_interleaved(tasks, workload, clock, repeats, warmup, seed, False, "non-block costs",
                                          max_contention, fingerprint=False)  # its result keeps no fingerprint
    prefill, prefill_iqr = _median_iqr(samples["prefill"])
    decode, decode_iqr = _median_iqr(samples["decode"])
    return {"prefill_ms": prefill, "decode_ms": decode, "runtime_ms": prefill + workload.gen_len * decode,
            "memory_mib": memory.non_block_memory_bytes(config, workload.dtype) / memory.MIB,
            "params": memory.non_block_params(config), "prefill_iqr_ms": prefill_iqr, "decode_iqr_ms": decode_iqr,
            "contention_cores": None if math.isnan(info["contention_cores"]) else round(info["contention_cores"], 3),
            "rounds_dropped": info["rounds_dropped"]}


# ------------------------------------------------------------------------------------------------
# Whole models


def throughputs(workload: Workload, prefill_ms: float, decode_ms: float, runtime_ms: float) -> dict:
    """Tokens per second derived from the latencies of one request:

        prefill_tok_s    = B * P / prefill time        prompt tokens processed per second
        decode_tok_s     = B / decode step time        tokens generated per second while decoding
        throughput_tok_s = B * G / runtime             generated tokens per second of the whole request
    """
    B, P, G = workload.batch_size, workload.prompt_len, workload.gen_len
    rate = lambda n, ms: n / (ms / 1e3) if ms > 0 else float("inf")
    return {"prefill_tok_s": rate(B * P, prefill_ms), "decode_tok_s": rate(B, decode_ms),
            "throughput_tok_s": rate(B * G, runtime_ms)}


INTERLEAVE = ("model", "step")


def measure_models(models: Mapping[str, PuzzleForCausalLM], workload: Workload, *, repeats: int = 3,
                   warmup: int = 1, clock: str = "wall", pin_allocator: bool = True, seed: int = 0,
                   progress: bool = False, max_contention: float | None = DEFAULT_MAX_CONTENTION,
                   interleave: str | None = None) -> pd.DataFrame:
    """Measure several whole models the way they run, interleaved so that they share the machine's noise.

    One sample of a model: a fresh KVCache for (B, P + G) positions (allocated before the clock
    starts, as a server preallocates it), a prefill `forward(ids (B, P), cache, logits_to_keep=1)`
    with the argmax of the last logits, then G greedy decode steps on the real KV-cache path, each
    a forward of the previous tokens (B, 1) and an argmax. Token ids are random. Every repeat
    samples every model once, in a new random order; the warmup is one prefill and two decode steps.
    On a CPU a sample of the machine's reference workload (scoring/machine.py) runs between every two
    models of a round, outside their timings, so the fingerprint spreads over the whole measurement.

    With interleave="step" (the default on a CPU) a round runs the models' prefills one after
    another and then their decode steps in turns (step 1 of every model, step 2 of every model,
    ...), each step timed on its own; a model's decode time is the sum of its steps. Slow spells of
    the machine shorter than a round then fall on every model alike instead of on whichever model
    ran through them. On the 2-core VM, 8 + 8 alternating 5-round sessions of the demo's parent and
    its 4 front children (benchmarks/contention.py --only interleave; SD of log): the per-round
    speed-ups' spread fell from 5.3-7.6 % by model to 2.8-3.3 % by step, the spread of the speed-ups
    across sessions from 4.7-6.4 % to 1.4-2.3 % (the 3x child read 2.85-3.36x, then 2.97-3.11x).
    Models that fit in the last-level cache run colder this way (every step follows other models'
    steps; not measured); a CUDA workload keeps "model" by default (device time from events, one
    synchronisation per timed stretch).

    Args:
        models: name -> model, already on the workload's device and dtype, in eval mode.
        workload, repeats, warmup, clock, pin_allocator, seed, progress, max_contention: as in
            `measure_subblock_costs` (a contended round is dropped and measured again).
        interleave: "model" (each model's request whole, models in a random order per round),
            "step" (above), or None: "step" on a CPU, "model" on CUDA.

    Returns:
        DataFrame, one row per model: name, prefill_ms (median), decode_ms (median over repeats of
        the mean step), runtime_ms (median over repeats of prefill + all G steps), prefill_tok_s,
        decode_tok_s, throughput_tok_s (see `throughputs`), memory_mib (parameter bytes of the
        model + the bytes of its KV cache at (B, P + G)), params, prefill_iqr_ms, decode_iqr_ms,
        runtime_iqr_ms. `df.attrs` as in `measure_subblock_costs`, plus "runtime_rounds_ms": {name:
        [runtime per kept round]}, index r the same round for every model (for paired ratios).

    Raises:
        PuzzleError: a model on another device or dtype than the workload, no models, a CUDA
            workload without CUDA, a bad clock / repeats, or persistent contention.
    """
    allocator = _check_target(workload, clock, pin_allocator)
    if interleave is None:
        interleave = "step" if workload.device == "cpu" else "model"
    if interleave not in INTERLEAVE:
        raise PuzzleError(f"interleave must be one of {INTERLEAVE}, got {interleave!r}")
    if not models:
        raise PuzzleError("measure_models needs at least one model")
    if repeats < 1 or warmup < 0:
        raise PuzzleError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for model in models.values():
        _check_model(model, workload)
    configs = [m.config for m in models.values()]  # a round's caches are held together when it goes by step
    held = configs if interleave == "step" else [max(configs, key=lambda c: workload_bytes([c], workload))]
    check_workload_fits(held, workload, f"{len(models)} model{'s' if len(models) > 1 else ''}")
    B, P, G = workload.batch_size, workload.prompt_len, workload.gen_len
    device, dtype = torch.device(workload.device), workload.torch_dtype
    names = list(models)
    with _fixed_threads(workload), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        prompt = torch.randint(min(m.config.vocab_size for m in models.values()), (B, P)).to(device)  # (B, P)
        watch = Stopwatch(workload.device, clock)

        def sample(model, steps):
            cache = KVCache(model.config, B, P + G, dtype, device)
            watch.start()
            token = model(prompt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1)  # (B,)
            prefill = watch.stop()
            watch.start()
            for _ in range(steps):
                token = model(token[:, None], cache=cache, logits_to_keep=1)[:, -1].argmax(-1)  # (B,)
            return prefill, watch.stop()

        def run_round_steps(timed: bool, probe: Callable[[], None]) -> dict[str, list[float]]:
            order = [names[i] for i in rng.permutation(len(names))]
            caches = {n: KVCache(models[n].config, B, P + G, dtype, device) for n in order}
            tokens, prefill, decode = {}, {}, dict.fromkeys(order, 0.0)
            for k, name in enumerate(order):
                if k and timed:
                    probe()
                watch.start()
                tokens[name] = models[name](prompt, cache=caches[name], logits_to_keep=1)[:, -1].argmax(-1)  # (B,)
                prefill[name] = watch.stop()
            for _ in range(G if timed else min(G, 2)):
                for name in order:
                    watch.start()
                    tokens[name] = models[name](tokens[name][:, None], cache=caches[name],
                                                logits_to_keep=1)[:, -1].argmax(-1)  # (B,)
                    decode[name] += watch.stop()
            if not timed:
                return {}
            return {f"{n}/{part}": [v] for n in order
                    for part, v in (("prefill", prefill[n]), ("decode", decode[n] / G), ("runtime", prefill[n] + decode[n]))}

        def run_round(timed: bool, probe: Callable[[], None]) -> dict[str, list[float]]:
            if interleave == "step":
                return run_round_steps(timed, probe)
            out = {}
            for k, i in enumerate(rng.permutation(len(names))):
                name = names[i]
                if not timed:
                    sample(models[name], min(G, 2))
                    continue
                if k:
                    probe()  # a fingerprint sample between models: spread over the round, outside every timing
                prefill, decode = sample(models[name], G)
                out[f"{name}/prefill"], out[f"{name}/decode"], out[f"{name}/runtime"] = [prefill], [decode / G], [prefill + decode]
            return out

        samples, info = _guarded_rounds(run_round, workload, repeats, warmup, max_contention, "whole models", progress,
                                        probe_in_round=True)
    times = {n: {k: samples[f"{n}/{k}"] for k in ("prefill", "decode", "runtime")} for n in names}
    rows = []
    for name in names:
        model, t = models[name], {k: np.asarray(v) for k, v in times[name].items()}
        (prefill, prefill_iqr), (decode, decode_iqr), (runtime, runtime_iqr) = (
            _median_iqr(t["prefill"]), _median_iqr(t["decode"]), _median_iqr(t["runtime"]))
        params = {id(p): p for p in model.parameters()}.values()
        nbytes = sum(p.numel() * p.element_size() for p in params)
        nbytes += KVCache(model.config, B, workload.kv_len, dtype, "meta").nbytes()
        rows.append({"name": name, "prefill_ms": prefill, "decode_ms": decode, "runtime_ms": runtime,
                     **throughputs(workload, prefill, decode, runtime), "memory_mib": nbytes / memory.MIB,
                     "params": model.num_parameters(), "prefill_iqr_ms": prefill_iqr, "decode_iqr_ms": decode_iqr,
                     "runtime_iqr_ms": runtime_iqr})
    df = pd.DataFrame(rows)
    df.attrs.update(workload.meta(), clock=clock, allocator=allocator, repeats=repeats, warmup=warmup, **info,
                    interleave=interleave, runtime_rounds_ms={n: [float(v) for v in times[n]["runtime"]] for n in names})
    return df


def measure_model(model: PuzzleForCausalLM, workload: Workload, *, repeats: int = 3, warmup: int = 1,
                  clock: str = "wall", pin_allocator: bool = True, seed: int = 0,
                  max_contention: float | None = DEFAULT_MAX_CONTENTION) -> dict:
    """One model measured as in `measure_models`; returns that row as a dict (without the name)."""
    row = measure_models({"model": model}, workload, repeats=repeats, warmup=warmup, clock=clock,
                         pin_allocator=pin_allocator, seed=seed, max_contention=max_contention).iloc[0]
    return {k: (int(v) if k == "params" else float(v)) for k, v in row.items() if k != "name"}


# ------------------------------------------------------------------------------------------------
# Prediction and the additivity check


def select_rows(table: pd.DataFrame, config: ModelConfig) -> pd.DataFrame:
    """The cost rows of a child: for every layer, its attention row and its FFN row.

    `table` is a cost table (subblock, variant, costs) or a per-layer score table with a `layer`
    column (matched on layer too). A no_op variant missing from the table counts as zero.

    Returns:
        DataFrame with 2 * L rows: layer, subblock, variant and the cost columns.

    Raises:
        PuzzleError: a variant the table does not hold, or a table without the cost columns.
    """
    missing_cols = [c for c in ("subblock", "variant", *COST_COLUMNS) if c not in table.columns]
    if missing_cols:
        raise PuzzleError(f"cost table lacks the columns {missing_cols}")
    by_layer = "layer" in table.columns
    index = {((int(r.layer),) if by_layer else ()) + (r.subblock, r.variant): r for r in table.itertuples(index=False)}
    rows = []
    for layer, block in enumerate(config.blocks):
        for subblock, variant in (("attention", block.attention), ("ffn", block.ffn)):
            key = ((layer,) if by_layer else ()) + (subblock, variant.id)
            r = index.get(key)
            if r is None and variant.kind != "no_op":
                where = f"layer {layer} " if by_layer else ""
                raise PuzzleError(f"cost table has no row for {where}{subblock} variant {variant.id}; measure it first")
            costs = {c: (getattr(r, c) if r is not None else 0) for c in COST_COLUMNS}
            rows.append({"layer": layer, "subblock": subblock, "variant": variant.id, **costs})
    return pd.DataFrame(rows)


def predict_totals(table_rows, non_block: Mapping, workload: Workload | None = None) -> dict:
    """Predicted whole-model cost: the sum of a child's subblock rows plus the non-block costs.

    Args:
        table_rows: the child's rows (a DataFrame as from `select_rows`, or an iterable of
            mappings) with prefill_ms, decode_ms, runtime_ms, memory_mib, params.
        non_block: the dict from `measure_non_block_costs` (the same keys).
        workload: when given, adds prefill_tok_s, decode_tok_s, throughput_tok_s (`throughputs`).

    Returns:
        {"prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params"[, tok_s keys]}.
    """
    rows = pd.DataFrame(list(table_rows) if not isinstance(table_rows, pd.DataFrame) else table_rows)
    totals = {}
    for c in COST_COLUMNS:
        part = float(rows[c].sum()) if c in rows.columns and len(rows) else 0.0
        totals[c] = part + float(non_block[c])
    totals["params"] = int(round(totals["params"]))
    if workload is not None:
        totals.update(throughputs(workload, totals["prefill_ms"], totals["decode_ms"], totals["runtime_ms"]))
    return totals


def additivity_report(predicted: Mapping, measured: Mapping, quantities: Sequence[str] | None = None,
                      reference: tuple[Mapping, Mapping] | None = None) -> pd.DataFrame:
    """Predicted vs measured, one row per quantity: quantity, predicted, measured, rel_error.

    rel_error = predicted / measured - 1 (positive: the sum of parts overestimates). By default the
    quantities are those of COST_COLUMNS and the tok_s figures that both mappings hold.

    With `reference` = (predicted, measured) of another model (the parent), measured in the same
    session, a ratio_error column is added: (predicted / predicted_ref) / (measured / measured_ref) - 1,
    the error of the predicted speed-up. A machine that drifts between the cost table and the
    measurement (shared CPUs, clocks) shifts both models alike, and this error cancels that drift.
    """
    if quantities is None:
        candidates = (*COST_COLUMNS, "prefill_tok_s", "decode_tok_s", "throughput_tok_s")
        quantities = [q for q in candidates if q in predicted and q in measured]
    rows = []
    for q in quantities:
        p, m = float(predicted[q]), float(measured[q])
        row = {"quantity": q, "predicted": p, "measured": m, "rel_error": p / m - 1 if m else float("nan")}
        if reference is not None:
            p_ref, m_ref = float(reference[0][q]), float(reference[1][q])
            row["ratio_error"] = (p / p_ref) / (m / m_ref) - 1 if m and p_ref and m_ref else float("nan")
        rows.append(row)
    columns = ["quantity", "predicted", "measured", "rel_error"] + (["ratio_error"] if reference is not None else [])
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------
# Cost on a grid of workloads: prefill at (B, P), decode at (B, C)

GRID_COLUMNS = ("subblock", "variant", "batch_size", "prompt_len", "context_len", "prefill_ms", "decode_ms",
                "prefill_iqr_ms", "decode_iqr_ms", "params", "weight_dtype", "kv_dtype", "weight_mib", "kv_mib",
                "memory_mib")


def grid_points(batch_sizes: Iterable[int], prompt_lens: Iterable[int], contexts: Iterable[int]) -> list[tuple[int, int, int]]:
    """Every (B, P, C) of the cross product, in order."""
    return [(int(b), int(p), int(c)) for b in batch_sizes for p in prompt_lens for c in contexts]


def _check_points(points) -> list[tuple[int, int, int]]:
    out = []
    for pt in points:
        try:
            b, p, c = (int(x) for x in pt)
        except (TypeError, ValueError):
            raise PuzzleError(f"grid point {pt!r} is not (batch_size, prompt_len, context_len)") from None
        if min(b, p, c) < 1:
            raise PuzzleError(f"grid point {pt!r}: B, P and C must all be >= 1")
        if (b, p, c) not in out:
            out.append((b, p, c))
    if not out:
        raise PuzzleError("the cost grid needs at least one (B, P, C) point")
    return out


def measure_cost_grid(config: ModelConfig, attention_variants: Iterable, ffn_variants: Iterable, points,
                      *, dtype: str = "float32", device: str = "cpu", num_threads: int | None = None,
                      weight_dtype: str | None = None, kv_dtype: str | None = None, repeats: int = 5,
                      warmup: int = 1, clock: str = "wall", working_set_mib: float | None = None,
                      pin_allocator: bool = True, seed: int = 0, non_block: bool = True,
                      progress: bool = False, max_contention: float | None = DEFAULT_MAX_CONTENTION) -> pd.DataFrame:
    """Per-subblock prefill and decode latency on a grid of workloads, one row per (variant, B, P, C).

    prefill_ms is the subblock's latency on a (B, P, C_hidden) prompt and decode_ms one decode step
    of B sequences attending over C cached positions, both timed as in `measure_subblock_costs`.
    Prefill is measured once per distinct (B, P) and decode once per distinct (B, C), all variants
    of one (B, P) or (B, C) interleaved (so ratios between variants share the machine's noise);
    the rows join them. With `non_block`, rows with subblock "non_block" hold the cost outside the
    subblocks (`measure_non_block_costs`; its decode does not depend on C).

    Memory (scoring/memory.py): weight_mib = parameters in `weight_dtype` (default: `dtype`; fp8 keeps norms and
    biases in bf16, `memory.subblock_weight_bytes`),
    kv_mib = the KV cache of max(P, C) positions for B sequences in `kv_dtype` (default: `dtype`;
    "float8" is allowed here as a storage format), memory_mib = their sum. Timings always run in
    `dtype`.

    Args:
        points: (B, P, C) tuples (see `grid_points`).
        dtype, device, num_threads: what runs (as in `Workload`).
        Other arguments as in `measure_subblock_costs`.

    Returns:
        DataFrame with GRID_COLUMNS; `df.attrs` holds the sidecar (`grid_meta`): device, its name,
        dtypes, threads, the points, clock and software versions; on a CPU also the machine's
        fingerprint (reference_compute_ms, reference_memory_ms: the median over the groups).

    Raises:
        PuzzleError: bad points, variants that do not fit `config`, an unknown dtype, CUDA missing.
    """
    points = _check_points(points)
    weight_dtype = memory.canonical_dtype(weight_dtype or dtype)
    kv_dtype = memory.canonical_dtype(kv_dtype or dtype)
    attention = _as_variants(attention_variants, AttentionConfig)
    ffn = _as_variants(ffn_variants, FFNConfig)
    variants = [("attention", v) for v in attention] + [("ffn", v) for v in ffn]
    timed = [(s, v) for s, v in variants if v.kind != "no_op"]
    base = Workload(points[0][0], points[0][1], 1, dtype, device, num_threads)
    allocator = _check_target(base, clock, pin_allocator)
    working_set = int((working_set_mib * memory.MIB) if working_set_mib is not None
                      else 2 * last_level_cache_bytes(device))
    prefill_keys = sorted({(b, p) for b, p, _ in points})
    decode_keys = sorted({(b, c) for b, _, c in points})
    groups = [("prefill", k) for k in prefill_keys] + [("decode", k) for k in decode_keys]
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="cost grid", unit="group")
    measured: dict = {}
    dropped, worst = 0, float("nan")
    reference, probe_meta, probe_samples = [], {}, 0  # per group: the fingerprint's medians
    for phase, (b, n) in groups:
        workload = Workload(b, n if phase == "prefill" else 1, 1, dtype, device, num_threads)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            tasks = []
            for subblock, v in timed:
                try:
                    bench = _SubblockBench(config, v, workload, working_set, context=n if phase == "decode" else 1)
                except ArchitectureError as e:
                    raise PuzzleError(f"{subblock} variant {v.id} does not fit this model: {e}") from None
                if phase == "prefill":
                    tasks.append(_Task(v.id, bench.prepare_prefill, bench.prefill))
                else:
                    tasks.append(_Task(v.id, bench.prepare_decode, bench.decode, len(bench.copies)))
        with _fixed_threads(workload):
            samples, info = _time_interleaved(tasks, workload, clock, repeats, warmup, seed, False, phase,
                                              max_contention)
        dropped += info["rounds_dropped"]
        worst = max_ignoring_nan(worst, info["contention_cores"])
        if "reference_memory_ms" in info:
            reference.append((info["reference_compute_ms"], info["reference_memory_ms"]))
            probe_meta = {k: info[k] for k in ("reference_bytes", "reference_products", "reference_n")}
            probe_samples += info["reference_samples"]
        for vid, x in samples.items():
            measured[(phase, b, n, vid)] = _median_iqr(x)
        del tasks
    non_block_rows = {}
    if non_block:
        for b, p in prefill_keys:
            nb = measure_non_block_costs(config, Workload(b, p, 1, dtype, device, num_threads), repeats=repeats,
                                         warmup=warmup, clock=clock, pin_allocator=pin_allocator, seed=seed,
                                         max_contention=max_contention)
            non_block_rows[(b, p)] = nb
            dropped += nb["rounds_dropped"]
            worst = max_ignoring_nan(worst, nb["contention_cores"])
    rows = []
    for b, p, c in points:
        s = max(p, c)
        for subblock, v in variants:
            params = memory.subblock_params(config, v)
            weight = memory.subblock_weight_bytes(config, v, weight_dtype)
            kv = memory.kv_cache_bytes(config, v, b, s, kv_dtype) if subblock == "attention" else 0
            if v.kind == "no_op":
                pre, dec = (0.0, 0.0), (0.0, 0.0)
            else:
                pre, dec = measured[("prefill", b, p, v.id)], measured[("decode", b, c, v.id)]
            rows.append({"subblock": subblock, "variant": v.id, "batch_size": b, "prompt_len": p, "context_len": c,
                         "prefill_ms": pre[0], "decode_ms": dec[0], "prefill_iqr_ms": pre[1], "decode_iqr_ms": dec[1],
                         "params": params, "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
                         "weight_mib": weight / memory.MIB, "kv_mib": kv / memory.MIB,
                         "memory_mib": (weight + kv) / memory.MIB})
        if non_block:
            nb = non_block_rows[(b, p)]
            weight = memory.non_block_memory_bytes(config, weight_dtype)
            rows.append({"subblock": "non_block", "variant": "non_block", "batch_size": b, "prompt_len": p,
                         "context_len": c, "prefill_ms": nb["prefill_ms"], "decode_ms": nb["decode_ms"],
                         "prefill_iqr_ms": nb["prefill_iqr_ms"], "decode_iqr_ms": nb["decode_iqr_ms"],
                         "params": nb["params"], "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
                         "weight_mib": weight / memory.MIB, "kv_mib": 0.0, "memory_mib": weight / memory.MIB})
    df = pd.DataFrame(rows, columns=list(GRID_COLUMNS)).astype({"params": "int64"})
    df.attrs.update(grid_meta(base, points, weight_dtype, kv_dtype), clock=clock, allocator=allocator,
                    repeats=repeats, warmup=warmup, rounds_dropped=dropped, contention_cores=worst)
    if reference:  # the median over the groups' medians; reference_samples counts the samples behind them
        df.attrs.update(summarize(reference), **probe_meta, reference_samples=probe_samples)
    return df


def grid_meta(workload: Workload, points, weight_dtype: str, kv_dtype: str) -> dict:
    """Sidecar of a grid table: the device, dtypes, thread count, points and software (JSON-ready)."""
    meta = workload.meta()
    for key in ("batch_size", "prompt_len", "gen_len", "decode_context"):
        meta.pop(key)
    points = [list(p) for p in points]
    meta.update(weight_dtype=weight_dtype, kv_dtype=kv_dtype, points=points,
                batch_sizes=sorted({p[0] for p in points}), prompt_lens=sorted({p[1] for p in points}),
                context_lens=sorted({p[2] for p in points}))
    return meta


def load_cost_grid(path, *, device: str | None = None, dtype: str | None = None, num_threads: int | None = None,
                   points=None) -> tuple[pd.DataFrame, dict]:
    """Read a grid table written with puzzle.io.save_table(df, path, df.attrs) and check it fits the request.

    Args:
        device: "cpu" / "cuda[:N]": the table's device must match, and so must its device name when
            this machine has that device (a table from another CPU or GPU model is refused).
        dtype: the compute dtype the table must have been measured in.
        num_threads: CPU threads it must have been measured with.
        points: (B, P, C) points that must all be in the table.

    Raises:
        PuzzleError: missing file or columns, or a table measured on another device, dtype,
            thread count, or without a requested point.
    """
    from puzzle.io import load_table

    expect = {}
    if device is not None:
        expect["device"] = device
        name = device_name(device)
        if name is not None:
            expect["device_name"] = name
    if dtype is not None:
        expect["dtype"] = memory.canonical_dtype(dtype)
    if num_threads is not None:
        expect["num_threads"] = int(num_threads)
    df, meta = load_table(path, required_columns=GRID_COLUMNS, expect=expect)
    if points is not None:
        have = {tuple(p) for p in meta.get("points", [])}
        missing = [p for p in _check_points(points) if p not in have]
        if missing:
            raise PuzzleError(f"cost grid {path} was measured for (B, P, C) points {sorted(have)}, not for {missing}; "
                              "measure the grid again with these points")
    return df, meta
