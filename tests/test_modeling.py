"""The forward-pass context the trainers share (modeling.autocast)."""

import pytest
import torch
import torch.nn.functional as F

from tether.modeling import autocast


def _attention_and_grads(dtype, q, k, v, mask, weights, ctx, round_to=None):
    """Attention's output and its gradients w.r.t. q, k, v, all as float64; with ``round_to``, the
    output, and so the gradient flowing back into the attention, and the gradients are rounded."""
    leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
    with ctx:
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
    out = out.to(round_to or out.dtype)
    (out.double() * weights).sum().backward()
    return [out.double()] + [x.grad.to(round_to or x.dtype).double() for x in leaves]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU kernel choice (with CUDA, PyTorch's default stands)")
def test_bf16_attention_is_as_accurate_as_float32_attention_rounded_to_bf16():
    """Under bf16 autocast, attention and its gradients w.r.t. q, k, v are as close to float64 as
    float32 attention on the same bf16 inputs, rounded to bf16. With SDPA's flash kernel on CPU
    (PyTorch's default), the gradients are ~1.7x further away and this fails."""
    g = torch.Generator().manual_seed(0)
    q = (2 * torch.randn(4, 4, 20, 64, generator=g)).bfloat16()  # 4 query heads, 2 key/value heads (GQA)
    k, v = ((2 * torch.randn(4, 2, 48, 64, generator=g)).bfloat16() for _ in range(2))
    mask = torch.ones(4, 1, 20, 48, dtype=torch.bool).tril(28)  # 20 new queries after a 28-token prefix
    mask[..., :5] = False  # left padding
    weights = torch.randn(4, 4, 20, 64, generator=g, dtype=torch.float64)

    exact = _attention_and_grads(torch.float64, q, k, v, mask, weights, torch.autocast("cpu", enabled=False))
    f32 = _attention_and_grads(torch.float32, q, k, v, mask, weights, torch.autocast("cpu", enabled=False),
                               round_to=torch.bfloat16)  # float32 attention, its tensors then bf16 like ours
    ours = _attention_and_grads(torch.bfloat16, q, k, v, mask, weights, autocast("bf16"))
    for name, a, b, e in zip(["out", "dq", "dk", "dv"], ours, f32, exact):
        err, err_f32 = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
        assert err <= 1.1 * err_f32, (name, err.item(), err_f32.item())
