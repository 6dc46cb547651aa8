"""Largest eigenvalues of each layer's first-term factors at initialisation, KFAC against
KPSVD (both balance conventions), next to the damping √λ the authors' scheme adds.

    PYTHONPATH=src python benchmarks/factor_scales.py [problem]     (default: curves)

One curvature batch (a quarter of the paper's batch, targets sampled from the model) of the
``paper`` preset's initial network.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

from kronfisher.bench.optimizers import make_optimizers
from kronfisher.bench.problems import PAPER_TRAIN_SIZE, PROBLEMS, build_model, hyper
from kronfisher.bench.runner import split_train
from kronfisher.data import load_dataset
from kronfisher.losses import sampled_nll


def main(problem: str = "curves") -> None:
    torch.set_num_threads(1)
    p = PROBLEMS[problem]
    x = split_train(load_dataset(problem, "train"), PAPER_TRAIN_SIZE[problem])
    x = x[: p.batch_size // 4]
    factors = {}
    for label, name, balance in [("KFAC", "kfac", "sqrt_sigma"),
                                 ("KPSVD √σ", "kpsvd", "sqrt_sigma"),
                                 ("KPSVD trace", "kpsvd", "kfac_trace")]:
        torch.manual_seed(0)
        model = build_model(problem, "paper", reseed_layers=True)
        h = replace(hyper(problem, name, "paper"), factor_balance=balance)
        pc = make_optimizers(name, model, h).preconditioner
        with pc.collect():
            (sampled_nll(model(x), p.likelihood) * h.loss_scale).backward()
        pc._fold_in_captures()
        factors[label] = {n: s.curvature.terms[0] for n, s in pc.layers.items()}
    lam = hyper(problem, "kpsvd", "paper").damping
    print(f"{problem}: damping λ = {lam:g}, √λ = {math.sqrt(lam):.3g}")
    print("| layer | " + " | ".join(f"{k} λmax(A) | {k} λmax(G)" for k in factors) + " |")
    print("|---" * (1 + 2 * len(factors)) + "|")
    for i, n in enumerate(factors["KFAC"]):
        cells = []
        for k in factors:
            A, G = factors[k][n]
            cells += [f"{float(torch.linalg.eigvalsh(M.double())[-1]):.3g}" for M in (A, G)]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
