"""Measured cost tables (scoring/cost.py) and the memory model (scoring/memory.py), on tiny models."""

import json
import math
import os
import platform

import pandas as pd
import pytest
import torch

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.errors import PuzzleError
from puzzle.modeling import DecoderBlock, KVCache, PuzzleForCausalLM
from puzzle.scoring import memory
from puzzle.scoring.cost import (
    TABLE_COLUMNS, Workload, additivity_report, measure_model, measure_models, measure_non_block_costs,
    measure_subblock_costs, predict_totals, select_rows,
)

A, F = AttentionConfig.from_id, FFNConfig.from_id


def tiny_config(layers=4, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=128, **kw) -> ModelConfig:
    parent = BlockConfig(AttentionConfig("gqa", kv_heads), FFNConfig("swiglu", ffn))
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, intermediate_size=ffn, blocks=(parent,) * layers, **kw)


def mixed_child(config: ModelConfig) -> ModelConfig:
    blocks = [BlockConfig(A("attn-kv2"), F("ffn-128")), BlockConfig(A("attn-linear"), F("ffn-64")),
              BlockConfig(A("attn-noop"), F("ffn-noop")), BlockConfig(A("attn-kv1"), F("ffn-linear"))]
    return config.with_blocks(blocks)


FAST = dict(repeats=2, warmup=1)
W = Workload(batch_size=2, prompt_len=8, gen_len=4, num_threads=1)


# ------------------------------------------------------------------------------------------------
# Workload


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0, prompt_len=8, gen_len=4), "batch_size"),
    (dict(batch_size=2, prompt_len=-1, gen_len=4), "prompt_len"),
    (dict(batch_size=2, prompt_len=8, gen_len=1.5), "gen_len"),
    (dict(batch_size=True, prompt_len=8, gen_len=4), "batch_size"),
    (dict(batch_size=2, prompt_len=8, gen_len=4, dtype="int8"), "dtype"),
    (dict(batch_size=2, prompt_len=8, gen_len=4, dtype="fp8"), "storage format"),
    (dict(batch_size=2, prompt_len=8, gen_len=4, device="tpu"), "device"),
    (dict(batch_size=2, prompt_len=8, gen_len=4, num_threads=0), "num_threads"),
])
def test_workload_rejects_bad_values(kwargs, match):
    with pytest.raises(PuzzleError, match=match):
        Workload(**kwargs)


def test_workload_derived_sizes_and_aliases():
    w = Workload(4, 256, 64, dtype="bf16")
    assert w.dtype == "bfloat16" and w.torch_dtype == torch.bfloat16
    assert w.decode_context == 256 + 32 and w.kv_len == 320
    meta = w.meta()
    assert meta["device_name"] and meta["torch_version"] == torch.__version__ and meta["batch_size"] == 4
    w.check_meta(meta)
    with pytest.raises(PuzzleError, match="batch_size"):
        Workload(8, 256, 64, dtype="bf16").check_meta(meta)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_workload_without_cuda():
    w = Workload(1, 4, 2, device="cuda", dtype="bf16")  # declaring one is fine: its tables can be read and checked
    measured_elsewhere = {**w.meta(), "device_name": "NVIDIA H200"}
    w.check_meta(measured_elsewhere)
    with pytest.raises(PuzzleError, match="device"):
        Workload(1, 4, 2, dtype="bf16").check_meta(measured_elsewhere)
    with pytest.raises(PuzzleError, match="CUDA"):
        measure_non_block_costs(tiny_config(), w)


def test_clock_must_fit_threads():
    with pytest.raises(PuzzleError, match="num_threads=1"):
        measure_non_block_costs(tiny_config(), Workload(1, 4, 2, num_threads=2), clock="cpu")
    with pytest.raises(PuzzleError, match="clock"):
        measure_non_block_costs(tiny_config(), W, clock="sundial")


# ------------------------------------------------------------------------------------------------
# Memory model


@pytest.mark.parametrize("bias, tied", [(False, False), (True, True)])
def test_subblock_params_match_the_modules(bias, tied):
    config = tiny_config(attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied)
    for v in (A("attn-kv2"), A("attn-kv1"), A("attn-linear"), A("attn-noop")):
        block = DecoderBlock(config, BlockConfig(v, F("ffn-noop")), 0)
        assert memory.subblock_params(config, v) == sum(p.numel() for p in block.parameters()), v.id
    for v in (F("ffn-128"), F("ffn-96"), F("ffn-linear"), F("ffn-noop")):
        block = DecoderBlock(config, BlockConfig(A("attn-noop"), v), 0)
        assert memory.subblock_params(config, v) == sum(p.numel() for p in block.parameters()), v.id
    child = mixed_child(config)
    assert memory.model_params(child) == PuzzleForCausalLM(child).num_parameters()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_model_memory_equals_real_parameters_and_cache(dtype):
    child = mixed_child(tiny_config())
    model = PuzzleForCausalLM(child).to(getattr(torch, dtype))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = KVCache(child, batch_size=3, max_len=20, dtype=getattr(torch, dtype))
    assert memory.model_memory_bytes(child, 3, 20, dtype) == param_bytes + cache.nbytes()


def test_kv_cache_formula_and_dtypes():
    config = tiny_config()  # head_dim 16
    kv = lambda d: memory.kv_cache_bytes(config, A("attn-kv2"), batch_size=3, seq_len=10, kv_dtype=d)
    assert kv("fp32") == 2 * 2 * 16 * 4 * 10 * 3
    assert kv("bf16") == kv("fp16") == kv("fp32") // 2 and kv("fp8") == kv("fp32") // 4
    assert memory.kv_cache_bytes(config, A("attn-linear"), 3, 10, "fp32") == 0
    # weights and cache in different dtypes: fp8 cache beside bf16 weights
    mixed = memory.subblock_memory_bytes(config, A("attn-kv2"), 3, 10, "bf16", kv_dtype="fp8")
    assert mixed == memory.subblock_params(config, A("attn-kv2")) * 2 + kv("fp8")
    assert memory.dtype_bytes(torch.bfloat16) == 2
    with pytest.raises(PuzzleError, match="int4"):
        memory.dtype_bytes("int4")


# ------------------------------------------------------------------------------------------------
# Subblock and non-block tables


def test_subblock_table_has_one_row_per_variant_and_zero_no_op():
    config = tiny_config()
    attention = [A("attn-kv2"), "attn-kv1", "attn-linear", "attn-noop", "attn-kv2"]  # a duplicate, ids and configs
    ffn = ["ffn-128", "ffn-64", "ffn-linear", "ffn-noop"]
    threads = torch.get_num_threads()
    df = measure_subblock_costs(config, attention, ffn, W, **FAST)
    assert torch.get_num_threads() == threads  # restored after measuring
    assert list(df.columns) == list(TABLE_COLUMNS)
    assert list(df["variant"]) == ["attn-kv2", "attn-kv1", "attn-linear", "attn-noop",
                                   "ffn-128", "ffn-64", "ffn-linear", "ffn-noop"]
    assert list(df["subblock"]) == ["attention"] * 4 + ["ffn"] * 4
    noop = df[df["variant"].str.endswith("noop")]
    assert (noop[list(TABLE_COLUMNS[2:])] == 0).all().all()
    real = df[~df["variant"].str.endswith("noop")]
    assert (real["prefill_ms"] > 0).all() and (real["decode_ms"] > 0).all()
    assert real["runtime_ms"].tolist() == pytest.approx((real["prefill_ms"] + W.gen_len * real["decode_ms"]).tolist())
    kv2 = df.set_index("variant").loc["attn-kv2"]
    assert kv2["params"] == memory.subblock_params(config, A("attn-kv2"))
    assert kv2["memory_mib"] * memory.MIB == memory.subblock_memory_bytes(config, A("attn-kv2"), 2, 8 + 4)
    assert df.attrs["clock"] == "wall" and df.attrs["num_threads"] == 1
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert df.attrs["allocator"] == "glibc-pinned"


def test_invalid_variant_is_a_clear_error():
    with pytest.raises(PuzzleError, match="attn-kv3"):
        measure_subblock_costs(tiny_config(), ["attn-kv3"], [], W, **FAST)  # 3 does not divide 4 heads
    with pytest.raises(PuzzleError, match="unknown"):
        measure_subblock_costs(tiny_config(), ["attn-kv"], [], W, **FAST)


def test_wider_ffn_costs_more():
    # 64x the work: far beyond any noise of a shared machine, at a size still timed in well under a second
    config = tiny_config(layers=2, hidden=256, heads=4, kv_heads=2, ffn=4096)
    w = Workload(batch_size=1, prompt_len=128, gen_len=4, num_threads=1)
    df = measure_subblock_costs(config, [], ["ffn-4096", "ffn-64"], w, repeats=3, warmup=1).set_index("variant")
    assert df.loc["ffn-4096", "prefill_ms"] > 2 * df.loc["ffn-64", "prefill_ms"]
    assert df.loc["ffn-4096", "decode_ms"] > 2 * df.loc["ffn-64", "decode_ms"]


def test_cpu_clock_runs_single_threaded():
    df = measure_subblock_costs(tiny_config(), ["attn-kv2"], ["ffn-128"], W, clock="cpu", **FAST)
    assert (df["decode_ms"] > 0).all() and df.attrs["clock"] == "cpu"


@pytest.mark.parametrize("tied", [False, True])
def test_non_block_costs(tied):
    config = tiny_config(tie_word_embeddings=tied)
    nb = measure_non_block_costs(config, W, **FAST)
    assert nb["params"] == 128 * 64 * (1 if tied else 2) + 64
    assert nb["memory_mib"] * memory.MIB == nb["params"] * 4
    assert nb["prefill_ms"] > 0 and nb["decode_ms"] > 0
    assert nb["runtime_ms"] == pytest.approx(nb["prefill_ms"] + W.gen_len * nb["decode_ms"])


# ------------------------------------------------------------------------------------------------
# Whole models and prediction


def test_measure_model_runs_a_heterogeneous_child():
    child = mixed_child(tiny_config())
    model = PuzzleForCausalLM(child).eval()
    m = measure_model(model, W, **FAST)
    B, P, G = W.batch_size, W.prompt_len, W.gen_len
    assert m["params"] == model.num_parameters() == memory.model_params(child)
    assert m["memory_mib"] * memory.MIB == memory.model_memory_bytes(child, B, P + G)
    assert m["prefill_tok_s"] == pytest.approx(B * P / m["prefill_ms"] * 1e3)
    assert m["decode_tok_s"] == pytest.approx(B / m["decode_ms"] * 1e3)
    assert m["throughput_tok_s"] == pytest.approx(B * G / m["runtime_ms"] * 1e3)
    assert m["runtime_ms"] > m["prefill_ms"] > 0


def test_measure_models_keeps_order_and_checks_dtype():
    config = tiny_config()
    models = {"child": PuzzleForCausalLM(mixed_child(config)).eval(), "parent": PuzzleForCausalLM(config).eval()}
    df = measure_models(models, W, **FAST)
    assert list(df["name"]) == ["child", "parent"]
    assert df.set_index("name").loc["parent", "params"] > df.set_index("name").loc["child", "params"]
    with pytest.raises(PuzzleError, match="bfloat16"):
        measure_model(PuzzleForCausalLM(config).to(torch.bfloat16), W)


def test_step_interleaved_measurement_times_every_model_like_the_whole_request():
    config = tiny_config()
    models = {"child": PuzzleForCausalLM(mixed_child(config)).eval(), "parent": PuzzleForCausalLM(config).eval()}
    by_model = measure_models(models, W, **FAST, interleave="model").set_index("name")
    by_step = measure_models(models, W, **FAST).set_index("name")  # the default on a CPU
    assert by_step.attrs["interleave"] == "step" and by_model.attrs["interleave"] == "model"
    assert list(by_step.index) == ["child", "parent"]
    for name in models:
        assert by_step.loc[name, "params"] == by_model.loc[name, "params"]
        assert by_step.loc[name, "runtime_ms"] == pytest.approx(  # prefill + every decode step, per round
            by_step.loc[name, "prefill_ms"] + W.gen_len * by_step.loc[name, "decode_ms"], rel=1e-6)  # 2 rounds: medians are means
        rounds = by_step.attrs["runtime_rounds_ms"][name]
        assert len(rounds) == FAST["repeats"] and min(rounds) > 0
    with pytest.raises(PuzzleError, match="interleave"):
        measure_models(models, W, interleave="token")


def test_prediction_sums_the_child_rows_exactly():
    config = tiny_config()
    child = mixed_child(config)
    variants = [("attention", "attn-kv2", 1.0), ("attention", "attn-kv1", 2.0), ("attention", "attn-linear", 4.0),
                ("ffn", "ffn-128", 8.0), ("ffn", "ffn-64", 16.0), ("ffn", "ffn-linear", 32.0)]
    table = pd.DataFrame([{"subblock": s, "variant": v, "prefill_ms": x, "decode_ms": x / 10, "runtime_ms": 3 * x,
                           "memory_mib": x, "params": int(x)} for s, v, x in variants])
    non_block = {"prefill_ms": 100.0, "decode_ms": 10.0, "runtime_ms": 300.0, "memory_mib": 100.0, "params": 100}
    rows = select_rows(table, child)  # no_op absent from the table: counted as zero
    assert len(rows) == 8 and list(rows["layer"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    pred = predict_totals(rows, non_block, W)
    used = 1 + 8 + 4 + 16 + 2 + 32
    assert pred["prefill_ms"] == 100 + used and pred["runtime_ms"] == 300 + 3 * used and pred["params"] == 100 + used
    assert pred["throughput_tok_s"] == pytest.approx(W.batch_size * W.gen_len / pred["runtime_ms"] * 1e3)

    per_layer = pd.concat([table.assign(layer=i) for i in range(4)], ignore_index=True)
    per_layer.loc[(per_layer["layer"] == 0) & (per_layer["variant"] == "attn-kv2"), "prefill_ms"] = 50.0
    assert predict_totals(select_rows(per_layer, child), non_block)["prefill_ms"] == 100 + used + 49

    with pytest.raises(PuzzleError, match="ffn-96"):
        select_rows(table, config.with_blocks([BlockConfig(A("attn-kv2"), F("ffn-96"))] * 4))

    report = additivity_report(pred, {**pred, "prefill_ms": pred["prefill_ms"] / 2})
    assert report.set_index("quantity").loc["prefill_ms", "rel_error"] == pytest.approx(1.0)
    assert report.set_index("quantity").loc["params", "rel_error"] == 0
    parent_pred = {**pred, "runtime_ms": 2 * pred["runtime_ms"]}
    parent_meas = {**pred, "runtime_ms": 4 * pred["runtime_ms"]}  # the machine ran 2x slower when measuring
    drift = additivity_report(pred, {**pred, "runtime_ms": 2 * pred["runtime_ms"]}, ["runtime_ms"],
                              reference=(parent_pred, parent_meas)).iloc[0]
    assert drift["rel_error"] == pytest.approx(-0.5) and drift["ratio_error"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------
# Other processes: contention is measured, contended windows are dropped, persistent contention stops


def _busy_neighbour():
    """A subprocess spinning one core; returns it once it runs."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('go', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    return proc


linux_only = pytest.mark.skipif(not platform.system() == "Linux", reason="contention is read from /proc/stat")


@linux_only
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a CPU for the neighbour and one without it")
def test_contention_counts_a_busy_neighbour_on_any_of_the_cpus_the_measurement_may_use():
    """A neighbour counts also on a core the measurement leaves idle (cache, memory bandwidth),
    but not on a CPU outside the process's affinity."""
    import time

    from puzzle.scoring.cost import Contention

    quiet = Contention()
    quiet.start()
    time.sleep(0.5)
    if quiet.stop()[1] > 0.3:
        pytest.skip("other jobs are running on this machine: a busy neighbour would not add a core")
    mine, last = os.sched_getaffinity(0), os.cpu_count() - 1
    proc = _busy_neighbour()
    try:
        os.sched_setaffinity(proc.pid, {last})
        time.sleep(0.1)
        every = Contention()
        every.start()
        time.sleep(0.6)
        _, c_every = every.stop()
        os.sched_setaffinity(0, {0})  # this process off the neighbour's CPU
        elsewhere = Contention()
        elsewhere.start()
        time.sleep(0.6)
        _, c_elsewhere = elsewhere.stop()
    finally:
        os.sched_setaffinity(0, mine)
        proc.kill()
        proc.wait()
    assert 0.8 < c_every < 1.3  # the neighbour's core, though this process (sleeping) needs none
    assert c_elsewhere < 0.2


@linux_only
def test_persistent_contention_stops_the_measurement_and_none_measures_anyway(monkeypatch):
    import puzzle.scoring.cost as cost

    monkeypatch.setattr(cost, "MIN_WINDOW_S", 0.2)
    monkeypatch.setattr(cost, "RETRY_PAUSE_S", 0.05)
    model = PuzzleForCausalLM(tiny_config()).eval()
    every_core = Workload(batch_size=2, prompt_len=8, gen_len=4, num_threads=os.cpu_count())
    proc = _busy_neighbour()
    try:
        with pytest.raises(PuzzleError, match="Stop the other jobs"):
            measure_models({"m": model}, every_core, repeats=400, warmup=0)
        df = measure_models({"m": model}, every_core, repeats=3, warmup=0, max_contention=None)
    finally:
        proc.kill()
        proc.wait()
    assert df.attrs["rounds_dropped"] == 0 and df.loc[0, "runtime_ms"] > 0


def _simulated_neighbours(monkeypatch, min_window_s: float) -> dict:
    """2 CPUs whose busy time is this process's own plus others["busy"] seconds (add to it); no pause
    before a window is timed again."""
    import puzzle.scoring.cost as cost

    monkeypatch.setattr(cost, "MIN_WINDOW_S", min_window_s)
    monkeypatch.setattr(cost, "RETRY_PAUSE_S", 0.0)
    others = {"busy": 0.0}
    monkeypatch.setattr(cost, "_machine_busy_s", lambda cpus=None: cost._own_cpu_s() + others["busy"])
    monkeypatch.setattr(cost, "_allowed_cpus", lambda: None)
    monkeypatch.setattr(cost.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cost, "ReferenceProbe", _CountingProbe)  # instant: keeps the windows' walls known
    return others


class _CountingProbe:
    """Stands in for the machine's reference workload: the i-th sample reads (i, 10 i) ms, instantly."""

    def __init__(self, last_level_cache):
        self.calls = 0

    def sample(self):
        self.calls += 1
        return float(self.calls), 10.0 * self.calls

    def meta(self):
        return {"reference_bytes": 1}


def test_contended_windows_are_dropped_and_timed_again(monkeypatch):
    """Simulated neighbours (the machine's busy time is this process's own plus a chosen load): the
    first two windows are contended, so their rounds are timed again; three in a row stop."""
    import time

    import puzzle.scoring.cost as cost

    others = _simulated_neighbours(monkeypatch, min_window_s=0.02)
    loads = iter([0.0, 1.0, 0.9, 0.1, 0.0, 0.0])
    calls = []

    def run_round(timed):
        load = next(loads)
        calls.append(load)
        time.sleep(0.03)
        others["busy"] += load * 0.03
        return {"x": [load]}

    w = Workload(1, 4, 2, num_threads=2)
    samples, info = cost._guarded_rounds(run_round, w, repeats=3, warmup=1, max_contention=0.25, what="test")
    assert calls == [0.0, 1.0, 0.9, 0.1, 0.0, 0.0]  # warmup, 2 contended windows, 3 kept
    assert samples == {"x": [0.1, 0.0, 0.0]}
    assert info["rounds_dropped"] == 2 and 0.05 < info["contention_cores"] < 0.25
    # one probe sample per window, those of the dropped windows (the 1st and 2nd) left out, and four more
    # (samples 6 to 9) in a window of their own to reach REFERENCE_MIN_SAMPLES
    assert cost.REFERENCE_MIN_SAMPLES == 7
    assert info["reference_samples"] == 7 and (info["reference_compute_ms"], info["reference_memory_ms"]) == (6.0, 60.0)
    loads = iter([1.0] * 10)
    with pytest.raises(PuzzleError, match="3 windows in a row"):
        cost._guarded_rounds(run_round, w, repeats=3, warmup=0, max_contention=0.25, what="test")
    loads = iter([1.0] * 3)
    samples, info = cost._guarded_rounds(run_round, w, repeats=3, warmup=0, max_contention=None, what="test")
    assert samples["x"] == [1.0] * 3 and info["rounds_dropped"] == 0


def test_in_round_probe_samples_spread_over_the_measurement_and_follow_the_window(monkeypatch):
    """With probe_in_round, run_round gets a callable that takes fingerprint samples inside the round:
    they count with their window (dropped with it), and the top-up is not needed when rounds give enough."""
    import time

    import puzzle.scoring.cost as cost

    others = _simulated_neighbours(monkeypatch, min_window_s=0.02)
    loads = iter([0.0, 1.0, 0.0, 0.0, 0.0])

    def run_round(timed, probe):
        load = next(loads)
        for _ in range(3):  # three "models", a sample between them
            time.sleep(0.01)
            if timed:
                probe()
        others["busy"] += load * 0.03
        return {"x": [load]}

    w = Workload(1, 4, 2, num_threads=2)
    samples, info = cost._guarded_rounds(run_round, w, repeats=3, warmup=1, max_contention=0.25, what="test",
                                         probe_in_round=True)
    assert samples == {"x": [0.0, 0.0, 0.0]} and info["rounds_dropped"] == 1
    # 4 samples per window (3 in the round, 1 at its end); the contended window's (samples 1-4) left out,
    # 12 kept from 3 windows spread over the measurement: no top-up
    assert info["reference_samples"] == 12
    assert (info["reference_compute_ms"], info["reference_memory_ms"]) == (10.5, 105.0)


def test_whole_models_take_fingerprint_samples_between_models(monkeypatch):
    """measure_models samples the machine between the models of a round, never inside a timing."""
    import puzzle.scoring.cost as cost
    from puzzle.tiny import tiny_parent

    monkeypatch.setattr(cost, "ReferenceProbe", _CountingProbe)
    monkeypatch.setattr(cost, "MIN_WINDOW_S", 0.0)  # every round a window of its own
    model = tiny_parent(seed=0).model.eval()
    df = cost.measure_models({m: model for m in "abcd"}, Workload(1, 4, 2), repeats=3, warmup=0, max_contention=None)
    # per round 3 samples between the 4 models and one at the window's end: 12, where one sample per
    # window and the top-up would give REFERENCE_MIN_SAMPLES (7)
    assert df.attrs["reference_samples"] == 12


def test_short_windows_are_judged_with_their_tick_noise_and_the_error_quotes_the_worst(monkeypatch):
    """Windows shorter than MIN_WINDOW_S (here: every one) are judged against the limit plus
    2 * CPUs * tick / wall, and recorded as the measurement's contention less that noise (a lower bound)."""
    import time

    import puzzle.scoring.cost as cost

    others = _simulated_neighbours(monkeypatch, min_window_s=10.0)
    tick_noise = cost.Contention().tick_noise(0.09)  # 3 rounds of 30 ms on 2 CPUs
    assert tick_noise == pytest.approx(2 * 2 / os.sysconf("SC_CLK_TCK") / 0.09)

    def run_round_with(loads):
        def run_round(timed):
            load = next(loads)
            time.sleep(0.03)
            others["busy"] += load * 0.03
            return {"x": [load]}
        return run_round

    # 3 cores of others over the window: over 0.25 + noise, timed again; 0.1 core: within noise, kept
    samples, info = cost._guarded_rounds(run_round_with(iter([3.0] * 3 + [0.1] * 3)), Workload(1, 4, 2, num_threads=2),
                                         repeats=3, warmup=0, max_contention=0.25, what="test")
    assert samples["x"] == [0.1] * 3 and info["rounds_dropped"] == 3 and info["contention_cores"] == 0.0
    # reviewer: accepted with --max-contention inf, short windows next to a busy neighbour recorded no contention,
    # so a later run with 0.25 reused the table; the reading less its noise is recorded
    samples, info = cost._guarded_rounds(run_round_with(iter([3.0] * 3)), Workload(1, 4, 2, num_threads=2),
                                         repeats=3, warmup=0, max_contention=float("inf"), what="test")
    assert info["rounds_dropped"] == 0 and 1.0 < info["contention_cores"] <= 3.0  # 2.56 unless sleep overshoots
    # three contended windows in a row: the message quotes the worst of them, not the last
    loads = iter([2.0] * 3 + [4.0] * 3 + [2.5] * 3)
    with pytest.raises(PuzzleError, match=r"kept up to 3\.\d\d cores busy .* 3 windows in a row"):
        cost._guarded_rounds(run_round_with(loads), Workload(1, 4, 2, num_threads=2), repeats=3, warmup=0,
                             max_contention=0.25, what="test")


def test_run_config_takes_max_contention_in_cores(tmp_path):
    from puzzle.config import load_preset, load_run_config, save_run_config

    path = tmp_path / "p.toml"
    path.write_text("[score]\nmax_contention = inf\n")
    config = load_preset(str(path))
    assert math.isinf(config.score.max_contention)
    # the run's config.json stays strict JSON ("inf", not Infinity) and reads back as inf
    save_run_config(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["score"]["max_contention"] == "inf"
    assert math.isinf(load_run_config(tmp_path).score.max_contention)
    # a speed-up must be finite: inf, NaN (TOML literals, or "inf" as config.json spells it) and words are refused
    for section, bad in (("speedup", "inf"), ("speedup", "nan"), ("speedup", '"inf"'), ("front_speedups", "[1.5, nan]"),
                         ("front_speedups", '["fast"]'), ("speedup", "true"), ("front_speedups", '"15"'),
                         ("front_speedups", "[true]"), ("front_speedups", "[1.5, 1e-300]"), ("speedup", "0.05")):
        path.write_text(f"[search]\n{section} = {bad}\n")
        with pytest.raises(PuzzleError, match=f"search.{section} must be a (list of )?finite number"):
            load_preset(str(path))
    for bad in ("-1", "0", "nan", '"off"', "true"):
        path.write_text(f"[score]\nmax_contention = {bad}\n")
        with pytest.raises(PuzzleError, match="score.max_contention must be a number of cores"):
            load_preset(str(path))
    # timing rounds are whole numbers >= 1; the demo measures its whole models in 5 rounds
    for name in ("cost_repeats", "measure_repeats", "tokens", "position_stride", "chunk"):  # tokens: --score-tokens
        for bad in ("0", "-2", "2.5", '"3"', "true"):
            path.write_text(f"[score]\n{name} = {bad}\n")
            with pytest.raises(PuzzleError, match=f"score.{name} must be a whole number"):
                load_preset(str(path))
    for name in ("cost_repeats", "measure_repeats"):  # breaker: 1000000 timed on for good
        path.write_text(f"[score]\n{name} = 1000001\n")
        with pytest.raises(PuzzleError, match=f"score.{name} must be a whole number of timing rounds from 1 to 1000"):
            load_preset(str(path))
    path.write_text("[score]\nmeasure_repeats = 7\n")
    assert load_preset(str(path)).score.measure_repeats == 7
    assert load_preset("smollm2-demo").score.measure_repeats == 5 and load_preset("tiny").score.measure_repeats == 3


def test_target_device_must_be_cpu_or_a_cuda_index(tmp_path):
    from puzzle.cli import _resolve_config, build_parser

    for bad in ("cudafoo", "cuda:x", "cuda:", "gpu"):  # 'cuda:x' passed and failed later in torch.device
        with pytest.raises(PuzzleError, match="--device must be 'cpu' or 'cuda"):
            _resolve_config(build_parser().parse_args(["run", "--out", str(tmp_path), "--preset", "tiny",
                                                       "--device", bad]), tmp_path)


def test_score_tokens_and_front_speedups_flags_are_checked(tmp_path):
    from puzzle.cli import _resolve_config, build_parser

    def resolve(*flags):
        return _resolve_config(build_parser().parse_args(["run", "--out", str(tmp_path), "--preset", "tiny", *flags]),
                               tmp_path)

    for bad in ("0", "-5"):  # was accepted and became one sequence
        with pytest.raises(PuzzleError, match="score.tokens must be a whole number >= 1"):
            resolve("--score-tokens", bad)
    for bad in ("", "1.5,", "fast"):  # "" was ignored
        with pytest.raises(PuzzleError, match="--front-speedups"):
            resolve("--front-speedups", bad)
    assert resolve("--front-speedups", "1.25x,2").search.front_speedups == (1.25, 2.0)  # like --speedup 1.5x


def test_max_contention_flag_reaches_the_run_config(tmp_path):
    from puzzle.cli import _resolve_config, build_parser, main

    args = build_parser().parse_args(["score", "--out", str(tmp_path), "--preset", "tiny", "--max-contention", "inf"])
    assert math.isinf(_resolve_config(args, tmp_path).score.max_contention)
    args = build_parser().parse_args(["score", "--out", str(tmp_path), "--preset", "tiny", "--max-contention", "0.5"])
    assert _resolve_config(args, tmp_path).score.max_contention == 0.5
    assert main(["score", "--out", str(tmp_path), "--preset", "tiny", "--max-contention", "-1"]) == 2


def test_the_contention_error_names_the_flag_of_every_command_that_times():
    """Every command that times models takes --max-contention (realize, front, refine and baselines too): the advice
    no longer sends those to DIR/config.json."""
    from puzzle.scoring import cost

    error = str(cost._contention_error(0.9, 0.25, W, "the children", 2))
    assert "`--max-contention inf` on the same command" in error
    assert "realize, front, refine, baselines and fuse take it" in error and "take it from DIR/config.json" not in error


def test_contention_limits_are_checked_and_stale_tables_are_timed_again():
    from puzzle.pipeline import _stale_timing
    from puzzle.scoring.cost import check_max_contention

    assert check_max_contention(None) is None and math.isinf(check_max_contention(float("inf")))
    for bad in (0, -1, float("nan"), "0.5", True):
        with pytest.raises(PuzzleError, match="max_contention must be a number of cores > 0.*; None: no check"):
            check_max_contention(bad)
    from puzzle.config import RunConfig

    with pytest.raises(PuzzleError) as e:  # a run's setting takes no None: the message does not offer it
        RunConfig.from_dict({"score": {"max_contention": 0}})
    assert str(e.value).startswith("score.max_contention must be a number of cores > 0") and "None" not in str(e.value)
    with pytest.raises(PuzzleError, match="max_contention"):  # refused before any timing, whatever the window length
        measure_models({"m": PuzzleForCausalLM(tiny_config()).eval()}, W, repeats=1, max_contention=float("nan"))
    ok = {"num_threads": 2, "contention_cores": 0.01}
    assert _stale_timing(ok, 2, 0.25) is None and _stale_timing({"num_threads": 2}, 2, 0.25) is None
    assert "2 threads" in _stale_timing(ok, 1, 0.25)
    assert "0.7 cores" in _stale_timing({**ok, "contention_cores": 0.7}, 2, 0.25)  # accepted with inf, not at 0.25
    assert _stale_timing({**ok, "contention_cores": 0.7}, 2, float("inf")) is None
    assert "unreadable contention '0.3'" in _stale_timing({**ok, "contention_cores": "0.3"}, 2, 0.25)  # hand-edited
    assert "unreadable thread count '2'" in _stale_timing({**ok, "num_threads": "2"}, 2, 0.25)
    # breaker: a changed score.cost_repeats kept the table without a word; a table that records none is kept
    assert "timed with 3 repeats per variant and score.cost_repeats is now 5" in \
        _stale_timing({**ok, "cost_repeats": 3}, 2, 0.25, 5)
    assert _stale_timing({**ok, "cost_repeats": 5}, 2, 0.25, 5) is None and _stale_timing(ok, 2, 0.25, 5) is None


def test_a_scored_runs_cost_table_records_its_repeats(tmp_path_factory):
    """What `_stale_timing` compares: `stage_cost` writes score.cost_repeats beside the table (the tiny run: 3)."""
    from puzzle.io import load_table
    from tiny_run import tiny_run_dir

    _, meta = load_table(tiny_run_dir(tmp_path_factory) / "score" / "cost.csv")
    assert meta["cost_repeats"] == 3


@linux_only
def test_busy_time_of_the_allowed_cpus_adds_up_to_the_machine_total():
    from puzzle.scoring.cost import _machine_busy_s

    every = set(range(os.cpu_count()))
    per_cpu, total = _machine_busy_s(every), _machine_busy_s()
    assert per_cpu == pytest.approx(total, abs=0.05 * os.cpu_count())  # a few ticks apart at most
    assert _machine_busy_s({0}) <= per_cpu


def test_a_packaged_preset_name_is_not_shadowed_by_a_folder_of_that_name(tmp_path, monkeypatch):
    """Breaker: `--preset tiny` run where a folder ./tiny exists (e.g. a run directory) said 'preset file tiny does
    not exist'; a folder given as a preset is named as a folder."""
    from puzzle.config import load_preset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert load_preset("tiny").parent.path == "tiny"  # the packaged preset
    (tmp_path / "mine").mkdir()
    with pytest.raises(PuzzleError, match="preset mine is a folder"):
        load_preset("mine")


def test_memory_functions_refuse_counts_and_kv_heads_no_model_could_have():
    """Reviewer: kv_cache_bytes(cfg, gqa, -2, 10) gave -2560 bytes, and subblock_params took 4 KV heads beside 9 query
    heads, which `ModelConfig` refuses."""
    config = tiny_config()  # 4 query heads
    for b, s in ((-2, 10), (2, -1), (1.5, 10), (True, 10)):
        with pytest.raises(PuzzleError, match="must be a whole number >= 0"):
            memory.kv_cache_bytes(config, A("attn-kv2"), b, s, "bf16")
        with pytest.raises(PuzzleError, match="must be a whole number >= 0"):
            memory.model_memory_bytes(config, b, s, "bf16")
    for g in (3, 8):
        with pytest.raises(PuzzleError, match=f"{g} KV heads do not divide the model's 4 query heads"):
            memory.subblock_params(config, A(f"attn-kv{g}"))
    import numpy as np

    assert memory.kv_cache_bytes(config, A("attn-kv2"), np.int64(3), 10, "fp32") == 2 * 2 * 16 * 4 * 10 * 3
    # breaker: numpy int32 counts multiplied in 32 bits and wrapped to 0 bytes
    big = memory.kv_cache_bytes(config, A("attn-kv2"), np.int32(4096), np.int32(131072), "fp32")
    assert big == 2 * 2 * 16 * 4 * 4096 * 131072 and isinstance(big, int)
    assert memory.model_memory_bytes(config, np.int32(4096), np.int32(131072)) > big


def test_to_workload_gives_the_model_itself_or_a_copy_on_the_target():
    """`to_workload`: the pipeline keeps its models in the parent's dtype and times copies in the target's."""
    from puzzle.scoring.cost import to_workload
    from puzzle.tiny import tiny_parent

    model = tiny_parent().model.eval()
    fp32 = Workload(1, 4, 2, dtype="float32")
    assert to_workload(model, fp32) is model
    bf16 = to_workload(model, Workload(1, 4, 2, dtype="bfloat16"))
    assert bf16 is not model and not bf16.training
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is left as it was
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE tables stay fp32
    assert model.config.tie_word_embeddings and bf16.lm_head.weight is bf16.model.embed_tokens.weight  # tied still
    assert not any(p.requires_grad for p in bf16.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.allclose(bf16(ids).float(), model(ids), atol=0.1)
    if not torch.cuda.is_available():
        with pytest.raises(PuzzleError, match="CUDA"):
            to_workload(model, Workload(1, 4, 2, device="cuda", dtype="bfloat16"))


def test_additivity_benchmark_names_each_target_once_and_takes_the_runs_contention_setting(tmp_path_factory, tmp_path,
                                                                                           capsys):
    """benchmarks/additivity.py (breaker): 1.5,1.5,2 labelled the 2x child with target 1.5 (names of 2 decimals, targets
    by position), a busy machine's refusal was a traceback naming --max-contention, which it did not take, and the
    run's saved setting was not used."""
    from tiny_run import load_benchmark, tiny_run_dir

    bench = load_benchmark("additivity")
    run_dir = tiny_run_dir(tmp_path_factory)  # its config.json: max_contention inf, taken by default
    argv = ["--run", str(run_dir), "--out", str(tmp_path / "o"), "--speedups", "1.25,1.25,1.5", "--repeats", "2",
            "--cost-repeats", "2"]
    assert bench.main(argv) == 0
    rows = pd.read_csv(tmp_path / "o" / "additivity.csv").set_index("name")
    assert rows["target_speedup"].to_dict() == {"parent": 1.0, "child-1.25x": 1.25, "child-1.5x": 1.5}
    assert bench.main([*argv[:4], "--speedups", "1.5", "--max-contention", "inf"]) == 0
    capsys.readouterr()
    assert bench.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("additivity: error: ") and "Traceback" not in err and not (tmp_path / "o2").exists()


def test_a_workload_whose_caches_cannot_fit_is_refused_before_timing_and_the_setting_put_back(tmp_path_factory,
                                                                                              tmp_path, capsys):
    """Breaker: `puzzle score --prompt-len 100000000` was killed by the OOM killer (the setting stayed saved), and
    --batch-size 100000000 ended in the allocator's traceback."""
    from puzzle.cli import main
    from puzzle.scoring.cost import check_workload_fits, workload_bytes
    from tiny_run import tiny_run_copy

    config, w = tiny_config(), Workload(batch_size=3, prompt_len=10, gen_len=6)
    kv = sum(KVCache(config, 3, 16, torch.float32, "meta").nbytes() for _ in range(2))  # two models' caches
    assert workload_bytes([config, config], w) == kv + 3 * 10 * (2 * 64 + max(2 * (4 + 2) * 16, 3 * 128)) * 4
    check_workload_fits([config], w, "a model")  # a few KB: fits
    with pytest.raises(PuzzleError, match=r"timing 2 models at batch 3, prompt 100000000 \+ 6 generated tokens needs "
                                          r"at least .* GiB .* lower --batch-size, --prompt-len or --gen-len"):
        check_workload_fits([config, config], Workload(batch_size=3, prompt_len=100_000_000, gen_len=6), "2 models")
    run, files = tiny_run_copy(tmp_path_factory, tmp_path / "run")
    before = (run / "config.json").read_bytes()
    for flag, value in (("--prompt-len", "100000000"), ("--batch-size", "100000000")):
        assert main(["score", "--out", str(run), "--no-progress", "--retime", flag, value]) == 2
        err = capsys.readouterr().err
        assert "for KV caches and activations" in err and "Traceback" not in err, err
        assert (run / "config.json").read_bytes() == before  # the setting is put back: search reads the old one
    files.pop(run / "config.json")  # put back byte for byte; nothing else written
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p != run / "config.json"} == files


def test_a_thread_count_past_any_machine_is_refused_and_one_past_this_machine_is_warned_of(monkeypatch):
    """Breaker: target.threads = 1e17 passed the configuration and crashed torch.set_num_threads with a traceback;
    64 threads on 2 cores timed about 40x slow without a word."""
    from puzzle.config import MAX_THREADS, TargetConfig
    from puzzle.scoring import cost

    with pytest.raises(PuzzleError, match=rf"target.threads must be a whole number from 1 to {MAX_THREADS}"):
        TargetConfig(threads=10**17)
    monkeypatch.setattr(cost.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # the CPUs it may use
    before = torch.get_num_threads()
    with pytest.warns(UserWarning, match=r"target.threads 3 is more than the 2 CPUs this process may use: the "
                                         r"threads share cores, and the timings run slow"):
        with cost._fixed_threads(Workload(batch_size=1, prompt_len=4, gen_len=2, num_threads=3)):
            assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
