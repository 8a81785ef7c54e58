"""Inits, blockwise local distillation and the library on disk, on the tiny parent."""

import json

import pytest
import torch

from puzzle.architecture import AttentionConfig, FFNConfig
from puzzle.bld import BLDConfig, build_library, lr_at, normalized_mse
from puzzle.errors import PuzzleError
from puzzle.init import (attention_subblock, ffn_channel_scores, init_attention, init_ffn, ridge_lstsq)
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
    with pytest.raises(PuzzleError, match="bld differ"):
        lib.check_meta({"parent": "a", "bld": {"lr": 2}})


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
    with pytest.raises(PuzzleError, match="positive"):
        BLDConfig(lr=0)
