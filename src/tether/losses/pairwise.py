"""Bradley-Terry reward-model loss (seed §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Bradley-Terry negative log-likelihood, seed §3:

        p(y+ ≻ y- | x) = σ(r(x, y+) - r(x, y-)),   L = -E[ log σ(r_c - r_r - m) ]

    with an optional per-pair margin m (Llama 2's margin loss) and reward centering
    ``center_coef · E[(r_c + r_r)²]`` (Eisenstein et al. 2023) that pins the free offset of r.
    ``r_chosen``, ``r_rejected``, ``margin``: (B,). Returns the loss and detached metrics.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        metrics = {"accuracy": (r_chosen > r_rejected).to(r_chosen.dtype).mean(),
                   "margin": (r_chosen - r_rejected).mean(), "reward_chosen": r_chosen.mean(),
                   "reward_rejected": r_rejected.mean()}
    return loss, metrics
