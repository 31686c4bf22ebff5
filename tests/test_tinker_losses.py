"""The Tinker API's losses (vllm_train/losses/tinker.py) on hand-worked values: loss sums and the gradient each
token gets, including which tokens a clip silences."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_train.losses import tinker as L


def _logps(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _loss_and_grad(fn, logps_N, *args, **kwargs):
    loss, metrics = fn(logps_N, *args, **kwargs)
    loss.backward()
    return loss.item(), logps_N.grad.tolist(), metrics


def test_cross_entropy_is_a_weighted_sum_not_a_mean():
    # -(-1*1 + -2*0 + -0.5*2) = 2; d/dlogp = -w
    loss, grad, _ = _loss_and_grad(L.cross_entropy, _logps([-1.0, -2.0, -0.5]), _t([1.0, 0.0, 2.0]))
    assert loss == pytest.approx(2.0)
    assert grad == pytest.approx([-1.0, 0.0, -2.0])


def test_importance_sampling_weights_advantages_by_the_ratio():
    # token 0: p/q = 0.5/0.25 = 2, A = 3 -> -6; token 1: ratio 1, A = -1 -> +1
    logps = _logps([math.log(0.5), -1.0])
    loss, grad, _ = _loss_and_grad(L.importance_sampling, logps, _t([math.log(0.25), -1.0]), _t([3.0, -1.0]))
    assert loss == pytest.approx(-5.0)
    assert grad == pytest.approx([-6.0, 1.0])  # d(-r A)/dlogp = -r A


def test_ppo_clips_absolute_ratios_with_default_thresholds():
    # token 0: r = 2, A = 3: min(6, 1.2*3) = 3.6, clipped -> no gradient
    # token 1: r = 0.5, A = -1: min(-0.5, 0.8*-1) = -0.8, clipped -> no gradient
    # token 2: r = 1, A = 2: 2, unclipped -> gradient -r A = -2
    logps = _logps([math.log(0.5), math.log(0.1), -1.0])
    q = _t([math.log(0.25), math.log(0.2), -1.0])
    loss, grad, metrics = _loss_and_grad(L.ppo, logps, q, _t([3.0, -1.0, 2.0]))
    assert loss == pytest.approx(-3.6 + 0.8 - 2.0)
    assert grad == pytest.approx([0.0, 0.0, -2.0])
    assert metrics["clipped_fraction"] == pytest.approx(2 / 3)


def test_ppo_thresholds_are_ratios_not_offsets():
    # clip_high 3.0 as an absolute ratio: r = 2 passes unclipped (an offset 1 + 3 would also pass, but
    # clip_high 1.5 must clip r = 2 to 1.5, where an offset reading would give 2.5 and no clip)
    logps, q, a = _logps([math.log(0.5)]), _t([math.log(0.25)]), _t([1.0])
    assert L.ppo(logps, q, a, 0.5, 3.0)[0].item() == pytest.approx(-2.0)
    assert L.ppo(logps, q, a, 0.5, 1.5)[0].item() == pytest.approx(-1.5)


def test_cispo_keeps_a_gradient_through_the_clipped_weight():
    # token 0: r = 2 (inside 0..4), A = 3: loss -2*3*log(0.5), grad -6
    # token 1: r = 0.8/0.1 = 8, clipped to 4, A = 1: loss -4*log(0.8), grad -4 (still a gradient)
    logps = _logps([math.log(0.5), math.log(0.8)])
    loss, grad, _ = _loss_and_grad(L.cispo, logps, _t([math.log(0.25), math.log(0.1)]), _t([3.0, 1.0]))
    assert loss == pytest.approx(-6 * math.log(0.5) - 4 * math.log(0.8))
    assert grad == pytest.approx([-6.0, -4.0])


def test_dro_adds_a_quadratic_penalty_towards_the_sampler():
    # logp -1, logq -2, A 2, beta 0.5: objective -2 - 0.25 = -2.25; grad -(A - beta (logp - logq)) = -1.5
    loss, grad, _ = _loss_and_grad(L.dro, _logps([-1.0]), _t([-2.0]), _t([2.0]), beta=0.5)
    assert loss == pytest.approx(2.25)
    assert grad == pytest.approx([-1.5])


def test_datum_loss_dispatches_with_resolved_config():
    logps = _logps([math.log(0.5)])
    inputs = {"logprobs": _t([math.log(0.25)]), "advantages": _t([1.0]), "weights": _t([1.0])}
    assert L.datum_loss("ppo", logps, inputs, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})[0].item() \
        == pytest.approx(-1.2)
    assert L.datum_loss("cross_entropy", logps, inputs, {})[0].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="unknown loss"):
        L.datum_loss("nope", logps, inputs, {})
