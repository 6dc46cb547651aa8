"""What the reliability checks of docs/reliability.md cost on the MNIST deep auto-encoder.

Times, on ``build_model("mnist", "paper")`` (2.8 M parameters, float32, batch 512 of
uniform noise; the values do not matter for these costs), each check the preconditioner
runs besides its own work, next to what it replaces or accompanies:

* gradient check: one sum per parameter's ``.grad`` and one sync
  (``_checks.nonfinite_names``), against the per-layer sums over the gradient matrices it
  replaces (which missed the skipped parameters) and against ``torch._foreach_norm(·, inf)``
  (a fused max-abs pass, slow on the CPU);
* stale-gradient check (``Preconditioner._check_fresh_grads``);
* the estimator's exact power-of-two scaling (``pow2_scale`` and the two divisions) against
  a whole KFAC and KPSVD curvature update of the largest layer;
* one whole ``step()`` of KFAC (T_cov = T_inv = 1), for scale.

Medians of ``--repeats`` interleaved runs, in milliseconds::

    python benchmarks/check_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

from kronfisher import KFAC
from kronfisher.bench.problems import build_model, per_example_loss
from kronfisher.curvature import KroneckerEstimator
from kronfisher.curvature.estimator import pow2_scale
from kronfisher.linalg.kronecker import all_finite
from kronfisher.losses import sampled_nll
from kronfisher.preconditioner._checks import nonfinite_names


def _ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("mnist", "paper")
    x = torch.rand(512, 784)
    pc = KFAC(model, damping=1e-3)

    def batch() -> None:
        with pc.collect():
            sampled_nll(model(x[:128]), "bernoulli").backward()
        model.zero_grad(set_to_none=True)
        per_example_loss(model(x), x, "bernoulli").mean().backward()

    batch()
    layers = list(pc.layers.values())
    big = max(layers, key=lambda s: s.module.weight.numel())
    a = torch.cat([c.a for c in big.captures])
    g = torch.cat([c.g for c in big.captures])
    rows = {
        "gradient check, sums over all parameters (new)": lambda: nonfinite_names(named),
        "gradient check, torch._foreach_norm(inf) (not used)": lambda: torch._foreach_norm(
            [t for _, t in named], math.inf),
        "gradient check, per-layer sums of [W b] (old)": lambda: [
            all_finite(G) for G in matrices],
        "stale-gradient check": pc._check_fresh_grads,
        "power-of-two scaling of (a, g), largest layer": lambda: (
            a / pow2_scale(a), g / pow2_scale(g)),
        "KFAC curvature estimate, largest layer": lambda: KroneckerEstimator("kfac").estimate(
            a, g, (1, 1), None),
        "KPSVD curvature estimate, largest layer": lambda: KroneckerEstimator(
            "kpsvd").estimate(a, g, (1, 1), None),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step_times = []
        for _ in range(max(3, args.repeats // 3)):
            batch()
            t0 = time.perf_counter()
            pc.step()
            step_times.append((time.perf_counter() - t0) * 1e3)
    batch()  # fresh gradients: the stale-gradient check compares them with the last step's
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    matrices = [s.adapter.grad_matrix() for s in layers]
    print(f"MNIST auto-encoder, {sum(p.numel() for p in model.parameters())} parameters,"
          f" {len(layers)} layers, torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| what | ms (median) |\n|---|---:|")
    for name, fn in rows.items():
        print(f"| {name} | {_ms(fn, args.repeats):.3f} |")
    print(f"| one KFAC step() (T = 1) | {statistics.median(step_times):.1f} |")


if __name__ == "__main__":
    main()
