"""Preference-optimization losses of the RPO family, as pure functions of sequence log-probabilities.

Nothing here runs a model: the inputs are summed (or length-averaged) log-probabilities of whole
responses under the policy π and the frozen reference π_ref, the explicit rewards r* of those
responses, and the response lengths. `puzzle.preference` computes these from data and trains.

Sources: Nemotron-4 340B (Adler et al. 2024, the RPO section), "Reward-aware Preference Optimization: a
unified mathematical framework for model alignment" (Sun et al. 2025: the squared, forward- and
backward-KL distances and the multi-response form), Llama-Nemotron (Bercovich et al. 2025).
Notation:

    B        prompts in a batch               K   responses per prompt (2 for a pair: chosen, rejected)
    logπ     log π(y|x): token log-probs of the response summed (or averaged, `aggregate="mean"`)
    r_π      implicit reward  β · (logπ(y|x) − logπ_ref(y|x))
    r*       explicit reward of a response (reward model, rule or label), scaled by η
    Δπ       r_π(x, y_c) − r_π(x, y_l)        Δ*  η · (r*(x, y_c) − r*(x, y_l))

    dpo         −log σ(Δπ)                                     Rafailov et al. 2023 (DPO)
    ipo         (Δπ/β − 1/(2β))²                               Azar et al. 2023 (IPO, τ = β)
    simpo       −log σ(β·logπ_c/|y_c| − β·logπ_l/|y_l| − γ)    Meng et al. 2024 (SimPO, no reference)
    rpo-sq      (Δπ − Δ*)²
    rpo-bwd-kl  KL_Bernoulli(σ(Δ*) || σ(Δπ))
    rpo-fwd-kl  KL_Bernoulli(σ(Δπ) || σ(Δ*))
    rpo-multi   KL(softmax_K(η·r*) || softmax_K(r_π)) over the K responses of a prompt
    rloo        −(1/K) Σ_k (r*_k − mean_{j≠k} r*_j) · logπ(y_k|x)   Ahmadian et al. 2024 (REINFORCE with
                the leave-one-out baseline; Kool et al. 2019)

Identities the tests check numerically (they follow from the formulas above):
    rpo-bwd-kl → dpo as η → ∞ (σ(Δ*) → 1 when r*_c > r*_l, and KL(1 || q) = −log q);
    rpo-sq with 1/2 in place of Δ* = β² · ipo, exactly: (Δπ − 1/2)² = β² (Δπ/β − 1/(2β))²;
    rpo-multi with K = 2 = rpo-bwd-kl, since softmax([a, b])_0 = σ(a − b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PuzzleError

PAIR_LOSSES = ("dpo", "ipo", "simpo", "rpo-sq", "rpo-fwd-kl", "rpo-bwd-kl")
GROUP_LOSSES = ("rpo-multi", "rloo")
LOSSES = PAIR_LOSSES + GROUP_LOSSES
REWARD_LOSSES = ("rpo-sq", "rpo-fwd-kl", "rpo-bwd-kl", "rpo-multi", "rloo")
AGGREGATES = ("sum", "mean")


def needs_rewards(loss: str) -> bool:
    """Whether `loss` uses explicit rewards r* (and must refuse data without them)."""
    check_loss(loss)
    return loss in REWARD_LOSSES


def needs_reference(loss: str, kl_coef: float = 0.0) -> bool:
    """Whether `loss` uses π_ref: every loss but SimPO, and RLOO only with a KL penalty."""
    check_loss(loss)
    if loss == "simpo":
        return False
    if loss == "rloo":
        return kl_coef != 0.0
    return True


def check_loss(loss: str) -> None:
    """Raises PuzzleError naming the known losses when `loss` is not one of them."""
    if loss not in LOSSES:
        raise PuzzleError(f"unknown preference loss {loss!r}; choose one of {', '.join(LOSSES)}")


# ------------------------------------------------------------------------------------------------
# pair losses: every input is (B,) and every output is (B,) per-pair losses


def bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(σ(a)) || Bernoulli(σ(b))) in nats, elementwise, from the logits a and b.

    = σ(a)(log σ(a) − log σ(b)) + σ(−a)(log σ(−a) − log σ(−b)), with log σ computed by logsigmoid so
    that large |a|, |b| neither overflow nor lose the small side; a term whose probability is exactly
    0 contributes 0 (the 0·log 0 = 0 convention).
    """
    p, p_not = torch.sigmoid(logit_p), torch.sigmoid(-logit_p)
    term = p * (F.logsigmoid(logit_p) - F.logsigmoid(logit_q))
    term_not = p_not * (F.logsigmoid(-logit_p) - F.logsigmoid(-logit_q))
    return torch.where(p > 0, term, torch.zeros_like(term)) + torch.where(p_not > 0, term_not, torch.zeros_like(term))


def dpo_loss(delta_pi: torch.Tensor) -> torch.Tensor:
    """−log σ(Δπ) (Rafailov et al. 2023 (DPO)). delta_pi (B,) -> (B,) nats."""
    return -F.logsigmoid(delta_pi)


def ipo_loss(delta_pi: torch.Tensor, beta: float) -> torch.Tensor:
    """(Δπ/β − 1/(2β))² (Azar et al. 2023, IPO with τ = β; Δπ/β is the plain log-ratio margin). (B,) -> (B,)."""
    return (delta_pi / beta - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """−log σ(β·logπ_c − β·logπ_l − γ) (Meng et al. 2024): no reference model.

    Args:
        logp_chosen, logp_rejected: (B,) length-averaged log-probs (logπ(y|x)/|y|); SimPO is defined
            on averages, and `preference_loss` always passes averages whatever `aggregate` says.
        beta: reward scale β; gamma: target reward margin γ (in the same units as β·logπ).
    """
    return -F.logsigmoid(beta * (logp_chosen - logp_rejected) - gamma)


def rpo_sq_loss(delta_pi: torch.Tensor, delta_star: torch.Tensor) -> torch.Tensor:
    """(Δπ − Δ*)² (squared distance between implicit and explicit reward margins). (B,) -> (B,)."""
    return (delta_pi - delta_star) ** 2


def rpo_bwd_kl_loss(delta_pi: torch.Tensor, delta_star: torch.Tensor) -> torch.Tensor:
    """KL(σ(Δ*) || σ(Δπ)): Bernoulli KL from the target preference probability. (B,) -> (B,) nats."""
    return bernoulli_kl(delta_star, delta_pi)


def rpo_fwd_kl_loss(delta_pi: torch.Tensor, delta_star: torch.Tensor) -> torch.Tensor:
    """KL(σ(Δπ) || σ(Δ*)): Bernoulli KL from the policy's preference probability. (B,) -> (B,) nats."""
    return bernoulli_kl(delta_pi, delta_star)


# ------------------------------------------------------------------------------------------------
# group losses: inputs (B, K), outputs (B,)


def multi_response_loss(implicit_rewards: torch.Tensor, rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """KL(softmax(η·r*) || softmax(r_π)) over the K responses of each prompt.

    Args:
        implicit_rewards: (B, K) r_π = β·(logπ − logπ_ref).
        rewards: (B, K) explicit rewards r* (no gradient flows into them).
        eta: scale η of the explicit rewards.
    Returns:
        (B,) nats. With K = 2 this is `rpo_bwd_kl_loss(r_π,0 − r_π,1, η·(r*_0 − r*_1))`.
    """
    log_target = torch.log_softmax(eta * rewards, dim=-1)  # (B, K)
    log_policy = torch.log_softmax(implicit_rewards, dim=-1)  # (B, K)
    target = log_target.exp()
    term = target * (log_target - log_policy)
    return torch.where(target > 0, term, torch.zeros_like(term)).sum(-1)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r_k − mean_{j≠k} r_j for each of the K samples of a prompt: (B, K) -> (B, K); needs K >= 2.

    Equals K/(K−1) · (r_k − mean_j r_j), so the advantages of a prompt sum to zero.
    """
    K = rewards.shape[-1]
    if K < 2:
        raise PuzzleError("RLOO needs at least 2 samples per prompt (K >= 2) for the leave-one-out baseline")
    loo_mean = (rewards.sum(-1, keepdim=True) - rewards) / (K - 1)  # (B, K)
    return rewards - loo_mean


def rloo_loss(logp: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024, "Back to basics").

    Args:
        logp: (B, K) log π(y_k|x) of the K sampled responses (gradients flow through these).
        rewards: (B, K) their rewards (treated as constants).
    Returns:
        (B,) −(1/K) Σ_k A_k · logπ(y_k|x); its gradient is the unbiased RLOO policy gradient (negated).
    """
    advantages = rloo_advantages(rewards.detach())
    return -(advantages * logp).mean(-1)


# ------------------------------------------------------------------------------------------------
# the dispatcher used by the trainers


@dataclass(frozen=True)
class LossOutput:
    """Per-prompt losses and what was computed on the way.

    Attributes:
        loss: (B,) per-prompt loss in nats (squared margins for ipo and rpo-sq).
        implicit_rewards: (B, K) r_π (β·log-ratio; for SimPO β·average logπ; for RLOO without π_ref
            zeros), detached.
        logp: (B, K) the aggregated policy log-probs the loss used, detached.
    """

    loss: torch.Tensor
    implicit_rewards: torch.Tensor
    logp: torch.Tensor


def aggregate_logprobs(sum_logp: torch.Tensor, num_tokens: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Summed token log-probs (any shape) -> the same, or divided by the token counts for "mean"."""
    if aggregate not in AGGREGATES:
        raise PuzzleError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if aggregate == "sum":
        return sum_logp
    return sum_logp / num_tokens.clamp(min=1).to(sum_logp.dtype)


def check_rewards(loss: str, rewards: torch.Tensor | None) -> None:
    """PuzzleError when `loss` needs explicit rewards and they are absent or not finite (never filled in)."""
    if not needs_rewards(loss):
        return
    if rewards is None:
        raise PuzzleError(f"loss {loss!r} needs explicit rewards (chosen_reward/rejected_reward, or 'rewards' per "
                          "response); this data has none. Score the responses first, or use dpo, ipo or simpo")
    if not torch.isfinite(rewards).all():
        raise PuzzleError(f"loss {loss!r}: some rewards are missing or not finite; score every response "
                          "(rewards are never filled in)")


def preference_loss(loss: str, policy_sum_logp: torch.Tensor, num_tokens: torch.Tensor,
                    ref_sum_logp: torch.Tensor | None = None, rewards: torch.Tensor | None = None, *,
                    beta: float = 0.1, eta: float = 1.0, gamma: float = 0.5, aggregate: str = "sum",
                    kl_coef: float = 0.0) -> LossOutput:
    """Any loss of the family on a batch of B prompts with K responses each.

    Args:
        loss: one of LOSSES. Pair losses need K = 2 with column 0 the chosen response.
        policy_sum_logp: (B, K) summed token log-probs of each response under π (carries gradients).
        num_tokens: (B, K) response lengths |y| in tokens.
        ref_sum_logp: (B, K) the same under π_ref (no gradient), or None for simpo / rloo without KL.
        rewards: (B, K) explicit rewards r*, or None.
        beta: β of the implicit reward (also SimPO's β; RLOO's loss ignores it, its reported implicit
            rewards use it).
        eta: η, the scale of the explicit rewards in Δ* and softmax(η·r*).
        gamma: SimPO's target margin γ.
        aggregate: "sum" (default) or "mean" (length-averaged log-probs) for every loss but SimPO,
            which is always length-averaged (its definition).
        kl_coef: RLOO only: reward shaping r*_k − kl_coef·(logπ − logπ_ref)(y_k), detached.
    Returns:
        LossOutput with (B,) losses.
    Raises:
        PuzzleError: unknown loss, K != 2 for a pair loss, missing rewards or reference.
    """
    check_loss(loss)
    check_rewards(loss, rewards)
    if policy_sum_logp.dim() != 2:
        raise PuzzleError(f"policy log-probs must be (B, K), got shape {tuple(policy_sum_logp.shape)}")
    if loss in PAIR_LOSSES and policy_sum_logp.shape[1] != 2:
        raise PuzzleError(f"{loss} is a pair loss and needs exactly 2 responses per prompt (chosen, rejected); "
                          f"got {policy_sum_logp.shape[1]}. Use rpo-multi or rloo for K responses")
    if needs_reference(loss, kl_coef) and ref_sum_logp is None:
        raise PuzzleError(f"{loss} needs reference log-probs (a frozen reference model or a reference cache)")

    if loss == "simpo":
        logp = aggregate_logprobs(policy_sum_logp, num_tokens, "mean")
        out = simpo_loss(logp[:, 0], logp[:, 1], beta, gamma)
        return LossOutput(out, (beta * logp).detach(), logp.detach())

    logp = aggregate_logprobs(policy_sum_logp, num_tokens, aggregate)
    if loss == "rloo":
        r = rewards.to(logp.dtype)
        if kl_coef:
            ref = aggregate_logprobs(ref_sum_logp, num_tokens, aggregate).to(logp.dtype)
            r = r - kl_coef * (logp.detach() - ref)
        # reported only (the RLOO loss does not use them): β·log-ratio like every other loss, 0 without π_ref
        implicit = (beta * (logp - aggregate_logprobs(ref_sum_logp, num_tokens, aggregate))).detach() \
            if ref_sum_logp is not None else torch.zeros_like(logp)
        return LossOutput(rloo_loss(logp, r), implicit, logp.detach())

    ref = aggregate_logprobs(ref_sum_logp, num_tokens, aggregate).to(logp.dtype)
    implicit = beta * (logp - ref)  # (B, K)
    if loss == "rpo-multi":
        out = multi_response_loss(implicit, rewards.to(logp.dtype), eta)
        return LossOutput(out, implicit.detach(), logp.detach())

    delta_pi = implicit[:, 0] - implicit[:, 1]  # (B,)
    if loss == "dpo":
        out = dpo_loss(delta_pi)
    elif loss == "ipo":
        out = ipo_loss(delta_pi, beta)
    else:
        delta_star = eta * (rewards[:, 0] - rewards[:, 1]).to(logp.dtype)  # (B,)
        fn = {"rpo-sq": rpo_sq_loss, "rpo-bwd-kl": rpo_bwd_kl_loss, "rpo-fwd-kl": rpo_fwd_kl_loss}[loss]
        out = fn(delta_pi, delta_star)
    return LossOutput(out, implicit.detach(), logp.detach())
