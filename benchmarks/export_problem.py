"""Export a run's data, initial weights and minibatch order for a peer written elsewhere.

    PYTHONPATH=src python benchmarks/export_problem.py --problem mnist --seed 0 \
        --iterations 3000 --out /tmp/mnist-seed0.npz

The file holds what ``bench.runner.train`` would use for the same problem, preset
(``paper`` network: ReLU, Xavier-uniform re-seeded per layer, bias 0.01), seed and split:
``train`` (n, D) float32, ``W0, b0, W1, b1, ...`` (torch layout: W is (out, in)), and
``batches`` (iterations, batch) int32 row indices into ``train`` (-1 pads the partial last
minibatch of an epoch). ``benchmarks/peer_kfac_jax.py`` reads it, so kfac-jax trains on
exactly our minibatches from exactly our initial weights.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from kronfisher.bench.problems import PROBLEMS, build_model, hyper
from kronfisher.bench.runner import split_train
from kronfisher.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=sorted(PROBLEMS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    h = hyper(args.problem, "adam", "paper")
    train = split_train(load_dataset(args.problem, "train"), h.train_size)
    model = build_model(args.problem, "paper", seed=args.seed, reseed_layers=h.reseed_layers)
    n, bs = len(train), min(h.batch_size, len(train))
    per_epoch = math.ceil(n / bs) if h.partial_last_batch else max(n // bs, 1)
    gen = torch.Generator().manual_seed(args.seed + 1)  # as bench.runner.train
    batches = np.full((args.iterations, bs), -1, dtype=np.int32)
    it = 0
    while it < args.iterations:
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            idx = perm[b * bs:(b + 1) * bs].numpy()
            batches[it, :len(idx)] = idx
            it += 1
            if it == args.iterations:
                break
    arrays = {"train": train.numpy().astype(np.float32), "batches": batches,
              "likelihood": np.array(PROBLEMS[args.problem].likelihood)}
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        arrays[f"W{i}"] = lin.weight.detach().numpy()
        arrays[f"b{i}"] = lin.bias.detach().numpy()
    np.savez(args.out, **arrays)
    print(f"wrote {args.out}: {n} images, {len(linears)} layers, {args.iterations} minibatches"
          f" of {bs}")


if __name__ == "__main__":
    main()
