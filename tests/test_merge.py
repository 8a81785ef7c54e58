"""Checkpoint merging: weighted averages of the same architecture, refusals of different ones."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import PuzzleError
from puzzle.export import export_checkpoint
from puzzle.merge import add_merge_parser, merge_checkpoints, merge_models, merge_state_dicts
from puzzle.parent import load_parent
from puzzle.realize import realize_child
from puzzle.tiny import tiny_parent


def test_weighted_average_of_state_dicts():
    a = {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "n": torch.tensor([7])}
    b = {"w": 3 * torch.ones(2, 3), "b": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor([7])}
    m = merge_state_dicts([a, b], [3, 1])  # normalised to 0.75, 0.25
    assert torch.allclose(m["w"], torch.full((2, 3), 1.5)) and m["b"].dtype == torch.bfloat16
    assert torch.allclose(m["b"].float(), torch.full((3,), 0.25)) and torch.equal(m["n"], a["n"])
    assert torch.equal(merge_state_dicts([a, b])["w"], torch.full((2, 3), 2.0))
    for weights in ([1, -1], [float("inf"), 1], [float("nan"), 1]):
        with pytest.raises(PuzzleError, match="positive finite"):
            merge_state_dicts([a, b], weights)
    assert torch.equal(merge_state_dicts([a, b], [1e308, 1e308])["w"], torch.full((2, 3), 2.0))  # no overflow
    with pytest.raises(PuzzleError, match="one weight per checkpoint"):
        merge_state_dicts([a, b], [1])
    with pytest.raises(PuzzleError, match=r"\(2, 3\).*\(3, 2\)"):
        merge_state_dicts([a, {**b, "w": torch.ones(3, 2)}])
    with pytest.raises(PuzzleError, match="other tensors"):
        merge_state_dicts([a, {"w": b["w"], "b": b["b"]}])
    # breaker: an integer copy of a float tensor was averaged in one order and refused in the other
    as_int = {**b, "w": b["w"].long()}
    for pair, want in (([a, as_int], "w is float32 in checkpoint 0 but int64 in checkpoint 1"),
                       ([as_int, a], "w is int64 in checkpoint 0 but float32 in checkpoint 1")):
        with pytest.raises(PuzzleError, match=want):
            merge_state_dicts(pair)


def test_merged_model_is_the_average_and_runs():
    m1, m2 = tiny_parent(seed=0).model, tiny_parent(seed=1).model
    merged = merge_models([m1, m2], [0.25, 0.75])
    for (name, p), p1, p2 in zip(merged.named_parameters(), m1.parameters(), m2.parameters()):
        assert torch.allclose(p, 0.25 * p1 + 0.75 * p2, atol=1e-7), name
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
    assert merged(torch.tensor([[1, 5, 9]])).shape == (1, 3, m1.config.vocab_size)


def test_different_architectures_are_refused_with_the_first_difference():
    parent = tiny_parent().model
    blocks = list(parent.config.blocks)
    blocks[2] = BlockConfig(AttentionConfig("no_op"), blocks[2].ffn)
    child = realize_child(parent, None, blocks)
    with pytest.raises(PuzzleError, match="layer 2 is attn-noop\\+ffn-128 in one and attn-kv2\\+ffn-128"):
        merge_models([child, parent])
    wide = tiny_parent(intermediate_size=192).model
    with pytest.raises(PuzzleError, match="different architectures"):
        merge_models([parent, wide])
    with pytest.raises(PuzzleError, match="layer 0 is attn-kv2\\+ffn-128 in one and attn-kv2\\+ffn-64"):
        merge_models([parent, _with_ffn(parent, 64)])
    import dataclasses

    from puzzle.parent import model_from_state_dict

    untied = model_from_state_dict(dataclasses.replace(parent.config, tie_word_embeddings=not
                                                       parent.config.tie_word_embeddings), {
        **parent.state_dict(), "lm_head.weight": parent.model.embed_tokens.weight.detach().clone()})
    with pytest.raises(PuzzleError, match="tie_word_embeddings .*export both tied, or both with `puzzle export "
                                          "--untie-embeddings`"):  # breaker: it said no fix
        merge_models([parent, untied])


def _with_ffn(parent, width):
    """The parent with layer 0's FFN narrowed to its first `width` channels (a same-depth, other-width model)."""
    from puzzle.modeling import PuzzleForCausalLM

    blocks = list(parent.config.blocks)
    blocks[0] = BlockConfig(blocks[0].attention, FFNConfig("swiglu", width))
    m = PuzzleForCausalLM(parent.config.with_blocks(blocks))
    sd = parent.state_dict()
    for k in ("gate_proj", "up_proj"):
        sd[f"model.layers.0.mlp.{k}.weight"] = sd[f"model.layers.0.mlp.{k}.weight"][:width]
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :width]
    m.load_state_dict(sd)
    return m


def test_cli_merges_exported_folders_and_state_dict_files(tmp_path):
    loaded = [tiny_parent(seed=s) for s in (0, 1)]
    for i, lm in enumerate(loaded):
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{i}")
    p = argparse.ArgumentParser()
    add_merge_parser(p.add_subparsers())
    args = p.parse_args(["merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "--weights", "1", "3",
                         "--dest", str(tmp_path / "merged")])
    assert args.func(args) == 0
    merged = load_parent(tmp_path / "merged").model
    w0, w1 = loaded[0].model.model.norm.weight, loaded[1].model.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(merged.model.layers[0].mlp.up_proj.weight,
                          0.25 * loaded[0].model.model.layers[0].mlp.up_proj.weight + 0.75 * w1, atol=1e-7)
    assert torch.allclose(merged.model.norm.weight, w0)  # both norms are ones
    sd = [load_file(tmp_path / f"m{i}" / "model.safetensors") for i in (0, 1)]
    for i, s in enumerate(sd):
        save_file(s, tmp_path / f"s{i}.safetensors")
    out = merge_checkpoints([tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"], tmp_path / "avg.safetensors")
    avg = load_file(out)
    assert torch.allclose(avg["model.embed_tokens.weight"], (sd[0]["model.embed_tokens.weight"]
                                                             + sd[1]["model.embed_tokens.weight"]) / 2)
    with pytest.raises(PuzzleError, match="only model folders or only state-dict files"):
        merge_checkpoints([tmp_path / "m0", tmp_path / "s1.safetensors"], tmp_path / "x")


def test_a_merge_with_other_weights_does_not_replace_an_earlier_merge(tmp_path):
    """Trained weights are replaced only by the same training: a merge with other weights (or another --dtype) into an
    earlier merge's folder is refused before loading; the same merge, inputs in any order, replaces it."""
    loaded = [tiny_parent(seed=s) for s in (0, 1)]
    for i, lm in enumerate(loaded):
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{i}")
    m0, m1, dest = tmp_path / "m0", tmp_path / "m1", tmp_path / "merged"
    merge_checkpoints([m0, m1], dest, [1, 3])
    before = (dest / "model.safetensors").read_bytes()
    for weights, dtype in (([1, 1], None), ([1, 3], "bfloat16")):
        with pytest.raises(PuzzleError, match="holds trained weights") as refused:
            merge_checkpoints([m0, m1], dest, weights, dtype)
        # by the paths recorded, in the order given (breaker: "merge of weights 6be53b... x0.1, ...", by hash)
        assert f"(merge of {m0} x0.25, {m1} x0.75, inputs as recorded then) that this export would" \
            in str(refused.value)
    assert (dest / "model.safetensors").read_bytes() == before
    merge_checkpoints([m1, m0], dest, [3, 1])  # the same merge
    assert (dest / "model.safetensors").read_bytes() == before
    with pytest.raises(PuzzleError, match="inside the exported model"):  # a folder inside an input
        merge_checkpoints([m0, m1], m0 / "sub")
    assert not (m0 / "sub").exists()


def test_a_state_dict_merge_replaces_only_its_own_earlier_output(tmp_path):
    """Breaker: a state-dict merge overwrote any existing .safetensors (a gkd export's weights, another merge, an
    unrelated file); now only a rerun of the same merge (inputs in any order) replaces its file."""
    loaded = [tiny_parent(seed=s) for s in (0, 1)]
    for i, lm in enumerate(loaded):
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{i}")
        save_file(load_file(tmp_path / f"m{i}" / "model.safetensors"), tmp_path / f"s{i}.safetensors")
    s0, s1, dest = tmp_path / "s0.safetensors", tmp_path / "s1.safetensors", tmp_path / "avg.safetensors"
    merge_checkpoints([s0, s1], dest, [1, 3])
    before = dest.read_bytes()
    with pytest.raises(PuzzleError, match="holds another merge"):
        merge_checkpoints([s0, s1], dest, [1, 1])
    assert dest.read_bytes() == before
    merge_checkpoints([s1, s0], dest, [3, 1])  # the same merge again
    assert torch.equal(load_file(dest)["model.norm.weight"], load_file(s0)["model.norm.weight"])
    other = tmp_path / "notes.safetensors"
    save_file({"x": torch.ones(2)}, other)
    theirs = other.read_bytes()
    with pytest.raises(PuzzleError, match="is not an earlier `puzzle merge` output"):
        merge_checkpoints([s0, s1], other)
    assert other.read_bytes() == theirs
    weights = tmp_path / "m0" / "model.safetensors"
    exported = weights.read_bytes()
    for target in (weights, tmp_path / "m0" / "extra.safetensors"):  # an export's weights, or a file inside it
        with pytest.raises(PuzzleError, match="inside the exported model"):
            merge_checkpoints([s0, s1], target)
    assert weights.read_bytes() == exported and not (tmp_path / "m0" / "extra.safetensors").exists()


def test_a_state_dict_merge_of_the_earlier_version_is_rerun_and_model_folders_are_refused(tmp_path, monkeypatch):
    """Review: the earlier version wrote the merge's metadata as Python literals of the paths as typed; a rerun of
    that merge replaces it. A .safetensors --dest in a model folder would become one more shard of its weights."""
    from safetensors.torch import save_file as save

    monkeypatch.chdir(tmp_path)
    lm = tiny_parent(seed=0)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for name, scale in (("s0", 1.0), ("s1", 1.5)):  # two checkpoints that differ (a copy of one is refused)
        save({k: v * scale for k, v in state.items()}, tmp_path / f"{name}.safetensors")
    save(state, tmp_path / "avg.safetensors", metadata={"merged_from": str(["s0.safetensors", "s1.safetensors"]),
                                                        "weights": str([0.5, 0.5])})
    merge_checkpoints(["s0.safetensors", "s1.safetensors"], "avg.safetensors")  # the same merge: replaced
    with pytest.raises(PuzzleError, match="holds another merge"):
        merge_checkpoints(["s0.safetensors", "s1.safetensors"], "avg.safetensors", [1, 3])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(PuzzleError, match="inside the model folder"):
        merge_checkpoints(["s0.safetensors", "s1.safetensors"], "hf/avg.safetensors")
    assert not (tmp_path / "hf" / "avg.safetensors").exists()


def test_merge_inputs_are_known_by_their_weights(tmp_path):
    """Breaker: merges knew their inputs by path only, so a rewritten input at the same path replaced the merge
    silently and a moved input was refused; an input given twice and a folder merge into a file name were taken."""
    loaded = [tiny_parent(seed=s) for s in (0, 1, 2)]
    for i, lm in enumerate(loaded):
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{i}")
        save_file(load_file(tmp_path / f"m{i}" / "model.safetensors"), tmp_path / f"s{i}.safetensors")
    avg = tmp_path / "avg.safetensors"
    s0, s1, s2 = list((tmp_path / f"s{i}.safetensors" for i in (0, 1, 2)))
    merge_checkpoints([s0, s1], avg)
    s0.rename(tmp_path / "moved.safetensors")
    merge_checkpoints([tmp_path / "moved.safetensors", s1], avg)  # the same weights elsewhere: the same merge
    s2.rename(s0)  # other weights where an input was
    before = avg.read_bytes()
    with pytest.raises(PuzzleError, match="holds another merge .* with other input weights"):
        merge_checkpoints([s0, s1], avg)
    assert avg.read_bytes() == before
    m0, m1, m2, dest = tmp_path / "m0", tmp_path / "m1", tmp_path / "m2", tmp_path / "merged"
    merge_checkpoints([m0, m1], dest)
    m0.rename(tmp_path / "moved")
    merge_checkpoints([tmp_path / "moved", m1], dest)  # replaced: the same merge
    m2.rename(m0)
    before = (dest / "model.safetensors").read_bytes()
    with pytest.raises(PuzzleError, match="holds trained weights"):
        merge_checkpoints([m0, m1], dest)
    assert (dest / "model.safetensors").read_bytes() == before
    with pytest.raises(PuzzleError, match="an input is given twice"):
        merge_checkpoints([m1, tmp_path / "m1" / ".." / "m1"], tmp_path / "twice")
    shutil.copytree(m1, tmp_path / "copy")  # breaker: a copy of an input was merged with it into that input
    shutil.copy(s1, tmp_path / "copy.safetensors")
    for pair, dest_ in (([m1, tmp_path / "copy"], tmp_path / "c"), ([s1, tmp_path / "copy.safetensors"], avg)):
        with pytest.raises(PuzzleError, match=r"hold the same weights \(a copy\?\), so their average is that"):
            merge_checkpoints(pair, dest_)
    with pytest.raises(PuzzleError, match="merge into a folder"):
        merge_checkpoints([m0, m1], tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()
    config = json.loads((dest / "config.json").read_text())  # as an earlier version recorded it: by path only
    del config["puzzle"]["merge"]["inputs_sha"]
    (dest / "config.json").write_text(json.dumps(config))
    merge_checkpoints([tmp_path / "moved", m1], dest)  # the same paths: the same merge


def test_a_folder_merge_is_stored_in_the_first_inputs_dtype(tmp_path):
    """Reviewer: bf16 folders merged into an fp32 folder (load_parent reads in fp32), twice the size, though the
    docs say the first checkpoint's dtype."""
    from puzzle.merge import stored_dtype

    loaded = [tiny_parent(seed=s) for s in (0, 1)]
    for i, lm in enumerate(loaded):
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"b{i}", dtype="bfloat16")
    export_checkpoint(loaded[1].model, loaded[1].tokenizer, tmp_path / "f1")
    assert stored_dtype(tmp_path / "b0") == "bfloat16" and stored_dtype(tmp_path / "f1") == "float32"
    config = tmp_path / "b0" / "config.json"
    kept = config.read_text()
    config.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k not in ("torch_dtype", "dtype")}))
    assert stored_dtype(tmp_path / "b0") == "bfloat16"  # from the safetensors header
    config.write_text(kept)
    for inputs, want in ((["b0", "b1"], torch.bfloat16), (["b0", "f1"], torch.bfloat16), (["f1", "b0"], torch.float32)):
        dest = tmp_path / ("m-" + "-".join(inputs))
        merge_checkpoints([tmp_path / p for p in inputs], dest)
        assert {t.dtype for t in load_file(dest / "model.safetensors").values()} == {want}, inputs
        assert json.loads((dest / "config.json").read_text())["torch_dtype"] == str(want).removeprefix("torch.")
    dest = merge_checkpoints([tmp_path / "b0", tmp_path / "b1"], tmp_path / "m32", dtype="float32")  # --dtype wins
    assert {t.dtype for t in load_file(dest / "model.safetensors").values()} == {torch.float32}


def test_non_finite_weights_are_refused_where_they_are_loaded_and_written(tmp_path):
    """Breaker: a float16 merge of large weights wrote inf, a merge with a NaN input wrote NaN, and eval reported
    an accuracy from the NaN logits of such a folder: no command said anything."""
    import re

    a, big = tiny_parent(seed=0), tiny_parent(seed=1)
    export_checkpoint(a.model, a.tokenizer, tmp_path / "a")
    with torch.no_grad():
        big.model.model.norm.weight.mul_(1e6)  # finite in float32, past float16's 65504
    export_checkpoint(big.model, big.tokenizer, tmp_path / "big")
    with pytest.raises(PuzzleError, match="weight model.norm.weight overflows float16 .* float32 or bfloat16"):
        merge_checkpoints([tmp_path / "a", tmp_path / "big"], tmp_path / "m16", dtype="float16")
    assert not (tmp_path / "m16").exists()
    merge_checkpoints([tmp_path / "a", tmp_path / "big"], tmp_path / "mbf16", dtype="bfloat16")  # it fits there
    weights = tmp_path / "a" / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"][0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    for call in (lambda: load_parent(tmp_path / "a"),
                 lambda: merge_checkpoints([tmp_path / "a", tmp_path / "big"], tmp_path / "mnan")):
        with pytest.raises(PuzzleError, match=re.escape("the weight model.norm.weight holds NaN or inf values")):
            call()
    assert not (tmp_path / "mnan").exists()
    with pytest.raises(PuzzleError, match="holds NaN or inf values: the model is broken"):  # a model in memory
        with torch.no_grad():
            a.model.model.norm.weight[0] = float("inf")
        export_checkpoint(a.model, a.tokenizer, tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


def test_inputs_of_different_tokenizers_are_refused(tmp_path):
    """Breaker: two token ids swapped in one input's tokenizer.json were merged unsaid (the first's kept)."""
    for i in (0, 1):
        lm = tiny_parent(seed=i)
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{i}")
    path = tmp_path / "m1" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (50, 51)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))
    with pytest.raises(PuzzleError, match="have different tokenizers .* is id (50|51) in one and (50|51) in the other"):
        merge_checkpoints([tmp_path / "m0", tmp_path / "m1"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_state_dict_merge_takes_dtype_and_refuses_nan_and_overflow(tmp_path):
    """Breaker: --dtype was ignored for .safetensors inputs, and a state-dict merge wrote NaN (an input's) and inf
    (a float16 first input averaged with 1e6) where a folder merge refuses both."""
    from safetensors.torch import load_file, save_file

    from puzzle.merge import merge_checkpoints

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}, a)
    save_file({"w": torch.tensor([3.0, 4.0]), "n": torch.tensor([3])}, b)
    out = load_file(merge_checkpoints([a, b], tmp_path / "m.safetensors", dtype="bfloat16"))
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 3.0] and out["n"].dtype == torch.int64
    save_file({"w": torch.tensor([float("nan"), 1.0]), "n": torch.tensor([3])}, b)
    with pytest.raises(PuzzleError, match=f"w holds NaN or inf values in {b}"):
        merge_checkpoints([a, b], tmp_path / "nan.safetensors")
    save_file({"w": torch.tensor([1.0, 1.0], dtype=torch.float16), "n": torch.tensor([3])}, a)
    save_file({"w": torch.tensor([1e6, 1.0]), "n": torch.tensor([3])}, b)
    with pytest.raises(PuzzleError, match=r"w overflows float16 \(its largest magnitude is 1e\+06\): store it in "
                                          r"float32 or bfloat16 \(--dtype\)"):
        merge_checkpoints([a, b], tmp_path / "inf.safetensors")
    assert not (tmp_path / "nan.safetensors").exists() and not (tmp_path / "inf.safetensors").exists()
    assert load_file(merge_checkpoints([a, b], tmp_path / "f32.safetensors", dtype="float32"))["w"][0] == 500000.5


def test_the_built_in_tiny_model_is_named_as_no_merge_input(tmp_path, monkeypatch):
    """Breaker: `puzzle merge tiny FOLDER` said only "tiny does not exist", though sft and rpo take 'tiny'."""
    from puzzle.merge import merge_checkpoints

    monkeypatch.chdir(tmp_path)  # no ./tiny here
    with pytest.raises(PuzzleError, match="tiny does not exist; merge takes model folders or state-dict files, not "
                                          "the built-in tiny model"):
        merge_checkpoints(["tiny", "tiny"], tmp_path / "out")
