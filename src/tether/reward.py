"""Bradley-Terry reward models (seed §3): a causal LM backbone with a scalar head, trained on
preference pairs with -log σ(r(x,y+) - r(x,y-)), and the scoring API that returns r(x, y).

The model is a plain ``AutoModelForSequenceClassification`` (``num_labels=1``), so the saved
folder loads with transformers alone. The score is read at the last real token of each row,
found from the attention mask, so it does not depend on the padding side or on the pad id (a
tokenizer whose pad is its EOS still scores at the EOS).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from . import lora, runs
from .data import IGNORE, DataError, Example, PairExample, collate, collate_pairs, longest_pair, prompt_ids
from .lora import LoraFields
from .losses.pairwise import bradley_terry_loss
from .modeling import (autocast, custom_masks_exact, hidden_at, load_tokenizer, packed_pair_hidden,
                       packed_pair_last_hidden, packed_token_logps, padding_id, resolve_model_path)
from .preference import PairsConfig, load_pairs, ranked_share
from .runlog import read_metrics

log = logging.getLogger(__name__)


class RewardConfig(PairsConfig, LoraFields):
    """A Bradley-Terry reward model from prompt/chosen/rejected pairs (optional 'margin' column)."""

    resume_free: ClassVar[frozenset[str]] = frozenset({"eval_pairs"})  # held-out pairs scored (no stored reference scores depend on them)

    output_dir: str = Field("runs/reward", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    eval_pairs: int = Field(300, ge=1, description="held-out pairs scored for pairwise accuracy")
    center_coef: float = Field(0.0, ge=0, description="reward centering: + coef · E[(r_c + r_r)²]")
    lm_coef: float = Field(0.0, ge=0, description="+ coef · NLL of the chosen completions through the tied embeddings: keeps the backbone a language model (hidden-state regularisation, Yang et al. 2024)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    max_steps: int = Field(300, ge=1, description="optimizer steps")

    @model_validator(mode="after")
    def _eval_source(self):
        self.refuse_eval_files("the reward model")
        return self


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def load_reward_model(path: str | Path, num_labels: int = 1):
    """A sequence-classification model; from a causal-LM checkpoint the head is new (seeded)."""
    from transformers import AutoModelForSequenceClassification

    if lora.is_adapter_folder(path):  # a LoRA run's checkpoint or final/adapter: the merged model
        return lora.load_merged(path, lambda base: load_reward_model(base, num_labels))
    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, dtype=torch.float32)


def _head(model) -> torch.nn.Module:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__}: no 'score' or 'classifier' head")


def _row_layout(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (B, T), last (B,)) of padded rows, whatever the padding side: positions count
    from 0 at each row's first real token; ``last`` is the column of its rightmost real token."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
    return position_ids, last


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r = head(h_last) for each row: (B, num_labels), h_last the hidden state of the rightmost
    real token (attention_mask == 1), whatever the padding side. Only B rows reach the head, and
    the last decoder layer runs only at those positions (:func:`tether.modeling.hidden_at`)."""
    position_ids, last = _row_layout(attention_mask)
    h = hidden_at(model, torch.arange(len(last)), last, input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids)
    return _head(model)(h)


class RewardScorer:
    """r(x, y) for batches of prompts and completions, from a trained reward-model folder."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        from .rewards import check_scorer_folder  # refuses a causal LM, whose score head would load random

        check_scorer_folder("rm", str(path))
        self.model = load_reward_model(path).eval()
        self.tokenizer = load_tokenizer(path)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if len(prompts) != len(completions):  # zip would score the shorter list and drop the rest unsaid
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: give one prompt per completion")
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        pad = padding_id(tok)
        rows = []
        for p, c in zip(prompts, completions):
            ids = prompt_ids(tok, p) + tok(c, add_special_tokens=False)["input_ids"]
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
def pair_rewards(model, pairs: list[PairExample], pad_id: int, dtype: str = "fp32",
                 shared_prompt: bool = True, lm_nll: bool = False):
    """(r_chosen (B,), r_rejected (B,)) in one forward: one row per pair with the prompt computed
    once (``shared_prompt``, :func:`tether.data.collate_pairs`), or chosen and rejected rows. With
    ``lm_nll``, also the mean NLL of the chosen completions under the tied embeddings (a third output)."""
    B = len(pairs)
    with autocast(dtype, math_attention=True):
        if shared_prompt and custom_masks_exact(model, longest_pair(pairs)):
            b = collate_pairs(pairs, pad_id)
            if not lm_nll:  # the head reads two positions per row: the last layer runs only there
                r = _head(model)(packed_pair_last_hidden(model, b))[:, 0].float()
                return r[:B], r[B:]
            h = packed_pair_hidden(model, b)
            r = _head(model)(h[torch.cat([b.chosen_last, b.rejected_last])])[:, 0].float()
            lp = packed_token_logps(h, b, _tied_lm_head(model))
            return r[:B], r[B:], -lp[b.seq < B].mean()
        chosen, rejected = zip(*(p.rows() for p in pairs))
        b = collate([*chosen, *rejected], pad_id)
        if not lm_nll:
            r = last_token_scores(model, b.input_ids, b.attention_mask)[:, 0].float()
            return r[:B], r[B:]
        position_ids, last = _row_layout(b.attention_mask)
        hidden = model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state  # (2B, T, H)
        r = _head(model)(hidden[torch.arange(2 * B), last])[:, 0].float()
        sel = b.targets[:B] != IGNORE
        nll = torch.nn.functional.cross_entropy(_tied_lm_head(model)(hidden[:B][sel]).float(), b.targets[:B][sel])
        return r[:B], r[B:], nll


def _tied_lm_head(model):
    """Logits through the input embeddings: the LM head of a tied-embedding checkpoint."""
    weight = model.base_model.get_input_embeddings().weight
    return lambda h: h @ weight.T


@torch.no_grad()
def pairwise_accuracy(model, pairs: list[PairExample], pad_id: int, shared_prompt: bool = True) -> float:
    was = model.training
    model.eval()
    margins = []
    for i in range(0, len(pairs), 64):
        rc, rr = pair_rewards(model, pairs[i:i + 64], pad_id, shared_prompt=shared_prompt)
        margins.append(rc - rr)
    model.train(was)
    return ranked_share(torch.cat(margins)) if margins else 0.0


def train(cfg: RewardConfig, rows: list[dict] | None = None) -> runs.FitResult:
    """Train a Bradley-Terry reward model as configured (``rows`` replaces ``cfg.data``)."""
    runs.setup_torch(cfg)
    run_dir, ckpt, state = runs.open_run(cfg)
    path = ckpt or resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.chat_template_kwargs)
    # the head is initialised after setup_torch's seed: reproducible; with LoRA it trains whole
    model = runs.load_trainable(cfg, ckpt, resolve_model_path(cfg.model), load_reward_model, train_whole=("score",))
    model.config.pad_token_id = pad = padding_id(tokenizer)

    if cfg.lm_coef and not getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("lm_coef needs a model whose LM head is tied to its input embeddings "
                         "(a sequence-classification checkpoint keeps no separate LM head)")
    pairs, stats = load_pairs(cfg, tokenizer, rows)
    margins = _margins(pairs)
    eval_pairs = load_pairs(cfg, tokenizer, split="held_out")[0] if cfg.arith_eval(rows) else []

    def step(idx: list[int]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for j in range(0, len(idx), cfg.micro_batch_size):
            mb = idx[j:j + cfg.micro_batch_size]
            out = pair_rewards(model, [pairs[i] for i in mb], pad, cfg.dtype, cfg.shared_prompt, cfg.lm_coef > 0)
            rc, rr = out[0], out[1]
            loss, metrics = bradley_terry_loss(rc, rr, margins[mb] if margins is not None else None, cfg.center_coef)
            if cfg.lm_coef:
                loss = loss + cfg.lm_coef * out[2]
                metrics["lm_nll"] = out[2].detach()
            share = len(mb) / len(idx)  # the mean over the step's pairs, however it is split
            (loss * share).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * share
        totals["tokens"] = sum(2 * len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected) for i in idx)
        return totals

    def evaluate() -> dict[str, Any]:
        return {"pairwise_accuracy": pairwise_accuracy(model, eval_pairs, pad, cfg.shared_prompt)}

    result = runs.fit(cfg, run_dir, model, tokenizer, len(pairs), state, "reward", step,
                      evaluate if eval_pairs else None, f"{stats.summary()}; model {path}")
    if cfg.report and result.ended_here:
        from .report import write_report

        summary: dict[str, Any] = {"steps": result.steps, "wall time (s)": round(result.seconds, 1),
                                   "data": stats.summary()}
        if result.eval_after:
            summary["held-out pairwise accuracy"] = (f"{result.eval_before['pairwise_accuracy']:.1%} -> "
                                                     f"{result.eval_after['pairwise_accuracy']:.1%}")
        write_report(run_dir, "reward model", read_metrics(run_dir / "metrics.jsonl"), summary)
    return result


def _margins(pairs: list[PairExample]) -> torch.Tensor | None:
    """Per-pair margins from the rows' 'margin' column, when they have one (every row, or none)."""
    given = [p.margin is not None for p in pairs]
    if not any(given):
        return None
    if not all(given):
        raise DataError(f"{given.count(False)} of {len(pairs)} preference rows have no 'margin' while the others do: "
                        "give every row one (0 for no margin), or none")
    return torch.tensor([p.margin for p in pairs])
