"""Kill BLD with SIGKILL at any moment, rerun: nothing finished is redone and the library equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from puzzle.library import Library

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from puzzle.bld import BLDConfig, build_library
    from puzzle.library import Library
    from puzzle.space import SpaceConfig, build_space
    from puzzle.tiny import tiny_parent

    def build(out, checkpoint_s):
        parent = tiny_parent(seed=0).model
        calib = torch.randint(3, 299, (18, 32), generator=torch.Generator().manual_seed(1))
        space = build_space(parent.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))[:2]
        cfg = BLDConfig(tokens=512, batch_size=2, lr=1e-3, linear_train="adam", checkpoint_s=checkpoint_s)
        return build_library(parent, calib, space, cfg, Library(out))

    if __name__ == "__main__":
        build(sys.argv[1], float(sys.argv[2]))
""")


def _entries(root: Path) -> dict[str, tuple[int, str]]:
    """Finished bld entries: info file -> (weights mtime, sha256)."""
    out = {}
    for p in root.glob("entries/L*/*.bld.json"):
        try:
            info = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        out[str(p.relative_to(root))] = (os.stat(root / info["file"]).st_mtime_ns, info["sha256"])
    return out


def _start(script: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_mid_entry(proc: subprocess.Popen, out: Path, at_least: int, timeout_s: float = 120.0) -> int:
    """SIGKILL once `at_least` entries are finished and another one has a training checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_entries(out)) >= at_least and any(out.glob("entries/L*/*.partial.pt")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    return proc.returncode


def test_sigkill_twice_then_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "bld_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "killed"
    assert _kill_mid_entry(_start(script, out), out, at_least=1) == -signal.SIGKILL
    first = _entries(out)
    assert _kill_mid_entry(_start(script, out), out, at_least=len(first) + 2) == -signal.SIGKILL
    second = _entries(out)
    assert {k: second[k] for k in first} == first  # nothing finished was written again
    done = subprocess.run([sys.executable, str(script), str(out), "0"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = _entries(out)
    assert {k: final[k] for k in second} == second
    assert not list(out.glob("entries/L*/*.partial.pt"))  # checkpoints are removed once their entry is saved

    # the uninterrupted run, in this process with the same thread count (checkpoints off)
    ref_dir = tmp_path / "reference"
    namespace: dict = {}
    exec(compile(SCRIPT, "bld_run", "exec"), namespace)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        namespace["build"](ref_dir, 1e9)
    finally:
        torch.set_num_threads(threads)
    a, b = Library(out).index(), Library(ref_dir).index()
    assert len(a) == len(b) == 16  # 2 layers x (kv1, linear attention, ffn-64, linear ffn) x (init, bld)
    cols = ["layer", "subblock", "variant", "stage", "init", "tokens", "init_nmse", "final_nmse", "status"]
    assert a[cols].equals(b[cols])
    resumed = [json.loads(p.read_text())["resumed_at_step"] for p in out.glob("entries/L*/*.bld.json")]
    assert max(resumed) > 0  # at least one entry continued from its checkpoint
    for r in a.itertuples():
        wa, wb = Library(out).load(r.layer, r.variant, r.stage), Library(ref_dir).load(r.layer, r.variant, r.stage)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_a_checkpoint_planned_for_other_tokens_restarts_its_entry(tmp_path):
    """Reviewer: a block checkpoint written under one bld.coupled_tokens (a resource setting the library's meta leaves
    out) was resumed under another plan's steps and schedule, and the entry recorded the new plan."""
    import pytest

    from puzzle.bld import BLDConfig, build_library
    from puzzle.space import SpaceConfig, build_space
    from puzzle.tiny import tiny_parent

    parent = tiny_parent(seed=0).model
    calib = torch.randint(3, 299, (18, 32), generator=torch.Generator().manual_seed(1))
    space = build_space(parent.config, SpaceConfig(ffn_fractions=(0.5,), ffn_multiple=16))[:1]
    library = Library(tmp_path / "lib")
    library.save_partial(0, "ffn-64", {"planned_tokens": 999, "step": 3})  # read only if its plan were this one
    with pytest.warns(UserWarning, match="layer 0 ffn-64: its training checkpoint was planned for 999 tokens, this "
                                         "run plans 512; that entry restarts"):
        build_library(parent, calib, space, BLDConfig(tokens=512, batch_size=2, lr=1e-3), library)
    info = library.info(0, "ffn-64", "bld")
    assert info["resumed_at_step"] == 0 and info["planned_tokens"] == info["tokens"] == 512
