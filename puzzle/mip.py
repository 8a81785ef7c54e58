"""The mixed-integer program behind `puzzle.search`: a score table as per-layer choice arrays, and
an exact solver over them.

The program (Puzzle, Bercovich et al. 2024; DESIGN.md "Mixed-integer program"):

    minimise    Σ_ij score(i,j) · x_ij
    subject to  Σ_j x_ij = 1                                  for every layer i
                Σ_ij cost_k(i,j) · x_ij ≤ B_k − nonblock_k      for every budgeted resource k
                Σ_i x_(i, y_i) ≤ L − d                         for every earlier solution y (diversity)
                Σ_i (1 − x_(i, a_i)) ≤ r                       optional trust region around an anchor a
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
     solutions with integer costs (merged when equal or dominated by a neighbour, pruned by the same
     Lagrangian bounds and by the least score a completion can add within each budget and within
     weighted sums of them) — milliseconds on real libraries with one or two budgets, about a second at
     most with three. When the states outgrow a cap (or, with diversity rows, after DIVERSE_DP_S
     seconds), CP-SAT (OR-Tools) solves it instead, with the cut Σ red·x ≤ T − LB, restarting whenever
     it finds a clearly better solution. Diverse solutions add "shares at most L − d layers with y"
     rows to either; a trust region is one more cost row (1 for every slot but the anchor's) whose
     multiplier is 0. Costs are rounded *up* and budgets *down* to integers (2^-44 of the costs'
     range in the DP, 1e-12 in CP-SAT), after widening each budget by BUDGET_RTOL = 5e-10 relative:
     every solution meets its budgets to that tolerance (`search.verify` allows 1e-9), and a budget
     equal to the least achievable total stays reachable. Ties in score go to the lower runtime
     (CP-SAT compares scores rounded to 1e-9 of their range; the DP compares the float sums exactly, so
     two choices whose true scores are equal can differ in the last bit and tie the other way).
The first solve of the paper's Llama-3.3-70B library (80 layers x 16 variants) takes well under a
second with one or two budgets; three binding budgets take up to about a second (see
benchmarks/search.py for measured times).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .architecture import ArchitectureError, AttentionConfig, BlockConfig, FFNConfig
from .errors import PuzzleError

COST_COLUMNS = ("runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "params")
SCORE_COLUMNS = ("kl_nats", "lm_loss")
REQUIRED_COLUMNS = ("layer", "subblock", "variant", "is_parent", *SCORE_COLUMNS, *COST_COLUMNS)
SUBBLOCKS = ("attention", "ffn", "block", "non_block")
KL_ROUNDING = 1e-4  # nats: a measured KL this far below 0 is float rounding, not an error
TIE_BREAK = "runtime_ms"  # among equally scored solutions, the faster one wins
RESTART = 0.7  # restart CP-SAT once a solution closes 30% of the gap to the bound
_SCALE = 1e9  # integer resolution of scores inside CP-SAT (relative to their range)
_COST_SCALE = 1e12  # integer resolution of costs inside CP-SAT
BUDGET_RTOL = 5e-10  # a budget B holds when the total is at most B·(1 + BUDGET_RTOL); verify allows 1e-9


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


#: how a table's is_parent cell may read (case aside): true or false
TRUE_TEXTS = ("true", "1", "yes", "1.0")
BOOL_TEXTS = (*TRUE_TEXTS, "false", "0", "no", "0.0")


def as_bool(series: pd.Series) -> np.ndarray:
    if series.dtype == bool:
        return series.to_numpy()
    return series.map(lambda v: str(v).strip().lower() in TRUE_TEXTS).to_numpy()


def _where(table: pd.DataFrame, mask) -> str:
    """'layer 3 attn-noop' for the first row of `mask` (for error messages)."""
    row = table[np.asarray(mask)].iloc[0]
    return f"layer {row['layer']} {row['variant']}"


def _check_values(table: pd.DataFrame) -> None:
    """Refuse values no solver can use: a non-integer layer, text in a score or cost column, an
    infinite score or cost, a negative cost or KL, a cost column with values in some block rows (or in
    them and not in the non_block row) and none in others, an is_parent cell that is not true/false, or a
    variant listed twice in a layer (the message names the first offending row, or both rows of the
    variant). Other missing values (NaN: a score column, a cost column the table does not give) pass: the
    search checks them per use."""
    if table.empty:
        raise PuzzleError("the score table has no rows; rerun `puzzle score`")
    flags = table["is_parent"]
    readable = flags.map(lambda v: isinstance(v, (bool, np.bool_)) or str(v).strip().lower() in BOOL_TEXTS)
    if not readable.all():
        raise PuzzleError(f"the score table's is_parent column holds {flags[~readable].iloc[0]!r} "
                          f"({_where(table, ~readable.to_numpy())}); it must be true or false")
    layer = pd.to_numeric(table["layer"], errors="coerce")
    wrong = layer.isna() | ~np.isfinite(layer) | (layer != np.floor(layer)) | (layer.abs() >= 2 ** 53)
    if wrong.any():  # beyond 2**53 a float is no exact whole number (and no model has that many layers)
        bad = table["layer"][wrong].iloc[0]
        raise PuzzleError(f"the score table's layer column must hold whole numbers; found '{bad}'")
    for c in (*SCORE_COLUMNS, *COST_COLUMNS):
        values = pd.to_numeric(table[c], errors="coerce")
        text = values.isna() & table[c].notna()
        if text.any():
            raise PuzzleError(f"the score table's {c} column holds {table[c][text].iloc[0]!r} ({_where(table, text)}); "
                              f"it must hold numbers (empty for a missing value)")
        if np.isinf(values).any():
            raise PuzzleError(f"the score table's {c} column holds {values[np.isinf(values)].iloc[0]} "
                              f"({_where(table, np.isinf(values))}); scores and costs must be finite: rescore")
        with np.errstate(over="ignore"):
            if not np.isfinite(values.abs().sum()):
                raise PuzzleError(f"the score table's {c} values are too large to add up over the layers (the sum "
                                  f"overflows); give them in ordinary units")
        if c == "kl_nats" and (values < -KL_ROUNDING).any():
            raise PuzzleError(f"the score table's kl_nats column holds a negative KL {values[values < -KL_ROUNDING].iloc[0]:g} "
                              f"({_where(table, values < -KL_ROUNDING)}); a KL divergence is at least 0: rescore")
        if c in COST_COLUMNS and (values < 0).any():
            raise PuzzleError(f"the score table's {c} column holds a negative cost {values[values < 0].iloc[0]:g} "
                              f"({_where(table, values < 0)}); costs are at least 0: remeasure")
        block_rows = (table["subblock"] != "non_block").to_numpy()
        gap = values.isna().to_numpy()  # the non-block row included: it needs its cost as much as the blocks
        if c in COST_COLUMNS and values[block_rows].notna().any() and gap.any():  # a cost given for some rows only
            raise PuzzleError(f"the score table's {c} column has no value in {_where(table, gap)} but has values in "
                              f"other rows: every row needs its cost (a cut or hand-edited table?); remeasure "
                              f"(`puzzle score`) or fill it in")
    variant = table["variant"]
    blank = ~variant.map(lambda v: isinstance(v, str) and bool(v.strip()))
    if blank.any():
        raise PuzzleError(f"the score table's variant column is empty or not text in a row of layer "
                          f"{table['layer'][blank].iloc[0]}; every row needs a variant id")
    body = table[table["subblock"] != "non_block"]
    twice = np.flatnonzero(table.duplicated(["layer", "subblock", "variant"], keep=False).to_numpy()
                           & (table["subblock"] != "non_block").to_numpy())
    if len(twice):  # name both rows (positions, as in a CSV) of the first variant listed twice
        keys, first = list(zip(table["layer"], table["subblock"], table["variant"])), twice[0]
        layer, kind, variant = keys[first]
        again = next(k for k in twice[1:] if keys[k] == keys[first])
        raise PuzzleError(f"layer {layer} lists the {kind} variant {variant} twice, in {_rows(first, again)}; "
                          f"keep one row per variant")
    parents = body[as_bool(body["is_parent"])].groupby(["layer", "subblock"]).size()
    if (parents > 1).any():
        layer, kind = parents[parents > 1].index[0]
        raise PuzzleError(f"layer {layer} marks {parents.max()} {kind} rows is_parent=True; the parent has one")


def _rows(a: int, b: int) -> str:
    """'rows 4 and 9 (counting from 0 below a CSV's header)' for two row positions of the table."""
    return f"rows {a} and {b} (counting from 0 below a CSV's header)"


def build_choices(table: pd.DataFrame) -> Choices:
    """The per-layer choices of a score table (coupled block rows, decoupled pairs, or both).

    Raises:
        PuzzleError: missing columns, no or several non-block rows, layers not numbered 0..L-1, a
            layer with attention rows but no FFN rows (or the reverse), an unknown variant id, two rows
            of one layer for the same block (naming both), or a layer without the parent's block.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PuzzleError(f"the score table lacks columns {missing}; it needs {list(REQUIRED_COLUMNS)}")
    bad = sorted(set(table["subblock"]) - set(SUBBLOCKS))
    if bad:
        raise PuzzleError(f"the score table has unknown subblock kinds {bad}; expected {SUBBLOCKS}")
    _check_values(table)
    if "kl_nats" in table:  # within KL_ROUNDING below 0 (tables of earlier versions, hand edits): rounding, so 0
        table = table.assign(kl_nats=pd.to_numeric(table["kl_nats"]).clip(lower=0))
    numeric = [c for c in table.columns if c not in ("layer", "subblock", "variant", "is_parent")
               and pd.api.types.is_numeric_dtype(table[c])]
    is_parent = as_bool(table["is_parent"])
    non_block = table[table["subblock"] == "non_block"]
    if len(non_block) != 1:
        raise PuzzleError(f"the score table must have exactly one non_block row (embedding, final norm, LM head); "
                          f"it has {len(non_block)}: rerun `puzzle score`")
    body = table[table["subblock"] != "non_block"]
    layers = sorted(int(v) for v in body["layer"].unique())
    if layers != list(range(len(layers))) or not layers:
        present = set(layers)  # the first 9 missing numbers only: a layer numbered 10**15 must not fill memory
        missing = list(itertools.islice((i for i in range(max(layers, default=-1) + 1) if i not in present), 9))
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        found = (f"without layer(s) {shown}" if missing else f"numbered from {layers[0]}") if layers else "none at all"
        raise PuzzleError(f"score table layers must be 0..L-1 with none missing; it has {len(layers)} layers, {found}: "
                          f"rescore (`puzzle score`) or give the whole table")
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
            # block id -> its row position (one spelling per id, so `_check_values` found any block listed twice)
            coupled = {block.id: k for block, (k,), _ in slots}
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



# ----------------------------------------------------------------------------------------------
# Step 1: filters and dominance


def vllm_unservable(layer: int, block) -> bool:
    """Whether --vllm-compatible leaves out `block` (a BlockConfig) in layer `layer`: linear subblocks, which vLLM's
    DeciLM model does not serve, and a no_op attention in layer 0 (`export.vllm_layout_problems`)."""
    # vLLM's DeciLM layer hands an FFN met before any attention a residual of None and fails (reviewer:
    # nemotron_nas.py DeciLMDecoderLayer.forward); an attention in layer 0 rules that out
    return "linear" in (block.attention.kind, block.ffn.kind) or (layer == 0 and block.attention.kind == "no_op")


def filter_flags(vllm_compatible: bool, exclude: Sequence) -> str:
    """The flags that leave variants out, for messages: "--vllm-compatible", "--exclude", both joined by "/", or ""."""
    return "/".join(f for f, on in (("--vllm-compatible", vllm_compatible), ("--exclude", bool(exclude))) if on)


def allowed_slots(choices: Choices, vllm_compatible: bool, exclude: Sequence) -> np.ndarray:
    """(L, V) mask of the slots the user allows. `exclude`: variant ids (block, attention or FFN),
    or (layer, id) pairs for one layer only. `vllm_compatible` leaves out linear subblocks and a no_op attention
    in layer 0 (`export.vllm_layout_problems`)."""
    if not vllm_compatible and not exclude:
        return choices.valid.copy()
    everywhere = {e for e in exclude if isinstance(e, str)}
    per_layer = {(int(e[0]), str(e[1])) for e in exclude if not isinstance(e, str)}
    mask = choices.valid.copy()
    for i, blocks in enumerate(choices.blocks):
        for j, b in enumerate(blocks):
            ids = {b.id, b.attention.id, b.ffn.id}
            if (vllm_compatible and vllm_unservable(i, b)) or ids & everywhere or any((i, v) in per_layer for v in ids):
                mask[i, j] = False
    empty = np.flatnonzero(~mask.any(1))
    if len(empty):
        why = (" (--vllm-compatible keeps an attention in layer 0, and this library offers none there: the parent "
               "has none; vLLM cannot serve such a model)" if vllm_compatible and 0 in empty
               and all(b.attention.kind == "no_op" for b, ok in zip(choices.blocks[0], choices.valid[0]) if ok) else "")
        many = len(empty) > 1
        raise PuzzleError(f"layer{'s' if many else ''} {layer_ranges(empty.tolist())} {'have' if many else 'has'} no "
                          f"choice left after {filter_flags(vllm_compatible, exclude)}{why}; allow at least one of "
                          f"{'their' if many else 'its'} variants")
    return mask


def layer_ranges(layers: Sequence[int]) -> str:
    """Sorted layer numbers as ranges: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (breaker: an exclusion emptying all 80
    layers of a library listed every number)."""
    spans: list[list[int]] = []
    for i in sorted(layers):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


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


def fitting_slots(costs: Sequence[np.ndarray], rhs: Sequence[float], alive: np.ndarray) -> np.ndarray:
    """Drop slots that no choice meeting the budgets can hold: slot (i, j) with
    costs[k][i, j] + Σ_{i' ≠ i} min_j' costs[k][i', j'] > rhs[k] for some budget row k.

    Exact (every feasible choice keeps all its slots), and it keeps a far-off cost (a typo such as
    1e16 parameters) out of the solvers' integer scaling, whose resolution follows the cost range.

    Args:
        costs: per budget row an (L, V) float array; rhs: its bound (inf: no budget).
        alive: (L, V) bool, the slots in play.

    Returns:
        (L, V) bool, a subset of `alive` (unchanged where a layer would lose every slot: the
        budgets then cannot be met, which the solvers report).
    """
    keep = alive.copy()
    for g, b in zip(costs, rhs):
        if not math.isfinite(b):
            continue
        cost = np.where(alive, g, np.inf)
        least = cost.min(1)  # (L,)
        span = float(np.abs(np.where(alive, g, 0.0)).max(1).sum())  # slack for rounding, whatever the signs
        with np.errstate(invalid="ignore"):
            keep &= cost - least[:, None] + least.sum() <= b + 1e-9 * (abs(b) + span)
    return keep if keep.any(1).all() else alive


class DualLP:
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


def lagrangian(objective, costs, rhs, alive, lam) -> tuple[float, np.ndarray]:
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


def repair(slots, objective, costs, rhs, alive, totals_scale) -> np.ndarray | None:
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
        repaired = repair(np.where(alive, objective, np.inf).argmin(1), objective, costs, rhs, alive, totals_scale)
        if repaired is not None:
            candidates.append(repaired)
    improved = [_improve(s, objective, costs, rhs, alive) for s in candidates]
    return min(improved, key=lambda s: objective[layers, s].sum(), default=None)


# ----------------------------------------------------------------------------------------------
# Step 4a: exact dynamic program over layers (the main prover)

DP_MAX_STATES = 400_000  # partial solutions kept after a layer; beyond this CP-SAT takes over
# seconds the DP gets per solve with diversity rows before CP-SAT takes over: on the 70B library, 4 solutions 40
# layers apart (runtime 0.5, memory 0.8) took 37-56 s with half the time limit for the DP (it overflowed after
# 11-20 s per solution, and CP-SAT then proved each in 0.1-1.6 s); 10 s with 1 s (2-core VM)
DIVERSE_DP_S = 1.0
FIRST_BEAM = 300  # states per layer of the beam DP that improves the first solution under several budgets
_DP_SCALE = 2.0**44  # integer resolution of costs in the dynamic program (relative to their range)


def _integral(values: np.ndarray, keep: np.ndarray) -> bool:
    """Whether every kept value is a whole number (a count), which integer rows then represent exactly."""
    kept = values[keep]
    return bool(np.all(np.isfinite(kept)) and np.all(kept == np.round(kept)))


def _lex_rank(v: np.ndarray, t: np.ndarray, with_order: bool = False):
    """(S,) int64: the rank of each (score, tie-break) pair in lexicographic order, equal pairs equal; with_order:
    also (S,) the stable order by it (positions of equal pairs ascending)."""
    order = np.argsort(v)  # one pass where no scores tie (the usual case with measured scores), any sort will do
    vs = v[order]
    if np.any(vs[1:] == vs[:-1]):
        order = np.lexsort((t, v))
        vs = v[order]
    ts = t[order]
    new = np.ones(len(v), bool)
    new[1:] = (vs[1:] != vs[:-1]) | (ts[1:] != ts[:-1])
    rank = np.empty(len(v), np.int64)
    rank[order] = np.cumsum(new) - 1
    return (rank, order) if with_order else rank


DOMINANCE_WINDOW = 12  # neighbours in cost order each state is compared with (`_dominated`; 8: 8 % slower)


def _dominated(c: np.ndarray, rank: np.ndarray, window: int = DOMINANCE_WINDOW) -> np.ndarray:
    """(S,) bool: states dominated by another state among their `window` predecessors in some cost order.

    c: (S, m) int costs with m >= 2, rows sorted lexicographically by cost vector, then score, then
    tie-break (the dynamic program's order, so equal cost vectors are adjacent; the first pass needs column 0
    ascending, and does not compare it, as each later pass skips the column it sorts by); rank: (S,) int, each state's
    (score, tie-break) pair's rank (`_lex_rank`, which the caller sorts by too). State j is dominated by i when
    c_i <= c_j in every column and (v_i, t_i) <= (v_j, t_j), i.e. rank_i <= rank_j: every completion of j is as
    feasible and at least as good from i, ties included, so
    the dynamic program may drop j. One pass in the given order, then one per further column in that column's
    order, each over the states the earlier passes kept. Sound, not complete (a dominating state farther
    away is missed), and cheap. It replaced an exact Pareto front per group of states with equal costs in all
    but one column, which on the Puzzle authors' 70B library with three budgets (few states share two costs)
    kept 2-4x more states (the 7 slowest of 240 random three-budget solves: 30.0 s -> 7.3 s together, 2-core
    VM). Dropping a state whose dominator is dropped too is safe: each pass compares only with states still
    kept, so a chain ends at a kept state that dominates them all (dominance is transitive; of equal states
    the first stays).
    """
    out = np.zeros(len(rank), bool)
    for k in range(c.shape[1]):
        alive = np.flatnonzero(~out)
        order = alive if k == 0 else alive[np.argsort(c[alive, k], kind="stable")]
        # 1-D, contiguous; column k is ascending in this order, so it holds for every pair and is not compared
        ranks, columns = rank[order], [c[order, j] for j in range(c.shape[1]) if j != k]
        hit = np.zeros(len(order), bool)
        for d in range(1, min(window, len(order) - 1) + 1):
            dominates = ranks[:-d] <= ranks[d:]
            for column in columns:
                dominates &= column[:-d] <= column[d:]
            hit[d:] |= dominates
        out[order[hit]] = True
    return out


FRONT_CAP = 20_000  # points of one suffix front (`_suffix_fronts`) beyond which its costs are coarsened
PAIR_FRONT_CAP = 5_000  # the same for the fronts of pairs of budgets (`_dp_solve`), looser and cheaper
PAIRS_AFTER = 8_000  # states after which `_dp_solve` adds the pairs' fronts (they cost more than they save below)


def _suffix_fronts(cost: np.ndarray, objective: np.ndarray, cells,
                   cap: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer i, the least score layers i+1..L-1 can add within a given budget of one integer cost row,
    ignoring every other row: a lower bound on any completion of a partial solution of layers 0..i.

    Args:
        cost: (L, V) int64 costs of one row (as `_dp_solve` rounds them); objective: (L, V) float scores;
        cells: per layer, the slots in play.

    Returns:
        L pairs (costs ascending, least scores non-increasing) of int64 / float64 arrays: F_i(b) is the score at
        the last cost <= b (inf below the first). Where a layer's slots times the front behind it exceed
        `cap` (default FRONT_CAP) combinations, their costs are rounded down to a grid of that many steps, which
        only lowers F: the bound stays valid (looser); the least score per grid step is then a scatter
        (`np.minimum.at`), 5x faster than sorting 320,000 combinations (the result is the same).
    """
    cap = FRONT_CAP if cap is None else cap
    fronts = [None] * len(cells)
    c_front, s_front = np.zeros(1, cost.dtype), np.zeros(1)
    for i in range(len(cells) - 1, -1, -1):
        fronts[i] = (c_front, s_front)
        js = cells[i]
        c = (c_front[None, :] + cost[i, js][:, None]).reshape(-1)  # (n * F,)
        v = (s_front[None, :] + objective[i, js][:, None]).reshape(-1)
        low, step = (c.min(), (c.max() - c.min()) / cap) if len(c) > cap else (0, 0)
        if step > 0:  # over `cap` combinations: rounded down to a grid, more combinations fit, F only falls
            if c.dtype.kind == "i":
                step = max(1, int(step) + 1)
                cell = (c - low) // step
            else:
                cell = np.floor((c - low) / step).astype(np.int64)
            least = np.full(int(cell.max()) + 1, np.inf)  # (cells,) the least score per grid cost
            np.minimum.at(least, cell, v)  # a scatter: cheaper than sorting the combinations (5x on 320,000)
            cell = np.flatnonzero(least < np.inf)
            c, least = low + cell * step, np.minimum.accumulate(least[cell])  # the least at that cost or below
        else:
            order = np.argsort(c, kind="stable")  # the shifted fronts are sorted runs: a stable sort merges them
            c, least = c[order], np.minimum.accumulate(v[order])  # the least score within each cost, in cost order
            lasts = np.flatnonzero(np.concatenate([c[1:] != c[:-1], [True]]))  # the last of each cost
            c, least = c[lasts], least[lasts]  # (one per cost) the least score at that cost or below
        below = least < np.concatenate([[np.inf], least[:-1]])  # a point survives only below every cheaper one
        c_front, s_front = c[below], least[below]
    return fronts


def _dp_solve(objective, costs, rhs, keep, red, lam, gap, others, min_differ, tie, deadline=math.inf,
              max_states=None, beam=None, ceiling=math.inf):
    """The best slot choice among `keep` meeting every budget, by dynamic programming over layers.

    A state is a partial solution of layers 0..i: its budgeted costs (integers, rounded up, so
    every state meets the float budgets), its score, its reduced-cost sum R and, per earlier
    solution, how many layers it shares with it (diversity rows are budgets on those counts).
    States with equal costs merge (the better score survives: exact, and strong when costs are
    shared per variant, as in measured libraries); with one budget the (cost, (score, runtime)) Pareto front
    is kept, with several a state dominated by a neighbour in some cost order is dropped (`_dominated`);
    whole-number rows (layer counts) keep scale 1, and shared-layer counts saturate once d layers differ.
    A state is dropped when no completion can meet a budget, or when a lower bound on
    score − LB exceeds `gap` (the caller's T − LB), using score − LB = R + red_rest +
    Σ_k λ_k·slack_k: R + λ·(slack no completion can fill) and R + λ·(b − C) + Σ_rest min_j
    (c − (c + λ·g)) (the best-scoring completion, budgets ignored) are both lower bounds.

    Returns ("OPTIMAL" | "INFEASIBLE" | "TOO_BIG", (L,) slots or None, bound); "TOO_BIG" when the
    states outgrow `max_states` or time passes `deadline` (time.perf_counter()).

    beam: keep at most this many states after each layer, those with the smallest reduced-cost sum R
    (a heuristic: the result meets every budget but is not proven best; status "FEASIBLE").

    ceiling: a score no solution sought exceeds (the caller's threshold T); a state is also dropped when its
    score plus the least score its completion can add within one budget (`_suffix_fronts`, the others ignored)
    or within the λ-weighted sum of the budgets (a surrogate row every solution meets) exceeds it. Layers go
    widest first (most slots in play): with these bounds that kept fewer states than narrowest first (with
    diversity rows, narrowest first stays: 4 solutions 40 layers apart took 53 s against 60 s). On the
    slowest three-budget solve a reviewer found on the 70B library (runtime 0.47, memory 0.40, params 0.34 of
    the parent) the largest layer's states fell from 350,000 to 18,000 and the solve from 13.3 s to 0.8 s; on
    80 random three-budget combinations the slowest from 13.3 s to 0.89 s, with identical optima (2-core VM).
    With `_dominated`, 240 random three-budget combinations (runtime 0.3-0.8 of the parent, memory up to 0.12
    below it, parameters up to 0.12 below memory; seeds 3, 7, 11; 2-core VM): slowest 6.8 s -> 1.3 s (with the
    pairs' fronts too), 16 -> 2 above 1 s, median 0.1 s either way, identical optima. With each pair's tests built
    from per-state and per-slot parts (the costs of the pairs that pass only), coarsened suffix fronts built by a
    scatter instead of a sort, one score ranking per layer that also seeds the cost-order sort, and `_dominated`
    skipping the column its order sorts, on the same 240 (process CPU, best of 2, each solve timed next to the
    earlier code, three runs): slowest 1.22-1.33 s -> 0.74-1.04 s, total 14-18 % lower, median 0.10-0.12 s either
    way, the 16 slowest a median 0.71x, identical choices; single-budget solves (~45 ms) unchanged within 2 %.
    """
    max_states = DP_MAX_STATES if max_states is None else max_states
    num_layers = keep.shape[0]
    cells = [np.flatnonzero(keep[i]) for i in range(num_layers)]
    if any(len(js) == 0 for js in cells):
        return "INFEASIBLE", None, math.inf
    # widest layers first (see the docstring), but with diversity rows narrowest first, which kept fewer states there
    sequence = np.argsort([len(js) if others else -len(js) for js in cells], kind="stable")
    keep, red, objective = keep[sequence], red[sequence], objective[sequence]
    costs, cells = [g[sequence] for g in costs], [cells[i] for i in sequence]
    others = [np.asarray(o)[sequence] for o in others]
    tie = None if tie is None else tie[sequence]
    dims, limits, units = [], [], []  # integer (L, V) cost arrays, limits, real units per integer step
    for g, b, l in zip(costs, rhs, lam if len(lam) else [0.0] * len(costs)):
        if not math.isfinite(b) or sum(float(g[i, js].max()) for i, js in enumerate(cells)) <= b:
            continue  # redundant over the slots kept: every choice meets it
        span = sum(float(np.abs(g[i, js]).max()) for i, js in enumerate(cells)) or 1.0
        scale = 1.0 if _integral(g, keep) and span <= _DP_SCALE else _DP_SCALE / span  # counts stay exact
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
    budget_rows = m - len(others)  # the diversity rows are counts, no budget worth a front
    weights = units[:budget_rows]  # λ per integer unit: the LP's own mix of the budgets (a surrogate row)
    fronts = [_suffix_fronts(cost[..., k], objective, cells) for k in range(budget_rows)] \
        if math.isfinite(ceiling) else []
    # surrogate rows, weighted sums of the budgets, which every completion meeting them all meets too: the LP's
    # own mix of the budgets (on three-budget solves it drops the most, so it goes first); with three or more
    # budgets, once a layer keeps over PAIRS_AFTER states, also every pair, each budget scaled by its largest
    # cost (the 7 slowest of 240 random three-budget solves on the 70B library: 6.8 s -> 6.1 s together, with
    # 45 % fewer states; built from the start they made the easier three-budget solves 20-37 % slower)
    surrogates = [(weights, _suffix_fronts(cost[..., :budget_rows] @ weights, objective, cells))] \
        if math.isfinite(ceiling) and budget_rows > 1 and (weights > 0).sum() > 1 else []
    pairs_pending = math.isfinite(ceiling) and budget_rows >= 3
    ceiling_tol = 1e-12 * max(1.0, abs(ceiling)) * (num_layers + 1) if math.isfinite(ceiling) else 0.0
    unfronted = np.arange(m) >= len(fronts)  # columns no suffix front checks: diversity counts (all without a ceiling)

    state_cost = np.zeros((1, m), np.int64)  # (S, m)
    state_score, state_red, state_tie = np.zeros(1), np.zeros(1), np.zeros(1)
    back = []  # per layer: (parent state, slot) of each surviving state
    slack_tol = 1e-12 * max(1.0, abs(gap)) if math.isfinite(gap) else 0.0
    for i, js in enumerate(cells):
        n = len(js)
        cj, oj, rj, tj = cost[i, js], objective[i, js], red[i, js], tie[i, js]  # (n, m), (n,) ...
        # the tests run on (state, slot) pairs through per-state and per-slot parts: the (S*n, m) cost array of
        # every pair is built for the pairs that pass them only (on the 70B library's slowest three-budget solves
        # most pairs fail the bounds)
        ok = np.ones((len(state_score), n), bool)  # (S, n)
        # a completion fits each budget: the fronts below check it for the budget rows, this for the rest
        for k in np.flatnonzero(unfronted):
            pair = state_cost[:, k, None] + cj[None, :, k]  # (S, n)
            if k >= budget_rows:  # differing in d layers is all that counts: shared counts saturate at
                pair = np.maximum(pair, i + 1 - min_differ)  # (layers so far) − d
            ok &= pair <= limits[k] - low_rest[i, k]
        if math.isfinite(gap):
            r = state_red[:, None] + rj[None, :]  # (S, n)
            # λ-weighted: the budget no completion can use, and all budget left (room @ units); room per column is
            # an exact integer (a float sum of per-state and per-slot parts cancels: a fuzz test against the earlier
            # code found such a sum, -1e-16 for a room of 0, dropping the optimum's state)
            slack_low, linear = np.zeros(ok.shape), np.zeros(ok.shape)
            for k in np.flatnonzero(units):
                room = (limits[k] - state_cost[:, k])[:, None] - cj[None, :, k]  # (S, n) budget k left
                slack_low += np.maximum(room - high_rest[i, k], 0) * units[k]
                linear += room * units[k]
            ok &= (r + slack_low <= gap + slack_tol) & (r + linear + drift_rest[i] <= gap + slack_tol)
        parent, slot = np.divmod(np.flatnonzero(ok), n)  # the pairs in play, state-major
        v = state_score[parent] + oj[slot]
        # (S', budgets) each pair's budget left for layers i+1.., integers: the fronts' tests below read it
        room = (limits[:budget_rows] - state_cost[:, :budget_rows])[parent] - cj[slot, :budget_rows]
        if pairs_pending and len(state_score) > PAIRS_AFTER:  # a hard solve: the pairs' fronts pay off
            pairs_pending = False
            scale = 1.0 / np.maximum(np.abs(np.where(keep[..., None], cost[..., :budget_rows], 0)).max((0, 1)), 1)
            for a, b in itertools.combinations(range(budget_rows), 2):
                w = np.where(np.isin(np.arange(budget_rows), [a, b]), scale, 0.0)
                surrogates.append((w, _suffix_fronts(cost[..., :budget_rows] @ w, objective, cells, PAIR_FRONT_CAP)))
        for w, per_layer in surrogates:  # the least completion within a weighted sum of the budgets
            f_cost, f_score = per_layer[i]
            left = room @ w
            at = np.searchsorted(f_cost, left * (1 + 1e-9) + 1e-12 * abs(f_cost).max(), side="right") - 1
            rest = np.where(at >= 0, f_score[np.maximum(at, 0)], np.inf)
            passed = v + rest <= ceiling + ceiling_tol
            parent, slot, v, room = parent[passed], slot[passed], v[passed], room[passed]
        for k, per_layer in enumerate(fronts):  # the least completion within budget k alone
            f_cost, f_score = per_layer[i]
            at = np.searchsorted(f_cost, room[:, k], side="right") - 1  # last front point within it
            rest = np.where(at >= 0, f_score[np.maximum(at, 0)], np.inf)
            passed = v + rest <= ceiling + ceiling_tol
            parent, slot, v, room = parent[passed], slot[passed], v[passed], room[passed]
        c = state_cost[parent] + cj[slot]  # (S', m) the passing pairs' costs
        if others:
            c[:, budget_rows:] = np.maximum(c[:, budget_rows:], i + 1 - min_differ)
        r, t = state_red[parent] + rj[slot], state_tie[parent] + tj[slot]
        if len(v) == 0:
            return "INFEASIBLE", None, math.inf
        rank, order = _lex_rank(v, t, with_order=True)  # (S,) by score, then runtime: a faster state ranks first
        for k in range(m - 1, -1, -1):  # stable sorts from the last cost column: by cost vector, then score, runtime
            order = order[np.argsort(c[order, k], kind="stable")]
        c, v, r, t, parent, slot, rank = (c[order], v[order], r[order], t[order], parent[order], slot[order],
                                          rank[order])
        first = np.ones(len(v), bool)
        if m == 0:  # nothing budgeted: the best partial solution is all that matters
            first[1:] = False
        elif m == 1:  # Pareto front of (cost, (score, t)): keep a state only if it beats every cheaper one
            first[1:] = rank[1:] < np.minimum.accumulate(rank)[:-1]
        elif m:  # several budgets, or runtime + a trust-region or diversity count
            first = ~_dominated(c, rank)
        c, v, r, t, parent, slot = c[first], v[first], r[first], t[first], parent[first], slot[first]
        if beam is not None and len(v) > beam:  # the likeliest to end with a good score under the budgets
            best = np.argsort(r, kind="stable")[:beam]
            c, v, r, t, parent, slot = c[best], v[best], r[best], t[best], parent[best], slot[best]
        if len(v) > max_states or time.perf_counter() > deadline:
            return "TOO_BIG", None, -math.inf
        back.append((parent, js[slot]))
        state_cost, state_score, state_red, state_tie = c, v, r, t
    best = np.lexsort((state_tie, state_score))[0]
    slots = np.zeros(num_layers, int)
    for i in range(num_layers - 1, -1, -1):
        parent, chosen = back[i]
        slots[sequence[i]], best = chosen[best], parent[best]
    return ("OPTIMAL" if beam is None else "FEASIBLE"), slots, float(state_score.min())


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
        """Per-layer shifted, scaled, rounded coefficients; returns (coeffs per layer, shift, scale).
        Integer values (counts of layers, parameters) keep scale 1, so no rounding can tighten a bound."""
        shift = [float(values[i, js].min()) for i, js in enumerate(cells)]
        span = sum(float(values[i, js].max()) - s for (i, js), s in zip(enumerate(cells), shift))
        scale = resolution / span if span > 0 else 1.0
        if _integral(values, keep) and span <= resolution:
            scale = 1.0
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
    # presolve off: with budget coefficients near 1e12 (`_COST_SCALE`, which keeps a budget on the least achievable
    # total reachable) OR-Tools 9.15's presolve returned OPTIMAL for a worse child (a breaker's seeded table: 0.9863
    # "optimal" beside a feasible 0.6972); without it the same models solve right, in about the same time
    # (measured with every exact solve forced to CP-SAT on the 70B library and the synthetic 126 x 60 space)
    solver.parameters.cp_model_presolve = False
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
# Steps 2-4 together


def solve_core(objective, costs, rhs, lam, alive, others, min_differ, time_limit, *, tie=None, workers=1,
               scales=None, starts=(), dp_memo: dict | None = None):
    """Steps 2-4: the best slot choice over the `alive` slots meeting every cost row.

    Args:
        objective: (L, V) float, minimised (inf or anything where not alive).
        costs, rhs: (L, V) cost arrays and their bounds (Σ_i costs[k][i, x_i] ≤ rhs[k]); the first
            len(lam) rows are the LP's budget rows, any further rows (e.g. a trust region) have λ = 0.
        lam: λ ≥ 0 from `DualLP.multipliers` (padded with zeros to len(costs) here).
        alive: (L, V) bool slots in play.
        others, min_differ: earlier solutions ((L,) slots) to differ from in ≥ min_differ layers.
        time_limit: seconds for this solve.
        tie: (L, V) values minimised among equally scored solutions (runtime), or None.
        workers: CP-SAT threads. scales: per cost row, the size of a typical total (for greedy
            repair ratios). starts: earlier solutions offered as first solutions.
        dp_memo: shared by the solves of one diverse sequence: the fewest earlier solutions with which the DP was too
            big ("too_big_with"); a solve with at least as many goes straight to CP-SAT (more diversity rows, more
            states). A DP out of its time share reads as too big as well: that costs speed only, CP-SAT solves.

    Returns:
        ((L,) int slots, or None when no slot choice meets the rows; proven optimal; lower bound).

    Raises:
        PuzzleError: no solution found within `time_limit`.
    """
    lam = np.concatenate([np.asarray(lam, float), np.zeros(len(costs) - len(lam))])
    deadline = time.perf_counter() + time_limit
    layers = np.arange(alive.shape[0])
    lower, red = lagrangian(objective, costs, rhs, alive, lam)
    value = lambda s: float(objective[layers, s].sum())  # noqa: E731
    scales = [1.0] * len(costs) if scales is None else scales
    first = None if others else _first_solution(objective, costs, rhs, alive, lam, scales, starts)
    tol = 1e-9 * max(1.0, abs(lower)) * (len(layers) + 1)
    if first is not None and sum(math.isfinite(b) for b in rhs) >= 2:  # several budgets: the exact DP's states
        # multiply, and a tighter first threshold keeps fewer slots; a beam DP finds one in a fraction of the time
        keep = alive & (red <= value(first) - lower + tol)
        status, slots, _ = _dp_solve(objective, costs, rhs, keep, red, lam, math.inf, others, min_differ, tie,
                                     deadline=deadline, beam=FIRST_BEAM)
        if status == "FEASIBLE" and _feasible(slots, costs, rhs) and value(slots) < value(first):
            first = slots
    if first is not None:
        threshold = value(first)
    else:
        previous = max((value(s) for s in others), default=lower)
        threshold = previous + max(previous - lower, 1e-6 * max(1.0, abs(lower)))
    full = float(np.where(alive, red, 0.0).max(1).sum())  # beyond this gap the threshold removes nothing
    dp_memo = {} if dp_memo is None else dp_memo
    dp_too_big = bool(others) and len(others) >= dp_memo.get("too_big_with", math.inf)
    while True:
        complete = threshold - lower > full
        keep = alive if complete else alive & (red <= threshold - lower + tol)
        gap = math.inf if complete else threshold - lower + tol
        share = 0.5 * (deadline - time.perf_counter())  # the rest for CP-SAT
        if others:  # diversity rows multiply the DP's states; CP-SAT proves those fast (`DIVERSE_DP_S`)
            share = min(share, DIVERSE_DP_S)
        if dp_too_big:  # once too big with diversity rows, it stays so after a restart (70B library,
            status = "TOO_BIG"  # 5 solutions 20 layers apart: each retry spent 1.1-1.8 s before CP-SAT)
        else:
            status, slots, bound = _dp_solve(objective, costs, rhs, keep, red, lam, gap, others, min_differ, tie,
                                             time.perf_counter() + share,
                                             ceiling=math.inf if complete else threshold + tol)
        if status == "TOO_BIG":
            if others:  # (without diversity rows a restart's smaller problem may fit the DP again)
                dp_too_big = True
                dp_memo["too_big_with"] = min(len(others), dp_memo.get("too_big_with", math.inf))
            left = deadline - time.perf_counter()
            restart = -math.inf if complete else lower + RESTART * (threshold - lower)
            status, slots, bound = _cp_solve(objective, costs, rhs, keep, red, None if complete else gap, others,
                                             min_differ, first, tie, left, workers, restart)
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
