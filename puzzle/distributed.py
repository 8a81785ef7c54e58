"""BLD on many processes: torchrun's environment, the process group, and each rank's device.

BLD's work is a list of independent (layer, variant) entries (bld.py); `bld.shard` gives rank r
every world_size-th of them, each rank runs the parent forward itself and writes its own entries
(atomic files, one per entry), and after a barrier rank 0 writes the library index. An entry's
weights depend only on the parent, the calibration tokens, the settings and the seed, so any
number of ranks builds the same library as one process.

One node, N processes (gloo on CPUs, NCCL on GPUs; rank r uses cuda:LOCAL_RANK):

    puzzle data --out DIR --preset smollm2-demo            # once, before the ranks start
    torchrun --nproc_per_node N -m puzzle bld --out DIR

Several nodes: the run directory must be on a file system every node sees. Start the same
command on every node with torchrun's c10d rendezvous (any free port on the first node):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
             --rdzv_id puzzle-bld -m puzzle bld --out DIR

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `process_group` creates
the default group from them when none exists (and destroys it after), so `puzzle bld` needs no
other flag. Without MASTER_ADDR no group is made: rank and world size then only select a shard
(several single processes can split the work by hand) and there is no barrier.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# ranks wait at the final barrier for the slowest one; a BLD shard may take hours
BARRIER_TIMEOUT = timedelta(hours=24)


def env_rank_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment, or set by hand to shard `puzzle bld` over shells;
    (0, 1, 0) outside torchrun; LOCAL_RANK defaults to RANK.

    Raises:
        PuzzleError: a value that is no whole number, WORLD_SIZE below 1, RANK outside 0..WORLD_SIZE-1, or one of
            RANK and WORLD_SIZE set without the other (breaker: RANK=2 of 2 trained nothing and exited 0, WORLD_SIZE=2
            alone trained half as rank 0, WORLD_SIZE=0 and RANK=x ended in tracebacks).
    """
    from .errors import PuzzleError

    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "").strip()
        try:
            values[name] = int(text) if text else None
        except ValueError:
            raise PuzzleError(f"environment variable {name}={text!r} is not a whole number (torchrun sets RANK and "
                              f"WORLD_SIZE; set by hand, give both, e.g. RANK=0 WORLD_SIZE=2)") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if (rank is None) != (world is None) and not (rank == 0 or world == 1):
        raise PuzzleError(f"environment variable {'WORLD_SIZE' if rank is None else 'RANK'} is set without "
                          f"{'RANK' if rank is None else 'WORLD_SIZE'}: give both (e.g. RANK=0 WORLD_SIZE=2), or "
                          f"neither for one process")
    rank, world = rank or 0, 1 if world is None else world
    if world < 1 or not 0 <= rank < world:
        rule = f"RANK from 0 to WORLD_SIZE-1 ({world - 1})" if world >= 1 else "WORLD_SIZE at least 1 (the processes)"
        raise PuzzleError(f"environment variables RANK={rank} WORLD_SIZE={world}: give {rule}")
    return rank, world, rank if values["LOCAL_RANK"] is None else values["LOCAL_RANK"]


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env_rank_world()[2] % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(rank: int, world_size: int, device=None):
    """Create the default process group from torchrun's environment for the duration of the block.

    Nothing happens when world_size is 1, when a group already exists (the caller owns it), or
    outside torchrun (no MASTER_ADDR).
    """
    created = False
    if world_size > 1 and dist.is_available() and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        device = torch.device(device) if device is not None else local_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        join_group(backend_for(device), rank, world_size, BARRIER_TIMEOUT)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def join_group(backend: str, rank: int, world_size: int, timeout: timedelta | None = None) -> None:
    """Create the default process group from the environment: torchrun's (env://), or that of ranks started by hand
    with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which first meet through `_meet_by_hand`.

    `timeout` bounds each collective operation afterwards; None keeps torch.distributed's default for the backend.

    Raises:
        PuzzleError: see `_meet_by_hand` (ranks started by hand).
    """
    given = {"timeout": timeout} if timeout is not None else {}
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun met the ranks already, and stops the others if one fails
        dist.init_process_group(backend, rank=rank, world_size=world_size, **given)
        return
    store = _meet_by_hand(rank, world_size)
    store.set_timeout(timeout or dist.default_pg_timeout)  # its short connect timeout no longer applies
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **given)


#: how long ranks started by hand wait for each other before they give up (each can be stopped with Ctrl-C before)
MEET_TIMEOUT = timedelta(minutes=30)


def _meet_by_hand(rank: int, world_size: int, timeout: timedelta = MEET_TIMEOUT, poll_s: float = 0.5):
    """The TCPStore through which ranks started by hand (no torchrun) meet, once all `world_size` have joined.

    Rank 0 serves the store at MASTER_ADDR:MASTER_PORT; the others connect once it listens. Every rank writes its
    WORLD_SIZE under its own key, waits for the others' keys, then counts itself in and waits for the count, all in
    Python, so Ctrl-C and SIGTERM stop a rank that waits (breaker: torch's own rendezvous waited 24 h inside C and
    ignored them); a rank stopped so takes its key and count back (reviewer: the others met without it), and ranks
    started with different WORLD_SIZE values are refused at once instead of waiting for a rank that never comes.

    Raises:
        PuzzleError: MASTER_PORT missing or not a port number or not free on rank 0, rank 0 gone, WORLD_SIZE values
            that differ between ranks, or ranks still missing after `timeout` (named).
    """
    import socket
    import sys
    import time

    from .errors import PuzzleError, first_line

    host, port_text = os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT", "").strip()
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PuzzleError(f"MASTER_PORT={port_text!r}: ranks started by hand need MASTER_PORT, a free port on "
                          f"MASTER_ADDR ({host}) that rank 0 listens on, e.g. MASTER_PORT=29500, the same for all")
    where, deadline = f"{host}:{port_text}", time.monotonic() + timeout.total_seconds()

    def rank_0_gone() -> bool:  # asked in Python: torch's client logs every failed try, with a C++ stack
        try:
            socket.create_connection((host, int(port_text)), timeout=1).close()
            return False
        except OSError:
            return True

    def say_waiting():
        if world_size > 1:
            print(f"rank {rank}: waiting for the other {world_size - 1} rank(s) at {where}; start each with the same "
                  f"command (Ctrl-C stops this one)", file=sys.stderr, flush=True)

    if rank > 0:
        say_waiting()
    while rank > 0 and rank_0_gone():
        if time.monotonic() > deadline:
            raise PuzzleError(f"rank {rank}: rank 0 did not open the meeting point {where} within {timeout}; start "
                              f"rank 0 with the same MASTER_ADDR and MASTER_PORT")
        time.sleep(poll_s)
    try:
        store = dist.TCPStore(host, int(port_text), world_size, is_master=rank == 0, timeout=timedelta(seconds=5),
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        raise PuzzleError(f"rank {rank}: cannot {'serve' if rank == 0 else 'reach'} the ranks' meeting point {where} "
                          f"({first_line(e)[:160]}); "
                          f"{'give a free MASTER_PORT' if rank == 0 else 'check that rank 0 runs there'}") from e
    if rank == 0:
        say_waiting()
    keys, ready = [f"puzzle/meet/rank{r}" for r in range(world_size)], "puzzle/meet/ready"
    counted, keep_key = False, False
    try:
        store.set(keys[rank], str(world_size))  # this rank's WORLD_SIZE under its key
        while True:
            if rank > 0 and rank_0_gone():
                raise PuzzleError(f"rank {rank}: rank 0's meeting point {where} closed (rank 0 stopped: its own "
                                  f"message says why); start every rank again")
            try:
                sizes = {r: store.get(keys[r]) for r in range(world_size) if store.check([keys[r]])}
            except RuntimeError:  # get waits (the store's timeout) for a key a stopping rank took back meanwhile
                time.sleep(poll_s)
                continue
            # a value not (yet) whole, as a rank stopped mid-write can leave (CI saw b''), is no rank here
            sizes = {r: int(v) for r, v in sizes.items() if v.strip().isdigit()}
            here = sorted(sizes)
            if other := {r: n for r, n in sizes.items() if n != world_size}:
                keep_key = True  # the others see the mismatch too (and are refused, not left waiting)
                raise PuzzleError(f"rank {rank} was started with WORLD_SIZE={world_size}, but " + ", ".join(
                    f"rank {r} with WORLD_SIZE={n}" for r, n in sorted(other.items())) + "; start every rank with "
                    "the same WORLD_SIZE")
            if len(here) == world_size and not counted:
                store.add(ready, 1)
                counted = True
            if counted and store.add(ready, 0) >= world_size:
                return store
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in here] or ["(one that stopped meanwhile)"]
                raise PuzzleError(f"rank {rank}: rank(s) {', '.join(map(str, missing))} of {world_size} did not join "
                                  f"at {where} within {timeout}; start them with the same command and "
                                  f"MASTER_ADDR/MASTER_PORT, and this one again")
            time.sleep(poll_s)
    except BaseException:  # Ctrl-C, SIGTERM (as KeyboardInterrupt), a refusal: the others must not meet without it
        if not keep_key and (rank == 0 or not rank_0_gone()):
            with contextlib.suppress(Exception):
                if counted:
                    store.add(ready, -1)
                store.delete_key(keys[rank])
        raise


def joins_group(world_size: int) -> bool:
    """Whether this process is, or is about to be (`process_group`: MASTER_ADDR set, as torchrun sets it), one of a
    process group of `world_size` > 1 ranks that wait for each other (breaker: `in_group` asked before the group
    existed, or after it was gone, took torchrun's ranks for ranks started without it)."""
    return world_size > 1 and dist.is_available() and (dist.is_initialized() or "MASTER_ADDR" in os.environ)


def in_group(world_size: int) -> bool:
    """Whether this process is one of a process group of `world_size` > 1 ranks (torchrun with MASTER_ADDR)."""
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def check_ranks_agree(world_size: int, parts: dict, what: str) -> None:
    """Refuse, on every rank alike, when the ranks of a group hold different `parts` (name -> a picklable value,
    e.g. a sha256 of the settings, of the job list, of the tokens): each would work to its own plan (a library
    built for no single space, DDP replicas that drift apart or wait for each other forever). Nothing happens
    outside a group.

    Raises:
        PuzzleError: the parts that differ and the ranks holding each value.
    """
    if not in_group(world_size):
        return
    from .errors import PuzzleError

    every: list = [None] * world_size
    dist.all_gather_object(every, parts)
    differ = sorted(k for k in parts if len({repr(p.get(k)) for p in every}) > 1)
    if differ:
        by_rank = "; ".join(f"{k}: " + ", ".join(f"rank {r} {str(p.get(k))[:10]}" for r, p in enumerate(every))
                            for k in differ)
        raise PuzzleError(f"{what}: the {world_size} ranks were started with different {', '.join(differ)} "
                          f"({by_rank}); start every rank with the same command, flags, preset and data")


def every_rank_ok(world_size: int, ok: bool) -> bool:
    """Whether every rank of the group passed a check that each makes on its own (`ok`: this rank's outcome); `ok`
    itself outside a group. Every rank must call it, so that a rank refused alone stops the others at once instead
    of leaving them waiting in their next collective call."""
    if not in_group(world_size):
        return ok
    every: list = [None] * world_size
    dist.all_gather_object(every, bool(ok))
    return all(every)


def digests(meta: dict) -> dict:
    """A training's meta (`distill.gkd_meta`, `sft.sft_meta`) as `check_ranks_agree` compares it: a dict's entries
    by their dotted keys ("config.lr"), each value a short number or text as it is (so a refusal names it; breaker:
    "config: rank 0 d83efa2d98, rank 1 9b9ab7e0e4"), anything else as the sha256 of its JSON."""
    import hashlib
    import json

    def shown(value):
        plain = isinstance(value, (bool, int, float, str, type(None))) and len(repr(value)) <= 10
        return value if plain else hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {f"{k}.{sub}" if isinstance(v, dict) else k: shown(x)
            for k, v in meta.items() for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])}


def barrier_if_group(world_size: int, device=None) -> None:
    """Wait for every rank, when there is a process group of more than one rank."""
    if in_group(world_size):
        device = torch.device(device) if device is not None else local_device()
        if dist.get_backend() == "nccl" and device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()
