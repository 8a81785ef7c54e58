"""Load the parent: an HF Llama folder, a nemotron-nas folder or a GGUF file -> PuzzleForCausalLM.

    HF folder      config.json with model_type "llama" (or "mistral" without sliding window) and
                   model.safetensors, or shards listed in model.safetensors.index.json.
                   pytorch_model.bin(.index.json) also loads, with torch.load(weights_only=True),
                   which unpickles tensors only and runs no code from the file.
    nemotron-nas   config.json with model_type "nemotron-nas" (or "deci") and `block_configs`, as
                   `puzzle export` and NVIDIA's Nemotron-51B / 49B checkpoints write it: a child can
                   itself be searched again. No-op subblocks have no weights; linear subblocks are
                   `self_attn.linear_attn.weight` and `mlp.linear_mlp.weight`.
    GGUF file      de-quantized to fp32 by transformers, converted once and cached as an HF folder
                   under `<cache>/gguf/<name>-<sha256>-v<N>/` (cache: `cache_dir`, else $PUZZLE_CACHE,
                   else ~/.cache/puzzle); later loads read that folder. RoPE scaling, which
                   transformers' GGUF loader drops, is read from the file (linear) or recovered
                   from llama.cpp's `rope_freqs` tensor (Llama 3).

Only Llama-family decoders load: GQA attention + SwiGLU + RMSNorm + RoPE (default, linear or
llama3 scaling), with or without tied embeddings, explicit head_dim and attention/MLP biases.
Anything else raises PuzzleError naming what was found and what is supported. Weights load
strictly: a missing or unexpected tensor is an error, never silently initialised.

Where the GGUF time goes (SmolLM2-135M-Instruct Q4_1, 98 MB, 2 busy cores, cProfile): transformers
parses the file's metadata three times (config, weights, tokenizer), each time walking the 49k-token
vocabulary and 49k merges through numpy memmap slices (~45% of the time); it rebuilds gguf's
tensor-name table once per submodule, 397 times (~20%); de-quantizing the weights is ~8%. All of it
is conversion, so it is done once and cached; a cached load reads one safetensors file. Measured
here on a busy machine: first load 93 s (transformers: model 46 s, tokenizer most of the rest),
cached load 2.0 s (sha256 of the file 0.3 s included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import pickle
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .architecture import (
    SUPPORTED_ROPE_TYPES,
    ArchitectureError,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
    block_from_entry,
)
from .errors import PuzzleError, first_line, is_finite_number, shell_arg
from .io import atomic_save_safetensors, atomic_write_json, is_run_directory, sha256_file
from .modeling import PuzzleForCausalLM, rope_inv_freq

LLAMA_MODEL_TYPES = ("llama", "mistral")
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
NAS_MODEL_TYPES = ("nemotron-nas", "deci")
NAS_ARCHITECTURES = ("DeciLMForCausalLM",)
GGUF_CACHE_VERSION = 1  # bump when the cached folder's layout or the conversion changes
# what a model type near the Llama family does that PuzzleForCausalLM does not (from transformers' modeling files)
_UNLIKE_LLAMA = {
    "qwen2": "it has biases on the query, key and value projections but not on the output one (attention_bias sets "
             "all four)",
    "qwen3": "it normalizes each head's queries and keys (q_norm, k_norm)",
    "gemma": "its FFN is GeGLU, its RMSNorm scales by 1 + weight and its embeddings by sqrt(hidden_size)",
    "gemma2": "its FFN is GeGLU, it caps logits and has norms after attention and FFN",
    "gemma3": "its FFN is GeGLU, it normalizes queries and keys and mixes sliding-window layers",
    "mixtral": "its FFN is a mixture of experts",
    "olmo2": "its norms follow attention and FFN, and it normalizes queries and keys",
    "granite": "it scales embeddings, residuals, attention and logits by multipliers",
    "phi3": "its tensors are fused (qkv_proj, gate_up_proj)",
    "gpt2": "it uses LayerNorm, a GELU FFN and learned positions",
}

_SUPPORTED = ("supported: Llama-family decoders (GQA attention + SwiGLU + RMSNorm + RoPE) as an HF folder "
              "(model_type 'llama', or 'mistral' without a sliding window), a nemotron-nas folder (block_configs) or a "
              "llama GGUF file")


@dataclass
class LoadedModel:
    """A model ready to run, with what is needed to feed it and to say where it came from.

    Attributes:
        model: the PuzzleForCausalLM (eval mode, on CPU, in the requested dtype).
        tokenizer: a transformers tokenizer; None only when the caller asked for none.
        config: the model's ModelConfig (the same object as `model.config`); `extra` holds
            provenance: "source" (hf, nemotron-nas, gguf, tiny), "path", "name", ...
        source: a one-line description of where the model was loaded from, the same on every load of it (it
            goes into exports' provenance: a text that changed between loads rewrote them all; fresh-user run).
        converted_now: True when this load converted the model (a GGUF de-quantized into the cache), else False.
    """

    model: PuzzleForCausalLM
    tokenizer: object | None
    config: ModelConfig
    source: str
    converted_now: bool = False


# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, a shard index); PuzzleError when it is not a JSON object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PuzzleError(f"{path} cannot be read as JSON ({e}); copy it again from the original checkpoint") from e
    if not isinstance(d, dict):
        raise PuzzleError(f"{path} holds a JSON {type(d).__name__}, not an object; copy it again from the original checkpoint")
    return d


def _require(d: dict, key: str, what: str):
    if d.get(key) is None:
        raise PuzzleError(f"{what} lacks {key!r}; the config.json is incomplete: copy it again from the original "
                          f"checkpoint")
    return d[key]


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from an HF config in either layout.

    transformers >= 5 writes `rope_parameters` = {"rope_type", "rope_theta", scaling params};
    older files have top-level `rope_theta` and `rope_scaling` = {"type" or "rope_type", params}.
    """
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise PuzzleError(f"rope_parameters per layer type ({sorted(params)}) are not supported; {_SUPPORTED}")
    if params:
        scaling = dict(params)
        theta = scaling.pop("rope_theta", d.get("rope_theta", 10000.0))
    else:
        scaling, theta = dict(d.get("rope_scaling") or {}), d.get("rope_theta", 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        # breaker: "use a checkpoint without it" was the advice for every type; dynamic NTK scaling changes the base
        # only past max_position_embeddings (transformers' _compute_dynamic_ntk_parameters), so below it is plain RoPE
        limit = d.get("max_position_embeddings")
        within = f"max_position_embeddings ({limit})" if limit is not None else "the config's max_position_embeddings"
        advice = (f"dynamic NTK scaling is plain RoPE up to {within}: to use the model within those lengths, remove "
                  f"rope_scaling (or rope_parameters' rope_type) from config.json" if rope_type == "dynamic" else
                  "this tool's attention cannot run such a model as it was trained")
        raise PuzzleError(f"RoPE scaling type {rope_type!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}); {advice}")
    if rope_type == "default":
        return float(theta), None
    need = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if scaling.get(k) is None]
    if missing:
        raise PuzzleError(f"{rope_type} RoPE scaling lacks {missing}; add them to the config's rope_scaling / rope_parameters")
    return float(theta), {"rope_type": rope_type, **{k: scaling[k] for k in need}}


def _check_llama_family(d: dict, what: str) -> None:
    """Refuse the options a Llama-style config can carry that PuzzleForCausalLM does not run."""
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise PuzzleError(f"{what}: hidden_act {act!r} is not supported (SwiGLU needs 'silu'); {_SUPPORTED}")
    if d.get("pretraining_tp") not in (None, 1):
        raise PuzzleError(f"{what}: pretraining_tp={d['pretraining_tp']} is not supported; set it to 1 in config.json "
                          "(it only splits the matmuls, the weights are the same)")
    if d.get("sliding_window") is not None and d.get("use_sliding_window", True):
        raise PuzzleError(f"{what}: sliding-window attention (sliding_window={d['sliding_window']}) is not supported; "
                          "only full causal attention is")
    if any(t != "full_attention" for t in d.get("layer_types") or ()):
        raise PuzzleError(f"{what}: layer_types {sorted(set(d['layer_types']))} are not supported; only full_attention")
    if d.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise PuzzleError(f"{what}: partial_rotary_factor={d['partial_rotary_factor']} is not supported; RoPE must cover the whole head")
    quant = d.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise PuzzleError(f"{what}: quantized checkpoints ({method}) are not supported; load the unquantized "
                          "safetensors (bf16/fp16/fp32) or a GGUF file")


def _shared_fields(d: dict, what: str) -> dict:
    """ModelConfig fields that HF Llama and nemotron-nas configs spell the same way."""
    hidden, heads = int(_require(d, "hidden_size", what)), int(_require(d, "num_attention_heads", what))
    head_dim = d.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise PuzzleError(f"{what}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and "
                              "no head_dim is given; add head_dim to config.json")
        head_dim = hidden // heads
    theta, scaling = _rope(d)
    return dict(
        vocab_size=int(_require(d, "vocab_size", what)),
        hidden_size=hidden,
        num_attention_heads=heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def _model_config(what: str, extra: dict, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields, extra=extra)
    except ArchitectureError as e:
        raise PuzzleError(f"{what}: {e}") from e


def model_config_from_hf(config_dict: dict) -> ModelConfig:
    """ModelConfig of a homogeneous HF Llama (or Mistral without sliding window) config.json dict.

    Reads both rope layouts (`rope_parameters` of transformers 5, `rope_theta` + `rope_scaling` of
    older files), an explicit `head_dim` (else hidden_size / heads), biases, tied embeddings and
    the special token ids (eos may be a list).

    Raises:
        PuzzleError: a model_type / architecture that is not Llama-family, hidden_act other than
            silu, RoPE types other than default/linear/llama3, pretraining_tp > 1, sliding windows,
            quantized checkpoints, missing sizes.
    """
    d, what = config_dict, "HF config"
    model_type, archs = d.get("model_type"), d.get("architectures") or []
    if model_type in NAS_MODEL_TYPES or "block_configs" in d:
        raise PuzzleError("this config.json is a nemotron-nas config (block_configs); read it with model_config_from_nemotron_nas")
    if model_type is None and archs and len(set(archs)) == 1 and archs[0] in LLAMA_ARCHITECTURES:
        raise PuzzleError(  # breaker: a supported architecture was called unsupported
            f"config.json has no model_type, though its architectures ({archs[0]}) are supported; add "
            f'"model_type": "{LLAMA_MODEL_TYPES[LLAMA_ARCHITECTURES.index(archs[0])]}" to it')
    if model_type not in LLAMA_MODEL_TYPES or any(a not in LLAMA_ARCHITECTURES for a in archs):
        unlike = f" ({_UNLIKE_LLAMA[model_type]})" if model_type in _UNLIKE_LLAMA else ""
        raise PuzzleError(f"model_type {model_type!r} (architectures {archs}) is not supported{unlike}; {_SUPPORTED}")
    _check_llama_family(d, what)
    fields = _shared_fields(d, what)
    kv = int(d.get("num_key_value_heads") or fields["num_attention_heads"])
    width = int(_require(d, "intermediate_size", what))
    layers = int(_require(d, "num_hidden_layers", what))
    block = BlockConfig(AttentionConfig("gqa", kv), FFNConfig("swiglu", width))
    return _model_config(what, {"name": d.get("_name_or_path") or ""}, num_key_value_heads=kv,
                         intermediate_size=width, blocks=(block,) * layers, **fields)


def model_config_from_nemotron_nas(config_dict: dict) -> ModelConfig:
    """ModelConfig of a nemotron-nas / DeciLM config.json dict (one `block_configs` entry per layer).

    Each entry goes through `architecture.block_from_entry` (an exact `intermediate_size` wins over
    `ffn_mult`). The model-wide num_key_value_heads / intermediate_size (the widths a further search
    starts from) are the config's own when it states them, else the largest over the layers.

    Raises:
        PuzzleError: not a nemotron-nas config, a block entry this toolkit cannot run (sliding
            windows, sink tokens, parallel FFN-fusion blocks, bad head groups), or the refusals of
            `model_config_from_hf` (activation, RoPE type, quantization).
    """
    d, what = config_dict, "nemotron-nas config"
    model_type, archs = d.get("model_type"), d.get("architectures") or []
    if model_type not in NAS_MODEL_TYPES and not any(a in NAS_ARCHITECTURES for a in archs):
        held = ("; it holds block_configs, which only nemotron-nas configs have, so it is read as one: set its "
                "model_type back to 'nemotron-nas' or remove block_configs") if "block_configs" in d else ""
        raise PuzzleError(f"model_type {model_type!r} (architectures {archs}) is not nemotron-nas{held}; "
                          f"{_SUPPORTED}")  # (breaker: "'mistral' supported" beside a refused 'mistral')
    entries = d.get("block_configs")
    if not isinstance(entries, list) or not entries:
        raise PuzzleError(f"{what} has no block_configs list; export the model again (one entry per layer)")
    if d.get("num_hidden_layers") not in (None, len(entries)):
        raise PuzzleError(f"{what}: num_hidden_layers={d['num_hidden_layers']} but block_configs has {len(entries)} "
                          "entries; they must agree")
    _check_llama_family(d, what)
    fields = _shared_fields(d, what)
    blocks = []
    for i, entry in enumerate(entries):
        if entry.get("parallel_blocks"):
            raise PuzzleError(f"{what}: block_configs[{i}] has parallel_blocks (FFN Fusion), which this loader does not run")
        try:
            blocks.append(block_from_entry(entry, fields["num_attention_heads"], fields["hidden_size"]))
        except ArchitectureError as e:
            raise PuzzleError(f"{what}: block_configs[{i}]: {e}") from e
    kvs = [b.attention.num_kv_heads for b in blocks if b.attention.kind == "gqa"]
    widths = [b.ffn.intermediate_size for b in blocks if b.ffn.kind == "swiglu"]
    kv = int(d.get("num_key_value_heads") or max(kvs, default=fields["num_attention_heads"]))
    width = int(d.get("intermediate_size") or max(widths, default=fields["hidden_size"]))
    return _model_config(what, {"name": d.get("_name_or_path") or ""}, num_key_value_heads=kv,
                         intermediate_size=width, blocks=tuple(blocks), **fields)


# ----------------------------------------------------------------------------------------------
# weights -> PuzzleForCausalLM


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def model_from_state_dict(config: ModelConfig, state_dict: dict, dtype: torch.dtype = torch.float32,
                          what: str = "checkpoint", copy: bool = True) -> PuzzleForCausalLM:
    """Build a PuzzleForCausalLM of `config` holding exactly the tensors of `state_dict`.

    Keys follow HF Llama / DeciLM names (see modeling.py). With tied embeddings a stored
    `lm_head.weight` must equal the embedding (it is then dropped); HF's old `rotary_emb.inv_freq` buffers are
    ignored. The model is built on the meta device and takes the tensors cast to `dtype`, so no
    time is spent on a random init. With copy=False, tensors already in `dtype` are used as they
    are (the loaders pass fresh tensors read from disk); the default copies, so the new model never
    shares storage with the model a state dict came from. `what` names the source in errors.
    Returns the model in eval mode.

    Raises:
        PuzzleError: missing or unexpected keys, a tensor whose shape differs from the config's, or a stored
            lm_head.weight unlike the embedding it is configured to be tied to.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings and (head := sd.pop("lm_head.weight", None)) is not None:
        embed = sd.get("model.embed_tokens.weight")
        if embed is not None and not (head.shape == embed.shape and torch.equal(head, embed.to(head.dtype))):
            raise PuzzleError(  # breaker: it was dropped, where transformers >= 5 keeps such a head (and unties)
                f"{what}: config.json ties the embeddings (tie_word_embeddings=true), but the stored lm_head.weight "
                "differs from model.embed_tokens.weight; set tie_word_embeddings to false in config.json to use the "
                "stored head, as transformers does")
    with torch.device("meta"):
        model = PuzzleForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected else [])
        hint = ("; lm_head.weight is absent: if the model ties its embeddings set tie_word_embeddings=true in config.json"
                if missing == ["lm_head.weight"] else "; the weights belong to another model or config.json does not describe them")
        raise PuzzleError(f"{what}: weights do not match the config: {'; '.join(parts)}{hint}")
    bad = [f"{k} {tuple(sd[k].shape)} (config wants {shape})" for k, shape in expected.items() if tuple(sd[k].shape) != shape]
    if bad:
        raise PuzzleError(f"{what}: tensor shapes do not match the config: {_few(bad, 3)}; fix config.json or the weights")
    tensors = {k: v.to(dtype, copy=copy) for k, v in sd.items()}
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True made two Parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = rope_inv_freq(config)  # non-persistent buffer, still on meta
    return model.eval()


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: an index's shards, else the single file, else every *.safetensors."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise PuzzleError(f"{index} has no weight_map; download or export the checkpoint again")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise PuzzleError(f"{index} lists shards that are missing: {_few(absent, 3)}; download them next to the index")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = (f"; to load the GGUF beside it, give the file ({folder / ggufs[0]}) or gguf_file="
                f"{' / '.join(ggufs[:3])}" if ggufs else "")
        raise PuzzleError(f"{folder} has a config.json but no weights (model.safetensors, model.safetensors.index.json "
                          f"or pytorch_model.bin); copy the checkpoint's weight files next to it{hint}")
    return files


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors / pytorch_model.bin files, by name."""
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                part = load_file(f)
            else:  # weights_only: tensors and containers only, no code runs while unpickling
                part = torch.load(f, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
                raise PuzzleError(  # breaker: it was called corrupt, with torch's colour codes in the message
                    f"{f} holds objects other than tensors, which puzzle does not unpickle (unpickling can run code); "
                    "if you trust the file, save its tensors with safetensors (model.safetensors) and remove it") from e
            raise PuzzleError(f"{f} cannot be read ({first_line(e)}); it is corrupt or truncated: download or export "
                              "it again") from e
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise PuzzleError(f"{f} does not hold a plain state dict of tensors; save the weights with safetensors")
        twice = sorted(set(part) & set(state_dict))
        if twice:
            raise PuzzleError(f"{f} repeats tensors of another shard ({_few(twice, 3)}); remove the extra weight file")
        state_dict.update(part)
    return state_dict


@contextlib.contextmanager
def transformers_quiet():
    """transformers' own warnings and notes silenced (its logging at the error level) inside the block, where puzzle
    checks the same thing itself and says it in its own words."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _load_tokenizer(folder: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        raise PuzzleError(f"{folder} has no tokenizer files ({', '.join(names)}); copy them from the original "
                          "checkpoint (in Python, load_parent(..., with_tokenizer=False) loads the weights alone)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        # trust_remote_code=False: the tokenizer never needs the folder's code, and an exported folder's
        # auto_map would otherwise make transformers stop and ask on the terminal
        with transformers_quiet():  # silence "model of type nemotron-nas" notes about the folder's config
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # AutoTokenizer may trip over a model_type it does not know: for a nemotron-nas config with llama3 RoPE
        # scaling, transformers 5's generic config lacks max_position_embeddings (AttributeError)
        if (folder / "tokenizer.json").is_file():
            try:
                return PreTrainedTokenizerFast.from_pretrained(str(folder))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        raise PuzzleError(f"the tokenizer in {folder} cannot be loaded ({first_line(e)}); "
                          "copy the tokenizer files from the original checkpoint again") from e


def _load_folder(folder: Path, dtype: torch.dtype, with_tokenizer: bool, extra: dict | None = None) -> LoadedModel:
    """An HF Llama or nemotron-nas folder -> LoadedModel (config first, so bad configs fail fast)."""
    d = _read_json(folder / "config.json")
    if is_run_directory(folder):
        raise PuzzleError(f"{folder} is a puzzle run directory, not a model folder: give one of its exports "
                          f"({folder / 'export'}/NAME) (`puzzle gkd` and `puzzle sft` also train a child of the run "
                          f"itself: --out {shell_arg(folder)} --name NAME)")
    nas = d.get("model_type") in NAS_MODEL_TYPES or "block_configs" in d
    try:
        config = model_config_from_nemotron_nas(d) if nas else model_config_from_hf(d)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # a field of the wrong type, e.g. "hidden_size": "abc"
        raise PuzzleError(f"{folder / 'config.json'}: a field has the wrong type or value ({type(e).__name__}: {e}); "
                          f"fix it or export the model again") from e
    kind = "nemotron-nas" if nas else "hf"
    config = dataclasses.replace(config, extra={**config.extra, "source": kind, "path": str(folder), **(extra or {})})
    weights = _read_weights(_weight_files(folder))
    model = model_from_state_dict(config, weights, dtype, what=str(folder), copy=False)
    # breaker: a model with a NaN weight was evaluated (an accuracy from NaN logits), generated from and merged unsaid
    from .train_utils import non_finite_parameter

    if (broken := non_finite_parameter(model)) is not None:
        name = str(dtype).removeprefix("torch.")
        stored = weights.get(broken)
        if dtype != torch.float32 and stored is not None and bool(torch.isfinite(stored.float()).all()):
            # breaker: weights of 1e6 overflowed float16 and were called NaN, "no model to use"; float32 ran it
            raise PuzzleError(f"{folder}: the weight {broken} overflows {name} (its stored values are finite, up to "
                              f"{stored.float().abs().max().item():.4g}, past {name}'s range); load the model in "
                              f"float32 (--dtype float32)")
        as_loaded = "" if dtype == torch.float32 else f" as loaded in {name}"
        raise PuzzleError(f"{folder}: the weight {broken} holds NaN or inf values{as_loaded}, so the model's outputs "
                          f"would be NaN; it is no model to use: export or train it again")
    del weights
    tokenizer = _load_tokenizer(folder) if with_tokenizer else None
    # breaker: a tokenizer.json giving ids past the embedding passed `puzzle data`, and `puzzle bld` then failed in
    # F.embedding with a traceback
    top = max(tokenizer.get_vocab().values(), default=-1) if tokenizer is not None else -1
    if top >= config.vocab_size:
        raise PuzzleError(f"{folder}: its tokenizer gives token ids up to {top}, but the model has {config.vocab_size} "
                          f"(vocab_size in config.json, the embedding's rows), so text would give ids the model cannot "
                          f"read; give the folder the tokenizer files of the model it was trained with")
    return LoadedModel(model, tokenizer, config, f"{kind} folder {folder}")


# ----------------------------------------------------------------------------------------------
# GGUF


@dataclass(frozen=True)
class _GGUFHeader:
    metadata: dict  # scalars and strings; numeric arrays as lists; string arrays as their length
    tensors: dict  # name -> (shape in torch order, ggml type id, offset from data_start)
    data_start: int


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_gguf_header(path: Path) -> _GGUFHeader:
    """Metadata and tensor table of a GGUF file (format: ggml's docs/gguf.md), in milliseconds.

    gguf.GGUFReader would do, but it turns every vocabulary string into numpy views (12 s for
    SmolLM2); here string arrays are skipped. Also checks that the file holds all its tensor data.

    Raises:
        PuzzleError: not a GGUF file, an unknown version, a truncated file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise PuzzleError(f"{path} is not a GGUF file ({size} bytes); download it again")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise PuzzleError(f"{path} is not a GGUF file (no GGUF magic bytes); pass a .gguf file or an HF folder")

        def read_string(pos):
            (n,) = struct.unpack_from("<Q", mm, pos)
            if pos + 8 + n > size:
                raise struct.error("string runs past the end of the file")
            return mm[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

        def read_value(pos, vtype):
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
            if vtype == 8:
                return read_string(pos)
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if etype in _GGUF_SCALARS:
                    width = struct.calcsize(_GGUF_SCALARS[etype])
                    values = list(struct.unpack_from(f"<{count}{_GGUF_SCALARS[etype][1]}", mm, pos)) if count <= 4096 else count
                    return values, pos + count * width
                if etype == 8:
                    for _ in range(count):  # skip: only their number is kept
                        pos += 8 + struct.unpack_from("<Q", mm, pos)[0]
                    return count, pos
            raise struct.error(f"unknown metadata value type {vtype}")

        try:
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
            if version not in (2, 3):
                raise PuzzleError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
            pos, metadata, tensors = 24, {}, {}
            for _ in range(n_kv):
                key, pos = read_string(pos)
                metadata[key], pos = read_value(pos + 4, struct.unpack_from("<I", mm, pos)[0])
            for _ in range(n_tensors):
                name, pos = read_string(pos)
                (ndim,) = struct.unpack_from("<I", mm, pos)
                dims = struct.unpack_from(f"<{ndim}Q", mm, pos + 4)
                ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * ndim)
                pos += 4 + 8 * ndim + 12
                tensors[name] = (tuple(reversed(dims)), ttype, offset)
        except struct.error as e:
            raise PuzzleError(f"{path} is truncated or corrupt in its header ({e}); download it again") from e
    align = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    end = data_start
    for name, (shape, ttype, offset) in tensors.items():
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise PuzzleError(f"{path}: tensor {name} has ggml type {ttype}, which the gguf package does not know; "
                              "update gguf or use another quantization") from None
        end = max(end, data_start + offset + math.prod(shape) // block * nbytes)
    if end > size:
        raise PuzzleError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}; download it again")
    return _GGUFHeader(metadata, tensors, data_start)


def _llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old_len: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling, as llama.cpp stores them in `rope_freqs.weight`.

    Meta's Llama 3.1 rule (also `modeling.rope_inv_freq`): wavelengths above old_len/low are divided
    by `factor`, below old_len/high kept, and smoothly interpolated in between.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, medium))


def _gguf_rope_scaling(path: Path, header: _GGUFHeader) -> dict | None:
    """RoPE scaling a llama GGUF states, which transformers' GGUF loader ignores.

    linear: `llama.rope.scaling.type` + `.factor`. Llama 3: llama.cpp writes no parameters, only a
    `rope_freqs.weight` tensor of divisors; the parameters are recovered by matching it against
    the rule with Meta's published (low, high, original length) values.
    """
    meta = header.metadata
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        factor = meta.get("llama.rope.scaling.factor")
        if not is_finite_number(factor) or not factor > 0:
            raise PuzzleError(f"{path}: linear RoPE scaling without a positive llama.rope.scaling.factor (got "
                              f"{factor!r}); convert the model again with llama.cpp, or load its HF folder")
        return {"rope_type": "linear", "factor": float(factor)}
    if scaling_type != "none":
        raise PuzzleError(f"{path}: RoPE scaling {scaling_type!r} is not supported (supported: linear, llama3)")
    if "rope_freqs.weight" not in header.tensors:
        return None
    shape, ttype, offset = header.tensors["rope_freqs.weight"]
    if ttype != 0:
        raise PuzzleError(f"{path}: rope_freqs.weight is not F32; this GGUF was not written by llama.cpp's converter")
    with open(path, "rb") as f:
        f.seek(header.data_start + offset)
        stored = np.frombuffer(f.read(4 * math.prod(shape)), dtype="<f4").astype(np.float64)
    head_dim = int(meta.get("llama.rope.dimension_count") or meta["llama.embedding_length"] // meta["llama.attention.head_count"])
    theta, factor = float(meta.get("llama.rope.freq_base", 10000.0)), float(stored.max())
    for old_len in (8192, 4096, 16384, 32768, 2048, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            want = _llama3_rope_factors(head_dim, theta, factor, low, high, old_len)
            if want.shape == stored.shape and np.allclose(want, stored, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old_len}
    raise PuzzleError(f"{path}: its rope_freqs tensor matches no Llama 3 RoPE scaling this loader knows; "
                      "load the model's HF safetensors folder instead")


def _check_gguf(path: Path, header: _GGUFHeader) -> None:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PuzzleError(f"{path} holds a {arch!r} model (general.architecture); {_SUPPORTED}")
    if int(meta.get("llama.expert_count") or 0) > 0:
        raise PuzzleError(f"{path} is a mixture-of-experts model ({meta['llama.expert_count']} experts); {_SUPPORTED}")
    rot, key_len = meta.get("llama.rope.dimension_count"), meta.get("llama.attention.key_length")
    if rot and key_len and rot != key_len:
        raise PuzzleError(f"{path}: RoPE covers {rot} of {key_len} head dims (partial rotary), which is not supported")
    # breaker: a file without its shape passed, and transformers built a default 7B Llama around it (killed at 24 GB)
    shape = ("llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.feed_forward_length")
    if lacks := [k for k in shape if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int) or meta[k] < 1]:
        raise PuzzleError(f"{path} lacks the model's shape in its metadata ({', '.join(lacks)}), so transformers would "
                          f"build a default Llama around it; give a GGUF written by llama.cpp's converter")
    if not meta.get("tokenizer.ggml.tokens"):
        raise PuzzleError(f"{path} holds no vocabulary (tokenizer.ggml.tokens); give a GGUF written with its "
                          f"tokenizer by llama.cpp's converter")
    per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    names = ["token_embd.weight", "output_norm.weight",
             *(f"blk.{i}.{t}.weight" for i in range(meta["llama.block_count"]) for t in per_layer)]
    if absent := [n for n in names if n not in header.tensors]:
        raise PuzzleError(f"{path} lacks {len(absent)} of the {len(names)} weights its metadata's "
                          f"{meta['llama.block_count']} layers need (e.g. {', '.join(absent[:3])}); the file is not a "
                          f"whole Llama model")
    embed = header.tensors["token_embd.weight"][0]
    if len(embed) != 2 or embed[-1] != meta["llama.embedding_length"]:
        raise PuzzleError(f"{path}: token_embd.weight has the shape {list(embed)}, but the metadata's "
                          f"llama.embedding_length is {meta['llama.embedding_length']}; the file is inconsistent")


def default_cache_dir() -> Path:
    """$PUZZLE_CACHE, else ~/.cache/puzzle."""
    return Path(os.environ.get("PUZZLE_CACHE") or "~/.cache/puzzle").expanduser()


def _convert_gguf(path: Path, target: Path, rope_scaling: dict | None, sha256: str) -> None:
    """Load a GGUF with transformers, convert it, and write an HF Llama folder at `target` atomically."""
    try:  # before the conversion (minutes for a large model): reviewer, an unusable cache failed only after it
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except OSError as e:
        raise PuzzleError(f"cannot write the converted GGUF to {target.parent} ({e}); "
                          "set PUZZLE_CACHE to a writable folder (cache_dir in Python)") from e
    try:
        _convert_into(path, tmp, target, rope_scaling, sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_into(path: Path, tmp: Path, target: Path, rope_scaling: dict | None, sha256: str) -> None:
    """`_convert_gguf`'s work: convert into the temp folder `tmp`, then rename it to `target`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise PuzzleError(f"transformers cannot read {path} ({first_line(e)}); "
                          "check the file or convert the model to safetensors") from e
    d = hf_model.config.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = [type(hf_model).__name__]
    if rope_scaling is not None:
        theta = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0))
        d.pop("rope_scaling", None)
        d["rope_parameters"] = {"rope_theta": theta, **rope_scaling}
    config = model_config_from_hf(d)
    model = model_from_state_dict(config, hf_model.state_dict(), torch.float32, what=str(path), copy=False)
    del hf_model
    try:
        tensors = model.state_dict()
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight")
        atomic_save_safetensors(tensors, tmp / "model.safetensors")
        atomic_write_json(tmp / "config.json", d)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "puzzle_gguf.json", {
            "gguf": str(path), "sha256": sha256, "size_bytes": path.stat().st_size,
            "cache_version": GGUF_CACHE_VERSION, "transformers": transformers.__version__})
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent run that finished first
                raise
    except OSError as e:
        raise PuzzleError(f"cannot write the converted GGUF to {target.parent} ({e}); "
                          "set PUZZLE_CACHE to a writable folder (cache_dir in Python)") from e


def _load_gguf(path: Path, dtype: torch.dtype, cache_dir, with_tokenizer: bool) -> LoadedModel:
    header = _read_gguf_header(path)
    _check_gguf(path, header)
    rope_scaling = _gguf_rope_scaling(path, header)
    sha = sha256_file(path)
    folder = Path(cache_dir or default_cache_dir()).expanduser() / "gguf" / f"{path.stem}-{sha[:16]}-v{GGUF_CACHE_VERSION}"
    hit = (folder / "config.json").is_file()
    if not hit:
        if folder.is_dir() or folder.is_symlink():  # reviewer: a folder left without its config.json made every
            # later conversion fail at the rename ("Directory not empty"); a finished conversion is renamed in whole,
            # so one without config.json is no conversion in progress
            if not (folder / "config.json").is_file():  # another process's finished conversion may have landed
                warnings.warn(f"the cached conversion {folder} has no config.json; converting {path.name} again")
                if folder.is_symlink():
                    folder.unlink(missing_ok=True)
                else:
                    shutil.rmtree(folder, ignore_errors=True)  # a second process removing it too is no error
        if not (folder / "config.json").is_file():
            _convert_gguf(path, folder, rope_scaling, sha)
    extra = {"source": "gguf", "path": str(path), "name": header.metadata.get("general.name", path.stem),
             "gguf_sha256": sha, "cache": str(folder)}  # the same on every load, so configs compare equal
    try:
        loaded = _load_folder(folder, dtype, with_tokenizer, extra)
    except PuzzleError as e:
        raise PuzzleError(f"{e} (in the cached conversion of {path.name}: delete {folder} to convert it again)") from e
    where = f"GGUF {path.resolve()} (de-quantized, cached at {folder.resolve()})"  # one text however it was named
    return dataclasses.replace(loaded, source=where, converted_now=not hit)


# ----------------------------------------------------------------------------------------------
# entry point


def load_model_spec(spec: str, dtype: torch.dtype = torch.float32, progress: bool = False) -> LoadedModel:
    """A model named as the commands name one: "tiny" (the built-in tiny model, `tiny.tiny_parent`, in `dtype`),
    asset:<name> (a packaged model, `assets.model_asset_path`, with a progress bar where `progress`) or a path
    (`load_parent`). A run's parent is loaded by it too (`pipeline.Run.parent`). Whether a word "tiny" means
    the built-in model or a folder ./tiny is the caller's (`tiny.means_builtin_tiny`; a run's parent.path "tiny" is
    always the built-in one).

    Raises:
        PuzzleError: as `assets.model_asset_path` and `load_parent`.
    """
    if spec == "tiny":
        from .tiny import tiny_parent

        loaded = tiny_parent()
        loaded.model.to(dtype)
        return loaded
    if spec.startswith("asset:"):
        from .assets import model_asset_path

        spec = str(model_asset_path(spec[len("asset:"):], progress=progress))
    return load_parent(spec, dtype=dtype)


def local_model_arg(spec):
    """A model given on the command line, as a local path: asset:<name> becomes the packaged model's file
    (`assets.model_asset_path`), anything else (a path, "tiny", None) is returned as given (breaker: sft, rpo, gkd
    and merge said "asset:smollm2-gguf does not exist", though it is the default parent).

    Raises:
        PuzzleError: as `assets.model_asset_path` (an unknown asset, or one that is not a model).
    """
    if isinstance(spec, str) and spec.startswith("asset:"):
        from .assets import model_asset_path

        return str(model_asset_path(spec[len("asset:"):]))
    return spec


def load_parent(path, dtype: torch.dtype = torch.float32, gguf_file: str | None = None, cache_dir=None,
                with_tokenizer: bool = True) -> LoadedModel:
    """Load a Llama-family model from an HF folder, a nemotron-nas folder or a GGUF file.

    Args:
        path: a folder with config.json (HF Llama or nemotron-nas), a .gguf file, or a folder
            holding exactly one .gguf and no config.json.
        dtype: floating dtype of the returned weights (GGUF files are de-quantized to fp32 first).
        gguf_file: name of the .gguf inside `path` when the folder holds several.
        cache_dir: root of the GGUF conversion cache (default $PUZZLE_CACHE, else ~/.cache/puzzle);
            conversions live in `<cache_dir>/gguf/`.
        with_tokenizer: False to skip the tokenizer (LoadedModel.tokenizer is then None).

    Returns:
        LoadedModel with the model in eval mode on CPU.

    Raises:
        PuzzleError: a missing path, a folder with neither config.json nor one .gguf, a corrupt or
            truncated file, an unsupported architecture or option, weights that do not match the
            config or hold NaN or inf, or a cache folder that cannot be written.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise PuzzleError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise PuzzleError(f"{path} does not exist; pass an HF model folder (config.json + *.safetensors), "
                          "a nemotron-nas folder or a .gguf file")
    if gguf_file is not None:
        if not path.is_dir() or not (path / gguf_file).is_file():
            raise PuzzleError(f"gguf_file={gguf_file!r} is not a file in the folder {path}; pass the .gguf's name in that folder")
        return _load_gguf(path / gguf_file, dtype, cache_dir, with_tokenizer)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, dtype, cache_dir, with_tokenizer)
        if path.name == "config.json":
            return _load_folder(path.parent, dtype, with_tokenizer)
        try:
            with open(path, "rb") as f:
                gguf = f.read(4) == b"GGUF"
        except OSError:  # unreadable: said as before (reviewer: a PermissionError's traceback)
            gguf = False
        raise PuzzleError(f"{path} is a GGUF file by its contents; rename it to end in .gguf, as puzzle tells "
                          "GGUF files by their suffix" if gguf else  # breaker: it said "not a .gguf" of a renamed one
                          f"{path} is a file but not a .gguf; pass a .gguf file or the folder that holds config.json")
    if (path / "config.json").is_file():
        return _load_folder(path, dtype, with_tokenizer)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype, cache_dir, with_tokenizer)
    if len(ggufs) > 1:
        raise PuzzleError(f"{path} holds {len(ggufs)} .gguf files ({_few([g.name for g in ggufs], 3)}); pick one with gguf_file=")
    # breaker: `puzzle rpo --out` writes its model to OUT/model
    if (path / "model" / "config.json").is_file():
        raise PuzzleError(f"{path} has neither a config.json nor a .gguf file, but {path / 'model'} holds a model: "
                          f"pass that")
    if inside := sorted(p.parent.name for p in path.glob("*/config.json")):  # breaker: `generate run/export`
        raise PuzzleError(f"{path} has neither a config.json nor a .gguf file, but its folders "
                          f"{_few(inside, 4)} hold models: pass one of them")
    raise PuzzleError(f"{path} has neither a config.json nor a .gguf file; pass an HF model folder, a nemotron-nas "
                      f"folder or a .gguf file")
