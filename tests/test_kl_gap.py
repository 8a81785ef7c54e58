"""kl_gap: the steps from a child's predicted KL to its realized evaluation KL, on the tiny run."""

import math

import pytest

from puzzle.architecture import BlockConfig
from puzzle.budgets import Budgets
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.kl_gap import _sequences, kl_gap
from tiny_run import tiny_run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from puzzle.baselines import open_run

    return open_run(tiny_run_dir(tmp_path_factory), progress=False)


def _one_swap(run):
    """A searched child that swaps exactly one FFN subblock of the parent for its library's narrowest entry."""
    from puzzle.pipeline import load_score_table
    from puzzle.refine import record_for

    table, _ = load_score_table(run, "bld")
    rows = table[(table["subblock"] == "ffn") & ~table["is_parent"].astype(bool) & table["variant"].str.match(r"ffn-\d+")]
    row = rows.iloc[0]
    blocks = list(run.parent.config.blocks)
    layer = int(row["layer"])
    blocks[layer] = BlockConfig(blocks[layer].attention, type(blocks[layer].ffn).from_id(row["variant"]))
    rec = record_for(run, "child-one-swap", tuple(b.id for b in blocks), "bld", Budgets(), "test")
    atomic_write_json(run.out / "search" / "child-one-swap.json", rec)
    return "child-one-swap", float(row["kl_nats"])


def test_one_swapped_subblock_realizes_its_own_replace_one_kl(run):
    name, table_kl = _one_swap(run)
    df = kl_gap(run, [name], tokens=256).set_index("name")
    r = df.loc[name]
    assert r["subblocks"] == 1
    assert r["predicted_kl_nats"] == pytest.approx(table_kl)
    # one swap: nothing to compound, the realized child is the replace-1 model
    assert r["fresh_kl_nats"] == pytest.approx(r["fresh_sum_kl_nats"], rel=1e-4, abs=1e-7)
    assert r["eval_kl_nats"] == pytest.approx(r["eval_sum_kl_nats"], rel=1e-4, abs=1e-7)
    assert r["compounding_score"] == pytest.approx(1.0, rel=1e-3)
    assert df.attrs["tokens"] == {"fresh": 256, "eval": 256}


def test_a_front_child_splits_its_gap_into_steps_whose_product_is_the_realized_kl(run):
    df = kl_gap(run, ["child-1.25x", "child-1.5x"], tokens=128).set_index("name")
    for _, r in df.iterrows():
        assert r["subblocks"] > 1
        for col in ("fresh_sum_kl_nats", "fresh_kl_nats", "eval_sum_kl_nats", "eval_kl_nats"):
            assert math.isfinite(r[col]) and r[col] > 0
        assert r["predicted_kl_nats"] * r["selection"] * r["transfer"] * r["compounding_eval"] == \
            pytest.approx(r["eval_kl_nats"], rel=1e-9)
        assert r["fresh_sum_kl_nats"] * r["compounding_score"] == pytest.approx(r["fresh_kl_nats"], rel=1e-9)
    # the realized KL agrees with the whole-model evaluation on the same evaluation tokens (another code path)
    from puzzle.pipeline import read_architecture
    from puzzle.refine import realize_blocks
    from puzzle.scoring.quality import evaluate_model, parent_logprobs

    assert run.config.score.position_stride == 1
    ids = run.tokens.eval[:2]
    model = realize_blocks(run, [BlockConfig.from_id(b) for b in read_architecture(run, "child-1.5x")["choice"]])
    whole = evaluate_model(model, ids, parent_logprobs(run.parent.model, ids))["kl_nats"]
    assert df.loc["child-1.5x", "eval_kl_nats"] == pytest.approx(whole, rel=1e-4)


def test_unknown_child_and_exhausted_scoring_split_are_clear_errors(run):
    with pytest.raises(PuzzleError, match="no architecture named 'child-9x'"):
        kl_gap(run, ["child-9x"])
    ids = run.tokens.score
    with pytest.raises(PuzzleError, match="raise data.score_tokens"):
        _sequences(ids, ids.shape[0], 128, "the scoring split", "data.score_tokens")


def test_fresh_tokens_of_a_refined_child_lie_beyond_those_refine_chose_it_on(run):
    """Reviewer: the "fresh" scoring tokens were the first beyond the table's, which `puzzle refine` had chosen its
    -diverse/-refined children on, so their selection and compounding steps were measured on chosen-on text."""
    import json

    from puzzle.pipeline import read_architecture

    record = read_architecture(run, "child-1.5x")
    atomic_write_json(run.out / "search" / "child-z-refined.json", {**record, "name": "child-z-refined",
                                                                     "method": "mip-refined"})
    seq, rows = run.tokens.score.shape[1], run.tokens.score.shape[0]
    table_rows = max(1, run.config.score.tokens // seq)
    assert kl_gap(run, ["child-1.5x"], tokens=seq).attrs["fresh_start"] == table_rows  # a plain child: as before
    inputs = run.out / "refine" / "child-z.inputs.json"
    inputs.parent.mkdir(exist_ok=True)
    inputs.write_text(json.dumps({"settings": {"tokens": (table_rows + 2) * seq}}))  # refine's --select-tokens
    df = kl_gap(run, ["child-1.5x", "child-z-refined"], tokens=seq)
    assert df.attrs["fresh_start"] == table_rows + 2 < rows
    inputs.unlink()  # refine's default, 2048 tokens: the whole tiny scoring split
    assert 2048 // seq >= rows
    with pytest.raises(PuzzleError, match="chose child-z-refined on the first"):
        kl_gap(run, ["child-z-refined"], tokens=seq)
    (run.out / "search" / "child-z-refined.json").unlink()
