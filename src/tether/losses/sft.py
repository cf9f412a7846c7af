"""Supervised fine-tuning loss (seed §1: instruction tuning raises log π(y | x) of curated y)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def completion_nll(logits: torch.Tensor, targets: torch.Tensor, n_total: int | float) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens, normalised over the whole optimizer batch.

        L = -(1/N) Σ_{t ∈ completion} log π_θ(y_t | x, y_<t)

    ``logits`` (n, V) and ``targets`` (n,) hold only the positions that carry a loss (prompt and
    padding positions were never turned into logits). ``N = n_total`` counts the target tokens
    of the *whole* optimizer step, not of this micro-batch, so summing the micro-batch losses of a
    gradient-accumulation step gives exactly the loss (and gradient) of one big batch. TRL's
    default divides by each micro-batch's own count, which makes the update depend on how the
    batch is split; tether deliberately does not.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum") / n_total
