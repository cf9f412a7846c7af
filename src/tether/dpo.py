"""Direct preference optimisation (seed §8) and its loss family, from preference pairs.

The loop: pairs → reference log-probs (computed once, stored in the run folder, reused) →
shuffled batches → chosen and rejected rows through the policy in one forward → the DPO loss of
:mod:`tether.losses.dpo` → AdamW, with evaluation (held-out preference accuracy and greedy
exact-match), metrics, checkpoints and exact resume from the shared run plumbing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from . import runs
from .config import ConfigError
from .arith import ArithSpec, preference_rows
from .data import DataStats, EpochSampler, PairExample, collate, read_rows, tokenize_pairs
from .evaluate import accuracy, load_eval_rows
from .losses.dpo import DPO_LOSSES, F_DIVERGENCES, check_loss_types, dpo_loss, sequence_logps
from .modeling import autocast, load_causal_lm, load_tokenizer, resolve_model_path, token_logps
from .runlog import RunLogger, read_metrics

log = logging.getLogger(__name__)


class DPOConfig(runs.TrainConfig):
    """DPO from prompt/chosen/rejected pairs (plain text or chat messages)."""

    output_dir: str = Field("runs/dpo", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    data: str = Field("arith", description="'arith' (generated pairs) or a file/folder of prompt/chosen/rejected rows")
    arith: ArithSpec = Field(default_factory=ArithSpec, description="difficulty of the arithmetic world")
    arith_pairs: int = Field(4000, ge=1, description="pairs generated when data=arith")
    eval_data: str = Field("auto", description="'arith', a file of {prompt, answer} rows, 'none', or 'auto' (arith when data=arith)")
    eval_pairs: int = Field(200, ge=1, description="held-out pairs scored for preference accuracy (eval_data=arith)")
    eval_samples: int = Field(200, ge=1, description="held-out prompts scored by greedy exact match")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    max_new_tokens: int = Field(16, ge=1, description="generation budget of the evaluation")
    max_length: int = Field(128, ge=2, description="longest prompt + completion; longer pairs are dropped and counted")
    skip_bad_rows: bool = Field(False, description="skip and count malformed pairs instead of stopping")
    beta: float = Field(0.1, gt=0, description="β: strength of the KL regularisation (implicit reward scale)")
    loss_type: list[str] = Field(["sigmoid"], description=f"one or more of {', '.join(DPO_LOSSES)}")
    loss_weights: list[float] | None = Field(None, description="weight of each loss_type (default 1 each)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: assumed label-flip rate (cDPO, robust, exo_pair, aot)")
    f_divergence: str = Field("reverse_kl", description=f"divergence of the implicit reward: {', '.join(F_DIVERGENCES)}")
    f_alpha: float = Field(1.0, description="α of the alpha_divergence")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO: weight of the tokens past the shorter completion")
    discopop_tau: float = Field(0.05, gt=0, description="τ of the discopop loss")
    reference: Literal["precompute", "live", "none"] = Field(
        "precompute", description="reference log-probs: computed once and stored, a live reference model, or none (reference-free)")
    ref_model: str | None = Field(None, description="reference checkpoint (default: the starting policy)")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    max_steps: int = Field(100, ge=1, description="optimizer steps")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


@dataclass
class DPOResult:
    run_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    data_stats: DataStats | None = None
    stopped_early: bool = False


def load_pairs(cfg: DPOConfig, tokenizer, rows: list[dict] | None = None, split: str = "train") -> tuple[list[PairExample], DataStats]:
    stats = DataStats()
    if rows is not None:
        raw = read_rows(rows, cfg.skip_bad_rows, stats)
    elif cfg.data == "arith":
        n = cfg.arith_pairs if split == "train" else cfg.eval_pairs
        raw = read_rows(preference_rows(cfg.arith, n, cfg.seed, split))
    else:
        raw = read_rows(cfg.data, cfg.skip_bad_rows, stats)
    return tokenize_pairs(raw, tokenizer, cfg.max_length, cfg.skip_bad_rows, stats)


def pair_logps(model, pairs: list[PairExample], pad_id: int, ld_alpha: float | None, dtype: str = "fp32"):
    """Sequence log-probs (chosen (B,), rejected (B,)) and completion lengths, chosen and rejected
    rows going through the model in one forward."""
    chosen, rejected = zip(*(p.rows() for p in pairs))
    batch = collate([*chosen, *rejected], pad_id)  # TRL's layout: B chosen rows, then B rejected
    with autocast(dtype):
        lp, mask = token_logps(model, batch)
    seq = sequence_logps(lp, mask, ld_alpha)
    n = mask.sum(-1)
    B = len(pairs)
    return seq[:B], seq[B:], n[:B], n[B:]


@torch.no_grad()
def reference_logps(model, pairs: list[PairExample], pad_id: int, ld_alpha: float | None, batch_size: int = 64) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair, computed once."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        c, r, _, _ = pair_logps(model, pairs[i:i + batch_size], pad_id, ld_alpha)
        out.append(torch.stack([c, r], -1))
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2)


def accumulate_gradients(model, batch: list[PairExample], ref: torch.Tensor, cfg: DPOConfig,
                         pad_id: int) -> tuple[dict[str, float], int]:
    """Forward/backward one optimizer step's pairs in micro-batches; returns (metrics, tokens).

    Each micro-batch's loss is normalised by the pair and token counts of the whole step, so the
    gradient is the one-batch gradient however the step is split. (``aot`` sorts within a
    micro-batch, so for it the split does matter.)
    """
    totals: dict[str, float] = {"loss": 0.0}
    n_tok = 0
    n_chosen = sum(len(p.chosen) for p in batch)  # the sft term's normaliser, over the whole step
    for j in range(0, len(batch), cfg.micro_batch_size):
        mb = batch[j:j + cfg.micro_batch_size]
        c, r, nc, nr = pair_logps(model, mb, pad_id, cfg.ld_alpha, cfg.dtype)
        loss, metrics = dpo_loss(
            c, r, ref[j:j + len(mb), 0], ref[j:j + len(mb), 1], nc, nr, beta=cfg.beta, loss_types=cfg.loss_type,
            loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing, f_divergence=cfg.f_divergence,
            f_alpha=cfg.f_alpha, discopop_tau=cfg.discopop_tau, n_pairs=len(batch), n_tokens=n_chosen)
        loss.backward()
        totals["loss"] += loss.item()
        share = len(mb) / len(batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * share
        n_tok += sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in mb)
    return totals, n_tok


def train(cfg: DPOConfig, rows: list[dict] | None = None) -> DPOResult:
    """Run DPO as configured (``rows`` replaces ``cfg.data`` when given)."""
    check_loss_types(cfg.loss_type, cfg.label_smoothing, cfg.f_divergence)
    t_start = time.time()
    runs.setup_torch(cfg)
    run_dir = runs.prepare_run_dir(cfg)
    ckpt, state = runs.resume_point(cfg, run_dir)
    start_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(ckpt or start_path)
    model = load_causal_lm(ckpt or start_path)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    pairs, stats = load_pairs(cfg, tokenizer, rows)
    use_arith_eval = cfg.eval_data == "arith" or (cfg.eval_data == "auto" and cfg.data == "arith" and rows is None)
    eval_pairs = load_pairs(cfg, tokenizer, split="held_out")[0] if use_arith_eval else []

    # The reference: π_ref = the starting policy unless ref_model says otherwise.
    ref_model = None
    ref_cache = run_dir / "ref_logps.pt"
    ref_train = ref_eval = None
    if cfg.reference != "none":
        ref_model = load_causal_lm(resolve_model_path(cfg.ref_model) if cfg.ref_model else start_path).eval()
        ref_model.requires_grad_(False)
        if cfg.reference == "precompute":
            if ref_cache.is_file():
                cached = torch.load(ref_cache, weights_only=True)
                ref_train, ref_eval = cached["train"], cached["eval"]
            else:
                ref_train = reference_logps(ref_model, pairs, pad_id, cfg.ld_alpha)
                ref_eval = reference_logps(ref_model, eval_pairs, pad_id, cfg.ld_alpha)
                torch.save({"train": ref_train, "eval": ref_eval}, ref_cache)
            if len(ref_train) != len(pairs):
                raise ConfigError(f"{ref_cache} holds {len(ref_train)} pairs but the data has {len(pairs)}")
            ref_model = None  # not needed any more: free its memory
        else:
            ref_eval = reference_logps(ref_model, eval_pairs, pad_id, cfg.ld_alpha)

    sampler = EpochSampler(len(pairs), cfg.seed)
    optimizer = runs.make_optimizer(model, cfg)
    scheduler = runs.make_scheduler(optimizer, cfg)
    start = 0
    if state is not None:
        runs.restore_train_state(state, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]

    eval_prompts = load_eval_rows("arith", cfg.eval_samples, cfg.arith) if use_arith_eval else (
        [] if cfg.eval_data in ("none", "auto") else load_eval_rows(cfg.eval_data, cfg.eval_samples))
    logger = RunLogger(run_dir, cfg.max_steps, start, "dpo", cfg.progress, cfg.tensorboard)
    logger.message(f"dpo: {stats.summary()}; reference {cfg.reference}; model {ckpt or start_path}; run {run_dir}")
    result = DPOResult(run_dir, run_dir / "final", cfg.max_steps, 0.0, data_stats=stats)

    def reference_of(idx: list[int]) -> torch.Tensor:
        """(B, 2) reference log-probs of the pairs ``idx``."""
        if ref_train is not None:
            return ref_train[idx]
        if ref_model is None:
            return torch.zeros(len(idx), 2)
        with torch.no_grad():
            c, r, _, _ = pair_logps(ref_model, [pairs[i] for i in idx], pad_id, cfg.ld_alpha, cfg.dtype)
        return torch.stack([c, r], -1)

    def evaluate(step: int) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        if eval_pairs:
            with torch.no_grad():
                model.eval()
                margins = []
                for i in range(0, len(eval_pairs), 64):
                    c, r, _, _ = pair_logps(model, eval_pairs[i:i + 64], pad_id, cfg.ld_alpha)
                    ref = ref_eval[i:i + 64] if ref_eval is not None else torch.zeros(len(c), 2)
                    margins.append((c - ref[:, 0]) - (r - ref[:, 1]))
                model.train()
            ev["pref_accuracy"] = float((torch.cat(margins) > 0).float().mean())
        if eval_prompts:
            ev.update(accuracy(model, tokenizer, eval_prompts, cfg.max_new_tokens))
        logger.log(step, {f"eval_{k}": v for k, v in ev.items() if k in ("accuracy", "pref_accuracy")}, advance=False)
        return ev

    if (eval_pairs or eval_prompts) and start == 0:
        result.eval_before = evaluate(0)

    step = start
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        idx = sampler.next(cfg.batch_size)
        totals, n_tok = accumulate_gradients(model, [pairs[i] for i in idx], reference_of(idx), cfg, pad_id)
        grad_norm = runs.optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
        dt = time.perf_counter() - t0
        logger.log(step, {**totals, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": n_tok,
                          "tok_per_s": n_tok / dt, "step_time": dt})
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps and (eval_pairs or eval_prompts):
            evaluate(step)
        stop = cfg.stop_at_step is not None and step == cfg.stop_at_step and step < cfg.max_steps
        if stop or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            runs.save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, {"sampler": sampler.state_dict()})
        if stop:
            result.stopped_early = True
            break

    if not result.stopped_early:
        runs.save_final(run_dir, model, tokenizer)
        if eval_pairs or eval_prompts:
            result.eval_after = evaluate(cfg.max_steps)
    logger.close()
    result.seconds = time.time() - t_start
    result.steps = step
    if cfg.report and not result.stopped_early:
        from .report import write_report

        summary: dict[str, Any] = {"steps": step, "wall time (s)": round(result.seconds, 1), "data": stats.summary()}
        for name, ev in (("before", result.eval_before), ("after", result.eval_after)):
            for k in ("pref_accuracy", "accuracy"):
                if ev and k in ev:
                    summary[f"held-out {k.replace('_', ' ')} {name}"] = f"{ev[k]:.1%}"
        write_report(run_dir, "DPO", read_metrics(run_dir / "metrics.jsonl"), summary)
    return result
