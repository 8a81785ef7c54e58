"""The dispatch module, the package's import-lightness, interpreter use whatever the import order, the benchmark.

On CPU the kernels run in Triton's interpreter (see test_kernels_rmsnorm.py).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (if this module is the first)

import pytest  # noqa: E402

from puzzle.kernels import ops  # noqa: E402
from puzzle.kernels.attention_decode import decode_attention_reference  # noqa: E402
from puzzle.kernels.attention_prefill import prefill_attention_reference  # noqa: E402
from puzzle.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from puzzle.kernels.swiglu import swiglu_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cpu_tensors_use_the_reference_by_default_and_the_kernel_when_forced():
    x, r = torch.randn(3, 40), torch.randn(3, 40)
    w = torch.rand(40, requires_grad=True)
    y_default, _ = ops.rms_norm(x, w, r)
    y_forced, _ = ops.rms_norm(x, w, r, use_triton=True)
    assert "RMSNormFunction" not in y_default.grad_fn.name()
    assert "RMSNormFunction" in y_forced.grad_fn.name()
    torch.testing.assert_close(y_forced, rms_norm_reference(x, w, r)[0], atol=1e-5, rtol=1e-5)

    g = torch.randn(5, 33, requires_grad=True)
    u = torch.randn(5, 33)
    assert "SwiGLUFunction" not in ops.swiglu(g, u).grad_fn.name()
    forced = ops.swiglu(g, u, use_triton=True)
    assert "SwiGLUFunction" in forced.grad_fn.name()
    torch.testing.assert_close(forced, swiglu_reference(g, u), atol=1e-5, rtol=1e-5)


def test_attention_ops_agree_on_both_paths():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 11, 64, generator=gen)
    k, v = torch.randn(1, 2, 11, 64, generator=gen), torch.randn(1, 2, 11, 64, generator=gen)
    expected = prefill_attention_reference(q, k, v)
    torch.testing.assert_close(ops.prefill_attention(q, k, v), expected, atol=0, rtol=0)
    torch.testing.assert_close(ops.prefill_attention(q, k, v, use_triton=True), expected, atol=1e-5, rtol=1e-5)

    q1 = q[:, :, -1:]
    expected = decode_attention_reference(q1, k, v, 9)
    torch.testing.assert_close(ops.decode_attention(q1, k, v, 9, use_triton=False), expected, atol=0, rtol=0)
    torch.testing.assert_close(ops.decode_attention(q1, k, v, 9, use_triton=True), expected, atol=1e-5, rtol=1e-5)


def test_package_is_import_light_and_not_hugging_faces_kernels():
    """transformers probes for a package named `kernels`: ours imports nothing on import and has no __version__."""
    init = (REPO / "kernels" / "__init__.py").read_text()
    tree = ast.parse(init)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert "__version__" not in init
    done = _run("import sys, puzzle.kernels as k\nprint(k.__file__, 'triton' in sys.modules)")
    assert done.returncode == 0, done.stderr
    path, triton_loaded = done.stdout.split()
    assert Path(path) == REPO / "kernels" / "__init__.py"
    assert triton_loaded == "False"


def test_interpreter_works_when_triton_was_imported_without_it():
    """triton imported first in compiled mode (no TRITON_INTERPRET): CPU launches still interpret, and leave no patch."""
    done = _run(
        "import triton, torch\n"
        "from triton.runtime.jit import JITFunction\n"
        "call = JITFunction.__call__\n"
        "assert isinstance(triton.language.sum, JITFunction)\n"
        "from puzzle.kernels.ops import rms_norm, swiglu\n"
        "from puzzle.kernels.rmsnorm import rms_norm_reference\n"
        "x, w = torch.randn(4, 50), torch.rand(50)\n"
        "torch.testing.assert_close(rms_norm(x, w, use_triton=True)[0], rms_norm_reference(x, w)[0])\n"
        "g = torch.randn(4, 50)\n"
        "torch.testing.assert_close(swiglu(g, g, use_triton=True), torch.nn.functional.silu(g) * g)\n"
        "assert JITFunction.__call__ is call\n"
        "print('ok')"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_benchmark_exits_with_a_clear_message_without_cuda(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--csv", str(tmp_path / "k.csv")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stderr
    assert not (tmp_path / "k.csv").exists()
