"""Baselines for the front: other ways to make the same parent faster, realized and measured like our children.

Each baseline meets the same runtime budget (predicted runtime ≤ parent runtime / speed-up, from the
same kind of measured cost table) and is then realized, evaluated on the same evaluation split and
measured next to the parent, like the MIP's children:

    greedy             the same library and score table as the MIP; from the parent, repeatedly the
                       single-layer change with the smallest KL increase per unit of runtime saved
                       (`search.greedy`, with the run's --objective and --vllm-compatible, as the MIP),
                       on BLD-trained and on init-only entries
    layer_removal      ShortGPT (Men et al. 2024): block influence BI_i = 1 − E_tokens cos(h_i, h_{i+1})
                       on calibration text; the fewest layers of lowest BI whose removal meets the budget
    attention_removal  "What Matters in Transformers? Not All Attention is Needed" (He et al. 2024):
                       drop the attention subblocks whose output changes the residual least,
                       1 − E cos(h_i, h_i + attn_i(h_i)) lowest first, at the speed-ups this reaches
    uniform_width      Minitron-style width pruning (Muralidharan et al. 2024): the same FFN width in
                       every layer (channels kept by Puzzle's contribution mean|act(gate)·up|·‖W_down[:, i]‖,
                       puzzle.init, where Minitron ranks by the activation alone: the kept sets overlap by
                       81-94 % on the tiny parent) and the same KV-head count (mean-pooled groups, where
                       Minitron prunes query heads); per KV-head count the widest FFN that meets the budget,
                       the candidate with the lower KL on the scoring split is kept

Fairness (issue 5): a baseline with trainable parts is realized both as initialised ("init") and
after blockwise local distillation with the run's own BLD settings, i.e. the same token budget per
subblock as our library ("bld"). Widths the run's library lacks are trained by `puzzle.bld` on a
restricted space into DIR/baselines/library. Layer and attention removal have nothing to train
("none"). Each row of the result says which.

Files: DIR/baselines/cost.csv (extra FFN widths, measured), DIR/baselines/influence.csv,
DIR/baselines/plan.json, DIR/baselines/held.json (children planned again to reach their target as measured,
`held_speedups`), DIR/baselines/baselines.csv (realized and measured), DIR/export/<name>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from .budgets import Budgets
from .errors import PuzzleError, shell_arg
from .io import atomic_write_json, atomic_write_text, dir_arg, read_json_or_none
from .library import Library
from .space import LayerSpace

METHODS = {"mip": "ours: MIP over the BLD library", "greedy": "greedy from the same library",
           "layer_removal": "layer removal (ShortGPT, block influence)",
           "attention_removal": "attention removal (similarity)", "uniform_width": "uniform width (Minitron-style)"}
NOOP_BLOCK = BlockConfig(AttentionConfig("no_op"), FFNConfig("no_op"))


@dataclass(frozen=True)
class Candidate:
    """One child to realize: how it was made and what it is predicted to cost.

    training: "bld" (library entries after BLD), "init" (initialised only) or "none" (nothing to train).
    stage: the library stage its entries come from ("bld" or "init").
    """

    name: str
    method: str
    training: str
    blocks: tuple[BlockConfig, ...]
    target_speedup: float
    predicted_runtime_ms: float
    predicted_speedup: float
    predicted_kl_nats: float = math.nan
    note: str = ""
    planned_speedup: float | None = None  # the speed-up it was planned for, where not its target (`held_speedups`)

    @property
    def stage(self) -> str:
        return "init" if self.training == "init" else "bld"

    @property
    def plan_speedup(self) -> float:
        return self.target_speedup if self.planned_speedup is None else self.planned_speedup

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"] = [b.id for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(**{**d, "blocks": tuple(BlockConfig.from_id(b) for b in d["blocks"])})


def searched_candidate(run, name: str) -> Candidate:
    """A searched child (DIR/search/<name>.json: a plain MIP choice, or the -diverse / -refined one `puzzle refine`
    wrote) as a Candidate for `realize_all`: method "mip", "mip-diverse" or "mip-refined", training its library
    stage, target speed-up the parent's runtime over its runtime budget (its predicted speed-up without one).

    Raises:
        PuzzleError: no such record, or a malformed one (`pipeline.read_architecture`).
    """
    from .pipeline import read_architecture

    rec = read_architecture(run, name)
    method = rec["method"] if rec.get("method") in ("mip-diverse", "mip-refined") else "mip"
    budget_ms = Budgets.from_dict(rec["budgets"]).max_runtime_ms if rec.get("budgets") else None
    target = float(rec["parent"]["runtime_ms"]) / budget_ms if budget_ms else float(rec["speedup"])
    return Candidate(name, method, rec.get("library_stage", "bld"), tuple(BlockConfig.from_id(b) for b in rec["choice"]),
                     target, float(rec["runtime_ms"]), float(rec["speedup"]), float(rec["kl_nats"]))


# ------------------------------------------------------------------------------------------------
# Block influence (ShortGPT) and attention similarity


@torch.no_grad()
def block_influence(model, ids: torch.Tensor, chunk: int = 4) -> pd.DataFrame:
    """Per layer, how much it changes the residual stream on (N, T) calibration ids.

    Returns:
        DataFrame with layer, layer_bi = 1 − mean cos(h_i, h_{i+1}) (ShortGPT's block influence,
        Men et al. 2024, Eq. 1), attention_bi = 1 − mean cos(h_i, h_i + attn_i) (He et al. 2024) and
        ffn_bi = 1 − mean cos(m_i, m_i + ffn_i(m_i)); means over all N·T tokens. A no_op subblock has 0.
    """
    model.eval()
    sums = torch.zeros(model.config.num_hidden_layers, 3, dtype=torch.float64)
    for s in range(0, ids.shape[0], chunk):
        x = ids[s:s + chunk]
        h = model.model.embed_tokens(x)  # (n, T, C)
        cos, sin = model.rope(model.positions(x.shape, 0, x.device), h.dtype)
        for i, layer in enumerate(model.model.layers):
            mid = h + layer.attention_delta(h, cos, sin)
            out = mid + layer.ffn_delta(mid)
            for k, (a, b) in enumerate([(h, out), (h, mid), (mid, out)]):
                sums[i, k] += float((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum())
            h = out
    sums /= ids.numel()
    return pd.DataFrame({"layer": range(len(sums)), "layer_bi": sums[:, 0].numpy(), "attention_bi": sums[:, 1].numpy(),
                         "ffn_bi": sums[:, 2].numpy()})


def layer_removal(parent: ModelConfig, order, n: int) -> tuple[BlockConfig, ...]:
    """The parent's blocks with the first `n` layers of `order` removed (both subblocks no_op)."""
    drop = set(list(order)[:n])
    return tuple(NOOP_BLOCK if i in drop else b for i, b in enumerate(parent.blocks))


def attention_removal(parent: ModelConfig, order, n: int) -> tuple[BlockConfig, ...]:
    """The parent's blocks with the attention of the first `n` layers of `order` removed."""
    drop = set(list(order)[:n])
    return tuple(BlockConfig(AttentionConfig("no_op"), b.ffn) if i in drop else b for i, b in enumerate(parent.blocks))


def uniform_width_applies(parent: ModelConfig) -> bool:
    """Whether uniform width prunes `parent`: every layer the same GQA + SwiGLU block of the config's top-level KV
    heads and FFN width (not a searched child, nor an exported uniform-width child, whose layers are narrower than
    its top-level sizes)."""
    first = parent.blocks[0]
    return (first.attention.kind == "gqa" and first.ffn.kind == "swiglu" and all(b == first for b in parent.blocks)
            and first.attention.num_kv_heads == parent.num_key_value_heads
            and first.ffn.intermediate_size == parent.intermediate_size)


def uniform_width(parent: ModelConfig, ffn_width: int, kv_heads: int) -> tuple[BlockConfig, ...]:
    """Every layer with the same FFN width and KV-head count."""
    return tuple(BlockConfig(AttentionConfig("gqa", kv_heads), FFNConfig("swiglu", ffn_width)) for _ in parent.blocks)


# ------------------------------------------------------------------------------------------------
# Predicted runtime from a measured cost table


@dataclass(frozen=True)
class CostModel:
    """Predicted whole-model runtime: the non-block runtime plus each subblock's row (scoring/cost.py)."""

    costs: pd.DataFrame  # subblock, variant, runtime_ms, ...
    non_block_runtime_ms: float

    def runtime_ms(self, blocks) -> float:
        """Raises PuzzleError for a variant the table lacks (measure it first)."""
        index = {(r.subblock, r.variant): float(r.runtime_ms) for r in self.costs.itertuples()}
        total = self.non_block_runtime_ms
        for block in blocks:
            for subblock, variant in (("attention", block.attention), ("ffn", block.ffn)):
                if variant.kind == "no_op":
                    continue
                if (subblock, variant.id) not in index:
                    raise PuzzleError(f"no measured cost for {subblock} variant {variant.id}; measure it first")
                total += index[(subblock, variant.id)]
        return total


def fewest_removals(order, make, cost: CostModel, budget_ms: float) -> int | None:
    """The smallest n for which make(order, n) meets the runtime budget (None: not even n = all)."""
    for n in range(len(order) + 1):
        if cost.runtime_ms(make(order, n)) <= budget_ms:
            return n
    return None


#: an extra FFN width timed more than this factor off the score table's SwiGLU widths' line is not taken
EXTRA_WIDTH_OFF = 2.0


def cost_model(run, extra_ffn_widths=(), measure: bool = True) -> CostModel:
    """The costs the MIP used (the run's score table: one row per variant, and the non-block row),
    plus any extra FFN widths.

    An extra width is measured now (measure=True) together with the parent's FFN, and scaled by
    (the table's parent FFN runtime / the parent FFN runtime measured now), so both sessions' rows
    share one scale on a machine whose speed drifts; cached in DIR/baselines/cost.csv. With
    measure=False (a machine too loaded to time anything), its runtime is interpolated linearly in
    the width through the table's SwiGLU rows (extrapolated beyond them), and the row says so; a
    measured width between the table's widths whose runtime is more than `EXTRA_WIDTH_OFF` times off
    that line is taken from the line too, with a warning (a timing disturbed by other work).

    Raises:
        PuzzleError: no score table, or measure=False with fewer than two SwiGLU widths in it.
    """
    import numpy as np

    from .pipeline import load_score_table
    from .scoring.cost import measure_subblock_costs

    table, _ = load_score_table(run, "bld")
    body = table[table["subblock"].isin(["attention", "ffn"])].drop_duplicates(["subblock", "variant"])
    columns = ["subblock", "variant", "prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params"]
    costs = body[columns].assign(source="score table")
    non_block = float(table.loc[table["subblock"] == "non_block", "runtime_ms"].iloc[0])
    have = set(costs["variant"])
    todo = sorted({int(w) for w in extra_ffn_widths if f"ffn-{w}" not in have}, reverse=True)
    path = run.out / "baselines" / "cost.csv"
    old = pd.read_csv(path) if path.is_file() else None
    if old is not None:
        todo = [w for w in todo if f"ffn-{w}" not in set(old["variant"])]
        costs = pd.concat([costs, old[~old["variant"].isin(have)]], ignore_index=True)
    if not todo:
        return CostModel(costs, non_block)
    # new widths are timed next to a width the table has, and scaled by that one's table / measured ratio: the
    # parent's FFN, or (a heterogeneous parent, e.g. a searched child, may have no layer of that width) the widest
    # SwiGLU FFN the table has
    swiglu_ids = costs.loc[costs["subblock"].eq("ffn") & costs["variant"].str.fullmatch(r"ffn-\d+"), "variant"]
    parent_ffn = FFNConfig("swiglu", run.parent.config.intermediate_size)
    if parent_ffn.id not in set(swiglu_ids):
        if swiglu_ids.empty:
            raise PuzzleError(f"the score table has no SwiGLU FFN row to time FFN widths {todo} against (uniform "
                              f"width needs their costs); score a space with at least one FFN width")
        parent_ffn = FFNConfig("swiglu", max(int(v[4:]) for v in swiglu_ids))
    stored = costs[costs["variant"] == parent_ffn.id].iloc[0]
    swiglu = costs[costs["subblock"].eq("ffn") & costs["variant"].str.fullmatch(r"ffn-\d+")]
    widths = swiglu["variant"].str[4:].astype(int).to_numpy()

    def interpolated(w: int, source: str = "interpolated in width from the score table") -> dict:
        row = {"subblock": "ffn", "variant": f"ffn-{w}", "source": source}
        for c in ("prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params"):
            slope, intercept = np.polyfit(widths, swiglu[c].to_numpy(float), 1)
            row[c] = max(0.0, intercept + slope * w)
        return row

    if measure:
        measured = measure_subblock_costs(run.parent.config, [], [parent_ffn] + [FFNConfig("swiglu", w) for w in todo],
                                          run.workload(), repeats=run.config.score.cost_repeats,
                                          max_contention=run.config.score.max_contention)
        now = measured[measured["variant"] == parent_ffn.id].iloc[0]
        new = measured[measured["variant"] != parent_ffn.id].copy()
        for c in ("prefill_ms", "decode_ms", "runtime_ms"):
            new[c] = new[c] * float(stored[c]) / float(now[c])
        new = new.assign(source=f"measured, scaled by the table's {parent_ffn.id}")
        if len(widths) >= 2:  # a width timed off the table's line by more than EXTRA_WIDTH_OFF: a busy machine's
            rows = []
            for row in new.to_dict("records"):
                width = int(row["variant"][4:])
                line = interpolated(width)["runtime_ms"]
                off = row["runtime_ms"] / line if line > 0 else math.nan
                # checked only between the table's widths (runtime is not linear in width beyond them) and on a
                # positive line (reviewer: a clamped 0 ms line replaced a timing with 0 ms)
                if widths.min() <= width <= widths.max() and line > 0 \
                        and not 1 / EXTRA_WIDTH_OFF <= off <= EXTRA_WIDTH_OFF:
                    warnings.warn(f"uniform width: {row['variant']} timed {row['runtime_ms']:.4g} ms, {off:.2f} times "
                                  f"the {line:.4g} ms the score table's SwiGLU widths give it (a timing disturbed by "
                                  f"other work?): its cost is taken from the table's widths instead; `puzzle score "
                                  f"--retime` times the table again, and deleting {path} times the widths again")
                    row = interpolated(int(row["variant"][4:]), f"interpolated in width from the score table (timed "
                                                                f"{row['runtime_ms']:.4g} ms, {off:.2f}x that)")
                rows.append(row)
            new = pd.DataFrame(rows)
    else:
        if len(widths) < 2:
            raise PuzzleError("interpolating FFN costs needs at least two SwiGLU widths in the score table")
        new = pd.DataFrame([interpolated(w) for w in todo])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, pd.concat([old, new], ignore_index=True).to_csv(index=False))
    return CostModel(pd.concat([costs, new], ignore_index=True), non_block)


# ------------------------------------------------------------------------------------------------
# Libraries: the run's, and the baselines' extra widths trained with the same BLD settings


class LibraryChain:
    """Looks an entry up in several libraries in turn (duck-types `Library.load` for `realize_child`)."""

    def __init__(self, *libraries: Library):
        self.libraries = libraries

    def has(self, layer: int, variant: str, stage: str) -> bool:
        return any(lib.has(layer, variant, stage) for lib in self.libraries)

    def load(self, layer: int, variant: str, stage: str) -> dict:
        for lib in self.libraries:
            if lib.has(layer, variant, stage):
                return lib.load(layer, variant, stage)
        return self.libraries[0].load(layer, variant, stage)  # raises the usual PuzzleError

    def info(self, layer: int, variant: str, stage: str) -> dict:
        for lib in self.libraries:
            if lib.has(layer, variant, stage):
                return lib.info(layer, variant, stage)
        return self.libraries[0].info(layer, variant, stage)  # raises the usual PuzzleError


def baseline_library(run, blocks_list, progress: bool = False) -> LibraryChain:
    """The run's library, plus BLD (and init) entries for every variant of `blocks_list` it lacks.

    Missing entries are built by `puzzle.bld.build_library` with the run's BLD settings (the same
    calibration tokens and token budget per subblock) into DIR/baselines/library.
    """
    from .bld import build_library

    parent = run.parent.config
    main, extra = run.library, Library(run.out / "baselines" / "library")
    chain = LibraryChain(main, extra)
    need: dict[int, dict[str, set]] = {}
    for blocks in blocks_list:
        for i, (b, p) in enumerate(zip(blocks, parent.blocks)):
            for kind, v, pv in (("attention", b.attention, p.attention), ("ffn", b.ffn, p.ffn)):
                if v != pv and v.kind != "no_op" and not (chain.has(i, v.id, "bld") and chain.has(i, v.id, "init")):
                    need.setdefault(i, {"attention": set(), "ffn": set()})[kind].add(v)
    if need:
        space = [LayerSpace(i, (p.attention, *sorted(need.get(i, {}).get("attention", ()), key=lambda v: v.id)),
                            (p.ffn, *sorted(need.get(i, {}).get("ffn", ()), key=lambda v: v.id)))
                 for i, p in enumerate(parent.blocks)]
        t0 = time.perf_counter()
        build_library(run.parent.model, run.tokens.calib, space, run.config.bld, extra, progress=progress)
        run.timed("baselines_bld_s", time.perf_counter() - t0)
    return chain


def realize(run, candidate: Candidate, library=None):
    """The candidate as a PuzzleForCausalLM (entries from `library`, default the run's; the coupled entries of the
    block rows it chose, for a child chosen on the score table: `pipeline.coupled_blocks`)."""
    from .pipeline import coupled_blocks
    from .realize import realize_child

    return realize_child(run.parent.model, library or run.library, candidate.blocks, candidate.stage,
                         coupled=coupled_blocks(run, candidate.blocks, candidate.stage, candidate.method))


# ------------------------------------------------------------------------------------------------
# Planning: which child each baseline builds for each speed-up


def plan_baselines(run, speedups, *, uniform_kv_heads=None, uniform_widths=None, attention_speedups=None,
                   influence_tokens: int = 4096, measure_costs: bool = True, planned=None,
                   say=None) -> list[Candidate]:
    """Every baseline child for each speed-up target (runtime ≤ parent / s), before realizing.

    Args:
        speedups: targets, e.g. (1.25, 1.5, 2.0).
        uniform_kv_heads: KV-head counts for uniform width (default: the parent's and the space's).
        uniform_widths: FFN widths to consider (default: multiples of space.ffn_multiple below the parent's).
        attention_speedups: targets for attention removal (default: `speedups`; a target it cannot
            reach is replaced by the largest speed-up it reaches, once).
        influence_tokens: calibration tokens for block influence.
        measure_costs: measure FFN widths the score table lacks (else interpolate; see `cost_model`).
        planned: {name: speed-up} to plan a greedy, layer-removal or uniform-width child for instead of its target
            (`held_speedups`; a uniform one by its name without '-kvN'); where that is out of the method's reach, its
            target is planned for.
        say: callable(message) for the notes and warnings (default run.say; `run_baselines` says each once).

    Returns:
        Candidates: greedy (bld, init), layer_removal, attention_removal, uniform_width (one per KV
        count; `select_uniform` keeps the better), each named '<method>-<s>x[-init][-kvN]'.
    """
    from .pipeline import load_score_table
    from .space import attention_variants

    say = say or run.say
    parent = run.parent.config
    calib = run.tokens.calib
    n = max(1, min(calib.shape[0], influence_tokens // calib.shape[1]))
    influence = block_influence(run.parent.model, calib[:n], chunk=run.config.score.chunk)
    (run.out / "baselines").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / "baselines" / "influence.csv", influence.to_csv(index=False))
    layer_order = influence.sort_values("layer_bi", kind="stable")["layer"].tolist()
    attn_order = influence.sort_values("attention_bi", kind="stable")["layer"].tolist()

    step = run.config.space.ffn_multiple
    widths = sorted(uniform_widths or range(step, parent.intermediate_size, step), reverse=True)
    kv_heads = uniform_kv_heads or sorted({a.num_kv_heads for a in attention_variants(parent, run.config.space)
                                           if a.kind == "gqa"}, reverse=True)
    if not uniform_width_applies(parent):
        say("baselines: uniform width is left out: the parent's layers differ (a searched child?), so one FFN "
            "width and KV-head count in every layer is not a pruning of it")
        widths, kv_heads = [], []
    cost = cost_model(run, widths, measure=measure_costs)
    parent_ms = cost.runtime_ms(parent.blocks)
    out: list[Candidate] = []
    planned = dict(planned or {})

    def add(name, method, training, blocks, s, note="", kl=math.nan, aim=None):
        ms = cost.runtime_ms(blocks)
        held = None if aim is None or aim == s else float(aim)
        if held is not None:
            note += f"; planned for {held:.4g}x to be held to its target as measured"
        out.append(Candidate(name, method, training, tuple(blocks), float(s), ms, parent_ms / ms, kl, note, held))

    def first_reached(name, s, make):
        """(make(speed-up), speed-up) for the speed-up `planned` names, else the target; (None, s) where neither
        is reached (make returns None or raises PuzzleError)."""
        for aim in dict.fromkeys((planned.get(name, s), s)):
            try:
                got = make(aim)
            except PuzzleError:  # a budget greedy cannot reach
                got = None
            if got is not None:
                return got, aim
        return None, s

    tables = {}  # each stage's table read (and checked) once, not once per speed-up
    for stage in ("bld", "init"):
        try:
            tables[stage] = load_score_table(run, stage)[0]
        except PuzzleError:  # no init-only table in this run
            pass
    for s in speedups:
        for stage, table in tables.items():
            name = f"greedy-{s:g}x" + ("-init" if stage == "init" else "")
            g, aim = first_reached(name, s, lambda a: _greedy_at(run, table, a))
            if g is None:
                continue
            if all(b.removed for b in g.blocks):
                say(f"baselines: warning: greedy ({stage}) reaches {s:g}x only by removing every layer")
            add(name, "greedy", stage, g.blocks, s, "score table of the run's library", g.kl_nats, aim)
        k, aim = first_reached(f"layers-{s:g}x", s, lambda a: fewest_removals(
            layer_order, lambda o, m: layer_removal(parent, o, m), cost, parent_ms / a))
        if k is not None and k == len(layer_order):
            say(f"baselines: warning: layer removal reaches {s:g}x only by removing all {k} layers (embedding and "
                f"LM head left); its layers-{s:g}x row is such a model")
        if k is not None:
            add(f"layers-{s:g}x", "layer_removal", "none", layer_removal(parent, layer_order, k), s,
                f"{k} layers removed: {sorted(layer_order[:k])}", aim=aim)
        for kv in kv_heads:
            for stage in ("bld", "init"):
                name = f"uniform-{s:g}x" + ("-init" if stage == "init" else "")
                w, aim = first_reached(name, s, lambda a: max(
                    (w for w in widths + [parent.intermediate_size]
                     if cost.runtime_ms(uniform_width(parent, w, kv)) <= parent_ms / a), default=None))
                if w is not None:
                    add(f"{name}-kv{kv}", "uniform_width", stage, uniform_width(parent, w, kv), s,
                        f"FFN {w}, {kv} KV heads in every layer", aim=aim)
    reachable = parent_ms / cost.runtime_ms(attention_removal(parent, attn_order, len(attn_order)))
    targets = attention_speedups or speedups
    # one model per architecture (breaker: `--speedups 50` after 2x built the 2x model again as attn-drop-2.45x):
    # this call's, and the current rows an earlier call left (which `_with_earlier_rows` keeps)
    from .pipeline import compact_architecture

    built, inputs = {}, row_inputs(run)  # compact architecture -> name
    for path in sorted((run.out / "baselines" / "rows").glob("attn-drop-*.json")):
        if (row := _saved_row(path, inputs)) is not None and row.get("method") == "attention_removal":
            built.setdefault(row.get("architecture"), row.get("name"))
    for s in targets:
        s_eff = min(s, math.floor(reachable * 100) / 100)
        if s_eff <= 1.0:
            continue
        k = fewest_removals(attn_order, lambda o, m: attention_removal(parent, o, m), cost, parent_ms / s_eff)
        if k is None:
            continue
        name, blocks = f"attn-drop-{s_eff:g}x", attention_removal(parent, attn_order, k)
        same = built.setdefault(compact_architecture([b.id for b in blocks]), name)
        if same != name:
            if s_eff < s:  # said of a target out of reach only: another within reach needing the same model is plain
                say(f"baselines: attention removal reaches at most {s_eff:g}x here, with the model of {same}")
            else:  # an auditor: attn-drop-1.5x was missing from the table without a word
                say(f"baselines: attention removal at {s:g}x removes the same {k} attention subblocks as {same}, "
                    f"which stands for this target too")
            continue
        if all(c.name != name for c in out):
            add(name, "attention_removal", "none", blocks, s_eff, f"attention removed in {k} layers: "
                f"{sorted(attn_order[:k])}")
    atomic_write_json(run.out / "baselines" / "plan.json", [c.to_dict() for c in out])
    return out


def out_of_reach_lines(body: pd.DataFrame, speedups) -> list[str]:
    """`puzzle baselines`' lines on the methods without a model at a target speed-up, from its table `body` (name,
    method, target_speedup, measured speedup; the parent left out). Attention removal, built at the most it reaches
    where a target is beyond it (`plan_baselines`), is named by its fastest model."""
    lines = []
    for s in speedups:
        missing = sorted(set(METHODS) - {"mip"} - set(body.loc[(body["target_speedup"] - s).abs() < 1e-9, "method"]))
        every = body[body["method"] == "attention_removal"]
        capped = every[every["target_speedup"] < s - 1e-9]
        if "attention_removal" in missing and len(capped):
            missing.remove("attention_removal")
            # the fastest as measured, of every target's models (breaker: "at most 1.5x", its target, after plan's
            # "at most 1.77x"; a later one: attn-drop-1.05x, measured 1.48x, was called out of reach at 1.1x, with a
            # faster model beside it, where one architecture served two targets)
            measured = pd.to_numeric(every["speedup"], errors="coerce")
            if not (measured >= s - 1e-9).any():  # a model that reaches s is no model out of reach
                fastest = every.loc[measured.idxmax() if measured.notna().any() else every["target_speedup"].idxmax()]
                speed = (f"measured {measured[fastest.name]:.3g}x" if math.isfinite(measured[fastest.name])
                         else "not measured")
                lines.append(f"at {s:g}x attention removal is out of reach on this run: its fastest model is "
                             f"{fastest['name']} ({speed})")
        if missing:
            lines.append(f"at {s:g}x no model from {', '.join(missing)}: the method cannot reach that speed-up on "
                         f"this run")
    return lines


def select_uniform(run, candidates: list[Candidate], library, scored: dict | None = None) -> list[Candidate]:
    """Per (speed-up, training), the uniform-width candidate with the lowest KL on the scoring split.

    The other candidates pass through unchanged; the kept one loses its '-kvN' name suffix. `scored`: a dict kept
    across calls on the same library ({(blocks, training): KL}), so that a candidate planned again the same is not
    built and scored twice (`run_baselines`' second attempt).
    """
    from .refine import selection_kl

    scored = {} if scored is None else scored

    def kl(c: Candidate) -> float:
        key = (c.blocks, c.training)
        if key not in scored:
            scored[key] = selection_kl(run, realize(run, c, library))
        return scored[key]

    groups: dict[tuple, list[Candidate]] = {}
    rest = []
    for c in candidates:
        if c.method == "uniform_width":
            groups.setdefault((c.target_speedup, c.training), []).append(c)
        else:
            rest.append(c)
    for group in groups.values():
        ranked = [(kl(c), c) for c in group]
        _, best = min(ranked, key=lambda t: t[0])
        name = best.name.rsplit("-kv", 1)[0]
        note = best.note + "; chosen on the scoring split among " + ", ".join(
            f"{c.note.split(' in ')[0]} (KL {k:.3f})" for k, c in ranked)
        rest.append(dataclasses.replace(best, name=name, note=note))
    return rest


# ------------------------------------------------------------------------------------------------
# Realize, evaluate, measure next to the parent, export


def measure_against_parent(run, models: dict, group_size: int = 4, repeats: int = 3) -> pd.DataFrame:
    """Whole-model measurements, in groups of `group_size` models each interleaved with the parent.

    Speed-ups are per group (child runtime vs the parent's runtime in the same group), so a machine
    whose load changes between groups still gives fair ratios; groups bound the memory held at once.

    Returns:
        One row per model (parent first, its figures from the first group): name, speedup (the parent's
        runtime_ms in the row's group over the row's), throughput_tok_s (the parent's throughput from the
        first group × speedup), runtime_ms, parent_runtime_ms (the parent's runtime_ms in the row's group),
        prefill_tok_s, decode_tok_s, memory_mib, params, group, contention_cores (the most cores other
        jobs kept busy while its group was timed; None when not judged).
    """
    from .scoring.cost import measure_models

    names = list(models)
    rows, parent_tok_s = [], None
    for g, start in enumerate(range(0, max(len(names), 1), group_size)):
        group = run.on_target({"parent": run.parent.model, **{n: models[n] for n in names[start:start + group_size]}})
        df = measure_models(group, run.workload(), repeats=repeats,
                            max_contention=run.config.score.max_contention)
        session = session_rows(df.set_index("name"), names[start:start + group_size], g, parent_tok_s)
        if parent_tok_s is None:
            parent_tok_s = float(session["throughput_tok_s"].iloc[0])
            rows.append(session.iloc[:1])
        rows.append(session.iloc[1:])
    return pd.concat(rows, ignore_index=True)


def session_rows(measured: pd.DataFrame, names, group: int = 0, parent_tok_s: float | None = None) -> pd.DataFrame:
    """`measure_against_parent`'s rows (parent first) for models `names` of one `scoring.cost.measure_models` session
    (`measured`, indexed by name, with a "parent" row; its attrs carry the session's contention).

    parent_tok_s: the throughput that speed-ups scale (default: the parent's in this session)."""
    from .pipeline import recorded_contention

    keep = ("runtime_ms", "prefill_tok_s", "decode_tok_s", "memory_mib", "params")
    busy = recorded_contention(measured.attrs)  # the session's: what other jobs took while it was timed
    p = measured.loc["parent"]
    parent_tok_s = float(p["throughput_tok_s"]) if parent_tok_s is None else parent_tok_s
    rows = [{"name": "parent", "speedup": 1.0, "throughput_tok_s": float(p["throughput_tok_s"]), "group": group,
             "contention_cores": busy, "parent_runtime_ms": float(p["runtime_ms"]), **{c: float(p[c]) for c in keep}}]
    for n in names:
        r = measured.loc[n]
        speedup = float(p["runtime_ms"] / r["runtime_ms"])
        rows.append({"name": n, "speedup": speedup, "throughput_tok_s": parent_tok_s * speedup, "group": group,
                     "contention_cores": busy, "parent_runtime_ms": float(p["runtime_ms"]),
                     **{c: float(r[c]) for c in keep}})
    return pd.DataFrame(rows)


ROW_COLUMNS = ["name", "method", "training", "target_speedup", "planned_speedup", "predicted_speedup", "speedup",
               "throughput_tok_s", "kl_nats", "score_kl_nats", "predicted_kl_nats", "lm_loss", "top1_agree", "params",
               "memory_mib", "runtime_ms", "parent_runtime_ms", "note", "architecture"]
# filled in from the saved rows (`_with_derived`); planned_speedup too, which the parent's row and rows saved before it
# was a column lack (a README checker: the README named the row's planned_speedup, which baselines.csv had not)
DERIVED_COLUMNS = ("throughput_tok_s", "parent_runtime_ms", "planned_speedup")


def _with_derived(table: pd.DataFrame, parent_tok_s: float) -> pd.DataFrame:
    """`table` with DERIVED_COLUMNS filled in: parent_runtime_ms, the parent's runtime in the row's own timing
    group as measured (a saved row's `group_parent_runtime_ms` or a table's parent_runtime_ms; the parent row's
    own runtime; runtime_ms x speedup only for a row without either), so that speedup = parent_runtime_ms /
    runtime_ms can be checked (groups are timed apart, so a row's runtime_ms is comparable only with its own
    group's parent); throughput_tok_s, `parent_tok_s` (the parent's throughput in the first group) x
    speedup, which puts every row on the first group's scale; and planned_speedup, a saved row's (its target where
    the row has none; empty for the parent)."""
    derived = table["runtime_ms"] * table["speedup"]
    measured = pd.Series(math.nan, index=table.index)
    for column in ("group_parent_runtime_ms", "parent_runtime_ms"):  # a saved row's; a table's filled in before
        if column in table:
            measured = measured.fillna(table[column])
    measured = measured.where(table["name"] != "parent", table["runtime_ms"])
    planned = pd.to_numeric(table["planned_speedup"], errors="coerce") if "planned_speedup" in table else math.nan
    return table.assign(parent_runtime_ms=measured.fillna(derived).astype(float),
                        throughput_tok_s=parent_tok_s * table["speedup"],
                        # the speed-up the child was planned for: its target, or the target made up for a table
                        # error once it measured short (`held_speedups`); the parent's row has none
                        planned_speedup=pd.Series(planned, index=table.index).fillna(table["target_speedup"])
                        .where(table["name"] != "parent"))


def row_inputs(run) -> dict:
    """What a model row's figures (DIR/baselines/rows/, DIR/front_rows/) depend on besides its architecture, as the
    run is now: the workload it is timed for (`pipeline.cost_meta` and the thread count), the score table (a
    rebuilt library rescored gives new weights and a new table) by sha256, and the evaluation split (its sha256
    prefix). `realize_all` records it in each row and redoes rows that differ; `plots.front_rows` leaves them out."""
    from .io import sha256_file
    from .pipeline import _tensor_sha, cost_meta

    table_path = run.out / "score" / "score_table.csv"
    return {"workload": {**cost_meta(run), "threads": run.config.target.threads},
            "score_table_sha256": sha256_file(table_path) if table_path.is_file() else None,
            "eval_sha": _tensor_sha(run.tokens.eval)}


def sealed_row(row: dict) -> dict:
    """`row` (a model row of DIR/baselines/rows/ or DIR/front_rows/) with `row_sha256`: the sha256 of its other
    fields as JSON (sorted keys, of the values as the file stores them), which a row edited by hand no longer matches
    (`row_edited`; breaker: a kl_nats set by hand was drawn and its ratio printed, and `puzzle baselines` kept it)."""
    clean = json.loads(json.dumps({k: v for k, v in row.items() if k != "row_sha256"}, default=str))
    return {**clean, "row_sha256": _row_sha256(clean)}


def _row_sha256(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()


def row_edited(row: dict) -> bool:
    """Whether `row` carries a `row_sha256` (`sealed_row`) that its fields no longer match: edited since it was
    written. A row without one (written before rows were sealed) is taken as it is."""
    seal = row.get("row_sha256")
    return seal is not None and seal != _row_sha256({k: v for k, v in row.items() if k != "row_sha256"})


def _saved_row(path: Path, inputs: dict) -> dict | None:
    """The model row in `path` (DIR/baselines/rows/, DIR/front_rows/) when it is whole (its figures are numbers) and
    was made for `inputs` (`row_inputs`: the run's workload, score table and evaluation split); else None (a
    missing, unreadable, hand-edited or stale row, which `realize_all` redoes)."""
    row = read_json_or_none(path)
    numbers = ("speedup", "kl_nats", "lm_loss", "params", "runtime_ms") + (
        ("throughput_tok_s",) if path.name == "parent.json" else ())
    whole = isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                                          for k in numbers)
    return row if whole and row.get("inputs") == inputs and not row_edited(row) else None


def realize_all(run, candidates: list[Candidate], library=None, export: bool = True, group_size: int = 4,
                rows_dir: Path | None = None, max_groups: int | None = None,
                measured: pd.DataFrame | None = None, what: str = "baselines") -> pd.DataFrame:
    """Realize, evaluate (evaluation split), score (scoring split), measure and export every candidate.

    Models are built group by group (memory), evaluated with `pipeline.evaluate` (cached in
    DIR/children/) and measured next to the parent (`measure_against_parent`; candidates of one group with
    the same architecture and training are timed once and share the figures). Each finished row is
    written to `rows_dir` (default DIR/baselines/rows/<name>.json) and reused on a rerun, so a long
    sweep can be run `max_groups` groups at a time; a row whose architecture or library stage is not
    the candidate's, or that was made for another workload or score table, is redone (and with it the parent's row
    when that is stale); one that lacks the export asked for is realized again and exported, not redone.

    measured: a `scoring.cost.measure_models` session (indexed by name, with the parent) that already timed some
    candidates under their names (`refine.settle_steps`' last one, which checked them against their budget): their
    rows take its figures instead of a new timing, and are redone even where a saved row stands, so that a row and
    its budget check come from one session. `what`: the command named in its messages and progress bar.
    A saved row timed while other jobs kept more cores busy than the run's score.max_contention allows is redone
    (the parent's too, which redoes every row).

    Returns:
        One row per finished model (ROW_COLUMNS), parent first. Each child is timed against the parent in its
        own group: speedup = parent_runtime_ms / runtime_ms, with parent_runtime_ms that group's parent;
        throughput_tok_s is the parent's throughput in the first group times the speed-up (`_with_derived`).
    """
    from .io import read_json
    from .pipeline import compact_architecture, contention_cores, evaluate
    from .refine import selection_kl

    rows_dir = Path(rows_dir or run.out / "baselines" / "rows")
    rows_dir.mkdir(parents=True, exist_ok=True)
    inputs = row_inputs(run)
    saved = lambda path: _saved_row(path, inputs)  # noqa: E731

    def busy(row: dict) -> bool:  # a breaker: a stricter --max-contention kept rows timed beside 1.03 busy cores,
        cores = contention_cores(row.get("contention_cores"))  # and then told to rerun with that very flag
        return cores is not None and cores > run.config.score.max_contention

    def finished(c: Candidate, written: bool = False) -> dict | None:
        """The candidate's saved row, when there is one for its architecture, library stage and the
        run's workload and score table, timed within the run's max_contention (or `written` by this call)."""
        row = saved(rows_dir / f"{c.name}.json")
        same = row is not None and (row.get("architecture") == compact_architecture([b.id for b in c.blocks])
                                    and row.get("training") == c.training)
        return row if same and (written or not busy(row)) else None

    stale = []
    for path in rows_dir.glob("*.json"):  # rows for another workload or score table would be drawn by `puzzle front`
        if path.is_file() and saved(path) is None:  # (a breaker: a folder of that name ended in a traceback)
            if isinstance(row := read_json_or_none(path), dict) and row_edited(row):
                warnings.warn(f"{path} was edited since it was written (its figures no longer match its checksum): "
                              f"removed; the command that built it (`puzzle baselines`, `refine` or `fuse`) measures "
                              f"it again")
            else:
                stale.append(path.stem)
            path.unlink()
    if stale:  # a breaker: rows of another workload were deleted and rebuilt without a word
        run.say(f"{what}: {len(stale)} saved row{'s' * (len(stale) > 1)} damaged or made for another workload, score "
                f"table or evaluation split ({', '.join(sorted(stale)[:6])}{', ...' if len(stale) > 6 else ''}) "
                f"removed; the models this call plans are evaluated and timed again")
    if isinstance(parent := saved(rows_dir / "parent.json"), dict) and busy(parent):  # the rows' throughput scale
        (rows_dir / "parent.json").unlink()  # (a reviewer: redone children beside a parent row timed busy)
    given = set() if measured is None else set(measured.index) - {"parent"}
    todo = [c for c in candidates if c.name in given or finished(c) is None]
    if not (rows_dir / "parent.json").is_file() and not todo:
        todo = list(candidates)
    # an earlier --no-export call's rows: realized again to export, not evaluated or timed again (a breaker: each
    # was, 62 s against 5 s on the tiny run, without a word)
    redo = {c.name for c in todo}
    unexported = [c for c in candidates if export and c.name not in redo
                  and not (run.out / "export" / c.name / "config.json").is_file()]
    for c in unexported:
        _export(run, c, realize(run, c, library))
    if unexported:
        run.say(f"{what}: exported {', '.join(c.name for c in unexported)} (evaluated and timed by an earlier call, "
                f"kept)")
    groups = [todo[i:i + group_size] for i in range(0, len(todo), group_size)][:max_groups]
    written: set[str] = set()  # the rows this call writes
    bar = None
    if run.progress and groups:  # a fresh user (stop 79): minutes without a line, no sign of life
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, groups)), desc=f"{what} (realize, evaluate, time)", unit="model")
    for k, group in enumerate(groups, 1):
        models = {c.name: realize(run, c, library) for c in group}
        quality = {}
        for c in group:
            if bar is not None:
                bar.set_postfix_str(f"{c.name}: evaluate" + (", export" if export else ""), refresh=False)
            q = evaluate(run, models[c.name], c.name)
            quality[c.name] = {"kl_nats": q["kl_nats"], "lm_loss": q["lm_loss"],
                               "top1_agree": q.get("top1_agree", math.nan),
                               "score_kl_nats": selection_kl(run, models[c.name])}
            if export:
                _export(run, c, models[c.name])
        if bar is not None:
            bar.set_postfix_str(f"timing group {k} of {len(groups)} beside the parent", refresh=False)  # the bar
            # keeps its interval (TQDM_MININTERVAL; a breaker: 20 lines in 21 s where stderr was a file)
        # one timing per architecture: two names for one child (a refinement that kept the diverse pick), or one
        # architecture at two library stages (the runtime does not depend on the weights), are timed once, not
        # twice with two noise draws (as `one_session.time_front_together`)
        same = {}
        timed = {c.name: same.setdefault(compact_architecture([b.id for b in c.blocks]), c.name) for c in group}
        unique = {n: models[n] for n in dict.fromkeys(timed.values())}
        fresh = {n: m for n, m in unique.items() if n not in given}
        sessions = [measure_against_parent(run, fresh, group_size=len(fresh))] if fresh else []
        if len(fresh) < len(unique):  # the given session's rows (the parent's from the first session here)
            sessions.append(session_rows(measured, [n for n in unique if n in given]))
        timing = pd.concat(sessions, ignore_index=True).drop_duplicates("name").set_index("name")
        if not (rows_dir / "parent.json").is_file():
            atomic_write_json(rows_dir / "parent.json", sealed_row(parent_row(run, timing.loc["parent"], inputs)))
        for c in group:
            m = timing.loc[timed[c.name]]
            atomic_write_json(rows_dir / f"{c.name}.json", sealed_row({
                "name": c.name, "method": c.method, "training": c.training, "target_speedup": c.target_speedup,
                "planned_speedup": c.plan_speedup, "predicted_speedup": c.predicted_speedup,
                "speedup": float(m["speedup"]), **quality[c.name],
                "predicted_kl_nats": c.predicted_kl_nats, "params": float(m["params"]),
                "memory_mib": float(m["memory_mib"]), "runtime_ms": float(m["runtime_ms"]), "note": c.note,
                "group_parent_runtime_ms": float(m["parent_runtime_ms"]),
                "contention_cores": contention_cores(m.get("contention_cores")),
                "architecture": compact_architecture([b.id for b in c.blocks]), "inputs": inputs}))
        written.update(c.name for c in group)
        if bar is not None:
            bar.update(len(group))
        del models
    if bar is not None:
        bar.close()
    if not (rows_dir / "parent.json").is_file():
        return pd.DataFrame(columns=ROW_COLUMNS)
    parent = read_json(rows_dir / "parent.json")
    # the rows this call wrote whatever their timing's contention (the run's limit accepted it; a reviewer)
    rows = [parent] + [row for c in candidates if (row := finished(c, c.name in written)) is not None]
    table = _with_derived(pd.DataFrame(rows), float(parent["throughput_tok_s"]))[ROW_COLUMNS]
    table.attrs["kept"] = len(candidates) - len(todo)  # rows of an earlier call, neither evaluated nor timed again
    return table


def parent_row(run, timing: pd.Series, inputs: dict) -> dict:
    """The parent's model row (DIR/baselines/rows/parent.json, DIR/front_rows/parent.json): its figures from
    `timing` (the parent's row of `session_rows`: throughput_tok_s, runtime_ms, params, memory_mib, contention_cores),
    its evaluation-split LM loss (`pipeline.evaluate`, cached) and `inputs` (`row_inputs`)."""
    from .pipeline import contention_cores, evaluate

    return {"name": "parent", "method": "parent", "training": "none", "target_speedup": 1.0, "predicted_speedup": 1.0,
            "speedup": 1.0, "throughput_tok_s": float(timing["throughput_tok_s"]), "kl_nats": 0.0,
            "score_kl_nats": 0.0, "predicted_kl_nats": 0.0,
            "lm_loss": evaluate(run, run.parent.model, "parent")["lm_loss"], "top1_agree": 1.0,
            "params": float(timing["params"]), "memory_mib": float(timing["memory_mib"]),
            "runtime_ms": float(timing["runtime_ms"]), "note": "",
            "contention_cores": contention_cores(timing.get("contention_cores")), "architecture": "parent",
            "inputs": inputs}


def _export(run, candidate: Candidate, model) -> None:
    from .export import export_checkpoint

    result = export_checkpoint(model, run.parent.tokenizer, run.out / "export" / candidate.name, overwrite=True,
                               extra_info={"name": candidate.name, "parent": run.parent.source,
                                           "baseline": candidate.method, "training": candidate.training,
                                           "note": candidate.note, "predicted_speedup": candidate.predicted_speedup})
    run.say_export_warnings(candidate.name, result.warnings)  # breaker: they were said only in its README.md


def run_baselines(run, speedups=None, export: bool = True, progress: bool = False) -> pd.DataFrame:
    """Plan, train what the plan needs, choose the uniform widths, realize, evaluate, measure, export.

    Writes DIR/baselines/baselines.csv and returns it (parent first), with the still-current rows an earlier call
    made for other speed-ups (`_with_earlier_rows`).
    """
    given = bool(speedups)
    if not speedups:  # the front's targets at or below 1x have the parent as their child: no baseline to build there
        front = tuple(dict.fromkeys(run.config.search.front_speedups))
        speedups = tuple(s for s in front if s > 1)
        if len(speedups) < len(front):  # breaker: `front --front-speedups 1.0` left a run baselines refused
            run.say(f"baselines: the front's targets {', '.join(f'{s:g}x' for s in front if s <= 1)} are left out "
                    f"(the parent is at 1x; --speedups sets the targets)")
    speedups = tuple(dict.fromkeys(speedups))  # each target once, in order
    if not speedups or not all(1 < s < math.inf for s in speedups):
        raise PuzzleError(f"baseline speed-ups must be above 1 and finite (1 is the parent), got {list(speedups)}; set "
                          f"--speedups or the run's front speed-ups")
    from .config import same_child_name

    # a breaker: 1.25 and 1.250001 named two models greedy-1.25x each (a traceback), 1.0000001 named greedy-1x
    where = "--speedups" if given else "the run's front speed-ups (--speedups sets others)"
    if ones := [s for s in speedups if f"{s:g}" == "1"]:
        raise PuzzleError(f"{where}: {ones[0]!r} is 1x in the 6 significant digits models are named with, the "
                          f"parent's speed; give a target clearly above 1, e.g. 1.05")
    if clash := same_child_name(speedups, prefix="greedy"):
        raise PuzzleError(f"{where}: {clash}")
    t0 = time.perf_counter()
    held = held_speedups(run)
    said: set = set()

    def say_once(message: str) -> None:  # the second plan's repeats of the first's left out (breaker: said twice)
        if message not in said:
            said.add(message)
            run.say(message)

    plan = plan_baselines(run, speedups, planned=held, say=say_once)
    if export:  # a folder that cannot be replaced fails now, not after hours of realizing
        from .export import check_export_target

        for c in plan:
            check_export_target(run.out / "export" / c.name, overwrite=True)
    scored: dict = {}  # uniform-width candidates' scoring-split KL, for the second attempt's unchanged ones
    for attempt in range(2):  # the second: the children measured short of their target, planned again once
        library = baseline_library(run, [c.blocks for c in plan], progress=progress)
        plan = select_uniform(run, plan, library, scored)
        # with the rows an earlier call left for other targets: this call's alone planned again a child whose
        # method reached the target at another target (breaker)
        realized = realize_all(run, plan, library, export=export)
        table = _with_earlier_rows(run, realized)
        short = _short_of_target(table, plan, held)
        if not attempt and (kept := realized.attrs.get("kept", 0)):  # breaker: a rerun said nothing of what it kept
            run.say(f"baselines: {kept} of {len(plan)} models kept from an earlier call (evaluated and timed then)"
                    + ("" if kept < len(plan) or short else "; nothing evaluated or timed again"))  # (nor planned
            # again below: breaker, it said so, then timed a child planned again)
        if attempt or not short:
            break
        for name, (measured, target, predicted) in short.items():
            held[name] = predicted * target / measured  # the cost table's error on this child, made up for
            run.say(f"baselines: {name} measured {measured:.3f}x, short of its {target:g}x target: planned again for "
                    f"{held[name]:.3f}x by the cost table (once), as our children are held to their budgets")
        atomic_write_json(run.out / "baselines" / HELD_FILE, {"inputs": row_inputs(run), "planned": held})
        plan = plan_baselines(run, speedups, planned=held, say=say_once)
    atomic_write_text(run.out / "baselines" / "baselines.csv", table.to_csv(index=False))
    if not export:
        _say_earlier_exports(run, plan)
    run.timed("baselines_s", time.perf_counter() - t0)
    return table


def _say_earlier_exports(run, plan: list[Candidate]) -> None:
    """Say each export folder of a planned baseline that holds another architecture or training than this call's
    child, which --no-export leaves in place (breaker: export/greedy-1.25x held an earlier search's greedy child,
    unsaid). A library trained again since, under the same architecture and training, is not told apart."""
    from .configuration_decilm import config_dict_from_model_config

    for c in plan:
        path = run.out / "export" / c.name / "config.json"
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            held = config.get("block_configs"), (config.get("puzzle") or {}).get("training")
        except (OSError, ValueError, AttributeError):
            held = None
        now = config_dict_from_model_config(dataclasses.replace(run.parent.model.config, blocks=tuple(c.blocks)))
        if held != (json.loads(json.dumps(now["block_configs"])), c.training):
            run.say(f"baselines: {path.parent} holds another {c.name} than this call's (an earlier call's), left in "
                    f"place by --no-export: `puzzle baselines --out {shell_arg(run.out)}` without it writes it again")


HELD_FILE = "held.json"
HELD_METHODS = ("greedy", "layer_removal", "uniform_width")


def held_speedups(run) -> dict[str, float]:
    """{baseline name: speed-up to plan it for} from DIR/baselines/held.json, where it was written for the run's
    workload, score table and evaluation split as they are now (`row_inputs`); else {}.

    A greedy, layer-removal or uniform-width child that measures short of its target speed-up, where no child of
    its method and training reaches that target (`_short_of_target`), is planned again once, for a predicted
    speed-up of its predicted x target / measured (the cost table's error on that child made up for, as
    `feedback.corrected_budgets` does for ours; `run_baselines`), so that it reaches its target as our children,
    held to their budgets by the feedback, do: a front that stops short of a target has no figure there.
    """
    from .io import read_json

    path = run.out / "baselines" / HELD_FILE
    try:
        saved = read_json(path) if path.is_file() else None
    except PuzzleError:
        return {}
    if not isinstance(saved, dict) or saved.get("inputs") != row_inputs(run) or not isinstance(saved.get("planned"),
                                                                                                dict):
        return {}
    return {str(k): float(v) for k, v in saved["planned"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 1.0 < v < math.inf}


def _short_of_target(table: pd.DataFrame, plan: list[Candidate], held: dict) -> dict[str, tuple]:
    """{name: (measured speed-up, target, predicted speed-up)} of the plan's greedy, layer-removal and uniform-width
    children that measured short of their target where no child of the same method and training in `table` reached
    it (so that method's front stops short of the target), and were not planned again already (`held`). `table`
    holds this call's rows and an earlier call's for other targets (`_with_earlier_rows`).

    A child short of its target below a faster one of its front is left: the front's figure at the target lies
    on the line between them, near the short child (on the demo, planning a layer-removal child measured at 1.247x
    again for 1.25x removed one more layer: 1.385x, and the front's figure at 1.25x rested on that far point)."""
    rows = table.set_index("name")
    speed = pd.to_numeric(table["speedup"], errors="coerce")  # every row: an earlier call's for another target too
    reached = speed.groupby([table["method"], table["training"]]).max().to_dict()  # breaker: `--speedups 1.25`
    return {c.name: (float(rows.loc[c.name, "speedup"]), c.target_speedup, c.predicted_speedup) for c in plan
            if c.method in HELD_METHODS and c.name not in held and c.name in rows.index
            and not reached.get((c.method, c.training), 0.0) >= c.target_speedup
            # breaker: every layer removed, "planned again" for more
            and not (c.blocks and all(b == NOOP_BLOCK for b in c.blocks))}


def _with_earlier_rows(run, table: pd.DataFrame) -> pd.DataFrame:
    """`table` (this call's rows, parent first) and the baseline rows an earlier call left in DIR/baselines/rows/
    for other speed-ups, still current for the run's workload, score table and evaluation split (`realize_all`
    deleted the others), so that `--speedups 2` after `--speedups 1.25,1.5` keeps the earlier rows in
    baselines.csv. Our own children's rows there (`puzzle refine`: methods mip-*) stay out, and so does a greedy
    row whose architecture is not what greedy picks now for its target (`_greedy_at`: the search's objective or
    --vllm-compatible changed since); rows are ordered by target speed-up, then as the plan lists the methods.
    """
    if not len(table) or table["name"].iloc[0] != "parent":
        return table
    inputs, names, earlier, tables = row_inputs(run), set(table["name"]), [], {}
    for path in sorted((run.out / "baselines" / "rows").glob("*.json")):
        row = _saved_row(path, inputs)
        if (row is not None and row.get("name") not in names and row.get("method") in set(METHODS) - {"mip"}
                and all(c in row for c in ROW_COLUMNS if c not in DERIVED_COLUMNS)
                and (row["method"] != "greedy" or _greedy_still_picks(run, row, tables))):
            earlier.append(row)
    if not earlier:
        return table
    body = _with_derived(pd.concat([table.iloc[1:], pd.DataFrame(earlier)], ignore_index=True),
                         float(table["throughput_tok_s"].iloc[0]))
    order = {m: i for i, m in enumerate(METHODS)}
    body = body.assign(_m=body["method"].map(order), _init=body["training"] == "init")
    body = body.sort_values(["target_speedup", "_m", "_init"], kind="stable")
    return pd.concat([table.iloc[:1], body[ROW_COLUMNS]], ignore_index=True)


def _greedy_still_picks(run, row: dict, tables: dict) -> bool:
    """Whether greedy, with the run's objective, vLLM setting and exclusions now (`_greedy_at`), picks the saved greedy `row`'s
    architecture for the speed-up it was planned for (its target, or `held_speedups`'); `tables` caches the score
    tables by library stage between calls."""
    from .pipeline import compact_architecture, load_score_table

    try:
        if row["training"] not in tables:
            tables[row["training"]] = load_score_table(run, row["training"])[0]
        g = _greedy_at(run, tables[row["training"]], float(row.get("planned_speedup", row["target_speedup"])))
    except (PuzzleError, KeyError, TypeError, ValueError):
        return False
    return compact_architecture([b.id for b in g.blocks]) == row["architecture"]


def stale_greedy_rows(run) -> dict[str, str]:
    """The greedy rows in DIR/baselines/rows/ (by model name) whose architecture greedy no longer picks for their
    target, with why, for `puzzle front` to leave out as baselines.csv does (`_with_earlier_rows`): the search's
    objective, --vllm-compatible or --exclude changed since they were built."""
    from .io import read_json

    stale, tables = {}, {}
    for path in sorted((run.out / "baselines" / "rows").glob("*.json")):
        try:
            row = read_json(path)
        except PuzzleError:
            continue  # `plots.front_rows` skips an unreadable row itself
        if isinstance(row, dict) and row.get("method") == "greedy" and not _greedy_still_picks(run, row, tables):
            stale[str(row.get("name"))] = ("greedy picks another child for its target with the run's objective, "
                                           "vLLM setting and exclusions now")
    return stale


def _greedy_at(run, table: pd.DataFrame, speedup: float):
    """Greedy's child of `table` (a score table) for `speedup`: runtime budget the table's parent runtime / speedup,
    the run's objective, vLLM setting and exclusions, as the MIP searches (`search.greedy`).

    Raises:
        PuzzleError: as `search.greedy` (a budget greedy cannot reach).
    """
    from .search import greedy, parent_totals

    s = run.config.search
    return greedy(table, Budgets(max_runtime_ms=parent_totals(table)["runtime_ms"] / speedup), s.objective,
                  vllm_compatible=s.vllm_compatible, exclude=s.exclude)


# ------------------------------------------------------------------------------------------------
# `puzzle baselines --out DIR`


def timing_warnings(out: Path, body: pd.DataFrame) -> list[str]:
    """What `puzzle run` and `puzzle front` say of their children's timings, for the baseline rows `body` (no parent
    row): the most cores other jobs kept busy while they were timed, over the default limit (from their row files),
    and the rows measured more than SPEEDUP_MISMATCH times off their predicted speed-up (breaker: greedy-1.5x at
    25.49x, predicted 2.10x, and not a word)."""
    from .io import read_json
    from .pipeline import contention_note, recorded_contention, speedup_mismatch_note

    again = f"puzzle front --out {shell_arg(out)} --one-session"  # times every model of the front again, together
    busy = []
    for name in body["name"]:
        try:
            busy.append(recorded_contention(read_json(out / "baselines" / "rows" / f"{name}.json")))
        except PuzzleError:
            continue
    busy = [b for b in busy if b is not None]
    notes = []
    if busy and (note := contention_note({"baselines": max(busy)})):
        notes.append(f"{note} (`{again}` times them all again, together)")
    apart = [n for n in (speedup_mismatch_note(r, out, again=again) for r in body.to_dict("records")) if n]
    if apart:
        more = len(apart) - 1
        notes.append(apart[0] + (f" ({more} more row{'s' * (more > 1)} as far apart: baselines.csv)" if more else ""))
    return notes


def add_baselines_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle baselines`: realize and measure the baselines on a run directory."""
    p = subparsers.add_parser("baselines", help="greedy, layer removal, attention removal and uniform width children "
                                                "at the front's speed-ups, realized, evaluated, measured and exported")
    p.add_argument("--out", type=dir_arg, required=True, metavar="DIR", help="run directory (after `puzzle score`)")
    from .cli import JoinCommas, add_max_contention_flag

    p.add_argument("--speedups", metavar="S,S,...", default=None, action=JoinCommas,
                   help="speed-up targets (default: the run's front speed-ups; repeatable, the lists are joined)")
    p.add_argument("--no-export", action="store_true", help="do not write DIR/export/<name> folders")
    add_max_contention_flag(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=baselines_main)
    return p


def open_run(out: Path, progress: bool = True):
    """The `Run` of an existing run directory (its saved configuration), logging to stderr: for library use
    (benchmarks, notebooks, tests). The commands open theirs through `cli._stage_run`, which also applies
    --max-contention and leaves DIR/config.json as it was when they fail.

    Raises:
        PuzzleError: `out` holds no run's configuration (`config.load_run_config`).
    """
    from .config import load_run_config
    from .pipeline import Run

    return Run(out, load_run_config(out), progress=progress, log=lambda m: print(m, file=sys.stderr, flush=True))


def baselines_main(args) -> int:
    """Run the baselines and print the table.

    The run is opened as every stage command's (`cli._stage_run`): --max-contention is saved with the configuration
    when the command succeeds, and a failure (an error, Ctrl-C) leaves DIR/config.json byte for byte as it was.

    Raises:
        PuzzleError: a malformed --speedups (before anything is read), DIR is no run directory, or as
            `run_baselines`.
    """
    from .cli import _stage_run

    speedups = None
    if args.speedups is not None:
        from .budgets import parse_speedup

        bad = f"--speedups {args.speedups!r}: give speed-ups above 1 (1 is the parent) separated by commas, e.g. 1.25,1.5,2"
        try:
            speedups = tuple(parse_speedup(s) for s in args.speedups.split(","))  # 1.5 or 1.5x
        except PuzzleError:
            raise PuzzleError(bad) from None
        if not all(1 < s < math.inf for s in speedups):  # NaN fails too; at 1 every method is the parent
            raise PuzzleError(bad)
    with _stage_run(args, existing=True, measures=True) as run:
        table = run_baselines(run, speedups, export=not args.no_export, progress=not args.no_progress)
    cols = ["name", "training", "speedup", "kl_nats", "lm_loss", "params"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    body = table[table["name"] != "parent"]
    for line in out_of_reach_lines(body, dict.fromkeys(speedups or run.config.search.front_speedups)):
        print(line, file=sys.stderr)
    for note in timing_warnings(args.out, body):
        print(f"baselines: warning: {note}", file=sys.stderr)
    print(f"wrote {args.out / 'baselines' / 'baselines.csv'}; `puzzle front --out "
          f"{shell_arg(args.out)}` draws them beside our children and writes the ratios at matched "
          "speed (front_all.png, front_ratios.csv)", file=sys.stderr)
    return 0
