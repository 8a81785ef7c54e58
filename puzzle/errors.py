"""The one error type the CLI turns into a one-line message (no traceback unless --debug)."""


class PuzzleError(Exception):
    """A problem the user can fix: the message names the problem and what to change."""


def is_finite_number(value) -> bool:
    """Whether `value` is a finite real int or float (not NaN, ±inf, text or a boolean)."""
    import math

    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def require_finite(what: str, **values) -> None:
    """Refuse settings that are not finite real numbers (NaN, ±inf, text, booleans) before any work.

    Raises:
        PuzzleError: naming every such setting of `what` (e.g. "sft", "gkd", "rpo").
    """
    bad = [f"{k}={v!r}" for k, v in values.items() if not is_finite_number(v)]
    if bad:
        raise PuzzleError(f"{what}: {', '.join(bad)}: give a finite number")
