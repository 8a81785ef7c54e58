"""`realize_child(share=True)`: children timed together hold the parent's tensors and each library entry once."""

import json

import pytest
import torch

from puzzle.architecture import BlockConfig
from puzzle.baselines import open_run
from puzzle.realize import realize_child
from tiny_run import tiny_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _storages(*models) -> dict[int, int]:
    """Bytes of each distinct storage the models' parameters use (by address)."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}


def test_shared_children_hold_the_parents_tensors_and_each_entry_once_and_compute_the_same(tmp_path_factory):
    run = open_run(tiny_run_dir(tmp_path_factory), progress=False)
    parent = run.parent.model
    searched = [json.loads((run.out / "search" / f"{n}.json").read_text())["choice"]
                for n in json.loads((run.out / "search" / "chosen.json").read_text())["names"]]
    children = [[BlockConfig.from_id(b) for b in choice] for choice in searched]
    assert len(children) >= 2 and any(b != p for b, p in zip(children[0], parent.config.blocks))
    entries: dict = {}
    shared = [realize_child(parent, run.library, blocks, share=True, entries=entries) for blocks in children]
    copies = [realize_child(parent, run.library, blocks) for blocks in children]
    ids = torch.randint(0, parent.config.vocab_size, (2, 16))
    for s, c in zip(shared, copies):
        assert not s.training and not any(p.requires_grad for p in s.parameters())
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in s.parameters())
        with torch.no_grad():
            assert torch.equal(s(ids), c(ids))  # the same weights, the same logits
        assert s.model.embed_tokens.weight.data_ptr() == parent.model.embed_tokens.weight.data_ptr()
        for i, (block, own) in enumerate(zip(s.config.blocks, parent.config.blocks)):
            if block.ffn == own.ffn:  # a subblock kept from the parent is the parent's tensor
                assert s.model.layers[i].mlp.down_proj.weight.data_ptr() == \
                    parent.model.layers[i].mlp.down_proj.weight.data_ptr()
    # the entries two children both use are held once, and the children need less than their copies
    common = {(i, b.ffn.id) for i, b in enumerate(children[0]) if b.ffn.kind == "swiglu"
              and b.ffn != parent.config.blocks[i].ffn} & {(i, b.ffn.id) for i, b in enumerate(children[1])}
    for i, _ in common:
        assert shared[0].model.layers[i].mlp.up_proj.weight.data_ptr() == \
            shared[1].model.layers[i].mlp.up_proj.weight.data_ptr()
    # nothing else: every tensor of the shared children is the parent's or a loaded entry's
    held = set(_storages(parent)) | {t.untyped_storage().data_ptr() for sub in entries.values() for t in sub.values()}
    assert set(_storages(*shared)) <= held
    extra = sum(n for ptr, n in _storages(*shared).items() if ptr not in set(_storages(parent)))
    assert extra < sum(_storages(*copies).values())
    used = {(i, v.id, "bld") for blocks in children for i, (b, p) in enumerate(zip(blocks, parent.config.blocks))
            for v, pv in ((b.attention, p.attention), (b.ffn, p.ffn)) if v.kind != "no_op" and v != pv}
    assert set(entries) == used and used  # one tensor set per (layer, variant, stage) the children use


def test_a_hand_written_choice_is_realized_with_the_tables_predictions_and_an_edited_one_is_refused(tmp_path_factory,
                                                                                                   tmp_path, capsys):
    """Breaker: a record of a choice alone was evaluated and timed, then `puzzle realize` ended in a KeyError; an
    edited choice whose rows were dropped kept child-2x's predicted 2.44x beside a measured 8.58x."""
    from puzzle.budgets import Budgets
    from puzzle.cli import main
    from puzzle.errors import PuzzleError
    from puzzle.pipeline import read_architecture
    from puzzle.refine import record_for
    from tiny_run import tiny_run_copy

    run_dir, _ = tiny_run_copy(tmp_path_factory, tmp_path / "run")
    run = open_run(run_dir, progress=False)
    searched = json.loads((run_dir / "search" / "child-1.5x.json").read_text())
    parent_ids = [b.id for b in run.parent.config.blocks]
    changed = next(i for i, (b, p) in enumerate(zip(searched["choice"], parent_ids)) if b != p)
    choice = list(searched["choice"])
    choice[changed] = parent_ids[changed]  # another choice than the search's: one cheaper block is the parent's again
    (run_dir / "search" / "bare.json").write_text(json.dumps({"choice": choice}))
    table = record_for(run, "bare", choice, "bld", Budgets(), None)
    bare = read_architecture(run, "bare")
    assert bare["runtime_ms"] == table["runtime_ms"] and bare["kl_nats"] == table["kl_nats"]
    assert bare["speedup"] == pytest.approx(table["speedup"])
    edited = {k: v for k, v in searched.items() if k != "rows"}
    (run_dir / "search" / "edited.json").write_text(json.dumps({**edited, "choice": choice}))
    with pytest.raises(PuzzleError, match=r"edited.json: its runtime_ms .* is not its choice's on the run's score "
                                          r"table \(.*\): the file was edited; delete its predicted totals"):
        read_architecture(run, "edited")
    assert main(["realize", "--out", str(run_dir), "--name", "bare", "--max-contention", "inf", "--no-progress"]) == 0
    realized = json.loads((run_dir / "children" / "realized" / "bare.json").read_text())
    assert realized["predicted_speedup"] == pytest.approx(table["speedup"])
    capsys.readouterr()  # a name that is no record lists every record, the hand-written ones too (breaker)
    assert main(["realize", "--out", str(run_dir), "--name", "nosuch", "--no-progress"]) == 2
    assert "'bare', " in capsys.readouterr().err
