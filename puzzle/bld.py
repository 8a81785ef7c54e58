"""Blockwise local distillation (BLD): every candidate subblock learns to mimic its parent subblock.

Puzzle (Bercovich et al. 2024, Sec. 3): with teacher forcing, a child subblock of layer i receives
the parent's input activation of that subblock and is trained to reproduce the parent subblock's
output, with the normalized MSE

    L = MSE(o_parent, o_child) / MSE(o_parent, 0)

where o is what the subblock adds to the residual stream. Subblocks never see each other, so all of
them train from one parent forward pass, in any order, and could run on separate devices.

This module walks the parent layer by layer over the calibration tokens: the residual stream of all
calibration sequences at the current layer is kept in memory (N·T·C floats), the parent's
subblock outputs there are the targets, and every trainable variant of that layer is initialised
(init.py), saved as an "init" entry, trained for one pass over the calibration batches and saved as
a "bld" entry. Each calibration token therefore passes through the parent once. Finished entries
are skipped on a rerun (resume after an interruption loses at most the subblock in training).

The last `probe_sequences` calibration sequences are held out of training; the normalized MSE on
them before and after training is recorded per entry.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .architecture import AttentionConfig, FFNConfig
from .errors import PuzzleError
from .init import channel_scores_from_sums, ffn_with_activation_stats, init_attention, init_ffn, ridge_lstsq
from .library import Library
from .modeling import PuzzleForCausalLM, SwiGLU
from .space import LayerSpace, trainable


@dataclass(frozen=True)
class BLDConfig:
    """Blockwise-local-distillation settings.

    Attributes:
        tokens: calibration tokens each subblock trains on (capped by what the data stage packed).
        batch_size: sequences per optimizer step.
        lr: AdamW peak learning rate; linear replacements use `lr * linear_lr_scale`.
        warmup_fraction, min_lr_fraction: linear warmup, then cosine decay to min_lr_fraction * lr.
        grad_clip: max global grad norm per subblock (0 disables).
        linear_init: "parent" (W_o.W_v, W_down.W_up) or "lstsq" (least squares on calibration activations).
        linear_train: "lstsq" solves the BLD objective of a linear replacement exactly (normalized MSE
            of a linear map is a least-squares problem: ridge regression on all training tokens);
            "adam" trains it by gradient steps like the other subblocks.
        probe_sequences: calibration sequences held out to measure normalized MSE.
        train: False stops after the init entries (an init-only library, for comparisons).
        seed: seeds batch order and any randomness.
    """

    tokens: int = 32768
    batch_size: int = 4
    lr: float = 3e-4
    linear_lr_scale: float = 1.0
    warmup_fraction: float = 0.1
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    linear_init: str = "parent"
    linear_train: str = "lstsq"
    probe_sequences: int = 2
    train: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.linear_init not in ("parent", "lstsq"):
            raise PuzzleError(f"bld.linear_init must be 'parent' or 'lstsq', got {self.linear_init!r}")
        if self.linear_train not in ("lstsq", "adam"):
            raise PuzzleError(f"bld.linear_train must be 'lstsq' or 'adam', got {self.linear_train!r}")
        if self.tokens < 1 or self.batch_size < 1 or self.lr <= 0:
            raise PuzzleError("bld.tokens, bld.batch_size and bld.lr must be positive")


def normalized_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(target, out) / MSE(target, 0) over all elements; a scalar (Puzzle's BLD loss)."""
    return (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-20)


def lr_at(step: int, total: int, cfg: BLDConfig) -> float:
    """Linear warmup over warmup_fraction of the steps, then cosine decay to min_lr_fraction."""
    warm = max(1, int(round(cfg.warmup_fraction * total)))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class _Targets:
    """Parent activations of one layer over the calibration set, all (N, T, C)."""

    h_in: torch.Tensor  # attention subblock input
    attn: torch.Tensor  # parent attention output (delta)
    h_mid: torch.Tensor  # ffn subblock input
    ffn: torch.Tensor  # parent ffn output (delta)


@torch.no_grad()
def _parent_targets(parent: PuzzleForCausalLM, layer_idx: int, h: torch.Tensor, cos, sin, n_train: int,
                    chunk: int = 8) -> tuple[_Targets, torch.Tensor | None]:
    """The parent's subblock inputs and outputs at one layer, and its FFN channel scores (SwiGLU only)."""
    layer = parent.model.layers[layer_idx]
    attn, ffn = torch.empty_like(h), torch.empty_like(h)
    swiglu = isinstance(layer.mlp, SwiGLU)
    abs_sums = 0
    starts = sorted(set(range(0, h.shape[0], chunk)) | {n_train})  # no chunk straddles the probe boundary
    for s, e in zip(starts, starts[1:] + [h.shape[0]]):
        if s >= e:
            continue
        attn[s:e] = layer.attention_delta(h[s:e], cos[s:e], sin[s:e])
        if swiglu:
            ffn[s:e], sums = ffn_with_activation_stats(layer, h[s:e] + attn[s:e])
            if s < n_train:  # channel scores from training sequences only
                abs_sums = abs_sums + sums
        else:
            ffn[s:e] = layer.ffn_delta(h[s:e] + attn[s:e])
    scores = channel_scores_from_sums(layer, abs_sums, n_train * h.shape[1]) if swiglu else None
    return _Targets(h, attn, h + attn, ffn), scores


def _subblock_forward(sub, subblock: str, x, cos, sin):
    return sub.attention_delta(x, cos, sin) if subblock == "attention" else sub.ffn_delta(x)


@torch.no_grad()
def _probe_nmse(sub, subblock, x, target, cos, sin) -> float:
    return float(normalized_mse(_subblock_forward(sub, subblock, x, cos, sin), target))


def _train_subblock(sub, subblock: str, variant, x, target, cos, sin, cfg: BLDConfig, order: torch.Tensor,
                    on_step=None) -> tuple[float, int]:
    """One pass of AdamW over the calibration batches; returns (mean loss over the last 10% steps, tokens)."""
    params = [p for p in sub.parameters() if p.requires_grad]
    lr = cfg.lr * (cfg.linear_lr_scale if variant.kind == "linear" else 1.0)
    # the fused kernel (one pass over all parameters) is several times faster than the default on CPU
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)
    steps = math.ceil(len(order) / cfg.batch_size)
    losses, tokens = [], 0
    sub.train()
    for step in range(steps):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(step, steps, cfg)
        loss = normalized_mse(_subblock_forward(sub, subblock, x[idx], cos[idx], sin[idx]), target[idx])
        if not torch.isfinite(loss):
            raise PuzzleError(f"BLD loss became {loss.item()} for {variant.id}; lower bld.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += idx.numel() * x.shape[1]
        if on_step:
            on_step()
    sub.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail), tokens


def _lstsq_data(sub_input_norm, x, target, max_rows: int = 65536):
    """(X, Y) rows for a least-squares linear init: normed inputs and parent outputs, (n, C) each."""
    with torch.no_grad():
        X = sub_input_norm(x).reshape(-1, x.shape[-1])[:max_rows]
        Y = target.reshape(-1, target.shape[-1])[:max_rows]
    return X, Y


def build_library(parent: PuzzleForCausalLM, calib: torch.Tensor, space: list[LayerSpace], cfg: BLDConfig,
                  library: Library, progress: bool = False, rank: int = 0, world_size: int = 1) -> dict:
    """Train (or resume) every trainable subblock variant of `space` and write the library.

    Args:
        parent: the parent model (fp32 on CPU here); left unchanged.
        calib: (N, T) int64 calibration token sequences.
        space: per-layer variants (space.build_space); the first variant of each list is the parent's.
        library: where entries go; existing complete entries are kept.
        rank, world_size: shard the (layer, variant) work; each rank still runs the parent forward.

    Returns:
        {"trained": n, "skipped": n, "seconds": s, "tokens_per_subblock": t}.

    Raises:
        PuzzleError: too few calibration sequences, or a diverging loss.
    """
    n_probe = cfg.probe_sequences
    n_train = min(calib.shape[0] - n_probe, max(1, cfg.tokens // calib.shape[1]))
    if n_train < 1:
        raise PuzzleError(f"BLD needs more than {n_probe} calibration sequences, got {calib.shape[0]}; "
                          f"give more calibration text or lower bld.probe_sequences")
    train_ids, probe_ids = calib[:n_train], calib[calib.shape[0] - n_probe:] if n_probe else calib[:1]
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_train, generator=g)
    steps_per_subblock = math.ceil(n_train / cfg.batch_size)

    jobs = [(ls.layer, "attention", v) for ls in space for v in ls.attention[1:] if trainable(v)]
    jobs += [(ls.layer, "ffn", v) for ls in space for v in ls.ffn[1:] if trainable(v)]
    mine = {(l, v.id) for k, (l, s, v) in enumerate(sorted(jobs, key=lambda j: (j[0], j[1], j[2].id))) if k % world_size == rank}
    stage = "bld" if cfg.train else "init"
    todo = [(l, s, v) for (l, s, v) in jobs if (l, v.id) in mine and not library.has(l, v.id, stage)]
    todo_layers = {l for l, _, _ in todo}

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo) * (steps_per_subblock if cfg.train else 1), desc="BLD", unit="step", smoothing=0.1)

    parent.eval()
    t0, trained = time.perf_counter(), 0
    with torch.no_grad():
        ids = torch.cat([train_ids, probe_ids])
        h = parent.model.embed_tokens(ids)  # (N, T, C)
        cos, sin = parent.rope(parent.positions(ids.shape, 0, ids.device), h.dtype)
    last_layer = max(todo_layers, default=-1)
    for ls in space:
        i = ls.layer
        if i > last_layer:
            break
        tg, scores = _parent_targets(parent, i, h, cos, sin, n_train)
        if i in todo_layers:
            layer_jobs = [(s, v) for (l, s, v) in todo if l == i]
            for subblock, variant in layer_jobs:
                trained += 1
                _build_entry(parent, i, subblock, variant, tg, cos, sin, n_train, scores, cfg, order, library, bar)
        h = tg.h_mid + tg.ffn
    if bar is not None:
        bar.close()
    return {"trained": trained, "skipped": len(jobs) - len(todo), "seconds": time.perf_counter() - t0,
            "tokens_per_subblock": n_train * calib.shape[1]}


def _build_entry(parent, i, subblock, variant, tg: _Targets, cos, sin, n_train, scores, cfg, order, library, bar):
    layer = parent.model.layers[i]
    x, target = (tg.h_in, tg.attn) if subblock == "attention" else (tg.h_mid, tg.ffn)
    probe = slice(n_train, x.shape[0]) if cfg.probe_sequences else slice(0, 1)
    lstsq = None
    if variant.kind == "linear" and cfg.linear_init == "lstsq":
        norm = layer.input_layernorm if subblock == "attention" else layer.post_attention_layernorm
        lstsq = _lstsq_data(norm, x[:n_train], target[:n_train])
    if subblock == "attention":
        sub = init_attention(parent.config, layer, variant, i, lstsq_data=lstsq)
    else:
        sub = init_ffn(parent.config, layer, variant, i, channel_scores=scores, lstsq_data=lstsq)
    init_name = {"gqa": "kv_mean_pool", "swiglu": "channel_contribution"}.get(variant.kind, f"linear_{cfg.linear_init}")
    init_nmse = _probe_nmse(sub, subblock, x[probe], target[probe], cos[probe], sin[probe])
    info = {"init": init_name, "init_nmse": init_nmse, "config": asdict(cfg)}
    if not library.has(i, variant.id, "init"):
        library.save(i, subblock, variant.id, "init", sub.state_dict(), {**info, "tokens": 0, "final_nmse": init_nmse, "train_s": 0.0})
    if not cfg.train:
        if bar is not None:
            bar.update(1)
        return
    t0 = time.perf_counter()
    if variant.kind == "linear" and cfg.linear_train == "lstsq":
        norm = sub.input_layernorm if subblock == "attention" else sub.post_attention_layernorm
        weight = sub.self_attn.linear_attn.weight if subblock == "attention" else sub.mlp.linear_mlp.weight
        X, Y = _lstsq_data(norm, x[:n_train], target[:n_train], max_rows=x[:n_train].shape[0] * x.shape[1])
        with torch.no_grad():
            weight.copy_(ridge_lstsq(X, Y))
        final = _probe_nmse(sub, subblock, x[probe], target[probe], cos[probe], sin[probe])
        with torch.no_grad():
            train_loss = float(normalized_mse(torch.nn.functional.linear(X, weight), Y))
        if bar is not None:
            bar.update(math.ceil(n_train / cfg.batch_size))
        library.save(i, subblock, variant.id, "bld", sub.state_dict(),
                     {**info, "tokens": int(X.shape[0]), "final_nmse": final, "train_nmse": train_loss,
                      "train_s": time.perf_counter() - t0, "method": "lstsq"})
        return
    train_loss, tokens = _train_subblock(sub, subblock, variant, x[:n_train], target[:n_train], cos[:n_train],
                                         sin[:n_train], cfg, order, on_step=(lambda: bar.update(1)) if bar is not None else None)
    final = _probe_nmse(sub, subblock, x[probe], target[probe], cos[probe], sin[probe])
    library.save(i, subblock, variant.id, "bld", sub.state_dict(),
                 {**info, "tokens": tokens, "final_nmse": final, "train_nmse": train_loss,
                  "train_s": time.perf_counter() - t0, "method": "adamw"})
