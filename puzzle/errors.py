"""The one error type the CLI turns into a one-line message (no traceback unless --debug)."""


class PuzzleError(Exception):
    """A problem the user can fix: the message names the problem and what to change."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message without terminal colour codes (torch.load's carry them), or its
    type's name when it has no message: for a one-line PuzzleError that quotes a library's error."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


#: the largest AdamW learning rate any training stage takes: each step moves a weight by up to about lr, and a model's
#: weights are about unit scale, so a rate of 1 or more wipes them out in a step or two (breaker: sft --lr 1e6 ended
#: at ln(vocab), a uniform guess, with a zero gradient, and exported it as trained)
MAX_LEARNING_RATE = 1.0


#: what a learning rate is, for messages: its range and why
LEARNING_RATE_RANGE = (f"a learning rate in (0, {MAX_LEARNING_RATE:g}): AdamW moves each weight by up to about that "
                       f"much per step, so a rate of 1 or more destroys the model; fine-tuning uses about 1e-6 to "
                       f"1e-4, BLD about 1e-4 to 1e-3")


def require_learning_rate(what: str, lr, name: str = "--lr") -> None:
    """Refuse an AdamW learning rate that is not a finite number in (0, MAX_LEARNING_RATE) before any work.

    Raises:
        PuzzleError: naming `what` (e.g. "sft"), the setting `name` and the usual range.
    """
    if not (is_finite_number(lr) and 0 < lr < MAX_LEARNING_RATE):
        raise PuzzleError(f"{what}: {name} {lr!r} is not {LEARNING_RATE_RANGE}")


def differing_settings(saved: dict, meta: dict, prefix: str = "") -> list[str]:
    """The keys where two metas differ, nested dicts by their dotted keys ("config.checkpoint_every", with the
    saved and new values for a setting): reviewer, "differs in ['config']" named no setting."""
    out = []
    for k in sorted(set(saved) | set(meta), key=str):
        a, b = saved.get(k), meta.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_settings(a, b, f"{prefix}{k}.")
        elif isinstance(a, (int, float, str, bool, type(None))) and isinstance(b, (int, float, str, bool, type(None))) \
                and len(repr(a)) + len(repr(b)) < 80:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
        else:
            out.append(f"{prefix}{k}")
    return out


def shell_arg(value) -> str:
    """`value` (a path, mostly) as one shell word for a command a message suggests: quoted where it holds spaces or
    shell characters (`shlex.quote`), as it is otherwise (breaker: `--out r sp ü` split a run folder in three)."""
    import shlex

    return shlex.quote(str(value))
