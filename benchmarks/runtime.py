"""Decode speed of searched children against their parent under the child runtime, and the predicted ratios.

    python benchmarks/runtime.py --out DIR --run /tmp/demo1               # a finished run (read only), its workload
    python benchmarks/runtime.py --out DIR --device cuda --dtype bfloat16  # random SmolLM2-sized weights, demo children

For the parent and each child, in one process and interleaved (every repeat samples every piece once, in a new
random order, so that a shared machine's drift hits all alike):
- runtime: `ChildRuntime.generate` of a (B, P) prompt for G tokens (CUDA graphs on CUDA): prefill_ms and the
  mean decode step, decode_ms; median over repeats;
- eager: the same request on `PuzzleForCausalLM.forward` with its KVCache (what scoring/cost.py times today);
- parts: the runtime's own cost table, from `puzzle.runtime.runtime_step_fns`: every subblock variant timed as a
  stack of N copies (N = the parent's layers), and the non-block piece, so predicted = non-block + sum of parts.

Reported per child (CSV + JSON sidecar with the device, workload and the machine's load):
    decode_ratio                measured under the runtime: parent decode_ms / child decode_ms
    predicted_decode_ratio_parts  the same ratio predicted from the runtime's parts (issue 6: within 10%)
    predicted_decode_ratio_search the ratio the search predicted (its cost table; --run only, or the demo's CPU
                                figures as a reference when run without --run)
    *_error                     predicted / measured - 1
    speedup, predicted_speedup_*  the same for a whole request (prefill + G decode steps)
Without --run the weights are random (speed does not depend on them) and the children are the architectures the
smollm2-demo run found on a 2-core CPU (fp32, B=4, P=128, G=32); nothing is read from disk, so this runs on a
bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.errors import PuzzleError
from puzzle.modeling import KVCache, PuzzleForCausalLM
from puzzle.runtime import ChildRuntime, runtime_step_fns

# SmolLM2-135M's sizes, and the children the smollm2-demo run found (its search/*.json, compact form).
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
DEMO_PARENT = {"decode_ms": 213.160, "prefill_ms": 1341.489}
DEMO_CHILDREN = {
    "child-1.25x": (171.839, 1028.404, 1.2505,
                    "kv3/1536 kv3/1536 kv3/1536 kv3/1536 kv3/1536 linear/1536 noop/1536 linear/1536 linear/1536 "
                    "kv3/1536 kv3/1536 kv3/1536 kv3/768 kv3/768 linear/768 linear/linear kv3/768 linear/768 linear/768 "
                    "kv3/768 linear/768 kv3/768 kv3/1536 kv3/1536 linear/1536 kv3/1536 linear/1536 linear/1536 "
                    "linear/1536 linear/1536"),
    "child-1.5x": (144.292, 821.836, 1.5007,
                   "kv3/1536 kv3/1536 kv3/1536 kv3/1536 kv3/1536 linear/768 noop/768 linear/1536 linear/768 kv3/768 "
                   "kv3/768 kv3/768 linear/768 kv3/768 linear/768 linear/linear kv3/768 linear/linear linear/768 "
                   "kv3/768 linear/768 kv3/768 linear/768 kv3/768 linear/1536 linear/768 linear/768 linear/768 "
                   "linear/1536 linear/1536"),
    "child-2x": (109.795, 566.131, 2.0009,
                 "kv3/1536 kv3/1536 kv3/1536 kv3/768 linear/768 linear/768 noop/768 noop/768 noop/768 linear/768 "
                 "linear/linear linear/768 linear/linear linear/linear linear/linear linear/linear linear/linear "
                 "noop/linear linear/linear linear/linear noop/linear linear/768 linear/768 kv3/768 linear/768 "
                 "linear/768 noop/768 linear/768 linear/768 linear/1536"),
    "child-3x": (74.984, 314.562, 3.0076,
                 "kv3/1536 kv3/768 linear/768 linear/linear noop/linear noop/linear noop/linear noop/linear "
                 "noop/linear noop/linear noop/linear linear/768 noop/linear linear/linear noop/linear linear/linear "
                 "linear/linear noop/linear noop/linear linear/linear noop/linear linear/linear noop/linear "
                 "noop/linear linear/linear noop/linear noop/linear linear/linear linear/768 noop/768"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for runtime.csv, runtime_parts.csv and runtime.json")
    p.add_argument("--run", type=Path, help="a finished run directory (read only): its parent, exported children, "
                                            "workload and search predictions")
    p.add_argument("--children", nargs="+", help="children to measure (default: all exported / all demo children)")
    p.add_argument("--device", help="cpu or cuda (default: the run's target, else cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the run's target, else bfloat16 on CUDA, "
                                                           "float32 on CPU")
    p.add_argument("--batch-size", type=int, help="B (default: the run's target, else 4)")
    p.add_argument("--prompt-len", type=int, help="P (default: the run's target, else 128)")
    p.add_argument("--gen-len", type=int, help="G (default: the run's target, else 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each samples every piece once)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager PuzzleForCausalLM reference")
    p.add_argument("--no-parts", action="store_true", help="skip the runtime's parts prediction")
    p.add_argument("--threads", type=int, help="CPU threads (default: the run's target, else torch's); 1 on a "
                                               "shared machine, where OpenMP threads spin-wait for descheduled peers")
    p.add_argument("--seed", type=int, default=0, help="random weights, prompts and sample order")
    return p.parse_args(argv)


def blocks_from_compact(text: str) -> list[BlockConfig]:
    """'kv3/1536 linear/768 noop/linear ...' (pipeline.compact_architecture) -> BlockConfigs."""
    out = []
    for item in text.split():
        attention, ffn = item.split("/")
        out.append(BlockConfig(AttentionConfig.from_id(f"attn-{attention}"), FFNConfig.from_id(f"ffn-{ffn}")))
    return out


def compact(config: ModelConfig) -> str:
    short = lambda v: v.replace("attn-", "").replace("ffn-", "")  # noqa: E731
    return " ".join(f"{short(b.attention.id)}/{short(b.ffn.id)}" for b in config.blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Models and predictions


def random_models(names, device, dtype, seed) -> tuple[dict, dict]:
    """SmolLM2-sized parent and demo children with random weights; and the demo search's predictions."""
    parent_config = ModelConfig(blocks=(BlockConfig(AttentionConfig("gqa", 3), FFNConfig("swiglu", 1536)),) * 30,
                                **SMOLLM2)
    torch.manual_seed(seed)
    models, search = {}, {}
    with torch.device(device):
        models["parent"] = PuzzleForCausalLM(parent_config).to(dtype).eval()
        for name in names or DEMO_CHILDREN:
            decode_ms, prefill_ms, speedup, arch = DEMO_CHILDREN[name]
            models[name] = PuzzleForCausalLM(parent_config.with_blocks(blocks_from_compact(arch))).to(dtype).eval()
            search[name] = {"decode_ms": decode_ms, "prefill_ms": prefill_ms, "speedup": speedup,
                            "parent_decode_ms": DEMO_PARENT["decode_ms"], "parent_prefill_ms": DEMO_PARENT["prefill_ms"]}
    return models, search


def run_models(run: Path, names, device, dtype) -> tuple[dict, dict, dict]:
    """The run's parent (as the run opens it: a model folder, an asset or the built-in tiny) and exported children
    (weights from disk), the search's predictions, the run's target.

    Raises:
        PuzzleError: `run` is no run directory, or a child is not exported or not searched there.
    """
    from puzzle.baselines import open_run
    from puzzle.parent import load_parent

    config = json.loads((run / "config.json").read_text())
    if not names and (run / "export").is_dir():
        names = sorted(p.name for p in (run / "export").iterdir() if p.is_dir())
    if not names:
        raise PuzzleError(f"{run / 'export'} holds no exported child: run `puzzle front --out {run}` (or `puzzle "
                          f"export`) first, or measure the demo children without --run")
    for name in names:
        for path in (run / "export" / name / "config.json", run / "search" / f"{name}.json"):
            if not path.is_file():
                raise PuzzleError(f"{path} is missing: --children names exported, searched children of {run}")
    models = {"parent": open_run(run, progress=False).parent.model.to(device=device, dtype=dtype)}
    search = {}
    for name in names:
        models[name] = load_parent(str(run / "export" / name), dtype=dtype, with_tokenizer=False).model.to(device)
        record = json.loads((run / "search" / f"{name}.json").read_text())
        search[name] = {"decode_ms": record["decode_ms"], "prefill_ms": record["prefill_ms"],
                        "speedup": record["speedup"], "parent_decode_ms": record["parent"]["decode_ms"],
                        "parent_prefill_ms": record["parent"]["prefill_ms"]}
    return models, search, config["target"]


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn, device: str) -> float:
    """Wall milliseconds of one call, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


class RuntimeRequest:
    """One request on a ChildRuntime: prefill (B, P), then G - 1 decode steps (the first token comes from prefill)."""

    def __init__(self, model, prompt, gen_len, device, dtype):
        self.rt = ChildRuntime(model, prompt.shape[0], prompt.shape[1] + gen_len, device, dtype)
        self.prompt, self.gen_len = prompt, gen_len

    def sample(self) -> tuple[float, float]:
        self.rt.generate(self.prompt, self.gen_len)
        s = self.rt.last_stats
        return s.prefill_ms, s.decode_ms / max(1, s.steps)


class EagerRequest:
    """The same request on PuzzleForCausalLM.forward with a KVCache (allocated before the clock starts)."""

    def __init__(self, model, prompt, gen_len, device):
        self.model, self.prompt, self.gen_len, self.device = model, prompt, gen_len, device

    @torch.no_grad()
    def sample(self) -> tuple[float, float]:
        B, P = self.prompt.shape
        p = next(self.model.parameters())
        cache = KVCache(self.model.config, B, P + self.gen_len, p.dtype, p.device)
        out = {}
        prefill = timed_ms(lambda: out.update(t=self.model(self.prompt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1)),
                           self.device)

        def decode():
            token = out["t"]
            for _ in range(self.gen_len - 1):
                token = self.model(token[:, None], cache=cache, logits_to_keep=1)[:, -1].argmax(-1)

        return prefill, timed_ms(decode, self.device) / max(1, self.gen_len - 1)


class Part:
    """A subblock variant (a stack of `copies` layers holding it) or the non-block piece, timed per copy."""

    def __init__(self, name, model, copies, B, P, context, device, dtype, part):
        self.name, self.copies = name, copies
        self.fns = runtime_step_fns(model, B, P, context, part=part, device=device, dtype=dtype)
        self.device = device

    def sample(self) -> tuple[float, float]:
        prefill = timed_ms(self.fns.prefill, self.device)
        self.fns.prepare_decode()
        return prefill / self.copies, timed_ms(self.fns.decode, self.device) / self.copies


def build_parts(parent_config: ModelConfig, variants, B, P, context, device, dtype) -> dict[str, Part]:
    """Each variant as a stack of L layers (L = the parent's depth) with the other subblock no_op; the non-block
    piece as an all-no_op model of the same depth."""
    L = parent_config.num_hidden_layers
    parts = {}
    with torch.device(device):
        for v in variants:
            block = BlockConfig(v, FFNConfig("no_op")) if isinstance(v, AttentionConfig) else BlockConfig(AttentionConfig("no_op"), v)
            stack = PuzzleForCausalLM(parent_config.with_blocks([block] * L)).to(dtype).eval()
            parts[v.id] = Part(v.id, stack, L, B, P, context, device, dtype, "layers")
        empty = PuzzleForCausalLM(parent_config.with_blocks([BlockConfig(AttentionConfig("no_op"), FFNConfig("no_op"))] * L))
        parts["non_block"] = Part("non_block", empty.to(dtype).eval(), 1, B, P, context, device, dtype, "model")
    return parts


def predict(config: ModelConfig, costs: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(prefill_ms, decode_ms) of a model: the non-block piece plus its subblocks' parts."""
    prefill, decode = costs["non_block"]
    for block in config.blocks:
        for v in (block.attention, block.ffn):
            if v.kind != "no_op":
                prefill, decode = prefill + costs[v.id][0], decode + costs[v.id][1]
    return prefill, decode


# ---------------------------------------------------------------------------------------------------------------------


def summarize(models, tasks, samples, search, B, G) -> pd.DataFrame:
    """One row per model from the samples so far (medians over the rounds)."""
    median = {k: tuple(float(x) for x in np.median(np.asarray(v), axis=0)) for k, v in samples.items()}
    part_costs = {k[1]: v for k, v in median.items() if k[0] == "part"}
    rows = []
    for name, model in models.items():
        prefill, decode = median[("runtime", name)]
        row = {"name": name, "architecture": "parent" if name == "parent" else compact(model.config),
               "params": model.num_parameters(), "kv_cache_mib": tasks[("runtime", name)].rt.kv_cache_bytes() / 2**20,
               "prefill_ms": prefill, "decode_ms": decode, "decode_tok_s": B / (decode / 1e3),
               "request_ms": prefill + G * decode}
        if ("eager", name) in median:
            e_prefill, e_decode = median[("eager", name)]
            row.update(eager_prefill_ms=e_prefill, eager_decode_ms=e_decode, eager_decode_tok_s=B / (e_decode / 1e3),
                       runtime_vs_eager_decode=e_decode / decode)
        if part_costs:
            p_prefill, p_decode = predict(model.config, part_costs)
            row.update(parts_prefill_ms=p_prefill, parts_decode_ms=p_decode)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("name")
    parent = table.loc["parent"]
    table["decode_ratio"] = parent["decode_ms"] / table["decode_ms"]
    table["speedup"] = parent["request_ms"] / table["request_ms"]
    if part_costs:
        table["predicted_decode_ratio_parts"] = parent["parts_decode_ms"] / table["parts_decode_ms"]
        table["decode_ratio_error_parts"] = table["predicted_decode_ratio_parts"] / table["decode_ratio"] - 1
        req = table["parts_prefill_ms"] + G * table["parts_decode_ms"]
        table["predicted_speedup_parts"] = req["parent"] / req
        table["speedup_error_parts"] = table["predicted_speedup_parts"] / table["speedup"] - 1
    s = pd.DataFrame.from_dict(search, orient="index")
    if len(s):
        table["predicted_decode_ratio_search"] = s["parent_decode_ms"] / s["decode_ms"]
        table["decode_ratio_error_search"] = table["predicted_decode_ratio_search"] / table["decode_ratio"] - 1
        table["predicted_speedup_search"] = s["speedup"]
        table["speedup_error_search"] = table["predicted_speedup_search"] / table["speedup"] - 1
    table = table.reset_index()
    table.attrs["parts"] = pd.DataFrame([{"part": n, "prefill_ms": c[0], "decode_ms": c[1]} for n, c in part_costs.items()])
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = checked(args)
    except PuzzleError as e:
        print(f"runtime: error: {e}", file=sys.stderr)
        return 2
    device = args.device or target.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU (none is visible to torch)")
    dtype_name = args.dtype or target.get("dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = DTYPES[dtype_name]
    given = lambda value, key, default: value if value is not None else target.get(key) or default  # noqa: E731
    B, P, G = given(args.batch_size, "batch_size", 4), given(args.prompt_len, "prompt_len", 128), \
        given(args.gen_len, "gen_len", 32)
    if threads := given(args.threads, "threads", None):
        torch.set_num_threads(int(threads))

    t_start = time.perf_counter()
    with torch.no_grad():
        if args.run is not None:
            try:
                models, search, _ = run_models(args.run, args.children, device, dtype)
            except PuzzleError as e:
                print(f"runtime: error: {e}", file=sys.stderr)
                return 2
        else:
            models, search = random_models(args.children, device, dtype, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(models["parent"].config.vocab_size, (B, P), generator=gen).to(device)  # (B, P)
        tasks = {("runtime", n): RuntimeRequest(m, prompt, G, device, dtype) for n, m in models.items()}
        if not args.no_eager:
            tasks.update({("eager", n): EagerRequest(m, prompt, G, device) for n, m in models.items()})
        if not args.no_parts:
            variants = {v.id: v for m in models.values() for b in m.config.blocks for v in (b.attention, b.ffn)
                        if v.kind != "no_op"}
            parts = build_parts(models["parent"].config, variants.values(), B, P, P + G // 2, device, dtype)
            tasks.update({("part", n): p for n, p in parts.items()})

        rng = np.random.default_rng(args.seed)
        keys = list(tasks)
        samples = {k: [] for k in keys}
        for r in range(1 + args.repeats):  # round 0 warms up (allocations, autotuning; graphs are already captured)
            for i in rng.permutation(len(keys)):
                result = tasks[keys[i]].sample()
                if r > 0:
                    samples[keys[i]].append(result)
            if r > 0:  # write after every round: a run stopped early still leaves its figures
                table = summarize(models, tasks, samples, search, B, G)
                write(args.out, table, device, dtype_name, B, P, G, r, args, t_start)
                print(f"round {r}/{args.repeats} written ({time.perf_counter() - t_start:.0f} s)", flush=True)

    shown = [c for c in ["name", "decode_ms", "decode_tok_s", "runtime_vs_eager_decode", "decode_ratio",
                         "predicted_decode_ratio_parts", "decode_ratio_error_parts", "predicted_decode_ratio_search",
                         "decode_ratio_error_search", "speedup", "predicted_speedup_parts", "predicted_speedup_search"]
             if c in table.columns]
    print(f"{device} {dtype_name} B={B} P={P} G={G}; load average {os.getloadavg()}")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(table[shown].to_string(index=False))
    print(f"wrote {args.out / 'runtime.csv'} and {args.out / 'runtime.json'}")
    return 0


def checked(args) -> dict:
    """The run's target ({} without --run), after the checks that need no model.

    Raises:
        PuzzleError: --out is a file, a size, --repeats or --threads below 1, --run is no run directory, or
            --children names no demo child (without --run).
    """
    if args.out.exists() and not args.out.is_dir():
        raise PuzzleError(f"--out {args.out} is a file; give a folder")
    for flag, value in (("--batch-size", args.batch_size), ("--prompt-len", args.prompt_len),
                        ("--gen-len", args.gen_len), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:  # breaker: 0 became the default, --repeats 0 a NameError
            raise PuzzleError(f"{flag} must be at least 1, got {value}")
    if args.run is None:
        unknown = [n for n in args.children or () if n not in DEMO_CHILDREN]
        if unknown:
            raise PuzzleError(f"--children {' '.join(unknown)}: without --run choose from the demo children "
                              f"{', '.join(DEMO_CHILDREN)}")
        return {}
    from puzzle.config import load_run_config

    load_run_config(args.run)  # no run directory: said here, naming it
    return json.loads((args.run / "config.json").read_text())["target"]


def write(out: Path, table: pd.DataFrame, device, dtype_name, B, P, G, rounds, args, t_start) -> None:
    """runtime.csv, runtime_parts.csv and the runtime.json sidecar."""
    table.to_csv(out / "runtime.csv", index=False)
    if len(table.attrs["parts"]):
        table.attrs["parts"].to_csv(out / "runtime_parts.csv", index=False)
    sidecar = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine()),
        "dtype": dtype_name, "batch_size": B, "prompt_len": P, "gen_len": G, "decode_context_parts": P + G // 2,
        "rounds": rounds, "repeats_asked": args.repeats, "weights": f"run {args.run}" if args.run else "random (SmolLM2 sizes)",
        "search_predictions": ("the run's search" if args.run else "the smollm2-demo search on a 2-core CPU, fp32, "
                               "B=4 P=128 G=32 (a reference only on other targets)"),
        "cuda_graphs": device.startswith("cuda"), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "runtime.json").write_text(json.dumps(sidecar, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
