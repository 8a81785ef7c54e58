"""Every model of a run's front timed again, all in one interleaved session (`puzzle front --one-session`).

The front's rows come from several timing sessions: `puzzle run` times the plain children, each
`puzzle refine` its own, `puzzle baselines` the baselines group by group. Every speed-up is a ratio to the
parent of its own session, but on a shared machine the ratio itself drifts between sessions: on the 2-core
VM the same baseline children read up to 5.6 % faster against the parent in a later session (stop 52:
greedy's 1.25x child 1.242x, then 1.312x), which moved the ratios at 1.25x by up to 0.25. Timed together,
every model shares the same rounds, so the ratios at matched speed-up compare like with like.

`time_front_together` realizes the parent and every model `puzzle front` draws (one per architecture: two names
for one child, or one architecture at two library stages, are timed once), measures them with
`scoring.cost.measure_models` (every round all models, in a new random order, steps interleaved on a CPU; medians
over `repeats` rounds) and writes DIR/one_session.json. `apply_one_session` puts those speed-ups in the front's rows
where they still belong to the model drawn (same name, architecture and library stage; same workload, score table
and evaluation text), keeping each row's own figure as speedup_own_session; the source files (front.csv,
front_rows/, baselines/rows/) stay as their commands wrote them, so deleting the file undoes it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import pandas as pd

from .config import MAX_REPEATS
from .errors import PuzzleError, shell_arg
from .io import atomic_write_json, read_json

SESSION_FILE = "one_session.json"


def _architecture(row: dict, run_dir: Path) -> str | None:
    """The compact architecture of a front row: its own, or for a front.csv row (which has none) its search record's."""
    from .plots import _searched_architecture

    arch = row.get("architecture")
    if isinstance(arch, str) and arch.strip():
        return arch
    return _searched_architecture(run_dir, row.get("name"))


def time_front_together(run, repeats: int = 7, exclude: dict[str, str] | None = None) -> pd.DataFrame:
    """Time the parent and every model of the run's front (`plots.front_rows`: ours, refine's, fuse's, the baselines')
    in one `measure_models` session and write DIR/one_session.json (atomically: an interrupted session leaves the
    earlier file as it was).

    Args:
        run: the run (`pipeline.Run`); its parent, libraries (DIR/library and DIR/baselines/library), workload
            and `score.max_contention` are used.
        repeats: interleaved rounds (2-1000); each model's runtime is the median over them.
        exclude: baselines/rows/ names to leave out (`baselines.stale_greedy_rows`), as `puzzle front` does.

    Returns:
        One row per model: name, source, method, training, speedup_own_session (the row's figure before),
        speedup (parent runtime / runtime in this session), runtime_ms, runtime_iqr_ms (milliseconds per request
        at the run's workload), throughput_tok_s (`scoring.cost.throughputs`); parent first. attrs: "seconds"
        (wall time of the whole call), "timed" (models measured, the parent included: one per architecture).

    Raises:
        PuzzleError: repeats outside 2-1000, no front yet, a model whose library entries are gone (or, for a fused
            child of `puzzle fuse`, whose export folder is gone or another's: `fusion.front_row_export`), the models
            needing more than MEMORY_SHARE of the free memory, or persistent contention (`measure_models`).
    """
    from .architecture import BlockConfig
    from .baselines import Candidate, LibraryChain, row_inputs
    from .library import Library
    from .io import sha256_file
    from .pipeline import coupled_blocks, parse_compact_architecture
    from .plots import front_rows
    from .realize import realize_child
    from .scoring.cost import MEMORY_SHARE, available_bytes, measure_models, on_workload
    from .scoring.machine import machine_record

    if not isinstance(repeats, int) or not 2 <= repeats <= MAX_REPEATS:
        raise PuzzleError(f"--repeats must be a whole number from 2 to {MAX_REPEATS} (rounds of the one session), "
                          f"got {repeats}")
    t0 = time.perf_counter()
    inputs = row_inputs(run)
    try:
        rows = front_rows(run.out, with_downstream=False, inputs=inputs, exclude=exclude, with_one_session=False)
    except FileNotFoundError:
        raise PuzzleError(f"{run.out} has no front to time: `puzzle run --out {shell_arg(run.out)}` (or `puzzle "
                          "front`) first") \
            from None
    kids = [r for r in rows.to_dict("records") if r["name"] != "parent"]
    if not kids:
        raise PuzzleError(f"{run.out} has no child on its front to time: `puzzle front --out {shell_arg(run.out)}` "
                          "first")
    library = LibraryChain(run.library, Library(run.out / "baselines" / "library"))
    plan, timed_as, first = [], {}, {}
    # a model of the trained library first: it is the one built for its architecture (the init-only twin's entries
    # may be gone where the trained ones are not)
    for r in sorted(kids, key=lambda r: str(r["training"]) == "init"):
        arch = _architecture(r, run.out)
        if arch is None:
            raise PuzzleError(f"{r['name']} ({r['source']}) has no architecture to build it from (no row architecture, "
                              f"no DIR/search/{r['name']}.json): `puzzle front --out {shell_arg(run.out)} --remeasure` "
                              "solves the front again")
        # by architecture alone: the runtime does not depend on the weights (breaker: greedy-1.25x and its -init twin,
        # one architecture, were timed apart and read 0.995x and 2.130x in one session)
        timed_as[r["name"]] = first.setdefault(arch, r["name"])
        plan.append((r, arch))
    unique = {r["name"]: (r, arch) for r, arch in plan if timed_as[r["name"]] == r["name"]}

    def cannot_build(name, r, arch, e):
        return PuzzleError(f"{name} ({r['source']}: its architecture {arch[:80]!r}) cannot be built again for the "
                           f"one session: {e}; the command that wrote the row (`puzzle baselines`, `puzzle refine "
                           f"--name ...`) writes it again, or move the row out of the front")

    from .fusion import all_at_once, front_row_export, load_fused_export

    exports, missing = {}, []  # fused children's export folders; those gone or another's named all at once, first
    for name, (r, _) in unique.items():
        if r["method"] == "ffn_fusion":
            try:
                exports[name] = front_row_export(run, name)
            except PuzzleError as e:
                missing.append(e)
    all_at_once(missing)
    cands, fused = {}, {}
    for name, (r, arch) in unique.items():
        if exports.get(name) is not None:  # `puzzle fuse`'s child: shallower than the parent, loaded from its export
            fused[name] = load_fused_export(run, exports[name])
            continue
        try:
            blocks = tuple(BlockConfig.from_id(b) for b in parse_compact_architecture(arch))
            if len(blocks) != len(run.parent.config.blocks):
                raise ValueError(f"{len(blocks)} layers, the parent has {len(run.parent.config.blocks)}")
        except (PuzzleError, ValueError) as e:  # ArchitectureError is a ValueError
            raise cannot_build(name, r, arch, e) from None
        cands[name] = Candidate(name, str(r["method"]), str(r["training"]), blocks, 1.0, math.nan, math.nan)

    # the children hold the parent's tensors where they keep its subblocks, and each library entry once
    # (`realize_child(share=True)`): what they need beyond the parent is the entries they use, in the target's dtype,
    # and a copy of the parent when the target's device or dtype is not the parent's (`Run.on_target`); a fused child
    # (`puzzle fuse`) is a whole model of its own
    workload = run.workload()
    weights = list(run.parent.model.parameters())
    copied = not on_workload(run.parent.model, workload)
    coupled = {name: coupled_blocks(run, c.blocks, c.stage, c.method) for name, c in cands.items()}
    used = entry_params(run.parent.config, cands, coupled)
    need = workload.torch_dtype.itemsize * (sum(used.values()) + (sum(p.numel() for p in weights) if copied else 0)
                                            + sum(m.num_parameters() for m in fused.values()))
    free = available_bytes(workload.device)
    if free is not None and need > MEMORY_SHARE * free:
        raise PuzzleError(f"timing {len(unique) + 1} models together needs about {need / 2**30:.1f} GiB for the "
                          f"library entries the children use{' and a copy of the parent' if copied else ''}"
                          f"{' and the fused children' if fused else ''}, over "
                          f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free now: free memory, or leave some "
                          f"models out of the front (move their rows out of DIR/front_rows/ or DIR/baselines/rows/) "
                          f"and time the others")
    models = run.on_target({"parent": run.parent.model})
    entries: dict = {}
    for name, c in cands.items():
        try:
            models[name] = realize_child(models["parent"], library, c.blocks, c.stage, share=True, entries=entries,
                                         coupled=coupled[name])
        except PuzzleError as e:  # a library entry missing or damaged: its own message says `puzzle bld` rebuilds it
            raise PuzzleError(f"{name} cannot be built again for the one session: {e}") from None
        except ValueError as e:
            raise cannot_build(name, *unique[name], e) from None
    models.update(run.on_target(fused))
    run.say(f"front: timing the parent and {len(models) - 1} models together, {repeats} interleaved rounds")
    df = measure_models(models, run.workload(), repeats=repeats, progress=run.progress,
                        max_contention=run.config.score.max_contention).set_index("name")
    parent_ms = float(df.loc["parent", "runtime_ms"])
    out = [{"name": "parent", "source": "parent", "method": "parent", "training": "none", "architecture": "parent",
            "speedup_own_session": 1.0, "speedup": 1.0, "runtime_ms": parent_ms,
            "runtime_iqr_ms": float(df.loc["parent", "runtime_iqr_ms"]),
            "throughput_tok_s": float(df.loc["parent", "throughput_tok_s"])}]
    for r, arch in plan:
        m = df.loc[timed_as[r["name"]]]
        out.append({"name": r["name"], "source": r["source"], "method": r["method"], "training": r["training"],
                    "architecture": arch, "speedup_own_session": float(r["speedup"]),
                    "speedup": parent_ms / float(m["runtime_ms"]), "runtime_ms": float(m["runtime_ms"]),
                    "runtime_iqr_ms": float(m["runtime_iqr_ms"]), "throughput_tok_s": float(m["throughput_tok_s"])})
    seconds = time.perf_counter() - t0
    front_csv = run.out / "front.csv"
    atomic_write_json(run.out / SESSION_FILE, {
        "inputs": json.loads(json.dumps(inputs, default=str)), "repeats": repeats, "seconds": round(seconds, 1),
        "front_csv_sha256": sha256_file(front_csv) if front_csv.is_file() else None,
        "contention_cores": df.attrs.get("contention_cores"), "rounds_dropped": df.attrs.get("rounds_dropped"),
        "machine": machine_record(df.attrs), "models": out, "models_sha256": _models_sha256(out)})
    table = pd.DataFrame(out)
    table.attrs.update(seconds=seconds, timed=len(models))
    return table


def _models_sha256(models: list) -> str:
    """The sha256 of a session's models as JSON (sorted keys): a hand-edited runtime changes it."""
    import hashlib

    return hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest()


def read_session(run_dir: Path, current: dict) -> dict | None:
    """DIR/one_session.json when it is readable and was timed on the workload, score table and evaluation text of
    `current` (the keys it holds, as `plots.front_rows` checks rows); None without a warning when there is none,
    None with a warning when it is damaged or stale (says the command that times the front again)."""
    from .plots import _finite, stale_inputs

    path = Path(run_dir) / SESSION_FILE
    if not path.is_file():
        return None
    again = f"`puzzle front --out {shell_arg(run_dir)} --one-session` times the front together again"
    try:
        session = read_json(path)
        models = session["models"]
        ok = isinstance(models, list) and all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and _finite(m.get("runtime_ms"))
            and m["runtime_ms"] > 0 and _finite(m.get("runtime_iqr_ms")) and m["runtime_iqr_ms"] >= 0 for m in models)
        names = [m["name"] for m in models] if ok else []
        repeats = session["repeats"]
        ok = (ok and "parent" in names and len(set(names)) == len(names) and isinstance(repeats, int)
              and not isinstance(repeats, bool) and 2 <= repeats <= MAX_REPEATS)  # one entry per name, the parent's
        inputs = session["inputs"]
        if not ok or not isinstance(inputs, dict):
            raise TypeError
    except (PuzzleError, KeyError, TypeError):
        warnings.warn(f"{path} is damaged (it needs the parent and each model once, with runtime_ms > 0 and "
                      f"runtime_iqr_ms >= 0, and repeats from 2 to {MAX_REPEATS}): the front is drawn with each "
                      f"model's own session ({again})")
        return None
    # hand-edited figures (breaker: a child's runtime edited was drawn without a word); a file of an earlier version
    # has no checksum and is read as before
    if "models_sha256" in session and session["models_sha256"] != _models_sha256(models):
        warnings.warn(f"{path} was edited since it was written (its models' figures no longer match the checksum it "
                      f"keeps): the front is drawn with each model's own session ({again})")
        return None
    stale = stale_inputs(inputs, current, missing_is_stale=True)
    if stale:
        warnings.warn(f"{path} was timed for another {' and '.join(stale)} than the run's now: the front is drawn "
                      f"with each model's own session ({again})")
        return None
    return session


def apply_one_session(rows: pd.DataFrame, run_dir: Path, current: dict) -> pd.DataFrame:
    """`rows` (`plots.front_rows`' models) with the speed-ups of DIR/one_session.json where it timed the same model
    (name, architecture, library stage) on the run's inputs now; each such row keeps its own session's figure as
    speedup_own_session and gets runtime_ms / runtime_iqr_ms from the session, and timing says "one session" or
    "own session", and attrs["session_rounds"] is its number of rounds. Rows unchanged (and no new columns) when
    there is no current session file. Warns when the session left some model out or timed an older model of that
    name."""
    session = read_session(run_dir, current)
    if session is None:
        return rows
    timed = {m["name"]: m for m in session["models"]}
    parent_ms = float(timed["parent"]["runtime_ms"])  # speed-ups from the runtimes, as the ratios' intervals take them
    out, missed = [], []
    for r in rows.to_dict("records"):
        m = timed.get(r["name"])
        same = m is not None and (r["name"] == "parent" or (m.get("architecture") == _architecture(r, run_dir)
                                                             and str(m.get("training")) == str(r["training"])))
        if same:
            r.update(speedup_own_session=r["speedup"], speedup=parent_ms / float(m["runtime_ms"]), timing="one session",
                     runtime_ms=m.get("runtime_ms"), runtime_iqr_ms=m.get("runtime_iqr_ms"))
        else:  # its runtime from another session than the parent row's: none (breaker: 151 ms beside 4.6x)
            r.update(speedup_own_session=r["speedup"], timing="own session", runtime_ms=None, runtime_iqr_ms=None)
            missed.append(r["name"])
        out.append(r)
    if missed:
        one = len(missed) == 1
        warnings.warn(f"{run_dir / SESSION_FILE} did not time {', '.join(missed)} as drawn now (built, changed or "
                      f"edited since, or left out of it): {'it keeps its' if one else 'they keep their'} own session's "
                      f"speed-up beside the others' one-session figures (`puzzle front --out {shell_arg(run_dir)} "
                      "--one-session` times all together again)")
    from .pipeline import SPEEDUP_MISMATCH

    far = []  # breaker: a parent's runtime edited to 1 ms put every child at 0.1x without a word
    for r in out:
        own, one = r.get("speedup_own_session"), r.get("speedup")
        if r["timing"] == "one session" and r["name"] != "parent" and isinstance(own, (int, float)) and own > 0 \
                and max(one / own, own / one) > SPEEDUP_MISMATCH:
            far.append(f"{r['name']} {one:.3g}x against {own:.3g}x")
    if far:
        warnings.warn(f"{run_dir / SESSION_FILE} puts {', '.join(far)} in its own session, more than "
                      f"{SPEEDUP_MISMATCH:g}x apart: a timing spoiled by a busy machine, in the one session or in "
                      f"the row's own (the command that made the row, e.g. `puzzle baselines`, times it again; "
                      f"`puzzle front --out {shell_arg(run_dir)} --one-session` the one session), or an edited file?")
    result = pd.DataFrame(out)
    tok_s = timed["parent"].get("throughput_tok_s")  # the throughput axis of rows with this session's speed-ups
    tok_s = float(tok_s) if isinstance(tok_s, (int, float)) and not isinstance(tok_s, bool) \
        and math.isfinite(tok_s) and tok_s > 0 else None
    result.attrs.update(rows.attrs, session_rounds=session["repeats"], session_parent_tok_s=tok_s)
    return result


def front_csv_retimed(run_dir: Path) -> bool:
    """Whether DIR/front.csv changed since DIR/one_session.json timed its children (`puzzle front --remeasure`
    wrote it again); False without a readable session or front.csv."""
    from .io import sha256_file

    run_dir = Path(run_dir)
    try:
        recorded = read_json(run_dir / SESSION_FILE).get("front_csv_sha256")
    except (PuzzleError, AttributeError):
        return False
    path = run_dir / "front.csv"
    return isinstance(recorded, str) and path.is_file() and sha256_file(path) != recorded


def entry_params(config, cands: dict, coupled: dict) -> dict:
    """{(layer, entry id, stage): parameters} of the library entries that the candidates `cands` ({name: Candidate})
    use beyond the parent's own subblocks: a subblock entry once however many children share it, and a coupled
    entry (`coupled`: {name: {(layer, block id)}}, `pipeline.coupled_blocks`) with both its subblocks' weights,
    which it holds apart from the decoupled entries (reviewer: they were left out of the memory estimate)."""
    from .scoring.memory import subblock_params

    used = {}
    for name, c in cands.items():
        for i, (block, own) in enumerate(zip(c.blocks, config.blocks)):
            if (i, block.id) in coupled.get(name, ()):
                used[(i, block.id, c.stage)] = sum(subblock_params(config, v) for v in (block.attention, block.ffn)
                                                   if v.kind != "no_op")
                continue
            for variant, parent_variant in ((block.attention, own.attention), (block.ffn, own.ffn)):
                if variant.kind != "no_op" and variant != parent_variant:
                    used[(i, variant.id, c.stage)] = subblock_params(config, variant)
    return used
