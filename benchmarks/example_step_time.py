"""Wall-clock cost of a training step of the transformer example: Kronecker methods vs AdamW.

The model, data and settings are ``examples/char_transformer.py``'s (2 layers, d = 128,
batch 32 × 64 characters) with T_cov = T_inv = ``--freq`` (default 10: the sampled
curvature pass, the curvature update and the factorisation run on one step in ten, the
loop asks ``precond.collect_due``). Each method trains ``--cycles``·T steps after T warm-up
steps; the methods take turns cycle by cycle so load from elsewhere hits them alike, and
the median over cycles of the mean step time is reported, relative to AdamW's.

    python benchmarks/example_step_time.py --threads 1 --freq 10 --cycles 6

The issue 16 target is ≤ 1.5× AdamW at T = 10.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("char_transformer",
                                                  HERE / "examples" / "char_transformer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["char_transformer"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    """Print the per-step time of each method and its ratio to AdamW's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="adamw,kfac,kpsvd,kfac_corrected,lanczos")
    p.add_argument("--freq", type=int, default=10)
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--curvature-examples", type=int, default=None,
                   help="sequences in the sampled curvature pass (default: the example's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ex = _example()
    methods = args.methods.split(",")
    s = ex.Settings(update_freq=args.freq)
    if args.curvature_examples is not None:
        s.curvature_examples = args.curvature_examples
    tokens = ex.make_corpus(20_000)
    per_cycle: dict[str, list[float]] = {m: [] for m in methods}
    runs = {m: ex.Stepper(m, s, tokens) for m in methods}
    for r in runs.values():
        r.run(args.freq)  # warm-up: the first curvature update and factorisation
    for _ in range(args.cycles):
        for m in methods:
            t0 = time.perf_counter()
            runs[m].run(args.freq)
            per_cycle[m].append((time.perf_counter() - t0) / args.freq)
    base = statistics.median(per_cycle["adamw"]) if "adamw" in per_cycle else None
    print(f"threads {args.threads}, T_cov = T_inv = {args.freq}, {args.cycles} cycles,"
          f" curvature pass on {s.curvature_examples} sequences")
    print(f"{'method':16s} {'s/step':>9s} {'× AdamW':>8s}")
    for m in methods:
        t = statistics.median(per_cycle[m])
        ratio = f"{t / base:8.2f}" if base else "       -"
        print(f"{m:16s} {t:9.4f} {ratio}")


if __name__ == "__main__":
    main()
