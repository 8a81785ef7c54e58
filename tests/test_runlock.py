"""One puzzle command at a time per run directory (puzzle/runlock.py)."""

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.runlock import lock_path, run_lock


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Lock files under this test's folder, not the machine's temporary folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return folder


def _hold_in_another_process(run_dir, env=None, make=False, shared=False, command="fuse"):
    """A child process that holds run_dir's locks until its stdin closes; returns it once they are held.
    make: it makes run_dir after taking them, as `puzzle run` does on a new run (pipeline.Run)."""
    code = textwrap.dedent(f"""
        import os, sys
        from puzzle.runlock import claim_folder, run_lock
        with run_lock({str(run_dir)!r}, ["puzzle", {command!r}, "--out", {str(run_dir)!r}, "--name", "child-2x"],
                      shared={shared}):
            if {make}:
                os.mkdir({str(run_dir)!r})
                claim_folder({str(run_dir)!r})
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc):
    proc.stdin.close()
    proc.wait(timeout=60)


def _refused(run, match=None, shared=False) -> str:
    """The message of the refusal run_lock(run) meets (the test fails if it is not refused)."""
    with pytest.raises(PuzzleError, match=match) as refused:
        with run_lock(run, shared=shared):
            pass
    return str(refused.value)


def test_a_second_command_on_a_run_directory_is_refused_naming_the_first(tmp_path, capsys):
    """Breaker: two `puzzle fuse` calls on one child at once were not locked against each other."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_in_another_process(run)
    try:
        assert main(["front", "--out", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"another puzzle command is working on {run}: pid {proc.pid}" in err, err
        assert "`puzzle fuse --out" in err and f"--name child-2x` in {os.getcwd()}" in err, err
        assert "give another --out" in err and "Traceback" not in err
        assert list(run.iterdir()) == []  # the refused command wrote nothing there
        _refused(tmp_path / "x" / ".." / "run", match="another puzzle command")  # the same folder spelt another way
    finally:
        _release(proc)
    with run_lock(run):  # released when that process ended
        pass
    assert not lock_path(run).exists()  # the holder removes its lock file


def test_the_folder_itself_is_locked_across_temporary_folders_and_renames(tmp_path, private_tmp):
    """Breaker: with another TMPDIR (a batch job's) a second command ran beside the first, and after a rename of the
    run directory too."""
    run, other_tmp = tmp_path / "run", tmp_path / "other-tmp"
    run.mkdir()
    other_tmp.mkdir()
    proc = _hold_in_another_process(run, env={"TMPDIR": str(other_tmp)})
    try:
        _refused(run, match="another path .before a rename., as another user or with another TMPDIR")
        run.rename(tmp_path / "renamed")
        _refused(tmp_path / "renamed", match="another puzzle command is working on")
    finally:
        _release(proc)


def test_a_run_directory_not_made_yet_is_locked_by_its_path(tmp_path):
    run = tmp_path / "new-run"
    proc = _hold_in_another_process(run)
    try:
        run.mkdir()  # the first command made it meanwhile
        _refused(run, match=f"pid {proc.pid}")
    finally:
        _release(proc)


def test_a_killed_command_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_in_another_process(run)
    proc.kill()
    proc.wait(timeout=60)
    assert lock_path(run).exists()  # left by the killed holder, but no longer locked
    with run_lock(run):
        assert lock_path(run).parent.stat().st_mode & 0o777 == 0o700


def test_nested_commands_and_torchrun_ranks(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with run_lock(run):
        with run_lock(run):  # a command run inside another in the same process
            pass
    proc = _hold_in_another_process(run)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")  # the other ranks of a torchrun job take none
        with run_lock(run):
            pass
        monkeypatch.setenv("RANK", "0")  # rank 0 takes it for the job
        _refused(run, match="another puzzle command")
        monkeypatch.setenv("WORLD_SIZE", "abc")  # breaker: a ValueError traceback for every command with --out
        _refused(run, match="another puzzle command")
    finally:
        _release(proc)
    with run_lock(None):  # no run directory (puzzle search --library alone): nothing to lock
        pass


def test_a_lock_folder_open_to_others_or_a_planted_link_is_not_used(tmp_path, private_tmp, capsys):
    """Breaker: another user who made <tmp>/puzzle-locks-<uid> could plant a link there, and the lock emptied the
    file it pointed to."""
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("keep me")
    folder = lock_path(run).parent
    folder.mkdir(mode=0o700)
    lock_path(run).symlink_to(victim)
    with run_lock(run):
        pass
    assert victim.read_text() == "keep me" and "cannot be used" in capsys.readouterr().err
    lock_path(run).unlink()
    folder.chmod(0o777)
    with run_lock(run):
        assert not lock_path(run).exists()
    assert victim.read_text() == "keep me" and "not a folder of this user closed to others" in capsys.readouterr().err


def test_odd_bytes_in_the_path_or_the_command_line(tmp_path):
    """Breaker: a non-UTF-8 byte in --out or another argument gave a UnicodeEncodeError traceback."""
    run = os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xff")
    with run_lock(run, ["puzzle", "export", "--out", run, "--name", "x\udcff"]):
        assert b"\\udcff" in open(lock_path(run), "rb").read()


def test_a_run_directory_made_by_the_command_is_locked_as_a_folder_too(tmp_path):
    """Breaker: `puzzle run` on a new folder held the path lock only, so a command with another TMPDIR (or after a
    rename) ran beside it for the whole run."""
    run, other_tmp = tmp_path / "new-run", tmp_path / "other-tmp"
    other_tmp.mkdir()
    proc = _hold_in_another_process(run, env={"TMPDIR": str(other_tmp)}, make=True)
    try:
        _refused(run, match="another path .before a rename., as another user or with another TMPDIR")
    finally:
        _release(proc)


def test_a_killed_holders_longer_note_does_not_show_through(tmp_path):
    """Breaker: a shorter note written over a killed holder's kept the old one's tail in the refusal."""
    run = tmp_path / "run"
    run.mkdir()
    lock_path(run).parent.mkdir(mode=0o700)
    lock_path(run).write_text("pid 1, `puzzle front --out run --front-speedups 1.25,1.5,2,3 --remeasure` " + "x" * 300)
    proc = _hold_in_another_process(run)
    try:
        message = _refused(run)
        assert "xxx" not in message and f"pid {proc.pid}" in message
    finally:
        _release(proc)


def test_gkd_and_sft_share_the_run_but_not_with_a_whole_lock(tmp_path, capsys):
    """Breaker: two `puzzle gkd` runs of different children (one per GPU) were refused, for hours."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_in_another_process(run, shared=True, command="gkd")
    try:
        with run_lock(run, shared=True):  # a second gkd or sft beside it
            pass
        assert lock_path(run).exists()  # still held by the other
        assert main(["export", "--out", str(run)]) == 2
        assert f"pid {proc.pid}, `puzzle gkd --out" in capsys.readouterr().err
    finally:
        _release(proc)
    assert not lock_path(run).exists()  # the last shared holder removed it
    proc = _hold_in_another_process(run)
    try:
        _refused(run, match="`puzzle fuse", shared=True)  # no gkd beside a whole lock
    finally:
        _release(proc)


def test_a_file_system_without_flock_on_folders_gives_no_traceback(tmp_path, monkeypatch, capsys):
    """Breaker: ENOSYS from flock on the folder (Lustre without -o flock) ended every command in a traceback."""
    import fcntl
    import stat as st

    real = fcntl.flock

    def flock(fd, op):
        if st.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(38, "Function not implemented")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        assert lock_path(run).exists()  # the path lock still holds
    assert capsys.readouterr().err == ""  # the path lock still names a second command: nothing to warn of


def test_without_a_usable_lock_file_the_folder_lock_still_refuses_and_says_what_it_knows(tmp_path, capsys):
    """Breaker: with the lock folder open to others the warning said the run was not locked, and the refusal blamed
    another path, user or TMPDIR."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_in_another_process(run)
    try:
        lock_path(run).parent.chmod(0o777)
        _refused(run, match="a command this one cannot name, as its lock file could not be used")
        err = capsys.readouterr().err
        assert "refused by the lock on the folder alone" in err and "is not locked" not in err, err
    finally:
        lock_path(run).parent.chmod(0o700)
        _release(proc)


def test_the_same_child_trained_twice_at_once_is_refused(tmp_path, tmp_path_factory, capsys):
    """Breaker: gkd takes the run's lock shared, so two gkd of one child both trained into DIR/gkd/<name>; the second
    lost its training at the export and left a checkpoint the first's rerun refused."""
    import shutil

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_run import tiny_run_dir

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), run)
    code = textwrap.dedent(f"""
        import sys
        from puzzle.runlock import WORK_ADVICE, also_lock, run_lock
        with run_lock({str(run)!r}, ["puzzle", "gkd", "--out", {str(run)!r}, "--name", "child-1.5x"], shared=True):
            also_lock({str(run / "gkd" / "child-1.5x")!r}, WORK_ADVICE)
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    try:
        base = ["gkd", "--out", str(run), "--no-eval", "--no-progress", "--stop-after-steps", "1", "--tokens", "256"]
        assert main([*base, "--name", "child-1.5x"]) == 2
        err = capsys.readouterr().err
        assert f"working on {run / 'gkd' / 'child-1.5x'}: pid {proc.pid}" in err, err
        assert f"`puzzle gkd --out {run} --name child-1.5x`" in err, err  # the command's line, not sys.argv's
        assert "One training per work folder and export folder at a time" in err and "another --dest" in err
        assert not (run / "export" / "child-1.5x-gkd").exists()
        assert main([*base, "--name", "child-1.25x"]) == 0  # another child beside it
    finally:
        _release(proc)
    with run_lock(run):  # main released the work folder's lock with the run's
        pass
    assert list(lock_path(run).parent.iterdir()) == []


def test_a_trainings_export_folder_is_locked_too_and_released_without_a_run(tmp_path):
    """Breaker: a second gkd with the same --dest but another --work trained beside the first, which then lost its
    training at the export; and without --out the work folders' lock files were never removed."""
    from puzzle.runlock import WORK_ADVICE, also_lock

    dest = tmp_path / "D"
    code = textwrap.dedent(f"""
        import sys
        from puzzle.runlock import WORK_ADVICE, also_lock, run_lock
        with run_lock(None):
            for folder in ({str(tmp_path / "D.gkd-work")!r}, {str(dest)!r}):
                also_lock(folder, WORK_ADVICE)
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    try:
        with run_lock(None):
            also_lock(tmp_path / "W-other", WORK_ADVICE)  # another --work ...
            with pytest.raises(PuzzleError, match=f"working on {dest}: pid {proc.pid}"):
                also_lock(dest, WORK_ADVICE)  # ... and the same --dest
        assert not lock_path(tmp_path / "W-other").exists()  # released and removed with the command
    finally:
        _release(proc)
    assert list(lock_path(dest).parent.iterdir()) == []


def test_two_writers_of_one_export_folder_are_refused(tmp_path, tmp_path_factory, capsys):
    """Breaker: `puzzle export --dest D` of two runs at once, one removed the other's half-written folder (a
    safetensors traceback), and where both finished the second wrote over the first unsaid; merge --dest alike."""
    import shutil

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_run import tiny_run_dir

    run, dest = tmp_path / "run", tmp_path / "D"
    shutil.copytree(tiny_run_dir(tmp_path_factory), run)
    code = textwrap.dedent(f"""
        import sys
        from puzzle.runlock import EXPORT_ADVICE, also_lock, run_lock
        with run_lock(None, ["puzzle", "export", "--out", "other-run", "--dest", {str(dest)!r}]):
            also_lock({str(dest)!r}, EXPORT_ADVICE)
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    from puzzle.export import export_checkpoint
    from puzzle.tiny import tiny_parent

    children = []
    for i in (0, 1):
        lm = tiny_parent(seed=i)
        children.append(str(export_checkpoint(lm.model, lm.tokenizer, tmp_path / f"m{i}").path))
    try:
        for argv in (["export", "--out", str(run), "--name", "child-1.5x", "--dest", str(dest), "--no-progress"],
                     ["merge", *children, "--dest", str(dest)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"working on {dest}: pid {proc.pid}" in err and "give another --dest" in err, err
            assert not dest.exists()
    finally:
        _release(proc)
    assert main(["merge", *children, "--dest", str(dest)]) == 0 and (dest / "config.json").is_file()
    assert list(lock_path(dest).parent.iterdir()) == []


@pytest.mark.parametrize("argv", [["run"], ["score"], ["search"], ["realize"], ["front"], ["eval", "MODEL"]])
def test_one_process_commands_refuse_to_be_one_of_several_ranks(tmp_path, monkeypatch, capsys, argv):
    """Breaker: `torchrun --nproc_per_node 2 -m puzzle run` ran the pipeline twice into one folder, rank 1 unlocked."""
    from puzzle.cli import _one_process_refusal

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"puzzle {argv[0]} runs in one process" in err and "env -u RANK -u WORLD_SIZE" in err
    assert ("puzzle bld --out DIR" in err) == (argv[0] == "run")
    assert not (tmp_path / "run").exists()
    assert all(_one_process_refusal(c) is None for c in ("bld", "gkd", "sft", "presets", None))
    for world in ("1", "", "abc", "²"):  # one process, or no torchrun job (as `runlock.takes_lock` reads it)
        monkeypatch.setenv("WORLD_SIZE", world)
        assert _one_process_refusal(argv[0]) is None
