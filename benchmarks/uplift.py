"""Benchmark: does our margin over the baselines survive global KD? Our child and each baseline get the same GKD.

    python benchmarks/uplift.py --run DIR --speedup 1.5 [--tokens 65536] [--calib-tokens 131072] [--lr 2e-4]
        [--methods greedy,layer_removal,uniform_width,attention_removal] [--out DIR/uplift-<S>x] [--keep-checkpoints]

Run it after `puzzle baselines --out DIR --speedups S`, `puzzle front --out DIR` and, optionally, `puzzle refine
--out DIR --name child-<S>x` (then `puzzle front` again). It takes, at the target S:
  * ours as `puzzle front` picks it (`plots.selected_children`: the plain, diverse or refined child with the lowest
    scoring-split KL; the plain child where refine did not run);
  * each baseline `puzzle baselines` built for S (its row's target_speedup), after BLD where it has trainable
    parts (greedy, uniform width) and as built where it has none (layer removal, attention removal).
Each model is rebuilt from its recorded architecture (`downstream.build_front_model`), evaluated on the run's
evaluation split (KL(parent || model) and LM loss, nats per token), trained by `distill.distill` with one
GKDConfig (the same tokens, order, learning rate and seed for all: the run's calibration sources re-packed to
--calib-tokens, documents disjoint from scoring and evaluation), and evaluated again. GKD keeps the architecture,
so each model keeps its measured speed-up (the front's row).

Ratios: our evaluation KL over each baseline's at matched measured speed-up, before and after GKD, with
`plots.matched_ratios` (each front is the parent at 1x and KL 0 plus its one model, read by linear interpolation
at the slower model's speed-up, so the faster model's KL there is interpolated towards the parent's; `far` marks a
pair whose speed-ups are more than `plots.FAR_FROM_TARGET` apart), and the two measured KLs divided as they are.

Resumes: a model's row (OUT/rows/<name>.json) is kept while its settings, architecture, library entries and data
match, and an interrupted training resumes from its checkpoint (OUT/work/<name>-<settings hash>/; a model's
checkpoints go once its row is written, unless --keep-checkpoints); a model that is another one under a second
name (greedy picking our child) takes that one's figures (`same_as`). Writes OUT/uplift.csv (one
row per model), OUT/uplift_ratios.csv and OUT/settings.json, and prints the tables. It writes into the run
directory: OUT defaults to DIR/uplift-<S>x, and the re-packed training tokens go to DIR/gkd/data-<settings>, as
`puzzle gkd --calib-tokens` keeps them. Training runs on the CPU in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.cli import speedup_flag  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.io import atomic_write_json, atomic_write_text, read_json, tensor_sha256  # noqa: E402
from puzzle.plots import BASELINE_METHODS  # noqa: E402


def pick_models(run, speedup: float, methods) -> pd.DataFrame:
    """Front rows of ours (as `puzzle front` selects it) and of each baseline built for `speedup`, parent first.

    Raises:
        PuzzleError: our child is missing, a baseline is unknown, or none is built for `speedup`, naming the command
            that makes it.
    """
    from puzzle.plots import current_front_rows, selected_children

    def built_for(name) -> bool:  # the baseline's row says which target it was built for
        path = run.out / "baselines" / "rows" / f"{name}.json"
        try:
            target = read_json(path).get("target_speedup") if path.is_file() else None
        except (PuzzleError, AttributeError):
            return False
        return isinstance(target, (int, float)) and math.isclose(target, speedup, rel_tol=1e-9)

    rows = current_front_rows(run.out, with_downstream=False)
    plain = f"child-{speedup:g}x"
    ours = selected_children(run.out, rows)
    for name, why in ours.attrs.get("passed_over", {}).items():  # refine ran but its pick cannot be used: say why
        if name == plain:
            print(f"{name}: the plain child, not refine's pick: {why}", file=sys.stderr)
    ours = ours[ours["picked_from"] == plain]
    if ours.empty:
        raise PuzzleError(f"{run.out} has no searched child {plain}: run `puzzle front --out {run.out}` with "
                          f"{speedup:g} among its speed-ups")
    built = rows["name"].map(built_for)
    if not methods:
        raise PuzzleError(f"--methods names no baseline; give some of {', '.join(BASELINE_METHODS)}")
    chosen, missing = [], []
    for method in dict.fromkeys(methods):  # a method named twice is compared once
        if method not in BASELINE_METHODS:
            raise PuzzleError(f"unknown baseline {method!r}; choose from {', '.join(BASELINE_METHODS)}")
        # after the same BLD where the method has trainable parts (greedy, uniform width), else as built
        found = rows[(rows["method"] == method) & (rows["training"] != "init") & built]
        if found.empty:
            missing.append(method)
        chosen.append(found.head(1))
    if all(c.empty for c in chosen):  # breaker: our child alone was trained, then an empty table was printed
        raise PuzzleError(f"no baseline is built for {speedup:g}x, so there is nothing to compare our child with: run "
                          f"`puzzle baselines --out {run.out} --speedups {speedup:g}` first")
    for method in missing:
        print(f"{method}: no model built for {speedup:g}x (`puzzle baselines --out {run.out} --speedups {speedup:g}`; "
              f"a method that cannot reach it builds none, or one for a lower target; a row from older tables than "
              f"the run's is not current): left out", file=sys.stderr)
    parent = rows[rows["name"] == "parent"]
    return pd.concat([parent, ours.drop(columns="picked_from"), *chosen], ignore_index=True)


def model_key(run, spec: dict, library, config, train_ids) -> dict:
    """What a saved row must match to be kept: GKD settings, the model (architecture, stage, library entries),
    the parent, and the training and evaluation tokens."""
    from puzzle.downstream import entries_sha

    return {"config": dataclasses.asdict(config), "architecture": spec["architecture"], "stage": spec["stage"],
            "entries": entries_sha(run, library, spec), "parent": run.parent_fingerprint,
            "train_tokens": tensor_sha256(train_ids), "eval_tokens": tensor_sha256(run.tokens.eval)}


def uplift_one(run, spec: dict, library, config, train_ids, work: Path) -> dict:
    """Evaluation KL / LM loss of one front model before and after GKD (resuming its checkpoint in `work`).

    train_tok_s is this call's training rate, None when it trained nothing (its checkpoint had finished: a stop
    between training and writing the row); it read 0 there before."""
    from puzzle.distill import distill, evaluate_against_parent, recovery_fraction
    from puzzle.downstream import build_front_model
    from puzzle.pipeline import parent_eval_logprobs

    t0 = time.perf_counter()
    model = build_front_model(run, spec, library)
    parent_logp = parent_eval_logprobs(run)
    before = evaluate_against_parent(model, run.tokens.eval, parent_logp, chunk=run.config.score.chunk)
    result = distill(model, run.parent.model, train_ids, config, work, progress=True,
                     extra_meta={"model": spec["name"], "architecture": spec["architecture"]})
    after = evaluate_against_parent(result.model, run.tokens.eval, parent_logp, chunk=run.config.score.chunk)
    return {"kl_before_nats": before["kl_nats"], "kl_after_nats": after["kl_nats"],
            "lm_loss_before_nats": before["lm_loss"], "lm_loss_after_nats": after["lm_loss"],
            "recovery_fraction": recovery_fraction(before["kl_nats"], after["kl_nats"]),
            "tokens_trained": result.tokens_trained, "epochs": round(result.epochs, 3),
            "train_tok_s": round(result.tok_s, 1) if result.train.steps_done > result.train.resumed_from else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Ours / each baseline before and after GKD, at the slower of the two models' measured speed-ups.

    Also `measured_ratio_<when>`, the two models' own KLs divided (each at its own speed-up), and `far`: the faster
    model is more than `plots.FAR_FROM_TARGET` times faster than the matched speed-up, so its KL there is read far
    along the line from the parent to it (`matched_ratios`' gaps), a figure no measured model has.
    """
    from puzzle.plots import FAR_FROM_TARGET, matched_ratios

    ours = table[table["method"] == "mip"].iloc[0]
    out = []
    for row in table[~table["method"].isin(("parent", "mip"))].itertuples(index=False):
        a, b = float(ours["speedup"]), float(row.speedup)
        s = min(a, b) if math.isfinite(a) and math.isfinite(b) else math.nan
        pair = table[table["name"].isin(("parent", ours["name"], row.name))]
        entry = {"method": row.method, "training": row.training, "baseline": row.name, "ours": ours["name"],
                 "matched_speedup": round(s, 4)}
        for when in ("before", "after"):
            kl = f"kl_{when}_nats"
            r = matched_ratios(pair.rename(columns={kl: "kl"}), (s,), ours="mip", y="kl").iloc[0] \
                if math.isfinite(s) else {}  # a model without a measured speed-up: no front to read
            entry.update({f"ours_kl_{when}": r.get("ours_kl", math.nan),
                          f"baseline_kl_{when}": r.get("baseline_kl", math.nan),
                          f"ratio_{when}": r.get("ratio", math.nan),
                          f"measured_ratio_{when}": ours[kl] / getattr(row, kl) if getattr(row, kl) else math.nan})
        gaps = [r.get("ours_gap", math.nan), r.get("baseline_gap", math.nan)]
        entry.update(ours_from=r.get("ours_from", ""), baseline_from=r.get("baseline_from", ""),
                     far=bool(any(g > FAR_FROM_TARGET for g in gaps if math.isfinite(g))))
        out.append(entry)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="run directory after baselines and front")
    p.add_argument("--speedup", type=speedup_flag, default=1.5, help="the speed-up target the models were built for")
    p.add_argument("--methods", default=",".join(BASELINE_METHODS), help="baselines, comma-separated")
    p.add_argument("--tokens", type=int, default=65_536, help="GKD training tokens per model")
    p.add_argument("--calib-tokens", type=int, default=131_072, help="re-pack the calibration sources to this many")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--out", type=Path, default=None, help="results folder (default DIR/uplift-<S>x)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each model's trained checkpoint (OUT/work/) once its row is written")
    args = p.parse_args(argv)
    try:
        return uplift(args)
    except PuzzleError as e:
        print(f"uplift: error: {e}", file=sys.stderr)
        return 2


def uplift(args) -> int:
    """The GKD of each model `pick_models` picks, the table and the ratios.

    Raises:
        PuzzleError: --out is a file, --run is no finished run (no config, or no front rows), or as the stages.
    """
    from puzzle.baselines import open_run
    from puzzle.distill import GKDConfig, run_train_tokens
    from puzzle.downstream import front_library, front_model_specs

    out = args.out or args.run / f"uplift-{args.speedup:g}x"
    if out.exists() and not out.is_dir():  # breaker: NotADirectoryError after the GKD of the first model
        raise PuzzleError(f"--out {out} is a file; give a folder")
    run = open_run(args.run)
    if not any((run.out / f).exists() for f in ("front.csv", "front_rows", "baselines/rows")):
        raise PuzzleError(f"{run.out} has no front.csv, front_rows/ or baselines/rows/: run `puzzle run` (or `puzzle "
                          f"front`) and `puzzle baselines` first")
    models = pick_models(run, args.speedup, [m for m in args.methods.split(",") if m])
    specs = {s["name"]: s for s in front_model_specs(run)}
    library = front_library(run)
    config = GKDConfig(tokens=args.tokens, lr=args.lr, batch_size=args.batch_size)
    train_ids, data_note, save = run_train_tokens(run, args.calib_tokens, None, progress=True)
    if save is not None:  # RUN/gkd/data-<settings>, as `puzzle gkd --calib-tokens` keeps it
        save()
    print(f"GKD of {len(models) - 1} models, {args.tokens} tokens each, on {data_note}", file=sys.stderr)
    rows, trained = [], {}  # trained: settings hash -> the row of the model trained with it in this call
    for i, row in enumerate(models.to_dict("records")):
        base = {k: row[k] for k in ("name", "method", "training", "speedup")}
        if row["name"] == "parent":
            rows.append({**base, "kl_before_nats": 0.0, "kl_after_nats": 0.0})
            continue
        spec = specs[row["name"]]
        key = model_key(run, spec, library, config, train_ids)
        path = out / "rows" / f"{row['name']}.json"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]  # one checkpoint per setting
        try:
            saved = read_json(path) if path.is_file() else None
        except PuzzleError as e:  # a damaged row is measured again
            print(f"{e}: measured again", file=sys.stderr)
            saved = None
        if not isinstance(saved, dict) or saved.get("key") != key:
            if digest in trained:  # the same model under another name (greedy picking our child): its figures
                twin = trained[digest]
                saved = {**twin, **base}  # the table names the twin (same_as, below)
            else:
                print(f"[{i}/{len(models) - 1}] {row['name']} ({row['method']}, {row['training']}, measured "
                      f"{row['speedup']:.3f}x)", file=sys.stderr)
                work = out / "work" / f"{row['name']}-{digest}"
                saved = {**base, "architecture": spec["architecture"], "key": key,
                         **uplift_one(run, spec, library, config, train_ids, work)}
            atomic_write_json(path, saved)
        if not args.keep_checkpoints and (out / "work").is_dir():
            # the row is written: this model's checkpoints (weights and optimizer state, about 1 GB per SmolLM2
            # model) go, this setting's and any left by other settings or by a stop before the removal
            for folder in (out / "work").iterdir():
                if folder.is_dir() and folder.name.rsplit("-", 1)[0] == row["name"]:
                    shutil.rmtree(folder, ignore_errors=True)
        twin = trained.setdefault(digest, saved)
        shown = {k: v for k, v in saved.items() if k not in base and k not in ("key", "same_as")}
        if twin["name"] != row["name"]:
            shown["same_as"] = twin["name"]
        rows.append({**base, **shown})
    table = pd.DataFrame(rows)
    result = ratios(table)
    atomic_write_text(out / "uplift.csv", table.to_csv(index=False))
    atomic_write_text(out / "uplift_ratios.csv", result.to_csv(index=False))
    settings = {"speedup": args.speedup, "tokens": args.tokens, "calib_tokens": args.calib_tokens, "lr": args.lr,
                "batch_size": args.batch_size, "train_data": data_note, "gkd": dataclasses.asdict(config)}
    atomic_write_json(out / "settings.json", settings)
    columns = ["name", "method", "training", "speedup", "kl_before_nats", "kl_after_nats", "recovery_fraction"]
    print(table.reindex(columns=columns).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
