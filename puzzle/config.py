"""Run configuration: one flat dataclass per stage, presets as TOML files, CLI flags on top.

A preset (`puzzle/presets/<name>.toml`, or any .toml path) has one table per stage:
[parent] [data] [space] [bld] [score] [target] [search] [report]. Keys are the dataclass fields.
Each run writes its resolved configuration to `<out>/config.json`; stage commands read it back, so
`puzzle score --out DIR` uses the same settings as the `puzzle run` that made DIR.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .bld import BLDConfig
from .budgets import MAX_FRACTION, BudgetRequest
from .data import DataConfig
from .errors import PuzzleError, shell_arg
from .space import SpaceConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ParentConfig:
    """Where the parent comes from: a path (HF folder, .gguf, nemotron-nas folder), `asset:<name>`, or "tiny"."""

    path: str = "asset:smollm2-gguf"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PuzzleError(f"parent.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.path, str) or not self.path.strip():
            raise PuzzleError(f"parent.path must be a path, 'asset:<name>' or 'tiny' (text), got {self.path!r}")


@dataclass(frozen=True)
class TargetConfig:
    """The hardware target and workload costs are measured for.

    batch_size B, prompt_len P, gen_len G: a request is a prefill of (B, P) then G decode steps.
    threads: CPU threads used while measuring (None keeps torch's default).
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 4
    prompt_len: int = 256
    gen_len: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PuzzleError(f"target.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("batch_size", "prompt_len", "gen_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PuzzleError(f"target.{name} must be a whole number >= 1, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= MAX_THREADS):  # breaker: 1e17 crashed torch
            raise PuzzleError(f"target.threads must be a whole number from 1 to {MAX_THREADS} or null (torch's "
                              f"default), got {self.threads!r}")
        from .scoring.cost import is_device_name

        if not is_device_name(self.device):
            raise PuzzleError(f"target.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


#: the most CPU threads target.threads takes (more than any CPU a timing runs on has cores)
MAX_THREADS = 4096

#: the most timing rounds score.cost_repeats and score.measure_repeats take (as `puzzle front --one-session --repeats`)
MAX_REPEATS = 1000


@dataclass(frozen=True)
class ScoreConfig:
    """Replace-1-block scoring and cost measurement.

    tokens: scoring tokens (capped by the data stage's scoring split).
    position_stride: the LM head scores every n-th position only (the layers see all of them);
        1 scores every position.
    score_init: also score the untrained (init-only) entries, so a search can be run on them for comparison.
    cost_repeats: timing repeats per variant.
    measure_repeats: rounds of the whole-model measurement of the parent and the children (each
        round runs every model once, interleaved; the speed-ups are medians over rounds). On the
        2-core VM, 2-round speed-ups of the demo's children moved by up to 10 % between back-to-back
        measurements (benchmarks/contention.py --only speedups); more rounds narrow that.
    max_contention: cores other processes may keep busy on this process's CPUs during a CPU timing
        window before it is dropped and timed again; after 3 such windows in a row the cost stage stops with an error
        (scoring/cost.py, "Other processes"). `inf` measures regardless. CLI: --max-contention.
    select_context: how the choices made by realized KL on the scoring split (`puzzle refine`, the budget
        feedback's pick, the uniform-width baseline's KV heads) weight its positions. 0 (the default): all alike.
        N > 0: each position by how much the parent's own prediction there changes when it sees only the last N
        tokens (`scoring.quality.context_weights`), so that a child which loses long-range context (many linear
        attentions) is seen to; it must be shorter than the data's sequences. CLI: --select-context.
    """

    tokens: int = 1024
    position_stride: int = 1
    chunk: int = 4
    score_init: bool = True
    cost_repeats: int = 5
    measure_repeats: int = 3
    max_contention: float = 0.25
    select_context: int = 0

    def __post_init__(self) -> None:
        from .scoring.cost import check_max_contention

        for name in ("cost_repeats", "measure_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_REPEATS:
                # breaker: 1000000 timed on for good, with no estimate
                raise PuzzleError(f"score.{name} must be a whole number of timing rounds from 1 to {MAX_REPEATS}, "
                                  f"got {value!r}")
        for name in ("tokens", "position_stride", "chunk"):  # CLI: --score-tokens
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise PuzzleError(f"score.{name} must be a whole number >= 1, got {value!r}"
                                  + (" (--score-tokens)" if name == "tokens" else ""))
        value = self.select_context
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise PuzzleError(f"score.select_context must be a whole number of tokens >= 0 (0: every scoring position "
                              f"weighs alike), got {value!r} (--select-context)")

        if self.max_contention is None:  # None is the API's "no check"; a run config says inf
            raise PuzzleError("score.max_contention must be a number of cores > 0 (inf to measure regardless), got None")
        object.__setattr__(self, "max_contention", check_max_contention(self.max_contention, "score.max_contention"))


#: SearchConfig's budget fields: the main child meets all that are set
SEARCH_BUDGETS = ("speedup", "max_runtime", "max_memory", "max_prefill", "max_decode", "max_params", "min_throughput")


@dataclass(frozen=True)
class SearchConfig:
    """Budgets for the main child and the front sweep.

    speedup: shorthand for max_runtime = 1/speedup of the parent's runtime.
    max_runtime, max_memory: fractions of the parent's totals ("0.6") or absolute ("250ms", "2GiB").
    max_prefill, max_decode, max_params: the same for prefill latency, decode latency and the
        parameter count ("40ms", "5ms", "60M"); min_throughput: generated tokens/s at the workload
        ("1200tok/s") or a multiple of the parent's ("1.5x"), a runtime bound (budgets.py). The
        main child meets all that are given; the front's points keep the memory and parameter
        budgets and sweep the runtime.
    front_speedups: speed-up targets of the quality-throughput front.
    exclude: variant ids the run's searches leave out (attention, FFN or block ids, as `puzzle search --exclude`):
        the main child, the front, the budget feedback's re-solves, `puzzle refine` and the greedy baseline
        choose from the rest of the library. CLI: --exclude VARIANT (repeatable; --exclude none clears it).
    budget_feedback: re-solve rounds driven by the whole-model measurement (puzzle/feedback.py):
        a child measured over its budget by more than the timing noise is solved again under a
        table limit corrected by its measured / predicted ratio; with 2 or more rounds a child more
        than `budget_slack` under its budget is also given a looser limit (better quality) and
        checked in the next round. 0 only checks and reports. On the 2-core VM the demo's five
        children measured 0.93-0.95 of their budgets; one round loosened all five to 0.96-0.98,
        all within budget, evaluation KL at 1.25x 1.02 -> 0.92 nats (README, "Costs"). Each round
        that changes a child measures every model again. CLI: --budget-feedback.
    budget_slack: headroom under the measured budget that counts as on budget (0.03 = 3 %).
    feedback_candidates: a re-solve of the budget feedback realizes the MIP's first child under the corrected
        limits, the child itself where it meets them, and the `feedback_candidates` best within 6 layers of the
        child, and keeps the one with the lowest KL on the scoring split (`pipeline.feedback_options`); 1: the
        MIP's first only. The summed replace-1 KL can rank a far-off child first that realizes much worse.
    """

    speedup: float | None = 1.5
    max_runtime: str | None = None
    max_memory: str | None = None
    max_prefill: str | None = None
    max_decode: str | None = None
    max_params: str | None = None
    min_throughput: str | None = None
    vllm_compatible: bool = False
    exclude: tuple[str, ...] = ()
    objective: str = "kl_nats"
    front_speedups: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0)
    budget_feedback: int = 2
    budget_slack: float = 0.03
    feedback_candidates: int = 4

    def __post_init__(self) -> None:
        from .feedback import check_rounds, check_slack

        from .search import parse_exclude, parse_objective

        object.__setattr__(self, "exclude", parse_exclude(self.exclude, "search.exclude (--exclude)"))
        try:  # its form here (a number, null, a list: a hand edit); its columns when the score table is read
            parse_objective(self.objective)
        except PuzzleError as e:
            raise PuzzleError(f"search.objective: {e}") from None
        object.__setattr__(self, "budget_feedback", check_rounds(self.budget_feedback))
        object.__setattr__(self, "budget_slack", check_slack(self.budget_slack))
        k = self.feedback_candidates
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise PuzzleError(f"search.feedback_candidates must be a whole number from 1 (the MIP's first child only) "
                              f"to 16, got {k!r}")

        for f in SEARCH_BUDGETS[1:]:  # a TOML number (max_params = 0.5) is the same budget as the flag's text
            value = getattr(self, f)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, f, str(value))
            elif value is not None and not isinstance(value, str):
                raise PuzzleError(f"search.{f} must be a number or a text such as '0.5', '60M' or '250ms', got "
                                  f"{value!r}")
        texts = {f: getattr(self, f) for f in SEARCH_BUDGETS[1:] if getattr(self, f) not in (None, "")}
        long = [f for f, v in texts.items() if len(str(v)) > 32]
        if long:  # the main child's file name spells the budgets
            raise PuzzleError(f"search budget {long[0]} {str(texts[long[0]])[:40]!r}...: write it in at most 32 "
                              "characters (e.g. '0.5', '60M', '250ms')")
        check_budget_texts(texts, as_settings=True)  # malformed budgets fail here, before any stage runs
        if self.speedup is not None:
            object.__setattr__(self, "speedup", _speedup(self.speedup, "search.speedup must be a finite number >= 0.1 "
                                                                        "(e.g. 1.5 or \"1.5x\")"))
        bad = "search.front_speedups must be a list of finite numbers >= 0.1 (e.g. [1.25, 1.5, 2])"
        if not isinstance(self.front_speedups, (list, tuple)) or not self.front_speedups:
            raise PuzzleError(f"{bad}, got {self.front_speedups!r}")
        object.__setattr__(self, "front_speedups", tuple(_speedup(s, bad) for s in self.front_speedups))
        if clash := same_child_name(self.front_speedups):
            raise PuzzleError(f"search.front_speedups: {clash}")


def check_budget_texts(texts: dict, as_settings: bool = False) -> None:
    """Parse the text budgets `texts` ({field of SEARCH_BUDGETS[1:]: text}) as a search would (the parent's totals
    only scale fractions, so any totals do).

    Raises:
        PuzzleError: a text no budget parser reads, named as its flag (--max-memory 'abc' ...), or with
            `as_settings` as its setting (search.max_memory 'abc' ...: a value from a preset or config.json).
    """
    try:
        BudgetRequest(**{f: str(v) for f, v in texts.items()}).resolve(
            {"runtime_ms": 1.0, "prefill_ms": 1.0, "decode_ms": 1.0, "memory_mib": 1.0, "params": 1.0},
            {"batch_size": 1, "gen_len": 1})
    except PuzzleError as e:
        message = str(e)
        if as_settings:
            for name in SEARCH_BUDGETS:
                message = message.replace(f"--{name.replace('_', '-')} ", f"search.{name} ")
        raise PuzzleError(message) from e


def same_child_name(speedups, prefix: str = "child") -> str | None:
    """Why two of the front's targets would name one child ("child-1.25x" for 1.2500001 and 1.25: names keep 6
    significant digits, and one record replaced the other without a word, breaker), or None. `prefix`: the name's
    first part (the baselines' "greedy", "layers", ...: their two models of one name crashed `puzzle baselines`)."""
    names = {}
    for s in dict.fromkeys(float(v) for v in speedups):
        if (other := names.setdefault(f"{s:g}", s)) != s:
            return (f"{other!r} and {s!r} would both be {prefix}-{s:g}x (models are named with 6 significant digits); "
                    f"give targets that differ there")
    return None


def _speedup(value, message: str) -> float:
    """`value` as a finite speed-up >= 0.1 (any real number type but bool, or a text as --speedup takes it, "1.5x";
    the inverse of the largest runtime fraction a budget takes, budgets.MAX_FRACTION); PuzzleError(`message`)
    otherwise."""
    from .budgets import _NUMBER

    given = value
    if isinstance(value, str) and (m := re.fullmatch(_NUMBER + r"\s*[xX×]?", value.strip())):  # reviewer: the
        value = float(m.group(1))  # README writes 1.5x, which --speedup took and a preset refused
    try:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 1 / MAX_FRACTION <= float(value) < math.inf
    except OverflowError:  # an int beyond float range
        ok = False
    if not ok:
        raise PuzzleError(f"{message}, got {given!r}")
    return float(value)


DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in one sentence what a neural network is.",
)


@dataclass(frozen=True)
class ReportConfig:
    """The final report: greedy answers to fixed chat prompts for every model."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, (list, tuple)) or not all(isinstance(p, str) for p in self.prompts):
            raise PuzzleError(f"report.prompts must be a list of strings (chat prompts), got {self.prompts!r}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        value = self.max_new_tokens  # 12.5 or -4 failed at the run's very end, after every measurement
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PuzzleError(f"report.max_new_tokens must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a `puzzle run` needs, one section per stage."""

    parent: ParentConfig = field(default_factory=ParentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if self.score.select_context >= self.data.seq_len:  # refused before any stage, not at the first choice
            raise PuzzleError(f"score.select_context = {self.score.select_context} is not shorter than data.seq_len = "
                              f"{self.data.seq_len}: no position would have a longer prefix to weigh; give 0 to "
                              f"{self.data.seq_len - 1} (--select-context)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise PuzzleError(f"{where}: unknown section(s) {sorted(unknown)}; sections are {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory().__class__
            kwargs[f.name] = _section(section_cls, d.get(f.name, {}), where, f.name)
        return cls(**kwargs)

    def replace(self, **sections) -> "RunConfig":
        """A copy with some fields of some sections changed: replace(search={"speedup": 2.0})."""
        out = {}
        for name, changes in sections.items():
            if changes:
                out[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **out)


_NON_FINITE = ("inf", "-inf", "nan")  # how config.json spells the floats strict JSON has no literal for


def _json_safe(obj):
    """`obj` with non-finite floats written as the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _float_from_text(value, annotation: str):
    """A float setting written as "inf" / "-inf" / "nan" (config.json, or quoted in TOML) -> float."""
    if "float" not in str(annotation):
        return value
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return float(value)
    if isinstance(value, list):
        return [_float_from_text(v, annotation) for v in value]
    return value


def _section(cls, values: dict, source: str, name: str):
    """Section `name` of a configuration read from `source` (a file's path, or "config" for one built in code) as
    `cls`. Messages start with "SOURCE [NAME]:", or "SOURCE:" where they name the setting (NAME.key) themselves;
    a setting's own check of a configuration built in code keeps its message as it is."""
    where = f"{source} [{name}]"
    if not isinstance(values, dict):
        raise PuzzleError(f"{where} must be a table of settings")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise PuzzleError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {k: _float_from_text(v, fields[k]) for k, v in values.items()}
    flags = [k for k, v in values.items() if fields[k] in ("bool", bool) and not isinstance(v, bool)]
    if flags:  # "false" would read as true
        raise PuzzleError(("" if source == "config" else f"{source}: ") + f"{name}.{flags[0]} must be true or "
                          f"false (no quotes), got {values[flags[0]]!r}")
    if cls is SearchConfig and any(k in values for k in SEARCH_BUDGETS):
        # a section that sets a budget sets the whole main budget (as the flags do): the default speed-up
        # is not added to `max_params = 0.5`; TOML has no null to unset it
        values = {**{k: None for k in SEARCH_BUDGETS}, **values}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a missing/extra argument, or a value float()/int() cannot read
        raise PuzzleError(f"{where}: {e}") from e
    except PuzzleError as e:  # a setting's own check: named with the file it came from
        if source == "config":
            raise
        named = str(e).startswith((f"{name}.", f"{name} "))
        raise PuzzleError(f"{source if named else where}: {e}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("puzzle.presets").iterdir() if p.name.endswith(".toml"))


def preset_summary(name: str) -> str:
    """A packaged preset's first sentence, from the comment at the top of its file ('' when it has none)."""
    text = resources.files("puzzle.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    head = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        head.append(line.lstrip("#").strip())
    words = " ".join(head)
    return words.split(". ")[0].rstrip(".") + "." if words else ""


def load_preset(name_or_path: str) -> RunConfig:
    """A RunConfig from a packaged preset name (see `preset_names`) or a .toml file path.

    Raises:
        PuzzleError: unknown preset, a file that is not UTF-8 or not TOML, or unknown sections/settings.
    """
    path = Path(name_or_path).expanduser()  # '~/x.toml' passed literally (quoted, or from a script)
    packaged = name_or_path in preset_names()  # a packaged name wins over a folder of that name (e.g. a run ./tiny)
    if path.suffix == ".toml" or path.exists() and not packaged:
        if path.is_dir():
            raise PuzzleError(f"preset {path} is a folder; give a preset .toml file or a packaged preset name "
                              f"({', '.join(preset_names())})")
        if not path.is_file():  # breaker: `--preset tiny.toml` named no packaged preset
            packaged_name = f" (the packaged preset is `--preset {path.stem}`, without .toml)" \
                if path.stem in preset_names() and Path(name_or_path).parent == Path(".") else \
                f"; packaged presets: {', '.join(preset_names())}"
            raise PuzzleError(f"preset file {path} does not exist{packaged_name}")
        try:
            text, where = path.read_text(encoding="utf-8-sig"), str(path)  # past an editor's byte-order mark
        except UnicodeDecodeError as e:  # breaker: a Latin-1 comment or a binary file ended in a traceback
            raise PuzzleError(f"preset file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8, "
                              f"or give a .toml preset") from None
    else:
        res = resources.files("puzzle.presets") / f"{name_or_path}.toml"
        if not res.is_file():
            raise PuzzleError(f"unknown preset {name_or_path!r}; packaged presets: {', '.join(preset_names())} (or give a .toml path)")
        text, where = res.read_text(encoding="utf-8"), f"preset {name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PuzzleError(f"{where} is not valid TOML: {e}") from e
    if not data:  # reviewer: an empty file gave the defaults (the demo's parent with another preset's text)
        raise PuzzleError(f"{where} sets nothing (no tables); give a preset with the settings it changes, or name a "
                          f"packaged one ({', '.join(preset_names())})")
    if where == str(path):
        _paths_from(data, path.absolute().parent)  # the folder it is named in (a linked preset: the link's)
    return RunConfig.from_dict(data, where)


def _paths_from(data: dict, folder: Path) -> None:
    """Make a preset file's relative paths (data.calib_sources, data.eval_sources, parent.path) absolute against the
    file's own folder, in place, as the --calib / --eval flags make theirs against the current one: the run saves
    them so, and its later commands may start anywhere. `asset:`, `package:`, `parent-samples` and `tiny` stay.
    A path missing beside the preset but present in the current folder (how earlier versions read it) is taken from
    there, with a warning."""
    import os
    import warnings

    from .samples import is_parent_samples

    def absolute(spec):
        if not isinstance(spec, str) or not spec.strip() or spec.startswith(("asset:", "package:")) \
                or is_parent_samples(spec) or spec == "tiny":
            return spec
        beside = os.path.normpath(folder / os.path.expanduser(spec))  # an absolute spec stays as it is
        here = os.path.abspath(os.path.expanduser(spec))
        if not os.path.exists(beside) and os.path.exists(here) and here != beside:
            warnings.warn(f"preset path {spec!r}: not found beside the preset ({beside}), so it is read from the "
                          f"current folder ({here}), as earlier versions did; write it relative to the preset's folder "
                          f"or absolute")
            return here
        return beside

    section = data.get("data")
    if isinstance(section, dict):
        for key in ("calib_sources", "eval_sources"):
            value = section.get(key)
            if isinstance(value, str):
                section[key] = absolute(value)
            elif isinstance(value, list):
                section[key] = [absolute(v) for v in value]
    parent = data.get("parent")
    if isinstance(parent, dict) and "path" in parent:
        parent["path"] = absolute(parent["path"])


def save_run_config(config: RunConfig, out_dir: Path) -> None:
    """DIR/config.json, rewritten only when its content changes (a read-only run can still be read)."""
    from .io import atomic_write_text

    path = Path(out_dir) / "config.json"
    text = json.dumps(_json_safe(config.to_dict()), indent=2, sort_keys=False, default=str) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def read_run_config_json(out_dir: Path) -> dict:
    """The settings object of `out_dir/config.json`, checked to be a puzzle run's configuration (not yet validated
    setting by setting: `load_run_config`). A folder holding another program's config.json (a Hugging Face model,
    `{"foo": 1}`) is refused, so that no command writes the run's configuration over it.

    A run's config.json holds RunConfig's sections and nothing else (`RunConfig.to_dict`, in every version), each an
    object of settings; one that lacks some sections is still a run's (a damaged one, or one written before a
    section existed), and a bad setting inside a section is `load_run_config`'s to name.

    Raises:
        PuzzleError: the file is missing, is not valid JSON or not a JSON object, or is not a puzzle run's
            configuration: no key, a key that is not one of RunConfig's sections, or a section that is not an object.
    """
    path = Path(out_dir) / "config.json"
    if Path(out_dir).is_file():  # breaker: `gkd --out run/config.json` named run/config.json/config.json
        raise PuzzleError(f"{out_dir} is a file, not a run directory; give the run's folder"
                          f"{f' ({Path(out_dir).parent})' if Path(out_dir).name == 'config.json' else ''}")
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist: check the path, or start with `puzzle run --out "
                          f"{shell_arg(out_dir)} --preset NAME` (`puzzle presets` lists them; without --preset, the "
                          f"SmolLM2 demo) or `puzzle data --out {shell_arg(out_dir)}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # an editor's BOM, as presets take it
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{path} is not valid JSON ({e}); {_rewrite_config(out_dir)}") from e
    if not isinstance(data, dict):
        raise PuzzleError(f"{path} holds a JSON {type(data).__name__}, not the run's settings (an object); "
                          f"{_rewrite_config(out_dir)}")
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    foreign = [k for k in data if k not in sections]
    if not data or foreign:  # another program's file ({"model": "resnet", "data": {"path": ...}}) shares a name at most
        held = ", ".join(map(repr, foreign[:3])) + (", ..." if len(foreign) > 3 else "") if data else "no key"
        raise PuzzleError(f"{path} is not a puzzle run's configuration (it holds {held}; a run's holds only the "
                          f"sections {', '.join(sections)}, each an object of settings); give another --out: a new "
                          "folder, or a run directory")
    if bad := [k for k in data if not isinstance(data[k], dict)]:  # a run's file, damaged
        raise PuzzleError(f"{path}: the run's {bad[0]!r} section is {json.dumps(data[bad[0]])[:24]}, not an object of "
                          f"settings; write it as {{...}} (or {{}} for the defaults)")
    return data


def _rewrite_config(out_dir) -> str:
    """How to make a damaged DIR/config.json again (breaker: "delete it and rerun" left a folder no stage command
    took for a run, and `puzzle run` without the run's preset fell back to the demo's parent and was refused)."""
    return (f"fix it by hand, or delete it and write it again with `puzzle run --out {shell_arg(out_dir)} --preset "
            "<the run's preset>` and the flags the run was made with (the stages those settings made are kept, not "
            "redone)")


def load_run_config(out_dir: Path) -> RunConfig:
    """The resolved configuration saved by an earlier command in `out_dir`.

    Raises:
        PuzzleError: `out_dir/config.json` is missing (run `puzzle run` or `puzzle data` first), damaged, not a puzzle
            run's configuration (`read_run_config_json`), or holds a setting that is not valid.
    """
    return saved_run_config(read_run_config_json(out_dir), Path(out_dir) / "config.json")


#: sections of a run's config.json that its work depends on (written by every version; "report" may be missing)
WORK_SECTIONS = ("data", "space", "bld", "score", "target", "search")


def check_work_sections(raw: dict, where: Path, missing: list[str] | None = None) -> None:
    """Refuse a run's config.json (its settings object `raw`) without a section of WORK_SECTIONS: every version
    wrote them, so one is missing by a hand edit, and its defaults would be another preset's (the demo's).
    `missing`: the sections the file itself lacked, when `raw` has had flags applied since.

    Raises:
        PuzzleError: naming the missing sections.
    """
    missing = [name for name in WORK_SECTIONS if name not in raw] if missing is None else missing
    if missing:
        raise PuzzleError(f"{where} has no {', '.join(repr(m) for m in missing)} section"
                          f"{'s' if len(missing) > 1 else ''}, which the run's data, library, scores and children "
                          f"were made with; put {'them' if len(missing) > 1 else 'it'} back (every run's config.json "
                          f"holds them), or start another --out")


def saved_run_config(raw: dict, where: Path, missing: list[str] | None = None) -> RunConfig:
    """RunConfig from the settings object of a run's config.json (`read_run_config_json`). Missing settings take
    their defaults (a file written before they existed), and so does a missing report section; a missing section of
    `WORK_SECTIONS` or parent is refused: the run's work was made with them, and the defaults are the demo's.
    `missing`: as `check_work_sections` takes it.

    Raises:
        PuzzleError: a missing section of WORK_SECTIONS, no parent.path, or as `RunConfig.from_dict`.
    """
    config = RunConfig.from_dict(raw, str(where))  # a setting that is not valid is named first
    check_work_sections(raw, where, missing)
    parent = raw.get("parent")
    if not isinstance(parent, dict) or "path" not in parent:
        raise PuzzleError(f"{where} names no parent model (its \"parent\" section or parent.path is missing), so "
                          f"the run's library, scores and children cannot be matched to one; put the parent's path "
                          f"back under \"parent\" (e.g. {{\"path\": \"asset:smollm2-gguf\"}}), or give it with "
                          f"--parent PATH to `puzzle run`, `data`, `bld` or `score`")
    return config
