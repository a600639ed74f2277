"""Every lr_policy against its closed form (sgd_solver.cpp GetLearningRate)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.solver.lr_policy import LR_POLICIES, LRPolicyError, learning_rate


def _param(**fields) -> caffe_pb2.SolverParameter:
    p = caffe_pb2.SolverParameter(base_lr=0.1, max_iter=100)
    for k, v in fields.items():
        if k == "stepvalue":
            p.stepvalue.extend(v)
        else:
            setattr(p, k, v)
    return p


def _f32(x: float) -> float:
    return float(np.float32(x))


CLOSED_FORMS = {
    "fixed": (dict(), lambda p, it: p.base_lr),
    "step": (dict(gamma=0.5, stepsize=7), lambda p, it: p.base_lr * p.gamma ** (it // p.stepsize)),
    "exp": (dict(gamma=0.97), lambda p, it: p.base_lr * p.gamma ** it),
    "inv": (dict(gamma=0.01, power=0.75), lambda p, it: p.base_lr * (1 + p.gamma * it) ** -p.power),
    "poly": (dict(power=2.0), lambda p, it: p.base_lr * (1 - it / p.max_iter) ** p.power),
    "sigmoid": (dict(gamma=-0.2, stepsize=40),
                lambda p, it: p.base_lr / (1 + math.exp(-p.gamma * (it - p.stepsize)))),
}


@pytest.mark.parametrize("policy", sorted(CLOSED_FORMS))
def test_closed_form(policy):
    fields, formula = CLOSED_FORMS[policy]
    p = _param(lr_policy=policy, **fields)
    for it in (0, 1, 6, 7, 13, 14, 40, 63, 99):
        rate, _ = learning_rate(p, it)
        # rel 1e-5: Caffe rounds intermediates to float32 (poly near max_iter loses ~6 digits)
        assert rate == pytest.approx(formula(p, it), rel=1e-5), (policy, it)
        assert rate == _f32(rate)     # float32, like Caffe's Dtype


def test_step_sets_current_step():
    p = _param(lr_policy="step", gamma=0.1, stepsize=10)
    assert learning_rate(p, 25, current_step=0)[1] == 2


def test_multistep_is_stateful_and_logs():
    p = _param(lr_policy="multistep", gamma=0.1, stepvalue=[3, 5, 6])
    logged: list[str] = []
    step, rates = 0, []
    for it in range(9):
        rate, step = learning_rate(p, it, step, log=logged.append)
        rates.append(rate)
    expected = [0.1] * 3 + [0.01] * 2 + [0.001] + [0.0001] * 3
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert step == 3
    assert logged == ["MultiStep Status: Iteration 3, step = 1",
                      "MultiStep Status: Iteration 5, step = 2",
                      "MultiStep Status: Iteration 6, step = 3"]


def test_multistep_advances_at_most_one_per_call():
    """Resuming past two boundaries at once catches up one step per iteration, as in Caffe."""
    p = _param(lr_policy="multistep", gamma=0.5, stepvalue=[2, 4])
    rate, step = learning_rate(p, 10, 0)
    assert step == 1 and rate == pytest.approx(0.05)
    rate, step = learning_rate(p, 11, step)
    assert step == 2 and rate == pytest.approx(0.025)


def test_poly_reaches_zero_at_max_iter():
    p = _param(lr_policy="poly", power=1.0)
    assert learning_rate(p, 100)[0] == 0.0


def test_unknown_policy_lists_known():
    with pytest.raises(LRPolicyError) as err:
        learning_rate(_param(lr_policy="cosine"), 0)
    for name in LR_POLICIES:
        assert name in str(err.value)
    with pytest.raises(LRPolicyError, match="unset"):
        learning_rate(_param(), 0)


def test_step_needs_positive_stepsize():
    with pytest.raises(LRPolicyError, match="stepsize"):
        learning_rate(_param(lr_policy="step", gamma=0.1), 3)
