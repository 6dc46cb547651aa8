"""A quick pilot of AdaptiveNG with automatic α and μ on the MNIST auto-encoder (one seed).

Model ``build_model("mnist", "paper")`` (ReLU, Xavier), float32, minibatches of 512 from
the cached MNIST training set (``kronfisher.data``; not downloaded here) in a seeded
order; objective: Bernoulli NLL summed over pixels, mean over examples; KFAC with factored
damping from λ₀ = 150, T_cov = 1 on 64 examples with sampled targets, T_inv = 5;
``AdaptiveNG(lr=None, momentum=None)``, LM damping every 5 steps. Prints every 100
iterations (and every iteration whose loss exceeds 0.3/pixel after iteration 100) the mean
per-pixel minibatch loss of the last 20 iterations, λ, α, μ, q, ρ and the number of
skipped updates; stops when the loss exceeds 100/pixel. Not a benchmark of speed.

    python benchmarks/adaptive_pilot.py --iters 1000 --sub 128 --min-damping 1e-5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

import kronfisher as kf
from kronfisher.bench.problems import build_model
from kronfisher.data import load_dataset


def objective(out: Tensor, x: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--sub", type=int, default=512, help="examples of the quadratic model")
    ap.add_argument("--model-grad", default="closure", choices=("closure", "inputs"))
    ap.add_argument("--min-damping", type=float, default=1e-8)
    ap.add_argument("--loss-lower-bound", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = load_dataset("mnist", "train").float()
    torch.manual_seed(0)
    model = build_model("mnist", "paper")
    pc = kf.KFAC(model, damping=150.0, damping_scheme="factored", cov_update_freq=1,
                 inv_update_freq=5)
    opt = kf.optim.AdaptiveNG(pc, damping=150.0, model_grad=args.model_grad,
                              min_damping=args.min_damping,
                              loss_lower_bound=args.loss_lower_bound)
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
    print(f"torch.set_num_threads({args.threads}); {vars(args)}")
    losses: list[float] = []
    skips, t0 = 0, time.perf_counter()
    for it in range(args.iters):
        j = (it * 512) % (data.shape[0] - 512)
        x = data[perm[j:j + 512]]
        with pc.collect():
            kf.sampled_nll(model(x[:64]), "bernoulli").backward()

        def closure(x: Tensor = x) -> Tensor:
            opt.zero_grad()
            loss = objective(model(x), x)
            loss.backward()
            return loss

        xs = x[:args.sub]
        loss = opt.step(closure, inputs=xs, loss_fn=lambda out, xs=xs: objective(out, xs))
        losses.append(float(loss.detach()) / 784)
        r = opt.last_step
        assert r is not None
        skips += not r.applied
        if (it + 1) % 100 == 0 or (it > 100 and losses[-1] > 0.3) or not losses[-1] < 100:
            print(f"it {it + 1}: mean of last 20 {statistics.mean(losses[-20:]):.4f}/pixel,"
                  f" this {losses[-1]:.4f}, λ {r.next_damping:.3g}, α {r.alpha:.3g},"
                  f" μ {r.momentum:.3g}, q {r.q}, ρ {r.rho}, skipped {skips},"
                  f" {time.perf_counter() - t0:.0f} s", flush=True)
        if not losses[-1] < 100:
            print(f"diverged at iteration {it + 1}")
            break


if __name__ == "__main__":
    main()
