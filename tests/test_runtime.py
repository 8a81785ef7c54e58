"""The child runtime against PuzzleForCausalLM: logits and greedy tokens of tiny heterogeneous children.

The torch path, and the Triton kernels forced on CPU tensors (Triton's interpreter), on a child that has every
kind of subblock: layer 0 wholly no_op, an FFN as the first subblock, kv1 / kv2 / kv4 (= heads) attention,
linear attention and FFN, narrow, full and no_op FFNs. Odd prompt lengths, ragged (right-padded) batches, EOS.
bf16 and CUDA graphs need CUDA (`gpu` marker).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (if this module is the first)

import pytest  # noqa: E402

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.modeling import PuzzleForCausalLM  # noqa: E402
from puzzle.runtime import ChildRuntime, add_generate_parser, answer_prompts, runtime_step_fns  # noqa: E402

ATOL = RTOL = 2e-5  # fp32: the runtime fuses q/k/v and gate/up into one matmul each, so sums may round differently


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and does not crawl when the machine is shared (OpenMP spin-waits)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def gpu(test):
    """Run only with CUDA: marked `gpu` and skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def _block(attention: str, ffn: str) -> BlockConfig:
    return BlockConfig(AttentionConfig.from_id(attention), FFNConfig.from_id(ffn))


CHILD_BLOCKS = [
    _block("attn-noop", "ffn-noop"),
    _block("attn-noop", "ffn-40"),
    _block("attn-kv1", "ffn-linear"),
    _block("attn-kv2", "ffn-noop"),
    _block("attn-linear", "ffn-96"),
    _block("attn-kv4", "ffn-24"),
]


def tiny_child(blocks=CHILD_BLOCKS, seed: int = 0, tied: bool = True, bias: bool = False) -> PuzzleForCausalLM:
    """Hidden 64, 4 heads of 16, vocab 97; weights N(0, 0.1) and norms near 1 from a fixed seed."""
    config = ModelConfig(vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=96, blocks=tuple(blocks), tie_word_embeddings=tied, attention_bias=bias,
                         mlp_bias=bias)
    model = PuzzleForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model


def _prompts(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(97, (B, T), generator=torch.Generator().manual_seed(seed))


def _check_against_model(model, use_triton: bool, lengths: list[int], new_tokens: int):
    """Prefill and decode logits of every row equal the model's forward over that row's own sequence."""
    B, T = len(lengths), max(lengths)
    ids = _prompts(B, T)
    rt = ChildRuntime(model, B, T + new_tokens, use_triton=use_triton)
    steps = [rt.prefill(ids, lengths)]  # (B, V) each
    for _ in range(new_tokens - 1):
        steps.append(rt.decode(steps[-1].argmax(-1)))
    assert rt.lengths == [n + new_tokens - 1 for n in lengths]
    logits = torch.stack(steps, dim=1)  # (B, n, V)
    for b, n in enumerate(lengths):
        sequence = torch.cat([ids[b, :n], logits[b, :-1].argmax(-1)])  # the row's prompt, then its greedy tokens
        with torch.no_grad():
            expected = model(sequence[None])[0, n - 1:]  # (new_tokens, V)
        torch.testing.assert_close(logits[b], expected, atol=ATOL, rtol=RTOL)
        with torch.no_grad():
            greedy = model.generate(ids[b:b + 1, :n], new_tokens)[0, n:]
        assert torch.equal(logits[b].argmax(-1), greedy)


def test_torch_path_matches_the_model_on_a_heterogeneous_child():
    _check_against_model(tiny_child(), use_triton=False, lengths=[7, 7], new_tokens=6)


def test_torch_path_with_ragged_prompts_untied_head_and_biases():
    _check_against_model(tiny_child(seed=3, tied=False, bias=True), use_triton=False, lengths=[9, 4, 1], new_tokens=5)


def test_triton_kernels_in_the_interpreter_match_the_model_with_ragged_prompts():
    _check_against_model(tiny_child(), use_triton=True, lengths=[7, 4], new_tokens=3)


def test_bf16_triton_kernels_in_the_interpreter_track_the_torch_path():
    # the interpreter's bf16 arithmetic was wrong (logits off by up to 3, greedy tokens [0, 0] against [91, 91])
    ids = _prompts(2, 7)
    logits = [ChildRuntime(tiny_child(), 2, 10, dtype=torch.bfloat16, use_triton=t).prefill(ids).float()
              for t in (False, True)]
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    torch.testing.assert_close(logits[1], logits[0], atol=0.1, rtol=0.05)


def test_generate_equals_model_generate_and_stops_at_eos():
    model = tiny_child(seed=5)
    ids = _prompts(2, 5, seed=2)
    rt = ChildRuntime(model, 2, 5 + 10)
    free = rt.generate(ids, 10)
    assert torch.equal(free, model.generate(ids, 10))
    assert rt.last_stats.steps == 9 and rt.last_stats.decode_tok_s > 0
    # an EOS that row 0 emits at its third token: row 0 then repeats it, row 1 runs on
    eos = int(free[0, 5 + 2])
    for check_every in (1, 8):
        out = rt.generate(ids, 10, eos_token_id=eos, check_every=check_every)
        assert torch.equal(out, model.generate(ids, 10, eos_token_id=eos))
    # both rows stop: the output ends where the last row emitted its first EOS, as in the model
    eos_pair = [int(free[0, 6]), int(free[1, 8])]
    out = rt.generate(ids, 10, eos_token_id=eos_pair)
    expected = model.generate(ids, 10, eos_token_id=eos_pair)
    assert expected.shape[1] < 5 + 10
    assert torch.equal(out, expected)


def test_generate_refuses_non_finite_logits_and_names_the_step():
    model = tiny_child(seed=5)
    ids = _prompts(2, 5, seed=2)
    rt = ChildRuntime(model, 2, 5 + 10)
    free = rt.generate(ids, 10)
    prompt = set(ids.flatten().tolist())
    step, token = next((k, int(t)) for k in range(1, 10) for t in free[:, 5 + k - 1] if int(t) not in prompt)
    rt.embed = rt.embed.clone()  # untied from the LM head: only the decode input of that token goes NaN
    rt.embed[token] = float("nan")  # as an activation that overflows would: after load's finiteness check
    with pytest.raises(PuzzleError, match=f"NaN or infinite at generation step {step} .*check the weights"):
        rt.generate(ids, 10)
    rt.lm_head[3] = float("inf")
    with pytest.raises(PuzzleError, match="step 0"):
        rt.generate(ids, 10)


def test_no_op_subblocks_cost_nothing_and_caches_follow_each_layers_kv_heads():
    model = tiny_child()
    rt = ChildRuntime(model, batch_size=3, max_len=10)
    kinds = [type(s).__name__ for s in rt.subblocks]
    assert kinds == ["_SwiGLU", "_GQA", "_Linear", "_GQA", "_Linear", "_SwiGLU", "_GQA", "_SwiGLU"]
    caches = [tuple(s.k_cache.shape) for s in rt.subblocks if hasattr(s, "k_cache")]
    assert caches == [(3, 1, 10, 16), (3, 2, 10, 16), (3, 4, 10, 16)]
    assert rt.kv_cache_bytes() == 2 * 4 * 3 * 10 * 16 * (1 + 2 + 4)
    empty = tiny_child([_block("attn-noop", "ffn-noop")] * 3)
    rt = ChildRuntime(empty, 2, 8)
    assert rt.subblocks == [] and rt.kv_cache_bytes() == 0
    ids = _prompts(2, 5)
    torch.testing.assert_close(rt.prefill(ids), empty(ids)[:, -1].detach(), atol=1e-6, rtol=1e-6)


def test_clear_errors():
    model = tiny_child()
    rt = ChildRuntime(model, 2, 8)
    with pytest.raises(PuzzleError, match="B=2"):
        rt.prefill(_prompts(3, 4))
    with pytest.raises(PuzzleError, match="larger max_len"):
        rt.prefill(_prompts(2, 9))
    with pytest.raises(PuzzleError, match="lengths"):
        rt.prefill(_prompts(2, 4), lengths=[4, 5])
    with pytest.raises(PuzzleError, match="max_len"):
        rt.generate(_prompts(2, 4), 6)
    rt.prefill(_prompts(2, 6))
    rt.decode(torch.zeros(2, dtype=torch.long))
    rt.decode(torch.zeros(2, dtype=torch.long))
    with pytest.raises(PuzzleError, match="full"):
        rt.decode(torch.zeros(2, dtype=torch.long))
    if not torch.cuda.is_available():
        with pytest.raises(PuzzleError, match="CUDA"):
            ChildRuntime(model, 2, 8, cuda_graphs=True)
        with pytest.raises(PuzzleError, match="CUDA"):
            ChildRuntime(model, 2, 8, device="cuda")


def test_step_fns_for_cost_measurement():
    model = tiny_child()
    whole = runtime_step_fns(model, 2, 6, context=9, part="model")
    whole.prefill()
    whole.prepare_decode()
    whole.decode()
    assert whole.runtime.lengths == [10, 10]
    assert whole.runtime.max_len == 10
    layers = runtime_step_fns(model, 2, 6, context=9, part="layers")
    h, delta = layers.prefill()
    assert h.shape == delta.shape == (2, 6, 64)
    layers.prepare_decode()
    h, delta = layers.decode()
    assert h.shape == (2, 1, 64)
    assert layers.runtime.lengths == [9, 9]  # a layers-only step leaves the positions alone
    with pytest.raises(PuzzleError, match="part"):
        runtime_step_fns(model, 2, 6, 9, part="head")


def test_answer_prompts_match_the_models_greedy_chat_answers():
    from puzzle.pipeline import chat_answers
    from puzzle.tiny import tiny_parent

    lm = tiny_parent(seed=1)
    prompts = ["Hi", "What is the capital of France?"]  # different lengths: one batch, right-padded
    result = answer_prompts(lm.model, lm.tokenizer, prompts, max_new_tokens=6)
    assert list(result.answers) == chat_answers(lm.model, lm.tokenizer, prompts, 6)
    assert result.device == "cpu" and result.dtype == "float32"
    limit = lm.model.config.max_position_embeddings  # past it RoPE was never trained: refused, with the largest count
    with pytest.raises(PuzzleError, match=r"give --max-new-tokens \d+ or less"):
        answer_prompts(lm.model, lm.tokenizer, prompts, max_new_tokens=limit)
    with pytest.raises(PuzzleError, match="shorten the prompt"):
        answer_prompts(lm.model, lm.tokenizer, ["word " * limit], max_new_tokens=1)
    with pytest.raises(PuzzleError, match="not valid UTF-8"):  # undecodable argv bytes arrive as surrogates
        answer_prompts(lm.model, lm.tokenizer, ["\udcff bad"], max_new_tokens=1)


def test_interpreted_launches_leave_triton_language_unpatched():
    """The interpreter path patches triton.language once per launch and restores it (kernels/utils.py), so a
    compiled launch later in the same process sees the real language."""
    import triton.language as tl

    from puzzle.kernels.ops import swiglu

    before = {name: getattr(tl.core, name) for name in dir(tl.core)}
    g = torch.randn(3, 70)
    torch.testing.assert_close(swiglu(g, g, use_triton=True), torch.nn.functional.silu(g) * g)  # calls tl.sigmoid
    assert [name for name in dir(tl.core) if getattr(tl.core, name) is not before.get(name)] == []


def test_generate_parser():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    p = add_generate_parser(sub)
    args = p.parse_args(["some/model", "--prompt", "a", "--prompt", "b", "--dtype", "bfloat16", "--triton", "off"])
    assert args.prompt == ["a", "b"] and args.triton == "off" and args.func.__name__ == "cmd_generate"


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: compiled kernels, bf16, CUDA graphs


@gpu
def test_cuda_graphs_replay_the_eager_step_and_match_the_model():
    model = tiny_child().cuda()
    ids = _prompts(2, 7).cuda()
    eager = ChildRuntime(model, 2, 40, cuda_graphs=False)
    graphed = ChildRuntime(model, 2, 40, cuda_graphs=True)
    assert graphed.use_triton and graphed._graph is not None
    assert torch.equal(eager.generate(ids, 20), graphed.generate(ids, 20))
    # fp32 logits of every step against the model's forward over the generated sequence
    out = graphed.generate(ids, 20)
    logits = [graphed.prefill(ids)]
    for t in range(7, 26):
        logits.append(graphed.decode(out[:, t]))
    with torch.no_grad():
        expected = model(out)[:, 6:26]  # (B, 20, V)
    torch.testing.assert_close(torch.stack(logits, 1), expected, atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.parametrize("use_triton", [True, False])
def test_bf16_on_cuda_tracks_the_fp32_model(use_triton):
    model = tiny_child().cuda()
    ids = _prompts(2, 33).cuda()
    rt = ChildRuntime(model, 2, 64, dtype=torch.bfloat16, use_triton=use_triton)
    logits = rt.prefill(ids, [33, 20])
    expected = torch.stack([model(ids[:1])[0, -1], model(ids[1:, :20])[0, -1]]).detach()
    torch.testing.assert_close(logits.float(), expected, atol=5e-2, rtol=5e-2)
    tokens = logits.argmax(-1)
    for _ in range(5):
        logits = rt.decode(tokens)
        tokens = logits.argmax(-1)
    assert torch.isfinite(logits.float()).all()


@gpu
def test_step_fns_with_cuda_graphs():
    model = tiny_child().cuda()
    for part in ("model", "layers"):
        fns = runtime_step_fns(model, 4, 16, context=24, part=part, dtype=torch.bfloat16)
        fns.prefill()
        fns.prepare_decode()
        fns.decode()
        torch.cuda.synchronize()


def test_answers_stop_at_the_models_own_stop_ids_and_use_every_position(monkeypatch):
    """Reviewer: `puzzle generate` and report answers stopped only at the tokenizer's EOS, not at the configuration's
    list (Llama-3-Instruct ends turns in <|eot_id|>); an added <pad> past the embedding crashed a ragged batch; an
    empty prompt was refused in terms of the cache; and one more new token fits than the limit allowed."""
    import dataclasses

    from puzzle.runtime import encode_prompts
    from puzzle.sft import greedy_chat

    from puzzle.tiny import tiny_parent

    lm = tiny_parent(seed=1)
    model, prompts = lm.model, ["Hi", "What is the capital of France?"]
    free = answer_prompts(model, lm.tokenizer, prompts, max_new_tokens=6)
    ids = encode_prompts(lm.tokenizer, prompts[:1])[0][0][None]  # (1, T)
    token = int(model(ids)[0, -1].argmax())  # the first token of the answer to "Hi"
    assert answer_prompts(lm.model, lm.tokenizer, prompts[:1], max_new_tokens=20).stats.steps == 19  # no EOS reached
    model.config = dataclasses.replace(model.config, eos_token_id=[lm.tokenizer.eos_token_id, token])
    stopped = answer_prompts(model, lm.tokenizer, prompts[:1], max_new_tokens=20)
    assert stopped.answers == ("",) and stopped.stats.steps <= 8  # stopped at once (the host checks every 8 steps)
    assert greedy_chat(model, lm.tokenizer, [{"role": "user", "content": prompts[0]}], 6) == ""
    model.config = dataclasses.replace(model.config, eos_token_id=lm.tokenizer.eos_token_id)
    past = model.config.vocab_size + 3  # an added <pad> beyond the embedding
    monkeypatch.setattr(type(lm.tokenizer), "pad_token_id", property(lambda self: past), raising=False)
    assert answer_prompts(model, lm.tokenizer, prompts, max_new_tokens=6).answers == free.answers  # pad never read
    monkeypatch.undo()
    T = max(len(e) for e in encode_prompts(lm.tokenizer, prompts)[0])
    model.config = dataclasses.replace(model.config, max_position_embeddings=T + 3)
    assert len(answer_prompts(model, lm.tokenizer, prompts, max_new_tokens=4).answers) == 2  # T + 4 - 1 positions
    with pytest.raises(PuzzleError, match=r"give --max-new-tokens 4 or less"):
        answer_prompts(model, lm.tokenizer, prompts, max_new_tokens=5)
    monkeypatch.setattr(lm.tokenizer, "chat_template", None)  # plain text: an empty prompt is no token
    with pytest.raises(PuzzleError, match="prompt 1 encodes to no token"):
        answer_prompts(model, lm.tokenizer, ["", "Hi"], max_new_tokens=2)
    cut = type(lm.tokenizer).decode  # a character cut by --max-new-tokens: its bytes decode to U+FFFD, dropped
    monkeypatch.setattr(type(lm.tokenizer), "decode", lambda self, ids, **kw: cut(self, ids, **kw) + " caf\ufffd")
    assert answer_prompts(model, lm.tokenizer, ["Hi"], max_new_tokens=2).answers[0].endswith(" caf")
    monkeypatch.setattr(type(lm.tokenizer), "decode", cut)
    monkeypatch.setattr(lm.tokenizer, "chat_template", "{% for m in messages %}{% endfor %}")  # renders nothing
    with pytest.raises(PuzzleError, match="the model's chat template renders prompt 1 to no token; mend"):
        answer_prompts(model, lm.tokenizer, ["Hi"], max_new_tokens=2)  # breaker: "the model has no chat template"


def test_generate_takes_the_built_in_tiny_model_and_refuses_an_empty_prompt(capsys, tmp_path, monkeypatch):
    """Breaker: `puzzle generate tiny` said "tiny does not exist" where `puzzle eval tiny` takes the built-in model;
    `--prompt ""` was answered without a word."""
    from puzzle.cli import main

    monkeypatch.chdir(tmp_path)  # no ./tiny folder here
    argv = ["generate", "tiny", "--max-new-tokens", "3", "--device", "cpu"]
    assert main([*argv, "--prompt", "The cat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("> The cat\n") and "decode steps" in out
    import dataclasses

    from puzzle import runtime  # a blank answer is said (breaker: eight newlines printed as an empty line)

    real = runtime.answer_prompts
    monkeypatch.setattr(runtime, "answer_prompts",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), answers=("",)))
    assert main([*argv, "--prompt", "The cat"]) == 0
    assert capsys.readouterr().out.split("\n")[1] == \
        "(no text: the answer was whitespace alone, or it stopped at once)"
    monkeypatch.setattr(runtime, "answer_prompts", real)
    assert main([*argv, "--prompt", "hi", "--prompt", "  "]) == 2
    assert "--prompt 2 is empty; give each --prompt a message" in capsys.readouterr().err
