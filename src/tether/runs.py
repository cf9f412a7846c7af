"""Run plumbing that every trainer calls (never inherits): the common config fields, the run
folder, optimizer and learning-rate schedule, and checkpoint save / exact resume."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from .checkpoint import capture_rng, latest_checkpoint, list_checkpoints, load_state, restore_rng, save_checkpoint
from .arith import ArithSpec
from .config import Config, ConfigError
from . import lora
from .data import EpochSampler
from .modeling import (check_context, compile_blocks, default_dtype, disable_dropout, load_causal_lm,
                       same_attention_kernels)
from .runlog import RunLogger, read_metrics, truncate_metrics

log = logging.getLogger(__name__)


class RunConfig(Config):
    """Fields every trainer has. Algorithm configs add theirs; the result stays one flat mapping."""

    # settings of this command that only its evaluation reads, free to change on resume
    resume_free: ClassVar[frozenset[str]] = frozenset()

    model: str = Field("embedded", description="local transformers checkpoint folder, or 'embedded' (the built-in arithmetic model)")
    output_dir: str = Field("runs/run", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    overwrite: bool = Field(False, description="delete an existing output_dir first (otherwise a non-empty one needs resume=true)")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in output_dir")
    seed: int = Field(0, description="seed of data order, initialisation and sampling")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only; biases and norms never decay)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW second-moment decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from 0 to lr")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: cosine decay to min_lr_ratio*lr, or constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate of the cosine schedule, as a fraction of lr")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping by global norm (0: off)")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer's activations during the backward instead of keeping them (torch.utils.checkpoint, non-reentrant): activation memory of one layer instead of all, for about a third more compute")
    disable_dropout: bool = Field(True, description="zero the model's dropout rates while training (TRL's disable_dropout), so that the trainer's log-probs are the sampler's and the reference's function of the weights; SFT keeps them by default")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", validate_default=True, description="autocast dtype (weights and optimizer stay fp32): auto is bf16 where the CPU or GPU computes it natively (AVX512-BF16, AMX), else fp32, resolved when the config is made and recorded in the run's config.yaml")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept")
    stop_at_step: int | None = Field(None, ge=1, description="checkpoint and stop after this step as if interrupted; resume=true continues")
    progress: bool = Field(True, description="show a progress bar")
    tensorboard: bool = Field(False, description="also log to TensorBoard (needs tether[tensorboard])")
    report: bool = Field(True, description="write report.md and report.png into output_dir at the end")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="variables the tokenizer's chat template gets wherever chat rows are rendered, e.g. {enable_thinking: false} for Qwen3 (TRL's chat_template_kwargs)")

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, on: bool) -> bool:
        # refused with the config, before a run folder is written that would refuse the corrected command
        if on and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("needs the 'tensorboard' package: pip install 'tether[tensorboard]'")
        return on

    @field_validator("dtype")
    @classmethod
    def _resolve_dtype(cls, dtype: str) -> str:
        # resolved here, not at each use: the run records what it ran in, and resuming on a host that
        # resolves "auto" otherwise is refused as a changed setting instead of continuing in another dtype
        return default_dtype() if dtype == "auto" else dtype


class TrainConfig(RunConfig):
    """A trainer that draws fixed-size batches of examples."""

    batch_size: int = Field(32, ge=1, description="examples per optimizer step")
    micro_batch_size: int = Field(32, ge=1, description="examples per forward/backward (default 32, or batch_size where smaller); batch_size/micro_batch_size = gradient accumulation steps")

    @model_validator(mode="before")
    @classmethod
    def _small_batches(cls, data: Any) -> Any:
        # the default micro-batch is 32 examples, or the whole batch where that is smaller
        if isinstance(data, dict) and "micro_batch_size" not in data and isinstance(data.get("batch_size"), int):
            data = {**data, "micro_batch_size": min(32, data["batch_size"])}
        return data

    @model_validator(mode="after")
    def _check_batches(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size


class OfflineConfig(TrainConfig):
    """Fields of the trainers that learn from a fixed data set (SFT, reward models, DPO)."""

    data: str = Field("arith", description="'arith' (generated by the arithmetic world), a .jsonl/.json/.parquet/.csv file, or a datasets folder")
    arith: ArithSpec = Field(default_factory=ArithSpec, description="difficulty of the arithmetic world (data=arith, eval_data=arith)")
    eval_data: str = Field("auto", description="'arith' (held-out problems), a file of {prompt, answer} rows, 'none', or 'auto' (arith when data=arith, else none)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after training)")
    max_length: int = Field(128, ge=2, description="longest tokenized row; longer ones are dropped and counted")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of stopping at the first")
    torch_compile: bool = Field(False, description="torch.compile each decoder block's training forward (inductor): 1.3-1.4x faster steps on CPU after a first step of about 40 s spent compiling (7 s with inductor's cache warm); for long runs")

    @model_validator(mode="after")
    def _check_compile(self):
        # dynamo traces the checkpoint's context_fn (modeling.same_attention_kernels) and refuses it
        if self.torch_compile and self.gradient_checkpointing:
            raise ValueError("torch_compile=true and gradient_checkpointing=true do not run together yet: choose one")
        return self

    def refuse_eval_files(self, what: str) -> None:
        """For trainers whose evaluation is the arithmetic world's held-out split alone: an eval_data
        file would be read by nothing, so it is refused rather than ignored."""
        if self.eval_data not in ("auto", "arith", "none"):
            raise ValueError(f"eval_data={self.eval_data}: {what} evaluates on the arithmetic world's held-out split "
                             "(eval_data=arith) or not at all (none); a file of its own is not read")

    def arith_eval(self, rows: Any = None) -> bool:
        """Whether to evaluate on the arithmetic world's held-out split."""
        return self.eval_data == "arith" or (self.eval_data == "auto" and self.data == "arith" and rows is None)


def load_trainable(cfg: RunConfig, ckpt: Path | None, start_path: str | Path,
                   load: Callable[[str | Path], torch.nn.Module] | None = None,
                   train_whole: tuple[str, ...] = ()) -> torch.nn.Module:
    """The model a trainer trains (``load`` reads a folder: a causal LM unless told otherwise), in
    training mode (:func:`train_mode`): the checkpoint's weights when resuming, else the start
    model's; with ``lora_rank`` the start model with adapters, fresh or the checkpoint's (which holds
    the adapter and the ``train_whole`` modules only)."""
    load = load or load_causal_lm
    if getattr(cfg, "lora_rank", 0):
        base = load(start_path)
        model = lora.load_adapter(base, ckpt) if ckpt is not None else lora.apply(base, cfg, train_whole)
    else:
        model = load(ckpt or start_path)
    if isinstance(getattr(cfg, "max_length", None), int):
        check_context(model, cfg.max_length, f"max_length={cfg.max_length}")
    return train_mode(model, cfg)


def train_mode(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """``model`` in training mode, its dropout zeroed unless ``cfg`` keeps it (``disable_dropout``),
    its decoder layers checkpointed if asked (``gradient_checkpointing``: transformers' own, which the
    model's forward applies in training mode; tether's packed-tree forward checkpoints its layers too)."""
    model.train()
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing=true: {type(model).__name__} does not support it")
        # non-reentrant: gradients reach LoRA adapters behind frozen inputs (older transformers: gradient_checkpointing_enable)
        kwargs = {"use_reentrant": False, "context_fn": same_attention_kernels}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _check_deletable(cfg: RunConfig, out: Path) -> None:
    """``overwrite=true`` deletes ``out``: only a tether run folder (its ``config.yaml`` is written
    first), never the working directory or one above it, nor one holding an input of this run (a
    model, data or reference path among the settings: "continue training" pointed at its own run)."""
    where = out.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents or where == Path.home().resolve():
        raise ConfigError(f"overwrite=true would delete {out} ({where}), the working directory, your home or a "
                          "folder above them: choose an output_dir of its own")
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"overwrite=true: {out} is not a tether run folder (no config.yaml), so it is not deleted; "
                          "choose another output_dir or empty it yourself")
    for key, value in cfg.model_dump(mode="json").items():
        if key != "output_dir" and isinstance(value, str) and value and Path(value).exists():
            inside = Path(value).resolve()
            if inside == where or where in inside.parents:
                raise ConfigError(f"overwrite=true would delete {key}={value}, which lies inside output_dir {out}: "
                                  "choose another output_dir (or resume=true to continue that run)")


def open_run(cfg: RunConfig) -> tuple[Path, Path | None, dict[str, Any] | None]:
    """The run folder, and the checkpoint and state to resume from (None, None: a fresh start).
    ``config.yaml`` is written only once the resume is known to be allowed, so that a refused one
    leaves the run's record as it was."""
    run_dir = prepare_run_dir(cfg)
    ckpt, state = resume_point(cfg, run_dir)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir, ckpt, state


def _started(out: Path) -> bool:
    """Whether ``out`` holds anything a run would mix into. A folder holding nothing but a config.yaml
    that tether wrote (every option, ``output_dir`` among them) is a run that failed before training
    (a bad data row, a model it could not load): the corrected command runs there as in an empty one."""
    if not out.exists():
        return False
    entries = list(out.iterdir())
    if [e.name for e in entries] != ["config.yaml"]:
        return bool(entries)
    try:
        written = yaml.safe_load(entries[0].read_text())
    except yaml.YAMLError:
        return True
    return not (isinstance(written, dict) and "output_dir" in written and "seed" in written)


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run folder; refuse to mix a new run into an old one unless told how."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder: choose a folder for the run")
    if cfg.overwrite and _started(out) and not cfg.resume:
        _check_deletable(cfg, out)
        shutil.rmtree(out)
    if _started(out) and not cfg.resume:
        hint = ("" if list_checkpoints(out) or (out / "final").exists() else
                " (it holds no checkpoint: a run that stopped before its first one starts afresh with either)")
        raise ConfigError(f"output_dir {out} is not empty: pass resume=true to continue it or overwrite=true to start "
                          f"over{hint}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters), the usual LM practice. The fused
    kernel where the parameters allow it (CPU or CUDA floats): one pass over each tensor instead of
    foreach's dozen, 4.7 → 1.2 ms a step for the 3.4M-parameter fixture model on 2 cores."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Multiplier of ``lr`` at 0-based ``step``: linear warmup, then cosine to ``min_lr_ratio`` or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


class RefSyncFields(Config):
    """TR-DPO's reference sync (Gorbatovski et al. 2024; TRL's ``sync_ref_model`` and its two
    parameters), for the trainers with a reference model: DPO, GRPO, PPO, REINFORCE."""

    sync_ref_model: bool = Field(False, description="move the reference toward the policy every ref_model_sync_steps optimizer updates, π_ref ← α π_θ + (1 - α) π_ref (TR-DPO, Gorbatovski et al. 2024; TRL's sync_ref_model; α = 1 resets it to the policy, as ProRL's reference resets), so that a long run's KL anchors to a recent policy rather than the start; the reference's weights then go into checkpoints")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="sync_ref_model: α, the policy's share of the new reference")
    ref_model_sync_steps: int = Field(512, ge=1, description="sync_ref_model: optimizer updates between syncs")

    @model_validator(mode="after")
    def _sync_ref_lora(self):
        if self.sync_ref_model and getattr(self, "lora_rank", 0):  # the reference is the policy with its adapters off
            raise ValueError("sync_ref_model=true does not run with LoRA: the reference is the base model under the "
                             "adapters, which a sync would change for the policy too")
        return self


@torch.no_grad()
def sync_reference(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """π_ref ← α π_θ + (1 - α) π_ref, parameter by parameter (TR-DPO's soft update; α = 1: a reset)."""
    params = dict(policy.named_parameters())
    names = [n for n, _ in ref.named_parameters()]
    torch._foreach_lerp_([p for _, p in ref.named_parameters()], [params[n].detach() for n in names], alpha)


class TrainingDiverged(RuntimeError):
    """The loss or its gradient is not finite: an optimizer step would write NaN into every weight."""


def optimizer_step(params, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the global gradient norm of ``params`` (0: no clipping), step, advance the schedule (if
    one is given), clear the gradients; returns the pre-clip norm. A gradient that is not finite stops
    the run before the step (:class:`TrainingDiverged`): AdamW would turn it into NaN weights for good,
    and the run would go on to save them."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"the gradient norm is {float(norm)} (a NaN or infinite loss): stopped before the weights "
                               "took it. Lower lr, set max_grad_norm, or check the data; resume=true continues from the "
                               "last checkpoint")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def setup_torch(cfg: RunConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep and reuse freed blocks of up to 32 MiB instead of returning them to
    the kernel. PyTorch's CPU allocator is plain malloc: by default a block over glibc's mmap
    threshold (128 KiB, adapting upwards) is a fresh mmap, so every (tokens × vocab) logits-sized
    temporary costs a page fault per 4 KiB on first touch (log-softmax, its backward, the entropy):
    10-15 ms of a 0.3 s fp32 GRPO update on the peer fixture. The same
    effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or jemalloc, without asking the
    user to set anything. Peak RSS is unchanged; memory freed after the peak is kept for reuse.
    Returns False where the C library has no ``mallopt`` (not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest value glibc accepts on 64-bit
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def resume_point(cfg: RunConfig, run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
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
    for name in ("metrics.jsonl", "completions.jsonl"):  # each step's lines once, after a crash too
        truncate_metrics(run_dir / name, state["step"])
    return ckpt, state


def _check_same_run(cfg: RunConfig, state: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume with settings that would make the continuation differ from the run."""
    then = json.loads(state["config"])
    now = cfg.model_dump(mode="json")
    # what does not change the trajectory: logging, checkpointing, where the run lives, evaluation (greedy:
    # it draws no random numbers), and the step budget where the schedule does not depend on it
    free = {"resume", "overwrite", "progress", "stop_at_step", "save_every", "keep_checkpoints", "report",
            "tensorboard", "threads", "model", "log_completions", "output_dir", "eval_every", "eval_samples",
            "eval_data", "max_invalid_steps", *cfg.resume_free}
    if now.get("schedule") == "constant" and then.get("schedule") == "constant":
        free.add("max_steps")
    changed = [k for k in now if k not in free and then.get(k) != now[k]]
    if "model" in now and not _same_model(then.get("model"), now["model"]):  # compared as a folder, not a string
        changed.append("model")
    if changed:
        diffs = ", ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume from {ckpt}: settings changed since the run started ({diffs})")


def _same_model(then: str | None, now: str) -> bool:
    """Whether ``model=`` names the run's starting model: the same string, or paths to the same
    folder. The policy resumes from the checkpoint, but the reference (KL, DPO) and a LoRA base are
    loaded from ``model``, so another model would change the run. A folder that has moved (the old
    path is gone) is taken on trust, with a warning."""
    if then is None or then == now:
        return True
    if "embedded" in (then, now):
        return False
    old, new = Path(then).expanduser(), Path(now).expanduser()
    if not old.exists():
        log.warning("resume: the run's model %s is gone; taking %s as the same model, moved", then, now)
        return True
    return new.exists() and old.resolve() == new.resolve()


def logged_eval(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The evaluation a run logged at ``step`` (its ``eval_*`` metrics, without the prefix), or None:
    what a resumed run reports as its start, and a finished one as its end."""
    for m in read_metrics(run_dir / "metrics.jsonl"):
        if m.get("step") == step and any(k.startswith("eval_") for k in m):
            return {k.removeprefix("eval_"): v for k, v in m.items() if k.startswith("eval_")}
    return None


def already_finished(run_dir: Path, cfg: RunConfig, start: int) -> bool:
    """A resumed run whose last checkpoint is its last step and whose final model was written:
    nothing to train, evaluate or save again."""
    return start >= cfg.max_steps and (run_dir / "final" / "config.json").is_file()


def train_state(cfg: RunConfig, step: int, optimizer, scheduler, extra: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "config": json.dumps(cfg.model_dump(mode="json")), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": capture_rng(), **extra}


def restore_train_state(state: dict[str, Any], optimizer, scheduler) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])


def save(cfg: RunConfig, run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict[str, Any]) -> Path:
    state = train_state(cfg, step, optimizer, scheduler, extra)
    return save_checkpoint(run_dir, step, model, tokenizer, state, keep=cfg.keep_checkpoints)


def save_final(run_dir: Path, model, tokenizer) -> Path:
    """The final model as a plain HF folder ``<run>/final``, written beside and renamed into place;
    a LoRA model merged, its adapter alone in ``final/adapter``."""
    final, tmp = run_dir / "final", run_dir / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.has_adapters(model):
        lora.merged_copy(model).save_pretrained(tmp, safe_serialization=True)
        lora.save_adapter(model, tmp / "adapter")
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------
# The shared loop of the offline trainers
# ---------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    run_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    stopped_early: bool = False
    finished_before: bool = False  # resumed after its last step: nothing was trained, saved or evaluated

    @property
    def ended_here(self) -> bool:
        """This process trained the run to its end: what a report is written for."""
        return not self.stopped_early and not self.finished_before


StepFn = Callable[[list[int]], dict[str, float]]


def fit(cfg: TrainConfig, run_dir: Path, model, tokenizer, n_items: int, state: dict[str, Any] | None, name: str,
        step_fn: StepFn, evaluate: Callable[[], dict[str, Any]] | None = None, intro: str = "",
        extra_state: Callable[[], dict[str, Any]] | None = None) -> FitResult:
    """Train for ``cfg.max_steps`` optimizer steps over ``n_items`` examples.

    Each step draws ``cfg.batch_size`` indices from a shuffled, resumable sampler and hands them
    to ``step_fn``, which runs forward/backward (micro-batching as it likes) and returns metrics
    (``tokens`` among them); this loop then clips, steps AdamW and the schedule, logs, evaluates
    (``evaluate`` returns ``{name: value}``, logged as ``eval_<name>``), checkpoints, honours
    ``stop_at_step`` and writes the final model. ``state`` (from :func:`resume_point`) resumes.
    ``extra_state`` returns what the caller keeps in every checkpoint besides the loop's own state
    (the caller finds it in ``state`` when resuming).
    """
    t_start = time.time()
    if getattr(cfg, "torch_compile", False):
        compile_blocks(model)  # before the optimizer: the parameters stay the same objects either way
    sampler = EpochSampler(n_items, cfg.seed)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    start = 0
    if state is not None:
        restore_train_state(state, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
    logger = RunLogger(run_dir, cfg.max_steps, start, name, cfg.progress, cfg.tensorboard)
    if intro:
        logger.message(f"{name}: {intro}; run {run_dir}")
    result = FitResult(run_dir, run_dir / "final", start, 0.0)
    every = getattr(cfg, "eval_every", 0)

    def run_eval(step: int) -> dict[str, Any]:
        ev = evaluate()  # type: ignore[misc]
        logger.log(step, {f"eval_{k}": v for k, v in ev.items() if isinstance(v, (int, float))}, advance=False)
        return ev

    if evaluate is not None:
        result.eval_before = run_eval(0) if start == 0 else logged_eval(run_dir, 0)
    finished = result.finished_before = already_finished(run_dir, cfg, start)
    if finished:
        logger.message(f"{name}: {run_dir} finished all {cfg.max_steps} steps already; its model is in {result.final_dir}")
        result.eval_after = logged_eval(run_dir, cfg.max_steps)
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        metrics = step_fn(sampler.next(cfg.batch_size))
        lr = scheduler.get_last_lr()[0]  # the rate this step's update used (the scheduler then moves on)
        grad_norm = optimizer_step(model.parameters(), optimizer, scheduler, cfg.max_grad_norm)
        dt = time.perf_counter() - t0
        logger.log(step, {**metrics, "lr": lr, "grad_norm": grad_norm,
                          "tok_per_s": metrics.get("tokens", 0) / dt, "step_time": dt,
                          "epoch": sampler.epoch + sampler.pos / sampler.n})
        result.steps = step
        if evaluate is not None and every and step % every == 0 and step != cfg.max_steps:
            run_eval(step)
        stop = cfg.stop_at_step is not None and step == cfg.stop_at_step and step < cfg.max_steps
        if stop or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler,
                 {"sampler": sampler.state_dict(), **(extra_state() if extra_state else {})})
        if stop:
            logger.message(f"{name}: stopped after step {step} (stop_at_step); continue with resume=true")
            result.stopped_early = True
            break
    if not result.stopped_early and not finished:
        save_final(run_dir, model, tokenizer)
        if evaluate is not None:
            result.eval_after = run_eval(cfg.max_steps)
    logger.close()
    result.seconds = time.time() - t_start
    return result
