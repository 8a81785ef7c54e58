"""The one error type the CLI turns into a one-line message (no traceback unless --debug)."""


class PuzzleError(Exception):
    """A problem the user can fix: the message names the problem and what to change."""


def require_finite(what: str, **values) -> None:
    """Refuse settings that are not finite real numbers (NaN, ±inf, text, booleans) before any work.

    Raises:
        PuzzleError: naming every such setting of `what` (e.g. "sft", "gkd", "rpo").
    """
    import math

    bad = [f"{k}={v!r}" for k, v in values.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise PuzzleError(f"{what}: {', '.join(bad)}: give a finite number")
