"""Supervised fine-tuning (instruction tuning) of a causal LM: the stage before alignment.

One loop, top to bottom: data → (packing) → shuffled batches → micro-batches with a loss
normalised over the whole step (:func:`tether.losses.completion_nll`) → clip → AdamW → schedule,
with evaluation, metrics, checkpoints and exact resume from the shared run plumbing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from . import runs
from .arith import ArithSpec, sft_rows
from .data import DataStats, EpochSampler, TokenBatch, collate, pack, read_rows, tokenize_sft
from .evaluate import accuracy, load_eval_rows
from .losses import completion_nll
from .modeling import autocast, load_causal_lm, load_tokenizer, resolve_model_path, target_logits
from .runlog import RunLogger, read_metrics

log = logging.getLogger(__name__)


class SFTConfig(runs.TrainConfig):
    """Supervised fine-tuning. Data rows: prompt/completion, chat messages, or text (see tether.data)."""

    output_dir: str = Field("runs/sft", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    data: str = Field("arith", description="'arith' (generated arithmetic problems), a .jsonl/.json/.parquet/.csv file, or a datasets folder")
    arith: ArithSpec = Field(default_factory=ArithSpec, description="difficulty of the arithmetic world (data=arith, eval_data=arith)")
    arith_rows: int = Field(20000, ge=1, description="rows generated when data=arith")
    eval_data: str = Field("auto", description="'arith' (held-out problems), a file of {prompt, answer} rows, 'none', or 'auto' (arith when data=arith, else none)")
    eval_samples: int = Field(200, ge=1, description="held-out prompts scored by greedy exact match")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after training)")
    max_new_tokens: int = Field(16, ge=1, description="generation budget of the evaluation")
    max_length: int = Field(128, ge=2, description="longest tokenized row (or packed row)")
    overlong: Literal["drop", "truncate"] = Field("drop", description="rows longer than max_length: drop (counted) or truncate")
    packing: bool = Field(False, description="pack several rows into each max_length row (attention stays within each row)")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of stopping at the first")


@dataclass
class SFTResult:
    run_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    data_stats: DataStats = field(default_factory=DataStats)
    stopped_early: bool = False


def load_examples(cfg: SFTConfig, tokenizer, rows: list[dict] | None = None):
    stats = DataStats()
    if rows is not None:
        raw = read_rows(rows, cfg.skip_bad_rows, stats)
    elif cfg.data == "arith":
        raw = read_rows(sft_rows(cfg.arith, cfg.arith_rows, cfg.seed))
    else:
        raw = read_rows(cfg.data, cfg.skip_bad_rows, stats)
    examples, stats = tokenize_sft(raw, tokenizer, cfg.max_length, cfg.overlong, cfg.skip_bad_rows, stats)
    return (pack(examples, cfg.max_length) if cfg.packing else examples), stats


def accumulate_gradients(model, micro: list[TokenBatch], dtype: str = "fp32") -> tuple[float, int]:
    """Forward/backward every micro-batch of one optimizer step; returns (loss, target tokens).

    Each micro-batch's summed NLL is divided by the target count of the *whole* step, so the
    accumulated gradient equals the one-big-batch gradient however the step is split.
    """
    n_total = sum(b.n_targets for b in micro)
    loss_sum = 0.0
    for b in micro:
        with autocast(dtype):
            logits, targets = target_logits(model, b)
        loss = completion_nll(logits, targets, n_total)
        loss.backward()
        loss_sum += loss.item()
    return loss_sum, n_total


def train(cfg: SFTConfig, rows: list[dict] | None = None) -> SFTResult:
    """Run SFT as configured (``rows`` replaces ``cfg.data`` when given)."""
    t_start = time.time()
    runs.setup_torch(cfg)
    run_dir = runs.prepare_run_dir(cfg)
    ckpt, state = runs.resume_point(cfg, run_dir)
    model_path = ckpt or resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    items, stats = load_examples(cfg, tokenizer, rows)
    sampler = EpochSampler(len(items), cfg.seed)
    optimizer = runs.make_optimizer(model, cfg)
    scheduler = runs.make_scheduler(optimizer, cfg)
    start = 0
    if state is not None:
        runs.restore_train_state(state, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]

    eval_source = ("arith" if cfg.data == "arith" and rows is None else "none") if cfg.eval_data == "auto" else cfg.eval_data
    eval_rows = [] if eval_source == "none" else load_eval_rows(eval_source, cfg.eval_samples, cfg.arith)
    logger = RunLogger(run_dir, cfg.max_steps, start, "sft", cfg.progress, cfg.tensorboard)
    logger.message(f"sft: {stats.summary()}; {len(items)} {'packed rows' if cfg.packing else 'examples'}; "
                   f"model {model_path}; run {run_dir}")
    result = SFTResult(run_dir, run_dir / "final", cfg.max_steps, 0.0, data_stats=stats)

    def evaluate(step: int) -> dict[str, Any]:
        ev = accuracy(model, tokenizer, eval_rows, cfg.max_new_tokens)
        logger.log(step, {"eval_accuracy": ev["accuracy"], "eval_n": ev["n"]}, advance=False)
        return ev

    if eval_rows and start == 0:
        result.eval_before = evaluate(0)

    step = start
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        idx = sampler.next(cfg.batch_size)
        micro = [collate([items[i] for i in idx[j:j + cfg.micro_batch_size]], pad_id)
                 for j in range(0, cfg.batch_size, cfg.micro_batch_size)]
        loss_sum, n_total = accumulate_gradients(model, micro, cfg.dtype)
        grad_norm = runs.optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
        dt = time.perf_counter() - t0
        n_tok = sum(b.n_tokens for b in micro)
        logger.log(step, {"loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "tokens": n_tok, "target_tokens": n_total, "tok_per_s": n_tok / dt, "step_time": dt,
                          "epoch": sampler.epoch + sampler.pos / sampler.n})
        if eval_rows and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            evaluate(step)
        stop = cfg.stop_at_step is not None and step == cfg.stop_at_step and step < cfg.max_steps
        if stop or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            runs.save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, {"sampler": sampler.state_dict()})
        if stop:
            logger.message(f"sft: stopped after step {step} (stop_at_step); continue with resume=true")
            result.stopped_early = True
            break

    if not result.stopped_early:
        runs.save_final(run_dir, model, tokenizer)
        if eval_rows:
            result.eval_after = evaluate(cfg.max_steps)
    logger.close()
    result.seconds = time.time() - t_start
    result.steps = step
    if cfg.report and not result.stopped_early:
        from .report import write_report

        write_report(run_dir, "SFT", read_metrics(run_dir / "metrics.jsonl"), _summary(result))
    return result


def _summary(r: SFTResult) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": r.steps, "wall time (s)": round(r.seconds, 1), "data": r.data_stats.summary()}
    if r.eval_before:
        out["held-out accuracy before"] = f"{r.eval_before['accuracy']:.1%}"
    if r.eval_after:
        out["held-out accuracy after"] = f"{r.eval_after['accuracy']:.1%}"
    out["final model"] = str(r.final_dir)
    return out
