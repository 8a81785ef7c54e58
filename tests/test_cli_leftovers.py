"""Refused commands leave no trace (rpo's --out, a stage command's new --out, a run directory's files under the
stage commands and sft/gkd), `~` in merge and gkd paths, and merge never writes over a model its inputs were
derived from."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from puzzle.distill import add_gkd_parser
from puzzle.errors import PuzzleError
from puzzle.export import export_checkpoint
from puzzle.merge import add_merge_parser
from puzzle.parent import load_parent
from puzzle.preference import add_rpo_parser
from puzzle.sft import add_sft_parser
from puzzle.tiny import tiny_parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    for add in (add_rpo_parser, add_sft_parser, add_gkd_parser, add_merge_parser):
        add(sub)
    return p


def _tiny_run(out):
    """A run directory of the tiny preset with its data split and one searched child (the parent's blocks)."""
    from puzzle.config import load_preset
    from puzzle.pipeline import Run, stage_data

    stage_data(Run(out, load_preset("tiny"), progress=False))
    (out / "search").mkdir()
    blocks = [b.id for b in tiny_parent().config.blocks]
    (out / "search" / "child-x.json").write_text(json.dumps({"choice": blocks}))
    return out


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_rpo_leaves_no_new_out_folder(tmp_path):
    groups = tmp_path / "groups.jsonl"
    groups.write_text(json.dumps({"prompt": "a", "responses": ["b", "c", "d"], "rewards": [1, 0, 0.5]}) + "\n")
    out = tmp_path / "new" / "run"
    base = ["rpo", "--model", "tiny", "--out", str(out), "--steps", "1", "--no-progress"]
    for extra, words in [(["--task", "count", "--adapters", "vbua"], "not one of"),
                         (["--task", "nosuch"], "unknown task"),
                         (["--prompts", str(groups), "--reward", "nosuch"], "unknown task"),
                         (["--data", str(groups), "--loss", "dpo", "--reference", "copy"], "trains on pairs")]:
        args = _parser().parse_args(base + extra)
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)
        assert not (tmp_path / "new").exists(), extra
    (tmp_path / "mine").mkdir()  # an empty folder the user made stays
    args = _parser().parse_args(["rpo", "--model", "tiny", "--out", str(tmp_path / "mine"), "--data", str(groups),
                                 "--loss", "dpo", "--reference", "copy", "--no-progress"])
    with pytest.raises(PuzzleError, match="trains on pairs"):
        args.func(args)
    assert (tmp_path / "mine").is_dir()


def test_a_refused_sft_or_gkd_leaves_the_run_directory_as_it_was(tmp_path):
    run = _tiny_run(tmp_path / "run")
    (run / "timings.json").write_text('{"data_s": 1.0}')
    before = _files(run)
    common = ["--out", str(run), "--no-progress"]
    sft = ["sft", *common, "--data", "demo:reasoning-toggle", "--stop-after-steps", "1"]
    gkd = ["gkd", *common, "--name", "child-x", "--tokens", "256", "--stop-after-steps", "1"]
    for argv, words in [(sft + ["--name", "parent", "--dest", str(run / "search")], "is inside the run"),
                        (sft + ["--name", "child-x", "--work", str(run / "search" / "w")], "inside the input"),
                        (sft + ["--name", "child-x", "--seq-len", "100000"], "longer than the"),
                        (sft + ["--name", "nosuch"], "no architecture named"),
                        (gkd + ["--dest", str(run / "search")], "is inside the run"),
                        (gkd + ["--work", str(run / "search" / "w")], "inside the input")]:
        args = _parser().parse_args(argv)
        with pytest.raises(PuzzleError, match=re.escape(words)):
            args.func(args)
        assert _files(run) == before, argv
    for name in ("timings.json", "parent.json"):  # a run before its parent was loaded: they stay absent
        (run / name).unlink()
    args = _parser().parse_args(sft + ["--name", "parent", "--seq-len", "100000"])
    with pytest.raises(PuzzleError, match="longer than the"):
        args.func(args)
    assert not (run / "timings.json").exists() and not (run / "parent.json").exists()


def test_a_literal_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """merge inputs and --dest, gkd/sft --out given as '~/...' through the command line (`puzzle.cli.main`)."""
    from puzzle.cli import main

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for i in (0, 1):
        lm = tiny_parent(seed=i)
        export_checkpoint(lm.model, lm.tokenizer, home / f"m{i}")
    assert main(["merge", "~/m0", "~/m1", "--dest", "~/merged"]) == 0
    assert (home / "merged" / "config.json").is_file() and not (cwd / "~").exists()
    _tiny_run(home / "run")
    capsys.readouterr()
    for argv in (["gkd", "--out", "~/run", "--name", "nosuch", "--no-progress"],
                 ["sft", "--out", "~/run", "--name", "nosuch", "--data", "demo:reasoning-toggle"]):
        assert main(argv) == 2
        assert f"no architecture named 'nosuch' in {home / 'run' / 'search'}" in capsys.readouterr().err
    assert not (cwd / "~").exists()


def test_merge_does_not_write_over_a_model_its_inputs_were_derived_from(tmp_path):
    lm = tiny_parent()
    export_checkpoint(lm.model, lm.tokenizer, tmp_path / "base")  # e.g. the parent of a run, or a model to fine-tune
    base = load_parent(tmp_path / "base")
    for i in (0, 1):  # two models trained from it (their config.json records it as their source)
        tuned = load_parent(tmp_path / "base").model
        with torch.no_grad():  # weights that differ (a copy of one input is refused)
            next(tuned.parameters()).mul_(1 + i / 10)
        export_checkpoint(tuned, base.tokenizer, tmp_path / f"tuned{i}", extra_info={"sft": {"model": f"base {i}"}})
    export_checkpoint(load_parent(tmp_path / "tuned0").model, base.tokenizer, tmp_path / "again")  # two steps away
    before = _files(tmp_path / "base")
    for inputs in (["tuned0", "tuned1"], ["again", "tuned1"]):
        args = _parser().parse_args(["merge", *(str(tmp_path / i) for i in inputs), "--dest", str(tmp_path / "base")])
        with pytest.raises(PuzzleError, match=re.escape(f"--dest {tmp_path / 'base'} is the model")):
            args.func(args)
        assert _files(tmp_path / "base") == before
    args = _parser().parse_args(["merge", str(tmp_path / "tuned0"), str(tmp_path / "tuned1"), "--dest",
                                 str(tmp_path / "tuned0")])
    with pytest.raises(PuzzleError, match="which the command reads"):  # an input itself: refused already
        args.func(args)
    args = _parser().parse_args(["merge", str(tmp_path / "tuned0"), str(tmp_path / "tuned1"), "--dest",
                                 str(tmp_path / "soup")])
    assert args.func(args) == 0 and (tmp_path / "soup" / "config.json").is_file()
    args = _parser().parse_args(["merge", str(tmp_path / "again"), str(tmp_path / "tuned1"), "--dest",
                                 str(tmp_path / "soup2")])
    assert args.func(args) == 0
    before = _files(tmp_path / "again")  # soup2's first input (a plain export), not the one its "source" names
    args = _parser().parse_args(["merge", str(tmp_path / "soup2"), str(tmp_path / "tuned1"), "--dest",
                                 str(tmp_path / "again")])
    with pytest.raises(PuzzleError, match=re.escape(f"--dest {tmp_path / 'again'} is the model")):
        args.func(args)
    assert _files(tmp_path / "again") == before


def test_merge_ignores_a_relative_record_it_cannot_place(tmp_path, monkeypatch):
    """An export records `source.path` as typed; read from another folder, a relative one names another model."""
    lm = tiny_parent()
    for folder in ("m", "n"):
        (tmp_path / folder).mkdir()
        export_checkpoint(lm.model, lm.tokenizer, tmp_path / folder / "base")
    monkeypatch.chdir(tmp_path / "m")
    child = load_parent("base").model
    with torch.no_grad():  # trained since (a copy of an input is refused)
        next(child.parameters()).mul_(1.1)
    export_checkpoint(child, lm.tokenizer, tmp_path / "m" / "child")  # records 'base'
    monkeypatch.chdir(tmp_path / "n")  # n/base is unrelated to m/child
    args = _parser().parse_args(["merge", "../m/child", "../m/base", "--dest", "base"])
    assert args.func(args) == 0


def test_every_path_flag_expands_a_literal_tilde(tmp_path, monkeypatch, capsys):
    """`puzzle <command> --out '~/x'` (quoted, or from a script) means the home folder for every command."""
    import argparse

    from puzzle.cli import expand_home, main

    monkeypatch.setenv("HOME", str(tmp_path))
    args = argparse.Namespace(out=Path("~/run"), data=[Path("~/a.jsonl"), Path("b")], name="~keep")
    expand_home(args)
    assert args.out == tmp_path / "run" and args.data == [tmp_path / "a.jsonl", Path("b")] and args.name == "~keep"
    assert main(["export", "--out", "~/no-run"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no-run") in err and "~/" not in err
    # a ~user of no user of this machine (breaker: a RuntimeError traceback from every command)
    for argv in (["export", "--out", "~no-such-user-x/run", "--name", "c"],
                 ["merge", "~no-such-user-x/a", str(tmp_path), "--dest", str(tmp_path / "m")]):
        assert main(argv) == 2
        assert "puzzle: error: ~no-such-user-x/" in capsys.readouterr().err


def test_a_preset_path_with_a_literal_tilde(tmp_path, monkeypatch):
    from puzzle.config import load_preset

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.toml").write_text("[data]\nseq_len = 64\n")
    assert load_preset("~/mine.toml").data.seq_len == 64


def test_preset_files_an_editor_marks_or_leaves_empty_and_lr_scale_bools(tmp_path):
    """Reviewer: a preset with a UTF-8 byte-order mark was "Invalid statement"; an empty one gave the defaults (the
    demo's parent with the packaged tiny text); lr_scales {ffn = true} read as 1.0. The report's greedy answers
    stop at the model's positions whatever max_new_tokens asks."""
    import dataclasses

    from puzzle.config import RunConfig, load_preset
    from puzzle.errors import PuzzleError
    from puzzle.sft import greedy_chat
    from puzzle.tiny import tiny_parent

    (tmp_path / "bom.toml").write_bytes("\ufeff[data]\nseq_len = 64\n".encode())
    assert load_preset(str(tmp_path / "bom.toml")).data.seq_len == 64
    (tmp_path / "empty.toml").write_text("# nothing yet\n")
    with pytest.raises(PuzzleError, match="sets nothing"):
        load_preset(str(tmp_path / "empty.toml"))
    with pytest.raises(PuzzleError, match=r"bld.lr_scales\['ffn'\] must be a positive number, got True"):
        RunConfig.from_dict({"bld": {"lr_scales": {"ffn": True}}})
    lm = tiny_parent()
    lm.model.config = dataclasses.replace(lm.model.config, max_position_embeddings=40)  # the prompt and a few more
    reply = greedy_chat(lm.model, lm.tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=5000)
    assert len(lm.tokenizer.encode(reply)) <= 40


def test_a_misspelled_objective_is_refused_before_any_stage(tmp_path, capsys):
    """Reviewer: search.objective "kl_nat" was refused at the search, after data, BLD and scoring (8 minutes on the
    demo)."""
    from puzzle.cli import main

    preset = tmp_path / "p.toml"
    preset.write_text((Path(__file__).parents[1] / "puzzle" / "presets" / "tiny.toml").read_text()
                      .replace("[search]", "[search]\nobjective = \"kl_nat\"", 1))
    assert "kl_nat" in preset.read_text()
    assert main(["run", "--preset", str(preset), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "names ['kl_nat'], not columns of the score tables" in err and "data:" not in err, err
    assert not (tmp_path / "r").exists()
    # breaker: a space the parent cannot take was refused after the data stage, and saved
    preset.write_text((Path(__file__).parents[1] / "puzzle" / "presets" / "tiny.toml").read_text()
                      .replace("[space]", "[space]\nkv_heads = [64]", 1))
    assert main(["run", "--preset", str(preset), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "space.kv_heads=64 is not a divisor" in err and "data:" not in err, err
    assert not (tmp_path / "r").exists()


def test_loading_a_runs_parent_and_splits_writes_nothing_there(tmp_path):
    """The run's bookkeeping (timings.json, parent.json) is written with a stage's finished work, never by loading
    the parent or reloading finished splits (pipeline.Run): commands that only check flags need no undo."""
    from puzzle.config import load_preset, load_run_config
    from puzzle.pipeline import Run, stage_data, stage_score

    run = Run(tmp_path / "run", load_preset("tiny"), progress=False)
    stage_data(run)
    timings = json.loads((run.out / "timings.json").read_text())
    assert set(timings) == {"parent_load_s", "data_s"} and (run.out / "parent.json").is_file()
    before = _files(run.out)
    again = Run(run.out, load_run_config(run.out), progress=False)
    again.parent, again.tokens  # loaded
    assert _files(run.out) == before
    assert again.tokens.reloaded  # nothing was tokenized
    with pytest.raises(PuzzleError, match="run `puzzle bld"):  # a later stage refused (no library yet)
        stage_score(again)
    assert _files(run.out) == before  # refused before the cost table was timed: the finished data stage's record stays
    again.flush()  # what a command that succeeds writes at its end: the load's time
    assert json.loads((run.out / "timings.json").read_text())["parent_load_s"] > timings["parent_load_s"]


def _texts(tmp_path):
    """{placeholder: path} for refused stage commands: an empty file, a missing one, a copy of the tiny corpus."""
    from puzzle.data import packaged_text_path

    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "copy.txt").write_text(packaged_text_path("tiny_corpus.txt").read_text())
    return {"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "missing.txt"),
            "COPY": str(tmp_path / "copy.txt")}


@pytest.mark.parametrize("argv, words", [
    (["data", "--preset", "tiny", "--calib", "EMPTY"], "is empty"),
    (["data", "--preset", "tiny", "--calib", "MISSING"], "does not exist"),
    (["data", "--preset", "tiny", "--calib", "package:tiny_corpus.txt", "COPY", "--calib-weights", "1", "1"],
     "repeats the text"),
    (["bld", "--preset", "tiny", "--calib", "EMPTY"], "is empty"),
    (["score", "--preset", "tiny"], "run `puzzle bld"),  # no library: before the cost table is timed
    (["run", "--preset", "tiny", "--calib", "MISSING"], "does not exist"),
    (["search", "--speedup", "2"], "not a run directory"),
    (["export"], "not a run directory"),
])
def test_a_refused_first_stage_command_leaves_no_out_folder(tmp_path, capsys, argv, words):
    from puzzle.cli import main

    texts = _texts(tmp_path)
    out = tmp_path / "new" / "run"
    assert main([*(texts.get(a, a) for a in argv), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


def test_a_refused_stage_command_leaves_the_run_directory_as_it_was(tmp_path, capsys):
    from puzzle.cli import main

    texts = _texts(tmp_path)
    run = _tiny_run(tmp_path / "run")
    (run / "timings.json").write_text('{"data_s": 1.0}')
    (run / "export" / "mine").mkdir(parents=True)
    (run / "export" / "mine" / "notes.txt").write_text("a folder of the user's")
    before = _files(run)
    for argv, words in [(["data", "--calib", texts["EMPTY"]], "is empty"),
                        (["data", "--seed", "3", "--calib", texts["MISSING"]], "does not exist"),
                        (["bld", "--calib", texts["EMPTY"]], "is empty"),
                        (["score"], "run `puzzle bld"),
                        (["search", "--speedup", "2"], "does not exist"),  # no score table yet
                        (["realize", "--name", "nosuch"], "no architecture named"),
                        (["export", "--name", "nosuch"], "no architecture named"),
                        (["export", "--name", "child-x", "--dest", str(run / "export" / "mine")], "is not empty")]:
        assert main([argv[0], "--out", str(run), "--no-progress", *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert _files(run) == before, argv


def test_a_refused_gkd_re_pack_writes_nothing_to_the_run(tmp_path):
    """--max-doc-tokens that would change the evaluation split, or settings the work folder's checkpoint was not made
    with, are refused before RUN/gkd/data (or anything else) is written."""
    from puzzle.baselines import open_run
    from puzzle.distill import run_train_tokens

    run = _tiny_run(tmp_path / "run")
    before = _files(run)
    gkd = ["gkd", "--out", str(run), "--name", "child-x", "--tokens", "256", "--batch-size", "2",
           "--stop-after-steps", "1", "--no-eval", "--no-progress", "--calib-tokens", "8192"]
    args = _parser().parse_args(gkd + ["--max-doc-tokens", "100"])  # cuts the tiny preset's evaluation documents
    with pytest.raises(PuzzleError, match="evaluation split"):
        args.func(args)
    assert _files(run) == before and not (run / "gkd").exists()
    with pytest.raises(PuzzleError, match="negative"):  # the library call, for code that skips the CLI's check
        run_train_tokens(open_run(run, progress=False), calib_tokens=8192, max_doc_tokens=-1)
    assert _files(run) == before and not (run / "gkd").exists()
    args = _parser().parse_args(gkd + ["--max-doc-tokens", "1000"])  # longer than any: the same evaluation split
    assert args.func(args) == 0  # trained a step on the re-packed split
    repacked = run / "gkd" / "data-calib_tokens8192-max_doc_tokens1000"
    assert (repacked / "tokens.safetensors").is_file() and (run / "gkd" / "child-x" / "checkpoint.pt").is_file()
    before = _files(run)
    args = _parser().parse_args(gkd + ["--max-doc-tokens", "999", "--lr", "1e-3"])  # another re-pack, another lr
    with pytest.raises(PuzzleError, match="made with other settings"):
        args.func(args)
    assert _files(run) == before
    # a re-pack with other settings (here for another work folder) has a folder of its own: the first one's tokens
    # (and with parent samples, their file) stay as its checkpoint was made on, so it still resumes
    other = ["gkd", "--out", str(run), "--name", "child-x", "--tokens", "256", "--batch-size", "2", "--no-eval",
             "--stop-after-steps", "1", "--no-progress", "--calib-tokens", "4096", "--work", str(tmp_path / "w2"),
             "--dest", str(tmp_path / "e2")]
    args = _parser().parse_args(other)
    assert args.func(args) == 0
    assert (run / "gkd" / "data-calib_tokens4096" / "tokens.safetensors").is_file()
    first = {k: v for k, v in before.items() if k.startswith(repacked.relative_to(run).as_posix() + "/")}
    assert first and {k: v for k, v in _files(run).items() if k in first} == first
    args = _parser().parse_args(gkd + ["--max-doc-tokens", "1000", "--stop-after-steps", "2"])
    assert args.func(args) == 0  # the first re-pack's training resumes


def test_a_refused_command_in_a_folder_that_is_no_run_leaves_it_as_it_was(tmp_path, capsys):
    """An existing folder of the user's (or an empty one), a file or a dangling link as --out, and a --out that
    climbs out of a folder not yet made (new/../run): one line, exit 2, and every file as it was."""
    from puzzle.cli import main

    texts = _texts(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (mine, empty):
        before = _files(folder)
        assert main(["data", "--preset", "tiny", "--out", str(folder), "--calib", texts["MISSING"], "--no-progress"]) == 2
        assert "does not exist" in capsys.readouterr().err
        assert _files(folder) == before and not (folder / "config.json").exists(), folder
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, words in [(tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "is a file"),
                       (tmp_path / "dangling", "a link to nothing")]:
        for command in ("data", "bld", "score", "run"):
            assert main([command, "--preset", "tiny", "--out", str(out), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert words in err and len(err.strip().splitlines()) == 1, (command, out, err)
    run = _tiny_run(tmp_path / "run")
    before = _files(run)
    climbing = tmp_path / "new" / ".." / "run"
    assert main(["data", "--out", str(climbing), "--calib", texts["MISSING"], "--no-progress"]) == 2
    assert _files(run) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("section,key,value,words", [
    ("search", "vllm_compatible", "false", "search.vllm_compatible must be true or false"),
    ("score", "score_init", 1, "score.score_init must be true or false"),
    ("report", "prompts", 5, "report.prompts must be a list of strings"),
    ("data", "eval_sources", 5, "data.eval_sources must be a list of text sources"),
    ("data", "calib_sources", ["a.txt", 3], "data.calib_sources must be a list of text sources"),
])
def test_config_values_of_the_wrong_type_are_named(section, key, value, words):
    """Breaker: "vllm_compatible": "false" in config.json was read as true (vLLM mode on); report.prompts 5 and
    data.eval_sources 5 said "'int' object is not iterable"."""
    from puzzle.config import RunConfig, load_preset

    raw = load_preset("tiny").to_dict()
    raw[section][key] = value
    with pytest.raises(PuzzleError, match=re.escape(f"run/config.json: {words}")):
        RunConfig.from_dict(raw, "run/config.json")


@pytest.mark.parametrize("value", [5, None, ["kl_nats"], {"kl_nats": "x"}])
def test_a_saved_objective_of_the_wrong_form_is_named_not_a_traceback(value):
    """Breaker: search.objective 5, null, a list or a weight "x" in config.json ended in a TypeError/ValueError
    traceback when the score table was read."""
    from puzzle.config import RunConfig, load_preset

    raw = load_preset("tiny").to_dict()
    raw["search"]["objective"] = value
    with pytest.raises(PuzzleError, match=re.escape("run/config.json: search.objective: ")):
        RunConfig.from_dict(raw, "run/config.json")


def test_repeated_list_flags_add_up_instead_of_keeping_the_last():
    """`--speedups 1.25,1.5 --speedups 2` means all three targets, `--calib a --calib b` both sources (argparse alone
    kept the last list and dropped the rest without a word)."""
    from puzzle.cli import build_parser

    p = build_parser()
    args = p.parse_args(["baselines", "--out", "x", "--speedups", "1.25,1.5", "--speedups", "2"])
    assert args.speedups == "1.25,1.5,2"
    args = p.parse_args(["run", "--out", "x", "--calib", "a", "b", "--calib", "c", "--eval", "e", "--eval", "f",
                         "--calib-weights", "1", "2", "--calib-weights", "3", "--front-speedups", "1.5", "--front-speedups", "2"])
    assert (args.calib, args.eval, args.calib_weights, args.front_speedups) == (["a", "b", "c"], ["e", "f"],
                                                                                [1.0, 2.0, 3.0], "1.5,2")
    args = p.parse_args(["run", "--out", "x", "--calib-weights"])  # no values: back to document-count shares
    assert (args.calib_weights, args.calib, args.front_speedups) == ([], None, None)
    args = p.parse_args(["gkd", "--child", "c", "--parent", "p", "--calib", "a", "--calib", "b", "--eval", "e",
                         "--eval", "f"])
    assert (args.calib, args.eval) == (["a", "b"], ["e", "f"])
    assert p.parse_args(["sft", "--model", "tiny", "--data", "a", "--data", "b"]).data == ["a", "b"]
    assert p.parse_args(["merge", "a", "b", "--weights", "1", "--weights", "2", "--dest", "d"]).weights == [1.0, 2.0]


def test_a_configuration_asking_for_coupled_bld_runs_it_in_puzzle_run(tmp_path, capsys):
    """Reviewer: bld.coupled_top_k in a preset or config.json was ignored without a word. `puzzle bld` says that the
    coupled blocks follow scoring; `puzzle run` trains and scores them (Puzzle's hybrid flow), the search chooses
    among block rows, and the children are built with the coupled entries they chose (breaker: `puzzle realize`
    built the decoupled pair where the search had predicted the block)."""
    import pandas as pd
    from safetensors.torch import load_file

    from puzzle.cli import main
    from puzzle.library import Library

    out = _tiny_run(tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    config["bld"]["coupled_top_k"] = 2
    (out / "config.json").write_text(json.dumps(config))
    assert main(["bld", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "bld.coupled_top_k = 2: this command trains the decoupled library" in err and "puzzle run --out" in err
    assert not list((out / "library" / "entries").glob("L*/*+*"))
    assert main(["run", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"coupled BLD: \d+ blocks over \d+ layers \(\d+ trained now\)", err), err[-3000:]
    table = pd.read_csv(out / "score" / "score_table.csv")
    blocks = table[table["subblock"] == "block"]
    assert len(blocks) > 0 and json.loads((out / "score" / "score_table.csv.json").read_text())["coupled_blocks"] \
        == len(blocks)
    def holds_entry(name, layer, block):  # the export's layer is the coupled entry, tensor for tensor
        entry = Library(out / "library").load(layer, block, "bld")
        exported = load_file(out / "export" / name / "model.safetensors")
        return all(torch.equal(exported[f"model.layers.{layer}.{key}"], value) for key, value in entry.items())

    chosen = {}  # the block rows the run's children chose (which ones depends on the measured costs)
    for path in (out / "search").glob("child-*.json"):
        record = json.loads(path.read_text())
        if record.get("library_stage", "bld") == "bld" and "rows" in record:
            rows = [table.iloc[r] for layer_rows in record["rows"] for r in layer_rows]
            chosen.update({(int(r["layer"]), r["variant"]): path.stem for r in rows if r["subblock"] == "block"})
    assert all(holds_entry(name, layer, block) for (layer, block), name in chosen.items())
    assert main(["run", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0  # a rerun redoes nothing
    err = capsys.readouterr().err  # (breaker: the block rows' float params rewrote the tables, and the front was timed)
    assert "(0 trained now)" in err and "timing the children again" not in err, err[-3000:]
    before = _files(out)  # refine re-scores subblocks: refused before any work (reviewer: after minutes of it)
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--no-progress", "--max-contention", "inf"]) == 2
    assert "holds coupled block rows (coupled BLD: bld.coupled_top_k > 0), which it cannot re-score" in \
        capsys.readouterr().err and _files(out) == before
    layer, block = int(blocks["layer"].iloc[0]), str(blocks["variant"].iloc[0])  # a record that takes a block row,
    choice = [b.id for b in tiny_parent().config.blocks]  # whatever the search chose on this machine's costs
    choice[layer] = block
    (out / "search" / "child-hand.json").write_text(json.dumps({"choice": choice}))
    assert main(["export", "--out", str(out), "--name", "child-hand", "--no-progress"]) == 0
    assert holds_entry("child-hand", layer, block)
    from puzzle.scoring.harness import load_eval_model  # `puzzle eval RUN --child` builds it so too (breaker: it

    built = load_eval_model(str(out), "child-hand").model.model.layers[layer].state_dict()  # took the pair)
    entry = Library(out / "library").load(layer, block, "bld")
    assert all(torch.equal(built[k], v.to(built[k].dtype)) for k, v in entry.items())
    config = json.loads((out / "config.json").read_text())  # 0 switches it off for the library it made (breaker)
    config["bld"]["coupled_top_k"] = 0
    (out / "config.json").write_text(json.dumps(config))
    assert main(["search", "--out", str(out), "--no-progress"]) == 0  # the table keeps its block rows until scored
    assert "holds coupled block rows, but bld.coupled_top_k is 0 now" in capsys.readouterr().err  # (breaker: unsaid)
    assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    err = capsys.readouterr().err
    assert "coupled entries are left out of the table (bld.coupled_top_k = 0)" in err
    assert "holds coupled block rows, but" not in err
    assert "block" not in set(pd.read_csv(out / "score" / "score_table.csv")["subblock"])
    # a refined child (built from subblocks, on the decoupled table) stays buildable once the block rows are back
    # (breaker: its record, without the table's sha256, was refused as "edited" on the table with block rows)
    assert main(["search", "--out", str(out), "--no-progress"]) == 0
    assert main(["refine", "--out", str(out), "--name", "child-1.5x", "--no-progress", "--max-contention", "inf",
                 "--no-measure"]) == 0
    config["bld"]["coupled_top_k"] = 2
    (out / "config.json").write_text(json.dumps(config))
    assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    counted = re.search(r"score: (\d+) rows in the bld table, (\d+) rows in the init table", capsys.readouterr().err)
    blocks = (pd.read_csv(out / "score" / "score_table.csv")["subblock"] == "block").sum()
    assert counted and int(counted[1]) == int(counted[2]) + blocks > int(counted[2])  # (breaker: uncounted)
    assert main(["export", "--out", str(out), "--name", "child-1.5x-refined", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert "was solved on another score table" in capsys.readouterr().err


def test_a_preset_speedup_may_be_written_as_the_flag_takes_it():
    """Reviewer: `speedup = "1.5x"` in a preset was refused while `--speedup 1.5x` (and the README) take it."""
    from puzzle.config import RunConfig, load_preset

    raw = load_preset("tiny").to_dict()
    raw["search"].update(speedup="1.5x", front_speedups=["1.25x", 2])
    config = RunConfig.from_dict(raw, "p.toml")
    assert config.search.speedup == 1.5 and config.search.front_speedups == (1.25, 2.0)
    for bad in ("1.5y", "0.01x", "fast", True):
        raw["search"]["speedup"] = bad
        with pytest.raises(PuzzleError, match=re.escape(f"search.speedup must be a finite number >= 0.1 (e.g. 1.5 or "
                                                        f"\"1.5x\"), got {bad!r}")):
            RunConfig.from_dict(raw, "p.toml")


def test_front_targets_that_would_name_one_child_are_refused(tmp_path, capsys):
    """Breaker: --front-speedups 1.2500001,1.25 searched both as child-1.25x, the second record replacing the first."""
    from puzzle.cli import main
    from puzzle.config import RunConfig, load_preset

    raw = load_preset("tiny").to_dict()
    raw["search"]["front_speedups"] = [1.25, 1.5, 1.25]  # the same target twice is one child
    assert RunConfig.from_dict(raw, "p.toml").search.front_speedups == (1.25, 1.5, 1.25)
    raw["search"]["front_speedups"] = [1.25, 1.2500001]
    with pytest.raises(PuzzleError, match=re.escape("search.front_speedups: 1.25 and 1.2500001 would both be "
                                                    "child-1.25x")):
        RunConfig.from_dict(raw, "p.toml")
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--front-speedups", "1.2500001,1.25"]) == 2
    assert "--front-speedups '1.2500001,1.25': 1.2500001 and 1.25 would both be child-1.25x" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_temporary_files_of_killed_writes_are_removed_after_a_command_on_the_run(tmp_path, capsys):
    """Breaker: a command killed mid-write (SIGKILL) left `.parent.json.<8>.tmp` and `children/.child-2x.json.<8>.tmp`
    in the run directory through every rerun; a command on the run now removes them, and only them."""
    import os
    import time

    from puzzle.cli import main
    from puzzle.io import remove_stale_temp_files

    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    (run / "children").mkdir()
    (run / "config.json").write_text(json.dumps({"parent": "not settings"}))  # refused: a quick command
    recent = run / "children" / ".child-1.5x.json.abcdefgh.tmp"  # written a moment before the command
    stale = [run / ".parent.json.2wo8k8_n.tmp", run / "children" / ".child-2x.json.c3eifeyx.tmp", recent]
    kept = [run / "children" / "notes.tmp", run / ".a.json.short.tmp"]  # not the atomic writes' names
    folder = run / ".export.Ab3_xY9z.tmp"  # a folder (an export's, tidied by export.remove_stale_temp)
    folder.mkdir()
    hour_ago = time.time() - 3600
    for p in stale + kept:
        p.write_bytes(b"{")
        if p != recent:
            os.utime(p, (hour_ago, hour_ago))
    # a command that held the run's lock alone: the recent one is a dead writer's too (breaker: a rerun within a
    # minute of a kill left it); only a command sharing the lock (gkd, sft) waits out the grace period
    assert set(remove_stale_temp_files(run, before=time.time())) == set(stale[:2]) and recent.exists()
    for p in stale[:2]:
        p.write_bytes(b"{")
        os.utime(p, (hour_ago, hour_ago))
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom puzzle.runlock import run_lock\n"
                               f"with run_lock({str(run)!r}, ['holder']):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:  # a command the lock refused held nothing: a recent file may be the holder's (reviewer), old ones go
        assert holder.stdout.readline().strip() == "held"
        assert main(["search", "--out", str(run)]) == 2
        assert "removed 2 temporary file(s)" in capsys.readouterr().err and recent.exists()
    finally:
        holder.kill()
        holder.wait()
    from types import SimpleNamespace

    from puzzle.cli import _remove_stale_temp_files

    _remove_stale_temp_files(SimpleNamespace(out=run), time.time(), alone=False)  # gkd, sft: they share the lock
    assert recent.exists()
    for p in stale[:2]:
        p.write_bytes(b"{")
        os.utime(p, (hour_ago, hour_ago))
    assert main(["search", "--out", str(run)]) == 2
    assert "removed 3 temporary file(s) an interrupted command left" in capsys.readouterr().err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and folder.is_dir()
    # a file older than the grace period but written after the command started is that command's own
    late = run / ".late.json.zzzzzzzz.tmp"
    late.write_bytes(b"{")
    os.utime(late, (hour_ago, hour_ago))
    assert remove_stale_temp_files(run, before=hour_ago - 1) == [] and late.exists()
    assert remove_stale_temp_files(run, before=time.time()) == [late]
    assert remove_stale_temp_files(tmp_path / "absent", before=time.time()) == []
    import fcntl

    busy = run / ".big.pt.abcd1234.tmp"  # a long write or fsync: old time, but its writer holds the lock
    with open(busy, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        os.utime(busy, (hour_ago, hour_ago))
        assert remove_stale_temp_files(run, before=time.time()) == [] and busy.exists()
    assert remove_stale_temp_files(run, before=time.time()) == [busy]


@pytest.mark.parametrize("was, now, stage_then, expected", [
    (1.2581, 1.2579, "bld", "(predicted speed-up 1.2581x then, 1.2579x now)"),  # not "1.26x then, 1.26x now"
    (1.5, 2.0, "bld", "(predicted speed-up 1.50x then, 2.00x now)"),
    (1.29, 1.3, "bld", "(predicted speed-up 1.29x then, 1.30x now)"),  # a fresh user read "1.29x then, 1.3x now"
    (1.5, 1.5, "init", "(on the init library then, the bld one now)"),
    (1.5, 1.5, "bld", None)])
def test_searched_again_tells_the_two_children_apart(tmp_path, was, now, stage_then, expected):
    """An export of an earlier search's child is named out of date with figures that differ in the message."""
    import json
    import types

    from puzzle.pipeline import _searched_again

    (tmp_path / "export" / "c").mkdir(parents=True)
    (tmp_path / "search").mkdir()
    (tmp_path / "export" / "c" / "config.json").write_text(json.dumps(
        {"puzzle": {"predicted_speedup": was, "library_stage": stage_then}}))
    (tmp_path / "search" / "c.json").write_text(json.dumps({"speedup": now, "library_stage": "bld"}))
    said = _searched_again(types.SimpleNamespace(out=tmp_path), "c")
    assert said == (None if expected is None else f"c was searched again since {expected}")


def test_presets_lists_each_packaged_preset_with_what_it_is_for(capsys):
    """Fresh user: `puzzle presets` printed three bare names; which one to start with was in no output."""
    from puzzle.cli import main
    from puzzle.config import preset_names

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in preset_names():
        line = next(x for x in lines if x.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line  # a description follows the name
    assert "tiny random Llama" in out and "SmolLM2-135M-Instruct" in out
    assert "puzzle run --preset NAME" in out and max(map(len, lines)) <= 100
    from importlib import resources  # where to copy one from (reviewer: messages sent users to a preset's file)

    assert f"copy one of {resources.files('puzzle.presets')}/NAME.toml" in " ".join(lines)


def test_bld_says_when_the_calibration_split_caps_its_tokens(tmp_path, capsys):
    """Breaker: bld.tokens 8192 on the tiny preset's 48 calibration sequences trained 2944 tokens per subblock, and
    only a docstring said so."""
    from puzzle.cli import main

    out = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(out), "--bld-tokens", "8192", "--no-progress"]) == 0
    assert main(["bld", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "2944 tokens each" in err and "bld.tokens asks 8192" in err and "raise data.calib_tokens to 8320" in err


def test_bld_says_when_its_tokens_round_up_to_one_sequence(tmp_path, capsys):
    """Leftover: bld.tokens (or bld.coupled_tokens) below one calibration sequence trained a whole one, unsaid."""
    from puzzle.cli import main

    out = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(out), "--bld-tokens", "1", "--no-progress"]) == 0
    assert main(["bld", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "bld: note: bld.tokens = 1 is less than one calibration sequence, so each entry trains on one sequence of" \
        in err, err[-2000:]


def test_coupled_bld_says_when_the_calibration_split_caps_its_tokens(tmp_path, capsys):
    """Breaker: bld.coupled_tokens above the calibration split trained the blocks on what the split holds, unsaid."""
    import pandas as pd

    from puzzle.cli import main

    out = _tiny_run(tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    config["bld"].update(coupled_top_k=1, coupled_tokens=8192)
    (out / "config.json").write_text(json.dumps(config))
    assert main(["run", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    err = capsys.readouterr().err
    assert "coupled BLD: warning: bld.coupled_tokens asks 8192 tokens per entry" in err, err[-3000:]
    assert "raise data.calib_tokens to 8320 in " in err and "config.json (no flag sets it; more text if the sources " \
        "run short) or lower bld.coupled_tokens" in err
    trained = (pd.read_csv(out / "score" / "score_table.csv")["subblock"] == "block").sum()
    config["bld"]["coupled_tokens"] = 128  # `puzzle score` alone leaves out the blocks of the other plan (reviewer)
    (out / "config.json").write_text(json.dumps(config))
    assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    err = capsys.readouterr().err
    assert trained > 0 and f"score: {trained} coupled entr" in err, err[-3000:]
    assert "trained on another number of tokens than bld.coupled_tokens plans (128): left out of the table" in err
    assert "block" not in set(pd.read_csv(out / "score" / "score_table.csv")["subblock"])
    # a coupled entry whose info is damaged: `puzzle run` trains it again (breaker: scoring stopped it, naming
    # `puzzle bld`, which trains no coupled entry)
    assert main(["run", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    info = sorted((out / "library" / "entries").glob("L*/*+*.bld.json"))[0]
    info.write_text('{"layer": 3, trunc')
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    err = capsys.readouterr().err
    assert "coupled entry (e.g. layer" in err and "is missing or damaged: left out of the table" in err, err[-3000:]
    assert "(1 trained now)" in err and json.loads(info.read_text())["planned_tokens"] == 128


@pytest.mark.parametrize("command", ["run", "front", "baselines", "refine", "gkd", "sft", "rpo"])
def test_an_empty_out_is_refused_not_taken_as_the_current_folder(command, capsys):
    """Breaker: `--out ""` ran in the current folder, unsaid."""
    from puzzle.cli import main

    for flags in (["--out", ""], ["--out= "]):
        with pytest.raises(SystemExit) as e:
            main([command, *flags])
        assert e.value.code == 2 and "argument --out: is empty; give a directory" in capsys.readouterr().err


def test_a_preset_file_not_in_utf8_or_leaving_the_text_to_the_tiny_defaults_is_said(tmp_path, capsys):
    """Breaker: a Latin-1 comment (or a binary file) as --preset ended in UnicodeDecodeError's traceback; `[data]
    seq_len = 64` alone gave the SmolLM2 parent the tiny test text, with only "fewer than asked" warnings."""
    from puzzle.cli import main

    (tmp_path / "lat.toml").write_bytes(b"# caf\xe9\n[data]\nseq_len = 64\n")
    assert main(["data", "--preset", str(tmp_path / "lat.toml"), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "lat.toml is not UTF-8 text (byte 5: invalid continuation byte); save it as UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "p.toml").write_text('[parent]\npath = "elsewhere"\n[data]\nseq_len = 64\n')
    assert main(["data", "--preset", str(tmp_path / "p.toml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err  # warned before the parent is loaded (and refused here: no such model)
    assert "p.toml leaves data.calib_sources and data.eval_sources at the built-in defaults, the few KB of text of " \
           f"the tiny test model, for the parent {tmp_path / 'elsewhere'}" in err, err
    assert "smollm2-demo.toml) is simplest" in err
    calib = tmp_path / "c.txt"
    calib.write_text("Some text to calibrate on.\n\nAnother document.\n")
    assert main(["data", "--preset", str(tmp_path / "p.toml"), "--out", str(tmp_path / "c"), "--no-progress",
                 "--calib", str(calib)]) == 2
    err = capsys.readouterr().err
    assert "leaves data.eval_sources at the built-in defaults" in err and "calib_sources at" not in err, err
    # breaker: a file that sets the tiny text itself was said to leave it unset; the packaged tiny preset with
    # --parent got no word
    (tmp_path / "s.toml").write_text('[parent]\npath = "elsewhere"\n[data]\nseq_len = 64\ncalib_sources = '
                                     '["package:tiny_corpus.txt"]\n')
    assert main(["data", "--preset", str(tmp_path / "s.toml"), "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "leaves data.eval_sources at the built-in defaults" in err and "calib_sources at" not in err, err
    assert f"the preset {tmp_path / 's.toml'} gives data.calib_sources the few KB of text of the tiny test model" in err
    (tmp_path / "model").mkdir()  # (a --parent that does not exist is refused alone, in one line)
    assert main(["data", "--preset", "tiny", "--parent", str(tmp_path / "model"), "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the preset tiny gives data.calib_sources and data.eval_sources the few KB of text" in err, err
    (tmp_path / "t.toml").write_text('[parent]\npath = "tiny"\n[data]\nseq_len = 64\n')  # the tiny parent's own text
    assert main(["data", "--preset", str(tmp_path / "t.toml"), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "built-in defaults" not in capsys.readouterr().err


def test_a_search_whose_child_is_the_parent_says_so(tmp_path, capsys):
    """Breaker: `puzzle search --out RUN --speedup 0.5` wrote child-0.5x, the parent itself, without a word (the
    --library form says that such a bound does not bind)."""
    from puzzle.cli import main

    out = _tiny_run(tmp_path / "run")
    assert main(["bld", "--out", str(out), "--no-progress"]) == 0
    assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    capsys.readouterr()
    assert main(["search", "--out", str(out), "--speedup", "0.5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"search: note: child-0\.5x is the parent itself: its budgets \(max_runtime_ms=[0-9.]+\) hold "
                     r"for the parent, so the search keeps it \(KL 0\); tighten them", err), err
    assert "child-1.5x is the parent itself" not in err


def test_a_file_given_as_the_run_directory_is_named_as_such(tmp_path, capsys):
    """Breaker: `gkd --out run/config.json` said "run/config.json/config.json does not exist: start with `puzzle run
    --out run/config.json`"."""
    from puzzle.cli import main

    (tmp_path / "run").mkdir()
    config = tmp_path / "run" / "config.json"
    config.write_text("{}")
    assert main(["gkd", "--out", str(config), "--name", "child-2x"]) == 2
    err = capsys.readouterr().err
    assert f"{config} is a file, not a run directory; give the run's folder ({tmp_path / 'run'})" in err, err


def test_children_the_budget_feedback_re_solved_are_named(tmp_path):
    """Fresh user: the run's closing table gave predicted speed-ups other than the search's lines, unexplained."""
    from puzzle.pipeline import resolved_by_feedback

    (tmp_path / "search").mkdir()
    records = {"a": {"choice": ["x"], "solved_choice": ["y"]},  # re-solved
               "b": {"choice": ["x"], "solved_choice": ["x"]},  # settled on the first solve
               "c": {"choice": ["x"]}}  # never timed
    for name, record in records.items():
        (tmp_path / "search" / f"{name}.json").write_text(json.dumps(record))
    (tmp_path / "search" / "d.json").write_text("{not json")
    assert resolved_by_feedback(tmp_path, ["parent", "a", "b", "c", "d"]) == ["a"]


def test_budget_flags_on_a_new_run_say_they_replace_the_presets_budget(tmp_path, capsys):
    """Breaker: `--preset tiny --max-params 0.99` dropped tiny's speedup 1.5 without a word (the help said "any
    combination holds at once"); given with it, nothing is said."""
    from puzzle.cli import _resolve_config, build_parser

    def resolve(*flags):
        args = build_parser().parse_args(["run", "--out", str(tmp_path / "r"), "--preset", "tiny", *flags])
        return _resolve_config(args, tmp_path / "r").search

    assert resolve("--max-params", "0.99").speedup is None
    assert "run: note: the budget flags replace the main budget of the preset tiny, so its speedup 1.5 no longer " \
           "holds; give that flag too to keep it" in capsys.readouterr().err
    for flags in (("--speedup", "1.5", "--max-params", "0.99"), ("--speedup", "2"), ("--max-runtime", "0.5")):
        resolve(*flags)  # a runtime bound in place of the preset's (reviewer: `--speedup 2` was warned about)
        assert "replace the main budget" not in capsys.readouterr().err


def test_a_missing_preset_file_named_like_a_packaged_preset_names_it(tmp_path, monkeypatch):
    """Breaker: `--preset tiny.toml` (no such file) said only that the file does not exist."""
    from puzzle.config import load_preset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PuzzleError, match=r"preset file tiny.toml does not exist \(the packaged preset is "
                                          r"`--preset tiny`, without .toml\)"):
        load_preset("tiny.toml")
    with pytest.raises(PuzzleError, match="preset file mine.toml does not exist; packaged presets: smollm2-demo"):
        load_preset("mine.toml")


def test_sigterm_stops_a_command_as_an_interrupt_does():
    """Breaker: `timeout -s TERM` (or a scheduler's preemption) ended a command without a word, where Ctrl-C saves
    what it can and says so; the handler is the default again afterwards."""
    import os
    import signal
    import time

    from puzzle import cli

    previous = signal.getsignal(signal.SIGINT)
    try:
        for sigint in (signal.default_int_handler, signal.SIG_IGN):  # SIG_IGN: a job a script started with `&`
            signal.signal(signal.SIGINT, sigint)
            with pytest.raises(KeyboardInterrupt):
                with cli._terminate_as_interrupt():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # (the interrupt comes first)
            assert cli._TERMINATED and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            cli._TERMINATED.clear()
    finally:
        signal.signal(signal.SIGINT, previous)
        cli._TERMINATED.clear()


@pytest.mark.parametrize("sig,rc", [("SIGTERM", 0), ("SIGINT", 0), ("SIGTERM", 2)])
def test_a_signal_after_the_command_ended_exits_at_once_with_its_status(sig, rc):
    """Breaker: Ctrl-C or SIGTERM in the second Python takes to shut down after a finished command ended the process
    without a word, 130 or 143 for finished work."""
    import subprocess
    import sys

    code = ("import os, signal, time\nfrom puzzle import cli\n"
            f"cli._exit_at_once_on_a_late_signal({rc})\nos.kill(os.getpid(), signal.{sig})\ntime.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == rc
    said = "its work is done and saved, nothing to redo" if rc == 0 else f"its exit status {rc} stands"
    assert done.stderr.splitlines()[-1:] == [f"puzzle: interrupted after the command ended: {said}"]


def test_sigterm_while_the_process_starts_is_said():
    """Breaker: SIGTERM in the first second of `puzzle eval` (torch loading) ended it silently; Ctrl-C there said
    "puzzle: interrupted"."""
    import subprocess
    import sys

    code = ("import os, signal, sys, time\nfrom puzzle import cli\n"
            "def slow(command):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n"
            "cli.build_parser = slow\nsys.argv = ['puzzle', 'presets']\nsys.exit(cli.entry())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr.splitlines()[-1:] == ["puzzle: stopped (SIGTERM)"]
    assert "Traceback" not in done.stderr


def test_one_model_measured_as_several_front_points_is_named():
    """Reviewer: greedy-1.25x/1.5x/2x and uniform-2x were one model (the same layers and KL), drawn from 0.64x to
    2.38x without a word."""
    import pandas as pd

    from puzzle.cli import same_model_note

    rows = pd.DataFrame({"name": ["parent", "greedy-1.25x", "greedy-2x", "uniform-2x", "child-2x"],
                         "architecture": ["parent", "kv1/128 x4", "kv1/128 x4", "kv1/128 x4", "kv1/64 x4"],
                         "kl_nats": [0.0, 0.004329, 0.004329, 0.004329, 0.005],
                         "speedup": [1.0, 0.6429, 2.375, 1.112, 2.0]})
    assert same_model_note(rows) == ("one model drawn as several points: greedy-1.25x, greedy-2x and uniform-2x "
                                     "(measured 0.64x to 2.38x) are one model (the same layers, the same evaluation "
                                     "KL), so the spread of its measured speed-ups is timing noise, not its speed")
    assert same_model_note(rows.assign(speedup=[1.0, 2.0, 2.05, 2.1, 2.0])) == ""  # within 10 %
    assert same_model_note(rows.drop(columns="architecture")) == ""


def test_refuse_repeated_compares_bytes_only_of_files_that_could_be_copies(tmp_path):
    """Files of one size are compared by their bytes (a copy is refused); other files of that size, empty files and
    names that are no file (assets) pass."""
    from puzzle.io import refuse_repeated

    for name, text in (("a.txt", "one text"), ("b.txt", "two text"), ("c.txt", "one text"), ("e1", ""), ("e2", "")):
        (tmp_path / name).write_text(text)
    refuse_repeated("--data", [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "e1", tmp_path / "e2", "asset:x"])
    with pytest.raises(PuzzleError, match=r"--data names \S+a.txt and \S+c.txt, which hold the same bytes"):
        refuse_repeated("--data", [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"])


def test_progress_bars_update_seldom_in_a_log_file(monkeypatch, capsys):
    """Fresh user: tqdm's updates, each after a carriage return, made a redirected demo log of lines thousands of
    characters long; with stderr no terminal, bars update every LOG_PROGRESS_INTERVAL_S seconds (a user's own
    TQDM_MININTERVAL wins)."""
    import os

    from puzzle.cli import LOG_PROGRESS_INTERVAL_S, main

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_MAXINTERVAL", raising=False)
    assert main(["presets"]) == 0  # (pytest's captured stderr is no terminal)
    # and tqdm's monitor refreshes an idle bar no sooner (a fresh user: lines in pairs, 12-18 s apart)
    assert os.environ["TQDM_MININTERVAL"] == os.environ["TQDM_MAXINTERVAL"] == LOG_PROGRESS_INTERVAL_S
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    monkeypatch.delenv("TQDM_MAXINTERVAL")
    assert main(["presets"]) == 0 and os.environ["TQDM_MININTERVAL"] == os.environ["TQDM_MAXINTERVAL"] == "5"


def test_a_progress_interval_that_is_no_number_is_one_line(monkeypatch, capsys):
    """Breaker: TQDM_MININTERVAL=30s (the README names the variable) was tqdm's ValueError traceback for every
    command, `puzzle presets` too."""
    from puzzle.cli import main

    monkeypatch.setenv("TQDM_MININTERVAL", "30s")
    assert main(["presets"]) == 2
    assert "TQDM_MININTERVAL must be a number of seconds between progress updates (e.g. 30), got '30s'" in \
        capsys.readouterr().err
    monkeypatch.setenv("TQDM_MININTERVAL", "2.5")
    assert main(["presets"]) == 0
    monkeypatch.setenv("TQDM_MAXINTERVAL", "ten")
    assert main(["presets"]) == 2 and "TQDM_MAXINTERVAL must be a number" in capsys.readouterr().err


def test_lr_scales_that_are_no_table_are_refused_and_a_config_json_bom_is_read(tmp_path_factory, tmp_path):
    """Breaker: bld.lr_scales = 0 (or "", []) was saved as {} unsaid; a config.json an editor saved with a byte-order
    mark was refused as not JSON, while presets with one are read."""
    import shutil

    from puzzle.bld import BLDConfig
    from puzzle.config import load_run_config
    from puzzle.io import is_run_directory
    from tiny_run import tiny_run_dir

    for bad in (0, "", []):
        with pytest.raises(PuzzleError, match="bld.lr_scales must be a table of variant id -> multiplier"):
            BLDConfig(lr_scales=bad)
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    config = (out / "config.json").read_bytes()
    (out / "config.json").write_bytes(b"\xef\xbb\xbf" + config)
    assert is_run_directory(out) and load_run_config(out).to_dict()["bld"]["tokens"] == 512


def test_signals_deferred_holds_ctrl_c_until_the_block_ends():
    """Breaker: a Ctrl-C between mkstemp and its clean-up left search/.chosen.json.XXXX.tmp behind."""
    import os
    import signal

    from puzzle.io import signals_deferred

    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            reached = True  # held: the block ends first
    assert reached
    import torch  # noqa: F401  (its threads: the kernel may hand them the signal, which a thread's mask did not hold)

    from puzzle import cli

    reached = False  # SIGTERM as a command takes it (`cli._terminate_as_interrupt`), held as well, and raised
    try:  # first where a Ctrl-C came too (the first raised ends the block)
        with pytest.raises(KeyboardInterrupt), cli._terminate_as_interrupt():
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(20):
                    os.kill(os.getpid(), signal.SIGTERM)
                    torch.ones(256, 256) @ torch.ones(256, 256)
                reached = True
        assert reached and cli._TERMINATED and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        cli._TERMINATED.clear()


def test_a_search_interrupted_before_its_choices_leaves_the_configuration_as_it_was(tmp_path_factory, tmp_path,
                                                                                    monkeypatch, capsys):
    """Breaker: Ctrl-C while `puzzle search --speedup 3` wrote its files left config.json at 3x beside chosen.json's
    1.5x choices, and `puzzle export` then exported child-3x as the main child."""
    import shutil

    from puzzle import pipeline
    from puzzle.cli import main
    from tiny_run import tiny_run_dir

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    before = {p: p.read_bytes() for p in (out / "config.json", out / "search" / "chosen.json")}
    write = pipeline.atomic_write_json

    def interrupted(path, data):
        if Path(path).name == "chosen.json":
            raise KeyboardInterrupt
        return write(path, data)

    monkeypatch.setattr(pipeline, "atomic_write_json", interrupted)
    assert main(["search", "--out", str(out), "--speedup", "1.3", "--no-progress"]) == 130
    assert {p: p.read_bytes() for p in before} == before
    monkeypatch.undo()
    assert main(["search", "--out", str(out), "--speedup", "1.3", "--no-progress"]) == 0  # and then it settles
    assert json.loads((out / "search" / "chosen.json").read_text())["main"] == "child-1.3x"
    assert json.loads((out / "config.json").read_text())["search"]["speedup"] == 1.3


def test_puzzle_run_ends_with_the_next_commands_for_its_main_child(tmp_path):
    """A fresh user (stop 79): `puzzle run` ended with the files' paths and no word of what to run next."""
    import pandas as pd

    from puzzle.cli import _next_steps

    summary = pd.DataFrame({"name": ["parent", "child-1.25x", "child-1.5x"]})
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "chosen.json").write_text(json.dumps({"main": "child-1.5x"}))
    said = _next_steps(tmp_path, summary)
    assert said.startswith(f"next: `puzzle baselines --out {tmp_path} --no-export`")
    assert f"`puzzle refine --out {tmp_path} --name child-1.5x`" in said and "puzzle generate" not in said
    (tmp_path / "export" / "child-1.5x").mkdir(parents=True)
    (tmp_path / "export" / "child-1.5x" / "config.json").write_text("{}")  # exported: a prompt can be answered
    assert f"`puzzle generate {tmp_path / 'export' / 'child-1.5x'} --prompt" in _next_steps(tmp_path, summary)
    (tmp_path / "search" / "chosen.json").write_text("{not json")  # the first child, where the record is unreadable
    assert "--name child-1.25x`" in _next_steps(tmp_path, summary)
    assert _next_steps(tmp_path, summary.iloc[:1]) == ""  # no child: nothing to suggest
    # what was done is not suggested again (a breaker: the line never changed): front for the baselines built, no
    # refine or gkd once made, and the prompt to the gkd child
    (tmp_path / "search" / "chosen.json").write_text(json.dumps({"main": "child-1.5x"}))
    for path in ("baselines/baselines.csv", "refine/child-1.5x.summary.csv", "export/child-1.5x-gkd/config.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    done = _next_steps(tmp_path, summary)
    assert done.startswith(f"next: `puzzle front --out {tmp_path}` compares with the baselines built")
    assert "puzzle refine" not in done and "puzzle gkd" not in done and "puzzle baselines" not in done
    assert f"`puzzle generate {tmp_path / 'export' / 'child-1.5x-gkd'} --prompt" in done


def test_a_failed_command_after_the_search_keeps_the_choices_settings_but_not_its_max_contention(tmp_path):
    """A breaker: `puzzle front --remeasure --max-contention 0.25` re-solved (the choices' settings stay), was refused
    at the timing, and left max_contention 0.25 in config.json, so that later commands on the run were refused; a
    looser limit stays (timings it accepted may be written)."""
    from puzzle.cli import _put_back_max_contention

    path = tmp_path / "config.json"
    before = json.dumps({"score": {"repeats": 7, "max_contention": "inf"}, "search": {"speedup": "1.5"}}).encode()
    path.write_text(json.dumps({"score": {"repeats": 7, "max_contention": 0.25}, "search": {"speedup": "2"}}))
    _put_back_max_contention(path, before)
    assert json.loads(path.read_text()) == {"score": {"repeats": 7, "max_contention": "inf"},
                                            "search": {"speedup": "2"}}  # the search's settings as the choices
    path.write_text(json.dumps({"score": {"max_contention": 0.1}}))
    _put_back_max_contention(path, json.dumps({"score": {}}).encode())  # not set before: the default again
    assert json.loads(path.read_text()) == {"score": {}}
    path.write_text(json.dumps({"score": {"max_contention": 3.0}}))  # looser: what it accepted may be written
    _put_back_max_contention(path, json.dumps({"score": {"max_contention": 0.25}}).encode())  # (a reviewer: a table
    # retimed under it), so it stays
    assert json.loads(path.read_text()) == {"score": {"max_contention": 3.0}}
    path.write_text("{not json")
    _put_back_max_contention(path, before)  # unreadable: left as it is
    assert path.read_text() == "{not json"


def test_a_front_refused_after_its_search_keeps_the_runs_max_contention(tmp_path_factory, tmp_path, monkeypatch,
                                                                       capsys):
    """The call site of `_put_back_max_contention`: `puzzle front --remeasure --max-contention 0.1` searches (the run
    is then settled), is refused at the timing, and leaves the run's limit as it was."""
    from puzzle.cli import main
    from puzzle.errors import PuzzleError
    from tiny_run import tiny_run_copy

    out, _ = tiny_run_copy(tmp_path_factory, tmp_path / "run")
    before = json.loads((out / "config.json").read_text())["score"].get("max_contention")
    assert before in ("inf", float("inf"))  # the tiny run's, saved by its --max-contention inf

    def refused(*args, **kwargs):
        raise PuzzleError("other jobs kept the cores busy (as a timing under the limit is refused)")

    monkeypatch.setattr("puzzle.scoring.cost.measure_models", refused)
    assert main(["front", "--out", str(out), "--remeasure", "--max-contention", "0.1", "--no-progress"]) == 2
    assert "other jobs kept the cores busy" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["score"].get("max_contention") == before
