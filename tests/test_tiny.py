"""The tiny preset's parent and tokenizer: deterministic, lossless, ChatML."""

import torch
from transformers import AutoTokenizer

from puzzle.tiny import tiny_parent, tiny_tokenizer


def test_tiny_parent_is_deterministic():
    a, b = tiny_parent(seed=0), tiny_parent(seed=0)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny_parent(seed=1)
    assert not torch.equal(sa["model.embed_tokens.weight"], c.model.state_dict()["model.embed_tokens.weight"])


def test_tiny_parent_golden_values_and_shape():
    # Golden values pin the init across runs and machines (regenerate only on purpose).
    p = tiny_parent()
    torch.testing.assert_close(p.model.model.embed_tokens.weight[0, :4],
                               torch.tensor([-0.0225168, -0.0230472, -0.0050116, -0.0086776]), atol=1e-6, rtol=0)
    cfg = p.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (len(p.tokenizer), 64, 4, 2)
    assert cfg.num_hidden_layers == 4 and cfg.tie_word_embeddings and cfg.rope_theta == 10000.0
    assert p.model.lm_head.weight is p.model.model.embed_tokens.weight
    assert torch.equal(p.model.model.layers[0].input_layernorm.weight, torch.ones(64))
    std = p.model.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.017 < std < 0.023
    assert cfg.eos_token_id == p.tokenizer.eos_token_id and p.config is p.model.config
    logits = p.model(torch.tensor([[5, 6, 7]]))
    assert logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(logits).all()


def test_tiny_parent_sizes():
    p = tiny_parent(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48)
    assert p.config.num_hidden_layers == 2 and p.config.head_dim == 16
    assert p.model.model.layers[1].mlp.up_proj.weight.shape == (48, 32)
    assert p.model.model.layers[1].self_attn.k_proj.weight.shape == (16, 32)


def test_tokenizer_round_trips_any_utf8_text():
    tok = tiny_tokenizer()
    assert len(tok) == 299
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.encode("The parent is the child.") == [272, 35, 115, 263, 296, 35, 108, 118, 262, 35, 292, 49]
    for text in ["Hello  world!\n\tTabs,   spaces ", "emoji 🤖 CJK 日本語 accents ünïcödé", " leading", "\x00\x7f\u200b",
                 "literal <|im_end|> special", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("the the the")) < len("the the the")  # merges are used


def test_tokenizer_save_and_reload(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Round trip: ünïcode 🤖\n"
    assert again.encode(text) == tok.encode(text)
    assert again.decode(tok.encode(text)) == text
    assert again.eos_token_id == 2 and again.bos_token_id == 1 and again.pad_token_id == 2
    assert again.chat_template == tok.chat_template


def test_chat_template_is_chatml():
    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> first, one <|im_end|> per message


def test_a_2d_attention_mask_shorter_than_the_cache_is_refused():
    """Reviewer: a (B, 1) mask during cached decoding was broadcast over every cached position (logits off by 0.15)."""
    import pytest
    import torch

    from puzzle.modeling import build_attention_mask

    with pytest.raises(ValueError, match=r"covers 1 positions, but the cache and the new tokens hold 5"):
        build_attention_mask(torch.ones(2, 1), 1, 5, "cpu")
    longer = build_attention_mask(torch.tensor([[0, 0, 1, 1, 1, 1]]), 2, 5, "cpu")  # its last 5 entries
    assert longer.shape == (1, 1, 2, 5) and not longer[0, 0, 1, 0] and longer[0, 0, 1, 4]
