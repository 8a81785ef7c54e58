"""puzzle: distillation-based neural architecture search for Llama-family LLMs (Puzzle, Bercovich et al. 2024)."""

__version__ = "0.1.0"
