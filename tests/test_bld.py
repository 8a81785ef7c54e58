"""Inits, blockwise local distillation and the library on disk, on the tiny parent."""

import json
import re

import pytest
import torch

from puzzle.architecture import AttentionConfig, FFNConfig
from puzzle.bld import BLDConfig, build_library, lr_at, normalized_mse
from puzzle.errors import LEARNING_RATE_RANGE, PuzzleError
from puzzle.init import (ffn_channel_scores, init_attention, init_ffn, ridge_lstsq)
from puzzle.library import Library
from puzzle.space import SpaceConfig, build_space
from puzzle.tiny import tiny_parent


@pytest.fixture(scope="module")
def parent():
    return tiny_parent(seed=0).model


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 299, (40, 32), generator=g)


def _rope(model, B, T):
    return model.rope(model.positions((B, T), 0, "cpu"), torch.float32)


def test_normalized_mse_is_one_for_zero_output_and_zero_for_exact():
    t = torch.randn(3, 5, 7)
    assert normalized_mse(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    assert normalized_mse(t.clone(), t).item() == 0.0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = BLDConfig(warmup_fraction=0.2, min_lr_fraction=0.1)
    lrs = [lr_at(s, 10, cfg) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] >= 0.1 and lr_at(10, 10, cfg) == pytest.approx(0.1)


def test_mean_pooling_to_the_same_kv_count_is_the_parent(parent):
    layer = parent.model.layers[1]
    sub = init_attention(parent.config, layer, AttentionConfig("gqa", 2), 1)
    h = torch.randn(2, 9, 64)
    cos, sin = _rope(parent, 2, 9)
    torch.testing.assert_close(sub.attention_delta(h, cos, sin), layer.attention_delta(h, cos, sin))


def test_mean_pooled_kv_heads_average_the_merged_groups(parent):
    layer = parent.model.layers[0]
    sub = init_attention(parent.config, layer, AttentionConfig("gqa", 1), 0)
    k = layer.self_attn.k_proj.weight.view(2, 16, 64)
    torch.testing.assert_close(sub.self_attn.k_proj.weight, k.mean(0))
    torch.testing.assert_close(sub.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)


def test_linear_attention_init_equals_attention_on_a_single_token(parent):
    """With one token, softmax attention returns each head's own value: W_o W_v x exactly."""
    layer = parent.model.layers[2]
    sub = init_attention(parent.config, layer, AttentionConfig("linear"), 2)
    h = torch.randn(3, 1, 64)
    cos, sin = _rope(parent, 3, 1)
    torch.testing.assert_close(sub.attention_delta(h, cos, sin), layer.attention_delta(h, cos, sin), atol=1e-5, rtol=1e-4)


def test_linear_ffn_init_is_down_times_up(parent):
    layer = parent.model.layers[0]
    sub = init_ffn(parent.config, layer, FFNConfig("linear"), 0)
    torch.testing.assert_close(sub.mlp.linear_mlp.weight, layer.mlp.down_proj.weight @ layer.mlp.up_proj.weight)


def test_narrowing_keeps_the_highest_contribution_channels(parent):
    layer = parent.model.layers[1]
    h = torch.randn(4, 16, 64)
    scores = ffn_channel_scores(layer, h)
    sub = init_ffn(parent.config, layer, FFNConfig("swiglu", 32), 1, channel_scores=scores)
    keep = torch.topk(scores, 32).indices.sort().values
    torch.testing.assert_close(sub.mlp.gate_proj.weight, layer.mlp.gate_proj.weight[keep])
    torch.testing.assert_close(sub.mlp.down_proj.weight, layer.mlp.down_proj.weight[:, keep])
    # keeping the best half loses less than keeping the worst half
    out = layer.ffn_delta(h)
    sub_worst = init_ffn(parent.config, layer, FFNConfig("swiglu", 32), 1, channel_scores=-scores)
    assert normalized_mse(sub.ffn_delta(h), out) < normalized_mse(sub_worst.ffn_delta(h), out)
    with pytest.raises(ValueError, match="channel_scores"):
        init_ffn(parent.config, layer, FFNConfig("swiglu", 32), 1)


def test_ridge_lstsq_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    x = torch.randn(400, 7, generator=g)
    torch.testing.assert_close(ridge_lstsq(x, x @ w.T, ridge=1e-9), w, atol=1e-4, rtol=1e-4)


def _space(parent):
    return build_space(parent.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))[:2]


def test_bld_lowers_the_probe_error_and_writes_both_stages(parent, calib, tmp_path):
    lib = Library(tmp_path / "lib")
    result = build_library(parent, calib, _space(parent), BLDConfig(tokens=1024, batch_size=2, lr=1e-3), lib)
    # per layer: kv1, linear attention, ffn-64, linear ffn
    assert result["trained"] == 8 and result["skipped"] == 0
    index = lib.write_index()
    bld = index[index["stage"] == "bld"]
    assert len(bld) == 8 and len(index[index["stage"] == "init"]) == 8
    assert (bld["final_nmse"] < bld["init_nmse"]).all(), bld[["variant", "init_nmse", "final_nmse"]]
    assert (tmp_path / "lib" / "index.csv").is_file()


def test_bld_resumes_and_redoes_a_corrupt_entry(parent, calib, tmp_path):
    lib = Library(tmp_path / "lib")
    cfg = BLDConfig(tokens=128, batch_size=2)
    build_library(parent, calib, _space(parent), cfg, lib)
    before = lib.load(1, "ffn-64", "bld")
    again = build_library(parent, calib, _space(parent), cfg, lib)
    assert again["trained"] == 0 and again["skipped"] == 8
    path = lib.weights_path(1, "ffn-64", "bld")
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash or a bad disk
    with pytest.warns(UserWarning, match="checksum"):
        third = build_library(parent, calib, _space(parent), cfg, lib)
    assert third["trained"] == 1
    after = lib.load(1, "ffn-64", "bld")
    for k in before:  # same seed, same data: the redone entry is identical
        torch.testing.assert_close(after[k], before[k])


def test_library_refuses_other_settings(tmp_path):
    lib = Library(tmp_path)
    lib.check_meta({"parent": "a", "bld": {"lr": 1}})
    lib.check_meta({"parent": "a", "bld": {"lr": 1}})
    lib.check_meta({"parent": "a", "bld": {"lr": 2}})  # nothing built yet: the first call's meta.json is replaced
    assert json.loads((tmp_path / "meta.json").read_text())["bld"] == {"lr": 2}
    with pytest.raises(PuzzleError, match="differing: bld.lr: 2 -> 3"):  # ranks split by hand: no group to check
        lib.check_meta({"parent": "a", "bld": {"lr": 3}}, replace_unbuilt=False)
    lib.save(0, "ffn", "ffn-8", "bld", {"w": torch.zeros(2)}, {})
    with pytest.raises(PuzzleError, match="differing: bld.lr: 2 -> 1"):
        lib.check_meta({"parent": "a", "bld": {"lr": 1}})
    (tmp_path / "meta.json").unlink()  # breaker: entries of other settings were then taken as this call's
    with pytest.raises(PuzzleError, match="meta.json is missing beside the library's entries"):
        lib.check_meta({"parent": "a", "bld": {"lr": 1}})


def test_a_cut_safetensors_file_is_told_from_a_whole_one_by_its_header(tmp_path):
    from safetensors.torch import save_file

    from puzzle.library import safetensors_complete

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(5)}, str(path))
    assert safetensors_complete(path)
    data = path.read_bytes()
    for cut in (data[:-1], data[:100], data[:4], b"", data + b"x"):
        path.write_bytes(cut)
        assert not safetensors_complete(path)
    assert not safetensors_complete(tmp_path / "missing.safetensors")


def test_bld_needs_enough_calibration(parent, tmp_path):
    with pytest.raises(PuzzleError, match="calibration sequences"):
        build_library(parent, torch.zeros(2, 8, dtype=torch.long), _space(parent), BLDConfig(), Library(tmp_path))


def test_bld_shards_by_rank_without_overlap(parent, calib, tmp_path):
    cfg = BLDConfig(tokens=64, batch_size=2)
    a = build_library(parent, calib, _space(parent), cfg, Library(tmp_path), rank=0, world_size=2)
    b = build_library(parent, calib, _space(parent), cfg, Library(tmp_path), rank=1, world_size=2)
    assert a["trained"] + b["trained"] == 8 and a["trained"] == 4
    info = json.loads(Library(tmp_path).info_path(0, "attn-kv1", "bld").read_text())
    assert info["method"] == "adamw" and info["tokens"] == 64


def test_bad_bld_settings_are_refused():
    with pytest.raises(PuzzleError, match="linear_init"):
        BLDConfig(linear_init="magic")
    with pytest.raises(PuzzleError, match=r"bld.lr must be a learning rate in \(0, 1\).*got 0"):
        BLDConfig(lr=0)
    with pytest.raises(PuzzleError, match=r"bld.lr must be a learning rate in \(0, 1\).*got 2"):  # wipes the weights
        BLDConfig(lr=2)


BLD_LR = f"bld.lr must be {LEARNING_RATE_RANGE}"


@pytest.mark.parametrize("setting,value,words", [
    ("tokens", "16k", "bld.tokens (--bld-tokens) must be a whole number >= 1, got '16k'"),
    ("tokens", 0, "bld.tokens (--bld-tokens) must be a whole number >= 1, got 0"),
    ("batch_size", 2.5, "bld.batch_size must be a whole number >= 1, got 2.5"),
    ("probe_sequences", -1, "bld.probe_sequences must be a whole number >= 0, got -1"),
    ("lr", "x", f"{BLD_LR}, got 'x'"),
    ("lr", float("nan"), f"{BLD_LR}, got nan"),
    ("lr", float("inf"), f"{BLD_LR}, got inf"),
    ("warmup_fraction", 2, "bld.warmup_fraction must be a number from 0 to 1, got 2"),
    ("grad_clip", -1, "bld.grad_clip must be a finite number >= 0 (0: no clipping), got -1"),
    ("checkpoint_s", "a", "bld.checkpoint_s must be a number of seconds >= 0, got 'a'"),
    # reviewer: a seed of another kind crashed in torch.manual_seed after the data stage
    ("seed", "3", "bld.seed (--seed) must be a whole number from -2**63, got '3'"),
    ("seed", 1.5, "bld.seed (--seed) must be a whole number from -2**63, got 1.5"),
    ("seed", 2 ** 64, "bld.seed (--seed) must be below 2**63"),
    ("coupled_top_k", 10 ** 6, "bld.coupled_top_k must be at most 64"),  # breaker: minutes of solving, unsaid
    ("coupled_top_k", 1.5, "bld.coupled_top_k must be a whole number >= 0, got 1.5")])
def test_each_bad_bld_setting_in_a_config_file_is_named_with_its_value(setting, value, words):
    """A preset or config.json's [bld] value out of range names its setting and value (was a TypeError's text for a
    string, one message for three settings, and NaN or a fraction of 2 went through)."""
    from puzzle.config import RunConfig

    with pytest.raises(PuzzleError) as e:
        RunConfig.from_dict({"bld": {setting: value}})
    assert words in str(e.value) and "not supported between" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# per-entry learning rates, curves, divergence, inits chosen in the config


def test_lr_scales_pick_the_most_specific_key():
    from puzzle.architecture import BlockConfig
    from puzzle.bld import Job, subblock_lr

    cfg = BLDConfig(lr=0.25, lr_scales={"attn-kv1": 3.0, "gqa": 2.0, "linear": 0.5, "block": 0.25})
    assert subblock_lr(cfg, Job(0, "attention", AttentionConfig("gqa", 1))) == 0.75
    assert subblock_lr(cfg, Job(0, "attention", AttentionConfig("gqa", 2))) == 0.5
    assert subblock_lr(cfg, Job(0, "ffn", FFNConfig("linear"))) == 0.125
    assert subblock_lr(cfg, Job(0, "ffn", FFNConfig("swiglu", 64))) == 0.25
    assert subblock_lr(cfg, Job(0, "block", BlockConfig.from_id("attn-kv1+ffn-64"))) == 0.0625
    # the rate an entry trains at is held below 1 as the base rate is (reviewer: 0.5 x 10 trained at 5)
    with pytest.raises(PuzzleError, match=r"bld.lr 0.5 times bld.lr_scales\['ffn'\] 10 trains at 5, which is not a "
                                          r"learning rate in \(0, 1\)"):
        BLDConfig(lr=0.5, lr_scales={"ffn": 10.0, "gqa": 0.5})
    with pytest.raises(PuzzleError, match=r"bld.lr 0.001 times bld.linear_lr_scale 1000 trains at 1"):
        BLDConfig(lr=1e-3, linear_lr_scale=1000.0)
    with pytest.raises(PuzzleError, match="lr_scales key"):
        BLDConfig(lr_scales={"attention-ish": 1.0})
    with pytest.raises(PuzzleError, match="positive"):
        BLDConfig(lr_scales={"ffn": -1.0})


def test_a_diverging_entry_stops_alone_with_a_message(parent, calib, tmp_path, monkeypatch):
    import puzzle.bld

    lib = Library(tmp_path)
    cfg = BLDConfig(tokens=256, batch_size=2, lr=1e-3)
    real = puzzle.bld.subblock_lr  # a rate past what BLDConfig takes, for ffn-64 alone: its entries diverge
    monkeypatch.setattr(puzzle.bld, "subblock_lr", lambda c, job: 1e27 if job.id == "ffn-64" else real(c, job))
    with pytest.warns(UserWarning, match="non-finite"):
        result = build_library(parent, calib, _space(parent), cfg, lib)
    assert sorted(result["diverged"]) == ["0:ffn-64", "1:ffn-64"] and result["trained"] == 8
    info = lib.info(0, "ffn-64", "bld")
    assert info["status"] == "diverged" and "bld.lr_scales" in info["message"]
    init = lib.load(0, "ffn-64", "init")
    for k, v in lib.load(0, "ffn-64", "bld").items():  # the init weights are kept
        torch.testing.assert_close(v, init[k])
    ok = lib.info(0, "attn-kv1", "bld")
    assert ok["status"] == "ok" and ok["final_nmse"] < ok["init_nmse"]
    assert set(lib.write_index()["status"]) == {"ok", "diverged"}


def test_entries_record_loss_and_probe_curves(parent, calib, tmp_path):
    lib = Library(tmp_path)
    build_library(parent, calib, _space(parent)[:1], BLDConfig(tokens=512, batch_size=2, lr=1e-3, curve_points=5), lib)
    info = lib.info(0, "attn-kv1", "bld")
    tokens = [t for t, _ in info["loss_curve"]]
    assert len(tokens) == 5 and tokens[-1] == 512 and tokens == sorted(tokens)
    probe_tokens = [t for t, _ in info["probe_curve"]]
    assert probe_tokens == [64, 128, 256, 512]  # every doubling of the tokens seen, and the end
    assert info["probe_curve"][-1][1] == pytest.approx(info["final_nmse"])


def test_inits_are_selectable_in_the_config(parent, calib, tmp_path):
    lib = Library(tmp_path)
    cfg = BLDConfig(tokens=128, batch_size=2, ffn_init="iterative", kv_init="top_groups", linear_init="lstsq",
                    init_tokens=256, train=False)
    build_library(parent, calib, _space(parent)[:1], cfg, lib)
    index = lib.index().set_index("variant")
    assert index.loc["attn-kv1", "init"] == "kv_top_groups" and index.loc["ffn-64", "init"] == "ffn_iterative"
    assert index.loc["attn-linear", "init"] == "linear_lstsq"
    plain = Library(tmp_path / "plain")
    build_library(parent, calib, _space(parent)[:1], BLDConfig(tokens=128, batch_size=2, init_tokens=256, train=False), plain)
    plain_index = plain.index().set_index("variant")
    for v in ("ffn-64", "attn-linear"):  # on the calibration data they were chosen on, the stronger inits lose less
        assert index.loc[v, "init_nmse"] <= plain_index.loc[v, "init_nmse"] + 1e-6, v


# ------------------------------------------------------------------------------------------------
# coupled BLD


def test_coupled_blocks_train_from_their_decoupled_entries(parent, calib, tmp_path):
    from puzzle.architecture import BlockConfig
    from puzzle.coupled import block_module, build_coupled_library, realize_child_coupled, replace_block_score
    from puzzle.scoring.quality import parent_cache

    lib = Library(tmp_path)
    cfg = BLDConfig(tokens=256, batch_size=2, lr=1e-3)
    build_library(parent, calib, _space(parent), cfg, lib)
    blocks = {1: [BlockConfig.from_id("attn-kv1+ffn-64"), BlockConfig.from_id("attn-noop+ffn-linear")]}
    result = build_coupled_library(parent, calib, blocks, cfg, lib)
    assert result["trained"] == 2
    info = lib.info(1, "attn-kv1+ffn-64", "bld")
    assert info["subblock"] == "block" and info["init"] == "compose(bld,bld)"
    assert info["final_nmse"] < info["init_nmse"]
    assert not lib.info_path(1, "attn-kv1+ffn-64", "init").exists()  # blocks have no init-only entry
    assert build_coupled_library(parent, calib, blocks, cfg, lib)["trained"] == 0  # resumes
    fewer = BLDConfig(tokens=256, batch_size=2, lr=1e-3, coupled_tokens=128)  # breaker: kept without a word
    with pytest.warns(UserWarning, match="2 coupled block entries were trained on another number of tokens"):
        assert build_coupled_library(parent, calib, blocks, fewer, lib)["trained"] == 2
    assert lib.info(1, "attn-kv1+ffn-64", "bld")["planned_tokens"] < info["planned_tokens"]
    assert build_coupled_library(parent, calib, blocks, fewer, lib)["trained"] == 0  # resumes with the new count
    assert build_coupled_library(parent, calib, blocks, cfg, lib)["trained"] == 2  # and back
    # scoring: the parent's own layer as a "block" changes nothing
    cache = parent_cache(parent, calib[:2, :16], chunk=2)
    same = replace_block_score(parent, cache, 1, parent.model.layers[1], chunk=2)
    assert same["kl_nats"] == pytest.approx(0.0, abs=1e-6) and same["top1_agree"] == 1.0
    trained = replace_block_score(parent, cache, 1, block_module(parent.config, lib, 1, blocks[1][0]), chunk=2)
    assert trained["kl_nats"] > 0
    # a child with that block takes the coupled entry (not the decoupled pair)
    arch = list(parent.config.blocks)
    arch[1] = blocks[1][0]
    child = realize_child_coupled(parent, lib, arch)
    state = lib.load(1, blocks[1][0].id, "bld")
    torch.testing.assert_close(child.model.layers[1].mlp.down_proj.weight, state["mlp.down_proj.weight"])


def test_a_coupled_block_training_made_worse_keeps_its_composed_start(parent, calib, tmp_path):
    """Reviewer: coupled BLD at the decoupled rate left 10 of 14 tiny-preset blocks worse than their start (composed
    from trained parts), and saved them. Blocks now train at BLOCK_LR_SCALE, and a block that ends worse on the
    held-out sequences keeps its start."""
    from puzzle.architecture import BlockConfig
    from puzzle.bld import BLOCK_LR_SCALE, Job, subblock_lr
    from puzzle.coupled import build_coupled_library

    block = BlockConfig.from_id("attn-kv1+ffn-64")
    cfg = BLDConfig(tokens=256, batch_size=2, lr=1e-3)
    assert subblock_lr(cfg, Job(1, "block", block)) == pytest.approx(1e-3 * BLOCK_LR_SCALE)
    assert subblock_lr(BLDConfig(lr=1e-3, lr_scales={"block": 2.0}), Job(1, "block", block)) == pytest.approx(2e-3)
    lib = Library(tmp_path)
    build_library(parent, calib, _space(parent), cfg, lib)
    wild = BLDConfig(tokens=256, batch_size=2, lr=1e-3, lr_scales={"block": 300.0})  # training can only hurt
    with pytest.warns(UserWarning, match="keeps its composed start"):
        build_coupled_library(parent, calib, {1: [block]}, wild, lib)
    info = lib.info(1, block.id, "bld")
    assert info["kept_start"] and info["final_nmse"] == info["init_nmse"]
    state = lib.load(1, block.id, "bld")  # the composed start: the decoupled entries' weights
    torch.testing.assert_close(state["mlp.down_proj.weight"], lib.load(1, "ffn-64", "bld")["mlp.down_proj.weight"])


def _synthetic_table():
    import pandas as pd

    rows = []
    for layer in range(3):
        for sub, variants in (("attention", [("attn-kv2", 0.0, 10.0), ("attn-kv1", 0.1 * (layer + 1), 8.0),
                                             ("attn-noop", 1.0, 0.0)]),
                              ("ffn", [("ffn-128", 0.0, 20.0), ("ffn-64", 0.2, 11.0), ("ffn-noop", 2.0, 0.0)])):
            for k, (v, kl, ms) in enumerate(variants):
                rows.append({"layer": layer, "subblock": sub, "variant": v, "is_parent": k == 0, "kl_nats": kl,
                             "lm_loss": 3.0 + kl, "prefill_ms": ms, "decode_ms": ms / 10, "runtime_ms": ms,
                             "memory_mib": ms, "params": ms * 100})
    rows.append({"layer": -1, "subblock": "non_block", "variant": "non_block", "is_parent": True, "kl_nats": 0.0,
                 "lm_loss": float("nan"), "prefill_ms": 5.0, "decode_ms": 0.5, "runtime_ms": 5.0, "memory_mib": 5.0,
                 "params": 500.0})
    return pd.DataFrame(rows)


def test_narrowing_keeps_the_blocks_of_the_top_solutions_and_block_rows_add_costs():
    import pandas as pd

    from puzzle.budgets import Budgets
    from puzzle.coupled import block_rows, narrow_blocks
    from puzzle.search import solve

    table = _synthetic_table()
    budgets = Budgets(max_runtime_ms=80.0)
    blocks = narrow_blocks(table, [budgets], top_k=3)
    used = {(i, b.id) for sol in solve(table, budgets, num_solutions=3) for i, b in enumerate(sol.blocks)}
    got = {(i, b.id) for i, bs in blocks.items() for b in bs}
    assert got == {(i, b) for i, b in used if b != "attn-kv2+ffn-128" and b != "attn-noop+ffn-noop"} and got
    quality = pd.DataFrame([{"layer": 0, "subblock": "block", "variant": "attn-kv1+ffn-64", "is_parent": False,
                             "kl_nats": 0.25, "lm_loss": 3.2, "top1_agree": 0.9, "cosine": 0.99}])
    costs = table[table["layer"] == 0][["subblock", "variant", "prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params"]]
    row = block_rows(quality, costs).iloc[0]
    assert row["runtime_ms"] == 19.0 and row["params"] == 1900.0 and row["kl_nats"] == 0.25
    # the search takes the block row in place of the pair of rows that builds the same block
    full = pd.concat([table, block_rows(quality, costs)], ignore_index=True)
    best = solve(full, budgets)[0]
    assert best.kl_nats <= solve(table, budgets)[0].kl_nats


# ------------------------------------------------------------------------------------------------
# a parent read layer by layer from safetensors


def test_a_parent_read_layer_by_layer_gives_the_same_library(parent, calib, tmp_path):
    from safetensors.torch import save_file

    from puzzle.offload import SafetensorsParent

    folder = tmp_path / "parent"
    folder.mkdir()
    cfg_hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": parent.config.vocab_size,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "tie_word_embeddings": True, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(cfg_hf))
    state = {k: v.contiguous() for k, v in parent.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    cfg = BLDConfig(tokens=128, batch_size=2, lr=1e-3, layers_per_group=1)
    source = SafetensorsParent(folder)
    lazy = build_library(source, calib, _space(parent), cfg, Library(tmp_path / "lazy"))
    eager = build_library(parent, calib, _space(parent), cfg, Library(tmp_path / "eager"))
    assert lazy["trained"] == eager["trained"] == 8
    per_layer = sum(v.numel() * 4 for k, v in state.items() if k.startswith("model.layers.0."))
    assert lazy["peak_parent_mib"] * 2**20 == per_layer  # one layer's weights at a time
    for layer, variant in ((0, "attn-kv1"), (1, "ffn-64"), (1, "attn-linear")):
        a, b = Library(tmp_path / "lazy").load(layer, variant, "bld"), Library(tmp_path / "eager").load(layer, variant, "bld")
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_a_parent_read_layer_by_layer_reads_the_index_and_refuses_a_changed_file(parent, tmp_path):
    """Reviewer: every *.safetensors was read, so a stale model.safetensors beside indexed shards won (outputs off by
    43); a file replaced during the run was read without a word; a missing shard was named only at its layer."""
    from safetensors.torch import save_file

    from puzzle.errors import PuzzleError
    from puzzle.export import export_checkpoint
    from puzzle.offload import SafetensorsParent
    from puzzle.tiny import tiny_parent

    lm = tiny_parent()
    folder = tmp_path / "parent"
    export_checkpoint(lm.model, lm.tokenizer, folder)
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    save_file({k: v + 1 for k, v in state.items()}, str(folder / "model.safetensors"))  # a stale full checkpoint
    source = SafetensorsParent(folder)
    layer = source.layer(0, "cpu")
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[f"model.layers.0.{k}"]), k
    shard = folder / "model-00001-of-00002.safetensors"
    save_file({k: state[k] + 1 for k in shards[shard.name]}, str(shard))  # replaced during the run
    with pytest.raises(PuzzleError, match="changed while the parent was being read"):
        source.layer(0, "cpu")
    shard.unlink()
    with pytest.raises(PuzzleError, match="lists shards that are missing: model-00001-of-00002.safetensors"):
        SafetensorsParent(folder)


def test_training_forwards_equal_the_models_own(parent):
    """BLD trains through fused forwards (precomputed RMS statistics, one qkv matmul, SDPA grouping the heads)."""
    import dataclasses

    from puzzle.architecture import BlockConfig
    from puzzle.bld import Job, _train_forward, rms_normalize
    from puzzle.modeling import DecoderBlock

    config = dataclasses.replace(parent.config, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    h = torch.randn(2, 9, 64)
    cos, sin = _rope(parent, 2, 9)
    xhat = rms_normalize(h, 1e-5)
    for job in (Job(0, "attention", AttentionConfig("gqa", 1)), Job(0, "attention", AttentionConfig("gqa", 4)),
                Job(0, "attention", AttentionConfig("linear")), Job(0, "ffn", FFNConfig("swiglu", 48)),
                Job(0, "ffn", FFNConfig("linear"))):
        none = AttentionConfig("no_op") if job.kind == "ffn" else FFNConfig("no_op")
        block = BlockConfig(job.variant, none) if job.kind == "attention" else BlockConfig(none, job.variant)
        sub = DecoderBlock(config, block, 0)
        with torch.no_grad():
            for p in sub.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        forward, normed = _train_forward(job)
        assert normed
        want = sub.attention_delta(h, cos, sin) if job.kind == "attention" else sub.ffn_delta(h)
        torch.testing.assert_close(forward(sub, xhat, cos, sin), want, atol=1e-6, rtol=1e-5)


def test_stage_coupled_extends_the_score_table_with_block_rows(tmp_path):
    """The hybrid flow on a tiny run directory: decoupled BLD and scores, then narrowed coupled blocks."""
    from puzzle.config import load_preset
    from puzzle.coupled import realize_child_coupled, stage_coupled
    from puzzle.pipeline import Run, load_score_table, stage_bld, stage_score
    from puzzle.search import solve

    config = load_preset("tiny").replace(bld={"tokens": 256, "coupled_top_k": 2}, score={
        "tokens": 128, "score_init": False, "cost_repeats": 1, "max_contention": float("inf")})  # flaky hunter: a busy
    # machine refused the timing
    run = Run(tmp_path, config, progress=False)
    stage_bld(run)
    stage_score(run)
    table = stage_coupled(run)
    blocks = table[table["subblock"] == "block"]
    assert len(blocks) > 0 and (tmp_path / "score" / "score_table_decoupled.csv").is_file()
    from puzzle.library import meta_digest

    digest = meta_digest(json.loads((tmp_path / "library" / "meta.json").read_text()))
    reread, meta = load_score_table(run, "bld")
    assert meta["coupled_blocks"] == len(blocks) and (reread["subblock"] == "block").sum() == len(blocks)
    for r in blocks.itertuples():  # each block row costs what its two subblocks cost together
        a, f = r.variant.split("+")
        parts = table[(table["layer"] == r.layer) & table["variant"].isin([a, f])]
        assert r.runtime_ms == pytest.approx(parts["runtime_ms"].sum())
        assert run.library.has(r.layer, r.variant, "bld")
        # the library's settings recorded, as every entry's (reviewer: the coupled stage's carried none, so a damaged
        # meta.json could not be written again from them)
        assert run.library.info(int(r.layer), r.variant, "bld")["library_meta_sha"] == digest
    sol = solve(reread, __import__("puzzle.budgets", fromlist=["Budgets"]).Budgets(
        max_runtime_ms=0.8 * float(table[table["is_parent"]]["runtime_ms"].sum())))[0]
    child = realize_child_coupled(run.parent.model, run.library, list(sol.blocks))
    assert child(torch.randint(3, 200, (1, 8))).shape[-1] == run.parent.config.vocab_size
    # every command's builder takes the coupled entry the search chose (breaker: `puzzle realize` built the decoupled
    # pair where the search had predicted the block row), shared across children as one_session holds them
    from puzzle.architecture import BlockConfig
    from puzzle.pipeline import build_child, coupled_blocks
    from puzzle.realize import realize_child

    trained = [r for r in blocks.itertuples()  # a block that kept its composed start is its pair's weights
               if not run.library.info(int(r.layer), r.variant, "bld").get("kept_start")]
    row = trained[0] if trained else next(blocks.itertuples())
    arch = list(run.parent.config.blocks)
    arch[int(row.layer)] = BlockConfig.from_id(row.variant)
    entry = run.library.load(int(row.layer), row.variant, "bld")
    built = build_child(run, {"choice": [b.id for b in arch]})
    coupled = coupled_blocks(run, arch, "bld")
    assert coupled == {(int(row.layer), row.variant)}
    shared = realize_child(run.parent.model, run.library, arch, share=True, entries={}, coupled=coupled)
    for model in (built, shared):
        layer = model.model.layers[int(row.layer)].state_dict()
        assert set(layer) == set(entry) and all(torch.equal(layer[k], entry[k]) for k in entry)
    # a child not chosen on the table (a layer-removal or width baseline, refine's re-scoring) is built from subblocks
    assert coupled_blocks(run, arch, "bld", "attention_removal") == frozenset() == coupled_blocks(run, arch, "init")
    # a record solved on another table than the run's now: its block rows are not the table's (reviewer)
    assert coupled_blocks(run, arch, "bld", record={"table_sha256": "0" * 64}) == frozenset()
    plain = realize_child(run.parent.model, run.library, arch).model.layers[int(row.layer)].state_dict()
    assert not trained or not all(torch.equal(plain[k], entry[k]) for k in entry)
    cols = ["layer", "variant", "runtime_ms", "memory_mib", "params"]
    log = tmp_path / "score" / "quality_blocks.jsonl"  # a score of an entry trained since is scored again (breaker:
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # the old score was kept)
    assert all(r["entry_sha256"] == run.library.recorded_sha256(r["layer"], r["variant"], "bld") for r in lines)
    log.write_text("".join(json.dumps({**r, "kl_nats": 123.0, "entry_sha256": "0" * 64}) + "\n" for r in lines[:1]) +
                   "".join(json.dumps(r) + "\n" for r in lines[1:]))
    for cost in (tmp_path / "score").glob("cost.csv*"):  # the blocks take the table's costs (breaker: a missing
        cost.unlink()  # cost table was timed again, and the block rows got other timings than the decoupled rows)
    again = stage_coupled(run)
    assert 123.0 not in set(again["kl_nats"]) and len(again) == len(table)
    assert not (tmp_path / "score" / "cost.csv").exists() and again[cols].equals(table[cols])
    said = []  # `puzzle score` keeps a block row for every coupled entry (breaker: it dropped them, unsaid)
    run.log = said.append
    stage_score(run)
    keys = ["layer", "subblock", "variant", "kl_nats"]  # (the costs were timed again: cost.csv was deleted above)
    assert load_score_table(run, "bld")[0][keys].equals(again[keys]) and any(
        f"keeps a block row for each of the library's {len(blocks)} coupled entries" in m for m in said)
    from puzzle.coupled import score_blocks  # a block scoring NaN is left out with a word (reviewer: it stopped
    from puzzle.scoring.quality import ResultLog, parent_cache  # `puzzle score`; rebuilding could give NaN again)

    info = run.library.info(int(row.layer), row.variant, "bld")
    run.library.save(int(row.layer), "block", row.variant, "bld",
                     {k: torch.full_like(v, float("nan")) for k, v in entry.items()},
                     {k: v for k, v in info.items() if k not in ("file", "sha256", "params")})
    nan_log = ResultLog(tmp_path / "nan.jsonl")
    with pytest.warns(UserWarning, match=rf"layer {int(row.layer)} block {re.escape(row.variant)} \(bld\) is left "
                                         r"out of the score table: its weights .* overflow: a KL of nan"):
        scored = score_blocks(run.parent.model, run.library, lambda: parent_cache(run.parent.model, run.tokens.score),
                              {int(row.layer): [BlockConfig.from_id(row.variant)]}, log=nan_log)
    assert len(scored) == 0

    def no_pass():
        raise AssertionError("the parent pass ran again")

    with pytest.warns(UserWarning, match=r"is left out of the score table: .* a KL of nan when this entry was scored"):
        assert len(score_blocks(run.parent.model, run.library, no_pass,  # (leftover: it was scored on every call)
                                {int(row.layer): [BlockConfig.from_id(row.variant)]}, log=nan_log)) == 0
    weights = run.library.weights_path(int(row.layer), row.variant, "bld")
    weights.write_bytes(weights.read_bytes()[:-8])  # damaged: refused, not built from its subblocks without a word
    with pytest.raises(PuzzleError, match=rf"coupled library entry of layer {int(row.layer)} {re.escape(row.variant)} "
                                          r"\(bld\) is missing or corrupt: run `puzzle run` .*stage_coupled\(run\)` again"):
        build_child(run, {"choice": [b.id for b in arch]})
    with pytest.warns(UserWarning, match=rf"layer {int(row.layer)} block {re.escape(row.variant)} \(bld\) is left "
                                         r"out of the score table: .*`puzzle run` trains a missing or damaged entry"):
        assert len(score_blocks(run.parent.model, run.library, lambda: parent_cache(run.parent.model,
                                                                                    run.tokens.score),
                                {int(row.layer): [BlockConfig.from_id(row.variant)]})) == 0  # (scoring stopped)


def test_sharding_balances_the_work_and_covers_every_job_once(parent):
    from puzzle.bld import decoupled_jobs, job_cost, shard

    space = build_space(parent.config, SpaceConfig(ffn_fractions=(0.5, 0.25), ffn_multiple=16))
    jobs = decoupled_jobs(space)
    cfg = BLDConfig()
    cost = lambda j: job_cost(parent.config, j, cfg)  # noqa: E731
    parts = [shard(jobs, r, 3, cost) for r in range(3)]
    assert sorted((j.layer, j.id) for p in parts for j in p) == sorted((j.layer, j.id) for j in jobs)
    loads = [sum(cost(j) for j in p) for p in parts]
    assert max(loads) - min(loads) <= max(cost(j) for j in jobs)  # LPT: within one job of each other
    round_robin = [sum(cost(j) for j in shard(jobs, r, 3)) for r in range(3)]
    assert max(loads) <= max(round_robin)


def test_a_killed_writers_temporary_files_in_the_library_are_said_when_removed(tmp_path_factory, tmp_path, capsys):
    """Breaker: bld removed `.<entry>.<8>.tmp` files of a killed writer from the library without a word, while
    the command's own count of removed temporary files named only those elsewhere in the run."""
    from puzzle.cli import main
    from tiny_run import tiny_run_copy

    run_dir, _ = tiny_run_copy(tmp_path_factory, tmp_path / "run")
    left = run_dir / "library" / "entries" / "L001" / ".ffn-32.bld.safetensors.abcd1234.tmp"
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"half")
    assert main(["bld", "--out", str(run_dir), "--no-progress"]) == 0
    assert not left.exists()
    assert "bld: removed 1 temporary file(s) an interrupted command left in" in capsys.readouterr().err
