"""Group Relative Policy Optimization (seed §7; Shao et al. 2024) and its variants.

For each prompt, sample a group of completions, score them, and use the group-normalised reward as
every token's advantage, A(y_i) = (r_i - mean_group r) / (std_group r + ε), in PPO's clipped
surrogate (seed §6) without a critic. Variants (:mod:`tether.losses.policy`): ``loss_type`` grpo /
dr_grpo / dapo / bnpo (and cispo, sapo, vespo, luspo), ``scale_rewards`` group / batch / none,
asymmetric clipping (``epsilon_high``), GSPO's sequence-level ratio (``importance_level=sequence``),
the KL to the reference as a loss term (β > 0) or no reference at all (β = 0), DAPO's dynamic
sampling (``filter_groups``: groups whose rewards are all equal are left out of the update), and, for
several reward functions, GDPO's decoupled normalisation (``multi_objective_aggregation``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from . import runs
from .losses.policy import (LOSS_TYPES, PolicyLossConfig, decoupled_advantages, group_advantages,
                            informative_groups)
from .online import OnlineConfig, Session, token_means


class GRPOConfig(OnlineConfig):
    """GRPO on sampled groups. Defaults: the arithmetic world's exact-match reward."""

    output_dir: str = Field("runs/grpo", description="run folder")
    loss_type: str = Field("dapo", description=f"per-token objective and aggregation: {', '.join(LOSS_TYPES)}")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide centred rewards by the group's std, the batch's, or not at all (Dr. GRPO)")
    epsilon: float = Field(0.2, gt=0, description="clip range below 1 (and above, unless epsilon_high is set)")
    epsilon_high: float | None = Field(None, gt=0, description="clip range above 1 (DAPO's clip-higher: 0.28)")
    delta: float | None = Field(None, gt=1, description="two-sided clipping: cap the unclipped ratio at delta")
    importance_level: Literal["token", "sequence"] = Field("token", description="token ratios, or GSPO's sequence-level ratio")
    kl_importance_correction: bool = Field(True, description="weight the KL term by the importance ratio (TRL's use_bias_correction_kl)")
    beta: float = Field(0.1, ge=0, description="KL coefficient (0: no reference model is loaded, TRL's default)")
    filter_groups: bool = Field(False, description="DAPO's dynamic sampling: train only on groups whose rewards differ (the others have zero advantage); no refill")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="loss_type=sapo: the soft gate's temperature τ where A > 0")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="loss_type=sapo: τ where A ≤ 0")
    vespo_k_pos: float = Field(2.0, description="loss_type=vespo: k of φ(W) = exp(λ + k log W - λ W) where A > 0")
    vespo_lambda_pos: float = Field(3.0, description="loss_type=vespo: λ where A > 0")
    vespo_k_neg: float = Field(3.0, description="loss_type=vespo: k where A ≤ 0")
    vespo_lambda_neg: float = Field(2.0, description="loss_type=vespo: λ where A ≤ 0")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field("sum_then_normalize", description="with several reward functions: normalise their weighted sum (GRPO), or normalise each function's scores within each group first, sum them with their weights, then normalise the sum over the batch (GDPO, Liu et al. 2026; TRL's option of the same name; scale_rewards then does not apply)")
    mini_batches: int = Field(2, ge=1, description="optimizer updates per rollout batch (TRL's steps_per_generation); the second is importance-weighted and clipped. Two learn faster than one at the same compute on the arithmetic world (docs/results.md)")
    prompts_per_step: int = Field(128, ge=1, description="prompts sampled per step (large batches: the gradient of a binary reward is noisy)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW); tuned for the embedded model: ~1e-6 suits billion-parameter models")

    @model_validator(mode="after")
    def _groups(self):  # a group of one has advantage 0: nothing would be learned
        if self.num_generations < 2:
            raise ValueError("GRPO needs num_generations >= 2: its advantage compares the completions of one prompt")
        return self

    @model_validator(mode="after")
    def _decoupled(self):  # GDPO normalises each function's raw scores: a change to their sum would be lost
        if self.multi_objective_aggregation == "normalize_then_sum":
            for what, on in (("kl_penalty=reward", self.kl_penalty == "reward"), ("reward_normalize=true", self.reward_normalize)):
                if on:
                    raise ValueError(f"multi_objective_aggregation=normalize_then_sum normalises each reward function's "
                                     f"scores on its own; {what} changes their sum, which it never sees: drop one of them")
        return self

    @model_validator(mode="after")
    def _vespo_sampler(self):  # VESPO folds the sampler's weights into its sequence ratio, per token (as TRL)
        if self.loss_type == "vespo" and self.sampler_mode().startswith("sequence"):
            raise ValueError(f"loss_type=vespo needs a token_* sampler_correction, not {self.sampler_correction}")
        return self

    def loss_config(self) -> PolicyLossConfig:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; known: {', '.join(LOSS_TYPES)}")
        return PolicyLossConfig(loss_type=self.loss_type, epsilon_low=self.epsilon,
                                epsilon_high=self.epsilon_high or self.epsilon, delta=self.delta,
                                importance_level=self.importance_level,
                                beta=self.beta if self.kl_penalty == "loss" else 0.0,
                                kl_estimator=self.kl_estimator, kl_importance_correction=self.kl_importance_correction,
                                max_completion_length=self.max_new_tokens, sapo_tau_pos=self.sapo_temperature_pos,
                                sapo_tau_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
                                vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
                                vespo_lambda_neg=self.vespo_lambda_neg)


def advantages(cfg: GRPOConfig, scores: torch.Tensor, weights: torch.Tensor,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) advantages of ``scores``: the total rewards (B,) normalised per ``scale_rewards``, or under
    GDPO each function's scores (B, K) with their ``weights``. With ``keep`` (filter_groups) they are
    computed over the kept groups alone, as if the batch held only them (DAPO refills it with such
    groups): the others' constant scores would shrink a batch std and inflate the kept advantages.
    The others get 0."""
    rows = keep if keep is not None else torch.ones(len(scores), dtype=torch.bool)
    adv = torch.zeros(len(scores))
    if not rows.any():
        return adv
    if cfg.multi_objective_aggregation == "normalize_then_sum":
        adv[rows] = decoupled_advantages(scores[rows], weights, cfg.num_generations)
    else:
        adv[rows] = group_advantages(scores[rows], cfg.num_generations, cfg.scale_rewards)
    return adv


def train(cfg: GRPOConfig) -> runs.FitResult:
    s = Session(cfg, "grpo")
    loss_cfg = cfg.loss_config()
    decoupled = cfg.multi_objective_aggregation == "normalize_then_sum"  # GDPO: each function on its own
    s.begin()
    for step in s.steps():
        idx, roll = s.rollout()                                               # 1. sample groups
        rewards, reward_metrics = s.score(idx, roll)                          # 2. score them
        keep = informative_groups(s.reward_each if decoupled else rewards, cfg.num_generations) \
            if cfg.filter_groups else None
        exp = s.experience(roll, rewards, keep)                               # (+ reference log-probs)
        if cfg.beta and cfg.kl_penalty == "reward":                           # KL as a reward penalty
            rewards = rewards + s.kl_reward(exp).sum(-1)
        adv = advantages(cfg, s.reward_each if decoupled else rewards,        # 3. group-relative A
                         s.rewards.weight_vector(), keep)

        metrics = s.update(exp, s.policy_loss_fn(exp, adv, loss_cfg))        # 4. clipped updates
        s.end_step(step, exp, {**reward_metrics, **token_means(metrics), "advantage_abs": float(adv.abs().mean()),
                               "groups_kept": len(exp.rows) / len(rewards)})
    return s.finish()
