"""Benchmark: does weighting the scoring positions by their need for context rank children like the evaluation text?

    python benchmarks/select_context.py --run runs/demo [--windows 0,8,16,32] [--speedups 1.25,1.5,2] [--k 6]
                                        [--tokens 2048] [--out DIR]

`puzzle refine` and the budget feedback choose children by their realized KL on the scoring split's first tokens
(`refine.selection_kl`). With `[score] select_context` N > 0 each position there weighs by how much the parent's
own prediction changes when it sees only the last N tokens (`scoring.quality.context_weights`). This script asks
which N ranks children as the evaluation split does. Per speed-up S (the parent's predicted runtime / S, no budget
feedback), the children are the MIP's `--k` best diverse solutions (`refine.diverse_candidates`, no seeds) on the
run's whole BLD table and again with linear attention left out: they differ most in what a per-token attention
loses. Each is realized once; its per-position KL on the scoring tokens is kept, so every window costs only its
weights (a parent pass per position) and a weighted mean. Per (S, N) the summary gives the Spearman correlation of
the weighted scoring KL with the evaluation KL over the children, the evaluation KL of the child the weighted KL
picks, and the best evaluation KL among them (an oracle that sees the evaluation text). N = 0 is the plain mean.

Writes DIR/select_context_children.csv (one row per child: its evaluation KL and weighted KL per window) and
DIR/select_context.csv (the summary; printed). DIR defaults to <run>/select_context. Of the run's own files it adds
to <run>/refine/memo.jsonl alone: choosing the diverse children realizes them, and their selection KL is kept there as
`puzzle refine` keeps it (keyed by what it depends on, and reused by a later refine). Each child's figures are saved
in DIR/children/ as it is measured, so an interrupted call (Ctrl-C: exit 130) goes on from them when run again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import pickle
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.baselines import open_run  # noqa: E402
from puzzle.budgets import Budgets, parse_speedup  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.io import atomic_write_text  # noqa: E402


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (Pearson's of their average ranks)."""
    return float(pd.Series(list(a)).rank().corr(pd.Series(list(b)).rank()))


@torch.no_grad()
def per_position_kl(model, ids: torch.Tensor, parent_logp: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """(N, T) ids -> (N, T) fp32 KL(p_parent || p_model) in nats at every position."""
    from puzzle.scoring.quality import position_kl

    model.eval()
    return torch.cat([position_kl(torch.log_softmax(model(ids[s:s + chunk]).float(), -1), parent_logp[s:s + chunk])
                      for s in range(0, ids.shape[0], chunk)])


def children(run, table, speedups, k: int) -> list[dict]:
    """The MIP's k best diverse children per speed-up, with and without linear attention, each once."""
    from puzzle.refine import diverse_candidates
    from puzzle.search import InfeasibleBudget, parent_totals

    parent_ms = parent_totals(table)["runtime_ms"]
    has_linear = bool((table["variant"] == "attn-linear").any())
    out = []
    for s in speedups:
        seen = set()
        for exclude in ((), ("attn-linear",)) if has_linear else ((),):
            try:
                df = diverse_candidates(run, table, Budgets(max_runtime_ms=parent_ms / s), k=k, exclude=exclude)
            except InfeasibleBudget as e:  # its advice names `puzzle search`'s flags: this script's instead
                least = e.least.get("runtime_ms")
                reach = f" (the fastest child reaches {math.floor(parent_ms / least * 1000) / 1000:.3f}x)" \
                    if least and least > 0 else ""
                raise PuzzleError(f"--speedups {s:g}: no child of this run's score table reaches it"
                                  f"{' without linear attention' if exclude else ''}{reach}; give smaller "
                                  f"speed-ups") from None
            for r in df.to_dict("records"):
                if tuple(r["choice"]) not in seen:
                    seen.add(tuple(r["choice"]))
                    out.append({"speedup": s, "exclude": ",".join(exclude), "rank": int(r["rank"]),
                                "choice": tuple(r["choice"]),
                                "linear_attention": sum(b.startswith("attn-linear") for b in r["choice"])})
    return out


def inputs_key(run, ids: torch.Tensor) -> dict:
    """What every child's saved figures depend on besides its architecture: the scoring ids, the evaluation split,
    the parent and the score table (a rebuilt library is rescored)."""
    from puzzle.baselines import row_inputs
    from puzzle.io import tensor_sha256

    return {"ids": tensor_sha256(ids), "eval": tensor_sha256(run.tokens.eval), "parent": run.parent_fingerprint,
            "table": row_inputs(run)["score_table_sha256"]}


def _child_path(out: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return out / "children" / f"{digest}.pt"


def load_child(out: Path, key: dict) -> dict | None:
    """A child's per-position KL ((N, T) fp32) and evaluation KL saved by an earlier call for `key`, else None (also
    for a damaged file, which is measured again)."""
    path = _child_path(out, key)
    try:
        saved = torch.load(path, weights_only=True)
        return saved if saved["key"] == key and isinstance(saved["kl"], torch.Tensor) else None
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError):  # missing, cut short or
        return None  # hand-edited: measured again


def save_child(out: Path, key: dict, figures: dict) -> None:
    """Save a child's figures atomically (`load_child` reads them), so an interrupted call keeps them."""
    from puzzle.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save({"key": key, **figures}, buffer)
    atomic_write_bytes(_child_path(out, key), buffer.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run directory (after `puzzle run`)")
    p.add_argument("--windows", default="0,8,16,32", help="select_context values to compare, 0: the plain mean "
                                                          "(default 0,8,16,32)")
    p.add_argument("--speedups", default="1.25,1.5,2", help="predicted speed-ups (default 1.25,1.5,2)")
    p.add_argument("--k", type=int, default=6, help="diverse MIP children per speed-up and exclusion (default 6)")
    p.add_argument("--tokens", type=int, default=2048, help="scoring-split tokens, as refine's --select-tokens "
                                                            "(default 2048)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/select_context)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out or args.run / "select_context"
    reused = kept = 0  # children taken from an earlier call, children this call has figures of
    try:
        from puzzle.pipeline import build_child, load_score_table, parent_eval_logprobs
        from puzzle.refine import selection_ids
        from puzzle.scoring.quality import context_weights, evaluate_model, parent_logprobs

        try:
            windows = sorted({int(w) for w in args.windows.split(",") if w.strip()})
        except ValueError:
            raise PuzzleError(f"--windows {args.windows!r}: give whole numbers of tokens, comma-separated") from None
        try:
            speedups = [parse_speedup(s) for s in args.speedups.split(",") if s.strip()]
        except PuzzleError as e:  # the part at fault and why, named by this script's flag
            raise PuzzleError(f"--speedups {args.speedups!r}: {str(e).removeprefix('--speedup ')}; give speed-ups "
                              f"separated by commas, e.g. 1.25,1.5,2") from None
        if not windows or min(windows) < 0:
            raise PuzzleError(f"--windows {args.windows!r}: give whole numbers of tokens >= 0 (0: the plain mean), "
                              f"comma-separated")
        if not speedups or args.k < 1 or args.tokens < 1:
            raise PuzzleError("give at least one --speedups value, --k >= 1 and --tokens >= 1")
        if out.exists() and not out.is_dir():
            raise PuzzleError(f"--out {out} is a file; give a folder")
        if not (args.run / "library").is_dir():
            raise PuzzleError(f"{args.run / 'library'} is missing: give a run directory after `puzzle run`")
        run = open_run(args.run, progress=False)
        ids = selection_ids(run, args.tokens)
        if max(windows) >= ids.shape[1]:
            raise PuzzleError(f"--windows: {max(windows)} is not shorter than the scoring sequences ({ids.shape[1]} "
                              f"tokens)")
        table, _ = load_score_table(run, "bld")
        logp = parent_logprobs(run.parent.model, ids, chunk=run.config.score.chunk)
        eval_logp = parent_eval_logprobs(run)
        rows = children(run, table, speedups, args.k)
        kls, inputs = [], inputs_key(run, ids)  # hashed once, not per child
        for i, row in enumerate(rows):
            key = {"choice": list(row["choice"]), **inputs}
            saved = load_child(out, key)
            if saved is None:
                model = build_child(run, {"choice": list(row["choice"])}, "bld")
                saved = {"kl": per_position_kl(model, ids, logp, run.config.score.chunk),
                         "eval_kl_nats": evaluate_model(model, run.tokens.eval, eval_logp,
                                                        chunk=run.config.score.chunk)["kl_nats"]}
                save_child(out, key, saved)
            else:
                reused += 1
            kept += 1
            kls.append(saved["kl"])
            row["eval_kl_nats"] = float(saved["eval_kl_nats"])
            print(f"child {i + 1}/{len(rows)} ({row['speedup']:g}x): evaluation KL {row['eval_kl_nats']:.4f}",
                  file=sys.stderr, flush=True)
        kl = torch.stack(kls)  # (children, N, T)
        seconds = {}
        for w in windows:
            t1 = time.perf_counter()
            weights = torch.ones(ids.shape) if w == 0 else context_weights(run.parent.model, ids, logp, window=w)
            seconds[w] = time.perf_counter() - t1
            for row, score in zip(rows, ((kl * weights).sum((1, 2)) / weights.sum()).tolist()):
                row[f"kl_w{w}"] = score
    except PuzzleError as e:
        print(f"select_context: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"select_context: interrupted; the children measured so far ({kept} in {out / 'children'}) are kept, "
              f"and the same command goes on from them", file=sys.stderr)
        return 130
    per_child = pd.DataFrame(rows).assign(choice=lambda d: d["choice"].map(" ".join))
    summary = []
    for s, g in per_child.groupby("speedup"):
        for w in windows:
            picked = g.loc[g[f"kl_w{w}"].idxmin()]
            summary.append({"speedup": s, "select_context": w, "children": len(g),
                            "spearman": spearman(g[f"kl_w{w}"], g["eval_kl_nats"]),
                            "picked_eval_kl_nats": picked["eval_kl_nats"],
                            "picked_linear_attention": int(picked["linear_attention"]),
                            "best_eval_kl_nats": g["eval_kl_nats"].min(), "weights_s": seconds[w]})
    summary = pd.DataFrame(summary)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "select_context_children.csv", per_child.to_csv(index=False))
    atomic_write_text(out / "select_context.csv", summary.to_csv(index=False))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{len(per_child)} children on {ids.numel()} scoring tokens ({reused} kept from an earlier call), "
          f"{time.perf_counter() - t0:.0f} s; wrote {out / 'select_context.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
