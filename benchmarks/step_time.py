"""Wall-clock cost of one training step of the MNIST deep auto-encoder, per method and phase.

Model: ``build_model("mnist", "paper")`` (784-1000-500-250-30 auto-encoder, mirrored
decoder, ReLU), float32, batch 512 of real MNIST images when the data set is already
cached (``kronfisher.data``; never downloaded here), else uniform [0, 1] noise — the
script says which. Hyper-parameters (lr, damping, momentum, weight decay, KL clip, EMA)
are the paper preset's (``kronfisher.bench.problems.hyper``).

One training step of a second-order method, split into phases:

======================  =====================================================  ===========
phase                   what                                                   how often
======================  =====================================================  ===========
forward+backward        main loss (Bernoulli NLL, mean over examples)          every step
curvature batch         forward+backward of a random quarter of the batch      1 / T_cov
                        with sampled targets inside ``collect()``
curvature update        ``pc.timings["curvature"]`` (statistics → KroneckerSum  1 / T_cov
                        and the running average)
factorisation           ``pc.timings["inverse"]``                               1 / T_inv
preconditioning         ``pc.timings["precondition"]`` (solves, KL clip)        every step
optimizer step          SGD with momentum (Adam for the Adam baseline)         every step
======================  =====================================================  ===========

The parameters are restored after every step (outside the timed region), so every method
is timed at the same point: the network after ``--pretrain`` Adam steps (realistic
statistics, no divergence of a short run with stale curvature to distort the timings).
The optimizer still computes its full update with the preset's learning rate.

Every phase is timed on ``--steps`` steps with T_cov = T_inv = 1 (after ``--warmup``
steps; the methods take turns step by step so that load from elsewhere hits them alike)
and summarised by its median; the amortised step time at frequency T is

    fb + (curvature batch + curvature update)/T + factorisation/T + preconditioning + opt,

reported relative to plain SGD's step time (forward+backward + SGD step) and to KFAC's
at the same T. As a cross-check, ``--direct`` frequencies are also measured end to end:
the mean wall-clock time of ``--cycles``·T consecutive steps with T_cov = T_inv = T
(after T warm-up steps, starting at an update step), so that the periodic phases occur at
their real frequency.

    flock /tmp/kronfisher-bench.lock python benchmarks/step_time.py --out /tmp/step-time.md

(docs/performance.md quotes such a run and discusses it.)

Runs on the CPU with ``torch.set_num_threads(--threads)`` (default 2).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

import kronfisher as kf
from kronfisher.bench.problems import SECOND_ORDER, build_model, hyper, per_example_loss

BATCH = 512
PHASES = ("fb", "curv_batch", "curv_update", "factorisation", "precondition", "opt")
PHASE_NAMES = {
    "fb": "forward+backward",
    "curv_batch": "curvature batch",
    "curv_update": "curvature update",
    "factorisation": "factorisation",
    "precondition": "preconditioning",
    "opt": "optimizer step",
}
BASELINES = ("sgd", "adam")
ALL_METHODS = (*SECOND_ORDER, *BASELINES)
BASE_PREFIX = "base:"
BASELINE_LIB: dict[str, object] = {}  # "lib": the --baseline-src package, if loaded


def load_baseline(src: str) -> object:
    """Import the ``kronfisher`` package under ``src`` as ``kronfisher_baseline``.

    ``src`` is e.g. an exported older commit; it is loaded beside the installed package
    (its imports are all relative).
    """
    import importlib.util

    init = os.path.join(src, "kronfisher", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "kronfisher_baseline", init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kronfisher_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- data
def load_inputs() -> tuple[Tensor, str]:
    """Real MNIST training images if cached, else uniform noise; and a description."""
    try:
        from kronfisher.data import cache_dir, load_dataset
        from kronfisher.data import mnist as mnist_mod

        path = cache_dir() / mnist_mod.CACHE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not cached (not downloading in a benchmark)")
        x = load_dataset("mnist", "train").float()
        return x, f"real MNIST (kronfisher.data, cache {path}), {x.shape[0]} images"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to noise, say why
        gen = torch.Generator().manual_seed(1234)
        x = torch.rand(8 * BATCH, 784, generator=gen)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return x, f"uniform [0, 1] noise ({why})"


# ------------------------------------------------------------------------ runner
@dataclass
class Run:
    """Phase timings of one method."""
    method: str
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    direct: dict[int, float] = field(default_factory=dict)  # T -> mean seconds per step
    skipped: int = 0

    def median(self, phase: str) -> float:
        """Median seconds of one phase."""
        v = self.phases[phase]
        return statistics.median(v) if v else 0.0

    def amortised(self, freq: int) -> float:
        """Amortised seconds per step at update frequency ``freq``."""
        m = self.median
        return (
            m("fb") + m("opt") + m("precondition")
            + (m("curv_batch") + m("curv_update")) / freq
            + m("factorisation") / freq
        )

    def phase_at(self, phase: str, freq: int) -> float:
        """Seconds per step that ``phase`` contributes at frequency ``freq``."""
        per = self.median(phase)
        return per / freq if phase in ("curv_batch", "curv_update", "factorisation") else per


class Trainer:
    """One model + optimizer (+ preconditioner) and the batches it trains on."""

    def __init__(self, method: str, X: Tensor, freq: int, seed: int = 0,
                 start: dict[str, Tensor] | None = None, scheme: str = "tikhonov"):
        self.method = method
        self.X = X
        self.gen = torch.Generator().manual_seed(seed)
        self.model = build_model("mnist", "paper", seed=seed)
        if start is not None:
            self.model.load_state_dict(start)
        self.start = [p.detach().clone() for p in self.model.parameters()]
        lib, name = kf, method
        if method.startswith(BASE_PREFIX):
            lib, name = BASELINE_LIB["lib"], method[len(BASE_PREFIX):]
        h = hyper("mnist", name, "paper")
        self.h = h
        params = self.model.parameters()
        if method == "adam":
            self.opt = torch.optim.Adam(params, lr=h.lr, weight_decay=h.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=h.lr, momentum=h.momentum,
                                       weight_decay=h.weight_decay)
        self.pc = None
        if name in SECOND_ORDER:
            self.pc = lib.KroneckerPreconditioner(
                self.model, method=name, damping=h.damping, ema_decay=h.ema_decay,
                cov_update_freq=freq, inv_update_freq=freq, kl_clip=h.kl_clip, lr=h.lr,
                damping_scheme=scheme,
            )
        self.n_curv = max(1, int(round(h.curvature_fraction * BATCH)))
        self.skipped = 0

    def batch(self) -> tuple[Tensor, Tensor]:
        """A training batch and its curvature quarter."""
        idx = torch.randint(0, self.X.shape[0], (BATCH,), generator=self.gen)
        x = self.X[idx]
        perm = torch.randperm(BATCH, generator=self.gen)[: self.n_curv]
        return x, x[perm]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the parameters back where they started (optimizer state is kept)."""
        for p, p0 in zip(self.model.parameters(), self.start):
            p.copy_(p0)

    def step(self, rec: dict[str, float] | None = None) -> float:
        """One training step; returns its wall-clock seconds.

        ``rec`` (if given) receives each phase's seconds.
        """
        x, x_curv = self.batch()
        pc, clock = self.pc, time.perf_counter
        t0 = clock()
        if pc is not None:
            with pc.collect() as active:
                if active:
                    kf.sampled_nll(self.model(x_curv), "bernoulli", generator=self.gen).backward()
        t1 = clock()
        self.opt.zero_grad()
        loss = per_example_loss(self.model(x), x, "bernoulli").mean()
        loss.backward()
        t2 = clock()
        before = dict(pc.timings) if pc is not None else None
        if pc is not None and not pc.step():
            self.skipped += 1
        t3 = clock()
        self.opt.step()
        t4 = clock()
        if rec is not None:
            rec["fb"] = t2 - t1
            rec["opt"] = t4 - t3
            if pc is not None:
                d = {k: pc.timings[k] - before[k] for k in before}
                rec["curv_batch"] = t1 - t0
                rec["curv_update"] = d["curvature"]
                rec["factorisation"] = d["inverse"]
                rec["precondition"] = d["precondition"]
        return t4 - t0


def pretrain(X: Tensor, steps: int, seed: int) -> dict[str, Tensor]:
    """The paper-preset network after ``steps`` Adam steps (lr 1e-3) on batches of 512."""
    model = build_model("mnist", "paper", seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = X[torch.randint(0, X.shape[0], (BATCH,), generator=gen)]
        opt.zero_grad()
        per_example_loss(model(x), x, "bernoulli").mean().backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def measure_phases(methods: list[str], X: Tensor, steps: int, warmup: int,
                   start: dict[str, Tensor], scheme: str = "tikhonov") -> dict[str, Run]:
    """Per-phase times with T_cov = T_inv = 1.

    The methods take turns step by step, so a burst of load from elsewhere hits them alike
    instead of one method's whole run.
    """
    trainers = {m: Trainer(m, X, freq=1, start=start, scheme=scheme) for m in methods}
    runs = {m: Run(m) for m in methods}
    for _ in range(warmup):
        for tr in trainers.values():
            tr.step()
            tr.restore()
    for _ in range(steps):
        for m, tr in trainers.items():
            rec: dict[str, float] = {}
            tr.step(rec)
            tr.restore()
            for k, v in rec.items():
                runs[m].phases[k].append(v)
    for m, tr in trainers.items():
        runs[m].skipped = tr.skipped
    return runs


def measure_direct(run: Run, X: Tensor, T: int, warmup: int, start: dict[str, Tensor],
                   cycles: int, scheme: str = "tikhonov") -> None:
    """Mean wall-clock time of cycles·T consecutive steps with T_cov = T_inv = T.

    Starts at an update step, so the periodic phases occur exactly ``cycles`` times.
    """
    if run.method in BASELINES:
        run.direct[T] = run.amortised(T)  # no periodic phase
        return
    tr = Trainer(run.method, X, freq=T, start=start, scheme=scheme)
    for _ in range(max(T, warmup)):
        tr.step()
        tr.restore()
    while tr.pc.steps % T:
        tr.step()
        tr.restore()
    total = 0.0
    for _ in range(cycles * T):
        total += tr.step()
        tr.restore()
    run.direct[T] = total / (cycles * T)


# ------------------------------------------------------------------------ report
def loadavg() -> str:
    """The 1/5/15-minute load averages (or 'n/a')."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def fmt_ms(s: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{1e3 * s:.1f}"


def report(runs: dict[str, Run], freqs: list[int], direct: list[int], meta: dict) -> str:
    """The markdown report of the measured runs."""
    sgd = runs.get("sgd")
    kfac = runs.get("kfac")
    lines = []
    lines.append("### Amortised step time (T_cov = T_inv = T)\n")
    lines.append("ms per step; ×SGD = relative to plain SGD's step, ×KFAC = relative to KFAC's "
                 "at the same T.\n")
    head = "| method |" + "".join(f" T={T} ms | ×SGD | ×KFAC |" for T in freqs)
    lines.append(head)
    lines.append("|---|" + "---:|---:|---:|" * len(freqs))
    for name, run in runs.items():
        row = f"| {name} |"
        for T in freqs:
            t = run.amortised(T)
            rs = f"{t / sgd.amortised(T):.2f}" if sgd else "–"
            rk = f"{t / kfac.amortised(T):.2f}" if kfac else "–"
            row += f" {fmt_ms(t)} | {rs} | {rk} |"
        lines.append(row)
    # forward+backward and the SGD step are the same code for every method: their
    # differences between methods are load noise, so also report totals with the median
    common_fb = statistics.median(r.median("fb") for r in runs.values())
    common_opt = statistics.median(r.median("opt") for n, r in runs.items() if n != "adam")

    def common(run: Run, T: int) -> float:
        return run.amortised(T) - run.median("fb") - run.median("opt") + common_fb + (
            common_opt if run.method != "adam" else run.median("opt"))

    lines.append("\n### Same, with the common forward+backward and SGD step\n")
    lines.append(f"forward+backward {fmt_ms(common_fb)} ms and SGD step {fmt_ms(common_opt)} ms"
                 " (medians over the methods) in every row; the rest is each method's own.\n")
    lines.append(head)
    lines.append("|---|" + "---:|---:|---:|" * len(freqs))
    for name, run in runs.items():
        row = f"| {name} |"
        for T in freqs:
            t = common(run, T)
            rs = f"{t / common(sgd, T):.2f}" if sgd else "–"
            rk = f"{t / common(kfac, T):.2f}" if kfac else "–"
            row += f" {fmt_ms(t)} | {rs} | {rk} |"
        lines.append(row)
    for T in [t for t in freqs if t == 10] or freqs[:1]:
        lines.append(f"\n### Per-phase breakdown at T = {T} (ms per step, amortised)\n")
        lines.append("| method | " + " | ".join(PHASE_NAMES[p] for p in PHASES)
                     + " | total |")
        lines.append("|---|" + "---:|" * (len(PHASES) + 1))
        for name, run in runs.items():
            cells = [fmt_ms(run.phase_at(p, T)) if run.phases[p] else "–" for p in PHASES]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt_ms(run.amortised(T))} |")
    lines.append("\n### Per-update cost (ms, median, not amortised)\n")
    lines.append("| method | curvature batch | curvature update | factorisation | "
                 "preconditioning |")
    lines.append("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        if name in BASELINES:
            continue
        cells = [fmt_ms(run.median(p)) for p in
                 ("curv_batch", "curv_update", "factorisation", "precondition")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if direct:
        lines.append("\n### Cross-check: end-to-end mean over whole update cycles "
                     "(ms per step)\n")
        lines.append("| method |" + "".join(f" T={T} direct | T={T} from phases | ×KFAC direct |"
                                            for T in direct))
        lines.append("|---|" + "---:|---:|---:|" * len(direct))
        for name, run in runs.items():
            row = f"| {name} |"
            for T in direct:
                rk = (f"{run.direct[T] / kfac.direct[T]:.2f}"
                      if kfac and T in kfac.direct else "–")
                row += f" {fmt_ms(run.direct[T])} | {fmt_ms(run.amortised(T))} | {rk} |"
            lines.append(row)
    lines.append("")
    lines.append("Setup: " + "; ".join(f"{k}: {v}" for k, v in meta.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per method (T = 1)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pretrain", type=int, default=50,
                    help="Adam steps before timing (the point every method is timed at)")
    ap.add_argument("--freqs", default="1,10,100", help="T_cov = T_inv values to report")
    ap.add_argument("--direct", default="10",
                    help="frequencies also measured end to end ('' for none)")
    ap.add_argument("--cycles", type=int, default=3,
                    help="update cycles (of T steps) in each end-to-end measurement")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damping-scheme", default="tikhonov",
                    choices=("tikhonov", "factored", "factored_pi1", "authors"),
                    help="damping scheme of our Kronecker methods")
    ap.add_argument("--baseline-src", default=None,
                    help="a directory holding another kronfisher package (e.g. `git archive"
                         " <commit> src | tar -x -C DIR`, then DIR/src): its Kronecker"
                         " methods are timed beside ours as 'base:<method>', interleaved")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    freqs = [int(f) for f in args.freqs.split(",") if f]
    direct = [int(f) for f in args.direct.split(",") if f]
    methods = [m for m in args.methods.split(",") if m]
    if args.baseline_src:
        BASELINE_LIB["lib"] = load_baseline(args.baseline_src)
        methods += [BASE_PREFIX + m for m in methods if m in SECOND_ORDER]
    bad = [m for m in methods
           if m.removeprefix(BASE_PREFIX if args.baseline_src else "") not in ALL_METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {ALL_METHODS}")
    # SGD and KFAC are the references: always measure them, and first
    order = [m for m in ("sgd", "kfac") if m not in methods] + methods
    order = sorted(order, key=lambda m: (m != "sgd", m != "kfac"))

    X, source = load_inputs()
    print(f"inputs: {source}", flush=True)
    start = pretrain(X, args.pretrain, args.seed)
    load0 = loadavg()
    print(f"loadavg before: {load0}", flush=True)
    t_start = time.perf_counter()
    with warnings.catch_warnings():
        # clamping of indefinite two-term approximations warns on every refresh
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        runs = measure_phases(order, X, args.steps, args.warmup, start, args.damping_scheme)
        print(f"phases measured in {time.perf_counter() - t0:.0f} s", flush=True)
        for m in order:
            t0 = time.perf_counter()
            for T in direct:
                measure_direct(runs[m], X, T, args.warmup, start, args.cycles,
                               args.damping_scheme)
            print(f"  {m:15s} T=1 step {fmt_ms(runs[m].amortised(1)):>6s} ms;"
                  + "".join(f" T={T} direct {fmt_ms(runs[m].direct[T])} ms" for T in direct)
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    load1 = loadavg()
    meta = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "inputs": source,
        "model": "build_model('mnist', 'paper'), float32, batch 512, curvature batch 128",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "damping scheme": args.damping_scheme,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "loadavg before/after": f"{load0} / {load1}",
        "timed at": f"the network after {args.pretrain} Adam steps, restored after each step",
        "steps (T=1, median)": args.steps,
        "end-to-end cycles": args.cycles,
        "warm-up": args.warmup,
        "runtime": f"{time.perf_counter() - t_start:.0f} s",
    }
    text = report(runs, freqs, direct, meta)
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
