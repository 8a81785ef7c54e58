"""Triton kernels with plain-torch references (installed as `puzzle.kernels`).

Importing this package imports nothing heavy; each op lives in its own module.
"""
