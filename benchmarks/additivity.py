"""Additivity check: is a child's latency the sum of its subblocks' measured latencies?

Takes the score table of a finished run (read only), picks children across the space's cost range
with the MIP search (predicted speed-ups from ~1.1x to near the fastest child the space allows),
re-measures the subblock and non-block costs for the run's workload, then measures the parent and
the children as whole models in one interleaved session (scoring/cost.py `measure_models`) and
writes the error table:

    name, target_speedup, params, measured_speedup, predicted_runtime_ms, measured_runtime_ms,
    runtime_rel_error (= predicted / measured - 1), runtime_ratio_error (error of the predicted
    speed-up over the parent, which cancels machine drift), the same for prefill and decode
    (predicted_prefill_ms, ..., prefill_rel_error, prefill_ratio_error, decode_*), stored_rel_error:
    the runtime's error when predicting from the run's own (older) cost table instead of the fresh
    one, and architecture.

Models carry random weights (latency does not depend on their values), so no library is loaded.

    python benchmarks/additivity.py --run /tmp/demo1 --out /tmp/additivity [--threads 1 --clock cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from puzzle.architecture import BlockConfig, ModelConfig
from puzzle.budgets import Budgets, parse_speedup
from puzzle.cli import add_max_contention_flag
from puzzle.config import load_run_config
from puzzle.errors import PuzzleError
from puzzle.io import load_table, read_json, save_table
from puzzle.modeling import PuzzleForCausalLM
from puzzle.scoring.cost import (Workload, measure_models, measure_non_block_costs,
                                 measure_subblock_costs, predict_totals, select_rows)
from puzzle.search import solve


def pick_children(table: pd.DataFrame, speedups) -> dict[str, list[str]]:
    """name -> per-layer block ids: the MIP's best (lowest KL) child at each predicted speed-up."""
    blocks = table[table["subblock"] != "non_block"]
    nb = table[table["subblock"] == "non_block"].iloc[0]
    parent = blocks[blocks["is_parent"]]
    parent_runtime = float(parent["runtime_ms"].sum() + nb["runtime_ms"])
    out = {}
    for s in speedups:
        sol = solve(table, Budgets(max_runtime_ms=parent_runtime / s), "kl_nats", time_limit_s=30)[0]
        out[f"child-{s:g}x"] = list(sol.choice)  # breaker: 2 decimals named 1.499 and 1.501 alike
    return out


def max_speedup(table: pd.DataFrame) -> float:
    """Parent runtime / the runtime of the cheapest child the table allows (the non-block part plus
    every layer's cheapest attention and FFN rows)."""
    blocks = table[table["subblock"] != "non_block"]
    nb = float(table.loc[table["subblock"] == "non_block", "runtime_ms"].iloc[0])
    parent = float(blocks.loc[blocks["is_parent"], "runtime_ms"].sum()) + nb
    cheapest = float(blocks.groupby(["layer", "subblock"])["runtime_ms"].min().sum()) + nb
    return parent / cheapest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="finished run directory (read only)")
    p.add_argument("--out", type=Path, required=True, help="folder for additivity.csv (+ .json)")
    p.add_argument("--speedups", help="predicted speed-ups of the children (default: 5, geometric from 1.1 to 0.9 x the maximum)")
    p.add_argument("--repeats", type=int, default=3, help="whole-model repeats (default 3)")
    p.add_argument("--cost-repeats", type=int, default=5, help="subblock cost repeats (default 5)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the run's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall clock, or process CPU time (1 thread)")
    add_max_contention_flag(p)  # breaker: a busy machine's refusal named a flag this script did not take
    args = p.parse_args(argv)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise PuzzleError(f"--out {args.out} is a file; give a folder")
        table, meta = load_table(args.run / "score" / "score_table.csv")
        cost_meta = read_json(args.run / "score" / "cost.csv.json")
        parent_cfg = ModelConfig.from_dict(read_json(args.run / "parent.json")["config"])
        busy = args.max_contention if args.max_contention is not None else \
            load_run_config(args.run).score.max_contention  # as the run's own timings take it
        threads = args.threads or cost_meta.get("num_threads")
        w = Workload(meta["batch_size"], meta["prompt_len"], meta["gen_len"], meta["dtype"], "cpu", threads)
        s_max = max_speedup(table)
        speedups = (list(dict.fromkeys(parse_speedup(s) for s in args.speedups.split(","))) if args.speedups
                    else list(np.geomspace(1.1, 0.9 * s_max, 5)))
        children = pick_children(table, speedups)
        targets = dict(zip(children, speedups))
        load_before = os.getloadavg()

        t0 = time.perf_counter()
        attn = sorted(set(table.loc[table["subblock"] == "attention", "variant"]))
        ffn = sorted(set(table.loc[table["subblock"] == "ffn", "variant"]))
        fresh = measure_subblock_costs(parent_cfg, attn, ffn, w, repeats=args.cost_repeats, clock=args.clock,
                                       max_contention=busy)
        fresh_nb = measure_non_block_costs(parent_cfg, w, repeats=args.cost_repeats, clock=args.clock,
                                           max_contention=busy)
        stored_nb = cost_meta["non_block"]
        cost_s = time.perf_counter() - t0

        torch.manual_seed(0)
        configs = {"parent": parent_cfg, **{n: parent_cfg.with_blocks([BlockConfig.from_id(b) for b in c])
                                            for n, c in children.items()}}
        models = {n: PuzzleForCausalLM(c).eval() for n, c in configs.items()}
        t0 = time.perf_counter()
        measured = measure_models(models, w, repeats=args.repeats, clock=args.clock,
                                  max_contention=busy).set_index("name")
        whole_s = time.perf_counter() - t0
    except PuzzleError as e:  # a run without a score table or cost sidecar, a busy machine, a budget out of reach
        print(f"additivity: error: {e}", file=sys.stderr)
        return 2

    pred = {n: predict_totals(select_rows(fresh, c), fresh_nb, w) for n, c in configs.items()}
    stored = {n: predict_totals(select_rows(table[table["subblock"] != "non_block"], c), stored_nb, w)
              for n, c in configs.items()}
    rows = []
    for name in configs:
        m = measured.loc[name]
        row = {"name": name, "target_speedup": 1.0 if name == "parent" else targets[name],
               "params": int(m["params"])}
        for q in ("runtime_ms", "prefill_ms", "decode_ms"):
            key = q.removesuffix("_ms")
            row[f"predicted_{q}"] = pred[name][q]
            row[f"measured_{q}"] = float(m[q])
            row[f"{key}_rel_error"] = pred[name][q] / float(m[q]) - 1
            row[f"{key}_ratio_error"] = ((pred[name][q] / pred["parent"][q]) / (float(m[q]) / float(measured.loc["parent", q])) - 1)
        row["measured_speedup"] = float(measured.loc["parent", "runtime_ms"] / m["runtime_ms"])
        row["stored_rel_error"] = stored[name]["runtime_ms"] / float(m["runtime_ms"]) - 1
        row["architecture"] = " ".join(b.id.replace("attn-", "").replace("ffn-", "") for b in configs[name].blocks)
        rows.append(row)
    df = pd.DataFrame(rows)
    info = {**w.meta(), "clock": args.clock, "repeats": args.repeats, "cost_repeats": args.cost_repeats,
            "run": str(args.run), "max_speedup": s_max, "load_before": load_before, "load_after": os.getloadavg(),
            "cost_s": round(cost_s, 1), "whole_models_s": round(whole_s, 1),
            "max_abs_runtime_rel_error": float(df["runtime_rel_error"].abs().max()),
            "max_abs_runtime_ratio_error": float(df["runtime_ratio_error"].abs().max())}
    save_table(df, args.out / "additivity.csv", info)
    cols = ["name", "target_speedup", "measured_speedup", "predicted_runtime_ms", "measured_runtime_ms",
            "runtime_rel_error", "runtime_ratio_error", "prefill_rel_error", "decode_rel_error", "stored_rel_error"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(json.dumps({k: info[k] for k in ("load_before", "load_after", "cost_s", "whole_models_s")}))
    from puzzle.config import ScoreConfig
    from puzzle.scoring.cost import max_ignoring_nan

    # the timings' own measure (reviewer: the load average counts this process's threads, so it warned when quiet)
    others = max_ignoring_nan(fresh.attrs.get("contention_cores"), fresh_nb.get("contention_cores"),
                              measured.attrs.get("contention_cores"))
    if others > ScoreConfig().max_contention:  # breaker: a rel error of 85.8 under load, with only the raw load line
        print(f"warning: other jobs kept up to {others:.2f} cores busy while this timed (accepted by "
              f"--max-contention): the runtime errors above measure that load, not additivity; rerun on a quiet "
              f"machine", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
