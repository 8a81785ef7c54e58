"""GKD: the loss terms, that training lowers the KL to the parent, exact resume after a kill, torchrun (DDP, FSDP)."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from puzzle.architecture import AttentionConfig, BlockConfig, FFNConfig
from puzzle.distill import (GKDConfig, add_gkd_parser, distill, evaluate_against_parent, hidden_cosine_loss, kl_full,
                            kl_topk, load_teacher_cache, model_fingerprint, run_gkd_command, tokens_sha)
from puzzle.errors import PuzzleError
from puzzle.export import export_checkpoint
from puzzle.realize import realize_child
from puzzle.scoring.quality import parent_logprobs
from puzzle.tiny import tiny_parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sharp_parent(seed: int = 0):
    """The tiny parent with larger weights, so its next-token distributions are far from uniform."""
    lm = tiny_parent(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if p.dim() == 2:
                std = 0.3 if "embed" in name else 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return lm


def child_of(parent):
    """Layer 1 without attention, layer 2 without FFN; everything else the parent's weights."""
    blocks = list(parent.config.blocks)
    blocks[1] = BlockConfig(AttentionConfig("no_op"), blocks[1].ffn)
    blocks[2] = BlockConfig(blocks[2].attention, FFNConfig("no_op"))
    return realize_child(parent, None, blocks)


def random_ids(n, t, seed):
    return torch.randint(3, 299, (n, t), generator=torch.Generator().manual_seed(seed))


FAST = dict(batch_size=4, lr=3e-3, warmup_fraction=0.1, checkpoint_every=2)


def test_kl_topk_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    zp, zc = torch.randn(2, 5, 40, generator=g) * 2, torch.randn(2, 5, 40, generator=g) * 2
    for tau in (1.0, 2.0):
        full = kl_full(zp, zc, tau)
        lse = torch.logsumexp(zp / tau, -1)
        top = zp.topk(40, -1)
        assert torch.allclose(kl_topk(top.values, top.indices, lse, zc, tau), full, atol=1e-5)
        top8 = zp.topk(8, -1)
        partial = kl_topk(top8.values, top8.indices, lse, zc, tau)
        assert 0 < partial < full
    assert float(kl_full(zp, zp)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_cosine_loss_sums_layers():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 3, 8, generator=g) for _ in range(3)]
    assert float(hidden_cosine_loss(hs, [2 * h for h in hs])) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_cosine_loss(hs, [-h for h in hs])) == pytest.approx(6.0, abs=1e-5)  # 3 layers x (1 - (-1))
    with pytest.raises(PuzzleError, match="layer by layer"):
        hidden_cosine_loss(hs, hs[:2])


def test_gkd_lowers_the_evaluation_kl(tmp_path):
    parent = sharp_parent().model
    child = child_of(parent)
    train, held_out = random_ids(32, 32, 0), random_ids(8, 32, 1)
    logp = parent_logprobs(parent, held_out)
    before = evaluate_against_parent(child, held_out, logp)["kl_nats"]
    result = distill(child, parent, train, GKDConfig(tokens=32 * 32 * 3, **FAST), tmp_path)
    after = evaluate_against_parent(result.model, held_out, logp)["kl_nats"]
    assert result.train.finished and result.tokens_trained == 24 * 4 * 32 and result.epochs == pytest.approx(3.0)
    assert after < 0.85 * before, (before, after)
    assert not parent.model.embed_tokens.weight.requires_grad  # the parent is left as it was
    first, last = result.train.history[0], result.train.history[-1]
    assert last["kl_nats"] < first["kl_nats"] and last["cosine_loss"] < first["cosine_loss"]
    assert last["lm_loss"] == 0.0  # off by default, as in the paper


def test_frozen_embeddings_stay_fixed_and_cache_teacher_matches_online(tmp_path):
    parent = sharp_parent().model
    train = random_ids(8, 16, 0)
    cfg = GKDConfig(tokens=8 * 16, **FAST)
    online_run = distill(child_of(parent), parent, train, cfg, tmp_path / "online")
    online = online_run.model
    assert torch.equal(online.model.embed_tokens.weight, parent.model.embed_tokens.weight)
    # with every logit kept, the cached KL is the full KL: the same loss, and the same training up to float rounding
    # (AdamW divides by the gradient's running RMS, so 1e-7 differences in tiny gradients move weights by up to ~lr/20)
    with_cache = distill(child_of(parent), parent, train,
                         GKDConfig(tokens=8 * 16, teacher="cache", top_k=10_000, **FAST), tmp_path / "cache")
    cached = with_cache.model
    assert with_cache.train.history[0]["kl_nats"] == pytest.approx(online_run.train.history[0]["kl_nats"], abs=1e-5)
    assert (tmp_path / "cache" / "teacher_cache.safetensors").is_file()
    expect = {"parent": model_fingerprint(parent), "tokens": tokens_sha(train), "top_k": parent.config.vocab_size,
              "temperature": 1.0, "vocab_size": parent.config.vocab_size}  # top_k 10,000 was clamped to V, and
    assert load_teacher_cache(tmp_path / "cache" / "teacher_cache.safetensors", expect) is not None  # the cache fits
    for (name, a), b in zip(online.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a, b, atol=FAST["lr"] / 10), name  # measured: at most 1.6e-4 apart


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    parent = sharp_parent().model
    train = random_ids(12, 16, 0)
    cfg = GKDConfig(tokens=12 * 16 * 2, **FAST)  # 6 steps, checkpoints after steps 2, 4, 6
    whole = distill(child_of(parent), parent, train, cfg, tmp_path / "a")

    def killed(step, record):
        if step == 5:
            raise RuntimeError("killed")  # step 5 is lost, as in a kill before its checkpoint

    def interrupted(step, record):
        if step == 5:
            raise KeyboardInterrupt  # Ctrl-C: step 5 is checkpointed on the way out

    for stop, exc, resumed_from in ((killed, RuntimeError, 4), (interrupted, KeyboardInterrupt, 5)):
        with pytest.raises(exc):
            distill(child_of(parent), parent, train, cfg, tmp_path / stop.__name__, on_step=stop)
        resumed = distill(child_of(parent), parent, train, cfg, tmp_path / stop.__name__)
        assert resumed.train.resumed_from == resumed_from and resumed.train.finished
        assert [h["loss"] for h in resumed.train.history] == [h["loss"] for h in whole.train.history]
        for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(PuzzleError, match="other settings"):
        distill(child_of(parent), parent, train, GKDConfig(tokens=12 * 16 * 2, **{**FAST, "lr": 1e-3}), tmp_path / "killed")


def _folders(tmp_path):
    """Exported tiny parent and child, training and evaluation text files."""
    loaded = sharp_parent()
    export_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "parent")
    export_checkpoint(child_of(loaded.model), loaded.tokenizer, tmp_path / "child")
    words = "the parent model is a trained language model and the child is the same depth".split()
    g = torch.Generator().manual_seed(0)
    for name, n in (("calib.txt", 60), ("eval.txt", 12)):
        paras = [" ".join(words[i] for i in torch.randint(0, len(words), (30,), generator=g).tolist()) for _ in range(n)]
        (tmp_path / name).write_text("\n\n".join(paras) + "\n")
    return tmp_path


def _args(tmp_path, dest, *extra):
    p = argparse.ArgumentParser()
    add_gkd_parser(p.add_subparsers())
    return p.parse_args(["gkd", "--child", str(tmp_path / "child"), "--parent", str(tmp_path / "parent"),
                         "--calib", str(tmp_path / "calib.txt"), "--dest", str(dest), "--seq-len", "32",
                         "--tokens", "1024", "--lr", "3e-3", "--no-progress", *extra])


def test_token_counts_past_the_text_are_said(tmp_path):
    """Breaker: --calib-tokens 10000000 and --eval-tokens 100000000 packed what the text held, and --tokens past the
    packed text trained it several times over, all without a word."""
    _folders(tmp_path)
    said = []
    summary = run_gkd_command(_args(tmp_path, tmp_path / "out", "--eval", str(tmp_path / "eval.txt"), "--eval-tokens",
                                    "100000000", "--calib-tokens", "10000000", "--tokens", "40000"), log=said.append)
    packed = round(summary["tokens_trained"] / summary["epochs"])
    assert any(m.startswith("gkd: --calib-tokens 10000000: the text holds ") and "whole sequences of --seq-len 32" in m
               for m in said), said
    assert any(m.startswith("gkd: --eval-tokens 100000000: the text holds ") for m in said), said
    assert any(m.startswith(f"gkd: --tokens 40000 is more than the {packed} training tokens: the training text is seen "
                            f"about {summary['tokens_trained'] / packed:.1f} times") for m in said), said
    said.clear()  # reviewer: 1000 of 32-token sequences packs 992 tokens, which is no shortage of text
    run_gkd_command(_args(tmp_path, tmp_path / "out2", "--calib-tokens", "1000", "--tokens", "1000"), log=said.append)
    assert not [m for m in said if "the text holds" in m or "seen about" in m], said


def test_a_file_named_twice_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """Breaker: `gkd --calib a a` (or `a ./a`) packed the text twice without a word; --calib and --eval were compared
    as strings, so `--calib a --eval ./a` evaluated on the training text."""
    _folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    for extra, words in [(["--calib", "./calib.txt"], r"--calib names \S+calib.txt \(as ./calib.txt\) twice; give each "
                                                      r"file once"),  # `_args` gives calib.txt by its whole path
                         (["--eval", "eval.txt", "eval.txt"], r"--eval names eval.txt twice"),
                         (["--eval", "./calib.txt"], r"--calib and --eval together names \S+calib.txt \(as "
                                                     r"./calib.txt\) twice; never evaluate on training text"),
                         # a copy or a hard link was read as other text (stop 74's leftover)
                         (["--eval", "copy.txt"], r"--calib and --eval together names \S+calib.txt and copy.txt, "
                                                  r"which hold the same bytes \(a copy or a link of one file\)"),
                         (["--calib", "link.txt"], r"--calib names \S+calib.txt and link.txt, which hold the same")]:
        (tmp_path / "copy.txt").write_bytes((tmp_path / "calib.txt").read_bytes())
        if not (tmp_path / "link.txt").exists():
            os.link(tmp_path / "calib.txt", tmp_path / "link.txt")
        with pytest.raises(PuzzleError, match=words):
            run_gkd_command(_args(tmp_path, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_cli_on_exported_folders_writes_an_exported_folder(tmp_path):
    _folders(tmp_path)
    summary = run_gkd_command(_args(tmp_path, tmp_path / "out", "--eval", str(tmp_path / "eval.txt")))
    assert summary["after"]["kl_nats"] < summary["before"]["kl_nats"]
    assert summary["recovery_fraction"] > 0
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out.gkd-work" / "gkd.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["block_configs"][1]["attention"]["no_op"] and cfg["puzzle"]["gkd"]["tokens_trained"] == 1024
    with pytest.raises(PuzzleError, match="never evaluate on training text"):
        run_gkd_command(_args(tmp_path, tmp_path / "x", "--eval", str(tmp_path / "calib.txt")))
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    from puzzle.config import load_preset, save_run_config

    save_run_config(load_preset("tiny"), (tmp_path / "run").mkdir() or tmp_path / "run")  # a run directory's config
    for extra, words in [(["--stop-after-steps", "0"], "--stop-after-steps must be >= 1"),
                         (["--work", str(tmp_path / "run")], "among the files of the run"),  # its checkpoint was there
                         (["--work", str(tmp_path / "run" / "w")], "among the files of the run"),
                         (["--work", str(tmp_path / "calib.txt")], "a file is in the way"),
                         (["--work", str(tmp_path / "out" / "w")], "inside the exported model"),
                         (["--work", str(tmp_path / "child" / ".." / "parent")], "inside the exported model"),
                         (["--seq-len", "1"], "--seq-len must be >= 2"),
                         (["--tokens", "10"], "--tokens 10 is less than one sequence (--seq-len 32)"),  # blamed text
                         (["--device", "tpu"], "--device 'tpu': give auto, cpu or cuda"),  # trained on the CPU
                         (["--temperature", "1e200"], "gkd temperature must be from 0.01 to 100"),  # was a traceback
                         (["--temperature", "1e-9"], "gkd temperature must be from 0.01 to 100"),
                         (["--seq-len", "100000"], "longer than the 2048 positions"),
                         (["--eval-tokens", "64"], "--eval-tokens needs --eval"),
                         (["--eval", str(tmp_path / "eval.txt"), "--eval-tokens", "8"], "at least one sequence")]:
        with pytest.raises(PuzzleError, match=re.escape(words)):
            run_gkd_command(_args(tmp_path, tmp_path / "y", *extra))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    from puzzle.train_utils import check_work_folder

    check_work_folder(tmp_path / "run" / "export" / "mine.gkd-work")  # where --dest RUN/export/mine puts it: taken


def test_cli_refuses_child_only_flags_with_a_run_and_reports_a_finished_resume(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_gkd_parser(p.add_subparsers())
    for extra in (["--seq-len", "32"], ["--eval-tokens", "4096"], ["--calib", "a.txt"], ["--parent", "p"]):
        args = p.parse_args(["gkd", "--out", str(tmp_path / "run"), "--name", "child-2x", *extra])
        with pytest.raises(PuzzleError, match=f"{re.escape(extra[0])} only applies to --child FOLDER"):
            run_gkd_command(args)
    _folders(tmp_path)
    args = _args(tmp_path, tmp_path / "out", "--no-eval")
    assert args.func(args) == 0 and "tok/s" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out.gkd-work" / "gkd.json").read_text())
    rate = summary["train_tok_s"]  # with the load other processes put on the cores meanwhile (helper: unsaid)
    assert isinstance(summary["contention_cores"], float) and summary["contention_cores"] >= 0
    assert args.func(args) == 0  # every step is in the checkpoint: no rate to report, not "0 tok/s"
    assert "all 8 steps done by an earlier call" in capsys.readouterr().err
    rerun = json.loads((tmp_path / "out.gkd-work" / "gkd.json").read_text())
    assert rerun["train_tok_s"] == rate > 0 and rerun["train_s"] == summary["train_s"]  # kept, and where the
    assert rerun["resumed_from_step"] == 0 and rerun["only_exported"]  # training began (breaker: 8 written over 0)
    args.child = f"{tmp_path / 'child'}/"  # the same training, spelled otherwise: still a rerun, not another model
    assert args.func(args) == 0
    (tmp_path / "link").symlink_to(tmp_path / "child")  # its checkpoint too: the model's fingerprint ignores the path
    args.child = str(tmp_path / "link" / "config.json")
    assert args.func(args) == 0 and "all 8 steps done by an earlier call" in capsys.readouterr().err
    odd = _args(tmp_path, tmp_path / "odd", "--no-eval", "--tokens", "1000", "--stop-after-steps", "1")
    assert odd.func(odd) == 0  # breaker: 1000 tokens trained 896 without a word
    assert "7 steps of 4 x 32 tokens, 1 process(es) (896 tokens: --tokens 1000 rounded down to whole batches of " \
        "128)" in capsys.readouterr().err
    (tmp_path / "child").rename(tmp_path / "moved")  # breaker: a moved child was refused, then its checkpoint too
    args.child = str(tmp_path / "moved")
    assert args.func(args) == 0 and "all 8 steps done by an earlier call" in capsys.readouterr().err


def test_another_training_into_the_same_dest_is_refused_before_it_trains(tmp_path):
    """The export records its training (settings, inputs, work folder): only a rerun of that training replaces it."""
    _folders(tmp_path)
    out, work = tmp_path / "out", tmp_path / "w"
    short = ("--no-eval", "--tokens", "256")  # 2 steps
    assert run_gkd_command(_args(tmp_path, out, *short))["finished"]
    before = (out / "model.safetensors").read_bytes()
    for extra in (["--lr", "1e-3"], ["--seed", "1"], ["--tokens", "512"], ["--train-embeddings"], []):
        with pytest.raises(PuzzleError, match=r"holds trained weights \(gkd of .* \(training [0-9a-f]{16}\)\)"):
            run_gkd_command(_args(tmp_path, out, *short, "--work", str(work), *extra))
        assert not work.exists() and (out / "model.safetensors").read_bytes() == before
    assert run_gkd_command(_args(tmp_path, out, *short))["finished"]  # a rerun of the same training replaces it
    config = json.loads((out / "config.json").read_text())
    assert re.fullmatch("[0-9a-f]{16}", config["puzzle"]["gkd"]["training"])
    del config["puzzle"]["gkd"]["training"]  # as an earlier version recorded it
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(PuzzleError, match="recorded otherwise, by an earlier version"):
        run_gkd_command(_args(tmp_path, out, *short))


def test_a_re_pack_too_short_for_the_run_says_which_flag_to_change(tmp_path_factory, tmp_path):
    """`--max-doc-tokens 5` cuts the evaluation documents below one sequence: the advice is about that flag (the
    run's seq_len is not this command's to lower), and nothing is written to the run."""
    import shutil

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_run import tiny_run_dir

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), run)
    p = argparse.ArgumentParser()
    add_gkd_parser(p.add_subparsers())
    base = ["gkd", "--out", str(run), "--name", "child-1.5x", "--no-eval", "--no-progress", "--stop-after-steps", "1"]
    for extra, words in [(["--max-doc-tokens", "5"], "--max-doc-tokens 5 would change the evaluation split"),
                         (["--max-doc-tokens", "-1"], "--max-doc-tokens must be >= 0 (0: no cap), got -1"),
                         (["--calib-tokens", "0"], "--calib-tokens must be >= 1 (training tokens to pack), got 0"),
                         (["--calib-tokens", "10"], "--calib-tokens 10 is less than one sequence (the run's seq_len "
                                                    "64); give --calib-tokens 64 or more")]:
        with pytest.raises(PuzzleError, match=re.escape(words)) as refused:
            run_gkd_command(p.parse_args([*base, *extra]))
        assert "seq_len;" not in str(refused.value) and "raise it" not in str(refused.value)
    assert not (run / "gkd").exists()


WORKER = textwrap.dedent("""
    import argparse, sys
    from puzzle.distill import add_gkd_parser
    p = argparse.ArgumentParser()
    add_gkd_parser(p.add_subparsers())
    args = p.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    _folders(tmp_path)
    run_gkd_command(_args(tmp_path, tmp_path / "one", "--no-eval"))
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), "gkd", "--child", str(tmp_path / "child"), "--parent", str(tmp_path / "parent"),
           "--calib", str(tmp_path / "calib.txt"), "--dest", str(tmp_path / "two"), "--seq-len", "32",
           "--tokens", "1024", "--lr", "3e-3", "--no-progress", "--no-eval", "--device", "cpu"]
    if mode == "fsdp":
        cmd.append("--fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: no process outlives the test
        raise
    assert proc.returncode == 0, stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(tmp_path / "child" / "model.safetensors")
    assert one.keys() == two.keys()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-3  # training changed the weights
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-4, rtol=1e-4), k
    summary = json.loads((tmp_path / "two.gkd-work" / "gkd.json").read_text())
    assert summary["world_size"] == 2 and summary["fsdp"] == (mode == "fsdp")
    assert summary["contention_cores"] is None  # the other rank would count as load


@pytest.mark.slow
def _two_ranks(tmp_path, worker: str, tokens: int, timeout: float = 300, extra: tuple = ()) -> tuple[int, str]:
    """`worker` (WORKER edited) run by torchrun on 2 CPU ranks for a gkd of the `_folders` child into tmp_path/two
    (`extra`: more gkd flags): (exit status, stderr); no process outlives the call."""
    (tmp_path / "worker.py").write_text(worker)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), "gkd", "--child", str(tmp_path / "child"), "--parent", str(tmp_path / "parent"),
           "--calib", str(tmp_path / "calib.txt"), "--dest", str(tmp_path / "two"), "--seq-len", "32",
           "--tokens", str(tokens), "--lr", "3e-3", "--no-progress", "--no-eval", "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, stderr


def test_ranks_started_with_other_settings_are_refused_instead_of_drifting_or_hanging(tmp_path):
    """Reviewer: a rank given another --lr trained its own replica (exit 0, rank 0's weights saved), and one given
    another --tokens hung at the next collective until gloo's 30-minute timeout."""
    _folders(tmp_path)
    worker = WORKER.replace("args = p.parse_args(sys.argv[1:])", "import os\nargv = sys.argv[1:]\n"
                            "if os.environ['RANK'] == '1':\n    argv[argv.index('--lr') + 1] = '1e-2'\n"
                            "args = p.parse_args(argv)")
    returncode, stderr = _two_ranks(tmp_path, worker, tokens=1024)
    assert returncode != 0 and "gkd: the 2 ranks were started with different config.lr (config.lr: rank 0 0.0" in \
        stderr and "rank 1 0.01)" in stderr, stderr[-3000:]  # the setting and its values (breaker: two hashes)
    assert not (tmp_path / "two" / "model.safetensors").exists()


def test_a_rank_interrupted_mid_training_stops_both_at_once(tmp_path):
    """Breaker: Ctrl-C to one rank sent it to the closing barrier while the other waited in a step's all-reduce, and
    both froze until gloo's timeout; now it leaves at once and the other says that another rank stopped."""
    import time

    _folders(tmp_path)
    worker = WORKER.replace("args = p.parse_args(sys.argv[1:])",
                            "import os, signal, threading\nif os.environ['RANK'] == '1':\n"
                            "    threading.Timer(8, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
                            "args = p.parse_args(sys.argv[1:])")
    t0 = time.monotonic()  # no checkpoint: where rank 0 was writing one when rank 1 left, torchrun (which polls
    # every 0.1 s) could stop rank 0 before its next collective failed and it said why (flaky once on CI)
    returncode, stderr = _two_ranks(tmp_path, worker, tokens=10_000_000, timeout=240,
                                    extra=("--checkpoint-every", "1000000000"))
    assert returncode != 0 and time.monotonic() - t0 < 120, stderr[-3000:]
    assert "rank 0: another rank stopped during a collective operation" in stderr, stderr[-3000:]
    assert not (tmp_path / "two" / "model.safetensors").exists()


def test_a_checkpoint_of_the_earlier_version_still_resumes(tmp_path, capsys, monkeypatch):
    """Review: an earlier version recorded a --child folder's path as the checkpoint's child_source; the folder's
    weights hash now identifies it, and such a checkpoint (and its export) must still count as this training."""
    import puzzle.distill as distill

    _folders(tmp_path)
    monkeypatch.setattr(distill, "recorded_source",  # as the earlier version recorded it: the folder's path
                        lambda path, key, earlier, now: earlier)
    args = _args(tmp_path, tmp_path / "out", "--no-eval")
    assert args.func(args) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert args.func(args) == 0 and "all 8 steps done by an earlier call" in capsys.readouterr().err


def test_the_built_in_tiny_model_can_be_the_teacher(tmp_path, monkeypatch):
    """Breaker: `gkd --child X --parent tiny` said "tiny does not exist"; eval, sft and rpo take the built-in model."""
    _folders(tmp_path)
    tiny = tiny_parent()
    export_checkpoint(child_of(tiny.model), tiny.tokenizer, tmp_path / "tiny-child")
    monkeypatch.chdir(tmp_path)  # no ./tiny here
    p = argparse.ArgumentParser()
    add_gkd_parser(p.add_subparsers())
    args = p.parse_args(["gkd", "--child", "tiny-child", "--parent", "tiny", "--calib", "calib.txt", "--dest", "out",
                         "--seq-len", "32", "--tokens", "256", "--no-progress"])
    assert args.func(args) == 0 and (tmp_path / "out" / "config.json").is_file()
    for child in ("tiny-child", str(tmp_path / "tiny-child")):  # a breaker: the child its own teacher "succeeded"
        args = p.parse_args(["gkd", "--child", "tiny-child", "--parent", child, "--calib", "calib.txt", "--dest",
                             "again", "--seq-len", "32", "--tokens", "256", "--no-progress"])
        with pytest.raises(PuzzleError, match="^--child and --parent are the same model .*give the teacher"):
            args.func(args)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("field,value", [("tokens", 0), ("tokens", -5), ("batch_size", 0), ("micro_batch_size", -1)])
def test_a_count_below_its_least_is_named_as_its_flag(field, value):
    """Reviewer: --tokens 0, -5 and --batch-size 0 all said "gkd tokens and batch_size must be >= 1 and ..."."""
    flag = "--" + field.replace("_", "-")
    with pytest.raises(PuzzleError, match=f"^{flag} must be >= {0 if field == 'micro_batch_size' else 1}, got {value}$"):
        GKDConfig(**{field: value})


def test_a_checkpoint_temp_file_left_by_a_killed_save_is_removed_on_the_next_call(tmp_path):
    """Reviewer (distributed): SIGTERM/SIGKILL during a checkpoint save left .checkpoint.pt.<random>.tmp (the model
    and optimizer state) in the work folder for good."""
    _folders(tmp_path)
    work = tmp_path / "out.gkd-work"
    work.mkdir()
    left = work / ".checkpoint.pt.k1ll3d.tmp"
    left.write_bytes(b"half a checkpoint")
    run_gkd_command(_args(tmp_path, tmp_path / "out", "--no-eval", "--tokens", "256"))
    assert not left.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_batch_larger_than_the_training_split_is_refused_before_any_work(tmp_path):
    """Breaker: --batch-size 100000 over a 48-sequence split printed one step of 6,400,000 tokens and took 15.7 GB
    before it was killed; sft refused the same mistake."""
    _folders(tmp_path)
    with pytest.raises(PuzzleError, match=r"--batch-size 100000 is more than the \d+ sequences of the training split "
                                          r"\(.*\); give --batch-size \d+ or less, or more training text"):
        run_gkd_command(_args(tmp_path, tmp_path / "out", "--no-eval", "--tokens", "256", "--batch-size", "100000"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gkd-work").exists()


def test_a_finished_checkpoint_of_other_settings_is_not_offered_for_a_resume(tmp_path):
    """Breaker: a second gkd of the same child (another --tokens and --dest) met the first one's finished checkpoint
    in the default work folder and was told to use the same settings to resume; a finished one now names --work."""
    from puzzle.train_utils import _check_resume

    path = tmp_path / "gkd" / "child" / "checkpoint.pt"
    meta = {"config": {"tokens": 10}}
    for step, words in [(5, "holds the finished checkpoint of a training with other settings or inputs (differs in "
                            "['config.tokens: 2048 -> 10']): give this training a work folder of its own (--work DIR)"),
                        (3, "was made with other settings or inputs (differs in ['config.tokens: 2048 -> 10']); use "
                            "the same settings to resume")]:
        ckpt = {"meta": {"config": {"tokens": 2048}}, "step": step, "total_steps": 5}
        with pytest.raises(PuzzleError) as e:
            _check_resume(path, ckpt, meta, 5, False)
        assert words in str(e.value), str(e.value)


def test_a_loss_not_finite_before_any_update_blames_the_loss_not_the_learning_rate(tmp_path):
    """Breaker: `gkd --lm-weight 1e38` was told "the loss became inf at step 1; lower the learning rate", though no
    update had happened yet."""
    parent = sharp_parent().model
    with pytest.raises(PuzzleError, match="the loss is inf at the first step, before any update: check the loss "
                                          "weights"):
        distill(child_of(parent), parent, random_ids(8, 32, 0), GKDConfig(tokens=4 * 32, lm_weight=1e38,
                                                                           kl_weight=1e38, **FAST), tmp_path)


def test_a_gkd_that_raised_the_kl_is_warned_about(monkeypatch, capsys):
    """Breaker: a gkd that made the child worse ("recovery -27.6%") exited without a word, and one whose child was
    the parent itself said "recovery nan%"."""
    import argparse

    import puzzle.distill as distill_module

    summary = {"finished": True, "before": {"kl_nats": 0.5, "lm_loss": 3.0}, "after": {"kl_nats": 0.6, "lm_loss": 3.1},
               "recovery_fraction": -0.2, "resumed_from_step": 0, "steps": 2, "train_tok_s": 100.0,
               "tokens_trained": 256, "dest": "d"}
    monkeypatch.setattr(distill_module, "run_gkd_command", lambda args, log: summary)
    assert distill_module.cmd_gkd(argparse.Namespace()) == 0
    err = capsys.readouterr().err
    assert "(recovery -20.0%)" in err and "gkd: warning: the evaluation KL rose" in err
    summary.update(before={"kl_nats": 0.0, "lm_loss": 3.0}, after={"kl_nats": 0.0, "lm_loss": 3.0},
                   recovery_fraction=float("nan"))
    assert distill_module.cmd_gkd(argparse.Namespace()) == 0
    err = capsys.readouterr().err
    assert "(it started as the parent: no recovery to measure)" in err and "nan" not in err and "warning" not in err
