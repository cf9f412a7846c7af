"""REINFORCE with a baseline (seed §4.1; Williams 1992) and its leave-one-out form, RLOO
(Kool et al. 2019; Ahmadian et al. 2024).

    ∇L = 1/N Σ_i (r_i - b_i) Σ_t ∇ log π_θ(a_t^i | s_t^i)

with b_i the mean reward of the prompt's completions (``baseline=mean``, seed §4.1's centring), the
mean of the *other* completions (``baseline=loo``: unbiased), or 0 (``none``). The KL to the
reference is subtracted from the reward by default (r_i - β Σ_t KL_t), the classic RLHF form. With
``epochs=1, mini_batches=1`` this is plain on-policy REINFORCE; more of either reuses the rollout
with importance weights (seed §5), clipped at 1 ± ``epsilon`` against large ratios.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from . import runs
from .losses.policy import PolicyLossConfig, group_advantages, leave_one_out_advantages
from .online import OnlineConfig, Session, token_means


class ReinforceConfig(OnlineConfig):
    """REINFORCE / RLOO on sampled groups."""

    output_dir: str = Field("runs/reinforce", description="run folder")
    baseline: Literal["mean", "loo", "none"] = Field("loo", description="per-prompt baseline: mean of the group, leave-one-out (RLOO), or none")
    normalize: Literal["sequence_sum", "token_mean"] = Field("sequence_sum", description="Σ_t per sequence averaged over sequences (seed §4.1), or a token mean")
    epsilon: float = Field(0.2, gt=0, description="clip of the importance ratio when a rollout is reused")
    beta: float = Field(0.05, ge=0, description="KL coefficient")
    kl_penalty: Literal["loss", "reward"] = Field("reward", description="KL subtracted from the reward (sequence sum) or a loss term")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator")
    prompts_per_step: int = Field(128, ge=1, description="prompts sampled per step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW); tuned for the embedded model: ~1e-6 suits billion-parameter models")


    @model_validator(mode="after")
    def _group(self):
        if self.baseline == "loo" and self.num_generations < 2:
            raise ValueError("baseline=loo needs num_generations >= 2 (the others' mean is the baseline)")
        if self.baseline == "mean" and self.num_generations < 2:
            raise ValueError("baseline=mean needs num_generations >= 2: a group of one is its own mean, so every "
                             "advantage would be 0 (baseline=none trains on the raw rewards)")
        return self


def advantages(rewards: torch.Tensor, group_size: int, baseline: str) -> torch.Tensor:
    if baseline == "loo":
        return leave_one_out_advantages(rewards, group_size)
    if baseline == "mean":
        return group_advantages(rewards, group_size, "none")
    return torch.nan_to_num(rewards, nan=0.0)


def train(cfg: ReinforceConfig) -> runs.FitResult:
    s = Session(cfg, "reinforce")
    loss_cfg = PolicyLossConfig(loss_type="luspo" if cfg.normalize == "sequence_sum" else "bnpo",
                                epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon,
                                beta=cfg.beta if cfg.kl_penalty == "loss" else 0.0, kl_estimator=cfg.kl_estimator)
    s.begin()
    for step in s.steps():
        idx, roll = s.rollout()                                               # 1. sample
        rewards, reward_metrics = s.score(idx, roll)                          # 2. score
        exp = s.experience(roll, rewards)
        if cfg.kl_penalty == "reward":
            rewards = rewards + s.kl_reward(exp).sum(-1)                      # r - β Σ_t KL_t
        adv = advantages(rewards, cfg.num_generations, cfg.baseline)          # 3. r - baseline

        metrics = s.update(exp, s.policy_loss_fn(exp, adv, loss_cfg))        # 4. update
        s.end_step(step, exp, {**reward_metrics, **token_means(metrics)})
    return s.finish()
