"""The maths of tether as pure functions of tensors (they import only torch).

Trainers call these; tests call them directly with hand-made tensors and TRL's reference
vectors. Each function's docstring gives its equation, where it comes from, and the shapes.

| equation                                                        | function                        |
|-----------------------------------------------------------------|---------------------------------|
| SFT / LM: L = -1/N Σ_t m_t log π_θ(y_t | x, y_<t)  (seed §1)    | :func:`sft.completion_nll`      |
| sequence log-prob log π(y|x) = Σ_t log π(y_t | …), LD-DPO weights | :func:`dpo.sequence_logps`      |
| Bradley-Terry: -log σ(r(x,y+) - r(x,y-) - m) (seed §3)          | :func:`pairwise.bradley_terry_loss` |
| DPO: -log σ(β[(log π/π_ref)(y+) - (log π/π_ref)(y-)]) (seed §8)  | :func:`dpo.dpo_loss`, ``dpo.DPO_LOSSES`` (15 variants) |
"""

from .dpo import DPO_LOSSES, dpo_loss, sequence_logps
from .pairwise import bradley_terry_loss
from .sft import completion_nll

__all__ = ["DPO_LOSSES", "bradley_terry_loss", "completion_nll", "dpo_loss", "sequence_logps"]
