"""Benchmark: does coupled BLD lower the children's evaluation KL? Decoupled vs coupled score table, same budgets.

    python benchmarks/coupled.py --run DIR [--speedups 1.25,1.5,2,3] [--out DIR/coupled-bench]

Run it on a run directory after `puzzle run` with `bld.coupled_top_k > 0` (DIR/score/score_table_decoupled.csv holds
the table before the block rows were added; DIR/score/score_table.csv holds them). For each speed-up S, the budget
`puzzle front` solves for S (`pipeline.front_request`, the table's runtime limit, resolved on the decoupled table's
parent totals, so both searches get the very same limits) is solved on each table (the MIP's first solution);
the decoupled child is built from subblocks, the coupled one with the coupled entries of the block rows it chose
(`pipeline.coupled_blocks`), and each is evaluated on the run's evaluation split (KL(parent || child), nats per
token). No timing: the two children have the same predicted cost budget, so the machine's drift does not enter.

Writes OUT/coupled.csv (one row per speed-up and table: summed replace-1-block KL the MIP minimized, evaluation KL,
coupled blocks used) and prints it with the ratio coupled / decoupled of the evaluation KLs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from puzzle.baselines import open_run
from puzzle.budgets import parse_speedup
from puzzle.errors import PuzzleError


def compare(run, speedups) -> pd.DataFrame:
    """Rows (speedup, table, summed_kl, eval_kl, coupled_blocks, seconds) for both tables at each speed-up.

    Raises:
        PuzzleError: the run has no coupled block rows, or a speed-up no child of a table reaches.
    """
    from puzzle.pipeline import coupled_blocks, front_request, load_score_table, parent_eval_logprobs
    from puzzle.realize import realize_child
    from puzzle.scoring.quality import evaluate_model
    from puzzle.search import parent_totals, solve

    table, meta = load_score_table(run, "bld")
    path = run.out / "score" / "score_table_decoupled.csv"
    if not path.is_file() or not (table["subblock"] == "block").any():
        raise PuzzleError(f"{run.out} has no coupled block rows (or no {path.name}): run `puzzle run --out {run.out}` "
                          f"with bld.coupled_top_k > 0 first")
    decoupled = pd.read_csv(path)
    totals, reference = parent_totals(decoupled), parent_eval_logprobs(run)
    search = run.config.search
    rows = []
    for s in speedups:
        budgets = front_request(run, s).resolve(totals, meta)
        for name, searched in (("decoupled", decoupled), ("coupled", table)):
            t0 = time.perf_counter()
            solution = solve(searched, budgets, search.objective, exclude=search.exclude,
                             vllm_compatible=search.vllm_compatible)[0]
            blocks = list(solution.blocks)
            coupled = coupled_blocks(run, blocks, "bld", "mip") if name == "coupled" else frozenset()
            child = realize_child(run.parent.model, run.library, blocks, "bld", coupled=coupled)
            metrics = evaluate_model(child, run.tokens.eval, reference, chunk=run.config.score.chunk)
            rows.append({"speedup": s, "table": name, "summed_kl": solution.objective,
                         "eval_kl": metrics["kl_nats"], "coupled_blocks": len(coupled),
                         "seconds": time.perf_counter() - t0})
            print(f"{s:g}x {name}: summed KL {solution.objective:.4g}, evaluation KL {metrics['kl_nats']:.4g}",
                  file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="coupled", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="run directory after `puzzle run` with coupled BLD")
    p.add_argument("--speedups", default="1.25,1.5,2,3", help="predicted speed-ups, comma-separated")
    p.add_argument("--out", type=Path, default=None, help="results folder (default DIR/coupled-bench)")
    args = p.parse_args(argv)
    out = args.out or args.run / "coupled-bench"
    try:
        try:
            speedups = list(dict.fromkeys(parse_speedup(s) for s in args.speedups.split(",") if s.strip()))
        except PuzzleError as e:
            raise PuzzleError(f"--speedups {args.speedups!r}: {str(e).removeprefix('--speedup ')}; give speed-ups "
                              f"separated by commas, e.g. 1.25,1.5,2") from None
        if not speedups:
            raise PuzzleError("give at least one --speedups value")
        if out.exists() and not out.is_dir():
            raise PuzzleError(f"--out {out} is a file; give a folder")
        df = compare(open_run(args.run, progress=False), speedups)
    except PuzzleError as e:
        print(f"coupled: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "coupled.csv", index=False)
    wide = df.pivot(index="speedup", columns="table", values="eval_kl")
    wide["coupled / decoupled"] = wide["coupled"] / wide["decoupled"]
    print(df.drop(columns="seconds").to_string(index=False))
    print(wide.to_string())
    print(f"written: {out / 'coupled.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
