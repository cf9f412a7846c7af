"""What the preference trainers (reward model, DPO) share: their data fields and pair loading."""

from __future__ import annotations

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
