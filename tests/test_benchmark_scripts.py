"""benchmarks/*.py as a hostile user runs them: wrong or incomplete run directories, an --out that is a file, reused
working folders. Each script's main(argv) is called in-process on the cached tiny run."""

import json
import shutil

import pytest

from tiny_run import assert_refuses, load_benchmark, tiny_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory)


@pytest.fixture
def interrupted(run_dir, tmp_path):
    """A run stopped after its data stage and part of BLD: config, parent, data and a library, nothing scored."""
    out = tmp_path / "runi"
    out.mkdir()
    for name in ("config.json", "parent.json", "data", "library"):
        src = run_dir / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, out / name)
    return out


# gkd.py


def test_gkd_downstream_excludes_the_runs_lambada_passages(run_dir):
    """--downstream-limit N crashed after GKD: `downstream` gave used_lambada_ids a manifest dict, not the run."""
    from puzzle.baselines import open_run

    bench = load_benchmark("gkd")
    run = open_run(run_dir, progress=False)
    scores = bench.downstream(run.parent.model, run.parent.tokenizer, 1, run_dir)
    assert scores and all(0 <= v <= 1 for v in scores.values())


def test_gkd_refuses_a_working_copy_of_another_run(run_dir, tmp_path, capsys):
    """A second call with the same --work and another --run trained on a mix of both runs' files."""
    bench = load_benchmark("gkd")
    work = tmp_path / "W"
    assert bench.working_copy(run_dir, work) == work / "run"
    assert bench.working_copy(run_dir, work) == work / "run"  # the same run: reused (GKD resumes there)
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    argv = ["gkd", "--run", str(other), "--work", str(work), "--tokens", "128"]
    assert_refuses(bench, argv, f"{work / 'run'} was copied from {run_dir.resolve()}", capsys)
    # the same run rebuilt since the copy (here: another searched child)
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(run_dir, rebuilt)
    work2 = tmp_path / "W2"
    bench.working_copy(rebuilt, work2)
    (rebuilt / "search" / "chosen.json").write_text(json.dumps({"names": ["child-x"]}))
    argv = ["gkd", "--run", str(rebuilt), "--work", str(work2), "--tokens", "128"]
    assert_refuses(bench, argv, "an earlier build of", capsys)


@pytest.mark.parametrize("what", ["gkd", "sft-toggle"])
def test_gkd_names_the_run_given_and_makes_no_work_folder(what, tmp_path, capsys):
    bench = load_benchmark("gkd")
    work = tmp_path / "W"
    assert_refuses(bench, [what, "--run", str(tmp_path / "nonexist"), "--work", str(work)],
                   str(tmp_path / "nonexist" / "config.json"), capsys)
    assert not work.exists()


# runtime.py


def test_runtime_measures_a_run_of_the_builtin_tiny_parent(run_dir, tmp_path):
    """--run on a tiny run failed with 'tiny does not exist': the parent is opened as the run opens it."""
    import pandas as pd

    from puzzle.baselines import open_run
    from puzzle.pipeline import stage_export

    bench = load_benchmark("runtime")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    stage_export(open_run(run, progress=False), "child-1.5x")
    out = tmp_path / "O"
    assert bench.main(["--run", str(run), "--out", str(out), "--repeats", "1", "--no-parts", "--no-eager",
                       "--children", "child-1.5x", "--threads", "1"]) == 0
    assert list(pd.read_csv(out / "runtime.csv")["name"]) == ["parent", "child-1.5x"]


def test_runtime_refuses_in_one_line(run_dir, interrupted, tmp_path, capsys):
    bench = load_benchmark("runtime")
    out = tmp_path / "O"
    assert_refuses(bench, ["--run", str(tmp_path / "nonexist"), "--out", str(out)], "config.json does not exist",
                   capsys)
    assert_refuses(bench, ["--children", "bogus", "--out", str(out)], "choose from the demo children", capsys)
    assert_refuses(bench, ["--run", str(interrupted), "--out", str(out)], "holds no exported child", capsys)
    assert_refuses(bench, ["--run", str(run_dir), "--children", "child-9x", "--out", str(out)], "child-9x", capsys)
    (tmp_path / "file").write_text("")
    assert_refuses(bench, ["--run", str(run_dir), "--out", str(tmp_path / "file")], "is a file", capsys)
    for flag, bad in (("--repeats", "0"), ("--gen-len", "0"), ("--batch-size", "0"), ("--prompt-len", "-5")):
        assert_refuses(bench, ["--run", str(run_dir), "--out", str(out), flag, bad], f"{flag} must be at least 1, "
                       f"got {bad}", capsys)  # breaker: a NameError, the run's value used, a torch traceback
    assert not out.exists()


# --out that is a file: said before any work, in one line


@pytest.mark.parametrize("name,argv", [
    ("scoring", []), ("sampling", []), ("contention", ["--only", "windows"]), ("additivity", ["--run", "{run}"]),
    ("headroom", ["--run", "{run}"]), ("feedback_pick", ["--run", "{run}"]), ("select_context", ["--run", "{run}"]),
    ("kl_gap", ["--run", "{run}"]), ("objectives", ["--run", "{run}"]), ("runtime", []), ("uplift", ["--run", "{run}"]),
    ("front", ["--run", "{run}", "--phase", "report"]), ("bld", ["schedule", "--run", "{run}"]),
])
def test_an_out_file_is_refused_first(name, argv, run_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("")
    argv = [a.format(run=run_dir) for a in argv] + ["--out", str(out)]
    assert_refuses(load_benchmark(name), argv, f"--out {out} is a file", capsys)


def test_contention_refuses_an_unfinished_run(interrupted, tmp_path, capsys):
    bench = load_benchmark("contention")
    assert_refuses(bench, ["--only", "speedups", "--run", str(interrupted), "--out", str(tmp_path / "O")],
                   "front.csv missing", capsys)


def test_feedback_pick_stops_in_one_line_on_ctrl_c(run_dir, tmp_path, monkeypatch, capsys):
    bench = load_benchmark("feedback_pick")

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "replay", interrupt)
    assert bench.main(["--run", str(run_dir), "--out", str(tmp_path / "O")]) == 130
    assert capsys.readouterr().err.strip() == ("feedback_pick: interrupted; the rows of the re-solves done are in the "
                                               "output folder's feedback_pick.csv (a rerun starts afresh)")


# bld.py


def test_bld_refuses_runs_it_cannot_use(run_dir, interrupted, tmp_path, capsys):
    bench = load_benchmark("bld")
    out = tmp_path / "O"
    # SmolLM2's default layers on the tiny parent trained nothing, then failed with KeyError 'final_nmse'
    assert_refuses(bench, ["schedule", "--run", str(interrupted), "--out", str(out)], "has layers 0 to 3", capsys)
    assert_refuses(bench, ["schedule", "--run", str(interrupted), "--out", str(out), "--layers", "1",
                           "--variants", "ffn-1"], "none is in", capsys)
    assert_refuses(bench, ["child", "--run", str(tmp_path / "nonexist"), "--out", str(out)], "nonexist", capsys)
    # a tiny run's child was rebuilt from SmolLM2 (ValueError)
    assert_refuses(bench, ["child", "--run", str(run_dir), "--out", str(out), "--budgets", "256,512"],
                   "is not SmolLM2-135M", capsys)
    assert not out.exists()


@pytest.mark.parametrize("name,argv,says", [
    ("uplift", [], "has no front.csv"), ("front", ["--phase", "plan"], "score_table.csv does not exist"),
])
def test_an_unfinished_run_is_refused_in_one_line(name, argv, says, interrupted, capsys):
    assert_refuses(load_benchmark(name), ["--run", str(interrupted), *argv], says, capsys)


def test_uplift_names_a_missing_run(tmp_path, capsys):
    assert_refuses(load_benchmark("uplift"), ["--run", str(tmp_path / "nonexist")], "config.json does not exist",
                   capsys)


# tied_lora.py and rpo_demo.py


@pytest.mark.parametrize("name,phase", [("tied_lora", "run"), ("rpo_demo", "prepare"), ("rpo_demo", "train")])
def test_demo_scripts_name_a_missing_child(name, phase, tmp_path, capsys):
    argv = [phase, "--work", str(tmp_path / "W"), "--child", str(tmp_path / "nope")]
    assert_refuses(load_benchmark(name), argv, f"--child {tmp_path / 'nope'} is no exported model folder", capsys)


@pytest.mark.parametrize("name", ["tied_lora", "rpo_demo"])
def test_demo_reports_refuse_a_work_file_or_folder_without_results(name, tmp_path, capsys):
    bench = load_benchmark(name)
    (tmp_path / "file").write_text("")
    assert_refuses(bench, ["report", "--work", str(tmp_path / "file")], "is a file", capsys)
    assert_refuses(bench, ["report", "--work", str(tmp_path / "W")], "first", capsys)


def test_tied_lora_refuses_a_child_of_another_vocabulary(run_dir, tmp_path, capsys):
    """A tiny run's child (299 tokens) failed with IndexError on the SmolLM2 tokenizer's ids."""
    from puzzle.baselines import open_run
    from puzzle.pipeline import stage_export

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    stage_export(open_run(run, progress=False), "child-1.5x")
    capsys.readouterr()  # the export's notes
    argv = ["run", "--work", str(tmp_path / "W"), "--config", "base", "--child", str(run / "export" / "child-1.5x")]
    assert_refuses(load_benchmark("tied_lora"), argv, "has a vocabulary of 299 tokens", capsys)


def test_objectives_warns_of_a_child_off_its_target(run_dir, tmp_path, capsys):
    """greedy's child at 1.5x was predicted 1.75x (the MIP's 1.53x) and the table said "matched predicted runtime"."""
    import pandas as pd

    bench = load_benchmark("objectives")
    out = tmp_path / "O"
    assert bench.main(["--run", str(run_dir), "--objectives", "kl_nats;greedy", "--speedups", "1.5", "--out",
                       str(out)]) == 0
    captured = capsys.readouterr()
    assert "matched predicted runtime" not in captured.out and "predicted speed-up of each child" in captured.out
    df = pd.read_csv(out / "objectives.csv").set_index("objective")
    for objective, row in df.iterrows():
        off = abs(row["predicted_speedup"] / 1.5 - 1) > bench.OFF_TARGET
        assert (f"warning: {objective} at 1.5x is predicted" in captured.err) == off


def test_objectives_refuses_a_slow_down_and_uplift_a_run_without_baselines(run_dir, tmp_path, capsys):
    """Breaker: --speedups 0.5 ran (every child the parent); uplift trained our child alone, then printed an empty
    table."""
    assert_refuses(load_benchmark("objectives"), ["--run", str(run_dir), "--speedups", "0.5,2", "--out",
                                                  str(tmp_path / "O")], "--speedups 0.5: give speed-ups above 1",
                   capsys)
    from puzzle.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["front", "--out", str(run), "--no-progress", "--max-contention", "inf"]) == 0
    capsys.readouterr()
    assert_refuses(load_benchmark("uplift"), ["--run", str(run), "--out", str(tmp_path / "U")],
                   "no baseline is built for 1.5x, so there is nothing to compare our child with", capsys)
    assert not (tmp_path / "U").exists()


def test_search_refuses_an_out_under_a_file_and_a_library_variable_that_names_nothing(tmp_path, monkeypatch, capsys):
    """Breaker: a file in --out's path failed after every solve; a mistyped PUZZLE_70B_LIBRARY dropped the 70B rows
    and exited 0."""
    import sys

    (tmp_path / "f").write_text("")
    bench = load_benchmark("search")
    monkeypatch.setattr(sys, "argv", ["search.py", "--out", str(tmp_path / "f" / "x.csv")])
    with pytest.raises(SystemExit):
        bench.main()
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("PUZZLE_70B_LIBRARY", str(tmp_path / "nope"))
    bench = load_benchmark("search")  # FIXTURE is read from the variable at import
    monkeypatch.setattr(sys, "argv", ["search.py", "--out", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit):
        bench.main()
    assert f"PUZZLE_70B_LIBRARY={tmp_path / 'nope'} is no folder" in capsys.readouterr().err


# coupled.py


def test_coupled_compares_both_tables_at_the_same_budgets(run_dir, tmp_path, capsys):
    """benchmarks/coupled.py: each speed-up solved on the decoupled and the coupled table under one runtime limit;
    the coupled child takes the block rows it chose from their entries; a run without block rows is refused."""
    import pandas as pd

    from puzzle.baselines import open_run
    from puzzle.coupled import stage_coupled

    bench = load_benchmark("coupled")
    assert_refuses(bench, ["--run", str(run_dir)], "has no coupled block rows", capsys)
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["bld"]["coupled_top_k"] = 2
    (out / "config.json").write_text(json.dumps(config))
    stage_coupled(open_run(out, progress=False))
    capsys.readouterr()
    assert_refuses(bench, ["--run", str(out), "--speedups", "1.5,x"], "'x' is not a speed-up", capsys)
    assert bench.main(["--run", str(out), "--speedups", "1.25,1.5", "--out", str(tmp_path / "b")]) == 0
    df = pd.read_csv(tmp_path / "b" / "coupled.csv")
    assert list(df["table"]) == ["decoupled", "coupled"] * 2 and list(df["speedup"]) == [1.25, 1.25, 1.5, 1.5]
    assert (df["eval_kl"] > 0).all() and (df.loc[df["table"] == "decoupled", "coupled_blocks"] == 0).all()
    assert df.loc[df["table"] == "coupled", "coupled_blocks"].sum() > 0  # the search chose block rows
    assert "coupled / decoupled" in capsys.readouterr().out


# front.py


def test_front_phases_run_in_order_and_report_ratios(run_dir, tmp_path, capsys):
    """Leftover: benchmarks/front.py's phases (the README's side-by-side table) had no test but its refusals. Plan,
    baselines, ours, remeasure and report on a copy of the tiny run, one target."""
    import pandas as pd

    bench = load_benchmark("front")
    run, out = tmp_path / "run", tmp_path / "report"
    shutil.copytree(run_dir, run)
    for phase in ("plan", "baselines", "ours", "remeasure", "report"):
        argv = ["--run", str(run), "--phase", phase, "--speedups", "1.5", "--repeats", "2", "--out", str(out)]
        assert bench.main(argv) == 0, capsys.readouterr().err[-2000:]
        assert f"phase {phase}: " in capsys.readouterr().err
    timed = pd.read_csv(out / "remeasure.csv")
    rows = [json.loads(p.read_text()) for d in ("front_rows", "baselines/rows") for p in (run / d).glob("*.json")]
    assert {r["name"] for r in rows} <= set(timed["name"]) and len(rows) > 5  # every model timed in the one session
    ratios = pd.read_csv(out / "ratios.csv")  # ours / each baseline at 1.5x, where both fronts reach it (timing)
    plain = ratios[ratios["ours"] == "plain MIP"]
    assert {"greedy", "layer_removal"} <= set(plain["method"])  # (the others where their plan reaches 1.5x)
    for _, r in plain.iterrows():
        if pd.notna(r["ratio"]):
            assert r["ratio"] == pytest.approx(r["ours_kl_nats"] / r["baseline_kl_nats"]), r.to_dict()
        else:  # a front that stops short of 1.5x as measured
            assert pd.isna(r["ours_kl_nats"]) or pd.isna(r["baseline_kl_nats"]), r.to_dict()
    assert (out / "front.png").stat().st_size > 0 and (out / "architectures.png").stat().st_size > 0


def test_scoring_refuses_bad_counts_and_a_missing_parent_in_one_line(tmp_path, capsys):
    """Breaker: --stride 0 and --tokens 0 wrote results, one --layers value a degenerate fit that looked valid, and a
    missing --parent ended in a traceback."""
    bench = load_benchmark("scoring")
    out = tmp_path / "O"
    for argv, says in [(["--stride", "0"], "--stride must be at least 1, got 0"),
                       (["--tokens", "0"], "--tokens 0: each must be a whole multiple of --seq-len 256"),
                       (["--tokens", "256,x"], "must be whole numbers separated by commas"),
                       (["--layers", "5,5"], "--layers 5,5: give at least two distinct layers"),
                       (["--parent", str(tmp_path / "nonexistent")], "does not exist")]:
        assert_refuses(bench, [*argv, "--out", str(out)], says, capsys)
    assert not out.exists()
