"""Benchmark: our front against the baselines on a finished run, and what non-additive search and FFN Fusion add.

    python benchmarks/front.py --run DIR --phase plan        # baselines: block influence, costs, BLD of extra widths
    python benchmarks/front.py --run DIR --phase baselines   # realize, evaluate, measure, export the baselines
    python benchmarks/front.py --run DIR --phase refine      # k diverse + in-context refinement of child-<s>x
    python benchmarks/front.py --run DIR --phase ours        # realize, evaluate, measure our children
    python benchmarks/front.py --run DIR --phase fusion      # FFN Fusion on our children: KL and speed, interleaved
    python benchmarks/front.py --run DIR --phase remeasure   # every finished model's speed again, in one session
                                                             # (`puzzle front --one-session`, rows updated)
    python benchmarks/front.py --run DIR --phase downstream  # zero-shot accuracy of the front's models (harness)
    python benchmarks/front.py --run DIR --phase report --out benchmarks/front_results

DIR is a run directory after `puzzle run` (e.g. a copy of the smollm2-demo run). Every phase resumes
from what earlier invocations wrote (rows per model under DIR/baselines/rows and DIR/front_rows), so
each invocation can be kept short (`--max-groups`): measurement groups hold the parent and up to 4
children, measured interleaved (scoring/cost.py `measure_models`), so every speed-up is a ratio
taken in one session on this shared, noisy machine. Selection (uniform width's KV count, the k
diverse solutions, refinement) uses the scoring split; the evaluation split is only reported.

The report writes: front.csv (every model), front.png (measured throughput vs evaluation KL),
architectures.png (per-layer map of our children), ratios.csv (our evaluation KL / each baseline's
at matched measured speed-up, interpolated; one architecture measured twice gets the mean of both;
ours once as the plain MIP children, once as the child selected per speed-up target: the plain,
diverse or refined one with the lowest scoring-split KL in refine's summary, as `puzzle front` picks
it), ratios_interval.csv (after --phase remeasure: the selected ratios with 5-95 % intervals from a
bootstrap of the remeasured runtimes, `plots.matched_ratio_intervals`),
ratios_predicted_speed.csv (the same at matched predicted speed-up), speed_prediction.csv (predicted vs measured
speed-up per model), machine_drift.csv (after --phase remeasure: the machine's reference workload, scoring/machine.py,
in the cost table's session and in the remeasure session; a ratio far from 1 means the machine ran at another speed,
which moves measured speed-ups away from the predicted ones), accuracy_ratios.csv (after
--phase downstream: the downstream accuracy lost against the parent, ours / each baseline's, at matched
measured speed-up; front.png then has an accuracy panel), refine.csv, fusion.csv and remeasure.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from puzzle.baselines import (Candidate, baseline_library, open_run, plan_baselines, realize_all, searched_candidate,
                              select_uniform)
from puzzle.io import atomic_write_json, atomic_write_text, read_json


def load_plan(run) -> list[Candidate]:
    path = run.out / "baselines" / "plan_selected.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run --phase plan first")
    return [Candidate.from_dict(d) for d in json.loads(path.read_text())]


def phase_plan(run, speedups, measure_costs: bool) -> None:
    t0 = time.perf_counter()
    plan = plan_baselines(run, speedups, measure_costs=measure_costs)
    library = baseline_library(run, [c.blocks for c in plan], progress=False)
    chosen = select_uniform(run, plan, library)
    atomic_write_json(run.out / "baselines" / "plan_selected.json", [c.to_dict() for c in chosen])
    print(f"plan: {len(chosen)} baseline children, {time.perf_counter() - t0:.0f} s")


def phase_baselines(run, max_groups) -> None:
    from puzzle.baselines import LibraryChain
    from puzzle.library import Library

    plan = load_plan(run)
    library = LibraryChain(run.library, Library(run.out / "baselines" / "library"))
    table = realize_all(run, plan, library, export=True, max_groups=max_groups)
    atomic_write_text(run.out / "baselines" / "baselines.csv", table.to_csv(index=False))
    print(table[["name", "training", "speedup", "kl_nats", "score_kl_nats"]].to_string(index=False))


def our_candidates(run) -> list[Candidate]:
    """Our children: the plain MIP choice per front speed-up, and the diverse / refined ones that exist."""
    return [searched_candidate(run, path.stem) for path in sorted((run.out / "search").glob("child-*.json"))]


def phase_ours(run, max_groups) -> None:
    table = realize_all(run, our_candidates(run), export=False, rows_dir=run.out / "front_rows", max_groups=max_groups)
    print(table[["name", "speedup", "kl_nats", "score_kl_nats", "predicted_kl_nats"]].to_string(index=False))


def phase_refine(run, name, k, refine_k, max_changes, rounds) -> None:
    from puzzle.refine import improve_child

    df = improve_child(run, name, k=k, refine_k=refine_k, max_changes=max_changes, max_rounds=rounds)
    print(df.to_string(index=False))


def phase_fusion(run, names) -> None:
    """FFN Fusion of each named child: evaluation KL (fused as is, and after local distillation of the fused
    blocks on calibration text) and measured speed, unfused vs fused, interleaved."""
    from puzzle.fusion import distill_fused, ffn_runs, fuse_ffn_runs
    from puzzle.pipeline import build_child, evaluate
    from puzzle.scoring.cost import measure_models

    rows = []
    for name in names:
        rec = read_json(run.out / "search" / f"{name}.json")
        child = build_child(run, rec)  # as the pipeline builds it (the coupled entries of the block rows it chose)
        if not ffn_runs(child.config, include_leading=True):
            print(f"fusion: {name} has no two FFNs with no attention between them, so nothing to fuse; skipped",
                  file=sys.stderr)
        for leading in (False, True):
            runs = ffn_runs(child.config, include_leading=leading)
            if not runs:
                continue
            fused = fuse_ffn_runs(child, runs)
            tag = f"{name}-fused" + ("-lead" if leading else "")
            q0, q1 = evaluate(run, child, name), evaluate_fused(run, fused, tag)
            t0 = time.perf_counter()
            distilled = fuse_ffn_runs(child, runs)  # the same blocks, then BLD-style local distillation on calibration text
            local = distill_fused(child, distilled, run.tokens.calib, lr=run.config.bld.lr / 2,
                                  batch_size=run.config.bld.batch_size)
            distill_s = time.perf_counter() - t0
            q2 = evaluate_fused(run, distilled, tag + "-distilled")
            del distilled
            m = measure_models({"parent": run.parent.model, name: child, tag: fused}, run.workload(),
                               repeats=3, max_contention=run.config.score.max_contention).set_index("name")
            rows.append({"child": name, "fused": tag, "include_leading": leading,
                         "runs": ", ".join(f"{a}-{b - 1}" for a, b in runs),  # layers, as `puzzle fuse` says them
                         "fused_ffns": sum(e - s for s, e in runs), "kl_nats": q0["kl_nats"], "fused_kl_nats": q1["kl_nats"],
                         "fused_distilled_kl_nats": q2["kl_nats"], "distill_s": distill_s,
                         "local_nmse": json.dumps([(r["nmse_before"], r["nmse_after"]) for r in local]),
                         "speedup": m.loc["parent", "runtime_ms"] / m.loc[name, "runtime_ms"],
                         "fused_speedup": m.loc["parent", "runtime_ms"] / m.loc[tag, "runtime_ms"],
                         "fused_vs_unfused_runtime": m.loc[tag, "runtime_ms"] / m.loc[name, "runtime_ms"],
                         "params": int(m.loc[name, "params"]), "fused_params": int(m.loc[tag, "params"])})
            print(rows[-1], flush=True)
    if not rows:
        raise SystemExit("fusion: none of the children has FFNs to fuse (a run of layers whose attention is no_op); "
                         "name others with --fuse, e.g. a child of a higher speed-up; fusion.csv left as it was")
    df = pd.DataFrame(rows)
    path = run.out / "fusion.csv"
    if path.is_file():  # keep the rows of children fused by earlier invocations
        old = pd.read_csv(path)
        df = pd.concat([old[~old["child"].isin(names)], df], ignore_index=True)
    atomic_write_text(path, df.to_csv(index=False))


def phase_remeasure(run, repeats: int) -> None:
    """Measure every finished front model (ours, refine's and the baselines', whichever command wrote their rows)
    again, all interleaved in one session: `puzzle front --one-session` (`puzzle.one_session.time_front_together`,
    which writes DIR/one_session.json).

    The rows' speed-ups come from groups of up to 4 models measured with the parent, group after group;
    on a shared machine whose load changes between groups, one architecture measured in two groups
    can differ by 15% or more. Here each row file's speedup, runtime_ms and throughput are then replaced by the
    one session's (the grouped figure is kept as speedup_grouped), for --phase report, which reads the rows.
    Writes DIR/remeasure.csv.
    """
    from puzzle.baselines import sealed_row, stale_greedy_rows
    from puzzle.one_session import time_front_together
    from puzzle.scoring.machine import machine_record

    table = time_front_together(run, repeats, exclude=stale_greedy_rows(run)).set_index("name")
    parent_ms = float(table.loc["parent", "runtime_ms"])
    for d in (run.out / "front_rows", run.out / "baselines" / "rows"):
        for name, m in table.iterrows():
            path = d / f"{name}.json"
            if not path.is_file():  # front.csv's children without a row of --phase ours
                continue
            row = read_json(path)
            if name == "parent":  # its throughput anchors the others
                row.update({"runtime_ms": parent_ms, "throughput_tok_s": float(m["throughput_tok_s"])})
            else:
                grouped = row.get("speedup_grouped", row["speedup"])
                row.update({"speedup": float(m["speedup"]), "speedup_grouped": grouped,
                            "runtime_ms": float(m["runtime_ms"]), "runtime_iqr_ms": float(m["runtime_iqr_ms"]),
                            "group_parent_runtime_ms": parent_ms, "remeasured_repeats": repeats})
            atomic_write_json(path, sealed_row(row))  # its checksum follows (reviewer: else drawn as edited)
    session = read_json(run.out / "one_session.json")
    out = table.reset_index().rename(columns={"speedup_own_session": "speedup_grouped"})
    out = out[["name", "method", "training", "speedup", "speedup_grouped", "runtime_ms", "runtime_iqr_ms"]]
    out["contention_cores"], out["rounds_dropped"] = session.get("contention_cores"), session.get("rounds_dropped")
    for key, value in machine_record(session.get("machine") or {}).items():  # the machine's speed (scoring/machine.py)
        out[key] = value
    atomic_write_text(run.out / "remeasure.csv", out.to_csv(index=False))
    print(out.to_string(index=False))
    print(f"{len(table)} models, {repeats} interleaved rounds, {table.attrs['seconds']:.0f} s")


def phase_downstream(run, tasks, limit, names) -> None:
    """Downstream accuracy (zero-shot, lm-eval conventions) of the front's models: by default every model
    except the init-only and the diverse ones (the refined children and the plain ones stay)."""
    from puzzle.downstream import evaluate_front_downstream
    from puzzle.plots import front_rows

    if not names:
        rows = front_rows(run.out, with_downstream=False)
        names = [n for n, m, t in zip(rows["name"], rows["method"], rows["training"]) if t != "init" and m != "mip-diverse"]
    df = evaluate_front_downstream(run, tasks, limit=limit, names=names, progress=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def evaluate_fused(run, model, name) -> dict:
    """Evaluation-split quality of a fused model (not cached: its layer list differs from its config)."""
    from puzzle.pipeline import parent_eval_logprobs
    from puzzle.scoring.quality import evaluate_model

    return evaluate_model(model, run.tokens.eval, parent_eval_logprobs(run), chunk=run.config.score.chunk)


def phase_report(run, out: Path, speedups) -> None:
    from puzzle.baselines import row_edited
    from puzzle.pipeline import parent_label
    from puzzle.plots import architecture_map, front_plot, matched_ratio_intervals, matched_ratios, selected_children

    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for path in (run.out / "front_rows", run.out / "baselines" / "rows"):
        if path.is_dir():
            parts += [read_json(p) for p in sorted(path.glob("*.json"))]
    edited = [r.get("name") for r in parts if row_edited(r)]  # as `puzzle front` leaves them out (reviewer)
    if edited:
        print(f"front: rows edited since they were written are left out: {', '.join(map(str, edited))}",
              file=sys.stderr)
    rows = pd.DataFrame([r for r in parts if not row_edited(r)]).drop_duplicates("name")
    from puzzle.downstream import downstream_rows

    acc = downstream_rows(run.out)
    if len(acc):
        rows = rows.merge(acc, on="name", how="left")
    # one architecture, one speed: models built twice (a baseline that picks our child) and measured
    # separately get the mean of their measurements
    rows["measurements"] = rows.groupby("architecture")["speedup"].transform("size")
    rows["speedup"] = rows.groupby("architecture")["speedup"].transform("mean")
    parent_tok_s = float(rows.loc[rows["name"] == "parent", "throughput_tok_s"].iloc[0])
    rows["throughput_tok_s"] = parent_tok_s * rows["speedup"]
    rows = rows.sort_values(["method", "training", "speedup"])
    atomic_write_text(out / "front.csv", rows.drop(columns=["group_parent_runtime_ms"], errors="ignore").to_csv(index=False))
    w = run.workload()
    front_plot(rows[rows["training"] != "init"], out / "front.png", title=f"{parent_label(run)}: "
               f"our children vs baselines (after BLD where trainable)",
               xlabel=f"measured throughput, generated tok/s ({w.device}, B={w.batch_size}, P={w.prompt_len}, G={w.gen_len})")
    front_plot(rows, out / "front_with_init.png", title="the same, with init-only variants (dashed, hollow)",
               xlabel=f"measured throughput, generated tok/s ({w.device}, B={w.batch_size}, P={w.prompt_len}, G={w.gen_len})")
    base = rows[~rows["method"].str.startswith("mip")]
    ours_plain = rows[(rows["method"] == "mip") & (rows["training"] == "bld")]
    if ours_plain.empty:
        print(f"warning: {run.out / 'front_rows'} holds no plain MIP child, so every ratio below is NaN: run "
              f"--phase ours first")
    # what a user gets per target, as `puzzle front` picks it (plots.selected_children): among the plain, diverse
    # and refined children of one target, the one with the lowest KL on the scoring split in refine's summary (the
    # selection set; the evaluation split is only reported)
    selected = selected_children(run.out, rows)
    for name, why in selected.attrs["passed_over"].items():
        print(f"{name}: its plain child stands for it; {why}")
    ours_best = selected.drop(columns="picked_from")
    ratios = pd.concat([matched_ratios(pd.concat([ours_plain, base]), speedups).assign(ours="plain MIP"),
                        matched_ratios(pd.concat([ours_best, base]), speedups).assign(ours="selected per target")],
                       ignore_index=True)
    atomic_write_text(out / "ratios.csv", ratios.to_csv(index=False))
    remeasured = run.out / "remeasure.csv"
    if remeasured.is_file():
        # how far the whole-model timing noise moves the ratios: the selected ratios with 90 % intervals from a
        # bootstrap of the remeasured medians (each model's runtime IQR over its rounds)
        again = pd.read_csv(remeasured).set_index("name")
        timed = pd.concat([ours_best, base]).assign(
            runtime_ms=lambda d: d["name"].map(again["runtime_ms"]), runtime_iqr_ms=lambda d: d["name"].map(again["runtime_iqr_ms"]))
        unmeasured = timed.loc[timed[["runtime_ms", "runtime_iqr_ms"]].isna().any(axis=1), "name"].tolist()
        if unmeasured:
            print(f"ratios_interval.csv leaves out {unmeasured}: not in remeasure.csv (run --phase remeasure again)")
        rounds = pd.to_numeric(rows.get("remeasured_repeats"), errors="coerce").max()
        try:
            spread = matched_ratio_intervals(timed.dropna(subset=["runtime_ms", "runtime_iqr_ms"]), speedups,
                                             rounds=int(rounds) if pd.notna(rounds) else 0)
        except ValueError as e:
            print(f"no ratios_interval.csv: {e}")
        else:
            atomic_write_text(out / "ratios_interval.csv", spread.assign(ours="selected per target").to_csv(index=False))
            print(spread[["speedup", "method", "training", "ratio", "ratio_lo", "ratio_hi", "reached"]]
                  .to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    # the same at matched *predicted* speed-up (summed measured subblock costs): free of whole-model timing noise
    pred = lambda df: df.assign(speedup=df["predicted_speedup"])  # noqa: E731
    atomic_write_text(out / "ratios_predicted_speed.csv",
                      matched_ratios(pd.concat([pred(ours_best), pred(base)]), speedups)
                      .assign(ours="selected per target").to_csv(index=False))
    # how well the cost table predicted the whole models' measured speed-ups (a table timed next to other
    # jobs shows up here first)
    speed = rows.loc[rows["name"] != "parent", ["name", "predicted_speedup", "speedup"]].drop_duplicates("name")
    speed["error"] = speed["predicted_speedup"] / speed["speedup"] - 1
    atomic_write_text(out / "speed_prediction.csv", speed.to_csv(index=False))
    err = speed["error"].abs()
    print(f"cost table vs measured speed-up, {len(speed)} models: median |error| {err.median():.1%}, "
          f"max {err.max():.1%}, within 10%: {(err <= 0.1).sum()}/{len(speed)}")
    machine_speed(run, out)
    if "downstream_acc" in rows.columns and rows["downstream_acc"].notna().sum() > 1:
        # downstream accuracy lost against the parent, ours / each baseline's at matched measured speed-up
        # (the same interpolation as KL: lower is better); models without a downstream figure are left out
        parent_acc = float(rows.loc[rows["name"] == "parent", "downstream_acc"].iloc[0])
        lost = lambda df: df.dropna(subset=["downstream_acc"]).assign(acc_lost=parent_acc - df["downstream_acc"])  # noqa: E731
        acc_ratios = matched_ratios(pd.concat([lost(ours_best), lost(base)]), speedups, y="acc_lost")
        acc_ratios["parent_acc"] = parent_acc
        atomic_write_text(out / "accuracy_ratios.csv", acc_ratios.assign(ours="selected per target").to_csv(index=False))
        print(acc_ratios.to_string(index=False))
    ours = {p.stem: read_json(p)["choice"] for p in sorted((run.out / "search").glob("child-*.json"))
            if not p.stem.endswith("-init")}
    ours = dict(sorted(ours.items(), key=lambda kv: read_json(run.out / "search" / f"{kv[0]}.json")["speedup"]))
    architecture_map(ours, out / "architectures.png", parent_block=run.parent.config.parent_block,
                     title="our children: attention (blue: KV heads) above FFN (green: width); orange linear, grey removed")
    plan = run.out / "baselines" / "plan_selected.json"
    if plan.is_file():
        base = {d["name"]: d["blocks"] for d in json.loads(plan.read_text()) if d["training"] != "init"}
        architecture_map(base, out / "baseline_architectures.png", parent_block=run.parent.config.parent_block,
                         title="baselines")
    for name in ("fusion.csv", "remeasure.csv"):
        if (run.out / name).is_file():
            atomic_write_text(out / name, (run.out / name).read_text())
    for path in sorted((run.out / "refine").glob("*.csv")) if (run.out / "refine").is_dir() else []:
        atomic_write_text(out / f"refine_{path.name}", path.read_text())
    print(ratios.to_string(index=False))


def machine_speed(run, out: Path) -> None:
    """machine_drift.csv: the machine's fingerprint (scoring/machine.py) in the cost table's session and in
    --phase remeasure's, and their ratio per part; says so when the two sessions ran at different speeds."""
    from puzzle.pipeline import cost_table_fingerprint
    from puzzle.scoring.machine import drift_message, machine_drift, machine_record

    table, again = cost_table_fingerprint(run.out), run.out / "remeasure.csv"
    remeasured = pd.read_csv(again) if again.is_file() else pd.DataFrame()
    remeasured = machine_record(remeasured.iloc[0].to_dict() if len(remeasured) else {})
    drift = machine_drift(table, remeasured)
    rows = [{"part": part, "cost_table_ms": table.get(f"reference_{part}_ms"),
             "remeasure_ms": remeasured.get(f"reference_{part}_ms"), "ratio": drift[part]} for part in drift]
    atomic_write_text(out / "machine_drift.csv", pd.DataFrame(rows).to_csv(index=False))
    msg = drift_message(drift, "the cost table's timing", "--phase remeasure")
    if all(pd.isna(v) for v in drift.values()):
        msg = ("machine speed: no fingerprint to compare (the cost table or remeasure.csv was written before "
               "fingerprints were recorded, or is missing)")
    print(msg or "machine speed: " + ", ".join(f"{k} x{v:.2f}" for k, v in drift.items()) + " (remeasure / cost table)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="run directory (after `puzzle run`)")
    p.add_argument("--phase", required=True, choices=["plan", "baselines", "refine", "ours", "fusion", "remeasure", "downstream", "report"],
                   help="which part to run (see the module docstring)")
    p.add_argument("--speedups", default="1.25,1.5,2", help="speed-up targets")
    p.add_argument("--interpolate-costs", action="store_true",
                   help="interpolate the runtime of FFN widths the score table lacks instead of measuring them "
                        "(for a machine too loaded to time subblocks)")
    p.add_argument("--max-groups", type=int, default=None, help="measurement groups per invocation")
    p.add_argument("--name", default="child-1.5x", help="child to refine")
    p.add_argument("--k", type=int, default=8, help="diverse solutions")
    p.add_argument("--refine-k", type=int, default=4, help="children realized per refinement round")
    p.add_argument("--max-changes", type=int, default=6, help="trust region of a refinement round (layers)")
    p.add_argument("--rounds", type=int, default=3, help="refinement rounds")
    p.add_argument("--fuse", default="child-2x,child-1.5x-refined", help="children to fuse")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds of --phase remeasure")
    p.add_argument("--tasks", default="lambada,arc_easy,piqa", help="downstream tasks (--phase downstream)")
    p.add_argument("--limit", type=int, default=100, help="documents per downstream task (--phase downstream)")
    p.add_argument("--names", default="", help="models for --phase downstream (default: all but init-only and diverse)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "front_results",
                   help="report folder of --phase report (default: benchmarks/front_results inside this repository, "
                        "git-ignored)")
    args = p.parse_args(argv)
    from puzzle.budgets import parse_speedup
    from puzzle.errors import PuzzleError

    try:  # breaker: 1.5x, 0 or -1 failed as tracebacks or NaN rows; a missing run as a raw PuzzleError
        speedups = tuple(dict.fromkeys(parse_speedup(s) for s in args.speedups.split(",")))
        if not all(s > 1 for s in speedups):
            raise PuzzleError(f"--speedups {args.speedups}: give speed-ups above 1 (1 is the parent)")
        run = open_run(args.run, progress=False)
        ours = [p for p in (run.out / "front_rows").glob("*.json") if p.name != "parent.json"]
        if args.phase == "report" and args.out.exists() and not args.out.is_dir():
            raise PuzzleError(f"--out {args.out} is a file; give a folder")
        if args.phase == "report" and not ours:
            raise PuzzleError(f"{run.out / 'front_rows'} holds none of our children to report: run --phase plan, "
                              f"baselines and ours first")
    except PuzzleError as e:
        print(f"front: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    try:
        run_phase(run, args, speedups)
    except PuzzleError as e:  # breaker: a run stopped before scoring failed --phase plan as a raw PuzzleError
        print(f"front: error: {e}", file=sys.stderr)
        return 2
    print(f"phase {args.phase}: {time.perf_counter() - t0:.0f} s, load average {load:.1f} -> {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    return 0


def run_phase(run, args, speedups) -> None:
    """--phase of `main`."""
    if args.phase == "plan":
        phase_plan(run, speedups, not args.interpolate_costs)
    elif args.phase == "baselines":
        phase_baselines(run, args.max_groups)
    elif args.phase == "refine":
        phase_refine(run, args.name, args.k, args.refine_k, args.max_changes, args.rounds)
    elif args.phase == "ours":
        phase_ours(run, args.max_groups)
    elif args.phase == "remeasure":
        phase_remeasure(run, args.repeats)
    elif args.phase == "downstream":
        from puzzle.downstream import parse_tasks

        phase_downstream(run, parse_tasks(args.tasks), args.limit or None, [n for n in args.names.split(",") if n])
    elif args.phase == "fusion":
        names = [n for n in args.fuse.split(",") if n]
        missing = [n for n in names if not (run.out / "search" / f"{n}.json").is_file()]
        if missing:
            print(f"fusion: no searched child {', '.join(missing)} in {run.out / 'search'}; skipped", file=sys.stderr)
        if len(missing) == len(names):
            raise SystemExit("fusion: no child to fuse; name searched children with --fuse (DIR/search/<name>.json)")
        phase_fusion(run, [n for n in names if n not in missing])
    else:
        phase_report(run, args.out, speedups)


if __name__ == "__main__":
    raise SystemExit(main())
