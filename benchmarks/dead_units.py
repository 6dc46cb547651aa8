"""Train one run and count the dead ReLU units of every hidden layer at the end.

    PYTHONPATH=src python benchmarks/dead_units.py PROBLEM OPTIMIZER ITERATIONS
        [--seed S] [--lr LR] [--damping D] [--factor-balance B] [--threads 1]

A unit is dead when it outputs 0 on every one of the first 2,000 training images: no
gradient reaches its incoming weights again, and a layer whose units are all dead makes
the decoder's output constant — the "predict the mean image" plateau. Prints the
±10-iteration mean minibatch loss at iterations 100/200/300 and the end, and per ReLU
layer (in network order) dead/width.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from kronfisher.bench import runner
from kronfisher.bench.problems import PAPER_TRAIN_SIZE
from kronfisher.bench.reference import window_mean
from kronfisher.data import load_dataset


def dead_per_layer(model: nn.Sequential, x: torch.Tensor) -> list[tuple[int, int]]:
    """(dead units, width) of each ReLU's output, in order."""
    out, h = [], x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                out.append((int((h.amax(0) == 0).sum()), h.shape[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem")
    ap.add_argument("optimizer")
    ap.add_argument("iterations", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--damping", type=float)
    ap.add_argument("--factor-balance")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    built: list[nn.Sequential] = []
    build = runner.build_model

    def keep(*a, **k):
        built.append(build(*a, **k))
        return built[-1]

    runner.build_model = keep  # the runner builds the model internally; keep a handle
    tr, te = load_dataset(args.problem, "train"), load_dataset(args.problem, "test")
    cfg = runner.RunConfig(problem=args.problem, optimizer=args.optimizer,
                           iterations=args.iterations, seed=args.seed, lr=args.lr,
                           damping=args.damping, factor_balance=args.factor_balance,
                           eval_subset=1000)
    rec = runner.train(cfg, tr, te, progress=False)
    losses = [r["minibatch_loss_pixel"] for r in rec["iterations"]]
    marks = [i for i in (100, 200, 300) if i < len(losses)] + [len(losses) - 10]
    x = runner.split_train(tr, PAPER_TRAIN_SIZE[args.problem])[:2000]
    dead = " ".join(f"{d}/{w}" for d, w in dead_per_layer(built[-1], x))
    print(f"{args.problem} {args.optimizer} seed {args.seed}: loss "
          + " ".join(f"it{i} {window_mean(losses, i):.4f}" for i in marks)
          + f"; dead units per ReLU layer: {dead}")


if __name__ == "__main__":
    main()
