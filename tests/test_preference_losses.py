"""Preference losses against values worked out by hand, and parity with TRL on identical inputs.

TRL (test-only dependency) is called where its loss is a function we can call without a trainer:
`CPOTrainer.cpo_loss` (sigmoid with label smoothing, ipo, simpo) and `ORPOTrainer.odds_ratio_loss`,
as unbound methods with a namespace standing in for `self` (they read only beta, alpha,
label_smoothing, simpo_gamma, loss_type and accelerator.device). DPO's loss in CPOTrainer is DPO's
when its inputs are the log-ratios (policy - reference): sigmoid(beta * ((pc - rc) - (pr - rr))).
TRL's length-normalised IPO and KTO live inside 300-line `_compute_loss` methods; those tests
reproduce the quoted lines of trl 1.16 on the same tensors.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from chatsmith.train.losses import (
    bradley_terry_loss,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    plackett_luce_loss,
    rrhf_loss,
    simpo_loss,
)

t = torch.tensor


def _close(a: torch.Tensor, b: float | list[float], tol: float = 1e-6) -> None:
    assert torch.allclose(a.float(), torch.as_tensor(b, dtype=torch.float32), atol=tol), (a, b)


# ---- hand values -------------------------------------------------------------------------------

def test_dpo_by_hand():
    # log-ratios: chosen -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5; h = 0.5 * (0.5 + 0.5) = 0.5
    # loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077; rewards = 0.5 * log-ratio = +-0.25
    losses, cr, rr = dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.5)
    _close(losses, [math.log1p(math.exp(-0.5))])
    _close(losses, [0.474077], 1e-6)
    _close(cr, [0.25])
    _close(rr, [-0.25])


def test_cdpo_by_hand():
    # eps = 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.426669 + 0.097408 = 0.524077
    losses, _, _ = cdpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.5, label_smoothing=0.1)
    _close(losses, [0.524077], 1e-6)


def test_ipo_by_hand():
    # beta 0.5 -> target 1/(2 beta) = 1; h = 0.5 - (-0.5) = 1 -> (1 - 1)^2 = 0
    losses, _, _ = ipo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.5)
    _close(losses, [0.0])
    # per token, lengths 2 and 4: 0.5/2 - (-0.5/4) = 0.375 -> (0.375 - 1)^2 = 0.390625
    losses, _, _ = ipo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.5,
                            chosen_lengths=t([2.0]), rejected_lengths=t([4.0]))
    _close(losses, [0.390625])


def test_kto_by_hand():
    # ratio = -1 - (-2) = 1, z0 = 0.5, beta 1: desirable 1 - sigmoid(0.5) = 0.377541,
    # undesirable 1 - sigmoid(0.5 - 1) = 0.622459, times the class weights
    losses, rewards = kto_loss(t([-1.0, -1.0]), t([-2.0, -2.0]), t([True, False]), kl=0.5, beta=1.0,
                               desirable_weight=1.0, undesirable_weight=2.0)
    _close(losses, [0.377541, 2 * 0.622459], 1e-6)
    _close(rewards, [1.0, 1.0])


def test_orpo_by_hand():
    # p_c = 0.5 -> odds 1 -> log odds 0; p_r = 0.2 -> odds 0.25; log-odds ratio = ln 4, sigmoid(ln 4) = 0.8
    # loss = NLL 0.7 - 0.1 * ln 0.8 = 0.7 + 0.0223144 = 0.7223144
    losses, cr, rr = orpo_loss(t([math.log(0.5)]), t([math.log(0.2)]), t([0.7]), beta=0.1)
    _close(losses, [0.7223144], 1e-6)
    _close(cr, [0.1 * math.log(0.5)])


def test_simpo_by_hand():
    # beta 2, gamma 0.5: h = 2 * (-1 - (-2)) - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.201413
    losses, cr, rr = simpo_loss(t([-1.0]), t([-2.0]), beta=2.0, gamma=0.5)
    _close(losses, [0.201413], 1e-6)
    _close(cr - rr, [2.0])


def test_rrhf_by_hand():
    # p = [-1, -0.5, -2], rewards [2, 1, 0]: pairs (worse, better): (1,0): relu(-0.5 + 1) = 0.5,
    # (2,0): relu(-2 + 1) = 0, (2,1): relu(-2 + 0.5) = 0 -> rank 0.5; + NLL of the best 1.0 = 1.5
    loss = rrhf_loss(t([-1.0, -0.5, -2.0]), t([2.0, 1.0, 0.0]), t(1.0))
    _close(loss, 1.5)
    _close(rrhf_loss(t([-1.0, -0.5, -2.0]), t([2.0, 1.0, 0.0]), t(1.0), rank_weight=2.0), 2.0)
    # already in order: only the SFT term remains; equal rewards form no pair
    _close(rrhf_loss(t([-0.5, -1.0]), t([1.0, 0.0]), t(0.3)), 0.3)
    _close(rrhf_loss(t([-2.0, -1.0]), t([1.0, 1.0]), t(0.3)), 0.3)


def test_bradley_terry_by_hand():
    # log(1 + e^-1) = 0.313262; with margin 1: log 2
    _close(bradley_terry_loss(t([1.0]), t([0.0])), [0.313262], 1e-6)
    _close(bradley_terry_loss(t([1.0]), t([0.0]), margin=1.0), [math.log(2)])


def test_plackett_luce_by_hand():
    # [2, 1, 0]: -(2 - lse(2,1,0)) - (1 - lse(1,0)) = 0.407606 + 0.313262 = 0.720868
    _close(plackett_luce_loss(t([2.0, 1.0, 0.0])), 0.720868, 1e-6)
    # K = 2 is Bradley-Terry
    _close(plackett_luce_loss(t([0.3, -0.4])), bradley_terry_loss(t([0.3]), t([-0.4]))[0].item())


# ---- parity with TRL ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    pc, pr = -torch.rand(16, generator=g) * 40 - 1, -torch.rand(16, generator=g) * 40 - 1
    rc, rr = pc + torch.randn(16, generator=g), pr + torch.randn(16, generator=g)
    return pc, pr, rc, rr


def _cpo(loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> SimpleNamespace:
    return SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                           simpo_gamma=simpo_gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_and_cdpo_match_trl(inputs, eps):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr = inputs
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo("sigmoid", 0.1, eps), pc - rc, pr - rr)
    ours, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cr, 0.1 * (pc - rc))


def test_ipo_matches_trl(inputs):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr = inputs
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo("ipo", 0.1), pc - rc, pr - rr)
    ours, _, _ = ipo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_length_normalised_ipo_matches_trl_dpo_trainer(inputs):
    """trl/trainer/dpo_trainer.py (1.16), `loss_type == "ipo"`:
        chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2"""
    pc, pr, rc, rr = inputs
    lc, lr = torch.arange(1, 17).float(), torch.arange(16, 0, -1).float()
    chosen_mask = (torch.arange(20)[None] < lc[:, None]).float()
    rejected_mask = (torch.arange(20)[None] < lr[:, None]).float()
    beta = 0.1
    delta = (pc - rc) / chosen_mask.sum(dim=1).clamp(min=1.0) - (pr - rr) / rejected_mask.sum(dim=1).clamp(min=1.0)
    theirs = (delta - 1 / (2 * beta)) ** 2
    ours, _, _ = ipo_loss(pc, pr, rc, rr, beta=beta, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(ours, theirs)


def test_simpo_matches_trl(inputs):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _ = inputs
    avg_c, avg_r = pc / 20, pr / 25
    theirs, tcr, trr = CPOTrainer.cpo_loss(_cpo("simpo", 2.0, 0.0, simpo_gamma=0.7), avg_c, avg_r)
    ours, cr, rr = simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.7)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cr, tcr)
    torch.testing.assert_close(rr, trr)


def test_orpo_matches_trl(inputs):
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, _, _ = inputs
    avg_c, avg_r = pc / 30, pr / 30      # average log-probs, as ORPO uses
    nll = -avg_c
    me = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, tcr, trr, _, _ = ORPOTrainer.odds_ratio_loss(me, avg_c, avg_r)
    # ORPOTrainer: loss = policy_nll_loss - losses.mean()
    theirs = nll - ratio_losses
    ours, cr, rr = orpo_loss(avg_c, avg_r, nll, beta=0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cr, tcr)
    torch.testing.assert_close(rr, trr)


def test_kto_matches_trl_kto_trainer(inputs):
    """trl/trainer/kto_trainer.py (1.16), `_compute_loss` with loss_type "kto":
        kl = (KL_logps - ref_KL_logps).mean().detach() ... .mean().clamp(min=0)
        chosen_losses = 1 - F.sigmoid(self.beta * (chosen_logratios - kl))
        rejected_losses = 1 - F.sigmoid(self.beta * (kl - rejected_logratios))
        losses = torch.cat((self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses), 0)"""
    pc, pr, rc, rr = inputs
    kl_pol, kl_ref = pc.roll(1) + 0.3, rc.roll(1)
    beta, wd, wu = 0.1, 1.0, 1.33
    kl = (kl_pol - kl_ref).mean().clamp(min=0)
    label = torch.arange(16) % 3 != 0
    logps, ref = torch.where(label, pc, pr), torch.where(label, rc, rr)
    chosen_losses = 1 - F.sigmoid(beta * ((logps - ref)[label] - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - (logps - ref)[~label]))
    theirs = torch.cat((wd * chosen_losses, wu * rejected_losses), 0)
    ours, _ = kto_loss(logps, ref, label, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    torch.testing.assert_close(torch.cat((ours[label], ours[~label])), theirs)
    assert kl.item() > 0


def test_losses_pull_the_right_way():
    # Gradient sign: every pairwise loss falls when the chosen answer's log-prob rises.
    pc = torch.tensor([-3.0], requires_grad=True)
    for fn in (lambda: dpo_loss(pc, t([-3.0]), t([-3.0]), t([-3.0]))[0],
               lambda: ipo_loss(pc, t([-3.0]), t([-3.0]), t([-3.0]))[0],
               lambda: simpo_loss(pc / 3, t([-1.0]))[0],
               lambda: orpo_loss(pc / 3, t([-1.0]), -pc / 3)[0]):
        pc.grad = None
        fn().sum().backward()
        assert pc.grad.item() < 0
