"""Where a child's predicted KL goes on its way to the realized evaluation KL.

The search minimises the summed replace-1-block KL of a child's subblocks, each scored alone in the
parent on a few scoring-split tokens (`predicted`). The child's KL on held-out evaluation text is
usually higher. `kl_gap` splits that gap into four measured steps, each a ratio of two KLs in
nats/token, all on the LM head's scored positions (`[score] position_stride`):

1. selection, fresh_sum / predicted: the same subblocks' replace-1 KLs summed again on scoring-split
   tokens the table did not use. Above 1 when the MIP picked subblocks whose scores were low by
   chance (few scoring tokens); it also moves with how hard the two token sets are for the child
   (nothing divides that out: below 1 when the table's tokens are the harder ones).
2. compounding on scoring text, fresh / fresh_sum: the realized child on those tokens against the
   sum; above 1 when swapped subblocks hurt each other (quality is not additive).
3. transfer, eval_sum / fresh_sum: the same subblocks' replace-1 KLs summed on the evaluation split;
   above 1 when what BLD trained on the calibration text fits other text worse.
4. compounding on evaluation text, eval / eval_sum: the realized child there.

So eval = predicted × selection × compounding (scoring) × transfer × (compounding (eval) /
compounding (scoring)): the product of steps 1, 3 and 4 and the predicted value give eval exactly.

`benchmarks/kl_gap.py` runs it on a finished run's front.
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from .architecture import BlockConfig
from .errors import PuzzleError


def _sequences(ids: torch.Tensor, start: int, tokens: int, what: str, setting: str) -> torch.Tensor:
    """(n, T) rows of `ids` from `start`, `tokens` in all (whole sequences, at least one).

    Raises PuzzleError naming `setting` (the data setting to raise) when no row lies beyond `start`."""
    n = max(1, tokens // ids.shape[1])
    if ids.shape[0] - start < 1:
        raise PuzzleError(f"{what} has no sequences beyond the first {start}; raise {setting} "
                          f"(it holds {ids.shape[0]} sequences of {ids.shape[1]} tokens)")
    return ids[start:start + n]


@torch.no_grad()
def _realized_kl(model, parent_logp: torch.Tensor, ids: torch.Tensor, chunk: int, stride: int) -> float:
    """KL(parent || model) in nats/token over the scored positions of (N, T) ids."""
    from .scoring.quality import parent_cache, position_kl

    logq = parent_cache(model, ids, chunk=chunk, stride=stride).logp  # (N, T', V)
    return float(position_kl(logq, parent_logp).mean())


def kl_gap(run, names, tokens: int = 1024, progress: bool = False) -> pd.DataFrame:
    """The four steps from a child's predicted KL to its realized evaluation KL (module docstring).

    Args:
        run: an open run (pipeline.Run) with a score table and the searched children `names`.
        names: searched children (DIR/search/<name>.json).
        tokens: scoring-split tokens beyond the table's, and evaluation-split tokens, to measure on
            (whole sequences; fewer when a split holds fewer).

    Returns:
        One row per child: name, subblocks (swapped subblocks), predicted_kl_nats, fresh_sum_kl_nats,
        fresh_kl_nats, eval_sum_kl_nats, eval_kl_nats, the ratios selection, compounding_score,
        transfer, compounding_eval, and seconds (the child's own, plus an equal share of the replace-1
        scoring of subblocks the children share). attrs["tokens"]: {"fresh": n, "eval": n} tokens used;
        attrs["fresh_start"]: the scoring-split sequence the fresh tokens start at, beyond the table's and, when
        `names` holds -diverse or -refined children, beyond the sequences `puzzle refine` chose them on.

    Raises:
        PuzzleError: an unknown child, a child that takes coupled blocks, or a scoring split with no sequences
            beyond those the score
            table used (and, for children `puzzle refine` chose, beyond those it chose them on).
    """
    from .pipeline import coupled_blocks, read_architecture
    from .refine import _subblock, realize_blocks
    from .scoring.quality import parent_cache, replace_one_scores

    cfg = run.config.score
    score_ids = run.tokens.score
    records = {name: read_architecture(run, name) for name in names}
    used = max(1, min(score_ids.shape[0], cfg.tokens // score_ids.shape[1]))  # the table's sequences
    chosen = _selection_sequences(run, records)  # sequences a refine child was chosen on (reviewer: fresh overlapped)
    if chosen > used and score_ids.shape[0] <= chosen:
        raise PuzzleError(f"the scoring split holds {score_ids.shape[0]} sequences, and `puzzle refine` chose "
                          f"{', '.join(n for n, r in records.items() if r.get('method') in REFINED)} on the first "
                          f"{chosen}: no fresh sequence is left for them; leave them out, or raise data.score_tokens")
    start = max(used, chosen)
    splits = {"fresh": _sequences(score_ids, start, tokens, "the scoring split", "data.score_tokens"),
              "eval": _sequences(run.tokens.eval, 0, tokens, "the evaluation split", "data.eval_tokens")}
    parent = run.parent.model
    caches = {k: parent_cache(parent, ids, chunk=cfg.chunk, stride=cfg.position_stride) for k, ids in splits.items()}
    swapped: dict[str, list] = {}
    for name, rec in records.items():
        stage = rec.get("library_stage", "bld")
        blocks = [BlockConfig.from_id(b) for b in rec["choice"]]
        if coupled := coupled_blocks(run, blocks, stage, rec.get("method", "mip"), record=rec):
            # reviewer: built from subblocks here, its breakdown compared another model than the one exported
            raise PuzzleError(f"{name} takes coupled blocks in layer(s) {sorted(i for i, _ in coupled)} (coupled BLD), "
                              f"and this breakdown is by subblocks; leave it out")
        subs = []
        for layer, (b, pb) in enumerate(zip(blocks, run.parent.config.blocks)):
            for subblock, v, pv in (("attention", b.attention, pb.attention), ("ffn", b.ffn, pb.ffn)):
                if v != pv:
                    subs.append((layer, subblock, v, stage))
        swapped[name] = subs
    todo = sorted({s for subs in swapped.values() for s in subs}, key=lambda s: (s[0], s[1], s[2].id, s[3]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * len(splits) + len(records) * len(splits), desc="kl gap", unit="model")
    single: dict = {}  # (split, layer, subblock, variant id, stage) -> replace-1 KL
    t0 = time.perf_counter()
    for split, cache in caches.items():
        for layer, subblock, v, stage in todo:
            m = replace_one_scores(parent, cache, layer, subblock, [_subblock(run, layer, subblock, v, stage)],
                                   chunk=cfg.chunk)[0]
            single[(split, layer, subblock, v.id, stage)] = m["kl_nats"]
            if bar is not None:
                bar.update(1)
    shared_s = (time.perf_counter() - t0) / max(1, len(records))
    rows = []
    for name, rec in records.items():
        t1 = time.perf_counter()
        stage = rec.get("library_stage", "bld")
        model = realize_blocks(run, [BlockConfig.from_id(b) for b in rec["choice"]], stage)
        row = {"name": name, "subblocks": len(swapped[name]), "predicted_kl_nats": float(rec["kl_nats"])}
        for split, cache in caches.items():
            row[f"{split}_sum_kl_nats"] = sum(single[(split, l_, s, v.id, st)] for l_, s, v, st in swapped[name])
            row[f"{split}_kl_nats"] = _realized_kl(model, cache.logp, splits[split], cfg.chunk, cfg.position_stride)
            if bar is not None:
                bar.update(1)
        row["seconds"] = shared_s + time.perf_counter() - t1
        rows.append(row)
    if bar is not None:
        bar.close()
    df = pd.DataFrame(rows)
    df["selection"] = df["fresh_sum_kl_nats"] / df["predicted_kl_nats"]
    df["compounding_score"] = df["fresh_kl_nats"] / df["fresh_sum_kl_nats"]
    df["transfer"] = df["eval_sum_kl_nats"] / df["fresh_sum_kl_nats"]
    df["compounding_eval"] = df["eval_kl_nats"] / df["eval_sum_kl_nats"]
    df.attrs["tokens"] = {k: int(ids.numel()) for k, ids in splits.items()}
    df.attrs["fresh_start"] = start
    return df


#: methods of the children `puzzle refine` writes, chosen by realized KL on the scoring split's first sequences
REFINED = ("mip-diverse", "mip-refined")


def _selection_sequences(run, records: dict) -> int:
    """How many leading scoring-split sequences the -diverse/-refined children among `records` were chosen on
    (the count the child's record keeps, `refine.SELECTION_KEY`; for a record written before it did,
    `refine.selection_ids` with the refinement's --select-tokens read from DIR/refine/<name>.inputs.json, or the
    default 2048 tokens where that file is missing); 0 when there are none."""
    from .io import read_json
    from .refine import SELECTION_KEY, selection_ids

    most = 0
    for name, rec in records.items():
        if rec.get("method") not in REFINED:
            continue
        kept = rec.get(SELECTION_KEY)
        if isinstance(kept, int) and not isinstance(kept, bool) and kept > 0:
            most = max(most, kept)
            continue
        tokens = None
        try:
            tokens = read_json(run.out / "refine" / f"{name.rsplit('-', 1)[0]}.inputs.json")["settings"]["tokens"]
        except (PuzzleError, KeyError, TypeError):
            pass
        most = max(most, selection_ids(run, tokens if isinstance(tokens, int) else None).shape[0])
    return most
