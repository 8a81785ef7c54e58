"""Benchmark: where the front children's predicted KL goes on the way to their realized evaluation KL.

    python benchmarks/kl_gap.py --run runs/demo [--names child-1.25x,child-2x] [--tokens 2048] [--out DIR]

For each searched child (default: every DIR/search/child-*.json) `puzzle.kl_gap.kl_gap` measures the
summed replace-1 KL of its subblocks and the realized child's KL on scoring-split tokens the score
table did not use and on the evaluation split, and the four ratios between them (selection,
compounding on scoring text, transfer to the evaluation text, compounding there). Writes
DIR/kl_gap.csv (default DIR: <run>/kl_gap) and prints the table. Reads the run; writes nothing into it but that
default folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from puzzle.baselines import open_run
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_text
from puzzle.kl_gap import kl_gap
from puzzle.pipeline import searched_names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run directory")
    p.add_argument("--names", default=None, help="children, comma-separated (default: the run's searched children, "
                                                 "search/chosen.json's names)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per split to measure on (default 2048)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/kl_gap)")
    args = p.parse_args(argv)
    try:
        if args.tokens < 1:
            raise PuzzleError(f"--tokens must be >= 1, got {args.tokens}")
        if not (args.run / "search").is_dir():
            raise PuzzleError(f"{args.run / 'search'} is missing: give a run directory after `puzzle run`")
        # the front's children: refine's diverse and refined ones are chosen on the scoring split (fresh user: on
        # the tiny run they left no fresh sequence to measure on); --names takes them
        names = args.names.split(",") if args.names else searched_names(args.run)
        if names is None:
            raise PuzzleError(f"{args.run / 'search' / 'chosen.json'} is missing or damaged: `puzzle search --out "
                              f"{args.run}` writes it, or give --names")
        names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        out = args.out or args.run / "kl_gap"
        if out.exists() and not out.is_dir():  # breaker: found only after the measurement, as a traceback
            raise PuzzleError(f"--out {out} is a file; give a folder")
        t0 = time.perf_counter()
        df = kl_gap(open_run(args.run, progress=True), names, tokens=args.tokens, progress=True)
    except PuzzleError as e:
        print(f"kl_gap: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "kl_gap.csv", df.to_csv(index=False))
    cols = ["name", "subblocks", "predicted_kl_nats", "fresh_sum_kl_nats", "fresh_kl_nats", "eval_sum_kl_nats",
            "eval_kl_nats", "selection", "compounding_score", "transfer", "compounding_eval"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))  # tiny runs' KLs are ~1e-3
    print(f"tokens {df.attrs['tokens']} (fresh from scoring sequence {df.attrs['fresh_start']}), "
          f"{time.perf_counter() - t0:.0f} s; wrote {out / 'kl_gap.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
