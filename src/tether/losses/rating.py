"""Multi-attribute reward losses (seed §3: rate one response on several dimensions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attribute_mse(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-attribute regression: L = 1/(B·K) Σ_b Σ_k (ŝ_bk - s_bk)²; pred, target (B, K).
    Returns the loss and the detached per-attribute MSE (K,)."""
    loss = F.mse_loss(pred.float(), target.float())
    with torch.no_grad():
        per_attr = ((pred.float() - target.float()) ** 2).mean(0)
    return loss, {"mse_per_attribute": per_attr}


def weighted_score(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The scalar reward Σ_k w_k s_k of attribute scores (B, K) with weights (K,)."""
    return scores @ weights.to(scores.dtype)
