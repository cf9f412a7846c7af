"""Direct preference optimisation and its loss family (seed §8).

DPO (Rafailov et al. 2023, Eq. 7) turns the KL-regularised objective of seed §4 into a
classification loss on preference pairs (x, y+, y-): with the implicit reward
r̂(x, y) = β log π_θ(y|x)/π_ref(y|x),

    L_DPO = -log σ( β [ (log π_θ(y+|x) - log π_ref(y+|x)) - (log π_θ(y-|x) - log π_ref(y-|x)) ] ).

Every variant below is a function of the sequence log-probs of one batch of B pairs. Notation:

    ρ_c = log π_θ(y+|x) - log π_ref(y+|x),  ρ_r likewise for y-          (B,)
    s(ρ)  the f-divergence score of ρ (identity for the reverse KL of plain DPO)
    Δ = s(ρ_c) - s(ρ_r),  ε = label_smoothing,  n_c, n_r completion lengths (B,)

Each per-pair loss is registered in :data:`DPO_LOSSES` under TRL's name; TRL 1.16.0's formula
for each is in ``shared/reference/TRL_FORMULAS.md`` and the test suite checks loss, gradient and
metrics against TRL's own numbers (float64, rtol 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logsig = F.logsigmoid


@dataclass
class PairTerms:
    """Everything a per-pair loss may read. All tensors are (B,)."""

    logp_c: torch.Tensor
    logp_r: torch.Tensor
    ref_c: torch.Tensor
    ref_r: torch.Tensor
    rho_c: torch.Tensor
    rho_r: torch.Tensor
    s_c: torch.Tensor
    s_r: torch.Tensor
    n_c: torch.Tensor
    n_r: torch.Tensor
    beta: float
    eps: float
    discopop_tau: float

    @property
    def delta(self) -> torch.Tensor:
        return self.s_c - self.s_r


# ---------------------------------------------------------------------------------------------
# f-divergence scores s(ρ) (Wang et al. 2023, "Beyond reverse KL", Table 1)
# ---------------------------------------------------------------------------------------------
def _alpha_divergence(rho: torch.Tensor, alpha: float) -> torch.Tensor:
    # (exp((α-1)ρ) - 1)/(α-1), the exponent clamped (TRL: 80 for fp32/bf16, 11 for fp16) against overflow.
    cap = 11.0 if rho.dtype == torch.float16 else 80.0
    return (torch.exp(torch.clamp((alpha - 1) * rho, max=cap)) - 1) / (alpha - 1)


F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": lambda rho, a: rho,
    "forward_kl": lambda rho, a: 1 - torch.exp(-rho),
    "js_divergence": lambda rho, a: math.log(2) + logsig(rho),
    "alpha_divergence": _alpha_divergence,
}


# ---------------------------------------------------------------------------------------------
# Per-pair losses ℓ (B,)
# ---------------------------------------------------------------------------------------------
def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023): -(1-ε) log σ(z) - ε log σ(-z)."""
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def sigmoid(t: PairTerms) -> torch.Tensor:
    """DPO, Eq. 7 (with label smoothing ε: conservative DPO)."""
    return _smoothed(t.beta * t.delta, t.eps)


def hinge(t: PairTerms) -> torch.Tensor:
    """SLiC (Zhao et al. 2023): relu(1 - βΔ)."""
    return torch.relu(1 - t.beta * t.delta)


def ipo(t: PairTerms) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17) on length-averaged log-ratios: (s_c/n_c - s_r/n_r - 1/(2β))²."""
    return (t.s_c / t.n_c - t.s_r / t.n_r - 1 / (2 * t.beta)) ** 2


def exo_pair(t: PairTerms) -> torch.Tensor:
    """EXO (Ji et al. 2024): KL(p_θ || p_ε) between the model's and the ε-smoothed label's
    pair distributions; needs ε > 0 (the paper suggests 1e-3)."""
    z = t.beta * t.delta
    # TRL builds ε as a float32 scalar; matching it keeps float64 results equal to TRL's.
    eps = torch.tensor(t.eps, dtype=torch.float32)
    return torch.sigmoid(z) * (logsig(z) - torch.log1p(-eps)) + torch.sigmoid(-z) * (logsig(-z) - torch.log(eps))


def nca_pair(t: PairTerms) -> torch.Tensor:
    """NCA (Chen et al. 2024): -log σ(βρ_c) - ½ log σ(-βρ_c) - ½ log σ(-βρ_r)."""
    return -logsig(t.beta * t.rho_c) - 0.5 * logsig(-t.beta * t.rho_c) - 0.5 * logsig(-t.beta * t.rho_r)


def robust(t: PairTerms) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 8): unbiased under label flips with rate ε."""
    z = t.beta * t.delta
    return (-(1 - t.eps) * logsig(z) + t.eps * logsig(-z)) / (1 - 2 * t.eps)


def bco_pair(t: PairTerms) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024), without the running reward-mean shift: -log σ(βρ_c) - log σ(-βρ_r)."""
    return -logsig(t.beta * t.rho_c) - logsig(-t.beta * t.rho_r)


def sppo_hard(t: PairTerms) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024): (ρ_c - 1/(2β))² + (ρ_r + 1/(2β))²."""
    return (t.rho_c - 1 / (2 * t.beta)) ** 2 + (t.rho_r + 1 / (2 * t.beta)) ** 2


def aot(t: PairTerms) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: sorted policy margins against sorted reference margins."""
    d = torch.sort(t.logp_c - t.logp_r).values - torch.sort(t.ref_c - t.ref_r).values
    return _smoothed(t.beta * d, t.eps)


def aot_unpaired(t: PairTerms) -> torch.Tensor:
    """AOT, unpaired: sorted chosen log-ratios against sorted rejected log-ratios."""
    d = torch.sort(t.rho_c).values - torch.sort(t.rho_r).values
    return _smoothed(t.beta * d, t.eps)


def apo_zero(t: PairTerms) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): raise chosen, lower rejected likelihood."""
    return (1 - torch.sigmoid(t.beta * t.rho_c)) + torch.sigmoid(t.beta * t.rho_r)


def apo_down(t: PairTerms) -> torch.Tensor:
    """APO-down: lower both, the rejected more."""
    return torch.sigmoid(t.beta * t.rho_c) + (1 - torch.sigmoid(t.beta * (t.rho_c - t.rho_r)))


def discopop(t: PairTerms) -> torch.Tensor:
    """DiscoPOP (Chan et al. 2024): a log-ratio-modulated mix of the logistic and exponential losses."""
    z = t.beta * t.delta
    w = torch.sigmoid(z / t.discopop_tau)
    return (1 - w) * -logsig(z) + w * torch.exp(-z)


def sft(t: PairTerms) -> torch.Tensor:
    """NLL of the chosen completions (RPO's auxiliary term). Per pair this is the summed token NLL;
    it is reduced over *tokens*, not pairs (:data:`TOKEN_MEAN_LOSSES`): -Σ log π(y+) / Σ n_c."""
    return -t.logp_c


def sigmoid_norm(t: PairTerms) -> torch.Tensor:
    """DPO on length-normalised log-ratios: -log σ(β (s_c/n_c - s_r/n_r))."""
    return -logsig(t.beta * (t.s_c / t.n_c - t.s_r / t.n_r))


DPO_LOSSES: dict[str, Callable[[PairTerms], torch.Tensor]] = {
    f.__name__: f for f in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired,
                            apo_zero, apo_down, discopop, sft, sigmoid_norm)
}


# Losses reduced as Σ_B ℓ / (completion tokens of the chosen rows) instead of Σ_B ℓ / B.
TOKEN_MEAN_LOSSES = frozenset({"sft"})


def check_loss_types(loss_types: Sequence[str], label_smoothing: float, f_divergence: str) -> None:
    unknown = [k for k in loss_types if k not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"unknown DPO loss type {unknown[0]!r}; choose from {', '.join(DPO_LOSSES)}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence {f_divergence!r}; choose from {', '.join(F_DIVERGENCES)}")
    if "exo_pair" in loss_types and label_smoothing <= 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")


# ---------------------------------------------------------------------------------------------
# The batch loss
# ---------------------------------------------------------------------------------------------
def dpo_loss(
    logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
    n_c: torch.Tensor, n_r: torch.Tensor, *, beta: float = 0.1, loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
    f_alpha: float = 1.0, discopop_tau: float = 0.05, n_pairs: float | None = None, n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch loss Σ_k w_k Σ_B ℓ_k / N_k and TRL's logged metrics (detached, means over B).

    ``logp_*`` are policy and ``ref_*`` reference sequence log-probs (B,); ``n_c, n_r`` the
    completion token counts (B,). With no reference (reference-free), pass zeros for ``ref_*``.
    N_k is ``n_pairs`` (default B), or ``n_tokens`` (default Σ n_c) for the token-level ``sft``
    term. A trainer that splits an optimizer step into micro-batches passes the counts of the
    *whole step*, so that the summed micro-batch losses equal the one-batch loss (TRL averages per
    micro-batch, which changes the ``sft`` term with the split).
    """
    check_loss_types(loss_types, label_smoothing, f_divergence)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(weights)} loss_weights for {len(loss_types)} loss types")
    score = F_DIVERGENCES[f_divergence]
    rho_c, rho_r = logp_c - ref_c, logp_r - ref_r
    terms = PairTerms(logp_c, logp_r, ref_c, ref_r, rho_c, rho_r, score(rho_c, f_alpha), score(rho_r, f_alpha),
                      n_c.to(logp_c.dtype).clamp(min=1), n_r.to(logp_r.dtype).clamp(min=1), beta, label_smoothing,
                      discopop_tau)
    n_pairs = n_pairs if n_pairs is not None else logp_c.shape[0]
    n_tokens = n_tokens if n_tokens is not None else terms.n_c.sum()
    loss = sum(w * DPO_LOSSES[k](terms).sum() / (n_tokens if k in TOKEN_MEAN_LOSSES else n_pairs)
               for k, w in zip(loss_types, weights))
    with torch.no_grad():
        rc, rr = beta * rho_c, beta * rho_r  # implicit rewards, from the raw log-ratios
        metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
                   "rewards/accuracies": (rc > rr).to(rc.dtype).mean(), "logps/chosen": logp_c.mean(),
                   "logps/rejected": logp_r.mean()}
    return loss, metrics  # type: ignore[return-value]


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """Sequence log-probs Σ_t m_t log π(y_t) of 2B rows laid out [chosen..., rejected...] (T steps).

    With ``ld_alpha`` (LD-DPO, Liu et al. 2024) the tokens past the shorter completion of each pair
    count ``ld_alpha`` times: log π = Σ_shared + α Σ_tail, de-biasing DPO's length preference.
    """
    mask = mask.to(token_logps.dtype)
    if ld_alpha is None:
        return (token_logps * mask).sum(-1)
    B = mask.shape[0] // 2
    lengths = mask.sum(-1)
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)  # (2B,)
    k = mask.cumsum(-1)  # 1-based index of each completion token
    w = torch.where(k <= shared[:, None], 1.0, ld_alpha).to(token_logps.dtype)
    return (token_logps * mask * w).sum(-1)
