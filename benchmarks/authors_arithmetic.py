"""Our KFAC pipeline against an independent re-statement of the paper code's KFAC step.

    PYTHONPATH=src python benchmarks/authors_arithmetic.py PROBLEM [--steps 10]
        [--lr LR --damping LAMBDA]

The released optimizer (their `optimizers/kfac.py`) does, per layer, with the curvature of
step 0 only (T_cov = T_inv = 100 covers the first 100 steps):
A = aᵀa/m and G = gᵀg/m from a quarter of the batch with sampled targets (g = the output
gradient of the mean loss times m), the inverses (A + √λI)⁻¹ and (G + √λI)⁻¹, Δ = G⁻¹∇A⁻¹,
ν = min(1, √(0.01 / Σ_layers |⟨∇, Δ⟩|)), then SGD with momentum 0.9 and weight decay 1e-3
on νΔ. This script writes that out with plain tensor operations, on our model, data split
and minibatch order, next to ``kronfisher.bench.runner.train`` with the ``paper`` preset;
the two loss sequences should agree to rounding. (The stored runs of the authors descend
much faster over the first steps: docs/results.md.)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from kronfisher.bench.problems import PAPER_TRAIN_SIZE, PROBLEMS, build_model, hyper
from kronfisher.bench.runner import RunConfig, split_train, train
from kronfisher.data import load_dataset


def restated(problem: str, steps: int, lr: float, lam: float) -> list[float]:
    """Per-pixel minibatch losses of the restated KFAC step (see the module docstring)."""
    x_all = split_train(load_dataset(problem, "train"), PAPER_TRAIN_SIZE[problem])
    torch.manual_seed(0)  # as the runner does for seed 0: the same sampled targets
    model = build_model(problem, "paper", seed=0, reseed_layers=True)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    seen: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def hook(mod, inputs, out):
        seen[mod] = {"a": inputs[0].detach()}
        out.register_hook(lambda g: seen[mod].__setitem__("g", g.detach() * g.shape[0]))

    handles = [m.register_forward_hook(hook) for m in linears]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    batch = PROBLEMS[problem].batch_size
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1))
    bce = nn.BCELoss()  # the runner's Bernoulli loss: mean BCE over examples and pixels
    inverses = {}
    losses = []
    for it in range(steps):
        x = x_all[perm[it * batch:(it + 1) * batch]]
        if it == 0:
            xf = x[: batch // 4]
            p = torch.sigmoid(model(xf))
            opt.zero_grad()
            bce(p, torch.bernoulli(p.detach())).backward()
            for m in linears:
                a = torch.cat([seen[m]["a"], torch.ones(len(xf), 1)], 1)
                g = seen[m]["g"]
                r = lam ** 0.5
                inverses[m] = (torch.linalg.inv(a.T @ a / len(xf) + r * torch.eye(a.shape[1])),
                               torch.linalg.inv(g.T @ g / len(xf) + r * torch.eye(g.shape[1])))
        opt.zero_grad()
        loss = bce(torch.sigmoid(model(x)), x)
        losses.append(float(loss.detach()))
        loss.backward()
        deltas, norm = {}, 0.0
        for m in linears:
            grad = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
            deltas[m] = inverses[m][1] @ grad @ inverses[m][0]
            norm += abs(float((grad * deltas[m]).sum()))
        nu = min((0.01 / (norm + 1e-8)) ** 0.5, 1.0)
        for m in linears:
            m.weight.grad.copy_(nu * deltas[m][:, :-1])
            m.bias.grad.copy_(nu * deltas[m][:, -1])
        opt.step()
    for h in handles:
        h.remove()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem", choices=["curves", "mnist"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--damping", type=float)
    args = ap.parse_args()
    h = hyper(args.problem, "kfac")
    lr = args.lr or h.lr
    lam = args.damping or h.damping
    ours = train(RunConfig(problem=args.problem, optimizer="kfac", iterations=args.steps,
                           lr=lr, damping=lam, eval_subset=100), load_dataset(args.problem),
                 load_dataset(args.problem, "test"), progress=False)
    ours_losses = [r["minibatch_loss_pixel"] for r in ours["iterations"]]
    theirs = restated(args.problem, args.steps, lr, lam)
    print(f"{args.problem} KFAC, lr {lr:g}, damping {lam:g}; per-pixel minibatch loss per step")
    print("kronfisher :", " ".join(f"{v:.4f}" for v in ours_losses))
    print("restated   :", " ".join(f"{v:.4f}" for v in theirs))
    gap = max(abs(a - b) for a, b in zip(ours_losses, theirs))
    print(f"largest difference {gap:.2e}")


if __name__ == "__main__":
    main()
