"""The ``adaptive`` preset (issue 15): what it changes, what it keeps, and one run of it."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from kronfisher.bench.adaptive import INITIAL_DAMPING
from kronfisher.bench.optimizers import make_optimizers
from kronfisher.bench.problems import (
    EXTRA_FIRST_ORDER,
    PROBLEMS,
    SECOND_ORDER,
    build_model,
    hyper,
    pixel_factor,
)
from kronfisher.bench.runner import RunConfig, train
from kronfisher.optim import AdaptiveNG


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_first_order_baselines_keep_the_paper_settings(problem):
    for name in ("adam", "sgd", *EXTRA_FIRST_ORDER):
        assert asdict(hyper(problem, name, "adaptive")) == asdict(hyper(problem, name, "paper"))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_kronecker_methods_use_the_objectives_own_fisher_and_lm_damping(problem):
    for name in (*SECOND_ORDER, *(f"identity_{m}" for m in SECOND_ORDER)):
        h, paper = hyper(problem, name, "adaptive"), hyper(problem, name, "paper")
        assert paper.loss_scale == pytest.approx(pixel_factor(problem))  # paper unchanged
        assert h.loss_scale == 1.0  # objective and sampled curvature at one scale
        assert (h.step_rule, h.damping, h.damping_scheme) == ("adaptive", INITIAL_DAMPING,
                                                              "factored")
        assert (h.ema_counter, h.factor_balance, h.kl_clip) == ("updates", "sqrt_sigma", None)
        # the data, batch and split are the paper's, so the runs compare with it
        assert (h.batch_size, h.train_size, h.partial_last_batch, h.reseed_layers) == (
            paper.batch_size, paper.train_size, paper.partial_last_batch, paper.reseed_layers)


def test_adaptive_preset_uses_the_paper_network_and_init():
    a = build_model("curves", "adaptive", seed=3, reseed_layers=True)
    p = build_model("curves", "paper", seed=3, reseed_layers=True)
    assert [type(m) for m in a] == [type(m) for m in p]
    for x, y in zip(a.parameters(), p.parameters()):
        assert torch.equal(x, y)


def test_make_optimizers_builds_adaptive_ng_with_the_preset_hyper_parameters():
    model = build_model("curves", "adaptive")
    h = hyper("curves", "lanczos", "adaptive")
    built = make_optimizers("lanczos", model, h)
    assert isinstance(built.optimizer, AdaptiveNG)
    assert built.preconditioner is not None and built.preconditioner.kl_clip is None
    assert built.preconditioner.damping_scheme == "factored"
    group = built.optimizer.param_groups[0]
    assert group["weight_decay"] == h.weight_decay
    assert (group["momentum_range"], group["model_grad"]) == (h.momentum_range, h.model_grad)
    assert (group["lr"], group["momentum"]) == (None, None)  # α and μ from the model


def test_an_adaptive_run_trains_and_records_its_damping(tiny_curves):
    cfg = RunConfig("curves", "kfac", preset="adaptive", iterations=12, batch_size=32,
                    train_subset=160, eval_subset=40)
    res = train(cfg, tiny_curves["train"], tiny_curves["test"], progress=False)
    assert res["status"] == "complete" and len(res["iterations"]) == 12
    trace = res["adaptive_trace"]
    assert [r["iteration"] for r in trace] == list(range(1, 13))
    assert trace[0]["damping"] == INITIAL_DAMPING
    # T_λ = 5: the damping moves only after steps 5 and 10, by exactly ω = 0.95⁵ or 1/ω
    omega = 0.95 ** 5
    for prev, row in zip(trace, trace[1:]):
        ratio = row["damping"] / prev["damping"]
        if prev["iteration"] % 5 == 0:
            assert min(abs(ratio - omega), abs(ratio - 1 / omega), abs(ratio - 1)) < 1e-9
        else:
            assert ratio == 1.0
    lo, hi = hyper("curves", "kfac", "adaptive").momentum_range
    assert all(lo <= r["momentum"] <= hi for r in trace if r["applied"])
    losses = [r["minibatch_loss_pixel"] for r in res["iterations"]]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
