"""FFN Fusion: consecutive FFN subblocks with no attention between them, run in parallel as one wide FFN.

Once attention is removed from layers i+1..j-1 of a child, the FFNs of layers i..j-1 follow each
other directly in the residual stream:

    h_{k+1} = h_k + FFN_k(norm_k(h_k))            k = i..j-1   (sequential, what the child computes)
    h_j    ≈ h_i + Σ_k FFN_k(norm_k(h_i))                      (parallel: every FFN reads h_i)

(FFN Fusion, Bercovich et al. 2025, used for Llama-Nemotron-Ultra; DESIGN.md "FFN Fusion"). The
parallel form is an approximation of the sequential one (the later FFNs no longer see the earlier
ones' outputs; distillation recovers the difference), but it is *exactly* one wide SwiGLU:
norm_k(h) = w_k ⊙ u with u = h / rms(h), so each layer's RMSNorm weight w_k folds into the columns of
its gate and up projections, W_gate_k · diag(w_k); the folded gate/up rows of all layers stack, and
their down projections concatenate along the width:

    gate = [W_gate_i diag(w_i); ...; W_gate_{j-1} diag(w_{j-1})]      (ΣF_k, C)
    up   = [W_up_i   diag(w_i); ...]                                  (ΣF_k, C)
    down = [W_down_i, ..., W_down_{j-1}]                              (C, ΣF_k)
    Σ_k down_k(silu(gate_k u) ⊙ up_k u) = down(silu(gate u) ⊙ up u)

Linear FFN replacements fold the same way and add up: Σ_k W_k diag(w_k) is one (C, C) matrix;
no_op FFNs contribute nothing. Down-projection biases add up.

`FusedFFNBlock` holds the attention subblock of the run's first layer (if any), a weightless
RMSNorm, the wide SwiGLU (or the summed linear map when the run has no SwiGLU) and, for a run that
mixes SwiGLU and linear FFNs, the summed linear map beside it. `fuse_ffn_runs` replaces runs of a
`PuzzleForCausalLM` with such blocks (modeling.py is unchanged: the new model keeps its config, its
attention layers keep their layer index for the KV cache, and `forward`/`generate` simply walk the
shorter layer list). When no run mixes SwiGLU with linear FFNs, `to_plain_model` turns the result
into an ordinary, shallower `PuzzleForCausalLM` (each fused run is one block: the first layer's
attention and an FFN of width ΣF_k), which `puzzle.export` writes in the nemotron-nas format.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from .errors import PuzzleError, shell_arg
from .io import read_json_or_none
from .modeling import DecoderBlock, LinearFFN, PuzzleForCausalLM, RMSNorm, SwiGLU, build_attention


def ffn_runs(config: ModelConfig, include_leading: bool = True, min_ffns: int = 2) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of layers whose FFNs follow each other with no attention between them.

    A run is layers start+1..end-1 with no_op attention, plus layer `start`, whose own attention
    (if any) runs before the fused FFN (include_leading=True); with include_leading=False every
    layer of a run has no_op attention. Runs with fewer than `min_ffns` FFNs that are not no_op
    are left out (nothing to fuse).

    Returns:
        [(start, end), ...] in layer order, non-overlapping.
    """
    runs, start = [], None
    blocks = config.blocks
    for i, block in enumerate(list(blocks) + [None]):
        opens_run = block is None or block.attention.kind != "no_op" or start is None
        if opens_run:
            if start is not None and sum(b.ffn.kind != "no_op" for b in blocks[start:i]) >= min_ffns:
                runs.append((start, i))
            start = None
            if block is not None and (include_leading or block.attention.kind == "no_op"):
                start = i
    return runs


class FusedFFNBlock(nn.Module):
    """One attention subblock (optional) followed by several FFN subblocks run in parallel.

    forward: h (B, T, C) -> h' = h + attn(norm_a(h)), then h' + wide(u) + linear(u), u = h'/rms(h').
    Parameter names follow DecoderBlock's (self_attn.*, input_layernorm, post_attention_layernorm,
    mlp.*), so a block without the extra linear part loads into a plain DecoderBlock.

    Attributes:
        layers: the original layer indices this block replaces.
        extra_linear: (C, C) summed linear FFNs, only when the run mixes SwiGLU and linear FFNs.
    """

    def __init__(self, config: ModelConfig, attention: AttentionConfig, intermediate_size: int, linear: bool,
                 layer_idx: int, layers: Sequence[int]):
        super().__init__()
        self.layer_idx, self.layers = layer_idx, tuple(layers)
        self.attention_config = attention
        self.self_attn = build_attention(config, attention, layer_idx)
        if self.self_attn is not None:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if intermediate_size:
            self.mlp = SwiGLU(config, intermediate_size)
        else:
            self.mlp = LinearFFN(config) if linear else None
        both = intermediate_size and linear
        self.extra_linear = nn.Linear(config.hidden_size, config.hidden_size, bias=False) if both else None
        if self.mlp is not None:  # weightless in effect: every layer's norm weight is folded into its columns
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def block_config(self) -> BlockConfig | None:
        """The plain block this is (first layer's attention + one FFN), or None with an extra linear part."""
        if self.extra_linear is not None:
            return None
        if isinstance(self.mlp, SwiGLU):
            ffn = FFNConfig("swiglu", self.mlp.gate_proj.out_features)
        else:
            ffn = FFNConfig("linear") if self.mlp is not None else FFNConfig("no_op")
        return BlockConfig(self.attention_config, ffn)

    def forward(self, h, cos=None, sin=None, cache=None, attention_mask=None):  # (B, T, C) -> (B, T, C)
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, attention_mask)
        if self.mlp is None:
            return h
        u = self.post_attention_layernorm(h)  # (B, T, C): h / rms(h)
        out = h + self.mlp(u)
        if self.extra_linear is not None:
            out = out + self.extra_linear(u)
        return out


@torch.no_grad()
def fuse_layers(config: ModelConfig, layers: Sequence[DecoderBlock]) -> FusedFFNBlock:
    """The FusedFFNBlock of consecutive decoder blocks (see the module docstring for the folding).

    Args:
        layers: blocks of one run; every block after the first must have no_op attention.

    Raises:
        PuzzleError: no blocks, a block after the first has attention, or the RMSNorm epsilons differ.
    """
    if not len(layers):
        raise PuzzleError("fuse_layers needs the blocks of one run, at least one; got none")
    if any(layer.self_attn is not None for layer in layers[1:]):
        bad = [layer.layer_idx for layer in layers[1:] if layer.self_attn is not None]
        raise PuzzleError(f"layers {bad} have attention: only FFNs with no attention between them can be fused")
    first = layers[0]
    gates, ups, downs, down_bias, linear = [], [], [], None, None
    for layer in layers:
        if layer.mlp is None:
            continue
        if layer.post_attention_layernorm.eps != config.rms_norm_eps:
            raise PuzzleError(f"layer {layer.layer_idx}: RMSNorm eps {layer.post_attention_layernorm.eps} differs from "
                              f"the model's {config.rms_norm_eps}; its norm cannot be folded")
        w = layer.post_attention_layernorm.weight  # (C,)
        if isinstance(layer.mlp, SwiGLU):
            m = layer.mlp
            gates.append((m.gate_proj.weight * w, m.gate_proj.bias))  # (F_k, C): W diag(w)
            ups.append((m.up_proj.weight * w, m.up_proj.bias))
            downs.append(m.down_proj.weight)  # (C, F_k)
            if m.down_proj.bias is not None:
                down_bias = m.down_proj.bias.clone() if down_bias is None else down_bias + m.down_proj.bias
        else:
            folded = layer.mlp.linear_mlp.weight * w  # (C, C)
            linear = folded if linear is None else linear + folded
    width = sum(g.shape[0] for g, _ in gates)
    fused = FusedFFNBlock(config, first.block_config.attention, width, linear is not None, first.layer_idx,
                          [layer.layer_idx for layer in layers])
    fused = fused.to(next((p.dtype for layer in layers for p in layer.parameters()), torch.float32))
    if first.self_attn is not None:
        fused.self_attn.load_state_dict(first.self_attn.state_dict())
        fused.input_layernorm.load_state_dict(first.input_layernorm.state_dict())
    if width:
        m = fused.mlp
        m.gate_proj.weight.copy_(torch.cat([g for g, _ in gates]))  # (ΣF, C)
        m.up_proj.weight.copy_(torch.cat([u for u, _ in ups]))
        m.down_proj.weight.copy_(torch.cat(downs, dim=1))  # (C, ΣF)
        if m.gate_proj.bias is not None:
            m.gate_proj.bias.copy_(torch.cat([b for _, b in gates]))
            m.up_proj.bias.copy_(torch.cat([b for _, b in ups]))
            m.down_proj.bias.copy_(down_bias)
        if linear is not None:
            fused.extra_linear.weight.copy_(linear)
    elif linear is not None:
        fused.mlp.linear_mlp.weight.copy_(linear)
    return fused.eval()


def fuse_ffn_runs(model: PuzzleForCausalLM, runs: Sequence[tuple[int, int]] | None = None,
                  include_leading: bool = True) -> PuzzleForCausalLM:
    """A copy of `model` whose runs of consecutive FFNs are fused (the parallel approximation).

    Args:
        runs: [(start, end), ...] layer ranges (each as from `ffn_runs`); None fuses every run
            `ffn_runs(model.config, include_leading)` finds.

    Returns:
        A new PuzzleForCausalLM (weights copied) whose `model.layers` holds a FusedFFNBlock per run
        and the other blocks unchanged; `config` is the unfused child's (its KV-cache layout).
        With no runs, an unchanged copy.

    Raises:
        PuzzleError: `model` is fused already (its layer list no longer matches its config: fuse the unfused
            child once, with every run), overlapping or out-of-range runs, or a run with attention after its
            first layer.
    """
    if any(isinstance(layer, FusedFFNBlock) for layer in model.model.layers):
        done = [list(layer.layers) for layer in model.model.layers if isinstance(layer, FusedFFNBlock)]
        raise PuzzleError(f"this model is fused already (runs {done}), and run indices count the unfused child's "
                          f"layers: fuse the unfused child once, with every run")
    runs = ffn_runs(model.config, include_leading) if runs is None else sorted(runs)
    last = 0
    for start, end in runs:
        if not (last <= start < end <= model.config.num_hidden_layers):
            raise PuzzleError(f"fusion runs {runs} overlap or leave layers 0..{model.config.num_hidden_layers - 1}")
        last = end
    fused = copy.deepcopy(model)
    layers, i = [], 0
    starts = dict(runs)
    while i < len(fused.model.layers):
        if i in starts:
            layers.append(fuse_layers(fused.config, list(fused.model.layers[i:starts[i]])))
            i = starts[i]
        else:
            layers.append(fused.model.layers[i])
            i += 1
    fused.model.layers = nn.ModuleList(layers)
    return fused.eval()


def to_plain_model(fused: PuzzleForCausalLM) -> PuzzleForCausalLM:
    """The fused model as an ordinary, shallower PuzzleForCausalLM (exportable), with the same outputs.

    Raises:
        PuzzleError: a fused run mixes SwiGLU and linear FFNs (no single block represents it).
    """
    blocks = []
    for i, layer in enumerate(fused.model.layers):
        if isinstance(layer, FusedFFNBlock):
            block = layer.block_config()
            if block is None:
                raise PuzzleError(f"the fused run of layers {list(layer.layers)} mixes SwiGLU and linear FFNs: "
                                  f"no single nemotron-nas block represents it; fuse without the linear layers")
            blocks.append(block)
        else:
            blocks.append(layer.block_config)
    config = dataclasses.replace(fused.config, blocks=tuple(blocks))
    plain = PuzzleForCausalLM(config).to(next(fused.parameters()).dtype)
    plain.load_state_dict(fused.state_dict(), strict=True)
    if config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain.eval()


def distill_fused(model: PuzzleForCausalLM, fused: PuzzleForCausalLM, ids: torch.Tensor, *, lr: float = 1e-3,
                  batch_size: int = 4, chunk: int = 4, only: Sequence[Sequence[int]] | None = None) -> list[dict]:
    """Blockwise local distillation of every FusedFFNBlock of `fused` toward the sequential run it replaces.

    Teacher forcing, as in BLD (Puzzle, Bercovich et al. 2024, Sec. 3): a fused block receives the
    unfused `model`'s hidden state before its run, h_s (B, T, C), and learns the unfused hidden state
    after it, h_e, with the normalized MSE of the residual update,
    MSE(Δ_fused, h_e − h_s) / MSE(h_e − h_s, 0). One pass of AdamW over `ids` (linear warmup over 10%
    of the steps, then cosine decay to 10% of `lr`); only the FFN parts of the fused block train
    (its attention, when the run starts with one, keeps the parent's weights). `fused` is changed
    in place.

    Args:
        model: the unfused child (teacher), unchanged.
        fused: `fuse_ffn_runs(model, ...)`.
        ids: (N, T) int64 calibration tokens (never the evaluation split).
        only: the blocks to distil, by the layers they replace ([[5, 6, 7], ...]); None: every fused block.

    Returns:
        One dict per fused block: layers, nmse_before and nmse_after on the last batch-size
        sequences of `ids` (held out of training when N > batch_size), steps, kept_start (training
        raised the held-out NMSE, so the block keeps its folded start and nmse_after is nmse_before).
    """
    blocks = [m for m in fused.model.layers if isinstance(m, FusedFFNBlock)
              and (only is None or list(m.layers) in [list(x) for x in only])]
    if not blocks:
        return []
    wanted = {b.layers[0] for b in blocks} | {b.layers[-1] + 1 for b in blocks}
    states: dict[int, list] = {i: [] for i in wanted}
    with torch.no_grad():  # the teacher's hidden states at every run boundary: (N, T, C) each
        for s in range(0, ids.shape[0], chunk):
            x = ids[s:s + chunk]
            h = model.model.embed_tokens(x)
            cos, sin = model.rope(model.positions(x.shape, 0, x.device), h.dtype)
            for i, layer in enumerate(model.model.layers):
                if i in states:
                    states[i].append(h)
                h = layer(h, cos, sin)
            if len(model.model.layers) in states:
                states[len(model.model.layers)].append(h)
    states = {i: torch.cat(v) for i, v in states.items()}
    cos, sin = model.rope(model.positions(ids.shape, 0, ids.device), states[min(states)].dtype)
    n_train = ids.shape[0] - batch_size if ids.shape[0] > batch_size else ids.shape[0]
    probe = slice(n_train, ids.shape[0]) if n_train < ids.shape[0] else slice(0, ids.shape[0])
    results = []

    def nmse(block, sl):
        h_s, h_e = states[block.layers[0]][sl], states[block.layers[-1] + 1][sl]
        out = block(h_s, cos[sl], sin[sl])
        return ((out - h_e).float().pow(2).mean() / (h_e - h_s).float().pow(2).mean().clamp_min(1e-20))

    for block in blocks:
        params = [p for name, p in block.named_parameters() if not name.startswith(("self_attn.", "input_layernorm."))]
        with torch.no_grad():
            before = float(nmse(block, probe))
        start = {k: v.detach().clone() for k, v in block.state_dict().items()}
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        steps = math.ceil(n_train / batch_size)
        warm = max(1, steps // 10)
        block.train()
        for step in range(steps):
            progress = (step - warm) / max(1, steps - warm)
            scale = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            loss = nmse(block, slice(step * batch_size, min(n_train, (step + 1) * batch_size)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        block.eval()
        for p in block.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            after = float(nmse(block, probe))
        kept = not after <= before  # reviewer: the benchmark's rate raised it on the tiny run, and it was kept
        if kept:
            block.load_state_dict(start)
        results.append({"layers": list(block.layers), "nmse_before": before, "nmse_after": before if kept else after,
                        "steps": steps, "kept_start": kept})
    return results


# ------------------------------------------------------------------------------------------------
# `puzzle fuse --out DIR --name NAME`: fuse the runs of a searched child that cost little, export the result

#: default --max-kl-increase: a run is fused when it raises the child's scoring-split KL by at most this fraction
MAX_KL_INCREASE = 0.01

#: a candidate run's row in DIR/fusion/<name>.runs.json: its fields and their types (a row that differs is made again);
#: besides them distilled_score_kl_nats, nmse_before and nmse_after, each a finite number or None (not distilled yet)
RUN_ROW = {"layers": str, "start": int, "end": int, "ffns": int, "fused_ffn": str, "folded_score_kl_nats": float}
RUN_ROW_OPTIONAL = ("distilled_score_kl_nats", "nmse_before", "nmse_after")


def _mixes_linear_and_swiglu(config: ModelConfig, run: tuple[int, int]) -> bool:
    return {"swiglu", "linear"} <= {b.ffn.kind for b in config.blocks[run[0]:run[1]]}


def fusion_candidates(config: ModelConfig, include_leading: bool = False) -> tuple[list, list]:
    """The runs `ffn_runs` finds that fuse into one plain (exportable) block, and those that do not.

    With include_leading, a run whose leading layer's FFN is what mixes SwiGLU and linear FFNs is taken without that
    layer where its attention-free layers still hold two FFNs of one kind.

    Returns:
        (candidates, mixed): [(start, end), ...] each; `mixed` runs mix SwiGLU and linear FFNs, which no single
        nemotron-nas block represents (`to_plain_model`), so they are left unfused.
    """
    candidates, mixed = [], []
    for run in ffn_runs(config, include_leading=include_leading):
        inner = (run[0] + 1, run[1])
        if not _mixes_linear_and_swiglu(config, run):
            candidates.append(run)
        elif include_leading and config.blocks[run[0]].attention.kind != "no_op" and not _mixes_linear_and_swiglu(
                config, inner) and sum(b.ffn.kind != "no_op" for b in config.blocks[inner[0]:inner[1]]) >= 2:
            candidates.append(inner)  # breaker: the run without its leading layer was refused with it
        else:
            mixed.append(run)
    return candidates, mixed


def has_run_to_fuse(choice: Sequence[str], include_leading: bool = True) -> bool:
    """Whether a child's block ids (a search record's choice) hold a run `fusion_candidates` fuses (by default with
    --include-leading, which finds every run that fuses without it too).

    Raises:
        ArchitectureError: an id that is not a block's (`BlockConfig.from_id`).
    """
    from types import SimpleNamespace

    layers = SimpleNamespace(blocks=tuple(BlockConfig.from_id(b) for b in choice))  # all that the runs are read from
    return bool(fusion_candidates(layers, include_leading)[0])


def _run_text(run) -> str:
    return f"{run[0]}-{run[1] - 1}"


def _rows_inputs(run, record: dict) -> dict:
    """What a candidate run's row depends on: the child (choice, library stage), the calibration and scoring splits
    (sha256), the scoring positions' weighting (`score.select_context`), the parent and the score table (a rebuilt
    library is rescored). Not the tolerance, the timing, --no-distill (a row keeps the folded and, once made, the
    distilled figures) or --include-leading: rows are kept across them (DIR/fusion/<name>.runs.json)."""
    from .baselines import row_inputs
    from .pipeline import _tensor_sha

    return json.loads(json.dumps({
        "child": {"choice": record["choice"], "library_stage": record.get("library_stage", "bld")},
        "select_context": run.config.score.select_context, "parent": run.parent_fingerprint,
        "calib_sha": _tensor_sha(run.tokens.calib), "score_sha": _tensor_sha(run.tokens.score),
        "score_table_sha256": row_inputs(run)["score_table_sha256"]}))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_row(row) -> bool:
    """A candidate run's row as `fuse_child` writes it (the fields of `RUN_ROW` and `RUN_ROW_OPTIONAL`, numbers
    finite, the KLs >= 0)."""
    if not isinstance(row, dict) or any(not isinstance(row.get(k), t) or isinstance(row.get(k), bool)
                                        for k, t in RUN_ROW.items() if t is not float):
        return False
    return _finite(row.get("folded_score_kl_nats")) and row["folded_score_kl_nats"] >= 0 and all(
        row.get(k) is None or _finite(row.get(k)) and row[k] >= 0 for k in RUN_ROW_OPTIONAL)


def _tolerance_text(value: float) -> str:
    return "inf" if value == math.inf else f"{value:g}"


#: bumped when a record or its export gains what older ones lack, so those are made again (2: the fused child's front
#: row; 3: the unfused child's architecture in the export, which `front_row_export` checks; 4: named unfused_child)
RECORD_VERSION = 4

#: earlier records of a child kept beside DIR/fusion/<name>.json (DIR/fusion/<name>.earlier.json, by inputs), at most
EARLIER_RECORDS = 8


def _inputs_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _saved_record(path: Path, inputs: dict) -> dict | None:
    """The finished fusion made from `inputs`: DIR/fusion/<name>.json, or one of the earlier records kept beside it
    (`EARLIER_RECORDS`; breaker: a call with other settings replaced the record, and going back timed again), when
    it is whole (`_whole_record`); else None, and a damaged or hand-edited record is made again."""
    rec = read_json_or_none(path)
    if _whole_record(rec, inputs):
        return rec
    earlier = read_json_or_none(_earlier_path(path))
    earlier = earlier.get(_inputs_key(inputs)) if isinstance(earlier, dict) else None
    return earlier if _whole_record(earlier, inputs) else None


def _earlier_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".json") + ".earlier.json")


def _write_record(path: Path, rec: dict) -> None:
    """Write the record to `path` atomically, the one it replaces (other inputs) kept in the earlier records."""
    from .io import atomic_write_json

    old = read_json_or_none(path)
    if isinstance(old, dict) and isinstance(old.get("inputs"), dict) and old["inputs"] != rec["inputs"]:
        earlier = read_json_or_none(_earlier_path(path))
        earlier = earlier if isinstance(earlier, dict) else {}
        earlier.pop(_inputs_key(old["inputs"]), None)
        earlier[_inputs_key(old["inputs"])] = old  # the newest last; the oldest dropped beyond EARLIER_RECORDS
        atomic_write_json(_earlier_path(path), dict(list(earlier.items())[-EARLIER_RECORDS:]))
    atomic_write_json(path, rec)


def _write_table(path: Path, rec: dict) -> None:
    """DIR/fusion/<name>.csv: the candidate runs' table of the record `rec` (`path` is its <name>.json), written
    where it differs."""
    from .io import atomic_write_text

    table, csv = pd.DataFrame(rec["runs"]).to_csv(index=False), path.with_suffix(".csv")
    try:
        same = csv.read_text(encoding="utf-8") == table
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        atomic_write_text(csv, table)


def _make_latest(path: Path, rec: dict) -> None:
    """Make the record `rec` (taken from the earlier records) DIR/fusion/<name>.json again, and its table
    <name>.csv (breaker: an interruption between the two left another call's table beside a finished record)."""
    latest = read_json_or_none(path)
    if not isinstance(latest, dict) or latest.get("inputs") != rec["inputs"]:
        _write_record(path, rec)
    _write_table(path, rec)


def _whole_record(rec, inputs: dict) -> bool:
    """Whether `rec` is a finished fusion made from `inputs` that `fusion_summary` can print, its kept runs those of
    its rows marked kept (breaker: a hand-edited "kept" gave a traceback)."""
    try:
        if not isinstance(rec, dict) or rec.get("inputs") != inputs or not isinstance(rec.get("runs"), list) \
                or not all(_valid_row(r) and isinstance(r.get("kept"), bool) and _finite(r.get("score_kl_nats"))
                           and _finite(r.get("relative_increase")) for r in rec["runs"]) \
                or not (_finite(rec.get("score_kl_nats")) and rec["score_kl_nats"] > 0) \
                or not isinstance(rec.get("fusion_id"), str) or not isinstance(rec.get("kept"), list):
            return False
        kept = sorted((r["start"], r["end"]) for r in rec["runs"] if r["kept"])
        if [tuple(k) if isinstance(k, list) else None for k in rec["kept"]] != kept:
            return False
        fusion_summary(rec)
        if rec["kept"]:  # what the front row is made of (breaker: a hand-edited one gave a traceback there)
            _fused_child_key(rec)
            row = _front_row(rec)
            parent = rec["front_timing"]["parent"] if row is not None else {}
            if rec["inputs"].get("measure") and (row is None or not all(_finite(row[k]) for k in FRONT_ROW_NUMBERS)
                                                 or not all(_finite(parent.get(k)) for k in FRONT_ROW_NUMBERS[3:])):
                return False
        return True
    except (PuzzleError, KeyError, TypeError, ValueError, AttributeError, IndexError):
        return False


def check_before_work(run, name: str, export: bool = True) -> None:
    """Refuse, before any work, what would stop the fusion of the child `name` after it: a searched child named
    <name>-fused (the fusion's export folder and front row), an export folder that cannot be replaced (with
    `export`), and a file or folder in the way of DIR/fusion/<name>.* or of the front rows
    (DIR/front_rows/<name>-fused.json and parent.json).

    Raises:
        PuzzleError: saying what to move or rename, or to give --no-export.
    """
    fused_name = f"{name}-fused"
    if (run.out / "search" / f"{fused_name}.json").is_file():  # breaker: the two shared an export folder and a row
        raise PuzzleError(f"the run has a searched child named {fused_name}, the name the fusion of {name} takes "
                          f"(its export folder and front row); copy DIR/search/{name}.json under another name and "
                          f"fuse that, or rename {fused_name}")
    if export:
        from .export import check_export_target, export_provenance

        dest = run.out / "export" / fused_name
        try:  # with what the export will be: trained weights there (gkd, sft) are refused now, not after the work
            check_export_target(dest, overwrite=True, provenance=export_provenance(
                {"name": fused_name, "parent": run.parent.source}))
        except PuzzleError as e:  # its advice is for commands with --dest; fuse writes this one folder
            raise PuzzleError(f"{e} (puzzle fuse exports to {dest}); or give --no-export") from None
    folder, rows = run.out / "fusion", run.out / "front_rows"
    done_path = folder / f"{name}.json"
    for path in (folder, done_path, folder / f"{name}.runs.json", _earlier_path(done_path),
                 done_path.with_suffix(".csv"), rows, front_row_path(run.out, fused_name), rows / "parent.json"):
        if path.exists() and path.is_dir() != (path in (folder, rows)):  # breaker: refused only after all the work
            raise PuzzleError(f"{path} is a {'folder' if path.is_dir() else 'file'} where a "
                              f"{'file' if path.is_dir() else 'folder'} belongs; move it away and run the command "
                              f"again")


def _earlier_export_note(dest: Path, name: str, rec: dict) -> str | None:
    """What to say of an export folder that holds another fusion of `name` than the record `rec` (one that kept no
    run, or was made with --no-export, leaves the folder as it was: fresh user, it was loaded unawares)."""
    from .export import export_info

    info = export_info(dest)
    if not info or info.get("fused_from") != name or rec.get("kept") and info.get("fusion_id") == rec.get(
            "fusion_id"):
        return None
    if rec.get("kept") and _holds(info, _fused_child_key(rec)):  # breaker: the same model made with other settings
        return None  # (e.g. --no-measure) is not another
    runs = info.get("fused_runs")
    shown = f" (runs {', '.join(map(str, runs))})" if isinstance(runs, list) else ""
    what = "delete it, or export this one (without --no-export)" if rec.get("kept") else \
        "this one keeps no run, so the folder is left as it was"
    return f"{dest} holds an earlier fusion of {name}{shown}, not this one: {what}"


def fuse_child(run, name: str, *, include_leading: bool = False, max_kl_increase: float = MAX_KL_INCREASE,
               distill: bool = True, measure: bool = True, export: bool = True, retime: bool = False) -> dict:
    """FFN Fusion of the searched child `name`, run by run, keeping the runs that cost little.

    Each candidate run (`fusion_candidates`) is fused alone and the child's KL on the scoring split measured
    (`refine.selection_kl`, what refine chooses by; never the evaluation split), as folded and, with `distill`, after
    local distillation of its block toward the sequential run it replaces (`distill_fused` on the calibration split,
    at half the BLD rate); the lower of the two counts. A run is kept when it raises that KL by at most
    `max_kl_increase` times the unfused child's. The kept runs are fused together (the blocks that counted distilled
    distilled again on the same teacher states, so as alone), the result becomes a plain shallower child
    (`to_plain_model`), is evaluated on both splits, timed against the parent and the unfused child in one
    interleaved session (`measure`) and exported as DIR/export/<name>-fused (`export`). With `retime`, a finished
    fusion of these settings is made and timed again (the runs' figures kept), e.g. one timed on a busy machine.

    Writes, atomically: DIR/fusion/<name>.runs.json (the candidate runs' rows, one written as each is made, so an
    interrupted call goes on after the last, and kept across other tolerances, timings, `distill` and
    --include-leading),
    DIR/fusion/<name>.csv (this call's table) and DIR/fusion/<name>.json (the record, last). A call with the same
    inputs returns the record, where the export folder (when asked for) is the record's own.

    Returns:
        The record: "runs" (the candidate rows with relative_increase and kept), "kept", "mixed" (runs left
        unfused), the unfused and fused scoring-split and evaluation KL (nats/token), layer counts, parameters and,
        measured, the runtimes (ms) and speed-ups; "earlier_export" where the export folder holds another fusion of
        the child (this one kept no run or was not exported).

    Raises:
        PuzzleError: an unknown `name` (`pipeline.read_architecture`), a child with no run of FFNs to fuse (the
            message names the run's children that have one), max_kl_increase below 0 or NaN, or an export folder
            that cannot be replaced (before any work).
    """
    from .io import atomic_write_json
    from .pipeline import evaluate, parent_eval_logprobs, read_architecture
    from .refine import realize_blocks, selection_kl
    from .scoring.quality import evaluate_model

    if not max_kl_increase >= 0:
        raise PuzzleError(f"--max-kl-increase must be a fraction >= 0 of the child's KL (0.01: 1 %), got "
                          f"{max_kl_increase}")
    max_kl_increase = float(max_kl_increase) + 0.0  # -0.0 reads as 0
    record = read_architecture(run, name)
    fused_name = f"{name}-fused"
    stage = record.get("library_stage", "bld")
    if why := _comparison_child(record):  # breaker: its fusion was exported and drawn on front_all
        twin = name.removesuffix("-" + stage)
        # breaker: the trained twin was named where it had no run to fuse either (the hint's command then failed)
        hint = (f"`puzzle fuse --out {shell_arg(run.out)} --name {twin}`"
                if no_run_to_fuse(run, twin, include_leading, listed=True) is None
                else _others_hint(run, run.parent.model.config, {name}, include_leading))
        raise PuzzleError(f"{name} is {why}: fuse a child of the trained library ({hint})")
    blocks = [BlockConfig.from_id(b) for b in record["choice"]]
    config = dataclasses.replace(run.parent.model.config, blocks=tuple(blocks))
    candidates, mixed = fusion_candidates(config, include_leading)
    mixed_leading = [r for r in ffn_runs(config, include_leading=True) if _mixes_linear_and_swiglu(config, r)]
    if not candidates:
        path = front_row_path(run.out, fused_name)
        if path.is_file():  # breaker: the row of a fusion of an earlier child stayed, and its warning named this call
            path.unlink()
            run.say(f"fuse {name}: removed {path}, the front's row of a fusion of an earlier child of this name")
        from .export import export_info, is_export_folder

        dest = run.out / "export" / fused_name
        if is_export_folder(dest) and (export_info(dest) or {}).get("fused_from") == name:  # breaker: kept unsaid
            run.say(f"fuse {name}: {dest} holds the fusion of an earlier child of this name (left in place; it is not "
                    f"the fusion of {name} as searched now)")
        raise PuzzleError(_nothing_to_fuse(run, name, config, mixed, include_leading))
    check_before_work(run, name, export)
    dest = run.out / "export" / fused_name
    provenance = {"name": fused_name, "parent": run.parent.source}
    from .baselines import row_inputs
    from .pipeline import _tensor_sha

    rows_inputs = _rows_inputs(run, record)
    inputs = {"rows": rows_inputs, "include_leading": include_leading, "distill": distill,
              "max_kl_increase": _tolerance_text(max_kl_increase), "measure": measure,
              "eval_sha": _tensor_sha(run.tokens.eval), "workload": row_inputs(run)["workload"] if measure else None,
              "record": RECORD_VERSION}
    inputs = json.loads(json.dumps(inputs))
    folder = run.out / "fusion"
    done_path, rows_path = folder / f"{name}.json", folder / f"{name}.runs.json"
    saved = None if retime else _saved_record(done_path, inputs)
    if saved is not None and export and saved["kept"] and not _own_export(dest, saved):
        # only the export is missing or another's (fresh user: it was evaluated and timed again): rebuilt and written
        if _export_again(run, saved, blocks, stage, dest, provenance, record.get("method", "mip")):
            saved = {**saved, "export": str(dest), "export_files": _export_files(dest)}
            _write_record(done_path, saved)
            _write_table(done_path, saved)
            run.say(f"fuse {name}: exported the recorded fusion again to {dest} (its figures kept)")
            _place_on_front(run, saved)
            note = _earlier_export_note(dest, name, saved)
            return {**saved, "export": str(dest), **({"earlier_export": note} if note else {})}
    if saved is not None and (not export or not saved["kept"] or _own_export(dest, saved)):
        _make_latest(done_path, saved)
        run.say(f"fuse {name}: done already with these settings ({done_path}; --retime makes and times it again, "
                f"and deleting {rows_path.name} measures the runs again)")
        _place_on_front(run, saved)
        shown = {k: v for k, v in saved.items() if k != "export"}  # breaker: --no-export named a folder since moved
        if export and saved["kept"]:
            shown.update(export=str(dest), export_kept=True)  # fresh user: "exported" read as written again
        note = _earlier_export_note(dest, name, saved)
        return {**shown, **({"earlier_export": note} if note else {})}

    t0 = time.perf_counter()
    # on the parent's device and dtype, as refine scores (timed on target); the child as the front builds it
    child = realize_blocks(run, blocks, stage, record.get("method", "mip"))
    rows, base_kl = {}, None
    kept_rows = read_json_or_none(rows_path)
    base = kept_rows.get("base_score_kl_nats") if isinstance(kept_rows, dict) else None
    if isinstance(kept_rows, dict) and kept_rows.get("inputs") == rows_inputs and _finite(base) and base > 0 \
            and isinstance(kept_rows.get("rows"), dict):  # breaker: a base of 0 broke the relative increases
        base_kl = float(base)
        rows = {k: r for k, r in kept_rows["rows"].items() if _valid_row(r) and r["layers"] == k}
    if base_kl is None:
        base_kl = selection_kl(run, child)

    def missing(r) -> bool:
        row = rows.get(_run_text(r))
        return row is None or distill and row.get("distilled_score_kl_nats") is None

    todo = [r for r in candidates if missing(r)]
    if len(todo) < len(candidates):
        run.say(f"fuse {name}: {len(candidates) - len(todo)} of {len(candidates)} runs measured by an earlier call")
    bar = _bar(run, len(candidates), len(candidates) - len(todo), f"fuse {name}")
    for r in todo:
        one = fuse_ffn_runs(child, [r])
        row = rows.get(_run_text(r))
        if row is None:
            block = next(m for m in one.model.layers if isinstance(m, FusedFFNBlock))
            row = {"layers": _run_text(r), "start": r[0], "end": r[1],
                   "ffns": sum(b.ffn.kind != "no_op" for b in blocks[r[0]:r[1]]),
                   "fused_ffn": block.block_config().ffn.id, "folded_score_kl_nats": selection_kl(run, one),
                   "distilled_score_kl_nats": None, "nmse_before": None, "nmse_after": None}
        if distill:
            (local,) = distill_fused(child, one, run.tokens.calib, lr=run.config.bld.lr / 2,
                                     batch_size=run.config.bld.batch_size)
            row.update(distilled_score_kl_nats=selection_kl(run, one), nmse_before=local["nmse_before"],
                       nmse_after=local["nmse_after"])
        rows[row["layers"]] = row
        atomic_write_json(rows_path, {"inputs": rows_inputs, "base_score_kl_nats": base_kl, "rows": rows})
        del one
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = pd.DataFrame([rows[_run_text(r)] for r in candidates])
    # the better of folded and distilled counts (breaker: on the tiny run distillation raised a run's KL)
    table["distilled"] = [bool(distill and d is not None and not pd.isna(d) and d < f)
                          for d, f in zip(table["distilled_score_kl_nats"], table["folded_score_kl_nats"])]
    table["score_kl_nats"] = table["distilled_score_kl_nats"].where(table["distilled"], table["folded_score_kl_nats"])
    table["kl_increase"] = table["score_kl_nats"] - base_kl
    table["relative_increase"] = table["kl_increase"] / base_kl
    table["kept"] = table["relative_increase"] <= max_kl_increase
    kept = [r for r, k in zip(candidates, table["kept"]) if k]
    out = {"name": name, "fused_name": fused_name, "library_stage": stage,
           "settings": {"include_leading": include_leading, "max_kl_increase": _tolerance_text(max_kl_increase),
                        "distill": distill, "measure": measure},
           "runs": _records(table), "kept": [list(r) for r in kept],
           "trimmed": [[r[0] - 1, r[1]] for r in candidates if include_leading and (r[0] - 1, r[1]) in mixed_leading],
           "mixed": [list(r) for r in mixed], "layers": len(blocks), "score_kl_nats": base_kl,
           "kl_nats": evaluate(run, child, name)["kl_nats"]}
    if kept:
        composed = fuse_ffn_runs(child, kept)
        distilled = [list(range(*r)) for r, d in zip(candidates, table["distilled"]) if d and r in kept]
        if distilled:  # each block trains on the unfused child's states at its run's ends: as when fused alone
            distill_fused(child, composed, run.tokens.calib, lr=run.config.bld.lr / 2,
                          batch_size=run.config.bld.batch_size, only=distilled)
        plain = to_plain_model(composed)
        del composed
        quality = evaluate_model(plain, run.tokens.eval, parent_eval_logprobs(run), chunk=run.config.score.chunk)
        out.update({"fused_layers": plain.config.num_hidden_layers, "fused_score_kl_nats": selection_kl(run, plain),
                    "fused_kl_nats": quality["kl_nats"], "fused_lm_loss": quality["lm_loss"],
                    "fused_top1_agree": quality.get("top1_agree"),
                    "params": child.num_parameters(), "fused_params": plain.num_parameters(),
                    "fused_architecture": [b.id for b in plain.config.blocks],
                    "distilled_runs": [_run_text(r) for r in kept if list(range(*r)) in distilled]})
        if measure:
            from .baselines import session_rows
            from .scoring.cost import measure_models

            m = measure_models(run.on_target({"parent": run.parent.model, name: child, fused_name: plain}),
                               run.workload(), repeats=run.config.score.measure_repeats, progress=run.progress,
                               max_contention=run.config.score.max_contention).set_index("name")
            timing = session_rows(m, [fused_name]).set_index("name")  # the front rows' figures (`_front_row`)
            out["front_timing"] = {"parent": _plain_floats(timing.loc["parent"]),
                                   "fused": _plain_floats(timing.loc[fused_name]), "row_inputs": row_inputs(run)}
            parent_ms = float(m.loc["parent", "runtime_ms"])
            out.update({"parent_runtime_ms": parent_ms, "runtime_ms": float(m.loc[name, "runtime_ms"]),
                        "fused_runtime_ms": float(m.loc[fused_name, "runtime_ms"]),
                        "speedup": parent_ms / float(m.loc[name, "runtime_ms"]),
                        "fused_speedup": parent_ms / float(m.loc[fused_name, "runtime_ms"])})
    out["fusion_id"] = hashlib.sha256(json.dumps({"inputs": inputs, "kept": out["kept"]}, sort_keys=True)
                                      .encode()).hexdigest()[:16]
    if kept and export:
        _export_fused(run, plain, dest, provenance, {**out, "inputs": inputs})
        out.update({"export": str(dest), "export_files": _export_files(dest)})
    out.update({"seconds": time.perf_counter() - t0, "inputs": inputs})
    _write_record(done_path, out)
    _write_table(done_path, out)  # after the record: a rerun that finds the record writes a table cut off here
    _place_on_front(run, out)
    note = _earlier_export_note(dest, name, out)
    return {**out, **({"earlier_export": note} if note else {})}


def _plain_floats(row: pd.Series) -> dict:
    """A timing row as JSON numbers: floats, None where a figure is missing or not finite."""
    return {k: float(v) if _finite(v) else None for k, v in row.items() if not isinstance(v, str)}


def front_row_path(run_dir: Path, fused_name: str) -> Path:
    """Where `puzzle fuse` puts the fused child on the run's front: DIR/front_rows/<name>-fused.json."""
    return Path(run_dir) / "front_rows" / f"{fused_name}.json"


def _front_row(rec: dict) -> dict | None:
    """The fused child's model row for `puzzle front` (method "ffn_fusion"; the figures of `baselines.realize_all`'s
    rows, its speed-up against the parent in the fusion's own timing session), or None for a record that kept no
    run or was not timed."""
    from .pipeline import compact_architecture

    timing = rec.get("front_timing")
    if not rec.get("kept") or not isinstance(timing, dict) or "fused_speedup" not in rec:
        return None
    fused = timing["fused"]
    return {"name": rec["fused_name"], "method": "ffn_fusion", "training": rec["library_stage"],
            "speedup": rec["fused_speedup"], "throughput_tok_s": fused["throughput_tok_s"],
            "kl_nats": rec["fused_kl_nats"], "score_kl_nats": rec["fused_score_kl_nats"], "predicted_kl_nats": None,
            "lm_loss": rec["fused_lm_loss"], "top1_agree": rec.get("fused_top1_agree"),
            "params": float(rec["fused_params"]), "memory_mib": fused["memory_mib"], "runtime_ms": fused["runtime_ms"],
            "group_parent_runtime_ms": rec["parent_runtime_ms"], "contention_cores": fused["contention_cores"],
            "note": f"FFN Fusion of {rec['name']}: layers {', '.join(_run_text(r) for r in rec['kept'])} fused",
            "architecture": compact_architecture(rec["fused_architecture"]), "inputs": timing["row_inputs"],
            **_fused_child_key(rec), "fusion_id": rec["fusion_id"]}


#: the figures a fused child's front row (and the parent's row of its timing session, from the fourth on) must have
FRONT_ROW_NUMBERS = ("speedup", "kl_nats", "lm_loss", "throughput_tok_s", "params", "runtime_ms", "memory_mib")


def _export_identity(key: dict) -> dict:
    """The entries of a fused export's config.json "puzzle" entry that say which model it holds, from a
    `_fused_child_key` (or a front row, which carries one)."""
    return {"fused_from": key.get("fused_from"), "fused_runs": key.get("fused_runs"),
            "distilled": key.get("distilled_runs"),
            "unfused_child": {"architecture": key.get("child_architecture"), "library_stage": key.get("training")}}


def _holds(info, key: dict) -> bool:
    """Whether the export whose "puzzle" entry is `info` (`export.export_info`) holds the fused child of `key`."""
    return isinstance(info, dict) and all(info.get(k) == v for k, v in _export_identity(key).items())


def _fused_child_key(rec: dict) -> dict:
    """What makes a fusion's child the same model: the unfused child, its library stage, the runs fused and those
    distilled (the other settings only decide which runs those are)."""
    from .pipeline import compact_architecture

    child = rec["inputs"]["rows"]["child"]
    return {"fused_from": rec["name"], "child_architecture": compact_architecture(child["choice"]),
            "training": child["library_stage"], "fused_runs": [_run_text(r) for r in rec["kept"]],
            "distilled_runs": rec.get("distilled_runs", [])}


def _place_on_front(run, rec: dict) -> None:
    """Put the fused child of the record `rec` on the run's front (DIR/front_rows/<name>-fused.json, drawn by `puzzle
    front` beside our other children; with DIR/front_rows/parent.json from the same timing session where that row is
    missing or stale). A call that was not timed leaves a row of the same fused child as it is, and removes one of
    another fusion of the child (saying so)."""
    from .baselines import _saved_row, parent_row, row_inputs, sealed_row
    from .io import atomic_write_json

    path = front_row_path(run.out, rec["fused_name"])
    row = _front_row(rec)
    if row is None or row["inputs"] != row_inputs(run):
        earlier = read_json_or_none(path)
        same = isinstance(earlier, dict) and rec.get("kept") and all(
            earlier.get(k) == v for k, v in _fused_child_key(rec).items())
        if path.is_file() and not same:
            path.unlink()
            run.say(f"fuse {rec['name']}: removed {path}, the front's row of an earlier fusion of the child (this "
                    f"one {'keeps no run' if not rec.get('kept') else 'is not timed: run without --no-measure'})")
        return
    if _saved_row(path.with_name("parent.json"), row["inputs"]) is None:
        atomic_write_json(path.with_name("parent.json"),
                          sealed_row(parent_row(run, pd.Series(rec["front_timing"]["parent"]), row["inputs"])))
    if read_json_or_none(path) != (row := sealed_row(row)):
        atomic_write_json(path, row)
    try:
        front_row_export(run, rec["fused_name"])
    except PuzzleError:  # breaker: `--no-export` put it on the front unsaid, and the front's commands then refused
        run.say(f"fuse {rec['name']}: {rec['fused_name']} is on the front ({path}) without its export, which `puzzle "
                f"front --one-session` and `--downstream` build it from: run this again without --no-export")


def front_row_export(run, name: str) -> Path | None:
    """The export folder that holds the fused child of DIR/front_rows/<name>.json, for `puzzle front --one-session`
    and --downstream, which build the front's models again; None where that row is not a fusion's.

    Raises:
        PuzzleError: DIR/export/<name> is missing or holds another model than the row's (another child fused, other
            runs or other runs distilled: a call with other settings that fused the same runs exports the same
            model); the message says how to export it again or leave the row out.
    """
    from .export import export_info

    row = read_json_or_none(front_row_path(run.out, name))
    if not isinstance(row, dict) or row.get("method") != "ffn_fusion":
        return None
    dest = run.out / "export" / name
    if not ((dest / "config.json").is_file() and _holds(export_info(dest), row)):
        raise PuzzleError(f"{name} (DIR/front_rows/{name}.json) is built from its export, but {dest} "
                          f"{'holds another model' if dest.exists() else 'is missing'}: `puzzle fuse --out "
                          f"{shell_arg(run.out)} --name {row.get('fused_from')}` with the same settings (without "
                          "--no-export) exports it again, or move the row out of DIR/front_rows/")
    return dest


def all_at_once(errors: list) -> None:
    """Raise the PuzzleErrors of `errors` (each front row's `front_row_export`) as one error that names them all
    (breaker: `puzzle fuse --front --no-export` left several rows, and each retry named the next); nothing when
    empty."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise PuzzleError(f"{len(errors)} fused children of the front cannot be built: " + "; ".join(map(str, errors)))


def load_fused_export(run, dest: Path) -> PuzzleForCausalLM:
    """The fused child exported in `dest`, in the parent's dtype, on the CPU (`parent.load_parent`)."""
    from .parent import load_parent

    return load_parent(dest, dtype=next(run.parent.model.parameters()).dtype, with_tokenizer=False).model


def _export_fused(run, plain, dest: Path, provenance: dict, rec: dict) -> None:
    """Write the fused child `plain` of the record `rec` to `dest`, its config.json's "puzzle" entry naming the child
    (and its architecture and library stage), the runs fused and those distilled (`_export_identity`, which
    `front_row_export` checks) and the fusion_id `_own_export` checks."""
    from .export import export_checkpoint

    result = export_checkpoint(plain, run.parent.tokenizer, dest, overwrite=True, extra_info={
        **provenance, **_export_identity(_fused_child_key(rec)), "fusion_id": rec["fusion_id"]})
    run.say_export_warnings(provenance["name"], result.warnings)


def _export_again(run, rec: dict, blocks, stage: str, dest: Path, provenance: dict, method: str = "mip") -> bool:
    """Rebuild the fused child of the finished record `rec` (its kept runs, the distilled ones distilled again on the
    same calibration text) and export it, when its scoring-split KL is the record's (to 1e-5 relative); False (and
    nothing written) otherwise, so that the caller fuses again in full."""
    from .refine import realize_blocks, selection_kl

    child = realize_blocks(run, blocks, stage, method)
    kept = [tuple(r) for r in rec["kept"]]
    by_layers = {r["layers"]: r for r in rec["runs"]}
    distilled = [list(range(*r)) for r in kept if by_layers.get(_run_text(r), {}).get("distilled")]
    composed = fuse_ffn_runs(child, kept)
    if distilled:
        distill_fused(child, composed, run.tokens.calib, lr=run.config.bld.lr / 2,
                      batch_size=run.config.bld.batch_size, only=distilled)
    plain = to_plain_model(composed)
    if not math.isclose(selection_kl(run, plain), rec["fused_score_kl_nats"], rel_tol=1e-5):
        return False
    _export_fused(run, plain, dest, provenance, rec)
    return True


def _export_files(dest: Path) -> dict:
    from .pipeline import _export_files as files

    return files(dest)


def _own_export(dest: Path, rec: dict) -> bool:
    """Whether the export folder `dest` holds the fused child of the record `rec`: its fusion_id (which hashes the
    inputs and the kept runs, so a copied or moved run keeps it) and the files the record's export wrote, byte for
    byte (size and sha256; breaker: truncated weights, an edited config.json or deleted files counted as its own)."""
    from .export import export_info

    info = export_info(dest)
    return bool(info) and info.get("fusion_id") == rec.get("fusion_id") and rec.get("export") is not None \
        and dest.is_dir() and rec.get("export_files") == _export_files(dest)


def _records(table: pd.DataFrame) -> list[dict]:
    """The table's rows as JSON-ready dicts at full precision (NaN as None; `DataFrame.to_json` keeps 10 decimals)."""
    out = []
    for row in table.to_dict("records"):
        row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
        out.append({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    return out


def _bar(run, total: int, done: int, desc: str):
    if not run.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="run", file=sys.stderr)


def _nothing_to_fuse(run, name: str, config: ModelConfig, mixed: list, include_leading: bool) -> str:
    """Why `name` has no run to fuse, and which of the run's searched children have one."""
    no_attention = [i for i, b in enumerate(config.blocks) if b.attention.kind == "no_op"]
    if mixed:  # breaker: "has no two FFNs in a row" was said of a child whose runs mix kinds
        why = (f"{name}'s runs of FFNs with no attention between them ({', '.join(_run_text(r) for r in mixed)}) mix "
               f"SwiGLU and linear FFNs, which no single exportable block represents")
    else:
        why = (f"{name} has no two FFNs in a row (other than no_op) with no attention between them (layers with no_op "
               f"attention: {no_attention or 'none'})")
    # the parent's config: the child's hid the attention variants the child itself took (the hint repeated the search)
    hint = _others_hint(run, run.parent.model.config, {name}, include_leading)
    lead = ""
    if not include_leading and (with_leading := fusion_candidates(config, include_leading=True)[0]):
        lead = (f"; with --include-leading (the FFN of the layer before each attention-free one fused too) {name} has "
                f"{', '.join(_run_text(r) for r in with_leading)}")
    return f"fuse: {why}; {hint}{lead}"


def _others_hint(run, config: ModelConfig, names, include_leading: bool) -> str:
    """Which searched children of the run other than `names` have a run to fuse (`config`: the parent's, for its
    layer count), or that none has."""
    from .io import read_json

    others, chosen, mixed = [], set(), False  # chosen: the attention variants the children took instead of the
    # parent's; mixed: a child has an attention-free run of SwiGLU and linear FFNs
    for path in sorted((run.out / "search").glob("child-*.json")):
        try:
            record = read_json(path)
            blocks = [BlockConfig.from_id(b) for b in record["choice"]]
            if len(blocks) != len(config.blocks):
                continue
        except (PuzzleError, KeyError, TypeError, ValueError):
            continue
        chosen |= {b.attention.id for b, p in zip(blocks, config.blocks) if b.attention != p.attention}
        child = dataclasses.replace(config, blocks=tuple(blocks))
        if _comparison_child(record) is None:  # (the init-only twin is not fused)
            fusable, mixes = fusion_candidates(child, include_leading)
            mixed = mixed or bool(mixes)
            if fusable and path.stem not in names:
                others.append(path.stem)
    if others:
        return f"children of this run that have one: {', '.join(others)}"
    saved = set(run.config.search.exclude)  # --exclude replaces the saved list: keep it in the command
    if mixed and "ffn-linear" not in saved:  # breaker: the hint below blamed attention where the FFN kinds mixed
        given = " ".join(f"--exclude {v}" for v in sorted(saved | {"ffn-linear"}))
        return ("none of this run's children has one of a single FFN kind: their attention-free runs mix SwiGLU and "
                f"linear FFNs; a search without linear FFNs (`puzzle search --out {shell_arg(run.out)} {given}`, "
                "saved as the run's setting: `--exclude none` clears it) keeps the runs of one kind")
    # breaker: "children of higher speed-ups drop more attention subblocks" sent a user to --speedup 3, whose
    # children dropped the FFNs too; on the tiny preset the search takes linear or fewer-KV-head attention instead
    if chosen - {"attn-noop"} <= saved and "ffn-noop" in saved and "attn-noop" not in saved:
        given = " ".join(f"--exclude {v}" for v in sorted(saved))  # the hint would repeat the search just run
        return ("none of this run's children has one, and leaving out the attention variants they took would repeat "
                f"the search as it stands ({given}): they keep attention between their attention-free layers; a "
                "higher speed-up target drops more of it")
    leave_out = " ".join(f"--exclude {v}" for v in sorted((saved | chosen) - {"attn-noop"}) + ["ffn-noop"] * (
        "ffn-noop" not in saved))  # (an attn-noop the run excluded is let in again: fusion needs it)
    return ("none of this run's children has one: fusion needs two attention-free layers in a row that keep their "
            f"FFN; a search without the cheaper variants its children took (`puzzle search --out {shell_arg(run.out)} "
            f"{leave_out}`, saved as the run's setting: `--exclude none` clears it) may drop attention whole instead")


def add_fuse_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle fuse`: FFN Fusion of a searched child, the runs that cost little, exported."""
    p = subparsers.add_parser("fuse", help="FFN Fusion: run the FFNs of consecutive attention-free layers of a child "
                                           "in parallel as one wide FFN, where it costs little; exported")
    from .cli import _add_common, add_max_contention_flag

    _add_common(p)  # --out, --debug, --no-progress, as every stage command's
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", action="append", metavar="NAME",
                       help="searched child to fuse (DIR/search/<name>.json), e.g. child-2x; repeat it or give a "
                            "comma-separated list for several")
    which.add_argument("--front", action="store_true",
                       help="fuse every child of the run's front (DIR/front.csv) that has a run to fuse; the others "
                            "are skipped with the reason")
    p.add_argument("--max-kl-increase", type=float, default=MAX_KL_INCREASE, metavar="F",
                   help="fuse a run when, fused alone, it raises the child's scoring-split KL by at most this "
                        f"fraction (default {MAX_KL_INCREASE}: 1 %%; inf fuses every run). The runs' figures are kept, "
                        "so another value costs only the fused child")
    p.add_argument("--include-leading", action="store_true",
                   help="also fuse the FFN of the layer before each attention-free run (its attention runs first); "
                        "more layers fused, more quality lost")
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="fuse without the local distillation of each fused block (the parallel form as folded; by "
                        "default each run counts the better of the two)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip timing the fused child against the parent and the unfused child")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip writing DIR/export/<name>-fused")
    p.add_argument("--retime", action="store_true",
                   help="make and time a finished fusion of these settings again (the runs' figures are kept), e.g. "
                        "one timed on a busy machine")
    add_max_contention_flag(p)
    p.set_defaults(func=fuse_main)
    return p


def fuse_main(args) -> int:
    """Run `fuse_child` for each named child (or the front's, `--front`) and print each one's table of candidate runs
    and summary; with several children, a last table of all of them. A child with no run to fuse fails the command
    when it is the only one named, and is skipped with the reason otherwise.

    Raises:
        PuzzleError: as `fuse_child`, DIR is no run directory, --front on a run without DIR/front.csv, or no child
            of several had a run to fuse.
    """
    from .cli import _stage_run

    if not args.max_kl_increase >= 0:  # before anything is read
        raise PuzzleError(f"--max-kl-increase must be a fraction >= 0 of the child's KL (0.01: 1 %), got "
                          f"{args.max_kl_increase}")
    if args.retime and not args.measure:
        raise PuzzleError("--retime times the fused child again, which --no-measure skips: drop one of them")
    with _stage_run(args, existing=True, measures=args.measure) as run:
        names = front_children(run.out) if args.front else _given_names(run.out, args.name)
        # every name checked before any work (breaker: a misspelt or blocked third name failed the call after two
        # were fused); a front.csv name without a record is skipped (the front is older than the search)
        several = len(names) > 1 or args.front  # one --name: fuse_child says why it has no run, with its hints
        reasons = {n: no_run_to_fuse(run, n, args.include_leading, listed=args.front) for n in names} \
            if several else {}
        for name in names if several else ():
            if not reasons[name]:
                check_before_work(run, name, args.export)
        records, skipped = [], {}
        t0 = time.perf_counter()
        for i, name in enumerate(names, 1):
            if several:
                run.say(f"fuse {i}/{len(names)}: {name}")
                if why := reasons[name]:
                    skipped[name] = why
                    run.say(f"fuse {name}: skipped, {why}")
                    continue
            rec = fuse_child(run, name, include_leading=args.include_leading, max_kl_increase=args.max_kl_increase,
                             distill=args.distill, measure=args.measure, export=args.export, retime=args.retime)
            print(fusion_summary(rec) + ("\n" if several else ""), flush=True)
            records.append(rec)
        if records:  # breaker: every other command's seconds were in timings.json
            run.timed("fuse_s", time.perf_counter() - t0)
    if not records:
        raise PuzzleError(f"none of {', '.join(names)} has a run to fuse: " + "; ".join(
            f"{n}: {why}" for n, why in skipped.items()) + "; " + _others_hint(
            run, run.parent.model.config, set(names), args.include_leading))
    if several:
        print(fusion_table(records, skipped))
    return 0


def front_children(run_dir: Path) -> list[str]:
    """The children of the run's front (DIR/front.csv, the parent left out), in its order.

    Raises:
        PuzzleError: no readable DIR/front.csv, or one without children.
    """
    path = Path(run_dir) / "front.csv"
    try:  # breaker: duplicates were fused twice, padded names not found
        names = list(dict.fromkeys(n.strip() for n in pd.read_csv(path, dtype=str, keep_default_na=False)["name"]
                                   if n.strip() and n.strip() != "parent"))
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        raise PuzzleError(f"--front fuses the children of {path}, which cannot be read: `puzzle front --out "
                          f"{shell_arg(run_dir)}` writes it, or name the children with --name") from None
    if not names:
        raise PuzzleError(f"{path} has no child to fuse: `puzzle front --out {shell_arg(run_dir)}` writes it again")
    return names


def _given_names(run_dir: Path, given) -> list[str]:
    """The children --name gives: each value split at commas, unless it is itself a searched child's name (breaker:
    a hand-named record with a comma could no longer be fused); stripped, empty ones dropped, each once.

    Raises:
        PuzzleError: no name at all."""
    names = []
    for value in given:
        names += [value] if (Path(run_dir) / "search" / f"{value}.json").is_file() else value.split(",")
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise PuzzleError("--name needs a child's name, e.g. --name child-2x")
    return names


def no_run_to_fuse(run, name: str, include_leading: bool = False, listed: bool = False) -> str | None:
    """Why the searched child `name` has no run to fuse (`fusion_candidates`; naming the runs --include-leading would
    add), or None where it has one. With `listed` (a name DIR/front.csv lists), a missing or damaged record is a
    reason too.

    Raises:
        PuzzleError: an unknown or damaged DIR/search/<name>.json (`pipeline.read_architecture`), unless `listed`."""
    from .pipeline import read_architecture

    try:
        record = read_architecture(run, name)
        blocks = tuple(BlockConfig.from_id(b) for b in record["choice"])
    except PuzzleError as e:
        if not listed:
            raise
        return (f"listed in DIR/front.csv but not searched as it is now ({e}; `puzzle front --out "
                f"{shell_arg(run.out)}` writes the front again)")
    if why := _comparison_child(record):  # skipped before any work (reviewer: refused after the others were fused)
        return why
    config = dataclasses.replace(run.parent.model.config, blocks=blocks)
    candidates, mixed = fusion_candidates(config, include_leading)
    if candidates:
        return None
    why = (f"its attention-free runs ({', '.join(_run_text(r) for r in mixed)}) mix SwiGLU and linear FFNs" if mixed
           else "no two FFNs in a row with no attention between them")
    if not include_leading and (with_leading := fusion_candidates(config, include_leading=True)[0]):
        why += f" (with --include-leading: {', '.join(_run_text(r) for r in with_leading)})"
    return why


def _comparison_child(record: dict) -> str | None:
    """Why a search record is not fused: a child of the untrained (init-only) library, or None."""
    stage = record.get("library_stage", "bld")
    if stage == "bld":
        return None
    return (f"searched on the {stage} library, for report.md's comparison with BLD, and kept off the exports and "
            f"the front")


def fusion_table(records: list[dict], skipped: dict[str, str] | None = None) -> str:
    """One line per fused child (`fuse_child` records): FFNs and runs fused, layers, evaluation KL and measured
    speed-up unfused -> fused (the speed-ups from each child's own timing session); then the children skipped."""
    rows = []
    for rec in records:
        kept = bool(rec["kept"])
        rows.append({"child": rec["name"], "runs fused": len(rec["kept"]),
                     "ffns fused": sum(r["ffns"] for r in rec["runs"] if r["kept"]),
                     "layers": f"{rec['layers']} -> {rec['fused_layers']}" if kept else str(rec["layers"]),
                     "evaluation KL": _change(rec["kl_nats"], rec["fused_kl_nats"]) if kept
                     else f"{rec['kl_nats']:.4g}",
                     "speed-up": f"{rec['speedup']:.3f}x -> {rec['fused_speedup']:.3f}x"
                     if "fused_speedup" in rec else "-"})
    lines = ["fused children (speed-ups measured against the parent, each child in its own session):",
             pd.DataFrame(rows).to_string(index=False)]
    lines += [f"skipped {name}: {why}" for name, why in (skipped or {}).items()]
    return "\n".join(lines)


def _change(before: float, after: float) -> str:
    """'2.332 -> 2.337 (+0.2 %)': four significant figures and the relative change (breaker: three decimals hid it)."""
    rel = f" ({100 * (after - before) / before:+.1f} %)" if before > 0 else ""
    return f"{before:.4g} -> {after:.4g}{rel}"


def fusion_summary(rec: dict) -> str:
    """The candidate runs' table and what the kept ones give, as `puzzle fuse` prints it."""
    table = pd.DataFrame(rec["runs"])[["layers", "ffns", "fused_ffn", "distilled", "score_kl_nats",
                                       "relative_increase", "kept"]]
    lines = [table.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    if rec.get("mixed"):
        lines.append(f"left unfused (SwiGLU and linear FFNs mixed): {', '.join(_run_text(r) for r in rec['mixed'])}")
    for r in rec.get("trimmed") or []:  # breaker: the leading layer was dropped without a word
        lines.append(f"layers {_run_text(r)} mix SwiGLU and linear FFNs with the leading layer {r[0]}: fused without "
                     f"it ({_run_text((r[0] + 1, r[1]))})")
    from .export import count_text

    name, fused = rec["name"], rec["fused_name"]
    if not rec["kept"]:
        best = min(rec["runs"], key=lambda r: r["relative_increase"])
        pct = 100 * best["relative_increase"]  # a breaker: 5.7e-05 % read "0.0 %", as if no increase
        pct = f"{pct:.1f}" if abs(pct) >= 0.1 or pct == 0 else f"{pct:.2g}"
        lines.append(f"fuse {name}: no run within --max-kl-increase {rec['settings']['max_kl_increase']}; the least "
                     f"costly, layers {best['layers']}, raised the scoring-split KL by {pct} %; nothing exported")
        if rec.get("earlier_export"):
            lines.append(rec["earlier_export"])
        return "\n".join(lines)
    ffns = sum(r["ffns"] for r in rec["runs"] if r["kept"])
    lines.append(f"{fused}: {ffns} FFNs fused into {len(rec['kept'])} block{'s' * (len(rec['kept']) > 1)} "
                 f"({rec['layers']} -> {rec['fused_layers']} layers, {count_text(rec['params'])} -> "
                 f"{count_text(rec['fused_params'])} parameters); scoring-split KL "
                 f"{_change(rec['score_kl_nats'], rec['fused_score_kl_nats'])}, evaluation KL "
                 f"{_change(rec['kl_nats'], rec['fused_kl_nats'])}")
    if "fused_speedup" in rec:
        lines.append(f"measured speed-up {rec['speedup']:.3f}x -> {rec['fused_speedup']:.3f}x (runtime "
                     f"{rec['fused_runtime_ms'] / rec['runtime_ms']:.3f} of the unfused child's, one session)")
        from .config import ScoreConfig

        timing = rec.get("front_timing")
        busy = timing["fused"].get("contention_cores") if isinstance(timing, dict) else None
        if _finite(busy) and busy > ScoreConfig().max_contention:  # breaker: said only later, by `puzzle front`
            lines.append(f"warning: timed while other jobs kept {busy:.2f} cores busy (over the default limit "
                         f"{ScoreConfig().max_contention:g}), so these speed-ups may be off by far more than the "
                         f"timing noise: --retime on a quiet machine times the fused child again")
        from .pipeline import SPEEDUP_MISMATCH

        ratio = rec["fused_runtime_ms"] / rec["runtime_ms"]
        # at best the runtime goes with the layer count (per-layer overheads on a small model): from 4 layers to 1,
        # 0.28-0.57 of it is plausible (breaker), and was called a timing gone wrong
        least = min(1.0, rec["fused_layers"] / max(rec["layers"], 1)) / SPEEDUP_MISMATCH
        if not least <= ratio <= SPEEDUP_MISMATCH:  # breaker: 1.595x -> 0.091x went on the front unsaid
            lines.append(f"warning: the fused child measured {ratio:.3g} times the unfused child's runtime, with "
                         f"{rec['fused_layers']} of its {rec['layers']} layers: a timing gone wrong (a busy "
                         f"machine?), not the fusion; --retime times it again")
    if rec.get("export"):
        lines.append(f"export: {rec['export']} (as recorded, not written again)" if rec.get("export_kept")
                     else f"exported: {rec['export']}")
    if rec.get("earlier_export"):
        lines.append(rec["earlier_export"])
    return "\n".join(lines)
