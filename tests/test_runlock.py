"""One puzzle command at a time per run directory (puzzle/runlock.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.runlock import lock_path, run_lock


def _hold_in_another_process(run_dir):
    """A child process that holds run_dir's lock until its stdin closes; returns it once the lock is held."""
    code = textwrap.dedent(f"""
        import sys
        from puzzle.runlock import run_lock
        with run_lock({str(run_dir)!r}, ["puzzle", "fuse", "--out", {str(run_dir)!r}, "--name", "child-2x"]):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_run_directory_is_refused_naming_the_first(tmp_path, capsys):
    """Breaker: two `puzzle fuse` calls on one child at once were not locked against each other."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_in_another_process(run)
    try:
        assert main(["front", "--out", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"another puzzle command is working on {run}: pid {proc.pid}" in err, err
        assert "`puzzle fuse --out" in err and "--name child-2x`" in err and "give another --out" in err, err
        assert list(run.iterdir()) == []  # the refused command wrote nothing there
        with pytest.raises(PuzzleError, match="another puzzle command"):
            with run_lock(tmp_path / "x" / ".." / "run"):  # the same folder spelt another way
                pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    with run_lock(run):  # released when that process ended
        pass


def test_a_killed_command_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    proc = _hold_in_another_process(run)
    proc.kill()
    proc.wait(timeout=60)
    with run_lock(run):
        assert lock_path(run).exists() and not run.exists()  # the lock lives outside the run directory


def test_nested_commands_and_torchrun_ranks_take_no_second_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with run_lock(run):
        with run_lock(run):  # a command run inside another in the same process
            pass
    proc = _hold_in_another_process(run)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # ranks of one torchrun job share their run directory
        with run_lock(run):
            pass
        monkeypatch.setenv("WORLD_SIZE", "1")
        with pytest.raises(PuzzleError, match="another puzzle command"):
            with run_lock(run):
                pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    with run_lock(None):  # no run directory (puzzle search --library alone): nothing to lock
        pass
