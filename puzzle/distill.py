"""Global knowledge distillation (GKD): the assembled child learns to reproduce the parent end to end.

After the search, the child's blocks were each trained alone (BLD) on the parent's activations;
put together they drift from the parent. GKD trains the whole child on calibration text with the
parent as the teacher (Puzzle, Bercovich et al. 2024, Sec. 5 and its ablation of the loss terms):

    L = w_cos · Σ_l mean_tokens (1 − cos(h_parent^l, h_child^l))          hidden states after layer l
      + w_kl  · τ² · mean_tokens KL(softmax(z_parent/τ) || softmax(z_child/τ))
      + w_lm  · mean_tokens CE(z_child, next token)                         off by default

The child has the parent's depth, so layer l of one is compared with layer l of the other, no_op
layers included (their output is still the residual stream). The paper found that adding the LM
cross-entropy hurts, so w_lm = 0 by default; τ² keeps the KL gradient's scale independent of the
temperature (Hinton et al. 2015, "Distilling the knowledge in a neural network", Sec. 2).

The teacher runs on the fly (under no_grad, in the same step, on the same batch) or its logits
come from a cache on disk written once per (parent, tokens): the top-k logits and the
log-sum-exp of every position. With a cache the KL is taken over the k cached tokens plus one
bucket for the rest of the vocabulary, exact for that partition of the vocabulary and a lower
bound of the full KL (equal when k = V). The hidden-state term still needs the parent's layers
(not its LM head); with w_cos = 0 and a cache the parent is not run at all.

Steps, checkpoints, resume and data parallelism are `train_utils.train_loop`: the batches of step k
depend only on (seed, k), each process takes an equal slice of every batch, and a resumed run
takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import PuzzleError, require_finite, require_learning_rate
from .io import atomic_save_safetensors, atomic_write_json, dir_arg, read_json, tensor_sha256
from .modeling import PuzzleForCausalLM
from .runlock import WORK_ADVICE, also_lock
from .scoring.quality import position_kl
from .train_utils import (FOLDER_SOURCE, CausalLMForward, DistEnv, OptimSettings, TrainResult, barrier,
                          check_resumable, check_work_folder, global_batch, init_distributed, peer_lost,
                          rank_slice, recorded_settings, recorded_source, shutdown_distributed, train_loop,
                          with_earlier_training)

TEACHERS = ("online", "cache")
AMP_DTYPES = ("float32", "bfloat16")


#: temperatures GKD takes: the logits are divided by tau and the loss multiplied by tau**2, so values far outside
#: the usual 1 to 20 (Hinton et al. 2015) only overflow or flatten every distribution
TEMPERATURE_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class GKDConfig:
    """Settings of global knowledge distillation.

    Attributes:
        tokens: training tokens over all processes (steps = tokens // (batch_size · T), at least 1);
            more than the data holds walks it again in a new order (epochs).
        batch_size: sequences per optimizer step, over all processes (a multiple of the process count).
        micro_batch_size: sequences per forward/backward on one process (0: its whole share at once);
            gradients accumulate over micro-batches.
        lr, warmup_fraction, min_lr_fraction, weight_decay, grad_clip: AdamW with linear warmup and
            cosine decay to min_lr_fraction · lr; grad_clip is the global norm (0: off).
        cosine_weight, kl_weight, lm_weight: w_cos, w_kl, w_lm of the loss (module docstring).
        temperature: τ of the KL term.
        freeze_embeddings: keep the token embedding (and a tied LM head) fixed: the child keeps the
            parent's read-in and read-out, and the step skips the (V, C) gradient and update.
        teacher: "online" (parent forward in every step) or "cache" (top-k logits from disk).
        top_k: logits per position kept in the cache.
        checkpoint_every: steps between checkpoints.
        amp_dtype: "float32", or "bfloat16" to run forward and backward under torch.autocast
            (weights and optimizer stay fp32).
        seed: data order.
    """

    tokens: int = 50_000
    batch_size: int = 4
    micro_batch_size: int = 0
    lr: float = 2e-4
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cosine_weight: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    freeze_embeddings: bool = True
    teacher: str = "online"
    top_k: int = 64
    checkpoint_every: int = 25
    amp_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite("gkd", temperature=self.temperature, cosine_weight=self.cosine_weight,
                       kl_weight=self.kl_weight, lm_weight=self.lm_weight)
        require_learning_rate("gkd", self.lr)
        self.optim()  # lr, warmup, decay, clip: finite and in range
        for name, least in (("tokens", 1), ("batch_size", 1), ("micro_batch_size", 0)):  # named as the flag
            if getattr(self, name) < least:
                raise PuzzleError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        if self.checkpoint_every < 1:
            raise PuzzleError(f"gkd checkpoint_every must be >= 1 step, got {self.checkpoint_every}")
        if self.temperature <= 0:
            raise PuzzleError(f"gkd temperature must be positive, got {self.temperature}")
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:  # 1e200: tau**2 overflows
            raise PuzzleError(f"gkd temperature must be from {TEMPERATURE_RANGE[0]} to {TEMPERATURE_RANGE[1]} (usual: "
                              f"1 to 20), got {self.temperature}")
        if min(self.cosine_weight, self.kl_weight, self.lm_weight) < 0 or \
                self.cosine_weight + self.kl_weight + self.lm_weight == 0:
            raise PuzzleError("gkd loss weights must be >= 0 and not all 0 (cosine_weight, kl_weight, lm_weight)")
        if self.teacher not in TEACHERS:
            raise PuzzleError(f"gkd teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.top_k < 1:
            raise PuzzleError(f"gkd top_k must be >= 1, got {self.top_k}")
        if self.amp_dtype not in AMP_DTYPES:
            raise PuzzleError(f"gkd amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")

    def optim(self) -> OptimSettings:
        return OptimSettings(self.lr, self.warmup_fraction, self.min_lr_fraction, self.weight_decay, self.grad_clip)

    def steps(self, seq_len: int) -> int:
        return max(1, self.tokens // (self.batch_size * seq_len))


# ------------------------------------------------------------------------------------------------
# loss terms


def hidden_cosine_loss(parent_hidden: list[torch.Tensor], child_hidden: list[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of the mean over tokens of 1 − cos(h_parent, h_child); a scalar.

    Args:
        parent_hidden, child_hidden: L tensors (B, T, C) each, the output of every layer.
    """
    if len(parent_hidden) != len(child_hidden):
        raise PuzzleError(f"parent has {len(parent_hidden)} layers, child {len(child_hidden)}: GKD compares layer by layer")
    total = child_hidden[0].new_zeros((), dtype=torch.float32)
    for hp, hc in zip(parent_hidden, child_hidden):
        total = total + (1 - F.cosine_similarity(hc.float(), hp.float(), dim=-1)).mean()
    return total


def kl_full(parent_logits: torch.Tensor, child_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean over positions of KL(softmax(z_p/τ) || softmax(z_c/τ)), nats; logits (B, T, V)."""
    logp = F.log_softmax(parent_logits.float() / temperature, dim=-1)  # (B, T, V)
    logq = F.log_softmax(child_logits.float() / temperature, dim=-1)
    return position_kl(logq, logp).mean() * temperature ** 2


def kl_topk(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, child_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean KL over the partition {top-k tokens, everything else} of the vocabulary.

    Args:
        values: (B, T, k) the parent's top-k logits (raw, before the temperature).
        indices: (B, T, k) their token ids (int64 or int32).
        lse: (B, T) log Σ_v exp(z_parent,v / τ) over the whole vocabulary.
        child_logits: (B, T, V).

    Returns:
        A scalar (nats). Grouping tokens can only lower a KL (log-sum inequality), so this is a lower
        bound of `kl_full`; with k = V it equals it.
    """
    logp = values.float() / temperature - lse.float()[..., None]  # (B, T, k)
    logq_all = F.log_softmax(child_logits.float() / temperature, dim=-1)  # (B, T, V)
    logq = logq_all.gather(-1, indices.long())  # (B, T, k)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)  # (B, T)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + torch.where(p_rest > 1e-9, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(kl))
    return kl.mean() * temperature ** 2


def lm_loss(child_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of (B, T, V) logits on (B, T) ids."""
    return F.cross_entropy(child_logits[:, :-1].float().reshape(-1, child_logits.shape[-1]), ids[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------------------------
# teacher cache


@dataclass(frozen=True)
class TeacherCache:
    """The parent's top-k logits on the training tokens.

    Attributes:
        values: (N, T, k) fp32 logits; indices: (N, T, k) int32 token ids; lse: (N, T) fp32
        log-sum-exp of z/τ over the vocabulary; meta: parent fingerprint, tokens sha256, top_k, τ.
    """

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    meta: dict


def tokens_sha(ids: torch.Tensor) -> str:
    return tensor_sha256(ids)[:16]


def model_fingerprint(model: PuzzleForCausalLM) -> str:
    """sha256 (16 hex) of the config and every weight: changes whenever the model does. The config's
    `extra` (where the model was loaded from, spelled as given) is left out: one folder is one model."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def build_teacher_cache(parent: PuzzleForCausalLM, ids: torch.Tensor, top_k: int, temperature: float, path: Path,
                        chunk: int = 2, progress: bool = False) -> TeacherCache:
    """Run the parent over (N, T) ids and store its top-k logits and log-sum-exp at `path` (safetensors).

    Disk: N·T·(8k + 4) bytes (k = 64: 516 bytes per token). Returns the cache.
    """
    parent.eval()
    N, T = ids.shape
    values = torch.empty(N, T, top_k, dtype=torch.float32)
    indices = torch.empty(N, T, top_k, dtype=torch.int32)
    lse = torch.empty(N, T, dtype=torch.float32)
    starts = range(0, N, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="teacher cache", unit="chunk")
    for s in starts:
        logits = parent(ids[s:s + chunk]).float()  # (b, T, V)
        top = logits.topk(top_k, dim=-1)
        values[s:s + chunk], indices[s:s + chunk] = top.values, top.indices.int()
        lse[s:s + chunk] = torch.logsumexp(logits / temperature, dim=-1)
    meta = {"parent": model_fingerprint(parent), "tokens": tokens_sha(ids), "top_k": top_k, "temperature": temperature,
            "vocab_size": parent.config.vocab_size}
    atomic_save_safetensors({"values": values, "indices": indices, "lse": lse}, path, metadata={"meta": json.dumps(meta)})
    return TeacherCache(values, indices, lse, meta)


def load_teacher_cache(path: Path, expect: dict) -> TeacherCache | None:
    """The cache at `path` if it was made for `expect` (parent, tokens, top_k, temperature), else None."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            if meta != expect:
                return None
            return TeacherCache(f.get_tensor("values"), f.get_tensor("indices"), f.get_tensor("lse"), meta)
    except (SafetensorError, OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------
# training


def check_pair(parent: PuzzleForCausalLM, child: PuzzleForCausalLM) -> None:
    """Raise PuzzleError unless the child can be distilled from the parent layer by layer."""
    p, c = parent.config, child.config
    for name in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(p, name) != getattr(c, name):
            raise PuzzleError(f"the child's {name} is {getattr(c, name)}, the parent's {getattr(p, name)}: "
                              "GKD needs a child of the same depth, width and vocabulary as its parent")


def _autocast(amp_dtype: str, device: torch.device):
    if amp_dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _step_fn(parent_fwd, ids: torch.Tensor, cache: TeacherCache | None, cfg: GKDConfig, env: DistEnv):
    """The train_loop step: GKD loss on this rank's share of the step's batch, micro-batch by micro-batch."""
    def step(wrapped, k: int) -> dict:
        mine = rank_slice(global_batch(k, cfg.batch_size, ids.shape[0], cfg.seed), env)
        mb = cfg.micro_batch_size or len(mine)
        parts = [mine[s:s + mb] for s in range(0, len(mine), mb)]
        sums = {"loss": 0.0, "cosine_loss": 0.0, "kl_nats": 0.0, "lm_loss": 0.0}
        for j, idx in enumerate(parts):
            x = ids[idx].to(env.device)  # (b, T)
            scale = len(idx) / len(mine)
            need_hidden = cfg.cosine_weight > 0
            with torch.no_grad(), _autocast(cfg.amp_dtype, env.device):
                if cache is None:
                    p_logits, p_hidden = parent_fwd(x, hidden_states=True) if need_hidden else (parent_fwd(x), None)
                else:
                    p_logits = None
                    p_hidden = parent_fwd(x, hidden_states=True, head=False)[1] if need_hidden else None
            last = j == len(parts) - 1
            sync = nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: reduce gradients on the last micro-batch
                wrapped.set_requires_gradient_sync(last)
            with sync:
                with _autocast(cfg.amp_dtype, env.device):
                    c_logits, c_hidden = wrapped(x, hidden_states=True)
                terms = {}
                if need_hidden:
                    terms["cosine_loss"] = hidden_cosine_loss(p_hidden, c_hidden)
                if cfg.kl_weight > 0:
                    if cache is None:
                        terms["kl_nats"] = kl_full(p_logits, c_logits, cfg.temperature)
                    else:
                        terms["kl_nats"] = kl_topk(cache.values[idx].to(env.device), cache.indices[idx].to(env.device),
                                                   cache.lse[idx].to(env.device), c_logits, cfg.temperature)
                if cfg.lm_weight > 0:
                    terms["lm_loss"] = lm_loss(c_logits, x)
                loss = (cfg.cosine_weight * terms.get("cosine_loss", 0.0) + cfg.kl_weight * terms.get("kl_nats", 0.0)
                        + cfg.lm_weight * terms.get("lm_loss", 0.0))
                (loss * scale).backward()
            sums["loss"] += float(loss.detach()) * scale
            for name, v in terms.items():
                sums[name] += float(v.detach()) * scale
        return sums

    return step


def _teacher_forward(parent: PuzzleForCausalLM, env: DistEnv, fsdp: bool):
    parent = parent.to(env.device).eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    fwd = CausalLMForward(parent)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in parent.model.layers:
            fully_shard(layer)
        fully_shard(fwd)
    return fwd


@dataclass
class GKDResult:
    """Training result (`train_utils.TrainResult`) and what the run saw."""

    train: TrainResult
    tokens_trained: int
    epochs: float
    tok_s: float

    @property
    def model(self):
        return self.train.model


def gkd_meta(config: GKDConfig, parent: PuzzleForCausalLM, child: PuzzleForCausalLM, ids: torch.Tensor,
             extra_meta: dict | None = None) -> dict:
    """What a GKD checkpoint must match to be resumed: settings, parent, child (before training), tokens, extras."""
    return {"stage": "gkd", "config": asdict(config), "parent": model_fingerprint(parent),
            "child": model_fingerprint(child), "tokens": tokens_sha(ids), **(extra_meta or {})}


def distill(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, ids: torch.Tensor, config: GKDConfig, work_dir,
            *, env: DistEnv | None = None, fsdp: bool = False, progress: bool = False, on_step=None,
            stop_after_steps: int | None = None, extra_meta: dict | None = None) -> GKDResult:
    """Global knowledge distillation of `child` from `parent` on (N, T) int64 calibration tokens.

    Args:
        child: the model to train (same depth, width and vocabulary as the parent); trained in place
            unless fsdp=True (then use the result's model).
        parent: the teacher; not changed. Only its layers run in cache mode with cosine_weight > 0,
            nothing of it with cosine_weight = 0.
        ids: training tokens; sequences are taken in a seeded order, epoch after epoch.
        work_dir: holds checkpoint.pt and teacher_cache.safetensors; an existing checkpoint of the
            same settings and inputs is resumed.
        env: processes (init_distributed()); default a single process.
        fsdp: shard child (and teacher) with FSDP2 (needs a process group: run under torchrun).
        on_step, stop_after_steps: see train_utils.train_loop.
        extra_meta: more JSON-ready facts that must match for a resume (e.g. the child's name).

    Returns:
        GKDResult: the trained child (rank 0), the loss history, tokens trained, epochs, tokens/s.

    Raises:
        PuzzleError: a child that does not match the parent, too little data, a diverging loss, a
            checkpoint of other settings.
    """
    env = env or DistEnv()
    check_pair(parent, child)
    work_dir = Path(work_dir)
    N, T = ids.shape
    steps = config.steps(T)
    if config.batch_size % env.world_size:
        raise PuzzleError(f"batch size {config.batch_size} does not divide by {env.world_size} processes")
    meta = gkd_meta(config, parent, child, ids, extra_meta)
    check_resumable(work_dir / "checkpoint.pt", meta, steps, fsdp)  # before the teacher cache is (re)built
    cache = None
    if config.teacher == "cache" and config.kl_weight > 0:
        top_k = min(config.top_k, parent.config.vocab_size)  # a larger --top-k keeps the whole vocabulary
        expect = {"parent": model_fingerprint(parent), "tokens": tokens_sha(ids), "top_k": top_k,
                  "temperature": config.temperature, "vocab_size": parent.config.vocab_size}
        path = work_dir / "teacher_cache.safetensors"
        if env.is_main and load_teacher_cache(path, expect) is None:
            build_teacher_cache(parent, ids, top_k, config.temperature, path,
                                progress=progress)
        barrier(env)
        cache = load_teacher_cache(path, expect)
    for p in child.parameters():
        p.requires_grad_(True)
    if config.freeze_embeddings:
        child.model.embed_tokens.weight.requires_grad_(False)
        child.lm_head.weight.requires_grad_(False)
    parent_fwd = None
    if config.teacher == "online" or config.cosine_weight > 0:
        parent_fwd = _teacher_forward(parent, env, fsdp)  # FSDP shards the parent in place: after the fingerprints
    result = train_loop(child, _step_fn(parent_fwd, ids, cache, config, env), total_steps=steps, optim=config.optim(),
                        env=env, checkpoint_path=work_dir / "checkpoint.pt", meta=meta,
                        checkpoint_every=config.checkpoint_every, fsdp=fsdp, progress=progress, desc="gkd",
                        on_step=on_step, stop_after_steps=stop_after_steps)
    if result.model is not None:
        for p in result.model.parameters():
            p.requires_grad_(False)
    tokens_trained = result.steps_done * config.batch_size * T
    done_now = (result.steps_done - result.resumed_from) * config.batch_size * T
    return GKDResult(result, tokens_trained, tokens_trained / ids.numel(), done_now / max(result.seconds, 1e-9))


# ------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_against_parent(model: PuzzleForCausalLM, eval_ids: torch.Tensor, parent_logp: torch.Tensor,
                            chunk: int = 2) -> dict:
    """Evaluation KL(parent || model) (nats/token), LM loss (nats/token) and top-1 agreement on (N, T) ids.

    `parent_logp` is the parent's (N, T, V) fp32 log-probabilities (scoring.quality.parent_logprobs).
    """
    from .scoring.quality import evaluate_model

    return evaluate_model(model.eval(), eval_ids, parent_logp, chunk=chunk)


def recovery_fraction(kl_before: float, kl_after: float) -> float:
    """(KL_before − KL_after) / KL_before: the share of the child's evaluation KL that GKD removed."""
    return (kl_before - kl_after) / kl_before if kl_before > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# inputs: a run directory's child, or an exported folder


@dataclass
class GKDInputs:
    """What `puzzle gkd` trains: the child and its teacher, training and evaluation tokens, and names."""

    child: PuzzleForCausalLM
    parent: PuzzleForCausalLM
    tokenizer: object
    train_ids: torch.Tensor
    eval_ids: torch.Tensor | None
    parent_eval_logp: object  # a callable returning (N, T, V) log-probs, evaluated only when needed
    dest: Path
    work: Path
    description: dict
    child_source: str = ""  # the child as the work folder's checkpoint records it (independent of dest and, for a
    # folder, of its path: train_utils.FOLDER_SOURCE, as the checkpoint's "child" hashes its weights)
    save_data: object = None  # writes re-packed training splits (RUN/gkd/data-*) once every check has passed


def run_train_tokens(run, calib_tokens: int | None = None, max_doc_tokens: int | None = None,
                     progress: bool = False) -> tuple[torch.Tensor, str, object]:
    """GKD training tokens of a run directory: its calibration split, or with `calib_tokens` / `max_doc_tokens`
    its calibration sources re-packed (under RUN/gkd/data-<settings>; documents disjoint from scoring and
    evaluation, which must stay as the run packed them).

    Returns:
        ((N, T) int64 tokens, a sentence saying which, a callable that saves a re-pack or None).

    Raises:
        PuzzleError: fewer tokens than one sequence, a negative `max_doc_tokens`, or a re-pack that would change
            the evaluation split.
    """
    from .data import pack_eval_split, prepare_data, write_token_splits

    save_data = None
    train_ids = run.tokens.calib
    data_note = f"the run's calibration split ({train_ids.shape[0]} x {train_ids.shape[1]} tokens)"
    if calib_tokens is not None or max_doc_tokens is not None:
        seq_len = run.config.data.seq_len
        if calib_tokens is not None and calib_tokens < seq_len:  # not DataConfig's "... raise it"
            raise PuzzleError(f"--calib-tokens {calib_tokens} is less than one sequence (the run's seq_len "
                              f"{seq_len}); give --calib-tokens {seq_len} or more")
        if max_doc_tokens is not None and max_doc_tokens < 0:  # _tokenized would read it as 0 (whole documents)
            raise PuzzleError(f"--max-doc-tokens {max_doc_tokens} is negative; give 0 (whole documents) or a "
                              f"positive number of tokens per document")
        changes = {"calib_tokens": calib_tokens or run.config.data.calib_tokens}
        if max_doc_tokens is not None:
            changes["max_doc_tokens"] = max_doc_tokens
        data_cfg = dataclasses.replace(run.config.data, **changes)
        # the evaluation split depends on the evaluation sources and max_doc_tokens alone: checked before
        # RUN/gkd/data-* (or parent samples for it) is written
        if data_cfg.max_doc_tokens != run.config.data.max_doc_tokens:
            run_eval = run.tokens.eval  # first: a missing or changed evaluation source is named there
            try:
                changed = not torch.equal(pack_eval_split(data_cfg, run.parent.tokenizer), run_eval)
            except PuzzleError:  # cut so short that the evaluation documents no longer fill one sequence
                changed = True
            if changed:
                raise PuzzleError(f"--max-doc-tokens {max_doc_tokens} would change the evaluation split (it cuts "
                                  f"the evaluation documents too); keep the run's max_doc_tokens "
                                  f"({run.config.data.max_doc_tokens}) or re-pack with --calib-tokens N alone")
        # one folder per re-pack setting: a re-pack with other settings (even a refused one) neither grows the
        # parent samples nor changes the tokens of another, so each setting's checkpoint stays resumable
        folder = run.out / "gkd" / ("data-" + "-".join(f"{k}{v}" for k, v in sorted(changes.items())))
        tokens = prepare_data(data_cfg, run.parent.tokenizer, folder, progress=progress,
                              resolved=run.generated_sources(data_cfg, folder), write=False)
        if not torch.equal(tokens.eval, run.tokens.eval):  # nothing written yet (write=False)
            raise PuzzleError("re-packing the calibration sources changed the evaluation split; "
                              "keep seq_len and the evaluation settings of the run")
        if not tokens.reloaded:
            save_data = lambda: write_token_splits(tokens, folder)  # noqa: E731
        train_ids = tokens.calib
        data_note = (f"the run's calibration sources re-packed with {changes} ({train_ids.shape[0]} x "
                     f"{train_ids.shape[1]} tokens, documents disjoint from scoring and evaluation)")
    return train_ids, data_note, save_data


def _run_inputs(args, progress: bool, log) -> GKDInputs:
    from .config import load_run_config
    from .pipeline import Run, build_child, check_run_dest, parent_eval_logprobs, read_architecture

    from .export import check_export_target, export_provenance, run_ref

    run = Run(args.out, load_run_config(args.out), progress=progress, log=log)
    record = read_architecture(run, args.name)
    dest = args.dest or run.out / "export" / f"{args.name}-gkd"
    check_run_dest(run.out, dest)
    work = args.work or run.out / "gkd" / args.name
    for folder in (work, dest):  # the same child twice at once (the run's lock is shared by gkd and sft)
        also_lock(folder, WORK_ADVICE)
    child_ref = f"{args.name} of run {run_ref(run.out, dest)}"  # the run relative to dest when dest is inside it
    check_export_target(Path(dest), overwrite=True, keep=[*run.input_paths(), work],  # before loading and training
                        provenance=export_provenance({"gkd": {"child": child_ref}}), training_pending=True, work=work)
    check_work_folder(work, [run.out], [run.out / "gkd"])
    # loading the parent and the run's splits writes nothing to the run (pipeline.Run): a refusal leaves it as it was
    child = build_child(run, record)
    train_ids, data_note, save_data = run_train_tokens(run, args.calib_tokens, args.max_doc_tokens, progress)
    return GKDInputs(child, run.parent.model, run.parent.tokenizer, train_ids, run.tokens.eval,
                     lambda: parent_eval_logprobs(run),
                     Path(dest), Path(work),
                     {"child": child_ref, "parent": run.parent.source, "train_data": data_note,
                      "eval_data": f"the run's evaluation split ({', '.join(run.config.data.eval_sources)})"},
                     child_source=f"{args.name} of run {run_ref(run.out, work)}",  # a moved run resumes too
                     save_data=save_data)


def pack_sources(sources, tokenizer, seq_len: int, max_tokens: int, max_doc_tokens: int = 0,
                 held_out: bool = False) -> torch.Tensor:
    """Text sources (files, folders, asset:<name>; see puzzle.data.read_documents; `held_out`: evaluation text, a
    dataset folder's test or validation split) -> (N, T) int64 tokens."""
    from .data import pack_documents, read_documents

    docs = [d for spec in sources for d in read_documents(spec, held_out=held_out)]
    ids, _ = pack_documents(docs, tokenizer, seq_len, max_tokens, max_doc_tokens)
    return ids


#: packing of --calib/--eval text for `gkd --child FOLDER` when --seq-len/--eval-tokens are not given
FOLDER_SEQ_LEN = 256
FOLDER_EVAL_TOKENS = 4096


def _folder_inputs(args, log) -> GKDInputs:
    from .parent import load_parent

    if not args.parent or not args.calib or not args.dest:
        raise PuzzleError("with --child FOLDER also give --parent PATH (the teacher), --calib FILE ... (training text) "
                          "and --dest FOLDER")
    from .data import has_splits
    from .io import refuse_repeated

    refuse_repeated("--calib", args.calib)
    if args.eval:
        refuse_repeated("--eval", args.eval)
        # `a` and `./a` too; a dataset folder of a train and a held-out split gives one to each (reviewer)
        refuse_repeated("--calib and --eval together", [p for p in (*args.calib, *args.eval) if not has_splits(p)],
                        "never evaluate on training text: give --eval other files")
    seq_len = args.seq_len if args.seq_len is not None else FOLDER_SEQ_LEN
    eval_tokens = args.eval_tokens if args.eval_tokens is not None else FOLDER_EVAL_TOKENS
    if seq_len < 2:
        raise PuzzleError(f"--seq-len must be >= 2 (tokens per sequence), got {seq_len}")
    if args.eval_tokens is not None and not args.eval:
        raise PuzzleError("--eval-tokens needs --eval FILE ... (the evaluation text to pack)")
    from .pipeline import check_dest_in_a_run
    from .tiny import means_builtin_tiny, tiny_parent

    check_dest_in_a_run(args.dest, "gkd")  # before loading anything
    if str(args.child) == str(args.parent) or Path(args.child).resolve() == Path(args.parent).resolve():
        raise PuzzleError(f"--child and --parent are the same model ({args.child}): distilled from itself it learns "
                          f"nothing (its KL to the teacher is 0 from the start); give the teacher, the model the child "
                          f"was made from, as --parent")  # a breaker: exported with nothing trained
    # "tiny": the built-in tiny model (unless ./tiny exists), as eval, sft and rpo take it
    child_loaded, parent_loaded = (tiny_parent() if means_builtin_tiny(spec) else load_parent(spec)
                                   for spec in (args.child, args.parent))
    positions = min(child_loaded.model.config.max_position_embeddings, parent_loaded.model.config.max_position_embeddings)
    if seq_len > positions:
        raise PuzzleError(f"--seq-len {seq_len} is longer than the {positions} positions of the child and parent; "
                          f"give --seq-len {positions} or less")
    if args.eval and eval_tokens < seq_len:
        raise PuzzleError(f"--eval-tokens must be at least one sequence (--seq-len {seq_len}), got {eval_tokens}")
    calib_tokens = args.calib_tokens or args.tokens
    if calib_tokens < seq_len:  # breaker: "documents give 0 tokens ... add text" blamed the text
        flag = "--calib-tokens" if args.calib_tokens else "--tokens"
        raise PuzzleError(f"{flag} {calib_tokens} is less than one sequence (--seq-len {seq_len}); "
                          f"give {flag} {seq_len} or more, or a shorter --seq-len")
    tokenizer = child_loaded.tokenizer
    train_ids = pack_sources(args.calib, tokenizer, seq_len, calib_tokens, args.max_doc_tokens or 0)
    eval_ids = pack_sources(args.eval, tokenizer, seq_len, eval_tokens, held_out=True) if args.eval else None
    # breaker: --calib-tokens 10000000 and --eval-tokens 100000000 packed what the text held without a word
    for flag, asked, ids in (("--calib-tokens", args.calib_tokens, train_ids),
                             ("--eval-tokens", args.eval_tokens, eval_ids)):
        if asked is not None and ids is not None and ids.numel() < asked // seq_len * seq_len:  # (whole sequences)
            log(f"gkd: {flag} {asked}: the text holds {ids.numel()} tokens in whole sequences of --seq-len {seq_len}; "
                f"packed those")

    def parent_logp():
        from .scoring.quality import parent_logprobs

        return parent_logprobs(parent_loaded.model, eval_ids, chunk=2)

    from .export import check_export_target, export_provenance, model_ref

    dest = Path(args.dest)
    for folder in (args.work or f"{dest}.gkd-work", dest):  # one training per work and export folder
        also_lock(folder, WORK_ADVICE)
    check_export_target(dest, overwrite=True, keep=[args.child, args.parent, args.work or f"{dest}.gkd-work"],
                        provenance=export_provenance({"gkd": {"child": model_ref(args.child)}}), training_pending=True,
                        work=args.work or f"{dest}.gkd-work")
    check_work_folder(args.work or f"{dest}.gkd-work", [args.child, args.parent])
    return GKDInputs(child_loaded.model, parent_loaded.model, tokenizer, train_ids, eval_ids, parent_logp, dest,
                     Path(args.work or f"{dest}.gkd-work"),
                     {"child": model_ref(args.child), "parent": parent_loaded.source, "train_data": ", ".join(args.calib),
                      "eval_data": ", ".join(args.eval) if args.eval else None},
                     child_source=FOLDER_SOURCE)


def config_from_args(args) -> GKDConfig:
    return GKDConfig(tokens=args.tokens, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                     warmup_fraction=args.warmup_fraction, min_lr_fraction=args.min_lr_fraction,
                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, cosine_weight=args.cosine_weight,
                     kl_weight=args.kl_weight, lm_weight=args.lm_weight, temperature=args.temperature,
                     freeze_embeddings=not args.train_embeddings, teacher=args.teacher, top_k=args.top_k,
                     checkpoint_every=args.checkpoint_every, amp_dtype=args.amp_dtype, seed=args.seed)


def run_gkd_command(args, log=None) -> dict:
    """`puzzle gkd`: inputs, evaluation before, GKD, evaluation after, export; returns the summary
    (also written to WORK/gkd.json). Under torchrun every rank trains; rank 0 evaluates and writes."""
    config = config_from_args(args)
    log = log or (lambda msg: None)
    if args.out is not None and args.child is not None:
        raise PuzzleError("give either --out DIR --name NAME (a run's child) or --child FOLDER, not both")
    if args.out is None and args.child is None:
        raise PuzzleError("give --out DIR --name NAME (a child of a run directory) or --child FOLDER (an exported model)")
    if args.out is not None and not args.name:
        raise PuzzleError("--out DIR needs --name NAME (an architecture in DIR/search/)")
    if args.out is not None:  # a run brings its own parent, text and sequence length
        given = [flag for flag, value in (("--parent", args.parent), ("--calib", args.calib), ("--eval", args.eval),
                                          ("--seq-len", args.seq_len), ("--eval-tokens", args.eval_tokens))
                 if value is not None]
        if given:
            raise PuzzleError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to --child FOLDER; "
                              f"with --out DIR the run's parent, "
                              "calibration split, evaluation split and seq_len are used (drop them, or re-pack the "
                              "run's calibration text with --calib-tokens N / --max-doc-tokens N)")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise PuzzleError(f"--stop-after-steps must be >= 1, got {args.stop_after_steps}")
    if args.calib_tokens is not None and args.calib_tokens < 1:  # 0 is not "the default" either
        raise PuzzleError(f"--calib-tokens must be >= 1 (training tokens to pack), got {args.calib_tokens}")
    if args.max_doc_tokens is not None and args.max_doc_tokens < 0:
        raise PuzzleError(f"--max-doc-tokens must be >= 0 (0: no cap), got {args.max_doc_tokens}")
    if args.device not in ("auto", "cpu", "cuda"):  # under torchrun each process takes cuda:LOCAL_RANK
        raise PuzzleError(f"--device {args.device!r}: give auto, cpu or cuda")
    from .parent import local_model_arg

    args.child, args.parent = local_model_arg(args.child), local_model_arg(args.parent)  # asset:<name>, once checked
    env = init_distributed(args.device, fsdp=args.fsdp)
    if not env.is_main:
        log = lambda msg: None  # noqa: E731  (one voice for all processes)
    try:
        progress = not args.no_progress and env.is_main
        inputs = _run_inputs(args, progress, log) if args.out is not None else _folder_inputs(args, log)
        if config.batch_size > len(inputs.train_ids):  # breaker: 100000 a step from 48 sequences took 15.7 GB
            raise PuzzleError(f"--batch-size {config.batch_size} is more than the {len(inputs.train_ids)} sequences of "
                              f"the training split ({inputs.description['train_data']}); give --batch-size "
                              f"{len(inputs.train_ids)} or less, or more training text")
        trained = config.steps(inputs.train_ids.shape[1]) * config.batch_size * inputs.train_ids.shape[1]
        if trained > inputs.train_ids.numel():  # breaker: --tokens 200000 on 31k tokens, 6 passes unsaid
            log(f"gkd: --tokens {config.tokens} is more than the {inputs.train_ids.numel()} training tokens: the "
                f"training text is seen about {trained / inputs.train_ids.numel():.1f} times (epochs)")
        # a folder's child: as FOLDER_SOURCE, or by its path where a checkpoint of an earlier version recorded that
        extra_meta = {"child_source": inputs.child_source if inputs.child_source != FOLDER_SOURCE else recorded_source(
            inputs.work / "checkpoint.pt", "child_source", inputs.description["child"], inputs.child_source),
            # the checkpoint's --checkpoint-every / --micro-batch-size, where only those differ: the same training
            "config": recorded_settings(inputs.work / "checkpoint.pt", asdict(config))}
        # a checkpoint this call cannot continue, or an export of another training in dest, is refused before
        # anything is written (data, evaluation, cache)
        meta = gkd_meta(config, inputs.parent, inputs.child, inputs.train_ids, extra_meta)
        from . import distributed  # reviewer: ranks with another --lr drifted apart, another --tokens hung

        distributed.check_ranks_agree(env.world_size, distributed.digests(meta), "gkd")
        check_resumable(inputs.work / "checkpoint.pt", meta, config.steps(inputs.train_ids.shape[1]), args.fsdp)
        from .export import check_export_target, export_provenance, training_ref

        training = training_ref(meta, inputs.work, inputs.dest)
        check_export_target(inputs.dest, overwrite=True, provenance=export_provenance(
            {"gkd": {"child": inputs.description["child"], "training": training}}))
        if env.is_main and inputs.save_data is not None:
            inputs.save_data()
        summary_path = inputs.work / "gkd.json"
        evaluate = inputs.eval_ids is not None and not args.no_eval
        before, parent_logp = None, None
        if env.is_main and evaluate:
            if args.fsdp:  # FSDP shards the parent in place: take its evaluation log-probs now
                parent_logp = inputs.parent_eval_logp()
            before_path = inputs.work / "eval_before.json"
            fp = model_fingerprint(inputs.child)
            if before_path.is_file() and read_json(before_path).get("child") == fp:
                before = read_json(before_path)["metrics"]
            else:
                log("gkd: evaluating the child before training")
                parent_logp = parent_logp if parent_logp is not None else inputs.parent_eval_logp()
                before = evaluate_against_parent(inputs.child, inputs.eval_ids, parent_logp)
                atomic_write_json(before_path, {"child": fp, "metrics": before})
        barrier(env)
        steps, seq_len = config.steps(inputs.train_ids.shape[1]), inputs.train_ids.shape[1]
        whole = steps * config.batch_size * seq_len  # the training takes whole batches
        rounded = "" if whole == config.tokens else (
            f" ({whole} tokens: --tokens {config.tokens} rounded {'up' if whole > config.tokens else 'down'} to whole "
            f"batches of {config.batch_size * seq_len})")
        log(f"gkd: training on {inputs.description['train_data']}; {steps} steps of {config.batch_size} x {seq_len} "
            f"tokens, {env.world_size} process(es){rounded}")
        from .scoring.cost import Contention

        busy = Contention()  # other processes' load on this machine's cores while it trains (one process only: the
        busy.start()  # other ranks of a torchrun job would count as load)
        result = distill(inputs.child, inputs.parent, inputs.train_ids, config, inputs.work, env=env, fsdp=args.fsdp,
                         progress=progress, stop_after_steps=args.stop_after_steps, extra_meta=extra_meta)
        contention = busy.stop()[1]
        contention = None if env.world_size > 1 or not math.isfinite(contention) else round(contention, 2)
        if not result.train.finished:
            log(f"gkd: stopped after step {result.train.steps_done} of {result.train.total_steps}; "
                "rerun the same command to continue")
            return {"finished": False, "steps_done": result.train.steps_done}
        summary = None
        if env.is_main:
            if evaluate and parent_logp is None:
                parent_logp = inputs.parent_eval_logp()
            after = evaluate_against_parent(result.model, inputs.eval_ids, parent_logp) if evaluate else None
            # the training's settings, as its checkpoint holds them (reviewer: a resume with another
            # --micro-batch-size recorded the resuming call's)
            summary = {**inputs.description, "finished": True, "config": extra_meta["config"],
                       "world_size": env.world_size,
                       "fsdp": args.fsdp, "steps": result.train.steps_done, "tokens_trained": result.tokens_trained,
                       "epochs": round(result.epochs, 4), "train_tok_s": round(result.tok_s, 2),
                       "train_s": round(result.train.seconds, 1), "resumed_from_step": result.train.resumed_from,
                       "contention_cores": contention,
                       "before": before, "after": after,
                       "recovery_fraction": recovery_fraction(before["kl_nats"], after["kl_nats"]) if evaluate else None,
                       "history": result.train.history}
            if result.train.resumed_from >= result.train.steps_done:  # nothing trained by this call: the rate, time
                # and start of the calls that trained stand (they read 0 before)
                summary = with_earlier_training(summary, summary_path, ("train_tok_s", "train_s", "contention_cores",
                                                                         "resumed_from_step"))
            from .export import export_checkpoint

            exported = export_checkpoint(result.model, inputs.tokenizer, inputs.dest, overwrite=True,
                                         extra_info={"gkd": {**{k: summary[k] for k in ("child", "parent", "train_data",
                                                                                         "tokens_trained", "config")},
                                                             "training": training}})
            summary["dest"] = str(exported.path)
            summary["export_warnings"] = list(exported.warnings)
            if exported.replaced:
                log(f"gkd: replaced the export of {exported.replaced} that was in {exported.path}")
            atomic_write_json(summary_path, summary)
        barrier(env)
        return summary
    except RuntimeError as e:  # another rank stopped: its message says why (breaker: gloo's traceback here)
        if (lost := peer_lost(env, e)) is not None:
            raise lost from None
        raise
    finally:
        shutdown_distributed(env)


# ------------------------------------------------------------------------------------------------
# command line


def cmd_gkd(args) -> int:
    import sys

    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    summary = run_gkd_command(args, log=log)
    if summary and summary.get("finished"):
        b, a = summary["before"], summary["after"]
        if b and a:
            recovery = summary["recovery_fraction"]  # NaN where the child started at KL 0 (the parent itself)
            shown = (f" (recovery {recovery:.1%})" if math.isfinite(recovery) else
                     " (it started as the parent: no recovery to measure)")
            log(f"gkd: eval KL {b['kl_nats']:.4f} -> {a['kl_nats']:.4f} nats/token{shown}, LM loss "
                f"{b['lm_loss']:.4f} -> {a['lm_loss']:.4f}")
            if a["kl_nats"] > b["kl_nats"]:  # breaker: a child made worse exited 0 without a word
                log("gkd: warning: the evaluation KL rose: the exported child is further from the parent than "
                    "before; train on more tokens (--tokens) or with a lower --lr, or keep the child as it was")
        resumed = summary["resumed_from_step"]
        if summary.get("only_exported") or resumed >= summary["steps"]:  # nothing left to train: no rate to report
            rate = f"all {summary['steps']} steps done by an earlier call"
        elif resumed:  # breaker: a resume went unsaid, as sft says it; the rate is this call's steps' (breaker: it
            # stood beside the whole training's tokens)
            rate = (f"resumed from step {resumed} of {summary['steps']}: this call's {summary['steps'] - resumed} "
                    f"steps at {summary['train_tok_s']:.0f} tok/s")
        else:
            rate = f"{summary['train_tok_s']:.0f} tok/s"
        trained = not summary.get("only_exported") and resumed < summary["steps"]
        if trained and (summary.get("contention_cores") or 0) > CONTENTION_NOTE_CORES:  # helper: tok/s swung with load
            rate += (f"; other processes kept {summary['contention_cores']:.2f} cores busy meanwhile, so the rate is "
                     f"below this machine's when idle")
        log(f"gkd: {summary['tokens_trained']} tokens ({rate}); exported to {summary['dest']} "
            f"({time.perf_counter() - t0:.0f} s)")
    return 0


#: other processes' busy cores during training above which `puzzle gkd` says its tok/s reflects the load
CONTENTION_NOTE_CORES = 0.25


def add_gkd_parser(subparsers) -> argparse.ArgumentParser:
    """Add `puzzle gkd` to an argparse subparsers object; func(args) returns an exit code."""
    d = GKDConfig()
    p = subparsers.add_parser("gkd", help="global knowledge distillation of a child from its parent (torchrun: DDP/FSDP)",
                              description="Train a child end to end to match its parent: per-layer hidden-state cosine "
                                          "+ KL on logits (Puzzle). Works on a run directory's child (--out DIR --name "
                                          "NAME) or an exported folder (--child FOLDER --parent PATH --calib FILE...); "
                                          "writes an exported folder. Checkpoints in the work folder; rerun to resume.")
    g = p.add_argument_group("what to train")
    g.add_argument("--out", type=dir_arg, metavar="DIR", help="run directory holding the child's architecture and library")
    g.add_argument("--name", help="architecture name in DIR/search/<name>.json")
    g.add_argument("--child", metavar="FOLDER", help="an exported child (or any model folder) instead of a run's child")
    g.add_argument("--parent", metavar="PATH", help="the teacher for --child: HF folder, .gguf or nemotron-nas folder")
    g.add_argument("--calib", nargs="+", action="extend", metavar="FILE", help="training text for --child (never the evaluation text)")
    g.add_argument("--eval", nargs="+", action="extend", metavar="FILE", help="evaluation text for --child (KL and LM loss before/after)")
    g.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per training sequence for --child (default {FOLDER_SEQ_LEN})")
    g.add_argument("--calib-tokens", type=int, default=None,
                   help="training tokens to pack (run: re-pack the run's calibration sources for this many; default: "
                        "the run's calibration split, or --tokens for --child)")
    g.add_argument("--max-doc-tokens", type=int, default=None, help="tokens kept per document when packing (0: all)")
    g.add_argument("--eval-tokens", type=int, default=None,
                   help=f"evaluation tokens to pack for --child (default {FOLDER_EVAL_TOKENS})")
    g.add_argument("--dest", type=Path, metavar="FOLDER", help="exported folder to write (run default: DIR/export/<name>-gkd)")
    g.add_argument("--work", type=Path, metavar="DIR", help="checkpoints and the teacher cache (run default: DIR/gkd/<name>; "
                                                            "else DEST.gkd-work)")
    t = p.add_argument_group("training")
    t.add_argument("--tokens", type=int, default=d.tokens, help="training tokens over all processes")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step over all processes")
    t.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="sequences per forward/backward on one process (0: its whole share)")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    t.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction, help="share of steps with linear warmup")
    t.add_argument("--min-lr-fraction", type=float, default=d.min_lr_fraction, help="cosine decay floor, as a fraction of --lr")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0: off)")
    t.add_argument("--cosine-weight", type=float, default=d.cosine_weight, help="weight of the per-layer hidden-state cosine term")
    t.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL(parent || child) term")
    t.add_argument("--lm-weight", type=float, default=d.lm_weight,
                   help="weight of an LM cross-entropy term (default 0: the paper found it hurts)")
    t.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the KL term")
    t.add_argument("--train-embeddings", action="store_true", help="also train the embedding / tied LM head (default frozen)")
    t.add_argument("--teacher", choices=TEACHERS, default=d.teacher,
                   help="parent logits computed in each step (online) or read from a top-k cache on disk (cache)")
    t.add_argument("--top-k", type=int, default=d.top_k, help="logits per position kept in the teacher cache")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    t.add_argument("--amp-dtype", choices=AMP_DTYPES, default=d.amp_dtype, help="autocast dtype for forward/backward")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the data order")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto")
    t.add_argument("--fsdp", action="store_true", help="shard child and teacher with FSDP (under torchrun)")
    t.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop after this many steps of this call (checkpointed); rerun to continue")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation before and after")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_gkd)
    return p
