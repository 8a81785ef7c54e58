"""Tied-LoRA adapters for any PuzzleForCausalLM (Renduchintala et al. 2024, "Tied-LoRA").

Each adapted linear map W (d_out × d_in) of layer l gets a low-rank update

    ΔW_l = s · diag(v_l) · B · diag(u_l) · A          A (r × d_in), B (d_out × r), u_l (r), v_l (d_out)

with s = alpha / r. With `tied=True`, A and B are one pair shared by every layer whose target
module has the same name and shape (a child whose FFN widths differ gets one pair per width);
u_l and v_l always belong to their layer. `spec` names the factors in use as in the paper ("BA",
"BuA", "vBA", "vBuA"; u or v absent means identity) and `frozen` the ones that do not train:

    spec "BA",   tied=False              LoRA (Hu et al. 2021): r·(d_in + d_out) per module and layer
    spec "BA",   tied=True               tied LoRA: r·(d_in + d_out) once per (module name, shape)
    spec "BuA" / "vBA" / "vBuA"          tied, plus per-layer scaling vectors (r and d_out per layer)
    spec "vBuA", frozen="AB", tied=True  VeRA-like (Kopiczko et al. 2024): A, B frozen random, u, v train

Init (ΔW = 0 at the start): u = 1; a trained v = 0 with A and B random; a frozen or absent v = 1
with B = 0 (then B must train). A and B random are Kaiming-uniform (bound 1/sqrt(fan_in)), seeded.

Layers whose attention or FFN is no_op have no linear map to adapt; the linear replacements of
attention/FFN (`linear_attn`, `linear_mlp`) are adapted only with `linear_subblocks="adapt"`.

`apply_adapters(model, config)` swaps the target nn.Linear modules for `AdaptedLinear` wrappers,
freezes every base parameter, and returns an `AdapterHandle`; a trainer then optimises whatever
requires gradients without knowing about adapters. `save_adapters` stores each shared A and B once;
`load_adapters` rebuilds the ties and copies the values in; `AdapterHandle.merge` folds ΔW into
the base weights and puts plain nn.Linear modules back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PuzzleError
from .io import atomic_save_safetensors

SPECS = ("BA", "BuA", "vBA", "vBuA")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_SUBBLOCK_TARGETS = ("linear_attn", "linear_mlp")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterConfig:
    """What to adapt and how.

    Attributes:
        spec: the factors in use, in the paper's notation: "BA", "BuA", "vBA" or "vBuA".
        frozen: the factors that do not train, e.g. "AB" for the VeRA-like corner ("" trains all).
        rank: r.
        tied: share A and B across layers per (module name, shape); False gives each module its own.
        alpha: the update is scaled by alpha / rank; None means alpha = rank (scale 1).
        targets: leaf names of the nn.Linear modules to adapt.
        linear_subblocks: "skip" or "adapt" the (C, C) matrices of linear attention/FFN replacements.
        layers: layer indices to adapt (None: all).
        seed: seed of the random A and B.
    """

    spec: str = "vBuA"
    frozen: str = ""
    rank: int = 8
    tied: bool = True
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    linear_subblocks: str = "skip"
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.spec not in SPECS:
            raise PuzzleError(f"adapter spec {self.spec!r} is not one of {', '.join(SPECS)} (u or v absent means identity)")
        if any(c not in "ABuv" or c not in self.spec for c in self.frozen) or len(set(self.frozen)) != len(self.frozen):
            # breaker: the list named u and v for spec BA, which has neither
            raise PuzzleError(f"frozen={self.frozen!r}: name factors of spec {self.spec!r} once each (its factors: "
                              f"{', '.join(self.spec)})")
        if self.rank < 1:
            raise PuzzleError(f"adapter rank must be >= 1, got {self.rank}")
        if self.linear_subblocks not in ("skip", "adapt"):
            raise PuzzleError(f"linear_subblocks must be 'skip' or 'adapt', got {self.linear_subblocks!r}")
        if len(self.frozen) == len(self.spec):
            raise PuzzleError(f"adapter spec {self.spec!r} with frozen={self.frozen!r} trains nothing")
        if "B" in self.frozen and self.trains("v") is not True:
            raise PuzzleError(f"adapter spec {self.spec!r}, frozen={self.frozen!r}: with B frozen, B starts at zero "
                              "unless a trained v scales it (ΔW would stay 0); train B or use a trained v")
        if not self.targets:
            raise PuzzleError("adapter targets are empty; name at least one linear module (e.g. q_proj)")

    def trains(self, factor: str) -> bool | None:
        """True (trained), False (frozen) or None (absent) for factor 'A', 'B', 'u' or 'v'."""
        if factor not in self.spec:
            return None
        return factor not in self.frozen

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def name(self) -> str:
        """'tied vBuA r8', 'untied BA r8', 'tied vBuA r8 (A,B frozen)': a label for tables."""
        frozen = f" ({','.join(self.frozen)} frozen)" if self.frozen else ""
        return f"{'tied' if self.tied else 'untied'} {self.spec} r{self.rank}{frozen}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        d["targets"] = tuple(d.get("targets", DEFAULT_TARGETS))
        return cls(**d)


class AdaptedLinear(nn.Module):
    """y = base(x) + s · ((x Aᵀ ⊙ u) Bᵀ ⊙ v): an nn.Linear with a (possibly shared) low-rank update.

    `lora_A` (r, d_in) and `lora_B` (d_out, r) may be the same Parameter objects as in other
    AdaptedLinear modules (ties); `lora_u` (r,) and `lora_v` (d_out,) are this module's or None.
    """

    def __init__(self, base: nn.Linear, A: nn.Parameter, B: nn.Parameter, u: nn.Parameter | None,
                 v: nn.Parameter | None, scale: float, group: str):
        super().__init__()
        self.base, self.scale, self.group, self.enabled = base, scale, group, True
        self.lora_A, self.lora_B = A, B
        self.lora_u, self.lora_v = u, v

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · diag(v) B diag(u) A: (d_out, d_in)."""
        B = self.lora_B if self.lora_v is None else self.lora_v[:, None] * self.lora_B
        A = self.lora_A if self.lora_u is None else self.lora_u[:, None] * self.lora_A
        return self.scale * (B @ A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        y = self.base(x)
        if not self.enabled:
            return y
        z = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        if self.lora_u is not None:
            z = z * self.lora_u
        z = F.linear(z, self.lora_B)  # (..., d_out)
        if self.lora_v is not None:
            z = z * self.lora_v
        return y + (self.scale * z).to(y.dtype)


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def target_modules(model, config: AdapterConfig) -> list[tuple[str, nn.Linear]]:
    """(path, module) of every nn.Linear `config` adapts, in model order (the LM head never).

    On a model that already has adapters, each AdaptedLinear stands for its base nn.Linear.
    """
    names = set(config.targets) | (set(LINEAR_SUBBLOCK_TARGETS) if config.linear_subblocks == "adapt" else set())
    if config.linear_subblocks == "skip":
        names -= set(LINEAR_SUBBLOCK_TARGETS)
    out = []
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLinear):  # an adapted model: count its base map
            module = module.base
        if not isinstance(module, nn.Linear) or path.rsplit(".", 1)[-1] not in names:
            continue
        layer = _layer_index(path)
        if layer is None or (config.layers is not None and layer not in config.layers):
            continue
        out.append((path, module))
    return out


def group_key(path: str, module: nn.Linear, tied: bool) -> str:
    """The A/B group of a module: '<leaf>.<d_out>x<d_in>' when tied, its own path otherwise."""
    if tied:
        return f"{path.rsplit('.', 1)[-1]}.{module.out_features}x{module.in_features}"
    return path


def _kaiming_uniform(shape, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT's LoRA A use
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound)


@dataclass
class AdapterHandle:
    """The adapters applied to one model: its wrappers, shared factors and controls.

    Attributes:
        model: the adapted model; config: the AdapterConfig.
        modules: module path -> AdaptedLinear, in model order.
        groups: group key -> (A, B) Parameters (one pair per shape when tied).
    """

    model: nn.Module
    config: AdapterConfig
    modules: dict
    groups: dict
    base_requires_grad: dict = dataclasses.field(default_factory=dict)
    active: bool = True
    base_sha: str | None = None  # `base_weights_sha` of the model before it was adapted: the file records it

    def parameters(self, trainable_only: bool = True) -> list[nn.Parameter]:
        """Distinct adapter Parameters (shared A and B once)."""
        seen = {}
        for group in self.groups.values():
            for p in group:
                seen[id(p)] = p
        for m in self.modules.values():
            for p in (m.lora_u, m.lora_v):
                if p is not None:
                    seen[id(p)] = p
        return [p for p in seen.values() if p.requires_grad or not trainable_only]

    def num_trainable(self) -> int:
        """Trainable adapter parameters, each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def disabled(self):
        """Run the model without its adapters (the base model, e.g. as π_ref) inside the block."""
        states = {path: m.enabled for path, m in self.modules.items()}
        for m in self.modules.values():
            m.enabled = False
        try:
            yield self.model
        finally:
            for path, m in self.modules.items():
                m.enabled = states[path]

    def _restore(self, merge: bool) -> nn.Module:
        if not self.active:
            raise PuzzleError("these adapters were already merged or removed")
        with torch.no_grad():
            for path, m in self.modules.items():
                if merge:
                    m.base.weight.add_(m.delta_weight().to(m.base.weight.dtype))
                parent_path, _, leaf = path.rpartition(".")
                setattr(self.model.get_submodule(parent_path), leaf, m.base)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.base_requires_grad.get(name, p.requires_grad))
        self.active = False
        return self.model

    def merge(self) -> nn.Module:
        """Fold every ΔW into its base weight and put the plain nn.Linear modules back.

        Every base parameter gets back the requires_grad it had before `apply_adapters`.
        Returns the model; the merged logits equal the adapted ones up to float rounding.
        """
        return self._restore(merge=True)

    def remove(self) -> nn.Module:
        """Put the plain nn.Linear modules back without the updates (requires_grad restored). Returns the model."""
        return self._restore(merge=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """'A.<group>', 'B.<group>' once per group; 'u.<path>', 'v.<path>' per module."""
        out = {}
        for key, (A, B) in self.groups.items():
            out[f"A.{key}"], out[f"B.{key}"] = A.detach(), B.detach()
        for path, m in self.modules.items():
            if m.lora_u is not None:
                out[f"u.{path}"] = m.lora_u.detach()
            if m.lora_v is not None:
                out[f"v.{path}"] = m.lora_v.detach()
        return out


def base_weights_sha(model: nn.Module) -> str:
    """A short sha256 of a model's parameter names, shapes and a strided sample of their values rounded to bfloat16
    (the same weights in float32 or bfloat16 agree; `pipeline.tensors_sha`): what an adapter file records of the model
    it was trained on."""
    from .pipeline import tensors_sha

    return tensors_sha(model.named_parameters(), rounded_to=torch.bfloat16)[:16]


def apply_adapters(model: nn.Module, config: AdapterConfig) -> AdapterHandle:
    """Wrap the target linear maps of `model` with (tied) low-rank adapters; freeze the base weights.

    Args:
        model: a PuzzleForCausalLM (or any module whose decoder layers are at `*.layers.<i>.*`).
        config: AdapterConfig.
    Returns:
        AdapterHandle; afterwards only adapter factors the spec marks as trained require gradients.
    Raises:
        PuzzleError: no module matches the targets, a rank above every target's min(d_in, d_out), or the
            model already has adapters.
    """
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise PuzzleError("this model already has adapters; merge or remove them first")
    base_sha = base_weights_sha(model)
    found = target_modules(model, config)
    if not found:
        raise PuzzleError(f"no linear module named {', '.join(config.targets)} in the decoder layers; "
                          "name existing modules in targets")
    # a product B·A of rank r adds nothing past min(d_in, d_out) (breaker: rank 100000 on a hidden size of 64 wrote a
    # 409 MB adapters file)
    full = max(min(linear.in_features, linear.out_features) for _, linear in found)
    if config.rank > full:
        raise PuzzleError(f"adapter rank {config.rank} is above the rank of every adapted map (at most {full}, "
                          f"min(in, out) of the largest): give --rank {full} or less (LoRA ranks are usually 8 to 64)")
    narrow: dict[str, int] = {}  # map name -> its least rank below config.rank (k_proj of few KV heads, say)
    for path, linear in found:
        if (width := min(linear.in_features, linear.out_features)) < config.rank:
            name = path.rsplit(".", 1)[-1]
            narrow[name] = min(width, narrow.get(name, width))
    if narrow:  # stop 76's leftover: a rank above the narrower maps' went unsaid
        widths = ", ".join(f"{name} ({width})" for name, width in sorted(narrow.items(), key=lambda kv: kv[1]))
        warnings.warn(f"adapter rank {config.rank} is above the rank of some adapted maps, min(in, out): {widths}; "
                      f"there the rank past it adds parameters but nothing a smaller rank could not learn (give "
                      f"--rank {min(narrow.values())} or less to stay within every map)")
    base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    r = config.rank
    trains_v = config.trains("v")
    groups: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    modules: dict[str, AdaptedLinear] = {}
    for path, linear in found:
        key = group_key(path, linear, config.tied)
        dtype, device = linear.weight.dtype, linear.weight.device
        if key not in groups:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + sum(key.encode()) * 7919 + len(groups))
            A = _kaiming_uniform((r, linear.in_features), linear.in_features, gen)
            B = _kaiming_uniform((linear.out_features, r), r, gen) if trains_v else torch.zeros(linear.out_features, r)
            groups[key] = (nn.Parameter(A.to(dtype=dtype, device=device), requires_grad=config.trains("A")),
                           nn.Parameter(B.to(dtype=dtype, device=device), requires_grad=config.trains("B")))
        A, B = groups[key]
        u = v = None
        if config.trains("u") is not None:
            u = nn.Parameter(torch.ones(r, dtype=dtype, device=device), requires_grad=config.trains("u"))
        if trains_v is not None:
            init = torch.zeros if trains_v else torch.ones
            v = nn.Parameter(init(linear.out_features, dtype=dtype, device=device), requires_grad=trains_v)
        wrapper = AdaptedLinear(linear, A, B, u, v, config.scale, key)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, wrapper)
        modules[path] = wrapper
    return AdapterHandle(model, config, modules, groups, base_requires_grad, base_sha=base_sha)


def expected_trainable_parameters(model: nn.Module, config: AdapterConfig) -> int:
    """The trainable-parameter count from the formulas, computed from module shapes alone.

    Trained A and B: r·d_in and d_out·r once per group (per module and layer when untied, per
    (module name, shape) when tied); trained u: r per adapted module; trained v: d_out per module.
    Works on the model before or after `apply_adapters`.
    """
    r, total, seen = config.rank, 0, set()
    for path, m in target_modules(model, config):
        key = group_key(path, m, config.tied)
        if key not in seen:
            seen.add(key)
            total += r * m.in_features * bool(config.trains("A")) + m.out_features * r * bool(config.trains("B"))
        total += r * bool(config.trains("u")) + m.out_features * bool(config.trains("v"))
    return total


def save_adapters(handle: AdapterHandle, path) -> Path:
    """Write the adapters to one safetensors file (atomic): each shared A and B once, u and v per module,
    the config and the module -> group map in the metadata. Returns the path."""
    if not handle.active:
        raise PuzzleError("these adapters were merged or removed; save before merging")
    meta = {"format": str(FORMAT_VERSION), "config": json.dumps(handle.config.to_dict()),
            "modules": json.dumps({p: m.group for p, m in handle.modules.items()}),
            **({"base_sha": handle.base_sha} if handle.base_sha else {})}
    return atomic_save_safetensors(handle.state_dict(), path, meta)


def load_adapters(model: nn.Module, path) -> AdapterHandle:
    """Apply the adapters saved at `path` to `model` (same architecture), ties included.

    Raises:
        PuzzleError: a missing or foreign file, or a model whose modules or shapes differ from the saved ones.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"adapter file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != str(FORMAT_VERSION) or "config" not in meta:
        raise PuzzleError(f"{path} is not a puzzle adapter file (format {FORMAT_VERSION})")
    config = AdapterConfig.from_dict(json.loads(meta["config"]))
    saved_modules = json.loads(meta["modules"])
    handle = apply_adapters(model, config)
    if meta.get("base_sha") and handle.base_sha != meta["base_sha"]:  # breaker: taken on any weights of the shape
        warnings.warn(f"{path} was trained on other base weights than this model's (the same architecture): its "
                      f"low-rank changes were learned against those, so the adapted model is not the trained one; "
                      f"load it into the model it was trained on")
    if {p: m.group for p, m in handle.modules.items()} != saved_modules:
        handle.remove()
        raise PuzzleError(f"{path} was saved for other modules than this model has; load it into the same architecture")
    state = handle.state_dict()
    if set(state) != set(tensors) or any(state[k].shape != tensors[k].shape for k in state):
        handle.remove()
        raise PuzzleError(f"{path}: adapter tensors do not match this model's shapes")
    with torch.no_grad():
        for key, (A, B) in handle.groups.items():
            A.copy_(tensors[f"A.{key}"])
            B.copy_(tensors[f"B.{key}"])
        for p, m in handle.modules.items():
            if m.lora_u is not None:
                m.lora_u.copy_(tensors[f"u.{p}"])
            if m.lora_v is not None:
                m.lora_v.copy_(tensors[f"v.{p}"])
    return handle
