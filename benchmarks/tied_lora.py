"""Tied-LoRA vs LoRA on one task: SFT of the SmolLM2 child on the reasoning-toggle demonstration set.

Every configuration trains the same child (the 1.5x child of a finished demo run, read only) for the
same steps on the same batches, from the same starting weights, and is scored by the held-out loss
(mean cross-entropy in nats per assistant token on held-out questions, toggle on and off):

    peft-lora       PEFT's LoRA (the reference), r·(d_in + d_out) per module and layer
    lora            ours, spec BA untied (the same parametrisation as PEFT's)
    tied-BA, tied-BuA, tied-vBA, tied-vBuA   A and B shared per (module, shape), A, B, u, v trained
    vera-like       tied vBuA with A and B frozen (only u and v train)

Data and masking come from `puzzle.sft` (reasoning_toggle_examples, prepare_sft_data,
block_causal_mask); the loop here is a plain AdamW loop over the parameters that require gradients
(`sft.supervised_finetune` turns every parameter trainable, so it cannot train adapters as is).

    python benchmarks/tied_lora.py run --work DIR --config NAME   one configuration (a process each)
        [--child FOLDER]   the child (default: $PUZZLE_DEMO_CHILD, else /tmp/demo1/export/child-1.5x)
    python benchmarks/tied_lora.py run --work DIR --config NAME --lr 1e-2   the same at another learning rate
    python benchmarks/tied_lora.py report --work DIR              DIR/tied_lora.csv and .md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from puzzle.adapters import AdapterConfig, apply_adapters
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.parent import load_parent
from puzzle.pipeline import markdown_table
from puzzle.sft import (IGNORE, block_causal_mask, prepare_sft_data, reasoning_toggle_examples,
                        reasoning_toggle_heldout, toggle_conversation)

DEFAULT_CHILD = "/tmp/demo1/export/child-1.5x"  # the demo run's 1.5x child
CHILD = Path(os.environ.get("PUZZLE_DEMO_CHILD", DEFAULT_CHILD))
CONFIGS = {
    "base": None,
    "peft-lora": "peft",
    "lora": dict(spec="BA", tied=False),
    "tied-BA": dict(spec="BA"),
    "tied-BuA": dict(spec="BuA"),
    "tied-vBA": dict(spec="vBA"),
    "tied-vBuA": dict(spec="vBuA"),
    "vera-like": dict(spec="vBuA", frozen="AB"),
}
DEFAULT_LR = 2e-3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_child(path: Path):
    from puzzle.assets import asset_path

    check_child(path)
    tokenizer = load_parent(str(asset_path("smollm2-gguf"))).tokenizer
    child = load_parent(path, with_tokenizer=False)
    check_vocabulary(path, child.model, tokenizer)
    return dataclasses.replace(child, tokenizer=tokenizer)


def check_child(path: Path) -> None:
    """Raises PuzzleError: `path` is no exported model folder."""
    if not (path / "config.json").is_file():
        raise PuzzleError(f"--child {path} is no exported model folder ({path / 'config.json'} is missing): give "
                          f"--child FOLDER (`puzzle export` or `puzzle run` writes DIR/export/<child>), or set "
                          f"PUZZLE_DEMO_CHILD")


def check_vocabulary(path: Path, model, tokenizer) -> None:
    """Raises PuzzleError: the tokenizer (SmolLM2's) has ids past the child's embedding (IndexError later)."""
    if len(tokenizer) > model.config.vocab_size:
        raise PuzzleError(f"--child {path} has a vocabulary of {model.config.vocab_size} tokens, the SmolLM2 "
                          f"tokenizer of the data {len(tokenizer)}: give a child of a SmolLM2-135M run")


def check_work(work: Path) -> None:
    """Raises PuzzleError: --work is a file."""
    if work.exists() and not work.is_dir():
        raise PuzzleError(f"--work {work} is a file; give a folder")


def data(tokenizer, args):
    train = [r["messages"] for r in reasoning_toggle_examples(args.questions, seed=0)]
    held = [toggle_conversation(q, t)["messages"] for q in reasoning_toggle_heldout(args.held_out, seed=1,
                                                                                   train_questions=args.questions)
            for t in (True, False)]
    return (prepare_sft_data(tokenizer, train, args.seq_len, seed=0),
            prepare_sft_data(tokenizer, held, args.seq_len, seed=0))


def batch_loss(model, packed, rows) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the learned tokens of `rows`, and their count."""
    ids, pos = packed.input_ids[rows], packed.position_ids[rows]
    logits = model(ids, position_ids=pos, attention_mask=block_causal_mask(packed.segments[rows]))[:, :-1]
    tgt = packed.labels[rows, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((tgt != IGNORE).sum())


@torch.no_grad()
def held_out_loss(model, packed, batch: int = 4) -> float:
    model.eval()
    total, n = 0.0, 0
    for a in range(0, packed.input_ids.shape[0], batch):
        loss, count = batch_loss(model, packed, torch.arange(a, min(a + batch, packed.input_ids.shape[0])))
        total, n = total + float(loss), n + count
    return total / n


def attach(model, name: str, rank: int):
    """Apply configuration `name`; returns the trainable-parameter count (base frozen)."""
    spec = CONFIGS[name]
    if spec is None:
        return 0
    if spec == "peft":
        import peft

        peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                     target_modules=list(TARGETS)), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        apply_adapters(model, AdapterConfig(rank=rank, targets=TARGETS, **spec))
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def cmd_run(args) -> None:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    child = load_child(args.child)
    model = child.model
    train, held = data(child.tokenizer, args)
    trainable = attach(model, args.config, args.rank)
    history = []
    if trainable:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        order = torch.randperm(train.input_ids.shape[0], generator=torch.Generator().manual_seed(args.seed)).tolist()
        model.train()
        for step in range(args.steps):
            rows = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
            for g in opt.param_groups:  # linear warmup over the first 10% of the steps, then constant
                g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))
            loss, count = batch_loss(model, train, torch.tensor(rows))
            (loss / count).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(float(loss.detach()) / count)
    train_s = time.perf_counter() - t0
    result = {"config": args.config, "rank": args.rank, "trainable_params": trainable, "steps": args.steps if trainable else 0,
              "batch_rows": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
              "train_rows": int(train.input_ids.shape[0]), "held_out_rows": int(held.input_ids.shape[0]),
              "train_loss_first": history[0] if history else None, "train_loss_last": history[-1] if history else None,
              "history": history, "train_seconds": train_s, "load": os.getloadavg()}
    result["held_out_loss_nats"] = held_out_loss(model, held)
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(args.work / result_name(args.config, args.lr), result)


def result_name(config: str, lr: float) -> str:
    """DIR/<config>.json at the default learning rate, DIR/<config>@lr<lr>.json for the others of a sweep."""
    return f"{config}.json" if lr == DEFAULT_LR else f"{config}@lr{lr:g}.json"


def cmd_report(args) -> None:
    """tied_lora.csv: every run (configuration x learning rate); tied_lora.md: the table at the default
    learning rate, and the best held-out loss of each configuration over the learning rates tried."""
    rows = []
    for name in CONFIGS:
        for path in sorted(args.work.glob(f"{name}*.json")):
            r = json.loads(path.read_text())
            if not isinstance(r, dict) or r.get("config") != name:
                continue
            rows.append({"config": name, "lr": r["lr"], "trainable_params": r["trainable_params"], "steps": r["steps"],
                         "held_out_loss_nats": round(r["held_out_loss_nats"], 4),
                         "train_loss_last_nats": None if r["train_loss_last"] is None else round(r["train_loss_last"], 4),
                         "train_s": round(r["train_seconds"]), "load_1min": round(r["load"][0], 1)})
    if not rows:
        raise PuzzleError(f"{args.work} holds no configuration's results: run `tied_lora.py run --work "
                          f"{args.work} --config NAME` first")
    df = pd.DataFrame(rows)
    lora = df.loc[df.config == "peft-lora", "trainable_params"]
    if len(lora):
        df["params_vs_lora"] = (df.trainable_params / int(lora.iloc[0])).round(4)
    df.to_csv(args.work / "tied_lora.csv", index=False)
    at_default = df[(df.lr == DEFAULT_LR) | (df.config == "base")].drop_duplicates("config")
    best = (df[df.config != "base"].sort_values("held_out_loss_nats").drop_duplicates("config")
            .set_index("config").reindex([c for c in CONFIGS if c != "base"]).dropna(how="all").reset_index())
    best = best.assign(lrs_tried=[", ".join(f"{v:g}" for v in sorted(df.loc[df.config == c, "lr"])) for c in best.config])
    text = (f"Same steps, batches and data for every configuration; held-out loss in nats per assistant token.\n\n"
            f"At the default learning rate ({DEFAULT_LR:g}):\n\n{markdown_table(at_default)}\n\n"
            f"Best of the learning rates tried (chosen on the held-out loss itself, as a sweep would):\n\n"
            f"{markdown_table(best[['config', 'lr', 'lrs_tried', 'trainable_params', 'held_out_loss_nats']])}\n")
    atomic_write_text(args.work / "tied_lora.md", text)
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["run", "report"], help="train one configuration, or tabulate")
    p.add_argument("--work", type=Path, required=True, help="results folder")
    p.add_argument("--child", type=Path, default=CHILD,
                   help=f"exported child folder (default: $PUZZLE_DEMO_CHILD, else {DEFAULT_CHILD})")
    p.add_argument("--config", choices=list(CONFIGS), default="tied-vBuA", help="configuration to run")
    p.add_argument("--rank", type=int, default=8, help="adapter rank r (all configurations)")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps (all configurations)")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=192, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate (results of other rates are kept "
                   "beside the default's, for a sweep)")
    p.add_argument("--questions", type=int, default=120, help="training questions (each with toggle on and off)")
    p.add_argument("--held-out", type=int, default=24, help="held-out questions (each with toggle on and off)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    args = p.parse_args(argv)
    try:
        check_work(args.work)
        if args.phase == "run":
            check_child(args.child)
            args.work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(args.threads)
        {"run": cmd_run, "report": cmd_report}[args.phase](args)
    except PuzzleError as e:
        print(f"tied_lora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
