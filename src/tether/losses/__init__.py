"""The maths of tether as pure functions of tensors (they import only torch).

Trainers call these; tests call them directly with hand-made tensors. Each function's docstring
gives its equation, where it comes from, and the tensor shapes.

| equation                                              | function                      |
|-------------------------------------------------------|-------------------------------|
| SFT / LM: L = -1/N Σ_t m_t log π_θ(y_t given y_<t, x)  | :func:`sft.completion_nll`    |
"""

from .sft import completion_nll

__all__ = ["completion_nll"]
