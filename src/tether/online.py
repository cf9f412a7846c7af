"""What REINFORCE, PPO and GRPO share: the pipeline of seed §5, stage by stage.

    1. rollout      prompts → the engine samples n completions each, with their log-probs
    2. score        the reward set scores the texts (invalid scores by its documented policy)
    3. advantages   algorithm-specific (the caller's loop)
    4. update       epochs × shuffled mini-batches of the stored rollout, importance-weighted
                    against π_old (the sampler's log-probs, or the trainer's own with ρ = π_old/π_sampler
                    under a sampler correction); then π_old ← π_θ (the engine samples from π_θ)

:class:`Session` owns the models, the engine, the optimizer, the logger and checkpoints, so that each
algorithm's own module is one loop that reads like the list above. Each stage is a method with plain
tensors in and out: a distributed engine or reward worker replaces one method, not the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from . import lora, runs
from .arith import ArithSpec, problem_space
from .data import DataError, EpochSampler, chat_prompt_text, prompt_ids, read_rows
from .decoding import tree_states
from .evaluate import engine_accuracy, load_eval_rows
from .lora import LoraFields
from .losses.policy import (SAMPLER_CORRECTIONS, EntropyTerms, PolicyLossConfig, high_entropy_mask, kl_estimate,
                            off_policy_mask, policy_loss, sampler_weights)
from .modeling import (attention_mask_4d, autocast, check_context, custom_masks_exact, head_logits, load_causal_lm,
                       load_tokenizer, padding_id, resolve_model_path)
from .rewards import RewardContext, RunningNorm, length_correlation, make_rewards
from .rollout import Rollout, RolloutEngine, SamplingParams, TorchEngine
from .runlog import RunLogger, read_metrics

log = logging.getLogger(__name__)


class OnlineConfig(runs.RunConfig, LoraFields, runs.RefSyncFields):
    """Fields of every online RL trainer. One step = one rollout batch and its updates."""

    data: str = Field("arith", description="'arith' (the arithmetic world's training problems) or a file/folder of rows with 'prompt' (other fields reach the reward as metadata)")
    arith: ArithSpec = Field(default_factory=ArithSpec, description="difficulty of the arithmetic world")
    max_steps: int = Field(100, ge=1, description="rollout steps (each: sample, score, then epochs × mini_batches optimizer updates)")
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled per step")
    num_generations: int = Field(8, ge=1, description="completions per prompt (the group of GRPO / RLOO)")
    max_new_tokens: int = Field(16, ge=1, description="longest completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the trainer's log-probs use the same); > 0: a policy gradient needs sampled completions (greedy decoding has no gradient to follow)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int = Field(0, ge=0, description="top-k sampling (0: off)")
    min_p: float = Field(0.0, ge=0, lt=1, description="min-p sampling: keep the tokens at least min_p × the likeliest one's probability (0: off; TRL's and vLLM's min_p)")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch (PPO epochs, GRPO num_iterations)")
    mini_batches: int = Field(1, ge=1, description="optimizer updates per epoch; the rollout batch is shuffled and split")
    micro_batch_size: int = Field(512, ge=1, description="completions per forward/backward (gradient accumulation does not change the loss); 512 runs a quickstart-sized GRPO update 10-15% faster than 128 (fewer, larger products)")
    lean_forward: bool = Field(True, description="run the update's and the reference's packed prefix-tree rows through tether's own forward (Llama, Mistral, Qwen2, Qwen3: projections and MLP on real tokens only, fused projections; other architectures use the model's forward): 10-17% less time for both in a quickstart-sized step, the same maths rounded differently; false runs the model's own forward (docs/online-rl.md)")
    beta: float = Field(0.0, ge=0, description="KL coefficient (0: no reference model is loaded)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token estimator of KL(π_θ||π_ref)")
    kl_penalty: Literal["loss", "reward"] = Field("loss", description="KL as a loss term, or subtracted from the reward per token")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL controller (Ziegler et al. 2019): target KL per sequence; None keeps beta fixed")
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon, in samples")
    reward: str | dict[str, float] = Field("exact_match", description="reward name, or {name: weight} for a weighted sum")
    reward_on_invalid: Literal["fallback", "drop"] = Field("fallback", description="a None/NaN/inf score or a raising reward: use reward_fallback, or drop the sample")
    reward_fallback: float = Field(0.0, description="score given to an invalid one under reward_on_invalid=fallback")
    max_invalid_steps: int = Field(3, ge=0, description="stop the run when a reward function scored none of a step's completions (every score invalid: it raised, or no sample had what it needs) this many steps running: a broken reward or data set, not noise (0: never stop)")
    reward_normalize: bool = Field(False, description="normalise the total reward by its running mean and std (state kept in checkpoints)")
    mask_truncated_completions: bool = Field(False, description="no loss on completions that hit max_new_tokens without EOS")
    eval_data: str = Field("auto", description="'arith', a file of {prompt, answer} rows, 'none', or 'auto' (arith when data=arith)")
    eval_samples: int = Field(200, ge=1, description="held-out prompts scored by greedy exact match")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: before and after only)")
    log_completions: int = Field(8, ge=0, description="write this many of each step's completions (the first prompts' groups), with their prompts, rewards and lengths, to completions.jsonl in the run folder, and the last step's to the report (0: none)")
    schedule: Literal["cosine", "constant"] = Field("constant", description="learning-rate schedule after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr, in steps")
    engine: Literal["torch", "vllm"] = Field("torch", description="where completions are sampled: tether's engine on the policy itself (CPU or one GPU), or vLLM colocated on a GPU (pip install 'tether[vllm]'; tether.vllm_engine)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="engine=vllm: the share of the GPU's memory vLLM keeps (weights, KV cache)")
    ema_decay: float = Field(0.95, ge=0, lt=1, description="exponential moving average of the policy's weights after each step, from the starting model (OpenRLHF's enable_ema): the model evaluated and saved as final/; the last iterate stays in the last checkpoint. 0: off, final/ is the last iterate. It averages out the noise of small-batch policy gradients (README)")
    rollout_dtype: Literal["same", "fp32", "bf16"] = Field("same", description="what the engine samples (and evaluates) in: 'same' as dtype, when the sampler's log-probs are the trainer's up to float rounding; bf16 while training in fp32 is vLLM's usual setting on a GPU (on a CPU it is faster only where the products dominate a decode step, not for the embedded model), and its log-probs then differ from the trainer's (see sampler_correction)")
    sampler_correction: Literal[("auto", *SAMPLER_CORRECTIONS)] = Field("auto", description="correct for a sampler that only approximates the trainer's π_old (vLLM, rollout_dtype): weight each token's policy loss by ρ = π_old/π_sampler, per token or per sequence, truncated to [sampler_clip_min, sampler_clip_max] or masked to 0 outside it (TRL's vllm_importance_sampling_mode). π_old is then the trainer's own forward (one more no-grad forward a step, except GRPO/REINFORCE with one update per rollout). auto: token_truncate where the sampler is vLLM or samples in another dtype, none where it is the trainer's own forward (README)")
    sampler_clip_min: float | None = Field(None, ge=0, description="lower bound of the sampler correction's ρ (None: none)")
    sampler_clip_max: float | None = Field(3.0, gt=0, description="upper bound of the sampler correction's ρ (None: none; TRL's default 3)")
    off_policy_mask_threshold: float | None = Field(None, ge=0, description="DeepSeek-V3.2's off-policy sequence mask: no policy loss on a completion with a negative advantage whose mean per-token log π_sampler - log π_θ exceeds this (e.g. 0.5); None: off")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: the loss gains -entropy_coef × the mean entropy per token of the policy's distributions (over the optimizer batch, whatever the loss type; TRL's entropy_coef, PPO's classic exploration bonus); 0: off")
    entropy_target: float | None = Field(None, gt=0, description="adaptive entropy control (Skywork-OR1; TRL's use_adaptive_entropy with entropy_target): after each update the coefficient, starting at entropy_coef, rises by entropy_coef_delta if the mean entropy was at or below this and falls otherwise, and applies only while it is at or below; None: entropy_coef stays fixed")
    entropy_coef_delta: float = Field(0.005, gt=0, description="adaptive entropy control: the coefficient's step per update")
    entropy_coef_min: float = Field(0.0, ge=0, description="adaptive entropy control: the coefficient's lower bound")
    entropy_coef_max: float = Field(1.0, ge=0, description="adaptive entropy control: the coefficient's upper bound")
    top_entropy_quantile: float = Field(1.0, ge=0, le=1, description="policy loss on the top share of tokens by entropy only, the forks (Wang et al. 2025, 'Beyond the 80/20 rule': 0.2), the quantile taken over each optimizer batch (TRL's, per micro-batch); 1: every token")

    @model_validator(mode="after")
    def _entropy_bounds(self):
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError(f"entropy_coef_min ({self.entropy_coef_min}) is above entropy_coef_max ({self.entropy_coef_max})")
        return self

    @model_validator(mode="after")
    def _invalid_policy(self):
        if self.reward_on_invalid == "drop" and self.reward_fallback != 0:
            raise ValueError(f"reward_fallback={self.reward_fallback} is the score of an invalid sample under "
                             "reward_on_invalid=fallback; with drop the sample has none")
        return self

    @model_validator(mode="after")
    def _sync_ref(self):
        if self.sync_ref_model and not self.beta > 0:
            raise ValueError("sync_ref_model=true needs a reference model: set beta > 0")
        return self

    @model_validator(mode="after")
    def _adaptive_kl(self):  # β_{t+1} = β_t (1 + ...): from 0 it never moves
        if self.kl_target is not None and not self.beta > 0:
            raise ValueError("kl_target adapts beta by a factor each step, so it needs a starting beta > 0 "
                             "(e.g. beta=0.05); with beta=0 it would stay 0")
        return self

    @field_validator("min_p", mode="before")
    @classmethod
    def _min_p_off(cls, v: Any) -> Any:  # TRL's way to turn it off
        return 0.0 if v is None else v

    def sampling_dtype(self) -> str:
        """The dtype the engine samples in."""
        return self.dtype if self.rollout_dtype == "same" else self.rollout_dtype

    def sampler_mode(self) -> str:
        """``sampler_correction`` with ``auto`` resolved: token_truncate (truncated importance sampling,
        Yao et al. 2025) where the sampler is not the trainer's own forward in the trainer's dtype. TRL
        defaults to sequence_mask; from the shipped SFT model, fp32 training on bf16 samples, GRPO seeds
        0-4 gained +11.9 points on average with token_truncate and +9.9 with sequence_mask (docs/results.md)."""
        if self.sampler_correction != "auto":
            return self.sampler_correction
        return "token_truncate" if self.engine == "vllm" or self.sampling_dtype() != self.dtype else "none"


@dataclass
class Experience:
    """One rollout batch with everything its updates need. N completions × L tokens."""

    rollout: Rollout
    rewards: torch.Tensor  # (N,) NaN where dropped
    mask: torch.Tensor  # (N, L) float: tokens that carry loss
    old_logps: torch.Tensor  # (N, L) π_old: the sampler's log-probs, or the trainer's own (old_from_trainer)
    ref_logps: torch.Tensor | None  # (N, L) or None when beta = 0
    rows: torch.Tensor  # (n,) the completions the update trains on (all, unless groups were filtered)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # advantages, values, returns…
    old_from_trainer: bool = False  # old_logps recomputed by the trainer (a sampler correction is on)
    sampler_nonfinite: int = 0  # loss-carrying tokens whose sampler log-prob was NaN or ±inf

    def __len__(self) -> int:
        return len(self.rewards)


class EntropyControl:
    """The entropy bonus's coefficient c: ``entropy_coef`` fixed, or with a target H* Skywork-OR1's
    adaptive control (He et al. 2025, §4; TRL's ``use_adaptive_entropy``): after each optimizer update,
    from that update's mean entropy H, c ← clip(c + δ if H ≤ H* else c - δ, [c_min, c_max]); the bonus
    applies c only while the last H ≤ H* (none before the first update)."""

    def __init__(self, cfg: OnlineConfig):
        self.coef, self.target, self.last = cfg.entropy_coef, cfg.entropy_target, math.inf
        self.delta, self.lo, self.hi = cfg.entropy_coef_delta, cfg.entropy_coef_min, cfg.entropy_coef_max

    def applied(self) -> float:
        return self.coef if self.target is None or self.last <= self.target else 0.0

    def update(self, entropy: float) -> None:
        if self.target is None or not math.isfinite(entropy):
            return
        step = self.delta if entropy <= self.target else -self.delta
        self.coef = min(self.hi, max(self.lo, self.coef + step))
        self.last = entropy

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef, "last": self.last}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last = state["coef"], state["last"]


@dataclass
class MicroBatch:
    """What :meth:`Session.update` hands a loss function for one forward/backward."""

    rows: torch.Tensor  # (n,) the completions of this micro-batch
    num_sequences: int  # sequences of the optimizer batch (mini-batch): the losses' normalisers
    num_tokens: float  # loss-carrying tokens of the optimizer batch
    on_policy: bool  # the rollout's only update: π_old = sg(π_θ) exactly (as TRL)
    before_update: bool = True  # no optimizer step yet since sampling: π_θ is the sampled policy
    # top_entropy_quantile's threshold and kept-token count over the optimizer batch, where it spans
    # several micro-batches (None: this micro-batch is the whole batch and gives them itself)
    entropy_threshold: torch.Tensor | None = None
    entropy_tokens: float | None = None


class AdaptiveKL:
    """β_{t+1} = β_t (1 + clip(KL/target - 1, ±0.2) · n/horizon) (Ziegler et al. 2019, §2.2)."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None and math.isfinite(kl):
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err * n / self.horizon


class WeightAverage:
    """W_t = d W_{t-1} + (1 - d) θ_t after each step, from W_0 = the starting weights (OpenRLHF's EMA),
    over the policy's trainable parameters, kept beside the model and swapped into it where it is used
    (:meth:`applied`). With LoRA only the adapters are averaged: nothing of the frozen base is copied
    (a copy of the whole model, as ``torch.optim.swa_utils.AveragedModel`` keeps, would double the
    memory LoRA saves). The same ``torch._foreach_lerp_`` as that class's EMA, so the same numbers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self._params(model)]

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self._params(model)], 1 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` holding the average (its own weights set aside, not copied), restored on exit."""
        params = self._params(model)
        for p, a in zip(params, self.average):
            p.data, a.data = a.data, p.data
        try:
            yield model
        finally:
            for p, a in zip(params, self.average):
                p.data, a.data = a.data, p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """From :meth:`state_dict`, or from an ``AveragedModel``'s (checkpoints of earlier versions)."""
        with torch.no_grad():
            for n, a in zip(self.names, self.average):
                a.copy_(state[n] if n in state else state[f"module.{n}"])


class Session:
    """The policy, optional reference, engine, rewards, prompt stream, optimizer, logger and
    checkpoints of one online run. Modules given to :meth:`add_module` (a critic) train and
    checkpoint with the policy."""

    def __init__(self, cfg: OnlineConfig, name: str):
        runs.setup_torch(cfg)
        self.cfg, self.name = cfg, name
        self.run_dir, self.ckpt, self.state = runs.open_run(cfg)
        path = self.ckpt or resolve_model_path(cfg.model)
        self.base_path = resolve_model_path(cfg.model)
        self.tokenizer = load_tokenizer(path, cfg.chat_template_kwargs)
        self.pad = padding_id(self.tokenizer)
        self.policy = runs.load_trainable(cfg, self.ckpt, self.base_path)
        self.ref = None
        if cfg.beta > 0 or cfg.kl_target is not None:  # the reference is the starting model, always
            # with LoRA, the policy itself with its adapters off (lora.as_reference): no second copy
            self.ref = self.policy if cfg.lora_rank else load_causal_lm(self.base_path).eval().requires_grad_(False)
        self.engine: RolloutEngine
        if cfg.engine == "vllm":  # starts from the weights the policy loaded (a checkpoint when resuming)
            from .vllm_engine import VLLMEngine

            # with LoRA, vLLM holds the merged model: it loads the base, then the policy's merged weights
            self.engine = VLLMEngine(str(self.base_path if cfg.lora_rank else path), self.tokenizer, cfg.sampling_dtype(),
                                     cfg.seed, cfg.vllm_gpu_memory_utilization)
            if cfg.lora_rank:
                self.engine.sync_weights(self.policy)
        else:
            self.engine = TorchEngine(self.policy, self.tokenizer, cfg.sampling_dtype(), seed=cfg.seed)
        self.params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.num_generations,
                                     min_p=cfg.min_p)
        self.rewards = make_rewards(cfg.reward, cfg.reward_on_invalid, cfg.reward_fallback)
        self.reward_norm = RunningNorm()
        self.prompts, self.metadata = self._load_prompts()
        self.prompt_ids = [prompt_ids(self.tokenizer, p) for p in self.prompts]  # tokenized once, not every step
        self._check_lengths()
        self.sampler = EpochSampler(len(self.prompts), cfg.seed)
        self.kl = AdaptiveKL(cfg.beta, cfg.kl_target, cfg.kl_horizon)
        self.entropy = EntropyControl(cfg)
        self._entropy_stats = [0.0, 0.0]  # Σ H m and Σ m over the bonus's tokens since the last update
        self._gap_stats = [0.0, 0.0]  # Σ |log π_θ - log π_sampler| m and Σ m before a rollout's first update
        self.correction = cfg.sampler_mode()
        # GRPO and REINFORCE take π_old = sg(π_θ) in the single update of a rollout (TRL's behaviour), so
        # a sampler correction needs no forward of its own there; PPO's loss reads stored log-probs
        self.on_policy_shortcut = True
        self.modules: dict[str, torch.nn.Module] = {}
        self.module_lr: dict[str, float] = {}
        self.optimizer = self.scheduler = None
        self.ema: WeightAverage | None = None
        self.eval_rows = self._eval_rows()
        self.start = 0
        self.t_start = time.time()
        self.timings: dict[str, float] = {}

    # -- set-up ------------------------------------------------------------------------------
    def add_module(self, key: str, module: torch.nn.Module, lr: float | None = None) -> None:
        """Train ``module`` (a critic) with the policy: same optimizer (its own learning rate if
        given), saved in checkpoints."""
        self.modules[key] = module
        self.module_lr[key] = lr or self.cfg.lr

    def begin(self) -> None:
        """Build the optimizer, restore a checkpoint's state, open the log, evaluate the start."""
        cfg = self.cfg
        self.optimizer = runs.make_optimizer(self.policy, cfg)
        for key, m in self.modules.items():  # a critic: its own parameter group and learning rate
            params = [p for p in m.parameters() if p.requires_grad]
            if params:  # none: a module fitted otherwise (PPO's least-squares value head), only saved
                self.optimizer.add_param_group({"params": params, "lr": self.module_lr[key], "weight_decay": 0.0})
        self.scheduler = runs.make_scheduler(self.optimizer, cfg)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.ema_decay:  # W_0 = the starting weights; W_t = d W_{t-1} + (1 - d) θ_t after step t
            self.ema = WeightAverage(self.policy, cfg.ema_decay)
            self.ema_engine = TorchEngine(self.policy, self.tokenizer, cfg.sampling_dtype())  # greedy: no RNG drawn
        if self.state is not None:
            runs.restore_train_state(self.state, self.optimizer, self.scheduler)
            self.sampler.load_state_dict(self.state["sampler"])
            self.engine.load_state_dict(self.state["engine"])
            self.kl.beta = self.state["kl_beta"]
            if "entropy" in self.state:  # checkpoints from before the entropy bonus have none
                self.entropy.load_state_dict(self.state["entropy"])
            self.reward_norm.load_state_dict(self.state["reward_norm"])
            for k, m in self.modules.items():
                m.load_state_dict(self.state["modules"][k])
            if self.ema is not None:
                self.ema.load_state_dict(self.state["ema"])
            self.updates_done = self.state.get("updates_done", 0)  # checkpoints before sync_ref_model have none
            if "ref" in self.state:
                self.ref.load_state_dict(self.state["ref"])
            self.start = self.state["step"]
        self.logger = RunLogger(self.run_dir, cfg.max_steps, self.start, self.name, cfg.progress, cfg.tensorboard)
        self.logger.message(f"{self.name}: {len(self.prompts)} prompts, {cfg.prompts_per_step}×{cfg.num_generations} "
                            f"completions per step; model {self.base_path}; run {self.run_dir}")
        self.finished = runs.already_finished(self.run_dir, cfg, self.start)
        if self.finished:
            self.logger.message(f"{self.name}: {self.run_dir} finished all {cfg.max_steps} steps already; its model is "
                                f"in {self.run_dir / 'final'}")
        self.eval_before = None
        if self.eval_rows:  # a resumed run's start is the evaluation it logged then
            self.eval_before = self.evaluate(0) if self.start == 0 else runs.logged_eval(self.run_dir, 0)

    def _load_prompts(self) -> tuple[list[str], list[dict[str, Any]]]:
        cfg = self.cfg
        if cfg.data == "arith":
            train, _ = problem_space(cfg.arith)
            return [p.prompt for p in train], [{"answer": p.answer} for p in train]
        prompts, meta = [], []
        for r in read_rows(cfg.data):
            p = r.data.get("prompt")
            if isinstance(p, list):  # chat messages: the template with the assistant turn opened
                p = chat_prompt_text(self.tokenizer, p, r.where)
            if not isinstance(p, str) or not p:
                raise DataError(f"{r.where}: online RL rows need a non-empty 'prompt' (text or chat messages)")
            prompts.append(p)
            # chat prompts keep their messages: TRL-style reward functions take them (rewards.TRLReward)
            meta.append({k: v for k, v in r.data.items() if k != "prompt" or isinstance(v, list)})
        return prompts, meta

    def _check_lengths(self) -> None:
        """Refuse a prompt that cannot take max_new_tokens more within the model's context."""
        if not self.prompt_ids:
            raise DataError(f"{self.cfg.data}: no prompts to train on")
        i = max(range(len(self.prompt_ids)), key=lambda j: len(self.prompt_ids[j]))
        check_context(self.policy, len(self.prompt_ids[i]) + self.cfg.max_new_tokens,
                      f"prompt {i + 1} ({len(self.prompt_ids[i])} tokens) plus max_new_tokens={self.cfg.max_new_tokens}")

    def _eval_rows(self) -> list[dict[str, str]]:
        cfg = self.cfg
        source = ("arith" if cfg.data == "arith" else "none") if cfg.eval_data == "auto" else cfg.eval_data
        rows = [] if source == "none" else load_eval_rows(source, cfg.eval_samples, cfg.arith, self.tokenizer)
        if rows:
            longest = max(len(prompt_ids(self.tokenizer, r["prompt"])) for r in rows)
            check_context(self.policy, longest + cfg.max_new_tokens,
                          f"an evaluation prompt of {longest} tokens plus max_new_tokens={cfg.max_new_tokens}")
        return rows

    # -- the loop ------------------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        for step in range(self.start + 1, self.cfg.max_steps + 1):
            self._t0 = time.perf_counter()
            self.timings: dict[str, float] = {}
            self.step = step
            yield step
            if self._stopped:
                return

    _stopped = False
    finished = False  # resumed after its last step: nothing left to train, save or evaluate
    _lr = 0.0
    step = 0
    updates_done = 0  # optimizer updates of the run (sync_ref_model counts them)
    _reward_context: RewardContext | None = None

    def rollout(self) -> tuple[list[int], Rollout]:
        """Stage 1: the next prompts and ``num_generations`` sampled completions of each."""
        t = time.perf_counter()
        idx = self.sampler.next(self.cfg.prompts_per_step)
        ids = [self.prompt_ids[i] for i in idx]
        roll = self.engine.generate(ids, self.params)
        self.timings["time/generate"] = time.perf_counter() - t
        self._step_prompts = idx
        return idx, roll

    def score(self, idx: list[int], roll: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 2: one reward per completion (NaN when dropped), and the reward metrics."""
        t = time.perf_counter()
        n = self.cfg.num_generations
        prompts = [self.prompts[i] for i in idx for _ in range(n)]
        meta = [self.metadata[i] for i in idx for _ in range(n)]
        lengths = roll.mask.sum(-1).tolist()
        sampler = self.sampler
        self._reward_context = RewardContext(  # what TRL-style reward functions get besides the texts
            [ids[:k] for ids, k in zip(roll.completion_ids.tolist(), lengths)], self.step - 1, self.cfg.max_steps,
            sampler.epoch + sampler.pos / sampler.n)
        # each function's scores (N, K), the invalid policy applied: GDPO normalises them one by one
        self.reward_each, metrics = self.rewards.score_each(prompts, roll.texts, meta, self._reward_context)
        rewards = self.rewards.total(self.reward_each)
        self._check_rewards(metrics, len(prompts))
        self._step_rewards = rewards  # what completions.jsonl shows, before any normalisation
        metrics["reward/length_corr"] = length_correlation(roll.mask.sum(-1), rewards)  # reward-hacking guard
        if self.cfg.reward_normalize:  # logged: the reward itself; trained on: its normalised value
            ok = rewards[~torch.isnan(rewards)]
            metrics.update(reward=float(ok.mean()) if len(ok) else math.nan,
                           reward_std=float(ok.std()) if len(ok) > 1 else 0.0)
            rewards = self.reward_norm(rewards)
            metrics["reward/normalized_mean"] = float(rewards.nanmean())
        self.timings["time/reward"] = time.perf_counter() - t
        return rewards, metrics

    def _check_rewards(self, metrics: dict[str, float], n: int) -> None:
        """Count, for each reward function, the steps running in which it scored nothing; past
        ``max_invalid_steps`` stop with what it said, rather than train to the end on fallback values."""
        # reward/<name>/invalid, where a name may hold slashes itself (py:/path/to/file.py:fn)
        broken = {k[len("reward/"):-len("/invalid")] for k, v in metrics.items()
                  if k.startswith("reward/") and k.endswith("/invalid") and v == n}
        self._invalid_steps = {name: self._invalid_steps.get(name, 0) + 1 for name in broken}  # a scoring step resets
        stuck = [name for name, steps in self._invalid_steps.items() if steps >= self.cfg.max_invalid_steps]
        if stuck and self.cfg.max_invalid_steps:
            why = {k.split("/")[-1]: int(v) for k, v in metrics.items()
                   if k.startswith(f"reward/{stuck[0]}/") and not k.endswith(("/mean", "/std", "/invalid", "/invalid_frac"))}
            raise DataError(f"reward {', '.join(stuck)} scored none of the {n} completions of {self.cfg.max_invalid_steps} "
                            f"steps running ({why or 'it raised, or returned None, NaN or inf, for every completion'}): "
                            "check that the rows carry what it needs (answer, tests…) and that it runs; "
                            "max_invalid_steps=0 trains on regardless")

    _invalid_steps: dict[str, int] = {}  # per reward function: steps running it scored nothing (replaced, never mutated)

    def experience(self, roll: Rollout, rewards: torch.Tensor, keep: torch.Tensor | None = None,
                   states: bool = False) -> Experience:
        """The loss mask (dropped and, optionally, truncated completions carry none), the reference
        log-probs (one no-grad forward) when a KL is in play, and under a sampler correction the
        trainer's own π_old (another; with ``states``, the last layer's states it computed are kept in
        ``extra["states"]`` (N, L, H) for a value head). ``keep`` (N,) bool restricts the update, and
        the forwards, to those completions."""
        mask = roll.mask.float()
        mask[torch.isnan(rewards)] = 0
        if self.cfg.mask_truncated_completions:
            mask[roll.truncated] = 0
        if keep is None:
            rows = torch.arange(len(rewards))
        else:
            rows = keep.nonzero()[:, 0]
            mask[~keep] = 0
        ref = None
        if self.ref is not None:
            t = time.perf_counter()
            with lora.as_reference(self.ref):
                ref, _ = self._no_grad_logps(self.ref, roll, rows)
            self.timings["time/reference"] = time.perf_counter() - t
        exp = Experience(roll, rewards, mask, roll.logprobs, ref, rows)
        # an engine that could not score a token (vLLM can return NaN or -inf) must not reach a ratio or
        # the KL: π_old then comes from the trainer, whatever the correction
        exp.sampler_nonfinite = int((~torch.isfinite(roll.logprobs) & mask.bool()).sum())
        single = self.on_policy_shortcut and self.cfg.epochs * self.cfg.mini_batches == 1
        if exp.sampler_nonfinite or (self.correction != "none" and not single):  # seed §5: π_old is the trainer's
            t = time.perf_counter()
            exp.old_logps, kept = self._no_grad_logps(self.policy, roll, rows, states)
            exp.old_from_trainer = True
            if kept is not None:
                exp.extra["states"] = kept
            self.timings["time/old_logps"] = time.perf_counter() - t
        return exp

    def _no_grad_logps(self, model, roll: Rollout, rows: torch.Tensor, states: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, L) log-probs of rollout ``rows`` under ``model`` (zeros elsewhere), micro-batched, and
        with ``states`` the (N, L, H) last-layer states they came from."""
        out, kept = torch.zeros(roll.mask.shape), None
        with torch.no_grad():
            for mb in self._chunks(rows, roll):
                lp, _, *h = self.logps(model, roll, mb, with_hidden=states, with_entropy=False)
                out[mb] = lp
                if states:
                    kept = h[0].new_zeros(*roll.mask.shape, h[0].shape[-1]) if kept is None else kept
                    kept[mb] = h[0]
        return out, kept

    def kl_reward(self, exp: Experience) -> torch.Tensor:
        """-β · KL_t per token (the reward-penalty form of seed §4), (N, L); zeros when β = 0."""
        if exp.ref_logps is None:
            return torch.zeros_like(exp.mask)
        return -self.kl.beta * kl_estimate(exp.old_logps, exp.ref_logps, self.cfg.kl_estimator) * exp.mask

    def logps(self, model, roll: Rollout, rows: torch.Tensor, with_hidden: bool = False, with_entropy: bool = True,
              entropy_grad: bool = False):
        """:func:`completion_logps` of rollout ``rows`` under ``model`` at the sampling temperature."""
        return completion_logps(model, [roll.prompt_ids[i] for i in rows.tolist()], roll.completion_ids[rows],
                                roll.mask[rows], self.cfg.temperature, self.cfg.dtype, self.pad, with_hidden,
                                with_entropy=with_entropy, lean=self.cfg.lean_forward, entropy_grad=entropy_grad)

    def hidden(self, model, roll: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """:func:`completion_hidden` of rollout ``rows``: a critic's input, no LM head."""
        return completion_hidden(model, [roll.prompt_ids[i] for i in rows.tolist()], roll.completion_ids[rows],
                                 roll.mask[rows], self.cfg.dtype, self.pad, lean=self.cfg.lean_forward)

    def _chunks(self, rows: torch.Tensor, roll: Rollout) -> list[torch.Tensor]:
        """Micro-batches of ``rows``: each prompt's completions kept together (they share one forward
        of the prompt) and groups ordered by their longest completion, so that each micro-batch,
        computed only up to its own longest row, carries little padding. The loss is normalised over
        the mini-batch, so the order changes nothing but float rounding."""
        size = self.cfg.micro_batch_size
        if len(rows) <= size:
            return [rows] if len(rows) else []
        group = rows // self.cfg.num_generations
        longest = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_reduce(
            0, group, roll.mask.sum(-1)[rows], "amax")
        order = torch.argsort(longest[group] * len(longest) + group, stable=True)
        return list(rows[order].split(size))

    def update(self, exp: Experience, loss_fn: Callable[[MicroBatch], tuple[torch.Tensor, dict]]) -> dict[str, float]:
        """Stage 4: ``epochs`` passes over the rollout in ``mini_batches`` shuffled mini-batches of
        whole prompt groups (:func:`shuffle_groups`), one optimizer update each, micro-batched.
        ``loss_fn`` returns the loss of a :class:`MicroBatch` normalised by its mini-batch's sequences
        and tokens, so accumulation does not change it."""
        t = time.perf_counter()
        cfg, N = self.cfg, len(exp.rows)
        totals: dict[str, float] = {}
        size = max(1, math.ceil(N / cfg.mini_batches))
        updates = 0
        for _ in range(cfg.epochs if N else 0):
            perm = shuffle_groups(exp.rows, cfg.num_generations) if cfg.mini_batches > 1 or cfg.epochs > 1 else exp.rows
            for mb in perm.split(size):
                n_tok = float(exp.mask[mb].sum())
                micros = self._chunks(mb, exp.rollout)
                threshold, n_ent = self._entropy_quantile(exp, micros) if len(micros) > 1 else (None, None)
                for micro in micros:
                    batch = MicroBatch(micro, len(mb), n_tok, updates == 0 and cfg.epochs * cfg.mini_batches == 1,
                                       updates == 0, threshold, n_ent)
                    loss, metrics = loss_fn(batch)
                    loss.backward()
                    for k, v in metrics.items():  # sums add up; extremes (``*_max``, ``*_min``) keep theirs
                        merge = _ACCUMULATE.get(k[-4:], float.__add__)
                        totals[k] = merge(totals[k], float(v)) if k in totals else float(v)
                    totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
                norm = runs.optimizer_step(self._params, self.optimizer, None, cfg.max_grad_norm)
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + norm
                updates += 1
                self.updates_done += 1
                if cfg.sync_ref_model and self.updates_done % cfg.ref_model_sync_steps == 0:
                    runs.sync_reference(self.ref, self.policy, cfg.ref_model_mixup_alpha)
                h, n = self._entropy_stats  # the update's mean entropy over the bonus's tokens
                self.entropy.update(h / n if n else math.nan)
                self._entropy_stats = [0.0, 0.0]
        self._lr = self.scheduler.get_last_lr()[0]  # the rate this step's updates used, logged by end_step
        with warnings.catch_warnings():  # a step without an update (every group filtered) still counts
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()  # the schedule counts rollout steps
        self.engine.sync_weights(self.policy)  # π_old ← π_θ: the next rollout samples the new policy
        if self.ema is not None:
            self.ema.update(self.policy)
        out = {k: v if k[-4:] in _ACCUMULATE else v / updates for k, v in totals.items()} if updates else {}
        if cfg.entropy_target is not None:
            out["entropy_coef"] = self.entropy.coef
        gap, n = self._gap_stats
        if n:
            out["logp_gap"] = gap / n
        self._gap_stats = [0.0, 0.0]
        self.timings["time/update"] = time.perf_counter() - t
        return out

    def _entropy_quantile(self, exp: Experience, micros: list[torch.Tensor]) -> tuple[torch.Tensor | None, float | None]:
        """top_entropy_quantile's threshold over an optimizer batch split into ``micros``, and the count
        of tokens it keeps: one no-grad forward of the batch at the current weights (the loss's own
        forwards see one micro-batch each; TRL takes the quantile per micro-batch, which the split then
        changes). (None, None) with the quantile off."""
        q = self.cfg.top_entropy_quantile
        if q >= 1:
            return None, None
        t = time.perf_counter()
        with torch.no_grad():
            ent = [self.logps(self.policy, exp.rollout, m)[1][exp.mask[m].bool()] for m in micros]
        ent = torch.cat(ent)
        self.timings["time/entropy_quantile"] = self.timings.get("time/entropy_quantile", 0.0) + time.perf_counter() - t
        if not len(ent):
            return None, None
        threshold = torch.quantile(ent.float(), 1 - q)
        return threshold, float((ent >= threshold).sum())

    def entropy_terms(self, batch: MicroBatch, entropy: torch.Tensor, mask: torch.Tensor) -> EntropyTerms | None:
        """The entropy bonus and top_entropy_quantile's mask for :func:`policy_loss` (None where both
        are off), with the tokens the bonus averages over: the optimizer batch's (kept) tokens."""
        cfg, coef = self.cfg, self.entropy.applied()
        q = cfg.top_entropy_quantile
        if not coef and q >= 1 and cfg.entropy_target is None:
            return None
        keep = high_entropy_mask(entropy, mask, q, batch.entropy_threshold) if q < 1 else None
        counted = mask if keep is None else mask * keep
        if cfg.entropy_target is not None:  # the adaptive control's measure
            self._entropy_stats[0] += float((entropy.detach() * counted).sum())
            self._entropy_stats[1] += float(counted.sum())
        n_ent = batch.num_tokens if q >= 1 else batch.entropy_tokens
        return EntropyTerms(entropy, coef, keep, n_ent)

    def entropy_grad(self) -> bool:
        """Whether the loss's entropies need their gradient: the bonus applies this update."""
        return self.entropy.applied() > 0

    def policy_loss_fn(self, exp: Experience, adv: torch.Tensor, loss_cfg: PolicyLossConfig):
        """:meth:`update`'s loss for advantages ``adv`` ((N,) or (N, L)): the importance-weighted policy
        loss of :func:`tether.losses.policy.policy_loss`, against π_old = sg(π_θ) while on-policy and
        the stored sampling log-probs after that; the entropy rides along for the logs."""

        def loss_fn(batch: MicroBatch):
            rows = batch.rows
            logps, entropy = self.logps(self.policy, exp.rollout, rows, entropy_grad=self.entropy_grad())
            ref = exp.ref_logps[rows] if exp.ref_logps is not None else None
            rho, keep, sm = self.sampler_terms(exp, rows, logps, adv[rows])
            loss, m = policy_loss(logps, None if batch.on_policy else exp.old_logps[rows], adv[rows], exp.mask[rows],
                                  loss_cfg, ref, num_sequences=batch.num_sequences, num_tokens=batch.num_tokens,
                                  sampler_weights=rho, keep=keep, entropy=self.entropy_terms(batch, entropy, exp.mask[rows]))
            m.update(sm)
            self.measure_gap(batch, exp, logps)
            return loss, {**m, "entropy_sum": (entropy.detach() * exp.mask[rows]).sum()}

        return loss_fn

    def measure_gap(self, batch: MicroBatch, exp: Experience, logps: torch.Tensor) -> None:
        """``logp_gap``: |log π_θ - log π_sampler| per token before the rollout's first update, when the
        trainer and the engine hold the same weights (0 up to float noise where the engine is the
        trainer's own forward in its dtype): their agreement, measured every step. Later updates
        differ by design, and are left out."""
        if batch.before_update:
            mask = exp.mask[batch.rows]
            self._gap_stats[0] += float(((logps.detach() - exp.rollout.logprobs[batch.rows]).abs() * mask).nansum())
            self._gap_stats[1] += float(mask.sum())

    def sampler_terms(self, exp: Experience, rows: torch.Tensor, logps: torch.Tensor, adv: torch.Tensor,
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The sampler correction's weights ρ and the off-policy mask for micro-batch ``rows`` with
        policy log-probs ``logps`` and advantages ``adv`` (None where off), and their metrics: ρ's token
        mean (``sampler_ratio``), extremes and the share of tokens it zeroes (``sampler_dropped``), the
        mismatch itself, |log π_old - log π_sampler| per token (``sampler_gap``, mean and max: TRL's
        ``sampling_logp_difference``), the share the off-policy mask drops (``off_policy_dropped``)."""
        mask, sampled = exp.mask[rows], exp.rollout.logprobs[rows]
        rho = keep = None
        m: dict[str, torch.Tensor] = {}
        if self.correction != "none":
            # without a stored π_old from the trainer the update is the rollout's first: π_old = sg(π_θ)
            old = exp.old_logps[rows] if exp.old_from_trainer else logps.detach()
            rho = sampler_weights(old, sampled, mask, self.correction, self.cfg.sampler_clip_min,
                                  self.cfg.sampler_clip_max)
            real = mask.bool()
            per_token, gap = rho.expand_as(mask)[real], (old - sampled).abs()[real]
            m = {"sampler_ratio_sum": per_token.sum(), "sampler_dropped_sum": (per_token == 0).sum(),
                 "sampler_gap_sum": gap.nansum()}
            if len(per_token):
                m.update(sampler_ratio_max=per_token.max(), sampler_ratio_min=per_token.min(),
                         sampler_gap_max=gap.nan_to_num(0.0).max())
        if self.cfg.off_policy_mask_threshold is not None:
            keep = off_policy_mask(adv, logps, sampled, mask, self.cfg.off_policy_mask_threshold)
            m["off_policy_dropped_sum"] = ((1 - keep) * mask).sum()
        return rho, keep, m

    def end_step(self, step: int, exp: Experience, metrics: dict[str, float]) -> None:
        """Log (reward, accuracy of the samples, KL, entropy, lengths, timings), evaluate,
        checkpoint, honour stop_at_step."""
        cfg = self.cfg
        r = exp.rewards
        lengths = exp.rollout.mask.sum(-1).float()
        dt = time.perf_counter() - self._t0
        record = {"reward": float(r.nanmean()), "reward_std": float(r[~torch.isnan(r)].std()) if (~torch.isnan(r)).sum() > 1 else 0.0,
                  "completion_length": float(lengths.mean()), "truncated": float(exp.rollout.truncated.float().mean()),
                  "beta": self.kl.beta, "lr": self._lr, "step_time": dt,
                  "tokens": float(exp.rollout.mask.sum() + sum(map(len, exp.rollout.prompt_ids))),
                  **metrics, **self.timings}
        record["tok_per_s"] = record["tokens"] / dt  # prompt + completion tokens, TRL's count
        if exp.sampler_nonfinite:
            record["sampler_nonfinite"] = float(exp.sampler_nonfinite)
        if exp.ref_logps is not None:
            seq_kl = (kl_estimate(exp.old_logps, exp.ref_logps, "k3") * exp.rollout.mask).sum(-1)[exp.rows]
            if len(seq_kl):  # per sequence, of the sampling policy (k3), over the completions trained on
                record["kl"] = float(seq_kl.mean())
                self.kl.update(record["kl"], len(seq_kl))
        self.logger.log(step, record)
        self._log_completions(step, exp)
        if self.eval_rows and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            self.evaluate(step)
        stop = cfg.stop_at_step is not None and step == cfg.stop_at_step and step < cfg.max_steps
        if stop or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            extra = {"sampler": self.sampler.state_dict(), "engine": self.engine.state_dict(), "kl_beta": self.kl.beta,
                     "entropy": self.entropy.state_dict(),
                     "reward_norm": self.reward_norm.state_dict(),
                     "modules": {k: m.state_dict() for k, m in self.modules.items()}}
            if self.ema is not None:
                extra["ema"] = self.ema.state_dict()
            extra["updates_done"] = self.updates_done
            if cfg.sync_ref_model:  # no longer the starting model
                extra["ref"] = self.ref.state_dict()
            runs.save(cfg, self.run_dir, step, self.policy, self.tokenizer, self.optimizer, self.scheduler, extra)
        if stop:
            self.logger.message(f"{self.name}: stopped after step {step} (stop_at_step); continue with resume=true")
            self._stopped = True

    def _log_completions(self, step: int, exp: Experience) -> None:
        """The step's first ``log_completions`` completions, one JSON line each, to completions.jsonl:
        what the policy writes and the reward it got (before ``reward_normalize``; null where dropped).
        A resumed run's file is cut back to its checkpoint, as metrics.jsonl."""
        roll, n = exp.rollout, self.cfg.num_generations
        extra = self._reward_context.extra if self._reward_context else {}  # what reward functions logged (log_extra)
        lines = []
        for i in range(min(self.cfg.log_completions, len(exp))):
            r = float(self._step_rewards[i])
            row = {"step": step, "prompt": self.prompts[self._step_prompts[i // n]], "completion": roll.texts[i],
                   "reward": None if math.isnan(r) else r, "tokens": int(roll.mask[i].sum()),
                   "truncated": bool(roll.truncated[i])}
            if extra:
                row["extra"] = {k: v[i] if i < len(v) else None for k, v in extra.items()}
            lines.append(json.dumps(row, default=str) + "\n")
        if lines:
            with open(self.run_dir / COMPLETIONS, "a") as f:
                f.writelines(lines)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Greedy exact-match accuracy on the held-out prompts (the engine at temperature 0) of the
        run's model: the weight average when ``ema_decay`` is on (``eval_accuracy``; the last iterate's
        is logged as ``eval_accuracy_policy``), else the policy."""
        ev = engine_accuracy(self.engine, self.tokenizer, self.eval_rows, self.cfg.max_new_tokens)
        record = {"eval_accuracy": ev["accuracy"]}
        if self.ema is not None:
            record["eval_accuracy_policy"] = ev["accuracy"]
            if step > 0:  # at step 0 the average is the policy
                with self.ema.applied(self.policy):
                    ev = engine_accuracy(self.ema_engine, self.tokenizer, self.eval_rows, self.cfg.max_new_tokens)
                record["eval_accuracy"] = ev["accuracy"]
        self.logger.log(step, record, advance=False)
        return ev

    def finish(self) -> runs.FitResult:
        """Write the final model, evaluate it, close the log, write the report."""
        result = runs.FitResult(self.run_dir, self.run_dir / "final", self.start, 0.0, self.eval_before,
                                stopped_early=self._stopped, finished_before=self.finished)
        last = read_metrics(self.run_dir / "metrics.jsonl")
        result.steps = max((m["step"] for m in last), default=0)
        if self.finished:
            result.eval_after = runs.logged_eval(self.run_dir, self.cfg.max_steps) if self.eval_rows else None
        elif not self._stopped:
            with self.ema.applied(self.policy) if self.ema is not None else contextlib.nullcontext():
                runs.save_final(self.run_dir, self.policy, self.tokenizer)
            for k, m in self.modules.items():
                torch.save(m.state_dict(), self.run_dir / "final" / f"{k}.pt")
            if self.eval_rows:
                result.eval_after = self.evaluate(self.cfg.max_steps)
        self.logger.close()
        result.seconds = time.time() - self.t_start
        if self.cfg.report and result.ended_here:
            from .report import write_report

            summary: dict[str, Any] = {"steps": result.steps, "wall time (s)": round(result.seconds, 1)}
            if self.start:  # the wall time is this process's
                summary["resumed after step"] = self.start
            if result.eval_after and result.eval_before:
                summary["held-out accuracy"] = f"{result.eval_before['accuracy']:.1%} -> {result.eval_after['accuracy']:.1%}"
            samples = [r for r in read_metrics(self.run_dir / COMPLETIONS) if r["step"] == result.steps]
            write_report(self.run_dir, self.name, read_metrics(self.run_dir / "metrics.jsonl"), summary, samples=samples)
        return result


COMPLETIONS = "completions.jsonl"  # the sampled completions a run logs (log_completions)

# how :meth:`Session.update` accumulates a metric over micro-batches and updates, by its name's end
_ACCUMULATE: dict[str, Callable[[float, float], float]] = {"_max": max, "_min": min}


def shuffle_groups(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``rows`` (completion indices, ``n`` per prompt) in a random order of their prompts, each
    prompt's completions kept together and in order. Mini-batches cut from it hold whole groups and
    compute each prompt once for all its completions; shuffling completions one by one would put
    most prompts' forward into every mini-batch."""
    ids, group = (rows // n).unique(return_inverse=True)
    return rows[torch.argsort(torch.randperm(len(ids))[group], stable=True)]


def token_means(metrics: dict[str, float]) -> dict[str, float]:
    """Turn the token sums that :meth:`Session.update` averaged over updates (``kl_sum``,
    ``clip_low``, ``entropy_sum``…) into per-token means, dividing by the ``tokens`` entry."""
    out = dict(metrics)
    tokens = max(out.pop("tokens", 1.0), 1.0)
    for k in [k for k in out if k.endswith("_sum") or k.startswith("clip_")]:
        out[k.removesuffix("_sum")] = out.pop(k) / tokens
    return out


@dataclass
class CompletionStates:
    """The hidden states that predict the tokens of right-padded completions, each distinct state
    stored once: completion token t of row b is predicted by ``hidden[index[b, t]]`` (``index`` is 0
    off the mask). Rows with the same prompt and the same first tokens share those states."""

    hidden: torch.Tensor  # (M, H)
    index: torch.Tensor  # (B, L) long

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) per-row states, zeros off ``mask`` (B, L)."""
        (B, L), H = self.index.shape, self.hidden.shape[-1]
        if not len(self.hidden):  # no real token at all
            return self.hidden.new_zeros(B, L, H)
        h = self.hidden.index_select(0, self.index.reshape(-1)).reshape(B, L, H)  # backward: index_add
        return h * mask[..., None].to(h.dtype)


def completion_states(model, prompts: list[list[int]], completions: torch.Tensor, mask: torch.Tensor,
                      dtype: str = "fp32", pad: int = 0, share_prompts: bool = True, lean: bool = False,
                      ) -> CompletionStates:
    """:class:`CompletionStates` of ``completions`` (B, L) after their ``prompts``.

    Under a causal model a position's hidden state depends only on the tokens before it, so rows
    that share a prompt (a GRPO group) and their completions' first tokens (in the arithmetic world
    the restated equation, " 41 + 31 =": most of a completion) share those states exactly. The rows
    of each prompt are merged into a prefix tree and run as one packed row under tree attention
    (:func:`_trie_states`): each distinct prompt + completion prefix is computed once, with gradient,
    and a row's last token, which predicts nothing, never. A micro-batch pays for distinct tokens only:
    a GRPO step's forward shrinks from 1,024 rows of ~26 tokens to 128 packed rows of ~28 (padded to
    the longest, ~36; docs/online-rl.md). Completions that share little are split over several packed rows
    (:func:`_tree_rows`), where a wider row's dense attention would cost more than the tokens it saves.
    ``share_prompts=False`` runs one plain row per completion (the reference the tests compare with).
    ``lean`` runs the packed rows through :func:`tether.decoding.tree_states` where the architecture
    allows (the model's own forward otherwise): the same states up to rounding, in less time.
    """
    lengths = mask.sum(-1).long()
    L, k = completions.shape[1], max(1, int(lengths.max()))
    completions, mask = completions[:, :k], mask[:, :k]
    keys = [tuple(p) for p in prompts]
    uniq = {key: j for j, key in enumerate(dict.fromkeys(keys))}
    with autocast(dtype, math_attention=True):
        tree_attention = (getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")  # 4-D masks
                          and custom_masks_exact(model, max(map(len, prompts)) + k))
        if share_prompts and tree_attention and len(uniq) < len(prompts):
            heads = list(uniq)
            prompt_of, tree = _tree_rows(torch.tensor([uniq[key] for key in keys]), [len(p) for p in heads],
                                         completions, lengths, tree_token_cost(model))
            hidden, index = _trie_states(model, [heads[g] for g in prompt_of], tree, completions, lengths, pad,
                                         dtype, lean)
        else:
            sel = mask.bool()
            hidden = _hidden(model, prompts, completions, mask, pad)[sel]
            index = torch.zeros_like(completions).masked_scatter(sel, torch.arange(len(hidden)))
    return CompletionStates(hidden, torch.nn.functional.pad(index, (0, L - k)))


def completion_hidden(model, prompts: list[list[int]], completions: torch.Tensor, mask: torch.Tensor,
                      dtype: str = "fp32", pad: int = 0, share_prompts: bool = True, lean: bool = False,
                      ) -> torch.Tensor:
    """The hidden states (B, L, H) that predict each token of the right-padded ``completions`` after
    their ``prompts`` (zeros off the mask): what a value head reads (:func:`completion_states`)."""
    return completion_states(model, prompts, completions, mask, dtype, pad, share_prompts, lean).expand(mask)


def completion_logps(model, prompts: list[list[int]], completions: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0, dtype: str = "fp32", pad: int = 0, with_hidden: bool = False,
                     share_prompts: bool = True, with_entropy: bool = True, lean: bool = False,
                     entropy_grad: bool = False):
    """Per-token log-probs log softmax(logits / T)[y_t] of right-padded ``completions`` (B, L) after
    their ``prompts``, the entropy of each position's distribution (B, L; None unless ``with_entropy``;
    with gradient only with ``entropy_grad``, for an entropy bonus), and the hidden states of
    :func:`completion_hidden` when asked. The LM head runs once per distinct state of
    :func:`completion_states`, 0 is returned off the mask."""
    states = completion_states(model, prompts, completions, mask, dtype, pad, share_prompts, lean)
    sel = mask.bool()
    with autocast(dtype):
        logits = head_logits(model, states.hidden).float()  # (M, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    pos = states.index[sel]  # the state predicting each real token
    # a flat index_select: its backward is an index_add (advanced indexing's is a slower index_put)
    taken = logp_all.reshape(-1).index_select(0, pos * logits.shape[-1] + completions[sel])
    lp = logits.new_zeros(mask.shape).masked_scatter(sel, taken)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = -(logp_all.exp() * logp_all).sum(-1)
            entropy = logits.new_zeros(mask.shape).masked_scatter(sel, ent[pos])
    return (lp, entropy, states.expand(mask)) if with_hidden else (lp, entropy)


def _hidden(model, prompts: list[list[int]], comp: torch.Tensor, cmask: torch.Tensor, pad: int) -> torch.Tensor:
    """Hidden states feeding each completion position, one right-padded prompt+completion row each:
    completion token t is predicted at column len(prompt) - 1 + t."""
    B, L = comp.shape
    P = max(map(len, prompts))
    ids = torch.full((B, P + L), pad, dtype=torch.long)
    attn = torch.zeros(B, P + L, dtype=torch.long)
    at = torch.zeros(B, L, dtype=torch.long)
    for i, (p, k) in enumerate(zip(prompts, cmask.sum(-1).tolist())):
        ids[i, :len(p)] = torch.tensor(p)
        ids[i, len(p):len(p) + L] = comp[i]
        attn[i, :len(p) + int(k)] = 1
        at[i] = len(p) - 1 + torch.arange(L)
    hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    return hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))


def tree_token_cost(model) -> float:
    """What one token costs in a forward and backward, counted in attention scores (query-key pairs):
    :func:`_tree_rows`' exchange rate between the tokens a packed tree row saves and the attention it
    adds. A token's projections and MLP take 2·P FLOPs a layer (P the layer's parameters), one attention
    score 4·d (q·k, then the score times v); SDPA's masked math kernel on CPU does about a third of a
    matmul's FLOPs per second. Peer fixture (d 256): 473 scores; measured, a token's forward and
    backward ~140 µs, a score's ~0.3 µs (bench/bench_packing.py at 32 and 200 completion tokens)."""
    base = getattr(model, "base_model", model)
    d = int(model.config.hidden_size)
    layers = getattr(base, "layers", None)
    per_layer = sum(p.numel() for p in layers[0].parameters()) if layers is not None and len(layers) else 12 * d * d
    return per_layer / (2 * d) / 3


def _tree_rows(group: torch.Tensor, plen: list[int], comp: torch.Tensor, lengths: torch.Tensor, cost: float,
               ) -> tuple[list[int], torch.Tensor]:
    """Split each prompt's completions over packed tree rows: the prompt of each packed row and the
    packed row of each completion.

    A packed row's attention is dense over its width S (a 4-D mask), so a row of width S costs
    S·(a + S) with ``cost`` a (:func:`tree_token_cost`). Completions that share their first tokens
    (the arithmetic world: 8 completions fit in ~1.4 plain rows' width) belong in one row; 8 that differ
    from their first token would make a row 8× wider, its attention 8× the plain rows', quadratic in
    the completion length. Completions are taken in lexicographic order, so that each adds the nodes
    past its longest common prefix with the one before (the most it shares with any earlier one), and
    joins the current packed row when that costs less than a row of its own (prompt + its tokens).
    A prefix shared across two packed rows is computed in both: the same states, a little more work."""
    B, fed_t = len(group), (lengths - 1).clamp(min=0)  # the tokens a row feeds (its last predicts nothing)
    groups, fed, rows = group.tolist(), fed_t.tolist(), comp.tolist()  # Python lists: a loop over rows
    order = sorted(range(B), key=lambda b: (groups[b], rows[b][:fed[b]]))
    a, b = comp[order[:-1]], comp[order[1:]]
    lcp = (a == b).long().cumprod(1).sum(1)
    shared = torch.minimum(lcp, torch.minimum(fed_t[order[:-1]], fed_t[order[1:]])).tolist()
    prompt_of: list[int] = []
    row_tree = [0] * B
    width = 0
    for i, r in enumerate(order):
        g, alone = groups[r], plen[groups[r]] + fed[r]
        joined = width + fed[r] - (shared[i - 1] if i else 0)
        extra = joined * (cost + joined) - width * (cost + width)  # joining: the row's new cost
        if not prompt_of or prompt_of[-1] != g or extra > alone * (cost + alone):
            prompt_of.append(g)
            joined = alone
        width = joined
        row_tree[r] = len(prompt_of) - 1
    return prompt_of, torch.tensor(row_tree)


def _trie_states(model, uniq: list[tuple[int, ...]], group: torch.Tensor, comp: torch.Tensor,
                 lengths: torch.Tensor, pad: int, dtype: str = "fp32", lean: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_states` with the completions of each packed row merged into a prefix tree:
    ``group`` gives each completion's packed row and ``uniq`` each packed row's prompt; a row holds the
    prompt's tokens, then each distinct (prompt, completion prefix) once, parents before children. A
    4-D attention mask lets each tree token attend to its prompt and its own ancestors only, and its
    position is its depth, so each state equals a plain row's exactly (tree attention, as speculative
    decoding verifies a tree of drafts in one forward)."""
    U, (B, k) = len(uniq), comp.shape
    # node ids: 0..U-1 the prompts (roots), then one per distinct prefix, created depth by depth
    parent_of_row = group.clone()
    node_of = torch.zeros(B, k, dtype=torch.long)  # node fed token t of row b (t ≤ length - 2)
    parents, tokens, depths = [torch.full((U,), -1)], [torch.full((U,), pad)], [torch.full((U,), -1)]
    n_nodes, V = U, int(comp.max()) + 1
    for t in range(k - 1):  # a row's last token predicts nothing: never fed
        live = (lengths > t + 1).nonzero()[:, 0]
        if not len(live):
            break
        pairs, inv = torch.unique(parent_of_row[live] * V + comp[live, t], return_inverse=True)
        ids = n_nodes + inv
        parents.append(pairs // V), tokens.append(pairs % V), depths.append(torch.full((len(pairs),), t))
        parent_of_row[live] = ids
        node_of[live, t] = ids
        n_nodes += len(pairs)
    parent, token, depth = torch.cat(parents), torch.cat(tokens), torch.cat(depths)
    node_group = torch.arange(n_nodes)
    for t in range(int(depth.max()) + 1):  # a node's prompt is its parent's
        at = (depth == t).nonzero()[:, 0]
        node_group[at] = node_group[parent[at]]
    # columns: prompt g at 0..p_g-1, then its nodes in creation order (parents first)
    plen = torch.tensor([len(p) for p in uniq])
    is_node = depth >= 0
    rank = torch.zeros(n_nodes, dtype=torch.long)
    if is_node.any():
        g = node_group[is_node]
        order = torch.argsort(g, stable=True)
        counts = torch.bincount(g, minlength=U)
        start = counts.cumsum(0) - counts
        r = torch.empty_like(g)
        r[order] = torch.arange(len(g)) - start[g[order]]
        rank[is_node] = r
    col = plen[node_group] + rank
    col[:U] = plen - 1  # a root's state is its prompt's last token
    width = plen + torch.bincount(node_group[is_node], minlength=U)
    S = int(width.max())
    ids = torch.full((U, S), pad, dtype=torch.long)
    pos = torch.zeros(U, S, dtype=torch.long)
    for j, p in enumerate(uniq):
        ids[j, :len(p)] = torch.tensor(p)
        pos[j, :len(p)] = torch.arange(len(p))
    ng, nc = node_group[is_node], col[is_node]
    ids[ng, nc] = token[is_node]
    pos[ng, nc] = plen[ng] + depth[is_node]
    # who attends to whom: a prompt token to the prompt before it; a node to its prompt and to its
    # ancestors and itself (built depth by depth from the parent's row); padding to column 0 only
    cols = torch.arange(S)
    allowed = torch.zeros(n_nodes, S, dtype=torch.bool)
    allowed[:U] = cols[None] < plen[:, None]
    for t in range(int(depth.max()) + 1):
        at = (depth == t).nonzero()[:, 0]
        allowed[at] = allowed[parent[at]]
        allowed[at, col[at]] = True
    mask = torch.zeros(U, S, S, dtype=torch.bool)
    mask[:, :, 0] = True
    mask |= (cols[None, :, None] >= cols[None, None, :]) & (cols[None, :, None] < plen[:, None, None])
    mask[ng, nc] = allowed[is_node]
    real = cols[None] < width[:, None]  # (U, S): the prompt's tokens and the row's nodes; padding after
    out = tree_states(model, ids, pos, mask, real, dtype) if lean else None  # (real tokens, H)
    if out is not None:
        flat = torch.cumsum(real.reshape(-1), 0) - 1  # a real (row, column)'s place among the real tokens
        hidden = out.index_select(0, flat[node_group * S + col])  # one state per node id
    else:  # the model's own forward (the default, and architectures the lean one does not cover)
        out = model.base_model(input_ids=ids, attention_mask=attention_mask_4d(model, mask[:, None]), position_ids=pos,
                               use_cache=False).last_hidden_state  # (U, S, H)
        hidden = out.reshape(U * S, -1).index_select(0, node_group * S + col)  # one state per node id
    # completion token t of row b is predicted by the node fed token t - 1 (t = 0: its prompt's root)
    index = torch.cat([group[:, None], node_of[:, :k - 1]], dim=1)
    index = torch.where(torch.arange(k)[None] < lengths[:, None], index, 0)
    return hidden, index


def sequence_rewards_to_tokens(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's reward on its last real token (N, L); dropped (NaN) rewards give 0."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    out[torch.arange(len(rewards)), last] = torch.nan_to_num(rewards, nan=0.0)
    return out * (mask.sum(-1, keepdim=True) > 0)

