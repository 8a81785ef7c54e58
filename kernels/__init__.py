"""Triton kernels with plain-torch references (installed as `puzzle.kernels`).

Importing this package imports nothing heavy; each op lives in its own module (kernel, launcher, autograd
Function where a backward exists, torch reference):

    rmsnorm            RMSNorm fused with the residual add, forward and backward
    swiglu             silu(gate) * up, forward and backward
    attention_prefill  causal grouped-query flash attention, forward
    attention_decode   one query per sequence over a KV cache, split along the keys
    ops                the four ops above: Triton on CUDA tensors, the torch reference elsewhere
    utils              compiled-or-interpreted launches, device facts

On CPU tensors the kernels run in Triton's interpreter (slow; for tests). Needs triton (installed with
puzzle on Linux; PyPI has no triton for macOS or Windows).
"""
