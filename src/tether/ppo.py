"""Proximal Policy Optimization with a learned critic (seed §4.3, §6; Schulman et al. 2017,
Ouyang et al. 2022), on one machine.

Per step: sample, score, then per token the reward r_t = -β KL_t (+ the sequence's score on its
last token), the critic's values V(s_t), GAE(γ, λ) advantages and returns, whitened advantages;
then epochs × shuffled mini-batches of the clipped surrogate plus the (clipped) value loss, importance
-weighted against the sampling policy's stored log-probs (seed §5).

The critic is a value head on the policy's own hidden states (``critic=head``, the default) or a
separate value model (``critic=separate``: a causal-LM backbone with a scalar head, initialised from
the policy or from ``critic_model``, e.g. a trained reward model; it costs a second backbone's forward
and backward every update). The head reads the states detached, so the backbone learns from the
policy loss alone, unless ``head_trains_backbone`` makes the two losses share it as in the value-head
models of the first RLHF PPO implementations. Read detached, the head is a linear function of
features the value loss cannot move, and its squared error can be solved by least squares after
each rollout (``critic_fit=least_squares``, :meth:`ValueHead.fit`) instead of by gradient steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field, model_validator

from . import lora, runs
from .config import ConfigError
from .losses.policy import PolicyLossConfig, gae, policy_loss, value_loss, whiten
from .online import Experience, MicroBatch, OnlineConfig, Session, sequence_rewards_to_tokens, token_means


class PPOConfig(OnlineConfig):
    """PPO with a critic. A group per prompt is not needed (the critic is the baseline), but the
    completions of one prompt share their forwards' common prefixes, so they are cheaper than as many
    prompts."""

    output_dir: str = Field("runs/ppo", description="run folder")
    critic: Literal["separate", "head"] = Field("head", description="a value head on the policy, or a separate value model (a second backbone, with LoRA adapters under lora_rank: ~1.6x the step time; on the arithmetic world it learns less in the same wall time, docs/results.md)")
    critic_model: str | None = Field(None, description="checkpoint the separate critic starts from (default: the policy's)")
    head_trains_backbone: bool = Field(False, description="critic=head: let the value loss train the policy's backbone too (the shared value heads of early RLHF PPO); off, the head reads detached hidden states and the backbone learns from the policy loss alone (docs/hosts.md)")
    gamma: float = Field(1.0, gt=0, le=1, description="discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="λ of GAE")
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    cliprange: float = Field(0.2, gt=0, description="ε of the clipped ratio")
    cliprange_value: float | None = Field(0.2, gt=0, description="clip of the value update around the old values (None: unclipped); a critic trained by gradient")
    whiten_advantages: bool = Field(True, description="normalise advantages to zero mean, unit std over the batch")
    beta: float = Field(0.05, ge=0, description="KL coefficient")
    kl_penalty: Literal["loss", "reward"] = Field("reward", description="KL as a per-token reward penalty (PPO's usual form) or a loss term")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator")
    num_generations: int = Field(8, ge=1, description="completions per prompt: those of one prompt share their forwards' common prefixes, so 8 cost 1.3x what 4 do on the arithmetic world and learn faster per second (docs/results.md)")
    prompts_per_step: int = Field(128, ge=1, description="prompts sampled per step")
    epochs: int = Field(1, ge=1, description="PPO epochs over each rollout batch")
    mini_batches: int = Field(2, ge=1, description="optimizer updates per epoch (two, as GRPO: more greedy accuracy per second on the arithmetic world, docs/results.md)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW) of the policy; tuned for the embedded model: ~1e-6 suits billion-parameter models")
    critic_fit: Literal["gradient", "least_squares"] = Field("gradient", description="how a detached value head (critic=head) learns its squared error: AdamW steps (critic_lr), or solved exactly by least squares over the rollouts so far (older steps weighted critic_forget per step). A separate critic, or a head that trains the backbone, learns by gradient. On the arithmetic world the least-squares head explains more of the returns (explained variance ~0.1 against ~0.03) but the policy learned no faster in two paired runs (docs/results.md)")
    critic_forget: float = Field(0.9, ge=0, le=1, description="critic_fit=least_squares: weight of each earlier step's rollouts, per step (0.9: about the last 10 steps; 1: all equally)")
    critic_lr: float | None = Field(None, gt=0, description="learning rate of a critic trained by gradient (default: 10 × lr; a critic must track the policy)")

    @model_validator(mode="after")
    def _critic_options(self):  # settings that would be ignored are refused, not dropped without a word
        if self.critic_model and self.critic != "separate":
            raise ValueError("critic_model is the separate critic's start: it needs critic=separate")
        if self.critic_fit == "least_squares" and (self.critic != "head" or self.head_trains_backbone):
            raise ValueError("critic_fit=least_squares fits a detached value head: it needs critic=head and "
                             "head_trains_backbone=false")
        if self.head_trains_backbone and self.critic == "separate":
            raise ValueError("head_trains_backbone is about a value head on the policy (critic=head); a separate "
                             "critic has a backbone of its own")
        if self.critic_lr is not None and self.critic_fit == "least_squares":
            raise ValueError("critic_lr is the step size of a critic trained by gradient; critic_fit=least_squares "
                             "solves the head exactly and takes none")
        return self


HIDDEN_BUDGET = 1 << 30  # bytes of rollout hidden states (float32) kept for the old values


class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on hidden states; zero-initialised so the first values are 0.

    On detached states the value loss ½ Σ (w·h_t + b - R_t)² is a linear least-squares problem, and
    :meth:`fit` solves it exactly instead of taking gradient steps on it: (w, b) minimise the squared
    error over every rollout so far, step k's tokens weighted ρ^(age in steps) (recursive least squares
    with forgetting: the policy, hence the returns, drift), plus a small ridge term. The sufficient
    statistics Σ x xᵀ and Σ x R (x = [h, 1], float64) are buffers: checkpoints carry them."""

    def __init__(self, hidden: int):
        super().__init__()
        self.v = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.v.weight)
        torch.nn.init.zeros_(self.v.bias)
        self.register_buffer("xtx", torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64))
        self.register_buffer("xty", torch.zeros(hidden + 1, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.v(h.float())[..., 0]

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], forget: float, ridge: float = 1e-3) -> None:
        """Add one step's (states (n, H), returns (n,)) batches to the statistics, older steps weighted
        down by ``forget``, and set (w, b) = (Σ x xᵀ + α I)⁻¹ Σ x R, α = ``ridge`` × mean diagonal."""
        self.xtx.mul_(forget)
        self.xty.mul_(forget)
        for h, target in batches:  # the products in float32 (a step's ~12k tokens: 3 ms, not 30), summed in float64
            x = torch.cat([h.float(), h.new_ones(len(h), 1, dtype=torch.float32)], dim=1)
            self.xtx.add_(x.T @ x)
            self.xty.add_(x.T @ target.float())
        if not self.xtx.diagonal().any():
            return
        a = self.xtx + ridge * self.xtx.diagonal().mean() * torch.eye(len(self.xty), dtype=torch.float64)
        wb = torch.linalg.solve(a, self.xty)
        self.v.weight.copy_(wb[:-1][None])
        self.v.bias.copy_(wb[-1:])


class SeparateCritic(torch.nn.Module):
    """A backbone of its own (the policy's architecture and start) with a :class:`ValueHead`."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.head = ValueHead(lm.config.hidden_size)


def train(cfg: PPOConfig) -> runs.FitResult:
    s = Session(cfg, "ppo")
    s.on_policy_shortcut = False  # the loss reads π_old from the experience, even in a rollout's first update
    from .modeling import load_causal_lm, resolve_model_path

    if cfg.critic == "separate":  # with lora_rank, adapters on its backbone too (OpenRLHF's LoRA critic)
        if cfg.critic_model:  # it reads the policy's token ids: the same vocabulary, or it reads noise
            from .modeling import load_tokenizer

            if load_tokenizer(resolve_model_path(cfg.critic_model)).get_vocab() != s.tokenizer.get_vocab():
                raise ConfigError(f"critic_model={cfg.critic_model}: its tokenizer is not the policy's, and the critic "
                                  "reads the policy's token ids; start it from a model with the policy's tokenizer")
        lm = load_causal_lm(resolve_model_path(cfg.critic_model) if cfg.critic_model else s.base_path)
        critic = SeparateCritic(lora.apply(lm, cfg))
        runs.train_mode(critic.lm, cfg)
    else:
        critic = ValueHead(s.policy.config.hidden_size)
    least_squares = cfg.critic == "head" and cfg.critic_fit == "least_squares" and not cfg.head_trains_backbone
    if least_squares:  # fitted in closed form after each rollout, not by the optimizer
        critic.requires_grad_(False)
    s.add_module("critic", critic, cfg.critic_lr or 10 * cfg.lr)
    loss_cfg = PolicyLossConfig(loss_type="bnpo", epsilon_low=cfg.cliprange, epsilon_high=cfg.cliprange,
                                beta=cfg.beta if cfg.kl_penalty == "loss" else 0.0, kl_estimator=cfg.kl_estimator)

    def values(rows: torch.Tensor, policy_hidden: torch.Tensor | None, roll) -> torch.Tensor:
        """V(s_t) at each completion position (n, L), from the critic's backbone or the policy's."""
        if isinstance(critic, SeparateCritic):  # its backbone's hidden states; its LM head is never used
            return critic.head(s.hidden(critic.lm, roll, rows))
        # detached by default: the value loss would otherwise pull the shared backbone towards predicting
        # returns, against the policy gradient in the same weights (from two SFT starts, greedy +3.7 / +5.3
        # points in 110 steps detached against +1.3 / +0.0 shared; docs/hosts.md)
        return critic(policy_hidden if cfg.head_trains_backbone else policy_hidden.detach())

    # the engine keeps the states it sampled from, the old values' input, where they fit in memory (a
    # second no-grad forward of the policy otherwise: ~0.2 s of a 1.26 s quickstart step)
    kept = cfg.prompts_per_step * cfg.num_generations * cfg.max_new_tokens * s.policy.config.hidden_size * 4
    # and where it samples in the trainer's dtype: a bf16 sampler's states are not an fp32 trainer's
    keep_states = cfg.critic == "head" and kept <= HIDDEN_BUDGET
    if keep_states and cfg.sampling_dtype() == cfg.dtype:
        s.params = dataclasses.replace(s.params, return_hidden=True)

    s.begin()
    for step in s.steps():
        idx, roll = s.rollout()                                                  # 1. sample
        rewards, reward_metrics = s.score(idx, roll)                             # 2. score
        # a sampler correction's forward of π_old also yields the value head's states (else one more)
        exp = s.experience(roll, rewards, states=keep_states and roll.hidden is None)
        chunks = torch.arange(len(exp)).split(cfg.micro_batch_size)

        def head_states(mb: torch.Tensor) -> torch.Tensor:
            """The value head's input: the states the engine sampled from, or those of the trainer's
            forward of π_old, or a forward (vLLM, another sampling dtype, more than HIDDEN_BUDGET)."""
            if roll.hidden is not None:
                return roll.hidden[mb]
            return exp.extra["states"][mb] if "states" in exp.extra else s.hidden(s.policy, roll, mb)

        with torch.no_grad():                                                    # 3. values, GAE
            if cfg.critic == "head" and roll.hidden is not None:
                old_v = critic(roll.hidden)
            else:
                old_v = torch.cat([values(mb, head_states(mb) if cfg.critic == "head" else None, roll)
                                   for mb in chunks])
        token_r = sequence_rewards_to_tokens(rewards, exp.mask)
        if cfg.kl_penalty == "reward":
            token_r = token_r + s.kl_reward(exp)
        old_v = old_v * exp.mask
        adv, returns = gae(token_r, old_v, exp.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, exp.mask)
        if least_squares:  # the critic's new weights: its squared error on this rollout and the earlier ones
            critic.fit(((head_states(mb)[exp.mask[mb].bool()], returns[mb][exp.mask[mb].bool()]) for mb in chunks),
                       cfg.critic_forget)

        def loss_fn(batch: MicroBatch):
            rows = batch.rows
            logps, entropy, h = s.logps(s.policy, roll, rows, with_hidden=True, entropy_grad=s.entropy_grad())
            ref = exp.ref_logps[rows] if exp.ref_logps is not None else None
            rho, keep, sm = s.sampler_terms(exp, rows, logps, adv[rows])
            pl, m = policy_loss(logps, exp.old_logps[rows], adv[rows], exp.mask[rows], loss_cfg, ref,
                                num_sequences=batch.num_sequences, num_tokens=batch.num_tokens, sampler_weights=rho,
                                keep=keep, entropy=s.entropy_terms(batch, entropy, exp.mask[rows]))
            s.measure_gap(batch, exp, logps)
            v = values(rows, h, roll)
            vl = value_loss(v, old_v[rows], returns[rows], exp.mask[rows], cfg.cliprange_value, batch.num_tokens)
            m = {**m, **sm, "value_loss": vl.detach(), "entropy_sum": (entropy.detach() * exp.mask[rows]).sum(),
                 "ratio_dev_sum": ((logps - exp.old_logps[rows]).abs() * exp.mask[rows]).sum().detach()}
            return (pl if least_squares else pl + cfg.vf_coef * vl), m  # least squares: already fitted

        metrics = s.update(exp, loss_fn)                                         # 4. epochs × mini-batches
        s.end_step(step, exp, {**reward_metrics, **token_means(metrics), **_value_stats(exp, old_v, returns)})
    return s.finish()


def _value_stats(exp: Experience, values: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
    """How well the critic explains the returns: 1 - Var(R - V) / Var(R) over real tokens."""
    m = exp.mask.bool()
    r, v = returns[m], values[m]
    var = float(r.var()) if r.numel() > 1 else 0.0
    return {"value_mean": float(v.mean()) if v.numel() else 0.0,
            "explained_variance": 1 - float((r - v).var()) / var if var > 0 else 0.0}
