"""Losses as pure functions of tensors (STYLE.md, principle 1). No trainer state in here.

Every loss returns a SUM over its units (tokens, pairs, ...), not a mean: the training loop
divides by the number of units in the whole optimizer step, so that 8 examples in one micro-batch
and 2 examples in each of 4 accumulated micro-batches give the same update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets` [N] under `logits` [N, V].

    Computed in fp32: a bf16 logsumexp over a 50k vocabulary loses the small differences that
    make up the loss.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    """Row slices of at most 1M values (4 MiB in fp32) each: the only [rows, V] temporaries below (larger
    chunks measured no faster, and glibc kept more of them resident)."""
    step = max(1, (1 << 20) // max(1, vocab))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


class _SelectedLogprobs(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits) per row, with each row's entropy (not
    differentiated) on request. Only the logits are kept for the backward, in their own dtype.
    `log_softmax(logits).gather(...)` keeps a second [N, V] fp32 tensor (its output) for the
    backward, and its backward allocates two more (the gather's dense gradient and the softmax's);
    here every [N, V] temporary is a chunk of rows, and the backward writes one [N, V] gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, entropy: bool):   # noqa: ANN205
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        ent = torch.empty_like(lse) if entropy else None
        for s in _row_chunks(logits.shape[0], logits.shape[-1]):
            x = logits[s].float()
            lse[s] = torch.logsumexp(x, dim=-1)
            if ent is not None:   # H = lse - sum_v p_v x_v
                ent[s] = lse[s] - (torch.softmax(x, dim=-1) * x).sum(-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - lse
        ctx.save_for_backward(logits, targets, lse)
        if ent is None:
            return picked
        ctx.mark_non_differentiable(ent)
        return picked, ent

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_: torch.Tensor):   # noqa: ANN205
        # d logp_t / d x_v = [v = t] - softmax_v, times the incoming gradient of each row.
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in _row_chunks(logits.shape[0], logits.shape[-1]):
            g = grad[s].float().unsqueeze(-1)
            d = (logits[s].float() - lse[s].unsqueeze(-1)).exp_().mul_(-g)
            d.scatter_add_(-1, targets[s].unsqueeze(-1), g)
            out[s] = d
        return out, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each position: logits [N, V], targets [N] -> [N] (fp32).

    The logsumexp is taken in fp32 a chunk of rows at a time, and only the logits are kept for the
    backward (`_SelectedLogprobs`): the same numbers as log_softmax + gather without its [N, V] copies.
    """
    return _SelectedLogprobs.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), False).view(targets.shape)


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [N] (differentiable) and the entropy of each position's distribution [N] (detached,
    for logging), both fp32, without materialising the [N, V] log-softmax."""
    logp, ent = _SelectedLogprobs.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), True)
    return logp.view(targets.shape), ent.view(targets.shape)


# ---------------------------------------------------------------------------------------------
# Preference losses (reward models and the RL-free family). Inputs are sequence log-probabilities
# (summed over answer tokens unless the name says avg) or reward scores, one per response; each
# function returns PER-UNIT losses (pairs, responses or rankings) that the stage sums.
# ---------------------------------------------------------------------------------------------

def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Pairwise reward-model loss, Eq. 1 of InstructGPT (Ouyang et al. 2022): -log sigmoid(r_c - r_r - m).
    The optional margin m is Llama 2's (Touvron et al. 2023, Eq. 2). Shapes [P] -> [P]."""
    diff = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def plackett_luce_loss(scores: torch.Tensor) -> torch.Tensor:
    """Listwise loss of one ranking, scores [K] ordered best first: the negative log-likelihood of the
    order under Plackett-Luce, -sum_{k<K} (s_k - logsumexp(s_k..s_K)). For K=2 it equals Bradley-Terry."""
    s = scores.float()
    # logcumsumexp from the end: tails[k] = logsumexp(s[k:]).
    tails = torch.logcumsumexp(s.flip(0), dim=0).flip(0)
    return -(s[:-1] - tails[:-1]).sum()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, Eq. 7 of Rafailov et al. 2023: -log sigmoid(beta * (log-ratio_c - log-ratio_r)). With
    label_smoothing eps > 0 it is conservative DPO (cDPO, Mitchell 2023): the label is flipped with
    probability eps, -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    Returns (losses [P], chosen_rewards [P], rejected_rewards [P]); rewards are beta * log-ratio, detached."""
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
              label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conservative DPO: `dpo_loss` with label smoothing (the assumed label-noise rate)."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta, label_smoothing)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO, Eq. 17 of Azar et al. 2023: (h - 1/(2 beta))^2 with h the difference of log-ratios. Given
    answer lengths, each log-ratio is divided by its length first (per-token form, as TRL's DPOTrainer
    and the IPO authors use) so that beta does not depend on answer length."""
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    c, r = chosen_ratio, rejected_ratio
    if chosen_lengths is not None and rejected_lengths is not None:
        c = c / chosen_lengths.float().clamp(min=1)
        r = r / rejected_lengths.float().clamp(min=1)
    losses = (c - r - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Eq. 7 of Ethayarajh et al. 2024, for unpaired answers [N] with labels `desirable` [N] (bool):
    desirable: w_d * (1 - sigmoid(beta (r - z0))), undesirable: w_u * (1 - sigmoid(beta (z0 - r))),
    r the log-ratio and z0 = `kl` the reference point (a detached, batch-level KL estimate >= 0).
    Returns (losses [N], rewards [N] = beta * r, detached)."""
    ratio = policy_logps.float() - ref_logps.float()
    z0 = torch.as_tensor(kl, dtype=ratio.dtype, device=ratio.device)
    d = desirable.bool()
    losses = torch.where(d, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    return losses, beta * ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
              chosen_nll: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO, Eqs. 4-7 of Hong et al. 2024: NLL(chosen) - beta * log sigmoid(log odds_c - log odds_r), with
    odds(y) = p / (1 - p) from the per-token average log-prob; beta is the paper's lambda. No reference.
    chosen_nll [P] is each pair's chosen-answer NLL (per-token mean). Returns (losses, chosen_rewards,
    rejected_rewards), rewards = beta * average log-prob, detached (as TRL logs them)."""
    c, r = policy_chosen_avg_logps.float(), policy_rejected_avg_logps.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    losses = chosen_nll.float() - beta * F.logsigmoid(log_odds)
    return losses, beta * c.detach(), beta * r.detach()


def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, Eq. 6 of Meng et al. 2024: -log sigmoid(beta (avg logp_c - avg logp_r) - gamma); the reward is
    the length-normalised log-prob times beta, no reference model. gamma is the target margin."""
    c, r = policy_chosen_avg_logps.float(), policy_rejected_avg_logps.float()
    h = beta * (c - r) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * c.detach(), beta * r.detach()


def rrhf_loss(avg_logps: torch.Tensor, rewards: torch.Tensor, best_nll: torch.Tensor,
              rank_weight: float = 1.0) -> torch.Tensor:
    """RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback"),
    one prompt with K responses: L = rank_weight * L_rank + L_ft, where
    L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j) (Eq. 2; p the length-normalised log-prob)
    and L_ft the NLL of the best response (Eq. 3; per-token mean, as the released code).
    avg_logps [K], rewards [K] (higher is better), best_nll scalar -> scalar."""
    p = avg_logps.float()
    worse = rewards.unsqueeze(1) < rewards.unsqueeze(0)          # [i, j]: r_i < r_j
    rank = torch.relu(p.unsqueeze(1) - p.unsqueeze(0))[worse].sum()
    return rank_weight * rank + best_nll.float()


# ---------------------------------------------------------------------------------------------
# RL losses (PPO, GRPO, RLOO). Per-token tensors are flat [N] over the response tokens of a
# batch, with `seq_index` [N] saying which sequence each token belongs to (padding-free, like
# the packed rows of SFT). Each function returns per-token values; `aggregate_token_loss` turns
# them into the SUM-over-units the training loop expects.
# ---------------------------------------------------------------------------------------------


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for ONE sequence (Schulman et al. 2016, Eq. 16).

    rewards, values: [T] per response token (values[t] = V(state before token t)); the value after
    the last token is 0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t;
    A_t = sum_l (gamma lam)^l delta_{t+l}. Returns (advantages [T], returns = A + V [T]).
    """
    r, v = rewards.float(), values.float()
    adv = torch.zeros_like(r)
    last = torch.zeros((), dtype=r.dtype, device=r.device)
    for t in range(r.shape[0] - 1, -1, -1):
        next_v = v[t + 1] if t + 1 < r.shape[0] else torch.zeros((), dtype=r.dtype, device=r.device)
        delta = r[t] + gamma * next_v - v[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + v


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, mean: float | None = None,
           var: float | None = None) -> torch.Tensor:
    """(x - mean) / std over all elements (advantage whitening); shift_mean=False keeps the mean.
    `mean`/`var` (biased) given: use them instead of x's own (e.g. those of every process's x)."""
    x = x.float()
    if mean is None or var is None:
        mean, var = x.mean(), x.var(unbiased=False)
    else:
        mean, var = torch.tensor(mean), torch.tensor(var)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                     scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """One advantage per completion from rewards [P * G] laid out prompt by prompt (G = group_size).

    grpo: (r_i - mean_group) / (std_group + eps) (DeepSeekMath, Eq. 3 outcome supervision);
          scale=False drops the division (Dr. GRPO, Liu et al. 2025, removes this difficulty bias).
    rloo: r_i - mean of the OTHER G-1 rewards of the group (Ahmadian et al. 2024, Eq. 9), which
          equals G/(G-1) (r_i - mean_group).
    """
    if group_size < 2:
        raise ValueError("group advantages need at least 2 completions per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        return (r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)).view(-1)
    if estimator != "grpo":
        raise ValueError(f"unknown estimator '{estimator}' (grpo, rloo)")
    adv = r - mean
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)   # unbiased std, as DeepSeekMath and TRL
    return adv.view(-1)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float = 0.2, clip_eps_high: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, Eq. 7), negated to be minimised.

    loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t), rho_t = exp(logp - old_logp).
    clip_eps_high (DAPO's "clip-higher") defaults to clip_eps. Returns (loss [N], clipped [N] as
    0/1: whether the clipped branch was the active one).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO value loss per token: 0.5 max((V - R)^2, (V_clipped - R)^2), with V_clipped =
    old_V + clip(V - old_V, -clip, clip) (the PPO2 baseline). Returns (loss [N], clipped [N] 0/1)."""
    v = values.float()
    v_clipped = old_values + torch.clamp(v - old_values, -clip, clip)
    a, b = (v - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(a, b), (b > a).float()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020,
    "Approximating KL divergence"; DeepSeekMath Eq. 4): unbiased, always >= 0."""
    d = ref_logprobs.float() - logprobs.float()
    return torch.exp(d) - d - 1.0


def aggregate_token_loss(per_token: torch.Tensor, seq_index: torch.Tensor, n_seqs: int, mode: str,
                         max_new_tokens: int | None = None) -> torch.Tensor:
    """Sum of a per-token loss [N] in the units that `rl_loss_units` counts, so that the loop's
    division by the step's units gives:

    token:    sum over all tokens / all tokens (DAPO; TRL's "dapo")
    sequence: mean over each sequence's tokens, then mean over sequences (GRPO as published)
    dr_grpo:  sum over all tokens / (sequences * max_new_tokens), a constant normaliser (Dr. GRPO,
              Liu et al. 2025: no length bias)
    """
    if mode in ("token", "dr_grpo"):
        return per_token.sum()
    if mode == "sequence":
        sums = torch.zeros(n_seqs, dtype=per_token.dtype, device=per_token.device).index_add(0, seq_index, per_token)
        counts = torch.bincount(seq_index, minlength=n_seqs).clamp(min=1).to(per_token.dtype)
        return (sums / counts).sum()
    raise ValueError(f"unknown loss aggregation '{mode}' (token, sequence, dr_grpo)")


def rl_loss_units(n_tokens: int, n_seqs: int, mode: str, max_new_tokens: int | None = None) -> int:
    """The units `aggregate_token_loss` sums over: tokens, sequences, or sequences x max_new_tokens."""
    if mode == "token":
        return n_tokens
    if mode == "sequence":
        return n_seqs
    if mode == "dr_grpo":
        if not max_new_tokens:
            raise ValueError("dr_grpo aggregation needs max_new_tokens")
        return n_seqs * max_new_tokens
    raise ValueError(f"unknown loss aggregation '{mode}' (token, sequence, dr_grpo)")
