"""Time of one embedding curvature estimate by each solver, and of its damped solve.

Random tokens and float32 output gradients at three shapes (V, d, N = B·S positions):
a character-level model, a mid-sized vocabulary and a large one. Prints one line per
(shape, method, solver)::

    python benchmarks/embedding_solvers.py --threads 1
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from kronfisher.curvature.embedding import approximate_embedding

SHAPES = ((65, 128, 32, 128), (1000, 64, 32, 64), (20000, 64, 16, 256))
"""(V, d, B, S)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    warnings.simplefilter("ignore", RuntimeWarning)  # clamped two-term directions
    for V, d, B, S in SHAPES:
        t = torch.randint(0, V, (B, S), generator=gen)
        g = torch.randn(B, S, d, generator=gen)
        X = torch.randn(d, V, generator=gen)
        for method, solvers in (("kfac", ("auto",)), ("kpsvd", ("lanczos", "gram")),
                                ("kfac_corrected", ("lanczos", "gram"))):
            for solver in solvers:
                t0 = time.perf_counter()
                c = approximate_embedding(t, g, V, method, solver=solver)
                t1 = time.perf_counter()
                fac = c.factorize(1e-3, "factored")
                t2 = time.perf_counter()
                fac.solve(X)
                t3 = time.perf_counter()
                print(f"V={V:6d} d={d:4d} N={B * S:5d} {method:15s} {solver:8s}"
                      f" estimate {t1 - t0:8.4f} s  factorise {t2 - t1:7.4f} s"
                      f"  solve {t3 - t2:7.4f} s", flush=True)


if __name__ == "__main__":
    main()
