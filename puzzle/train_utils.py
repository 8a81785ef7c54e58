"""What the training stages (GKD, SFT) share: processes, learning-rate schedule, data order, checkpoints.

    DistEnv / init_distributed   rank and world size from torchrun's environment; gloo on CPU, NCCL on CUDA
    CausalLMForward              the module DDP / FSDP wrap: a PuzzleForCausalLM whose forward can also
                                 return every layer's output (GKD compares them with the parent's)
    lr_multiplier                linear warmup, then cosine decay to a floor
    global_batch                 the sequences of step k: a seeded permutation per epoch, so the order
                                 depends on (seed, step) only and a resumed run sees the same batches
    train_loop                   AdamW steps with gradient clipping, checkpoints at intervals (atomic:
                                 temp file + rename) holding the weights, the optimizer state, the step,
                                 the RNG state and the loss history; a rerun resumes from the last one

Data parallelism: each process takes an equal slice of every global batch and the gradients are
averaged (DDP), so with equal token counts per slice a world of W processes takes the same steps
as one process with the whole batch, up to float summation order. FSDP (`fsdp=True`,
`torch.distributed.fsdp.fully_shard` on every decoder layer and on the whole) shards weights,
gradients and optimizer state for a model that does not fit one device; checkpoints then hold
the gathered full state (weights by name, optimizer state by parameter name), and a run resumes
the way it started (with or without FSDP), with any number of processes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import PuzzleError, differing_settings, first_line, require_finite, require_learning_rate
from .io import atomic_write_bytes
from .modeling import PuzzleForCausalLM

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------------------
# processes


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank, world_size, local_rank: as torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.
        device: where this process computes (cuda:LOCAL_RANK when CUDA is used, else cpu).
        owns_group: `init_distributed` created the process group (`shutdown_distributed` leaves it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: the refusal of --fsdp outside a process group (`init_distributed` for the commands, `wrap_for_training` for code)
FSDP_NEEDS_GROUP = "FSDP needs a process group: start the command with torchrun (even --nproc_per_node 1)"


def init_distributed(device: str = "auto", fsdp: bool = False) -> DistEnv:
    """Read torchrun's environment (or RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by hand) and join its
    process group (gloo on CPU, NCCL on CUDA; `distributed.join_group`).

    Args:
        device: "cpu", "cuda" or "auto" (CUDA when available).
        fsdp: FSDP will shard the model: a group is made for one process too (torchrun --nproc_per_node 1).

    Returns:
        DistEnv; a single process (no RANK/WORLD_SIZE set) gets rank 0 of 1 and no process group.

    Raises:
        PuzzleError: device "cuda" without CUDA; several ranks, or fsdp, without MASTER_ADDR; see
            `distributed.env_rank_world` and `distributed.join_group`.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise PuzzleError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    from .distributed import env_rank_world, join_group

    rank, world, local = env_rank_world()
    if (world > 1 or fsdp) and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        raise PuzzleError(  # breaker: both ended in torch's traceback, --fsdp after the evaluation before training
            FSDP_NEEDS_GROUP if world == 1 else
            f"RANK={rank} WORLD_SIZE={world} without MASTER_ADDR: start the ranks with torchrun, or set MASTER_ADDR "
            "(rank 0's host) and MASTER_PORT (a free port there) for every rank")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = (world > 1 or fsdp) and not dist.is_initialized()
    if owns:
        join_group("nccl" if use_cuda else "gloo", rank, world)  # torch's timeout for the backend
    return DistEnv(rank, world, local, dev, owns_group=owns)


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group (a no-op for a single process). Called from a `finally`: on the way out of an error
    or an interrupt it leaves without the barrier, which the other ranks, still in a step's all-reduce, would never
    meet (breaker: Ctrl-C to one rank froze both until gloo's timeout); leaving closes this rank's connections, so
    theirs fail at once (`peer_lost`)."""
    if (env.distributed or env.owns_group) and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def peer_lost(env: DistEnv, error: BaseException, resumes: str = "from the last checkpoint") -> PuzzleError | None:
    """The PuzzleError to raise for `error` where another rank stopped (interrupted, refused, killed) and this rank's
    collective failed with it, else None. Its message says that a rerun resumes (`resumes`: from where) instead of
    showing gloo's or NCCL's traceback (breaker)."""
    text = str(error)
    if not env.distributed or not isinstance(error, RuntimeError) or not any(
            word in text for word in ("Connection closed by peer", "Connection reset by peer", "remote process exited",
                                      "communicator was aborted")):  # not any gloo/NCCL error: those of this rank stand
        return None
    what = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0]  # gloo's source path and advice cut
    return PuzzleError(f"rank {env.rank}: another rank stopped during a collective operation ({what}); its own "
                       f"message says why; the same command run again resumes {resumes}")


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """The mean of each value over all processes (the values themselves for one process)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist())}


# ------------------------------------------------------------------------------------------------
# the wrapped forward


class CausalLMForward(nn.Module):
    """A PuzzleForCausalLM as one module whose forward DDP and FSDP can hook.

    forward(input_ids (B, T), position_ids (B, T) | None, attention_mask | None, hidden_states=False,
    head=True) -> logits (B, T, V), or (logits, [L tensors (B, T, C)]) with each layer's output when
    hidden_states=True (logits None when head=False: the LM head is skipped). `attention_mask` is what the model's layers accept: (B, S) keep-mask or a
    (B, 1, T, S) boolean mask (puzzle.modeling.build_attention_mask).
    """

    def __init__(self, lm: PuzzleForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids=None, attention_mask=None, hidden_states: bool = False, head: bool = True):
        m = self.lm
        if position_ids is None:
            position_ids = m.positions(input_ids.shape, 0, input_ids.device)  # (B, T)
        h = m.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = m.rope(position_ids, h.dtype)  # (B, T, D) each
        outputs = []
        for layer in m.model.layers:
            h = layer(h, cos, sin, None, attention_mask)  # (B, T, C)
            if hidden_states:
                outputs.append(h)
        logits = m.head(h) if head else None  # (B, T, V)
        return (logits, outputs) if hidden_states else logits


def wrap_for_training(model: PuzzleForCausalLM, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """CausalLMForward(model), data-parallel over the process group.

    fsdp=False: DistributedDataParallel when world_size > 1 (the plain wrapper otherwise).
    fsdp=True: fully_shard on every decoder layer, then on the whole (FSDP2); `model`'s parameters
    become sharded DTensors in place, so read the trained weights back with `full_state_dict`.
    """
    wrapped = CausalLMForward(model.to(env.device))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not env.distributed and not dist.is_initialized():
            raise PuzzleError(FSDP_NEEDS_GROUP)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(wrapped)
        return wrapped
    if env.distributed and any(p.requires_grad for p in model.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(wrapped, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return wrapped


def unwrap(wrapped: nn.Module) -> PuzzleForCausalLM:
    inner = wrapped.module if hasattr(wrapped, "module") else wrapped
    return inner.lm


def full_state_dict(wrapped: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU under PuzzleForCausalLM names (a collective call under FSDP:
    every rank must call it; with FSDP only rank 0 gets the tensors, the others an empty dict)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("lm."): v for k, v in sd.items()}
    return {k: v.detach().to("cpu") for k, v in unwrap(wrapped).state_dict().items()}


# ------------------------------------------------------------------------------------------------
# schedule and data order


def lr_multiplier(step: int, total: int, warmup_fraction: float, min_lr_fraction: float) -> float:
    """Factor on the peak learning rate at 0-based `step` of `total`: linear warmup over
    warmup_fraction of the steps (at least one), then cosine decay to min_lr_fraction."""
    warm = max(1, int(round(warmup_fraction * total)))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr_fraction + (1 - min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def global_batch(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Item indices (batch_size,) int64 of 0-based `step`.

    The items are walked epoch after epoch, each epoch in the order of a permutation seeded by
    (seed, epoch); a batch that crosses an epoch boundary takes the rest from the next epoch. The
    result depends only on (step, batch_size, num_items, seed).
    """
    if num_items < 1:
        raise PuzzleError("no training sequences; give more training text")
    start = step * batch_size
    out, pos = [], start
    while len(out) < batch_size:
        epoch, offset = divmod(pos, num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch_size - len(out), num_items - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.int64)


def rank_slice(batch: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's contiguous share of a global batch (the batch size must divide by the world size)."""
    n = batch.shape[0]
    if n % env.world_size:
        raise PuzzleError(f"batch size {n} does not divide by {env.world_size} processes; choose a multiple")
    per = n // env.world_size
    return batch[env.rank * per:(env.rank + 1) * per]


# ------------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save(payload) to `path` atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint written by `save_checkpoint` (tensors and plain containers only: weights_only);
    `mmap`: tensors stay in the file until used (to read the settings of a large one).

    Raises:
        PuzzleError: unreadable file or another format.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # breaker: random bytes
        # breaker: an empty file read "cannot be read ()" (first_line gives the type's name then)
        why = "not a torch file of tensors" if isinstance(e, pickle.UnpicklingError) else first_line(e)
        raise PuzzleError(f"checkpoint {path} cannot be read ({why}); delete it to start over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise PuzzleError(f"checkpoint {path} has another format; delete it to start over")
    return ckpt


def _check_meta(path: Path, saved: dict, meta: dict, finished: bool = False) -> None:
    """Refuse a checkpoint of other settings or inputs than `meta`, naming them; `finished`: it is the end of a
    training, so nothing is to be resumed (breaker: a second gkd of the same child was told to resume)."""
    if saved != meta:
        keys = differing_settings(saved, meta)
        # a resume may change how often it checkpoints (`recorded_settings`): not among what must go back (breaker)
        run_only = {f"config.{k}" for k in RUN_ONLY_SETTINGS}
        keys = [k for k in keys if k.split(":")[0] not in run_only] or keys
        if finished:
            raise PuzzleError(f"{path.parent} holds the finished checkpoint of a training with other settings or "
                              f"inputs (differs in {keys}): give this training a work folder of its own (--work DIR), "
                              f"or delete {path} if that training's checkpoint is no longer needed")
        raise PuzzleError(f"checkpoint {path} was made with other settings or inputs (differs in {keys}); "
                          f"use the same settings to resume, or delete {path} (or choose another work folder: --work "
                          f"DIR) to start over")


def _check_resume(path: Path, ckpt: dict, meta: dict, total_steps: int, fsdp: bool) -> None:
    """Refuse a checkpoint `train_loop` cannot continue: other settings or inputs, FSDP or not, another step count."""
    _check_meta(path, ckpt["meta"], meta, finished=ckpt.get("step") == ckpt.get("total_steps"))
    if bool(ckpt.get("fsdp")) != fsdp:
        raise PuzzleError(f"checkpoint {path} was written {'with' if ckpt.get('fsdp') else 'without'} FSDP; "
                          "its optimizer state is laid out for that: resume the same way, or delete it")
    if ckpt["total_steps"] != total_steps:
        raise PuzzleError(f"checkpoint {path} plans {ckpt['total_steps']} steps, this run {total_steps}; "
                          "use the same settings or delete the checkpoint")


def check_resumable(checkpoint_path: Path | None, meta: dict, total_steps: int, fsdp: bool = False) -> None:
    """The checks `train_loop` makes of an existing checkpoint, made before any work or write (a command that would
    be refused there is refused first); nothing when there is no checkpoint. Reads the file memory-mapped: the
    pickled settings only, not the tensors (milliseconds for any size), so `train_loop` reads those once. (It does not
    take this copy: state loaded from a mapping would keep the file, and its disk space once a newer checkpoint
    replaces it, for the whole run, and the optimizer's state would be the mapped tensors themselves.)

    Raises:
        PuzzleError: an unreadable checkpoint, or one of other settings, inputs, FSDP layout or step count.
    """
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        _check_resume(Path(checkpoint_path), load_checkpoint(checkpoint_path, mmap=True), meta, total_steps, fsdp)


#: how gkd (--child) and sft (--model) checkpoints name an input model folder: by nothing but its weights hash
#: (the checkpoint's settings hold it), so a moved folder resumes; an earlier version recorded the path
FOLDER_SOURCE = "a model folder"


def recorded_source(checkpoint_path: Path, key: str, earlier: str, now: str) -> str:
    """The value of `key` in a checkpoint's settings to train with: `now`, or `earlier` when the checkpoint at
    `checkpoint_path` recorded that (an earlier version named the input model by its path there, which the
    checkpoint's weights hash of the model makes redundant), so that its training resumes, and its export counts
    as the same training, after an upgrade."""
    path = Path(checkpoint_path)
    if now == earlier or not path.is_file():
        return now
    try:
        meta = load_checkpoint(path, mmap=True).get("meta")
    except PuzzleError:
        return now  # unreadable: `check_resumable` says so
    return earlier if isinstance(meta, dict) and meta.get(key) == earlier else now


#: settings that say how a training is run, not what it trains, which a resume may change: how often it checkpoints,
#: and how many rows each forward takes (the same gradient up to rounding, so a resume may lower it where memory runs
#: short; breaker: refused as other settings)
RUN_ONLY_SETTINGS = ("checkpoint_every", "micro_batch_size")


def recorded_settings(checkpoint_path: Path, config: dict) -> dict:
    """`config` (a training's settings, `asdict(config)`) with the RUN_ONLY_SETTINGS its checkpoint recorded, where
    the checkpoint at `checkpoint_path` differs from it in those alone: put in the training's meta, a resume with
    another --checkpoint-every or --micro-batch-size continues that training (breaker: it was refused as other
    settings) and its export stays that training's (`export.training_ref`); checkpoints are then saved at the new
    interval, with the new rows per forward. `config` as
    given otherwise (no checkpoint, an unreadable one, or other settings that differ: `check_resumable` says so)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        return config
    try:
        saved = load_checkpoint(path, mmap=True).get("meta", {}).get("config")
    except (PuzzleError, AttributeError):
        return config
    if not isinstance(saved, dict) or set(saved) != set(config) or any(
            saved[k] != v for k, v in config.items() if k not in RUN_ONLY_SETTINGS):
        return config
    return {**config, **{k: saved[k] for k in RUN_ONLY_SETTINGS if k in saved}}


def with_earlier_training(summary: dict, path: Path, keys=("train_s", "resumed_from_step")) -> dict:
    """`summary` of a call that trained no step (all done by earlier calls, it only exported), with the training's
    own figures (`keys`) as the earlier call's record at `path` holds them, and "only_exported": True (breaker: a
    plain rerun wrote train_s 0 and resumed_from_step 59 over the training's 57 s from step 0). As it is where the
    earlier record is missing, unreadable or of another step count."""
    from .io import read_json_or_none

    earlier = read_json_or_none(path) if path.is_file() else None
    if isinstance(earlier, dict) and earlier.get("steps") == summary.get("steps"):
        summary = {**summary, **{k: earlier[k] for k in keys if k in earlier}}
    return {**summary, "only_exported": True}


def stalled_gradient_note(history, what: str) -> str | None:
    """A warning where the gradient norm was exactly 0 on the last steps of `history` (dicts or a DataFrame's records
    with "grad_norm"; at least 2 steps and the last quarter of them), else None: the loss saturated, typically after a
    learning rate high enough to push the logits into one flat or one-hot answer (breaker: sft at --lr 1e6 ended at
    ln(vocab), a uniform guess, with a zero gradient from step 2, and exported it as trained)."""
    norms = [r.get("grad_norm") for r in history]
    tail = norms[-max(2, len(norms) // 4):]
    if len(norms) < 2 or not all(isinstance(n, (int, float)) and n == 0 for n in tail):
        return None
    return (f"{what}: warning: the gradient was 0 on the last {len(tail)} of {len(norms)} steps, so the model stopped "
            f"learning: its loss saturated, as a learning rate far too high does; check its answers (`puzzle "
            f"generate`) and train again with a lower --lr")


def non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or ±inf, or None when all are finite."""
    return next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)


#: what gkd and sft write into a work folder (besides the hidden temp files of an interrupted write)
WORK_FILES = frozenset({"checkpoint.pt", "gkd.json", "sft.json", "toggle.csv", "eval_before.json",
                        "teacher_cache.safetensors"})


def check_work_folder(work, inputs=(), allowed_under=()) -> None:
    """Refuse a --work folder (checkpoints, logs) that would mix with other files, before any training:
    a file at or above it, a place inside an exported model folder, inside one of `inputs` (model folders,
    a run directory) or inside any puzzle run directory but its export/ and gkd/ folders, unless it
    is under one of `allowed_under` (e.g. RUN/gkd). `..` and symlinks are resolved first. Raises PuzzleError
    naming what to change."""
    from .export import is_export_folder
    from .io import file_in_the_way

    work = Path(work)
    if (work.exists() and not work.is_dir()) or file_in_the_way(work) is not None:
        raise PuzzleError(f"--work {work}: a file is in the way; give a folder path")
    where = work.expanduser().resolve()
    around = [where, *where.parents]
    if (export := next((p for p in around if p.is_dir() and is_export_folder(p)), None)) is not None:
        raise PuzzleError(f"--work {work} is inside the exported model {export}; give a folder of its own")
    if any(Path(a).expanduser().resolve() in around for a in allowed_under):
        _check_own_files(work)
        return
    for given in inputs:
        folder = Path(given).expanduser().resolve()
        if folder.is_dir() and folder in around:
            raise PuzzleError(f"--work {work} is inside the input {given}; give a folder of its own")
    # gkd --child X --work RUN wrote its checkpoint among the run's files; RUN/export and RUN/gkd take work folders
    if (run := next((p for p in around if _is_run_folder(p)), None)) is not None and not (
            {run / "export", run / "gkd"} & set(around)):
        raise PuzzleError(f"--work {work} is among the files of the run directory {run}; give a folder of its own, "
                          f"or one under {run / 'export'}")
    _check_own_files(work)


def _check_own_files(work: Path) -> None:
    """Refuse a work folder holding files other than WORK_FILES and hidden files (the temp files of killed writes,
    .nfs files of a checkpoint still open on NFS, .DS_Store) (breaker: `sft --work u` wrote checkpoint.pt and
    sft.json among a user's own files, and replaced theirs)."""
    ours = lambda p: p.name in WORK_FILES or p.name.startswith(".") and not p.is_dir()  # noqa: E731 (.git: no)
    if work.is_dir() and (foreign := sorted(p.name for p in work.iterdir() if not ours(p))):
        raise PuzzleError(f"--work {work} holds files no gkd or sft training wrote ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder, or an earlier "
                          f"training's work folder to resume it")


def _is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a puzzle run's config.json (`config.read_run_config_json` accepts it)."""
    from .config import read_run_config_json

    if not (folder / "config.json").is_file():
        return False
    try:
        read_run_config_json(folder)
    except (PuzzleError, OSError):
        return False
    return True


@dataclass(frozen=True)
class OptimSettings:
    """AdamW and schedule: peak lr, warmup then cosine decay to min_lr_fraction · lr, decoupled
    weight decay, global gradient-norm clip (0: off), betas."""

    lr: float
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        require_finite("optimizer", lr=self.lr, warmup_fraction=self.warmup_fraction,
                       min_lr_fraction=self.min_lr_fraction, weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        require_learning_rate("optimizer", self.lr, "lr")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise PuzzleError(f"weight_decay and grad_clip must be >= 0 (grad_clip 0: off); got "
                              f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}")
        if not (0 <= self.warmup_fraction <= 1 and 0 <= self.min_lr_fraction <= 1):
            raise PuzzleError(f"warmup_fraction and min_lr_fraction are fractions in [0, 1]; got "
                              f"{self.warmup_fraction} and {self.min_lr_fraction}")


@dataclass
class TrainResult:
    """What `train_loop` did.

    Attributes:
        model: the trained PuzzleForCausalLM with plain (unsharded) weights on CPU; on ranks other
            than 0 after FSDP training, None.
        history: one dict per step (step, lr, grad_norm and the step function's metrics, averaged
            over processes), including the steps of earlier interrupted runs.
        steps_done: optimizer steps taken in total; == total_steps when finished.
        resumed_from: the step the run continued from (0 for a fresh start).
        seconds: wall time of this call's steps.
    """

    model: PuzzleForCausalLM | None
    history: list[dict]
    steps_done: int
    total_steps: int
    resumed_from: int
    seconds: float

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.total_steps


def train_loop(model: PuzzleForCausalLM, step_fn, *, total_steps: int, optim: OptimSettings, env: DistEnv,
               checkpoint_path: Path | None, meta: dict, checkpoint_every: int = 50, fsdp: bool = False,
               progress: bool = False, desc: str = "train", on_step=None, stop_after_steps: int | None = None,
               ) -> TrainResult:
    """Train `model`'s parameters that require grad with AdamW, resuming from `checkpoint_path`.

    Args:
        model: the model to train (CPU); parameters with requires_grad=False stay frozen.
        step_fn: step_fn(wrapped, step) runs forward and backward for 0-based `step` (its share of
            the global batch on this rank; `wrapped` is what wrap_for_training returned) and returns
            a dict of float metrics, including "loss".
        total_steps: optimizer steps of the whole run.
        checkpoint_path: where checkpoints go (None: never saved, never resumed). An existing
            checkpoint made with the same `meta` is resumed; another `meta` is refused.
        meta: JSON-like description of the settings and inputs; must match to resume.
        checkpoint_every: save after every this many steps, and after the last one.
        on_step: on_step(step_done, record) after each step and its checkpoint (an exception there
            ends training, like a kill would; a KeyboardInterrupt there is Ctrl-C, which checkpoints
            the step first, as anywhere in the loop).
        stop_after_steps: stop (after a checkpoint) once this call has taken this many steps; the
            next call continues. Results equal an uninterrupted run's.

    Returns:
        TrainResult.

    Raises:
        PuzzleError: a loss that is not finite (lower the learning rate), a checkpoint made with
            other settings.
    """
    ckpt = None
    if checkpoint_path is not None and env.is_main:  # only this rank writes it: a temp copy now is a killed write's
        for tmp in Path(checkpoint_path).parent.glob(f".{Path(checkpoint_path).name}.*.tmp"):
            tmp.unlink(missing_ok=True)  # (reviewer: SIGTERM/SIGKILL mid-save left a model + optimizer copy for good)
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        ckpt = load_checkpoint(checkpoint_path)
        _check_resume(checkpoint_path, ckpt, meta, total_steps, fsdp)
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise PuzzleError(f"checkpoint {checkpoint_path} holds another model's weights; delete it to start over")
    wrapped = wrap_for_training(model, env, fsdp)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise PuzzleError("nothing to train: every parameter is frozen")
    fused = not fsdp and env.device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=fused)
    start, history = 0, []
    if ckpt is not None:
        _load_optimizer(wrapped, opt, ckpt["optimizer"], fsdp)
        set_rng_state(ckpt["rng"][env.rank] if env.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start, history = int(ckpt["step"]), list(ckpt["history"])

    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=desc, unit="step")
    t0, step = time.perf_counter(), start
    # the step the checkpoint holds; the RNG after `step` (a distributed run saves no checkpoint on Ctrl-C)
    saved, done_rng, updating = start, None if env.distributed else rng_state(), False
    wrapped.train()
    try:
        while step < total_steps and (stop_after_steps is None or step - start < stop_after_steps):
            mult = lr_multiplier(step, total_steps, optim.warmup_fraction, optim.min_lr_fraction)
            for g in opt.param_groups:
                g["lr"] = optim.lr * mult
            opt.zero_grad(set_to_none=True)
            metrics = step_fn(wrapped, step)
            if not math.isfinite(metrics["loss"]):
                if step == 0:  # no update yet: the learning rate is not the cause (breaker: --lm-weight 1e38)
                    raise PuzzleError(f"{desc}: the loss is {metrics['loss']} at the first step, before any update: "
                                      f"check the loss weights (too large to add up) and that the model's outputs are "
                                      f"finite")
                raise PuzzleError(f"{desc}: the loss became {metrics['loss']} at step {step + 1}; lower the learning rate")
            norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
                norm = norm.full_tensor()
            with _interrupt_after():  # the update and its count as one: a Ctrl-C here waits (breaker: 2 of 12
                # Ctrl-Cs fell inside the update and lost their steps)
                updating = True  # from here until the step is counted, weights and step number disagree
                opt.step()
                step += 1
                record = {"step": step, "lr": optim.lr * mult, "grad_norm": float(norm),
                          **mean_over_ranks(metrics, env)}
                history.append(record)
                updating, done_rng = False, None if env.distributed else rng_state()
            if checkpoint_path is not None and (step % max(1, checkpoint_every) == 0 or step == total_steps
                                                or (stop_after_steps is not None and step - start == stop_after_steps)):
                _save(checkpoint_path, wrapped, opt, step, total_steps, meta, history, env, fsdp)
                saved = step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if on_step is not None:
                on_step(step, record)
    except KeyboardInterrupt as e:  # reviewer: Ctrl-C lost up to checkpoint_every - 1 steps and said nothing was lost
        e.puzzle_note = _save_on_interrupt(checkpoint_path, wrapped, opt, step, saved, total_steps, meta, history, env,
                                           fsdp, desc, done_rng, updating)
        raise
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    wrapped.eval()
    if fsdp:
        from .parent import model_from_state_dict

        sd = full_state_dict(wrapped, fsdp=True)
        trained = model_from_state_dict(model.config, sd, next(iter(sd.values())).dtype) if env.is_main else None
    else:
        trained = unwrap(wrapped).to("cpu")
    if trained is not None:  # the last update is after the last loss check: never export NaN weights
        if (broken := non_finite_parameter(trained)) is not None:
            raise PuzzleError(f"{desc}: the weights became non-finite ({broken}) by step {step}; lower the learning "
                              f"rate (nothing was exported; delete the checkpoint to start over)")
    return TrainResult(trained, history, step, total_steps, start, seconds)


def _optimizer_state(wrapped, opt, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def _load_optimizer(wrapped, opt, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def _gather_rng(env: DistEnv) -> list:
    if not env.distributed:
        return [rng_state()]
    states = [None] * env.world_size
    dist.all_gather_object(states, rng_state())
    return states


@contextlib.contextmanager
def _interrupt_after():
    """Hold a Ctrl-C (SIGINT with Python's default handler, main thread only) until the block ends, then raise it:
    the block runs whole. Elsewhere (another handler, a thread) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _save_on_interrupt(path, wrapped, opt, step: int, saved: int, total_steps: int, meta, history, env: DistEnv,
                       fsdp: bool, desc: str, done_rng: dict, updating: bool) -> str:
    """After Ctrl-C in `train_loop`: checkpoint the last finished step when that is safe, and say what a rerun
    resumes from (the message `cli.main` prints).

    Safe means one process (ranks of a distributed run stop at different points, and the save is a collective)
    and not inside the optimizer update (weights and step count would disagree). The RNG goes back to its state
    after the last finished step, so a resumed run equals an uninterrupted one. A second Ctrl-C during this save
    leaves the checkpoint before it (the write is atomic)."""
    if path is None:
        return f"{desc} keeps no checkpoint here, so a rerun trains from the start"
    if step > saved and not updating and not env.distributed:
        set_rng_state(done_rng)
        try:
            _save(path, wrapped, opt, step, total_steps, meta, history, env, fsdp)
            saved = step
        except Exception as e:  # noqa: BLE001 -- a full disk: the interrupt stands, and the note says what was lost
            # (reviewer: the OSError replaced the KeyboardInterrupt and the CLI said finished work was saved)
            failed = f"; saving step {step} failed ({e})"
            if saved == 0:
                return f"{desc} stopped before its first step was saved{failed}, so a rerun trains from the start"
            return (f"{desc}: checkpoint at step {saved} of {total_steps}{failed}, so {step - saved} step(s) are "
                    f"lost; rerun the same command to resume")
    if saved == 0:
        return f"{desc} stopped before its first step was saved, so a rerun trains from the start"
    lost = f" ({step - saved} step(s) after it are lost)" if step > saved else ""
    return f"{desc}: checkpoint at step {saved} of {total_steps}{lost}; rerun the same command to resume"


def _save(path, wrapped, opt, step, total_steps, meta, history, env: DistEnv, fsdp: bool) -> None:
    """Write a checkpoint from rank 0 (every rank takes part in gathering the state)."""
    model_state = full_state_dict(wrapped, fsdp)
    optimizer_state = _optimizer_state(wrapped, opt, fsdp)
    rngs = _gather_rng(env)
    if env.is_main:
        save_checkpoint(Path(path), {"model": model_state, "optimizer": optimizer_state, "step": step,
                                     "total_steps": total_steps, "meta": meta, "history": history, "rng": rngs,
                                     "world_size": env.world_size, "fsdp": fsdp})
    barrier(env)
