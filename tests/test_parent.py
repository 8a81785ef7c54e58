"""Loading parents: HF Llama folders, nemotron-nas folders, GGUF files, and the refusals."""

import json
import re
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.errors import PuzzleError
from puzzle.modeling import PuzzleForCausalLM
from puzzle.parent import load_parent, model_config_from_hf, model_config_from_nemotron_nas, model_from_state_dict
from puzzle.tiny import tiny_tokenizer

VOCAB = 299  # len(tiny_tokenizer())


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norms around 1, biases non-zero) so that every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    return model.eval()


def hf_llama(**overrides) -> LlamaForCausalLM:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return randomize_(LlamaForCausalLM(LlamaConfig(**kwargs)))


def save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


IDS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def assert_same_logits(loaded, reference_logits, atol=1e-5):
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS), reference_logits, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# HF folders

HF_CASES = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(),
    "head_dim": dict(head_dim=24),
    "llama3_rope": dict(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_folder_matches_transformers(tmp_path, case):
    hf = hf_llama(**HF_CASES[case])
    loaded = load_parent(save_hf(hf, tmp_path))
    with torch.no_grad():
        assert_same_logits(loaded, hf(IDS).logits)
    assert loaded.config.extra["source"] == "hf" and loaded.config is loaded.model.config
    assert loaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if loaded.config.tie_word_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("a test")) == "a test"


def test_hf_sharded_folder_and_bf16(tmp_path):
    hf = hf_llama()
    save_hf(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 3
    loaded = load_parent(tmp_path)
    with torch.no_grad():
        assert_same_logits(loaded, hf(IDS).logits)
    half = load_parent(tmp_path, dtype=torch.bfloat16, with_tokenizer=False)
    assert half.tokenizer is None and next(half.model.parameters()).dtype == torch.bfloat16
    assert half.model.model.rotary_emb.inv_freq.dtype == torch.float32
    # reviewer: a cast down and back (model.to(bf16).float()) left the RoPE table rounded to bf16
    there_and_back = load_parent(tmp_path).model.to(torch.bfloat16).float()
    assert torch.equal(there_and_back.model.rotary_emb.inv_freq, loaded.model.model.rotary_emb.inv_freq)


def test_weights_past_float16_s_range_are_told_to_load_in_float32(tmp_path):
    """Breaker: finite weights of 1e6 overflowed float16 and were called NaN, "no model to use"; float32 ran them."""
    hf = hf_llama()
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(1e6)
    save_hf(hf, tmp_path)
    assert load_parent(tmp_path, with_tokenizer=False).model is not None  # float32 holds them
    with pytest.raises(PuzzleError, match=r"model.embed_tokens.weight overflows float16 .* load the model in float32"):
        load_parent(tmp_path, dtype=torch.float16, with_tokenizer=False)


def test_pytorch_bin_folder_loads(tmp_path):
    hf = hf_llama()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_parent(tmp_path, with_tokenizer=False)
    with torch.no_grad():
        assert_same_logits(loaded, hf(IDS).logits)


class _NotATensor:  # a custom object in a pickled state dict (module level: torch.save pickles it by name)
    pass


def test_a_config_without_model_type_names_the_one_to_add():
    d = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1).to_dict()
    d.pop("model_type", None)
    d["architectures"] = ["LlamaForCausalLM"]
    with pytest.raises(PuzzleError, match='add "model_type": "llama" to it'):
        model_config_from_hf(d)


def test_a_pytorch_bin_holding_other_objects_is_named_as_such(tmp_path):
    """Breaker: a .bin holding a custom object beside its tensors was called corrupt, with torch's colour codes."""
    hf = hf_llama()
    hf.config.save_pretrained(tmp_path)
    torch.save({**hf.state_dict(), "extra": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PuzzleError, match="holds objects other than tensors") as caught:
        load_parent(tmp_path, with_tokenizer=False)
    assert "corrupt" not in str(caught.value)


def test_first_line_drops_colour_codes():
    """torch.load's messages carry terminal colour codes; quoted in a one-line error they showed as raw escapes."""
    from puzzle.errors import first_line

    assert first_line(RuntimeError("\x1b[1mWeights only\x1b[0m load failed.\nmore")) == "Weights only load failed."
    assert first_line(ValueError("")) == "ValueError"


def test_hf_config_parsing_old_layouts():
    d = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1).to_dict()
    del d["rope_parameters"], d["head_dim"]
    d.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=[2, 0])
    cfg = model_config_from_hf(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 1 and cfg.eos_token_id == [2, 0]
    assert cfg.blocks == (BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 96)),) * 3
    d["rope_scaling"] = {"rope_type": "default"}
    assert model_config_from_hf(d).rope_scaling is None


# ----------------------------------------------------------------------------------------------
# nemotron-nas folders


def test_nemotron_nas_folder_matches_in_memory_model(tmp_path):
    C, H = 64, 4
    blocks = (
        BlockConfig(AttentionConfig("no_op"), FFNConfig("swiglu", 128)),
        BlockConfig(AttentionConfig("linear"), FFNConfig("linear")),
        BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 48)),
        BlockConfig(AttentionConfig("gqa", 2), FFNConfig("no_op")),
        BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 256)),
    )
    config = ModelConfig(vocab_size=VOCAB, hidden_size=C, num_attention_heads=H, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128, blocks=blocks, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = randomize_(PuzzleForCausalLM(config), seed=3)
    no_op = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    linear = {"no_op": False, "replace_with_linear": True, "n_heads_in_group": None}
    gqa = lambda group: {"no_op": False, "replace_with_linear": False, "n_heads_in_group": group}  # noqa: E731
    ffn_no_op = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    ffn_linear = {"no_op": False, "replace_with_linear": True, "ffn_mult": None}
    block_configs = [  # written by hand, as another tool would
        {"attention": no_op, "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 3.0, "intermediate_size": 128}},
        {"attention": linear, "ffn": ffn_linear},
        {"attention": gqa(4), "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 1.125, "intermediate_size": 48}},
        {"attention": gqa(2), "ffn": ffn_no_op},
        {"attention": gqa(2), "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 6.0}},  # DeciLM rule: 256
    ]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"], "hidden_size": C,
        "num_attention_heads": H, "num_hidden_layers": 5, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 2048, "hidden_act": "silu",
        "tie_word_embeddings": False, "block_configs": block_configs}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    tiny_tokenizer().save_pretrained(tmp_path)

    loaded = load_parent(tmp_path)
    assert loaded.config.blocks == blocks and loaded.config.extra["source"] == "nemotron-nas"
    assert (loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (2, 256)  # largest over layers
    assert "model.layers.0.input_layernorm.weight" not in loaded.model.state_dict()
    with torch.no_grad():
        assert_same_logits(loaded, model(IDS), atol=1e-6)
    assert loaded.tokenizer.eos_token_id == 2

    copy = model_from_state_dict(config, model.state_dict())  # in memory: a copy, never shared storage
    with torch.no_grad():
        copy.model.layers[2].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(copy.model.layers[2].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)

    with pytest.raises(PuzzleError, match="block_configs"):
        model_config_from_nemotron_nas({**json.loads((tmp_path / "config.json").read_text()), "num_hidden_layers": 4})
    bad = json.loads((tmp_path / "config.json").read_text())
    bad["block_configs"][2]["attention"]["window_length"] = 64
    with pytest.raises(PuzzleError, match=r"block_configs\[2\].*window_length"):
        model_config_from_nemotron_nas(bad)
    mistral = {**json.loads((tmp_path / "config.json").read_text()), "model_type": "mistral",
               "architectures": ["MistralForCausalLM"]}  # breaker: refused beside "'mistral' ... supported"
    with pytest.raises(PuzzleError, match="it holds block_configs, which only nemotron-nas configs have"):
        model_config_from_nemotron_nas(mistral)


# ----------------------------------------------------------------------------------------------
# GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reordering of q/k rows (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim, theta, factor, low, high, old_len):
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3 scaling (one divisor per frequency)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, hf: LlamaForCausalLM, arch="llama", rope_freqs=None, extra=None):
    """A float32 llama GGUF of `hf` with the tiny tokenizer's vocabulary, laid out as llama.cpp does; `extra(writer)`
    adds metadata."""
    import gguf

    cfg, tok = hf.config, tiny_tokenizer()
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(tok.chat_template)
    if extra is not None:
        extra(w)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], H))
        w.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], G))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_matches_transformers_and_is_cached(tmp_path):
    hf = hf_llama(tie_word_embeddings=True)
    gguf_path = write_gguf(tmp_path / "tiny.gguf", hf)
    cache = tmp_path / "cache"
    first = load_parent(gguf_path, cache_dir=cache)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_same_logits(first, reference(IDS).logits)
        assert_same_logits(first, hf(IDS).logits)  # and the model the GGUF was written from
    assert first.config.extra["source"] == "gguf" and first.converted_now
    assert first.config.tie_word_embeddings and first.config.extra["name"] == "tiny-test"
    assert first.tokenizer.encode("The parent 🤖") == tiny_tokenizer().encode("The parent 🤖")
    assert first.tokenizer.eos_token_id == 2 and "<|im_start|>" in first.tokenizer.chat_template

    folders = list((cache / "gguf").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()  # no temp folder left behind
    second = load_parent(tmp_path, cache_dir=cache)  # the folder holds one .gguf and no config.json
    assert not second.converted_now and second.config == first.config
    assert second.source == first.source  # exports record it: the same text on every load (fresh-user run, stop 54)
    with torch.no_grad():
        assert_same_logits(second, reference(IDS).logits)
    # reviewer: a cached folder without its config.json failed every later load at the rename ("Directory not
    # empty"), after converting again each time; it is now replaced, with a warning
    (folders[0] / "config.json").unlink()
    with pytest.warns(UserWarning, match="has no config.json; converting tiny.gguf again"):
        third = load_parent(gguf_path, cache_dir=cache)
    assert third.converted_now and third.config == first.config
    assert list((cache / "gguf").iterdir()) == folders and (folders[0] / "config.json").is_file()
    # reviewer: a cache path that cannot be a folder failed after the conversion with a raw NotADirectoryError
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    import puzzle.parent

    def converted(*args, **kwargs):
        raise AssertionError("converted before checking the cache folder")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(puzzle.parent, "_convert_into", converted)
        with pytest.raises(PuzzleError, match="cannot write the converted GGUF to .*a-file/gguf"):
            load_parent(gguf_path, cache_dir=blocked)


def test_gguf_llama3_rope_freqs_are_recovered(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf = hf_llama(rope_theta=10000.0, rope_scaling=dict(rope), head_dim=32, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=16384)
    freqs = llama3_rope_freqs(32, 10000.0, 8.0, 1.0, 4.0, 8192)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0 and ((freqs > 1) & (freqs < 8)).sum() == 2  # all three regions
    loaded = load_parent(write_gguf(tmp_path / "l3.gguf", hf, rope_freqs=freqs), cache_dir=tmp_path / "c")
    assert loaded.config.rope_scaling == rope
    with torch.no_grad():
        assert_same_logits(loaded, hf(IDS).logits)


# ----------------------------------------------------------------------------------------------
# refusals: each is a PuzzleError whose message names the problem


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(PuzzleError, match="does not exist"):
        load_parent(tmp_path / "nowhere")
    with pytest.raises(PuzzleError, match="neither a config.json nor a .gguf"):
        load_parent(tmp_path)
    (tmp_path / "rpo" / "model").mkdir(parents=True)  # an rpo --out folder (breaker: its model/ went unnamed)
    (tmp_path / "rpo" / "model" / "config.json").write_text("{}")
    with pytest.raises(PuzzleError, match=rf"but {re.escape(str(tmp_path / 'rpo' / 'model'))} holds a model: pass"):
        load_parent(tmp_path / "rpo")
    (tmp_path / "export" / "child-2x").mkdir(parents=True)  # a run's export folder (breaker: its children unnamed)
    (tmp_path / "export" / "child-2x" / "config.json").write_text("{}")
    with pytest.raises(PuzzleError, match="but its folders child-2x hold models: pass one of them"):
        load_parent(tmp_path / "export")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text("{not json")
    with pytest.raises(PuzzleError, match="config.json cannot be read as JSON"):
        load_parent(tmp_path / "sub")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PuzzleError, match="not a .gguf"):
        load_parent(tmp_path / "notes.txt")
    (tmp_path / "renamed.bin").write_bytes(b"GGUF" + bytes(60))  # breaker: a GGUF by its magic, named otherwise
    with pytest.raises(PuzzleError, match="is a GGUF file by its contents; rename it to end in .gguf"):
        load_parent(tmp_path / "renamed.bin")


def test_corrupt_safetensors(tmp_path):
    save_hf(hf_llama(), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(PuzzleError, match="model.safetensors cannot be read.*corrupt or truncated"):
        load_parent(tmp_path)


def test_missing_weight_key(tmp_path):
    save_hf(hf_llama(), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(PuzzleError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_parent(tmp_path)


def test_untied_checkpoint_without_lm_head_names_the_fix(tmp_path):
    save_hf(hf_llama(), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(PuzzleError, match="tie_word_embeddings"):
        load_parent(tmp_path)


def test_a_tied_config_beside_a_distinct_stored_head_is_refused(tmp_path):
    """Breaker: a config that ties the embeddings over weights whose stored lm_head differs dropped that head without
    a word, where transformers keeps it: every KL would have been against another model than the user's."""
    import json

    save_hf(hf_llama(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(PuzzleError, match="set tie_word_embeddings to false in config.json"):
        load_parent(tmp_path)


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(tmp_path):
    """Breaker: ids past vocab_size passed `puzzle data`, and `puzzle bld` failed in F.embedding with a traceback."""
    import json

    from puzzle.export import export_checkpoint
    from puzzle.tiny import tiny_parent

    lm = tiny_parent()
    export_checkpoint(lm.model, lm.tokenizer, tmp_path / "m")
    path = tmp_path / "m" / "tokenizer.json"
    data = json.loads(path.read_text())
    token = next(iter(data["model"]["vocab"]))
    data["model"]["vocab"][token] = lm.model.config.vocab_size + 101
    path.write_text(json.dumps(data))
    with pytest.raises(PuzzleError, match=f"token ids up to {lm.model.config.vocab_size + 101}, but the model has "
                                          f"{lm.model.config.vocab_size}"):
        load_parent(tmp_path / "m")
    load_parent(tmp_path / "m", with_tokenizer=False)  # the weights alone are fine


def test_no_weights(tmp_path):
    hf_llama().config.save_pretrained(tmp_path)
    with pytest.raises(PuzzleError, match="no weights") as e:
        load_parent(tmp_path)
    assert "GGUF" not in str(e.value)
    # reviewer: a GGUF repository that ships a config.json beside the .gguf was told to copy weight files only
    write_gguf(tmp_path / "m.gguf", hf_llama(num_hidden_layers=1))
    with pytest.raises(PuzzleError, match=re.escape(f"give the file ({tmp_path / 'm.gguf'}) or gguf_file=m.gguf")):
        load_parent(tmp_path)


def _config_dict(**overrides):
    d = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4).to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "RoPE scaling type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"'dynamic'.*plain RoPE up to max_position_embeddings \(2048\): .* remove rope_scaling"),
    (dict(pretraining_tp=2), "pretraining_tp=2"),
    (dict(sliding_window=4096), "sliding-window"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized checkpoints"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
     r"model_type 'qwen2' .* \(it has biases on the query, key and value projections but not on the output one"),
    (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]), r"qwen3.*\(it normalizes each head's queries"),
    (dict(model_type="phi", architectures=["PhiForCausalLM"]),
     r"model_type 'phi' \(architectures .*\) is not supported; "),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}), "lacks"),
])
def test_config_refusals(overrides, message):
    with pytest.raises(PuzzleError, match=message):
        model_config_from_hf(_config_dict(**overrides))


def test_dynamic_rope_removed_as_the_refusal_says_loads_as_plain_rope():
    """The dynamic-scaling advice holds: transformers' dynamic NTK frequencies within max_position_embeddings are
    plain RoPE's, so the config without it describes the same model there."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dynamic = LlamaConfig(**_config_dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}))
    plain = LlamaConfig(**_config_dict())
    inv_dynamic, _ = ROPE_INIT_FUNCTIONS["dynamic"](dynamic, "cpu", seq_len=dynamic.max_position_embeddings)
    dim = plain.hidden_size // plain.num_attention_heads  # plain RoPE (Su et al., 2021): theta^(-2i/d)
    inv_plain = 1.0 / plain.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    torch.testing.assert_close(inv_dynamic, inv_plain)
    assert model_config_from_hf(_config_dict()).rope_scaling is None


def test_config_fields_of_the_wrong_type_are_one_line_errors(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    for overrides, words in [(dict(hidden_size="abc"), "wrong type or value"), (dict(rms_norm_eps="nan"), "rms_norm_eps"),
                             (dict(rope_theta=None, rope_parameters=None), "NoneType")]:
        (tmp_path / "config.json").write_text(json.dumps(_config_dict(**overrides)))
        with pytest.raises(PuzzleError, match=words):
            load_parent(tmp_path)


def test_gpt2_folder_and_gelu_folder_are_refused(tmp_path):
    (tmp_path / "gpt2").mkdir()
    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(PuzzleError, match=r"model_type 'gpt2'.*not supported.*Llama-family"):
        load_parent(tmp_path / "gpt2")
    (tmp_path / "gelu").mkdir()
    (tmp_path / "gelu" / "config.json").write_text(json.dumps(_config_dict(hidden_act="gelu")))
    with pytest.raises(PuzzleError, match="hidden_act 'gelu'.*SwiGLU"):
        load_parent(tmp_path / "gelu")


def test_bad_gguf_files(tmp_path):
    import gguf

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all, just text" * 4)
    with pytest.raises(PuzzleError, match="not a GGUF file"):
        load_parent(fake)
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PuzzleError, match="'qwen2' model"):
        load_parent(tmp_path / "qwen.gguf", cache_dir=tmp_path / "c")
    # breaker: a llama GGUF without its shape was converted as a default 7B Llama (killed for memory at 24 GB)
    (tmp_path / "bare").mkdir()
    w = gguf.GGUFWriter(str(tmp_path / "bare" / "b.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PuzzleError, match=r"lacks the model's shape in its metadata \(llama.block_count, "
                                          r"llama.embedding_length, .*build a default Llama"):
        load_parent(tmp_path / "bare" / "b.gguf", cache_dir=tmp_path / "c")
    (tmp_path / "cut").mkdir()  # whole metadata, a layer's weights missing
    hf = hf_llama(num_hidden_layers=2)
    two = write_gguf(tmp_path / "cut" / "two.gguf", hf, extra=lambda w: w.add_block_count(3))
    with pytest.raises(PuzzleError, match=r"lacks 9 of the 29 weights its metadata's 3 layers need \(e.g. "
                                          r"blk.2.attn_norm.weight"):
        load_parent(two, cache_dir=tmp_path / "c")
    good = write_gguf(tmp_path / "t.gguf", hf_llama(num_hidden_layers=1))
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(PuzzleError, match="truncated"):
        load_parent(good, cache_dir=tmp_path / "c")
    with pytest.raises(PuzzleError, match="holds 3 .gguf files"):
        load_parent(tmp_path)
    assert not (tmp_path / "c").exists()  # refused before any conversion
    # reviewer: linear RoPE scaling without a factor was a raw KeyError
    (tmp_path / "linear").mkdir()
    nofactor = write_gguf(tmp_path / "linear" / "l.gguf", hf_llama(num_hidden_layers=1),
                          extra=lambda w: w.add_string("llama.rope.scaling.type", "linear"))
    with pytest.raises(PuzzleError, match="linear RoPE scaling without a positive llama.rope.scaling.factor"):
        load_parent(nofactor, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_transformers_quiet_silences_warnings_inside_and_restores_the_level_after_an_error():
    from transformers.utils import logging as hf_logging

    from puzzle.parent import transformers_quiet

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with pytest.raises(RuntimeError):
            with transformers_quiet():
                assert hf_logging.get_verbosity() == hf_logging.ERROR
                raise RuntimeError("raised inside")
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)
