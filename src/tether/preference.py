"""What the preference trainers (reward model, DPO) share: their data fields and pair loading."""

from __future__ import annotations

import torch
from pydantic import Field

from .arith import preference_rows
from .data import DataStats, PairExample, read_rows, tokenize_pairs
from .runs import OfflineConfig


class PairsConfig(OfflineConfig):
    """Preference data: prompt/chosen/rejected rows (plain text or chat messages)."""

    data: str = Field("arith", description="'arith' (generated pairs) or a file/folder of prompt/chosen/rejected rows")
    arith_pairs: int = Field(4000, ge=1, description="pairs generated when data=arith")
    eval_pairs: int = Field(200, ge=1, description="held-out pairs scored when evaluating on the arithmetic world")
    shared_prompt: bool = Field(True, description="one row per pair: the prompt and the completions' common prefix computed once, their tails blind to each other (false: TRL's chosen and rejected rows)")


def load_pairs(cfg: PairsConfig, tokenizer, rows: list[dict] | None = None,
               split: str = "train") -> tuple[list[PairExample], DataStats]:
    """Tokenized pairs of ``rows``, of ``cfg.data``, or of the arithmetic world's ``split``."""
    stats = DataStats()
    if rows is not None:
        raw = read_rows(rows, cfg.skip_bad_rows, stats)
    elif cfg.data == "arith" or split != "train":
        n = cfg.arith_pairs if split == "train" else cfg.eval_pairs
        raw = read_rows(preference_rows(cfg.arith, n, cfg.seed, split))
    else:
        raw = read_rows(cfg.data, cfg.skip_bad_rows, stats)
    return tokenize_pairs(raw, tokenizer, cfg.max_length, cfg.skip_bad_rows, stats)


def ranked_share(margins: torch.Tensor) -> float:
    """The share of held-out pairs ranked right by their margins (chosen's score minus rejected's),
    a tie counting half: a scorer that cannot tell the two apart (DPO's implicit reward before its
    first step, where policy and reference are one model) scores 50%, as a coin would. TRL's
    ``rewards/accuracies`` counts a tie as wrong, so it starts DPO at 0."""
    if not len(margins):
        return 0.0
    return float((margins > 0).float().mean() + 0.5 * (margins == 0).float().mean())
