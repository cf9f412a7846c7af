"""Supervised fine-tuning (instruction tuning) of a causal LM: the stage before alignment.

One loop, top to bottom: data → (packing) → shuffled batches → micro-batches with a loss
normalised over the whole step (:func:`tether.losses.completion_nll`) → clip → AdamW → schedule,
with evaluation, metrics, checkpoints and exact resume from the shared run plumbing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from . import runs
from .arith import sft_rows
from .config import ConfigError
from .data import DataStats, TokenBatch, collate, pack, read_rows, tokenize_sft
from .evaluate import accuracy, load_eval_rows
from .lora import LoraFields
from .losses import completion_nll
from .modeling import (autocast, load_tokenizer, packing_honoured, padding_id, resolve_model_path,
                       target_logits)
from .runlog import read_metrics

log = logging.getLogger(__name__)


class SFTConfig(runs.OfflineConfig, LoraFields):
    """Supervised fine-tuning. Data rows: prompt/completion, chat messages, or text (see tether.data)."""

    resume_free: ClassVar[frozenset[str]] = frozenset({"max_new_tokens"})  # the evaluation's generation budget

    output_dir: str = Field("runs/sft", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    arith_rows: int = Field(20000, ge=1, description="rows generated when data=arith")
    eval_samples: int = Field(200, ge=1, description="held-out prompts scored by greedy exact match")
    max_new_tokens: int = Field(16, ge=1, description="generation budget of the evaluation")
    overlong: Literal["drop", "truncate"] = Field("drop", description="rows longer than max_length: drop (counted) or truncate")
    packing: bool = Field(False, description="pack several rows into each max_length row (attention stays within each row)")
    disable_dropout: bool = Field(False, description="zero the model's dropout rates while training (SFT keeps them by default, as TRL's SFTTrainer: no log-probs are compared against a sampler or a reference)")


@dataclass
class SFTResult(runs.FitResult):
    data_stats: DataStats = field(default_factory=DataStats)


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
    runs.setup_torch(cfg)
    run_dir, ckpt, state = runs.open_run(cfg)
    model_path = ckpt or resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template_kwargs)
    model = runs.load_trainable(cfg, ckpt, resolve_model_path(cfg.model))
    if cfg.packing and not packing_honoured(model):
        raise ConfigError(f"packing=true: {type(model).__name__} does not keep packed examples apart by their position "
                          "ids (its attention would cross them); use packing=false")
    pad = padding_id(tokenizer)
    items, stats = load_examples(cfg, tokenizer, rows)

    eval_source = "arith" if cfg.arith_eval(rows) else ("none" if cfg.eval_data == "auto" else cfg.eval_data)
    eval_rows = [] if eval_source == "none" else load_eval_rows(eval_source, cfg.eval_samples, cfg.arith, tokenizer)

    def step(idx: list[int]) -> dict[str, float]:
        micro = [collate([items[i] for i in idx[j:j + cfg.micro_batch_size]], pad)
                 for j in range(0, len(idx), cfg.micro_batch_size)]
        loss, n_targets = accumulate_gradients(model, micro, cfg.dtype)
        return {"loss": loss, "tokens": sum(b.n_tokens for b in micro), "target_tokens": n_targets}

    def evaluate() -> dict[str, Any]:
        return accuracy(model, tokenizer, eval_rows, cfg.max_new_tokens)

    kind = "packed rows" if cfg.packing else "examples"
    fit = runs.fit(cfg, run_dir, model, tokenizer, len(items), state, "sft", step, evaluate if eval_rows else None,
                   f"{stats.summary()}; {len(items)} {kind}; model {model_path}")
    result = SFTResult(**vars(fit), data_stats=stats)
    if cfg.report and result.ended_here:
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
