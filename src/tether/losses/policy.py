"""Policy-gradient maths (seed §4-§7): advantages, KL estimators, the clipped surrogate and its
GRPO-family variants, GAE and the critic's loss.

Notation, for a batch of B completions padded to T tokens:

    π, π_old, π_ref   per-token log-probs of the sampled tokens under the policy being trained,
                      the policy that sampled them, and the reference             (B, T)
    m                 completion mask, 1 on real tokens (EOS included)            (B, T)
    A                 advantages: one per sequence (B,) or one per token (B, T)
    w = exp(π - π_old)                the importance weight of seed §5
    π_s               log-probs of the sampled tokens as the rollout engine reported them (vLLM,
                      or tether's engine in another dtype than the trainer's)            (B, T)
    ρ = exp(π_old - π_s)              the sampler-mismatch weight (:func:`sampler_weights`)

Every loss here returns the *sum* over the micro-batch divided by a normaliser that describes the
whole optimizer batch (``num_sequences``, ``num_tokens``). Gradient accumulation then adds up to the
loss of the full batch whatever the micro-batch split (1 × 8 = 2 × 4 = 8 × 1), which TRL's per-micro-batch
means (``grpo``, ``bnpo``) do not give when micro-batches differ in length. With one micro-batch the
normalisers are the batch's own, and the values equal TRL 1.16.0's (``shared/reference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

ScaleRewards = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]


# ---------------------------------------------------------------------------------------------
# Sequence-level advantages
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage (seed §7): A_i = (r_i - mean_group r) / (std + eps).

    ``rewards`` (B,) holds groups of ``group_size`` consecutive completions of one prompt. ``scale``:
    ``group`` divides by the group's std, ``batch`` by the whole batch's std (the mean is still the
    group's), ``none`` only centres (Dr. GRPO; also seed §4.1's mean baseline). std is Bessel-corrected
    (n-1) as in TRL. NaN rewards (dropped samples) are ignored by the statistics and get A = 0.
    """
    r = rewards.view(-1, group_size)
    mean = r.nanmean(-1, keepdim=True)
    centred = (r - mean).view(-1)
    if scale == "none":
        adv = centred
    else:
        std = _nanstd(r, dim=-1).repeat_interleave(group_size) if scale == "group" else _nanstd(rewards.view(1, -1), -1)
        adv = centred / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


def decoupled_advantages(rewards: torch.Tensor, weights: torch.Tensor, group_size: int,
                         eps: float = 1e-4) -> torch.Tensor:
    """GDPO's advantage for several rewards (Liu et al. 2026, "Group reward-Decoupled Normalization
    Policy Optimization"; TRL's ``multi_objective_aggregation="normalize_then_sum"``): each reward
    function's scores are normalised within each group on their own, then summed with their weights,
    and the sum is normalised over the batch:

        Â_i^k = (r_i^k - mean_group r^k) / (std_group r^k + eps),   s_i = Σ_k w_k Â_i^k,
        A_i = (s_i - mean_batch s) / (std_batch s + eps).

    Normalising the sum instead (GRPO's default) lets a reward with a wide spread drown the others,
    and different reward combinations collapse onto the same advantage. ``rewards`` (B, K): one column
    per function, NaN where a score is missing (std Bessel-corrected, as :func:`group_advantages`); a
    sample with no score at all gets A = 0, one missing only some adds the others'."""
    B, K = rewards.shape
    r = rewards.view(-1, group_size, K)
    per_reward = (r - r.nanmean(1, keepdim=True)) / (_nanstd(r, dim=1).unsqueeze(1) + eps)
    summed = (per_reward.view(B, K) * weights.to(rewards)).nansum(-1)
    summed[rewards.isnan().all(-1)] = math.nan
    adv = (summed - summed.nanmean()) / (_nanstd(summed.view(1, -1), -1) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j≠i} r_j, the baseline of seed §4.1 without the
    sample's own reward (so it stays unbiased). Equals group_size/(group_size-1) · (r_i - mean r).
    NaN rewards are left out of the baselines of the others and get A = 0."""
    if group_size < 2:
        raise ValueError("leave-one-out needs at least 2 completions per prompt")
    r = rewards.view(-1, group_size)
    valid = ~torch.isnan(r)
    total = torch.where(valid, r, 0).sum(-1, keepdim=True)
    others = (valid.sum(-1, keepdim=True) - valid.long()).clamp(min=1)
    adv = torch.where(valid, r - (total - torch.where(valid, r, 0)) / others, 0.0)
    return adv.view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: completions whose group's valid rewards are not all equal.

    A group whose completions all score alike (all solved, all failed) has zero group-relative
    advantage: it adds no policy gradient, only compute and tokens to the loss's normaliser. DAPO's
    dynamic sampling (Yu et al. 2025, eq. 11: 0 < |{correct}| < G) trains on the other groups only.
    ``rewards`` (B, K), one column per reward function (GDPO's :func:`decoupled_advantages`): a group
    is informative where any one function's scores differ.
    """
    r = rewards.view(-1, group_size, *rewards.shape[1:])
    valid = ~torch.isnan(r)
    hi = torch.where(valid, r, -torch.inf).amax(1)
    lo = torch.where(valid, r, torch.inf).amin(1)
    differ = hi > lo
    return (differ.flatten(1).any(-1) if differ.dim() > 1 else differ).repeat_interleave(group_size)


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (TRL's ``nanstd``)."""
    n = (~torch.isnan(x)).sum(dim)
    var = ((x - x.nanmean(dim, keepdim=True)) ** 2).nansum(dim) / (n - 1).clamp(min=1)
    return var.sqrt()


# ---------------------------------------------------------------------------------------------
# KL(π_θ || π_ref) per token (seed §4; Schulman 2020, "Approximating KL divergence")
# ---------------------------------------------------------------------------------------------
def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from tokens sampled from π_θ, with log r = π_ref - π:

        k1 = -log r               unbiased, high variance, can be negative
        k2 = (log r)² / 2         biased, low variance; its gradient is the KL's gradient on-policy
        k3 = (r - 1) - log r      unbiased, low variance, ≥ 0 (GRPO's choice, TRL's only one)
    """
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}: k1, k2 or k3")


# ---------------------------------------------------------------------------------------------
# The surrogate objective and its variants (seed §5-§7)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyLossConfig:
    """How the per-token objective is formed and aggregated. Field names follow TRL's GRPOConfig."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2  # clip range below 1
    epsilon_high: float = 0.2  # clip range above 1 (DAPO's clip-higher: 0.28)
    delta: float | None = None  # two-sided clipping: cap w at delta in the unclipped branch (INTELLECT-2)
    importance_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's length-normalised ratio
    beta: float = 0.0  # KL as a loss term (0: no reference needed)
    kl_estimator: KLEstimator = "k3"
    kl_importance_correction: bool = True  # multiply the KL term by w (TRL's use_bias_correction_kl)
    max_completion_length: int = 0  # dr_grpo's constant normaliser (0: the padded length T)
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass
class _Terms:
    logps: torch.Tensor  # π (B, T), carries gradient
    log_ratio: torch.Tensor  # π - π_old (B, T)
    w: torch.Tensor  # importance weight, (B, T) or (B, 1) for sequence level
    adv: torch.Tensor  # (B, 1) or (B, T)
    mask: torch.Tensor
    cfg: PolicyLossConfig
    rho: torch.Tensor | None = None  # sampler-mismatch weights (B, T), or None


def _clipped(t: _Terms) -> torch.Tensor:
    """PPO's clipped surrogate (seed §6): -min(w A, clip(w, 1-ε_lo, 1+ε_hi) A). With ``delta``, w is
    capped in the unclipped branch only."""
    c = t.cfg
    clipped = t.w.clamp(1 - c.epsilon_low, 1 + c.epsilon_high)
    w = t.w.clamp(max=c.delta) if c.delta is not None else t.w
    return -torch.min(w * t.adv, clipped * t.adv)


def _cispo(t: _Terms) -> torch.Tensor:
    """CISPO (MiniMax-M1): -sg(min(w, ε_hi)) A π, REINFORCE with a clipped, detached weight."""
    return -t.w.clamp(max=t.cfg.epsilon_high).detach() * t.adv * t.logps


def _sapo(t: _Terms) -> torch.Tensor:
    """SAPO: a soft gate (4/τ) σ(τ (w - 1)) in place of the hard clip, τ by the advantage's sign."""
    tau = torch.where(t.adv > 0, t.cfg.sapo_tau_pos, t.cfg.sapo_tau_neg)
    return -torch.sigmoid(tau * (t.w - 1)) * 4 / tau * t.adv


def _vespo(t: _Terms) -> torch.Tensor:
    """VESPO: -sg(φ(W)) A π, φ(W) = exp(λ + k log W - λ W) of the sequence ratio W = Π_t w_t."""
    c, lo = t.cfg, math.log(1e-8)
    with torch.no_grad():
        log_w = (t.log_ratio.clamp(-20, 20) * t.mask).sum(-1, keepdim=True)
        if t.rho is not None:  # W = Π_t w_t ρ_t: the mismatch weights join the sequence ratio (as TRL)
            log_w = log_w + t.rho.log().clamp(lo, 20.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(lo, 20.0)
        pos = t.adv >= 0
        k = torch.where(pos, c.vespo_k_pos, c.vespo_k_neg)
        lam = torch.where(pos, c.vespo_lambda_pos, c.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * t.adv * t.logps


# per-token objective and aggregation of each loss type: one registry, one dispatch
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
PER_TOKEN: dict[str, Callable[[_Terms], torch.Tensor]] = {
    **{name: _clipped for name in _CLIPPED}, "cispo": _cispo, "sapo": _sapo, "vespo": _vespo}

Aggregation = Literal["sequence_mean", "token_mean", "constant", "sequence_sum"]
AGGREGATION: dict[str, Aggregation] = {
    "grpo": "sequence_mean",  # mean over sequences of each sequence's token mean (DeepSeekMath)
    "sapo": "sequence_mean",
    "bnpo": "token_mean",  # token mean over the batch
    "dapo": "token_mean",  # token mean over the generation batch (DAPO); = bnpo with one step per rollout
    "cispo": "token_mean",
    "vespo": "token_mean",
    "dr_grpo": "constant",  # Σ / (B · max_completion_length): no length bias (Dr. GRPO)
    "luspo": "sequence_sum",  # mean over sequences of each sequence's token sum
}
LOSS_TYPES = tuple(PER_TOKEN)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation, num_sequences: int,
              num_tokens: float, max_len: int) -> torch.Tensor:
    """Σ over the micro-batch, divided by what ``how`` normalises by over the whole optimizer batch
    (``num_sequences`` completions holding ``num_tokens`` completion tokens)."""
    masked = per_token * mask
    if how == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    if how == "token_mean":
        return masked.sum() / max(num_tokens, 1.0)
    if how == "constant":
        return masked.sum() / (num_sequences * max_len)
    if how == "sequence_sum":
        return masked.sum() / num_sequences
    raise ValueError(f"unknown aggregation {how!r}")


@dataclass
class EntropyTerms:
    """What :func:`policy_loss` does with the entropy H_t of each position's distribution (of the
    logits over the temperature): a bonus -c · H̄ on the mean over the tokens it counts, and
    ``keep``, the high-entropy tokens that alone carry the policy term (:func:`high_entropy_mask`)."""

    entropy: torch.Tensor  # (B, T) H_t, with gradient where the bonus is on
    coef: float = 0.0  # c; 0: no bonus (H still feeds ``keep`` and the logs)
    keep: torch.Tensor | None = None  # (B, T) 1 on the tokens kept by top_entropy_quantile, None: all
    num_tokens: float | None = None  # tokens H̄ averages over in the whole optimizer batch (default: this micro-batch's)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float,
                      threshold: torch.Tensor | float | None = None) -> torch.Tensor:
    """Beyond the 80/20 rule (Wang et al. 2025): the policy gradient on the top ``top_quantile`` share
    of tokens by entropy only, the "forking" tokens where a completion branches (0.2 in the paper).
    1 where H_t ≥ the (1 - q) quantile of the entropies on the mask (torch.quantile's linear
    interpolation, as TRL 1.16's ``get_high_entropy_mask``), 0 elsewhere and off the mask. ``threshold``
    gives that quantile when it was taken over more than these rows (an optimizer batch split into
    micro-batches: :meth:`tether.online.Session.update`), so that the split does not change it."""
    with torch.no_grad():
        real = mask.bool()
        if threshold is None:
            if not real.any():
                return torch.zeros_like(mask)
            threshold = torch.quantile(entropy[real].float(), 1 - top_quantile)
        return ((entropy >= threshold) & real).to(mask.dtype)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, cfg: PolicyLossConfig, ref_logps: torch.Tensor | None = None,
                num_sequences: int | None = None, num_tokens: float | None = None,
                sampler_weights: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                entropy: EntropyTerms | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped, importance-weighted policy-gradient loss of seed §5-§7 with an optional KL term.

    ``old_logps`` None means on-policy: π_old = sg(π), so w = 1 in value and carries gradient (TRL's
    behaviour with one update per rollout). ``advantages`` (B,) or (B, T). ``num_sequences`` and
    ``num_tokens`` describe the whole optimizer batch (default: this micro-batch).

    ``sampler_weights`` ρ ((B, T) or (B, 1), from :func:`sampler_weights`) multiply the policy term
    of each token, not the KL term: the tokens were drawn by the sampler, not by π_old (VESPO takes
    them into its sequence ratio instead, and needs them per token). ``keep`` ((B, 1) or (B, T),
    from :func:`off_policy_mask`) zeroes the policy term of what it drops. ``entropy``
    (:class:`EntropyTerms`): ``keep`` zeroes the policy term of low-entropy tokens (TRL's
    ``top_entropy_quantile``), and with ``coef`` c the loss gains -c · Σ_t H_t m_t k_t / n, the mean
    entropy over the kept tokens of the optimizer batch, whatever the loss type's normaliser (TRL's
    ``entropy_coef``). The order is TRL 1.16's.

    Returns (loss, metrics): metrics are sums over this micro-batch, to be divided by the batch's token
    count (``kl_sum``, ``clip_low``, ``clip_high`` are token sums) so that they accumulate exactly too.
    """
    if cfg.loss_type not in PER_TOKEN:
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if cfg.importance_level == "sequence":  # GSPO: w = exp(mean_t log ratio), one per sequence
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    elif cfg.importance_level == "token":
        log_w = log_ratio
    else:
        raise ValueError(f"importance_level must be 'token' or 'sequence', not {cfg.importance_level!r}")
    w = log_w.exp()
    if sampler_weights is not None and cfg.loss_type == "vespo" and sampler_weights.shape != logps.shape:
        raise ValueError("vespo takes the sampler's weights per token (a token_* sampler correction)")
    terms = _Terms(logps, log_ratio, w, adv, mask, cfg, sampler_weights if cfg.loss_type == "vespo" else None)
    per_token = PER_TOKEN[cfg.loss_type](terms)
    if keep is not None:
        per_token = per_token * keep
    if entropy is not None and entropy.keep is not None:
        per_token = per_token * entropy.keep
    if sampler_weights is not None and cfg.loss_type != "vespo":
        per_token = per_token * sampler_weights

    metrics: dict[str, torch.Tensor] = {}
    if cfg.beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = kl_estimate(logps, ref_logps, cfg.kl_estimator)
        if cfg.kl_importance_correction:
            kl = kl * w  # the tokens came from π_old, the KL is of π_θ: reweight (TRL's bias correction)
        per_token = per_token + cfg.beta * kl
        metrics["kl_sum"] = (kl * mask).sum().detach()
    n_seq = num_sequences or logps.shape[0]
    n_tok = float(mask.sum()) if num_tokens is None else num_tokens
    loss = aggregate(per_token, mask, AGGREGATION[cfg.loss_type], n_seq, n_tok,
                     cfg.max_completion_length or logps.shape[1])
    if entropy is not None and entropy.coef:  # the bonus: -c · mean H over the (kept) tokens
        counted = mask if entropy.keep is None else mask * entropy.keep
        n_ent = float(counted.sum()) if entropy.num_tokens is None else entropy.num_tokens
        mean_h = (entropy.entropy * counted).sum() / max(n_ent, 1.0)
        loss = loss - entropy.coef * mean_h
    if entropy is not None and entropy.keep is not None:
        metrics["entropy_kept_sum"] = (entropy.keep * mask).sum().detach()

    if cfg.loss_type in _CLIPPED:  # how often the clip was active in the direction that binds
        w_c = w.clamp(max=cfg.delta) if cfg.delta is not None else w
        low = ((w_c < 1 - cfg.epsilon_low) & (adv < 0)).to(mask.dtype).expand_as(mask)
        high = ((w_c > 1 + cfg.epsilon_high) & (adv > 0)).to(mask.dtype).expand_as(mask)
        metrics["clip_low"] = (low * mask).sum().detach()
        metrics["clip_high"] = (high * mask).sum().detach()
    metrics["tokens"] = mask.sum().detach()
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Sampler mismatch (seed §5's π_old is the policy that sampled; an engine only approximates it)
# ---------------------------------------------------------------------------------------------
SamplerCorrection = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
SAMPLER_CORRECTIONS: tuple[str, ...] = get_args(SamplerCorrection)


def sampler_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                    mode: SamplerCorrection, clip_min: float | None = None, clip_max: float | None = 3.0,
                    ) -> torch.Tensor:
    """The importance weight that corrects for tokens drawn by a sampler π_s which only approximates
    the trainer's π_old (vLLM in bf16, other kernels): seed §5's estimator assumes y ~ π_old, and
    E_{y~π_s}[ρ f(y)] = E_{y~π_old}[f(y)] for the sequence's ratio; the token's ignores its prefix's,
    trading that bias for variance:

        token_*:     ρ_t = π_old(y_t) / π_s(y_t)                          (B, T)
        sequence_*:  ρ   = Π_t π_old(y_t) / π_s(y_t)                      (B, 1)

    ``*_truncate`` clips ρ to [clip_min, clip_max] (truncated IS, Yao et al. 2025: bias for bounded
    variance); ``*_mask`` sets ρ to 0 outside it (masked IS: the sample is dropped). Detached: a
    constant per token, as the sampler's log-probs and π_old are. Off the mask ρ = 1; a NaN sampler
    log-prob (a token the engine could not score) gives ρ_t = 1. TRL 1.16's
    ``vllm_importance_sampling_mode`` and ``_clip_min/_clip_max``, the same values (tested)."""
    if mode not in SAMPLER_CORRECTIONS or mode == "none":
        raise ValueError(f"sampler correction {mode!r}: one of {', '.join(SAMPLER_CORRECTIONS[1:])}")
    with torch.no_grad():
        diff = torch.nan_to_num((old_logps - sampler_logps) * mask, nan=0.0)
        log_rho = diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff
        rho = log_rho.exp()
        if mode.endswith("truncate"):
            return rho.clamp(min=clip_min, max=clip_max)
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        return rho.masked_fill((rho < lo) | (rho > hi), 0.0)


def off_policy_mask(advantages: torch.Tensor, logps: torch.Tensor, sampler_logps: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (eq. 9): drop a completion with a negative advantage
    whose mean per-token KL(π_s || π_θ), estimated by mean_t (π_s - π) over its tokens, exceeds
    ``threshold``: learning to avoid what a policy far from π_θ sampled mostly adds noise. 1 keeps,
    0 drops; (B, 1) for sequence advantages, (B, T) for token ones (PPO's). NaN log-probs count 0."""
    with torch.no_grad():
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        kl = torch.nan_to_num(sampler_logps - logps, nan=0.0) * mask
        mean_kl = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)


# ---------------------------------------------------------------------------------------------
# Actor/critic (seed §4.3, §6): GAE, returns, the value loss
# ---------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded token sequences:

        δ_t = r_t + γ V_{t+1} - V_t          (V_{t+1} = 0 after the last real token)
        A_t = δ_t + γ λ A_{t+1},   R_t = A_t + V_t  (the critic's target, seed §4.3)

    ``rewards``, ``values``, ``mask`` (B, T). Returns (advantages, returns), zero off the mask.
    """
    m = mask.to(values.dtype)
    v = values * m
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_v - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
    return adv, (adv + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage whitening); zero off the mask."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, num_tokens: float | None = None) -> torch.Tensor:
    """The critic's squared error of seed §4.3, ½ (V - R)², with PPO's optional clipping of V to
    old ± clip (the pessimistic max of the two errors). A token mean over the optimizer batch."""
    m = mask.to(values.dtype)
    err = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.max(err, (v_clip - returns) ** 2)
    n = float(m.sum()) if num_tokens is None else num_tokens
    return 0.5 * (err * m).sum() / max(n, 1.0)
