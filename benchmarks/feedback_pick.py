"""Benchmark: what the budget feedback's realized pick gains over the MIP's first child under corrected limits.

    python benchmarks/feedback_pick.py --run runs/demo [--factors 0.94,0.97,1.03,1.06] [--candidates 4]
                                       [--out DIR]

When a child measures off its budget, the feedback (puzzle/feedback.py) solves it again under a corrected table
limit. The MIP's first child there can lie far from the child and realize much worse than the summed replace-1 KL
says (a fresh user's 1.5x child went from evaluation KL 2.785 to 3.621 after a re-solve). `pipeline.feedback_options`
adds the child itself (where it meets the limits) and the `--candidates` best children within
`pipeline.FEEDBACK_MAX_CHANGES` layers of it; the pipeline keeps the lowest KL on the scoring split's first 2048
tokens (`refine.selection_kl`).

This script replays such re-solves without timing anything, so that the figures are free of the machine's noise: for
every child search/chosen.json names (the run's current children) with a budget request and every factor f, the
runtime limit the child was solved under (for a child the feedback re-solved, its corrected one: the record's
`budgets`) is multiplied by f (f < 1: a tightening, the child over its budget; f > 1: a loosening), the options are
built as the feedback builds them, and each is realized and scored on the scoring split (what the pick sees) and on
the evaluation split (what the front reports, never chosen on). Children whose table limits bound no runtime (a
--max-params or --max-memory main budget) are left out, with a note. Rows: one per (child, factor, option) in
DIR/feedback_pick.csv, written after each re-solve (an interrupted replay keeps them; a rerun starts afresh); the
summary (DIR/feedback_pick_summary.csv, printed) compares per (child, factor) the evaluation KL of the MIP's first
child (which may be the child itself), of the pick, of the best option (an oracle that sees the evaluation text) and
of the worst (how much the choice matters), and ends with the geometric mean of picked / MIP's first. DIR defaults
to <run>/feedback_pick; the script writes nothing else into the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.baselines import open_run  # noqa: E402
from puzzle.budgets import Budgets  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.io import atomic_write_text, read_json  # noqa: E402
from puzzle.pipeline import feedback_options, parent_eval_logprobs, realized_options  # noqa: E402
from puzzle.scoring.quality import evaluate_model  # noqa: E402
from puzzle.search import InfeasibleBudget  # noqa: E402


def scaled(budgets: Budgets, factor: float) -> Budgets:
    """`budgets` with the runtime limit times `factor` (the others as they are)."""
    limits = budgets.limits()
    if "runtime_ms" not in limits:
        raise PuzzleError("the child's table limits bound no runtime; this script corrects the runtime limit")
    return Budgets(**{f"max_{c}": v * (factor if c == "runtime_ms" else 1.0) for c, v in limits.items()})


def replay(run, name: str, record: dict, factor: float) -> list[dict]:
    """The feedback's options for `name` under its runtime limit times `factor`, each realized and scored."""
    budgets = scaled(Budgets.from_dict(record["budgets"]), factor)
    try:
        options = feedback_options(run, name, record, budgets)
    except InfeasibleBudget:
        return []
    eval_logp = parent_eval_logprobs(run)
    rows = []
    for key, source, rec, model, kl in realized_options(run, options):  # as the feedback realizes and scores them
        rows.append({"child": name, "factor": factor, "source": source,
                     "layers_changed": sum(a != b for a, b in zip(key, record["choice"])),
                     "predicted_speedup": rec["speedup"], "summed_kl_nats": rec.get("kl_nats"), "selection_kl": kl,
                     "eval_kl": float(evaluate_model(model, run.tokens.eval, eval_logp,
                                                     chunk=run.config.score.chunk)["kl_nats"])})
        del model
    picked = min(range(len(rows)), key=lambda i: rows[i]["selection_kl"])  # the first of equal KLs, as the pipeline
    for i, row in enumerate(rows):
        row["picked"] = i == picked
    return rows


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (child, factor): options, the MIP's first child's, the pick's and the best option's evaluation KL."""
    out = []
    for (child, factor), g in rows.groupby(["child", "factor"], sort=False):
        first = g[g["source"].str.contains("the MIP's first", regex=False)]  # also with the child or a trust region
        pick = g[g["picked"]].iloc[0]
        out.append({"child": child, "factor": factor, "options": len(g), "picked": pick["source"],
                    "mip_first_eval_kl": float(first["eval_kl"].iloc[0]) if len(first) else float("nan"),
                    "picked_eval_kl": float(pick["eval_kl"]), "best_eval_kl": float(g["eval_kl"].min()),
                    "worst_eval_kl": float(g["eval_kl"].max())})
    df = pd.DataFrame(out)
    df["picked_over_mip_first"] = df["picked_eval_kl"] / df["mip_first_eval_kl"]
    return df


def parse_factors(text: str) -> list[float]:
    """--factors: positive numbers, comma-separated.

    Raises:
        PuzzleError: an empty list, a word that is no number, or a factor that is not positive and finite.
    """
    factors = []
    for word in (w.strip() for w in text.split(",")):
        try:
            factor = float(word)
        except ValueError:
            raise PuzzleError(f"--factors: {word!r} is not a number; give runtime-limit factors such as "
                              f"0.94,0.97,1.03,1.06") from None
        if not (factor > 0 and factor != float("inf")):
            raise PuzzleError(f"--factors: {word} is not a positive finite factor of the runtime limit")
        factors.append(factor)
    if not factors:
        raise PuzzleError("--factors is empty; give runtime-limit factors such as 0.94,0.97,1.03,1.06")
    return factors


def replay_all(args) -> int:
    factors = parse_factors(args.factors)
    if not 1 <= args.candidates <= 16:
        raise PuzzleError(f"--candidates must be from 1 to 16 (as [search] feedback_candidates), got {args.candidates}")
    out = args.out or args.run / "feedback_pick"
    if out.exists() and not out.is_dir():
        raise PuzzleError(f"--out {out} is a file; give a folder")
    run = open_run(args.run, progress=False)
    run.config = run.config.replace(search={"feedback_candidates": args.candidates})
    names = read_json(args.run / "search" / "chosen.json")["names"]
    records = {n: read_json(args.run / "search" / f"{n}.json") for n in names}
    skipped = [n for n, r in records.items() if not r.get("request")
               or "runtime_ms" not in Budgets.from_dict(r["budgets"]).limits()]
    if skipped:
        print(f"left out (no budget request, or table limits without a runtime bound): {', '.join(skipped)}")
    records = {n: r for n, r in records.items() if n not in skipped}
    if not records:
        raise PuzzleError(f"no searched child of {args.run} has a runtime budget to replay")
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for name, record in records.items():
        for factor in factors:
            rows += replay(run, name, record, factor)
            if rows:  # after each re-solve: an interrupt keeps what is done
                atomic_write_text(out / "feedback_pick.csv", pd.DataFrame(rows).to_csv(index=False))
            print(f"{name} x{factor}: {len(rows)} options so far, {time.perf_counter() - t0:.0f} s", flush=True)
    if not rows:
        raise PuzzleError("no child meets any of the replayed limits; give factors nearer 1 (--factors)")
    summary = summarize(pd.DataFrame(rows))
    atomic_write_text(out / "feedback_pick_summary.csv", summary.to_csv(index=False))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))  # tiny runs' KLs are ~1e-3
    ratio = summary["picked_over_mip_first"].dropna()
    print(f"\n{len(rows)} children realized in {time.perf_counter() - t0:.0f} s; picked / MIP's first: geometric "
          f"mean {np.exp(np.log(ratio).mean()):.3f} over {len(ratio)} re-solves, from {ratio.min():.3f} to "
          f"{ratio.max():.3f}, lower in {int((ratio < 0.999).sum())}, higher in {int((ratio > 1.001).sum())}; "
          f"rows in {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run directory (puzzle run)")
    p.add_argument("--factors", default="0.94,0.97,1.03,1.06",
                   help="runtime-limit factors to replay (default 0.94,0.97,1.03,1.06)")
    p.add_argument("--candidates", type=int, default=4, help="[search] feedback_candidates to replay (default 4)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/feedback_pick)")
    args = p.parse_args(argv)
    try:
        return replay_all(args)
    except PuzzleError as e:
        print(f"feedback_pick: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("feedback_pick: interrupted; the rows of the re-solves done are in the output folder's "
              "feedback_pick.csv (a rerun starts afresh)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
