"""Speed of drawing parent samples: the old modeling path against `puzzle.samples.sample_rows`, side by side.

    python benchmarks/sampling.py --out DIR                      # the packaged SmolLM2 parent, 64 rows x 128 tokens
    python benchmarks/sampling.py --out DIR --tokens 256 --repeats 3 --paths modeling runtime-multinomial runtime

Each path draws B rows of L new tokens from BOS at temperature 1 (what the data stage's `parent-samples` does):
- modeling: the parent's own `PuzzleForCausalLM.forward` with its KVCache (K/V repeated to the query heads in every
  step) and torch.softmax + torch.multinomial per step: `sample_rows` before it moved to the child runtime, kept
  here as the reference as it was (with its one unused forward after the last draw, 1/L of its time);
- runtime-multinomial (only with --paths): `puzzle.runtime.ChildRuntime` with the same softmax + multinomial draws,
  which splits the speed-up into the runtime's share and the draw's;
- runtime: `puzzle.samples.sample_rows` as the data stage runs it (ChildRuntime, inverse-CDF draws `draw_tokens`).
Every repeat runs each path once, in a new random order, so that a shared machine's drift hits all alike; a short
untimed call of each warms up first. Repeat r seeds every path's generator alike. tok/s = B x L / wall seconds,
the median over repeats; speedup = modeling's seconds / the path's, per repeat, then the median.

Sanity of the draws (untimed): every id in [0, V); the EOS share and the distinct ids; the share of tokens equal to
the modeling path's in the same repeat (near 1 for runtime-multinomial, whose draws follow the same generator
stream while the logits agree; low for the inverse-CDF draws); the parent's mean NLL of the first --nll-rows rows of
the last repeat (nats per token, with its standard error over rows), which for ancestral samples estimates the same
entropy rate on every path; and the draw alone, `draw_ms`: one step's draw on the parent's (B, V) logits after BOS,
softmax + multinomial against `draw_tokens`.

Writes DIR/sampling.csv (one row per path) and the DIR/sampling.json sidecar (settings, machine, per-repeat
seconds, the process's peak RSS), after every repeat, and prints a table. On the 2-core CPU VM the default takes
about 5 minutes, 8 with all three paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from puzzle.modeling import KVCache
from puzzle.runtime import ChildRuntime
from puzzle.samples import draw_tokens, sample_rows

PATHS = ("modeling", "runtime-multinomial", "runtime")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for sampling.csv and sampling.json")
    p.add_argument("--parent", default="asset:smollm2-gguf", help="parent: asset:<name>, an HF folder, a .gguf file, "
                                                                  "or 'tiny' (the random test model, for a smoke run)")
    p.add_argument("--rows", type=int, default=64, help="B, rows drawn together (the data stage draws 64)")
    p.add_argument("--tokens", type=int, default=128, help="L, new tokens per row (the data stage: the run's seq_len)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (each runs every path once)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=["modeling", "runtime"],
                   help="paths to time; modeling is the reference of the speedup column")
    p.add_argument("--nll-rows", type=int, default=8, help="rows per path whose NLL the parent scores (0: skip)")
    p.add_argument("--warmup-tokens", type=int, default=4, help="tokens per row of each path's untimed first call")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="generator seeds (repeat r: seed * 1000 + r) and path order")
    return p.parse_args(argv)


def load(spec: str):
    """The parent (PuzzleForCausalLM, eval mode) and its tokenizer."""
    if spec == "tiny":
        from puzzle.tiny import tiny_parent

        loaded = tiny_parent()
    else:
        from puzzle.assets import asset_path
        from puzzle.parent import load_parent

        path = asset_path(spec.removeprefix("asset:")) if spec.startswith("asset:") else spec
        loaded = load_parent(str(path))
    return loaded.model.eval(), loaded.tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# The paths: (model, bos, B, L, generator) -> (B, L) int64


def multinomial_draw(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B, 1): the old draw, softmax then torch.multinomial (B x V exponentials)."""
    return torch.multinomial(torch.softmax(logits.float(), dim=-1).cpu(), 1, generator=generator)


@torch.no_grad()
def modeling_rows(model, bos_id: int, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """The old `sample_rows` (before the ChildRuntime change): PuzzleForCausalLM.forward with a KVCache."""
    param = next(model.parameters())
    cache = KVCache(model.config, batch_size, length + 1, param.dtype, param.device)
    ids = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=param.device)  # (B, 1)
    logits = model(ids, cache=cache, logits_to_keep=1)  # (B, 1, V)
    rows = []
    for _ in range(length):
        nxt = multinomial_draw(logits[:, -1], generator)  # (B, 1)
        rows.append(nxt)
        logits = model(nxt.to(param.device), cache=cache, logits_to_keep=1)  # the last call's logits go unused
    return torch.cat(rows, dim=1)  # (B, L)


@torch.no_grad()
def runtime_multinomial_rows(model, bos_id: int, batch_size: int, length: int,
                             generator: torch.Generator) -> torch.Tensor:
    """`sample_rows`' runtime loop with the old draw: the runtime's share of the speed-up alone."""
    rt = ChildRuntime(model, batch_size=batch_size, max_len=length)
    logits = rt.prefill(torch.full((batch_size, 1), bos_id, dtype=torch.long))  # (B, V)
    rows = []
    for step in range(length):
        nxt = multinomial_draw(logits, generator)  # (B, 1)
        rows.append(nxt)
        if step + 1 < length:
            logits = rt.decode(nxt[:, 0])
    return torch.cat(rows, dim=1)  # (B, L)


FNS = {"modeling": modeling_rows, "runtime-multinomial": runtime_multinomial_rows, "runtime": sample_rows}


# ---------------------------------------------------------------------------------------------------------------------
# Sanity of the draws


@torch.no_grad()
def nll_nats(model, bos_id: int, rows: torch.Tensor) -> tuple[float, float]:
    """The parent's mean NLL of rows (n, L) after BOS, nats per token: (mean over rows, its standard error)."""
    ids = torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], dim=1)  # (n, L + 1)
    per_row = []
    for row in ids:  # one row at a time: (1, L, V) float32 logits, not (n, L, V)
        logits = model(row[None, :-1])  # (1, L, V)
        per_row.append(F.cross_entropy(logits[0].float(), row[1:]).item())
    values = np.asarray(per_row)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


@torch.no_grad()
def draw_ms(model, bos_id: int, batch_size: int, repeats: int = 20) -> dict[str, float]:
    """Median ms of one step's draw on the parent's (B, V) logits after BOS: the old draw and `draw_tokens`."""
    logits = model(torch.full((batch_size, 1), bos_id, dtype=torch.long), logits_to_keep=1)[:, -1]  # (B, V)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, fn in (("multinomial", multinomial_draw), ("inverse_cdf", draw_tokens)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(logits, gen)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = float(np.median(times))
    return out


# ---------------------------------------------------------------------------------------------------------------------


def summarize(paths, seconds: dict[str, list[float]], draws: dict[str, torch.Tensor], B: int, L: int, V: int,
              eos_id: int | None, nll: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """One row per path from the repeats so far."""
    rows = []
    for name in paths:
        s = np.asarray(seconds[name])
        tok_s = B * L / s
        row = {"path": name, "repeats": len(s), "seconds_median": float(np.median(s)), "tok_s": float(np.median(tok_s)),
               "tok_s_min": float(tok_s.min()), "tok_s_max": float(tok_s.max())}
        if "modeling" in seconds:
            row["speedup"] = float(np.median(np.asarray(seconds["modeling"]) / s))
        ids = draws[name]
        row.update(valid_ids=bool(((ids >= 0) & (ids < V)).all()), distinct_ids=int(ids.unique().numel()),
                   eos_share=float((ids == eos_id).float().mean()) if eos_id is not None else float("nan"))
        if "modeling" in draws:
            row["same_tokens_as_modeling"] = float((ids == draws["modeling"]).float().mean())
        if name in nll:
            row.update(nll_nats=nll[name][0], nll_se_nats=nll[name][1])
        rows.append(row)
    return pd.DataFrame(rows)


def write(out: Path, table: pd.DataFrame, args, seconds, draw, B, L, rounds, t_start) -> None:
    """sampling.csv and its sampling.json sidecar."""
    table.to_csv(out / "sampling.csv", index=False)
    sidecar = {
        "device": "cpu", "device_name": platform.processor() or platform.machine(), "dtype": "float32",
        "parent": args.parent, "rows": B, "tokens": L, "rounds": rounds, "repeats_asked": args.repeats,
        "seeds": [args.seed * 1000 + r for r in range(rounds)], "seconds": seconds, "draw_ms": draw,
        "nll_rows": args.nll_rows, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": time.perf_counter() - t_start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }
    (out / "sampling.json").write_text(json.dumps(sidecar, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.rows, args.tokens, args.repeats, args.warmup_tokens) < 1 or args.nll_rows < 0:
        raise SystemExit("--rows, --tokens, --repeats and --warmup-tokens must be >= 1, --nll-rows >= 0")
    if args.out.exists() and not args.out.is_dir():
        print(f"sampling: error: --out {args.out} is a file; give a folder", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = list(dict.fromkeys(args.paths))
    B, L = args.rows, args.tokens
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args.parent)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    V = model.config.vocab_size

    for name in paths:  # untimed: first-call allocations and thread pools
        FNS[name](model, bos, B, args.warmup_tokens, torch.Generator().manual_seed(0))
    draw = draw_ms(model, bos, B)
    rng = np.random.default_rng(args.seed)
    seconds = {name: [] for name in paths}
    draws, nll = {}, {}
    for r in range(args.repeats):
        for i in rng.permutation(len(paths)):
            name = paths[i]
            gen = torch.Generator().manual_seed(args.seed * 1000 + r)
            t0 = time.perf_counter()
            draws[name] = FNS[name](model, bos, B, L, gen)  # (B, L)
            seconds[name].append(time.perf_counter() - t0)
        if r + 1 == args.repeats and args.nll_rows:
            nll = {name: nll_nats(model, bos, draws[name][: args.nll_rows]) for name in paths}
        table = summarize(paths, seconds, draws, B, L, V, tokenizer.eos_token_id, nll)
        write(args.out, table, args, seconds, draw, B, L, r + 1, t_start)
        print(f"round {r + 1}/{args.repeats} written ({time.perf_counter() - t_start:.0f} s)", flush=True)

    print(f"cpu float32, {args.parent}: B={B} rows x L={L} tokens, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()}")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print(f"draw alone, one step on ({B}, {V}) logits: softmax + multinomial {draw['multinomial']:.2f} ms, "
          f"inverse CDF {draw['inverse_cdf']:.2f} ms")
    print(f"wrote {args.out / 'sampling.csv'} and {args.out / 'sampling.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
