"""Non-additive quality: in-context replace-1 scores, k diverse solutions chosen by realized KL, refinement."""

import argparse
import dataclasses
import json
import math
import re

import pandas as pd
import pytest
import torch

from puzzle.architecture import BlockConfig
from puzzle.budgets import Budgets
from puzzle.errors import PuzzleError
from puzzle.refine import (add_refine_parser, context_table, diverse_candidates, improve_child, lift_negative_kl,
                           realize_blocks, record_for, refine, refine_main, selection_kl)
from tiny_run import assert_refuses, load_benchmark, tiny_run_copy, tiny_run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from puzzle.baselines import open_run

    return open_run(tiny_run_dir(tmp_path_factory), progress=False)


@pytest.fixture(scope="module")
def table(run):
    from puzzle.pipeline import load_score_table

    return load_score_table(run, "bld")[0]


def _child(run):
    from puzzle.pipeline import read_architecture

    record = read_architecture(run, "child-1.5x")
    return tuple(BlockConfig.from_id(b) for b in record["choice"]), Budgets.from_dict(record["budgets"])


def _swapped_back(run, blocks, ctx) -> tuple[float, list]:
    """The first subblock the child `blocks` changed (which one depends on the tiny run's measured costs): its
    in-context delta for the parent's variant in `ctx` (context_kl_nats), and the child with it swapped back."""
    parent = run.parent.config.blocks
    layer, subblock = next((i, sub) for i, b in enumerate(blocks) for sub in ("attention", "ffn")
                           if getattr(b, sub) != getattr(parent[i], sub))
    row = ctx[(ctx["layer"] == layer) & (ctx["subblock"] == subblock)
              & (ctx["variant"] == getattr(parent[layer], subblock).id)]
    swapped = list(blocks)
    swapped[layer] = dataclasses.replace(blocks[layer], **{subblock: getattr(parent[layer], subblock)})
    return float(row["context_kl_nats"].iloc[0]), swapped


def test_in_the_parent_context_the_scores_are_the_replace_one_scores(run, table):
    ctx, base = context_table(run, run.parent.config.blocks, table)
    assert abs(base) < 1e-6
    body = table["subblock"].isin(["attention", "ffn"]) & ~table["is_parent"].astype(bool)
    torch.testing.assert_close(torch.tensor(ctx.loc[body, "context_kl_nats"].to_numpy()),
                               torch.tensor(table.loc[body, "kl_nats"].to_numpy()), atol=2e-6, rtol=1e-4)
    assert (ctx.loc[~body & (table["subblock"] != "non_block"), "kl_nats"] == 0).all()
    pd.testing.assert_series_equal(ctx["runtime_ms"], table["runtime_ms"])  # costs untouched


def test_realized_kls_and_in_context_tables_are_kept_for_a_rerun(table, tmp_path_factory, tmp_path, monkeypatch):
    """Breaker: an interrupted `puzzle refine` kept nothing of minutes of realizing and re-scoring. Each child's
    selection KL and each in-context table is kept in DIR/refine/memo.jsonl by what it depends on, and taken up
    again; another library (its index), scoring split or select_context computes anew."""
    from puzzle import refine as refine_mod
    from puzzle.baselines import open_run
    from puzzle.refine import MEMO_FILE, candidate_kl

    copy = open_run(tiny_run_copy(tmp_path_factory, tmp_path / "run")[0], progress=False)
    (copy.out / "refine" / MEMO_FILE).unlink(missing_ok=True)  # what tests on the shared tiny run kept there
    blocks, _ = _child(copy)
    kl, (ctx, base) = candidate_kl(copy, blocks), context_table(copy, blocks, table)
    assert len((copy.out / "refine" / MEMO_FILE).read_text().splitlines()) == 2
    built = []
    realize = refine_mod.realize_blocks
    monkeypatch.setattr(refine_mod, "realize_blocks", lambda *a, **k: built.append(a) or realize(*a, **k))
    assert candidate_kl(copy, [b.id for b in blocks]) == kl and not built
    again, base_again = context_table(copy, blocks, table)
    assert base_again == base and not built
    pd.testing.assert_frame_equal(again, ctx)
    assert len(refine_mod.MEMO_HITS.pop(str(copy.out))) == 2  # what `refine_main` says it took up
    index = copy.library.root / "index.csv"  # a library entry rebuilt: its index records another sha256
    index.write_text(index.read_text() + "\n")
    assert candidate_kl(copy, blocks) == pytest.approx(kl) and len(built) == 1
    copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(copy.config.score, select_context=4))
    assert candidate_kl(copy, blocks) != kl and len(built) == 2


def test_with_select_context_the_in_context_scores_are_weighted_as_selection_kl(table, tmp_path_factory, tmp_path):
    """score.select_context N > 0: the child's KL and every in-context delta are means weighted by the parent's
    context weights at the scored positions (the selection weights' first rows, from their file), as the
    refinement's acceptance by `selection_kl` weighs them; ids that are not the selection's have their own file."""
    from puzzle.baselines import open_run
    from puzzle.refine import context_table_weights
    from puzzle.scoring.quality import (context_weights, next_token_targets, parent_cache, parent_logprobs,
                                        scored_positions, token_metrics)

    copy = open_run(tiny_run_copy(tmp_path_factory, tmp_path / "run")[0], progress=False)
    window, stride = 4, 2
    copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(
        copy.config.score, select_context=window, position_stride=stride))
    blocks, _ = _child(copy)
    ctx, base = context_table(copy, blocks, table)
    assert (copy.out / "score" / f"context_weights-{window}.pt").is_file()  # the selection ids' weights
    delta, swapped = _swapped_back(copy, blocks, ctx)
    ids = copy.tokens.score[:max(1, copy.config.score.tokens // copy.tokens.score.shape[1])]
    pos = scored_positions(ids.shape[1], stride)
    weights = context_weights(copy.parent.model, ids, parent_logprobs(copy.parent.model, ids), window=window)[:, pos]
    ref = parent_cache(copy.parent.model, ids, stride=stride)
    targets = next_token_targets(ids)[:, pos]

    def weighted_kl(blocks_, plain: bool = False) -> float:
        with torch.no_grad():
            m = token_metrics(realize_blocks(copy, blocks_)(ids)[:, pos], ref.logp, targets, None if plain else weights)
        return m["kl_nats"] / (m["tokens"] if plain else float(weights.sum()))

    assert base == pytest.approx(weighted_kl(blocks), rel=1e-4)
    assert base + delta == pytest.approx(weighted_kl(swapped), rel=1e-4, abs=1e-7)
    assert base != pytest.approx(weighted_kl(blocks, plain=True), rel=1e-3)  # the weights change the child's KL
    other = copy.tokens.score[1:3]  # not the selection's first sequences: weighed on their own, in their own file
    torch.testing.assert_close(context_table_weights(copy, other, pos), context_weights(
        copy.parent.model, other, parent_logprobs(copy.parent.model, other), window=window)[:, pos])
    assert (copy.out / "score" / f"context_table_weights-{window}.pt").is_file()


def test_in_context_delta_is_the_realized_kl_of_the_swapped_child(run, table):
    from puzzle.refine import realize_blocks
    from puzzle.scoring.quality import next_token_targets, parent_cache, scored_positions, token_metrics

    blocks, _ = _child(run)
    ctx, base = context_table(run, blocks, table)
    delta, swapped = _swapped_back(run, blocks, ctx)
    cfg = run.config.score
    ids = run.tokens.score[:max(1, cfg.tokens // run.tokens.score.shape[1])]
    pos = scored_positions(ids.shape[1], cfg.position_stride)
    ref = parent_cache(run.parent.model, ids, stride=cfg.position_stride)
    with torch.no_grad():
        m = token_metrics(realize_blocks(run, swapped)(ids)[:, pos], ref.logp, next_token_targets(ids)[:, pos])
    assert base + delta == pytest.approx(m["kl_nats"] / m["tokens"], rel=1e-4, abs=1e-7)
    coupled = pd.concat([table, table.head(1).assign(subblock="block", variant=blocks[0].id)], ignore_index=True)
    with pytest.raises(PuzzleError, match="decoupled"):
        context_table(run, blocks, coupled)


def test_diverse_candidates_start_with_the_plain_choice_and_keep_the_best_realized(run, table):
    from puzzle.search import solve

    _, budgets = _child(run)
    df = diverse_candidates(run, table, budgets, k=3, min_layers_differ=1, tokens=128)
    assert len(df) == 3 and df.loc[0, "choice"] == solve(table, budgets)[0].choice
    assert df.attrs["best"] == int(df["score_kl_nats"].idxmin())
    assert (df["predicted_kl_nats"].diff().dropna() >= -1e-12).all()  # the MIP's order


def test_seeds_are_greedys_child_and_the_fewest_layers_removed_by_block_influence(run, table):
    from puzzle.baselines import NOOP_BLOCK, block_influence
    from puzzle.refine import _table_totals, seed_choices
    from puzzle.search import build_choices, greedy

    _, budgets = _child(run)
    seeds = seed_choices(run, table, budgets)
    assert list(seeds) == ["greedy", "layer_removal", "no_linear_attention"]  # the last: its own test below
    assert seeds["greedy"] == greedy(table, budgets).choice
    removed = [i for i, b in enumerate(seeds["layer_removal"]) if b == NOOP_BLOCK.id]
    kept = [b for i, b in enumerate(seeds["layer_removal"]) if i not in removed]
    assert removed and kept == [b.id for i, b in enumerate(run.parent.config.blocks) if i not in removed]
    calib = run.tokens.calib
    influence = block_influence(run.parent.model, calib[:max(1, min(calib.shape[0], 4096 // calib.shape[1]))],
                                chunk=run.config.score.chunk)
    order = influence.sort_values("layer_bi", kind="stable")["layer"].tolist()
    assert sorted(removed) == sorted(order[:len(removed)])  # the lowest block influence first
    assert budgets.met_by(_table_totals(build_choices(table), seeds["layer_removal"]))
    fewer = [NOOP_BLOCK.id if i in order[:len(removed) - 1] else b.id for i, b in enumerate(run.parent.config.blocks)]
    assert not budgets.met_by(_table_totals(build_choices(table), fewer))  # the fewest removals that fit
    assert list(seed_choices(run, table, budgets, methods=["layer_removal"])) == ["layer_removal"]
    assert seed_choices(run, table, budgets, methods=[]) == {}


def test_the_no_linear_attention_seed_is_the_mips_child_without_linear_attention(run, table):
    """The seed is the MIP's own child with linear attention also left out: none when the table has none or the
    run leaves it out already (the MIP's child), none when no child without it meets the budgets."""
    from puzzle.refine import seed_choices
    from puzzle.search import InfeasibleBudget, solve

    _, budgets = _child(run)
    assert (table["variant"] == "attn-linear").any()  # the tiny space has linear attention to leave out
    seeds = seed_choices(run, table, budgets, methods=["no_linear_attention", "greedy"])
    assert list(seeds) == ["greedy", "no_linear_attention"]  # SEED_METHODS order, whatever the order asked
    seed = seeds["no_linear_attention"]
    assert seed == solve(table, budgets, exclude=["attn-linear"])[0].choice
    assert not any(BlockConfig.from_id(b).attention.kind == "linear" for b in seed)
    ffn_out = seed_choices(run, table, budgets, methods=["no_linear_attention"], exclude=["ffn-linear"])
    assert ffn_out["no_linear_attention"] == solve(table, budgets, exclude=["ffn-linear", "attn-linear"])[0].choice
    assert seed_choices(run, table, budgets, methods=["no_linear_attention"], exclude=["attn-linear"]) == {}
    no_linear = table[table["variant"] != "attn-linear"]
    assert seed_choices(run, no_linear, budgets, methods=["no_linear_attention"]) == {}
    unreachable = Budgets(max_runtime_ms=1e-6)
    with pytest.raises(InfeasibleBudget):
        solve(table, unreachable, exclude=["attn-linear"])
    assert seed_choices(run, table, unreachable, methods=["no_linear_attention"]) == {}  # no seed, no error


def test_with_vllm_compatible_the_layer_removal_seed_keeps_layer_0(run, table, monkeypatch):
    """vLLM serves no layer 0 without attention (`mip.vllm_unservable`): with layer 0 the least influential, the seed
    removes it only without --vllm-compatible, and diverse_candidates drops a given seed vLLM cannot serve."""
    import puzzle.baselines
    from puzzle.baselines import NOOP_BLOCK
    from puzzle.refine import seed_choices

    _, budgets = _child(run)
    layers = run.parent.config.num_hidden_layers
    monkeypatch.setattr(puzzle.baselines, "block_influence", lambda *a, **k: pd.DataFrame(
        {"layer": range(layers), "layer_bi": [float(i) for i in range(layers)]}))  # layer 0 lowest
    free = seed_choices(run, table, budgets, methods=["layer_removal"])["layer_removal"]
    served = seed_choices(run, table, budgets, methods=["layer_removal"], vllm_compatible=True)["layer_removal"]
    assert free[0] == NOOP_BLOCK.id and served[0] != NOOP_BLOCK.id
    df = diverse_candidates(run, table, budgets, k=1, tokens=128, vllm_compatible=True,
                            seeds={"layer_removal": free, "served": served})
    assert list(df["source"]) == ["mip", "served"]


def test_diverse_candidates_add_the_seeds_that_fit_and_are_new(run, table):
    from puzzle.refine import seed_choices
    from puzzle.search import solve

    _, budgets = _child(run)
    seeds = seed_choices(run, table, budgets)
    plain = diverse_candidates(run, table, budgets, k=2, min_layers_differ=1, tokens=128)
    # the MIP's third child fits and is new whatever the timings made of the seed methods' children (greedy's is the
    # MIP's own on some tables)
    third = solve(table, budgets, run.config.search.objective, num_solutions=3, min_layers_differ=1)
    assert len(third) == 3
    seeds["third"] = tuple(b.id for b in third[2].blocks)
    too_slow = tuple(b.id for b in run.parent.config.blocks)  # the parent breaks the runtime budget
    unknown = ("attn-nosuch+ffn-nosuch",) * len(too_slow)
    df = diverse_candidates(run, table, budgets, k=2, min_layers_differ=1, tokens=128,
                            seeds={**seeds, "again": plain.loc[0, "choice"], "parent": too_slow, "unknown": unknown})
    mip = df[df["source"] == "mip"]
    assert list(mip["choice"]) == list(plain["choice"]) and list(mip["rank"]) == [0, 1]
    added = df[df["source"] != "mip"]
    new, seen = [], set(plain["choice"])  # each new choice once, by the first seed that gives it
    for method, choice in seeds.items():
        if choice not in seen:
            new.append(method)
            seen.add(choice)
    assert new and list(added["source"]) == new  # the MIP's own choice, the parent and unknown blocks are left out
    for row in added.itertuples():
        assert row.choice == seeds[row.source]
        realized = selection_kl(run, realize_blocks(run, [BlockConfig.from_id(b) for b in row.choice]), 128)
        assert row.score_kl_nats == pytest.approx(realized, rel=1e-6)
        assert row.predicted_kl_nats == pytest.approx(record_for(run, "x", row.choice, "bld", budgets, "t")["kl_nats"])
    assert df.attrs["best"] == int(df["score_kl_nats"].idxmin())


def test_a_finished_refinement_is_redone_for_other_seeds_and_continues_with_its_own(run, tmp_path, capsys):
    import json
    import shutil

    from puzzle.baselines import open_run

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    settings = dict(k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128)
    log = copy.out / "refine" / "child-1.5x.csv"
    capsys.readouterr()
    improve_child(copy, "child-1.5x", **settings)
    diverse = pd.read_csv(log).query("step == 'diverse'")
    assert set(diverse["source"]) - {"mip"}  # a seed was realized (one the MIP also picked is not added twice)
    said = capsys.readouterr().err  # fresh user: a seed the MIP also picked went unsaid
    for method in {"greedy", "layer_removal"} - set(diverse["source"]):
        assert re.search(f"the {method} seed is the MIP's solution of rank \\d, realized once|no {method} child", said)
    kept = diverse.loc[diverse["score_kl_nats"].idxmin()]
    record = json.loads((copy.out / "search" / "child-1.5x-diverse.json").read_text())
    assert record["picked_from"] == kept["source"] and " ".join(record["choice"]) == kept["choice"]
    capsys.readouterr()
    improve_child(copy, "child-1.5x", **settings, seeds=[])  # other seeds: not the finished one
    assert "already refined" not in capsys.readouterr().err
    assert set(pd.read_csv(log).query("step == 'diverse'")["source"]) == {"mip"}
    path = copy.out / "refine" / "child-1.5x.inputs.json"
    inputs = json.loads(path.read_text())
    assert inputs["settings"]["seeds"] == []
    del inputs["settings"]["seeds"]  # as a version before seeds wrote it: made without them
    path.write_text(json.dumps(inputs))
    capsys.readouterr()
    improve_child(copy, "child-1.5x", **settings, seeds=[])
    assert "already refined" in capsys.readouterr().err
    capsys.readouterr()
    improve_child(copy, "child-1.5x", **{**settings, "k": 3}, resume=True)  # keeps the diverse step and its seeds
    said = capsys.readouterr().err  # and says that this call's other k and seeds had no effect
    assert "keeps the diverse step, made with k=2, seeds=none" in said
    assert "k=3, seeds=greedy,layer_removal,no_linear_attention is not used" in said
    inputs = json.loads((copy.out / "refine" / "child-1.5x.inputs.json").read_text())
    assert inputs["settings"]["seeds"] == [] and inputs["settings"]["k"] == 2 and inputs["rounds"] == 2
    improve_child(copy, "child-1.5x", **settings, seeds=[], resume=True)  # the kept settings: nothing to say
    assert "is not used" not in capsys.readouterr().err
    improve_child(copy, "child-1.5x", **{**settings, "max_rounds": 3}, seeds=[])
    assert "already refined" in capsys.readouterr().err
    improve_child(copy, "child-1.5x", **{**settings, "k": 3}, resume=True, given=("k",))  # breaker: the default
    said = capsys.readouterr().err  # seeds were named as this call's where only --k was given
    assert "made with k=2; this call's k=3 is not used" in said and "seeds=" not in said


def test_a_refinement_killed_after_its_candidates_keeps_them(run, tmp_path, capsys, monkeypatch):
    """Breaker: killed between DIR/refine/<name>.csv and <name>.summary.csv (evaluating the steps' children), the
    rerun realized and scored every diverse and refined candidate again."""
    import json
    import shutil

    import puzzle.refine as refine_module
    from puzzle.baselines import open_run

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    settings = dict(k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128, seeds=[])
    step_row = refine_module._step_row

    def fails(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine_module, "_step_row", fails)
    with pytest.raises(KeyboardInterrupt):
        improve_child(copy, "child-1.5x", **settings)
    folder = copy.out / "refine"
    assert (folder / "child-1.5x.csv").is_file() and not (folder / "child-1.5x.summary.csv").exists()
    chosen = json.loads((folder / "child-1.5x.pending.json").read_text())["records"]
    monkeypatch.setattr(refine_module, "_step_row", step_row)
    for searcher in ("diverse_candidates", "refine", "seed_choices"):  # the rerun must not search again
        monkeypatch.setattr(refine_module, searcher, fails)
    capsys.readouterr()
    df = improve_child(copy, "child-1.5x", **settings)
    assert "the candidates of an interrupted call with these settings are kept" in capsys.readouterr().err
    assert list(df["step"]) == ["plain", "diverse", "refined"] and not (folder / "child-1.5x.pending.json").exists()
    for step in ("diverse", "refined"):
        assert json.loads((copy.out / "search" / f"child-1.5x-{step}.json").read_text()) == chosen[step]
    improve_child(copy, "child-1.5x", **settings)
    assert "already refined" in capsys.readouterr().err


def test_refinement_stays_in_its_trust_region_meets_the_budget_and_only_accepts_gains(run, table):
    blocks, budgets = _child(run)
    history = refine(run, table, budgets, blocks, k=2, max_changes=1, max_rounds=2, tokens=256)
    assert history.loc[0, "round"] == 0 and (history.loc[1:, "changed_layers"] <= 1).all()
    accepted = history[history["accepted"]]["score_kl_nats"].tolist()
    assert all(b < a for a, b in zip(accepted, accepted[1:]))
    final = record_for(run, "x", history.attrs["best"], "bld", budgets, "test")
    assert final["runtime_ms"] <= budgets.max_runtime_ms * (1 + 1e-9)
    # a candidate's prediction is the start's realized KL (the same tokens) plus its in-context change, which the
    # in-context table measures on its own, fewer tokens (128 here)
    ctx, table_kl = context_table(run, blocks, table)
    assert table_kl != pytest.approx(history.loc[0, "score_kl_nats"], rel=1e-3)
    delta = ctx.set_index(["layer", "subblock", "variant"])["context_kl_nats"]
    assert (history["round"] == 1).any()
    for row in history[history["round"] == 1].itertuples():
        change = sum(delta[(i, part, getattr(BlockConfig.from_id(b), part).id)]
                     for i, (a, b) in enumerate(zip(blocks, row.choice)) if a.id != b
                     for part in ("attention", "ffn"))
        assert row.predicted_kl_nats == pytest.approx(history.loc[0, "score_kl_nats"] + change, abs=1e-6)


def test_a_negative_in_context_kl_is_solved_not_refused(run, table):
    """In a child's context a subblock can beat the parent's (a negative kl_nats); the refinement's
    re-solve lifts each group to a minimum of 0 and finds the same optimum as a global shift."""
    from puzzle.search import solve

    blocks, budgets = _child(run)
    ctx, _ = context_table(run, blocks, table)
    body = ctx["subblock"].isin(["attention", "ffn"])
    cheap = ctx[body & ~ctx["is_parent"].astype(bool)].sort_values("runtime_ms").index[0]
    raw = ctx.copy()
    raw.loc[cheap, "kl_nats"] = -0.3  # this cheap subblock now helps the child
    with pytest.raises(PuzzleError, match="negative KL"):
        solve(raw, budgets, "kl_nats")
    lifted = lift_negative_kl(raw)
    assert lifted.loc[cheap, "kl_nats"] == 0.0 and (lifted.loc[body, "kl_nats"] >= 0).all()
    for _, rows in raw[body].groupby(["layer", "subblock"]):  # one constant per group: -min where negative, else 0
        diffs = lifted.loc[rows.index, "kl_nats"] - rows["kl_nats"]
        assert diffs.to_numpy() == pytest.approx(max(0.0, -rows["kl_nats"].min()))
    pd.testing.assert_frame_equal(lifted.loc[~body], raw.loc[~body])
    shifted = raw.copy()
    shifted.loc[body, "kl_nats"] += 0.3  # the same constant everywhere: the optimum cannot move
    assert solve(lifted, budgets, "kl_nats")[0].choice == solve(shifted, budgets, "kl_nats")[0].choice
    assert raw.loc[cheap, "variant"] in solve(lifted, budgets, "kl_nats")[0].choice[int(raw.loc[cheap, "layer"])]


def test_improve_child_writes_records_the_pipeline_realizes(run):
    from puzzle.pipeline import build_child, read_architecture

    df = improve_child(run, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128)
    assert list(df["step"]) == ["plain", "diverse", "refined"]
    assert df["score_kl_nats"].iloc[1] <= df["score_kl_nats"].iloc[0] + 1e-12  # the diverse pick includes the plain one
    assert df["score_kl_nats"].iloc[2] <= df["score_kl_nats"].iloc[1] + 1e-12
    assert (run.out / "refine" / "child-1.5x.csv").is_file()
    child = build_child(run, read_architecture(run, "child-1.5x-refined"))
    assert [b.id for b in child.config.blocks] == read_architecture(run, "child-1.5x-refined")["choice"]


def test_improve_child_continues_an_earlier_refinement(run):
    from puzzle.pipeline import read_architecture

    improve_child(run, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128)
    before = read_architecture(run, "child-1.5x-refined")["choice"]
    first = pd.read_csv(run.out / "refine" / "child-1.5x.csv")
    df = improve_child(run, "child-1.5x", refine_k=1, max_changes=1, max_rounds=1, tokens=128, resume=True)
    log = pd.read_csv(run.out / "refine" / "child-1.5x.csv")
    assert len(log) >= len(first) and (log.iloc[:len(first)]["choice"] == first["choice"]).all()  # kept
    new = log.iloc[len(first):]
    assert (new["step"] == "refine").all() and (new["round"] > first["round"].max()).all()  # numbered on
    # it started from the earlier refined child: its score cannot be worse than that child's
    assert df["score_kl_nats"].iloc[2] <= float(first.loc[first["choice"] == " ".join(before), "score_kl_nats"].min()) + 1e-12


def test_records_keep_the_sequences_their_choice_was_made_on_across_a_continue_with_other_tokens(run, tmp_path):
    """kl_gap's fresh tokens must lie beyond every sequence a -diverse/-refined child was chosen on. A --continue with
    another --select-tokens keeps no inputs record, so kl_gap assumed refine's default 2048 tokens: each record now
    keeps its own count, the largest of its steps and rounds."""
    import shutil

    from puzzle.baselines import open_run
    from puzzle.kl_gap import _selection_sequences
    from puzzle.pipeline import read_architecture
    from puzzle.refine import SELECTION_KEY

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    seq = copy.tokens.score.shape[1]
    settings = dict(refine_k=1, max_changes=1, max_rounds=1)
    improve_child(copy, "child-1.5x", k=2, min_layers_differ=1, tokens=2 * seq, **settings)
    records = {n: read_architecture(copy, n) for n in ("child-1.5x-diverse", "child-1.5x-refined")}
    assert [r[SELECTION_KEY] for r in records.values()] == [2, 2]
    assert _selection_sequences(copy, records) == 2
    improve_child(copy, "child-1.5x", tokens=3 * seq, resume=True, **settings)  # other tokens: no inputs record
    assert not (copy.out / "refine" / "child-1.5x.inputs.json").exists()
    records = {n: read_architecture(copy, n) for n in ("child-1.5x-diverse", "child-1.5x-refined")}
    assert [r[SELECTION_KEY] for r in records.values()] == [2, 3]
    assert _selection_sequences(copy, records) == 3  # was the default's 2048 tokens: the whole tiny split
    improve_child(copy, "child-1.5x", tokens=seq, resume=True, **settings)  # fewer: the earlier rounds' count stays
    assert read_architecture(copy, "child-1.5x-refined")[SELECTION_KEY] == 3


@pytest.mark.parametrize("damage", ["empty summary", "no seconds", "no diverse row", "text seconds", "binary log",
                                    "refined record a list", "refined record without layers", "no diverse record"])
def test_continue_starts_afresh_when_the_earlier_files_are_damaged(run, capsys, damage):
    """--continue over a damaged refine/<name>.summary.csv or <name>.csv (was an EmptyDataError, KeyError or
    ValueError traceback)."""
    improve_child(run, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128)
    log, summary = run.out / "refine" / "child-1.5x.csv", run.out / "refine" / "child-1.5x.summary.csv"
    steps = pd.read_csv(summary)
    if damage == "empty summary":
        summary.write_text("")
    elif damage == "no seconds":
        steps.drop(columns="seconds").to_csv(summary, index=False)
    elif damage == "no diverse row":
        steps[steps["step"] != "diverse"].to_csv(summary, index=False)
    elif damage == "text seconds":
        steps.assign(seconds="abc").to_csv(summary, index=False)
    elif damage == "refined record a list":  # breaker: these named another --name as the remedy
        (run.out / "search" / "child-1.5x-refined.json").write_text("[]")
    elif damage == "refined record without layers":
        (run.out / "search" / "child-1.5x-refined.json").write_text('{"choice": 5}')
    elif damage == "no diverse record":
        (run.out / "search" / "child-1.5x-diverse.json").unlink()
    else:
        log.write_bytes(bytes(range(256)))
    capsys.readouterr()
    df = improve_child(run, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1,
                       tokens=128, resume=True)
    assert list(df["step"]) == ["plain", "diverse", "refined"]
    assert "is damaged; starting afresh" in capsys.readouterr().err
    assert list(pd.read_csv(summary)["step"]) == ["plain", "diverse", "refined"]  # whole again


def test_continue_starts_afresh_when_the_child_was_searched_under_other_budgets(run, table, tmp_path):
    import json
    import shutil

    from puzzle.baselines import open_run
    from puzzle.pipeline import read_architecture

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    improve_child(copy, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128)
    path = copy.out / "search" / "child-1.5x.json"
    record = json.loads(path.read_text())  # as if searched again under a tighter runtime budget
    record["budgets"]["max_runtime_ms"] = record["runtime_ms"] * 0.97
    path.write_text(json.dumps(record))
    improve_child(copy, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128,
                  resume=True)
    for step in ("diverse", "refined"):
        kept = read_architecture(copy, f"child-1.5x-{step}")
        assert kept["budgets"] == record["budgets"]
        assert kept["runtime_ms"] <= record["budgets"]["max_runtime_ms"] * (1 + 1e-9)
    assert (pd.read_csv(copy.out / "refine" / "child-1.5x.csv")["step"] == "diverse").any()  # solved again
    # linear subblocks made free: without the vLLM setting the MIP takes them, with it none
    free = table.assign(kl_nats=table["kl_nats"].where(~table["variant"].str.contains("linear"), 0.0))
    budgets = Budgets.from_dict(record["budgets"])
    for vllm in (False, True):
        picked = diverse_candidates(copy, free, budgets, k=1, tokens=128, vllm_compatible=vllm)["choice"]
        assert any("linear" in b for c in picked for b in c) is not vllm
    record["vllm_compatible"] = True  # searched again with --vllm-compatible: no linear subblock in what refine keeps
    path.write_text(json.dumps(record))
    improve_child(copy, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128,
                  resume=True)
    for step in ("diverse", "refined"):
        kept = read_architecture(copy, f"child-1.5x-{step}")
        assert kept["vllm_compatible"] and not any("linear" in b for b in kept["choice"])


def test_refine_command_parses_and_checks_its_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_refine_parser(parser.add_subparsers())
    args = parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--k", "0"])
    assert args.func is refine_main
    with pytest.raises(PuzzleError, match="--k"):
        args.func(args)
    assert not args.resume
    assert parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--continue"]).resume
    assert args.seeds == "greedy,layer_removal,no_linear_attention"
    bad = parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--seeds", "greedy,shortgpt"])
    with pytest.raises(PuzzleError, match="--seeds greedy,shortgpt: give methods among greedy, layer_removal"):
        bad.func(bad)
    for rounds in ("11", "-1"):  # refused before the run is opened (feedback.MAX_ROUNDS is 10)
        bad = parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--budget-feedback", rounds])
        with pytest.raises(PuzzleError, match="--budget-feedback must be a whole number of re-solve rounds"):
            bad.func(bad)
    both = parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--budget-feedback", "2",
                              "--no-measure"])
    with pytest.raises(PuzzleError, match="--no-measure skips the timing: give one of them"):  # breaker: was ignored
        both.func(both)
    both = parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--no-refine-after-repair",
                              "--no-measure"])
    with pytest.raises(PuzzleError, match="--no-refine-after-repair acts on the budget feedback's re-solves"):
        both.func(both)
    assert parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x"]).refine_after_repair
    bad = parser.parse_args(["refine", "--out", str(tmp_path), "--name", "child-1.5x", "--select-context", "-1"])
    with pytest.raises(PuzzleError, match="--select-context must be a number of tokens >= 0"):
        bad.func(bad)
    with pytest.raises(PuzzleError, match="choose among greedy, layer_removal"):  # the library call checks too
        improve_child(None, "child-1.5x", seeds=["uniform_width"])
    with pytest.raises(PuzzleError, match=r"seeds \['greedy,nope'\]"):  # a string is one method, not letters
        improve_child(None, "child-1.5x", seeds="greedy,nope")


def _reindented_copy(tmp_path, source, **score):
    """A copy of the run `source` whose config.json has `score` settings and another JSON layout than the one
    `config.save_run_config` writes (so that any rewrite changes its bytes); returns (folder, its bytes)."""
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["score"].update(score)
    (out / "config.json").write_text(json.dumps(config, indent=7))
    return out, (out / "config.json").read_bytes()


def test_a_refused_or_interrupted_refine_leaves_config_json_byte_for_byte(run, tmp_path, monkeypatch, capsys):
    """--max-contention and the Run's own save of the configuration are kept only when the command succeeds."""
    import json

    import puzzle.refine
    from puzzle.cli import main

    out, before = _reindented_copy(tmp_path, run.out, max_contention=0.25)
    plain = json.loads((out / "search" / "child-1.5x.json").read_text())
    (out / "search" / "child-1.5x-refined.json").write_text(json.dumps({**plain, "method": "mip-refined"}))
    for argv, rc, words in [(["--name", "child-1.5x", "--select-tokens", "1", "--max-contention", "3"], 2, "--select-tokens 1"),
                            (["--name", "nosuch", "--max-contention", "5"], 2, "no architecture named 'nosuch'"),
                            (["--name", "nosuch"], 2, "no architecture named 'nosuch'"),
                            (["--name", "child-1.5x-refined", "--max-contention", "3"], 2,
                             "child-1.5x-refined is a child `puzzle refine` made (from child-1.5x); refine child-1.5x")]:
        assert main(["refine", "--out", str(out), *argv, "--no-progress"]) == rc, argv
        assert words in capsys.readouterr().err
        assert (out / "config.json").read_bytes() == before, argv

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(puzzle.refine, "improve_child", interrupted)
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--max-contention", "3", "--no-progress"]) == 130
    assert (out / "config.json").read_bytes() == before
    seen = []
    monkeypatch.setattr(puzzle.refine, "improve_child",
                        lambda r, *a, **k: seen.append((r.config, k["seeds"])) or pd.DataFrame({"step": ["plain"]}))
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--max-contention", "3", "--no-measure",
                 "--no-progress"]) == 0
    assert seen[0][0].score.max_contention == 3  # timed under the flag, and saved with the run's settings on success
    assert seen[0][1] == ["greedy", "layer_removal", "no_linear_attention"]
    assert json.loads((out / "config.json").read_text())["score"]["max_contention"] == 3
    for flag, methods in (("none", []), (" Layer_Removal ", ["layer_removal"]), ("greedy,nope", None), (",", None),
                          ("layer_removal, greedy", ["greedy", "layer_removal"])):
        code = main(["refine", "--out", str(out), "--name", "child-1.5x", "--seeds", flag, "--no-measure", "--no-progress"])
        assert code == (2 if methods is None else 0) and (methods is None or seen[-1][1] == methods), flag
    capsys.readouterr()  # --select-context is saved with the run: said, as a main budget's change is (breaker)
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--select-context", "4", "--no-measure",
                 "--no-progress"]) == 0
    assert seen[-1][0].score.select_context == 4
    assert "refine: the run's --select-context is now 4 (was 0; saved to" in capsys.readouterr().err
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--no-measure", "--no-progress"]) == 0
    assert "--select-context is now" not in capsys.readouterr().err


def test_a_refinement_that_takes_up_an_earlier_calls_results_says_so(tmp_path_factory, tmp_path, capsys):
    """Breaker: the rerun of a refine interrupted by Ctrl-C took up the children it had realized and scored (memo.jsonl)
    without a word; a fresh call says nothing of the kind."""
    import shutil

    from puzzle.cli import main

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    shutil.rmtree(out / "refine", ignore_errors=True)
    flags = ["refine", "--out", str(out), "--name", "child-1.5x", "--min-layers-differ", "1", "--refine-k", "1",
             "--max-changes", "1", "--rounds", "1", "--select-tokens", "128", "--no-measure", "--no-progress"]
    assert main(flags + ["--k", "2"]) == 0
    assert "taken from an earlier call" not in capsys.readouterr().err
    assert main(flags + ["--k", "3"]) == 0  # afresh, with the first call's children among its candidates
    assert re.search(r"refine child-1\.5x: \d+ realized KLs? or in-context tables? taken from an earlier call \(.*"
                     r"memo\.jsonl\), not computed again", capsys.readouterr().err)
    assert main(flags + ["--k", "4", "--continue"]) == 0  # reviewer: through the CLI --k was never named unused
    err = capsys.readouterr().err  # (the --seeds list took the name of the flags given), nor the default seeds
    assert "keeps the diverse step, made with k=3; this call's k=4 is not used" in err and "seeds=" not in err, err


def test_refine_times_its_children_and_front_draws_them_and_their_pick(tmp_path_factory, tmp_path, capsys):
    """`puzzle refine` realizes and times the diverse and refined children against the parent (DIR/front_rows/);
    `puzzle front` then draws them, and compares the child picked by scoring-split KL when it is not the plain one."""
    import json
    import shutil

    from puzzle.cli import main
    from puzzle.pipeline import compact_architecture
    from puzzle.plots import front_rows, selected_children

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    for stale in ("front_rows", "refine"):
        shutil.rmtree(out / stale, ignore_errors=True)
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--k", "2", "--min-layers-differ", "1",
                 "--refine-k", "1", "--max-changes", "1", "--rounds", "1", "--select-tokens", "128",
                 "--max-contention", "inf", "--no-progress"]) == 0
    captured = capsys.readouterr()  # a fresh refinement takes nothing from an earlier call (nor says so)
    assert "measured_speedup" in captured.out and "taken from an earlier call" not in captured.err
    assert json.loads((out / "timings.json").read_text())["refine_s"] > 0  # reviewer: report.md said it is added
    summary = pd.read_csv(out / "refine" / "child-1.5x.summary.csv").set_index("name")  # printed and kept
    for name in ("child-1.5x-diverse", "child-1.5x-refined"):
        row = json.loads((out / "front_rows" / f"{name}.json").read_text())
        record = json.loads((out / "search" / f"{name}.json").read_text())
        assert row["architecture"] == compact_architecture(record["choice"]) and row["speedup"] > 0
        assert summary.loc[name, "measured_speedup"] == pytest.approx(row["speedup"])
        assert row["method"] == ("mip-diverse" if name.endswith("diverse") else "mip-refined")
    # run again: done, and timed already (breaker: each rerun timed them again and rewrote their figures)
    again = ["refine", "--out", str(out), "--name", "child-1.5x", "--k", "2", "--min-layers-differ", "1", "--refine-k",
             "1", "--max-changes", "1", "--rounds", "1", "--select-tokens", "128", "--no-progress"]
    timed = {p: p.read_bytes() for p in [out / "refine" / "child-1.5x.summary.csv", *(out / "front_rows").glob("*")]}
    assert main(again) == 0
    assert "timed and checked against the budget already" in capsys.readouterr().err
    assert timed == {p: p.read_bytes() for p in timed}
    files = {p: p.read_bytes() for p in (out / "refine").iterdir()}
    assert main(again[:5] + ["--k", "2", "--min-layers-differ", "99"]) == 2  # breaker: refused, it had set the
    assert "this table has" in capsys.readouterr().err  # finished refinement's inputs aside, and a rerun redid it
    assert files == {p: p.read_bytes() for p in (out / "refine").iterdir()}
    assert main(again + ["--retime", "--max-contention", "inf"]) == 0  # timed again, on request
    err = capsys.readouterr().err
    assert "already refined" in err and "checked against the budget already" not in err
    assert "--retime: timing the diverse and refined children again" in err  # fresh user: it went unsaid
    assert main(again + ["--budget-feedback", "0", "--max-contention", "inf"]) == 0  # breaker: it timed them unsaid
    assert "--budget-feedback 0: timing the diverse and refined children again" in capsys.readouterr().err
    summary = pd.read_csv(out / "refine" / "child-1.5x.summary.csv").set_index("name")
    for name in ("child-1.5x-diverse", "child-1.5x-refined"):
        row = json.loads((out / "front_rows" / f"{name}.json").read_text())
        assert summary.loc[name, "measured_speedup"] == pytest.approx(row["speedup"])
    assert main(["front", "--out", str(out), "--max-contention", "inf", "--no-progress"]) == 0
    drawn = pd.read_csv(out / "front_all.csv").set_index("name")
    assert drawn.loc["child-1.5x-refined", "method"] == "mip-refined"
    steps = pd.read_csv(out / "refine" / "child-1.5x.summary.csv")
    best = steps.loc[steps["score_kl_nats"].idxmin(), "name"]
    picked = selected_children(out, front_rows(out, with_downstream=False)).set_index("picked_from")
    assert picked.loc["child-1.5x", "name"] == best  # whichever step the scoring split favoured
    # a hand-edited summary whose KL is negative (no model has one), missing or text is passed over, and named
    for value in (-1.0, math.nan, "abc"):
        steps.astype({"score_kl_nats": object}).assign(
            score_kl_nats=[s if n != "child-1.5x-refined" else value for n, s in
                           zip(steps["name"], steps["score_kl_nats"])]).to_csv(
            out / "refine" / "child-1.5x.summary.csv", index=False)
        picked = selected_children(out, front_rows(out, with_downstream=False))
        assert picked.set_index("picked_from").loc["child-1.5x", "name"] == "child-1.5x", value
        assert "gives child-1.5x-refined the scoring-split KL" in picked.attrs["passed_over"]["child-1.5x"], value
    for row in (0, 2):  # a step's name blanked: the plain one's was read as an earlier search, another's dropped
        steps.assign(name=[n if i != row else "" for i, n in enumerate(steps["name"])]).to_csv(
            out / "refine" / "child-1.5x.summary.csv", index=False)
        picked = selected_children(out, front_rows(out, with_downstream=False))
        assert picked.attrs["passed_over"]["child-1.5x"].endswith("holds a step without a name"), row
    # breaker 2: `refine --no-measure` chose another child of the same name; its old row was drawn under that name
    path = out / "search" / "child-1.5x-refined.json"
    record = json.loads(path.read_text())
    other = [b if i else "attn-no_op+ffn-no_op" for i, b in enumerate(record["choice"])]
    assert other != record["choice"]
    path.write_text(json.dumps({**record, "choice": other}))
    with pytest.warns(UserWarning, match=r"child-1.5x-refined \(front_rows\) was measured on another architecture.*"
                                         r"`puzzle refine --name child-1.5x --out "):  # (refine needs --name)
        drawn = front_rows(out, with_downstream=False)
    assert "child-1.5x-refined" not in set(drawn["name"]) and "child-1.5x-diverse" in set(drawn["name"])


def test_an_interrupted_continue_keeps_the_earlier_inputs_and_another_window_starts_afresh(run, tmp_path, monkeypatch,
                                                                                            capsys):
    """A --continue interrupted after it set the earlier inputs record aside finds it again on its rerun, so the
    continued refinement is recorded as finished (breaker: it was lost, and a plain rerun redid everything). A
    --continue under another --select-context starts afresh and says so; one with other round settings says that
    it will not count as finished."""
    import shutil

    from puzzle import refine as refine_module
    from puzzle.baselines import open_run

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    settings = dict(k=2, min_layers_differ=1, refine_k=1, max_changes=1, tokens=128)
    improve_child(copy, "child-1.5x", max_rounds=1, **settings)
    inputs, waiting = (copy.out / "refine" / f"child-1.5x.{f}" for f in ("inputs.json", "inputs.earlier.json"))
    real_refine = refine_module.refine

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine_module, "refine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        improve_child(copy, "child-1.5x", max_rounds=1, **settings, resume=True)
    assert not inputs.exists() and json.loads(waiting.read_text())["rounds"] == 1  # aside, not "done"
    monkeypatch.setattr(refine_module, "refine", real_refine)
    capsys.readouterr()
    improve_child(copy, "child-1.5x", max_rounds=1, **settings, resume=True)
    assert "not recorded as finished" not in capsys.readouterr().err
    assert json.loads(inputs.read_text())["rounds"] == 2 and not waiting.exists()
    improve_child(copy, "child-1.5x", max_rounds=2, **settings)
    assert "already refined" in capsys.readouterr().err
    # other round settings: goes on, and says the result will not count as finished
    improve_child(copy, "child-1.5x", max_rounds=1, **{**settings, "max_changes": 2}, resume=True)
    assert "made with max_changes=1; this refinement is not recorded as finished" in capsys.readouterr().err
    assert not inputs.exists() and not waiting.exists()
    # another window: the earlier rounds chose by another KL, so --continue starts afresh (one log, one measure)
    improve_child(copy, "child-1.5x", max_rounds=1, **settings)
    copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(copy.config.score, select_context=4))
    capsys.readouterr()
    improve_child(copy, "child-1.5x", max_rounds=1, **settings, resume=True)
    err = capsys.readouterr().err
    assert "chose by the plain mean KL (--select-context 0), this call by the context-weighted KL " \
           "(--select-context 4); starting afresh" in err
    log = pd.read_csv(copy.out / "refine" / "child-1.5x.csv")
    assert log.loc[log["step"] == "refine", "round"].max() == 1  # the fresh refinement's one round
    improve_child(copy, "child-1.5x", max_rounds=1, **settings)
    assert "already refined" in capsys.readouterr().err


def test_a_plain_rerun_of_a_finished_refinement_returns_it_without_scoring_again(run, tmp_path, monkeypatch, capsys):
    """`puzzle refine` again with the same settings on an unchanged run says it is done (it realized and scored
    every candidate again); more rounds than were run, other settings, or a --continue behave as before."""
    import shutil

    from puzzle import refine as refine_module
    from puzzle.baselines import open_run

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    settings = dict(k=2, min_layers_differ=1, refine_k=1, max_changes=1, tokens=128)
    first = improve_child(copy, "child-1.5x", max_rounds=1, **settings)
    real_refine = refine_module.refine
    monkeypatch.setattr(refine_module, "refine", lambda *a, **kw: pytest.fail("refined again"))
    capsys.readouterr()
    again = improve_child(copy, "child-1.5x", max_rounds=1, **settings)
    assert "already refined" in capsys.readouterr().err
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    for changed, why in (({"max_rounds": 2}, "with 1 round, fewer than --rounds 2 asks"),
                         ({"max_rounds": 1, "refine_k": 2}, "with refine_k=1;")):  # more rounds, other settings: redone
        with pytest.raises(pytest.fail.Exception, match="refined again"):
            improve_child(copy, "child-1.5x", **{**settings, **changed})
        err = capsys.readouterr().err
        assert f"was made {why}" in err and "this call refines afresh and replaces it" in err
    # those calls stopped midway (in `refine`): what they leave is not taken as a finished refinement (reviewer)
    assert not (copy.out / "refine" / "child-1.5x.inputs.json").exists()
    monkeypatch.setattr(refine_module, "refine", real_refine)
    improve_child(copy, "child-1.5x", max_rounds=1, **settings)  # afresh
    improve_child(copy, "child-1.5x", max_rounds=1, **settings, resume=True)  # one round more: 2 in all
    monkeypatch.setattr(refine_module, "refine", lambda *a, **kw: pytest.fail("refined again"))
    improve_child(copy, "child-1.5x", **settings, max_rounds=2)  # the rounds of both calls count
    assert "already refined" in capsys.readouterr().err
    import dataclasses
    import json

    record = copy.out / "search" / "child-1.5x-refined.json"
    kept = record.read_text()
    record.write_text(json.dumps({**json.loads(kept), "choice": [b.id for b in copy.parent.config.blocks]}))
    with pytest.raises(pytest.fail.Exception, match="refined again"):  # a record the table does not name
        improve_child(copy, "child-1.5x", **settings, max_rounds=1)
    record.write_text(kept)
    monkeypatch.setattr(refine_module, "refine", real_refine)
    improve_child(copy, "child-1.5x", **settings, max_rounds=1)  # done again (that call stopped midway)
    monkeypatch.setattr(refine_module, "refine", lambda *a, **kw: pytest.fail("refined again"))
    search = dataclasses.replace(copy.config.search, objective="lm_loss")
    copy.config = dataclasses.replace(copy.config, search=search)
    with pytest.raises(pytest.fail.Exception, match="refined again"):  # another objective for the diverse step
        improve_child(copy, "child-1.5x", **settings, max_rounds=1)


def test_continue_starts_afresh_when_the_plain_child_was_searched_again_under_another_objective(run, tmp_path, capsys):
    """Breaker: after `puzzle search --objective lm_loss` gave another child-1.5x under the same budgets, `--continue`
    went on from the earlier child's refinement and compared the two in one table without a word."""
    import dataclasses
    import json
    import shutil

    from puzzle.baselines import open_run

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    settings = dict(k=2, min_layers_differ=1, refine_k=1, max_changes=1, tokens=128, max_rounds=1)
    improve_child(copy, "child-1.5x", **settings)
    for change in ("objective", "choice"):
        if change == "objective":  # searched again under another objective (the same choice here, by chance or not)
            copy.config = dataclasses.replace(copy.config, search=dataclasses.replace(copy.config.search,
                                                                                      objective="lm_loss"))
        else:  # another plain child under the same budgets, and an earlier refinement without its inputs record
            path = copy.out / "search" / "child-1.5x.json"
            record = json.loads(path.read_text())
            record.pop("rows")  # a choice edited beside the rows it was solved as is refused (read_architecture)
            # one changed layer back to the parent's block: another choice whatever the tiny run's timings chose (CI:
            # the diverse child's choice reversed was the plain one)
            parent_ids = [b.id for b in copy.parent.config.blocks]
            i = next(i for i, (b, p) in enumerate(zip(record["choice"], parent_ids)) if b != p)
            choice = [*record["choice"][:i], parent_ids[i], *record["choice"][i + 1:]]
            totals = record_for(copy, "child-1.5x", choice, "bld", Budgets(), "mip")  # the new choice's predictions
            path.write_text(json.dumps({**record, **{k: v for k, v in totals.items() if k not in ("name", "method")},
                                        "budgets": record["budgets"]}))
            (copy.out / "refine" / "child-1.5x.inputs.json").unlink(missing_ok=True)
        capsys.readouterr()
        df = improve_child(copy, "child-1.5x", **settings, resume=True)
        assert "of another child-1.5x or objective (searched again since); starting afresh" in capsys.readouterr().err
        assert (pd.read_csv(copy.out / "refine" / "child-1.5x.csv")["step"] == "diverse").any()
        assert df["changed_layers"].iloc[0] == 0


def test_headroom_benchmark_chooses_on_the_split_of_its_mode_and_resumes(tmp_path_factory, tmp_path, capsys):
    """benchmarks/headroom.py: greedy and plain are search's own choices; the honest mode chooses on the scoring split's
    first tokens, the oracle on the evaluation split (starting from the honest children too); the held-out KL is on
    scoring sequences neither chose on nor the table used; every KL is measured as `pipeline.evaluate` measures; the
    run is only read, and a rerun redoes nothing."""
    from puzzle.baselines import open_run
    from puzzle.pipeline import load_score_table, scoring_ids
    from puzzle.realize import realize_child
    from puzzle.scoring.quality import evaluate_model, parent_logprobs
    from puzzle.search import greedy, parent_totals, solve

    bench = load_benchmark("headroom")
    run_dir, before = tiny_run_copy(tmp_path_factory, tmp_path / "run")
    argv = ["--run", str(run_dir), "--speedups", "1.5", "--diverse", "3", "--rounds", "2", "--refine-k", "2",
            "--max-changes", "3", "--select-tokens", "256", "--context-tokens", "128", "--out", str(tmp_path / "h"),
            "--no-progress"]
    assert bench.main(argv) == 0
    rows = pd.read_csv(tmp_path / "h" / "headroom.csv").set_index(["mode", "step"])
    assert sorted(rows.index) == [("-", "greedy"), ("-", "plain"), ("honest", "diverse"), ("honest", "refined"),
                                  ("oracle", "diverse"), ("oracle", "refined")]
    run = open_run(run_dir, progress=False)
    table, _ = load_score_table(run, "bld")
    budgets = Budgets(max_runtime_ms=parent_totals(table)["runtime_ms"] / 1.5)
    assert rows.loc[("-", "greedy"), "choice"] == " ".join(greedy(table, budgets).choice)
    assert rows.loc[("-", "plain"), "choice"] == " ".join(solve(table, budgets)[0].choice)
    seq = run.tokens.score.shape[1]
    chosen_on = run.tokens.score[:256 // seq]
    held_out = run.tokens.score[max(256 // seq, scoring_ids(run).shape[0]):]
    assert held_out.shape[0] >= 1
    table_seqs = scoring_ids(run).shape[0]  # one chosen-on sequence: held out from beyond the table's, not from the 2nd
    assert 1 < table_seqs < run.tokens.score.shape[0]
    assert torch.equal(bench.views(run, seq, 128)["heldout"].tokens.score, run.tokens.score[table_seqs:])
    chunk = run.config.score.chunk

    def kl(model, ids):
        return evaluate_model(model, ids, parent_logprobs(run.parent.model, ids, chunk=chunk), chunk=chunk)["kl_nats"]

    for (mode, step), r in rows.iterrows():  # each KL measured again on the realized choice and its split
        model = realize_child(run.parent.model, run.library, [BlockConfig.from_id(b) for b in r["choice"].split()])
        assert r["eval_kl_nats"] == pytest.approx(kl(model, run.tokens.eval), rel=1e-4, abs=1e-7), (mode, step)
        assert r["heldout_kl_nats"] == pytest.approx(kl(model, held_out), rel=1e-4, abs=1e-7), (mode, step)
        if mode == "honest":
            assert r["chosen_on_kl"] == pytest.approx(kl(model, chosen_on), rel=1e-4, abs=1e-7), step
        if mode == "oracle":
            assert r["chosen_on_kl"] == pytest.approx(r["eval_kl_nats"], rel=1e-6), step
        assert r["predicted_speedup"] >= 1.5 * (1 - 1e-9)
        assert r["eval_over_greedy"] == pytest.approx(r["eval_kl_nats"] / rows.loc[("-", "greedy"), "eval_kl_nats"])
        assert r["heldout_over_greedy"] == pytest.approx(r["heldout_kl_nats"] /
                                                         rows.loc[("-", "greedy"), "heldout_kl_nats"])
    assert rows.loc[("honest", "refined"), "chosen_on_kl"] <= rows.loc[("honest", "diverse"), "chosen_on_kl"] + 1e-9
    # the oracle refines the best child on the evaluation split, the honest ones included (first of equals, in order)
    candidates = rows.drop(index=("oracle", "refined"))
    assert rows.loc[("oracle", "refined"), "refined_from"] == " ".join(candidates["eval_kl_nats"].idxmin())
    assert rows.loc[("oracle", "refined"), "eval_kl_nats"] <= candidates["eval_kl_nats"].min() + 1e-9
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before  # the run is only read
    # an honest child of an earlier call that is the best on the evaluation split is where the oracle starts
    best = rows.loc[("oracle", "refined")]
    earlier = [{"target": 1.5, "mode": "honest", "step": "refined", "choice": best["choice"]}]
    again = bench.headroom_at(run, table, 1.5, ["oracle"], earlier, diverse=3, rounds=1, max_changes=3, refine_k=2,
                              select_tokens=256, context_tokens=128, stage="bld", progress=False)
    g, p = rows.loc[("-", "greedy"), "eval_kl_nats"], rows.loc[("-", "plain"), "eval_kl_nats"]
    expect = "- greedy" if g == best["eval_kl_nats"] else "- plain" if p == best["eval_kl_nats"] else "honest refined"
    assert again[-1]["refined_from"] == expect
    capsys.readouterr()
    assert bench.main(argv) == 0 and "done earlier, kept" in capsys.readouterr().err
    assert bench.main([*argv, "--modes", "oracle,psychic"]) == 2
    assert "--modes takes oracle and/or honest" in capsys.readouterr().err
    assert bench.main([*argv[:-3], "--select-tokens", "512", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "none stays held out; give --select-tokens at most" in err and not (tmp_path / "bad").exists()
    # other settings start afresh and say so; an honest mode added after an oracle one runs the oracle again
    other = [*argv[:-3], "--rounds", "1", "--modes", "oracle", "--out", str(tmp_path / "h"), "--no-progress"]
    assert bench.main(other) == 0 and "starting afresh" in capsys.readouterr().err
    assert set(pd.read_csv(tmp_path / "h" / "headroom.csv")["mode"]) == {"-", "oracle"}
    assert bench.main([*other[:-5], "--modes", "oracle,honest", "--out", str(tmp_path / "h"), "--no-progress"]) == 0
    again = pd.read_csv(tmp_path / "h" / "headroom.csv")
    assert sorted(again["mode"]) == ["-", "-", "honest", "honest", "oracle", "oracle"]
    assert again.loc[again["step"].eq("refined") & again["mode"].eq("oracle"), "eval_kl_nats"].iloc[0] <= \
        again.loc[again["mode"].eq("honest"), "eval_kl_nats"].min() + 1e-9


def test_headroom_benchmark_leaves_out_the_runs_exclusions(tmp_path_factory, tmp_path, capsys):
    """benchmarks/headroom.py on a run whose search leaves variants out ([search] exclude): no child of any step uses
    them, greedy and plain are search's own choices under them, and results measured without them are redone."""
    import json

    from puzzle.baselines import open_run
    from puzzle.pipeline import load_score_table
    from puzzle.search import greedy, parent_totals, solve, uses_excluded

    bench = load_benchmark("headroom")
    run_dir, _ = tiny_run_copy(tmp_path_factory, tmp_path / "run")
    argv = ["--run", str(run_dir), "--speedups", "1.5", "--modes", "honest", "--diverse", "2", "--rounds", "1",
            "--refine-k", "2", "--max-changes", "3", "--select-tokens", "256", "--context-tokens", "128",
            "--out", str(tmp_path / "h"), "--no-progress"]
    assert bench.main(argv) == 0
    whole = pd.read_csv(tmp_path / "h" / "headroom.csv")
    parent = {sub for b in open_run(run_dir, progress=False).parent.config.blocks for sub in (b.attention.id, b.ffn.id)}
    used = pd.Series([sub for c in whole["choice"] for b in map(BlockConfig.from_id, c.split())
                      for sub in (b.attention.id, b.ffn.id) if sub not in parent])
    ex = [used.value_counts().index[0]]  # the variant the children used most
    config = json.loads((run_dir / "config.json").read_text())
    config["search"]["exclude"] = ex
    (run_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "starting afresh" in capsys.readouterr().err  # measured without the exclusion: not kept
    rows = pd.read_csv(tmp_path / "h" / "headroom.csv").set_index(["mode", "step"])
    assert len(rows) == 4 and not any(uses_excluded(c.split(), ex) for c in rows["choice"])
    run = open_run(run_dir, progress=False)
    assert run.config.search.exclude == tuple(ex)
    table, _ = load_score_table(run, "bld")
    budgets = Budgets(max_runtime_ms=parent_totals(table)["runtime_ms"] / 1.5)
    assert rows.loc[("-", "greedy"), "choice"] == " ".join(greedy(table, budgets, exclude=ex).choice)
    assert rows.loc[("-", "plain"), "choice"] == " ".join(solve(table, budgets, exclude=ex)[0].choice)
    assert json.loads((tmp_path / "h" / "headroom.json").read_text())["exclude"] == ex


def _refined_run(tmp_path_factory, tmp_path, monkeypatch, factor: float):
    """A tiny run with child-1.5x refined (`--no-measure`), its flags, and a deterministic measurement: each model's
    runtime is the cost table's prediction for its architecture, and the refinement's own child runs `factor` times
    that (as a child whose overhead the summed table misses, or overstates). Returns (out, flags, plain record, refined
    record, sessions: the models each timing session had)."""
    import json
    import shutil

    import puzzle.scoring.cost as cost
    from puzzle.baselines import open_run
    from puzzle.cli import main

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    for stale in ("front_rows", "refine"):
        shutil.rmtree(out / stale, ignore_errors=True)
    flags = ["--out", str(out), "--name", "child-1.5x", "--k", "2", "--min-layers-differ", "1", "--refine-k", "2",
             "--max-changes", "3", "--rounds", "1", "--select-tokens", "128", "--max-contention", "inf",
             "--no-progress"]
    assert main(["refine", *flags, "--no-measure"]) == 0
    plain = json.loads((out / "search" / "child-1.5x.json").read_text())
    solved = json.loads((out / "search" / "child-1.5x-refined.json").read_text())
    opened, budgets = open_run(out, progress=False), Budgets.from_dict(plain["budgets"])
    real, sessions = cost.measure_models, []

    def predicted_times(models, workload, **kw):  # real session, runtimes replaced by the table's predictions
        sessions.append(list(models))
        df = real(models, workload, **kw)
        for name, model in models.items():
            choice = [b.id for b in model.config.blocks]
            ms = plain["parent"]["runtime_ms"] if name == "parent" else \
                record_for(opened, "x", choice, "bld", budgets, "m")["runtime_ms"]
            df.loc[df["name"] == name, "runtime_ms"] = ms * (factor if choice == solved["choice"] else 1.0)
        df.loc[:, [c for c in df.columns if c.endswith("_iqr_ms")]] = 0.0
        df.attrs.pop("runtime_rounds_ms", None)
        df.attrs["contention_cores"] = 0.0  # runtimes of the table alone: no other job's load is in them (the
        return df  # feedback corrected no limit by a session a test run beside it had made busy)

    monkeypatch.setattr(cost, "measure_models", predicted_times)
    return out, flags, plain, solved, sessions


def test_refine_holds_its_children_to_the_plain_childs_measured_budget(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """`puzzle refine --budget-feedback 1`: a refined child measured over the plain child's budget is re-solved under
    the corrected table limit, within the trust region around it and on the table re-scored in its context; its
    record keeps the plain child's budgets (for --continue) and names the feedback's; the step table and the front's
    rows follow the new child, from one timing session; the flag is not saved with the run's settings; --continue
    keeps the feedback of a child it keeps."""
    import json

    from puzzle.cli import main
    from puzzle.pipeline import compact_architecture
    from puzzle.refine import FEEDBACK_BUDGETS_KEY

    import puzzle.refine
    import puzzle.search

    out, flags, plain, solved, sessions = _refined_run(tmp_path_factory, tmp_path, monkeypatch, 1.3)
    search, config = out / "search", (out / "config.json").read_bytes()
    contexts, real_context = [], puzzle.refine.context_table

    def context_table(run, blocks, table, *args, **kwargs):  # which children the re-solve scored candidates around
        contexts.append([b.id for b in blocks])
        return real_context(run, blocks, table, *args, **kwargs)

    solved_on, real_solve = [], puzzle.search.solve

    def solve(table, *args, **kwargs):  # which tables the re-solve took its candidates from
        solved_on.append("context_kl_nats" in table.columns)
        return real_solve(table, *args, **kwargs)

    monkeypatch.setattr(puzzle.refine, "context_table", context_table)
    monkeypatch.setattr(puzzle.search, "solve", solve)
    assert main(["refine", *flags, "--budget-feedback", "1", "--no-refine-after-repair"]) == 0
    said = "".join(capsys.readouterr())
    assert "already refined" in said  # the refinement itself was not redone
    assert f"re-solved child-1.5x-refined under corrected limits; `puzzle refine --out {out} --name child-1.5x " \
           f"--continue` refines on from it" in said
    assert solved["choice"] in contexts  # in the refined child's context, once per architecture (the diverse child
    assert len({tuple(c) for c in contexts}) == len(contexts)  # may be the same: it was re-solved twice then)
    assert solved_on[:2] == [True, False]  # candidates from the in-context table and from the score table
    limit = plain["parent"]["runtime_ms"] / float(plain["request"]["speedup"])
    assert (f"budget feedback, round 1: child-1.5x-refined: measured {1.3 * solved['runtime_ms'] / limit:.3f} of its "
            f"runtime_ms budget; tightened") in said
    assert (out / "config.json").read_bytes() == config  # reviewer: it was saved as the run's [search] setting
    drift = json.loads((out / "refine" / "machine.json").read_text())  # the session beside the cost table's machine
    assert {"cost_table", "children", "drift"} <= set(drift)
    record = json.loads((search / "child-1.5x-refined.json").read_text())
    first = record["budget_feedback"][0]
    assert first["check"]["use"] == pytest.approx(1.3 * solved["runtime_ms"] / limit, rel=1e-3)
    assert first["action"] == "tightened"
    assert record["solved_choice"] == solved["choice"] and record["choice"] != solved["choice"]
    assert record["budgets"] == plain["budgets"]  # the refinement's: --continue compares them
    corrected = record[FEEDBACK_BUDGETS_KEY]["max_runtime_ms"]
    assert corrected == pytest.approx(limit / 1.3, rel=1e-6)  # L x predicted / measured
    assert record["runtime_ms"] <= corrected * (1 + 1e-9)
    assert sum(a != b for a, b in zip(record["choice"], solved["choice"])) <= 3  # the trust region
    assert record["budget_feedback"][-1]["check"]["met"]
    summary = pd.read_csv(out / "refine" / "child-1.5x.summary.csv").set_index("name")
    row = summary.loc["child-1.5x-refined"]
    assert row["architecture"] == compact_architecture(record["choice"]) and bool(row["budget_met"])
    assert row["budget_use"] == pytest.approx(record["runtime_ms"] / limit, rel=1e-3)
    assert row["predicted_speedup"] == pytest.approx(record["speedup"])
    assert row["gain_kl_nats"] == pytest.approx(summary.loc["child-1.5x", "kl_nats"] - row["kl_nats"])
    # two sessions, the solved children and the re-solved one (an architecture timed once under the first of its
    # names): the front's rows take the last, not a third timing
    def named(pairs):  # the first name of each architecture, in order
        first = {}
        for n, c in pairs:
            first.setdefault(tuple(c), n)
        return list(first.values())

    diverse = json.loads((search / "child-1.5x-diverse.json").read_text())
    steps = [("child-1.5x-diverse", diverse.get("solved_choice", diverse["choice"])),
             ("child-1.5x-refined", solved["choice"])]
    assert sessions[0] == ["parent"] + named(steps)
    assert sessions[1:] == [["parent"] + named([(steps[0][0], diverse["choice"]), ("child-1.5x-refined",
                                                                                  record["choice"])])]
    front = json.loads((out / "front_rows" / "child-1.5x-refined.json").read_text())
    assert front["architecture"] == row["architecture"]
    assert front["speedup"] == pytest.approx(plain["parent"]["runtime_ms"] / record["runtime_ms"], rel=1e-3)
    # a plain rerun finds the refinement done (the table names the records' children) and keeps the new child
    assert main(["refine", *flags, "--budget-feedback", "0"]) == 0
    said = "".join(capsys.readouterr())
    assert "already refined" in said and "--continue` refines on" not in said  # checked only, nothing re-solved
    again = json.loads((search / "child-1.5x-refined.json").read_text())
    assert again["choice"] == record["choice"] and again[FEEDBACK_BUDGETS_KEY] == record[FEEDBACK_BUDGETS_KEY]
    assert [e["action"] for e in again["budget_feedback"]] == ["kept"]  # this session only checked it
    assert again["budget_feedback_earlier"] == [{"rounds": 1, "history": record["budget_feedback"]}]  # kept
    # --continue rewrites the records; a step whose child stays keeps what the feedback recorded of it
    settled = {step: json.loads((search / f"child-1.5x-{step}.json").read_text()) for step in ("diverse", "refined")}
    assert main(["refine", *flags, "--continue", "--no-measure"]) == 0
    for step, before in settled.items():
        after = json.loads((search / f"child-1.5x-{step}.json").read_text())
        if after["choice"] == before["choice"]:
            assert {k: after.get(k) for k in before if "feedback" in k or k == "solved_choice"} == \
                {k: v for k, v in before.items() if "feedback" in k or k == "solved_choice"}, step
        else:  # a new child, refined under the feedback's limits (breaker: under the plain child's it went back over)
            assert step == "refined" and "solved_choice" not in after and "budget_feedback" not in after
            assert after[FEEDBACK_BUDGETS_KEY] == before[FEEDBACK_BUDGETS_KEY]
            assert after["runtime_ms"] <= before[FEEDBACK_BUDGETS_KEY]["max_runtime_ms"] * (1 + 1e-9)
    assert (out / "config.json").read_bytes() == config
    # a refinement that kept the diverse child: one architecture, timed once, its figures under both names
    from puzzle.baselines import open_run
    from puzzle.refine import settle_steps

    refined = json.loads((search / "child-1.5x-refined.json").read_text())
    (search / "child-1.5x-diverse.json").write_text(json.dumps({**refined, "name": "child-1.5x-diverse"}))
    _, checks, session = settle_steps(open_run(out, progress=False), "child-1.5x", rounds=0, tokens=128)
    assert sessions[-1] == ["parent", "child-1.5x-diverse"]
    assert checks["child-1.5x-diverse"] == checks["child-1.5x-refined"]
    pd.testing.assert_series_equal(session.loc["child-1.5x-diverse"], session.loc["child-1.5x-refined"],
                                   check_names=False)


def test_a_looser_limit_never_trades_a_refined_child_for_a_worse_one(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """Reviewer: loosening took the lowest scoring-split KL among the score table's best children near the refined
    one, which the summed table misjudges, so it could replace the refinement's child by a worse one. The child is a
    candidate too now: a child well under its budget (measured at 0.7 of its prediction), which the score table ranks
    below the children near it, is scored beside them, and the loosening rounds end with a scoring-split KL no higher
    than the refinement's."""
    import json

    from puzzle.cli import main

    import puzzle.refine
    import puzzle.search

    out, flags, _, solved, _ = _refined_run(tmp_path_factory, tmp_path, monkeypatch, 0.7)
    before = pd.read_csv(out / "refine" / "child-1.5x.summary.csv").set_index("name")
    scored, real, real_measure, phase = {}, puzzle.refine.selection_kl, puzzle.refine.measure_steps, ["feedback"]

    def selection_kl(run, model, tokens=None):  # {choice: KL} scored by the feedback (the front's rows score too)
        kl = real(run, model, tokens)
        if phase[0] == "feedback":
            scored[tuple(b.id for b in model.config.blocks)] = kl
        return kl

    def measure_steps(*args, **kwargs):
        phase[0] = "front"
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(puzzle.refine, "selection_kl", selection_kl)
    monkeypatch.setattr(puzzle.refine, "measure_steps", measure_steps)
    real_solve = puzzle.search.solve

    def solve(table, budgets, *args, anchor=None, **kwargs):  # a child the summed table ranks below its neighbours
        found = real_solve(table, budgets, *args, anchor=anchor, **kwargs)
        mine = None if anchor is None else tuple(b.id for b in anchor)
        return [x for x in found if x.choice != mine]

    monkeypatch.setattr(puzzle.search, "solve", solve)
    assert main(["refine", *flags, "--budget-feedback", "2", "--no-refine-after-repair"]) == 0
    record = json.loads((out / "search" / "child-1.5x-refined.json").read_text())
    actions = [e["action"] for e in record["budget_feedback"]]
    assert actions[0] in ("loosened", "kept: the child realized best of the children under the corrected limits"), \
        actions  # the child is among the candidates, so "kept" is by their KL
    assert tuple(solved["choice"]) in scored  # a candidate of the loosening re-solve (it was not)
    if actions[0] == "loosened":
        assert scored[tuple(record["budget_feedback"][1]["choice"])] < scored[tuple(solved["choice"])]
    after = pd.read_csv(out / "refine" / "child-1.5x.summary.csv").set_index("name")
    kl = after.loc["child-1.5x-refined", "score_kl_nats"]
    assert kl <= before.loc["child-1.5x-refined", "score_kl_nats"] + 1e-12


def test_refine_goes_on_from_a_child_the_budget_feedback_re_solved(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """By default, a refined child the budget feedback re-solved is refined on from under the corrected limits (as
    --continue: rounds numbered on, in the same call) and the children are timed again; the hint to --continue is
    left for a child re-solved once more."""
    import json

    from puzzle.cli import main
    from puzzle.refine import FEEDBACK_BUDGETS_KEY

    out, flags, plain, solved, sessions = _refined_run(tmp_path_factory, tmp_path, monkeypatch, 1.3)
    assert main(["refine", *flags, "--budget-feedback", "1"]) == 0
    said = "".join(capsys.readouterr())
    assert "re-solved child-1.5x-refined under corrected limits; refining on from it under them, 1 round at most" \
        in said
    assert "--continue` refines on" not in said  # the child of the further round met its budget
    log = pd.read_csv(out / "refine" / "child-1.5x.csv")
    assert log.loc[log["step"] == "refine", "round"].max() == 2  # one round in the first call, one more
    assert json.loads((out / "refine" / "child-1.5x.inputs.json").read_text())["rounds"] == 2
    record = json.loads((out / "search" / "child-1.5x-refined.json").read_text())
    limit = plain["parent"]["runtime_ms"] / float(plain["request"]["speedup"])
    corrected = record[FEEDBACK_BUDGETS_KEY]["max_runtime_ms"]
    assert corrected == pytest.approx(limit / 1.3, rel=1e-6)  # the re-solve's limits, kept by the further round
    assert record["choice"] != solved["choice"] and record["runtime_ms"] <= corrected * (1 + 1e-9)
    assert len(sessions) == 3  # the check, the re-solve's, and the check after the further round
    assert record["budget_feedback"][-1]["check"]["met"]
    summary = pd.read_csv(out / "refine" / "child-1.5x.summary.csv").set_index("name")
    assert bool(summary.loc["child-1.5x-refined", "budget_met"])


def test_no_measure_keeps_the_timings_of_unchanged_children_and_says_when_there_are_none(
        tmp_path_factory, tmp_path, monkeypatch, capsys):
    """A --no-measure call keeps the earlier call's measured speed-up and budget check where every step's child has
    the layers timed before (breaker: a --continue --no-measure dropped them from the step table without a word), and
    otherwise says that the children are untimed and which command times them."""
    from puzzle.baselines import open_run
    from puzzle.cli import main
    from puzzle.refine import _untimed_steps

    out, flags, *_ = _refined_run(tmp_path_factory, tmp_path, monkeypatch, 1.0)
    assert "--no-measure: the diverse and refined children are not timed" in "".join(capsys.readouterr())
    summary = out / "refine" / "child-1.5x.summary.csv"
    assert main(["refine", *flags]) == 0  # finds the refinement done and times its children
    timed = pd.read_csv(summary)
    assert timed.loc[timed["step"] != "plain", "measured_speedup"].notna().all()
    capsys.readouterr()
    assert main(["refine", *flags, "--no-measure"]) == 0
    assert "have the layers timed before, so their measured speed-up and budget check are kept" in \
        "".join(capsys.readouterr())
    pd.testing.assert_frame_equal(pd.read_csv(summary), timed)
    # a step whose child changed since its timing: nothing is carried over, and the run says so
    other = timed.assign(architecture=timed["architecture"].where(timed["step"] != "refined", "elsewhere"))
    kept = _untimed_steps(open_run(out, progress=False), "child-1.5x", timed, other)  # as a finished one's table
    assert not {"measured_speedup", "budget_use", "budget_met"} & set(kept.columns)  # none shown as measured
    assert "the same command without --no-measure (and without --continue) times them" in \
        "".join(capsys.readouterr())
    pd.testing.assert_frame_equal(pd.read_csv(summary), timed)  # the table on disk is left as it was
    (out / "refine" / "child-1.5x.inputs.json").unlink()  # not recorded as finished: a rerun refines afresh
    _untimed_steps(open_run(out, progress=False), "child-1.5x", timed, other)
    assert "not recorded as finished, so `puzzle refine` without --no-measure refines afresh" in \
        "".join(capsys.readouterr())


def test_damaged_feedback_limits_are_passed_over_and_damaged_budgets_refused(run, capsys):
    """Breaker: a hand-edited record's `feedback_budgets` that is null, not a mapping or empty crashed with a traceback
    after the timing, or re-solved the child under no limit at all; missing `budgets` raised a KeyError."""
    from puzzle.refine import FEEDBACK_BUDGETS_KEY, feedback_limits

    budgets = Budgets(max_runtime_ms=10.0)
    record = {"budgets": budgets.to_dict()}
    tighter = Budgets(max_runtime_ms=8.0)
    assert feedback_limits(run, "child-1.5x-refined", record) == budgets
    assert feedback_limits(run, "child-1.5x-refined", {**record, FEEDBACK_BUDGETS_KEY: tighter.to_dict()}) == tighter
    for damaged in (None, "abc", [1, 2], {}, {"max_memory_mib": 5.0}, {"max_runtime_ms": "abc"}):
        assert feedback_limits(run, "child-1.5x-refined", {**record, FEEDBACK_BUDGETS_KEY: damaged}) == budgets
        assert f"its {FEEDBACK_BUDGETS_KEY} are damaged" in "".join(capsys.readouterr()), damaged
    for damaged in ({}, {"budgets": None}, {"budgets": "abc"}):
        with pytest.raises(PuzzleError, match=r"child-1.5x-refined.json: its budgets are missing or damaged.*"
                                              r"child-1.5x.csv and run `puzzle refine` again"):
            feedback_limits(run, "child-1.5x-refined", damaged)


def test_exclude_leaves_its_variants_out_of_every_refine_candidate(run, table):
    """A child searched with --exclude (its record's `exclude`) is refined the same way: the diverse step's MIP
    children, the greedy seed, a given seed that uses a left-out variant (dropped), and the refinement rounds."""
    from puzzle.refine import refine, seed_choices
    from puzzle.search import uses_excluded

    _, budgets = _child(run)
    plain = diverse_candidates(run, table, budgets, k=2, min_layers_differ=1, tokens=128)
    parent = {sub for b in run.parent.config.blocks for sub in (b.attention.id, b.ffn.id)}
    used = pd.Series([sub for b in map(BlockConfig.from_id, plain["choice"][0])
                      for sub in (b.attention.id, b.ffn.id) if sub not in parent])
    assert len(used), "the tiny child should change a subblock, or leaving one out tests nothing"
    ex = [used.value_counts().index[0]]  # the variant the first plain child uses most (an audit: the most used by
    # both children may be one the first child lacks, which the timings of another machine can pick)
    assert uses_excluded(plain["choice"][0], ex)  # so the given seed below is dropped for the exclusion alone
    seeds = seed_choices(run, table, budgets, exclude=ex)
    assert "greedy" in seeds and not uses_excluded(seeds["greedy"], ex)
    df = diverse_candidates(run, table, budgets, k=2, min_layers_differ=1, tokens=128, exclude=ex,
                            seeds={**seeds, "given": plain["choice"][0]})
    assert "given" not in set(df["source"]) and not any(uses_excluded(c, ex) for c in df["choice"])
    history = refine(run, table, budgets, df["choice"][df.attrs["best"]], k=2, max_changes=2, max_rounds=1,
                     tokens=128, exclude=ex)
    assert len(history) > 1 and not any(uses_excluded(c, ex) for c in history["choice"])


def test_improve_child_follows_the_records_exclusion_and_says_why_a_seed_is_missing(run, tmp_path, capsys):
    """A child whose record names exclusions is refined without them, its new records name them too, a layer
    removal seed the exclusion (not the budget) rules out is said to be left out for that reason, and the
    no_linear_attention seed, which would be the search's own child when linear attention is already left out, is
    passed over without a word."""
    import json
    import shutil

    from puzzle.baselines import open_run
    from puzzle.pipeline import read_architecture
    from puzzle.search import uses_excluded

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    path = copy.out / "search" / "child-1.5x.json"
    record = json.loads(path.read_text())
    exclude = ["attn-linear", "ffn-noop"]  # sorted, as the records keep them
    path.write_text(json.dumps({**record, "exclude": exclude}))
    capsys.readouterr()
    improve_child(copy, "child-1.5x", k=2, min_layers_differ=1, refine_k=1, max_changes=1, max_rounds=1, tokens=128)
    err = capsys.readouterr().err
    assert "leave out the no_op subblocks layer removal needs" in err
    assert f"its record was searched with exclusions {exclude}, the run's setting now is none" in err
    assert "no_linear_attention" not in err
    for step in ("diverse", "refined"):
        kept = read_architecture(copy, f"child-1.5x-{step}")
        assert kept["exclude"] == exclude and not uses_excluded(kept["choice"], exclude), step
    log = pd.read_csv(copy.out / "refine" / "child-1.5x.csv")
    assert not any(uses_excluded(c.split(), exclude) for c in log["choice"])
    assert not {"layer_removal", "no_linear_attention"} & set(log["source"].dropna())


def test_select_context_weighs_the_selection_kl_and_keeps_the_weights_once(run, tmp_path, monkeypatch, capsys):
    """score.select_context N: selection_kl is the weighted mean over the scoring positions with the parent's
    context weights (computed once, kept in DIR/score, recomputed for another parent or other ids); 0 is the plain
    mean; a window as long as the sequences is refused; a finished refinement is not "done" for another window."""
    import shutil

    from puzzle import refine as refine_module
    from puzzle.baselines import open_run
    from puzzle.config import ScoreConfig
    from puzzle.refine import selection_ids
    from puzzle.scoring import quality
    from puzzle.scoring.quality import context_weights, evaluate_model, parent_logprobs

    shutil.copytree(run.out, tmp_path / "r")
    copy = open_run(tmp_path / "r", progress=False)
    shutil.rmtree(copy.out / "refine", ignore_errors=True)
    blocks, _ = _child(copy)
    model = realize_blocks(copy, list(blocks))
    ids = selection_ids(copy, 128)
    logp = parent_logprobs(copy.parent.model, ids)
    plain = selection_kl(copy, model, 128)
    assert plain == pytest.approx(evaluate_model(model, ids, logp)["kl_nats"], rel=1e-6)
    window = 4
    copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(copy.config.score, select_context=window))
    weights = context_weights(copy.parent.model, ids, logp, window=window)
    weighted = selection_kl(copy, model, 128)
    assert weighted == pytest.approx(evaluate_model(model, ids, logp, weights=weights)["kl_nats"], rel=1e-5)
    assert weighted != pytest.approx(plain, rel=1e-3)
    kept = copy.out / "score" / f"context_weights-{window}.pt"
    assert kept.is_file() and "context weights" in capsys.readouterr().err
    refine_module._SELECTION_WEIGHTS.clear()  # a new process: read from the file, not computed again
    monkeypatch.setattr(quality, "context_weights", lambda *a, **kw: pytest.fail("computed again"))
    assert selection_kl(copy, model, 128) == pytest.approx(weighted, rel=1e-6)
    monkeypatch.undo()
    refine_module._SELECTION_WEIGHTS.clear()
    kept.write_bytes(b"damaged")  # computed again and replaced
    assert selection_kl(copy, model, 128) == pytest.approx(weighted, rel=1e-6)
    assert torch.load(kept, weights_only=True)["weights"].shape == ids.shape
    # ids that are the file's first sequences take its first rows (breaker: --select-tokens below the in-context
    # table's 2,048 and the table's own ids replaced each other's weights on every call)
    more = selection_ids(copy)  # (8, T): 128 tokens are its first 2 sequences
    assert more.shape[0] > ids.shape[0] and torch.equal(more[:ids.shape[0]], ids)
    refine_module._SELECTION_WEIGHTS.clear()
    weighed = []  # ids whose first sequences are the file's add only the others' (stop 59 leftover: all again)
    monkeypatch.setattr(quality, "context_weights", lambda m, x, *a, **kw: weighed.append(x.shape[0]) or
                        context_weights(m, x, *a, **kw))
    longer = refine_module.selection_weights(copy, more)
    monkeypatch.undo()
    assert weighed == [more.shape[0] - ids.shape[0]] and torch.allclose(longer[:ids.shape[0]], weights, atol=1e-6)
    assert torch.allclose(longer, context_weights(copy.parent.model, more, parent_logprobs(copy.parent.model, more),
                                                  window=window), atol=1e-6)
    assert torch.load(kept, weights_only=True)["weights"].shape == more.shape  # the file holds all 8 now
    refine_module._SELECTION_WEIGHTS.clear()
    monkeypatch.setattr(quality, "context_weights", lambda *a, **kw: pytest.fail("computed again"))
    assert selection_kl(copy, model, 128) == pytest.approx(weighted, rel=1e-6)
    assert torch.load(kept, weights_only=True)["weights"].shape == more.shape  # the first rows: not replaced
    monkeypatch.undo()
    seq_len = ids.shape[1]
    with pytest.raises(PuzzleError, match=f"give 0 to {seq_len - 1}"):  # refused with the configuration
        copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(copy.config.score,
                                                                                 select_context=seq_len))
    for bad in (-1, 1.5, True):
        with pytest.raises(PuzzleError, match="select_context"):
            ScoreConfig(select_context=bad)
    # a refinement finished with the plain mean is not done for a window, and the other way round
    settings = dict(k=2, min_layers_differ=1, refine_k=1, max_changes=1, tokens=128, max_rounds=1)
    copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(copy.config.score, select_context=0))
    improve_child(copy, "child-1.5x", **settings)
    copy.config = dataclasses.replace(copy.config, score=dataclasses.replace(copy.config.score, select_context=window))
    capsys.readouterr()
    df = improve_child(copy, "child-1.5x", **settings)
    assert "already refined" not in capsys.readouterr().err
    assert df.loc[df["step"] == "plain", "score_kl_nats"].item() == pytest.approx(weighted, rel=1e-5)
    improve_child(copy, "child-1.5x", **settings)
    assert "already refined" in capsys.readouterr().err
    # one made before the in-context table was weighted too (its inputs lack "context_table") is made again
    saved = copy.out / "refine" / "child-1.5x.inputs.json"
    inputs = json.loads(saved.read_text())
    assert inputs["settings"].pop("context_table") == "weighted"
    saved.write_text(json.dumps(inputs))
    improve_child(copy, "child-1.5x", **settings)
    assert "already refined" not in capsys.readouterr().err


def test_select_context_benchmark_compares_windows_on_the_same_children(tmp_path_factory, tmp_path, capsys):
    """benchmarks/select_context.py on the tiny run: one summary row per (speed-up, window), window 0 the plain
    selection KL of refine; bad input is one line and exit 2 before any work."""
    bench = load_benchmark("select_context")
    run_dir = tiny_run_dir(tmp_path_factory)
    for flags, says in ((["--windows", "a"], "whole numbers"), (["--windows", "0,-8"], "--windows '0,-8': give whole"),
                        (["--windows", "4096"], "not shorter than the scoring sequences"),
                        (["--speedups", "abc"], "--speedups 'abc': 'abc' is not a speed-up"),
                        (["--speedups", "1.5,1000"], "--speedups 1000: no child of this run's score table reaches")):
        assert_refuses(bench, ["--run", str(run_dir), "--out", str(tmp_path / "bad"), *flags], says, capsys)
    assert not (tmp_path / "bad").exists()
    assert bench.main(["--run", str(run_dir), "--out", str(tmp_path / "b"), "--windows", "0,4", "--speedups", "1.5",
                       "--k", "2", "--tokens", "128"]) == 0
    summary = pd.read_csv(tmp_path / "b" / "select_context.csv")
    per_child = pd.read_csv(tmp_path / "b" / "select_context_children.csv")
    assert list(summary["select_context"]) == [0, 4] and (summary["children"] == len(per_child)).all()
    assert summary["picked_eval_kl_nats"].ge(summary["best_eval_kl_nats"]).all()
    from puzzle.baselines import open_run
    from puzzle.pipeline import build_child

    run = open_run(run_dir, progress=False)  # window 0 is what refine chooses by
    first = per_child.iloc[0]
    assert first["kl_w0"] == pytest.approx(selection_kl(run, build_child(run, {"choice": first["choice"].split()},
                                                                         "bld"), 128), rel=1e-5)


def test_select_context_benchmark_keeps_its_children_across_an_interruption(tmp_path_factory, tmp_path, capsys,
                                                                             monkeypatch):
    """Leftover of stop 59: the benchmark kept nothing of an interrupted call and Ctrl-C printed a traceback."""
    import puzzle.pipeline as pipeline

    bench = load_benchmark("select_context")
    run_dir = tiny_run_dir(tmp_path_factory)
    argv = ["--run", str(run_dir), "--out", str(tmp_path / "b"), "--windows", "0,4", "--speedups", "1.5", "--k", "2",
            "--tokens", "128"]
    real, built = pipeline.build_child, []

    def build(*a, **k):
        if len(built) == 1:
            raise KeyboardInterrupt
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "build_child", build)
    assert bench.main(argv) == 130
    assert "interrupted; the children measured so far (1 in" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "build_child", lambda *a, **k: built.append(1) or real(*a, **k))
    assert bench.main(argv) == 0
    children = len(pd.read_csv(tmp_path / "b" / "select_context_children.csv"))
    assert len(built) == children and "(1 kept from an earlier call)" in capsys.readouterr().out
    monkeypatch.setattr(pipeline, "build_child", None)  # a third call measures nothing
    assert bench.main(argv) == 0 and f"({children} kept from an earlier call)" in capsys.readouterr().out


def test_the_plain_childs_timing_is_named_where_it_is_or_the_command_that_makes_it(tmp_path):
    """Breaker: refine's last line said the plain child's speed-up is in DIR/summary.csv on a run that had none."""
    from puzzle.refine import plain_timing_note

    assert plain_timing_note(tmp_path, "child-1.2x") == (f"it has not been timed yet: `puzzle front --out {tmp_path}` "
                                                         f"or `puzzle realize --out {tmp_path} --name child-1.2x` times it")
    (tmp_path / "children" / "realized").mkdir(parents=True)
    (tmp_path / "children" / "realized" / "child-1.2x.json").write_text("{}")
    assert plain_timing_note(tmp_path, "child-1.2x").endswith(str(tmp_path / "children/realized/child-1.2x.json"))
    (tmp_path / "summary.csv").write_text("name,speedup\nparent,1\nchild-1.5x,1.5\n")  # another child's
    assert "realized" in plain_timing_note(tmp_path, "child-1.2x")
    (tmp_path / "summary.csv").write_text("name,speedup\nparent,1\nchild-1.2x,1.2\n")
    assert plain_timing_note(tmp_path, "child-1.2x") == f"its own measured speed-up is in {tmp_path / 'summary.csv'}"
