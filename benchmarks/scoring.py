"""How long replace-1-block scoring takes, and how it grows with scoring tokens and depth.

Measures on the real parent (default: SmolLM2-135M-Instruct): the parent cache for N scoring
tokens, single candidates at several layers, and several candidates of one layer batched
(`replace_one_scores`) against one at a time. A candidate at layer i runs the L - i - 1 layers after
it plus the LM head on the scored positions, so per candidate

    t(i, N) ~= N * (a * (L - i - 1) + h / stride + s)

(a: one layer per token, h: the LM head per token, s: the swapped subblock). The script fits a and
h + s by least squares on the measured points and extrapolates the whole score stage

    T(N, L, k) = cache(N) + k * N * (a * L (L - 1) / 2 + L * (h / stride + s))

for k candidates per layer: linear in the tokens, quadratic in the depth.

Timing: `--clock cpu` (default) uses this process's CPU time with one thread, which stays
meaningful on a loaded shared machine (it still pays for memory-bandwidth contention); `--clock
wall` with `--threads 2` is the latency on an idle 2-core machine. Tokens are random ids (the
cost does not depend on them), candidates are no_op subblocks plus one initialised FFN.

    python benchmarks/scoring.py --out /tmp/scoring_bench [--tokens 256,512,1024 --layers 0,10,20,29]
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

from puzzle.architecture import FFNConfig
from puzzle.errors import PuzzleError
from puzzle.init import init_ffn
from puzzle.io import atomic_write_json, save_table
from puzzle.scoring.quality import parent_cache, replace_one_score, replace_one_scores
from puzzle.space import SpaceConfig, build_space


def timer(clock: str):
    return time.process_time if clock == "cpu" else time.perf_counter


def measure(fn, clock: str, repeats: int) -> float:
    now = timer(clock)
    best = []
    for _ in range(repeats):
        t0 = now()
        fn()
        best.append(now() - t0)
    return float(np.median(best))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", default="asset:smollm2-gguf", help="parent model path (default: SmolLM2 asset)")
    p.add_argument("--out", type=Path, required=True, help="folder for scoring_times.csv (+ .json) and extrapolation.json")
    p.add_argument("--tokens", default="256,512,1024", help="scoring tokens to measure (multiples of --seq-len)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per scoring sequence (default 256)")
    p.add_argument("--layers", default="0,10,20,29", help="layers of the measured candidates")
    p.add_argument("--stride", type=int, default=2, help="LM head position stride (default 2, as the demo)")
    p.add_argument("--chunk", type=int, default=2, help="sequences per forward (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="median of this many timings per point")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time (default) or wall clock")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu sums all threads' time; use --threads 1 or --clock wall")
    try:
        tokens_list, layers = checked(args)
        from puzzle.assets import asset_path
        from puzzle.parent import load_parent

        path = str(asset_path(args.parent[6:])) if args.parent.startswith("asset:") else args.parent
        model = load_parent(path).model
        cfg = model.config
        L = cfg.num_hidden_layers
        if not all(0 <= i < L for i in layers):
            raise PuzzleError(f"--layers {args.layers}: the parent has layers 0 to {L - 1}")
    except PuzzleError as e:  # breaker: tracebacks for a missing parent and a layer past the last
        print(f"scoring: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    for q in model.parameters():
        q.requires_grad_(False)
    load_before = os.getloadavg()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n_tok in tokens_list:
        ids = torch.randint(0, cfg.vocab_size, (max(1, n_tok // args.seq_len), args.seq_len), generator=gen)
        t_cache = measure(lambda: parent_cache(model, ids, chunk=args.chunk, stride=args.stride), args.clock, 1)
        rows.append({"kind": "cache", "layer": -1, "tokens": ids.numel(), "candidates": 0, "seconds": t_cache})
        cache = parent_cache(model, ids, chunk=args.chunk, stride=args.stride)
        for layer in layers:
            t = measure(lambda: replace_one_score(model, cache, layer, "ffn", None, chunk=args.chunk), args.clock, args.repeats)
            rows.append({"kind": "candidate", "layer": layer, "tokens": ids.numel(), "candidates": 1, "seconds": t})
        # a real (initialised) candidate and batching, at the most expensive layer
        layer0 = layers[0]
        half = FFNConfig("swiglu", cfg.intermediate_size // 2)
        sub = init_ffn(cfg, model.model.layers[layer0], half, layer0, channels=torch.arange(half.intermediate_size))
        t = measure(lambda: replace_one_score(model, cache, layer0, "ffn", sub, chunk=args.chunk), args.clock, args.repeats)
        rows.append({"kind": "candidate_init_ffn", "layer": layer0, "tokens": ids.numel(), "candidates": 1, "seconds": t})
        subs = [None, sub, None]
        t_seq = measure(lambda: [replace_one_score(model, cache, layer0, "ffn", s, chunk=args.chunk) for s in subs],
                        args.clock, args.repeats)
        t_bat = measure(lambda: replace_one_scores(model, cache, layer0, "ffn", subs, chunk=max(1, args.chunk // 2)),
                        args.clock, args.repeats)
        rows.append({"kind": "sequential_3", "layer": layer0, "tokens": ids.numel(), "candidates": 3, "seconds": t_seq})
        rows.append({"kind": "batched_3", "layer": layer0, "tokens": ids.numel(), "candidates": 3, "seconds": t_bat})
        cache = None  # free before the next token count
    df = pd.DataFrame(rows)

    # fit t / N = a * (L - i - 1) + b over the single no_op candidates
    cand = df[df["kind"] == "candidate"]
    X = np.stack([(L - cand["layer"] - 1).to_numpy(float), np.ones(len(cand))], 1)
    y = (cand["seconds"] / cand["tokens"]).to_numpy()
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    cache_rows = df[df["kind"] == "cache"]
    c_cache = float((cache_rows["seconds"] / cache_rows["tokens"]).mean())
    space = build_space(cfg, SpaceConfig())
    demo_space = build_space(cfg, SpaceConfig(ffn_fractions=(0.5,)))
    k_default = sum(len(ls.attention) + len(ls.ffn) - 2 for ls in space) / L
    k_demo = sum(len(ls.attention) + len(ls.ffn) - 2 for ls in demo_space) / L

    def total(n_tok, n_layers, k):
        return c_cache * n_tok + k * n_tok * (a * n_layers * (n_layers - 1) / 2 + n_layers * b)

    extrapolation = {
        "per_token_layer_s": a, "per_token_head_and_subblock_s": b, "cache_per_token_s": c_cache,
        "candidates_per_layer_default_space": k_default, "candidates_per_layer_demo_space": k_demo,
        "default_space_candidates": int(k_default * L),
        "predicted_s": {f"tokens={n},layers={ll},space={name}": total(n, ll, k)
                        for n in (512, 1024, 4096) for ll in (L, 2 * L) for name, k in (("default", k_default), ("demo", k_demo))},
        "fit_max_rel_residual": float(np.max(np.abs(X @ np.array([a, b]) - y) / y)),
        "batched_vs_sequential": (df[df["kind"] == "batched_3"]["seconds"].to_numpy()
                                  / df[df["kind"] == "sequential_3"]["seconds"].to_numpy()).tolist(),
    }
    meta = {"parent": args.parent, "layers": L, "clock": args.clock, "threads": args.threads, "stride": args.stride,
            "chunk": args.chunk, "seq_len": args.seq_len, "load_before": load_before, "load_after": os.getloadavg(),
            "torch_version": torch.__version__}
    save_table(df, args.out / "scoring_times.csv", meta)
    atomic_write_json(args.out / "extrapolation.json", {**meta, **extrapolation})
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(json.dumps(extrapolation, indent=1))
    return 0


def checked(args) -> tuple[list[int], list[int]]:
    """(--tokens, --layers) as lists, after the checks that need no model.

    Raises:
        PuzzleError: --out is a file; a count below 1; --tokens not whole multiples of --seq-len; fewer than two
            distinct --layers (the fit of time per token over the layers after the candidate needs two)."""
    if args.out.exists() and not args.out.is_dir():  # breaker: found only after the measuring, as a traceback
        raise PuzzleError(f"--out {args.out} is a file; give a folder")
    for flag in ("seq_len", "stride", "chunk", "repeats", "threads"):
        if getattr(args, flag) < 1:  # breaker: --stride 0 wrote results
            raise PuzzleError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise PuzzleError(f"--tokens {args.tokens!r} and --layers {args.layers!r} must be whole numbers separated "
                          f"by commas") from None
    if not all(t >= args.seq_len and t % args.seq_len == 0 for t in tokens):  # breaker: --tokens 0 wrote results
        raise PuzzleError(f"--tokens {args.tokens}: each must be a whole multiple of --seq-len {args.seq_len}")
    if len(set(layers)) < 2:  # breaker: one layer gave a degenerate fit and extrapolations that looked valid
        raise PuzzleError(f"--layers {args.layers}: give at least two distinct layers (the extrapolation fits the "
                          f"time per token over the layers after each)")
    return tokens, layers


if __name__ == "__main__":
    raise SystemExit(main())
