"""Search: one block per layer, minimising the summed replace-1-block score under hardware budgets.

The mixed-integer program and its exact solver live in `puzzle.mip` (formulation, the four exact
steps, and why none of them loses an optimum). This module is the user-facing side:

    solve(table, budgets, objective)      k diverse optimal children, each verified
    sweep(table, [budgets, ...])          many budgets, sharing the work between them
    greedy(table, budgets)                the greedy baseline (issue 5), verified
    verify(solution, table, budgets)      recomputes everything from the table, independently of the solver
    `puzzle search --library PATH ...`    the command (a run directory, a score table, block_library.json)

Objectives: a score column ("kl_nats", the default; "lm_loss"; "cosine" or "top1_agree", which are
maximised), or a weighted sum "kl_nats=1,cosine=0.5". Ties in score go to the faster child
(lower predicted runtime). Budgets: runtime, prefill, decode, memory, parameters, throughput
(as a runtime bound), absolute or as fractions of the parent (`puzzle.budgets`), in any combination.
A budget no child meets raises PuzzleError naming the binding resource and the smallest achievable
value. `solve(..., anchor=blocks, max_changes=r)` keeps the child within r layers of `anchor`
(a trust region, used by `puzzle.refine`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .architecture import BlockConfig
from .budgets import BUDGET_FLAGS, BudgetRequest, Budgets, params_budget_text, round_up_text, suggest_fraction
from .errors import PuzzleError, shell_arg
from .io import edited_table_note
from .mip import (BUDGET_RTOL, COST_COLUMNS, REQUIRED_COLUMNS, SCORE_COLUMNS, TIE_BREAK, Choices, DualLP,  # noqa: F401
                  allowed_slots, as_bool, build_choices, filter_flags, fitting_slots, prune_dominated, repair,
                  solve_core)

HIGHER_IS_BETTER = ("cosine", "top1_agree")  # score columns the objective maximises (their weight is negated)

_COST_WORDS = {"runtime_ms": ("the fastest child takes", "ms"), "prefill_ms": ("the fastest prefill takes", "ms"),
               "decode_ms": ("the fastest decode takes", "ms"), "memory_mib": ("the smallest child needs", "MiB"),
               "params": ("the smallest child has", "parameters")}


class VerificationError(PuzzleError):
    """A solution that breaks a budget or the one-choice-per-layer rule, or whose totals are wrong."""


JOINT_INFEASIBLE_S = 30.0  # seconds for the least values an infeasibility message names, over all its budgets


class InfeasibleBudget(PuzzleError):
    """No architecture of the library meets the budgets (the message names the binding resource and the least
    achievable value; `least` holds those values, {score-table column: least total})."""

    def __init__(self, message: str, least: dict | None = None):
        super().__init__(message)
        self.least = dict(least or {})


def throughput_hint(error: InfeasibleBudget, min_throughput: str | None, workload: dict) -> str:
    """For a --min-throughput given in tokens/s, the highest rate the library reaches, in tokens/s: ' (the runtime
    bound as a rate: --min-throughput at most 623.1tok/s ...)'; '' otherwise (reviewer: the message said the least
    runtime and a multiple of the parent's rate only)."""
    runtime = error.least.get("runtime_ms")
    batch, gen = (workload or {}).get("batch_size"), (workload or {}).get("gen_len")
    if not (min_throughput and re.search(r"tok", str(min_throughput), re.IGNORECASE) and runtime and runtime > 0
            and isinstance(batch, (int, float)) and isinstance(gen, (int, float)) and batch > 0 and gen > 0):
        return ""
    exact = 1000.0 * batch * gen / runtime
    # rounded down to 4 significant digits, at least to the tenth, and written out (reviewer: :g kept 6 digits and
    # advised 123457 for a reachable 123456.78; breaker: 0.04 tok/s came out as 0.0, which the parser refuses)
    decimals = max(1, 3 - math.floor(math.log10(exact)))
    rate = math.floor(exact * 10**decimals) / 10**decimals
    return (f" (the runtime bound as a rate: --min-throughput at most {rate:.{decimals}f}tok/s at batch {batch:g} and "
            f"{gen:g} generated tokens)")



def parent_totals(table: pd.DataFrame) -> dict[str, float]:
    """The parent's totals: its rows plus the non-block row (runtime_ms, memory_mib, params, kl_nats, ...)."""
    choices = build_choices(table)
    return choices.totals(choices.parent_slot)


# ----------------------------------------------------------------------------------------------
# Solutions and their independent check


@dataclass(frozen=True)
class Solution:
    """One child architecture with its predicted totals (non-block costs included).

    `rows[i]` are the score-table index labels chosen in layer i (one block row, or an attention
    row and an FFN row). `objective` is Σ weight · total over `objective_weights`; `bound` a proven
    lower bound on it (equal to it when `optimal`). `speedup` = parent runtime / child runtime.
    """

    blocks: tuple[BlockConfig, ...]
    rows: tuple[tuple[int, ...], ...]
    objective: float
    objective_weights: tuple[tuple[str, float], ...]
    runtime_ms: float
    prefill_ms: float
    decode_ms: float
    memory_mib: float
    params: float
    kl_nats: float
    lm_loss: float
    speedup: float
    optimal: bool
    bound: float
    solve_s: float
    budgets: Budgets
    method: str = "mip"

    @property
    def choice(self) -> tuple[str, ...]:
        """Block id per layer, e.g. ('attn-kv8+ffn-28672', 'attn-noop+ffn-14336', ...)."""
        return tuple(b.id for b in self.blocks)

    def totals(self) -> dict[str, float]:
        return {c: getattr(self, c) for c in (*COST_COLUMNS, *SCORE_COLUMNS)}

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None). Inverse: `from_dict`."""
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        d = {"objective": clean(self.objective), "objective_weights": dict(self.objective_weights),
             "optimal": self.optimal, "bound": clean(self.bound), "method": self.method,
             "solve_s": round(self.solve_s, 4), "speedup": clean(self.speedup),
             **{c: clean(v) for c, v in self.totals().items()},
             "budgets": self.budgets.to_dict(), "choice": list(self.choice), "rows": [list(r) for r in self.rows]}
        return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

    @classmethod
    def from_dict(cls, d: Mapping) -> "Solution":
        num = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(blocks=tuple(BlockConfig.from_id(b) for b in d["choice"]),
                   rows=tuple(tuple(r) for r in d["rows"]), objective=num(d["objective"]),
                   objective_weights=tuple((k, float(w)) for k, w in d["objective_weights"].items()),
                   **{c: num(d.get(c)) for c in (*COST_COLUMNS, *SCORE_COLUMNS)},
                   speedup=num(d.get("speedup")), optimal=bool(d["optimal"]), bound=num(d.get("bound")),
                   solve_s=float(d.get("solve_s", 0.0)), budgets=Budgets.from_dict(d.get("budgets", {})),
                   method=d.get("method", "mip"))


def _close(a: float, b: float, rtol: float = 1e-7) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def verify(solution: Solution, table: pd.DataFrame, budgets: Budgets | None = None, *, rtol: float = 1e-9) -> None:
    """Check a solution against the score table, independently of the solver.

    Recomputes, from the table rows the solution names: one choice per layer (one block row, or one
    attention and one FFN row, all of that layer), the blocks, every total (non-block row included;
    score columns as the parent's value plus each row's difference to it), the objective, and every
    budget (`budgets`, default the solution's own) with relative tolerance `rtol`.

    Raises:
        VerificationError: naming the first layer or total that is wrong.
    """
    budgets = solution.budgets if budgets is None else budgets
    layer_col = table["layer"].astype(int)
    num_layers = int(layer_col[table["subblock"] != "non_block"].max()) + 1
    if len(solution.rows) != num_layers or len(solution.blocks) != num_layers:
        raise VerificationError(f"solution has {len(solution.rows)} layers, the table {num_layers}")
    labels = [label for rows in solution.rows for label in rows]
    missing = [label for label in labels if label not in table.index]
    if missing:
        raise VerificationError(f"rows {missing[:5]} are not in the table")
    chosen = table.loc[labels]
    layers, kinds = chosen["layer"].astype(int).tolist(), chosen["subblock"].astype(str).tolist()
    variants, k = chosen["variant"].astype(str).tolist(), 0
    for i, (rows, block) in enumerate(zip(solution.rows, solution.blocks)):
        n = len(rows)
        got = dict(zip(kinds[k:k + n], variants[k:k + n]))
        if set(layers[k:k + n]) != {i} or sorted(kinds[k:k + n]) not in (["block"], ["attention", "ffn"]):
            raise VerificationError(f"layer {i}: rows {rows} are not one block row or one attention + one ffn "
                                    f"row of layer {i} (got {kinds[k:k + n]} of layers {layers[k:k + n]})")
        implied = got["block"] if "block" in got else f"{got['attention']}+{got['ffn']}"
        if implied != block.id:
            raise VerificationError(f"layer {i}: rows {rows} build {implied}, the solution says {block.id}")
        k += n
    non_block = table[table["subblock"] == "non_block"].iloc[0]
    parents = table[as_bool(table["is_parent"]) & (table["subblock"] != "non_block").to_numpy()]
    weights = dict(solution.objective_weights)
    totals = {}
    for c in dict.fromkeys([*COST_COLUMNS, *SCORE_COLUMNS, *weights]):
        values = chosen[c].to_numpy(float)  # a missing value makes the total NaN
        if c in COST_COLUMNS:  # summed costs plus the non-block row
            totals[c] = float(values.sum() + non_block[c])
        else:  # the parent's value plus each row's difference to it
            base = float(parents[c].median()) if parents[c].notna().any() else math.nan
            totals[c] = base + float((values - base).sum())
    for c in (*COST_COLUMNS, *SCORE_COLUMNS):
        if not _close(totals[c], getattr(solution, c)):
            raise VerificationError(f"{c}: the table gives {totals[c]!r}, the solution claims {getattr(solution, c)!r}")
    objective = sum(w * totals[c] for c, w in weights.items())
    if not _close(objective, solution.objective):
        raise VerificationError(f"objective: the table gives {objective!r}, the solution claims {solution.objective!r}")
    for column, bound in budgets.limits().items():
        if not totals[column] <= bound * (1 + rtol):  # also catches NaN
            raise VerificationError(f"{column} = {totals[column]:.6g} breaks the budget max_{column}={bound:.6g}")



# ----------------------------------------------------------------------------------------------
# The search over one table: shared work for a sweep


def parse_objective(objective) -> dict[str, float]:
    """The objective as {column: weight}, minimised: Σ weight · total.

    'kl_nats' -> {kl_nats: 1}; 'kl_nats=1,lm_loss=0.5' or a mapping -> those weights. A column in
    HIGHER_IS_BETTER (cosine, top1_agree) is maximised: its weight is negated here, so 'cosine'
    gives {cosine: -1} and 'kl_nats=1,cosine=2' gives {kl_nats: 1, cosine: -2}. The solution's
    `objective_weights` record the signed weights.

    Raises:
        PuzzleError: an empty objective, a weight that is not a number, or a negative weight.
    """
    if isinstance(objective, str):
        weights = {}
        parts = [p.strip() for p in objective.split(",")]
        if len(parts) > 1 and not all(parts):
            raise PuzzleError(f"objective {objective!r} has an empty part; write 'column' or "
                              f"'column=weight,column=weight'")
        for part in filter(None, parts):
            column, eq, weight = part.partition("=")
            column = column.strip()
            if column in weights:
                raise PuzzleError(f"objective {objective!r} names {column!r} twice; give each column once")
            try:
                weights[column] = float(weight) if eq else 1.0  # 'kl_nats=' is no weight: refused below
            except ValueError as e:
                raise PuzzleError(f"objective {objective!r}: write 'column' or 'column=weight,column=weight'") from e
    elif isinstance(objective, Mapping):
        try:
            weights = {str(k): float(w) for k, w in objective.items()}
        except (TypeError, ValueError):
            raise PuzzleError(f"objective {dict(objective)!r}: every weight must be a number") from None
    else:  # a hand-edited config.json: 5, null, a list
        raise PuzzleError(f"the objective must be a column name or weights such as 'kl_nats=1,lm_loss=0.5', got "
                          f"{objective!r}")
    if not weights:
        raise PuzzleError("the objective is empty; write e.g. 'kl_nats'")
    bad = [c for c, w in weights.items() if not math.isfinite(w) or w < 0]
    if bad:
        raise PuzzleError(f"objective weights must be finite numbers >= 0 (got {weights}); {list(HIGHER_IS_BETTER)} "
                          f"are maximised by themselves, every other column is minimised")
    if not any(weights.values()):
        raise PuzzleError(f"objective {weights}: every weight is 0, so any child under the budgets would do; give "
                          "at least one column a weight above 0")
    return {c: -w if c in HIGHER_IS_BETTER else w for c, w in weights.items()}


class Solutions(list):
    """The solutions of one budget, best first (a list of Solution), and why there are fewer than asked:
    `stopped_by` is "time" (the time limit ran out before the next one was found or proven absent), "exhausted"
    (no further child differs from the earlier ones enough under the budgets) or None (all found)."""

    stopped_by: str | None = None


class _Search:
    """Choices, filters and dominance pruning of one table, reused across the budgets of a sweep."""

    def __init__(self, table, objective, vllm_compatible, exclude, columns, num_solutions, num_workers):
        self.table, self.choices = table, build_choices(table)
        self.weights = parse_objective(objective)
        unknown = [c for c in self.weights if c not in self.choices.values]
        if unknown:
            raise PuzzleError(f"objective columns {unknown} are not numeric columns of the score table "
                              f"(have {sorted(self.choices.values)})")
        ch = self.choices
        self.parent = ch.totals(ch.parent_slot)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is refused below, in one line
            self.objective = sum(w * ch.values[c] for c, w in self.weights.items())  # (L, V)
            self.objective_base = sum(w * ch.base[c] for c, w in self.weights.items())
        self.allowed = allowed_slots(ch, vllm_compatible, exclude)
        self.filtered = filter_flags(vllm_compatible, exclude)  # for the messages ("" when nothing is left out)
        if np.isnan(self.objective[self.allowed]).any():
            gaps = {c: int(np.isnan(ch.values[c][self.allowed]).sum()) for c in self.weights}
            layer, slot = (int(i) for i in np.argwhere(np.isnan(self.objective) & self.allowed)[0])
            raise PuzzleError(f"objective {self.weights}: the score table lacks values of "
                              f"{', '.join(f'{c} ({n} layer choices)' for c, n in gaps.items() if n)}, the "
                              f"first in layer {layer} {ch.blocks[layer][slot].id}; pick another objective, or "
                              f"fill them in (`puzzle score` rescores a run's table; a block_library.json or a table "
                              f"written by hand: give the values in the file)")
        with np.errstate(over="ignore"):
            total = float(np.abs(np.where(self.allowed, self.objective, 0.0)).sum()) + abs(self.objective_base)
        if not math.isfinite(total):
            raise PuzzleError(f"objective {self.weights}: its values are too large to add up over the layers "
                              f"(the sum overflows); use smaller weights or rescale the table's scores")
        self.columns = tuple(columns)
        for c in self.columns:
            if np.isnan(ch.values[c][self.allowed]).any() or not math.isfinite(ch.base[c]):
                flags = "--max-runtime, --speedup or --min-throughput" if c == "runtime_ms" else BUDGET_FLAGS.get(c, c)
                other = "--max-memory" if c == "runtime_ms" else "--max-runtime"
                if np.isnan(ch.values[c][self.allowed]).all():  # breaker: "fill them in" for the authors' library
                    raise PuzzleError(f"{flags} budgets {c}, but the table gives no {c} (as a table with one runtime "
                                      f"per block does); budget a resource the table gives, e.g. {other}")
                raise PuzzleError(f"a budget on {c} ({flags}) needs {c} for every row and the non-block row, but the "
                                  f"table has missing values; fill them in or budget another resource (e.g. {other})")
        tie = ch.values.get(TIE_BREAK)
        self.tie = tie if tie is not None and not np.isnan(tie[self.allowed]).any() else None
        dims = [self.objective] + ([self.tie] if self.tie is not None else []) + [ch.values[c] for c in self.columns]
        self.alive = prune_dominated(dims, self.allowed, max(1, num_solutions))
        self.workers = num_workers or min(8, os.cpu_count() or 1)
        self._lp = None
        self._least: dict[str, float] = {}  # least totals the infeasibility messages named (InfeasibleBudget.least)
        self.solutions: list[np.ndarray] = []  # every slot choice found so far (hints for the next budget)

    def rhs(self, budgets: Budgets) -> list[float]:
        limits = budgets.limits()
        extra = sorted(set(limits) - set(self.columns))
        if extra:
            raise PuzzleError(f"budgets on {extra} were not declared for this search")
        # the solvers round costs up; the tolerance keeps a budget equal to the least achievable total reachable
        return [limits[c] * (1 + BUDGET_RTOL) - self.choices.base[c] if c in limits else math.inf for c in self.columns]

    def check_reachable(self, budgets: Budgets) -> None:
        """Raise for budgets no child meets even alone (the minimum is separable per layer), naming each."""
        self._least = {}  # this budget's, not an earlier one's of the sweep
        broken = []
        for column, bound in budgets.limits().items():
            values = np.where(self.allowed, self.choices.values[column], np.inf)
            smallest = float(self.choices.base[column] + values.min(1).sum())
            if smallest > bound * (1 + BUDGET_RTOL):
                broken.append(self._message(column, bound, smallest, "", budgets))
        rest = {c: b for c, b in budgets.limits().items() if c not in self._least}
        if broken and len(rest) > 1:  # the others may conflict with each other too (breaker: said only once the
            others = Budgets(**{f"max_{c}": b for c, b in rest.items()})  # first was loosened)
            costs, rhs = [self.choices.values[c] for c in self.columns], self.rhs(others)
            if DualLP(self.objective, costs, fitting_slots(costs, rhs, self.allowed)).multipliers(rhs) is None:
                alone = dict(self._least)
                broken.append(self._joint_infeasible(others))
                self._least = {**self._least, **alone}
        if broken:
            raise InfeasibleBudget("; and ".join(broken), self._least)

    def _message(self, column, bound, smallest, context, budgets) -> str:
        self._least[column] = smallest
        words, unit = _COST_WORDS[column]
        parent = self.parent[column]
        share = f" ({smallest / parent:.3g} of the parent)" if parent > 0 else ""
        advice = f"raise {BUDGET_FLAGS[column]} {_at_least(column, smallest, parent)}"
        scope = f" with the variants {self.filtered} leave" if self.filtered else ""
        if self.filtered:
            advice += f", or leave fewer variants out ({self.filtered})"
        return (f"no architecture in the library{scope} meets max_{column}={bound:.6g}{context}; "
                f"{words} {round_up_text(smallest)} {unit}{share}"
                f"{' under the other budgets' if context else ''}: {advice}")

    def solve(self, budgets: Budgets, num_solutions=1, min_layers_differ=1, time_limit_s=60.0, anchor=None,
              max_changes=None) -> Solutions:
        """Up to `num_solutions` solutions, each optimal given the earlier ones (fewer if no more exist, or the time
        limit ran out first: `Solutions.stopped_by` says which).

        anchor, max_changes: (L,) slots and r: at most r layers choose another slot than the anchor's.
        """
        start = time.perf_counter()
        self.check_reachable(budgets)
        rhs = self.rhs(budgets)
        costs = [self.choices.values[c] for c in self.columns]
        if self._lp is None:
            self._lp = DualLP(self.objective, costs, self.alive)
        alive = fitting_slots(costs, rhs, self.alive)
        lam = self._lp.multipliers(rhs)
        if lam is None and not np.array_equal(alive, self.alive):  # the sweep's LP, scaled by slots that cannot fit
            lam = DualLP(self.objective, costs, alive).multipliers(rhs)
        if lam is None:
            raise InfeasibleBudget(self._joint_infeasible(budgets), self._least)
        starts = self.solutions
        if anchor is not None:  # the trust region: one more cost row, 1 wherever a layer leaves the anchor
            layers = np.arange(len(anchor))
            alive = alive.copy()
            alive[layers, anchor] = True  # only the anchor's slot has cost 0, so nothing dominates it there
            changed = np.ones(alive.shape)
            changed[layers, anchor] = 0.0
            costs, rhs, starts = costs + [changed], rhs + [float(max_changes)], [anchor] + list(starts)
        found, results, begin, dp_memo = [], Solutions(), start, {}
        for _ in range(num_solutions):
            remaining = time_limit_s - (time.perf_counter() - begin)
            if found and remaining <= 0:
                results.stopped_by = "time"  # the solutions found so far (time_limit_s covers them all)
                break
            try:
                slots, optimal, bound = self._core(self.objective, costs, rhs, lam, alive, found, min_layers_differ,
                                                   remaining, starts, dp_memo)
            except PuzzleError:  # no solution within the time left
                if not found:
                    raise
                results.stopped_by = "time"
                break
            if slots is None:
                if not found:
                    if anchor is not None:
                        raise InfeasibleBudget(f"no architecture within {max_changes} layers of the anchor meets "
                                          f"{budgets.describe()}; allow more changes")
                    raise InfeasibleBudget(self._joint_infeasible(budgets), self._least)
                results.stopped_by = "exhausted"
                break
            found.append(slots)
            results.append(self._solution(slots, budgets, optimal, bound, time.perf_counter() - start))
            start = time.perf_counter()
        self.solutions.extend(found)
        return results

    def _core(self, objective, costs, rhs, lam, alive, others, min_differ, time_limit, starts=(), dp_memo=None):
        scales = [max(abs(self.parent.get(c, 1.0)), 1e-12) for c in self.columns]
        scales += [1.0] * (len(costs) - len(self.columns))  # trust-region rows count layers
        try:  # (every solution is checked by `verify` afterwards, so numpy's overflow warnings add nothing)
            with np.errstate(over="ignore", invalid="ignore"):
                return solve_core(objective, costs, rhs, lam, alive, others, min_differ, time_limit, tie=self.tie,
                                  workers=self.workers, scales=scales, starts=starts, dp_memo=dp_memo)
        except OverflowError as e:  # costs or scores far from 1 (e.g. 1e-300 ms) do not scale to integers
            raise PuzzleError(f"the table's costs or scores span too many orders of magnitude for the solver ({e}); "
                              f"give them in ordinary units (ms, MiB, nats)") from e

    def _joint_infeasible(self, budgets: Budgets) -> str:
        """Message for budgets each reachable alone but not together: per budget, its minimum under the others, each
        a way out (breaker: only the first budget's was named, though loosening another was enough too)."""
        self._least, ways = {}, []
        limits, costs = budgets.limits(), [self.choices.values[c] for c in self.columns]
        deadline = time.perf_counter() + JOINT_INFEASIBLE_S  # one solve per budget, all within it
        for column, bound in limits.items():
            others = Budgets(**{f"max_{c}": b for c, b in limits.items() if c != column})
            rhs = self.rhs(others)
            alive = fitting_slots(costs, rhs, self.allowed)  # as `solve`: a far-off cost sets no scale
            objective = np.where(alive, self.choices.values[column], np.inf)
            lp = DualLP(objective, costs, alive)
            lam = lp.multipliers(rhs)
            if lam is None:
                continue
            left = max(deadline - time.perf_counter(), 1.0)
            try:
                slots, _, _ = self._core(objective, costs, rhs, lam, alive, [], 1, left)
            except PuzzleError:  # out of time for this budget: the others' ways out are still named
                continue
            if slots is not None:
                smallest = self.choices.totals(slots)[column]
                context = f" together with {others.describe()}" if others.limits() else ""
                ways.append(self._message(column, bound, smallest, context, budgets))
        if ways:
            return "; or: ".join(ways)
        return f"no architecture in the library meets {budgets.describe()} together; loosen the budgets"

    def _solution(self, slots, budgets, optimal, bound, seconds, method="mip") -> Solution:
        ch = self.choices
        totals = ch.totals(slots)
        objective = self.objective_base + float(self.objective[np.arange(len(slots)), slots].sum())
        solution = Solution(
            blocks=tuple(ch.blocks[i][j] for i, j in enumerate(slots)),
            rows=tuple(tuple(int(r) if isinstance(r, (int, np.integer)) else r for r in ch.rows[i][j])
                       for i, j in enumerate(slots)),
            objective=objective, objective_weights=tuple(self.weights.items()),
            **{c: totals.get(c, math.nan) for c in (*COST_COLUMNS, *SCORE_COLUMNS)},
            speedup=self.parent["runtime_ms"] / totals["runtime_ms"] if totals["runtime_ms"] > 0 else math.nan,
            optimal=optimal, bound=self.objective_base + bound if optimal is False else objective,
            solve_s=seconds, budgets=budgets, method=method)
        verify(solution, self.table, budgets)
        return solution


# ----------------------------------------------------------------------------------------------
# Public entry points


def check_min_layers_differ(min_layers_differ: int, layers: int) -> None:
    """Raises PuzzleError when diverse children are to differ in more layers than the table has."""
    if min_layers_differ > layers:
        raise PuzzleError(f"--min-layers-differ {min_layers_differ}: this table has {layers} layers, so no two "
                          f"children differ in more; give at most {layers}")


def solve(table: pd.DataFrame, budgets: Budgets, objective="kl_nats", *, vllm_compatible: bool = False,
          exclude: Sequence = (), num_solutions: int = 1, min_layers_differ: int = 1,
          time_limit_s: float = 60.0, num_workers: int | None = None, anchor: Sequence | None = None,
          max_changes: int | None = None) -> Solutions:
    """The best child architectures under `budgets`, each proven optimal and verified.

    Args:
        table: score table (columns `REQUIRED_COLUMNS`; one non_block row).
        budgets: absolute bounds (see `BudgetRequest.resolve` for fractions of the parent).
        objective: a column ("kl_nats", "lm_loss", "cosine", "top1_agree", any numeric score column),
            or {column: weight} (or "kl_nats=1,cosine=0.5", weights >= 0); the sum over layers of
            each row's difference to the parent is minimised, or maximised for HIGHER_IS_BETTER
            columns (cosine, top1_agree).
        vllm_compatible: leave out linear replacements (vLLM cannot serve them).
        exclude: variant ids (block, attention or FFN ids) to leave out, or (layer, id) pairs.
        num_solutions: k diverse solutions, solution n optimal among those that differ from the
            n-1 before it in at least `min_layers_differ` layers (Σ_i x_(i,y_i) ≤ L − d).
        time_limit_s: for all k solutions together; an unproven solution has optimal=False.
        num_workers: CP-SAT threads (default: CPU count, at most 8).
        anchor, max_changes: a trust region: at most `max_changes` layers differ from `anchor`
            (one BlockConfig or block id per layer; each must be a choice of its layer).

    Returns:
        Solutions, best first (fewer than k when no more diverse ones exist or the time limit ran out first:
        `stopped_by` says which).

    Raises:
        PuzzleError: a budget no child meets (naming the resource and the smallest achievable value),
            a malformed table, a missing objective/cost column, an anchor the table cannot build, or
            more solutions with `min_layers_differ` above the table's layer count (none could differ that much).
    """
    search = _Search(table, objective, vllm_compatible, exclude, budgets.limits(), num_solutions, num_workers)
    if num_solutions > 1:
        check_min_layers_differ(min_layers_differ, search.choices.num_layers)
    slots = None
    if anchor is not None:
        if max_changes is None or max_changes < 0:
            raise PuzzleError(f"a trust region needs max_changes >= 0, got {max_changes!r}")
        slots = anchor_slots(search.choices, anchor)
    return search.solve(budgets, num_solutions, min_layers_differ, time_limit_s, slots, max_changes)


def anchor_slots(choices: Choices, blocks: Sequence) -> np.ndarray:
    """(L,) int: the slot of each layer that builds `blocks[i]` (a BlockConfig or a block id).

    Raises:
        PuzzleError: a different layer count, or a block that is not a choice of its layer.
    """
    if len(blocks) != choices.num_layers:
        raise PuzzleError(f"the anchor has {len(blocks)} layers, the table {choices.num_layers}")
    slots = np.zeros(len(blocks), int)
    for i, block in enumerate(blocks):
        block_id = block if isinstance(block, str) else block.id
        ids = [b.id for b in choices.blocks[i]]
        if block_id not in ids:
            raise PuzzleError(f"layer {i}: block {block_id} is not in the score table (have {ids})")
        slots[i] = ids.index(block_id)
    return slots


def sweep(table: pd.DataFrame, budgets_list: Sequence[Budgets], objective="kl_nats", *, vllm_compatible: bool = False,
          exclude: Sequence = (), num_solutions: int = 1, min_layers_differ: int = 1, time_limit_s: float = 60.0,
          num_workers: int | None = None, on_infeasible: str = "raise") -> list[list[Solution]]:
    """`solve` for many budgets, reusing the work they share.

    The table's choices, the filters and the dominance pruning (over every resource any budget
    bounds) are computed once; the LP relaxation is re-solved with new right-hand sides; every
    solution found is offered as a starting point to the next budget.

    Returns:
        One list of solutions per budget, in the order given ([] for an infeasible budget when
        `on_infeasible="skip"`). Raises PuzzleError on an infeasible budget when "raise".
    """
    if on_infeasible not in ("raise", "skip"):
        raise ValueError("on_infeasible must be 'raise' or 'skip'")
    columns = [c for c in COST_COLUMNS if any(c in b.limits() for b in budgets_list)]
    search = _Search(table, objective, vllm_compatible, exclude, columns, num_solutions, num_workers)
    results = []
    for budgets in budgets_list:
        try:
            results.append(search.solve(budgets, num_solutions, min_layers_differ, time_limit_s))
        except PuzzleError:
            if on_infeasible == "raise":
                raise
            results.append([])
    return results


def greedy(table: pd.DataFrame, budgets: Budgets, objective="kl_nats", *, vllm_compatible: bool = False,
           exclude: Sequence = ()) -> Solution:
    """Baseline (issue 5): start from the parent and repeatedly apply the single-layer change with the
    smallest score increase per unit of budgeted cost saved (costs as fractions of the parent's;
    runtime when only runtime is budgeted) until every budget holds. Not optimal; verified.

    Raises:
        InfeasibleBudget: budgets no child meets, naming the binding resource and its smallest value (`solve`'s).
        PuzzleError: budgets some child meets that greedy's single-layer changes do not reach.
    """
    start = time.perf_counter()
    search = _Search(table, objective, vllm_compatible, exclude, budgets.limits(), 1, 1)
    search.check_reachable(budgets)
    costs = [search.choices.values[c] for c in search.columns]
    scales = [max(abs(search.parent[c]), 1e-12) for c in search.columns]
    best_allowed = np.where(search.allowed, search.objective, np.inf).argmin(1)
    begin = np.where(search.allowed[:, 0], search.choices.parent_slot, best_allowed)  # the parent where allowed
    slots = repair(begin, search.objective, costs, search.rhs(budgets), search.allowed, scales)
    if slots is None:  # reviewer: said nothing of what to change; the exact solve names the binding budget
        solve(table, budgets, objective, vllm_compatible=vllm_compatible, exclude=exclude)  # raises InfeasibleBudget
        raise PuzzleError(f"greedy selection found no child that meets {budgets.describe()}, though one exists (its "
                          f"single-layer changes end in a corner): the MIP finds it (`puzzle search` without "
                          f"--greedy), or loosen a budget")
    return search._solution(slots, budgets, False, -math.inf, time.perf_counter() - start, method="greedy")


# ----------------------------------------------------------------------------------------------
# Reading a library and the `puzzle search` command


def library_run_dir(path: str | os.PathLike) -> Path:
    """The run directory of a run's block library folder (DIR/library, with its index.csv), else `path` itself."""
    path = Path(path)
    return path.parent if path.is_dir() and path.name == "library" and (path / "index.csv").is_file() else path


def load_search_table(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """A score table from: a run directory (DIR/score/score_table.csv), a score table CSV, the Puzzle
    authors' block_library.json, or a folder holding one.

    A run's table needs its sidecar (score_table.csv.json); a CSV given by its own path may lack one,
    and then its meta is {"missing_sidecar": path} (device and workload unknown; see `load_table`).

    Raises:
        PuzzleError: nothing readable at `path`.
    """
    from .io import load_table
    from .library_json import read_puzzle_library

    path = Path(path)
    if path.is_dir() and (path / "score" / "score_table.csv").is_file():
        return load_table(path / "score" / "score_table.csv", required_columns=REQUIRED_COLUMNS)
    if path.is_dir() and (path / "score_table.csv").is_file():  # a run's score/ folder
        if (path / "block_library.json").is_file():  # breaker: which one was read showed only in --json's source
            warnings.warn(f"{path} holds both score_table.csv and block_library.json: searching score_table.csv "
                          f"(give --library {path / 'block_library.json'} for the other)")
        return load_table(path / "score_table.csv", required_columns=REQUIRED_COLUMNS)
    if path.is_dir() and (path / "block_library.json").is_file() or path.suffix.lower() == ".json" and path.is_file():
        return read_puzzle_library(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        return load_table(path, required_columns=REQUIRED_COLUMNS, sidecar_required=False)
    run_dir = library_run_dir(path)
    if run_dir != path and (run_dir / "score" / "score_table.csv").is_file():  # a run's library/: the run's scores
        return load_table(run_dir / "score" / "score_table.csv", required_columns=REQUIRED_COLUMNS)
    if (run_dir / "config.json").is_file() and (run_dir / "library").is_dir():
        raise PuzzleError(f"{run_dir} has a block library but no score table yet (score/score_table.csv): run "
                          f"`puzzle score --out {shell_arg(run_dir)}` first")
    if not path.exists():  # breaker: "neither ... nor" never said it is missing
        raise PuzzleError(f"--library {path} does not exist; give a run directory, a score table .csv or a "
                          f"block_library.json (or its folder)")
    raise PuzzleError(f"{path} is neither a run directory with score/score_table.csv, a score table .csv, nor a "
                      f"block_library.json (or its folder)")


def roofline_table(table: pd.DataFrame, meta: dict, run_dir: str | os.PathLike, gpu: str,
                   dtype: str = "bfloat16") -> tuple[pd.DataFrame, dict]:
    """The score table of a run directory with its cost columns replaced by roofline estimates for `gpu`.

    Quality columns are kept (they do not depend on the device); costs of every attention, FFN,
    block (attention + FFN) and non-block row are estimated by `scoring.roofline` for the run's
    batch size, prompt and generation lengths, in `dtype`. The estimates are lower bounds (peak
    FLOP/s and bandwidth): use them to plan, and measure on the GPU before trusting absolute times.

    Raises:
        PuzzleError: `run_dir` is not a run directory (no parent.json), or an unknown GPU name.
    """
    from .architecture import ModelConfig
    from .scoring.cost import Workload
    from .scoring.roofline import estimate_non_block_costs, estimate_subblock_costs, gpu_spec

    run_dir = library_run_dir(run_dir)  # a run's library/ folder: its run
    parent_json = Path(run_dir) / "parent.json"
    if not parent_json.is_file():
        raise PuzzleError(f"--roofline needs a run directory (with parent.json) for the parent's sizes; {run_dir} has none")
    spec = gpu_spec(gpu)
    config = ModelConfig.from_dict(json.loads(parent_json.read_text())["config"])
    workload = Workload(batch_size=int(meta["batch_size"]), prompt_len=int(meta["prompt_len"]),
                        gen_len=int(meta["gen_len"]), dtype=dtype, device="cuda")
    parts = {}
    for subblock in ("attention", "ffn"):
        ids = sorted(set(table.loc[table["subblock"] == subblock, "variant"]))
        for block_id in table.loc[table["subblock"] == "block", "variant"]:
            ids.append(block_id.split("+")[0 if subblock == "attention" else 1])
        parts[subblock] = sorted(set(ids))
    est = estimate_subblock_costs(config, parts["attention"], parts["ffn"], workload, spec).set_index(["subblock", "variant"])
    non_block = estimate_non_block_costs(config, workload, spec)
    table = table.copy()
    for i, row in table.iterrows():
        if row["subblock"] in ("attention", "ffn"):
            costs = {c: est.loc[(row["subblock"], row["variant"]), c] for c in COST_COLUMNS}
        elif row["subblock"] == "block":
            a, f = row["variant"].split("+")
            costs = {c: est.loc[("attention", a), c] + est.loc[("ffn", f), c] for c in COST_COLUMNS}
        else:
            costs = {c: non_block[c] for c in COST_COLUMNS}
        for c, v in costs.items():
            table.at[i, c] = v
    meta = {**meta, **est.attrs, "source_device": meta.get("device"), "device": "cuda", "device_name": spec.name}
    return table, meta


def _add_once(parser: argparse.ArgumentParser, *flags, **kwargs) -> None:
    """Add a flag unless the parser already has it (the main CLI adds the shared budget flags)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The `puzzle search` flags (budget flags that `parser` already has are kept as they are)."""
    g = parser.add_argument_group("search")
    _add_once(g, "--library", metavar="PATH", default=None,
              help="score table to search: a run directory, a score_table.csv, or the Puzzle authors' block_library.json")
    _add_once(g, "--max-runtime", metavar="F", help="runtime budget: a fraction of the parent's ('0.67') or '250ms', '1.5s'")
    _add_once(g, "--speedup", metavar="S", help="runtime budget as a speed-up over the parent (--max-runtime 1/S)")
    _add_once(g, "--max-memory", metavar="F", help="memory budget: a fraction ('0.8') or '2GiB', '512MiB', '300MB'")
    _add_once(g, "--max-prefill", metavar="F", help="prefill latency budget: a fraction or '40ms'")
    _add_once(g, "--max-decode", metavar="F", help="decode latency budget: a fraction or '5ms'")
    _add_once(g, "--max-params", metavar="F", help="parameter budget: a fraction ('0.5') or '60M', '1.2B'")
    _add_once(g, "--min-throughput", metavar="R", help="throughput floor: generated tokens/s ('1200tok/s') or a "
                                                       "multiple of the parent's ('1.5x')")
    _add_once(g, "--vllm-compatible", action="store_true", help="leave out variants vLLM cannot serve (linear)")
    _add_once(g, "--objective", default=None, help="score to optimise: kl_nats (default; with --out the run's "
                                                   "saved one), lm_loss, cosine (maximised), or a weighted sum "
                                                   "'kl_nats=1,cosine=0.5'")
    _add_once(g, "--exclude", action="append", default=[], metavar="VARIANT",
              help="leave out a variant id (block, attention or FFN id), repeatable")
    _add_once(g, "--num-solutions", type=int, default=1, metavar="K",
              help="K diverse solutions (default 1), each the best that differs from the earlier ones; "
                   "--time-limit covers all K (many solutions far apart can take all of it)")
    _add_once(g, "--min-layers-differ", type=int, default=1, metavar="D",
              help="each further solution differs from every earlier one in at least D layers")
    _add_once(g, "--time-limit", type=float, default=60.0, metavar="S",
              help="solver time limit in seconds, for all --num-solutions together (default 60)")
    _add_once(g, "--greedy", action="store_true", help="the greedy baseline instead of the MIP")
    _add_once(g, "--roofline", metavar="GPU", default=None,
              help="plan for a GPU you do not have: replace the measured costs of a run directory's table by roofline "
                   "estimates for H100, H200, A100 (the SXM cards, not PCIe/NVL) or L40S (scoring/roofline.py) at the "
                   "run's batch and lengths")
    _add_once(g, "--roofline-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
              help="weights, activations and KV cache for --roofline (default bfloat16)")
    _add_once(g, "--json", action="store_true", help="print one JSON object (objective, choice, totals)")
    _add_once(g, "--output", metavar="FILE", default=None, help="also write the solutions as JSON to FILE")


def _at_least(column: str, least: float, parent: float) -> str:
    """'to at least 0.115 (or 19.2K)': a budget flag's value that admits a total `least` of cost `column`, in each
    form the flag reads (a fraction of the `parent` total, an absolute value with its unit; for runtime also
    --speedup and --min-throughput, as a user may ask; breaker: a budget given in ms was told a fraction alone)."""
    unit = _COST_WORDS[column][1]
    # 7.72197ms, 0.1680MiB, 19.2K (a bare count reads as a fraction: breaker, "or 19200" was refused)
    absolute = params_budget_text(least) if unit == "parameters" else round_up_text(least) + unit
    if not parent > 0:
        return f"to at least {absolute}"
    also = ""
    if column == "runtime_ms" and least > 0:
        most = _speedup_at_most(parent, least)
        also = f", or --speedup at most {most}; --min-throughput at most {most}x"
    return f"to at least {suggest_fraction(least, parent):g} (or {absolute}{also})"


def _speedup_at_most(parent_ms: float, least_ms: float) -> str:
    """The parent's runtime over a child's least one, rounded down to 3 decimals and written in full, so that the
    printed speed-up admits that child (reviewer: `:g` rounded 1234.567 up to 1234.57, which it does not)."""
    return f"{math.floor(parent_ms / least_ms * 1000) / 1000:.10g}"


def _finite(obj):
    """`obj` with every non-finite float (NaN, ±inf) as None, so that the JSON written is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def check_search_args(args: argparse.Namespace) -> None:
    """Refuse `puzzle search --library` options that would be ignored or cannot work, before any solve.

    Raises:
        PuzzleError: K or D below 1, D without K, a time limit that is not a positive finite number of seconds,
            --greedy with K or D, --roofline-dtype without --roofline, an empty budget, objective,
            --roofline or --output, or an --output that is not a (new or existing) regular file in
            an existing folder (a directory, a device, a FIFO or a symbolic link would be replaced), or an
            existing file that an earlier --output did not write (the table itself, a run's config.json).
    """
    if args.num_solutions < 1:
        raise PuzzleError(f"--num-solutions {args.num_solutions}: give 1 or more solutions")
    if args.min_layers_differ < 1:
        raise PuzzleError(f"--min-layers-differ {args.min_layers_differ}: solutions must differ in at least 1 layer")
    if args.min_layers_differ != 1 and args.num_solutions == 1 and not args.greedy:
        raise PuzzleError(f"--min-layers-differ {args.min_layers_differ} sets how far further solutions differ, and "
                          f"one solution has none; add --num-solutions K (K >= 2) or leave it out")
    if not 0 < args.time_limit < math.inf:
        raise PuzzleError(f"--time-limit {args.time_limit:g}: give a positive number of seconds (default 60)")
    if args.greedy and (args.num_solutions != 1 or args.min_layers_differ != 1):
        raise PuzzleError("--greedy gives the one greedy child; --num-solutions and --min-layers-differ are for the MIP")
    if args.roofline is None and args.roofline_dtype != "bfloat16":
        raise PuzzleError("--roofline-dtype applies to --roofline GPU estimates; add --roofline GPU or leave it out")
    empty = [f"--{f.replace('_', '-')}" for f in ("max_runtime", "max_prefill", "max_decode", "max_memory", "max_params",
                                                    "min_throughput", "objective", "roofline", "output")
             if isinstance(getattr(args, f, None), str) and not getattr(args, f).strip()]
    if empty:
        raise PuzzleError(f"{empty[0]} is empty; give a value or leave the flag out")
    if args.output is not None:
        out = Path(args.output)
        if out.is_symlink() or out.exists() and not out.is_file():
            kind = "a symbolic link" if out.is_symlink() else "a directory" if out.is_dir() else "not a regular file"
            raise PuzzleError(f"--output {out} is {kind}; the solutions are written by replacing the file, so give "
                              f"the path of a new or regular file")
        if not out.parent.is_dir():
            raise PuzzleError(f"--output {out}: the folder {out.parent} does not exist; create it first")
        if out.is_file() and not is_search_output(out):  # e.g. the score table, its sidecar, a run's config.json
            raise PuzzleError(f"--output {out} exists and is not an earlier `puzzle search --output` file, so it is "
                              f"left as it is; give a new path")


def is_search_output(path: Path) -> bool:
    """Whether `path` holds what `puzzle search --output` writes (a JSON object with choice, objective, budgets, the
    workload and the table's source; a run's own DIR/search/<child>.json has the first three alone: a breaker's
    --output replaced one, and `puzzle export` then wrote another architecture under the child's name)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    front = record.get("front")  # a sweep's (--front-speedups): each point with its target
    return {"choice", "objective", "budgets", "workload", "source"} <= set(record) or (
        {"source", "sweep_s", "objective_name"} <= set(record) and isinstance(front, list)
        and all(isinstance(p, dict) and "target_speedup" in p for p in front))


def parse_exclude(values, what: str = "--exclude") -> tuple[str, ...]:
    """Variant ids to leave out of the search, sorted, once each: attention ("attn-linear"), FFN ("ffn-768") or block
    ids ("attn-kv1+ffn-768"). A value "none" (any case, alone) leaves nothing out, so that a flag can clear a saved
    setting.

    Raises:
        PuzzleError: `values` is not a list of texts, or a text is no variant id; `what` names the flag or setting.
    """
    from .architecture import is_variant_id

    items = [values] if isinstance(values, str) else values
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise PuzzleError(f"{what} must be a list of variant ids (e.g. [\"attn-linear\"]), got {values!r}")
    ids = [v.strip() for v in items]
    if _none_alone(ids, what):
        return ()
    for v in ids:
        if "," in v:
            raise PuzzleError(f"{what} {v!r}: give one variant id per --exclude (repeat the flag: "
                              f"{' '.join('--exclude ' + x.strip() for x in v.split(',') if x.strip())}), or a list in "
                              f"a preset ([search] exclude = [\"attn-linear\", \"ffn-linear\"])")
        if not is_variant_id(v):
            raise PuzzleError(f"{what} {v!r} is not a variant id: give an attention id (attn-kv1, attn-linear, "
                              f"attn-noop), an FFN id (ffn-768, ffn-linear, ffn-noop), a block id joining two with "
                              f"'+' (attn-kv1+ffn-768), or 'none' alone to leave nothing out")
    return tuple(sorted(set(ids)))


def _none_alone(ids: list[str], what: str = "--exclude") -> bool:
    """Whether `ids` is "none" alone (any case: leave nothing out).

    Raises:
        PuzzleError: "none" among variant ids.
    """
    lowered = [v.lower() for v in ids]
    if "none" in lowered and len(ids) > 1:
        raise PuzzleError(f"{what}: 'none' clears the exclusions and cannot be combined with variant ids {ids}; give "
                          f"either 'none' alone or the ids")
    return lowered == ["none"]


def uses_excluded(choice: Sequence, exclude: Sequence[str]) -> bool:
    """Whether a child (block ids or BlockConfigs, one per layer) uses a variant `exclude` names (as a block, or as
    its attention or FFN)."""
    ex = set(exclude)
    if not ex:
        return False
    blocks = [b if isinstance(b, BlockConfig) else BlockConfig.from_id(b) for b in choice]
    return any({b.id, b.attention.id, b.ffn.id} & ex for b in blocks)


def check_exclusions(table: pd.DataFrame, exclude) -> None:
    """Refuse an --exclude value that names no block, attention or FFN variant of the table (a typo would
    otherwise exclude nothing, silently)."""
    choices = build_choices(table)
    known = {i for layer in choices.blocks for b in layer for i in (b.id, b.attention.id, b.ffn.id)}
    unknown = [e for e in exclude if e not in known]
    if unknown:
        parts = sorted({i for layer in choices.blocks for b in layer for i in (b.attention.id, b.ffn.id)})
        raise PuzzleError(f"--exclude {unknown[0]!r} is not a variant of this table; give one of {', '.join(parts)} "
                          f"or a block id joining two of them with '+' (e.g. {choices.blocks[0][-1].id})")


def _parent_blocks(choices) -> list:
    """The parent's block in each layer of `build_choices`' `choices`."""
    return [choices.blocks[layer][slot] for layer, slot in enumerate(choices.parent_slot)]


def _parent_not_best(table: pd.DataFrame, objective, parent: Mapping[str, float], options: dict) -> str | None:
    """Why a bound the parent meets may still bind (reviewer: "it does not bind" was said where it did): the parent's
    own variants are excluded, or the best child without budgets (a solve without them) scores better than the
    parent under `objective` (an objective other than KL); None when the parent is that best child."""
    own = _parent_blocks(build_choices(table))
    excluded = [e for e in options.get("exclude", ()) if any(e in (b.id, b.attention.id, b.ffn.id) for b in own)]
    if excluded:
        return f"--exclude {excluded[0]} leaves out the parent's own variant"
    weights = parse_objective(objective)
    parent_score = sum(w * float(parent.get(c, math.nan)) for c, w in weights.items())
    try:
        free = solve(table, Budgets(), objective, **options)[0]
    except PuzzleError:  # nothing solves without budgets either: the solve with them says why
        return None
    if not math.isfinite(parent_score):
        return f"the parent's total of the objective {objective} is unknown"
    if free.objective < parent_score - 1e-9 * max(1.0, abs(parent_score)):
        return (f"under the objective {objective} the best child without budgets scores {free.objective:.6g}, the "
                f"parent {parent_score:.6g}")
    return None


def _zero_runtime(table: pd.DataFrame) -> str:
    """Why the parent's total runtime is 0 (for messages): every runtime_ms is 0, or the parent's rows' are."""
    if (pd.to_numeric(table["runtime_ms"], errors="coerce") == 0).all():
        return "every runtime_ms in the library is 0 (the parent's total runtime is 0)"
    return "the parent's rows and the non-block row have runtime_ms 0 (the parent's total runtime is 0)"


def resolve_budgets(request: BudgetRequest, table: pd.DataFrame, parent: Mapping[str, float], meta: dict) -> Budgets:
    """`request.resolve(parent, meta)`, naming the cause where the table cannot give what a budget needs.

    Raises:
        PuzzleError: as `BudgetRequest.resolve`; for a budget relative to the parent's runtime (--speedup, a
            fraction for --max-runtime, --min-throughput Nx) when that runtime is 0, the message says the
            runtimes are zero; for an absolute --min-throughput on a CSV without a sidecar, that the sidecar
            (the workload) is missing.
    """
    def resolves(parent_totals, workload) -> bool:  # does the request resolve once the table gives this?
        try:
            request.resolve(parent_totals, workload)
        except PuzzleError:
            return False
        return True

    try:
        return request.resolve(parent, meta)
    except PuzzleError as e:
        if parent.get("runtime_ms") == 0 and resolves({**parent, "runtime_ms": 1.0}, meta):
            raise PuzzleError(f"{_zero_runtime(table)}, so a speed-up or a runtime relative to the parent cannot be "
                              f"resolved; remeasure runtime_ms, or budget memory or parameters instead "
                              f"(--max-memory, --max-params)") from e
        if meta.get("missing_sidecar") and resolves(parent, {**meta, "batch_size": 1, "gen_len": 1}):
            raise PuzzleError(f"--min-throughput {request.min_throughput!r} needs the table's workload (batch_size and "
                              f"gen_len), but {meta['missing_sidecar']} (the table's sidecar) does not exist; give "
                              f"--max-runtime, a multiple of the parent's rate (1.5x), or write that sidecar as a JSON "
                              f"object with batch_size and gen_len") from e
        raise


def front_targets(text: str) -> tuple[float, ...]:
    """'1.25,1.5,2' -> (1.25, 1.5, 2.0), each target once, in order.

    Raises:
        PuzzleError: a part that is not a speed-up (`budgets.parse_speedup`), naming --front-speedups."""
    from .budgets import parse_speedup

    targets = []
    for part in str(text).split(","):
        try:
            targets.append(parse_speedup(part))
        except PuzzleError as e:
            raise PuzzleError(f"--front-speedups {text!r}: {str(e).removeprefix('--speedup ')}; give speed-ups "
                              f"separated by commas, e.g. 1.25,1.5,2") from None
    return tuple(dict.fromkeys(targets))


def _sweep_main(args, table: pd.DataFrame, meta: dict, request: BudgetRequest, parent: Mapping[str, float],
                objective: str, options: dict) -> int:
    """`puzzle search --library PATH --front-speedups S,S,...`: the optimal child at each speed-up target (with the
    other budgets given), solved as one sweep (`sweep`: the table's pruning and LP shared), printed as a table or
    one JSON object {"front": [...], ...}; a target no child reaches is a row with its reason. Returns 0.

    Raises:
        PuzzleError: another runtime bound (--speedup, --max-runtime, --min-throughput), --num-solutions or
            --greedy given with it, or a target that is not a speed-up."""
    clash = [f for f, given in (("--speedup", request.speedup), ("--max-runtime", request.max_runtime),
                                ("--min-throughput", request.min_throughput)) if given is not None]
    if clash:
        raise PuzzleError(f"--front-speedups sets the runtime bound of each point; leave out {', '.join(clash)} (the "
                          f"other budgets, --max-memory, --max-params, --max-prefill and --max-decode, hold at every "
                          f"point)")
    if args.greedy or args.num_solutions != 1:
        raise PuzzleError("--front-speedups solves one MIP child per target; leave out --greedy and --num-solutions "
                          "(run them at one --speedup)")
    targets = front_targets(args.front_speedups)
    if len(targets) < len(str(args.front_speedups).split(",")):
        print(f"note: --front-speedups {args.front_speedups!r}: a target given twice is solved once", file=sys.stderr)
    budgets_list = [resolve_budgets(dataclasses.replace(request, speedup=str(s)), table, parent, meta) for s in targets]
    check_exclusions(table, options["exclude"])
    t0 = time.perf_counter()
    results = sweep(table, budgets_list, objective, time_limit_s=args.time_limit, on_infeasible="skip", **options)
    front = []
    for s, budgets, found in zip(targets, budgets_list, results):
        if not found:  # the reason, as one solve says it (the binding resource and its least value)
            try:
                found = [solve(table, budgets, objective, time_limit_s=args.time_limit, **options)[0]]
            except PuzzleError as e:  # its hint in this command's terms (it refuses the runtime flags)
                why = re.sub(r"raise --max-runtime to at least \S+ \(or \S+, or --speedup at most ([0-9.e+-]+); "
                             r"--min-throughput at most [^)]*\)", r"give --front-speedups targets of at most \1",
                             str(e))
                front.append({"target_speedup": s, "infeasible": why})
                continue
        if parent["runtime_ms"] > 0 and _every_block_removed(found[0]):  # reached by the empty model alone (breaker)
            front.append({"target_speedup": s, "infeasible": _empty_child_warning(
                "the best child that meets it", objective, budgets, found[0].objective,
                {**BUDGET_FLAGS, "runtime_ms": "the --front-speedups target"}, table, parent, options)})
            continue
        front.append({"target_speedup": s, **found[0].to_dict()})
        for note in budgets.above_parent(parent):  # e.g. a target at or below 1: the parent meets it
            print(f"note: at {s:g}x: {note}", file=sys.stderr)
    sweep_s = time.perf_counter() - t0
    if all("infeasible" in p for p in front):
        raise PuzzleError(f"no front target is reachable under these budgets: {front[0]['infeasible']}")
    record = _finite({"front": front, "parent": dict(parent), "objective_name": objective, "sweep_s": round(sweep_s, 4),
                      "workload": _workload(meta), "source": str(args.library),
                      **({"non_block": meta["non_block"]} if meta.get("non_block") else {})})
    for note in _table_notes(table, meta):
        print(note, file=sys.stderr)
    if getattr(args, "roofline", None):  # as a single search says which costs these are
        print(f"note: costs are roofline estimates for {args.roofline} in {args.roofline_dtype} (--roofline-dtype): "
              f"lower bounds, to plan with; measure on the GPU before trusting absolute times", file=sys.stderr)
    if args.output:
        _write_output(args.output, record)
    if args.json:
        print(json.dumps(record, allow_nan=False))
        for p in front:  # the JSON holds the reasons; stderr says that some targets are out of reach (breaker)
            if "infeasible" in p:
                print(f"note: {p['target_speedup']:g}x is out of reach: {p['infeasible']}", file=sys.stderr)
        return 0
    num = lambda p, k: math.nan if p.get(k) is None else p[k]  # noqa: E731  (printed "-")
    rows = [{"target": f"{p['target_speedup']:g}x", **{k: num(p, k) for k in ("objective", "speedup", "runtime_ms",
                                                                             "memory_mib", "params")},
             "status": "infeasible" if "infeasible" in p else "optimal" if p["optimal"] else "not proven",
             "solve_s": num(p, "solve_s")} for p in front]
    others = Budgets(**{k: v for k, v in budgets_list[0].to_dict().items() if k != "max_runtime_ms"}).describe()
    print(f"front over {len(targets)} speed-up target{'s' if len(targets) != 1 else ''} ({objective}; other budgets: "
          f"{others.replace('no budget', 'none')}), solved in {sweep_s:.2f} s")
    print(pd.DataFrame(rows).to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.6g}"))
    for p in front:
        if "infeasible" in p:
            print(f"{p['target_speedup']:g}x: {p['infeasible']}")
    return 0


def _workload(meta: dict) -> dict:
    """The table's workload (device, dtype, batch size, lengths) as JSON-ready scalars, for a search's record."""
    scalar = lambda v: v if isinstance(v, (int, float, str, type(None))) else str(v)  # noqa: E731
    return {k: scalar(meta[k]) for k in ("device", "dtype", "batch_size", "prompt_len", "gen_len", "sequence_length")
            if k in meta}


def _write_output(path, record: dict) -> None:
    """Write a search's record to --output `path` (atomically; non-finite numbers as null).

    Raises:
        PuzzleError: the path cannot be written (e.g. a folder of /proc that takes no new file)."""
    from .io import atomic_write_json

    try:
        atomic_write_json(path, _finite(record))
    except OSError as e:
        raise PuzzleError(f"--output {path} cannot be written ({e.strerror or e}); give a path in a folder you can "
                          f"write to") from None


def _table_notes(table: pd.DataFrame, meta: dict) -> list[str]:
    """Notes on the table itself, said with every search of it: costs of the blocks alone (the published library),
    a parent variant scoring a KL other than 0, a missing sidecar."""
    notes = []
    if meta.get("non_block"):  # the published library: blocks only (its file gives no vocabulary size)
        notes.append("note: this library's costs cover its blocks only (the file has no embedding or LM-head costs): "
                     "totals, fractions and speed-ups are of the blocks alone, and an absolute --max-memory, "
                     "--max-params or --max-runtime is compared with the blocks alone (subtract the embedding and LM "
                     "head from it)")
    off = table[as_bool(table["is_parent"]) & (table["layer"] >= 0) & (table["kl_nats"].abs() > 1e-9)]
    if len(off):  # breaker: a parent variant's kl_div of 0.3 was reported as the parent's KL without a word
        named = sorted(set(off["layer"].astype(int)))  # a layer's attention and FFN rows count once
        layers = ", ".join(map(str, named[:8])) + (", ..." if len(named) > 8 else "")
        notes.append(f"warning: the parent's own variant scores a KL other than 0 in layer(s) {layers} (sum "
                     f"{off['kl_nats'].sum():.4g} nats): a parent block replaced by itself scores 0, so this table's "
                     f"KL scores may be damaged or of another kind; the search counts them as given")
    if meta.get("missing_sidecar"):
        layers = int(table["layer"].max()) + 1 if (table["layer"] >= 0).any() else 0
        notes.append(f"note: {meta['missing_sidecar']} (the table's sidecar) does not exist, so the device and "
                     f"workload (batch size, prompt and generation lengths) of these costs are unknown, and the "
                     f"table's rows are not checked against the count it was written with: it is searched as a "
                     f"parent of {layers} layers")  # breaker: a table cut after its last layer went unnoticed
    if edited := edited_table_note(meta, "rerunning the stage that wrote it (`puzzle score` for a run's table)"):
        notes.append(f"note: {edited}")
    return notes


def _keeps_no_block(solution: Solution) -> bool:
    """Whether `solution` removes every block: attention and FFN no_op in every layer."""
    return all(b.removed for b in solution.blocks)


def _every_block_removed(solution: Solution) -> bool:
    """Whether `solution` removes every block (`_keeps_no_block`) and costs no runtime: on a table whose non-block
    row costs nothing (the Puzzle authors' library) it meets any runtime budget."""
    return not solution.runtime_ms > 0 and _keeps_no_block(solution)


def least_keeping_a_block(table: pd.DataFrame, column: str, options: Mapping | None = None) -> float:
    """The least total of cost `column` over children that keep at least one block (not every layer's attention
    and FFN no_op), among the slots `options` (vllm_compatible, exclude) allow: each layer's cheapest slot, but in
    the one layer where it costs least a slot that keeps a block (the minimum is separable per layer). inf when
    no allowed slot keeps one."""
    choices = build_choices(table)
    allowed = allowed_slots(choices, **{"vllm_compatible": False, "exclude": (), **(options or {})})
    keeps = np.array([[not b.removed for b in blocks]
                      + [False] * (choices.valid.shape[1] - len(blocks)) for blocks in choices.blocks])
    values = choices.values[column]  # (L, V)
    cheapest = np.where(allowed, values, np.inf).min(1)  # (L,)
    kept = np.where(allowed & keeps, values, np.inf).min(1)  # (L,)
    return float(choices.base[column] + cheapest.sum() + (kept - cheapest).min())


def _least_text(table: pd.DataFrame, budgets: Budgets, parent: Mapping[str, float], budget_flags: Mapping[str, str],
                options: Mapping | None) -> tuple[str, list[str]]:
    """'; a child that keeps a block needs --max-memory raised to at least 0.001 (or 66.0079MiB)': for each budget
    below the least total a child that keeps a block has, what to loosen it to (breaker: the all-removed child's
    refusal on the authors' 70B library named no value), and those budgets' columns. A front sweep (`budget_flags`
    names its target for runtime) is given its highest target instead."""
    parts, binding = [], []
    for column, bound in budgets.limits().items():
        least = least_keeping_a_block(table, column, options)
        if not (math.isfinite(least) and least > bound * (1 + BUDGET_RTOL)):  # one a child already meets: unnamed
            continue
        binding.append(column)
        total = float(parent.get(column, 0) or 0)
        if column == "runtime_ms" and "front-speedups" in budget_flags[column] and total > 0 and least > 0:
            parts.append(f"--front-speedups targets of at most {_speedup_at_most(total, least)}")
        else:
            parts.append(f"{BUDGET_FLAGS[column]} raised {_at_least(column, least, total)}")
    return (f"; a child that keeps a block needs {' and '.join(parts)}" if parts else ""), binding


def _empty_child_warning(which: str, objective, budgets: Budgets, value: float,
                         budget_flags: Mapping[str, str] = BUDGET_FLAGS, table: pd.DataFrame | None = None,
                         parent: Mapping[str, float] | None = None, options: Mapping | None = None) -> str:
    """Why a child of total runtime 0 (every block removed) was chosen, and what to ask for instead: a quality
    objective where the objective rewards a lower cost, else a looser budget (breaker: "e.g. --speedup 10" was
    advised for a --max-params budget and for --objective runtime_ms), with the least value of each budget a child
    that keeps a block reaches, given `table` and `parent` (its totals). `budget_flags`: how the command names
    each budget ({column: flag}); `options`: the search's slot filters (vllm_compatible, exclude)."""
    costs = [c for c, w in parse_objective(objective).items() if c in BUDGET_FLAGS and w > 0]
    if costs:
        advice = (f"the objective weighs {', '.join(costs)}, a cost, and removing every block costs least: search "
                  f"on a quality score (--objective kl_nats, the default) and give the cost as a budget "
                  f"({', '.join(budget_flags[c] for c in costs)})")
    else:
        least, binding = _least_text(table, budgets, parent or {}, budget_flags, options) if table is not None \
            else ("", [])
        flags = sorted({budget_flags[c] for c in binding or budgets.limits()})  # the ones to loosen, where known
        advice = (f"no block fits these budgets ({budgets.describe()}) except by removing all: loosen "
                  f"{' or '.join(flags)}{least}" if flags else "add a budget")
    return (f"{which} has a total runtime of 0 (speed-up undefined): this table's non-block row (embedding, LM "
            f"head) costs nothing, so removing every block looks free; its objective ({objective}) is {value:.4g}. "
            f"{advice[0].upper()}{advice[1:]}")


def search_main(args: argparse.Namespace) -> int:
    """`puzzle search --library PATH [budgets] [--json]`: solve, print, optionally write JSON. Returns 0.

    Raises:
        PuzzleError: see `check_search_args`, `check_exclusions`, `load_search_table`, `resolve_budgets` and `solve`.
    """
    check_search_args(args)
    table, meta = load_search_table(args.library)
    if getattr(args, "roofline", None):
        table, meta = roofline_table(table, meta, args.library, args.roofline, args.roofline_dtype)
    request = BudgetRequest(**{f: None if getattr(args, f, None) is None else str(getattr(args, f))
                               for f in ("max_runtime", "max_prefill", "max_decode", "max_memory", "max_params",
                                         "speedup", "min_throughput")})
    parent = parent_totals(table)
    objective = "kl_nats" if getattr(args, "objective", None) is None else args.objective
    exclude = tuple(v.strip() for v in args.exclude or ())
    exclude = () if _none_alone(list(exclude)) else exclude
    options = dict(vllm_compatible=bool(getattr(args, "vllm_compatible", False)), exclude=exclude)
    if getattr(args, "front_speedups", None) is not None:  # a sweep of speed-up targets: one child per target
        return _sweep_main(args, table, meta, request, parent, objective, options)
    budgets = resolve_budgets(request, table, parent, meta)
    check_exclusions(table, exclude)  # names the table's variants
    try:
        if args.greedy:
            solutions = [greedy(table, budgets, objective, **options)]
        else:
            solutions = solve(table, budgets, objective, num_solutions=args.num_solutions,
                              min_layers_differ=args.min_layers_differ, time_limit_s=args.time_limit, **options)
    except InfeasibleBudget as e:
        if hint := throughput_hint(e, request.min_throughput, meta):
            raise InfeasibleBudget(f"{e}{hint}", e.least) from None
        raise
    if parent["runtime_ms"] > 0 and _every_block_removed(solutions[0]):  # breaker: exit 0, an empty model in --json
        given = [f for f, v in (("--max-runtime", request.max_runtime), ("--speedup", request.speedup),
                                ("--min-throughput", request.min_throughput)) if v is not None]
        raise PuzzleError(_empty_child_warning("the best child", objective, budgets, solutions[0].objective,
                                               {**BUDGET_FLAGS, "runtime_ms": " or ".join(given) or "--max-runtime"},
                                               table, parent, options))
    record = {**solutions[0].to_dict(), "parent": dict(parent),  # (non-finite numbers become null on output)
              "workload": _workload(meta), "source": str(args.library)}
    if getattr(args, "roofline", None):  # breaker: --json gave device "cuda" alone, as if measured
        record["costs"] = f"roofline estimates for {args.roofline} in {args.roofline_dtype}, not measured"
    if len(solutions) > 1:
        record["alternatives"] = [s.to_dict() for s in solutions[1:]]
    short = None
    if args.num_solutions > len(solutions):
        record["solutions_requested"] = args.num_solutions
        short = (f"only {len(solutions)} of {args.num_solutions} solutions: "
                 + (f"the --time-limit of {args.time_limit:g} s ran out (raise it for more)"
                    if getattr(solutions, "stopped_by", None) == "time" else
                    f"no more children differ from the earlier ones in at least {args.min_layers_differ} layers "
                    f"under these budgets"))
        record["note"] = short
    if not budgets.limits():  # reviewer: the parent came back (objective 0) without a word in --json mode
        why = _parent_not_best(table, objective, parent, options)
        own = _parent_blocks(build_choices(table))
        what = ("the best child is the parent itself" if why is None and list(solutions[0].blocks) == own else
                f"the child ties with the parent under the objective {objective} (the solver's pick among equal "
                f"scores)" if why is None else  # breaker: "the parent itself" of a smaller child
                f"the child is the best one without budgets ({why})")
        print(f"note: no budget given, so {what}; add one or more of --speedup, --max-runtime, --max-memory, "
              f"--max-params, --min-throughput, --max-prefill, --max-decode", file=sys.stderr)
    notes = budgets.above_parent(parent)
    if notes and (why := _parent_not_best(table, objective, parent, options)):
        notes = budgets.above_parent(parent, why)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if meta.get("non_block"):
        record["non_block"] = meta["non_block"]
    for note in _table_notes(table, meta):
        print(note, file=sys.stderr)
    empty_child = [n for n, s in enumerate(solutions) if not s.runtime_ms > 0]
    if parent["runtime_ms"] == 0:  # every runtime is 0: no block was removed for free, the costs say nothing
        print(f"warning: {_zero_runtime(table)}, so runtime and speed-up say nothing about these children; "
              f"remeasure runtime_ms to compare them by speed", file=sys.stderr)
    elif empty_child:
        first = solutions[empty_child[0]]
        print(f"warning: {_empty_child_warning(f'solution {empty_child[0]}', objective, budgets, first.objective)}",
              file=sys.stderr)
    if hollow := [n for n, s in enumerate(solutions) if s.runtime_ms > 0 and _keeps_no_block(s)]:
        print(f"warning: solution {hollow[0]} keeps no block (every layer's attention and FFN removed): its predicted "
              f"{objective} sums replace-1-block scores, which say little of a model with no block left; realize it "
              f"to measure it, or ask for less", file=sys.stderr)  # breaker: printed as any child, unsaid
    if args.output:
        _write_output(args.output, record)
    if args.json:
        print(json.dumps(_finite(record), allow_nan=False))
        if short:
            print(short, file=sys.stderr)
        return 0
    if getattr(args, "roofline", None):  # which costs these are: the memory and times depend on the dtype
        w = record["workload"]
        print(f"costs: roofline estimates for {args.roofline} in {args.roofline_dtype} (--roofline-dtype), batch "
              f"{w.get('batch_size')}, prompt {w.get('prompt_len')}, generate {w.get('gen_len')}: lower bounds, to "
              f"plan with; measure on the GPU before trusting absolute times")
    print(f"budgets: {budgets.describe()}   parent: runtime {parent['runtime_ms']:.6g} ms, memory "
          f"{parent['memory_mib']:.6g} MiB, params {parent['params']:.4g}")
    for n, s in enumerate(solutions):
        status = "optimal" if s.optimal else "baseline" if s.method == "greedy" else f"not proven, bound {s.bound:.6g}"
        print(f"[{n}] {s.method}: objective {s.objective:.6g} ({status}, {s.solve_s:.2f} s)  runtime {s.runtime_ms:.6g} ms "
              f"({f'x{s.speedup:.3g}' if math.isfinite(s.speedup) else 'speed-up undefined'})  memory {s.memory_mib:.6g} MiB  params {s.params:.4g}  kl {s.kl_nats:.4g}")
        start = 0
        for i in range(1, len(s.blocks) + 1):  # runs of equal blocks: "layers  3-7   attn-noop+ffn-14336"
            if i == len(s.blocks) or s.blocks[i] != s.blocks[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                print(f"    layers {span:>7}  {s.blocks[start].id}")
                start = i
    if short:
        print(short)
    return 0
