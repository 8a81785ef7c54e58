"""Adapter: the Puzzle authors' published block library (block_library.json) as a score table.

The file (NVlabs/puzzle, examples/data/<model>/block_library.json) maps `layer_<i>` to variants
named like

    "attention = 8 kv heads (parent * 100%)\\t&&\\tffn = intermediate size 22e3 (parent * 75%)"
    "attention = no_op (parent * 0%)\\t&&\\tffn = no_op (parent * 0%)"

each with `stats` (runtime_ms, memory_mib, num_params, num_kv_heads, ffn_intermediate_size, and
attention_* / ffn_* breakdowns) and `metrics` (kl_div, lm_loss of replace-1-block scoring). A
removed subblock is written "no_op" and has 0 KV heads or width 0; a linear replacement would be
written "linear" (the Llama-3.3-70B library has none). The names are read for the kind, the stats
for the sizes, so the rounded "22e3" in a name never becomes a width.

Each variant becomes one coupled `block` row (runtime_ms, memory_mib, params from the stats;
kl_nats from kl_div; lm_loss). The file has no prefill/decode split (those columns are NaN) and no
embedding or LM-head costs: the non-block row has zero costs and `meta["non_block"]` says so, so
fractions of "the parent" are fractions of the parent's blocks. The optional sibling files
measurement_info.json (device, dtype, batch size, sequence length) and parent_block_stats.json
(the parent block) fill the sidecar meta and the `is_parent` flags.

The data is under NVIDIA's non-commercial licence: read it where it lies, never copy it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from .architecture import AttentionConfig, BlockConfig, FFNConfig
from .errors import PuzzleError

COLUMNS = ["layer", "subblock", "variant", "is_parent", "kl_nats", "lm_loss", "prefill_ms", "decode_ms",
           "runtime_ms", "memory_mib", "params"]


def _subblock(part: str, size: int, kind: str, name: str, layer: str):
    """One half of a variant name ('attention = 8 kv heads (...)') -> AttentionConfig or FFNConfig.

    Raises:
        PuzzleError: a no_op name whose stats give it a size, a size the name contradicts (its KV heads
            exactly; its FFN width, which the file rounds as '29e3', to half a unit of the last digit), or a
            GQA / SwiGLU subblock of size 0.
    """
    text = part.split("=", 1)[-1].strip().lower()
    linear = text.startswith("linear") or "replace_with_linear" in text
    if text.startswith(("no_op", "noop")) or linear:
        if size > 0 and not linear:  # (a linear replacement may keep its parent's sizes in its stats)
            # reviewer: a no_op named variant whose stats gave 4 KV heads was read as no_op without a word
            raise PuzzleError(f"{layer} variant {name!r}: its {kind} is named {text.split()[0]} but its stats give "
                              f"size {size}")
        if linear:
            return AttentionConfig("linear") if kind == "attention" else FFNConfig("linear")
        return AttentionConfig("no_op") if kind == "attention" else FFNConfig("no_op")
    if size <= 0:
        raise PuzzleError(f"{layer} variant {name!r}: {kind} is neither no_op nor linear but has size {size}")
    heads = re.match(r"(\d+)\s*kv heads", text)
    width = re.search(r"intermediate size\s*([0-9]*\.?[0-9]+)(?:e([0-9]+))?", text)
    if kind == "attention" and heads and int(heads.group(1)) != size or kind == "ffn" and width and abs(
            float(width.group(1)) * 10 ** int(width.group(2) or 0) - size) > 0.5 * 10 ** int(width.group(2) or 0):
        raise PuzzleError(f"{layer} variant {name!r}: its name says {text.split('(')[0].strip()!r} but its stats give "
                          f"{kind} size {size}")
    return AttentionConfig("gqa", int(size)) if kind == "attention" else FFNConfig("swiglu", int(size))


def variant_block(name: str, stats: dict, layer: str = "?") -> BlockConfig:
    """The BlockConfig a block_library.json variant stands for.

    Raises:
        PuzzleError: a name that is not 'attention = ... && ffn = ...' or sizes that contradict it.
    """
    parts = [p.strip() for p in re.split(r"&&", name)]
    if len(parts) != 2 or not parts[0].lower().startswith("attention") or not parts[1].lower().startswith("ffn"):
        raise PuzzleError(f"{layer}: variant name {name!r} is not 'attention = ... && ffn = ...'")
    kv, width = _sizes(stats, f"{layer} variant {name!r}")
    return BlockConfig(_subblock(parts[0], kv, "attention", name, layer), _subblock(parts[1], width, "ffn", name, layer))


def _sizes(stats: dict, where: str) -> tuple[int, int]:
    """(num_kv_heads, ffn_intermediate_size) of `stats`. Raises PuzzleError naming `where` and the field
    that is missing or not a whole number (8.7, "8", true)."""
    sizes = []
    for field in ("num_kv_heads", "ffn_intermediate_size"):
        value = stats.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) \
                and not value.is_integer():
            got = "missing" if field not in stats else f"{value!r}"
            raise PuzzleError(f"{where}: stats need whole-number num_kv_heads and ffn_intermediate_size, but "
                              f"{field} is {got}")
        sizes.append(int(value))
    return sizes[0], sizes[1]


def read_puzzle_library(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read block_library.json (or the folder holding it) as a coupled score table.

    Returns:
        (table, meta): one `block` row per (layer, variant) with the columns of `COLUMNS`, plus one
        `non_block` row (layer -1, zero costs); meta with the device, dtype, batch_size,
        sequence_length (measurement_info.json), source path and a note on non-block costs.

    Raises:
        PuzzleError: a missing or unreadable file, a key given twice in one object (a variant listed twice), a
            variant that cannot be mapped, two variant names of one layer for the same block (naming both), a
            parent_block_stats.json whose sizes are not
            whole numbers or name a block some layer lacks, or (without that file) a layer that lacks the
            library's widest block, the parent's.
    """
    path = Path(path)
    folder, file = (path, path / "block_library.json") if path.is_dir() else (path.parent, path)
    if not file.is_file():
        raise PuzzleError(f"{file} does not exist; point --library at block_library.json or its folder")
    try:
        library = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_refuse_repeated_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{file} is not valid JSON ({e})") from e
    except _RepeatedKey as e:  # breaker: a variant listed twice was read as its last copy, without a word
        raise PuzzleError(f"{file} lists the key {str(e)[:200]!r} twice in one object (JSON readers keep the last "
                          f"copy); delete one of them") from None
    if not isinstance(library, dict):
        raise PuzzleError(f"{file} must be a JSON object mapping layer_0 ... layer_<L-1> to variants, "
                          f"not a {type(library).__name__}")
    layer_keys = sorted((k for k in library if re.fullmatch(r"layer_\d+", k)), key=lambda k: int(k[6:]))
    if not layer_keys or [int(k[6:]) for k in layer_keys] != list(range(len(layer_keys))):
        numbers = {int(k[6:]) for k in layer_keys}  # the first 8 missing only: a key layer_10**15 must not fill memory
        missing = list(itertools.islice((i for i in range(max(numbers, default=-1) + 1) if i not in numbers), 8))
        found = (": it has no layer_N keys" if not layer_keys else
                 f": it lacks {', '.join(f'layer_{i}' for i in missing)}" if missing else "")
        raise PuzzleError(f"{file} must map layer_0 ... layer_<L-1> to variants{found}")
    info = _measurement_info(folder / "measurement_info.json")
    parent_file = folder / "parent_block_stats.json"
    parent_stats = _optional_json(parent_file).get("stats", {})
    if not isinstance(parent_stats, dict):
        raise PuzzleError(f"{parent_file}: 'stats' must be an object")
    for key in layer_keys:
        if not isinstance(library[key], dict) or not library[key]:
            raise PuzzleError(f"{file}: {key} must map variant names to {{'stats': ..., 'metrics': ...}} objects")
        for name, v in library[key].items():
            if not isinstance(v, dict) or not isinstance(v.get("stats", {}), dict) \
                    or not isinstance(v.get("metrics", {}), dict):
                raise PuzzleError(f"{file}: {key} variant {name!r} must be an object with 'stats' and 'metrics' objects")

    stated_parent = None
    if parent_stats:
        kv, width = _sizes(parent_stats, str(parent_file))
        if kv < 1 or width < 1:
            raise PuzzleError(f"{parent_file}: the parent block needs num_kv_heads and ffn_intermediate_size of at "
                              f"least 1, got {kv} and {width}")
        stated_parent = BlockConfig(AttentionConfig("gqa", kv), FFNConfig("swiglu", width))

    per_layer = {key: {name: variant_block(name, v.get("stats", {}), key) for name, v in library[key].items()}
                 for key in layer_keys}
    widest_of = lambda bs: max(bs, key=lambda b: (b.attention.num_kv_heads or 0, b.ffn.intermediate_size or 0))  # noqa: E731
    overall = widest_of([b for blocks in per_layer.values() for b in blocks.values()])
    if stated_parent is None:  # the parent's block is the widest of the whole library, and every layer has it
        if lacking := [key for key, blocks in per_layer.items() if overall not in blocks.values()]:
            raise PuzzleError(f"{file}: {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''} "
                              f"{'has' if len(lacking) == 1 else 'have'} no variant of the parent block {overall.id} "
                              f"(the widest of the library, which the other layers have), so the budgets' fractions "
                              f"would be of another model (the parent has one block in every layer); restore it, "
                              f"or name the parent's sizes in {parent_file}")
    rows = []
    for key in layer_keys:
        variants = library[key]
        blocks = per_layer[key]
        seen = {}
        for name, block in blocks.items():
            if block in seen:
                raise PuzzleError(f"{file}: {key} has two variants of the block {block.id}, {seen[block]!r} and "
                                  f"{name!r}; keep one of them")
            seen[block] = name
        widest = widest_of(blocks.values())
        parent = stated_parent or overall  # the widest block (most KV heads, then the widest FFN) unless stated
        if parent not in seen:
            kv, width = parent.attention.num_kv_heads, parent.ffn.intermediate_size
            # delete the stats only where the widest block is then in every layer (breaker: that advice led to the
            # other refusal, "restore it, or name the parent's sizes")
            others = [k for k, bs in per_layer.items() if parent in bs.values()]
            if all(overall in bs.values() for bs in per_layer.values()):
                fix = (f"correct those stats or delete {parent_file.name} (the widest variant, {overall.id}, is then "
                       f"the parent)")
            else:
                have = f" ({len(others)} other layers have it)" if others else ""
                fix = f"restore that variant in {key}{have}, or correct those stats"
            raise PuzzleError(f"{parent_file} names the parent block {parent.id} (num_kv_heads {kv}, "
                              f"ffn_intermediate_size {width}), but {key} of {file} has no such variant (its widest "
                              f"is {widest.id}); {fix}")
        for name, v in variants.items():
            stats, metrics = v.get("stats", {}), v.get("metrics", {})
            where = f"{file}: {key} variant {name!r}"
            rows.append({"layer": int(key[6:]), "subblock": "block", "variant": blocks[name].id,
                         "is_parent": blocks[name] == parent, "kl_nats": _number(metrics.get("kl_div"), where, "kl_div"),
                         "lm_loss": _number(metrics.get("lm_loss"), where, "lm_loss"), "prefill_ms": math.nan,
                         "decode_ms": math.nan, "runtime_ms": _number(stats.get("runtime_ms"), where, "runtime_ms"),
                         "memory_mib": _number(stats.get("memory_mib"), where, "memory_mib"),
                         "params": _number(stats.get("num_params"), where, "num_params")})
    rows.append({"layer": -1, "subblock": "non_block", "variant": "non_block", "is_parent": True, "kl_nats": 0.0,
                 "lm_loss": math.nan, "prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0, "memory_mib": 0.0,
                 "params": 0.0})
    table = pd.DataFrame(rows, columns=COLUMNS)
    meta = {"source": str(file), "format": "puzzle-authors-block-library",
            "device": info.get("gpu"), "dtype": info.get("dtype"), "batch_size": info.get("batch_size"),
            "sequence_length": info.get("sequence_length"), "prompt_len": None, "gen_len": None,
            "non_block": "not in the file: zero costs (fractions are of the parent's blocks only)",
            "prefill_decode": "not in the file: runtime_ms is the block's whole measured runtime"}
    return table, meta


def _measurement_info(path: Path) -> dict:
    """measurement_info.json's workload ({} if there is no file), each field checked (breaker: a batch size of -256
    and a sequence length of 1e400 went into the search's JSON as they were): batch_size and sequence_length
    positive whole numbers, gpu and dtype text; a field may be missing or null.

    Raises:
        PuzzleError: naming the field and what it holds.
    """
    info = _optional_json(path)
    for field in ("batch_size", "sequence_length"):
        value = info.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 1 or value != int(value)):
            raise PuzzleError(f"{path}: {field} must be a positive whole number (or null), got {json.dumps(value)}")
        if value is not None:
            info[field] = int(value)
    for field in ("gpu", "dtype"):
        if info.get(field) is not None and not isinstance(info[field], str):
            raise PuzzleError(f"{path}: {field} must be text (or null), got {json.dumps(info[field])}")
    return info


class _RepeatedKey(ValueError):
    """A key that one JSON object of block_library.json holds twice."""


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: the object as a dict. Raises _RepeatedKey (the key) for a key given twice."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen[key] = value
    return seen


def _optional_json(path: Path) -> dict:
    """The JSON object in `path` ({} if there is no file); its non-finite numbers (NaN) read as None."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda _: None)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise PuzzleError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _number(value, where: str = "", field: str = "") -> float:
    """A number of the file as float (None: NaN, a missing value). Raises PuzzleError for text, lists, bools."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PuzzleError(f"{where}: {field} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # a whole number beyond float range: refused as infinite by the finiteness checks
        return math.inf
