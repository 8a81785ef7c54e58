"""Coupled (whole-block) scoring, batched candidates, and scoring sharded across processes."""

import dataclasses
import socket

import pandas as pd
import pytest
import torch

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import PuzzleError
from puzzle.init import compose_block, init_attention, init_ffn
from puzzle.scoring.parallel import Candidate, merge_logs, read_logs, score_sharded, shard
from puzzle.scoring.quality import ResultLog, parent_cache, replace_block_score, replace_one_score, replace_one_scores
from puzzle.tiny import tiny_parent

METRICS = ("kl_nats", "lm_loss", "top1_agree", "cosine")


def _ids():
    return torch.randint(3, 299, (3, 20), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def parent():
    return tiny_parent(seed=0).model


@pytest.fixture(scope="module")
def cache(parent):
    return parent_cache(parent, _ids(), chunk=2, stride=2)


def _layer_state(parent, layer):
    return parent.model.layers[layer].state_dict()


def test_block_scoring_of_the_parent_block_costs_nothing(parent, cache):
    block = compose_block(parent.config, parent.config.blocks[1], 1, _layer_state(parent, 1), _layer_state(parent, 1))
    m = replace_block_score(parent, cache, 1, block, chunk=2)
    assert m["kl_nats"] == pytest.approx(0.0, abs=1e-6) and m["top1_agree"] == 1.0
    assert m["lm_loss"] == pytest.approx(cache.lm_loss, rel=1e-5)


def test_block_with_one_no_op_part_equals_the_subblock_score(parent, cache):
    # a block that keeps the parent's attention and drops the FFN is exactly "ffn replaced by no_op"
    cfg = parent.config
    block = compose_block(cfg, BlockConfig(cfg.blocks[2].attention, FFNConfig("no_op")), 2, _layer_state(parent, 2), None)
    coupled = replace_block_score(parent, cache, 2, block, chunk=2)
    decoupled = replace_one_score(parent, cache, 2, "ffn", None, chunk=2)
    for k in METRICS:
        assert coupled[k] == pytest.approx(decoupled[k], rel=1e-5, abs=1e-6), k
    removed = replace_block_score(parent, cache, 2, None, chunk=2)  # the whole layer removed
    assert removed["kl_nats"] > 0
    with pytest.raises(ValueError, match="subblock"):
        replace_one_score(parent, cache, 2, "mlp", None)


def test_batched_candidates_match_one_at_a_time(parent, cache):
    cfg = parent.config
    layer = parent.model.layers[0]
    subs = [init_attention(cfg, layer, AttentionConfig("gqa", 1), 0), None,
            init_attention(cfg, layer, AttentionConfig("linear"), 0)]
    batched = replace_one_scores(parent, cache, 0, "attention", subs, chunk=2)
    for sub, b in zip(subs, batched):
        single = replace_one_score(parent, cache, 0, "attention", sub, chunk=2)
        for k in METRICS:
            assert b[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6), k
    assert len({round(b["kl_nats"], 6) for b in batched}) == 3  # three different candidates
    # weighted: kl_nats is sum(w * KL) / sum(w) over the scored positions, the other metrics stay plain means
    n, t = cache.ids.shape[0], len(cache.positions)
    ones = replace_one_scores(parent, cache, 0, "attention", subs, chunk=2, weights=torch.full((n, t), 3.0))
    for b, one in zip(batched, ones):
        for k in METRICS:
            assert one[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    first = torch.zeros(n, t)
    first[0] = 1.0  # the first sequence only
    only = replace_one_scores(parent, cache, 0, "attention", subs[:1], chunk=2, weights=first)[0]
    alone = replace_one_score(parent, dataclasses.replace(cache, ids=cache.ids[:1], h=[h[:1] for h in cache.h],
                                                          h_mid=[h[:1] for h in cache.h_mid], logp=cache.logp[:1],
                                                          cos=cache.cos[:1], sin=cache.sin[:1]),
                              0, "attention", subs[0], chunk=2)
    assert only["kl_nats"] == pytest.approx(alone["kl_nats"], rel=1e-5)
    assert only["top1_agree"] == pytest.approx(batched[0]["top1_agree"], rel=1e-6)
    with pytest.raises(ValueError, match=r"weights must be \(N, T'\)"):
        replace_one_score(parent, cache, 0, "attention", None, weights=torch.ones(n, t + 1))


# ------------------------------------------------------------------------------------------------
# Sharding


def _candidates(layers=4):
    out = []
    for layer in range(layers):
        for sub, variant in (("attention", "attn-kv1"), ("attention", "attn-linear"), ("attention", "attn-noop"),
                             ("ffn", "ffn-64"), ("ffn", "ffn-linear"), ("ffn", "ffn-noop")):
            out.append(Candidate(f"{layer}:{sub}:{variant}", layer, sub, variant))
    return out


def test_shards_partition_the_candidates_and_balance_the_work():
    cands = _candidates(layers=6)
    shards = [shard(cands, r, 3, num_layers=6) for r in range(3)]
    keys = [c.key for s in shards for c in s]
    assert sorted(keys) == sorted(c.key for c in cands) and len(keys) == len(set(keys))
    work = [sum(6 - c.layer for c in s) for s in shards]
    assert max(work) - min(work) <= 6  # LPT: within one candidate's cost
    assert shard(cands, 1, 3, num_layers=6) == shards[1]  # deterministic
    with pytest.raises(PuzzleError, match="rank"):
        shard(cands, 3, 3)


def _scorer(parent, cache):
    """candidate -> metrics, building deterministic init-only candidates (no library needed)."""
    cfg = parent.config

    def score(c: Candidate) -> dict:
        layer = parent.model.layers[c.layer]
        if c.variant.endswith("noop"):
            sub = None
        elif c.subblock == "attention":
            sub = init_attention(cfg, layer, AttentionConfig.from_id(c.variant), c.layer)
        else:
            v = FFNConfig.from_id(c.variant)
            width = v.intermediate_size
            sub = init_ffn(cfg, layer, v, c.layer, channels=torch.arange(width) if width else None)
        return replace_one_score(parent, cache, c.layer, c.subblock, sub, chunk=2)

    return score


def test_resume_skips_logged_candidates(parent, cache, tmp_path):
    cands = _candidates(layers=2)
    score = _scorer(parent, cache)
    ResultLog(tmp_path / "quality.rank1.jsonl").append({"key": cands[0].key, "layer": 0, "subblock": "attention",
                                                        "variant": "attn-kv1", **score(cands[0])})
    assert score_sharded(0, 1, cands, score, tmp_path) == len(cands) - 1  # the other rank's result counts
    assert score_sharded(0, 1, cands, score, tmp_path) == 0
    table = merge_logs(tmp_path, cands)
    assert list(table["key"]) == [c.key for c in cands]
    with pytest.raises(PuzzleError, match="no result"):
        merge_logs(tmp_path / "empty", cands)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, log_dir, out_csv):
    import torch.distributed as dist

    from puzzle.scoring.parallel import score_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        parent = tiny_parent(seed=0).model
        cache = parent_cache(parent, _ids(), chunk=2, stride=2)
        table = score_distributed(_candidates(layers=2), _scorer(parent, cache), log_dir, num_layers=4)
        if rank == 0:
            table.to_csv(out_csv, index=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_same_table_as_one(parent, cache, tmp_path):
    import torch.multiprocessing as mp

    cands = _candidates(layers=2)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), str(tmp_path / "two.csv")), nprocs=2, join=True)
    two = pd.read_csv(tmp_path / "two.csv")
    logs = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert logs == ["quality.rank0.jsonl", "quality.rank1.jsonl"]
    assert len(read_logs(tmp_path / "two")) == len(cands)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score_sharded(0, 1, cands, _scorer(parent, cache), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    one = merge_logs(tmp_path / "one", cands)
    assert list(two["key"]) == list(one["key"]) == [c.key for c in cands]
    for k in METRICS:
        torch.testing.assert_close(torch.tensor(two[k].values), torch.tensor(one[k].values), rtol=1e-5, atol=1e-6)
