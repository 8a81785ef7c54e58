"""BLD at scale: torchrun ranks build the same library as one process; a parent read layer by layer fits a memory cap."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.library import Library

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _puzzle(*args, timeout=300):
    done = subprocess.run([sys.executable, "-m", "puzzle", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_two_cpu_ranks_build_the_same_library_as_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _puzzle("data", "--preset", "tiny", "--out", str(one), "--bld-tokens", "512", "--no-progress")
    shutil.copytree(one, two)
    _puzzle("bld", "--out", str(one), "--no-progress")
    # a library begun with other settings and no entry yet is replaced under torchrun too (breaker: its ranks said
    # it "was built with other settings", as one process does not)
    (two / "library").mkdir()
    meta = json.loads((one / "library" / "meta.json").read_text())
    meta["bld"]["tokens"] = 1024
    (two / "library" / "meta.json").write_text(json.dumps(meta))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "puzzle", "bld", "--out", str(two), "--no-progress"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranks started without torchrun" not in done.stderr  # (breaker: said after every torchrun bld)
    a, b = Library(one / "library").index(), Library(two / "library").index()
    assert len(a) == len(b) > 0 and (two / "library" / "index.csv").is_file()
    cols = ["layer", "subblock", "variant", "stage", "init", "tokens", "status"]
    assert a[cols].equals(b[cols])
    for r in a.itertuples():
        wa, wb = Library(one / "library").load(r.layer, r.variant, r.stage), Library(two / "library").load(r.layer, r.variant, r.stage)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from puzzle.bld import BLDConfig, build_library
    from puzzle.library import Library
    from puzzle.offload import SafetensorsParent
    from puzzle.space import SpaceConfig, build_space

    def memory_mib():
        # (current, peak) resident set size of this process; the peak restarts at reset_peak()
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
            f.write("5")

    folder, out = sys.argv[1], sys.argv[2]
    source = SafetensorsParent(folder)
    space = build_space(source.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=64))
    calib = torch.randint(3, 250, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = BLDConfig(tokens=128, batch_size=2, lr=1e-3, layers_per_group=1, probe_sequences=1)
    # warm-up on the tiny parent: imports and first-call caches (~200 MiB, whatever the parent's size) come first
    from puzzle.tiny import tiny_parent
    tiny = tiny_parent().model
    build_library(tiny, calib, build_space(tiny.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))[:1], cfg,
                  Library(out + "-warmup"))
    del tiny
    reset_peak()
    base, _ = memory_mib()
    result = build_library(source, calib, space, cfg, Library(out))
    _, peak = memory_mib()
    reset_peak()
    before, _ = memory_mib()
    check = torch.ones(int(sys.argv[3]) * 2**18)  # as many MiB as the parent, touched: the peak must see it
    _, after = memory_mib()
    print(json.dumps({"base_mib": base, "peak_mib": peak, "check_growth_mib": after - before,
                      "trained": result["trained"], "peak_parent_mib": result["peak_parent_mib"]}))
""")



def _write_parent(folder, layers=16, hidden=512, heads=8, kv_heads=4, ffn=1536, vocab=256):
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": True, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    d, kv = hidden // heads, kv_heads * (hidden // heads)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (heads * d, hidden), "self_attn.k_proj.weight": (kv, hidden),
                  "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, heads * d),
                  "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                  "mlp.down_proj.weight": (hidden, ffn)}
        for name, shape in shapes.items():
            state[p + name] = torch.randn(shape, generator=g) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(hidden)
        state[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file(state, str(folder / "model.safetensors"))
    return sum(t.numel() * 4 for t in state.values()) / 2**20


def test_a_parent_larger_than_the_memory_cap_is_distilled_layer_by_layer(tmp_path):
    """Peak RSS growth during BLD stays below 40% of the parent's size (16 layers, 193 MiB fp32).

    Measured in a fresh process: VmHWM (the kernel's peak resident set size) is reset after a
    warm-up BLD run on the tiny parent (so that imports and one-time caches, which do not depend
    on the parent, are not counted), then read after BLD on the big parent.
    """
    parent_mib = _write_parent(tmp_path / "parent")
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "parent"), str(tmp_path / "lib"),
                           str(int(parent_mib))], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["trained"] == 16 * 5  # per layer: 2 and 1 KV heads, linear attention, FFN 768, linear FFN
    growth = m["peak_mib"] - m["base_mib"]
    assert growth < 0.4 * parent_mib, (growth, parent_mib, m)
    assert m["peak_parent_mib"] == pytest.approx(parent_mib / 16, rel=0.05)  # one layer's weights at a time
    assert m["check_growth_mib"] > 0.9 * parent_mib  # the measure does see a parent-sized allocation


RANKS_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from puzzle import distributed
    from puzzle.bld import BLDConfig, build_library
    from puzzle.library import Library
    from puzzle.space import SpaceConfig, build_space
    from puzzle.tiny import tiny_parent

    case, out = sys.argv[1], sys.argv[2]
    rank, world, _ = distributed.env_rank_world()
    parent = tiny_parent(seed=0).model
    calib = torch.randint(3, 299, (12, 32), generator=torch.Generator().manual_seed(1))
    space = build_space(parent.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))[:2]
    tokens = 128 * (1 + rank) if case == "settings" else 128
    folder = out + ("-elsewhere" if case == "folder" and rank == 1 else "")
    try:
        with distributed.process_group(rank, world):
            build_library(parent, calib, space, BLDConfig(tokens=tokens, batch_size=2, lr=1e-3), Library(folder),
                          rank=rank, world_size=world)
    except PuzzleError as e:
        print(f"rank {rank}: {e}", file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.parametrize("case,words", [("settings", "ranks were started with different calibration tokens, "
                                                     "settings.tokens (calibration tokens: rank 0 "),
                                        ("folder", "must be one folder that every rank")])
def test_ranks_started_differently_or_on_unshared_folders_are_refused(tmp_path, case, words):
    """Reviewer: ranks with other settings (or spaces) built a library for no single space, and a rank writing to a
    folder the others do not see left half a library; both exited 0."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), case,
           str(tmp_path / "lib")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and words in done.stderr, done.stderr[-3000:]


def test_ranks_refused_for_other_settings_leave_the_run_as_it_was(tmp_path):
    """Breaker: of two torchrun ranks, the one started with --bld-tokens 1024 replaced the unbuilt library's meta.json
    before the ranks were compared; both were refused, yet config.json kept 1024, and the plain rerun trained on it."""
    run = tmp_path / "run"
    _puzzle("data", "--preset", "tiny", "--out", str(run), "--bld-tokens", "512", "--no-progress")
    before = (run / "config.json").read_bytes()
    script = tmp_path / "rank.py"  # torchrun starts every rank with one command line: the rank picks its flag
    script.write_text("import os, sys\nfrom puzzle.cli import main\nrank = int(os.environ['RANK'])\n"
                      f"sys.exit(main(['bld', '--out', {str(run)!r}, '--no-progress', '--bld-tokens', "
                      "str(512 * (1 + rank))]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ranks were started with different bld.tokens (bld.tokens: rank 0 512, rank 1 " \
        "1024)" in done.stderr, done.stderr[-3000:]
    assert (run / "config.json").read_bytes() == before
    assert not (run / "library" / "meta.json").exists() or \
        json.loads((run / "library" / "meta.json").read_text())["bld"]["tokens"] == 512


def test_a_check_one_rank_fails_stops_every_rank(tmp_path):
    """Reviewer: a library refused on one rank alone (per-node run folders that differ) left the others waiting in
    their next collective call; `every_rank_ok` tells every rank of the one refusal."""
    script = tmp_path / "ok.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom puzzle import distributed\n"
                      "rank, world, _ = distributed.env_rank_world()\n"
                      "with distributed.process_group(rank, world):\n"
                      "    said = (distributed.every_rank_ok(world, rank == 0), distributed.every_rank_ok(world, True))\n"
                      f"Path({str(tmp_path)!r}, f'rank{{rank}}.txt').write_text(repr(said))\n")  # (prints interleave)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["(False, True)"] * 2


def test_a_library_refused_on_one_rank_stops_both_ranks_of_bld(tmp_path):
    """Reviewer: `stage_bld` with a library refused on rank 1 alone (per-node run folders that differ) must stop rank 0
    too, at once, rather than leave it waiting in its next collective call."""
    run = tmp_path / "run"
    _puzzle("data", "--preset", "tiny", "--out", str(run), "--bld-tokens", "256", "--no-progress")
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nfrom puzzle.cli import main\nfrom puzzle.errors import PuzzleError\n"
                      "from puzzle.library import Library\nkeep = Library.check_meta\n"
                      "def check(self, meta, replace_unbuilt=True):\n"
                      "    if os.environ['RANK'] == '1':\n"
                      "        raise PuzzleError('this rank refuses the library')\n"
                      "    return keep(self, meta, replace_unbuilt)\n"
                      f"Library.check_meta = check\ncode = main(['bld', '--out', {str(run)!r}, '--no-progress'])\n"
                      "import time; time.sleep(3 if os.environ['RANK'] == '1' else 0)  # rank 0 says its part first\n"
                      "sys.exit(code)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "this rank refuses the library" in done.stderr, done.stderr[-3000:]
    assert "another rank refused the library" in done.stderr, done.stderr[-3000:]
    assert not list((run / "library").glob("entries/L*/*")) if (run / "library").is_dir() else True


def test_a_rank_other_than_0_leaves_config_json_to_rank_0(tmp_path, monkeypatch, capsys):
    """Reviewer: a rank > 0 saved its own flags in config.json, and on failure put back the file it had read at its
    start over what rank 0 had saved since; now it neither saves nor restores the file."""
    from puzzle import pipeline
    from puzzle.cli import main

    run = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(run), "--bld-tokens", "256", "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    config["bld"]["tokens"] = 512
    by_rank_0 = json.dumps(config).encode()

    def refused(run, rank, world_size):
        assert json.loads((run.out / "config.json").read_text())["bld"]["tokens"] == 256  # not this rank's 1024
        (run.out / "config.json").write_bytes(by_rank_0)  # rank 0 saved its settings meanwhile
        raise PuzzleError("refused")

    monkeypatch.setattr(pipeline, "stage_bld", refused)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(["bld", "--out", str(run), "--bld-tokens", "1024", "--no-progress"]) == 2
    assert (run / "config.json").read_bytes() == by_rank_0


def test_a_temp_file_left_by_a_killed_process_is_removed_when_the_library_is_done(tmp_path):
    """Reviewer: SIGTERM/SIGKILL mid-write left .<file>.<random>.tmp files (a checkpoint may be GBs) for good."""
    from puzzle.bld import BLDConfig, build_library
    from puzzle.space import SpaceConfig, build_space
    from puzzle.tiny import tiny_parent

    parent = tiny_parent(seed=0).model
    calib = torch.randint(3, 299, (12, 32), generator=torch.Generator().manual_seed(1))
    space = build_space(parent.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))[:1]
    left = tmp_path / "lib" / "entries" / "L000" / ".ffn-64.bld.partial.pt.abc123.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a checkpoint")
    build_library(parent, calib, space, BLDConfig(tokens=128, batch_size=2, lr=1e-3), Library(tmp_path / "lib"))
    assert not left.exists() and not list((tmp_path / "lib").rglob("*.tmp"))


@pytest.mark.parametrize("env,words", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 WORLD_SIZE=2: give RANK from 0 to WORLD_SIZE-1 (1)"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 WORLD_SIZE=0: give WORLD_SIZE at least 1"),
    ({"RANK": "1"}, "RANK is set without WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set without RANK"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a whole number")])
def test_rank_and_world_size_set_by_hand_are_checked_before_any_work(tmp_path, monkeypatch, capsys, env, words):
    """Breaker: RANK=2 of 2 (or -1, or RANK=1 alone) trained nothing and exited 0, WORLD_SIZE=2 alone trained half as
    rank 0 without a word, and WORLD_SIZE=0 or RANK=x ended in tracebacks."""
    from puzzle.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["bld", "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("puzzle: error: environment variable") and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing made


def test_a_rank_started_by_hand_says_the_index_waits_for_the_others(tmp_path, monkeypatch, capsys):
    """Breaker: two shells with RANK=0/1 WORLD_SIZE=2 each said "10 subblocks trained", and rank 0's index.csv
    listed 23 of 40 entries without a word."""
    from puzzle.cli import main

    run = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(run), "--bld-tokens", "256", "--no-progress"]) == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    capsys.readouterr()
    assert main(["bld", "--out", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "subblocks trained by rank 1 of 2 (the other entries are the other ranks')" in err
    assert f"so rank 0 writes {run / 'library' / 'index.csv'} when it ends" in err  # (breaker: rank 1 wrote none)
    assert f"once every rank has finished, `puzzle bld --out {run}` (one process) completes the index" in err


def test_a_rank_lost_during_bld_is_said_in_one_line(tmp_path_factory, tmp_path, monkeypatch):
    """Breaker: `kill -9` of one hand-started rank gave the other gloo's traceback ("Connection closed by peer")."""
    from puzzle import bld
    from puzzle.baselines import open_run
    from puzzle.errors import PuzzleError
    from puzzle.pipeline import stage_bld

    from tiny_run import tiny_run_copy

    run = open_run(tiny_run_copy(tmp_path_factory, tmp_path / "run")[0], progress=False)

    def lost(*_, **__):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:1")

    monkeypatch.setattr(bld, "build_library", lost)
    with pytest.raises(PuzzleError, match=r"rank 0: another rank stopped during a collective operation \(Connection "
                                          r"closed by peer .*the same command run again resumes \(the entries"):
        stage_bld(run, rank=0, world_size=2)
    monkeypatch.setattr(bld, "build_library", lambda *_, **__: (_ for _ in ()).throw(RuntimeError("this rank's own")))
    with pytest.raises(RuntimeError, match="this rank's own"):  # an error of this rank stands as it is
        stage_bld(run, rank=0, world_size=2)


def test_a_rank_started_by_hand_says_it_waits_for_the_others(monkeypatch, capsys):
    """Breaker: a rank started by hand (RANK, WORLD_SIZE, MASTER_ADDR) whose peer had stopped waited for it without a
    word until killed; it now says so (`_meet_by_hand`) and names the missing rank at its deadline. Under torchrun
    (TORCHELASTIC_RUN_ID), which stops the others itself, `process_group` says nothing."""
    from puzzle import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(PuzzleError, match=r"rank\(s\) 1 of 2 did not join at 127\.0\.0\.1:\d+ within"):
        distributed._meet_by_hand(0, 2, timeout=timedelta(seconds=1), poll_s=0.1)
    assert "rank 0: waiting for the other 1 rank(s) at 127.0.0.1:" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with distributed.process_group(0, 2, device="cpu"):
        pass
    assert len(calls) == 1 and capsys.readouterr().err == ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sizes, words", [
    ((2, 2), None), ((2, 3), "rank {r} was started with WORLD_SIZE={me}, but rank {other} with WORLD_SIZE={them}")])
def test_ranks_started_by_hand_meet_or_name_their_different_world_sizes(monkeypatch, sizes, words):
    """Breaker: ranks started by hand waited in torch's rendezvous (24 h, deaf to Ctrl-C), also when their
    WORLD_SIZE values differed; they now meet in Python (`_meet_by_hand`) and refuse different values at once."""
    import threading

    from puzzle import distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    got = {}

    def rank(r):
        try:
            got[r] = distributed._meet_by_hand(r, sizes[r], timeout=timedelta(seconds=20), poll_s=0.05)
        except PuzzleError as e:
            got[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if words is None:
        assert all(isinstance(got[r], distributed.dist.TCPStore) for r in (0, 1)), got
    else:  # each refuses, naming the other's value (rank 1 may instead find rank 0's store gone)
        assert str(got[0]).startswith(words.format(r=0, me=2, other=1, them=3)), got
        assert isinstance(got[1], PuzzleError), got


def test_a_rank_waiting_by_hand_stops_on_ctrl_c(tmp_path):
    """Breaker: SIGINT and SIGTERM did not stop a rank waiting for a missing peer (kill -9 did). SIGINT here; the
    commands turn SIGTERM into the same KeyboardInterrupt (cli._terminate_as_interrupt)."""
    import signal
    import time

    script = "from puzzle.distributed import _meet_by_hand\n_meet_by_hand(0, 2)\n"
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    assert "waiting for the other 1 rank(s)" in proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=30) != 0 and "KeyboardInterrupt" in proc.stderr.read()
    finally:
        proc.kill()


@pytest.mark.parametrize("env, fsdp, words", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, False, "RANK=0 WORLD_SIZE=2 without MASTER_ADDR: start the ranks with torchrun"),
    ({}, True, "FSDP needs a process group: start the command with torchrun")])
def test_gkd_and_sft_ranks_without_a_meeting_point_are_refused_first(monkeypatch, env, fsdp, words):
    """Breaker: `gkd --fsdp` in one process, and gkd/sft ranks by hand without MASTER_ADDR, ended in torch's
    traceback (--fsdp only after the evaluation before training)."""
    from puzzle.train_utils import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PuzzleError, match=words):
        init_distributed("cpu", fsdp=fsdp)


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from puzzle.distributed import join_group
rank = int(sys.argv[1])
join_group("gloo", rank, 2)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(t.item())
dist.destroy_process_group()
"""


def test_ranks_started_by_hand_form_a_working_group():
    """`join_group` without torchrun: the ranks meet (`_meet_by_hand`) and the store carries torch's own group."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.pop("TORCHELASTIC_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert [o[0].split() for o in outs] == [["3.0"], ["3.0"]]


def test_a_rank_stopped_while_waiting_is_not_met(monkeypatch):
    """Reviewer: a rank stopped with Ctrl-C while it waited left its key behind, and the other ranks met without it
    (then waited inside torch's rendezvous). It takes its key back, so they go on waiting for it."""
    import signal
    import threading
    import time

    from puzzle import distributed

    port = str(_free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    got = {}

    def rank(r):  # rank 0 waits longer than it takes to start, stop and follow up with the others
        try:
            got[r] = distributed._meet_by_hand(r, 3, timeout=timedelta(seconds=12 if r == 0 else 3), poll_s=0.05)
        except PuzzleError as e:
            got[r] = e

    first = threading.Thread(target=rank, args=(0,))
    first.start()
    script = "from puzzle.distributed import _meet_by_hand\n_meet_by_hand(1, 3)\n"
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert "waiting for the other 2 rank(s)" in proc.stderr.readline()
        time.sleep(1.0)  # it has written its key
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
    last = threading.Thread(target=rank, args=(2,))
    last.start()
    first.join(60)
    last.join(60)
    assert isinstance(got[2], PuzzleError) and "rank(s) 1 of 3 did not join" in str(got[2]), got
    assert isinstance(got[0], PuzzleError) and "rank(s) 1, 2 of 3 did not join" in str(got[0]), got  # 2 gave up
