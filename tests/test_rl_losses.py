"""RL losses against values worked out by hand (STYLE.md, principles 1 and 7)."""

from __future__ import annotations

import math

import pytest
import torch

from chatsmith.train.losses import (
    aggregate_token_loss,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    group_advantages,
    kl_k3,
    rl_loss_units,
    token_logprobs,
    token_logprobs_and_entropy,
    whiten,
)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


def test_gae_hand_example():
    """rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lambda 0.8:
    delta_2 = 1 - 0.7 = 0.3                 A_2 = 0.3
    delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03      A_1 = 0.03 + 0.72*0.3 = 0.246
    delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04      A_0 = 0.04 + 0.72*0.246 = 0.21712
    returns = A + V = [0.71712, 0.846, 1.0]"""
    adv, ret = gae_advantages(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.6, 0.7]), gamma=0.9, lam=0.8)
    close(adv, [0.21712, 0.246, 0.3])
    close(ret, [0.71712, 0.846, 1.0])


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    r, v = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.3, 0.1, -0.4])
    adv, ret = gae_advantages(r, v, gamma=1.0, lam=1.0)
    close(ret, [2.0, 1.0, 3.0])
    close(adv, [1.7, 0.9, 3.4])


def test_clipped_policy_loss_hand_values():
    """ratio = e^(logp-old): [1.5, 0.5, 1.1, 0.7] with eps 0.2, advantages [+1, +1, -2, -1]:
    t0: min(1.5, 1.2)*1 = 1.2 (clipped)   t1: min(0.5, 0.8)*1 = 0.5 (not clipped)
    t2: min(-2.2, -2.2) = -2.2 (inside)   t3: min(-0.7, -0.8) = -0.8 (clipped)"""
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    old = torch.zeros(4)
    loss, clipped = clipped_policy_loss(ratio.log(), old, torch.tensor([1.0, 1.0, -2.0, -1.0]), clip_eps=0.2)
    close(loss, [-1.2, -0.5, 2.2, 0.8], 1e-5)
    close(clipped, [1.0, 0.0, 0.0, 1.0])
    # clip-higher: the upper bound 1.3 lets t0 reach 1.3
    loss_hi, _ = clipped_policy_loss(ratio.log(), old, torch.tensor([1.0, 1.0, -2.0, -1.0]), 0.2, clip_eps_high=0.3)
    close(loss_hi[0], -1.3, 1e-5)


def test_clipped_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.tensor([math.log(1.5)], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, torch.zeros(1), torch.ones(1), 0.2)
    loss.sum().backward()
    assert logp.grad.item() == 0.0


def test_clipped_value_loss_hand_values():
    """old V 1.0, clip 0.2, return 2.0: V=1.5 -> clipped 1.2; max((0.5)^2, (0.8)^2) = 0.64 -> 0.32.
    V=1.1 -> inside the range: 0.5 * 0.81 = 0.405."""
    loss, clipped = clipped_value_loss(torch.tensor([1.5, 1.1]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 0.2)
    close(loss, [0.32, 0.405], 1e-5)
    close(clipped, [1.0, 0.0])


def test_kl_k3_hand_value_and_zero_at_equality():
    """logp = -1, ref = -2: d = -1, k3 = e^-1 + 1 - 1 = 0.367879."""
    close(kl_k3(torch.tensor([-1.0, -0.3]), torch.tensor([-2.0, -0.3])), [math.exp(-1), 0.0])


def test_group_advantages_per_group():
    """Groups [1, 0, 0, 1] and [3, 3, 3, 3] (G=4):
    grpo: mean 0.5, unbiased std 0.57735 -> +-0.866 (eps 1e-4 aside); a flat group gets 0.
    rloo: r_i - mean(others): 1 - 1/3 = 0.6667, 0 - 2/3 = -0.6667; Dr. GRPO (no scaling): +-0.5."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(r, 4, "grpo"), [s, -s, -s, s, 0, 0, 0, 0], 1e-5)
    close(group_advantages(r, 4, "grpo", scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(group_advantages(r, 4, "rloo"), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], 1e-6)
    # normalised per group, not over the batch: shifting one group leaves the other unchanged
    r2 = r.clone()
    r2[4:] += torch.tensor([0.0, 1.0, 2.0, 3.0])
    close(group_advantages(r2, 4, "grpo")[:4], group_advantages(r, 4, "grpo")[:4])
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)


def test_aggregation_modes_hand_values():
    """Sequence 0 has tokens [1, 2, 3], sequence 1 has [4]; max_new_tokens 4.
    token: 10 / 4 tokens = 2.5; sequence: (2 + 4) / 2 = 3.0; dr_grpo: 10 / (2 * 4) = 1.25."""
    per_tok = torch.tensor([1.0, 2.0, 3.0, 4.0])
    seq = torch.tensor([0, 0, 0, 1])
    for mode, want in (("token", 2.5), ("sequence", 3.0), ("dr_grpo", 1.25)):
        total = aggregate_token_loss(per_tok, seq, 2, mode, max_new_tokens=4)
        assert float(total) / rl_loss_units(4, 2, mode, max_new_tokens=4) == pytest.approx(want)


def test_whiten():
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert abs(float(w.mean())) < 1e-6 and abs(float(w.std(unbiased=False)) - 1) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_logprobs_equal_log_softmax(dtype):
    """token_logprobs / token_logprobs_and_entropy (logsumexp over row chunks, only the logits kept for the
    backward) give log_softmax + gather's values, its gradient and -sum p log p, over several chunks."""
    torch.manual_seed(0)
    n, v = 50, 50_000                        # 20 rows per 1M-value chunk: three chunks
    logits = (torch.randn(n, v) * 3).to(dtype)
    targets = torch.randint(0, v, (n,))
    weights = torch.randn(n)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp_all = torch.log_softmax(a.float(), dim=-1)
    expected = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    got, entropy = token_logprobs_and_entropy(b, targets)
    (got * weights).sum().backward()
    assert got.dtype == entropy.dtype == torch.float32 and b.grad.dtype == dtype and not entropy.requires_grad
    close(got, expected, 1e-4)
    close(entropy, -(logp_all.exp() * logp_all).sum(-1).detach(), 1e-3)
    close(b.grad.float(), a.grad.float(), 1e-4)
    assert torch.equal(token_logprobs(logits, targets), got.detach())
