"""Preference data, response log-probs, the reference cache, sampling, offline/online training, rewards, CLI."""

import argparse
import json
import re

import pandas as pd
import pytest
import torch

from puzzle.adapters import AdapterConfig, apply_adapters
from puzzle.errors import PuzzleError
from puzzle.preference import (RPOConfig, add_rpo_parser, encode_records, evaluate_rewards, frozen_copy, mean_ci,
                               preference_accuracy, read_preference_data, record_from_dict, reference_logprobs,
                               response_logprobs, sample, train_offline, train_online)
from puzzle.rewards import TASKS, LikelihoodJudge, positional_score, sequence_ratio
from puzzle.tiny import tiny_parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return tiny_parent(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)


PAIRS = [
    {"prompt": "The parent", "chosen": " is a model.", "rejected": " zzz qqq", "chosen_reward": 0.9, "rejected_reward": 0.1},
    {"prompt": [{"role": "user", "content": "Name a block."}], "chosen": "attention", "rejected": "banana",
     "chosen_reward": 0.7, "rejected_reward": 0.4},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
     "chosen_reward": 1.0, "rejected_reward": 0.0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_pairs_groups_and_chat_prompts(tmp_path):
    records = read_preference_data(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert [r.is_pair for r in records] == [True, True, True]
    assert records[0].rewards == (0.9, 0.1) and records[1].prompt == ({"role": "user", "content": "Name a block."},)
    assert records[2].prompt == ({"role": "user", "content": "Hi"},) and records[2].responses == ("Hello!", "Go away.")
    group = record_from_dict({"prompt": "x", "responses": ["a", "b", "c"], "rewards": [0.1, 0.5, 0.2]})
    assert len(group.responses) == 3 and group.rewards == (0.1, 0.5, 0.2)
    assert record_from_dict({"prompt": "x", "chosen": "a", "rejected": "b"}).rewards is None
    bad = [({"prompt": "x", "chosen": "a"}, "both 'chosen' and 'rejected'"),
           ({"prompt": "x", "chosen": "a", "rejected": "b", "chosen_reward": 1}, "both chosen_reward"),
           ({"prompt": "x", "responses": ["a", "b"], "rewards": [1.0]}, "one number per response"),
           ({"prompt": "x", "responses": ["a", "b"], "rewards": [1.0, None]}, "finite numbers"),
           # breaker: float32 made these inf, then said "some rewards are missing or not finite"
           ({"prompt": "x", "chosen": "a", "rejected": "b", "chosen_reward": 1e300, "rejected_reward": -1e300},
            r"reward 1e\+300 is beyond \+-1e\+09: the losses square scaled reward differences in float32"),
           ({"text": "x"}, "expected a pair")]
    for d, msg in bad:
        with pytest.raises(PuzzleError, match=msg):
            record_from_dict(d)
    (tmp_path / "bad.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{oops\n")
    with pytest.raises(PuzzleError, match="line 2"):
        read_preference_data(tmp_path / "bad.jsonl")


def test_only_response_tokens_are_scored(tiny):
    model, tok = tiny.model, tiny.tokenizer
    enc = encode_records(tok, read_preference_data_rows(PAIRS[1:2]))
    prompt = list(enc[0].prompt_ids)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")  # chat template with the generation prompt
    assert enc[0].response_ids[0][-1] == tok.eos_token_id  # EOS ends (and is part of) the response
    responses = [list(y) for y in enc[0].response_ids]
    sums, counts = response_logprobs(model, [prompt, prompt], responses)
    assert counts.tolist() == [len(y) for y in responses]
    for y, s in zip(responses, sums):
        ids = torch.tensor([prompt + y])
        logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
        manual = sum(float(logp[len(prompt) - 1 + j, t].detach()) for j, t in enumerate(y))
        assert abs(manual - float(s)) < 1e-4
    # batched with other lengths = alone (right padding never reaches the scored positions)
    alone = response_logprobs(model, [prompt], [responses[1]])[0]
    torch.testing.assert_close(alone[0], sums[1], atol=1e-5, rtol=0)


def read_preference_data_rows(rows):
    return [record_from_dict(r) for r in rows]


def test_reference_cache_is_keyed_by_data_and_weights(tiny, tmp_path):
    enc = encode_records(tiny.tokenizer, read_preference_data_rows(PAIRS))
    ref = frozen_copy(tiny.model)
    first = reference_logprobs(ref, enc, tmp_path)
    files = list(tmp_path.glob("ref_logprobs-*.safetensors"))
    assert len(files) == 1 and first.sum_logp.shape == (6,) and first.sum_logp.dtype == torch.float64
    again = reference_logprobs(ref, enc, tmp_path)
    assert again.key == first.key and torch.equal(again.sum_logp, first.sum_logp)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    reference_logprobs(ref, enc[:2], tmp_path)  # other data: another file
    with torch.no_grad():
        ref.model.norm.weight.mul_(1.5)
    changed = reference_logprobs(ref, enc, tmp_path)  # other weights: another key, new values
    assert changed.key != first.key and not torch.equal(changed.sum_logp, first.sum_logp)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def _old_cache_name(model, enc) -> str:
    """The file name an earlier version gave the reference cache (its key hashed the whole config, extra included)."""
    import hashlib

    from puzzle.preference import _flat

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    key = hashlib.sha256(h.hexdigest().encode())
    key.update(json.dumps(list(_flat(enc))).encode())
    return f"ref_logprobs-{key.hexdigest()[:32]}.safetensors"


def test_the_same_weights_from_a_moved_folder_reuse_the_reference_cache(tiny, tmp_path, monkeypatch):
    """Breaker: the cache key hashed config.extra, where loading stores the path: a moved model missed its cache."""
    import copy
    import dataclasses
    import shutil

    from puzzle import preference

    enc = encode_records(tiny.tokenizer, read_preference_data_rows(PAIRS))
    first = reference_logprobs(tiny.model, enc, tmp_path / "a")
    moved = copy.deepcopy(tiny.model)
    moved.config = dataclasses.replace(moved.config, extra={**moved.config.extra, "path": "/somewhere/else"})

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed reference log-probs that are cached")

    monkeypatch.setattr(preference, "batched_logprobs", no_compute)
    again = reference_logprobs(moved, enc, tmp_path / "a")
    assert again.key == first.key and torch.equal(again.sum_logp, first.sum_logp)
    # a file an earlier version wrote is still read (and saved under the current key)
    (tmp_path / "old").mkdir()
    shutil.copy(next((tmp_path / "a").glob("*.safetensors")), tmp_path / "old" / _old_cache_name(tiny.model, enc))
    old = reference_logprobs(tiny.model, enc, tmp_path / "old")
    assert old.key == first.key and torch.equal(old.sum_logp, first.sum_logp)
    assert (tmp_path / "old" / f"ref_logprobs-{first.key}.safetensors").is_file()


def test_reference_log_probs_of_other_records_are_refused(tiny):
    """Breaker: precomputed log-probs were matched by count only; other records of the same size trained silently."""
    enc = encode_records(tiny.tokenizer, read_preference_data_rows(PAIRS))
    other = encode_records(tiny.tokenizer, read_preference_data_rows(PAIRS[::-1]))  # as many responses, other order
    ref = reference_logprobs(tiny.model, enc)
    with pytest.raises(PuzzleError, match="reference log-probs were computed for other records"):
        train_offline(tiny.model, other, RPOConfig(loss="dpo", steps=1), ref)
    with pytest.raises(PuzzleError, match="reference log-probs were computed for other records"):
        preference_accuracy(tiny.model, ref, other)
    with pytest.raises(PuzzleError, match="policy log-probs were computed for other records"):
        preference_accuracy(ref, None, other)
    with pytest.raises(PuzzleError, match="cover 6 responses, the data 4"):
        train_offline(tiny.model, enc[:2], RPOConfig(loss="dpo", steps=1), ref)
    assert preference_accuracy(ref, ref, enc)["ties"] == 3  # its own records


def test_best_worst_pairs_of_records_and_of_sampled_groups_agree():
    from puzzle.preference import EncodedRecord, _pair_of, best_worst_pair

    for rewards in ((0.2, 0.9, 0.1, 0.9), (0.5, 0.5, 0.5), (1.0, 0.0)):
        record = record_from_dict({"prompt": "p", "responses": [f"r{i}" for i in range(len(rewards))],
                                   "rewards": list(rewards)})
        group = EncodedRecord((1,), tuple((10 + i,) for i in range(len(rewards))), rewards)
        pair, encoded = best_worst_pair(record), _pair_of(group)
        if len(set(rewards)) == 1:
            assert pair is None and encoded is None
            continue
        assert pair.is_pair and pair.rewards == encoded.rewards == (max(rewards), min(rewards))
        assert [int(r[1:]) for r in pair.responses] == [y[0] - 10 for y in encoded.response_ids]
    assert best_worst_pair(record_from_dict(PAIRS[0])).responses == (" is a model.", " zzz qqq")
    with pytest.raises(PuzzleError, match="needs rewards"):
        best_worst_pair(record_from_dict({"prompt": "p", "chosen": "a", "rejected": "b"}))


def test_pair_losses_on_groups_point_to_what_each_group_lacks_and_flags_by_name():
    """Leftover: groups of 3 without rewards were pointed at best_worst_pair (which needs rewards), and
    --warmup-steps -1 said "warmup_steps and top_k must be >= 0"."""
    from puzzle.preference import EncodedRecord, _check_data

    bare = EncodedRecord((1,), ((2,), (3,), (4,)), None)
    with pytest.raises(PuzzleError, match=r"Give those groups a reward per response") as info:
        _check_data([bare], RPOConfig(loss="dpo"))
    assert "best_worst_pair" not in str(info.value)
    with pytest.raises(PuzzleError, match=r"best and worst responses \(puzzle.preference.best_worst_pair\)"):
        _check_data([EncodedRecord((1,), ((2,), (3,), (4,)), (0.1, 0.5, 0.9))], RPOConfig(loss="dpo"))
    for kwargs, words in [({"warmup_steps": -1}, "--warmup-steps (rpo warmup_steps) must be >= 0, got -1"),
                          ({"top_k": -2}, "rpo top_k must be >= 0, got -2"),
                          ({"batch_size": 0}, "--batch-size (rpo batch_size) must be >= 1, got 0"),
                          ({"max_prompt_tokens": 0}, "rpo max_prompt_tokens must be >= 1, got 0")]:
        with pytest.raises(PuzzleError, match=re.escape(words)):
            RPOConfig(loss="dpo", **kwargs)


def test_empty_message_lists_and_roles_sft_refuses_are_named_with_their_record():
    """Breaker: an offline {"prompt": [], ...} ended in the chat template's ValueError traceback; rpo took a "tool"
    message that sft refuses."""
    for record, words in [({"prompt": [], "chosen": "x", "rejected": "y"}, "the list of messages is empty"),
                          ({"prompt": [{"role": "tool", "content": "x"}], "chosen": "x", "rejected": "y"},
                           "chat messages must be objects with a 'role' in ('system', 'user', 'assistant')")]:
        with pytest.raises(PuzzleError, match=re.escape(f"data.jsonl, line 3, prompt: {words}")):
            record_from_dict(record, "data.jsonl, line 3")


def test_sampling_greedy_matches_generate_and_padding_is_invisible(tiny):
    model, eos = tiny.model, tiny.tokenizer.eos_token_id
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62]]
    batched = sample(model, prompts, 6, temperature=0.0, eos_token_id=eos)
    for p, got in zip(prompts, batched):
        alone = model.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=eos)[0, len(p):].tolist()
        assert got == alone[:len(got)] and (len(got) == 6 or got[-1] == eos)
    a = sample(model, prompts, 5, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(model, prompts, 5, temperature=1.0, generator=torch.Generator().manual_seed(3))
    c = sample(model, prompts, 5, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_offline_dpo_learns_the_preference_with_cache_or_copy(tiny):
    enc = encode_records(tiny.tokenizer, read_preference_data_rows(PAIRS))
    config = RPOConfig(loss="dpo", beta=0.5, steps=8, batch_size=3, lr=3e-3)
    results = {}
    for mode in ("cache", "copy"):
        model = tiny_parent(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64).model
        for p in model.parameters():
            p.requires_grad_(True)
        ref = frozen_copy(model)
        reference = reference_logprobs(ref, enc) if mode == "cache" else ref
        history = train_offline(model, enc, config, reference)
        results[mode] = history
        assert history["loss"].iloc[0] == pytest.approx(0.6931, abs=1e-3)  # log 2 while π = π_ref
        assert history["loss"].iloc[-1] < 0.5 and history["accuracy"].iloc[-1] == 1.0
    torch.testing.assert_close(torch.tensor(results["cache"]["loss"].values), torch.tensor(results["copy"]["loss"].values),
                               atol=1e-4, rtol=0)
    with pytest.raises(PuzzleError, match="needs explicit rewards"):
        train_offline(tiny.model, encode_records(tiny.tokenizer, [record_from_dict({"prompt": "a", "chosen": "b",
                                                                                   "rejected": "c"})]),
                      RPOConfig(loss="rpo-sq"), frozen_copy(tiny.model))


def test_two_response_groups_train_pair_losses_best_first(tiny):
    # a group's order means nothing: [" wrong wrong", " right"] with rewards [0, 1] was trained with " wrong
    # wrong" as the chosen response (DPO's margin +6.7 after 20 steps toward the reward-0 response)
    group = {"prompt": "The parent", "responses": [" zzz qqq", " is a model."], "rewards": [0.0, 1.0]}
    pair = {"prompt": "The parent", "chosen": " is a model.", "rejected": " zzz qqq"}
    enc_group, enc_pair = (encode_records(tiny.tokenizer, [record_from_dict(r)]) for r in (group, pair))
    assert enc_group[0].response_ids == enc_pair[0].response_ids and enc_group[0].is_pair
    assert enc_group[0].rewards == (1.0, 0.0)
    config = RPOConfig(loss="dpo", beta=0.5, steps=4, batch_size=1, lr=3e-3)
    model = tiny_parent(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64).model
    for p in model.parameters():
        p.requires_grad_(True)
    history = train_offline(model, enc_group, config, frozen_copy(model))
    assert history["margin"].iloc[-1] > 0  # toward the reward-1 response
    ref = frozen_copy(model)
    assert preference_accuracy(ref, ref, enc_group)["pairs"] == 1
    for tied in ({**group, "rewards": [0.5, 0.5]}, {k: v for k, v in group.items() if k != "rewards"}):
        enc = encode_records(tiny.tokenizer, [record_from_dict(tied)])
        with pytest.raises(PuzzleError, match="record 0 .* is a group of 2 responses without rewards, or with equal"):
            train_offline(model, enc, config, frozen_copy(model))
        with pytest.raises(PuzzleError, match="needs pairs"):
            preference_accuracy(ref, ref, enc)
    # losses on rewards take a tied group among others (its target margin is 0); tied groups alone learn nothing
    enc = encode_records(tiny.tokenizer, [record_from_dict({**group, "rewards": [0.5, 0.5]}), record_from_dict(group)])
    train_offline(model, enc, RPOConfig(loss="rpo-sq", steps=1, batch_size=1), frozen_copy(model))
    with pytest.raises(PuzzleError, match="every response has the same reward"):
        train_offline(model, enc[:1], RPOConfig(loss="rpo-sq", steps=1, batch_size=1), frozen_copy(model))


@pytest.mark.parametrize("loss", ["dpo", "simpo", "rloo", "rpo-multi"])
def test_a_step_past_the_token_chunk_takes_the_one_pass_gradient(loss, monkeypatch):
    """Leftover: a step's forward with gradients took all k responses at once (--k 64 on SmolLM2 peaked at 7.7 GB,
    growing with k). Past `grad_chunk_tokens` it runs in pieces: the same gradient, a piece's activations at a time."""
    from puzzle import preference
    from puzzle.preference import EncodedRecord, _optimizer, _train_step, token_chunks

    gen = torch.Generator().manual_seed(0)
    ids = lambda n: tuple(torch.randint(1, 200, (n,), generator=gen).tolist())  # noqa: E731
    K = 2 if loss in ("dpo", "simpo") else 5
    batch = [EncodedRecord(ids(4 + g), tuple(ids(3 + (g + j) % 4) for j in range(K)),
                           tuple(float(j == g % K) + 0.1 * j for j in range(K)), is_pair=K == 2) for g in range(3)]
    uses_ref = preference.needs_reference(loss, 0)
    ref_sum = torch.randn(3 * K, generator=gen, dtype=torch.float64) - 20 if uses_ref else None
    grads = []
    for budget in (10_000, 12):  # one pass; pieces of at most 12 padded tokens
        monkeypatch.setattr(preference, "grad_chunk_tokens", lambda model, budget=budget: budget)
        model = tiny_parent(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64).model
        for p in model.parameters():
            p.requires_grad_(True)
        config = RPOConfig(loss=loss, steps=1, batch_size=3)
        params, opt, sched = _optimizer(model, config)
        metrics = _train_step(model, batch, config, ref_sum, params, opt, sched)
        grads.append((metrics, [p.grad.clone() for p in params]))  # the gradient of the step, before clipping
    (one, g1), (chunked, g2) = grads
    assert len(token_chunks(*preference._flat(batch), budget=12)) >= 4
    assert one["loss"] == pytest.approx(chunked["loss"], rel=1e-5) and one["grad_norm"] > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert [len(range(*c.indices(4))) for c in token_chunks([(1,)] * 4, [(2, 3)] * 4, budget=7)] == [2, 2]
    assert token_chunks([(1,) * 9], [(2,)], budget=4) == [slice(0, 1)]  # a pair longer than the budget: alone
    monkeypatch.undo()  # the budget on a CPU: GRAD_CHUNK_BYTES over L (10 C + 3 F) + 3 V fp32 values per token
    per_token = 2 * (10 * 32 + 3 * 64) * 4 + 3 * model.config.vocab_size * 4
    assert preference.activation_bytes_per_token(model) == per_token
    assert preference.grad_chunk_tokens(model) == 2 * 2**30 // per_token


def test_online_rloo_and_rpo_with_adapters(tiny):
    model = tiny_parent(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64).model
    handle = apply_adapters(model, AdapterConfig(spec="vBuA", rank=4))
    task = TASKS["repeat"]
    prompts = task.prompts(4, seed=0)
    for loss in ("rloo", "rpo-bwd-kl", "rpo-multi"):
        config = RPOConfig(loss=loss, steps=2, batch_size=2, k=3, max_new_tokens=6, lr=1e-2)
        history = train_online(model, tiny.tokenizer, prompts, task, config,
                               reference=None if loss == "rloo" else frozen_copy(model))
        assert list(history["step"]) == [1, 2] and history["reward_mean"].between(0, 1).all()
    assert handle.num_trainable() > 0
    with pytest.raises(PuzzleError, match="reference model"):
        train_online(model, tiny.tokenizer, prompts, task, RPOConfig(loss="dpo", steps=1), None)
    # RLOO's estimator is on-policy: sampling at another temperature or from the top k biased it (review)
    for off_policy in ({"temperature": 0.5}, {"top_k": 5}):
        with pytest.raises(PuzzleError, match="rloo samples the policy itself"):
            RPOConfig(loss="rloo", **off_policy)
    RPOConfig(loss="rpo-multi", temperature=0.5)


def test_online_limits_said_before_they_cost_memory(tiny, monkeypatch):
    """Breaker: --k 100000 sampled every response in one batch (24 GB, killed); --max-new-tokens 100000 cached past the
    model's positions; a 12k-token prompt lost its instruction without a word; warmup past the steps trained at 1e-8."""
    from puzzle import preference

    with pytest.raises(PuzzleError, match=r"--k \(rpo k\) must be from 2 to 1024"):
        RPOConfig(loss="rloo", k=100_000)
    with pytest.warns(UserWarning, match=r"--warmup-steps \(rpo warmup_steps\) 1000 is more than --steps \(rpo "
                                         r"steps\) 2, so the learning rate rises only to 0% of --lr"):
        RPOConfig(loss="dpo", steps=2, warmup_steps=1000)
    positions = tiny.model.config.max_position_embeddings
    with pytest.raises(PuzzleError, match=rf"pass the {positions} positions .*-tokens\) {positions - 3} or less"):
        sample(tiny.model, [[1, 2, 3]], positions)
    rows = []  # responses are sampled SAMPLE_CHUNK rows at a time
    real = preference.sample
    monkeypatch.setattr(preference, "sample", lambda model, prompts, *a: rows.append(len(prompts)) or real(
        model, prompts, *a))
    monkeypatch.setattr(preference, "SAMPLE_CHUNK", 4)
    task = TASKS["repeat"]
    (turn,) = task.prompts(1, seed=0)[0]
    long_prompt = ({**turn, "content": turn["content"] + " filler" * 600},)  # past max_prompt_tokens (512)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 512 tokens keep their last 512"):
        train_online(tiny.model, tiny.tokenizer, [long_prompt, *task.prompts(1, seed=1)], task,
                     RPOConfig(loss="rpo-multi", steps=1, batch_size=2, k=5, max_new_tokens=2), frozen_copy(tiny.model))
    assert rows == [4, 4, 2]


def test_preference_data_that_is_no_regular_file_is_named_so():
    from puzzle.preference import read_preference_data

    with pytest.raises(PuzzleError, match="/dev/null is not a regular file"):  # breaker: it "did not exist"
        read_preference_data("/dev/null")


def test_cli_empty_adapter_spec_is_refused(tmp_path):
    """Breaker: `--adapters ''` ran full fine-tuning and recorded no adapters."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = _rpo_args("--out", str(tmp_path / "o"), "--data", str(data), "--loss", "dpo", "--adapters", "")
    with pytest.raises(PuzzleError, match="--adapters is empty"):
        args.func(args)


def test_rewards_are_graded_and_verifiable(tiny):
    count, repeat, reverse = TASKS["count"], TASKS["repeat"], TASKS["reverse"]
    p = [{"role": "user", "content": "Count from 3 to 7. Write only the numbers, separated by commas."}]
    assert count.score(p, "3, 4, 5, 6, 7") == 1.0
    assert count.score(p, "3, 4, 5") == pytest.approx(3 / 5)
    assert count.score(p, "3, 4, 5, 6, 7, 8, 9, 10") == pytest.approx(5 / 8)
    assert count.score(p, "none") == 0.0
    assert repeat.score("Repeat these words exactly, in the same order: cat dog sun", "Cat, dog, sun!") == 1.0
    assert 0 < repeat.score("Repeat these words exactly, in the same order: cat dog sun", "cat sun") < 1
    assert reverse.score("Write these words in reverse order: cat dog sun", "sun dog cat") == 1.0
    assert positional_score([1, 2], [2, 1]) == 0.0 and sequence_ratio(["a"], ["a"]) == 1.0
    assert count.prompts(3, seed=1) == count.prompts(3, seed=1) != count.prompts(3, seed=2)
    with pytest.raises(PuzzleError):
        count.score("Say hi", "hi")
    judge = LikelihoodJudge(tiny.model, tiny.tokenizer)
    scores = judge(["The parent", "The parent"], [" is a model.", " zzz"])
    assert len(scores) == 2 and all(s < 0 for s in scores) and scores[0] != scores[1]


def test_a_judge_reads_responses_with_its_own_tokenizer(tiny, monkeypatch):
    import dataclasses

    import puzzle.preference as preference

    judge = preference._judge("tiny", None, "raw")  # the policy's tokenizer is not needed
    assert judge.tokenizer is not None  # the judge's own (the policy's was used whatever the judge's vocabulary)
    small = len(tiny.tokenizer) - 1  # a judge without a tokenizer, of a smaller vocabulary than the policy's
    bare = dataclasses.replace(tiny_parent(), tokenizer=None)
    bare.model.config = dataclasses.replace(bare.model.config, vocab_size=small)  # what the check reads
    monkeypatch.setattr(preference, "_load_model", lambda path: bare)
    with pytest.raises(PuzzleError, match=f"no tokenizer and a vocabulary of {small} tokens"):
        preference._judge("bare", tiny.tokenizer, "raw")


def test_evaluation_helpers(tiny):
    enc = encode_records(tiny.tokenizer, read_preference_data_rows(PAIRS))
    acc = preference_accuracy(tiny.model, frozen_copy(tiny.model), enc)
    assert acc["implicit_accuracy"] == 0.5 and acc["ties"] == 3 and acc["pairs"] == 3  # π = π_ref: all ties
    assert 0 <= acc["likelihood_accuracy"] <= 1
    s = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["ci_low"] < 2.5 < s["ci_high"] and s["se"] == pytest.approx(0.6455, abs=1e-4)
    df = evaluate_rewards(tiny.model, tiny.tokenizer, TASKS["count"].prompts(3), TASKS["count"], max_new_tokens=4)
    assert list(df.columns) == ["prompt_index", "sample", "reward", "response"] and len(df) == 3


def test_cli_offline_run_writes_the_model_and_history(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    parser = argparse.ArgumentParser()
    add_rpo_parser(parser.add_subparsers())
    first = ["rpo", "--model", "tiny", "--out", str(tmp_path / "run"), "--data", str(data), "--loss", "rpo-bwd-kl",
             "--steps", "2", "--batch-size", "2", "--adapters", "vBuA", "--rank", "2", "--aggregate", "mean",
             "--no-progress"]
    args = parser.parse_args(first)
    assert args.func(args) == 0
    # breaker: it ended with the files it wrote and no figure of the training
    assert re.search(r"rpo rpo-bwd-kl: loss \d\.\d{4} -> \d\.\d{4} over 2 steps; margin -?\d\.\d{3} -> -?\d\.\d{3}; "
                     r"accuracy \d+% -> \d+% \(first and last step that took a loss\)\n", capsys.readouterr().err)
    args = parser.parse_args(first)  # the same training again (fresh user: refused, "--adapters differ")
    made = (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns
    assert args.func(args) == 0  # and not trained again (a breaker: it trained every step again)
    assert "finished by an earlier call" in capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns == made
    out = json.loads((tmp_path / "run" / "rpo.json").read_text())
    assert out["config"]["loss"] == "rpo-bwd-kl" and out["config"]["logprobs"] == "mean over response tokens"
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "adapters.safetensors").is_file() and len(list((tmp_path / "run" / "ref_cache").iterdir())) == 1
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 3
    args = parser.parse_args(["rpo", "--model", "tiny", "--out", str(tmp_path / "x"), "--no-progress"])
    with pytest.raises(PuzzleError, match="exactly one of"):
        args.func(args)
    again = ["rpo", "--model", "tiny", "--out", str(tmp_path / "run"), "--data", str(data), "--steps", "1",
             "--batch-size", "2", "--loss", "dpo", "--no-progress"]
    args = parser.parse_args(again)  # breaker: another training silently replaced the finished one
    weights = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(PuzzleError, match=r"holds a finished rpo training .*\(--adapters, --aggregate, --loss, --steps "
                                          r"differ\)"):
        args.func(args)
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == weights
    record = json.loads((tmp_path / "run" / "rpo.json").read_text())
    del record["training"]  # as an earlier version wrote it: replaced, as it was then
    (tmp_path / "run" / "rpo.json").write_text(json.dumps(record))
    assert args.func(args) == 0 and not (tmp_path / "run" / "adapters.safetensors").exists()  # full fine-tuning now
    assert json.loads((tmp_path / "run" / "rpo.json").read_text())["config"]["loss"] == "dpo"
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["puzzle"]["loss"] == "dpo"
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    args = parser.parse_args([*again[:6], str(copy), *again[7:], "--reference", "cache", "--beta", "0.1"])
    assert args.func(args) == 0  # the same training: the data by its contents, flags given at their defaults
    write_jsonl(copy, PAIRS[::-1])
    with pytest.raises(PuzzleError, match=re.escape("(--data (contents) differ)")):
        args.func(args)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "history.csv").write_text("my notes")
    refusals = [(["--out", str(mine)], "no `puzzle rpo` wrote"), (["--beta", "nan"], "beta=nan"),
                (["--lr", "inf"], "lr=inf"), (["--k", "3"], "--k set the online sampling"),
                (["--rank", "4"], "add --adapters"), (["--adapters", "vbua"], "not one of"),
                (["--reward", "count"], "--reward set the online sampling"), (["--kl-coef", "0.5"], "RLOO's KL")]
    for extra, words in refusals:
        args = parser.parse_args(again + extra)
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)
    assert (mine / "history.csv").read_text() == "my notes"
    interrupted = tmp_path / "interrupted"
    (interrupted / "ref_cache").mkdir(parents=True)  # what a run stopped before its end leaves: rerun it there
    stale = interrupted / "ref_cache" / f"ref_logprobs-{'0' * 16}-{'1' * 16}.safetensors"  # of other data
    stale.write_bytes(b"{}")
    args = parser.parse_args(["rpo", "--model", "tiny", "--out", str(interrupted), "--data", str(data), "--steps", "1",
                              "--batch-size", "2", "--no-progress"])
    capsys.readouterr()
    assert args.func(args) == 0 and (interrupted / "rpo.json").is_file()
    assert not stale.exists() and len(list((interrupted / "ref_cache").iterdir())) == 1  # leftover: kept for good
    assert "removed 1 reference log-prob file(s) of other data or weights" in capsys.readouterr().err
    for extra, words in [(["--num-prompts", "0"], "--num-prompts must be >= 1"),  # used to spin forever
                         (["--reward", "count"], "a --task brings its own reward"),
                         (["--reference", "copy"], "online runs use a frozen copy")]:
        args = parser.parse_args(["rpo", "--model", "tiny", "--out", str(tmp_path / "online"), "--task", "count",
                                  "--steps", "1", "--no-progress", *extra])
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)


def _rpo_args(*argv):
    parser = argparse.ArgumentParser()
    add_rpo_parser(parser.add_subparsers())
    return parser.parse_args(["rpo", "--model", "tiny", "--no-progress", *argv])


def test_cli_cached_reference_needs_no_copy_of_the_model(tmp_path, monkeypatch):
    """Breaker: `puzzle rpo --data` kept a frozen copy of the model for the whole training even when π_ref came from
    the log-prob cache (and made it, hashing every weight, when the cache was already there)."""
    from puzzle import preference

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = ["--data", str(data), "--loss", "dpo", "--steps", "2", "--batch-size", "2"]
    args = _rpo_args("--out", str(tmp_path / "copy"), *common, "--reference", "copy")
    assert args.func(args) == 0

    def no_copy(model):
        raise AssertionError("frozen_copy called for a cached reference")

    monkeypatch.setattr(preference, "frozen_copy", no_copy)
    for _ in range(2):  # computes the cache, then reads it
        args = _rpo_args("--out", str(tmp_path / "cache"), *common)
        assert args.func(args) == 0
    monkeypatch.undo()
    (cached,) = (tmp_path / "cache" / "ref_cache").iterdir()
    enc = encode_records(tiny_parent().tokenizer, read_preference_data_rows(PAIRS))
    from safetensors.torch import load_file

    with_copy = reference_logprobs(frozen_copy(tiny_parent().model), enc)
    assert torch.equal(load_file(str(cached))["sum_logp"], with_copy.sum_logp)  # the same π_ref values
    losses = {mode: [float(x.split(",")[1]) for x in (tmp_path / mode / "history.csv").read_text().splitlines()[1:]]
              for mode in ("copy", "cache")}
    assert losses["cache"] == pytest.approx(losses["copy"], abs=1e-5)


def test_cli_online_run_whose_last_rewards_all_tie_writes_valid_json(tmp_path, monkeypatch):
    """Breaker: every reward of the last step tied, so its loss was NaN and rpo.json held a bare NaN token."""
    from puzzle.rewards import SyntheticTask

    monkeypatch.setattr(SyntheticTask, "score", lambda self, prompt, response: 0.5)
    args = _rpo_args("--out", str(tmp_path / "r"), "--task", "count", "--num-prompts", "2", "--loss", "simpo",
                     "--steps", "1", "--batch-size", "2", "--k", "2", "--max-new-tokens", "2")
    assert args.func(args) == 0

    def strict(token):
        raise ValueError(f"not JSON: {token}")

    out = json.loads((tmp_path / "r" / "rpo.json").read_text(), parse_constant=strict)
    assert out["summary"]["final_loss"] is None


def test_a_stalled_gradient_and_a_warmup_past_the_last_step_are_said(tmp_path, capsys, monkeypatch):
    """Breaker: `--lr 1e6` ended at ln(vocab) with a zero gradient and exported the model as trained (now refused
    above 1; a zero gradient on the last steps is said at any rate); `--steps 3 --warmup-steps 100` trained at 3 % of
    --lr without a word."""
    import pandas as pd

    from puzzle.preference import RPOConfig, training_summary
    from puzzle.train_utils import stalled_gradient_note

    history = [{"step": i, "loss": 5.7, "grad_norm": 0.0 if i > 1 else 3.0} for i in range(1, 9)]
    assert stalled_gradient_note(history, "sft").startswith("sft: warning: the gradient was 0 on the last 2 of 8 steps")
    assert stalled_gradient_note(history[:1], "sft") is None  # one step tells nothing
    assert stalled_gradient_note([*history, {"grad_norm": 1e-9}], "sft") is None
    assert stalled_gradient_note([{"loss": 1.0}, {"loss": 0.5}], "rpo") is None  # no norms recorded
    online = pd.DataFrame({"loss": [float("nan"), 0.7, 0.5], "reward_mean": [0.1, 0.2, 0.4]})
    assert training_summary(RPOConfig(loss="rloo"), online) == \
        "rpo rloo: loss 0.7000 -> 0.5000 over 3 steps; sampled reward 0.200 -> 0.400 (first and last step that " \
        "took a loss)"  # the rows of one step: the first step took no loss (its rewards all tied)
    assert training_summary(RPOConfig(loss="rloo"), online.assign(loss=float("nan"))) == \
        "rpo rloo: no step took a loss (3 steps)"
    with pytest.raises(PuzzleError, match=r"rpo: --lr 1000000.0 is not a learning rate in \(0, 1\)"):
        RPOConfig(lr=1e6)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = _rpo_args("--out", str(tmp_path / "r"), "--data", str(data), "--loss", "dpo", "--steps", "3",
                     "--warmup-steps", "100", "--batch-size", "2")
    with pytest.warns(UserWarning) as said:  # once (the command said it a second time, in other words)
        assert args.func(args) == 0
    assert [str(w.message) for w in said if "warmup" in str(w.message)] == [
        "--warmup-steps (rpo warmup_steps) 100 is more than --steps (rpo steps) 3, so the learning rate rises only to "
        "3% of --lr; give --warmup-steps 3 or fewer, or more --steps"]
    assert "warmup" not in capsys.readouterr().err
    from puzzle.rewards import SyntheticTask  # RLOO on rewards that all tie: a zero gradient by design, no stall

    monkeypatch.setattr(SyntheticTask, "score", lambda self, prompt, response: 0.5)
    args = _rpo_args("--out", str(tmp_path / "o"), "--task", "count", "--num-prompts", "2", "--loss", "rloo",
                     "--steps", "4", "--batch-size", "2", "--k", "2", "--max-new-tokens", "2")
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "got the same reward, so there was nothing to prefer" in err and "the gradient was 0" not in err


def test_hhh_alignment_reader_takes_subtask_examples_and_skips_the_parent_task(tmp_path):
    """The sdist's layout: hhh_alignment/task.json lists subtasks only (no "examples"); each subtask holds
    examples with 1/0 target_scores. Only one-chosen/one-rejected examples become pairs, without rewards."""
    import io
    import tarfile

    from puzzle.preference import hhh_alignment_records

    root = "bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment"
    files = {f"{root}/task.json": {"name": "hhh_alignment", "subtasks": ["harmless"]},
             f"{root}/harmless/task.json": {"examples": [
                 {"input": " Can you help? ", "target_scores": {" Yes, gladly.": 1, "No.": 0}},
                 {"input": "Three replies", "target_scores": {"a": 1, "b": 0, "c": 0}}]},
             "bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json": {"examples": [
                 {"input": "x", "target_scores": {"y": 1, "z": 0}}]}}
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in files.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    records = hhh_alignment_records(path)
    assert len(records) == 1
    assert records[0].prompt == ({"role": "user", "content": "Can you help?"},)
    assert records[0].responses == ("Yes, gladly.", "No.") and records[0].rewards is None
    with pytest.raises(PuzzleError, match="does not exist"):
        hhh_alignment_records(tmp_path / "missing.tar.gz")


def test_an_interrupted_rpo_says_a_rerun_starts_over(tmp_path, monkeypatch, capsys):
    """Breaker: Ctrl-C in `puzzle rpo` said "finished work is saved, rerun the same command to resume", before any
    step was saved."""
    from puzzle import preference
    from puzzle.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(preference, "_rpo", interrupted)
    assert main(["rpo", "--model", "tiny", "--out", str(tmp_path / "r"), "--task", "count", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "no training step was saved, so a rerun trains from the start" in err and "resume" not in err, err


@pytest.mark.parametrize("source", ["offline", "online"])
def test_an_interrupted_rpo_resumes_from_its_last_finished_step(tmp_path, monkeypatch, capsys, source):
    """Breaker: an interrupted `puzzle rpo` kept no checkpoint, and its rerun trained every step again. Ctrl-C in
    step 3 of 4 saves step 2; the rerun resumes there and ends with the weights and history of a training that was
    never interrupted; a rerun of other settings is refused while the checkpoint stands."""
    from puzzle import preference
    from puzzle.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    given = ["--data", str(data), "--loss", "dpo"] if source == "offline" else \
        ["--task", "count", "--num-prompts", "4", "--k", "2", "--max-new-tokens", "3", "--loss", "rloo"]

    def argv(out, *extra):
        return ["rpo", "--model", "tiny", "--out", str(tmp_path / out), *given, "--steps", "4", "--batch-size", "2",
                "--no-progress", *extra]

    assert main(argv("whole")) == 0
    step = preference._train_step
    calls = []

    def interrupted_in_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kw)

    monkeypatch.setattr(preference, "_train_step", interrupted_in_the_third)
    capsys.readouterr()
    assert main(argv("cut")) == 130
    err = capsys.readouterr().err
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    assert f"rpo saved its training at step 2 of 4 in {checkpoint}; the same command resumes from it" in err, err
    monkeypatch.undo()
    left = tmp_path / "cut" / ".checkpoint.pt.k1ll3d00.tmp"  # a checkpoint write killed (breaker: refused for good)
    left.write_bytes(b"half a checkpoint")
    cache = {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file() and "ref_cache" in p.parts}
    assert main(argv("cut", "--lr", "1e-4")) == 2  # another training's checkpoint: refused before any work, kept
    err = capsys.readouterr().err
    assert f"{checkpoint} is the checkpoint of another rpo training (--lr differ)" in err and "resuming" not in err
    assert checkpoint.is_file() and not left.exists()
    assert {p: p.read_bytes() for p in cache} == cache  # (breaker: the refused rerun replaced them first)
    assert main(argv("cut")) == 0
    assert "resuming the interrupted training" in capsys.readouterr().err and not checkpoint.exists()
    whole, cut = (pd.read_csv(tmp_path / d / "history.csv") for d in ("whole", "cut"))
    assert list(cut["step"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(cut.drop(columns="seconds"), whole.drop(columns="seconds"))
    assert (tmp_path / "cut" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()


def test_a_folder_given_as_data_is_called_a_folder(tmp_path):
    """Breaker: `--data DIR` (rpo and sft) said the existing folder "does not exist"."""
    from puzzle.sft import read_chat_jsonl

    with pytest.raises(PuzzleError, match="preference data .* is a folder, not a file"):
        read_preference_data(tmp_path)
    with pytest.raises(PuzzleError, match="chat data .* is a folder, not a file"):
        read_chat_jsonl(str(tmp_path))


def test_an_online_run_whose_rewards_all_tie_says_it_learned_nothing(tmp_path, capsys):
    """Reviewer: online rpo on a task the model never gets right ran every step with groups=0, exported the
    unchanged model and said nothing."""
    parser = argparse.ArgumentParser()
    add_rpo_parser(parser.add_subparsers())
    args = parser.parse_args(["rpo", "--model", "tiny", "--out", str(tmp_path / "run"), "--task", "count", "--steps", "2",
                              "--batch-size", "2", "--k", "2", "--max-new-tokens", "2", "--num-prompts", "4",
                              "--no-progress"])
    assert args.func(args) == 0
    import pandas as pd

    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert (history["groups_with_signal"] == 0).all() and (history["reward_std"] == 0).all()
    assert "nothing to prefer and the model learned nothing" in capsys.readouterr().err


def test_pairs_that_prefer_nothing_and_settings_that_learn_nothing_are_refused(tmp_path, capsys):
    """Breaker: pairs whose chosen and rejected were the same text, and --beta 1e30, trained at loss ln 2 and margin 0
    and reported success; --temperature nan was refused for greedy decoding's reason."""
    parser = argparse.ArgumentParser()
    add_rpo_parser(parser.add_subparsers())
    same = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 4
    write_jsonl(tmp_path / "same.jsonl", same)
    write_jsonl(tmp_path / "some.jsonl", same + [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    base = ["rpo", "--model", "tiny", "--loss", "dpo", "--steps", "1", "--batch-size", "2", "--no-progress"]
    for extra, words in [(["--data", str(tmp_path / "same.jsonl")], "in all 4 records the responses are the same text"),
                         (["--data", str(tmp_path / "some.jsonl"), "--beta", "1e30"], "--beta 1e+30 is above 1000"),
                         (["--data", str(tmp_path / "some.jsonl"), "--adapters", "BA", "--rank", "100000"],
                          "adapter rank 100000 is above")]:
        args = parser.parse_args([*base, *extra, "--out", str(tmp_path / "out")])
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)
        assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="4 of 5 records have responses that are the same text"):
        args = parser.parse_args([*base, "--data", str(tmp_path / "some.jsonl"), "--out", str(tmp_path / "out")])
        assert args.func(args) == 0
    with pytest.raises(PuzzleError, match=r"must be a finite number > 0, got nan$"):
        RPOConfig(loss="rloo", temperature=float("nan"))


def test_online_review_findings_held_out_prompts_interrupted_folder_empty_prompts_flags(tmp_path, monkeypatch, capsys):
    """Reviewer: --eval-prompts drew 19 of 32 count prompts from the training ones (the task has 150); a folder an
    online run left while writing model/ (history.csv, model/) was "files no `puzzle rpo` wrote", and its Ctrl-C note
    named a reference cache online runs never make; blank prompts trained; --temperature 0 named no flag."""
    from puzzle import preference
    from puzzle.cli import main
    from puzzle.rewards import get_task, prompt_text

    count = get_task("count")
    train = count.prompts(128, seed=0)
    held = count.held_out_prompts(32, 10_000, train)
    texts = [prompt_text(q) for q in held]
    assert len(set(texts)) == 32 and not set(texts) & {prompt_text(q) for q in train}
    assert held == count.held_out_prompts(32, 10_000, train)  # deterministic
    with pytest.raises(PuzzleError, match=r"--eval-prompts 100: the count task has only \d+ prompts beside"):
        count.held_out_prompts(100, 10_000, train)
    args = _rpo_args("--out", str(tmp_path / "many"), "--task", "count", "--eval-prompts", "100", "--steps", "1")
    monkeypatch.setattr(preference, "_load_model", lambda path: pytest.fail("loaded the model first"))
    with pytest.raises(PuzzleError, match="lower --eval-prompts or --num-prompts"):
        args.func(args)
    monkeypatch.undo()

    left = tmp_path / "left"  # what an online run stopped while writing its model leaves
    (left / "model").mkdir(parents=True)
    (left / "history.csv").write_text("step,reward_mean,reward_std,loss\n")
    (left / ".model.ab12cd34.tmp").mkdir()  # code review: an export of model/ killed mid-write leaves this too
    args = _rpo_args("--out", str(left), "--task", "count", "--num-prompts", "2", "--steps", "1", "--batch-size", "2",
                     "--k", "2", "--max-new-tokens", "2")
    assert args.func(args) == 0 and (left / "rpo.json").is_file()
    mine = tmp_path / "mine"  # a user's model folder alone is still not taken for an rpo output
    (mine / "model").mkdir(parents=True)
    args = _rpo_args("--out", str(mine), "--task", "count", "--steps", "1")
    with pytest.raises(PuzzleError, match="holds files no `puzzle rpo` wrote"):
        args.func(args)

    monkeypatch.setattr(preference, "_rpo", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    capsys.readouterr()
    assert main(["rpo", "--model", "tiny", "--out", str(tmp_path / "r"), "--task", "count", "--no-progress"]) == 130
    assert "ref_cache" not in capsys.readouterr().err
    monkeypatch.undo()

    for i, record in enumerate(({"prompt": "   "}, {"messages": [{"role": "user", "content": " "}]})):
        path = tmp_path / f"p{i}.jsonl"
        path.write_text(json.dumps({"prompt": "Count from 1 to 4."}) + "\n" + json.dumps(record) + "\n")
        for mode in ("raw", "chat"):
            args = _rpo_args("--out", str(tmp_path / f"e{i}{mode}"), "--prompts", str(path), "--reward", "count",
                             "--string-prompts", mode, "--steps", "1")
            monkeypatch.setattr(preference, "_load_model", lambda path: pytest.fail("loaded the model first"))
            with pytest.raises(PuzzleError, match=rf"p{i}.jsonl, line 2: the prompt is empty"):
                args.func(args)
            monkeypatch.undo()
    path = tmp_path / "mixed.jsonl"  # a prompt the reward cannot grade (breaker: it stopped training when sampled)
    path.write_text(json.dumps({"prompt": "Count from 1 to 4."}) + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    for reward, words in (("count", "like 'Count from "), ("reverse", "like 'Write these words in reverse order: ")):
        args = _rpo_args("--out", str(tmp_path / "mixed"), "--prompts", str(path), "--reward", reward, "--steps", "1")
        monkeypatch.setattr(preference, "_load_model", lambda path: pytest.fail("loaded the model first"))
        line = 2 if reward == "count" else 1
        with pytest.raises(PuzzleError, match=rf"mixed.jsonl, line {line}: --reward {reward} cannot grade this prompt "
                                              rf".*its prompts read .*{re.escape(words)}"):
            args.func(args)
        monkeypatch.undo()
    for flag, value, words in (("--temperature", "0", "--temperature (rpo temperature) must be a finite number > 0, got 0.0"),
                               ("--temperature", "nan", "--temperature (rpo temperature) must be a finite number > 0"),
                               ("--kl-coef", "-1", "--kl-coef (rpo kl_coef) must be a finite number >= 0, got -1.0"),
                               ("--kl-coef", "inf", "--kl-coef (rpo kl_coef) must be a finite number >= 0, got inf"),
                               ("--gamma", "-3", "--gamma (SimPO's target reward margin")):
        extra = {"--kl-coef": ["--loss", "rloo"], "--gamma": ["--loss", "simpo"]}.get(flag, [])
        args = _rpo_args("--out", str(tmp_path / "f"), "--task", "count", flag, value, "--steps", "1", *extra)
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)
    for flag, loss in (("--gamma", "dpo"), ("--gamma", "rpo-sq"), ("--eta", "dpo"), ("--eta", "simpo"),
                       ("--eta", "rloo")):  # a breaker: accepted and ignored
        args = _rpo_args("--out", str(tmp_path / "g"), "--task", "count", flag, "3", "--loss", loss, "--steps", "1")
        with pytest.raises(PuzzleError, match=rf"^{flag} .*; --loss {loss} does not use it"):
            args.func(args)
    assert not (tmp_path / "g").exists()


def test_group_losses_log_no_pair_margin_for_groups_of_two(tmp_path):
    """Reviewer: rloo and rpo-multi with --k 2 logged margin and accuracy as if the first sampled response were the
    chosen one (for rloo without π_ref always 0)."""
    import pandas as pd

    for loss, has in (("rloo", False), ("rpo-multi", False)):
        args = _rpo_args("--out", str(tmp_path / loss), "--task", "count", "--num-prompts", "2", "--loss", loss,
                         "--steps", "1", "--batch-size", "2", "--k", "2", "--max-new-tokens", "2")
        assert args.func(args) == 0
        history = pd.read_csv(tmp_path / loss / "history.csv")
        assert ("margin" in history.columns) == has and ("accuracy" in history.columns) == has, loss


def test_contradicting_tied_or_cut_preferences_and_offline_rloo_are_said(tmp_path):
    """Breaker: a pair whose chosen_reward was below its rejected_reward trained toward chosen under dpo and away
    from it under rpo-bwd-kl; --loss rloo on --data fell without bound; pairs whose rewards tie trained nothing under
    the reward losses and "succeeded"; responses differing past the 256-token cut were called "the same text"; the lr
    column of history.csv was a step ahead; --freeze u for spec BA listed u among the factors."""
    import pandas as pd

    def data(name, *records):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        return str(path)

    pair = {"prompt": "a", "chosen": "b", "rejected": "c"}
    inverted = data("inverted", {**pair, "chosen_reward": 0, "rejected_reward": 1})
    args = _rpo_args("--out", str(tmp_path / "o1"), "--data", inverted, "--steps", "1")
    with pytest.raises(PuzzleError, match="line 1: chosen_reward 0 is below rejected_reward 1, so the pair"):
        args.func(args)
    good = data("good", {**pair, "chosen_reward": 1, "rejected_reward": 0})
    args = _rpo_args("--out", str(tmp_path / "o2"), "--data", good, "--loss", "rloo", "--steps", "1")
    with pytest.raises(PuzzleError, match="--loss rloo is a policy gradient on the policy's own samples"):
        args.func(args)
    tied = data("tied", {**pair, "chosen_reward": 1, "rejected_reward": 1})
    args = _rpo_args("--out", str(tmp_path / "o3"), "--data", tied, "--loss", "rpo-sq", "--steps", "1")
    with pytest.raises(PuzzleError, match="every response has the same reward, so rpo-sq"):
        args.func(args)
    long = data("long", {"prompt": "a", "chosen": "x " * 600 + "A", "rejected": "x " * 600 + "B"})
    args = _rpo_args("--out", str(tmp_path / "o4"), "--data", long, "--loss", "dpo", "--steps", "1")
    with pytest.warns(UserWarning, match=r"^2 response\(s\) longer than 256 tokens keep their first 256$"):
        with pytest.raises(PuzzleError, match="the same text \\(after each response is cut to its first 256 tokens"):
            args.func(args)
    args = _rpo_args("--out", str(tmp_path / "o6"), "--data", good, "--loss", "dpo", "--steps", "1")
    with pytest.raises(PuzzleError, match="--batch-size 4 is more than the 1 records"):  # each step: one record 4x
        args.func(args)
    args = _rpo_args("--out", str(tmp_path / "o7"), "--data", good, "--loss", "simpo", "--reference", "copy")
    with pytest.raises(PuzzleError, match="--loss simpo uses no reference model"):  # a copy never used
        args.func(args)
    args = _rpo_args("--out", str(tmp_path / "o5"), "--data", good, "--loss", "dpo", "--steps", "3",
                     "--warmup-steps", "5", "--lr", "1e-5", "--batch-size", "1")
    assert args.func(args) == 0
    lrs = pd.read_csv(tmp_path / "o5" / "history.csv")["lr"].tolist()
    assert lrs == pytest.approx([2e-6, 4e-6, 6e-6])  # step k trains at lr * k / warmup
    with pytest.raises(PuzzleError, match=r"name factors of spec 'BA' once each \(its factors: B, A\)"):
        AdapterConfig(spec="BA", frozen="u")


def test_a_refused_rerun_names_the_adapter_flag_that_changed(tmp_path):
    """Breaker: adding --untied to a finished adapter training was refused as "--adapters differ"."""
    from puzzle.preference import _check_earlier_training

    record = {"config": {"lr": 1e-4}, "adapters": {"spec": "vBuA", "tied": True, "rank": 8, "frozen": ""}}
    (tmp_path / "rpo.json").write_text(json.dumps({"training": record}))
    for change, flag in (({"tied": False}, "--untied"), ({"rank": 4}, "--rank"), ({"spec": "BA", "rank": 4},
                                                                                    "--adapters, --rank")):
        with pytest.raises(PuzzleError, match=re.escape(f"({flag} differ)")):
            _check_earlier_training(tmp_path, {**record, "adapters": {**record["adapters"], **change}})
    with pytest.raises(PuzzleError, match=re.escape("(--adapters differ)")):  # adapters given or dropped
        _check_earlier_training(tmp_path, {**record, "adapters": None})
