"""Search: one block per layer, minimising the summed replace-1-block score under hardware budgets.

The mixed-integer program (Puzzle, Bercovich et al. 2024; DESIGN.md "Mixed-integer program"):

    minimise    Σ_ij score(i,j) · x_ij
    subject to  Σ_j x_ij = 1                                  for every layer i
                Σ_ij cost_k(i,j) · x_ij ≤ B_k − nonblock_k      for every budgeted resource k
                Σ_i x_(i, y_i) ≤ L − d                         for every earlier solution y (diversity)
                x_ij ∈ {0, 1}

A choice j of layer i is one block row of the score table, or one attention row plus one FFN row
of that layer (their costs and scores add; a block row replaces the pair that builds the same block,
since the coupled measurement is the better one). Costs add the non-block row; score columns are
summed as differences to the parent's value, so the summed KL of the parent is 0.

Solved to proven optimality (gap 0), fast, in four exact steps; none of them loses an optimum:
  1. Dominance: a choice whose score, runtime and every budgeted cost are no better than those of
     another choice of the same layer is dropped. With k diverse solutions, a choice is dropped only
     when k others dominate it (then one of them is always free to replace it).
  2. Lagrangian bound: the LP relaxation (GLOP) gives multipliers λ ≥ 0 for the budget rows; then
     LB = Σ_i min_j (c_ij + λ·g_ij) − λ·b is a lower bound and red_ij ≥ 0 the reduced costs, with
     score(x) = LB + Σ red·x + Σ_k λ_k·slack_k(x) ≥ LB + Σ red·x for every feasible x.
  3. Reduced-cost fixing against a threshold T (first: Lagrangian rounding + local search with
     one- and two-layer moves): a choice with LB + red_ij > T is in no solution scoring ≤ T. What
     is left is solved exactly; if that optimum scores ≤ T it is the global optimum, else T grows.
  4. The exact solve of what is left: a dynamic program over layers whose states are partial
     solutions with integer costs (merged when equal, pruned by the same Lagrangian bounds) —
     milliseconds on real libraries, whose costs are shared per variant. When the states outgrow a
     cap, CP-SAT (OR-Tools) solves it instead, with the cut Σ red·x ≤ T − LB, restarting whenever it
     finds a clearly better solution. Diverse solutions add "shares at most L − d layers with y"
     rows to either. Costs are rounded *up* and budgets *down* to integers (2^-44 of the costs'
     range in the DP, 1e-12 in CP-SAT), after widening each budget by BUDGET_RTOL = 5e-10 relative:
     every solution meets its budgets to that tolerance (`verify` allows 1e-9), and a budget equal
     to the least achievable total stays reachable. Ties in score go to the lower runtime
     (CP-SAT compares scores rounded to 1e-9 of their range; the DP compares them exactly).
The first solve of the paper's Llama-3.3-70B library (80 layers x 16 variants) takes well under a
second; see benchmarks/search.py for measured times.
Every returned solution is checked by `verify`, which recomputes everything from the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .architecture import ArchitectureError, AttentionConfig, BlockConfig, FFNConfig
from .budgets import BUDGET_FLAGS, BudgetRequest, Budgets, suggest_fraction
from .errors import PuzzleError

COST_COLUMNS = ("runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "params")
SCORE_COLUMNS = ("kl_nats", "lm_loss")
REQUIRED_COLUMNS = ("layer", "subblock", "variant", "is_parent", *SCORE_COLUMNS, *COST_COLUMNS)
SUBBLOCKS = ("attention", "ffn", "block", "non_block")
TIE_BREAK = "runtime_ms"  # among equally scored solutions, the faster one wins
RESTART = 0.7  # restart CP-SAT once a solution closes 30% of the gap to the bound
_SCALE = 1e9  # integer resolution of scores inside CP-SAT (relative to their range)
_COST_SCALE = 1e12  # integer resolution of costs inside CP-SAT
BUDGET_RTOL = 5e-10  # a budget B holds when the total is at most B·(1 + BUDGET_RTOL); verify allows 1e-9
_COST_WORDS = {"runtime_ms": ("the fastest child takes", "ms"), "prefill_ms": ("the fastest prefill takes", "ms"),
               "decode_ms": ("the fastest decode takes", "ms"), "memory_mib": ("the smallest child needs", "MiB"),
               "params": ("the smallest child has", "parameters")}


class VerificationError(PuzzleError):
    """A solution that breaks a budget or the one-choice-per-layer rule, or whose totals are wrong."""


# ----------------------------------------------------------------------------------------------
# The choices of every layer, as dense (L, V) arrays


@dataclass(frozen=True)
class Choices:
    """Every choice a child can make per layer; V is the most choices any layer has.

    Attributes:
        valid: (L, V) bool, False on padding slots.
        is_parent: (L, V) bool, the parent's own block.
        blocks / rows: [i][j] the BlockConfig of slot j of layer i and its table index labels.
        values: column -> (L, V) float64: cost columns summed over the slot's rows, other numeric
            columns summed as differences to `base` (NaN on padding).
        base: column -> the non-block cost, or the parent's value of a score column (its KL is 0).
        parent_slot: (L,) int, the slot of the parent's block.
    """

    valid: np.ndarray
    is_parent: np.ndarray
    blocks: tuple
    rows: tuple
    values: Mapping[str, np.ndarray]
    base: Mapping[str, float]
    parent_slot: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.valid.shape[0]

    def totals(self, slots: np.ndarray) -> dict[str, float]:
        """Predicted totals of the child choosing `slots` ((L,) int): every column, incl. non-block costs."""
        layers = np.arange(self.num_layers)
        return {c: float(self.base[c] + v[layers, slots].sum()) for c, v in self.values.items()}


def _as_bool(series: pd.Series) -> np.ndarray:
    if series.dtype == bool:
        return series.to_numpy()
    return series.map(lambda v: str(v).strip().lower() in ("true", "1", "yes")).to_numpy()


def build_choices(table: pd.DataFrame) -> Choices:
    """The per-layer choices of a score table (coupled block rows, decoupled pairs, or both).

    Raises:
        PuzzleError: missing columns, no or several non-block rows, layers not numbered 0..L-1, a
            layer with attention rows but no FFN rows (or the reverse), an unknown variant id, or a
            layer without the parent's block.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PuzzleError(f"the score table lacks columns {missing}; it needs {list(REQUIRED_COLUMNS)}")
    bad = sorted(set(table["subblock"]) - set(SUBBLOCKS))
    if bad:
        raise PuzzleError(f"the score table has unknown subblock kinds {bad}; expected {SUBBLOCKS}")
    numeric = [c for c in table.columns if c not in ("layer", "subblock", "variant", "is_parent")
               and pd.api.types.is_numeric_dtype(table[c])]
    is_parent = _as_bool(table["is_parent"])
    non_block = table[table["subblock"] == "non_block"]
    if len(non_block) != 1:
        raise PuzzleError(f"the score table must have exactly one non_block row (embedding, final norm, LM head); "
                          f"it has {len(non_block)}: rerun `puzzle score`")
    body = table[table["subblock"] != "non_block"]
    layers = sorted(int(v) for v in body["layer"].unique())
    if layers != list(range(len(layers))) or not layers:
        raise PuzzleError(f"score table layers must be 0..L-1; found {layers[:5]}...{layers[-3:]} ({len(layers)} layers)")
    parent_rows = table[is_parent & (table["subblock"] != "non_block").to_numpy()]
    base = {c: float(non_block[c].iloc[0]) if c in COST_COLUMNS else float(np.nanmedian(parent_rows[c]))
            if parent_rows[c].notna().any() else math.nan for c in numeric}
    delta = {c: (table[c] - base[c]).to_numpy(float) if c not in COST_COLUMNS else table[c].to_numpy(float)
             for c in numeric}
    labels = table.index.tolist()
    kind_of, variant_of = table["subblock"].astype(str).tolist(), table["variant"].astype(str).tolist()
    by_layer: dict[int, dict[str, list[int]]] = {i: {"block": [], "attention": [], "ffn": []} for i in layers}
    for k, (layer, kind) in enumerate(zip(table["layer"].tolist(), kind_of)):
        if kind != "non_block":
            by_layer[int(layer)][kind].append(k)

    parsed: dict = {}
    parse = lambda cls, v: parsed.get((cls, v)) or parsed.setdefault((cls, v), cls.from_id(v))  # noqa: E731
    per_layer = []  # per layer: [(block, (row positions), is_parent)]
    for layer, kinds in by_layer.items():
        if bool(kinds["attention"]) != bool(kinds["ffn"]):
            have, lack = ("attention", "ffn") if kinds["attention"] else ("ffn", "attention")
            raise PuzzleError(f"layer {layer} has {have} rows but no {lack} rows: a decoupled layer needs both kinds")
        try:
            slots = [(parse(BlockConfig, variant_of[k]), (k,), bool(is_parent[k])) for k in kinds["block"]]
            coupled = {s[0].id for s in slots}
            if len(coupled) != len(slots):
                raise PuzzleError(f"layer {layer} lists the same block variant twice")
            attention = [(parse(AttentionConfig, variant_of[k]), k) for k in kinds["attention"]]
            ffn = [(parse(FFNConfig, variant_of[k]), k) for k in kinds["ffn"]]
        except ArchitectureError as e:
            raise PuzzleError(f"layer {layer}: {e}") from e
        for a, ka in attention:
            for f, kf in ffn:
                if (block := BlockConfig(a, f)).id not in coupled:
                    slots.append((block, (ka, kf), bool(is_parent[ka] and is_parent[kf])))
        if not any(s[2] for s in slots):
            raise PuzzleError(f"layer {layer} has no row with is_parent=True (the parent's own block); "
                              f"the budgets' fractions and the speed-up need it")
        slots.sort(key=lambda s: not s[2])  # stable: the parent first (it wins exact ties), block rows before pairs
        per_layer.append(slots)

    num_layers, width = len(per_layer), max(len(s) for s in per_layer)
    valid = np.zeros((num_layers, width), bool)
    parent = np.zeros((num_layers, width), bool)
    first = np.zeros((num_layers, width), int)  # row position of the slot's (first) row
    second = np.full((num_layers, width), -1)  # the FFN row of a pair, else -1
    for i, slots in enumerate(per_layer):
        for j, (_, rows, par) in enumerate(slots):
            valid[i, j], parent[i, j], first[i, j] = True, par, rows[0]
            second[i, j] = rows[1] if len(rows) > 1 else -1
    values = {}
    for c in numeric:
        v = delta[c][first] + np.where(second >= 0, delta[c][np.maximum(second, 0)], 0.0)
        values[c] = np.where(valid, v, np.nan)  # (L, V)
    return Choices(valid=valid, is_parent=parent, blocks=tuple(tuple(s[0] for s in sl) for sl in per_layer),
                   rows=tuple(tuple(tuple(labels[k] for k in s[1]) for s in sl) for sl in per_layer),
                   values=values, base=base, parent_slot=np.zeros(num_layers, int))


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
    parents = table[_as_bool(table["is_parent"]) & (table["subblock"] != "non_block").to_numpy()]
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
# Step 1: filters and dominance


def _allowed(choices: Choices, vllm_compatible: bool, exclude: Sequence) -> np.ndarray:
    """(L, V) mask of the slots the user allows. `exclude`: variant ids (block, attention or FFN),
    or (layer, id) pairs for one layer only."""
    if not vllm_compatible and not exclude:
        return choices.valid.copy()
    everywhere = {e for e in exclude if isinstance(e, str)}
    per_layer = {(int(e[0]), str(e[1])) for e in exclude if not isinstance(e, str)}
    mask = choices.valid.copy()
    for i, blocks in enumerate(choices.blocks):
        for j, b in enumerate(blocks):
            ids = {b.id, b.attention.id, b.ffn.id}
            if (vllm_compatible and "linear" in (b.attention.kind, b.ffn.kind)) or ids & everywhere \
                    or any((i, v) in per_layer for v in ids):
                mask[i, j] = False
    empty = np.flatnonzero(~mask.any(1))
    if len(empty):
        raise PuzzleError(f"layers {empty.tolist()} have no choice left after --vllm-compatible/--exclude; "
                          f"allow at least one of their variants")
    return mask


def prune_dominated(dims: Sequence[np.ndarray], alive: np.ndarray, k: int = 1) -> np.ndarray:
    """Drop choices dominated by at least k others of the same layer.

    Args:
        dims: (L, V) arrays, lower is better in each (score, runtime, every budgeted cost).
        alive: (L, V) bool, the slots still in play.
        k: the number of diverse solutions wanted: a slot dominated by k others can always be
            replaced by one that no earlier solution uses in that layer, so no optimum is lost.
    Returns:
        (L, V) bool, a subset of `alive`. Exact ties: the lower slot index dominates.
    """
    x = np.stack([np.where(alive, d, np.inf) for d in dims], -1)  # (L, V, D)
    a_le_b = (x[:, :, None, :] <= x[:, None, :, :]).all(-1)  # (L, Va, Vb)
    a_lt_b = (x[:, :, None, :] < x[:, None, :, :]).any(-1)
    width = x.shape[1]
    first = np.arange(width)[:, None] < np.arange(width)[None, :]
    dominates = a_le_b & (a_lt_b | first) & alive[:, :, None] & alive[:, None, :]
    return alive & (dominates.sum(1) < k)


# ----------------------------------------------------------------------------------------------
# Step 2: Lagrangian bound from the LP relaxation


class _DualLP:
    """The LP relaxation over the alive slots, kept for a sweep: only the budget right-hand sides change."""

    def __init__(self, objective: np.ndarray, costs: Sequence[np.ndarray], alive: np.ndarray):
        from ortools.linear_solver import pywraplp

        self.cells = np.argwhere(alive)  # (N, 2)
        self.obj_scale = max(float(np.nanmax(np.abs(objective[alive]))), 1e-12)
        self.cost_scales = [max(float(np.nanmax(np.abs(g[alive]))), 1e-12) for g in costs]
        self.solver = pywraplp.Solver.CreateSolver("GLOP")
        inf = self.solver.infinity()
        layer_rows = [self.solver.Constraint(1.0, 1.0) for _ in range(alive.shape[0])]
        self.rows = [self.solver.Constraint(-inf, inf) for _ in costs]
        obj = self.solver.Objective()
        for i, j in self.cells:
            x = self.solver.NumVar(0.0, inf, "")
            layer_rows[i].SetCoefficient(x, 1.0)
            obj.SetCoefficient(x, float(objective[i, j]) / self.obj_scale)
            for row, g, s in zip(self.rows, costs, self.cost_scales):
                row.SetCoefficient(x, float(g[i, j]) / s)
        obj.SetMinimization()

    def multipliers(self, rhs: Sequence[float]) -> np.ndarray | None:
        """λ ≥ 0 per budget row in the problem's own units; None when the LP is infeasible."""
        from ortools.linear_solver import pywraplp

        for row, b, s in zip(self.rows, rhs, self.cost_scales):
            row.SetBounds(-self.solver.infinity(), b / s if math.isfinite(b) else self.solver.infinity())
        status = self.solver.Solve()
        if status == pywraplp.Solver.INFEASIBLE:
            return None
        if status != pywraplp.Solver.OPTIMAL:
            return np.zeros(len(self.rows))  # λ = 0 still gives a valid (weaker) bound
        return np.array([max(0.0, -row.dual_value()) * self.obj_scale / s for row, s in zip(self.rows, self.cost_scales)])


def _lagrangian(objective, costs, rhs, alive, lam) -> tuple[float, np.ndarray]:
    """LB = Σ_i min_j (c + λ·g) − λ·b and red = (c + λ·g) − row minimum ≥ 0 (inf where not alive).

    score(x) ≥ LB + Σ red·x holds for every x meeting the budgets (weak duality), for any λ ≥ 0.
    """
    penalised = objective + sum(l * g for l, g in zip(lam, costs) if l > 0) if len(lam) else objective.copy()
    penalised = np.where(alive, penalised, np.inf)
    row_min = penalised.min(1)
    finite_rhs = sum(l * b for l, b in zip(lam, rhs) if l > 0)
    return float(row_min.sum() - finite_rhs), penalised - row_min[:, None]


# ----------------------------------------------------------------------------------------------
# Step 3: a good first solution (Lagrangian rounding, then single-layer improvements)


def _feasible(slots, costs, rhs) -> bool:
    layers = np.arange(len(slots))
    return all(g[layers, slots].sum() <= b for g, b in zip(costs, rhs))


def _improve(slots, objective, costs, rhs, alive, max_pair_moves: int = 600) -> np.ndarray:
    """Best-improvement local search: change one layer, or two layers at once (one trades cost to
    the other), keeping every budget. Pair moves are drawn from the `max_pair_moves` single-layer
    changes that cost the least score per unit of cost saved or gain the most per unit spent."""
    slots, layers = slots.copy(), np.arange(len(slots))
    for _ in range(alive.size):
        current = objective[layers, slots]
        eps = 1e-13 * max(1.0, abs(current.sum()))
        d_obj = np.where(alive, objective - current[:, None], np.inf)  # (L, V)
        d_cost = [g - g[layers, slots][:, None] for g in costs]  # (L, V) each
        room = [b - g[layers, slots].sum() for g, b in zip(costs, rhs)]
        ok = alive & np.logical_and.reduce([d <= r for d, r in zip(d_cost, room)]) if costs else alive
        single = np.where(ok, d_obj, np.inf)
        i, j = np.unravel_index(np.argmin(single), single.shape)
        best, move = single[i, j], ((i, j),)
        moves = np.argwhere(alive & (np.arange(alive.shape[1])[None, :] != slots[:, None]))
        if costs and len(moves) > 1:
            scale = [max(abs(r) + np.abs(d[alive]).max(), 1e-30) for d, r in zip(d_cost, room)]
            spend = sum(d[moves[:, 0], moves[:, 1]] / s for d, s in zip(d_cost, scale))
            delta = d_obj[moves[:, 0], moves[:, 1]]
            # score change per unit of cost spent (spend > 0) or saved (spend <= 0): lower is better
            rate = delta / np.maximum(np.abs(spend), 1e-30)
            up, down = np.flatnonzero(spend > 0), np.flatnonzero(spend <= 0)
            half = max_pair_moves // 2
            moves = np.concatenate([moves[up[np.argsort(rate[up])[:half]]], moves[down[np.argsort(rate[down])[:half]]]])
            m_obj = d_obj[moves[:, 0], moves[:, 1]]
            total = m_obj[:, None] + m_obj[None, :]  # (M, M)
            fits = moves[:, 0][:, None] != moves[:, 0][None, :]
            for d, r in zip(d_cost, room):
                m = d[moves[:, 0], moves[:, 1]]
                fits &= m[:, None] + m[None, :] <= r
            total = np.where(fits, total, np.inf)
            a, c = np.unravel_index(np.argmin(total), total.shape)
            if total[a, c] < best:
                best, move = total[a, c], (tuple(moves[a]), tuple(moves[c]))
        if not best < -eps:
            break
        for i, j in move:
            slots[i] = j
    return slots


def _repair(slots, objective, costs, rhs, alive, totals_scale) -> np.ndarray | None:
    """Greedy: while a budget is broken, apply the single-layer change with the smallest score
    increase per unit of (scaled) broken-budget cost saved, among the changes that raise no broken
    budget's cost and break no met budget (so the total overrun falls at every step). None when
    no change helps."""
    slots, layers = slots.copy(), np.arange(len(slots))
    current = [g[layers, slots] for g in costs]  # (L,) each
    totals = [float(c.sum()) for c in current]
    for _ in range(alive.size):
        over = [k for k, (total, b) in enumerate(zip(totals, rhs)) if total > b]
        if not over:
            return slots
        saved = sum((current[k][:, None] - costs[k]) / totals_scale[k] for k in over)  # (L, V)
        worse = objective - objective[layers, slots][:, None]
        useful = alive & (saved > 0)
        for k, g in enumerate(costs):
            change = g - current[k][:, None]
            useful &= change <= 0 if k in over else totals[k] + change <= rhs[k]
        ratio = np.where(useful, np.maximum(worse, 0) / np.where(useful, saved, 1) + np.minimum(worse, 0), np.inf)
        i, j = np.unravel_index(np.argmin(ratio), ratio.shape)
        if not math.isfinite(ratio[i, j]):
            return None
        slots[i] = j
        for k, g in enumerate(costs):
            totals[k] += float(g[i, j] - current[k][i])
            current[k][i] = g[i, j]
    return None


def _first_solution(objective, costs, rhs, alive, lam, totals_scale, starts=()) -> np.ndarray | None:
    """A good feasible (L,) slot choice to set the first threshold: the best of an earlier solution
    (a sweep's other budgets), the Lagrangian choice with λ scaled up until it fits (or a greedy
    repair), each improved by local search. None if none is found."""
    layers = np.arange(alive.shape[0])
    usable = [s for s in starts if s is not None and alive[layers, s].all() and _feasible(s, costs, rhs)]
    candidates = [min(usable, key=lambda s: objective[layers, s].sum())] if usable else []  # the best earlier one
    for factor in (1.0, 1.001, 1.01, 1.05, 1.2, 1.5, 2.0, 4.0, 10.0):
        penalised = objective + sum(factor * l * g for l, g in zip(lam, costs))
        slots = np.where(alive, penalised, np.inf).argmin(1)
        if _feasible(slots, costs, rhs):
            candidates.append(slots)
            break
    if not candidates:  # Lagrangian rounding failed: repair the best-scoring choice greedily
        repaired = _repair(np.where(alive, objective, np.inf).argmin(1), objective, costs, rhs, alive, totals_scale)
        if repaired is not None:
            candidates.append(repaired)
    improved = [_improve(s, objective, costs, rhs, alive) for s in candidates]
    return min(improved, key=lambda s: objective[layers, s].sum(), default=None)


# ----------------------------------------------------------------------------------------------
# Step 4a: exact dynamic program over layers (the main prover)

DP_MAX_STATES = 400_000  # partial solutions kept after a layer; beyond this CP-SAT takes over
_DP_SCALE = 2.0**44  # integer resolution of costs in the dynamic program (relative to their range)


def _dp_solve(objective, costs, rhs, keep, red, lam, gap, others, min_differ, tie, deadline=math.inf,
              max_states=None):
    """The best slot choice among `keep` meeting every budget, by dynamic programming over layers.

    A state is a partial solution of layers 0..i: its budgeted costs (integers, rounded up, so
    every state meets the float budgets), its score, its reduced-cost sum R and, per earlier
    solution, how many layers it shares with it (diversity rows are budgets on those counts).
    States with equal costs merge (the better score survives: exact, and strong when costs are
    shared per variant, as in measured libraries); with one budget the (cost, score) Pareto front
    is kept. A state is dropped when no completion can meet a budget, or when a lower bound on
    score − LB exceeds `gap` (the caller's T − LB), using score − LB = R + red_rest +
    Σ_k λ_k·slack_k: R + λ·(slack no completion can fill) and R + λ·(b − C) + Σ_rest min_j
    (c − (c + λ·g)) (the best-scoring completion, budgets ignored) are both lower bounds.

    Returns ("OPTIMAL" | "INFEASIBLE" | "TOO_BIG", (L,) slots or None, bound); "TOO_BIG" when the
    states outgrow `max_states` or time passes `deadline` (time.perf_counter()).
    """
    max_states = DP_MAX_STATES if max_states is None else max_states
    num_layers = keep.shape[0]
    cells = [np.flatnonzero(keep[i]) for i in range(num_layers)]
    if any(len(js) == 0 for js in cells):
        return "INFEASIBLE", None, math.inf
    sequence = np.argsort([len(js) for js in cells], kind="stable")  # narrow layers first: bounds are tightest at the end
    keep, red, objective = keep[sequence], red[sequence], objective[sequence]
    costs, cells = [g[sequence] for g in costs], [cells[i] for i in sequence]
    others = [np.asarray(o)[sequence] for o in others]
    tie = None if tie is None else tie[sequence]
    dims, limits, units = [], [], []  # integer (L, V) cost arrays, limits, real units per integer step
    for g, b, l in zip(costs, rhs, lam if len(lam) else [0.0] * len(costs)):
        if not math.isfinite(b) or sum(float(g[i, js].max()) for i, js in enumerate(cells)) <= b:
            continue  # redundant over the slots kept: every choice meets it
        span = sum(float(np.abs(g[i, js]).max()) for i, js in enumerate(cells)) or 1.0
        scale = _DP_SCALE / span
        dims.append(np.ceil(np.where(keep, g, 0.0) * scale).astype(np.int64))
        limits.append(math.floor(b * scale))
        units.append(l / scale)  # λ per integer unit
    for other in others:  # shares at most L - d layers with each earlier solution
        dims.append((np.arange(keep.shape[1])[None, :] == np.asarray(other)[:, None]).astype(np.int64))
        limits.append(num_layers - min_differ)
        units.append(0.0)

    m = len(dims)
    big = np.iinfo(np.int64).max // 4
    cost = np.stack(dims, -1) if m else np.zeros(keep.shape + (0,), np.int64)  # (L, V, m)
    low = np.where(keep[..., None], cost, big).min(1)  # (L, m) cheapest choice per layer
    high = np.where(keep[..., None], cost, -big).max(1)
    after = lambda a: np.concatenate([np.cumsum(a[::-1], 0)[::-1][1:], np.zeros((1, m), np.int64)])  # noqa: E731
    low_rest, high_rest = after(low), after(high)  # (L, m) over layers i+1..L-1
    limits, units = np.array(limits, np.int64), np.array(units)
    penalised = objective + sum(l * g for l, g in zip(lam, costs) if l > 0) if len(lam) else objective
    drift = np.where(keep, objective, np.inf).min(1) - np.where(keep, penalised, np.inf).min(1)  # (L,) ≤ 0
    drift_rest = np.concatenate([np.cumsum(drift[::-1])[::-1][1:], [0.0]])
    tie = np.zeros(keep.shape) if tie is None else np.where(keep, tie, 0.0)

    state_cost = np.zeros((1, m), np.int64)  # (S, m)
    state_score, state_red, state_tie = np.zeros(1), np.zeros(1), np.zeros(1)
    back = []  # per layer: (parent state, slot) of each surviving state
    slack_tol = 1e-12 * max(1.0, abs(gap)) if math.isfinite(gap) else 0.0
    for i, js in enumerate(cells):
        n = len(js)
        c = (state_cost[:, None, :] + cost[i, js][None, :, :]).reshape(len(state_score) * n, m)  # (S*n, m)
        v = (state_score[:, None] + objective[i, js][None, :]).reshape(-1)
        r = (state_red[:, None] + red[i, js][None, :]).reshape(-1)
        t = (state_tie[:, None] + tie[i, js][None, :]).reshape(-1)
        ok = (c + low_rest[i] <= limits).all(1)
        if math.isfinite(gap):
            slack_low = np.maximum(limits - c - high_rest[i], 0) @ units  # budget no completion can use
            ok &= (r + slack_low <= gap + slack_tol) & (r + (limits - c) @ units + drift_rest[i] <= gap + slack_tol)
        parent, slot = np.divmod(np.flatnonzero(ok), n)
        c, v, r, t = c[ok], v[ok], r[ok], t[ok]
        if len(v) == 0:
            return "INFEASIBLE", None, math.inf
        order = np.lexsort((t, v) + tuple(c.T[::-1]))  # by cost vector, then score, then runtime
        c, v, r, t, parent, slot = c[order], v[order], r[order], t[order], parent[order], slot[order]
        first = np.ones(len(v), bool)
        if m == 0:  # nothing budgeted: the best partial solution is all that matters
            first[1:] = False
        elif m == 1:  # Pareto front of (cost, score): keep a state only if it beats every cheaper one
            first[1:] = v[1:] < np.minimum.accumulate(v)[:-1]
        elif m:
            first[1:] = (c[1:] != c[:-1]).any(1)
        c, v, r, t, parent, slot = c[first], v[first], r[first], t[first], parent[first], slot[first]
        if len(v) > max_states or time.perf_counter() > deadline:
            return "TOO_BIG", None, -math.inf
        back.append((parent, js[slot]))
        state_cost, state_score, state_red, state_tie = c, v, r, t
    best = np.lexsort((state_tie, state_score))[0]
    slots = np.zeros(num_layers, int)
    for i in range(num_layers - 1, -1, -1):
        parent, chosen = back[i]
        slots[sequence[i]], best = chosen[best], parent[best]
    return "OPTIMAL", slots, float(state_score.min())


# ----------------------------------------------------------------------------------------------
# Step 4b: CP-SAT on the reduced problem (when the dynamic program's states outgrow their cap)


def _cp_solve(objective, costs, rhs, keep, red, cut, others, min_differ, hint, tie, time_limit, workers,
              restart_below=-math.inf):
    """Solve min Σ obj·x over the slots in `keep` with integer coefficients.

    cut: None or the gap T − LB: adds Σ red·x ≤ gap (valid for every solution scoring ≤ T).
    others: earlier solutions ((L,) slots) to differ from in at least `min_differ` layers.
    tie: (L, V) values minimised among the optimal set, or None.
    restart_below: stop as soon as a solution scores below this (status "RESTART"), so that the
    caller can shrink the problem around it.
    Returns (status name, (L,) slots or None, lower bound on the objective).
    """
    from ortools.sat.python import cp_model

    num_layers = keep.shape[0]
    if not keep.any(1).all():
        return "INFEASIBLE", None, math.inf
    model = cp_model.CpModel()
    cells = [np.flatnonzero(keep[i]) for i in range(num_layers)]
    xs = [[model.new_bool_var(f"x{i}_{j}") for j in js] for i, js in enumerate(cells)]
    for row in xs:
        model.add_exactly_one(row)

    def integer_terms(values: np.ndarray, rounding, resolution=_SCALE):
        """Per-layer shifted, scaled, rounded coefficients; returns (coeffs per layer, shift, scale)."""
        shift = [float(values[i, js].min()) for i, js in enumerate(cells)]
        span = sum(float(values[i, js].max()) - s for (i, js), s in zip(enumerate(cells), shift))
        scale = resolution / span if span > 0 else 1.0
        return [[int(rounding((values[i, j] - shift[i]) * scale)) for j in js] for i, js in enumerate(cells)], sum(shift), scale

    def expr(coeffs):
        return cp_model.LinearExpr.weighted_sum([x for row in xs for x in row], [c for row in coeffs for c in row])

    for k, (g, b) in enumerate(zip(costs, rhs)):
        if not math.isfinite(b):
            continue
        coeffs, shift, scale = integer_terms(g, math.ceil, _COST_SCALE)  # costs up, budget down: conservative
        if b - shift < 0:
            return "INFEASIBLE", None, math.inf
        limit = math.floor((b - shift) * scale)
        if sum(max(row) for row in coeffs) > limit:
            model.add(expr(coeffs) <= limit)
    obj_coeffs, obj_shift, obj_scale = integer_terms(objective, round)
    if cut is not None:
        red_coeffs = [[int(math.floor(red[i, j] * obj_scale)) for j in js] for i, js in enumerate(cells)]
        model.add(expr(red_coeffs) <= math.ceil(cut * obj_scale) + num_layers)
    for other in others:
        same = [xs[i][int(np.flatnonzero(js == other[i])[0])] for i, js in enumerate(cells) if other[i] in js]
        if len(same) > num_layers - min_differ:
            model.add(sum(same) <= num_layers - min_differ)
    objective_expr = expr(obj_coeffs)
    model.minimize(objective_expr)
    if hint is not None:
        for i, js in enumerate(cells):
            for x, j in zip(xs[i], js):
                model.add_hint(x, bool(j == hint[i]))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    solver.parameters.max_time_in_seconds = max(time_limit, 0.01)
    start = time.perf_counter()

    class Restart(cp_model.CpSolverSolutionCallback):
        def __init__(self):
            super().__init__()
            self.stopped = None

        def on_solution_callback(self):
            if obj_shift + self.objective_value / obj_scale < restart_below:
                self.stopped = np.array([js[[self.value(x) for x in xs[i]].index(1)] for i, js in enumerate(cells)])
                self.stop_search()

    callback = Restart()
    status = solver.solve(model, callback)
    name = solver.status_name(status)
    if callback.stopped is not None and name != "OPTIMAL":
        return "RESTART", callback.stopped, obj_shift + solver.best_objective_bound / obj_scale
    if name not in ("OPTIMAL", "FEASIBLE"):
        return name, None, math.inf
    pick = lambda: np.array([js[[solver.value(x) for x in xs[i]].index(1)] for i, js in enumerate(cells)])  # noqa: E731
    slots, bound = pick(), obj_shift + solver.best_objective_bound / obj_scale
    if name == "OPTIMAL" and tie is not None:  # second pass: fastest among the optimal set
        best = int(round(solver.objective_value))
        model.add(objective_expr <= best)
        tie_coeffs, _, _ = integer_terms(np.where(keep, tie, 0.0), round)
        model.minimize(expr(tie_coeffs))
        model.clear_hints()
        for i, js in enumerate(cells):
            for x, j in zip(xs[i], js):
                model.add_hint(x, bool(j == slots[i]))
        solver.parameters.max_time_in_seconds = max(time_limit - (time.perf_counter() - start), 0.01)
        if solver.status_name(solver.solve(model)) in ("OPTIMAL", "FEASIBLE"):
            slots = pick()
    return name, slots, bound


# ----------------------------------------------------------------------------------------------
# The search over one table: shared work for a sweep


def _objective_weights(objective) -> dict[str, float]:
    """'kl_nats' -> {kl_nats: 1}; 'kl_nats=1,lm_loss=0.5' or a mapping -> {column: weight}."""
    if not isinstance(objective, str):
        return {str(k): float(w) for k, w in dict(objective).items()}
    weights = {}
    for part in filter(None, (p.strip() for p in objective.split(","))):
        column, _, weight = part.partition("=")
        try:
            weights[column.strip()] = float(weight) if weight else 1.0
        except ValueError as e:
            raise PuzzleError(f"objective {objective!r}: write 'column' or 'column=weight,column=weight'") from e
    if not weights:
        raise PuzzleError("the objective is empty; write e.g. 'kl_nats'")
    return weights


class _Search:
    """Choices, filters and dominance pruning of one table, reused across the budgets of a sweep."""

    def __init__(self, table, objective, vllm_compatible, exclude, columns, num_solutions, num_workers):
        self.table, self.choices = table, build_choices(table)
        self.weights = _objective_weights(objective)
        unknown = [c for c in self.weights if c not in self.choices.values]
        if unknown:
            raise PuzzleError(f"objective columns {unknown} are not numeric columns of the score table "
                              f"(have {sorted(self.choices.values)})")
        ch = self.choices
        self.parent = ch.totals(ch.parent_slot)
        self.objective = sum(w * ch.values[c] for c, w in self.weights.items())  # (L, V)
        self.objective_base = sum(w * ch.base[c] for c, w in self.weights.items())
        self.allowed = _allowed(ch, vllm_compatible, exclude)
        self.filtered = vllm_compatible or bool(exclude)
        if np.isnan(self.objective[self.allowed]).any():
            raise PuzzleError(f"objective {self.weights} has missing values in the score table; rescore or pick another")
        self.columns = tuple(columns)
        for c in self.columns:
            if np.isnan(ch.values[c][self.allowed]).any() or not math.isfinite(ch.base[c]):
                raise PuzzleError(f"a budget on {c} needs {c} for every row and the non-block row, but the table has "
                                  f"missing values; budget another resource (e.g. --max-runtime)")
        tie = ch.values.get(TIE_BREAK)
        self.tie = tie if tie is not None and not np.isnan(tie[self.allowed]).any() else None
        dims = [self.objective] + ([self.tie] if self.tie is not None else []) + [ch.values[c] for c in self.columns]
        self.alive = prune_dominated(dims, self.allowed, max(1, num_solutions))
        self.workers = num_workers or min(8, os.cpu_count() or 1)
        self._lp = None
        self.solutions: list[np.ndarray] = []  # every slot choice found so far (hints for the next budget)

    def rhs(self, budgets: Budgets) -> list[float]:
        limits = budgets.limits()
        extra = sorted(set(limits) - set(self.columns))
        if extra:
            raise PuzzleError(f"budgets on {extra} were not declared for this search")
        # the solvers round costs up; the tolerance keeps a budget equal to the least achievable total reachable
        return [limits[c] * (1 + BUDGET_RTOL) - self.choices.base[c] if c in limits else math.inf for c in self.columns]

    def check_reachable(self, budgets: Budgets) -> None:
        """Raise for a budget no child meets even alone (the minimum is separable per layer)."""
        for column, bound in budgets.limits().items():
            values = np.where(self.allowed, self.choices.values[column], np.inf)
            smallest = float(self.choices.base[column] + values.min(1).sum())
            if smallest > bound * (1 + BUDGET_RTOL):
                raise PuzzleError(self._message(column, bound, smallest, "", budgets))

    def _message(self, column, bound, smallest, context, budgets) -> str:
        words, unit = _COST_WORDS[column]
        parent = self.parent[column]
        share = f" ({smallest / parent:.3g} of the parent)" if parent > 0 else ""
        advice = (f"raise {BUDGET_FLAGS[column]} to at least {suggest_fraction(smallest, parent):g}"
                  if parent > 0 else f"raise {BUDGET_FLAGS[column]} to at least {smallest:.6g} {unit}")
        scope = " with the variants --vllm-compatible/--exclude leave" if self.filtered else ""
        return (f"no architecture in the library{scope} meets max_{column}={bound:.6g}{context}; "
                f"{words} {smallest:.6g} {unit}{share}{' under the other budgets' if context else ''}: {advice}")

    def solve(self, budgets: Budgets, num_solutions=1, min_layers_differ=1, time_limit_s=60.0) -> list[Solution]:
        """Up to `num_solutions` solutions, each optimal given the earlier ones (fewer if no more exist)."""
        start = time.perf_counter()
        self.check_reachable(budgets)
        rhs = self.rhs(budgets)
        costs = [self.choices.values[c] for c in self.columns]
        if self._lp is None:
            self._lp = _DualLP(self.objective, costs, self.alive)
        lam = self._lp.multipliers(rhs)
        if lam is None:
            raise PuzzleError(self._joint_infeasible(budgets))
        found, results, begin = [], [], start
        for _ in range(num_solutions):
            remaining = time_limit_s - (time.perf_counter() - begin)
            slots, optimal, bound = self._solve_core(self.objective, costs, rhs, lam, self.alive, found,
                                                     min_layers_differ, remaining)
            if slots is None:
                if not found:
                    raise PuzzleError(self._joint_infeasible(budgets))
                break
            found.append(slots)
            results.append(self._solution(slots, budgets, optimal, bound, time.perf_counter() - start))
            start = time.perf_counter()
        self.solutions.extend(found)
        return results

    def _solve_core(self, objective, costs, rhs, lam, alive, others, min_differ, time_limit):
        """Steps 2-4 for one objective over the `alive` slots.

        Returns ((L,) slots, or None when no slot choice meets the budgets; proven optimal; lower bound).
        """
        deadline = time.perf_counter() + time_limit
        layers = np.arange(self.choices.num_layers)
        lower, red = _lagrangian(objective, costs, rhs, alive, lam)
        value = lambda s: float(objective[layers, s].sum())  # noqa: E731
        scales = [max(abs(self.parent.get(c, 1.0)), 1e-12) for c in self.columns]
        first = None if others else _first_solution(objective, costs, rhs, alive, lam, scales, self.solutions)
        tol = 1e-9 * max(1.0, abs(lower)) * (len(layers) + 1)
        if first is not None:
            threshold = value(first)
        else:
            previous = max((value(s) for s in others), default=lower)
            threshold = previous + max(previous - lower, 1e-6 * max(1.0, abs(lower)))
        full = float(np.where(alive, red, 0.0).max(1).sum())  # beyond this gap the threshold removes nothing
        while True:
            complete = threshold - lower > full
            keep = alive if complete else alive & (red <= threshold - lower + tol)
            gap = math.inf if complete else threshold - lower + tol
            dp_deadline = time.perf_counter() + 0.5 * (deadline - time.perf_counter())  # the rest for CP-SAT
            status, slots, bound = _dp_solve(objective, costs, rhs, keep, red, lam, gap, others, min_differ, self.tie,
                                             dp_deadline)
            if status == "TOO_BIG":
                left = deadline - time.perf_counter()
                restart = -math.inf if complete else lower + RESTART * (threshold - lower)
                status, slots, bound = _cp_solve(objective, costs, rhs, keep, red, None if complete else gap, others,
                                                 min_differ, first, self.tie, left, self.workers, restart)
            if status == "RESTART":  # a clearly better solution: shrink the problem around it
                threshold, first = value(slots), slots
                continue
            if status == "INFEASIBLE":
                if complete:
                    return None, True, math.inf
                threshold = lower + max(4 * (threshold - lower), 1e-6 * max(1.0, abs(lower)))  # always grows
                continue
            if status == "OPTIMAL":
                if complete or value(slots) <= threshold + tol:
                    return slots, True, value(slots)
                threshold, first = value(slots), slots
                continue
            if status == "FEASIBLE":  # out of time: the best found, and a bound valid for all solutions
                return slots, False, bound if complete else min(bound, threshold)
            if first is not None:
                return first, False, lower
            raise PuzzleError(f"the search found no solution within {time_limit:.3g} s; raise --time-limit")

    def _joint_infeasible(self, budgets: Budgets) -> str:
        """Message for budgets each reachable alone but not together: per budget, its minimum under the others."""
        limits, costs = budgets.limits(), [self.choices.values[c] for c in self.columns]
        for column, bound in limits.items():
            others = Budgets(**{f"max_{c}": b for c, b in limits.items() if c != column})
            rhs = self.rhs(others)
            objective = np.where(self.allowed, self.choices.values[column], np.inf)
            lp = _DualLP(objective, costs, self.allowed)
            lam = lp.multipliers(rhs)
            if lam is None:
                continue
            slots, _, _ = self._solve_core(objective, costs, rhs, lam, self.allowed, [], 1, 30.0)
            if slots is not None:
                smallest = self.choices.totals(slots)[column]
                context = f" together with {others.describe()}" if others.limits() else ""
                return self._message(column, bound, smallest, context, budgets)
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


def solve(table: pd.DataFrame, budgets: Budgets, objective="kl_nats", *, vllm_compatible: bool = False,
          exclude: Sequence = (), num_solutions: int = 1, min_layers_differ: int = 1,
          time_limit_s: float = 60.0, num_workers: int | None = None) -> list[Solution]:
    """The best child architectures under `budgets`, each proven optimal and verified.

    Args:
        table: score table (columns `REQUIRED_COLUMNS`; one non_block row).
        budgets: absolute bounds (see `BudgetRequest.resolve` for fractions of the parent).
        objective: a column ("kl_nats", "lm_loss", any numeric score column), or {column: weight}
            (or "kl_nats=1,lm_loss=0.5"); minimised as the sum over layers of each row's difference
            to the parent. Use a negative weight for a higher-is-better column.
        vllm_compatible: leave out linear replacements (vLLM cannot serve them).
        exclude: variant ids (block, attention or FFN ids) to leave out, or (layer, id) pairs.
        num_solutions: k diverse solutions, solution n optimal among those that differ from the
            n-1 before it in at least `min_layers_differ` layers (Σ_i x_(i,y_i) ≤ L − d).
        time_limit_s: for all k solutions together; an unproven solution has optimal=False.
        num_workers: CP-SAT threads (default: CPU count, at most 8).

    Returns:
        Solutions, best first (fewer than k when no more diverse ones exist).

    Raises:
        PuzzleError: a budget no child meets (naming the resource and the smallest achievable value),
            a malformed table, or a missing objective/cost column.
    """
    search = _Search(table, objective, vllm_compatible, exclude, budgets.limits(), num_solutions, num_workers)
    return search.solve(budgets, num_solutions, min_layers_differ, time_limit_s)


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
        PuzzleError: a budget that no single-layer change sequence reaches.
    """
    start = time.perf_counter()
    search = _Search(table, objective, vllm_compatible, exclude, budgets.limits(), 1, 1)
    search.check_reachable(budgets)
    costs = [search.choices.values[c] for c in search.columns]
    scales = [max(abs(search.parent[c]), 1e-12) for c in search.columns]
    best_allowed = np.where(search.allowed, search.objective, np.inf).argmin(1)
    begin = np.where(search.allowed[:, 0], search.choices.parent_slot, best_allowed)  # the parent where allowed
    slots = _repair(begin, search.objective, costs, search.rhs(budgets), search.allowed, scales)
    if slots is None:
        raise PuzzleError(f"greedy selection found no child that meets {budgets.describe()}")
    return search._solution(slots, budgets, False, -math.inf, time.perf_counter() - start, method="greedy")


# ----------------------------------------------------------------------------------------------
# Reading a library and the `puzzle search` command


def load_search_table(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """A score table from: a run directory (DIR/score/score_table.csv), a score table CSV, the Puzzle
    authors' block_library.json, or a folder holding one.

    Raises:
        PuzzleError: nothing readable at `path`.
    """
    from .io import load_table
    from .library_json import read_puzzle_library

    path = Path(path)
    if path.is_dir() and (path / "score" / "score_table.csv").is_file():
        return load_table(path / "score" / "score_table.csv", required_columns=REQUIRED_COLUMNS)
    if path.is_dir() and (path / "block_library.json").is_file() or path.suffix == ".json" and path.is_file():
        return read_puzzle_library(path)
    if path.suffix == ".csv" and path.is_file():
        return load_table(path, required_columns=REQUIRED_COLUMNS)
    raise PuzzleError(f"{path} is neither a run directory with score/score_table.csv, a score table .csv, nor a "
                      f"block_library.json (or its folder)")


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
    _add_once(g, "--objective", default=None, help="score to minimise: kl_nats (default), lm_loss, or 'kl_nats=1,lm_loss=0.5'")
    _add_once(g, "--exclude", action="append", default=[], metavar="VARIANT",
              help="leave out a variant id (block, attention or FFN id), repeatable")
    _add_once(g, "--num-solutions", type=int, default=1, metavar="K", help="K diverse solutions (default 1)")
    _add_once(g, "--min-layers-differ", type=int, default=1, metavar="D",
              help="each further solution differs from every earlier one in at least D layers")
    _add_once(g, "--time-limit", type=float, default=60.0, metavar="S", help="solver time limit in seconds")
    _add_once(g, "--greedy", action="store_true", help="the greedy baseline instead of the MIP")
    _add_once(g, "--json", action="store_true", help="print one JSON object (objective, choice, totals)")
    _add_once(g, "--output", metavar="FILE", default=None, help="also write the solutions as JSON to FILE")


def search_main(args: argparse.Namespace) -> int:
    """`puzzle search --library PATH [budgets] [--json]`: solve, print, optionally write JSON. Returns 0."""
    from .io import atomic_write_json

    table, meta = load_search_table(args.library)
    request = BudgetRequest(**{f: None if getattr(args, f, None) is None else str(getattr(args, f))
                               for f in ("max_runtime", "max_prefill", "max_decode", "max_memory", "max_params",
                                         "speedup", "min_throughput")})
    parent = parent_totals(table)
    budgets = request.resolve(parent, meta)
    objective = getattr(args, "objective", None) or "kl_nats"
    options = dict(vllm_compatible=bool(getattr(args, "vllm_compatible", False)), exclude=tuple(args.exclude or ()))
    if args.greedy:
        solutions = [greedy(table, budgets, objective, **options)]
    else:
        solutions = solve(table, budgets, objective, num_solutions=args.num_solutions,
                          min_layers_differ=args.min_layers_differ, time_limit_s=args.time_limit, **options)
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    record = {**solutions[0].to_dict(), "parent": {k: clean(v) for k, v in parent.items()},
              "workload": {k: meta.get(k) for k in ("device", "dtype", "batch_size", "prompt_len", "gen_len", "sequence_length")
                           if k in meta}, "source": str(args.library)}
    if len(solutions) > 1:
        record["alternatives"] = [s.to_dict() for s in solutions[1:]]
    if args.output:
        atomic_write_json(args.output, record)
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"budgets: {budgets.describe()}   parent: runtime {parent['runtime_ms']:.6g} ms, memory "
          f"{parent['memory_mib']:.6g} MiB, params {parent['params']:.4g}")
    for n, s in enumerate(solutions):
        status = "optimal" if s.optimal else "baseline" if s.method == "greedy" else f"not proven, bound {s.bound:.6g}"
        print(f"[{n}] {s.method}: objective {s.objective:.6g} ({status}, {s.solve_s:.2f} s)  runtime {s.runtime_ms:.6g} ms "
              f"(x{s.speedup:.3g})  memory {s.memory_mib:.6g} MiB  params {s.params:.4g}  kl {s.kl_nats:.4g}")
        start = 0
        for i in range(1, len(s.blocks) + 1):  # runs of equal blocks: "layers  3-7   attn-noop+ffn-14336"
            if i == len(s.blocks) or s.blocks[i] != s.blocks[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                print(f"    layers {span:>7}  {s.blocks[start].id}")
                start = i
    if args.num_solutions > len(solutions) and not args.greedy:
        print(f"only {len(solutions)} solutions differ in at least {args.min_layers_differ} layers")
    return 0
