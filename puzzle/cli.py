"""Command line: `puzzle <stage> ...` and `puzzle run` for the whole pipeline.

Every stage command works on a run directory (`--out DIR`) and reads what earlier stages wrote
there. Errors the user can fix print one line and exit with status 2 (`--debug` shows the
traceback); Ctrl-C exits with 130 and the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import sys
import textwrap
import time
import warnings
from pathlib import Path

from .architecture import ArchitectureError
from .errors import PuzzleError, shell_arg
from .io import dir_arg
from .runlock import run_lock, takes_lock


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# shared flags


def _add_common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", type=dir_arg, required=out_required, metavar="DIR",
                   help="run directory: every stage reads and writes its files here")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (a preset, then flags on top; saved to DIR/config.json)")
    g.add_argument("--preset", help="packaged preset name (`puzzle presets` lists them: smollm2-demo, smollm2-quick, "
                                    "tiny) or a .toml file; default: the "
                                    "configuration saved in DIR, else smollm2-demo")
    g.add_argument("--parent", metavar="PATH", help="parent model: HF folder with safetensors, a .gguf file, a "
                                                    "nemotron-nas folder, asset:<name>, or 'tiny'")
    g.add_argument("--calib", nargs="+", action="extend", metavar="FILE", help="calibration/scoring text: .txt, .jsonl(.gz), "
                                                              "Wikipedia .xml.bz2, parquet, HF save_to_disk folder, asset:<name>, "
                                                              "or parent-samples[:N] (N tokens sampled from the parent, "
                                                              "written to DIR/data; see puzzle.samples)")
    g.add_argument("--calib-weights", nargs="*", action="extend", type=float, metavar="W",
                   help="one weight per --calib source, in the same order: the sources' relative shares of the "
                        "calibration and scoring tokens (1 1: half each; 3 1: three quarters from the first); "
                        "no values: back to shares that follow the document counts. --calib without this flag "
                        "drops weights saved for other sources")
    g.add_argument("--eval", nargs="+", action="extend", metavar="FILE", help="held-out evaluation text (files, as for --calib)")
    g.add_argument("--text-field", metavar="NAME", help="the text field of .jsonl records and the text column of parquet, "
                                                        "Arrow and save_to_disk tables, for every source (default: text)")
    g.add_argument("--max-doc-tokens", type=int, metavar="N",
                   help="tokens kept of each document in the calibration, scoring and evaluation splits "
                        "(0: whole documents; the demo presets keep 1024, so that many documents share the splits)")
    g.add_argument("--device", help="target device to measure costs on: cpu or cuda[:N]")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="target dtype for cost measurement")
    g.add_argument("--batch-size", type=int, help="workload batch size B")
    g.add_argument("--prompt-len", type=int, help="workload prompt length P (tokens)")
    g.add_argument("--gen-len", type=int, help="workload generated tokens G per sequence")
    g.add_argument("--bld-tokens", type=int, help="calibration tokens each subblock trains on")
    g.add_argument("--score-tokens", type=int, help="tokens for replace-1-block scoring")
    g.add_argument("--seed", type=int, help="seed for data splits and BLD")
    add_max_contention_flag(g)
    add_select_context_flag(g)


def add_max_contention_flag(p) -> None:
    """--max-contention CORES (score.max_contention) on a command that times models: `run`, `score`, `realize`,
    `front`, `refine`, `baselines`, `fuse`; `p` is a parser or an argument group. Saved to DIR/config.json with the
    run's other settings (`_resolve_config`, through `_stage_run` in every command that takes it)."""
    p.add_argument("--max-contention", type=float, metavar="CORES",
                   help="cores other processes may keep busy on this process's CPUs before a timing window is "
                        "redone (default: as --preset or DIR/config.json sets it, else 0.25; 'inf' measures "
                        "regardless of other jobs)")


def add_select_context_flag(p) -> None:
    """--select-context N (score.select_context) on the commands that choose by realized KL on the scoring split:
    the configuration flags (`run` and the stage commands) and `refine`. Saved to DIR/config.json."""
    p.add_argument("--select-context", type=int, metavar="N",
                   help="choices by realized KL on the scoring split (refine, the budget feedback's pick, uniform "
                        "width's KV heads) weigh each position by how much the parent's prediction there needs more "
                        "than the last N tokens; 0: all positions alike (default: as --preset or DIR/config.json sets "
                        "it, else 0)")


class JoinCommas(argparse.Action):
    """A comma-separated list flag (`--front-speedups`, `baselines --speedups`) that may be given more than once:
    `--speedups 1.25,1.5 --speedups 2` reads as `1.25,1.5,2` (argparse alone keeps the last one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if earlier is None else f"{earlier},{values}")


class GivenOnce(argparse.Action):
    """A budget flag that may be given once: a second value is refused (argparse alone keeps the last one, and
    `--max-memory 0.5 --max-memory 0.9` loosened the budget without a word, beside help that says budgets hold at
    once)."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            runtime = self.dest in ("speedup", "max_runtime", "min_throughput")
            raise argparse.ArgumentError(self, f"given twice ({earlier!r}, then {values!r}); give it once" + (
                " (to bound the runtime several ways, combine --speedup, --max-runtime and --min-throughput: the "
                "tightest wins)" if runtime else ""))
        setattr(namespace, self.dest, values)


def speedup_flag(text: str) -> float:
    """argparse type of --speedup: '1.5' or '1.5x' (budgets.parse_speedup), errors as argparse's."""
    from .budgets import parse_speedup

    try:
        return parse_speedup(text)
    except PuzzleError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--speedup ")) from None


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets (fractions of the parent's totals, or absolute with units)",
                             "Any combination holds at once, and replaces the preset's or the run's saved main "
                             "budget (give every bound that should hold); of several runtime bounds (--speedup, "
                             "--max-runtime, --min-throughput) the tightest wins. Units are case-insensitive; GB/MB "
                             "are powers of 10, GiB/MiB powers of 2.")
    g.add_argument("--speedup", type=speedup_flag, action=GivenOnce, metavar="S", help="runtime budget as a speed-up over the parent (same as --max-runtime 1/S)")
    g.add_argument("--max-runtime", action=GivenOnce, metavar="F", help="runtime budget for the workload: a fraction ('0.67') or '250ms', '1.2s'")
    g.add_argument("--max-memory", action=GivenOnce, metavar="F", help="memory budget (weights + KV cache): a fraction ('0.8') or '2GiB', '300MiB'")
    g.add_argument("--max-prefill", action=GivenOnce, metavar="F", help="prefill latency budget: a fraction or '40ms'")
    g.add_argument("--max-decode", action=GivenOnce, metavar="F", help="decode latency budget (one decode step at the workload's batch and context): a "
                                                      "fraction or '5ms'")
    g.add_argument("--max-params", action=GivenOnce, metavar="F", help="parameter budget: a fraction ('0.5') or '60M', '1.2B'")
    g.add_argument("--min-throughput", action=GivenOnce, metavar="R", help="throughput floor at the workload: generated tokens/s "
                                                         "('1200tok/s') or a multiple of the parent's ('1.5x')")
    g.add_argument("--vllm-compatible", action=argparse.BooleanOptionalAction, default=None,
                   help="leave out variants vLLM cannot serve (linear replacements, and a no_op attention in layer 0, "
                        "even in a layer removed whole: the simple rule that keeps an FFN from coming before the first "
                        "attention); --no-vllm-compatible lets them in again (default: with --out the run's saved "
                        "setting, else off)")
    g.add_argument("--exclude", action="append", default=None, metavar="VARIANT",
                   help="leave a variant out of the search (attention, FFN or block id: attn-linear, ffn-768, "
                        "attn-kv1+ffn-768), repeatable; with --out saved as the run's setting, which the front, the "
                        "budget feedback, `puzzle refine` and the greedy baseline follow; --exclude none clears it "
                        "(default: with --out the run's saved setting, else none; --library PATH reads the table "
                        "alone, a run directory's too)")
    g.add_argument("--front-speedups", metavar="S,S,...", action=JoinCommas,
                   help="speed-up targets of the front sweep, e.g. 1.25,1.5,2,3 (with `search --library`: the optimal "
                        "child at each, solved as one sweep, printed as a table or --json)")
    g.add_argument("--budget-feedback", type=int, metavar="N",
                   help="re-solve rounds when a child's measured speed or size misses its budget by more than the timing "
                        "noise (default: the run's [search] budget_feedback, 2 unless its preset sets another, as "
                        "tiny's 0; with 2 or more, rounds before the last may also loosen a child well under its "
                        "budget; 0: check and report only)")


#: flags that set one configuration setting as given: (flag's dest, section, setting)
_SETTING_FLAGS = (("device", "target", "device"), ("dtype", "target", "dtype"),
                  ("batch_size", "target", "batch_size"), ("prompt_len", "target", "prompt_len"),
                  ("gen_len", "target", "gen_len"), ("bld_tokens", "bld", "tokens"), ("score_tokens", "score", "tokens"),
                  ("max_contention", "score", "max_contention"), ("select_context", "score", "select_context"),
                  ("text_field", "data", "text_field"),
                  ("max_doc_tokens", "data", "max_doc_tokens"))


def _base_config(args, out: Path, saved: bool = True):
    """What the command-line flags apply to: --preset, else the configuration saved in `out` (unless `saved` is
    False), else smollm2-demo. A flag of `_SETTING_FLAGS` stands in for its saved setting before the saved
    configuration is checked, so that the flag mends a setting that is not valid there (as its error suggests)."""
    from .config import WORK_SECTIONS, load_preset, read_run_config_json, saved_run_config

    if getattr(args, "preset", None):
        return load_preset(args.preset)
    if saved and (out / "config.json").is_file():
        raw = read_run_config_json(out)
        missing = [name for name in WORK_SECTIONS if name not in raw]  # before a flag makes a section of one setting
        for name, section, key in (*_SETTING_FLAGS, ("parent", "parent", "path")):
            if getattr(args, name, None) is not None:
                raw[section] = {**raw.get(section, {}), key: getattr(args, name)}
        if isinstance(raw.get("search"), dict):  # the search flags mend saved search settings the same way
            raw["search"] = {**raw["search"], **_search_flags_raw(args)}
        if isinstance(raw.get("data"), dict):  # and the data flags the data settings (as `_resolve_config` sets them)
            raw["data"] = {**raw["data"], **_data_flags_raw(args, raw["data"])}
        return saved_run_config(raw, out / "config.json", missing)
    if saved and getattr(args, "command", None) not in (None, "run"):  # breaker: `bld` on a folder whose `data` failed
        _log(f"{args.command}: {out} holds no run (no config.json): it starts one with the default preset smollm2-demo "
             f"(--preset names another; `puzzle presets` lists them)")
    return load_preset("smollm2-demo")


def _data_flags_raw(args, saved: dict) -> dict:
    """The data settings --calib, --eval and --calib-weights give (sources by `_sources_flag` against the `saved`
    data section; new calibration sources drop the saved weights, the same ones reordered keep each source's; [] from
    --calib-weights alone: no weights), as
    config.json spells them: applied to a saved configuration before it is checked (`_base_config`) and to the
    resolved one (`_resolve_config`)."""
    flag = lambda name: getattr(args, name, None)  # noqa: E731
    as_sources = lambda v: tuple(v) if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) else ()  # noqa: E731
    raw = {}
    if flag("calib"):
        was, weights = as_sources(saved.get("calib_sources")), saved.get("calib_weights")
        raw["calib_sources"] = list(_sources_flag(args.calib, was))
        if tuple(raw["calib_sources"]) != was:
            raw["calib_weights"] = []
            if sorted(raw["calib_sources"]) == sorted(was) and len(set(was)) == len(was) \
                    and isinstance(weights, list) and len(weights) == len(was):  # the same sources reordered
                raw["calib_weights"] = [weights[was.index(source)] for source in raw["calib_sources"]]
    if flag("calib_weights") is not None:
        raw["calib_weights"] = list(args.calib_weights)
    if flag("eval"):
        raw["eval_sources"] = list(_sources_flag(args.eval, as_sources(saved.get("eval_sources"))))
    return raw


def _search_flags_raw(args) -> dict:
    """The search settings this command's flags give, as config.json spells them (checked later, with the
    configuration): the whole main budget when a budget flag is given, the objective, --vllm-compatible,
    --budget-feedback, --front-speedups; {} when none is given. Applied to a saved configuration before it is
    checked (`_base_config`), so that a flag mends a saved search setting that is not valid, and to the resolved one
    (`_resolve_config`)."""
    from .config import SEARCH_BUDGETS

    flag = lambda name: getattr(args, name, None)  # noqa: E731
    raw = {}
    if any(flag(f) is not None for f in SEARCH_BUDGETS):  # all of them: a budget flag replaces the main budget
        raw.update({f: flag(f).strip() if isinstance(flag(f), str) else flag(f) for f in SEARCH_BUDGETS})
    for name in ("objective", "vllm_compatible", "budget_feedback"):
        if flag(name) is not None:
            raw[name] = flag(name).strip() if isinstance(flag(name), str) else flag(name)
    if flag("exclude") is not None:  # checked with the configuration: `_check_flags_before_config` names the flag
        raw["exclude"] = list(flag("exclude"))
    if flag("front_speedups") is not None:  # checked by `_check_flags_before_config`
        from .budgets import parse_speedup

        raw["front_speedups"] = [parse_speedup(s) for s in args.front_speedups.split(",")]
    return raw


def _check_flags_before_config(args) -> None:
    """Refuse a flag's value that is not valid, named as the flag, before the saved configuration is read (the
    flags are applied to it first, `_base_config`, so its own checks would blame config.json): number flags, empty
    or malformed budgets, --calib-weights, --objective, --front-speedups.

    Raises:
        PuzzleError: as above.
    """
    from .config import SEARCH_BUDGETS, check_budget_texts

    _check_number_flags(args)
    empty = [f for f in SEARCH_BUDGETS[1:] if isinstance(getattr(args, f, None), str) and not getattr(args, f).strip()]
    if empty:
        raise PuzzleError(f"--{empty[0].replace('_', '-')} is empty; give a value (e.g. 0.5) or leave the flag out")
    check_budget_texts({f: getattr(args, f) for f in SEARCH_BUDGETS[1:] if getattr(args, f, None)})
    weights = getattr(args, "calib_weights", None) or []
    if bad := [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]:
        raise PuzzleError(f"--calib-weights {' '.join(f'{w:g}' for w in weights)}: {bad[0]:g} is not a positive finite "
                          f"number; weights are relative token shares, one per --calib source (e.g. 1 1 for half each)")
    if getattr(args, "exclude", None) is not None and getattr(args, "library", None) is None:  # --library: the
        from .search import parse_exclude  # table's own check names its variants (`search_main`)

        parse_exclude(args.exclude)
    if getattr(args, "objective", None) is not None:
        from .search import parse_objective

        parse_objective(args.objective)  # an empty or malformed --objective, named as given
    if getattr(args, "front_speedups", None) is not None:
        from .budgets import parse_speedup

        try:  # 1.5 or 1.5x, as --speedup takes them
            targets = [parse_speedup(s) for s in args.front_speedups.split(",")]
        except PuzzleError as e:  # the part at fault and why, as --speedup says it
            raise PuzzleError(f"--front-speedups {args.front_speedups!r}: {str(e).removeprefix('--speedup ')}; give "
                              f"speed-ups separated by commas, e.g. 1.25,1.5,2") from None
        from .config import same_child_name

        if clash := same_child_name(targets):
            raise PuzzleError(f"--front-speedups {args.front_speedups!r}: {clash}")


def _resolve_config(args, out: Path):
    """The preset (or saved config), with the command-line flags applied.

    Raises:
        PuzzleError: a flag's value is not valid (named as the flag: `_check_flags_before_config`), or as the
            configuration's checks (`config.RunConfig`) and the saved configuration's (`config.load_run_config`).
    """
    _check_flags_before_config(args)
    config = _base_config(args, out)
    changes: dict[str, dict] = {"parent": {}, "data": {}, "target": {}, "bld": {}, "score": {}, "search": {}}
    flag = lambda name: getattr(args, name, None)  # noqa: E731
    if flag("parent"):  # saved absolute, as the data sources are: the run's later commands may start elsewhere
        given = args.parent
        from .tiny import means_builtin_tiny

        # the built-in tiny model (unless ./tiny exists, as in eval, gkd, sft and rpo), a packaged asset
        keep = means_builtin_tiny(given) or given.startswith("asset:")
        changes["parent"]["path"] = given if keep else os.path.abspath(os.path.expanduser(given))
    # the same values `_base_config` gave a saved configuration (applying them again changes nothing there)
    changes["data"].update(_data_flags_raw(args, config.to_dict()["data"]))
    changes["search"].update(_search_flags_raw(args))
    for name, section, key in _SETTING_FLAGS:
        if flag(name) is not None:
            changes[section][key] = flag(name)
    if flag("seed") is not None:
        changes["data"]["seed"] = args.seed
        changes["bld"]["seed"] = args.seed
    resolved = config.replace(**changes)
    if not (out / "config.json").is_file():  # (on a saved run `_log_saved_changes` says a changed budget)
        _say_budget_replaced(args, config, resolved)
    if flag("preset"):
        _say_preset_overrides(args.preset, resolved, out, changes)
        _say_tiny_text_for_a_real_parent(args.preset, resolved)
    return resolved


def _main_budget(config) -> dict:
    """The search budgets a configuration sets ({"speedup": 1.5, ...}; unset ones left out)."""
    from .config import SEARCH_BUDGETS

    return {k: getattr(config.search, k) for k in SEARCH_BUDGETS if getattr(config.search, k)}


def _budget_text(budget: dict) -> str:
    """`_main_budget` as messages say it: "speedup 1.5, max_params 0.99" (not a dict's repr), or "none"."""
    return ", ".join(f"{k} {v}" for k, v in budget.items()) or "none"


def _say_budget_replaced(args, preset, config) -> None:
    """Say which bounds of the `preset`'s main budget this command's budget flags dropped without giving one of the
    same kind (a runtime bound: --speedup, --max-runtime, --min-throughput; each other resource its own): the flags
    replace the preset's budget, they do not add to it (breaker: `--preset tiny --max-params 0.99` dropped tiny's
    speedup 1.5 without a word; reviewer: `--speedup 2` over speedup 1.5 was warned about too)."""
    from .config import SEARCH_BUDGETS

    if not any(getattr(args, f, None) is not None for f in SEARCH_BUDGETS):
        return
    runtime = ("speedup", "max_runtime", "min_throughput")
    kind = lambda k: "runtime" if k in runtime else k  # noqa: E731
    given = {kind(k) for k in _main_budget(config)}
    if dropped := {k: v for k, v in _main_budget(preset).items() if kind(k) not in given}:
        name = getattr(args, "preset", None) or "smollm2-demo"
        _log(f"{args.command}: note: the budget flags replace the main budget of the preset {name}, so its "
             f"{_budget_text(dropped)} no longer holds; give that flag too to keep it")


def _say_tiny_text_for_a_real_parent(preset: str, config) -> None:
    """Warn where the text of a parent other than the tiny one is the few KB of the tiny test model: a preset file of
    the user's that leaves it unset (the built-in defaults; breaker: `[data] seq_len = 64` alone gave the SmolLM2
    parent 832 calibration tokens, with BLD asking 32768 per subblock, and only "fewer than asked" warnings), or one
    that sets it so, or the packaged tiny preset with --parent (breaker: the first was said of a file that set
    them, the last not at all)."""
    import tomllib
    from importlib import resources

    from .config import preset_names

    if config.parent.path == "tiny":
        return
    if preset in preset_names() and not config.parent.path.startswith("asset:") \
            and not Path(config.parent.path).exists():  # a mistyped --parent is refused alone, in one line
        return
    tiny = [k for k in ("calib_sources", "eval_sources")
            if any(str(s).startswith("package:tiny_") for s in getattr(config.data, k))]
    try:  # the keys the file sets itself (it was read as a preset already)
        given = set() if preset in preset_names() else \
            set(tomllib.loads(Path(preset).expanduser().read_text(encoding="utf-8-sig")).get("data", {}))
    except (OSError, ValueError, AttributeError):
        given = set()
    unset = [f"data.{k}" for k in tiny if k not in given and preset not in preset_names()]
    chosen = [f"data.{k}" for k in tiny if f"data.{k}" not in unset]
    if unset:
        _log(f"puzzle: warning: {preset} leaves {' and '.join(unset)} at the built-in defaults, the few KB of text of "
             f"the tiny test model, for the parent {config.parent.path}: set them in the file (or give --calib / "
             f"--eval); a preset file's unset settings are the built-in defaults, not a packaged preset's, so "
             f"starting from a copy of one ({resources.files('puzzle.presets') / 'smollm2-demo.toml'}) is simplest")
    if chosen:
        _log(f"puzzle: warning: the preset {preset} gives {' and '.join(chosen)} the few KB of text of the tiny test "
             f"model, for the parent {config.parent.path}: too little to distill or score it on; give text of your "
             f"own (--calib / --eval) or start from a preset made for a real parent (smollm2-demo)")


def _say_preset_overrides(preset: str, config, out: Path, changes: dict) -> None:
    """Name on stderr the settings of DIR/config.json that --preset replaces (not those a flag sets): a setting edited
    in config.json by hand went back to the preset's value without a word."""
    from .config import _json_safe, read_run_config_json

    if not (out / "config.json").is_file():
        return
    try:
        saved = read_run_config_json(out)
    except PuzzleError:
        return
    plain = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples as lists, paths as text)
    replaced = [f"{section}.{key} {plain(saved[section][key])!r} -> {plain(value)!r}"
                for section, values in plain(_json_safe(config.to_dict())).items()
                if isinstance(values, dict) and isinstance(saved.get(section), dict)
                for key, value in values.items()
                if key in saved[section] and key not in changes.get(section, {}) and plain(saved[section][key]) != value]
    if replaced:
        print(f"puzzle: note: --preset {preset} replaces settings saved in {out / 'config.json'}: "
              f"{', '.join(replaced[:5])}{f' and {len(replaced) - 5} more' if len(replaced) > 5 else ''} (leave "
              f"--preset out to keep the saved settings)", file=sys.stderr)


def _sources_flag(given, saved: tuple[str, ...]) -> tuple[str, ...]:
    """--calib/--eval sources as the run saves them: file and folder paths made absolute and normalised (a run's
    later commands may start in another folder; `src/../src/a.txt` and `src/a.txt` are one source; links are not
    resolved), `asset:`, `package:` and `parent-samples` specs as given; the saved sources themselves when the flag
    repeats them word for word (a run saved with relative paths keeps its data settings)."""
    from .samples import is_parent_samples

    if tuple(given) == tuple(saved):
        return tuple(saved)
    keep = lambda spec: spec.startswith(("asset:", "package:")) or is_parent_samples(spec) or not spec.strip()  # noqa: E731
    return tuple(spec if keep(spec) else os.path.abspath(os.path.expanduser(spec)) for spec in given)  # a/../a: a


#: whole-number flags that must be >= 1 (config: target.batch_size, ... bld.tokens, score.tokens)
_COUNT_FLAGS = ("batch_size", "prompt_len", "gen_len", "bld_tokens", "score_tokens")


def _check_number_flags(args) -> None:
    """Refuse a number flag out of range, naming the flag and its value (the configuration's own checks name the
    setting, e.g. score.max_contention, and bld.tokens does not say which of its settings is at fault).

    Raises:
        PuzzleError: --max-contention is not > 0 (0, -1, nan, -inf), a count (`_COUNT_FLAGS`) is < 1,
            --budget-feedback is not 0 to `feedback.MAX_ROUNDS`, --device is not cpu or cuda[:N], or --parent
            is empty.
    """
    from .scoring.cost import check_max_contention, is_device_name

    check_max_contention(getattr(args, "max_contention", None), "--max-contention")
    if getattr(args, "parent", None) is not None and not args.parent.strip():  # e.g. --parent "$MODEL", MODEL unset
        raise PuzzleError("--parent is empty; give the parent model's path (HF or nemotron-nas folder, .gguf file), "
                          "asset:<name> or tiny")
    if getattr(args, "device", None) is not None and not is_device_name(args.device):
        raise PuzzleError(f"--device must be 'cpu' or 'cuda[:N]', got {args.device!r}")
    if (window := getattr(args, "select_context", None)) is not None and window < 0:
        raise PuzzleError(f"--select-context must be a number of tokens >= 0 (0: every scoring position weighs "
                          f"alike), got {window}")
    if (cap := getattr(args, "max_doc_tokens", None)) is not None and cap < 0:
        raise PuzzleError(f"--max-doc-tokens must be a whole number >= 0 (0: whole documents), got {cap}")
    for name in _COUNT_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise PuzzleError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value}")
    if getattr(args, "budget_feedback", None) is not None:
        from .feedback import check_rounds

        check_rounds(args.budget_feedback, "--budget-feedback")


#: what building a Run writes before any stage's work (Run: config.json; its bookkeeping, written with work)
_BOOKKEEPING = ("config.json", "timings.json", "parent.json")


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a mkdir -p would create first), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


#: the folders where stages before the search write their work, and the configuration sections that work is
#: made with (the parent's for all of them)
_WORK_FOLDERS = {"data": ("data",), "library": ("bld", "space"), "score": ("score", "target")}


def _work_stamp(out: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{folder: {path: (size, mtime_ns)}} of the files under each of `_WORK_FOLDERS` of run directory `out`:
    whether a command wrote work there is whether this changed (a few hundred files for the demo: milliseconds)."""
    stamp = {}
    for name in _WORK_FOLDERS:
        stamp[name] = {}
        for p in (out / name).rglob("*") if (out / name).is_dir() else ():
            try:
                st = p.stat()
            except OSError:  # removed meanwhile
                continue
            if not p.is_dir():
                stamp[name][str(p.relative_to(out))] = (st.st_size, st.st_mtime_ns)
    return stamp


def _keep_worked_settings(out: Path, config, before: dict) -> None:
    """After a failed command restored DIR/config.json: keep this command's settings (`config`) of the sections
    whose work folder it changed since `before` (`_work_stamp`), and of the parent when any changed; the rest stay
    as saved (reviewer: config.json went back to seed 0 beside data packed with --seed 7, and every later stage
    refused, advising to delete the work). Leaves the restored file when it cannot be read back."""
    import dataclasses

    from .config import load_run_config, save_run_config

    now = _work_stamp(out)
    changed = [name for name in _WORK_FOLDERS if now[name] != before[name]]
    if not changed:
        return
    try:
        saved = load_run_config(out)
    except (PuzzleError, ArchitectureError):
        return
    sections = {"parent", *(s for name in changed for s in _WORK_FOLDERS[name])}
    save_run_config(dataclasses.replace(saved, **{s: getattr(config, s) for s in sections}), out)


def _listing(folder: Path) -> set[Path]:
    """Every file and folder under `folder` (paths as `folder` spells them; empty when it is not a folder)."""
    return set(folder.rglob("*")) if folder.is_dir() else set()


def _take_back(out: Path, had: set[Path], top: Path | None = None) -> bool:
    """Undo what a refused command wrote to --out `out` when that is bookkeeping alone.

    `had`: `_listing(out)` before the command; `top`: the first folder the command made on the way to `out`
    (`_first_missing`), or None when `out` existed. When every file that is new under `top` (else `out`) is a
    `_BOOKKEEPING` file directly in `out`, those files are removed, and then the new folders, deepest first and
    `top` last, while they are empty. Otherwise nothing is: work a stage finished there (tokens, library entries)
    stays, and so does the configuration it was made with, for a rerun to resume. Returns whether what the command
    wrote was taken back (nothing of it was finished work).
    """
    out = out.absolute()
    root = out if top is None else top.absolute()
    new = [p for p in root.rglob("*") if p not in had]
    files = [p for p in new if not p.is_dir()]
    if any(p.parent != out or p.name not in _BOOKKEEPING for p in files):
        return False
    for p in files:
        p.unlink()
    folders = sorted((p for p in new if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for folder in folders + ([] if top is None else [root]):
        try:
            folder.rmdir()
        except OSError:  # something else appeared in it meanwhile: leave it
            break
    return True


def _put_back_max_contention(config_path: Path, before: bytes) -> None:
    """Put DIR/config.json's score.max_contention back as it was in `before` (its earlier bytes), where a failed
    command made it stricter: it says how timings are accepted, not what the search's choices were made with. A
    looser one stays, as timings it accepted may have been written (a cost table retimed under it would be stale under
    the old limit; a reviewer). Unreadable files are left as they are."""
    from .config import ScoreConfig
    from .io import atomic_write_text

    def limit(value) -> float:  # as the configuration reads it: a number or its text ("inf"); else the default
        try:
            return float(ScoreConfig().max_contention if value is None else value)
        except (TypeError, ValueError):
            return math.nan

    try:
        old, now = json.loads(before), json.loads(config_path.read_text(encoding="utf-8"))
        was, score = old.get("score", {}), now["score"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if not isinstance(was, dict) or not isinstance(score, dict) or \
            not limit(score.get("max_contention")) < limit(was.get("max_contention")):
        return
    if "max_contention" in was:
        score["max_contention"] = was["max_contention"]
    else:
        score.pop("max_contention", None)
    atomic_write_text(config_path, json.dumps(now, indent=2) + "\n")


@contextlib.contextmanager
def _stage_run(args, existing: bool = False, measures: bool = False):
    """The Run of a stage command (`_run_for`), and what a failure leaves of --out.

    Any failure (an error, Ctrl-C) puts DIR/config.json back as it was, byte for byte, so that flags whose stage
    did not finish are not read by later stages (budgets, objective); but when a stage wrote work under one of
    `_WORK_FOLDERS` with this command's settings (data packed with another --seed, a library begun with other BLD
    settings), that folder's sections of the configuration stay with it (`_keep_worked_settings`). Once a search
    has written its choices (`Run.settled`: DIR/search/ then describes this configuration, and children measured
    from it, or records
    re-solved on measured speed, may follow), a failure keeps the configuration with them, since they agree.
    Where DIR held no run, a refusal (PuzzleError) or Ctrl-C takes back what the command wrote unless a stage
    finished work there (`_take_back`: a new --out is removed again); a folder kept for its work keeps the
    configuration that work was made with, but the search settings as they are without this command's flags
    (`_search_flags_dropped`): a budget that failed is not read by later stages there either. On success the Run's
    bookkeeping is written (`Run.flush`).
    """
    from .io import file_in_the_way

    if ".." in args.out.parts and not args.out.exists():  # new/../run is run, though new/ does not exist (yet)
        args.out = Path(os.path.normpath(args.out))
    out = args.out.absolute()
    if out.is_symlink() and not out.exists():
        raise PuzzleError(f"--out {args.out} is a link to nothing ({os.readlink(out)}); give a folder")
    if out.exists() and not out.is_dir():
        raise PuzzleError(f"--out {args.out} is a file; give a folder (new, or a run directory)")
    if (above := file_in_the_way(out)) is not None:
        raise PuzzleError(f"--out {args.out}: {above} is a file, so nothing can be made under it; give another folder")
    config_path = out / "config.json"
    before = config_path.read_bytes() if config_path.is_file() else None
    work = _work_stamp(out) if before is not None else None
    top = _first_missing(out)
    had = _listing(out) if before is None else set()  # a folder that holds no run yet: empty, or the user's files
    saved = _saved(args) if before is not None else None
    follower = _follower_rank(args)  # leaves DIR/config.json to rank 0, also on failure (`Run.save_config`)
    run = None
    try:
        run = _run_for(args, existing=existing, measures=measures, save_config=not follower)
        yield run
    except BaseException as e:
        if follower or run is not None and run.settled:  # the search's choices and what was made from them stay
            if not follower and before is not None:  # but not a timing flag of the failed command (a breaker:
                _put_back_max_contention(config_path, before)  # `front --remeasure --max-contention 0.25`, refused,
            raise  # kept 0.25, and later commands on the run were refused for it)
        if before is not None and (not config_path.is_file() or config_path.read_bytes() != before):
            from .io import atomic_write_bytes

            atomic_write_bytes(config_path, before)
            if run is not None:  # the settings of work a stage wrote with this command's flags stay with it
                _keep_worked_settings(out, run.config, work)
        if before is None and out.is_dir() and isinstance(e, (PuzzleError, ArchitectureError, KeyboardInterrupt)):
            if _take_back(out, had, top) and isinstance(e, KeyboardInterrupt):  # for main's message
                e.puzzle_note = (f"nothing was finished, and {args.out} was not made" if top is not None and not
                                 top.exists() else f"nothing was finished, so {args.out} is as it was")  # breaker:
                # "is as it was" of a folder that had never existed
        elif before is None and isinstance(e, KeyboardInterrupt) and not out.exists():  # breaker: "finished work is
            e.puzzle_note = f"nothing was finished, and {args.out} was not made"  # saved" of a folder never made
        if before is None and run is not None and config_path.is_file():  # kept for the work a stage finished
            from .config import save_run_config

            save_run_config(_search_flags_dropped(args, run.config), out)
        raise
    run.flush()
    _log_saved_changes(args, saved, run.config)


def _log_saved_changes(args, saved, config) -> None:
    """Say that the command changed the run's main budget (DIR/config.json's search budgets), which names the
    main child that realize, export, front and the report use, or its score.select_context, by which the choices on
    the scoring split are made; nothing when it did not or no valid one was saved."""
    if saved is not None and _main_budget(saved) != _main_budget(config):
        _log(f"{args.command}: the run's main budget is now {_budget_text(_main_budget(config))} (was "
             f"{_budget_text(_main_budget(saved))}; saved to {args.out / 'config.json'}, so realize, export, front and "
             f"report use it)")
    before, now = (c.score.select_context for c in (saved, config)) if saved is not None else (None, None)
    if before != now:  # breaker: `refine --select-context` changed it without a word
        _log(f"{args.command}: the run's --select-context is now {now} (was {before}; saved to "
             f"{args.out / 'config.json'}, so the budget feedback's picks, uniform width's KV heads and later "
             f"refinements choose by it, and a front measured before it is measured again)")


def _search_flags_dropped(args, config):
    """`config` (a new run's, with this command's flags) with the search section as it is without them: the
    preset's or the default's. What a failed command leaves in a folder that held no run: the data, BLD, scoring and
    target settings describe the work kept there, while the budgets, objective and front of a search that did not
    finish (an infeasible --speedup) would be read by every later stage as the run's own."""
    import dataclasses

    return dataclasses.replace(config, search=_base_config(args, args.out, saved=False).search)


def _run_for(args, need_config: bool = True, existing: bool = False, measures: bool = False,
             save_config: bool = True):
    """The Run for `args.out`; `existing`: refuse a directory that no earlier stage wrote (nothing is created);
    `measures`: the command times models, so a CUDA target this machine lacks is refused before anything is written;
    `save_config`: False for a bld rank other than 0 (`_follower_rank`, `Run.save_config`)."""
    from .config import load_run_config
    from .pipeline import Run

    if existing and args.out.exists() and not args.out.is_dir():
        raise PuzzleError(f"--out {args.out} is a file; give the run directory")
    if (args.out / "config.json").is_dir():
        raise PuzzleError(f"{args.out / 'config.json'} is a folder where the run's configuration file belongs; move it away")
    if (args.out / "config.json").is_file():  # another program's config.json is never overwritten (even with --preset)
        from .config import read_run_config_json

        read_run_config_json(args.out)
    if existing and not (args.out / "config.json").is_file():
        raise PuzzleError(f"{args.out} is not a run directory (no config.json): check the path, or create the run "
                          f"first with `puzzle run --out {shell_arg(args.out)} --preset NAME` (`puzzle presets` lists "
                          f"them; without --preset, the SmolLM2 demo) or `puzzle data`, `bld` and `score`")
    config = _resolve_config(args, args.out) if need_config else load_run_config(args.out)
    if config.bld.coupled_top_k and getattr(args, "command", None) == "bld":  # reviewer: it was ignored unsaid
        _log(f"bld: note: bld.coupled_top_k = {config.bld.coupled_top_k}: this command trains the decoupled library; "
             "the coupled blocks are narrowed from a search on its scores, so `puzzle run --out "
             f"{shell_arg(args.out)}` trains them after scoring (or `puzzle.coupled.stage_coupled(run)` after `puzzle "
             "score`)")
    if measures:
        from .scoring.cost import check_device_available

        check_device_available(config.target.device)
    return Run(args.out, config, progress=not args.no_progress, log=_log, save_config=save_config)


def _follower_rank(args) -> bool:
    """Whether this `puzzle bld` is a rank other than 0 of a process group (torchrun, or MASTER_ADDR set by hand)."""
    from .distributed import env_rank_world, joins_group

    if getattr(args, "command", None) != "bld":
        return False
    rank, world, _ = env_rank_world()
    return rank > 0 and joins_group(world)


# ------------------------------------------------------------------------------------------------
# commands


def _saved(args):
    """DIR/config.json as it is before this command applies its flags (None for a new run, or a saved setting that
    is not valid: the command's flags may mend it, else the command names it)."""
    from .config import load_run_config

    if not (args.out / "config.json").is_file():
        return None
    try:
        return load_run_config(args.out)
    except PuzzleError:  # a saved setting this command's flags may mend (or the command says what is wrong)
        return None


def _log_unreachable_front(run) -> None:
    """Repeat the search's warning on front targets no child reached (DIR/search/chosen.json), if any."""
    from .pipeline import unreachable_front, unreachable_front_message

    if missed := unreachable_front(run.out):
        _log(f"front: warning: {unreachable_front_message(missed)}")


def cmd_run(args) -> int:
    from .pipeline import run_all

    # measures: a missing CUDA device is refused before the data and BLD stages, not at the first timing
    with _stage_run(args, measures=True) as run:
        summary = run_all(run)
    cols = ["name", "params", "memory_mib", "prefill_tok_s", "decode_tok_s", "throughput_tok_s", "kl_nats",
            "lm_loss", "speedup", "predicted_speedup"]  # throughput: front.png's axis (fresh user: not in the log)
    _log("\n" + summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    from .pipeline import budget_miss_notes, resolved_by_feedback

    for note in budget_miss_notes(args.out, summary):  # fresh user (stop 69): the main child's 1.45x beside its
        if note:  # 1.5x budget was explained only mid-log
            _log(f"run: {note}")
    # fresh user: the table's predicted_speedup differed from the search's lines above, unexplained (only for a child
    # whose first solve the search printed: one an earlier session re-solved was printed as it is, "(kept)")
    if again := [n for n in resolved_by_feedback(args.out, summary["name"]) if n in run.printed_solves]:
        them = "them" if len(again) > 1 else "it"
        _log(f"run: the budget feedback re-solved {', '.join(again)} after timing {them}: predicted_speedup is the "
             f"re-solved child's, not the search's figure printed above")
    _log_unreachable_front(run)
    _log(f"\nsummary: {args.out / 'summary.csv'}   front: {args.out / 'front.png'}   report: {args.out / 'report.md'}")
    _log(_next_steps(args.out, summary))  # a fresh user (stop 79): the run ended with no word of what comes next
    return 0


def _next_steps(out: Path, summary) -> str:
    """The commands a user runs after `puzzle run`, for the run's main child (DIR/search/chosen.json's, else the
    first child of `summary`), with the run's absolute path."""
    from .io import read_json

    try:
        main = read_json(out / "search" / "chosen.json").get("main")
    except (PuzzleError, OSError, AttributeError):
        main = None
    children = [str(n) for n in summary["name"] if n != "parent"]
    main = main if main in children else (children[0] if children else None)
    if main is None:
        return ""
    base = Path(out).absolute()
    where, folder, gkd = shell_arg(base), base / "export" / main, base / "export" / f"{main}-gkd"
    steps = [f"`puzzle front --out {where}` compares with the baselines built (front_ratios.csv)"
             if (base / "baselines" / "baselines.csv").is_file() else
             f"`puzzle baselines --out {where} --no-export` compares with simpler methods at the front's speed-ups "
             f"(`--speedups` picks fewer; report.md, \"Against simpler methods\")"]
    if not (base / "refine" / f"{main}.summary.csv").is_file():  # a breaker: the line named what was done already
        steps.append(f"`puzzle refine --out {where} --name {main}` searches past the summed KL")
    if not (gkd / "config.json").is_file():
        steps.append(f"`puzzle gkd --out {where} --name {main}` uplifts the child by global KD")
    ask = gkd if (gkd / "config.json").is_file() else folder
    if (ask / "config.json").is_file():
        steps.append(f"`puzzle generate {shell_arg(ask)} --prompt \"...\"` answers a prompt")
    return f"next: {'; '.join(steps)} (README, \"After the search: refine, compare, uplift, align\")"


def cmd_data(args) -> int:
    from .pipeline import stage_data

    with _stage_run(args) as run:
        stage_data(run)
    return 0


def cmd_bld(args) -> int:
    from .pipeline import stage_bld

    from .distributed import env_rank_world

    rank, world, _ = env_rank_world()  # checked before the run is opened (breaker: RANK=2 of 2 trained nothing)
    with _stage_run(args) as run:
        stage_bld(run, rank=rank, world_size=world)
    return 0


def cmd_score(args) -> int:
    from .pipeline import stage_score

    with _stage_run(args, measures=True) as run:
        stage_score(run, retime=args.retime)
    return 0


def cmd_search(args) -> int:
    from .search import search_main

    if args.library is not None:
        if not str(args.library).strip():  # Path('') would read as the current folder
            raise PuzzleError("--library is empty; give a run directory, a score table .csv or a block library "
                              "(its block_library.json or folder)")
        run_only = [flag for flag, given in [("--out", args.out),
                                             ("--budget-feedback", args.budget_feedback is not None)] if given]
        if run_only:
            raise PuzzleError(f"--library searches a table read-only and takes no {', '.join(run_only)}; give either "
                              "--library PATH (read-only) or --out DIR (solves the run's budgets for realize, export "
                              "and front)")
        try:
            return search_main(args)
        except PuzzleError:  # leftover: a failed search left an earlier --output file in place without a word
            from .search import is_search_output

            if args.output and Path(args.output).is_file() and is_search_output(Path(args.output)):
                print(f"note: --output {args.output} was not written; it still holds an earlier search's solutions",
                      file=sys.stderr)
            raise
    if args.out is None:
        raise PuzzleError("puzzle search needs --out DIR (a run directory after `puzzle score`) or --library PATH "
                          "(a block library: a run directory, its score/score_table.csv, or the Puzzle authors' "
                          "published library folder)")
    library_only = [flag for flag, given in [
        ("--greedy", args.greedy),
        ("--num-solutions", args.num_solutions != 1), ("--min-layers-differ", args.min_layers_differ != 1),
        ("--roofline", args.roofline), ("--roofline-dtype", args.roofline_dtype != "bfloat16"),
        ("--time-limit", args.time_limit != 60.0), ("--output", args.output)] if given]
    if library_only:
        verb = "works" if len(library_only) == 1 else "work"
        raise PuzzleError(f"{', '.join(library_only)} {verb} on a read-only search of a table: `puzzle search "
                          f"--library {shell_arg(args.out)} ...` (the run is left as it is); `puzzle search --out DIR` "
                          "solves the run's own budgets (--speedup, --max-runtime, --max-memory, --max-prefill, "
                          "--max-decode, --max-params, --min-throughput, --objective, --vllm-compatible, --exclude) "
                          "for realize, export and front")
    from .pipeline import stage_search

    with _stage_run(args, existing=True) as run:  # a budget that fails is not kept; a new one is said (`_stage_run`)
        stage_search(run, json_out=args.json, alone=True)
    return 0


def _child_name(args, run, command: str) -> str:
    """--name, or the main child's name (the run's own budgets) when it was not given."""
    from .pipeline import main_budget_request

    if args.name is not None:  # "" is refused by read_architecture like any other name that is not a record's
        return args.name
    try:
        name = main_budget_request(run)[1]
    except PuzzleError:
        raise PuzzleError(f"{command} needs --name NAME: the run has no budget of its own to name its main child") from None
    _log(f"{command}: no --name given, using the run's main child {name}")
    return name


def cmd_realize(args) -> int:
    from .pipeline import stage_realize

    with _stage_run(args, existing=True, measures=True) as run:
        stage_realize(run, _child_name(args, run, "realize"), stage=args.stage)
    return 0


def cmd_export(args) -> int:
    from .pipeline import export_child
    from .runlock import EXPORT_ADVICE, also_lock

    if args.dest is not None:  # another run's export to the same folder (the run lock covers DIR/export)
        also_lock(args.dest, EXPORT_ADVICE)
    with _stage_run(args, existing=True) as run:
        name = _child_name(args, run, "export")
        result, why = export_child(run, name, dest=args.dest, untie=True if args.untie_embeddings else None,
                                   dtype=args.export_dtype)
        if why is None:
            _log(f"export {name}: {result.path} is up to date (the files its last export wrote, from the same "
                 f"weights and record): kept")
            for w in result.warnings:  # as `stage_export` says them of a folder it writes
                _log(f"export {name}: warning: {w}")
        else:
            _log(f"export {name}: written {'to' if why == 'none yet' else f'again ({why}) to'} {result.path}")
    return 0


#: documents per task of `front --downstream` when --downstream-limit is not given
DOWNSTREAM_LIMIT = 100


def _reevaluated_front(run, why: str) -> bool:
    """When the children's timings stand, the front drawn from them (`pipeline.front_from_kept_timings`: evaluated
    again where their evaluation is out of date); True when it was."""
    from .io import read_json
    from .pipeline import front_from_kept_timings, read_architecture

    try:
        chosen = read_json(run.out / "search" / "chosen.json")
        records = {str(name): read_architecture(run, name) for name in chosen["names"]}
        main = chosen["main"]
    except (PuzzleError, KeyError, TypeError):  # the front's own check said why; it is measured again
        return False
    return front_from_kept_timings(run, records, main, "front", why) is not None


def _draws_front_all(out: Path, tasks) -> bool:
    """Whether `puzzle front` draws DIR/front_all (and prints the ratios): whenever there is more than our front
    (baselines, refined rows, downstream tasks), or it was drawn before (it must not outlive front.csv)."""
    return bool(tasks) or any(p.exists() for p in (out / "baselines" / "rows", out / "front_rows", out / "downstream",
                                                   out / "front_all.csv", out / "one_session.json"))


ONE_SESSION_REPEATS = 7


def _targets_without_baselines(rows, ratios) -> list[float]:
    """The speed-ups of the ratio table (`ratios`) at which no baseline row of `rows` (front_all's) was built, when
    some baseline was: a front target added since `puzzle baselines` ran, or one out of every method's reach. A
    baseline's target is in its name ('greedy-1.5x-init', 'uniform-2x-kv1', 'layers-1e+09x')."""
    from .plots import BASELINE_METHODS, target_in_name

    if not len(ratios):
        return []
    built = [float(t) for n in rows.loc[rows["method"].isin(BASELINE_METHODS), "name"]
             if (t := target_in_name(n)) is not None]
    if not built:
        return []
    return sorted(s for s in set(ratios["speedup"]) if not any(abs(b - s) <= 1e-6 * s for b in built))


def _time_front_together(run, repeats: int, timed: list) -> None:
    """`puzzle front --one-session`: every model of the front timed again in one session (`one_session`), with a
    table of each model's speed-up from its own session and from this one; appends True to `timed` once the
    session's file is written."""
    from .baselines import stale_greedy_rows
    from .one_session import SESSION_FILE, time_front_together

    with warnings.catch_warnings():  # the rows it leaves out are warned of once, as the front is drawn next
        warnings.simplefilter("ignore")  # (breaker: every such warning came twice with --one-session)
        try:
            table = time_front_together(run, repeats, exclude=stale_greedy_rows(run))
            timed.append(True)
        except KeyboardInterrupt as e:  # breaker: "rerun the same command to resume", and the rerun began at round 0
            e.puzzle_note = (f"one session's rounds count only together, so none are kept: the same command times "
                             f"every model again from the first round ({run.out / SESSION_FILE} is as it was)")
            raise
    show = table.assign(change=table["speedup"] / table["speedup_own_session"] - 1)
    print(show[["name", "source", "training", "speedup_own_session", "speedup", "change"]].to_string(
        index=False, formatters={"speedup_own_session": "{:.3f}x".format, "speedup": "{:.3f}x".format,
                                 "change": "{:+.1%}".format}), file=sys.stderr)
    names = f" for {len(table)} names" if len(table) > table.attrs["timed"] else ""  # one architecture, one timing
    _log(f"front: {table.attrs['timed']} models timed together{names} in {table.attrs['seconds']:.0f} s ({repeats} "
         f"interleaved rounds) -> {run.out / SESSION_FILE}; the front and its ratios below use these speed-ups (each "
         f"row's own one is kept as speedup_own_session in front_all.csv)")


def cmd_front(args) -> int:
    timed: list = []  # holds True once --one-session's timings are written (`_front`)
    try:
        return _front(args, timed)
    except KeyboardInterrupt as e:  # breaker: after the session, "rerun the same command" timed every model again
        if timed and not hasattr(e, "puzzle_note"):
            downstream = "" if args.downstream is None else f" --downstream {shell_arg(args.downstream)}" + (
                "" if args.downstream_limit is None else f" --downstream-limit {args.downstream_limit}")
            e.puzzle_note = (f"the one session's timings are kept in {args.out / 'one_session.json'}; `puzzle front "
                             f"--out {shell_arg(args.out)}{downstream}` (without --one-session) draws the front and "
                             f"its ratios from them" + (", evaluating what is left" if downstream else ""))
        raise


def _front(args, timed: list) -> int:
    """`puzzle front`; appends True to `timed` once the one session's timings are written."""
    from .pipeline import UNREADABLE_CHILDREN, front_is_current, stage_front

    tasks = None
    if args.downstream is not None:
        from .downstream import parse_tasks

        tasks = parse_tasks(args.downstream)  # bad task names (or none: "") fail before any work
        if args.downstream_limit is None:
            args.downstream_limit = DOWNSTREAM_LIMIT
        if args.downstream_limit < 0:
            raise PuzzleError(f"--downstream-limit must be >= 1 (or 0 for whole sets), got {args.downstream_limit}")
    elif args.downstream_limit is not None:
        raise PuzzleError("--downstream-limit only applies with --downstream TASK,...; add --downstream or drop it")
    if args.repeats is not None and not args.one_session:
        raise PuzzleError("--repeats sets the rounds of --one-session; add --one-session or drop it")
    from .config import MAX_REPEATS

    repeats = args.repeats if args.repeats is not None else ONE_SESSION_REPEATS
    if args.one_session and not 2 <= repeats <= MAX_REPEATS:
        raise PuzzleError(f"--repeats must be from 2 to {MAX_REPEATS} (rounds of the one session), got {args.repeats}")
    # refused or interrupted before its search wrote: the run as it was; after: the new settings with their choices
    with _stage_run(args, existing=True) as run:
        from .pipeline import changed_data_sources, stage_data

        if changed_data_sources(run):  # a text edited in place: packed again, so the front is measured on it
            stage_data(run)
        stale = "--remeasure" if args.remeasure else front_is_current(run)
        if stale == UNREADABLE_CHILDREN:  # solved again first: the same children keep their timings
            from .pipeline import stage_search

            _log(f"front: solving the front's budgets again ({stale})")
            stage_search(run)
            stale = front_is_current(run)
        if not stale:  # a summary.csv deleted or edited since: `run` would measure again, and so does front
            from .pipeline import summary_problem

            stale = summary_problem(run)
        if stale and not args.remeasure and _reevaluated_front(run, stale):
            pass
        elif stale:
            if (run.out / "front.csv").is_file():
                _log(f"front: solving, building and timing the front's children again ({stale})")
            stage_front(run, remeasure=bool(args.remeasure))  # (an interrupted call's timings: timed again)
        else:
            from .pipeline import drop_pending_measurement

            drop_pending_measurement(run)  # an interrupted call's of other settings: the front stands as it is
            if not (run.out / "front.png").is_file():  # deleted: drawn again from the measurement it belongs to
                from .pipeline import redraw_front

                redraw_front(run)
            _log(f"front: {run.out / 'front.csv'} is up to date with this run's settings and tables: drawn from it, no "
                 "child solved or timed again (--remeasure does both)")
            _log_unreachable_front(run)
            from .pipeline import contention_note, front_contention

            if not _draws_front_all(run.out, tasks) and (busy := contention_note(front_contention(run.out))):
                _log(f"front: warning: {busy}")  # (else said with the ratios below)
        from .pipeline import children_without_export, report_out_of_date, say_earlier_exports

        say_earlier_exports(run, "front")
        if unexported := children_without_export(run):  # breaker: export/child-3x of a new target was missing, unsaid
            them = "them" if len(unexported) > 1 else "it"
            _log(f"front: {', '.join(unexported)} {'have' if len(unexported) > 1 else 'has'} no export folder (front "
                 f"exports nothing): `puzzle run --out {shell_arg(run.out)}` writes {them} (nothing is timed again), "
                 f"or `puzzle export --out {shell_arg(run.out)} --name "
                 f"{unexported[0] if len(unexported) == 1 else 'NAME'}`{' each' if len(unexported) > 1 else ''}")
        if report_out_of_date(run):
            _log(f"front: {run.out / 'report.md'} was not written from this front (an earlier one, or an earlier "
                 f"version): `puzzle run --out {shell_arg(run.out)}` writes it again (nothing is timed for it)")
        if args.one_session:
            _time_front_together(run, args.repeats if args.repeats is not None else ONE_SESSION_REPEATS, timed)
    if tasks:
        from .downstream import evaluate_front_downstream

        acc = evaluate_front_downstream(run, tasks, limit=args.downstream_limit or None, progress=run.progress)
        cols = [c for c in ("name", "downstream_acc", "downstream_acc_stderr") if c in acc.columns] + \
            [c for c in acc.columns if c.startswith("acc_")]
        print(acc[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=sys.stderr)
    if not _draws_front_all(run.out, tasks):
        _print_front_table(run.out)
    else:
        from .pipeline import draw_front_all
        from .plots import ratio_table

        rows = draw_front_all(run)  # our front and the baselines' on one plot, and the ratios at matched speed
        _print_front_table(run.out, rows)  # with the speed-ups the ratios below use (a one session's, where current)
        print(f"front, every model ({len(rows)}: the parent, ours but the init-only comparison child, and any "
              f"refined, fused or baseline models) -> {run.out / 'front_all.csv'}, {run.out / 'front_all.png'}",
              file=sys.stderr)
        ratios = rows.attrs["ratios"]
        for name, why in ratios.attrs.get("passed_over", {}).items():
            drawn = ("; its diverse and refined children stay in front_all as the measured models they are"
                     if "earlier search" in why else "")  # breaker: they were drawn, unsaid, while greedy's went
            _log(f"front: {name} is compared as searched: {why} (`puzzle refine --out {shell_arg(run.out)} --name "
                 f"{name}` again, with the earlier refinement's flags){drawn}")
        second = ("; second table: per target, the plain, diverse or refined child (`puzzle refine`) with the lowest "
                  "scoring-split KL" if "selected per target" in set(ratios.get("ours", ())) else "")
        refined = sorted((run.out / "refine").glob("*.summary.csv")) if (run.out / "refine").is_dir() else []
        if refined and not second and not ratios.attrs.get("passed_over") and len(ratios):
            _log("front: no refinement (DIR/refine/) found a diverse or refined child with a lower scoring-split KL "
                 "than the plain one, so the plain MIP table below is also the one for the children a user would take")
        print(f"our evaluation KL / each baseline's at matched measured speed-up (below 1: ours is better{second}) -> "
              f"{run.out / 'front_ratios.csv'}\n{ratio_table(ratios)}", file=sys.stderr)
        if unbuilt := _targets_without_baselines(rows, ratios):  # breaker: "-: does not reach" where none was built
            _log(f"front: no baseline model at {', '.join(f'{t:g}x' for t in unbuilt)} (a target `puzzle baselines` "
                 f"has not run for, or one out of every method's reach): `puzzle baselines --out "
                 f"{shell_arg(run.out)}` builds what it can")
        if len(ratios) and (note := baselines_budget_note(run.config.search)):
            _log(f"front: {note}")
        if len(ratios):
            _log(f"front: {timing_note(rows, run.out)}")
        if same := same_model_note(rows):
            _log(f"front: {same}")
        from .pipeline import contention_note, front_contention

        # ratios at matched speed carry that noise (a session's only where the rows took its speed-ups)
        contention = front_contention(run.out, session_used="timing" in rows.columns)
        if busy := contention_note(contention):
            rows_busy = contention_note({k: v for k, v in contention.items()
                                         if k not in ("cost_table", "children", "one_session")})
            if rows_busy and "timing" not in rows.columns:  # breaker: it named no command that times them again
                busy += (f" (`puzzle front --out {shell_arg(run.out)} --one-session` times every model of the front "
                         "again, together, fused children included)")
            _log(f"front: warning: {busy}")
    return 0


def _print_front_table(out: Path, rows=None) -> None:
    """Our front as front.csv holds it, a line per model (a fresh user saw one line and no figures from `puzzle
    front` on an up-to-date run, stop 54); with `rows` (`plots.front_rows`), the measured speed-ups of the models a
    current one session timed are that session's, as the ratios use them. Nothing when front.csv cannot be read."""
    import pandas as pd

    try:
        front = pd.read_csv(out / "front.csv")
        shown = front[["name", "target_speedup", "speedup", "kl_nats", "predicted_kl_nats", "budget_met"]].copy()
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return
    if not len(shown):
        return
    # the parent first, then the children by target (breaker: rows by measured speed-up put a child slower than
    # the parent above it, and the targets out of order)
    order = pd.to_numeric(shown["target_speedup"], errors="coerce").where(shown["name"].ne("parent"), -math.inf)
    shown = shown.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order")
    where = ""
    if rows is not None and "timing" in rows.columns:  # breaker: the table showed own-session figures beside them
        timed = rows[rows["timing"].eq("one session")].drop_duplicates("name").set_index("name")["speedup"]
        children = shown["name"].ne("parent")  # breaker: the parent alone in the session named every child's figure
        if (children & shown["name"].isin(timed.index)).any():
            shown["speedup"] = [timed.get(n, s) for n, s in zip(shown["name"], shown["speedup"])]
            own = shown.loc[children & ~shown["name"].isin(timed.index), "name"].tolist()
            # fresh user: 1.143x beside budget_met True read as the one session's check
            where = (", measured speed-ups from the one session (one_session.json)"
                     + (f" except {', '.join(own)} (own session)" if own else "")
                     + "; budget_met is each child's check in its own session (front.csv)")
    shown = shown.rename(columns={"speedup": "measured_speedup", "kl_nats": "evaluation_kl"})
    for column in ("target_speedup", "measured_speedup", "evaluation_kl", "predicted_kl_nats"):  # hand edits: "-"
        shown[column] = pd.to_numeric(shown[column], errors="coerce")
    formats = {"target_speedup": "{:.2f}x".format, "measured_speedup": "{:.3f}x".format,
               "evaluation_kl": "{:.4g}".format, "predicted_kl_nats": "{:.4g}".format}
    print(f"our front ({out / 'front.csv'}; KL in nats/token on the evaluation split, predicted: the summed "
          f"replace-1-block KL{where}):\n{shown.to_string(index=False, na_rep='-', formatters=formats)}",
          file=sys.stderr)
    try:  # a False budget_met explained beside the table, as report.md does (a fresh user saw a bare False)
        from .pipeline import budget_miss_notes

        summary = pd.read_csv(out / "summary.csv")  # the children in the table (breaker: child-1.5x-init was named)
        for note in budget_miss_notes(out, summary[summary["name"].isin(shown["name"])]):
            if note:
                _log(f"front: {note}")
    except (OSError, ValueError, KeyError, pd.errors.ParserError):  # reviewer: a summary.csv without a name column
        pass


def same_model_note(rows, spread: float = 0.10) -> str:
    """A note naming the front's models that are one model (the same layers and the same evaluation KL: a method
    that reaches no further, or two methods that choose alike) whose measured speed-ups lie more than `spread` apart:
    one model drawn as points far apart (reviewer: greedy and uniform width, 0.64x to 2.38x); "" otherwise."""
    import pandas as pd

    if not {"name", "architecture", "kl_nats", "speedup"} <= set(rows.columns):
        return ""
    models = rows[rows["name"].ne("parent")].assign(kl=lambda d: pd.to_numeric(d["kl_nats"], errors="coerce").round(9))
    parts = []
    for _, group in models.dropna(subset=["kl", "speedup"]).groupby(["architecture", "kl"], sort=False):
        low, high = group["speedup"].min(), group["speedup"].max()
        if len(group) > 1 and low > 0 and high / low - 1 > spread:
            names = group["name"].tolist()
            parts.append(f"{', '.join(names[:-1])} and {names[-1]} (measured {low:.2f}x to {high:.2f}x)")
    if not parts:
        return ""
    return ("one model drawn as several points: " + "; ".join(parts) + (" are one model" if len(parts) == 1 else
            ": each group is one model") + " (the same layers, the same evaluation KL), so the spread of its measured "
            "speed-ups is timing noise, not its speed")


def timing_note(rows, out: Path) -> str:
    """Which timing sessions the front's speed-ups (and so the ratios at matched speed-up) come from."""
    if "timing" not in rows.columns:
        return ("each model's speed-up is from its own timing session (`puzzle run`, `refine`, `baselines`); on a "
                f"shared machine they drift between sessions: `puzzle front --out {shell_arg(out)} --one-session` "
                "times them all together")
    from .one_session import front_csv_retimed

    own = rows.loc[rows["timing"].ne("one session"), "name"].tolist()
    again = f"`puzzle front --out {shell_arg(out)} --one-session` times them all together again"
    if len(own) >= len(rows) - 1:  # the parent alone
        return f"no model's speed-up is from the one session (one_session.json times none as drawn now): {again}"
    note = ("every model's speed-up is from one interleaved session (one_session.json)" if not own else
            f"speed-ups from one interleaved session (one_session.json), except {', '.join(own)} (own session), so the "
            f"ratios carry no 5-95 % intervals")  # breaker: they went without a word
    stand = rows.loc[rows["timing"].eq("one session") & rows["name"].ne("parent")
                     & (rows["source"].eq("front.csv") if "source" in rows.columns else True), "name"].tolist()
    if front_csv_retimed(out) and stand:  # fresh user: said of children the one session no longer covered
        note += (f"; front.csv's children were timed again since (`--remeasure` or a new search), and the one "
                 f"session's figures stand for {', '.join(stand)}, so that those drawn are from one session ({again})")
    return note


def baselines_budget_note(search) -> str | None:
    """The budgets of the front's children (`config.SearchConfig`: memory and parameters, kept by every point)
    that the baselines, built for speed-ups alone, do not hold; None when there are none (fronts check, stop 35:
    ratios under --max-params 0.35 were printed beside a greedy child over it, without a word)."""
    held = [f"--{flag.replace('_', '-')} {getattr(search, flag)}" for flag in ("max_memory", "max_params")
            if getattr(search, flag) is not None]
    if not held:
        return None
    return (f"our children also hold {' and '.join(held)}; the baselines are built for the speed-ups alone, so they "
            f"may exceed those budgets (their params are in front_all.csv)")


def cmd_presets(args) -> int:
    from .config import preset_names, preset_summary

    names = preset_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(textwrap.fill(f"{name:<{width}}  {preset_summary(name)}".rstrip(), 100,
                            subsequent_indent=" " * (width + 2), break_on_hyphens=False))
    from importlib import resources

    print("\n" + textwrap.fill(
        "Use one with `puzzle run --preset NAME`; a preset file of your own is given by its path (name.toml). To "
        f"change a setting no flag sets, copy one of {resources.files('puzzle.presets')}/NAME.toml, edit it and "
        "give the copy (a file's unset settings take the built-in defaults, not a packaged preset's).", 100,
        break_on_hyphens=False, break_long_words=False))
    return 0


#: a negative value of a flag: any word that starts with '-' and a digit, '.' and a digit, 'inf' or 'nan' (-inf, -1e3,
#: -5M, -1ms, -1x, -1,2). argparse's own pattern takes only -1 and -1.5, so `--calib-weights 1 -inf` or
#: `--max-params -5M` ended in "unrecognized arguments" / "expected one argument" instead of the value's check. No
#: option of this CLI starts like that (they all start with '--'), so none is read as a value.
_NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads a word like `-inf` or `-1e3` as a flag's value, not as an unknown option, so the
    value reaches the check that says what to give instead (weights must be positive and finite, ...). Its
    subcommands' parsers are of this class too (add_subparsers takes the parser's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse.ArgumentParser._parse_optional asks it

    def error(self, message: str):
        """A bad or missing flag, in one line like every other refusal (argparse prints its usage block first), with
        where to read the options; exits with status 2 (SystemExit), as argparse does."""
        self.exit(2, f"puzzle: error: {message} (`{self.prog} --help` lists the options)\n")


#: the commands `build_parser` defines itself; the later stages' parsers live in their modules, whose imports load torch
CORE_COMMANDS = ("run", "data", "bld", "score", "search", "realize", "export", "front", "presets")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `puzzle` argument parser. `command`: the command word about to be parsed; when it is one of
    `CORE_COMMANDS`, the later stages' parsers (and the modules that hold them, torch among their imports) are left
    out, so that `puzzle search --library PATH` starts in about half the time. Default: every command."""
    parser = _Parser(
        prog="puzzle",
        description="Turn a Llama-family parent LLM into a faster child for a hardware budget: blockwise local "
                    "distillation (bld), replace-1-block scoring (score), mixed-integer search (search), "
                    "assembly and measurement (realize), export, and the quality-throughput front.")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")

    p = sub.add_parser("run", help="the whole pipeline: data, bld, score, search, realize, export, front, report")
    _add_common(p)
    _add_config_flags(p)
    _add_budget_flags(p)
    p.set_defaults(func=cmd_run)

    for name, func, text in [("data", cmd_data, "tokenize and split the calibration, scoring and evaluation text"),
                             ("bld", cmd_bld, "build the block library by blockwise local distillation "
                                              "(torchrun shards it: RANK/WORLD_SIZE)"),
                             ("score", cmd_score, "replace-1-block quality and measured cost of every library entry")]:
        p = sub.add_parser(name, help=text)
        _add_common(p)
        _add_config_flags(p)
        if name == "score":
            p.add_argument("--retime", action="store_true",
                           help="time the cost table again though one for this workload exists (after a timing on a "
                                "busy machine: a budget out of reach, children measured far from their predicted "
                                "speed-ups); the quality scores are kept. The table in place is replaced only once "
                                "the new timing succeeds")
        p.set_defaults(func=func)

    p = sub.add_parser("search", help="solve the mixed-integer program for the budgets (or --library PATH alone)")
    _add_common(p, out_required=False)
    _add_budget_flags(p)
    from .search import add_search_arguments

    add_search_arguments(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("realize", help="assemble a searched child, evaluate and measure it")
    _add_common(p)
    p.add_argument("--name", help="architecture name from DIR/search/<name>.json (default: the run's main child)")
    p.add_argument("--stage", choices=["bld", "init"], default=None, help="library entries to use (default: the search's)")
    add_max_contention_flag(p)
    p.set_defaults(func=cmd_realize)

    p = sub.add_parser("export", help="write a child as an HF folder (nemotron-nas config with block_configs)")
    _add_common(p)
    p.add_argument("--name", help="architecture name from DIR/search/<name>.json (default: the run's main child)")
    p.add_argument("--dest", type=Path, help="folder to write (default DIR/export/<name>)")
    p.add_argument("--untie-embeddings", action="store_true",
                   help="a parent that ties its LM head to the embedding: store lm_head.weight as a copy "
                        "(tie_word_embeddings false), for tools that read it by name such as TensorRT-LLM's "
                        "nemotron_nas converter; same logits, one vocabulary x hidden matrix more on disk. A folder "
                        "written so (the run's own or --dest) keeps it on later exports; delete the folder to export "
                        "it tied again")
    p.add_argument("--dtype", dest="export_dtype", choices=["float32", "bfloat16", "float16"],  # not target.dtype
                   help="stored weights' dtype (default: the one the folder written to stores, else the run's "
                        "[parent] dtype, float32 in the presets); bfloat16 halves a float32 run's files. A folder "
                        "written so keeps it on later exports")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("front", help="sweep speed-up targets: front.csv and front.png (quality vs measured throughput); "
                                      "with `puzzle baselines` done, also front_all.csv/png with the baselines")
    _add_common(p)
    _add_budget_flags(p)
    p.add_argument("--downstream", metavar="TASK,TASK,...", nargs="?", const="lambada,arc_easy,piqa",
                   help="also evaluate every front model zero-shot on these tasks (default when given alone: "
                        "lambada,arc_easy,piqa; 'all': every task of `puzzle eval`) and draw accuracy vs throughput "
                        "beside the KL front (front_all.png)")
    p.add_argument("--downstream-limit", type=int, default=None, metavar="N",
                   help=f"documents per task, the same fixed-seed subset for every model (0: all; default "
                        f"{DOWNSTREAM_LIMIT})")
    p.add_argument("--remeasure", action="store_true",
                   help="solve, build and time the front's children again even when DIR/front.csv is up to date "
                        "(by default a finished front is only drawn, with the baselines where they exist)")
    p.add_argument("--one-session", action="store_true",
                   help="time the parent and every model drawn (ours, refine's, the baselines') again, interleaved "
                        "in one session, so the ratios at matched speed-up do not mix sessions (DIR/one_session.json; "
                        "the models are held in memory together)")
    p.add_argument("--repeats", type=int, metavar="N",
                   help=f"interleaved rounds of --one-session (default {ONE_SESSION_REPEATS}; each model's runtime is "
                        f"the median over them)")
    add_max_contention_flag(p)
    p.set_defaults(func=cmd_front)

    if command not in CORE_COMMANDS:  # later stages and tools; each module owns its parser
        _add_later_parsers(sub)

    p = sub.add_parser("presets", help="list the packaged presets")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_presets)
    for command_parser in sub.choices.values():  # where an unknown word is refused, the command's own --help is meant
        command_parser.set_defaults(help_prog=command_parser.prog)
    return parser


def _add_later_parsers(sub) -> None:
    """Add the parsers of refine, baselines, gkd, sft, rpo, merge, eval, generate and fuse (their modules import
    torch)."""
    from .baselines import add_baselines_parser
    from .distill import add_gkd_parser
    from .fusion import add_fuse_parser
    from .merge import add_merge_parser
    from .preference import add_rpo_parser
    from .refine import add_refine_parser
    from .runtime import add_generate_parser
    from .scoring.harness import add_eval_parser
    from .sft import add_sft_parser

    for add in (add_refine_parser, add_baselines_parser, add_gkd_parser, add_sft_parser, add_rpo_parser,
                add_merge_parser, add_eval_parser, add_generate_parser, add_fuse_parser):
        add(sub)


#: file-system errors the user fixes outside the program (a read-only or full disk, permissions, a long name)
_USER_FIXABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENAMETOOLONG, errno.EDQUOT,
                        errno.ENOTDIR}  # ENOTDIR: a file where a folder of the path belongs


def expand_home(args: argparse.Namespace) -> None:
    """Expand a leading `~` in every path flag (type=Path, or a list of them), in place. A shell does this
    for unquoted words; a script or a quoted argument passes `~` through literally."""
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, _expanded(value))
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(args, name, [_expanded(v) for v in value])


def _expanded(path: Path) -> Path:
    """`path` with a leading `~` or `~user` expanded.

    Raises:
        PuzzleError: `~user` names no user of this machine (breaker: a traceback from every command)."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise PuzzleError(_NO_HOME.format(path=path)) from None


def _expands(word: str) -> bool:
    """Whether `word`'s leading `~` or `~user` can be expanded (`_expanded`)."""
    try:
        _expanded(Path(word))
        return True
    except PuzzleError:
        return False


#: the error of a path whose leading `~user` cannot be expanded (Path.expanduser's RuntimeError)
_NO_HOME = "{path}: its leading ~ names no user of this machine (or no home folder); give the path written out"


def _own_folders() -> set[Path]:
    """The folders of this package's modules (puzzle, and puzzle.scoring / puzzle.kernels, installed from elsewhere)."""
    import importlib.util

    folders = set()
    for name in ("puzzle", "puzzle.scoring", "puzzle.kernels"):
        spec = importlib.util.find_spec(name)
        folders.update(Path(p).resolve() for p in (spec.submodule_search_locations or []) if spec is not None)
    return folders


def _one_line_warnings(show):
    """A `warnings.showwarning` that prints this package's warnings on one line, `puzzle: warning: ...` (e.g. a
    damaged file being rebuilt), each text once per command (breaker: a record solved on another score table was
    warned about twice per export, once per read), and passes any other library's to `show`."""
    own = _own_folders()
    said: set[str] = set()

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, UserWarning) and Path(filename).resolve().parent in own:
            if str(message) not in said:
                said.add(str(message))
                print(f"puzzle: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


_TERMINATED: list = []  # a SIGTERM `_terminate_as_interrupt` turned into an interrupt


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Within the block, take SIGTERM (a scheduler's preemption, `kill`, `timeout`) as Ctrl-C: the command stops as
    an interrupt does, saving what it saves then and saying so (breaker: SIGTERM ended it without a word). Only in
    the main thread, where SIGTERM has its default action, and not in a torchrun worker (torchrun stops its ranks
    with SIGTERM when one fails)."""
    import signal

    if not _owns_signals() or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _sigterm_as_interrupt):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: commands that write nothing, so an interrupted one has nothing to resume
_NOTHING_TO_RESUME = ("presets", "generate")


def _owns_signals() -> bool:
    """Whether this call may set the process's signal handlers: in the main thread, not in a torchrun worker."""
    import threading

    return threading.current_thread() is threading.main_thread() and "TORCHELASTIC_RUN_ID" not in os.environ


def _sigterm_as_interrupt(signum, frame):
    """SIGTERM's handler while a command runs (`_terminate_as_interrupt`, and from the start of the `puzzle` process,
    `entry`): noted, then acted on as Ctrl-C."""
    import signal

    _TERMINATED.append(signum)
    if not callable(signal.getsignal(signal.SIGINT)):  # ignored (a job started with `&` by a script): raise here
        raise KeyboardInterrupt  # (reviewer: re-sent as SIGINT it was ignored, and `kill` stopped nothing)
    os.kill(os.getpid(), signal.SIGINT)  # through SIGINT's handler: a block that holds Ctrl-C holds this too


def _flush_standard_streams() -> None:
    """stdout and stderr flushed, before `os._exit` (which flushes nothing); a closed or broken one is passed over."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_at_once_on_a_late_signal(rc: int) -> None:
    """After the command returned `rc`, until the process ends (`entry`): Ctrl-C or SIGTERM ends it at once with `rc`
    and one line (a breaker: it died there without a word, 130 or 143 for work that had finished). Only in the
    `puzzle` process's main thread, where the handlers are Python's or ours."""
    import signal

    if not _owns_signals():
        return

    def ended(signum, frame):
        _flush_standard_streams()
        said = ("its work is done and saved, nothing to redo" if rc == 0 else f"its exit status {rc} stands")
        with contextlib.suppress(OSError):
            os.write(2, f"puzzle: interrupted after the command ended: {said}\n".encode())
        os._exit(rc)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL, _sigterm_as_interrupt):
            signal.signal(sig, ended)


def _remove_stale_temp_files(args, started: float, alone: bool) -> None:
    """After a command on a run directory: remove the temporary files of atomic writes that a killed command left
    there (breaker: `.parent.json.<8>.tmp` and `children/.child-2x.json.<8>.tmp` stayed through every rerun);
    `io.remove_stale_temp_files` leaves those of writes still in progress. `alone`: the command held the run's lock
    alone, so any file from before it started is a dead writer's, however recent (breaker: a rerun within a minute
    of a kill left them)."""
    from .io import is_run_directory, remove_stale_temp_files

    out = getattr(args, "out", None)
    try:
        if out is not None and is_run_directory(out):
            gone = remove_stale_temp_files(out, started, grace_s=0.0 if alone else None)
            if gone:
                print(f"puzzle: removed {len(gone)} temporary file(s) an interrupted command left in {out} "
                      f"({', '.join(p.name for p in gone[:3])}{' ...' if len(gone) > 3 else ''})", file=sys.stderr)
    except OSError:  # tidying only: never the command's outcome
        pass


#: seconds between progress-bar updates when stderr is no terminal (a log file): tqdm writes each update after a
#: carriage return, so a redirected demo log held lines thousands of characters long (fresh user, stop 75)
LOG_PROGRESS_INTERVAL_S = "30"


#: the commands whose processes share one job under torchrun (or RANK and WORLD_SIZE set by hand)
SHARDED_COMMANDS = ("bld", "gkd", "sft")


def _one_process_refusal(command: str | None) -> str | None:
    """Why `command` does not run as one of several ranks (WORLD_SIZE above 1), or None: it runs. Breaker: `torchrun
    --nproc_per_node 2 -m puzzle run --out DIR` ran the whole pipeline twice into one run directory, the second rank
    without the run's lock (`runlock.takes_lock`), both timing their models under the other's load."""
    from .runlock import env_world_size

    world = env_world_size()  # as the run lock reads it (reviewer: '²' passed isdigit, then int() failed)
    if command in (None, "presets", *SHARDED_COMMANDS) or world <= 1:
        return None
    then = (f"; e.g. `torchrun --nproc_per_node {world} -m puzzle bld --out DIR` after `puzzle data --out DIR ...`, "
            f"then `puzzle {command} --out DIR` in one process, which keeps the library built" if command == "run"
            else "")
    return (f"puzzle {command} runs in one process, and WORLD_SIZE={world} makes this one of {world} (torchrun, or "
            f"RANK and WORLD_SIZE left set in this shell): start it without torchrun, with RANK and WORLD_SIZE unset "
            f"(`env -u RANK -u WORLD_SIZE puzzle {command} ...`); the commands that share their work between "
            f"processes are {', '.join(SHARDED_COMMANDS)}{then}")


def entry() -> int:
    """The `puzzle` process (the `puzzle` script, `python -m puzzle`): `main` on sys.argv, with SIGTERM taken as Ctrl-C
    from the start (a breaker: one in its first second, while torch loads, ended it without a word) and a signal after
    the command ended ending it at once with the command's status (`_exit_at_once_on_a_late_signal`). Returns the
    exit status. A caller in its own process (a notebook, a test) calls `main`, which leaves the handlers as they
    were."""
    import signal

    owns = _owns_signals()
    if owns and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        rc = main()
    except KeyboardInterrupt:  # between the steps `main` guards (its arguments' parsing): one line as well
        terminated = bool(_TERMINATED)
        _TERMINATED.clear()
        print(f"puzzle: {'stopped (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        rc = 143 if terminated else 130
    if owns:
        _exit_at_once_on_a_late_signal(rc)
        # and no Python shutdown: it restores the default handlers first, then torch's teardown takes about 0.3 s in
        # which a signal killed the process without a word (a breaker); every file the command wrote is closed
        _flush_standard_streams()
        os._exit(rc)
    return rc


def main(argv=None) -> int:
    """The `puzzle` command on `argv` (default sys.argv[1:]). Returns the exit status."""
    logged = not sys.stderr.isatty()
    if logged:  # read by tqdm when it is first imported (below, with torch); a user's own setting wins
        os.environ.setdefault("TQDM_MININTERVAL", LOG_PROGRESS_INTERVAL_S)
    for name in ("TQDM_MININTERVAL", "TQDM_MAXINTERVAL"):  # breaker: '30s' was tqdm's traceback on import,
        if (interval := os.environ.get(name)) is not None:  # for every command
            try:
                float(interval)
            except ValueError:
                print(f"puzzle: error: {name} must be a number of seconds between progress updates (e.g. 30), "
                      f"got {interval!r}; set another or unset it", file=sys.stderr)
                return 2
    if logged:  # tqdm's monitor also refreshes a bar idle for maxinterval (10 s): a fresh user's log had lines in
        os.environ.setdefault("TQDM_MAXINTERVAL", os.environ["TQDM_MININTERVAL"])  # pairs, 12-18 s apart
    try:
        argv = sys.argv[1:] if argv is None else list(argv)  # a list: read twice (an iterator would be used up)
        command = argv[0] if argv and not str(argv[0]).startswith("-") else None
        parser = build_parser(command)  # may import torch on the way: Ctrl-C here is an interrupt like any other
    except KeyboardInterrupt:
        terminated = bool(_TERMINATED)
        _TERMINATED.clear()
        print(f"puzzle: {'stopped (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would name `puzzle --help`, which does not list a command's options
        parser.exit(2, f"puzzle: error: unrecognized arguments: {' '.join(unknown)} "
                       f"(`{getattr(args, 'help_prog', parser.prog)} --help` lists the options)\n")
    try:
        expand_home(args)
    except PuzzleError as e:
        print(f"puzzle: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if (refusal := _one_process_refusal(command)) is not None:
        print(f"puzzle: error: {refusal}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            if not args.debug:
                warnings.filterwarnings("ignore", category=FutureWarning)
            held = False  # the run's lock, alone: not refused by another holder, not shared, not a rank that takes none
            try:
                # one command per run directory; gkd and sft train one child each into its own folders, side by side
                with run_lock(getattr(args, "out", None), ["puzzle", *argv], shared=command in ("gkd", "sft")), \
                        _terminate_as_interrupt():
                    held = command not in ("gkd", "sft") and takes_lock()
                    return args.func(args)
            finally:
                _remove_stale_temp_files(args, started, alone=held)
    except (PuzzleError, ArchitectureError) as e:
        if args.debug:
            raise
        print(f"puzzle: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a path that is no flag's (merge's inputs, generate's model) with an unknown ~user
        if args.debug or "home directory" not in str(e):
            raise
        named = next((a for a in map(str, argv) if a.startswith("~") and not _expands(a)), "a path")
        print(f"puzzle: error: {_NO_HOME.format(path=named)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout stopped (`puzzle search --json | head`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail on the closed pipe again
        return 141  # as a shell reports a process ended by SIGPIPE
    except OSError as e:
        if args.debug or e.errno not in _USER_FIXABLE_ERRNOS:
            raise
        print(f"puzzle: error: {e.strerror}: {e.filename or ''} (check the path's permissions, space and name; "
              f"finished work is saved)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        said = getattr(e, "puzzle_note", None) or "finished work is saved, rerun the same command to resume"
        out = getattr(args, "out", None)
        if command in _NOTHING_TO_RESUME:  # a breaker: `presets` was to "resume"
            said = "nothing was written"
        if not hasattr(e, "puzzle_note") and isinstance(out, Path) and not out.exists():  # breaker: stopped before
            said = f"nothing was finished, and {out} was not made"  # the stage began, "finished work is saved"
        terminated = bool(_TERMINATED)
        _TERMINATED.clear()
        print(f"puzzle: {'stopped (SIGTERM)' if terminated else 'interrupted'}; {said}", file=sys.stderr)
        return 143 if terminated else 130  # as a shell reports a process ended by the signal
