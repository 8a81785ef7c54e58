"""Benchmark: what GKD and SFT do to a real child (SmolLM2-135M, a run directory's searched child).

    python benchmarks/gkd.py gkd --run /tmp/demo1 --name child-1.5x --work W --tokens 50000 \
        [--calib-tokens 262144 --max-doc-tokens 0] [--lr 3e-4] [--stop-after-steps K] [--downstream-limit N]
    python benchmarks/gkd.py sft-toggle --run /tmp/demo1 --name child-1.5x --work W [--model FOLDER] \
        [--questions 40] [--epochs 2]

gkd: the child is evaluated on the run's evaluation split (KL(parent || child) and LM loss, nats per
token; top-1 agreement) before and after `puzzle gkd` on calibration text only (the run's
calibration sources, re-packed when --calib-tokens asks for more than the run packed; documents
disjoint from scoring and evaluation). Recovery fraction = (KL_before − KL_after) / KL_before.
With --downstream-limit N the scoring harness (scoring/harness.py) also scores N documents per task
before and after. --stop-after-steps splits a long run into calls that each stay short; every call
resumes from the checkpoint and the last one writes the figures. Rows go to W/gkd_results.csv.

sft-toggle: `puzzle sft` on the packaged reasoning-toggle demonstration set
(`demo:reasoning-toggle`, written by puzzle.sft in code), then greedy answers to held-out questions with
"detailed thinking on" and "off": the share with a think block, with a well-formed one, and
correct. The model before SFT is measured the same way. Rows go to W/sft_toggle.csv.

The run directory is read, never written: what the stages need is copied to W/run first (once; a later call
with the same W resumes there, and is refused when W/run was copied from another run or the run was rebuilt).
Figures depend on machine load: each row records the load average at its start and end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.io import atomic_write_text  # noqa: E402

SOURCE = "gkd_source.json"  # in W/run: the stamp of the run it was copied from
COPY = ("config.json", "parent.json", "data", "library", "search")
#: files whose bytes say which run (and which build of it) a working copy was made from
STAMPED = ("config.json", "parent.json", "data/manifest.json", "library/meta.json", "library/index.csv",
           "search/chosen.json")


def source_stamp(run: Path) -> dict:
    """Which run a working copy comes from: its resolved path and a hash of the files that change when its
    data, library or search are rebuilt (plus each search/*.json architecture)."""
    h = hashlib.sha256()
    files = [run / f for f in STAMPED] + sorted((run / "search").glob("*.json"))
    for f in files:
        h.update(f"{f.relative_to(run).as_posix()}\0".encode())
        h.update(f.read_bytes() if f.is_file() else b"<missing>")
        h.update(b"\0")
    return {"run": str(run.resolve()), "sha256": h.hexdigest()}


def working_copy(run: Path, work: Path) -> Path:
    """W/run: the files of `run` that GKD/SFT read (the original stays untouched), made once and stamped with
    `source_stamp`; a later call reuses it (GKD resumes there) only for the same, unchanged run.

    Raises:
        PuzzleError: `run` is no run directory, or W/run was made from another run or from an earlier build of it.
    """
    from puzzle.config import load_run_config
    from puzzle.errors import PuzzleError

    load_run_config(run)  # names the --run given (not W/run) when it is no run directory
    dest, stamp = work / "run", source_stamp(run)
    if dest.exists():
        try:
            made = json.loads((dest / SOURCE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            made = None
        if made != stamp:
            what = ("holds no record of the run it was copied from" if made is None
                    else f"was copied from {made.get('run')}" if made.get("run") != stamp["run"]
                    else f"was copied from an earlier build of {stamp['run']} (its config, data, library or search "
                         f"changed since)")
            raise PuzzleError(f"{dest} {what}, not from --run {run} as it is now: give another --work, or delete "
                              f"{dest} (it holds the GKD/SFT work of that run) to start afresh")
        return dest
    partial = work / "run.partial"
    if partial.exists():  # an interrupted copy
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for name in COPY:
        src, dst = run / name, partial / name
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    atomic_write_text(partial / SOURCE, json.dumps(stamp, indent=1))
    partial.rename(dest)
    return dest


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _append(path: Path, row: dict) -> None:
    df = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    atomic_write_text(path, pd.concat([df, pd.DataFrame([row])], ignore_index=True).to_csv(index=False))


def downstream(model, tokenizer, limit: int, run_dir: Path) -> dict:
    from puzzle.scoring.harness import evaluate_tasks
    from puzzle.scoring.tasks import used_lambada_ids

    tasks = ("hellaswag", "arc_easy", "piqa", "lambada")
    result = evaluate_tasks(model, tokenizer, tasks, limit=limit, exclude_lambada=used_lambada_ids(run_dir))
    t = result.table
    return {f"{r.task}_{r.metric}": float(r.value) for r in t.itertuples() if r.metric in ("acc", "acc_norm")}


def cmd_gkd(args) -> int:
    from puzzle.distill import add_gkd_parser, run_gkd_command

    work = Path(args.work)
    run = working_copy(Path(args.run), work)
    dest = work / f"{args.name}-gkd-{args.tokens}"
    parser = argparse.ArgumentParser()
    add_gkd_parser(parser.add_subparsers())
    argv = ["gkd", "--out", str(run), "--name", args.name, "--tokens", str(args.tokens), "--dest", str(dest),
            "--work", str(work / f"gkd-{args.tokens}"), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
            "--checkpoint-every", str(args.checkpoint_every), "--device", "cpu"] + args.extra
    if args.calib_tokens:
        argv += ["--calib-tokens", str(args.calib_tokens)]
    if args.max_doc_tokens is not None:
        argv += ["--max-doc-tokens", str(args.max_doc_tokens)]
    if args.stop_after_steps:
        argv += ["--stop-after-steps", str(args.stop_after_steps)]
    gargs = parser.parse_args(argv)
    start_load, t0 = load(), time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    summary = run_gkd_command(gargs, log=log)
    if not summary.get("finished"):
        print(f"stopped at step {summary['steps_done']}; rerun the same command to continue", file=sys.stderr)
        return 0
    b, a = summary["before"], summary["after"]
    row = {"child": args.name, "tokens": summary["tokens_trained"], "epochs": summary["epochs"], "lr": args.lr,
           "batch_size": args.batch_size, "steps": summary["steps"], "kl_before_nats": b["kl_nats"],
           "kl_after_nats": a["kl_nats"], "recovery_fraction": summary["recovery_fraction"],
           "lm_loss_before_nats": b["lm_loss"], "lm_loss_after_nats": a["lm_loss"],
           "top1_before": b["top1_agree"], "top1_after": a["top1_agree"], "train_tok_s": summary["train_tok_s"],
           "resumed_from_step": summary["resumed_from_step"], "train_data": summary["train_data"],
           "eval_data": summary["eval_data"], "load_start": start_load, "load_end": load(),
           "wall_s": round(time.perf_counter() - t0, 1)}
    if args.downstream_limit:
        from puzzle.parent import load_parent
        from puzzle.pipeline import Run, build_child, read_architecture
        from puzzle.config import load_run_config

        r = Run(run, load_run_config(run), progress=False)
        before_model = build_child(r, read_architecture(r, args.name))
        after = load_parent(str(dest))
        for tag, model in (("before", before_model), ("after", after.model)):
            for k, v in downstream(model, r.parent.tokenizer, args.downstream_limit, run).items():
                row[f"{k}_{tag}"] = v
        for k, v in downstream(r.parent.model, r.parent.tokenizer, args.downstream_limit, run).items():
            row[f"{k}_parent"] = v
    _append(work / "gkd_results.csv", row)
    print(json.dumps(row, indent=1))
    return 0


def cmd_sft_toggle(args) -> int:
    from puzzle.config import load_run_config
    from puzzle.parent import load_parent
    from puzzle.pipeline import Run, build_child, read_architecture
    from puzzle.sft import (add_sft_parser, reasoning_toggle_heldout, run_sft_command, toggle_report,
                            toggle_summary)

    work = Path(args.work)
    run = working_copy(Path(args.run), work)
    r = Run(run, load_run_config(run), progress=False)
    tokenizer = r.parent.tokenizer
    if args.model:
        start = load_parent(args.model).model
        what = args.model
    else:
        start = build_child(r, read_architecture(r, args.name))
        what = f"{args.name} of {args.run}"
    questions = reasoning_toggle_heldout(args.questions)
    dest = work / f"sft-{Path(what).name if args.model else args.name}"
    rows = []
    t0, start_load = time.perf_counter(), load()
    before = toggle_report(start, tokenizer, questions, args.max_new_tokens, progress=True)
    atomic_write_text(work / "toggle_before.csv", before.to_csv(index=False))
    rows += [{"stage": "before_sft", **row} for row in toggle_summary(before).to_dict(orient="records")]
    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    model_args = ["--model", args.model] if args.model else ["--out", str(run), "--name", args.name]
    sargs = parser.parse_args(["sft", *model_args, "--data", "demo:reasoning-toggle", "--dest", str(dest),
                               "--epochs", str(args.epochs), "--lr", str(args.lr), "--seq-len", str(args.seq_len),
                               "--batch-size", str(args.batch_size), "--device", "cpu"])
    summary = run_sft_command(sargs, log=lambda m: print(m, file=sys.stderr, flush=True))
    tuned = load_parent(str(dest)).model
    after = toggle_report(tuned, tokenizer, questions, args.max_new_tokens, progress=True)
    atomic_write_text(work / "toggle_after.csv", after.to_csv(index=False))
    rows += [{"stage": "after_sft", **row} for row in toggle_summary(after).to_dict(orient="records")]
    for row in rows:
        row.update(model=what, questions=len(questions), epochs=args.epochs, lr=args.lr,
                   sft_steps=summary["steps"], sft_train_s=summary["train_s"], sft_last_loss=summary["last_loss"],
                   load_start=start_load, load_end=load(), wall_s=round(time.perf_counter() - t0, 1))
        _append(work / "sft_toggle.csv", row)
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gkd", help="eval KL / LM loss before and after GKD")
    g.add_argument("--run", required=True, help="run directory (read only)")
    g.add_argument("--name", default="child-1.5x", help="architecture in RUN/search/")
    g.add_argument("--work", required=True, help="working folder (copies, checkpoints, exports, results)")
    g.add_argument("--tokens", type=int, default=50_000, help="GKD training tokens")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    g.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    g.add_argument("--calib-tokens", type=int, default=0, help="re-pack the calibration sources for this many tokens")
    g.add_argument("--max-doc-tokens", type=int, default=None, help="tokens kept per document when re-packing")
    g.add_argument("--stop-after-steps", type=int, default=0, help="stop this call after K steps (resume later)")
    g.add_argument("--downstream-limit", type=int, default=0, help="documents per task for the harness (0: skip)")
    g.add_argument("extra", nargs="*", help="more `puzzle gkd` flags after --")
    g.set_defaults(func=cmd_gkd)
    s = sub.add_parser("sft-toggle", help="think-block fraction with the toggle on/off before and after SFT")
    s.add_argument("--run", required=True, help="run directory (read only): tokenizer and, without --model, the child")
    s.add_argument("--name", default="child-1.5x", help="architecture in RUN/search/ (or 'parent')")
    s.add_argument("--model", help="start from this model folder instead (e.g. the GKD export)")
    s.add_argument("--work", required=True, help="working folder")
    s.add_argument("--questions", type=int, default=40, help="held-out questions (each asked on and off)")
    s.add_argument("--max-new-tokens", type=int, default=96, help="tokens per greedy answer")
    s.add_argument("--epochs", type=float, default=2.0, help="SFT passes over the demonstration set")
    s.add_argument("--lr", type=float, default=1e-4, help="SFT peak learning rate")
    s.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    s.add_argument("--batch-size", type=int, default=8, help="rows per step")
    s.set_defaults(func=cmd_sft_toggle)
    args = p.parse_args(argv)
    from puzzle.errors import PuzzleError

    try:
        return args.func(args)
    except PuzzleError as e:
        print(f"gkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
