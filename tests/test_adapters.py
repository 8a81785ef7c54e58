"""Tied-LoRA adapters: identity at init, parameter counts, ties through save/load, exact merge, heterogeneous children."""

import warnings

import pytest
import torch
from safetensors import safe_open

from puzzle.adapters import (AdaptedLinear, AdapterConfig, apply_adapters, expected_trainable_parameters, load_adapters,
                             save_adapters)
from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import PuzzleError
from puzzle.modeling import PuzzleForCausalLM
from puzzle.tiny import tiny_parent

SPECS = (("BA", ""), ("BuA", ""), ("vBA", ""), ("vBuA", ""), ("vBuA", "AB"), ("vBuA", "u"), ("vBuA", "v"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def hetero_child(seed: int = 0) -> PuzzleForCausalLM:
    """4 layers, hidden 32: GQA with 2 and 1 KV heads, linear and no_op attention; FFN widths 64 and 32, linear FFN."""
    base = tiny_parent(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64).config
    blocks = [BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 64)),
              BlockConfig(AttentionConfig("linear"), FFNConfig("swiglu", 32)),
              BlockConfig(AttentionConfig("no_op"), FFNConfig("swiglu", 64)),
              BlockConfig(AttentionConfig("gqa", 1), FFNConfig("linear"))]
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(base.with_blocks(blocks))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2], [1, 50, 51, 52, 53, 54, 55, 2]])


PROBE = torch.randn(2, 8, 299, generator=torch.Generator().manual_seed(0))


def train_step(model, lr=1e-2):
    """One SGD step on a random linear function of the logits (gradients of order 1 everywhere)."""
    params = [p for p in model.parameters() if p.requires_grad]
    (model(IDS) * PROBE).sum().backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


@pytest.mark.parametrize("spec,frozen", SPECS)
def test_init_leaves_the_model_unchanged(spec, frozen):
    model = hetero_child()
    before = model(IDS)
    handle = apply_adapters(model, AdapterConfig(spec=spec, frozen=frozen, rank=4))
    torch.testing.assert_close(model(IDS), before, atol=0, rtol=0)
    frozen_v = handle.config.trains("v") is not True
    for m in handle.modules.values():
        if m.lora_u is not None:
            assert torch.equal(m.lora_u, torch.ones(4))
        if m.lora_v is not None:
            assert torch.equal(m.lora_v, torch.zeros_like(m.lora_v) if not frozen_v else torch.ones_like(m.lora_v))
        assert bool((m.lora_B == 0).all()) == frozen_v  # B starts at zero exactly when v cannot move
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_trainable_counts_match_the_formulas_on_a_heterogeneous_child():
    r = 4
    # adapted modules (C = 32, head dim 8, 4 query heads):
    #   layer 0: q (32x32), k (16x32), v (16x32), o (32x32), gate/up (64x32), down (32x64)
    #   layer 1: linear attention (skipped by default), gate/up (32x32), down (32x32)
    #   layer 2: no attention; gate/up (64x32), down (32x64)
    #   layer 3: q (32x32), k (8x32), v (8x32), o (32x32); linear FFN skipped
    modules = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32),
               (32, 32), (32, 32), (32, 32),
               (32, 64), (32, 64), (64, 32),
               (32, 32), (32, 8), (32, 8), (32, 32)]  # (d_in, d_out)
    lora = sum(r * (i + o) for i, o in modules)
    # tied groups: one (A, B) per (module name, shape)
    groups = {("q", 32, 32), ("k", 32, 16), ("v", 32, 16), ("o", 32, 32), ("gate", 32, 64), ("up", 32, 64),
              ("down", 64, 32), ("gate", 32, 32), ("up", 32, 32), ("down", 32, 32), ("k", 32, 8), ("v", 32, 8)}
    tied_ab = sum(r * (i + o) for _, i, o in groups)
    u_total, v_total = r * len(modules), sum(o for _, o in modules)
    cases = {("BA", "", False): lora, ("BA", "", True): tied_ab, ("BuA", "", True): tied_ab + u_total,
             ("vBA", "", True): tied_ab + v_total, ("vBuA", "", True): tied_ab + u_total + v_total,
             ("vBuA", "AB", True): u_total + v_total, ("vBuA", "", False): lora + u_total + v_total,
             ("vBuA", "A", True): tied_ab - sum(r * i for _, i, _ in groups) + u_total + v_total}
    for (spec, frozen, tied), expected in cases.items():
        m = hetero_child()
        config = AdapterConfig(spec=spec, frozen=frozen, rank=r, tied=tied)
        handle = apply_adapters(m, config)
        assert handle.num_trainable() == expected == expected_trainable_parameters(m, config), (spec, frozen, tied)
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected  # what an optimizer sees
        assert len(handle.modules) == len(modules)
        assert len(handle.groups) == (len(groups) if tied else len(modules))
    # different FFN widths get their own shared pair; linear subblocks are adapted on request
    handle = apply_adapters(hetero_child(), AdapterConfig(spec="vBuA", rank=r, linear_subblocks="adapt"))
    assert {"gate_proj.64x32", "gate_proj.32x32", "linear_attn.32x32", "linear_mlp.32x32"} <= set(handle.groups)
    assert handle.modules["model.layers.0.mlp.gate_proj"].lora_A is handle.modules["model.layers.2.mlp.gate_proj"].lora_A
    assert handle.modules["model.layers.0.mlp.gate_proj"].lora_A is not handle.modules["model.layers.1.mlp.gate_proj"].lora_A


def test_save_stores_shared_factors_once_and_load_restores_the_ties(tmp_path):
    model = hetero_child()
    handle = apply_adapters(model, AdapterConfig(spec="vBuA", rank=4))
    for _ in range(2):
        train_step(model, lr=1.0)
    expected = model(IDS).detach()
    path = save_adapters(handle, tmp_path / "adapters.safetensors")
    first = path.read_bytes()  # the same adapters give the same bytes (stop 76's leftover: the metadata's order
    for _ in range(4):  # followed a hash map's, and changed from save to save)
        assert save_adapters(handle, path).read_bytes() == first
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("A.") for k in keys) == len(handle.groups) == sum(k.startswith("B.") for k in keys)
    assert sum(k.startswith("u.") for k in keys) == len(handle.modules)

    fresh = hetero_child()  # same base weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base it was trained on: nothing to say
        loaded = load_adapters(fresh, path)
    torch.testing.assert_close(fresh(IDS), expected, atol=1e-6, rtol=0)
    up0, up2 = loaded.modules["model.layers.0.mlp.up_proj"], loaded.modules["model.layers.2.mlp.up_proj"]
    assert up0.lora_A is up2.lora_A and up0.lora_B is up2.lora_B
    a_before, u0_before, u2_before = up0.lora_A.detach().clone(), up0.lora_u.detach().clone(), up2.lora_u.detach().clone()
    train_step(fresh, lr=1.0)
    assert not torch.equal(up0.lora_A, a_before)  # the shared A moved ...
    assert torch.equal(up0.lora_A, up2.lora_A)  # ... for both layers at once
    assert not torch.equal(up0.lora_u, u0_before) and not torch.equal(up2.lora_u, u2_before)
    assert not torch.equal(up0.lora_u, up2.lora_u)  # u stays per layer

    other = tiny_parent(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64).model
    with pytest.raises(PuzzleError, match="other modules"):
        load_adapters(other, path)
    assert not any(isinstance(m, AdaptedLinear) for m in other.modules())  # a refused load leaves no wrappers
    tuned = hetero_child()  # the same shapes, other weights (breaker: loaded without a word)
    with torch.no_grad():
        next(tuned.parameters()).add_(0.5)
    with pytest.warns(UserWarning, match="was trained on other base weights than this model's"):
        load_adapters(tuned, path)
    from puzzle.merge import read_state_dict  # its factors do not average into the average of its ΔW (breaker)

    with pytest.raises(PuzzleError, match=r"is a \(Tied-\)LoRA adapter file: its factors do not average"):
        read_state_dict(path)


@pytest.mark.parametrize("spec,frozen,tied", [("vBuA", "", True), ("BA", "", False), ("vBuA", "AB", True)])
def test_merge_gives_plain_weights_with_the_same_logits(spec, frozen, tied):
    model = hetero_child()
    keys = set(model.state_dict())
    handle = apply_adapters(model, AdapterConfig(spec=spec, frozen=frozen, rank=4, tied=tied, linear_subblocks="adapt"))
    for _ in range(3):
        train_step(model)
    adapted = model(IDS).detach()
    assert (adapted - hetero_child()(IDS)).abs().max() > 1e-3  # the adapters changed the model
    with handle.disabled():
        torch.testing.assert_close(model(IDS), hetero_child()(IDS), atol=0, rtol=0)
    merged = handle.merge()
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    assert set(merged.state_dict()) == keys
    torch.testing.assert_close(merged(IDS), adapted, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in merged.parameters())  # base requires_grad restored
    with pytest.raises(PuzzleError, match="already merged"):
        handle.merge()


def test_vera_corner_trains_only_the_scaling_vectors():
    model = hetero_child()
    handle = apply_adapters(model, AdapterConfig(spec="vBuA", frozen="AB", rank=4))
    A, B = next(iter(handle.groups.values()))
    A0, B0 = A.detach().clone(), B.detach().clone()
    v0 = handle.modules["model.layers.0.self_attn.q_proj"].lora_v.detach().clone()
    train_step(model)
    assert torch.equal(A, A0) and torch.equal(B, B0)
    assert not torch.equal(handle.modules["model.layers.0.self_attn.q_proj"].lora_v, v0)


def test_bad_configs_are_refused():
    for spec, frozen in (("A", ""), ("BAA", ""), ("xBA", ""), ("ba", ""), ("BA", "u"), ("BA", "AA"), ("BA", "AB")):
        with pytest.raises(PuzzleError):
            AdapterConfig(spec=spec, frozen=frozen)
    with pytest.raises(PuzzleError, match="B frozen"):
        AdapterConfig(spec="BuA", frozen="B")  # B would stay zero
    with pytest.raises(PuzzleError, match="no linear module"):
        apply_adapters(hetero_child(), AdapterConfig(targets=("nope",)))
    model = hetero_child()  # breaker: rank 100000 on a hidden size of 64 wrote a 409 MB adapters file
    from puzzle.adapters import target_modules

    full = max(min(m.in_features, m.out_features) for _, m in target_modules(model, AdapterConfig()))
    with pytest.raises(PuzzleError, match=f"adapter rank {full + 1} is above .* give --rank {full} or less"):
        apply_adapters(model, AdapterConfig(rank=full + 1))
    narrowest = min(min(m.in_features, m.out_features) for _, m in target_modules(model, AdapterConfig()))
    assert narrowest < full  # the hetero child's k/v maps are narrower: said (stop 76's leftover: silent)
    with pytest.warns(UserWarning, match=rf"adapter rank {full} is above the rank of some adapted maps, min\(in, "
                                         rf"out\): .*give --rank {narrowest} or less to stay within every map"):
        apply_adapters(model, AdapterConfig(rank=full))  # the largest that adds anything is taken
    model = hetero_child()
    apply_adapters(model, AdapterConfig())
    with pytest.raises(PuzzleError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())


def test_untied_lora_matches_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = hetero_child(), hetero_child()
    handle = apply_adapters(ours, AdapterConfig(spec="BA", rank=4, tied=False))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                                                          target_modules=list(handle.config.targets)), theirs)
    peft_params = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    assert sum(p.numel() for p in peft_params.values()) == handle.num_trainable()
    with torch.no_grad():  # same factors -> same function
        for path, m in handle.modules.items():
            m.lora_B.normal_(0, 0.1)
            peft_params[f"{path}.lora_A.default.weight"].copy_(m.lora_A)
            peft_params[f"{path}.lora_B.default.weight"].copy_(m.lora_B)
    torch.testing.assert_close(ours(IDS), theirs(IDS), atol=1e-5, rtol=0)
