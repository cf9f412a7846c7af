import math

import pytest
import torch

from tether.losses import bradley_terry_loss


def test_bradley_terry_hand_computed():
    rc = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([1.0, 0.5, -3.0], dtype=torch.float64, requires_grad=True)
    loss, m = bradley_terry_loss(rc, rr)
    # -mean(log σ(1), log σ(-0.5), log σ(2))
    want = (math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-2))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["accuracy"].item() == pytest.approx(2 / 3)
    loss.backward()
    # d/d r_c of -log σ(d)/3 = -(1 - σ(d))/3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert rc.grad.tolist() == pytest.approx([-(1 - sig(1)) / 3, -(1 - sig(-0.5)) / 3, -(1 - sig(2)) / 3])
    assert (rr.grad == -rc.grad).all()


def test_margin_and_centering():
    rc, rr = torch.tensor([1.0]), torch.tensor([0.0])
    with_margin, _ = bradley_terry_loss(rc, rr, margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2))
    centered, _ = bradley_terry_loss(rc, rr, center_coef=0.5)
    assert centered.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.5 * 1.0)
