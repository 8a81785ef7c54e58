"""Graded-reward RPO demonstration on the SmolLM2 child: offline and online, reward before and after per loss.

The policy is the 1.5x child of a finished demo run (its exported nemotron-nas folder, read only). The
reward is the parent as a judge (`puzzle.rewards.LikelihoodJudge`: the parent's mean log-prob per
response token, in nats/token, a graded score) on prompts of the three verifiable synthetic tasks
(count, repeat, reverse), whose partial-correctness score is reported too. The HHH-alignment pairs
(BIG-bench, evaluation only) measure the implicit-reward preference accuracy against the starting child.

Phases (each a separate process, so each stays short on a shared 2-core machine):

    python benchmarks/rpo_demo.py prepare --work DIR          prompts, offline data (K samples per
                                                              prompt, judged), the baseline, HHH reference
    python benchmarks/rpo_demo.py train --work DIR --loss L [--online] [--hhh]
    python benchmarks/rpo_demo.py report --work DIR           DIR/rpo_demo.csv and DIR/rpo_demo.md

prepare and train take --child FOLDER, the exported child (default: $PUZZLE_DEMO_CHILD, else
/tmp/demo1/export/child-1.5x).

Everything trains Tied-LoRA adapters (spec BA untied = plain LoRA, `puzzle.adapters`) on the child,
with π_ref the starting child: offline through the cached reference log-probs, online a frozen copy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from puzzle.adapters import AdapterConfig, apply_adapters
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.parent import load_parent
from puzzle.pipeline import markdown_table
from puzzle.preference import (RPOConfig, best_worst_pair, encode_records, evaluate_rewards, frozen_copy,
                               hhh_alignment_records, mean_ci, preference_accuracy, read_preference_data,
                               record_from_dict, reference_logprobs, sample_groups, train_offline, train_online)
from puzzle.rewards import TASKS, LikelihoodJudge

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's checks of the demo child
from tied_lora import check_child, check_vocabulary, check_work  # noqa: E402

DEFAULT_CHILD = "/tmp/demo1/export/child-1.5x"  # the demo run's 1.5x child
CHILD = Path(os.environ.get("PUZZLE_DEMO_CHILD", DEFAULT_CHILD))
BIGBENCH = Path(os.environ.get("PUZZLE_CACHE", Path.home() / ".cache" / "puzzle")) / "sdists" / "bigbench-1.0.0.tar.gz"
TASK_NAMES = ("count", "repeat", "reverse")


def load_models(path: Path):
    """(child, parent) LoadedModels; the child (the exported folder `path`) shares the parent's tokenizer (an
    export's tokenizer folder makes transformers ask about remote code, a 15 s wait without a terminal)."""
    import dataclasses

    from puzzle.assets import asset_path

    check_child(path)
    parent = load_parent(str(asset_path("smollm2-gguf")))
    child = load_parent(path, with_tokenizer=False)
    check_vocabulary(path, child.model, parent.tokenizer)
    return dataclasses.replace(child, tokenizer=parent.tokenizer), parent


def prompts(n_per_task: int, seed: int, exclude: list = ()) -> list:
    """n_per_task chat prompts of each task, none equal to a prompt in `exclude`."""
    banned = {json.dumps(p) for p in exclude}
    out = []
    for name in TASK_NAMES:
        fresh = [p for p in TASKS[name].prompts(4 * n_per_task + 20, seed) if json.dumps(p) not in banned]
        unique = list({json.dumps(p): p for p in fresh}.values())
        out += unique[:n_per_task]
    return out


def train_prompts(args) -> list:
    return prompts(args.train_per_task, 0)


def held_out_prompts(args) -> list:
    return prompts(args.eval_per_task, 1000, exclude=train_prompts(args))


def task_score(prompt, response: str) -> float:
    text = prompt[-1]["content"]
    name = "count" if text.startswith("Count") else "repeat" if text.startswith("Repeat") else "reverse"
    return TASKS[name].score(prompt, response)


def evaluate(model, tokenizer, judge, held_out, args) -> dict:
    df = evaluate_rewards(model, tokenizer, held_out, judge, args.max_new_tokens, batch_size=12)
    df["task_score"] = [task_score(held_out[i], r) for i, r in zip(df.prompt_index, df.response)]
    return {"judge": df.reward.tolist(), "task": df.task_score.tolist(), "responses": df.response.tolist()[:6]}


def hhh_records(tokenizer, args):
    records = hhh_alignment_records(BIGBENCH)
    return encode_records(tokenizer, records, max_prompt_tokens=args.hhh_prompt_tokens,
                          max_response_tokens=args.hhh_response_tokens)


def cmd_prepare(args) -> None:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    child, parent = load_models(args.child)
    judge = LikelihoodJudge(parent.model, parent.tokenizer)
    train, held_out = train_prompts(args), held_out_prompts(args)
    assert not {json.dumps(p) for p in train} & {json.dumps(p) for p in held_out}
    gen = torch.Generator().manual_seed(0)
    from puzzle.preference import encode_prompt

    rows = []
    for i in range(0, len(train), 8):
        chunk = train[i:i + 8]
        recs, _ = sample_groups(child.model, child.tokenizer, chunk, [encode_prompt(child.tokenizer, p) for p in chunk],
                                judge, args.k, args.max_new_tokens, 1.0, generator=gen)
        rows += [{"prompt": list(r.prompt), "responses": list(r.responses), "rewards": list(r.rewards)} for r in recs]
    atomic_write_text(work / "groups.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pairs = [best_worst_pair(record_from_dict(r)) for r in rows]
    pair_rows = [{"prompt": list(p.prompt), "chosen": p.responses[0], "rejected": p.responses[1],
                  "chosen_reward": p.rewards[0], "rejected_reward": p.rewards[1]} for p in pairs if p is not None]
    atomic_write_text(work / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in pair_rows))
    before = evaluate(child.model, child.tokenizer, judge, held_out, args)
    hhh = hhh_records(child.tokenizer, args)
    ref = reference_logprobs(child.model, hhh, work / "ref_cache", batch_size=8)
    acc = preference_accuracy(ref, ref, hhh, beta=args.beta)  # the starting child is π_ref: all pairs tie
    atomic_write_json(work / "results" / "before.json", {"name": "before", "eval": before, "hhh": acc,
                                                          "seconds": time.perf_counter() - t0})
    atomic_write_json(work / "prepare.json", {"train_prompts": len(train), "held_out_prompts": len(held_out),
                                              "groups": len(rows), "pairs": len(pair_rows), "k": args.k,
                                              "max_new_tokens": args.max_new_tokens, "child": str(args.child),
                                              "load": os.getloadavg(), "seconds": time.perf_counter() - t0})


def cmd_train(args) -> None:
    work = args.work
    if not (work / "results" / "before.json").is_file():
        raise PuzzleError(f"{work / 'results' / 'before.json'} is missing: run `rpo_demo.py prepare --work {work}` "
                          f"first")
    t0 = time.perf_counter()
    child, parent = load_models(args.child)
    judge = LikelihoodJudge(parent.model, parent.tokenizer)
    model, tok = child.model, child.tokenizer
    ref_model = frozen_copy(model)
    handle = apply_adapters(model, AdapterConfig(spec="BA", rank=args.rank, tied=False))
    config = RPOConfig(loss=args.loss, beta=args.beta, eta=args.eta, gamma=args.gamma, aggregate=args.aggregate,
                       steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, k=args.k,
                       max_new_tokens=args.max_new_tokens, temperature=1.0)
    tag = "" if args.eta == 1.0 else f"-eta{args.eta:g}"  # runs of an η sweep sit beside the default's
    if args.online:
        name = f"online-{args.loss}{tag}"
        history = train_online(model, tok, train_prompts(args), judge, config,
                               ref_model if args.loss != "rloo" else None)
    else:
        name = f"offline-{args.loss}{tag}"
        path = work / ("groups.jsonl" if args.loss in ("rpo-multi", "rloo") else "pairs.jsonl")
        encoded = encode_records(tok, read_preference_data(path))
        reference = reference_logprobs(ref_model, encoded, work / "ref_cache") if args.loss != "simpo" else None
        history = train_offline(model, encoded, config, reference)
    train_s = time.perf_counter() - t0
    held_out = held_out_prompts(args)
    result = {"name": name, "loss": args.loss, "online": args.online, "config": {**vars(args), "work": str(work)},
              "logprobs": config.logprob_label, "adapters": handle.config.name, "trainable": handle.num_trainable(),
              "history": history.to_dict("list"), "eval": evaluate(model, tok, judge, held_out, args),
              "train_seconds": train_s, "load": os.getloadavg()}
    if args.hhh:
        hhh = hhh_records(tok, args)
        ref = reference_logprobs(ref_model, hhh, work / "ref_cache", batch_size=8)
        result["hhh"] = preference_accuracy(model, ref, hhh, beta=args.beta)
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(work / "results" / f"{name}.json", result)


def cmd_report(args) -> None:
    work = args.work
    if not (work / "results" / "before.json").is_file():
        raise PuzzleError(f"{work / 'results' / 'before.json'} is missing: run `rpo_demo.py prepare --work {work}` "
                          f"first")
    before = json.loads((work / "results" / "before.json").read_text())
    rows = []
    for path in sorted((work / "results").glob("*.json")):
        r = json.loads(path.read_text())
        judge, task = mean_ci(r["eval"]["judge"]), mean_ci(r["eval"]["task"])
        row = {"run": r["name"], "judge_nats_tok": judge["mean"], "judge_ci95": f"[{judge['ci_low']:.3f}, {judge['ci_high']:.3f}]",
               "task_score": task["mean"], "task_ci95": f"[{task['ci_low']:.3f}, {task['ci_high']:.3f}]"}
        if r["name"] != "before":
            diff = mean_ci([a - b for a, b in zip(r["eval"]["judge"], before["eval"]["judge"])])
            row["judge_change_ci95"] = f"{diff['mean']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
            row["steps"] = r["config"]["steps"]
            row["eta"] = r["config"]["eta"]
            row["train_s"] = round(r["train_seconds"])
        if "hhh" in r:
            h = r["hhh"]
            row["hhh_implicit_acc"] = f"{h['implicit_accuracy']:.3f} ± {h['implicit_se']:.3f}"
            row["hhh_ties"] = h["ties"]
            row["hhh_likelihood_acc"] = f"{h['likelihood_accuracy']:.3f} ± {h['likelihood_se']:.3f}"
        rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(work / "rpo_demo.csv", index=False)
    atomic_write_text(work / "rpo_demo.md", markdown_table(df))
    print(df.to_string(index=False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["prepare", "train", "report"], help="which phase to run")
    p.add_argument("--work", type=Path, required=True, help="work folder (results under DIR/results)")
    p.add_argument("--child", type=Path, default=CHILD,
                   help=f"exported child folder (default: $PUZZLE_DEMO_CHILD, else {DEFAULT_CHILD})")
    p.add_argument("--loss", default="rpo-bwd-kl", help="loss to train (train phase)")
    p.add_argument("--online", action="store_true", help="online: sample from the policy each step")
    p.add_argument("--hhh", action="store_true", help="also measure HHH implicit-reward accuracy after training")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of the adapters")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--beta", type=float, default=0.1, help="β")
    p.add_argument("--eta", type=float, default=1.0, help="η (rewards are in nats/token)")
    p.add_argument("--gamma", type=float, default=0.5, help="SimPO γ")
    p.add_argument("--aggregate", choices=["sum", "mean"], default="sum", help="token log-probs summed or averaged")
    p.add_argument("--k", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per response")
    p.add_argument("--train-per-task", type=int, default=24, help="training prompts per task")
    p.add_argument("--eval-per-task", type=int, default=12, help="held-out prompts per task")
    p.add_argument("--hhh-prompt-tokens", type=int, default=48, help="HHH prompts keep their last N tokens")
    p.add_argument("--hhh-response-tokens", type=int, default=32, help="HHH replies keep their first N tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    args = p.parse_args(argv)
    try:
        check_work(args.work)
        if args.phase != "report":
            check_child(args.child)
        torch.set_num_threads(args.threads)
        {"prepare": cmd_prepare, "train": cmd_train, "report": cmd_report}[args.phase](args)
    except PuzzleError as e:
        print(f"rpo_demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
