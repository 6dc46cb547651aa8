"""Step time and peak memory of our KFAC/KPSVD beside other PyTorch second-order optimizers.

Same model (``build_model("mnist", "paper")``, float32), same batches of 512 real MNIST
images (random data of the same shape if the cache is missing; the report says which),
same threads, same update frequency T (curvature and inverse/preconditioner every T
steps), damping ``--damping`` (default 1e-2) and the empirical Fisher of the training
batch for the KFAC-type methods:

============  ===========================================================================
method        what
============  ===========================================================================
sgd           SGD with momentum 0.9 (the paper preset's lr), no preconditioner
kfac          ``kronfisher.KFAC``, damping scheme ``--damping-scheme`` (default
              "factored": (A + π√λI) ⊗ (G + √λ/πI), the damping ASDL's KFAC uses)
kpsvd         ``kronfisher.KPSVD``, same settings (any of ``kronfisher.METHODS`` can be
              given to ``--methods``)
asdl_kfac     ASDL's ``KfacGradientMaker`` (``asdfghjkl==0.1a5``), fisher_emp, same λ
shampoo       ``pytorch_optimizer.Shampoo`` (preconditioning_compute_steps = T)
soap          ``pytorch_optimizer.SOAP`` (precondition_frequency = T)
============  ===========================================================================

Timing: every method is built from the same pretrained network and its parameters are
put back after every step (untimed; optimizer and curvature state are kept), so that all
are timed at the same point and none diverges; the methods take turns (round robin, one
whole update cycle of T steps each, ``--cycles`` rounds) so that load from elsewhere hits
them alike; the median of the per-cycle mean step times is reported.
Peak memory: each method runs ``--mem-steps`` steps in a fresh subprocess on random data of
the same shape; the peak resident set size (VmHWM) and its increase over the
process before the method was built (torch, the data and one model already loaded).

    python benchmarks/peers.py --threads 2 --freqs 1,10 --out /tmp/peers.md

ASDL 0.1a5 calls ``torch.cuda.nvtx.range_push/range_pop``, which CPU-only PyTorch lacks:
they are replaced by no-ops here. ASDL evaluates its curvature loss with reduction="sum"
(it sets the loss function's ``reduction`` argument); the loss below honours it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

import kronfisher as kf
from kronfisher.bench.problems import build_model, hyper

BATCH = 512
DAMPING = 1e-2
"""Default damping λ of the KFAC-type methods. At 1e-3 ASDL's float32 Cholesky of the
damped G factor fails (not positive definite) on this network after 30 Adam steps."""
PEERS = ("sgd", "kfac", "kpsvd", "asdl_kfac", "shampoo", "soap")
FAILURES: dict[tuple[str, int], str] = {}  # (method, T) -> the error that stopped it


def load_inputs() -> tuple[Tensor, str]:
    """Real MNIST training images if cached, else uniform noise of the same shape."""
    try:
        from kronfisher.data import cache_dir, load_dataset
        from kronfisher.data import mnist as mnist_mod

        if not (cache_dir() / mnist_mod.CACHE_FILE).exists():
            raise FileNotFoundError("MNIST not cached")
        return load_dataset("mnist", "train").float(), "real MNIST (kronfisher.data cache)"
    except (FileNotFoundError, ImportError, OSError, ValueError) as exc:
        gen = torch.Generator().manual_seed(1234)
        return torch.rand(8 * BATCH, 784, generator=gen), f"uniform noise ({exc})"


def bce_sum_mean(out: Tensor, x: Tensor, reduction: str = "mean") -> Tensor:
    """Bernoulli NLL summed over pixels; mean over examples, or sum if asked (ASDL)."""
    total = F.binary_cross_entropy_with_logits(out, x, reduction="sum")
    return total if reduction == "sum" else total / out.shape[0]


def _patch_nvtx() -> None:
    nvtx = torch.cuda.nvtx
    nvtx.range_push = lambda *a, **k: None
    nvtx.range_pop = lambda *a, **k: None


class Stepper:
    """One method on its own copy of the network; ``step(x)`` is one training step."""

    def __init__(self, method: str, start: dict[str, Tensor], T: int, scheme: str,
                 damping: float = DAMPING):
        self.method = method
        self.model = build_model("mnist", "paper")
        self.model.load_state_dict(start)
        params = list(self.model.parameters())
        self.start = [p.detach().clone() for p in params]
        h = hyper("mnist", "kfac", "paper")
        self.pc = self.gm = None
        if method in ("sgd", "asdl_kfac", *kf.METHODS):
            self.opt = torch.optim.SGD(params, lr=h.lr, momentum=0.9)
        if method in kf.METHODS:
            self.pc = kf.KroneckerPreconditioner(
                self.model, method=method, damping=damping, ema_decay=0.95,
                cov_update_freq=T, inv_update_freq=T, damping_scheme=scheme)
        elif method == "asdl_kfac":
            _patch_nvtx()
            import asdl

            cfg = asdl.PreconditioningConfig(
                data_size=BATCH, damping=damping, preconditioner_upd_interval=T,
                curvature_upd_interval=T, ema_decay=0.05)
            self.gm = asdl.KfacGradientMaker(self.model, cfg, fisher_type="fisher_emp")
        elif method == "shampoo":
            import pytorch_optimizer as po

            # momentum 0: pytorch-optimizer 4.1.0 mixes its momentum buffer (the
            # *preconditioned* previous step) into the gradient whose outer products
            # it accumulates, so with momentum the statistics grow without bound and
            # its SVD fails on non-finite input within a few refreshes at T = 10.
            # The momentum lerp is one elementwise op, so the timing is unaffected.
            self.opt = po.Shampoo(params, lr=1e-3, momentum=0.0,
                                  preconditioning_compute_steps=T)
        elif method == "soap":
            import pytorch_optimizer as po

            self.opt = po.SOAP(params, lr=3e-3, precondition_frequency=T)

    def step(self, x: Tensor) -> None:
        """One training step on the batch ``x``."""
        self.opt.zero_grad()
        if self.gm is not None:
            dummy = self.gm.setup_model_call(self.model, x)
            self.gm.setup_loss_call(bce_sum_mean, dummy, x)
            self.gm.forward_and_backward()
        elif self.pc is not None:
            with self.pc.collect():  # empirical Fisher of the training batch
                bce_sum_mean(self.model(x), x).backward()
            self.pc.step()
        else:
            bce_sum_mean(self.model(x), x).backward()
        self.opt.step()

    @torch.no_grad()
    def restore(self) -> None:
        """Parameters back to the common starting point (optimizer/curvature state kept)."""
        for p, p0 in zip(self.model.parameters(), self.start):
            p.copy_(p0)


def pretrain(X: Tensor, steps: int) -> dict[str, Tensor]:
    """The paper-preset network after ``steps`` Adam steps on batches of 512."""
    model = build_model("mnist", "paper")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = X[torch.randint(0, X.shape[0], (BATCH,), generator=gen)]
        opt.zero_grad()
        bce_sum_mean(model(x), x).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def time_round_robin(methods: list[str], X: Tensor, start: dict, T: int, cycles: int,
                     scheme: str, damping: float) -> dict[str, float]:
    """Median over ``cycles`` rounds of each method's mean step time over T steps."""
    gen = torch.Generator().manual_seed(2)
    steppers = {m: Stepper(m, start, T, scheme, damping) for m in methods}
    per: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(cycles + 1):  # round 0 is warm-up
        batches = [X[torch.randint(0, X.shape[0], (BATCH,), generator=gen)] for _ in range(T)]
        for m, st in list(steppers.items()):
            total = 0.0
            try:
                for x in batches:
                    t0 = time.perf_counter()
                    st.step(x)
                    total += time.perf_counter() - t0
                    st.restore()  # untimed: every step starts from the same network
            except torch.linalg.LinAlgError as exc:  # a peer's own numerical failure
                FAILURES[(m, T)] = str(exc).splitlines()[0][:90]
                del steppers[m]
                continue
            if r:
                per[m].append(total / T)
    return {m: statistics.median(v) if v else float("nan") for m, v in per.items()}


def vm_hwm_mib() -> float:
    """This process's peak resident set size (VmHWM, MiB).

    Unlike ``ru_maxrss`` it starts afresh at exec, so a subprocess does not inherit its
    parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def peak_memory(method: str, X: Tensor, start: dict, T: int, steps: int,
                scheme: str, damping: float) -> dict[str, float]:
    """This process's peak RSS (MiB) after ``steps`` steps of ``method``, and the increase."""
    base = vm_hwm_mib()
    st = Stepper(method, start, T, scheme, damping)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        try:
            st.step(X[torch.randint(0, X.shape[0], (BATCH,), generator=gen)])
        except torch.linalg.LinAlgError:
            break  # the failure is reported by the timing run; memory so far still counts
        st.restore()
    peak = vm_hwm_mib()
    return {"peak_mib": peak, "increase_mib": peak - base}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--freqs", default="1,10")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--pretrain", type=int, default=30)
    ap.add_argument("--methods", default=",".join(PEERS))
    ap.add_argument("--damping-scheme", default="factored",
                    choices=("tikhonov", "factored", "factored_pi1", "authors"))
    ap.add_argument("--mem-steps", type=int, default=12)
    ap.add_argument("--damping", type=float, default=DAMPING)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    freqs = [int(f) for f in args.freqs.split(",") if f]
    if args.memory_of:
        # memory does not depend on the values: a small random set keeps the data loading
        # out of the high-water mark
        X = torch.rand(8 * BATCH, 784, generator=torch.Generator().manual_seed(0))
        start = build_model("mnist", "paper").state_dict()
        print(json.dumps(peak_memory(args.memory_of, X, start, max(freqs), args.mem_steps,
                                     args.damping_scheme, args.damping)))
        return 0
    X, source = load_inputs()
    start = pretrain(X, args.pretrain)
    methods = [m for m in args.methods.split(",") if m]
    times = {T: time_round_robin(methods, X, start, T, args.cycles, args.damping_scheme,
                                 args.damping) for T in freqs}
    mem = {}
    for m in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", m, "--threads",
               str(args.threads), "--freqs", str(max(freqs)), "--pretrain", "0",
               "--mem-steps", str(args.mem_steps), "--damping-scheme", args.damping_scheme,
               "--damping", str(args.damping)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mem[m] = json.loads(out.strip().splitlines()[-1])
    lines = ["| method |" + "".join(f" T={T} ms | ×SGD | ×KFAC |" for T in freqs)
             + f" peak RSS MiB (T={max(freqs)}) | increase MiB |",
             "|---|" + "---:|---:|---:|" * len(freqs) + "---:|---:|"]
    for m in methods:
        row = f"| {m} |"
        for T in freqs:
            t = times[T][m]
            rs = f"{t / times[T]['sgd']:.2f}" if "sgd" in times[T] else "–"
            rk = f"{t / times[T]['kfac']:.2f}" if "kfac" in times[T] else "–"
            row += f" {1e3 * t:.1f} | {rs} | {rk} |"
        row += f" {mem[m]['peak_mib']:.0f} | {mem[m]['increase_mib']:.0f} |"
        lines.append(row)
    for (m, T), msg in FAILURES.items():
        lines.append(f"\n{m} at T={T} stopped: `{msg}`")
    lines.append("")
    lines.append(f"Setup: inputs {source}; batch {BATCH}; damping {args.damping}; our scheme"
                 f" {args.damping_scheme}; threads {torch.get_num_threads()}; cycles"
                 f" {args.cycles} (median of per-cycle means); torch {torch.__version__};"
                 f" loadavg {open('/proc/loadavg').read().split()[:3]}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
