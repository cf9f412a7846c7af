"""Bradley-Terry reward models (seed §3): a causal LM backbone with a scalar head, trained on
preference pairs with -log σ(r(x,y+) - r(x,y-)), and the scoring API that returns r(x, y).

The model is a plain ``AutoModelForSequenceClassification`` (``num_labels=1``), so the saved
folder loads with transformers alone. The score is read at the last real token of each row,
found from the attention mask, so it does not depend on the padding side or on the pad id (a
tokenizer whose pad is its EOS still scores at the EOS).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from . import runs
from .arith import ArithSpec
from .data import DataStats, EpochSampler, Example, PairExample, collate
from .dpo import load_pairs
from .losses.pairwise import bradley_terry_loss
from .modeling import autocast, load_tokenizer, resolve_model_path
from .runlog import RunLogger, read_metrics

log = logging.getLogger(__name__)


class RewardConfig(runs.TrainConfig):
    """A Bradley-Terry reward model from prompt/chosen/rejected pairs (optional 'margin' column)."""

    output_dir: str = Field("runs/reward", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    data: str = Field("arith", description="'arith' (generated pairs) or a file/folder of prompt/chosen/rejected rows")
    arith: ArithSpec = Field(default_factory=ArithSpec, description="difficulty of the arithmetic world")
    arith_pairs: int = Field(4000, ge=1, description="pairs generated when data=arith")
    eval_data: str = Field("auto", description="'arith' (held-out pairs), 'none', or 'auto' (arith when data=arith)")
    eval_pairs: int = Field(300, ge=1, description="held-out pairs scored for pairwise accuracy")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    max_length: int = Field(128, ge=2, description="longest prompt + completion; longer pairs are dropped and counted")
    skip_bad_rows: bool = Field(False, description="skip and count malformed pairs instead of stopping")
    center_coef: float = Field(0.0, ge=0, description="reward centering: + coef · E[(r_c + r_r)²]")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    max_steps: int = Field(300, ge=1, description="optimizer steps")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def load_reward_model(path: str | Path, num_labels: int = 1):
    """A sequence-classification model; from a causal-LM checkpoint the head is new (seeded)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, dtype=torch.float32)


def _head(model) -> torch.nn.Module:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__}: no 'score' or 'classifier' head")


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r = head(h_last) for each row: (B, num_labels), h_last the hidden state of the rightmost
    real token (attention_mask == 1), whatever the padding side. Only B rows reach the head."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding keeps positions 0.. per row
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, T, H)
    T = attention_mask.shape[1]
    last = T - 1 - attention_mask.flip(-1).argmax(-1)  # index of the rightmost 1 in each row
    return _head(model)(hidden[torch.arange(len(last)), last])


class RewardScorer:
    """r(x, y) for batches of prompts and completions, from a trained reward-model folder."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        self.model = load_reward_model(path).eval()
        self.tokenizer = load_tokenizer(path)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
        rows = []
        for p, c in zip(prompts, completions):
            ids = tok(p, add_special_tokens=False)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
            if eos is not None and ids[-1:] != [eos]:
                ids.append(eos)  # scored at the EOS, as in training
            rows.append(Example(ids, [0] * len(ids)))
        out = []
        for i in range(0, len(rows), self.batch_size):
            b = collate(rows[i:i + self.batch_size], pad)
            out.append(last_token_scores(self.model, b.input_ids, b.attention_mask)[:, 0])
        return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def pair_rewards(model, pairs: list[PairExample], pad_id: int, dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (B,), r_rejected (B,)), both completions of every pair in one forward."""
    chosen, rejected = zip(*(p.rows() for p in pairs))
    b = collate([*chosen, *rejected], pad_id)
    with autocast(dtype):
        r = last_token_scores(model, b.input_ids, b.attention_mask)[:, 0].float()
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def pairwise_accuracy(model, pairs: list[PairExample], pad_id: int) -> float:
    was = model.training
    model.eval()
    hits = 0
    for i in range(0, len(pairs), 64):
        rc, rr = pair_rewards(model, pairs[i:i + 64], pad_id)
        hits += int((rc > rr).sum())
    model.train(was)
    return hits / max(1, len(pairs))


@dataclass
class RewardResult:
    run_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    data_stats: DataStats | None = None
    stopped_early: bool = False


def train(cfg: RewardConfig, rows: list[dict] | None = None) -> RewardResult:
    """Train a Bradley-Terry reward model as configured (``rows`` replaces ``cfg.data``)."""
    t_start = time.time()
    runs.setup_torch(cfg)
    run_dir = runs.prepare_run_dir(cfg)
    ckpt, state = runs.resume_point(cfg, run_dir)
    path = ckpt or resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    model = load_reward_model(path)  # the head is initialised after setup_torch's seed: reproducible
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    pad_id = model.config.pad_token_id or 0

    pairs, stats = load_pairs(cfg, tokenizer, rows)  # type: ignore[arg-type]
    margins = _margins(cfg, rows)
    if margins is not None and len(margins) != len(pairs):
        raise ValueError(f"{len(margins)} margins for {len(pairs)} pairs: drop over-long rows from the file first")
    use_eval = cfg.eval_data == "arith" or (cfg.eval_data == "auto" and cfg.data == "arith" and rows is None)
    eval_pairs = load_pairs(cfg, tokenizer, split="held_out")[0] if use_eval else []  # type: ignore[arg-type]

    sampler = EpochSampler(len(pairs), cfg.seed)
    optimizer = runs.make_optimizer(model, cfg)
    scheduler = runs.make_scheduler(optimizer, cfg)
    start = 0
    if state is not None:
        runs.restore_train_state(state, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]

    logger = RunLogger(run_dir, cfg.max_steps, start, "reward", cfg.progress, cfg.tensorboard)
    logger.message(f"reward: {stats.summary()}; model {path}; run {run_dir}")
    result = RewardResult(run_dir, run_dir / "final", cfg.max_steps, 0.0, data_stats=stats)

    def evaluate(step: int) -> float:
        acc = pairwise_accuracy(model, eval_pairs, pad_id)
        logger.log(step, {"eval_pairwise_accuracy": acc}, advance=False)
        return acc

    if eval_pairs and start == 0:
        result.accuracy_before = evaluate(0)

    step = start
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        idx = sampler.next(cfg.batch_size)
        totals: dict[str, float] = {"loss": 0.0}
        for j in range(0, cfg.batch_size, cfg.micro_batch_size):
            mb = idx[j:j + cfg.micro_batch_size]
            rc, rr = pair_rewards(model, [pairs[i] for i in mb], pad_id, cfg.dtype)
            loss, metrics = bradley_terry_loss(rc, rr, margins[mb] if margins is not None else None, cfg.center_coef)
            share = len(mb) / cfg.batch_size  # the mean over the step's pairs, however it is split
            (loss * share).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * share
        grad_norm = runs.optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
        dt = time.perf_counter() - t0
        n_tok = sum(2 * len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected) for i in idx)
        logger.log(step, {**totals, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": n_tok,
                          "tok_per_s": n_tok / dt, "step_time": dt})
        if eval_pairs and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            evaluate(step)
        stop = cfg.stop_at_step is not None and step == cfg.stop_at_step and step < cfg.max_steps
        if stop or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            runs.save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, {"sampler": sampler.state_dict()})
        if stop:
            result.stopped_early = True
            break

    if not result.stopped_early:
        runs.save_final(run_dir, model, tokenizer)
        if eval_pairs:
            result.accuracy_after = evaluate(cfg.max_steps)
    logger.close()
    result.seconds, result.steps = time.time() - t_start, step
    if cfg.report and not result.stopped_early:
        from .report import write_report

        summary: dict[str, Any] = {"steps": step, "wall time (s)": round(result.seconds, 1), "data": stats.summary()}
        if result.accuracy_after is not None:
            summary["held-out pairwise accuracy"] = f"{result.accuracy_before:.1%} -> {result.accuracy_after:.1%}"
        write_report(run_dir, "reward model", read_metrics(run_dir / "metrics.jsonl"), summary)
    return result


def _margins(cfg: RewardConfig, rows: list[dict] | None) -> torch.Tensor | None:
    """Per-pair margins from a 'margin' column of a data file, when it has one."""
    if rows is None and cfg.data == "arith":
        return None
    from .data import read_rows

    raw = read_rows(rows if rows is not None else cfg.data, skip_bad_rows=True)
    if not raw or "margin" not in raw[0].data:
        return None
    if cfg.skip_bad_rows:
        raise ValueError("a 'margin' column cannot be combined with skip_bad_rows (rows would misalign)")
    return torch.tensor([float(r.data["margin"]) for r in raw])
