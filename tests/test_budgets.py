"""Budget strings: fractions of the parent, absolute values with units, and clear errors."""

import math
import re

import pytest

from puzzle.budgets import (BudgetRequest, Budgets, parse_fraction, parse_memory_mib, parse_params, parse_speedup,
                            parse_time_ms, suggest_fraction, throughput_to_runtime_ms)
from puzzle.errors import PuzzleError

PARENT = {"runtime_ms": 400.0, "prefill_ms": 100.0, "decode_ms": 3.0, "memory_mib": 2048.0, "params": 1.0e9}


@pytest.mark.parametrize("text, value", [("0.67", 0.67), ("67%", 0.67), ("1/1.5", 1 / 1.5), (" 0.5 ", 0.5),
                                         ("2e-1", 0.2), ("5.", 5.0), (".5", 0.5), ("5.e-1", 0.5),  # as float() reads
                                         ("50.%", 0.5)])
def test_fractions(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text, ms", [("0.5", 200.0), ("250ms", 250.0), ("1.5s", 1500.0), ("800us", 0.8), ("250 ms", 250.0)])
def test_time(text, ms):
    assert parse_time_ms(text, PARENT["runtime_ms"]) == pytest.approx(ms)


@pytest.mark.parametrize("text, mib", [("0.25", 512.0), ("2GiB", 2048.0), ("512MiB", 512.0), ("300MB", 300e6 / 2**20),
                                       ("1.5GB", 1.5e9 / 2**20), ("4096KiB", 4.0), ("2gib", 2048.0)])
def test_memory(text, mib):
    assert parse_memory_mib(text, PARENT["memory_mib"]) == pytest.approx(mib)


@pytest.mark.parametrize("text, count", [("0.5", 5e8), ("60M", 6e7), ("1.2B", 1.2e9), ("500K", 5e5), ("2g", 2e9)])
def test_params(text, count):
    assert parse_params(text, PARENT["params"]) == pytest.approx(count)


@pytest.mark.parametrize("parse, text", [
    (parse_time_ms, "fast"), (parse_time_ms, "2 parsecs"), (parse_time_ms, "0"), (parse_time_ms, "-1"),
    (parse_time_ms, "150"), (parse_memory_mib, "2 GiBs"), (parse_memory_mib, "2ms"), (parse_params, "60X"),
    (parse_params, "")])
def test_malformed_budget_names_flag_and_forms(parse, text):
    with pytest.raises(PuzzleError) as e:
        parse(text, 100.0, "--the-flag")
    assert "--the-flag" in str(e.value) and "Accepted" in str(e.value)


@pytest.mark.parametrize("parse, text", [(parse_time_ms, "1e400ms"), (parse_memory_mib, "1e400GiB"),
                                         (parse_params, "1e400M")])
def test_an_infinite_absolute_budget_names_its_flag(parse, text):
    with pytest.raises(PuzzleError, match="--the-flag .* must be above zero and finite"):
        parse(text, 100.0, "--the-flag")
    with pytest.raises(PuzzleError, match="--the-flag .* is too large"):  # finite, but inf in base units (breaker)
        parse(text.replace("1e400", "1e308").replace("ms", "s"), 100.0, "--the-flag")


def test_bare_number_above_limit_asks_for_a_unit():
    with pytest.raises(PuzzleError, match="add a unit"):
        parse_time_ms("250", 400.0)
    # with the form in the flag's commonest unit, which parses (breaker: "add a unit" left it to guess)
    for parse, text, example in [(parse_time_ms, "250", "250ms"), (parse_memory_mib, "512", "512MiB"),
                                 (parse_params, "19200", "19.2K"), (parse_params, "7e9", "7B")]:
        with pytest.raises(PuzzleError, match=re.escape(f"add a unit (e.g. {example}")):
            parse(text, 100.0)
        assert parse(example, 100.0) == pytest.approx(float(text))  # in ms, MiB or parameters: the value meant


def test_fraction_is_computed_only_when_needed():
    def parent():
        raise AssertionError("parent total read for an absolute budget")
    assert parse_time_ms("250ms", parent) == 250.0


@pytest.mark.parametrize("text, value", [("1.5", 1.5), ("2x", 2.0), ("1.25 X", 1.25)])
def test_speedup(text, value):
    assert parse_speedup(text) == value


@pytest.mark.parametrize("text", ["0", "fast", "-2", "1.5y"])
def test_bad_speedup(text):
    with pytest.raises(PuzzleError, match="speed-up"):
        parse_speedup(text)


@pytest.mark.parametrize("text", ["1e-300", "0.05", "0.099x"])
def test_speedup_far_below_one_is_refused_with_its_inverse(text):
    with pytest.raises(PuzzleError, match="at least 0.1.*slower than the parent.*give 2"):
        parse_speedup(text)
    with pytest.raises(PuzzleError, match="--min-throughput.*at least 0.1"):
        throughput_to_runtime_ms(text.rstrip("x") + "x", 100.0, {})
    assert parse_speedup("0.1") == 0.1  # the inverse of the largest runtime fraction (10) is still a budget


def test_throughput_becomes_a_latency_bound():
    workload = {"batch_size": 8, "gen_len": 64}
    # 8 * 64 tokens in 250 ms is 2048 tok/s
    assert throughput_to_runtime_ms("2048tok/s", 400.0, workload) == pytest.approx(250.0)
    assert throughput_to_runtime_ms("2x", 400.0, workload) == pytest.approx(200.0)
    with pytest.raises(PuzzleError, match=r"lacks gen_len \(not given\)"):  # was "not ... whole numbers (8, None)"
        throughput_to_runtime_ms("2048tok/s", 400.0, {"batch_size": 8})
    with pytest.raises(PuzzleError, match="throughput"):
        throughput_to_runtime_ms("2048", 400.0, workload)
    for batch in ("abc", [2], -2, 1e308, 2.5, True, float("nan")):  # a sidecar's workload, as written by hand
        with pytest.raises(PuzzleError, match="lacks batch_size .*not a whole number"):
            throughput_to_runtime_ms("2048tok/s", 400.0, {"batch_size": batch, "gen_len": 64})


def test_a_rate_below_a_tenth_of_the_parents_is_refused_as_speedup_is():
    """--min-throughput in tok/s has the floor its 'x' form and --speedup have (breaker: 1e-300tok/s was taken as a
    runtime limit of 1e304 ms); the least rate the message names is accepted."""
    workload = {"batch_size": 8, "gen_len": 64}  # the parent: 8 * 64 tokens in 400 ms, 1280 tok/s
    for text in ("1e-300tok/s", "127tok/s"):
        with pytest.raises(PuzzleError, match=r"below 0.1 of the parent's rate .* give at least 128tok/s"):
            throughput_to_runtime_ms(text, 400.0, workload)
    assert throughput_to_runtime_ms("128tok/s", 400.0, workload) == pytest.approx(4000.0)
    assert throughput_to_runtime_ms("128tok/s", lambda: 400.0, workload) == pytest.approx(4000.0)


def test_request_resolves_against_parent_and_tightest_runtime_wins():
    budgets = BudgetRequest(max_runtime="0.8", speedup="2", max_memory="1GiB", max_params="0.5",
                            max_prefill="50ms", max_decode="0.5").resolve(PARENT)
    assert budgets.max_runtime_ms == pytest.approx(200.0)  # speed-up 2 beats 0.8
    assert budgets.max_memory_mib == pytest.approx(1024.0)
    assert budgets.max_params == pytest.approx(5e8)
    assert budgets.max_prefill_ms == pytest.approx(50.0) and budgets.max_decode_ms == pytest.approx(1.5)
    assert set(budgets.limits()) == {"runtime_ms", "memory_mib", "params", "prefill_ms", "decode_ms"}
    throughput = BudgetRequest(max_runtime="0.9", min_throughput="1000tok/s").resolve(PARENT, {"batch_size": 4, "gen_len": 50})
    assert throughput.max_runtime_ms == pytest.approx(200.0)  # 4 * 50 tokens / 1000 tok/s
    assert BudgetRequest().is_empty() and BudgetRequest().resolve(PARENT).limits() == {}


def test_fraction_of_a_total_the_table_lacks_is_refused():
    with pytest.raises(PuzzleError, match="no parent prefill_ms"):
        BudgetRequest(max_prefill="0.5").resolve({**PARENT, "prefill_ms": math.nan})
    assert BudgetRequest(max_prefill="40ms").resolve({**PARENT, "prefill_ms": math.nan}).max_prefill_ms == 40.0


def test_budgets_validate_and_round_trip():
    b = Budgets(max_runtime_ms=120.0, max_params=3e8)
    assert Budgets.from_dict(b.to_dict()) == b
    assert "max_runtime_ms=120" in b.describe() and Budgets().describe() == "no budget"
    with pytest.raises(PuzzleError):
        Budgets(max_memory_mib=-1.0)
    with pytest.raises(PuzzleError):
        Budgets(max_runtime_ms=math.inf)


def test_suggested_fraction_rounds_up():
    assert suggest_fraction(143.2, 298.0) == 0.481  # 0.48054 -> never rounded down
    assert suggest_fraction(0.48 * 300.0, 300.0) >= 0.48
    assert suggest_fraction(100.0, 300.0) * 300.0 >= 100.0
    assert suggest_fraction(180.0, 200.0) == 0.9 and suggest_fraction(0.9 * 7.1, 7.1) == 0.9  # exactly: not 0.901
    assert suggest_fraction(0.9 * (1 + 1e-9) * 200.0, 200.0) == 0.901  # beyond the solver's tolerance: up


def test_bounds_the_parent_meets_are_named_and_tighter_ones_are_not():
    budgets = Budgets(max_runtime_ms=50.0, max_memory_mib=2048.0, max_params=1e9)
    notes = budgets.above_parent({"runtime_ms": 100.0, "memory_mib": 512.0, "params": 1e9})
    assert len(notes) == 2 and notes[0].startswith("max_memory_mib=2048 is 4.00x the parent's 512")
    assert notes[1].startswith("max_params=1e+09 is 1.00x")
    assert budgets.above_parent({"runtime_ms": 100.0}) == []  # unknown totals: nothing said
    assert Budgets().above_parent({"memory_mib": 1.0}) == []
    huge = Budgets(max_runtime_ms=1e308).above_parent({"runtime_ms": 49.7})  # breaker: a 300-digit ratio
    assert huge[0].startswith("max_runtime_ms=1e+308 is 2.01e+306x the parent's 49.7")


def test_a_negative_budget_and_a_speedup_given_to_max_runtime_get_advice():
    """Reviewer: '-0.5' and '--max-runtime 1.5x' got only the list of accepted forms."""
    from puzzle.budgets import parse_memory_mib, parse_time_ms

    from puzzle.budgets import parse_speedup, throughput_to_runtime_ms

    with pytest.raises(PuzzleError, match="drop the minus sign"):
        parse_memory_mib("-0.5", 100.0)
    workload = {"batch_size": 1, "gen_len": 1}
    for call in (lambda: parse_speedup("-2"), lambda: throughput_to_runtime_ms("-5tok/s", 100.0, workload),
                 lambda: throughput_to_runtime_ms("-1.5x", 100.0, workload)):  # breaker: every budget flag says it
        with pytest.raises(PuzzleError, match="drop the minus sign"):
            call()
    for text in ("0tok/s", "0x"):  # and zero alike
        with pytest.raises(PuzzleError, match="give a value above zero"):
            throughput_to_runtime_ms(text, 100.0, {"batch_size": 1, "gen_len": 1})
    with pytest.raises(PuzzleError, match="give a value above zero"):
        parse_memory_mib("-0MiB", 100.0)
    for text in ("0,5", "0x1p-1"):  # numbers that merely start with 0 (breaker: told to give a value above zero)
        with pytest.raises(PuzzleError) as e:
            parse_memory_mib(text, 100.0)
        assert "above zero" not in str(e.value) and ("point (0.5)" in str(e.value)) == (text == "0,5")
    for call, words in [(lambda: parse_memory_mib("1,024MiB", 100.0), "without separators (1024MiB)"),
                        (lambda: parse_speedup("1,5"), "with a point (1.5)"),  # every budget flag alike (reviewer)
                        (lambda: throughput_to_runtime_ms("1,5x", 100.0, workload), "with a point (1.5x)"),
                        (lambda: parse_speedup("1,500"), "write 1500 (no separator) or 1.500 (a decimal point)")]:
        with pytest.raises(PuzzleError, match=re.escape(words)):
            call()
    with pytest.raises(PuzzleError, match=r"A speed-up is --speedup 1.5x \(or --min-throughput 1.5x\)"):
        parse_time_ms("1.5x", 100.0)
    with pytest.raises(PuzzleError) as e:  # --max-prefill has no speed-up form to point to
        parse_time_ms("1.5x", 100.0, "--max-prefill")
    assert "--speedup" not in str(e.value)


def test_main_child_names_are_plain_ascii_and_keep_the_budget_spelling():
    """A µs budget named the child 'child-rt400000µs' (a non-ASCII file, folder and HF model name)."""
    from puzzle.budgets import parse_time_ms
    from puzzle.pipeline import main_child_name

    assert main_child_name({"speedup": 1.5}) == "child-1.5x"
    assert main_child_name({"max_memory": "0.8", "max_params": "60M"}) == "child-mem0.8-params60M"
    for micro in ("\u00b5", "\u03bc", "\u039c"):  # micro sign, Greek mu, Greek capital Mu: all read as micro
        assert parse_time_ms(f"400000{micro}s", 1.0) == pytest.approx(400.0)
        assert main_child_name({"max_runtime": f"400000{micro}s"}) == "child-rt400000us"
    assert main_child_name({"speedup": 2.0, "max_params": "1/2", "max_memory": "8 GB"}) == "child-2x-params1_2-mem8GB"
    assert main_child_name({"min_throughput": "1200tok/s"}) == "child-tput1200tok_s"
    name = main_child_name({"max_memory": "50%", "max_decode": "3\u00a0ms"})  # a no-break space
    assert name == "child-mem50%-decode3_ms" and name.isascii()


@pytest.mark.parametrize("text", ["3B", "40b", "999 B"])
def test_a_memory_budget_of_a_few_bytes_is_refused_as_a_mistyped_count(text):
    """Breaker: --max-memory 3B was read as 3 bytes and every block was removed; B under 1 MiB is refused with the
    forms meant (gigabytes, or --max-params for billions of parameters). A count of bytes over 1 MiB still reads."""
    number = text[:-1].strip()
    with pytest.raises(PuzzleError, match=rf"--max-memory '{text}' is [0-9.]+ bytes, under 1 MiB: for "
                                          rf"gigabytes give {number}GB or {number}GiB; for {number} billion "
                                          rf"parameters give --max-params {number}B"):
        parse_memory_mib(text, PARENT["memory_mib"])
    with pytest.raises(PuzzleError, match=r"is 1e\+06 bytes, under 1 MiB; give the size with a unit such as MB"):
        parse_memory_mib("1000000B", PARENT["memory_mib"])  # reviewer: "give 1000000GB" was absurd
    assert parse_memory_mib("2097152B", PARENT["memory_mib"]) == pytest.approx(2.0)


@pytest.mark.parametrize("text, unit, meant", [("4Gb", "gigabits", "4GB"), ("512 Mb", "megabits", "512MB"),
                                               ("2Gib", "gibibits", "2GiB")])
def test_a_memory_budget_in_bits_is_refused_with_the_bytes_meant(text, unit, meant):
    """Stop 76's leftover: '4Gb' (gigabits, a lowercase b) was read as 4 GB. All-lowercase '4gb' still reads as GB."""
    number = text.split("G")[0].split("M")[0].strip()
    with pytest.raises(PuzzleError, match=rf"'{text}' reads as {number} {unit} \(a lowercase b\); memory is in "
                                          rf"bytes: give {meant}$"):
        parse_memory_mib(text, PARENT["memory_mib"])
    assert parse_memory_mib("4gb", PARENT["memory_mib"]) == parse_memory_mib("4GB", PARENT["memory_mib"])
