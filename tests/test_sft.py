"""SFT: chat data forms, prompt masking, packing with isolated attention, the toggle demonstration set,
the loss over processes, resume, and that a short SFT of the tiny model makes the toggle work."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.sft import (DEMO_SPEC, IGNORE, REASONING_OFF, REASONING_ON, SFTConfig, _step_fn, block_causal_mask,
                        conversation_from_record, pack_conversations, parse_think, prepare_sft_data,
                        read_chat_jsonl, reasoning_toggle_examples, reasoning_toggle_heldout, sft_meta,
                        supervised_finetune, tokenize_conversation, toggle_report, toggle_summary)
from puzzle.tiny import tiny_parent
from puzzle.train_utils import CausalLMForward, DistEnv


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return tiny_parent()


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4."}]


def test_both_record_forms_and_clear_errors(tmp_path):
    pair = conversation_from_record({"prompt": "Hi", "response": "Hello", "system": "S"}, "x")
    assert pair == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]
    assert conversation_from_record({"messages": CHAT}, "x") == CHAT
    assert conversation_from_record({"prompt": "Hi", "response": "Hello", "system": None}, "x") == pair[1:]
    with pytest.raises(PuzzleError, match="a string content, got {'role': 'system', 'content': 5}"):
        conversation_from_record({"prompt": "Hi", "response": "Hello", "system": 5}, "x")  # breaker: dropped unsaid
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(PuzzleError, match="line 2: no assistant message"):
        read_chat_jsonl(str(path))
    with pytest.raises(PuzzleError, match="role in"):
        conversation_from_record({"messages": [{"role": "bot", "content": "x"}]}, "x")
    with pytest.raises(PuzzleError, match="'messages'.*'prompt' and 'response'"):
        conversation_from_record({"text": "x"}, "x")


def test_system_messages_that_spell_the_toggle_otherwise_are_warned_of(tmp_path):
    """Stop 76's leftover: 'Detailed Thinking: ON' was trained as one more system message, unsaid."""
    import warnings

    path = tmp_path / "chat.jsonl"
    records = [{"system": s, "prompt": "Hi", "response": "Hello"}
               for s in ("Detailed Thinking: ON", "detailed thinking off", "detailed_thinking off", "Be brief")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match=r"2 system message\(s\) read like the reasoning toggle but are not its exact "
                                         r"text \('Detailed Thinking: ON', 'detailed_thinking off'\)"):
        assert len(read_chat_jsonl(str(path))) == 4
    path.write_text("".join(json.dumps({**r, "system": "detailed thinking on"}) + "\n" for r in records))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact toggle: nothing to say
        read_chat_jsonl(str(path))


def test_only_assistant_turns_are_learned(tiny):
    tok = tiny.tokenizer
    ids, labels = tokenize_conversation(tok, CHAT)
    assert len(ids) == len(labels)
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    # both answers with their end-of-turn token, not the newline ChatML writes after it (generation stops before it)
    assert learned == "Hello!<|im_end|>4.<|im_end|>"
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    _, everything = tokenize_conversation(tok, CHAT, train_on_prompt=True)
    assert IGNORE not in everything
    # a conversation that opens with the assistant: its role header was learned ("assistant\nHello...")
    ids, labels = tokenize_conversation(tok, [{"role": "assistant", "content": "Hello, how can I help?"},
                                              {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned == "Hello, how can I help?<|im_end|>ok<|im_end|>"


def test_packed_rows_compute_what_each_conversation_alone_does(tiny):
    tok, model = tiny.tokenizer, tiny.model
    convs = [CHAT, [{"role": "user", "content": "Sort 3, 1, 2."}, {"role": "assistant", "content": "1, 2, 3."}],
             [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]]
    data = prepare_sft_data(tok, convs, seq_len=160)
    assert data.input_ids.shape == (1, 160) and data.segments.max() == 3 and data.dropped == 0
    mask = block_causal_mask(data.segments)
    packed = CausalLMForward(model)(data.input_ids, position_ids=data.position_ids, attention_mask=mask)
    plain = model(data.input_ids)  # no isolation, positions 0..T-1: what packing without the mask would compute
    mismatched = 0
    for s in (1, 2, 3):
        where = (data.segments[0] == s).nonzero().flatten()
        alone = model(data.input_ids[:, where])
        assert torch.allclose(packed[0, where], alone[0], atol=1e-5)
        mismatched += not torch.allclose(plain[0, where], alone[0], atol=1e-3)
    assert mismatched == 2  # only the first conversation of the row is unaffected without isolation
    assert data.position_ids[0, (data.segments[0] == 2).nonzero()[0]] == 0  # positions restart


def test_block_causal_mask_and_packing_rules():
    seg = torch.tensor([[1, 1, 2, 2, 0]])
    m = block_causal_mask(seg)[0, 0]
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    examples = [([5] * 3, [5] * 3), ([6] * 4, [6] * 4), ([7] * 9, [7] * 9)]
    packed = pack_conversations(examples, seq_len=8, pad_id=0)
    assert packed.dropped == 1 and packed.input_ids.shape[0] == 1  # 3 + 4 tokens share a row; 9 > 8 is dropped
    assert pack_conversations(examples[:2], seq_len=8, pad_id=0, pack=False).input_ids.shape[0] == 2
    with pytest.raises(PuzzleError, match="longer than seq_len"):
        pack_conversations(examples[2:], seq_len=8, pad_id=0)


def test_packing_learns_the_same_targets_as_one_conversation_per_row(tiny):
    """Breaker: with train_on_prompt every label was copied, so the last token of a packed conversation
    was trained to predict the first token of the next one (6 targets packed, 5 unpacked)."""
    examples = [([5] * 3, [5] * 3), ([6] * 4, [6] * 4)]
    packed = pack_conversations(examples, seq_len=8, pad_id=0)
    alone = pack_conversations(examples, seq_len=8, pad_id=0, pack=False)
    assert packed.input_ids.shape[0] == 1 and alone.input_ids.shape[0] == 2
    assert int((packed.labels[:, 1:] != IGNORE).sum()) == int((alone.labels[:, 1:] != IGNORE).sum()) == 5
    convs = [CHAT, [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]]
    for train_on_prompt in (True, False):
        rows = {pack: prepare_sft_data(tiny.tokenizer, convs, seq_len=160, pack=pack, train_on_prompt=train_on_prompt)
                for pack in (True, False)}
        assert rows[True].input_ids.shape[0] == 1
        targets = {pack: sorted(r.labels[:, 1:][r.labels[:, 1:] != IGNORE].tolist()) for pack, r in rows.items()}
        assert targets[True] == targets[False]


def test_freeze_embeddings_keeps_an_untied_lm_head_trainable(tiny, tmp_path):
    """Breaker: --freeze-embeddings froze lm_head.weight even when it is not tied to the embedding."""
    import dataclasses

    from puzzle.modeling import PuzzleForCausalLM

    data = prepare_sft_data(tiny.tokenizer, [r["messages"] for r in reasoning_toggle_examples(2, 0)], seq_len=256)
    cfg = SFTConfig(epochs=1, seq_len=256, batch_size=2, lr=1e-2, warmup_fraction=0.0, freeze_embeddings=True)
    for tied in (True, False):
        torch.manual_seed(0)
        model = PuzzleForCausalLM(dataclasses.replace(tiny.config, tie_word_embeddings=tied))
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
        trained = supervised_finetune(model, data, cfg, tmp_path / f"tied-{tied}").model
        assert torch.equal(trained.model.embed_tokens.weight, embed)
        assert torch.equal(trained.lm_head.weight, head) == tied  # an untied head trains
        # and says so in what a checkpoint must match: one of an earlier version (head frozen) is not resumed (review)
        assert ("lm_head_trains" in sft_meta(model, data, cfg)) == (not tied)
        assert "lm_head_trains" not in sft_meta(model, data, dataclasses.replace(cfg, freeze_embeddings=False))


def test_loss_over_two_processes_is_the_loss_over_the_whole_batch(tiny):
    """The step's loss is summed over its learned tokens and divided by their total, whichever
    rank holds them; DDP's gradient average then equals the one-process gradient."""
    data = prepare_sft_data(tiny.tokenizer, [r["messages"] for r in reasoning_toggle_examples(6, 0)], seq_len=200,
                            pack=False)
    cfg = SFTConfig(batch_size=4, seq_len=200)
    grads = []
    for world in (1, 2):
        total = None
        for rank in range(world):
            model = tiny_parent().model.train()
            metrics = _step_fn(data, cfg, DistEnv(rank, world))(CausalLMForward(model), 0)
            g = torch.cat([p.grad.flatten() for p in model.parameters()]) / world  # DDP averages
            total = g if total is None else total + g
        grads.append(total)
        assert metrics["loss"] > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    data = prepare_sft_data(tiny.tokenizer, [r["messages"] for r in reasoning_toggle_examples(3, 0)], seq_len=256)
    cfg = SFTConfig(epochs=2, seq_len=256, batch_size=2, lr=1e-3, checkpoint_every=2)  # 3 rows: 3 steps
    whole = supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "a")
    assert whole.total_steps == 3
    part = supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "b", stop_after_steps=2)
    assert not part.finished
    rest = supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "b")
    assert rest.resumed_from == 2 and rest.finished
    for a, b in zip(whole.model.parameters(), rest.model.parameters()):
        assert torch.equal(a, b)


def test_ctrl_c_mid_run_checkpoints_the_last_finished_step(tiny, tmp_path, monkeypatch):
    """Reviewer: Ctrl-C lost every step since the last scheduled checkpoint (up to checkpoint_every - 1) while the
    command said finished work was saved."""
    import puzzle.sft as sft

    data = prepare_sft_data(tiny.tokenizer, [r["messages"] for r in reasoning_toggle_examples(3, 0)], seq_len=256)
    cfg = SFTConfig(epochs=2, seq_len=256, batch_size=2, lr=1e-3, checkpoint_every=50)  # 3 steps, saved at the end
    whole = supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "a")
    real = sft._step_fn

    def interrupted(data, cfg, env):
        step = real(data, cfg, env)

        def run(wrapped, k):
            if k == 2:
                step(wrapped, k)  # forward and backward done, Ctrl-C before the update
                raise KeyboardInterrupt
            return step(wrapped, k)
        return run

    monkeypatch.setattr(sft, "_step_fn", interrupted)
    with monkeypatch.context() as full:  # reviewer: a failed save replaced the interrupt with its OSError
        def no_room(*args, **kwargs):
            raise OSError(28, "No space left on device")

        full.setattr("puzzle.train_utils._save", no_room)
        with pytest.raises(KeyboardInterrupt) as e:
            supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "full")
        assert "saving step 2 failed ([Errno 28] No space left on device), so a rerun trains from the start" \
            in e.value.puzzle_note
    with pytest.raises(KeyboardInterrupt) as e:
        supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "b")
    assert e.value.puzzle_note == "sft: checkpoint at step 2 of 3; rerun the same command to resume"
    # Ctrl-C inside the optimizer update (breaker: 2 of 12 fell there and lost their steps) waits for the update
    import os
    import signal

    monkeypatch.undo()
    update = torch.optim.AdamW.step

    def interrupted_update(self, *args, **kwargs):
        if self.state and next(iter(self.state.values()))["step"] == 1:  # the second update
            os.kill(os.getpid(), signal.SIGINT)
        return update(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", interrupted_update)
        with pytest.raises(KeyboardInterrupt) as e:
            supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "c")
    assert e.value.puzzle_note == "sft: checkpoint at step 2 of 3; rerun the same command to resume"
    rest = supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "c")
    for a, b in zip(whole.model.parameters(), rest.model.parameters()):
        assert torch.equal(a, b)
    rest = supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "b")
    assert rest.resumed_from == 2 and rest.finished
    for a, b in zip(whole.model.parameters(), rest.model.parameters()):
        assert torch.equal(a, b)


def test_settings_that_are_not_finite_and_a_diverged_last_step_are_refused(tiny, tmp_path, monkeypatch):
    for bad, words in [({"lr": math.inf}, "--lr inf is not a learning rate"), ({"epochs": math.nan}, "epochs=nan"),
                       ({"warmup_fraction": 2.0}, "fractions in [0, 1]"),
                       ({"grad_clip": -1.0}, "grad_clip must be >= 0"),
                       ({"checkpoint_every": 0}, "checkpoint_every")]:
        with pytest.raises(PuzzleError, match=re.escape(words)):
            SFTConfig(**bad)
    data = prepare_sft_data(tiny.tokenizer, [r["messages"] for r in reasoning_toggle_examples(2, 0)], seq_len=256)
    with pytest.raises(PuzzleError, match=r"sft: --lr 2.0 is not a learning rate in \(0, 1\)"):  # breaker: 1e6 ran
        SFTConfig(lr=2.0)
    for module in ("puzzle.sft", "puzzle.train_utils"):  # past the lr check, for the guard behind it
        monkeypatch.setattr(f"{module}.require_learning_rate", lambda *a, **k: None)
    cfg = SFTConfig(epochs=1, seq_len=256, batch_size=2, lr=1e38, warmup_fraction=0.0, grad_clip=0.0)  # one step
    with pytest.raises(PuzzleError, match="weights became non-finite"):  # the loss before it was finite
        supervised_finetune(tiny_parent().model, data, cfg, tmp_path / "w")


def test_demonstration_set_is_paired_and_held_out():
    train = reasoning_toggle_examples()
    assert train == reasoning_toggle_examples()  # deterministic: the same set on every machine
    assert len(read_chat_jsonl(DEMO_SPEC)) == len(train)
    held = reasoning_toggle_heldout()
    by_question = {}
    for r in train:
        by_question.setdefault(r["messages"][1]["content"], set()).add(r["messages"][0]["content"])
        reply = r["messages"][2]["content"]
        parsed = parse_think(reply)
        assert parsed["well_formed"] == r["thinking"] and parsed["has_think"] == r["thinking"]
        assert r["value"] in parsed["answer"]
    assert all(v == {REASONING_ON, REASONING_OFF} for v in by_question.values())
    assert not {q["question"] for q in held} & set(by_question)
    assert len({q["task"] for q in held}) == 7


def test_parse_think():
    assert parse_think("<think>\nadd them\n</think>\n42.")["well_formed"]
    assert parse_think("<think>\nadd them\n</think>\n42.")["answer"] == "42."
    for bad in ("<think></think> 42", "<think>x</think>", "42. <think>x</think> y", "<think>x<think>y</think> z"):
        assert not parse_think(bad)["well_formed"], bad
    assert not parse_think("42.")["has_think"]
    # reviewer: a trace cut off by the token limit, or closed with nothing after it, was scored as the answer
    for cut in ("<think>\nSo 12 + 23 = 35.", "<think>\nSo 12 + 23 = 35.\n</think>\n"):
        assert parse_think(cut)["answer"] == ""


def _newline_merging_tokenizer():
    """The tiny tokenizer with one merge more, "\\n\\n", so a reply that opens with a blank line merges with the
    header's newline, as with SmolLM2's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from puzzle import tiny

    vocab = {tok: i for i, tok in enumerate(tiny.SPECIAL_TOKENS)}
    for char in tiny.bytes_to_unicode().values():
        vocab[char] = len(vocab)
    merges = tiny.learn_merges(tiny._MERGE_TEXT, tiny.NUM_MERGES) + [("\u010a", "\u010a")]  # byte-level "\n" twice
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(tiny.SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=tiny.CHAT_TEMPLATE)


def test_a_reply_that_opens_with_whitespace_is_located_by_characters(tiny):
    """Reviewer: with SmolLM2's tokenizer a reply opening with "\\n\\n" merged with the header's newline, the token
    prefixes no longer matched, and the whole data set stopped. Such turns are now located by character offsets:
    the token across the header's end stays unlearned, the rest of the reply and its end-of-turn token are learned."""
    from puzzle.sft import _labels_by_offsets

    tok = _newline_merging_tokenizer()
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nanswer"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "\n\nmore"}]
    ids, labels = tokenize_conversation(tok, messages)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "\nanswer<|im_end|>\nmore<|im_end|>"
    # on conversations the token prefixes handle, locating by characters gives the same labels
    first = [{"role": "assistant", "content": "<think>hi</think> ok"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": ""}]  # reviewer: an opening "<" was taken for the header's
    for conversation in [r["messages"] for r in reasoning_toggle_examples(6, 0)] + [first]:
        for t in (tok, tiny.tokenizer):
            ids, labels = tokenize_conversation(t, conversation)
            assert _labels_by_offsets(t, conversation, ids) == labels


def test_a_refused_resume_names_the_setting_and_short_inputs_say_what_they_need(tiny, tmp_path):
    """Reviewer: a refused resume said "differs in ['config']"; 'messages' that is not a list fell back to
    prompt/response; "every conversation is longer" did not say how long the shortest is."""
    from puzzle.train_utils import _check_meta

    saved = {"stage": "sft", "config": {"lr": 1e-4, "checkpoint_every": 50}, "data": "a" * 64}
    with pytest.raises(PuzzleError, match=re.escape("differs in ['config.lr: 0.0001 -> 0.001', 'data']")):
        _check_meta(tmp_path / "c.pt", saved,
                    {**saved, "config": {"lr": 1e-3, "checkpoint_every": 5}, "data": "b" * 64})
    # how often it checkpoints is no setting to go back to, unless nothing else differs (breaker: it was listed)
    with pytest.raises(PuzzleError, match=re.escape("differs in ['config.checkpoint_every: 50 -> 5']")):
        _check_meta(tmp_path / "c.pt", saved, {**saved, "config": {"lr": 1e-4, "checkpoint_every": 5}})
    with pytest.raises(PuzzleError, match="'messages' must be a list of {role, content}, got str"):
        conversation_from_record({"messages": "hello", "prompt": "q", "response": "a"}, "f.jsonl, line 1")
    # a null (a mixed data set's missing column, as to_json writes it) is no field at all
    assert conversation_from_record({"messages": None, "prompt": "q", "response": "a"}, "f.jsonl, line 1")[-1] == \
        {"role": "assistant", "content": "a"}
    convs = [r["messages"] for r in reasoning_toggle_examples(1, 0)]
    with pytest.raises(PuzzleError, match=r"longer than seq_len=8 \(the shortest has (\d+) tokens\); give --seq-len "
                                          r"\1 or more \(at most 4096, the model's positions\)"):
        prepare_sft_data(tiny.tokenizer, convs, seq_len=8, positions=4096)
    with pytest.raises(PuzzleError, match=r"that is more than the 9 positions the model was trained on: give shorter"):
        prepare_sft_data(tiny.tokenizer, convs, seq_len=8, positions=9)


def test_a_template_that_refuses_a_conversation_names_it(tiny):
    """Reviewer: a template raising on the order of roles gave a bare jinja2 traceback."""
    from puzzle.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(PuzzleError, match=re.escape("conversation 2 of the data (roles assistant): roles must")):
        prepare_sft_data(tok, [good, [{"role": "assistant", "content": "b"}]], 64)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ 1 / 0 }}"  # breaker: a traceback
    with pytest.raises(PuzzleError, match=re.escape("the chat template failed on conversation 1 of the data "
                                                    "(ZeroDivisionError")):
        prepare_sft_data(tok, [good], 64)


def test_toggle_answers_are_scored_on_the_stated_result():
    """Reviewer: "the value appears in the answer" counted "300 is larger than 512." and a reply that repeats the
    question as correct (16 of 100 held-out questions)."""
    from puzzle.sft import answer_is_correct, reasoning_toggle_questions

    compare = {"task": "compare", "question": "Which number is larger, 300 or 512?", "value": "512"}
    assert answer_is_correct(compare, "512 is larger.")
    for wrong in ("300 is larger than 512.", compare["question"], "300 is larger.", ""):
        assert not answer_is_correct(compare, wrong), wrong
    story = {"task": "story", "question": "Anna has 12 apples, buys 5 more and gives 1 away. How many apples does "
                                          "Anna have now?", "value": "16"}
    assert answer_is_correct(story, "Anna has 16 apples now.") and not answer_is_correct(story, story["question"])
    add = {"task": "add", "question": "What is 61 + 61?", "value": "122"}
    assert answer_is_correct(add, "61 + 61 = 122.") and not answer_is_correct(add, "61 + 61 = 122.5")
    sort = {"task": "sort", "question": "Sort these numbers from smallest to largest: 58, 14, 33, 59.",
            "value": "14, 33, 58, 59"}
    assert answer_is_correct(sort, "14, 33, 58, 59.") and not answer_is_correct(sort, "14, 33, 58, 59, 99.")
    units = {"task": "units", "question": "How many meters are in 40 kilometers?", "value": "40000"}
    assert answer_is_correct(units, "40 kilometers are 40,000 meters.")
    assert not answer_is_correct(units, "40 kilometers are 4000 meters.")
    # every demonstration answer passes, and no held-out question repeated as its answer does
    held = reasoning_toggle_heldout()
    for q in reasoning_toggle_questions(400, 0) + held:
        assert answer_is_correct(q, q["answer"]), q
    assert not [q for q in held if answer_is_correct(q, q["question"])]


def test_short_sft_teaches_the_toggle_on_held_out_questions(tmp_path):
    """~140 steps of SFT (about 10 s of one CPU thread) make a fresh tiny model open its greedy answer
    with <think> when the system message says "detailed thinking on" and not when it says "off", on
    questions it never saw. Kept fast by training on two short task types (subtraction and
    multiplication, ~105 tokens a conversation; their answers start with a digit with the toggle off)
    and by generating only the first 8 tokens, enough for "<think>\\n" (7 tokens): the toggle is decided
    by the first tokens. The assertion has teeth: the untrained model never writes <think>, and around step 40
    of this run the model writes it in both modes (it learns "think" before it learns the switch; the off
    share reaches 0 by step 100). Deterministic: fixed model seed, data and batch order."""
    tasks = {"sub", "mul"}
    lm = tiny_parent()
    train = [r for r in reasoning_toggle_examples(140, 0) if r["task"] in tasks]  # 20 questions a task, on and off
    held = [q for q in reasoning_toggle_heldout(42) if q["task"] in tasks]  # 6 new questions a task
    assert len(train) == 80 and len(held) == 12
    assert not {q["question"] for q in held} & {r["messages"][1]["content"] for r in train}
    before = toggle_summary(toggle_report(lm.model, lm.tokenizer, held, max_new_tokens=8)).set_index("mode")
    assert before.think_fraction.max() == 0
    data = prepare_sft_data(lm.tokenizer, [r["messages"] for r in train], seq_len=256)
    cfg = SFTConfig(epochs=12, seq_len=256, batch_size=4, lr=3e-3, warmup_fraction=0.1, checkpoint_every=1000)
    result = supervised_finetune(lm.model, data, cfg, tmp_path)
    assert result.finished and result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    report = toggle_report(result.model, lm.tokenizer, held, max_new_tokens=8)
    after = toggle_summary(report).set_index("mode")
    replies = report.groupby("mode").reply.apply(list).to_dict()
    assert after.loc["on", "think_fraction"] >= 0.8, replies  # measured: 1.0 (12 of 12)
    assert after.loc["off", "think_fraction"] <= 0.2, replies  # measured: 0.0 (0 of 12)


def test_command_line_values_that_would_fail_late_are_refused_first(tmp_path):
    import argparse

    from puzzle.export import export_checkpoint
    from puzzle.sft import add_sft_parser

    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    model = tmp_path / "model"
    lm = tiny_parent()
    export_checkpoint(lm.model, lm.tokenizer, model)
    before = sorted(p.name for p in model.iterdir())
    base = ["sft", "--model", str(model), "--data", "demo:reasoning-toggle", "--dest", str(tmp_path / "out"),
            "--no-progress"]
    for extra, words in [(["--device", "tpu"], "give auto, cpu or cuda"), (["--stop-after-steps", "0"], ">= 1"),
                         (["--measure-toggle", "-1"], "--measure-toggle must be >= 0"),
                         (["--work", str(model / "w")], "inside the exported model"),
                         (["--seq-len", "100000"], "longer than the"),
                         (["--lr", "nan"], "--lr nan is not a learning rate"),
                         (["--lr", "1e6"], "--lr 1000000.0 is not a learning rate in (0, 1)"),  # breaker: trained
                         # reviewer: these two failed only after training (and export), or trained without a mode
                         (["--measure-toggle", "1500"], "--measure-toggle 1500: cannot make 1500 distinct"),
                         (["--seq-len", "128"], "are longer than --seq-len 128 and left out; --seq-len 240 keeps"),
                         # breaker: the same file twice trained on 40 conversations of 20
                         (["--data", "demo:reasoning-toggle", "demo:reasoning-toggle"],
                          "--data names demo:reasoning-toggle twice; give each file once")]:
        args = parser.parse_args(base + extra)
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "out").exists()
    # breaker: a --work folder of the user's own files took checkpoint.pt and sft.json among them (replacing theirs);
    # a checkpoint.pt of random bytes ended in torch's UnpicklingError traceback
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(PuzzleError, match=r"--work .*mine holds files no gkd or sft training wrote \(notes.txt\)"):
        (args := parser.parse_args(base + ["--work", str(mine)])).func(args)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "checkpoint.pt").write_bytes(bytes(range(256)) * 20)
    (junk / ".DS_Store").write_bytes(b"")  # hidden files are no user's work (reviewer: .nfs files of NFS, too)
    with pytest.raises(PuzzleError, match=r"checkpoint .*checkpoint.pt cannot be read \(not a torch file of tensors\); "
                                          r"delete it to start over"):
        (args := parser.parse_args(base + ["--work", str(junk)])).func(args)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and not (tmp_path / "out").exists()


def test_a_run_child_fine_tunes_with_the_default_work_folder(tmp_path_factory, tmp_path):
    """`sft --out RUN --name CHILD` puts DEST and its work folder under RUN/export: allowed, unlike a
    work folder elsewhere in the run or inside a model folder (also through `..`)."""
    import argparse
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_run import tiny_run_dir

    from puzzle.sft import add_sft_parser

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), run)
    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    base = ["sft", "--out", str(run), "--name", "child-1.5x", "--data", "demo:reasoning-toggle", "--no-progress",
            "--seq-len", "256", "--stop-after-steps", "1"]
    args = parser.parse_args(base)
    assert args.func(args) == 0 and (run / "export" / "child-1.5x-sft.sft-work" / "checkpoint.pt").is_file()
    for work in (run / "library" / "w", tmp_path / "x" / ".." / "run" / "w"):
        args = parser.parse_args(base + ["--work", str(work)])
        with pytest.raises(PuzzleError, match="inside the input"):
            args.func(args)
    moved = shutil.move(run, tmp_path / "moved")  # a moved run resumes its own checkpoint in its own export folder
    args = parser.parse_args(["sft", "--out", str(moved), *base[3:]])
    assert args.func(args) == 0
    state = torch.load(Path(moved) / "export" / "child-1.5x-sft.sft-work" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2


def test_the_users_long_conversations_beside_the_demo_set_are_left_out_with_a_warning(tmp_path, capsys):
    """Reviewer: a long conversation of the user's own file, given with the demo set, refused the run and blamed the
    demo set."""
    import argparse

    from puzzle.export import export_checkpoint
    from puzzle.sft import add_sft_parser

    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    lm = tiny_parent()
    export_checkpoint(lm.model, lm.tokenizer, tmp_path / "model")
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "Tell me a long story.", "response": "word " * 600}) + "\n")
    args = parser.parse_args(["sft", "--model", str(tmp_path / "model"), "--data", "demo:reasoning-toggle",
                              "--data", str(mine), "--dest", str(tmp_path / "out"), "--no-progress", "--seq-len", "256",
                              "--stop-after-steps", "1"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "1 of 801 conversations are longer than --seq-len 256 and left out" in err
    # breaker: the hint named a --seq-len past the model's 2048 positions, which is refused
    assert "more than the 2048 positions the model was trained on, so no --seq-len keeps them all" in err, err


def test_another_training_into_the_same_dest_is_refused_before_it_trains(tmp_path, capsys):
    """The export records its training (settings, data, model, work folder): only a rerun of that training
    replaces it; an export recorded by an earlier version (no training) gets the hint that says so."""
    import argparse

    from puzzle.export import export_checkpoint
    from puzzle.sft import add_sft_parser

    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    lm = tiny_parent()
    export_checkpoint(lm.model, lm.tokenizer, tmp_path / "model")
    out, work = tmp_path / "out", tmp_path / "w"
    base = ["sft", "--model", str(tmp_path / "model"), "--data", "demo:reasoning-toggle", "--dest", str(out),
            "--no-progress", "--seq-len", "256", "--epochs", "0.02"]

    def sft(*extra):
        args = parser.parse_args([*base, *extra])
        return args.func(args)

    assert sft() == 0
    before = (out / "model.safetensors").read_bytes()
    for extra in (["--lr", "3e-4"], ["--seed", "1"], ["--epochs", "0.04"], []):
        with pytest.raises(PuzzleError, match=r"holds trained weights \(sft of .* \(training [0-9a-f]{16}\)\)"):
            sft("--work", str(work), *extra)
        assert not work.exists() and (out / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    first = json.loads((tmp_path / "out.sft-work" / "sft.json").read_text())
    assert sft() == 0  # a rerun of the same training replaces it
    assert "all steps done by an earlier call, only exported" in capsys.readouterr().err  # breaker: it said nothing
    rerun = json.loads((tmp_path / "out.sft-work" / "sft.json").read_text())  # the training's own figures stand
    assert (rerun["train_s"], rerun["resumed_from_step"]) == (first["train_s"], 0) and rerun["only_exported"]
    trained = (out / "model.safetensors").read_bytes()
    (tmp_path / "model").rename(tmp_path / "moved")  # breaker: a moved model was refused, then its checkpoint too
    base[2] = str(tmp_path / "moved")
    assert sft() == 0 and (out / "model.safetensors").read_bytes() == trained  # the finished checkpoint, exported
    config = json.loads((out / "config.json").read_text())
    del config["puzzle"]["sft"]["training"]  # as an earlier version recorded it
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(PuzzleError, match="recorded otherwise, by an earlier version"):
        sft()


def test_a_resume_may_change_how_often_checkpoints_are_saved(tmp_path):
    """Breaker: a resume with another --checkpoint-every was refused as a training of other settings."""
    import argparse

    from puzzle.sft import add_sft_parser

    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    base = ["sft", "--model", "tiny", "--data", "demo:reasoning-toggle", "--dest", str(tmp_path / "out"),
            "--seq-len", "256", "--batch-size", "2", "--no-progress"]
    args = parser.parse_args([*base, "--checkpoint-every", "3", "--stop-after-steps", "3"])
    assert args.func(args) == 0
    args = parser.parse_args([*base, "--checkpoint-every", "2", "--stop-after-steps", "2"])
    assert args.func(args) == 0
    state = torch.load(tmp_path / "out.sft-work" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and state["meta"]["config"]["checkpoint_every"] == 3  # the training's own setting
    args = parser.parse_args([*base, "--micro-batch-size", "1", "--stop-after-steps", "1"])  # breaker: refused
    assert args.func(args) == 0
    state = torch.load(tmp_path / "out.sft-work" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6 and state["meta"]["config"]["micro_batch_size"] == 0
    args = parser.parse_args([*base, "--checkpoint-every", "2", "--lr", "1e-3", "--stop-after-steps", "1"])
    with pytest.raises(PuzzleError, match="config.lr: 0.0001 -> 0.001"):  # another setting is still refused
        args.func(args)
    args = parser.parse_args([*base, "--micro-batch-size", "1"])  # the rest: its export records the training's own
    assert args.func(args) == 0
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["puzzle"]["sft"]["config"]
    assert recorded["micro_batch_size"] == 0 and recorded["checkpoint_every"] == 3


def test_a_finished_rerun_keeps_the_toggle_measurement_of_the_same_training(tmp_path, monkeypatch, capsys):
    """Fresh user: `sft ... --measure-toggle 40` run again on a finished training answered every question again
    (2 min 25 s against 2 min 20 s for the whole first call)."""
    import argparse

    import puzzle.sft as sft
    from puzzle.sft import add_sft_parser

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                            for i in range(4)))
    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    base = ["sft", "--model", "tiny", "--data", str(data), "--dest", str(tmp_path / "out"), "--seq-len", "64",
            "--batch-size", "2", "--measure-toggle", "2", "--max-new-tokens", "4", "--no-progress"]
    args = parser.parse_args(base)
    assert args.func(args) == 0
    work = tmp_path / "out.sft-work"
    first = (work / "toggle.csv").read_bytes()
    real = sft.toggle_report
    monkeypatch.setattr(sft, "toggle_report", lambda *a, **k: pytest.fail("answered again"))
    capsys.readouterr()
    args = parser.parse_args(base)
    assert args.func(args) == 0 and (work / "toggle.csv").read_bytes() == first
    assert "toggle.csv measured this training with these settings: kept" in capsys.readouterr().err
    summary = json.loads((work / "sft.json").read_text())
    assert summary["toggle"][0]["answers"] == 2
    monkeypatch.setattr(sft, "toggle_report", real)
    for flags in (["--max-new-tokens", "5"], ["--measure-toggle", "3"]):  # another measurement: made again
        args = parser.parse_args([*base, *flags])
        assert args.func(args) == 0
    assert json.loads((work / "sft.json").read_text())["toggle"][0]["answers"] == 3
    (work / "toggle.csv").write_text("damaged")
    args = parser.parse_args([*base, "--measure-toggle", "3"])
    assert args.func(args) == 0 and (work / "toggle.csv").read_text() != "damaged"


def test_a_batch_larger_than_the_packed_rows_is_refused(tmp_path):
    """Breaker: --batch-size 300 on 3 rows trained '1 epoch' as each row 100 times; 100000 ran one forward pass over
    100000 rows until killed."""
    import argparse

    from puzzle.sft import add_sft_parser

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                            for i in range(3)))
    parser = argparse.ArgumentParser()
    add_sft_parser(parser.add_subparsers())
    args = parser.parse_args(["sft", "--model", "tiny", "--data", str(data), "--dest", str(tmp_path / "out"),
                              "--seq-len", "64", "--no-pack", "--batch-size", "300", "--epochs", "1", "--no-progress"])
    with pytest.raises(PuzzleError, match=re.escape("--batch-size 300 is more than the 3 rows the data packs into at "
                                                    "--seq-len 64: each step would take the same rows again (--epochs "
                                                    "1 would make 100.0 passes); give --batch-size 3 or less")):
        args.func(args)
    assert not (tmp_path / "out").exists()
