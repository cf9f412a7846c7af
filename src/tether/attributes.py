"""Multi-attribute rewards (seed §3): a response rated on several dimensions
("correctness: 4, conciseness: 2") instead of compared with another.

Two forms, both giving a vector of scores and a configurable weighted scalar Σ_k w_k s_k:

* ``mode=regression``: one regression head per attribute on a causal-LM backbone
  (``AutoModelForSequenceClassification`` with ``num_labels=K``), trained with MSE.
* ``mode=generative``: the LM learns to *write* the ratings after a rating prompt (SFT on the
  serialised string); :func:`parse_ratings` reads them back robustly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from . import runs
from .arith import ATTRIBUTES, rating_rows
from .data import DataError, Example, collate, prompt_ids, read_rows
from .evaluate import rank_accuracy
from .lora import LoraFields
from .losses.rating import attribute_mse, weighted_score
from .modeling import autocast, load_tokenizer, padding_id, resolve_model_path
from .reward import last_token_scores, load_reward_model
from .runlog import read_metrics

RATING_TEMPLATE = "{prompt}{completion}\nRatings:"

log = logging.getLogger(__name__)


class AttributeConfig(runs.OfflineConfig, LoraFields):
    """Multi-attribute reward model from {prompt, completion, ratings: {attribute: score}} rows."""

    output_dir: str = Field("runs/attributes", description="run folder: config, metrics.jsonl, checkpoints/, final/, report")
    mode: Literal["regression", "generative"] = Field("regression", description="regression heads, or the LM writes the ratings")
    attributes: list[str] = Field(list(ATTRIBUTES), description="rated dimensions, in head order")
    attribute_weights: list[float] | None = Field(None, description="weights of the scalar reward (default: equal)")
    arith_rows: int = Field(4000, ge=1, description="rated rows generated when data=arith")
    eval_rows: int = Field(300, ge=1, description="held-out rated rows (eval_data=arith)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    max_steps: int = Field(300, ge=1, description="optimizer steps")

    def weights(self) -> torch.Tensor:
        w = self.attribute_weights or [1.0 / len(self.attributes)] * len(self.attributes)
        if len(w) != len(self.attributes):
            raise ValueError(f"{len(w)} attribute_weights for {len(self.attributes)} attributes")
        return torch.tensor(w)

    @model_validator(mode="after")
    def _eval_source(self):
        self.refuse_eval_files("the multi-attribute model")
        if self.mode == "generative" and self.eval_data == "arith":  # auto stays quiet: it means "where there is one"
            raise ValueError("mode=generative trains the LM to write ratings with tether sft and does not evaluate them; "
                             "eval_data=arith applies to mode=regression")
        return self


def rating_prompt(prompt: str, completion: str) -> str:
    return RATING_TEMPLATE.format(prompt=prompt, completion=completion)


def format_ratings(ratings: dict[str, float], attributes: list[str]) -> str:
    return " " + ", ".join(f"{a}: {ratings[a]:g}" for a in attributes)


_RATING = re.compile(r"([A-Za-z_][A-Za-z_ -]*?)\s*[:=]\s*(-?\d+(?:\.\d+)?)")


def parse_ratings(text: str, attributes: list[str]) -> dict[str, float]:
    """Ratings from generated text: ``name: value`` (or ``name = value``) in any order, case and
    separators ignored, the first value of each attribute kept; missing attributes are NaN."""
    found: dict[str, float] = {}
    for name, value in _RATING.findall(text):
        key = name.strip().lower().replace(" ", "_").replace("-", "_")
        found.setdefault(key, float(value))
    return {a: found.get(a.lower(), float("nan")) for a in attributes}


def load_rated_rows(cfg: AttributeConfig, rows: list[dict] | None = None, split: str = "train") -> list[dict]:
    if rows is None and (cfg.data == "arith" or split != "train"):
        n = cfg.arith_rows if split == "train" else cfg.eval_rows
        return rating_rows(cfg.arith, n, cfg.seed, split)
    out = []
    for r in read_rows(rows if rows is not None else cfg.data, cfg.skip_bad_rows):
        d = r.data
        if not isinstance(d.get("prompt"), str) or not isinstance(d.get("completion"), str):
            raise DataError(f"{r.where}: rated rows need string 'prompt' and 'completion'")
        missing = [a for a in cfg.attributes if not isinstance(d.get("ratings"), dict) or a not in d["ratings"]]
        if missing:
            raise DataError(f"{r.where}: 'ratings' lacks {missing[0]!r}")
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------
class AttributeScorer:
    """Attribute scores (B, K) and the weighted scalar (B,) from a regression-head model."""

    def __init__(self, path: str | Path, attributes: list[str], weights: torch.Tensor | None = None,
                 batch_size: int = 64):
        self.model = load_reward_model(path, num_labels=len(attributes)).eval()
        self.tokenizer = load_tokenizer(path)
        self.weights = weights if weights is not None else torch.full((len(attributes),), 1 / len(attributes))
        self.batch_size = batch_size

    def scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return attribute_scores(self.model, self.tokenizer, prompts, completions, self.batch_size)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return weighted_score(self.scores(prompts, completions), self.weights)


class GenerativeRater:
    """Ratings written by a causal LM after the rating prompt, parsed back; NaN where unreadable."""

    def __init__(self, path: str | Path, attributes: list[str], weights: torch.Tensor | None = None):
        from .modeling import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(path).eval(), load_tokenizer(path)
        self.attributes = attributes
        self.weights = weights if weights is not None else torch.full((len(attributes),), 1 / len(attributes))

    def scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        from .evaluate import generate_greedy

        texts = generate_greedy(self.model, self.tokenizer, [rating_prompt(p, c) for p, c in zip(prompts, completions)],
                                max_new_tokens=24)
        parsed = [parse_ratings(t, self.attributes) for t in texts]
        return torch.tensor([[r[a] for a in self.attributes] for r in parsed])

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return weighted_score(self.scores(prompts, completions), self.weights)


@torch.no_grad()
def attribute_scores(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64) -> torch.Tensor:
    """(B, K) head outputs at the EOS of each prompt + completion."""
    rows = [_example(tokenizer, p, c) for p, c in zip(prompts, completions)]
    batches = (collate(rows[i:i + batch_size], padding_id(tokenizer)) for i in range(0, len(rows), batch_size))
    return torch.cat([last_token_scores(model, b.input_ids, b.attention_mask) for b in batches])


def _example(tokenizer, prompt: str, completion: str) -> Example:
    ids = prompt_ids(tokenizer, prompt) + tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # scored at the EOS, like the Bradley-Terry model
    return Example(ids, [0] * len(ids))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(cfg: AttributeConfig, rows: list[dict] | None = None) -> runs.FitResult:
    """Train the multi-attribute model in ``cfg.mode``."""
    weights = cfg.weights()
    train_rows = load_rated_rows(cfg, rows)
    if cfg.mode == "generative":
        from . import sft

        sft_rows = [{"prompt": rating_prompt(r["prompt"], r["completion"]),
                     "completion": format_ratings(r["ratings"], cfg.attributes)} for r in train_rows]
        keep = {k: v for k, v in cfg.model_dump().items() if k in sft.SFTConfig.model_fields}
        return sft.train(sft.SFTConfig(**{**keep, "eval_data": "none"}), rows=sft_rows)

    runs.setup_torch(cfg)
    run_dir, ckpt, state = runs.open_run(cfg)
    path = ckpt or resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.chat_template_kwargs)
    model = runs.load_trainable(cfg, ckpt, resolve_model_path(cfg.model),
                                lambda p: load_reward_model(p, num_labels=len(cfg.attributes)), train_whole=("score",))
    model.config.pad_token_id = padding_id(tokenizer)
    pad = padding_id(tokenizer)
    examples = [_example(tokenizer, r["prompt"], r["completion"]) for r in train_rows]
    fits = [len(e.input_ids) <= cfg.max_length for e in examples]  # rows longer than max_length are dropped and counted
    if not all(fits):
        log.warning("data: %d of %d rated rows are longer than max_length=%d and were dropped",
                    fits.count(False), len(fits), cfg.max_length)
        examples, train_rows = [e for e, f in zip(examples, fits) if f], [r for r, f in zip(train_rows, fits) if f]
    if not examples:
        raise DataError(f"no rated row fits max_length={cfg.max_length}")
    targets = torch.tensor([[float(r["ratings"][a]) for a in cfg.attributes] for r in train_rows])
    held = load_rated_rows(cfg, split="held_out") if cfg.arith_eval(rows) else []

    def step(idx: list[int]) -> dict[str, float]:
        out: dict[str, float] = {"loss": 0.0}
        for j in range(0, len(idx), cfg.micro_batch_size):
            mb = idx[j:j + cfg.micro_batch_size]
            b = collate([examples[i] for i in mb], pad)
            with autocast(cfg.dtype, math_attention=True):
                pred = last_token_scores(model, b.input_ids, b.attention_mask)
            loss, m = attribute_mse(pred, targets[mb])
            share = len(mb) / len(idx)
            (loss * share).backward()
            out["loss"] += loss.item() * share
            for a, v in zip(cfg.attributes, m["mse_per_attribute"].tolist()):
                out[f"mse/{a}"] = out.get(f"mse/{a}", 0.0) + v * share
        out["tokens"] = sum(len(examples[i].input_ids) for i in idx)
        return out

    def evaluate() -> dict[str, Any]:
        model.eval()
        pred = attribute_scores(model, tokenizer, [r["prompt"] for r in held], [r["completion"] for r in held])
        tgt = torch.tensor([[float(r["ratings"][a]) for a in cfg.attributes] for r in held])
        acc = rank_accuracy(lambda p, c: weighted_score(attribute_scores(model, tokenizer, p, c), weights),
                            cfg.arith, seed=cfg.seed)
        model.train()
        return {"mse": float(((pred - tgt) ** 2).mean()), "rank_accuracy": acc}

    result = runs.fit(cfg, run_dir, model, tokenizer, len(examples), state, "attributes", step,
                      evaluate if held else None, f"{len(examples)} rated rows; model {path}")
    if cfg.report and result.ended_here:
        from .report import write_report

        summary: dict[str, Any] = {"steps": result.steps, "attributes": ", ".join(cfg.attributes)}
        if result.eval_after:
            summary["held-out rank accuracy"] = (f"{result.eval_before['rank_accuracy']:.1%} -> "
                                                 f"{result.eval_after['rank_accuracy']:.1%}")
            summary["held-out MSE"] = f"{result.eval_before['mse']:.3f} -> {result.eval_after['mse']:.3f}"
        write_report(run_dir, "multi-attribute reward", read_metrics(run_dir / "metrics.jsonl"), summary)
    return result
