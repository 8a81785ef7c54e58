"""Benchmark: which search objective gives the best realized children, at the same predicted runtime.

    python benchmarks/objectives.py --run runs/demo [--objectives "kl_nats;lm_loss;cosine;top1_agree;greedy"]
                                    [--speedups 1.25,1.5,2,3] [--exclude-sets "none;attn-linear"] [--out DIR]

For each speed-up S the budget is the parent's predicted runtime / S (the score table's, no budget feedback);
for each objective the search's optimum under it (`greedy` is the greedy baseline, by kl_nats) is
built from the run's BLD library and evaluated on the evaluation split: KL to the parent (nats per token) and
LM loss. The score columns all come from the same replace-1-block pass (scoring/quality.py), so this asks only
which sum of them best predicts the realized child. Writes DIR/objectives.csv (default DIR: <run>/objectives;
one row per objective and speed-up: eval_kl_nats, eval_lm_loss, summed_kl_nats, predicted_runtime_ms,
predicted_speedup, choice) and prints eval KL per objective and speed-up with each objective's mean over the
speed-ups relative to kl_nats. Resumes from DIR/rows.json; of the run's files it changes none (it writes only DIR).

--exclude-sets asks the same of the library's parts: each ';'-separated set is a comma-separated list of variant
ids left out of the search (`puzzle search --exclude`), `none` the whole table; every objective is solved under
every set. Each row also gives the child's KL on the scoring split (`refine.selection_kl`, the text `puzzle refine`
chooses by: does it see what the evaluation split sees?) and its linear attention and FFN subblocks. On the demo,
linear attention looks cheap to each layer alone but several of them together cost more on the evaluation text
(LAMBADA) than on the scoring text: see README.md, "Linear subblocks and the evaluation text".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.baselines import open_run  # noqa: E402
from puzzle.budgets import Budgets, parse_speedup  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

OFF_TARGET = 0.03  # a child predicted this far (relative) from its target speed-up is warned of
DEFAULT_OBJECTIVES = "kl_nats;lm_loss;cosine;top1_agree;kl_nats=1,top1_agree=2;greedy"


def parse_exclude_sets(text: str) -> list[tuple[str, ...]]:
    """'none;attn-linear;attn-linear,ffn-linear' -> [(), ('attn-linear',), ('attn-linear', 'ffn-linear')]."""
    sets = []
    for part in (p.strip() for p in text.split(";")):
        if part:
            ids = () if part.lower() == "none" else tuple(sorted({i.strip() for i in part.split(",") if i.strip()}))
            if ids not in sets:
                sets.append(ids)
    return sets


def label(objective: str, exclude: tuple[str, ...]) -> str:
    """The row's name: the objective, and the variants left out (as in rows.json's keys; none: the objective)."""
    return objective if not exclude else f"{objective} without {','.join(exclude)}"


def measure(run, table: pd.DataFrame, objectives: list[str], speedups: list[float], rows_path: Path,
            exclude_sets: list[tuple[str, ...]] = ((),)) -> list[dict]:
    """One row per (objective, variants left out, speed-up) on the run's BLD score `table`, resuming from
    `rows_path` (rows of the same table only)."""
    from puzzle.architecture import BlockConfig
    from puzzle.io import sha256_file
    from puzzle.pipeline import build_child, parent_eval_logprobs, score_table_path
    from puzzle.refine import selection_kl
    from puzzle.scoring.quality import evaluate_model
    from puzzle.search import greedy, parent_totals, solve

    table_sha = sha256_file(score_table_path(run, "bld"))
    saved = read_json(rows_path) if rows_path.is_file() else {}
    rows = saved.get("rows", {}) if saved.get("score_table_sha256") == table_sha else {}
    parent = parent_totals(table)
    todo = [(s, o, x) for s in speedups for x in exclude_sets for o in objectives]
    for s, objective, exclude in todo:
        budgets = Budgets(max_runtime_ms=parent["runtime_ms"] / s)
        key = f"{label(objective, exclude)}@{s:g}"
        if key in rows and "score_kl_nats" in rows[key]:  # rows of an older version lack the scoring split: redone
            continue
        t0 = time.perf_counter()
        solution = greedy(table, budgets, exclude=exclude) if objective == "greedy" else \
            solve(table, budgets, objective=objective, exclude=exclude)[0]
        model = build_child(run, {"choice": list(solution.choice)}, "bld")
        q = evaluate_model(model, run.tokens.eval, parent_eval_logprobs(run), chunk=run.config.score.chunk)
        blocks = [BlockConfig.from_id(b) for b in solution.choice]
        rows[key] = {"objective": objective, "exclude": ",".join(exclude), "speedup": s,
                     "eval_kl_nats": q["kl_nats"], "eval_lm_loss": q["lm_loss"],
                     "score_kl_nats": selection_kl(run, model),
                     "summed_kl_nats": solution.kl_nats, "predicted_runtime_ms": solution.runtime_ms,
                     "predicted_speedup": parent["runtime_ms"] / solution.runtime_ms,
                     "linear_attention": sum(b.attention.kind == "linear" for b in blocks),
                     "linear_ffn": sum(b.ffn.kind == "linear" for b in blocks),
                     "seconds": round(time.perf_counter() - t0, 1), "choice": " ".join(solution.choice)}
        print(f"{key}: eval KL {q['kl_nats']:.4f} nats, scoring-split KL {rows[key]['score_kl_nats']:.4f}, summed KL "
              f"{solution.kl_nats:.4f}, predicted {rows[key]['predicted_speedup']:.3f}x", file=sys.stderr, flush=True)
        atomic_write_json(rows_path, {"score_table_sha256": table_sha, "rows": rows})
    return [rows[f"{label(o, x)}@{s:g}"] for s, o, x in todo]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run directory (after `puzzle run`)")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                   help=f"';'-separated `--objective` values, and `greedy` (default {DEFAULT_OBJECTIVES!r})")
    p.add_argument("--speedups", default="1.25,1.5,2,3", help="predicted speed-ups (default 1.25,1.5,2,3)")
    p.add_argument("--exclude-sets", default="none",
                   help="';'-separated sets of variant ids left out of the search, each comma-separated, `none` for "
                        "the whole table (default none), e.g. 'none;attn-linear;attn-linear,ffn-linear'")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/objectives)")
    args = p.parse_args(argv)
    try:
        from puzzle.pipeline import load_score_table
        from puzzle.search import check_exclusions, parse_objective

        # each once (breaker: one given twice failed the closing table after all the work)
        objectives = list(dict.fromkeys(o.strip() for o in args.objectives.split(";") if o.strip()))
        speedups = list(dict.fromkeys(parse_speedup(s) for s in args.speedups.split(",")))
        if slow := [s for s in speedups if s <= 1]:  # breaker: 0.5 ran, every objective giving the parent itself
            raise PuzzleError(f"--speedups {', '.join(f'{s:g}' for s in slow)}: give speed-ups above 1 (at 1 or "
                              f"below, every objective's child is the parent)")
        exclude_sets = parse_exclude_sets(args.exclude_sets)
        if not objectives or not speedups or not exclude_sets:
            raise PuzzleError("give at least one objective, one speed-up and one exclude set ('none': the whole table)")
        if not (args.run / "library").is_dir():
            raise PuzzleError(f"{args.run / 'library'} is missing: give a run directory after `puzzle run`")
        run = open_run(args.run, progress=False)
        table, _ = load_score_table(run, "bld")
        for o in objectives:  # reviewer: an unknown column failed only after the earlier objectives' children
            unknown = set() if o == "greedy" else set(parse_objective(o)) - set(table.columns)
            if unknown:
                raise PuzzleError(f"objective {o!r}: no column {', '.join(sorted(unknown))} in the score table")
        for exclude in exclude_sets:  # a typo would leave nothing out, silently
            check_exclusions(table, exclude)
        out = args.out or args.run / "objectives"
        if out.exists() and not out.is_dir():  # breaker: a FileExistsError traceback
            raise PuzzleError(f"--out {out} is a file; give a folder")
        rows = measure(run, table, objectives, speedups, out / "rows.json", exclude_sets)
    except PuzzleError as e:
        print(f"objectives: error: {e}", file=sys.stderr)
        return 2
    df = pd.DataFrame(rows)
    atomic_write_text(out / "objectives.csv", df.to_csv(index=False))
    df["row"] = [label(o, tuple(x.split(",")) if x else ()) for o, x in zip(df["objective"], df["exclude"])]
    names = list(dict.fromkeys(df["row"]))
    base = "kl_nats" if "kl_nats" in names else names[0]
    for column, what in (("eval_kl_nats", "evaluation KL"), ("score_kl_nats", "scoring-split KL")):
        kl = df.pivot(index="row", columns="speedup", values=column).loc[names]
        kl[f"mean / {base}"] = (kl / kl.loc[base]).mean(axis=1)
        with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):  # tiny runs: ~1e-3
            print(f"{what} (nats) under each target's runtime budget; columns: target speed-up\n{kl}")
    # each row's child meets its budget, but not all reach the same speed-up (breaker: greedy's 1.75x beside the
    # MIP's 1.53x at 1.5 was printed as "matched"): the KLs compare as far as these agree
    speed = df.pivot(index="row", columns="speedup", values="predicted_speedup").loc[names]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(f"predicted speed-up of each child; columns: target speed-up\n{speed}")
    off = df[(df["predicted_speedup"] / df["speedup"] - 1).abs() > OFF_TARGET]
    for r in off.itertuples():
        print(f"warning: {r.row} at {r.speedup:g}x is predicted {r.predicted_speedup:.3f}x, "
              f"{r.predicted_speedup / r.speedup - 1:+.1%} off its target: its KL is not at a matched runtime",
              file=sys.stderr)
    print(f"wrote {out / 'objectives.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
