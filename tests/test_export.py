"""Export: an HF folder that AutoModelForCausalLM loads with the in-memory child's logits and generations."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast
from transformers.dynamic_module_utils import get_imports

from puzzle.architecture import (AttentionConfig, BlockConfig, FFNConfig, ModelConfig, block_config_entry,
                                 block_from_entry, ffn_mult_to_intermediate_size)
from puzzle.configuration_decilm import DeciLMConfig
from puzzle.errors import PuzzleError
from puzzle.export import CODE_FILES, export_checkpoint
from puzzle.modeling import PuzzleForCausalLM
from puzzle.modeling_decilm import DeciLMCache, DeciLMForCausalLM

VOCAB, BOS, EOS = 128, 1, 2  # padding uses EOS, so a finished row looks the same in HF's and our generate


def block(attn: str, ffn: str) -> BlockConfig:
    """'kv2' / 'linear' / 'noop' and '256' / 'linear' / 'noop' -> BlockConfig."""
    a = AttentionConfig("gqa", int(attn[2:])) if attn.startswith("kv") else AttentionConfig("no_op" if attn == "noop" else attn)
    f = FFNConfig("swiglu", int(ffn)) if ffn.isdigit() else FFNConfig("no_op" if ffn == "noop" else ffn)
    return BlockConfig(a, f)


# Layer 0 without attention, tied embeddings: the case where a cache that reads layer 0 goes wrong.
TIED_NOOP0 = dict(blocks=[block("noop", "256"), block("kv1", "96"), block("kv2", "linear"),
                          block("linear", "noop"), block("kv2", "256"), block("kv1", "128")],
                  head_dim=16, tie_word_embeddings=True)
# Untied, biases, explicit head_dim != hidden / heads, Llama-3 RoPE scaling.
UNTIED_BIAS = dict(blocks=[block("kv2", "256"), block("linear", "96"), block("noop", "linear"), block("kv1", "noop")],
                   head_dim=32, attention_bias=True, mlp_bias=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
VARIANTS = {"tied_noop0": TIED_NOOP0, "untied_bias_llama3": UNTIED_BIAS}


def tiny_child(blocks, seed: int = 0, **overrides) -> PuzzleForCausalLM:
    """hidden 64, 4 heads, parent 2 KV heads and width 256; weights scaled so every layer moves the logits."""
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, blocks=tuple(blocks), bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=EOS, **{"head_dim": 16, **overrides})
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over 'w3' ... 'w127', left padding with EOS."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", padding_side="left")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    """(child, tokenizer, export result, loaded HF model) for one variant, exported once per module."""
    child = tiny_child(**VARIANTS[request.param])
    tokenizer = tiny_tokenizer()
    result = export_checkpoint(child, tokenizer, tmp_path_factory.mktemp(request.param) / "child")
    hf = AutoModelForCausalLM.from_pretrained(result.path, trust_remote_code=True).eval()
    return child, tokenizer, result, hf


def prompt(*ids) -> torch.Tensor:
    return torch.tensor([ids])


def continuation_matches(row: torch.Tensor, alone: torch.Tensor) -> bool:
    """A batch row's new tokens equal the single run's, then only EOS (the batch ran on after it stopped)."""
    n = alone.numel()
    return torch.equal(row[:n], alone) and bool((row[n:] == EOS).all())


# -- loading and numerics ---------------------------------------------------------------------

def test_loads_with_remote_code_and_matches_logits(exported):
    child, _, _, hf = exported
    assert type(hf).__module__.startswith("transformers_modules.")  # the folder's code, not the package
    x = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = child(x)
        got = hf(x).logits
        got_masked = hf(x, attention_mask=torch.ones_like(x)).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_masked - want).abs().max().item() <= 1e-4


def test_unsupported_generate_options_are_named(exported):
    """Breaker: cache_implementation='static' failed as "attention_mask must be (B, S) ...; got shape (1, 1, 9, 12)",
    a mask the user never passed, and output_attentions=True gave None without a word."""
    _, _, _, hf = exported
    x = prompt(5, 6, 7)
    with pytest.raises(ValueError, match=r"cache_implementation='static' or a compiled cache, which this model does "
                                         r"not support"):
        hf.generate(x, cache_implementation="static", max_new_tokens=2, do_sample=False)
    with pytest.warns(UserWarning, match="output_attentions is not supported"):
        assert hf(x, output_attentions=True).attentions is None


def test_the_projects_own_loader_reopens_every_export(exported):
    """`load_parent` on an export (what generate, gkd, sft, merge and rpo do): the llama3-RoPE variant raised an
    AttributeError from AutoTokenizer, whose generic config for nemotron-nas lacks max_position_embeddings."""
    from puzzle.parent import load_parent

    child, tokenizer, result, _ = exported
    loaded = load_parent(str(result.path))
    assert loaded.tokenizer("w5 w9")["input_ids"] == tokenizer("w5 w9")["input_ids"]
    x = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (loaded.model(x) - child(x)).abs().max().item() <= 1e-5


def test_greedy_generate_matches_puzzle_generate(exported):
    child, _, _, hf = exported
    for p in (prompt(5, 17, 99, 42), prompt(64, 3, 77, 120, 8, 31, 19)):
        want = child.generate(p, 12, eos_token_id=EOS)
        got = hf.generate(p, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, want)


def test_left_padded_batch_matches_each_prompt_alone(exported):
    _, tokenizer, _, hf = exported
    texts = ["w5 w17 w99", "w64 w3 w77 w120 w8 w31 w19 w44"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padded
    out = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    P = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        alone = tokenizer(text, return_tensors="pt")
        single = hf.generate(**alone, max_new_tokens=12, do_sample=False)
        assert continuation_matches(out[i, P:], single[0, alone["input_ids"].shape[1]:])


def test_generate_continues_from_its_cache_when_layer0_has_no_attention():
    child = tiny_child(**TIED_NOOP0)
    hf = DeciLMForCausalLM(DeciLMConfig.from_model_config(child.config)).eval()
    hf.load_state_dict(child.state_dict())
    p = prompt(64, 3, 77, 120, 8, 31, 19)
    first = hf.generate(p, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.cache, DeciLMCache)
    assert first.cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token is not fed yet
    resumed = hf.generate(first.sequences, cache=first.cache, max_new_tokens=7, do_sample=False)
    assert torch.equal(resumed, child.generate(p, 12, eos_token_id=EOS))


def test_cache_length_comes_from_an_attention_layer():
    child = tiny_child(**TIED_NOOP0)
    hf = DeciLMForCausalLM(DeciLMConfig.from_model_config(child.config)).eval()
    hf.load_state_dict(child.state_dict())
    x = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    nxt = torch.tensor([[9]])
    with torch.no_grad():
        want = child(torch.cat([x, nxt], 1))[:, -1]
        ours = DeciLMCache(hf.config)
        plain = DynamicCache()
        hf(x, cache=ours)
        hf(x, cache=plain)
        assert ours.get_seq_length() == 7
        assert plain.get_seq_length() == 0  # layer 0 never stores keys: HF's default reads it anyway
        for cache in (ours, plain):  # forward itself reads the length from the first attention layer
            got = hf(nxt, cache=cache).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)  # cached decode: fp32 rounding only


def test_model_without_any_attention_generates():
    child = tiny_child([block("noop", "256"), block("linear", "linear"), block("noop", "96")])
    hf = DeciLMForCausalLM(DeciLMConfig.from_model_config(child.config)).eval()
    hf.load_state_dict(child.state_dict())
    p = prompt(5, 17, 99, 42)
    assert torch.equal(hf.generate(p, max_new_tokens=12, do_sample=False), child.generate(p, 12, eos_token_id=EOS))


# -- the written folder -----------------------------------------------------------------------

def test_config_json_has_block_configs_and_the_ffn_mult_rule(exported):
    child, _, result, hf = exported
    cfg = child.config
    written = json.loads((result.path / "config.json").read_text())
    assert written["model_type"] == "nemotron-nas"
    assert written["architectures"] == ["DeciLMForCausalLM"]
    assert written["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                                   "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert written["num_key_value_heads"] == 2 and written["intermediate_size"] == 256
    assert written["head_dim"] == cfg.head_dim and written["hidden_act"] == "silu"
    assert written["rope_scaling"] == cfg.rope_scaling and written["rope_theta"] == cfg.rope_theta
    assert written["attention_bias"] == cfg.attention_bias and written["mlp_bias"] == cfg.mlp_bias
    assert written["tie_word_embeddings"] == cfg.tie_word_embeddings
    assert written["torch_dtype"] == "float32" and written["eos_token_id"] == EOS
    entries = written["block_configs"]
    assert entries == [block_config_entry(b, 4, 64) for b in cfg.blocks]
    assert [block_from_entry(e, 4, 64) for e in entries] == list(cfg.blocks)
    assert hf.config.block_configs[1].attention.n_heads_in_group == entries[1]["attention"]["n_heads_in_group"]
    # NVIDIA's configs write sparsify: null in both entries; TensorRT-LLM's older converter reads it as an attribute
    assert all(hf.config.block_configs[i].attention.sparsify is None and hf.config.block_configs[i].ffn.sparsify is None
               for i in range(len(entries)))
    for i, (b, e) in enumerate(zip(cfg.blocks, entries)):
        if b.ffn.kind != "swiglu":
            assert e["ffn"]["ffn_mult"] is None
            continue
        assert e["ffn"]["intermediate_size"] == b.ffn.intermediate_size
        flagged = any(w.startswith(f"FFN width {b.ffn.intermediate_size} (layers [") and f"{i}" in w.split("layers ")[1].split("]")[0]
                      for w in result.warnings)
        if b.ffn.intermediate_size % 256 == 0:
            rebuilt = ffn_mult_to_intermediate_size(e["ffn"]["ffn_mult"], 64)
            assert rebuilt == b.ffn.intermediate_size and not flagged  # 256 -> ffn_mult 6.0 -> 256
        else:  # 96 / 128 -> 256 by the rule: no ffn_mult, which vLLM would take over intermediate_size (reviewer)
            assert "ffn_mult" not in e["ffn"] and not hasattr(hf.config.block_configs[i].ffn, "ffn_mult") and flagged
    assert sum("replace_with_linear" in w and "vLLM" in w for w in result.warnings) == 1
    gen = json.loads((result.path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (BOS, EOS, EOS)


def test_folder_is_self_contained(exported):
    child, tokenizer, result, _ = exported
    names = {p.name for p in result.path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", *CODE_FILES} <= names
    assert not [n for n in names if n.startswith(".")]
    assert not [p.name for p in result.path.parent.iterdir() if p.name != "child"]  # no temp leftovers
    for name in CODE_FILES:
        assert set(get_imports(result.path / name)) <= {"__future__", "dataclasses", "math", "torch", "transformers",
                                                         "warnings"}  # the standard library and what transformers needs
    weights = load_file(result.path / "model.safetensors")
    assert ("lm_head.weight" in weights) != child.config.tie_word_embeddings  # a tied head is stored once
    assert set(weights) | ({"lm_head.weight"} if child.config.tie_word_embeddings else set()) == set(child.state_dict())
    readme = (result.path / "README.md").read_text()
    assert "trust_remote_code=True" in readme and f"| {len(child.config.blocks) - 1} |" in readme
    reloaded = AutoTokenizer.from_pretrained(result.path, trust_remote_code=True)  # transformers 5 reads config.json too
    assert reloaded("w5 w17 w99")["input_ids"] == tokenizer("w5 w17 w99")["input_ids"] == [5, 17, 99]


def test_refuses_a_non_empty_folder_and_overwrites_only_an_earlier_export(tmp_path, monkeypatch):
    child = tiny_child([block("kv2", "256"), block("kv1", "512")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # overwrite=True replaces an earlier export, never a folder of other files
        with pytest.raises(PuzzleError, match="not empty"):
            export_checkpoint(child, None, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    export_checkpoint(child, None, out)
    (out / "README.md").write_text("old")  # an earlier export (of another child, say) is replaced as a whole
    (out / "notes.txt").write_text("mine")  # ... but not once it holds files an export does not write
    with pytest.raises(PuzzleError, match="not an earlier export"):
        export_checkpoint(child, None, out, overwrite=True)
    (out / "notes.txt").unlink()
    monkeypatch.chdir(out)
    for here in ("", ".", ".."):  # `--dest ""` is the current directory
        with pytest.raises(PuzzleError, match="current directory"):
            export_checkpoint(child, None, Path(here), overwrite=True)
    monkeypatch.chdir(tmp_path)
    result = export_checkpoint(child, tiny_tokenizer(), out, dtype="bfloat16", overwrite=True, extra_info={"run": "t"})
    assert (out / "README.md").read_text() != "old"
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable by a server
    assert result.warnings == ()  # no linear layers, every width a multiple of 256, a tokenizer
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["puzzle"]["run"] == "t"
    with pytest.raises(PuzzleError, match="not a torch floating dtype"):
        export_checkpoint(child, None, tmp_path / "other", dtype="int8")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_provenance_paths_name_one_folder_one_way(tmp_path, monkeypatch):
    from puzzle.export import model_ref, run_ref

    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    same = {model_ref(p) for p in ("m", "./m/", str(tmp_path / "m"), "~/m", "m/config.json", "link")}
    assert same == {str((tmp_path / "m").resolve())}
    # inside the run: relative, so a moved or copied run keeps it; outside: the run's absolute path
    assert run_ref("run", "run/export/child-gkd") == os.path.join("..", "..")
    assert run_ref(tmp_path / "run", tmp_path / "elsewhere") == str((tmp_path / "run").resolve())


def test_replacing_another_models_export_is_reported(tmp_path):
    child = tiny_child([block("kv2", "256"), block("kv1", "512")])
    out = tmp_path / "out"
    assert export_checkpoint(child, None, out, extra_info={"name": "child-2x"}).replaced is None  # a new folder
    assert export_checkpoint(child, None, out, overwrite=True, extra_info={"name": "child-2x"}).replaced is None
    sft = {"sft": {"model": "child-2x of run r"}}
    assert export_checkpoint(child, None, out, overwrite=True, extra_info=sft).replaced == "child-2x"
    before = (out / "model.safetensors").read_bytes()
    for other in ({"name": "child-2x"}, {"merge": {"inputs": ["a", "b"]}}, {"sft": {"model": "child-1.5x of run r"}}):
        with pytest.raises(PuzzleError, match=r"holds trained weights \(sft of child-2x of run r\)"):
            export_checkpoint(child, None, out, overwrite=True, extra_info=other)
    assert (out / "model.safetensors").read_bytes() == before
    assert export_checkpoint(child, None, out, overwrite=True, extra_info=sft).replaced is None  # a rerun of that sft


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_trained_export_is_replaced_only_by_the_same_training(tmp_path):
    """gkd / sft exports record their training (`training_ref`: settings, inputs, work folder): another training
    of the same model is refused, a rerun replaces; an export of an earlier version gets the hint that says so."""
    from puzzle.export import check_export_target, export_provenance, training_ref

    child = tiny_child([block("kv2", "256"), block("kv1", "512")])
    out = tmp_path / "out"
    meta = {"stage": "sft", "config": {"lr": 1e-4, "seed": 0}, "model": "abc", "data": "def"}
    ref = training_ref(meta, tmp_path / "out.sft-work", out)
    assert ref == training_ref(meta, tmp_path / "x" / ".." / "out.sft-work", out)  # one folder, spelled otherwise
    others = [training_ref({**meta, "config": {"lr": 2e-4, "seed": 0}}, tmp_path / "out.sft-work", out),
              training_ref({**meta, "data": "xyz"}, tmp_path / "out.sft-work", out),
              training_ref(meta, tmp_path / "w2", out)]
    assert len({ref, *others}) == 4
    mine = {"sft": {"model": "m", "training": ref}}
    export_checkpoint(child, None, out, extra_info=mine)
    for other in others:
        with pytest.raises(PuzzleError, match=r"holds trained weights \(sft of m \(training ") as refused:
            export_checkpoint(child, None, out, overwrite=True, extra_info={"sft": {"model": "m", "training": other}})
        assert "recorded otherwise" not in str(refused.value)  # the same model trained otherwise: no such hint
        with pytest.raises(PuzzleError, match="holds trained weights"):  # and the check made before the training
            check_export_target(out, overwrite=True,
                                provenance=export_provenance({"sft": {"model": "m", "training": other}}))
    # before the inputs load, only the model's path is known: it passes for now (another path may be this model
    # moved since), and the training's reference decides once the inputs are loaded, whatever the path
    for model in ("m", "n"):
        check_export_target(out, overwrite=True, provenance=export_provenance({"sft": {"model": model}}),
                            training_pending=True)
    check_export_target(out, overwrite=True, provenance=export_provenance({"sft": {"model": "moved", "training": ref}}))
    with pytest.raises(PuzzleError, match="holds trained weights"):
        check_export_target(out, overwrite=True, provenance=export_provenance({"sft": {"model": "n",
                                                                                       "training": others[0]}}))
    with pytest.raises(PuzzleError, match="holds trained weights"):  # a gkd of the same model is another training
        check_export_target(out, overwrite=True, provenance=export_provenance({"gkd": {"child": "m"}}),
                            training_pending=True)
    assert export_checkpoint(child, None, out, overwrite=True, extra_info=mine).replaced is None  # a rerun
    config = json.loads((out / "config.json").read_text())
    del config["puzzle"]["sft"]["training"]  # as an earlier version wrote it
    (out / "config.json").write_text(json.dumps(config))
    check_export_target(out, overwrite=True, provenance=export_provenance({"sft": {"model": "m"}}), training_pending=True)
    with pytest.raises(PuzzleError, match="recorded otherwise, by an earlier version") as refused:
        export_checkpoint(child, None, out, overwrite=True, extra_info=mine)
    # the advice keeps the finished checkpoint: deleting the export alone lets the rerun export it again
    assert "delete that folder alone" in str(refused.value) and "checkpoint.pt" not in str(refused.value)


def test_an_export_target_inside_an_export_or_the_work_folder_or_a_link_is_refused(tmp_path):
    """An export replaces its folder: a link would be replaced by a folder (and the provenance checked at the link's
    target); a folder inside an export makes that export an unknown folder; one inside the work folder is deleted
    with it by a fresh start. All are refused before any work."""
    from puzzle.export import check_export_target

    child = tiny_child([block("kv2", "256"), block("kv1", "512")])
    first = tmp_path / "first"
    export_checkpoint(child, None, first, extra_info={"gkd": {"child": "c", "training": "0" * 16}})
    (tmp_path / "link").symlink_to(first)
    with pytest.raises(PuzzleError, match=f"export target {tmp_path / 'link'} is a link"):
        check_export_target(tmp_path / "link", overwrite=True)
    with pytest.raises(PuzzleError, match=f"is inside the exported model {first}"):
        check_export_target(first / "inner", overwrite=True)
    with pytest.raises(PuzzleError, match="is inside the work folder"):
        check_export_target(tmp_path / "work" / "sub", overwrite=True, work=tmp_path / "work")
    check_export_target(tmp_path / "work2", overwrite=True, work=tmp_path / "work")  # beside it: fine
    assert [p.name for p in first.iterdir()] and (tmp_path / "link").is_symlink()
    # breaker: sft --dest inside a gkd's work folder (another training's) was accepted
    for work, summary in (("d.gkd-work", None), ("w", "sft.json"), ("run/gkd/child-2x", None)):
        (tmp_path / work).mkdir(parents=True)
        (tmp_path / work / "checkpoint.pt").write_bytes(b"")
        if summary:
            (tmp_path / work / summary).write_text("{}")
        with pytest.raises(PuzzleError, match=f"is inside {tmp_path / work}, the work folder of a gkd or sft"):
            check_export_target(tmp_path / work / "model", overwrite=True)
    (tmp_path / "project").mkdir()  # a checkpoint.pt of something else
    (tmp_path / "project" / "checkpoint.pt").write_bytes(b"")
    check_export_target(tmp_path / "project" / "model", overwrite=True)


def test_a_merge_with_other_weights_is_another_merge():
    """A merge's provenance holds its inputs with their weights (as a set) and a chosen dtype: another weighting does
    not replace an earlier merge; the same one in another order is the same merge."""
    from puzzle.export import export_provenance

    same = export_provenance({"merge": {"inputs": ["/a", "/b"], "weights": [0.25, 0.75]}})
    assert same == export_provenance({"merge": {"inputs": ["/b", "/a"], "weights": [0.75, 0.25]}})
    assert same != export_provenance({"merge": {"inputs": ["/a", "/b"], "weights": [0.5, 0.5]}})
    assert same != export_provenance({"merge": {"inputs": ["/a", "/b"], "weights": [0.25, 0.75], "dtype": "bfloat16"}})


def test_a_folder_that_is_not_an_export_is_refused_with_the_reason(tmp_path):
    """Breaker: an export that lost modeling.py was refused on every rerun with no word of what was wrong; an export
    of ours (config.json's "puzzle" entry) missing a code file is now replaced, and a refusal names the reason."""
    from puzzle.export import check_export_target, export_folder_problem

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"block_configs": [], "puzzle": {"name": "child-2x"}}))
    assert export_folder_problem(folder) is None  # ours, code files missing: an export to write again
    (folder / "config.json").write_text(json.dumps({"block_configs": []}))
    assert "lacks the model code (architecture.py" in export_folder_problem(folder)
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text(json.dumps({"block_configs": [], "puzzle": {}}))
    with pytest.raises(PuzzleError, match="it holds notes.txt, which an export does not write"):
        check_export_target(folder, overwrite=True)
    (folder / "notes.txt").unlink()
    (folder / "tokenizer_mine.txt").write_text("mine")  # any tokenizer* name passed as an export's (breaker)
    assert "tokenizer_mine.txt" in export_folder_problem(folder)


def test_an_untied_export_stores_the_lm_head_and_gives_the_same_logits(tmp_path):
    """--untie-embeddings: lm_head.weight as its own tensor (TensorRT-LLM reads it by name), tie_word_embeddings
    false, the same logits in transformers and in the project's loader."""
    from puzzle.parent import load_parent

    child = tiny_child(**TIED_NOOP0)
    tied = export_checkpoint(child, tiny_tokenizer(), tmp_path / "tied")
    untied = export_checkpoint(child, tiny_tokenizer(), tmp_path / "untied", untie_embeddings=True)
    assert "lm_head.weight" not in load_file(tied.path / "model.safetensors")
    weights = load_file(untied.path / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert json.loads((untied.path / "config.json").read_text())["tie_word_embeddings"] is False
    assert "--untie-embeddings" in (tied.path / "README.md").read_text()
    x = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    hf = AutoModelForCausalLM.from_pretrained(untied.path, trust_remote_code=True).eval()
    ours = load_parent(untied.path).model
    with torch.no_grad():
        want = child(x)
        assert (hf(x).logits - want).abs().max().item() <= 1e-4
        assert (ours(x) - want).abs().max().item() <= 1e-4
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    # an untied model is written as before: the flag only concerns a tied head
    plain = tiny_child(**UNTIED_BIAS)
    again = export_checkpoint(plain, tiny_tokenizer(), tmp_path / "plain", untie_embeddings=True)
    assert json.loads((again.path / "config.json").read_text())["tie_word_embeddings"] is False


def test_vllm_layout_problems_name_an_ffn_before_the_first_attention_and_no_attention_at_all():
    """Reviewer: vLLM's DeciLM layer normalises an FFN met before any attention with a residual of None and fails
    (nemotron_nas.py), and a model without attention has no KV heads; exports said nothing."""
    from puzzle.export import export_warnings, vllm_layout_problems

    def cfg(*ids):
        return ModelConfig(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=256, blocks=[BlockConfig.from_id(i) for i in ids])

    assert vllm_layout_problems(cfg("attn-kv2+ffn-256", "attn-noop+ffn-256")) == []
    assert vllm_layout_problems(cfg("attn-noop+ffn-noop", "attn-kv2+ffn-256", "attn-noop+ffn-256")) == []
    early = vllm_layout_problems(cfg("attn-noop+ffn-256", "attn-noop+ffn-noop", "attn-kv1+ffn-256"))
    assert len(early) == 1 and "FFNs in layers [0] come before the first attention (layer 2)" in early[0]
    none = vllm_layout_problems(cfg("attn-noop+ffn-256", "attn-noop+ffn-noop"))
    assert len(none) == 1 and "no layer keeps a GQA attention" in none[0]
    assert any("vLLM cannot serve" in w and "FFNs in layers [0]" in w
               for w in export_warnings(cfg("attn-noop+ffn-256", "attn-kv2+ffn-256")))


def test_a_run_says_the_vllm_explanation_of_repeated_export_warnings_once():
    """Leftover: every child of a run repeated the whole vLLM sentence and advice in its export warnings."""
    from puzzle.export import export_warnings, shorten_repeated_warnings

    def cfg(*ids):
        return ModelConfig(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=256, blocks=[BlockConfig.from_id(i) for i in ids])

    first = export_warnings(cfg("attn-kv2+ffn-256", "attn-linear+ffn-256"))
    second = export_warnings(cfg("attn-kv2+ffn-linear", "attn-linear+ffn-256"))
    early = export_warnings(cfg("attn-noop+ffn-256", "attn-kv2+ffn-256"))
    said: set = set()
    assert shorten_repeated_warnings(first, said) == first  # the first says it all
    again = shorten_repeated_warnings(second, said)
    assert len(again) == 1 and again[0].startswith("replace_with_linear subblocks (attention in layers [1], ffn in "
                                                   "layers [0])")
    assert again[0].endswith("vLLM cannot serve it (as above)") and "--vllm-compatible" not in again[0]
    # a different problem keeps its own words the first time, then is shortened too
    assert shorten_repeated_warnings(early, said) == early
    assert shorten_repeated_warnings(early, said)[0].endswith("(layer 1): vLLM's DeciLM layer then normalises them "
                                                              "with a residual of None and fails; keep an attention "
                                                              "in layer 0 (--vllm-compatible does); vLLM cannot serve "
                                                              "it (as above)")
    assert shorten_repeated_warnings(["something else entirely"], said) == ["something else entirely"]
    # what an FFN width ffn_mult cannot express means is said once too, whatever the widths
    wide = ModelConfig(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       intermediate_size=256, blocks=[BlockConfig.from_id("attn-kv2+ffn-64"),
                                                      BlockConfig.from_id("attn-kv2+ffn-128")])
    odd = export_warnings(wide)
    assert len(odd) == 2 and all("those entries store intermediate_size=" in w for w in odd)
    short = shorten_repeated_warnings(odd, said)
    assert short[0] == odd[0] and short[1].startswith("FFN width 128 (layers [1]) cannot be written as ffn_mult")
    assert short[1].endswith("; ffn_mult cannot express it (as above)") and "TensorRT" not in short[1]


def test_block_configs_values_of_the_wrong_type_or_contradictory_are_refused():
    """Breaker: ffn no_op "false" (text) was read as true, intermediate_size 64.5 cut to 64, 0 called missing, and
    no_op with replace_with_linear taken as no_op, each without a word."""
    from puzzle.architecture import ArchitectureError

    gqa = {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False, "sparsify": None}
    ffn = {"intermediate_size": 96, "no_op": False, "replace_with_linear": False, "sparsify": None}
    assert block_from_entry({"attention": gqa, "ffn": ffn}, 4, 64) == BlockConfig(AttentionConfig("gqa", 2),
                                                                                   FFNConfig("swiglu", 96))
    assert block_from_entry({"attention": {**gqa, "n_heads_in_group": 2.0}, "ffn": {**ffn, "intermediate_size": 96.0}},
                            4, 64) == BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 96))
    for attention, mlp, words in [
            (gqa, {**ffn, "no_op": "false"}, "ffn no_op='false' must be true or false"),
            ({**gqa, "replace_with_linear": 1}, ffn, "attention replace_with_linear=1 must be true or false"),
            (gqa, {**ffn, "intermediate_size": 64.5}, "intermediate_size=64.5 must be a whole number >= 1"),
            (gqa, {**ffn, "intermediate_size": 0}, "intermediate_size=0 must be a whole number >= 1"),
            (gqa, {**ffn, "intermediate_size": True}, "must be a whole number"),
            ({**gqa, "n_heads_in_group": True}, ffn, "n_heads_in_group=True must be a positive divisor"),
            ({**gqa, "no_op": True, "replace_with_linear": True}, ffn, "both no_op and replace_with_linear"),
            (gqa, {"ffn_mult": "2.5"}, "ffn_mult='2.5' must be a number")]:
        with pytest.raises(ArchitectureError, match=re.escape(words)):
            block_from_entry({"attention": attention, "ffn": mlp}, 4, 64)


def test_a_mount_point_is_refused_as_an_export_target(tmp_path):
    """Breaker: `--dest` on an empty mount point (a container's volume) ended in EBUSY's traceback from renaming it
    aside, leaving a `.old` folder. A bind mount on the same file system is one too (os.path.ismount misses it)."""
    import shutil
    import subprocess
    import sys

    from puzzle.export import _is_mount_point

    assert _is_mount_point(Path("/")) and not _is_mount_point(tmp_path)
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a mount namespace")
    vol = tmp_path / "vol"
    vol.mkdir()
    code = ("from pathlib import Path; from puzzle.export import check_export_target\n"
            f"check_export_target(Path({str(vol)!r}), overwrite=True)")
    script = f"mount --bind {vol} {vol} && {sys.executable} -c \"$0\""
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, code], capture_output=True, text=True)
    if done.returncode != 0 and "PuzzleError" not in done.stderr:  # no privilege for a mount namespace here
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()[:200]}")
    assert "is a mount point, which an export cannot replace" in done.stderr, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["vol"]


def test_an_export_wider_than_its_hf_parent_folder_is_noted(tmp_path):
    """Fresh user: a bf16 parent folder in a float32 run gave float32 exports, twice its size, unsaid; the note names
    `--dtype`. A parent stored as float32, or an export stored as the parent, says nothing."""
    from types import SimpleNamespace

    from puzzle.parent import load_parent
    from puzzle.pipeline import _say_wider_than_the_parent
    from puzzle.tiny import tiny_parent

    lm = tiny_parent()
    export_checkpoint(lm.model, lm.tokenizer, tmp_path / "bf16", dtype="bfloat16")
    export_checkpoint(lm.model, lm.tokenizer, tmp_path / "fp32")
    for folder, dtype, noted in (("bf16", "float32", True), ("bf16", "bfloat16", False), ("fp32", "float32", False)):
        said = []
        run = SimpleNamespace(parent=load_parent(tmp_path / folder), out=tmp_path / "run", say=said.append)
        _say_wider_than_the_parent(run, "child-1.5x", dtype)
        assert bool(said) == noted, (folder, dtype, said)
        if noted:
            assert "stored as float32 (the run's [parent] dtype), twice the size of the parent's bfloat16; `puzzle " \
                   f"export --out {tmp_path / 'run'} --name child-1.5x --dtype bfloat16`" in said[0]


def test_the_readme_gives_a_small_models_parameters_in_full(exported):
    """Breaker: a tiny export's README said "0.0M parameters"."""
    from puzzle.export import count_text

    child, _, result, _ = exported
    assert count_text(54_272) == "54,272" and count_text(134_515_008) == "134.5M"
    assert f"{count_text(child.num_parameters())} parameters" in (result.path / "README.md").read_text()


@pytest.mark.parametrize("code, words", [(1, "lift what keeps it from being renamed"),
                                         (16, "close the programs that hold it open"),
                                         (18, "check the folder and the file system it lies on")])
def test_an_export_folder_that_cannot_be_moved_aside_names_what_to_do(tmp_path, monkeypatch, code, words):
    """Breaker: an immutable earlier export (chattr +i) was told to give 'one inside it', which is then refused as
    inside an export; the advice now follows the cause (EPERM here, EBUSY: a folder held open), and the earlier
    export and the parent folder are left as they were."""
    from puzzle import export
    from puzzle.errors import PuzzleError

    out, tmp = tmp_path / "model", tmp_path / ".model.abcdefgh.tmp"
    out.mkdir()
    (out / "config.json").write_text("{}")
    tmp.mkdir()
    replace = os.replace

    def refuse(src, dst):
        if Path(src) == out:
            raise OSError(code, os.strerror(code))
        replace(src, dst)

    monkeypatch.setattr(export.os, "replace", refuse)
    with pytest.raises(PuzzleError, match=f"cannot be moved aside to be replaced .*; give a new folder path, or "
                                          f"{words}"):
        export._move_into_place(tmp, out)
    assert (out / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_refused_replacement_names_a_run_recorded_relative_to_the_export_by_its_path(tmp_path):
    """README checker: gkd's refusal to replace a trained export of the run said "gkd of child-2x of run ../.." for
    both trainings; the run is named by its path, an absolute record and other text left as they are."""
    from puzzle.export import _run_by_path

    folder = tmp_path / "run" / "export" / "child-2x-gkd"
    assert _run_by_path("gkd of child-2x of run ../.. (training 0123456789abcdef)", folder) == \
        f"gkd of child-2x of run {tmp_path / 'run'} (training 0123456789abcdef)"
    assert _run_by_path("child-2x of run ../..", folder) == f"child-2x of run {tmp_path / 'run'}"
    for text in ("sft of child-2x of run /abs/run (training 0123456789abcdef)", "child of run ..x",
                 "merge of weights a, b"):
        assert _run_by_path(text, folder) == text
