import math

import pytest
import torch

from edgetrain.method.transport import LossWeighting, tau_for_module, transport_cost


def test_transport_mean_scaling_by_hand():
    r1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean of squares = 30 / 4
    r2 = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # 4 / 4
    assert transport_cost([r1, r2], "mean").item() == pytest.approx(7.5 + 1.0)


def test_transport_sample_scaling_by_hand():
    r1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # per-sample ||r||^2 = 5, 25 -> mean 15
    assert transport_cost([r1], "sample").item() == pytest.approx(15.0)


def test_transport_of_no_residue_is_zero():
    assert transport_cost([], "mean").item() == 0.0


def test_tau_schedules():
    assert [tau_for_module(k, 4, 0.5, "constant") for k in range(4)] == [0.5] * 4
    assert [tau_for_module(k, 4, 0.5, "midpoint") for k in range(4)] == [0.5, 0.5, 1.0, 1.0]
    assert [tau_for_module(k, 5, 1.0, "midpoint") for k in range(5)] == [1, 1, 1, 2, 2]
    assert tau_for_module(0, 1, 3.0, "midpoint") == 3.0


def test_combine_constant_tau():
    w = LossWeighting(True, 2.0, "constant")
    assert w.combine(torch.tensor(1.0), torch.tensor(8.0)).item() == pytest.approx(1.0 + 8.0 / 4.0)
    off = LossWeighting(False, 2.0, "constant")
    assert off.combine(torch.tensor(1.0), torch.tensor(8.0)).item() == 1.0


def test_multipliers_grow_every_s_steps_by_h_times_next_loss():
    w = LossWeighting(True, 1.0, "multipliers", h=0.5, s=2, lambda1=1.0)
    losses = [2.0, 3.0, 4.0, 5.0, 6.0]
    lams = []
    for i, l in enumerate(losses, start=1):
        total = w.combine(torch.tensor(l), torch.tensor(1.0))
        lams.append(w.lam)
        assert total.item() == pytest.approx(w.lam * l + 1.0)
        w.after_step()
    # lambda_{i+1} = lambda_i + h * L(x_{i+1}) when i mod s == 0 (i = 2, 4)
    assert lams == [1.0, 1.0, 1.0 + 0.5 * 4.0, 3.0, 3.0 + 0.5 * 6.0]
    assert w.effective_tau == pytest.approx(w.lam / 2)


def test_weighting_state_roundtrip():
    w = LossWeighting(True, 1.0, "multipliers", h=1, s=1)
    w.combine(torch.tensor(1.0), torch.tensor(0.0)); w.after_step()
    v = LossWeighting(True, 1.0, "multipliers", h=1, s=1)
    v.load_state_dict(w.state_dict())
    assert v.state_dict() == w.state_dict()
    assert math.isfinite(v.lam)
