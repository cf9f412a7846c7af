"""Direct preference optimisation (seed §8) and its loss family, from preference pairs.

The loop: shuffled batches of pairs → reference log-probs (each pair scored once, kept, reused) →
chosen and rejected rows through the policy in one forward → the DPO loss of
:mod:`tether.losses.dpo` → AdamW, with evaluation (held-out preference accuracy and greedy
exact-match), metrics, checkpoints and exact resume from the shared run plumbing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from . import lora, runs
from .config import ConfigError
from .data import PairExample, collate, collate_pairs, longest_pair
from .evaluate import accuracy, load_eval_rows
from .losses.dpo import DPO_LOSSES, F_DIVERGENCES, check_loss_types, dpo_loss, sequence_logps
from .modeling import (autocast, custom_masks_exact, load_causal_lm, load_tokenizer, packed_pair_logps, padding_id,
                       resolve_model_path, token_logps)
from .lora import LoraFields
from .preference import PairsConfig, load_pairs, ranked_share
from .runlog import read_metrics

log = logging.getLogger(__name__)


class DPOConfig(PairsConfig, LoraFields, runs.RefSyncFields):
    """DPO from prompt/chosen/rejected pairs (plain text or chat messages)."""

    resume_free: ClassVar[frozenset[str]] = frozenset({"max_new_tokens"})  # the evaluation's generation budget

    output_dir: str = Field("runs/dpo", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    eval_samples: int = Field(200, ge=1, description="held-out prompts scored by greedy exact match")
    max_new_tokens: int = Field(16, ge=1, description="generation budget of the evaluation")
    beta: float = Field(0.1, gt=0, description="β: strength of the KL regularisation (implicit reward scale)")
    loss_type: list[str] = Field(["sigmoid"], description=f"one or more of {', '.join(DPO_LOSSES)}")
    loss_weights: list[float] | None = Field(None, description="weight of each loss_type (default 1 each)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: assumed label-flip rate (cDPO, robust, exo_pair, aot)")
    f_divergence: str = Field("reverse_kl", description=f"divergence of the implicit reward: {', '.join(F_DIVERGENCES)}")
    f_alpha: float = Field(1.0, description="α of the alpha_divergence")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO: weight of the tokens past the shorter completion")
    discopop_tau: float = Field(0.05, gt=0, description="τ of the discopop loss")
    reference: Literal["cached", "precompute", "live", "none"] = Field(
        "cached", description="reference log-probs: 'cached' scores each pair the first time it is drawn and keeps the score "
        "(a frozen reference model is held until every pair is scored); 'precompute' scores every pair before step 1 "
        "(no second model when the reference is the starting policy); 'live' runs the reference every step; 'none': "
        "reference-free")
    ref_model: str | None = Field(None, description="reference checkpoint (default: the starting policy)")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    max_steps: int = Field(100, ge=1, description="optimizer steps")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _sync_needs_live(self):  # a stored score is the reference as it was: a sync could not reach it
        if self.sync_ref_model and self.reference != "live":
            raise ValueError(f"sync_ref_model=true needs reference=live (a reference model scoring every step), "
                             f"not reference={self.reference}")
        return self


def pair_logps(model, pairs: list[PairExample], pad_id: int, ld_alpha: float | None, dtype: str = "fp32",
               shared_prompt: bool = True):
    """Sequence log-probs (chosen (B,), rejected (B,)) and completion lengths (B,), (B,).

    With ``shared_prompt`` each pair is one row ``prompt + shared + chosen tail + rejected tail``
    whose rejected tail cannot see the chosen one (:func:`tether.data.collate_pairs`): the prompt
    and the completions' common prefix are computed once and nothing is padded twice. Otherwise
    chosen and rejected are separate rows of one forward (TRL's layout).
    """
    n_c = torch.tensor([len(p.chosen) for p in pairs])
    n_r = torch.tensor([len(p.rejected) for p in pairs])
    if shared_prompt and custom_masks_exact(model, longest_pair(pairs)):
        with autocast(dtype, math_attention=True):
            c, r = packed_pair_logps(model, collate_pairs(pairs, pad_id), ld_alpha)
        return c, r, n_c, n_r
    chosen, rejected = zip(*(p.rows() for p in pairs))
    batch = collate([*chosen, *rejected], pad_id)  # TRL's layout: B chosen rows, then B rejected
    with autocast(dtype, math_attention=True):
        lp, mask = token_logps(model, batch)
    seq = sequence_logps(lp, mask, ld_alpha)
    B = len(pairs)
    return seq[:B], seq[B:], n_c, n_r


@torch.no_grad()
def reference_logps(model, pairs: list[PairExample], pad_id: int, ld_alpha: float | None, dtype: str = "fp32",
                    batch_size: int = 16) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair, computed once."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        c, r, _, _ = pair_logps(model, pairs[i:i + batch_size], pad_id, ld_alpha, dtype)
        out.append(torch.stack([c, r], -1))
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2)


class CachedReference:
    """π_ref's sequence log-probs of the training pairs (seed §8), each pair scored the first time it
    is drawn and kept.

    The same numbers as scoring every pair before step 1 (``precompute``), but the first step does
    not wait for all of them, and unlike ``live`` no pair is scored twice. The cost is a frozen
    reference model in memory during the first epoch: it is loaded on first need and released once
    every pair has its score. The scores travel in checkpoints (:meth:`state_dict`), so a resumed
    run reuses them.
    """

    def __init__(self, load: Callable[[], torch.nn.Module], pairs: list[PairExample], pad_id: int, cfg: DPOConfig,
                 state: dict[str, torch.Tensor] | None = None, model: torch.nn.Module | None = None):
        self.load, self.pairs, self.pad_id, self.cfg = load, pairs, pad_id, cfg
        self.scores = state["ref_logps"] if state else torch.zeros(len(pairs), 2)
        self.scored = state["ref_scored"] if state else torch.zeros(len(pairs), dtype=torch.bool)
        if len(self.scores) != len(pairs):
            raise ConfigError(f"the checkpoint holds reference scores of {len(self.scores)} pairs but the data has {len(pairs)}")
        self.model = None if bool(self.scored.all()) else model  # a reference already loaded is used, not loaded again

    @torch.no_grad()
    def __call__(self, idx: list[int]) -> torch.Tensor:
        """(B, 2) reference log-probs (chosen, rejected) of the pairs ``idx``, scoring the new ones."""
        todo = list(dict.fromkeys(i for i in idx if not self.scored[i]))
        if todo:
            if self.model is None:
                self.model = self.load()
            with lora.as_reference(self.model):  # a LoRA policy with its adapters off
                for j in range(0, len(todo), self.cfg.micro_batch_size):
                    chunk = todo[j:j + self.cfg.micro_batch_size]
                    c, r, _, _ = pair_logps(self.model, [self.pairs[i] for i in chunk], self.pad_id,
                                            self.cfg.ld_alpha, self.cfg.dtype, self.cfg.shared_prompt)
                    self.scores[chunk] = torch.stack([c, r], -1).float()
                    self.scored[chunk] = True
            if bool(self.scored.all()):
                self.model = None  # every pair has its score: the reference model is no longer needed
        return self.scores[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ref_logps": self.scores, "ref_scored": self.scored}


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
        c, r, nc, nr = pair_logps(model, mb, pad_id, cfg.ld_alpha, cfg.dtype, cfg.shared_prompt)
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


def train(cfg: DPOConfig, rows: list[dict] | None = None) -> runs.FitResult:
    """Run DPO as configured (``rows`` replaces ``cfg.data`` when given)."""
    check_loss_types(cfg.loss_type, cfg.label_smoothing, cfg.f_divergence)
    runs.setup_torch(cfg)
    run_dir, ckpt, state = runs.open_run(cfg)
    start_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(ckpt or start_path, cfg.chat_template_kwargs)
    model = runs.load_trainable(cfg, ckpt, start_path)
    pad = padding_id(tokenizer)

    pairs, stats = load_pairs(cfg, tokenizer, rows)
    arith_eval = cfg.arith_eval(rows)
    eval_pairs = load_pairs(cfg, tokenizer, split="held_out")[0] if arith_eval else []
    eval_prompts = load_eval_rows("arith", cfg.eval_samples, cfg.arith) if arith_eval else (
        [] if cfg.eval_data in ("none", "auto") else load_eval_rows(cfg.eval_data, cfg.eval_samples, tokenizer=tokenizer))

    # The reference: π_ref = the starting policy unless ref_model says otherwise. The policy itself
    # scores pairs as the reference while it is still the starting policy (before its first update),
    # so no second model is loaded for that: the held-out pairs always, the training pairs too
    # under 'precompute'. Precomputed log-probs are stored in the run folder, cached ones in each
    # checkpoint, so a resumed run reuses them.
    ref_path = resolve_model_path(cfg.ref_model) if cfg.ref_model else start_path

    def load_reference() -> torch.nn.Module:
        if lora.has_adapters(model) and cfg.ref_model is None:
            return model  # the start model is the policy with its adapters off (lora.as_reference)
        return load_causal_lm(ref_path).eval().requires_grad_(False)

    ref_model = ref_train = ref_eval = cached = scorer = None
    cache = run_dir / "ref_logps.pt"
    if cfg.reference == "precompute" and cache.is_file():
        stored = torch.load(cache, weights_only=True)
        ref_train, ref_eval = stored["train"], stored["eval"]
    elif cfg.reference == "cached" and state is not None:
        ref_eval = state["ref_eval"]
    elif cfg.reference != "none":
        if cfg.ref_model is None and cfg.reference != "live":
            if ckpt is not None and not lora.has_adapters(model):
                raise ConfigError(f"resuming {run_dir} needs {cache}, which is missing")
            scorer = model
        else:
            scorer = load_reference()
        with lora.as_reference(scorer):
            ref_eval = reference_logps(scorer, eval_pairs, pad, cfg.ld_alpha)  # fp32, like the evaluation
            if cfg.reference == "precompute":
                ref_train = reference_logps(scorer, pairs, pad, cfg.ld_alpha, cfg.dtype)
        if cfg.reference == "precompute":
            torch.save({"train": ref_train, "eval": ref_eval}, cache)
        elif cfg.reference == "live":
            ref_model = scorer
            if state is not None and "ref" in state:  # synced (sync_ref_model): no longer the starting model
                ref_model.load_state_dict(state["ref"])
    if cfg.reference == "cached":
        cached = CachedReference(load_reference, pairs, pad, cfg, state, None if scorer is model else scorer)
    del scorer  # a separate reference lives on only as ref_model (live) or in the cache, which releases it
    if ref_train is not None and len(ref_train) != len(pairs):
        raise ConfigError(f"{cache} holds {len(ref_train)} pairs but the data has {len(pairs)}")

    def reference_of(idx: list[int]) -> torch.Tensor:
        """(B, 2) reference log-probs of the pairs ``idx``."""
        if ref_train is not None:
            return ref_train[idx]
        if cached is not None:
            return cached(idx)
        if ref_model is None:
            return torch.zeros(len(idx), 2)
        with torch.no_grad(), lora.as_reference(ref_model):
            c, r, _, _ = pair_logps(ref_model, [pairs[i] for i in idx], pad, cfg.ld_alpha, cfg.dtype,
                                    cfg.shared_prompt)
        return torch.stack([c, r], -1)

    updates = [state["step"] if state is not None else 0]  # optimizer updates done (sync_ref_model counts them)

    def step(idx: list[int]) -> dict[str, float]:
        if cfg.sync_ref_model and updates[0] and updates[0] % cfg.ref_model_sync_steps == 0:
            runs.sync_reference(ref_model, model, cfg.ref_model_mixup_alpha)  # after every N-th update
        updates[0] += 1
        totals, n_tok = accumulate_gradients(model, [pairs[i] for i in idx], reference_of(idx), cfg, pad)
        return {**totals, "tokens": n_tok}

    @torch.no_grad()
    def evaluate() -> dict[str, Any]:
        ev: dict[str, Any] = {}
        if eval_pairs:
            # a synced reference is scored as it is now (fp32, like the evaluation)
            current_ref_eval = reference_logps(ref_model, eval_pairs, pad, cfg.ld_alpha) if cfg.sync_ref_model else ref_eval
            model.eval()
            margins = []
            for i in range(0, len(eval_pairs), 64):
                c, r, _, _ = pair_logps(model, eval_pairs[i:i + 64], pad, cfg.ld_alpha,
                                        shared_prompt=cfg.shared_prompt)
                ref = current_ref_eval[i:i + 64] if current_ref_eval is not None else torch.zeros(len(c), 2)
                margins.append((c - ref[:, 0]) - (r - ref[:, 1]))
            model.train()
            ev["pref_accuracy"] = ranked_share(torch.cat(margins))
        if eval_prompts:
            ev.update(accuracy(model, tokenizer, eval_prompts, cfg.max_new_tokens))
        return ev

    def extra_state() -> dict[str, Any]:
        """What a checkpoint keeps besides the loop's state: the cached reference scores, a synced reference."""
        extra = {**cached.state_dict(), "ref_eval": ref_eval} if cached else {}
        if cfg.sync_ref_model:
            extra["ref"] = ref_model.state_dict()
        return extra

    result = runs.fit(cfg, run_dir, model, tokenizer, len(pairs), state, "dpo", step,
                      evaluate if (eval_pairs or eval_prompts) else None,
                      f"{stats.summary()}; reference {cfg.reference}; model {ckpt or start_path}",
                      extra_state=extra_state)
    if cfg.report and result.ended_here:
        from .report import write_report

        summary: dict[str, Any] = {"steps": result.steps, "wall time (s)": round(result.seconds, 1),
                                   "data": stats.summary()}
        for name, ev in (("before", result.eval_before), ("after", result.eval_after)):
            for k in ("pref_accuracy", "accuracy"):
                if ev and k in ev:
                    summary[f"held-out {k.replace('_', ' ')} {name}"] = f"{ev[k]:.1%}"
        write_report(run_dir, "DPO", read_metrics(run_dir / "metrics.jsonl"), summary)
    return result
