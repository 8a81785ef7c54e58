"""Budgets for the search: what the user asks for, and the absolute bounds it means for one parent.

A budget is written as a fraction of the parent's total ("0.67", "67%", "1/1.5") or as an absolute
value with a unit. Fractions need the parent's totals (the parent's rows of the score table plus the
non-block row), so the user's strings live in a `BudgetRequest` until `resolve` turns them into a
`Budgets` of absolute values that the solver reads.

    flag              fraction of           absolute forms
    --max-runtime     parent runtime_ms     250ms, 1.5s, 800us
    --max-prefill     parent prefill_ms     (same)
    --max-decode      parent decode_ms      (same)
    --max-memory      parent memory_mib     2GiB, 512MiB, 300MB, 1.5GB, 4096KiB
    --max-params      parent params         60M, 1.2B, 500K
    --speedup S       (shorthand for --max-runtime 1/S)   1.5, 1.5x
    --min-throughput  (generated tokens/s at the workload's batch)  1200tok/s, or 1.5x the parent

Runtime is the whole model's latency for the declared workload (prefill of the prompt plus the
decode steps, embedding and LM head included), so a throughput bound R (generated tokens per
second) is the latency bound  runtime_ms <= 1000 * batch_size * gen_len / R  (DESIGN.md, "Mixed-
integer program": throughput is linear once rewritten as a latency bound).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import PuzzleError

# column of the score table -> the flag that bounds it (used in messages)
BUDGET_FLAGS = {
    "runtime_ms": "--max-runtime",
    "prefill_ms": "--max-prefill",
    "decode_ms": "--max-decode",
    "memory_mib": "--max-memory",
    "params": "--max-params",
}

MAX_FRACTION = 10.0  # a bare number above this is almost surely an absolute value missing its unit

_NUMBER = r"((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"  # as Python's float reads: 5, 5., .5, 5.5e3
_TIME_UNITS_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3, "min": 6e4}
_MEMORY_UNITS_MIB = {
    "b": 1 / 2**20, "kib": 1 / 2**10, "mib": 1.0, "gib": 2**10, "tib": 2**20,
    "kb": 1e3 / 2**20, "mb": 1e6 / 2**20, "gb": 1e9 / 2**20, "tb": 1e12 / 2**20,
}
_COUNT_UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}

_FORMS = {
    "time": "a fraction of the parent's (0.67, 67%, 1/1.5) or a time with a unit (250ms, 1.5s, 800us)",
    "memory": "a fraction of the parent's (0.5, 50%) or a size with a unit (2GiB, 512MiB, 300MB)",
    "params": "a fraction of the parent's (0.5, 50%) or a count with a unit (60M, 1.2B, 500K)",
    "speedup": "a factor of at least 0.1 (1.5 or 1.5x; below 1 the child may be slower than the parent)",
    "throughput": "generated tokens per second (1200tok/s) or a multiple of the parent's (1.5x), at least 0.1 of "
                  "the parent's rate",
}


@dataclass(frozen=True)
class Budgets:
    """Absolute upper bounds on the child's predicted totals (None: unbounded).

    Totals include the non-block costs (embedding, final norm, LM head). Units are those of the
    score table columns: milliseconds for the workload, MiB, parameter count.
    """

    max_runtime_ms: float | None = None
    max_prefill_ms: float | None = None
    max_decode_ms: float | None = None
    max_memory_mib: float | None = None
    max_params: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise PuzzleError(f"budget {f.name}={value!r} must be a positive finite number")

    def limits(self) -> dict[str, float]:
        """{score-table column: bound} for the bounds that are set, e.g. {"runtime_ms": 412.0}."""
        return {f.name[len("max_"):]: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def met_by(self, totals: Mapping[str, float] | None) -> bool:
        """Whether `totals` ({column: total}, e.g. a search record or a choice's table totals) meets every bound set
        here, to a relative 1e-9 (the solver's own rounding); None (no totals) meets none."""
        return totals is not None and all(totals[c] <= bound * (1 + 1e-9) for c, bound in self.limits().items())

    def describe(self) -> str:
        """'max_runtime_ms=412.0, max_memory_mib=2048.0' (or 'no budget')."""
        parts = [f"max_{column}={bound:.6g}" for column, bound in self.limits().items()]
        return ", ".join(parts) if parts else "no budget"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def above_parent(self, parent_totals: Mapping[str, float], parent_not_best: str | None = None) -> list[str]:
        """Notes on the bounds the parent itself meets, e.g. 'max_memory_mib=2048 is 3.79x the parent's 540.3: the
        parent meets it, so it does not bind'. Such a bound leaves the choice free only while the parent is the
        best child without budgets; `parent_not_best` says why it may not be (an objective other than KL, the
        parent's variants excluded), and the note then says the bound may still bind. Empty when every bound is
        tighter than the parent's total or the total is unknown."""
        notes = []
        for column, bound in self.limits().items():
            total = parent_totals.get(column)
            if total is not None and math.isfinite(float(total)) and 0 < float(total) <= bound:
                ratio = bound / float(total)  # breaker: 1e308 printed as a 300-digit ratio
                times = f"{ratio:.2f}x" if ratio < 1e6 else f"{ratio:.3g}x"
                notes.append(f"max_{column}={bound:.6g} is {times} the parent's "
                             f"{float(total):.6g}: the parent meets it, so it does not bind" if parent_not_best is None
                             else f"max_{column}={bound:.6g} is {times} the parent's "
                             f"{float(total):.6g}: the parent meets it, but it may still bind ({parent_not_best}, "
                             f"so the best child without it need not be the parent)")
        return notes

    @classmethod
    def from_dict(cls, d: Mapping) -> "Budgets":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class BudgetRequest:
    """The budgets as the user wrote them (strings as on the command line; None: not given).

    `resolve` turns them into absolute `Budgets` for one parent and workload. Several bounds on
    runtime (--max-runtime, --speedup, --min-throughput) all hold: the tightest one wins.
    """

    max_runtime: str | None = None
    max_prefill: str | None = None
    max_decode: str | None = None
    max_memory: str | None = None
    max_params: str | None = None
    speedup: str | None = None
    min_throughput: str | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, "") for f in dataclasses.fields(self))

    def resolve(self, parent_totals: Mapping[str, float], workload: Mapping | None = None) -> Budgets:
        """Absolute bounds for a parent whose totals are `parent_totals`.

        Args:
            parent_totals: {"runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "params"} of the
                parent (its rows plus the non-block row); only the ones a fraction refers to are needed.
            workload: the score table's sidecar meta; `batch_size` and `gen_len` are read for an
                absolute --min-throughput.

        Raises:
            PuzzleError: a malformed string (the message lists the accepted forms), a fraction of a
                total the table does not have, or a throughput bound without the workload it needs.
        """
        workload = dict(workload or {})

        def parent(column: str, flag: str) -> float:
            value = parent_totals.get(column)
            if value is None or not math.isfinite(float(value)) or value <= 0:
                if flag in ("--speedup", "--min-throughput"):
                    raise PuzzleError(f"{flag} is relative to the parent, but the table has no parent {column} total "
                                      f"(its parent or non-block rows lack {column}); give --max-runtime with a unit")
                if value is None or not math.isfinite(float(value)):  # an absolute value would be refused too
                    raise PuzzleError(f"{flag} budgets {column}, but the table has no parent {column} total (its "
                                      f"parent or non-block rows lack {column}, as a table with one runtime per block "
                                      f"does); budget a resource the table gives"
                                      + ("" if column == "runtime_ms" else ", e.g. --max-runtime"))
                raise PuzzleError(f"{flag} given as a fraction, but the table's parent {column} total is {value:g}; "
                                  f"give an absolute value with a unit")
            return float(value)

        runtime_bounds = []
        if self.max_runtime not in (None, ""):
            runtime_bounds.append(parse_time_ms(self.max_runtime, lambda: parent("runtime_ms", "--max-runtime"), "--max-runtime"))
        if self.speedup not in (None, ""):
            runtime_bounds.append(parent("runtime_ms", "--speedup") / parse_speedup(self.speedup))
        if self.min_throughput not in (None, ""):
            runtime_bounds.append(throughput_to_runtime_ms(
                self.min_throughput, lambda: parent("runtime_ms", "--min-throughput"), workload))
        return Budgets(
            max_runtime_ms=min(runtime_bounds) if runtime_bounds else None,
            max_prefill_ms=None if self.max_prefill in (None, "") else
            parse_time_ms(self.max_prefill, lambda: parent("prefill_ms", "--max-prefill"), "--max-prefill"),
            max_decode_ms=None if self.max_decode in (None, "") else
            parse_time_ms(self.max_decode, lambda: parent("decode_ms", "--max-decode"), "--max-decode"),
            max_memory_mib=None if self.max_memory in (None, "") else
            parse_memory_mib(self.max_memory, lambda: parent("memory_mib", "--max-memory"), "--max-memory"),
            max_params=None if self.max_params in (None, "") else
            parse_params(self.max_params, lambda: parent("params", "--max-params"), "--max-params"),
        )


# ----------------------------------------------------------------------------------------------
# Parsing one string


def _sign_advice(text) -> str:
    """' A budget is a limit above zero: drop the minus sign.' for a negative value, ' ... give a value above
    zero.' for zero (reviewer: only some flags said it); for a comma in a number, to leave out a thousands separator
    before a unit ('1,024MiB'), to write a decimal comma as a point ('0,5', '1,5x'; breaker), or both readings where
    only the user knows which was meant ('1,500'); '' otherwise."""
    s = str(text).strip()
    # a zero with a unit at most ('0', '0MiB', '0 %'), not a number that merely starts with 0 (breaker: '0,5')
    if (m := re.fullmatch(_NUMBER + r"\s*[A-Za-zµ%/×]*", s.removeprefix("-").strip())) and float(m.group(1)) == 0:
        return " A budget is a limit above zero: give a value above zero."
    if s.startswith("-"):
        return " A budget is a limit above zero: drop the minus sign."
    unit = r"(\s*[A-Za-zµ%/×_]*)"
    if m := re.fullmatch(r"[1-9][0-9]{0,2}(?:,[0-9]{3})+" + unit, s):  # '1,024MiB': a separator before a unit
        if s.count(",") == 1 and m.group(1).strip().lower() in ("", "x", "×", "%"):  # '1,500x': a separator or a
            return (f" A comma is not read: write {s.replace(',', '')} (no separator) or {s.replace(',', '.')} (a "
                    f"decimal point).")  # decimal comma, which only the user knows
        return f" Write the number without separators ({s.replace(',', '')})."
    if re.fullmatch(r"[0-9]+,[0-9]+" + unit, s):
        return f" Write a decimal with a point ({s.replace(',', '.')})."
    return ""


def parse_fraction(text: str) -> float | None:
    """'0.67' -> 0.67, '67%' -> 0.67, '1/1.5' -> 0.667; None if `text` is not a bare fraction."""
    s = str(text).strip()  # spaces only around '%' and '/': '1 0' is no number (reviewer: it read as 10)
    if m := re.fullmatch(_NUMBER + r"\s*%", s):
        return float(m.group(1)) / 100
    if m := re.fullmatch(_NUMBER + r"\s*/\s*" + _NUMBER, s):
        return float(m.group(1)) / float(m.group(2)) if float(m.group(2)) > 0 else None
    if m := re.fullmatch(_NUMBER, s):
        return float(m.group(1))
    return None


def _unit_example(text: str, number: float, kind: str) -> str:
    """' (e.g. 19.2K for 19200 parameters)' for a bare number above MAX_FRACTION, in `kind`'s commonest unit (breaker:
    "add a unit" alone left the form to guess): the number as typed, a count with `params_budget_text`; '' for a
    number at or below zero, or not finite."""
    if not MAX_FRACTION < number < math.inf:
        return ""
    if kind == "params":
        return f" (e.g. {params_budget_text(number)} for {text} parameters)" if number >= 1e3 else ""
    unit = {"time": "ms", "memory": "MiB"}.get(kind)
    return f" (e.g. {text}{unit})" if unit else ""


def _parse(text, parent_total, flag: str, kind: str, units: Mapping[str, float], case_sensitive=False) -> float:
    """Shared rule: a bare fraction of `parent_total()` or a number with one of `units`."""
    s = str(text).strip().replace("\u03bc", "µ").replace("\u039c", "µ")  # Greek mu (either case): micro sign
    fraction = parse_fraction(s)
    if fraction is not None:
        if not 0 < fraction <= MAX_FRACTION:
            example = _unit_example(s, fraction, kind)
            raise PuzzleError(f"{flag} {text!r}: a bare number is a fraction of the parent's total and must be in "
                              f"(0, {MAX_FRACTION:g}]; for an absolute value add a unit{example}. Accepted: "
                              f"{_FORMS[kind]}")
        return fraction * parent_total()
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-zµ]+)", s)
    unit = None if m is None else (m.group(2) if case_sensitive else m.group(2).lower())
    if m is None or unit not in units:
        advice = _sign_advice(s)  # reviewer: the commonest slips got only the list of forms
        if not advice and re.fullmatch(_NUMBER + r"\s*[xX×]", s) and "runtime" in flag:
            advice = f" A speed-up is --speedup {s} (or --min-throughput {s}); --max-runtime takes a fraction or a time."
        raise PuzzleError(f"{flag} {text!r} is not a budget this tool reads.{advice} Accepted: {_FORMS[kind]}")
    value = float(m.group(1)) * units[unit]
    if not 0 < value < math.inf:  # breaker: 1e308GiB overflows to inf, and was told to be above zero
        why = "is too large (it overflows in base units)" if math.isfinite(float(m.group(1))) and value == math.inf \
            else "must be above zero and finite"
        raise PuzzleError(f"{flag} {text!r} {why}")
    return value


def parse_time_ms(text: str, parent_ms, flag: str = "--max-runtime") -> float:
    """A latency bound in ms. `parent_ms` is a number or a zero-argument callable (called only for a fraction).

    Raises PuzzleError naming `flag` and the accepted forms for anything else.
    """
    return _parse(text, parent_ms if callable(parent_ms) else (lambda: float(parent_ms)), flag, "time", _TIME_UNITS_MS)


def parse_memory_mib(text: str, parent_mib, flag: str = "--max-memory") -> float:
    """A memory bound in MiB: a fraction, or bytes with a binary (KiB, MiB, GiB) or decimal (KB, MB, GB) unit.

    Raises:
        PuzzleError: besides `_parse`'s, a count of bytes ("B") under 1 MiB, which is a count of parameters mistyped
            (breaker: --max-memory 3B was 3 bytes, and the child had no block left)."""
    written = str(text).strip()
    if bits := re.fullmatch(_NUMBER + r"\s*([KMGT]i?)b", written):  # breaker: '4Gb' (gigabits) was read as 4 GB
        number, prefix = bits.groups()
        unit = {"K": "kilobits", "M": "megabits", "G": "gigabits", "T": "terabits", "Ki": "kibibits",
                "Mi": "mebibits", "Gi": "gibibits", "Ti": "tebibits"}[prefix]
        raise PuzzleError(f"{flag} {text!r} reads as {number} {unit} (a lowercase b); memory is in bytes: give "
                          f"{number}{prefix}B")
    value = _parse(text, parent_mib if callable(parent_mib) else (lambda: float(parent_mib)), flag, "memory",
                   _MEMORY_UNITS_MIB)
    if value < 1 and re.fullmatch(_NUMBER + r"\s*[bB]", str(text).strip()):
        number = str(text).strip()[:-1].strip()
        meant = (f": for gigabytes give {number}GB or {number}GiB; for {number} billion parameters give --max-params "
                 f"{number}B" if float(number) < 1000 else "; give the size with a unit such as MB or GiB")
        raise PuzzleError(f"{flag} {text!r} is {value * 2**20:g} bytes, under 1 MiB{meant}")
    return value


def parse_params(text: str, parent_params, flag: str = "--max-params") -> float:
    """A parameter-count bound: a fraction, or a count with K, M, B (=G) or T."""
    return _parse(text, parent_params if callable(parent_params) else (lambda: float(parent_params)), flag, "params", _COUNT_UNITS)


def parse_speedup(text) -> float:
    """'1.5' or '1.5x' -> 1.5. Raises PuzzleError for anything that is not a positive factor."""
    m = re.fullmatch(_NUMBER + r"\s*[xX×]?", str(text).strip())
    if m is None or not 0 < float(m.group(1)) < math.inf:
        raise PuzzleError(f"--speedup {text!r} is not a speed-up.{_sign_advice(text)} Accepted: {_FORMS['speedup']}")
    return _at_least_min_factor(float(m.group(1)), "--speedup", text)


def _at_least_min_factor(factor: float, flag: str, text) -> float:
    """Refuse a speed-up factor below 1 / MAX_FRACTION, the runtime fraction's limit (1e-300 would be no budget)."""
    if factor < 1 / MAX_FRACTION:
        raise PuzzleError(f"{flag} {text!r} must be at least {1 / MAX_FRACTION:g}: it is the parent's runtime divided "
                          f"by the child's, so below 1 it allows a child slower than the parent (for half the "
                          f"parent's runtime give 2)")
    return factor


def throughput_to_runtime_ms(text: str, parent_runtime_ms, workload: Mapping) -> float:
    """A minimum throughput rewritten as a maximum runtime (ms) for the workload.

    '1.5x' means 1.5 times the parent's throughput: runtime <= parent runtime / 1.5.
    'R tok/s' means R generated tokens per second: runtime_ms <= 1000 * batch_size * gen_len / R,
    with batch_size and gen_len from the table's workload.

    Raises:
        PuzzleError: a malformed string, or an absolute rate on a table whose workload lacks
            batch_size or gen_len (use --max-runtime or the 'x' form there).
    """
    s = str(text).strip()
    if m := re.fullmatch(_NUMBER + r"\s*[xX×]", s):
        factor = float(m.group(1))
        if not 0 < factor < math.inf:
            raise PuzzleError(f"--min-throughput {text!r} is not a throughput.{_sign_advice(s)} Accepted: "
                              f"{_FORMS['throughput']}")
        _at_least_min_factor(factor, "--min-throughput", text)
        return (parent_runtime_ms() if callable(parent_runtime_ms) else float(parent_runtime_ms)) / factor
    m = re.fullmatch(_NUMBER + r"\s*(?:tok/s|tokens/s|tok_s)", s, flags=re.IGNORECASE)
    if m is None or not 0 < float(m.group(1)) < math.inf:
        raise PuzzleError(f"--min-throughput {text!r} is not a throughput.{_sign_advice(s)} Accepted: "
                          f"{_FORMS['throughput']}")
    batch, gen = workload.get("batch_size"), workload.get("gen_len")
    whole = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < 2**31 and v == int(v)  # noqa: E731
    if not whole(batch) or not whole(gen):
        lacks = [f"{k} ({'not given' if v is None else f'{v!r}, not a whole number'})"
                 for k, v in (("batch_size", batch), ("gen_len", gen)) if not whole(v)]
        raise PuzzleError(f"--min-throughput {text!r}: tokens per second need the table's workload, and it lacks "
                          f"{' and '.join(lacks)}; give --max-runtime or a multiple of the parent's rate (1.5x)")
    runtime_ms = 1000.0 * float(batch) * float(gen) / float(m.group(1))
    try:
        parent_ms = parent_runtime_ms() if callable(parent_runtime_ms) else float(parent_runtime_ms)
    except PuzzleError:  # a table without the parent's runtime: the rate stands alone
        return runtime_ms
    if runtime_ms > parent_ms * MAX_FRACTION:  # breaker: 1e-300tok/s was taken as a limit of 1e304 ms, no budget
        least = 1000.0 * float(batch) * float(gen) / (parent_ms * MAX_FRACTION)
        raise PuzzleError(f"--min-throughput {text!r} is below {1 / MAX_FRACTION:g} of the parent's rate (the parent "
                          f"generates {least * MAX_FRACTION:.1f} tok/s at this workload), the floor --speedup has "
                          f"too: give at least {round_up_text(least, 4)}tok/s")
    return runtime_ms


def round_up_text(x: float, digits: int = 6) -> str:
    """`x` with `digits` significant digits, rounded up, so that a budget of the printed value admits `x` (the
    1e-12 keeps a float hair over a printed value from rounding up a step)."""
    if not (math.isfinite(x) and x > 0):
        return f"{x:.{digits}g}"
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return f"{math.ceil(x / step * (1 - 1e-12)) * step:.{max(digits, 6)}g}"  # 16390, not 1.639e+04


def params_budget_text(x: float) -> str:
    """A parameter count as `--max-params` reads it, rounded up as `round_up_text`: 19200 -> '19.2K', 1.24e9 ->
    '1.24B' (`export.count_text` writes counts for reading, not for the flag)."""
    scale, unit = next(((v, u) for v, u in ((1e12, "T"), (1e9, "B"), (1e6, "M")) if x >= v), (1e3, "K"))
    return round_up_text(x / scale) + unit


def suggest_fraction(needed: float, parent_total: float) -> float:
    """The smallest fraction with 3 decimals whose bound admits `needed` (rounded up, never down, but not past a
    fraction that holds it exactly: the solver admits a total up to a budget's (1 + 5e-10), `mip.BUDGET_RTOL`, and
    its rounding of costs is far finer, so a float hair over 0.9 is 0.9, breaker: "at least 0.901" where 0.9 solved)."""
    return math.ceil(needed / parent_total * 1000 * (1 - 1e-10)) / 1000
