"""The machine-speed fingerprint (scoring/machine.py): the probe, the drift between two measurements,
and where it is recorded (cost tables, whole-model measurements, the pipeline's children/machine.json)."""

import json
import math
from types import SimpleNamespace

import pytest

from puzzle.modeling import PuzzleForCausalLM
from puzzle.scoring.cost import Workload, last_level_cache_bytes, measure_models, measure_subblock_costs
from puzzle.scoring.machine import (DRIFT_WARN, REFERENCE_MIN_BYTES, ReferenceProbe, drift_message, machine_drift,
                                    reference_bytes, summarize)

from test_cost import A, F, tiny_config


def test_the_memory_part_copies_more_than_the_last_level_cache():
    assert reference_bytes(0) == REFERENCE_MIN_BYTES
    assert reference_bytes(96 * 2**20) == 192 * 2**20
    probe = ReferenceProbe(last_level_cache_bytes("cpu"))
    assert probe.nbytes >= 2 * last_level_cache_bytes("cpu") and probe.src.numel() * 4 == probe.nbytes
    compute_ms, memory_ms = probe.sample()
    assert compute_ms > 0 and memory_ms > 0
    assert bool((probe.dst == probe.src).all())  # the copy really happened
    assert ReferenceProbe(last_level_cache_bytes("cpu")).src is probe.src  # buffers kept for the process


def test_summary_is_the_median_per_part():
    s = summarize([(1.0, 10.0), (3.0, 30.0), (2.0, 50.0)])
    assert (s["reference_compute_ms"], s["reference_memory_ms"], s["reference_samples"]) == (2.0, 30.0, 3)
    empty = summarize([])
    assert math.isnan(empty["reference_compute_ms"]) and empty["reference_samples"] == 0


def test_drift_is_after_over_before_and_nan_where_it_cannot_be_read():
    before = {"reference_compute_ms": 10.0, "reference_memory_ms": 20.0, "reference_bytes": 64}
    after = {"reference_compute_ms": 10.5, "reference_memory_ms": 26.0, "reference_bytes": 64}
    assert machine_drift(before, after) == pytest.approx({"compute": 1.05, "memory": 1.3})
    for bad in ({}, {"reference_compute_ms": "fast", "reference_memory_ms": None},
                {"reference_compute_ms": 0.0, "reference_memory_ms": -1.0},
                {"reference_compute_ms": math.inf, "reference_memory_ms": math.nan}):
        assert all(math.isnan(v) for v in machine_drift(before, bad).values())
        assert all(math.isnan(v) for v in machine_drift(bad, after).values())
    other_size = {**after, "reference_bytes": 128}
    assert all(math.isnan(v) for v in machine_drift(before, other_size).values())


def test_message_only_beyond_the_warning_threshold():
    assert drift_message({"compute": 1.0 + DRIFT_WARN / 2, "memory": 1.0 - DRIFT_WARN / 2}, "a", "b") is None
    assert drift_message({"compute": math.nan, "memory": math.nan}, "a", "b") is None
    # either way by the same factor (a fresh user's 0.72x as long, 1.39x as fast, went unwarned)
    assert "0.72x as long, 1.39x as fast" in drift_message({"compute": 1.0, "memory": 0.72}, "a", "b")
    assert drift_message({"compute": 1 / (1 + DRIFT_WARN / 2), "memory": 1.0}, "a", "b") is None
    msg = drift_message({"compute": 1.02, "memory": 1.45}, "the cost table's timing", "the children's measurement")
    assert "its memory part took 1.45x as long" in msg and "compute" not in msg and "the children's measurement" in msg
    assert "its compute part took 0.29x as long, 3.45x as fast" in drift_message({"compute": 0.29, "memory": 1.0}, "a", "b")


def test_cpu_measurements_record_the_fingerprint():
    config = tiny_config()
    w = Workload(batch_size=2, prompt_len=8, gen_len=4, num_threads=1)
    # the top-up window is dropped when other jobs keep the cores busy, as any window is: accept every window here
    df = measure_models({"m": PuzzleForCausalLM(config).eval()}, w, repeats=2, warmup=0, max_contention=float("inf"))
    assert df.attrs["reference_samples"] >= 7 and df.attrs["reference_memory_ms"] > 0  # topped up to 7
    assert df.attrs["reference_compute_ms"] > 0 and df.attrs["reference_bytes"] >= REFERENCE_MIN_BYTES
    table = measure_subblock_costs(config, [A("attn-kv1")], [F("ffn-64")], w, repeats=2, warmup=0,
                                   max_contention=float("inf"))
    assert table.attrs["reference_samples"] >= 7 and table.attrs["reference_memory_ms"] > 0


def test_the_pipeline_compares_the_children_with_the_cost_table(tmp_path):
    from puzzle.pipeline import check_machine_drift

    (tmp_path / "score").mkdir()
    said = []
    run = SimpleNamespace(out=tmp_path, say=said.append)
    table = {"reference_compute_ms": 8.0, "reference_memory_ms": 13.0, "reference_samples": 40, "reference_bytes": 64}
    (tmp_path / "score" / "cost.csv.json").write_text(json.dumps(table))
    drift = check_machine_drift(run, {**table, "reference_memory_ms": 19.5, "reference_samples": 3})
    assert drift == pytest.approx({"compute": 1.0, "memory": 1.5})
    rec = json.loads((tmp_path / "children" / "machine.json").read_text())
    assert rec["cost_table"]["reference_memory_ms"] == 13.0 and rec["children"]["reference_memory_ms"] == 19.5
    assert rec["drift"] == {"compute": 1.0, "memory": 1.5}
    assert len(said) == 1 and "its memory part took 1.50x as long" in said[0]
    assert said[0].endswith(f"(`puzzle front --out {tmp_path} --remeasure` times the children again).")  # fresh user
    # a table timed before fingerprints were recorded: nothing to compare, nothing said
    (tmp_path / "score" / "cost.csv.json").write_text(json.dumps({"rounds_dropped": 0}))
    assert all(math.isnan(v) for v in check_machine_drift(run, table).values()) and len(said) == 1
    assert json.loads((tmp_path / "children" / "machine.json").read_text())["drift"] == {"compute": None, "memory": None}


def test_the_probe_works_in_and_out_of_inference_mode():
    import torch

    from puzzle.scoring import machine

    machine._buffers.clear()
    with torch.inference_mode():
        ReferenceProbe(0).sample()  # buffers allocated here ...
    assert min(ReferenceProbe(0).sample()) > 0  # ... still writable outside inference mode


def test_hand_edited_values_are_not_read_as_timings():
    import numpy as np

    from puzzle.scoring.machine import machine_record

    good = {"reference_compute_ms": 8.0, "reference_memory_ms": 13.0}
    for bad in ("4.0", True, -8.0, [8.0], None):
        edited = {"reference_compute_ms": bad, "reference_memory_ms": bad}
        assert machine_record(edited) == {}
        assert all(math.isnan(v) for v in machine_drift(edited, good).values())
    # numpy numbers (a row read back from remeasure.csv) are numbers
    assert machine_record({"reference_memory_ms": np.float64(13.0), "reference_samples": np.int64(7)}) == {
        "reference_memory_ms": 13.0, "reference_samples": 7}
    assert math.isnan(machine_drift({"reference_memory_ms": 1e-320}, good)["memory"])  # 13 / 1e-320 overflows


def test_the_probe_is_float32_whatever_the_default_dtype(monkeypatch):
    import torch

    from puzzle.scoring import machine

    monkeypatch.setattr(machine, "_buffers", {})
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        probe = ReferenceProbe(0)
    finally:
        torch.set_default_dtype(old)
    assert probe.src.dtype == probe.a.dtype == torch.float32 and probe.src.numel() * 4 == probe.nbytes


def test_the_non_block_timing_does_not_pay_for_a_fingerprint_it_drops(monkeypatch):
    import puzzle.scoring.cost as cost
    from puzzle.scoring.cost import measure_non_block_costs

    made = []
    monkeypatch.setattr(cost, "ReferenceProbe", lambda llc: made.append(llc))
    measure_non_block_costs(tiny_config(), Workload(batch_size=2, prompt_len=8, gen_len=4, num_threads=1),
                            repeats=2, warmup=0)
    assert made == []


def test_a_measured_speedup_far_from_the_prediction_is_warned_about():
    """A factor of more than 2 either way between measured and predicted speed-up means a timing went wrong."""
    from puzzle.pipeline import speedup_mismatch_note

    assert speedup_mismatch_note({"name": "child-1.5x", "speedup": 1.3, "predicted_speedup": 1.5}) is None
    assert speedup_mismatch_note({"name": "child-2x", "speedup": 1.0, "predicted_speedup": 2.0}) is None  # at the bound
    slow = speedup_mismatch_note({"name": "child-2x", "speedup": 0.2, "predicted_speedup": 2.0})
    assert slow and "child-2x measured 0.20x against a predicted 2.00x, 10.0 times apart" in slow and "puzzle front --out DIR --remeasure" in slow
    named = speedup_mismatch_note({"name": "c", "speedup": 0.2, "predicted_speedup": 2.0}, "/runs/a", "puzzle realize X")
    assert "(`puzzle realize X`)" in named and "puzzle score --out /runs/a --retime" in named
    assert "4.0 times apart" in speedup_mismatch_note({"name": "c", "speedup": 6.0, "predicted_speedup": 1.5})
    # a child that keeps no block: the table's sum misses the fixed cost per call, not the machine (breaker)
    empty = speedup_mismatch_note({"name": "greedy-10x", "speedup": 4.74, "predicted_speedup": 3239.09,
                                   "architecture": "noop/noop noop/noop"})
    assert "it keeps no block (every layer removed)" in empty and "busy" not in empty
    # a folder with a space is one shell word in the commands it names (breaker: `--out r sp ü` split it in three)
    spaced = speedup_mismatch_note({"name": "c", "speedup": 0.2, "predicted_speedup": 2.0}, "/runs/r sp ü")
    assert "`puzzle front --out '/runs/r sp ü' --remeasure`" in spaced
    assert "score --out '/runs/r sp ü' --retime" in spaced
    for bad in (float("nan"), 0.0, None, float("inf")):  # the parent's row, a failed timing: nothing to compare
        assert speedup_mismatch_note({"name": "c", "speedup": bad, "predicted_speedup": 1.5}) is None


def test_every_feedback_round_s_drift_stays_on_record_and_in_the_report_sentence(tmp_path):
    """Stop 73's leftover: each budget-feedback round warned of its own drift, but machine.json (and the report)
    held only the last round's; `rounds` collects them as "drift_rounds", and the report names their range."""
    from puzzle.pipeline import check_machine_drift, drift_rounds_text

    (tmp_path / "score").mkdir()
    said = []
    run = SimpleNamespace(out=tmp_path, say=said.append)
    table = {"reference_compute_ms": 8.0, "reference_memory_ms": 13.0, "reference_samples": 40, "reference_bytes": 64}
    (tmp_path / "score" / "cost.csv.json").write_text(json.dumps(table))
    rounds = []
    check_machine_drift(run, {**table, "reference_memory_ms": 19.5}, rounds=rounds)  # round 0: warned
    assert "drift_rounds" not in json.loads((tmp_path / "children" / "machine.json").read_text())
    check_machine_drift(run, {**table, "reference_memory_ms": 13.13}, rounds=rounds)  # round 1: quiet
    rec = json.loads((tmp_path / "children" / "machine.json").read_text())
    assert rec["drift"] == {"compute": 1.0, "memory": 1.01} and len(said) == 1
    assert rec["drift_rounds"] == [{"compute": 1.0, "memory": 1.5}, {"compute": 1.0, "memory": 1.01}]
    assert drift_rounds_text(rec["drift_rounds"]) == (" Over the budget feedback's 2 measurement rounds the figure was "
                                                      "1.00 (compute), 1.01-1.50 (memory); those above are the last "
                                                      "round's.")
    assert drift_rounds_text([{"compute": None}, {"compute": None}]) == drift_rounds_text(None) == ""
