"""Replace-1-block scoring sharded across processes (torchrun, gloo), resumable per candidate.

Candidates are independent, so every rank scores its share and appends each result to its own
JSON-lines log (`quality.rank<r>.jsonl`, scoring/quality.py `ResultLog`); the logs of all ranks
merge into one table. Nothing is exchanged but a barrier, so gloo on CPUs suffices.

Sharding is deterministic: every rank computes the same assignment from the same candidate list.
A candidate at layer i recomputes the L - i - 1 layers after it, so candidates are weighed by that
cost and dealt out longest first to the least loaded rank (LPT scheduling), which balances ranks
far better than round robin when early layers hold most of the work.

Resuming: before scoring, a rank reads every rank's log in the folder and skips candidates already
there, so a run restarted with another world size redoes nothing.

    torchrun --nproc-per-node 2 my_scoring.py     # each process: score_sharded(..., *dist_rank())
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from puzzle.errors import PuzzleError

from .quality import ResultLog


@dataclass(frozen=True)
class Candidate:
    """One replace-1-block job: a stable key (the result log's key), its layer, subblock and variant id."""

    key: str
    layer: int
    subblock: str
    variant: str


def shard(candidates: Sequence[Candidate], rank: int, world_size: int, num_layers: int | None = None) -> list[Candidate]:
    """The candidates rank `rank` of `world_size` scores, in the given order.

    Each candidate costs num_layers - layer (the layers it recomputes, LM head included as one);
    candidates go longest first to the rank with the least work so far (ties: the lower rank).

    Raises:
        PuzzleError: rank outside [0, world_size) or duplicate keys.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise PuzzleError(f"rank {rank} is not in [0, world_size={world_size})")
    keys = [c.key for c in candidates]
    if len(set(keys)) != len(keys):
        raise PuzzleError("candidate keys must be unique")
    L = num_layers if num_layers is not None else 1 + max((c.layer for c in candidates), default=0)
    order = sorted(range(len(candidates)), key=lambda i: (-(L - candidates[i].layer), i))
    load = [(0, r) for r in range(world_size)]
    mine = []
    for i in order:
        work, r = heapq.heappop(load)
        if r == rank:
            mine.append(i)
        heapq.heappush(load, (work + L - candidates[i].layer, r))
    return [candidates[i] for i in sorted(mine)]


def rank_log(log_dir: str | os.PathLike, rank: int) -> ResultLog:
    return ResultLog(Path(log_dir) / f"quality.rank{rank}.jsonl")


def read_logs(log_dir: str | os.PathLike) -> dict:
    """Every finished result in the folder's rank logs: key -> row."""
    done = {}
    for path in sorted(Path(log_dir).glob("quality.rank*.jsonl")):
        done.update(ResultLog(path).read())
    return done


def score_sharded(rank: int, world_size: int, candidates: Sequence[Candidate], score: Callable[[Candidate], dict],
                  log_dir: str | os.PathLike, num_layers: int | None = None, progress: bool = False) -> int:
    """Score this rank's share of `candidates` that no log in `log_dir` holds yet.

    Args:
        score: candidate -> metrics dict (e.g. a closure around quality.replace_one_score).
        log_dir: folder of the per-rank result logs (created).

    Returns:
        The number of candidates this call scored.
    """
    done = read_logs(log_dir)
    todo = [c for c in shard(candidates, rank, world_size, num_layers) if c.key not in done]
    log = rank_log(log_dir, rank)
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"score rank {rank}", unit="cand")
    for c in it:
        metrics = score(c)
        log.append({"key": c.key, "layer": c.layer, "subblock": c.subblock, "variant": c.variant, **metrics})
    return len(todo)


def merge_logs(log_dir: str | os.PathLike, candidates: Sequence[Candidate]) -> pd.DataFrame:
    """One table from all rank logs, rows in candidate order (key, layer, subblock, variant, metrics).

    Raises:
        PuzzleError: a candidate that no log holds (a rank has not finished).
    """
    done = read_logs(log_dir)
    missing = [c.key for c in candidates if c.key not in done]
    if missing:
        raise PuzzleError(f"{len(missing)} candidates have no result in {log_dir} (e.g. {missing[:3]}); "
                          "rerun the scoring (it resumes)")
    return pd.DataFrame([done[c.key] for c in candidates])


def dist_rank() -> tuple[int, int]:
    """(rank, world_size) of this process: torch.distributed's when initialised, else torchrun's
    RANK / WORLD_SIZE environment variables, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def score_distributed(candidates: Sequence[Candidate], score: Callable[[Candidate], dict], log_dir, *,
                      num_layers: int | None = None, progress: bool = False) -> pd.DataFrame | None:
    """Score under torchrun: every rank scores its share, waits for the others (gloo barrier when
    a process group is initialised) and rank 0 returns the merged table; other ranks return None.
    Without a process group this is the single-process case and returns the table."""
    import torch.distributed as dist

    rank, world = dist_rank()
    score_sharded(rank, world, candidates, score, log_dir, num_layers, progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return merge_logs(log_dir, candidates) if rank == 0 else None
