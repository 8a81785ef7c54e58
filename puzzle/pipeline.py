"""The main job, stage by stage, on a run directory. Every stage reads the previous stage's files.

    DIR/config.json                 resolved configuration (all stages)
    DIR/parent.json                 the parent's resolved ModelConfig and source
    DIR/data/                       packed token splits + manifest (puzzle.data)
    DIR/library/                    block library (puzzle.library)
    DIR/score/quality_{bld,init}.jsonl   replace-1-block results, appended as they finish
    DIR/score/cost.csv(.json)       measured cost per variant and the non-block costs
    DIR/score/score_table.csv(.json)       the contract for the search (trained entries)
    DIR/score/score_table_init.csv(.json)  the same for init-only entries
    DIR/search/<name>.json          a chosen architecture and its predicted totals
    DIR/children/<name>.json        measured quality and speed of a front child (machine.json: the machine's speed)
    DIR/children/realized/          the same from `puzzle realize` (machine.json: its latest session)
    DIR/export/<name>/              HF folder (nemotron-nas) of each chosen child
    DIR/summary.csv, front.csv, front.png, report.md (+ report.json: what it was written from)

A rerun skips finished work: the data stage reloads matching splits, BLD keeps complete library
entries, scoring resumes from its result logs, children with up-to-date measurements are reused
(`run_all`: a front still current is not timed again, up-to-date exports and report are kept).
Library code: nothing here prints; progress goes to tqdm bars when `progress` is on and stage
messages to the `log` callback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .architecture import ArchitectureError, BlockConfig
from .config import SEARCH_BUDGETS, RunConfig, ScoreConfig, SearchConfig, save_run_config
from .errors import PuzzleError, differing_settings, shell_arg
from .io import (atomic_write_json, atomic_write_text, edited_table_note, is_run_directory, load_table, read_json,
                 save_table, sha256_file, signals_deferred, table_changed_since_written, tensor_sha256)
from .library import Library
from .runlock import claim_folder
from .search import InfeasibleBudget
from .space import build_space

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_COLUMNS = ["layer", "subblock", "variant", "is_parent", "kl_nats", "lm_loss", "top1_agree", "cosine",
                 "prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params"]


def local_parent_path(config: RunConfig) -> list[Path]:
    """The run's parent as a local file or folder ([] for a packaged asset or the built-in tiny model)."""
    spec = str(config.parent.path)
    if spec.startswith(("asset:", "package:")) or spec == "tiny":
        return []
    path = Path(spec).expanduser()
    return [path] if path.exists() else []


#: the folders a run keeps its work in (the stages', the baselines', refine's and gkd's): each a folder or absent
RUN_FOLDERS = ("data", "library", "score", "search", "children", "export", "front_rows", "baselines", "refine",
               "downstream", "gkd")
#: files a run's stages write after long work (atomically, by renaming onto them): each a file or absent
RUN_FILES = ("timings.json", "parent.json", "summary.csv", "report.md", "report.json", "front.csv", "front.png", "front.json",
             "front_all.csv", "front_all.png", "front_ratios.csv", "search/chosen.json", "children/budget_feedback.json",
             "children/machine.json", "children/exports.json")


@dataclass
class Run:
    """A run directory with its configuration and lazily loaded parent and tokens.

    Bookkeeping (DIR/timings.json, DIR/parent.json) is written when a stage's work is done (`timed`) or the
    command succeeds (`flush`), never on the way: loading the parent or reloading finished splits to check a
    command's flags writes nothing, so a refused command leaves the run as it was. (One exception: the first load
    of the parent in a run an earlier version made rewrites the parent fingerprint its records hold, once, to the
    current one of the same model: `adopt_fingerprint`; their meaning does not change.)
    """

    out: Path
    config: RunConfig
    progress: bool = True
    log: object = None
    _parent: object = field(default=None, repr=False)
    _tokens: object = field(default=None, repr=False)
    timings: dict = field(default_factory=dict)
    _unsaved: dict = field(default_factory=dict, repr=False)  # file name -> JSON object not written yet
    #: set when a search writes its choices (DIR/search/): from then on DIR/config.json describes them, and work made
    #: from them (children measured, records re-solved on measured speed) follows, so a later failure keeps both
    settled: bool = field(default=False, repr=False)
    #: False for a torchrun rank other than 0 (`puzzle bld`): rank 0 saves DIR/config.json, and a rank the others
    #: refuse for other settings, stopped by torchrun before it could put the file back, leaves no setting of its own
    save_config: bool = field(default=True, repr=False)
    _target_parent: tuple | None = field(default=None, repr=False)  # ((device, dtype), the parent there): `on_target`
    _warned: set = field(default_factory=set, repr=False)  # explanations said in full: `say_export_warnings`
    #: the children whose first solve this command's search printed (not those it kept as an earlier session's budget
    #: feedback re-solved them): what `puzzle run`'s closing note on re-solved children may name
    printed_solves: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        """Make DIR (when new) and save the configuration.

        Raises:
            PuzzleError: one of the run's folders (`RUN_FOLDERS`) is a file or a dangling link, or one of its files
                (`RUN_FILES`) a folder, before anything is written: the stage that writes it would fail with a
                traceback, perhaps after its work.
        """
        self.out = Path(self.out)
        for name in RUN_FOLDERS:
            path = self.out / name
            if (path.exists() or path.is_symlink()) and not path.is_dir():
                what = "a file" if path.exists() else "a link to nothing"
                raise PuzzleError(f"{path} is {what} where a folder belongs; move it away")
        for name in RUN_FILES:
            if (self.out / name).is_dir():
                raise PuzzleError(f"{self.out / name} is a folder where a file belongs; move it away")
        self.out.mkdir(parents=True, exist_ok=True)
        claim_folder(self.out)  # the command's lock on the run directory, now that it exists (puzzle/runlock.py)
        if self.save_config or not (self.out / "config.json").is_file():
            save_run_config(self.config, self.out)
        path = self.out / "timings.json"
        if path.is_file():
            try:
                timings = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
                timings = {}
            self.timings = timings if isinstance(timings, dict) else {}  # a hand-edited list or null: start again

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def say_export_warnings(self, name: str, warnings) -> None:
        """Say an export's `warnings`, with the explanations an earlier export's warnings gave in full (vLLM's, what
        ffn_mult cannot express) shortened to "(as above)" (`export.shorten_repeated_warnings`)."""
        from .export import shorten_repeated_warnings

        for w in shorten_repeated_warnings(warnings, self._warned):
            self.say(f"export {name}: warning: {w}")

    def timed(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage` in DIR/timings.json, once the stage's work is done (with what `flush` writes)."""
        self._add_time(stage, seconds)
        self.flush()

    def _add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 2)
        self._unsaved["timings.json"] = self.timings

    def flush(self) -> None:
        """Write the bookkeeping recorded so far and not yet written (parent.json, timings.json)."""
        for name, obj in list(self._unsaved.items()):
            atomic_write_json(self.out / name, obj)
            del self._unsaved[name]

    # -- inputs ----------------------------------------------------------------------------------
    def input_paths(self) -> list[Path]:
        """What an output must never replace: the run directory and a parent that is a local path."""
        return [self.out, *local_parent_path(self.config)]

    @property
    def parent(self):
        """The parent as a LoadedModel (model, tokenizer, config), loaded once."""
        if self._parent is None:
            t0 = time.perf_counter()
            path = self.config.parent.path
            check_parent_path(path, self.out)
            from .parent import load_model_spec

            # "tiny" is the built-in model in the configured dtype (breaker: its fp32 was recorded as parent.dtype)
            loaded = load_model_spec(path, DTYPE[self.config.parent.dtype], progress=self.progress)
            for p in loaded.model.parameters():
                p.requires_grad_(False)
            now = check_parent_weights(self.out, loaded.model, self.config.parent)
            adopt_fingerprint(self.out, loaded.model, now)
            self._parent = loaded
            self._parent_fingerprint = now[:16]  # `fingerprint(loaded.model)`, hashed once
            # recorded with the next stage's work (or the command's success), not by loading alone
            self._unsaved["parent.json"] = {"source": loaded.source, "config": loaded.config.to_dict(),
                                            "fingerprint": self._parent_fingerprint, "weights_sha256": now}
            self._add_time("parent_load_s", time.perf_counter() - t0)
        return self._parent

    @property
    def parent_fingerprint(self) -> str:
        """`fingerprint` of the parent (loaded first when it is not yet), as the run's records hold it."""
        self.parent  # noqa: B018 - loads the parent, which hashes it once
        return self._parent_fingerprint

    @property
    def tokens(self):
        """Packed token splits (calib, score, eval), prepared or reloaded from DIR/data."""
        if self._tokens is None:
            from .data import prepare_data

            tokenizer = self.parent.tokenizer
            t0 = time.perf_counter()
            resolved = self.generated_sources()
            tokens = prepare_data(self.config.data, tokenizer, self.out / "data", progress=self.progress,
                                  resolved=resolved, write=False)
            if not tokens.reloaded:  # packed now: not written over the splits the library was trained on
                self._check_packed_length(tokens)
                self._check_library_calib(tokens.calib)
                from .data import write_token_splits

                write_token_splits(tokens, self.out / "data")
            self._tokens = tokens
            if not self._tokens.reloaded:  # tokenized now: the data stage's work
                self.timed("data_s", time.perf_counter() - t0)
        return self._tokens

    def _check_library_calib(self, calib: torch.Tensor) -> None:
        """Refuse newly packed calibration tokens that are not the ones DIR/library was trained on (its meta.json's
        calib_sha), before they replace the run's splits: the library would belong to other text than its run.

        Raises:
            PuzzleError: naming what changed and the two ways out.
        """
        try:
            built_on = json.loads((self.out / "library" / "meta.json").read_text()).get("calib_sha")
        except (OSError, ValueError, AttributeError):
            return  # no library yet (or a damaged meta.json, which `puzzle bld` names)
        if isinstance(built_on, str) and built_on != _tensor_sha(calib):
            changed = self._changed_data_settings()
            raise PuzzleError(f"the calibration split packed now differs from the one the library in "
                              f"{self.out / 'library'} was trained on (the calibration text or the data settings "
                              f"changed since{changed}, or the evaluation text, whose documents are left out of "
                              f"calibration where a calibration source holds them too); {self.out / 'data'} is left "
                              f"as it is: "
                              f"restore the text or settings, or "
                              f"delete {self.out / 'library'} to train a library on the new text")

    def _check_packed_length(self, tokens) -> None:
        """Refuse splits packed now at another sequence length than the run's splits on disk, once a stage has used
        those (breaker: data.seq_len 64 -> 32 kept the library, the replace-1-block scores and the cached
        evaluations of 64-token sequences: they are keyed by the hash of the token stream, which a new length alone
        leaves as it was).

        Raises:
            PuzzleError: naming the lengths, the outputs made at the old one and the ways out.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.out / "data" / "tokens.safetensors"), "pt") as f:
                before = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (OSError, SafetensorError, ValueError):
            return  # no splits yet, or damaged ones (rebuilt with a warning)
        now = {k: list(getattr(tokens, k).shape) for k in before if isinstance(getattr(tokens, k, None), torch.Tensor)}
        if all(before[k][1:] == shape[1:] for k, shape in now.items()):
            return
        made = [p for p in (self.out / "library" / "entries", self.out / "score" / "quality_meta.json",
                            self.out / "children") if p.is_file() or p.is_dir() and any(p.iterdir())]
        if not made:
            return
        lengths = ", ".join(f"{k} {before[k][1]} -> {shape[1]}" for k, shape in now.items()
                            if before[k][1:] != shape[1:])
        raise PuzzleError(f"the splits packed now have other sequence lengths than the ones this run's stages used "
                          f"({lengths} tokens{self._changed_data_settings()}): {', '.join(map(str, made))} were made "
                          f"on the old ones and would not be redone; {self.out / 'data'} is left as it is: restore "
                          f"the setting, use another --out, or delete those to make them again at the new length")

    def _changed_data_settings(self) -> str:
        """': data.seed 0 -> 7, ...' for the plain data settings (numbers, text, the source lists) that differ from
        those DIR/data was packed with (breaker: the refusal named none); '' when none differ or the manifest cannot
        be read."""
        try:
            old = json.loads((self.out / "data" / "manifest.json").read_text())["settings"]
            now = json.loads(json.dumps(dataclasses.asdict(self.config.data), default=str))
            plain = lambda v: isinstance(v, (int, float, str, bool, type(None)))  # noqa: E731
            # the source lists too (breaker: another --calib was refused without naming data.calib_sources)
            keys = [k for k in old if k in now and "sha256" not in k and (
                plain(old[k]) or isinstance(old[k], list) and all(map(plain, old[k])))]
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        diff = differing_settings({k: old[k] for k in keys}, {k: now[k] for k in keys}, "data.")
        return f": {', '.join(diff)}" if diff else ""

    def generated_sources(self, data=None, folder: Path | None = None) -> dict[str, Path]:
        """Calibration sources made by the run (`parent-samples`): spec -> its file in `folder`
        (default DIR/data), sampled (or resumed) here when it is missing or short
        (`puzzle.samples.ensure_parent_samples`); `data` is a DataConfig (default the run's)."""
        from .data import check_sources, tokenizer_fingerprint
        from .samples import ensure_parent_samples

        data = data or self.config.data
        spec = data.parent_samples_spec()
        if spec is None:
            return {}
        # a missing --eval or --calib file is named now, not after minutes of sampling
        check_sources(data, packed_in=folder or self.out / "data")
        parent = self.parent
        path = ensure_parent_samples(parent.model, parent.tokenizer, folder or self.out / "data", data.parent_sample_tokens(),
                                     seed=data.seed, length=max(data.seq_len, 64), parent_fingerprint=self.parent_fingerprint,
                                     tokenizer_sha256=tokenizer_fingerprint(parent.tokenizer), progress=self.progress,
                                     log=self.say, limit=data.parent_sample_limit())
        return {spec: path}

    @property
    def library(self) -> Library:
        return Library(self.out / "library")

    def space(self):
        return build_space(self.parent.config, self.config.space)

    def on_target(self, models: dict) -> dict:
        """`models` (name -> model) on the target's device and dtype for `measure_models`: the parent (by identity)
        as one copy kept for the run, every other model as `scoring.cost.to_workload` gives it (itself when it is
        there already, as with the defaults: the parent's dtype on the CPU)."""
        from .scoring.cost import to_workload

        workload = self.workload()
        key = (workload.device, workload.dtype)
        if self._target_parent is None or self._target_parent[0] != key:
            self._target_parent = (key, to_workload(self.parent.model, workload))
        parent = self.parent.model
        return {n: self._target_parent[1] if m is parent else to_workload(m, workload) for n, m in models.items()}

    def workload(self):
        from .scoring.cost import Workload

        t = self.config.target
        return Workload(batch_size=t.batch_size, prompt_len=t.prompt_len, gen_len=t.gen_len, dtype=t.dtype, device=t.device,
                        num_threads=t.threads)


def check_parent_path(path: str, out: Path) -> None:
    """Refuse a run's parent.path (`path`: a local path, "tiny" or asset:<name>) naming no file or folder, saying how
    to give the moved model's new path (only run, data, bld and score take --parent; the others read the saved one).

    Raises:
        PuzzleError: the path does not exist.
    """
    if path == "tiny" or path.startswith("asset:") or Path(path).expanduser().exists():
        return
    kinds = ("an HF folder with safetensors, a .gguf file, a nemotron-nas folder, asset:<name> (the packaged parent: "
             "asset:smollm2-gguf) or tiny")
    if not (out / "parent.json").is_file():  # a new run: a mistyped path, not a moved model (fresh user)
        raise PuzzleError(f"the parent {path} does not exist (--parent, or parent.path of the preset); give {kinds}")
    raise PuzzleError(f"the run's parent {path} does not exist (--parent, or parent.path in {out / 'config.json'}); if "
                      f"it was mistyped, give {kinds}; if the run's model moved, give its new path once with `puzzle "
                      f"data --out {shell_arg(out)} --parent NEW_PATH` (run, data, bld and score take --parent and "
                      "save it; the same weights keep the run's library, scores and children), else put the model "
                      "back or give a path that exists")


#: values per parameter `weights_sha` hashes (evenly strided, the first included)
WEIGHTS_SHA_SAMPLE = 4096


def weights_sha(model) -> str:
    """sha256 of a model's architecture (its config without `extra`, which holds the path as typed) and of every
    parameter's name, shape and `WEIGHTS_SHA_SAMPLE` evenly strided values in float32: the same model from another
    path or a moved folder gives the same hash; another model, a fine-tune of it, or these weights in another dtype
    give another (any of them changes nearly every value). A sample, not every weight, because every stage that
    loads the parent computes it: on a 70B parent a whole-weight hash would take minutes."""
    d = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
    return tensors_sha(model.named_parameters(), json.dumps(d, sort_keys=True, default=str))


def tensors_sha(named_tensors, header: str = "", rounded_to: torch.dtype | None = None) -> str:
    """sha256 of `header` and of each (name, tensor)'s name, shape and `WEIGHTS_SHA_SAMPLE` evenly strided values in
    float32 (`weights_sha`'s sample; also what identifies a state-dict file's weights in `puzzle merge`), each value
    first rounded to `rounded_to` where given (bfloat16: the same weights held in float32 or bfloat16 agree)."""
    h = hashlib.sha256(header.encode())
    for name, p in named_tensors:
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // WEIGHTS_SHA_SAMPLE)][:WEIGHTS_SHA_SAMPLE]
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update((sample if rounded_to is None else sample.to(rounded_to)).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_parent_weights(out: Path, model, parent_config) -> str:
    """`weights_sha(model)`, after checking it against the one DIR/parent.json records when DIR has a library.

    Raises:
        PuzzleError: the run's library, scores and children were made from another model (or these weights in
            another dtype) than `model`, loaded from `parent_config` (ParentConfig: path, dtype).
    """
    recorded, now = _recorded_weights_sha(out), weights_sha(model)
    if not (out / "library").exists():
        return now
    advice = (f"give the run its own parent again (--parent on run, data, bld or score; its dtype is parent.dtype in "
              f"{out / 'config.json'} or a preset's [parent] dtype, now {parent_config.dtype}: --dtype is the "
              f"target's), or use another --out for this parent")
    if recorded is not None and recorded != now:
        raise PuzzleError(f"the run's library ({out / 'library'}) was built from another parent than "
                          f"{parent_config.path} (or from it in another dtype): its weights (in parent.dtype "
                          f"{parent_config.dtype}) are not those "
                          f"{out / 'parent.json'} records, and the run's scores and children belong to those; {advice}")
    if recorded is None:  # parent.json missing or damaged: the library's own record of its parent decides
        try:
            built_from = json.loads((out / "library" / "meta.json").read_text()).get("parent")
        except (OSError, ValueError, AttributeError):
            built_from = None
        if isinstance(built_from, str) and built_from not in {now[:16], *_earlier_fingerprints(out, model, now)}:
            raise PuzzleError(f"the run's library ({out / 'library'}) was built from another parent than "
                              f"{parent_config.path} (its meta.json records parent {built_from}, this one is "
                              f"{now[:16]}; {out / 'parent.json'}, which records the run's parent, is missing or "
                              f"damaged); {advice}")
    return now


def _recorded_weights_sha(out: Path) -> str | None:
    """The parent weights' sha256 DIR/parent.json records (None: no such record yet, e.g. a run made before it was
    recorded, or a damaged file; `check_parent_weights` then checks the parent library/meta.json records)."""
    try:
        recorded = json.loads((out / "parent.json").read_text())
    except (OSError, ValueError):
        return None
    sha = recorded.get("weights_sha256") if isinstance(recorded, dict) else None
    return sha if isinstance(sha, str) else None


def fingerprint_config(config) -> str:
    """A short hash of a model config's sizes and blocks (what costs depend on)."""
    d = {k: v for k, v in config.to_dict().items() if k != "extra"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model) -> str:
    """A short hash (16 hex) identifying a parent in a run's records: `weights_sha` (its config without the load
    path, and sampled values of every parameter), so a moved parent keeps it and another model, even one with the
    same norm weights (a merged LoRA fine-tune), does not."""
    return weights_sha(model)[:16]


def legacy_fingerprint(model, config: dict | None = None) -> str:
    """The fingerprint runs recorded before `fingerprint` (a hash of the config with `extra`, which holds the load
    path as typed, and of the RMSNorm weights), with `config` (a dict, e.g. the one DIR/parent.json recorded)
    standing in for the model's own. Only `adopt_fingerprint` still computes it."""
    config = model.config.to_dict() if config is None else config
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint_records(out: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """DIR's files that record the parent's `fingerprint`, each with the keys that lead to it: the library, the
    replace-1-block results, the parent samples (the run's and those of `gkd`'s re-packed calibration folders) and
    the evaluation cache."""
    from .samples import META_FILE

    records = [(out / "library" / "meta.json", ("parent",)), (out / "score" / "quality_meta.json", ("library", "parent")),
               (out / "data" / META_FILE, ("parent",))]
    records += [(p, ("parent",)) for p in sorted((out / "gkd").glob(f"data-*/{META_FILE}"))]
    return records + [(p, ("parent",)) for p in sorted((out / "children").glob("*.quality.json"))]


def _earlier_fingerprints(out: Path, model, weights_sha256: str) -> set[str]:
    """Fingerprints DIR's records may hold for this same parent, from before `fingerprint` hashed sampled weights:
    the old formula at the path as loaded now; the one DIR/parent.json records next to the same `weights_sha256`
    (a moved parent); for a run recorded before that hash, the old formula of the config DIR/parent.json recorded
    (with the path as typed then), when it matches that config apart from the path and gives the recorded value."""
    old = {legacy_fingerprint(model)}
    try:
        recorded = json.loads((out / "parent.json").read_text())
    except (OSError, ValueError):
        return old
    if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), str):
        return old
    if recorded.get("weights_sha256") == weights_sha256:
        old.add(recorded["fingerprint"])
    elif "weights_sha256" not in recorded and isinstance(recorded.get("config"), dict):
        strip = lambda d: json.dumps({k: v for k, v in d.items() if k != "extra"}, sort_keys=True, default=str)  # noqa: E731
        if strip(recorded["config"]) == strip(model.config.to_dict()) \
                and legacy_fingerprint(model, recorded["config"]) == recorded["fingerprint"]:
            old.add(recorded["fingerprint"])
    return old


def adopt_fingerprint(out: Path, model, weights_sha256: str) -> None:
    """Rewrite DIR's records of this parent made under an earlier fingerprint of the same model to its current one
    (a one-time upgrade of a run made by an earlier version; a run made now holds no such record, and nothing is
    written).

    The earlier fingerprint hashed the load path as typed, so a moved parent (or one named by another spelling)
    made the library (`Library.check_meta`), the replace-1-block results, the parent samples and the evaluation
    cache count as another parent's: refused, discarded or made again. Which earlier values are this model's:
    `_earlier_fingerprints`. A record of any other value, or a damaged file, is left for its own reader to judge.
    """
    new = fingerprint(model)
    old = _earlier_fingerprints(out, model, weights_sha256) - {new}
    for path, keys in _fingerprint_records(out):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        holder = record
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        value = holder.get(keys[-1]) if isinstance(holder, dict) else None
        if isinstance(value, str) and value in old:
            holder[keys[-1]] = new
            atomic_write_json(path, record)


# ------------------------------------------------------------------------------------------------
# data and BLD


def stage_data(run: Run):
    """Tokenize and split the corpora (or reload the splits)."""
    tokens = run.tokens
    from .data import source_lines

    for line in source_lines(tokens.manifest, tokens.reloaded):
        run.say(line)
    if tokens.reloaded:  # breaker: a rerun said nothing of the splits being the earlier ones
        run.say(f"data: the token splits in {run.out / 'data'} are reused (packed from the same sources and settings)")
    run.say(f"data: calib {tuple(tokens.calib.shape)}, score {tuple(tokens.score.shape)}, eval {tuple(tokens.eval.shape)} (sequences x tokens)")
    return tokens


def library_meta(run: Run) -> dict:
    """What a library depends on: the parent, the calibration tokens, the space and the BLD settings."""
    from dataclasses import asdict

    calib = run.tokens.calib
    return {"parent": run.parent_fingerprint, "calib_sha": _tensor_sha(calib),
            "space": asdict(run.config.space), "bld": asdict(run.config.bld)}


def stage_bld(run: Run, rank: int = 0, world_size: int = 1) -> pd.DataFrame:
    """Build (or resume) the block library; returns its index."""
    from .bld import build_library, planned_tokens

    from . import distributed

    lib = run.library
    grouped = distributed.joins_group(world_size)  # torchrun's ranks wait for each other; ranks started by hand not
    meta = library_meta(run)
    if (plan := planned_tokens(run.tokens.calib, run.config.bld)) > 0:  # before training (breaker: said only after)
        short_calib_warning(run, "bld", "bld.tokens", run.config.bld.tokens, plan)
    t0 = time.perf_counter()
    try:
        with distributed.process_group(rank, world_size):
            # the ranks agree before any writes meta.json (breaker: a rank refused for --bld-tokens 1024 had
            # replaced the unbuilt library's meta, so its setting stayed in config.json and the rerun used it)
            distributed.check_ranks_agree(world_size, distributed.digests(meta), "bld")
            try:
                lib.check_meta(meta, replace_unbuilt=world_size == 1 or grouped)
                refusal = None
            except Exception as e:  # noqa: BLE001  (a refusal, a full disk): every rank stops at once (reviewer:
                refusal = e  # per-node run folders that differ left the others in their next collective call)
            if not distributed.every_rank_ok(world_size, refusal is None):
                if refusal is not None:
                    raise refusal
                raise PuzzleError(f"bld: another rank refused the library in {lib.root} (its message says why); no "
                                  f"rank trained")
            result = build_library(run.parent.model, run.tokens.calib, run.space(), run.config.bld, lib,
                                   progress=run.progress, rank=rank, world_size=world_size)
    except RuntimeError as e:  # breaker: a rank killed during BLD gave the others gloo's traceback
        from .train_utils import DistEnv, peer_lost

        if (lost := peer_lost(DistEnv(rank=rank, world_size=world_size), e, "(the entries finished are kept)")) is None:
            raise
        raise lost from None
    if result["trained"]:
        run.timed("bld_s", time.perf_counter() - t0)
    index = lib.write_index() if rank == 0 else lib.index()  # rank 0 writes it (`bld.run_jobs`), after every rank
    shard = f" by rank {rank} of {world_size} (the other entries are the other ranks')" if world_size > 1 else ""
    run.say(f"bld: {result['trained']} subblock{'s' if result['trained'] != 1 else ''} trained{shard}, "
            f"{result['skipped']} already in the library, "
            f"{result['tokens_per_subblock']} tokens each, {result['seconds']:.0f} s")
    if world_size > 1 and not grouped:  # breaker: ranks started by hand in two shells
        index_file = lib.root / "index.csv"
        what = (f"{index_file} lists what was on disk when this one ended" if rank == 0 else
                f"rank 0 writes {index_file} when it ends, listing what is on disk then")  # breaker: rank 1 wrote none
        run.say(f"bld: ranks started without torchrun do not wait for each other, so {what}; once every rank has "
                f"finished, `puzzle bld --out {shell_arg(run.out)}` (one process) completes the index and trains "
                "anything a rank left")
    if gone := result.get("removed_tmp"):
        run.say(f"bld: removed {len(gone)} temporary file(s) an interrupted command left in {lib.root} "
                f"({', '.join(map(str, gone[:3]))}{' ...' if len(gone) > 3 else ''})")
    return index


def short_calib_warning(run: Run, stage: str, setting: str, asked: int, trained: int) -> None:
    """Say when an entry trained on fewer tokens than `setting` asked (`asked`), because the calibration split is
    shorter (breaker: 8192 asked, 2944 trained, unsaid), and which setting to raise; or on more, because entries
    train on whole sequences and at least one."""
    calib, cfg = run.tokens.calib, run.config.bld
    if trained > asked:  # leftover: bld.coupled_tokens = 1 trained a whole sequence without a word
        run.say(f"{stage}: note: {setting} = {asked} is less than one calibration sequence, so each entry trains on "
                f"one sequence of {calib.shape[1]} tokens")
    if asked - trained >= calib.shape[1]:
        need = asked + cfg.probe_sequences * calib.shape[1]
        run.say(f"{stage}: warning: {setting} asks {asked} tokens per entry, but the calibration split holds "
                f"{calib.shape[0]} sequences of {calib.shape[1]} ({cfg.probe_sequences} of them held out to check "
                f"progress), so each trains on {trained}: raise data.calib_tokens to {need} in "
                f"{run.out / 'config.json'} (no flag sets it; more text if the sources run short) or lower {setting}")


# ------------------------------------------------------------------------------------------------
# scoring: quality (replace-1-block) and cost


def _entry_sha(run: Run, layer: int, variant, stage: str) -> str | None:
    """The sha256 a library entry's info records for its weights (None for no_op, which has none, or an entry whose
    info cannot be read: scoring then loads it and says what is wrong)."""
    return None if variant.kind == "no_op" else run.library.recorded_sha256(layer, variant.id, stage)


def _candidate_module(run: Run, layer: int, subblock: str, variant, stage: str):
    """The library subblock as an attention-only / ffn-only DecoderBlock (None for no_op)."""
    from .init import attention_subblock, ffn_subblock

    if variant.kind == "no_op":
        return None
    cfg = run.parent.config
    sub = attention_subblock(cfg, variant, layer) if subblock == "attention" else ffn_subblock(cfg, variant, layer)
    sub.load_state_dict(run.library.load(layer, variant.id, stage), strict=True)
    return sub.to(next(run.parent.model.parameters()).dtype).eval()


def _tensor_sha(t: torch.Tensor) -> str:
    return tensor_sha256(t)[:16]


def scoring_ids(run: Run) -> torch.Tensor:
    """The (n, T) scoring sequences used for replace-1-block scores."""
    ids = run.tokens.score
    return ids[:max(1, min(ids.shape[0], run.config.score.tokens // ids.shape[1]))]


def check_score_meta(run: Run) -> None:
    """Forget replace-1-block results computed for another library, scoring text or scoring settings.

    The result logs are resumable caches keyed by candidate; this keeps them from being reused
    silently after the inputs they depend on changed. The space is not one of them: a widened
    space keeps every result and scores only its new candidates.
    """
    from .library import comparable_meta

    meta = {"library": library_meta(run), "score_tokens_sha": _tensor_sha(scoring_ids(run)),
            "position_stride": run.config.score.position_stride}
    meta = json.loads(json.dumps(meta, default=str))
    path = run.out / "score" / "quality_meta.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not (isinstance(old, dict) and isinstance(old.get("library"), dict)):
            # breaker: a damaged file discarded every result as "changed"; a missing one keeps them, so this does too
            warnings.warn(f"{path} is damaged (not the JSON object of a library, scoring text and settings); the "
                          f"replace-1-block results beside it are kept, as they would be without it, and it is written "
                          f"again for this run. If the scoring text or settings changed since they were computed, "
                          f"delete {run.out / 'score'}/quality_*.jsonl to score afresh", stacklevel=2)
            atomic_write_json(path, meta)
            return
        comparable = lambda m: {**m, "library": comparable_meta(m["library"])}  # noqa: E731
        if comparable(old) == comparable(meta):
            if old != meta:  # only the space or resource settings changed: keep the results, record the new meta
                atomic_write_json(path, meta)
            return
        if comparable({**old, "library": {**old["library"], "parent": meta["library"]["parent"]}}) == comparable(meta):
            # the parent alone differs: hours of results are not discarded on the parent's identity alone
            raise PuzzleError(f"the replace-1-block results in {run.out / 'score'} were computed for another parent "
                              f"(fingerprint {old['library'].get('parent')}, this one {meta['library']['parent']}); give "
                              f"the run its own parent again (--parent), or delete {path} to score this parent afresh")
        # the logs and the damaged lines set aside beside them (<log>.skipped: of the old settings too, reviewer)
        stale = list((run.out / "score").glob("quality_*.jsonl*")) + [run.out / "score" / "parent_quality.json"]
        for f in stale:
            f.unlink(missing_ok=True)
        changed = differing_settings(comparable(old), comparable(meta))  # breaker: which one went unsaid
        named = {"score_tokens_sha": "score_tokens_sha (the scoring text: score.tokens or the data)"}
        changed = [named.get(c.split(":")[0], c) for c in changed]
        run.say(f"score: the library, the scoring text or the scoring settings changed ({'; '.join(changed[:4])}"
                f"{'; ...' if len(changed) > 4 else ''}); earlier replace-1-block results were discarded")
    atomic_write_json(path, meta)


def _saved_parent_loss(path: Path) -> float | None:
    """The parent's LM loss on the scoring tokens saved in score/parent_quality.json (nats per token), or None when
    the file is missing or damaged (then warned: breaker, a damaged file stopped the run though it is cheap to
    compute again)."""
    if not path.is_file():
        return None
    try:
        loss = json.loads(path.read_text(encoding="utf-8"))["lm_loss"]
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            return float(loss)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        pass
    warnings.warn(f"{path} is damaged; the parent's loss on the scoring tokens is computed again", stacklevel=2)
    return None


def read_own_log(run: Run, log) -> dict:
    """A score log's results (`ResultLog.read`, which warns of damaged lines), its damaged lines then set aside in
    <log>.skipped (`ResultLog.set_aside_skipped`) and said, so no later command warns of them again. For a log of
    the run's own stages: the run lock is held, so no other process appends to it meanwhile."""
    done = log.read()
    if (aside := log.set_aside_skipped()) is not None:
        run.say(f"score: the skipped lines of {log.path.name} are moved to {aside} (kept there, and not warned of "
                f"again)")
    return done


def score_quality(run: Run, stage: str = "bld") -> pd.DataFrame:
    """Replace-1-subblock quality of every non-parent variant of every layer (resumable).

    Returns a table with layer, subblock, variant, is_parent and the METRICS of scoring/quality.py.
    """
    from .scoring.quality import ParentCache, ResultLog, parent_cache, replace_one_score

    cfg = run.config.score
    check_score_meta(run)
    ids = scoring_ids(run)
    log = ResultLog(run.out / "score" / f"quality_{stage}.jsonl")
    done = read_own_log(run, log)
    space = run.space()
    jobs = []
    for ls in space:
        for subblock, variants in (("attention", ls.attention), ("ffn", ls.ffn)):
            for k, v in enumerate(variants):
                if k == 0:
                    continue
                # no_op has no weights: its score does not depend on the library stage
                key = f"{ls.layer}:{subblock}:{v.id}:{'any' if v.kind == 'no_op' else stage}"
                jobs.append((key, ls.layer, subblock, v))
    bld_log = ResultLog(run.out / "score" / "quality_bld.jsonl").read() if stage != "bld" else {}
    entry_sha = {j[0]: _entry_sha(run, j[1], j[3], stage) for j in jobs}

    def scored(key: str) -> bool:  # a result of this very entry (one without a checksum predates them: kept)
        row = done.get(key) or bld_log.get(key)  # and a finite one (breaker: a NaN result was kept for good)
        return row is not None and row.get("entry_sha256", entry_sha[key]) == entry_sha[key] \
            and isinstance(row.get("kl_nats"), (int, float)) and math.isfinite(row["kl_nats"])

    todo = [j for j in jobs if not scored(j[0])]
    # no_op rows bld scored in this run (stage-independent), not kept from an earlier call of this stage (breaker:
    # a fresh run's score line said "init: ... 8 kept from an earlier call")
    shared = sum(1 for j in jobs if j[0] not in done and scored(j[0]))
    cache: ParentCache | None = None
    parent_path = run.out / "score" / "parent_quality.json"
    parent_loss = _saved_parent_loss(parent_path)
    if todo or parent_loss is None:
        cache = parent_cache(run.parent.model, ids, chunk=cfg.chunk, stride=cfg.position_stride)
        atomic_write_json(parent_path, {"lm_loss": cache.lm_loss, "tokens": ids.numel()})
        parent_loss = cache.lm_loss
    t0 = time.perf_counter()
    bar = None
    if todo and run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"score ({stage})", unit="cand")
    for key, layer, subblock, v in todo:
        sub = _candidate_module(run, layer, subblock, v, stage)
        metrics = replace_one_score(run.parent.model, cache, layer, subblock, sub, chunk=cfg.chunk)
        if not math.isfinite(metrics["kl_nats"]):  # breaker: a NaN weight scored NaN, and the search refused it later
            where = run.library.weights_path(layer, v.id, stage)
            raise PuzzleError(f"layer {layer} {subblock} {v.id} ({stage}) scores a KL of {metrics['kl_nats']}: its "
                              f"weights ({where}) hold NaN or inf, or overflow; delete {where} and run `puzzle bld "
                              f"--out {shell_arg(run.out)}`, which builds it again, then `puzzle score`")
        log.append({"key": key, "layer": layer, "subblock": subblock, "variant": v.id,
                    "entry_sha256": entry_sha[key], **metrics})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if todo:
        run.timed(f"score_{stage}_s", time.perf_counter() - t0)
    done = {**bld_log, **log.read()}
    rows = []
    for ls in space:
        for subblock, variants in (("attention", ls.attention), ("ffn", ls.ffn)):
            for k, v in enumerate(variants):
                if k == 0:
                    rows.append({"layer": ls.layer, "subblock": subblock, "variant": v.id, "is_parent": True,
                                 "kl_nats": 0.0, "lm_loss": parent_loss, "top1_agree": 1.0, "cosine": 1.0})
                    continue
                key = f"{ls.layer}:{subblock}:{v.id}:{'any' if v.kind == 'no_op' else stage}"
                r = done[key]
                rows.append({"layer": ls.layer, "subblock": subblock, "variant": v.id, "is_parent": False,
                             **{m: r[m] for m in ("kl_nats", "lm_loss", "top1_agree", "cosine")}})
    table = pd.DataFrame(rows)
    table.attrs.update(scored=len(todo), kept=len(jobs) - len(todo) - shared)  # for stage_score's line
    return table


def cost_meta(run: Run) -> dict:
    w = run.workload()
    return {"device": w.device, "dtype": w.dtype, "batch_size": w.batch_size, "prompt_len": w.prompt_len,
            "gen_len": w.gen_len}


def _stale_timing(meta: dict, threads: int, max_contention: float, repeats: int | None = None) -> str | None:
    """Why a saved cost table must be timed again for these settings (None: it can be reused); `repeats`:
    score.cost_repeats now (a table that records none, from an earlier version, is kept)."""
    recorded, contention = meta.get("num_threads"), meta.get("contention_cores")
    if repeats is not None and isinstance(meta.get("cost_repeats"), int) and meta["cost_repeats"] != repeats:
        return f"timed with {meta['cost_repeats']} repeats per variant and score.cost_repeats is now {repeats}"
    if recorded is not None and (isinstance(recorded, bool) or not isinstance(recorded, int)):
        return f"recorded with an unreadable thread count {recorded!r}"
    if recorded not in (None, threads):
        return f"timed with {recorded} threads and the target now has {threads}"
    if contention is not None and (isinstance(contention, bool) or not isinstance(contention, (int, float))):
        return f"recorded with an unreadable contention {contention!r}"
    if contention is not None and contention > max_contention:
        return f"timed while other jobs took {contention:g} cores, over the limit max_contention={max_contention:g}"
    return None


def stage_cost(run: Run, retime: bool = False) -> tuple[pd.DataFrame, dict]:
    """Measured cost of every variant and of the non-block part (reused when measured for this workload, unless
    `retime`: `puzzle score --retime`; the table in place is replaced only when the new timing succeeds)."""
    from .scoring.cost import max_ignoring_nan, measure_non_block_costs, measure_subblock_costs
    from .scoring.machine import machine_record

    path = run.out / "score" / "cost.csv"
    expect = cost_meta(run)
    space = run.space()
    attn = sorted({v for ls in space for v in ls.attention}, key=lambda v: v.id)
    ffn = sorted({v for ls in space for v in ls.ffn}, key=lambda v: v.id)
    expect["config"] = fingerprint_config(run.parent.config)
    w = run.workload()
    limit = run.config.score.max_contention
    if path.is_file() and retime:
        run.say("score: timing the cost table again (--retime)")
    elif path.is_file():
        try:
            df, meta = load_table(path, expect=expect)
            stale = _stale_timing(meta, w.threads(), limit, run.config.score.cost_repeats)  # breaker: kept unsaid
            if stale:
                run.say(f"score: the cost table was {stale}; timing it again")
            elif {v.id for v in attn + ffn} <= set(df["variant"]):
                return df, meta["non_block"]
        except PuzzleError as e:  # measured for another workload, model or space, or damaged: measure again
            why = str(e).split("; rerun", 1)[0]  # the table's own advice is what happens next
            why = why if len(why) <= 240 else why[:240] + "..."  # a fingerprint of the model can be long
            run.say(f"score: the cost table cannot be reused ({why}); timing it again")  # reviewer: it said nothing
    positions = run.parent.config.max_position_embeddings
    if w.prompt_len + w.gen_len > positions:  # reviewer: accepted without a word
        run.say(f"score: warning: the workload's prompt + generation ({w.prompt_len} + {w.gen_len} tokens) is longer "
                f"than the {positions} positions the parent was trained on; the timings are real, but such requests "
                f"are beyond what the parent (and its children) serve well")
    t0 = time.perf_counter()
    df = measure_subblock_costs(run.parent.config, attn, ffn, w, repeats=run.config.score.cost_repeats,
                                progress=run.progress, max_contention=limit)
    non_block = measure_non_block_costs(run.parent.config, w, repeats=run.config.score.cost_repeats,
                                        max_contention=limit)
    run.timed("cost_s", time.perf_counter() - t0)
    contention = max_ignoring_nan(df.attrs["contention_cores"], non_block["contention_cores"])
    save_table(df, path, {**expect, **w.meta(), "non_block": non_block, "cost_repeats": run.config.score.cost_repeats,
                          "rounds_dropped": df.attrs["rounds_dropped"] + non_block["rounds_dropped"],
                          "contention_cores": None if math.isnan(contention) else round(contention, 3),
                          **machine_record(df.attrs)})
    return df, non_block


def check_library_entries(run: Run, stages) -> None:
    """Refuse scoring before any work when the library lacks an entry of the space (every variant but the
    parent's and no_op, per stage), e.g. a run whose `puzzle bld` never ran or stopped early.

    Raises:
        PuzzleError: naming the first missing entry and how many there are.
    """
    from .library import safetensors_complete

    lib = run.library
    entries = [(ls.layer, v.id, stage) for stage in stages for ls in run.space()
               for variants in (ls.attention, ls.ffn) for v in variants[1:] if v.kind != "no_op"]
    # a cut weights file too (breaker: one scored before passed)
    missing = [e for e in entries if not (lib.info_path(*e).is_file() and safetensors_complete(lib.weights_path(*e)))]
    if missing and not any((lib.root / "entries").glob("L*/*")):  # (one of another space is a library, reviewer)
        # stop 76's leftover: a run without a library was told its entries were missing or cut
        raise PuzzleError(f"the run has no block library to score yet (no entry in {lib.root}): run `puzzle bld "
                          f"--out {shell_arg(run.out)}` first, or `puzzle run --out {shell_arg(run.out)}` for every "
                          f"stage")
    if missing:
        layer, variant, stage = missing[0]
        raise PuzzleError(f"the block library in {lib.root} lacks {len(missing)} whole "
                          f"entr{'y' if len(missing) == 1 else 'ies'} to score (e.g. layer {layer} {variant} "
                          f"({stage}): missing or cut); run `puzzle bld --out {shell_arg(run.out)}` first, which "
                          "builds them again")


def stage_score(run: Run, retime: bool = False) -> dict[str, pd.DataFrame]:
    """Quality and cost → the score tables (trained entries, and init-only entries when configured); `retime`: the
    cost table is timed again (`stage_cost`)."""
    from .coupled import add_block_rows, library_blocks

    stages = ("bld", "init") if run.config.score.score_init else ("bld",)
    if (run.out / "library" / "meta.json").is_file() or any((run.out / "library" / "entries").glob("L*/*")):
        run.library.check_meta(library_meta(run))  # a library of another parent, text or settings (or none): as bld
    check_library_entries(run, stages)  # before the cost measurement, the longest part
    used, asked = int(scoring_ids(run).numel()), int(run.config.score.tokens)
    costs, non_block = stage_cost(run, retime)
    tables, counts = {}, {}
    for stage in stages:
        quality = score_quality(run, stage)
        counts[stage] = (quality.attrs.get("scored", 0), quality.attrs.get("kept", 0))
        table = quality.merge(costs, on=["subblock", "variant"], how="left", validate="many_to_one")
        if table["runtime_ms"].isna().any():
            missing = table.loc[table["runtime_ms"].isna(), "variant"].unique()
            raise PuzzleError(f"no cost measured for variants {list(missing)}; time the cost table again: `puzzle score "
                              f"--out {shell_arg(run.out)} --retime`")
        nb = {"layer": -1, "subblock": "non_block", "variant": "non_block", "is_parent": True, "kl_nats": 0.0,
              "lm_loss": float("nan"), "top1_agree": float("nan"), "cosine": float("nan"),
              **{k: non_block[k] for k in ("prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params")}}
        table = pd.concat([table, pd.DataFrame([nb])], ignore_index=True)[SCORE_COLUMNS]
        save_table(table, score_table_path(run, stage), {**cost_meta(run), "library_stage": stage,
                                                       "score_tokens": used, "score_tokens_asked": asked})
        tables[stage] = table
    # what a rerun kept (breaker: a resumed score said only what a fresh one says, where bld says what it kept)
    kept = "; ".join(f"{stage}: {new} candidate{'s' if new != 1 else ''} scored, {old} kept from an earlier call"
                     for stage, (new, old) in counts.items()) if any(old for _, old in counts.values()) else ""
    if coupled := sum(map(len, library_blocks(run.library).values())):
        if run.config.bld.coupled_top_k:  # breaker: the coupled block rows were dropped without a word
            table, meta = load_score_table(run, "bld")
            tables["bld"] = add_block_rows(run, table, meta)
            run.say(f"score: the bld table keeps a block row for each of the library's "
                    f"{(tables['bld']['subblock'] == 'block').sum()} coupled entries (coupled BLD)")
        else:  # breaker: 0 did not switch coupled BLD off for a library that had it
            run.say(f"score: the library's {coupled} coupled entries are left out of the table (bld.coupled_top_k = "
                    f"0): the children are built from subblocks")
    layers = int(tables["bld"]["layer"].max()) + 1  # fresh user: 240 rows beside 180 scored, 120 trained, unsaid
    rows = {stage: int((t["subblock"] != "non_block").sum()) for stage, t in tables.items()}
    shown = (f"{rows['bld']} rows per table" if len(set(rows.values())) == 1 else  # breaker: the block rows uncounted
             ", ".join(f"{n} rows in the {stage} table" for stage, n in rows.items()))
    run.say(f"score: {shown} (a row per layer and variant over {layers} layers, the parent's own and no_op variants "
            f"included){f'; {kept}' if kept else ''}; tables in {run.out / 'score'}")
    if used != asked:  # breaker: 100000 asked and recorded, 512 used, unsaid
        split = run.tokens.score
        fix = (f"raise data.score_tokens to {asked} for more (more text if the sources run short)"
               if asked > split.numel() else f"give a multiple of {split.shape[1]}")
        run.say(f"score: warning: score.tokens asks {asked} tokens, and candidates are scored on whole sequences of "
                f"the scoring split ({split.shape[0]} of {split.shape[1]} tokens): on {used}; {fix}")
    return tables


# ------------------------------------------------------------------------------------------------
# search


def front_csv_damaged(out: Path) -> str | None:
    """Why DIR/front.csv is not the file DIR/front.json says it wrote (cut, edited), or None: it is, or there is no
    front.json to say (a front of an earlier version) or no front.csv. Settings changed since are not looked at
    (`_front_stale` does that)."""
    path = Path(out) / "front.csv"
    try:
        recorded = read_json(Path(out) / "front.json").get("front_csv")
    except (PuzzleError, OSError, AttributeError):
        return None
    if not path.is_file() or not isinstance(recorded, str) or sha256_file(path) == recorded:
        return None
    return f"{path} is not the file front.json was written with (cut or edited)"


def score_table_path(run: Run, stage: str = "bld") -> Path:
    return run.out / "score" / ("score_table.csv" if stage == "bld" else f"score_table_{stage}.csv")


def library_changed_since_scored(run_dir: Path) -> list[str]:
    """The library settings that differ between DIR/library/meta.json (the library now) and the library the
    replace-1-block scores were computed for (DIR/score/quality_meta.json), as "bld.tokens: 2048 -> 1024"; [] when
    they agree (resource and informational settings aside: `library.comparable_meta`) or either file is missing or
    unreadable (`puzzle bld` and `puzzle score` name those)."""
    from .library import comparable_meta

    try:
        now = json.loads((run_dir / "library" / "meta.json").read_text(encoding="utf-8"))
        scored = json.loads((run_dir / "score" / "quality_meta.json").read_text(encoding="utf-8"))["library"]
        if not (isinstance(now, dict) and isinstance(scored, dict)):
            return []
        return differing_settings(comparable_meta(scored), comparable_meta(now))
    except (OSError, ValueError, KeyError, TypeError):
        return []


def load_score_table(run: Run, stage: str = "bld") -> tuple[pd.DataFrame, dict]:
    """DIR/score/score_table[_init].csv and its sidecar, for the run's target (`check_score_target`).

    Raises:
        PuzzleError: missing, damaged or timed for another target (naming the command that times it again).
    """
    from .search import REQUIRED_COLUMNS

    path = score_table_path(run, stage)
    if not path.exists():  # breaker: "run the stage that writes it first" named no stage
        raise PuzzleError(f"{path} does not exist: score the library first (`puzzle score --out {shell_arg(run.out)}`, "
                          "after `puzzle bld`), or run the whole pipeline with `puzzle run --out "
                          f"{shell_arg(run.out)}`")
    table, meta = load_table(path, required_columns=REQUIRED_COLUMNS)  # the sidecar is required
    check_score_target(run, path, meta)
    # breaker: a hand-edited table was taken as a new score unsaid
    if edited := edited_table_note(meta, f"`puzzle score --out {shell_arg(run.out)}`"):
        warnings.warn(edited)
    n_layers = _parent_layers(run)
    layers = set(pd.to_numeric(table.loc[table["subblock"] != "non_block", "layer"], errors="coerce"))
    if layers != set(range(n_layers)):  # breaker: a 5-layer table for a 4-layer parent was searched, and realize
        odd = sorted(map(str, layers - set(range(n_layers))))  # then refused the child the search wrote again
        missing = sorted(set(range(n_layers)) - layers)
        raise PuzzleError(f"{path} does not hold layers 0 to {n_layers - 1} of the run's parent"
                          f"{' (it has layer ' + ', '.join(odd[:5]) + ')' if odd else ''}"
                          f"{' (it lacks layer ' + ', '.join(map(str, missing[:5])) + ')' if missing else ''}: "
                          f"score the library again with `puzzle score --out {shell_arg(run.out)}`")
    if changed := library_changed_since_scored(run.out):  # breaker: a rebuilt library was searched on old scores
        warnings.warn(f"the library in {run.out / 'library'} was built with other settings since {path} was scored "
                      f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): the table's scores describe "
                      f"the earlier library, while the children are built from this one; score it again with "
                      f"`puzzle score --out {shell_arg(run.out)}`")
    if not run.config.bld.coupled_top_k and (table["subblock"] == "block").any():  # breaker: `front` said it applied
        warnings.warn(f"{path} holds coupled block rows, but bld.coupled_top_k is 0 now: the search still chooses them "
                      f"and the children are built with them until `puzzle score --out {shell_arg(run.out)}` (or "
                      "`puzzle run`) scores the table again without them")
    return table, meta


def _parent_layers(run: Run) -> int:
    """The parent's number of layers: of the loaded parent, else as DIR/parent.json records it (no weights loaded
    for a search), else of the parent loaded now."""
    if run._parent is None:
        try:
            blocks = read_json(run.out / "parent.json")["config"]["blocks"]
            if isinstance(blocks, list) and blocks:
                return len(blocks)
        except (PuzzleError, OSError, ValueError, KeyError, TypeError):
            pass
    return len(run.parent.config.blocks)


#: the flag that sets each workload field of a cost table's sidecar (`cost_meta`)
TARGET_FLAGS = {"device": "--device", "dtype": "--dtype", "batch_size": "--batch-size", "prompt_len": "--prompt-len",
                "gen_len": "--gen-len"}


def check_score_target(run: Run, path: Path, meta: dict | None = None) -> None:
    """Refuse a score table timed for another target than the run's now (a flag such as `--dtype` given to `data`
    saves the new target), naming `puzzle score` to time it again and the flags that go back (breaker: `realize`
    measured in float16 against a bfloat16 table's predictions without a word, and the table check told the user to
    "request the same dtype" from commands without the flag). `meta`: the table's sidecar as `io.load_table` read
    it, else read here (`stage_realize` needs no table); a missing or unreadable one is left to `io.load_table`.

    Raises:
        PuzzleError: a workload field (`cost_meta`) differs.
    """
    try:
        meta = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8")) if meta is None else meta
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict):
        return
    differ = {k: (meta.get(k), v) for k, v in cost_meta(run).items() if meta.get(k) != v}
    if differ:
        was = ", ".join(f"{k}={old!r}" for k, (old, _) in differ.items())
        now = ", ".join(f"{k}={new!r}" for k, (_, new) in differ.items())
        back = " ".join(f"{TARGET_FLAGS[k]} {old}" for k, (old, _) in differ.items() if k in TARGET_FLAGS)
        raise PuzzleError(f"{path} was timed for {was}, but the run's target is now {now} (DIR/config.json, saved by "
                          "an earlier command's flag): time it for this target with `puzzle score --out "
                          f"{shell_arg(run.out)}` (minutes), or go back with `puzzle score --out {shell_arg(run.out)} "
                          f"{back}`")


#: how the main child's name spells each budget field (config.SEARCH_BUDGETS, BudgetRequest's fields)
BUDGET_TAGS = {"speedup": "x", "max_runtime": "rt", "max_memory": "mem", "max_prefill": "prefill",
               "max_decode": "decode", "max_params": "params", "min_throughput": "tput"}


def main_budget_request(run: Run):
    """The user's budgets for the main child (a BudgetRequest) and its name ("child-1.5x", "child-mem0.8-params60M")."""
    from .budgets import BudgetRequest

    s = run.config.search
    given = {f: getattr(s, f) for f in SEARCH_BUDGETS if getattr(s, f) not in (None, "")}
    if not given:
        raise PuzzleError("no budget given: pass --speedup S, --max-runtime F, --max-memory F, --max-prefill F, "
                          "--max-decode F, --max-params F or --min-throughput R")
    request = BudgetRequest(**{f: str(v) for f, v in given.items()})
    return request, main_child_name(given)


def main_child_name(given: dict) -> str:
    """The main child's name from its budgets ({field: value} in SEARCH_BUDGETS order): plain ASCII.

    "child-1.5x" for a speed-up alone, else each budget as its tag and the user's spelling joined by "-"
    ("child-mem0.8-params60M"). Spaces go; "/" becomes "_"; the micro sign (µ, or Greek mu in either case)
    becomes "u" and "×" becomes "x", so "400000µs" names "child-rt400000us"; any other character outside
    printable ASCII becomes "_" (a name is a file and folder name, an HF model name and a CSV cell).
    """
    if set(given) == {"speedup"}:
        return f"child-{float(given['speedup']):g}x"
    parts = [f"{float(v):g}x" if f == "speedup" else f"{BUDGET_TAGS[f]}{v}" for f, v in given.items()]
    text = "-".join(p.replace("/", "_").replace(" ", "") for p in parts)
    text = text.replace("\u00b5", "u").replace("\u03bc", "u").replace("\u039c", "u").replace("\u00d7", "x")
    return "child-" + re.sub(r"[^\x21-\x7e]", "_", text)


def front_request(run: Run, speedup: float):
    """The budget of the front's point at `speedup`: that runtime, with the run's memory and parameter budgets."""
    from .budgets import BudgetRequest

    s = run.config.search
    return BudgetRequest(speedup=str(speedup), max_memory=s.max_memory, max_params=s.max_params)


def _same_request(a, b) -> bool:
    """Whether two BudgetRequests ask for the same budgets (a speed-up compared as a number: '2' and '2.0')."""
    from .budgets import parse_speedup

    def norm(r):
        out = {}
        for f, v in dataclasses.asdict(r).items():
            if v in (None, ""):
                continue
            try:
                out[f] = parse_speedup(v) if f == "speedup" else str(v)
            except PuzzleError:
                out[f] = str(v)
        return out

    return norm(a) == norm(b)


def _solve_record(run: Run, name: str, request, stage: str, budgets=None,
                  scored: tuple[pd.DataFrame, dict] | None = None) -> dict:
    """Solve `request` (or the table limits `budgets`, when given) on the `stage` table; returns the record
    DIR/search/<name>.json holds (the callers write it once it is final: `stage_search`, `realize_and_measure`).

    `scored`: that table and its metadata as `load_score_table` returns them, when the caller holds them (else
    read here).
    """
    from .search import check_exclusions, parent_totals, solve

    table, meta = load_score_table(run, stage) if scored is None else scored
    budgets = request.resolve(parent_totals(table), meta) if budgets is None else budgets
    s = run.config.search
    if s.exclude:  # a variant the table lacks would leave nothing out, silently
        try:
            check_exclusions(table, s.exclude)
        except PuzzleError as e:  # it may come from a preset or config.json, not this command's flag
            raise PuzzleError(f"search.exclude (--exclude, a preset's [search] exclude, or saved in "
                              f"{run.out / 'config.json'}): {str(e).removeprefix('--exclude ')}; `--exclude none` "
                              f"clears the setting") from None
    solution = solve(table, budgets, s.objective, vllm_compatible=s.vllm_compatible, exclude=s.exclude)[0]
    return _record_of(run, name, request, stage, solution, table)


def _record_of(run: Run, name: str, request, stage: str, solution, table: pd.DataFrame,
               table_sha: str | None = None) -> dict:
    """The DIR/search/<name>.json record of `solution` (a search.Solution on the `stage` score table `table`, whose
    file's sha256 is `table_sha`: hashed here when not given)."""
    from .search import parent_totals

    s = run.config.search
    return {"name": name, "library_stage": stage, **solution.to_dict(), "vllm_compatible": s.vllm_compatible,
            **({"exclude": list(s.exclude)} if s.exclude else {}),  # absent when none: earlier records stay the same
            "parent": parent_totals(table), "request": {k: v for k, v in vars(request).items() if v},
            "table_sha256": table_sha or sha256_file(score_table_path(run, stage))}


FEEDBACK_MAX_CHANGES = 6  # the feedback's trust region: layers a re-solve may change around the child it corrects
#: key of a record the feedback took from its trust region (`feedback_options`): how far from the child it lay
FEEDBACK_PICK_KEY = "feedback_pick"


def feedback_options(run: Run, name: str, record: dict, budgets) -> dict[tuple, tuple[str, dict]]:
    """The children the budget feedback's re-solve of `name` chooses from under the corrected table limits
    `budgets`, {choice: (how it was found, record)}, in this order: the child itself where it meets them, the
    MIP's first child (what the re-solve took alone before), and the `[search] feedback_candidates` best within
    FEEDBACK_MAX_CHANGES layers of the child (a trust region: the child's measured / predicted ratio, which
    corrected the limits, holds best for children near it). `realize_and_measure` realizes them and keeps the
    lowest KL on the scoring split. With feedback_candidates 1, the MIP's first child only.

    Raises:
        PuzzleError: no child meets `budgets` (InfeasibleBudget; `feedback.settle` then keeps the child).
    """
    from .budgets import BudgetRequest
    from .search import solve

    s = run.config.search
    request, stage = BudgetRequest(**record["request"]), record.get("library_stage", "bld")
    scored = load_score_table(run, stage)
    first = _solve_record(run, name, request, stage, budgets=budgets, scored=scored)
    if s.feedback_candidates <= 1:
        return {tuple(first["choice"]): ("the MIP's first", first)}
    current = tuple(record["choice"])
    try:
        near = solve(scored[0], budgets, s.objective, vllm_compatible=s.vllm_compatible, exclude=s.exclude,
                     num_solutions=s.feedback_candidates, anchor=[BlockConfig.from_id(b) for b in current],
                     max_changes=FEEDBACK_MAX_CHANGES)
    except InfeasibleBudget:  # nothing that near: the MIP's first (and the child, where it fits)
        near = []
    options = {current: ("the child", record)} if budgets.met_by(record) else {}
    if tuple(first["choice"]) in options:  # the child is the MIP's first too (benchmarks/feedback_pick.py: both)
        options[current] = ("the child = the MIP's first", first)  # " = ": the log lists options with commas
    options.setdefault(tuple(first["choice"]), ("the MIP's first", first))
    table_sha = first["table_sha256"]
    for i, x in enumerate(near, 1):
        changes = sum(a != b for a, b in zip(x.choice, current))
        source = f"trust-region #{i} ({changes} layer{'s' if changes != 1 else ''} from the child)"
        if tuple(x.choice) in options:  # leftover: the log went "the MIP's first, trust-region #2", #1 unnamed
            label, known = options[tuple(x.choice)]
            options[tuple(x.choice)] = (f"{label} = trust-region #{i}", known)  # (fresh user: with ", " the
            # log's "the MIP's first, trust-region #1 3.850" read as two options)
            continue
        # the 2nd and later solutions are optimal only given the earlier ones, in the trust region: no claim of
        # optimality or a bound for the budget (breaker: "optimal" with a summed KL above the MIP's first)
        options.setdefault(tuple(x.choice), (source, {**_record_of(run, name, request, stage, x, scored[0], table_sha),
                                                      "optimal": False, "bound": None, FEEDBACK_PICK_KEY: source}))
    return options


def realized_options(run: Run, options: dict[tuple, tuple[str, dict]], built: dict | None = None):
    """Each of `feedback_options`' options realized and scored, one at a time: yields (choice, how it was found,
    record, child model, KL(parent || child) in nats/token on the scoring split's first 2048 tokens
    (`refine.selection_kl`)). `built` ({(choice, library stage): model}): models already realized, used as they are."""
    from .refine import selection_kl

    for key, (source, rec) in options.items():
        stage = rec.get("library_stage", "bld")
        model = built[(key, stage)] if built is not None and (key, stage) in built else build_child(run, rec)
        yield key, source, rec, model, selection_kl(run, model)


def settled_record(run: Run, name: str, request, stage: str) -> dict | None:
    """DIR/search/<name>.json when the budget feedback settled it and a new solve would start over.

    The feedback (realize_and_measure) re-solves a child under table limits corrected by its
    measured speed and rewrites the record with its `budget_feedback` history and `solved_choice`,
    the child the plain solve gave. A plain solve of the same request would undo that correction,
    so a record whose child differs from `solved_choice` is kept when it was solved on the same
    library stage, request, objective, vLLM setting and exclusions, on a score table with the same bytes
    (`table_sha256`), and passes the solver-independent check against that table (search.verify) and,
    with --vllm-compatible, that setting's layer rules (`mip.vllm_unservable`); otherwise None (solve
    again, as for every record before `solved_choice` existed).
    """
    from .mip import vllm_unservable
    from .search import Solution, parse_objective, uses_excluded, verify

    path = run.out / "search" / f"{name}.json"
    if not path.is_file():
        return None
    s = run.config.search
    try:
        record = read_json(path)
    except PuzzleError:  # damaged: say so, as the solve rewrites it (and any budget-feedback history it held)
        warnings.warn(f"{path} is not valid JSON; solving {name!r} afresh, which rewrites it", stacklevel=2)
        return None
    try:
        if not re_solved(record):
            return None  # never settled (or written before `solved_choice`), or the feedback kept the solve's child
        same = (record.get("library_stage", "bld") == stage
                and record.get("request") == {k: v for k, v in vars(request).items() if v}
                and dict(record.get("objective_weights") or {}) == parse_objective(s.objective)
                and bool(record.get("vllm_compatible", False)) == s.vllm_compatible
                and list(record.get("exclude") or []) == list(s.exclude)
                and record.get("table_sha256") == sha256_file(score_table_path(run, stage)))
        if not same:
            return None
        solution = Solution.from_dict(record)
        verify(solution, load_score_table(run, stage)[0])  # a hand-edited or stale record: solve
        if s.vllm_compatible and any(vllm_unservable(i, b) for i, b in enumerate(solution.blocks)):
            return None  # settled before the layer-0 rule of --vllm-compatible (verify does not check it): solve
        if uses_excluded(solution.blocks, s.exclude):
            return None  # a hand-edited record: solve
        if not all(isinstance(record.get(k), (int, float)) for k in ("speedup", "kl_nats", "runtime_ms")):
            return None
    except (PuzzleError, ValueError, TypeError, AttributeError, KeyError, IndexError, UnicodeDecodeError):
        return None  # unreadable, hand-edited or failing verification (VerificationError): solve again
    return record


def check_objective_names(run: Run) -> None:
    """Refuse a search.objective naming a column the run's score tables will not have (`SCORE_COLUMNS`), before any
    stage runs; `check_objective_columns` checks the table itself once it exists.

    Raises:
        PuzzleError: as `check_objective_columns`, or an objective that does not parse.
    """
    known = [c for c in SCORE_COLUMNS if c not in ("layer", "subblock", "variant", "is_parent")]
    _refuse_objective_outside(run, known, f"a preset's [search] objective, or saved in {run.out / 'config.json'}",
                              f"not columns of the score tables ({known}); set kl_nats, lm_loss, cosine or a weighted "
                              f"sum such as 'kl_nats=1,lm_loss=0.5' there (or, once the run has scores, with "
                              f"`puzzle search --out {shell_arg(run.out)} --objective ...`)")


def check_exclusion_names(run: Run) -> None:
    """Refuse a search.exclude naming a variant the run's search space does not offer (an attention or FFN variant of
    no layer, or a block joining two), before any stage runs; the search checks the score table itself
    (`search.check_exclusions`). Also builds the space, which refuses one the parent cannot take.

    Raises:
        PuzzleError: as above, naming the setting, where it is saved and the variants there are.
    """
    space = run.space()
    if not run.config.search.exclude:
        return
    attention = {a.id for layer in space for a in layer.attention}
    ffn = {f.id for layer in space for f in layer.ffn}

    def offered(v: str) -> bool:
        if v in attention or v in ffn:
            return True
        a, _, f = v.partition("+")
        return a in attention and f in ffn

    unknown = [v for v in run.config.search.exclude if not offered(v)]
    if unknown:
        raise PuzzleError(f"search.exclude (--exclude, a preset's [search] exclude, or saved in "
                          f"{run.out / 'config.json'}) names {unknown[0]!r}, which this run's search space does not "
                          f"have; its variants: {', '.join(sorted(attention | ffn))} (or a block joining an attention "
                          f"and an FFN id with '+'); `--exclude none` clears the setting")


def check_objective_columns(run: Run, table: pd.DataFrame) -> None:
    """Refuse the run's search.objective when it names a column the score table lacks, naming the setting, its file
    and the flag that sets another (`puzzle run` has none: the objective is a search setting).

    Raises:
        PuzzleError: as above.
    """
    numeric = {c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])}
    _refuse_objective_outside(run, numeric, f"--objective, or saved in {run.out / 'config.json'}",
                              f"not numeric columns of the score table; `puzzle search --out {shell_arg(run.out)} "
                              "--objective kl_nats` (or lm_loss, cosine, a weighted sum such as "
                              "'kl_nats=1,lm_loss=0.5') sets another")


def _refuse_objective_outside(run: Run, columns, where: str, why: str) -> None:
    """PuzzleError when the run's search.objective names a column outside `columns`: "search.objective X (`where`)
    names [...], `why`"."""
    from .search import parse_objective

    unknown = [c for c in parse_objective(run.config.search.objective) if c not in columns]
    if unknown:
        raise PuzzleError(f"search.objective {run.config.search.objective!r} ({where}) names {unknown}, {why}")


def stage_search(run: Run, json_out: bool = False, alone: bool = False) -> dict[str, dict]:
    """Solve the main budget (on trained and, when scored, on init-only entries) and the front sweep.

    Records the budget feedback settled are kept (`settled_record`). Every solve finishes before
    anything is written, so a budget that fails leaves DIR/search/ as it was. Writes
    DIR/search/<name>.json per architecture and DIR/search/chosen.json, and brings the section of an
    existing DIR/report.md on front targets out of reach up to date (`update_report_front`); returns
    {name: record}. `alone`: `puzzle search` by itself, which then names the exports it left out of date.
    """
    t0 = time.perf_counter()
    request, main = main_budget_request(run)
    kept: list[str] = []
    tables: dict[str, tuple[pd.DataFrame, dict]] = {}  # stage -> its score table, read once for every solve

    def scored(stage):
        if stage not in tables:
            tables[stage] = load_score_table(run, stage)
            check_objective_columns(run, tables[stage][0])
        return tables[stage]

    def solve_or_keep(name, req, stage):
        record = settled_record(run, name, req, stage)
        if record is None:
            return _solve_record(run, name, req, stage, scored=scored(stage))
        kept.append(name)
        return record

    try:
        records = {main: solve_or_keep(main, request, "bld")}
    except InfeasibleBudget as e:  # the main budget out of reach: a cost table timed on a busy machine may be why
        from .search import throughput_hint

        t = run.config.target
        if hint := throughput_hint(e, request.min_throughput, {"batch_size": t.batch_size, "gen_len": t.gen_len}):
            e = InfeasibleBudget(f"{e}{hint}", e.least)
        note = contention_note({"cost_table": recorded_contention(_cost_sidecar(run.out))})
        retime = (f"if the cost table was timed while the machine was busy or throttled (its timings then run high), "
                  f"time it again: `puzzle score --out {shell_arg(run.out)} --retime`")
        if not any(w in str(e) for w in ("runtime", "prefill", "decode", "throughput")):  # memory, parameters:
            raise e from None  # computed, not timed (reviewer: the timing's contention was noted beside them)
        if share := spoiled_non_block_share(scored("bld")[0]):  # breaker: timed at 160 ms for 1.3
            raise InfeasibleBudget(
                f"the cost table times the embedding and LM head at {share:.0%} of the parent's "
                "runtime, which leaves no child much to save: most likely a busy or throttled "
                "machine spoiled that timing, so time it again first (`puzzle score --out "
                f"{shell_arg(run.out)} --retime`, then this command again); as the table stands, {e}",
                e.least) from None  # (a breaker following the suggestions had to guess the second step)
        raise InfeasibleBudget(f"{e} (note: {note}; {retime})" if note else f"{e} ({retime})", e.least) from None
    if run.config.score.score_init and score_table_path(run, "init").is_file():
        records[f"{main}-init"] = solve_or_keep(f"{main}-init", request, "init")
    missed: dict[str, str] = {}  # front target -> why no child meets it
    for s in run.config.search.front_speedups:
        name, req = f"child-{s:g}x", front_request(run, s)
        if name in records or _same_request(req, request):
            continue  # the main child is this point (reviewer: solved twice, the two drifted apart under feedback)
        try:
            records[name] = solve_or_keep(name, req, "bld")
        except PuzzleError as e:
            missed[f"{s:g}"] = str(e)
    chosen = {"main": main, "names": list(records)}
    if missed:  # the front keeps the points it reaches, and says which it does not
        chosen["unreachable_front"] = {"targets": list(missed), "reasons": missed,
                                       "largest_speedup": largest_front_speedup(run, tables.get("bld"))}
        if len(missed) == len(run.config.search.front_speedups):  # breaker: --front-speedups 50 was saved, and the
            # measured front lost its points, where --speedup 50 is refused with the run as it was
            every = unreachable_front_message(chosen["unreachable_front"]).replace(" and left out of the front", "")
            raise InfeasibleBudget(f"{every}; as no front target is in reach, nothing was written and the run is as "
                                   f"it was (--front-speedups sets the targets)")
        run.say(f"search: warning: {unreachable_front_message(chosen['unreachable_front'])}")
    for name, record in list(records.items()):
        if name in kept:
            continue
        if (same := _same_solve(run.out / "search" / f"{name}.json", record)) is not None:
            records[name] = same  # the file as it is: its feedback history (solved_choice, budget_feedback) stays
            continue
        atomic_write_json(run.out / "search" / f"{name}.json", record)
    run.timed("search_s", time.perf_counter() - t0)
    # the choices and the configuration go together: a later failure keeps both (cli._stage_run), one before this
    # leaves both as they were (breaker: an interrupt left config.json at 3x beside the 1.5x choices)
    with signals_deferred():
        atomic_write_json(run.out / "search" / "chosen.json", chosen)
        run.settled = True
    update_report_front(run)  # a report written before names the targets out of reach as they are now
    if earlier := earlier_children(run.out, records):  # reviewer: left beside the current ones without a word
        run.say(f"search: {', '.join(earlier)} {'is a child' if len(earlier) == 1 else 'are children'} of an earlier "
                f"budget, not among this run's children now ({', '.join(records)}); {'its' if len(earlier) == 1 else 'their'}"
                f" files (search/, children/, export/) stay as they were: delete them where they are not wanted")
    if kept:
        # "re-solved" though that run's log may have said it kept the MIP's first: the first under corrected limits
        run.say(f"search: kept {', '.join(kept)}: an earlier session's budget feedback re-solved "
                f"{'it' if len(kept) == 1 else 'them'} under table limits corrected by measured speed (same budget, "
                "objective and tables); to solve afresh, delete "
                + ", ".join(f"{n}.json" for n in kept) + f" in {run.out / 'search'}")  # fresh user: "a and b and c"
    if alone:  # breaker: a search left the exports of its children's earlier choices without a word
        say_earlier_exports(run, "search")
    for name, r in records.items():
        how = (f"picked by the budget feedback's realized KL ({r[FEEDBACK_PICK_KEY]}), not the MIP's optimum"
               if isinstance(r.get(FEEDBACK_PICK_KEY), str) else
               f"{'optimal' if r['optimal'] else 'not proven optimal'} in {r['solve_s']:.2f} s")
        run.say(f"search: {name}: predicted speed-up {r['speedup']:.2f}x, summed KL {r['kl_nats']:.4g} nats, {how}"
                + (" (kept)" if name in kept else ""))
        if name not in kept:
            run.printed_solves.add(name)
        if r.get("kl_nats") == 0 and math.isclose(r.get("speedup", 0), 1.0, rel_tol=1e-9):  # breaker: unsaid
            from .budgets import Budgets

            # a breaker: after --max-memory 8MB (above the parent's) it asked "a --speedup at or below 1?"
            held = Budgets.from_dict(r.get("budgets") or {}).describe()
            held = "it has no budget" if held == "no budget" else f"its budgets ({held}) hold for the parent"
            run.say(f"search: note: {name} is the parent itself: {held}, so the search keeps it (KL 0); tighten "
                    f"them for a smaller or faster child")
    same_child: dict[tuple, list[str]] = {}  # breaker: targets a tighter budget collapses into one child, unsaid
    for name, r in records.items():
        same_child.setdefault((tuple(r["choice"]), r.get("library_stage", "bld")), []).append(name)
    for names in (n for n in same_child.values() if len(n) > 1):
        run.say(f"search: {', '.join(names[:-1])} and {names[-1]} are one child (the same blocks, predicted "
                f"{records[names[0]]['speedup']:.2f}x): front.csv has a row per target, the plot one point (a budget "
                f"they share, such as memory or parameters, may bind before their speed-up targets)")
    if json_out:
        print(json.dumps(records[main]))
    return records


def _same_solve(path: Path, record: dict) -> dict | None:
    """The record in `path` when a new solve (`record`) gave the same child from the same request, table and settings
    (every field of the new record but its solve time equal), so a rerun leaves the file byte for byte, with the
    fields the budget feedback added; else None."""
    try:
        old = read_json(path) if path.is_file() else None
    except PuzzleError:
        return None
    if not isinstance(old, dict):
        return None
    keys = [k for k in record if k not in ("solve_s", "exclude")]

    def plain(d):  # "exclude" always: a record kept from an excluding search is not the same once it is cleared
        return json.loads(json.dumps({**{k: d.get(k) for k in keys}, "exclude": d.get("exclude") or []}, default=str))

    return old if plain(old) == plain(record) else None


def largest_front_speedup(run: Run, scored: tuple[pd.DataFrame, dict] | None = None) -> float | None:
    """The largest predicted speed-up a front point can have: that of the fastest child of the trained
    table under the front's memory and parameter budgets and the run's vLLM setting and exclusions (a MIP that minimises
    runtime_ms); None when no child meets those budgets (or the table cannot be read).

    `scored`: the trained table and its metadata as `load_score_table(run, "bld")` returns them, when the
    caller holds them (`stage_search` does); read from DIR/score when None."""
    from .budgets import BudgetRequest
    from .search import parent_totals, solve

    s = run.config.search
    try:
        table, meta = load_score_table(run, "bld") if scored is None else scored
        budgets = BudgetRequest(max_memory=s.max_memory, max_params=s.max_params).resolve(parent_totals(table), meta)
        return float(solve(table, budgets, "runtime_ms", vllm_compatible=s.vllm_compatible,
                           exclude=s.exclude)[0].speedup)
    except PuzzleError:
        return None


def unreachable_front_message(missed: dict) -> str:
    """One line on the front targets no child reached (DIR/search/chosen.json's `unreachable_front`)."""
    targets = ", ".join(f"{t}x" for t in missed["targets"])
    many = len(missed["targets"]) > 1
    head = f"front target{'s' if many else ''} {targets} {'are' if many else 'is'} out of reach and left out of the front"
    largest = missed.get("largest_speedup")
    if isinstance(largest, (int, float)) and math.isfinite(largest):
        return (f"{head}: the largest speed-up a child of this library reaches under the front's budgets is "
                f"{math.floor(largest * 100) / 100:g}x (predicted); ask for at most that")
    return f"{head}: {next(iter(missed['reasons'].values()))}"


def read_architecture(run: Run, name: str) -> dict:
    """DIR/search/<name>.json, checked (`read_architecture_at`) and fitted to the run: one block per parent layer,
    each subblock the parent's, a no_op, in the run's space or in its library (a space narrowed since the search).

    Warns (UserWarning) when the record was solved on another score table than the run's (`table_sha256`).

    Raises:
        PuzzleError: naming the file and the layer, for a record edited by hand or written for another parent; on
            the table it was solved on, a choice that disagrees with its rows or predicted totals
            (`_check_against_table`).
    """
    record = read_architecture_at(run.out, name)
    path = run.out / "search" / f"{name}.json"
    space, stage = run.space(), record.get("library_stage", "bld")
    if len(record["choice"]) != len(space):
        raise PuzzleError(f"{path} chooses {len(record['choice'])} blocks for a parent of {len(space)} layers; delete "
                          f"the file and run `puzzle search` again")
    for ls, block in zip(space, record["choice"]):
        block = BlockConfig.from_id(block)
        for variant, offered in ((block.attention, ls.attention), (block.ffn, ls.ffn)):
            if variant.kind == "no_op" or variant.id in {v.id for v in offered} \
                    or run.library.has(ls.layer, variant.id, stage):
                continue
            raise PuzzleError(f"{path}: layer {ls.layer} chooses {variant.id}, which is neither in the run's space "
                              f"(there: {', '.join(v.id for v in offered)}) nor in its library; the file was edited "
                              f"or written for another run: delete it and run `puzzle search` again")
    table = score_table_path(run, stage)
    if not isinstance(record.get("table_sha256"), str):  # written by hand: its predictions are the table's now
        return _with_table_totals(run, path, record, stage) if table.is_file() else record
    if not table.is_file():
        return record
    if record["table_sha256"] == (table_sha := sha256_file(table)):
        if "rows" in record:  # a search's record (refine's are given by their choice alone)
            _check_against_table(run, path, record, stage)
        else:
            record = _with_table_totals(run, path, record, stage)
    elif table_changed_since_written(table):  # breaker: a cut table was said to be "scored again since"
        if (said := (str(table), table_sha)) not in _CUT_TABLES_SAID:  # once, not once per child (breaker)
            _CUT_TABLES_SAID.add(said)
            warnings.warn(f"{table} was cut or edited since `puzzle score` wrote it (its bytes differ from the sha256 "
                          f"its sidecar recorded): `puzzle score --out {shell_arg(run.out)}` writes it afresh; "
                          f"{path.name}'s predicted totals, and any other searched child's, are those of the table it "
                          f"was solved on")
    else:
        warnings.warn(f"{path} was solved on another score table than {table} holds now (scored again since, or a "
                      f"search record of an earlier front): its predicted totals are the old table's; `puzzle search` "
                      f"or `puzzle front` with its target solves it on the current table")
    return record


#: (table path, its sha256) whose cut or edit `read_architecture` has said in this process
_CUT_TABLES_SAID: set[tuple[str, str]] = set()

#: the predicted totals a record without table rows is checked on (`_with_table_totals`)
_CHECKED_TOTALS = ("runtime_ms", "kl_nats")


def _with_table_totals(run: Run, path: Path, record: dict, stage: str) -> dict:
    """A record of a choice without table rows (written by hand, refine's, or edited and its rows dropped) with its
    predicted totals on the run's score table: all of them the table's where runtime_ms or kl_nats is missing
    (breaker: a choice alone was evaluated and timed, then realize ended in a KeyError), else those two checked and
    any other missing total filled in (breaker: an edited choice kept child-2x's 2.44x beside a measured 8.58x).

    Raises:
        PuzzleError: a given runtime_ms or kl_nats more than 1e-6 (relative) off the choice's on the table."""
    from .budgets import Budgets
    from .refine import record_for

    try:
        fresh = record_for(run, path.stem, record["choice"], stage, Budgets(), record.get("method"))
    except (PuzzleError, KeyError, ValueError):  # no table to read, or a choice it lacks: the stage that reads says
        return record
    for key in _CHECKED_TOTALS:
        given, table_value = record.get(key), fresh.get(key)
        if isinstance(given, (int, float)) and isinstance(table_value, (int, float)) \
                and not math.isclose(given, table_value, rel_tol=1e-6, abs_tol=1e-9):
            raise PuzzleError(f"{path}: its {key} {given:.6g} is not its choice's on the run's score table "
                              f"({table_value:.6g}): the file was edited; delete its predicted totals (runtime_ms, "
                              f"speedup, kl_nats, ...) to have them taken from the table, or delete the file and run "
                              f"`puzzle search` again")
    totals = {k: v for k, v in fresh.items() if k not in ("name", "method", "budgets", "choice", "library_stage")}
    if all(isinstance(record.get(key), (int, float)) for key in _CHECKED_TOTALS):
        return {**totals, **record}
    return {**record, **totals}


def _check_against_table(run: Run, path: Path, record: dict, stage: str) -> None:
    """Refuse a search record whose choice, table rows and predicted totals disagree on the score table it was
    solved on (`search.verify`, budgets aside: the budget feedback may loosen a child past them). Breaker: an edited
    choice was realized and exported beside the old choice's predictions, and the measured speed-up's miss was put
    down to a busy machine."""
    from .budgets import Budgets
    from .search import Solution, VerificationError, verify

    try:
        table = load_score_table(run, stage)[0]
    except PuzzleError:  # the stage that reads the table says why
        return
    try:
        verify(Solution.from_dict(record), table, Budgets())
    except (VerificationError, ArchitectureError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise PuzzleError(f"{path}: its choice, table rows and predicted totals disagree on the score table it was "
                          f"solved on ({e}): the file was edited; delete it and run `puzzle search` again") from None


def read_architecture_at(out: Path, name: str) -> dict:
    """The searched architecture `name` of the run directory `out` (out/search/<name>.json).

    Raises:
        PuzzleError: a name that is not a record's (a path, "chosen", too long), a missing or
            unreadable file, or a record whose choice, library_stage or budgets are malformed; the
            message lists the names there are.
    """
    out = Path(out)
    # every record of search/ (breaker: a hand-written or baseline name was read but not listed), not its sweep file
    have = sorted(p.stem for p in (out / "search").glob("*.json") if p.stem != "chosen") \
        if (out / "search").is_dir() else []

    def hint() -> str:  # on the error paths alone (reviewer: chosen.json was read on every successful read too)
        if (now := [n for n in searched_names(out) or [] if n in have]) and len(now) < len(have):
            # breaker: children of an earlier --front-speedups were offered as the run's own
            return (f"choose one of the run's searched children {now} (the others there, "
                    f"{[n for n in have if n not in now]}, are records of an earlier search or written by refine, "
                    f"baselines or by hand)")
        return f"choose one of {have}" if have else f"run `puzzle search --out {shell_arg(out)}` first"

    if not name or len(name) > 200 or name == "chosen" or Path(name).name != name:  # before any file call
        raise PuzzleError(f"no architecture named {name[:60]!r} in {out / 'search'}; {hint()}")
    path = out / "search" / f"{name}.json"
    if not path.is_file():
        from .export import is_export_folder

        # breaker: `puzzle eval DIR --child child-2x-fused` was told only of the searched names
        folder = out / "export" / name
        export = (f"; {folder} is an exported model of this run (a fused or trained child has no search record), "
                  f"which `puzzle eval` and `puzzle generate` read as a model folder: `puzzle eval {shell_arg(folder)}`"
                  if is_export_folder(folder) else "")
        raise PuzzleError(f"no architecture named {name!r} in {out / 'search'}"
                          f"{' (that path is not a file)' if path.exists() else ''}; {hint()}{export}")
    try:
        record = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{path} is not valid JSON ({e}); delete it and run `puzzle search` again") from e
    if not isinstance(record, dict) or not isinstance(record.get("choice"), list):  # breaker: the hint named it
        raise PuzzleError(f"{path} is not an architecture record (no 'choice' list); delete it and run `puzzle "
                          f"search` again" + (f", or choose another of {others}" if (others := [h for h in have
                                                                                      if h != name]) else ""))
    for i, block in enumerate(record["choice"]):
        try:
            BlockConfig.from_id(block)
        except (ArchitectureError, AttributeError, TypeError, ValueError):
            raise PuzzleError(f"{path}: choice[{i}] = {block!r} is not a block id like 'attn-kv1+ffn-768'; "
                              f"delete the file and run `puzzle search` again") from None
    if record.get("library_stage", "bld") not in ("bld", "init"):
        raise PuzzleError(f"{path}: library_stage {record.get('library_stage')!r} must be 'bld' or 'init'; "
                          f"delete the file and run `puzzle search` again")
    if "budgets" in record and not isinstance(record["budgets"], dict):
        raise PuzzleError(f"{path}: budgets must be an object; delete the file and run `puzzle search` again")
    for key in ("runtime_ms", "speedup", "kl_nats"):  # the predictions realize and the report set beside measurements
        value = record.get(key)  # breaker: "abc" or null ended in a traceback after the child was evaluated and timed
        if key not in record:  # a hand-made record of a choice alone (tests, tools)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (key != "kl_nats" and value <= 0):
            raise PuzzleError(f"{path}: {key} = {value!r} is not a {'positive ' if key != 'kl_nats' else ''}finite "
                              f"number (a predicted total of its choice); delete the file and run `puzzle search` "
                              f"again")
    return record


# ------------------------------------------------------------------------------------------------
# realize, evaluate, measure, export


def build_child(run: Run, record: dict, stage: str | None = None):
    """The child of a search record (`read_architecture`) as a PuzzleForCausalLM, at `stage` (default the record's
    library stage), with the coupled entries of the block rows it chose (`coupled_blocks`)."""
    from .realize import realize_child

    blocks = [BlockConfig.from_id(b) for b in record["choice"]]
    solved_on = record.get("library_stage", "bld")
    stage = stage or solved_on
    coupled = coupled_blocks(run, blocks, solved_on, record.get("method", "mip"), record) if stage == "bld" else ()
    return realize_child(run.parent.model, run.library, blocks, stage, coupled=coupled)


#: the methods whose children are chosen on the run's score table, block rows included: their layers take the
#: coupled entries of the blocks they chose (`coupled_blocks`); the other baselines and refine's children (chosen
#: on a decoupled table: refine refuses block rows) are built from subblocks
TABLE_CHOSEN_METHODS = ("mip", "greedy")


def coupled_blocks(run: Run, blocks, stage: str, method: str = "mip",
                   record: dict | None = None) -> frozenset[tuple[int, str]]:
    """`coupled_blocks_at` of the run's directory."""
    return coupled_blocks_at(run.out, blocks, stage, method, record)


def coupled_blocks_at(out: Path, blocks, stage: str, method: str = "mip",
                      record: dict | None = None) -> frozenset[tuple[int, str]]:
    """(layer, block id) of `blocks` that the run's bld score table holds as a block row (`coupled.add_block_rows`)
    for a child of a TABLE_CHOSEN_METHODS method solved at the "bld" stage: the layers `realize_child` builds from
    their coupled entries, as the search weighed them. Empty otherwise, when the table cannot be read, or for a
    search `record` solved on another table than the run's now (reviewer: its block rows are not the table's; a
    record without table_sha256, written by hand, is taken on the table as it is)."""
    if stage != "bld" or method not in TABLE_CHOSEN_METHODS:
        return frozenset()
    path = Path(out) / "score" / "score_table.csv"  # score_table_path's, without a Run (puzzle eval --child)
    try:
        solved_on = record.get("table_sha256") if record is not None else None
        if isinstance(solved_on, str) and solved_on != sha256_file(path):
            return frozenset()
        table = pd.read_csv(path, usecols=["layer", "subblock", "variant"])
    except (OSError, ValueError, pd.errors.ParserError):
        return frozenset()
    rows = table[table["subblock"] == "block"]
    have = set(zip(rows["layer"].astype(int), rows["variant"].astype(str)))
    return frozenset((i, b.id) for i, b in enumerate(blocks) if (i, b.id) in have)


_EVAL_LOGP: dict = {}


def parent_eval_logprobs(run: Run) -> torch.Tensor:
    """Parent log-probabilities on the evaluation split (computed once per process and evaluation split)."""
    from .scoring.quality import parent_logprobs

    key = (str(run.out), run.parent_fingerprint, _tensor_sha(run.tokens.eval), run.config.score.chunk)
    if key not in _EVAL_LOGP:
        _EVAL_LOGP.clear()
        _EVAL_LOGP[key] = parent_logprobs(run.parent.model, run.tokens.eval, chunk=run.config.score.chunk)
    return _EVAL_LOGP[key]


def evaluate(run: Run, model, name: str) -> dict:
    """Evaluation KL to the parent and LM loss on the evaluation split (cached in DIR/children/<name>.quality.json,
    keyed by the architecture, every weight, the parent and the evaluation tokens)."""
    from .distill import model_fingerprint
    from .scoring.quality import evaluate_model

    path = run.out / "children" / f"{name}.quality.json"
    # every weight: a child rebuilt from another library stage or a rebuilt library has the same config and norms
    key = {"architecture": [b.id for b in model.config.blocks], "weights": model_fingerprint(model),
           "parent": run.parent_fingerprint, "eval_sha": _tensor_sha(run.tokens.eval)}
    if path.is_file():
        try:
            cached = read_json(path)
            metrics = cached["metrics"]
            if all(cached.get(k) == v for k, v in key.items()) and isinstance(metrics, dict) and all(
                    isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
                    for k in ("kl_nats", "lm_loss")):
                return metrics
        except (PuzzleError, AttributeError, KeyError, TypeError):
            pass  # unreadable or hand-edited (another JSON value than an object included): evaluate again
    t0 = time.perf_counter()
    metrics = evaluate_model(model, run.tokens.eval, parent_eval_logprobs(run), chunk=run.config.score.chunk)
    atomic_write_json(path, {**key, "metrics": metrics})
    run.timed("evaluate_s", time.perf_counter() - t0)
    return metrics


def chat_answers(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """Greedy answers of `model` to each user prompt, rendered with the tokenizer's chat template."""
    from .sft import greedy_chat

    return [greedy_chat(model, tokenizer, [{"role": "user", "content": p}], max_new_tokens).strip() for p in prompts]


def stage_export(run: Run, name: str, dest: Path | None = None, model=None, untie: bool = False,
                 dtype: str | None = None):
    """Write child `name` as an HF folder (nemotron-nas) under DIR/export/<name> (or `dest`), recording the run's own
    export in DIR/children/exports.json (`record_export`). `untie`: store a tied LM head as its own tensor
    (`export_checkpoint(untie_embeddings=True)`); `dtype`: the stored weights' dtype name (None: the run's, `[parent]
    dtype`).

    Raises:
        PuzzleError: as `check_export_target` and `check_run_dest`; or the run's own export folder holds a file its
            export did not write (a user's file, never deleted).
    """
    from .export import TRAINED_KEYS, check_export_target, export_checkpoint, export_info, export_provenance, run_ref

    record = read_architecture(run, name)
    if dest is not None:
        dest = Path(dest).expanduser()
        check_run_dest(run.out, dest, name)
    dest = dest or run.out / "export" / name
    # the run as seen from dest (a moved run keeps its exports' provenance); earlier versions recorded it resolved,
    # and an untrained export of this name inside the run's own folder is this run's, wherever the run lay then
    also_same = [export_provenance({"name": name, "run": str(run.out.resolve())})]
    earlier = export_info(dest)
    if earlier and earlier.get("fused_from") and Path(dest).resolve() == (run.out / "export" / name).resolve():
        raise PuzzleError(f"{dest} holds the fused child of {earlier['fused_from']} (`puzzle fuse`), whose name the "
                          f"child {name} has too: give this one --dest, or rename it")
    inside = run.out.resolve() in Path(dest).resolve().parents
    if inside and earlier and earlier.get("name") == name and not any(k in earlier for k in TRAINED_KEYS) \
            and earlier.get("stage") != "rpo":
        also_same.append(export_provenance(earlier))
    own = Path(dest).resolve() == (run.out / "export" / name).resolve()
    own_export = own and _own_export_with_its_weights(run, name)  # rewritten even with a damaged config.json
    # (a link is left to `check_export_target`'s refusal, not told to empty the folder it points to)
    written = _recorded_export_files(run, name) if own and Path(dest).is_dir() and not Path(dest).is_symlink() else None
    if written is not None and (extra := sorted(f.name for f in Path(dest).iterdir() if f.name not in written)):
        raise PuzzleError(f"{dest} holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, which its export "
                          f"did not write (DIR/{EXPORT_STAMPS}); move {'it' if len(extra) == 1 else 'them'} out of "
                          f"the folder, which exporting again replaces")
    check_export_target(dest, overwrite=True, keep=run.input_paths(),  # before building
                        provenance=export_provenance({"name": name, "run": run_ref(run.out, dest)}),
                        also_same=also_same, own=own_export)
    model = model if model is not None else build_child(run, record)
    t0 = time.perf_counter()
    if own:  # while the folder is rewritten its record is void: an interruption leaves no stale file list behind
        record_export(run, name, None)
    result = export_checkpoint(model, run.parent.tokenizer, dest, overwrite=True, also_same=also_same, own=own_export,
                               extra_info=export_extra_info(run, name, record, dest), untie_embeddings=untie,
                               dtype=dtype)
    if own:  # the run's own export: what `export_out_of_date` compares with
        record_export(run, name, model)
    run.timed("export_s", time.perf_counter() - t0)
    run.say_export_warnings(name, result.warnings)
    if result.replaced:  # an earlier run recorded relative to the folder is named as a path (`shown_provenance`)
        run.say(f"export {name}: replaced the export of {result.replaced} that was in {result.path}")
    return result


def check_run_dest(run_dir: Path, dest, name: str | None = None, flag: str = "--dest",
                   label: str | None = None) -> None:
    """Refuse a `dest` inside the run `run_dir` (or inside another run directory, checked as its own, with `name`
    None) that the run's own stages write: anything but a folder DIR/export/<x> (DIR/export itself,
    DIR/children/realized, ...), and DIR/export/<x> where x names one of the run's own models
    other than `name`, the model being exported (None: a trained model, which may take none of them): a searched
    or refined child (DIR/search/<x>.json, chosen.json's names), a recorded export (DIR/children/exports.json), a
    baseline (DIR/baselines/rows/<x>.json) or a fused child (<child>-fused for DIR/fusion/<child>.json). `puzzle
    run`, `export`, `baselines` and `fuse` write those folders, and a model of another provenance there would be
    described as theirs or block them. `label`: with `name` None, the refusal suggests DIR/export/<x>-<label>
    (for a command whose `flag` has no default next to the run's models).

    Raises:
        PuzzleError: naming the folder and what to give instead.
    """
    run_dir = Path(run_dir)
    target, out = Path(dest).expanduser().resolve(), run_dir.resolve()
    if out not in target.parents:
        from .config import read_run_config_json

        for folder in target.parents:  # breaker: another run's fused export was replaced, its front then refused
            if (folder / "config.json").is_file():
                try:
                    read_run_config_json(folder)
                except PuzzleError:
                    continue
                check_run_dest(folder, dest, None, flag)  # its models are not the one exported here
                return
        return
    if target.parent != (out / "export"):
        raise PuzzleError(f"{flag} {dest} is inside the run {run_dir}; there, only a folder DIR/export/<name> takes "
                          f"a model (the others are the stages'): give one such as "
                          f"{run_dir / 'export' / (name or 'mine')}, or a folder outside the run")
    taken = {p.stem for sub in ("search", "baselines/rows") for p in (run_dir / sub).glob("*.json")} - {"chosen"}
    taken |= set(searched_names(run_dir) or [])
    try:
        taken |= {str(n) for n in read_json(run_dir / EXPORT_STAMPS)}
    except (PuzzleError, OSError, ValueError, TypeError):
        pass
    fused = {p.name.removesuffix(".json") + "-fused" for p in (run_dir / "fusion").glob("*.json")
             if not p.name.endswith((".runs.json", ".earlier.json"))}  # `puzzle fuse`'s records: <child>.json
    if target.name in (taken | fused) - {name}:
        baseline = (run_dir / "baselines" / "rows" / f"{target.name}.json").is_file() and not \
            (run_dir / "search" / f"{target.name}.json").is_file()  # reviewer: named run and export for a baseline
        writer = "of the run's baseline {}, which `puzzle baselines` rewrites" if baseline else \
            "of the run's child {}, which `puzzle run` and `puzzle export` rewrite"
        if target.name in fused - taken:
            writer = "of the run's fused child {}, which `puzzle fuse` rewrites"
        raise PuzzleError(f"{flag} {dest} is the export folder {writer.format(target.name)}; give another folder"
                          + (f", e.g. {run_dir / 'export' / name}" if name is not None else
                             f", e.g. {Path(dest).with_name(target.name + '-' + label)}" if label else
                             f" (leave {flag} out for the default next to it)"))


def enclosing_run(path) -> Path | None:
    """The run directory (`io.is_run_directory`) `path` lies inside, the nearest one above it, or None."""
    return next((f for f in Path(path).expanduser().resolve().parents if is_run_directory(f)), None)


def check_dest_in_a_run(dest, label: str, flag: str = "--dest") -> None:
    """`check_run_dest` for a trained model written to `dest` by a command given a model folder, not a run's child
    (`merge`, `sft --model`, `gkd --child`): where `dest` lies inside a run directory, it must not be a folder of
    that run's own models (breaker: `sft --dest run/export/child-2x` replaced the run's export, and `puzzle run` then
    refused to go on). `label` ("sft", "gkd", "merged") names the folder suggested instead."""
    if (run_dir := enclosing_run(dest)) is not None:
        check_run_dest(run_dir, dest, None, flag, label)


def export_extra_info(run: Run, name: str, record: dict, dest: Path) -> dict:
    """The provenance `stage_export` stores under config.json's "puzzle" key of child `name`'s export at `dest`."""
    from .export import run_ref

    return {"name": name, "run": run_ref(run.out, dest), "run_at": str(run.out.resolve()),  # run_at: for a copy
            "parent": run.parent.source, "library_stage": record.get("library_stage"),  # taken out of the run
            "predicted_speedup": record.get("speedup")}


def _searched_again(run: Run, name: str) -> str | None:
    """Why DIR/export/<name> holds an earlier search's child: its config.json's "puzzle" entry names another
    predicted speed-up or library stage than DIR/search/<name>.json now; None when they agree or either is
    unreadable (`export_out_of_date` then decides by the files and weights)."""
    try:
        info = json.loads((run.out / "export" / name / "config.json").read_text(encoding="utf-8"))["puzzle"]
        record = read_json(run.out / "search" / f"{name}.json")
        was, now = info["predicted_speedup"], record["speedup"]
        stages = info.get("library_stage"), record.get("library_stage")
    except (OSError, ValueError, PuzzleError, KeyError, TypeError):
        return None
    if was == now and stages[0] == stages[1]:
        return None
    if stages[0] != stages[1] and isinstance(stages[0], str) and isinstance(stages[1], str):
        return f"{name} was searched again since (on the {stages[0]} library then, the {stages[1]} one now)"
    if not (isinstance(was, (int, float)) and isinstance(now, (int, float))):
        return f"{name} was searched again since"
    # as many digits as tell the two apart (two children can predict 1.2581x and 1.2579x: not "1.26x then, 1.26x now")
    digits = next((d for d in range(3, 10) if f"{was:#.{d}g}" != f"{now:#.{d}g}"), 10)  # #: 1.30x beside 1.29x
    return f"{name} was searched again since (predicted speed-up {was:#.{digits}g}x then, {now:#.{digits}g}x now)"


def earlier_children(out: Path, current) -> list[str]:
    """Names of DIR/search/<name>.json records of searched children (not `puzzle refine`'s diverse or refined
    steps, methods mip-*) that are not among `current` (the names of this search's children): children of
    an earlier budget or front speed-up, whose files the run leaves in place."""
    found = []
    for path in sorted((out / "search").glob("*.json")):
        if path.name == "chosen.json" or path.stem in set(current):
            continue
        try:
            record = read_json(path)
        except (PuzzleError, OSError):
            continue
        if isinstance(record, dict) and "choice" in record and not str(record.get("method", "")).startswith("mip-"):
            found.append(path.stem)
    return found


def searched_names(run_dir: Path) -> list[str] | None:
    """The names of the run's searched children now (DIR/search/chosen.json's `names`, which every search
    rewrites), in the file's order; None where the file is missing, unreadable or holds no list of names. A name
    that is not a string (a hand edit) is left out."""
    try:
        names = read_json(Path(run_dir) / "search" / "chosen.json").get("names")
    except (PuzzleError, OSError, AttributeError):
        return None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else None


def exports_from_an_earlier_search(run: Run) -> dict[str, str]:
    """{name: why} for the run's searched children (DIR/search/chosen.json) whose export folder holds an earlier
    search's child (`_searched_again`): `puzzle export` or `puzzle run` writes them again."""
    found = {}
    for name in searched_names(run.out) or []:
        if (run.out / "export" / name).is_dir() \
                and (why := _searched_again(run, name)) is not None:
            found[name] = why
    return found


def children_without_export(run: Run) -> list[str]:
    """The run's searched children of the trained library (`searched_names`, not the init-only comparison ones) with no
    DIR/export/<name> folder: `puzzle run` exports each, `puzzle front` none (a front target added since)."""
    missing = []
    for name in searched_names(run.out) or []:
        try:
            stage = read_json(run.out / "search" / f"{name}.json").get("library_stage", "bld")
        except (PuzzleError, OSError, AttributeError):
            continue
        if stage == "bld" and not (run.out / "export" / name).exists():
            missing.append(name)
    return missing


def say_earlier_exports(run: Run, stage: str) -> None:
    """Say, as `stage`, each export folder of `exports_from_an_earlier_search` and the command that writes it again
    (`puzzle run` exports the BLD children alone, not the -init ones)."""
    for name, why in exports_from_an_earlier_search(run).items():
        again = "" if name.endswith("-init") else f" or `puzzle run --out {shell_arg(run.out)}`"
        run.say(f"{stage}: {run.out / 'export' / name} is out of date ({why}): `puzzle export --out "
                f"{shell_arg(run.out)} --name {name}`{again} writes it again")


EXPORT_STAMPS = "children/exports.json"  # what `stage_export` wrote into DIR/export/<name>: files and weights


#: kinds of file a loader may read beside an export's own (weights, configs such as adapter_config.json, code)
_LOADED_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".py", ".model", ".gguf", ".jinja", ".tiktoken",
                    ".msgpack", ".h5", ".onnx")


def _a_users(entry: str, written) -> bool:
    """Whether a file or folder named `entry` in an export folder is a user's, which no loader reads (notes, a
    notebook's checkpoints): one its last export did not write (`written`), of no name an export writes and of no
    kind a loader reads (`_LOADED_SUFFIXES`)."""
    from .export import EXPORT_NAMES

    return entry not in written and entry not in EXPORT_NAMES and not entry.lower().endswith(_LOADED_SUFFIXES)


def _users_files(run: Run, name: str) -> list[str]:
    """Names of the user's files and folders in DIR/export/<name> (`_a_users`), which `export_out_of_date` passes
    over; [] without a record of what its export wrote."""
    written, folder = _recorded_export_files(run, name), run.out / "export" / name
    if written is None or not folder.is_dir():
        return []
    return sorted(f.name for f in folder.iterdir() if _a_users(f.name, written))


def _export_files(folder: Path) -> dict:
    """{file name: [size in bytes, sha256]} of the files in an export folder (about 0.4 s per GB here); a folder
    or link in it as [None, "not a file"], which no export writes."""
    return {f.name: [f.stat().st_size, sha256_file(f)] if f.is_file() and not f.is_symlink() else [None, "not a file"]
            for f in sorted(folder.iterdir())}


def _own_export_with_its_weights(run: Run, name: str) -> bool:
    """Whether DIR/export/<name> holds only files its last export wrote (DIR/children/exports.json) and its weights
    (*.safetensors) byte for byte as written: the run's own export, which exporting again may rewrite even where
    another of its files (config.json) is damaged. Weights trained since (gkd, sft into that folder) do not pass."""
    folder = run.out / "export" / name
    try:
        recorded = read_json(run.out / EXPORT_STAMPS)[name]["files"]
        files = _export_files(folder) if folder.is_dir() and not folder.is_symlink() else {}
    except (PuzzleError, OSError, ValueError, KeyError, TypeError):
        return False
    weights = [f for f in recorded if f.endswith(".safetensors")] if isinstance(recorded, dict) else []
    # a folder or link under an export's file name (size None in `_export_files`) is a user's, left alone
    return bool(weights) and set(files) <= set(recorded) and all(size is not None for size, _ in files.values()) \
        and all(files.get(f) == recorded[f] for f in weights)


def export_child(run: Run, name: str, dest: Path | None = None, model=None,
                 untie: bool | None = None, dtype: str | None = None) -> tuple[object, str | None]:
    """`puzzle export` and `puzzle run`: `stage_export`, except that the run's own export folder (DIR/export/<name>)
    is kept when it is up to date (`export_out_of_date`). `model`: the child, when the caller holds it (else built
    here). `untie`: store a tied LM head as its own tensor (True), leave it out (False), or None: as the folder
    written to has it now (left out in a new folder), so a rerun of `puzzle run` or `puzzle export` keeps an export
    --untie-embeddings wrote. `dtype` (a name: "bfloat16"): the stored weights' dtype, or None: the one the folder
    written to stores (`merge.stored_dtype`; the run's `[parent] dtype` in a new folder), so a rerun keeps an export
    `--dtype` wrote. Returns the `ExportResult` and why the folder was written: None when it was kept, "none yet" for
    a new own folder or any other `dest` (which `stage_export` says it replaced).

    Raises:
        PuzzleError: as `stage_export`.
    """
    from .export import ExportResult, export_warnings

    folder = run.out / "export" / name
    if dest is not None and Path(dest).expanduser().resolve() != folder.resolve():
        if untie is None and _stored_untied(Path(dest).expanduser()):  # reviewer: re-tied without a word
            run.say(f"export: {dest} holds an export with its own LM head (--untie-embeddings): written so again")
            untie = True
        if dtype is None and (dtype := _kept_dtype(run, Path(dest).expanduser())) is not None:
            run.say(f"export: {dest} holds an export stored as {dtype} (--dtype): written so again")
        result = stage_export(run, name, dest=dest, model=model, untie=bool(untie), dtype=dtype)
        _say_wider_than_the_parent(run, name, dtype or run.config.parent.dtype)
        return result, "none yet"
    model = model if model is not None else build_child(run, read_architecture(run, name))
    if untie is None:
        untie = bool(model.config.tie_word_embeddings) and _stored_untied(folder)
    dtype = dtype or _kept_dtype(run, folder) or run.config.parent.dtype
    why = export_out_of_date(run, name, model, untie, dtype)  # "none yet" without the folder
    if why is None:
        from .export import remove_stale_temp

        remove_stale_temp(folder)  # an earlier export killed mid-write left its partial folder beside this one
        if users := _users_files(run, name):  # breaker: a notes file made every rerun of `puzzle run` fail
            run.say(f"export {name}: {folder} also holds {', '.join(users[:3])}{' ...' if len(users) > 3 else ''}, "
                    f"which its export did not write: left as it is (an export written again there is refused "
                    f"until {'it is' if len(users) == 1 else 'they are'} moved out)")
        return ExportResult(folder, tuple(export_warnings(model.config))), None
    result = stage_export(run, name, dest=dest, model=model, untie=untie, dtype=dtype)
    _say_wider_than_the_parent(run, name, dtype)
    return result, why


def _say_wider_than_the_parent(run: Run, name: str, dtype: str) -> None:
    """A note where an export is stored wider than its HF parent folder stores its weights (a bf16 parent in a float32
    run; fresh user: the export was twice the parent's size, unsaid): `--dtype` stores it as the parent does."""
    from .merge import stored_dtype

    extra = run.parent.config.extra
    folder = extra.get("path") if extra.get("source") in ("hf", "nemotron-nas") else None
    parent = stored_dtype(Path(folder)) if isinstance(folder, str) else None
    width = {"float32": 4, "bfloat16": 2, "float16": 2}
    if parent in width and dtype in width and width[dtype] > width[parent]:
        run.say(f"export {name}: note: stored as {dtype} (the run's [parent] dtype), twice the size of the parent's "
                f"{parent}; `puzzle export --out {shell_arg(run.out)} --name {name} --dtype {parent}` stores it as the "
                "parent")


def _kept_dtype(run: Run, folder: Path) -> str | None:
    """The dtype an export in `folder` stores, where it is not the run's `[parent] dtype` (written with `--dtype`);
    None otherwise, or when there is no readable export there."""
    from .merge import stored_dtype

    stored = stored_dtype(folder) if (folder / "config.json").is_file() else None
    return stored if stored in DTYPE and stored != run.config.parent.dtype else None


def _stored_untied(folder: Path) -> bool:
    """Whether the export in `folder` says `tie_word_embeddings: false` (for a child that ties them: written with
    `--untie-embeddings`); False when there is none or its config.json is unreadable."""
    try:
        stored = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and stored.get("tie_word_embeddings") is False


def _recorded_export_files(run: Run, name: str) -> set[str] | None:
    """The file names DIR/children/exports.json records for export `name`, or None when it records none."""
    try:
        files = read_json(run.out / EXPORT_STAMPS)[name]["files"]
    except (PuzzleError, OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, dict) else None


def record_export(run: Run, name: str, model) -> None:
    """Add DIR/export/<name>'s files (`_export_files`) and the weights they were written from (`weights_sha`) to
    DIR/children/exports.json, for `export_out_of_date`; with `model` None, remove the entry (an export under way)."""
    path = run.out / EXPORT_STAMPS
    try:
        stamps = read_json(path) if path.is_file() else {}
    except (PuzzleError, OSError, ValueError):
        stamps = {}
    stamps = stamps if isinstance(stamps, dict) else {}
    if model is None:  # `stage_export` is about to rewrite the folder
        if stamps.pop(name, None) is None:
            return
    else:
        stamps[name] = {"files": _export_files(run.out / "export" / name), "weights": weights_sha(model)}
    atomic_write_json(path, stamps)


def export_out_of_date(run: Run, name: str, model, untie: bool = False, dtype: str | None = None) -> str | None:
    """Why DIR/export/<name> is not what `stage_export` would write now of `model` (child `name`), or None when it
    is: its files are the ones the last export wrote there, byte for byte (DIR/children/exports.json: size and
    sha256 of each, so a damaged, edited, missing or added file counts, but for a user's notes: `_a_users`), from
    the same weights (`weights_sha`: a rebuilt library entry counts), with the same provenance (`export_extra_info`,
    this version; "run_at" is only informational: a moved run keeps its exports), block_configs and stored dtype
    (`dtype`, None: the run's)."""
    from . import __version__
    from .configuration_decilm import config_dict_from_model_config

    dest = run.out / "export" / name
    if not dest.is_dir():
        return "none yet"
    try:
        stamp = read_json(run.out / EXPORT_STAMPS)[name]
        files = _export_files(dest)
        if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), dict):
            raise TypeError
    except (PuzzleError, OSError, ValueError, KeyError, TypeError):
        return f"no record of what its export wrote in {EXPORT_STAMPS}"
    # a user's file or folder (notes: `_a_users`) changes nothing a loader reads: left as it is
    changed = sorted(f for f in {*files, *stamp["files"]} if files.get(f) != stamp["files"].get(f)
                     and not _a_users(f, stamp["files"]))
    if changed:
        return f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} not as its export wrote them"
    if (searched := _searched_again(run, name)) is not None:
        return searched
    try:
        stored = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        record = read_architecture(run, name)
    except (OSError, ValueError, PuzzleError):
        return "its config.json or the child's record is unreadable"
    blocks = json.loads(json.dumps(config_dict_from_model_config(model.config)["block_configs"], default=str))
    info = stored.get("puzzle") if isinstance(stored, dict) else None
    if not isinstance(info, dict):
        return "its config.json names no puzzle export"
    if stored.get("block_configs") != blocks:  # (leftover: a new architecture was said as a rebuilt library entry)
        return "another architecture"
    if stamp.get("weights") != weights_sha(model):
        return "the child's weights changed (a library entry rebuilt)"
    want = json.loads(json.dumps({"version": __version__, "source": dict(model.config.extra),
                                  **export_extra_info(run, name, record, dest)}, default=str))
    info, want = ({k: v for k, v in d.items() if k != "run_at"} for d in (info, want))
    if info != want:
        return "another version or provenance"
    tied = bool(model.config.tie_word_embeddings and not untie)
    if stored.get("tie_word_embeddings", tied) != tied:
        return "its LM head is stored there" if tied else "its LM head is not stored there (--untie-embeddings)"
    want_dtype = dtype or run.config.parent.dtype
    if stored.get("torch_dtype", want_dtype) != want_dtype:
        # (a breaker read "stored as float32, not bfloat16" as the flag ignored)
        return f"it was stored as {stored.get('torch_dtype')}, {want_dtype} is asked for"
    return None


def stage_realize(run: Run, name: str, stage: str | None = None) -> dict:
    """Assemble child `name`, evaluate it and measure it next to the parent.

    Writes DIR/children/realized/<name>.json (<name>.<stage>.json for another library stage's weights) and the
    latest session's machine.json beside it; the front's records in DIR/children, which summary.csv and the report
    describe, stay as the front measured them."""
    from .scoring.cost import measure_models

    record = read_architecture(run, name)
    searched = record.get("library_stage", "bld")
    check_score_target(run, score_table_path(run, searched))  # its predictions and budget are the table's
    other = stage is not None and stage != searched  # e.g. the BLD child's architecture from the init library
    child = build_child(run, record, stage)
    quality = evaluate(run, child, f"{name}.{stage}" if other else name)
    measured = measure_models(run.on_target({"parent": run.parent.model, name: child}), run.workload(),
                              repeats=run.config.score.measure_repeats,
                              progress=run.progress, max_contention=run.config.score.max_contention)
    folder = run.out / "children" / "realized"
    folder.mkdir(parents=True, exist_ok=True)
    check_machine_drift(run, measured.attrs, folder)
    measured = measured.set_index("name")
    checked = None
    if record.get("request"):
        from .feedback import check_measurement

        checked = check_measurement(measured, name, record["request"], run.workload().meta())
    row = _summary_row(name, record, quality, measured.loc[name], measured.loc["parent"], checked)
    if other:  # its own file: the searched child's summary (read by the front and the report) stays as it is
        row.update(library_stage=stage, predicted_kl_nats=float("nan"))
    path = folder / (f"{name}.{stage}.json" if other else f"{name}.json")
    atomic_write_json(path, row)
    if note := speedup_mismatch_note(row, run.out, f"puzzle realize --out {shell_arg(run.out)} --name {name}"
                                                         + (f" --stage {stage}" if other else "")):
        run.say(f"realize: warning: {note}")
    run.say(f"realize {name}: measured speed-up {row['speedup']:.2f}x (predicted {row['predicted_speedup']:.2f}x), "
            f"eval KL {row['kl_nats']:.4f} nats" + ("" if checked is None else
            f", {checked.use_text()} of its {checked.column} budget ({'met' if checked.met else 'over it'})")
            + f"; written to {path}")
    return row


def _summary_row(name: str, record: dict | None, quality: dict, measured, parent_measured, check=None) -> dict:
    row = {"name": name, "params": int(measured["params"]), "memory_mib": float(measured["memory_mib"]),
           "prefill_tok_s": float(measured["prefill_tok_s"]), "decode_tok_s": float(measured["decode_tok_s"]),
           "kl_nats": float(quality.get("kl_nats", 0.0)), "lm_loss": float(quality["lm_loss"]),
           "throughput_tok_s": float(measured["throughput_tok_s"]), "runtime_ms": float(measured["runtime_ms"]),
           "speedup": float(parent_measured["runtime_ms"] / measured["runtime_ms"]),
           "top1_agree": float(quality.get("top1_agree", 1.0))}
    if record is not None:
        row.update(predicted_runtime_ms=record["runtime_ms"], predicted_speedup=record["speedup"],
                   runtime_error=record["runtime_ms"] / row["runtime_ms"] - 1, predicted_kl_nats=record["kl_nats"],
                   library_stage=record.get("library_stage", "bld"), architecture=compact_architecture(record["choice"]),
                   budget_met=None if check is None else bool(check.met),
                   budget_use=float("nan") if check is None else float(check.use))
    else:
        row.update(predicted_runtime_ms=float("nan"), predicted_speedup=1.0, runtime_error=float("nan"),
                   predicted_kl_nats=0.0, library_stage="parent", architecture="parent", budget_met=None,
                   budget_use=float("nan"))
    return row


def compact_architecture(choice) -> str:
    """Per-layer block ids in a short form: 'kv3/1536 kv1/768 noop/linear ...'."""
    short = lambda v: v.replace("attn-", "").replace("ffn-", "")  # noqa: E731
    return " ".join("/".join(short(p) for p in b.split("+")) for b in choice)


def parse_compact_architecture(text: str) -> list[str]:
    """Inverse of `compact_architecture`: 'kv3/1536 noop/linear' -> ['attn-kv3+ffn-1536', 'attn-noop+ffn-linear'].

    Raises:
        ArchitectureError: a layer that is not '<attention>/<ffn>' with known variant ids.
    """
    from .architecture import ArchitectureError, BlockConfig

    ids = []
    for layer, part in enumerate(str(text).split()):
        attn, sep, ffn = part.partition("/")
        if not sep or not attn or not ffn:
            raise ArchitectureError(f"layer {layer}: {part!r} is not '<attention>/<ffn>' (e.g. 'kv3/1536', 'noop/linear')")
        ids.append(BlockConfig.from_id(f"attn-{attn}+ffn-{ffn}").id)
    return ids


# ------------------------------------------------------------------------------------------------
# front, summary, report


SUMMARY_COLUMNS = ["name", "params", "memory_mib", "prefill_tok_s", "decode_tok_s", "kl_nats", "lm_loss",
                   "throughput_tok_s", "runtime_ms", "speedup", "predicted_runtime_ms", "predicted_speedup",
                   "runtime_error", "predicted_kl_nats", "top1_agree", "library_stage", "budget_met", "budget_use",
                   "architecture"]


def cost_table_fingerprint(out: Path) -> dict:
    """The machine fingerprint recorded with OUT/score/cost.csv (`machine.machine_record`); {} when the
    sidecar is missing, unreadable or predates fingerprints."""
    from .scoring.machine import machine_record

    return machine_record(_cost_sidecar(out))


def check_machine_drift(run: Run, attrs: dict, folder: Path | None = None, rounds: list | None = None) -> dict:
    """Compare the whole-model measurement's machine fingerprint with the cost table's.

    Writes FOLDER/machine.json (default DIR/children, the front's measurement)
    ({"cost_table": ..., "children": ..., "drift": {"compute", "memory"}:
    measurement / table, NaN where either is missing}) and says so when a part is off by more than
    `machine.DRIFT_WARN`: the predicted speed-ups came from a table timed on a machine running at
    another speed. `rounds`: a list this call appends its drift (as written) to, one per budget-feedback
    round; from the second round on machine.json also holds them all as "drift_rounds" (a warning said in an
    earlier round stays on record when the last round's drift is small). Returns the drift.
    """
    from .scoring.machine import drift_message, machine_drift, machine_record

    table = cost_table_fingerprint(run.out)
    now = machine_record(attrs)
    drift = machine_drift(table, now)
    contention = {"cost_table": recorded_contention(_cost_sidecar(run.out)), "children": recorded_contention(attrs)}
    written = {k: (None if math.isnan(v) else round(v, 4)) for k, v in drift.items()}
    if rounds is not None:
        rounds.append(written)
    every = {"drift_rounds": rounds} if rounds is not None and len(rounds) > 1 else {}
    atomic_write_json(Path(folder or run.out / "children") / "machine.json",
                      {"cost_table": table, "children": now, "drift": written, **every, "contention_cores": contention})
    msg = drift_message(drift, "the cost table's timing", "the children's measurement")
    if msg:  # the front's measurement: the command that times it again (fresh user: the warning named none)
        again = (f" (`puzzle front --out {shell_arg(run.out)} --remeasure` times the children again)"
                 if folder is None else "")
        run.say(f"measure: {msg[:-1] if msg.endswith('.') else msg}{again}.")
    if note := contention_note(contention):
        run.say(f"measure: warning: {note}")
    return drift


#: a cost table that puts the non-block part (embedding, LM head) above this share of the parent's runtime, and
#: above NON_BLOCK_SUSPECT_RATIO times its share of the parameters, is taken for one timed on a busy machine when a
#: runtime budget is out of reach (Llama-family parents: about 0.2-0.3 of the runtime, about as much of the
#: parameters; a loaded tiny run: 0.58 of the runtime for 0.12 of the parameters)
NON_BLOCK_SUSPECT_SHARE = 0.5
NON_BLOCK_SUSPECT_RATIO = 2.0


def spoiled_non_block_share(table: pd.DataFrame) -> float | None:
    """The non-block row's share of the parent's runtime (`search.parent_totals`) in a score table the search read,
    where it looks spoiled by a busy machine (above NON_BLOCK_SUSPECT_SHARE and NON_BLOCK_SUSPECT_RATIO times its
    share of the parameters); else None."""
    from .search import parent_totals

    parent = parent_totals(table)
    row = table[table["subblock"] == "non_block"]
    shares = {c: float(pd.to_numeric(row[c]).sum()) / parent[c] if parent[c] > 0 and math.isfinite(parent[c])
              else 0.0 for c in ("runtime_ms", "params")}
    spoiled = shares["runtime_ms"] > max(NON_BLOCK_SUSPECT_SHARE, NON_BLOCK_SUSPECT_RATIO * shares["params"])
    return shares["runtime_ms"] if spoiled else None


def _cost_sidecar(out: Path) -> dict:
    """OUT/score/cost.csv's sidecar ({} when it is missing or unreadable)."""
    try:
        meta = read_json(out / "score" / "cost.csv.json")
    except PuzzleError:
        return {}
    return meta if isinstance(meta, dict) else {}


def recorded_contention(meta) -> float | None:
    """The most cores other jobs kept busy in a measurement's kept windows, from its attrs, sidecar or row
    (`contention_cores`; None when not recorded or not a number)."""
    return contention_cores(meta.get("contention_cores") if isinstance(meta, dict) else None)


def contention_cores(value) -> float | None:
    """A recorded contention (cores) as a float rounded to 3 decimals; None for a missing, non-numeric or NaN one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value), 3)


def machine_contention(out: Path) -> dict:
    """The cores other jobs kept busy while the cost table and the children were timed (DIR/children/machine.json's
    contention_cores, what report.md warns of); {} where nothing readable is recorded."""
    try:
        cores = read_json(out / "children" / "machine.json").get("contention_cores")
    except (PuzzleError, OSError, AttributeError):
        return {}
    return cores if isinstance(cores, dict) else {}


def front_contention(out: Path, session_used: bool = True) -> dict:
    """The most cores other jobs kept busy while the models `puzzle front` compares were timed: the cost table and
    the children (DIR/children/machine.json), each kind of model with row files (DIR/baselines/rows/: "baselines";
    DIR/front_rows/: "refined and diverse children", "fused children"; a key only where it has rows) and all of them
    timed together (DIR/one_session.json, only when `session_used`: a stale or damaged session the front set aside
    says nothing of its speed-ups); None where nothing is recorded. What `contention_note` reads."""
    try:
        machine = read_json(out / "children" / "machine.json").get("contention_cores") or {}
    except (PuzzleError, AttributeError):
        machine = {}
    rows: dict[str, float] = {}  # the kind of model -> the most cores busy over its rows
    for sub in ("baselines/rows", "front_rows"):  # each model's own session; the parent's row is of one of them, kept
        # while a later session timed that model again (fresh user: its contention was reported after a quiet retime)
        for path in sorted((out / sub).glob("*.json")) if (out / sub).is_dir() else []:
            if path.name == "parent.json":
                continue
            try:
                cores = recorded_contention(read_json(path))
            except PuzzleError:
                continue
            kind = ("baselines" if sub.startswith("baselines") else "fused children" if path.stem.endswith("-fused")
                    else "refined and diverse children")  # breaker: all three were named where one kind was timed
            if cores is not None:
                rows[kind] = max(cores, rows.get(kind, cores))
    try:  # `puzzle front --one-session`'s timing of them all
        session = read_json(out / "one_session.json").get("contention_cores") if session_used else None
    except (PuzzleError, AttributeError):
        session = None
    return {"cost_table": contention_cores(machine.get("cost_table")),
            "children": contention_cores(machine.get("children")),
            **rows,  # each kind its own figure (reviewer: one key for all gave refine's 0.2 the baselines' 1.7)
            "one_session": contention_cores(session)}


def contention_note(contention: dict) -> str:
    """A warning when the cost table or the children were timed while other jobs kept more cores busy than the
    default limit (`ScoreConfig.max_contention`; accepted because --max-contention, or the run's saved
    score.max_contention, raised it), else ""."""
    from .config import ScoreConfig

    default = ScoreConfig().max_contention
    what = {"cost_table": "the cost table was", "children": "the children were",
            "one_session": "the models timed in one session (one_session.json) were"}
    over = [f"{what.get(k, f'the {k} were')} timed while other jobs kept {v:.2f} cores busy"
            for k, v in contention.items() if isinstance(v, (int, float)) and v > default]
    if not over:
        return ""
    return (f"{' and '.join(over)}, over the default limit {default:g} (accepted because --max-contention or the "
            f"run's saved score.max_contention raised it): measured speed-ups and budget checks may be off by far "
            f"more than the timing noise; time them again on a quiet machine with --max-contention {default:g}")


def realize_and_measure(run: Run, records: dict[str, dict]) -> tuple[pd.DataFrame, dict, dict]:
    """Build every chosen child, measure it with the parent, hold it to its budget as measured, evaluate.

    All models are timed in one interleaved session (scoring/cost.py `measure_models`), so they
    share the machine's noise. A child whose measurement misses its budget (or, with 2 or more
    rounds, is well under it) is solved again under corrected table limits and everything is
    measured again (puzzle/feedback.py; `[search] budget_feedback` rounds); the final records are
    rewritten to DIR/search/ and the checks go to DIR/children/budget_feedback.json.
    Returns (summary table, parent first; {name: child model}; {name: final record}).
    """
    from .feedback import FEEDBACK_CANDIDATES_KEY, mark_busy_session, settle
    from .scoring.cost import measure_models

    built: dict[tuple, object] = {}
    drifts: list[dict] = []  # the machine's drift in each measurement round, for children/machine.json

    def key_of(record) -> tuple:
        return tuple(record["choice"]), record.get("library_stage", "bld")

    def child(record):
        if (key := key_of(record)) not in built:
            built[key] = build_child(run, record)
        return built[key]

    def measure(recs: dict) -> pd.DataFrame:
        t0 = time.perf_counter()
        first: dict[tuple, str] = {}  # one timing per architecture (breaker: two targets' one child timed twice
        for name, record in recs.items():  # measured 0.75x and 0.83x, two points where the log said one)
            first.setdefault(key_of(record), name)
        measured = measure_models(run.on_target({"parent": run.parent.model,
                                                 **{n: child(recs[n]) for n in first.values()}}),
                                  run.workload(), repeats=run.config.score.measure_repeats,
                                  progress=run.progress, max_contention=run.config.score.max_contention)
        run.timed("measure_s", time.perf_counter() - t0)  # adds up over the feedback's sessions
        check_machine_drift(run, measured.attrs, rounds=drifts)
        measured = measured.set_index("name")
        rounds = dict(measured.attrs.get("runtime_rounds_ms") or {})  # the paired noise `feedback.check` reads
        for name, record in recs.items():
            if name not in measured.index:
                measured.loc[name] = measured.loc[first[key_of(record)]]
                if first[key_of(record)] in rounds:
                    rounds[name] = rounds[first[key_of(record)]]
        if rounds:
            measured.attrs = {**measured.attrs, "runtime_rounds_ms": rounds}
        return mark_busy_session(measured, ScoreConfig().max_contention)  # settle corrects no limit by a busy one

    def resolve(name: str, record: dict, budgets) -> dict:  # written below once its round is decided, not now
        t0 = time.perf_counter()
        options = feedback_options(run, name, record, budgets)
        if len(options) == 1:
            return next(iter(options.values()))[1]
        # each realized and scored on the scoring split; the lowest KL is kept (and its model, for the timing)
        scored, best = [], None
        for key, source, rec, model, kl in realized_options(run, options, built):
            scored.append({"choice": list(key), "source": source, "selection_kl": kl})
            if best is None or kl < best[1]:  # the first of equal KLs
                best = (key, kl, model)
            del model
        run.timed("budget_feedback_s", time.perf_counter() - t0)  # the re-solves' options (a demo run: 141 s untold)
        built.setdefault((best[0], record.get("library_stage", "bld")), best[2])
        return {**options[best[0]][1], FEEDBACK_CANDIDATES_KEY: scored}  # settle says them with its round

    s = run.config.search
    pending = run.out / "children" / PENDING_MEASUREMENT
    if (kept := _pending_measurement(run, records, pending)) is not None:  # a breaker: interrupted while evaluating,
        measured, checks, history = kept  # the front's rerun timed every child again (75 % of the stage)
        run.say(f"measure: the children's timings from an interrupted call stand ({pending}): evaluated, not timed "
                f"again")
    else:
        # the plain solve's child of each budget (a record the feedback settled before carries it along)
        solved = {name: r.get("solved_choice", r["choice"]) for name, r in records.items()}
        earlier = {name: earlier_feedback(r) for name, r in records.items()}
        records, measured, checks, history = settle(records, measure, resolve, rounds=s.budget_feedback,
                                                    slack=s.budget_slack, workload_meta=run.workload().meta(),
                                                    say=run.say)
        for name, record in records.items():
            rewritten = {k: v for k, v in record.items() if k != "budget_feedback_earlier"}
            atomic_write_json(run.out / "search" / f"{name}.json",
                              {**rewritten, "solved_choice": solved[name], "budget_feedback": history.get(name, []),
                               "budget_feedback_rounds": s.budget_feedback,
                               **({"budget_feedback_earlier": earlier[name]} if earlier[name] else {})})
        atomic_write_json(run.out / "children" / "budget_feedback.json",
                          {"rounds": s.budget_feedback, "slack": s.budget_slack, "children": history,
                           "final": {n: c.to_dict() for n, c in checks.items()},
                           **({"earlier": {n: e for n, e in earlier.items() if e}} if any(earlier.values()) else {})})
        _write_pending_measurement(run, records, measured, checks, history, pending)
    for name, c in checks.items():
        if not c.met:
            run.say(f"measure: {name} measured {c.use_text()} of its {c.column} budget: over it"
                    + _over_budget_note(c, history.get(name, []), s.budget_feedback))
    children = {name: child(rec) for name, rec in records.items()}
    quality = evaluate_all(run, {"parent": run.parent.model, **children})
    rows = [_summary_row("parent", None, quality["parent"], measured.loc["parent"], measured.loc["parent"])]
    order = sorted(records, key=lambda n: (records[n]["speedup"], records[n].get("library_stage") != "bld"))
    for name in order:
        row = _summary_row(name, records[name], quality[name], measured.loc[name], measured.loc["parent"],
                           checks.get(name))
        atomic_write_json(run.out / "children" / f"{name}.json", row)
        rows.append(row)
    for row in rows[1:]:
        if note := speedup_mismatch_note(row, run.out):
            run.say(f"measure: warning: {note}")
    summary = pd.DataFrame(rows)[SUMMARY_COLUMNS]
    atomic_write_text(run.out / "summary.csv", summary.to_csv(index=False))
    write_front_inputs(run, drawn=False)  # the measurement's stamp: interrupted before the front, a rerun keeps it
    pending.unlink(missing_ok=True)  # its timings are in summary.csv now
    return summary, children, records


#: DIR/children/<this>: a measurement's settled timings, written before the children are evaluated and removed once
#: summary.csv holds them, so that a call interrupted in between is not timed again by its rerun
PENDING_MEASUREMENT = "measured.pending.json"


def drop_pending_measurement(run: Run) -> None:
    """Remove DIR/children/PENDING_MEASUREMENT: where the front is drawn from other timings, or timed again."""
    (run.out / "children" / PENDING_MEASUREMENT).unlink(missing_ok=True)


def _pending_inputs(run: Run, records: dict[str, dict]) -> dict:
    """What a pending measurement stands for: `front_inputs` (settings, searched choices, tables, the data settings'
    hash, which covers every text) with the packed evaluation split's own hash left out, each child's choice and
    library stage, and score.max_contention (which `front_inputs` leaves out: a stricter --max-contention times
    again)."""
    inputs = front_inputs(run)
    inputs["splits"] = {k: v for k, v in (inputs.get("splits") or {}).items() if k != "eval"}
    return json.loads(json.dumps({**inputs, "max_contention": run.config.score.max_contention,
                                  "records": {n: [list(r["choice"]), r.get("library_stage", "bld")]
                                              for n, r in sorted(records.items())}}, default=str))


def _write_pending_measurement(run: Run, records: dict[str, dict], measured: pd.DataFrame, checks: dict,
                               history: dict, path: Path) -> None:
    """DIR/children/PENDING_MEASUREMENT: the settled `measured` rows (by name), `checks` and `history` of
    `realize_and_measure`, with `_pending_inputs` of the final `records` (as DIR/search/ now holds them)."""
    rows = [{k: v.item() if hasattr(v, "item") else v for k, v in row.items()}  # numpy numbers as Python's (exact)
            for row in measured.reset_index().to_dict("records")]
    atomic_write_json(path, {"inputs": _pending_inputs(run, records), "measured": rows,
                             "checks": {n: c.to_dict() for n, c in checks.items()}, "history": history})


def _pending_measurement(run: Run, records: dict[str, dict], path: Path) -> tuple[pd.DataFrame, dict, dict] | None:
    """(measured, checks, history) of a pending measurement of these `records` (`_write_pending_measurement`), or
    None: none there, unreadable, or made for other inputs (then removed)."""
    from .feedback import Check

    if not path.is_file():
        return None
    try:
        saved = read_json(path)
        if saved["inputs"] != _pending_inputs(run, records):
            raise ValueError("other inputs")
        measured = pd.DataFrame(saved["measured"]).set_index("name")
        checks = {n: Check(**c) for n, c in saved["checks"].items()}
        if not {"parent", *records} <= set(measured.index) or set(checks) - set(records):
            raise ValueError("other children")
        return measured, checks, dict(saved["history"])
    except (PuzzleError, OSError, ValueError, KeyError, TypeError, AttributeError):
        path.unlink(missing_ok=True)
        return None


SPEEDUP_MISMATCH = 2.0  # measured vs predicted speed-up off by more than this factor: a timing gone wrong, not the model


def _keeps_no_block(architecture) -> bool:
    """Whether a row's `architecture` (`compact_architecture`'s text) removes every attention and FFN subblock."""
    try:
        blocks = [BlockConfig.from_id(b) for b in parse_compact_architecture(architecture)] \
            if isinstance(architecture, str) and architecture.strip() else []
    except (ArchitectureError, ValueError):
        return False
    return bool(blocks) and all(b.removed for b in blocks)


def speedup_mismatch_note(row: dict, out: Path | str = "DIR", again: str | None = None) -> str | None:
    """A warning when a child's measured speed-up (`row["speedup"]`) and the cost table's prediction
    (`row["predicted_speedup"]`) differ by more than a factor SPEEDUP_MISMATCH either way; else None.

    The additive cost model is within a few tens of percent of measured runtimes on a quiet machine (the demo's
    runtime_error), so a factor of 2 means one of the two timings ran on a busy or throttled machine (or the cost
    table was timed for another workload), and the speed-ups the front reports are not to be trusted. `out`: the run
    directory the commands in the message name; `again`: the command that times the child again (default: the
    front's `puzzle front --out OUT --remeasure`)."""
    measured, predicted = row.get("speedup"), row.get("predicted_speedup")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (measured, predicted)):
        return None
    if max(measured / predicted, predicted / measured) <= SPEEDUP_MISMATCH:
        return None
    if _keeps_no_block(row.get("architecture")):  # breaker: a baseline that removed every layer blamed the machine
        return (f"{row['name']} measured {measured:.2f}x against a predicted {predicted:.2f}x: it keeps no block "
                f"(every layer removed), so what is left is the model's fixed cost per call (embedding, LM head and "
                f"the framework's own work), which the cost table's sum of per-block timings does not hold; the "
                f"measured speed-up is the one to go by")
    return (f"{row['name']} measured {measured:.2f}x against a predicted {predicted:.2f}x, "
            f"{max(measured / predicted, predicted / measured):.1f} times apart: the cost table's timing (`puzzle "
            "score`) or this measurement ran on a busy or throttled machine. Time the child again when the machine is "
            f"quiet (`{again or f'puzzle front --out {shell_arg(out)} --remeasure'}`), or the cost table (`puzzle "
            f"score --out {shell_arg(out)} --retime`) if the children's timings hold")


def evaluate_all(run: Run, models: dict) -> dict[str, dict]:
    """{name: `evaluate(run, model, name)`} for each of `models` ({name: model}), with a progress bar."""
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models), desc="evaluate", unit="model")
    quality = {}
    for name, model in models.items():
        quality[name] = evaluate(run, model, name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return quality


EARLIER_SESSIONS = 5  # earlier feedback sessions a settled record keeps
RESOLVE_ACTIONS = ("tightened", "loosened", "reverted")  # feedback.settle's actions that changed the child


def re_solved(record) -> bool:
    """Whether the budget feedback re-solved a search record: its `choice` is not the search's first solve
    (`solved_choice`, which a record never measured, or written before it existed, lacks)."""
    return isinstance(record, dict) and isinstance(record.get("solved_choice"), list) \
        and record["solved_choice"] != record.get("choice")


def earlier_feedback(record: dict) -> list[dict]:
    """The feedback sessions that explain a settled record's child, oldest first: [{rounds, history}, ...].

    A record the budget feedback re-solved (its `choice` differs from `solved_choice`) is kept by later
    searches (`settled_record`), and its next measurement writes a new `budget_feedback` history that
    starts at that child; the sessions that re-solved it (a tightened, loosened or reverted round) move
    to `budget_feedback_earlier` (the last EARLIER_SESSIONS of them), so a rerun with another
    `--budget-feedback` still says why the child was re-solved (reviewer: the history was overwritten).
    A record whose child is the plain solve's needs none: [] for it, and for one never measured.
    """
    history = record.get("budget_feedback")
    if not re_solved(record):
        return []
    before = record.get("budget_feedback_earlier")
    before = [e for e in before if isinstance(e, dict)] if isinstance(before, list) else []
    resolved = isinstance(history, list) and any(  # a session that only checked the child explains nothing (code
        # review: five such reruns pushed out the session that chose it)
        isinstance(e, dict) and str(e.get("action", "")).startswith(RESOLVE_ACTIONS)
        for e in history)
    if not resolved:
        return before[-EARLIER_SESSIONS:]
    return (before + [{"rounds": record.get("budget_feedback_rounds"), "history": history}])[-EARLIER_SESSIONS:]


def _over_budget_note(check, history: list[dict], rounds: int) -> str:
    """How a child that measured over its budget got there, from its budget-feedback `history` (`feedback.settle`):
    within the timing noise, after re-solves, or in the last timing session with no round left to re-solve it."""
    if not check.significant_miss():
        return f" by less than the timing noise (standard error {check.se:.3f})"
    if not rounds:
        return " (--budget-feedback N re-solves it)"
    resolves = sum(1 for e in history if str(e.get("action", "")).startswith(RESOLVE_ACTIONS))
    last = history[-1] if history else {}
    action = str(last.get("action", ""))
    if last.get("round", rounds) < rounds and action.startswith("kept: "):  # the feedback stopped on its own
        return (f" after {resolves} re-solve(s)" if resolves else "") + f"; the feedback kept it: {action[6:]}"
    if resolves:
        return f" after {resolves} re-solve(s) in {rounds} round(s)"
    uses = [e["check"]["use"] for e in history[:-1] if isinstance((e.get("check") or {}).get("use"), (int, float))]
    earlier = f" (it measured {', '.join(f'{u:.3f}' for u in uses)} in the earlier session(s))" if uses else ""
    kept = [str(e["action"])[6:] for e in history[:-1] if str(e.get("action", "")).startswith("kept: ")]
    if kept:  # a re-solve was tried in an earlier round and changed nothing
        return f" in the last timing session, with no re-solve round left{earlier}; earlier the feedback kept it: {kept[-1]}"
    return f" in the last timing session, with no re-solve round left{earlier}: the machine's speed moves between sessions"


def parent_label(run: Run) -> str:
    """A short name for the parent in titles: its file or folder name ("GGUF <file> (de-quantized, cached at ...)"
    -> <file>)."""
    source = str(run.parent.source)
    if source.startswith("GGUF "):
        source = source[len("GGUF "):].split(" (", 1)[0]
    return Path(source).name or source


def resolved_by_feedback(out: Path, names) -> list[str]:
    """The children of `names` whose record (DIR/search/<name>.json) the budget feedback re-solved: its `choice` is
    no longer the search's first solve (`solved_choice`). Unreadable records are left out."""
    found = []
    for name in names:
        try:
            record = read_json(Path(out) / "search" / f"{name}.json")
        except (PuzzleError, OSError):
            continue
        if re_solved(record):
            found.append(str(name))
    return found


def write_front(run: Run, summary: pd.DataFrame, main: str) -> pd.DataFrame:
    """front.csv and front.png: evaluation KL vs measured throughput, parent marked. An interrupted measurement's
    timings (PENDING_MEASUREMENT) are dropped: the front drawn is the run's."""
    drop_pending_measurement(run)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .budgets import parse_speedup

    front = summary[summary["library_stage"].isin(["parent", "bld"])].copy()

    def asked(name: str) -> float | None:  # the requested speed-up (None: a budget of other resources)
        if name == "parent":
            return 1.0
        path = run.out / "search" / f"{name}.json"
        speedup = (read_json(path).get("request") or {}).get("speedup") if path.is_file() else None
        return parse_speedup(speedup) if speedup else None

    def target(name: str, predicted: float) -> float:  # the requested speed-up; the prediction when none was asked
        return asked(name) or float(predicted)

    def label(names: list[str], measured: float) -> str:  # reviewer: a predicted speed-up was shown as the target
        targets = "/".join(dict.fromkeys(f"{asked(n):g}x" for n in names if asked(n)))  # one child of two targets
        return f"{targets} -> {measured:.2f}x" if targets else f"{measured:.2f}x measured"

    def points(rows: pd.DataFrame) -> dict[tuple, list]:  # (throughput, KL) -> its rows: one label per point
        out: dict[tuple, list] = {}
        for r in rows.itertuples():
            out.setdefault((r.throughput_tok_s, r.kl_nats), []).append(r)
        return out

    front.insert(1, "target_speedup", [target(n, p) for n, p in zip(front["name"], front["predicted_speedup"])])
    cols = ["name", "target_speedup", "predicted_speedup", "speedup", "budget_met", "throughput_tok_s", "runtime_ms",
            "predicted_runtime_ms", "runtime_error", "kl_nats", "predicted_kl_nats", "lm_loss", "params", "memory_mib"]
    front = front[cols].sort_values("throughput_tok_s")
    atomic_write_text(run.out / "front.csv", front.to_csv(index=False))

    from .plots import on_front

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    kids = front[front["name"] != "parent"]
    p = front[front["name"] == "parent"].iloc[0]
    # each point named by its target and measured speed-up (reviewer: "0.68x" beside "0.68x", which child is which?);
    # the line joins the children on the front alone (reviewer: it went through a child slower than the parent)
    keep = pd.Series(on_front(kids["throughput_tok_s"], kids["kl_nats"], above=p["throughput_tok_s"]), index=kids.index)
    ax.plot(kids.loc[keep, "throughput_tok_s"], kids.loc[keep, "kl_nats"], "o-", color="tab:blue",
            label="children (BLD library, MIP): target -> measured speed-up")
    if (~keep).any():
        ax.plot(kids.loc[~keep, "throughput_tok_s"], kids.loc[~keep, "kl_nats"], "o", color="tab:blue", alpha=0.3,
                label="faded: beaten by a faster child (or slower than the parent)")
    # below and right of a point, off the rising curve; the fastest one's to its left, inside the axes (fresh
    # user: "3x -> 3.12x" ran into the right edge, "1.5x -> 1.55x" sat on the curve)
    kid_points = points(kids)
    for i, (point, rows) in enumerate(kid_points.items()):
        last = i == len(kid_points) - 1
        ax.annotate(label([r.name for r in rows], rows[0].speedup), point, textcoords="offset points",
                    xytext=(-8, 0) if last else (6, -10), ha="right" if last else "left",
                    va="center" if last else "baseline", fontsize=8)
    ax.plot([p["throughput_tok_s"]], [p["kl_nats"]], "*", color="black", markersize=12, label="parent")
    init = summary[summary["library_stage"] == "init"]
    if len(init):
        ax.plot(init["throughput_tok_s"], init["kl_nats"], "s", color="tab:red", label="child from init-only entries")
        for point, rows in points(init).items():  # labelled as the others (fresh user: the square had no speed-up),
            # above and left of it: the BLD twin's label, below and right of a point at about the same speed-up and
            # KL, lay under it (fresh user, stop 78)
            ax.annotate(label([r.name for r in rows], rows[0].speedup), point, textcoords="offset points",
                        xytext=(-6, 8), ha="right", fontsize=8, color="tab:red")
    ax.set_xlabel(f"measured throughput (generated tok/s, {run.workload().device}, B={run.config.target.batch_size}, "
                  f"P={run.config.target.prompt_len}, G={run.config.target.gen_len})", fontsize=8)
    ax.set_ylabel("evaluation KL(parent || child), nats/token")
    ax.set_title(f"Quality-throughput front: {parent_label(run)}", fontsize=9)  # (the y axis is KL, not accuracy)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = run.out / ".front.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(run.out / "front.png")
    write_front_inputs(run)  # last: a front interrupted before this is drawn again (`realize_and_measure`'s stamp)
    return front


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `df` (floats to 4 significant digits, without an exponent below 1e6;
    None and NaN as empty cells, as summary.csv writes them)."""
    cols = list(df.columns)

    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            if 1e4 <= abs(v) < 1e6:
                return f"{v:.0f}"  # 37570, not 3.757e+04
            digits = 4  # a budget use just over 1 is not printed "1" beside budget_met False (reviewer)
            while digits < 9 and v != 1.0 and f"{v:.{digits}g}" == "1":
                digits += 1
            return f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def run_all(run: Run) -> pd.DataFrame:
    """The main job: data → BLD → scoring (→ coupled BLD when bld.coupled_top_k > 0) → search → realize, evaluate,
    measure → export → front → report.

    A rerun of a finished run (front.json current, `front_is_current`; summary.csv agreeing, `measured_summary`)
    times and evaluates nothing again: it rewrites only exports that are missing or out of date and a report
    whose inputs changed (DIR/report.json)."""

    t_start = time.perf_counter()
    check_objective_names(run)  # before minutes of data, BLD and scoring (reviewer: "kl_nat" was refused at the search)
    check_exclusion_names(run)  # likewise a variant the space does not have (reviewer: refused at the search)
    stage_data(run)
    stage_bld(run)
    stage_score(run)
    if run.config.bld.coupled_top_k:  # Puzzle's hybrid flow: blocks of the best decoupled children trained coupled
        from .coupled import stage_coupled

        stage_coupled(run)
    records = stage_search(run)
    main = read_json(run.out / "search" / "chosen.json")["main"]
    stale = front_is_current(run)
    summary, why = (None, stale) if stale else measured_summary(run, records)
    if summary is not None and (problem := children_rows_problem(run, summary, records)):
        summary, why = None, problem  # the timings stand: evaluated (from the caches) and written again below
    reevaluated = False
    if summary is None and (kept := front_from_kept_timings(run, records, main, "run", why)) is not None:
        summary, children = kept  # the front drawn at once: an export refused or interrupted next leaves it consistent
        redraw_front_all(run)
        reevaluated = True
    measured = summary is None
    if measured:
        if (run.out / "front.csv").is_file():
            run.say(f"run: timing the children again ({why})")
        summary, children, records = realize_and_measure(run, records)
        write_front(run, summary, main)
        redraw_front_all(run)
    elif not reevaluated:  # a finished run: the measured children stand; what is missing or out of date is written again
        drop_pending_measurement(run)  # (an interrupted call's of other settings: the run's front is this one)
        run.say(f"run: {run.out / 'summary.csv'} and front.csv match the run's settings, searched children and tables "
                f"(front.json): no child evaluated or timed again (`puzzle front --out {shell_arg(run.out)} "
                "--remeasure` times them again)")
        children = _LazyChildren(run, records)  # the BLD children to check their exports; others for a new report
    if not measured and (busy := contention_note(machine_contention(run.out))):  # breaker: said by `front`, not by a
        run.say(f"run: warning: {busy}")  # run that reused the timings (as report.md reads them: machine.json)
    exported = {}
    for name, rec in records.items():
        if rec.get("library_stage", "bld") == "bld":
            exported[name], why = export_child(run, name, model=children[name])  # kept when up to date
            if not measured and why not in (None, "none yet"):  # said once written (a user's file there is refused)
                run.say(f"export {name}: written again ({why})")
    if not (run.out / "front.png").is_file():  # a deleted picture is drawn again from the summary
        write_front(run, summary, main)
        redraw_front_all(run)  # front.csv is new: front_all follows it
    elif not measured and not reevaluated and front_all_older(run):  # a run stopped before drawing front_all
        redraw_front_all(run)
    cfg = run.config.report
    if not measured and not reevaluated and report_is_current(run, exported):
        run.say(f"run: {run.out / 'report.md'} is up to date: kept as it is")
        run.timed("total_s", time.perf_counter() - t_start)
        return summary
    if not measured and not reevaluated and (run.out / "report.md").is_file():  # breaker: rewritten unsaid
        run.say(f"run: writing {run.out / 'report.md'} again ({report_stale_reason(run, exported)}; its chat answers "
                f"are generated again)")
    t0 = time.perf_counter()
    models = {"parent": run.parent.model, **{name: children[name] for name in records}}
    answers = {name: chat_answers(m, run.parent.tokenizer, cfg.prompts, cfg.max_new_tokens) for name, m in models.items()}
    run.timed("chat_s", time.perf_counter() - t0)
    run.timed("total_s", time.perf_counter() - t_start)
    write_report(run, summary, answers, exported, main)
    return summary


def changed_data_sources(run: Run) -> list[str]:
    """The run's evaluation sources whose contents differ from what DIR/data/manifest.json packed (a file edited in
    place), or that can no longer be hashed; [] when DIR/data has no readable manifest (the data stage decides
    then). Only the evaluation text: the front is measured on it, and a calibration corpus may be large to hash
    (the library it trained stands or falls with the score tables)."""
    from .data import source_sha256
    from .samples import is_parent_samples

    try:
        packed = read_json(run.out / "data" / "manifest.json")["settings"]["source_sha256"]
    except (PuzzleError, OSError, ValueError, KeyError, TypeError):
        return []
    changed = []
    for spec in run.config.data.eval_sources:
        if is_parent_samples(spec):  # drawn into DIR/data by the data stage itself (never an evaluation source)
            continue
        try:
            if source_sha256(spec) != packed.get(spec):
                changed.append(spec)
        except (PuzzleError, OSError):
            changed.append(spec)
    return changed


def front_all_older(run: Run) -> bool:
    """Whether DIR/front_all.csv exists and was written before DIR/front.csv (a command stopped between the two)."""
    try:
        return (run.out / "front_all.csv").stat().st_mtime_ns < (run.out / "front.csv").stat().st_mtime_ns
    except OSError:  # either missing: nothing to draw again from, or nothing drawn
        return False


def draw_front_all(run: Run) -> pd.DataFrame:
    """DIR/front_all.csv/png and DIR/front_ratios.csv (`plots.write_front_all`) for the run as it is now: its rows'
    inputs, stale greedy rows left out, the ratios at the front targets the search reached. Returns the rows."""
    from .baselines import row_inputs, stale_greedy_rows
    from .plots import write_front_all

    return write_front_all(run.out, speedups=reached_front_speedups(run), inputs=row_inputs(run),
                           exclude=stale_greedy_rows(run))


def redraw_front_all(run: Run) -> None:
    """Draw DIR/front_all.csv/png and DIR/front_ratios.csv again from the front just measured or evaluated, when
    `puzzle front` drew them before (they would keep the old figures); `puzzle front` prints the ratios."""
    if not (run.out / "front_all.csv").is_file():
        return
    draw_front_all(run)
    run.say("run: front_all.csv/png and front_ratios.csv drawn again from this front (`puzzle front --out "
            f"{shell_arg(run.out)}` prints the ratios)")


def report_out_of_date(run: Run) -> bool:
    """Whether DIR/report.md exists and was written from another summary.csv or front.json than the run's now
    (DIR/report.json, `report_stamp`); `puzzle run` writes it again."""
    if not (run.out / "report.md").is_file():
        return False
    try:
        stamp = read_json(run.out / "report.json")
        return stamp.get("summary_csv") != sha256_file(run.out / "summary.csv") or \
            stamp.get("front_json") != sha256_file(run.out / "front.json")
    except (PuzzleError, OSError, AttributeError):
        return True


def summary_problem(run: Run) -> str | None:
    """Why DIR/summary.csv is not the measurement the current front was drawn from (`measured_summary` for the
    searched children of DIR/search/chosen.json), or None when it is."""
    # the names alone: reading the records fitted to the run would load the parent, which drawing needs not
    if (names := searched_names(run.out)) is None:
        return "search/chosen.json is missing or unreadable"
    records = dict.fromkeys(names, {})
    summary, why = measured_summary(run, records)
    return why or children_rows_problem(run, summary, records)


def redraw_front(run: Run) -> None:
    """Draw DIR/front.png (and front.csv, front.json) again from DIR/summary.csv, when that is the measurement the
    current front was drawn from (`measured_summary`); a summary that is not, is left to a new measurement.

    Raises:
        PuzzleError: summary.csv is not the front's measurement (says why, and `--remeasure`).
    """
    chosen = read_json(run.out / "search" / "chosen.json")
    records = {name: read_architecture(run, name) for name in chosen["names"]}
    summary, why = measured_summary(run, records)
    if summary is None:
        raise PuzzleError(f"front.png cannot be drawn again: {why}; `puzzle front --out {shell_arg(run.out)} "
                          "--remeasure` measures the front anew")
    write_front(run, summary, chosen["main"])


class _LazyChildren(dict):
    """{name: child model} of `records`, each built (`build_child`) the first time it is looked up."""

    def __init__(self, run: Run, records: dict[str, dict]):
        super().__init__()
        self._run, self._records = run, records

    def __missing__(self, name: str):
        self[name] = build_child(self._run, self._records[name])
        return self[name]


def measured_summary(run: Run, records: dict[str, dict], stamp: str = "summary_csv") -> tuple[pd.DataFrame | None, str]:
    """(DIR/summary.csv, "") when it is the file the front's measurement wrote (its sha256 in DIR/front.json, written
    with front.csv by `write_front`; with `stamp="summary_timings"` its measurement columns alone,
    `summary_timings_sha`), holds the parent and every searched child in `records`, and the measurement's
    budget-feedback record (DIR/children/budget_feedback.json) is there, it and machine.json readable
    (`_measurement_records_problem`); else (None, why not)."""
    path = run.out / "summary.csv"
    try:
        stored = read_json(run.out / "front.json").get(stamp)
        summary = pd.read_csv(path)[SUMMARY_COLUMNS]
    except (PuzzleError, OSError, ValueError, KeyError, AttributeError, pd.errors.ParserError):
        return None, "summary.csv is missing or unreadable"
    if stored != (summary_timings_sha(path) if stamp == "summary_timings" else sha256_file(path)):
        return None, "summary.csv is not the file front.json was written with (edited, or from another measurement)"
    names = list(summary["name"].astype(str))
    if len(set(names)) != len(names) or set(names) != {"parent", *records}:
        return None, "summary.csv does not hold the searched children"
    if not (run.out / "children" / "budget_feedback.json").is_file():
        return None, "children/budget_feedback.json is missing"
    if (problem := _measurement_records_problem(run)) is not None:
        return None, problem
    return summary, ""


def _measurement_records_problem(run: Run) -> str | None:
    """Why the records the children's measurement wrote beside summary.csv (children/machine.json,
    children/budget_feedback.json) cannot stand, where present: not a readable JSON object; None when they can."""
    for record in ("children/machine.json", "children/budget_feedback.json"):
        if (run.out / record).exists():
            try:
                if not isinstance(read_json(run.out / record), dict):
                    raise TypeError
            except (PuzzleError, OSError, TypeError):
                return f"{record}, written with the measurement, is unreadable"
    return None


#: summary.csv's columns that evaluation writes; the others are the measurement `reevaluate` keeps
EVALUATION_COLUMNS = ("kl_nats", "lm_loss", "top1_agree")


def summary_timings_sha(path: Path) -> str | None:
    """sha256 of DIR/summary.csv without its evaluation columns (`EVALUATION_COLUMNS`): what the children's
    measurement wrote, which re-evaluation on another text leaves as it is (None when unreadable)."""
    try:
        summary = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    kept = summary.drop(columns=[c for c in EVALUATION_COLUMNS if c in summary.columns])
    return hashlib.sha256(kept.to_csv(index=False).encode()).hexdigest()


def timings_still_valid(run: Run, records: dict[str, dict]) -> tuple[pd.DataFrame, str] | None:
    """(DIR/summary.csv, why its evaluation is out of date) when nothing the children's timings depend on changed
    since the front was measured, only what their evaluation depends on (the evaluation text) or its evaluation
    figures themselves: its timings stand and only the evaluation is to be done again (`reevaluate`); why is ""
    when the evaluation stands too (the evaluation split and every figure as measured: only the front's files,
    front.csv or front.json, are to be drawn again); else None.

    That is: summary.csv holds the measurement front.json was written with (its columns apart from
    `EVALUATION_COLUMNS`, by sha256: a re-evaluation interrupted before the front was drawn again keeps its
    timings) and the searched children, the settings agree apart from the data section, the searched children and
    the score and cost tables are the ones measured, and the calibration and scoring splits hold the same tokens
    (DIR/data/manifest.json, by sha256; every data setting that shapes them shows there). A front.json from before
    its record of the splits and of the timings gives None (measured again)."""
    try:
        stored = read_json(run.out / "front.json")
    except (PuzzleError, OSError):
        return None
    if not isinstance(stored, dict) or not stored.get("summary_timings") \
            or stored.get("summary_timings") != summary_timings_sha(run.out / "summary.csv"):
        return None
    now = front_inputs(run)
    before, after = stored.get("splits"), now["splits"]
    if not (isinstance(before, dict) and isinstance(after, dict)
            and all(before.get(k) and before.get(k) == after.get(k) for k in ("calib", "score"))):
        return None
    parent_path = _recorded_weights_sha(run.out) is None

    def settings(config):
        config = _front_settings(config, parent_path)
        return {k: v for k, v in config.items() if k != "data"} if isinstance(config, dict) else config

    tables = stored.get("tables")
    if not isinstance(tables, dict) or settings(stored.get("settings")) != settings(now["settings"]) \
            or now["children"] is None or now["children"] != stored.get("children") or not now["tables"] \
            or now["tables"] != {k: v for k, v in tables.items() if _is_front_table(k)}:
        return None
    summary = measured_summary(run, records, stamp="summary_timings")[0]
    if summary is None:
        return None
    if before.get("eval") != after.get("eval"):
        return summary, "their evaluation is out of date (the evaluation text changed)"
    if measured_summary(run, records)[0] is not None and children_rows_problem(run, summary, records) is None:
        return summary, ""  # the figures stand too: only the front's files are drawn again
    return summary, ("summary.csv's evaluation figures are not the front's (edited, or an evaluation cut short), or a "
                     "children/<name>.json disagrees with them")


def front_from_kept_timings(run: Run, records: dict[str, dict], main: str, command: str,
                            why: str = "") -> tuple[pd.DataFrame, dict] | None:
    """Draw the front from the children's kept timings when they stand (`timings_still_valid`): evaluated again
    where their evaluation is out of date (`reevaluate`), else as summary.csv holds it (`why`: what made the front
    stale). Says which, as `command`. Returns (summary, {name: child model}), or None when the timings do not stand."""
    timed = timings_still_valid(run, records)
    if timed is None:
        return None
    if timed[1]:
        run.say(f"{command}: the children's timings stand but {timed[1]}: the parent and the children are evaluated "
                "again, their measured timings kept")
        summary, children = reevaluate(run, records, timed[0])
    else:
        run.say(f"{command}: summary.csv's timings and figures stand{f' ({why})' if why else ''}: the front is drawn "
                "again from it")
        summary, children = timed[0], _LazyChildren(run, records)
    write_front(run, summary, main)
    return summary, children


def reevaluate(run: Run, records: dict[str, dict], summary: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Evaluate the parent and every child of `summary` (`timings_still_valid`) on the run's evaluation split again,
    keeping their measured timings, then rewrite DIR/summary.csv and each DIR/children/<name>.json (a missing one
    from its summary row) with the new kl_nats, lm_loss and top1_agree; nothing of that is written before every
    model is evaluated (the per-model caches are keyed by the evaluation split), so an interruption leaves the files
    as they were. The caller draws the front from the result. Returns (the new summary, {name: child model})."""
    children = _LazyChildren(run, records)
    quality = evaluate_all(run, {"parent": run.parent.model, **{name: children[name] for name in records}})
    summary = summary.copy()
    for column in EVALUATION_COLUMNS:  # a hand-edited cell may have made it text; every value is written below
        summary[column] = pd.to_numeric(summary[column], errors="coerce").astype(float)
    for name, q in quality.items():
        at = summary.index[summary["name"].astype(str) == name][0]
        for column, default in (("kl_nats", 0.0), ("lm_loss", None), ("top1_agree", 1.0)):  # as `_summary_row`
            summary.loc[at, column] = float(q[column] if default is None else q.get(column, default))
    atomic_write_text(run.out / "summary.csv", summary.to_csv(index=False))
    for name in records:
        write_child_row(run, name, summary)
    return summary, children


def _json_value(value):
    """A summary.csv cell as JSON: NaN and missing as None, numpy scalars as Python numbers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def write_child_row(run: Run, name: str, summary: pd.DataFrame) -> None:
    """DIR/children/<name>.json from `summary`'s row of `name`: its evaluation columns into the row the measurement
    wrote, or the whole row when that file is missing or unreadable."""
    row = {k: _json_value(v) for k, v in summary[summary["name"].astype(str) == name].iloc[0].to_dict().items()}
    path = run.out / "children" / f"{name}.json"
    try:
        written = read_json(path)
    except PuzzleError:
        written = None
    if isinstance(written, dict):
        row = {**written, **{c: row[c] for c in EVALUATION_COLUMNS}}
    atomic_write_json(path, row)


def _same_figure(a, b) -> bool:
    """Two evaluation figures as equal (a NaN, written to JSON as null, equals a NaN)."""
    a, b = (math.nan if v is None else float(v) for v in (a, b))
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def children_rows_problem(run: Run, summary: pd.DataFrame, records: dict[str, dict]) -> str | None:
    """Why a DIR/children/<name>.json of the searched children does not hold its summary.csv row's evaluation
    figures (missing, unreadable, or another kl_nats / lm_loss), or None when every one does."""
    for name in records:
        try:
            written = read_json(run.out / "children" / f"{name}.json")
            row = summary[summary["name"].astype(str) == name].iloc[0]
            same = all(_same_figure(written[c], row[c]) for c in ("kl_nats", "lm_loss"))
        except (PuzzleError, KeyError, TypeError, ValueError, IndexError):
            same = False
        if not same:
            return f"children/{name}.json is missing or does not hold summary.csv's figures"
    return None


def report_stamp(run: Run, exported: dict) -> dict:
    """What report.md was written from, as DIR/report.json records it: the report settings, summary.csv and
    front.json by sha256, the exports' folders (relative to the run) and warnings, the run's path (its commands
    name it) and whether baselines are built (its section on them says so)."""
    return json.loads(json.dumps({
        "report": run.config.to_dict().get("report"), "run_at": str(run.out.resolve()),
        "baselines": (run.out / "baselines" / "baselines.csv").is_file(),
        "summary_csv": sha256_file(run.out / "summary.csv"), "front_json": sha256_file(run.out / "front.json"),
        "exported": {n: {"path": _in_run(run, r.path), "warnings": list(r.warnings)} for n, r in sorted(exported.items())}},
        default=str))


def _in_run(run: Run, path: Path) -> str:
    """`path` relative to the run directory when it lies inside it (a moved run's report stays true), else resolved."""
    path, out = Path(path).resolve(), run.out.resolve()
    return os.path.relpath(path, out) if out in path.parents else str(path)


#: what a change of each part of `report_stamp` means, for `report_stale_reason`
_STAMP_PARTS = {"run_at": "the run was moved or is reached by another path", "report": "the report settings changed",
                "baselines": "baselines were built or removed since", "summary_csv": "summary.csv changed",
                "front_json": "the front changed", "exported": "the exports changed"}


def report_stale_reason(run: Run, exported: dict) -> str:
    """Why DIR/report.md is not current (`report_is_current`): the parts of `report_stamp` that changed, in words."""
    try:
        recorded = read_json(run.out / "report.json")
    except (PuzzleError, OSError, ValueError):
        recorded = None
    now = report_stamp(run, exported)
    if not isinstance(recorded, dict) or set(recorded) != set(now):
        return "its record report.json is missing, or from an earlier version"
    return ", ".join(_STAMP_PARTS[k] for k in now if recorded[k] != now[k]) or "it was written from other files"


def report_is_current(run: Run, exported: dict) -> bool:
    """Whether DIR/report.md was written (`write_report`) from what the run holds now (`report_stamp`)."""
    path = run.out / "report.json"
    if not ((run.out / "report.md").is_file() and path.is_file()):
        return False
    try:
        return read_json(path) == report_stamp(run, exported)
    except (PuzzleError, OSError, ValueError):
        return False


def write_report(run: Run, summary: pd.DataFrame, answers: dict, exported: dict, main: str) -> None:
    """report.md: the summary table, predicted vs measured, BLD vs init-only, chat answers, timings."""
    w = run.workload()
    where = Path(os.path.abspath(run.out))  # in the commands it suggests (breaker: `--out run` worked from one
    # folder alone); abspath: `..` collapsed, links kept as the user named them
    lines = [f"# Puzzle run: {run.out.resolve().name}", "",
             f"Parent: {run.parent.source}. Workload: {w.device} ({w.meta().get('device_name', '')}), {w.dtype}, "
             f"batch {w.batch_size}, prompt {w.prompt_len}, generate {w.gen_len}. Evaluation text: "
             f"{', '.join(run.config.data.eval_sources)}; calibration/scoring text: {', '.join(run.config.data.calib_sources)}.",
             "", "## Summary", "",
             markdown_table(summary[["name", "params", "memory_mib", "prefill_tok_s", "decode_tok_s",
                                      "throughput_tok_s", "kl_nats", "lm_loss", "speedup", "predicted_speedup",
                                      "runtime_error", "budget_met",
                                      "budget_use", "library_stage"]]),
             "", "`speedup` is measured (parent runtime / child runtime for the workload, same session); "
                 "`throughput_tok_s`: generated tokens per second of that workload, front.png's x-axis; "
                 "`runtime_error` = predicted / measured runtime - 1; `budget_use` = measured / limit of the child's "
                 "tightest budget, the request resolved on the parent measured in the same session "
                 "(children/budget_feedback.json: its standard error, and what `--budget-feedback N` changed).", ""]
    machine = run.out / "children" / "machine.json"  # read once: the parent's note and "Machine speed" below
    try:
        m = read_json(machine) if machine.is_file() else {}
    except (PuzzleError, OSError, ValueError):
        m = {}
    m = m if isinstance(m, dict) else {}
    drift = {k: v for k, v in m["drift"].items() if v is not None} if isinstance(m.get("drift"), dict) else {}
    busy = m.get("contention_cores", {}).get("children") if isinstance(m.get("contention_cores"), dict) else None
    for note in (*budget_miss_notes(where, summary),
                 parent_runtime_note(summary, drift=drift, busy=busy, out=where)):
        if note:
            lines += [note, ""]
    init_name = f"{main}-init"
    if init_name in set(summary["name"]):
        a, b = summary.set_index("name").loc[main], summary.set_index("name").loc[init_name]
        lines += ["## Does BLD matter?", "",
                  f"Same search and budget, library entries trained by BLD vs init-only: evaluation KL "
                  f"{a['kl_nats']:.4g} vs {b['kl_nats']:.4g} nats/token (LM loss {a['lm_loss']:.4f} vs "
                  f"{b['lm_loss']:.4f}), "  # 4 significant digits: the tiny run's 0.0004 vs 0.0006 read "33 % lower"
                  f"measured speed-up {a['speedup']:.2f}x vs {b['speedup']:.2f}x."
                  + bld_comparison_caveat(a["speedup"], b["speedup"])
                  + bld_level_caveat(a["kl_nats"], b["kl_nats"], run.config.bld.tokens,
                                     predicted=(a["predicted_kl_nats"], b["predicted_kl_nats"]),
                                     init_faster_by=b["speedup"] / a["speedup"] - 1 if a["speedup"] > 0 else 0.0)
                  + feedback_asymmetry_caveat(resolved_by_feedback(run.out, [main, init_name]), main, init_name), ""]
    mismatched = [n for n in (speedup_mismatch_note(r, where) for r in summary.iloc[1:].to_dict("records")) if n]
    if machine.is_file() or mismatched:
        busy = contention_note(m.get("contention_cores") if isinstance(m.get("contention_cores"), dict) else {})
        if drift or busy or mismatched:
            lines += ["## Machine speed", ""]
        for n in mismatched:  # a blank line after each: Markdown joins adjacent lines into one paragraph
            lines += [f"**Warning:** {n}.", ""]
        if drift:
            lines += ["A fixed reference workload (scoring/machine.py) timed with the cost table and again with the "
                      "children took " + ", ".join(f"{v:.2f} times as long ({k})" for k, v in drift.items())
                      + " the second time as the first; a figure far from 1.00 means the machine's speed drifted "
                      "between the two. A drift that slows all work alike cancels in a speed-up (predicted and "
                      "measured are both ratios to the parent); one that strikes compute and memory traffic "
                      "unlike moves measured speed-ups away from the predicted ones."
                      + _prediction_gap_text(summary) + drift_rounds_text(m.get("drift_rounds")), ""]
        if busy:
            lines += [f"**Warning:** {busy[0].upper()}{busy[1:]}.", ""]
    lines += ["## Architectures", "",  # the notation, which the fresh-user run found explained nowhere (stop 54)
              "One entry per layer, attention/FFN: `kvN` attention with N KV heads, a number the FFN's intermediate "
              "width, `linear` a learned linear map in place of the subblock, `noop` the subblock removed. "
              "DIR/search/<name>.json writes the same layers as block ids (`kv3/1536` is `attn-kv3+ffn-1536`).", ""]
    for r in summary.itertuples():  # the parent's own layers too (reviewer: "parent" alone hid what a child kept)
        arch = compact_architecture([b.id for b in run.parent.model.config.blocks]) if r.name == "parent" \
            else r.architecture
        lines.append(f"- **{r.name}**: {arch}")
    lines += ["", "## Greedy chat answers", ""]
    prompts = run.config.report.prompts
    for i, prompt in enumerate(prompts):
        lines += [f"### {prompt}", ""]
        order = [n for n in summary["name"] if n in answers] + [n for n in answers if n not in set(summary["name"])]
        for name in order:  # as the summary lists the models
            ans = answers[name][i]
            lines.append(f"- **{name}**: {ans!r}" if ans else f"- **{name}**: *(nothing but whitespace)*")
        lines.append("")
    if exported:
        lines += ["## Exported", ""]
        for name, res in exported.items():
            lines.append(f"- {name}: `{_in_run(run, res.path)}`" + (f" — warnings: {'; '.join(res.warnings)}"
                                                                    if res.warnings else ""))
        lines.append("")
    lines += _unreachable_section(run)
    built = (run.out / "baselines" / "baselines.csv").is_file()  # breaker: after baselines ran, said as if not
    lines += ["## Against simpler methods", "",  # a fresh user looked here for the baselines (stop 72's leftovers)
              "This report holds the searched children alone. "
              + (f"The baselines are built (baselines/baselines.csv): `puzzle front --out {shell_arg(where)}` draws "
                 "them beside this front (front_all.png, front_all.csv) and writes our KL over theirs at matched "
                 "speed-up (front_ratios.csv)." if built else  # a breaker: "alone ... Here the baselines are built"
                 f"`puzzle baselines --out {shell_arg(where)}` builds greedy, layer removal, attention removal and "
                 "uniform width at the front's speed-ups (on the demo 11 minutes and 5.6 GB of exports for 1.25x and "
                 "1.5x alone: `--speedups` picks the targets, `--no-export` skips the exports); `puzzle front --out "
                 f"{shell_arg(where)}` then draws them beside this front (front_all.png, front_all.csv) and writes "
                 "our KL over theirs at matched speed-up (front_ratios.csv).")
              # a fresh user (stop 79) read the plain child's 1.03-1.20 against greedy as a failure of the method
              + " Expect the plain MIP child to be about as good as greedy selection from the same library and as "
              "layer removal, not better: on the demo's runs its KL came out at 0.9-1.3 times theirs at 1.25x and "
              "1.5x, as both choose by the same summed replace-1-block KL; `puzzle refine` searches past that sum "
              "(README, \"How the search compares with simpler methods\").", ""]
    lines += [_REPORT_TIMES, "", "Seconds add up over every command run on this directory (a resumed or repeated "
              "stage adds its time); total_s adds up the `puzzle run` invocations that finished. The figures below are "
              "those at the time of this report; DIR/timings.json goes on adding the time of later commands "
              "(baselines_s, refine_s, fuse_s, and the stages `puzzle front` runs again, such as search_s and "
              "measure_s). The totals of baselines, refine and fuse include the evaluations they made, which "
              "evaluate_s counts as well: the figures overlap and do not add up to the time spent.", "",
              json.dumps(run.timings, indent=1), ""]
    atomic_write_text(run.out / "report.md", "\n".join(lines))
    atomic_write_json(run.out / "report.json", report_stamp(run, exported))  # after: an interrupted report is redone


def budget_miss_notes(out: Path, summary: pd.DataFrame) -> tuple[str, str]:
    """Sentences for report.md on the children whose `budget_met` is False in `summary`, from
    children/budget_feedback.json (read once): (those over by less than the timing noise, which the feedback leaves
    as they are (`feedback.Check.significant_miss`; fresh-user run, stop 54: a bare False beside budget use
    1.00001), those over by more once its rounds were spent (a fresh user, stop 56: 1.036, 7 standard errors over,
    with no word)); "" for a part with no such child, both "" when the file is unreadable. A hand-edited or
    disagreeing entry counts as no child."""
    from .feedback import KEPT_BUSY, Check

    try:
        record = read_json(out / "children" / "budget_feedback.json")
        final = record["final"]
    except (PuzzleError, KeyError, TypeError):
        return "", ""
    within, over = [], []
    for row in summary.to_dict("records"):
        try:
            entry = final.get(row["name"]) if isinstance(final, dict) else None
            if str(row.get("budget_met")) != "False" or not isinstance(entry, dict):  # bool, numpy bool or CSV text
                continue
            ratios = {str(c): float(v) for c, v in dict(entry["ratios"]).items()}
            check = Check(met=False, use=float(entry["use"]), column=str(entry["column"]), ratios=ratios,
                          limits=dict(entry["limits"]), se=float(entry["se"]))
            if not (math.isfinite(check.use) and check.use > 1 and math.isfinite(check.se) and check.se >= 0
                    and all(math.isfinite(v) for v in ratios.values())):  # a hand-edited or disagreeing file
                continue
            if check.significant_miss():  # breaker: a text ratio raised here
                over.append((str(row["name"]), f"{row['name']} ({check.use_text()} of its {check.column} budget, "
                                                f"standard error {check.se:.3f})"))
            else:
                within.append(f"{row['name']} ({check.use_text()}, standard error {check.se:.3f})")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    rounds = record.get("rounds") if isinstance(record, dict) else None
    more = min(rounds + 1, 10) if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0 else 3
    # why the rounds did not bring each one within (a breaker followed "more rounds" 1 -> 2 -> 3 -> 4, where every
    # session was busy and corrected nothing, or the library had no faster child)
    busy, stuck, spent = [], [], []
    none_kept = "kept: no architecture"  # settle's `kept: {e}` for the re-solve's InfeasibleBudget (search.py)
    for name, text in over:
        history = record.get("children").get(name) if isinstance(record.get("children"), dict) else None
        actions = [str(h.get("action", "")) for h in history if isinstance(h, dict)] \
            if isinstance(history, list) else []  # (a hand-edited file: no history, the rounds' note)
        # the last round that re-solved, or kept the child for one of these reasons, says how it ended (a reviewer:
        # a busy round after re-solves, a re-solve after a round with no child)
        last = next((a for a in reversed(actions) if a.startswith((*RESOLVE_ACTIONS, KEPT_BUSY, none_kept))), "")
        (busy if last.startswith(KEPT_BUSY) else stuck if last.startswith(none_kept) else spent).append(text)
    parts = []
    if spent:
        parts.append(f"`budget_met` is False for {', '.join(spent)} by more than the timing noise: "
                     + ("the budget feedback's rounds were spent before it met its budget "
                        "(`children/budget_feedback.json` has each round). More rounds" if rounds != 0 else
                        # breaker: said of a run with none
                        "the budget feedback re-solves such a child, but this run gives it no rounds (`[search] "
                        "budget_feedback = 0`). Rounds")
                     + f" (`puzzle front --out {shell_arg(out)} --remeasure --budget-feedback {more}`) or a quieter "
                       "machine may bring it within.")
    if busy:
        parts.append(f"`budget_met` is False for {', '.join(busy)} by more than the timing noise, and the budget "
                     f"feedback's last session corrected no limit for it, as it was timed while other jobs kept the "
                     f"cores busy: more rounds on a busy machine do the same; time the children again when it is "
                     f"quiet (`puzzle front --out {shell_arg(out)} --remeasure`).")
    if stuck:
        parts.append(f"`budget_met` is False for {', '.join(stuck)} by more than the timing noise, and no child of "
                     f"the library meets the limits the budget feedback corrected by its measured speed "
                     f"(`children/budget_feedback.json`): more rounds do not help; a looser budget, or a library with "
                     f"faster variants, does.")
    return ((f"`budget_met` is False for {', '.join(within)} by less than the timing noise (two "
             "standard errors of this session's rounds): the feedback leaves such a child as it "
             "is, since another session would as likely measure it within its budget (`puzzle "
             f"front --out {shell_arg(out)} --remeasure` times the children again; a child needed "
             "strictly within it wants a budget set a little tighter).") if within else "",
            " ".join(parts))


def _prediction_gap_text(summary: pd.DataFrame) -> str:
    """' Here the children measured within 4.6 % of their predicted speed-ups.' from summary.csv's rows (fresh user:
    the drift note read as a 19 % error where every child was within 5 %); '' without a child of both figures."""
    rows = summary.iloc[1:]
    gap = (pd.to_numeric(rows["speedup"], errors="coerce")
           / pd.to_numeric(rows["predicted_speedup"], errors="coerce") - 1).abs().dropna()
    return f" Here the children measured within {gap.max():.1%} of their predicted speed-ups." if len(gap) else ""


def drift_rounds_text(rounds) -> str:
    """A sentence on the machine's drift over the budget feedback's measurement rounds (children/machine.json's
    "drift_rounds", written by `check_machine_drift`): its range per part, the report's figure being the last
    round's (a warning said in an earlier round was on record nowhere, stop 73's leftover). "" for one round."""
    if not isinstance(rounds, list) or len(rounds) < 2 or not all(isinstance(r, dict) for r in rounds):
        return ""
    spans = {}
    for part in dict.fromkeys(k for r in rounds for k in r):
        values = [v for r in rounds if isinstance(v := r.get(part), (int, float)) and math.isfinite(v)]
        if values:
            spans[part] = f"{min(values):.2f}-{max(values):.2f}" if max(values) - min(values) >= 0.005 \
                else f"{values[0]:.2f}"
    if not spans:
        return ""
    return (f" Over the budget feedback's {len(rounds)} measurement rounds the figure was "
            + ", ".join(f"{v} ({k})" for k, v in spans.items()) + "; those above are the last round's.")


def parent_runtime_note(summary: pd.DataFrame, tolerance: float = 0.03, drift: dict | None = None,
                        busy: float | None = None, out: Path | None = None) -> str:
    """A sentence for report.md when the parent itself measured more than `tolerance` (relative) off the cost table's
    prediction of it (each child's predicted runtime x predicted speed-up; the median over children): the children's
    `runtime_error`s then carry the session's machine speed as well, while their speed-ups, each against the parent of
    the same session, do not (fresh-user run, stop 54: every child at -0.08 without a word); "" otherwise.
    `drift`: children/machine.json's reference-workload ratios (second session / first); where they moved the other
    way, the sentence says so rather than call the machine slower or faster (breaker: "ran slower" beside a reference
    workload that took 0.78 times as long), and where it moved the same way by less than 3/4 of the gap, it says the
    machine's speed explains part of it (fresh user: 15 % beside 1.01 and 1.08); `busy`, the cores other jobs kept
    busy during the children's measurement, rules out other load as a cause below 0.1 cores (fresh user: "other
    load" beside 0.016 cores). A gap of more
    than SPOILED_TABLE_FACTOR times, beyond what the reference workload moved, is put down to the cost table's timing
    where the parent measured faster than predicted (`puzzle score --out OUT --retime`), to this session's where it
    measured slower (`puzzle front --out OUT --remeasure`) (reviewer: a table timed under load predicted the tiny
    parent at 4351 ms against 72 ms measured, and the note offered the machine's speed)."""
    try:
        rows = summary.set_index("name")
        parent = rows.loc[["parent"]]
        children = rows.drop(index="parent")
        predicted = pd.to_numeric(children["predicted_runtime_ms"], errors="coerce") * \
            pd.to_numeric(children["predicted_speedup"], errors="coerce")
        measured = float(pd.to_numeric(parent["runtime_ms"], errors="coerce").iloc[0])
    except (KeyError, TypeError, ValueError):  # no parent row, or a table without these columns
        return ""
    predicted = predicted[(predicted > 0) & (predicted < math.inf)]
    if len(parent) != 1 or not len(predicted) or not (math.isfinite(measured) and measured > 0):
        return ""
    expected = float(predicted.median())
    error = expected / measured - 1
    if not math.isfinite(error) or abs(error) <= tolerance:
        return ""
    ratios = {k: float(v) for k, v in (drift or {}).items()
              if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
    other_way = [k for k, v in ratios.items() if (v - 1) * error > 0]  # less time where the parent took more
    same_way = [k for k, v in ratios.items() if (v - 1) * error < 0]  # (a ratio of exactly 1 moved neither way)
    quiet = isinstance(busy, (int, float)) and busy < 0.1
    cause = (f"costs the table's per-subblock sums miss: other jobs kept only {busy:.2f} cores busy" if quiet else
             "other load on the cores it uses, or costs the table's per-subblock sums miss")
    ran = f"the parent ran {'slower' if error < 0 else 'faster'} in this session than the cost table predicts"
    if other_way and not same_way:
        why = (f"{ran}, while the fixed reference workload (Machine speed, below) moved the other way: the gap is in "
               f"the whole-model timing ({cause}), not in the machine's speed alone")
    elif other_way:  # reviewer: "moved the other way" of a reference whose compute part moved the same way
        why = (f"{ran}; the fixed reference workload (Machine speed, below) cannot say why, as its "
               f"{' and '.join(same_way)} part moved the same way and its {' and '.join(other_way)} part the other: "
               f"the gap is in the machine's speed, the whole-model timing ({cause}), or both")
    factor = max(expected / measured, measured / expected)
    moved = max((max(v, 1 / v) for v in ratios.values()), default=None)
    if ratios and moved - 1 < STILL_REFERENCE:  # the reference workload took as long (within 0.5 %): not the machine
        why = (f"{ran}, by {factor:.2f} times, while the fixed reference workload (Machine speed, below) did not move: "
               f"the gap is in the whole-model timing ({cause})")
    elif not other_way and moved is not None and moved - 1 < 0.75 * (factor - 1):  # fresh user: "ran slower" beside
        # a reference workload that took 1.01x and 1.08x as long, for a parent 15 % off: it explains less than 3/4
        why = (f"{ran}, by {factor:.2f} times, more than the fixed reference workload moved (Machine speed, below: "
               f"{moved:.2f} times at most): part of the gap is the machine's speed, the rest is in the whole-model "
               f"timing ({cause})")
    elif not other_way:
        why = (f"the machine ran {'slower' if error < 0 else 'faster'} in this session than when the cost table was "
               f"timed")
    if factor > SPOILED_TABLE_FACTOR and all(max(v, 1 / v) * SPOILED_TABLE_FACTOR < factor for v in ratios.values()):
        beyond = ", far beyond what the fixed reference workload moved," if ratios else ""  # (none recorded: unsaid)
        rerun = (f"`puzzle score --out {shell_arg(out)} --retime`" if out is not None else "`puzzle score --retime`") \
            if error > 0 else (f"`puzzle front --out {shell_arg(out)} --remeasure`" if out is not None else
                               "`puzzle front --remeasure`")
        # reviewer: a parent measured slower than predicted puts the blame on this session, not on the table
        slowed = "the cost table itself was most likely timed" if error > 0 else "this session was most likely run"
        why = (f"a gap of {factor:.3g} times{beyond} so {slowed} while other jobs or throttling slowed it (the parent "
               f"measured {'faster' if error > 0 else 'slower'} than the table predicts); {rerun} times it again")
    # a fresh user (stop 79) took the children's runtime_errors for a biased prediction: the consequence comes first
    return (f"The parent itself measured {measured:.4g} ms per request against the cost table's {expected:.4g} ms "
            f"(runtime_error {error:+.3f} on the parent), so the children's `runtime_error`s carry about as much: "
            f"they set this session's timings against the table's, while their speed-ups and budget use, each "
            f"against the parent of the same session, do not. Why: {why}.")


#: a reference-workload ratio within this of 1 (either way) counts as the machine's speed unmoved
#: (`parent_runtime_note`)
STILL_REFERENCE = 0.005

#: how many times off the cost table's prediction of the parent (beyond the reference workload's own drift) puts the
#: gap down to the table's timing in `parent_runtime_note`
SPOILED_TABLE_FACTOR = 2.0


def bld_comparison_caveat(speedup_bld: float, speedup_init: float, tolerance: float = 0.03) -> str:
    """A sentence for report.md when the BLD child and the init-only child of one budget were timed more than
    `tolerance` (relative) apart: their KLs then compare children of different speed, not the libraries alone
    (the budget feedback can re-solve the two differently); "" otherwise."""
    if not (math.isfinite(speedup_bld) and math.isfinite(speedup_init)) or speedup_init <= 0:
        return ""
    apart = max(speedup_bld, speedup_init) / min(speedup_bld, speedup_init) - 1  # the faster over the slower, as
    if apart <= tolerance:  # `bld_level_caveat`'s init_faster_by (reviewer: 13 % here, 15 % there)
        return ""
    faster = "BLD" if speedup_bld > speedup_init else "init-only"
    return (f" The two were timed {apart:.0%} apart (the {faster} child is faster), so "
            "this compares children of different speed as well as the libraries; front.png places each at its "
            "measured throughput.")


def feedback_asymmetry_caveat(resolved: list[str], bld: str, init: str) -> str:
    """A sentence for report.md's "Does BLD matter?" when the budget feedback re-solved one of the two children and
    not the other (`resolved_by_feedback`): the re-solved one was also picked among realized options (fresh user:
    "same search and budget" beside an init-only child re-solved under a looser limit and the BLD child kept)."""
    if len(resolved) != 1:
        return ""
    other = init if resolved[0] == bld else bld
    return (f" The budget feedback re-solved {resolved[0]} under a limit corrected by its measured speed but kept "
            f"{other} as first solved, so the two were not chosen alike (children/budget_feedback.json says why).")


def bld_level_caveat(kl_bld: float, kl_init: float, bld_tokens: int, tolerance: float = 0.02,
                     predicted: tuple[float, float] | None = None, init_faster_by: float = 0.0) -> str:
    """A sentence for report.md when the BLD child's evaluation KL is within `tolerance` (relative) of the init-only
    child's, or above it: one run then shows no gain from the library's training. `predicted`: the two
    children's summed replace-1-block KL (BLD, init-only), named where it ranked them the other way. A BLD child more
    than `tolerance` better gets the verdict in one sentence (fresh user: the section gave the numbers alone), hedged
    when the init-only child was timed `init_faster_by` (relative, above 3 %) faster (fresh user, stop 69: "pays"
    beside an init-only child 7 % faster)."""
    if not (math.isfinite(kl_bld) and math.isfinite(kl_init)) or kl_init <= 0:
        return ""
    if kl_bld < kl_init * (1 - tolerance):
        verdict = (f" The BLD child's KL is {1 - kl_bld / kl_init:.0%} below the init-only one's")
        if init_faster_by > 0.03:
            return (f"{verdict}, but the init-only child is the {init_faster_by:.0%} faster one, and a faster child "
                    f"replaces more: part of the gap is the speed, so this run does not settle whether the library's "
                    f"training pays at this budget.")
        return f"{verdict}: the library's training pays at this budget."
    if kl_bld <= kl_init * (1 + tolerance):
        return (f" The BLD child is not {tolerance:.0%} better here: with up to {bld_tokens} training tokens per "
                "subblock (bld.tokens) this run's library training does not show at this budget; a longer BLD, or a "
                "tighter budget that replaces more blocks, tests it harder.")
    # worse, not just level (fresh-user run, stop 54: 1.827 vs 1.707 nats was reported as "not 2% better")
    ratio = kl_bld / kl_init
    text = (f" The BLD child is {ratio - 1:.0%} worse than the init-only one here" if ratio < 10 else
            f" The BLD child's KL is {ratio:.3g} times the init-only one's here")
    try:
        predicted = tuple(float(v) for v in predicted) if predicted is not None else None
    except (TypeError, ValueError):
        predicted = None
    if predicted is not None and len(predicted) == 2 and all(math.isfinite(v) for v in predicted) \
            and predicted[0] < predicted[1]:
        text += (f", though the summed replace-1-block KL the search minimises predicted it better ({predicted[0]:.3f} "
                 f"vs {predicted[1]:.3f} nats): its trained subblocks score better one at a time than they act "
                 "together, and the search took more of them")
    return text + (f". With up to {bld_tokens} training tokens per subblock (bld.tokens) one run's library training "
                   "does not pay at this budget; `puzzle refine` chooses subblocks by how they act in the child, and a "
                   "longer BLD tests the training harder.")


_REPORT_UNREACHABLE, _REPORT_TIMES = "## Front targets out of reach", "## Time per stage (s)"


def unreachable_front(out: Path) -> dict | None:
    """DIR/search/chosen.json's `unreachable_front` (targets, reasons, largest_speedup: the front targets the last
    search found out of reach), or None when there are none or the file is missing or damaged."""
    chosen = Path(out) / "search" / "chosen.json"
    try:
        missed = read_json(chosen).get("unreachable_front") if chosen.is_file() else None
    except (PuzzleError, OSError, ValueError, AttributeError):
        return None
    return missed if isinstance(missed, dict) and missed else None


def reached_front_speedups(run: Run) -> tuple[float, ...]:
    """The run's front speed-ups less the targets its last search found out of reach (`unreachable_front`): the
    speed-ups the ratio table compares at (breaker: a 1e+09x column of "-" after the front said that target was left
    out)."""
    missed = unreachable_front(run.out) or {}
    targets = missed.get("targets")
    targets = set(map(str, targets)) if isinstance(targets, list) else set()
    kept = tuple(s for s in run.config.search.front_speedups if f"{s:g}" not in targets)
    return kept or tuple(run.config.search.front_speedups)


def _unreachable_section(run: Run) -> list[str]:
    """report.md's lines on the front targets no child reached (`unreachable_front`), [] when there are none."""
    missed = unreachable_front(run.out)
    return [_REPORT_UNREACHABLE, "", unreachable_front_message(missed) + ".", ""] if missed else []


def update_report_front(run: Run) -> None:
    """Bring an existing DIR/report.md's section on front targets out of reach up to date with
    DIR/search/chosen.json, which every search rewrites (`puzzle search` or `puzzle front` with other
    --front-speedups): the section is replaced, added before the timings, or removed; the rest of the report
    stays as `write_report` wrote it. Nothing is written when there is no report yet or it already agrees."""
    path = run.out / "report.md"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if _REPORT_UNREACHABLE in lines:  # the section runs to the next heading of its level
        at = lines.index(_REPORT_UNREACHABLE)
        end = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[at:end]
    else:
        at = lines.index(_REPORT_TIMES) if _REPORT_TIMES in lines else len(lines)
    lines[at:at] = _unreachable_section(run)
    if "\n".join(lines) != text:
        atomic_write_text(path, "\n".join(lines))


def front_inputs(run: Run) -> dict:
    """What a measured front depends on, as it is in DIR now (stored in DIR/front.json by `write_front`).

    settings: the run's configuration without the report section and score.max_contention (how timing
    windows are checked, --max-contention, not what is measured), the front's speed-ups as a sorted
    set; children: each searched name (DIR/search/chosen.json) with the choice its record holds now;
    tables: the sha256 of every score and cost table (DIR/score/score_table*.csv, cost*.csv; other CSVs a
    user keeps there do not count); data: the splits' settings_sha256 in DIR/data/manifest.json (which hashes
    every source's contents and the tokenizer); splits: the sha256 of each packed split (calib, score, eval) as the
    manifest records it, which tells an evaluation-only change (`timings_still_valid`). Unreadable parts are None.
    """
    config = _front_settings(run.config.to_dict())
    config["search"]["front_speedups"] = sorted(set(config["search"]["front_speedups"]))
    children = None
    try:
        names = read_json(run.out / "search" / "chosen.json")["names"]
        children = {str(n): list(read_json(run.out / "search" / f"{n}.json")["choice"]) for n in names}
    except (PuzzleError, OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    tables = {t.name: sha256_file(t) for t in sorted((run.out / "score").glob("*.csv")) if _is_front_table(t.name)} \
        if (run.out / "score").is_dir() else {}
    data, splits = None, None
    try:  # the splits' settings with every source's and the tokenizer's sha256: another evaluation text, same path
        manifest = read_json(run.out / "data" / "manifest.json")
        data = manifest["settings_sha256"]
        splits = {split: manifest["splits"][split].get("sha256") for split in ("calib", "score", "eval")}
    except (PuzzleError, OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        pass
    return json.loads(json.dumps({"settings": config, "children": children, "tables": tables, "data": data,
                                  "splits": splits}, default=lambda o: str(o)))


def _front_settings(config, parent_path: bool = True):
    """A configuration dict (`RunConfig.to_dict`, or one DIR/front.json stored) without what a front does not
    depend on: the report section, score.max_contention, the default score.select_context, an empty search.exclude,
    the default search.feedback_candidates (any, with no budget_feedback round), search.budget_slack with no round,
    score.chunk, score.tokens, score.position_stride and bld.checkpoint_s (a changed score table or library the
    front's table hashes catch) and, with
    `parent_path=False`,
    parent.path (for a run whose parent.json records the parent's weights hash: every stage that loads the parent
    then accepts only those weights wherever they lie, `check_parent_weights`, so a moved parent is the same
    parent). Other values (None, a damaged record) as they are."""
    if not isinstance(config, dict):
        return config
    config = {k: v for k, v in config.items() if k != "report"}
    # breaker: bld.checkpoint_s and score.chunk (how often a training saves, sequences per forward pass) timed
    # every child again; what they change, a library or a score table, the front's table hashes catch
    # and score.tokens, score.position_stride: which text and positions score the table (breaker: --score-tokens 300
    # for 256 left the table byte for byte and still timed every child again)
    for section, key in (("score", "max_contention"), ("score", "chunk"), ("score", "tokens"),
                         ("score", "position_stride"), ("bld", "checkpoint_s"),
                         *(() if parent_path else (("parent", "path"),))):
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if k != key}
    if isinstance(config.get("score"), dict) and config["score"].get("select_context") == ScoreConfig.select_context:
        # the default: as a front.json written before score.select_context existed
        config["score"] = {k: v for k, v in config["score"].items() if k != "select_context"}
    if isinstance(config.get("search"), dict) and not config["search"].get("exclude", True):
        # no exclusions: as a front.json written before search.exclude existed (which would else read as a change)
        config["search"] = {k: v for k, v in config["search"].items() if k != "exclude"}
    search = config.get("search")
    if isinstance(search, dict) and (search.get("feedback_candidates") == SearchConfig.feedback_candidates
                                     or search.get("budget_feedback") == 0):
        # the default: as a front.json written before search.feedback_candidates existed; with no feedback round
        # it chooses nothing (breaker: changing it on a budget_feedback 0 run timed the front again)
        config["search"] = {k: v for k, v in config["search"].items() if k != "feedback_candidates"}
    if isinstance(search, dict) and search.get("budget_feedback") == 0:  # the slack steers feedback rounds alone
        config["search"] = {k: v for k, v in config["search"].items() if k != "budget_slack"}
    return config


def _is_front_table(name: str) -> bool:
    """The score and cost tables `puzzle score` writes (score_table*.csv, cost*.csv), not a user's CSV in score/."""
    return name.endswith(".csv") and name.startswith(("score_table", "cost"))


def write_front_inputs(run: Run, drawn: bool = True) -> None:
    """DIR/front.json: `front_inputs` and the sha256 of front.csv and of the summary.csv it was drawn from (whole, and
    its measurement columns, `summary_timings_sha`), written after front.csv and front.png. With `drawn` False it is
    written right after a measurement's summary.csv, before the front is drawn (front_csv None: `front_is_current`
    says the front is to be drawn again, and `timings_still_valid` keeps the timings, so a run interrupted between
    the two times nothing again)."""
    summary = run.out / "summary.csv"
    atomic_write_json(run.out / "front.json", {**front_inputs(run),
                                               "front_csv": sha256_file(run.out / "front.csv") if drawn else None,
                                               "summary_csv": sha256_file(summary) if summary.is_file() else None,
                                               "summary_timings": summary_timings_sha(summary)})


#: `front_is_current`'s reason when a searched child's record cannot be read (`puzzle front` solves again first)
UNREADABLE_CHILDREN = "search/chosen.json or a searched child's record is missing or unreadable"


def front_is_current(run: Run) -> str | None:
    """Why DIR/front.csv cannot be reused as it is, or None when it can.

    It can when DIR/front.json (written with it) matches what the front depends on now
    (`front_inputs`: the run's settings with this command's flags, the searched children's
    choices as their records hold them, the score and cost tables by content), front.csv is
    the file it was written with, and the measurement's other records (children/machine.json,
    budget_feedback.json), where present, are readable. File times play no part, so a copied run
    reuses its front and a table rewritten with the same bytes does not force a new measurement.
    """
    path, stamp = run.out / "front.csv", run.out / "front.json"
    if not path.is_file():
        return "no front.csv yet"
    if not stamp.is_file():
        return "no front.json (a front from an earlier version, or one whose writing was interrupted)"
    try:
        stored = read_json(stamp)
        csv_sha = sha256_file(path)
        have = set(pd.read_csv(path)["name"].astype(str))
        if not (isinstance(stored, dict) and isinstance(stored.get("settings"), dict)
                and isinstance(stored.get("tables") or {}, dict)):
            raise TypeError
    except (PuzzleError, ValueError, KeyError, TypeError, UnicodeDecodeError):  # unreadable JSON/CSV, a field missing
        return "front.csv or front.json is unreadable"
    if stored.get("front_csv") != csv_sha:
        return "front.csv is not the file front.json was written with"
    if (problem := _measurement_records_problem(run)) is not None:
        return problem
    now = front_inputs(run)
    parent_path = _recorded_weights_sha(run.out) is None  # a run recorded before the weights hash: by the path
    settings = _front_settings(stored.get("settings"), parent_path)  # a front.json written when the limit counted
    now["settings"] = _front_settings(now["settings"], parent_path)
    if now["settings"] != settings:
        # which ones, with the values where short (a fresh user saw "[search]" after `search --speedup 2`)
        def shown(config):  # the default select_context `_front_settings` drops, back for the message ("8 -> 0")
            score = config.get("score") if isinstance(config, dict) else None
            if isinstance(score, dict) and "select_context" not in score:
                return {**config, "score": {**score, "select_context": ScoreConfig.select_context}}
            return config or {}

        changed = differing_settings(shown(settings), shown(now["settings"])) or ["?"]
        more = f", and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"the settings changed ({'; '.join(changed[:3])}{more})"
    if now["children"] is None:
        return UNREADABLE_CHILDREN
    if now["children"] != stored.get("children"):
        return "the searched children are not the ones front.csv measured"
    if not set(n for n in now["children"] if not n.endswith("-init")) <= have:
        return "front.csv lacks some searched children"
    if not now["tables"]:
        return "no score or cost table"
    if now["tables"] != {k: v for k, v in (stored.get("tables") or {}).items() if _is_front_table(k)}:
        return "the score or cost tables changed since the front was measured"
    if stored.get("data") is None:
        return "front.json predates its record of the data splits (written by an earlier version)"
    if now["data"] is None or now["data"] != stored.get("data"):
        return ("the data splits (DIR/data/manifest.json: the texts' contents, the tokenizer) are not the ones the "
                "front was evaluated on")
    return None


def stage_front(run: Run, remeasure: bool = False) -> pd.DataFrame:
    """Solve every front budget, realize, evaluate and measure the children, write front.csv/png.

    The parent is loaded first: a parent that cannot be loaded (moved, or a config.json edited by hand) fails the
    stage before the search re-solves and rewrites DIR/search/ (budget-feedback records included). `remeasure`: an
    interrupted call's timings (PENDING_MEASUREMENT), which are otherwise kept, are timed again."""
    run.parent  # noqa: B018 (loaded here, used by realize_and_measure)
    records = stage_search(run)
    main = read_json(run.out / "search" / "chosen.json")["main"]
    if remeasure:
        drop_pending_measurement(run)
    summary, _, _ = realize_and_measure(run, records)
    return write_front(run, summary, main)
