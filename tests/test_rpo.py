"""RPO-family losses: the identities between them, their values, and finite-difference gradients."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from puzzle.errors import PuzzleError
from puzzle.preference import response_logprobs
from puzzle.rpo import (LOSSES, bernoulli_kl, dpo_loss, ipo_loss, multi_response_loss, preference_loss, rloo_advantages,
                        rpo_bwd_kl_loss, rpo_fwd_kl_loss, rpo_sq_loss, simpo_loss)
from puzzle.tiny import tiny_parent

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_rpo_bwd_kl_tends_to_dpo_as_eta_grows():
    delta_pi = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=D, requires_grad=True)
    reward_gap = torch.tensor([0.05, 0.2, 1.0, 0.5, 0.1], dtype=D)  # r*_c > r*_l everywhere
    dpo = dpo_loss(delta_pi)
    (g_dpo,) = torch.autograd.grad(dpo.sum(), delta_pi)
    gaps = []
    for eta in (1.0, 10.0, 100.0, 1000.0):
        bwd = rpo_bwd_kl_loss(delta_pi, eta * reward_gap)
        (g,) = torch.autograd.grad(bwd.sum(), delta_pi)
        gaps.append(float((bwd - dpo).detach().abs().max() + (g - g_dpo).abs().max()))
    assert all(a > b for a, b in zip(gaps, gaps[1:]))  # monotone approach
    assert gaps[-1] < 1e-12 and gaps[0] > 1e-2


def test_rpo_sq_with_half_target_is_beta_squared_ipo():
    # (Δπ − 1/2)² = β² (Δπ/β − 1/(2β))² exactly, with Δπ = β·(log-ratio margin) as in DESIGN.md.
    delta_pi = torch.linspace(-3, 3, 13, dtype=D)
    for beta in (0.01, 0.1, 0.5, 2.0):
        sq = rpo_sq_loss(delta_pi, torch.full_like(delta_pi, 0.5))
        torch.testing.assert_close(sq, beta ** 2 * ipo_loss(delta_pi, beta), atol=1e-12, rtol=1e-12)
    assert float(ipo_loss(torch.tensor(0.5, dtype=D), 0.1)) == 0.0  # IPO's target margin


def test_two_response_multi_loss_equals_rpo_bwd_kl():
    g = torch.Generator().manual_seed(0)
    r_pi, r_star = torch.randn(6, 2, generator=g, dtype=D), torch.rand(6, 2, generator=g, dtype=D)
    for eta in (0.5, 1.0, 7.0):
        multi = multi_response_loss(r_pi, r_star, eta)
        bwd = rpo_bwd_kl_loss(r_pi[:, 0] - r_pi[:, 1], eta * (r_star[:, 0] - r_star[:, 1]))
        torch.testing.assert_close(multi, bwd, atol=1e-12, rtol=1e-10)


def test_loss_values_from_the_formulas():
    dp = torch.tensor([0.0, 1.5], dtype=D)
    torch.testing.assert_close(dpo_loss(dp)[0], torch.tensor(math.log(2), dtype=D))
    ds = torch.tensor([0.3, -0.4], dtype=D)
    p, q = torch.sigmoid(ds), torch.sigmoid(dp)
    manual = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(rpo_bwd_kl_loss(dp, ds), manual)
    manual_fwd = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    torch.testing.assert_close(rpo_fwd_kl_loss(dp, ds), manual_fwd)
    assert float(bernoulli_kl(torch.tensor(800.0, dtype=D), torch.tensor(800.0, dtype=D))) == 0.0  # no nan at saturation
    lc, ll = torch.tensor([-1.2], dtype=D), torch.tensor([-2.0], dtype=D)
    torch.testing.assert_close(simpo_loss(lc, ll, 2.0, 0.5), -torch.log(torch.sigmoid(torch.tensor([2.0 * 0.8 - 0.5], dtype=D))))
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.5]], dtype=D))
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.75, 0.0]], dtype=D))
    assert abs(float(adv.sum())) < 1e-12


def test_dispatcher_conventions():
    pol = torch.tensor([[-10.0, -12.0]], dtype=D)
    ref = torch.tensor([[-11.0, -11.0]], dtype=D)
    n = torch.tensor([[4, 8]])
    out = preference_loss("dpo", pol, n, ref, beta=0.1)  # Δπ = 0.1·(1 − (−1)) = 0.2
    torch.testing.assert_close(out.loss, -torch.log(torch.sigmoid(torch.tensor([0.2], dtype=D))))
    mean = preference_loss("dpo", pol, n, ref, beta=0.1, aggregate="mean")  # Δπ = 0.1·(1/4 + 1/8)
    torch.testing.assert_close(mean.implicit_rewards, torch.tensor([[0.025, -0.0125]], dtype=D))
    simpo = preference_loss("simpo", pol, n, None, beta=2.0, gamma=0.5)  # always averaged, no reference
    torch.testing.assert_close(simpo.loss, simpo_loss(pol[:, 0] / 4, pol[:, 1] / 8, 2.0, 0.5))
    rewards = torch.tensor([[0.9, 0.2]], dtype=D)
    k2 = preference_loss("rpo-multi", pol, n, ref, rewards, beta=0.1, eta=3.0)
    bwd = preference_loss("rpo-bwd-kl", pol, n, ref, rewards, beta=0.1, eta=3.0)
    torch.testing.assert_close(k2.loss, bwd.loss)


def test_implicit_rewards_are_beta_times_the_log_ratio_for_every_loss():
    """Breaker: RLOO reported logπ − logπ_ref without β ([1, −1] where rpo-multi gave [0.1, −0.1])."""
    pol = torch.tensor([[-10.0, -12.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-11.0, -11.0]], dtype=D)
    n, rewards = torch.tensor([[4, 8]]), torch.tensor([[0.9, 0.2]], dtype=D)
    expected = torch.tensor([[0.1, -0.1]], dtype=D)
    for loss in ("dpo", "rpo-multi", "rloo"):
        out = preference_loss(loss, pol, n, ref, rewards, beta=0.1, kl_coef=0.5 if loss == "rloo" else 0.0)
        torch.testing.assert_close(out.implicit_rewards, expected)
    for beta in (0.1, 5.0):  # RLOO's loss and gradient do not depend on β
        out = preference_loss("rloo", pol, n, ref, rewards, beta=beta, kl_coef=0.5)
        (g,) = torch.autograd.grad(out.loss.sum(), pol)
        r = rewards - 0.5 * (pol.detach() - ref)
        torch.testing.assert_close(out.loss, -(rloo_advantages(r) * pol.detach()).mean(-1))
        torch.testing.assert_close(g, -rloo_advantages(r) / 2)
    without_ref = preference_loss("rloo", pol, n, None, rewards, beta=0.1)
    assert torch.equal(without_ref.implicit_rewards, torch.zeros(1, 2, dtype=D))


def test_missing_rewards_and_wrong_shapes_are_refused():
    pol, ref, n = torch.zeros(2, 2, dtype=D), torch.zeros(2, 2, dtype=D), torch.ones(2, 2, dtype=torch.long)
    for loss in ("rpo-sq", "rpo-bwd-kl", "rpo-fwd-kl", "rpo-multi", "rloo"):
        with pytest.raises(PuzzleError, match="needs explicit rewards"):
            preference_loss(loss, pol, n, ref, None)
    with pytest.raises(PuzzleError, match="not finite"):
        preference_loss("rpo-sq", pol, n, ref, torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=D))
    preference_loss("dpo", pol, n, ref, None)  # DPO needs no rewards
    with pytest.raises(PuzzleError, match="exactly 2 responses"):
        preference_loss("dpo", torch.zeros(1, 3, dtype=D), torch.ones(1, 3), torch.zeros(1, 3, dtype=D))
    with pytest.raises(PuzzleError, match="reference"):
        preference_loss("ipo", pol, n, None)
    with pytest.raises(PuzzleError, match="unknown preference loss"):
        preference_loss("ppo", pol, n, ref)


class _Scorer(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, prompts, responses):
        return response_logprobs(self.m, prompts, responses)[0]


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_match_finite_differences_on_a_tiny_model(loss):
    model = tiny_parent(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32).model.double()
    scorer = _Scorer(model)
    prompts = [[5, 6, 7], [5, 6, 7], [9, 10], [9, 10]]
    responses = [[11, 12, 2], [13, 2], [14, 15, 16, 2], [17, 2]]
    counts = torch.tensor([[3, 2], [4, 2]])
    with torch.no_grad():
        ref = scorer(prompts, responses).view(2, 2)
    rewards = torch.tensor([[0.8, 0.1], [0.3, 0.6]], dtype=D)
    name = "m.model.norm.weight"
    w0 = (model.model.norm.weight.detach() + 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(1),
                                                               dtype=D)).requires_grad_(True)

    def f(w):  # RLOO without KL shaping: its surrogate's gradient is then the gradient of its value
        pol = functional_call(scorer, {name: w}, (prompts, responses)).view(2, 2)
        return preference_loss(loss, pol, counts, ref, rewards, beta=0.5, eta=2.0, gamma=0.3).loss.sum()

    assert torch.autograd.gradcheck(f, (w0,), eps=1e-6, atol=1e-6, rtol=1e-4)
    (g,) = torch.autograd.grad(f(w0), w0)
    assert g.abs().max() > 1e-8  # the check is not vacuous
