"""Cost of AdaptiveNG's step against a fixed-lr SGD step on the same preconditioned gradients.

Model: ``build_model("mnist", "paper")`` (784-1000-500-250-30 auto-encoder, mirrored
decoder, ReLU), float32, batches of 512 real MNIST images when the data set is cached
(``kronfisher.data``; never downloaded here), else uniform [0, 1] noise — the script says
which. Objective: the Bernoulli NLL summed over pixels, mean over examples (the scale at
which kfac-jax's λ₀ = 150 is meant). Curvature: KFAC, factored damping, sampled targets on
64 examples every step (T_cov = 1), refactorised every 5 steps (T_inv = 5).

Every variant runs the same loop (curvature batch inside ``collect()``, then one step):

* ``sgd``: ``precond.step()`` then ``torch.optim.SGD(lr, momentum=0.9)`` (the baseline);
* ``adaptive``: ``AdaptiveNG()`` (α, μ from the exact model on the whole batch, LM damping
  every 5 steps with the exact-GGN q: two JVPs per step, one extra forward every 5th);
* ``adaptive_closed_form``: the same with ``output_hessian=kf.OutputHessian("bernoulli")``
  (the objective's output Hessian in closed form instead of a second derivative);
* ``adaptive_sub128``, ``adaptive_sub64``: the same with ``inputs=x[:128]`` (``x[:64]``):
  curvature, L and ρ on 128 (64) of the 512 examples, the gradient on all 512;
* ``fixed_lr_lm``: ``AdaptiveNG(lr, momentum=0.9, quad_model="approx")`` (LM damping only:
  two no-grad forwards every 5th step, no JVP).

The variants take turns step by step (so that load from elsewhere hits them alike) and
each restores its parameters after every step, outside the timed region, so all are timed
at the same point. Reported: mean and median step time over ``--steps`` steps (a multiple
of 5, so the periodic work is counted at its real frequency) after ``--warmup`` steps, and
the ratio of the means to ``sgd``'s.

    python benchmarks/adaptive_overhead.py --threads 1 --steps 50
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kronfisher as kf
from kronfisher.bench.problems import build_model

BATCH = 512
CURVATURE_BATCH = 64


def load_inputs() -> tuple[Tensor, str]:
    """Real MNIST training images if cached, else uniform noise; and a description."""
    try:
        from kronfisher.data import cache_dir, load_dataset
        from kronfisher.data import mnist as mnist_mod

        path = cache_dir() / mnist_mod.CACHE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not cached (not downloading in a benchmark)")
        return load_dataset("mnist", "train").float(), f"real MNIST (cache {path})"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to noise, say why
        gen = torch.Generator().manual_seed(1234)
        return torch.rand(8 * BATCH, 784, generator=gen), f"uniform noise ({exc})"


def objective(out: Tensor, x: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean()


@dataclass
class Variant:
    name: str
    model: nn.Module
    precond: kf.Preconditioner
    step: Callable[[Tensor], None]
    times: list[float] = field(default_factory=list)


def make(name: str, start: dict) -> Variant:
    model = build_model("mnist", "paper")
    model.load_state_dict(start)
    pc = kf.KFAC(model, damping=150.0, damping_scheme="factored", cov_update_freq=1,
                 inv_update_freq=5)

    def closure_for(opt: torch.optim.Optimizer, x: Tensor) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective(model(x), x)
            loss.backward()
            return loss
        return closure

    if name == "sgd":
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(x: Tensor) -> None:
            closure_for(sgd, x)()
            pc.step()
            sgd.step()
    else:
        kw: dict = {"fixed_lr_lm": dict(lr=0.1, momentum=0.9, quad_model="approx")}.get(
            name, {})
        opt = kf.optim.AdaptiveNG(pc, damping=150.0, **kw)
        sub = {"adaptive_sub128": 128, "adaptive_sub64": 64}.get(name, BATCH)
        hess = kf.OutputHessian("bernoulli") if name == "adaptive_closed_form" else None

        def step(x: Tensor) -> None:
            xs = x[:sub]
            opt.step(closure_for(opt, x), inputs=xs, loss_fn=lambda out: objective(out, xs),
                     output_hessian=hess)
    return Variant(name, model, pc, step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    if args.steps % 5:
        ap.error("--steps must be a multiple of 5 (the damping and inverse period)")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # a fallback warning must not distort the timings
    data, what = load_inputs()
    torch.manual_seed(0)
    start = build_model("mnist", "paper").state_dict()
    variants = [make(n, start) for n in ("sgd", "adaptive", "adaptive_closed_form",
                                         "adaptive_sub128", "adaptive_sub64", "fixed_lr_lm")]
    gen = torch.Generator().manual_seed(0)
    for it in range(args.warmup + args.steps):
        x = data[torch.randint(0, data.shape[0], (BATCH,), generator=gen)]
        for v in variants:
            saved = {k: t.clone() for k, t in v.model.state_dict().items()}
            t0 = time.perf_counter()
            with v.precond.collect():
                kf.sampled_nll(v.model(x[:CURVATURE_BATCH]), "bernoulli").backward()
            v.step(x)
            elapsed = time.perf_counter() - t0
            if it >= args.warmup:
                v.times.append(elapsed)
            v.model.load_state_dict(saved)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()},"
          f" torch.set_num_threads({args.threads}) (torch.get_num_threads() ="
          f" {torch.get_num_threads()})")
    print(f"data: {what}; batch {BATCH}, curvature batch {CURVATURE_BATCH}, KFAC factored,"
          f" T_cov 1, T_inv 5; {args.steps} timed steps after {args.warmup}")
    base = statistics.mean(variants[0].times)
    print(f"{'variant':<18}{'mean s/step':>12}{'median':>10}{'× sgd':>8}")
    for v in variants:
        mean = statistics.mean(v.times)
        print(f"{v.name:<18}{mean:>12.4f}{statistics.median(v.times):>10.4f}"
              f"{mean / base:>8.2f}")


if __name__ == "__main__":
    main()
