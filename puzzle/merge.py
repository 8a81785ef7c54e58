"""Checkpoint merging: the weighted average of checkpoints of one architecture.

Llama-Nemotron's released models are weight averages of checkpoints from different post-training
runs (SFT and preference-optimized). The merged weight is θ = Σ_i w_i θ_i with Σ_i w_i = 1
(weights are normalised; all must be positive), computed in fp32 and stored in the first
checkpoint's dtype. Only checkpoints of the same architecture can be averaged: the same
per-layer blocks (kind, KV heads, FFN width), sizes, vocabulary, RoPE and tying, and the same
tensor names and shapes. Anything else is refused with a PuzzleError that names the first
difference.

Inputs are model folders that `puzzle.parent.load_parent` reads (HF Llama, nemotron-nas exports,
GGUF) or bare state dicts (.safetensors / .pt files of tensors, e.g. a training checkpoint's
weights), not both kinds mixed. Folders give an exported folder (`puzzle.export`), state dicts a
.safetensors file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from .architecture import ModelConfig
from .errors import PuzzleError, first_line
from .modeling import PuzzleForCausalLM


def normalized_weights(weights, n: int) -> list[float]:
    """n weights summing to 1 (equal weights when None). Raises PuzzleError for a wrong count or a weight that
    is not a positive finite number."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise PuzzleError(f"{len(weights)} weights for {n} checkpoints; give one weight per checkpoint")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise PuzzleError(f"merge weights must be positive finite numbers, got {weights}")
    top = max(weights)  # scale first: 1e308 + 1e308 overflows, 1e308/1e308 + 1 does not
    total = sum(w / top for w in weights)
    return [w / top / total for w in weights]


def architecture_difference(a: ModelConfig, b: ModelConfig) -> str | None:
    """The first difference that stops two configs from being averaged, in words, or None.

    Provenance (`extra`) and token ids are ignored; everything that shapes a tensor or the
    computation is compared.
    """
    if a.num_hidden_layers != b.num_hidden_layers:
        return f"{a.num_hidden_layers} vs {b.num_hidden_layers} layers"
    for i, (x, y) in enumerate(zip(a.blocks, b.blocks)):
        if x != y:
            return f"layer {i} is {x.id} in one and {y.id} in the other"
    skip = {"blocks", "extra", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in skip and getattr(a, f.name) != getattr(b, f.name):
            return f"{f.name} is {getattr(a, f.name)!r} in one and {getattr(b, f.name)!r} in the other"
    return None


def merge_state_dicts(state_dicts: list[dict], weights=None, names=None, dtype: torch.dtype | None = None
                      ) -> dict[str, torch.Tensor]:
    """Σ_i w_i · state_dicts[i], tensor by tensor, in fp32, cast to `dtype` (default: the first's dtypes).

    Args:
        state_dicts: name -> tensor maps with the same names and shapes.
        weights: one positive weight per state dict (normalised to sum 1; default equal).
        names: what to call each input in errors.
        dtype: the merged tensors' dtype (default: each the first input's).

    Raises:
        PuzzleError: fewer than two inputs, different tensor names or shapes, a tensor floating in one input
            and not in another, non-float tensors that differ (integer buffers must be equal to be kept).
    """
    if len(state_dicts) < 2:
        raise PuzzleError("merging needs at least two checkpoints")
    names = names or [f"checkpoint {i}" for i in range(len(state_dicts))]
    w = normalized_weights(weights, len(state_dicts))
    first = state_dicts[0]
    for sd, name in zip(state_dicts[1:], names[1:]):
        missing, extra = sorted(set(first) - set(sd)), sorted(set(sd) - set(first))
        if missing or extra:
            raise PuzzleError(f"{name} has other tensors than {names[0]} (missing {missing[:3]}, extra {extra[:3]}): "
                              "not the same architecture, so its weights cannot be averaged")
        for k, v in first.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise PuzzleError(f"{k} is {tuple(v.shape)} in {names[0]} but {tuple(sd[k].shape)} in {name}: "
                                  "not the same architecture, so its weights cannot be averaged")
            if sd[k].is_floating_point() != v.is_floating_point():  # breaker: averaged or refused by input order
                kinds = {n: str(t.dtype).removeprefix("torch.") for n, t in ((names[0], v), (name, sd[k]))}
                raise PuzzleError(f"{k} is {kinds[names[0]]} in {names[0]} but {kinds[name]} in {name}: a float "
                                  f"tensor and an integer one cannot be averaged; give checkpoints saved alike")
    out = {}
    for k, v in first.items():
        if not v.is_floating_point():
            if any(not torch.equal(sd[k], v) for sd in state_dicts[1:]):
                raise PuzzleError(f"non-float tensor {k} differs between checkpoints; it cannot be averaged")
            out[k] = v.clone()
            continue
        acc = torch.zeros(v.shape, dtype=torch.float32)
        for wi, sd in zip(w, state_dicts):
            acc += wi * sd[k].float()
        out[k] = acc.to(dtype or v.dtype)
    return out


def merge_models(models: list[PuzzleForCausalLM], weights=None, names=None) -> PuzzleForCausalLM:
    """A new model whose weights are the weighted average of `models` (same architecture).

    Raises:
        PuzzleError: architectures differ (the message names the first difference), or see
            `merge_state_dicts`.
    """
    names = names or [f"model {i}" for i in range(len(models))]
    for m, name in zip(models[1:], names[1:]):
        diff = architecture_difference(models[0].config, m.config)
        if diff:
            tie = ("; export both tied, or both with `puzzle export --untie-embeddings`"
                   if diff.startswith("tie_word_embeddings") else "")  # breaker: said no fix
            raise PuzzleError(f"{names[0]} and {name} have different architectures ({diff}); only checkpoints of "
                              f"the same architecture can be merged{tie}")
    from .parent import model_from_state_dict

    merged = merge_state_dicts([m.state_dict() for m in models], weights, names)
    dtype = next(models[0].parameters()).dtype
    return model_from_state_dict(models[0].config, merged, dtype, what="merged checkpoint", copy=False)


def _is_state_dict_file(path: Path) -> bool:
    return path.is_file() and path.suffix in (".safetensors", ".pt", ".bin")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.bin file holding a dict of tensors (weights_only),
    or the "model" entry of a training checkpoint (puzzle.train_utils)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "modules" in meta and "config" in meta:  # breaker: factors averaged one by one, and the file unloadable
                raise PuzzleError(f"{path} is a (Tied-)LoRA adapter file: its factors do not average into the average "
                                  f"of their weight changes (v*(B@(u*A)) is a product), so they are not merged; merge "
                                  f"the models they were folded into instead (`puzzle rpo`'s OUT/model)")
            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except PuzzleError:
        raise
    except Exception as e:  # noqa: BLE001  (any reader failure is a bad file for the user)
        raise PuzzleError(f"{path} cannot be read as a state dict ({first_line(e)})") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PuzzleError(f"{path} does not hold a dict of tensors")
    return sd


def _recorded_models(info) -> list:
    """The model paths an export's config.json "puzzle" entry records as its inputs: "source" -> "path" (where
    the weights were loaded from), every "merge" -> "inputs", "sft" -> "model", "gkd" -> "child" / "parent", and a
    run export's "parent"."""
    if not isinstance(info, dict):
        return []
    out = []
    for key, fields in (("source", ("path",)), ("sft", ("model",)), ("gkd", ("child", "parent"))):
        entry = info.get(key)
        out += [entry.get(f) for f in fields] if isinstance(entry, dict) else []
    merge = info.get("merge")
    out += list(merge.get("inputs") or []) if isinstance(merge, dict) else []
    out.append(info.get("parent"))
    return out


def derived_from(paths) -> list[tuple[Path, Path, str]]:
    """(model folder, model, recorded path) for each model folder the model folders `paths` were derived from,
    as their exports record it (`_recorded_models`), followed back through the exports among those.

    Only absolute records count: a relative one was typed relative to a working folder nobody recorded, and
    read from the current one it can name an unrelated model. Inputs recorded by `merge`, `sft --model` and
    `gkd` are absolute (`puzzle.export.model_ref`); a `source` path is as the loader was given it."""
    from .export import export_info, model_ref

    out, seen, todo = [], set(), [Path(p).expanduser() for p in paths]
    while todo:
        model = todo.pop()
        model = model.parent if model.name == "config.json" else model
        for recorded in _recorded_models(export_info(model)):
            if not isinstance(recorded, str) or not Path(recorded).expanduser().is_absolute():
                continue
            source = Path(model_ref(recorded))
            if not (source / "config.json").is_file() or source in seen:
                continue
            seen.add(source)
            out.append((source, model, recorded))
            todo.append(source)
    return out


def _merge_pairs(record: dict, key: str = "merged_from") -> list[tuple[str, float]] | None:
    """A state-dict merge's (input, weight) pairs in a canonical order (the order only pairs them), or None when
    `record` ({"merged_from": [paths], "inputs_sha": [weights hashes], "weights": [...]}) has no such `key`."""
    inputs, weights = record.get(key), record.get("weights")
    if not (isinstance(inputs, list) and isinstance(weights, list) and len(inputs) == len(weights)):
        return None
    return sorted((str(i), round(float(w), 9)) for i, w in zip(inputs, weights))


def _metadata_value(text: str):
    """A value of a state-dict merge's metadata: JSON, or a Python literal (`str(list)`, as an earlier version
    wrote it)."""
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)


def _check_state_dict_dest(dest: Path, record: dict) -> None:
    """Refuse a state-dict merge's --dest that would replace or spoil weights: a file inside an exported model
    (its weights, or a file that makes the folder no export), or an existing file other than an earlier merge of
    the same inputs with the same weights (that rerun replaces it, as with folders).

    Raises:
        PuzzleError: naming the file and what to give instead.
    """
    from safetensors import SafetensorError, safe_open

    from .export import is_export_folder, model_ref

    target = dest.resolve()
    if (export := next((p for p in target.parents if p.is_dir() and is_export_folder(p)), None)) is not None:
        raise PuzzleError(f"--dest {dest} is inside the exported model {export}, whose weights or files it would "
                          f"replace; give a .safetensors path outside it")
    if (target.parent / "config.json").is_file():  # a .safetensors there is one more shard of that model's weights
        raise PuzzleError(f"--dest {dest} is inside the model folder {target.parent} (it holds config.json), whose "
                          f"weights a .safetensors file there would join; give a path outside it")
    if not dest.exists():
        return
    try:
        with safe_open(str(dest), framework="pt") as f:
            meta = f.metadata() or {}
        earlier = {k: _metadata_value(meta[k]) for k in ("merged_from", "weights")}
        earlier["merged_from"] = [model_ref(p) for p in earlier["merged_from"]]  # an earlier version: as typed
        if "inputs_sha" in meta:
            earlier["inputs_sha"] = _metadata_value(meta["inputs_sha"])
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, SafetensorError):  # not an earlier merge of ours
        earlier = None
    if earlier is None or _merge_pairs(earlier) is None:
        raise PuzzleError(f"--dest {dest} exists and is not an earlier `puzzle merge` output, so it is left as it is; "
                          f"give a new .safetensors path")
    # the inputs by their weights (a moved input is the same, a rewritten one is not); by path for an earlier version
    key = "inputs_sha" if _merge_pairs(earlier, "inputs_sha") is not None else "merged_from"
    if _merge_pairs(earlier, key) != _merge_pairs(record, key):
        were = ", ".join(f"{i} x{w:.6g}" for i, w in _merge_pairs(earlier))
        raise PuzzleError(f"--dest {dest} holds another merge ({were}{' with other input weights' if key == 'inputs_sha' else ''}) "
                          f"that this one would replace; give a new .safetensors path, or delete that file first if "
                          f"it is no longer needed")


TWICE = "an input is given twice; give each checkpoint once, with --weights for its share"


def _refuse_same_weights(paths, shas) -> None:
    """Refuse two inputs whose weights hash alike (a copy of one checkpoint): their average is that checkpoint
    (breaker: `merge A copy-of-A` wrote a "merge" that was A, where `merge A A` is refused)."""
    seen: dict[str, object] = {}
    for path, sha in zip(paths, shas):
        if sha in seen:
            raise PuzzleError(f"{seen[sha]} and {path} hold the same weights (a copy?), so their average is that "
                              f"checkpoint; give checkpoints that differ, with --weights for their shares")
        seen[sha] = path


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(folder: Path) -> str | None:
    """The floating dtype a model folder stores its weights in: config.json's `torch_dtype` (or `dtype`), else the
    first floating tensor's in its first .safetensors file's header; None when neither says (a GGUF file,
    quantized or odd weights: the merge is stored in fp32 then)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        named = config.get("torch_dtype") or config.get("dtype")
        if named in _SAFETENSORS_DTYPES.values():
            return named
    except (OSError, ValueError, AttributeError):
        pass
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:  # the header only
                kinds = [f.get_slice(k).get_dtype() for k in f.keys()]
        except (OSError, SafetensorError):
            return None
        return next((_SAFETENSORS_DTYPES[d] for d in kinds if d in _SAFETENSORS_DTYPES), None)
    return None


def _check_same_vocabulary(paths, tokenizers) -> None:
    """Refuse inputs whose tokenizers map a token to different ids (breaker: two ids swapped in one input's
    tokenizer.json were merged unsaid, under the first input's tokenizer): a row of the embedding and LM head is
    then a different token in each model. Inputs without a tokenizer are not compared.

    Raises:
        PuzzleError: naming the inputs and one token whose id differs.
    """
    vocabs = [(p, t.get_vocab()) for p, t in zip(paths, tokenizers) if t is not None]
    for path, vocab in vocabs[1:]:
        first_path, first = vocabs[0]
        if vocab != first:
            token = next((k for k in sorted(set(first) | set(vocab)) if first.get(k) != vocab.get(k)), None)
            raise PuzzleError(f"{first_path} and {path} have different tokenizers (the token {token!r} is id "
                              f"{first.get(token)} in one and {vocab.get(token)} in the other), so the same row of "
                              f"their embeddings is not the same token; merge only models of one tokenizer")


def _check_merged_finite(merged: dict, states: list[dict], names: list[str]) -> None:
    """Refuse a merged state dict holding NaN or ±inf, as an export refuses one (`export._check_finite`; breaker: a
    state-dict merge wrote them unsaid, where a folder merge refuses).

    Raises:
        PuzzleError: naming the first such tensor, and whether an input holds it or the stored dtype overflows."""
    for key, tensor in merged.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            broken = [n for n, sd in zip(names, states) if not torch.isfinite(sd[key]).all()]
            if broken:
                raise PuzzleError(f"{key} holds NaN or inf values in {broken[0]}: the merge would be broken; nothing "
                                  f"was written. Check where that checkpoint came from (a diverged training?)")
            largest = max(sd[key].float().abs().max().item() for sd in states)
            raise PuzzleError(f"{key} overflows {str(tensor.dtype).removeprefix('torch.')} (its largest magnitude is "
                              f"{largest:.3g}): store it in float32 or bfloat16 (--dtype); nothing was written")


def merge_checkpoints(paths, dest, weights=None, dtype=None) -> Path:
    """Merge model folders into an exported folder, or state-dict files into a .safetensors file.

    Args:
        paths: two or more model folders (load_parent) or two or more state-dict files.
        dest: the folder (or .safetensors file) to write; an existing one is replaced only when it is an earlier
            export (not of trained weights of another provenance: `export.check_export_target`) or, for a file,
            an earlier merge of the same inputs and weights.
        weights: positive weights, one per input (normalised; default equal).
        dtype: the stored dtype (default: the first input's, tensor by tensor for state dicts).

    Returns:
        The written path.

    Raises:
        PuzzleError: mixed input kinds, a missing path, different architectures or tokenizers, a `dest` that is an
            input or a model an input was derived from (`derived_from`), one that would replace something else, or
            a merge that holds NaN or inf (an input does, or it overflows the stored dtype).
    """
    if dtype is not None and str(dtype).removeprefix("torch.") not in ("float32", "bfloat16", "float16"):
        raise PuzzleError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    paths = [Path(p).expanduser() for p in paths]
    for p in paths:
        if not p.exists():  # breaker: 'tiny' (a model sft and rpo take) was said not to exist
            raise PuzzleError(f"{p} does not exist" + ("; merge takes model folders or state-dict files, not the "
                                                       "built-in tiny model" if str(p) == "tiny" else ""))
    kinds = {_is_state_dict_file(p) for p in paths}
    if len(kinds) > 1:
        raise PuzzleError("give only model folders or only state-dict files, not both")
    from .export import model_ref
    from .pipeline import tensors_sha, weights_sha

    twice = len({model_ref(p) for p in paths}) < len(paths)  # refused after what --dest would break
    dest = Path(dest).expanduser()
    if kinds == {True}:
        from .io import atomic_save_safetensors, file_in_the_way

        if dest.suffix != ".safetensors":
            raise PuzzleError(f"state dicts merge into a .safetensors file; got --dest {dest}")
        if dest.is_symlink() or dest.exists() and not dest.is_file():
            raise PuzzleError(f"--dest {dest} exists and is not a regular file; give a new .safetensors path")
        if dest.resolve() in {Path(p).resolve() for p in paths}:
            raise PuzzleError(f"--dest {dest} is one of the inputs; give a new .safetensors path")
        if (above := file_in_the_way(dest)) is not None:
            raise PuzzleError(f"--dest {dest}: {above} is a file, so nothing can be written under it")
        if twice:
            raise PuzzleError(TWICE)
        states = [read_state_dict(p) for p in paths]
        record = {"merged_from": [model_ref(p) for p in paths], "weights": normalized_weights(weights, len(paths)),
                  "inputs_sha": [tensors_sha(sorted(sd.items()))[:16] for sd in states],
                  **({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {})}
        _refuse_same_weights(paths, record["inputs_sha"])
        _check_state_dict_dest(dest, record)
        merged = merge_state_dicts(states, weights, [str(p) for p in paths],  # breaker: --dtype was ignored here
                                   dtype=getattr(torch, record["dtype"]) if dtype is not None else None)
        _check_merged_finite(merged, states, [str(p) for p in paths])
        atomic_save_safetensors(merged, dest, metadata={k: json.dumps(v) for k, v in record.items()})
        return dest
    from .export import check_export_target, export_checkpoint, export_provenance
    from .parent import load_parent

    if dest.suffix in (".safetensors", ".pt", ".bin", ".gguf"):
        raise PuzzleError(f"model folders merge into a folder (an export); got --dest {dest}, a file name; give a "
                          f"folder path")
    record = {"inputs": [model_ref(p) for p in paths], "weights": normalized_weights(weights, len(paths)),
              **({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {})}
    by_path = export_provenance({"merge": record})  # as an earlier version recorded a merge: its inputs' paths
    check_export_target(dest, overwrite=True, keep=paths)  # before loading: a folder of other files, a link, ...
    from .pipeline import check_dest_in_a_run

    check_dest_in_a_run(dest, "merged")  # e.g. a run's export of a child or a baseline
    if twice:
        raise PuzzleError(TWICE)
    for source, model, recorded in derived_from(paths):  # e.g. the parent of a run, which merge cannot see
        if source == dest.resolve():
            raise PuzzleError(f"--dest {dest} is the model {model} was derived from (its config.json records "
                              f"{recorded}); merging into it would replace that model; give a new folder")
    loaded = [load_parent(p) for p in paths]
    _check_same_vocabulary(paths, [lm.tokenizer for lm in loaded])
    # the inputs by their weights: a moved input is the same merge, one whose weights changed is another
    record["inputs_sha"] = [weights_sha(lm.model)[:16] for lm in loaded]
    _refuse_same_weights(paths, record["inputs_sha"])
    check_export_target(dest, overwrite=True, keep=paths, provenance=export_provenance({"merge": record}),
                        also_same=(by_path,))
    merged = merge_models([lm.model for lm in loaded], weights, [str(p) for p in paths])
    # load_parent reads every input in fp32: without --dtype, store the merge as the first input is stored
    exported = export_checkpoint(merged, loaded[0].tokenizer, dest, dtype=dtype or stored_dtype(paths[0]), overwrite=True,
                                 extra_info={"merge": record}, also_same=(by_path,))
    if exported.replaced:
        print(f"merge: replaced the export of {exported.replaced} that was in {dest}", file=sys.stderr)
    return dest


def cmd_merge(args) -> int:
    from .runlock import EXPORT_ADVICE, also_lock

    also_lock(args.dest, EXPORT_ADVICE)  # one writer per destination (another merge, an export --dest)
    from .parent import local_model_arg

    args.checkpoints = [local_model_arg(c) for c in args.checkpoints]
    dest = merge_checkpoints(args.checkpoints, args.dest, args.weights, args.dtype)
    w = normalized_weights(args.weights, len(args.checkpoints))
    shown = ", ".join(f"{x:.4g}" for x in w)  # 4 significant digits: 1e-300 is not 0.0 (breaker)
    print(f"merged {len(args.checkpoints)} checkpoints with weights [{shown}] -> {dest}", file=sys.stderr)
    return 0


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle merge` to an argparse subparsers object; func(args) returns an exit code."""
    p = subparsers.add_parser("merge", help="weighted average of checkpoints of the same architecture",
                              description="Average model folders (HF, nemotron-nas exports, GGUF) into an exported "
                                          "folder, or state-dict files into a .safetensors file. Architectures must "
                                          "match exactly.")
    p.add_argument("checkpoints", nargs="+", help="two or more model folders, or two or more .safetensors/.pt files")
    p.add_argument("--weights", nargs="+", action="extend", type=float, help="one positive weight per checkpoint (normalised; default equal)")
    p.add_argument("--dest", type=Path, required=True, help="folder to write (or a .safetensors file for state dicts)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype (default: the first's)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_merge)
    return p
