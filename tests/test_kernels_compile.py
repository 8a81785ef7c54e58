"""Every kernel compiles for Hopper (sm_90) ahead of time, without a GPU: Triton's front end, its passes and ptxas.

The interpreter tests check the arithmetic; this catches what only the compiler sees (types, tl.dot shape rules,
constexpr use, register and shared-memory limits). It runs in a subprocess with TRITON_INTERPRET unset, since
under the interpreter `@triton.jit` functions cannot be compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compile_all() -> list[str]:
    """Compile one Hopper configuration of each kernel in bf16, and every prefill and decode tile for wide rows (fp32,
    head_dim 256); returns 'name: shared bytes' lines."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from puzzle.kernels import attention_decode, attention_prefill, rmsnorm, swiglu

    def compile_one(kernel, pointers: dict, floats: tuple, constexprs: dict, config: triton.Config):
        constexprs = {**constexprs, **config.kwargs}
        signature = {
            name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
            for name in kernel.arg_names
        }
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        return f"{kernel.fn.__name__}: {compiled.metadata.shared}"

    bf16 = "*bf16"
    lines = [
        compile_one(attention_prefill._prefill_attention_kernel, dict.fromkeys("QKVO", bf16), ("qk_scale",),
                    {"BLOCK_D": 128, "DOT_PRECISION": None}, attention_prefill._configs(True)[0]),
        *(compile_one(attention_prefill._prefill_attention_kernel, dict.fromkeys("QKVO", "*fp32"), ("qk_scale",),
                      {"BLOCK_D": 256, "DOT_PRECISION": "ieee"}, config).replace(":", f" fp32 d256 {i}:")
          for i, config in enumerate(attention_prefill._configs(True, wide=True))),  # breaker: none fitted
        compile_one(attention_decode._decode_partial_kernel,
                    {**dict.fromkeys("QKV", bf16), "LENGTHS": "*i32", **dict.fromkeys(["ACC", "M", "L"], "*fp32")},
                    ("qk_scale",), {"BLOCK_H": 16, "BLOCK_D": 128, "DOT_PRECISION": None},
                    attention_decode._configs(True)[0]),
        *(compile_one(attention_decode._decode_partial_kernel,
                      {**dict.fromkeys("QKV", "*fp32"), "LENGTHS": "*i32", **dict.fromkeys(["ACC", "M", "L"], "*fp32")},
                      ("qk_scale",), {"BLOCK_H": 64, "BLOCK_D": 256, "DOT_PRECISION": "ieee"}, config
                      ).replace(":", f" fp32 d256 {i}:")
          for i, config in enumerate(attention_decode._configs(True, wide=True))),
        compile_one(attention_decode._decode_merge_kernel, {**dict.fromkeys(["ACC", "M", "L"], "*fp32"), "O": bf16},
                    (), {"BLOCK_P": 4, "BLOCK_D": 128}, triton.Config({}, num_warps=4)),
        compile_one(rmsnorm._rms_norm_fwd_kernel, {**dict.fromkeys("XRWYH", bf16), "RSTD": "*fp32"}, ("eps",),
                    {"HAS_RESIDUAL": True, "BLOCK_C": 4096}, rmsnorm._configs(True)[-1]),
        compile_one(rmsnorm._rms_norm_bwd_kernel,
                    {**dict.fromkeys(["DY", "DH_OUT", "H", "W", "DH"], bf16), "RSTD": "*fp32", "DW_PART": "*fp32"},
                    (), {"HAS_DH_OUT": True, "BLOCK_C": 4096}, rmsnorm._configs(True)[-1]),
        compile_one(swiglu._swiglu_fwd_kernel, dict.fromkeys("GUY", bf16), (), {}, swiglu._configs(True)[-1]),
        compile_one(swiglu._swiglu_bwd_kernel, dict.fromkeys(["DY", "G", "U", "DG", "DU"], bf16), (), {},
                    swiglu._configs(True)[-1]),
    ]
    return lines


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton without its bundled ptxas")
def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = dict(line.split(": ") for line in done.stdout.strip().splitlines())
    assert len(compiled) == 13
    assert all(int(shared) <= 227 * 1024 for shared in compiled.values())  # an H100/H200 SM's shared memory


if __name__ == "__main__":
    print("\n".join(_compile_all()))
