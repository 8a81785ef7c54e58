"""Coupled BLD: whole blocks trained together, on a space narrowed by a first decoupled search.

Decoupled BLD trains m attention and n FFN variants per layer and composes them; coupled BLD
trains a block (attention variant + FFN variant) as one unit on the layer's whole output, which
is more accurate (the FFN sees the child attention's output, not the parent's) but m·n blocks per
layer are too many. Puzzle's hybrid flow (Bercovich et al. 2024, Sec. 3) narrows first:

1. decoupled BLD, scoring and a search give a score table of attention and FFN rows;
2. `narrow_blocks`: for every budget of interest, the k best diverse solutions of the MIP; per
   layer, the blocks those solutions use (minus the parent's own block and the empty block);
3. `build_coupled_library`: each such block is composed from its trained decoupled subblocks
   (the parent's weights for a parent part) and trained on the layer's delta h_out - h_in with the
   normalized MSE (bld.py, kind "block"; library entries `attn-kv1+ffn-768.bld`);
4. `score_blocks`: replace-1-block with the whole layer replaced, in the same metrics as the
   decoupled rows; `block_rows` adds the costs (attention row + FFN row of the score table);
5. the search runs again on the table with both kinds: a block row replaces the pair of rows that
   builds the same block (search.py);
6. the children the search chose on that table (`pipeline.coupled_blocks`) take the coupled entry of
   each block row they chose (`realize.realize_child(coupled=...)`).

`stage_coupled` runs steps 2-5 on a pipeline run directory (see its docstring for the wiring).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .architecture import BlockConfig
from .bld import BLDConfig, Job, planned_tokens, run_jobs
from .errors import PuzzleError, is_finite_number, shell_arg
from .library import Library
from .mip import as_bool
from .modeling import DecoderBlock, PuzzleForCausalLM

COST_COLUMNS = ("prefill_ms", "decode_ms", "runtime_ms", "memory_mib", "params")


def narrow_blocks(table: pd.DataFrame, budgets_list: Sequence, top_k: int, objective="kl_nats", *,
                  vllm_compatible: bool = False, time_limit_s: float = 60.0,
                  exclude: Sequence[str] = ()) -> dict[int, list[BlockConfig]]:
    """The blocks used by the top-k decoupled solutions of each budget, per layer.

    Args:
        table: a decoupled score table (search.REQUIRED_COLUMNS).
        budgets_list: budgets.Budgets to solve (e.g. the main budget and the front's).
        top_k: diverse solutions per budget (search.solve num_solutions).
        exclude: variant ids left out of those solutions (the run's `search.exclude`).

    Returns:
        {layer: [BlockConfig, ...]} sorted by id; the parent's block and no_op+no_op are left out
        (nothing to train). Budgets no child meets are skipped.
    """
    from .search import InfeasibleBudget, solve

    parent = {}
    for r in table[(table["subblock"].isin(["attention", "ffn"])) & as_bool(table["is_parent"])].itertuples():
        parent.setdefault(int(r.layer), {})[r.subblock] = r.variant
    chosen: dict[int, set] = {}
    for budgets in budgets_list:
        try:
            solutions = solve(table, budgets, objective, vllm_compatible=vllm_compatible, num_solutions=top_k,
                              time_limit_s=time_limit_s, exclude=exclude)
        except InfeasibleBudget:
            continue
        except PuzzleError as e:  # reviewer: said, not swallowed (a time-out, an exclusion that empties a layer)
            warnings.warn(f"coupled BLD: the budget {budgets} is left out of the narrowing: {e}")
            continue
        for sol in solutions:
            for i, block in enumerate(sol.blocks):
                chosen.setdefault(i, set()).add(block)
    out = {}
    for i, blocks in sorted(chosen.items()):
        keep = [b for b in blocks if trainable_block(b) and
                (b.attention.id, b.ffn.id) != (parent.get(i, {}).get("attention"), parent.get(i, {}).get("ffn"))]
        if keep:
            out[i] = sorted(keep, key=lambda b: b.id)
    return out


def trainable_block(block: BlockConfig) -> bool:
    """A block with weights (not no_op + no_op)."""
    return block.attention.kind != "no_op" or block.ffn.kind != "no_op"


def coupled_jobs(blocks: dict[int, list[BlockConfig]]) -> list[Job]:
    """BLD jobs (kind "block") for the narrowed blocks."""
    return [Job(i, "block", b) for i, bs in sorted(blocks.items()) for b in bs if trainable_block(b)]


def build_coupled_library(parent, calib: torch.Tensor, blocks: dict[int, list[BlockConfig]], cfg: BLDConfig,
                          library: Library, progress: bool = False, rank: int = 0, world_size: int = 1,
                          device=None) -> dict:
    """Train (or resume) the coupled block entries; the same walk, sharding and resume as bld.build_library.

    Each block starts from its decoupled "bld" entries (when present) and trains on
    cfg.coupled_tokens (or cfg.tokens) calibration tokens. Returns run_jobs' summary.
    """
    from . import distributed

    if not cfg.train:  # coupled entries exist only trained
        return {"trained": 0, "skipped": 0, "diverged": [], "seconds": 0.0, "tokens_per_subblock": 0,
                "peak_parent_mib": 0.0}
    with distributed.process_group(rank, world_size):
        return run_jobs(parent, calib, coupled_jobs(blocks), cfg, library, progress, rank, world_size, device,
                        tokens=cfg.coupled_tokens or cfg.tokens)


def block_module(config, library: Library, layer: int, block: BlockConfig, stage: str = "bld") -> DecoderBlock:
    """The coupled library entry of a block as a DecoderBlock (eval mode, fp32).

    Raises:
        PuzzleError: the entry is missing or corrupt.
    """
    sub = DecoderBlock(config, block, layer)
    sub.load_state_dict(library.load(layer, block.id, stage), strict=True)
    return sub.eval()


@torch.no_grad()
def replace_block_score(parent: PuzzleForCausalLM, cache, layer_idx: int, block: DecoderBlock | None,
                        chunk: int = 4) -> dict:
    """Metrics of the parent with the whole layer `layer_idx` replaced by `block` (None: both parts no_op).

    Args:
        cache: scoring.quality.ParentCache of the scoring tokens.

    Returns:
        {"kl_nats", "lm_loss", "top1_agree", "cosine"} per token, as scoring.quality.replace_one_score.
    """
    from .scoring.quality import next_token_targets, token_metrics

    pos = cache.positions
    targets = next_token_targets(cache.ids)[:, pos]
    sums = {"kl_nats": 0.0, "lm_loss": 0.0, "top1_agree": 0.0, "cosine": 0.0, "tokens": 0, "lm_tokens": 0}
    for s in range(0, cache.ids.shape[0], chunk):
        e = s + chunk
        cos, sin = cache.cos[s:e], cache.sin[s:e]
        h = cache.h[layer_idx][s:e]
        if block is not None:
            h = block(h, cos, sin)
        h = parent.run_layers(h, cos, sin, start=layer_idx + 1)[:, pos]
        m = token_metrics(parent.head(h), cache.logp[s:e], targets[s:e])
        for k in ("kl_nats", "lm_loss", "top1_agree", "tokens", "lm_tokens"):
            sums[k] += m[k]
        sums["cosine"] += float(F.cosine_similarity(h.float(), cache.h[-1][s:e, pos].float(), dim=-1).sum())
    n = sums["tokens"]
    return {"kl_nats": sums["kl_nats"] / n, "lm_loss": sums["lm_loss"] / max(1, sums["lm_tokens"]),
            "top1_agree": sums["top1_agree"] / n, "cosine": sums["cosine"] / n}


def score_blocks(parent: PuzzleForCausalLM, library: Library, cache, blocks: dict[int, list[BlockConfig]],
                 stage: str = "bld", chunk: int = 4, log=None, progress: bool = False) -> pd.DataFrame:
    """Replace-1-block quality of every coupled entry (resumable through `log`, a scoring.quality.ResultLog).

    `cache`: the parent's (scoring.quality.parent_cache), or a function that makes it, called only when some block
    is scored (a rerun that finds every score in `log` costs no parent pass).

    Returns:
        One row per block: layer, subblock="block", variant (block id), is_parent=False and the metrics; a block
        whose entry cannot be loaded, or whose KL is NaN or inf, is left out with a warning.
    """
    done = log.read() if log is not None else {}
    dtype = next(parent.parameters()).dtype
    items = [(i, b) for i, bs in sorted(blocks.items()) for b in bs if trainable_block(b)]
    bar = None
    if progress and items:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="score (blocks)", unit="block")
    rows = []
    for i, b in items:
        key = f"{i}:block:{b.id}:{stage}"
        sha = library.recorded_sha256(i, b.id, stage)
        # a score of this very entry (breaker: a block trained again kept its old score; a row without a checksum
        # predates them, and is kept as decoupled scores are)
        # and a finite one (reviewer: a NaN score was kept for good, and the search refused the table), unless the
        # log holds this very entry's NaN score (leftover: it was scored again on every call)
        same = key in done and done[key].get("entry_sha256", sha) == sha
        logged_nan = same and sha is not None and not is_finite_number(done[key].get("kl_nats"))
        try:
            if logged_nan:
                raise PuzzleError(f"its weights ({library.weights_path(i, b.id, stage)}) hold NaN or inf, or "
                                  f"overflow: a KL of {done[key].get('kl_nats')} when this entry was scored")
            if not same or not is_finite_number(done[key].get("kl_nats")):
                cache = cache() if callable(cache) else cache
                module = block_module(parent.config, library, i, b, stage).to(dtype)
                metrics = replace_block_score(parent, cache, i, module, chunk)
                done[key] = {"key": key, "layer": i, "subblock": "block", "variant": b.id, "entry_sha256": sha,
                             **metrics}
                if log is not None and (sha is not None or math.isfinite(metrics["kl_nats"])):
                    log.append(done[key])
                if not math.isfinite(metrics["kl_nats"]):
                    raise PuzzleError(f"its weights ({library.weights_path(i, b.id, stage)}) hold NaN or inf, or "
                                      f"overflow: a KL of {metrics['kl_nats']}")
        except PuzzleError as e:  # a block is optional: the search takes its two subblocks
            warnings.warn(f"layer {i} block {b.id} ({stage}) is left out of the score table: {e} (`puzzle run` "
                          f"trains a missing or damaged entry again; delete the files of a NaN one)")
            if bar is not None:
                bar.update(1)
            continue
        r = done[key]
        rows.append({"layer": i, "subblock": "block", "variant": b.id, "is_parent": False,
                     **{m: r[m] for m in ("kl_nats", "lm_loss", "top1_agree", "cosine")}})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows)


def block_rows(quality: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """Score-table rows of blocks: their quality plus the summed cost rows of their two subblocks.

    Args:
        quality: from `score_blocks`.
        costs: measured subblock costs, one row per variant (variant, prefill_ms, decode_ms, runtime_ms,
            memory_mib, params; no_op rows are zero): the score table's rows, or the cost table.

    Raises:
        KeyError: a subblock variant without a cost row.
    """
    by_id = costs.set_index("variant")
    rows = []
    for r in quality.to_dict("records"):
        b = BlockConfig.from_id(r["variant"])
        a, f = by_id.loc[b.attention.id], by_id.loc[b.ffn.id]
        # params stay whole numbers (breaker: a float column wrote the decoupled rows as 12352.0 in the next call, and
        # the changed score_table_decoupled.csv timed the front again)
        rows.append({**r, **{c: int(a[c]) + int(f[c]) if c == "params" else float(a[c]) + float(f[c])
                             for c in COST_COLUMNS}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Assembling children that use coupled entries


def realize_child_coupled(parent: PuzzleForCausalLM, library: Library | None, blocks: Sequence[BlockConfig],
                          stage: str = "bld") -> PuzzleForCausalLM:
    """`realize.realize_child` with every layer whose block has a coupled `stage` entry taking that entry (the
    commands take those of the block rows a search chose: `pipeline.coupled_blocks`).

    Identical to realize_child when the library holds no block entries.

    Raises:
        PuzzleError: as realize_child, and for a coupled entry whose weights are missing or damaged.
    """
    from .realize import realize_child

    coupled = [] if library is None else [(i, b.id) for i, b in enumerate(blocks)  # by its info: a damaged entry
                                          if trainable_block(b) and library.recorded(i, b.id, stage)]  # is refused
    return realize_child(parent, library, blocks, stage, coupled=coupled)


def coupled_layers(library: Library, blocks: Sequence[BlockConfig], stage: str = "bld") -> list[int]:
    """The layers of a child that take a coupled entry."""
    return [i for i, b in enumerate(blocks) if library.has(i, b.id, stage)]


# ----------------------------------------------------------------------------------------------
# The stage on a pipeline run directory


def stage_coupled(run) -> pd.DataFrame:
    """Hybrid flow on a run directory after `stage_score`: narrow, coupled BLD, score blocks, extend the table.

    Reads DIR/score/score_table.csv (decoupled), keeps a copy as score_table_decoupled.csv, and
    rewrites score_table.csv with the block rows appended (sidecar: "coupled_blocks"). Budgets:
    the main request and every front speed-up. Block scores resume from
    DIR/score/quality_blocks.jsonl. Does nothing when run.config.bld.coupled_top_k is 0.

    `puzzle run` calls it between scoring and the search when bld.coupled_top_k > 0; the commands then build a
    searched child's layers from the coupled entries of the block rows it chose (`pipeline.coupled_blocks`).

    Returns:
        The score table the search should use.
    """
    from .io import save_table
    from .pipeline import front_request, load_score_table, main_budget_request, short_calib_warning
    from .search import parent_totals

    cfg = run.config.bld
    table, meta = load_score_table(run, "bld")
    if not cfg.coupled_top_k:
        return table
    decoupled = table[table["subblock"] != "block"].reset_index(drop=True)
    save_table(decoupled, run.out / "score" / "score_table_decoupled.csv", {**meta, "coupled_blocks": 0})
    t0 = time.perf_counter()
    request, _ = main_budget_request(run)
    requests = [request] + [front_request(run, s) for s in run.config.search.front_speedups]
    totals = parent_totals(decoupled)
    budgets = [r.resolve(totals, meta) for r in requests]
    blocks = narrow_blocks(decoupled, budgets, cfg.coupled_top_k, run.config.search.objective,
                           vllm_compatible=run.config.search.vllm_compatible, exclude=run.config.search.exclude)
    if not blocks:  # reviewer: nothing was trained, and nothing said why
        run.say(f"coupled BLD: warning: the {cfg.coupled_top_k} best children of the {len(budgets)} budgets (main and "
                f"front) hold no block to train (no child meets them, or they keep the parent's blocks or remove "
                f"whole layers)")
    # and the library's blocks of earlier narrowings that the table can hold, so that one trained on another
    # bld.coupled_tokens is trained again (breaker: they stayed beside the new ones, of another token budget)
    for i, earlier in library_blocks(run.library, table=decoupled).items():
        blocks[i] = sorted({*blocks.get(i, ()), *earlier}, key=lambda b: b.id)
    blocks = dict(sorted(blocks.items()))
    result = build_coupled_library(run.parent.model, run.tokens.calib, blocks, cfg, run.library, progress=run.progress)
    run.timed("bld_coupled_s", time.perf_counter() - t0)
    if result["trained"]:  # breaker: coupled_tokens above the calibration split was capped without a word
        short_calib_warning(run, "coupled BLD", "bld.coupled_tokens" if cfg.coupled_tokens else "bld.tokens",
                            cfg.coupled_tokens or cfg.tokens, result["tokens_per_subblock"])
    combined = add_block_rows(run, decoupled, meta)
    run.say(f"coupled BLD: {sum(map(len, blocks.values()))} blocks over {len(blocks)} layers ({result['trained']} "
            f"trained now); score table extended with the {(combined['subblock'] == 'block').sum()} blocks of the "
            f"library")
    return combined


def library_blocks(library: Library, stage: str = "bld", table: pd.DataFrame | None = None
                   ) -> dict[int, list[BlockConfig]]:
    """{layer: [BlockConfig, ...]} of every coupled entry of the library (by its info file), sorted by id; with
    `table` (a decoupled score table), only the blocks whose two subblocks it holds at their layer (reviewer: a
    block of a width since left out of the space would put it back into the search)."""
    have = None if table is None else set(zip(table["layer"].astype(int), table["variant"].astype(str)))
    found: dict[int, list[BlockConfig]] = {}
    for info in sorted((library.root / "entries").glob(f"L*/*+*.{stage}.json")):
        try:
            layer, block = int(info.parent.name[1:]), BlockConfig.from_id(info.name[:-len(f".{stage}.json")])
        except ValueError:  # not an entry of this library's naming (ArchitectureError too): not a block
            continue
        if have is None or {(layer, block.attention.id), (layer, block.ffn.id)} <= have:
            found.setdefault(layer, []).append(block)
    return {i: sorted(bs, key=lambda b: b.id) for i, bs in sorted(found.items())}


def add_block_rows(run, decoupled: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Write DIR/score/score_table.csv as `decoupled` plus one block row for every coupled entry of the run's
    library (`library_blocks`) whose two subblocks `decoupled` holds at its layer, scored replace-1-block (resumed
    from DIR/score/quality_blocks.jsonl) and costed as those two rows. The search then weighs the block in place of
    its two subblocks (`mip.build_choices`), and the chosen ones are built from their entries
    (`pipeline.coupled_blocks`). Returns the table written.

    Raises:
        PuzzleError: a coupled entry that is corrupt (`block_module`)."""
    from .io import save_table
    from .pipeline import SCORE_COLUMNS, cost_meta, read_own_log, scoring_ids
    from .scoring.quality import ResultLog, parent_cache

    t0 = time.perf_counter()
    blocks = library_blocks(run.library, table=decoupled)  # reviewer: a block of a width left out failed at its cost
    plan = planned_tokens(run.tokens.calib, run.config.bld, run.config.bld.coupled_tokens)
    setting = "bld.coupled_tokens" if run.config.bld.coupled_tokens else "bld.tokens"
    left_out = {  # each left out with a word; `puzzle run` (stage_coupled: run_jobs) trains them again
        f"trained on another number of tokens than {setting} plans ({plan})":  # reviewer: `puzzle score` kept them
            lambda i, b: run.library.recorded(i, b.id, "bld").get("planned_tokens") not in (None, plan),
        # breaker: an unreadable info stopped `puzzle run` (damaged weights: `score_blocks` leaves the block out)
        "missing or damaged": lambda i, b: run.library.recorded_sha256(i, b.id, "bld") is None}
    for why, out in left_out.items():
        if gone := [(i, b.id) for i, bs in blocks.items() for b in bs if out(i, b)]:
            blocks = {i: kept for i, bs in blocks.items() if (kept := [b for b in bs if (i, b.id) not in gone])}
            one = len(gone) == 1
            run.say(f"score: {len(gone)} coupled entr{'y' if one else 'ies'} (e.g. layer {gone[0][0]} {gone[0][1]}) "
                    f"{'is' if one else 'are'} {why}: left out of the table; `puzzle run --out {shell_arg(run.out)}` "
                    f"trains {'it' if one else 'them'} again")
    rows = pd.DataFrame(columns=SCORE_COLUMNS)
    if blocks:
        sc = run.config.score
        ids = scoring_ids(run)
        log = ResultLog(run.out / "score" / "quality_blocks.jsonl")
        read_own_log(run, log)  # damaged lines warned of once, then set aside
        quality = score_blocks(run.parent.model, run.library,
                               lambda: parent_cache(run.parent.model, ids, chunk=sc.chunk, stride=sc.position_stride),
                               blocks, chunk=sc.chunk, log=log, progress=run.progress)
        # the costs of the table the blocks join, one row per variant (breaker: a missing cost.csv was timed again
        # here, and the block rows got the new timings beside the decoupled rows' old ones)
        costs = decoupled[decoupled["layer"] >= 0].drop_duplicates("variant")
        rows = block_rows(quality, costs)[SCORE_COLUMNS] if len(quality) else rows  # (every block left out: NaN)
    combined = pd.concat([decoupled, rows], ignore_index=True)[SCORE_COLUMNS] if len(rows) else decoupled
    save_table(combined, run.out / "score" / "score_table.csv", {**cost_meta(run), **{k: v for k, v in meta.items()
               if k not in ("columns", "rows", "coupled_blocks")}, "coupled_blocks": len(rows)})
    run.timed("score_blocks_s", time.perf_counter() - t0)
    return combined
