"""Replace-1-block scoring, whole-model evaluation, and assembling children from a library."""

import warnings

import pytest
import torch

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig
from puzzle.bld import BLDConfig, build_library
from puzzle.init import attention_subblock, ffn_subblock, init_attention
from puzzle.library import Library
from puzzle.realize import realize_child
from puzzle.scoring.quality import (_WARNED_LOGS, ResultLog, context_weights, evaluate_model, parent_cache,
                                    parent_logprobs, replace_one_score, scored_positions)
from puzzle.space import SpaceConfig, build_space
from puzzle.tiny import tiny_parent


@pytest.fixture(scope="module")
def parent():
    return tiny_parent(seed=0).model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 299, (4, 24), generator=torch.Generator().manual_seed(2))


def _copy_of_parent_subblock(parent, layer, subblock):
    block = parent.config.blocks[layer]
    if subblock == "attention":
        sub = attention_subblock(parent.config, block.attention, layer)
        prefixes = ("input_layernorm.", "self_attn.")
    else:
        sub = ffn_subblock(parent.config, block.ffn, layer)
        prefixes = ("post_attention_layernorm.", "mlp.")
    state = {k: v for k, v in parent.model.layers[layer].state_dict().items() if k.startswith(prefixes)}
    sub.load_state_dict(state)
    return sub


@pytest.mark.parametrize("stride", [1, 3])
def test_replacing_a_subblock_by_itself_costs_nothing(parent, ids, stride):
    cache = parent_cache(parent, ids, chunk=3, stride=stride)
    for layer, subblock in [(0, "attention"), (2, "ffn"), (3, "attention")]:
        m = replace_one_score(parent, cache, layer, subblock, _copy_of_parent_subblock(parent, layer, subblock), chunk=3)
        assert m["kl_nats"] == pytest.approx(0.0, abs=1e-6)
        assert m["top1_agree"] == 1.0 and m["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert m["lm_loss"] == pytest.approx(cache.lm_loss, rel=1e-5)


def test_cache_matches_a_plain_forward(parent, ids):
    cache = parent_cache(parent, ids, chunk=3, stride=5)
    assert cache.positions.tolist() == scored_positions(24, 5).tolist() == [3, 8, 13, 18, 23]
    logp = torch.log_softmax(parent(ids), -1)[:, cache.positions]
    torch.testing.assert_close(cache.logp, logp, atol=1e-5, rtol=1e-5)


def test_removing_a_subblock_scores_worse_than_keeping_it(parent, ids):
    cache = parent_cache(parent, ids)
    removed = replace_one_score(parent, cache, 1, "ffn", None)
    mean_pooled = replace_one_score(parent, cache, 1, "attention",
                                    init_attention(parent.config, parent.model.layers[1], AttentionConfig("gqa", 1), 1))
    assert removed["kl_nats"] > 0 and mean_pooled["kl_nats"] > 0


def test_evaluate_model_kl_is_zero_for_the_parent(parent, ids):
    logp = parent_logprobs(parent, ids, chunk=3)
    m = evaluate_model(parent, ids, logp, chunk=3)
    assert m["kl_nats"] == pytest.approx(0.0, abs=1e-6) and m["top1_agree"] == 1.0
    assert m["lm_loss"] == pytest.approx(evaluate_model(parent, ids)["lm_loss"], rel=1e-6)


def test_context_weights_are_the_parents_kl_between_whole_prefix_and_window(parent, ids):
    logp = parent_logprobs(parent, ids, chunk=3)
    w = context_weights(parent, ids, logp, window=5, chunk=7)  # chunks that do not divide the windows
    assert w.shape == ids.shape and (w[:, :5] == 0).all() and (w[:, 5:] > 0).all()
    for n, t in ((0, 5), (2, 13), (3, 23)):  # a window alone, by hand: positions 0.. again, as the weights run it
        with torch.no_grad():
            logq = torch.log_softmax(parent(ids[n:n + 1, t - 4:t + 1])[0, -1].float(), -1)
        want = (logp[n, t].exp() * (logp[n, t] - logq)).sum()
        assert float(w[n, t]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert (context_weights(parent, ids, logp, window=24) == 0).all()  # no prefix longer than the window
    with pytest.raises(ValueError, match="window"):
        context_weights(parent, ids, logp, window=0)
    with pytest.raises(ValueError, match="does not match"):
        context_weights(parent, ids[:2], logp, window=5)


def test_weighted_kl_is_the_weighted_mean_of_per_position_kl(parent, ids):
    logp = parent_logprobs(parent, ids, chunk=3)
    child = realize_child(parent, None, [BlockConfig(AttentionConfig("no_op"), b.ffn) if i == 1 else b
                                         for i, b in enumerate(parent.config.blocks)])
    with torch.no_grad():
        logq = torch.log_softmax(child(ids).float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (N, T)
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3))
    got = evaluate_model(child, ids, logp, chunk=3, weights=w)
    assert got["kl_nats"] == pytest.approx(float((w * kl).sum() / w.sum()), rel=1e-5)
    assert evaluate_model(child, ids, logp, chunk=3, weights=torch.ones(ids.shape))["kl_nats"] == \
        pytest.approx(evaluate_model(child, ids, logp, chunk=3)["kl_nats"], rel=1e-6)
    with pytest.raises(ValueError, match="weights"):
        evaluate_model(child, ids, logp, weights=w[:2])


def test_realize_an_all_parent_child_is_the_parent(parent, ids):
    child = realize_child(parent, None, parent.config.blocks)
    torch.testing.assert_close(child(ids), parent(ids))
    assert child.lm_head.weight is child.model.embed_tokens.weight


def test_realize_loads_library_weights_and_no_ops(parent, tmp_path):
    lib = Library(tmp_path)
    space = build_space(parent.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))
    build_library(parent, torch.randint(3, 299, (6, 16)), space[:2], BLDConfig(tokens=32, batch_size=2, probe_sequences=1), lib)
    blocks = [BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 64)),
              BlockConfig(AttentionConfig("no_op"), FFNConfig("linear"))] + list(parent.config.blocks[2:])
    for stage in ("init", "bld"):
        child = realize_child(parent, lib, blocks, stage)
        sd = child.state_dict()
        entry = lib.load(0, "attn-kv1", stage)
        torch.testing.assert_close(sd["model.layers.0.self_attn.k_proj.weight"], entry["self_attn.k_proj.weight"])
        assert "model.layers.1.input_layernorm.weight" not in sd
        torch.testing.assert_close(sd["model.layers.1.mlp.linear_mlp.weight"], lib.load(1, "ffn-linear", stage)["mlp.linear_mlp.weight"])
        torch.testing.assert_close(sd["model.layers.3.mlp.up_proj.weight"], parent.state_dict()["model.layers.3.mlp.up_proj.weight"])
    assert child.num_parameters() < parent.num_parameters()


def test_result_log_survives_a_torn_line(tmp_path):
    log = ResultLog(tmp_path / "q.jsonl")
    log.append({"key": "a", "v": 1})
    with open(tmp_path / "q.jsonl", "a") as f:
        f.write('{"key": "b", "v"')  # killed mid-write
    log.append({"key": "c", "v": 3})
    assert sorted(log.read()) == ["a", "c"]
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 2  # the torn line was cut off, not kept mid-file


def test_result_log_names_damaged_lines(tmp_path):
    """A damaged line other than a torn last one is skipped with a warning naming the file and the line."""
    path = tmp_path / "q.jsonl"
    log = ResultLog(path)
    log.append({"key": "a", "v": 1})
    with open(path, "a") as f:
        f.write('{"key": "b", "v"\n[1, 2]\n{"no_key": 1}\n')
    log.append({"key": "c", "v": 3})
    with pytest.warns(UserWarning, match=r"q\.jsonl: lines 2, 3, 4 are not a logged result"):
        assert sorted(log.read()) == ["a", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: refine reads its memo once per child
        assert sorted(log.read()) == ["a", "c"]
    with open(path, "a") as f:
        f.write('{"key": "d", "v": 4}')  # a whole line without its newline (reviewer: the next append cut it off)
    log.append({"key": "e", "v": 5})
    path.write_text(path.read_text() + "{broken}\n")  # a complete damaged last line is news too
    with pytest.warns(UserWarning, match=r"lines 2, 3, 4, 8 are not a logged result"):
        assert sorted(log.read()) == ["a", "c", "d", "e"]
    # set aside by the log's one writer (`puzzle score`, run lock held): kept in .skipped, and not warned of again
    with open(path, "ab") as f:
        f.write(b'{"key": "f", "v": 6}\n\xff\xfe not text\n{"key": "g", "v"')  # and a torn last line
    with pytest.warns(UserWarning):
        before = log.read()
    aside = log.set_aside_skipped()
    assert aside == tmp_path / "q.jsonl.skipped"
    assert aside.read_bytes() == b'{"key": "b", "v"\n[1, 2]\n{"no_key": 1}\n{broken}\n\xff\xfe not text\n'
    assert path.read_bytes().endswith(b'{"key": "f", "v": 6}\n{"key": "g", "v"')  # the torn line is append's
    _WARNED_LOGS.clear()  # as in a new process: it finds nothing to warn of
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert log.read() == before
    assert log.set_aside_skipped() is None
    log.append({"key": "h", "v": 8})
    assert sorted(log.read()) == ["a", "c", "d", "e", "f", "h"]
