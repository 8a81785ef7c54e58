"""Roofline estimates of subblock and whole-model latency on a named GPU, for planning without it.

Each piece of work (a subblock's prefill on (B, P) tokens, its decode step over a context of C
cached positions, the non-block part) is summarised by the floating-point operations it performs
and the bytes it must move to and from device memory. Its time on a device is the roofline bound
(Williams, Waterman & Patterson, "Roofline", CACM 2009):

    t = max(flops / (peak_flops * compute_efficiency), bytes / (bandwidth * bandwidth_efficiency))
        + kernels * launch_overhead

With the efficiencies at 1 and no launch overhead (the defaults) this is a lower bound no
implementation beats. Real kernels reach 60-80% of peak FLOP/s on large matmuls and 70-90% of
the memory bandwidth on streaming reads; a small model's decode step is dominated by kernel
launches instead (tens of kernels per layer at several microseconds each, unless CUDA graphs or
fused kernels remove them), so compare against a measurement (`compare_with_measurement`) before
trusting absolute numbers; ratios between variants are more robust than absolute times.

Counts (C hidden, H query heads, G KV heads, D head dim, F FFN width, V vocab, T tokens per
sequence in the call: P for prefill, 1 for decode, S = attended positions; a = activation bytes,
w = weight bytes, k = KV-cache bytes per element):

    gqa       flops 2·B·T·C·(2·H·D + 2·G·D)                         (q, k, v, o projections)
                    + 4·B·H·D·T·S_eff, S_eff = (T+1)/2 causal prefill, C decode   (QK^T and PV)
              bytes w·C·(2·H·D + 2·G·D) + k·2·B·G·D·(T writes + S reads in decode)
                    + a·B·T·(6·C + 4·H·D + 4·G·D)                      (norm, projections, residual)
    linear    flops 2·B·T·C²; bytes w·C² + a·B·T·5·C
    swiglu    flops 2·B·T·3·C·F; bytes w·3·C·F + a·B·T·(5·C + 5·F)
    non-block flops 2·B·C·V (LM head on the last position); bytes w·V·C + a·B·(T·C + V)

Peak numbers are dense (no 2:4 sparsity) tensor-core FP/s from NVIDIA's datasheets; "float32"
is the plain FP32 (CUDA-core) rate, which is what a float32 matmul gets unless TF32 is enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import pandas as pd

from puzzle.architecture import AttentionConfig, FFNConfig, ModelConfig
from puzzle.errors import PuzzleError

from . import memory
from .cost import COST_COLUMNS, Workload, predict_totals, select_rows


@dataclass(frozen=True)
class DeviceSpec:
    """Peak throughput of a device.

    Attributes:
        name: a readable name.
        peak_tflops: dense peak TFLOP/s per compute dtype ("float32", "tf32", "bfloat16", "float16", "float8").
        memory_bw_gb_s: peak device-memory bandwidth, GB/s (1e9 bytes per second).
        memory_gib: device memory the driver reports, GiB (nvidia-smi memory.total), below the advertised size
            where ECC or firmware reserve some (L40S: 45.0 of "48 GB"); the CUDA context takes a little more.
        l2_mib: last-level (L2) cache, MiB.
        source: where the numbers come from.
    """

    name: str
    peak_tflops: Mapping[str, float]
    memory_bw_gb_s: float
    memory_gib: float
    l2_mib: float = 0.0
    source: str = ""
    kernel_counts: Mapping[str, int] = field(default_factory=lambda: dict(KERNELS))

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype; PuzzleError when the device has no such rate (e.g. fp8 on A100)."""
        key = dtype if dtype == "tf32" else memory.canonical_dtype(dtype)
        if key not in self.peak_tflops:
            raise PuzzleError(f"{self.name} has no {key} rate in its spec (has {sorted(self.peak_tflops)})")
        return float(self.peak_tflops[key]) * 1e12


# Approximate kernels per subblock in eager PyTorch (norm, projections, RoPE, cache write, SDPA,
# residual ...), used only with a launch overhead.
KERNELS = {"gqa": 14, "linear_attention": 4, "swiglu": 7, "linear_ffn": 4, "non_block": 6}

_HOPPER = {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4, "float8": 1978.9}
GPUS: dict[str, DeviceSpec] = {
    "H100": DeviceSpec("NVIDIA H100 SXM5 80GB", _HOPPER, 3350.0, 81559 / 1024, 50.0,
                       "NVIDIA H100 Tensor Core GPU datasheet (dense = half the sparsity figures); "
                       "H100 SXM5: 3.35 TB/s HBM3, 50 MB L2; nvidia-smi memory.total 81,559 MiB"),
    "H200": DeviceSpec("NVIDIA H200 SXM 141GB", _HOPPER, 4800.0, 143771 / 1024, 50.0,
                       "NVIDIA H200 datasheet: H100 compute with 141 GB HBM3e at 4.8 TB/s; nvidia-smi memory.total "
                       "143,771 MiB"),
    "A100": DeviceSpec("NVIDIA A100 SXM4 80GB", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
                       2039.0, 81920 / 1024, 40.0,
                       "NVIDIA A100 datasheet (80GB SXM4: 2,039 GB/s HBM2e, 40 MB L2); no FP8 tensor cores; "
                       "nvidia-smi memory.total 81,920 MiB"),
    "L40S": DeviceSpec("NVIDIA L40S 48GB", {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.05, "float16": 362.05,
                                            "float8": 733.0},
                       864.0, 46068 / 1024, 96.0, "NVIDIA L40S datasheet (dense; 864 GB/s GDDR6, 96 MB L2); "
                       "nvidia-smi memory.total 46,068 MiB (ECC on)"),
}


def gpu_spec(name: str) -> DeviceSpec:
    """The spec of a named GPU ("H100", "H200", "A100", "L40S"; case-insensitive)."""
    for key, spec in GPUS.items():
        if key.lower() == name.lower():
            return spec
    raise PuzzleError(f"no spec for GPU {name!r}; known: {', '.join(GPUS)} (or build a DeviceSpec)")


# ------------------------------------------------------------------------------------------------
# Work counts


@dataclass(frozen=True)
class Work:
    """Floating-point operations, bytes moved and kernels launched by one piece of work."""

    flops: float
    bytes: float
    kernels: int


def subblock_work(config: ModelConfig, variant, batch_size: int, tokens: int, context: int, *,
                  weight_dtype="bfloat16", act_dtype="bfloat16", kv_dtype=None, decode: bool = False) -> Work:
    """Work of one subblock call on (B, T) tokens attending over `context` positions (module docstring).

    Args:
        tokens: T new tokens per sequence (P for prefill, 1 for a decode step).
        context: positions attended by the last token (P for prefill, C for decode).
        decode: a decode step reads the whole KV cache; a prefill only writes it.
    """
    C, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
    B, T, S = batch_size, tokens, context
    w, a = memory.dtype_bytes(weight_dtype), memory.dtype_bytes(act_dtype)
    k = memory.dtype_bytes(kv_dtype or act_dtype)
    if variant.kind == "no_op":
        return Work(0.0, 0.0, 0)
    if isinstance(variant, AttentionConfig):
        if variant.kind == "linear":
            return Work(2.0 * B * T * C * C, w * C * C + a * B * T * 5 * C, KERNELS["linear_attention"])
        G = variant.num_kv_heads
        s_eff = S if decode else (T + 1) / 2  # mean keys per query: causal prefill sees half on average
        flops = 2.0 * B * T * C * (2 * H * D + 2 * G * D) + 4.0 * B * H * D * T * s_eff
        kv = k * 2 * B * G * D * (T + (S if decode else 0))
        nbytes = w * C * (2 * H * D + 2 * G * D) + kv + a * B * T * (6 * C + 4 * H * D + 4 * G * D)
        return Work(flops, nbytes, KERNELS["gqa"])
    if isinstance(variant, FFNConfig):
        if variant.kind == "linear":
            return Work(2.0 * B * T * C * C, w * C * C + a * B * T * 5 * C, KERNELS["linear_ffn"])
        F = variant.intermediate_size
        return Work(2.0 * B * T * 3 * C * F, w * 3 * C * F + a * B * T * (5 * C + 5 * F), KERNELS["swiglu"])
    raise PuzzleError(f"expected an AttentionConfig or FFNConfig, got {type(variant).__name__}")


def non_block_work(config: ModelConfig, batch_size: int, tokens: int, *, weight_dtype="bfloat16",
                   act_dtype="bfloat16") -> Work:
    """Embedding lookup, final norm and the LM head on the last position of B sequences of T tokens."""
    C, V, B = config.hidden_size, config.vocab_size, batch_size
    w = memory.dtype_bytes(memory.unquantized_dtype(weight_dtype))  # fp8 leaves the embedding and LM head in bf16
    a = memory.dtype_bytes(act_dtype)
    return Work(2.0 * B * C * V, w * V * C + a * B * (tokens * C + V), KERNELS["non_block"])


def roofline_seconds(work: Work, spec: DeviceSpec, compute_dtype: str, *, compute_efficiency: float = 1.0,
                     bandwidth_efficiency: float = 1.0, launch_overhead_us: float = 0.0) -> tuple[float, str]:
    """(seconds, "compute" | "memory") for `work` on `spec` (formula in the module docstring)."""
    if work.flops == 0 and work.bytes == 0:
        return 0.0, "none"
    t_c = work.flops / (spec.peak_flops(compute_dtype) * compute_efficiency)
    t_m = work.bytes / (spec.memory_bw_gb_s * 1e9 * bandwidth_efficiency)
    return max(t_c, t_m) + work.kernels * launch_overhead_us * 1e-6, ("compute" if t_c >= t_m else "memory")


# ------------------------------------------------------------------------------------------------
# Tables in the shape of the measured ones


def estimate_subblock_costs(config: ModelConfig, attention_variants, ffn_variants, workload: Workload,
                            spec: DeviceSpec | str, *, compute_dtype: str | None = None, weight_dtype: str | None = None,
                            kv_dtype: str | None = None, compute_efficiency: float = 1.0,
                            bandwidth_efficiency: float = 1.0, launch_overhead_us: float = 0.0) -> pd.DataFrame:
    """A cost table like `measure_subblock_costs`'s, estimated by the roofline for `spec`.

    Decode is estimated at the workload's mean context P + G // 2, runtime_ms = prefill_ms +
    G * decode_ms, memory as in scoring/memory.py (weights in `weight_dtype`, KV cache at P + G in
    `kv_dtype`).

    Args:
        spec: a DeviceSpec or a GPU name from GPUS.
        compute_dtype: the matmul rate to use (default: the workload's dtype; "float8" and "tf32" allowed).
        weight_dtype, kv_dtype: storage dtypes (default: the workload's dtype).

    Returns:
        DataFrame: subblock, variant, prefill_ms, decode_ms, runtime_ms, memory_mib, params,
        prefill_bound, decode_bound, prefill_gflop, decode_gflop, prefill_mb, decode_mb; attrs hold
        the device name, dtypes and workload with "estimated": True.
    """
    spec = gpu_spec(spec) if isinstance(spec, str) else spec
    compute = compute_dtype or workload.dtype
    wd = memory.canonical_dtype(weight_dtype or workload.dtype)
    kd = memory.canonical_dtype(kv_dtype or workload.dtype)
    act = workload.dtype
    B, P, G = workload.batch_size, workload.prompt_len, workload.gen_len
    knobs = dict(compute_efficiency=compute_efficiency, bandwidth_efficiency=bandwidth_efficiency,
                 launch_overhead_us=launch_overhead_us)
    rows = []
    for subblock, kind, variants in (("attention", AttentionConfig, attention_variants), ("ffn", FFNConfig, ffn_variants)):
        for v in variants:
            v = kind.from_id(v) if isinstance(v, str) else v
            pre = subblock_work(config, v, B, P, P, weight_dtype=wd, act_dtype=act, kv_dtype=kd)
            dec = subblock_work(config, v, B, 1, workload.decode_context, weight_dtype=wd, act_dtype=act, kv_dtype=kd,
                                decode=True)
            t_pre, b_pre = roofline_seconds(pre, spec, compute, **knobs)
            t_dec, b_dec = roofline_seconds(dec, spec, compute, **knobs)
            nbytes = memory.subblock_weight_bytes(config, v, wd)
            if subblock == "attention":
                nbytes += memory.kv_cache_bytes(config, v, B, workload.kv_len, kd)
            rows.append({"subblock": subblock, "variant": v.id, "prefill_ms": t_pre * 1e3, "decode_ms": t_dec * 1e3,
                         "runtime_ms": (t_pre + G * t_dec) * 1e3, "memory_mib": nbytes / memory.MIB,
                         "params": memory.subblock_params(config, v), "prefill_bound": b_pre, "decode_bound": b_dec,
                         "prefill_gflop": pre.flops / 1e9, "decode_gflop": dec.flops / 1e9,
                         "prefill_mb": pre.bytes / 1e6, "decode_mb": dec.bytes / 1e6})
    df = pd.DataFrame(rows)
    df.attrs.update(estimate_meta(workload, spec, compute, wd, kd, **knobs))
    return df


def estimate_meta(workload: Workload, spec: DeviceSpec, compute: str, weight_dtype: str, kv_dtype: str, **knobs) -> dict:
    return {"device": "cuda", "device_name": spec.name, "dtype": workload.dtype, "compute_dtype": compute,
            "weight_dtype": weight_dtype, "kv_dtype": kv_dtype, "batch_size": workload.batch_size,
            "prompt_len": workload.prompt_len, "gen_len": workload.gen_len, "decode_context": workload.decode_context,
            "estimated": True, "spec_source": spec.source, **knobs}


def estimate_non_block_costs(config: ModelConfig, workload: Workload, spec: DeviceSpec | str, *,
                             compute_dtype: str | None = None, weight_dtype: str | None = None,
                             compute_efficiency: float = 1.0, bandwidth_efficiency: float = 1.0,
                             launch_overhead_us: float = 0.0) -> dict:
    """The non-block costs (same keys as `measure_non_block_costs`), estimated by the roofline."""
    spec = gpu_spec(spec) if isinstance(spec, str) else spec
    compute = compute_dtype or workload.dtype
    wd = memory.canonical_dtype(weight_dtype or workload.dtype)
    knobs = dict(compute_efficiency=compute_efficiency, bandwidth_efficiency=bandwidth_efficiency,
                 launch_overhead_us=launch_overhead_us)
    B, P, G = workload.batch_size, workload.prompt_len, workload.gen_len
    t_pre, _ = roofline_seconds(non_block_work(config, B, P, weight_dtype=wd, act_dtype=workload.dtype), spec, compute, **knobs)
    t_dec, _ = roofline_seconds(non_block_work(config, B, 1, weight_dtype=wd, act_dtype=workload.dtype), spec, compute, **knobs)
    return {"prefill_ms": t_pre * 1e3, "decode_ms": t_dec * 1e3, "runtime_ms": (t_pre + G * t_dec) * 1e3,
            "memory_mib": memory.non_block_memory_bytes(config, wd) / memory.MIB, "params": memory.non_block_params(config),
            "prefill_iqr_ms": 0.0, "decode_iqr_ms": 0.0}


def estimate_model(config: ModelConfig, workload: Workload, spec: DeviceSpec | str, **kwargs) -> dict:
    """Whole-model roofline estimate: prefill_ms, decode_ms, runtime_ms, memory_mib, params, the tok/s
    figures of `cost.throughputs`, and fits_memory (weights + KV cache within the memory the driver reports,
    `DeviceSpec.memory_gib`; the CUDA context and activations, a few hundred MiB more, are not counted).

    `kwargs` go to `estimate_subblock_costs` / `estimate_non_block_costs` (dtypes, efficiencies).
    """
    spec = gpu_spec(spec) if isinstance(spec, str) else spec
    attention = sorted({b.attention for b in config.blocks}, key=lambda v: v.id)
    ffn = sorted({b.ffn for b in config.blocks}, key=lambda v: v.id)
    table = estimate_subblock_costs(config, attention, ffn, workload, spec, **kwargs)
    nb_kwargs = {k: v for k, v in kwargs.items() if k != "kv_dtype"}
    totals = predict_totals(select_rows(table, config), estimate_non_block_costs(config, workload, spec, **nb_kwargs),
                            workload)
    totals["fits_memory"] = bool(totals["memory_mib"] <= spec.memory_gib * 1024)
    totals["device_name"] = spec.name
    return totals


def compare_with_measurement(estimated: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Measured vs estimated per subblock variant (or per model: any frames keyed by `variant` or `name`).

    Returns:
        DataFrame: the key columns, then for prefill_ms, decode_ms and runtime_ms the estimate, the
        measurement and ratio = measured / estimated (> 1: slower than the roofline says; the
        roofline with efficiencies 1 is a lower bound, so a ratio below 1 points at wrong peak numbers
        or a wrong work count). no_op rows (0 / 0) are dropped.

    Raises:
        PuzzleError: no common rows.
    """
    keys = [k for k in ("subblock", "variant") if k in estimated.columns and k in measured.columns] or ["name"]
    cols = [c for c in ("prefill_ms", "decode_ms", "runtime_ms") if c in estimated.columns and c in measured.columns]
    merged = estimated[keys + cols].merge(measured[keys + cols], on=keys, suffixes=("_est", "_meas"))
    if merged.empty:
        raise PuzzleError(f"the estimate and the measurement share no {'/'.join(keys)}; compare the same variants")
    out = merged[keys].copy()
    for c in cols:
        out[f"{c}_est"] = merged[f"{c}_est"]
        out[f"{c}_meas"] = merged[f"{c}_meas"]
        out[f"{c.removesuffix('_ms')}_ratio"] = merged[f"{c}_meas"] / merged[f"{c}_est"].where(merged[f"{c}_est"] > 0)
    return out[~(merged[[f"{c}_est" for c in cols]] == 0).all(axis=1)].reset_index(drop=True)


__all__ = ["DeviceSpec", "GPUS", "KERNELS", "Work", "compare_with_measurement", "estimate_model",
           "estimate_non_block_costs", "estimate_subblock_costs", "gpu_spec", "non_block_work", "roofline_seconds",
           "subblock_work", "COST_COLUMNS"]
