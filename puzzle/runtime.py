"""A fast inference runtime for heterogeneous children: prefill, then greedy decode over a per-layer KV cache.

    rt = ChildRuntime(model, batch_size=4, max_len=512)          # a PuzzleForCausalLM (parent or child)
    logits = rt.prefill(ids)                                      # (B, T) -> (B, V), the last position
    logits = rt.decode(tokens)                                    # (B,) -> (B, V), one step
    out = rt.generate(ids, max_new_tokens=64, eos_token_id=2)     # (B, T) -> (B, T + n), greedy

The runtime reads the weights of a `PuzzleForCausalLM` (it never changes the model) and runs them its own way:
- every layer runs only the subblocks it has: a no_op subblock is skipped entirely (no norm, no kernel, no
  cache), a linear subblock is one matmul, a GQA subblock holds a KV cache with its own KV-head count;
- the q, k and v projections are one matmul (their weights concatenated), and so are gate and up;
- the residual add of each subblock is fused into the RMSNorm of the next one (`kernels.rmsnorm`), so the
  residual stream is read and written once per subblock;
- on CUDA, the kernels of `puzzle.kernels` (fused residual + RMSNorm, fused SwiGLU activation, flash prefill
  attention, split-KV decode attention over the cache) and one CUDA graph per decode step: the step (token
  embedding, RoPE lookup, every layer, final norm, LM head, argmax, position update) is captured once on static
  buffers, with the lengths held in a tensor, after warm-up calls that autotune every kernel;
- on a CPU, plain torch: the same fused layout, torch's scaled_dot_product_attention over the valid part of
  the cache. `use_triton=True` runs the Triton kernels on CPU tensors in Triton's interpreter (slow; for tests).

Prompts in one batch may differ in length: pass them right-padded with `lengths`. Causal attention never lets
a real token see the padding after it, and decoding masks each sequence's cache beyond its own length.

Each subblock is a (norm, body) pair over a residual stream h and the pending output `delta` of the subblock
before it:

    y, h = rms_norm(delta, w_norm, residual=h)      h <- h + delta; y = w_norm * norm(h)
    delta = body(y)                                 attention or FFN output, added by the next norm

and the final norm adds the last delta. Costs are therefore additive per subblock (norm + body), which is what
`runtime_step_fns` exposes to cost measurement.

Notation:
    B  batch             T  prompt tokens (padded)        S_max  cache positions (max_len)
    C  hidden size       H  query heads                   G  KV heads of this layer      D  head dim
    F  FFN width         V  vocab size
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import PuzzleError, shell_arg
from .modeling import PuzzleForCausalLM


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split layout on x (B, T, heads, D) with cos/sin (B or 1, T, D): `modeling.apply_rope`."""
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


# ---------------------------------------------------------------------------------------------------------------------
# The ops: Triton kernels (compiled on CUDA, interpreted on CPU) or torch


class _Ops:
    """The four fused ops on the Triton kernels (`puzzle.kernels.ops`, forced on) or in torch (SDPA for attention)."""

    def __init__(self, use_triton: bool):
        self.use_triton = use_triton
        if use_triton:
            from .kernels import ops  # imports triton

            self.kernels = ops

    def rms_norm(self, x, weight, residual, eps):
        """(weight * norm(x + residual), x + residual); residual None: (weight * norm(x), x)."""
        if self.use_triton:
            return self.kernels.rms_norm(x, weight, residual, eps, use_triton=True)
        h = x if residual is None else x + residual
        hf = h.float()
        return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h

    def swiglu(self, gate, up):
        if self.use_triton:
            return self.kernels.swiglu(gate, up, use_triton=True)
        return F.silu(gate) * up

    def prefill_attention(self, q, k, v):
        """q (B, H, T, D), k/v (B, G, T, D) -> (B, H, T, D), causal."""
        if self.use_triton:
            return self.kernels.prefill_attention(q, k, v, use_triton=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=q.shape[1] != k.shape[1])

    def decode_attention(self, q, k_cache, v_cache, ctx: "_DecodeContext"):
        """q (B, H, 1, D) over the caches (B, G, S_max, D) up to each sequence's length -> (B, H, 1, D)."""
        if self.use_triton:
            return self.kernels.decode_attention(q, k_cache, v_cache, ctx.lengths, use_triton=True)
        n = ctx.span
        k, v = k_cache[:, :, :n], v_cache[:, :, :n]  # (B, G, n, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=q.shape[1] != k.shape[1])


@dataclass(frozen=True)
class _DecodeContext:
    """What every layer of one decode step shares.

    pos: (B,) int64, where the new token goes; lengths = pos + 1; cos/sin (B, 1, D); batch_index (B,) arange;
    span: cache positions the torch path attends over (the host-known longest length, or S_max inside a CUDA
    graph); mask: None when every sequence fills the span, else (B, 1, 1, span) bool, True where visible.
    """

    pos: torch.Tensor
    lengths: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    batch_index: torch.Tensor
    span: int
    mask: torch.Tensor | None


# ---------------------------------------------------------------------------------------------------------------------
# Subblocks: a norm weight and a body; `prefill` on (B, T, C), `decode` on (B, 1, C)


def _param(t: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=dtype)


def _cat(tensors, device, dtype) -> torch.Tensor | None:
    """Concatenate weights (or biases) along the output dimension, in the runtime's device and dtype."""
    if tensors[0] is None:
        return None
    return torch.cat([t.detach().to(device=device, dtype=dtype) for t in tensors], dim=0)


class _GQA:
    """Grouped-query attention with RoPE and this layer's KV cache (B, G, S_max, D)."""

    kind = "attention"

    def __init__(self, layer, batch_size: int, max_len: int, device, dtype):
        attn = layer.self_attn
        self.norm, self.eps = _param(layer.input_layernorm.weight, device, dtype), layer.input_layernorm.eps
        self.H, self.G, self.D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.w_qkv = _cat([p.weight for p in projections], device, dtype)  # ((H + 2G) D, C)
        self.b_qkv = _cat([p.bias for p in projections], device, dtype)
        self.w_o, self.b_o = _param(attn.o_proj.weight, device, dtype), _param(attn.o_proj.bias, device, dtype)
        shape = (batch_size, self.G, max_len, self.D)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def _qkv(self, y, cos, sin):
        """y (B, T, C) -> q (B, T, H, D) and k, v (B, T, G, D), RoPE applied to q and k."""
        B, T, _ = y.shape
        H, G, D = self.H, self.G, self.D
        qkv = F.linear(y, self.w_qkv, self.b_qkv).view(B, T, H + 2 * G, D)  # (B, T, H + 2G, D)
        qk = _rope(qkv[:, :, : H + G], cos, sin)  # (B, T, H + G, D)
        return qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + G:]

    def _out(self, o):
        B, H, T, D = o.shape
        return F.linear(o.transpose(1, 2).reshape(B, T, H * D), self.w_o, self.b_o)  # (B, T, C)

    def prefill(self, y, ops: _Ops, cos, sin):
        q, k, v = self._qkv(y, cos, sin)
        T = y.shape[1]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, T, D)
        self.k_cache[:, :, :T] = k
        self.v_cache[:, :, :T] = v
        return self._out(ops.prefill_attention(q.transpose(1, 2), k, v))  # (B, H, T, D) -> (B, T, C)

    def decode(self, y, ops: _Ops, ctx: _DecodeContext):
        q, k, v = self._qkv(y, ctx.cos, ctx.sin)  # (B, 1, heads, D)
        self.k_cache[ctx.batch_index, :, ctx.pos] = k[:, 0]  # (B, G, D) into position pos[b] of sequence b
        self.v_cache[ctx.batch_index, :, ctx.pos] = v[:, 0]
        return self._out(ops.decode_attention(q.transpose(1, 2), self.k_cache, self.v_cache, ctx))


class _Linear:
    """A linear attention or linear FFN subblock: one (C, C) matmul of the normed input."""

    def __init__(self, norm, weight, kind: str, device, dtype):
        self.norm, self.eps = _param(norm.weight, device, dtype), norm.eps
        self.w = _param(weight, device, dtype)
        self.kind = kind

    def prefill(self, y, ops, cos=None, sin=None):
        return F.linear(y, self.w)

    def decode(self, y, ops, ctx):
        return F.linear(y, self.w)


class _SwiGLU:
    """down(silu(gate(y)) * up(y)) with gate and up in one matmul and the activation fused."""

    kind = "ffn"

    def __init__(self, layer, device, dtype):
        mlp = layer.mlp
        self.norm, self.eps = _param(layer.post_attention_layernorm.weight, device, dtype), layer.post_attention_layernorm.eps
        self.width = mlp.gate_proj.weight.shape[0]
        self.w_gate_up = _cat([mlp.gate_proj.weight, mlp.up_proj.weight], device, dtype)  # (2F, C)
        self.b_gate_up = _cat([mlp.gate_proj.bias, mlp.up_proj.bias], device, dtype)
        self.w_down, self.b_down = _param(mlp.down_proj.weight, device, dtype), _param(mlp.down_proj.bias, device, dtype)

    def _run(self, y, ops):
        gate, up = F.linear(y, self.w_gate_up, self.b_gate_up).split(self.width, dim=-1)  # (B, T, F) each, strided
        return F.linear(ops.swiglu(gate, up), self.w_down, self.b_down)  # (B, T, C)

    def prefill(self, y, ops, cos=None, sin=None):
        return self._run(y, ops)

    def decode(self, y, ops, ctx):
        return self._run(y, ops)


def _subblocks(model: PuzzleForCausalLM, batch_size: int, max_len: int, device, dtype) -> list:
    """The runtime's subblocks in execution order; no_op subblocks are left out."""
    out = []
    for layer in model.model.layers:
        attention, ffn = layer.block_config.attention.kind, layer.block_config.ffn.kind
        if attention == "gqa":
            out.append(_GQA(layer, batch_size, max_len, device, dtype))
        elif attention == "linear":
            out.append(_Linear(layer.input_layernorm, layer.self_attn.linear_attn.weight, "attention", device, dtype))
        if ffn == "swiglu":
            out.append(_SwiGLU(layer, device, dtype))
        elif ffn == "linear":
            out.append(_Linear(layer.post_attention_layernorm, layer.mlp.linear_mlp.weight, "ffn", device, dtype))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs


_WARMUP_STEPS = 3


def _capture(fn: Callable[[], object], device: torch.device, warmup: int = _WARMUP_STEPS):
    """Run `fn` `warmup` times on a side stream (autotuning every kernel), then capture one call in a CUDA graph.

    Returns (graph, output): `graph.replay()` reruns the captured kernels on the same buffers and writes the same
    output tensor. `fn` must read and write only tensors that outlive the graph (static buffers).
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# ---------------------------------------------------------------------------------------------------------------------
# The runtime


@dataclass(frozen=True)
class GenerateStats:
    """Timings of the last `ChildRuntime.generate` call (device synchronised at the boundaries).

    prefill_ms: the prompt's prefill and first token; decode_ms: all decode steps; steps: decode steps run
    (generated tokens - 1, plus any run past an all-EOS batch before it was noticed); decode_tok_s = B * steps /
    decode time.
    """

    prefill_ms: float
    decode_ms: float
    steps: int
    decode_tok_s: float


class ChildRuntime:
    """Prefill and greedy decode of a `PuzzleForCausalLM` (parent or heterogeneous child) with a preallocated cache.

    Args:
        model: the model whose weights are read (not modified; the runtime keeps its own copies of the fused
            projections, and of the rest when the device or dtype differs, else shares them).
        batch_size: B, the sequences of every call.
        max_len: S_max, the cache positions: prompt length + generated tokens - 1 must fit.
        device, dtype: where and in what precision to run (default: the model's).
        use_triton: True for the `puzzle.kernels` Triton kernels (on CPU tensors: Triton's interpreter, slow),
            False for torch; None picks Triton on CUDA.
        cuda_graphs: capture the decode step in a CUDA graph; None: on CUDA. Needs CUDA.

    Raises:
        PuzzleError: sizes below 1, a non-floating dtype, CUDA graphs or a CUDA device without CUDA, Triton
            requested but not installed.

    Memory: the KV caches (see `kv_cache_bytes`), the fused q/k/v and gate/up weights, and the RoPE tables.
    """

    def __init__(self, model: PuzzleForCausalLM, batch_size: int, max_len: int, device=None, dtype=None,
                 use_triton: bool | None = None, cuda_graphs: bool | None = None):
        from .fusion import FusedFFNBlock

        if any(isinstance(layer, FusedFFNBlock) for layer in model.model.layers):
            raise PuzzleError("ChildRuntime takes plain blocks: pass fusion.to_plain_model(fused), the same outputs as "
                              "one block per fused run (a run that mixes SwiGLU and linear FFNs has no plain form)")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype if dtype is not None else param.dtype
        if batch_size < 1 or max_len < 1:
            raise PuzzleError(f"ChildRuntime needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise PuzzleError(f"dtype must be a floating torch dtype, got {self.dtype!r}")
        cuda = self.device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise PuzzleError(f"device {self.device} needs CUDA, which this machine does not have; use device='cpu'")
        use_triton = cuda if use_triton is None else bool(use_triton)
        if use_triton:
            try:
                import triton  # noqa: F401
            except ImportError:
                raise PuzzleError("use_triton=True needs the triton package (pip install triton, on Linux); or pass "
                                  "use_triton=False for the torch path") from None
        self.cuda_graphs = cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not cuda:
            raise PuzzleError("cuda_graphs=True needs a CUDA device; pass cuda_graphs=None or False on a CPU")
        self.config, self.batch_size, self.max_len = model.config, int(batch_size), int(max_len)
        self.use_triton, self.ops = use_triton, _Ops(use_triton)

        with torch.no_grad():
            dev, dt = self.device, self.dtype
            self.embed = _param(model.model.embed_tokens.weight, dev, dt)  # (V, C)
            self.lm_head = (self.embed if model.lm_head.weight is model.model.embed_tokens.weight
                            else _param(model.lm_head.weight, dev, dt))  # (V, C)
            self.final_norm, self.final_eps = _param(model.model.norm.weight, dev, dt), model.model.norm.eps
            self.subblocks = _subblocks(model, self.batch_size, self.max_len, dev, dt)
            positions = torch.arange(self.max_len, device=model.model.rotary_emb.inv_freq.device)[None]  # (1, S_max)
            cos, sin = model.rope(positions, dt)  # (1, S_max, D): the model's own RoPE tables
            self.cos, self.sin = cos[0].to(dev), sin[0].to(dev)  # (S_max, D)
            B = self.batch_size
            self._tokens = torch.zeros(B, dtype=torch.long, device=dev)  # decode input, then the argmax output
            self._pos = torch.zeros(B, dtype=torch.long, device=dev)  # where the next token goes
            self._batch_index = torch.arange(B, device=dev)
        self._host_lengths: list[int] = [0] * B  # the same positions, known on the host (no sync)
        self._graph = None
        self.last_stats: GenerateStats | None = None
        if self.cuda_graphs:
            with torch.no_grad():  # warm up (and autotune) at the longest context the cache holds
                warmup = min(_WARMUP_STEPS, self.max_len)  # each warm-up step writes one more position
                self._pos.fill_(self.max_len - warmup)
                self._graph, self._graph_logits = _capture(self._decode_step, self.device, warmup)
                self._pos.zero_()
                self._tokens.zero_()

    # -- pieces ------------------------------------------------------------------------------------------------------
    def _norm(self, delta, weight, eps, h):
        """h <- h + delta (delta None: nothing to add); returns (weight * norm(h), h)."""
        if delta is None:
            return self.ops.rms_norm(h, weight, None, eps)
        return self.ops.rms_norm(delta, weight, h, eps)

    def prefill_layers(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run every subblock on h (B, T, C) from position 0, writing the caches; returns (h, pending delta)."""
        T = h.shape[1]
        cos, sin = self.cos[None, :T], self.sin[None, :T]  # (1, T, D)
        delta = None
        for sub in self.subblocks:
            y, h = self._norm(delta, sub.norm, sub.eps, h)
            delta = sub.prefill(y, self.ops, cos, sin)
        return h, delta

    def decode_context(self) -> _DecodeContext:
        """The shared inputs of one decode step, from the current positions."""
        pos = self._pos
        lengths = pos + 1  # (B,) valid positions once the new token is written
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, D)
        span, mask = self.max_len, None
        if not self.use_triton:
            if self.cuda_graphs:  # lengths change between replays: attend over the whole cache, masked
                mask = (torch.arange(span, device=self.device) < lengths[:, None])[:, None, None]  # (B, 1, 1, S_max)
            else:
                span = max(self._host_lengths) + 1
                if min(self._host_lengths) + 1 < span:
                    mask = (torch.arange(span, device=self.device) < lengths[:, None])[:, None, None]  # (B, 1, 1, span)
        return _DecodeContext(pos, lengths, cos, sin, self._batch_index, span, mask)

    def decode_layers(self, h: torch.Tensor, ctx: _DecodeContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run every subblock on h (B, 1, C) at the positions of `ctx`, writing the caches; returns (h, delta)."""
        delta = None
        for sub in self.subblocks:
            y, h = self._norm(delta, sub.norm, sub.eps, h)
            delta = sub.decode(y, self.ops, ctx)
        return h, delta

    def _head(self, h, delta) -> torch.Tensor:
        """Final norm (adding the last delta) and LM head: (B, C) -> logits (B, V)."""
        y, _ = self._norm(delta, self.final_norm, self.final_eps, h)
        return F.linear(y, self.lm_head)

    def _decode_step(self) -> torch.Tensor:
        """One step on the static buffers: reads the tokens, writes their argmax back, advances the positions."""
        h = F.embedding(self._tokens, self.embed)[:, None]  # (B, 1, C)
        h, delta = self.decode_layers(h, self.decode_context())
        logits = self._head(h[:, 0], None if delta is None else delta[:, 0])  # (B, V)
        self._tokens.copy_(logits.argmax(-1))
        self._pos.add_(1)
        return logits

    def _step(self) -> torch.Tensor:
        """`_decode_step`, replayed from the CUDA graph when there is one; keeps the host lengths in step."""
        if max(self._host_lengths) + 1 > self.max_len:
            raise PuzzleError(f"the KV cache holds {self.max_len} positions and is full; build the ChildRuntime with "
                              "a larger max_len")
        if self._graph is None:
            logits = self._decode_step()
        else:
            self._graph.replay()
            logits = self._graph_logits
        self._host_lengths = [n + 1 for n in self._host_lengths]
        return logits

    # -- public ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Start B sequences: run the prompts, fill the caches, return the logits of each last prompt token.

        Args:
            ids: (B, T) int token ids (on any device); rows shorter than T are right-padded (any valid id).
            lengths: each row's prompt length in [1, T]; None: all T.
        Returns:
            (B, V) logits in the runtime's dtype, at position lengths[b] - 1 of row b.
        Raises:
            PuzzleError: a batch other than B, T > max_len, lengths out of range.
        """
        if ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise PuzzleError(f"prefill takes ids (B={self.batch_size}, T); got {tuple(ids.shape)}. Build the "
                              "runtime for this batch size")
        B, T = ids.shape
        if T < 1 or T > self.max_len:
            raise PuzzleError(f"a prompt of {T} tokens does not fit the {self.max_len}-position cache; build the "
                              "runtime with a larger max_len")
        host = [T] * B if lengths is None else [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
        if len(host) != B or not all(1 <= n <= T for n in host):
            raise PuzzleError(f"lengths must be {B} prompt lengths in [1, {T}], got {host}")
        ids = ids.to(self.device)
        last = torch.tensor(host, device=self.device) - 1  # (B,)
        h, delta = self.prefill_layers(F.embedding(ids, self.embed))  # (B, T, C)
        rows = self._batch_index
        logits = self._head(h[rows, last], None if delta is None else delta[rows, last])  # (B, C) -> (B, V)
        self._pos.copy_(last + 1)
        self._host_lengths = host
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: append `tokens` (B,) to every sequence and return the next logits (B, V).

        Raises:
            PuzzleError: before a prefill's cache would overflow (`max_len`), or tokens of another shape.
        """
        if tokens.shape != (self.batch_size,):
            raise PuzzleError(f"decode takes tokens (B={self.batch_size},); got {tuple(tokens.shape)}")
        self._tokens.copy_(tokens)
        return self._step().clone()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
                 lengths: Sequence[int] | torch.Tensor | None = None, check_every: int = 8) -> torch.Tensor:
        """Greedy decoding: (B, T) prompts -> (B, T + n) with n <= max_new_tokens, as `PuzzleForCausalLM.generate`.

        Sequences that produced an EOS keep emitting it; generation stops once all have (checked on the host
        every `check_every` steps, so a few extra steps may run; they are cut from the output). With `lengths`
        (right-padded prompts) row b holds its padded prompt, then its own n generated tokens from column T.
        Sets `last_stats` (GenerateStats).

        Raises:
            PuzzleError: T + max_new_tokens - 1 > max_len; the logits of a step were NaN or infinite (activations
                that overflow the dtype; checked once at the end, as the EOS flags are); or the errors of `prefill`.
        """
        if max_new_tokens < 1:
            raise PuzzleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = ids.shape[1] if lengths is None else max(int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths))
        if longest + max_new_tokens - 1 > self.max_len:
            raise PuzzleError(f"a {longest}-token prompt and {max_new_tokens} new tokens need {longest + max_new_tokens - 1} "
                              f"cache positions; the runtime holds {self.max_len}: build it with a larger max_len")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self._sync()
        t0 = time.perf_counter()
        logits = self.prefill(ids, lengths)  # (B, V)
        token = logits.argmax(-1)  # (B,)
        finite = [torch.isfinite(logits).all()]  # one flag per step, read on the host once at the end
        self._sync()
        t1 = time.perf_counter()
        fill = next(iter(eos)) if eos else None  # what a finished sequence emits: as PuzzleForCausalLM.generate
        eos_t = torch.tensor(sorted(eos), device=self.device, dtype=torch.long)
        done = torch.isin(token, eos_t) if eos else None  # (B,)
        out, all_done = [token], [done.all()] if eos else []
        self._tokens.copy_(token)
        steps = 0
        for i in range(1, max_new_tokens):
            if eos and i % check_every == 0 and bool(all_done[-1]):
                break
            logits = self._step()  # writes the argmax into the token buffer: the input of the next step
            finite.append(torch.isfinite(logits).all())
            nxt = self._tokens.clone()  # (B,)
            steps += 1
            if eos:
                nxt = torch.where(done, fill, nxt)
                done = done | torch.isin(nxt, eos_t)
                all_done.append(done.all())
            out.append(nxt)
        self._sync()
        t2 = time.perf_counter()
        bad = (~torch.stack(finite)).nonzero()
        if len(bad):  # argmax of NaN logits is a token all the same: the answer would be noise, unsaid
            fix = ("check the weights and the prompt" if self.dtype == torch.float32 else
                   f"its activations overflow {str(self.dtype).replace('torch.', '')}: run it in float32")
            raise PuzzleError(f"the model's logits were NaN or infinite at generation step {int(bad[0, 0])} (0: the "
                              f"prompt's last position); {fix}")
        new = torch.stack(out, dim=1)  # (B, n)
        if eos:
            finished = torch.stack(all_done).nonzero()
            if len(finished):
                new = new[:, : int(finished[0, 0]) + 1]
        decode_s = t2 - t1
        self.last_stats = GenerateStats(prefill_ms=(t1 - t0) * 1e3, decode_ms=decode_s * 1e3, steps=steps,
                                        decode_tok_s=self.batch_size * steps / decode_s if decode_s > 0 else float("inf"))
        return torch.cat([ids.to(self.device), new], dim=1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def lengths(self) -> list[int]:
        """Positions each sequence holds in the cache (prompt + decoded tokens)."""
        return list(self._host_lengths)

    def kv_cache_bytes(self) -> int:
        """Bytes of the preallocated KV caches (GQA layers only)."""
        return sum(2 * s.k_cache.numel() * s.k_cache.element_size() for s in self.subblocks if isinstance(s, _GQA))


# ---------------------------------------------------------------------------------------------------------------------
# Hook for cost measurement


@dataclass(frozen=True)
class StepFns:
    """Zero-argument callables that run one piece of a ChildRuntime on fixed inputs, for a timer.

    Attributes:
        prefill: one prefill of the piece on the (B, P) prompt (part="model": embedding, layers, head and argmax
            of the last position; part="layers": the subblocks on random (B, P, C) hidden states).
        decode: one decode step at context `context` (part="model": the whole step, replayed from its CUDA graph
            when graphs are on; part="layers": the subblocks on a random (B, 1, C) input, graphed likewise).
        prepare_decode: untimed, before each decode sample: sets the positions back to `context`.
        runtime: the ChildRuntime they run (for `kv_cache_bytes`, `subblocks`).
    """

    prefill: Callable[[], object]
    decode: Callable[[], object]
    prepare_decode: Callable[[], None]
    runtime: ChildRuntime


@torch.no_grad()
def runtime_step_fns(model: PuzzleForCausalLM, batch_size: int, prompt_len: int, context: int, *, part: str = "model",
                     device=None, dtype=None, use_triton: bool | None = None, cuda_graphs: bool | None = None,
                     seed: int = 0) -> StepFns:
    """Timed pieces of the runtime, for cost tables measured the way the runtime runs (scoring/cost.py's hook).

    Costs are additive in this runtime (module docstring): a model's step = the non-block piece + the sum of its
    subblocks. Measure
    - a subblock variant: a model of N layers that all hold that variant (the other subblock no_op), with
      part="layers"; divide the times by N. N copies make a decode step stream N copies of the weights, as the
      whole model streams all its layers (choose N so the copies exceed the last-level cache, or N = the parent's
      layer count);
    - the non-block part: a model of the parent's sizes whose layers are all no_op, part="model" (embedding, RoPE
      lookup, final norm, LM head, argmax, position update; no_op layers cost nothing here);
    - a whole model: part="model"; a request is prefill + G decode steps.

    Args:
        model: the model (weights are read; random ones are fine for timing).
        batch_size, prompt_len: B and P of the prefill.
        context: cached positions of the timed decode step (the cost model uses P + G // 2).
        part: "model" or "layers".
        device, dtype, use_triton, cuda_graphs: as in ChildRuntime.
        seed: fixes the random prompt and hidden states.
    Returns:
        StepFns.
    Raises:
        PuzzleError: an unknown part, context < 1, or the errors of ChildRuntime.
    """
    if part not in ("model", "layers"):
        raise PuzzleError(f"part must be 'model' or 'layers', got {part!r}")
    if context < 1:
        raise PuzzleError(f"context must be >= 1, got {context}")
    rt = ChildRuntime(model, batch_size, max(prompt_len, context + 1), device, dtype, use_triton, cuda_graphs)
    gen = torch.Generator().manual_seed(seed)
    B, C = batch_size, model.config.hidden_size
    prompt = torch.randint(model.config.vocab_size, (B, prompt_len), generator=gen).to(rt.device)  # (B, P)

    def prepare_decode():
        rt._pos.fill_(context)
        rt._host_lengths = [context] * B

    if part == "model":
        return StepFns(prefill=lambda: rt.prefill(prompt).argmax(-1), decode=rt._step, prepare_decode=prepare_decode,
                       runtime=rt)
    h_prefill = torch.randn(B, prompt_len, C, generator=gen).to(rt.device, rt.dtype)  # (B, P, C)
    h_decode = torch.randn(B, 1, C, generator=gen).to(rt.device, rt.dtype)  # (B, 1, C)
    prepare_decode()
    ctx = rt.decode_context()  # static: the positions are reset before every sample
    decode = lambda: rt.decode_layers(h_decode, ctx)  # noqa: E731
    if rt.cuda_graphs:
        graph, _ = _capture(decode, rt.device)
        decode = graph.replay
    return StepFns(prefill=lambda: rt.prefill_layers(h_prefill), decode=decode, prepare_decode=prepare_decode,
                   runtime=rt)


# ---------------------------------------------------------------------------------------------------------------------
# Chat answers and the `puzzle generate` command


@dataclass(frozen=True)
class Answers:
    """Greedy answers to a batch of prompts, with the runtime's speed on them."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    stats: GenerateStats
    device: str
    dtype: str
    chat: bool = True  # False: the tokenizer has no chat template, the prompts went in as plain text


def chat_ids(tokenizer, messages: Sequence[dict]) -> tuple[torch.Tensor, bool]:
    """`messages` ([{"role", "content"}, ...]) rendered with the tokenizer's chat template and a generation prompt,
    as token ids (T,) int64; without a chat template (a base model's folder), their contents as plain text, one
    per line. Returns the ids and whether the template was used.

    Raises:
        PuzzleError: a chat template that does not render (its error is named).
    """
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(str(m["content"]) for m in messages)
        return tokenizer(text, return_tensors="pt")["input_ids"][0], False
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"][0], True
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # syntax, or a render-time error of the template
        raise PuzzleError(f"the model's chat template does not render ({type(e).__name__}: {e}); mend or delete "
                          f"chat_template.jinja (or tokenizer_config.json's chat_template) in the model folder, "
                          f"and without one the prompts go in as plain text") from None


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[list[torch.Tensor], bool]:
    """Each prompt as one user message (`chat_ids`), token ids (T_i,) int64, and whether the chat template was used.

    Raises:
        PuzzleError: as `chat_ids`.
    """
    from .parent import transformers_quiet

    with transformers_quiet():  # breaker: its "Token indices sequence length is longer ..." came before our own error
        encoded = [chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return [ids for ids, _ in encoded], all(chat for _, chat in encoded)


def answer_prompts(model: PuzzleForCausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, device=None,
                   dtype=None, use_triton: bool | None = None, cuda_graphs: bool | None = None) -> Answers:
    """Greedy chat answers to all `prompts` at once (one batch, right-padded) with a ChildRuntime.

    Each prompt is one user message rendered with the tokenizer's chat template (plain text without one:
    `encode_prompts`); an answer stops at the first of the model's stop tokens (`stop_token_ids`).

    Raises:
        PuzzleError: no prompts, a prompt that encodes to no token, prompt plus answer (less its last token, never
            fed back) longer than the model's max_position_embeddings, a chat template that does not render, or the
            errors of ChildRuntime.
    """
    if not prompts:
        raise PuzzleError("give at least one prompt")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the shell could not decode arrive as lone surrogates
            raise PuzzleError(f"prompt {p!r} is not valid UTF-8 text ({e.reason}); give it as UTF-8") from None
    encoded, chat = encode_prompts(tokenizer, prompts)
    lengths = [len(e) for e in encoded]
    if empty := [i + 1 for i, n in enumerate(lengths) if n == 0]:  # reviewer: said in terms of the cache
        if chat:  # breaker: a template that renders nothing was said to be missing
            raise PuzzleError(f"the model's chat template renders prompt {empty[0]} to no token; mend "
                              f"chat_template.jinja (or tokenizer_config.json's chat_template) in the model folder, or "
                              f"delete it to give the prompts as plain text")
        raise PuzzleError(f"prompt {empty[0]} encodes to no token (the model has no chat template to add any); give "
                          f"it some text")
    T = max(lengths)
    stops = stop_token_ids(model.config, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None or not 0 <= pad < model.config.vocab_size:  # reviewer: an added <pad> past the embedding crashed
        pad = stops[0] if stops and stops[0] < model.config.vocab_size else 0  # any id the model has: never read
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)  # (B, T) right-padded
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = e
    limit = model.config.max_position_embeddings  # the last new token is never fed back: T + n - 1 positions
    if T > limit:
        raise PuzzleError(f"the longest prompt has {T} tokens and the model was trained on {limit} positions, so no "
                          f"room is left for an answer; shorten the prompt")
    if T + max_new_tokens - 1 > limit:
        raise PuzzleError(f"the longest prompt has {T} tokens, so {max_new_tokens} new tokens would run past the "
                          f"{limit} positions the model was trained on; give --max-new-tokens {limit - T + 1} or less")
    rt = ChildRuntime(model, len(prompts), T + max_new_tokens - 1, device, dtype, use_triton, cuda_graphs)
    out = rt.generate(ids, max_new_tokens, eos_token_id=list(stops), lengths=lengths).cpu()
    answers = []
    for row in out[:, T:].tolist():  # a character cut by --max-new-tokens decodes to U+FFFD: dropped (stop 76)
        answers.append(tokenizer.decode(until_stop(row, stops), skip_special_tokens=True).rstrip("\ufffd").strip())
    return Answers(tuple(prompts), tuple(answers), rt.last_stats, str(rt.device), str(rt.dtype).removeprefix("torch."),
                   chat)


def stop_token_ids(config, tokenizer) -> tuple[int, ...]:
    """The ids that end a greedy answer: the tokenizer's EOS and the model configuration's `eos_token_id` (an id or a
    list, as generation_config.json gives it: Llama-3-Instruct's tokenizer says <|end_of_text|> while its turns end
    in <|eot_id|>, which only the configuration's list holds), each once, the tokenizer's first."""
    found = [tokenizer.eos_token_id]
    own = getattr(config, "eos_token_id", None)
    found += list(own) if isinstance(own, (list, tuple)) else [own]
    return tuple(dict.fromkeys(int(t) for t in found if isinstance(t, int) and not isinstance(t, bool) and t >= 0))


def until_stop(tokens: list[int], stops) -> list[int]:
    """`tokens` up to (without) the first of the `stops` ids."""
    return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _refuse_run_directory(path: Path) -> None:
    """Refuse a puzzle run directory (or its config.json) given as the model, naming its exports that exist
    (reviewer: child-1.5x was suggested where no such export was, and a run after `puzzle data` alone was called an
    unsupported model_type)."""
    folder = path.parent if path.name == "config.json" else path
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return
    if not (isinstance(config, dict) and "parent" in config and "model_type" not in config):
        return  # a model folder's config.json names its model_type
    exports = sorted(str(p) for p in (folder / "export").glob("*") if (p / "config.json").is_file())
    raise PuzzleError(f"{path} is a puzzle run directory, not a model; " + (
        f"pass one of its exported models: {', '.join(exports[:4])}" + (" ..." if len(exports) > 4 else "")
        if exports else f"it has no exported model yet (`puzzle export --out {shell_arg(folder)}` writes the run's "
                        "child)"))


def cmd_generate(args) -> int:
    """`puzzle generate`: load a model folder (export, HF, GGUF), answer the prompts, print answers and speed."""
    from .parent import load_model_spec

    if args.max_new_tokens < 1:
        raise PuzzleError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise PuzzleError(f"--device {device!r}: give cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PuzzleError(f"--device {device}: this machine has no CUDA device; give --device cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if empty := [k for k, p in enumerate(args.prompt, start=1) if not p.strip()]:  # breaker: answered unasked
        raise PuzzleError(f"--prompt {empty[0]} is empty; give each --prompt a message")
    from .tiny import means_builtin_tiny

    # asset:<name> as `--parent` takes it (fresh user), tiny as `puzzle eval tiny` (breaker: "tiny does not exist")
    path = "./tiny" if args.model == "tiny" and not means_builtin_tiny(args.model) else args.model
    _refuse_run_directory(Path(path))  # nothing to read for "tiny" or asset:<name>
    loaded = load_model_spec(path, dtype)
    use_triton = {"auto": None, "on": True, "off": False}[args.triton]
    result = answer_prompts(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, device=device,
                            dtype=dtype, use_triton=use_triton, cuda_graphs=False if args.no_cuda_graphs else None)
    if not result.chat:
        print(f"note: {args.model} has no chat template, so each prompt went in as plain text (the answers continue "
              f"it)", file=sys.stderr)
    for prompt, answer in zip(result.prompts, result.answers):
        # breaker: a tiny child's eight newlines printed as a blank line, which looked broken
        print(f"> {prompt}\n{answer or '(no text: the answer was whitespace alone, or it stopped at once)'}\n")
    s = result.stats
    print(f"[{result.device} {result.dtype}, batch {len(result.prompts)}: prefill {s.prefill_ms:.0f} ms, "
          f"{s.steps} decode steps at {s.decode_tok_s:.1f} tok/s]")
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle generate` (greedy chat answers with the child runtime) to the CLI's subparsers."""
    p = subparsers.add_parser("generate", help="greedy chat answers from a model folder (export, HF or GGUF parent), "
                                               "all prompts in one batch on the child runtime")
    p.add_argument("model", help="model path: an exported child folder, an HF Llama folder or a .gguf file, "
                                 "asset:<name> (the packaged parent: asset:smollm2-gguf), or 'tiny' (built-in)")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weights and activations (default: bfloat16 on CUDA, "
                                                           "float32 on CPU)")
    p.add_argument("--triton", choices=["auto", "on", "off"], default="auto",
                   help="Triton kernels: auto (on CUDA), on (on a CPU: Triton's interpreter, slow), off (torch)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--no-progress", action="store_true",  # a fresh user: every other command takes it
                   help="accepted as by the other commands (generate shows no progress bar)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_generate)
    return p
