"""Export a child as a Hugging Face folder in the nemotron-nas (DeciLM) format.

The folder loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and needs
only torch and transformers: it carries its modeling code (verbatim copies of `architecture.py`,
`modeling.py`, `configuration_decilm.py` and `modeling_decilm.py`). What vLLM, TensorRT-LLM and
Megatron read is the config.json: Llama fields plus `block_configs` (DESIGN.md, "Export format").

    model.safetensors        weights, Puzzle/HF-Llama names; a tied LM head is stored once (as the embedding)
    config.json              model_type "nemotron-nas", architectures, auto_map, block_configs, dtype
    generation_config.json   bos / eos / pad token ids
    tokenizer files          tokenizer.save_pretrained
    *.py                     the four code files
    README.md                what it is, a per-layer table, how to load it, the export warnings

Writing is atomic: everything goes to a temporary folder beside `out_dir`, renamed into place at
the end, so an interrupted export leaves no half-written checkpoint.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from . import __version__
from .architecture import ModelConfig, ffn_mult_to_intermediate_size, intermediate_size_to_ffn_mult
from .configuration_decilm import config_dict_from_model_config
from .errors import PuzzleError
from .io import file_in_the_way, file_mode
from .modeling import PuzzleForCausalLM

CODE_FILES = ("architecture.py", "modeling.py", "configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}


@dataclass(frozen=True)
class ExportResult:
    """Where the checkpoint went and what a user should know about it (one sentence per warning)."""

    path: Path
    warnings: tuple[str, ...]
    replaced: str | None = None  # what the folder held before, when it was another model's export


def export_provenance(info: dict | None, by_path: bool = False) -> str:
    """A short description of an export from its config.json "puzzle" entry ("child-1.5x", "gkd of ...").
    Compared to tell one export from another: a merge's inputs by their weights' hashes, sorted; `by_path`: as a
    message shows it, the inputs by the paths recorded, in their order (breaker: a refusal named hashes alone)."""
    info = info if isinstance(info, dict) else {}
    for stage, key in (("gkd", "child"), ("sft", "model")):
        if isinstance(info.get(stage), dict):
            training = info[stage].get("training")  # `training_ref`; absent in exports of earlier versions
            return f"{stage} of {info[stage].get(key, '?')}" + (f" (training {training})" if training else "")
    if isinstance(info.get("merge"), dict):  # the inputs with their weights as a set: the order only pairs them
        merge = info["merge"]
        inputs, weights = list(map(str, merge.get("inputs") or [])), merge.get("weights")
        shas = merge.get("inputs_sha")
        if isinstance(shas, list) and len(shas) == len(inputs) and not by_path:  # by weights (`weights_sha`)
            inputs = [f"weights {sha}" for sha in map(str, shas)]
        if isinstance(weights, list) and len(weights) == len(inputs):
            inputs = [f"{i} x{w:.6g}" if isinstance(w, (int, float)) else f"{i} x{w}" for i, w in zip(inputs, weights)]
        return f"merge of {', '.join(inputs if by_path else sorted(inputs))}" + (
            f" as {merge['dtype']}" if merge.get("dtype") else "")
    if info.get("stage") == "rpo":
        return f"rpo ({info.get('loss', '?')}) of {info.get('source', '?')}"
    if info.get("name"):
        return f"{info['name']}" + (f" of run {info['run']}" if info.get("run") else
                                    f" of run parent {info['parent']}" if info.get("parent") else "")
    return "a model export"


def model_ref(path) -> str:
    """An input model's path as provenance records it: `~` expanded, FOLDER/config.json as FOLDER, resolved,
    so that one folder spelled two ways (./m, m/, an absolute path, a symlink) is one model."""
    path = Path(path).expanduser()
    return str((path.parent if path.name == "config.json" else path).resolve())


def run_ref(run_dir, dest) -> str:
    """A run directory as the provenance of an export at `dest` records it: relative to `dest` when `dest`
    lies inside the run (so a moved or copied run keeps its outputs' provenance), else resolved."""
    run_dir, dest = Path(run_dir).expanduser().resolve(), Path(dest).expanduser().resolve()
    return os.path.relpath(run_dir, dest) if run_dir in dest.parents else str(run_dir)


def training_ref(meta: dict, work, dest) -> str:
    """What a trained export records of the training that made it (the "training" field of its gkd / sft entry,
    part of `export_provenance`): sha256 (16 hex) of `meta`, the settings and inputs its checkpoint must match to
    be resumed (`train_utils.check_resumable`), and of the work folder as seen from `dest`'s folder (so a run, or
    DEST moved together with DEST.gkd-work, keeps it). Another --tokens, --lr, --seed, data or --work gives
    another reference: that training does not replace this one's export (`check_export_target`)."""
    dest = Path(dest).expanduser().resolve()
    where = os.path.relpath(Path(work).expanduser().resolve(), dest.parent)
    text = json.dumps({"meta": meta, "work": where}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: config.json "puzzle" entries of an export whose weights were trained after the search (not rebuilt by `export`)
TRAINED_KEYS = ("gkd", "sft", "merge")


def export_info(folder) -> dict | None:
    """The config.json "puzzle" entry of the export in `folder` ({} when it has none or not a dict), or None
    when `folder` holds no readable config.json."""
    try:
        info = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("puzzle")
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else {}


def count_text(n: int) -> str:
    """A parameter count as text: millions from 10M up, else every digit (breaker: a tiny model's export said "0.0M
    parameters")."""
    return f"{n / 1e6:.1f}M" if n >= 10_000_000 else f"{n:,}"


def shown_provenance(info: dict | None, folder, by_path: bool = False) -> str:
    """`export_provenance` of an export's "puzzle" entry as a message shows it: a run recorded relative to the
    export's `folder` ("../..") named by its path, or where that leads to no run (a folder copied out of it) by
    its "run_at" (breaker: `sft` said it "replaced the export of child-2x of run ../.."); so is a run that a gkd or
    sft entry names relative to it (`_run_by_path`)."""
    from .io import is_run_directory

    shown = export_provenance(info, by_path=by_path)
    ref = info.get("run") if isinstance(info, dict) else None
    if isinstance(ref, str) and ref and not Path(ref).is_absolute() and f" of run {ref}" in shown:
        where = os.path.normpath(Path(folder).absolute() / ref)
        at = info.get("run_at")
        if not is_run_directory(Path(where)) and isinstance(at, str) and at:
            where = at
        shown = shown.replace(f" of run {ref}", f" of run {where}")
    return _run_by_path(shown, folder)


def _run_by_path(text: str, folder) -> str:
    """`text` (an `export_provenance`) with a run recorded relative to the export `folder` (`run_ref`: "../..")
    named by its path, as `shown_provenance` names it."""
    return re.sub(r" of run ((?:\.\.)(?:/\.\.)*)(?=[ )]|$)",
                  lambda m: f" of run {os.path.normpath(Path(folder).absolute() / m.group(1))}", text)


def _earlier_export(out_dir: Path) -> tuple[str, bool] | None:
    """(export_provenance, trained) of the export now in out_dir, or None when there is none."""
    info = export_info(out_dir)
    if info is None:
        return None
    return export_provenance(info), any(k in info for k in TRAINED_KEYS) or info.get("stage") == "rpo"


#: the ends of `export_warnings`' vLLM sentences, which `shorten_repeated_warnings` says in full only once
VLLM_CANNOT_SERVE = "vLLM cannot serve this checkpoint (transformers with trust_remote_code=True can)"
VLLM_LINEAR_ADVICE = "search with --vllm-compatible to leave linear variants out"
FFN_MULT_EXPLANATION = "; those entries store intermediate_size="
#: (where an explanation starts, what it becomes once said): `shorten_repeated_warnings`
_EXPLANATIONS = ((VLLM_CANNOT_SERVE, "vLLM cannot serve it (as above)"),
                 (FFN_MULT_EXPLANATION, "; ffn_mult cannot express it (as above)"))


def shorten_repeated_warnings(warnings, said: set) -> list[str]:
    """`warnings` (of `export_warnings`) as a run prints them after others: an explanation that ended an earlier
    warning in the same words (`said`, updated here; numbers aside) is shortened to "(as above)", so a run that
    exports several children says each once: the vLLM sentence and advice, and what an FFN width ffn_mult cannot
    express means for which tools. The folder's own README.md keeps the whole text."""
    out = []
    for w in warnings:
        for marker, short in _EXPLANATIONS:
            at = w.find(marker)
            if at < 0:
                continue
            key = re.sub(r"\d+", "N", w[at:])
            if key in said:
                w = w[:at] + short
            said.add(key)
            break
        out.append(w)
    return out


def vllm_layout_problems(config: ModelConfig) -> list[str]:
    """Layouts vLLM's DeciLM model cannot run, beside linear subblocks (vllm-project/vllm,
    model_executor/models/nemotron_nas.py): a layer skips its input norm when its attention is no_op, so an FFN
    before the first attention reaches `post_attention_layernorm(hidden, None)` and fails, and a model without a
    gqa attention has no KV heads to size the cache with (its final norm meets a None residual too)."""
    attention = [i for i, b in enumerate(config.blocks) if b.attention.kind != "no_op"]
    if not any(b.attention.kind == "gqa" for b in config.blocks):
        return ["no layer keeps a GQA attention: vLLM cannot size a KV cache for it (nor run its final norm)"]
    early = [i for i, b in enumerate(config.blocks[:attention[0]]) if b.ffn.kind != "no_op"]
    if early:
        return [f"FFNs in layers {early} come before the first attention (layer {attention[0]}): vLLM's DeciLM layer "
                f"then normalises them with a residual of None and fails; keep an attention in layer 0 "
                f"(--vllm-compatible does)"]
    return []


def export_warnings(config: ModelConfig) -> list[str]:
    """Warnings for a child's export: layers vLLM cannot serve, and FFN widths ffn_mult cannot express.

    vLLM's DeciLM implementation does not serve `replace_with_linear` subblocks nor the layouts of
    `vllm_layout_problems`. An entry whose width the DeciLM rule (`architecture.ffn_mult_to_intermediate_size`)
    cannot give back has no ffn_mult, only the exact `intermediate_size`, which current vLLM reads when
    ffn_mult is absent; tools that read only ffn_mult cannot load it.
    """
    out = [f"{problem}; {VLLM_CANNOT_SERVE}" for problem in vllm_layout_problems(config)]
    linear_attn = [i for i, b in enumerate(config.blocks) if b.attention.kind == "linear"]
    linear_ffn = [i for i, b in enumerate(config.blocks) if b.ffn.kind == "linear"]
    if linear_attn or linear_ffn:  # a kind with no linear subblock is left out ("attention in layers []" was said)
        where = ", ".join(f"{kind} in layers {layers}" for kind, layers in (("attention", linear_attn),
                                                                            ("ffn", linear_ffn)) if layers)
        out.append(f"replace_with_linear subblocks ({where}): {VLLM_CANNOT_SERVE}; {VLLM_LINEAR_ADVICE}")
    inexact: dict[int, list[int]] = {}
    for i, b in enumerate(config.blocks):
        if b.ffn.kind == "swiglu" and not intermediate_size_to_ffn_mult(b.ffn.intermediate_size, config.hidden_size)[1]:
            inexact.setdefault(b.ffn.intermediate_size, []).append(i)
    for width, layers in sorted(inexact.items()):
        mult, _ = intermediate_size_to_ffn_mult(width, config.hidden_size)
        rebuilt = ffn_mult_to_intermediate_size(mult, config.hidden_size)
        out.append(
            f"FFN width {width} (layers {layers}) cannot be written as ffn_mult (ffn_mult={mult} gives {rebuilt})"
            f"{FFN_MULT_EXPLANATION}{width} and no ffn_mult, which vLLM reads, but tools that read "
            "only ffn_mult (older vLLM, TensorRT-LLM) cannot load them; use widths that are multiples of 256 for those "
            "tools")
    return out


def _resolve_dtype(model: PuzzleForCausalLM, dtype) -> torch.dtype:
    if dtype is None:
        return next(model.parameters()).dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise PuzzleError(f"export dtype {dtype!r} is not a torch floating dtype; use float32, bfloat16 or float16")
    return resolved


def _state_dict(model: PuzzleForCausalLM, dtype: torch.dtype, untie: bool = False) -> dict[str, torch.Tensor]:
    """Weights by their HF names in `dtype`; a tied LM head is left out (loaders tie it back), or with `untie` stored
    as a copy of the embedding (tools that read `lm_head.weight` by name)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        if sd["lm_head.weight"].data_ptr() != sd["model.embed_tokens.weight"].data_ptr():
            raise PuzzleError("config says tie_word_embeddings but lm_head.weight is not the embedding tensor; "
                              "re-tie them (lm_head.weight = model.embed_tokens.weight) or untie the config")
        del sd["lm_head.weight"]
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
    if untie and model.config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()  # its own storage: safetensors refuses shared
    return out


def _config_json(config: ModelConfig, dtype: torch.dtype, extra_info: dict | None, untie: bool = False) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["DeciLMForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        **config_dict_from_model_config(config),
        **({"tie_word_embeddings": False} if untie else {}),
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "transformers_version": transformers.__version__,
        "puzzle": {"version": __version__, "source": dict(config.extra), **(extra_info or {})},
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def _generation_config_json(config: ModelConfig) -> dict:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id, "transformers_version": transformers.__version__}


def _fusion_lines(info: dict | None) -> list[str]:
    """README lines for a child `puzzle fuse` made (config.json's "puzzle" entry names the child and its runs)."""
    info = info if isinstance(info, dict) else {}
    runs, distilled = info.get("fused_runs"), info.get("distilled")
    if not info.get("fused_from") or not isinstance(runs, list):
        return []
    if isinstance(distilled, list) and distilled:  # fresh user: "the others" was said of a single run
        rest = "; the others are the folded parallel form." if len(distilled) < len(runs) else "."
        trained = (f"{'Runs' if len(distilled) > 1 else 'Run'} {', '.join(map(str, distilled))} "
                   f"{'were' if len(distilled) > 1 else 'was'} distilled locally toward the layers "
                   f"{'they replace' if len(distilled) > 1 else 'it replaces'}{rest}")
    else:
        trained = "Every run is the folded parallel form (none distilled)."
    return ["## FFN Fusion", "",
            f"Made by `puzzle fuse` from `{info['fused_from']}`: the FFNs of its layers {', '.join(map(str, runs))} "
            "(first-last layer of each run, counted in that child) run in parallel, each run as one layer here, "
            f"so the layers below are numbered anew (FFN Fusion, Bercovich et al. 2025). {trained}", ""]


def _readme(config: ModelConfig, dtype: torch.dtype, warnings: list[str], num_parameters: int,
            untie: bool = False, info: dict | None = None) -> str:
    H, C = config.num_attention_heads, config.hidden_size
    rows = []
    for i, b in enumerate(config.blocks):
        a, f = b.attention, b.ffn
        if a.kind == "gqa":
            attn = f"GQA, {a.num_kv_heads} KV head{'s' if a.num_kv_heads != 1 else ''}"
        else:
            attn = "linear (replace_with_linear)" if a.kind == "linear" else "removed (no_op)"
        if f.kind == "swiglu":
            mult, exact = intermediate_size_to_ffn_mult(f.intermediate_size, C)
            ffn = f"SwiGLU, width {f.intermediate_size} ({f'ffn_mult {mult:g}' if exact else 'no ffn_mult expresses it'})"
        else:
            ffn = "linear (replace_with_linear)" if f.kind == "linear" else "removed (no_op)"
        rows.append(f"| {i} | {attn} | {ffn} |")
    lines = [
        "# Puzzle child (nemotron-nas / DeciLM format)",
        "",
        "A Llama-family decoder whose layers differ, found by Puzzle (distillation-based neural architecture search).",
        f"{config.num_hidden_layers} layers, hidden size {C}, {H} query heads of dim {config.head_dim}, "
        f"vocabulary {config.vocab_size}, {count_text(num_parameters)} parameters, stored as "
        f"{str(dtype).removeprefix('torch.')}.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "```",
        "",
        "(transformers 5 reads config.json for the tokenizer as well, hence the flag there too.)",
        "",
        "The modeling code in this folder needs only torch and transformers. `config.json` has one",
        "`block_configs` entry per layer (attention: no_op / replace_with_linear / n_heads_in_group;",
        "ffn: no_op / replace_with_linear / ffn_mult where the DeciLM rule gives the width back, plus the exact "
        "`intermediate_size`).",
        "",
        *(["The LM head is tied to the embedding and not stored (`tie_word_embeddings: true`, as in the parent).",
           "TensorRT-LLM's nemotron_nas converter reads `lm_head.weight` by name: `puzzle export --untie-embeddings`",
           "stores it as a copy of the embedding.", ""] if config.tie_word_embeddings and not untie else []),
        *(["The parent ties its LM head to the embedding; here it is stored as a copy (`lm_head.weight`,",
           "`tie_word_embeddings: false`) for tools that read it by name, such as TensorRT-LLM.", ""]
          if config.tie_word_embeddings and untie else []),
        *_fusion_lines(info),
        "## Layers",
        "",
        "| layer | attention | FFN |",
        "|---|---|---|",
        *rows,
    ]
    if warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
    return "\n".join(lines) + "\n"


def export_checkpoint(model: PuzzleForCausalLM, tokenizer, out_dir: str | os.PathLike, *, dtype=None,
                      extra_info: dict | None = None, overwrite: bool = False,
                      replace_trained: bool = False, also_same=(), own: bool = False,
                      untie_embeddings: bool = False) -> ExportResult:
    """Write `model` as an HF folder in the nemotron-nas format (see the module docstring for the files).

    Args:
        model: the child; its `config.blocks` become `block_configs`; `num_key_value_heads` and
            `intermediate_size` in config.json are its config's (the parent's).
        tokenizer: an HF tokenizer (`save_pretrained` is called), or None to write none (warned).
        out_dir: the folder to create; it must not exist or be empty, or with overwrite=True be an
            earlier export (`is_export_folder`), which is replaced.
        dtype: weight dtype (torch.dtype or name such as "bfloat16"); default the model's.
        extra_info: JSON-ready provenance stored under config.json's "puzzle" key.
        overwrite: replace an earlier export at out_dir.
        replace_trained: with overwrite, also replace trained weights of another provenance (for a
            folder the caller owns, such as rpo's OUT/model); see `check_export_target`.
        also_same: earlier provenances that are this same export (`check_export_target`).
        own: with overwrite, out_dir is the caller's own earlier export by its record, which replaces it even
            where a file other than the weights is damaged (`check_export_target`).
        untie_embeddings: a model whose LM head is tied to the embedding gets `lm_head.weight` stored as a copy
            and `tie_word_embeddings: false` (TensorRT-LLM's nemotron_nas converter reads the head by name; the
            logits are the same, the file is one vocabulary x hidden matrix larger). No effect on an untied model.

    Returns:
        ExportResult(path, warnings, replaced): see `export_warnings`; `replaced` describes another
        model's export that was in out_dir (`export_provenance`), None for a re-export of the same
        model or a new folder; nothing is printed.

    Raises:
        PuzzleError: out_dir is a file, a non-empty folder without overwrite=True or one that is not an
            earlier export (a run directory, a folder of other files); a bad dtype;
            a tied config whose LM head is not the embedding; weights holding NaN or inf, or overflowing
            `dtype` (`_check_finite`).
    """
    out_dir = Path(out_dir)
    now = export_provenance({"source": dict(model.config.extra), **(extra_info or {})})
    check_export_target(out_dir, overwrite, provenance=None if replace_trained else now, also_same=also_same, own=own)
    info = export_info(out_dir)  # the export now in out_dir (None: none)
    earlier = export_provenance(info) if info is not None else None
    config = model.config
    torch_dtype = _resolve_dtype(model, dtype)
    warnings = export_warnings(config)
    if tokenizer is None:
        warnings.append("no tokenizer was given: the folder has none; copy the parent's tokenizer files into it")

    untie = bool(untie_embeddings and config.tie_word_embeddings)
    state = _state_dict(model, torch_dtype, untie)
    _check_finite(state, model, torch_dtype)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    except OSError as e:  # breaker: a --dest under /proc ended in a FileNotFoundError traceback
        raise PuzzleError(f"cannot make the export's folder beside {out_dir} ({e.strerror or e}); give a destination "
                          f"on a file system you can write to") from e
    try:
        mode = file_mode()
        tmp.chmod(mode | (mode & 0o444) >> 2)  # mkdtemp makes it private: a folder as plainly made (x where r)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", _config_json(config, torch_dtype, extra_info, untie))
        _write_json(tmp / "generation_config.json", _generation_config_json(config))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        here = Path(__file__).parent
        for name in CODE_FILES:
            shutil.copyfile(here / name, tmp / name)
        readme = _readme(config, torch_dtype, warnings, model.num_parameters(), untie, extra_info)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        for f in tmp.iterdir():  # safetensors writes its file 0o600: every file as plainly created
            if f.is_file():
                f.chmod(file_mode())
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_temp(out_dir)  # what an earlier export killed mid-write left beside it
    replaced = shown_provenance(info, out_dir) if earlier not in (None, now, *also_same) else None
    return ExportResult(out_dir, tuple(warnings), replaced=replaced)


def check_export_target(out_dir: Path, overwrite: bool = False, keep=(), provenance: str | None = None,
                        training_pending: bool = False, work=None, also_same=(), own: bool = False) -> None:
    """Refuse an export folder that would lose something. Call it before long work, too.

    Refused: a file; a path under a file; a link or mount point (an export replaces the folder, not what a link points
    to); a name too long for the temporary folder; the current directory or one above it; a folder
    holding or being one of `keep` (the run directory, the inputs, a work folder); a folder inside an
    export (which would then no longer be one) or inside `work` (the training's work folder, which a
    fresh start deletes); a non-empty folder without `overwrite`, or with it one that is not an
    earlier export holding only what an export writes (`is_export_folder`) unless `own` (the caller's
    record shows the folder is its own earlier export: weights as written, another file damaged);
    with `provenance` (what
    the new export will be, `export_provenance`), an earlier export whose weights were trained
    (gkd, sft, merge, rpo) of another provenance: only a rerun of the same training (for gkd and sft,
    the same `training_ref`) replaces it. `training_pending`: `provenance` names a gkd / sft input
    without its `training_ref`, which is known only once the inputs are loaded; an earlier training
    of the same kind passes this check (it may be this training with its input moved since), which
    the caller makes again with the whole provenance. Two provenances with one `training_ref` are
    one training whatever paths they name (`_same_training`). `also_same`: earlier provenances that
    are this same export too (as an earlier version recorded it).

    Raises:
        PuzzleError: naming the folder and what to give instead.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PuzzleError(f"export target {out_dir} is a file; choose a folder path")
    if (above := file_in_the_way(out_dir)) is not None:
        raise PuzzleError(f"export target {out_dir}: {above} is a file, so no folder can be made under it")
    if len(out_dir.name.encode()) > 200:
        raise PuzzleError(f"export target {out_dir.name[:40]}...: the folder name is longer than 200 bytes; shorten it")
    if out_dir.is_symlink():
        raise PuzzleError(f"export target {out_dir} is a link (to {os.readlink(out_dir)}); an export replaces the folder "
                          f"itself, so give the folder's own path or a new one")
    if out_dir.is_dir() and _is_mount_point(out_dir):  # breaker: a container's volume; os.replace gave EBUSY
        raise PuzzleError(f"export target {out_dir} is a mount point, which an export cannot replace (it writes a "
                          f"new folder and renames it into place); give a folder inside it, e.g. {out_dir / 'model'}")
    here = Path.cwd().resolve()
    target = out_dir.resolve()
    if target in (here, *here.parents):
        raise PuzzleError(f"export target {str(out_dir) or '(empty)'} is the current directory or one above it; "
                          f"give a new folder path")
    for path in keep:
        path = Path(path).expanduser().resolve()
        if path == target or target in path.parents:
            raise PuzzleError(f"export target {out_dir} is or holds {path}, which the command reads or writes; "
                              f"give a folder outside it")
    if (export := next((p for p in target.parents if p.is_dir() and is_export_folder(p)), None)) is not None:
        raise PuzzleError(f"export target {out_dir} is inside the exported model {export}, which would then hold "
                          f"another model's files; give a folder of its own")
    if work is not None and Path(work).expanduser().resolve() in target.parents:
        raise PuzzleError(f"export target {out_dir} is inside the work folder {work}, which a fresh start of the "
                          f"training deletes; give a folder outside it")
    if (other := next((p for p in target.parents if _is_training_work(p)), None)) is not None:  # breaker: accepted
        raise PuzzleError(f"export target {out_dir} is inside {other}, the work folder of a gkd or sft training "
                          f"(its checkpoint.pt), which a fresh start of that training deletes; give a folder outside "
                          f"it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite and own):
        if not overwrite:
            raise PuzzleError(f"export folder {out_dir} is not empty; choose another folder or pass overwrite=True")
        problem = export_folder_problem(out_dir)
        if problem:  # overwrite replaces an earlier export, never a folder of other files
            raise PuzzleError(f"{out_dir} is not empty and is not an earlier export holding only an export's files "
                              f"(config.json with block_configs, the model code, weights, tokenizer, README): "
                              f"{problem}; so it is left as it is: give a new or empty folder, or move it away")
        earlier = _earlier_export(out_dir)
        # pending: the training's reference is known only once the inputs are loaded, and may match the earlier
        # one's even under another input path (a moved child); the caller's second check decides
        same = earlier is not None and (earlier[0] == provenance or earlier[0] in also_same
                                        or _same_training(earlier[0], provenance) or (
            training_pending and provenance is not None and " (training " in earlier[0]
            and earlier[0].split(" ", 1)[0] == provenance.split(" ", 1)[0]))
        if provenance is not None and earlier is not None and earlier[1] and not same:
            hint = _same_training_hint(earlier[0], provenance)
            # a merge by paths, not hashes; a run recorded relative to the export, by its path (a README checker:
            # "gkd of child-2x of run ../.." on both sides)
            shown = shown_provenance(export_info(out_dir), out_dir, by_path=True)
            shown += ", inputs as recorded then" if shown.startswith("merge of ") else ""
            this = "" if provenance.startswith("merge of weights ") else f" ({_run_by_path(provenance, out_dir)})"
            raise PuzzleError(f"{out_dir} holds trained weights ({shown}) that this export{this} would "
                              f"replace; give a new folder, or delete that one first if it is no longer needed{hint}")


def _is_training_work(folder: Path) -> bool:
    """Whether `folder` is a gkd / sft work folder: a checkpoint.pt beside the summary its training writes at the
    end (gkd.json, sft.json), or in a folder of a default work name (DEST.gkd-work, DEST.sft-work, RUN/gkd/<name>)."""
    return (folder / "checkpoint.pt").is_file() and (
        any((folder / f).is_file() for f in ("gkd.json", "sft.json"))
        or folder.name.endswith((".gkd-work", ".sft-work")) or folder.parent.name == "gkd")


def _same_training(earlier: str, now: str | None) -> bool:
    """Whether two gkd / sft `export_provenance`s name one training by its `training_ref` (which hashes the input
    model's weights, the settings, the data and the work folder), whatever path they name the input model by: a
    child folder moved since, or a run moved since."""
    if now is None:
        return False
    kind, training = earlier.split(" ", 1)[0], earlier.rpartition(" (training ")[2]
    return kind in ("gkd", "sft") and now.split(" ", 1)[0] == kind and " (training " in earlier \
        and now.rpartition(" (training ")[2] == training and " (training " in now


def _same_training_hint(earlier: str, now: str) -> str:
    """What to add to a refusal to replace the trained export `earlier` by `now` (two `export_provenance`s) when it
    may be this same training recorded otherwise: by an earlier version (no training reference) or from a run
    moved since (another model reference). "" when both name the same model and differ in the training alone,
    which then is another training (settings, data or work folder)."""
    kind = earlier.split(" ", 1)[0]
    if kind != now.split(" ", 1)[0] or kind not in ("gkd", "sft"):  # only these have work folders
        return ""
    model, _, training = earlier.partition(" (training ")
    if training and model == now.partition(" (training ")[0]:
        return ""
    return (" (if it is this same training recorded otherwise, by an earlier version or from a moved run, delete "
            "that folder alone and rerun: the finished checkpoint in the work folder is exported again, not trained "
            "again)")


#: the tokenizer files `save_pretrained` writes (by kind: fast, sentencepiece); other names are a user's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
#: files an export writes besides CODE_FILES and TOKENIZER_FILES
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "README.md", "chat_template.jinja",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
#: every file name an export writes
EXPORT_NAMES = frozenset(EXPORT_FILES) | frozenset(CODE_FILES) | frozenset(TOKENIZER_FILES)


def is_export_folder(path: Path) -> bool:
    """Whether `path` holds a checkpoint `export_checkpoint` wrote and nothing else (`export_folder_problem`)."""
    return export_folder_problem(path) is None


def export_folder_problem(path: Path) -> str | None:
    """Why `path` is not a checkpoint `export_checkpoint` wrote and nothing else, or None when it is: config.json
    with block_configs, the model code files (or, when some went missing, config.json's "puzzle" entry, which only
    this tool writes), and otherwise only files an export writes (no folders)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "it has no readable config.json"
    if not (isinstance(config, dict) and "block_configs" in config):
        return "its config.json has no block_configs"
    missing = [f for f in CODE_FILES if not (path / f).is_file()]
    if missing and not isinstance(config.get("puzzle"), dict):
        return f"it lacks the model code ({', '.join(missing)}) and its config.json names no puzzle export"
    other = [p.name for p in sorted(path.iterdir()) if not (p.is_file() and not p.is_symlink() and (
        p.name in EXPORT_FILES or p.name in CODE_FILES or p.name in TOKENIZER_FILES))]
    if other:
        return f"it holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, which an export does not write"
    return None


def _check_finite(state: dict[str, torch.Tensor], model, dtype: torch.dtype) -> None:
    """Refuse to write weights holding NaN or ±inf (breaker: a float16 merge of large weights and a merge of a
    model with a NaN wrote them unsaid, and every logit of the result was NaN or inf).

    Raises:
        PuzzleError: naming the first such tensor, and whether the model itself holds it or the stored dtype
            cannot (it overflows `dtype`).
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            source = dict(model.named_parameters()).get(name)
            if source is not None and torch.isfinite(source).all():
                raise PuzzleError(f"weight {name} overflows {str(dtype).removeprefix('torch.')} (its largest "
                                  f"magnitude is {source.abs().max().item():.3g}): store it in float32 or bfloat16 "
                                  f"(--dtype)")
            raise PuzzleError(f"weight {name} holds NaN or inf values: the model is broken (every output would be "
                              f"NaN); nothing was written. Check where it came from (a diverged training, a damaged "
                              f"input folder)")


def remove_stale_temp(out_dir: Path) -> list[str]:
    """Remove the hidden `.NAME.*.tmp` / `.NAME.*.old` folders beside `out_dir` that an export killed mid-write
    (SIGKILL, out of memory) left, partial safetensors and all (reviewer: they stayed for good); returns their
    names. Exports of one name are not run at once (the commands lock their destination: `runlock.also_lock`), so
    none of them is another export's work."""
    out_dir = Path(out_dir)
    gone = []
    # mkdtemp's names: prefix, 8 random characters, suffix (not `.child.v2.<8>.tmp`, another export's: reviewer)
    own = re.compile(rf"\.{re.escape(out_dir.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)")
    if out_dir.parent.is_dir():
        for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
            if p.is_dir() and not p.is_symlink() and own.fullmatch(p.name) and _holds_only_export_work(p):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def _is_mount_point(folder: Path) -> bool:
    """Whether `folder` is a mount point: `os.path.ismount`, or (Linux) listed in /proc/self/mountinfo, which also
    names a bind mount on the same file system (same device as its parent, so ismount misses it)."""
    if os.path.ismount(folder):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    target = str(Path(folder).resolve())
    # field 5 is the mount point, with space, tab, newline and backslash written as octal escapes (proc(5))
    points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4])
              for line in lines if len(line.split(" ")) > 4}
    return target in points


def _holds_only_export_work(folder: Path) -> bool:
    """Whether `folder` holds nothing but what an export writes there: the files of an export (a `.tmp` folder) or
    the `previous` export moved aside (an `.old` one); a user's backup named alike is left alone (breaker)."""
    names = {p.name for p in folder.iterdir()}
    if folder.name.endswith(".old"):
        return names <= {"previous"}
    return names <= EXPORT_NAMES


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp folder to out_dir; an existing out_dir is moved aside first, then deleted."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
    try:
        os.replace(out_dir, old / "previous")
    except OSError as e:  # e.g. a folder another program holds open on some file systems: the earlier one stays
        old.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
        cause = ("lift what keeps it from being renamed (its permissions, an immutable attribute: lsattr)"
                 if e.errno in (errno.EPERM, errno.EACCES) else "close the programs that hold it open"
                 if e.errno in (errno.EBUSY, errno.ETXTBSY) else "check the folder and the file system it lies on")
        raise PuzzleError(f"export target {out_dir} cannot be moved aside to be replaced ({e.strerror or e}); give "
                          f"a new folder path, or {cause}") from None
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
