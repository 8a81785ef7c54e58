"""Benchmark: blockwise local distillation on SmolLM2-135M — throughput, saturation, inits, child-level budget.

    python benchmarks/bld.py throughput --out DIR [--layers 0,1,2] [--tokens 16384] [--space demo|default]
    python benchmarks/bld.py curves --out DIR [--layers 2,14,27] [--budgets 1024,...,65536] [--init-tokens 8192]
    python benchmarks/bld.py child --out DIR --run RUN_DIR [--name child-1.5x] [--budgets 2048,...,32768]
    python benchmarks/bld.py schedule --out DIR --run RUN_DIR [--layers 4,16,24] [--settings 4:2e-3,1:5e-3,...]

throughput: BLD of every entry of the given layers (`--layers all`: the whole library; the parent
    forward included, as in a real run) on `--tokens` calibration tokens; tokens/s = training tokens
    x layers / wall seconds. Useful FLOPs = the parent's forward over the training tokens through
    every layer up to the last distilled one (projections, causal attention, FFN) + 3x the forward FLOPs
    of every entry trained by AdamW (forward + backward) + the two Gram matrices of every linear
    entry fitted in closed form; efficiency = useful FLOP/s / fp32 matmul FLOP/s, the latter the
    best of a few matmuls timed before, between and after the BLD runs in the same process.
    Also times AdamW entries with the fused training forwards against the model's own forwards
    (interleaved, same targets).
curves: for each layer and each token budget, the entries trained from scratch with that budget
    (their own warmup + cosine schedule) and their held-out normalized MSE (8 probe sequences);
    then the init table: normalized MSE at init and after the same budget for each init of each
    kind (linear inits compared with AdamW training, where the init matters; the closed-form fit,
    the default, is listed as a reference).
child: the searched child of a finished run (its architecture fixed) rebuilt from entries trained
    with each token budget, and its evaluation KL against the parent on the run's evaluation
    tokens; reports the budget beyond which doubling improves the KL by less than 5%.
schedule: at a run's BLD token budget and calibration data, the held-out normalized MSE of a few
    entries (default 1 KV head, FFN 768 and 256 at layers 4, 16, 24) for each (batch size, lr).

Every command writes CSV/JSON files under --out and prints a short summary. The machine's load
(os.getloadavg) is recorded next to each figure: on a shared machine absolute times are inflated,
ratios measured in the same run are the reliable figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle import bld  # noqa: E402
from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig  # noqa: E402
from puzzle.bld import BLDConfig, Job, LayerTargets, build_entry, decoupled_jobs, parent_targets, run_jobs  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.library import Library  # noqa: E402
from puzzle.space import SpaceConfig, build_space  # noqa: E402

SPACES = {"demo": SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=256),  # the smollm2-demo preset's space
          "default": SpaceConfig()}  # its defaults: kv1; FFN 1280, 768, 512 (1536 x 3/4, 1/2, 1/4 in 256s)


def load_smollm2():
    from puzzle.assets import asset_path
    from puzzle.parent import load_parent

    lm = load_parent(str(asset_path("smollm2-gguf")))
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


def token_splits(tokenizer, work: Path, calib_tokens: int):
    """The demo preset's data settings with `calib_tokens` calibration tokens (sequences of 256)."""
    from puzzle.data import DataConfig, prepare_data

    cfg = DataConfig(calib_sources=("asset:wiki-bz2", "asset:lee-news"), eval_sources=("asset:lambada",), seq_len=256,
                     calib_tokens=calib_tokens, score_tokens=4096, eval_tokens=4096, score_fraction=0.2, max_doc_tokens=1024)
    return prepare_data(cfg, tokenizer, work / f"data-{calib_tokens}")


def load() -> float:
    return round(os.getloadavg()[0], 2)


#: SmolLM2-135M's sizes: `child` rebuilds children of runs of this parent only (its demo data and parent are fixed)
SMOLLM2_SIZES = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "layers": 30}


def check_out(out: Path) -> None:
    """Raises PuzzleError: --out is a file."""
    if out.exists() and not out.is_dir():
        raise PuzzleError(f"--out {out} is a file; give a folder")


def smollm2_child(run: Path, name: str) -> dict:
    """search/<name>.json of a SmolLM2-135M run, checked before the parent is loaded.

    Raises:
        PuzzleError: `run` is no run directory, has no searched child `name`, or its parent is not SmolLM2-135M.
    """
    from puzzle.config import load_run_config
    from puzzle.io import read_json

    load_run_config(run)
    path = run / "search" / f"{name}.json"
    if not path.is_file():
        raise PuzzleError(f"{path} is missing: give --name of a searched child of {run} (`puzzle search` writes them)")
    parent = read_json(run / "parent.json")["config"]
    sizes = {**{k: parent.get(k) for k in SMOLLM2_SIZES if k != "layers"}, "layers": len(parent.get("blocks", ()))}
    if sizes != SMOLLM2_SIZES:
        raise PuzzleError(f"{run}'s parent ({', '.join(f'{k} {v}' for k, v in sizes.items())}) is not SmolLM2-135M: "
                          f"`bld.py child` rebuilds children of SmolLM2-135M runs only (the demo's parent and data)")
    return read_json(path)


# ----------------------------------------------------------------------------------------------
# FLOP accounting (multiply-adds count 2)


def parent_layer_flops(config, T: int) -> float:
    """Forward FLOPs per token of one parent layer at sequence length T (causal attention: T+1)/2 keys on average."""
    C, H, D, G, F = config.hidden_size, config.num_attention_heads, config.head_dim, config.num_key_value_heads, config.intermediate_size
    return 2 * (2 * C * H * D + 2 * C * G * D) + 2 * H * D * (T + 1) + 6 * C * F


def entry_forward_flops(config, job: Job, T: int) -> float:
    """Forward FLOPs per token of one entry."""
    C, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
    v = job.variant
    if v.kind == "linear":
        return 2 * C * C
    if v.kind == "gqa":
        return 2 * (2 * C * H * D + 2 * C * v.num_kv_heads * D) + 2 * H * D * (T + 1)
    if v.kind == "swiglu":
        return 6 * C * v.intermediate_size
    return 0.0


def entry_train_flops(config, job: Job, T: int, method: str) -> float:
    """Useful training FLOPs per token: 3x forward for AdamW, the two (C, C) Grams for a closed-form linear fit."""
    if method == "lstsq":
        return 4 * config.hidden_size ** 2
    return 3 * entry_forward_flops(config, job, T)


def matmul_rates(repeats: int = 5) -> dict:
    """fp32 matmul GFLOP per wall second and per CPU second of this process (medians of `repeats`),
    for BLD-sized products and a large square one."""
    out = {}
    for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        wall, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            a @ b
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(wall) / 1e9
        out[f"{m}x{k}x{n}_per_cpu_s"] = 2 * m * k * n / max(statistics.median(cpu), 1e-9) / 1e9
    return out


# ----------------------------------------------------------------------------------------------
# throughput


def cmd_throughput(args) -> None:
    out = Path(args.out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    config = lm.model.config
    T = 256
    n_train = args.tokens // T
    splits = token_splits(lm.tokenizer, Path(args.work), max(16896, args.tokens + 2 * T))
    calib = splits.calib[:n_train + 2]
    layers = (list(range(config.num_hidden_layers)) if args.layers == "all"
              else [int(x) for x in args.layers.split(",")])
    space = [ls for ls in build_space(config, SPACES[args.space]) if ls.layer in layers]
    jobs = decoupled_jobs(space)
    cfg = BLDConfig(tokens=args.tokens, batch_size=4, lr=2e-3, probe_sequences=2)
    rates, runs = [matmul_rates()], []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            load0, t0, c0 = load(), time.perf_counter(), time.process_time()
            run_jobs(lm.model, calib, jobs, cfg, Library(d))
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            index = Library(d).index()
        rates.append(matmul_rates())
        bld_rows = index[index["stage"] == "bld"]
        useful = 0.0
        for job in jobs:
            assert ((bld_rows["layer"] == job.layer) & (bld_rows["variant"] == job.id)).any(), job  # it was trained
            method = "lstsq" if job.variant.kind == "linear" and cfg.linear_train == "lstsq" else "adamw"
            useful += args.tokens * entry_train_flops(config, job, T, method)
        # the walk runs the parent through every layer up to the last one distilled (their outputs feed the next)
        useful += args.tokens * (max(layers) + 1) * parent_layer_flops(config, T)
        runs.append({"rep": rep, "seconds": seconds, "cpu_s": cpu_s, "useful_gflop": useful / 1e9, "load_before": load0, "load_after": load(),
                     "entries_train_s": float(bld_rows["train_s"].sum())})
    peak = max(v for r in rates for k, v in r.items() if not k.endswith("_per_cpu_s"))
    peak_cpu = max(v for r in rates for k, v in r.items() if k.endswith("_per_cpu_s"))
    best = min(runs, key=lambda r: r["seconds"])
    summary = {"layers": layers, "space": args.space, "entries_per_layer": len(jobs) // len(layers), "tokens": args.tokens,
               "threads": torch.get_num_threads(), "seconds": best["seconds"],
               "tokens_per_s": args.tokens * len(layers) / best["seconds"],
               "whole_library_tokens_per_s": args.tokens * len(layers) / best["seconds"] / config.num_hidden_layers,
               "useful_gflop_s": best["useful_gflop"] / best["seconds"], "matmul_peak_gflop_s": peak,
               "matmul_rates": rates, "runs": runs}
    summary["efficiency"] = summary["useful_gflop_s"] / peak
    # the same ratio per CPU second of this process: less sensitive to other processes taking the cores
    summary["matmul_peak_gflop_per_cpu_s"] = peak_cpu
    summary["useful_gflop_per_cpu_s"] = best["useful_gflop"] / best["cpu_s"]
    summary["efficiency_cpu_time"] = summary["useful_gflop_per_cpu_s"] / peak_cpu

    # fused training forwards vs the model's own forwards, interleaved on the same targets (AdamW entries)
    layer_idx = layers[0]
    layer = lm.model.model.layers[layer_idx]
    with torch.no_grad():
        ids = calib
        h = lm.model.model.embed_tokens(ids)
        cos, sin = lm.model.rope(lm.model.positions(ids.shape, 0, "cpu"), h.dtype)
        for i in range(layer_idx):
            h = lm.model.model.layers[i](h, cos, sin)
    adam_jobs = [j for j in jobs if j.layer == layer_idx and j.variant.kind != "linear"]
    tg = parent_targets(layer, h, cos, sin, n_train, cfg, bld._needs(adam_jobs, cfg, config.blocks[layer_idx]))
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
    ab = []
    for rep in range(args.repeats):
        for fused in (True, False):
            bld.FUSED_TRAINING = fused
            for job in adam_jobs:
                with tempfile.TemporaryDirectory() as d:
                    info = build_entry(config, layer, job, tg, cos, sin, n_train, cfg, order, Library(d))
                ab.append({"rep": rep, "fused": fused, "variant": job.id, "train_s": info["train_s"],
                           "final_nmse": info["final_nmse"], "load": load(),
                           "gflop_s": args.tokens * entry_train_flops(config, job, T, "adamw") / info["train_s"] / 1e9})
    bld.FUSED_TRAINING = True
    ab = pd.DataFrame(ab)
    ab.to_csv(out / "fused_vs_module.csv", index=False)
    med = ab.groupby(["variant", "fused"])["train_s"].median().unstack()
    summary["fused_speedup"] = {v: float(med.loc[v, False] / med.loc[v, True]) for v in med.index}
    (out / "throughput.json").write_text(json.dumps(summary, indent=1))
    print(f"BLD on layers {layers} ({summary['entries_per_layer']} entries each, {args.tokens} tokens, "
          f"{summary['threads']} threads, load {best['load_before']}-{best['load_after']}): "
          f"{summary['tokens_per_s']:.0f} layer-tokens/s = {summary['whole_library_tokens_per_s']:.1f} tokens/s for the "
          f"whole {config.num_hidden_layers}-layer library; useful {summary['useful_gflop_s']:.1f} GFLOP/s vs matmul "
          f"{peak:.1f} GFLOP/s: efficiency {summary['efficiency']:.0%} (per CPU second: "
          f"{summary['useful_gflop_per_cpu_s']:.1f} vs {peak_cpu:.1f}, {summary['efficiency_cpu_time']:.0%})")
    print("fused training forward speed-up (model forward time / fused time):",
          {k: round(v, 2) for k, v in summary["fused_speedup"].items()})


# ----------------------------------------------------------------------------------------------
# curves: saturation and inits


def _walk_to(model, ids, layers):
    """Yield (layer index, layer input h (N, T, C)) for the requested layers, running the parent once."""
    with torch.no_grad():  # (not around the yield: the caller trains)
        h = model.model.embed_tokens(ids)
        cos, sin = model.rope(model.positions(ids.shape, 0, "cpu"), h.dtype)
    for i in range(max(layers) + 1):
        if i in layers:
            yield i, h, cos, sin
        layer = model.model.layers[i]
        with torch.no_grad():
            h = torch.cat([layer(h[s:s + 8], cos[s:s + 8], sin[s:s + 8]) for s in range(0, h.shape[0], 8)])


def _full_targets(layer, h, cos, sin, n_max, cfg, jobs, config, i, extra=frozenset()):
    """The layer's targets on all sequences (the last ones are the probe), with the init statistics the jobs need."""
    return parent_targets(layer, h, cos, sin, n_max, cfg, bld._needs(jobs, cfg, config.blocks[i]) | set(extra))


def _slice(tg: LayerTargets, cos, sin, n_train, n_max, n_probe):
    """The targets a run with `n_train` training sequences would see (the same probe sequences).

    Init statistics stay those of the full set (channel scores over all n_max training sequences,
    the Gram of the iterative init over init_tokens, KV-group scores): a small deviation from a
    run with the smaller budget, which would compute them on its own sequences.
    """
    idx = torch.cat([torch.arange(n_train), torch.arange(n_max, n_max + n_probe)])
    part = LayerTargets(tg.h_in[idx], tg.attn[idx], tg.ffn[idx], tg.channel_scores, tg.act_gram, tg.gram_tokens,
                        tg.group_scores, tg.eps)
    return part, cos[idx], sin[idx]


def _train(config, layer, jobs, tg, cos, sin, n_train, cfg):
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
    rows = []
    for job in jobs:
        with tempfile.TemporaryDirectory() as d:
            info = build_entry(config, layer, job, tg, cos, sin, n_train, cfg, order, Library(d))
        rows.append({"layer": job.layer, "kind": job.kind, "variant": job.id, "init": info["init"],
                     "init_nmse": info["init_nmse"], "final_nmse": info["final_nmse"], "tokens": info["tokens"],
                     "train_s": info["train_s"], "probe_curve": json.dumps(info["probe_curve"]), "load": load()})
    return rows


def cmd_curves(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    config = lm.model.config
    T, n_probe = 256, args.probe
    budgets = [int(b) for b in args.budgets.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    splits = token_splits(lm.tokenizer, Path(args.work), max(budgets) + (n_probe + 1) * T)
    n_max = max(budgets) // T
    ids = torch.cat([splits.calib[:n_max], splits.calib[-n_probe:]])
    space = {ls.layer: ls for ls in build_space(config, SPACES["demo"])}
    base = BLDConfig(batch_size=4, lr=2e-3, probe_sequences=n_probe)
    sat, inits = [], []
    for i, h, cos, sin in _walk_to(lm.model, ids, layers):
        layer = lm.model.model.layers[i]
        jobs = decoupled_jobs([space[i]])
        full = _full_targets(layer, h, cos, sin, n_max, dataclasses.replace(base, init_tokens=args.init_tokens,
                                                                           kv_init="top_groups"), jobs, config, i,
                            extra={"scores", "gram"})
        for budget in budgets:
            cfg = dataclasses.replace(base, tokens=budget)
            tg, c, s = _slice(full, cos, sin, budget // T, n_max, n_probe)
            sat += [{**r, "budget": budget} for r in _train(config, layer, jobs, tg, c, s, budget // T, cfg)]
            pd.DataFrame(sat).to_csv(out / "saturation.csv", index=False)
            print(f"layer {i} budget {budget}: " + ", ".join(f"{r['variant']} {r['final_nmse']:.4f}" for r in sat[-len(jobs):]),
                  flush=True)
        n = args.init_tokens // T
        tg, c, s = _slice(full, cos, sin, n, n_max, n_probe)
        cases = [("ffn", FFNConfig("swiglu", 768), "ffn_init", ("channel_contribution", "iterative"), {}),
                 ("attention", AttentionConfig("gqa", 1), "kv_init", ("mean_pool", "top_groups"), {}),
                 ("attention", AttentionConfig("linear"), "linear_init", ("parent", "lstsq"), {"linear_train": "adam"}),
                 ("ffn", FFNConfig("linear"), "linear_init", ("parent", "lstsq"), {"linear_train": "adam"}),
                 ("attention", AttentionConfig("linear"), "linear_init", ("parent",), {"linear_train": "lstsq"}),
                 ("ffn", FFNConfig("linear"), "linear_init", ("parent",), {"linear_train": "lstsq"})]
        for kind, variant, field, choices, extra in cases:
            for choice in choices:
                cfg = dataclasses.replace(base, tokens=args.init_tokens, **{field: choice, **extra})
                for r in _train(config, layer, [Job(i, kind, variant)], tg, c, s, n, cfg):
                    inits.append({**r, "train": extra.get("linear_train", "adam")})
            pd.DataFrame(inits).to_csv(out / "inits.csv", index=False)
        print(pd.DataFrame(inits)[lambda d: d["layer"] == i][["variant", "init", "train", "init_nmse", "final_nmse"]]
              .to_string(index=False), flush=True)
        del full, tg


# ----------------------------------------------------------------------------------------------
# child-level: evaluation KL of a fixed searched child vs BLD tokens


def cmd_child(args) -> None:
    torch.set_num_threads(args.threads)
    from puzzle.realize import realize_child
    from puzzle.scoring.quality import evaluate_model, parent_logprobs

    out = Path(args.out)
    check_out(out)
    record = smollm2_child(Path(args.run), args.name)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    config = lm.model.config
    T, n_probe = 256, 2
    blocks = [BlockConfig.from_id(b) for b in record["choice"]]
    jobs = {}
    for i, (b, p) in enumerate(zip(blocks, config.blocks)):
        jobs[i] = [Job(i, kind, v) for kind, v, pv in (("attention", b.attention, p.attention), ("ffn", b.ffn, p.ffn))
                   if v != pv and v.kind != "no_op"]
    budgets = [int(b) for b in args.budgets.split(",")]
    splits = token_splits(lm.tokenizer, Path(args.work), max(budgets) + (n_probe + 1) * T)
    n_max = max(budgets) // T
    ids = torch.cat([splits.calib[:n_max], splits.calib[-n_probe:]])
    libs = {b: Library(out / "child_libraries" / str(b)) for b in budgets}
    base = BLDConfig(batch_size=4, lr=2e-3, probe_sequences=n_probe)
    t0 = time.perf_counter()
    for i, h, cos, sin in _walk_to(lm.model, ids, [i for i in jobs if jobs[i]]):
        layer = lm.model.model.layers[i]
        todo = {b: [j for j in jobs[i] if not libs[b].has(i, j.id, "bld")] for b in budgets}
        if any(todo.values()):
            full = _full_targets(layer, h, cos, sin, n_max, base, jobs[i], config, i)
            for budget in budgets:
                cfg = dataclasses.replace(base, tokens=budget)
                tg, c, s = _slice(full, cos, sin, budget // T, n_max, n_probe)
                order = torch.randperm(budget // T, generator=torch.Generator().manual_seed(cfg.seed))
                for job in todo[budget]:
                    build_entry(config, layer, job, tg, c, s, budget // T, cfg, order, libs[budget])
            del full
        print(f"layer {i} done ({time.perf_counter() - t0:.0f} s, load {load()})", flush=True)
    eval_ids = splits.eval
    parent_logp = parent_logprobs(lm.model, eval_ids, chunk=2)
    rows = []
    for budget in budgets:
        child = realize_child(lm.model, libs[budget], blocks, "bld")
        m = evaluate_model(child, eval_ids, parent_logp, chunk=2)
        rows.append({"budget": budget, "kl_nats": m["kl_nats"], "top1_agree": m["top1_agree"], "lm_loss": m["lm_loss"]})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["kl_gain_next_doubling"] = 1 - df["kl_nats"].shift(-1) / df["kl_nats"]
    df.to_csv(out / "child_kl.csv", index=False)
    below = df[df["kl_gain_next_doubling"] < 0.05]
    saturated = int(below["budget"].iloc[0]) if len(below) else None
    (out / "child_kl.json").write_text(json.dumps({"name": args.name, "run": str(args.run), "saturated_tokens": saturated,
                                                   "eval_tokens": int(eval_ids.numel()), "rows": rows}, indent=1))
    print(df.to_string(index=False))
    print(f"doubling the BLD tokens improves {args.name}'s evaluation KL by < 5% beyond {saturated} tokens"
          if saturated else "no budget reached the < 5% criterion; extend --budgets")


# ----------------------------------------------------------------------------------------------
# schedule: (batch size, lr) at a run's fixed BLD token budget


def cmd_schedule(args) -> None:
    """Held-out normalized MSE of a few entries per (batch size, lr), the token budget and data of a finished run."""
    torch.set_num_threads(args.threads)
    from puzzle.baselines import open_run
    from puzzle.bld import build_library
    from puzzle.space import LayerSpace

    out = Path(args.out)
    check_out(out)
    run = open_run(Path(args.run), progress=False)
    try:
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise PuzzleError(f"--layers {args.layers!r}: give layer numbers, comma-separated") from None
    variants = set(args.variants.split(","))
    known = {ls.layer: {v.id for v in (*ls.attention[1:], *ls.ffn[1:])} for ls in run.space()}
    if not set(layers) <= set(known):
        raise PuzzleError(f"--layers {args.layers}: {run.out}'s parent has layers 0 to {len(known) - 1}")
    if not any(variants & known[i] for i in layers):
        raise PuzzleError(f"--variants {args.variants}: none is in {run.out}'s space at layers {args.layers}; "
                          f"choose from {', '.join(sorted(set().union(*(known[i] for i in layers))))}")
    if not (run.out / "data" / "manifest.json").is_file():
        raise PuzzleError(f"{run.out / 'data'} is missing: give a run directory after `puzzle data`")
    out.mkdir(parents=True, exist_ok=True)
    space = []
    for ls in run.space():  # the chosen variants at the chosen layers; elsewhere the parent's (nothing to train)
        if ls.layer in layers:
            space.append(LayerSpace(ls.layer, tuple(v for i, v in enumerate(ls.attention) if i == 0 or v.id in variants),
                                    tuple(v for i, v in enumerate(ls.ffn) if i == 0 or v.id in variants)))
        else:
            space.append(LayerSpace(ls.layer, ls.attention[:1], ls.ffn[:1]))
    rows = []
    for setting in args.settings.split(","):
        batch, lr = setting.split(":")
        cfg = dataclasses.replace(run.config.bld, batch_size=int(batch), lr=float(lr), checkpoint_s=1e9)
        with tempfile.TemporaryDirectory() as d:
            lib = Library(d)
            t0 = time.perf_counter()
            build_library(run.parent.model, run.tokens.calib, space, cfg, lib)
            index = lib.write_index()
            for r in index[index.stage == "bld"].itertuples():
                rows.append({"batch_size": int(batch), "lr": float(lr), "layer": r.layer, "variant": r.variant,
                             "init_nmse": r.init_nmse, "final_nmse": r.final_nmse, "tokens": cfg.tokens,
                             "seconds": time.perf_counter() - t0, "load": load()})
        pd.DataFrame(rows).to_csv(out / "schedule.csv", index=False)
        print(f"batch {batch}, lr {lr}: {time.perf_counter() - t0:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    print(df.pivot_table(index=["batch_size", "lr"], columns="variant", values="final_nmse").round(4).to_string())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="folder for the result files")
    common.add_argument("--threads", type=int, default=1,
                        help="torch threads for curves/child (1 wastes least on a shared machine; throughput uses "
                             "torch's default)")
    common.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "puzzle-bld-bench"),
                        help="folder for the tokenized data (reused between commands)")
    p = sub.add_parser("throughput", parents=[common], help="tokens/s and efficiency vs measured matmul FLOP/s")
    p.add_argument("--layers", default="0,1,2", help="layers to distill (comma-separated), or all (the whole library)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens per entry")
    p.add_argument("--space", choices=sorted(SPACES), default="demo", help="demo: the smollm2-demo preset's space")
    p.add_argument("--repeats", type=int, default=1, help="BLD runs (the fastest counts) and fused/model pairs")
    p.set_defaults(func=cmd_throughput)
    p = sub.add_parser("curves", parents=[common], help="normalized MSE vs tokens per kind, and the table of inits")
    p.add_argument("--layers", default="2,14,27", help="representative layers")
    p.add_argument("--budgets", default="1024,2048,4096,8192,16384,32768,65536", help="token budgets")
    p.add_argument("--probe", type=int, default=8, help="held-out probe sequences of 256 tokens")
    p.add_argument("--init-tokens", type=int, default=8192, help="token budget of the init comparison")
    p.set_defaults(func=cmd_curves)
    p = sub.add_parser("child", parents=[common], help="a searched child's evaluation KL vs BLD tokens")
    p.add_argument("--run", required=True, help="a finished run directory (its search/<name>.json is used)")
    p.add_argument("--name", default="child-1.5x", help="the architecture to rebuild")
    p.add_argument("--budgets", default="2048,4096,8192,16384,32768", help="token budgets")
    p.set_defaults(func=cmd_child)
    p = sub.add_parser("schedule", parents=[common], help="held-out NMSE per (batch size, lr) at a run's BLD budget")
    p.add_argument("--run", required=True, help="a run directory after `puzzle data` (its data and BLD settings)")
    p.add_argument("--layers", default="4,16,24", help="layers to distill (the defaults of --layers and --variants "
                                                       "fit a SmolLM2-135M run)")
    p.add_argument("--variants", default="attn-kv1,ffn-768,ffn-256", help="variant ids to train at those layers")
    p.add_argument("--settings", default="4:2e-3,1:2e-3,1:5e-3,2:5e-3,4:1e-2,1:1e-2,2:1e-2", help="batch:lr pairs")
    p.set_defaults(func=cmd_schedule)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PuzzleError as e:
        print(f"bld: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
