"""Stage commands on --out folders: another program's config.json is never overwritten, a failed budget is not kept
in a new run's configuration, --max-contention reaches every command that times models, a search reads its score
table once, report.md follows the front's targets (and a failed front leaves the search's files as they were), negative
numbers in any spelling reach the value checks, a number flag out of range is named as the flag, and a file where a
run's folder belongs is named."""

import argparse
import json
import math
import re
import shutil
import warnings

import pandas as pd
import pytest

from tiny_run import reseal_table, tiny_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(tmp_path_factory, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    return out


@pytest.mark.parametrize("config", [{"foo": 1}, {},
                                    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64},
                                    {"model": "resnet", "data": {"path": "/x"}, "optimizer": "adam"}])  # one name shared
def test_a_config_json_of_another_program_is_refused_and_kept(tmp_path, capsys, config):
    from puzzle.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "notes.txt").write_text("the user's")
    before = _files(folder)
    for argv in (["data", "--preset", "tiny"], ["run", "--preset", "tiny", "--speedup", "2"], ["data"], ["score"],
                 ["search", "--speedup", "2"], ["front"], ["export"]):
        assert main([*argv, "--out", str(folder), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert f"{folder / 'config.json'} is not a puzzle run's configuration" in err and "give another --out" in err
        assert _files(folder) == before, argv


def test_a_damaged_run_config_keeps_its_message(tmp_path, capsys):
    from puzzle.cli import main

    out = tmp_path / "run"
    out.mkdir()
    for text, words in [('{"search": {"speedupp": 2}}', "unknown setting(s) ['speedupp']"),
                        ("[1]", "holds a JSON list"), ("{not json", "is not valid JSON"),
                        ('{"data": "x", "search": {}}', "the run's 'data' section is \"x\", not an object of settings"),
                        ('{"report": null}', "the run's 'report' section is null, not an object of settings")]:
        (out / "config.json").write_text(text)
        assert main(["data", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert words in err and "not a puzzle run's" not in err and len(err.strip().splitlines()) == 1, err
        assert (out / "config.json").read_text() == text
        if words.startswith(("holds a JSON", "is not valid")):  # breaker: "delete it and rerun" led nowhere
            assert f"delete it and write it again with `puzzle run --out {out} --preset <the run's preset>`" in err


@pytest.mark.slow
def test_a_failed_budget_is_not_kept_in_a_new_runs_configuration(tmp_path, capsys):
    """`puzzle run --out NEW --speedup 1e9` fails in the search after data, BLD and scoring wrote work: NEW stays for a
    rerun to resume, with the settings of that work, and the preset's search settings (not the failed budget)."""
    from puzzle.cli import main
    from puzzle.config import load_preset, load_run_config

    out = tmp_path / "new" / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), "--no-progress", "--speedup", "1e9", "--front-speedups",
                 "3", "--max-contention", "inf", "--bld-tokens", "256", "--score-tokens", "64"]) == 2
    assert "no architecture in the library meets" in capsys.readouterr().err
    assert (out / "score" / "score_table.csv").is_file()  # the finished work stays
    saved, preset = load_run_config(out), load_preset("tiny")
    assert saved.search == preset.search  # speedup 1.5 and the preset's front, as without the failed flags
    assert math.isinf(saved.score.max_contention) and saved.bld.tokens == 256 and saved.score.tokens == 64
    assert main(["search", "--out", str(out)]) == 0  # the run's own budget (the preset's) now solves
    assert (out / "search" / "child-1.5x.json").is_file()


def test_a_stage_on_a_folder_without_a_run_says_it_starts_the_default_preset(tmp_path, capsys):
    """Breaker: `puzzle bld --out T`, after `puzzle data` had failed there, started BLD of the SmolLM2 demo without
    a word; `puzzle run` (whose first command the README gives with --preset) and a --preset say nothing more."""
    from puzzle.cli import _base_config

    config = _base_config(argparse.Namespace(command="bld", preset=None), tmp_path / "T")
    assert config.parent.path.startswith("asset:")  # the demo's packaged parent
    assert f"bld: {tmp_path / 'T'} holds no run (no config.json): it starts one with the default preset " \
           "smollm2-demo (--preset names another" in capsys.readouterr().err
    _base_config(argparse.Namespace(command="run", preset=None), tmp_path / "T")
    _base_config(argparse.Namespace(command="bld", preset="tiny"), tmp_path / "T")
    assert capsys.readouterr().err == ""


def test_a_library_rebuilt_since_scoring_is_said_by_the_stages_that_read_the_table(tmp_path_factory, tmp_path,
                                                                                     capsys):
    """Breaker: after `rm -rf library; puzzle bld --bld-tokens 1024`, search, realize and front used the old scores
    without a word (only `score` saw the change)."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    assert main(["search", "--out", str(out), "--no-progress"]) == 0
    assert "was built with other settings since" not in capsys.readouterr().err
    meta = json.loads((out / "library" / "meta.json").read_text())
    tokens = meta["bld"]["tokens"]
    meta["bld"]["tokens"] = tokens // 2  # as a rebuild with --bld-tokens would record it
    (out / "library" / "meta.json").write_text(json.dumps(meta))
    assert main(["search", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"was built with other settings since {out / 'score' / 'score_table.csv'} was scored (bld.tokens: " \
           f"{tokens} -> {tokens // 2})" in err and f"`puzzle score --out {out}`" in err, err


def test_take_back_removes_only_new_bookkeeping(tmp_path):
    from puzzle.cli import _first_missing, _listing, _take_back

    mine = tmp_path / "mine"  # an existing folder of the user's
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("x")
    had = _listing(mine)
    (mine / "config.json").write_text("{}")
    (mine / "timings.json").write_text("{}")
    (mine / "data").mkdir()  # an empty folder the command made
    _take_back(mine, had)
    assert _listing(mine) == had
    (mine / "config.json").write_text("{}")
    (mine / "sub" / "tokens.bin").write_text("work")  # work, in a folder the user had
    _take_back(mine, had)
    assert (mine / "config.json").is_file() and (mine / "sub" / "tokens.bin").is_file()
    out = tmp_path / "new" / "a" / "run"  # a new --out: removed up to the first folder made
    top = _first_missing(out)
    out.mkdir(parents=True)
    (out / "parent.json").write_text("{}")
    (out.parent / "empty").mkdir()
    _take_back(out, set(), top)
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "data").mkdir()
    (out / "data" / "tokens.bin").write_text("work")
    _take_back(out, set(), _first_missing(tmp_path / "new"))
    assert (out / "config.json").is_file() and (out / "data" / "tokens.bin").is_file()


def _option_help(parser, command):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a.help for a in sub.choices[command]._actions if "--max-contention" in a.option_strings)


def test_every_command_that_times_models_takes_max_contention(tmp_path_factory, tmp_path, monkeypatch, capsys):
    from puzzle import baselines, pipeline, refine
    from puzzle.cli import build_parser, main
    from puzzle.config import load_run_config

    parser = build_parser()
    helps = {c: _option_help(parser, c) for c in ("run", "score", "realize", "front", "refine", "baselines")}
    assert len(set(helps.values())) == 1, helps
    out = _copy(tmp_path_factory, tmp_path)
    seen = {}

    def record(command):
        def fake(run, *args, **kwargs):
            seen[command] = run.config.score.max_contention
            return pd.DataFrame({"name": ["parent"], "training": [""], "speedup": [1.0], "kl_nats": [0.0],
                                 "lm_loss": [1.0], "params": [1], "method": ["parent"], "target_speedup": [1.0]})
        return fake

    monkeypatch.setattr(pipeline, "stage_realize", record("realize"))
    monkeypatch.setattr(pipeline, "stage_front", record("front"))
    monkeypatch.setattr(refine, "improve_child", record("refine"))
    monkeypatch.setattr(baselines, "run_baselines", record("baselines"))
    for command, cores in [("realize", "0.5"), ("front", "1.5"), ("refine", "2.5"), ("baselines", "inf")]:
        extra = {"realize": ["--name", "child-1.5x"], "refine": ["--name", "child-1.5x", "--no-measure"]}.get(command, [])
        assert main([command, "--out", str(out), "--no-progress", *extra, "--max-contention", cores]) == 0, \
            capsys.readouterr().err
        assert seen[command] == float(cores)  # the limit the command's timings check
        assert load_run_config(out).score.max_contention == float(cores)  # saved, as run and score save it
    assert main(["baselines", "--out", str(out), "--no-progress", "--max-contention", "0"]) == 2
    assert "--max-contention must be a number of cores > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_finished_front_is_drawn_again_under_another_contention_limit(tmp_path_factory, tmp_path, capsys):
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    measured = _files(out)["front.csv"]
    capsys.readouterr()
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "3"]) == 0
    assert "is up to date" in capsys.readouterr().err and _files(out)["front.csv"] == measured
    (out / "front.png").unlink()  # a deleted picture is drawn again, nothing timed
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "3"]) == 0
    assert "is up to date" in capsys.readouterr().err and (out / "front.png").stat().st_size > 10_000
    # a setting that is not valid in config.json (a hand edit) is mended by its flag, as the error says
    saved = json.loads((out / "config.json").read_text())
    saved["score"]["max_contention"] = "abc"
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["front", "--out", str(out), "--no-progress"]) == 2
    assert "score.max_contention must be a number of cores" in capsys.readouterr().err
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    assert json.loads((out / "config.json").read_text())["score"]["max_contention"] == "inf"
    # a parent that cannot be loaded fails front before its search rewrites DIR/search (budget-feedback records)
    saved = json.loads((out / "config.json").read_text())
    saved["parent"]["path"] = str(tmp_path / "moved-parent")
    (out / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "3"]) == 0  # drawn: no parent needed
    assert "is up to date" in capsys.readouterr().err
    before = _files(out)
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "3", "--front-speedups", "1.25,2"]) == 2
    assert "moved-parent does not exist" in capsys.readouterr().err
    assert _files(out) == before  # config.json and search/ byte for byte


def test_a_saved_search_setting_that_is_not_valid_is_named_with_its_file_and_mended_by_its_flag(
        tmp_path_factory, tmp_path, capsys):
    """Leftover: a hand-edited config.json with speedup "abc" failed `puzzle search --out DIR --speedup 1.25` too,
    with a message that named neither the file nor the flag's way out."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    saved = json.loads((out / "config.json").read_text())
    saved["search"]["speedup"] = "abc"
    saved["search"]["budget_feedback"] = -3
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["search", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'config.json'}: search." in err and len(err.strip().splitlines()) == 1, err
    assert main(["search", "--out", str(out), "--speedup", "1.25", "--budget-feedback", "0"]) == 0, \
        capsys.readouterr().err
    mended = json.loads((out / "config.json").read_text())["search"]
    assert mended["speedup"] == 1.25 and mended["budget_feedback"] == 0
    assert main(["search", "--out", str(out), "--max-memory", " "]) == 2  # an empty flag is still named as the flag
    assert "--max-memory is empty" in capsys.readouterr().err
    assert main(["search", "--out", str(out), "--max-memory", "abc"]) == 2  # a bad flag: the flag, not the file
    err = capsys.readouterr().err
    assert "--max-memory 'abc' is not a budget" in err and "config.json" not in err, err
    saved = json.loads((out / "config.json").read_text())
    saved["search"]["min_throughput"] = "zz"  # a bad saved budget: the file and the setting, not a flag
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["search", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'config.json'}: search.min_throughput 'zz' is not a throughput" in err and "--min" not in err, err
    saved["search"]["front_speedups"] = "abc"  # mended by --front-speedups (with the budget, by --speedup)
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["search", "--out", str(out), "--speedup", "1.25", "--front-speedups", "1.25,2"]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["search"]["front_speedups"] == [1.25, 2.0]
    saved = json.loads((out / "config.json").read_text())  # the data flags mend the data settings
    calib = saved["data"]["calib_sources"]
    saved["data"]["calib_weights"], saved["data"]["eval_sources"] = [-1], calib
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["data", "--out", str(out), "--no-progress"]) == 2
    assert "appear in both calibration and evaluation sources" in capsys.readouterr().err
    assert main(["data", "--out", str(out), "--no-progress", "--calib-weights", "--eval", "package:tiny_eval.txt"]) == 0, \
        capsys.readouterr().err
    mended = json.loads((out / "config.json").read_text())["data"]
    assert mended["calib_weights"] == [] and mended["eval_sources"] == ["package:tiny_eval.txt"]


def test_a_run_whose_config_names_no_parent_is_refused_not_given_the_default_parent(tmp_path_factory, tmp_path,
                                                                                     capsys):
    """Breaker: a config.json without its "parent" section loaded the default SmolLM2 parent for a run built on
    another one (a tiny run failed with "expected 30 blocks, got 4", and `front` saved the default parent)."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    saved = json.loads((out / "config.json").read_text())
    for damage in ({k: v for k, v in saved.items() if k != "parent"}, {**saved, "parent": {"dtype": "float32"}}):
        (out / "config.json").write_text(json.dumps(damage))
        before = _files(out)
        for argv in (["realize", "--name", "child-1.5x"], ["front", "--max-contention", "inf"]):
            assert main([argv[0], "--out", str(out), *argv[1:], "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert "names no parent model" in err and len(err.strip().splitlines()) == 1, err
        assert _files(out) == before
    # --parent puts it back (the settings then match the run's work again: nothing is redone)
    assert main(["score", "--out", str(out), "--parent", "tiny", "--max-contention", "inf", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["parent"]["path"] == "tiny"
    # ...but another model is refused by every stage once a library exists (score discarded the scores and rescored
    # the library against it; realize built children of the other model's weights and this library)
    assert main(["export", "--out", str(out), "--name", "child-1.5x", "--dest", str(tmp_path / "p"), "--no-progress"]) == 0
    before, _ = _files(out), capsys.readouterr()
    for argv in (["score", "--max-contention", "inf"], ["data"]):
        assert main([argv[0], "--out", str(out), *argv[1:], "--parent", str(tmp_path / "p"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "was built from another parent" in err and len(err.strip().splitlines()) == 1, err
    assert _files(out) == before
    # `puzzle eval RUN --child` rebuilds children from the run's library too: it checks the same (breaker)
    from puzzle.errors import PuzzleError
    from puzzle.scoring.harness import load_eval_model

    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "parent": {**saved["parent"], "path": str(tmp_path / "p")}}))
    with pytest.raises(PuzzleError, match="was built from another parent"):
        load_eval_model(str(out), child="child-1.5x")
    (out / "config.json").write_text(json.dumps(saved))
    # an empty --parent (e.g. "$MODEL" with MODEL unset) is refused, not read as no flag
    for argv in (["score", "--out", str(out)], ["run", "--preset", "tiny", "--out", str(tmp_path / "new")]):
        assert main([*argv, "--parent", "", "--no-progress"]) == 2
        assert "--parent is empty" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_search_reads_its_score_table_once(tmp_path_factory, tmp_path, monkeypatch):
    from puzzle import pipeline
    from puzzle.config import load_run_config

    out = _copy(tmp_path_factory, tmp_path)
    config = load_run_config(out).replace(search={"front_speedups": (1.25, 1e9)})  # one out of reach
    run = pipeline.Run(out, config, progress=False)
    expected = pipeline.largest_front_speedup(run)
    read = []
    load = pipeline.load_score_table
    monkeypatch.setattr(pipeline, "load_score_table", lambda run, stage="bld": read.append(stage) or load(run, stage))
    pipeline.stage_search(run)
    assert read.count("bld") == 1, read
    chosen = json.loads((out / "search" / "chosen.json").read_text())
    assert chosen["unreachable_front"]["largest_speedup"] == pytest.approx(expected, rel=1e-12)
    read.clear()
    assert pipeline.largest_front_speedup(run, load(run, "bld")) == pytest.approx(expected, rel=1e-12)
    assert read == []  # the table the caller holds
    assert pipeline.largest_front_speedup(run) == pytest.approx(expected, rel=1e-12) and read == ["bld"]


def test_the_reports_targets_out_of_reach_follow_the_search(tmp_path_factory, tmp_path):
    """report.md (written by `puzzle run`) names the front targets out of reach as the latest search found them:
    `puzzle front` and `puzzle search` with other --front-speedups add, change or remove that section."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    head = "# Puzzle run\n\n## Summary\n\n| name |\n|---|\n| parent |\n\n"
    tail = "## Time per stage (s)\n\n{\n \"data_s\": 1.0\n}\n"
    (out / "report.md").write_text(head + tail)
    assert main(["search", "--out", str(out), "--front-speedups", "1.25,1e9"]) == 0
    report = (out / "report.md").read_text()
    section = re.search(r"## Front targets out of reach\n\n(.*)\n\n", report)
    assert section and "front target 1e+09x is out of reach" in section.group(1)
    assert report.startswith(head) and report.endswith(tail)
    assert main(["search", "--out", str(out), "--front-speedups", "1.25,2e9,3e9"]) == 0
    report = (out / "report.md").read_text()
    assert "front targets 2e+09x, 3e+09x are out of reach" in report and "1e+09x" not in report
    assert report.count("## Front targets out of reach") == 1 and report.endswith(tail)
    assert main(["search", "--out", str(out), "--front-speedups", "1.25"]) == 0
    assert (out / "report.md").read_text() == head + tail


@pytest.mark.slow
def test_front_with_other_targets_rewrites_the_reports_section(tmp_path_factory, tmp_path):
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    (out / "report.md").write_text("# Puzzle run\n\n## Time per stage (s)\n\n{}\n")
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "inf", "--front-speedups",
                 "1.25,1e9"]) == 0
    assert "front target 1e+09x is out of reach" in (out / "report.md").read_text()


@pytest.mark.parametrize("weights", [["1", "-inf"], ["-inf", "1"], ["1", "-1e3"], ["1", "-Infinity"]])
def test_negative_weights_in_any_spelling_get_the_weights_message(tmp_path, capsys, weights):
    from puzzle.cli import main

    out = tmp_path / "run"
    code = main(["data", "--preset", "tiny", "--out", str(out), "--calib", "a.txt", "b.txt", "--calib-weights", *weights])
    err = capsys.readouterr().err
    assert code == 2 and "positive finite" in err and "config.json" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_negative_numbers_reach_the_other_value_checks(tmp_path, capsys):
    from puzzle.cli import main

    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), "--max-contention", "-inf"]) == 2
    assert "--max-contention must be a number of cores > 0" in capsys.readouterr().err
    for flag, value, words in [("--max-params", "-5M", "--max-params '-5M'"), ("--max-decode", "-1ms", "--max-decode '-1ms'"),
                               ("--min-throughput", "-1x", "--min-throughput '-1x'"), ("--front-speedups", "-1,2", "'-1,2'"),
                               ("--max-memory", "-.5", "--max-memory '-.5'")]:  # a unit or a list after the minus sign
        assert main(["run", "--preset", "tiny", "--out", str(out), flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("puzzle: error: ") and words in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):  # argparse's own message for its type check, with the value as given
        main(["run", "--preset", "tiny", "--out", str(out), "--speedup", "-1e3"])
    assert "'-1e3' is not a speed-up" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag,value,words", [("--max-contention", "0", "got 0"), ("--max-contention", "-1", "got -1"),
                                              ("--max-contention", "nan", "got nan"),
                                              ("--max-contention", "-inf", "got -inf"),
                                              ("--bld-tokens", "-5", "got -5"), ("--batch-size", "0", "got 0"),
                                              ("--device", "tpu", "got 'tpu'")])
def test_a_number_flag_out_of_range_is_named_as_the_flag(tmp_path, capsys, flag, value, words):
    """The message names the flag the user gave and its value, not the configuration's setting (score.max_contention,
    with a remark on the Python API) or a list of settings without the value (bld.tokens, bld.batch_size, bld.lr)."""
    from puzzle.cli import main

    out = tmp_path / "run"
    for argv in (["run", "--preset", "tiny"], ["score", "--preset", "tiny"]):
        assert main([*argv, "--out", str(out), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"puzzle: error: {flag} must be ") and words in err, err
        assert "Python API" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("command,folder", [("data", "data"), ("search", "search"), ("realize", "children"),
                                            ("front", "children")])
def test_a_file_where_a_run_folder_belongs_is_named(tmp_path_factory, tmp_path, capsys, command, folder):
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    if (out / folder).exists():
        shutil.rmtree(out / folder)
    (out / folder).write_text("x")
    before = _files(out)
    extra = {"search": ["--speedup", "2"], "realize": ["--name", "child-1.5x", "--max-contention", "inf"],
             "front": ["--max-contention", "inf"]}.get(command, [])
    assert main([command, "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"puzzle: error: {out / folder} is a file where a folder belongs; move it away\n", err
    assert _files(out) == before


@pytest.mark.parametrize("failure", [KeyboardInterrupt, "refused"])
def test_a_front_that_fails_keeps_its_settings_exactly_when_it_keeps_its_search(tmp_path_factory, tmp_path,
                                                                                monkeypatch, capsys, failure):
    """`puzzle front --front-speedups ...` that fails before its search writes leaves the run as it was; one that fails
    after (timing refused under contention, Ctrl-C, perhaps after the budget feedback re-solved records on measured
    speed) keeps the new settings with the search's files, so config.json, search/ and what was measured from them
    agree (restoring search/ alone left summary.csv naming children the records no longer held)."""
    from puzzle import pipeline
    from puzzle.cli import main
    from puzzle.errors import PuzzleError

    def error():
        return failure() if failure is KeyboardInterrupt else PuzzleError("other processes kept up to 1.00 cores busy")

    args = ["front", "--out", None, "--no-progress", "--front-speedups", "1.25,1.3,1e9"]
    code = 130 if failure is KeyboardInterrupt else 2

    out = _copy(tmp_path_factory, tmp_path)  # before the search writes: as it was
    before = {k: v for k, v in _files(out).items() if k != "timings.json"}
    monkeypatch.setattr(pipeline, "main_budget_request", lambda run: (_ for _ in ()).throw(error()))
    assert main([args[0], args[1], str(out), *args[3:]]) == code, capsys.readouterr().err
    assert {k: v for k, v in _files(out).items() if k != "timings.json"} == before
    monkeypatch.undo()

    out = tmp_path / "run2"  # after: the new settings with their choices
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)

    def fail(run, records):
        assert (out / "search" / "child-1.3x.json").is_file()  # the search wrote its files before this step
        raise error()

    monkeypatch.setattr(pipeline, "realize_and_measure", fail)
    assert main([args[0], args[1], str(out), *args[3:]]) == code, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    chosen = json.loads((out / "search" / "chosen.json").read_text())
    assert config["search"]["front_speedups"] == [1.25, 1.3, 1e9]
    assert "child-1.3x" in chosen["names"] and chosen["unreachable_front"]["targets"] == ["1e+09"]


@pytest.mark.parametrize("name", ["front.png", "search/chosen.json", "children/budget_feedback.json"])
def test_a_folder_where_a_run_file_belongs_is_named_before_any_work(tmp_path_factory, tmp_path, capsys, name):
    """DIR/front.png (or another file a stage renames into place after its work) being a folder is refused in one
    line before anything is measured (was an IsADirectoryError traceback, or an error, after the whole front)."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    (out / name).unlink(missing_ok=True)
    (out / name).mkdir(parents=True)
    (out / name / "keep").write_text("x")
    before = _files(out)
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "inf", "--remeasure"]) == 2
    err = capsys.readouterr().err
    assert err == f"puzzle: error: {out / name} is a folder where a file belongs; move it away\n", err
    assert _files(out) == before


def test_a_feedback_re_solve_is_not_written_before_its_round_is_decided(tmp_path_factory, tmp_path, monkeypatch):
    """The budget feedback re-solves a child before measuring it; interrupted then, DIR/search/ must still hold the
    measured records (an unchecked re-solve there was what `export` and `realize` then built)."""
    from puzzle import feedback, pipeline
    from puzzle.baselines import open_run
    from puzzle.budgets import Budgets

    out = _copy(tmp_path_factory, tmp_path)
    run = open_run(out, progress=False)
    names = json.loads((out / "search" / "chosen.json").read_text())["names"]
    records = {n: json.loads((out / "search" / f"{n}.json").read_text()) for n in names}
    before = _files(out / "search")
    resolved = []

    def interrupted_after_a_re_solve(records, measure, resolve, **kwargs):
        name, record = next(iter(records.items()))
        resolved.append(resolve(name, record, Budgets.from_dict(record["budgets"])))  # settle passes table limits
        raise KeyboardInterrupt

    monkeypatch.setattr(feedback, "settle", interrupted_after_a_re_solve)
    with pytest.raises(KeyboardInterrupt):
        pipeline.realize_and_measure(run, records)
    assert resolved and "choice" in resolved[0] and _files(out / "search") == before


def test_argparse_refusals_and_feedback_rounds_are_one_line(tmp_path_factory, tmp_path, capsys):
    """A flag argparse itself refuses is one `puzzle: error:` line (not the usage block) with exit 2, and an
    out-of-range --budget-feedback is named as the flag."""
    from puzzle.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["search", "--out", str(tmp_path), "--speedup", "-2"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("puzzle: error: argument --speedup: '-2' is not a speed-up")
    assert len(err.strip().splitlines()) == 1 and "`puzzle search --help` lists the options" in err
    with pytest.raises(SystemExit) as exited:  # an unknown word: the command's own --help, not `puzzle --help`
        main(["run", "--out", str(tmp_path / "new"), "--bogus"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and not (tmp_path / "new").exists()
    assert err == "puzzle: error: unrecognized arguments: --bogus (`puzzle run --help` lists the options)\n", err
    out = _copy(tmp_path_factory, tmp_path)
    before = _files(out)
    assert main(["front", "--out", str(out), "--no-progress", "--budget-feedback", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("puzzle: error: --budget-feedback must be a whole number") and "got -1" in err, err
    assert _files(out) == before


def test_an_interrupted_command_takes_back_a_new_out_holding_only_bookkeeping(tmp_path, monkeypatch, capsys):
    """Ctrl-C before any stage finished work in a new --out removes it again, as a refusal does."""
    from puzzle import pipeline
    from puzzle.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "stage_data", interrupted)
    out = tmp_path / "new" / "run"
    capsys.readouterr()
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 130
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err  # not "finished work is saved": there was none
    assert err.endswith(f"puzzle: interrupted; nothing was finished, and {out} was not made\n"), err  # (breaker:
    (tmp_path / "mine").mkdir()  # "is as it was" of a folder never made); a folder of the user's is as it was
    assert main(["data", "--preset", "tiny", "--out", str(tmp_path / "mine"), "--no-progress"]) == 130
    assert capsys.readouterr().err.endswith(f"nothing was finished, so {tmp_path / 'mine'} is as it was\n")
    (tmp_path / "mine").rmdir()
    import puzzle.cli

    monkeypatch.setattr(puzzle.cli, "_resolve_config", interrupted)  # before the folder is made (breaker: the
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 130  # line said work was saved)
    assert not (tmp_path / "new").exists()
    err = capsys.readouterr().err
    assert err.endswith(f"puzzle: interrupted; nothing was finished, and {out} was not made\n"), err
    monkeypatch.setattr(puzzle.cli, "_stage_run", interrupted)  # before any stage's run was opened (breaker: 1 s in)
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err.endswith(f"puzzle: interrupted; nothing was finished, and {out} was not made\n")


def test_the_parent_weights_hash_ignores_the_path_and_sees_weights_and_dtype():
    """Breaker: the fingerprint the parent check first used hashed the path as typed (a moved parent, or one named by
    another path, locked the run out) and only the norm weights (another model with the same norms passed)."""
    import dataclasses

    import torch

    from puzzle.pipeline import weights_sha
    from puzzle.tiny import tiny_parent

    model = tiny_parent().model
    base = weights_sha(model)
    model.config = dataclasses.replace(model.config, extra={**model.config.extra, "path": "/elsewhere/parent"})
    assert weights_sha(model) == base
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "mlp" in n).view(-1)[0] += 1e-3  # not a norm weight
    assert weights_sha(model) != base
    assert weights_sha(tiny_parent().model.to(torch.bfloat16)) != base


def test_a_damaged_library_meta_is_written_again_from_its_entries_or_one_line_not_a_traceback(tmp_path_factory,
                                                                                              tmp_path, capsys):
    """Breaker: an empty or non-object DIR/library/meta.json gave a JSONDecodeError or AttributeError traceback in bld.
    Stop 76's leftover: the whole library then had to be deleted; entries that all record the run's settings
    (`library_meta_sha`) have it written again."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    meta = (out / "library" / "meta.json").read_bytes()
    for text in ("", "[1, 2]", '{"parent":', None):
        if text is None:
            (out / "library" / "meta.json").unlink()
        else:
            (out / "library" / "meta.json").write_text(text)
        assert main(["bld", "--out", str(out), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "records the parent and settings it was built for, and they all match this run's, so it is written " \
               "again" in err, err
        assert json.loads((out / "library" / "meta.json").read_bytes()) == json.loads(meta)
    info = next((out / "library" / "entries").glob("L*/*.json"))  # an entry of an earlier version: no record
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "library_meta_sha"}))
    for text in ("", "[1, 2]", '{"parent":'):
        (out / "library" / "meta.json").write_text(text)
        assert main(["bld", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "meta.json is damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("earlier", ["with weights hash", "before the weights hash"])
def test_a_moved_parent_keeps_the_library_scores_and_evaluations(tmp_path_factory, tmp_path, capsys, monkeypatch,
                                                                 earlier):
    """Breaker: the parent fingerprint in library/meta.json, score/quality_meta.json, the parent samples and the
    evaluation cache hashed the load path as typed, so a moved parent folder (or one named otherwise, as --parent is
    now saved absolute) locked `puzzle bld` out of its own library and discarded every replace-1-block result. Runs
    recorded under that fingerprint are adopted: after a move by the fingerprint parent.json records next to the same
    weights hash; for a run recorded before that hash, by the old formula of the config parent.json recorded."""
    from puzzle.cli import main
    from puzzle.export import export_checkpoint
    from puzzle.parent import load_parent
    from puzzle.pipeline import _fingerprint_records, fingerprint, legacy_fingerprint
    from puzzle.tiny import tiny_parent

    out = _copy(tmp_path_factory, tmp_path)
    assert main(["realize", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0  # children/*.quality.json
    tiny = tiny_parent()
    export_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    was = load_parent("a")  # as an earlier version loaded `--parent a`: the path as typed
    old = legacy_fingerprint(was.model)
    config = json.loads((out / "config.json").read_text())
    config["parent"]["path"] = "a"
    (out / "config.json").write_text(json.dumps(config))
    parent_json = {**json.loads((out / "parent.json").read_text()), "fingerprint": old, "config": was.config.to_dict()}
    if earlier == "before the weights hash":
        del parent_json["weights_sha256"]
    (out / "parent.json").write_text(json.dumps(parent_json))
    records = [(p, keys) for p, keys in _fingerprint_records(out) if p.is_file()]
    assert len(records) >= 3, records
    for path, keys in records:
        record = json.loads(path.read_text())
        holder = record
        for key in keys[:-1]:
            holder = holder[key]
        holder[keys[-1]] = old
        path.write_text(json.dumps(record))
    if earlier == "with weights hash":  # moved
        shutil.move(tmp_path / "a", tmp_path / "b")
        given = str(tmp_path / "b")
    else:  # named as before, saved absolute now
        given = "a"
    capsys.readouterr()
    assert main(["bld", "--out", str(out), "--parent", given, "--no-progress"]) == 0
    assert main(["score", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "discarded" not in err and "built with other settings" not in err, err
    new = fingerprint(tiny.model)
    for path, keys in records:
        holder = json.loads(path.read_text())
        for key in keys:
            holder = holder[key]
        assert holder == new, path


def test_a_relative_parent_is_saved_absolute(tmp_path, monkeypatch):
    """Breaker: `--parent p` was saved as "p", so a later command started in another folder found no parent."""
    from puzzle.cli import _resolve_config, build_parser

    monkeypatch.chdir(tmp_path)

    def parent(*flags):
        args = build_parser().parse_args(["data", "--out", str(tmp_path / "run"), "--preset", "tiny", *flags])
        return _resolve_config(args, tmp_path / "run").parent.path

    assert parent("--parent", "p") == str(tmp_path / "p")
    assert parent("--parent", "models/../p/") == str(tmp_path / "p")
    assert parent("--parent", "tiny") == "tiny" and parent("--parent", "asset:smollm2-135m") == "asset:smollm2-135m"
    assert parent() == "tiny"  # the preset's
    (tmp_path / "tiny").mkdir()  # a folder called tiny here: --parent tiny names it, as in eval, gkd, sft and rpo
    assert parent("--parent", "tiny") == str(tmp_path / "tiny")


def test_a_moved_parent_is_named_with_the_command_that_gives_its_new_path(tmp_path_factory, tmp_path, capsys):
    """Breaker: the message told `realize` (and `eval DIR --child`, which did not name the run) to use --parent,
    which only run, data, bld and score take."""
    from puzzle.cli import main
    from puzzle.export import export_checkpoint
    from puzzle.tiny import tiny_parent

    out = _copy(tmp_path_factory, tmp_path)
    tiny = tiny_parent()
    export_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "a")  # the same weights in a folder
    config = json.loads((out / "config.json").read_text())
    config["parent"]["path"] = str(tmp_path / "a")
    (out / "config.json").write_text(json.dumps(config))
    shutil.move(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    for argv in (["realize", "--out", str(out)], ["eval", str(out), "--child", "parent", "--out", str(tmp_path / "e.csv")]):
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert f"the run's parent {tmp_path / 'a'} does not exist" in err, err
        assert f"`puzzle data --out {out} --parent NEW_PATH`" in err and err.count("puzzle: error") == 1, err
    assert main(["data", "--out", str(out), "--parent", str(tmp_path / "b"), "--no-progress"]) == 0  # as it says
    assert main(["realize", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0


def test_scores_are_not_discarded_for_the_parent_identity_alone(tmp_path_factory, tmp_path, capsys):
    """Review: a parent fingerprint the run could not adopt made `puzzle score` delete every replace-1-block result;
    it refuses instead, and deleting the named file scores afresh."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    meta = json.loads((out / "score" / "quality_meta.json").read_text())
    meta["library"]["parent"] = "0123456789abcdef"
    (out / "score" / "quality_meta.json").write_text(json.dumps(meta))
    results = lambda: {k: v for k, v in _files(out / "score").items() if "quality" in k}  # noqa: E731
    before = results()
    assert len(before) >= 3
    assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 2
    err = capsys.readouterr().err
    assert "were computed for another parent (fingerprint 0123456789abcdef" in err, err
    assert results() == before  # the cost table may be timed again first; the results stay


def test_damaged_score_records_keep_the_replace_one_block_results(tmp_path_factory, tmp_path, capsys):
    """Breaker: a truncated score/quality_meta.json discarded every replace-1-block result as "changed" (a missing
    one keeps them), and a truncated score/parent_quality.json stopped the run (it is cheap to compute again)."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    results = lambda: {k: v for k, v in _files(out / "score").items() if k.startswith("quality_") and k.endswith(".jsonl")}  # noqa: E731
    quality = lambda: pd.read_csv(out / "score" / "score_table.csv")[["kl_nats", "lm_loss", "cosine"]]  # noqa: E731
    before, table = results(), quality()  # (the cost table may be timed again, as above: its columns can move)
    meta_path, parent_path = out / "score" / "quality_meta.json", out / "score" / "parent_quality.json"
    meta, parent = meta_path.read_bytes(), parent_path.read_bytes()
    assert before
    meta_path.write_bytes(meta[:len(meta) // 2])
    parent_path.write_bytes(parent[:len(parent) // 2])
    assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    err = capsys.readouterr().err
    assert f"{meta_path} is damaged" in err and "results beside it are kept" in err, err
    assert f"{parent_path} is damaged; the parent's loss on the scoring tokens is computed again" in err, err
    assert "earlier replace-1-block results were discarded" not in err
    assert results() == before and meta_path.read_bytes() == meta
    assert json.loads(parent_path.read_text()) == json.loads(parent)  # the same loss, computed again
    pd.testing.assert_frame_equal(quality(), table)
    # results of other settings are discarded, and the setting is named (breaker: "the scoring settings changed")
    from puzzle.config import load_run_config
    from puzzle.pipeline import Run, check_score_meta

    saved = json.loads(meta)
    meta_path.write_text(json.dumps({**saved, "position_stride": saved["position_stride"] + 1,
                                     "score_tokens_sha": "0" * 16}))
    said = []
    run = Run(out, load_run_config(out), progress=False)
    run.say = said.append
    check_score_meta(run)
    assert any(m.startswith("score: the library, the scoring text or the scoring settings changed (position_stride: "
                            f"{saved['position_stride'] + 1} -> {saved['position_stride']}; score_tokens_sha (the "
                            "scoring text: score.tokens or the data)); earlier") for m in said), said
    assert not results()
    for damaged in (b"[]", b'{"library": 3}'):  # valid JSON, not the record: damaged alike
        meta_path.write_bytes(damaged)
        assert main(["score", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
        assert "is damaged" in capsys.readouterr().err and results() == before and meta_path.read_bytes() == meta


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_without_parent_json_the_library_names_its_parent(tmp_path_factory, tmp_path, capsys, damage):
    """Breaker: with DIR/parent.json missing or damaged, another parent was accepted and realize measured the
    children against it; the library's meta.json now decides, and the run's own parent still passes."""
    from puzzle.cli import main
    from puzzle.export import export_checkpoint
    from puzzle.tiny import tiny_parent

    out = _copy(tmp_path_factory, tmp_path)
    other = tiny_parent(seed=1)
    export_checkpoint(other.model, other.tokenizer, tmp_path / "other")
    if damage == "missing":
        (out / "parent.json").unlink()
    else:
        (out / "parent.json").write_text('{"fingerprint": ')
    before = _files(out)
    capsys.readouterr()
    assert main(["data", "--out", str(out), "--parent", str(tmp_path / "other"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was built from another parent than" in err and "is missing or damaged" in err, err
    assert _files(out) == before
    assert main(["realize", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0  # its own: tiny


def test_a_searched_child_outside_the_space_names_its_file(tmp_path_factory, tmp_path, capsys):
    """Breaker: a hand-edited search/<name>.json with a variant the run never built said the library entry was
    missing and to run `puzzle bld` (which had nothing to build), or named no file for impossible KV heads."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    path = out / "search" / "child-1.5x.json"
    record = json.loads(path.read_text())
    for first, words in (("attn-kv3+ffn-linear", "layer 0 chooses attn-kv3"),
                         ("attn-kv9+ffn-noop", "layer 0 chooses attn-kv9")):
        path.write_text(json.dumps({**record, "choice": [first, *record["choice"][1:]]}))
        for argv in (["realize", "--out", str(out), "--name", "child-1.5x", "--max-contention", "inf"],
                     ["export", "--out", str(out), "--name", "child-1.5x", "--dest", str(tmp_path / "x")]):
            assert main([*argv, "--no-progress"]) == 2, argv
            err = capsys.readouterr().err
            assert f"{path}: {words}" in err and "puzzle bld" not in err and err.count("puzzle: error") == 1, err
    path.write_text(json.dumps({**record, "choice": record["choice"][1:]}))
    assert main(["realize", "--out", str(out), "--name", "child-1.5x", "--no-progress"]) == 2
    assert "for a parent of" in capsys.readouterr().err


@pytest.mark.parametrize("section, key, value, words", [
    ("data", "seq_len", 64.5, "data.seq_len must be a whole number >= 2, got 64.5"),
    ("data", "seq_len", '"64"', "data.seq_len must be a whole number >= 2, got '64'"),
    ("data", "calib_tokens", 4096.5, "data.calib_tokens must be a whole number >= 1"),
    ("data", "seed", 99999999999999999999, "data.seed (--seed) must be below 2**63"),  # reviewer: BLD overflowed
    ("report", "max_new_tokens", 12.5, "report.max_new_tokens must be a whole number >= 1"),
    ("report", "max_new_tokens", 0, "report.max_new_tokens must be a whole number >= 1"),
    ("report", "prompts", '"hello"', "report.prompts must be a list of strings"),
])
def test_settings_that_are_not_whole_numbers_or_lists_are_one_line_before_any_work(tmp_path, capsys, section, key,
                                                                                     value, words):
    """Breaker: seq_len 64.5 was a TypeError deep in packing (leaving the new --out behind), report.max_new_tokens
    12.5 a traceback at the run's very end, and prompts = "hello" five one-letter prompts."""
    from importlib import resources

    from puzzle.cli import main

    out_lines, inside = [], None
    for line in (resources.files("puzzle.presets") / "tiny.toml").read_text().splitlines():  # the value set there
        if line.strip().startswith("[") and line.strip().endswith("]"):
            inside = line.strip()[1:-1]
        if inside == section and line.split("=")[0].strip() == key:
            continue
        out_lines.append(line)
        if line.strip() == f"[{section}]":
            out_lines.append(f"{key} = {value}")
    preset = tmp_path / "p.toml"
    preset.write_text("\n".join(out_lines) + "\n")
    assert main(["data", "--preset", str(preset), "--out", str(tmp_path / "new"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("puzzle: error") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()


def test_other_calibration_text_does_not_replace_the_splits_a_library_was_trained_on(tmp_path_factory, tmp_path,
                                                                                       capsys):
    """Breaker: a rerun after the calibration text changed re-packed DIR/data and then failed in bld, leaving the
    library on other text than its run's splits (and `score` then scored with it)."""
    from puzzle.cli import main
    from puzzle.data import packaged_text_path

    out = _copy(tmp_path_factory, tmp_path)
    text = packaged_text_path("tiny_corpus.txt").read_text()
    (tmp_path / "other.txt").write_text(text.replace("e", "E"))  # every document changes
    before = _files(out / "data")
    for command in ("data", "score"):
        assert main([command, "--out", str(out), "--calib", str(tmp_path / "other.txt"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "differs from the one the library" in err and "is left as it is" in err, err
        assert "changed since: data.calib_sources, or the evaluation text" in err, err  # (breaker: named none)
        assert "packed them again" not in err and "other sources" not in err  # breaker: said before the refusal
        assert _files(out / "data") == before


def test_another_sequence_length_does_not_replace_the_splits_the_stages_used(tmp_path_factory, tmp_path):
    """Breaker: data.seq_len 64 -> 32 repacked DIR/data and kept the library and scores of 64-token sequences (their
    keys hash the token stream, which a new length alone leaves as it was)."""
    from puzzle.config import load_run_config
    from puzzle.errors import PuzzleError
    from puzzle.pipeline import Run

    out = _copy(tmp_path_factory, tmp_path)
    config = load_run_config(out)
    length = config.data.seq_len
    before = _files(out / "data")
    run = Run(out, config.replace(data={"seq_len": length // 2}), progress=False)
    with pytest.raises(PuzzleError, match=rf"calib {length} -> {length // 2}, .*library/entries, .*is left as it is"):
        run.tokens  # noqa: B018 (packed here)
    assert _files(out / "data") == before
    shutil.rmtree(out / "library"), shutil.rmtree(out / "score"), shutil.rmtree(out / "children", ignore_errors=True)
    assert Run(out, config.replace(data={"seq_len": length // 2}), progress=False).tokens.calib.shape[1] == length // 2


def test_a_config_json_without_a_work_section_is_refused(tmp_path_factory, tmp_path, capsys):
    """Breaker: a config.json whose "score" section was removed got the demo's defaults; front then re-solved on a
    score table made with other settings and saved them, and score then discarded every result."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["score"]
    (out / "config.json").write_text(json.dumps(config))
    before = _files(out)
    for argv in (["front", "--max-contention", "inf"], ["score"], ["search"]):
        assert main([argv[0], "--out", str(out), *argv[1:], "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "has no 'score' section" in err and err.count("puzzle: error") == 1, err
        assert _files(out) == before


def test_score_refuses_a_library_bld_refuses(tmp_path_factory, tmp_path, capsys):
    """Breaker: with a library built on other calibration text, bld refused it but score rescored with it."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    meta = json.loads((out / "library" / "meta.json").read_text())
    (out / "library" / "meta.json").write_text(json.dumps({**meta, "calib_sha": "0" * 16}))
    results = {k: v for k, v in _files(out / "score").items() if "quality" in k}
    for command in ("bld", "score"):
        assert main([command, "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 2
        assert "was built with other settings (differing: calib_sha" in capsys.readouterr().err
    assert {k: v for k, v in _files(out / "score").items() if "quality" in k} == results


def test_a_saved_objective_the_table_lacks_is_named_with_the_flag_that_sets_another(tmp_path_factory, tmp_path,
                                                                                    capsys):
    """Breaker: objective "foo" in config.json failed `puzzle run` and `export` with "objective columns ['foo'] are
    not numeric columns ..." naming neither the file nor a way out (`run` has no --objective)."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    saved = json.loads((out / "config.json").read_text())
    saved["search"]["objective"] = "foo"
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["search", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "search.objective 'foo' (--objective, or saved in" in err and f"--out {out} --objective kl_nats" in err, err
    assert main(["search", "--out", str(out), "--objective", "kl_nats=1,lm_loss=0.5"]) == 0, capsys.readouterr().err


def test_a_search_record_solved_on_an_earlier_score_table_is_said(tmp_path_factory, tmp_path, capsys):
    """Review: a search record of an earlier front (or one solved before `puzzle score` ran again) was realized and
    exported without a word that its predicted totals came from another score table."""
    from puzzle.cli import main
    from puzzle.config import load_run_config
    from puzzle.pipeline import Run, read_architecture

    out = _copy(tmp_path_factory, tmp_path)
    run = Run(out, load_run_config(out), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_architecture(run, "child-1.5x")  # the table it was solved on
    table = out / "score" / "score_table.csv"
    table.write_text(table.read_text() + "\n")  # scored again: other bytes
    reseal_table(table)
    with pytest.warns(UserWarning, match=re.escape(f"{out / 'search' / 'child-1.5x.json'} was solved on another score "
                                                   f"table than {table} holds now")):
        read_architecture(run, "child-1.5x")
    assert main(["export", "--out", str(out), "--name", "child-1.5x"]) == 0
    assert "puzzle: warning: " in (err := capsys.readouterr().err) and "was solved on another score table" in err
    assert err.count("was solved on another score table") == 1  # once, though the export reads the record 3 times


def test_a_search_record_edited_by_hand_is_refused_before_any_work(tmp_path_factory, tmp_path, capsys):
    """Breaker: a record whose choice was edited was realized and exported beside the old choice's predictions (the
    speed-up's miss put down to a busy machine); runtime_ms "abc" or speedup null ended in a traceback after the
    child was evaluated and timed; a record that is not an object listed itself among the names to choose."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    path = out / "search" / "child-1.5x.json"
    good = json.loads(path.read_text())
    edits = {"choice": {**good, "choice": ["attn-noop+ffn-noop"] * len(good["choice"])},
             "runtime_ms": {**good, "runtime_ms": "abc"}, "speedup": {**good, "speedup": None},
             "kl_nats": {**good, "kl_nats": "x"}}
    for edited, record in edits.items():
        path.write_text(json.dumps(record))
        assert main(["realize", "--out", str(out), "--name", "child-1.5x", "--no-progress"]) == 2, edited
        err = capsys.readouterr().err
        want = "disagree on the score table it was solved on" if edited == "choice" else f"{edited} = "
        assert want in err and "delete it and run `puzzle search` again" in err.replace("the file", "it"), err
        assert not (out / "children" / "realized" / "child-1.5x.json").exists(), edited
    path.write_text("[]")
    assert main(["export", "--out", str(out), "--name", "child-1.5x"]) == 2
    err = capsys.readouterr().err
    assert "is not an architecture record (no 'choice' list); delete it and run `puzzle search` again" in err
    assert "'child-1.5x'" not in err and "'child-1.25x'" in err, err
    path.write_text(json.dumps(good))
    capsys.readouterr()
    assert main(["export", "--out", str(out), "--name", "child-1.5x"]) == 0


def test_a_preset_over_a_saved_configuration_names_the_settings_it_replaces(tmp_path, capsys):
    """Breaker: a setting edited by hand in config.json went back to the preset's value without a word."""
    from puzzle.cli import main

    out = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    saved["bld"]["lr"] = 0.01
    (out / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "--preset tiny replaces settings saved in" in err and "bld.lr 0.01 -> 0.001" in err and "seed" not in err
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert "replaces settings" not in capsys.readouterr().err  # saved as the preset now


def test_a_failed_command_keeps_the_settings_of_the_work_it_wrote(tmp_path, monkeypatch, capsys):
    """Reviewer: `puzzle run --out D --seed 7 --speedup 1000` packed the data with seed 7, then failed at the search;
    config.json went back to seed 0 beside the seed-7 splits, and every later stage refused, advising to delete the
    work. A failure after a stage wrote work keeps that work's settings (the search settings as saved); one that
    wrote none still puts config.json back byte for byte."""
    from puzzle.cli import main
    from puzzle.config import load_run_config
    from puzzle.errors import PuzzleError

    out = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    saved = load_run_config(out)

    def packs_then_fails(run, **kwargs):
        run.tokens  # the data stage's work, with this command's seed
        raise PuzzleError("refused after packing")

    monkeypatch.setattr("puzzle.pipeline.stage_bld", packs_then_fails)
    assert main(["run", "--out", str(out), "--no-progress", "--seed", "7", "--speedup", "3", "--prompt-len", "40"]) == 2
    assert "refused after packing" in capsys.readouterr().err
    kept = load_run_config(out)
    assert kept.data.seed == 7 and kept.search == saved.search and kept.search.speedup != 3
    # the sections of stages that wrote nothing stay as saved (code review: the target and BLD seed were kept too)
    assert kept.bld == saved.bld and kept.target == saved.target and kept.target.prompt_len != 40
    assert json.loads((out / "data" / "manifest.json").read_text())["settings"]["seed"] == 7  # as the splits were packed
    before = (out / "config.json").read_bytes()

    def fails(run, **kwargs):
        raise PuzzleError("refused before any work")

    monkeypatch.setattr("puzzle.pipeline.stage_bld", fails)
    assert main(["run", "--out", str(out), "--no-progress", "--bld-tokens", "4096", "--speedup", "3"]) == 2
    assert (out / "config.json").read_bytes() == before


def test_refusals_over_a_library_name_the_settings_that_changed(tmp_path_factory, tmp_path, capsys):
    """Breaker: `data --seed 7` said only "the data settings changed", `bld --bld-tokens 1024` "(bld differ)"."""
    from puzzle.cli import main
    from puzzle.config import load_run_config

    out = _copy(tmp_path_factory, tmp_path)
    seed, tokens = load_run_config(out).data.seed, load_run_config(out).bld.tokens
    assert main(["data", "--out", str(out), "--no-progress", "--seed", str(seed + 7)]) == 2
    assert f"changed since: data.seed: {seed} -> {seed + 7}" in capsys.readouterr().err
    assert main(["bld", "--out", str(out), "--no-progress", "--bld-tokens", str(tokens * 2)]) == 2
    assert f"bld.tokens: {tokens} -> {tokens * 2}" in capsys.readouterr().err


def test_children_of_an_earlier_front_are_named_not_dropped_silently(tmp_path_factory, tmp_path, capsys):
    """Reviewer: after another --speedup or --front-speedups, the earlier children's records and exports stayed
    beside the current ones without a word."""
    from puzzle.cli import main
    from puzzle.errors import PuzzleError
    from puzzle.pipeline import read_architecture_at

    out = _copy(tmp_path_factory, tmp_path)
    assert main(["search", "--out", str(out), "--speedup", "1.3", "--front-speedups", "1.25", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "child-1.5x-init, child-1.5x are children of an earlier budget" in err and "stay as they were" in err, err
    assert (out / "search" / "child-1.5x.json").is_file()  # kept: a user's files are not deleted
    # the run's own children are told from the earlier ones
    with pytest.raises(PuzzleError, match=r"choose one of the run's searched children \['child-1.3x', "
                                          r"'child-1.3x-init', 'child-1.25x'\] \(the others there, \['child-1.5x'"):
        read_architecture_at(out, "nope")  # breaker: refine offered an earlier --front-speedups's children alike
    assert main(["search", "--out", str(out), "--speedup", "1.5", "--front-speedups", "1.25,1.5,2",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err  # back: the 1.3x children are the earlier ones now
    assert "child-1.3x-init, child-1.3x are children of an earlier budget" in err, err
    assert "child-1.5x-init, child-1.5x are" not in err


def test_front_targets_that_give_one_child_are_named_together(tmp_path_factory, tmp_path, capsys):
    """Breaker: a budget that bound before the speed-ups made child-1.25x and child-2x one child, without a word."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    assert main(["search", "--out", str(out), "--front-speedups", "1.25,1.2501", "--no-progress"]) == 0
    records = {n: json.loads((out / "search" / f"{n}.json").read_text()) for n in ("child-1.25x", "child-1.2501x")}
    assert records["child-1.25x"]["choice"] == records["child-1.2501x"]["choice"]  # the tiny table has none between
    assert "child-1.25x and child-1.2501x are one child (the same blocks, predicted" in capsys.readouterr().err
    # timed once: one figure in every row, so the plot's one point (breaker: timed twice, 0.75x and 0.83x, two points)
    assert main(["front", "--out", str(out), "--no-progress", "--max-contention", "inf"]) == 0
    # the run's copy holds no export/: each child is named with the command that writes it (breaker: unsaid)
    assert re.search(r"front: (child-[0-9.]+x, )+child-[0-9.]+x have no export folder \(front exports nothing\): "
                     r"`puzzle run --out \S+` writes them", capsys.readouterr().err)
    summary = pd.read_csv(out / "summary.csv").set_index("name")
    for column in ("runtime_ms", "throughput_tok_s", "speedup", "kl_nats"):
        assert summary.loc["child-1.25x", column] == summary.loc["child-1.2501x", column], column
    final = json.loads((out / "children" / "budget_feedback.json").read_text())["final"]  # the paired noise of
    assert final["child-1.25x"]["se"] == final["child-1.2501x"]["se"] > 0  # the one session for both (reviewer)
    assert main(["search", "--out", str(out), "--front-speedups", "1.25,2", "--no-progress"]) == 0
    said = re.findall(r"search: (.+) are one child", capsys.readouterr().err)
    for names in said:  # only children of the same blocks (on a table timed under load, 1.25x can be the main 1.5x)
        choices = {json.dumps(json.loads((out / "search" / f"{n}.json").read_text())["choice"])
                   for n in re.split(r", | and ", names)}
        assert len(choices) == 1, said


def test_score_refuses_non_finite_results_and_cut_entries_and_records_the_tokens_it_used(tmp_path_factory, tmp_path,
                                                                                         capsys):
    """Breaker: a NaN weight scored NaN, kept in quality_bld.jsonl for good (each rerun gave the search's "lacks values"
    again); a cut weights file that was scored before passed `score`; --score-tokens 100000 was recorded while 512
    were used."""
    import torch
    from safetensors.torch import load_file, save_file

    from puzzle.cli import main
    from puzzle.io import sha256_file

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    score = ["score", "--out", str(out), "--max-contention", "inf", "--no-progress"]
    log = out / "score" / "quality_bld.jsonl"
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "kl_nats": float("nan")})
    log.write_text("\n".join(lines) + "\n{damaged\n")
    assert main(score) == 0  # the NaN result is scored again, not kept
    # the damaged line is set aside, so later commands do not warn of it again (stop 76's leftover)
    err = capsys.readouterr().err
    assert f"line {len(lines) + 1} is not a logged result" in err and "lines of quality_bld.jsonl are moved to" in err
    assert log.with_name("quality_bld.jsonl.skipped").read_text() == "{damaged\n"
    assert all(json.loads(line) for line in log.read_text().splitlines())
    table = pd.read_csv(out / "score" / "score_table.csv")
    assert table["kl_nats"].notna().all()
    entry = next(p for p in sorted((out / "library" / "entries").glob("L*/*.bld.safetensors")))
    weights = load_file(str(entry))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(entry))
    info = entry.with_name(entry.name.replace(".safetensors", ".json"))  # the sha256 matched: damage from outside
    info.write_text(json.dumps({**json.loads(info.read_text()), "sha256": sha256_file(entry)}))
    capsys.readouterr()
    assert main(score) == 2
    err = capsys.readouterr().err
    assert "scores a KL of nan" in err and f"delete {entry}" in err and "puzzle bld" in err, err
    entry.unlink()
    assert main(["bld", "--out", str(out), "--no-progress"]) == 0 and main(score) == 0
    other = next(p for p in sorted((out / "library" / "entries").glob("L*/*.bld.safetensors")) if p != entry)
    other.write_bytes(other.read_bytes()[:100])
    capsys.readouterr()
    assert main(score) == 2
    assert "lacks 1 whole entry to score" in capsys.readouterr().err
    assert main(["bld", "--out", str(out), "--no-progress"]) == 0
    assert main([*score, "--score-tokens", "100000"]) == 0
    from puzzle.baselines import open_run

    meta = json.loads((out / "score" / "score_table.csv.json").read_text())
    assert meta["score_tokens_asked"] == 100000 and meta["score_tokens"] == open_run(out).tokens.score.numel() < 100000
    assert "score.tokens asks 100000 tokens" in capsys.readouterr().err


def test_score_on_a_run_without_a_library_says_to_build_it(tmp_path, capsys):
    """Stop 76's leftover: `puzzle score --retime` on a new folder said its library's entries were "missing or cut"
    and that bld "builds them again"."""
    from puzzle.cli import main

    out = tmp_path / "new run"
    assert main(["score", "--out", str(out), "--preset", "tiny", "--retime", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the run has no block library to score yet" in err and f"run `puzzle bld --out '{out}'` first" in err, err
    assert not out.exists()  # a refused command leaves no run behind


def test_front_targets_all_out_of_reach_are_refused_with_the_run_as_it_was(tmp_path_factory, tmp_path, capsys):
    """Breaker: `--front-speedups 50` (the library reaches 7.49x) was saved to config.json and the measured front lost
    its points, where `--speedup 50` is refused with the run as it was."""
    from puzzle.cli import main

    out = _copy(tmp_path_factory, tmp_path)
    before = {p: p.read_bytes() for p in (out / "config.json", out / "search" / "chosen.json")}
    assert main(["search", "--out", str(out), "--front-speedups", "50,60", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "front targets 50x, 60x are out of reach: the largest speed-up a child of this library reaches" in err, err
    assert "as no front target is in reach, nothing was written and the run is as it was" in err
    assert {p: p.read_bytes() for p in before} == before
    assert main(["search", "--out", str(out), "--front-speedups", "1.25,50", "--no-progress"]) == 0  # one in reach
    assert "front target 50x is out of reach and left out of the front" in capsys.readouterr().err
