"""Run plumbing that every trainer calls (never inherits): the common config fields, the run
folder, optimizer and learning-rate schedule, and checkpoint save / exact resume."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from .checkpoint import capture_rng, latest_checkpoint, list_checkpoints, load_state, restore_rng, save_checkpoint
from .config import Config, ConfigError
from .runlog import truncate_metrics

log = logging.getLogger(__name__)


class TrainConfig(Config):
    """Fields every trainer has. Algorithm configs add theirs; the result stays one flat mapping."""

    model: str = Field("embedded", description="local transformers checkpoint folder, or 'embedded' (the built-in arithmetic model)")
    output_dir: str = Field("runs/run", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    overwrite: bool = Field(False, description="delete an existing output_dir first (otherwise a non-empty one needs resume=true)")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in output_dir")
    seed: int = Field(0, description="seed of data order, initialisation and sampling")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step")
    micro_batch_size: int = Field(32, ge=1, description="examples per forward/backward; batch_size/micro_batch_size = gradient accumulation steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only; biases and norms never decay)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW second-moment decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from 0 to lr")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: cosine decay to min_lr_ratio*lr, or constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate of the cosine schedule, as a fraction of lr")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping by global norm (0: off)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (weights and optimizer stay fp32)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept")
    stop_at_step: int | None = Field(None, ge=1, description="checkpoint and stop after this step as if interrupted; resume=true continues")
    progress: bool = Field(True, description="show a progress bar")
    tensorboard: bool = Field(False, description="also log to TensorBoard (needs tether[tensorboard])")
    report: bool = Field(True, description="write report.md and report.png into output_dir at the end")

    @model_validator(mode="after")
    def _check_batches(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run folder; refuse to mix a new run into an old one unless told how."""
    out = Path(cfg.output_dir)
    if cfg.overwrite and out.exists() and not cfg.resume:
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise ConfigError(f"output_dir {out} is not empty: pass resume=true to continue it or overwrite=true to start over")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters), the usual LM practice."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``lr`` at 0-based ``step``: linear warmup, then cosine to ``min_lr_ratio`` or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the global gradient norm (0: no clipping), step, advance the schedule, clear the
    gradients; returns the pre-clip norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def setup_torch(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def resume_point(cfg: TrainConfig, run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint and state to resume from, or (None, None) for a fresh start."""
    if not cfg.resume:
        return None, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if list_checkpoints(run_dir):
            raise ConfigError(f"resume=true but no checkpoint in {run_dir}/checkpoints is complete and intact")
        log.warning("resume=true but %s has no checkpoint yet: starting from scratch", run_dir)
        return None, None
    state = load_state(ckpt)
    _check_same_run(cfg, state, ckpt)
    truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    return ckpt, state


def _check_same_run(cfg: TrainConfig, state: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume with settings that would make the continuation differ from the run."""
    then = json.loads(state["config"])
    now = cfg.model_dump(mode="json")
    free = {"resume", "overwrite", "progress", "stop_at_step", "save_every", "keep_checkpoints", "report",
            "tensorboard", "threads", "model"}
    changed = [k for k in now if k not in free and then.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume from {ckpt}: settings changed since the run started ({diffs})")


def train_state(cfg: TrainConfig, step: int, optimizer, scheduler, extra: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "config": json.dumps(cfg.model_dump(mode="json")), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": capture_rng(), **extra}


def restore_train_state(state: dict[str, Any], optimizer, scheduler) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])


def save(cfg: TrainConfig, run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict[str, Any]) -> Path:
    state = train_state(cfg, step, optimizer, scheduler, extra)
    return save_checkpoint(run_dir, step, model, tokenizer, state, keep=cfg.keep_checkpoints)


def save_final(run_dir: Path, model, tokenizer) -> Path:
    """The final model as a plain HF folder ``<run>/final``, written beside and renamed into place."""
    final, tmp = run_dir / "final", run_dir / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
