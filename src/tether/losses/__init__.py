"""The maths of tether as pure functions of tensors (they import only torch).

Trainers call these; tests call them directly with hand-made tensors and TRL's reference
vectors. Each function's docstring gives its equation, where it comes from, and the shapes.

| equation                                                        | function                        |
|-----------------------------------------------------------------|---------------------------------|
| SFT / LM: L = -1/N Σ_t m_t log π_θ(y_t | x, y_<t)  (seed §1)    | :func:`sft.completion_nll`      |
| sequence log-prob log π(y|x) = Σ_t log π(y_t | …), LD-DPO weights | :func:`dpo.sequence_logps`      |
| Bradley-Terry: -log σ(r(x,y+) - r(x,y-) - m) (seed §3)          | :func:`pairwise.bradley_terry_loss` |
| DPO: -log σ(β[(log π/π_ref)(y+) - (log π/π_ref)(y-)]) (seed §8)  | :func:`dpo.dpo_loss`, ``dpo.DPO_LOSSES`` (15 variants) |
| group-relative advantage (r - mean_g r) / (std_g r + ε) (seed §7) | :func:`policy.group_advantages`  |
| leave-one-out baseline r_i - mean_{j≠i} r_j (seed §4.1, RLOO)   | :func:`policy.leave_one_out_advantages` |
| KL(π_θ || π_ref) estimators k1, k2, k3 (seed §4)                 | :func:`policy.kl_estimate`      |
| clipped surrogate -min(wA, clip(w, 1-ε, 1+ε)A) (seed §5-§7)      | :func:`policy.policy_loss`, ``policy.PER_TOKEN`` (8 variants) |
| sampler mismatch ρ = π_old / π_s, truncated or masked (TRL, verl) | :func:`policy.sampler_weights`  |
| entropy bonus -c · mean_t H_t; top-q tokens by H_t (80/20 rule)    | :class:`policy.EntropyTerms`, :func:`policy.high_entropy_mask` |
| GAE: A_t = δ_t + γλ A_{t+1}, R_t = A_t + V_t (seed §4.3)         | :func:`policy.gae`              |
| critic: ½ max((V - R)², (clip(V) - R)²) (seed §4.3, §6)          | :func:`policy.value_loss`       |
"""

from .dpo import DPO_LOSSES, dpo_loss, sequence_logps
from .pairwise import bradley_terry_loss
from .policy import (PolicyLossConfig, gae, group_advantages, kl_estimate, leave_one_out_advantages, policy_loss,
                     value_loss, whiten)
from .sft import completion_nll

__all__ = ["DPO_LOSSES", "PolicyLossConfig", "bradley_terry_loss", "completion_nll", "dpo_loss", "gae",
           "group_advantages", "kl_estimate", "leave_one_out_advantages", "policy_loss", "sequence_logps",
           "value_loss", "whiten"]
